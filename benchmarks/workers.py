"""One process or two on the CPU: what client parallelism (``trainer.devices=2``) buys per round.

Each run is ``python cli.py fit --config configs/demo.yaml`` (the demo federation: 192 training, 64 validation,
128 test images of 64 px per site, batch 32, ``test_resnet``, weight perturbation, ``reference`` harmonization)
with ``--trainer.rounds``, ``--trainer.devices`` and ``--data.init_args.num_sites`` overridden, in a fresh
subprocess. Three layouts, run alternately for 4 and 8 clients:

- ``2x1``: 2 processes (gloo, clients spread round-robin) with 1 thread each (``OMP_NUM_THREADS=1``);
- ``1x2``: 1 process with 2 threads (``OMP_NUM_THREADS=2``): the same total thread count as ``2x1``;
- ``1x1``: 1 process with 1 thread.

Torch takes its intra-op thread count from ``OMP_NUM_THREADS``; each run records ``torch.get_num_threads()`` and
the script checks it. The runs go through this script, which installs timers and then calls ``cli.main()``
unchanged (Fabric's launcher re-runs the same command for the second process, which installs them too): per
round, its wall time on rank 0 (``_run_round``), the server aggregation (``FederatedTrainer._aggregate``: the
all-reduce of the weighted sums and the server step; the wait for the slower process happens before it, in the
gather of the clients' contributions), evaluation (``_evaluate_clients``) and the end of the round
(``_end_round``: gathering every client's record, the checkpoint, metrics.csv). Start-up (launch, imports, the
second process, the process group, data generation, model setup) is the time from launch to the first round.
Each run gets an empty ``XDG_CACHE_HOME``, so that each generates its demo data.

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
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # the script runs from a checkout where the package may not be installed

# Set in a run's environment: the folder its timing files go to (and what makes this script a run, not the driver).
TIMING_DIR = "HARMOFL_WORKERS_TIMING"
# Nothing may reach the network: no model hub, no W&B.
OFFLINE = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
# name: (processes, threads per process)
LAYOUTS: dict[str, tuple[int, int]] = {"1x2": (1, 2), "2x1": (2, 1), "1x1": (1, 1)}
# What a round is split into on rank 0; "train" is the rest (local training, and waiting for the other process).
PARTS = ("_aggregate", "_evaluate_clients", "_end_round")
# Targets: 2 processes at least as fast per round as 1 process with the same threads; aggregation a small part.
MIN_SPEEDUP = 1.0
MAX_AGGREGATE_SHARE = 0.05


# -- inside a run: timers around the trainer, then the unchanged CLI ---------------------------------------------


def timed(function: Callable[..., Any], record: Callable[[float], None]) -> Callable[..., Any]:
    """``function``, passing the seconds each call took to ``record``."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.time()
        try:
            return function(*args, **kwargs)
        finally:
            record(time.time() - start)

    return wrapper


class Recorder:
    """Timestamps of one process's rounds and of the parts of each round, written as JSON at the end."""

    def __init__(self) -> None:
        self.rank = 0
        self.threads = 0
        self.data_setup = 0.0
        self.rounds: list[dict[str, float]] = []

    def add_to_round(self, bucket: str, seconds: float) -> None:
        if self.rounds:
            self.rounds[-1][bucket] = self.rounds[-1].get(bucket, 0.0) + seconds

    def add_to_data(self, seconds: float) -> None:
        self.data_setup += seconds

    def install(self) -> None:
        import torch

        from harmofl.data.demo import _ProceduralFederation
        from harmofl.trainer import FederatedTrainer

        for name in PARTS:
            setattr(FederatedTrainer, name, timed(getattr(FederatedTrainer, name),
                                                  functools.partial(self.add_to_round, name)))
        # Generating the demo data: prepare_data where the data module fills a cache there, else setup.
        for name in ("prepare_data", "setup"):
            setattr(_ProceduralFederation, name, timed(getattr(_ProceduralFederation, name), self.add_to_data))
        run_round = FederatedTrainer._run_round

        @functools.wraps(run_round)
        def timed_round(trainer: FederatedTrainer, round_idx: int) -> None:
            self.rank, self.threads = trainer.global_rank, torch.get_num_threads()
            cpu = time.process_time()  # every thread of this process
            self.rounds.append({"start": time.time()})
            run_round(trainer, round_idx)
            self.rounds[-1].update(end=time.time(), cpu=time.process_time() - cpu)

        FederatedTrainer._run_round = timed_round

    def write(self, folder: Path) -> None:
        record = {"rank": self.rank, "threads": self.threads, "data_setup": self.data_setup, "rounds": self.rounds}
        (folder / f"rank{self.rank}.json").write_text(json.dumps(record))


def run_cli_with_timers(folder: Path) -> None:
    recorder = Recorder()
    recorder.install()
    import cli  # after the timers: the CLI's trainer class is the patched one

    cli.main()  # reads sys.argv: `fit --config ...`, as `python cli.py` would
    recorder.write(folder)


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
        """Each round after the first (a warm-up): its wall time, its PARTS, ``train`` (the rest), ``cpu`` (rank 0's
        CPU time over the wall time: below the threads when the process waited for the other one, or for the
        cores) and the aggregation's share."""
        figures = []
        for record in self.rounds[1:]:
            wall = record["end"] - record["start"]
            parts = {part: record.get(part, 0.0) for part in PARTS}
            figures.append({"round": wall, "train": wall - sum(parts.values()), "cpu": record["cpu"] / wall,
                            "aggregate share": parts["_aggregate"] / wall, **parts})
        return figures


def launch(layout: str, clients: int, rounds: int, timeout: float) -> Run:
    processes, threads = LAYOUTS[layout]
    with tempfile.TemporaryDirectory(prefix="harmofl-workers-") as folder:
        command = [sys.executable, str(Path(__file__).resolve()), "fit", "--config", "configs/demo.yaml",
                   "--trainer.rounds", str(rounds), "--trainer.devices", str(processes),
                   "--data.init_args.num_sites", str(clients), "--trainer.enable_progress_bar", "false",
                   "--trainer.default_root_dir", str(Path(folder) / "run")]
        launched = time.time()
        # An empty cache folder per run: every run makes its demo data the same way (a data module that caches
        # them generates and writes them), and nothing is left in the user's cache.
        env = {**os.environ, **OFFLINE, "OMP_NUM_THREADS": str(threads), TIMING_DIR: folder,
               "XDG_CACHE_HOME": str(Path(folder) / "cache")}
        start = time.perf_counter()
        process = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - start
        if process.returncode != 0:
            raise RuntimeError(f"{layout}, {clients} clients failed:\n{process.stdout[-2000:]}\n"
                               f"{process.stderr[-4000:]}")
        ranks = [json.loads((Path(folder) / f"rank{rank}.json").read_text()) for rank in range(processes)]
    if any(rank["threads"] != threads for rank in ranks):
        raise RuntimeError(f"{layout} asked for {threads} thread(s) per process, got {[r['threads'] for r in ranks]}.")
    main = ranks[0]
    return Run(layout, wall, main["rounds"][0]["start"] - launched, main["data_setup"], main["rounds"])


def median_of(runs: list[Run], key: str) -> float:
    return statistics.median(figures[key] for run in runs for figures in run.per_round())


def best_of(runs: list[Run], key: str) -> float:
    """The smallest value: the round least disturbed by other work on the machine."""
    return min(figures[key] for run in runs for figures in run.per_round())


# The table's columns: header, unit, width, cell of a (clients, layout)'s runs.
COLUMNS: tuple[tuple[str, str, int, Callable[[list[Run]], str]], ...] = (
    ("wall", "(s)", 8, lambda runs: f"{statistics.median(r.wall for r in runs):.2f}"),
    ("start-up", "(s)", 9, lambda runs: f"{statistics.median(r.startup for r in runs):.2f}"),
    ("data", "(s)", 6, lambda runs: f"{statistics.median(r.data_setup for r in runs):.2f}"),
    ("round", "(s)", 8, lambda runs: f"{median_of(runs, 'round'):.3f}"),
    ("best", "(s)", 8, lambda runs: f"{best_of(runs, 'round'):.3f}"),
    ("train", "(s)", 8, lambda runs: f"{median_of(runs, 'train'):.3f}"),
    ("aggregate", "(ms)", 10, lambda runs: f"{median_of(runs, '_aggregate') * 1e3:.1f}"),
    ("evaluate", "(s)", 9, lambda runs: f"{median_of(runs, '_evaluate_clients'):.3f}"),
    ("end", "(s)", 7, lambda runs: f"{median_of(runs, '_end_round'):.3f}"),
    ("cpu/wall", "", 9, lambda runs: f"{median_of(runs, 'cpu'):.2f}"),
)


def report(args: argparse.Namespace, results: dict[int, dict[str, list[Run]]], load_before: float) -> None:
    import torch

    print(f"HarmoFL 1 vs 2 processes on the CPU: configs/demo.yaml, {args.rounds} rounds (per-round figures: "
          f"rounds 2-{args.rounds}), {args.repeats} repeat(s), torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f} (before: {load_before:.1f})")
    print(f"\n{'clients':>7}{'PxT':>5}" + "".join(f"{name:>{width}}" for name, _, width, _ in COLUMNS))
    print(f"{'':>12}" + "".join(f"{unit:>{width}}" for _, unit, width, _ in COLUMNS))
    for clients, layouts in results.items():
        for layout, runs in layouts.items():
            print(f"{clients:>7}{layout:>5}" + "".join(f"{cell(runs):>{width}}" for _, _, width, cell in COLUMNS))
    print("PxT: processes x threads each. Medians over repeats (wall, start-up, data) and over rounds (the rest);\n"
          "best: the fastest round. data: DemoHistology prepare_data + setup on rank 0; train: the round less\n"
          "aggregate, evaluate and end, so it includes waiting for the other process; end: record gather,\n"
          "checkpoint, outputs; cpu/wall: rank 0's CPU time over wall time in a round.")

    print()
    for clients, layouts in results.items():
        median = {layout: median_of(runs, "round") for layout, runs in layouts.items()}
        best = {layout: best_of(runs, "round") for layout, runs in layouts.items()}
        walls = {layout: statistics.median(r.wall for r in runs) for layout, runs in layouts.items()}
        best_walls = {layout: min(r.wall for r in runs) for layout, runs in layouts.items()}
        same_threads = median["1x2"] / median["2x1"]
        verdict = "met" if same_threads >= MIN_SPEEDUP else "NOT met"
        print(f"{clients} clients, speed-up of 2x1 per round (median rounds; best rounds):\n"
              f"  vs 1x2 = {same_threads:.2f}; {best['1x2'] / best['2x1']:.2f} (target >= {MIN_SPEEDUP}: {verdict})\n"
              f"  vs 1x1 = {median['1x1'] / median['2x1']:.2f}; {best['1x1'] / best['2x1']:.2f}\n"
              f"  end to end, start-up included (median runs; best runs): vs 1x2 = {walls['1x2'] / walls['2x1']:.2f}; "
              f"{best_walls['1x2'] / best_walls['2x1']:.2f}, vs 1x1 = {walls['1x1'] / walls['2x1']:.2f}; "
              f"{best_walls['1x1'] / best_walls['2x1']:.2f}")
        shares = {layout: median_of(runs, "aggregate share") for layout, runs in layouts.items()}
        verdict = "met" if max(shares.values()) <= MAX_AGGREGATE_SHARE else "NOT met"
        print("  aggregation's share of a round: " + ", ".join(f"{k} {v:.2%}" for k, v in shares.items())
              + f" (target <= {MAX_AGGREGATE_SHARE:.0%}: {verdict})")


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
    folder = os.environ.get(TIMING_DIR)
    if folder:  # a run launched by the driver below (or the second process Fabric launched from it)
        run_cli_with_timers(Path(folder))
        return
    args = parse_args()
    load_before = os.getloadavg()[0]  # other work on the machine skews every timing: shown with the results
    results: dict[int, dict[str, list[Run]]] = {}
    for clients in (int(c) for c in args.clients.split(",")):
        results[clients] = {layout: [] for layout in LAYOUTS}
        names = list(LAYOUTS)
        for repeat in range(args.repeats):
            # Layouts alternate, and the order rotates per repeat, so that drifting machine load hits each alike.
            for layout in names[repeat % len(names):] + names[: repeat % len(names)]:
                run = launch(layout, clients, args.rounds, args.timeout)
                results[clients][layout].append(run)
                print(f"{clients} clients, {layout}, repeat {repeat + 1}: {run.wall:.1f} s", file=sys.stderr)
    report(args, results, load_before)


if __name__ == "__main__":
    main()
