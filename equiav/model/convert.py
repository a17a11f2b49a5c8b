"""Conversion between the authors' release checkpoints and this model's state dict.

The release (JongSuk1/EquiAV, ``models/pt_EquiAV.py``) saves ``EquiAV.state_dict()`` of its
training wrapper, so every model key carries the prefix ``__M__.`` (the wrapper's attribute for
``MainModel``); learnable loss temperatures, when enabled, appear as ``__L_inter__.tau`` /
``__L_intra__.tau``. ``docs/model.md`` lists every key with its ViT-B shape.

Key correspondence (``{m}`` = ``a`` / ``v`` in the release, ``audio`` / ``visual`` here;
``{i}`` = block index; ``{p}`` = ``weight`` / ``bias``):

============================================  =============================================
release (after ``__M__.``)                    this model
============================================  =============================================
patch_embed_{m}.proj.{p}                      {m}_encoder.patch_embed.proj.{p}  (*)
modality_{m}                                  {m}_encoder.modality_embed
blocks_{m}.{i}.norm1 / norm2 .{p}             {m}_encoder.blocks.{i}.norm1 / norm2 .{p}
blocks_{m}.{i}.attn.qkv / attn.proj .{p}      {m}_encoder.blocks.{i}.attn.qkv / attn.proj .{p}
blocks_{m}.{i}.mlp.fc1 / mlp.fc2 .{p}         {m}_encoder.blocks.{i}.mlp.fc1 / mlp.fc2 .{p}
norm_{m}.{p}, norm_{m}_aug.{p}                {m}_encoder.norm.{p}, {m}_encoder.norm_aug.{p}
aug_encoder_{m}.0 / .2 / .4 .{p}              {m}_predictor.aug_encoder.fc1 / fc2 / fc3 .{p}
cross_attn_{m}.norm_aug.{p}                   {m}_predictor.query_norm.{p}
cross_attn_{m}.attn.to_q / to_k / to_v .{p}   {m}_predictor.attn.q / k / v .{p}
cross_attn_{m}.attn.to_out.weight             {m}_predictor.attn.proj.weight
cross_attn_{m}.norm.{p}                       {m}_predictor.norm.{p}
cross_attn_{m}.mlp.fc1 / fc2 .{p}             {m}_predictor.mlp.fc1 / fc2 .{p}
pred_{m}_intra / pred_{m}_inter .{layer}.{p}  {m}_intra_head / {m}_inter_head .{layer}.{p}
============================================  =============================================

(*) The release feeds the spectrogram as 3 equal channels through a [D, 3, 16, 16] kernel;
here it is one channel, so the audio kernel is summed over its input channels (exactly the
same convolution of equal channels). The inverse splits it into 3 equal thirds.

Dropped, and logged: ``pos_embed_{m}`` (fixed sin-cos values this model recomputes; the
converter checks that they are the fixed values and refuses learned ones), the unused block
norms ``blocks_{m}.{i}.norm1_a/norm1_v/norm2_a/norm2_v`` (the release's blocks always run with
``modality=None``), and the loss temperatures. Any other key is an error.
"""

from __future__ import annotations

import logging
import re
import string
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from equiav.model.encoders import sincos_pos_embed_2d
from equiav.settings.model import ModelConfig

__all__ = ["RELEASE_PREFIX", "convert_release_state_dict", "looks_like_release_state", "to_release_state_dict"]

log = logging.getLogger(__name__)

RELEASE_PREFIX = "__M__."

# Placeholder -> (regex in release keys, regex in our keys); "m" is translated between sides.
_PLACEHOLDERS = {
    "m": ("a|v", "audio|visual"),
    "i": (r"\d+", r"\d+"),
    "p": ("weight|bias", "weight|bias"),
    "block_layer": (r"norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2",) * 2,
    "qkv": ("q|k|v", "q|k|v"),
    "fc": ("fc1|fc2", "fc1|fc2"),
    "kind": ("intra|inter", "intra|inter"),
    "head_layer": ("fc1|fc2|fc3|norm1|norm2|norm3",) * 2,
}
_MODALITY = {"a": "audio", "v": "visual"}

# (release template, our template); both directions use the same table.
_RULES: tuple[tuple[str, str], ...] = (
    ("patch_embed_{m}.proj.{p}", "{m}_encoder.patch_embed.proj.{p}"),
    ("modality_{m}", "{m}_encoder.modality_embed"),
    ("blocks_{m}.{i}.{block_layer}.{p}", "{m}_encoder.blocks.{i}.{block_layer}.{p}"),
    ("norm_{m}.{p}", "{m}_encoder.norm.{p}"),
    ("norm_{m}_aug.{p}", "{m}_encoder.norm_aug.{p}"),
    ("aug_encoder_{m}.0.{p}", "{m}_predictor.aug_encoder.fc1.{p}"),
    ("aug_encoder_{m}.2.{p}", "{m}_predictor.aug_encoder.fc2.{p}"),
    ("aug_encoder_{m}.4.{p}", "{m}_predictor.aug_encoder.fc3.{p}"),
    ("cross_attn_{m}.norm_aug.{p}", "{m}_predictor.query_norm.{p}"),
    ("cross_attn_{m}.attn.to_{qkv}.{p}", "{m}_predictor.attn.{qkv}.{p}"),
    ("cross_attn_{m}.attn.to_out.weight", "{m}_predictor.attn.proj.weight"),
    ("cross_attn_{m}.norm.{p}", "{m}_predictor.norm.{p}"),
    ("cross_attn_{m}.mlp.{fc}.{p}", "{m}_predictor.mlp.{fc}.{p}"),
    ("pred_{m}_{kind}.{head_layer}.{p}", "{m}_{kind}_head.{head_layer}.{p}"),
)
# Release keys (full, with their prefix) that have no counterpart here, and why.
_DROPPED: tuple[tuple[str, str], ...] = (
    (r"__M__\.pos_embed_(a|v)", "fixed sin-cos positional embedding (recomputed by the model)"),
    (r"__M__\.blocks_(a|v)\.\d+\.norm[12]_(a|v)\.(weight|bias)", "per-modality block norm the release never uses"),
    (r"__L_(inter|intra)__\.tau", "learnable loss temperature (this project's losses use a fixed tau)"),
)
_UNUSED_BLOCK_NORMS = ("norm1_a", "norm1_v", "norm2_a", "norm2_v")
_AUDIO_KERNEL = "audio_encoder.patch_embed.proj.weight"


def _compile(template: str, side: int) -> re.Pattern[str]:
    pattern = ""
    for literal, name, _, _ in string.Formatter().parse(template):
        pattern += re.escape(literal)
        if name is not None:
            pattern += f"(?P<{name}>{_PLACEHOLDERS[name][side]})"
    return re.compile(pattern)


_TO_OURS = tuple((_compile(theirs, 0), ours) for theirs, ours in _RULES)
_TO_THEIRS = tuple((_compile(ours, 1), theirs) for theirs, ours in _RULES)
_DROPPED_COMPILED = tuple((re.compile(pattern), reason) for pattern, reason in _DROPPED)


def _rename(key: str, rules: tuple[tuple[re.Pattern[str], str], ...], modality: Mapping[str, str]) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(key)
        if match:
            fields = match.groupdict()
            fields["m"] = modality[fields["m"]]
            return template.format(**fields)
    return None


def convert_release_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A release pre-training checkpoint -> a state dict for :class:`~equiav.model.EquiAV`.

    Accepts the release's saved layout (``__M__.`` prefix), the same with a DDP ``module.``
    prefix, or the bare ``MainModel`` state dict. Load the result with
    ``EquiAV(config).load_state_dict(converted)`` for a config with
    ``predictor="cross_attention"`` and the release's sizes. Dropped keys are logged at INFO.

    Raises:
        ValueError: a key the release model does not have, or positional embeddings that are
            not the fixed sin-cos values (a checkpoint trained with learned positions).
    """
    converted: dict[str, Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for original_key, value in state_dict.items():
        key = original_key.removeprefix("module.")
        if not key.startswith((RELEASE_PREFIX, "__L_")):
            key = RELEASE_PREFIX + key  # the bare MainModel state dict
        if any(pattern.fullmatch(key) for pattern, _ in _DROPPED_COMPILED):
            if key.startswith(RELEASE_PREFIX + "pos_embed_"):
                _check_release_pos_embed(original_key, value)
            dropped.append(original_key)
            continue
        ours = _rename(key.removeprefix(RELEASE_PREFIX), _TO_OURS, _MODALITY)
        if ours is None:
            unknown.append(original_key)
            continue
        if ours == _AUDIO_KERNEL and value.ndim == 4 and value.shape[1] == 3:
            # The release convolves 3 identical copies of the spectrogram: one channel with the
            # summed kernel computes the same.
            value = value.sum(dim=1, keepdim=True)
        converted[ours] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not in the release's pt_EquiAV model: {unknown[:10]}"
            f"{' ...' if len(unknown) > 10 else ''}; is this a pre-training checkpoint of JongSuk1/EquiAV?"
        )
    if dropped:
        log.info("release checkpoint: dropped %d key(s) with no counterpart: %s", len(dropped), _summarise(dropped))
    return converted


def to_release_state_dict(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The inverse of :func:`convert_release_state_dict`: the release's saved layout
    (``__M__.`` keys), with the fixed positional embeddings and the unused block norms (at
    their initial values, ones and zeros) that the release model carries.

    ``config`` gives the patch grids for the positional embeddings. Raises ``ValueError`` for
    keys the release has no place for (e.g. the linear or hypernetwork predictors).
    """
    theirs: dict[str, Tensor] = {}
    unknown: list[str] = []
    reverse_modality = {full: short for short, full in _MODALITY.items()}
    blocks: set[tuple[str, str]] = set()
    for key, value in state_dict.items():
        release_key = _rename(key, _TO_THEIRS, reverse_modality)
        if release_key is None:
            unknown.append(key)
            continue
        if key == _AUDIO_KERNEL and value.shape[1] == 1:
            value = (value / 3).expand(-1, 3, -1, -1).contiguous()
        theirs[RELEASE_PREFIX + release_key] = value
        block = re.match(r"(blocks_[av])\.(\d+)\.", release_key)
        if block:
            blocks.add(block.groups())
    if unknown:
        raise ValueError(
            f"key(s) with no place in the release model: {unknown[:10]}; only "
            "predictor='cross_attention' models have a release layout"
        )
    # The added tensors follow the device and dtype of the given weights.
    like = next(iter(state_dict.values()))
    options = {"device": like.device, "dtype": like.dtype}
    for name, grid in (("pos_embed_a", config.audio_grid), ("pos_embed_v", config.visual_grid)):
        theirs[RELEASE_PREFIX + name] = sincos_pos_embed_2d(config.embed_dim, grid).unsqueeze(0).to(**options)
    for block_name, index in sorted(blocks):
        for norm in _UNUSED_BLOCK_NORMS:
            theirs[f"{RELEASE_PREFIX}{block_name}.{index}.{norm}.weight"] = torch.ones(config.embed_dim, **options)
            theirs[f"{RELEASE_PREFIX}{block_name}.{index}.{norm}.bias"] = torch.zeros(config.embed_dim, **options)
    return theirs


def _check_release_pos_embed(key: str, value: Tensor) -> None:
    """Refuse to drop positional embeddings that are not the release's fixed values."""
    tokens, width = value.shape[-2:]
    if key.endswith("pos_embed_a"):
        grid = (8, tokens // 8)  # the release hard-codes 8 frequency rows (128 mel bins / 16)
    else:
        side = round(tokens**0.5)
        grid = (side, side)
    expected = sincos_pos_embed_2d(width, grid)
    if expected.shape[0] != tokens or not torch.allclose(value.reshape(tokens, width).float(), expected, atol=1e-4):
        raise ValueError(
            f"{key} is not the fixed 2-D sin-cos embedding of a {grid[0]} x {grid[1]} grid; the checkpoint "
            "was probably trained with learned positions (tr_pos=True), which this model does not support"
        )


def _summarise(keys: list[str]) -> str:
    """Group keys that differ only in block index / modality, for a short log line."""
    groups = sorted({re.sub(r"\.\d+\.", ".*.", key) for key in keys})
    return ", ".join(groups)


def looks_like_release_state(state: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint (its state dict at the top level or under ``model``) has the
    release's key names."""
    keys = state.get("model", state)
    return isinstance(keys, Mapping) and any(
        isinstance(k, str) and k.removeprefix("module.").startswith((RELEASE_PREFIX, "patch_embed_a", "blocks_a."))
        for k in keys
    )
