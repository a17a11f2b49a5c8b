"""Fine-tuning (equiav/train/finetune.py) and the balanced sampler (equiav/train/sampling.py),
on a tiny HDF5 data set and a tiny pre-trained model, on the CPU."""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.io
from torch.utils.data import DataLoader, DistributedSampler

from equiav.augment import IMAGENET_MEAN, IMAGENET_STD
from equiav.cli import main as equiav_main
from equiav.data.features import FeatureSettings
from equiav.data.inputs import DatasetInputs, fit_config_to_data
from equiav.data.store import ShardWriter
from equiav.metrics import mean_average_precision, top1_accuracy
from equiav.model import EquiAV, EquiAVClassifier, ModelConfig
from equiav.settings.finetune import FinetuneSettings
from equiav.train import classify, finetune_augment
from equiav.train import finetune as ft
from equiav.train.checkpoint import export_weights, load_export
from equiav.train.common import WarmupCosine
from equiav.train.finetune_augment import TrainAugment
from equiav.train.sampling import DistributedWeightedSampler, class_balanced_weights

FEATURES = FeatureSettings(num_mel_bins=32, target_frames=64, num_frames=3, frame_size=32)
CLASSES = ["/m/dog", "/m/cat", "/m/car"]
# Not representable in float16 arithmetic: a normalised fbank value is never exactly 0 unless masked.
NORM = {"mean": -4.8123, "std": 2.7311}
SPLIT_SIZES = {"train": 18, "test": 13}  # 13: two ranks get a padded (duplicated) clip


@dataclass(frozen=True)
class EvalData:
    """Paths of a tiny data set as the pipeline's stages leave it, and a tiny pre-trained model."""

    root: Path
    usable: Path
    classes: Path
    norm: Path
    pretrained: Path

    def args(self, *extra: str) -> list[str]:
        return ["--pretrained", str(self.pretrained), "--usable", str(self.usable), "--classes", str(self.classes),
                "--norm-stats", str(self.norm), *extra]  # fmt: skip


def clip_labels(k: int) -> list[str]:
    """Clip k of a split: class k % 3, and every fifth clip also the next class."""
    return [CLASSES[k % 3]] + ([CLASSES[(k + 1) % 3]] if k % 5 == 4 else [])


def prevalence(split: str) -> np.ndarray:
    """[C] fraction of the split's clips carrying each class."""
    counts = np.zeros(len(CLASSES))
    for k in range(SPLIT_SIZES[split]):
        for label in clip_labels(k):
            counts[CLASSES.index(label)] += 1
    return counts / SPLIT_SIZES[split]


def _jpeg(rng: np.random.Generator, size: int = FEATURES.frame_size) -> bytes:
    image = torch.from_numpy(rng.integers(0, 256, size=(3, size, size), dtype=np.uint8))
    return bytes(torchvision.io.encode_jpeg(image, quality=90).numpy())


def _grey_jpeg(level: int, size: int = FEATURES.frame_size) -> bytes:
    """A flat grey JPEG of ``level`` (decodes back to within +-2 at quality 95)."""
    image = torch.full((3, size, size), level, dtype=torch.uint8)
    return bytes(torchvision.io.encode_jpeg(image, quality=95).numpy())


def build_eval_data(
    root: Path,
    seed: int = 0,
    *,
    features: FeatureSettings = FEATURES,
    frame_jpeg: Callable[[np.random.Generator, int], bytes] | None = None,
) -> EvalData:
    """Two shards of clips whose fbank carries a class-specific band, JPEG frames (random unless
    ``frame_jpeg(rng, frame index)`` makes them), the usable/classes/norm files of the pipeline,
    and an exported tiny EquiAV."""
    make_frame = frame_jpeg or (lambda rng, k: _jpeg(rng, features.frame_size))
    rng = np.random.default_rng(seed)
    rows = []
    for split, count in SPLIT_SIZES.items():
        for k in range(count):
            rows.append((f"{split}_{k:03d}", split, ";".join(clip_labels(k)), k % 3))
    shards: dict[str, list[tuple[str, str, str, int]]] = {"s0.h5": rows[0::2], "s1.h5": rows[1::2]}
    usable = []
    for name, shard_rows in shards.items():
        path = root / name
        with ShardWriter(path, features) as writer:
            for clip_id, split, labels, cls in shard_rows:
                fbank = rng.normal(-5.0, 2.0, size=(features.target_frames, features.num_mel_bins))
                fbank[:, cls * 8 : cls * 8 + 8] += 4.0  # learnable from audio
                frames = [make_frame(rng, k) for k in range(features.num_frames)]
                writer.add(clip_id, split, labels, fbank, features.target_frames, frames, 16000, 10.0, 0.64)
                usable.append({"clip_id": clip_id, "source": "x", "start": 0, "end": 1, "labels": labels,
                               "split": split, "h5": str(path)})  # fmt: skip
    pd.DataFrame(usable).to_csv(root / "usable.csv", index=False)
    pd.DataFrame({"index": range(3), "id": CLASSES, "name": ["dog", "cat", "car"]}).to_csv(
        root / "classes.csv", index=False
    )
    (root / "norm_stats.json").write_text(json.dumps(NORM))
    config = ModelConfig.tiny(
        audio_frames=features.target_frames, audio_freq_bins=features.num_mel_bins, image_size=features.frame_size
    )
    torch.manual_seed(seed)
    export_weights(EquiAV(config), root / "model.pt", config=config.to_dict(), extra={"norm": dict(NORM)})
    return EvalData(root, root / "usable.csv", root / "classes.csv", root / "norm_stats.json", root / "model.pt")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(tmp_path_factory.mktemp("evaldata"))


SMOKE = dict(epochs=2, batch_size=6, num_workers=0, warmup_epochs=1, lr=1e-3, eval_frames="middle")


def run_main(
    data: EvalData, tmp_path: Path, settings: dict[str, Any], *extra: str
) -> tuple[int, dict[str, Any] | None]:
    out = tmp_path / "metrics.json"
    code = equiav_main(
        [
            "finetune",
            *data.args("--settings", json.dumps(settings), "--out", str(out), "--work-dir", str(tmp_path / "work")),
            *extra,
        ]
    )
    return code, json.loads(out.read_text()) if out.exists() else None


def read_csv(path: Path) -> list[dict[str, float]]:
    with path.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


# --------------------------------------------------------------------------- settings


def test_recipes_follow_the_paper_table() -> None:
    esc = FinetuneSettings.recipe("esc50")
    assert (esc.modality, esc.task, esc.metric, esc.epochs, esc.lr, esc.batch_size, esc.warmup_epochs, esc.mixup) == (
        "audio", "multiclass", "accuracy", 60, 5e-4, 64, 4, 0.0,
    )  # fmt: skip
    assert esc.folds == ("fold1", "fold2", "fold3", "fold4", "fold5")
    as2m = FinetuneSettings.recipe("audioset_2m", modality="visual")
    assert (as2m.batch_size, as2m.balanced_sampling, as2m.modality, as2m.metric) == (512, True, "visual", "map")
    spc = FinetuneSettings.recipe("spc_v1")
    assert (spc.task, spc.metric, spc.epochs, spc.lr) == ("multilabel", "accuracy", 10, 1e-3)
    vgg = FinetuneSettings.recipe("vggsound")
    assert (vgg.task, vgg.balanced_sampling, vgg.train_splits, vgg.eval_splits) == (
        "multiclass",
        True,
        ("train",),
        ("test",),
    )
    # The workflow passes {"recipe": name or null, **overrides}; lists become tuples.
    from_config = FinetuneSettings.from_dict(
        {"recipe": "audioset_20k", "modality": "audio", "train_splits": ["a", "b"]}
    )
    assert from_config == FinetuneSettings.recipe("audioset_20k", modality="audio", train_splits=("a", "b"))
    assert FinetuneSettings.from_dict({"recipe": None}) == FinetuneSettings()
    assert FinetuneSettings.from_dict(from_config.to_dict()) == from_config


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"epoch": 3}, "unknown FinetuneSettings key"),
        ({"recipe": "esc"}, "unknown recipe"),
        ({"modality": "video"}, "modality='video'"),
        ({"samples_per_epoch": 100}, "balanced_sampling"),
        ({"mixup": 1.5}, "mixup"),
        ({"folds": ["fold1"]}, "at least 2"),
        ({"warmup_epochs": 9, "epochs": 2}, "warmup_epochs"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FinetuneSettings.from_dict(values)


# --------------------------------------------------------------------------- main(), end to end


@pytest.mark.parametrize(
    "settings",
    [
        dict(modality="audio", task="multilabel", metric="map"),
        dict(modality="visual", task="multiclass", metric="accuracy", mixup=0.5),
        dict(
            modality="audiovisual",
            task="multilabel",
            metric="accuracy",
            balanced_sampling=True,
            samples_per_epoch=12,
            eval_frames="all",
        ),
    ],
    ids=["audio-multilabel-map", "visual-multiclass-accuracy", "audiovisual-balanced-allframes"],
)
def test_main_writes_the_documented_metrics(data: EvalData, tmp_path: Path, settings: dict[str, Any]) -> None:
    settings = {**SMOKE, "head_lr_multiplier": 10.0, "train_splits": ["train"], "eval_splits": ["test"], **settings}
    code, metrics = run_main(data, tmp_path, settings)
    assert code == 0 and metrics is not None
    assert {"task", "modality", "metric", "value", "chance", "epochs", "train_clips", "eval_clips", "history"} <= set(
        metrics
    )
    assert (metrics["task"], metrics["modality"], metrics["metric"]) == (
        "finetune",
        settings["modality"],
        settings["metric"],
    )
    assert (metrics["train_clips"], metrics["eval_clips"], metrics["epochs"]) == (18, 13, 2)
    assert 0.0 <= metrics["value"] <= 1.0
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["value"] == metrics["history"][-1]["value"]
    # Accuracy: the majority-class rate; mAP: the mean class prevalence.
    expected_chance = prevalence("test").max() if settings["metric"] == "accuracy" else prevalence("test").mean()
    assert metrics["chance"] == pytest.approx(expected_chance)
    steps_per_epoch = (settings.get("samples_per_epoch") or 18) // 6
    train_log = read_csv(tmp_path / "work" / "train.csv")
    assert [row["step"] for row in train_log] == list(range(2 * steps_per_epoch))
    # The head multiplier applies at every step (the release's scheduler overwrote it).
    for row in train_log:
        assert row["head_lr"] == pytest.approx(10.0 * row["lr"])
    assert len(read_csv(tmp_path / "work" / "eval.csv")) == 2
    assert json.loads((tmp_path / "work" / "result.json").read_text())["result"]["value"] == metrics["value"]
    assert not (tmp_path / "work" / "checkpoints").exists()


def test_fine_tuning_fits_the_class_band(data: EvalData, tmp_path: Path) -> None:
    # The training loop optimises: evaluated on its own training clips, the model separates the
    # class-specific mel band. Regularisation off: on 18 clips it keeps this tiny model from
    # fitting (and a 48-bin frequency mask would hide most of these 32-bin features).
    settings = {**SMOKE, "modality": "audio", "task": "multiclass", "metric": "accuracy", "epochs": 10,
                "warmup_epochs": 0, "mixup": 0.0, "specaugment": False, "time_shift": False, "drop_path": 0.0,
                "head_lr_multiplier": 1.0, "train_splits": ["train"], "eval_splits": ["train"]}  # fmt: skip
    _, metrics = run_main(data, tmp_path, settings)
    assert metrics["value"] == 1.0 and metrics["chance"] < 0.5
    losses = [h["eval_loss"] for h in metrics["history"]]
    assert losses[-1] < 0.5 * losses[0]


def test_two_fold_cross_validation(data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = {
        **SMOKE,
        "modality": "audio",
        "task": "multiclass",
        "metric": "accuracy",
        "epochs": 1,
        "folds": ["train", "test"],
    }
    code, metrics = run_main(data, tmp_path, settings)
    assert code == 0 and metrics is not None
    assert set(metrics["folds"]) == {"train", "test"}
    assert metrics["folds"]["train"]["eval_clips"] == 18 and metrics["folds"]["train"]["train_clips"] == 13
    assert metrics["folds"]["test"]["eval_clips"] == 13 and metrics["folds"]["test"]["train_clips"] == 18
    assert metrics["value"] == pytest.approx(np.mean([f["value"] for f in metrics["folds"].values()]))
    assert metrics["eval_clips"] == 31
    for fold in ("train", "test"):
        assert (tmp_path / "work" / fold / "result.json").exists()
    # A re-run reads the finished folds back instead of training again.
    (tmp_path / "metrics.json").unlink()

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a finished fold was trained again")

    monkeypatch.setattr(ft, "_Trainer", no_training)
    _, again = run_main(data, tmp_path, settings)
    assert again == metrics


def test_a_stopped_run_resumes_to_the_same_result(
    data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Deterministic training: no drop path, audio only, augmentation draws seeded per step.
    settings = {**SMOKE, "modality": "audio", "drop_path": 0.0, "train_splits": ["train"], "eval_splits": ["test"]}
    _, reference = run_main(data, tmp_path / "reference", settings)

    calls = {"n": 0}
    real_any_rank = ft.any_rank

    def stop_at_fifth_step(value: int, group: Any = None) -> int:
        calls["n"] += 1
        return 1 if calls["n"] == 5 else real_any_rank(value, group)

    monkeypatch.setattr(ft, "any_rank", stop_at_fifth_step)
    code, metrics = run_main(data, tmp_path / "resumed", settings)
    assert code == ft.EXIT_INTERRUPTED and metrics is None
    checkpoints = sorted((tmp_path / "resumed" / "work" / "checkpoints").glob("checkpoint-*.pt"))
    assert [p.name for p in checkpoints] == ["checkpoint-000000003.pt", "checkpoint-000000005.pt"]  # epoch end, stop

    monkeypatch.setattr(ft, "any_rank", real_any_rank)
    code, metrics = run_main(data, tmp_path / "resumed", settings)
    assert code == 0
    assert metrics["history"] == reference["history"]
    train_log = read_csv(tmp_path / "resumed" / "work" / "train.csv")
    assert [row["step"] for row in train_log] == list(range(6))  # no step lost or logged twice


def test_a_changed_run_refuses_the_old_work_dir(
    data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {**SMOKE, "modality": "audio", "train_splits": ["train"], "eval_splits": ["test"]}
    monkeypatch.setattr(ft, "any_rank", lambda value, group=None: 1)  # stop after the first step
    assert run_main(data, tmp_path, settings)[0] == ft.EXIT_INTERRUPTED
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=r"lr: 0\.001 in the checkpoint, 0\.005 now"):
        run_main(data, tmp_path, {**settings, "lr": 5e-3})


def test_main_refuses_a_visual_run_on_audio_only_features(data: EvalData, tmp_path: Path) -> None:
    config = ModelConfig.tiny(audio_frames=64, audio_freq_bins=32, image_size=32)
    with pytest.raises(ValueError, match="no video frames"):
        fit_config_to_data(config, {"num_mel_bins": 32, "target_frames": 64, "num_frames": 0, "frame_size": 32},
                              audio=False, visual=True)  # fmt: skip
    # A shorter audio input keeps the pre-trained tower (fixed sin-cos positions): 512-frame ESC-50 on a 1024 model.
    fitted = fit_config_to_data(ModelConfig.tiny(audio_frames=1024), {"num_mel_bins": 128, "target_frames": 512,
                                   "num_frames": 0, "frame_size": 224}, audio=True, visual=False)  # fmt: skip
    assert fitted.audio_frames == 512


# --------------------------------------------------------------------------- optimiser


def test_head_learning_rate_multiplier_applies(data: EvalData) -> None:
    weights = load_export(data.pretrained)
    config = ModelConfig.from_dict(weights["model_config"])
    settings = FinetuneSettings(modality="audio", head_lr_multiplier=20.0, lr=1e-3, weight_decay=0.0)
    model = EquiAVClassifier.from_pretrained(weights["model"], 3, "audio", config=config, drop_path=0.0)
    optimizer = ft.build_finetune_optimizer(model, settings)
    WarmupCosine(optimizer, peak_lr=settings.lr, total_steps=10, warmup_steps=0).step()
    head_groups = [g for g in optimizer.param_groups if g["name"].startswith("head")]
    body_groups = [g for g in optimizer.param_groups if g["name"].startswith("body")]
    assert head_groups and body_groups
    assert {id(p) for g in head_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    assert all(g["lr"] == pytest.approx(20.0 * body_groups[0]["lr"]) for g in head_groups)
    # Adam's first step moves each parameter by about its lr: the head 20 times further.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model(audio=torch.randn(4, 64, 32)).sum().backward()
    optimizer.step()
    moved = {name: float((p.detach() - before[name]).abs().max()) for name, p in model.named_parameters()}
    head = max(v for k, v in moved.items() if k.startswith("head."))
    body = max(v for k, v in moved.items() if not k.startswith("head."))
    assert head / body == pytest.approx(20.0, rel=0.05)


# --------------------------------------------------------------------------- training-time augmentation


def test_mixup_mixes_labels_with_the_same_lambda_as_inputs() -> None:
    batch = 8
    values = torch.arange(1.0, batch + 1)  # clip i is the constant i + 1 in every modality
    audio = values[:, None, None].expand(batch, 64, 32).clone()
    visual = values[:, None, None, None].expand(batch, 3, 8, 8).clone()
    labels = torch.eye(batch)  # clip i has class i only
    augment = TrainAugment(mixup=1.0, specaugment=False, freq_mask=48, time_mask=192, time_shift=False)
    mixed_audio, mixed_visual, mixed_labels = augment(audio, visual, labels, np.random.default_rng(0))
    # With one-hot labels, input i = sum_j label_ij * value_j exactly when one lambda serves both.
    expected = mixed_labels @ values
    torch.testing.assert_close(mixed_audio[:, 0, 0], expected)
    torch.testing.assert_close(mixed_visual[:, 0, 0, 0], expected)
    assert torch.all(mixed_audio == mixed_audio[:, :1, :1]) and torch.all(mixed_visual == mixed_visual[:, :1, :1, :1])
    torch.testing.assert_close(mixed_labels.sum(dim=1), torch.ones(batch))
    lam = mixed_labels.diagonal()
    mixed = lam < 1
    assert mixed.sum() >= batch // 2  # a random permutation leaves few fixed points
    assert torch.all((lam[mixed] > 0.05) & (lam[mixed] < 0.95))  # Beta(10, 10) stays near 0.5
    draw = finetune_augment.draw_mixup(10_000, 0.5, np.random.default_rng(1))
    assert (draw.lam < 1).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert draw.lam[draw.lam < 1].mean().item() == pytest.approx(0.5, abs=0.01)
    unchanged = TrainAugment(mixup=0.0, specaugment=False, freq_mask=48, time_mask=192, time_shift=False)
    assert torch.equal(unchanged(audio, visual, labels, np.random.default_rng(0))[2], labels)


def test_spec_augment_masks_one_band_per_axis() -> None:
    fbank = torch.randn(64, 100, 40) + 10.0  # never 0 unless masked
    out = finetune_augment.spec_augment(fbank, freq_mask=12, time_mask=30, rng=np.random.default_rng(0))
    zero = out == 0
    time_band = zero.all(dim=2)  # [B, T] frames masked across every bin
    freq_band = zero.all(dim=1)  # [B, F]
    assert time_band.sum(dim=1).max() < 30 and freq_band.sum(dim=1).max() < 12
    assert time_band.any() and freq_band.any()
    # Outside the two bands nothing changes.
    kept = ~(time_band[:, :, None] | freq_band[:, None, :])
    assert torch.equal(out[kept], fbank[kept]) and torch.all(zero == ~kept)


def test_time_shift_rolls_each_clip() -> None:
    fbank = torch.arange(10.0)[None, :, None].repeat(4, 1, 3)
    out = finetune_augment.time_shift(fbank, np.random.default_rng(0))
    for clip in range(4):
        shift = int(out[clip, 0, 0])  # out[t] = in[(t - s) mod T] and in[t] = t
        assert torch.equal(out[clip, :, 0], torch.roll(fbank[clip, :, 0], -shift))


@pytest.mark.parametrize("specaugment", [True, False])
def test_spec_augment_applies_in_training_only(
    data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, specaugment: bool
) -> None:
    seen: list[tuple[bool, torch.Tensor]] = []
    forward = EquiAVClassifier.forward

    def recording_forward(
        self: EquiAVClassifier, audio: torch.Tensor | None = None, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        seen.append((self.training, audio.detach().clone()))
        return forward(self, audio=audio, visual=visual)

    monkeypatch.setattr(EquiAVClassifier, "forward", recording_forward)
    settings = {**SMOKE, "modality": "audio", "epochs": 1, "mixup": 0.0, "time_shift": False,
                "specaugment": specaugment, "train_splits": ["train"], "eval_splits": ["test"]}  # fmt: skip
    assert run_main(data, tmp_path, settings)[0] == 0

    def masked_frames(audio: torch.Tensor) -> int:
        return int((audio == 0).all(dim=2).sum())  # frames zero across every mel bin

    training = [audio for train, audio in seen if train]
    evaluation = [audio for train, audio in seen if not train]
    assert len(training) == 3 and sum(a.shape[0] for a in evaluation) == 13
    assert all(masked_frames(a) == 0 for a in evaluation)
    assert (sum(masked_frames(a) for a in training) > 0) == specaugment


# --------------------------------------------------------------------------- what evaluation feeds and reports

# The production frame count: method.md section 2 stores 10 frames (frame k at time k*T/10) and
# evaluates on frame 5 (index 5 of 0..9, time T/2). With the 3 frames of the other tests n // 2
# and (n - 1) // 2 are both index 1; with 10 they split (5 vs 4), so this count pins the frame.
TEN_FRAMES = replace(FEATURES, num_frames=10)
EVAL_FRAME = 5


def frame_level(k: int) -> int:
    """The grey level of stored frame k: 20 apart, far beyond JPEG's +-2."""
    return 25 + 20 * k


@pytest.fixture(scope="module")
def ten_frame_data(tmp_path_factory: pytest.TempPathFactory) -> EvalData:
    return build_eval_data(
        tmp_path_factory.mktemp("tenframes"), features=TEN_FRAMES, frame_jpeg=lambda rng, k: _grey_jpeg(frame_level(k))
    )


def test_evaluation_feeds_frame_5_of_the_10_stored_frames(
    ten_frame_data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[torch.Tensor] = []
    forward = EquiAVClassifier.forward

    def recording_forward(
        self: EquiAVClassifier, audio: torch.Tensor | None = None, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not self.training:
            seen.append(visual.detach().clone())
        return forward(self, audio=audio, visual=visual)

    monkeypatch.setattr(EquiAVClassifier, "forward", recording_forward)
    # Through main(): the trainer's choice of frame mode and the reader's choice of index together.
    settings = {**SMOKE, "modality": "visual", "epochs": 1, "mixup": 0.0, "eval_frames": "middle",
                "train_splits": ["train"], "eval_splits": ["test"]}  # fmt: skip
    assert run_main(ten_frame_data, tmp_path, settings)[0] == 0
    visual = torch.cat(seen)
    assert visual.shape == (13, 3, TEN_FRAMES.frame_size, TEN_FRAMES.frame_size)  # one frame per clip
    # Undo the ImageNet normalisation: the grey level the model saw, per clip.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    levels = (visual * std + mean) * 255
    nearest = [min(range(10), key=lambda k: abs(float(level.mean()) - frame_level(k))) for level in levels]
    assert nearest == [EVAL_FRAME] * 13
    assert float((levels - frame_level(EVAL_FRAME)).abs().max()) < 3  # that frame, unaltered


def test_spc_v1_is_scored_by_accuracy_although_it_trains_multilabel(
    data: EvalData, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fixed evaluation scores, recognised by each clip's first fbank row: clip k predicts one of
    # its labels unless k % 4 == 3 (top-1 accuracy 10/13), at a clip-specific offset that scrambles
    # the order within each class (mAP about 0.58), so the two metrics cannot be confused.
    inputs = DatasetInputs.load(data.usable, data.classes, data.norm)
    test_set = inputs.dataset(["test"], frame="middle")
    designed: dict[tuple[float, ...], torch.Tensor] = {}
    for item in test_set:
        k = int(item["clip_id"].split("_")[1])
        labels = [CLASSES.index(name) for name in clip_labels(k)]
        predicted = labels[0] if k % 4 != 3 else next(c for c in range(len(CLASSES)) if c not in labels)
        offset = 3.0 * ((7 * k) % 13) / 13 - 1.5
        logits = torch.full((len(CLASSES),), offset - 1.0)
        logits[predicted] = offset
        designed[tuple(item["fbank"][0].tolist())] = logits
    assert len(designed) == SPLIT_SIZES["test"]  # every clip recognisable by its first row
    expected_accuracy = 10 / 13
    scores = torch.sigmoid(torch.stack(list(designed.values())))
    targets = torch.stack([item["label"] for item in test_set])
    assert top1_accuracy(scores, targets) == pytest.approx(expected_accuracy)
    assert abs(mean_average_precision(scores, targets) - expected_accuracy) > 0.1  # the metrics really differ

    forward = EquiAVClassifier.forward

    def designed_forward(
        self: EquiAVClassifier, audio: torch.Tensor | None = None, visual: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.training:
            return forward(self, audio=audio, visual=visual)
        return torch.stack([designed[tuple(row.tolist())] for row in audio[:, 0]])

    monkeypatch.setattr(EquiAVClassifier, "forward", designed_forward)
    recipe = FinetuneSettings.recipe("spc_v1")
    assert (recipe.task, recipe.metric) == ("multilabel", "accuracy")  # BCE training, accuracy reported
    settings = {"recipe": "spc_v1", "epochs": 1, "batch_size": 6, "num_workers": 0,
                "train_splits": ["train"], "eval_splits": ["test"]}  # fmt: skip
    code, metrics = run_main(data, tmp_path, settings)
    assert code == 0 and metrics is not None
    assert metrics["settings"]["task"] == "multilabel"
    assert metrics["metric"] == "accuracy"
    assert metrics["value"] == pytest.approx(expected_accuracy)
    assert metrics["history"][-1]["value"] == pytest.approx(expected_accuracy)


# --------------------------------------------------------------------------- balanced sampler


def test_class_balanced_weights_follow_the_method() -> None:
    weights = class_balanced_weights([[0], [0, 1], [], [2]], 3)
    w0, w1, w2 = 1000 / 2.01, 1000 / 1.01, 1000 / 1.01
    torch.testing.assert_close(weights, torch.tensor([w0, w0 + w1, 0.0, w2], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        class_balanced_weights([[3]], 3)


def test_balanced_sampler_under_two_ranks_equals_one_process() -> None:
    labels = [[0]] * 90 + [[1]] * 10
    weights = class_balanced_weights(labels, 2)
    single = DistributedWeightedSampler(weights, 1000, num_replicas=1, rank=0, seed=7)
    ranks = [DistributedWeightedSampler(weights, 1000, num_replicas=2, rank=r, seed=7) for r in range(2)]
    for epoch in (0, 3):
        for sampler in (single, *ranks):
            sampler.set_epoch(epoch)
        draws = [list(sampler) for sampler in ranks]
        assert len(draws[0]) == len(draws[1]) == 500 == len(ranks[0])
        interleaved = [index for pair in zip(*draws, strict=True) for index in pair]
        assert interleaved == list(single)
    # Balanced: the rare class is drawn about as often as the common one.
    rare = np.mean([index >= 90 for index in single])
    assert rare == pytest.approx(0.5, abs=0.06)
    single.set_epoch(4)
    assert list(single) != interleaved  # a new epoch, a new draw


def test_balanced_sampler_pads_an_uneven_split_and_checks_weights() -> None:
    samplers = [DistributedWeightedSampler([1.0, 2.0, 3.0], 7, num_replicas=2, rank=r) for r in range(2)]
    assert [len(s) for s in samplers] == [4, 4]
    with pytest.raises(ValueError, match="every weight is 0"):
        DistributedWeightedSampler([0.0, 0.0])


# --------------------------------------------------------------------------- whole-set evaluation over two processes

WORLD = 2
SPAWN_TIMEOUT_S = 120


def _eval_on_ranks(rank: int, root: str, world: int) -> None:
    """Evaluate a fixed classifier on this rank's DistributedSampler shard of the 13 test clips."""
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{root}/rendezvous", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
    try:
        data_root = Path(root)
        inputs = DatasetInputs.load(data_root / "usable.csv", data_root / "classes.csv", data_root / "norm_stats.json")
        dataset = inputs.dataset(["test"], frame="middle")
        weights = load_export(data_root / "model.pt")
        torch.manual_seed(0)  # the same head on every rank
        model = EquiAVClassifier.from_pretrained(
            weights["model"], 3, "audiovisual", config=ModelConfig.from_dict(weights["model_config"])
        )
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        loader = DataLoader(dataset, batch_size=4, sampler=sampler)
        results = {
            metric: classify.evaluate(
                model, loader, task="multilabel", metric=metric, precision="fp32", device=torch.device("cpu")
            )
            for metric in ("map", "accuracy")
        }
        torch.save(
            {k: vars(v) for k, v in results.items()} | {"shard": len(sampler)}, data_root / f"eval-{world}-{rank}.pt"
        )
    finally:
        if world > 1:
            dist.destroy_process_group()


def test_evaluation_gathers_the_whole_set_from_two_processes(data: EvalData) -> None:
    context = mp.start_processes(
        _eval_on_ranks, args=(str(data.root), WORLD), nprocs=WORLD, join=False, start_method="spawn"
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(f"the two gloo workers did not finish within {SPAWN_TIMEOUT_S} s")
    _eval_on_ranks(0, str(data.root), 1)
    single = torch.load(data.root / "eval-1-0.pt")
    per_rank = [torch.load(data.root / f"eval-{WORLD}-{r}.pt") for r in range(WORLD)]
    assert [r["shard"] for r in per_rank] == [7, 7]  # 14 evaluated: one clip padded twice
    for rank_result in per_rank:
        for metric in ("map", "accuracy"):
            assert rank_result[metric]["clips"] == single[metric]["clips"] == 13
            assert rank_result[metric]["value"] == pytest.approx(single[metric]["value"], abs=1e-6)
            assert rank_result[metric]["loss"] == pytest.approx(single[metric]["loss"], abs=1e-6)


def test_gather_refuses_a_missing_clip() -> None:
    with pytest.raises(RuntimeError, match="expected 4"):
        classify.gather_whole_set(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 1]), expected=4)
    scores, _ = classify.gather_whole_set(
        torch.arange(4.0)[:, None], torch.zeros(4, 1), torch.tensor([2, 0, 1, 0]), expected=3
    )
    assert scores.squeeze(1).tolist() == [1.0, 2.0, 0.0]  # sorted by index, the duplicate dropped


def test_the_pretrained_identity_is_the_weights_not_the_file():
    from equiav.train.finetune import weights_digest

    weights = {"model": {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.int64)}, "model_config": {"x": 1}}
    same = {**weights, "code_revision": "another", "steps": 7}  # what a re-export may change
    assert weights_digest(same) == weights_digest(weights)
    changed = {**weights, "model": {**weights["model"], "a": torch.ones(2, 3) * 1.0001}}
    assert weights_digest(changed) != weights_digest(weights)
    assert weights_digest({**weights, "model_config": {"x": 2}}) != weights_digest(weights)
