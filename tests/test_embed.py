"""`equiav embed` / `equiav retrieve` (equiav/embed.py).

Fast tests run a randomly initialised tiny model exported like the pre-train stage's model.pt;
the slow test pre-trains the tiny model on a small generated demo set with the real
pre-training entry point and checks that the embeddings pair each clip's sound with its picture.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_clip

from equiav.cli import main as equiav_main
from equiav.data.demo import DemoSettings, generate_demo, make_demo_clip
from equiav.data.features import FeatureSettings, extract_shard
from equiav.data.store import compute_norm_stats
from equiav.embed import (
    AUDIOSET_MEAN,
    AUDIOSET_STD,
    EmbedOptions,
    embed_files,
    load_embedding_model,
    load_embeddings,
    rank_clips,
    save_embeddings,
)
from equiav.model import EquiAV, ModelConfig, to_release_state_dict
from equiav.train.checkpoint import export_weights

# Tiny sizes: 128 mel bins (the release's 8 patch rows) x 64 frames (0.64 s of audio), 32 px pictures.
TINY = ModelConfig.tiny(audio_frames=64, image_size=32)
NORM = {"mean": -6.0, "std": 3.0}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    export_weights(EquiAV(TINY), path, config=TINY.to_dict(), extra={"norm_stats": NORM, "steps": 0})
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A folder with two good clips, one without audio and one without video."""
    folder = tmp_path_factory.mktemp("clips")
    return {
        "low": make_clip(folder / "low.mp4", 1.0, audio_expr="0.5*sin(2*PI*300*t)"),
        "high": make_clip(folder / "high.mp4", 1.0, audio_expr="0.5*sin(2*PI*2000*t)", luma="200"),
        "silent": make_clip(folder / "silent.mp4", 1.0, with_audio=False),
        "blind": make_clip(folder / "blind.mkv", 1.0, with_video=False),
    }


def test_embeds_good_clips_and_reports_the_others(tiny_checkpoint: Path, clips: dict[str, Path]) -> None:
    emb = embed_files([clips["low"].parent], tiny_checkpoint, EmbedOptions(samples=4))
    assert emb.clip_ids == ["high", "low"]  # a folder's videos, sorted by name
    assert emb.audio_inter.shape == emb.visual_inter.shape == (2, TINY.embed_out)
    assert emb.audio_pooled.shape == emb.visual_pooled.shape == (2, TINY.embed_dim)
    assert all(np.isfinite(getattr(emb, n)).all() for n in ("audio_inter", "visual_inter"))
    failures = {Path(path).name: (status, message) for path, status, message in emb.failures}
    assert failures.keys() == {"silent.mp4", "blind.mkv"}
    assert failures["silent.mp4"][0] == "no-audio" and "no audio stream" in failures["silent.mp4"][1]
    assert failures["blind.mkv"][0] == "no-video" and "no video stream" in failures["blind.mkv"][1]
    assert emb.info["norm_mean"] == NORM["mean"] and emb.info["norm_std"] == NORM["std"]


def test_a_clip_embeds_the_same_alone_or_among_others(tiny_checkpoint: Path, clips: dict[str, Path]) -> None:
    together = embed_files([clips["high"], clips["low"]], tiny_checkpoint, EmbedOptions(samples=4, batch_size=1))
    alone = embed_files([clips["low"]], tiny_checkpoint, EmbedOptions(samples=4))
    for name in ("audio_inter", "visual_inter", "audio_pooled", "visual_pooled"):
        np.testing.assert_allclose(getattr(together, name)[1], getattr(alone, name)[0], rtol=1e-5, atol=1e-6)
    other_seed = embed_files([clips["low"]], tiny_checkpoint, EmbedOptions(samples=4, seed=1))
    assert not np.allclose(other_seed.audio_inter, alone.audio_inter)  # the centroid vectors differ
    np.testing.assert_allclose(other_seed.audio_pooled, alone.audio_pooled, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(tiny_checkpoint: Path, clips: dict[str, Path], tmp_path: Path) -> None:
    emb = embed_files([clips["low"].parent], tiny_checkpoint, EmbedOptions(samples=2))
    back = load_embeddings(save_embeddings(emb, tmp_path / "e.npz"))
    assert back.clip_ids == emb.clip_ids and back.paths == emb.paths and back.failures == emb.failures
    np.testing.assert_array_equal(back.visual_inter, emb.visual_inter)
    assert back.info == json.loads(json.dumps(emb.info))
    with pytest.raises(ValueError, match=r"\.npz"):
        save_embeddings(emb, tmp_path / "e.pt")


def test_release_checkpoint_falls_back_to_audioset_stats(
    tiny_checkpoint: Path, clips: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ours = load_embedding_model(tiny_checkpoint)
    release = tmp_path / "release.pth"
    torch.save(to_release_state_dict(ours.model.state_dict(), TINY), release)
    with pytest.raises(ValueError, match="--release"):
        load_embedding_model(release)
    with caplog.at_level(logging.WARNING, logger="equiav.embed"):
        converted = load_embedding_model(release, release=True, release_config=TINY)
    assert (converted.mean, converted.std) == (AUDIOSET_MEAN, AUDIOSET_STD)
    assert "AudioSet" in caplog.text
    same = load_embedding_model(tiny_checkpoint, mean=AUDIOSET_MEAN, std=AUDIOSET_STD)
    a = embed_files([clips["low"]], converted, EmbedOptions(samples=2))
    b = embed_files([clips["low"]], same, EmbedOptions(samples=2))
    np.testing.assert_allclose(a.audio_inter, b.audio_inter, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.visual_inter, b.visual_inter, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="drop --release"):
        load_embedding_model(tiny_checkpoint, release=True)


def test_clear_errors_for_bad_inputs(tiny_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a file nor a folder"):
        embed_files([tmp_path / "missing.mp4"], tiny_checkpoint)
    (tmp_path / "notes.txt").write_text("no video here")
    with pytest.raises(ValueError, match="holds no video file"):
        embed_files([tmp_path], tiny_checkpoint)
    with pytest.raises(FileNotFoundError, match="checkpoint"):
        embed_files([tmp_path / "notes.txt"], tmp_path / "nope.pt")
    with pytest.raises(ValueError, match="both mean and std"):
        load_embedding_model(tiny_checkpoint, mean=0.0)


def test_main_embed_writes_the_file_and_exit_codes(
    tiny_checkpoint: Path, clips: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "emb.npz"
    assert (
        equiav_main(["embed", str(clips["low"].parent), "--checkpoint", str(tiny_checkpoint), "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "embedded 2 clip(s)" in printed and "skipped" in printed and "no-audio" in printed
    saved = load_embeddings(out)
    assert saved.clip_ids == ["high", "low"] and sorted(s for _, s, _ in saved.failures) == ["no-audio", "no-video"]

    nothing = tmp_path / "nothing.npz"
    code = equiav_main(["embed", str(clips["silent"]), "--checkpoint", str(tiny_checkpoint), "--out", str(nothing)])
    assert code == 1 and "no clip could be embedded" in capsys.readouterr().err
    assert load_embeddings(nothing).failures[0][1] == "no-audio"  # the failures are still written
    assert (
        equiav_main(
            ["embed", str(clips["low"]), "--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "x.csv")]
        )
        == 2
    )


def test_main_retrieve_prints_a_ranking(
    tiny_checkpoint: Path, clips: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--query", str(clips["low"]), "--folder", str(clips["low"].parent), "--checkpoint", str(tiny_checkpoint)]
    assert equiav_main(["retrieve", *argv, "--direction", "v2a", "--top", "1", "--samples", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("picture of low vs the audio of 2 clip(s)")
    assert lines[1].split() == ["rank", "similarity", "clip"]
    rank, score, clip_id = lines[2].split()
    assert rank == "1" and clip_id in {"low", "high"} and -1.0 <= float(score) <= 1.0
    assert len([line for line in lines if line.startswith("skipped")]) == 2
    silent = ["--query", str(clips["silent"]), *argv[2:]]
    assert equiav_main(["retrieve", *silent]) == 1
    assert "no audio stream" in capsys.readouterr().err


# --------------------------------------------------------------------------- the demo model

DEMO = DemoSettings(classes=3, train_per_class=8, test_per_class=0, broken_clips=False, seed=0)
DEMO_FEATURES = FeatureSettings(target_frames=304, num_frames=10, frame_size=64)
DEMO_PRETRAIN = {
    "model": {"preset": "tiny", "audio_frames": 304, "image_size": 64},
    "mae_weights": None,
    "epochs": 12,  # 36 steps; the test pair is separated by >= 0.25 cosine from 6 epochs on
    "batch_size": 8,
    "lr": 1e-3,
    "warmup_epochs": 1,
    "precision": "fp32",
    "num_workers": 0,
    "log_every": 10,
    "checkpoint_every": 1000,
}


@pytest.fixture(scope="module")
def demo_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model pre-trained by `equiav pretrain` on a generated 3-class demo set."""
    root = tmp_path_factory.mktemp("demo")
    table = generate_demo(root / "generated", DEMO)
    downloads = pd.DataFrame(
        {
            "clip_id": table["clip_id"],
            "split": table["split"],
            "labels": table["labels"],
            "status": "ok",
            "file": [str(root / "generated" / "media" / f"{c}.mp4") for c in table["clip_id"]],
            "offset": table["start"],
            "duration": table["end"] - table["start"],
        }
    )
    shard = root / "features" / "00000.h5"
    shard.parent.mkdir()
    statuses = extract_shard(downloads, shard, DEMO_FEATURES, workers=4)
    assert (statuses["status"] == "ok").all()
    usable = downloads[["clip_id", "split", "labels"]].assign(h5=str(shard))
    usable.to_csv(root / "usable.csv", index=False)
    stats = compute_norm_stats([shard], ["train"])
    (root / "norm_stats.json").write_text(json.dumps({"use": "measured", **stats}))
    out = root / "model.pt"
    argv = [
        "--settings", json.dumps(DEMO_PRETRAIN),
        "--usable", str(root / "usable.csv"),
        "--norm-stats", str(root / "norm_stats.json"),
        "--out", str(out),
        "--work-dir", str(root / "work"),
    ]  # fmt: skip
    assert equiav_main(["pretrain", *argv]) == 0
    return out


@pytest.mark.slow
def test_embed_pairs_sound_and_picture_after_demo_training(demo_checkpoint: Path, tmp_path: Path) -> None:
    """Acceptance: `equiav embed` on two freshly generated clips (of classes 0 and 1, with
    signatures not in the training set) ranks each clip's own picture first for its audio."""
    folder = tmp_path / "fresh"
    folder.mkdir()
    make_demo_clip(folder / "clip-a.mp4", 0, 0.37, DEMO)
    make_demo_clip(folder / "clip-b.mp4", 1, 0.81, DEMO)
    out = tmp_path / "fresh.npz"
    assert equiav_main(["embed", str(folder), "--checkpoint", str(demo_checkpoint), "--out", str(out)]) == 0
    emb = load_embeddings(out)
    assert emb.clip_ids == ["clip-a", "clip-b"] and not emb.failures
    similarity = emb.similarity("a2v")
    assert similarity.argmax(axis=1).tolist() == [0, 1], similarity
    assert similarity.argmax(axis=0).tolist() == [0, 1], similarity  # and each picture's best audio
    assert [clip for clip, _ in rank_clips(emb, emb, direction="v2a", row=1)] == ["clip-b", "clip-a"]
