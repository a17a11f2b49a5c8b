"""Clip lists of the supported data sets, parsed into one manifest schema.

Every parser returns a :class:`ParsedList`: the usable rows as a manifest DataFrame
(columns :data:`MANIFEST_COLUMNS`), one :class:`ListProblem` per dropped row (with its
1-based line number), and the number of data rows read. A row that cannot be used is
dropped and reported, never silently; a file that cannot be used at all raises
:class:`ListError`.

No field of the supported formats spans lines, so every physical line is parsed on its
own: a line whose quoting is unbalanced (a ``"`` that opens a field the line does not
close) is one problem on that line, and the next line is read normally. Lines starting
with ``#`` and blank lines are skipped; a UTF-8 BOM is ignored; spaces after a comma are
skipped (the official AudioSet ``", "`` separators).

Clip ids name files and folders in the later stages, so every id a parser makes passes
:func:`check_clip_id`: 1 to :data:`MAX_CLIP_ID_LENGTH` characters of A-Z a-z 0-9 _ . -,
not starting with ``.`` (so never ``.``, ``..`` or a hidden name). YouTube segments
need a start ``>= 0`` and an end after it (a zero-length segment is a problem).

Parsers do not deduplicate: :func:`combine_lists` is the one place where clip ids become
unique, so that the configured duplicate policy also covers repeats inside one file. Pass
every parsed list through it, even a single one.

A class table is a DataFrame with columns ``index`` (model output order 0..C-1), ``id``
(what the manifest's ``labels`` hold, joined by ``;``) and ``name`` (for display).
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "MANIFEST_COLUMNS",
    "MAX_CLIP_ID_LENGTH",
    "ListError",
    "ListProblem",
    "ParsedList",
    "check_clip_id",
    "read_audioset_classes",
    "read_vggsound_classes",
    "classes_from_labels",
    "read_audioset_segments",
    "read_vggsound_list",
    "read_vggsound_test_list",
    "read_esc50",
    "read_speech_commands",
    "read_user_list",
    "combine_lists",
    "write_problems",
    "check_bad_fraction",
]

MANIFEST_COLUMNS: tuple[str, ...] = ("clip_id", "source", "start", "end", "labels", "split")
_CLASS_COLUMNS = ("index", "id", "name")
_USER_COLUMNS = MANIFEST_COLUMNS

_PathLike = str | os.PathLike[str]

# File systems allow 255 bytes per name; the stages append suffixes (".mkv", ".h5", ...)
# to clip ids, so ids stay well below that.
MAX_CLIP_ID_LENGTH = 200

_YTID = re.compile(r"[A-Za-z0-9_-]{11}\Z")
# The whole clip id rule in one match, for millions of ids: no leading '.', allowed characters, length.
_SAFE_ID = re.compile(rf"(?!\.)[A-Za-z0-9_.-]{{1,{MAX_CLIP_ID_LENGTH}}}\Z")
_UNSAFE_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_VGGSOUND_FILE = re.compile(r"(.*)_(\d+)\.mp4\Z")
# VGGSound's lists give only the start: every clip is 10 s long.
_VGGSOUND_SECONDS = 10.0
# combine_lists's own problems start with this; they are not malformed rows.
_DUPLICATE = "duplicate of"
_YTID_RULE = "expected 11 characters of A-Z a-z 0-9 _ -"
_ID_RULE = (
    f"a clip id names files, so it must be 1 to {MAX_CLIP_ID_LENGTH} characters of A-Z a-z 0-9 _ . - "
    "and must not start with '.'"
)
_UNBALANCED = (
    "unbalanced quoting: a '\"' opens a quoted field that this line does not close (no field of "
    "these lists spans lines); close the quote or remove it"
)


class ListError(ValueError):
    """A list that cannot be used at all; the message names the file, the problem and the fix."""


@dataclass(frozen=True)
class ListProblem:
    """One dropped (or otherwise questionable) row of a list."""

    file: str
    line: int  # 1-based physical line number; 0 when not about one line
    problem: str


@dataclass(eq=False)
class ParsedList:
    """A parsed list: its usable rows, what was wrong with the others, and how many were read.

    ``origin`` (columns ``file``, ``line``, aligned with the manifest's rows) says where each
    row came from, so that :func:`combine_lists` can name the lines of duplicates. It is
    optional: without it duplicates are reported with line 0.
    """

    manifest: pd.DataFrame
    problems: list[ListProblem]
    rows_read: int
    origin: pd.DataFrame | None = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------
# Reading rows


def _rows(path: Path, bad_line: Callable[[int, str], None]) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line number, fields)`` of each data row, skipping '#' comments and blank lines.

    Every physical line is parsed on its own. A line that cannot be split into fields (its
    quoting is unbalanced, or the csv module refuses it) is passed to ``bad_line(line,
    problem)`` instead, and reading goes on with the next line.
    """
    try:
        f = open(path, newline="", encoding="utf-8-sig")
    except FileNotFoundError:
        raise ListError(f"{path}: no such file; check the list's `path` (or `url`) in the config") from None
    except IsADirectoryError:
        raise ListError(f"{path} is a folder, not a list file; point the list's `path` at the CSV file") from None
    number = 0  # physical lines handed to the csv reader
    done = 0  # the line whose row the reader returned last
    unbalanced = False

    def lines() -> Iterator[str]:
        # Python's csv reader takes a newline inside quotes as part of the field and reads on
        # until the quote closes, joining any number of following lines into one row. When it
        # asks for a line before it returned the row of the last one, that line ended inside
        # quotes: a lone '"' closes the field there, so the row is that line alone.
        nonlocal number, unbalanced
        for text in f:
            if done != number:
                unbalanced = True
                yield '"'
            number += 1
            yield text
        if done != number:
            unbalanced = True
            yield '"'

    with f:
        # skipinitialspace reads the official AudioSet format (", " separators and quoted
        # labels after the space) and its re-saved forms alike.
        reader = csv.reader(lines(), skipinitialspace=True)
        try:
            while True:
                try:
                    for row in reader:
                        done = number
                        if unbalanced:
                            unbalanced = False
                            if not row[0].startswith("#"):  # (a closed row has a field)
                                bad_line(number, _UNBALANCED)
                            continue
                        if not row or row[0].startswith("#"):
                            continue
                        if len(row) == 1 and not row[0].strip():
                            continue
                        yield number, row
                except csv.Error as e:  # e.g. a field over csv.field_size_limit(); the reader goes on
                    done = number
                    bad_line(number, f"cannot be read as CSV ({e}); fix or remove the line")
                    continue
                break
        except UnicodeDecodeError as e:
            raise ListError(f"{path} is not UTF-8 text ({e}); is it the list itself and not an archive?") from None


def _refuse_line(path: Path) -> Callable[[int, str], None]:
    """``bad_line`` for tables that must be complete (class tables): any unreadable line stops the run."""

    def refuse(line: int, problem: str) -> None:
        raise ListError(f"{path}: line {line}: {problem} (a class table must be complete; re-download a damaged one)")

    return refuse


def _is_header(row: list[str], first_column: str) -> bool:
    return row[0].strip().lower() == first_column.lower()


def _number(text: str) -> float | None:
    """The finite float in ``text``, or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _span(start_text: str, end_text: str, *, open_end: bool) -> tuple[float, float] | str:
    """Parse a start and an end ('' = to the end of the file if ``open_end``); a str is the problem."""
    start = _number(start_text)
    if start is None:
        return f"bad start {start_text!r}: not a number"
    if start < 0:
        return f"negative start {start_text!r}"
    if end_text == "":
        return (start, math.nan) if open_end else "empty end"
    end = _number(end_text)
    if end is None:
        return f"bad end {end_text!r}: not a number"
    if start == end:
        return f"zero-length segment: start {start_text} equals end {end_text}; give an end after the start"
    if start > end:
        return f"start {start_text} is not before end {end_text}"
    return start, end


def check_clip_id(clip_id: str) -> str | None:
    """Why ``clip_id`` cannot be a clip id, or None when it can.

    A clip id is used as a file and folder name (``<clip_id>.mkv``, ``.partial/<clip_id>/``,
    ...), so it must be a safe file name: 1 to :data:`MAX_CLIP_ID_LENGTH` characters of
    A-Z a-z 0-9 _ . -, not starting with '.' (that refuses ``.`` and ``..``, which name the
    folder itself and its parent, and hidden names). Every parser here checks its ids; the
    later stages call it again before they use an id as a name.
    """
    if not isinstance(clip_id, str):
        return f"clip_id {clip_id!r} is a {type(clip_id).__name__}, not text: {_ID_RULE}"
    if _SAFE_ID.match(clip_id):
        return None
    if not clip_id:
        return "empty clip_id"
    shown = repr(clip_id) if len(clip_id) <= 60 else f"{clip_id[:40]!r}..."
    bad = sorted(set(_UNSAFE_CHARS.findall(clip_id)))
    if bad:
        reason = f"contains {', '.join(repr(c) for c in bad[:5])}"
    elif clip_id.startswith("."):
        reason = "starts with '.'"
    else:
        reason = f"is {len(clip_id)} characters long"
    return f"clip_id {shown} {reason}: {_ID_RULE}"


def _youtube_clip_id(ytid: str, start: float) -> str:
    """``<ytid>_<start:06d>`` for whole seconds, else ``<ytid>_<milliseconds:09d>ms``."""
    if start.is_integer():
        return f"{ytid}_{int(start):06d}"
    return f"{ytid}_{round(start * 1000):09d}ms"


def _safe_id(text: str) -> str:
    """``text`` with every character not allowed in clip ids, and a leading '.', replaced by '_'.

    The result passes :func:`check_clip_id` unless ``text`` is empty or too long; callers
    check it (truncating would make distinct files one clip).
    """
    safe = _UNSAFE_CHARS.sub("_", text)
    return "_" + safe[1:] if safe.startswith(".") else safe


def _labels(parts: list[str], known: frozenset[str] | None) -> str | tuple[str]:
    """Join labels with ';' in the order given; a 1-tuple holds the problem instead."""
    # Fast path for millions of clean rows: every part is already a known class id.
    if known is not None and known.issuperset(parts):
        return ";".join(parts)
    labels = [p.strip() for p in parts if p.strip()]
    if not labels:
        return ("empty labels",)
    if known is not None:
        unknown = [label for label in labels if label not in known]
        if unknown:
            names = ", ".join(repr(label) for label in unknown)
            return (f"unknown label{'s' if len(unknown) > 1 else ''} {names} (not in the class table)",)
    else:
        bad = [label for label in labels if ";" in label]
        if bad:
            return (f"label {bad[0]!r} contains ';', which separates labels in the manifest",)
    return ";".join(labels)


class _Builder:
    """Collects a manifest column by column (no per-row pandas work: lists hold millions of rows)."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.lines: list[int] = []
        self.columns: dict[str, list] = {name: [] for name in MANIFEST_COLUMNS}
        self.problems: list[ListProblem] = []
        self.rows_read = 0
        # Bound appends, one per column: add() runs millions of times.
        self._appends = tuple(self.columns[name].append for name in MANIFEST_COLUMNS)

    def add(self, line: int, clip_id: str, source: str, start: float, end: float, labels: str, split: str) -> None:
        self.lines.append(line)
        a_id, a_source, a_start, a_end, a_labels, a_split = self._appends
        a_id(clip_id)
        a_source(source)
        a_start(start)
        a_end(end)
        a_labels(labels)
        a_split(split)

    def problem(self, line: int, text: str, file: str | None = None) -> None:
        self.problems.append(ListProblem(self.file if file is None else file, line, text))

    def unreadable(self, line: int, text: str) -> None:
        """A data line that could not be split into fields: a row read, and its problem."""
        self.rows_read += 1
        self.problem(line, text)

    def result(self) -> ParsedList:
        origin = pd.DataFrame(
            {
                "file": pd.Series([self.file] * len(self.lines), dtype=str),
                "line": np.asarray(self.lines, dtype=np.int64),
            }
        )
        return ParsedList(_manifest(self.columns), self.problems, self.rows_read, origin)


def _manifest(columns: dict[str, Sequence]) -> pd.DataFrame:
    """A manifest DataFrame with the schema's dtypes, even when empty."""
    return pd.DataFrame(
        {
            name: pd.Series(columns[name], dtype=np.float64 if name in ("start", "end") else str)
            for name in MANIFEST_COLUMNS
        }
    )


def _check_split(split: str | None, what: str, *, required: bool) -> None:
    if split is None and not required:
        return
    if not isinstance(split, str) or not split.strip():
        raise ValueError(
            f"{what}: split={split!r}; give the list's `split`, a non-empty name such as 'train' or 'eval'"
        )


# ---------------------------------------------------------------------------------------
# Class tables


def _class_table(index: Iterable[int], ids: Iterable[str], names: Iterable[str], where: str) -> pd.DataFrame:
    """Build and check a class table: ids unique, non-empty, without ';'; index 0..C-1."""
    table = pd.DataFrame(
        {
            "index": pd.Series(list(index), dtype=np.int64),
            "id": pd.Series(list(ids), dtype=str),
            "name": pd.Series(list(names), dtype=str),
        }
    )
    if table.empty:
        raise ListError(f"{where}: no classes; is it the right file?")
    empty = table["id"].str.strip() == ""
    if empty.any():
        first = int(table["index"][empty].iloc[0])
        raise ListError(f"{where}: class at index {first} has an empty id; fix the class list")
    with_semicolon = table["id"][table["id"].str.contains(";", regex=False)]
    if len(with_semicolon):
        raise ListError(
            f"{where}: class id {with_semicolon.iloc[0]!r} contains ';', which separates labels in the "
            "manifest; rename the class"
        )
    repeated = table["id"][table["id"].duplicated()]
    if len(repeated):
        raise ListError(f"{where}: class id {repeated.iloc[0]!r} appears more than once; remove the repeat")
    table = table.sort_values("index", kind="stable").reset_index(drop=True)
    if not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
        raise ListError(
            f"{where}: class indices must be 0..{len(table) - 1}, each once "
            f"(found {', '.join(str(i) for i in table['index'][:8])}{'...' if len(table) > 8 else ''}); "
            "fix the class list"
        )
    return table


def _known_ids(classes: pd.DataFrame | None, what: str) -> frozenset[str] | None:
    if classes is None:
        return None
    if not isinstance(classes, pd.DataFrame) or not set(_CLASS_COLUMNS) <= set(classes.columns):
        found = list(classes.columns) if isinstance(classes, pd.DataFrame) else type(classes).__name__
        raise ValueError(f"{what}: classes must be a class table with columns index, id, name (got {found})")
    return frozenset(classes["id"].astype(str))


def read_audioset_classes(path: _PathLike) -> pd.DataFrame:
    """AudioSet's ``class_labels_indices.csv`` (``index,mid,display_name``) as a class table."""
    path = Path(path)
    index: list[int] = []
    ids: list[str] = []
    names: list[str] = []
    header = None
    for line, row in _rows(path, _refuse_line(path)):
        if header is None:
            header = [x.strip() for x in row]
            if header != ["index", "mid", "display_name"]:
                raise ListError(
                    f"{path}: line {line}: header {','.join(header)!r} is not 'index,mid,display_name'; "
                    "is it AudioSet's class_labels_indices.csv?"
                )
            continue
        number = _number(row[0]) if len(row) == 3 else None
        if number is None or not number.is_integer():
            # A class table must be complete: one bad row would shift the model's outputs.
            raise ListError(
                f"{path}: line {line}: expected 'index,mid,display_name' with an integer index, "
                f"found {','.join(row)!r}; fix or re-download the file"
            )
        index.append(int(number))
        ids.append(row[1].strip())
        names.append(row[2].strip())
    return _class_table(index, ids, names, str(path))


def read_vggsound_classes(path: _PathLike) -> pd.DataFrame:
    """VGGSound's ``stat.csv`` (``label,count,category``, no header) as a class table of its labels sorted."""
    path = Path(path)
    labels: list[str] = []
    first = True
    for line, row in _rows(path, _refuse_line(path)):
        if first:
            first = False
            if _is_header(row, "label"):
                continue
        if len(row) != 3:
            raise ListError(
                f"{path}: line {line}: expected 'label,count,category', found {len(row)} fields "
                f"({','.join(row)!r}); is it VGGSound's stat.csv?"
            )
        labels.append(row[0].strip())
    labels.sort()
    return _class_table(range(len(labels)), labels, labels, str(path))


def classes_from_labels(labels: Iterable[str]) -> pd.DataFrame:
    """A class table of the sorted unique ``labels`` (each one class id, not ';'-joined)."""
    if isinstance(labels, str):
        raise TypeError(f"labels must be an iterable of class ids, not the string {labels!r}")
    unique = sorted(set(labels))
    return _class_table(range(len(unique)), unique, unique, "classes from the lists' labels")


# ---------------------------------------------------------------------------------------
# YouTube lists


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


# ---------------------------------------------------------------------------------------
# Local data sets


def read_esc50(csv_path: _PathLike, audio_dir: _PathLike) -> tuple[ParsedList, pd.DataFrame]:
    """ESC-50's ``esc50.csv`` (or a data set laid out like it): split ``fold<N>``, classes from target/category.

    The clip id is the file name without its suffix, each character outside A-Z a-z 0-9
    _ . - and a leading '.' replaced by '_' (``.hidden.wav`` -> ``_hidden``, ``...wav`` ->
    ``_.``); a name whose id would be longer than :data:`MAX_CLIP_ID_LENGTH` is a problem
    row. Two names that give one id are left to :func:`combine_lists` to report.

    Rows whose audio file is missing are kept (the download stage reports them); a list of
    which no file exists under ``audio_dir`` raises :class:`ListError`.
    """
    csv_path, audio_dir = Path(csv_path), Path(audio_dir)
    file = str(csv_path)
    b = _Builder(file)
    header: dict[str, int] | None = None
    need = ("filename", "fold", "target", "category")
    class_of_target: dict[int, str] = {}
    width = 0
    found_audio = False

    def bad_line(line: int, problem: str) -> None:
        if header is None:
            raise ListError(f"{file}: line {line}: cannot read the header: {problem}")
        b.unreadable(line, problem)

    for line, row in _rows(csv_path, bad_line):
        if header is None:
            names = [x.strip() for x in row]
            header = {name: i for i, name in enumerate(names)}
            absent = [name for name in need if name not in header]
            if absent:
                raise ListError(
                    f"{file}: line {line}: header lacks {', '.join(absent)} (found {','.join(names)!r}); "
                    "an ESC-50 list starts with 'filename,fold,target,category,...'"
                )
            width = len(names)
            continue
        b.rows_read += 1
        if len(row) != width:
            b.problem(line, f"expected {width} fields like the header, found {len(row)}")
            continue
        filename, fold_text, target_text, category = (row[header[name]].strip() for name in need)
        fold, target = _number(fold_text), _number(target_text)
        if not filename:
            b.problem(line, "empty source: no filename")
            continue
        if fold is None or not fold.is_integer():
            b.problem(line, f"bad fold {fold_text!r}: not an integer")
            continue
        if target is None or not target.is_integer() or target < 0:
            b.problem(line, f"bad target {target_text!r}: not an integer >= 0")
            continue
        if not category:
            b.problem(line, "empty labels: no category")
            continue
        if class_of_target.setdefault(int(target), category) != category:
            raise ListError(
                f"{file}: line {line}: target {int(target)} is {category!r} here but "
                f"{class_of_target[int(target)]!r} earlier; each target must name one category"
            )
        clip_id = _safe_id(Path(filename).stem)
        problem = check_clip_id(clip_id)
        if problem is not None:
            b.problem(line, f"filename {filename!r} gives no usable clip id: {problem}; rename the file")
            continue
        audio = audio_dir / filename
        # A missing file keeps its row: the download stage reports it as unavailable, like
        # any other clip whose media cannot be had. Only "none at all" is a config mistake.
        found_audio = found_audio or audio.is_file()
        b.add(line, clip_id, str(audio), 0.0, math.nan, category, f"fold{int(fold)}")
    sources = b.columns["source"]
    if sources and not found_audio:
        raise ListError(
            f"{audio_dir} holds none of the {len(sources)} files that {file} lists (first: {sources[0]}); "
            "set `audio_dir` to the folder of the audio files"
        )
    targets = sorted(class_of_target)
    categories = [class_of_target[t] for t in targets]
    return b.result(), _class_table(targets, categories, categories, file)


def _read_name_list(path: Path) -> dict[str, int]:
    """The entries of a Speech Commands split file (``word/file.wav`` per line) with their line numbers."""
    if not path.is_file():
        raise ListError(
            f"{path}: missing; Speech Commands ships validation_list.txt and testing_list.txt at the "
            "top of its archive: point the list's `path` at that folder"
        )
    entries: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for line, text in enumerate(f, 1):
            entry = text.strip().replace("\\", "/")
            if entry and not entry.startswith("#"):
                entries.setdefault(entry, line)
    return entries


def read_speech_commands(root: _PathLike) -> tuple[ParsedList, pd.DataFrame]:
    """Speech Commands (v0.01 layout): ``root/<word>/*.wav`` split by validation_list.txt and testing_list.txt.

    The clip id is ``<word>_<file name without .wav>``, made safe like ESC-50's (see
    :func:`read_esc50`); a file whose id would be too long is reported (line 0) and left out.
    """
    root = Path(root)
    if not root.is_dir():
        raise ListError(f"{root}: no such folder; point the list's `path` at the unpacked Speech Commands folder")
    lists = {
        split: (root / name, _read_name_list(root / name))
        for split, name in (("validation", "validation_list.txt"), ("test", "testing_list.txt"))
    }
    val_file, validation = lists["validation"]
    test_file, test = lists["test"]
    b = _Builder(str(root))
    seen: set[str] = set()
    words: list[str] = []
    # Folders starting with '_' (_background_noise_) or '.' hold no words.
    word_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(("_", ".")))
    for word_dir in word_dirs:
        wavs = sorted(p for p in word_dir.iterdir() if p.suffix.lower() == ".wav" and p.is_file())
        if wavs:
            words.append(word_dir.name)
        for wav in wavs:
            b.rows_read += 1
            entry = f"{word_dir.name}/{wav.name}"
            seen.add(entry)
            if entry in test:
                split = "test"
                if entry in validation:
                    # Kept as test: a clip in both must not be tuned on.
                    b.problem(validation[entry], f"{entry} is also in {test_file.name}: kept as test", str(val_file))
            elif entry in validation:
                split = "validation"
            else:
                split = "train"
            clip_id = _safe_id(f"{word_dir.name}_{wav.stem}")
            problem = check_clip_id(clip_id)
            if problem is not None:
                b.problem(0, f"gives no usable clip id: {problem}; rename the file", str(wav))
                continue
            b.add(0, clip_id, str(wav), 0.0, math.nan, word_dir.name, split)
    for list_file, entries in (lists["validation"], lists["test"]):
        for entry, line in entries.items():
            if entry not in seen:
                b.problem(line, f"listed file {entry!r} not found under {root}", str(list_file))
    if not words:
        raise ListError(
            f"{root}: no <word>/*.wav files; point the list's `path` at the unpacked Speech Commands folder"
        )
    return b.result(), classes_from_labels(words)


def read_user_list(path: _PathLike, split: str | None = None) -> ParsedList:
    """A CSV with header ``clip_id,source,start,end,labels,split``; ``split`` (if given) overrides the column.

    A row whose ``clip_id`` fails :func:`check_clip_id` is a problem row (ids are used as
    file names as given, never rewritten). ``end`` may be empty (to the end of the file);
    otherwise it must be after ``start``.
    """
    path = Path(path)
    file = str(path)
    _check_split(split, f"user list {path}", required=False)
    b = _Builder(file)
    header: dict[str, int] | None = None
    width, has_split = 0, False

    def bad_line(line: int, problem: str) -> None:
        if header is None:
            raise ListError(f"{file}: line {line}: cannot read the header: {problem}")
        b.unreadable(line, problem)

    for line, row in _rows(path, bad_line):
        if header is None:
            names = [x.strip() for x in row]
            unknown = [n for n in names if n not in _USER_COLUMNS]
            if unknown:
                raise ListError(
                    f"{file}: line {line}: unknown column{'s' if len(unknown) > 1 else ''} "
                    f"{', '.join(repr(n) for n in unknown)}; a user list has the columns "
                    f"{','.join(_USER_COLUMNS)} (split optional when the config gives `split`): remove or rename them"
                )
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ListError(f"{file}: line {line}: column {repeated[0]!r} appears twice in the header; remove one")
            required = [n for n in _USER_COLUMNS if n != "split" or split is None]
            absent = [n for n in required if n not in names]
            if absent:
                raise ListError(
                    f"{file}: line {line}: header lacks {', '.join(absent)} (found {','.join(names)!r}); "
                    f"a user list starts with the header {','.join(_USER_COLUMNS)}"
                    + (" (or give the list a `split` in the config)" if absent == ["split"] else "")
                )
            header = {n: i for i, n in enumerate(names)}
            width = len(names)
            has_split = "split" in header
            continue
        b.rows_read += 1
        if len(row) != width:
            b.problem(line, f"expected {width} fields like the header, found {len(row)}")
            continue
        clip_id = row[header["clip_id"]].strip()
        problem = check_clip_id(clip_id)
        if problem is not None:
            b.problem(line, problem)
            continue
        source = row[header["source"]].strip()
        if not source:
            b.problem(line, "empty source")
            continue
        span = _span(row[header["start"]].strip(), row[header["end"]].strip(), open_end=True)
        if isinstance(span, str):
            b.problem(line, span)
            continue
        labels = _labels(row[header["labels"]].split(";"), None)
        if isinstance(labels, tuple):
            b.problem(line, labels[0])
            continue
        row_split = split if split is not None else (row[header["split"]].strip() if has_split else "")
        if not row_split:
            b.problem(line, "empty split")
            continue
        b.add(line, clip_id, source, span[0], span[1], labels, row_split)
    if header is None:
        raise ListError(f"{file}: empty; a user list starts with the header {','.join(_USER_COLUMNS)}")
    return b.result()


# ---------------------------------------------------------------------------------------
# Combining and checking


def _where(file: str, line: int) -> str:
    return f"{file} line {line}" if line else file


def _differences(df: pd.DataFrame, i: int, j: int) -> list[str]:
    """The fields in which rows ``i`` and ``j`` differ, as ``name a vs b``."""
    out = []
    for name in MANIFEST_COLUMNS[1:]:
        a, b = df[name].iat[i], df[name].iat[j]
        same = (a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
        if not same:
            out.append(f"{name} {a!r} vs {b!r}")
    return out


def combine_lists(parts: list[ParsedList], on_duplicate: str = "error") -> ParsedList:
    """Concatenate parsed lists into one with unique clip ids.

    An identical repeat of a row is dropped and reported. A clip id repeated with different
    fields raises :class:`ListError` (``on_duplicate="error"``) or keeps the first row and
    reports each dropped one (``"first"``).
    """
    if on_duplicate not in ("error", "first"):
        raise ValueError(f"on_duplicate={on_duplicate!r}: expected 'error' or 'first'")
    manifests: list[pd.DataFrame] = []
    origins: list[pd.DataFrame] = []
    problems: list[ListProblem] = []
    rows_read = 0
    for i, part in enumerate(parts):
        absent = [c for c in MANIFEST_COLUMNS if c not in part.manifest.columns]
        if absent:
            raise ValueError(f"part {i} of combine_lists: manifest lacks the column(s) {', '.join(absent)}")
        manifests.append(part.manifest[list(MANIFEST_COLUMNS)])
        origin = part.origin
        if origin is None or len(origin) != len(part.manifest):
            origin = pd.DataFrame(
                {
                    "file": pd.Series([f"<list {i + 1}>"] * len(part.manifest), dtype=str),
                    "line": np.zeros(len(part.manifest), dtype=np.int64),
                }
            )
        origins.append(origin[["file", "line"]].reset_index(drop=True))
        problems.extend(part.problems)
        rows_read += part.rows_read
    if not manifests:
        return ParsedList(_manifest({c: [] for c in MANIFEST_COLUMNS}), problems, rows_read, None)
    df = pd.concat(manifests, ignore_index=True).astype({"start": np.float64, "end": np.float64})
    origin = pd.concat(origins, ignore_index=True)
    later = df.duplicated("clip_id", keep="first").to_numpy()
    if later.any():
        # pandas' duplicated treats NaN ends as equal, as they should be here.
        identical = df.duplicated(list(MANIFEST_COLUMNS), keep="first").to_numpy()
        conflict = later & ~identical
        codes, _ = pd.factorize(df["clip_id"])
        _, first_rows = np.unique(codes, return_index=True)
        first_of = first_rows[codes]
        files, lines, ids = origin["file"].to_numpy(), origin["line"].to_numpy(), df["clip_id"].to_numpy()
        if conflict.any() and on_duplicate == "error":
            rows = np.flatnonzero(conflict)
            conflicting_ids = pd.unique(ids[rows])
            shown: list[str] = []
            shown_ids: set[str] = set()
            for r in rows:
                if len(shown) == 5:
                    break
                if ids[r] in shown_ids:
                    continue
                shown_ids.add(ids[r])
                f = first_of[r]
                shown.append(
                    f"{ids[r]}: {'; '.join(_differences(df, f, r))} "
                    f"({_where(files[f], lines[f])} vs {_where(files[r], lines[r])})"
                )
            raise ListError(
                f"{len(conflicting_ids)} clip {'ids appear' if len(conflicting_ids) > 1 else 'id appears'} more than "
                f"once with different fields: {' | '.join(shown)}"
                f"{' | ...' if len(conflicting_ids) > len(shown) else ''}. Set `on_duplicate: first` to keep "
                "each clip's first row, or fix the list"
            )
        for r in np.flatnonzero(later):
            f = first_of[r]
            if identical[r]:
                text = f"{_DUPLICATE} an identical row: dropped (clip {ids[r]} first at {_where(files[f], lines[f])})"
            else:
                text = (
                    f"{_DUPLICATE} clip {ids[r]} at {_where(files[f], lines[f])} with different "
                    f"{'; '.join(_differences(df, f, r))}: dropped, the first was kept"
                )
            problems.append(ListProblem(str(files[r]), int(lines[r]), text))
        keep = ~later
        df = df[keep].reset_index(drop=True)
        origin = origin[keep].reset_index(drop=True)
    return ParsedList(df, problems, rows_read, origin)


def write_problems(problems: list[ListProblem], path: _PathLike) -> None:
    """Write ``problems`` as a CSV with the header ``file,line,problem`` (also when there are none)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "line", "problem"])
        writer.writerows((p.file, p.line, p.problem) for p in problems)


def check_bad_fraction(parsed: ParsedList, file: str, max_bad_fraction: float) -> None:
    """Raise :class:`ListError` when more than ``max_bad_fraction`` of the rows were malformed.

    Many bad rows usually mean the wrong ``format`` was configured. A list with no data rows
    at all is refused too. Duplicate reports from :func:`combine_lists` do not count.
    """
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction={max_bad_fraction!r}: expected a fraction between 0 and 1")
    if parsed.rows_read == 0:
        raise ListError(f"{file} has no data rows; check that the list's `path` (or `url`) names the right file")
    bad = [p for p in parsed.problems if not p.problem.startswith(_DUPLICATE)]
    if len(bad) / parsed.rows_read > max_bad_fraction:
        first = bad[0]
        where = f"line {first.line}: " if first.line else ""
        raise ListError(
            f"{len(bad)} of {parsed.rows_read} rows of {file} could not be parsed "
            f"(first: {where}{first.problem}); is the list's `format` right?"
        )
