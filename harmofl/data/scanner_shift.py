"""The scanner-shift demo: five hospitals, few labels each, scanner differences as large as between real labs.

The quick-start demo (:class:`~harmofl.data.demo.DemoHistology`) has four sites with 192 training patches each:
enough data that every site can nearly learn alone. Real multi-hospital histology (Camelyon17's five hospitals,
three scanner makes, separately prepared H&E) has fewer labelled patches per site than it has ways of imaging
them. This federation mirrors that regime, and its settings were fixed before any method was run on it:

- few labels: 48 training patches per site by default (three batches of 16), so that federation matters;
- five sites whose imaging differs in every way :mod:`harmofl.data.imaging` models, each justified below; the
  tissue (and so the label's morphology) comes from one distribution, so every difference between sites is
  a feature shift;
- evaluation on large test splits (160 patches per site), so that a site's accuracy is measured to about
  ±0.03 (binomial 95 % half-width near 0.9), and on unseen sites with ``cli.py compare --protocol loso``.

Physical basis of the ranges (they bound, not measure, the five hospitals):

- stain amount ``stain_scale`` 0.55–1.6: section thickness (3–5 µm is usual, thicker or thinner happens) and
  staining time change haematoxylin and eosin uptake severalfold between laboratories;
- stain colour (OD vectors): dye batches and counterstain chemistry tilt haematoxylin towards blue or purple
  and eosin towards pink or orange (perturbed around Ruifrok & Johnston's vectors, unit length);
- background OD 0–0.1: lamp spectrum and white balance tint the whole slide;
- focus ``blur_sigma`` 0–2 px: whole-slide scanners focus on a grid of points and regions between them come out
  soft; 2 px at 0.25 µm/px is a 0.5 µm defocus blur, common in out-of-focus tiles;
- sharpening: some scanners' software applies an unsharp mask, which also amplifies sensor noise;
- sensor noise 0.5–4 % of full well (read) plus shot noise: fast line-scan sensors run at high gain;
- tone curve ``gamma`` 0.8–1.35 and ``contrast``: vendors encode intensities with different curves;
- pixel size ``magnification`` 1–1.09: 40× scanners sample at about 0.23–0.25 µm per pixel, so the same tissue
  spans up to 9 % more pixels on the finest scanner; ``resolution`` 0.75 models a coarser sensor resampled.
"""

from __future__ import annotations

from typing import Any

from harmofl.data.demo import DemoHistology
from harmofl.data.imaging import EOSIN_OD, HEMATOXYLIN_OD, SiteImaging

SCANNER_SHIFT_SITES: tuple[SiteImaging, ...] = (
    # A well-run reference lab: textbook stain vectors and amount, good focus, a clean sensor; 0.24 µm pixels.
    SiteImaging(
        hematoxylin=HEMATOXYLIN_OD,
        eosin=EOSIN_OD,
        background=(0.02, 0.02, 0.02),
        blur_sigma=0.5,
        noise_std=0.01,
        shot_noise=0.01,
        magnification=1.04,
    ),
    # Thin, under-stained sections with a bluish haematoxylin and a cool white balance, scanned out of focus.
    SiteImaging(
        hematoxylin=(0.740, 0.640, 0.200),
        eosin=(0.120, 0.980, 0.160),
        background=(0.080, 0.030, 0.000),
        stain_scale=0.55,
        gamma=0.9,
        blur_sigma=2.0,
        noise_std=0.01,
        shot_noise=0.01,
        magnification=1.04,
    ),
    # The finest scanner (0.23 µm pixels), strong orange eosin, a warm lamp, software sharpening, steep curve.
    SiteImaging(
        hematoxylin=(0.600, 0.740, 0.300),
        eosin=(0.050, 0.940, 0.330),
        background=(0.000, 0.050, 0.100),
        stain_scale=1.4,
        gamma=1.25,
        contrast=1.15,
        sharpen=1.0,
        noise_std=0.02,
        shot_noise=0.01,
        magnification=1.09,
    ),
    # Thick, over-stained sections with magenta eosin, a dark tone curve and mild defocus.
    SiteImaging(
        hematoxylin=(0.580, 0.760, 0.290),
        eosin=(0.100, 0.940, 0.330),
        background=(0.000, 0.040, 0.060),
        stain_scale=1.6,
        gamma=1.35,
        contrast=1.1,
        blur_sigma=1.0,
        noise_std=0.01,
        shot_noise=0.01,
        magnification=1.04,
    ),
    # The coarsest scanner (0.25 µm pixels, a sensor sampling at 0.75 resampled), high gain: noisy, bright curve.
    SiteImaging(
        hematoxylin=(0.680, 0.690, 0.250),
        eosin=(0.060, 0.990, 0.090),
        background=(0.030, 0.030, 0.050),
        stain_scale=0.9,
        gamma=0.8,
        contrast=0.9,
        noise_std=0.04,
        shot_noise=0.03,
        resolution=0.75,
    ),
)


class ScannerShiftHistology(DemoHistology):
    """Five hospitals (``site_0`` … ``site_4``) of :data:`SCANNER_SHIFT_SITES`, few labels each; classification
    of tumour-like clusters as in :class:`~harmofl.data.demo.DemoHistology` (same tissue, same labels).

    Args:
        train_per_site: labelled training patches per site.
        val_per_site: validation patches per site (model selection).
        test_per_site: test patches per site.
        image_size: side of the square patches, in pixels.
        seed: seeds the tissue and the sensor noise (the five sites' imaging is fixed).
        loader: the loader and cache options of every data source (batch size, workers, cache).
    """

    def __init__(
        self,
        *,
        train_per_site: int = 48,
        val_per_site: int = 32,
        test_per_site: int = 160,
        image_size: int = 64,
        seed: int = 0,
        **loader: Any,
    ) -> None:
        super().__init__(
            len(SCANNER_SHIFT_SITES),
            train_per_site=train_per_site,
            val_per_site=val_per_site,
            test_per_site=test_per_site,
            image_size=image_size,
            seed=seed,
            **loader,
        )
        self.sites = list(SCANNER_SHIFT_SITES)
