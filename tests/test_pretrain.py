"""Pre-training (equiav.train.pretrain, equiav.train.data) on a tiny generated HDF5 data set.

What a user relies on: a run writes its weights and metrics; a killed run resumes and makes
exactly the steps the uninterrupted run makes; SIGTERM saves and exits non-zero without the
final output; two gloo processes train the same model as one process on the same global batch.
Runs share one data set and, where they compare, one reference run (module-scoped fixtures).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision.io
from conftest import RELEASE_SWITCHES

from equiav.augment import AudioAugmentConfig
from equiav.cli import main as equiav_main
from equiav.data.features import FeatureSettings
from equiav.data.store import FeatureDataset, ShardWriter
from equiav.losses import EquiAVLoss
from equiav.model import EquiAV, ModelConfig
from equiav.settings.pretrain import AUDIO_AUGMENT_SWITCHES, PretrainSettings
from equiav.train.checkpoint import Checkpointer, load_export
from equiav.train.common import DistInfo
from equiav.train.data import DeviceAugmenter, GlobalBatchSampler, PretrainDataset
from equiav.train.pretrain import (
    METRICS,
    Pretrainer,
    _phase,
    _PhaseObjective,
)

REPO = Path(__file__).resolve().parents[1]
FEATURES = FeatureSettings(num_mel_bins=16, target_frames=64, num_frames=3, frame_size=32)
CLIPS_PER_SHARD = 12  # 24 clips, global batch 8: 3 steps per epoch
MODEL = {"preset": "tiny", "audio_frames": 64, "audio_freq_bins": 16, "image_size": 32, "patch_size": 8}
BASE = {
    "model": MODEL,
    "mae_weights": None,
    "epochs": 10,
    "batch_size": 8,
    "warmup_epochs": 1,
    "num_workers": 0,
    "log_every": 1,
    "checkpoint_every": 2,
    "augment_chunk": 2,
}
# Columns that measure time, not computation: they differ between any two runs.
TIMING = {"samples_per_s", "tflops"}


# --------------------------------------------------------------------------- fixtures


def _jpeg(rng: np.random.Generator) -> bytes:
    image = torch.from_numpy(rng.integers(0, 256, size=(3, FEATURES.frame_size, FEATURES.frame_size), dtype=np.uint8))
    return bytes(torchvision.io.encode_jpeg(image, quality=90).numpy())


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two shards of random clips (plus two eval clips that training must skip), usable.csv and
    norm_stats.json as the data stage writes them."""
    root = tmp_path_factory.mktemp("features")
    rng = np.random.default_rng(0)
    rows = []
    for shard in range(2):
        path = root / f"{shard:05d}.h5"
        with ShardWriter(path, FEATURES) as writer:
            for k in range(CLIPS_PER_SHARD + 1):
                clip_id, split = f"clip{shard}_{k}", "train" if k < CLIPS_PER_SHARD else "eval"
                fbank = rng.normal(-5.0, 3.0, size=(FEATURES.target_frames, FEATURES.num_mel_bins))
                frames = [_jpeg(rng) for _ in range(FEATURES.num_frames)]
                labels = "/m/a" if k % 2 else "/m/b;/m/c"
                writer.add(clip_id, split, labels, fbank, FEATURES.target_frames, frames, 16000, 25.0, 0.64)
                rows.append({"clip_id": clip_id, "split": split, "labels": labels, "h5": str(path)})
    pd.DataFrame(rows).to_csv(root / "usable.csv", index=False)
    (root / "norm_stats.json").write_text(json.dumps({"use": "measured", "mean": -5.0, "std": 3.0}))
    return {"usable": root / "usable.csv", "norm": root / "norm_stats.json", "root": root}


def _argv(data: dict[str, Path], run: Path, settings: dict[str, Any], max_steps: int | None = None) -> list[str]:
    argv = [
        "--settings", json.dumps(settings),
        "--usable", str(data["usable"]),
        "--norm-stats", str(data["norm"]),
        "--out", str(run / "out" / "model.pt"),
        "--work-dir", str(run / "work"),
    ]  # fmt: skip
    return argv + (["--max-steps", str(max_steps)] if max_steps else [])


def _metrics(run: Path) -> list[dict[str, str]]:
    with (run / "work" / "metrics.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _computed(rows: list[dict[str, str]]) -> list[dict[str, str]]:
    """The columns that must be identical between runs that make the same steps."""
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def reference(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted single-process run: 12 of the schedule's 30 steps (10 epochs)."""
    run = tmp_path_factory.mktemp("reference")
    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=12)]) == 0
    return run


@pytest.fixture(scope="module")
def first_steps(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference settings stopped by --max-steps 4 (mid-epoch: 3 steps per epoch)."""
    run = tmp_path_factory.mktemp("first_steps")
    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=4)]) == 0
    return run


def _python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def _start(
    data: dict[str, Path], run: Path, settings: dict[str, Any], max_steps: int | None = None
) -> subprocess.Popen:
    run.mkdir(parents=True, exist_ok=True)
    with (run / "output.txt").open("w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "equiav", "pretrain", *_argv(data, run, settings, max_steps)],
            cwd=REPO, env=_python_env(), stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


def _wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"the run ended (code {process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


# --------------------------------------------------------------------------- runs


def test_smoke_run_writes_weights_and_metrics(reference: Path):
    weights = load_export(reference / "out" / "model.pt")
    assert weights["steps"] == 12 and weights["total_steps"] == 30
    assert weights["norm_stats"]["mean"] == -5.0
    assert PretrainSettings.from_dict(weights["settings"]) == PretrainSettings.from_dict(BASE)
    assert isinstance(weights["code_revision"], str)
    model = EquiAV(ModelConfig.from_dict(weights["model_config"]))
    model.load_state_dict(weights["model"])  # strict: the unwrapped model's keys

    rows = _metrics(reference)
    assert list(rows[0]) == ["step", *METRICS]
    assert [int(r["step"]) for r in rows] == list(range(12))
    losses = [float(r["loss"]) for r in rows]
    assert all(np.isfinite(losses))
    terms = [float(rows[0][k]) for k in ("inter", "intra_audio", "intra_visual")]
    assert losses[0] == pytest.approx(sum(terms), rel=1e-5)  # all weights 1
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(1e-6) and lrs[3] == pytest.approx(1e-4)  # warm-up: 1 epoch = 3 steps
    assert float(rows[-1]["epoch"]) == pytest.approx(4.0)
    config = json.loads((reference / "work" / "config.json").read_text())
    assert config["data"]["clips"] == 2 * CLIPS_PER_SHARD  # the eval clips are not trained on
    assert sorted(p.name for p in (reference / "work" / "checkpoints").iterdir()) == [
        "checkpoint-000000010.pt",
        "checkpoint-000000012.pt",
    ]


def test_resume_mid_epoch_equals_the_uninterrupted_run(data: dict[str, Path], reference: Path, tmp_path: Path):
    run = tmp_path / "resumed"
    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=4)]) == 0  # stops mid-epoch with a checkpoint
    assert equiav_main(["pretrain", *_argv(data, run, {**BASE, "num_workers": 1}, max_steps=12)]) == 0  # may change
    assert _computed(_metrics(run)) == _computed(_metrics(reference))
    ours, theirs = (
        load_export(run / "out" / "model.pt")["model"],
        load_export(reference / "out" / "model.pt")["model"],
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigkill_then_restart_resumes_exactly(data: dict[str, Path], reference: Path, tmp_path: Path):
    run = tmp_path / "killed"
    process = _start(data, run, BASE, max_steps=12)
    checkpoints = Checkpointer(run / "work" / "checkpoints")
    _wait_for(lambda: checkpoints.latest() is not None, process, "the first checkpoint")
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (run / "out" / "model.pt").exists()
    killed_at = checkpoints.load(checkpoints.latest())["step"]
    assert killed_at < 12

    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=12)]) == 0
    assert json.loads((run / "work" / "config.json").read_text())["resumed_from"]
    assert _computed(_metrics(run)) == _computed(_metrics(reference))  # no duplicate or missing step
    ours, theirs = (
        load_export(run / "out" / "model.pt")["model"],
        load_export(reference / "out" / "model.pt")["model"],
    )
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def test_sigterm_saves_a_checkpoint_and_exits_without_output(data: dict[str, Path], reference: Path, tmp_path: Path):
    run = tmp_path / "terminated"
    settings = {**BASE, "checkpoint_every": 1000}  # only the signal makes a checkpoint
    process = _start(data, run, settings, max_steps=12)
    metrics = run / "work" / "metrics.csv"
    _wait_for(lambda: metrics.exists() and len(metrics.read_text().splitlines()) >= 3, process, "two logged steps")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert not (run / "out" / "model.pt").exists()
    checkpoints = Checkpointer(run / "work" / "checkpoints")
    state = checkpoints.load(checkpoints.latest())
    logged = [int(r["step"]) for r in _metrics(run)]
    assert state["step"] == logged[-1] + 1 < 12  # saved at the end of the last finished step

    # Resuming with the reference's checkpoint_every (allowed to change) ends where it does.
    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=12)]) == 0
    assert _computed(_metrics(run)) == _computed(_metrics(reference))


def test_two_gloo_processes_equal_one_process(data: dict[str, Path], first_steps: Path, tmp_path: Path):
    run = tmp_path / "ddp"
    env = {**_python_env(), "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "equiav", "pretrain", *_argv(data, run, BASE, max_steps=4),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    two, one = _metrics(run), _metrics(first_steps)
    assert [r["step"] for r in two] == [r["step"] for r in one] == ["0", "1", "2", "3"]
    for a, b in zip(two, one, strict=True):
        for key in ("loss", "inter", "intra_audio", "intra_visual", "acc_inter", "grad_norm", "lr"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4, abs=1e-6), (a["step"], key)
    ours, theirs = (
        load_export(run / "out" / "model.pt")["model"],
        load_export(first_steps / "out" / "model.pt")["model"],
    )
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-4, atol=1e-5, msg=key)
    assert json.loads((run / "work" / "config.json").read_text())["world_size"] == 2


def test_resume_refuses_changed_settings(data: dict[str, Path], first_steps: Path, tmp_path: Path):
    run = tmp_path / "changed"
    assert equiav_main(["pretrain", *_argv(data, run, BASE, max_steps=2)]) == 0
    with pytest.raises(RuntimeError, match=r"settings\.lr: 0\.0001 in the checkpoint, 0\.0002 now"):
        equiav_main(["pretrain", *_argv(data, run, {**BASE, "lr": 2e-4}, max_steps=4)])


# --------------------------------------------------------------------------- settings


def test_settings_defaults_are_the_paper_recipe_and_unknown_keys_fail():
    s = PretrainSettings()
    assert (s.epochs, s.batch_size, s.lr, s.start_lr, s.min_lr, s.warmup_epochs) == (20, 256, 1e-4, 1e-6, 1e-6, 2)
    assert (s.weight_decay, s.betas, s.clip_grad, s.temperature) == (1e-5, (0.9, 0.95), 0.01, 0.07)
    assert s.model_config() == ModelConfig.vit_base()
    assert PretrainSettings.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="'epoch'"):
        PretrainSettings.from_dict({"epoch": 3})
    with pytest.raises(ValueError, match="strategy='sequential'"):
        PretrainSettings.from_dict({"strategy": "sequential"})
    with pytest.raises(ValueError, match="weight_inter"):
        PretrainSettings.from_dict({"strategy": "two_stage", "weight_inter": 0})
    with pytest.raises(ValueError, match=r"\['train'\]"):
        PretrainSettings.from_dict({"splits": "train"})
    with pytest.raises(ValueError, match="unknown model setting"):
        PretrainSettings.from_dict({"model": {"preset": "tiny", "width": 3}})


def _trainer(data: dict[str, Path], work: Path, settings: dict[str, Any]) -> Pretrainer:
    """A Pretrainer built as `main` builds it, from settings as the workflow passes them (JSON)."""
    cpu = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), is_main=True)
    parsed = PretrainSettings.from_dict(json.loads(json.dumps(settings)))
    return Pretrainer(
        parsed, usable=data["usable"], norm_stats=data["norm"], out=work / "model.pt", work_dir=work, info=cpu
    )


@pytest.mark.parametrize("switch", RELEASE_SWITCHES)
def test_each_audio_augment_switch_reaches_the_training_augmentation(
    data: dict[str, Path], tmp_path: Path, switch: str
):
    trainer = _trainer(data, tmp_path, {**BASE, "audio_augment": {switch: True}})
    config = trainer.augmenter.audio.config
    assert {name: getattr(config, name) for name in RELEASE_SWITCHES} == {
        name: name == switch for name in RELEASE_SWITCHES
    }
    # Recorded with every switch spelt out (config.json, checkpoints, the exported weights).
    assert trainer.resolved["settings"]["audio_augment"] == {name: name == switch for name in RELEASE_SWITCHES}


def test_release_mask_units_from_the_settings_change_the_drawn_params(data: dict[str, Path], tmp_path: Path):
    batch = _batch(8)
    fixed = _trainer(data, tmp_path / "fixed", BASE).augmenter(batch, step=0, offset=0)
    release = _trainer(data, tmp_path / "release", {**BASE, "audio_augment": {"release_mask_units": True}})
    raw = release.augmenter(batch, step=0, offset=0)
    # Slots 1 - 4: mask bounds, divided by T and F (the fix) or raw frame and bin indices.
    assert fixed.audio_params[:, 1:5].max() <= 1 < raw.audio_params[:, 1:5].max()
    assert torch.equal(fixed.audio_params[:, 0], raw.audio_params[:, 0])  # the same draws


def test_audio_augment_settings_default_to_the_fixes_and_refuse_unknown_keys():
    assert AUDIO_AUGMENT_SWITCHES == RELEASE_SWITCHES
    s = PretrainSettings()
    assert s.audio_augment == {name: False for name in RELEASE_SWITCHES}
    assert s.audio_augment_config() == AudioAugmentConfig()
    t = PretrainSettings.from_dict({"audio_augment": {"release_clamp": True}})
    assert PretrainSettings.from_dict(t.to_dict()) == t and t != s
    with pytest.raises(ValueError, match="unknown audio_augment setting.*'release_clamps'"):
        PretrainSettings.from_dict({"audio_augment": {"release_clamps": True}})
    with pytest.raises(ValueError, match="unknown audio_augment setting.*'flip_axis'"):
        PretrainSettings.from_dict({"audio_augment": {"flip_axis": "freq"}})  # a distribution, not a switch
    with pytest.raises(ValueError, match="audio_augment.release_clamp must be true or false, got 'yes'"):
        PretrainSettings.from_dict({"audio_augment": {"release_clamp": "yes"}})
    with pytest.raises(ValueError, match="audio_augment must be a mapping"):
        PretrainSettings.from_dict({"audio_augment": ["release_clamp"]})


def test_phases_of_the_strategies():
    assert {_phase("joint", i, 10) for i in range(10)} == {"joint"}
    assert [_phase("two_stage", i, 10) for i in range(10)] == ["intra"] * 5 + ["inter"] * 5
    assert [_phase("alternating", i, 10) for i in range(4)] == ["intra", "inter", "intra", "inter"]


def test_a_phase_updates_only_the_parameters_its_terms_reach():
    torch.manual_seed(0)
    config = ModelConfig.tiny(audio_frames=32, audio_freq_bins=16, image_size=32, patch_size=8, centroid_samples=2)
    model = EquiAV(config)
    criterion = EquiAVLoss()
    parameters = list(model.parameters())
    objective = _PhaseObjective(criterion, parameters)
    b = 4
    inputs = (
        torch.randn(b, 32, 16), torch.randn(b, 3, 32, 32), torch.randn(b, 32, 16), torch.randn(b, 3, 32, 32),
        torch.randn(b, 24), torch.randn(b, 18), torch.randn(b, 2, 24), torch.randn(b, 2, 18),
    )  # fmt: skip
    named = dict(model.named_parameters())
    for phase, trained, untouched in (
        ("intra", "audio_intra_head.fc1.weight", "audio_inter_head.fc1.weight"),
        ("inter", "visual_inter_head.fc1.weight", "visual_encoder.norm_aug.weight"),
    ):
        model.zero_grad(set_to_none=True)
        objective(criterion(model(*inputs)), phase).backward()
        assert named[untouched].grad is not None  # every parameter gets a gradient (DDP needs it)
        objective.drop_inactive_gradients(phase)
        assert named[untouched].grad is None  # ... but AdamW does not see the inactive ones
        assert named[trained].grad is not None and named[trained].grad.abs().sum() > 0
        assert named["audio_encoder.blocks.0.attn.qkv.weight"].grad is not None


# --------------------------------------------------------------------------- data


def test_global_batches_are_split_contiguously_across_ranks():
    one = GlobalBatchSampler(20, 8, rank=0, world_size=1, seed=3)
    ranks = [GlobalBatchSampler(20, 8, rank=r, world_size=2, seed=3) for r in range(2)]
    one.set_epoch(1)
    for r in ranks:
        r.set_epoch(1)
    batches = list(one)
    assert len(batches) == one.batches_per_epoch == 2  # the incomplete third batch is dropped
    split = [list(r) for r in ranks]
    for k, batch in enumerate(batches):
        assert split[0][k] + split[1][k] == batch  # rank order rebuilds the global batch
    one.set_epoch(1, start_batch=1)
    assert list(one) == batches[1:]  # resuming skips the consumed batches
    one.set_epoch(2)
    assert list(one) != batches  # a new order per epoch
    assert {epoch for batch in batches for _, epoch in batch} == {1}
    with pytest.raises(ValueError, match="does not divide among 3"):
        GlobalBatchSampler(20, 8, rank=0, world_size=3, seed=0)


def _features(data: dict[str, Path]) -> FeatureDataset:
    shards = sorted(data["root"].glob("*.h5"))
    return FeatureDataset(shards, ["/m/a", "/m/b", "/m/c"], mean=-5.0, std=3.0, splits=["train"], frame="random")


def test_frames_are_drawn_per_clip_and_epoch_reproducibly(data: dict[str, Path]):
    dataset = PretrainDataset(_features(data), seed=0)
    first = dataset[(5, 0)]
    assert "frames_aug" not in first  # the augmented view uses the clean view's frame
    assert torch.equal(first["frames"], dataset[(5, 0)]["frames"])
    state = torch.get_rng_state()
    drawn = {bytes(dataset[(5, epoch)]["frames"].flatten()[:64].numpy()) for epoch in range(12)}
    assert len(drawn) > 1  # another epoch, another of the 3 frames
    assert torch.equal(state, torch.get_rng_state())  # the global generator is left alone

    independent = PretrainDataset(_features(data), seed=0, independent_visual_frame=True)
    items = [independent[(i, 0)] for i in range(12)]
    assert any(not torch.equal(it["frames"], it["frames_aug"]) for it in items)
    assert torch.equal(items[5]["frames"], first["frames"])


def _batch(rows: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "fbank": torch.randn(rows, 64, 16, generator=g),
        "frames": torch.randint(0, 256, (rows, 3, 32, 32), generator=g, dtype=torch.uint8),
    }


def test_augmentation_does_not_depend_on_the_batch_split():
    augmenter = DeviceAugmenter(seed=0, image_size=32, centroid_samples=4, chunk=2, device=torch.device("cpu"))
    batch = _batch(8)
    whole = augmenter(batch, step=7, offset=0)
    halves = [augmenter({k: v[4 * r : 4 * r + 4] for k, v in batch.items()}, step=7, offset=4 * r) for r in range(2)]
    for field in ("audio_aug", "visual_aug", "audio_params", "visual_params", "audio_centroid", "visual_centroid"):
        joined = torch.cat([getattr(h, field) for h in halves])
        assert torch.equal(getattr(whole, field), joined), field
    assert whole.audio_centroid.shape == (8, 4, 24) and whole.visual_centroid.shape == (8, 4, 18)
    assert whole.visual.dtype == torch.float32 and whole.visual_aug.shape == (8, 3, 32, 32)
    assert not torch.equal(augmenter(batch, step=8, offset=0).audio_params, whole.audio_params)
    with pytest.raises(ValueError, match="augment_chunk among"):
        DeviceAugmenter(seed=0, image_size=32, centroid_samples=4, chunk=3, device=torch.device("cpu")).check_batch(8)


def test_augmented_view_uses_the_given_frame():
    augmenter = DeviceAugmenter(seed=0, image_size=32, centroid_samples=1, chunk=4, device=torch.device("cpu"))
    black = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
    batch = {"fbank": torch.randn(4, 64, 16), "frames": black}
    # Crop, jitter, blur, flip and grayscale keep a black frame black: below the ImageNet mean.
    assert (augmenter(batch, 0, 0).visual_aug < 0).all()
    white = torch.full_like(black, 255)
    views = augmenter({**batch, "frames_aug": white}, 0, 0)
    assert (views.visual < 0).all() and (views.visual_aug > 0).all()
