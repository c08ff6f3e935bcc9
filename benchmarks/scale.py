"""Many clients on one device: memory and time per client as the federation grows.

One ``FederatedTrainer`` process (``devices=1``, CPU) trains and evaluates a small demo federation
(``DemoHistology``, ``test_resnet``, SGD with momentum, weight perturbation α = 0.05, the ``reference`` amplitude
harmonization of ``configs/demo.yaml``) for each client count, each count in a fresh subprocess so that its peak
RSS is its own. Every client has little data (16 training, 8 validation, 8 test images of 32 px by default), so
that the fixed per-client cost of the orchestrator is visible next to the compute.

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
  checkpoint write, divided by the clients (loading and storing client state, loaders, hooks, aggregation,
  metrics, metrics.csv/summary.json). The target: it must not grow with the client count; the script prints the
  ratio largest/smallest count (target <= 1.25, noise included);
- the checkpoint written every round (``last.ckpt``, plus ``best.ckpt`` when the round improved): it holds every
  client's record, so it grows with the clients; shown per round and per client, to tell O(clients) per round
  (constant per client) from O(clients²);
- how long ``DemoHistology.setup`` took, per client (with an empty ``XDG_CACHE_HOME``: the data are generated,
  and written to the demo cache where the data module has one);
- the time in Python's garbage collections per round (overlapping the other columns): full collections are the
  one per-round cost seen to grow faster than the clients.

Timings exclude the first round (a warm-up: first calls, allocator growth, the harmonization target's sharing).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

# The script runs from a checkout where the package may not be installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

# Nothing may reach the network: no model hub, no W&B (the worker subprocesses inherit this).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "disabled"

import torch  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402
from torch import Tensor  # noqa: E402

import harmofl.trainer  # noqa: E402
from callbacks import AmplitudeHarmonization  # noqa: E402
from harmofl import ClassificationClient, FederatedTrainer  # noqa: E402
from harmofl.data import DemoHistology  # noqa: E402

MB = 1024**2
# The per-client-round orchestration time may vary this much between counts before it counts as growing.
GROWTH_TOLERANCE = 1.25
# The options a worker needs to run the same workload as the driver was asked for.
WORKLOAD_OPTIONS = ("rounds", "train_per_site", "val_per_site", "test_per_site", "image_size", "batch_size",
                    "backbone", "threads", "seed")


# The table's columns: header, unit, width, cell of a row (a count's medians).
COLUMNS: tuple[tuple[str, str, int, Callable[[dict[str, float]], str]], ...] = (
    ("clients", "", 7, lambda r: f"{r['clients']:.0f}"),
    ("RSS fit0", "(MB)", 10, lambda r: f"{r['rss_before_fit'] / MB:.1f}"),
    ("peak RSS", "(MB)", 10, lambda r: f"{r['peak_rss'] / MB:.1f}"),
    ("setup/cl", "(ms)", 10, lambda r: f"{r['setup_seconds'] / r['clients'] * 1e3:.2f}"),
    ("round", "(s)", 8, lambda r: f"{r['round']:.3f}"),
    ("train/cr", "(ms)", 10, lambda r: f"{r['train'] * 1e3:.2f}"),
    ("eval/cr", "(ms)", 9, lambda r: f"{r['eval'] * 1e3:.2f}"),
    ("orch/cr", "(ms)", 9, lambda r: f"{r['orchestration'] * 1e3:.2f}"),
    ("save/rnd", "(ms)", 10, lambda r: f"{r['checkpoint save'] * 1e3:.1f}"),
    ("copy/rnd", "(ms)", 10, lambda r: f"{r['best copy'] * 1e3:.1f}"),
    ("ckpt/cl", "(ms)", 9, lambda r: f"{(r['checkpoint save'] + r['best copy']) / r['clients'] * 1e3:.2f}"),
    ("last.ckpt", "(MB)", 11, lambda r: f"{r['checkpoint_bytes'] / MB:.1f}"),
    ("gc/rnd", "(ms)", 9, lambda r: f"{r['gc'] * 1e3:.1f}"),
)


class Clock:
    """Seconds accumulated per named bucket; the round timer reads differences between round start and end."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timing(self, bucket: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[bucket] += time.perf_counter() - start

    def track_gc(self) -> None:
        """Time Python's garbage collections too (bucket ``gc``, overlapping the others): a full collection walks
        every tracked object (about 500 000 after importing torch and Lightning), and the clients' records and the
        checkpoint's pickling create the long-lived objects that trigger one."""
        started = time.perf_counter()

        def callback(phase: str, info: dict[str, int]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                self.seconds["gc"] += time.perf_counter() - started

        gc.callbacks.append(callback)

    def wrap(self, function: Callable[..., Any], bucket: str) -> Callable[..., Any]:
        @functools.wraps(function)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.timing(bucket):
                return function(*args, **kwargs)

        return timed


class TimedClient(ClassificationClient):
    """The demo classifier, with the wall time of its training and evaluation steps added to ``self.clock``."""

    clock: Clock

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        with self.clock.timing("train steps"):
            return super().training_step(batch, batch_idx)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.clock.timing("eval steps"):
            super().validation_step(batch, batch_idx)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        with self.clock.timing("eval steps"):
            super().test_step(batch, batch_idx)


class RoundTimer(Callback):
    """Per round: its wall time (on_round_start to on_round_end, which fires after the checkpoint and the
    outputs are written) and what each clock bucket gained meanwhile."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.rounds: list[dict[str, float]] = []
        self._start = 0.0
        self._before: dict[str, float] = {}

    def on_round_start(self, trainer: Any, round_idx: int) -> None:
        self._before = dict(self.clock.seconds)
        self._start = time.perf_counter()

    def on_round_end(self, trainer: Any, round_idx: int, results: Any) -> None:
        wall = time.perf_counter() - self._start
        gained = {bucket: total - self._before.get(bucket, 0.0) for bucket, total in self.clock.seconds.items()}
        self.rounds.append({"round": wall, **gained})


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a nested structure (state dicts, optimizer states, records)."""
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(item) for item in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(item) for item in value)
    if hasattr(value, "__dataclass_fields__"):  # ClientRecord
        return sum(tensor_bytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


# -- the worker: one client count, in its own process ------------------------------------------------------------


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    clients = args.worker
    data = DemoHistology(num_sites=clients, train_per_site=args.train_per_site, val_per_site=args.val_per_site,
                         test_per_site=args.test_per_site, image_size=args.image_size, batch_size=args.batch_size,
                         seed=args.seed)
    start = time.perf_counter()
    data.setup("fit")  # the trainer's own setup call is then a no-op
    setup_seconds = time.perf_counter() - start
    data_bytes = sum(tensor_bytes(list(data.dataset(c, s).tensors)) for c in data.client_names
                     for s in ("train", "val", "test"))

    clock = Clock()
    clock.track_gc()
    # The trainer module's own names: what _end_round calls every round.
    harmofl.trainer.save_checkpoint = clock.wrap(harmofl.trainer.save_checkpoint, "checkpoint save")
    harmofl.trainer.copy_checkpoint = clock.wrap(harmofl.trainer.copy_checkpoint, "best copy")
    torch.manual_seed(args.seed)
    model = TimedClient(backbone=args.backbone, batch_norm_stats="batch", alpha=0.05,
                        optimizer=functools.partial(torch.optim.SGD, lr=0.01, momentum=0.9, weight_decay=1e-4))
    model.clock = clock
    harmonization = AmplitudeHarmonization(preset="reference", share_target="first_round")
    timer = RoundTimer(clock)
    rss_before_fit = peak_rss_bytes()
    with tempfile.TemporaryDirectory(prefix="harmofl-scale-") as root:
        trainer = FederatedTrainer(rounds=args.rounds, accelerator="cpu", devices=1, enable_progress_bar=False,
                                   default_root_dir=root, callbacks=[harmonization, timer], seed=args.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # the best-round table, 64 rows long
            trainer.fit(model, data)
        checkpoint_bytes = (trainer.checkpoint_dir / "last.ckpt").stat().st_size
    first = data.client_names[0]
    return {
        "clients": clients,
        "setup_seconds": setup_seconds,
        "data_bytes": data_bytes,
        "rss_before_fit": rss_before_fit,
        "peak_rss": peak_rss_bytes(),
        "record_bytes": tensor_bytes(trainer.client_records[first]),
        "callback_client_bytes": tensor_bytes(harmonization.client_state_dict(first)),
        "model_bytes": tensor_bytes(trainer.module.state_dict()),
        "optimizer_bytes": tensor_bytes(trainer.optimizer.state_dict()),
        "checkpoint_bytes": checkpoint_bytes,
        "rounds": timer.rounds,
    }


# -- the driver: one subprocess per count, then the table ------------------------------------------------------


def measure(count: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run one client count in a fresh interpreter; its figures come back as JSON on stdout's last line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", str(count),
               *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in WORKLOAD_OPTIONS)]
    with tempfile.TemporaryDirectory(prefix="harmofl-scale-cache-") as cache:
        # An empty cache folder per run: every count makes its demo data the same way (a data module that caches
        # them generates and writes them), and nothing is left in the user's cache.
        env = {**os.environ, "XDG_CACHE_HOME": cache}
        process = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    if process.returncode != 0:
        raise RuntimeError(f"{count} clients failed:\n{process.stdout[-2000:]}\n{process.stderr[-4000:]}")
    return json.loads(process.stdout.strip().splitlines()[-1])


def per_client_round(run: dict[str, Any]) -> dict[str, float]:
    """Seconds per client-round over the rounds after the first, and the checkpoint's seconds per round."""
    rounds = run["rounds"][1:] or run["rounds"]
    clients = run["clients"]

    def mean(bucket: str) -> float:
        return statistics.fmean(r.get(bucket, 0.0) for r in rounds)

    checkpoint = mean("checkpoint save") + mean("best copy")
    steps = mean("train steps") + mean("eval steps")
    return {
        "round": mean("round"),
        "train": mean("train steps") / clients,
        "eval": mean("eval steps") / clients,
        "orchestration": (mean("round") - steps - checkpoint) / clients,
        "orchestration with checkpoint": (mean("round") - steps) / clients,
        "checkpoint save": mean("checkpoint save"),
        "best copy": mean("best copy"),
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
        figures = [per_client_round(run) | {key: float(run[key]) for key in ("peak_rss", "rss_before_fit",
                                                                              "setup_seconds")}
                   for run in repeats]
        table[count] = {key: statistics.median(f[key] for f in figures) for key in figures[0]}
    return table


def report(args: argparse.Namespace, runs: dict[int, list[dict[str, Any]]], load_before: float) -> None:
    table = summarize(runs)
    counts = sorted(table)
    sample = runs[counts[0]][0]
    print(f"HarmoFL many clients on one device: {args.backbone}, {args.image_size}px, per client "
          f"{args.train_per_site} train / {args.val_per_site} val / {args.test_per_site} test images, batch "
          f"{args.batch_size}, {args.rounds} rounds (timings: rounds 2-{args.rounds}), {args.threads} thread(s), "
          f"{args.repeats} repeat(s), torch {torch.__version__}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} (before: {load_before:.1f})")
    print()
    print("".join(f"{name:>{width}}" for name, _, width, _ in COLUMNS))
    print("".join(f"{unit:>{width}}" for _, unit, width, _ in COLUMNS))
    for count in counts:
        row = table[count] | {"clients": count, "checkpoint_bytes": runs[count][0]["checkpoint_bytes"]}
        print("".join(f"{cell(row):>{width}}" for _, _, width, cell in COLUMNS))
    print("RSS fit0: peak RSS before fit, with the data made and the model built; cr: per client-round; orch: round "
          "wall\nminus steps minus checkpoint; save: last.ckpt written; copy: best.ckpt copied (improving rounds "
          "only);\nckpt/cl: save + copy per client; gc: garbage collection, wherever it fell (also counted in the "
          "other columns)")

    per_client = sample["data_bytes"] / counts[0] + sample["record_bytes"] + sample["callback_client_bytes"]
    print()
    if len(counts) > 1:
        for key, label in (("peak_rss", "peak RSS"), ("rss_before_fit", "RSS before fit")):
            slope, intercept = linear_fit(counts, [table[c][key] for c in counts])
            print(f"{label} growth: {slope / MB:.3f} MB per added client (fit: {intercept / MB:.0f} MB + "
                  f"{slope / MB:.3f} MB x clients)")
    print(f"a client adds by construction {per_client / MB:.3f} MB on the host:\n  data "
          f"{sample['data_bytes'] / counts[0] / MB:.3f} MB, record {sample['record_bytes'] / MB:.3f} MB "
          f"(trainer.client_records[c]), harmonization target {sample['callback_client_bytes'] / 1024:.1f} KiB")
    print(f"on the device whatever the count: model state {sample['model_bytes'] / MB:.3f} MB + optimizer state "
          f"{sample['optimizer_bytes'] / MB:.3f} MB")

    smallest, largest = counts[0], counts[-1]
    for key, label in (("orchestration", "orchestration"), ("orchestration with checkpoint", "orchestration + "
                                                                                             "checkpoint")):
        ratio = table[largest][key] / table[smallest][key]
        # Against the training steps' own ratio: what is left once the machine's changing load is divided out.
        relative = ratio / (table[largest]["train"] / table[smallest]["train"])
        verdict = "met" if ratio <= GROWTH_TOLERANCE else "NOT met"
        print(f"{label} per client-round, {largest}/{smallest} clients = {ratio:.2f} "
              f"(target <= {GROWTH_TOLERANCE}: {verdict}); relative to the training steps' ratio: {relative:.2f}")
    per_client_ckpt = [(table[c]["checkpoint save"] + table[c]["best copy"]) / c for c in counts]
    print(f"checkpoint write per client per round, {largest}/{smallest} clients = "
          f"{per_client_ckpt[-1] / per_client_ckpt[0]:.2f} (about 1: O(clients) per round; growing: O(clients²))")


def parse_args() -> argparse.Namespace:
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
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads in each run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per count (interleaved); medians reported")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # internal: run one count, print JSON
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.worker is not None:
        print(json.dumps(run_worker(args)))
        return
    counts = sorted(int(c) for c in args.clients.split(","))
    load_before = os.getloadavg()[0]  # other work on the machine skews every timing: shown with the results
    runs: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for _ in range(args.repeats):
        for count in counts:  # interleaved, so that drifting machine load hits every count alike
            runs[count].append(measure(count, args))
    report(args, runs, load_before)


if __name__ == "__main__":
    main()
