"""Flower's fixed cost per round: the demo on the deployment runtime (a SuperLink and two SuperNodes on 127.0.0.1,
:class:`harmofl.flower.loopback.LoopbackDeployment`), one exchange per round (``combined-exchange=true``, a
round's evaluation carrying the next round's training) next to two (``false``: a train then an evaluate exchange).

Each message starts a fresh ClientApp process at the site, which imports PyTorch and Lightning, and the runtime
polls with fixed sleeps (3 s at the SuperNode and at the ServerApp's grid): with the demo's tiny model that is
nearly all of a round. The script runs both modes in turn (alternating, ``--repeats`` times), on the same
deployment's settings, and prints per mode:

- seconds per round: between the checkpoint of round 1 and that of the last round, divided by the rounds between
  (a round's checkpoint is written once its evaluation is in: after the exchange that carries it);
- the run's wall time from ``flwr run`` to its end (start-up, every round, the last evaluation);
- the messages' exchanges (``rounds + 1`` combined, ``2 * rounds`` separate), and the ratio combined/separate.

    python benchmarks/flower_rounds.py                 # 4 rounds, each mode once: about 6-10 min on 2 busy cores
    python benchmarks/flower_rounds.py --rounds 3 --repeats 2

It also times ``import harmofl.flower.app`` (what a ClientApp process imports before it reads the message: the
handlers import PyTorch and Lightning only when they need them) against importing the trainer.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _harness as harness

from harmofl.checkpoint import load_checkpoint
from harmofl.flower.loopback import LoopbackDeployment, flower_environment

# The demo at the Flower tests' size: 2 sites, 32x32 patches (tests/helpers.py's FLOWER_TINY).
DEMO = (
    "data.init_args.num_sites=2 data.init_args.train_per_site=32 data.init_args.val_per_site=16 "
    "data.init_args.test_per_site=16 data.init_args.image_size=32 data.init_args.batch_size=16"
)
SITES = ("site_0", "site_1")


def checkpoint_round(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["round"])
    except (FileNotFoundError, ValueError, RuntimeError, EOFError):
        return 0


def run_mode(folder: Path, rounds: int, combined: bool) -> dict[str, float]:
    """One loopback run of ``rounds`` rounds: seconds per round and the run's wall time."""
    env = {**flower_environment(folder / "home"), "OMP_NUM_THREADS": "1"}
    output = folder / "server"
    node_config = dict.fromkeys(SITES, f"state-dir='{folder / 'site-state'}'")
    run_config = (
        f"config='configs/demo.yaml' overrides='trainer.rounds={rounds} {DEMO}' num-sites=2 output-dir='{output}' "
        f"reply-timeout=600 combined-exchange={'true' if combined else 'false'}"
    )
    last = output / "checkpoints" / "last.ckpt"
    written: dict[int, float] = {}
    with LoopbackDeployment(folder / "deployment", SITES, env, node_config) as deployment:
        start = time.monotonic()
        run_id = deployment.submit(harness.REPO_ROOT, run_config)
        while len(written) < rounds:
            round_number = checkpoint_round(last)
            if round_number and round_number not in written:
                written[round_number] = time.monotonic() - start
            if time.monotonic() - start > 1800:
                raise RuntimeError(f"no round-{rounds} checkpoint after 30 min:\n{deployment.logs()}")
            time.sleep(0.1)
        status = deployment.wait(run_id, timeout=600)
        wall = time.monotonic() - start
    if status != "finished:completed":
        raise RuntimeError(f"the run ended {status!r}")
    return {"per_round": (written[rounds] - written[1]) / (rounds - 1), "wall": wall}


def import_seconds(module: str) -> float:
    """Wall seconds of a fresh interpreter importing ``module`` (minus an empty interpreter's start)."""

    def timed(code: str) -> float:
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=harness.REPO_ROOT)
        return time.monotonic() - start

    return timed(f"import {module}") - timed("pass")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 2)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per mode, alternating")
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: seconds per round are measured between round 1 and the last")
    print(harness.describe_machine())
    measured: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    with tempfile.TemporaryDirectory(prefix="flower_rounds_") as folder:
        for repeat in range(args.repeats):
            for combined in (False, True):
                result = run_mode(Path(folder) / f"{repeat}-{combined}", args.rounds, combined)
                measured[combined].append(result)
                print(f"  combined-exchange={str(combined).lower()}: {result}", flush=True)

    def median(combined: bool, key: str) -> float:
        return statistics.median(run[key] for run in measured[combined])

    rows = [
        (name, combined, exchanges)
        for name, combined, exchanges in (
            ("two exchanges per round (combined-exchange=false)", False, 2 * args.rounds),
            ("one exchange per round (combined-exchange=true)", True, args.rounds + 1),
        )
    ]
    print(f"\nThe demo on the loopback deployment runtime, 2 sites, {args.rounds} rounds, median of {args.repeats}:")
    harness.print_table(
        [
            harness.Column("mode", lambda row: row[0], left=True),
            harness.Column("exchanges", lambda row: str(row[2])),
            harness.Column("per round", lambda row: f"{median(row[1], 'per_round'):.1f}", "s"),
            harness.Column("run", lambda row: f"{median(row[1], 'wall'):.1f}", "s"),
            harness.Column(
                "per round / two exchanges",
                lambda row: f"{harness.ratio(median(row[1], 'per_round'), median(False, 'per_round')):.2f}",
            ),
        ],
        rows,
    )
    app_import, trainer_import = import_seconds("harmofl.flower.app"), import_seconds("harmofl.trainer")
    print(
        f"\nimport harmofl.flower.app: {app_import:.2f} s; import harmofl.trainer (PyTorch, Lightning): "
        f"{trainer_import:.2f} s (a ClientApp process pays the second only in a handler that needs it)"
    )


if __name__ == "__main__":
    main()
