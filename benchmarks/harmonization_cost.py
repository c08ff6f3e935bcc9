"""Cost of HarmoFL's amplitude harmonization per training batch, against a training step and the reference code.

For each reference size (Camelyon17: 128 images of 3x96x96 through ``harmofl_densenet121``; prostate MRI: 16 images
of 3x384x384 through ``harmofl_unet`` with 32 base features) and each preset of ``callbacks.PRESETS``, the script
times, on the same random batch:

- **ours**: what ``AmplitudeHarmonization`` runs per training batch once a target exists, under ``torch.no_grad()``:
  ``reference`` preset (band 0, momentum 0): ``harmonize`` only (the DC-only fast path), the target being frozen
  after the first batch; ``paper`` preset (band 0.5, momentum 0.1): the batch's ``image_spectrum`` (one forward
  real FFT: the half spectrum), the running-mean update from its amplitude and a full-spectrum ``harmonize`` of
  that same spectrum (``F·target/|F|``, no phase computed; an inverse real FFT). The result is copied into a batch
  buffer, as the callback copies it into the batch.
- **reference**: the reference code's approach, rewritten here in numpy: one image at a time, copied to the host
  in float64, ``fft2`` per channel, amplitude and phase, the amplitude inside the centred window (after
  ``fftshift``; half-width ``floor(min(H, W) * L)``, L = 0 for the DC coefficient only, 0.5 for everything)
  replaced by the target's, ``real(ifft2(A' * exp(1j * P)))`` cast to float32 and copied back into a torch batch.
  For the ``paper`` preset it first computes the batch's mean amplitude the same way (one image at a time) and
  updates the running mean, so that both sides do the same work.
- **step**: one HarmoFL training step of the model on that batch: forward and backward at ``w``, ``perturb``,
  forward and backward at ``w + δ``, restore and SGD step (``harmofl.perturbation.WeightPerturbation``, α = 0.05,
  SGD lr 0.001, momentum 0.9, weight decay 1e-4 as configs/camelyon.yaml; cross-entropy for the classifier,
  ``ce_dice_loss`` for the U-Net). The step does not depend on the preset: it is timed once per repetition and
  size, and both presets are divided by the same median.

Before timing, the script checks that the numpy reference gives the same images (and paper target) as ours: it
raises if any pixel differs by more than 1e-4. Every repetition then times each of these once, in turn (ours and
reference for each preset, then the step), so that drifting machine load hits them alike; it prints the medians,
``ours/step`` (target < 2 %) and ``reference/ours`` (the speed-up). The first repetition's step includes the
kernels' and allocator's warm-up, which the median of three or more repetitions leaves out.

    python benchmarks/harmonization_cost.py               # 3 repetitions: 6-8 min on 2 CPU cores shared with a job
    python benchmarks/harmonization_cost.py --threads 1   # steadier on a shared machine; numpy's FFT uses 1 thread too
    python benchmarks/harmonization_cost.py --quick       # batches of 8 and 2 images: a smoke run of about 1 min
    python benchmarks/harmonization_cost.py --device cuda --repeats 10
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import _harness as harness
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from callbacks import PRESETS
from harmofl.amplitude import amplitude_spectrum, full_amplitude, harmonize, image_spectrum, update_running_amplitude
from harmofl.losses import ce_dice_loss
from harmofl.models import create_classifier, create_segmenter
from harmofl.perturbation import WeightPerturbation

# The optimizer and perturbation radius of configs/camelyon.yaml.
SGD_ARGS: dict[str, float] = {"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4}
ALPHA = 0.05
NUM_CLASSES = 2  # tumour / normal; prostate / background
CHANNELS = 3
SEED = 0
TOLERANCE = 1e-4  # max |ours - reference| per pixel: float32 FFTs against the reference's float64 ones
TARGET_SHARE = 0.02  # harmonization should cost under 2 % of a training step
QUICK_BATCH_SIZES = {"classification": 8, "segmentation": 2}

Task = Literal["classification", "segmentation"]


@dataclass(frozen=True)
class Workload:
    """One reference size: the dataset's images and batch, and the network that trains on them."""

    dataset: str
    task: Task
    backbone: str
    batch_size: int
    image_size: int

    @property
    def label(self) -> str:
        return f"{self.dataset} {self.batch_size}x{CHANNELS}x{self.image_size}x{self.image_size} {self.backbone}"


WORKLOADS = (
    Workload("camelyon17", "classification", "harmofl_densenet121", batch_size=128, image_size=96),
    Workload("prostate", "segmentation", "harmofl_unet", batch_size=16, image_size=384),
)


# -- ours: what the callback runs per training batch --------------------------------------------------------------


def ours(images: Tensor, running: Tensor, band: float, momentum: float, out: Tensor) -> Tensor:
    """Harmonize ``images`` into ``out`` as ``AmplitudeHarmonization`` does once a target exists; returns the target."""
    target, spectrum, magnitude = running, None, None
    # With momentum 0 the callback keeps the first batch's amplitude: later batches need no spectrum. Otherwise
    # one forward FFT serves the running mean and the harmonization.
    if momentum > 0:
        spectrum = image_spectrum(images)
        magnitude = spectrum.abs()
        batch_amplitude = full_amplitude(magnitude.mean(dim=0, keepdim=True), images.shape[-1])
        target = update_running_amplitude(running, batch_amplitude, momentum)
    out.copy_(harmonize(images, target, band, spectrum, magnitude))
    return target


# -- the reference code's approach: numpy on the host, one image at a time ----------------------------------------


def to_host(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().numpy().astype(np.float64)


def swap_low_frequencies(image: np.ndarray, target: np.ndarray, band: float) -> np.ndarray:
    """One ``[C, H, W]`` image with its centred low-frequency amplitude replaced by ``target``'s, phase kept."""
    spectrum = np.fft.fft2(image, axes=(-2, -1))
    amplitude = np.fft.fftshift(np.abs(spectrum), axes=(-2, -1))
    shifted_target = np.fft.fftshift(target, axes=(-2, -1))
    height, width = image.shape[-2:]
    half = int(np.floor(min(height, width) * band))
    rows = slice(height // 2 - half, height // 2 + half + 1)
    cols = slice(width // 2 - half, width // 2 + half + 1)
    amplitude[:, rows, cols] = shifted_target[:, rows, cols]
    swapped = np.fft.ifftshift(amplitude, axes=(-2, -1)) * np.exp(1j * np.angle(spectrum))
    return np.real(np.fft.ifft2(swapped, axes=(-2, -1))).astype(np.float32)


def reference(images: Tensor, running: np.ndarray, band: float, momentum: float, out: Tensor) -> np.ndarray:
    """The reference's per-image numpy harmonization of ``images`` into ``out``; returns the target."""
    target = running
    if momentum > 0:
        batch_amplitude = sum(np.abs(np.fft.fft2(to_host(image), axes=(-2, -1))) for image in images) / len(images)
        target = (1.0 - momentum) * running + momentum * batch_amplitude
    for index, image in enumerate(images):
        out[index].copy_(torch.from_numpy(swap_low_frequencies(to_host(image), target, band)))
    return target


# -- the training step ------------------------------------------------------------------------------------------


def make_step(work: Workload, device: torch.device) -> Callable[[Tensor], None]:
    """HarmoFL's local step on one batch, as ``harmofl.clients.base`` runs it: two forward and backward passes."""
    torch.manual_seed(SEED)
    shape = (work.batch_size,) if work.task == "classification" else (work.batch_size, work.image_size, work.image_size)
    labels = torch.randint(0, NUM_CLASSES, shape, device=device)
    if work.task == "classification":
        model: nn.Module = create_classifier(work.backbone, num_classes=NUM_CLASSES, in_chans=CHANNELS)
        loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy
    else:
        model = create_segmenter(work.backbone, num_classes=NUM_CLASSES, in_chans=CHANNELS, base_features=32)
        loss_fn = ce_dice_loss
    model.to(device).train()
    optimizer = WeightPerturbation(model.parameters(), functools.partial(torch.optim.SGD, **SGD_ARGS), alpha=ALPHA)

    def step(images: Tensor) -> None:
        loss_fn(model(images), labels).backward()
        optimizer.perturb()
        loss_fn(model(images), labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# -- timing and checks ------------------------------------------------------------------------------------------


def check_same_images(images: Tensor, running: Tensor, band: float, momentum: float) -> float:
    """Max |ours - reference| over the harmonized images; raises if it (or the target's) exceeds the tolerance."""
    ours_out, reference_out = torch.empty_like(images), torch.empty_like(images)
    with torch.no_grad():
        ours_target = ours(images, running, band, momentum, ours_out)
    reference_target = reference(images, to_host(running), band, momentum, reference_out)
    image_gap = (ours_out - reference_out).abs().max().item()
    # The target is compared relative to its own scale: amplitudes grow with H*W.
    target_gap = np.abs(to_host(ours_target) - reference_target).max() / np.abs(reference_target).max()
    if not (image_gap < TOLERANCE and target_gap < TOLERANCE):
        raise RuntimeError(
            f"The numpy reference and harmofl.amplitude disagree (band {band}, momentum {momentum}): "
            f"max |image difference| {image_gap:.2e}, relative target difference {target_gap:.2e}."
        )
    return image_gap


@dataclass(frozen=True)
class Medians:
    """Median seconds of each timed thing of one workload."""

    ours: dict[str, float]
    reference: dict[str, float]
    step: float


def measure(work: Workload, device: torch.device, repeats: int) -> tuple[Medians, dict[str, float]]:
    """Check, then time ``repeats`` alternating repetitions; returns the medians and the check's image gaps."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (work.batch_size, CHANNELS, work.image_size, work.image_size)
    # Two batches: the running target comes from an earlier one, as in training.
    earlier, images = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    running = update_running_amplitude(None, amplitude_spectrum(earlier), momentum=0.0)
    host_running = to_host(running)
    out = torch.empty_like(images)

    # The check also warms up both harmonizations (FFT plans, allocations).
    gaps = {name: check_same_images(images, running, p["band"], p["momentum"]) for name, p in PRESETS.items()}
    step = make_step(work, device)

    times = harness.Samples()
    for _ in range(repeats):
        for name, p in PRESETS.items():
            band, momentum = p["band"], p["momentum"]
            with torch.no_grad():
                times.time(f"ours {name}", functools.partial(ours, images, running, band, momentum, out), device)
                times.time(
                    f"reference {name}", functools.partial(reference, images, host_running, band, momentum, out), device
                )
        times.time("step", functools.partial(step, images), device)
    medians = times.medians()
    return (
        Medians(
            ours={name: medians[f"ours {name}"] for name in PRESETS},
            reference={name: medians[f"reference {name}"] for name in PRESETS},
            step=medians["step"],
        ),
        gaps,
    )


# -- report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the table: a size and a preset."""

    work: Workload
    preset: str
    medians: Medians

    @property
    def ours(self) -> float:
        return self.medians.ours[self.preset]

    @property
    def reference(self) -> float:
        return self.medians.reference[self.preset]

    @property
    def share(self) -> float:
        return harness.ratio(self.ours, self.medians.step)


TABLE = (
    harness.Column("size", lambda row: row.work.label, left=True),
    harness.Column("preset", lambda row: row.preset, left=True),
    harness.Column("ours (ms)", lambda row: f"{row.ours * 1e3:.2f}"),
    harness.Column("reference (ms)", lambda row: f"{row.reference * 1e3:.1f}"),
    harness.Column("step (s)", lambda row: f"{row.medians.step:.2f}"),
    harness.Column("ours/step", lambda row: f"{row.share:.3%}"),
    harness.Column("reference/ours", lambda row: f"{harness.ratio(row.reference, row.ours):.1f}x"),
)


def report(rows: list[Row]) -> None:
    print()
    harness.print_table(TABLE, rows)
    missed = [f"{row.work.dataset} {row.preset}" for row in rows if not row.share < TARGET_SHARE]
    verdict = "met at every size and preset" if not missed else f"missed at {', '.join(missed)}"
    print(f"\ntarget ours/step < {TARGET_SHARE:.0%}: {verdict}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions, alternating; medians reported")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke run: batches of {QUICK_BATCH_SIZES['classification']} (classification) and "
        f"{QUICK_BATCH_SIZES['segmentation']} (segmentation) images",
    )
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was asked for, but torch sees no CUDA device.")
    harness.pin_threads(args.threads)
    workloads = [replace(work, batch_size=QUICK_BATCH_SIZES[work.task]) if args.quick else work for work in WORKLOADS]

    presets = ", ".join(f"{name} (band {p['band']}, momentum {p['momentum']})" for name, p in PRESETS.items())
    print(f"HarmoFL harmonization cost: {args.repeats} alternating repetitions, medians; presets {presets}")
    print(f"{harness.describe_machine(device)}, numpy {np.__version__}")
    start = time.perf_counter()
    rows: list[Row] = []
    for work in workloads:
        medians, gaps = measure(work, device, args.repeats)
        rows += [Row(work, name, medians) for name in PRESETS]
        checked = ", ".join(f"{name} {gap:.1e}" for name, gap in gaps.items())
        print(f"check {work.label}: ours = reference numpy, max |image difference| {checked}")
    report(rows)
    print(f"total wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
