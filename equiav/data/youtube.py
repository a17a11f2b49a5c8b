"""Politeness toward YouTube: how fast this host asks, and when it stops asking.

YouTube answers an address, not a job: a guest session gets about 300 videos an hour before
bot checks start (yt-dlp's documentation), and a bot check is about the address. So both
limits hold per host, over every download job running on it at once, through files under
the user's cache (``~/.cache/equiav``, or ``$XDG_CACHE_HOME/equiav``).
"""

from __future__ import annotations

import fcntl
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from equiav.data import status as st

log = logging.getLogger(__name__)


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def cache_dir() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "equiav"


class YouTubeRate:
    """At most ``per_hour`` YouTube requests an hour from this host, over all jobs at once.

    Each request takes the next free slot from a state file shared by the jobs (under an
    exclusive lock) and waits for it; slots are ``3600 / per_hour`` seconds apart, each gap
    lengthened by a random share up to ``jitter`` so that jobs do not ask in lockstep. Gaps
    are never shorter than the interval, so no window holds more than its share (plus the
    one request at its start).
    """

    def __init__(
        self,
        per_hour: float | None,
        jitter: float = 0.25,
        *,
        state: Path | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        uniform: Callable[[], float] = random.random,
    ):
        self.per_hour = per_hour
        self.jitter = jitter
        self.state = state or cache_dir() / f"youtube-rate-{socket.gethostname()}"
        self.clock, self.sleep, self.uniform = clock, sleep, uniform

    def wait(self) -> None:
        """Wait for this request's slot (at once when none is configured)."""
        if not self.per_hour:
            return
        interval = 3600.0 / self.per_hour
        self.state.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                f.seek(0)
                try:
                    next_free = float(f.read().split()[0])
                except (IndexError, ValueError):  # a new (or emptied) state file
                    next_free = 0.0
                now = self.clock()
                slot = max(now, next_free)
                f.seek(0)
                f.truncate()
                f.write(f"{slot + interval * (1 + self.jitter * self.uniform())!r}\n")
                f.flush()
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        if slot > now:
            self.sleep(slot - now)


class YouTubeBlock:
    """Whether YouTube is refusing this host, so that no more clips are asked for.

    A sign-in (bot check) or rate-limit answer on ``block_after`` YouTube clips in a row is
    about the address, not the clips: the downloader stops asking, and records the rest as
    not tried (transient). The block is remembered for ``block_pause_minutes`` in a marker
    file of this host under the user's cache, so that the shard jobs after this one do not
    ask either.
    """

    def __init__(self, settings):
        self.settings = settings
        self.status: str | None = None
        self.since = ""
        self._streak = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> bool:
        return self.status is not None

    @staticmethod
    def marker() -> Path:
        return cache_dir() / f"youtube-blocked-{socket.gethostname()}"

    def load(self) -> None:
        """Take over a block that an earlier job on this host recorded, while it is fresh."""
        marker = self.marker()
        pause = self.settings.block_pause_minutes * 60
        try:
            age = time.time() - marker.stat().st_mtime
            status, since = marker.read_text().split()[:2]
        except (OSError, ValueError):
            return
        if age < pause and status in st.BLOCKED:
            self.status, self.since = status, since
            log.warning(
                "YouTube answered %s on this host at %s; no YouTube clip is asked for until %.0f min have passed "
                "(delete %s, or set download.block_pause_minutes: 0, to try sooner)",
                status, since, self.settings.block_pause_minutes, marker,
            )  # fmt: skip

    def note(self, outcome: str) -> None:
        """Count a YouTube clip's outcome; start the block after ``block_after`` in a row."""
        with self._lock:
            self._streak = self._streak + 1 if outcome in st.BLOCKED else 0
            if self.status is None and 0 < self.settings.block_after <= self._streak:
                self.status, self.since = outcome, utc_now()
                marker = self.marker()
                marker.parent.mkdir(parents=True, exist_ok=True)
                marker.write_text(f"{self.status} {self.since}\n")

    def not_tried(self) -> str:
        return (
            f"not tried: YouTube answered {self.status} to {self.settings.block_after} clips in a row on this host "
            f"(since {self.since}), a block of the address, not of the clip"
        )

    def advice(self, untried: int) -> str:
        return (
            f"YouTube is refusing this host ({self.status} on {self.settings.block_after} clips in a row, since "
            f"{self.since}): stopped asking; every finished clip is kept and {untried} clip(s) of this shard are "
            f"recorded as {self.status}, not tried (transient). Wait a few hours, give a cookies.txt in "
            "download.cookies, or lower the rate (download.workers: 1, download.sleep_seconds); then retry the "
            "transient clips as docs/data.md says (snakemake ... --forcerun $(python -m equiav transient RESULTS_DIR)). "
            f"Other jobs on this host skip YouTube for {self.settings.block_pause_minutes:g} min "
            f"(download.block_pause_minutes; the marker is {self.marker()})"
        )
