"""ffmpeg decoder options of ``decode_clip`` and where one clip's feature time goes, on one core.

(a) Options: ``decode_clip`` as the features stage calls it, with its ffmpeg command changed
    only in the decoder's ``-threads`` (1, the pipeline's; 2; ``auto``: the option left out,
    ffmpeg's default) and with ``-skip_loop_filter all`` added on the input (the H.264 deblocking
    filter skipped: faster, other pixels). Reports seconds per clip and, for the skipped filter,
    the mean |pixel difference| of the JPEG frames against the pipeline's.
(b) Breakdown of the pipeline's path (``-threads 1``): ffmpeg start-up (``ffmpeg -version``),
    the whole video stream decoded to nowhere (``-f null``), ``decode_clip`` of the audio only
    and of audio + 10 frames, the Kaldi fbank, and the 10 JPEG encodes.

Everything runs pinned to one core (sched_setaffinity, inherited by ffmpeg) with one torch
thread, the variants alternating clip by clip (in a rotating order) so that a change of load
weighs on all alike. Each call reports wall time and CPU time (this process's and its ffmpeg
children's): on a shared machine the wall time carries the other jobs' load, the CPU time much
less. Medians over clips x repeats; the options are compared by the median of each clip's CPU
time ratio to the pipeline's in the same pass. The clips are those of feature_extraction.py (640x360 25 fps
H.264 + 44.1 kHz stereo AAC, 10 s), made once into the same folder.

    python benchmarks/decode_options.py [--clips 8] [--repeats 3] [--out benchmarks/out/decode_options.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torchvision
from common import write_json
from feature_extraction import add_clip_arguments, clips_on_one_core, run_facts

from equiav.data import media
from equiav.data.features import FeatureSettings, fbank
from equiav.data.media import decode_clip, ffmpeg_exe

SETTINGS = FeatureSettings()
ROOT = Path(__file__).resolve().parent
# name -> (value of the decoder's -threads, None to leave the option out; skip the loop filter)
VARIANTS: dict[str, tuple[str | None, bool]] = {
    "-threads 1 (pipeline)": ("1", False),
    "-threads 2": ("2", False),
    "-threads auto (ffmpeg default)": (None, False),
    "-threads 1 -skip_loop_filter all": ("1", True),
}


@contextlib.contextmanager
def ffmpeg_options(threads: str | None, skip_loop_filter: bool) -> Iterator[None]:
    """Run decode_clip's own ffmpeg command with only these options changed, so the timing is
    the pipeline's code path and not a re-implementation of it."""
    popen = subprocess.Popen

    def changed(cmd, *args, **kwargs):
        cmd = list(cmd)
        if "-threads" not in cmd:  # not decode_clip's command (e.g. imageio-ffmpeg's `-version` check)
            return popen(cmd, *args, **kwargs)
        at = cmd.index("-threads")  # before -i: the decoder's threads
        if threads is None:
            del cmd[at : at + 2]
        else:
            cmd[at + 1] = threads
        if skip_loop_filter:
            at = cmd.index("-i")
            cmd[at:at] = ["-skip_loop_filter", "all"]
        return popen(cmd, *args, **kwargs)

    with mock.patch.object(media.subprocess, "Popen", changed):
        yield


def decode(path: Path, seconds: float, num_frames: int = SETTINGS.num_frames) -> media.DecodedClip:
    return decode_clip(
        path,
        0.0,
        seconds,
        sample_rate=SETTINGS.sample_rate,
        num_frames=num_frames,
        frame_size=SETTINGS.frame_size,
        jpeg_quality=SETTINGS.jpeg_quality,
    )


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the ffmpeg runs)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measured(run: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[float, float, Any]:
    """(wall seconds, CPU seconds, result) of one call. On a shared machine the CPU time is the
    steadier of the two: waiting for the core does not count."""
    wall, cpu = time.perf_counter(), _cpu_seconds()
    out = run(*args, **kwargs)
    return time.perf_counter() - wall, _cpu_seconds() - cpu, out


def mean_pixel_difference(a: list[bytes], b: list[bytes]) -> float:
    diffs = []
    for jpeg_a, jpeg_b in zip(a, b, strict=True):
        image_a = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpeg_a), dtype=torch.uint8)).float()
        image_b = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpeg_b), dtype=torch.uint8)).float()
        diffs.append((image_a - image_b).abs().mean().item())
    return float(np.mean(diffs))


def options(paths: list[Path], seconds: float, repeats: int) -> tuple[dict[str, dict[str, list[float]]], float]:
    """Per variant: wall and CPU seconds of every (pass, clip), and the CPU time's ratio to the
    pipeline's on the same clip in the same pass; the mean pixel difference of skipping the filter."""
    names = list(VARIANTS)
    times = {name: {"wall": [], "cpu": [], "cpu_ratio": []} for name in names}
    pixel_diffs = []
    for threads, skip in VARIANTS.values():  # warm-up: page cache, ffmpeg's first start
        with ffmpeg_options(threads, skip):
            decode(paths[0], seconds)
    for k in range(repeats * len(paths)):
        path = paths[k % len(paths)]
        frames, cpu = {}, {}
        # A rotating order, so that no variant always runs first after the clip changes.
        for name in names[k % len(names) :] + names[: k % len(names)]:
            with ffmpeg_options(*VARIANTS[name]):
                wall, cpu[name], clip = measured(decode, path, seconds)
            times[name]["wall"].append(wall)
            times[name]["cpu"].append(cpu[name])
            frames[name] = clip.frames
        for name in names:
            times[name]["cpu_ratio"].append(cpu[name] / cpu[names[0]])
        pixel_diffs.append(mean_pixel_difference(frames[names[0]], frames["-threads 1 -skip_loop_filter all"]))
    return times, float(np.mean(pixel_diffs))


def breakdown(paths: list[Path], seconds: float, repeats: int) -> dict[str, dict[str, list[float]]]:
    ffmpeg = ffmpeg_exe()
    startup = [ffmpeg, "-hide_banner", "-nostdin", "-version"]
    # The pipeline's decoder settings, every frame decoded, nothing filtered or written.
    video_only = [ffmpeg, "-hide_banner", "-nostdin", "-v", "error", "-threads", "1", "-filter_threads", "1"]
    names = (
        "ffmpeg start-up (-version)",
        "video stream decoded to -f null (all frames)",
        "decode_clip, audio only",
        "decode_clip, audio + 10 frames (JPEG included)",
        "fbank",
        "10 JPEG encodes",
    )
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}

    def add(name: str, wall: float, cpu: float, out: Any) -> Any:
        times[name]["wall"].append(wall)
        times[name]["cpu"].append(cpu)
        return out

    decode(paths[0], seconds)  # warm-up
    for _ in range(repeats):
        for path in paths:
            run = subprocess.run
            add(names[0], *measured(run, startup, check=True, capture_output=True))
            null = [*video_only, "-i", str(path), "-map", "0:V:0", "-f", "null", "-"]
            add(names[1], *measured(run, null, check=True, capture_output=True))
            add(names[2], *measured(decode, path, seconds, num_frames=0))
            clip = add(names[3], *measured(decode, path, seconds))
            add(names[4], *measured(fbank, clip.waveform, SETTINGS))
            images = [
                torchvision.io.decode_jpeg(torch.frombuffer(bytearray(j), dtype=torch.uint8)) for j in clip.frames
            ]
            add(names[5], *measured(torchvision.io.encode_jpeg, images, quality=SETTINGS.jpeg_quality))
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser, clips=8)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the clips (default 3)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "decode_options.json")
    args = parser.parse_args(argv)

    paths, core = clips_on_one_core(args)
    load_before = os.getloadavg()[0]

    option_times, pixel_diff = options(paths, args.seconds, args.repeats)
    parts = breakdown(paths, args.seconds, args.repeats)
    load_after = os.getloadavg()[0]

    def median(values: list[float]) -> float:
        return statistics.median(values)

    print(
        f"{len(paths)} clips x {args.repeats}, {args.seconds:g} s 640x360 25 fps H.264 (GOP {args.gop:g} s); one core"
    )
    print("medians; 'CPU vs -threads 1': of the CPU-time ratios to -threads 1 on the same clip and pass")
    print(f"{'ffmpeg options of decode_clip':<36}{'wall s/clip':>12}{'CPU s/clip':>12}{'CPU vs -threads 1':>19}")
    for name, values in option_times.items():
        ratio = median(values["cpu_ratio"]) - 1
        print(f"{name:<36}{median(values['wall']):>12.3f}{median(values['cpu']):>12.3f}{ratio:>+19.1%}")
    print(f"-skip_loop_filter all: frames' mean |pixel diff| {pixel_diff:.2f} / 255")
    print(f"{'part (pipeline, -threads 1)':<50}{'wall s/clip':>12}{'CPU s/clip':>12}")
    for name, values in parts.items():
        print(f"{name:<50}{median(values['wall']):>12.4f}{median(values['cpu']):>12.4f}")
    print(f"load average (1 min): {load_before:.2f} before, {load_after:.2f} after")

    version = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True, check=True).stdout.split("\n")[
        0
    ]
    report = {
        **run_facts(core),
        "load_average": {"before": load_before, "after": load_after},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "ffmpeg": version},
        "clips": len(paths),
        "repeats": args.repeats,
        "clip_seconds": args.seconds,
        "gop_seconds": args.gop,
        "options_median": {
            name: {key: median(series) for key, series in values.items()} for name, values in option_times.items()
        },
        "skip_loop_filter_mean_abs_pixel_diff": pixel_diff,
        "breakdown_median": {
            name: {key: median(series) for key, series in values.items()} for name, values in parts.items()
        },
        "samples": {"options": option_times, "breakdown": parts},
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
