"""Outputs appear whole or not at all (equiav.atomic), and exported models are checked on load
(equiav.train.checkpoint.load_export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from equiav.atomic import atomic_output, write_json
from equiav.model import EquiAV, ModelConfig, to_release_state_dict
from equiav.train.checkpoint import export_weights, load_export


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "metrics.json"
    write_json(out, {"value": 1})
    with pytest.raises(OSError, match="disk full"), atomic_output(out) as tmp:
        tmp.write_text('{"value": 2, "half')
        raise OSError("disk full")
    assert json.loads(out.read_text()) == {"value": 1}
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]


def test_the_temporary_keeps_the_suffix_and_hides(tmp_path: Path) -> None:
    with atomic_output(tmp_path / "e.npz", durable=True) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".e.tmp") and tmp.suffix == ".npz"
        tmp.write_bytes(b"x")
    assert (tmp_path / "e.npz").read_bytes() == b"x"


def test_load_export_checks_what_it_reads(tmp_path: Path) -> None:
    config = ModelConfig.tiny(audio_frames=64, image_size=32)
    model = EquiAV(config)
    good = tmp_path / "model.pt"
    export_weights(model, good, config=config.to_dict())
    assert set(load_export(good)) >= {"model", "model_config"}

    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_export(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_export(tmp_path / "text.pt")
    release = tmp_path / "release.pt"
    torch.save(to_release_state_dict(model.state_dict(), config), release)
    with pytest.raises(ValueError, match="pass --release"):
        load_export(release)
    bad_config = tmp_path / "bad_config.pt"
    torch.save({"model": model.state_dict(), "model_config": {**config.to_dict(), "depth": 0}}, bad_config)
    with pytest.raises(ValueError, match="not a valid ModelConfig"):
        load_export(bad_config)
    no_tensors = tmp_path / "no_tensors.pt"
    torch.save({"model": {"w": [1, 2]}, "model_config": config.to_dict()}, no_tensors)
    with pytest.raises(ValueError, match="must be a state dict"):
        load_export(no_tensors)
