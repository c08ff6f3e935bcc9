"""What every benchmark shares: the environment, worker processes, timers, the machine's description and tables.

Import it before torch, Lightning or timm: it puts the repository on ``sys.path`` (a checkout where the package
may not be installed) and sets the environment those libraries read when they are imported.

- **Environment.** ``HF_HUB_OFFLINE=1`` and ``WANDB_MODE=disabled``, forced rather than defaulted, so that a
  user's setting cannot make a benchmark reach the network. W&B is *disabled*, not offline: no benchmark logs to
  W&B, and offline mode would still write a run folder per run, disk I/O inside the timings and files left
  behind. Lightning's info lines are silenced. Thread counts: :func:`pin_threads` in this process, ``threads=``
  for a worker.
- **Workers.** :func:`run_worker` runs the calling script again, as ``script --worker-result FILE ARGS...``, and
  returns what the worker passed to :meth:`WorkerCall.save`; a script's entry point is ``run(driver, worker)``.
  Fabric starts its extra processes by re-running the same command line, so they are workers too; only rank 0
  saves. Every child runs in a process group of its own (:func:`process_group`, :func:`run_process`), killed
  whole on a timeout or Ctrl-C, and when it ends, so that none of Fabric's extra processes outlives it.
- **Timers.** :class:`Timer` (a ``with`` block), :class:`Clock` (seconds per named bucket, garbage collections
  included), :class:`RoundTimer` (a callback: each federated round and its checkpoint), :class:`Samples`
  (repeated measurements and their medians).
- **Reports.** :func:`describe_machine`, and :func:`print_table` of :class:`Column` s, ratios among them.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

OFFLINE = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
os.environ.update(OFFLINE)
# Lightning's info lines (devices found, the trainer's line per round without a progress bar) would interleave
# with a benchmark's report; warnings still show.
logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)

import torch  # after the environment: torch, Lightning and the hubs read it when imported

from harmofl.federation.callback import FederatedCallback

WORKER_FLAG = "--worker-result"


# -- threads -----------------------------------------------------------------------------------------------------


def pin_threads(threads: int | None) -> None:
    """Torch's intra-op threads in this process; None keeps torch's default."""
    if threads is not None:
        torch.set_num_threads(threads)


def thread_environment(threads: int) -> dict[str, str]:
    """A child process's thread count: torch reads ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` at start-up (both
    of which :func:`pin_threads` sets in process), and Fabric, launching several processes on the CPU, would
    otherwise set the first to the cores per process."""
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


# -- worker processes ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerCall:
    """How this process was started as a worker: where its result goes and the arguments it was given."""

    result: Path  # its folder is the worker's scratch space, removed when the driver has read the result
    arguments: list[str]

    def save(self, value: Any) -> None:
        """The worker's result: tensors, and dicts, lists and tuples of them and of plain values."""
        torch.save(value, self.result)


def worker_call() -> WorkerCall | None:
    """This process's worker call, or None in the driver."""
    if sys.argv[1:2] != [WORKER_FLAG]:
        return None
    return WorkerCall(Path(sys.argv[2]), sys.argv[3:])


def run(driver: Callable[[], None], worker: Callable[[WorkerCall], None]) -> None:
    """A benchmark script's entry point: ``worker`` in a worker process, ``driver`` otherwise."""
    call = worker_call()
    if call is None:
        driver()
    else:
        worker(call)


def worker_command(
    arguments: Sequence[str], result: Path, *, threads: int | None = None, cache: Path | None = None
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that run the running script again as a worker; ``cache``: its
    ``XDG_CACHE_HOME`` (the demo data's cache)."""
    script = getattr(sys.modules["__main__"], "__file__", None)
    if script is None:  # an interactive session or ``python -c``: there is no script to run again
        raise RuntimeError(
            f"A worker runs the running script again, but __main__ ({sys.argv[0]!r}) has no file: start the "
            "benchmark as `python benchmarks/NAME.py`."
        )
    environment = dict(os.environ)
    if threads is not None:
        environment |= thread_environment(threads)
    if cache is not None:
        environment["XDG_CACHE_HOME"] = str(cache)
    return [sys.executable, str(Path(script).resolve()), WORKER_FLAG, str(result), *arguments], environment


@contextlib.contextmanager
def process_group(
    command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """``command`` started in a session of its own, its command line and output appended to ``log``; nothing of it
    outlives the ``with`` block.

    Fabric's extra processes join the session's process group, and the whole group is killed when the block ends:
    on an exception (a timeout; Ctrl-C, which the new session no longer receives from the terminal) the run
    itself, else any process that Fabric's launcher, which does not wait for them, left behind the leader.
    """
    with log.open("a") as stream:
        stream.write(shlex.join(command) + "\n")
        stream.flush()
        process = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=stream, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        kill_group(process)


def kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL the process group ``process`` leads, and wait for ``process``."""
    with contextlib.suppress(ProcessLookupError):  # the whole group has exited already
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def run_process(
    command: Sequence[str], *, cwd: Path, env: dict[str, str], log: Path, timeout: float | None = None
) -> int:
    """Run ``command`` as :func:`process_group` does and return its exit status; past ``timeout`` seconds, kill
    its group and raise ``subprocess.TimeoutExpired``."""
    with process_group(command, cwd=cwd, env=env, log=log) as process:
        return process.wait(timeout=timeout)


def run_worker(
    arguments: Sequence[str], *, threads: int | None = None, fresh_cache: bool = False, timeout: float | None = None
) -> Any:
    """Run the script again as a worker and return its result; raise, with the end of its output, if it fails.

    ``fresh_cache``: an empty cache folder, so that every run generates its demo data the same way (writing it,
    as a data module with a cache does) and nothing is left in the user's cache.
    """
    with tempfile.TemporaryDirectory(prefix="harmofl-bench-") as folder:
        result, log = Path(folder) / "result.pt", Path(folder) / "worker.log"
        cache = Path(folder) / "cache" if fresh_cache else None
        command, environment = worker_command(arguments, result, threads=threads, cache=cache)
        returncode = run_process(command, cwd=REPO_ROOT, env=environment, log=log, timeout=timeout)
        if returncode != 0:
            raise RuntimeError(f"The worker {' '.join(arguments)} failed (exit {returncode}):\n{tail(log)}")
        return torch.load(result, weights_only=True)


def tail(path: Path, chars: int = 4000) -> str:
    """The end of a log file ("" if there is none)."""
    return path.read_text(errors="replace")[-chars:] if path.is_file() else ""


def gather_objects(value: Any) -> list[Any]:
    """``value`` of every process of the run, in rank order (``[value]`` without a process group)."""
    if not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


# -- timers ------------------------------------------------------------------------------------------------------


class Timer:
    """Wall seconds of a ``with`` block, in ``seconds``.

    ``device``: on CUDA the queued kernels must finish before the clock is read, at both ends. ``collect``: a
    garbage collection first, so that garbage from earlier work is not collected inside the timing.
    """

    def __init__(self, device: torch.device | None = None, collect: bool = False) -> None:
        self.device = device
        self.collect = collect
        self.seconds = 0.0
        self._start = 0.0

    def _synchronize(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        if self.collect:
            gc.collect()
        self._synchronize()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._synchronize()
        self.seconds = time.perf_counter() - self._start


class Clock:
    """Seconds accumulated per named bucket."""

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def timing(self, bucket: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[bucket] += time.perf_counter() - start

    def track_gc(self) -> None:
        """Time Python's garbage collections too, in bucket ``gc`` (overlapping the others): a full collection
        walks every tracked object, about 500 000 after importing torch and Lightning."""
        started = time.perf_counter()

        def on_collection(phase: str, info: dict[str, int]) -> None:
            nonlocal started
            if phase == "start":
                started = time.perf_counter()
            else:
                self.seconds["gc"] += time.perf_counter() - started

        gc.callbacks.append(on_collection)


class RoundTimer(FederatedCallback):
    """Each federated round of this process, as a dict appended to ``rounds``:

    - ``start``: when it began (``time.time()``, comparable across processes);
    - ``round`` and ``cpu``: wall and CPU seconds (every thread) from ``on_round_start`` to ``on_round_end``,
      which fires after the checkpoint and the output files are written;
    - ``checkpoint``: from ``on_save_checkpoint`` (rank 0, right before the round's checkpoint is written) to
      ``on_round_end``: the checkpoint, its best-round copy and the output files; 0 on other ranks;
    - what each of ``clock``'s buckets gained meanwhile.
    """

    def __init__(self, clock: Clock | None = None) -> None:
        self.clock = clock or Clock()
        self.rounds: list[dict[str, float]] = []
        self._before: dict[str, float] = {}
        self._wall = self._cpu = 0.0
        self._checkpoint: float | None = None

    def on_round_start(self, trainer: Any, pl_module: Any, round_idx: int) -> None:
        self._before = dict(self.clock.seconds)
        self._checkpoint = None
        self.rounds.append({"start": time.time()})
        self._cpu, self._wall = time.process_time(), time.perf_counter()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: Any) -> None:
        self._checkpoint = time.perf_counter()

    def on_round_end(self, trainer: Any, pl_module: Any, round_idx: int, results: Any) -> None:
        end, cpu = time.perf_counter(), time.process_time()
        gained = {bucket: total - self._before.get(bucket, 0.0) for bucket, total in self.clock.seconds.items()}
        checkpoint = 0.0 if self._checkpoint is None else end - self._checkpoint
        self.rounds[-1].update(round=end - self._wall, cpu=cpu - self._cpu, checkpoint=checkpoint, **gained)

    def after_warm_up(self) -> list[dict[str, float]]:
        """The rounds after the first, a warm-up (first calls, allocator growth); the only one if there is one."""
        return self.rounds[1:] or self.rounds


class Samples(defaultdict[str, list[float]]):
    """Repeated measurements per name (seconds, usually), and their medians."""

    def __init__(self) -> None:
        super().__init__(list)

    def time(self, name: str, fn: Callable[[], object], device: torch.device | None = None) -> None:
        """Add the wall time of one call of ``fn`` (see :class:`Timer` for ``device``)."""
        with Timer(device) as timer:
            fn()
        self[name].append(timer.seconds)

    def median(self, name: str) -> float:
        return statistics.median(self[name])

    def medians(self) -> dict[str, float]:
        return {name: statistics.median(values) for name, values in self.items()}


# -- reports -----------------------------------------------------------------------------------------------------


def describe_machine(device: torch.device | None = None) -> str:
    """One line: platform, cores, load average, Python, torch and its threads, the device."""
    if device is not None and device.type == "cuda":
        accelerator = torch.cuda.get_device_name(device)
    else:
        accelerator = f"cpu ({platform.processor() or platform.machine()})"
    return (
        f"machine: {platform.platform()}, {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load "
        f"average {load_average():.1f}, python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), device {accelerator}"
    )


def load_average() -> float:
    """The machine's one-minute load average: other work skews every timing, so reports show it."""
    return os.getloadavg()[0]


@dataclass(frozen=True)
class Column:
    """A table column: its header, an optional unit line, and the text of its cell for a row."""

    header: str
    cell: Callable[[Any], str]
    unit: str = ""
    left: bool = False  # labels align left, figures right


def print_table(columns: Sequence[Column], rows: Iterable[Any]) -> None:
    """The rows under the headers (and units, where any column has one), each column as wide as it needs."""
    cells = [[column.cell(row) for column in columns] for row in rows]
    lines = [[column.header for column in columns]]
    if any(column.unit for column in columns):
        lines.append([column.unit for column in columns])
    lines += cells
    widths = [max(len(line[index]) for line in lines) for index in range(len(columns))]
    for line in lines:
        print(
            "  ".join(
                text.ljust(width) if column.left else text.rjust(width)
                for column, text, width in zip(columns, line, widths)
            ).rstrip()
        )


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``, NaN where the denominator is 0 (a figure too small to have been measured)."""
    return numerator / denominator if denominator else float("nan")
