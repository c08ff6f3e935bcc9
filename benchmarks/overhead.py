"""Overhead of the federated orchestrator: the same HarmoFL run through FederatedTrainer and a plain PyTorch loop.

Both runs do the same work on the same pre-generated ``DemoHistology`` federation: same network and initial
weights, same seeded data order, same amplitude harmonization (``reference`` preset: each client's first
training batch's mean amplitude, averaged over clients after round 1, then frozen), same two-pass weight-
perturbation step, uniform FedAvg, evaluation of every client's val and test splits (accuracy, AUROC) and a
checkpoint per round. The plain loop is written here with torch alone (no Lightning, no Fabric), so the ratio of
the two wall times is the price of the orchestrator. The script checks that both runs did the same number of
forward and backward passes and reached the same global weights, then prints the medians of alternating timed
repetitions and ``ratio orchestrator/plain``.

    python benchmarks/overhead.py                # defaults: demo.yaml's federation, 4 rounds, 3 repetitions
    python benchmarks/overhead.py --profile      # plus a cProfile of one orchestrator run
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import csv
import functools
import gc
import io
import os
import pstats
import statistics
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
from harmofl import ClassificationClient, FederatedTrainer  # noqa: E402
from harmofl.amplitude import amplitude_spectrum, harmonize  # noqa: E402
from harmofl.data.demo import DemoHistology  # noqa: E402
from harmofl.models import create_classifier, use_batch_statistics  # noqa: E402

# The optimizer and perturbation of configs/demo.yaml.
SGD_ARGS: dict[str, float] = {"lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4}
ALPHA = 0.05
NORM_EPS = 1e-12  # as harmofl.perturbation
BAND = PRESETS["reference"]["band"]  # the reference preset harmonizes the DC coefficient only
NUM_CLASSES = 2  # DemoHistology is binary: tumour-like cluster or normal tissue
SEED = 0
# Files of the orchestrator's machinery (a regular expression on profiled file names); the local step, the
# harmonization and the network, which both runs share, are left out.
ORCHESTRATOR_CODE = (
    r"harmofl/(trainer|reporting|checkpoint|aggregation|distributed)\.py|lightning/fabric/(fabric|wrappers)\.py"
)

PLAIN_OMITS = (
    "best.ckpt copy and best-round selection, summary.json, convergence.png, mean-over-clients rows, "
    "the history inside the checkpoint, the best-round table, atomic (temp file + rename) checkpoint writes, "
    "the finite-loss check, callback and logger dispatch"
)


@dataclass(frozen=True)
class Workload:
    """What one run does; the federation itself is generated once and shared by every run."""

    rounds: int
    backbone: str
    seed: int = SEED


@dataclass
class RunResult:
    """What a run leaves to compare: pass counts, last round's metrics, final global weights."""

    passes: dict[str, int]
    metrics: dict[tuple[str, str], dict[str, float]]
    global_state: dict[str, Tensor]


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


# -- 1. the orchestrator ----------------------------------------------------------------------------------------


def run_orchestrator(work: Workload, data: DemoHistology, root: Path) -> RunResult:
    torch.manual_seed(work.seed)  # the same initial weights as the plain loop's network
    client = ClassificationClient(
        backbone=work.backbone,
        num_classes=NUM_CLASSES,
        batch_norm_stats="batch",
        alpha=ALPHA,
        optimizer=functools.partial(torch.optim.SGD, **SGD_ARGS),
    )
    counter = PassCounter(client.model)
    trainer = FederatedTrainer(
        rounds=work.rounds,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[AmplitudeHarmonization(preset="reference", share_target="first_round")],
        seed=work.seed,
    )
    # fit prints the best round's table: rendered (and timed) all the same, but kept out of the benchmark output.
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(client, data)
    metrics = {
        (row["client"], row["split"]): {"accuracy": row["accuracy"], "auroc": row["auroc"]}
        for row in trainer.history
        if row["round"] == work.rounds and row["client"] != "mean" and row["split"] in ("val", "test")
    }
    prefix = "model."  # the LightningModule holds the network as `self.model`
    return RunResult(counter.passes, metrics, {key.removeprefix(prefix): v for key, v in trainer.global_state.items()})


# -- 2. the plain PyTorch loop ----------------------------------------------------------------------------------


def derive_seed(seed: int, round_idx: int, client_index: int) -> int:
    """The trainer's per-(round, client) seed, so that both runs see the same data order."""
    return (seed * 1_000_003 + round_idx * 10_007 + client_index) % (2**63 - 1)


def perturbed_step(network: nn.Module, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor) -> Tensor:
    """One HarmoFL local step by hand: backward at w, w += α·g/‖g‖, backward at w + δ, restore w, base step."""
    loss = F.cross_entropy(network(images), labels)
    loss.backward()
    params = [p for p in network.parameters() if p.grad is not None]
    with torch.no_grad():
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
        scale = ALPHA / (grad_norm + NORM_EPS)
        unperturbed = [p.detach().clone() for p in params]
        for p in params:
            p.add_(p.grad * scale)
    optimizer.zero_grad(set_to_none=True)
    F.cross_entropy(network(images), labels).backward()
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


def run_plain(work: Workload, data: DemoHistology, root: Path) -> RunResult:
    torch.manual_seed(work.seed)
    network = use_batch_statistics(create_classifier(work.backbone, num_classes=NUM_CLASSES, in_chans=3))
    counter = PassCounter(network)
    # One optimizer whose state is swapped per client: loading adopts the stored tensors without copying, which
    # is safe because a client's stored state is replaced by its new one as soon as it has trained.
    optimizer = torch.optim.SGD(network.parameters(), **SGD_ARGS)
    fresh_optimizer_state = optimizer.state_dict()
    optimizer_states: dict[str, dict[str, Any]] = {}
    global_state = {key: value.detach().clone() for key, value in network.state_dict().items()}
    client_targets: dict[str, Tensor] = {}
    shared_target: Optional[Tensor] = None
    metrics = MetricCollection({"accuracy": BinaryAccuracy(), "auroc": BinaryAUROC()})
    results: dict[tuple[str, str], dict[str, float]] = {}
    clients = data.client_names

    with (root / "metrics.csv").open("w", newline="") as metrics_file:
        writer = csv.writer(metrics_file)
        writer.writerow(["round", "client", "split", "loss", "accuracy", "auroc"])
        for round_idx in range(work.rounds):
            client_states: list[dict[str, Tensor]] = []
            losses: dict[str, float] = {}
            for index, client in enumerate(clients):
                network.load_state_dict(global_state)
                optimizer.load_state_dict(optimizer_states.get(client, fresh_optimizer_state))
                client_seed = derive_seed(work.seed, round_idx, index)
                torch.manual_seed(client_seed)
                loader = DataLoader(
                    data.dataset(client, "train"),
                    batch_size=data.batch_size,
                    shuffle=True,
                    generator=torch.Generator().manual_seed(client_seed),
                )
                network.train()
                loss_sum = torch.zeros(())
                for images, labels in loader:
                    if client not in client_targets:  # reference preset: the first batch's mean amplitude, kept
                        client_targets[client] = amplitude_spectrum(images).mean(dim=0)
                    target = shared_target if shared_target is not None else client_targets[client]
                    loss_sum += perturbed_step(network, optimizer, harmonize(images, target, BAND), labels)
                losses[client] = (loss_sum / len(loader)).item()
                client_states.append({key: value.detach().clone() for key, value in network.state_dict().items()})
                optimizer_states[client] = optimizer.state_dict()
            global_state = fedavg(client_states)
            if shared_target is None:  # share_target=first_round: averaged once, after round 1, then frozen
                shared_target = (sum(client_targets[c].double() for c in clients) / len(clients)).float()

            network.load_state_dict(global_state)
            network.eval()
            with torch.no_grad():
                for client in clients:
                    writer.writerow([round_idx + 1, client, "train", losses[client], "", ""])
                    for split in ("val", "test"):
                        metrics.reset()
                        for images, labels in DataLoader(data.dataset(client, split), batch_size=data.eval_batch_size):
                            probabilities = network(harmonize(images, shared_target, BAND)).softmax(dim=1)
                            metrics.update(probabilities[:, 1], labels)
                        results[(client, split)] = {name: float(v) for name, v in metrics.compute().items()}
                        row = results[(client, split)]
                        writer.writerow([round_idx + 1, client, split, "", row["accuracy"], row["auroc"]])
            metrics_file.flush()
            torch.save(
                {
                    "round": round_idx + 1,
                    "global_state": global_state,
                    "optimizer_states": optimizer_states,
                    "client_targets": client_targets,
                    "shared_target": shared_target,
                },
                root / "last.ckpt",
            )
    return RunResult(counter.passes, results, global_state)


# -- timing and checks ------------------------------------------------------------------------------------------

Runner = Callable[[Workload, DemoHistology, Path], RunResult]


def timed(runner: Runner, work: Workload, data: DemoHistology) -> tuple[float, RunResult]:
    """Wall time of one run in a fresh output folder; creating and removing the folder is not timed."""
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        gc.collect()  # garbage from the previous run must not be collected inside this one's timing
        start = time.perf_counter()
        result = runner(work, data, Path(folder))
        return time.perf_counter() - start, result


def expected_passes(work: Workload, data: DemoHistology) -> dict[str, int]:
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


def check_same_work(work: Workload, data: DemoHistology, orchestrator: RunResult, plain: RunResult) -> str:
    """Raise if the runs differ in passes; describe how far apart their weights and metrics ended."""
    expected = expected_passes(work, data)
    if not orchestrator.passes == plain.passes == expected:
        raise RuntimeError(
            f"The runs did different work: orchestrator {orchestrator.passes}, plain {plain.passes}, "
            f"expected {expected}."
        )
    if orchestrator.global_state.keys() != plain.global_state.keys():
        raise RuntimeError("The orchestrator's and the plain loop's networks have different state-dict keys.")
    weight_gap = max(
        (orchestrator.global_state[k].double() - plain.global_state[k].double()).abs().max().item()
        for k in plain.global_state
    )
    metric_gap = max(
        abs(orchestrator.metrics[key][name] - value)
        for key, row in plain.metrics.items()
        for name, value in row.items()
    )
    passes = ", ".join(f"{count} {name}" for name, count in expected.items())
    return (
        f"passes per run (both): {passes}\n"
        f"same result: max |global weight difference| = {weight_gap:.2e}, "
        f"max |last-round metric difference| = {metric_gap:.2e}"
    )


def profile_orchestrator(work: Workload, data: DemoHistology, top: int) -> None:
    """cProfile of one orchestrator run: the ``top`` entries by cumulative time in the orchestrator's own code
    (trainer, reporting, checkpoints, aggregation, Fabric), where any time the plain loop does not spend lies."""
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        profiler.runcall(run_orchestrator, work, data, Path(folder))
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream).sort_stats(pstats.SortKey.CUMULATIVE)
    stats.print_stats(ORCHESTRATOR_CODE, top)
    print(f"\ncProfile of one orchestrator run (top {top} by cumulative time, orchestrator code only):")
    print(stream.getvalue().strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="communication rounds per timed run")
    parser.add_argument("--clients", type=int, default=4, help="sites of the demo federation")
    parser.add_argument("--train-per-site", type=int, default=192)
    parser.add_argument("--val-per-site", type=int, default=64)
    parser.add_argument("--test-per-site", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each run, alternating")
    parser.add_argument("--backbone", default="test_resnet", help="a harmofl or timm classifier name")
    # One thread by default: on a small shared machine more threads make the timings noisier, not more telling.
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--profile", action="store_true", help="also cProfile one orchestrator run")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    data = DemoHistology(
        num_sites=args.clients,
        train_per_site=args.train_per_site,
        val_per_site=args.val_per_site,
        test_per_site=args.test_per_site,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=SEED,
    )
    data.setup("fit")  # generated once, untimed: both runs read the same tensors (the trainer's setup is a no-op)
    work = Workload(rounds=args.rounds, backbone=args.backbone)

    # Untimed warm-up: imports, first calls (matplotlib, torchmetrics, oneDNN kernels) and allocator growth.
    warm_up = Workload(rounds=1, backbone=args.backbone)
    check_same_work(warm_up, data, timed(run_orchestrator, warm_up, data)[1], timed(run_plain, warm_up, data)[1])

    times: dict[str, list[float]] = {"orchestrator": [], "plain": []}
    runners: dict[str, Runner] = {"orchestrator": run_orchestrator, "plain": run_plain}
    last: dict[str, RunResult] = {}
    for _ in range(args.repeats):
        for name, runner in runners.items():  # alternating, so that drifting machine load hits both alike
            seconds, last[name] = timed(runner, work, data)
            times[name].append(seconds)
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratio = medians["orchestrator"] / medians["plain"]

    print(
        f"HarmoFL overhead: {args.clients} clients x {args.train_per_site} training images "
        f"({args.image_size}px, batch {args.batch_size}), {args.rounds} rounds, backbone {args.backbone}, "
        f"{args.threads} thread(s), torch {torch.__version__}, {os.cpu_count()} CPUs"
    )
    print(check_same_work(work, data, last["orchestrator"], last["plain"]))
    print(f"plain loop omits: {PLAIN_OMITS}")
    print(f"\n{'run':<14}" + "".join(f"{f'rep {i + 1} (s)':>12}" for i in range(args.repeats)) + f"{'median (s)':>12}")
    for name, values in times.items():
        print(f"{name:<14}" + "".join(f"{v:>12.3f}" for v in values) + f"{medians[name]:>12.3f}")
    extra_ms = (medians["orchestrator"] - medians["plain"]) / args.rounds * 1e3
    print(f"orchestrator extra time per round: {extra_ms:.0f} ms")
    if args.profile:
        profile_orchestrator(work, data, top=20)
    elif ratio > 1.05:
        print("\nThe orchestrator costs over 5% more: rerun with --profile to see where its time goes.")
    print(f"\nratio orchestrator/plain = {ratio:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
