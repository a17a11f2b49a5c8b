"""Every starting point in one DAG: a checkpoint in the authors' release layout, MAE weights in
timm's key names, a random initialisation and a model pre-trained here, fine-tuned on the demo
set and an ESC-50-layout set (audio only) and evaluated by retrieval, to the tables' rows.

One Snakemake run (from another working directory, with --directory) serves the checks; a second
call adds a run whose fold the list lacks and must stop before that run's training job.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import yaml
from data_sets import esc50_folder
from safetensors.torch import save_file
from workflow_runner import REPO, snakemake

from equiav.model import EquiAV, ModelConfig, to_release_state_dict

PROFILE = str(REPO / "workflow" / "profiles" / "default")
TINY = {"preset": "tiny", "audio_frames": 304}  # the demo's spectrograms
QUICK = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "precision": "fp32", "num_workers": 0}
STARTS = ("released", "mae", "scratch")


def release_checkpoint(path: Path) -> Path:
    """A tiny EquiAV saved in the release's layout (``__M__.`` keys, 3-channel audio kernel)."""
    torch.manual_seed(7)
    config = ModelConfig.tiny(audio_frames=304)
    torch.save(to_release_state_dict(EquiAV(config).state_dict(), config), path)
    return path


def mae_weights(path: Path) -> Path:
    """A ViT of the tiny towers' size with timm's key names, as timm's model.safetensors holds them."""
    torch.manual_seed(8)
    vit = timm.models.vision_transformer.VisionTransformer(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    return path


def configuration(work: Path) -> dict:
    esc50 = {"recipe": "esc50", "dataset": "esc50", "settings": QUICK, "resources": {"gpus": 0}}
    # The demo's own fine-tuning recipe (config.yaml), shortened.
    demo_settings = yaml.safe_load((REPO / "config.yaml").read_text())["finetune"]["demo_audiovisual"]["settings"]
    demo_av = {"dataset": "demo", "settings": {**demo_settings, **QUICK}, "resources": {"gpus": 0}}
    return {
        "results_dir": "results",
        "data_dir": "data",
        "run": ["demo", "esc50"],
        "demo": {"classes": 3, "train_per_class": 4, "test_per_class": 2},
        "datasets": {
            "demo": {"shard_size": 8},
            "esc50": {"archive": {"path": str(work / "ESC-50")}, "shard_size": 10, "features": {"target_frames": 64}},
        },
        "pretrain": {
            "demo": {"settings": {"epochs": 1, "batch_size": 4, "warmup_epochs": 0}},  # trained here
            # Relative paths are read in the working directory (--directory).
            "released": {"import": {"type": "release", "path": "released.pth", "model": TINY}},
            "mae": {"import": {"type": "mae", "path": "mae_tiny.safetensors", "model": TINY, "seed": 1}},
            "scratch": {"import": {"type": "scratch", "model": TINY, "seed": 2}},
        },
        "finetune": {
            **{run: {"settings": QUICK} for run in ("demo_audio", "demo_visual", "demo_audiovisual")},
            **{f"demo_audiovisual-{start}": {**demo_av, "pretrained": start} for start in STARTS},
            **{f"esc50_audio-{start}": {**esc50, "pretrained": start} for start in STARTS},
        },
        "retrieval": {
            "demo": {"samples": 2, "report": {"candidates": 4}},
            "demo-released": {
                "pretrained": "released",
                "dataset": "demo",
                "split": "test",
                "per_class": 0,
                "samples": 2,
                "resources": {"gpus": 0},
                "report": {"candidates": 4},
            },
        },  # fmt: skip
    }


@pytest.fixture(scope="module")
def starts_run(tmp_path_factory):
    top = tmp_path_factory.mktemp("starts")
    work = top / "work"
    work.mkdir()
    esc50_folder(work / "ESC-50")
    release_checkpoint(work / "released.pth")
    mae_weights(work / "mae_tiny.safetensors")
    config = work / "starts.yaml"
    config.write_text(yaml.safe_dump(configuration(work)))
    # The ESC-50 preset first, as the README says; from another folder, as cluster users run it.
    args = ["--profile", PROFILE, "--cores", "2", "--directory", str(work),
            "--configfile", str(REPO / "workflow" / "presets" / "esc50.yaml"), str(config)]  # fmt: skip
    snakemake(*args, cwd=top, timeout=1500)
    return work, args, top


def cells(work: Path, table: str) -> pd.DataFrame:
    frame = pd.read_csv(work / "results" / "tables" / f"{table}.csv")
    return frame[frame["kind"] == "ours"]


@pytest.mark.slow
def test_the_tables_show_one_row_per_starting_point(starts_run):
    work, _, _ = starts_run
    demo = cells(work, "demo")
    av = demo[demo["column"] == "A-V accuracy"].set_index("start")
    assert sorted(av.index) == ["demo", "mae", "released", "scratch"]
    assert av["ours"].notna().all()
    assert av.loc["released", "row"] == "EquiAV (tiny, demo) · from released (the authors' released checkpoint)"
    assert av.loc["mae", "row"].endswith("· from mae (MAE ImageNet weights, no EquiAV pre-training)")
    assert av.loc["scratch", "row"].endswith("· from scratch (random initialisation, no pre-training)")
    assert av.loc["demo", "row"].endswith("· from demo (pre-trained here)")
    assert av.loc["mae", "run"] == "demo_audiovisual-mae"
    # Retrieval fills the rows of its own starting points: the trained model and the release.
    r1 = demo[demo["column"] == "V2A R@1"].set_index("start")
    assert r1.loc[["demo", "released"], "ours"].notna().all() and pd.isna(r1.loc["mae", "ours"])

    # ESC-50 (audio only) from each imported starting point, with no pre-training on it.
    esc = cells(work, "table2")
    esc = esc[esc["column"] == "ESC-50"].set_index("start")
    assert sorted(esc.index) == sorted(STARTS) and esc["ours"].notna().all()
    metrics = json.loads((work / "results" / "finetune" / "esc50_audio-mae" / "metrics.json").read_text())
    assert sorted(metrics["folds"]) == [f"fold{k}" for k in range(1, 6)]
    assert metrics["start"]["type"] == "mae" and metrics["start"]["run"] == "mae"
    text = (work / "results" / "tables" / "table2.md").read_text()
    assert "| EquiAV · from released (the authors' released checkpoint) |" in text
    # The summary names each run's starting point too.
    summary = pd.read_csv(work / "results" / "summary.csv").drop_duplicates("run").set_index("run")["start"]
    assert summary["esc50_audio-released"] == "released" and summary["demo_audio"] == "demo"
    assert "| demo_audiovisual-scratch | scratch | finetune |" in (work / "results" / "summary.md").read_text()
    # No pre-training job for the imports: their folders hold only the model and its log.
    for start in STARTS:
        assert sorted(p.name for p in (work / "results" / "pretrain" / start).iterdir()) == ["import.log", "model.pt"]
    logs = {start: (work / "results" / "pretrain" / start / "import.log").read_text() for start in STARTS}
    assert re.search(r"INFO equiav\.train\.imported: wrote .+model\.pt: release model \(\d+ parameters\) from /",
                     logs["released"]), logs["released"]  # fmt: skip
    assert re.search(r"INFO equiav\.train\.imported: wrote .+: scratch model .+ from seed \d+", logs["scratch"])


@pytest.mark.slow
def test_the_imported_release_embeds_as_equiav_embed_release(starts_run, tmp_path):
    work, _, _ = starts_run
    clips = sorted((work / "data" / "demo" / "generated").rglob("*.mp4"))[:3]
    assert clips

    def embed(out: Path, *model: str) -> dict[str, np.ndarray]:
        command = [sys.executable, "-m", "equiav", "embed", *map(str, clips), "--out", str(out), *model]
        subprocess.run(command, check=True, capture_output=True, cwd=work)
        with np.load(out) as arrays:
            return {k: arrays[k] for k in arrays.files}

    imported = embed(tmp_path / "imported.npz", "--pretrained", "results/pretrain/released/model.pt")
    release = embed(tmp_path / "release.npz", "--pretrained", "released.pth", "--release", "--model", json.dumps(TINY))
    assert imported.keys() == release.keys()
    vectors = ("audio_pooled", "visual_pooled", "audio_inter", "visual_inter")
    assert imported["audio_inter"].shape[0] == len(clips) and not imported["failed_paths"].size
    for key in (*vectors, "clip_ids"):
        assert np.array_equal(imported[key], release[key]), key


@pytest.mark.slow
def test_a_fold_the_list_lacks_stops_before_that_runs_training(starts_run):
    work, args, top = starts_run
    bad = work / "bad.yaml"
    bad.write_text(yaml.safe_dump({"finetune": {"esc50_audio-folds": {
        "recipe": "esc50", "dataset": "esc50", "pretrained": "scratch", "resources": {"gpus": 0},
        "settings": {**QUICK, "folds": ["fold1", "fold6"]},
    }}}))  # fmt: skip
    proc = snakemake(*args, str(bad), cwd=top, check=False, timeout=600)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "finetune.esc50_audio-folds reads split(s) 'fold6'" in output
    assert "'finetune.esc50_audio-folds.settings.folds'" in output
    assert "fold1 (2)" in output  # the splits the manifest has
    assert not (work / "data" / "finetune" / "esc50_audio-folds").exists()  # its training never started
    assert not (work / "results" / "finetune" / "esc50_audio-folds" / "finetune.log").exists()


@pytest.mark.slow
def test_pre_training_on_an_audio_only_set_is_refused_before_any_job(tmp_path):
    config = tmp_path / "pretrain_esc50.yaml"
    config.write_text(yaml.safe_dump({
        "results_dir": "results", "data_dir": "data",
        "datasets": {"esc50": {"archive": {"path": str(esc50_folder(tmp_path / "ESC-50"))}}},
        "pretrain": {"on_esc50": {"dataset": "esc50", "settings": {"mae_weights": None}}},
    }))  # fmt: skip
    proc = snakemake("--profile", PROFILE, "--cores", "1", "--directory", str(tmp_path), "--configfile",
                     str(REPO / "workflow" / "presets" / "esc50.yaml"), str(config), cwd=REPO, check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "config key 'pretrain.on_esc50.dataset': data set 'esc50' is audio-only" in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "data").exists()  # no job ran
