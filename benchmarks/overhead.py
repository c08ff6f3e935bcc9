"""Overhead of the federated orchestrator: the same HarmoFL run through FederatedTrainer and a plain PyTorch loop.

Both runs do the same work on the same pre-generated demo federation: same network and initial weights, same
seeded data order, same amplitude harmonization, same two-pass weight-perturbation step, uniform FedAvg,
evaluation of every client's val and test splits and a checkpoint per round. The plain loop is written here with
torch alone (no Lightning, no Fabric), so the ratio of the two wall times is the price of the orchestrator.

Two tasks, each with its demo configuration's settings:

- ``classification`` (configs/demo.yaml): ``DemoHistology``, ``test_resnet`` with batch statistics, SGD, the
  ``reference`` harmonization preset (each client's first training batch's mean amplitude, DC only), accuracy and
  AUROC;
- ``segmentation`` (configs/demo_seg.yaml): ``DemoNuclei``, the reference U-Net (8 base features), Adam,
  (cross-entropy + Dice) / 2, the ``paper`` preset (whole spectrum, a running mean over every training batch),
  global foreground Dice.

In both the clients' targets are averaged after round 1, then frozen. Each task runs with 1 process and with
2 processes (``--processes``): the orchestrator with ``devices=N`` (N processes of ``--threads`` threads, the
clients spread over them) against the plain loop in one process with ``N x --threads`` threads, the same total.
An orchestrator of several processes is a worker subprocess of this script, which Fabric re-runs once per extra
process; it warms up with an untimed one-round fit and times the next fit itself, so process start-up and imports
are not counted. Every orchestrator run, in-process or in the worker, is timed from a barrier after the trainer's
construction (about 3 ms, not counted) to the end of ``fit``; every plain run from after the network's
construction to its last checkpoint.

Same work: the orchestrator (all its processes together) and the timed plain loop must do the expected number of
forward and backward passes, and the orchestrator must reach the global weights of the plain loop at its own
threads per process (the 1-process row's plain run; to 1e-6, measured 0). Runs of different thread counts cannot
be compared: they reduce convolutions in another order, and Adam's first steps are sign-like, so a near-zero
gradient coordinate that flips sign moves its weight by up to 2·lr (6e-3 for segmentation). The script prints one
table: the medians of alternating timed repetitions and ``ratio orchestrator/plain`` per (task, processes).

    python benchmarks/overhead.py                        # both tasks, 1 and 2 processes, 3 rounds, 3 repetitions
    python benchmarks/overhead.py --task segmentation --processes 2
    python benchmarks/overhead.py --profile              # plus a cProfile of one 1-process orchestrator run per task
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import csv
import dataclasses
import functools
import gc
import io
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

# The script runs from a checkout where the package may not be installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Nothing may reach the network: no model hub, no W&B.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchmetrics import MetricCollection  # noqa: E402
from torchmetrics.classification import BinaryAccuracy, BinaryAUROC  # noqa: E402

from callbacks import PRESETS, AmplitudeHarmonization  # noqa: E402
from harmofl import ClassificationClient, FederatedClient, FederatedTrainer, SegmentationClient  # noqa: E402
from harmofl.amplitude import amplitude_spectrum, harmonize, update_running_amplitude  # noqa: E402
from harmofl.clients.segmentation import foreground_dice_metrics  # noqa: E402
from harmofl.data import DemoHistology, DemoNuclei, FederatedDataModule  # noqa: E402
from harmofl.distributed import all_gather_objects  # noqa: E402
from harmofl.losses import ce_dice_loss  # noqa: E402
from harmofl.models import create_classifier, create_segmenter, use_batch_statistics  # noqa: E402

ALPHA = 0.05  # the perturbation radius of both demo configurations
NORM_EPS = 1e-12  # as harmofl.perturbation
NUM_CLASSES = 2  # DemoHistology: tumour-like cluster or not; DemoNuclei: background or nucleus
UNET_KWARGS: dict[str, Any] = {"base_features": 8}
SEED = 0
TARGET_RATIO = 1.05
# The orchestrator's weights are compared with the plain loop's at the same threads per process: equal so far (0),
# but several processes add the clients' float64 sums in another order, which may change a float32 rounding.
# Other thread counts reduce convolutions in another order; Adam's first steps are sign-like, so a near-zero
# gradient coordinate that flips sign moves its weight by up to 2·lr (6e-3 here): they cannot be compared.
WEIGHT_TOLERANCE = 1e-6
HISTORY_KEYS = ("round", "client", "split")
RESULT_FILE = "result.pt"  # what a worker process leaves for the driver
# Files of the orchestrator's machinery (a regular expression on profiled file names); the local step, the
# harmonization and the network, which both runs share, are left out.
ORCHESTRATOR_CODE = (
    r"harmofl/(trainer|reporting|checkpoint|aggregation|distributed)\.py|lightning/fabric/(fabric|wrappers)\.py"
)

Loss = Callable[[Tensor, Tensor], Tensor]

PLAIN_OMITS = (
    "best.ckpt copy and best-round selection, summary.json, convergence.png, mean-over-clients rows, "
    "the history inside the checkpoint, the best-round table, atomic and durable checkpoint writes (temp file, "
    "fsync, rename, directory fsync), "
    "the finite-loss check, the server's update checks, callback and logger dispatch"
)


def dice_metrics() -> MetricCollection:
    """Global foreground Dice, exactly as ``harmofl.SegmentationClient`` builds it."""
    return foreground_dice_metrics(NUM_CLASSES)


@dataclass(frozen=True)
class Task:
    """What differs between the demo tasks; the loops, checks and timing are shared."""

    description: str
    data: Callable[..., FederatedDataModule]
    sizes: dict[str, int]  # the demo configuration's data sizes, each a command-line option
    client: Callable[..., FederatedClient]  # the client class with its network settings
    network: Callable[[], nn.Module]  # the same network, built without Lightning
    optimizer: Callable[..., torch.optim.Optimizer]
    preset: str  # of callbacks.AmplitudeHarmonization
    loss: Loss
    metrics: Callable[[], MetricCollection]
    predictions: Callable[[Tensor], Tensor]  # logits -> what the metrics are updated with, as the client does


TASKS: dict[str, Task] = {
    "classification": Task(  # configs/demo.yaml
        description="DemoHistology, test_resnet, SGD, reference harmonization",
        data=DemoHistology,
        sizes={"train_per_site": 192, "val_per_site": 64, "test_per_site": 128, "batch_size": 32},
        client=functools.partial(ClassificationClient, backbone="test_resnet", batch_norm_stats="batch"),
        network=lambda: use_batch_statistics(create_classifier("test_resnet", num_classes=NUM_CLASSES, in_chans=3)),
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
        preset="reference",
        loss=F.cross_entropy,
        metrics=lambda: MetricCollection({"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC()}),
        predictions=lambda logits: logits.softmax(dim=1)[:, 1],  # the positive class's probability
    ),
    "segmentation": Task(  # configs/demo_seg.yaml
        description="DemoNuclei, harmofl_unet (8 base features), Adam, paper harmonization",
        data=DemoNuclei,
        sizes={"train_per_site": 96, "val_per_site": 32, "test_per_site": 64, "batch_size": 16},
        client=functools.partial(SegmentationClient, backbone="harmofl_unet", backbone_kwargs=UNET_KWARGS),
        network=lambda: create_segmenter("harmofl_unet", num_classes=NUM_CLASSES, in_chans=3, **UNET_KWARGS),
        optimizer=functools.partial(torch.optim.Adam, lr=0.003, weight_decay=1e-4),
        preset="paper",
        loss=ce_dice_loss,
        metrics=dice_metrics,
        predictions=lambda logits: logits.argmax(dim=1),
    ),
}


@dataclass(frozen=True)
class Workload:
    """What one run does; the federation itself is generated once per process and shared by its runs."""

    task: str
    rounds: int
    clients: int
    image_size: int
    train_per_site: int
    val_per_site: int
    test_per_site: int
    batch_size: int
    seed: int = SEED

    @property
    def spec(self) -> Task:
        return TASKS[self.task]

    def data(self) -> FederatedDataModule:
        """The demo federation, set up (generated, or read from the demo cache): never timed."""
        data = self.spec.data(
            num_sites=self.clients,
            train_per_site=self.train_per_site,
            val_per_site=self.val_per_site,
            test_per_site=self.test_per_site,
            image_size=self.image_size,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        data.setup("fit")
        return data

    def options(self) -> list[str]:
        """The command-line options that give this workload (to start a worker with)."""
        return [
            item
            for spec in dataclasses.fields(self)
            if spec.name != "seed"
            for item in (f"--{spec.name.replace('_', '-')}", str(getattr(self, spec.name)))
        ]


def workload_from(args: argparse.Namespace, task: str) -> Workload:
    """The task's workload: its demo sizes, each replaced by the option given."""
    sizes = {name: default if getattr(args, name) is None else getattr(args, name)
             for name, default in TASKS[task].sizes.items()}
    return Workload(task, args.rounds, args.clients, args.image_size, **sizes)


@dataclass
class RunResult:
    """What a run leaves to compare: pass counts, last round's metrics, final global weights."""

    passes: dict[str, int]
    metrics: dict[tuple[str, str], dict[str, float]]
    global_state: dict[str, Tensor]


Timed = tuple[float, RunResult]


class PassCounter:
    """Counts the network's forward passes (training and evaluation apart) and backward passes.

    A forward pre-hook on the network counts forwards; a gradient hook on its first parameter (which every
    backward pass reaches) counts backwards. Both survive ``load_state_dict``, which copies into the
    same parameter tensors.
    """

    def __init__(self, network: nn.Module) -> None:
        self.passes = {"train forward": 0, "eval forward": 0, "backward": 0}
        network.register_forward_pre_hook(self._on_forward)
        next(network.parameters()).register_hook(self._on_backward)

    def _on_forward(self, module: nn.Module, inputs: Any) -> None:
        self.passes["train forward" if module.training else "eval forward"] += 1

    def _on_backward(self, grad: Tensor) -> None:
        self.passes["backward"] += 1


def start_clock() -> float:
    gc.collect()  # garbage from the previous run must not be collected inside this one's timing
    return time.perf_counter()


# -- 1. the orchestrator ----------------------------------------------------------------------------------------


def run_orchestrator(work: Workload, data: FederatedDataModule, root: Path, devices: int = 1) -> Timed:
    """One fit; with ``devices > 1`` every process Fabric launched runs this, and each gets the whole result."""
    task = work.spec
    torch.manual_seed(work.seed)  # the same initial weights as the plain loop's network
    client = task.client(num_classes=NUM_CLASSES, alpha=ALPHA, optimizer=task.optimizer)
    counter = PassCounter(client.model)
    trainer = FederatedTrainer(
        rounds=work.rounds,
        accelerator="cpu",
        devices=devices,
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[AmplitudeHarmonization(preset=task.preset, share_target="first_round")],
        seed=work.seed,
    )
    trainer.fabric.barrier()  # every process launched and joined: start-up is not timed
    start = start_clock()
    # fit prints the best round's table: rendered (and timed) all the same, but kept out of the benchmark output.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(client, data)  # ends with a barrier: the last process has finished
    seconds = time.perf_counter() - start
    passes: collections.Counter[str] = collections.Counter()
    for part in all_gather_objects(trainer.fabric, counter.passes):  # each process counted its own clients
        passes.update(part)
    metrics = {
        (row["client"], row["split"]): {name: value for name, value in row.items() if name not in HISTORY_KEYS}
        for row in trainer.history
        if row["round"] == work.rounds and row["client"] != "mean" and row["split"] in ("val", "test")
    }
    prefix = "model."  # the LightningModule holds the network as `self.model`
    global_state = {key.removeprefix(prefix): value for key, value in trainer.global_state.items()}
    return seconds, RunResult(dict(passes), metrics, global_state)


def run_orchestrator_processes(work: Workload, processes: int, threads: int) -> Timed:
    """The orchestrator over ``processes`` processes of ``threads`` threads, in a worker subprocess: Fabric starts
    the other processes by re-running the command line, which therefore must be this script's worker mode."""
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        command = [
            sys.executable, str(Path(__file__).resolve()), "--orchestrator-worker", folder,
            "--processes", str(processes), "--threads", str(threads), *work.options(),
        ]
        environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # else Fabric picks the thread count
        worker = subprocess.run(command, cwd=REPO_ROOT, env=environment, capture_output=True, text=True)
        if worker.returncode != 0:
            raise RuntimeError(f"The {processes}-process orchestrator worker failed:\n{worker.stderr[-4000:]}")
        saved = torch.load(Path(folder) / RESULT_FILE, weights_only=True)
    return saved["seconds"], RunResult(saved["passes"], saved["metrics"], saved["global_state"])


def orchestrator_worker(args: argparse.Namespace) -> None:
    """Worker mode: an untimed one-round warm-up (first calls, kernel selection), then the timed run; every
    process runs this, rank 0 writes the result."""
    (task,), (processes,) = args.task, args.processes
    torch.set_num_threads(args.threads)
    folder = Path(args.orchestrator_worker)
    work = workload_from(args, task)
    data = work.data()
    run_orchestrator(dataclasses.replace(work, rounds=1), data, folder / "warm-up", devices=processes)
    seconds, result = run_orchestrator(work, data, folder / "run", devices=processes)
    if torch.distributed.get_rank() == 0:
        torch.save({"seconds": seconds, **dataclasses.asdict(result)}, folder / RESULT_FILE)
    torch.distributed.destroy_process_group()


# -- 2. the plain PyTorch loop ----------------------------------------------------------------------------------


def derive_seed(seed: int, round_idx: int, client_index: int) -> int:
    """The trainer's per-(round, client) seed, so that both runs see the same data order."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_index) % (2**63 - 1)



def perturbed_step(
    network: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, images: Tensor, targets: Tensor
) -> Tensor:
    """One HarmoFL local step by hand: backward at w, w += α·g/‖g‖, backward at w + δ, restore w, base step."""
    loss = loss_fn(network(images), targets)
    loss.backward()
    params = [p for p in network.parameters() if p.grad is not None]
    with torch.no_grad():
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = ALPHA / (grad_norm + NORM_EPS)
        unperturbed = [p.detach().clone() for p in params]
        for p in params:
            p.add_(p.grad * scale)
    optimizer.zero_grad(set_to_none=True)
    loss_fn(network(images), targets).backward()
    with torch.no_grad():
        for p, saved in zip(params, unperturbed):
            p.copy_(saved)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def fedavg(states: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Uniform mean of the clients' weights, summed in float64 as harmofl.aggregation does."""
    averaged: dict[str, Tensor] = {}
    for key, reference in states[0].items():
        mean = sum(state[key].double() for state in states) / len(states)
        averaged[key] = (mean if reference.is_floating_point() else mean.round()).to(reference.dtype)
    return averaged


@dataclass
class Harmonization:
    """AmplitudeHarmonization with ``share_target="first_round"``, by hand: each client's running mean amplitude
    until the clients' targets are averaged after round 1, then that shared target, frozen."""

    band: float
    momentum: float
    client_targets: dict[str, Tensor] = dataclasses.field(default_factory=dict)
    shared_target: Optional[Tensor] = None

    def training_batch(self, client: str, images: Tensor) -> Tensor:
        running = self.client_targets.get(client)
        # With momentum 0 (the reference preset) only the first batch counts: later ones need no spectrum.
        if self.shared_target is None and (running is None or self.momentum > 0):
            self.client_targets[client] = update_running_amplitude(
                running, amplitude_spectrum(images), self.momentum
            )
        target = self.shared_target if self.shared_target is not None else self.client_targets[client]
        return self.apply_(images, target)

    def share(self, clients: list[str]) -> None:
        if self.shared_target is None:
            self.shared_target = (sum(self.client_targets[c].double() for c in clients) / len(clients)).float()

    def apply_(self, images: Tensor, target: Tensor) -> Tensor:
        # In place, as the callback: the network then sees the loader's (contiguous) batch tensor.
        return images.copy_(harmonize(images, target, self.band))


def run_plain(work: Workload, data: FederatedDataModule, root: Path) -> Timed:
    task = work.spec
    torch.manual_seed(work.seed)
    network = task.network()
    counter = PassCounter(network)
    start = start_clock()
    # One optimizer whose state is swapped per client: loading adopts the stored tensors without copying, which
    # is safe because a client's stored state is replaced by its new one as soon as it has trained.
    optimizer = task.optimizer(network.parameters())
    fresh_optimizer_state = optimizer.state_dict()
    optimizer_states: dict[str, dict[str, Any]] = {}
    global_state = {key: value.detach().clone() for key, value in network.state_dict().items()}
    harmonization = Harmonization(**PRESETS[task.preset])
    metrics = task.metrics()
    results: dict[tuple[str, str], dict[str, float]] = {}
    clients = data.client_names

    with (root / "metrics.csv").open("w", newline="") as metrics_file:
        writer = csv.writer(metrics_file)
        writer.writerow([*HISTORY_KEYS, "loss", *metrics.keys()])
        for round_idx in range(work.rounds):
            client_states: list[dict[str, Tensor]] = []
            for index, client in enumerate(clients):
                network.load_state_dict(global_state)
                optimizer.load_state_dict(optimizer_states.get(client, fresh_optimizer_state))
                loss = train_client(network, optimizer, task.loss, harmonization, client,
                                    training_loader(data, client, derive_seed(work.seed, round_idx, index)))
                writer.writerow([round_idx + 1, client, "train", loss, *[""] * len(metrics)])
                client_states.append({key: value.detach().clone() for key, value in network.state_dict().items()})
                optimizer_states[client] = optimizer.state_dict()
            global_state = fedavg(client_states)
            harmonization.share(clients)

            network.load_state_dict(global_state)
            for client in clients:
                for split in ("val", "test"):
                    results[(client, split)] = evaluate(network, data, client, split, metrics, task.predictions,
                                                        harmonization)
                    writer.writerow([round_idx + 1, client, split, "", *results[(client, split)].values()])
            metrics_file.flush()
            torch.save(
                {
                    "round": round_idx + 1,
                    "global_state": global_state,
                    "optimizer_states": optimizer_states,
                    "client_targets": harmonization.client_targets,
                    "shared_target": harmonization.shared_target,
                },
                root / "last.ckpt",
            )
    return time.perf_counter() - start, RunResult(counter.passes, results, global_state)


def training_loader(data: FederatedDataModule, client: str, seed: int) -> DataLoader:
    """The client's training loader, shuffled as the trainer shuffles it; the global RNG seeded as it seeds it."""
    torch.manual_seed(seed)
    return DataLoader(
        data.dataset(client, "train"),
        batch_size=data.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )


def train_client(
    network: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, harmonization: Harmonization, client: str,
    loader: DataLoader,
) -> float:
    """One epoch of perturbed steps on harmonized batches; the mean unperturbed loss."""
    network.train()
    loss_sum = torch.zeros(())
    for images, targets in loader:
        loss_sum += perturbed_step(network, optimizer, loss_fn, harmonization.training_batch(client, images), targets)
    return (loss_sum / len(loader)).item()


@torch.no_grad()
def evaluate(
    network: nn.Module, data: FederatedDataModule, client: str, split: str, metrics: MetricCollection,
    predictions: Callable[[Tensor], Tensor], harmonization: Harmonization,
) -> dict[str, float]:
    """The global model's metrics on one client's split, its images harmonized to the shared target."""
    assert harmonization.shared_target is not None  # shared after round 1's aggregation, before any evaluation
    network.eval()
    metrics.reset()
    for images, targets in DataLoader(data.dataset(client, split), batch_size=data.eval_batch_size):
        metrics.update(predictions(network(harmonization.apply_(images, harmonization.shared_target))), targets)
    return {name: float(value) for name, value in metrics.compute().items()}


# -- timing and checks ------------------------------------------------------------------------------------------


def in_folder(runner: Callable[[Workload, FederatedDataModule, Path], Timed], work: Workload,
              data: FederatedDataModule) -> Timed:
    """A run in a fresh output folder, which is created and removed outside the run's timing."""
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        return runner(work, data, Path(folder))


def run_orchestrator_at(work: Workload, data: FederatedDataModule, processes: int, threads: int) -> Timed:
    """The orchestrator over ``processes`` processes of ``threads`` threads: in this process when there is one."""
    if processes > 1:
        return run_orchestrator_processes(work, processes, threads)
    torch.set_num_threads(threads)
    return in_folder(run_orchestrator, work, data)


def run_plain_at(work: Workload, data: FederatedDataModule, threads: int) -> Timed:
    torch.set_num_threads(threads)
    return in_folder(run_plain, work, data)


def expected_passes(work: Workload, data: FederatedDataModule) -> dict[str, int]:
    """Two forwards and two backwards per training batch; one forward per evaluation batch."""
    train_batches = sum(-(-data.num_samples(c, "train") // data.batch_size) for c in data.client_names)
    eval_batches = sum(
        -(-data.num_samples(c, split) // data.eval_batch_size) for c in data.client_names for split in ("val", "test")
    )
    return {
        "train forward": 2 * train_batches * work.rounds,
        "eval forward": eval_batches * work.rounds,
        "backward": 2 * train_batches * work.rounds,
    }


def check_same_work(
    work: Workload, data: FederatedDataModule, orchestrator: RunResult, plain: RunResult, reference: RunResult
) -> tuple[float, float]:
    """Raise if the orchestrator and the timed plain loop did different passes, or if the orchestrator's weights
    differ from ``reference``'s, the plain loop's at the same threads per process; returns the max |difference| of
    global weights and of last-round metrics from ``reference``."""
    expected = expected_passes(work, data)
    if not orchestrator.passes == plain.passes == expected:
        raise RuntimeError(
            f"The runs did different work: orchestrator {orchestrator.passes}, plain {plain.passes}, "
            f"expected {expected}."
        )
    if orchestrator.global_state.keys() != reference.global_state.keys():
        raise RuntimeError("The orchestrator's and the plain loop's networks have different state-dict keys.")
    weight_gap = max(
        (orchestrator.global_state[k].double() - reference.global_state[k].double()).abs().max().item()
        for k in reference.global_state
    )
    if weight_gap > WEIGHT_TOLERANCE:
        raise RuntimeError(
            f"The runs reached different global weights: max |difference| {weight_gap:.2e} > {WEIGHT_TOLERANCE:.0e}."
        )
    metric_gap = max(
        abs(orchestrator.metrics[key][name] - value)
        for key, row in reference.metrics.items()
        for name, value in row.items()
    )
    return weight_gap, metric_gap


@dataclass
class Row:
    """One line of the table: a task at a process count, with its timed repetitions and same-work check."""

    task: str
    processes: int
    rounds: int
    orchestrator: list[float] = dataclasses.field(default_factory=list)
    plain: list[float] = dataclasses.field(default_factory=list)
    weight_gap: float = float("nan")
    metric_gap: float = float("nan")

    @property
    def ratio(self) -> float:
        return statistics.median(self.orchestrator) / statistics.median(self.plain)


def warm_up(work: Workload, data: FederatedDataModule, processes: list[int], threads: int) -> None:
    """Untimed one-round runs at every thread count this process times: imports, first calls (matplotlib,
    torchmetrics, oneDNN kernels) and allocator growth. Worker processes warm themselves up."""
    short = dataclasses.replace(work, rounds=1)
    for count in processes:
        plain = run_plain_at(short, data, count * threads)[1]
        if count == 1:  # a failing same-work check shows here, before minutes of timing
            check_same_work(short, data, run_orchestrator_at(short, data, 1, threads)[1], plain, plain)


def benchmark(work: Workload, processes: list[int], threads: int, repeats: int) -> list[Row]:
    """The task's rows: orchestrator and plain loop timed alternately, so that drifting machine load hits both
    alike; the plain loop with as many threads as the orchestrator's processes have together."""
    data = work.data()
    warm_up(work, data, processes, threads)
    rows = [Row(work.task, count, work.rounds) for count in processes]
    last: dict[int, tuple[RunResult, RunResult]] = {}
    for _ in range(repeats):
        for row in rows:
            orchestrator_seconds, orchestrator = run_orchestrator_at(work, data, row.processes, threads)
            plain_seconds, plain = run_plain_at(work, data, row.processes * threads)
            row.orchestrator.append(orchestrator_seconds)
            row.plain.append(plain_seconds)
            last[row.processes] = orchestrator, plain
    # The reference of every row: the plain loop at the orchestrator's threads per process (the 1-process row's).
    reference = last[1][1] if 1 in last else run_plain_at(work, data, threads)[1]
    for row in rows:
        row.weight_gap, row.metric_gap = check_same_work(work, data, *last[row.processes], reference)
    print(f"{work.task}: {work.spec.description}; {work.clients} clients x {work.train_per_site} training images "
          f"({work.image_size}px, batch {work.batch_size}); passes per run (both): "
          + ", ".join(f"{count} {name}" for name, count in expected_passes(work, data).items()))
    return rows


def print_table(rows: list[Row], threads: int) -> None:
    print(f"\n{'task':<16}{'processes x threads':>21}{'orchestrator (s)':>18}{'plain (s)':>11}{'ratio':>8}"
          f"{'extra/round':>13}   same work")
    for row in rows:
        layout = f"{row.processes} x {threads} / {row.processes * threads}"
        orchestrator, plain = statistics.median(row.orchestrator), statistics.median(row.plain)
        print(f"{row.task:<16}{layout:>21}{orchestrator:>18.3f}{plain:>11.3f}{row.ratio:>8.3f}"
              f"{(orchestrator - plain) / row.rounds * 1e3:>10.0f} ms"
              f"   yes: weights {row.weight_gap:.1e}, metrics {row.metric_gap:.1e}")
    print(f"(medians; same work: the expected passes in both runs, and the max |difference| of the orchestrator's "
          f"global weights and last-round metrics from the plain loop's at {threads} thread(s), its own per process)")


def profile_orchestrator(work: Workload, top: int) -> None:
    """cProfile of one 1-process orchestrator run: the ``top`` entries by cumulative time in the orchestrator's own
    code (trainer, reporting, checkpoints, aggregation, Fabric), where any time the plain loop does not spend lies."""
    data = work.data()
    profiler = cProfile.Profile()
    profiler.runcall(in_folder, run_orchestrator, work, data)
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats(pstats.SortKey.CUMULATIVE)
    stats.print_stats(ORCHESTRATOR_CODE, top)
    print(f"\ncProfile of one {work.task} orchestrator run (top {top} by cumulative time, orchestrator code only):")
    print(stream.getvalue().strip())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2],
                        help="orchestrator processes (trainer.devices) of each row; at most --clients")
    # 3 rounds keep the default run (both tasks, 1 and 2 processes) near 4 minutes on 2 idle cores.
    parser.add_argument("--rounds", type=int, default=3, help="communication rounds per timed run")
    parser.add_argument("--clients", type=int, default=4, help="sites of the demo federation")
    parser.add_argument("--image-size", type=int, default=64)
    for name in TASKS["classification"].sizes:  # every task has the same size options, with its own defaults
        demo = ", ".join(f"{task} {spec.sizes[name]}" for task, spec in TASKS.items())
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: the demo's ({demo})")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each run, alternating")
    # One thread by default: on a small shared machine more threads make the timings noisier, not more telling.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each orchestrator process")
    parser.add_argument("--profile", action="store_true", help="also cProfile one orchestrator run per task")
    parser.add_argument("--orchestrator-worker", metavar="FOLDER", help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.orchestrator_worker:
        orchestrator_worker(args)
        return
    print(f"HarmoFL overhead: {', '.join(args.task)}; {args.rounds} rounds, {args.repeats} repetition(s); "
          f"orchestrator processes x threads / plain loop threads; torch {torch.__version__}, {os.cpu_count()} CPUs")
    rows: list[Row] = []
    for task in args.task:
        rows += benchmark(workload_from(args, task), args.processes, args.threads, args.repeats)
    print(f"plain loop omits: {PLAIN_OMITS}")
    print_table(rows, args.threads)
    if args.profile:
        for task in args.task:
            profile_orchestrator(workload_from(args, task), top=20)
    elif any(row.ratio > TARGET_RATIO for row in rows):
        print(f"\nThe orchestrator costs over {TARGET_RATIO - 1:.0%} more: rerun with --profile to see where its "
              "time goes.")
    print(f"\nratio orchestrator/plain: target <= {TARGET_RATIO:.2f}")


if __name__ == "__main__":
    main()
