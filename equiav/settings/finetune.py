"""Every fine-tuning setting (``FinetuneSettings``) and the paper's recipes (docs/evaluation.md),
checked without torch."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from equiav.settings import PRECISIONS, is_int, reject_unknown_keys

__all__ = ["EVAL_FRAMES", "FINETUNE_MODALITIES", "METRICS", "RECIPES", "RESUMABLE_CHANGES", "TASKS", "FinetuneSettings"]

FINETUNE_MODALITIES: tuple[str, ...] = ("audio", "visual", "audiovisual")
TASKS: tuple[str, ...] = ("multilabel", "multiclass")
METRICS: tuple[str, ...] = ("map", "accuracy")
EVAL_FRAMES: tuple[str, ...] = ("middle", "all")
# Settings that do not change what a run computes: a resumed run may differ in them.
RESUMABLE_CHANGES: tuple[str, ...] = ("num_workers",)


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
            if not is_int(value) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("num_workers", "freq_mask", "time_mask", "seed"):
            value = getattr(self, name)
            if not is_int(value) or value < 0:
                problems.append(f"{name} must be an integer >= 0, got {value!r}")
        for name in ("lr", "head_lr_multiplier"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("start_lr", "min_lr", "weight_decay", "warmup_epochs"):
            if not getattr(self, name) >= 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if is_int(self.epochs) and self.warmup_epochs > self.epochs:
            problems.append(f"warmup_epochs={self.warmup_epochs} exceeds epochs={self.epochs}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if not 0 <= self.mixup <= 1:
            problems.append(f"mixup is the fraction of mixed clips and must lie in [0, 1], got {self.mixup!r}")
        if not 0 <= self.drop_path < 1:
            problems.append(f"drop_path must lie in [0, 1), got {self.drop_path!r}")
        if self.samples_per_epoch is not None:
            if not is_int(self.samples_per_epoch) or self.samples_per_epoch < 1:
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
