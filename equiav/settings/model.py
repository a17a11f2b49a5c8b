"""Every size and switch of the EquiAV model in one frozen dataclass.

``ModelConfig.vit_base()`` is the paper's model (method.md sections 2, 4, 5);
``ModelConfig.tiny()`` is a model of the same structure small enough for a CPU, used by the
demo pipeline and the tests. A checkpoint stores ``config.to_dict()`` so that
``ModelConfig.from_dict`` rebuilds exactly the model it was saved from.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from equiav.settings import reject_unknown_keys

__all__ = [
    "INTER_SOURCES",
    "INTRA_MODES",
    "PREDICTORS",
    "InterSource",
    "IntraMode",
    "ModelConfig",
    "PredictorKind",
]

PredictorKind = Literal["cross_attention", "linear", "hypernetwork"]
IntraMode = Literal["equivariant", "invariant"]
InterSource = Literal["centroid", "clean", "augmented", "equivariant"]

PREDICTORS: tuple[str, ...] = ("cross_attention", "linear", "hypernetwork")
INTRA_MODES: tuple[str, ...] = ("equivariant", "invariant")
INTER_SOURCES: tuple[str, ...] = ("centroid", "clean", "augmented", "equivariant")


@dataclass(frozen=True)
class ModelConfig:
    """Sizes and ablation switches of :class:`equiav.model.EquiAV`.

    Encoders (one ViT tower per modality, method.md section 2):
        embed_dim, depth, num_heads, mlp_ratio: width D, blocks, heads, MLP hidden = mlp_ratio * D.
        patch_size: square patches for both towers.
        audio_freq_bins, audio_frames: spectrogram size F x T; the audio grid is
            (F / patch_size) x (T / patch_size) (8 x 64 = 512 tokens for 128 x 1024).
        image_size: square frame side; the visual grid is (image_size / patch_size)^2 (196 tokens).
        drop_path: stochastic-depth rate of every encoder block (0 for pre-training, 0.1 for
            fine-tuning; the same rate in every block, as in the release).

    Transformation predictor (method.md section 4):
        predictor: "cross_attention" (the paper), "linear" (EquiMod) or "hypernetwork" (SIE),
            the variants of the paper's Table 6.
        aug_hidden: width of the augmentation encoder (256).
        cross_heads, cross_head_dim: cross-attention heads and head width (8 x 64 = 512 inner).
        hypernetwork_rank: rank of the linear map the hypernetwork predictor generates.
        The predictor's feed-forward uses ``mlp_ratio`` like the encoder blocks (768-3072-768).
        audio_param_dim, visual_param_dim: length of the augmentation parameter vectors
            (24 and 18, method.md section 3).
        centroid_samples: S, how many random parameter vectors the caller draws for the
            inter-modal centroid. The model accepts any S >= 1; this is the number the training
            and retrieval code should draw (the ablation uses 1, 4, 8, 16).

    Projection heads (method.md section 5): proj_hidden (2048) and embed_out (E = 512).

    Ablation switches (method.md section 5, paper Tables 4, 5, 7):
        intra: "equivariant" (z^ = P_intra(u(h, t))) or "invariant" (z = P_intra(mean h)).
        inter_source: which 768-d feature feeds the inter-modal head: "centroid"
            (u(h, {t_1..t_S}), the paper), "clean" (mean h), "augmented" (mean h') or
            "equivariant" (u(h, t) with the applied t).
    """

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    patch_size: int = 16
    audio_freq_bins: int = 128
    audio_frames: int = 1024
    image_size: int = 224
    proj_hidden: int = 2048
    embed_out: int = 512
    aug_hidden: int = 256
    cross_heads: int = 8
    cross_head_dim: int = 64
    predictor: PredictorKind = "cross_attention"
    hypernetwork_rank: int = 8
    drop_path: float = 0.0
    audio_param_dim: int = 24
    visual_param_dim: int = 18
    centroid_samples: int = 16
    intra: IntraMode = "equivariant"
    inter_source: InterSource = "centroid"

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid ModelConfig: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        positive = (
            "embed_dim", "depth", "num_heads", "patch_size", "audio_freq_bins", "audio_frames",
            "image_size", "proj_hidden", "embed_out", "aug_hidden", "cross_heads",
            "cross_head_dim", "hypernetwork_rank", "audio_param_dim", "visual_param_dim",
            "centroid_samples",
        )  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        if problems:  # the divisibility checks below need integers
            return problems
        if self.embed_dim % self.num_heads:
            problems.append(
                f"embed_dim={self.embed_dim} is not divisible by num_heads={self.num_heads}; "
                "pick num_heads among the divisors of embed_dim"
            )
        if self.embed_dim % 4:
            # The 2-D sin-cos embedding gives a quarter of the width to each of sin/cos x row/column.
            problems.append(f"embed_dim={self.embed_dim} must be a multiple of 4 (2-D sin-cos positions)")
        for name in ("audio_freq_bins", "audio_frames", "image_size"):
            value = getattr(self, name)
            if value % self.patch_size:
                fix = (value // self.patch_size + 1) * self.patch_size
                problems.append(
                    f"{name}={value} is not a multiple of patch_size={self.patch_size}; "
                    f"pad or trim the input to e.g. {fix}"
                )
        if not self.mlp_ratio > 0:
            problems.append(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.drop_path < 1.0:
            problems.append(f"drop_path must be in [0, 1), got {self.drop_path!r}")
        for name, allowed in (
            ("predictor", PREDICTORS),
            ("intra", INTRA_MODES),
            ("inter_source", INTER_SOURCES),
        ):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r} is not one of {', '.join(allowed)}")
        return problems

    # ---- presets -------------------------------------------------------------------------

    @classmethod
    def vit_base(cls, **overrides: Any) -> ModelConfig:
        """The paper's model: two ViT-B/16 towers, 1024-frame spectrograms, 224 px frames."""
        return cls(**overrides)

    @classmethod
    def tiny(cls, audio_frames: int = 304, **overrides: Any) -> ModelConfig:
        """A model of the paper's structure at toy width: forward and backward of a batch of 2
        take a fraction of a second on a CPU. ``overrides`` replace any other field."""
        values: dict[str, Any] = dict(
            embed_dim=64,
            depth=2,
            num_heads=4,
            mlp_ratio=2.0,
            audio_frames=audio_frames,
            proj_hidden=128,
            embed_out=64,
            aug_hidden=64,
            cross_heads=2,
            cross_head_dim=32,
            hypernetwork_rank=4,
        )
        values.update(overrides)
        return cls(**values)

    # ---- derived sizes -------------------------------------------------------------------

    @property
    def audio_grid(self) -> tuple[int, int]:
        """Patch grid of the audio tower: (frequency rows, time columns)."""
        return self.audio_freq_bins // self.patch_size, self.audio_frames // self.patch_size

    @property
    def visual_grid(self) -> tuple[int, int]:
        """Patch grid of the visual tower: (rows, columns)."""
        side = self.image_size // self.patch_size
        return side, side

    @property
    def uses_predictor(self) -> bool:
        """Whether any embedding goes through the transformation predictor.

        Only intra="invariant" with inter_source "clean" or "augmented" does without it; the
        model then builds no predictor at all, so that no parameter is left without a gradient.
        """
        return self.intra == "equivariant" or self.inter_source in ("centroid", "equivariant")

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field, for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (a typo must not silently
        fall back to a default size)."""
        reject_unknown_keys(cls, values, "ModelConfig key(s)")
        return cls(**values)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated like a new config)."""
        return dataclasses.replace(self, **changes)
