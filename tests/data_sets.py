"""Tiny copies of the archived data sets (ESC-50, Speech Commands v0.01) in their real layouts,
and a user list of local files, for running the presets' workflow without a download."""

from __future__ import annotations

import math
import struct
import tarfile
import wave
import zipfile
from pathlib import Path

RATE = 16000


def write_tone(path: Path, frequency: float, seconds: float = 0.5) -> Path:
    """A mono 16-bit WAV of a sine tone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = int(RATE * seconds)
    samples = (int(12000 * math.sin(2 * math.pi * frequency * i / RATE)) for i in range(n))
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(b"".join(struct.pack("<h", s) for s in samples))
    return path


def esc50_folder(root: Path, folds: int = 5, classes: tuple[str, ...] = ("dog", "rain")) -> Path:
    """ESC-50-master/meta/esc50.csv and ESC-50-master/audio/*.wav under ``root``: one clip per
    fold and class. Returns ``root``."""
    base = root / "ESC-50-master"
    rows = ["filename,fold,target,category,esc10,src_file,take"]
    for fold in range(1, folds + 1):
        for target, category in enumerate(classes):
            name = f"{fold}-{100 + target}-A-{target}.wav"
            write_tone(base / "audio" / name, 300 + 200 * target + 10 * fold)
            rows.append(f"{name},{fold},{target},{category},False,{100 + target},A")
    (base / "meta").mkdir(parents=True, exist_ok=True)
    (base / "meta" / "esc50.csv").write_text("\n".join(rows) + "\n")
    return root


def speech_commands_folder(root: Path, words: tuple[str, ...] = ("yes", "no"), per_word: int = 3) -> Path:
    """<word>/*.wav, validation_list.txt and testing_list.txt (v0.01 layout) under ``root``."""
    validation, testing = [], []
    for w, word in enumerate(words):
        for i in range(per_word):
            name = f"{word}/{i:08x}_nohash_0.wav"
            write_tone(root / name, 400 + 150 * w + 20 * i, seconds=0.3)
            (validation if i == 1 else testing if i == 2 else []).append(name)
    (root / "validation_list.txt").write_text("\n".join(validation) + "\n")
    (root / "testing_list.txt").write_text("\n".join(testing) + "\n")
    (root / "_background_noise_").mkdir(exist_ok=True)
    return root


def zip_folder(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as z:
        for path in sorted(folder.rglob("*")):
            z.write(path, path.relative_to(folder))
    return out


def tar_folder(folder: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz" if out.suffix == ".gz" else "w") as t:
        for path in sorted(folder.iterdir()):
            t.add(path, path.name)
    return out


def user_list(folder: Path, per_split: dict[str, int] | None = None) -> Path:
    """A user list (clip_id,source,start,end,labels,split) of local WAVs in ``folder``/list.csv."""
    per_split = per_split or {"train": 4, "test": 2}
    rows = ["clip_id,source,start,end,labels,split"]
    for split, n in per_split.items():
        for i in range(n):
            label = ("low", "high")[i % 2]
            wav = write_tone(folder / "audio" / f"{split}{i}.wav", 300 if label == "low" else 900, seconds=0.6)
            rows.append(f"{split}{i},{wav},0,0.5,{label},{split}")
    path = folder / "list.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime, to see that nothing was changed."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*"))}
