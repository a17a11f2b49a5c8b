"""The features stage: decoded clips -> Kaldi fbank + JPEG frames -> one HDF5 shard.

Per clip, :func:`equiav.data.media.decode_clip` runs one ffmpeg process; :func:`fbank`
computes the spectrogram exactly as method.md section 1 specifies (no normalisation: the
stored values are raw log-mel energies, normalised at read time with statistics that
:func:`equiav.data.store.compute_norm_stats` computes from the training split).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torchaudio.compliance import kaldi

from equiav.data.media import DecodedClip, MediaError, decode_clip
from equiav.data.status import DECODE_ERROR, OK, SILENT, TOO_SHORT
from equiav.data.store import ShardWriter
from equiav.settings.features import FeatureSettings

__all__ = ["SILENCE_PEAK", "FeatureSettings", "extract_shard", "fbank"]

log = logging.getLogger(__name__)

# Kaldi's default analysis window: fewer samples give no fbank frame at all.
_WINDOW_SECONDS = 0.025
_REQUIRED_COLUMNS = ("clip_id", "split", "labels", "status", "file", "offset", "duration")
# A progress line every this many clips (and one at the end).
_LOG_EVERY = 100
# A clip whose audio never reaches this amplitude (-80 dBFS, about three steps of 16-bit
# audio) is silent: its fbank would be constant at the log floor, nothing to learn from.
# Quiet recordings (AudioSet's "Silence" class included) have room noise far above it.
SILENCE_PEAK = 1e-4


def fbank(waveform: torch.Tensor | np.ndarray, settings: FeatureSettings) -> tuple[torch.Tensor, int]:
    """Kaldi log-mel fbank of a mono waveform.

    waveform: float [n] at settings.sample_rate Hz. Returns (float16 [target_frames,
    num_mel_bins], real): the first ``real`` rows are the clip's frames (10 ms hop), the rest
    zero padding; a longer clip is cut to target_frames (then real == target_frames).
    """
    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.ndim != 1:
        raise ValueError(f"fbank expects a mono waveform of shape [n], got shape {tuple(wav.shape)}")
    min_samples = _window_samples(settings)
    if wav.numel() < min_samples:
        raise ValueError(
            f"waveform of {wav.numel()} samples is shorter than one 25 ms analysis window ({min_samples} samples)"
        )
    feats = kaldi.fbank(
        (wav - wav.mean())[None],
        htk_compat=True,
        sample_frequency=settings.sample_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=settings.num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )
    real = min(feats.shape[0], settings.target_frames)
    out = torch.zeros(settings.target_frames, settings.num_mel_bins, dtype=torch.float16)
    out[:real] = feats[:real]
    return out, real


def _window_samples(settings: FeatureSettings) -> int:
    return math.ceil(_WINDOW_SECONDS * settings.sample_rate)


def _clip_duration(value: object) -> float | None:
    """The downloads table's duration: NaN or missing means the whole file."""
    return None if pd.isna(value) else float(value)


@dataclass
class _Outcome:
    """One clip's result: features when status is ok, else the reason it was left out."""

    status: str
    detail: str = ""
    fbank: torch.Tensor | None = None
    fbank_frames: int = 0
    decoded: DecodedClip | None = None


def _extract_clip(clip: Any, settings: FeatureSettings) -> _Outcome:
    """decode_clip + fbank for one row of the downloads table; never raises for a bad clip."""
    try:
        decoded = decode_clip(
            os.fspath(clip.file),
            float(clip.offset),
            _clip_duration(clip.duration),
            sample_rate=settings.sample_rate,
            num_frames=settings.num_frames,
            frame_size=settings.frame_size,
            jpeg_quality=settings.jpeg_quality,
        )
        if decoded.waveform.size < _window_samples(settings):
            raise MediaError(TOO_SHORT, f"{decoded.waveform.size} audio samples, less than one fbank window")
        peak = float(np.abs(decoded.waveform).max())
        if peak < SILENCE_PEAK:
            raise MediaError(SILENT, f"the audio never exceeds {peak:.1e} (silence: below {SILENCE_PEAK:g}, -80 dBFS)")
        feats, real = fbank(decoded.waveform, settings)
    except MediaError as err:
        log.warning("clip %s: %s", clip.clip_id, err)
        return _Outcome(err.status, err.detail)
    except Exception as err:  # one bad clip must not lose the shard's other clips
        log.warning("clip %s: unexpected error, recorded as %s", clip.clip_id, DECODE_ERROR, exc_info=True)
        return _Outcome(DECODE_ERROR, f"{type(err).__name__}: {err}")
    return _Outcome(OK, fbank=feats, fbank_frames=real, decoded=decoded)


def _in_order(pool: ThreadPoolExecutor, work: Callable[[Any], _Outcome], items: Iterable[Any], ahead: int):
    """pool.map with at most ``ahead`` clips in flight, so a slow clip cannot make the
    finished ones behind it pile up in memory."""
    pending: deque[Future[_Outcome]] = deque()
    for item in items:
        pending.append(pool.submit(work, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def extract_shard(
    downloads: pd.DataFrame, out_h5: Path, settings: FeatureSettings, *, workers: int = 1
) -> pd.DataFrame:
    """Decode every clip of ``downloads`` whose status is "ok" into the HDF5 shard ``out_h5``.

    A clip that fails is recorded with its reason (a status of the vocabulary and a detail)
    and left out of the shard. The shard appears at ``out_h5`` only once complete (an empty
    one when no clip succeeds). ``workers`` clips are decoded concurrently (threads driving
    single-threaded ffmpeg processes: about one core each); rows keep the table's order.
    Returns one row per processed clip: clip_id, status, detail ("" when ok).
    """
    missing = [name for name in _REQUIRED_COLUMNS if name not in downloads.columns]
    if missing:
        raise ValueError(f"downloads table lacks columns {missing}; it needs {list(_REQUIRED_COLUMNS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    todo = downloads[downloads["status"] == OK]
    duplicated = todo["clip_id"][todo["clip_id"].duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(f"clip ids appear more than once among the ok downloads: {duplicated[:5]}")

    clips = list(todo.itertuples(index=False))
    results: list[dict[str, str]] = []
    started = time.monotonic()
    with ShardWriter(out_h5, settings) as writer, ThreadPoolExecutor(workers) as pool:
        outcomes = _in_order(pool, lambda clip: _extract_clip(clip, settings), clips, ahead=2 * workers)
        for done, (clip, outcome) in enumerate(zip(clips, outcomes, strict=True), start=1):
            results.append({"clip_id": clip.clip_id, "status": outcome.status, "detail": outcome.detail})
            if outcome.decoded is not None:
                # Outside the per-clip guard: failing to write the shard is the job's own
                # fault and must fail it, not be recorded against a clip.
                writer.add(
                    clip_id=str(clip.clip_id),
                    split=str(clip.split),
                    labels="" if pd.isna(clip.labels) else str(clip.labels),
                    fbank=outcome.fbank,
                    fbank_frames=outcome.fbank_frames,
                    frames=outcome.decoded.frames,
                    source_sample_rate=outcome.decoded.info.sample_rate,
                    fps=outcome.decoded.info.fps,
                    duration=outcome.decoded.waveform.size / settings.sample_rate,
                )
            if done % _LOG_EVERY == 0:
                rate = done / max(time.monotonic() - started, 1e-9)
                log.info("%s: %d/%d clips (%.2f clips/s), %d ok", out_h5, done, len(clips), rate, len(writer))
    log.info(
        "%s: %d clips processed in %.1f s, %d ok, %d left out",
        out_h5,
        len(results),
        time.monotonic() - started,
        len(writer),
        len(results) - len(writer),
    )
    return pd.DataFrame(results, columns=["clip_id", "status", "detail"])
