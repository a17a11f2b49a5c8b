"""Sources: catalogues of folders and archives, the per-clip plan, streaming members out of
damaged archives, and the YouTube rate shared by concurrent jobs (with a simulated clock)."""

from __future__ import annotations

import gzip
import threading
import zipfile
from pathlib import Path

import pandas as pd
import pytest
from conftest import make_clip
from data_sets import cut_tar_gz_inside, tar_gz

from equiav.data import status as st
from equiav.data.download import DownloadSettings, ShardDownloader
from equiav.data.sources import (
    Source,
    SourceError,
    archive_members,
    match_name,
    parse_sources,
    plan_sources,
    read_members,
    write_catalog,
)
from equiav.data.youtube import YouTubeRate

YTID = "AbC-_123xyz"


@pytest.mark.parametrize(
    ("name", "key"),
    [
        (f"{YTID}_30.mp4", ("", YTID, "30000")),  # <YTID>_<start>
        (f"{YTID}_000030.mp4", ("", YTID, "30000")),  # <YTID>_<start:06d>, VGGSound's naming
        (f"{YTID}_30.000_40.000.mkv", ("", YTID, "30000")),  # <YTID>_<start>_<end>
        (f"{YTID}_12.5.flac", ("", YTID, "12500")),
        (f"{YTID}.webm", ("", YTID, "")),  # <YTID>: one clip per video
        ("video7020.mp4", ("video7020", "", "")),  # a clip id (MSR-VTT)
        (f"{YTID}_30.txt", None),  # not media
        (f".{YTID}_30", None),  # no suffix at all
    ],
)
def test_the_naming_presets_read_the_common_file_names(name, key):
    assert match_name(name, Source(name="s", type="folder", path=".")) == key


def test_a_pattern_of_ones_own():
    source = Source(name="s", type="folder", path=".", pattern=r"clip-(?P<ytid>.{11})-at-(?P<start>\d+)s")
    assert match_name(f"clip-{YTID}-at-7s.mp4", source) == ("", YTID, "7000")
    assert match_name(f"{YTID}_7.mp4", source) is None  # the presets are not tried then


def test_bad_sources_are_refused_with_the_key_and_a_fix_that_works(tmp_path):
    def refused(*sources, match):
        with pytest.raises(SourceError, match=match):
            parse_sources("vgg", {"sources": list(sources)})

    refused({"type": "folder", "path": str(tmp_path / "nope")}, match=r"'datasets.vgg.sources.0.path'.*not a folder")
    refused({"type": "archive", "path": str(tmp_path / "*.tar.gz")}, match=r"sources.0.path.*no archive file")
    refused({"type": "archive"}, match=r"sources.0'.*needs `path`")
    refused({"type": "folder", "path": str(tmp_path), "pattern": "(.*)"}, match=r"pattern.*\(\?P<clip_id>")
    refused({"type": "folder", "path": str(tmp_path), "pattern": "(?P<ytid>"}, match="not a regular expression")
    folder = {"type": "folder", "path": str(tmp_path)}
    refused(folder, folder, match=r"sources.1'.*named 'folder' comes earlier.*give each source its own `name`")
    refused({"type": "youtube"}, {"type": "youtube", "name": "again"}, match="youtube is listed 2 times")
    # The advice, followed: named apart, both are taken.
    sources = parse_sources("vgg", {"sources": [folder, {**folder, "name": "old_copy"}, {"type": "youtube"}]})
    assert [s.name for s in sources] == ["folder", "old_copy", "youtube"]
    assert parse_sources("vgg", {})[0].type == "youtube"  # no sources: the list's own, as before


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("clips")
    return {f"c{i}": make_clip(folder / f"c{i}.mp4", 2.0 + i) for i in range(4)}


def test_a_damaged_tar_gz_costs_only_the_members_it_cannot_give(clips, tmp_path):
    archive = tar_gz(tmp_path / "shard.tar.gz", {f"v/{k}.mp4": f for k, f in clips.items()})
    # Cut in the third member: the first two come out whole, the third is damaged, the fourth unseen.
    cut_tar_gz_inside(archive, "v/c2.mp4")
    members, damage = archive_members(str(archive))
    assert members[:2] == ["v/c0.mp4", "v/c1.mp4"] and "v/c3.mp4" not in members and damage
    got = read_members(str(archive), [f"v/{k}.mp4" for k in clips], tmp_path / "out")
    for k in ("c0", "c1"):
        assert got[f"v/{k}.mp4"].read_bytes() == clips[k].read_bytes()
    assert "damaged" in got["v/c2.mp4"] and "damaged" in got["v/c3.mp4"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[:2] == ["member-0.mp4", "member-1.mp4"]


def test_zip_members_are_read_one_by_one(clips, tmp_path):
    archive = tmp_path / "shard.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for k, f in clips.items():
            z.write(f, f"{k}.mp4")
    got = read_members(str(archive), ["c1.mp4", "absent.mp4"], tmp_path / "out")
    assert got["c1.mp4"].read_bytes() == clips["c1"].read_bytes()
    assert "holds no member absent.mp4" in got["absent.mp4"]
    # A member whose bytes were damaged in place: its CRC fails, the others still read.
    with zipfile.ZipFile(archive) as z:
        info = z.getinfo("c2.mp4")
    data = bytearray(archive.read_bytes())
    at = info.header_offset + 30 + len(info.filename) + len(info.extra) + 1000
    data[at : at + 8] = b"\0" * 8
    archive.write_bytes(bytes(data))
    got = read_members(str(archive), ["c2.mp4", "c3.mp4"], tmp_path / "again")
    assert isinstance(got["c3.mp4"], Path) and "BadZipFile" in got["c2.mp4"]


def test_catalogues_and_the_plan(clips, tmp_path):
    folder = tmp_path / "folder"
    (folder / "deep").mkdir(parents=True)
    (folder / "deep" / f"{YTID}_000010.mp4").write_bytes(clips["c0"].read_bytes())
    (folder / "notes.txt").write_text("not media\n")
    archive = tar_gz(tmp_path / "a.tar.gz", {f"x/{YTID}_20.mp4": clips["c1"], "x/zzzzzzzzzzz_5.mp4": clips["c2"]})
    sources = parse_sources(
        "d",
        {
            "sources": [
                {"type": "folder", "path": str(folder)},
                {"type": "archive", "path": str(tmp_path / "*.tar.gz"), "name": "mirror"},
                {"type": "youtube"},
            ]
        },
    )
    catalogs = {s.name: write_catalog(s, tmp_path / f"{s.name}.csv") for s in sources if s.catalogued}
    assert catalogs["folder"]["member"].tolist() == [str(folder / "deep" / f"{YTID}_000010.mp4")]
    assert catalogs["mirror"]["member"].tolist() == [f"x/{YTID}_20.mp4", "x/zzzzzzzzzzz_5.mp4"]
    manifest = pd.DataFrame(
        {
            "clip_id": ["late", "y5", "a", "b", "only_yt"],
            "source": ["zzzzzzzzzzz", "zzzzzzzzzzz", YTID, YTID, "qqqqqqqqqqq"],
            "start": [9.0, 5.0, 10.0, 20.0, 0.0],
        }
    )
    plan = plan_sources(manifest, sources, {k: v.fillna("") for k, v in catalogs.items()})
    assert plan.counts == {"folder": 1, "mirror": 2, "youtube": 2, "none": 0}
    # Folder clips first, then the archive's in its stored order, then the rest in list order.
    assert [manifest["clip_id"][i] for i in plan.order] == ["a", "b", "y5", "late", "only_yt"]
    assert plan.candidates[3] == f'[[1,"{archive}","x/{YTID}_20.mp4"],[2,"",""]]'
    # Without youtube, a clip in no source has no candidate: the download stage says so.
    plan = plan_sources(manifest, sources[:2], catalogs)
    assert plan.counts["none"] == 2 and plan.candidates[4] == "[]"


def test_a_clip_falls_back_to_the_next_source_and_its_row_says_which(clips, tmp_path):
    """An archive member that is damaged, then a folder copy without video: the row names every
    source tried; a clip no source serves keeps the first final verdict (no-video, not silence)."""
    good = tmp_path / "good"
    good.mkdir()
    audio_only = make_clip(good / f"{YTID}_000000.m4a", 3.0, with_video=False)
    archive = tar_gz(tmp_path / "m.tar.gz", {"a.mp4": clips["c0"], "b.mp4": clips["c1"]})
    damaged = cut_tar_gz_inside(tar_gz(tmp_path / "damaged.tar.gz", {"c.mp4": clips["c3"]}), "c.mp4")
    sources = [Source("mirror", "archive", str(tmp_path / "*.tar.gz")), Source("copy", "folder", str(good))]
    rows = pd.DataFrame(
        [
            {"clip_id": "a", "candidates": f'[[0,"{archive}","a.mp4"]]'},
            {"clip_id": "c", "candidates": f'[[0,"{damaged}","c.mp4"],[1,"","{audio_only}"]]'},
            {"clip_id": "gone", "candidates": "[]"},
        ]
    ).assign(source=YTID, start=0.0, end=2.0, labels="x", split="train")
    settings = DownloadSettings(retries=0, youtube_per_hour=None)
    table = ShardDownloader(tmp_path / "media", settings, sources=sources).run(rows).set_index("clip_id")
    assert table.loc["a", ["status", "source_name", "source"]].tolist() == [st.OK, "mirror", f"{archive}#a.mp4"]
    assert Path(table.loc["a", "file"]).read_bytes() == clips["c0"].read_bytes()
    assert table.loc["c", ["status", "source_name"]].tolist() == [st.DECODE_ERROR, "mirror"]
    assert "mirror: decode-error (the archive" in table.loc["c", "detail"]
    assert "copy: no-video" in table.loc["c", "detail"]
    assert table.loc["gone", ["status", "source_name"]].tolist() == [st.UNAVAILABLE, "none"]
    assert "add {type: youtube}" in table.loc["gone", "detail"]


class SimulatedClock:
    """Time that passes only while every job sleeps: each sleeper wakes at its own time, in
    order, so that two threads see one consistent clock however the OS schedules them."""

    def __init__(self, jobs: int):
        self.now = 1000.0
        self.running = jobs
        self.wakeups: list[float] = []
        self.cond = threading.Condition()

    def time(self) -> float:
        with self.cond:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self.cond:
            wake = self.now + seconds
            self.wakeups.append(wake)
            self.running -= 1
            self._advance()
            while self.now < wake:
                self.cond.wait()
            self.running += 1
            self.wakeups.remove(wake)

    def finished(self) -> None:
        with self.cond:
            self.running -= 1
            self._advance()

    def _advance(self) -> None:
        if self.running == 0 and self.wakeups:
            self.now = max(self.now, min(self.wakeups))
            self.cond.notify_all()


@pytest.mark.parametrize("jitter", [0.0, 0.25])
def test_two_jobs_never_ask_youtube_faster_than_the_rate(tmp_path, jitter):
    per_hour, fetches = 120.0, 25  # one slot every 30 s
    clock = SimulatedClock(jobs=2)
    state = tmp_path / "rate"
    asked: list[float] = []

    def job(seed: int) -> None:
        import random

        draws = random.Random(seed)
        rate = YouTubeRate(per_hour, jitter, state=state, clock=clock.time, sleep=clock.sleep, uniform=draws.random)
        for _ in range(fetches):
            rate.wait()
            asked.append(clock.time())
            clock.sleep(draws.uniform(0, 5))  # the fetch itself
        clock.finished()

    threads = [threading.Thread(target=job, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(asked) == 2 * fetches
    asked.sort()
    interval = 3600 / per_hour
    # Over any window, at most its share plus the one request at its start.
    for i, first in enumerate(asked):
        for window in (60.0, 300.0, 3600.0):
            inside = sum(1 for t in asked[i:] if t < first + window)
            assert inside <= window / interval + 1, (first, window, inside)
    gaps = [b - a for a, b in zip(asked, asked[1:])]
    assert min(gaps) >= interval - 1e-6
    if jitter:
        assert max(gaps) > interval * 1.01  # the gaps vary
        assert max(gaps) <= interval * (1 + jitter) + 5  # never more than the jitter (and a fetch) adds
    else:
        assert max(gaps) == pytest.approx(interval)  # back to back: the rate is reached, not undershot


def test_no_rate_configured_never_waits(tmp_path):
    slept: list[float] = []
    rate = YouTubeRate(None, state=tmp_path / "rate", sleep=slept.append)
    for _ in range(5):
        rate.wait()
    assert slept == [] and not (tmp_path / "rate").exists()


def test_gzip_stream_errors_count_as_damage(tmp_path):
    """Not a tar at all but a broken gzip: the catalogue records the damage rather than failing."""
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(gzip.compress(b"x" * 5000)[:40])
    members, damage = archive_members(str(bad))
    assert members == [] and damage


def test_a_journal_from_before_sources_is_resumed_in_the_new_columns(clips, tmp_path):
    """A shard killed before this version: its journal has no source_name column. Resuming keeps
    its finished clip (not fetched again) and the rows appended now line up with the header."""
    media = tmp_path / "media"
    media.mkdir()
    old_columns = "clip_id,split,labels,source,status,final,attempts,detail,file,offset,duration,updated"
    done = clips["c0"]
    (media / "journal.csv").write_text(
        f"{old_columns}\nc0,train,x,{done},ok,True,1,,{done},0.0,2.0,2026-01-01T00:00:00+00:00\n"
    )
    rows = pd.DataFrame(
        [{"clip_id": c, "source": str(clips[c]), "start": 0.0, "end": 2.0, "labels": "x", "split": "train"}
         for c in ("c0", "c1")]
    )  # fmt: skip
    table = ShardDownloader(media, DownloadSettings(retries=0, youtube_per_hour=None)).run(rows).set_index("clip_id")
    assert table["status"].tolist() == [st.OK, st.OK]
    assert table.loc["c0", "updated"].startswith("2026-01-01")  # kept, not checked again
    assert table.loc["c1", "source_name"] == "path"
    journal = pd.read_csv(media / "journal.csv", keep_default_na=False)
    assert "source_name" in journal.columns and journal.set_index("clip_id").loc["c1", "file"] == str(clips["c1"])


def test_a_hub_source_that_is_not_in_the_cache_offline_says_what_to_do(tmp_path):
    import json
    import os
    import subprocess
    import sys

    source = {"name": "hub", "type": "hub", "repo_id": "nobody/absent", "files": "*.tar.gz"}
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "equiav", "catalog", "--source", json.dumps(source), "--out", str(tmp_path / "c.csv")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode != 0 and not (tmp_path / "c.csv").exists()
    assert "cannot get the dataset repository 'nobody/absent'" in proc.stderr
    assert "must already be in the cache (HF_HOME)" in proc.stderr


def test_validate_config_stops_at_a_bad_source_before_any_job(tmp_path):
    """`equiav validate-config` (and the Snakefile, which calls the same check) names the key."""
    import subprocess
    import sys

    import yaml

    config = {
        "run": ["vgg"],
        "datasets": {
            "vgg": {
                "lists": [{"format": "vggsound", "path": "vggsound.csv"}],
                "sources": [{"type": "folder", "path": str(tmp_path / "not_there")}, {"type": "youtube"}],
            }
        },
    }
    (tmp_path / "my.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run(
        [sys.executable, "-m", "equiav", "validate-config", str(tmp_path / "my.yaml")],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "config key 'datasets.vgg.sources.0.path'" in proc.stderr + proc.stdout
    assert "not a folder" in proc.stderr + proc.stdout


def test_an_index_file_assigns_files_and_members_to_clips(clips, tmp_path):
    folder = tmp_path / "copies"
    folder.mkdir()
    (folder / "anything.mp4").write_bytes(clips["c0"].read_bytes())
    index = tmp_path / "index.csv"
    index.write_text("clip_id,path\nclip_a,anything.mp4\nclip_b,inner/b.mp4\n")
    catalog = write_catalog(Source("copies", "folder", str(folder), index=str(index)), tmp_path / "f.csv")
    assert catalog[["clip_id", "member"]].values.tolist() == [
        ["clip_a", str(folder / "anything.mp4")],
        ["clip_b", str(folder / "inner" / "b.mp4")],  # listed: the download stage reports it missing
    ]
    archives = [tar_gz(tmp_path / f"{n}.tar.gz", {f"inner/{n}.mp4": clips["c1"]}) for n in ("a", "b")]
    source = Source("mirror", "archive", str(tmp_path / "*.tar.gz"), index=str(index))
    catalog = write_catalog(source, tmp_path / "a.csv")
    # Only the index rows an archive holds, each under its own archive.
    assert catalog[["container", "member", "clip_id"]].values.tolist() == [[str(archives[1]), "inner/b.mp4", "clip_b"]]
