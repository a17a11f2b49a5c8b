"""MAE initialisation of both towers (method.md section 2).

Where the weights of timm's ``vit_base_patch16_224.mae`` (the MAE ImageNet-1k ViT-B/16
encoder) land in each tower:

================================  ====================================================
MAE key                           destination in ``{audio,visual}_encoder``
================================  ====================================================
``blocks.*``                      ``blocks.*`` (unchanged)
``patch_embed.proj.weight``       visual: unchanged [D, 3, 16, 16]; audio: summed over
                                  the 3 RGB channels -> [D, 1, 16, 16] (the same as
                                  feeding the spectrogram as 3 equal channels, as the
                                  release does)
``patch_embed.proj.bias``         ``patch_embed.proj.bias``
``norm.*``                        ``norm.*`` and ``norm_aug.*`` (the release loads only
                                  ``norm``: pass ``aug_norm=False`` for that)
``cls_token``, ``pos_embed``      ignored (no CLS token; fixed sin-cos positions)
anything else (``head.*``, ...)   ignored
================================  ====================================================

Not in MAE and left as initialised: ``modality_embed``. ``norm_aug`` also gets MAE's final
norm by default so that both views start from the same function of the shared blocks; in the
release it starts as the identity LayerNorm.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from equiav.settings.pretrain import MAE_TIMM_MODEL

__all__ = ["MAE_MODEL_NAME", "MAELoadReport", "load_mae_weights", "read_mae_state_dict", "timm_state_dict"]

log = logging.getLogger(__name__)

MAE_MODEL_NAME = MAE_TIMM_MODEL
_TOWERS = ("audio_encoder", "visual_encoder")


@dataclass
class MAELoadReport:
    """What :func:`load_mae_weights` did.

    loaded: destination keys that received MAE weights (``audio_encoder.blocks.0.attn.qkv.weight``, ...).
    ignored: MAE keys deliberately not used (``cls_token``, ``pos_embed``, heads).
    missing: tower parameters MAE has no weights for (left as initialised).
    """

    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"MAE weights: {len(self.loaded)} tensors loaded; ignored {sorted(set(self.ignored))}; "
            f"left as initialised {self.missing}"
        )


def timm_state_dict(name: str) -> dict[str, Tensor]:
    """A timm model's pre-trained weights, which timm fetches through the Hugging Face hub (or
    reads from its cache); a ValueError saying what to do where that fails (offline, say)."""
    import timm

    try:
        return timm.create_model(name, pretrained=True, num_classes=0).state_dict()
    except (OSError, RuntimeError, ValueError) as err:  # offline and not cached, unknown name, ...
        raise ValueError(
            f"timm could not give the weights of {name!r} ({type(err).__name__}: {err}); where this machine "
            f"has no network, download them elsewhere (`hf download timm/{name} model.safetensors`) and give "
            "that local file instead"
        ) from err


def read_mae_state_dict(source: str | os.PathLike | Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The MAE encoder state dict from a file, the model hub, or a mapping.

    ``source`` is one of:

    * a local file: ``.safetensors`` (e.g. timm's ``model.safetensors`` for
      ``vit_base_patch16_224.mae``) or a ``torch.save`` file (``.pth``/``.bin``/``.pt``), read
      with ``weights_only=True``; MAE's own ``mae_pretrain_vit_base.pth`` (weights under a
      ``"model"`` key) works too;
    * ``"hub"``: ``timm.create_model("vit_base_patch16_224.mae", pretrained=True)``, which
      downloads from the Hugging Face hub (online only). On an offline cluster give the local
      file instead, or point timm at it with
      ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=path))``;
    * an already loaded state dict.
    """
    if isinstance(source, Mapping):
        return dict(source)
    if source == "hub":
        return timm_state_dict(MAE_MODEL_NAME)
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(
            f"MAE weights not found at {path}; give a local .safetensors/.pth file of "
            f"{MAE_MODEL_NAME} or 'hub' to download it (online only)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]  # MAE's own checkpoint layout
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return dict(state)


def load_mae_weights(
    model: nn.Module,
    source: str | os.PathLike | Mapping[str, Tensor],
    *,
    aug_norm: bool = True,
) -> MAELoadReport:
    """Initialise every tower of ``model`` from MAE ViT-B/16 weights (in place).

    Args:
        model: an :class:`~equiav.model.EquiAV` or :class:`~equiav.model.EquiAVClassifier`
            (any module with ``audio_encoder`` and/or ``visual_encoder``).
        source: see :func:`read_mae_state_dict`.
        aug_norm: also load MAE's final norm into ``norm_aug`` (see the module docstring).

    Raises:
        ValueError: a weight's shape differs from the destination's (e.g. a tiny config with
            ViT-B weights; the message names the key and both shapes), or the checkpoint's
            depth differs from the towers'.
    """
    mae = read_mae_state_dict(source)
    towers = {name: getattr(model, name, None) for name in _TOWERS}
    towers = {name: tower for name, tower in towers.items() if tower is not None}
    if not towers:
        raise ValueError(f"{type(model).__name__} has no audio_encoder or visual_encoder to initialise")

    report = MAELoadReport()
    used: set[str] = set()
    for tower_name, tower in towers.items():
        targets = dict(tower.named_parameters())
        for key, target in targets.items():
            source_key = _source_key(key, aug_norm)
            if source_key is None:
                report.missing.append(f"{tower_name}.{key}")
                continue
            if source_key not in mae:
                raise ValueError(
                    f"MAE weights have no {source_key!r} for {tower_name}.{key}; the checkpoint is not a "
                    f"ViT of this depth ({len(tower.blocks)} blocks) - is it {MAE_MODEL_NAME}?"
                )
            value = mae[source_key]
            if key == "patch_embed.proj.weight" and target.shape[1] == 1 and value.ndim == 4 and value.shape[1] == 3:
                value = value.sum(dim=1, keepdim=True)  # RGB kernel -> one-channel spectrogram kernel
            if value.shape != target.shape:
                raise ValueError(
                    f"MAE weight {source_key!r} has shape {tuple(mae[source_key].shape)} but "
                    f"{tower_name}.{key} has shape {tuple(target.shape)}; MAE weights fit only the "
                    "ViT-B/16 configuration (ModelConfig.vit_base())"
                )
            with torch.no_grad():
                target.copy_(value)
            used.add(source_key)
            report.loaded.append(f"{tower_name}.{key}")

    unused_blocks = sorted(key for key in mae if key.startswith("blocks.") and key not in used)
    if unused_blocks:
        raise ValueError(
            f"MAE weights have blocks the towers lack (e.g. {unused_blocks[0]!r}): the checkpoint is deeper "
            "than the model; MAE weights fit only ModelConfig.vit_base()"
        )
    report.ignored = sorted(key for key in mae if key not in used)
    log.info(report.summary())
    return report


def _source_key(key: str, aug_norm: bool) -> str | None:
    """The MAE key a tower parameter is loaded from, or None if MAE has none for it."""
    if key.startswith(("blocks.", "patch_embed.", "norm.")):
        return key
    if key.startswith("norm_aug.") and aug_norm:
        return "norm." + key.removeprefix("norm_aug.")
    return None
