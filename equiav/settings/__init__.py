"""Settings: what every stage is told to do, as frozen dataclasses built from plain data (JSON,
YAML) and checked on construction. The lowest layer of the package: nothing here imports torch
or another part of equiav, so the workflow checks a whole configuration (equiav.config) at
start-up, before any job, in a fraction of a second.

``features`` (the features stage), ``model`` (ModelConfig), ``augment`` (the augmentations'
distributions), ``pretrain`` (PretrainSettings) and ``finetune`` (FinetuneSettings, recipes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# Numeric precisions of training and evaluation (equiav.train.common.resolve_precision).
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16")


def reject_unknown_keys(cls: type, values: Mapping[str, Any], what: str, *, also: Iterable[str] = ()) -> None:
    """Raise ValueError naming every key of ``values`` that is not a field of the dataclass ``cls``
    (nor in ``also``), and the known ones: a typo must not silently run with a default."""
    known = {f.name for f in dataclasses.fields(cls)} | set(also)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {what} {', '.join(map(repr, unknown))}; known: {', '.join(sorted(known))}")


def is_int(value: Any) -> bool:
    """An integer, and not a bool (JSON's true would pass isinstance(value, int))."""
    return isinstance(value, int) and not isinstance(value, bool)
