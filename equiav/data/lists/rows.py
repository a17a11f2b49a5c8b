"""The line reader and row builder every list format shares: the manifest schema, list problems,
clip-id rules and the parsing of numbers, spans and labels (the conventions: equiav.data.lists)."""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

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
