"""Reading site files: images, masks, integrity checks and the bad-sample policy; the loaders' keyword-only options."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmofl.data import Camelyon17, DemoHistology, DemoNuclei, ProstateMRI, SegmentationFolders, SiteFolders
from harmofl.data.checks import DataError, keep_good_samples, require_dir
from harmofl.data.image_io import image_is_intact, read_image, read_mask


def _save(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def test_read_image_scales_8_and_16_bit_to_unit_range(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    image = read_image(_save(tmp_path / "a.png", rgb))
    assert image.shape == (3, 4, 5) and image.dtype == torch.float32
    torch.testing.assert_close(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    grey16 = np.full((3, 3), 65535, dtype=np.uint16)
    assert float(read_image(_save(tmp_path / "b.png", grey16), channels=1).max()) == 1.0
    with pytest.raises(ValueError, match="channels"):
        read_image(tmp_path / "a.png", channels=2)


def test_read_mask_turns_instances_and_colours_into_foreground(tmp_path):
    instances = np.array([[0, 3], [17, 0]], dtype=np.uint16)
    assert read_mask(_save(tmp_path / "m.png", instances)).tolist() == [[0, 1], [1, 0]]
    colour = np.zeros((2, 2, 3), dtype=np.uint8)
    colour[1, 1, 2] = 200
    assert read_mask(_save(tmp_path / "c.png", colour)).tolist() == [[0, 0], [0, 1]]


def test_corrupt_and_missing_files_are_named(tmp_path):
    good = _save(tmp_path / "good.png", np.zeros((8, 8, 3), dtype=np.uint8))
    truncated = tmp_path / "bad.png"
    truncated.write_bytes(good.read_bytes()[:40])
    assert image_is_intact(good) is None
    assert "corrupt" in image_is_intact(truncated)
    assert image_is_intact(tmp_path / "absent.png") == "file is missing"
    assert image_is_intact(truncated, verify=False) is None  # existence only
    assert image_is_intact(tmp_path / "absent.png", verify=False) == "file is missing"
    with pytest.raises(DataError, match="bad.png"):
        read_image(truncated)
    with pytest.raises(DataError, match="not a folder"):
        require_dir(tmp_path / "nowhere", "Data root")


def test_bad_samples_raise_by_default_and_are_counted_when_skipped(tmp_path):
    samples = ["a", "b", "c"]
    problem = {"b": "file is missing"}.get
    with pytest.raises(DataError, match="'site'.*b: file is missing.*on_bad_sample: skip"):
        keep_good_samples("site", samples, problem, str, "error")
    with pytest.warns(UserWarning, match="skipped 1 bad sample"):
        assert keep_good_samples("site", samples, problem, str, "skip") == (["a", "c"], 1)
    with pytest.raises(ValueError, match="'ignore'"):
        keep_good_samples("site", samples, problem, str, "ignore")


@pytest.mark.parametrize(
    ("cls", "leading"),
    [
        (DemoHistology, (2,)),
        (DemoNuclei, (2,)),
        (SiteFolders, ("/data", None)),
        (SegmentationFolders, ("/data", None)),
        (ProstateMRI, ("/data", None)),
        (Camelyon17, ("/data", None)),
    ],
)
def test_options_after_the_root_and_sites_are_keyword_only(cls, leading):
    # An option passed by position would bind to whichever parameter now stands there: it must fail instead.
    with pytest.raises(TypeError, match="positional argument"):
        cls(*leading, 64)
