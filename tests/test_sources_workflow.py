"""The workflow with the copies researchers hold: mirror shards (one damaged), a folder, a hub
cache and "YouTube" on loopback for the rest, and the MSR-VTT preset from its archive to Table 3.

One Snakemake run (from another working directory, with --directory) serves every check here.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import make_clip
from data_sets import cut_tar_gz_inside, hub_cache, tar_gz
from media_server import MediaServer
from workflow_runner import REPO, snakemake

PROFILE = str(REPO / "workflow" / "profiles" / "default")
HUB_REPO = "test-org/vggsound-mirror"

# (YouTube id, start, where its media are). Mirror files are trimmed to the segment; "YouTube"
# serves whole videos, so its clips start at 0.
CLIPS = [
    ("mirrorA0000", 30, "shard A"),
    ("mirrorA0001", 40, "shard A"),
    ("mirrorB0002", 50, "shard B"),
    ("mirrorB0003", 60, "shard B"),
    ("damagedC004", 70, "shard C, whole"),
    ("damagedC005", 0, "shard C, cut inside; on YouTube too"),
    ("damagedC006", 0, "shard C, after the cut; not on YouTube"),
    ("folder00007", 80, "folder, <YTID>_<start>.mp4"),
    ("folderAudio", 90, "folder, audio only (.m4a)"),
    ("youtube0009", 0, "YouTube"),
    ("youtube0010", 0, "YouTube"),
    ("youtubeGone", 0, "nowhere (404)"),
]


def clip_id(ytid: str, start: int) -> str:
    return f"{ytid}_{start:06d}"


def make_media(root: Path) -> dict[str, Path]:
    """Each clip's 10 s file, with a tone of its own (so that no two have one fbank)."""
    root.mkdir(parents=True)
    files = {}
    for i, (ytid, _, where) in enumerate(CLIPS):
        suffix = ".m4a" if "audio only" in where else ".mp4"
        files[ytid] = make_clip(
            root / f"{ytid}{suffix}", 10.0, size=(32, 32), fps=5, with_video="audio only" not in where,
            audio_expr=f"0.5*sin(2*PI*{300 + 40 * i}*t)",
        )  # fmt: skip
    return files


@pytest.fixture(scope="module")
def sources_run(tmp_path_factory):
    top = tmp_path_factory.mktemp("sources")
    work = top / "work"
    (work / "mirror").mkdir(parents=True)
    media = make_media(top / "media")
    member = lambda ytid, start: f"video/{clip_id(ytid, start)}.mp4"  # noqa: E731
    by = {where: [(y, s) for y, s, w in CLIPS if w.startswith(where)] for where in ("shard A", "shard B", "shard C")}
    for name, key in (("vggsound_00", "shard A"), ("vggsound_01", "shard B"), ("vggsound_02", "shard C")):
        tar_gz(work / "mirror" / f"{name}.tar.gz", {member(y, s): media[y] for y, s in by[key]})
    cut_tar_gz_inside(work / "mirror" / "vggsound_02.tar.gz", member("damagedC005", 0))
    folder = top / "earlier_download"
    folder.mkdir()
    (folder / "folder00007_80.mp4").write_bytes(media["folder00007"].read_bytes())
    (folder / "folderAudio_000090.m4a").write_bytes(media["folderAudio"].read_bytes())
    served = top / "youtube"
    served.mkdir()
    for ytid in ("damagedC005", "youtube0009", "youtube0010"):
        (served / f"{ytid}.mp4").write_bytes(media[ytid].read_bytes())
    hf_home = top / "hf"
    hub_cache(
        hf_home, HUB_REPO, {f"{n}.tar.gz": work / "mirror" / f"{n}.tar.gz" for n in ("vggsound_00", "vggsound_01")}
    )

    vgg_list = work / "vggsound.csv"
    vgg_list.write_text("".join(f"{y},{s},{'dog' if i % 2 else 'rain'},train\n" for i, (y, s, _) in enumerate(CLIPS)))
    hub_list = work / "vggsound_hub.csv"
    hub_list.write_text("".join(f"{y},{s},rain,train\n" for y, s, _ in CLIPS[:4]))
    # The same files as local paths, with the clip ids the VGGSound reader gives.
    paths = work / "paths.csv"
    paths.write_text(
        "clip_id,source,start,end,labels,split\n"
        + "".join(f"{clip_id(y, s)},{media[y]},0,10,rain,train\n" for y, s, _ in CLIPS[:5] + CLIPS[7:8])
    )
    msrvtt_zip, msrvtt_ids = msrvtt_archive(top / "msrvtt_media", work)
    small = {"shard_size": 4, "features": {"target_frames": 128, "num_frames": 2, "frame_size": 32}}
    config = {
        "results_dir": "results",
        "data_dir": "data",
        "run": ["vgg_mirror", "vgg_paths", "vgg_hub", "msrvtt"],
        "datasets": {
            "vgg_mirror": {
                **small,
                "lists": [{"format": "vggsound", "path": "vggsound.csv"}],
                "download": {"youtube_per_hour": 36000, "retries": 0},
                "sources": [
                    {"type": "archive", "name": "mirror", "path": "mirror/*.tar.gz"},  # relative: in --directory
                    {"type": "folder", "name": "earlier", "path": str(folder)},
                    {"type": "youtube", "url": "YOUTUBE/{ytid}.mp4"},
                ],
            },
            "vgg_paths": {**small, "lists": [{"format": "user", "path": "paths.csv"}]},
            "vgg_hub": {
                **small,
                "lists": [{"format": "vggsound", "path": "vggsound_hub.csv"}],
                "sources": [{"type": "hub", "repo_id": HUB_REPO, "files": "*.tar.gz"}],
            },
            "msrvtt": {
                "lists": [{"format": "msrvtt", "path": str(msrvtt_ids)}],
                "sources": [
                    {"type": "archive", "name": "msrvtt_archive", "path": str(msrvtt_zip), "naming": "clip_id"}
                ],
                "shard_size": 4,
                "features": {"target_frames": 128, "num_frames": 2},  # frames of the tiny model's 224 px
            },
        },
        "pretrain": {
            "equiav": {
                "dataset": "msrvtt",
                "settings": {
                    "model": {"preset": "tiny", "audio_frames": 128},
                    "mae_weights": None,
                    "splits": ["test"],
                    "epochs": 2,
                    "batch_size": 4,
                    "warmup_epochs": 1,
                    "precision": "fp32",
                    "num_workers": 0,
                },
                "resources": {"gpus": 0},
            }
        },  # fmt: skip
        "retrieval": {"msrvtt": {"samples": 2, "resources": {"gpus": 0}, "report": {"candidates": 4}}},
    }
    with MediaServer(served) as server:
        text = yaml.safe_dump(config).replace("YOUTUBE", server.url)
        (work / "sources.yaml").write_text(text)
        env = {"XDG_CACHE_HOME": str(top / "cache"), "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
        # From another folder, as cluster users run it; the MSR-VTT preset first, as the README says.
        proc = snakemake(
            "--profile", PROFILE, "--cores", "2", "--directory", str(work),
            "--configfile", str(REPO / "workflow" / "presets" / "msrvtt.yaml"), str(work / "sources.yaml"),
            cwd=top, env=env, timeout=1500,
        )  # fmt: skip
        requests = list(server.requests)
    return work, media, proc, requests


def msrvtt_archive(root: Path, work: Path) -> tuple[Path, Path]:
    """MSRVTT.zip in the archive's layout (MSRVTT/videos/all/video<N>.mp4, annotations beside)
    and the JSFusion test CSV listing five of its videos and one it lacks."""
    root.mkdir()
    archive = work / "MSRVTT.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("MSRVTT/annotation/MSR_VTT.json", json.dumps({"videos": []}))
        for n in range(7000, 7006):
            video = make_clip(
                root / f"video{n}.mp4", 3.0, size=(32, 32), fps=5, audio_expr=f"0.4*sin(2*PI*{n - 6700}*t)"
            )
            z.write(video, f"MSRVTT/videos/all/video{n}.mp4")
    ids = work / "MSRVTT_JSFUSION_test.csv"
    rows = [
        f"ret{i},msr{n},video{n},a caption, with a comma" for i, n in enumerate([7000, 7001, 7002, 7003, 7004, 9999])
    ]
    ids.write_text("key,vid_key,video_id,sentence\n" + "\n".join(rows) + "\n")
    return archive, ids


@pytest.mark.slow
def test_every_clip_has_one_row_naming_the_source_that_decided_it(sources_run):
    work, _, proc, requests = sources_run
    status = pd.read_csv(work / "results" / "vgg_mirror" / "status.csv", keep_default_na=False).set_index("clip_id")
    assert len(status) == len(CLIPS) and status.index.is_unique
    row = lambda ytid, start: status.loc[clip_id(ytid, start)]  # noqa: E731
    for ytid, start in (("mirrorA0000", 30), ("mirrorA0001", 40), ("mirrorB0002", 50), ("mirrorB0003", 60)):
        assert row(ytid, start)[["status", "source_name"]].tolist() == ["ok", "mirror"]
    # The damaged shard costs only what it cannot give: its whole member is served...
    assert row("damagedC004", 70)[["status", "source_name"]].tolist() == ["ok", "mirror"]
    # ...the member cut in two is fetched from the next source, and the row says both...
    assert row("damagedC005", 0)[["status", "source_name"]].tolist() == ["ok", "youtube"]
    downloads = pd.concat(
        pd.read_csv(f, keep_default_na=False)
        for f in sorted((work / "results" / "vgg_mirror" / "download").glob("*.csv"))
    ).set_index("clip_id")
    detail = downloads.loc[clip_id("damagedC005", 0), "detail"]
    assert "mirror: decode-error (the archive" in detail and "damaged" in detail and "youtube: ok" in detail
    # ...and the member after the cut, unknown to the catalogue, is asked of YouTube alone.
    assert row("damagedC006", 0)[["status", "source_name"]].tolist() == ["unavailable", "youtube"]
    assert row("folder00007", 80)[["status", "source_name"]].tolist() == ["ok", "earlier"]
    # An audio-only copy of an audio-visual clip is no-video, never quietly audio-only.
    assert row("folderAudio", 90)[["status", "source_name"]].tolist() == ["no-video", "earlier"]
    for ytid in ("youtube0009", "youtube0010"):
        assert row(ytid, 0)[["status", "source_name"]].tolist() == ["ok", "youtube"]
    assert row("youtubeGone", 0)[["status", "source_name"]].tolist() == ["unavailable", "youtube"]
    # YouTube was asked only for what no earlier source served.
    asked = {path.strip("/").split(".")[0] for path, _ in requests}
    assert asked == {"damagedC005", "damagedC006", "folderAudio", "youtube0009", "youtube0010", "youtubeGone"}

    report = (work / "results" / "vgg_mirror" / "availability.md").read_text()
    assert "| source |" in report and "| mirror | 5 |" in report.replace(" 5 | 0", " 5 |")
    log = (work / "results" / "vgg_mirror" / "logs" / "manifest.log").read_text()
    assert "mirror (archive): 6 clip(s) expected" in log and "earlier (folder): 2 clip(s) expected" in log
    assert (
        "youtube (youtube): 4 clip(s) expected; at download.youtube_per_hour 36000 from one address that takes about 1 min"
        in log
    )
    assert "vggsound_02.tar.gz is damaged after" in log
    # The shards were cut by source: the archive's clips first, in their stored order.
    first = pd.read_csv(work / "data" / "vgg_mirror" / "shards" / "00000.csv")
    assert first["clip_id"].tolist() == [clip_id(y, s) for y, s, _ in CLIPS[:4]]


def _features(h5: Path) -> dict[str, tuple[bytes, ...]]:
    with h5py.File(h5) as f:
        index = [i.decode() if isinstance(i, bytes) else i for i in f["clip_id"][()]]
        return {
            cid: (np.asarray(f["fbank"][i]).tobytes(), *(bytes(frame) for frame in f["frames"][i]))
            for i, cid in enumerate(index)
        }


def _all_features(work: Path, dataset: str) -> dict[str, tuple[bytes, ...]]:
    out: dict[str, tuple[bytes, ...]] = {}
    for h5 in sorted((work / "data" / dataset / "features").glob("*.h5")):
        out.update(_features(h5))
    return out


@pytest.mark.slow
def test_archive_and_hub_clips_have_the_features_of_the_same_files_as_paths(sources_run):
    work = sources_run[0]
    paths = _all_features(work, "vgg_paths")
    mirror = _all_features(work, "vgg_mirror")
    hub = _all_features(work, "vgg_hub")
    served = [clip_id(y, s) for y, s, _ in CLIPS[:5] + CLIPS[7:8]]
    assert set(paths) == set(served)
    for cid in served:
        assert mirror[cid] == paths[cid], cid
    assert set(hub) == set(served[:4])
    for cid in served[:4]:
        assert hub[cid] == paths[cid], cid
    status = pd.read_csv(work / "results" / "vgg_hub" / "status.csv", keep_default_na=False)
    assert (status["status"] == "ok").all() and (status["source_name"] == "hub").all()


@pytest.mark.slow
def test_msrvtt_preset_reads_its_archive_and_fills_table_3(sources_run):
    work = sources_run[0]
    status = pd.read_csv(work / "results" / "msrvtt" / "status.csv", keep_default_na=False).set_index("clip_id")
    assert status.loc[[f"video{n}" for n in range(7000, 7005)], "status"].eq("ok").all()
    assert status.loc["video9999", ["status", "source_name"]].tolist() == ["unavailable", "none"]
    assert not (work / "data" / "msrvtt" / "archive").exists()  # read member by member, never unpacked
    metrics = json.loads((work / "results" / "retrieval" / "msrvtt" / "metrics.json").read_text())
    assert metrics["clips"] == 5
    table = pd.read_csv(work / "results" / "tables" / "table3.csv")
    ours = table[table["row"].str.startswith("MSR-VTT") & table["ours"].notna()]
    assert len(ours) == 6  # V2A and A2V R@1, 5, 10
