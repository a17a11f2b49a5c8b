"""Writing a file so that it appears whole or not at all.

Every output a later step (or a rerun after a kill) reads is written under a temporary name
beside it and renamed onto its final name when complete: readers see the old file or the whole
new one, never part of one. Nothing here imports torch or the rest of equiav.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_output", "write_json"]


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, durable: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, renamed onto ``path`` when the block ends
    without an error and removed otherwise.

    The temporary name is hidden (a leading dot), holds the process id (concurrent writers do not
    collide) and keeps the suffix (tools that choose a format by it, np.savez or ffmpeg, still do).
    ``durable``: flush the file and the rename to disk (checkpoints: a power loss right after
    must not lose them).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
    try:
        yield tmp
        if durable:
            _fsync(tmp)
        os.replace(tmp, path)
        if durable:
            _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """``data`` as indented JSON with a final newline, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
