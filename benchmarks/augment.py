"""The pre-training augmentation alone: one call on the whole batch against one call per chunk.

Times what DeviceAugmenter does per step on a batch at the model's input sizes (fbank
1024 x 128 float32, frames uint8 3 x 224 x 224 already on the device): the audio and visual
augmentation of every row, with one generator per ``--chunk`` rows, either

* ``one call``: both modules called once with the list of generators (the trainer's GPU path), or
* ``per chunk``: one call per chunk and modality (the trainer's CPU path: the chunk's tensors
  stay in the cache),

both drawing the same parameters (tests/test_augment.py checks the outputs are equal bit for
bit). Each timed batch ends with a device synchronisation; ms per batch, median of --repeats.

    python benchmarks/augment.py --device cuda --batch-sizes 64,128,256 --out benchmarks/out/augment_h200.json
    python benchmarks/augment.py --device cpu --batch-sizes 128 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from common import OUT, environment, parse_ints, print_table, quantiles, resolve_device, synchronize, write_result

from equiav.augment import AudioAugment, VisualAugment

TIME_FRAMES, FREQ_BINS, IMAGE = 1024, 128, 224


def generators(batch: int, chunk: int, step: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(step * 1000 + j) for j in range(batch // chunk)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda or cpu")
    parser.add_argument("--batch-sizes", default="64,128", help="per-process batch sizes, comma-separated")
    parser.add_argument("--chunk", type=int, default=16, help="rows per generator (the trainer's augment_chunk)")
    parser.add_argument("--repeats", type=int, default=5, help="timed batches per row (after one warm-up)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=OUT / "augment.json")
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    env = environment(device)
    audio, visual = AudioAugment(), VisualAugment()
    rows: list[dict[str, Any]] = []
    for batch in parse_ints(args.batch_sizes):
        if batch % args.chunk:
            sys.exit(f"--batch-sizes {batch} is not a multiple of --chunk {args.chunk}")
        source = torch.Generator().manual_seed(batch)
        fbank = torch.randn(batch, TIME_FRAMES, FREQ_BINS, generator=source).to(device)
        frames = torch.randint(0, 256, (batch, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=source).to(device)
        chunk = args.chunk

        def one_call(step: int) -> None:
            gens = generators(batch, chunk, step)
            audio(fbank, gens)
            visual(frames, gens)

        def per_chunk(step: int) -> None:
            for j, generator in enumerate(generators(batch, chunk, step)):
                rows_here = slice(j * chunk, (j + 1) * chunk)
                audio(fbank[rows_here], generator)
                visual(frames[rows_here], generator)

        modes: dict[str, Callable[[int], None]] = {"one call": one_call, "per chunk": per_chunk}
        for name, run in modes.items():
            run(0)  # warm-up: allocator, pinned-memory pool
            synchronize(device)
            seconds = []
            for step in range(1, args.repeats + 1):
                started = time.perf_counter()
                run(step)
                synchronize(device)
                seconds.append(time.perf_counter() - started)
            median = quantiles(seconds)["median"]
            rows.append(
                {
                    "batch": batch,
                    "mode": name,
                    "ms_per_batch": 1e3 * median,
                    "samples_per_s": batch / median,
                    "runs_s": seconds,
                }
            )
    print_table(
        rows,
        (("batch", "batch"), ("mode", "mode"), ("ms_per_batch", "ms / batch"), ("samples_per_s", "samples/s")),
        title=f"Augmentation (audio + visual, chunk {args.chunk}), {env['device_name']}, {torch.get_num_threads()} CPU threads",
    )
    write_result(
        args,
        "augment",
        env,
        threads=torch.get_num_threads(),
        rows=rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
