"""``cli.py predict``: a checkpoint applied to inputs no one labelled, harmonized as the federation's test images.

The trainer restores the checkpoint through its public path (:meth:`~harmofl.trainer.FederatedTrainer.predict`);
here the site whose local keys the model takes is chosen, every input file is read as its data source reads training
images (:meth:`~harmofl.data.base.FederatedDataModule.read_unlabelled`), checked for size, batched, harmonized by the
callbacks' ``on_predict_batch_start`` hooks, and its prediction written (:mod:`harmofl.prediction_io`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from harmofl.data.base import FederatedDataModule, FileFederation
from harmofl.data.checks import DataError
from harmofl.prediction_io import (
    check_distinct_outputs,
    list_inputs,
    mask_name,
    progress_reporter,
    resize_images,
    resize_masks,
    write_nifti_mask,
    write_png_mask,
    write_probability_table,
)

if TYPE_CHECKING:
    from harmofl.trainer import FederatedTrainer

ImageSize = tuple[int, int]


@dataclass
class PredictionSettings:
    """What ``cli.py predict`` reads and where it writes.

    Args:
        input: an input file, or a folder of them (searched recursively, hidden files ignored): 2-D images
            (``.png``, ``.tif``, ``.jpg``, ``.bmp``), or NIfTI volumes (``.nii``, ``.nii.gz``) for ``ProstateMRI``.
        output: the folder the predictions go to; null: ``<run folder>/predictions/<checkpoint name>``.
        site: whose local keys (FedBN's normalization layers) the model takes and, when the checkpoint has no
            shared amplitude target, whose own target harmonizes the inputs; required with local keys.
        batch_size: the most images (slices of a volume) per forward pass; consecutive files share batches. With
            ``model.batch_norm_stats: batch`` a batch's images are normalized together, as in evaluation.
        resize: an image of another size than the model was trained on is resized to it (bilinear) and its mask
            back to the image's size (nearest); false refuses such an image, naming it. Sources that resize their
            training images (``SiteFolders``, ``Camelyon17``: ``image_size``) resize inputs alike in any case.
    """

    input: str
    output: str | None = None
    site: str | None = None
    batch_size: int = 16
    resize: bool = False


@dataclass
class _Queued:
    """An input file read and waiting for its batch: its images, and the size its mask must have."""

    relative: Path
    images: Tensor
    original_size: ImageSize


@dataclass
class _Outputs:
    """Where a prediction writes, and the classification rows collected for ``predictions.csv``."""

    folder: Path
    rows: list[tuple[str, Tensor]] = field(default_factory=list)  # classification: (image, probabilities)
    num_classes: int = 0


def run_prediction(
    trainer: FederatedTrainer, datamodule: FederatedDataModule, checkpoint: Path, settings: PredictionSettings
) -> dict[str, Any]:
    """Predict every input of ``settings`` with the restored ``trainer``'s model; returns the output folder, the
    files predicted and those skipped (unreadable, under the data's ``on_bad_sample: skip``)."""
    if trainer.world_size > 1:
        raise ValueError("cli.py predict runs in one process: set --trainer.devices 1 --trainer.num_nodes 1.")
    if settings.batch_size < 1:
        raise ValueError(f"predict.batch_size must be >= 1, got {settings.batch_size}.")
    site = load_site(trainer, checkpoint, settings.site)
    expected = expected_image_size(trainer, datamodule, site)
    root, inputs = list_inputs(Path(settings.input), datamodule.unlabelled_suffixes)
    check_distinct_outputs(inputs)
    outputs = _Outputs(Path(settings.output) if settings.output else trainer.root_dir / "predictions" / checkpoint.stem)
    skip_bad = isinstance(datamodule, FileFederation) and datamodule.on_bad_sample == "skip"
    skipped: list[str] = []
    queue: list[_Queued] = []

    def flush() -> None:
        _predict_queue(trainer, datamodule, root, queue, settings.batch_size, outputs)
        queue.clear()

    trainer.module.eval()
    with progress_reporter(len(inputs), trainer.enable_progress_bar) as advance:
        for relative in inputs:
            advance(1)
            try:
                images = datamodule.read_unlabelled(root / relative)
            except DataError as error:
                if not skip_bad:
                    raise
                skipped.append(f"{relative}: {error}")
                continue
            original_size = (images.shape[-2], images.shape[-1])
            images = fitted(images, expected, settings.resize, root / relative)
            if queue and queue[0].images.shape[1:] != images.shape[1:]:
                flush()  # images of another size or channels cannot share a batch
            queue.append(_Queued(relative, images, original_size))
            if sum(len(item.images) for item in queue) >= settings.batch_size:
                flush()
        flush()
    if outputs.rows:
        write_probability_table(outputs.folder, outputs.rows, outputs.num_classes)
    if skipped:
        rank_zero_warn(f"Skipped {len(skipped)} unreadable input(s) (data.on_bad_sample=skip): " + "; ".join(skipped))
    predicted = len(inputs) - len(skipped)
    rank_zero_info(f"Predictions of {predicted} file(s) written to {outputs.folder}.")
    return {"output": str(outputs.folder), "site": site, "predicted": predicted, "skipped": skipped}


def load_site(trainer: FederatedTrainer, checkpoint: Path, site: str | None) -> str | None:
    """Put the restored global weights, with ``site``'s local keys, into the trainer's model; ``site`` becomes the
    client whose amplitude target harmonizes (:attr:`~harmofl.trainer.FederatedTrainer.current_client`)."""
    sites = [client for client in trainer.federation.client_names if client in trainer.store.records]
    if site is not None and site not in sites:
        raise ValueError(f"Site {site!r} is not in checkpoint {str(checkpoint)!r}; its sites are {sites}.")
    if site is None and trainer.local_keys:
        types = local_module_types(trainer.module, trainer.local_keys)
        raise ValueError(
            f"Checkpoint {str(checkpoint)!r} keeps the weights of its {', '.join(types)} layers local to each site "
            f"(trainer.local_modules): choose whose with --predict.site, one of {sites}."
        )
    if site is None:
        trainer.module.load_state_dict(trainer.global_state)
    else:
        trainer.store.load(site, trainer.module, trainer.optimizer, trainer.global_state, with_optimizer=False)
    assert trainer.runner is not None  # the in-process executor made it in setup
    trainer.runner.current_client = site
    return site


def local_module_types(module: torch.nn.Module, keys: set[str]) -> list[str]:
    """The class names of the submodules of ``module`` owning the state-dict ``keys``, sorted."""
    owners = {key.rpartition(".")[0] for key in keys}
    return sorted({type(sub).__name__ for name, sub in module.named_modules() if name in owners})


def expected_image_size(
    trainer: FederatedTrainer, datamodule: FederatedDataModule, site: str | None
) -> ImageSize | None:
    """The ``(H, W)`` the model was trained on: its amplitude target's image shape, else the data's ``image_size``
    (None: the data has none, inputs are taken at their own size). Refuses a checkpoint whose sites each have their
    own target (``share_target: never``) when no site is chosen."""
    # Imported here: the callbacks package imports the trainer, which imports this module.
    from callbacks.harmonization import LOCAL_CLIENT, AmplitudeHarmonization

    for callback in trainer.callbacks:
        if not isinstance(callback, AmplitudeHarmonization):
            continue
        target = callback.target_for(site or LOCAL_CLIENT)
        if target is not None:
            return (target.shape[-2], target.shape[-1])
        if site is None and callback.client_targets:
            raise ValueError(
                "The checkpoint has no shared amplitude target (each site harmonizes to its own): choose whose "
                f"with --predict.site, one of {sorted(callback.client_targets)}."
            )
    size = getattr(datamodule, "image_size", None)  # every square-image source has one (demo, image files, MRI)
    return (size, size) if isinstance(size, int) else None


def fitted(images: Tensor, expected: ImageSize | None, resize: bool, path: Path) -> Tensor:
    """``images [N, C, H, W]`` of ``path`` at the ``expected`` size: as they are, resized when ``resize``, else
    refused naming the file and both sizes."""
    size = (images.shape[-2], images.shape[-1])
    if expected is None or size == expected:
        return images
    if not resize:
        raise DataError(
            f"{path}: its image is {size[0]}×{size[1]} pixels, the model was trained on {expected[0]}×{expected[1]}: "
            "pass --predict.resize true to resize it (bilinear; its mask is resized back, nearest)."
        )
    return resize_images(images, expected)


@torch.no_grad()
def predict_batch(trainer: FederatedTrainer, images: Tensor, batch_idx: int) -> Tensor:
    """The model's class probabilities of ``images`` (``[B, K]`` or ``[B, K, H, W]``, on the host), harmonized and
    transformed as a test batch of the current site."""
    # A placeholder target: evaluation transforms (FedRDN's normalization) take (images, targets) batches.
    batch: Any = [trainer.fabric.to_device(images), torch.zeros(len(images), dtype=torch.long)]
    assert trainer.runner is not None  # the in-process executor made it in setup
    batch = trainer.runner.transformed(batch, "test")
    trainer.fabric.call(
        "on_predict_batch_start", trainer=trainer, pl_module=trainer.module, batch=batch, batch_idx=batch_idx
    )
    return trainer.fabric_module.predict_step(batch, batch_idx).float().cpu()


def _predict_queue(
    trainer: FederatedTrainer,
    datamodule: FederatedDataModule,
    root: Path,
    queue: list[_Queued],
    batch_size: int,
    outputs: _Outputs,
) -> None:
    """Predict the queued files in batches of at most ``batch_size`` images and write (or collect) each file's
    output. The batches are of near-equal sizes (17 images: 9 and 8, not 16 and 1): a model that normalizes with
    batch statistics (``batch_norm_stats: batch``) cannot normalize a lone image whose feature maps shrink to 1×1."""
    if not queue:
        return
    images = torch.cat([item.images for item in queue])
    batches = images.tensor_split(-(-len(images) // batch_size))
    probabilities = torch.cat([predict_batch(trainer, batch, i) for i, batch in enumerate(batches)])
    for item, part in zip(queue, probabilities.split([len(item.images) for item in queue])):
        if part.ndim == 2:  # classification: one row per image
            outputs.num_classes = part.shape[1]
            names = [str(item.relative)] if len(part) == 1 else [f"{item.relative}[{i}]" for i in range(len(part))]
            outputs.rows.extend(zip(names, part))
            continue
        masks = resize_masks(part.argmax(dim=1), item.original_size)
        mask = datamodule.unlabelled_mask(root / item.relative, masks)
        target = outputs.folder / mask_name(item.relative)
        if mask.ndim == 3:
            write_nifti_mask(target, mask, like=root / item.relative)
        else:
            write_png_mask(target, mask)
