"""Procedural H&E tissue: stain concentrations and nucleus masks, the same distribution at every site.

Stroma is eosin with collagen fibres (anisotropically smoothed noise), unstained clefts and spaces, and a faint
haematoxylin counterstain. Nuclei are lobed ellipses with granular chromatin, drawn from three kinds: sparse small
regular nuclei of normal tissue, crowded small dark lymphocytes (in aggregates that either label may hold) and, in
tumour-like nests, crowded, larger, pleomorphic, hyperchromatic nuclei. Only the nests depend on the label, so the
label is morphological. Imaging (stain colours, optics, sensor) is applied afterwards, per site
(:mod:`harmofl.data.imaging`). Pure torch, vectorised over the batch; every draw comes from the caller's generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Lengths below are in units of the reference patch: FIELD units span the image whatever its
# size in pixels, so image_size changes the resolution, not the field of view.
FIELD = 64.0


@dataclass(frozen=True)
class NucleusKind:
    """How one kind of nucleus is drawn: ranges ``(low, high)`` sampled uniformly per nucleus."""

    candidates: int  # candidate positions per patch (normal tissue) or per cluster
    acceptance: float  # probability that a candidate position holds a nucleus
    radius: tuple[float, float]  # equivalent-circle radius, in length units
    elongation: tuple[float, float]  # ratio of the ellipse's axes
    intensity: tuple[float, float]  # haematoxylin concentration: chromatin density
    chromatin: float  # amplitude of the chromatin's granular texture
    irregularity: float  # amplitude of the three-lobed deformation of the outline


# Index 0, 1, 2 of the kind tensors below. Normal tissue: sparse, small, regular nuclei.
NORMAL = NucleusKind(96, 0.22, (2.0, 2.8), (1.0, 1.6), (0.75, 1.05), 0.08, 0.03)
# Lymphocyte aggregates occur in normal and tumour tissue alike: crowded, dark but small and
# round, so that crowding or darkness alone does not give the label away.
LYMPHOCYTE = NucleusKind(24, 0.75, (1.4, 1.9), (1.0, 1.15), (1.15, 1.45), 0.05, 0.02)
# Tumour: crowded, larger, pleomorphic (wide size and shape ranges), hyperchromatic, coarse chromatin.
TUMOUR = NucleusKind(12, 0.75, (2.2, 3.4), (1.0, 1.7), (0.9, 1.3), 0.18, 0.1)
KINDS = (NORMAL, LYMPHOCYTE, TUMOUR)

AGGREGATE_PROBABILITY = 0.5  # patches (of either label) with a lymphocyte aggregate


@dataclass(frozen=True)
class Tissue:
    """Stain concentrations ``[B, S, S]`` and the nucleus mask ``[B, S, S]`` (bool) of a batch."""

    hematoxylin: Tensor
    eosin: Tensor
    nuclei: Tensor


def _uniform(shape: tuple[int, ...], low: Tensor | float, high: Tensor | float, generator: torch.Generator) -> Tensor:
    return low + (high - low) * torch.rand(shape, generator=generator)


def filtered_noise(
    batch: int, size: int, along: float, across: float, angle: Tensor, generator: torch.Generator
) -> Tensor:
    """Gaussian random fields ``[B, S, S]``, zero mean and unit variance per image: white noise
    smoothed by an anisotropic Gaussian of widths ``along`` and ``across`` (pixels) whose long axis
    makes ``angle [B]`` with the x axis. Filtered in the Fourier domain, so the field is periodic."""
    noise = torch.randn(batch, size, size, generator=generator)
    fy = torch.fft.fftfreq(size).view(1, size, 1)
    fx = torch.fft.rfftfreq(size).view(1, 1, size // 2 + 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    f_along, f_across = fx * cos + fy * sin, -fx * sin + fy * cos
    transfer = torch.exp(-2 * math.pi**2 * ((along * f_along) ** 2 + (across * f_across) ** 2))
    field = torch.fft.irfft2(torch.fft.rfft2(noise) * transfer, s=(size, size))
    return (field - field.mean(dim=(1, 2), keepdim=True)) / field.std(dim=(1, 2), keepdim=True).clamp_min(1e-8)


@dataclass(frozen=True)
class Regions:
    """One lobed elliptical region per image, in length units: a tumour nest or an aggregate."""

    present: Tensor  # [B] bool: whether the image has the region at all
    centre: Tensor  # [B, 1, 2]
    axes: Tensor  # [B, 1, 2]
    angle: Tensor  # [B, 1]
    phase: Tensor  # [B, 1]

    @classmethod
    def draw(cls, present: Tensor, generator: torch.Generator) -> Regions:
        batch = present.shape[0]
        return cls(
            present=present,
            centre=_uniform((batch, 1, 2), 14.0, FIELD - 14.0, generator),
            axes=_uniform((batch, 1, 2), 9.0, 16.0, generator),
            angle=_uniform((batch, 1), 0.0, math.pi, generator),
            phase=_uniform((batch, 1), 0.0, 2 * math.pi, generator),
        )

    def _boundary(self, theta: Tensor) -> Tensor:
        # A growing cluster is not a clean ellipse: its boundary radius wobbles with the angle.
        return 1.0 + 0.2 * torch.sin(3 * theta + self.phase)

    def contains(self, points: Tensor) -> Tensor:
        """Whether ``points [B, N, 2]`` lie inside the image's region: ``[B, N]`` bool."""
        offset = points - self.centre
        cos, sin = torch.cos(self.angle), torch.sin(self.angle)
        u = (offset[..., 0] * cos + offset[..., 1] * sin) / self.axes[..., 0]
        v = (-offset[..., 0] * sin + offset[..., 1] * cos) / self.axes[..., 1]
        return self.present.view(-1, 1) & (u**2 + v**2 <= self._boundary(torch.atan2(v, u)) ** 2)

    def sample(self, count: int, generator: torch.Generator) -> Tensor:
        """``count`` points ``[B, count, 2]`` spread over each image's region."""
        theta = _uniform((self.present.shape[0], count), 0.0, 2 * math.pi, generator)
        # The square root spreads the points evenly over the area rather than along the radius.
        reach = torch.rand(theta.shape, generator=generator).sqrt() * self._boundary(theta)
        u, v = reach * torch.cos(theta) * self.axes[..., 0], reach * torch.sin(theta) * self.axes[..., 1]
        cos, sin = torch.cos(self.angle), torch.sin(self.angle)
        return self.centre + torch.stack((u * cos - v * sin, u * sin + v * cos), dim=-1)


def _kind_table(field: str) -> Tensor:
    return torch.tensor([getattr(kind, field) for kind in KINDS])


def _draw_nuclei(
    tumour: Regions, aggregate: Regions, spaces: Tensor, size: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Haematoxylin of the nuclei and their soft coverage (0.5 on the outline), both ``[B, S, S]``.

    Each nucleus is rendered in a small window around its centre and scattered into the image
    with a maximum, so that the cost grows with the nuclei, not with nuclei times pixels.
    """
    batch, px = spaces.shape[0], size / FIELD
    # Normal candidates overhang the border so that nuclei are cut by it as in a real crop; the
    # clusters displace normal tissue.
    normal = _uniform((batch, NORMAL.candidates, 2), -3.0, FIELD + 3.0, generator)
    pools = (
        (normal, ~(tumour.contains(normal) | aggregate.contains(normal))),
        (aggregate.sample(LYMPHOCYTE.candidates, generator), aggregate.present.view(-1, 1)),
        (tumour.sample(TUMOUR.candidates, generator), tumour.present.view(-1, 1)),
    )
    centres = torch.cat([points for points, _ in pools], dim=1)
    allowed = torch.cat([allow.expand(points.shape[:2]) for points, allow in pools], dim=1)
    kind = torch.cat([torch.full(points.shape[:2], index) for index, (points, _) in enumerate(pools)], dim=1)
    candidates = centres.shape[1]
    # No nuclei in clefts, fat and lumina.
    pixel = (centres * px).long().clamp(0, size - 1)
    empty = spaces.flatten(1).gather(1, pixel[..., 1] * size + pixel[..., 0]) > 0.5
    accepted = torch.rand(batch, candidates, generator=generator) < _kind_table("acceptance")[kind]
    active = allowed & accepted & ~empty

    def draw(field: str) -> Tensor:
        low, high = _kind_table(field).unbind(1)
        return _uniform((batch, candidates), low[kind], high[kind], generator)

    radius, elongation, intensity = draw("radius") * px, draw("elongation"), draw("intensity")
    chromatin, irregularity = _kind_table("chromatin")[kind], _kind_table("irregularity")[kind]
    angle = _uniform((batch, candidates), 0.0, math.pi, generator)
    phase = _uniform((batch, candidates), 0.0, 2 * math.pi, generator)
    # Keep only as many candidates per image as the busiest image has nuclei (active ones first).
    keep = int(active.sum(1).max())
    order = active.to(torch.uint8).argsort(dim=1, descending=True, stable=True)[:, :keep]
    active, centres = active.gather(1, order), centres.gather(1, order.unsqueeze(-1).expand(-1, -1, 2)) * px
    radius, elongation, intensity, chromatin, irregularity, angle, phase = (
        t.gather(1, order) for t in (radius, elongation, intensity, chromatin, irregularity, angle, phase)
    )

    # The window spans the largest possible semi-axis, deformation included.
    reach = max(k.radius[1] * math.sqrt(k.elongation[1]) * (1 + k.irregularity) for k in KINDS) * px
    half = math.ceil(reach) + 1
    steps = torch.arange(-half, half + 1)
    corner = centres.floor().long()  # [B, K, 2]
    ix = corner[..., 0, None, None] + steps.view(1, 1, 1, -1)  # [B, K, 1, W]
    iy = corner[..., 1, None, None] + steps.view(1, 1, -1, 1)  # [B, K, W, 1]
    x = ix + 0.5 - centres[..., 0, None, None]
    y = iy + 0.5 - centres[..., 1, None, None]
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    semi_major = (radius * elongation.sqrt())[..., None, None]
    semi_minor = (radius / elongation.sqrt())[..., None, None]
    u, v = (x * cos + y * sin) / semi_major, (-x * sin + y * cos) / semi_minor
    lobes = 1.0 + irregularity[..., None, None] * torch.sin(3 * torch.atan2(v, u) + phase[..., None, None])
    distance = torch.sqrt(u**2 + v**2) / lobes  # 1 on the outline
    # Outline about one pixel wide at any resolution; chromatin clumps and gathers at the membrane.
    coverage = torch.sigmoid((1.0 - distance) * radius[..., None, None] * 2.0)
    grain = 1.0 + chromatin[..., None, None] * torch.randn(coverage.shape, generator=generator)
    membrane = 0.85 + 0.3 * distance.clamp(max=1.0) ** 2
    stain = intensity[..., None, None] * coverage * grain.clamp_min(0.0) * membrane
    present = active[..., None, None].to(coverage.dtype)

    inside = (ix >= 0) & (ix < size) & (iy >= 0) & (iy < size)
    index = torch.where(inside, iy * size + ix, size * size).flatten(1)  # off-image pixels go to a spare slot

    def scatter(values: Tensor) -> Tensor:
        out = torch.zeros(batch, size * size + 1)
        out.scatter_reduce_(1, index, (values * present).flatten(1), reduce="amax")
        return out[:, :-1].view(batch, size, size)

    return scatter(stain), scatter(coverage)


def synthesize_tissue(tumour: Tensor, size: int, generator: torch.Generator) -> Tissue:
    """Stain concentrations and nucleus masks of ``len(tumour)`` patches of ``size`` pixels;
    ``tumour [B]`` (bool) says which patches hold a tumour-like cluster."""
    batch, px = tumour.shape[0], size / FIELD
    if batch == 0:  # an empty split
        nothing = torch.zeros(0, size, size)
        return Tissue(hematoxylin=nothing, eosin=nothing, nuclei=nothing.bool())
    # Stroma: collagen fibres run in bundles, i.e. noise smoothed far more along than across them.
    fibres = filtered_noise(batch, size, 7.0 * px, 0.8 * px, _uniform((batch,), 0.0, math.pi, generator), generator)
    cellularity = filtered_noise(batch, size, 10.0 * px, 10.0 * px, torch.zeros(batch), generator)
    # Clefts, fat and lumina: the upper tail of a smooth field leaves unstained spaces.
    spaces = torch.sigmoid((filtered_noise(batch, size, 6.0 * px, 6.0 * px, torch.zeros(batch), generator) - 1.4) * 5.0)
    nests = Regions.draw(tumour, generator)
    aggregates = Regions.draw(torch.rand(batch, generator=generator) < AGGREGATE_PROBABILITY, generator)
    # Clusters of cells fill the tissue they occupy: no spaces inside them.
    steps = (torch.arange(size) + 0.5) / px
    grid = torch.stack(torch.meshgrid(steps, steps, indexing="xy"), dim=-1).view(1, -1, 2).expand(batch, -1, -1)
    cellular = (nests.contains(grid) | aggregates.contains(grid)).view(batch, size, size)
    spaces = spaces * ~cellular
    nuclear_stain, coverage = _draw_nuclei(nests, aggregates, spaces, size, generator)

    eosin_level = _uniform((batch, 1, 1), 0.3, 0.55, generator)
    stroma = eosin_level * (1.0 + 0.2 * cellularity) * (1.0 + 0.35 * torch.tanh(fibres))
    # Nuclei displace eosin-stained cytoplasm and matrix.
    eosin = (stroma * (1.0 - spaces) * (1.0 - 0.6 * coverage)).clamp_min(0.0)
    counterstain = _uniform((batch, 1, 1), 0.04, 0.1, generator) * (1.0 + 0.3 * cellularity).clamp_min(0.0)
    hematoxylin = counterstain * (1.0 - spaces) + nuclear_stain
    return Tissue(hematoxylin=hematoxylin, eosin=eosin, nuclei=coverage >= 0.5)
