"""The training metric log: one CSV row per logged step (TensorBoard events beside it when
installed), truncated to the resumed step so a resumed run's log reads as one run's."""

from __future__ import annotations

import csv
import logging
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from equiav.atomic import atomic_output

__all__ = ["MetricLogger"]

log = logging.getLogger(__name__)


class MetricLogger:
    """Per-step metrics to a CSV file, TensorBoard (when installed) and the console.

    Only an ``enabled`` logger (rank 0) writes anything. The CSV has a ``step`` column and one
    column per key of the first :meth:`log` call; it is opened in append mode. ``resume_step``
    is the first step the (resumed) run will log: rows with ``step >= resume_step`` left by an
    interrupted run are dropped when the file is reopened, so the file never holds a step twice.
    The console gets a tqdm bar when stderr is a terminal and otherwise a plain log line at most
    every ``print_interval_s`` seconds (and at the last step), which suits SLURM log files.
    """

    def __init__(
        self,
        csv_path: str | os.PathLike[str],
        *,
        tensorboard_dir: str | os.PathLike[str] | None = None,
        total_steps: int | None = None,
        resume_step: int = 0,
        enabled: bool = True,
        print_interval_s: float = 30.0,
    ) -> None:
        self.enabled = enabled
        self.csv_path = Path(csv_path)
        self.total_steps = total_steps
        self.print_interval_s = print_interval_s
        self._columns: list[str] | None = None
        self._file: Any = None
        self._writer: Any = None
        self._tensorboard: Any = None
        self._bar: Any = None
        self._last_print = -math.inf
        self._last_step = resume_step - 1
        if not enabled:
            return
        self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        self._columns = self._truncate(resume_step)
        if tensorboard_dir is not None:
            self._tensorboard = _summary_writer(Path(tensorboard_dir), resume_step)
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, unit="step", dynamic_ncols=True)

    def _truncate(self, resume_step: int) -> list[str] | None:
        """Drop rows with step >= resume_step from an existing CSV; return its columns."""
        if not self.csv_path.exists():
            return None
        with self.csv_path.open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return None
        header, body = rows[0], rows[1:]
        kept = [row for row in body if row and int(float(row[0])) < resume_step]
        if len(kept) != len(body):
            with atomic_output(self.csv_path) as tmp, tmp.open("w", newline="") as f:
                csv.writer(f).writerows([header, *kept])
        return header

    def log(self, step: int, values: Mapping[str, float]) -> None:
        """Record ``values`` (numbers) for ``step``; the keys must be the same at every call."""
        if not self.enabled:
            return
        if self._columns is None:
            self._columns = ["step", *values]
        expected = self._columns[1:]
        if sorted(values) != sorted(expected):
            raise ValueError(
                f"metrics {sorted(values)} at step {step} differ from the columns of {self.csv_path} "
                f"({sorted(expected)}); log the same keys at every step, or start a new file"
            )
        if self._writer is None:
            new = not self.csv_path.exists() or self.csv_path.stat().st_size == 0
            self._file = self.csv_path.open("a", newline="")
            self._writer = csv.writer(self._file)
            if new:
                self._writer.writerow(self._columns)
        # repr keeps every float exactly (resume tests compare rows bit for bit).
        self._writer.writerow([step, *(repr(float(values[key])) for key in expected)])
        self._file.flush()
        if self._tensorboard is not None:
            for key in expected:
                self._tensorboard.add_scalar(f"train/{key}", float(values[key]), step)
        self._console(step, values)
        self._last_step = step

    def _console(self, step: int, values: Mapping[str, float]) -> None:
        shown = ", ".join(f"{key} {float(value):.4g}" for key, value in values.items())
        if self._bar is not None:
            self._bar.update(step - self._last_step)
            self._bar.set_postfix_str(shown, refresh=False)
            return
        now = time.monotonic()
        last = self.total_steps is not None and step == self.total_steps - 1
        if last or now - self._last_print >= self.print_interval_s:
            self._last_print = now
            total = f"/{self.total_steps}" if self.total_steps is not None else ""
            log.info("step %d%s: %s", step, total, shown)

    def close(self) -> None:
        """Flush and close every sink (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = self._writer = None
        if self._tensorboard is not None:
            self._tensorboard.close()
            self._tensorboard = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> MetricLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary_writer(directory: Path, resume_step: int) -> Any:
    """A TensorBoard writer that drops events at or after ``resume_step``, or None when the
    ``tensorboard`` package is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log.info("tensorboard is not installed: metrics go to the CSV file only")
        return None
    return SummaryWriter(log_dir=str(directory), purge_step=resume_step or None)
