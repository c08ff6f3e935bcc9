"""Soak test of run integrity: many short rounds under random client faults and SIGKILLs, against a clean run.

A worker (this script run again by the harness) trains a small federation in one process: 4 demo sites, 3 sampled per
round, 2 local steps each, paper-preset harmonization re-shared every round, SCAFFOLD control variates, FedAvgM
server momentum, weight perturbation, ``client_retries=1``. Every piece of state a resume must restore is
therefore live. Faults:

- **client faults**: a callback raises at a random batch of a random share of (round, client) pairs, on the
  first attempt only (a transient fault: a flaky disk, a preempted accelerator); the orchestrator retries the
  client from the same start;
- **kills**: the driver SIGKILLs the worker, alternately at a random moment of a round and as soon as a
  checkpoint write has begun (a temporary file beside ``last.ckpt`` exists), and restarts it from
  ``last.ckpt`` until it finishes.

Then the final checkpoint (global weights, every client's record, callback and server state), ``metrics.csv``
and ``summary.json`` are compared with those of a worker run without faults or kills. Both runs use one thread,
so "equal" means bitwise.

    python benchmarks/soak.py                     # 40 rounds, 6 kills, 20 % client faults: about 2 min
    python benchmarks/soak.py --rounds 100 --kills 20 --fault_rate 0.3
"""

from __future__ import annotations

import argparse
import functools
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _harness as harness
import torch
from _compare import IDENTICAL, compare_outputs

from callbacks import AmplitudeHarmonization, Scaffold
from harmofl import ClassificationClient, FederatedTrainer
from harmofl.data import DemoHistology
from harmofl.federation.callback import FederatedCallback
from harmofl.server_optimizers import FedAvgM

FAULT_PREFIX = "FAULT"
# The end of the warning harmofl's failure policy gives when it retries a client: each one counts a survived fault.
RETRY_WARNING = "RuntimeError: injected transient fault. Retrying."
THREADS = 1  # bitwise comparisons need the same reduction order in both runs


class TransientFaults(FederatedCallback):
    """Fails the first attempt of a seeded random share of (round, client) pairs, at a random batch; prints a line
    per fault."""

    def __init__(self, fault_rate: float, seed: int) -> None:
        self.fault_rate = fault_rate
        self.seed = seed
        self.attempts: dict[tuple[int, str], int] = {}
        self.key = (0, "")

    def on_round_start(self, trainer: Any, pl_module: Any, round_idx: int) -> None:
        self.key = (round_idx, "")

    def on_train_client_start(self, trainer: Any, pl_module: Any, client: str, num_batches: int) -> None:
        self.key = (self.key[0], client)
        self.attempts[self.key] = self.attempts.get(self.key, 0) + 1

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        round_idx, client = self.key
        draw = random.Random(f"soak/{self.seed}/{round_idx}/{client}")
        if draw.random() < self.fault_rate and self.attempts[self.key] == 1 and batch_idx == draw.randrange(2):
            print(f"{FAULT_PREFIX} round {round_idx + 1} client {client} batch {batch_idx}", flush=True)
            raise RuntimeError("injected transient fault")


def run_worker(call: harness.WorkerCall) -> None:
    """One (possibly resumed) training run of the federation."""
    args = parse_args(call.arguments)
    trainer = FederatedTrainer(
        rounds=args.rounds,
        local_steps=2,
        clients_per_round=3,
        client_retries=1,
        server_optimizer=FedAvgM(momentum=0.9),
        callbacks=[
            AmplitudeHarmonization(preset="paper", share_target="every_round"),
            Scaffold(),
            TransientFaults(args.fault_rate, args.seed),
        ],
        accelerator="cpu",
        enable_progress_bar=False,
        default_root_dir=str(args.root),
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = ClassificationClient(
        backbone="test_resnet",
        batch_norm_stats="batch",
        alpha=0.05,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9),
    )
    data = DemoHistology(
        num_sites=4, train_per_site=16, val_per_site=8, test_per_site=8, image_size=32, batch_size=8, seed=args.seed
    )
    trainer.fit(model, data, ckpt_path="last" if args.resume else None)


def _worker_arguments(root: Path, args: argparse.Namespace, fault_rate: float, resume: bool) -> list[str]:
    arguments = [
        "--root",
        str(root),
        "--rounds",
        str(args.rounds),
        "--fault_rate",
        str(fault_rate),
        "--seed",
        str(args.seed),
    ]
    return arguments + (["--resume"] if resume else [])


def _modified(path: Path) -> int:
    """When ``path`` was last replaced (0: not yet written); cheap enough to poll while the worker trains."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _run_to_completion(
    root: Path, args: argparse.Namespace, fault_rate: float, kills: int
) -> tuple[Path, dict[str, int]]:
    """Run a worker until it finishes, SIGKILLing it ``kills`` times and restarting it from ``last.ckpt``; returns
    its log and the kill counts."""
    rng = random.Random(f"soak-kills/{args.seed}")
    last = root / "checkpoints" / "last.ckpt"
    log = root.parent / f"{root.name}.log"
    counts = {"kills": 0, "kills_while_saving": 0}
    while True:
        # The worker leaves no result: its checkpoint and outputs in ``root`` are what is compared.
        command, environment = harness.worker_command(
            _worker_arguments(root, args, fault_rate, resume=last.is_file()), root / "result.pt", threads=THREADS
        )
        with harness.process_group(command, cwd=harness.REPO_ROOT, env=environment, log=log) as worker:
            if counts["kills"] < kills and _kill_in_next_round(worker, root, rng, counts["kills"] % 2 == 1):
                counts["kills"] += 1
                counts["kills_while_saving"] += int(any(root.glob("checkpoints/.*.tmp.*")))
                continue
            if worker.wait() != 0:
                raise RuntimeError(f"The worker failed (exit {worker.returncode}); see {log}.")
        return log, counts


def _kill_in_next_round(worker: subprocess.Popen[bytes], root: Path, rng: random.Random, while_saving: bool) -> bool:
    """SIGKILL the worker once its next checkpoint is written: ``while_saving``, as soon as the write after it has
    begun, else at a random moment of the next round; False if it finished first."""
    last = root / "checkpoints" / "last.ckpt"
    written = _modified(last)
    while worker.poll() is None and _modified(last) == written:
        time.sleep(0.01)
    if while_saving:  # every other kill waits for the next checkpoint write to begin and lands inside it
        while worker.poll() is None and not any(root.glob("checkpoints/.*.tmp.*")):
            time.sleep(0.0005)
    else:
        time.sleep(rng.uniform(0.0, 1.0))  # anywhere in the next round
    if worker.poll() is not None:
        return False
    harness.kill_group(worker)
    return True


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--fault_rate", type=float, default=0.2, help="share of (round, client) pairs that fail once")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)  # a worker's run folder
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # a worker continues from last.ckpt
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    with tempfile.TemporaryDirectory(prefix="harmofl_soak_") as folder:
        clean, faulty = Path(folder) / "clean", Path(folder) / "faulty"
        started = time.perf_counter()
        _run_to_completion(clean, args, fault_rate=0.0, kills=0)
        clean_seconds = time.perf_counter() - started
        started = time.perf_counter()
        log, counts = _run_to_completion(faulty, args, fault_rate=args.fault_rate, kills=args.kills)
        faulty_seconds = time.perf_counter() - started
        lines = log.read_text().splitlines()
        # best.ckpt too: a kill between last.ckpt's write and its copy to best.ckpt is mended on resume.
        result = compare_outputs(clean, faulty)
    injected = sum(line.startswith(FAULT_PREFIX) for line in lines)
    retried = sum(line.rstrip().endswith(RETRY_WARNING) for line in lines)
    print(f"soak: {args.rounds} rounds, 4 clients (3 per round), seed {args.seed}")
    print(f"  fault-free run: {clean_seconds:.1f} s; faulty run: {faulty_seconds:.1f} s")
    print(f"  client faults injected: {injected}, retried by the trainer: {retried}")
    print(
        f"  SIGKILLs: {counts['kills']}, each followed by a restart from last.ckpt "
        f"({counts['kills_while_saving']} while a checkpoint was being written)"
    )
    detail = "metrics.csv, summary.json, last.ckpt, best.ckpt bitwise" if result == IDENTICAL else f"differs: {result}"
    print(f"  final state equals the fault-free run: {result == IDENTICAL} ({detail})")
    if result != IDENTICAL:
        sys.exit(1)


if __name__ == "__main__":
    harness.run(main, worker=run_worker)
