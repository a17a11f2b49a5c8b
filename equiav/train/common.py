"""Training plumbing shared by pre-training and fine-tuning (docs/training.md).

Process groups from torchrun's environment, seeding, mixed precision, the AdamW parameter
groups, the per-iteration learning-rate schedule, the metric log, graceful stop on SIGTERM /
SIGUSR1 and whole-set gathers. Nothing here knows about EquiAV's model or losses.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import signal
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from equiav.distributed import is_distributed, world_size
from equiav.settings import PRECISIONS

__all__ = [
    "NO_DECAY_NAMES",
    "DistInfo",
    "StopSignal",
    "WarmupCosine",
    "any_rank",
    "autocast",
    "build_optimizer",
    "cleanup_distributed",
    "derive_seed",
    "gather_tensor",
    "loader_worker_init",
    "make_grad_scaler",
    "resolve_precision",
    "seed_everything",
    "unwrap_model",
]

log = logging.getLogger(__name__)

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Parameters whose name contains one of these get no weight decay whatever their shape: additive
# embeddings (decaying them pulls every token towards the same point, as for biases).
NO_DECAY_NAMES: tuple[str, ...] = ("modality_embed", "pos_embed", "cls_token")


# --------------------------------------------------------------------------------------------
# Processes and seeds
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` in [0, world_size), ``local_rank`` on its node,
    ``device`` it computes on, ``is_main`` (rank 0, the only writer of files)."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    is_main: bool


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(
            f"WORLD_SIZE is set but {name} is not; launch with torchrun (which sets RANK, LOCAL_RANK, "
            "WORLD_SIZE, MASTER_ADDR and MASTER_PORT) or unset WORLD_SIZE for a single process"
        )
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def setup_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group that torchrun's environment describes, or run alone.

    Without ``WORLD_SIZE`` in the environment this is a single process on ``cuda`` (the current
    device) when CUDA is available, else the CPU, and no process group is created. Otherwise
    ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` decide; the
    process computes on ``cuda:LOCAL_RANK`` (made the current CUDA device) or the CPU, and the
    backend is ``backend`` or else NCCL on CUDA and gloo on the CPU.
    """
    if "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return DistInfo(rank=0, local_rank=0, world_size=1, device=device, is_main=True)
    size, rank = _env_int("WORLD_SIZE"), _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise RuntimeError(
                f"WORLD_SIZE is set but {name} is not; launch with torchrun, which sets it, or unset WORLD_SIZE"
            )
    if not 0 <= rank < size:
        raise RuntimeError(f"RANK={rank} is outside [0, WORLD_SIZE={size})")
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"LOCAL_RANK={local_rank} but this node has {torch.cuda.device_count()} CUDA device(s); "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    if backend == "nccl" and device.type != "cuda":
        raise RuntimeError("backend 'nccl' needs CUDA devices; use 'gloo' on the CPU")
    if not dist.is_initialized():
        # device_id binds NCCL to this GPU at once (no guessing of the device at the first collective).
        device_id = device if backend == "nccl" else None
        dist.init_process_group(backend=backend, rank=rank, world_size=size, device_id=device_id)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=size, device=device, is_main=rank == 0)


def cleanup_distributed() -> None:
    """Leave the process group, if one was joined."""
    if is_distributed():
        dist.destroy_process_group()


def derive_seed(*keys: int) -> int:
    """A 64-bit seed from integer keys, e.g. ``derive_seed(seed, STREAM, epoch, index)``.

    numpy's SeedSequence hashes the keys, so nearby keys give unrelated streams (``seed + rank``
    style sums would make run 0's rank 1 the same stream as run 1's rank 0). It ignores trailing
    zeros, so the number of keys is appended: (s, 1) and (s, 1, 0) must differ. Give every use
    its own tag (a key after the seed) so that no two uses share a stream.
    """
    if any(k < 0 for k in keys):
        raise ValueError(f"seed keys must be >= 0, got {keys}")
    return int(np.random.SeedSequence([*keys, len(keys)]).generate_state(1, np.uint64)[0])


# derive_seed tag of seed_everything's per-rank streams (equiav/train/data.py uses 1 and up).
_RANK_STREAMS = 0


def seed_everything(seed: int, rank: int) -> None:
    """Seed Python's ``random``, numpy's global generator and torch (CPU and every CUDA device)
    with a stream that is distinct per rank and reproducible from ``seed``."""
    value = derive_seed(seed, _RANK_STREAMS, rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def loader_worker_init(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: distinct Python/numpy/torch seeds per worker.

    torch seeds each worker with ``base_seed + worker_id``, where ``base_seed`` comes from the
    loader's generator (seeded per rank by the caller), so ``torch.initial_seed()`` already
    differs per rank and worker; numpy and ``random`` are derived from it (by default they
    would be copies of the parent's state in every worker).

    Workers ignore SIGTERM and SIGUSR1: the main process receives them too (SLURM signals every
    process of the step), finishes its step and saves a checkpoint, which needs the workers
    alive until it shuts them down (SIGUSR1 would otherwise kill a worker outright).
    """
    seed = torch.initial_seed()
    random.seed(seed)
    np.random.seed(derive_seed(seed, worker_id) % 2**32)
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# Precision
# --------------------------------------------------------------------------------------------


def resolve_precision(name: str, device: torch.device | str) -> str:
    """Turn a precision setting into "fp32", "bf16" or "fp16" for ``device``.

    "auto" is bf16 on a CUDA device that supports it, fp16 on older CUDA devices and fp32
    elsewhere. An explicit name is checked: bf16 on a CUDA device without it and fp16 anywhere
    but CUDA (the gradient scaler and fast fp16 kernels are CUDA's) are errors.
    """
    device = torch.device(device)
    if name not in PRECISIONS:
        raise ValueError(f"precision={name!r}; choose one of {', '.join(PRECISIONS)}")
    cuda = device.type == "cuda"
    if name == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise ValueError(f"precision='bf16' but {torch.cuda.get_device_name(device)} has no bf16; use 'fp16' or 'auto'")
    if name == "fp16" and not cuda:
        raise ValueError(f"precision='fp16' needs a CUDA device, this process runs on {device}; use 'fp32' or 'bf16'")
    return name


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The autocast context of a resolved precision ("fp32": no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision not in _AUTOCAST_DTYPES:
        raise ValueError(f"precision={precision!r} is not resolved; pass it through resolve_precision first")
    return torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST_DTYPES[precision])


def make_grad_scaler(precision: str, device: torch.device | str) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for fp16 (bf16 and fp32 need no loss scaling)."""
    return torch.amp.GradScaler(torch.device(device).type, enabled=precision == "fp16")


# --------------------------------------------------------------------------------------------
# Optimiser and schedule
# --------------------------------------------------------------------------------------------


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def _decays(name: str, parameter: Tensor) -> bool:
    return parameter.ndim > 1 and not name.endswith(".bias") and not any(part in name for part in NO_DECAY_NAMES)


def build_optimizer(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    head_lr_multiplier: float = 1.0,
    head_prefixes: Sequence[str] = (),
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters of ``model`` (unwrapped from DDP / compile first).

    Groups: weight decay or none (biases, norms and every other 1-D tensor, and the
    embeddings named in ``NO_DECAY_NAMES``), crossed with body or head (names starting with
    one of ``head_prefixes``). Each group carries ``lr_scale`` (1 for the body,
    ``head_lr_multiplier`` for the head) and ``name``; :class:`WarmupCosine` sets
    ``lr = schedule value * lr_scale``, so the multiplier applies at every step (the release's
    never did, method.md section 8 [fix]). Empty groups are left out. The fused CUDA kernel is
    used when every parameter is on a CUDA device.
    """
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if not head_lr_multiplier > 0:
        raise ValueError(f"head_lr_multiplier must be > 0, got {head_lr_multiplier!r}")
    prefixes = tuple(head_prefixes)
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    matched_head = False
    for name, parameter in unwrap_model(model).named_parameters():
        if not parameter.requires_grad:
            continue
        head = name.startswith(prefixes) if prefixes else False
        matched_head |= head
        groups.setdefault((head, _decays(name, parameter)), []).append(parameter)
    if not groups:
        raise ValueError("the model has no trainable parameter")
    if prefixes and not matched_head:
        raise ValueError(f"no parameter name starts with any of head_prefixes={prefixes}; check the module names")
    param_groups = []
    for (head, decay), parameters in sorted(groups.items()):
        scale = head_lr_multiplier if head else 1.0
        param_groups.append(
            {
                "params": parameters,
                "name": f"{'head' if head else 'body'}_{'decay' if decay else 'no_decay'}",
                "lr": lr * scale,
                "lr_scale": scale,
                "weight_decay": weight_decay if decay else 0.0,
            }
        )
    fused = all(p.is_cuda for group in param_groups for p in group["params"])
    return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay, fused=fused or None)


class WarmupCosine:
    """Per-iteration learning rate: linear warm-up, then a half-cycle cosine.

    For iteration i (0-based):
        i <  warmup_steps:  start_lr + (peak_lr - start_lr) * i / warmup_steps
        i >= warmup_steps:  min_lr + (peak_lr - min_lr) * (1 + cos(pi * p)) / 2,
                            p = min(1, (i - warmup_steps) / (total_steps - warmup_steps))
    so iteration 0 runs at start_lr, iteration ``warmup_steps`` at peak_lr and iteration
    ``total_steps`` (one past the last) would run at min_lr.

    :meth:`step` is called once per iteration **before** ``optimizer.step()``: it sets every
    group's ``lr`` to value * ``group["lr_scale"]`` (1 when absent) and returns the value.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int,
        start_lr: float = 1e-6,
        min_lr: float = 1e-6,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps={total_steps}], got {warmup_steps}")
        for name, value in (("peak_lr", peak_lr), ("start_lr", start_lr), ("min_lr", min_lr)):
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.optimizer = optimizer
        self.peak_lr, self.start_lr, self.min_lr = peak_lr, start_lr, min_lr
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.next_step = 0

    def value(self, step: int) -> float:
        """The (unscaled) learning rate of iteration ``step``."""
        if step < self.warmup_steps:
            return self.start_lr + (self.peak_lr - self.start_lr) * step / self.warmup_steps
        span = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / span) if span > 0 else 1.0
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def step(self) -> float:
        """Set the learning rates of the next iteration, advance, and return the value."""
        value = self.value(self.next_step)
        for group in self.optimizer.param_groups:
            group["lr"] = value * group.get("lr_scale", 1.0)
        self.next_step += 1
        return value

    def state_dict(self) -> dict[str, int]:
        """The position in the schedule (the hyperparameters come from the settings)."""
        return {"next_step": self.next_step}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        """Continue from a :meth:`state_dict`: the next :meth:`step` sets its iteration's lr."""
        self.next_step = int(state["next_step"])


# --------------------------------------------------------------------------------------------
# Stopping on a signal
# --------------------------------------------------------------------------------------------


class StopSignal:
    """Turn SIGTERM / SIGUSR1 into a flag that the training loop polls between steps.

    SLURM sends SIGTERM at the walltime (then SIGKILL after its KillWait) and can send SIGUSR1
    earlier (``--signal=USR1@300``); the loop finishes its step, saves a checkpoint and exits.
    Use as a context manager (or call :meth:`close`): the previous handlers come back.
    Handlers can only be installed from the main thread; elsewhere this does nothing.
    """

    def __init__(self, signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        try:
            for signum in signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread
            self.close()
            log.warning("StopSignal: not in the main thread, SIGTERM/SIGUSR1 keep their default action")

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        """Whether a stop signal has arrived."""
        return self.signum is not None

    def close(self) -> None:
        """Restore the handlers that were installed before."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def __enter__(self) -> StopSignal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# Collectives
# --------------------------------------------------------------------------------------------


def any_rank(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The maximum of an integer over all ranks (``value`` itself in one process).

    Used so that every rank stops at the same step when only some received a signal: pass a
    gloo ``group`` to keep this host-side check off the GPU stream.
    """
    if not is_distributed():
        return value
    flag = torch.tensor([value], dtype=torch.long)
    if group is None and dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item())


def gather_tensor(x: Tensor) -> Tensor:
    """Concatenate ``x`` [n_r, ...] from every rank along dim 0, in rank order, detached.

    The first dimension may differ between ranks (e.g. the last, uneven shard of an evaluation
    set); the other dimensions must agree. Returns ``x`` itself in a single process.
    """
    if not is_distributed():
        return x
    x = x.detach().contiguous()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.empty_like(size) for _ in range(world_size())]
    dist.all_gather(sizes, size)
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)], dim=0)
