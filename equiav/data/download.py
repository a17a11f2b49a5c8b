"""Stage 2: fetch the clips of one shard and record a status row for every clip.

A shard job takes a slice of the manifest and tries each clip's candidate sources in order
(equiav.data.sources): a copy in a folder (checked in place), a member of an archive
(streamed out of it, once per archive for the whole shard), or the list's own source:
yt-dlp for YouTube ids (at the host's YouTube rate, equiav.data.youtube), http(s) and
file:// URLs, or a local path checked in place. It validates the media and records one
status row per clip, naming the source that decided it, from the fixed vocabulary in
:mod:`equiav.data.status`.

Resumability: every outcome is appended to a journal beside the media as soon as it is
known, and every media file is moved into place only once complete and validated, so a
job killed at any point is restarted without redoing a finished clip or using a partial
file. Only the job's own faults (unwritable folders, a bad shard file) make it fail.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from equiav.atomic import atomic_output
from equiav.data import status as st
from equiav.data.lists import check_clip_id
from equiav.data.media import MediaError, check_media, ffmpeg_bin_dir
from equiav.data.sources import Source, is_youtube_id, read_members
from equiav.data.status import classify_error
from equiav.data.youtube import YouTubeBlock, YouTubeRate, utc_now

log = logging.getLogger(__name__)

STATUS_COLUMNS = (
    "clip_id", "split", "labels", "source", "source_name", "status", "final", "attempts",
    "detail", "file", "offset", "duration", "updated",
)  # fmt: skip
# The status rows of a clip that no source holds name this source.
NO_SOURCE = "none"


@dataclass(frozen=True)
class DownloadSettings:
    """The `download` section of a data set's config, plus the modalities each clip needs."""

    margin: float = 1.0
    min_coverage: float = 0.9
    retries: int = 3
    backoff_seconds: float = 5.0
    workers: int = 2
    rate_limit: int | None = None
    sleep_seconds: float = 0.0
    cookies: str | None = None
    format: str = "bv*[height<=360]+ba/b[height<=360]/wv*+ba/w"
    socket_timeout: float = 30.0
    block_after: int = 5
    block_pause_minutes: float = 360.0
    youtube_per_hour: float | None = 250.0
    youtube_jitter: float = 0.25
    need_audio: bool = True
    need_video: bool = True

    @classmethod
    def from_config(cls, download: dict, modalities: list[str]) -> DownloadSettings:
        return cls(**download, need_audio="audio" in modalities, need_video="video" in modalities)


class FetchError(Exception):
    """A failed attempt, already classified into the status vocabulary."""

    def __init__(self, status: str, detail: str):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


def source_kind(source: str) -> str:
    """youtube, url (http/https/ftp: fetched in sections), file (file:// URL) or path."""
    if is_youtube_id(source):
        return "youtube"
    scheme = source.split("://", 1)[0].lower() if "://" in source else ""
    if scheme in ("http", "https", "ftp", "ftps"):
        return "url"
    if scheme == "file":
        return "file"
    if scheme:
        raise ValueError(f"unsupported source {source!r}: use a YouTube id, an http(s) or file:// URL, or a local path")
    return "path"


def _js_runtime() -> dict[str, dict]:
    """Point yt-dlp at the deno binary installed beside this Python (YouTube's challenges need it)."""
    deno = shutil.which("deno") or str(Path(sys.executable).with_name("deno"))
    return {"deno": {"path": deno}} if os.path.exists(deno) else {}


def _put_ffmpeg_on_path() -> None:
    """yt-dlp's check that ffmpeg can cut segments looks on PATH only, not at ffmpeg_location."""
    folder = str(ffmpeg_bin_dir())
    if folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{folder}{os.pathsep}{os.environ.get('PATH', '')}"


@dataclass
class _Outcome:
    """What one source made of a clip: the status row's fields that differ between sources."""

    source_name: str
    read: str  # what was read: the YouTube id, URL or path, or <archive>#<member>
    status: str
    detail: str
    attempts: int
    file: str = ""
    offset: float = float("nan")
    duration: float = float("nan")


class ShardDownloader:
    """Fetches the clips of one shard into ``media_dir`` and journals their outcomes."""

    def __init__(
        self,
        media_dir: str | Path,
        settings: DownloadSettings,
        sleep: Callable[[float], None] = time.sleep,
        sources: list[Source] | None = None,
    ):
        self.media_dir = Path(media_dir)
        self.settings = settings
        self.sleep = sleep
        # Without a plan (a shard without candidates) every clip goes to its list's own source.
        self.sources = sources or [Source(name="youtube", type="youtube")]
        self._rate = YouTubeRate(settings.youtube_per_hour, settings.youtube_jitter, sleep=sleep)
        self._members: dict[tuple[str, str], Path | str] = {}
        self.journal_path = self.media_dir / "journal.csv"
        # Attempts work in private folders under here; no clip id can name it (ids are never hidden).
        self.tmp_root = self.media_dir / ".partial"
        self._lock = threading.Lock()
        self._block = YouTubeBlock(settings)

    # -- journal -------------------------------------------------------------------------
    def load_journal(self) -> dict[str, dict]:
        """The last recorded row of every clip (a killed job may have left a torn last line)."""
        if not self.journal_path.exists():
            return {}
        rows: dict[str, dict] = {}
        with open(self.journal_path, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("updated") and row.get("status") in st.VOCABULARY:
                    rows[row["clip_id"]] = row
        return rows

    def _upgrade_journal(self) -> None:
        """Rewrite a journal written with other columns (before `source_name` existed) in
        today's, so that rows appended now line up with its header."""
        if not self.journal_path.exists():
            return
        with open(self.journal_path, newline="") as f:
            header = next(csv.reader(f), None)
        if header is None or tuple(header) == STATUS_COLUMNS:
            return
        rows = list(self.load_journal().values())
        with atomic_output(self.journal_path, durable=True) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STATUS_COLUMNS, restval="", extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        log.info("rewrote %s in the current columns (%d rows kept)", self.journal_path, len(rows))

    def _append(self, row: dict) -> None:
        with self._lock:
            new = not self.journal_path.exists()
            with open(self.journal_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=STATUS_COLUMNS)
                if new:
                    writer.writeheader()
                writer.writerow(row)
                f.flush()
                os.fsync(f.fileno())

    def _is_done(self, previous: dict | None) -> bool:
        if previous is None or previous["status"] not in st.FINAL:
            return False
        # An ok row counts only while its file is still there.
        return previous["status"] != st.OK or os.path.exists(previous["file"])

    # -- the shard -----------------------------------------------------------------------
    def run(self, clips: pd.DataFrame) -> pd.DataFrame:
        """Fetch every clip not already final; return one status row per clip of ``clips``."""
        if self.settings.cookies and not os.path.isfile(self.settings.cookies):
            raise FileNotFoundError(f"the cookies file {self.settings.cookies!r} (download.cookies) does not exist")
        # Ids name files here: refuse the shard before touching anything if one is unsafe.
        unsafe = [(cid, problem) for cid in clips["clip_id"] if (problem := check_clip_id(cid))]
        if unsafe:
            raise ValueError(
                f"{len(unsafe)} clip id(s) of the shard are not safe file names (first: {unsafe[0][1]}); "
                "shards come from the manifest stage, which refuses such ids: rebuild the manifest"
            )
        self.media_dir.mkdir(parents=True, exist_ok=True)
        # Anything under .partial belongs to attempts of this downloader that never finished.
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        self.tmp_root.mkdir()
        _put_ffmpeg_on_path()
        self._upgrade_journal()
        done = self.load_journal()
        todo = [row for row in clips.to_dict("records") if not self._is_done(done.get(row["clip_id"]))]
        log.info("%d clips in shard, %d already final, %d to fetch", len(clips), len(clips) - len(todo), len(todo))
        self._block.load()
        self._read_archives(todo)
        with ThreadPoolExecutor(max_workers=self.settings.workers) as pool:
            for i, row in enumerate(pool.map(self.fetch_clip, todo), 1):
                if i % 50 == 0 or i == len(todo):
                    log.info("fetched %d/%d (last: %s %s)", i, len(todo), row["clip_id"], row["status"])
        shutil.rmtree(self.tmp_root, ignore_errors=True)
        final = self.load_journal()
        untried = sum(1 for c in clips["clip_id"] if final[c]["attempts"] == "0" and final[c]["status"] in st.BLOCKED)
        if self._block.active and untried:
            log.error("%s", self._block.advice(untried))
        table = pd.DataFrame([final[clip_id] for clip_id in clips["clip_id"]], columns=list(STATUS_COLUMNS))
        # The journal is text: give the columns their types back.
        table["final"] = table["final"].astype(str) == "True"
        table["attempts"] = table["attempts"].astype(int)
        for column in ("offset", "duration"):
            table[column] = pd.to_numeric(table[column], errors="coerce")
        return table

    def candidates(self, clip: dict) -> list[tuple[Source, str, str]]:
        """(source, container, member) of each source that holds the clip, in order."""
        planned = clip.get("candidates")
        if planned is None or planned == "" or (isinstance(planned, float) and pd.isna(planned)):
            return [(self.sources[-1], "", "")] if self.sources[-1].type == "youtube" else []
        return [(self.sources[number], container, member) for number, container, member in json.loads(planned)]

    def _read_archives(self, todo: list[dict]) -> None:
        """Stream out of each archive, once, the members that are the first candidate of a clip to fetch."""
        wanted: dict[str, set[str]] = defaultdict(set)
        for clip in todo:
            first = self.candidates(clip)[:1]
            if first and first[0][1]:
                wanted[first[0][1]].add(first[0][2])
        for number, (archive, members) in enumerate(sorted(wanted.items())):
            began = time.perf_counter()
            got = read_members(archive, members, self.tmp_root / f"archive-{number}")
            self._members.update({(archive, m): where for m, where in got.items()})
            read = sum(isinstance(w, Path) for w in got.values())
            log.info("%s: read %d of %d member(s) in %.1f s", archive, read, len(members), time.perf_counter() - began)

    def fetch_clip(self, clip: dict) -> dict:
        """Try the clip's sources in order until one serves it; journal and return its row.

        The row is the serving source's; when none serves the clip, the first transient
        outcome (so that a retry tries again), else the first source's verdict (a damaged
        archive member stays decode-error, an audio-only copy no-video, whatever YouTube says
        after); the detail names the outcome of every source tried.
        """
        tried: list[_Outcome] = []
        for source, container, member in self.candidates(clip):
            if source.type == "youtube":
                outcome = self._from_list_source(clip, source)
            else:
                outcome = self._from_copy(clip, source, container, member)
            tried.append(outcome)
            if outcome.status == st.OK:
                break
        if not tried:
            names = ", ".join(s.name for s in self.sources)
            tried.append(
                _Outcome(
                    NO_SOURCE, "", st.UNAVAILABLE, f"in none of the sources ({names}); add {{type: youtube}} at the "
                    "end of the data set's `sources` to fetch it from the list's own source", 0,
                )
            )  # fmt: skip
        transient = [o for o in tried if o.status not in st.FINAL]
        decided = tried[-1] if tried[-1].status == st.OK else (transient or tried)[0]
        detail = decided.detail
        if len(tried) > 1:
            detail = "; ".join(f"{o.source_name}: {o.status}" + (f" ({o.detail})" if o.detail else "") for o in tried)
        row = {
            "clip_id": clip["clip_id"], "split": clip["split"], "labels": clip["labels"],
            "source": decided.read, "source_name": decided.source_name, "status": decided.status,
            "final": decided.status in st.FINAL, "attempts": sum(o.attempts for o in tried),
            "detail": " ".join(detail.split())[:500], "file": decided.file, "offset": decided.offset,
            "duration": decided.duration, "updated": utc_now(),
        }  # fmt: skip
        self._append(row)
        return row

    def _from_copy(self, clip: dict, source: Source, container: str, member: str) -> _Outcome:
        """A copy from a folder (checked in place) or an archive (moved into media_dir once valid)."""
        start, end = self._segment(clip)
        duration = float("nan") if end is None else end - start
        offset = 0.0 if source.trimmed else start
        read = f"{container}#{member}" if container else member
        outcome = _Outcome(source.name, read, st.OK, "", 1, offset=offset, duration=duration)
        try:
            if not container:
                if not os.path.isfile(member):
                    raise FetchError(
                        st.UNAVAILABLE, f"no such file: {member} (it was catalogued; re-run the catalogue)"
                    )
                self._validate(member, offset, duration)
                outcome.file = member
                return outcome
            extracted = self._members.pop((container, member), None)
            if extracted is None:  # not this clip's first source: read it alone
                extracted = read_members(container, [member], Path(tempfile.mkdtemp(dir=self.tmp_root)))[member]
            if isinstance(extracted, str):
                raise FetchError(st.DECODE_ERROR, extracted)
            self._validate(str(extracted), offset, duration)
            file = self.media_dir / f"{clip['clip_id']}{extracted.suffix}"
            os.replace(extracted, file)
            outcome.file = str(file)
        except FetchError as e:
            outcome.status, outcome.detail = e.status, e.detail
        return outcome

    def _from_list_source(self, clip: dict, source: Source) -> _Outcome:
        """The list's own source (YouTube id, URL, path), with retries for transient failures."""
        youtube = source_kind(clip["source"]) == "youtube"
        name = "youtube" if youtube else source_kind(clip["source"])
        attempts = 0
        file, offset, duration = "", float("nan"), float("nan")
        while True:
            if youtube and self._block.active:
                # Asking again would only deepen the block: the clip stays transient (untried,
                # or with the answer of its last attempt).
                if not attempts:
                    outcome, detail = self._block.status, self._block.not_tried()
                break
            attempts += 1
            if self.settings.sleep_seconds:
                self.sleep(self.settings.sleep_seconds)
            if youtube:
                self._rate.wait()
            try:
                file, offset, duration = self._attempt(clip, source)
                outcome, detail = st.OK, ""
            except FetchError as e:
                outcome, detail = e.status, e.detail
            except Exception as e:  # a bug or an unexpected library error: recorded, not fatal to the shard
                log.exception("unexpected error on %s", clip["clip_id"])
                outcome, detail = st.OTHER, f"{type(e).__name__}: {e}"
            if outcome not in st.RETRY_IN_JOB or attempts > self.settings.retries:
                break
            pause = self.settings.backoff_seconds * 2 ** (attempts - 1) * random.uniform(0.8, 1.2)
            log.warning("%s: %s (%s); retrying in %.1f s", clip["clip_id"], outcome, detail[:200], pause)
            self.sleep(pause)
        if youtube and attempts:
            self._block.note(outcome)
        return _Outcome(name, clip["source"], outcome, detail, attempts, file, offset, duration)

    # -- one attempt ---------------------------------------------------------------------
    def _segment(self, clip: dict) -> tuple[float, float | None]:
        start = float(clip["start"])
        end = clip.get("end")
        end = None if end is None or pd.isna(end) or end == "" else float(end)
        return start, end

    def _attempt(self, clip: dict, source: Source) -> tuple[str, float, float]:
        """Return (media file, offset of the segment in it, segment length or NaN); raise FetchError."""
        start, end = self._segment(clip)
        kind = source_kind(clip["source"])
        duration = float("nan") if end is None else end - start
        if kind == "path":
            if not os.path.isfile(clip["source"]):
                raise FetchError(st.UNAVAILABLE, f"no such file: {clip['source']}")
            self._validate(clip["source"], start, duration)
            return clip["source"], start, duration
        # A folder of its own, never one named after the clip: whatever an id says, the
        # cleanup below removes only what this attempt created.
        tmp = Path(tempfile.mkdtemp(prefix="attempt-", dir=self.tmp_root))
        try:
            try:
                fetched, offset = self._fetch(clip, kind, start, end, tmp, source.url)
                self._validate(str(fetched), offset, duration)
            except FetchError as e:
                if kind == "youtube" or e.status not in (st.OTHER, st.TOO_SHORT, st.DECODE_ERROR):
                    raise
                raise self._diagnose_source(clip["source"], start, duration, e) from None
            # Only complete, validated media ever appear under their final name.
            file = self.media_dir / f"{clip['clip_id']}{fetched.suffix}"
            os.replace(fetched, file)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(file), offset, duration

    def _diagnose_source(self, url: str, start: float, duration: float, error: FetchError) -> FetchError:
        """Decide a failed fetch from a URL by checking the source itself over the segment.

        The fetched copy may be bad for a passing reason (a connection dropped mid-body, a
        server error) or because the source is: ffmpeg reads the segment straight from the
        URL, and its verdict (damaged, short, gone, or a network fault, which stays
        transient) is the clip's. A source that reads fine means the copy was at fault:
        transient, retried.
        """
        try:
            self._validate(url, 0.0, duration, seek=start)
        except FetchError as verdict:
            if verdict.status == st.DECODE_ERROR:
                return FetchError(st.DECODE_ERROR, f"the source itself is damaged: {verdict.detail}")
            return verdict
        return FetchError(st.OTHER, f"the fetched copy was unusable ({error.detail}) but the source reads fine")

    def _fetch(
        self, clip: dict, kind: str, start: float, end: float | None, tmp: Path, youtube_url: str
    ) -> tuple[Path, float]:
        """Fetch with yt-dlp into the folder ``tmp``; return the file and the segment's offset in it.

        ``youtube_url`` is the page of a YouTube id (``{ytid}`` in it; YouTube's own by default)."""
        import yt_dlp
        from yt_dlp.utils import download_range_func

        s = self.settings
        url = youtube_url.format(ytid=clip["source"]) if kind == "youtube" else clip["source"]
        options: dict[str, Any] = {
            "outtmpl": str(tmp / "clip.%(ext)s"),
            "format": s.format if s.need_video else "ba/b",
            "merge_output_format": "mkv",
            "quiet": True,
            "no_warnings": True,
            "noprogress": True,
            "noplaylist": True,
            "retries": 0,  # retries are ours, with back-off and classification
            "fragment_retries": 0,
            "socket_timeout": s.socket_timeout,
            "ffmpeg_location": str(ffmpeg_bin_dir()),
            "enable_file_urls": url.startswith("file:"),
            "js_runtimes": _js_runtime(),
            "logger": _YtdlpLogger(clip["clip_id"]),
        }
        if s.rate_limit:
            options["ratelimit"] = s.rate_limit
        if s.cookies:
            # yt-dlp writes the jar back when it closes: each attempt gets its own copy.
            options["cookiefile"] = shutil.copy(s.cookies, tmp / "cookies.txt")
        offset = start
        if kind in ("youtube", "url"):
            # Fetch only the segment plus a margin; the exact cut happens at extraction.
            first = max(0.0, start - s.margin)
            last = float("inf") if end is None else end + s.margin
            options["download_ranges"] = download_range_func(None, [(first, last)])
            offset = start - first
        try:
            with yt_dlp.YoutubeDL(options) as ydl:
                info = ydl.extract_info(url, download=True)
        except yt_dlp.utils.DownloadError as e:
            message = str(e).removeprefix("ERROR: ")
            raise FetchError(classify_error(message), message) from None
        except OSError as e:
            raise FetchError(st.OTHER, f"{type(e).__name__}: {e}") from None
        files = [p for p in tmp.glob("clip.*") if not p.name.endswith((".part", ".ytdl"))]
        if not files:
            raise FetchError(
                st.OTHER, f"yt-dlp reported success but wrote no file (id {info.get('id') if info else '?'})"
            )
        return max(files, key=lambda p: p.stat().st_size), offset

    def _validate(self, file: str, offset: float, duration: float, seek: float = 0.0) -> None:
        """Reject media that cannot serve the clip: unreadable, missing a stream, or too short.

        Each stream the data set needs (``modalities``) must cover ``min_coverage`` of the
        segment, which starts ``offset`` seconds into the media; ``seek`` > 0 checks only the
        media from that time on (a source URL, read over the segment alone).
        """
        length = None if seek <= 0 or pd.isna(duration) else duration
        try:
            info, present = check_media(file, seek, length)
        except MediaError as e:
            raise FetchError(e.status, e.detail) from None
        s = self.settings
        needed = [kind for kind, need in (("audio", s.need_audio), ("video", s.need_video)) if need]
        if s.need_audio and not info.has_audio:
            raise FetchError(st.NO_AUDIO, "the media has no audio stream")
        if s.need_video and not info.has_video:
            raise FetchError(st.NO_VIDEO, "the media has no video stream")
        for kind in needed:
            if present[kind] <= 0:
                raise FetchError(st.TOO_SHORT, f"the media holds no samples (an empty {kind} stream)")
            if not pd.isna(duration):
                covered = max(0.0, present[kind] - offset)
                if covered < s.min_coverage * duration:
                    raise FetchError(
                        st.TOO_SHORT,
                        f"the {kind} covers {covered:.2f} s of the {duration:.2f} s segment (min_coverage {s.min_coverage})",
                    )


class _YtdlpLogger:
    """Route yt-dlp's messages into logging (its errors also come back as exceptions)."""

    def __init__(self, clip_id: str):
        self.clip_id = clip_id

    def debug(self, msg: str) -> None:
        log.debug("%s: %s", self.clip_id, msg)

    info = debug

    def warning(self, msg: str) -> None:
        log.debug("%s: yt-dlp warning: %s", self.clip_id, msg)

    def error(self, msg: str) -> None:
        log.debug("%s: yt-dlp error: %s", self.clip_id, msg)


def download_shard(
    shard_csv: str | Path,
    media_dir: str | Path,
    out_csv: str | Path,
    settings: DownloadSettings,
    sources: list[Source] | None = None,
) -> pd.DataFrame:
    """Run one shard job: read its clips, fetch them, write the status rows atomically."""
    clips = pd.read_csv(
        shard_csv,
        dtype={"clip_id": str, "source": str, "labels": str, "split": str, "candidates": str},
        keep_default_na=False,
    )
    clips["end"] = pd.to_numeric(clips["end"], errors="coerce")
    rows = ShardDownloader(media_dir, settings, sources=sources).run(clips)
    out_csv = Path(out_csv)
    with atomic_output(out_csv) as tmp:
        rows.to_csv(tmp, index=False)
    counts = rows["status"].value_counts().to_dict()
    log.info("shard done: %s", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return rows
