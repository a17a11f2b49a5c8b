"""HDF5 shards: writer, index, reader (also under DataLoader workers) and norm statistics."""

from __future__ import annotations

import pickle
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torchvision.io
from torch.utils.data import DataLoader

from equiav.data.features import FeatureSettings
from equiav.data.store import FeatureDataset, ShardWriter, compute_norm_stats, read_index

SETTINGS = FeatureSettings(num_mel_bins=16, target_frames=40, num_frames=3, frame_size=32)
CLASSES = ["/m/dog", "/m/cat", "/m/car", "/m/rain"]


def jpeg_of(value: int, size: int = 32) -> bytes:
    """A flat grey JPEG of the given level (survives compression to +-2)."""
    image = torch.full((3, size, size), value, dtype=torch.uint8)
    return bytes(torchvision.io.encode_jpeg(image, quality=95).numpy())


def synthetic_clip(seed: int, settings: FeatureSettings = SETTINGS) -> dict:
    rng = np.random.default_rng(seed)
    real = int(rng.integers(5, settings.target_frames + 1))
    fbank = np.zeros((settings.target_frames, settings.num_mel_bins), dtype=np.float16)
    fbank[:real] = rng.normal(-5.0, 3.0, size=(real, settings.num_mel_bins))
    frames = [jpeg_of(int(v)) for v in rng.integers(20, 235, size=settings.num_frames)]
    return {"fbank": fbank, "fbank_frames": real, "frames": frames}


def write_shard(path: Path, rows: list[tuple[str, str, str]], seed: int, settings: FeatureSettings = SETTINGS):
    """rows: (clip_id, split, labels). Returns {clip_id: synthetic clip}."""
    written = {}
    with ShardWriter(path, settings) as writer:
        for k, (clip_id, split, labels) in enumerate(rows):
            clip = synthetic_clip(seed * 1000 + k, settings)
            if settings.num_frames == 0:
                clip["frames"] = []
            writer.add(
                clip_id,
                split,
                labels,
                clip["fbank"],
                clip["fbank_frames"],
                clip["frames"],
                source_sample_rate=44100,
                fps=25.0 if settings.num_frames else None,
                duration=clip["fbank_frames"] / 100,
            )
            written[clip_id] = {**clip, "split": split, "labels": labels}
    return written


@pytest.fixture
def two_shards(tmp_path):
    a = write_shard(
        tmp_path / "a.h5",
        [("c0", "train", "/m/dog"), ("c1", "train", "/m/cat;/m/car"), ("c2", "eval", "/m/rain")],
        seed=1,
    )
    b = write_shard(tmp_path / "b.h5", [("c3", "train", ""), ("c4", "eval", "/m/dog;/m/rain")], seed=2)
    return [tmp_path / "a.h5", tmp_path / "b.h5"], {**a, **b}


def test_shard_layout(two_shards):
    paths, written = two_shards
    with h5py.File(paths[0], "r") as f:
        assert dict(f.attrs) == {
            "format_version": 1,
            "created_by": "equiav",
            "sample_rate": 16000,
            "num_mel_bins": 16,
            "target_frames": 40,
            "num_frames": 3,
            "frame_size": 32,
            "jpeg_quality": 90,
        }
        assert f["fbank"].shape == (3, 40, 16) and f["fbank"].dtype == np.float16
        assert f["fbank"].chunks == (1, 40, 16) and f["fbank"].compression is None
        assert f["frames"].shape == (3, 3)
        assert f["fbank_frames"].dtype == np.int32 and f["source_sample_rate"].dtype == np.int32
        assert f["fps"].dtype == np.float32 and f["duration"].dtype == np.float32
        assert list(f["clip_id"].asstr()[()]) == ["c0", "c1", "c2"]
        assert bytes(f["frames"][1, 2]) == written["c1"]["frames"][2]
    assert sorted(p.name for p in paths[0].parent.iterdir()) == ["a.h5", "b.h5"]  # no temporaries left


def test_read_index(two_shards):
    paths, written = two_shards
    index = read_index(paths)
    assert list(index.columns) == [
        "path", "row", "clip_id", "split", "labels", "fbank_frames", "source_sample_rate", "fps", "duration",
    ]  # fmt: skip
    assert list(index["clip_id"]) == ["c0", "c1", "c2", "c3", "c4"]
    assert list(index["row"]) == [0, 1, 2, 0, 1]
    assert list(index["path"]) == [str(paths[0])] * 3 + [str(paths[1])] * 2
    assert list(index["labels"]) == [written[c]["labels"] for c in index["clip_id"]]
    assert list(index["fbank_frames"]) == [written[c]["fbank_frames"] for c in index["clip_id"]]
    assert (index["fps"] == 25.0).all() and (index["source_sample_rate"] == 44100).all()


def test_dataset_returns_what_was_written(two_shards):
    paths, written = two_shards
    mean, std = -4.5, 2.5
    data = FeatureDataset(paths, CLASSES, mean=mean, std=std)
    assert len(data) == 5
    for i in range(len(data)):
        item = data[i]
        clip = written[item["clip_id"]]
        assert item["index"] == i
        expected = (torch.from_numpy(clip["fbank"].astype(np.float32)) - mean) / std
        assert item["fbank"].dtype == torch.float32
        torch.testing.assert_close(item["fbank"], expected)
        hot = [CLASSES.index(name) for name in clip["labels"].split(";") if name]
        assert item["label"].tolist() == [1.0 if k in hot else 0.0 for k in range(len(CLASSES))]
        middle = torchvision.io.decode_jpeg(torch.frombuffer(bytearray(clip["frames"][1]), dtype=torch.uint8))
        assert item["frames"].dtype == torch.uint8 and item["frames"].shape == (3, 32, 32)
        assert torch.equal(item["frames"], middle)


def test_frame_modes_and_filters(two_shards):
    paths, written = two_shards
    every = FeatureDataset(paths, CLASSES, mean=0.0, std=1.0, frame="all", splits=["eval"])
    assert [every[i]["clip_id"] for i in range(len(every))] == ["c2", "c4"]
    assert every[0]["frames"].shape == (3, 3, 32, 32)
    levels = [int(every[0]["frames"][k].float().mean().round()) for k in range(3)]

    random = FeatureDataset(paths, CLASSES, mean=0.0, std=1.0, frame="random", clip_ids=["c2"])
    seen = {int(random[0]["frames"].float().mean().round()) for _ in range(40)}
    assert seen == set(levels)  # 40 draws from 3 frames: all of them (fails with p < 1e-6)

    with pytest.raises(KeyError, match="nope"):
        FeatureDataset(paths, CLASSES, mean=0.0, std=1.0, clip_ids=["c2", "nope"])
    with pytest.raises(ValueError, match="frame='last'"):
        FeatureDataset(paths, CLASSES, mean=0.0, std=1.0, frame="last")


def test_unknown_label_is_named(two_shards):
    paths, _ = two_shards
    with pytest.raises(KeyError, match="/m/car"):
        FeatureDataset(paths, ["/m/dog", "/m/cat", "/m/rain"], mean=0.0, std=1.0)


def test_handles_open_lazily_and_stay_in_their_process(two_shards):
    paths, _ = two_shards
    data = FeatureDataset(paths, CLASSES, mean=0.0, std=1.0)
    assert data._files == {}  # nothing open until the first item
    data[0]
    assert len(data._files) == 1
    copy = pickle.loads(pickle.dumps(data))
    assert copy._files == {} and copy[4]["clip_id"] == "c4"


def test_dataloader_workers_see_every_clip_once(two_shards):
    paths, written = two_shards
    data = FeatureDataset(paths, CLASSES, mean=-1.0, std=2.0)
    data[0]  # a handle opened in the parent must not leak into the forked workers
    loader = DataLoader(data, batch_size=2, num_workers=2, shuffle=True, multiprocessing_context="fork")
    seen = []
    for batch in loader:
        for clip_id, fbank in zip(batch["clip_id"], batch["fbank"], strict=True):
            expected = (torch.from_numpy(written[clip_id]["fbank"].astype(np.float32)) + 1.0) / 2.0
            torch.testing.assert_close(fbank, expected)
            seen.append(clip_id)
    assert sorted(seen) == ["c0", "c1", "c2", "c3", "c4"]


def test_norm_stats_cover_real_frames_of_the_chosen_splits(two_shards):
    paths, written = two_shards
    stats = compute_norm_stats(paths, ["train"])
    train = [c for c in written.values() if c["split"] == "train"]
    values = np.concatenate([c["fbank"][: c["fbank_frames"]].astype(np.float64).ravel() for c in train])
    assert stats["clips"] == 3
    assert stats["frames"] == sum(c["fbank_frames"] for c in train)
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-12)
    with pytest.raises(ValueError, match=r"\['eval', 'train'\]"):
        compute_norm_stats(paths, ["test"])


def test_norm_stats_stream_in_blocks(tmp_path):
    rows = [(f"c{k}", "train" if k % 3 else "val", "") for k in range(150)]  # > one 64-clip block
    written = write_shard(tmp_path / "big.h5", rows, seed=7)
    stats = compute_norm_stats(tmp_path / "big.h5", ["train"])
    train = [c for c in written.values() if c["split"] == "train"]
    values = np.concatenate([c["fbank"][: c["fbank_frames"]].astype(np.float64).ravel() for c in train])
    assert stats["clips"] == 100
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(values.std(), rel=1e-12)


def test_audio_only_shard_has_no_frames(tmp_path):
    settings = FeatureSettings(num_mel_bins=16, target_frames=40, num_frames=0)
    write_shard(tmp_path / "esc.h5", [("x", "fold1", "/m/dog")], seed=3, settings=settings)
    with h5py.File(tmp_path / "esc.h5", "r") as f:
        assert "frames" not in f
        assert np.isnan(f["fps"][0])
    item = FeatureDataset(tmp_path / "esc.h5", CLASSES, mean=0.0, std=1.0)[0]
    assert "frames" not in item and item["fbank"].shape == (40, 16)


def test_empty_shard_is_valid(tmp_path):
    with ShardWriter(tmp_path / "empty.h5", SETTINGS):
        pass
    assert len(read_index(tmp_path / "empty.h5")) == 0
    with h5py.File(tmp_path / "empty.h5", "r") as f:
        assert f["fbank"].shape == (0, 40, 16)


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "shard.h5"
    with pytest.raises(RuntimeError, match="killed"), ShardWriter(target, SETTINGS) as writer:
        clip = synthetic_clip(0)
        writer.add("a", "train", "", clip["fbank"], clip["fbank_frames"], clip["frames"], 16000, 25.0, 1.0)
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_rows(tmp_path):
    clip = synthetic_clip(0)
    with ShardWriter(tmp_path / "s.h5", SETTINGS) as writer:
        writer.add("a", "train", "", clip["fbank"], clip["fbank_frames"], clip["frames"], 16000, 25.0, 1.0)
        with pytest.raises(ValueError, match="'a' is already"):
            writer.add("a", "train", "", clip["fbank"], clip["fbank_frames"], clip["frames"], 16000, 25.0, 1.0)
        with pytest.raises(ValueError, match=r"\(39, 16\)"):
            writer.add("b", "train", "", clip["fbank"][:39], 10, clip["frames"], 16000, 25.0, 1.0)
        with pytest.raises(ValueError, match="2 frames"):
            writer.add("c", "train", "", clip["fbank"], 10, clip["frames"][:2], 16000, 25.0, 1.0)
    assert len(read_index(tmp_path / "s.h5")) == 1


def test_shards_with_different_settings_are_refused(tmp_path):
    write_shard(tmp_path / "a.h5", [("a", "train", "")], seed=1)
    other = FeatureSettings(num_mel_bins=16, target_frames=50, num_frames=3, frame_size=32)
    write_shard(tmp_path / "b.h5", [("b", "train", "")], seed=1, settings=other)
    with pytest.raises(ValueError, match="b.h5"):
        FeatureDataset([tmp_path / "a.h5", tmp_path / "b.h5"], CLASSES, mean=0.0, std=1.0)
