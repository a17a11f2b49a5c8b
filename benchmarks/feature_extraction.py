"""Feature extraction throughput on one CPU core: ours against the authors' path.

(a) ours: ``decode_clip`` (one ffmpeg process: 16 kHz mono float audio + 10 scaled, cropped
    RGB frames) + Kaldi fbank + JPEG encoding.
(b) the authors' path, re-implemented from its description: one ffmpeg call writes a 16 kHz
    mono wav, read back with ``wave`` + numpy and turned into the same fbank; then OpenCV
    ``VideoCapture`` with one ``CAP_PROP_POS_FRAMES`` seek per frame (frame int(k*total/10)),
    read, resize (short side 224, bicubic), centre crop, JPEG encode, for 10 frames.

Both run sequentially, pinned to one core (sched_setaffinity, inherited by ffmpeg), with one
thread everywhere (torch, OpenCV, ffmpeg ``-threads 1``). The clips are synthesised like a
low-resolution YouTube download: 640x360 25 fps H.264 + 44.1 kHz stereo AAC, 10 s.

    python benchmarks/feature_extraction.py [--clips 20] [--gop 2] [--out benchmarks/out/feature_extraction.json]

Needs OpenCV: ``pip install opencv-python-headless`` (not a project dependency).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import wave
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from common import write_json

from equiav.data.features import FeatureSettings, fbank
from equiav.data.media import decode_clip, ffmpeg_exe

SETTINGS = FeatureSettings()
ROOT = Path(__file__).resolve().parent


def import_cv2():
    try:
        import cv2
    except ImportError:
        sys.exit(
            "OpenCV is needed for the authors' path and is not a project dependency; install it with\n"
            f"    {sys.executable} -m pip install opencv-python-headless"
        )
    return cv2


def make_clips(work: Path, count: int, seconds: float, gop_seconds: float) -> list[Path]:
    """count distinct clips (different test patterns and tones), reused when already there."""
    work.mkdir(parents=True, exist_ok=True)
    fps = 25
    paths = []
    for k in range(count):
        path = work / f"clip{k:03d}_{seconds:g}s_gop{gop_seconds:g}s.mp4"
        paths.append(path)
        if path.exists():
            continue
        # Mild temporal noise keeps the bit rate near a 360p YouTube stream (~0.5-1 Mb/s)
        # instead of the near-static test pattern's few kb/s.
        video = f"testsrc2=size=640x360:rate={fps}:duration={seconds},hue=h={37 * k},noise=alls=6:allf=t"
        audio = f"sine=frequency={220 + 37 * k}:sample_rate=44100:duration={seconds}"
        tmp = path.with_suffix(".part.mp4")
        cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", video]
        cmd += ["-f", "lavfi", "-i", audio, "-ac", "2", "-c:v", "libx264", "-preset", "medium", "-crf", "26"]
        cmd += ["-g", str(round(gop_seconds * fps)), "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a", "128k"]
        cmd += ["-movflags", "+faststart", str(tmp)]
        subprocess.run(cmd, check=True)
        os.replace(tmp, path)
    return paths


def ours(path: Path, seconds: float) -> tuple[torch.Tensor, list[bytes]]:
    clip = decode_clip(
        path,
        0.0,
        seconds,
        sample_rate=SETTINGS.sample_rate,
        num_frames=SETTINGS.num_frames,
        frame_size=SETTINGS.frame_size,
        jpeg_quality=SETTINGS.jpeg_quality,
    )
    feats, _ = fbank(clip.waveform, SETTINGS)
    return feats, clip.frames


def authors(path: Path, scratch: Path, cv2) -> tuple[torch.Tensor, list[bytes]]:
    wav_path = scratch / "audio.wav"
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-threads", "1", "-y", "-i", str(path)]
    cmd += ["-vn", "-ac", "1", "-ar", str(SETTINGS.sample_rate), str(wav_path)]
    subprocess.run(cmd, check=True)
    with wave.open(str(wav_path), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    feats, _ = fbank(pcm.astype(np.float32) / 32768.0, SETTINGS)

    capture = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
    size = SETTINGS.frame_size
    frames = []
    for k in range(SETTINGS.num_frames):
        capture.set(cv2.CAP_PROP_POS_FRAMES, int(k * total / SETTINGS.num_frames))
        ok, bgr = capture.read()
        if not ok:
            raise RuntimeError(f"OpenCV could not read frame {k} of {path}")
        h, w = bgr.shape[:2]
        scale = size / min(h, w)
        target = (max(size, round(w * scale)), max(size, round(h * scale)))  # (width, height)
        resized = cv2.resize(bgr, target, interpolation=cv2.INTER_CUBIC)
        top, left = (resized.shape[0] - size) // 2, (resized.shape[1] - size) // 2
        crop = resized[top : top + size, left : left + size]
        ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, SETTINGS.jpeg_quality])
        frames.append(jpeg.tobytes())
    capture.release()
    return feats, frames


def agreement(ours_out: list, authors_out: list, cv2) -> tuple[float, float, float]:
    """Mean |difference| of the two paths' fbanks (all bins, and the loudest 10 % of each clip's
    time-frequency bins in ours) and of their frames' pixels (0-255).

    Both take the same frame times and the same fbank definition, so these only measure
    implementation noise (bicubic kernels, JPEG encoders, the wav's 16-bit rounding). Means,
    not maxima: in near-silent mel bands the log amplifies that rounding, which the loudest
    bins show apart.
    """
    fbank, loud = [], []
    for a, b in zip(ours_out, authors_out, strict=True):
        diff = (a[0].float() - b[0].float()).abs()
        fbank.append(diff.mean().item())
        loud.append(diff[a[0].float() >= a[0].float().quantile(0.9)].mean().item())
    pixels = []
    for a, b in zip(ours_out, authors_out, strict=True):
        for jpeg_a, jpeg_b in zip(a[1], b[1], strict=True):
            image_a = cv2.imdecode(np.frombuffer(jpeg_a, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)
            image_b = cv2.imdecode(np.frombuffer(jpeg_b, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)
            pixels.append(np.abs(image_a - image_b).mean())
    return float(np.mean(fbank)), float(np.mean(loud)), float(np.mean(pixels))


def timed(runs: dict[str, Callable[[Path], tuple]], paths: list[Path]) -> tuple[dict[str, float], dict[str, list]]:
    """Seconds each path spends on all clips, and its outputs.

    The paths alternate clip by clip, so a change in machine load (a shared box) weighs on
    both alike instead of on whichever ran second.
    """
    for run in runs.values():
        run(paths[0])  # warm-up: imports, page cache, OpenCV/ffmpeg start-up paths
    seconds = dict.fromkeys(runs, 0.0)
    outputs: dict[str, list] = {name: [] for name in runs}
    for path in paths:
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name].append(run(path))
            seconds[name] += time.perf_counter() - start
    return seconds, outputs


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown"
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def add_clip_arguments(parser: argparse.ArgumentParser, clips: int) -> None:
    """The generated clips (count, length, keyframe interval, folder) and the pinned core."""
    parser.add_argument("--clips", type=int, default=clips, help=f"number of clips (default {clips})")
    parser.add_argument("--seconds", type=float, default=10.0, help="clip length in s (default 10)")
    parser.add_argument("--gop", type=float, default=2.0, help="H.264 keyframe interval in s (default 2)")
    parser.add_argument("--core", type=int, default=None, help="CPU to pin to (default: the first allowed)")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "feature_extraction_media")


def clips_on_one_core(args: argparse.Namespace) -> tuple[list[Path], int]:
    """The clips of ``add_clip_arguments``, made once, and the core this process (and every
    ffmpeg it starts) is now pinned to, with one torch thread."""
    paths = make_clips(args.work, args.clips, args.seconds, args.gop)
    core = args.core if args.core is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    return paths, core


def run_facts(core: int) -> dict:
    """What every clip benchmark's report starts with: when, how it was run, on what."""
    return {
        "date": datetime.date.today().isoformat(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpu": cpu_model(), "cores_visible": os.cpu_count(), "pinned_core": core},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_clip_arguments(parser, clips=20)
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "feature_extraction.json")
    args = parser.parse_args(argv)
    cv2 = import_cv2()

    paths, core = clips_on_one_core(args)
    cv2.setNumThreads(1)

    ours_name, authors_name = "ours (one ffmpeg pass)", "authors (wav + OpenCV seeks)"
    with tempfile.TemporaryDirectory() as scratch:
        runs = {ours_name: lambda p: ours(p, args.seconds), authors_name: lambda p: authors(p, Path(scratch), cv2)}
        seconds, outputs = timed(runs, paths)
    fbank_diff, loud_diff, pixel_diff = agreement(outputs[ours_name], outputs[authors_name], cv2)

    n = len(paths)
    rows = {name: {"seconds": t, "clips_per_s": n / t, "s_per_clip": t / n} for name, t in seconds.items()}
    ratio = seconds[authors_name] / seconds[ours_name]
    print(f"{n} clips of {args.seconds:g} s, 640x360 25 fps H.264 (GOP {args.gop:g} s) + 44.1 kHz stereo AAC; one core")
    print(f"{'path':<32}{'clips/s/core':>14}{'s/clip':>10}")
    for name, row in rows.items():
        print(f"{name:<32}{row['clips_per_s']:>14.2f}{row['s_per_clip']:>10.3f}")
    print(f"speed-up (ours / authors): {ratio:.2f}x")
    print(
        f"agreement: fbank mean |diff| {fbank_diff:.4f} (loudest 10 % of bins {loud_diff:.4f}), "
        f"frames mean |pixel diff| {pixel_diff:.2f} / 255"
    )

    version = subprocess.run([ffmpeg_exe(), "-version"], capture_output=True, text=True).stdout.split("\n")[0]
    report = {
        **run_facts(core),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "opencv": cv2.__version__,
            "ffmpeg": version,
        },
        "clips": n,
        "clip_seconds": args.seconds,
        "gop_seconds": args.gop,
        "results": rows,
        "speedup": ratio,
        "agreement": {
            "fbank_mean_abs_diff": fbank_diff,
            "fbank_loudest_10pct_mean_abs_diff": loud_diff,
            "frame_mean_abs_pixel_diff": pixel_diff,
        },
    }
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()
