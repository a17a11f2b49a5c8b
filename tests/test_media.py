"""equiav.data.media against clips synthesised with ffmpeg (see conftest.py)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.io
from conftest import garbage_bytes

from equiav.data import media
from equiav.data.media import MediaError, check_media, decode_clip, ffmpeg_bin_dir, ffmpeg_exe, probe
from equiav.data.status import DECODE_ERROR, NO_AUDIO, NO_VIDEO

SR = 16000


def expected_frames(offset: float, span: float, fps: float, count: int = 10) -> list[int]:
    """Index of the source frame nearest to offset + k*span/count (frame n shown at n/fps)."""
    positions = [(offset + k * span / count) * fps for k in range(count)]
    # A position halfway between two frames has no single right answer; keep cases clear of it.
    assert all(abs(p - math.floor(p) - 0.5) > 0.05 for p in positions), positions
    return [math.floor(p + 0.5) for p in positions]


def decode_image(jpeg: bytes) -> torch.Tensor:
    return torchvision.io.decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))


def dominant_frequency(wave: np.ndarray, rate: int) -> float:
    """Peak of the zero-padded spectrum (0.1 Hz bins)."""
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave)), n=10 * rate))
    return float(np.argmax(spectrum) * rate / (10 * rate))


# --- locating ffmpeg -------------------------------------------------------------------


def test_ffmpeg_exe_prefers_environment(monkeypatch, tmp_path):
    real = media.ffmpeg_exe()
    monkeypatch.setenv("EQUIAV_FFMPEG", real)
    assert ffmpeg_exe() == real
    monkeypatch.setenv("EQUIAV_FFMPEG", str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="EQUIAV_FFMPEG"):
        ffmpeg_exe()


def test_ffmpeg_bin_dir_holds_a_runnable_ffmpeg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first = ffmpeg_bin_dir()
    link = first / "ffmpeg"
    assert first == tmp_path / "cache" / "equiav" / "bin"
    assert link.is_symlink() and os.access(link, os.X_OK)
    assert os.path.realpath(link) == os.path.realpath(ffmpeg_exe())
    assert ffmpeg_bin_dir() == first  # idempotent
    assert [p.name for p in first.iterdir()] == ["ffmpeg"]  # no temporary names left behind


# --- probe and check_media ---------------------------------------------------------------


def test_probe_reports_streams(clip_factory):
    info = probe(clip_factory("a.mp4", 2.0, fps=25, size=(96, 64), audio_rate=44100, channels=2))
    assert info.duration == pytest.approx(2.0, abs=0.05)
    assert (info.has_audio, info.has_video) == (True, True)
    assert info.sample_rate == 44100
    assert info.fps == 25.0
    assert (info.width, info.height) == (96, 64)

    ntsc = probe(clip_factory("ntsc.mp4", 1.0, fps="30000/1001", with_audio=False))
    assert ntsc.fps == pytest.approx(29.97)
    assert not ntsc.has_audio and ntsc.sample_rate is None

    wav = probe(clip_factory("a.wav", 1.5, audio_rate=22050, with_video=False))
    assert wav == media.MediaInfo(1.5, True, False, 22050, None, None, None)


def test_probe_rejects_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(MediaError) as err:
        probe(garbage)
    assert err.value.status == DECODE_ERROR
    assert "moov atom not found" in err.value.detail or "Invalid data" in err.value.detail
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        probe(tmp_path / "missing.mp4")


def test_check_media_accepts_a_complete_file(clip_factory):
    info, present = check_media(clip_factory("ok.mp4", 2.0))
    assert info.has_audio and info.has_video
    assert present["audio"] == pytest.approx(2.0, abs=0.1)
    assert present["video"] == pytest.approx(2.0, abs=0.1)


def test_check_media_measures_each_stream(clip_factory):
    """Coverage is per stream: a long video does not hide a short audio track, nor the reverse."""
    _, present = check_media(clip_factory("short_audio.mp4", 1.5, video_seconds=4.0))
    assert present["audio"] == pytest.approx(1.5, abs=0.1) and present["video"] == pytest.approx(4.0, abs=0.1)
    _, present = check_media(clip_factory("short_video.mp4", 4.0, video_seconds=1.5))
    assert present["audio"] == pytest.approx(4.0, abs=0.1) and present["video"] == pytest.approx(1.5, abs=0.1)
    _, present = check_media(clip_factory("audio.wav", 2.0, with_video=False))
    assert present == {"audio": pytest.approx(2.0, abs=0.01), "video": 0.0}


def test_check_media_reads_a_window(clip_factory):
    """With a start and a duration only that part is read, timed from the start."""
    _, present = check_media(clip_factory("long.mp4", 6.0), 2.0, 3.0)
    assert present["audio"] == pytest.approx(3.0, abs=0.1) and present["video"] == pytest.approx(3.0, abs=0.1)
    _, present = check_media(clip_factory("tail.mp4", 4.0), 2.5, 3.0)  # the window runs past the end
    assert present["audio"] == pytest.approx(1.5, abs=0.1)


@pytest.mark.parametrize("faststart", [True, False])
def test_check_media_rejects_a_truncated_file(clip_factory, tmp_path, faststart):
    whole = clip_factory("whole.mp4", 3.0, size=(128, 96), faststart=faststart).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(MediaError) as err:
        check_media(cut)
    assert err.value.status == DECODE_ERROR
    assert err.value.detail  # ffmpeg's first error line, e.g. "partial file" or "moov atom not found"


def test_media_error_vocabulary_and_pickling():
    with pytest.raises(ValueError, match="not one of"):
        MediaError("broken", "x")
    err = pickle.loads(pickle.dumps(MediaError(NO_AUDIO, "silent film")))
    assert (err.status, err.detail) == (NO_AUDIO, "silent film")


# --- frames ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("offset", "duration"),
    [
        (1.13, 3.58),  # off the frame grid, with the pre-roll in use
        (0.0, 4.0),  # targets exactly on frames, from the first frame
        (0.27, 2.66),  # offset shorter than the pre-roll
        (2.0, None),  # to the end of the file: T from the container's duration
    ],
)
def test_frames_are_the_ones_nearest_to_k_T_over_10(numbered_clip, frame_number, offset, duration):
    clip = decode_clip(numbered_clip, offset, duration)
    span = duration if duration is not None else clip.info.duration - offset
    assert len(clip.frames) == 10
    assert [frame_number(jpeg) for jpeg in clip.frames] == expected_frames(offset, span, 25)


def test_frames_follow_what_is_present_when_the_media_is_short(numbered_clip, frame_number):
    clip = decode_clip(numbered_clip, 1.19, 10.0)  # 6 s file: only 4.81 s after the offset
    span = clip.info.duration - 1.19
    assert [frame_number(jpeg) for jpeg in clip.frames] == expected_frames(1.19, span, 25)
    assert clip.waveform.size == pytest.approx(span * SR, abs=SR * 0.03)


def test_video_that_ends_early_repeats_its_last_frame(clip_factory, frame_number):
    path = clip_factory("short_video.mp4", 4.0, size=(128, 128), video_seconds=2.0, numbered=True)
    numbers = [frame_number(jpeg) for jpeg in decode_clip(path, 0.0, 4.0).frames]
    assert numbers[:5] == [0, 10, 20, 30, 40]
    assert numbers[5:] == [49] * 5  # the last of 50 frames, held


@pytest.mark.parametrize(("size", "axis"), [((320, 180), "X"), ((180, 320), "Y")])
def test_frames_are_short_side_scaled_and_centre_cropped(clip_factory, size, axis):
    # A bright band at source positions [150, 170) along the long side and another at [0, 60),
    # which the centre crop must remove: 320 -> 398 px (x 1.24375), crop from 87 (= 69.95 src px).
    luma = f"255*(between({axis},150,169)+lt({axis},60))"
    path = clip_factory("wide.mp4", 1.0, size=size, luma=luma, with_audio=True)
    image = decode_image(decode_clip(path, 0.0, 1.0).frames[0])
    assert tuple(image.shape) == (3, 224, 224)
    profile = image[0, 112, :] if axis == "X" else image[0, :, 112]
    band = [int(v > 127) for v in profile.tolist()]
    # Band edges at (150 - 69.95) * 1.24375 = 99.6 and (170 - 69.95) * 1.24375 = 124.4.
    assert band[:96] == [0] * 96
    assert band[103:121] == [1] * 18
    assert band[128:] == [0] * 96
    across = image[0, :, 112] if axis == "X" else image[0, 112, :]
    assert (across > 127).all()  # the band covers the whole short side


# --- audio -------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "rate", "channels"), [("tone.mp4", 44100, 2), ("tone.wav", 25000, 1)])
def test_audio_is_16k_mono_with_the_right_length_and_pitch(clip_factory, name, rate, channels):
    path = clip_factory(name, 3.0, audio_rate=rate, channels=channels, with_video=name.endswith(".mp4"))
    clip = decode_clip(path, 0.7, 1.5, num_frames=10 if name.endswith(".mp4") else 0)
    wave = clip.waveform
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.size == int(1.5 * SR)
    assert clip.info.sample_rate == rate
    assert dominant_frequency(wave, SR) == pytest.approx(440.0, abs=0.5)
    # Stereo is averaged, not summed: identical channels keep their amplitude (0.5).
    assert np.abs(wave[SR // 10 :]).max() == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize(("name", "tolerance"), [("onset.wav", 0.001), ("onset.mp4", 0.003)])
@pytest.mark.parametrize("offset", [0.3, 1.0])
def test_audio_offset_is_honoured(clip_factory, name, tolerance, offset):
    # Silence, then a tone from t = 1.25 s: it must start 1.25 - offset into the clip.
    path = clip_factory(name, 3.0, audio_expr="0.5*sin(2*PI*440*t)*gte(t,1.25)", with_video=name.endswith(".mp4"))
    wave = decode_clip(path, offset, 1.5, num_frames=0).waveform
    onset = np.argmax(np.abs(wave) > 0.05) / SR
    assert onset == pytest.approx(1.25 - offset, abs=tolerance)


# --- failures ----------------------------------------------------------------------------


def test_no_audio_stream(clip_factory):
    with pytest.raises(MediaError) as err:
        decode_clip(clip_factory("mute.mp4", 1.0, with_audio=False), 0.0, 1.0)
    assert err.value.status == NO_AUDIO


def test_no_video_stream_when_frames_are_wanted(clip_factory):
    path = clip_factory("sound.wav", 1.0, with_video=False)
    with pytest.raises(MediaError) as err:
        decode_clip(path, 0.0, 1.0)
    assert err.value.status == NO_VIDEO
    audio_only = decode_clip(path, 0.25, None, num_frames=0)
    assert audio_only.frames == []
    assert audio_only.waveform.size == int(0.75 * SR)


def test_no_video_frame_inside_the_clip(clip_factory):
    # The video stops at 1 s; the decoder reads from 0.8 s (pre-roll) but those frames are
    # before the clip and must not stand in for it.
    path = clip_factory("early_end.mp4", 4.0, video_seconds=1.0)
    with pytest.raises(MediaError) as err:
        decode_clip(path, 1.3, 1.5)
    assert err.value.status == NO_VIDEO


def test_corrupt_file_is_a_decode_error(tmp_path):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(garbage_bytes(4096))
    with pytest.raises(MediaError) as err:
        decode_clip(bad, 0.0, 1.0)
    assert err.value.status == DECODE_ERROR


def test_bad_arguments_name_the_value(clip_factory):
    path: Path = clip_factory("x.wav", 0.5, with_video=False)
    with pytest.raises(ValueError, match="-1"):
        decode_clip(path, -1.0, 1.0, num_frames=0)
    with pytest.raises(ValueError, match="duration"):
        decode_clip(path, 0.0, 0.0, num_frames=0)
