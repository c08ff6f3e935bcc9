"""A Flower deployment on this machine, to try the deployment runtime and to test it: a SuperLink and one SuperNode
per site as processes bound to 127.0.0.1, ``flwr run`` of an app folder, every process stopped at the end.

Nothing leaves the machine: every process runs without telemetry, update check or dependency installation, with a
``HOME`` whose empty ``ray_bootstrap_config.yaml`` keeps Ray (not used by the deployment runtime) off the network.

    with LoopbackDeployment(folder, sites=["site_0", "site_1"]) as deployment:
        status = deployment.run(REPO, "config='configs/demo.yaml' num-sites=2 output-dir='/tmp/out'")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

#: The connection name the deployment's ``flwr`` configuration defines.
CONNECTION = "loopback"


class LoopbackError(RuntimeError):
    """A process of the loopback deployment failed; the message names its log."""


def flower_environment(home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process: ``base`` (default: this process's) with Flower's commands on the
    path, ``home`` as ``HOME`` (with an empty ``ray_bootstrap_config.yaml``), and nothing that calls home."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "ray_bootstrap_config.yaml").write_text("")
    base = dict(os.environ if base is None else base)
    return {
        **base,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{base.get('PATH', '')}",  # flower-superexec, flwr-clientapp
        "HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start each app process sooner (default 1 s)
        "PYTHONUNBUFFERED": "1",
    }


class LoopbackDeployment:
    """A SuperLink and one SuperNode per site (``--node-config site='NAME'``), insecure, on 127.0.0.1.

    Args:
        folder: where logs, each process's ``FLWR_HOME`` and the ``flwr`` configuration go.
        sites: the sites, one SuperNode each.
        env: the processes' environment (:func:`flower_environment` of ``folder/home`` by default).
        node_config: extra node-config items per site (e.g. ``data-path='/data/site_0'``).
    """

    def __init__(
        self,
        folder: Path,
        sites: Sequence[str],
        env: Mapping[str, str] | None = None,
        node_config: Mapping[str, str] | None = None,
    ) -> None:
        self.folder, self.sites, self.node_config = folder, list(sites), dict(node_config or {})
        folder.mkdir(parents=True, exist_ok=True)
        # A marker in every process's environment finds the processes Flower starts itself (app processes).
        self.marker = f"harmofl-loopback-{os.getpid()}-{time.monotonic_ns()}"
        self.env = {**(env or flower_environment(folder / "home")), "HARMOFL_LOOPBACK_MARKER": self.marker}
        self.started: list[subprocess.Popen[bytes]] = []
        #: Processes still alive after :meth:`stop` (killed then): should stay empty.
        self.leftover: list[int] = []

    def __enter__(self) -> LoopbackDeployment:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the SuperLink, then the SuperNodes, each once it answers its health check."""
        self.link_port = _free_port()
        link = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(self.link_port)]
        self._start_healthy([*link, "--disable-runtime-dependency-installation"], "superlink", self.link_port)
        for site in self.sites:
            port = _free_port()
            config = " ".join([f"site='{site}'", *(self.node_config.get(site, "").split())])
            node = ["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{self.link_port}"]
            self._start_healthy(
                [*node, "--host", "127.0.0.1", "--port", str(port), "--node-config", config], site, port
            )
        cli_home = self.folder / "flwr-home-cli"
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.link_port}"\ninsecure = true\n'
        )
        self.cli_env = {**self.env, "FLWR_HOME": str(cli_home)}

    def run(self, app: Path, run_config: str, timeout: float = 900.0) -> str:
        """``flwr run app`` with ``run_config``; waits for the run to finish and returns its status
        (``finished:completed`` on success)."""
        return self.wait(self.submit(app, run_config), timeout)

    def submit(self, app: Path, run_config: str) -> int:
        """``flwr run app`` with ``run_config``, not waiting for it: the run's id (:meth:`wait` for its end)."""
        submitted = self._flwr(["run", str(app), CONNECTION, "--run-config", run_config], timeout=120)
        try:
            return int(json.loads(submitted.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError) as error:
            raise LoopbackError(f"flwr run exited with {submitted.returncode}: {submitted.stdout[-500:]}") from error

    def wait(self, run_id: int, timeout: float = 900.0) -> str:
        """Wait for run ``run_id`` to finish (at most ``timeout`` s); its status, or ``no status``."""
        status, deadline = "", time.monotonic() + timeout
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(3)  # each `flwr ls` is a Python start on the cores the run needs
            ended = [name for name, process in zip(self._names, self.started) if process.poll() is not None]
            if ended:
                raise LoopbackError(f"{ended} ended during run {run_id}: see {self.logs()}")
            try:
                runs = json.loads(self._flwr(["ls", CONNECTION, "--run-id", str(run_id)], timeout=60).stdout)["runs"]
            except (json.JSONDecodeError, KeyError):
                runs = []
            status = runs[0]["status"] if runs else ""
        return status or "no status"

    def logs(self, chars: int = 3000) -> str:
        """The end of every process's log."""
        return "\n".join(f"--- {log.name}\n{log.read_text()[-chars:]}" for log in sorted(self.folder.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each process group (the SuperNodes before the SuperLink), again after 5 s, then SIGKILL; then
        SIGKILL whatever still carries the marker after 10 s (recorded in :attr:`leftover`)."""
        ordered = self.started[1:] + self.started[:1]
        for signal_number in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
            alive = [process for process in ordered if process.poll() is None]
            for process in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal_number)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(process.poll() is None for process in alive):
                time.sleep(0.1)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        self.leftover = self.alive()
        for pid in self.leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    @property
    def _names(self) -> list[str]:
        return ["superlink", *self.sites][: len(self.started)]

    def _start_healthy(self, command: list[str], name: str, port: int, timeout: float = 60.0) -> None:
        flwr_home = self.folder / f"flwr-home-{name}"  # each process its own: no shared app installs
        flwr_home.mkdir(exist_ok=True)
        log = self.folder / f"{name}.log"
        with log.open("w") as stream:
            process = subprocess.Popen(
                [str(Path(sys.executable).parent / command[0]), *command[1:]],
                env={**self.env, "FLWR_HOME": str(flwr_home)},
                cwd=self.folder,
                stdout=stream,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.started.append(process)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise LoopbackError(f"{name} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise LoopbackError(f"{name} not healthy on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")

    def _flwr(self, arguments: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        command = [str(Path(sys.executable).parent / "flwr"), *arguments, "--format", "json"]
        return subprocess.run(
            command, env=self.cli_env, cwd=self.folder, capture_output=True, text=True, timeout=timeout
        )

    def alive(self) -> list[int]:
        """Every live process whose environment carries the marker: what this deployment started, children too
        (after :meth:`stop`: none, even for a deployment stopped in the middle of a run)."""
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                with contextlib.suppress(OSError):
                    if self.marker.encode() in (entry / "environ").read_bytes():
                        found.append(int(entry.name))
        return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
