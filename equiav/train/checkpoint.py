"""Rolling training checkpoints, RNG state, code revision and the exported final weights.

Everything saved here loads with ``torch.load(weights_only=True)``: only tensors, numbers,
strings, None and lists/dicts of them (RNG states are stored as tensors, configurations as plain
dicts). A checkpoint is therefore safe to open from an untrusted source and never needs the
training code's classes to unpickle.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import re
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from equiav.atomic import atomic_output
from equiav.distributed import rank
from equiav.model.convert import looks_like_release_state
from equiav.settings.model import ModelConfig
from equiav.train.common import unwrap_model

__all__ = [
    "Checkpointer",
    "check_same_run",
    "capture_rng_state",
    "code_revision",
    "export_weights",
    "load_export",
    "read_weights_file",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save, durably and atomically: a kill at any moment leaves the old file or the new
    one, never a truncated file under the final name (the temporary name does not match the
    checkpoint pattern)."""
    with atomic_output(path, durable=True) as tmp, tmp.open("wb") as f:
        torch.save(obj, f)


def _differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str], prefix: str = ""
) -> list[str]:
    differences = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in ignore:
            continue
        old, new = saved.get(key, "<absent>"), current.get(key, "<absent>")
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            differences += _differences(old, new, ignore, f"{name}.")
        elif old != new:
            differences.append(f"{name}: {old!r} in the checkpoint, {new!r} now")
    return differences


def check_same_run(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    where: str | os.PathLike[str],
    start_afresh: str,
    ignore: Iterable[str] = (),
) -> None:
    """Stop a run from resuming what another run wrote (a checkpoint, a finished fold's record).

    ``saved`` and ``current`` are the two runs' identities (nested plain data: settings, data
    fingerprints); every dotted key that differs is named with both values, except those in
    ``ignore`` (settings that never change what is computed). ``start_afresh`` says how to begin
    a new run instead, e.g. "delete work/ to start afresh".
    """
    ignored = frozenset(ignore)
    differences = _differences(saved, current, ignored)
    if differences:
        may_change = f"; {', '.join(sorted(ignored))} may change between runs" if ignored else ""
        raise RuntimeError(
            f"cannot resume from {where}: it was written with other settings or data ({'; '.join(differences[:8])}). "
            f"Restore them to resume that run, or {start_afresh}{may_change}"
        )


class Checkpointer:
    """Numbered checkpoints ``checkpoint-<step>.pt`` in ``directory``, the newest ``keep`` kept.

    Only rank 0 writes (:meth:`save` returns the path on every rank); every rank can read.
    """

    def __init__(self, directory: str | os.PathLike[str], *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1 (the newest checkpoint is what resumes), got {keep}")
        self.directory = Path(directory)
        self.keep = keep

    def path(self, step: int) -> Path:
        """Where the checkpoint of ``step`` lives."""
        return self.directory / f"checkpoint-{step:09d}.pt"

    def _existing(self) -> list[tuple[int, Path]]:
        if not self.directory.is_dir():
            return []
        found = []
        for path in self.directory.iterdir():
            match = _NAME.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return sorted(found)

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write ``state`` as the checkpoint of ``step`` (atomically), then delete all but the
        newest ``keep`` checkpoints. Returns its path."""
        path = self.path(step)
        if rank() != 0:
            return path
        _atomic_save(dict(state), path)
        for _, old in self._existing()[: -self.keep]:
            old.unlink(missing_ok=True)
        log.info("saved checkpoint %s", path)
        return path

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        existing = self._existing()
        return existing[-1][1] if existing else None

    def load(self, path: str | os.PathLike[str], map_location: Any = "cpu") -> dict[str, Any]:
        """Read a checkpoint with ``weights_only=True``."""
        return torch.load(path, map_location=map_location, weights_only=True)


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, numpy's global generator, torch's CPU generator and
    every CUDA device's generator, as tensors and numbers (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python_version": int(version),
        "python": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_kind": str(kind),
        "numpy": torch.from_numpy(keys.astype(np.int64)),
        "numpy_pos": int(pos),
        "numpy_has_gauss": int(has_gauss),
        "numpy_gauss": float(cached),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`. CUDA states are restored for the devices both
    the saving and this process have (a warning names the mismatch)."""
    random.setstate((state["python_version"], tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(
        (
            state["numpy_kind"],
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_has_gauss"],
            state["numpy_gauss"],
        )
    )
    torch.set_rng_state(state["torch"].cpu())
    saved = list(state["cuda"])
    here = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if len(saved) != here:
        log.warning("checkpoint has RNG states of %d CUDA device(s), this process sees %d", len(saved), here)
    for device, cuda_state in enumerate(saved[:here]):
        torch.cuda.set_rng_state(cuda_state.cpu(), device)


def code_revision() -> str:
    """``git describe --always --dirty`` of the repository holding this package, or "unknown"
    (an installed copy, no git, or not a repository)."""
    package = Path(__file__).resolve().parent
    try:
        result = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=package,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    revision = result.stdout.strip()
    return revision if result.returncode == 0 and revision else "unknown"


def export_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the final weights: ``{"model": state dict of the unwrapped model (no "module." or
    "_orig_mod." prefixes), "model_config": config, **extra}``, atomically.

    ``config`` and ``extra`` must be plain data (numbers, strings, lists, dicts, tensors) so
    that :func:`load_export` can read the file with ``weights_only=True``.
    """
    extra = dict(extra or {})
    clash = sorted({"model", "model_config"} & set(extra))
    if clash:
        raise ValueError(f"extra must not use the reserved keys {clash}")
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    _atomic_save({"model": state, "model_config": dict(config), **extra}, Path(path))


def read_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A dict saved with torch.save, read on the CPU with ``weights_only=True`` (no code runs);
    a missing, unreadable or non-dict file is a ValueError / FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
        raise ValueError(
            f"cannot read checkpoint {str(path)!r} as a PyTorch weights file (weights_only=True): {err}"
        ) from err
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a dict of weights")
    return dict(state)


def load_export(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A model exported by :func:`export_weights` (the pre-train stage's ``model.pt``), checked:
    ``model`` a dict of tensors and ``model_config`` a valid :class:`ModelConfig`; anything else
    is a ValueError that names the file and what it holds instead."""
    state = read_weights_file(path)
    if "model_config" not in state or "model" not in state:
        hint = (
            "; it looks like the authors' release checkpoint: pass --release (release=True)"
            if looks_like_release_state(state)
            else "; give the pre-train stage's model.pt"
        )
        raise ValueError(
            f"{str(path)!r} is not an equiav export (keys 'model' and 'model_config' expected, found "
            f"{sorted(map(str, state))[:8]}){hint}"
        )
    weights, config = state["model"], state["model_config"]
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise ValueError(f"{str(path)!r}: 'model' must be a state dict (names -> tensors)")
    if not isinstance(config, Mapping):
        raise ValueError(f"{str(path)!r}: 'model_config' must be a mapping of ModelConfig fields")
    try:
        ModelConfig.from_dict(dict(config))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{str(path)!r}: its model_config is not a valid ModelConfig: {err}") from err
    return state


def starting_point(export: Mapping[str, Any], path: str | os.PathLike[str]) -> dict[str, Any]:
    """Where an exported model came from, as fine-tuning and retrieval metrics record it (the
    tables name their rows by it): ``run``, the pre-train run (the folder of its model.pt), and
    the export's ``origin`` (``type`` pretrain, release, mae or scratch, and its file or seed)."""
    origin = export.get("origin")
    # Exports written before origins were recorded came from pre-training.
    origin = dict(origin) if isinstance(origin, Mapping) else {"type": "pretrain"}
    return {"run": Path(path).resolve().parent.name, **origin}
