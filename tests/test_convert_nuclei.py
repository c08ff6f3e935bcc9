"""The nuclei converter on tiny releases written in the published layouts and ImageScope XML schema."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmofl.data.checks import DataError
from harmofl.data.convert import convert, rasterize, read_polygons
from harmofl.data.segmentation_folders import SegmentationFolders

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32
MONUSEG_STEMS = ("TCGA-A7-A13E-01Z-00-DX1", "TCGA-18-5592-01Z-00-DX1", "TCGA-21-5784-01Z-00-DX1")


def imagescope_xml(annotations: dict[str, list[list[tuple[float, float]]]]) -> str:
    """An Aperio ImageScope annotation file as MoNuSeg and MoNuSAC ship them: one Annotation per label."""
    parts = ['<?xml version="1.0" encoding="UTF-8"?>\n<Annotations MicronsPerPixel="0.252100">']
    for number, (label, regions) in enumerate(annotations.items(), start=1):
        parts.append(f'<Annotation Id="{number}" Name="" ReadOnly="0" Type="4" LineColor="65280" Visible="1">')
        parts.append(f'<Attributes><Attribute Name="{label}" Id="0" Value=""/></Attributes>\n<Regions>')
        parts.append('<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>')
        parts.append("</RegionAttributeHeaders>")
        for index, vertices in enumerate(regions, start=1):
            parts.append(f'<Region Id="{index}" Type="0" Zoom="0.5" Selected="0" Text="" DisplayId="{index}">')
            parts.append("<Attributes/>\n<Vertices>")
            parts.extend(f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in vertices)
            parts.append("</Vertices>\n</Region>")
        parts.append("</Regions>\n<Plots/>\n</Annotation>")
    parts.append("</Annotations>\n")
    return "\n".join(parts)


def square(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def write_tif(path: Path, seed: int) -> np.ndarray:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


@pytest.fixture
def monuseg(tmp_path: Path) -> Path:
    """MoNuSeg's layout: ``Tissue Images/*.tif`` and ``Annotations/*.xml``; three images, the second with 300
    one-pixel regions (labels beyond 8 bits)."""
    src = tmp_path / "MoNuSeg 2018 Training Data"
    for index, stem in enumerate(MONUSEG_STEMS):
        write_tif(src / "Tissue Images" / f"{stem}.tif", index)
    (src / "Annotations").mkdir()
    regions = {
        MONUSEG_STEMS[0]: [square(2, 2, 9, 9), square(20, 20, 25, 28), square(7, 7, 12, 12)],
        MONUSEG_STEMS[1]: [square(x, y, x, y) for x in range(30) for y in range(10)],
        MONUSEG_STEMS[2]: [square(0, 0, 31, 3)],
    }
    for stem, squares in regions.items():
        (src / "Annotations" / f"{stem}.xml").write_text(imagescope_xml({"Description": squares}))
    return src


def test_polygons_are_filled_with_one_label_each_later_regions_on_top(monuseg, tmp_path):
    polygons = read_polygons(monuseg / "Annotations" / "TCGA-A7-A13E-01Z-00-DX1.xml")
    assert [p.label for p in polygons] == ["Description"] * 3 and polygons[1].vertices[2] == (25.0, 28.0)
    mask = rasterize(polygons, SIZE, SIZE)
    expected = np.zeros((SIZE, SIZE), np.uint16)  # PIL fills a polygon's pixels including its outline
    expected[2:10, 2:10] = 1
    expected[20:29, 20:26] = 2
    expected[7:13, 7:13] = 3  # overlaps the first: the later region wins
    np.testing.assert_array_equal(mask, expected)


def test_monuseg_converts_into_one_site_that_segmentation_folders_reads(monuseg, tmp_path):
    dst = tmp_path / "nuclei"
    assert convert("monuseg", monuseg, dst) == {"monuseg": 3}
    site = dst / "monuseg"
    for stem in MONUSEG_STEMS:  # lossless: the PNG holds the TIF's pixels
        image = np.asarray(Image.open(site / "images" / f"{stem}.png"))
        np.testing.assert_array_equal(image, np.asarray(Image.open(monuseg / "Tissue Images" / f"{stem}.tif")))
    labels = np.asarray(Image.open(site / "masks" / f"{MONUSEG_STEMS[1]}.png"))
    assert labels.dtype == np.uint16 and labels.max() == 300 and np.count_nonzero(labels) == 300  # none wrapped
    data = SegmentationFolders(str(dst), patch_size=16, fractions=(0.34, 0.33, 0.33), seed=0)
    data.setup("fit")
    assert data.client_names == ["monuseg"]
    foreground = sum(np.count_nonzero(np.asarray(Image.open(site / "masks" / f"{s}.png"))) for s in MONUSEG_STEMS)
    patches = [mask for split in ("train", "val", "test") for _, mask in data.dataset("monuseg", split)]
    assert len(patches) == 3 * 4 and sum(int(mask.sum()) for mask in patches) == foreground


def monusac_release(root: Path) -> Path:
    """MoNuSAC's layout: a folder per patient holding ``<patient>_<n>.tif``/``.xml`` (and ``.svs`` slides)."""
    src = root / "MoNuSAC_images_and_annotations"
    for index, patient in enumerate(("TCGA-55-1594-01Z-00-DX1", "TCGA-5P-A9K0-01Z-00-DX1", "TCGA-55-7227-01Z-00-DX1")):
        write_tif(src / patient / f"{patient}_1.tif", index)
        (src / patient / f"{patient}.svs").write_bytes(b"not read")
        cells = {"Epithelial": [square(1, 1, 6, 6)], "Lymphocyte": [square(10, 10, 14, 14)]}
        cells["Ambiguous"] = [square(20, 20, 30, 30)]
        (src / patient / f"{patient}_1.xml").write_text(imagescope_xml(cells))
    return src


def test_monusac_sites_by_tissue_source_site_every_cell_type_a_nucleus_ambiguous_background(tmp_path):
    src, dst = monusac_release(tmp_path), tmp_path / "nuclei"
    assert convert("monusac", src, dst) == {"tss_55": 2, "tss_5P": 1}
    labels = np.asarray(Image.open(dst / "tss_5P" / "masks" / "TCGA-5P-A9K0-01Z-00-DX1_1.png"))
    assert labels[3, 3] == 1 and labels[12, 12] == 2 and labels[25, 25] == 0 and labels.max() == 2


def test_monusac_sites_from_a_csv_by_patient_folder(tmp_path):
    src, dst = monusac_release(tmp_path), tmp_path / "nuclei"
    sites = tmp_path / "organs.csv"
    sites.write_text(
        "name,site\nTCGA-55-1594-01Z-00-DX1,lung\nTCGA-55-7227-01Z-00-DX1,lung\nTCGA-5P-A9K0-01Z-00-DX1,kidney\n"
    )
    assert convert("monusac", src, dst, sites) == {"lung": 2, "kidney": 1}
    sites.write_text("name,site\nTCGA-55-1594-01Z-00-DX1,lung\n")
    with pytest.raises(DataError, match="TCGA-55-7227-01Z-00-DX1.*no usable site"):
        convert("monusac", src, tmp_path / "other", sites)
    assert not (tmp_path / "other").exists()  # checked before anything is written


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("<Annotations><Annotation><Regions><Region", "not well-formed XML"),
        ("<Root/>", "not <Annotations>"),
        ('<Annotations><Annotation><Regions><Region Id="4"><Vertices><Vertex X="1"/>', "not well-formed"),
        (
            '<Annotations><Annotation><Regions><Region Id="4"><Vertices><Vertex X="1" Y="a"/></Vertices></Region>'
            "</Regions></Annotation></Annotations>",
            "region '4' has a vertex without numeric X/Y",
        ),
        (
            '<Annotations><Annotation><Regions><Region Id="5"><Vertices><Vertex X="nan" Y="1"/></Vertices></Region>'
            "</Regions></Annotation></Annotations>",
            "region '5' has a non-finite vertex",
        ),
    ],
)
def test_a_bad_annotation_is_refused_naming_the_file(tmp_path, content, message):
    path = tmp_path / "bad.xml"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as error:
        read_polygons(path)
    assert "bad.xml" in str(error.value)


def test_an_image_without_annotation_or_site_is_refused_and_nothing_written(monuseg, tmp_path):
    (monuseg / "Annotations" / "TCGA-18-5592-01Z-00-DX1.xml").unlink()
    with pytest.raises(DataError, match="TCGA-18-5592-01Z-00-DX1.tif: no annotation"):
        convert("monuseg", monuseg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .tif images"):
        convert("monusac", tmp_path / "empty", tmp_path / "out")


def test_command_line_converts(monuseg, tmp_path):
    dst = tmp_path / "nuclei"
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "harmofl.data.convert", "monuseg", str(monuseg), str(dst)],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "monuseg: 3 images" in done.stdout
    assert sorted(p.name for p in (dst / "monuseg" / "masks").iterdir()) == sorted(f"{s}.png" for s in MONUSEG_STEMS)
