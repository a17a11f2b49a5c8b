"""Parameterised audio and visual augmentations with the parameter vectors EquiAV learns from.

Every augmentation here returns, beside the augmented batch, the exact parameters it applied,
encoded as a fixed-length vector (method.md section 3): 24 floats for audio, 18 for video. The
vectors are what the transformation predictor ``u(h, t)`` reads, so the code guarantees that
they describe the transform that was really applied; ``sample_params`` draws vectors from the
same distributions without touching any data (the S = 16 vectors of the centroid).

All random draws of one call happen up front, in one place (``_draw_audio`` / ``_draw_visual``),
on the generator's device (the CPU when no generator is given): forward and ``sample_params``
therefore consume a seeded generator identically, and the per-sample choices that decide which
samples an operation touches never need a device synchronisation. The heavy operations are
vectorised over the batch and run on the input's device; the drawn values reach a CUDA device
through pinned memory, asynchronously, so augmenting never waits for the kernels queued before
it. ``forward`` also takes one generator per equal chunk of the batch: the draws stay those of
each chunk's generator, the work runs once on the whole batch.

Audio vector (input: normalised fbank ``[B, T, F]``, time x freq):

====  =========================================================================================
idx   meaning
====  =========================================================================================
0     SpecAugment applied
1, 2  time mask [start, end) in frames / T (raw frames with ``release_mask_units``)
3, 4  frequency mask [start, end) in bins / F (raw bins with ``release_mask_units``)
5     time shift applied
6     circular shift along time, frames / T, in [-1, 1)
7     random resized crop applied (always 1)
8-11  crop top (time) / T, left (freq) / F, height (time) / T, width (freq) / F
12    colour jitter applied
13-16 order: slot 13 + k holds the operation applied k-th (0 brightness, 1 contrast,
      2 saturation, 3 hue); [0, 1, 2, 3] when jitter is off
17-20 b - 1, c - 1, s - 1, h
21    Gaussian blur applied
22    blur sigma, in bins/frames
23    flip applied
====  =========================================================================================

Visual vector (input: RGB ``[B, 3, H, W]`` in [0, 1]):

====  =========================================================================================
0     random resized crop applied (always 1)
1-4   crop top / H, left / W, height / H, width / W
5     colour jitter applied
6-9   order, as audio slots 13-16
10-13 b - 1, c - 1, s - 1, h
14    Gaussian blur applied
15    blur sigma, in output pixels
16    horizontal flip applied
17    grayscale applied
====  =========================================================================================

Every slot of an augmentation that was not applied is 0 (the order slots hold [0, 1, 2, 3]).

Kept whole: the draws, their encoding into the two vectors and the operations that apply them
are one contract (the table above); the predictor learns from the vectors only if each slot
describes the transform that was applied, so the three are read and changed together. The
distributions themselves are :mod:`equiav.settings.augment`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from equiav.settings.augment import AudioAugmentConfig, VisualAugmentConfig

__all__ = [
    "AUDIO_PARAM_DIM",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "JITTER_OPERATIONS",
    "VISUAL_PARAM_DIM",
    "AudioAugment",
    "AudioAugmentConfig",
    "VisualAugment",
    "VisualAugmentConfig",
    "draw_band",
    "mask_bands",
    "normalize_image",
    "numpy_uniform",
    "roll_time",
]

AUDIO_PARAM_DIM = 24
VISUAL_PARAM_DIM = 18
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Index of each colour-jitter operation in the order slots.
JITTER_OPERATIONS = ("brightness", "contrast", "saturation", "hue")
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
# ITU-R 601-2 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.2989, 0.587, 0.114)
# torchvision's RandomResizedCrop tries this many boxes before falling back to a centre crop.
_CROP_ATTEMPTS = 10

Uniform = Callable[..., Tensor]
_Draw = TypeVar("_Draw")  # one of the draw dataclasses below


# --------------------------------------------------------------------------------------------
# Drawing parameters
# --------------------------------------------------------------------------------------------


def _uniform_source(generator: torch.Generator | None) -> Uniform:
    """``rand(*shape)`` -> float64 U[0, 1) on the generator's device (CPU without a generator).

    float64 so that the crop arithmetic matches torchvision's Python floats.
    """
    device = generator.device if generator is not None else torch.device("cpu")

    def rand(*shape: int) -> Tensor:
        return torch.rand(shape, generator=generator, device=device, dtype=torch.float64)

    return rand


Generators = torch.Generator | Sequence[torch.Generator] | None


def _draw_per_chunk(draw: Callable[[int, Uniform], _Draw], batch: int, generators: Generators) -> _Draw:
    """``draw(n, rand)`` for the whole batch from one generator, or per equal chunk from a sequence of
    generators (chunk i of the rows from generator i), the chunks' draws joined in order."""
    if generators is None or isinstance(generators, torch.Generator):
        return draw(batch, _uniform_source(generators))
    generators = list(generators)
    if not generators or batch % len(generators):
        raise ValueError(
            f"a batch of {batch} rows cannot be split into {len(generators)} equal chunks, one per generator; "
            "pass as many generators as the batch has equal chunks (or one generator)"
        )
    size = batch // len(generators)
    return _join_draws([draw(size, _uniform_source(g)) for g in generators])


def _join_draws(draws: list[_Draw]) -> _Draw:
    """Concatenate draws of the same kind along the rows (tensors joined, sizes checked equal)."""
    first = draws[0]
    values = {}
    for field in dataclasses.fields(first):
        parts = [getattr(d, field.name) for d in draws]
        if isinstance(parts[0], Tensor):
            values[field.name] = torch.cat(parts)
        elif dataclasses.is_dataclass(parts[0]):
            values[field.name] = _join_draws(parts)
        else:
            if any(part != parts[0] for part in parts):
                raise ValueError(f"cannot join draws with different {field.name}: {parts}")
            values[field.name] = parts[0]
    return type(first)(**values)


def _to_device(tensor: Tensor, device: torch.device) -> Tensor:
    """``tensor`` on ``device``; a CPU -> CUDA copy goes through pinned memory without blocking.

    A copy from pageable memory waits for every kernel queued before it, which would stall the
    host once per drawn value; from pinned memory it is queued like a kernel (PyTorch keeps the
    pinned block alive until the copy has run).
    """
    if tensor.device.type == "cpu" and device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def _uniform_in(rand: Uniform, n: int, interval: tuple[float, float]) -> Tensor:
    """[n] float32 values uniform in ``interval``; float32 so that the applied value is the stored one."""
    low, high = interval
    return (low + (high - low) * rand(n)).float()


def _randint(rand: Uniform, low: Tensor | int, high: Tensor | int, n: int) -> Tensor:
    """[n] int64 uniform in [low, high) (bounds broadcast per sample)."""
    return (low + torch.floor(rand(n) * (high - low))).long()


@dataclass(frozen=True)
class _JitterDraw:
    applied: Tensor  # bool [n]
    order: Tensor  # int64 [n, 4]; order[:, k] = operation applied k-th; arange(4) when off
    factors: Tensor  # float32 [n, 4]: b, c, s (1 = identity), h (0 = identity); identity when off

    def slots(self) -> Tensor:
        """[n, 9] float32: flag, order (4), b - 1, c - 1, s - 1, h."""
        offsets = self.factors - torch.tensor([1.0, 1.0, 1.0, 0.0], device=self.factors.device)
        return torch.cat([self.applied[:, None].float(), self.order.float(), offsets], dim=1)


@dataclass(frozen=True)
class _BlurDraw:
    applied: Tensor  # bool [n]
    sigma: Tensor  # float32 [n]; 0 when off

    def slots(self) -> Tensor:
        """[n, 2] float32: flag, sigma."""
        return torch.stack([self.applied.float(), self.sigma], dim=1)


def _draw_jitter(
    rand: Uniform, n: int, p: float, brightness: float, contrast: float, saturation: float, hue: float
) -> _JitterDraw:
    applied = rand(n) < p
    # argsort of i.i.d. uniforms is a uniformly random permutation per row.
    order = torch.where(applied[:, None], torch.argsort(rand(n, 4), dim=1), torch.arange(4, device=applied.device))
    factors = torch.stack(
        [
            _uniform_in(rand, n, (1 - brightness, 1 + brightness)),
            _uniform_in(rand, n, (1 - contrast, 1 + contrast)),
            _uniform_in(rand, n, (1 - saturation, 1 + saturation)),
            _uniform_in(rand, n, (-hue, hue)),
        ],
        dim=1,
    )
    identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=factors.device)
    return _JitterDraw(applied, order, torch.where(applied[:, None], factors, identity))


def _draw_blur(rand: Uniform, n: int, p: float, sigma: tuple[float, float]) -> _BlurDraw:
    applied = rand(n) < p
    value = _uniform_in(rand, n, sigma)
    return _BlurDraw(applied, torch.where(applied, value, torch.zeros_like(value)))


def _draw_crop_boxes(
    rand: Uniform, n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> Tensor:
    """torchvision's ``RandomResizedCrop.get_params`` for n boxes at once.

    Each box gets ``_CROP_ATTEMPTS`` candidate (area fraction ~ U(scale), log aspect ~ U(log ratio))
    pairs; the first candidate that fits is kept, its top/left drawn uniformly; a box with no
    fitting candidate takes torchvision's fallback (the largest centred crop whose aspect is
    clipped into ``ratio``). ``ratio`` is width / height.

    Returns int64 [n, 4]: top, left, height, width in pixels of the [height, width] plane.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * rand(n, _CROP_ATTEMPTS))
    aspect = torch.exp(log_low + (log_high - log_low) * rand(n, _CROP_ATTEMPTS))
    # torch.round rounds half to even, as Python's round() in torchvision does.
    w = torch.round(torch.sqrt(target_area * aspect)).long()
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    top = _randint(rand, 0, height - h + 1, n)
    left = _randint(rand, 0, width - w + 1, n)

    in_ratio = width / height
    if in_ratio < ratio[0]:
        fallback_w, fallback_h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fallback_w, fallback_h = round(height * ratio[1]), height
    else:
        fallback_w, fallback_h = width, height
    fallback = torch.tensor(
        [(height - fallback_h) // 2, (width - fallback_w) // 2, fallback_h, fallback_w], device=h.device
    )
    boxes = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), boxes, fallback)


@dataclass(frozen=True)
class _AudioDraw:
    time_frames: int
    freq_bins: int
    specaug: Tensor  # bool [n]
    time_mask: Tensor  # int64 [n, 2]: [start, end) in frames; [0, 0] when off
    freq_mask: Tensor  # int64 [n, 2]: [start, end) in bins; [0, 0] when off
    shift_applied: Tensor  # bool [n]
    shift: Tensor  # int64 [n], frames in [-T, T); 0 when off
    crop: Tensor  # int64 [n, 4]: top (frames), left (bins), height (frames), width (bins)
    jitter: _JitterDraw
    blur: _BlurDraw
    flip: Tensor  # bool [n]


def draw_band(rand: Uniform, n: int, max_width: int, size: int) -> Tensor:
    """SpecAugment's band per sample, as torchaudio's mask_along_axis: width U[0, max_width)
    floored, start U[0, size - width).

    Returns int64 [n, 2]: [start, end), with end <= size.
    """
    width = rand(n) * min(max_width, size)
    start = torch.floor(rand(n) * (size - width))
    return torch.stack([start, start + torch.floor(width)], dim=1).long()


def numpy_uniform(rng: np.random.Generator) -> Uniform:
    """``rand(*shape)`` -> float64 U[0, 1) from a numpy generator (fine-tuning's per-step draws)."""
    return lambda *shape: torch.from_numpy(rng.random(shape))


def mask_bands(spec: Tensor, time_band: Tensor, freq_band: Tensor) -> Tensor:
    """SpecAugment: zero (the normalised mean) one time and one frequency band per sample.

    spec: [B, T, F]; time_band, freq_band: int64 [B, 2] of [start, end) on spec's device
    (``draw_band``). Returns a new tensor.
    """
    _, time_frames, freq_bins = spec.shape
    frames = torch.arange(time_frames, device=spec.device)
    bins = torch.arange(freq_bins, device=spec.device)
    in_time = (frames >= time_band[:, :1]) & (frames < time_band[:, 1:])
    in_freq = (bins >= freq_band[:, :1]) & (bins < freq_band[:, 1:])
    return spec.masked_fill(in_time[:, :, None] | in_freq[:, None, :], 0.0)


def roll_time(spec: Tensor, shift: Tensor) -> Tensor:
    """torch.roll along time by a per-sample amount: out[b, t] = spec[b, (t - shift[b]) mod T]."""
    batch, time_frames, freq_bins = spec.shape
    source = (torch.arange(time_frames, device=spec.device) - shift[:, None]).remainder(time_frames)
    return spec.gather(1, source[:, :, None].expand(batch, time_frames, freq_bins))


def _draw_audio(config: AudioAugmentConfig, n: int, time_frames: int, freq_bins: int, rand: Uniform) -> _AudioDraw:
    specaug = rand(n) < config.specaug_p
    time_mask = draw_band(rand, n, config.time_mask, time_frames) * specaug[:, None]
    freq_mask = draw_band(rand, n, config.freq_mask, freq_bins) * specaug[:, None]
    shift_coin = rand(n) < config.time_shift_p
    shift_applied = specaug if config.release_coupled_shift else shift_coin
    shift = _randint(rand, -time_frames, time_frames, n) * shift_applied
    # On the [T, F] plane the crop's height is along time and its width along frequency.
    crop = _draw_crop_boxes(rand, n, time_frames, freq_bins, config.crop_scale, config.crop_ratio)
    jitter = _draw_jitter(rand, n, config.jitter_p, config.brightness, config.contrast, config.saturation, config.hue)
    blur = _draw_blur(rand, n, config.blur_p, config.sigma)
    flip = rand(n) < config.flip_p
    return _AudioDraw(
        time_frames=time_frames,
        freq_bins=freq_bins,
        specaug=specaug,
        time_mask=time_mask,
        freq_mask=freq_mask,
        shift_applied=shift_applied,
        shift=shift,
        crop=crop,
        jitter=jitter,
        blur=blur,
        flip=flip,
    )


def _encode_audio(draw: _AudioDraw, config: AudioAugmentConfig) -> Tensor:
    """The [n, 24] float32 audio vector of ``draw`` (layout in the module docstring)."""
    t, f = float(draw.time_frames), float(draw.freq_bins)
    mask_units = (1.0, 1.0) if config.release_mask_units else (t, f)
    # The release divides the time extents by F and the frequency extents by T.
    crop_units = (f, t, f, t) if config.release_crop_axes else (t, f, t, f)
    device = draw.crop.device
    n = draw.crop.shape[0]
    return torch.cat(
        [
            draw.specaug[:, None].float(),
            (draw.time_mask.double() / mask_units[0]).float(),
            (draw.freq_mask.double() / mask_units[1]).float(),
            draw.shift_applied[:, None].float(),
            (draw.shift.double() / t).float()[:, None],
            torch.ones(n, 1, device=device),
            (draw.crop.double() / torch.tensor(crop_units, dtype=torch.float64, device=device)).float(),
            draw.jitter.slots(),
            draw.blur.slots(),
            draw.flip[:, None].float(),
        ],
        dim=1,
    )


@dataclass(frozen=True)
class _VisualDraw:
    height: int
    width: int
    crop: Tensor  # int64 [n, 4]: top, left, height, width in input pixels
    jitter: _JitterDraw
    blur: _BlurDraw
    flip: Tensor  # bool [n]
    gray: Tensor  # bool [n]


def _draw_visual(config: VisualAugmentConfig, n: int, height: int, width: int, rand: Uniform) -> _VisualDraw:
    crop = _draw_crop_boxes(rand, n, height, width, config.crop_scale, config.crop_ratio)
    jitter = _draw_jitter(rand, n, config.jitter_p, config.brightness, config.contrast, config.saturation, config.hue)
    blur = _draw_blur(rand, n, config.blur_p, config.sigma)
    flip = rand(n) < config.flip_p
    gray = rand(n) < config.gray_p
    return _VisualDraw(height=height, width=width, crop=crop, jitter=jitter, blur=blur, flip=flip, gray=gray)


def _encode_visual(draw: _VisualDraw) -> Tensor:
    """The [n, 18] float32 visual vector of ``draw`` (layout in the module docstring)."""
    device = draw.crop.device
    n = draw.crop.shape[0]
    units = torch.tensor([draw.height, draw.width, draw.height, draw.width], dtype=torch.float64, device=device)
    return torch.cat(
        [
            torch.ones(n, 1, device=device),
            (draw.crop.double() / units).float(),
            draw.jitter.slots(),
            draw.blur.slots(),
            draw.flip[:, None].float(),
            draw.gray[:, None].float(),
        ],
        dim=1,
    )


# --------------------------------------------------------------------------------------------
# Applying parameters (all vectorised over the batch)
# --------------------------------------------------------------------------------------------


def _bilinear_taps(start: Tensor, length: Tensor, out_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source indices and weights to resize the spans [start, start + length) to ``out_size``.

    PyTorch's bilinear convention with ``align_corners=False`` (what torchvision's resize uses),
    inside each span: source = (dst + 0.5) * length / out_size - 0.5, clamped at 0, the upper
    neighbour clamped to the span's last index.

    Args: start, length: int64 [n] (span in input pixels).
    Returns: low, high: int64 [n, out_size] absolute input indices; frac: float32 [n, out_size],
        the weight of ``high``.
    """
    scale = length.float()[:, None] / out_size
    dst = torch.arange(out_size, device=start.device, dtype=torch.float32)
    source = ((dst + 0.5) * scale - 0.5).clamp(min=0.0)
    low = source.long()  # truncation is the floor: source >= 0
    high = low + (low < length[:, None] - 1).long()
    return start[:, None] + low, start[:, None] + high, source - low.float()


def _resized_crop(images: Tensor, boxes: Tensor, out_height: int, out_width: int) -> Tensor:
    """Crop a per-sample box and resize it bilinearly, as torchvision's ``resized_crop`` (no antialias).

    Args:
        images: [n, C, H, W] floating.
        boxes: int64 [n, 4]: top, left, height, width in pixels, inside the image.
    Returns: [n, C, out_height, out_width]. Bilinear interpolation is separable: rows, then columns.
    """
    n, channels, _, width = images.shape
    boxes = _to_device(boxes, images.device)
    row_low, row_high, row_frac = _bilinear_taps(boxes[:, 0], boxes[:, 2], out_height)
    col_low, col_high, col_frac = _bilinear_taps(boxes[:, 1], boxes[:, 3], out_width)

    def rows(index: Tensor) -> Tensor:
        return images.gather(2, index[:, None, :, None].expand(n, channels, out_height, width))

    row_frac = row_frac.to(images.dtype)[:, None, :, None]
    resized = rows(row_low) * (1 - row_frac) + rows(row_high) * row_frac

    def cols(index: Tensor) -> Tensor:
        return resized.gather(3, index[:, None, None, :].expand(n, channels, out_height, out_width))

    col_frac = col_frac.to(images.dtype)[:, None, None, :]
    return cols(col_low) * (1 - col_frac) + cols(col_high) * col_frac


def _gaussian_weights(sigma: Tensor, truncate: float, dtype: torch.dtype) -> Tensor:
    """Per-sample 1-D Gaussian kernels, zero-padded to the largest one in the batch.

    Sample i has radius r_i = ceil(truncate * sigma_i) and weights exp(-k^2 / (2 sigma_i^2)) for
    |k| <= r_i, normalised to sum 1 (torchvision's ``_get_gaussian_kernel1d`` for side 2 r_i + 1).
    Taps beyond r_i are exactly 0, so a sample's result is the one its own kernel gives.

    Args: sigma: float32 [n] > 0.
    Returns: [n, 2 R + 1] of ``dtype``, R = max r_i.
    """
    sigma = sigma.double()
    radius = torch.ceil(truncate * sigma)
    max_radius = int(radius.max())
    offsets = torch.arange(-max_radius, max_radius + 1, device=sigma.device, dtype=torch.float64)
    weights = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2) * (offsets.abs() <= radius[:, None])
    return (weights / weights.sum(dim=1, keepdim=True)).to(dtype)


def _reflect_indices(length: int, pad: int, device: torch.device) -> Tensor:
    """Indices of ``length`` samples reflect-padded by ``pad`` on each side (edge not repeated).

    Equals ``F.pad(mode="reflect")`` where that is defined (pad < length) and keeps reflecting
    beyond, so a wide kernel on a short axis still works. Returns int64 [length + 2 pad].
    """
    index = torch.arange(-pad, length + pad, device=device)
    if length == 1:
        return torch.zeros_like(index)
    period = 2 * (length - 1)
    index = index.remainder(period)
    return torch.where(index < length, index, period - index)


def _convolve_axis(x: Tensor, weights: Tensor, dim: int) -> Tensor:
    """Per-sample 1-D convolution of x [n, ...] along ``dim`` with weights [n, K] (odd K), reflect padding."""
    taps = weights.shape[1]
    radius = taps // 2
    length = x.shape[dim]
    padded = x.index_select(dim, _reflect_indices(length, radius, x.device))
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    # One multiply-add per tap: K <= 2 ceil(truncate * sigma_max) + 1 is small, and a zero tap
    # adds an exact 0, which keeps every sample equal to its own-kernel result.
    out = padded.narrow(dim, 0, length) * weights[:, 0].view(shape)
    for k in range(1, taps):
        out = out + padded.narrow(dim, k, length) * weights[:, k].view(shape)
    return out


def _gaussian_blur(images: Tensor, sigma: Tensor, truncate: float) -> Tensor:
    """Blur each image [n, C, H, W] with its own isotropic Gaussian (separable, reflect padding)."""
    # The kernel's width is a host decision (no sync): weights are made where sigma was drawn.
    weights = _to_device(_gaussian_weights(sigma, truncate, images.dtype), images.device)
    return _convolve_axis(_convolve_axis(images, weights, 2), weights, 3)


def _blur_selected(images: Tensor, blur: _BlurDraw, truncate: float) -> Tensor:
    """Blur the samples whose blur flag is set; the others are returned untouched."""
    index = blur.applied.nonzero().squeeze(1)
    if index.numel() == 0:
        return images
    index_here = _to_device(index, images.device)
    out = images.clone()
    out[index_here] = _gaussian_blur(images[index_here], blur.sigma[index], truncate)
    return out


def _grayscale(images: Tensor) -> Tensor:
    """Luma [n, 1, H, W] of RGB images [n, 3, H, W] (torchvision's weights)."""
    r, g, b = images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """[n] -> [n, 1, ..., 1] on like's device and dtype, to broadcast against like [n, ...]."""
    return _to_device(values, like.device).to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))


def _shift_hue(images: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images [n, 3, H, W] in [0, 1] by ``shift`` [n] turns (HSV model).

    Same maths as torchvision's ``adjust_hue``: RGB -> HSV, h <- (h + shift) mod 1, HSV -> RGB.
    """
    r, g, b = images.unbind(dim=1)
    value, _ = images.max(dim=1)
    chroma = value - images.min(dim=1).values
    ones = torch.ones_like(chroma)
    saturation = chroma / torch.where(value > 0, value, ones)
    safe_chroma = torch.where(chroma > 0, chroma, ones)  # grey pixels: numerators below are 0
    hue_sixths = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )
    hue = (hue_sixths / 6.0 + _per_sample(shift, hue_sixths)).remainder(1.0)
    # HSV -> RGB: channel n in (R, G, B) = (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1)
    # with k = (n + 6 h) mod 6.
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (n + 6.0 * hue).remainder(6.0)
        channels.append(value - value * saturation * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(channels, dim=1)


def _visual_jitter_op(operation: int, images: Tensor, factor: Tensor) -> Tensor:
    """One torchvision colour operation on RGB [m, 3, H, W] in [0, 1], per-sample factor [m]."""
    if operation == HUE:
        return _shift_hue(images, factor)
    f = _per_sample(factor, images)
    if operation == BRIGHTNESS:
        blended = images * f
    elif operation == CONTRAST:
        mean = _grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
        blended = images * f + (1 - f) * mean
    else:
        blended = images * f + (1 - f) * _grayscale(images)
    # torchvision clamps float images to [0, 1] after blending; right for images.
    return blended.clamp(0.0, 1.0)


def _audio_jitter_op(operation: int, spec: Tensor, factor: Tensor, clamp: bool) -> Tensor:
    """One colour operation on spectrograms [m, T, F], per-sample factor [m].

    Brightness multiplies, contrast scales around each spectrogram's mean, saturation and hue
    are identities on one channel. ``clamp`` clamps to [0, 1] afterwards, as the release's
    torchvision calls do on the normalised spectrogram.
    """
    f = _per_sample(factor, spec)
    if operation == BRIGHTNESS:
        spec = spec * f
    elif operation == CONTRAST:
        spec = spec * f + (1 - f) * spec.mean(dim=(1, 2), keepdim=True)
    return spec.clamp(0.0, 1.0) if clamp else spec


def _apply_jitter(x: Tensor, jitter: _JitterDraw, operation: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
    """Apply ``operation(op, x[selected], factors[selected, op])`` position by position.

    At position k each jittered sample gets the operation its order names at k; each operation
    runs once per position on the samples that need it (16 batched calls at most).
    """
    out = x.clone()
    for position in range(4):
        for op in range(4):
            index = (jitter.applied & (jitter.order[:, position] == op)).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            index_here = _to_device(index, x.device)
            out[index_here] = operation(op, out[index_here], jitter.factors[index, op])
    return out


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


class AudioAugment(nn.Module):
    """EquiAV's audio augmentation on a batch of normalised spectrograms, with its parameter vectors.

    Order: SpecAugment -> time shift -> random resized crop -> colour jitter -> Gaussian blur ->
    flip. No learnable parameters or buffers; the module is only for composing with models.
    """

    def __init__(self, config: AudioAugmentConfig = AudioAugmentConfig()) -> None:
        super().__init__()
        self.config = config

    def extra_repr(self) -> str:
        return repr(self.config)

    def forward(self, spec: Tensor, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """Augment each spectrogram with its own random parameters.

        Args:
            spec: [B, T, F] floating, normalised fbank (time frames x frequency bins), any device.
            generator: seeds the draws (drawn on its device; CPU default generator when None); a
                sequence of k generators draws the batch's k equal chunks, chunk i from generator
                i, as k calls on the chunks would (the work still runs once, on the whole batch).
        Returns:
            augmented [B, T, F] (same dtype and device), params float32 [B, 24] on spec's device.
        """
        if spec.dim() != 3:
            hint = " For one spectrogram use spec.unsqueeze(0)." if spec.dim() == 2 else ""
            raise ValueError(
                f"AudioAugment expects spectrograms shaped [batch, time, freq]; got shape {tuple(spec.shape)}.{hint}"
            )
        if not spec.is_floating_point():
            raise TypeError(
                f"AudioAugment expects a floating-point (normalised) spectrogram; got {spec.dtype}. Use spec.float()."
            )
        config = self.config
        batch, time_frames, freq_bins = spec.shape
        draw = _draw_per_chunk(lambda n, rand: _draw_audio(config, n, time_frames, freq_bins, rand), batch, generator)
        device = spec.device

        x = mask_bands(spec, _to_device(draw.time_mask, device), _to_device(draw.freq_mask, device))
        if not config.release_time_shift:
            x = roll_time(x, _to_device(draw.shift, device))

        x = _resized_crop(x[:, None], draw.crop, time_frames, freq_bins)[:, 0]
        x = _apply_jitter(x, draw.jitter, lambda op, s, f: _audio_jitter_op(op, s, f, config.release_clamp))
        x = _blur_selected(x[:, None], draw.blur, config.blur_truncate)[:, 0]
        flip_dim = 1 if config.flip_axis == "time" else 2
        x = torch.where(_to_device(draw.flip, device)[:, None, None], x.flip(flip_dim), x)
        return x, _to_device(_encode_audio(draw, config), device)

    def sample_params(
        self,
        batch: int,
        samples: int,
        time_frames: int,
        freq_bins: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Parameter vectors from the distributions of ``forward``, without augmenting anything.

        Returns float32 [batch, samples, 24] on ``device`` (default: the generator's device, or
        the CPU). With the same generator state, ``sample_params(B, 1, T, F)[:, 0]`` equals the
        params ``forward`` returns for a [B, T, F] batch.
        """
        _check_count("batch", batch, 0)
        _check_count("samples", samples)
        _check_count("time_frames", time_frames)
        _check_count("freq_bins", freq_bins)
        draw = _draw_audio(self.config, batch * samples, time_frames, freq_bins, _uniform_source(generator))
        params = _encode_audio(draw, self.config).view(batch, samples, AUDIO_PARAM_DIM)
        return params if device is None else _to_device(params, torch.device(device))


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 [0, 255] -> float32 [0, 1]; floating images pass through (assumed in [0, 1])."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or floating in [0, 1]; got {images.dtype}")
    return images


def normalize_image(images: Tensor) -> Tensor:
    """ImageNet-normalise RGB images [..., 3, H, W] in [0, 1] (or uint8 in [0, 255]).

    Returns (x - IMAGENET_MEAN) / IMAGENET_STD per channel, float (float32 for uint8 input).
    """
    if images.dim() < 3 or images.shape[-3] != 3:
        raise ValueError(
            f"normalize_image expects RGB images shaped [..., 3, height, width]; got shape {tuple(images.shape)}"
        )
    images = _to_unit_float(images)
    mean = _to_device(torch.tensor(IMAGENET_MEAN, dtype=images.dtype), images.device).view(3, 1, 1)
    std = _to_device(torch.tensor(IMAGENET_STD, dtype=images.dtype), images.device).view(3, 1, 1)
    return (images - mean) / std


class VisualAugment(nn.Module):
    """EquiAV's visual augmentation on a batch of RGB frames, with its parameter vectors.

    Order: random resized crop -> colour jitter -> Gaussian blur -> horizontal flip ->
    grayscale -> ImageNet normalisation. No learnable parameters or buffers.
    """

    def __init__(self, config: VisualAugmentConfig = VisualAugmentConfig()) -> None:
        super().__init__()
        self.config = config

    def extra_repr(self) -> str:
        return repr(self.config)

    def forward(self, images: Tensor, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """Augment each frame with its own random parameters.

        Args:
            images: [B, 3, H, W], float in [0, 1] or uint8, un-normalised RGB, any device.
            generator: seeds the draws (drawn on its device; CPU default generator when None); a
                sequence of k generators draws the batch's k equal chunks, chunk i from generator
                i, as k calls on the chunks would (the work still runs once, on the whole batch).
        Returns:
            augmented, ImageNet-normalised [B, 3, size, size] (float32 for uint8 input, else the
            input dtype), params float32 [B, 18] on the images' device.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            hint = " For one image use images.unsqueeze(0)." if images.dim() == 3 else ""
            raise ValueError(
                "VisualAugment expects RGB images shaped [batch, 3, height, width]; "
                f"got shape {tuple(images.shape)}.{hint}"
            )
        config = self.config
        x = _to_unit_float(images)
        batch, _, height, width = x.shape
        draw = _draw_per_chunk(lambda n, rand: _draw_visual(config, n, height, width, rand), batch, generator)
        device = x.device

        x = _resized_crop(x, draw.crop, config.size, config.size)
        x = _apply_jitter(x, draw.jitter, _visual_jitter_op)
        x = _blur_selected(x, draw.blur, config.blur_truncate)
        x = torch.where(_to_device(draw.flip, device)[:, None, None, None], x.flip(3), x)
        x = torch.where(_to_device(draw.gray, device)[:, None, None, None], _grayscale(x).expand_as(x), x)
        return normalize_image(x), _to_device(_encode_visual(draw), device)

    def sample_params(
        self,
        batch: int,
        samples: int,
        height: int,
        width: int,
        *,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Parameter vectors from the distributions of ``forward`` for [height, width] inputs,
        without augmenting anything.

        Returns float32 [batch, samples, 18] on ``device`` (default: the generator's device, or
        the CPU). With the same generator state, ``sample_params(B, 1, H, W)[:, 0]`` equals the
        params ``forward`` returns for a [B, 3, H, W] batch.
        """
        _check_count("batch", batch, 0)
        _check_count("samples", samples)
        _check_count("height", height)
        _check_count("width", width)
        draw = _draw_visual(self.config, batch * samples, height, width, _uniform_source(generator))
        params = _encode_visual(draw).view(batch, samples, VISUAL_PARAM_DIM)
        return params if device is None else _to_device(params, torch.device(device))
