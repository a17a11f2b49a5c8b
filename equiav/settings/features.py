"""The features stage's settings (docs/features.md)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["FeatureSettings"]


@dataclass(frozen=True)
class FeatureSettings:
    """What the features stage produces: fbank [target_frames, num_mel_bins] from audio at
    sample_rate Hz, and num_frames JPEG frames of frame_size x frame_size pixels."""

    sample_rate: int = 16000
    num_mel_bins: int = 128
    target_frames: int = 1024
    num_frames: int = 10
    frame_size: int = 224
    jpeg_quality: int = 90
