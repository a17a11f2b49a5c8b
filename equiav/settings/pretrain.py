"""Every pre-training setting (``PretrainSettings``; docs/training.md), checked without torch."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from equiav.settings import PRECISIONS, reject_unknown_keys
from equiav.settings.augment import AudioAugmentConfig
from equiav.settings.model import ModelConfig

__all__ = [
    "AUDIO_AUGMENT_SWITCHES",
    "IMPORT_TYPES",
    "MODEL_PRESETS",
    "RESUMABLE_CHANGES",
    "STRATEGIES",
    "ImportSettings",
    "PretrainSettings",
    "model_config_of",
]

STRATEGIES: tuple[str, ...] = ("joint", "two_stage", "alternating")
MODEL_PRESETS: dict[str, Any] = {"vit_base": ModelConfig.vit_base, "tiny": ModelConfig.tiny}
# The AudioAugmentConfig fields that `audio_augment` may set: only the switches that restore the
# release's behaviour (docs/method.md); the distributions themselves stay the paper's.
AUDIO_AUGMENT_SWITCHES: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(AudioAugmentConfig) if f.name.startswith("release_")
)
# Settings that may differ between a checkpoint and the run that resumes it: they change how
# often things are written or how data is loaded, never what is computed.
RESUMABLE_CHANGES: tuple[str, ...] = ("num_workers", "log_every", "checkpoint_every", "keep_checkpoints")
# timm's name of the MAE ImageNet-1k ViT-B/16 encoder (equiav.model.pretrained.MAE_MODEL_NAME).
MAE_TIMM_MODEL = "vit_base_patch16_224.mae"


def model_config_of(model: Mapping[str, Any]) -> ModelConfig:
    """The ModelConfig of a `model` section: {"preset": "vit_base" | "tiny", other ModelConfig
    fields as overrides}."""
    if not isinstance(model, Mapping):
        raise ValueError(f"model must be a mapping like {{'preset': 'vit_base'}}, got {model!r}")
    overrides = dict(model)
    preset = overrides.pop("preset", "vit_base")
    if preset not in MODEL_PRESETS:
        raise ValueError(f"model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    reject_unknown_keys(ModelConfig, overrides, "model setting(s)")
    return MODEL_PRESETS[preset](**overrides)


@dataclass(frozen=True)
class PretrainSettings:
    """Every pre-training setting; the defaults are the paper's recipe (method.md section 7).

    model: {"preset": "vit_base" | "tiny", plus any ModelConfig field to override}.
    mae_weights: MAE ViT-B/16 initialisation: None (random), a local file, or "hub" (timm, online).
    splits: the splits of usable.csv to train on.
    epochs, batch_size (global, divided among the processes), lr (peak), start_lr, min_lr,
        warmup_epochs (may be fractional), weight_decay, betas, clip_grad (max gradient norm;
        None for none): AdamW with a per-iteration linear warm-up + cosine schedule.
    precision: "auto" (bf16 on CUDA where supported, fp16 on older GPUs, fp32 on the CPU),
        "fp32", "bf16" or "fp16".
    num_workers: DataLoader processes per training process.
    seed: every random choice (model init, data order, frames, augmentations) derives from it.
    temperature, weight_inter, weight_audio, weight_visual, positive_in_denominator: EquiAVLoss.
    strategy: "joint" (the weighted sum, the paper), "two_stage" (intra-modal terms only for
        the first half of the steps, then the inter-modal term only) or "alternating" (intra on
        even iterations, inter on odd ones): paper Table 7.
    independent_visual_frame: the augmented view from a second, independently drawn frame (the
        release) instead of the clean view's frame (method.md [fix]).
    augment_chunk: rows per augmentation generator (docs/training.md); the per-process batch
        must be a multiple. null: gcd(per-process batch, 16). Runs with different process
        counts draw the same augmentations when the chunk is the same and divides every
        per-process batch involved.
    audio_augment: {switch: bool} for the AUDIO_AUGMENT_SWITCHES of AudioAugmentConfig (all
        false, the fixes, by default; true restores the release's behaviour, docs/augment.md).
        Stored with every switch filled in.
    checkpoint_every (steps), keep_checkpoints, log_every (steps), compile (torch.compile, CUDA only).
    """

    model: dict[str, Any] = field(default_factory=lambda: {"preset": "vit_base"})
    mae_weights: str | None = "hub"
    splits: tuple[str, ...] = ("train",)
    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-4
    start_lr: float = 1e-6
    min_lr: float = 1e-6
    warmup_epochs: float = 2
    weight_decay: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float | None = 0.01
    precision: str = "auto"
    num_workers: int = 4
    seed: int = 0
    temperature: float = 0.07
    weight_inter: float = 1.0
    weight_audio: float = 1.0
    weight_visual: float = 1.0
    positive_in_denominator: bool = True
    strategy: str = "joint"
    independent_visual_frame: bool = False
    augment_chunk: int | None = None
    audio_augment: dict[str, bool] = field(default_factory=dict)
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    log_every: int = 10
    compile: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.model, Mapping):
            raise ValueError(f"model must be a mapping like {{'preset': 'vit_base'}}, got {self.model!r}")
        if isinstance(self.splits, str):
            raise ValueError(
                f"splits must be a list of split names, e.g. [{self.splits!r}], got the string {self.splits!r}"
            )
        # Normalise JSON lists to tuples so that equal settings compare equal.
        object.__setattr__(self, "splits", tuple(self.splits))
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "model", dict(self.model))
        if not isinstance(self.audio_augment, Mapping):
            raise ValueError(
                f"audio_augment must be a mapping like {{'release_clamp': true}}, got {self.audio_augment!r}"
            )
        # Every switch spelt out, so that the stored settings say what the run did.
        object.__setattr__(
            self, "audio_augment", {name: False for name in AUDIO_AUGMENT_SWITCHES} | dict(self.audio_augment)
        )
        problems = self._problems()
        if problems:
            raise ValueError("invalid pre-training settings: " + "; ".join(problems))
        self.model_config()  # an invalid model section fails here, with ModelConfig's message

    def _problems(self) -> list[str]:
        problems = []
        for name in ("epochs", "batch_size", "augment_chunk", "checkpoint_every", "keep_checkpoints", "log_every"):
            value = getattr(self, name)
            if name == "augment_chunk" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.num_workers, bool) or not isinstance(self.num_workers, int) or self.num_workers < 0:
            problems.append(f"num_workers must be an integer >= 0, got {self.num_workers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if not self.splits or not all(isinstance(s, str) for s in self.splits):
            problems.append(f"splits must be a non-empty list of split names, got {list(self.splits)!r}")
        for name in ("lr", "start_lr", "min_lr", "weight_decay", "warmup_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                problems.append(f"{name} must be a finite number >= 0, got {value!r}")
            elif name == "lr" and value == 0:
                problems.append("lr must be > 0 (the peak learning rate), got 0")
        if len(self.betas) != 2 or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas):
            problems.append(f"betas must be two numbers in [0, 1), got {list(self.betas)!r}")
        if self.clip_grad is not None and not (isinstance(self.clip_grad, (int, float)) and self.clip_grad > 0):
            problems.append(f"clip_grad must be > 0 or null (no clipping), got {self.clip_grad!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision={self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy={self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        elif self.strategy != "joint" and (self.weight_inter == 0 or self.weight_audio + self.weight_visual == 0):
            problems.append(
                f"strategy={self.strategy!r} trains the intra-modal and the inter-modal terms in turn, so "
                "weight_inter and weight_audio + weight_visual must both be > 0"
            )
        if self.mae_weights is not None and not isinstance(self.mae_weights, str):
            problems.append(f"mae_weights must be null, 'hub' or a file path, got {self.mae_weights!r}")
        for name in ("positive_in_denominator", "independent_visual_frame", "compile"):
            if not isinstance(getattr(self, name), bool):
                problems.append(f"{name} must be true or false, got {getattr(self, name)!r}")
        unknown = sorted(set(self.audio_augment) - set(AUDIO_AUGMENT_SWITCHES))
        if unknown:
            problems.append(
                f"unknown audio_augment setting(s) {', '.join(map(repr, unknown))}; known: {', '.join(AUDIO_AUGMENT_SWITCHES)}"
            )
        for name, value in self.audio_augment.items():
            if name not in unknown and not isinstance(value, bool):
                problems.append(f"audio_augment.{name} must be true or false, got {value!r}")
        return problems

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> PretrainSettings:
        """Settings from a (JSON) mapping; missing keys take their defaults, unknown keys are an
        error (a typo must not silently train with a default)."""
        reject_unknown_keys(cls, values, "pre-training setting(s)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (tuples as lists), as stored in checkpoints and weights."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def model_config(self) -> ModelConfig:
        """The ModelConfig of ``model``: the preset with the other keys as overrides."""
        return model_config_of(self.model)

    def audio_augment_config(self) -> AudioAugmentConfig:
        """The AudioAugmentConfig training draws from: the paper's, with ``audio_augment``'s switches."""
        return AudioAugmentConfig(**self.audio_augment)


# Where an imported (not trained) pre-trained model comes from (ImportSettings.type).
IMPORT_TYPES: tuple[str, ...] = ("release", "mae", "scratch")


@dataclass(frozen=True)
class ImportSettings:
    """A pre-trained model taken as it is instead of trained (a `pretrain` entry's `import`).

    type: "release" (the authors' released EquiAV checkpoint, converted), "mae" (MAE ViT-B/16
        ImageNet weights in both towers, the predictors and heads freshly initialised: the
        paper's initialisation without EquiAV pre-training) or "scratch" (random initialisation).
    path: release: the checkpoint file (required); mae: a local weights file with timm's ViT
        key names (timm's model.safetensors, or MAE's own mae_pretrain_vit_base.pth).
    timm_model: mae without `path`: a timm model name whose weights timm fetches through the
        Hugging Face hub (cached in the user's hub cache; offline only when cached there).
    model: the model's size, as pre-training's `model` ({"preset": "vit_base" | "tiny", overrides}):
        the release's and MAE's weights fit vit_base.
    seed: the initialisation of what the file does not hold (mae: predictors, heads; scratch: all).
    """

    type: str
    path: str | None = None
    timm_model: str | None = None
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "vit_base"})
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "model", dict(self.model) if isinstance(self.model, Mapping) else self.model)
        if self.type == "mae" and self.path is None and self.timm_model is None:
            object.__setattr__(self, "timm_model", MAE_TIMM_MODEL)
        problems = []
        if self.type not in IMPORT_TYPES:
            problems.append(f"type={self.type!r}; choose one of {', '.join(IMPORT_TYPES)}")
        for name in ("path", "timm_model"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                problems.append(f"{name} must be a non-empty string, got {value!r}")
        if self.type == "release" and self.path is None:
            problems.append("type 'release' needs `path`: the released checkpoint file")
        if self.type == "mae" and self.path is not None and self.timm_model is not None:
            problems.append("type 'mae' takes `path` (a local file) or `timm_model` (a timm name), not both")
        if self.type == "release" and self.timm_model is not None:
            problems.append("`timm_model` is for type 'mae'; a release checkpoint is a local file (`path`)")
        if self.type == "scratch" and (self.path is not None or self.timm_model is not None):
            problems.append("type 'scratch' reads no weights: drop `path` and `timm_model`")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            problems.append(f"seed must be an integer >= 0, got {self.seed!r}")
        if problems:
            raise ValueError("; ".join(problems))
        model_config_of(self.model)  # an invalid model section fails here, with ModelConfig's message

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> ImportSettings:
        reject_unknown_keys(cls, values, "import setting(s)")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def model_config(self) -> ModelConfig:
        return model_config_of(self.model)
