"""``cli.py compare --jobs``: a grid's wall time with its fits side by side vs one after another, on the same cores.

One grid (strategies × seeds on ``configs/demo.yaml`` at small settings) run as ``cli.py compare`` once per layout
and repeat (the order reversed every other repeat), each into a fresh output folder: ``--jobs C`` with 1 thread per
fit, ``--jobs 1`` with C threads (C: ``--cores``, 2 by default) and, as a control, ``--jobs 1`` with 1 thread. The
demo data are generated once, before the timings, into a cache of the benchmark's own. Fits run on the CPU
(``CUDA_VISIBLE_DEVICES=''``). The table shows each layout's median wall time and its ratio to ``--jobs 1`` with C
threads, measured side by side in one run, and whether ``--jobs C`` and ``--jobs 1`` at 1 thread each wrote the same
``comparison.csv`` (they must: the tables are built from the run folders).

    python benchmarks/compare_jobs.py            # 2 strategies × 2 seeds, 3 rounds, 3 layouts
    python benchmarks/compare_jobs.py --quick    # 1 round at the tests' sizes: to check that it works
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _harness as harness  # before torch: the environment it reads

DATA = {
    "full": "--data.num_sites 4 --data.train_per_site 96 --data.val_per_site 32 --data.test_per_site 32 "
    "--data.image_size 48 --data.batch_size 16",
    "quick": "--data.num_sites 2 --data.train_per_site 16 --data.val_per_site 8 --data.test_per_site 8 "
    "--data.image_size 32 --data.batch_size 8",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategies", default="fedavg,harmofl")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cores", type=int, default=2, help="the fits side by side, and one fit's threads alone")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="1 round at the tests' sizes")
    args = parser.parse_args()
    rounds = 1 if args.quick else args.rounds
    overrides = f"--trainer.rounds {rounds} {DATA['quick' if args.quick else 'full']}"
    print(harness.describe_machine())
    print("The machine may be shared: the load average above is other work's, and it skews both timings alike.")
    with tempfile.TemporaryDirectory(prefix="harmofl-compare-jobs-") as folder:
        scratch = Path(folder)
        environment = {**os.environ, "XDG_CACHE_HOME": str(scratch / "cache"), "CUDA_VISIBLE_DEVICES": ""}
        _fill_data_cache(overrides, scratch / "cache")
        # The third layout is a control: one thread alone shows what the second thread gives a fit on this machine
        # (nothing, or a loss, where other work occupies the cores).
        layouts = {"side by side": (args.cores, 1), "one at a time": (1, args.cores), "one at a time, 1 thread": (1, 1)}
        walls: dict[str, list[float]] = {name: [] for name in layouts}
        for repeat in range(args.repeats):
            order = list(layouts) if repeat % 2 == 0 else list(reversed(layouts))
            for name in order:
                jobs, threads = layouts[name]
                output = scratch / f"jobs_{jobs}_threads_{threads}_repeat_{repeat}"
                command = [
                    *(sys.executable, str(harness.REPO_ROOT / "cli.py"), "compare", "--config", "configs/demo.yaml"),
                    *("--strategies", args.strategies, "--seeds", args.seeds, "--output_dir", str(output)),
                    *("--overrides", overrides, "--jobs", str(jobs), "--threads_per_job", str(threads)),
                ]
                started = time.perf_counter()
                code = harness.run_process(command, cwd=harness.REPO_ROOT, env=environment, log=scratch / "log.txt")
                if code != 0:
                    raise RuntimeError(
                        f"compare --jobs {jobs} failed (exit {code}):\n{harness.tail(scratch / 'log.txt')}"
                    )
                walls[name].append(time.perf_counter() - started)
        equal = all(
            (scratch / f"jobs_{args.cores}_threads_1_repeat_{r}" / "comparison.csv").read_bytes()
            == (scratch / f"jobs_1_threads_1_repeat_{r}" / "comparison.csv").read_bytes()
            for r in range(args.repeats)
        )
    runs = len(args.strategies.split(",")) * len(args.seeds.split(","))
    alone = statistics.median(walls["one at a time"])
    print(f"\n{runs} fits ({args.strategies} × seeds {args.seeds}), overrides: {overrides}; {args.repeats} repeat(s)")
    harness.print_table(
        [
            harness.Column("layout", lambda name: name, left=True),
            harness.Column("jobs", lambda name: str(layouts[name][0])),
            harness.Column("threads/job", lambda name: str(layouts[name][1])),
            harness.Column("wall", lambda name: f"{statistics.median(walls[name]):.1f}", "(s)"),
            harness.Column(
                "ratio", lambda name: f"{harness.ratio(statistics.median(walls[name]), alone):.2f}", "(/ 1 job)"
            ),
        ],
        list(layouts),
    )
    print(f"comparison.csv of --jobs {args.cores} and --jobs 1 at 1 thread each equal: {'yes' if equal else 'NO'}")
    print(f"load average after: {harness.load_average():.1f}")


def _fill_data_cache(overrides: str, cache: Path) -> None:
    """Generate the demo data into ``cache`` before any timing, as the first fit would."""
    os.environ["XDG_CACHE_HOME"] = str(cache)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)  # "Seed set to 0"
    from harmofl.cli import build

    build(["--config", str(harness.REPO_ROOT / "configs" / "demo.yaml"), *overrides.split()]).datamodule.prepare_data()


if __name__ == "__main__":
    main()
