"""Tests for equiav.train.common and equiav.train.checkpoint (the plumbing shared by
pre-training and fine-tuning). CPU only; the CUDA-only cases skip without a GPU."""

from __future__ import annotations

import csv
import math
import os
import pickle
import random
import signal
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, Dataset

from equiav.model import EquiAV, ModelConfig
from equiav.train import checkpoint as ckpt
from equiav.train.checkpoint import (
    Checkpointer,
    capture_rng_state,
    code_revision,
    export_weights,
    load_export,
    restore_rng_state,
)
from equiav.train.common import (
    StopSignal,
    WarmupCosine,
    autocast,
    build_optimizer,
    derive_seed,
    gather_tensor,
    loader_worker_init,
    make_grad_scaler,
    resolve_precision,
    seed_everything,
    unwrap_model,
)
from equiav.train.metric_log import MetricLogger

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


# --------------------------------------------------------------------------- schedule


def _optimizer(*scales: float) -> torch.optim.Optimizer:
    groups = [{"params": [nn.Parameter(torch.zeros(1))], "lr_scale": s} for s in scales]
    return torch.optim.AdamW(groups, lr=1.0)


def test_warmup_cosine_values_at_the_landmarks():
    opt = _optimizer(1.0)
    s = WarmupCosine(opt, peak_lr=1e-3, total_steps=110, warmup_steps=10, start_lr=1e-5, min_lr=2e-6)
    assert s.value(0) == pytest.approx(1e-5)
    assert s.value(5) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # linear half-way
    assert s.value(10) == pytest.approx(1e-3)  # peak right after the warm-up
    assert s.value(60) == pytest.approx((1e-3 + 2e-6) / 2)  # half the cosine
    assert s.value(110) == pytest.approx(2e-6)  # min at total_steps
    assert s.value(500) == pytest.approx(2e-6)  # and beyond
    values = [s.value(i) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # cosine part never rises


def test_warmup_cosine_step_sets_scaled_group_lrs_and_resumes():
    opt = _optimizer(1.0, 10.0)
    s = WarmupCosine(opt, peak_lr=1e-3, total_steps=20, warmup_steps=4, start_lr=0.0, min_lr=0.0)
    seen = [s.step() for _ in range(7)]
    assert seen[0] == 0.0 and seen[4] == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(seen[-1])
    assert opt.param_groups[1]["lr"] == pytest.approx(10 * seen[-1])  # the head multiplier applies

    resumed = WarmupCosine(_optimizer(1.0), peak_lr=1e-3, total_steps=20, warmup_steps=4, start_lr=0.0, min_lr=0.0)
    resumed.load_state_dict(s.state_dict())
    assert [resumed.step() for _ in range(5)] == [s.step() for _ in range(5)]


def test_warmup_cosine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupCosine(_optimizer(1.0), peak_lr=1e-3, total_steps=10, warmup_steps=11)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(_optimizer(1.0), peak_lr=1e-3, total_steps=0, warmup_steps=0)


# --------------------------------------------------------------------------- optimiser


class _Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.modality_embed = nn.Parameter(torch.zeros(1, 1, 4))
        self.head = nn.Linear(4, 2)
        self.frozen = nn.Parameter(torch.zeros(3, 3), requires_grad=False)


def _groups_by_param(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[str, dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g for g in optimizer.param_groups for p in g["params"]}


def test_build_optimizer_groups_decay_and_head_multiplier():
    model = _Toy()
    opt = build_optimizer(
        model, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95), head_lr_multiplier=10.0, head_prefixes=("head.",)
    )
    groups = _groups_by_param(opt, model)
    assert set(groups) == {
        "body.weight",
        "body.bias",
        "norm.weight",
        "norm.bias",
        "modality_embed",
        "head.weight",
        "head.bias",
    }
    decayed = {name for name, g in groups.items() if g["weight_decay"] > 0}
    assert decayed == {"body.weight", "head.weight"}
    assert all(g["weight_decay"] == 0.05 for name, g in groups.items() if name in decayed)
    for name, g in groups.items():
        head = name.startswith("head.")
        assert g["lr_scale"] == (10.0 if head else 1.0)
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
        assert g["betas"] == (0.9, 0.95)


def test_build_optimizer_on_equiav_covers_every_parameter_once():
    model = EquiAV(ModelConfig.tiny(audio_frames=32, audio_freq_bins=16, image_size=32))
    opt = build_optimizer(model, lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.95))
    listed = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters())
    groups = _groups_by_param(opt, model)
    assert groups["audio_encoder.modality_embed"]["weight_decay"] == 0.0
    assert groups["audio_encoder.blocks.0.norm1.weight"]["weight_decay"] == 0.0
    assert groups["audio_encoder.blocks.0.attn.qkv.weight"]["weight_decay"] == 1e-5


def test_build_optimizer_errors_name_the_problem():
    with pytest.raises(ValueError, match="head_prefixes"):
        build_optimizer(_Toy(), lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), head_prefixes=("classifier.",))
    with pytest.raises(ValueError, match="lr must be > 0"):
        build_optimizer(_Toy(), lr=0.0, weight_decay=0.0, betas=(0.9, 0.95))


# --------------------------------------------------------------------------- precision


def test_resolve_precision_on_the_cpu():
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="fp16.*CUDA"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="'half'"):
        resolve_precision("half", "cpu")


def test_autocast_and_grad_scaler_follow_the_precision():
    a = torch.randn(4, 4)
    with autocast("fp32", "cpu"):
        assert (a @ a).dtype == torch.float32
    with autocast("bf16", "cpu"):
        assert (a @ a).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="resolve_precision"):
        autocast("auto", "cpu")
    assert not make_grad_scaler("bf16", "cpu").is_enabled()
    assert not make_grad_scaler("fp32", "cpu").is_enabled()


@needs_cuda
def test_precision_on_cuda():
    expected = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    assert resolve_precision("auto", "cuda") == expected
    assert make_grad_scaler("fp16", "cuda").is_enabled()
    with autocast(expected, "cuda"):
        x = torch.randn(8, 8, device="cuda")
        assert (x @ x).dtype in (torch.bfloat16, torch.float16)


# --------------------------------------------------------------------------- seeds


def test_seeds_differ_per_rank_and_repeat():
    seed_everything(3, 0)
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3, 1)
    other = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(3, 0)
    again = (random.random(), np.random.rand(), torch.rand(1).item())
    assert first == again
    assert all(a != b for a, b in zip(first, other))
    assert derive_seed(0, 1) != derive_seed(1, 0)
    assert derive_seed(0, 1) != derive_seed(0, 1, 0)  # numpy's SeedSequence alone ignores trailing zeros
    with pytest.raises(ValueError, match=">= 0"):
        derive_seed(-1)


class _Draws(Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_loader_worker_init_gives_each_worker_its_own_streams():
    loader = DataLoader(
        _Draws(), batch_size=1, num_workers=2, worker_init_fn=loader_worker_init,
        generator=torch.Generator().manual_seed(0), multiprocessing_context="fork",
    )  # fmt: skip
    draws = [tuple(float(v) for v in batch) for batch in loader]
    # Items 0 and 1 are the first draws of workers 0 and 1: every stream must differ.
    assert all(a != b for a, b in zip(draws[0], draws[1]))


# --------------------------------------------------------------------------- logging


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_metric_logger_resume_drops_rows_it_will_log_again(tmp_path):
    path = tmp_path / "metrics.csv"
    with MetricLogger(path, total_steps=10) as logger:
        for step in range(5):
            logger.log(step, {"loss": 1.0 / (step + 1), "lr": 0.1})
    with MetricLogger(path, total_steps=10, resume_step=3) as logger:
        assert [r["step"] for r in _rows(path)] == ["0", "1", "2"]
        for step in range(3, 6):
            logger.log(step, {"loss": 7.0, "lr": 0.1})
    rows = _rows(path)
    assert [r["step"] for r in rows] == ["0", "1", "2", "3", "4", "5"]
    assert float(rows[2]["loss"]) == 1.0 / 3 and float(rows[3]["loss"]) == 7.0
    assert list(rows[0]) == ["step", "loss", "lr"]


def test_metric_logger_checks_keys_and_disabled_writes_nothing(tmp_path):
    with MetricLogger(tmp_path / "m.csv") as logger:
        logger.log(0, {"loss": 1.0})
        with pytest.raises(ValueError, match="same keys"):
            logger.log(1, {"loss": 1.0, "extra": 2.0})
    with MetricLogger(tmp_path / "off.csv", enabled=False) as logger:
        logger.log(0, {"loss": 1.0})
    assert not (tmp_path / "off.csv").exists()


# --------------------------------------------------------------------------- signals


def test_stop_signal_sets_the_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignal() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


# --------------------------------------------------------------------------- checkpoints


def test_checkpointer_rolls_and_finds_the_latest(tmp_path):
    c = Checkpointer(tmp_path / "ck", keep=2)
    assert c.latest() is None
    for step in (5, 10, 15):
        c.save({"step": step, "w": torch.full((2,), float(step))}, step)
    names = sorted(p.name for p in (tmp_path / "ck").iterdir())
    assert names == ["checkpoint-000000010.pt", "checkpoint-000000015.pt"]
    assert c.latest() == c.path(15)
    state = c.load(c.latest())
    assert state["step"] == 15 and torch.equal(state["w"], torch.full((2,), 15.0))


def test_checkpointer_save_is_atomic(tmp_path, monkeypatch):
    c = Checkpointer(tmp_path, keep=3)
    c.save({"step": 1}, 1)
    real_save = torch.save

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        c.save({"step": 2}, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-000000001.pt"]  # no temp file left
    assert c.load(c.latest())["step"] == 1


class _NotPlainData:
    pass


def test_checkpointer_loads_with_weights_only(tmp_path):
    c = Checkpointer(tmp_path)
    # A pickled object of an arbitrary class must be refused: only plain data loads.
    c.save({"step": 1, "obj": _NotPlainData()}, 1)
    with pytest.raises(pickle.UnpicklingError):
        c.load(c.latest())


def test_rng_state_round_trips_through_a_checkpoint(tmp_path):
    seed_everything(1, 0)
    random.gauss(0, 1)  # fills Python's cached gaussian
    c = Checkpointer(tmp_path)
    c.save({"rng": capture_rng_state()}, 1)
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    seed_everything(99, 0)
    restore_rng_state(c.load(c.latest())["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(), np.random.randn(), torch.rand(3))
    assert got[:4] == expected[:4] and torch.equal(got[4], expected[4])


def test_export_weights_unwraps_and_loads(tmp_path):
    config = ModelConfig.tiny(audio_frames=32, audio_freq_bins=16, image_size=32)
    model = EquiAV(config)
    compiled = torch.compile(model)  # lazy: nothing is compiled until called
    assert unwrap_model(compiled) is model
    export_weights(compiled, tmp_path / "w.pt", config=config.to_dict(), extra={"steps": 3})
    saved = load_export(tmp_path / "w.pt")
    assert saved["steps"] == 3 and saved["model_config"] == config.to_dict()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in saved["model"])
    rebuilt = EquiAV(ModelConfig.from_dict(saved["model_config"]))
    rebuilt.load_state_dict(saved["model"])  # strict
    with pytest.raises(ValueError, match="reserved"):
        export_weights(model, tmp_path / "x.pt", config={}, extra={"model": 1})


def test_code_revision_is_a_string(monkeypatch):
    assert isinstance(code_revision(), str) and code_revision()

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(ckpt.subprocess, "run", no_git)
    assert code_revision() == "unknown"


# --------------------------------------------------------------------------- two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    from equiav.train.common import any_rank, cleanup_distributed, setup_distributed

    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    info = setup_distributed(backend="gloo")
    try:
        # Rank 0 holds 2 rows, rank 1 holds 3: the gather must keep rank order and sizes.
        x = torch.arange(2 + rank).float()[:, None] + 10 * rank
        gathered = gather_tensor(x)
        agreed = any_rank(15 if rank == 1 else 0)
        torch.save(
            {
                "info": (info.rank, info.world_size, info.is_main, str(info.device)),
                "gathered": gathered,
                "agreed": agreed,
            },
            f"{out_dir}/{rank}.pt",
        )
    finally:
        cleanup_distributed()


def test_setup_distributed_and_gather_tensor_in_two_processes(tmp_path):
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    for rank in range(2):
        result = torch.load(tmp_path / f"{rank}.pt")
        assert result["info"] == (rank, 2, rank == 0, "cpu")
        assert result["gathered"].flatten().tolist() == [0.0, 1.0, 10.0, 11.0, 12.0]
        assert result["agreed"] == 15


def test_single_process_helpers_need_no_process_group(monkeypatch):
    from equiav.train.common import any_rank, setup_distributed

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    info = setup_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    x = torch.randn(3, 2)
    assert gather_tensor(x) is x
    assert any_rank(7) == 7


def test_setup_distributed_names_missing_variables(monkeypatch):
    from equiav.train.common import setup_distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        setup_distributed()


def test_schedule_without_warmup_starts_at_the_peak():
    s = WarmupCosine(_optimizer(1.0), peak_lr=1.0, total_steps=1, warmup_steps=0, start_lr=0.0, min_lr=0.0)
    assert s.value(0) == 1.0 and not math.isnan(s.value(1))
