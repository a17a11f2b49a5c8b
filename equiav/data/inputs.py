"""Reading what the data stage hands to training and evaluation: usable.csv and norm_stats.json."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

USABLE_COLUMNS = frozenset({"clip_id", "split", "labels", "h5"})


def read_usable(path: str | os.PathLike[str], splits: Sequence[str] | None = None) -> pd.DataFrame:
    """The usable clips (the availability stage's usable.csv), only those of ``splits`` if given."""
    usable = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = USABLE_COLUMNS - set(usable.columns)
    if missing:
        raise ValueError(f"{path} lacks the column(s) {sorted(missing)}; give the usable.csv of the availability stage")
    if splits is None:
        return usable
    rows = usable[usable["split"].isin(list(splits))]
    if rows.empty:
        raise ValueError(
            f"{path} has no clip in split(s) {list(splits)}; its splits are {sorted(set(usable['split']))}"
        )
    return rows


def read_norm_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """norm_stats.json of the data stage; ``mean`` and ``std`` are the statistics to normalise with."""
    stats = json.loads(Path(path).read_text())
    for key in ("mean", "std"):
        if not isinstance(stats.get(key), (int, float)):
            raise ValueError(f"{path} needs a number under {key!r} (the norm_stats.json of the data stage)")
    return stats
