"""The demo data set: small audio-visual clips that the pipeline makes itself with ffmpeg.

Each class has its own base tone and background colour; each clip has its own instance
signature, a second tone whose pitch matches the position of a white bar in the picture.
So the class is learnable from either modality, and the pairing of a clip's sound with its
picture (retrieval) needs the instance signature shared across modalities. Noise is mixed
into both so neither task is trivial.
"""

from __future__ import annotations

import logging
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from equiav.atomic import atomic_output
from equiav.data.media import ffmpeg_exe

log = logging.getLogger(__name__)

_CLASS_TONES = (220, 330, 440, 550, 660, 770, 880, 990, 1100, 1210, 1320, 1430)  # Hz
_CLASS_COLOURS = (
    "0x1f77b4", "0xff7f0e", "0x2ca02c", "0xd62728", "0x9467bd", "0x8c564b",
    "0xe377c2", "0x7f7f7f", "0xbcbd22", "0x17becf", "0x393b79", "0x637939",
)  # fmt: skip
_CLASS_NAMES = (
    "blue-220hz", "orange-330hz", "green-440hz", "red-550hz", "purple-660hz", "brown-770hz",
    "pink-880hz", "grey-990hz", "olive-1100hz", "cyan-1210hz", "navy-1320hz", "moss-1430hz",
)  # fmt: skip


@dataclass(frozen=True)
class DemoSettings:
    """The top-level `demo` section of the config."""

    classes: int = 4
    train_per_class: int = 12
    test_per_class: int = 4
    seconds: float = 4.0
    segment: tuple[float, float] = (0.5, 3.5)
    fps: int = 10
    width: int = 160
    height: int = 120
    audio_rate: int = 22050
    broken_clips: bool = True
    seed: int = 0

    @classmethod
    def from_config(cls, demo: dict) -> DemoSettings:
        return cls(**{**demo, "segment": tuple(demo.get("segment", cls.segment))})


def make_demo_clip(path: Path, cls: int, signature: float, s: DemoSettings, *, with_audio: bool = True) -> None:
    """One clip: class tone + instance tone (1.5-3.5 kHz) and class colour + a bar at the matching x."""
    instance_hz = 1500 + 2000 * signature
    bar_w = max(4, s.width // 10)
    bar_x = int(signature * (s.width - bar_w))
    video = (
        f"color=c={_CLASS_COLOURS[cls]}:s={s.width}x{s.height}:r={s.fps}:d={s.seconds},"
        f"drawbox=x={bar_x}:y=0:w={bar_w}:h={s.height}:color=white:t=fill,"
        "noise=alls=12:allf=t,format=yuv420p"
    )
    audio = (
        f"sine=f={_CLASS_TONES[cls]}:r={s.audio_rate}:d={s.seconds}[a0];"
        f"sine=f={instance_hz:.1f}:r={s.audio_rate}:d={s.seconds}[a1];"
        f"anoisesrc=c=pink:a=0.15:r={s.audio_rate}:d={s.seconds}:seed={int(signature * 1e6)}[a2];"
        "[a0][a1][a2]amix=inputs=3:normalize=1[aout]"
    )
    cmd = [ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi", "-i", video]
    if with_audio:
        cmd += ["-filter_complex", audio, "-map", "0:v", "-map", "[aout]", "-c:a", "aac", "-b:a", "64k"]
    cmd += ["-c:v", "libx264", "-preset", "ultrafast", "-g", str(s.fps), "-threads", "1", str(path)]
    subprocess.run(cmd, check=True, capture_output=True)


def generate_demo(out_dir: str | Path, settings: DemoSettings) -> pd.DataFrame:
    """Write the demo clips and their list (``out_dir/list.csv``, user-list format); return the list.

    Sources are file:// URLs, so the download stage fetches them through yt-dlp exactly as
    it fetches YouTube clips. Files are written under a temporary name first, so a killed
    run never leaves a half-written clip under its final name.
    """
    out_dir = Path(out_dir).resolve()
    media = out_dir / "media"
    media.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(settings.seed)
    start, end = settings.segment
    if not 0 <= start < end <= settings.seconds:
        raise ValueError(f"demo.segment {list(settings.segment)} must lie inside the {settings.seconds} s clips")
    rows = []
    per_class = settings.train_per_class + settings.test_per_class
    for cls in range(settings.classes):
        # Evenly spread signatures, shuffled, so no two clips of a class share one.
        signatures = rng.permutation((np.arange(per_class) + rng.uniform(0.1, 0.9)) / per_class)
        for i, signature in enumerate(signatures):
            clip_id = f"{_CLASS_NAMES[cls]}-{i:03d}"
            split = "train" if i < settings.train_per_class else "test"
            rows.append((clip_id, cls, float(signature), split, True))
    if settings.broken_clips:
        rows.append(("broken-missing-file", 0, 0.5, "train", None))  # never written: unavailable
        rows.append(("broken-no-audio", 1, 0.5, "train", False))  # picture only: no-audio
    records = []
    for clip_id, cls, signature, split, with_audio in rows:
        path = media / f"{clip_id}.mp4"
        if with_audio is not None and not path.exists():
            with atomic_output(path) as tmp:
                make_demo_clip(tmp, cls, signature, settings, with_audio=with_audio)
        records.append(
            {
                "clip_id": clip_id,
                "source": path.as_uri(),
                "start": start,
                "end": end,
                "labels": _CLASS_NAMES[cls],
                "split": split,
            }
        )
    table = pd.DataFrame.from_records(records)
    with atomic_output(out_dir / "list.csv") as tmp:  # the rule's output appears complete or not at all
        table.to_csv(tmp, index=False)
    log.info("demo: %d clips (%d classes) in %s", len(table), settings.classes, media)
    return table
