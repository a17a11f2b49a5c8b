"""The YouTube data sets' official lists: AudioSet segments and VGGSound's train/test lists."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from equiav.data.lists.classes import (
    _known_ids,
)
from equiav.data.lists.rows import (
    _VGGSOUND_FILE,
    _VGGSOUND_SECONDS,
    _YTID,
    _YTID_RULE,
    MAX_CLIP_ID_LENGTH,
    ParsedList,
    _Builder,
    _check_split,
    _is_header,
    _labels,
    _number,
    _PathLike,
    _rows,
    _span,
    _youtube_clip_id,
    check_clip_id,
)


def read_audioset_segments(path: _PathLike, split: str, classes: pd.DataFrame | None) -> ParsedList:
    """An AudioSet segment CSV (official ``#``-commented form or re-saved), every row in ``split``.

    ``classes`` None accepts any label (the class table then comes from the lists).
    """
    path = Path(path)
    _check_split(split, f"AudioSet list {path}", required=True)
    known = _known_ids(classes, f"AudioSet list {path}")
    b = _Builder(str(path))
    first = True
    for line, row in _rows(path, b.unreadable):
        if first:
            first = False
            if _is_header(row, "YTID"):
                continue
        b.rows_read += 1
        if len(row) != 4:
            b.problem(line, f"expected 4 fields (YTID, start_seconds, end_seconds, positive_labels), found {len(row)}")
            continue
        ytid = row[0].strip()
        if not _YTID.match(ytid):
            b.problem(line, f"malformed YouTube id {ytid!r}: {_YTID_RULE}")
            continue
        # Inline number parsing: this loop runs 2M times for AudioSet's unbalanced list.
        try:
            start, end = float(row[1]), float(row[2])
        except ValueError:
            start = end = math.nan
        if not 0.0 <= start < end < math.inf:  # also false for NaN
            b.problem(line, str(_span(row[1].strip(), row[2].strip(), open_end=False)))
            continue
        labels = _labels(row[3].split(","), known)
        if isinstance(labels, tuple):
            b.problem(line, labels[0])
            continue
        clip_id = f"{ytid}_{int(start):06d}" if start.is_integer() else _youtube_clip_id(ytid, start)
        # The YouTube id matched _YTID and the rest is "_<digits>[ms]", so the length is the
        # one clip id rule a huge start can break (the full check would add ~8% on 2M rows).
        if len(clip_id) > MAX_CLIP_ID_LENGTH:
            b.problem(line, f"start {row[1].strip()} is too large: {check_clip_id(clip_id)}")
            continue
        b.add(line, clip_id, ytid, start, end, labels, split)
    return b.result()


def _vggsound_clip(ytid: str, start: float, start_text: str) -> tuple[str, float] | str:
    """The clip id and end of the 10 s VGGSound clip at ``start``; a str is the problem."""
    end = start + _VGGSOUND_SECONDS
    if not end > start:  # an infinite start, or one so large that the 10 s round away
        return f"start {start_text} is too large: the 10 s clip from it would have no length"
    clip_id = _youtube_clip_id(ytid, start)
    problem = check_clip_id(clip_id)
    if problem is not None:  # only a huge start can do that
        return f"start {start_text} is too large: {problem}"
    return clip_id, end


def read_vggsound_list(path: _PathLike, classes: pd.DataFrame | None) -> ParsedList:
    """VGGSound's full list: ``YTID,start_seconds,label,split`` with no header; clips are 10 s."""
    path = Path(path)
    known = _known_ids(classes, f"VGGSound list {path}")
    b = _Builder(str(path))
    first = True
    for line, row in _rows(path, b.unreadable):
        if first:
            first = False
            if _is_header(row, "YTID"):
                continue
        b.rows_read += 1
        if len(row) != 4:
            b.problem(line, f"expected 4 fields (YTID, start_seconds, label, split), found {len(row)}")
            continue
        ytid = row[0].strip()
        if not _YTID.match(ytid):
            b.problem(line, f"malformed YouTube id {ytid!r}: {_YTID_RULE}")
            continue
        start = _number(row[1].strip())
        if start is None or start < 0:
            b.problem(line, f"bad start {row[1]!r}: not a number of seconds >= 0")
            continue
        labels = _labels([row[2]], known)
        if isinstance(labels, tuple):
            b.problem(line, labels[0])
            continue
        split = row[3].strip()
        if not split:
            b.problem(line, "empty split")
            continue
        clip = _vggsound_clip(ytid, start, row[1].strip())
        if isinstance(clip, str):
            b.problem(line, clip)
            continue
        b.add(line, clip[0], ytid, start, clip[1], labels, split)
    return b.result()


def read_vggsound_test_list(path: _PathLike, split: str, classes: pd.DataFrame | None) -> ParsedList:
    """VGGSound's ``test.csv``: ``<YTID>_<start:06d>.mp4,label`` with no header; clips are 10 s."""
    path = Path(path)
    _check_split(split, f"VGGSound test list {path}", required=True)
    known = _known_ids(classes, f"VGGSound test list {path}")
    b = _Builder(str(path))
    for line, row in _rows(path, b.unreadable):
        b.rows_read += 1
        if len(row) != 2:
            b.problem(line, f"expected 2 fields (<YTID>_<start>.mp4, label), found {len(row)}")
            continue
        name = row[0].strip()
        match = _VGGSOUND_FILE.match(name)
        if match is None:
            b.problem(line, f"file name {name!r} is not <YTID>_<start seconds>.mp4")
            continue
        ytid = match.group(1)
        if not _YTID.match(ytid):
            b.problem(line, f"malformed YouTube id {ytid!r} in {name!r}: {_YTID_RULE}")
            continue
        start = float(match.group(2))
        labels = _labels([row[1]], known)
        if isinstance(labels, tuple):
            b.problem(line, labels[0])
            continue
        clip = _vggsound_clip(ytid, start, match.group(2))
        if isinstance(clip, str):
            b.problem(line, clip)
            continue
        b.add(line, clip[0], ytid, start, clip[1], labels, split)
    return b.result()
