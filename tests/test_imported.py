"""`equiav import-model`: the authors' release, MAE weights and scratch, written as pre-training
writes its model.pt (the workflow's use of them: tests/test_starting_points.py)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from equiav.model import EquiAV, ModelConfig, to_release_state_dict
from equiav.settings.pretrain import ImportSettings
from equiav.train.checkpoint import export_weights, load_export

TINY = {"preset": "tiny"}


def import_model(tmp_path: Path, settings: dict, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "equiav", "import-model", "--settings", json.dumps(settings),
               "--out", str(tmp_path / "model.pt")]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env={**os.environ, **(env or {})})


def tiny_release(path: Path, seed: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    config = ModelConfig.tiny()
    state = EquiAV(config).state_dict()
    torch.save(to_release_state_dict(state, config), path)
    return state


def test_a_release_checkpoint_becomes_the_models_weights(tmp_path):
    original = tiny_release(tmp_path / "release.pth")
    proc = import_model(tmp_path, {"type": "release", "path": "release.pth", "model": TINY})
    assert proc.returncode == 0, proc.stderr
    export = load_export(tmp_path / "model.pt")
    assert export["model"].keys() == original.keys()
    for key, value in original.items():
        # The audio kernel goes through the release's 3 equal channels (a third each) and back.
        assert torch.allclose(export["model"][key], value, atol=1e-6), key
    digest = hashlib.sha256((tmp_path / "release.pth").read_bytes()).hexdigest()
    assert export["origin"] == {"type": "release", "seed": 0, "path": str(tmp_path / "release.pth"), "sha256": digest}
    assert export["model_config"] == ModelConfig.tiny().to_dict() and export["steps"] == 0


def test_a_release_of_another_size_names_the_setting_to_change(tmp_path):
    tiny_release(tmp_path / "release.pth")
    proc = import_model(tmp_path, {"type": "release", "path": "release.pth"})  # vit_base by default
    assert proc.returncode == 2 and not (tmp_path / "model.pt").exists()
    assert "audio_encoder.modality_embed is [1, 1, 64] there and [1, 1, 768] in the model" in proc.stderr
    assert "set `import.model` to the checkpoint's size" in proc.stderr


def test_an_equiav_export_is_not_taken_for_a_release(tmp_path):
    model = EquiAV(ModelConfig.tiny())
    export_weights(model, tmp_path / "ours.pt", config=model.config.to_dict())
    proc = import_model(tmp_path, {"type": "release", "path": "ours.pt", "model": TINY})
    assert proc.returncode == 2 and "is an equiav export (it has a model_config), not a release" in proc.stderr


def test_mae_weights_fill_both_towers_and_the_rest_is_initialised_from_the_seed(tmp_path):
    torch.manual_seed(4)
    vit = timm.models.vision_transformer.VisionTransformer(embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)
    mae = vit.state_dict()
    save_file({k: v.contiguous() for k, v in mae.items()}, str(tmp_path / "mae.safetensors"))
    assert import_model(tmp_path, {"type": "mae", "path": "mae.safetensors", "model": TINY, "seed": 5}).returncode == 0
    weights = load_export(tmp_path / "model.pt")["model"]
    for tower in ("audio_encoder", "visual_encoder"):
        assert torch.equal(weights[f"{tower}.blocks.1.attn.qkv.weight"], mae["blocks.1.attn.qkv.weight"])
        assert torch.equal(weights[f"{tower}.norm.weight"], mae["norm.weight"])
    assert torch.equal(weights["visual_encoder.patch_embed.proj.weight"], mae["patch_embed.proj.weight"])
    assert torch.allclose(weights["audio_encoder.patch_embed.proj.weight"], mae["patch_embed.proj.weight"].sum(1, True))

    # Predictors and heads: fresh, exactly those of a random initialisation with the same seed.
    (tmp_path / "mae").mkdir()
    assert import_model(tmp_path / "mae", {"type": "scratch", "model": TINY, "seed": 5}).returncode == 0
    scratch = load_export(tmp_path / "mae" / "model.pt")["model"]
    fresh = [k for k in weights if not k.startswith(("audio_encoder.", "visual_encoder."))]
    assert any("predictor" in k for k in fresh) and any("head" in k for k in fresh)
    assert all(torch.equal(weights[k], scratch[k]) for k in fresh)
    assert not torch.equal(
        weights["visual_encoder.blocks.0.mlp.fc1.weight"], scratch["visual_encoder.blocks.0.mlp.fc1.weight"]
    )


def test_scratch_depends_on_its_seed_and_takes_any_size(tmp_path):
    models = {}
    for seed in (0, 0, 1):
        folder = tmp_path / f"{seed}-{len(models)}"
        folder.mkdir()
        proc = import_model(folder, {"type": "scratch", "model": {"preset": "tiny", "depth": 3}, "seed": seed})
        assert proc.returncode == 0, proc.stderr
        models[folder.name] = load_export(folder / "model.pt")
    first, same, other = models.values()
    assert first["model_config"]["depth"] == 3 and first["origin"] == {"type": "scratch", "seed": 0}
    key = "audio_encoder.blocks.2.attn.qkv.weight"
    assert torch.equal(first["model"][key], same["model"][key])
    assert not torch.equal(first["model"][key], other["model"][key])


def test_a_timm_name_offline_and_not_cached_says_to_give_the_file(tmp_path):
    proc = import_model(
        tmp_path, {"type": "mae", "model": TINY}, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    )
    assert proc.returncode == 2, proc.stderr
    assert "timm could not give the weights of 'vit_base_patch16_224.mae'" in proc.stderr
    assert "(`hf download timm/vit_base_patch16_224.mae model.safetensors`) and give that local file" in proc.stderr


@pytest.mark.parametrize(
    ("settings", "problem"),
    [
        ({"type": "mae", "path": "w.pth", "timm_model": "x"}, "type 'mae' takes `path` (a local file) or `timm_model`"),
        ({"type": "release", "timm_model": "x", "path": "r.pth"}, "`timm_model` is for type 'mae'"),
        ({"type": "trained"}, "type='trained'; choose one of release, mae, scratch"),
        ({"type": "scratch", "seed": -1}, "seed must be an integer >= 0"),
        ({"type": "scratch", "size": 3}, "unknown import setting(s) 'size'"),
    ],
)
def test_import_settings_name_their_problem(settings, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        ImportSettings.from_dict(settings)


def test_mae_defaults_to_timms_mae_model():
    assert ImportSettings.from_dict({"type": "mae"}).timm_model == "vit_base_patch16_224.mae"
