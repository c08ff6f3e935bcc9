"""Amplitude harmonization against its formulas."""

import pytest
import torch

from harmofl.amplitude import (
    amplitude_spectrum,
    harmonize,
    image_spectrum,
    low_frequency_mask,
    update_running_amplitude,
    with_amplitude_in_window,
)


def _images(seed: int = 0, shape=(5, 3, 16, 12)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_amplitude_is_abs_of_fft2_per_image_and_channel():
    x = _images()
    expected = torch.stack([torch.stack([torch.fft.fft2(x[b, c]).abs() for c in range(3)]) for b in range(5)])
    torch.testing.assert_close(amplitude_spectrum(x), expected)


def test_dc_only_is_a_per_channel_mean_shift():
    x = _images()
    target = amplitude_spectrum(_images(seed=1)).mean(0)
    height, width = x.shape[-2:]
    expected = x - x.mean(dim=(-2, -1), keepdim=True) + (target[:, 0, 0] / (height * width))[None, :, None, None]
    torch.testing.assert_close(harmonize(x, target, band=0.0), expected, atol=1e-10, rtol=0)


def test_dc_fast_path_equals_the_fft_path_for_either_sign():
    x = _images()
    x[::2] -= 0.75  # these images' channels sum to a negative DC coefficient (phase pi)
    target = amplitude_spectrum(_images(seed=1)).mean(0)
    assert (x.sum(dim=(-2, -1)) < 0).any() and (x.sum(dim=(-2, -1)) > 0).any()
    torch.testing.assert_close(harmonize(x, target, 0.0), _fft_harmonize(x, target), atol=1e-12, rtol=0)


def _fft_harmonize(x, target):
    spectrum = torch.fft.fft2(x)
    dc = torch.polar(target[:, 0, 0].expand(x.shape[0], -1), spectrum[..., 0, 0].angle())
    spectrum[..., 0, 0] = dc
    return torch.fft.ifft2(spectrum).real


def test_full_band_sets_the_amplitude_and_keeps_the_phase():
    x = _images(shape=(4, 3, 16, 16))
    target = amplitude_spectrum(_images(seed=2, shape=(4, 3, 16, 16))).mean(0)
    out = harmonize(x, target, band=0.5)
    spectrum_in, spectrum_out = torch.fft.fft2(x), torch.fft.fft2(out)
    # The output is real, so only a Hermitian-symmetric target is reproduced exactly; the mean amplitude of
    # real images is one.
    torch.testing.assert_close(spectrum_out.abs(), target.expand_as(spectrum_out.real), atol=1e-9, rtol=1e-9)
    keep = spectrum_in.abs() > 1e-6
    phase_difference = torch.angle(spectrum_out[keep] * spectrum_in[keep].conj())
    assert phase_difference.abs().max() < 1e-9


def test_intermediate_band_changes_only_the_window():
    x = _images(shape=(3, 2, 20, 20))
    target = amplitude_spectrum(_images(seed=3, shape=(3, 2, 20, 20))).mean(0)
    band = 0.1  # half-width floor(20 * 0.1) = 2: frequencies -2..2 on both axes
    spectrum_in, spectrum_out = torch.fft.fft2(x), torch.fft.fft2(harmonize(x, target, band))
    mask = low_frequency_mask(20, 20, band)
    assert int(mask.sum()) == 25
    torch.testing.assert_close(spectrum_out[..., ~mask], spectrum_in[..., ~mask], atol=1e-9, rtol=0)
    torch.testing.assert_close(spectrum_out.abs()[..., mask], target[:, mask].expand(3, -1, -1), atol=1e-9, rtol=0)


def test_window_matches_fftshift_centred_square():
    height, width, band = 16, 10, 0.25
    half_h, half_w = int(height * band), int(width * band)
    shifted = torch.zeros(height, width, dtype=torch.bool)
    ch, cw = height // 2, width // 2
    shifted[ch - half_h : ch + half_h + 1, cw - half_w : cw + half_w + 1] = True
    assert torch.equal(low_frequency_mask(height, width, band), torch.fft.ifftshift(shifted))
    assert low_frequency_mask(height, width, 0.5).all()
    dc_only = low_frequency_mask(height, width, 0.0)
    assert dc_only[0, 0] and int(dc_only.sum()) == 1


def test_harmonize_keeps_dtype_and_works_in_float32_and_bfloat16():
    x = torch.rand(2, 3, 8, 8)
    target = amplitude_spectrum(x).mean(0)
    assert harmonize(x, target, 0.5).dtype == torch.float32
    out = harmonize(x.bfloat16(), target, 0.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), harmonize(x, target, 0.0), atol=2e-2, rtol=0)


def test_running_amplitude_is_an_ema_weighted_by_momentum():
    first, second = torch.rand(4, 3, 5, 5), torch.rand(4, 3, 5, 5)
    running = update_running_amplitude(None, first, momentum=0.1)
    torch.testing.assert_close(running, first.mean(0))
    updated = update_running_amplitude(running, second, momentum=0.1)
    torch.testing.assert_close(updated, 0.9 * first.mean(0) + 0.1 * second.mean(0))
    # momentum 0 (the reference code, whose momentum is truncated to an integer): the first batch forever.
    torch.testing.assert_close(update_running_amplitude(running, second, momentum=0.0), first.mean(0))


@pytest.mark.parametrize("band", [-0.1, 0.51])
def test_band_out_of_range_is_rejected(band):
    with pytest.raises(ValueError, match="band must be in"):
        harmonize(torch.rand(1, 1, 4, 4), torch.ones(1, 4, 4), band)


def test_target_of_another_image_size_is_rejected():
    with pytest.raises(ValueError, match="same image size"):
        harmonize(torch.rand(2, 3, 8, 8), torch.ones(3, 4, 4), 0.0)


def _polar_harmonize(x, target, band):
    """The amplitude swap written with the phase: ``polar(target, angle(F))`` inside the window."""
    spectrum = torch.fft.fft2(x)
    mask = low_frequency_mask(x.shape[-2], x.shape[-1], band)
    swapped = torch.polar(target.expand_as(spectrum.real), spectrum.angle())
    return torch.fft.ifft2(torch.where(mask, swapped, spectrum)).real


@pytest.mark.parametrize("band", [0.05, 0.25, 0.5])
def test_scaling_by_target_over_amplitude_is_the_phase_formula(band):
    # F·A/|F| on the half spectrum instead of polar(A, angle F) on the whole one: the same images in float64, and
    # within 1e-5 in float32 (odd and even sides).
    x = _images(shape=(4, 3, 24, 21))
    target = amplitude_spectrum(_images(seed=4, shape=(4, 3, 24, 21))).mean(0)
    torch.testing.assert_close(harmonize(x, target, band), _polar_harmonize(x, target, band), atol=1e-12, rtol=0)
    single = harmonize(x.float(), target.float(), band)
    torch.testing.assert_close(single, _polar_harmonize(x.float(), target.float(), band), atol=1e-5, rtol=0)


def test_a_coefficient_of_amplitude_zero_takes_the_target_with_phase_zero():
    # torch.angle(0) = 0: polar(A, 0) = A; the scaling F·A/|F| would be 0·inf there.
    spectrum = torch.tensor([[[[0.0 + 0.0j, 3.0 + 4.0j], [0.0 + 0.0j, -2.0 + 0.0j]]]], dtype=torch.complex128)
    amplitude = torch.tensor([[[2.0, 10.0], [0.5, 4.0]]], dtype=torch.float64)
    expected = torch.polar(amplitude.expand_as(spectrum.real), spectrum.angle())
    torch.testing.assert_close(with_amplitude_in_window(spectrum, amplitude, 0.5), expected, atol=1e-12, rtol=0)


def test_a_given_spectrum_replaces_the_forward_fft():
    x = _images(shape=(2, 3, 16, 16))
    target = amplitude_spectrum(_images(seed=5, shape=(2, 3, 16, 16))).mean(0)
    assert torch.equal(harmonize(x, target, 0.5, image_spectrum(x)), harmonize(x, target, 0.5))
