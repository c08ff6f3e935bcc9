"""Several nodes: ``trainer.num_nodes`` reaches Fabric, two torchrun "nodes" on this machine train as two processes
on one node do, and the settings refuse what cannot run (in this process)."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment, SLURMEnvironment, TorchElasticEnvironment
from lightning.fabric.utilities.rank_zero import rank_zero_only

from harmofl import FederatedTrainer
from harmofl.checkpoint import load_checkpoint
from harmofl.federation.settings import check_node_launcher, make_fabric

from helpers import CLI_TINY, REPO, federation_of, fit_tiny_demo

ROUNDS = 2
NODE_TIMEOUT_S = 300  # far above the ~40 s the two nodes take on 2 busy cores: only a hang reaches it


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def torchrun_node(node_rank: int, port: int, root: Path, log: Path) -> subprocess.Popen:
    """One "node" of two: torchrun with one process, rendezvous on 127.0.0.1, in a session of its own (so that its
    whole process group can be killed)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "2",
        "--nproc_per_node",
        "1",
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(REPO / "cli.py"),
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.num_nodes",
        "2",
        "--trainer.devices",
        "1",
        "--trainer.accelerator",
        "cpu",
        "--trainer.rounds",
        str(ROUNDS),
        "--trainer.default_root_dir",
        str(root),  # one folder for both nodes, as a cluster's shared file system
        *CLI_TINY,
    ]
    environment = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with log.open("w") as output:
        return subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
        )


def test_two_torchrun_nodes_aggregate_the_same_weights_as_two_processes_on_one(tmp_path):
    """Clients spread over the global ranks of 2 nodes × 1 process give the global model of 1 node × 2 processes
    (one thread per process in both)."""
    fit_tiny_demo(tmp_path / "one_node", devices=2, rounds=ROUNDS)
    port, root = free_port(), tmp_path / "two_nodes"
    nodes = [torchrun_node(rank, port, root, tmp_path / f"node{rank}.log") for rank in (0, 1)]
    try:
        codes = [node.wait(timeout=NODE_TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:  # torchrun and its worker: nothing outlives the test, however it ends
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.pid, signal.SIGKILL)
            node.wait()
    logs = "\n".join((tmp_path / f"node{rank}.log").read_text()[-3000:] for rank in (0, 1))
    assert codes == [0, 0], logs

    one = load_checkpoint(tmp_path / "one_node" / "checkpoints" / "last.ckpt")["global_state"]
    two = load_checkpoint(root / "checkpoints" / "last.ckpt")["global_state"]
    assert two.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(two[key], value, atol=0, rtol=0, msg=key)


def test_num_nodes_below_one_is_refused_before_any_work(trainer_kwargs):
    with pytest.raises(ValueError, match=r"trainer\.num_nodes must be >= 1, got 0"):
        FederatedTrainer(**trainer_kwargs, num_nodes=0)


def test_several_nodes_without_a_launcher_per_node_are_refused(trainer_kwargs, monkeypatch):
    """A plain launch of num_nodes=2 would wait for the other node forever: refused, naming torchrun and srun."""
    monkeypatch.delenv("NODE_RANK", raising=False)
    with pytest.raises(ValueError, match=r"trainer\.num_nodes=2 needs one launch per node.*torchrun.*srun"):
        FederatedTrainer(**trainer_kwargs, num_nodes=2)
    # A node rank set by hand (Lightning's bare-bones cluster) or a launcher's environment is accepted.
    monkeypatch.setenv("NODE_RANK", "1")
    check_node_launcher(2, LightningEnvironment())
    monkeypatch.delenv("NODE_RANK")
    check_node_launcher(2, TorchElasticEnvironment())
    check_node_launcher(1, LightningEnvironment())


def test_srun_tasks_become_the_ranks_of_the_nodes(monkeypatch):
    """Under `srun` (SLURM) with --nodes 2 --ntasks-per-node 1, the process of task 1 is global rank 1 of 2, on node
    1; trainer.num_nodes or trainer.devices that disagree with the allocation are refused by Lightning, naming it."""
    slurm = {
        "SLURM_NTASKS": "2",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NAME": "harmofl",
        "SLURM_NODELIST": "node[1-2]",
        "SLURM_NODEID": "1",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "0",
    }
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    # A Fabric made here as rank 1 sets the process-wide rank of rank_zero_warn & co.: restored after the test, or
    # every later test's warnings would be silenced.
    monkeypatch.setattr(rank_zero_only, "rank", getattr(rank_zero_only, "rank", 0))
    fabric = make_fabric("cpu", 2, 1, "32-true", None, None, enable_progress_bar=False)
    assert isinstance(fabric.strategy.cluster_environment, SLURMEnvironment)
    assert (fabric.world_size, fabric.global_rank, fabric.node_rank, fabric.local_rank) == (2, 1, 1, 0)
    validate_launch(fabric)  # what Fabric's launcher checks first when the trainer launches
    with pytest.raises(ValueError, match="--nodes=2"):
        validate_launch(make_fabric("cpu", 3, 1, "32-true", None, None, enable_progress_bar=False))
    with pytest.raises(ValueError, match="--ntasks-per-node=1"):
        validate_launch(make_fabric("cpu", 1, 2, "32-true", None, None, enable_progress_bar=False))


def validate_launch(fabric) -> None:
    strategy = fabric.strategy
    strategy.cluster_environment.validate_settings(num_devices=strategy.num_processes, num_nodes=strategy.num_nodes)


def test_processes_of_every_node_together_must_not_exceed_the_clients():
    """The world size (num_nodes × devices) is checked against the clients: 2 nodes × 2 devices need 4 clients."""
    with pytest.raises(ValueError, match=r"4 processes \(trainer\.num_nodes × trainer\.devices\) exceed the 3 clients"):
        federation_of({"a": 1, "b": 1, "c": 1}, world_size=2 * 2)
    federation = federation_of({"a": 1, "b": 1, "c": 1, "d": 1}, world_size=2 * 2)
    # Global rank r of the 4 holds client r: node 1's processes (ranks 2, 3) hold clients c and d.
    assert [federation.trained_by(rank, 4) for rank in range(4)] == [["a"], ["b"], ["c"], ["d"]]
