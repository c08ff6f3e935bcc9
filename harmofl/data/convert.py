"""Nuclei data as published, in the :class:`~harmofl.data.segmentation_folders.SegmentationFolders` layout.

``python -m harmofl.data.convert monuseg|monusac SRC DST [--sites SITES.csv]`` rasterizes the polygon annotations
(Aperio ImageScope XML) of each image into an instance mask and writes, per site::

    DST/<site>/images/<stem>.png     the image, lossless 8-bit RGB (the releases ship .tif)
    DST/<site>/masks/<stem>.png      16-bit instance labels: 0 background, 1..N one per annotated nucleus

The releases, as downloaded:

- **MoNuSeg** (Kumar et al.): ``Tissue Images/<stem>.tif`` beside ``Annotations/<stem>.xml`` (training and test
  sets alike; SRC may hold both). One site, ``monuseg``: HarmoFL's protocol takes the whole source as one site.
- **MoNuSAC 2020**: one folder per patient (a TCGA barcode such as ``TCGA-55-1594-01Z-00-DX1``) holding
  ``<stem>.tif`` and ``<stem>.xml`` per image (``.svs`` slides are ignored). Each XML ``Annotation`` is a cell
  type (Epithelial, Lymphocyte, Macrophage, Neutrophil): every type is a nucleus here; ``Ambiguous`` regions are
  left as background. Without ``--sites``, a site per TCGA tissue source site (the two characters after ``TCGA-``:
  the contributing hospital, whose scanner and staining the images share), named ``tss_<code>``. HarmoFL's protocol
  used four MoNuSAC sites, one per organ; the release's files do not name the organ, so pass a ``--sites`` CSV
  mapping each patient folder to its organ to group them that way.

``--sites`` is a CSV with the columns ``name,site``: ``name`` a patient folder (MoNuSAC) or an image stem; every
image must be covered. An image whose annotation or site is missing, or whose annotation is unreadable or not in
the schema, stops the conversion with an error naming the file, before anything is written. Files are written
atomically, so an interrupted conversion never leaves a truncated image; converting again overwrites.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from jsonargparse import auto_cli
from PIL import Image, ImageDraw

from harmofl.data.checks import DataError, require_dir, require_file
from harmofl.data.image_io import read_image
from harmofl.run_folder import atomic_file

Source = Literal["monuseg", "monusac"]
#: MoNuSAC's label for regions the annotators could not decide: not a nucleus of any type.
AMBIGUOUS = "ambiguous"
#: An annotation file larger than this is refused unread (the largest MoNuSeg file is ~5 MB).
MAX_ANNOTATION_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Polygon:
    """One annotated region: its annotation's label and its vertices ``(x, y)`` in pixels."""

    label: str
    vertices: list[tuple[float, float]]


@dataclass(frozen=True)
class AnnotatedImage:
    """An image, its annotation file, and the name a ``--sites`` CSV gives it (patient folder or stem)."""

    image: Path
    annotation: Path
    name: str


def read_polygons(path: Path) -> list[Polygon]:
    """Every region of an ImageScope XML file: ``Annotations/Annotation`` (its label: the ``Name`` of its first
    ``Attributes/Attribute``, or empty) holding ``Regions/Region/Vertices/Vertex`` with ``X`` and ``Y``."""
    if path.stat().st_size > MAX_ANNOTATION_BYTES:
        raise DataError(f"{path}: annotation larger than {MAX_ANNOTATION_BYTES} bytes; not an annotation of one image.")
    try:
        root = ElementTree.parse(path).getroot()  # expat >= 2.4 bounds entity expansion
    except ElementTree.ParseError as error:
        raise DataError(f"{path}: not well-formed XML ({error}).") from error
    if root.tag != "Annotations":
        raise DataError(f"{path}: root element is <{root.tag}>, not <Annotations> (ImageScope XML).")
    polygons = []
    for annotation in root.iter("Annotation"):
        attribute = annotation.find("Attributes/Attribute")
        label = attribute.get("Name", "") if attribute is not None else ""
        for region in annotation.iter("Region"):
            try:
                vertices = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
            except (KeyError, ValueError) as error:
                raise DataError(f"{path}: region {region.get('Id')!r} has a vertex without numeric X/Y.") from error
            if vertices and not np.isfinite(np.asarray(vertices)).all():
                raise DataError(f"{path}: region {region.get('Id')!r} has a non-finite vertex.")
            polygons.append(Polygon(label, vertices))
    return polygons


def rasterize(polygons: list[Polygon], width: int, height: int) -> np.ndarray:
    """A ``[height, width]`` uint16 instance mask: region ``i`` (in file order, ambiguous ones and those of fewer
    than 3 vertices skipped) filled with label ``i + 1``; a later region overwrites an earlier one where they
    overlap. Vertices outside the image are clipped by the fill."""
    nuclei = [p for p in polygons if p.label.lower() != AMBIGUOUS and len(p.vertices) >= 3]
    if len(nuclei) > np.iinfo(np.uint16).max:
        raise DataError(f"{len(nuclei)} regions do not fit 16-bit instance labels.")
    canvas = Image.new("I", (width, height), 0)  # 32-bit: labels beyond 255 without wrap-around
    draw = ImageDraw.Draw(canvas)
    for index, polygon in enumerate(nuclei, start=1):
        draw.polygon(polygon.vertices, fill=index, outline=index)
    return np.asarray(canvas, dtype=np.int64).astype(np.uint16)


def find_images(source: Source, src: Path) -> list[AnnotatedImage]:
    """The annotated images of a release under ``src``, sorted by path; an image without its XML is an error."""
    images = sorted(p for p in src.rglob("*") if p.suffix.lower() in (".tif", ".tiff") and p.is_file())
    if not images:
        raise DataError(f"{str(src)!r} holds no .tif images: pass the unpacked {source} release folder.")
    found = []
    for image in images:
        candidates = [image.with_suffix(".xml"), image.parent.parent / "Annotations" / f"{image.stem}.xml"]
        annotation = next((path for path in candidates if path.is_file()), None)
        if annotation is None:
            raise DataError(f"{image}: no annotation {candidates[0].name} beside it or in ../Annotations.")
        found.append(AnnotatedImage(image, annotation, image.parent.name if source == "monusac" else image.stem))
    return found


def read_site_map(path: Path) -> dict[str, str]:
    """``name -> site`` from a CSV with the header ``name,site``."""
    with require_file(path, "--sites").open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not {"name", "site"} <= set(reader.fieldnames or []):
            raise DataError(f"{path}: the header must be 'name,site', got {reader.fieldnames}.")
        return {row["name"].strip(): row["site"].strip() for row in reader}


def site_of(source: Source, item: AnnotatedImage, site_map: dict[str, str] | None) -> str:
    """The site ``item`` belongs to (see the module docstring)."""
    if site_map is not None:
        site = site_map.get(item.name) or site_map.get(item.image.stem)
        if not site or "/" in site or site.startswith("."):
            raise DataError(f"{item.image}: --sites gives no usable site for {item.name!r} (got {site!r}).")
        return site
    if source == "monuseg":
        return "monuseg"
    parts = item.name.split("-")
    if len(parts) < 2 or parts[0] != "TCGA":
        raise DataError(f"{item.image}: folder {item.name!r} is no TCGA barcode; pass --sites to name its site.")
    return f"tss_{parts[1]}"


def converted(
    source: Source, src: Path, site_map: dict[str, str] | None
) -> Iterator[tuple[str, str, Image.Image, np.ndarray]]:
    """``(site, stem, image, instance mask)`` per annotated image. Every site and annotation is resolved before
    the first image is yielded, so a bad one stops the conversion before anything is written."""
    items = find_images(source, src)
    checked = [(item, site_of(source, item, site_map), read_polygons(item.annotation)) for item in items]
    for item, site, polygons in checked:
        pixels = (read_image(item.image).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
        height, width = pixels.shape[:2]
        yield site, item.image.stem, Image.fromarray(pixels), rasterize(polygons, width, height)


def convert(source: Source, src: Path, dst: Path, sites: Path | None = None) -> dict[str, int]:
    """Convert the ``source`` release under ``src`` into ``dst``; returns the number of images per site.

    Args:
        source: ``monuseg`` or ``monusac``.
        src: the unpacked release folder.
        dst: the data root to write (``data.root`` of a ``SegmentationFolders`` config).
        sites: optional CSV ``name,site`` (patient folder or image stem → site).
    """
    src = require_dir(src, f"the {source} release folder")
    site_map = read_site_map(sites) if sites is not None else None
    counts: dict[str, int] = {}
    written: set[tuple[str, str]] = set()
    for site, stem, image, mask in converted(source, src, site_map):
        if (site, stem) in written:  # the training and test sets of a release never share a name: a mix-up
            raise DataError(f"Two images named {stem!r} go to site {site!r}: convert the sets apart or rename one.")
        written.add((site, stem))
        for folder, picture in (("images", image), ("masks", Image.fromarray(mask))):
            with atomic_file(dst / site / folder / f"{stem}.png") as handle:  # creates the folders
                picture.save(handle, format="PNG")
        counts[site] = counts.get(site, 0) + 1
    for site, count in sorted(counts.items()):
        print(f"{site}: {count} images")
    return counts


if __name__ == "__main__":
    auto_cli(convert)
