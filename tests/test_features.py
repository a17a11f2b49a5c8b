"""The fbank definition and extract_shard on a mix of good and bad media."""

from __future__ import annotations

import math
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
import torchaudio
from conftest import garbage_bytes

from equiav.data import features
from equiav.data.features import FeatureSettings, extract_shard, fbank
from equiav.data.media import decode_clip
from equiav.data.status import DECODE_ERROR, FINAL, NO_AUDIO, NO_VIDEO, OK, SILENT, TOO_SHORT
from equiav.data.store import FeatureDataset, ShardWriter, read_index

SETTINGS = FeatureSettings()


def kaldi_reference(wave: np.ndarray) -> torch.Tensor:
    """method.md section 1, written out independently of the package."""
    w = torch.tensor(wave, dtype=torch.float32)
    return torchaudio.compliance.kaldi.fbank(
        (w - w.mean()).unsqueeze(0),
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


@pytest.mark.parametrize(("seconds", "frames"), [(3.0, 298), (12.0, 1198)])
def test_fbank_matches_kaldi_then_pads_or_trims(seconds, frames):
    rng = np.random.default_rng(0)
    t = np.arange(int(seconds * 16000)) / 16000
    wave = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.2).astype(np.float32)
    reference = kaldi_reference(wave)
    assert reference.shape == (frames, 128)

    out, real = fbank(wave, SETTINGS)
    assert out.shape == (1024, 128) and out.dtype == torch.float16
    assert real == min(frames, 1024)
    torch.testing.assert_close(out[:real], reference[:real].to(torch.float16), rtol=0, atol=0)
    assert not out[real:].any()  # padding is zeros, at the end
    same, _ = fbank(torch.from_numpy(wave), SETTINGS)  # tensors and arrays alike
    assert torch.equal(same, out)


def test_fbank_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="399 samples"):
        fbank(np.zeros(399, dtype=np.float32), SETTINGS)
    with pytest.raises(ValueError, match=r"\(2, 16000\)"):
        fbank(np.zeros((2, 16000), dtype=np.float32), SETTINGS)


def downloads_table(rows: list[dict]) -> pd.DataFrame:
    base = {"split": "train", "labels": "/m/a", "status": OK, "offset": 0.0, "duration": float("nan")}
    return pd.DataFrame([{**base, **row} for row in rows])


@pytest.fixture
def mixed_downloads(clip_factory, tmp_path):
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(garbage_bytes(3000))
    return downloads_table(
        [
            {"clip_id": "good1", "file": clip_factory("good1.mp4", 2.0), "offset": 0.5, "duration": 1.0},
            {"clip_id": "good2", "file": clip_factory("good2.mp4", 1.5, channels=2), "labels": "/m/a;/m/b"},
            {"clip_id": "corrupt", "file": corrupt},
            {"clip_id": "mute", "file": clip_factory("mute.mp4", 1.0, with_audio=False)},
            {"clip_id": "blind", "file": clip_factory("blind.wav", 1.0, with_video=False)},
            {"clip_id": "late", "file": clip_factory("late.mp4", 1.0), "offset": 5.0, "duration": 1.0},
            {"clip_id": "gone", "file": tmp_path / "never.mp4", "status": "unavailable"},
        ]
    )


def test_extract_shard_keeps_good_clips_and_records_the_rest(mixed_downloads, tmp_path):
    out = tmp_path / "shard" / "features.h5"
    result = extract_shard(mixed_downloads, out, SETTINGS)

    assert list(result.columns) == ["clip_id", "status", "detail"]
    statuses = dict(zip(result["clip_id"], result["status"], strict=True))
    assert statuses == {
        "good1": OK,
        "good2": OK,
        "corrupt": DECODE_ERROR,
        "mute": NO_AUDIO,
        "blind": NO_VIDEO,
        "late": TOO_SHORT,
    }  # "gone" was not downloaded: not processed
    details = dict(zip(result["clip_id"], result["detail"], strict=True))
    assert details["good1"] == "" and all(details[c] for c in statuses if statuses[c] != OK)

    index = read_index(out)
    assert list(index["clip_id"]) == ["good1", "good2"]
    assert list(index["labels"]) == ["/m/a", "/m/a;/m/b"]
    assert index["source_sample_rate"].tolist() == [44100, 44100]
    assert index["duration"].tolist() == pytest.approx([1.0, 1.5], abs=0.03)
    with h5py.File(out, "r") as f:
        assert f["fbank"].shape == (2, 1024, 128)
        assert f["frames"].shape == (2, 10)
        # Exactly what decode_clip + fbank give for the same clip: no stand-ins.
        decoded = decode_clip(mixed_downloads.loc[0, "file"], 0.5, 1.0)
        expected, real = fbank(decoded.waveform, SETTINGS)
        assert f["fbank_frames"][0] == real == 98
        assert np.array_equal(f["fbank"][0], expected.numpy())
        assert [bytes(b) for b in f["frames"][0]] == decoded.frames
        for row in range(2):
            assert np.abs(f["fbank"][row, : f["fbank_frames"][row]]).min(axis=1).all()  # no zero rows
    assert sorted(p.name for p in out.parent.iterdir()) == ["features.h5"]

    item = FeatureDataset(out, ["/m/a", "/m/b"], mean=-5.0, std=4.0)[1]
    assert item["label"].tolist() == [1.0, 1.0] and item["frames"].shape == (3, 224, 224)


def test_unexpected_errors_are_recorded_not_raised(mixed_downloads, tmp_path, monkeypatch):
    real_decode = features.decode_clip

    def flaky(path, *args, **kwargs):
        if str(path).endswith("good2.mp4"):
            raise RuntimeError("disk hiccup on good2")
        return real_decode(path, *args, **kwargs)

    monkeypatch.setattr(features, "decode_clip", flaky)
    result = extract_shard(mixed_downloads.iloc[:2], tmp_path / "s.h5", SETTINGS)
    assert result["status"].tolist() == [OK, DECODE_ERROR]
    assert result["detail"].iloc[1] == "RuntimeError: disk hiccup on good2"
    assert list(read_index(tmp_path / "s.h5")["clip_id"]) == ["good1"]


def test_silence_is_its_own_final_outcome(clip_factory, tmp_path):
    """All-zero audio would give a constant fbank at the log floor: it is left out as `silent`.
    Very quiet sound (noise at -70 dBFS, ten times the threshold) is still data."""
    downloads = downloads_table(
        [
            {"clip_id": "zeros", "file": clip_factory("zeros.mp4", 1.5, audio_expr="0")},
            {
                "clip_id": "quiet",
                "file": clip_factory("quiet.wav", 1.5, audio_expr="0.0003*sin(2*PI*440*t)", with_video=False),
            },
            {"clip_id": "loud", "file": clip_factory("loud.mp4", 1.5)},
        ]
    )
    result = extract_shard(downloads, tmp_path / "s.h5", FeatureSettings(target_frames=160, num_frames=0))
    statuses = dict(zip(result["clip_id"], result["status"], strict=True))
    assert statuses == {"zeros": SILENT, "quiet": OK, "loud": OK}
    assert SILENT in FINAL
    assert "silence" in result.set_index("clip_id").loc["zeros", "detail"]
    assert list(read_index(tmp_path / "s.h5")["clip_id"]) == ["quiet", "loud"]
    assert features.SILENCE_PEAK == pytest.approx(1e-4)  # docs/data.md states this threshold


def test_no_good_clip_still_gives_a_valid_empty_shard(mixed_downloads, tmp_path):
    out = tmp_path / "empty.h5"
    result = extract_shard(mixed_downloads.iloc[2:4], out, SETTINGS)
    assert result["status"].tolist() == [DECODE_ERROR, NO_AUDIO]
    assert len(read_index(out)) == 0
    with h5py.File(out, "r") as f:
        assert f["fbank"].shape == (0, 1024, 128)


def test_audio_only_settings_on_wav(clip_factory, tmp_path):
    settings = FeatureSettings(num_frames=0)
    table = downloads_table([{"clip_id": "esc", "file": clip_factory("esc.wav", 5.0, with_video=False)}])
    out = tmp_path / "esc.h5"
    assert extract_shard(table, out, settings)["status"].tolist() == [OK]
    with h5py.File(out, "r") as f:
        assert "frames" not in f and f.attrs["num_frames"] == 0
        assert f["fbank_frames"][0] == 498
        assert math.isnan(f["fps"][0])


def test_a_failing_write_leaves_no_shard(mixed_downloads, tmp_path, monkeypatch):
    def broken_add(self, *args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(ShardWriter, "add", broken_add)
    out = tmp_path / "s.h5"
    with pytest.raises(OSError, match="No space"):  # the job's own fault: it fails
        extract_shard(mixed_downloads.iloc[:1], out, SETTINGS)
    assert not out.exists() and not (tmp_path / ".s.h5.partial").exists()


def test_a_killed_job_leaves_no_shard(clip_factory, tmp_path):
    clip = clip_factory("c.mp4", 1.0)
    out = tmp_path / "killed.h5"
    table = downloads_table([{"clip_id": f"c{k}", "file": clip} for k in range(200)])
    table.to_csv(tmp_path / "downloads.csv", index=False)
    script = textwrap.dedent(
        f"""
        import time, pandas as pd
        from equiav.data import features
        real = features.decode_clip
        def slow(*args, **kwargs):
            time.sleep(0.05)
            return real(*args, **kwargs)
        features.decode_clip = slow
        features.extract_shard(pd.read_csv({str(tmp_path / "downloads.csv")!r}), {str(out)!r},
                               features.FeatureSettings())
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    partial = tmp_path / ".killed.h5.partial"
    deadline = time.monotonic() + 30
    while not partial.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert partial.exists(), "the job never started writing"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # The next attempt overwrites the leftover and completes.
    extract_shard(table.iloc[:2], out, SETTINGS)
    assert list(read_index(out)["clip_id"]) == ["c0", "c1"] and not partial.exists()


def test_concurrent_workers_give_the_same_shard(mixed_downloads, tmp_path):
    serial = extract_shard(mixed_downloads, tmp_path / "serial.h5", SETTINGS)
    parallel = extract_shard(mixed_downloads, tmp_path / "parallel.h5", SETTINGS, workers=3)
    pd.testing.assert_frame_equal(serial, parallel)
    with h5py.File(tmp_path / "serial.h5", "r") as a, h5py.File(tmp_path / "parallel.h5", "r") as b:
        assert list(a["clip_id"].asstr()[()]) == list(b["clip_id"].asstr()[()])
        assert np.array_equal(a["fbank"][()], b["fbank"][()])
