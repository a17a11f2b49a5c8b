"""The fine-tuning classifier (method.md section 8).

The pre-trained towers without predictors, projection heads or the augmented-view norms, and
one Linear head on the mean-pooled tokens: the audio or visual pooled feature [B, D], or both
concatenated [B, 2D] (audio first) for audio-visual classification.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from equiav.model.encoders import AudioEncoder, VisualEncoder
from equiav.model.equiav import EquiAV
from equiav.model.layers import init_xavier_
from equiav.settings.finetune import FINETUNE_MODALITIES
from equiav.settings.model import ModelConfig

__all__ = ["EquiAVClassifier", "FinetuneModality"]

FinetuneModality = Literal["audio", "visual", "audiovisual"]


class EquiAVClassifier(nn.Module):
    """Audio, visual or audio-visual classifier on EquiAV encoders.

    Only the towers the modality needs are built (``audio_encoder`` / ``visual_encoder``, the
    other is ``None``), plus ``head``: Linear(D or 2D, num_classes). Stochastic depth is
    ``config.drop_path`` in every block; :meth:`from_pretrained` sets it to 0.1 (the paper).

    Args:
        config: the sizes of the pre-trained model.
        num_classes: output width (logits; the loss picks sigmoid or softmax).
        modality: "audio", "visual" or "audiovisual".
    """

    def __init__(self, config: ModelConfig, num_classes: int, modality: FinetuneModality = "audiovisual") -> None:
        super().__init__()
        if modality not in FINETUNE_MODALITIES:
            raise ValueError(f"modality must be one of {', '.join(FINETUNE_MODALITIES)}, got {modality!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.config = config
        self.modality = modality
        self.uses_audio = modality in ("audio", "audiovisual")
        self.uses_visual = modality in ("visual", "audiovisual")
        self.audio_encoder = AudioEncoder(config, augmented_view=False) if self.uses_audio else None
        self.visual_encoder = VisualEncoder(config, augmented_view=False) if self.uses_visual else None
        feature_dim = config.embed_dim * (self.uses_audio + self.uses_visual)
        self.head = nn.Linear(feature_dim, num_classes)
        init_xavier_(self.head)

    @classmethod
    def from_pretrained(
        cls,
        pretrained: EquiAV | Mapping[str, Tensor],
        num_classes: int,
        modality: FinetuneModality = "audiovisual",
        *,
        config: ModelConfig | None = None,
        drop_path: float = 0.1,
    ) -> EquiAVClassifier:
        """A classifier whose encoders are copies of a pre-trained EquiAV's.

        Args:
            pretrained: an :class:`EquiAV` or its state dict (convert a release checkpoint with
                :func:`equiav.model.convert_release_state_dict` first).
            config: required with a state dict (a checkpoint stores ``config.to_dict()``);
                with a model, its own config is used.
            drop_path: stochastic-depth rate for fine-tuning (the paper uses 0.1).
        """
        if isinstance(pretrained, EquiAV):
            config = config or pretrained.config
            state = pretrained.state_dict()
        elif config is None:
            raise ValueError(
                "from_pretrained() got a state dict without config=; pass the ModelConfig it was "
                "trained with, e.g. config=ModelConfig.from_dict(checkpoint['model_config'])"
            )
        else:
            state = dict(pretrained)
        model = cls(config.replace(drop_path=drop_path), num_classes, modality)
        for name in ("audio_encoder", "visual_encoder"):
            encoder = getattr(model, name)
            if encoder is None:
                continue
            prefix = f"{name}."
            # norm_aug belongs to the augmented view of pre-training; the classifier has none.
            encoder_state = {
                key[len(prefix) :]: value
                for key, value in state.items()
                if key.startswith(prefix) and not key.startswith(f"{prefix}norm_aug.")
            }
            missing, unexpected = encoder.load_state_dict(encoder_state, strict=False)
            if missing or unexpected:
                raise ValueError(
                    f"the pre-trained state does not fit {name}: missing {[prefix + k for k in missing]}, "
                    f"unexpected {[prefix + k for k in unexpected]}; is it an EquiAV state dict "
                    "built with the same ModelConfig?"
                )
        return model

    def features(self, audio: Tensor | None = None, visual: Tensor | None = None) -> Tensor:
        """Pooled features: [B, D] for one modality, [B, 2D] (audio, visual) for both. The
        input of a modality the classifier was not built for is ignored.

        Args:
            audio: spectrograms [B, T, F].
            visual: frames [B, 3, H, W], or [B, N, 3, H, W] for N frames per clip. With several
                frames the pooled features are averaged over the frames; as the head is
                linear, that equals averaging the logits of the frames.
        """
        parts = []
        if self.uses_audio:
            if audio is None:
                raise ValueError(f"modality={self.modality!r} needs audio [B, T, F]")
            parts.append(self.audio_encoder(audio).mean(dim=1))
        if self.uses_visual:
            if visual is None:
                raise ValueError(f"modality={self.modality!r} needs visual [B, 3, H, W] or [B, N, 3, H, W]")
            if visual.ndim == 5:
                batch, frames = visual.shape[:2]
                pooled = self.visual_encoder(visual.flatten(0, 1)).mean(dim=1)
                parts.append(pooled.view(batch, frames, -1).mean(dim=1))
            else:
                parts.append(self.visual_encoder(visual).mean(dim=1))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def forward(self, audio: Tensor | None = None, visual: Tensor | None = None) -> Tensor:
        """Logits [B, num_classes]; inputs as in :meth:`features`."""
        return self.head(self.features(audio, visual))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute encoder blocks in the backward pass (saves activation memory)."""
        for encoder in (self.audio_encoder, self.visual_encoder):
            if encoder is not None:
                encoder.set_grad_checkpointing(enable)
