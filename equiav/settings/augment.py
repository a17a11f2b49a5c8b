"""The distributions of EquiAV's audio and visual augmentations (method.md section 3), as
plain frozen dataclasses: checked without torch, so a configuration is checked at start-up.
The augmentations themselves are :class:`equiav.augment.AudioAugment` and ``VisualAugment``."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["AudioAugmentConfig", "VisualAugmentConfig"]


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} is a probability and must lie in [0, 1]; got {value!r}")


def _check_interval(name: str, interval: tuple[float, float], *, positive: bool = True) -> None:
    if len(interval) != 2:
        raise ValueError(f"{name} must be a (low, high) pair; got {interval!r}")
    low, high = interval
    if low > high or (positive and low <= 0):
        need = "0 < low <= high" if positive else "low <= high"
        raise ValueError(f"{name} must satisfy {need}; got {interval!r}")


def _check_truncate(truncate: float) -> None:
    if truncate <= 0:
        raise ValueError(f"blur_truncate must be > 0 (kernel radius = ceil(truncate * sigma)); got {truncate!r}")


def _check_jitter_strengths(brightness: float, contrast: float, saturation: float, hue: float) -> None:
    # Factors are drawn from [1 - x, 1 + x]; a negative factor is no colour transform at all.
    for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} jitter strength must lie in [0, 1] (factor in [1 - x, 1 + x]); got {value!r}")
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue jitter strength must lie in [0, 0.5] (a shift in turns); got {hue!r}")


@dataclass(frozen=True)
class AudioAugmentConfig:
    """Distributions of the audio augmentations (method.md section 3; defaults are the paper's).

    Units: ``time_mask`` in frames, ``freq_mask`` in bins, ``crop_ratio`` is freq/time (width over
    height of the crop on the [T, F] plane), ``sigma`` in frames/bins. The blur kernel has radius
    ``ceil(blur_truncate * sigma)``; the default 1.0 is the release's side ``2 * ceil(sigma) + 1``.

    The ``release_*`` switches restore behaviours of the authors' release that this project
    treats as bugs (see docs/augment.md); all default to the fix.
    """

    specaug_p: float = 0.8
    time_mask: int = 192
    freq_mask: int = 48
    time_shift_p: float = 0.8
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (1 / 10, 1.5 / 8)
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    blur_truncate: float = 1.0
    flip_p: float = 0.5
    flip_axis: str = "time"
    release_mask_units: bool = False
    release_crop_axes: bool = False
    release_clamp: bool = False
    release_time_shift: bool = False
    release_coupled_shift: bool = False

    def __post_init__(self) -> None:
        for name in ("specaug_p", "time_shift_p", "jitter_p", "blur_p", "flip_p"):
            _check_probability(name, getattr(self, name))
        for name in ("time_mask", "freq_mask"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} is a maximum mask width and must be an int >= 0; got {value!r}")
        _check_interval("crop_scale", self.crop_scale)
        _check_interval("crop_ratio", self.crop_ratio)
        _check_interval("sigma", self.sigma)
        _check_jitter_strengths(self.brightness, self.contrast, self.saturation, self.hue)
        _check_truncate(self.blur_truncate)
        if self.flip_axis not in ("time", "freq"):
            raise ValueError(f"flip_axis must be 'time' or 'freq' (the release's choice); got {self.flip_axis!r}")


@dataclass(frozen=True)
class VisualAugmentConfig:
    """Distributions of the visual augmentations (method.md section 3; defaults are the paper's).

    ``crop_ratio`` is width/height, ``size`` the output side in pixels, ``sigma`` in output pixels.
    The blur kernel has radius ``ceil(blur_truncate * sigma)``; 3.0 keeps the Gaussian's support
    as PIL's ``GaussianBlur(radius=sigma)`` of the release does (it is not truncated at 1 sigma).
    """

    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    size: int = 224
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    blur_p: float = 0.5
    sigma: tuple[float, float] = (0.1, 2.0)
    blur_truncate: float = 3.0
    flip_p: float = 0.5
    gray_p: float = 0.2

    def __post_init__(self) -> None:
        for name in ("jitter_p", "blur_p", "flip_p", "gray_p"):
            _check_probability(name, getattr(self, name))
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"size is the output side in pixels and must be an int >= 1; got {self.size!r}")
        _check_interval("crop_scale", self.crop_scale)
        _check_interval("crop_ratio", self.crop_ratio)
        _check_interval("sigma", self.sigma)
        _check_jitter_strengths(self.brightness, self.contrast, self.saturation, self.hue)
        _check_truncate(self.blur_truncate)
