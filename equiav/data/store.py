"""HDF5 feature shards: the writer, the index, the training-time reader and norm statistics.

One shard holds the features of up to a few thousand clips; the layout (every dataset, dtype,
shape and attribute) is documented in ``docs/features.md``. ``FORMAT_VERSION`` changes with
any incompatible change of that layout.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np
import pandas as pd
import torch
import torchvision.io
from torch.utils.data import Dataset

from equiav.settings.features import FeatureSettings

__all__ = ["FORMAT_VERSION", "FeatureDataset", "ShardWriter", "compute_norm_stats", "read_index"]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Root attributes that every shard of one dataset must agree on to be read together.
_SHAPE_ATTRS = ("sample_rate", "num_mel_bins", "target_frames", "num_frames", "frame_size")
_STR = h5py.string_dtype("utf-8")
_BYTES = h5py.vlen_dtype(np.uint8)
# The small per-clip datasets: what read_index returns besides path and row.
_INDEX_COLUMNS = ("clip_id", "split", "labels", "fbank_frames", "source_sample_rate", "fps", "duration")
# Clips per read when streaming fbanks for statistics (x 512 KiB at 1024 x 128 float16).
_STATS_BLOCK = 64

PathsLike = str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


def _as_paths(paths: PathsLike) -> list[Path]:
    if isinstance(paths, (str, os.PathLike)):
        return [Path(paths)]
    return [Path(p) for p in paths]


class ShardWriter:
    """Write one HDF5 shard clip by clip; the file appears at ``path`` only when complete.

    Use as a context manager: data goes to a hidden temporary file in the same directory,
    renamed onto ``path`` on a clean exit and deleted when the block raises. fbank and frames
    are written to disk as they arrive (one chunk per clip); only the small per-clip fields
    are kept in memory until the end.
    """

    def __init__(self, path: str | os.PathLike[str], settings: FeatureSettings) -> None:
        self.path = Path(path)
        self.settings = settings
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._file: h5py.File | None = None
        self._meta: dict[str, list[Any]] = {name: [] for name in _INDEX_COLUMNS}
        self._seen: set[str] = set()

    def __len__(self) -> int:
        return len(self._meta["clip_id"])

    def __enter__(self) -> ShardWriter:
        s = self.settings
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed temporary name: a killed job's leftover is overwritten by the next attempt
        # instead of piling up.
        self._tmp.unlink(missing_ok=True)
        f = h5py.File(self._tmp, "w")
        self._file = f
        f.attrs["format_version"] = FORMAT_VERSION
        f.attrs["created_by"] = "equiav"
        for name in (*_SHAPE_ATTRS, "jpeg_quality"):
            f.attrs[name] = int(getattr(s, name))
        # One clip per chunk, uncompressed: a training read touches exactly one chunk and
        # costs no decompression.
        f.create_dataset(
            "fbank",
            shape=(0, s.target_frames, s.num_mel_bins),
            maxshape=(None, s.target_frames, s.num_mel_bins),
            dtype=np.float16,
            chunks=(1, s.target_frames, s.num_mel_bins),
        )
        if s.num_frames > 0:
            f.create_dataset(
                "frames",
                shape=(0, s.num_frames),
                maxshape=(None, s.num_frames),
                dtype=_BYTES,
                chunks=(16, s.num_frames),
            )
        return self

    def add(
        self,
        clip_id: str,
        split: str,
        labels: str,
        fbank: np.ndarray | torch.Tensor,
        fbank_frames: int,
        frames: Sequence[bytes],
        source_sample_rate: int | None,
        fps: float | None,
        duration: float,
    ) -> None:
        """Append one clip. fbank: [target_frames, num_mel_bins] (stored as float16);
        fbank_frames: its real rows before padding; frames: num_frames JPEG images;
        source_sample_rate in Hz (None -> 0), fps (None -> NaN), duration in seconds."""
        f = self._file
        if f is None:
            raise RuntimeError("ShardWriter.add() called outside its `with` block")
        s = self.settings
        if clip_id in self._seen:
            raise ValueError(f"clip {clip_id!r} is already in shard {self.path}; clip ids must be unique")
        array = fbank.detach().cpu().numpy() if isinstance(fbank, torch.Tensor) else np.asarray(fbank)
        if array.shape != (s.target_frames, s.num_mel_bins):
            raise ValueError(
                f"fbank of clip {clip_id!r} has shape {array.shape}, "
                f"expected ({s.target_frames}, {s.num_mel_bins}) from the shard's settings"
            )
        if len(frames) != s.num_frames:
            raise ValueError(f"clip {clip_id!r} has {len(frames)} frames, the shard stores {s.num_frames} per clip")
        if not 0 <= fbank_frames <= s.target_frames:
            raise ValueError(f"fbank_frames={fbank_frames} of clip {clip_id!r} is outside [0, {s.target_frames}]")

        row = len(self)
        fb = f["fbank"]
        fb.resize(row + 1, axis=0)
        fb[row] = array.astype(np.float16, copy=False)
        if s.num_frames > 0:
            fr = f["frames"]
            fr.resize(row + 1, axis=0)
            for k, jpeg in enumerate(frames):  # one by one: h5py would treat equal-length images as 2-D
                fr[row, k] = np.frombuffer(jpeg, dtype=np.uint8)

        self._seen.add(clip_id)
        meta = self._meta
        meta["clip_id"].append(clip_id)
        meta["split"].append(split)
        meta["labels"].append(labels)
        meta["fbank_frames"].append(int(fbank_frames))
        meta["source_sample_rate"].append(int(source_sample_rate or 0))
        meta["fps"].append(np.nan if fps is None else float(fps))
        meta["duration"].append(float(duration))

    def _finish(self, f: h5py.File) -> None:
        meta = self._meta
        for name in ("clip_id", "split", "labels"):
            f.create_dataset(name, data=np.array(meta[name], dtype=object), dtype=_STR, shape=(len(self),))
        f.create_dataset("fbank_frames", data=np.array(meta["fbank_frames"], dtype=np.int32))
        f.create_dataset("source_sample_rate", data=np.array(meta["source_sample_rate"], dtype=np.int32))
        f.create_dataset("fps", data=np.array(meta["fps"], dtype=np.float32))
        f.create_dataset("duration", data=np.array(meta["duration"], dtype=np.float32))

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            if exc_type is None:
                self._finish(f)
            f.close()
            if exc_type is None:
                os.replace(self._tmp, self.path)
                log.info("wrote %s (%d clips)", self.path, len(self))
        finally:
            if f.id.valid:
                f.close()
            self._tmp.unlink(missing_ok=True)


def _check_format(f: h5py.File, path: Path) -> None:
    version = f.attrs.get("format_version")
    if version != FORMAT_VERSION or f.attrs.get("created_by") != "equiav":
        raise ValueError(
            f"{path} is not an equiav feature shard of format {FORMAT_VERSION} "
            f"(format_version={version!r}); re-run the features stage to rebuild it"
        )


def _shape_attrs(f: h5py.File) -> dict[str, int]:
    return {name: int(f.attrs[name]) for name in _SHAPE_ATTRS}


def read_index(paths: PathsLike) -> pd.DataFrame:
    """One row per clip across shards (no fbank or frames loaded).

    Columns: path (str), row (int, within its shard), clip_id, split, labels, fbank_frames,
    source_sample_rate, fps, duration."""
    tables = []
    for path in _as_paths(paths):
        with h5py.File(path, "r") as f:
            _check_format(f, path)
            columns: dict[str, Any] = {}
            for name in _INDEX_COLUMNS:
                data = f[name]
                columns[name] = data.asstr()[()] if h5py.check_string_dtype(data.dtype) else data[()]
            n = len(columns["clip_id"])
            tables.append(pd.DataFrame({"path": [str(path)] * n, "row": np.arange(n), **columns}))
    if not tables:
        return pd.DataFrame({name: [] for name in ("path", "row", *_INDEX_COLUMNS)})
    return pd.concat(tables, ignore_index=True)


class FeatureDataset(Dataset):
    """Training-time reader over HDF5 shards.

    Items are dicts: ``fbank`` float32 [target_frames, num_mel_bins], normalised (x - mean) / std;
    ``frames`` uint8 [3, H, W] (frame ``num_frames // 2`` for frame="middle", a uniformly drawn
    one for "random") or [num_frames, 3, H, W] for "all", absent for audio-only shards;
    ``label`` float32 multi-hot [len(classes)]; ``clip_id`` str; ``index`` int (position in
    this dataset). HDF5 files are opened lazily in each process that reads (DataLoader workers
    included): an h5py handle must never cross a fork.
    """

    FRAME_MODES = ("middle", "random", "all")

    def __init__(
        self,
        paths: PathsLike,
        classes: Sequence[str],
        *,
        mean: float,
        std: float,
        splits: Sequence[str] | None = None,
        frame: str = "middle",
        clip_ids: Sequence[str] | None = None,
    ) -> None:
        if frame not in self.FRAME_MODES:
            raise ValueError(f"frame={frame!r}; choose one of {', '.join(self.FRAME_MODES)}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std!r}")
        self.paths = _as_paths(paths)
        if not self.paths:
            raise ValueError("FeatureDataset needs at least one shard path")
        self.classes = list(classes)
        self.mean = float(mean)
        self.std = float(std)
        self.frame = frame
        self.shard_attrs = self._check_shards()

        index = read_index(self.paths)
        if splits is not None:
            index = index[index["split"].isin(list(splits))]
        if clip_ids is not None:
            wanted = list(clip_ids)
            missing = sorted(set(wanted) - set(index["clip_id"]))
            if missing:
                raise KeyError(f"{len(missing)} requested clip ids are not in these shards/splits, e.g. {missing[:5]}")
            index = index[index["clip_id"].isin(wanted)]
        self.index = index.reset_index(drop=True)

        # Resolve labels now so that an unknown class id fails at construction, not mid-epoch.
        positions = {name: k for k, name in enumerate(self.classes)}
        self._labels: list[list[int]] = []
        for clip_id, labels in zip(self.index["clip_id"], self.index["labels"], strict=True):
            try:
                self._labels.append([positions[name] for name in str(labels).split(";") if name])
            except KeyError as err:
                raise KeyError(
                    f"clip {clip_id!r} has label {err.args[0]!r}, which is not among the {len(self.classes)} "
                    "classes given; pass the dataset's full class list"
                ) from None
        # Plain arrays for the per-item lookups: cheap to index and to pickle into workers.
        shard_number = {str(path): k for k, path in enumerate(self.paths)}
        self._shard_of = np.array([shard_number[p] for p in self.index["path"]], dtype=np.int32)
        self._rows = self.index["row"].to_numpy(dtype=np.int64)
        self._clip_ids = self.index["clip_id"].tolist()
        self._pid: int | None = None
        self._files: dict[int, h5py.File] = {}

    def _check_shards(self) -> dict[str, int]:
        reference: dict[str, int] | None = None
        for path in self.paths:
            with h5py.File(path, "r") as f:
                _check_format(f, path)
                attrs = _shape_attrs(f)
            if reference is None:
                reference = attrs
            elif attrs != reference:
                raise ValueError(
                    f"shard {path} has settings {attrs}, unlike {self.paths[0]} ({reference}); "
                    "shards read together must come from the same feature settings"
                )
        assert reference is not None
        return reference

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = {}, None  # handles stay in the process that opened them
        return state

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():
            # A new process (fork of a DataLoader worker): the inherited handles belong to the
            # parent, so forget them without closing and open our own.
            self._files, self._pid = {}, os.getpid()
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = h5py.File(self.paths[shard], "r")
        return f

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} clips")
        f = self._file(int(self._shard_of[index]))
        row = int(self._rows[index])
        fbank = torch.from_numpy(f["fbank"][row].astype(np.float32))
        label = torch.zeros(len(self.classes), dtype=torch.float32)
        label[self._labels[index]] = 1.0
        item: dict[str, Any] = {
            "fbank": (fbank - self.mean) / self.std,
            "label": label,
            "clip_id": self._clip_ids[index],
            "index": index,
        }
        if "frames" in f:
            frames = f["frames"]
            if self.frame == "all":
                item["frames"] = torch.stack([_decode(jpeg) for jpeg in frames[row]])
            else:
                count = frames.shape[1]
                k = count // 2 if self.frame == "middle" else int(torch.randint(count, ()).item())
                item["frames"] = _decode(frames[row, k])
        return item


def _decode(jpeg: np.ndarray) -> torch.Tensor:
    """JPEG bytes (uint8 [n]) -> uint8 RGB [3, H, W]."""
    return torchvision.io.decode_jpeg(torch.from_numpy(jpeg), mode=torchvision.io.ImageReadMode.RGB)


def compute_norm_stats(paths: PathsLike, splits: Sequence[str]) -> dict[str, float | int]:
    """Mean and (population) std of the stored fbank values over the real frames (padding
    excluded) of the clips in ``splits``, streamed shard by shard in float64.

    Returns {"mean", "std", "clips", "frames"} (frames: real time frames counted)."""
    wanted = set(splits)
    count = 0  # values
    mean = 0.0
    m2 = 0.0  # sum of squared deviations from the mean
    clips = frames_total = 0
    found: set[str] = set()
    for path in _as_paths(paths):
        with h5py.File(path, "r") as f:
            _check_format(f, path)
            split = f["split"].asstr()[()]
            real = f["fbank_frames"][()]
            found.update(split)
            rows = np.flatnonzero(np.isin(split, list(wanted)))
            fbank = f["fbank"]
            for start in range(0, len(rows), _STATS_BLOCK):
                block = rows[start : start + _STATS_BLOCK]
                clips += len(block)
                # One contiguous read covering the block, then keep its rows in the split.
                slab = fbank[block[0] : block[-1] + 1][block - block[0]].astype(np.float64)
                mask = np.arange(slab.shape[1])[None, :] < real[block][:, None]  # [b, T] real frames
                values = slab[mask]  # [real frames in block, mel]
                n = values.size
                if n == 0:
                    continue
                block_mean = float(values.mean())
                block_m2 = float(((values - block_mean) ** 2).sum())
                # Chan et al.'s pairwise update: stable where sum-of-squares would cancel.
                delta = block_mean - mean
                total = count + n
                mean += delta * n / total
                m2 += block_m2 + delta * delta * count * n / total
                count = total
                frames_total += int(mask.sum())
    if clips == 0:
        raise ValueError(
            f"no clip in splits {sorted(wanted)} among the shards; splits found: {sorted(found) or 'none'}"
        )
    if count == 0:
        raise ValueError(f"the {clips} clips in splits {sorted(wanted)} have no real fbank frames")
    return {"mean": mean, "std": float(np.sqrt(m2 / count)), "clips": clips, "frames": frames_total}
