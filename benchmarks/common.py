"""Shared helpers of the training-speed benchmarks (pretrain_step.py, loader.py, jpeg_decode.py).

Not a library module: the scripts import it as ``common`` (``python benchmarks/<script>.py``
puts this folder first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torchvision

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"


# --------------------------------------------------------------------------------------------
# Devices and environment
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``cuda`` (the current CUDA device) or ``cpu``; a clear exit when CUDA is asked for but absent."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            sys.exit(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
        device = torch.device(name)
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        return device
    if name != "cpu":
        sys.exit(f"--device must be cuda or cpu, got {name!r}")
    return torch.device("cpu")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{os.cpu_count()}-CPU {cpu_name()}"


def environment(device: torch.device) -> dict[str, Any]:
    """What every JSON file records: where, when, with what, and how it was started."""
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": str(device),
        "device_name": device_name(device),
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            gpu_count=torch.cuda.device_count(),
        )
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return None


def free_memory(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def parse_ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"expected at least one integer, got {text!r}")
    return values


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]], title: str | None = None) -> None:
    """Markdown table of ``rows`` with ``columns`` = (key, header) pairs."""
    if title:
        print(f"\n{title}\n")
    headers = [header for _, header in columns]
    body = [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in body:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")


def write_result(args: Any, benchmark: str, env: dict[str, Any], **fields: Any) -> None:
    """Write a script's result to ``args.out``: its name, the environment, its arguments, then ``fields``."""
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_json(args.out, {"benchmark": benchmark, "environment": env, "args": arguments, **fields})


# --------------------------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------------------------


def random_image(generator: torch.Generator, size: int) -> torch.Tensor:
    """uint8 [3, size, size]: smooth colour blobs plus pixel noise, so that JPEG files have the
    size and decoding cost of natural frames (pure noise or flat images would not)."""
    coarse = torch.rand(1, 3, 8, 8, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)[0]
    noise = torch.randn(3, size, size, generator=generator) * 0.04
    return ((smooth + noise).clamp(0, 1) * 255).to(torch.uint8)


def random_jpegs(count: int, size: int = 224, quality: int = 90, seed: int = 0) -> list[torch.Tensor]:
    """``count`` JPEG files as uint8 byte tensors (the shards' frame format)."""
    generator = torch.Generator().manual_seed(seed)
    return [torchvision.io.encode_jpeg(random_image(generator, size), quality=quality) for _ in range(count)]


def synthetic_shard(path: Path, clips: int, *, seed: int = 0) -> Path:
    """An HDF5 feature shard of ``clips`` synthetic clips in the pipeline's format (fbank
    1024 x 128, 10 JPEG frames of 224 x 224, quality 90), reused when it already exists."""
    from equiav.data.features import FeatureSettings
    from equiav.data.store import ShardWriter, read_index

    if path.exists():
        try:
            if len(read_index([path])) == clips:
                return path
        except Exception:
            pass
    settings = FeatureSettings()
    generator = torch.Generator().manual_seed(seed)
    frames_per_clip = settings.num_frames
    started = time.perf_counter()
    with ShardWriter(path, settings) as writer:
        for k in range(clips):
            fbank = torch.randn(settings.target_frames, settings.num_mel_bins, generator=generator) * 3 - 5
            frames = [
                bytes(
                    torchvision.io.encode_jpeg(
                        random_image(generator, settings.frame_size), quality=settings.jpeg_quality
                    ).numpy()
                )
                for _ in range(frames_per_clip)
            ]
            writer.add(
                f"clip{k:06d}", "train", "", fbank, settings.target_frames, frames,
                source_sample_rate=44100, fps=25.0, duration=10.0,
            )  # fmt: skip
    print(f"wrote the synthetic shard {path} ({clips} clips) in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / "equiav_bench"


# --------------------------------------------------------------------------------------------
# Process group of one, for DDP
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def single_process_group(device: torch.device) -> Iterator[None]:
    """A process group of world size 1 (NCCL on CUDA, gloo on the CPU) for wrapping a model in
    DDP in a script started without torchrun; destroyed on exit, so code after it runs as one
    plain process again (the losses gather only inside a process group)."""
    if dist.is_initialized():
        yield  # started under torchrun: use its group
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        store = f"file://{Path(tmp) / 'store'}"
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=store, rank=0, world_size=1, **kwargs)
        try:
            yield
        finally:
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Peak matmul rate
# --------------------------------------------------------------------------------------------


def matmul_peak(
    device: torch.device, dtype: torch.dtype, size: int, iters: int = 20, repeats: int = 3
) -> dict[str, Any]:
    """Best measured rate of [size x size] @ [size x size] in ``dtype`` (TFLOP/s), the
    denominator of the 'share of matmul peak' figures."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b, out=out)
    synchronize(device)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=out)
        synchronize(device)
        best = min(best, (time.perf_counter() - started) / iters)
    del a, b, out
    return {"dtype": str(dtype).removeprefix("torch."), "size": size, "tflops": 2 * size**3 / best / 1e12}


def quantiles(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"median": float(np.median(array)), "min": float(array.min()), "max": float(array.max())}
