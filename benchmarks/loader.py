"""Does the data pipeline keep up with the model? Camelyon17-format patches through the loader, next to the step.

A temporary folder gets ``--patches`` real 96x96 PNG patches in the Camelyon17-WILDS layout (``metadata.csv`` and
``patches/patient_*_node_*/patch_*.png``, one hospital), whose tissue is the demo's procedural H&E
(:class:`~harmofl.data.demo.DemoHistology` at 96 px), so that the PNGs compress as stained tissue does, not as
noise. Each row reads the hospital's training split through ``Camelyon17.dataloader`` (batch ``--batch-size``,
shuffled by a round's generator, as a client's local epoch reads it) for ``--epochs`` epochs, and reports the
seconds to load the client (``Camelyon17.load``; the integrity check is off, ``verify_images=False``), samples/s of
the first epoch and the median of the later ones:

- ``decode``: every epoch decodes every PNG (``decoded_cache`` off), 0 or 2 loader workers;
- ``decode, loader per epoch``: 2 workers started for every epoch, as the loaders made per client, split and round
  did before the loader pool (``harmofl.data.loaders.fresh_loader``);
- ``decoded cache``: ``decoded_cache`` on, a fresh cache folder, so loading the client writes the entry (decodes
  every PNG once); every epoch (and later runs) reads the memory map.

Beside them, samples/s of one HarmoFL client step on this CPU: DenseNet-121 (timm ``densenet121``, random init),
batch 128 of 3x96x96, the two-pass weight-perturbation step (two forward and backward passes, as
``benchmarks/harmonization_cost.py`` runs it). The ratios say how many steps' worth of samples the loader makes
in the time of one step: above 1 the loader keeps up. The GPU rate is an estimate (``--gpu-step-ms``, default
50 ms per step of 128 on an A100/H200-class GPU in mixed precision), not a measurement: no GPU was lent.

    python benchmarks/loader.py              # 2048 patches, 4 epochs per row, 3 steps: ~9 min on 2 busy cores
    python benchmarks/loader.py --quick      # a smoke test: 256 patches, batch 32 (the figures mean nothing)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import _harness as harness
import numpy as np
import torch
from harmonization_cost import Workload, make_step
from PIL import Image

from harmofl.data import Camelyon17, DemoHistology
from harmofl.data.camelyon import PATCH
from harmofl.data.loaders import LoaderOptions, fresh_loader

HEADER = "patient,node,x_coord,y_coord,tumor,slide,center,split"
PATCHES_PER_NODE = 64


def write_patches(root: Path, count: int) -> Path:
    """A ``camelyon17_v1.0`` folder of ``count`` 96x96 H&E-like PNG patches of hospital 0 (every 10th: split 1)."""
    demo = DemoHistology(1, train_per_site=count, val_per_site=0, test_per_site=0, image_size=96, cache=False)
    demo.setup()
    images = demo.dataset("site_0", "train").tensors[0]  # type: ignore[attr-defined]
    pixels = images.mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    lines = [HEADER]
    for index, (image, label) in enumerate(zip(pixels, demo.dataset("site_0", "train").tensors[1].tolist())):  # type: ignore[attr-defined]
        patient, node, x, y = index // (5 * PATCHES_PER_NODE), (index // PATCHES_PER_NODE) % 5, index, 2 * index
        path = root / PATCH.format(patient, node, x, y)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.ascontiguousarray(image)).save(path)
        lines.append(f"{patient},{node},{x},{y},{label},{patient},0,{int(index % 10 == 9)}")
    (root / "metadata.csv").write_text("\n".join(lines) + "\n")
    return root


@dataclass(frozen=True)
class Row:
    name: str
    load: float  # seconds to load the client (the decoded cache's entry written here)
    first: float  # samples/s of the first epoch
    later: float  # median samples/s of the later epochs


def epoch_rates(loaders: Sequence[Iterable[object]], samples: int) -> list[float]:
    """Samples/s of each loader's epoch, one after the other."""
    rates = []
    for loader in loaders:
        with harness.Timer() as timer:
            for _ in loader:
                pass
        rates.append(samples / timer.seconds)
    return rates


def round_generators(epochs: int) -> list[torch.Generator]:
    """Each epoch's generator, as each round seeds a client's loader."""
    return [torch.Generator().manual_seed(epoch) for epoch in range(epochs)]


def measure(root: Path, args: argparse.Namespace, cache_root: Path) -> list[Row]:
    rows = []

    def module(workers: int, cached: bool, name: str) -> Camelyon17:
        data = Camelyon17(
            str(root),
            batch_size=args.batch_size,
            num_workers=workers,
            verify_images=False,  # the integrity check is setup's work, not an epoch's
            decoded_cache=cached,
            decoded_cache_dir=str(cache_root / name),
        )
        data.setup()
        return data

    def add(name: str, data: Camelyon17, loaders: Sequence[Iterable[object]] | None = None) -> None:
        with harness.Timer() as load:
            data.load(["hospital_0"])
        if loaders is None:
            loaders = [data.dataloader("hospital_0", "train", g) for g in round_generators(args.epochs)]
        rates = epoch_rates(loaders, data.num_samples("hospital_0", "train"))
        rows.append(Row(name, load.seconds, rates[0], statistics.median(rates[1:]) if len(rates) > 1 else rates[0]))
        data.teardown("fit")

    for workers in (0, 2):
        add(f"decode, {workers} workers", module(workers, False, f"off{workers}"))
    data = module(2, False, "fresh")
    dataset, options = data.dataset("hospital_0", "train"), LoaderOptions(2, False)
    per_epoch = [fresh_loader(dataset, args.batch_size, True, g, options) for g in round_generators(args.epochs)]
    add("decode, 2 workers, loader per epoch", data, per_epoch)
    for workers in (0, 2):
        add(f"decoded cache, {workers} workers", module(workers, True, f"on{workers}"))
    return rows


def step_rate(batch_size: int, steps: int) -> float:
    """Samples/s of DenseNet-121's two-pass step on this CPU (the median of ``steps`` steps after one warm-up)."""
    step = make_step(Workload("camelyon17", "classification", "densenet121", batch_size, 96), torch.device("cpu"))
    images = torch.rand(batch_size, 3, 96, 96)
    step(images)
    times = []
    for _ in range(steps):
        with harness.Timer() as timer:
            step(images)
        times.append(timer.seconds)
    return batch_size / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patches", type=int, default=2048, help="patches written (90 %% of them train)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=4, help="epochs per loader row")
    parser.add_argument("--steps", type=int, default=3, help="timed DenseNet-121 steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--gpu-step-ms", type=float, default=50.0, help="assumed GPU two-pass step at batch 128")
    parser.add_argument("--quick", action="store_true", help="a smoke test: 256 patches, batch 32, 2 epochs, 1 step")
    args = parser.parse_args()
    if args.quick:
        args.patches, args.batch_size, args.epochs, args.steps = 256, 32, 2, 1
    harness.pin_threads(args.threads)
    print(harness.describe_machine())
    with tempfile.TemporaryDirectory(prefix="harmofl-loader-") as folder:
        root = write_patches(Path(folder) / "camelyon17_v1.0", args.patches)
        rows = measure(root, args, Path(folder) / "cache")
    step = step_rate(args.batch_size, args.steps)
    gpu = 128 / (args.gpu_step_ms / 1000)
    print(
        f"\n{args.patches} patches of 96x96 (PNG), batch {args.batch_size}, {args.epochs} epochs per row. DenseNet-121 "
        f"two-pass step at batch {args.batch_size} on this CPU: {step:.3g} samples/s. GPU rate to feed: {gpu:.0f} "
        f"samples/s, an ESTIMATE (a {args.gpu_step_ms:g} ms two-pass step of 128 on an A100/H200-class GPU), not "
        "measured: no GPU was lent.\n"
    )
    harness.print_table(
        [
            harness.Column("loader", lambda r: r.name, left=True),
            harness.Column("load", lambda r: f"{r.load:.2f}", "s"),
            harness.Column("first epoch", lambda r: f"{r.first:.0f}", "samples/s"),
            harness.Column("later epochs", lambda r: f"{r.later:.0f}", "samples/s"),
            harness.Column("÷ CPU step", lambda r: f"{harness.ratio(r.later, step):.1f}", "later"),
            harness.Column("÷ GPU (est.)", lambda r: f"{harness.ratio(r.later, gpu):.2f}", "later"),
        ],
        rows,
    )


if __name__ == "__main__":
    main()
