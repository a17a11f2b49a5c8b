"""The augmentations apply exactly what their parameter vectors say (method.md section 3).

Each transform is isolated by setting the other probabilities to 0 and, where the always-on
random resized crop would get in the way, making the crop the identity (scale 1, aspect ratio of
the input). References are torch / torchvision functional ops applied to one sample at a time.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from equiav import augment as A
from equiav.augment import (
    AUDIO_PARAM_DIM,
    IMAGENET_MEAN,
    IMAGENET_STD,
    VISUAL_PARAM_DIM,
    AudioAugment,
    AudioAugmentConfig,
    VisualAugment,
    VisualAugmentConfig,
    normalize_image,
)
from equiav.train.data import DeviceAugmenter

T, F = 64, 16  # a small spectrogram: time frames x frequency bins
B = 12


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def audio_config(**overrides) -> AudioAugmentConfig:
    """Every random audio augmentation off and the crop the identity, unless overridden."""
    base = dict(
        specaug_p=0.0,
        time_shift_p=0.0,
        crop_scale=(1.0, 1.0),
        crop_ratio=(F / T, F / T),
        jitter_p=0.0,
        blur_p=0.0,
        flip_p=0.0,
    )
    base.update(overrides)
    return AudioAugmentConfig(**base)


def visual_config(size: int = 24, **overrides) -> VisualAugmentConfig:
    """Every random visual augmentation off and the crop the identity on [size, size] inputs."""
    base = dict(
        size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0, blur_p=0.0, flip_p=0.0, gray_p=0.0
    )
    base.update(overrides)
    return VisualAugmentConfig(**base)


def spectrograms(seed: int = 1, batch: int = B) -> torch.Tensor:
    # Shifted away from 0 so that masked (zeroed) cells are unambiguous.
    return torch.randn(batch, T, F, generator=seeded(seed)) + 5.0


def images(seed: int = 1, batch: int = B, height: int = 24, width: int = 24) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=seeded(seed))


def denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return x * std + mean


def as_int(value: torch.Tensor) -> int:
    return int(torch.round(value).item())


# --------------------------------------------------------------------------------------------
# Audio
# --------------------------------------------------------------------------------------------


def test_all_off_is_identity_with_the_documented_vector():
    x = spectrograms()
    out, params = AudioAugment(audio_config())(x, seeded())
    assert torch.equal(out, x)
    expected = torch.zeros(AUDIO_PARAM_DIM)
    expected[7] = 1.0  # crop flag
    expected[10:12] = 1.0  # full-height, full-width crop
    expected[13:17] = torch.tensor([0.0, 1.0, 2.0, 3.0])  # jitter order when off
    assert params.dtype == torch.float32
    assert torch.equal(params, expected.expand(B, -1))


def test_time_mask_zeroes_exactly_the_recorded_frames():
    x = spectrograms()
    out, params = AudioAugment(audio_config(specaug_p=1.0, time_mask=T // 2, freq_mask=0))(x, seeded())
    assert (params[:, 0] == 1).all()
    assert torch.equal(params[:, 3], params[:, 4])  # zero-width frequency mask
    widths = []
    for i in range(B):
        start, end = as_int(params[i, 1] * T), as_int(params[i, 2] * T)
        expected = x[i].clone()
        expected[start:end] = 0.0
        assert torch.equal(out[i], expected)
        widths.append(end - start)
    assert 0 < max(widths) < T // 2


def test_frequency_mask_zeroes_exactly_the_recorded_bins():
    x = spectrograms()
    out, params = AudioAugment(audio_config(specaug_p=1.0, time_mask=0, freq_mask=F // 2))(x, seeded())
    assert torch.equal(params[:, 1], params[:, 2])
    widths = []
    for i in range(B):
        start, end = as_int(params[i, 3] * F), as_int(params[i, 4] * F)
        expected = x[i].clone()
        expected[:, start:end] = 0.0
        assert torch.equal(out[i], expected)
        widths.append(end - start)
    assert 0 < max(widths) < F // 2


def test_time_mask_wider_than_the_input_is_clipped_to_it():
    x = spectrograms()
    out, params = AudioAugment(audio_config(specaug_p=1.0, time_mask=10 * T, freq_mask=0))(x, seeded())
    assert ((params[:, 2] - params[:, 1]) * T < T).all()
    assert (params[:, 2] <= 1.0).all()
    assert (out == 0).any()


def test_release_mask_units_records_raw_indices():
    fixed = AudioAugment(audio_config(specaug_p=1.0, time_mask=T // 2, freq_mask=F // 2))
    release = AudioAugment(dataclasses.replace(fixed.config, release_mask_units=True))
    x = spectrograms()
    out_fixed, p_fixed = fixed(x, seeded(3))
    out_release, p_release = release(x, seeded(3))
    assert torch.equal(out_fixed, out_release)
    torch.testing.assert_close(p_release[:, 1:3], p_fixed[:, 1:3] * T)
    torch.testing.assert_close(p_release[:, 3:5], p_fixed[:, 3:5] * F)
    assert p_release[:, 1:5].max() > 1.0
    assert torch.equal(p_release[:, 5:], p_fixed[:, 5:])


def test_time_shift_is_a_circular_shift_along_time():
    x = spectrograms()
    out, params = AudioAugment(audio_config(time_shift_p=1.0))(x, seeded())
    assert (params[:, 5] == 1).all()
    shifts = [as_int(params[i, 6] * T) for i in range(B)]
    for i, shift in enumerate(shifts):
        assert torch.equal(out[i], torch.roll(x[i], shift, dims=0))
    assert all(-T <= s < T for s in shifts)
    assert any(s % T != 0 for s in shifts)


def test_release_time_shift_fills_the_slots_but_shifts_nothing():
    x = spectrograms()
    out, params = AudioAugment(audio_config(time_shift_p=1.0, release_time_shift=True))(x, seeded())
    assert torch.equal(out, x)
    assert (params[:, 5] == 1).all()
    assert (params[:, 6] != 0).any()


def test_release_coupled_shift_follows_specaugment():
    augment = AudioAugment(AudioAugmentConfig(release_coupled_shift=True))
    params = augment.sample_params(200, 4, T, F, generator=seeded())
    assert torch.equal(params[..., 5], params[..., 0])
    assert 0.0 < params[..., 5].mean() < 1.0
    independent = AudioAugment().sample_params(200, 4, T, F, generator=seeded())
    assert not torch.equal(independent[..., 5], independent[..., 0])


def test_crop_equals_torchvision_resized_crop_of_the_recorded_box():
    x = spectrograms()
    config = audio_config(crop_scale=(0.08, 1.0), crop_ratio=(1 / 10, 1.5 / 8))
    out, params = AudioAugment(config)(x, seeded())
    assert (params[:, 7] == 1).all()
    boxes = set()
    for i in range(B):
        top, left = as_int(params[i, 8] * T), as_int(params[i, 9] * F)
        height, width = as_int(params[i, 10] * T), as_int(params[i, 11] * F)
        assert 0 <= top and top + height <= T and 0 <= left and left + width <= F
        ref = TF.resized_crop(x[i][None], top, left, height, width, size=[T, F], antialias=False)[0]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
        boxes.add((top, left, height, width))
    assert len(boxes) > 1 and (0, 0, T, F) not in boxes


def test_release_crop_axes_divides_by_the_other_axis():
    config = audio_config(crop_scale=(0.08, 1.0), crop_ratio=(1 / 10, 1.5 / 8))
    x = spectrograms()
    out_fixed, p_fixed = AudioAugment(config)(x, seeded(5))
    out_release, p_release = AudioAugment(dataclasses.replace(config, release_crop_axes=True))(x, seeded(5))
    assert torch.equal(out_fixed, out_release)
    scale = torch.tensor([T / F, F / T, T / F, F / T])
    torch.testing.assert_close(p_release[:, 8:12], p_fixed[:, 8:12] * scale)


def _torchvision_crop_params(image: torch.Tensor, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    return RandomResizedCrop.get_params(image, scale=[0.08, 1.0], ratio=list(ratio))


def test_crop_fallback_is_torchvisions_centre_crop():
    # No candidate box of ratio 3/4..4/3 fits a 1 x 100 plane: every draw falls back.
    boxes = A._draw_crop_boxes(A._uniform_source(seeded()), 50, 1, 100, (0.08, 1.0), (3 / 4, 4 / 3))
    expected = _torchvision_crop_params(torch.empty(1, 1, 100), (3 / 4, 4 / 3))
    assert expected == (0, 49, 1, 1)
    assert (boxes == torch.tensor(expected)).all()


def test_crop_keeps_the_first_candidate_that_fits():
    # Scripted uniforms on a 40 x 40 plane, scale (0, 1] (area = u * 1600), ratio 1/4..4
    # (u = 0.5 is ratio 1, u -> 1 ratio 4). Attempt 0: area 1600 at ratio 4, w = 80, rejected.
    # Attempt 1: area 400 at ratio 1, 20 x 20, fits. Later attempts (28 x 28) fit too.
    candidates = iter([[1.0 - 1e-12, 0.25] + [0.5] * 8, [1.0 - 1e-12, 0.5] + [0.5] * 8])

    def scripted(*shape: int) -> torch.Tensor:
        if shape == (1, A._CROP_ATTEMPTS):
            return torch.tensor([next(candidates)], dtype=torch.float64)
        return torch.full(shape, 0.5, dtype=torch.float64)  # top and left

    box = A._draw_crop_boxes(scripted, 1, 40, 40, (1e-9, 1.0), (1 / 4, 4.0))[0].tolist()
    assert box == [10, 10, 20, 20]  # top = floor(0.5 * (40 - 20 + 1))


def test_crop_sampling_matches_torchvision_in_distribution():
    n = 1500
    ours = AudioAugment().sample_params(n, 1, 1024, 128, generator=seeded())[:, 0, 8:12]
    plane = torch.empty(1, 1024, 128)
    with torch.random.fork_rng():  # get_params draws from the global generator
        torch.manual_seed(0)
        boxes = [_torchvision_crop_params(plane, (1 / 10, 1.5 / 8)) for _ in range(n)]
    ref = torch.tensor(boxes, dtype=torch.float32) / torch.tensor([1024.0, 128.0, 1024.0, 128.0])
    torch.testing.assert_close(ours.mean(0), ref.mean(0), rtol=0, atol=0.03)
    torch.testing.assert_close(ours.std(0), ref.std(0), rtol=0, atol=0.03)


def _audio_jitter_reference(x: torch.Tensor, order: list[int], factors: list[float], clamp: bool) -> torch.Tensor:
    for op in order:
        if op == 0:
            x = x * factors[0]
        elif op == 1:
            x = factors[1] * x + (1 - factors[1]) * x.mean()
        if clamp:
            x = x.clamp(0, 1)
    return x


def test_audio_jitter_scales_as_recorded_without_clamping():
    x = torch.randn(B, T, F, generator=seeded(2)) * 3.0 + 0.5
    out, params = AudioAugment(audio_config(jitter_p=1.0))(x, seeded())
    assert (params[:, 12] == 1).all()
    for i in range(B):
        order = [as_int(v) for v in params[i, 13:17]]
        assert sorted(order) == [0, 1, 2, 3]
        factors = (params[i, 17:21] + torch.tensor([1.0, 1.0, 1.0, 0.0])).tolist()
        ref = _audio_jitter_reference(x[i], order, factors, clamp=False)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, x)
    assert out.min() < -1.0 and out.max() > 2.0  # nothing clamped to [0, 1]


def test_release_clamp_clamps_after_every_jitter_operation():
    x = torch.randn(B, T, F, generator=seeded(2)) * 0.5 + 0.5
    out, params = AudioAugment(audio_config(jitter_p=1.0, release_clamp=True))(x, seeded())
    assert out.min() >= 0.0 and out.max() <= 1.0
    for i in range(B):
        order = [as_int(v) for v in params[i, 13:17]]
        factors = (params[i, 17:21] + torch.tensor([1.0, 1.0, 1.0, 0.0])).tolist()
        ref = _audio_jitter_reference(x[i], order, factors, clamp=True)
        torch.testing.assert_close(out[i], ref, rtol=1e-5, atol=1e-5)


def test_audio_blur_equals_torchvision_with_side_2_ceil_sigma_plus_1():
    x = torch.randn(B, T, F, generator=seeded(2))
    out, params = AudioAugment(audio_config(blur_p=1.0))(x, seeded())
    assert (params[:, 21] == 1).all()
    sides = set()
    for i in range(B):
        sigma = params[i, 22].item()
        assert 0.1 <= sigma <= 2.0
        side = 2 * math.ceil(sigma) + 1
        sides.add(side)
        ref = TF.gaussian_blur(x[i][None], [side, side], [sigma, sigma])[0]
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5)
    assert sides == {3, 5}


def test_batched_blur_equals_blurring_each_sample_alone():
    x = torch.randn(6, 1, T, F, generator=seeded(2))
    sigma = torch.tensor([0.1, 0.7, 1.0, 1.01, 1.9, 2.0])
    for truncate in (1.0, 3.0):
        batched = A._gaussian_blur(x, sigma, truncate)
        for i in range(6):
            assert torch.equal(batched[i], A._gaussian_blur(x[i : i + 1], sigma[i : i + 1], truncate)[0])


@pytest.mark.parametrize("axis,dim", [("time", 0), ("freq", 1)])
def test_flip_reverses_the_chosen_axis(axis: str, dim: int):
    x = spectrograms()
    out, params = AudioAugment(audio_config(flip_p=0.5, flip_axis=axis))(x, seeded())
    flipped = params[:, 23] == 1
    assert 0 < flipped.sum() < B
    for i in range(B):
        assert torch.equal(out[i], x[i].flip(dim) if flipped[i] else x[i])


def test_full_audio_pipeline_matches_a_per_sample_reference():
    """All transforms on, composed in the documented order from the recorded parameters."""
    x = torch.randn(B, T, F, generator=seeded(7))
    augment = AudioAugment(AudioAugmentConfig(time_mask=T // 2, freq_mask=F // 2))
    out, params = augment(x, seeded(8))
    for i in range(B):
        p = params[i]
        y = x[i].clone()
        if p[0]:
            y[as_int(p[1] * T) : as_int(p[2] * T)] = 0.0
            y[:, as_int(p[3] * F) : as_int(p[4] * F)] = 0.0
        if p[5]:
            y = torch.roll(y, as_int(p[6] * T), dims=0)
        box = [as_int(p[8] * T), as_int(p[9] * F), as_int(p[10] * T), as_int(p[11] * F)]
        y = TF.resized_crop(y[None], *box, size=[T, F], antialias=False)[0]
        if p[12]:
            order = [as_int(v) for v in p[13:17]]
            y = _audio_jitter_reference(y, order, (p[17:21] + torch.tensor([1.0, 1.0, 1.0, 0.0])).tolist(), clamp=False)
        if p[21]:
            side = 2 * math.ceil(p[22].item()) + 1
            y = TF.gaussian_blur(y[None], [side, side], [p[22].item()] * 2)[0]
        if p[23]:
            y = y.flip(0)
        torch.testing.assert_close(out[i], y, rtol=1e-4, atol=1e-4)


def test_audio_slots_are_zero_where_not_applied():
    params = AudioAugment().sample_params(500, 8, T, F, generator=seeded()).view(-1, AUDIO_PARAM_DIM)
    off = params[:, 0] == 0
    assert (params[off, 1:5] == 0).all()
    assert (params[params[:, 5] == 0, 6] == 0).all()
    jitter_off = params[:, 12] == 0
    assert (params[jitter_off, 13:17] == torch.tensor([0.0, 1.0, 2.0, 3.0])).all()
    assert (params[jitter_off, 17:21] == 0).all()
    assert (params[params[:, 21] == 0, 22] == 0).all()
    assert off.any() and jitter_off.any() and (params[:, 21] == 0).any()


def test_audio_sample_params_distributions():
    n = 4000
    params = AudioAugment().sample_params(n // 16, 16, 1024, 128, generator=seeded()).view(-1, AUDIO_PARAM_DIM)
    assert params.shape == (n, AUDIO_PARAM_DIM) and params.dtype == torch.float32
    for slot, p in ((0, 0.8), (5, 0.8), (7, 1.0), (12, 0.8), (21, 0.5), (23, 0.5)):
        assert abs(params[:, slot].mean().item() - p) < 0.04, slot
    on = params[:, 0] == 1
    time_width = (params[on, 2] - params[on, 1]) * 1024
    freq_width = (params[on, 4] - params[on, 3]) * 128
    assert time_width.min() >= 0 and time_width.max() < 192 and abs(time_width.mean() - 95.5) < 6
    assert freq_width.min() >= 0 and freq_width.max() < 48 and abs(freq_width.mean() - 23.5) < 2
    assert (params[on, 2] <= 1).all() and (params[on, 4] <= 1).all()
    shift = params[params[:, 5] == 1, 6]
    assert shift.min() >= -1 and shift.max() < 1 and abs(shift.mean()) < 0.05
    assert (params[:, 8] + params[:, 10] <= 1 + 1e-6).all() and (params[:, 9] + params[:, 11] <= 1 + 1e-6).all()
    assert (params[:, 10] > 0).all() and (params[:, 11] > 0).all()
    jitter = params[params[:, 12] == 1]
    assert (jitter[:, 13:17].sort(dim=1).values == torch.arange(4.0)).all()
    assert abs((jitter[:, 13] == 3).float().mean() - 0.25) < 0.04  # a uniform permutation
    assert jitter[:, 17:20].min() >= -0.4 and jitter[:, 17:20].max() <= 0.4
    assert jitter[:, 20].abs().max() <= 0.1 and jitter[:, 17:21].abs().mean() > 0.03
    sigma = params[params[:, 21] == 1, 22]
    assert sigma.min() >= 0.1 and sigma.max() <= 2.0 and abs(sigma.mean() - 1.05) < 0.06


def test_sample_params_are_forwards_params_without_touching_data():
    augment = AudioAugment()
    x = torch.randn(B, T, F)
    _, forward_params = augment(x, seeded(11))
    assert torch.equal(augment.sample_params(B, 1, T, F, generator=seeded(11))[:, 0], forward_params)
    # A 10^7 x 10^7 plane could not be allocated: sample_params only draws numbers.
    huge = augment.sample_params(2, 16, 10**7, 10**7, generator=seeded())
    assert huge.shape == (2, 16, AUDIO_PARAM_DIM) and torch.isfinite(huge).all()


def test_audio_is_deterministic_under_a_seeded_generator():
    augment = AudioAugment()
    x = torch.randn(4, T, F)
    out1, p1 = augment(x, seeded(3))
    out2, p2 = augment(x, seeded(3))
    out3, p3 = augment(x, seeded(4))
    assert torch.equal(out1, out2) and torch.equal(p1, p2)
    assert not torch.equal(p1, p3)


def test_one_generator_per_chunk_equals_augmenting_each_chunk_alone():
    audio_config = dataclasses.replace(AudioAugmentConfig(), jitter_p=0.7, blur_p=0.6)
    visual = VisualAugment(VisualAugmentConfig(size=16, jitter_p=0.7, blur_p=0.6))  # random crops too
    for augment, x in ((AudioAugment(audio_config), torch.randn(12, T, F)), (visual, images(batch=12))):
        whole, whole_params = augment(x, [seeded(seed) for seed in (5, 6, 7)])
        chunks = [augment(x[4 * i : 4 * i + 4], seeded(seed)) for i, seed in enumerate((5, 6, 7))]
        # Blur kernels padded to the batch's widest add exact zeros: equal bit for bit.
        assert torch.equal(whole, torch.cat([out for out, _ in chunks]))
        assert torch.equal(whole_params, torch.cat([params for _, params in chunks]))
        with pytest.raises(ValueError, match="cannot be split into 5 equal chunks"):
            augment(x, [seeded(seed) for seed in range(5)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_audio_batch_of_one_keeps_dtype_and_shape(dtype: torch.dtype):
    x = torch.randn(1, 1024, 128, dtype=dtype)
    out, params = AudioAugment()(x)
    assert out.shape == x.shape and out.dtype == dtype and params.shape == (1, AUDIO_PARAM_DIM)
    assert torch.isfinite(out).all()


def test_audio_rejects_bad_inputs_and_configs():
    augment = AudioAugment()
    with pytest.raises(ValueError, match=r"\[batch, time, freq\].*\(1024, 128\).*unsqueeze"):
        augment(torch.zeros(1024, 128))
    with pytest.raises(TypeError, match="torch.int64"):
        augment(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="specaug_p.*1.5"):
        AudioAugmentConfig(specaug_p=1.5)
    with pytest.raises(ValueError, match="flip_axis.*'channel'"):
        AudioAugmentConfig(flip_axis="channel")
    with pytest.raises(ValueError, match=r"crop_scale.*\(1.0, 0.5\)"):
        AudioAugmentConfig(crop_scale=(1.0, 0.5))
    with pytest.raises(ValueError, match="samples.*0"):
        augment.sample_params(2, 0, T, F)


# --------------------------------------------------------------------------------------------
# Visual
# --------------------------------------------------------------------------------------------


def test_visual_all_off_is_normalisation_only():
    x = images()
    out, params = VisualAugment(visual_config())(x, seeded())
    torch.testing.assert_close(out, TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD)), rtol=0, atol=1e-6)
    expected = torch.zeros(VISUAL_PARAM_DIM)
    expected[0] = 1.0
    expected[3:5] = 1.0
    expected[6:10] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    assert torch.equal(params, expected.expand(B, -1))


def test_uint8_images_are_scaled_to_unit_range():
    x = (images() * 255).round().to(torch.uint8)
    out_uint8, _ = VisualAugment(visual_config())(x, seeded())
    out_float, _ = VisualAugment(visual_config())(x.float() / 255, seeded())
    assert out_uint8.dtype == torch.float32
    torch.testing.assert_close(out_uint8, out_float)
    torch.testing.assert_close(normalize_image(x), normalize_image(x.float() / 255))


def test_visual_crop_equals_torchvision_resized_crop_of_the_recorded_box():
    height, width, size = 40, 56, 24  # non-square, and both up- and down-scaling
    x = images(height=height, width=width)
    config = visual_config(size=size, crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))
    out, params = VisualAugment(config)(x, seeded())
    for i in range(B):
        top, left = as_int(params[i, 1] * height), as_int(params[i, 2] * width)
        box_h, box_w = as_int(params[i, 3] * height), as_int(params[i, 4] * width)
        assert top + box_h <= height and left + box_w <= width
        assert 3 / 4 - 0.1 < box_w / box_h < 4 / 3 + 0.1
        ref = TF.resized_crop(x[i], top, left, box_h, box_w, size=[size, size], antialias=False)
        torch.testing.assert_close(denormalize(out[i]), ref, rtol=0, atol=1e-5)


_TORCHVISION_JITTER = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)


def _visual_jitter_reference(x: torch.Tensor, order: list[int], params: torch.Tensor) -> torch.Tensor:
    factors = (params + torch.tensor([1.0, 1.0, 1.0, 0.0])).tolist()
    for op in order:
        x = _TORCHVISION_JITTER[op](x, factors[op])
    return x


def test_visual_jitter_applies_torchvision_ops_in_the_recorded_order():
    x = images()
    out, params = VisualAugment(visual_config(jitter_p=1.0))(x, seeded())
    order_mattered = 0
    for i in range(B):
        order = [as_int(v) for v in params[i, 6:10]]
        ref = _visual_jitter_reference(x[i], order, params[i, 10:14])
        torch.testing.assert_close(denormalize(out[i]), ref, rtol=0, atol=1e-5)
        reversed_ref = _visual_jitter_reference(x[i], order[::-1], params[i, 10:14])
        if (reversed_ref - ref).abs().max() > 1e-3:
            order_mattered += 1
    assert order_mattered > 0


def test_visual_blur_equals_torchvision_with_radius_ceil_3_sigma():
    x = images()
    out, params = VisualAugment(visual_config(blur_p=1.0))(x, seeded())
    for i in range(B):
        sigma = params[i, 15].item()
        side = 2 * math.ceil(3 * sigma) + 1
        ref = TF.gaussian_blur(x[i], [side, side], [sigma, sigma])
        torch.testing.assert_close(denormalize(out[i]), ref, rtol=0, atol=1e-5)
    assert (params[:, 14] == 1).all()


def test_visual_flip_is_horizontal_and_grayscale_is_luma():
    x = images()
    out, params = VisualAugment(visual_config(flip_p=0.5, gray_p=0.5))(x, seeded(2))
    flipped, gray = params[:, 16] == 1, params[:, 17] == 1
    assert 0 < flipped.sum() < B and 0 < gray.sum() < B
    for i in range(B):
        ref = TF.horizontal_flip(x[i]) if flipped[i] else x[i]
        if gray[i]:
            ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
        torch.testing.assert_close(denormalize(out[i]), ref, rtol=0, atol=1e-6)


def test_full_visual_pipeline_matches_torchvision_per_sample():
    height, width, size = 32, 40, 24
    x = images(height=height, width=width)
    out, params = VisualAugment(VisualAugmentConfig(size=size))(x, seeded(9))
    for i in range(B):
        p = params[i]
        box = [as_int(p[1] * height), as_int(p[2] * width), as_int(p[3] * height), as_int(p[4] * width)]
        y = TF.resized_crop(x[i], *box, size=[size, size], antialias=False)
        if p[5]:
            y = _visual_jitter_reference(y, [as_int(v) for v in p[6:10]], p[10:14])
        if p[14]:
            side = 2 * math.ceil(3 * p[15].item()) + 1
            y = TF.gaussian_blur(y, [side, side], [p[15].item()] * 2)
        if p[16]:
            y = TF.horizontal_flip(y)
        if p[17]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        y = TF.normalize(y, list(IMAGENET_MEAN), list(IMAGENET_STD))
        torch.testing.assert_close(out[i], y, rtol=0, atol=1e-4)


def test_visual_sample_params_distributions_and_zero_slots():
    augment = VisualAugment()
    params = augment.sample_params(250, 16, 224, 224, generator=seeded()).view(-1, VISUAL_PARAM_DIM)
    for slot, p in ((0, 1.0), (5, 0.8), (14, 0.5), (16, 0.5), (17, 0.2)):
        assert abs(params[:, slot].mean().item() - p) < 0.04, slot
    assert (params[:, 1] + params[:, 3] <= 1 + 1e-6).all() and (params[:, 2] + params[:, 4] <= 1 + 1e-6).all()
    area = params[:, 3] * params[:, 4]
    assert area.min() > 0.07 and area.max() <= 1.0
    jitter_off = params[:, 5] == 0
    assert (params[jitter_off, 6:10] == torch.arange(4.0)).all() and (params[jitter_off, 10:14] == 0).all()
    assert (params[params[:, 14] == 0, 15] == 0).all()
    x = images(height=30, width=50)
    _, forward_params = augment(x, seeded(4))
    assert torch.equal(augment.sample_params(B, 1, 30, 50, generator=seeded(4))[:, 0], forward_params)


def test_visual_is_deterministic_and_handles_a_batch_of_one():
    augment = VisualAugment(VisualAugmentConfig(size=32))
    x = images(batch=1, height=48, width=40)
    out1, p1 = augment(x, seeded(5))
    out2, p2 = augment(x, seeded(5))
    assert out1.shape == (1, 3, 32, 32) and p1.shape == (1, VISUAL_PARAM_DIM)
    assert torch.equal(out1, out2) and torch.equal(p1, p2)


def test_visual_rejects_bad_inputs_and_configs():
    augment = VisualAugment()
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\].*\(3, 24, 24\).*unsqueeze"):
        augment(torch.zeros(3, 24, 24))
    with pytest.raises(ValueError, match=r"\(2, 1, 24, 24\)"):
        augment(torch.zeros(2, 1, 24, 24))
    with pytest.raises(TypeError, match="torch.int32"):
        augment(torch.zeros(2, 3, 24, 24, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, height, width\]"):
        normalize_image(torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="gray_p.*-0.1"):
        VisualAugmentConfig(gray_p=-0.1)
    with pytest.raises(ValueError, match="hue.*0.7"):
        VisualAugmentConfig(hue=0.7)


def test_normalize_image_accepts_extra_leading_dims():
    frames = torch.rand(2, 10, 3, 8, 8)
    out = normalize_image(frames)
    torch.testing.assert_close(out[1, 3], TF.normalize(frames[1, 3], list(IMAGENET_MEAN), list(IMAGENET_STD)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_with_a_cpu_generator():
    x_audio, x_visual = torch.randn(4, T, F), images(batch=4)
    visual = VisualAugment(visual_config(jitter_p=1.0, blur_p=0.5, flip_p=0.5))
    for augment, x in ((AudioAugment(), x_audio), (visual, x_visual)):
        out_cpu, p_cpu = augment(x, seeded(1))
        out_gpu, p_gpu = augment(x.cuda(), seeded(1))
        assert out_gpu.is_cuda and p_gpu.is_cuda
        torch.testing.assert_close(p_gpu.cpu(), p_cpu)
        torch.testing.assert_close(out_gpu.cpu(), out_cpu, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_augmenting_on_cuda_never_waits_for_the_device():
    augment_audio = AudioAugment(dataclasses.replace(AudioAugmentConfig(), jitter_p=1.0, blur_p=1.0))
    augment_visual = VisualAugment(VisualAugmentConfig(size=16, jitter_p=1.0, blur_p=1.0))
    x_audio, x_visual = torch.randn(8, T, F, device="cuda"), images(batch=8).cuda()
    augment_audio(x_audio, seeded(0)), augment_visual(x_visual, seeded(0))  # allocator warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host <-> device synchronisation raises
    try:
        augment_audio(x_audio, [seeded(1), seeded(2)])
        augment_visual(x_visual, [seeded(1), seeded(2)])
        augment_audio.sample_params(8, 16, T, F, generator=seeded(3), device="cuda")
        # The trainer's path: per-chunk generators, one call per modality on the whole batch.
        augmenter = DeviceAugmenter(seed=0, image_size=16, centroid_samples=16, chunk=2, device=torch.device("cuda"))
        augmenter({"fbank": x_audio, "frames": (x_visual * 255).to(torch.uint8)}, step=1, offset=0)
    finally:
        torch.cuda.set_sync_debug_mode("default")
