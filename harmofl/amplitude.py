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


def image_spectrum(images: Tensor) -> Tensor:
    """``rfft2`` of every image and channel: the half spectrum ``[B, C, H, W//2 + 1]`` (a real image's other half
    mirrors it, ``F(-k) = conj F(k)``), complex64 (complex128 for float64 input), unshifted. Computed once, it
    serves both a batch's amplitude (:func:`full_amplitude`) and its harmonization (:func:`harmonize`)."""
    check_images(images)
    return torch.fft.rfft2(fft_precision(images))


def full_amplitude(half_amplitude: Tensor, width: int) -> Tensor:
    """The ``[..., H, W]`` amplitude of real images from that of their half spectrum ``[..., H, W//2 + 1]``: column
    ``w > W//2`` of row ``h`` is ``|F(-h, -w)|``, row ``-h mod H``, column ``W - w`` of the half."""
    height = half_amplitude.shape[-2]
    rows = torch.remainder(-torch.arange(height, device=half_amplitude.device), height)
    columns = torch.arange(width - width // 2 - 1, 0, -1, device=half_amplitude.device)
    mirrored = half_amplitude.index_select(-2, rows).index_select(-1, columns)
    return torch.cat([half_amplitude, mirrored], dim=-1)


def amplitude_spectrum(images: Tensor) -> Tensor:
    """``|FFT2|`` of every image and channel, in float32 (or float64 for float64 input), unshifted."""
    return full_amplitude(image_spectrum(images).abs(), images.shape[-1])


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


def harmonize(
    images: Tensor,
    target_amplitude: Tensor,
    band: float,
    spectrum: Tensor | None = None,
    magnitude: Tensor | None = None,
) -> Tensor:
    """Replace the amplitude of ``images`` inside the ``band`` window by ``target_amplitude``, keeping phase.

    Args:
        images: ``[B, C, H, W]`` real images.
        target_amplitude: ``[C, H, W]`` amplitude spectrum (unshifted, as :func:`amplitude_spectrum` gives).
        band: window half-width ratio in ``[0, 0.5]``.
        spectrum, magnitude: ``images``' :func:`image_spectrum` and its ``abs()`` when the caller already has them (a
            training batch whose amplitude also updates the target): one forward FFT instead of two. The DC-only
            window needs neither.

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
    if spectrum is None:
        spectrum = image_spectrum(images)
    # The half spectrum of the target too: its other half, like the images', is the mirror (a mean amplitude of
    # real images is symmetric), so the inverse real FFT gives what the full complex one's real part would.
    target = target_amplitude[..., : spectrum.shape[-1]].to(device=images.device, dtype=spectrum.real.dtype)
    swapped = with_amplitude_in_window(spectrum, target, band, width, magnitude)
    return torch.fft.irfft2(swapped, s=(height, width)).to(images.dtype)


def with_amplitude_in_window(
    spectrum: Tensor, amplitude: Tensor, band: float, width: int | None = None, magnitude: Tensor | None = None
) -> Tensor:
    """``spectrum`` (``[B, C, H, W]``, unshifted) whose amplitude inside the ``band`` window is ``amplitude``
    (broadcast to it), its phase kept everywhere; outside the window the spectrum is unchanged. With ``width``,
    ``spectrum`` is the half spectrum (:func:`image_spectrum`) of images that wide, and ``amplitude`` its half;
    ``magnitude`` is ``spectrum.abs()`` when the caller has it.

    ``F·A/|F|`` has amplitude ``A`` and ``F``'s phase without computing the phase (``angle`` and ``polar`` cost
    more than the FFTs); a coefficient of amplitude 0 has phase 0 (``torch.angle(0)``), so there ``A`` itself."""
    magnitude = spectrum.abs() if magnitude is None else magnitude
    swapped = torch.where(magnitude > 0, spectrum * (amplitude / magnitude), amplitude.to(spectrum.dtype))
    height, columns = spectrum.shape[-2:]
    width = columns if width is None else width
    if window_shape((1, height, width), band)[1:] == (height, width):  # the whole spectrum: no mask to apply
        return swapped
    mask = low_frequency_mask(height, width, band, spectrum.device)[:, :columns]
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
