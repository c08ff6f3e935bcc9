"""Fourier amplitude harmonization (HarmoFL's answer to local drift), in plain torch.

An image ``x`` is ``F(x) = A(x)·exp(i·P(x))``. Harmonization replaces the amplitude ``A``
inside a centred low-frequency window by a target amplitude and keeps the image's own phase
``P``, so that images of every site share the low-frequency "style" (stain, brightness,
contrast) while keeping their content. Everything here is batched over images and channels
and runs on the batch's own device.

The window is given by ``band`` in ``[0, 0.5]``: frequencies ``|k_h| <= floor(H·band)`` and
``|k_w| <= floor(W·band)`` are replaced. ``band=0`` replaces the DC coefficient only (what the
reference code runs: a per-channel mean shift); ``band=0.5`` replaces the whole spectrum (the
paper's description). For square images this is the reference's ``floor(min(H, W)·L)``
half-width after ``fftshift``. Only the window of a target is ever read: a target is kept and exchanged as its
window (:func:`crop_window`, ``[C, 1, 1]`` for ``band=0``) and expanded for :func:`harmonize`
(:func:`expand_window`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

MAX_BAND = 0.5


def check_images(images: Tensor) -> None:
    """Refuse anything but a batch of images ``[B, C, H, W]``."""
    if images.ndim != 4:
        raise ValueError(f"Expected images of shape [B, C, H, W], got shape {tuple(images.shape)}.")


def check_band(band: float) -> float:
    if not 0.0 <= band <= MAX_BAND:
        raise ValueError(
            f"band must be in [0, {MAX_BAND}] (0 = DC coefficient only, {MAX_BAND} = full spectrum), got {band}."
        )
    return float(band)


def amplitude_spectrum(images: Tensor) -> Tensor:
    """``|FFT2|`` of every image and channel, in float32 (or float64 for float64 input), unshifted."""
    check_images(images)
    return torch.fft.fft2(fft_precision(images)).abs()


def low_frequency_mask(height: int, width: int, band: float, device: torch.device | None = None) -> Tensor:
    """Boolean ``[H, W]`` mask of the centred low-frequency window, in unshifted FFT layout."""
    check_band(band)
    rows = _integer_frequencies(height, device).abs() <= int(height * band)
    cols = _integer_frequencies(width, device).abs() <= int(width * band)
    return rows[:, None] & cols[None, :]


def window_indices(size: int, band: float, device: torch.device | None = None) -> Tensor:
    """The frequency indices of one axis of ``size`` that lie in the ``band`` window, in unshifted FFT order."""
    check_band(band)
    return torch.nonzero(_integer_frequencies(size, device).abs() <= int(size * band)).flatten()


def window_shape(image_shape: Sequence[int], band: float) -> tuple[int, int, int]:
    """The shape ``[C, h, w]`` of the ``band`` window of images of ``image_shape`` ``[C, H, W]`` (``[C, 1, 1]`` for
    the DC coefficient only, ``[C, H, W]`` for the whole spectrum)."""
    check_band(band)
    channels, height, width = image_shape
    # Counted, not listed: a size claimed by an untrusted site must not allocate anything.
    return channels, min(height, 2 * int(height * band) + 1), min(width, 2 * int(width * band) + 1)


def crop_window(amplitude: Tensor, band: float) -> Tensor:
    """The coefficients of ``amplitude`` (``[..., H, W]``, unshifted) inside the ``band`` window: ``[..., h, w]``,
    in unshifted order. All that :func:`harmonize` reads of a target."""
    rows = window_indices(amplitude.shape[-2], band, amplitude.device)
    cols = window_indices(amplitude.shape[-1], band, amplitude.device)
    return amplitude.index_select(-2, rows).index_select(-1, cols)


def expand_window(window: Tensor, image_shape: Sequence[int], band: float) -> Tensor:
    """A ``[C, H, W]`` target amplitude whose ``band`` window holds ``window`` (from :func:`crop_window`) and whose
    other coefficients, which :func:`harmonize` never reads, are 0."""
    expected = window_shape(image_shape, band)
    if tuple(window.shape) != expected:
        raise ValueError(
            f"Amplitude window shape {tuple(window.shape)} does not fit images {tuple(image_shape)} with band={band}: "
            f"expected {expected}. Every client must use the same image size, channels and band."
        )
    channels, height, width = image_shape
    rows, cols = window_indices(height, band, window.device), window_indices(width, band, window.device)
    target = window.new_zeros((channels, height, width))
    target[:, rows[:, None], cols[None, :]] = window
    return target


def harmonize(images: Tensor, target_amplitude: Tensor, band: float) -> Tensor:
    """Replace the amplitude of ``images`` inside the ``band`` window by ``target_amplitude``, keeping phase.

    Args:
        images: ``[B, C, H, W]`` real images.
        target_amplitude: ``[C, H, W]`` amplitude spectrum (unshifted, as :func:`amplitude_spectrum` gives).
        band: window half-width ratio in ``[0, 0.5]``.

    Returns:
        The harmonized images, same shape and dtype as ``images``.
    """
    check_images(images)
    if target_amplitude.shape != images.shape[1:]:
        raise ValueError(
            f"Target amplitude shape {tuple(target_amplitude.shape)} does not match the images' "
            f"[C, H, W] = {tuple(images.shape[1:])}: every client must use the same image size and channels."
        )
    check_band(band)
    height, width = images.shape[-2:]
    if int(height * band) == 0 and int(width * band) == 0:
        return _harmonize_dc(images, target_amplitude)
    spectrum = torch.fft.fft2(fft_precision(images))
    target = target_amplitude.to(device=images.device, dtype=spectrum.real.dtype)
    return torch.fft.ifft2(with_amplitude_in_window(spectrum, target, band)).real.to(images.dtype)


def with_amplitude_in_window(spectrum: Tensor, amplitude: Tensor, band: float) -> Tensor:
    """``spectrum`` (``[B, C, H, W]``, unshifted) whose amplitude inside the ``band`` window is ``amplitude``
    (broadcast to it), its phase kept everywhere; outside the window the spectrum is unchanged."""
    mask = low_frequency_mask(spectrum.shape[-2], spectrum.shape[-1], band, spectrum.device)
    swapped = torch.polar(amplitude.expand_as(spectrum.real), spectrum.angle())
    return torch.where(mask, swapped, spectrum)


def _harmonize_dc(images: Tensor, target_amplitude: Tensor) -> Tensor:
    """The DC-only window without an FFT: the DC coefficient is the channel's sum (a real number of phase 0
    or π), so replacing its amplitude is a per-channel shift of ``(±target_dc - sum) / (H·W)``."""
    values = fft_precision(images)
    total = values.sum(dim=(-2, -1), keepdim=True)
    target_dc = target_amplitude[:, :1, :1].to(device=images.device, dtype=values.dtype)
    new_dc = torch.where(total < 0, -target_dc, target_dc)
    return (values + (new_dc - total) / (images.shape[-2] * images.shape[-1])).to(images.dtype)


def update_running_amplitude(running: Tensor | None, batch_amplitude: Tensor, momentum: float) -> Tensor:
    """Exponential moving average of the mean amplitude: ``(1 - m)·running + m·mean_batch``.

    ``momentum`` is the weight of the new batch (PyTorch BatchNorm's convention). The first batch
    initializes the average, so ``momentum=0`` keeps the first batch's mean amplitude for ever, which is
    what the reference code does (its momentum is truncated to an integer 0).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
    batch_mean = batch_amplitude.mean(dim=0)
    if running is None:
        return batch_mean
    return torch.lerp(running.to(batch_mean), batch_mean, momentum)


def fft_precision(images: Tensor) -> Tensor:
    """``images`` in the precision their FFT runs in: float32 (float64 stays float64)."""
    # Half-precision FFTs are restricted to power-of-two sizes on CUDA and lose the amplitude's dynamic
    # range; harmonize in float32 (float64 stays float64) and cast back afterwards.
    return images if images.dtype in (torch.float32, torch.float64) else images.float()


def _integer_frequencies(n: int, device: torch.device | None) -> Tensor:
    return torch.fft.fftfreq(n, d=1.0 / n, device=device).round().long()
