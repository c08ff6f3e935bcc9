"""HarmoFL on a GPU, in one table: the client step's speed per precision and layout, harmonization on the device,
the orchestrator's cost over a plain loop, and two processes on two GPUs against one.

Rows, each measured side by side in this one run:

- **client step**: client-steps/s of the Camelyon17 setting (128 images of 3x96x96, ``harmofl_densenet121``
  randomly initialized, SGD and α of configs/camelyon.yaml): ``harmofl.ClassificationClient.training_step``, the
  two-pass weight-perturbation step the trainer runs, through a single-device ``Fabric`` as the trainer sets it
  up, in fp32, bf16-mixed, bf16-mixed with channels-last, and that with ``torch.compile`` (the client's
  ``precision``, ``channels_last`` and ``compile_model`` settings). Relative: to fp32. Note: the first step's time
  (warm-up, or compilation).
- **harmonization**: what ``AmplitudeHarmonization`` runs per training batch on the device, per preset
  (``harmonization_cost.ours``), and its share of an fp32 step.
- **orchestrator/plain**: ``overhead.py``'s classification task on the GPU (``--accelerator cuda``): the
  ``FederatedTrainer`` run against the plain PyTorch loop doing the same work (same-work check included; cuDNN
  deterministic in these rows, so that both reach the same weights).
- **2 processes vs 1**: the same orchestrator run with ``trainer.devices=2`` on two GPUs against one; "skipped:
  1 GPU" on a machine with one.

    python benchmarks/gpu.py                      # the whole table: under 5 minutes on one GPU (estimated)
    python benchmarks/gpu.py --quick              # small batches, few steps: a smoke run on the GPU
    python benchmarks/gpu.py --cpu-dry-run --quick  # the same code on the CPU, tiny sizes: checks the script only

Without a CUDA device it exits with an error (status 1) before importing Lightning, unless ``--cpu-dry-run``
(2x3x32x32 through ``test_resnet``, ``torch.compile`` with its ``eager`` backend, the CPU counted as 2 devices).
A row that fails says ``failed`` and why; the others are still measured.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Sizes:
    """How much each row measures."""

    batch_size: int  # images per client step (the Camelyon17 setting: 128)
    image_size: int
    steps: int  # client steps per timed block
    repeats: int  # timed blocks (and overhead repetitions); medians reported
    overhead: tuple[str, ...]  # overhead.py's options of its classification run
    backbone: str = "harmofl_densenet121"  # the client step's network (the Camelyon17 setting's)


FULL = Sizes(batch_size=128, image_size=96, steps=20, repeats=3, overhead=("--rounds", "2", "--repeats", "3"))
TINY_DEMO = ("--train-per-site", "16", "--val-per-site", "8", "--test-per-site", "8", "--image-size", "32")
QUICK = Sizes(32, 96, steps=3, repeats=1, overhead=("--rounds", "1", "--repeats", "1", *TINY_DEMO, "--batch-size", "8"))
# The CPU dry run checks the code paths: timm's tiny ResNet keeps torch.compile's tracing short.
CPU_DRY_RUN = replace(QUICK, batch_size=2, image_size=32, steps=1, backbone="test_resnet")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batches of 32, 3 steps, 1 repetition: a smoke run")
    parser.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="run every row on the CPU at tiny sizes (the CPU counted as 2 devices): checks the script, not the GPU",
    )
    return parser.parse_args(argv)


def refuse_without_cuda(args: argparse.Namespace) -> None:
    """Exit (status 1) with what to do when there is no CUDA device, before the heavy imports below."""
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu.py needs a CUDA device; torch.cuda.is_available() is False. Run it on a machine with an "
            "NVIDIA GPU, or with --cpu-dry-run to check the script on the CPU (tiny sizes; the figures mean nothing)."
        )


# A worker (the harness's --worker-result flag; Fabric re-runs it for its extra processes) takes overhead.py's
# arguments and was started by a driver that has checked already.
if __name__ == "__main__" and sys.argv[1:2] != ["--worker-result"]:
    refuse_without_cuda(parse_args())

import functools
import time
from collections.abc import Callable

import _harness as harness
import overhead
import torch
from harmonization_cost import ALPHA, CHANNELS, NUM_CLASSES, SEED, SGD_ARGS, WORKLOADS, ours
from lightning.fabric import Fabric
from tasks import workload_from

from callbacks import PRESETS
from harmofl import ClassificationClient
from harmofl.amplitude import amplitude_spectrum, update_running_amplitude

CAMELYON = WORKLOADS[0]  # 128x3x96x96 through harmofl_densenet121
HARMONIZATION_CALLS = 20  # per timed repetition: a call is milliseconds, a clock reading microseconds


@dataclass(frozen=True)
class StepSetting:
    """One way to run the client step: the trainer's precision and the client's layout and compilation."""

    label: str
    precision: str
    channels_last: bool = False
    compile_model: bool = False


FP32 = StepSetting("fp32", "32-true")  # what the other settings are compared with
STEP_SETTINGS = (
    FP32,
    StepSetting("bf16-mixed", "bf16-mixed"),
    StepSetting("bf16-mixed, channels-last", "bf16-mixed", channels_last=True),
    StepSetting("bf16-mixed, channels-last, torch.compile", "bf16-mixed", channels_last=True, compile_model=True),
)


@dataclass(frozen=True)
class Line:
    """One row of the table."""

    measure: str
    setting: str
    result: str
    relative: str = ""
    note: str = ""


TABLE = (
    harness.Column("measure", lambda line: line.measure, left=True),
    harness.Column("setting", lambda line: line.setting, left=True),
    harness.Column("result", lambda line: line.result),
    harness.Column("relative", lambda line: line.relative, left=True),
    harness.Column("note", lambda line: line.note, left=True),
)


# -- the client step ------------------------------------------------------------------------------------------


def step_rate(setting: StepSetting, sizes: Sizes, accelerator: str) -> tuple[float, float]:
    """(client steps per second, seconds of the first step) of the client's training step under ``setting``."""
    fabric = Fabric(accelerator=accelerator, devices=1, precision=setting.precision)  # type: ignore[arg-type]
    torch.manual_seed(SEED)
    client = ClassificationClient(
        backbone=sizes.backbone,
        num_classes=NUM_CLASSES,
        in_chans=CHANNELS,
        optimizer=functools.partial(torch.optim.SGD, **SGD_ARGS),  # type: ignore[arg-type]  # floats by name
        alpha=ALPHA,
        batch_norm_stats="batch",  # as configs/camelyon.yaml
        channels_last=setting.channels_last,
        compile_model=setting.compile_model,
        # On the CPU the dry run checks the code path, not Inductor's C++ build (minutes for a DenseNet).
        compile_kwargs={"backend": "eager"} if accelerator == "cpu" else None,
    )
    module, _ = fabric.setup(client, client.configure_optimizers())
    images = torch.rand(sizes.batch_size, CHANNELS, sizes.image_size, sizes.image_size, device=fabric.device)
    batch = (images, torch.randint(0, NUM_CLASSES, (sizes.batch_size,), device=fabric.device))

    def steps(count: int) -> None:
        for index in range(count):
            module.training_step(batch, index)

    with harness.Timer(fabric.device) as first:
        steps(1)
    steps(1)  # a second warm-up: kernels chosen, allocator grown
    times = harness.Samples()
    for _ in range(sizes.repeats):
        times.time("block", functools.partial(steps, sizes.steps), fabric.device)
    return sizes.steps / times.median("block"), first.seconds


def step_lines(sizes: Sizes, accelerator: str) -> tuple[list[Line], float]:
    """The client-step rows, and the seconds of an fp32 step (NaN if it failed)."""
    label = replace(CAMELYON, batch_size=sizes.batch_size, image_size=sizes.image_size, backbone=sizes.backbone).label
    fp32_rate = float("nan")
    lines = []
    for setting in STEP_SETTINGS:
        try:
            rate, first = step_rate(setting, sizes, accelerator)
        except Exception as error:  # e.g. no compiler for torch.compile on this machine: the other rows still count
            lines.append(Line(f"client step, {label}", setting.label, "failed", note=failure(error)))
            continue
        if setting == FP32:
            fp32_rate = rate
        what = "compilation and warm-up" if setting.compile_model else "warm-up"
        lines.append(
            Line(
                f"client step, {label}",
                setting.label,
                f"{rate:.2f} steps/s",
                f"{harness.ratio(rate, fp32_rate):.2f}x fp32",
                f"first step {first:.1f} s ({what})",
            )
        )
        if accelerator == "cuda":
            torch.cuda.empty_cache()
    return lines, 1.0 / fp32_rate


def failure(error: BaseException) -> str:
    """A failed row's note: the error, short enough for a table cell."""
    return f"{type(error).__name__}: {error}"[:200]


# -- harmonization ---------------------------------------------------------------------------------------------


def call_repeatedly(call: Callable[[], object], count: int) -> None:
    for _ in range(count):
        call()


def harmonization_lines(sizes: Sizes, device: torch.device, fp32_step: float) -> list[Line]:
    """Per preset, what the callback runs per training batch on the device, and its share of an fp32 step."""
    generator = torch.Generator().manual_seed(SEED)
    shape = (sizes.batch_size, CHANNELS, sizes.image_size, sizes.image_size)
    earlier, images = (torch.rand(shape, generator=generator).to(device) for _ in range(2))
    running = update_running_amplitude(None, amplitude_spectrum(earlier), momentum=0.0)
    out = torch.empty_like(images)
    lines = []
    for name, preset in PRESETS.items():
        call = functools.partial(ours, images, running, preset["band"], preset["momentum"], out)
        calls = functools.partial(call_repeatedly, call, HARMONIZATION_CALLS)
        times = harness.Samples()
        with torch.no_grad():
            calls()  # warm-up: FFT plans, allocations
            for _ in range(sizes.repeats):
                times.time("block", calls, device)
        seconds = times.median("block") / HARMONIZATION_CALLS
        share = harness.ratio(seconds, fp32_step)
        lines.append(
            Line(
                f"harmonization, {sizes.batch_size}x{CHANNELS}x{sizes.image_size}x{sizes.image_size}",
                f"{name} preset",
                f"{seconds * 1e3:.2f} ms/batch",
                f"{share:.3%} of an fp32 step",
                f"band {preset['band']}, momentum {preset['momentum']}",
            )
        )
    return lines


# -- the orchestrator: overhead.py on the device, 1 process and 2 ------------------------------------------------


def orchestrator_lines(sizes: Sizes, accelerator: str, devices: int) -> list[Line]:
    """overhead.py's classification rows on ``accelerator``: orchestrator/plain with 1 process, and the orchestrator
    with 2 processes (2 devices) against 1 where there are 2 devices."""
    args = overhead.parse_args(["--task", "classification", "--accelerator", accelerator, *sizes.overhead])
    work = workload_from(args, "classification")
    data = work.data()
    kind = "GPU" if accelerator == "cuda" else "CPU device"
    setting = f"demo classification, {work.clients} clients, {work.rounds} round(s)"
    runs: dict[int, overhead.Row] = {}
    lines = []
    for processes in (1, 2) if devices >= 2 else (1,):
        try:
            (runs[processes],) = overhead.benchmark(work, data, [processes], args.threads, args.repeats)
        except RuntimeError as error:  # a failed same-work check, or a worker that failed: say which, go on
            lines.append(Line("orchestrator", f"{setting}, {processes} process(es)", "failed", note=failure(error)))
    if 1 in runs:
        row = runs[1]
        lines.append(
            Line(
                "orchestrator/plain",
                f"{setting}, 1 process",
                f"{row.ratio:.3f}",
                f"orchestrator {row.times.median('orchestrator'):.2f} s, plain {row.times.median('plain'):.2f} s",
                f"same work: weights {row.weight_gap:.1e}, metrics {row.metric_gap:.1e}",
            )
        )
    label = f"2 processes on 2 {kind}s vs 1"
    if devices < 2:
        lines.append(Line("client parallelism", label, "skipped: 1 GPU"))
    elif 1 in runs and 2 in runs:
        one, two = runs[1].times.median("orchestrator"), runs[2].times.median("orchestrator")
        lines.append(
            Line(
                "client parallelism",
                f"{label}, {setting}",
                f"{harness.ratio(one, two):.2f}x",
                f"{two:.2f} s vs {one:.2f} s",
                f"same work: weights {runs[2].weight_gap:.1e}",
            )
        )
    return lines


def deterministic_convolutions() -> None:
    """cuDNN's deterministic kernels in this process: the orchestrator must reach the plain loop's weights (to 1e-6,
    overhead.py's same-work check), which convolutions' nondeterministic backward passes would break on a GPU."""
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def orchestrator_worker(call: harness.WorkerCall) -> None:
    """overhead.py's worker (the 2-process orchestrator run), with deterministic convolutions as its driver's."""
    deterministic_convolutions()
    overhead.orchestrator_worker(call)


def main() -> None:
    args = parse_args()
    sizes = CPU_DRY_RUN if args.cpu_dry_run else QUICK if args.quick else FULL
    accelerator = "cpu" if args.cpu_dry_run else "cuda"
    device = torch.device(accelerator)
    devices = 2 if args.cpu_dry_run else torch.cuda.device_count()
    mode = "CPU dry run, figures mean nothing" if args.cpu_dry_run else "quick" if args.quick else "full"
    print(f"HarmoFL on the GPU ({mode}): {sizes.repeats} repetition(s), medians; {devices} device(s)")
    print(harness.describe_machine(device))
    start = time.perf_counter()
    lines, fp32_step = step_lines(sizes, accelerator)
    lines += harmonization_lines(sizes, device, fp32_step)
    deterministic_convolutions()  # after the step rows, which run as the trainer does: cuDNN's defaults
    lines += orchestrator_lines(sizes, accelerator, devices)
    print()
    harness.print_table(TABLE, lines)
    print(f"\ntotal wall time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    harness.run(main, worker=orchestrator_worker)
