"""HarmoFL written by hand with torch alone: the plain loop ``overhead.py`` times against the orchestrator.

No Lightning, no Fabric, no ``FederatedTrainer``: each round, for each client, it loads the global weights and
the client's optimizer state, iterates the client's training loader (seeded as the trainer seeds it), harmonizes
each batch with ``harmofl.amplitude`` as ``callbacks.AmplitudeHarmonization`` does (``share_target=first_round``)
and runs the two-pass weight-perturbation step. Then a uniform FedAvg, the shared amplitude target after round 1,
every client's val and test metrics, a row per client and split in ``metrics.csv`` and a ``torch.save``
checkpoint. What it leaves out is :data:`OMITS`.

Both runs leave a :class:`RunResult` (passes counted by :class:`PassCounter`, last metrics, global weights), and
:func:`check_same_work` compares them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as harness  # first: the repository on sys.path, the environment torch reads
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics import MetricCollection

from callbacks import PRESETS
from harmofl.amplitude import amplitude_spectrum, harmonize, update_running_amplitude
from harmofl.data import FederatedDataModule
from harmofl.federation.topology import derive_seed  # the trainer's seed per (round, client): same data order
from harmofl.perturbation import NORM_EPS

ALPHA = 0.05  # the perturbation radius of both demo configurations
HISTORY_KEYS = ("round", "client", "split")
# Several processes add the clients' float64 sums in another order, which may change a float32 rounding; other
# thread counts reduce convolutions in another order, and Adam's first steps are sign-like, so a near-zero
# gradient coordinate that flips sign moves its weight by up to 2·lr (6e-3 here): those cannot be compared.
WEIGHT_TOLERANCE = 1e-6
OMITS = (
    "best.ckpt copy and best-round selection, summary.json, convergence.png, mean-over-clients rows, "
    "the history inside the checkpoint, the best-round table, atomic and durable checkpoint writes (temp file, "
    "fsync, rename, directory fsync), the finite-loss check, the server's update checks, callback and logger dispatch"
)

Loss = Callable[[Tensor, Tensor], Tensor]
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Recipe:
    """What the plain loop needs of a task, each piece built without Lightning as the client builds it."""

    network: Callable[[], nn.Module]
    optimizer: Callable[..., torch.optim.Optimizer]
    preset: str  # of callbacks.AmplitudeHarmonization
    loss: Loss
    metrics: Callable[[], MetricCollection]
    predictions: Callable[[Tensor], Tensor]  # logits -> what the metrics are updated with


@dataclass
class RunResult:
    """What a run leaves to compare: pass counts, last round's metrics, final global weights."""

    passes: dict[str, int]
    metrics: dict[tuple[str, str], dict[str, float]]
    global_state: dict[str, Tensor]


class PassCounter:
    """Counts the network's forward passes (training and evaluation apart) and backward passes.

    A forward pre-hook on the network counts forwards; a gradient hook on its first parameter (which every
    backward pass reaches) counts backwards. Both survive ``load_state_dict``, which copies into the same
    parameter tensors.
    """

    def __init__(self, network: nn.Module) -> None:
        self.passes = {"train forward": 0, "eval forward": 0, "backward": 0}
        network.register_forward_pre_hook(self._on_forward)
        next(network.parameters()).register_hook(self._on_backward)

    def _on_forward(self, module: nn.Module, inputs: Any) -> None:
        self.passes["train forward" if module.training else "eval forward"] += 1

    def _on_backward(self, grad: Tensor) -> None:
        self.passes["backward"] += 1


def expected_passes(rounds: int, data: FederatedDataModule) -> dict[str, int]:
    """Two forwards and two backwards per training batch; one forward per evaluation batch."""
    train = sum(-(-data.num_samples(c, "train") // data.batch_size) for c in data.client_names)
    evaluation = sum(
        -(-data.num_samples(c, split) // data.eval_batch_size) for c in data.client_names for split in ("val", "test")
    )
    return {"train forward": 2 * train * rounds, "eval forward": evaluation * rounds, "backward": 2 * train * rounds}


def check_same_work(
    rounds: int, data: FederatedDataModule, orchestrator: RunResult, plain: RunResult, reference: RunResult
) -> tuple[float, float]:
    """Raise if the orchestrator and the timed plain loop did different passes, or if the orchestrator's weights
    differ from ``reference``'s (the plain loop's at the same threads per process); returns the max |difference|
    of global weights and of last-round metrics from ``reference``."""
    expected = expected_passes(rounds, data)
    if not orchestrator.passes == plain.passes == expected:
        raise RuntimeError(
            f"The runs did different work: orchestrator {orchestrator.passes}, plain {plain.passes}, "
            f"expected {expected}."
        )
    if orchestrator.global_state.keys() != reference.global_state.keys():
        only_orchestrator = sorted(orchestrator.global_state.keys() - reference.global_state.keys())
        only_plain = sorted(reference.global_state.keys() - orchestrator.global_state.keys())
        raise RuntimeError(
            f"The orchestrator's and the plain loop's networks have different state-dict keys: only the "
            f"orchestrator's {only_orchestrator}, only the plain loop's {only_plain}."
        )
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
class Harmonization:
    """AmplitudeHarmonization with ``share_target="first_round"``: each client's running mean amplitude until the
    clients' targets are averaged after round 1, then that shared target, frozen."""

    band: float
    momentum: float
    client_targets: dict[str, Tensor] = field(default_factory=dict)
    shared_target: Tensor | None = None

    def training_batch(self, client: str, images: Tensor) -> Tensor:
        running = self.client_targets.get(client)
        # With momentum 0 (the reference preset) only the first batch counts: later ones need no spectrum.
        if self.shared_target is None and (running is None or self.momentum > 0):
            self.client_targets[client] = update_running_amplitude(running, amplitude_spectrum(images), self.momentum)
        target = self.shared_target if self.shared_target is not None else self.client_targets[client]
        return self.apply_(images, target)

    def share(self, clients: list[str]) -> None:
        if self.shared_target is None:
            self.shared_target = (sum(self.client_targets[c].double() for c in clients) / len(clients)).float()

    def apply_(self, images: Tensor, target: Tensor) -> Tensor:
        # In place, as the callback: the network then sees the loader's (contiguous) batch tensor.
        return images.copy_(harmonize(images, target, self.band))


def run_plain(
    recipe: Recipe, data: FederatedDataModule, rounds: int, seed: int, root: Path, device: torch.device = CPU
) -> tuple[float, RunResult]:
    """The whole run on ``device``, writing into ``root``; timed from after the network's construction to the last
    checkpoint. The global weights it returns are on the host, as the orchestrator's."""
    torch.manual_seed(seed)  # the same initial weights as the orchestrator's network
    network = recipe.network().to(device)
    counter = PassCounter(network)
    with harness.Timer(device, collect=True) as timer:
        global_state, results = federate(recipe, network, data, rounds, seed, root)
    host_state = {key: value.cpu() for key, value in global_state.items()}
    return timer.seconds, RunResult(counter.passes, results, host_state)


def federate(
    recipe: Recipe, network: nn.Module, data: FederatedDataModule, rounds: int, seed: int, root: Path
) -> tuple[dict[str, Tensor], dict[tuple[str, str], dict[str, float]]]:
    """The rounds: the final global weights and the last round's metrics per (client, split)."""
    # One optimizer whose state is swapped per client: loading adopts the stored tensors without copying, which
    # is safe because a client's stored state is replaced by its new one as soon as it has trained.
    optimizer = recipe.optimizer(network.parameters())
    fresh_optimizer_state = optimizer.state_dict()
    optimizer_states: dict[str, dict[str, Any]] = {}
    global_state = {key: value.detach().clone() for key, value in network.state_dict().items()}
    harmonization = Harmonization(**PRESETS[recipe.preset])
    device = next(network.parameters()).device
    metrics = recipe.metrics().to(device)
    results: dict[tuple[str, str], dict[str, float]] = {}
    clients = data.client_names

    with (root / "metrics.csv").open("w", newline="") as metrics_file:
        writer = csv.writer(metrics_file)
        writer.writerow([*HISTORY_KEYS, "loss", *metrics.keys()])
        for round_idx in range(rounds):
            client_states: list[dict[str, Tensor]] = []
            for index, client in enumerate(clients):
                network.load_state_dict(global_state)
                optimizer.load_state_dict(optimizer_states.get(client, fresh_optimizer_state))
                loader = training_loader(data, client, derive_seed(seed, round_idx, index))
                loss = train_client(network, optimizer, recipe.loss, harmonization, client, loader)
                writer.writerow([round_idx + 1, client, "train", loss, *[""] * len(metrics)])
                client_states.append({key: value.detach().clone() for key, value in network.state_dict().items()})
                optimizer_states[client] = optimizer.state_dict()
            global_state = fedavg(client_states)
            harmonization.share(clients)

            network.load_state_dict(global_state)
            for client in clients:
                for split in ("val", "test"):
                    results[(client, split)] = evaluate(
                        network, data, client, split, metrics, recipe.predictions, harmonization
                    )
                    writer.writerow([round_idx + 1, client, split, "", *results[(client, split)].values()])
            metrics_file.flush()
            checkpoint = {
                "round": round_idx + 1,
                "global_state": global_state,
                "optimizer_states": optimizer_states,
                "client_targets": harmonization.client_targets,
                "shared_target": harmonization.shared_target,
            }
            torch.save(checkpoint, root / "last.ckpt")
    return global_state, results


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
    network: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Loss,
    harmonization: Harmonization,
    client: str,
    loader: DataLoader,
) -> float:
    """One epoch of perturbed steps on harmonized batches; the mean unperturbed loss."""
    network.train()
    device = next(network.parameters()).device
    loss_sum = torch.zeros((), device=device)
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        loss_sum += perturbed_step(network, optimizer, loss_fn, harmonization.training_batch(client, images), targets)
    return (loss_sum / len(loader)).item()


def perturbed_step(
    network: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Loss, images: Tensor, targets: Tensor
) -> Tensor:
    """One HarmoFL local step: backward at w, w += α·g/‖g‖, backward at w + δ, restore w, base step."""
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
    """Uniform mean of the clients' weights, summed in float64 as harmofl's aggregation does."""
    averaged: dict[str, Tensor] = {}
    for key, reference in states[0].items():
        mean = sum(state[key].double() for state in states) / len(states)
        averaged[key] = (mean if reference.is_floating_point() else mean.round()).to(reference.dtype)
    return averaged


@torch.no_grad()
def evaluate(
    network: nn.Module,
    data: FederatedDataModule,
    client: str,
    split: str,
    metrics: MetricCollection,
    predictions: Callable[[Tensor], Tensor],
    harmonization: Harmonization,
) -> dict[str, float]:
    """The global model's metrics on one client's split, its images harmonized to the shared target."""
    assert harmonization.shared_target is not None  # shared after round 1's aggregation, before any evaluation
    network.eval()
    metrics.reset()
    device = next(network.parameters()).device
    for images, targets in DataLoader(data.dataset(client, split), batch_size=data.eval_batch_size):
        images, targets = images.to(device), targets.to(device)
        metrics.update(predictions(network(harmonization.apply_(images, harmonization.shared_target))), targets)
    return {name: float(value) for name, value in metrics.compute().items()}
