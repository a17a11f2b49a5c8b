"""Shared fixtures: tiny media files synthesised with ffmpeg's lavfi sources (no network)."""

from __future__ import annotations

import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torchvision.io

from equiav.data.media import ffmpeg_exe

# Bits of the frame number drawn as vertical stripes (bit b = column band b, least
# significant on the left): white for 1, black for 0. Wide flat bands survive H.264, the
# scale to 224 and JPEG; 8 bits count 256 frames.
FRAME_NUMBER_BITS = 8
FRAME_NUMBER_LUMA = f"255*mod(floor(N/pow(2,floor(X*{FRAME_NUMBER_BITS}/W))),2)"


# The release's behaviours docs/method.md names, as `audio_augment` keys of a pre-training
# run's settings (written out here, not read from the code: the docs are the promise).
RELEASE_SWITCHES = (
    "release_mask_units",
    "release_crop_axes",
    "release_clamp",
    "release_time_shift",
    "release_coupled_shift",
)


def garbage_bytes(size: int, seed: int = 0) -> bytes:
    """Random bytes from a fixed seed, the same on every run. Fresh random blobs are not: about 1
    in 200 probes as a valid raw H.263 or audio stream, which made the damaged-media tests flaky."""
    return random.Random(seed).randbytes(size)


def make_clip(
    path: Path,
    seconds: float,
    *,
    fps: str | float = 25,
    size: tuple[int, int] = (64, 64),
    with_audio: bool = True,
    with_video: bool = True,
    audio_rate: int = 44100,
    channels: int = 1,
    audio_expr: str | None = None,
    video_seconds: float | None = None,
    luma: str | None = None,
    numbered: bool = False,
    faststart: bool = True,
) -> Path:
    """Write a small clip: H.264 + AAC for .mp4/.mkv, 16-bit PCM for .wav.

    Video is ``testsrc2`` unless ``luma`` gives a geq expression for the grey level (N is the
    frame number, X/Y/W/H pixel position and size) or ``numbered`` draws the frame number as
    FRAME_NUMBER_BITS stripes (read it back with the frame_number fixture); it lasts ``video_seconds`` when given
    (else ``seconds``). Audio is a 440 Hz sine at amplitude 0.5 unless ``audio_expr`` gives an
    aevalsrc expression of t, identical on every channel.
    """
    width, height = size
    if numbered:
        luma = FRAME_NUMBER_LUMA
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-v", "error", "-y"]
    if with_video:
        video_len = video_seconds if video_seconds is not None else seconds
        if luma is None:
            source = f"testsrc2=size={width}x{height}:rate={fps}:duration={video_len}"
        else:
            source = f"nullsrc=size={width}x{height}:rate={fps}:duration={video_len},geq=lum='{luma}':cb=128:cr=128"
        cmd += ["-f", "lavfi", "-i", source]
    if with_audio:
        expr = (audio_expr or "0.5*sin(2*PI*440*t)").replace(",", r"\,")
        channel_exprs = "|".join([expr] * channels)
        cmd += ["-f", "lavfi", "-i", f"aevalsrc={channel_exprs}:s={audio_rate}:d={seconds}"]
    if path.suffix == ".wav":
        cmd += ["-c:a", "pcm_s16le"]
    else:
        if with_video:
            # crf 12: the frame-number stripes must come back exactly; -g keeps seeks realistic.
            cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-crf", "12", "-pix_fmt", "yuv420p", "-g", "12"]
        if with_audio:
            cmd += ["-c:a", "aac", "-b:a", "96k"]
        if faststart and path.suffix == ".mp4":
            cmd += ["-movflags", "+faststart"]
    cmd.append(str(path))
    subprocess.run(cmd, check=True, capture_output=True)
    return path


@pytest.fixture
def clip_factory(tmp_path: Path) -> Callable[..., Path]:
    """make_clip writing into the test's tmp_path: clip_factory("name.mp4", seconds, ...)."""

    def factory(name: str, seconds: float, **kwargs) -> Path:
        return make_clip(tmp_path / name, seconds, **kwargs)

    return factory


@pytest.fixture(scope="session")
def numbered_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 s, 25 fps, 128x128 mp4 whose picture encodes its frame number, with a 44.1 kHz sine."""
    path = tmp_path_factory.mktemp("media") / "numbered.mp4"
    return make_clip(path, 6.0, fps=25, size=(128, 128), numbered=True)


def _read_frame_number(jpeg: bytes) -> int:
    image = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
    row = image[:, image.shape[1] // 2, :].float().mean(dim=0)  # [W] grey level of the middle row
    width = row.shape[0]
    bits = [int(row[int((b + 0.5) * width / FRAME_NUMBER_BITS)] > 127) for b in range(FRAME_NUMBER_BITS)]
    return sum(bit << b for b, bit in enumerate(bits))


@pytest.fixture(scope="session")
def frame_number() -> Callable[[bytes], int]:
    """Reads the frame number back from a JPEG of a numbered_clip frame."""
    return _read_frame_number


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The small demo DAG (tests/workflow_runner.py) run locally into a temporary folder, config at small.yaml."""
    from workflow_runner import REPO, small_demo_config, snakemake

    work = tmp_path_factory.mktemp("demo")
    config = small_demo_config(work)
    snakemake("--profile", str(REPO / "workflow/profiles/default"), "--cores", "2", "--configfile", str(config))
    return work
