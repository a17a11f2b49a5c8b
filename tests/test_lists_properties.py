"""Property tests of equiav.data.lists with hypothesis.

Manifests with awkward text (spaces, commas, quotes, unicode) are written with Python's csv
writer in every list format that can express them and must read back unchanged; damaged
copies (rows replaced by garbage) must report every bad row on its own physical line and
keep every good row.
"""

from __future__ import annotations

import csv
import io
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from equiav.data.lists import (
    MANIFEST_COLUMNS,
    MAX_CLIP_ID_LENGTH,
    ParsedList,
    check_clip_id,
    classes_from_labels,
    read_audioset_segments,
    read_esc50,
    read_user_list,
    read_vggsound_list,
    read_vggsound_test_list,
)

# Bounded so that the file runs in seconds; each example writes and parses one small list.
# In CI a failing example is reported as found: shrinking it could outlast the whole suite.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate] if os.environ.get("CI") else list(Phase)
SETTINGS = settings(max_examples=40, deadline=None, phases=_PHASES)

ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-"
YTID_CHARS = ID_CHARS.replace(".", "")
FORMATS = ["audioset_official", "audioset_plain", "vggsound", "vggsound_test", "esc50", "user"]

ytids = st.text(YTID_CHARS, min_size=11, max_size=11)
_short_ids = st.tuples(st.sampled_from(YTID_CHARS), st.text(ID_CHARS, max_size=20)).map("".join)
# Also ids of exactly the longest allowed length (padded: drawing 200 characters is slow).
clip_ids = st.one_of(_short_ids, _short_ids.map(lambda t: t.ljust(MAX_CLIP_ID_LENGTH, ".")))
# Pieces that CSV writers and readers get wrong: delimiters, quotes, spaces, non-ASCII.
_PIECES = st.one_of(
    st.sampled_from([" ", ",", '"', "'", ", ", '" ', ";", "#", "\t", "\u00a0", "é", "漢字", "🎵", "\ufeff"]),
    # No control characters: \r and \n end lines, and no field of these formats spans lines.
    st.characters(blacklist_categories=("Cs", "Cc")),
)


def texts(forbidden: str = "") -> st.SearchStrategy[str]:
    """Non-empty text as the readers give it back: stripped, not starting with '#' (a comment)."""
    return (
        st.lists(_PIECES, min_size=1, max_size=8)
        .map(lambda parts: "".join(c for c in "".join(parts) if c not in forbidden).strip())
        .filter(lambda t: t != "" and not t.startswith("#"))
    )


def youtube_clip_id(ytid: str, start: float) -> str:
    """The documented clip id of a YouTube segment (docs/data.md): whole seconds, else milliseconds."""
    return f"{ytid}_{int(start):06d}" if start.is_integer() else f"{ytid}_{round(start * 1000):09d}ms"


def csv_line(fields: list) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="").writerow(fields)
    return buf.getvalue()


def quoted(text: str) -> str:
    buf = io.StringIO()
    csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="").writerow([text])
    return buf.getvalue()


def manifest(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            name: pd.Series([r[name] for r in rows], dtype="float64" if name in ("start", "end") else str)
            for name in MANIFEST_COLUMNS
        }
    )


@dataclass
class Clip:
    fields: dict  # what the list's row holds, by column
    expected: dict  # the manifest row it must give


@dataclass
class Format:
    """How one list format writes a row, and values that make a row bad."""

    columns: list[str]
    line: Callable[[dict], str]
    bad_values: dict[str, list]
    has_end: bool
    quote_opener: str = ',"'  # appended to a good line, it opens a quote the line never closes


def _official_number(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


FORMAT = {
    "audioset_official": Format(
        ["YTID", "start", "end", "labels"],
        lambda f: ", ".join([f["YTID"], _official_number(f["start"]), _official_number(f["end"]), quoted(f["labels"])]),
        {
            "YTID": ["--PJHxphWEs1", "--PJHxphWE", "--PJHx.hWEs", ""],
            "start": ["abc", "nan", "-1", "inf", ""],
            "end": ["abc", "nan", "inf", "-1"],
            "labels": ["", ","],
        },
        has_end=True,
        quote_opener=', "',
    ),
    "audioset_plain": Format(
        ["YTID", "start", "end", "labels"],
        lambda f: csv_line([f["YTID"], f["start"], f["end"], f["labels"]]),
        {
            "YTID": ["--PJHxphWEs1", "--PJHxphWE", "--PJHx.hWEs", ""],
            "start": ["abc", "nan", "-1", "inf", ""],
            "end": ["abc", "nan", "inf", "-1"],
            "labels": ["", ","],
        },
        has_end=True,
    ),
    "vggsound": Format(
        ["YTID", "start", "label", "split"],
        lambda f: csv_line([f["YTID"], f["start"], f["label"], f["split"]]),
        {
            "YTID": ["--PJHxphWEs1", "--PJHxphWE", "--PJHx.hWEs", ""],
            "start": ["abc", "nan", "-1", "inf", "", "1e20"],
            "label": [""],
            "split": [""],
        },
        has_end=False,
    ),
    "vggsound_test": Format(
        ["name", "label"],
        lambda f: csv_line([f["name"], f["label"]]),
        {
            "name": [
                "--PJHxphWEs1_000030.mp4",
                "--PJHxphWE_000030.mp4",
                "--PJHxphWEs_.mp4",
                "--PJHxphWEs_1.5.mp4",
                "--PJHxphWEs_000030.wav",
                "",
            ],
            "label": [""],
        },
        has_end=False,
    ),
    "esc50": Format(
        ["filename", "fold", "target", "category", "esc10", "src_file", "take"],
        lambda f: csv_line([f[c] for c in ("filename", "fold", "target", "category", "esc10", "src_file", "take")]),
        {
            "filename": ["", "z" * (MAX_CLIP_ID_LENGTH + 1) + ".wav"],
            "fold": ["x", "1.5", ""],
            "target": ["-1", "x", "0.5"],
            "category": [""],
        },
        has_end=False,
    ),
    # The user list's column order is drawn per example; see user_list().
    "user": Format(
        ["clip_id", "source", "start", "end", "labels", "split"],
        lambda f: csv_line([f[c] for c in f["__order__"]]),
        {
            "clip_id": ["..", ".", ".x", "a b", "x" * (MAX_CLIP_ID_LENGTH + 1), ""],
            "source": [""],
            "start": ["abc", "nan", "-1", "inf", ""],
            "end": ["abc", "nan", "-1"],
            "labels": ["", ";"],
            "split": [""],
        },
        has_end=True,
    ),
}


# ---------------------------------------------------------------------------------------
# Drawing manifests in each format


def _youtube_start(draw) -> float:
    """Whole seconds or milliseconds, so that the official '%.3f' form holds them exactly."""
    return draw(st.one_of(st.integers(0, 100_000).map(float), st.integers(0, 10**8).map(lambda ms: ms / 1000)))


def audioset_clips(draw, split: str) -> list[Clip]:
    clips = []
    for _ in range(draw(st.integers(1, 8))):
        ytid, start = draw(ytids), _youtube_start(draw)
        end = (round(start * 1000) + draw(st.integers(1, 10**6))) / 1000
        labels = draw(st.lists(texts(forbidden=",;"), min_size=1, max_size=3))
        clips.append(
            Clip(
                {"YTID": ytid, "start": start, "end": end, "labels": ",".join(labels)},
                {
                    "clip_id": youtube_clip_id(ytid, start),
                    "source": ytid,
                    "start": start,
                    "end": end,
                    "labels": ";".join(labels),
                    "split": split,
                },
            )  # fmt: skip
        )
    return clips


def vggsound_clips(draw) -> list[Clip]:
    clips = []
    for _ in range(draw(st.integers(1, 8))):
        ytid, start = draw(ytids), _youtube_start(draw)
        label, split = draw(texts(forbidden=";")), draw(texts())
        written = int(start) if start.is_integer() and draw(st.booleans()) else start  # "30" as in the real list
        clips.append(
            Clip(
                {"YTID": ytid, "start": written, "label": label, "split": split},
                {
                    "clip_id": youtube_clip_id(ytid, start),
                    "source": ytid,
                    "start": start,
                    "end": start + 10.0,
                    "labels": label,
                    "split": split,
                },
            )  # fmt: skip
        )
    return clips


def vggsound_test_clips(draw) -> list[Clip]:
    clips = []
    for _ in range(draw(st.integers(1, 8))):
        ytid, start = draw(ytids), draw(st.integers(0, 10**6))
        label = draw(texts(forbidden=";"))
        clips.append(
            Clip(
                {"name": f"{ytid}_{start:06d}.mp4", "label": label},
                {
                    "clip_id": youtube_clip_id(ytid, float(start)),
                    "source": ytid,
                    "start": float(start),
                    "end": start + 10.0,
                    "labels": label,
                    "split": "test",
                },
            )  # fmt: skip
        )
    return clips


def esc50_clips(draw, audio: Path) -> tuple[list[Clip], list[str]]:
    categories = draw(st.lists(texts(forbidden=";"), min_size=1, max_size=4, unique=True))
    n = draw(st.integers(len(categories), len(categories) + 6))
    # Every target appears (the class table is 0..C-1); the first row of each comes first.
    targets = list(range(len(categories))) + draw(
        st.lists(st.integers(0, len(categories) - 1), min_size=n - len(categories), max_size=n - len(categories))
    )
    clips = []
    for target in targets:
        stem, fold = draw(clip_ids), draw(st.integers(1, 5))
        filename = f"{stem}.wav"
        clips.append(
            Clip(
                {
                    "filename": filename,
                    "fold": fold,
                    "target": target,
                    "category": categories[target],
                    "esc10": "False",
                    "src_file": "100",
                    "take": "A",
                },
                {
                    "clip_id": stem,
                    "source": str(audio / filename),
                    "start": 0.0,
                    "end": math.nan,
                    "labels": categories[target],
                    "split": f"fold{fold}",
                },
            )  # fmt: skip
        )
    return clips, categories


def user_clips(draw, order: list[str]) -> list[Clip]:
    clips = []
    for _ in range(draw(st.integers(1, 8))):
        clip_id, source, split = draw(clip_ids), draw(texts()), draw(texts())
        start = draw(st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False))
        end = draw(st.one_of(st.none(), st.floats(min_value=start, max_value=2e6, exclude_min=True, allow_nan=False)))
        labels = draw(st.lists(texts(forbidden=";"), min_size=1, max_size=3))
        clips.append(
            Clip(
                {
                    "clip_id": clip_id,
                    "source": source,
                    "start": start,
                    "end": "" if end is None else end,
                    "labels": ";".join(labels),
                    "split": split,
                    "__order__": order,
                },
                {
                    "clip_id": clip_id,
                    "source": source,
                    "start": start,
                    "end": math.nan if end is None else end,
                    "labels": ";".join(labels),
                    "split": split,
                },
            )  # fmt: skip
        )
    return clips


@dataclass
class Written:
    path: Path
    clips: list[Clip]
    header: list[str]  # lines before the first row
    read: Callable[[Path], ParsedList]
    protected: int = 0  # the first rows that damage must leave alone (ESC-50: one per target)
    categories: list[str] | None = None


def draw_list(draw, fmt: str, root: Path) -> Written:
    """A manifest in ``fmt``, not yet written: its clips, the header lines and how to read it."""
    path = root / "list.csv"
    if fmt.startswith("audioset"):
        split = draw(texts())
        clips = audioset_clips(draw, split)
        classes = classes_from_labels(label for c in clips for label in c.expected["labels"].split(";"))
        use_classes = draw(st.booleans())  # with a class table the known-label fast path runs
        if fmt == "audioset_official":
            header = [
                "# Segments csv created Sun Mar  5 10:54:31 2017",
                f"# num_ytids={len(clips)}, num_segs={len(clips)}",
                "# YTID, start_seconds, end_seconds, positive_labels",
            ]
        else:
            header = ["YTID,start_seconds,end_seconds,positive_labels"] if draw(st.booleans()) else []
        chosen = classes if use_classes else None
        return Written(path, clips, header, lambda p: read_audioset_segments(p, split, chosen))
    if fmt == "vggsound":
        clips = vggsound_clips(draw)
        classes = classes_from_labels(c.expected["labels"] for c in clips) if draw(st.booleans()) else None
        return Written(path, clips, [], lambda p: read_vggsound_list(p, classes))
    if fmt == "vggsound_test":
        clips = vggsound_test_clips(draw)
        classes = classes_from_labels(c.expected["labels"] for c in clips) if draw(st.booleans()) else None
        return Written(path, clips, [], lambda p: read_vggsound_test_list(p, "test", classes))
    if fmt == "esc50":
        audio = root / "audio"
        clips, categories = esc50_clips(draw, audio)
        header = [csv_line(FORMAT["esc50"].columns)]
        return Written(path, clips, header, lambda p: read_esc50(p, audio), len(categories), categories)
    order = draw(st.permutations(FORMAT["user"].columns))
    clips = user_clips(draw, order)
    return Written(path, clips, [csv_line(order)], read_user_list)


def write(draw, written: Written, rows: list[str]) -> list[int]:
    """Write the header and ``rows`` (with drawn blank and comment lines between); the rows' line numbers."""
    lines = list(written.header)
    numbers = []
    for row in rows:
        # A comment with a stray quote is still a comment.
        lines += draw(st.lists(st.sampled_from(["", "   ", '# a comment, "with a stray quote']), max_size=2))
        lines.append(row)
        numbers.append(len(lines))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    final = newline if draw(st.booleans()) else ""
    encoding = draw(st.sampled_from(["utf-8", "utf-8-sig"]))  # utf-8-sig writes a BOM
    with open(written.path, "w", newline="", encoding=encoding) as f:
        f.write(newline.join(lines) + final)
    if written.categories is not None:  # ESC-50 needs the audio files to exist (placeholders do)
        audio = written.path.parent / "audio"
        audio.mkdir(exist_ok=True)
        for clip in written.clips:
            (audio / clip.fields["filename"]).touch()
    return numbers


def parse(written: Written) -> ParsedList:
    result = written.read(written.path)
    if written.categories is not None:
        parsed, classes = result
        assert classes["id"].tolist() == written.categories
        return parsed
    return result


# ---------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_a_written_manifest_reads_back_the_same(fmt: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = draw_list(data.draw, fmt, Path(tmp))
        lines = write(data.draw, written, [FORMAT[fmt].line(c.fields) for c in written.clips])
        parsed = parse(written)
    assert parsed.problems == []
    assert parsed.rows_read == len(written.clips)
    pd.testing.assert_frame_equal(parsed.manifest, manifest([c.expected for c in written.clips]))
    assert parsed.origin["line"].tolist() == lines
    assert all(check_clip_id(c) is None for c in parsed.manifest["clip_id"])


# ---------------------------------------------------------------------------------------
# Damaged lists


_TOKENS = st.sampled_from(["x", "1", "2.5", "a b", "zz", "-", "é"])


def garbage(draw, fmt: str, clip: Clip) -> tuple[str, str]:
    """A bad line in place of ``clip``'s row, and its kind."""
    spec = FORMAT[fmt]
    kinds = ["fields", "value", "quote"] + (["zero-length"] if spec.has_end else [])
    kind = draw(st.sampled_from(kinds))
    fields = dict(clip.fields)
    if kind == "fields":
        width = len(clip.fields.get("__order__", spec.columns))
        count = draw(st.integers(1, 8).filter(lambda n: n != width))
        return csv_line(draw(st.lists(_TOKENS, min_size=count, max_size=count))), kind
    if kind == "value":
        column = draw(st.sampled_from(sorted(spec.bad_values)))
        fields[column] = draw(st.sampled_from(spec.bad_values[column]))
    elif kind == "zero-length":
        fields["end"] = fields["start"]
    line = spec.line(fields)
    if kind == "quote":
        line += spec.quote_opener + draw(_TOKENS)
    return line, kind


@pytest.mark.parametrize("fmt", FORMATS)
@SETTINGS
@given(data=st.data())
def test_a_damaged_list_reports_every_bad_row_and_keeps_every_good_one(fmt: str, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        written = draw_list(data.draw, fmt, Path(tmp))
        n = len(written.clips)
        damaged = data.draw(st.sets(st.integers(written.protected, n - 1)) if n > written.protected else st.just(set()))
        rows, kinds = [], {}
        for i, clip in enumerate(written.clips):
            if i in damaged:
                line, kinds[i] = garbage(data.draw, fmt, clip)
                rows.append(line)
            else:
                rows.append(FORMAT[fmt].line(clip.fields))
        lines = write(data.draw, written, rows)
        parsed = parse(written)
    good = [i for i in range(n) if i not in damaged]
    # Every bad row is one problem on its own line, whatever came before it ...
    assert sorted(p.line for p in parsed.problems) == [lines[i] for i in sorted(damaged)]
    assert all(p.file == str(written.path) for p in parsed.problems)
    problem_at = {p.line: p.problem for p in parsed.problems}
    for i, kind in kinds.items():
        if kind == "quote":
            assert problem_at[lines[i]].startswith("unbalanced quoting"), problem_at[lines[i]]
    # ... and every good row is kept, with its line.
    pd.testing.assert_frame_equal(parsed.manifest, manifest([written.clips[i].expected for i in good]))
    assert parsed.origin["line"].tolist() == [lines[i] for i in good]
    assert parsed.rows_read == n
