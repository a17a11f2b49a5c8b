"""Tiny copies of the archived data sets (ESC-50, Speech Commands v0.01) in their real layouts,
a user list of local files, and mirrors (tar.gz shards, damaged ones, a hub cache), for running
the presets' workflow without a download."""

from __future__ import annotations

import math
import shutil
import struct
import tarfile
import wave
import zipfile
import zlib
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


def tar_gz(out: Path, members: dict[str, Path]) -> Path:
    """A tar.gz holding each file under its member name, in the order given."""
    with tarfile.open(out, "w:gz") as tar:
        for member, file in members.items():
            tar.add(file, arcname=member)
    return out


def cut_tar_gz_inside(path: Path, member: str, into: int = 2000) -> Path:
    """Truncate a tar.gz where its compressed stream reaches ``into`` bytes into ``member``'s
    data, as a download of a mirror shard that stopped there would leave it."""
    with tarfile.open(path) as tar:
        target = tar.getmember(member).offset_data + into
    data = path.read_bytes()
    inflate, produced = zlib.decompressobj(16 + zlib.MAX_WBITS), 0
    for keep in range(256, len(data), 256):
        produced += len(inflate.decompress(data[keep - 256 : keep]))
        if produced >= target:
            path.write_bytes(data[:keep])
            return path
    raise AssertionError(f"{member} is shorter than {into} bytes")


def hub_cache(hf_home: Path, repo_id: str, files: dict[str, Path]) -> Path:
    """A Hugging Face hub cache under ``hf_home`` holding a dataset repository's files at `main`,
    laid out as huggingface_hub leaves it (refs/main -> snapshots/<commit>/), for offline use."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hf_home / "hub" / f"datasets--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for name, file in files.items():
        shutil.copy(file, snapshot / name)
    return snapshot
