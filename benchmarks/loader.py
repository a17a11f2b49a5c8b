"""Pre-training data path throughput: HDF5 shard -> loader -> augmented views on the device.

The real code: FeatureDataset (fbank + one JPEG decoded per clip) -> PretrainDataset ->
GlobalBatchSampler -> make_loader (persistent workers, prefetch 4, pinned memory on CUDA) ->
DeviceAugmenter, on a synthetic shard in the pipeline's format (fbank 1024 x 128 float16, 10
JPEG frames of 224 x 224 at quality 90; written once to --shard and reused).

Paths (rows), each for every --workers count:

* ``augment on <device>``: the trainer's path: batched augmentation where the model runs (on
  CUDA: pinned batch, non-blocking copy, then augmentation on the GPU).
* ``workers only``: the loader's batches, not augmented: what the CPU side has to deliver when
  the augmentation runs on the GPU, and so the ceiling of the trainer's path on this CPU.
* ``augment on cpu``: on CUDA only, the batched augmentation on the CPU in the main process,
  then the copy (what the GPU path saves).
* ``unpinned``: on CUDA only, the trainer's path with pin_memory=False (what pinning buys).
* ``authors (per-sample aug in workers)``: each worker augments its clips one by one on the
  CPU, as the release's dataset does; the main process copies the views.
* ``GPU JPEG decode``: on CUDA only, a prototype: workers return the JPEG bytes, the main
  process decodes the batch with torchvision's batched nvJPEG decode, then augments on the GPU.

Samples/s counts --batches batches after --warmup batches (worker start-up excluded), with
one device synchronisation at the end. With --step-json (a pretrain_step.py output) the rates
are compared with the best training step rate at the same batch size (target: >= 1.5x).

    python benchmarks/loader.py --device cuda --workers 0,2,4,8 --batch-size 64 --out benchmarks/out/loader_h100.json
    python benchmarks/loader.py --device cpu --workers 0,2 --batch-size 16 --batches 6 --clips 128
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from common import (
    OUT,
    default_cache_dir,
    environment,
    parse_ints,
    print_table,
    quantiles,
    resolve_device,
    synchronize,
    synthetic_shard,
    write_result,
)
from torch import Tensor

from equiav.augment import AudioAugment, VisualAugment, normalize_image
from equiav.data.store import FeatureDataset, read_index
from equiav.train.common import derive_seed
from equiav.train.data import (
    AUGMENT,
    FRAME,
    DeviceAugmenter,
    GlobalBatchSampler,
    PretrainDataset,
    PretrainViews,
    dataset_classes,
    make_loader,
)

CENTROID = 16
IMAGE = 224


class AuthorsDataset(PretrainDataset):
    """PretrainDataset whose items are augmented one by one on the CPU in the worker (the
    release's layout): clean + augmented views, their parameters and the S centroid vectors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.audio, self.visual = AudioAugment(), VisualAugment()

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        item = super().__getitem__(key)
        index, epoch = key
        generator = torch.Generator().manual_seed(derive_seed(self.seed, AUGMENT, epoch, index))
        fbank, frames = item["fbank"][None], item["frames"][None]
        audio_aug, audio_params = self.audio(fbank, generator)
        visual_aug, visual_params = self.visual(frames, generator)
        time_frames, freq_bins = fbank.shape[1:]
        return {
            "audio": item["fbank"],
            "visual": normalize_image(item["frames"]),
            "audio_aug": audio_aug[0],
            "visual_aug": visual_aug[0],
            "audio_params": audio_params[0],
            "visual_params": visual_params[0],
            "audio_centroid": self.audio.sample_params(1, CENTROID, time_frames, freq_bins, generator=generator)[0],
            "visual_centroid": self.visual.sample_params(1, CENTROID, IMAGE, IMAGE, generator=generator)[0],
        }


class RawJpegDataset(PretrainDataset):
    """PretrainDataset that leaves the chosen frame as JPEG bytes (uint8 [n]), for a batched
    decode on the GPU. The frame is drawn as FeatureDataset draws it (same seeded stream)."""

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        index, epoch = key
        features = self.features
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(derive_seed(self.seed, FRAME, epoch, index))
            f = features._file(int(features._shard_of[index]))
            row = int(features._rows[index])
            fbank = torch.from_numpy(f["fbank"][row].astype(np.float32))
            frames = f["frames"]
            k = int(torch.randint(frames.shape[1], ()).item())
            jpeg = torch.from_numpy(np.asarray(frames[row, k]))
        return {"fbank": (fbank - features.mean) / features.std, "jpeg": jpeg, "index": index}


def collate_raw(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "fbank": torch.stack([i["fbank"] for i in items]),
        "jpeg": [i["jpeg"] for i in items],
        "index": torch.tensor([i["index"] for i in items]),
    }


def endless(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler) -> Iterator[Any]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def measure(
    path: str,
    *,
    shard: Path,
    device: torch.device,
    workers: int,
    batch: int,
    batches: int,
    warmup: int,
) -> dict[str, Any]:
    classes = dataset_classes(read_index([shard])["labels"])
    features = FeatureDataset([shard], classes, mean=-5.0, std=3.0, frame="random")
    dataset_type = {"authors": AuthorsDataset, "gpu_decode": RawJpegDataset}.get(path, PretrainDataset)
    dataset = dataset_type(features, seed=0)
    sampler = GlobalBatchSampler(len(dataset), batch, rank=0, world_size=1, seed=0)
    pin = device.type == "cuda" and path != "unpinned"
    loader = make_loader(dataset, sampler, num_workers=workers, pin_memory=pin, seed=0, rank=0)
    if path == "gpu_decode":
        loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin, collate_fn=collate_raw,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )  # fmt: skip
    augment_device = torch.device("cpu") if path == "cpu_augment" else device
    augmenter = DeviceAugmenter(
        seed=0, image_size=IMAGE, centroid_samples=CENTROID, chunk=math.gcd(batch, 16), device=augment_device
    )

    def views(data: dict[str, Any], step: int) -> PretrainViews | dict[str, Tensor]:
        if path == "workers":
            return data
        if path == "authors":
            return {k: v.to(device, non_blocking=True) for k, v in data.items()}
        if path == "gpu_decode":
            frames = torchvision.io.decode_jpeg(data["jpeg"], mode=torchvision.io.ImageReadMode.RGB, device=device)
            data = {"fbank": data["fbank"], "frames": torch.stack(frames)}
        out = augmenter(data, step, 0)
        if path == "cpu_augment" and device.type != "cpu":
            pinned = {
                f: getattr(out, f).pin_memory().to(device, non_blocking=True)
                for f in (
                    "audio",
                    "audio_aug",
                    "visual",
                    "visual_aug",
                    "audio_params",
                    "visual_params",
                    "audio_centroid",
                    "visual_centroid",
                )
            }
            return PretrainViews(**pinned)
        return out

    stream = endless(loader, sampler)
    for step in range(warmup):
        views(next(stream), step)
    synchronize(device)
    started = time.perf_counter()
    for step in range(warmup, warmup + batches):
        views(next(stream), step)
    synchronize(device)
    seconds = time.perf_counter() - started
    del stream, loader  # shuts the workers down
    return {"samples_per_s": batch * batches / seconds, "batch_ms": 1e3 * seconds / batches}


PATH_NAMES = {
    "workers": "workers only (no augmentation)",
    "device": "augment on {device}",
    "cpu_augment": "augment on cpu, then copy",
    "unpinned": "augment on {device}, unpinned",
    "authors": "authors (per-sample aug in workers)",
    "gpu_decode": "GPU JPEG decode + augment on {device}",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--workers", default="0,2,4", help="DataLoader worker counts, comma-separated")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20, help="timed batches per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches first (worker start-up)")
    parser.add_argument("--repeats", type=int, default=1, help="measure every row this often; report the median")
    parser.add_argument("--clips", type=int, default=1024, help="clips in the synthetic shard")
    parser.add_argument("--paths", default=None, help=f"subset of {','.join(PATH_NAMES)} (default: all that apply)")
    parser.add_argument("--shard", type=Path, default=None, help="synthetic shard (default: a temporary folder)")
    parser.add_argument("--step-json", type=Path, default=None, help="pretrain_step.py output to compare with")
    parser.add_argument("--out", type=Path, default=OUT / "loader.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    worker_counts = parse_ints(args.workers)
    env = environment(device)
    if args.paths:
        paths = [p for p in args.paths.split(",") if p]
        unknown = sorted(set(paths) - set(PATH_NAMES))
        if unknown:
            sys.exit(f"unknown --paths {unknown}; choose among {', '.join(PATH_NAMES)}")
    else:
        paths = ["workers", "device", "authors"] if device.type == "cpu" else list(PATH_NAMES)
    shard = args.shard or default_cache_dir() / f"loader_shard_{args.clips}.h5"
    shard.parent.mkdir(parents=True, exist_ok=True)
    synthetic_shard(shard, args.clips)
    if args.clips < args.batch_size:
        sys.exit(f"--clips {args.clips} is smaller than one batch of {args.batch_size}")

    step_rate = None
    if args.step_json:
        step = json.loads(args.step_json.read_text())
        entry = step["summary"]["per_batch"].get(str(args.batch_size), {})
        step_rate = entry.get("best_samples_per_s")
        if step_rate is None:
            print(f"{args.step_json} has no training rate at batch {args.batch_size}", file=sys.stderr)

    results: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for workers in worker_counts:
            for path in paths:
                print(f"  {path}, {workers} workers ({repeat + 1}/{args.repeats})", file=sys.stderr, flush=True)
                result = measure(
                    path, shard=shard, device=device, workers=workers, batch=args.batch_size,
                    batches=args.batches, warmup=args.warmup,
                )  # fmt: skip
                results.setdefault((path, workers), []).append(result["samples_per_s"])
    rows = []
    for (path, workers), rates in results.items():
        median = quantiles(rates)["median"]
        rows.append(
            {
                "path": path,
                "name": PATH_NAMES[path].format(device=device.type),
                "workers": workers,
                "samples_per_s": median,
                "samples_per_s_runs": rates,
                "batch_ms": 1e3 * args.batch_size / median,
                "vs_step": median / step_rate if step_rate else None,
            }
        )
    print_table(
        rows,
        (
            ("name", "path"),
            ("workers", "workers"),
            ("samples_per_s", "samples/s"),
            ("batch_ms", "ms / batch"),
            ("vs_step", "x step rate"),
        ),
        title=f"Data loading, batch {args.batch_size}, {env['device_name']}"
        + (f" (step rate {step_rate:.1f} samples/s)" if step_rate else ""),
    )
    write_result(
        args,
        "loader",
        env,
        shard={"path": str(shard), "clips": args.clips, "bytes": shard.stat().st_size},
        step_samples_per_s=step_rate,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
