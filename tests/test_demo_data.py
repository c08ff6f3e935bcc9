"""The procedural demo federation: imaging physics, tissue, and the datamodule contract."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from harmofl.data import SPLITS, DemoHistology, DemoNuclei, FederatedDataModule, ScannerShiftHistology
from harmofl.data.imaging import EOSIN_OD, HEMATOXYLIN_OD, SiteImaging, default_sites, gaussian_blur, render
from harmofl.data.scanner_shift import SCANNER_SHIFT_SITES
from harmofl.data.synthesis import synthesize_tissue

SMALL = dict(num_sites=4, train_per_site=24, val_per_site=8, test_per_site=8, image_size=32)


def _concentrations(batch: int = 4, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return 2.0 * torch.rand(batch, size, size, generator=generator), torch.rand(batch, size, size, generator=generator)


def _sharpness(images: torch.Tensor) -> float:
    """Mean absolute Laplacian of the grey level: edges and noise, i.e. high spatial frequencies."""
    laplacian = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    return F.conv2d(images.mean(1, keepdim=True), laplacian).abs().mean().item()


@pytest.fixture(scope="module")
def histology() -> DemoHistology:
    data = DemoHistology(**SMALL)
    data.setup()
    return data


@pytest.fixture(scope="module")
def nuclei() -> DemoNuclei:
    data = DemoNuclei(**SMALL)
    data.setup()
    return data


# --- imaging physics ---------------------------------------------------------------------------


def test_ideal_scanner_is_exactly_beer_lambert() -> None:
    h, e = _concentrations()
    images = render(h, e, SiteImaging(), torch.Generator().manual_seed(0))
    expected = torch.stack([torch.exp(-(h * HEMATOXYLIN_OD[c] + e * EOSIN_OD[c])) for c in range(3)], dim=1)
    assert torch.equal(images, expected)


def test_stain_scale_and_background_follow_beer_lambert() -> None:
    h, e = _concentrations()
    ideal = render(h, e, SiteImaging())
    # Doubling the path length squares the transmission; a background OD multiplies it by exp(-OD).
    assert torch.allclose(render(h, e, SiteImaging(stain_scale=2.0)), ideal**2, atol=1e-6)
    background = (0.1, 0.2, 0.3)
    expected = ideal * torch.exp(-torch.tensor(background)).view(1, 3, 1, 1)
    assert torch.allclose(render(h, e, SiteImaging(background=background)), expected, atol=1e-6)


def test_tone_curve() -> None:
    h, e = _concentrations()
    ideal = render(h, e, SiteImaging())
    assert torch.allclose(render(h, e, SiteImaging(gamma=1.5)), ideal**1.5, atol=1e-6)
    expected = (0.5 + 1.3 * (ideal - 0.5)).clamp(0, 1)
    assert torch.allclose(render(h, e, SiteImaging(contrast=1.3)), expected, atol=1e-6)


def test_blur_preserves_flat_fields_and_removes_detail() -> None:
    flat = torch.full((2, 3, 16, 16), 0.7)
    assert torch.allclose(gaussian_blur(flat, 1.5), flat, atol=1e-6)
    h, e = _concentrations()
    ideal, blurred = render(h, e, SiteImaging()), render(h, e, SiteImaging(blur_sigma=1.0))
    assert blurred.mean().item() == pytest.approx(ideal.mean().item(), abs=0.01)  # light is redistributed, not lost
    assert _sharpness(blurred) < 0.5 * _sharpness(ideal)


def test_sharpening_amplifies_detail_but_not_flat_fields() -> None:
    h, e = _concentrations()
    flat = torch.full_like(h, 0.5)
    assert torch.allclose(render(flat, flat, SiteImaging(sharpen=1.0)), render(flat, flat, SiteImaging()), atol=1e-6)
    smooth = gaussian_blur(h.unsqueeze(1), 1.0).squeeze(1)
    assert _sharpness(render(smooth, e, SiteImaging(sharpen=1.0))) > 1.5 * _sharpness(render(smooth, e, SiteImaging()))


def test_lower_resolution_integrates_light_over_sensor_pixels() -> None:
    # A one-pixel checkerboard is finer than a half-resolution sensor: each sensor pixel sees
    # the average transmission of a 2x2 block, so the image comes back uniform.
    checker = ((torch.arange(16).view(-1, 1) + torch.arange(16).view(1, -1)) % 2).float().expand(2, 16, 16)
    zero = torch.zeros_like(checker)
    images = render(checker, zero, SiteImaging(resolution=0.5))
    transmission = torch.exp(-torch.tensor(HEMATOXYLIN_OD))
    expected = ((1 + transmission) / 2).view(1, 3, 1, 1).expand_as(images)
    assert torch.allclose(images, expected, atol=1e-5)


def test_sensor_noise_has_read_and_shot_variance() -> None:
    # A flat field transmitting half the light: OD ln 2 in every channel.
    od = math.log(2)
    site = SiteImaging(hematoxylin=(od, od, od), noise_std=0.02, shot_noise=0.05)
    ones = torch.ones(8, 64, 64)
    images = render(ones, torch.zeros_like(ones), site, torch.Generator().manual_seed(0))
    assert images.mean().item() == pytest.approx(0.5, abs=0.002)
    assert images.std().item() == pytest.approx(math.sqrt(0.02**2 + 0.05**2 * 0.5), rel=0.03)
    again = render(ones, torch.zeros_like(ones), site, torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


def test_render_rejects_mismatched_concentrations() -> None:
    with pytest.raises(ValueError, match=r"\(2, 8, 8\).*\(2, 8, 9\)"):
        render(torch.zeros(2, 8, 8), torch.zeros(2, 8, 9), SiteImaging())


def test_magnification_shows_the_central_field_enlarged() -> None:
    """A scanner with half the pixel size images the central half of the field onto the same pixels: a stain
    pattern seen at magnification 2 equals the ideal scanner's view of its central crop, enlarged bilinearly."""
    h_conc = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(0))
    e_conc = torch.zeros_like(h_conc)
    magnified = render(h_conc, e_conc, SiteImaging(magnification=2.0))
    crop = F.interpolate(h_conc[:, None, 4:12, 4:12], size=(16, 16), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(magnified, render(crop, e_conc, SiteImaging()))


def test_scanner_shift_demo_has_five_fixed_sites_and_few_labels() -> None:
    module = ScannerShiftHistology(cache=False, train_per_site=4, val_per_site=2, test_per_site=2, image_size=32)
    assert module.client_names == [f"site_{index}" for index in range(5)]
    assert module.sites == list(SCANNER_SHIFT_SITES) and ScannerShiftHistology().split_sizes["train"] == 48
    module.setup()
    images, labels = module.dataset("site_2", "train").tensors
    assert images.shape == (4, 3, 32, 32) and labels.tolist().count(1) == 2
    means = [module.dataset(site, "train").tensors[0].mean().item() for site in module.client_names]
    assert max(means) - min(means) > 0.05  # the hospitals' scanners differ visibly


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 0.0),
        ("resolution", 1.5),
        ("blur_sigma", -1.0),
        ("gamma", 0.0),
        ("noise_std", -0.1),
        ("background", (0.1, -0.2, 0.0)),
        ("eosin", (0.1, 0.2)),
        ("magnification", 0.9),
    ],
)
def test_site_imaging_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"{field}.*{value}".replace("(", r"\(").replace(")", r"\)")):
        SiteImaging(**{field: value})


def test_default_sites_are_deterministic_and_diverse() -> None:
    sites = default_sites(7, seed=3)
    assert len(sites) == 7 and sites == default_sites(7, seed=3)
    assert len(set(sites)) == 7
    other = default_sites(7, seed=4)
    assert other[:4] == sites[:4]  # the hand-picked reference sites
    assert other[4:] != sites[4:]  # the sampled ones follow the seed
    with pytest.raises(ValueError, match="num_sites.*0"):
        default_sites(0, seed=0)


# --- tissue ------------------------------------------------------------------------------------


def test_tumour_label_is_morphological() -> None:
    tumour = torch.arange(128) % 2 == 1
    tissue = synthesize_tissue(tumour, 32, torch.Generator().manual_seed(0))
    assert tissue.hematoxylin.shape == tissue.eosin.shape == tissue.nuclei.shape == (128, 32, 32)
    assert tissue.nuclei.dtype == torch.bool
    assert (tissue.hematoxylin >= 0).all() and (tissue.eosin >= 0).all()
    # Tumour nests add large, dark nuclei: more haematoxylin and more nuclear area.
    dna = tissue.hematoxylin.mean(dim=(1, 2))
    area = tissue.nuclei.float().mean(dim=(1, 2))
    assert dna[tumour].mean() > 1.1 * dna[~tumour].mean()
    assert area[tumour].mean() > 1.1 * area[~tumour].mean()


# --- datamodules -------------------------------------------------------------------------------


def _tensors(data: FederatedDataModule) -> list[torch.Tensor]:
    return [t for client in data.client_names for split in SPLITS for t in data.dataset(client, split).tensors]


def test_shapes_dtypes_and_ranges(histology: DemoHistology, nuclei: DemoNuclei) -> None:
    assert histology.client_names == ["site_0", "site_1", "site_2", "site_3"]
    assert isinstance(histology, FederatedDataModule)
    for data, target_shape in ((histology, ()), (nuclei, (32, 32))):
        for client, split in itertools.product(data.client_names, SPLITS):
            images, targets = data.dataset(client, split).tensors
            count = SMALL[f"{split}_per_site"]
            assert images.shape == (count, 3, 32, 32) and images.dtype == torch.float32
            assert targets.shape == (count, *target_shape) and targets.dtype == torch.long
            assert images.min() >= 0 and images.max() <= 1
            assert set(targets.unique().tolist()) <= {0, 1}
            assert data.num_samples(client, split) == count


def test_same_seed_same_data_other_seed_other_data(histology: DemoHistology) -> None:
    again = DemoHistology(**SMALL)
    again.setup()
    assert all(torch.equal(a, b) for a, b in zip(_tensors(histology), _tensors(again)))
    other = DemoHistology(**{**SMALL, "seed": 1})
    other.setup()
    images = [t for t in _tensors(other) if t.dim() == 4]
    assert not any(torch.equal(a, b) for a, b in zip([t for t in _tensors(histology) if t.dim() == 4], images))


def test_setup_generates_once(histology: DemoHistology) -> None:
    before = histology.dataset("site_0", "train").tensors[0]
    histology.setup("fit")
    assert histology.dataset("site_0", "train").tensors[0] is before


def test_labels_are_balanced_per_site_and_split(histology: DemoHistology) -> None:
    for client, split in itertools.product(histology.client_names, SPLITS):
        labels = histology.dataset(client, split).tensors[1]
        assert labels.sum().item() == len(labels) // 2
    odd = DemoHistology(num_sites=1, train_per_site=7, val_per_site=1, test_per_site=0, image_size=16)
    odd.setup()
    assert odd.dataset("site_0", "train").tensors[1].sum().item() == 3


def test_masks_cover_a_sensible_fraction(nuclei: DemoNuclei) -> None:
    fractions = []
    for client in nuclei.client_names:
        masks = nuclei.dataset(client, "train").tensors[1]
        per_image = masks.float().mean(dim=(1, 2))
        assert (per_image > 0).all()
        fractions.append(per_image.mean().item())
    assert all(0.03 < f < 0.35 for f in fractions), fractions
    # The tissue (and so the masks) follows one distribution at every site; imaging differs only.
    assert max(fractions) - min(fractions) < 0.04, fractions


def test_splits_are_independent_streams() -> None:
    base = DemoNuclei(num_sites=2, train_per_site=6, val_per_site=4, test_per_site=4, image_size=16)
    more_test = DemoNuclei(num_sites=2, train_per_site=6, val_per_site=4, test_per_site=9, image_size=16)
    more_train = DemoNuclei(num_sites=2, train_per_site=10, val_per_site=4, test_per_site=4, image_size=16)
    for data in (base, more_test, more_train):
        data.setup()
    for client in base.client_names:
        for split in ("train", "val"):
            for a, b in zip(base.dataset(client, split).tensors, more_test.dataset(client, split).tensors):
                assert torch.equal(a, b)
        for split in ("val", "test"):
            for a, b in zip(base.dataset(client, split).tensors, more_train.dataset(client, split).tensors):
                assert torch.equal(a, b)


def test_sites_differ_in_imaging(histology: DemoHistology) -> None:
    stats = []
    for client in histology.client_names:
        images = torch.cat([histology.dataset(client, split).tensors[0] for split in SPLITS])
        stats.append((images.mean(dim=(0, 2, 3)), _sharpness(images)))
    for (mean_a, sharp_a), (mean_b, sharp_b) in itertools.combinations(stats, 2):
        colour_gap = (mean_a - mean_b).abs().max().item()
        sharpness_ratio = max(sharp_a, sharp_b) / min(sharp_a, sharp_b)
        assert colour_gap > 0.05 or sharpness_ratio > 1.5, (colour_gap, sharpness_ratio)
    # The blurry low-resolution site is the softest, the noisy sharpened one the harshest.
    sharpness = [s for _, s in stats]
    assert sharpness.index(min(sharpness)) == 2 and sharpness.index(max(sharpness)) == 3


def test_dataloader_contract(histology: DemoHistology) -> None:
    def order(seed: int) -> torch.Tensor:
        loader = histology.dataloader("site_1", "train", torch.Generator().manual_seed(seed))
        return torch.cat([images.flatten(1)[:, :8] for images, _ in loader])

    assert torch.equal(order(5), order(5))
    assert not torch.equal(order(5), order(6))
    dataset = histology.dataset("site_1", "train").tensors[0].flatten(1)[:, :8]
    assert set(map(tuple, order(5).tolist())) == set(map(tuple, dataset.tolist()))  # a permutation
    images, targets = next(iter(histology.dataloader("site_1", "val")))
    assert torch.equal(images, histology.dataset("site_1", "val").tensors[0][: len(images)])  # in order
    assert targets.dtype == torch.long


def test_dataset_before_setup_and_unknown_client() -> None:
    data = DemoHistology(num_sites=2)
    assert data.client_names == ["site_0", "site_1"]
    with pytest.raises(RuntimeError, match="setup"):
        data.dataset("site_0", "train")
    data.setup()
    with pytest.raises(KeyError, match="site_9"):
        data.dataset("site_9", "train")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("num_sites", 0),
        ("train_per_site", 0),
        ("val_per_site", -1),
        ("test_per_site", -3),
        ("image_size", 8),
        ("batch_size", 0),
        ("num_workers", -1),
    ],
)
@pytest.mark.parametrize("cls", [DemoHistology, DemoNuclei])
def test_bad_arguments_raise(cls: type, argument: str, value: int) -> None:
    with pytest.raises(ValueError, match=rf"{argument}.*{value}"):
        cls(**{argument: value})


def test_generated_splits_are_cached_and_loaded_identically(tmp_path):
    settings = dict(num_sites=2, train_per_site=8, val_per_site=4, test_per_site=4, image_size=32)
    generated = DemoHistology(**settings, cache=False)
    generated.setup()
    first = DemoHistology(**settings, cache_dir=str(tmp_path))
    first.prepare_data()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 * 3  # one file per site and split
    files[0].write_bytes(b"damaged")  # a damaged file is generated again and overwritten
    second = DemoHistology(**settings, cache_dir=str(tmp_path))
    second.prepare_data()
    second.setup()
    for client in generated.client_names:
        for split in ("train", "val", "test"):
            for ours, reference in zip(second.dataset(client, split).tensors, generated.dataset(client, split).tensors):
                assert torch.equal(ours, reference)
    assert torch.load(files[0], weights_only=True)["images"].shape[1:] == (3, 32, 32)
    other = DemoHistology(**{**settings, "seed": 1}, cache_dir=str(tmp_path))
    other.prepare_data()
    assert len(list(tmp_path.iterdir())) == 2 * 2 * 3  # another seed is another key
    DemoHistology(**settings, cache=False, cache_dir=str(tmp_path / "unused")).setup()
    assert not (tmp_path / "unused").exists()


def test_generation_does_not_depend_on_the_thread_count():
    settings = dict(num_sites=1, train_per_site=4, val_per_site=0, test_per_site=0, image_size=32, cache=False)
    threads = torch.get_num_threads()
    generated = []
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            data = DemoHistology(**settings)
            data.setup()
            generated.append(data.dataset("site_0", "train").tensors[0])
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*generated)
