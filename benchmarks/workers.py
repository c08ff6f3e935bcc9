"""One process or two on the CPU: what client parallelism (``trainer.devices=2``) buys per round.

Each run is the demo configuration, ``configs/demo.yaml`` (the demo federation: 192 training, 64 validation, 128
test images of 64 px per site, batch 32, ``test_resnet``, weight perturbation, ``reference`` harmonization),
with ``--trainer.rounds``, ``--trainer.devices`` and ``--data.init_args.num_sites`` overridden, built by
``harmofl.cli.build`` as ``cli.py fit`` builds it, in a fresh worker process. Three layouts, run alternately for
4 and 8 clients:

- ``2x1``: 2 processes (gloo, clients spread round-robin) with 1 thread each (``OMP_NUM_THREADS=1``);
- ``1x2``: 1 process with 2 threads (``OMP_NUM_THREADS=2``): the same total thread count as ``2x1``;
- ``1x1``: 1 process with 1 thread.

Torch takes its intra-op thread count from ``OMP_NUM_THREADS``; each run records every process's
``torch.get_num_threads()`` and the script checks it. The worker times, on rank 0, through the trainer's seams
(the configuration adds the timing callback and aggregator; ``fit`` gets the timing executor):

- each round and its CPU time (a callback, ``on_round_start`` to ``on_round_end``);
- local training: inside the executor's ``train`` (an ``InProcessExecutor`` subclass), this process's clients;
- the aggregation: ``center`` of a ``Mean`` subclass (the all-reduce of the float64 weighted sums and the
  division);
- evaluation: the executor's ``evaluate``, this process's clients;
- the checkpoint: ``on_save_checkpoint`` to ``on_round_end`` (``last.ckpt``, ``best.ckpt``, metrics.csv,
  summary.json);
- data generation: the executor's ``connect`` (``prepare_data`` and ``setup``).

The rest of a round ("other") is the gathers between processes (waiting for the slower one, the clients' records
for the checkpoint), the server step and the hooks. Start-up (launch, imports, the second process, the process
group, data generation, model setup) is the time from launch to the first round. Each run gets an empty
``XDG_CACHE_HOME``, so that each generates its demo data.

    python benchmarks/workers.py                     # 4 and 8 clients, 3 rounds, 2 repeats: 3.5 min, 2 quiet cores
    python benchmarks/workers.py --clients 8 --rounds 4 --repeats 3

How to read the output: a row per (clients, layout) with medians over repeats of wall time, start-up and data
generation, and medians over the rounds after the first (a warm-up) of the round time and of its parts, the
fastest round ("best") and rank 0's CPU time over wall time (below the thread count: the process waited, for the
other process or for cores taken by other work). Then the per-round speed-ups ``1x2 / 2x1`` (same threads) and
``1x1 / 2x1`` on median and on best rounds, the end-to-end ones, and the aggregation's share of a round. On a
machine shared with other jobs, ``1x2`` can be many times slower (its two OpenMP threads end up sharing one
core): compare the "best" figures, or run more ``--repeats``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import _harness as harness
import torch
from lightning.fabric import Fabric
from torch import Tensor

from harmofl.aggregators import Mean
from harmofl.cli import build
from harmofl.data.base import FederatedDataModule, Split
from harmofl.federation.executor import InProcessExecutor, Outcome, Results

# name: (processes, threads per process)
LAYOUTS: dict[str, tuple[int, int]] = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}
# What a round is split into on rank 0 (seconds); "other" is the rest.
PARTS = ("train", "aggregate", "evaluate", "checkpoint")
# Targets: 2 processes at least as fast per round as 1 process with the same threads; aggregation a small part.
MIN_SPEEDUP = 1.0
MAX_AGGREGATE_SHARE = 0.05

# This process's timings: the configuration builds the aggregator and the callback, so they cannot be handed one.
CLOCK = harness.Clock()


# -- inside a run: the demo configuration, timed through the trainer's seams ---------------------------------------


class TimedMean(Mean):
    """FedAvg's mean, with the time of ``center`` (the all-reduce and the division) in bucket ``aggregate``."""

    def center(
        self, fabric: Fabric, shared: Mapping[str, Tensor], order: Sequence[str], total_weight: float
    ) -> dict[str, Tensor]:
        with CLOCK.timing("aggregate"):
            return super().center(fabric, shared, order, total_weight)


class RunTimer(harness.RoundTimer):
    """The round timer, reading this process's clock."""

    def __init__(self) -> None:
        super().__init__(CLOCK)


class TimedExecutor(InProcessExecutor):
    """The default executor, with data setup (``connect``), local training and evaluation timed."""

    def connect(self, trainer: Any, datamodule: FederatedDataModule | None, stage: str) -> dict[str, int]:
        with CLOCK.timing("data"):
            return super().connect(trainer, datamodule, stage)

    def train(
        self, round_idx: int, participants: list[str], shared: Mapping[str, Tensor]
    ) -> Iterator[tuple[str, Outcome]]:
        # Only the time inside the generator: what the trainer does with each update between items is not training.
        items = super().train(round_idx, participants, shared)
        while True:
            with CLOCK.timing("train"):
                item = next(items, None)
            if item is None:
                return
            yield item

    def evaluate(self, splits: tuple[Split, ...]) -> Results:
        with CLOCK.timing("evaluate"):
            return super().evaluate(splits)


def run_configuration(call: harness.WorkerCall) -> None:
    """Every process Fabric launched runs this (the command line is re-run); rank 0 saves the timings."""
    timing = [
        "--trainer.callbacks+=__main__.RunTimer",
        "--trainer.aggregator=__main__.TimedMean",
        f"--trainer.default_root_dir={call.result.parent / 'run'}",
    ]
    cli = build([*call.arguments, *timing])
    with contextlib.redirect_stdout(io.StringIO()):  # the best round's table
        cli.trainer.fit(cli.model, cli.datamodule, executor=TimedExecutor())
    threads = harness.gather_objects(torch.get_num_threads())
    (timer,) = (callback for callback in cli.trainer.callbacks if isinstance(callback, RunTimer))
    if cli.trainer.is_global_zero:
        call.save({"threads": threads, "data": CLOCK.seconds["data"], "rounds": timer.rounds})


# -- the driver --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run's figures (seconds): rank 0's rounds and their parts, start-up, data generation and wall time."""

    layout: str
    wall: float
    startup: float
    data_setup: float
    rounds: list[dict[str, float]]

    def per_round(self) -> list[dict[str, float]]:
        """Each round after the first (a warm-up): its wall time, its PARTS, ``other`` (the rest), ``cpu`` (rank
        0's CPU time over the wall time: below the threads when the process waited for the other one, or for the
        cores) and the aggregation's share."""
        figures = []
        for record in self.rounds[1:]:
            parts = {part: record.get(part, 0.0) for part in PARTS}
            figures.append(
                {
                    **parts,
                    "round": record["round"],
                    "other": record["round"] - sum(parts.values()),
                    "cpu": record["cpu"] / record["round"],
                    "aggregate share": parts["aggregate"] / record["round"],
                }
            )
        return figures


def launch(layout: str, clients: int, rounds: int, timeout: float) -> Run:
    processes, threads = LAYOUTS[layout]
    configuration = [
        "--config",
        "configs/demo.yaml",
        "--trainer.rounds",
        str(rounds),
        "--trainer.devices",
        str(processes),
        "--data.init_args.num_sites",
        str(clients),
        "--trainer.enable_progress_bar",
        "false",
    ]
    launched, start = time.time(), time.perf_counter()
    result = harness.run_worker(configuration, threads=threads, fresh_cache=True, timeout=timeout)
    wall = time.perf_counter() - start
    if any(count != threads for count in result["threads"]):
        raise RuntimeError(f"{layout} asked for {threads} thread(s) per process, got {result['threads']}.")
    return Run(layout, wall, result["rounds"][0]["start"] - launched, result["data"], result["rounds"])


def median_of(runs: list[Run], key: str) -> float:
    return statistics.median(figures[key] for run in runs for figures in run.per_round())


def best_of(runs: list[Run], key: str) -> float:
    """The smallest value: the round least disturbed by other work on the machine."""
    return min(figures[key] for run in runs for figures in run.per_round())


@dataclass
class Row:
    """The runs of one (clients, layout)."""

    clients: int
    layout: str
    runs: list[Run]


TABLE = (
    harness.Column("clients", lambda row: str(row.clients)),
    harness.Column("PxT", lambda row: row.layout),
    harness.Column("wall", lambda row: f"{statistics.median(r.wall for r in row.runs):.2f}", "(s)"),
    harness.Column("start-up", lambda row: f"{statistics.median(r.startup for r in row.runs):.2f}", "(s)"),
    harness.Column("data", lambda row: f"{statistics.median(r.data_setup for r in row.runs):.2f}", "(s)"),
    harness.Column("round", lambda row: f"{median_of(row.runs, 'round'):.3f}", "(s)"),
    harness.Column("best", lambda row: f"{best_of(row.runs, 'round'):.3f}", "(s)"),
    harness.Column("train", lambda row: f"{median_of(row.runs, 'train'):.3f}", "(s)"),
    harness.Column("aggregate", lambda row: f"{median_of(row.runs, 'aggregate') * 1e3:.1f}", "(ms)"),
    harness.Column("evaluate", lambda row: f"{median_of(row.runs, 'evaluate'):.3f}", "(s)"),
    harness.Column("checkpoint", lambda row: f"{median_of(row.runs, 'checkpoint') * 1e3:.1f}", "(ms)"),
    harness.Column("other", lambda row: f"{median_of(row.runs, 'other'):.3f}", "(s)"),
    harness.Column("cpu/wall", lambda row: f"{median_of(row.runs, 'cpu'):.2f}"),
)


def report(args: argparse.Namespace, results: dict[int, dict[str, list[Run]]], load_before: float) -> None:
    print(
        f"HarmoFL 1 vs 2 processes on the CPU: configs/demo.yaml, {args.rounds} rounds (per-round figures: "
        f"rounds 2-{args.rounds}), {args.repeats} repeat(s)"
    )
    print(f"{harness.describe_machine()} (before: {load_before:.1f})\n")
    harness.print_table(
        TABLE, [Row(clients, layout, runs) for clients, layouts in results.items() for layout, runs in layouts.items()]
    )
    print(
        "PxT: processes x threads each. Medians over repeats (wall, start-up, data) and over rounds (the rest);\n"
        "best: the fastest round. data: prepare_data + setup on rank 0; train, evaluate: rank 0's own clients;\n"
        "aggregate: the mean's all-reduce; checkpoint: last.ckpt, best.ckpt and outputs; other: the rest of the\n"
        "round (gathers, waiting for the other process, server step, hooks); cpu/wall: rank 0's CPU time over wall\n"
        "time in a round."
    )

    print()
    for clients, layouts in results.items():
        median = {layout: median_of(runs, "round") for layout, runs in layouts.items()}
        best = {layout: best_of(runs, "round") for layout, runs in layouts.items()}
        walls = {layout: statistics.median(r.wall for r in runs) for layout, runs in layouts.items()}
        best_walls = {layout: min(r.wall for r in runs) for layout, runs in layouts.items()}

        def speed_up(times: dict[str, float], baseline: str) -> float:
            return harness.ratio(times[baseline], times["2x1"])

        verdict = "met" if speed_up(median, "1x2") >= MIN_SPEEDUP else "NOT met"
        print(
            f"{clients} clients, speed-up of 2x1 per round (median rounds; best rounds):\n"
            f"  vs 1x2 = {speed_up(median, '1x2'):.2f}; {speed_up(best, '1x2'):.2f} (target >= {MIN_SPEEDUP}: "
            f"{verdict})\n"
            f"  vs 1x1 = {speed_up(median, '1x1'):.2f}; {speed_up(best, '1x1'):.2f}\n"
            f"  end to end, start-up included (median runs; best runs): vs 1x2 = {speed_up(walls, '1x2'):.2f}; "
            f"{speed_up(best_walls, '1x2'):.2f}, vs 1x1 = {speed_up(walls, '1x1'):.2f}; "
            f"{speed_up(best_walls, '1x1'):.2f}"
        )
        shares = {layout: median_of(runs, "aggregate share") for layout, runs in layouts.items()}
        verdict = "met" if max(shares.values()) <= MAX_AGGREGATE_SHARE else "NOT met"
        print(
            "  aggregation's share of a round: "
            + ", ".join(f"{k} {v:.2%}" for k, v in shares.items())
            + f" (target <= {MAX_AGGREGATE_SHARE:.0%}: {verdict})"
        )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,8", help="comma-separated client counts (demo sites)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run (>= 2); the first is not timed")
    parser.add_argument("--repeats", type=int, default=2, help="runs per (clients, layout); medians reported")
    parser.add_argument("--timeout", type=float, default=900, help="seconds after which a run is abandoned")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the first round is a warm-up")
    return args


def main() -> None:
    args = parse_args()
    load_before = harness.load_average()
    results: dict[int, dict[str, list[Run]]] = {}
    for clients in (int(c) for c in args.clients.split(",")):
        results[clients] = {layout: [] for layout in LAYOUTS}
        names = list(LAYOUTS)
        for repeat in range(args.repeats):
            # Layouts alternate, and the order rotates per repeat, so that drifting machine load hits each alike.
            for layout in names[repeat % len(names) :] + names[: repeat % len(names)]:
                run = launch(layout, clients, args.rounds, args.timeout)
                results[clients][layout].append(run)
                print(f"{clients} clients, {layout}, repeat {repeat + 1}: {run.wall:.1f} s", file=sys.stderr)
    report(args, results, load_before)


if __name__ == "__main__":
    harness.run(main, worker=run_configuration)
