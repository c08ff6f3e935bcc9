"""``cli.py predict`` (the command line, in this process): probabilities, FedBN sites, masks, NIfTI volumes, errors."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image
from test_prostate import make_release
from test_site_folders import write_sites

from callbacks.harmonization import AmplitudeHarmonization
from harmofl import aggregation
from harmofl.amplitude import expand_window, harmonize
from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build
from harmofl.cli import main as cli_main
from harmofl.data import DemoHistology
from harmofl.data.checks import DataError
from harmofl.data.image_io import read_image, resize
from harmofl.data.mri import preprocess_case
from harmofl.data.prostate import ProstateMRI
from harmofl.data.site_folders import SiteFolders
from harmofl.prediction import expected_image_size

from helpers import CLI_TINY, REPO

FOUR_FEATURES = ["--model.init_args.backbone_kwargs", "{base_features: 4}"]
TINY_SEG = [*CLI_TINY[:6], "--data.init_args.image_size", "32", "--data.init_args.batch_size", "4", *CLI_TINY[-2:]]


def cli(*args: str) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["cli.py", *args])
        cli_main()


def fit(root: Path, config: str, *overrides: str) -> Path:
    cli(
        "fit",
        "--config",
        str(REPO / config),
        "--trainer.rounds",
        "1",
        "--trainer.default_root_dir",
        str(root),
        *overrides,
    )
    return root


def save_images(folder: Path, names: list[str], size: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name)


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def probabilities_by_hand(run: Path, folder: Path, names: list[str], site: str | None) -> torch.Tensor:
    """The plain reference: the checkpoint's weights (with ``site``'s local keys) on the images harmonized to the
    shared target, one batch, evaluation mode."""
    checkpoint = load_checkpoint(run / "checkpoints" / "best.ckpt")
    model = build(["--config", str(REPO / "configs" / "demo.yaml"), *CLI_TINY]).model  # the model the run trained
    local = checkpoint["clients"][site]["local_state"] if site else {}
    model.load_state_dict(aggregation.merge_states(checkpoint["global_state"], local))
    harmonization = checkpoint["callbacks"]["AmplitudeHarmonization"]
    band = harmonization["band"]
    target = expand_window(harmonization["shared_target"], tuple(harmonization["image_shape"]), band)
    images = torch.stack([read_image(folder / name) for name in names])
    with torch.no_grad():
        return model.eval()(harmonize(images, target, band)).softmax(dim=1)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("demo"), "configs/demo.yaml", *CLI_TINY)


@pytest.fixture(scope="module")
def fedbn_run(tmp_path_factory) -> Path:
    return fit(tmp_path_factory.mktemp("fedbn"), "configs/demo.yaml", *CLI_TINY, "--trainer.local_modules", "[norm]")


def test_classification_writes_the_harmonized_models_probabilities_and_argmax(demo_run, tmp_path) -> None:
    names = ["a.png", "b.png", "deeper/c.png"]
    save_images(tmp_path / "in", names, 32)
    save_images(tmp_path / "in", [".hidden.png"], 32)
    cli("predict", "--config", str(demo_run / "config.yaml"), "--predict.input", str(tmp_path / "in"))

    rows = read_rows(demo_run / "predictions" / "best" / "predictions.csv")
    assert [row["image"] for row in rows] == names  # one row per image, relative paths, hidden files ignored
    probabilities = torch.tensor([[float(row["class_0"]), float(row["class_1"])] for row in rows])
    torch.testing.assert_close(probabilities.sum(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert [int(row["prediction"]) for row in rows] == probabilities.argmax(dim=1).tolist()
    expected = probabilities_by_hand(demo_run, tmp_path / "in", names, site=None)
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=0)


def test_a_corrupt_image_is_named(demo_run, tmp_path) -> None:
    save_images(tmp_path / "in", ["good.png", "broken.png"], 32)
    broken = tmp_path / "in" / "broken.png"
    broken.write_bytes(broken.read_bytes()[:200])
    with pytest.raises(DataError, match="broken.png"):
        cli("predict", "--config", str(demo_run / "config.yaml"), "--predict.input", str(tmp_path / "in"))


def test_fedbn_needs_a_site_and_uses_its_norm_layers(fedbn_run, tmp_path) -> None:
    names = ["a.png", "b.png"]
    save_images(tmp_path / "in", names, 32)
    config = ["--config", str(fedbn_run / "config.yaml"), "--predict.input", str(tmp_path / "in")]
    with pytest.raises(ValueError, match=r"BatchNorm2d.*--predict.site.*site_0"):
        cli("predict", *config)
    with pytest.raises(ValueError, match=r"'elsewhere' is not in checkpoint.*site_3"):
        cli("predict", *config, "--predict.site", "elsewhere")

    outputs = {}
    for site in ("site_0", "site_1"):
        cli("predict", *config, "--predict.site", site, "--predict.output", str(tmp_path / site))
        rows = read_rows(tmp_path / site / "predictions.csv")
        outputs[site] = torch.tensor([[float(row["class_0"]), float(row["class_1"])] for row in rows])
    expected = probabilities_by_hand(fedbn_run, tmp_path / "in", names, site="site_0")
    torch.testing.assert_close(outputs["site_0"], expected, atol=1e-5, rtol=0)
    assert not torch.allclose(outputs["site_0"], outputs["site_1"], atol=1e-4)


def test_segmentation_masks_have_the_inputs_size_and_other_sizes_are_resized_only_when_asked(tmp_path) -> None:
    run = fit(tmp_path / "run", "configs/demo_seg.yaml", *TINY_SEG, *FOUR_FEATURES)
    save_images(tmp_path / "in", ["a.png", "sub/b.jpg"], 32)
    cli("predict", "--config", str(run / "config.yaml"), "--predict.input", str(tmp_path / "in"))
    for name in ("a.png", "sub/b.png"):
        mask = np.asarray(Image.open(run / "predictions" / "best" / name))
        assert mask.shape == (32, 32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}

    save_images(tmp_path / "large", ["big.png"], 48)
    command = ["--config", str(run / "config.yaml"), "--predict.input", str(tmp_path / "large" / "big.png")]
    with pytest.raises(DataError, match=r"big.png.*48×48.*32×32.*--predict.resize true"):
        cli("predict", *command)
    cli("predict", *command, "--predict.resize", "true", "--predict.output", str(tmp_path / "out"))
    assert np.asarray(Image.open(tmp_path / "out" / "big.png")).shape == (48, 48)

    # A checkpoint of another model (other widths) is refused with restore_checkpoint's message.
    with pytest.raises(ValueError, match="does not fit this model"):
        cli("predict", *command, "--model.init_args.backbone_kwargs", "{base_features: 8}")


def test_a_nifti_volume_gets_a_mask_volume_with_its_affine_and_shape(tmp_path) -> None:
    release = make_release(tmp_path / "data")
    run = fit(
        tmp_path / "run",
        "configs/prostate.yaml",
        *("--data.init_args.root", str(release), "--data.init_args.image_size", "32"),
        *("--data.init_args.batch_size", "4", "--trainer.accelerator", "cpu"),
        *FOUR_FEATURES,
        *("--trainer.enable_progress_bar", "false"),
    )
    affine = np.diag([0.6, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-10.0, 5.0, 2.5]
    volume = np.random.default_rng(1).uniform(0, 900, (40, 36, 6)).astype(np.float32)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "in" / "Case99.nii.gz")
    cli(
        "predict",
        *("--config", str(run / "config.yaml")),
        *("--predict.input", str(tmp_path / "in"), "--predict.output", str(tmp_path / "out")),
    )
    mask = cast(nib.Nifti1Image, nib.load(tmp_path / "out" / "Case99.nii.gz"))
    assert mask.shape == volume.shape
    np.testing.assert_allclose(mask.affine, affine)
    assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1}


def test_prostate_masks_go_back_to_the_volumes_voxel_grid(tmp_path) -> None:
    """Slices of an asymmetric [X, Y, Z] volume, preprocessed at twice and four times its sides, map back exactly."""
    mask = np.zeros((16, 8, 5), dtype=np.uint8)
    mask[2:9, 1:3, 1:4] = 1
    mask[12, 6, 4] = 1
    path = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(mask.astype(np.float32), np.eye(4)), path)
    data = ProstateMRI(root=str(tmp_path), image_size=32)
    _, slices, _ = preprocess_case(mask.astype(np.float32), mask, 99.0, 1.0, 32)
    assert slices.shape == (5, 32, 32)
    np.testing.assert_array_equal(data.unlabelled_mask(path, slices.long()).numpy(), mask)
    assert data.read_unlabelled(path).shape == (5, 3, 32, 32)  # every slice, with its neighbours as channels


def test_image_file_sources_read_unlabelled_images_as_their_training_images(tmp_path) -> None:
    save_images(tmp_path, ["x.png"], 24)
    data = SiteFolders(root=str(tmp_path), image_size=16, channels=1)
    expected = resize(read_image(tmp_path / "x.png", channels=1), 16)
    torch.testing.assert_close(data.read_unlabelled(tmp_path / "x.png"), expected[None])


def test_site_folders_resize_as_in_training_and_skip_bad_files_under_the_skip_policy(tmp_path) -> None:
    sites = write_sites(tmp_path / "sites")
    size = ["--data.init_args.image_size", "32", "--data.init_args.batch_size", "8"]
    run = fit(
        tmp_path / "run",
        "configs/site_folders.yaml",
        *("--data.init_args.root", str(sites), *size, "--trainer.enable_progress_bar", "false"),
    )
    save_images(tmp_path / "in", ["broken.png"], 32)
    (tmp_path / "in" / "broken.png").write_bytes(b"not an image")
    save_images(tmp_path / "in", ["square.png"], 32)
    wide = np.random.default_rng(2).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "in" / "wide.png")  # resized to 32×32 as the training images
    command = ["predict", "--config", str(run / "config.yaml"), "--predict.input", str(tmp_path / "in")]
    with pytest.warns(UserWarning, match=r"Skipped 1 unreadable.*broken.png"):
        cli(*command, "--data.init_args.on_bad_sample", "skip")
    rows = read_rows(run / "predictions" / "best" / "predictions.csv")
    assert [row["image"] for row in rows] == ["square.png", "wide.png"]


def test_without_a_shared_target_a_site_must_be_chosen_and_its_own_target_gives_the_size() -> None:
    harmonization = AmplitudeHarmonization(share_target="never")
    harmonization.client_targets = {"site_0": torch.ones(3, 1, 1)}
    harmonization.client_image_shapes = {"site_0": (3, 24, 24)}
    trainer = cast(Any, SimpleNamespace(callbacks=[harmonization]))  # all expected_image_size reads of a trainer
    data = DemoHistology(image_size=64)
    with pytest.raises(ValueError, match=r"no shared amplitude target.*--predict.site.*site_0"):
        expected_image_size(trainer, data, None)
    assert expected_image_size(trainer, data, "site_0") == (24, 24)
    assert expected_image_size(cast(Any, SimpleNamespace(callbacks=[])), data, None) == (64, 64)
