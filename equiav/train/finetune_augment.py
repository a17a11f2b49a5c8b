"""Fine-tuning's training-only batch transforms, in the release's order: mixup (inputs and
labels with one lambda per clip), SpecAugment, time shift (docs/evaluation.md). SpecAugment and
the shift are pre-training's own (equiav.augment), drawn from a numpy generator per step so that
a resumed run draws the same."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from equiav.augment import draw_band, mask_bands, numpy_uniform, roll_time
from equiav.settings.finetune import FinetuneSettings

__all__ = ["MIXUP_ALPHA", "MixupDraw", "TrainAugment", "apply_mixup", "draw_mixup", "spec_augment", "time_shift"]

# Mixup's lambda ~ Beta(10, 10), as the release (and CAV-MAE) draw it.
MIXUP_ALPHA = 10.0


@dataclass(frozen=True)
class MixupDraw:
    """lam: float [B] (1 for clips left unmixed); partner: int64 [B], the clip each is mixed with."""

    lam: Tensor
    partner: Tensor


def draw_mixup(batch: int, rate: float, rng: np.random.Generator) -> MixupDraw:
    """For each clip: mix with probability ``rate``, lambda ~ Beta(10, 10), partner = a random
    permutation of the batch (the release draws a random partner from the whole data set; a
    shuffled batch is such a draw)."""
    mixed = rng.random(batch) < rate
    lam = np.where(mixed, rng.beta(MIXUP_ALPHA, MIXUP_ALPHA, size=batch), 1.0)
    return MixupDraw(torch.from_numpy(lam).float(), torch.from_numpy(rng.permutation(batch)))


def apply_mixup(x: Tensor, draw: MixupDraw) -> Tensor:
    """lam * x + (1 - lam) * x[partner] along dim 0, for any [B, ...] tensor (inputs or labels)."""
    lam = draw.lam.to(device=x.device, dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    return lam * x + (1 - lam) * x[draw.partner.to(x.device)]


def spec_augment(fbank: Tensor, freq_mask: int, time_mask: int, rng: np.random.Generator) -> Tensor:
    """One time band (< time_mask frames) and one frequency band (< freq_mask bins) per clip set
    to 0, drawn and applied as pre-training's SpecAugment does. fbank: [B, T, F]; a new tensor."""
    batch, frames, bins = fbank.shape
    rand = numpy_uniform(rng)
    time_band = draw_band(rand, batch, time_mask, frames).to(fbank.device)
    freq_band = draw_band(rand, batch, freq_mask, bins).to(fbank.device)
    return mask_bands(fbank, time_band, freq_band)


def time_shift(fbank: Tensor, rng: np.random.Generator) -> Tensor:
    """Roll each spectrogram [B, T, F] along time by its own shift, uniform in [-T, T)."""
    batch, frames, _ = fbank.shape
    return roll_time(fbank, torch.from_numpy(rng.integers(-frames, frames, size=batch)).to(fbank.device))


@dataclass(frozen=True)
class TrainAugment:
    """The training-only transforms of a batch, in the release's order: mixup (inputs and
    labels with one lambda per clip), SpecAugment, time shift. Evaluation uses none of them."""

    mixup: float
    specaugment: bool
    freq_mask: int
    time_mask: int
    time_shift: bool

    @classmethod
    def from_settings(cls, settings: FinetuneSettings) -> TrainAugment:
        return cls(settings.mixup, settings.specaugment, settings.freq_mask, settings.time_mask, settings.time_shift)

    def __call__(
        self, audio: Tensor | None, visual: Tensor | None, labels: Tensor, rng: np.random.Generator
    ) -> tuple[Tensor | None, Tensor | None, Tensor]:
        if self.mixup > 0:
            draw = draw_mixup(labels.shape[0], self.mixup, rng)
            audio = None if audio is None else apply_mixup(audio, draw)
            visual = None if visual is None else apply_mixup(visual, draw)
            labels = apply_mixup(labels, draw)
        if audio is not None and self.specaugment:
            audio = spec_augment(audio, self.freq_mask, self.time_mask, rng)
        if audio is not None and self.time_shift:
            audio = time_shift(audio, rng)
        return audio, visual, labels
