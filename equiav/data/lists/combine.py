"""Combining the parsed lists of a data set (the one place clip ids become unique) and checking them."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd

from equiav.data.lists.rows import (
    _DUPLICATE,
    MANIFEST_COLUMNS,
    ListError,
    ListProblem,
    ParsedList,
    _manifest,
    _PathLike,
)


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
