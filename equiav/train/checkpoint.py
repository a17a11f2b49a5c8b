"""Rolling training checkpoints, RNG state, code revision and the exported final weights.

Everything saved here loads with ``torch.load(weights_only=True)``: only tensors, numbers,
strings, None and lists/dicts of them (RNG states are stored as tensors, configurations as plain
dicts). A checkpoint is therefore safe to open from an untrusted source and never needs the
training code's classes to unpickle.
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from equiav.distributed import rank
from equiav.train.common import unwrap_model

__all__ = [
    "Checkpointer",
    "capture_rng_state",
    "code_revision",
    "export_weights",
    "load_weights",
    "restore_rng_state",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def _atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary file beside ``path``, fsync, then rename onto ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated file
    under the final name (the temporary name does not match the checkpoint pattern).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with tmp.open("wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    # Make the rename itself durable (a crash right after could otherwise lose the new entry).
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


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
    that :func:`load_weights` can read the file with ``weights_only=True``.
    """
    extra = dict(extra or {})
    clash = sorted({"model", "model_config"} & set(extra))
    if clash:
        raise ValueError(f"extra must not use the reserved keys {clash}")
    state = {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()}
    _atomic_save({"model": state, "model_config": dict(config), **extra}, Path(path))


def load_weights(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a file written by :func:`export_weights` (on the CPU, ``weights_only=True``)."""
    return torch.load(path, map_location="cpu", weights_only=True)
