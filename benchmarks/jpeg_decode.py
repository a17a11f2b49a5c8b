"""JPEG decoding of the shards' frames: CPU (one call per image, or a list) against the GPU
(torchvision's batched nvJPEG decode of a list), in images/s.

The images are synthetic 224 x 224 frames at quality 90 (the feature stage's format). The GPU
rows count the host->device copy of the bytes and end with a synchronisation; their output
stays on the GPU (what the training step needs).

    python benchmarks/jpeg_decode.py --device cuda --images 512 --batch-sizes 64,256 --out benchmarks/out/jpeg_decode_h100.json
    python benchmarks/jpeg_decode.py --device cpu --images 128
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from common import (
    OUT,
    environment,
    parse_ints,
    print_table,
    quantiles,
    random_jpegs,
    resolve_device,
    synchronize,
    write_result,
)
from torchvision.io import ImageReadMode, decode_jpeg


def timed(run: Callable[[], Any], device: torch.device, images: int, repeats: int) -> list[float]:
    run()  # warm-up (nvJPEG handles, allocator)
    synchronize(device)
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        synchronize(device)
        rates.append(images / (time.perf_counter() - started))
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu (cpu: the CPU rows only)")
    parser.add_argument("--images", type=int, default=512, help="images decoded per measurement")
    parser.add_argument("--batch-sizes", default="64,256", help="list lengths of the batched GPU decode")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT / "jpeg_decode.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    env = environment(device)
    jpegs = random_jpegs(args.images, args.size, args.quality)
    mean_bytes = sum(j.numel() for j in jpegs) / len(jpegs)
    mode = ImageReadMode.RGB
    rows: list[dict[str, Any]] = []

    def add(name: str, where: str, batch: int | None, rates: list[float]) -> None:
        q = quantiles(rates)
        rows.append({"method": name, "device": where, "batch": batch, "images_per_s": q["median"], "runs": rates})

    add(
        "decode_jpeg per image",
        "cpu",
        1,
        timed(lambda: [decode_jpeg(j, mode=mode) for j in jpegs], torch.device("cpu"), len(jpegs), args.repeats),
    )
    add(
        "decode_jpeg(list)",
        "cpu",
        len(jpegs),
        timed(lambda: decode_jpeg(jpegs, mode=mode), torch.device("cpu"), len(jpegs), args.repeats),
    )
    if device.type == "cuda":
        add(
            "decode_jpeg per image",
            str(device),
            1,
            timed(lambda: [decode_jpeg(j, mode=mode, device=device) for j in jpegs], device, len(jpegs), args.repeats),
        )
        for batch in parse_ints(args.batch_sizes):
            chunks = [jpegs[i : i + batch] for i in range(0, len(jpegs), batch)]
            add(
                "decode_jpeg(list), batched",
                str(device),
                batch,
                timed(
                    lambda chunks=chunks: [decode_jpeg(c, mode=mode, device=device) for c in chunks],
                    device,
                    len(jpegs),
                    args.repeats,
                ),
            )
    cpu_rate = rows[0]["images_per_s"]
    for row in rows:
        row["vs_cpu_per_image"] = row["images_per_s"] / cpu_rate
    print_table(
        rows,
        (
            ("method", "method"),
            ("device", "device"),
            ("batch", "batch"),
            ("images_per_s", "images/s"),
            ("vs_cpu_per_image", "x CPU per image"),
        ),
        title=f"JPEG decode, {args.images} images {args.size}x{args.size} q{args.quality} (mean {mean_bytes / 1024:.1f} KiB), {env['device_name']}",
    )
    write_result(
        args,
        "jpeg_decode",
        env,
        torchvision=torchvision.__version__,
        mean_jpeg_bytes=mean_bytes,
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
