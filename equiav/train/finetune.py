"""Fine-tuning and evaluation of a pre-trained EquiAV (method.md section 8, pipeline stage 6).

``main(argv)`` trains an :class:`~equiav.model.EquiAVClassifier` (audio, visual or
audio-visual) from the pre-trained weights, evaluates it on the whole evaluation set after
every epoch and writes ``metrics.json``. With ``folds`` it runs k-fold cross-validation (ESC-50).
One process or many (``torchrun``: DDP, metrics gathered from every rank); a killed run resumes
from its newest checkpoint in ``--work-dir``. Recipes, metrics and deviations from the release
are documented in docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from equiav.augment import normalize_image
from equiav.data.inputs import read_norm_stats, read_usable
from equiav.data.store import FeatureDataset
from equiav.eval.metrics import mean_average_precision, top1_accuracy
from equiav.model import EquiAVClassifier, ModelConfig
from equiav.model.finetune import FINETUNE_MODALITIES
from equiav.options import add_dataset_inputs, add_pretrained, add_settings
from equiav.settings import reject_unknown_keys
from equiav.train.checkpoint import Checkpointer, code_revision, load_weights
from equiav.train.common import (
    PRECISIONS,
    DistInfo,
    MetricLogger,
    StopSignal,
    WarmupCosine,
    any_rank,
    autocast,
    build_optimizer,
    cleanup_distributed,
    derive_seed,
    gather_tensor,
    loader_worker_init,
    make_grad_scaler,
    resolve_precision,
    seed_everything,
    setup_distributed,
    unwrap_model,
)
from equiav.train.sampling import DistributedWeightedSampler, class_balanced_weights

__all__ = [
    "EVAL_FRAMES",
    "EXIT_INTERRUPTED",
    "METRICS",
    "RECIPES",
    "TASKS",
    "DatasetInputs",
    "EvalResult",
    "FinetuneSettings",
    "MixupDraw",
    "TrainAugment",
    "add_arguments",
    "apply_mixup",
    "build_finetune_optimizer",
    "chance_level",
    "draw_mixup",
    "evaluate",
    "finetune",
    "fit_config_to_data",
    "main",
    "run",
    "spec_augment",
    "time_shift",
]

log = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("multilabel", "multiclass")
METRICS: tuple[str, ...] = ("map", "accuracy")
EVAL_FRAMES: tuple[str, ...] = ("middle", "all")
# Mixup's lambda ~ Beta(10, 10), as the release (and CAV-MAE) draw it.
MIXUP_ALPHA = 10.0
# Exit status of a run stopped by SIGTERM/SIGUSR1 after saving its checkpoint (128 + SIGTERM).
EXIT_INTERRUPTED = 143
# Settings that do not change what a run computes: a resumed run may differ in them.
_RUNTIME_FIELDS = frozenset({"num_workers"})


# --------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneSettings:
    """Everything a fine-tuning run does; the paper's runs are :meth:`recipe` presets.

    Data and task:
        modality: "audio", "visual" or "audiovisual" (concatenated pooled features, one Linear).
        task: "multilabel" (sigmoid + binary cross-entropy) or "multiclass" (softmax +
            cross-entropy; a clip with several labels gets them as an equal-weight distribution).
        metric: "map" (mean average precision) or "accuracy" (top-1), independent of ``task``
            (SPC-v1 trains with BCE and reports accuracy, as the paper does).
        train_splits, eval_splits: split names of the usable-clip table.
        folds: when given (e.g. fold1..fold5 for ESC-50), k-fold cross-validation: each fold is
            evaluated by a model trained from the pre-trained weights on the other folds;
            ``train_splits``/``eval_splits`` are then ignored.
    Optimisation (per iteration, global batch):
        epochs, batch_size (global: split evenly over the processes), lr (peak, body),
        head_lr_multiplier (the classifier head's lr = lr x this), warmup_epochs (linear from
        start_lr), min_lr (end of the half-cycle cosine), weight_decay, betas (AdamW).
    Regularisation (training only):
        mixup: fraction of clips mixed with a partner (lambda ~ Beta(10, 10), the same lambda for
            spectrogram, frame and labels); 0 = off.
        balanced_sampling: draw clips with the class-balancing weights (with replacement),
            ``samples_per_epoch`` per epoch (default: the training set's size).
        specaugment, freq_mask, time_mask: one frequency mask (< freq_mask bins) and one time mask
            (< time_mask frames) per clip, filled with 0 (the normalised mean). ``specaugment=False``
            restores the release, which never applied them.
        time_shift: circular shift of each spectrogram by U[-T, T) frames (the release's
            fine-tuning "noise" option, on in all its recipes).
        drop_path: stochastic depth of every encoder block.
    Evaluation and runtime:
        eval_frames: "middle" (frame num_frames // 2: index 5 of 0..9, the release's choice) or
            "all" (pooled features averaged over every stored frame).
        precision: "auto", "fp32", "bf16" or "fp16" (see equiav.train.common.resolve_precision).
        num_workers: DataLoader workers per process. seed: every random choice derives from it.
    """

    modality: str = "audiovisual"
    task: str = "multilabel"
    metric: str = "map"
    train_splits: tuple[str, ...] = ("train",)
    eval_splits: tuple[str, ...] = ("test",)
    folds: tuple[str, ...] = ()
    epochs: int = 50
    batch_size: int = 256
    lr: float = 1e-4
    head_lr_multiplier: float = 50.0
    warmup_epochs: float = 1.0
    start_lr: float = 1e-6
    min_lr: float = 1e-6
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    mixup: float = 0.5
    balanced_sampling: bool = False
    samples_per_epoch: int | None = None
    specaugment: bool = True
    freq_mask: int = 48
    time_mask: int = 192
    time_shift: bool = True
    drop_path: float = 0.1
    eval_frames: str = "middle"
    precision: str = "auto"
    num_workers: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid FinetuneSettings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        for name, allowed in (
            ("modality", FINETUNE_MODALITIES),
            ("task", TASKS),
            ("metric", METRICS),
            ("eval_frames", EVAL_FRAMES),
            ("precision", PRECISIONS),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_workers", "freq_mask", "time_mask", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "head_lr_multiplier"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("start_lr", "min_lr", "weight_decay", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if _is_int(self.epochs) and self.warmup_epochs > self.epochs:
            problems.append(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.mixup <= 1:
            problems.append(f"mixup is the fraction of mixed clips and must lie in [0, 1], got {self.mixup!r}")
        if not 0 <= self.drop_path < 1:
            problems.append(f"drop_path must lie in [0, 1), got {self.drop_path!r}")
        if self.samples_per_epoch is not None:
            if not _is_int(self.samples_per_epoch) or self.samples_per_epoch < 1:
                problems.append(f"samples_per_epoch must be an integer >= 1 or null, got {self.samples_per_epoch!r}")
            elif not self.balanced_sampling:
                problems.append(
                    "samples_per_epoch applies to balanced_sampling only; set balanced_sampling: true or drop it"
                )
        if self.folds:
            if len(set(self.folds)) != len(self.folds) or len(self.folds) < 2:
                problems.append(f"folds must name at least 2 distinct splits, got {list(self.folds)}")
        elif not self.train_splits or not self.eval_splits:
            problems.append("train_splits and eval_splits must each name at least one split (or give folds)")
        return problems

    # ---- presets and (de)serialisation -----------------------------------------------------

    @classmethod
    def recipe(cls, name: str, **overrides: Any) -> FinetuneSettings:
        """The paper's recipe ``name`` (see :data:`RECIPES`) with ``overrides`` applied."""
        if name not in RECIPES:
            raise ValueError(f"unknown recipe {name!r}; choose one of {', '.join(RECIPES)}")
        return cls.from_dict({**RECIPES[name], **overrides})

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FinetuneSettings:
        """Settings from plain data (JSON, YAML). A ``recipe`` key (a name or null) selects the
        preset the other keys override; unknown keys are an error."""
        values = dict(values)
        recipe = values.pop("recipe", None)
        if recipe is not None:
            return cls.recipe(recipe, **values)
        reject_unknown_keys(cls, values, "FinetuneSettings key(s)", also=("recipe",))
        for name in ("train_splits", "eval_splits", "folds", "betas"):
            if name in values:
                value = values[name]
                values[name] = (value,) if isinstance(value, str) else tuple(value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict of every field (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> FinetuneSettings:
        return dataclasses.replace(self, **changes)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_ESC50_FOLDS = ("fold1", "fold2", "fold3", "fold4", "fold5")

#: The paper's fine-tuning recipes (Table A; release values where the paper is silent:
#: head_lr_multiplier 50, mixup rate 0.5, time shift, drop path 0.1). ``modality`` defaults to
#: audio-visual for the audio-visual data sets: override it for the audio and visual rows.
RECIPES: dict[str, dict[str, Any]] = {
    "audioset_20k": dict(
        task="multilabel", metric="map", train_splits=("balanced_train",), eval_splits=("eval",),
        epochs=50, batch_size=256, lr=1e-4, warmup_epochs=1, mixup=0.5, balanced_sampling=False,
    ),
    "audioset_2m": dict(
        task="multilabel", metric="map", train_splits=("balanced_train", "unbalanced_train"), eval_splits=("eval",),
        epochs=50, batch_size=512, lr=1e-4, warmup_epochs=1, mixup=0.5, balanced_sampling=True,
    ),
    "vggsound": dict(
        task="multiclass", metric="accuracy", train_splits=("train",), eval_splits=("test",),
        epochs=50, batch_size=256, lr=1e-4, warmup_epochs=1, mixup=0.5, balanced_sampling=True,
    ),
    "esc50": dict(
        modality="audio", task="multiclass", metric="accuracy", folds=_ESC50_FOLDS,
        epochs=60, batch_size=64, lr=5e-4, warmup_epochs=4, mixup=0.0, balanced_sampling=False,
    ),
    "spc_v1": dict(
        modality="audio", task="multilabel", metric="accuracy", train_splits=("train",), eval_splits=("test",),
        epochs=10, batch_size=256, lr=1e-3, warmup_epochs=1, mixup=0.5, balanced_sampling=False,
    ),
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Inputs shared with retrieval
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetInputs:
    """What the evaluation stages read of a data set: the usable-clip table (``usable.csv`` of
    the availability stage: clip_id, split, labels, h5, ...), the class ids in class order
    (``classes.csv``: index, id, name) and the fbank normalisation (``norm_stats.json``)."""

    usable: pd.DataFrame
    classes: list[str]
    mean: float
    std: float

    @classmethod
    def load(
        cls, usable: str | os.PathLike[str], classes: str | os.PathLike[str], norm_stats: str | os.PathLike[str]
    ) -> DatasetInputs:
        table = read_usable(usable)
        class_table = pd.read_csv(classes, dtype={"id": str}, keep_default_na=False)
        if not {"index", "id"} <= set(class_table.columns):
            raise ValueError(f"{classes} must have columns index, id (the manifest stage's classes.csv)")
        class_ids = class_table.sort_values("index")["id"].tolist()
        stats = read_norm_stats(norm_stats)
        return cls(table, class_ids, float(stats["mean"]), float(stats["std"]))

    def shards(self, splits: Sequence[str] | None = None) -> list[str]:
        """The HDF5 shards holding clips of ``splits`` (all shards for None), sorted."""
        rows = self.usable if splits is None else self.usable[self.usable["split"].isin(list(splits))]
        if rows.empty:
            found = sorted(set(self.usable["split"]))
            raise ValueError(f"no usable clip in split(s) {list(splits or [])}; the usable clips are in {found}")
        return sorted(set(rows["h5"]))

    def dataset(
        self, splits: Sequence[str] | None, frame: str, clip_ids: Sequence[str] | None = None
    ) -> FeatureDataset:
        """A :class:`FeatureDataset` over the clips of ``splits`` (every split for None)."""
        return FeatureDataset(
            self.shards(splits),
            self.classes,
            mean=self.mean,
            std=self.std,
            splits=splits,
            frame=frame,
            clip_ids=clip_ids,
        )


def fit_config_to_data(
    config: ModelConfig, shard_attrs: Mapping[str, int], *, audio: bool, visual: bool
) -> ModelConfig:
    """The pre-trained model's config with its audio length set to the data's.

    The positional embeddings are fixed sin-cos tables rebuilt from the config, so a tower
    pre-trained on 1024 frames runs unchanged on 512-frame ESC-50 or 128-frame SPC-v1 clips
    (shorter inputs, fewer tokens) instead of padding them. Mel bins and frame size must match.
    """
    if audio:
        bins = int(shard_attrs["num_mel_bins"])
        if bins != config.audio_freq_bins:
            raise ValueError(
                f"the features have {bins} mel bins but the model was pre-trained on {config.audio_freq_bins}; "
                "extract features with the pre-training's num_mel_bins"
            )
        frames = int(shard_attrs["target_frames"])
        if frames != config.audio_frames:
            log.info(
                "audio length: the model was pre-trained on %d frames, the data have %d", config.audio_frames, frames
            )
            config = config.replace(audio_frames=frames)  # validates the patch multiple
    if visual:
        if int(shard_attrs["num_frames"]) == 0:
            raise ValueError(
                "the features hold no video frames (num_frames=0), so nothing visual can run on this data set; "
                "fine-tune it with modality 'audio'"
            )
        size = int(shard_attrs["frame_size"])
        if size != config.image_size:
            raise ValueError(
                f"the frames are {size} px but the model takes {config.image_size} px; extract features with "
                f"frame_size {config.image_size}"
            )
    return config


def _batch_inputs(
    batch: Mapping[str, Any], model: EquiAVClassifier, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """(audio [B, T, F] or None, ImageNet-normalised visual [B, 3, H, W] / [B, N, 3, H, W] or None)."""
    audio = batch["fbank"].to(device, non_blocking=True) if model.uses_audio else None
    visual = normalize_image(batch["frames"].to(device, non_blocking=True)) if model.uses_visual else None
    return audio, visual


# --------------------------------------------------------------------------------------------
# Training-time augmentation (batched, on the batch's device)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MixupDraw:
    """lam: float [B] (1 for clips left unmixed); partner: int64 [B], the clip each is mixed with."""

    lam: Tensor
    partner: Tensor


def draw_mixup(batch: int, rate: float, rng: np.random.Generator) -> MixupDraw:
    """For each clip: mix with probability ``rate``, lambda ~ Beta(10, 10), partner = a random
    permutation of the batch (the release draws a random partner from the whole data set; a
    shuffled batch is such a draw)."""
    mixed = rng.random(batch) < rate
    lam = np.where(mixed, rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, size=batch), 1.0)
    return MixupDraw(torch.from_numpy(lam).float(), torch.from_numpy(rng.permutation(batch)))


def apply_mixup(x: Tensor, draw: MixupDraw) -> Tensor:
    """lam * x + (1 - lam) * x[partner] along dim 0, for any [B, ...] tensor (inputs or labels)."""
    lam = draw.lam.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[draw.partner.to(x.device)]


def _mask_bounds(batch: int, max_width: int, size: int, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
    """torchaudio's iid masking: width = floor(U * max_width), start = floor(U * (size - width))."""
    width = np.floor(rng.random(batch) * min(max_width, size))
    start = np.floor(rng.random(batch) * (size - width))
    return torch.from_numpy(start).long(), torch.from_numpy(start + width).long()


def spec_augment(fbank: Tensor, freq_mask: int, time_mask: int, rng: np.random.Generator) -> Tensor:
    """One frequency band (< freq_mask bins) and one time band (< time_mask frames) per clip set
    to 0, the mean of the normalised spectrogram. fbank: [B, T, F]; returns a new tensor."""
    batch, frames, bins = fbank.shape
    device = fbank.device
    t0, t1 = (b.to(device)[:, None] for b in _mask_bounds(batch, time_mask, frames, rng))
    f0, f1 = (b.to(device)[:, None] for b in _mask_bounds(batch, freq_mask, bins, rng))
    t = torch.arange(frames, device=device)
    f = torch.arange(bins, device=device)
    masked = ((t >= t0) & (t < t1))[:, :, None] | ((f >= f0) & (f < f1))[:, None, :]
    return fbank.masked_fill(masked, 0.0)


def time_shift(fbank: Tensor, rng: np.random.Generator) -> Tensor:
    """Roll each spectrogram [B, T, F] along time by its own shift, uniform in [-T, T)."""
    batch, frames, bins = fbank.shape
    shift = torch.from_numpy(rng.integers(-frames, frames, size=batch)).to(fbank.device)
    source = (torch.arange(frames, device=fbank.device)[None, :] - shift[:, None]).remainder(frames)
    return fbank.gather(1, source[:, :, None].expand(batch, frames, bins))


@dataclass(frozen=True)
class TrainAugment:
    """The training-only transforms of a batch, in the release's order: mixup (inputs and
    labels with one lambda per clip), SpecAugment, time shift. Evaluation uses none of them."""

    mixup: float
    specaugment: bool
    freq_mask: int
    time_mask: int
    time_shift: bool

    @classmethod
    def from_settings(cls, settings: FinetuneSettings) -> TrainAugment:
        return cls(settings.mixup, settings.specaugment, settings.freq_mask, settings.time_mask, settings.time_shift)

    def __call__(
        self, audio: Tensor | None, visual: Tensor | None, labels: Tensor, rng: np.random.Generator
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        if self.mixup > 0:
            draw = draw_mixup(labels.shape[0], self.mixup, rng)
            audio = None if audio is None else apply_mixup(audio, draw)
            visual = None if visual is None else apply_mixup(visual, draw)
            labels = apply_mixup(labels, draw)
        if audio is not None and self.specaugment:
            audio = spec_augment(audio, self.freq_mask, self.time_mask, rng)
        if audio is not None and self.time_shift:
            audio = time_shift(audio, rng)
        return audio, visual, labels


# --------------------------------------------------------------------------------------------
# Loss, optimiser, evaluation
# --------------------------------------------------------------------------------------------


def _targets(labels: Tensor, task: str) -> Tensor:
    """Loss targets from multi-hot labels: as they are for BCE, rows normalised to sum 1 for CE."""
    if task == "multiclass":
        return labels / labels.sum(dim=1, keepdim=True).clamp_min(1e-12)
    return labels


def _loss(logits: Tensor, targets: Tensor, task: str) -> Tensor:
    if task == "multiclass":
        return F.cross_entropy(logits, targets)
    return F.binary_cross_entropy_with_logits(logits, targets)


def build_finetune_optimizer(model: torch.nn.Module, settings: FinetuneSettings) -> torch.optim.AdamW:
    """AdamW with the classifier head (``head.*``) at ``head_lr_multiplier`` times the body's lr."""
    return build_optimizer(
        model,
        lr=settings.lr,
        weight_decay=settings.weight_decay,
        betas=settings.betas,
        head_lr_multiplier=settings.head_lr_multiplier,
        head_prefixes=("head.",),
    )


@dataclass(frozen=True)
class EvalResult:
    """value: the metric over the whole evaluation set; loss: the training loss on it; clips: N."""

    value: float
    loss: float
    clips: int


def chance_level(targets: Tensor, metric: str) -> float:
    """What an uninformed predictor scores on multi-hot ``targets`` [N, C].

    accuracy: the majority-class rate (always predicting the most frequent class; 1/C on a
    balanced set). map: the mean prevalence of the classes with a positive (the expected AP of
    random scores).
    """
    prevalence = (targets > 0.5).double().mean(dim=0)
    if metric == "accuracy":
        return float(prevalence.max())
    present = prevalence[prevalence > 0]
    return float(present.mean()) if present.numel() else float("nan")


def _gather_whole_set(scores: Tensor, targets: Tensor, indices: Tensor, expected: int) -> tuple[Tensor, Tensor]:
    """Every rank's outputs concatenated, the DistributedSampler's padding duplicates dropped,
    sorted by data-set index. Checks that each of the ``expected`` clips is there exactly once."""
    scores, targets, indices = gather_tensor(scores), gather_tensor(targets), gather_tensor(indices)
    order = torch.argsort(indices, stable=True)
    indices = indices[order]
    first = torch.ones_like(indices, dtype=torch.bool)
    first[1:] = indices[1:] != indices[:-1]
    keep = order[first]
    if int(first.sum()) != expected:
        raise RuntimeError(
            f"evaluation gathered {int(first.sum())} distinct clips, expected {expected}; every rank must "
            "evaluate its DistributedSampler shard"
        )
    return scores[keep], targets[keep]


@torch.inference_mode()
def evaluate(
    model: EquiAVClassifier,
    loader: DataLoader,
    *,
    task: str,
    metric: str,
    precision: str,
    device: torch.device,
) -> EvalResult:
    """The metric over the **whole** evaluation set, identical on every rank.

    Each rank runs its shard of ``loader``'s data set (a DistributedSampler, which pads the
    shards to equal length by repeating clips); scores, labels and data-set indices are
    gathered from all ranks and each clip is counted once.
    """
    model.eval()
    scores, targets, indices = [], [], []
    for batch in loader:
        audio, visual = _batch_inputs(batch, model, device)
        with autocast(precision, device):
            logits = model(audio=audio, visual=visual)
        scores.append(logits.float())
        targets.append(batch["label"].to(device))
        indices.append(batch["index"].to(device))
    num_classes = model.head.out_features
    local_scores = torch.cat(scores) if scores else torch.zeros(0, num_classes, device=device)
    local_targets = torch.cat(targets) if targets else torch.zeros(0, num_classes, device=device)
    local_indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=device)
    logits, labels = _gather_whole_set(local_scores, local_targets, local_indices, len(loader.dataset))
    logits, labels = logits.cpu(), labels.cpu()
    loss = float(_loss(logits, _targets(labels, task), task))
    probabilities = torch.sigmoid(logits) if task == "multilabel" else torch.softmax(logits, dim=1)
    value = mean_average_precision(probabilities, labels) if metric == "map" else top1_accuracy(probabilities, labels)
    return EvalResult(value=value, loss=loss, clips=len(labels))


# --------------------------------------------------------------------------------------------
# One training run (one fold)
# --------------------------------------------------------------------------------------------


def _label_lists(dataset: FeatureDataset) -> list[list[int]]:
    position = {name: k for k, name in enumerate(dataset.classes)}
    return [[position[name] for name in str(labels).split(";") if name] for labels in dataset.index["labels"]]


def _multi_hot(labels: Sequence[Sequence[int]], num_classes: int) -> Tensor:
    """float32 [N, C] from per-clip class indices."""
    out = torch.zeros(len(labels), num_classes)
    for row, clip in enumerate(labels):
        out[row, list(clip)] = 1.0
    return out


def weights_digest(pretrained: Mapping[str, Any]) -> str:
    """SHA-256 of a pre-trained model's config and tensors, in key order.

    The weights, not the file: a re-export of the same weights (another code revision or
    settings note in the file) is the same model, so a fine-tuning run on it still resumes.
    """
    digest = hashlib.sha256(json.dumps(pretrained["model_config"], sort_keys=True).encode())
    for key, tensor in sorted(pretrained["model"].items()):
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class _Run:
    """One training run: what it trains on, where it keeps its state, and its identity (what a
    resumed run must share with the interrupted one)."""

    name: str
    train_splits: tuple[str, ...]
    eval_splits: tuple[str, ...]
    directory: Path
    identity: dict[str, Any]


def _atomic_write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_identity(saved: Mapping[str, Any], run: _Run, where: Path) -> None:
    differing = sorted(k for k in set(saved) | set(run.identity) if saved.get(k) != run.identity.get(k))
    if differing:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {run.identity.get(k)!r}" for k in differing[:5])
        raise RuntimeError(
            f"{where} belongs to a different fine-tuning run ({details}); delete {run.directory} to start "
            "this run afresh, or restore the settings to resume the old one"
        )


class _Trainer:
    """Trains and evaluates one run; resumable from its checkpoints."""

    def __init__(
        self,
        settings: FinetuneSettings,
        run: _Run,
        inputs: DatasetInputs,
        pretrained: Mapping[str, Any],
        info: DistInfo,
        max_steps: int | None,
    ) -> None:
        self.settings, self.run, self.info = settings, run, info
        self.device = info.device
        self.precision = resolve_precision(settings.precision, self.device)
        s = settings
        uses_audio = s.modality in ("audio", "audiovisual")
        uses_visual = s.modality in ("visual", "audiovisual")

        self.train_set = inputs.dataset(run.train_splits, frame="random")
        self.eval_set = inputs.dataset(
            run.eval_splits, frame="all" if uses_visual and s.eval_frames == "all" else "middle"
        )
        self.labels = _label_lists(self.train_set)
        self.chance = chance_level(_multi_hot(_label_lists(self.eval_set), len(inputs.classes)), s.metric)
        if s.task == "multiclass":
            unlabelled = sum(1 for clip in self.labels if not clip)
            if unlabelled:
                raise ValueError(
                    f"{unlabelled} training clip(s) of {list(run.train_splits)} have no label; "
                    "task 'multiclass' needs one per clip (use 'multilabel' for data with unlabelled clips)"
                )
        config = ModelConfig.from_dict(pretrained["model_config"])
        config = fit_config_to_data(config, self.train_set.shard_attrs, audio=uses_audio, visual=uses_visual)

        if s.batch_size % info.world_size:
            raise ValueError(
                f"batch_size={s.batch_size} is the global batch and must be divisible by the "
                f"{info.world_size} processes"
            )
        self.local_batch = s.batch_size // info.world_size
        if s.balanced_sampling:
            weights = class_balanced_weights(self.labels, len(inputs.classes))
            self.train_sampler: DistributedWeightedSampler | DistributedSampler = DistributedWeightedSampler(
                weights, s.samples_per_epoch, num_replicas=info.world_size, rank=info.rank, seed=s.seed
            )
        else:
            self.train_sampler = DistributedSampler(
                self.train_set, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=s.seed, drop_last=True
            )
        self.steps_per_epoch = len(self.train_sampler) // self.local_batch
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set of {len(self.train_set)} clips gives {len(self.train_sampler)} per process, fewer "
                f"than one batch of {self.local_batch}; lower batch_size"
            )
        full_steps = s.epochs * self.steps_per_epoch
        self.total_steps = full_steps if max_steps is None else min(full_steps, max_steps)
        warmup = round(s.warmup_epochs * self.steps_per_epoch)

        torch.manual_seed(s.seed)  # the head's initialisation, the same on every rank
        model = EquiAVClassifier.from_pretrained(
            pretrained["model"], len(inputs.classes), s.modality, config=config, drop_path=s.drop_path
        ).to(self.device)
        self.model = model
        self.ddp: torch.nn.Module = (
            DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if info.world_size > 1
            else model
        )
        self.optimizer = build_finetune_optimizer(model, s)
        self.scheduler = WarmupCosine(
            self.optimizer,
            peak_lr=s.lr,
            total_steps=self.total_steps,
            warmup_steps=min(warmup, self.total_steps),
            start_lr=s.start_lr,
            min_lr=s.min_lr,
        )
        self.scaler = make_grad_scaler(self.precision, self.device)
        self.augment = TrainAugment.from_settings(s)
        self.checkpointer = Checkpointer(run.directory / "checkpoints")
        self.eval_loader = DataLoader(
            self.eval_set,
            batch_size=self.local_batch,
            sampler=DistributedSampler(self.eval_set, num_replicas=info.world_size, rank=info.rank, shuffle=False),
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=loader_worker_init,
        )
        self.history: list[dict[str, float]] = []
        self.step = 0

    # ---- state -------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        return {
            "model": unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "history": self.history,
            "identity": self.run.identity,
            "revision": code_revision(),
        }

    def _resume(self) -> None:
        path = self.checkpointer.latest()
        if path is None:
            return
        state = self.checkpointer.load(path)
        _check_identity(state["identity"], self.run, path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = int(state["step"]), list(state["history"])
        log.info("%s: resumed from %s at step %d of %d", self.run.name, path, self.step, self.total_steps)

    # ---- loop --------------------------------------------------------------------------

    def _epoch_loader(self, epoch: int, skip_batches: int) -> DataLoader:
        """The loader of ``epoch``, starting after ``skip_batches`` batches (a resumed epoch)."""
        s = self.settings
        self.train_sampler.set_epoch(epoch)
        # Global RNGs (drop path, the random frame in the main process) per epoch and rank;
        # the loader's generator seeds the workers.
        seed_everything(derive_seed(s.seed, epoch), self.info.rank)
        indices = list(self.train_sampler)[skip_batches * self.local_batch :]
        return DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=indices,
            drop_last=True,
            num_workers=s.num_workers,
            pin_memory=self.device.type == "cuda",
            worker_init_fn=loader_worker_init,
            generator=torch.Generator().manual_seed(derive_seed(s.seed, epoch, self.info.rank)),
        )

    def _train_step(self, batch: Mapping[str, Any]) -> float:
        s = self.settings
        audio, visual = _batch_inputs(batch, self.model, self.device)
        labels = batch["label"].to(self.device, non_blocking=True)
        # Per-step generator: the same augmentation draws after a resume, distinct per rank.
        rng = np.random.default_rng((s.seed, self.info.rank, self.step))
        audio, visual, labels = self.augment(audio, visual, labels, rng)
        self.scheduler.step()
        with autocast(self.precision, self.device):
            logits = self.ddp(audio=audio, visual=visual)
        loss = _loss(logits.float(), _targets(labels, s.task), s.task)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def _group_lr(self, head: bool) -> float:
        name = "head" if head else "body"
        return next(g["lr"] for g in self.optimizer.param_groups if g["name"].startswith(name))

    def train(self) -> bool:
        """Run to the end (True) or until a stop signal (False, after a checkpoint)."""
        self._resume()
        s, info = self.settings, self.info
        directory = self.run.directory
        log.info(
            "%s: fine-tuning %s (%s) on %d clips, evaluating on %d: %d steps (%d per epoch) on %d process(es), %s, %s",
            self.run.name, s.modality, s.metric, len(self.train_set), len(self.eval_set), self.total_steps,
            self.steps_per_epoch, info.world_size, self.device, self.precision,
        )  # fmt: skip
        # A gloo group keeps the per-step stop check off the GPU stream under NCCL.
        stop_group = dist.new_group(backend="gloo") if info.world_size > 1 and dist.get_backend() == "nccl" else None
        train_log = MetricLogger(
            directory / "train.csv", total_steps=self.total_steps, resume_step=self.step, enabled=info.is_main
        )
        eval_log = MetricLogger(directory / "eval.csv", resume_step=self.step, enabled=info.is_main)
        try:
            with StopSignal() as stop:
                loader_iter = None
                while self.step < self.total_steps:
                    epoch, in_epoch = divmod(self.step, self.steps_per_epoch)
                    if loader_iter is None or in_epoch == 0:
                        loader_iter = iter(self._epoch_loader(epoch, in_epoch))
                        self.ddp.train()
                    loss = self._train_step(next(loader_iter))
                    train_log.log(
                        self.step, {"loss": loss, "lr": self._group_lr(False), "head_lr": self._group_lr(True)}
                    )
                    self.step += 1
                    end_of_epoch = self.step % self.steps_per_epoch == 0 or self.step == self.total_steps
                    if end_of_epoch:
                        loader_iter = None
                        result = self._evaluate()
                        row = {"epoch": epoch + 1, "step": self.step, "value": result.value, "eval_loss": result.loss}
                        self.history.append(row)
                        eval_log.log(self.step - 1, {k: float(v) for k, v in row.items() if k != "step"})
                        log.info(
                            "%s epoch %d: %s %.4f (chance %.4f), eval loss %.4f",
                            self.run.name, epoch + 1, s.metric, result.value, self.chance, result.loss,
                        )  # fmt: skip
                    stopping = bool(any_rank(int(stop.requested), stop_group))
                    if end_of_epoch or stopping:
                        self.checkpointer.save(self._state(), self.step)
                    if stopping:
                        log.warning("%s: stopped at step %d; run again to resume", self.run.name, self.step)
                        return False
        finally:
            train_log.close()
            eval_log.close()
            if stop_group is not None:
                dist.destroy_process_group(stop_group)
        return True

    def _evaluate(self) -> EvalResult:
        return evaluate(
            self.model, self.eval_loader, task=self.settings.task, metric=self.settings.metric,
            precision=self.precision, device=self.device,
        )  # fmt: skip

    def result(self) -> dict[str, Any]:
        """The finished run's summary: the metric after the last epoch (not the best one, which
        would select on the evaluation set), the chance level and the per-epoch history."""
        return {
            "value": self.history[-1]["value"],
            "chance": self.chance,
            "train_clips": len(self.train_set),
            "eval_clips": len(self.eval_set),
            "steps": self.total_steps,
            "history": self.history,
        }


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _runs(settings: FinetuneSettings, work_dir: Path, identity: Mapping[str, Any]) -> list[_Run]:
    if not settings.folds:
        return [_Run("run", settings.train_splits, settings.eval_splits, work_dir, dict(identity))]
    runs = []
    for fold in settings.folds:
        train = tuple(f for f in settings.folds if f != fold)
        runs.append(_Run(fold, train, (fold,), work_dir / fold, {**identity, "train": list(train), "eval": [fold]}))
    return runs


def _run_one(
    settings: FinetuneSettings,
    run: _Run,
    inputs: DatasetInputs,
    pretrained: Mapping[str, Any],
    info: DistInfo,
    max_steps: int | None,
) -> dict[str, Any] | None:
    """The summary of one run: read back when it finished before, else trained (None when
    a stop signal interrupted it)."""
    done = run.directory / "result.json"
    if done.exists():
        saved = json.loads(done.read_text())
        _check_identity(saved["identity"], run, done)
        log.info("%s: already finished (%s)", run.name, done)
        return saved["result"]
    trainer = _Trainer(settings, run, inputs, pretrained, info, max_steps)
    if not trainer.train():
        return None
    result = trainer.result()
    if info.is_main:
        _atomic_write_json(done, {"identity": run.identity, "result": result})
        # The summary replaces the checkpoints: a finished fold of ViT-B keeps gigabytes otherwise.
        shutil.rmtree(trainer.checkpointer.directory, ignore_errors=True)
    return result


def finetune(
    settings: FinetuneSettings,
    pretrained_path: str | os.PathLike[str],
    inputs: DatasetInputs,
    work_dir: str | os.PathLike[str],
    *,
    info: DistInfo,
    max_steps: int | None = None,
) -> dict[str, Any] | None:
    """Fine-tune (every fold with ``folds``) and return the metrics.json content, or None when
    a stop signal interrupted the run (its checkpoint is saved; run again to resume)."""
    path = Path(pretrained_path)
    pretrained = load_weights(path)
    if "model" not in pretrained or "model_config" not in pretrained:
        raise ValueError(
            f"{path} is not a pre-trained weights file (no 'model'/'model_config'); give the pre-train stage's model.pt"
        )
    identity = {
        **{k: v for k, v in settings.to_dict().items() if k not in _RUNTIME_FIELDS},
        "pretrained_sha256": weights_digest(pretrained),
        "max_steps": max_steps,
    }
    results: dict[str, dict[str, Any]] = {}
    for run in _runs(settings, Path(work_dir), identity):
        result = _run_one(settings, run, inputs, pretrained, info, max_steps)
        if result is None:
            return None
        results[run.name] = result
    metrics: dict[str, Any] = {
        "task": "finetune",
        "modality": settings.modality,
        "metric": settings.metric,
        "epochs": settings.epochs,
        "settings": settings.to_dict(),
        "pretrained": str(path),
    }
    if settings.folds:
        metrics.update(
            value=float(np.mean([r["value"] for r in results.values()])),
            chance=float(np.mean([r["chance"] for r in results.values()])),
            # Every clip is evaluated once, in its own fold; each trains on the others.
            train_clips=sum(r["eval_clips"] for r in results.values()),
            eval_clips=sum(r["eval_clips"] for r in results.values()),
            folds=results,
        )
    else:
        single = results["run"]
        metrics.update({k: single[k] for k in ("value", "chance", "train_clips", "eval_clips", "steps", "history")})
    return metrics


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav finetune``."""
    add_settings(p, 'FinetuneSettings, e.g. \'{"recipe": "esc50"}\'')
    add_pretrained(p)
    add_dataset_inputs(p)
    p.add_argument("--out", required=True, type=Path, help="where metrics.json goes")
    p.add_argument("--work-dir", required=True, type=Path, help="checkpoints and logs; a re-run resumes from here")
    p.add_argument("--max-steps", type=int, help="stop each run after this many steps (smoke tests; default: all)")


def main(argv: Sequence[str] | None = None) -> int:
    """``equiav finetune ARGV``: 0 when metrics.json is written, EXIT_INTERRUPTED after a stop signal."""
    from equiav.cli import main as equiav_main

    return equiav_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav finetune`` (logging is set up by equiav.cli)."""
    if args.max_steps is not None and args.max_steps < 1:
        raise SystemExit(f"--max-steps must be >= 1, got {args.max_steps}")
    settings = FinetuneSettings.from_dict(args.settings)
    inputs = DatasetInputs.load(args.usable, args.classes, args.norm_stats)
    info = setup_distributed()
    try:
        metrics = finetune(settings, args.pretrained, inputs, args.work_dir, info=info, max_steps=args.max_steps)
        if metrics is None:
            return EXIT_INTERRUPTED
        if info.is_main:
            _atomic_write_json(Path(args.out), metrics)
            log.info("%s = %.4f (chance %.4f) -> %s", settings.metric, metrics["value"], metrics["chance"], args.out)
        return 0
    finally:
        cleanup_distributed()


if __name__ == "__main__":
    sys.exit(main())
