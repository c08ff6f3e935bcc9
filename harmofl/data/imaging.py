"""Site-specific imaging of stained tissue: how one site's scanner turns stain into pixels.

Every site of the demo federation images the same kind of tissue; what differs between sites is
the staining protocol and the scanner, applied by :func:`render` in the order light meets them:

0. Field of view: a scanner of higher magnification (smaller pixels, ``magnification`` > 1 relative to the
   federation's lowest) images a smaller area of the same tissue onto the same number of pixels.
1. Staining and transmission (Beer–Lambert). Each stain absorbs light with its own optical
   density (OD) per colour channel; the ODs of stains add, and the transmitted intensity is
   ``exp(-OD)``. Section thickness and staining time scale every concentration
   (``stain_scale``); lamp colour and white balance add a constant OD per channel
   (``background``).
2. Optics: the objective's point-spread function, a Gaussian of ``blur_sigma`` pixels.
3. Sensor sampling: a scanner of lower magnification integrates light over larger pixels
   (area averaging down to ``resolution`` times the image size).
4. Sensor noise: photon shot noise (variance proportional to the intensity) and Gaussian read
   noise, clipped at zero light and at full well.
5. On-scanner processing: unsharp-mask sharpening (which also amplifies the noise), then the
   tone curve (``gamma``, then ``contrast`` about mid-grey).
6. Resampling back to the federation's common image size, and the [0, 1] range of stored pixels.

Pure torch, vectorised over the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

RGB = tuple[float, float, float]

# Ruifrok & Johnston (2001) optical-density vectors of haematoxylin and eosin, unit length:
# haematoxylin absorbs red and green (nuclei look blue-purple), eosin mostly green (stroma is pink).
HEMATOXYLIN_OD: RGB = (0.650, 0.704, 0.286)
EOSIN_OD: RGB = (0.072, 0.990, 0.105)

# Width (pixels) of the Gaussian inside a scanner's unsharp mask.
UNSHARP_SIGMA = 1.0


@dataclass(frozen=True)
class SiteImaging:
    """One site's staining protocol and scanner. The defaults are an ideal scanner: ``exp(-OD)``.

    Args:
        hematoxylin: OD per unit haematoxylin concentration, per channel (R, G, B).
        eosin: OD per unit eosin concentration, per channel.
        background: OD of glass, mounting medium and white balance, per channel.
        stain_scale: multiplies every concentration (section thickness, staining time).
        gamma: exponent of the tone curve applied to the measured intensity.
        contrast: slope of the tone curve about mid-grey.
        blur_sigma: standard deviation (pixels) of the optics' Gaussian point-spread function.
        sharpen: amount of the scanner's unsharp mask; 0 for none.
        noise_std: standard deviation of the sensor's Gaussian read noise.
        shot_noise: photon shot noise: its standard deviation is ``shot_noise * sqrt(intensity)``.
        resolution: sensor sampling relative to the common image size, in (0, 1].
        magnification: pixel size of the federation's coarsest scanner over this one's, >= 1: the central
            ``1 / magnification`` of the field, enlarged to the image size.
    """

    hematoxylin: RGB = HEMATOXYLIN_OD
    eosin: RGB = EOSIN_OD
    background: RGB = (0.0, 0.0, 0.0)
    stain_scale: float = 1.0
    gamma: float = 1.0
    contrast: float = 1.0
    blur_sigma: float = 0.0
    sharpen: float = 0.0
    noise_std: float = 0.0
    shot_noise: float = 0.0
    resolution: float = 1.0
    magnification: float = 1.0

    def __post_init__(self) -> None:
        for name in ("hematoxylin", "eosin", "background"):
            value = getattr(self, name)
            if len(value) != 3 or min(value) < 0:
                raise ValueError(f"SiteImaging.{name} must be 3 non-negative optical densities (R, G, B), got {value}.")
        for name in ("stain_scale", "gamma", "contrast"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SiteImaging.{name} must be > 0, got {value}.")
        for name in ("blur_sigma", "sharpen", "noise_std", "shot_noise"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"SiteImaging.{name} must be >= 0, got {value}.")
        if not 0 < self.resolution <= 1:
            raise ValueError(f"SiteImaging.resolution must be in (0, 1], got {self.resolution}.")
        if not 1 <= self.magnification <= 4:
            raise ValueError(
                "SiteImaging.magnification must be in [1, 4] (relative to the coarsest scanner), got "
                f"{self.magnification}."
            )


# Hand-picked sites spanning the usual differences between scanners and labs.
_REFERENCE_SITES: tuple[SiteImaging, ...] = (
    # Pale, blue-shifted: under-stained thin sections, a bluish haematoxylin, cool white balance.
    SiteImaging(
        hematoxylin=(0.740, 0.640, 0.200),
        eosin=(0.120, 0.980, 0.160),
        background=(0.060, 0.030, 0.000),
        stain_scale=0.6,
        gamma=0.85,
        contrast=0.9,
        blur_sigma=0.4,
        noise_std=0.01,
        shot_noise=0.01,
    ),
    # Dark, saturated: thick over-stained sections, magenta eosin, warm white balance, steep tone curve.
    SiteImaging(
        hematoxylin=(0.580, 0.760, 0.290),
        eosin=(0.100, 0.940, 0.330),
        background=(0.000, 0.050, 0.070),
        stain_scale=1.5,
        gamma=1.3,
        contrast=1.15,
        blur_sigma=0.3,
        noise_std=0.01,
        shot_noise=0.01,
    ),
    # Blurry, low resolution: a lower-magnification scanner with soft optics, yellowish lamp.
    SiteImaging(
        hematoxylin=HEMATOXYLIN_OD,
        eosin=(0.050, 0.940, 0.280),
        background=(0.020, 0.040, 0.110),
        stain_scale=1.0,
        blur_sigma=1.0,
        resolution=0.5,
        noise_std=0.005,
        shot_noise=0.005,
    ),
    # Noisy, sharpened: a fast high-gain sensor whose software sharpens (and so amplifies the noise).
    SiteImaging(
        hematoxylin=(0.620, 0.720, 0.310),
        eosin=(0.030, 0.990, 0.040),
        background=(0.010, 0.020, 0.020),
        stain_scale=0.9,
        gamma=1.05,
        contrast=1.05,
        sharpen=1.2,
        noise_std=0.035,
        shot_noise=0.03,
    ),
)


def default_sites(num_sites: int, seed: int = 0) -> list[SiteImaging]:
    """``num_sites`` diverse sites: the hand-picked reference sites first, then sites drawn from
    plausible ranges by a generator seeded with ``seed``."""
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}.")
    sites = list(_REFERENCE_SITES[:num_sites])
    generator = torch.Generator().manual_seed(seed)
    while len(sites) < num_sites:
        sites.append(_sample_site(generator))
    return sites


def _sample_site(generator: torch.Generator) -> SiteImaging:
    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    hematoxylin = _jitter_od(HEMATOXYLIN_OD, 0.08, generator)
    eosin = _jitter_od(EOSIN_OD, 0.08, generator)
    background = (uniform(0.0, 0.08), uniform(0.0, 0.08), uniform(0.0, 0.08))
    # A scanner either sharpens in software or shows its optics' blur, rarely both noticeably.
    sharpened = uniform(0.0, 1.0) < 0.3
    blur_sigma, sharpen = uniform(0.2, 1.2), uniform(0.4, 1.2)
    return SiteImaging(
        hematoxylin=hematoxylin,
        eosin=eosin,
        background=background,
        stain_scale=uniform(0.6, 1.5),
        gamma=uniform(0.8, 1.3),
        contrast=uniform(0.85, 1.2),
        blur_sigma=0.0 if sharpened else blur_sigma,
        sharpen=sharpen if sharpened else 0.0,
        noise_std=uniform(0.003, 0.035),
        shot_noise=uniform(0.0, 0.03),
        resolution=(1.0, 0.75, 0.5)[int(torch.randint(3, (), generator=generator))],
    )


def _jitter_od(reference: RGB, std: float, generator: torch.Generator) -> RGB:
    """A stain's OD vector perturbed (dye batch, counterstain chemistry), kept positive and unit length."""
    vector = (torch.tensor(reference) + std * torch.randn(3, generator=generator)).clamp_min(0.01)
    r, g, b = (vector / vector.norm()).tolist()
    return (r, g, b)


def optical_density(h_conc: Tensor, e_conc: Tensor, site: SiteImaging) -> Tensor:
    """Beer–Lambert: per-channel OD ``[B, 3, H, W]`` of stain concentrations ``[B, H, W]``."""
    hematoxylin = torch.tensor(site.hematoxylin, dtype=h_conc.dtype, device=h_conc.device).view(1, 3, 1, 1)
    eosin = torch.tensor(site.eosin, dtype=h_conc.dtype, device=h_conc.device).view(1, 3, 1, 1)
    background = torch.tensor(site.background, dtype=h_conc.dtype, device=h_conc.device).view(1, 3, 1, 1)
    return site.stain_scale * (h_conc.unsqueeze(1) * hematoxylin + e_conc.unsqueeze(1) * eosin) + background


def gaussian_blur(images: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` with reflected borders; ``sigma`` in pixels."""
    if sigma <= 0:
        return images
    channels, height, width = images.shape[1:]
    radius = min(math.ceil(3 * sigma), height - 1, width - 1)
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = (kernel / kernel.sum()).repeat(channels, 1, 1, 1)  # [C, 1, 1, K]
    out = F.conv2d(F.pad(images, (radius, radius, 0, 0), mode="reflect"), kernel, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="reflect"), kernel.transpose(2, 3), groups=channels)


def render(h_conc: Tensor, e_conc: Tensor, site: SiteImaging, generator: torch.Generator | None = None) -> Tensor:
    """Images ``[B, 3, H, W]`` in [0, 1] of haematoxylin and eosin concentrations ``[B, H, W]``
    as ``site`` stains and scans them; ``generator`` draws the sensor noise."""
    if h_conc.dim() != 3 or h_conc.shape != e_conc.shape:
        raise ValueError(
            f"render needs concentrations of one shape [B, H, W], got {tuple(h_conc.shape)} and {tuple(e_conc.shape)}."
        )
    size = tuple(h_conc.shape[-2:])
    if site.magnification != 1:
        h_conc, e_conc = (_field_of_view(conc, site.magnification) for conc in (h_conc, e_conc))
    light = gaussian_blur(torch.exp(-optical_density(h_conc, e_conc, site)), site.blur_sigma)
    sensor = tuple(max(1, round(side * site.resolution)) for side in size)
    if sensor != size:
        light = F.interpolate(light, size=sensor, mode="area")  # larger sensor pixels integrate more light
    if site.noise_std > 0 or site.shot_noise > 0:
        # Photon counts are Poisson: their variance grows with the light; read noise is constant.
        std = torch.sqrt(site.noise_std**2 + site.shot_noise**2 * light)
        noise = torch.randn(light.shape, generator=generator, dtype=light.dtype, device=light.device)
        light = (light + std * noise).clamp(0.0, 1.0)  # no negative light; the sensor saturates at full well
    if site.sharpen > 0:
        light = light + site.sharpen * (light - gaussian_blur(light, UNSHARP_SIGMA))
    # Tone curve; written so that gamma = contrast = 1 leaves the intensities bit-identical.
    light = light.clamp(0.0, 1.0).pow(site.gamma)
    light = light * site.contrast + 0.5 * (1.0 - site.contrast)
    if sensor != size:
        light = F.interpolate(light, size=size, mode="bicubic", align_corners=False)
    return light.clamp(0.0, 1.0)


def _field_of_view(concentration: Tensor, magnification: float) -> Tensor:
    """The central ``1 / magnification`` of ``[B, H, W]`` concentrations, enlarged back to ``H × W``: the same
    tissue seen through a scanner with proportionally smaller pixels."""
    height, width = concentration.shape[-2:]
    crop_h, crop_w = (max(2, round(side / magnification)) for side in (height, width))
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = concentration[:, None, top : top + crop_h, left : left + crop_w]
    return F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[:, 0]
