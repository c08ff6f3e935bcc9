"""FedDG's continuous frequency-space interpolation (Liu et al., CVPR 2021, arXiv 2103.06030), in plain torch.

Sites exchange amplitude spectra of their images. During local training an image ``x`` with spectrum
``F(x) = A·exp(i·P)`` gets, inside a centred low-frequency window, the amplitude ``(1 − λ)·A + λ·A_other`` of an
amplitude ``A_other`` drawn from another site, ``λ ~ U[0, 1]`` per image, and keeps its own phase ``P`` everywhere:
``x' = F⁻¹(A', P)``. The image then looks acquired at a site "between" its own and the other one. Only this
augmentation is implemented here; FedDG's boundary-oriented episodic (meta-)learning is not.

The window is HarmoFL's ``band`` (:func:`harmofl.amplitude.low_frequency_mask`): ``|k_h| <= floor(H·band)`` and
``|k_w| <= floor(W·band)``; for square images this is FedDG's ``floor(min(H, W)·L)`` half-width after ``fftshift``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from harmofl.amplitude import check_band, check_images, fft_precision, with_amplitude_in_window


def interpolate_amplitude(images: Tensor, other_amplitudes: Tensor, lam: Tensor, band: float) -> Tensor:
    """Interpolate each image's low-frequency amplitude towards ``other_amplitudes``, keeping its phase.

    Args:
        images: ``[B, C, H, W]`` real images.
        other_amplitudes: ``[B, C, H, W]`` amplitude spectra (unshifted, as
            :func:`~harmofl.amplitude.amplitude_spectrum` gives), one per image.
        lam: ``[B]`` interpolation weights in ``[0, 1]`` (0 = the image unchanged, 1 = the other amplitude).
        band: window half-width ratio in ``[0, 0.5]`` (0 = DC coefficient only, 0.5 = whole spectrum).

    Returns:
        The interpolated images, same shape and dtype as ``images`` (computed in float32 for half inputs).
    """
    check_images(images)
    if other_amplitudes.shape != images.shape:
        raise ValueError(
            f"other_amplitudes has shape {tuple(other_amplitudes.shape)}, the images {tuple(images.shape)}: every "
            "site must use the same image size and channels."
        )
    if lam.shape != images.shape[:1]:
        raise ValueError(f"lam has shape {tuple(lam.shape)}: expected one weight per image, ({images.shape[0]},).")
    if not bool(((lam >= 0) & (lam <= 1)).all()):
        raise ValueError(f"lam must lie in [0, 1], got values from {float(lam.min())} to {float(lam.max())}.")
    check_band(band)
    spectrum = torch.fft.fft2(fft_precision(images))
    amplitude = spectrum.abs()
    mixed = torch.lerp(amplitude, other_amplitudes.to(amplitude), lam.to(amplitude)[:, None, None, None])
    return torch.fft.ifft2(with_amplitude_in_window(spectrum, mixed, band)).real.to(images.dtype)


def draw_amplitudes(bank: Sequence[Tensor], count: int, device: torch.device) -> Tensor:
    """``count`` amplitude spectra ``[count, C, H, W]`` on ``device``: for each, a site drawn uniformly among the
    ``bank``'s entries (each ``[N_k, C, H, W]``, ``N_k >= 1``), then one of its spectra uniformly; from torch's
    global RNG on ``device``. Only the drawn spectra are moved to ``device``."""
    if not bank or any(len(amplitudes) == 0 for amplitudes in bank):
        raise ValueError(
            f"Each site of the bank needs at least one amplitude spectrum, got sizes {[len(a) for a in bank]}."
        )
    sizes = torch.tensor([len(amplitudes) for amplitudes in bank], device=device)
    sites = torch.randint(len(bank), (count,), device=device)
    # floor(u·N) is in [0, N − 1]; the clamp guards float rounding of u·N up to N.
    within = torch.minimum((torch.rand(count, device=device) * sizes[sites]).long(), sizes[sites] - 1)
    drawn = [bank[site][index] for site, index in zip(sites.tolist(), within.tolist())]
    return torch.stack(drawn).to(device)
