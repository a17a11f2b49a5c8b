"""Where a data set's media come from: its `sources`, tried in order for each clip.

The lists still decide which clips exist, with their labels and splits; a source only
supplies media. Four types (docs/data.md, "Sources"):

- ``folder``: a tree of media files (an earlier download, a copy on shared storage), used in
  place; a file serves the clip its name gives (a naming preset or a regular expression), or
  the clip an index file (``clip_id,path``) assigns it to;
- ``archive``: tar, tar.gz or zip files (a glob), their members matched the same way and read
  member by member, streaming, never unpacked as a whole;
- ``hub``: a dataset repository on the Hugging Face hub, fetched with ``huggingface_hub`` into
  the user's cache, then read as ``archive`` or ``folder``;
- ``youtube``: the list's own source: a YouTube id, fetched with yt-dlp at the configured rate,
  or the URL or local path of a user list. What the pipeline did before sources existed.

Three steps: each source's files are catalogued once (:func:`write_catalog`, one job per
source: which file or member serves which clip, and where an archive is damaged); the
manifest stage gives every clip its candidates in source order (:func:`plan_sources`) and
groups the shards by the archive that serves them, so that a shard job streams an archive
once; the download job reads the members it needs (:func:`read_members`) and tries the
candidates of each clip in order (equiav.data.download).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from equiav.atomic import atomic_output

log = logging.getLogger(__name__)

SOURCE_TYPES = ("folder", "archive", "hub", "youtube")
_YTID_CHARS = r"[A-Za-z0-9_-]{11}"
_YTID = rf"(?P<ytid>{_YTID_CHARS})"
_SECONDS = r"\d+(?:\.\d+)?"
# File-name patterns, matched against the whole name without its suffix. `auto` tries them
# in this order: the more specific first (an 11-character id is never mistaken for a start).
NAMINGS: dict[str, str] = {
    "ytid_start_end": rf"{_YTID}_(?P<start>{_SECONDS})_(?P<end>{_SECONDS})",  # <YTID>_<start>_<end>
    "ytid_start": rf"{_YTID}_(?P<start>{_SECONDS})",  # <YTID>_<start>, <YTID>_<start:06d>
    "ytid": _YTID,  # <YTID>
    "clip_id": r"(?P<clip_id>.+)",  # the clip id itself (ESC-50, MSR-VTT's video<N>)
}
MEDIA_SUFFIXES = frozenset(
    {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flac", ".wav", ".mp3", ".m4a", ".ogg", ".opus", ".aac"}
)
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".zip")
CATALOG_COLUMNS = ("container", "member", "clip_id", "ytid", "start_ms", "damage")
YOUTUBE_URL = "https://www.youtube.com/watch?v={ytid}"
# What a damaged archive raises while it is read: truncated or corrupt compressed data, a bad header.
_DAMAGE = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError)


def is_youtube_id(source: str) -> bool:
    """Whether a list's source is a YouTube id (11 id characters, and no file of that name here)."""
    return re.fullmatch(_YTID_CHARS, source) is not None and not os.path.exists(source)


class SourceError(ValueError):
    """A `sources` entry that cannot be used; the message names the config key and the fix."""


@dataclass(frozen=True)
class Source:
    """One entry of a data set's `sources`, checked (see the schema for each key)."""

    name: str
    type: str
    path: str | None = None  # folder: the folder; archive: a glob of archive files
    naming: str = "auto"
    pattern: str | None = None
    index: str | None = None
    trimmed: bool = True
    repo_id: str | None = None
    revision: str = "main"
    files: str | None = None
    read_as: str = "archive"
    url: str = YOUTUBE_URL
    catalog: str | None = None  # where its catalogue is written (set by the workflow)

    @property
    def catalogued(self) -> bool:
        return self.type != "youtube"

    def patterns(self) -> list[re.Pattern[str]]:
        if self.pattern is not None:
            return [re.compile(self.pattern)]
        names = list(NAMINGS) if self.naming == "auto" else [self.naming]
        return [re.compile(NAMINGS[n]) for n in names]


def parse_sources(dataset_name: str, dataset: dict, *, check_files: bool = True) -> list[Source]:
    """The data set's `sources` as :class:`Source` objects; raise SourceError naming the bad key.

    ``check_files`` also checks that folders, archives and index files exist (at workflow
    start, so that a typo stops the run before any job).
    """
    entries = dataset.get("sources") or [{"type": "youtube"}]
    sources, seen = [], {}
    for i, entry in enumerate(entries):
        key = f"datasets.{dataset_name}.sources.{i}"
        source = Source(
            **{"name": entry.get("name") or entry["type"], **{k: v for k, v in entry.items() if k != "name"}}
        )
        if source.name in seen:
            raise SourceError(
                f"config key '{key}': a source named {source.name!r} comes earlier too (sources.{seen[source.name]}); "
                "give each source its own `name` (it names the source in status rows and reports)"
            )
        seen[source.name] = i
        _check(source, key, check_files)
        sources.append(source)
    youtube = [i for i, s in enumerate(sources) if s.type == "youtube"]
    if len(youtube) > 1:
        raise SourceError(
            f"config key 'datasets.{dataset_name}.sources': youtube is listed {len(youtube)} times; keep one"
        )
    return sources


def _check(source: Source, key: str, check_files: bool) -> None:
    needs = {"folder": "path", "archive": "path", "hub": "repo_id"}.get(source.type)
    if needs and not getattr(source, needs):
        raise SourceError(f"config key '{key}': a {source.type} source needs `{needs}`")
    if source.pattern is not None:
        try:
            groups = set(re.compile(source.pattern).groupindex)
        except re.error as e:
            raise SourceError(f"config key '{key}.pattern': not a regular expression ({e})") from None
        if "clip_id" not in groups and "ytid" not in groups:
            raise SourceError(
                f"config key '{key}.pattern': name the id with a group, (?P<clip_id>...) or (?P<ytid>...) "
                "(with (?P<start>...) for the segment's start in seconds); found groups: "
                f"{', '.join(sorted(groups)) or 'none'}"
            )
    if source.index and source.pattern:
        raise SourceError(f"config key '{key}': give `index` or `pattern`, not both")
    if not check_files:
        return
    if source.type == "folder" and not os.path.isdir(source.path):
        raise SourceError(
            f"config key '{key}.path': {source.path!r} is not a folder (relative paths are taken in the working "
            f"directory, {os.getcwd()}); give the folder that holds the media files"
        )
    if source.type == "archive" and not archive_files(source.path):
        raise SourceError(
            f"config key '{key}.path': no archive file matches {source.path!r} (relative paths are taken in the "
            f"working directory, {os.getcwd()}); give a file or a glob of {', '.join(ARCHIVE_SUFFIXES)} files"
        )
    if source.index and not os.path.isfile(source.index):
        raise SourceError(f"config key '{key}.index': no such file {source.index!r}; give a CSV of clip_id,path rows")


def archive_files(pattern: str) -> list[str]:
    """The archive files a glob names, sorted (other files it matches are left out)."""
    matches = glob.glob(pattern, recursive=True)
    return sorted(p for p in matches if p.lower().endswith(ARCHIVE_SUFFIXES) and os.path.isfile(p))


# -- catalogue -----------------------------------------------------------------------------
def write_catalog(source: Source, out_csv: str | Path) -> pd.DataFrame:
    """Catalogue a source: one row per media file or member with the clip it serves, and one
    ``damage`` row per archive that cannot be read to its end. Written atomically."""
    if source.type == "hub":
        root = hub_snapshot(source)
        kind = source.read_as
        where = os.path.join(root, source.files or "**/*") if kind == "archive" else root
    else:
        where, kind = source.path, source.type
    rows = _catalog_archives(source, archive_files(where)) if kind == "archive" else _catalog_folder(source, where)
    table = pd.DataFrame(rows, columns=list(CATALOG_COLUMNS))
    with atomic_output(Path(out_csv)) as tmp:
        table.to_csv(tmp, index=False)
    served = table[table["damage"] == ""]
    log.info("%s: %d media file(s) that name a clip", source.name, len(served))
    for row in table[table["damage"] != ""].itertuples():
        log.warning("%s: %s is damaged after %s: %s", source.name, row.container, row.member or "its start", row.damage)
    return table


def _catalog_folder(source: Source, folder: str) -> list[tuple]:
    if source.index:
        return [("", os.path.join(folder, path), clip_id, "", "", "") for clip_id, path in _read_index(source)]
    rows = []
    for parent, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()
        for file in sorted(files):
            key = match_name(file, source)
            if key is not None:
                rows.append(("", os.path.join(parent, file), *key, ""))
    return rows


def _read_index(source: Source) -> list[tuple[str, str]]:
    """(clip_id, path) of each row of the source's index file."""
    index = pd.read_csv(source.index, dtype=str, keep_default_na=False)
    if list(index.columns[:2]) != ["clip_id", "path"]:
        raise SourceError(
            f"{source.index}: an index file starts with the header clip_id,path (found {list(index.columns)})"
        )
    return list(zip(index["clip_id"], index["path"]))


def _catalog_archives(source: Source, archives: list[str]) -> list[tuple]:
    rows: list[tuple] = []
    index = _read_index(source) if source.index else []
    for archive in archives:
        members, damage = archive_members(archive)
        if source.index:
            held = set(members)
            rows += [(archive, path, clip_id, "", "", "") for clip_id, path in index if path in held]
        else:
            for member in members:
                key = match_name(os.path.basename(member), source)
                if key is not None:
                    rows.append((archive, member, *key, ""))
        if damage:
            rows.append((archive, members[-1] if members else "", "", "", "", damage))
    return rows


def archive_members(archive: str) -> tuple[list[str], str]:
    """The file members of an archive in their stored order, and what stopped the reading
    ("" when it reached the end). A tar is read as a stream (tar.gz is not seekable); a zip
    from its directory."""
    members: list[str] = []
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                return [i.filename for i in z.infolist() if not i.is_dir()], ""
        with tarfile.open(archive, mode="r|*") as tar:
            for info in tar:
                if info.isfile():
                    members.append(info.name)
    except _DAMAGE as e:
        return members, f"{type(e).__name__}: {e}"
    return members, ""


def match_name(file_name: str, source: Source) -> tuple[str, str, str] | None:
    """(clip_id, ytid, start_ms) that a media file's name gives, '' where not given; None when
    the name is not a media file or matches no pattern."""
    stem, suffix = os.path.splitext(file_name)
    if suffix.lower() not in MEDIA_SUFFIXES:
        return None
    for pattern in source.patterns():
        m = pattern.fullmatch(stem)
        if m is None:
            continue
        groups = m.groupdict()
        if groups.get("clip_id"):
            return groups["clip_id"], "", ""
        start = groups.get("start")
        return "", groups["ytid"], "" if start is None else str(round(float(start) * 1000))
    return None


def hub_snapshot(source: Source) -> str:
    """The local folder of a hub source: ``huggingface_hub.snapshot_download`` into the user's
    cache (HF_HOME; resumed where it stopped; HF_HUB_OFFLINE=1 uses the cache alone)."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(
            f"source {source.name!r} is on the Hugging Face hub, which needs huggingface_hub: pip install huggingface_hub"
        ) from None
    patterns = [source.files] if source.files else None
    log.info(
        "%s: fetching %s (%s) from the hub into the cache", source.name, source.repo_id, source.files or "all files"
    )
    try:
        return snapshot_download(source.repo_id, repo_type="dataset", revision=source.revision, allow_patterns=patterns)
    except Exception as e:  # the hub's errors are many (offline, not found, gated, HTTP): all end here
        raise SourceError(
            f"source {source.name!r}: cannot get the dataset repository {source.repo_id!r} (revision "
            f"{source.revision}) from the Hugging Face hub: {type(e).__name__}: {e}. Check `repo_id` and the "
            "network (a gated repository needs `hf auth login`); offline (HF_HUB_OFFLINE=1) it must "
            "already be in the cache (HF_HOME)"
        ) from None


# -- the plan ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """Each clip's candidates (JSON, in source order) and the order its shards are cut in."""

    candidates: list[str]
    order: list[int]
    counts: dict[str, int]  # clips each source is expected to serve first; "none" for no source


def plan_sources(manifest: pd.DataFrame, sources: list[Source], catalogs: dict[str, pd.DataFrame]) -> Plan:
    """For every manifest clip, the sources that hold it, in order, then the list's own
    source when `youtube` is configured. Candidates are ``[source number, container, member]``.

    Shards are cut in the returned order: clips grouped by the first source that serves them,
    an archive's clips in its stored order (one streaming pass per shard), the rest in list order.
    """
    ytids = manifest["source"].where(manifest["source"].map(is_youtube_id), "")
    starts = [str(round(float(s) * 1000)) if not _isnan(s) else "" for s in manifest["start"]]
    lookups = [_lookup(catalogs[s.name]) if s.catalogued else None for s in sources]
    candidates, keys, counts = [], [], {s.name: 0 for s in sources} | {"none": 0}
    rank = {}  # (source, container) -> rank, for grouping by archive
    for row, (clip_id, ytid, start) in enumerate(zip(manifest["clip_id"], ytids, starts)):
        found, key = [], None
        for number, lookup in enumerate(lookups):
            if lookup is None:
                found.append([number, "", ""])
                key = key or (number, 0, row)
                continue
            by_clip, by_start, by_ytid = lookup
            hit = by_clip.get(clip_id) or (ytid and (by_start.get((ytid, start)) or by_ytid.get(ytid)))
            if hit:
                container, member, position = hit
                found.append([number, container, member])
                key = key or (number, rank.setdefault((number, container), len(rank)), position)
        candidates.append(json.dumps(found, separators=(",", ":")))
        first = sources[found[0][0]].name if found else "none"
        counts[first] += 1
        keys.append(key or (len(sources), 0, row))
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return Plan(candidates, order, counts)


def _isnan(value) -> bool:
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return True


def _lookup(catalog: pd.DataFrame) -> tuple[dict, dict, dict]:
    """Catalogue -> (by clip id, by (ytid, start_ms), by ytid) -> (container, member, position)."""
    by_clip, by_start, by_ytid = {}, {}, {}
    served = catalog[catalog["damage"].fillna("") == ""]
    for position, (container, member, clip_id, ytid, start) in enumerate(
        served[["container", "member", "clip_id", "ytid", "start_ms"]].fillna("").astype(str).itertuples(index=False)
    ):
        hit = (container, member, position)
        if clip_id:
            by_clip.setdefault(clip_id, hit)
        elif start:
            by_start.setdefault((ytid, start), hit)
        elif ytid:
            by_ytid.setdefault(ytid, hit)
    return by_clip, by_start, by_ytid


def read_catalog(path: str | Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def describe_plan(plan: Plan, sources: list[Source], youtube_per_hour: float | None) -> list[str]:
    """What the manifest stage says: per source, the clips it is expected to serve, and how
    long the YouTube share takes at the configured rate from one address."""
    lines = []
    for source in sources:
        clips = plan.counts[source.name]
        line = f"{source.name} ({source.type}): {clips} clip(s) expected"
        if source.type == "youtube" and clips:
            if youtube_per_hour:
                line += (
                    f"; at download.youtube_per_hour {youtube_per_hour:g} from one address that takes about "
                    f"{_wall_time(clips / youtube_per_hour)} (YouTube ids only; URLs and paths are not limited)"
                )
            else:
                line += "; no YouTube rate is set (download.youtube_per_hour: null)"
        lines.append(line)
    if plan.counts["none"]:
        lines.append(
            f"none: {plan.counts['none']} clip(s) are in no source and will be recorded unavailable; "
            "add {type: youtube} at the end of `sources` to fetch them from the list's own source"
        )
    return lines


def _wall_time(hours: float) -> str:
    if hours < 1:
        return f"{max(1, round(hours * 60))} min"
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


# -- reading members -----------------------------------------------------------------------
def read_members(archive: str, wanted: Iterable[str], into: Path) -> dict[str, Path | str]:
    """Copy the ``wanted`` members of one archive into files under ``into``, in one pass.

    Returns member -> the file written, or the reason it could not be read (damage met while
    reading it, or before it was reached). A tar is streamed from its start to its last wanted
    member, a zip read member by member; nothing else is written.
    """
    wanted = set(wanted)
    got: dict[str, Path | str] = {}
    into.mkdir(parents=True, exist_ok=True)
    damage = ""
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                held = set(z.namelist())
                for member in sorted(wanted & held):
                    try:
                        with z.open(member) as src:
                            got[member] = _copy_out(src, into, len(got), member)
                    except _DAMAGE as e:
                        got[member] = f"the archive {archive} is damaged in this member: {type(e).__name__}: {e}"
        else:
            with tarfile.open(archive, mode="r|*") as tar:
                for info in tar:
                    if info.name in wanted and info.isfile():
                        try:
                            got[info.name] = _copy_out(tar.extractfile(info), into, len(got), info.name)
                        except _DAMAGE as e:
                            got[info.name] = f"the archive {archive} is damaged in this member: {type(e).__name__}: {e}"
                            raise
                        if len(got) == len(wanted):
                            break
    except _DAMAGE as e:
        damage = f"{type(e).__name__}: {e}"
    for member in wanted - got.keys():
        got[member] = (
            f"the archive {archive} is damaged before this member ({damage})"
            if damage
            else f"{archive} holds no member {member}"
        )
    return got


def _copy_out(src, into: Path, number: int, member: str) -> Path:
    # Numbered names: a member's name (whatever it holds) never becomes a path here.
    suffix = Path(member).suffix.lower()
    out = into / f"member-{number}{suffix if suffix in MEDIA_SUFFIXES else ''}"
    with open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return out
