"""A thousand clients on one device: what a round costs per participant, writes, and holds, as the federation grows.

One ``FederatedTrainer`` process (``devices=1``, CPU by default) runs a small demo federation (``DemoHistology``,
``cache=False``) under partial participation (``--clients-per-round 0.1``: 1, 10 and 100 participants per round at
10, 100 and 1,000 clients) for each client count, each count in a fresh worker process so that its peak RSS is its
own. The model is tiny (``scale_cnn``: two 3x3 convolutions of ``--width`` channels with batch norm, registered here
through ``harmofl.models.registry.register_classifier``), SGD with momentum, weight perturbation alpha = 0.05, the
``reference`` amplitude harmonization; each participant runs ``--local-steps 1`` step; every client evaluates every
round (as the trainer does). Clients have little data (8 training, 4 validation, 4 test images of 16 px), so that
the orchestrator's own per-client cost is what the figures show.

    python benchmarks/scale.py                          # 10, 100 and 1,000 clients, 5 rounds: about 3 min
    python benchmarks/scale.py --clients 64 --clients-per-round 1.0 --backbone test_resnet --image-size 32 \\
        --train-per-site 16 --val-per-site 8 --test-per-site 8 --batch-size 8 --repeats 1   # issue 6's 64 clients

Per client count it prints, as medians over the rounds after the first (round 1 writes every client's first record and
generates the data: a warm-up):

- participants per round; seconds per round;
- training-step time per participant-round and evaluation-step time per client-round;
- **orchestration per participant-round**: the round's time minus the time inside the training and evaluation
  steps, divided by the participants, without and with the checkpoint (the part after the evaluation: the
  round's record, the changed clients' record files, the manifest ``last.ckpt``, ``best.ckpt`` in improving
  rounds, ``metrics.csv``, ``summary.json``); in CPU time (``time.process_time``: what another job on a shared
  machine does not inflate) and in wall time. Target: 1,000 clients over 10 within 1.1x;
- **bytes written per round** (``wchar`` of ``/proc/self/io``: everything the process wrote), of which the new
  client record files, and per participant: proportional to the participants, not the clients;
- the manifest's size; the time in Python's garbage collections per round;
- **host memory**: peak RSS, and a least-squares line over the counts next to what a client adds by construction
  (its data, its host record, its harmonization target): constant + clients x per-client bytes;
- **device memory**: the peak allocated on a CUDA device (``--accelerator gpu``): one model and one optimizer
  state whatever the count; n/a on the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import _harness as harness
import torch
from torch import Tensor, nn

from callbacks import AmplitudeHarmonization
from harmofl import ClassificationClient, FederatedTrainer
from harmofl.data import DemoHistology
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.executor import InProcessExecutor, Results
from harmofl.models.registry import register_classifier

MB = 1024**2
# 1,000 clients over 10: the per-participant-round orchestration may differ this much (noise included).
GROWTH_TOLERANCE = 1.1
# The options a worker needs to run the same workload as the driver was asked for.
WORKLOAD_OPTIONS = (
    "rounds",
    "clients_per_round",
    "local_steps",
    "train_per_site",
    "val_per_site",
    "test_per_site",
    "image_size",
    "batch_size",
    "backbone",
    "width",
    "accelerator",
    "seed",
)


@register_classifier("scale_cnn")
def scale_cnn(num_classes: int, in_chans: int = 3, width: int = 32) -> nn.Module:
    """A tiny classifier (about 10k parameters at width 32): what a client keeps stays small next to its data."""
    return nn.Sequential(
        nn.Conv2d(in_chans, width, 3, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(width, num_classes),
    )


class TimedClient(ClassificationClient):
    """The demo classifier, with the wall and CPU time of its training and evaluation steps added to ``self.clock``
    (buckets ``train steps``, ``eval steps`` and the same with `` cpu``)."""

    clock: harness.Clock

    @contextlib.contextmanager
    def timing(self, bucket: str) -> Iterator[None]:
        cpu = time.process_time()
        with self.clock.timing(bucket):
            yield
        self.clock.seconds[f"{bucket} cpu"] += time.process_time() - cpu

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with self.timing("train steps"):
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.timing("eval steps"):
            super().validation_step(batch, batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.timing("eval steps"):
            super().test_step(batch, batch_idx)


class EvaluationEnd(InProcessExecutor):
    """The in-process executor, noting when each round's evaluation ended: what follows is the round's record, its
    checkpoint and its output files."""

    def __init__(self) -> None:
        self.ended: list[tuple[float, float]] = []  # wall, CPU

    def evaluate(self, splits: tuple[Any, ...]) -> Results:
        results = super().evaluate(splits)
        self.ended.append((time.perf_counter(), time.process_time()))
        return results


class RoundWrites(FederatedCallback):
    """Per round: the bytes the process wrote, the new client record files' bytes, the manifest's size, the
    participants, and when the round ended."""

    def __init__(self) -> None:
        self.rounds: list[dict[str, float]] = []
        self._written = 0
        self._records: set[str] = set()

    def on_round_start(self, trainer: Any, pl_module: Any, round_idx: int) -> None:
        self._written = written_bytes()

    def on_round_end(self, trainer: Any, pl_module: Any, round_idx: int, results: Any) -> None:
        folder = trainer.checkpoint_dir / "records"
        sizes = {path.name: path.stat().st_size for path in folder.iterdir()} if folder.is_dir() else {}
        self.rounds.append(
            {
                "ended": time.perf_counter(),
                "ended cpu": time.process_time(),
                "participants": len(trainer.federation.participants(round_idx)),
                "written": written_bytes() - self._written,
                "records": sum(size for name, size in sizes.items() if name not in self._records),
                "manifest": (trainer.checkpoint_dir / "last.ckpt").stat().st_size,
            }
        )
        self._records = set(sizes)


def written_bytes() -> int:
    """Bytes this process has written so far (``wchar`` of ``/proc/self/io``: files, pipes, every write call)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no wchar line: bytes written are measured on Linux only.")


def nbytes(value: Any) -> int:
    """Bytes of every tensor in a nested structure (state dicts, optimizer states, dataclass records)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, Mapping):
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
        cache=False,
    )
    clock = harness.Clock()
    clock.track_gc()
    torch.manual_seed(args.seed)
    model = TimedClient(
        backbone=args.backbone,
        backbone_kwargs={"width": args.width} if args.backbone == "scale_cnn" else {},
        batch_norm_stats="batch",
        alpha=0.05,
        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4),
    )
    model.clock = clock
    harmonization = AmplitudeHarmonization(preset="reference", share_target="first_round")
    timer, writes, executor = harness.RoundTimer(clock), RoundWrites(), EvaluationEnd()
    rss_before_fit = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="harmofl-scale-") as root:
        trainer = FederatedTrainer(
            rounds=args.rounds,
            clients_per_round=args.clients_per_round,
            local_steps=args.local_steps,
            accelerator=args.accelerator,
            devices=1,
            enable_progress_bar=False,
            default_root_dir=root,
            callbacks=[harmonization, timer, writes],
            seed=args.seed,
        )
        with contextlib.redirect_stdout(io.StringIO()):  # the best-round table, a row per client
            trainer.fit(model, data, executor=executor)
    trained = next(c for c, record in trainer.client_records.items() if record.optimizer_state is not None)
    first = data.client_names[0]
    device = trainer.fabric.device
    rounds = [
        {
            **timed,
            **written,
            "after evaluation": written["ended"] - wall,
            "after evaluation cpu": written["ended cpu"] - cpu,
        }
        for timed, written, (wall, cpu) in zip(timer.rounds, writes.rounds, executor.ended)
    ]
    call.save(
        {
            "clients": args.count,
            "data_bytes": sum(nbytes(list(data.dataset(first, split).tensors)) for split in ("train", "val", "test")),
            "rss_before_fit": rss_before_fit,
            "peak_rss": peak_rss_bytes(),
            "record_bytes": nbytes(trainer.client_records[trained]),
            "callback_client_bytes": nbytes(harmonization.client_state_dict(trained)),
            "model_bytes": nbytes(model.state_dict()),
            "device_peak": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else -1,
            "rounds": rounds[1:] or rounds,  # round 1 is the warm-up
        }
    )


# -- the driver: one worker per count, then the table -------------------------------------------------------------


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """One client count in a fresh worker."""
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in WORKLOAD_OPTIONS]
    return harness.run_worker([*options, f"--count={count}"], threads=args.threads)


def per_round(run: dict[str, Any]) -> dict[str, float]:
    """Medians over the timed rounds (robust to a round that another job on the machine slowed down), per
    participant-round (``/pr``) or client-round (``/cr``) where it says."""
    clients, figures = run["clients"], harness.Samples()
    for row in run["rounds"]:
        participants = row["participants"]
        orchestration = row["round"] - row.get("train steps", 0.0) - row.get("eval steps", 0.0)
        orchestration_cpu = row["cpu"] - row.get("train steps cpu", 0.0) - row.get("eval steps cpu", 0.0)
        for key, value in {
            "participants": participants,
            "round": row["round"],
            "train/pr": row.get("train steps", 0.0) / participants,
            "eval/cr": row.get("eval steps", 0.0) / clients,
            "orchestration/pr": (orchestration - row["after evaluation"]) / participants,
            "orchestration with checkpoint/pr": orchestration / participants,
            "orchestration cpu/pr": (orchestration_cpu - row["after evaluation cpu"]) / participants,
            "orchestration cpu with checkpoint/pr": orchestration_cpu / participants,
            "checkpoint": row["after evaluation"],
            "written": row["written"],
            "records": row["records"],
            "written/pr": row["written"] / participants,
            "manifest": row["manifest"],
            "gc": row.get("gc", 0.0),
        }.items():
            figures[key].append(value)
    return figures.medians()


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
            for key, value in (per_round(run) | {k: float(run[k]) for k in ("peak_rss", "device_peak")}).items():
                samples[key].append(value)
        table[count] = samples.medians() | {"clients": count}
    return table


def _device(row: dict[str, float]) -> str:
    return "n/a" if row["device_peak"] < 0 else f"{row['device_peak'] / MB:.1f}"


TABLE = (
    harness.Column("clients", lambda r: f"{r['clients']:.0f}"),
    harness.Column("part/rnd", lambda r: f"{r['participants']:.0f}"),
    harness.Column("peak RSS", lambda r: f"{r['peak_rss'] / MB:.1f}", "(MB)"),
    harness.Column("device", lambda r: _device(r), "(MB)"),
    harness.Column("round", lambda r: f"{r['round']:.3f}", "(s)"),
    harness.Column("train/pr", lambda r: f"{r['train/pr'] * 1e3:.2f}", "(ms)"),
    harness.Column("eval/cr", lambda r: f"{r['eval/cr'] * 1e3:.2f}", "(ms)"),
    harness.Column("orch/pr", lambda r: f"{r['orchestration/pr'] * 1e3:.2f}", "(ms)"),
    harness.Column("+ckpt/pr", lambda r: f"{r['orchestration with checkpoint/pr'] * 1e3:.2f}", "(ms)"),
    harness.Column("cpu orch/pr", lambda r: f"{r['orchestration cpu/pr'] * 1e3:.2f}", "(ms)"),
    harness.Column("+ckpt/pr", lambda r: f"{r['orchestration cpu with checkpoint/pr'] * 1e3:.2f}", "(ms)"),
    harness.Column("ckpt/rnd", lambda r: f"{r['checkpoint'] * 1e3:.1f}", "(ms)"),
    harness.Column("written/rnd", lambda r: f"{r['written'] / MB:.2f}", "(MB)"),
    harness.Column("records/rnd", lambda r: f"{r['records'] / MB:.2f}", "(MB)"),
    harness.Column("written/pr", lambda r: f"{r['written/pr'] / 1024:.1f}", "(KiB)"),
    harness.Column("manifest", lambda r: f"{r['manifest'] / 1024:.1f}", "(KiB)"),
    harness.Column("gc/rnd", lambda r: f"{r['gc'] * 1e3:.1f}", "(ms)"),
)


def report(args: argparse.Namespace, runs: dict[int, list[dict[str, Any]]], load_before: float) -> None:
    table = summarize(runs)
    counts = sorted(table)
    sample = runs[counts[0]][0]
    print(
        f"HarmoFL many clients on one device: {args.backbone}, {args.image_size}px, per client {args.train_per_site} "
        f"train / {args.val_per_site} val / {args.test_per_site} test images, batch {args.batch_size}, "
        f"clients_per_round {args.clients_per_round}, local_steps {args.local_steps}, {args.rounds} rounds "
        f"(timings: rounds 2-{args.rounds}), {args.threads} thread(s), {args.repeats} repeat(s)"
    )
    print(f"{harness.describe_machine()} (before: {load_before:.1f})\n")
    harness.print_table(TABLE, [table[count] for count in counts])
    print(
        "pr: per participant-round; cr: per client-round; orch: round wall minus steps minus the part after the "
        "evaluation;\ncpu orch: the same in CPU time; +ckpt: with that part (the round's record, changed clients' "
        "record files, last.ckpt,\nbest.ckpt, metrics.csv, summary.json); written: every byte the process wrote in "
        "the round; records: the\nnew client record files; gc: garbage collection, wherever it fell (also counted in "
        "the other columns)\n"
    )
    smallest, largest = table[counts[0]], table[counts[-1]]
    growth = f"{counts[-1]}/{counts[0]} clients"
    if len(counts) > 1:
        # CPU time first: another job on the machine delays this one (wall time) but does not add to its CPU time.
        for key in (
            "orchestration cpu/pr",
            "orchestration cpu with checkpoint/pr",
            "orchestration/pr",
            "orchestration with checkpoint/pr",
        ):
            growth_ratio = harness.ratio(largest[key], smallest[key])
            # Wall time against the evaluation steps' own ratio (pure compute): the machine's load divided out.
            relative = ""
            if "cpu" not in key:
                load = harness.ratio(largest["eval/cr"], smallest["eval/cr"])
                relative = f"; relative to the evaluation steps' ratio: {harness.ratio(growth_ratio, load):.2f}"
            verdict = "met" if growth_ratio <= GROWTH_TOLERANCE else "NOT met"
            print(
                f"{key.replace('/pr', '')} per participant-round, {growth} = {growth_ratio:.2f} (target <= "
                f"{GROWTH_TOLERANCE}: {verdict}){relative}"
            )
        for key, what in (("written", "bytes written"), ("records", "client record bytes written")):
            per_participant = [row[key] / row["participants"] for row in (largest, smallest)]
            print(
                f"{what} per participant-round, {growth} = {harness.ratio(*per_participant):.2f} (about 1: "
                "proportional to the participants; below 1: per-round fixed bytes shared by more participants)"
            )
        slope, intercept = linear_fit(counts, [table[c]["peak_rss"] for c in counts])
        print(f"peak RSS: {intercept / MB:.0f} MB + {slope / 1024:.1f} KiB x clients (least squares)")
    per_client = sample["data_bytes"] + sample["record_bytes"] + sample["callback_client_bytes"]
    print(
        f"a client adds by construction {per_client / 1024:.1f} KiB on the host: data "
        f"{sample['data_bytes'] / 1024:.1f} KiB, record {sample['record_bytes'] / 1024:.1f} KiB "
        f"(trainer.client_records[c], once it trained), harmonization target {sample['callback_client_bytes']} B"
    )
    device = "n/a (CPU)" if sample["device_peak"] < 0 else "/".join(_device(table[c]) for c in counts) + " MB"
    print(f"device memory, peak allocated per count: {device}; model state {sample['model_bytes'] / 1024:.1f} KiB")
    print(f"load average after: {harness.load_average():.1f} (before: {load_before:.1f})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    parser.add_argument("--clients-per-round", type=float, default=0.1, help="trainer.clients_per_round")
    parser.add_argument("--local-steps", type=int, default=1, help="trainer.local_steps")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run; the first is not timed")
    parser.add_argument("--train-per-site", type=int, default=8)
    parser.add_argument("--val-per-site", type=int, default=4)
    parser.add_argument("--test-per-site", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backbone", default="scale_cnn", help="scale_cnn, or a harmofl or timm classifier name")
    parser.add_argument("--width", type=int, default=32, help="scale_cnn's channels")
    parser.add_argument("--accelerator", default="cpu", help="cpu, or gpu for the device memory column")
    # One thread: on a small shared machine more threads make the timings noisier, not more telling.
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="runs per count (interleaved); medians reported")
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)  # a worker's client count
    args = parser.parse_args(argv)
    if not 0 < args.clients_per_round <= 1 and not float(args.clients_per_round).is_integer():
        parser.error(
            f"--clients-per-round must be a fraction in (0, 1] or a whole number, got {args.clients_per_round}"
        )
    if float(args.clients_per_round).is_integer() and args.clients_per_round > 1:
        args.clients_per_round = int(args.clients_per_round)
    return args


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
