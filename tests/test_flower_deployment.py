"""Flower's deployment runtime on loopback: a SuperLink and two SuperNodes as processes bound to 127.0.0.1,
``flwr run`` of this repository's app for 2 rounds of the demo, and the final global weights equal to the in-process
orchestrator's. Nothing leaves the machine: telemetry and update checks are off, no Ray, every process stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from harmofl.checkpoint import load_checkpoint  # noqa: E402
from helpers import REPO  # noqa: E402
from tests.test_flower import TINY, run_in_process  # noqa: E402

BIN = Path(sys.executable).parent
CONNECTION = "loopback"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_healthy(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{process.args[0]} not healthy on 127.0.0.1:{port} after {timeout} s:\n{log.read_text()[-3000:]}")


def processes_marked(marker: str) -> list[int]:
    """Every live process whose environment carries ``marker``: what this test started, children included."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM each process group (the SuperNodes before the SuperLink), again after 5 s, then SIGKILL."""
    for signal_number in (signal.SIGTERM, signal.SIGTERM, signal.SIGKILL):
        alive = [process for process in processes if process.poll() is None]
        for process in alive:
            try:
                os.killpg(process.pid, signal_number)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(process.poll() is None for process in alive):
            time.sleep(0.1)


@pytest.fixture
def loopback(tmp_path):
    """Environment of every Flower process: loopback only, no telemetry, no update check, no dependency
    installation, a HOME whose empty ray_bootstrap_config.yaml keeps Ray (never used here) off the network."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "ray_bootstrap_config.yaml").write_text("")
    marker = f"harmofl-flower-test-{os.getpid()}-{time.monotonic_ns()}"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # flower-superexec, flwr-clientapp, ...
        "HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": "1",  # two sites share this machine's cores
        "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",  # start each app process sooner (default 1 s)
        "PYTHONUNBUFFERED": "1",
        "HARMOFL_TEST_MARKER": marker,
    }
    started: list[subprocess.Popen] = []
    yield tmp_path, env, started
    stop([p for p in started if "superlink" not in str(p.args[0])] + [p for p in started
                                                                      if "superlink" in str(p.args[0])])
    deadline = time.monotonic() + 10
    while processes_marked(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftover = processes_marked(marker)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert not leftover, f"processes left running: {leftover}"


def start(command: list[str], env: dict, folder: Path, name: str, started: list) -> tuple[subprocess.Popen, Path]:
    flwr_home = folder / f"flwr-home-{name}"  # each process its own: no shared app installs
    flwr_home.mkdir()
    log = folder / f"{name}.log"
    process = subprocess.Popen(command, env={**env, "FLWR_HOME": str(flwr_home)}, cwd=folder,
                               stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    started.append(process)
    return process, log


def test_two_sites_on_loopback_train_what_the_in_process_orchestrator_trains(loopback):
    folder, env, started = loopback
    link_port = free_port()
    link, link_log = start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port",
                            str(link_port), "--disable-runtime-dependency-installation"], env, folder, "superlink",
                           started)
    wait_healthy(link_port, link, link_log)
    for site in ("site_0", "site_1"):
        port = free_port()
        node, node_log = start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link_port}",
                                "--host", "127.0.0.1", "--port", str(port), "--node-config", f"site='{site}'"],
                               env, folder, site, started)
        wait_healthy(port, node, node_log)

    cli_home = folder / "flwr-home-cli"
    cli_home.mkdir()
    (cli_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    cli_env = {**env, "FLWR_HOME": str(cli_home)}
    output = folder / "server"
    run_config = f"config='configs/demo.yaml' overrides='{TINY}' num-sites=2 output-dir='{output}' reply-timeout=300"
    submitted = subprocess.run([str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--run-config", run_config,
                                "--format", "json"], env=cli_env, cwd=folder, capture_output=True, text=True,
                               timeout=120)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    run_id = json.loads(submitted.stdout)["run-id"]

    status, deadline = "", time.monotonic() + 400
    while not status.startswith("finished") and time.monotonic() < deadline:
        time.sleep(2)
        listing = subprocess.run([str(BIN / "flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
                                 env=cli_env, cwd=folder, capture_output=True, text=True, timeout=60)
        runs = json.loads(listing.stdout).get("runs", [])
        status = runs[0]["status"] if runs else ""
    logs = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in sorted(folder.glob("*.log")))
    assert status == "finished:completed", f"run {run_id}: {status!r}\n{runs}\n{logs}"

    reference = run_in_process(folder, TINY)
    deployed = load_checkpoint(output / "checkpoints" / "last.ckpt")
    simulated = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert deployed["round"] == simulated["round"] == 2
    assert deployed["global_state"].keys() == simulated["global_state"].keys()
    for key, value in simulated["global_state"].items():
        # Other processes, other thread counts: the same computation up to float rounding.
        torch.testing.assert_close(deployed["global_state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    assert (output / "summary.json").is_file() and (output / "checkpoints" / "best.ckpt").is_file()
