"""Overhead of the federated orchestrator: the same HarmoFL run through FederatedTrainer and a plain PyTorch loop.

Both runs do the same work on the same pre-generated demo federation (network and initial weights, seeded data
order, amplitude harmonization, two-pass weight-perturbation step, uniform FedAvg, every client's val and test
metrics, a checkpoint per round); the plain loop (``plain_loop.py``) is written with torch alone, so the ratio of
the two wall times is the price of the orchestrator. Two tasks, each with its demo configuration's settings:
``classification`` (configs/demo.yaml) and ``segmentation`` (configs/demo_seg.yaml).

Each task runs with 1 process and with 2 (``--processes``): the orchestrator with ``devices=N`` (N processes of
``--threads`` threads) against the plain loop in one process with ``N x --threads`` threads. An orchestrator of
several processes is a worker of this script (which Fabric re-runs once per extra process); it warms up with an
untimed one-round fit and times the next one itself, so start-up and imports are not counted.

Same work: both runs must do the expected forward and backward passes, and the orchestrator must reach the global
weights of the plain loop at its own threads per process (to 1e-6). The table shows the medians of alternating
timed repetitions and ``ratio orchestrator/plain`` per (task, processes); benchmarks/README.md has the details.

    python benchmarks/overhead.py                        # both tasks, 1 and 2 processes, 3 rounds, 3 repetitions
    python benchmarks/overhead.py --task segmentation --processes 2
    python benchmarks/overhead.py --profile              # plus a cProfile of one 1-process orchestrator run per task
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import cProfile
import dataclasses
import functools
import io
import pstats
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _harness as harness
import torch
from plain_loop import (
    ALPHA,
    HISTORY_KEYS,
    OMITS,
    PassCounter,
    RunResult,
    check_same_work,
    expected_passes,
    run_plain,
)
from tasks import NUM_CLASSES, SEED, TASKS, Workload, workload_from

from callbacks import AmplitudeHarmonization
from harmofl import FederatedTrainer
from harmofl.data import FederatedDataModule

TARGET_RATIO = 1.05
# The orchestrator's own machinery in profiled file names; the step, harmonization and network, shared, are not.
ORCHESTRATOR_CODE = (
    r"harmofl/(federation/\w+|trainer|reporting|checkpoint|aggregation|aggregators|server_optimizers"
    r"|validation)\.py|lightning/fabric/(fabric|wrappers)\.py"
)

Timed = tuple[float, RunResult]


# -- the orchestrator ----------------------------------------------------------------------------------------------


def run_orchestrator(work: Workload, data: FederatedDataModule, root: Path, devices: int = 1) -> Timed:
    """One fit; with ``devices > 1`` every process Fabric launched runs this, and each gets the whole result."""
    task = work.spec
    torch.manual_seed(SEED)  # the same initial weights as the plain loop's network
    client = task.client(num_classes=NUM_CLASSES, alpha=ALPHA, optimizer=task.recipe.optimizer)
    counter = PassCounter(client.model)
    trainer = FederatedTrainer(
        rounds=work.rounds,
        accelerator=work.accelerator,
        devices=devices,
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[AmplitudeHarmonization(preset=task.recipe.preset, share_target="first_round")],
        seed=SEED,
    )
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # every process launched and joined: start-up is not timed
    # fit prints the best round's table: rendered (and timed) all the same, but kept out of the benchmark output.
    with harness.Timer(collect=True) as timer, contextlib.redirect_stdout(io.StringIO()):
        trainer.fit(client, data)  # ends with a barrier: the last process has finished
    passes: collections.Counter[str] = collections.Counter()
    for part in harness.gather_objects(counter.passes):  # each process counted its own clients
        passes.update(part)
    metrics = {
        (row["client"], row["split"]): {name: value for name, value in row.items() if name not in HISTORY_KEYS}
        for row in trainer.history
        if row["round"] == work.rounds and row["client"] != "mean" and row["split"] in ("val", "test")
    }
    # The LightningModule holds the network as `self.model`.
    global_state = {key.removeprefix("model."): value for key, value in trainer.global_state.items()}
    return timer.seconds, RunResult(dict(passes), metrics, global_state)


def orchestrator_worker(call: harness.WorkerCall) -> None:
    """An untimed one-round warm-up (first calls, kernel selection), then the timed run; every process Fabric
    launched runs this, rank 0 saves the result."""
    args = parse_args(call.arguments)
    (task,), (processes,) = args.task, args.processes
    work = workload_from(args, task)
    data = work.data()
    scratch = call.result.parent
    run_orchestrator(dataclasses.replace(work, rounds=1), data, scratch / "warm-up", devices=processes)
    seconds, result = run_orchestrator(work, data, scratch / "run", devices=processes)
    if torch.distributed.get_rank() == 0:
        call.save((seconds, dataclasses.asdict(result)))
    torch.distributed.destroy_process_group()


def run_orchestrator_at(work: Workload, data: FederatedDataModule, processes: int, threads: int) -> Timed:
    """The orchestrator over ``processes`` processes of ``threads`` threads: in this process when there is one,
    else in a worker (Fabric starts the other processes by re-running the command line: the worker's)."""
    if processes > 1:
        options = [*work.options(), "--processes", str(processes)]
        seconds, saved = harness.run_worker(options, threads=threads)
        return seconds, RunResult(**saved)
    harness.pin_threads(threads)
    return in_folder(functools.partial(run_orchestrator, work, data))


def run_plain_at(work: Workload, data: FederatedDataModule, threads: int) -> Timed:
    harness.pin_threads(threads)
    device = torch.device(work.accelerator)
    return in_folder(functools.partial(run_plain, work.spec.recipe, data, work.rounds, SEED, device=device))


def in_folder(run: Callable[[Path], Timed]) -> Timed:
    """A run in a fresh output folder, which is created and removed outside the run's timing."""
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        return run(Path(folder))


# -- timing ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: a task at a process count, with its timed repetitions and same-work check."""

    task: str
    processes: int
    threads: int
    rounds: int
    times: harness.Samples = dataclasses.field(default_factory=harness.Samples)
    weight_gap: float = float("nan")
    metric_gap: float = float("nan")

    @property
    def ratio(self) -> float:
        return harness.ratio(self.times.median("orchestrator"), self.times.median("plain"))

    @property
    def extra_per_round(self) -> float:
        return (self.times.median("orchestrator") - self.times.median("plain")) / self.rounds


def warm_up(work: Workload, data: FederatedDataModule, processes: list[int], threads: int) -> None:
    """Untimed one-round runs at every thread count this process times: imports, first calls (matplotlib,
    torchmetrics, oneDNN kernels) and allocator growth. Worker processes warm themselves up."""
    short = dataclasses.replace(work, rounds=1)
    for count in processes:
        plain = run_plain_at(short, data, count * threads)[1]
        if count == 1:  # a failing same-work check shows here, before minutes of timing
            check_same_work(short.rounds, data, run_orchestrator_at(short, data, 1, threads)[1], plain, plain)


def benchmark(work: Workload, data: FederatedDataModule, processes: list[int], threads: int, repeats: int) -> list[Row]:
    """The task's rows: orchestrator and plain loop timed alternately, so that drifting machine load hits both
    alike; the plain loop with as many threads as the orchestrator's processes have together."""
    warm_up(work, data, processes, threads)
    rows = [Row(work.task, count, threads, work.rounds) for count in processes]
    last: dict[int, tuple[RunResult, RunResult]] = {}
    for _ in range(repeats):
        for row in rows:
            orchestrator_seconds, orchestrator = run_orchestrator_at(work, data, row.processes, threads)
            plain_seconds, plain = run_plain_at(work, data, row.processes * threads)
            row.times["orchestrator"].append(orchestrator_seconds)
            row.times["plain"].append(plain_seconds)
            last[row.processes] = orchestrator, plain
    # The reference of every row: the plain loop at the orchestrator's threads per process (the 1-process row's).
    reference = last[1][1] if 1 in last else run_plain_at(work, data, threads)[1]
    for row in rows:
        row.weight_gap, row.metric_gap = check_same_work(work.rounds, data, *last[row.processes], reference)
    print(
        f"{work.task}: {work.spec.description}; {work.clients} clients x {work.train_per_site} training images "
        f"({work.image_size}px, batch {work.batch_size}); passes per run (both): "
        + ", ".join(f"{count} {name}" for name, count in expected_passes(work.rounds, data).items())
    )
    return rows


TABLE = (
    harness.Column("task", lambda row: row.task, left=True),
    harness.Column("processes x threads / plain", lambda r: f"{r.processes} x {r.threads} / {r.processes * r.threads}"),
    harness.Column("orchestrator (s)", lambda row: f"{row.times.median('orchestrator'):.3f}"),
    harness.Column("plain (s)", lambda row: f"{row.times.median('plain'):.3f}"),
    harness.Column("ratio", lambda row: f"{row.ratio:.3f}"),
    harness.Column("extra/round (ms)", lambda row: f"{row.extra_per_round * 1e3:.0f}"),
    harness.Column(
        "same work", lambda row: f"yes: weights {row.weight_gap:.1e}, metrics {row.metric_gap:.1e}", left=True
    ),
)


def profile_orchestrator(work: Workload, data: FederatedDataModule, top: int) -> str:
    """cProfile of one 1-process orchestrator run: the ``top`` entries by cumulative time in the orchestrator's own
    code, where any time the plain loop does not spend lies."""
    profiler = cProfile.Profile()
    profiler.runcall(in_folder, functools.partial(run_orchestrator, work, data))
    stream = io.StringIO()
    pstats.Stats(profiler, stream=stream).sort_stats(pstats.SortKey.CUMULATIVE).print_stats(ORCHESTRATOR_CODE, top)
    return (
        f"cProfile of one {work.task} orchestrator run (top {top} by cumulative time, orchestrator code only):\n"
        + stream.getvalue().strip()
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", nargs="+", choices=sorted(TASKS), default=sorted(TASKS))
    parser.add_argument(
        "--processes",
        type=int,
        nargs="+",
        default=[1, 2],
        help="orchestrator processes (trainer.devices) of each row; at most --clients",
    )
    # 3 rounds keep the default run (both tasks, 1 and 2 processes) near 4 minutes on 2 idle cores.
    parser.add_argument("--rounds", type=int, default=3, help="communication rounds per timed run")
    parser.add_argument("--clients", type=int, default=4, help="sites of the demo federation")
    parser.add_argument("--image-size", type=int, default=64)
    for name in TASKS["classification"].sizes:  # every task has the same size options, with its own defaults
        demo = ", ".join(f"{task} {spec.sizes[name]}" for task, spec in TASKS.items())
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"default: the demo's ({demo})")
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions of each run, alternating")
    parser.add_argument(
        "--accelerator", choices=("cpu", "cuda"), default="cpu", help="both runs' device (cuda: one GPU per process)"
    )
    # One thread by default: on a small shared machine more threads make the timings noisier, not more telling.
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each orchestrator process")
    parser.add_argument("--profile", action="store_true", help="also cProfile one orchestrator run per task")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    print(
        f"HarmoFL overhead: {', '.join(args.task)}; {args.rounds} rounds, {args.repeats} repetition(s); "
        f"orchestrator processes x threads / plain loop threads"
    )
    print(harness.describe_machine())
    rows: list[Row] = []
    profiles: list[str] = []
    for task in args.task:
        work = workload_from(args, task)
        data = work.data()  # generated (or read from the demo cache) once, never timed
        rows += benchmark(work, data, args.processes, args.threads, args.repeats)
        if args.profile:  # after the task's timings, so that profiling does not slow them
            profiles.append(profile_orchestrator(work, data, top=20))
    print(f"plain loop omits: {OMITS}\n")
    harness.print_table(TABLE, rows)
    print(
        f"(medians; same work: the expected passes in both runs, and the max |difference| of the orchestrator's "
        f"global weights and last-round metrics from the plain loop's at {args.threads} thread(s), its own per "
        f"process)"
    )
    for profile in profiles:
        print(f"\n{profile}")
    if not args.profile and any(row.ratio > TARGET_RATIO for row in rows):
        print(
            f"\nThe orchestrator costs over {TARGET_RATIO - 1:.0%} more: rerun with --profile to see where its "
            "time goes."
        )
    print(f"\nratio orchestrator/plain: target <= {TARGET_RATIO:.2f}")


if __name__ == "__main__":
    harness.run(main, worker=orchestrator_worker)
