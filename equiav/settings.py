"""The one check every settings dataclass runs on plain data (JSON, YAML) before building itself."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any


def reject_unknown_keys(cls: type, values: Mapping[str, Any], what: str, *, also: Iterable[str] = ()) -> None:
    """Raise ValueError naming every key of ``values`` that is not a field of the dataclass ``cls``
    (nor in ``also``), and the known ones: a typo must not silently run with a default."""
    known = {f.name for f in dataclasses.fields(cls)} | set(also)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")
