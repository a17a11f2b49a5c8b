"""Pre-trained models taken as they are instead of trained (`equiav import-model`): the authors'
released checkpoint, MAE's ImageNet weights with fresh predictors and heads, or a random
initialisation. Each is written as the pre-train stage writes its model.pt, so fine-tuning,
retrieval, the report and the tables read it the same way; its ``origin`` says where it came from.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from equiav.model import EquiAV, convert_release_state_dict, load_mae_weights
from equiav.model.pretrained import timm_state_dict
from equiav.options import add_settings
from equiav.settings.pretrain import ImportSettings
from equiav.train.checkpoint import code_revision, export_weights, read_weights_file

__all__ = ["add_arguments", "build_model", "origin_of", "release_weights", "run"]

log = logging.getLogger(__name__)


def release_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The state dict of a release checkpoint (``__M__.`` keys, at the top level or under
    ``model``), converted to this model's names."""
    state = read_weights_file(path)
    if "model_config" in state:
        raise ValueError(
            f"{str(path)!r} is an equiav export (it has a model_config), not a release checkpoint: "
            "use it as it is (drop --release; `equiav finetune --pretrained` takes it too)"
        )
    weights = state.get("model", state)
    if not isinstance(weights, Mapping):
        raise ValueError(f"{str(path)!r} holds no state dict (under 'model' or at the top level)")
    return convert_release_state_dict(weights)


def build_model(settings: ImportSettings) -> EquiAV:
    """The EquiAV model the settings describe, its weights read or initialised."""
    config = settings.model_config()
    torch.manual_seed(settings.seed)  # what no file holds: scratch's whole model, MAE's predictors and heads
    model = EquiAV(config)
    if settings.type == "release":
        weights = release_weights(settings.path)
        misfit = _misfit(model.state_dict(), weights)
        if misfit:
            raise ValueError(
                f"the release checkpoint {settings.path!r} does not fit the model {settings.model}: {misfit}; "
                "set `import.model` to the checkpoint's size (the authors' release: {preset: vit_base})"
            )
        model.load_state_dict(weights)
    elif settings.type == "mae":
        source = settings.path if settings.path is not None else timm_state_dict(settings.timm_model)
        load_mae_weights(model, source)
    return model


def _misfit(expected: Mapping[str, Tensor], weights: Mapping[str, Tensor]) -> str:
    """Why ``weights`` cannot be loaded into a model of state ``expected`` ("" when they can)."""
    for key, tensor in expected.items():
        if key in weights and weights[key].shape != tensor.shape:
            return f"{key} is {list(weights[key].shape)} there and {list(tensor.shape)} in the model"
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        return f"{len(missing)} tensor(s) missing (e.g. {missing[:1]}), {len(extra)} more than the model has (e.g. {extra[:1]})"
    return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def origin_of(settings: ImportSettings) -> dict[str, Any]:
    """What the exported model records of where it came from (the tables name it)."""
    origin: dict[str, Any] = {"type": settings.type, "seed": settings.seed}
    if settings.path is not None:
        path = Path(settings.path)
        origin.update(path=str(path.resolve()), sha256=_sha256(path))
    if settings.timm_model is not None:
        origin["timm_model"] = settings.timm_model
    return origin


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``equiav import-model``."""
    add_settings(p, "where the model comes from (ImportSettings: type, path, timm_model, model, seed)")
    p.add_argument("--out", required=True, type=Path, help="the model file, as the pre-train stage writes it")


def run(args: argparse.Namespace) -> int:
    """The body of ``equiav import-model``: 0 when written, 2 when the settings or the file do not fit."""
    try:
        settings = ImportSettings.from_dict(args.settings)
        model = build_model(settings)
        origin = origin_of(settings)
    except (ValueError, FileNotFoundError) as err:
        print(f"equiav import-model: {err}", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    extra = {"origin": origin, "code_revision": code_revision(), "steps": 0}
    export_weights(model, args.out, config=model.config.to_dict(), extra=extra)
    parameters = sum(p.numel() for p in model.parameters())
    log.info("wrote %s: %s model (%d parameters) from %s", args.out, settings.type, parameters,
             origin.get("path") or origin.get("timm_model") or f"seed {settings.seed}")  # fmt: skip
    return 0
