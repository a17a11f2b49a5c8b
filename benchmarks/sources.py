"""Clips per second per core into HDF5: from a local .tar.gz mirror shard against plain files.

Both paths run what the workflow runs for a shard, in-process and pinned to one core (ffmpeg
inherits the pinning): the download stage (``ShardDownloader``: plain files are checked in
place; archive members are streamed out of the tar.gz in one pass, checked, and moved into
the media folder) and then the feature stage (``extract_shard`` into an HDF5 shard). The
clips are those of ``feature_extraction.py`` (640x360 25 fps H.264 + 44.1 kHz stereo AAC,
10 s), the shard a tar.gz of them named ``video/<YTID>_<start:06d>.mp4`` as VGGSound's
mirror names its members. The two paths alternate, ``--repeats`` times each, so that a change
of machine load weighs on both alike.

    python benchmarks/sources.py [--clips 20] [--repeats 3] [--out benchmarks/out/sources.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from common import write_json
from feature_extraction import add_clip_arguments, clips_on_one_core, run_facts

from equiav.data.download import DownloadSettings, ShardDownloader
from equiav.data.features import FeatureSettings, extract_shard
from equiav.data.sources import Source, archive_members

ROOT = Path(__file__).resolve().parent


def shard_of(paths: list[Path], seconds: float) -> pd.DataFrame:
    """A shard's clips (as the manifest writes them): YouTube-like ids, 10 s segments from 0."""
    return pd.DataFrame(
        {
            "clip_id": [f"bench{k:06d}_000000" for k in range(len(paths))],
            "source": [str(p) for p in paths],
            "start": 0.0,
            "end": seconds,
            "labels": "x",
            "split": "train",
        }
    )


def one_pass(clips: pd.DataFrame, sources: list[Source], work: Path) -> tuple[float, int]:
    """Seconds from a shard's clips to its HDF5 file (download stage + feature stage), clips ok."""
    shutil.rmtree(work, ignore_errors=True)
    start = time.perf_counter()
    settings = DownloadSettings(workers=1, youtube_per_hour=None, need_video=True)
    rows = ShardDownloader(work / "media", settings, sources=sources).run(clips)
    statuses = extract_shard(rows, work / "shard.h5", FeatureSettings(), workers=1)
    elapsed = time.perf_counter() - start
    ok = int((statuses["status"] == "ok").sum())
    if ok != len(clips):
        raise RuntimeError(f"only {ok} of {len(clips)} clips made it into the shard:\n{statuses}")
    return elapsed, ok


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser, clips=20)
    parser.add_argument("--repeats", type=int, default=3, help="passes of each path (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "sources.json")
    args = parser.parse_args(argv)

    paths, core = clips_on_one_core(args)

    plain = shard_of(paths, args.seconds)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        archive = scratch / "vggsound_00.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for clip_id, path in zip(plain["clip_id"], paths):
                tar.add(path, arcname=f"video/{clip_id}.mp4")
        archive_bytes = archive.stat().st_size
        members, damage = archive_members(str(archive))
        assert len(members) == len(paths) and not damage
        mirror = Source("mirror", "archive", str(archive))
        from_archive = plain.assign(candidates=[json.dumps([[0, str(archive), m]]) for m in members])

        runs = {
            "plain files (checked in place)": (plain, [Source("youtube", "youtube")]),
            "tar.gz shard (streamed members)": (from_archive, [mirror]),
        }
        seconds = {name: [] for name in runs}
        one_pass(plain.iloc[:1], runs["plain files (checked in place)"][1], scratch / "warm-up")
        for _ in range(args.repeats):
            for name, (clips, sources) in runs.items():
                elapsed, _ = one_pass(clips, sources, scratch / "pass")
                seconds[name].append(elapsed)

    n = len(paths)
    rows = {
        name: {"seconds": times, "best_s": min(times), "clips_per_s_per_core": n / min(times)}
        for name, times in seconds.items()
    }
    plain_rate, archive_rate = (row["clips_per_s_per_core"] for row in rows.values())
    ratio = archive_rate / plain_rate
    print(f"{n} clips of {args.seconds:g} s (640x360 H.264 + AAC), download + feature stage, one core")
    for name, row in rows.items():
        times = ", ".join(f"{t:.2f}" for t in row["seconds"])
        print(f"{name:<34}{row['clips_per_s_per_core']:>8.2f} clips/s/core  (passes: {times} s)")
    print(f"tar.gz / plain: {ratio:.3f} ({100 * (ratio - 1):+.1f} %)")
    report = {
        **run_facts(core),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "clips": n,
        "archive_bytes": archive_bytes,
        "results": rows,
        "archive_over_plain": ratio,
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
