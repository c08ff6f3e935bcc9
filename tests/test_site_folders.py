"""Bring-your-own classification sites (one folder per site, labels.csv): splits, formats, checks, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmofl.data.checks import DataError
from harmofl.data.site_folders import SiteFolders

from helpers import run_cli

FORMATS = (".png", ".jpg", ".bmp", ".tif")


def write_image(path: Path, generator: np.random.Generator, grey: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = (30, 40) if grey else (30, 40, 3)  # not square: every image is resized
    Image.fromarray(generator.integers(0, 256, shape, dtype=np.uint8)).save(path)


def write_site(folder: Path, rows: list[tuple[str, ...]], header: str = "image,label,split") -> Path:
    """A site folder: labels.csv with ``header`` and ``rows``, and an image for every row's path."""
    generator = np.random.default_rng(len(rows))
    for index, row in enumerate(rows):
        write_image(folder / row[0], generator, grey=index % 3 == 0)
    (folder / "labels.csv").write_text("\n".join([header, *(",".join(row) for row in rows)]) + "\n")
    return folder


def a_rows() -> list[tuple[str, str, str]]:
    """site_a: an explicit split column, 6 train, 2 val, 2 test rows (interleaved)."""
    splits = ["train", "train", "val", "train", "test", "train", "val", "train", "test", "train"]
    return [(f"images/a{i}{FORMATS[i % 4]}", str(i % 2), split) for i, split in enumerate(splits)]


def b_rows() -> list[tuple[str, str]]:
    """site_b: no split column, 20 rows, files in nested folders."""
    return [(f"scans/{i // 10}/b{i}{FORMATS[i % 4]}", str(int(i % 3 == 0))) for i in range(20)]


def write_sites(root: Path) -> Path:
    write_site(root / "site_a", a_rows())
    write_site(root / "site_b", b_rows(), header="image,label")
    (root / ".cache").mkdir()  # hidden folders are not sites
    return root


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    return write_sites(tmp_path_factory.mktemp("sites"))


def files(module: SiteFolders, client: str, split: str) -> list[str]:
    return [name.decode() for name in module.dataset(client, split).files]  # type: ignore[attr-defined]


def test_explicit_split_column_and_labels(sites):
    module = SiteFolders(str(sites), image_size=24, batch_size=16)
    module.setup()
    assert module.client_names == ["site_a", "site_b"]
    for split in ("train", "val", "test"):
        assert files(module, "site_a", split) == [row[0] for row in a_rows() if row[2] == split]
    images, labels = next(iter(module.dataloader("site_a", "train")))
    assert images.dtype == torch.float32 and images.shape == (6, 3, 24, 24)
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.1
    assert labels.dtype == torch.long
    assert sorted(labels.tolist()) == sorted(int(row[1]) for row in a_rows() if row[2] == "train")
    assert module.skipped == {"site_a": 0, "site_b": 0}


def test_grey_channels_and_native_size(sites):
    module = SiteFolders(str(sites), sites=["site_a"], image_size=40, channels=1)
    module.setup()
    image, label = module.dataset("site_a", "test")[0]
    assert image.shape == (1, 40, 40) and image.min() >= 0.0 and image.max() <= 1.0
    assert label.dtype == torch.long and label.item() == int(a_rows()[4][1])


def test_fraction_split_is_disjoint_complete_seeded_and_per_site(sites):
    def split_of(seed: int, chosen: list[str] | None = None) -> dict[str, list[str]]:
        module = SiteFolders(str(sites), sites=chosen, image_size=16, seed=seed)
        module.setup()
        return {split: files(module, "site_b", split) for split in ("train", "val", "test")}

    first = split_of(0)
    assert [len(first[s]) for s in ("train", "val", "test")] == [14, 3, 3]
    assert sorted(sum(first.values(), [])) == sorted(row[0] for row in b_rows())  # noqa: RUF017  # 3 short lists
    order = [row[0] for row in b_rows()]
    assert all(names == sorted(names, key=order.index) for names in first.values())  # labels.csv order kept
    assert split_of(0, ["site_b"]) == first  # a site's split does not depend on the other sites
    assert split_of(1) != first


def test_bad_and_missing_images_are_named_or_skipped(tmp_path):
    root = write_sites(tmp_path / "sites")
    missing, corrupt = root / "site_b" / b_rows()[0][0], root / "site_b" / b_rows()[1][0]
    missing.unlink()
    corrupt.write_bytes(corrupt.read_bytes()[:60])
    with pytest.raises(DataError, match=re.escape(f"Client 'site_b': {missing}: file is missing")):
        SiteFolders(str(root)).setup()
    module = SiteFolders(str(root), on_bad_sample="skip")
    with pytest.warns(UserWarning, match="skipped"):
        module.setup()
    assert module.skipped == {"site_a": 0, "site_b": 2}
    assert sum(module.num_samples("site_b", s) for s in ("train", "val", "test")) == 18
    write_image(missing, np.random.default_rng(0))
    checked = SiteFolders(str(root))
    checked.setup()  # under on_bad_sample=error, a site's images are decoded (checked) when it is loaded
    with pytest.raises(DataError, match=re.escape(f"{corrupt}: corrupt image")):
        checked.load(["site_b"])


@pytest.mark.parametrize(
    ("labels_csv", "named"),
    [
        ("image,split\nimages/a0.png,train\n", r"missing column\(s\) 'label'"),
        ("image,label,split,notes\nimages/a0.png,1,train,x\n", r"unknown column\(s\) 'notes'"),
        (
            "image,label,split\nimages/a0.png,1,train\nimages/a1.jpg,1,validation\n",
            "line 3: unknown split 'validation'; expected one of train, val, test",
        ),
        ("image,label,split\nimages/a0.png,cat,train\n", "line 2: column 'label' holds 'cat', not an integer"),
        ("image,label,split\nimages/a0.png,-1,train\n", "line 2: label -1 is negative"),
        ("image,label,split\nimages/a0.png,1\n", r"line 2: 2 field\(s\) where the header has 3"),
        ("", "is empty: its first line must name the columns image, label"),
    ],
)
def test_labels_file_problems_are_named(tmp_path, labels_csv, named):
    root = write_sites(tmp_path / "sites")
    labels = root / "site_a" / "labels.csv"
    labels.write_text(labels_csv)
    with pytest.raises(DataError, match=named) as error:
        SiteFolders(str(root)).setup()
    assert str(labels) in str(error.value)


def test_missing_folders_files_and_empty_splits_are_named(tmp_path):
    with pytest.raises(DataError, match="root '/nowhere' is not a folder"):
        SiteFolders("/nowhere").setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no site folders"):
        SiteFolders(str(tmp_path / "empty")).setup()
    root = write_sites(tmp_path / "sites")
    with pytest.raises(DataError, match=r"Site folder\(s\) \[.site_z.\] not found"):
        SiteFolders(str(root), sites=["site_a", "site_z"]).setup()
    write_site(root / "site_c", [("x.png", "0", "train"), ("y.png", "1", "val")])
    with pytest.raises(DataError, match="'site_c' has no samples in its 'test' split.*labels.csv"):
        SiteFolders(str(root)).setup()
    (root / "site_c" / "labels.csv").unlink()
    with pytest.raises(DataError, match=re.escape(f"site 'site_c' '{root / 'site_c' / 'labels.csv'}' does not exist")):
        SiteFolders(str(root)).setup()
    with pytest.raises(ValueError, match="fractions"):
        SiteFolders(str(root), fractions=(0.7, 0.3, 0.3))


def test_one_round_through_the_cli(sites, tmp_path):
    run_cli(
        "fit",
        "--config",
        "configs/site_folders.yaml",
        "--data.init_args.root",
        str(sites),
        "--trainer.rounds",
        "1",
        "--data.init_args.batch_size",
        "8",
        "--data.init_args.image_size",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--trainer.enable_progress_bar",
        "false",
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["clients"]) == {"site_a", "site_b"}
