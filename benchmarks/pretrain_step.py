"""Pre-training step throughput: our step against the authors' settings, in one run.

One step = host-to-device copy of a collated batch, augmentation (two augmented views' worth of
parameters + the S centroid vectors), forward of both towers on both views, predictor and
heads, EquiAVLoss, backward, gradient clipping (0.01), AdamW; as ``Pretrainer._train_step``
does it, but on fixed synthetic batches so that only the step is timed (loader.py times the
data path).

Variants (every row is one configuration, timed in the same process):

* ``ours``: bf16 autocast (fp32 on the CPU), fused attention (SDPA), fused AdamW on CUDA,
  batched augmentation on the device (DeviceAugmenter), centroid S = 16, one process, no DDP.
* ``ours+compile`` (with --compile): the same under torch.compile.
* ``ours S=0``: no centroid (inter_source "clean": the inter-modal head reads mean h), the
  denominator of the centroid's cost (paper: under 5 %).
* ``authors``: the release's settings: fp16 autocast with GradScaler, eager attention (timm
  ``fused_attn = False`` in every block, the predictor's attention on SDPA's math backend),
  torch's default AdamW (foreach), per-sample augmentation on the CPU (one AudioAugment /
  VisualAugment call per clip, as a dataset ``__getitem__`` does), DDP with
  ``find_unused_parameters=True`` (a process group of one when run without torchrun).
  On the CPU fp16 is replaced by fp32 (the scaler stays on).
* ``authors, GPU part``: the authors' settings with the augmentation done before the timer:
  what remains when their DataLoader workers hide the CPU augmentation completely. The ratio
  against it is the conservative one.
* ablations at one batch size (--ablation-batch, default the largest at which ``ours`` fits):
  ``ours`` with one switch flipped back to the authors' choice (fp16 + GradScaler, eager
  attention, foreach AdamW, per-sample CPU augmentation, DDP with/without unused-parameter
  search) and with gradient checkpointing.

A batch size at which ``ours`` runs out of memory is retried with gradient checkpointing
(``ours+ckpt``); an out-of-memory variant is reported as such and skipped.

Achieved TFLOP/s = train_flops_per_sample(config) x samples/s (model FLOPs only: forward and
backward of both views, predictor and heads); the share is against a measured [n x n] bf16
matmul (fp32 on the CPU).

    python benchmarks/pretrain_step.py --device cuda --model vit_base --batch-sizes 32,64,128 \\
        --steps 20 --warmup 5 --compile --out benchmarks/out/pretrain_step_h100.json
    python benchmarks/pretrain_step.py --device cpu --model tiny --batch-sizes 8,16 --steps 5 --warmup 2
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (
    OUT,
    environment,
    free_memory,
    is_oom,
    matmul_peak,
    parse_ints,
    peak_memory_gb,
    print_table,
    quantiles,
    reset_peak_memory,
    resolve_device,
    single_process_group,
    synchronize,
    write_result,
)
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from equiav.augment import normalize_image
from equiav.losses import EquiAVLoss
from equiav.model import EquiAV, ModelConfig
from equiav.train.common import build_optimizer, derive_seed
from equiav.train.data import AUGMENT, DeviceAugmenter, PretrainViews
from equiav.train.pretrain import train_flops_per_sample

PRESETS: dict[str, Callable[..., ModelConfig]] = {"vit_base": ModelConfig.vit_base, "tiny": ModelConfig.tiny}
CLIP_GRAD = 0.01  # the paper's max gradient norm (PretrainSettings.clip_grad)
POOL = 2  # distinct synthetic batches cycled through


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str = "bf16"  # "bf16" | "fp16" (with GradScaler) | "fp32"
    attention: str = "sdpa"  # "sdpa" | "eager"
    optimizer: str = "fused"  # "fused" (on CUDA) | "foreach" (torch's default)
    augment: str = "device"  # "device" (batched) | "cpu" (per sample) | "before" (outside the timer)
    ddp: str = "none"  # "none" | "unused" (find_unused_parameters=True) | "static"
    compile: bool = False
    checkpointing: bool = False
    centroid: bool = True  # False: S = 0, inter_source "clean"
    scaler: bool = False  # a GradScaler even without fp16 (the authors' settings on the CPU)


def make_variants(device: torch.device) -> dict[str, Variant]:
    cuda = device.type == "cuda"
    fast = "bf16" if cuda and torch.cuda.is_bf16_supported() else ("fp16" if cuda else "fp32")
    slow = "fp16" if cuda else "fp32"
    ours = Variant("ours", precision=fast)
    authors = Variant(
        "authors", precision=slow, attention="eager", optimizer="foreach", augment="cpu", ddp="unused", scaler=True
    )
    variants = [
        ours,
        dataclasses.replace(ours, name="ours+compile", compile=True),
        dataclasses.replace(ours, name="ours+ckpt", checkpointing=True),
        dataclasses.replace(ours, name="ours S=0", centroid=False),
        authors,
        dataclasses.replace(authors, name="authors, GPU part", augment="before"),
        # ablations: ours with one switch set back to the authors' choice
        dataclasses.replace(ours, name="ours, fp16+scaler", precision=slow, scaler=True),
        dataclasses.replace(ours, name="ours, eager attention", attention="eager"),
        dataclasses.replace(ours, name="ours, foreach AdamW", optimizer="foreach"),
        dataclasses.replace(ours, name="ours, per-sample CPU aug", augment="cpu"),
        dataclasses.replace(ours, name="ours, DDP find_unused", ddp="unused"),
        dataclasses.replace(ours, name="ours, DDP static", ddp="static"),
    ]
    return {v.name: v for v in variants}


ABLATIONS = (
    "ours, fp16+scaler",
    "ours, eager attention",
    "ours, foreach AdamW",
    "ours, per-sample CPU aug",
    "ours, DDP find_unused",
    "ours, DDP static",
    "ours+ckpt",
)


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def synthetic_batches(config: ModelConfig, batch: int, device: torch.device) -> list[dict[str, Tensor]]:
    """POOL collated batches as the loader hands them (pinned on CUDA)."""
    generator = torch.Generator().manual_seed(1234)
    batches = []
    for _ in range(POOL):
        fbank = torch.randn(batch, config.audio_frames, config.audio_freq_bins, generator=generator)
        coarse = torch.rand(batch, 3, 8, 8, generator=generator)
        frames = nn.functional.interpolate(coarse, size=(config.image_size,) * 2, mode="bilinear", align_corners=False)
        frames = (frames * 255).to(torch.uint8)
        item = {"fbank": fbank, "frames": frames, "index": torch.arange(batch)}
        if device.type == "cuda":
            item = {k: v.pin_memory() for k, v in item.items()}
        batches.append(item)
    return batches


class PerSampleCpuAugmenter:
    """The authors' augmentation: one clip at a time on the CPU (what a dataset's
    ``__getitem__`` does in a DataLoader worker), then collated, pinned and copied."""

    def __init__(self, device_augmenter: DeviceAugmenter, device: torch.device) -> None:
        self.audio, self.visual = device_augmenter.audio, device_augmenter.visual
        self.centroid_samples = device_augmenter.centroid_samples
        self.seed = device_augmenter.seed
        self.device = device

    @torch.no_grad()
    def __call__(self, batch: dict[str, Tensor], step: int, offset: int) -> PretrainViews:
        fbank, frames = batch["fbank"], batch["frames"]
        _, time_frames, freq_bins = fbank.shape
        height, width = frames.shape[-2:]
        rows: list[tuple[Tensor, ...]] = []
        for i in range(fbank.shape[0]):
            generator = torch.Generator().manual_seed(derive_seed(self.seed, AUGMENT, step, offset + i))
            audio_aug, audio_params = self.audio(fbank[i : i + 1], generator)
            visual_aug, visual_params = self.visual(frames[i : i + 1], generator)
            audio_centroid = self.audio.sample_params(
                1, self.centroid_samples, time_frames, freq_bins, generator=generator
            )
            visual_centroid = self.visual.sample_params(1, self.centroid_samples, height, width, generator=generator)
            rows.append((audio_aug, visual_aug, audio_params, visual_params, audio_centroid, visual_centroid))
        host = [torch.cat(parts) for parts in zip(*rows, strict=True)]
        host = [fbank, normalize_image(frames), *host]
        cuda = self.device.type == "cuda"
        audio, visual, audio_aug, visual_aug, audio_params, visual_params, audio_centroid, visual_centroid = (
            (t.pin_memory() if cuda and not t.is_pinned() else t).to(self.device, non_blocking=True) for t in host
        )
        return PretrainViews(
            audio=audio, audio_aug=audio_aug, visual=visual, visual_aug=visual_aug,
            audio_params=audio_params, visual_params=visual_params,
            audio_centroid=audio_centroid, visual_centroid=visual_centroid,
        )  # fmt: skip


# --------------------------------------------------------------------------------------------
# One variant
# --------------------------------------------------------------------------------------------


def _optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    optimizer = build_optimizer(model, lr=1e-4, weight_decay=1e-5, betas=(0.9, 0.95))  # fused on CUDA
    if kind == "fused":
        return optimizer
    groups = [{k: g[k] for k in ("params", "lr", "weight_decay")} for g in optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))  # torch's default: foreach on CUDA


def _autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[precision])


def _attention(kind: str) -> contextlib.AbstractContextManager[Any]:
    # timm blocks switch with fused_attn; the predictor's cross-attention always calls SDPA,
    # whose math backend is the eager computation (softmax(q k^T / sqrt(d)) v in separate ops).
    return sdpa_kernel([SDPBackend.MATH]) if kind == "eager" else contextlib.nullcontext()


def measure(
    variant: Variant,
    config: ModelConfig,
    batch: int,
    *,
    device: torch.device,
    steps: int,
    warmup: int,
) -> dict[str, Any]:
    """Samples/s of ``steps`` timed steps after ``warmup`` untimed ones, and peak memory."""
    if not variant.centroid:
        config = config.replace(inter_source="clean")
    with contextlib.ExitStack() as stack:
        if variant.ddp != "none":
            stack.enter_context(single_process_group(device))
        torch.manual_seed(0)
        model = EquiAV(config).to(device).train()
        if variant.attention == "eager":
            switched = 0
            for module in model.modules():
                if hasattr(module, "fused_attn"):
                    module.fused_attn = False
                    switched += 1
            assert switched == 2 * config.depth, f"expected {2 * config.depth} timm Attention modules, found {switched}"
        model.set_grad_checkpointing(variant.checkpointing)
        optimizer = _optimizer(model, variant.optimizer)
        parameters = [p for p in model.parameters() if p.requires_grad]
        scaler = torch.amp.GradScaler(device.type, enabled=variant.precision == "fp16" or variant.scaler)
        criterion = EquiAVLoss()
        wrapped: nn.Module = model
        if variant.compile:
            wrapped = torch.compile(wrapped)
        if variant.ddp != "none":
            wrapped = nn.parallel.DistributedDataParallel(
                wrapped,
                device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=variant.ddp == "unused",
            )
        device_augmenter = DeviceAugmenter(
            seed=0, image_size=config.image_size, centroid_samples=config.centroid_samples,
            chunk=math.gcd(batch, 16), device=device,
        )  # fmt: skip
        augment: Callable[[dict[str, Tensor], int, int], PretrainViews]
        augment = PerSampleCpuAugmenter(device_augmenter, device) if variant.augment == "cpu" else device_augmenter
        batches = synthetic_batches(config, batch, device)
        prepared: list[PretrainViews] | None = None
        if variant.augment == "before":
            cpu_augment = PerSampleCpuAugmenter(device_augmenter, device)
            prepared = [cpu_augment(b, k, 0) for k, b in enumerate(batches)]

        def step(i: int) -> None:
            views = prepared[i % POOL] if prepared is not None else augment(batches[i % POOL], i, 0)
            with _autocast(variant.precision, device), _attention(variant.attention):
                outputs = wrapped(*views.model_inputs())
            losses = criterion(outputs)
            scaler.scale(losses["loss"]).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(parameters, CLIP_GRAD)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)

        for i in range(warmup):
            step(i)
        synchronize(device)
        reset_peak_memory(device)
        started = time.perf_counter()
        for i in range(warmup, warmup + steps):
            step(i)
        synchronize(device)
        seconds = time.perf_counter() - started
    return {
        "samples_per_s": batch * steps / seconds,
        "step_ms": 1e3 * seconds / steps,
        "peak_mem_gb": peak_memory_gb(device),
    }


def try_measure(variant: Variant, config: ModelConfig, batch: int, **kwargs: Any) -> dict[str, Any]:
    device = kwargs["device"]
    try:
        result = measure(variant, config, batch, **kwargs)
    except Exception as error:
        if not is_oom(error):
            raise
        result = {"oom": True, "note": "out of memory"}
    free_memory(device)
    if variant.compile:
        torch._dynamo.reset()
    return result


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--model", default="vit_base", choices=sorted(PRESETS))
    parser.add_argument("--batch-sizes", default="32,64,128", help="per-GPU batch sizes, comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (compilation included)")
    parser.add_argument(
        "--repeats", type=int, default=1, help="measure every row this often, round-robin; report the median"
    )
    parser.add_argument("--compile", action="store_true", help="add ours+compile (torch.compile)")
    parser.add_argument(
        "--ablation-batch", type=int, default=None, help="batch size of the ablation rows (default: largest that fits)"
    )
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument(
        "--matmul-size", type=int, default=None, help="side of the peak matmul (8192 on CUDA, 1024 on the CPU)"
    )
    parser.add_argument("--clips", type=int, default=2_000_000, help="data-set size of the wall-time projection")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of the wall-time projection")
    parser.add_argument("--out", type=Path, default=OUT / "pretrain_step.json")
    return parser


COLUMNS = (
    ("batch", "batch"),
    ("variant", "variant"),
    ("samples_per_s", "samples/s"),
    ("step_ms", "step ms"),
    ("tflops", "TFLOP/s"),
    ("peak_share_pct", "% of matmul peak"),
    ("peak_mem_gb", "peak mem GB"),
    ("vs_authors", "x authors"),
    ("note", "note"),
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # as the trainer's set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
    batch_sizes = parse_ints(args.batch_sizes)
    config = PRESETS[args.model]()
    variants = make_variants(device)
    env = environment(device)
    print(f"{env['device_name']}, torch {env['torch']}, model {args.model}", file=sys.stderr)

    size = args.matmul_size or (8192 if device.type == "cuda" else 1024)
    peak_dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    peak = matmul_peak(device, peak_dtype, size)
    print(f"matmul peak ({peak['dtype']}, {size}^2): {peak['tflops']:.2f} TFLOP/s", file=sys.stderr)
    flops = {
        "S=16": train_flops_per_sample(config),
        "S=0": train_flops_per_sample(config.replace(inter_source="clean")),
    }

    main_rows = ["ours", *(["ours+compile"] if args.compile else []), "ours S=0", "authors", "authors, GPU part"]
    kwargs = {"device": device, "steps": args.steps, "warmup": args.warmup}
    plan: list[tuple[int, str]] = []
    results: dict[tuple[int, str], list[dict[str, Any]]] = {}

    def summarise() -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The table rows and the per-batch summary of what has been measured so far."""
        rows: list[dict[str, Any]] = []
        for batch, name in plan:
            runs = results[(batch, name)]
            ok = [r for r in runs if not r.get("oom")]
            row: dict[str, Any] = {"batch": batch, "variant": name, **dataclasses.asdict(variants[name])}
            row.pop("name")
            if not ok:
                row.update(note="out of memory", oom=True)
                rows.append(row)
                continue
            rates = [r["samples_per_s"] for r in ok]
            median = quantiles(rates)["median"]
            per_sample = flops["S=16" if variants[name].centroid else "S=0"]
            mems = [r["peak_mem_gb"] for r in ok if r["peak_mem_gb"] is not None]
            row.update(
                samples_per_s=median,
                samples_per_s_runs=rates,
                step_ms=1e3 * batch / median,
                tflops=per_sample * median / 1e12,
                peak_share_pct=100 * per_sample * median / 1e12 / peak["tflops"],
                peak_mem_gb=max(mems) if mems else None,
            )
            rows.append(row)
        by_key = {(r["batch"], r["variant"]): r for r in rows}
        summary: dict[str, Any] = {"per_batch": {}}
        for batch in batch_sizes:
            authors = by_key.get((batch, "authors"), {}).get("samples_per_s")
            authors_gpu = by_key.get((batch, "authors, GPU part"), {}).get("samples_per_s")
            s0 = by_key.get((batch, "ours S=0"), {}).get("samples_per_s")
            for r in rows:
                if r["batch"] == batch and r.get("samples_per_s") and authors:
                    r["vs_authors"] = r["samples_per_s"] / authors
            candidates = ("ours", "ours+compile") if batch in fitted else ("ours+ckpt",)
            ours_rows = [
                r for r in rows if r["batch"] == batch and r["variant"] in candidates and r.get("samples_per_s")
            ]
            best = max(ours_rows, key=lambda r: r["samples_per_s"], default=None)
            entry: dict[str, Any] = {}
            if best:
                entry.update(
                    best_variant=best["variant"],
                    best_samples_per_s=best["samples_per_s"],
                    best_peak_share_pct=best["peak_share_pct"],
                )
                if authors:
                    entry["speedup_vs_authors"] = best["samples_per_s"] / authors
                if authors_gpu:
                    entry["speedup_vs_authors_gpu_part"] = best["samples_per_s"] / authors_gpu
                plain = by_key.get((batch, "ours"), {}).get("samples_per_s") or by_key.get(
                    (batch, "ours+ckpt"), {}
                ).get("samples_per_s")
                if s0 and plain:
                    entry["centroid_cost_pct"] = 100 * (s0 / plain - 1)  # extra time per sample of S = 16
                rate = best["samples_per_s"]
                entry["projection_hours_1_gpu"] = args.epochs * args.clips / rate / 3600
                entry["projection_hours_8_gpus_linear"] = entry["projection_hours_1_gpu"] / 8
            summary["per_batch"][str(batch)] = entry
        summary["projection"] = {
            "clips": args.clips,
            "epochs": args.epochs,
            "note": "epochs x clips / best samples/s; 8 GPUs assume linear scaling",
        }

        for r in rows:
            if r.get("note") is None and r["variant"] == "ours+ckpt" and r["batch"] not in fitted:
                r["note"] = "checkpointing forced by memory"
        return rows, summary

    def save(complete: bool) -> None:
        rows, summary = summarise()
        write_result(
            args, "pretrain_step", env, complete=complete, model_config=config.to_dict(),
            flops_per_sample=flops, matmul_peak=peak, rows=rows, summary=summary,
        )  # fmt: skip

    def run(batch: int, names: list[str], repeats: int) -> None:
        """Measure each row until it has ``repeats`` results (round-robin) or ran out of memory."""
        for repeat in range(repeats):
            for name in names:
                key = (batch, name)
                done = results.setdefault(key, [])
                if key not in plan:
                    plan.append(key)
                if len(done) > repeat or (done and done[-1].get("oom")):
                    continue
                print(f"  batch {batch}: {name} ({repeat + 1}/{repeats})", file=sys.stderr, flush=True)
                done.append(try_measure(variants[name], config, batch, **kwargs))
                save(complete=False)  # a run cut short still leaves what it measured

    fitted = []
    for batch in batch_sizes:
        names = list(main_rows)
        run(batch, ["ours"], 1)
        if results[(batch, "ours")][-1].get("oom"):
            # gradient checkpointing only where memory forces it
            names = ["ours", "ours+ckpt", *names[1:]]
            run(batch, ["ours+ckpt"], 1)
            if results[(batch, "ours+ckpt")][-1].get("oom"):
                continue
        else:
            fitted.append(batch)
        run(batch, names, args.repeats)
    ablation_batch = args.ablation_batch or (max(fitted) if fitted else None)
    if not args.no_ablations and ablation_batch is not None:
        run(ablation_batch, ["ours", *ABLATIONS], args.repeats)

    rows, summary = summarise()
    print_table(rows, COLUMNS, title=f"Pre-training step, {args.model}, {env['device_name']}")
    print()
    for batch, entry in summary["per_batch"].items():
        if entry:
            parts = [f"batch {batch}: best {entry['best_variant']} {entry['best_samples_per_s']:.1f} samples/s"]
            if "speedup_vs_authors" in entry:
                parts.append(f"{entry['speedup_vs_authors']:.2f}x authors")
            if "speedup_vs_authors_gpu_part" in entry:
                parts.append(f"{entry['speedup_vs_authors_gpu_part']:.2f}x authors' GPU part")
            if "centroid_cost_pct" in entry:
                parts.append(f"centroid S=16 costs {entry['centroid_cost_pct']:+.1f} %")
            parts.append(
                f"{args.epochs} epochs x {args.clips:,} clips: {entry['projection_hours_1_gpu']:.0f} h on 1 device"
            )
            print(", ".join(parts))
    save(complete=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
