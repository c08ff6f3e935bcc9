"""Many clients on one device: memory and time per client as the federation grows.

One ``FederatedTrainer`` process (``devices=1``, CPU) trains and evaluates a small demo federation
(``DemoHistology``, ``test_resnet``, SGD with momentum, weight perturbation α = 0.05, the ``reference`` amplitude
harmonization of ``configs/demo.yaml``) for each client count, each count in a fresh worker process so that its
peak RSS is its own. Every client has little data (16 training, 8 validation, 8 test images of 32 px by default),
so that the fixed per-client cost of the orchestrator is visible next to the compute.

    python benchmarks/scale.py                     # 4, 16 and 64 clients, 3 rounds, 2 repeats: about 70 s, 2 cores
    python benchmarks/scale.py --clients 4,16,64,128 --repeats 1

How to read the output. Per client count it prints:

- peak RSS of the process, and its growth per added client (least-squares line over the counts), next to what
  a client adds by construction: its data, its host record (``trainer.client_records[c]``: local keys, optimizer
  state, module state) and its harmonization target;
- the bytes of one model state and one optimizer state: what stays on the device whatever the client count;
- seconds per client-round inside the training steps and inside the evaluation steps (``training_step``,
  ``validation_step``, ``test_step``);
- orchestration per client-round: the round's wall time minus the time inside those steps and minus the
  checkpoint, divided by the clients (loading and storing client state, loaders, hooks, aggregation, metrics).
  The target: it must not grow with the client count; the script prints the ratio largest/smallest count
  (target <= 1.25, noise included);
- the checkpoint of every round, from the ``on_save_checkpoint`` hook to ``on_round_end``: ``last.ckpt``
  written, ``best.ckpt`` copied when the round improved, metrics.csv and summary.json. It holds every client's
  record, so it grows with the clients; shown per round and per client, to tell O(clients) per round (constant
  per client) from O(clients²);
- how long ``DemoHistology.setup`` took, per client (with an empty ``XDG_CACHE_HOME``: the data are generated,
  and written to the demo cache);
- the time in Python's garbage collections per round (overlapping the other columns): full collections are the
  one per-round cost seen to grow faster than the clients.

Timings exclude the first round (a warm-up: first calls, allocator growth, the harmonization target's sharing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import resource
import statistics
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import _harness as harness
import torch
from torch import Tensor

from callbacks import AmplitudeHarmonization
from harmofl import ClassificationClient, FederatedTrainer
from harmofl.data import SPLITS, DemoHistology

MB = 1024**2
# The per-client-round orchestration time may vary this much between counts before it counts as growing.
GROWTH_TOLERANCE = 1.25
# The options a worker needs to run the same workload as the driver was asked for.
WORKLOAD_OPTIONS = (
    "rounds",
    "train_per_site",
    "val_per_site",
    "test_per_site",
    "image_size",
    "batch_size",
    "backbone",
    "seed",
)


class TimedClient(ClassificationClient):
    """The demo classifier, with the wall time of its training and evaluation steps added to ``self.clock``."""

    clock: harness.Clock

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with self.clock.timing("train steps"):
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.clock.timing("eval steps"):
            super().validation_step(batch, batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.clock.timing("eval steps"):
            super().test_step(batch, batch_idx)


def nbytes(value: Any) -> int:
    """Bytes of every tensor in a nested structure (state dicts, optimizer states, dataclass records)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nbytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(item) for item in value)
    if hasattr(value, "__dataclass_fields__"):  # a client record
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# -- the worker: one client count, in its own process ------------------------------------------------------------


def run_count(call: harness.WorkerCall) -> None:
    args = parse_args(call.arguments)
    data = DemoHistology(
        num_sites=args.count,
        train_per_site=args.train_per_site,
        val_per_site=args.val_per_site,
        test_per_site=args.test_per_site,
        image_size=args.image_size,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    with harness.Timer() as setup:
        data.setup("fit")  # the trainer's own setup call is then a no-op
    data_bytes = sum(nbytes(list(data.dataset(c, s).tensors)) for c in data.client_names for s in SPLITS)

    clock = harness.Clock()
    clock.track_gc()
    torch.manual_seed(args.seed)
    model = TimedClient(
        backbone=args.backbone,
        batch_norm_stats="batch",
        alpha=0.05,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
    )
    model.clock = clock
    harmonization = AmplitudeHarmonization(preset="reference", share_target="first_round")
    timer = harness.RoundTimer(clock)
    rss_before_fit = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="harmofl-scale-") as root:
        trainer = FederatedTrainer(
            rounds=args.rounds,
            accelerator="cpu",
            devices=1,
            enable_progress_bar=False,
            default_root_dir=root,
            callbacks=[harmonization, timer],
            seed=args.seed,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the best-round table, 64 rows long
            trainer.fit(model, data)
        checkpoint_bytes = (trainer.checkpoint_dir / "last.ckpt").stat().st_size
    record = trainer.client_records[data.client_names[0]]
    call.save(
        {
            "clients": args.count,
            "setup_seconds": setup.seconds,
            "data_bytes": data_bytes,
            "rss_before_fit": rss_before_fit,
            "peak_rss": peak_rss_bytes(),
            "record_bytes": nbytes(record),
            "callback_client_bytes": nbytes(harmonization.client_state_dict(data.client_names[0])),
            "model_bytes": nbytes(model.state_dict()),
            "optimizer_bytes": nbytes(record.optimizer_state),  # the optimizer's state, kept per client on the host
            "checkpoint_bytes": checkpoint_bytes,
            "rounds": timer.after_warm_up(),
        }
    )


# -- the driver: one worker per count, then the table -------------------------------------------------------------


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """One client count in a fresh worker, generating its demo data in an empty cache."""
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in WORKLOAD_OPTIONS]
    return harness.run_worker([*options, f"--count={count}"], threads=args.threads, fresh_cache=True)


def per_client_round(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per client-round over the timed rounds, and the checkpoint's seconds per round."""
    clients = run["clients"]

    def mean(bucket: str) -> float:
        return statistics.fmean(r.get(bucket, 0.0) for r in run["rounds"])

    steps = mean("train steps") + mean("eval steps")
    return {
        "round": mean("round"),
        "train": mean("train steps") / clients,
        "eval": mean("eval steps") / clients,
        "orchestration": (mean("round") - steps - mean("checkpoint")) / clients,
        "orchestration with checkpoint": (mean("round") - steps) / clients,
        "checkpoint": mean("checkpoint"),
        "gc": mean("gc"),
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    return slope, mean_y - slope * mean_x


def summarize(runs: dict[int, list[dict[str, Any]]]) -> dict[int, dict[str, float]]:
    """Median over the repeats of every figure of a count."""
    table: dict[int, dict[str, float]] = {}
    for count, repeats in runs.items():
        samples = harness.Samples()
        for run in repeats:
            figures = per_client_round(run) | {
                key: float(run[key]) for key in ("peak_rss", "rss_before_fit", "setup_seconds")
            }
            for key, value in figures.items():
                samples[key].append(value)
        table[count] = samples.medians() | {"clients": count, "checkpoint_bytes": repeats[0]["checkpoint_bytes"]}
    return table


TABLE = (
    harness.Column("clients", lambda r: f"{r['clients']:.0f}"),
    harness.Column("RSS fit0", lambda r: f"{r['rss_before_fit'] / MB:.1f}", "(MB)"),
    harness.Column("peak RSS", lambda r: f"{r['peak_rss'] / MB:.1f}", "(MB)"),
    harness.Column("setup/cl", lambda r: f"{r['setup_seconds'] / r['clients'] * 1e3:.2f}", "(ms)"),
    harness.Column("round", lambda r: f"{r['round']:.3f}", "(s)"),
    harness.Column("train/cr", lambda r: f"{r['train'] * 1e3:.2f}", "(ms)"),
    harness.Column("eval/cr", lambda r: f"{r['eval'] * 1e3:.2f}", "(ms)"),
    harness.Column("orch/cr", lambda r: f"{r['orchestration'] * 1e3:.2f}", "(ms)"),
    harness.Column("ckpt/rnd", lambda r: f"{r['checkpoint'] * 1e3:.1f}", "(ms)"),
    harness.Column("ckpt/cl", lambda r: f"{r['checkpoint'] / r['clients'] * 1e3:.2f}", "(ms)"),
    harness.Column("last.ckpt", lambda r: f"{r['checkpoint_bytes'] / MB:.1f}", "(MB)"),
    harness.Column("gc/rnd", lambda r: f"{r['gc'] * 1e3:.1f}", "(ms)"),
)


def report(args: argparse.Namespace, runs: dict[int, list[dict[str, Any]]], load_before: float) -> None:
    table = summarize(runs)
    counts = sorted(table)
    sample = runs[counts[0]][0]
    print(
        f"HarmoFL many clients on one device: {args.backbone}, {args.image_size}px, per client "
        f"{args.train_per_site} train / {args.val_per_site} val / {args.test_per_site} test images, batch "
        f"{args.batch_size}, {args.rounds} rounds (timings: rounds 2-{args.rounds}), {args.threads} thread(s), "
        f"{args.repeats} repeat(s)"
    )
    print(f"{harness.describe_machine()} (before: {load_before:.1f})\n")
    harness.print_table(TABLE, [table[count] for count in counts])
    print(
        "RSS fit0: peak RSS before fit, with the data made and the model built; cr: per client-round; orch: round "
        "wall\nminus steps minus checkpoint; ckpt: on_save_checkpoint to on_round_end (last.ckpt written, best.ckpt "
        "copied in\nimproving rounds, metrics.csv, summary.json); gc: garbage collection, wherever it fell (also "
        "counted in the\nother columns)"
    )

    per_client = sample["data_bytes"] / counts[0] + sample["record_bytes"] + sample["callback_client_bytes"]
    print()
    if len(counts) > 1:
        for key, label in (("peak_rss", "peak RSS"), ("rss_before_fit", "RSS before fit")):
            slope, intercept = linear_fit(counts, [table[c][key] for c in counts])
            print(
                f"{label} growth: {slope / MB:.3f} MB per added client (fit: {intercept / MB:.0f} MB + "
                f"{slope / MB:.3f} MB x clients)"
            )
    print(
        f"a client adds by construction {per_client / MB:.3f} MB on the host:\n  data "
        f"{sample['data_bytes'] / counts[0] / MB:.3f} MB, record {sample['record_bytes'] / MB:.3f} MB "
        f"(trainer.client_records[c]), harmonization target {sample['callback_client_bytes'] / 1024:.1f} KiB"
    )
    print(
        f"on the device whatever the count: model state {sample['model_bytes'] / MB:.3f} MB + optimizer state "
        f"{sample['optimizer_bytes'] / MB:.3f} MB"
    )

    smallest, largest = table[counts[0]], table[counts[-1]]
    growth = f"{counts[-1]}/{counts[0]} clients"
    for key in ("orchestration", "orchestration with checkpoint"):
        growth_ratio = harness.ratio(largest[key], smallest[key])
        # Against the training steps' own ratio: what is left once the machine's changing load is divided out.
        relative = harness.ratio(growth_ratio, harness.ratio(largest["train"], smallest["train"]))
        verdict = "met" if growth_ratio <= GROWTH_TOLERANCE else "NOT met"
        print(
            f"{key} per client-round, {growth} = {growth_ratio:.2f} (target <= {GROWTH_TOLERANCE}: {verdict}); "
            f"relative to the training steps' ratio: {relative:.2f}"
        )
    per_client_checkpoint = harness.ratio(largest["checkpoint"] / counts[-1], smallest["checkpoint"] / counts[0])
    print(
        f"checkpoint per client per round, {growth} = {per_client_checkpoint:.2f} (about 1: O(clients) per "
        f"round; growing: O(clients²))"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="4,16,64", help="comma-separated client counts")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per run; the first is not timed")
    parser.add_argument("--train-per-site", type=int, default=16)
    parser.add_argument("--val-per-site", type=int, default=8)
    parser.add_argument("--test-per-site", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="test_resnet", help="a harmofl or timm classifier name")
    # One thread: on a small shared machine more threads make the timings noisier, not more telling.
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per count (interleaved); medians reported")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # a worker's client count
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    counts = sorted(int(c) for c in args.clients.split(","))
    load_before = harness.load_average()
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for _ in range(args.repeats):
        for count in counts:  # interleaved, so that drifting machine load hits every count alike
            runs[count].append(measure(count, args))
    report(args, runs, load_before)


if __name__ == "__main__":
    harness.run(main, worker=run_count)
