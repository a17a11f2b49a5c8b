"""Class tables: AudioSet's and VGGSound's class lists, or classes taken from the labels."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from equiav.data.lists.rows import (
    _CLASS_COLUMNS,
    ListError,
    _is_header,
    _number,
    _PathLike,
    _refuse_line,
    _rows,
)


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
