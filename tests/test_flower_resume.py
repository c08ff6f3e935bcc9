"""Resumable deployments: each site's state on its own disk (:mod:`harmofl.flower.site_store`), keyed by the
federation id the server keeps in its checkpoint; a server stopped mid-run and restarted SuperNodes continue the
federation exactly (in-process through a local Grid here; on the loopback deployment runtime in
tests/test_flower_deployment.py)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_flower import SERVER_NODE, LocalGrid

from harmofl.checkpoint import load_checkpoint
from harmofl.flower import FlowerExecutor, app, wire
from harmofl.flower.site_store import SiteStateStore, new_federation_id

from helpers import FLOWER_TINY

FEDERATION = "0123456789abcdef0123456789abcdef"
# FedBN-style local norms on top of HarmoFL: local keys, optimizer state and the amplitude target all matter.
STATEFUL = FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=4") + " trainer.local_modules=[norm]"


def weights(value: float) -> dict:
    return {"record": {"local_state": {"w": torch.full((2,), value)}}, "callbacks": {}}


# -- the site's files -----------------------------------------------------------------------------------------------


def test_a_site_resumes_from_its_newest_state_at_or_before_the_round_and_keeps_two_files(tmp_path):
    states = SiteStateStore(tmp_path, FEDERATION, "site_0")
    assert states.load(0) is None  # never trained: the global model alone
    for round_number in (1, 2, 3):
        states.prune(round_number - 1)
        states.save(round_number, weights(round_number))
    assert states.saved_rounds() == [2, 3]  # the state a server at round 2 may resume from, and the newest
    (states.folder / ".round-4.pt.tmp.dead").write_bytes(b"PK a writer killed mid-write")

    # A server that resumed from its round-2 checkpoint: round 3 is a future it rolled back.
    assert torch.equal(states.load(2)["record"]["local_state"]["w"], torch.full((2,), 2.0))
    states.prune(2)
    assert [path.name for path in states.folder.iterdir()] == ["round-2.pt"]
    assert torch.equal(states.load(5)["record"]["local_state"]["w"], torch.full((2,), 2.0))  # did not train since


def test_a_site_refuses_what_it_cannot_continue(tmp_path):
    for malformed in ("../../etc", "0123", FEDERATION.upper(), FEDERATION + "0", 42, None):
        with pytest.raises(ValueError, match="Federation id .* is malformed: expected 32 lowercase hexadecimal"):
            SiteStateStore(tmp_path, malformed, "site_0")  # type: ignore[arg-type]
    for site in ("..", "a/b", ""):
        with pytest.raises(ValueError, match="cannot name a state folder"):
            SiteStateStore(tmp_path, FEDERATION, site)
    assert list(tmp_path.iterdir()) == []

    states = SiteStateStore(tmp_path, FEDERATION, "site_0")
    states.save(4, weights(4))
    with pytest.raises(ValueError, match=r"no state of federation .* at round 2 or before \(it keeps rounds \[4\]"):
        states.load(2)  # a server resumed from an older checkpoint (best.ckpt) than the site keeps
    with pytest.raises(ValueError, match="no state"):
        states.prune(2)
    assert states.saved_rounds() == [4]  # refused before anything was deleted

    other = SiteStateStore(tmp_path, FEDERATION, "site_1")
    other.folder.mkdir(parents=True)
    (other.folder / "round-4.pt").write_bytes(states.path(4).read_bytes())  # site_0's file in site_1's folder
    with pytest.raises(ValueError, match="is not this site's state of round 4"):
        other.load(4)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state": Payload()}, states.path(5))
    with pytest.raises(ValueError, match="round-5.pt' cannot be loaded safely"):
        states.load(5)


def test_a_failed_write_leaves_the_previous_state(tmp_path, monkeypatch):
    states = SiteStateStore(tmp_path, FEDERATION, "site_0")
    states.save(1, weights(1))

    def failing_save(data, handle, *args, **kwargs):
        handle.write(b"PK only the first bytes")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        states.save(2, weights(2))
    monkeypatch.undo()
    assert [path.name for path in states.folder.iterdir()] == ["round-1.pt"]
    assert torch.equal(states.load(2)["record"]["local_state"]["w"], torch.ones(2))


# -- the server -----------------------------------------------------------------------------------------------------


def test_the_server_resumes_only_its_own_checkpoints_of_this_federation(tmp_path):
    checkpoints = tmp_path / "run" / "checkpoints"
    assert app.resume_from({}, checkpoints) is None and app.resume_from({"ckpt-path": ""}, checkpoints) is None
    assert app.resume_from({"ckpt-path": "last"}, checkpoints) == "last"
    assert app.resume_from({"ckpt-path": "best"}, checkpoints) == "best"
    assert app.resume_from({"ckpt-path": "last.ckpt"}, checkpoints) == str(checkpoints / "last.ckpt")
    for outside in ("../config.yaml", "/etc/passwd", str(tmp_path / "other.ckpt")):
        with pytest.raises(ValueError, match="is not in the run's checkpoints folder"):
            app.resume_from({"ckpt-path": outside}, checkpoints)

    executor = FlowerExecutor(LocalGrid([], {}), 1, 0, None)
    assert executor.state_dict() == {"federation_id": executor.federation_id} and executor.federation_id != (
        FlowerExecutor(LocalGrid([], {}), 1, 0, None).federation_id
    )
    executor.load_state_dict({"federation_id": FEDERATION})
    assert executor.federation_id == FEDERATION
    with pytest.raises(ValueError, match="no federation id: it was not written by a Flower run"):
        executor.load_state_dict({})
    with pytest.raises(ValueError, match="malformed"):
        executor.load_state_dict({"federation_id": "../sites"})


def test_a_message_with_a_malformed_federation_id_is_refused_and_writes_nothing(tmp_path, caplog):
    grid = LocalGrid(
        [{"site": "site_0", "state-dir": str(tmp_path)}], {"config": "configs/demo.yaml", "overrides": FLOWER_TINY}
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    config = ConfigRecord({"round": 0, "splits": "val", wire.FEDERATION_ID: "../../victim"})
    content = RecordDict({**wire.broadcast_records({}, {}), wire.CONFIG: config})
    [reply] = grid.send_and_receive([Message(content, dst_node_id=1, message_type="evaluate", group_id="evaluate-1")])
    assert reply.has_error()
    # The details stay in the site's log (the reply's reason may be generic: harmofl.flower.app.reply_errors).
    assert "'../../victim' is malformed" in caplog.text + reply.error.reason
    assert list(tmp_path.iterdir()) == []


# -- a federation stopped and resumed -------------------------------------------------------------------------------


class ServerStopped(Exception):
    pass


class StoppedGrid(LocalGrid):
    """Delivers round ``stop_round``'s training messages (the sites train and save; with round ``stop_round - 1``'s
    evaluation), then raises as the ServerApp does when it is stopped: the server never checkpoints either round."""

    def __init__(self, node_configs, run_config, stop_round: int) -> None:
        super().__init__(node_configs, run_config)
        self.stop_group = f"round-{stop_round}"

    def push_messages(self, messages):
        message_ids = super().push_messages(messages)
        if any(message.metadata.group_id == self.stop_group for message in messages):
            raise ServerStopped(f"ServerApp stopped during {self.stop_group}")
        return message_ids


def serve(grid: LocalGrid, run_config: dict) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    app.run_server(
        grid, Context(run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(), run_config=run_config)
    )


def test_a_stopped_server_and_restarted_sites_continue_the_federation_exactly(tmp_path):
    def setup(name: str, **extra) -> tuple[list[dict], dict]:
        nodes = [{"site": site, "state-dir": str(tmp_path / name / "site-state")} for site in ("site_0", "site_1")]
        run_config = {"config": "configs/demo.yaml", "overrides": STATEFUL, "num-sites": 2, "connect-timeout": 5}
        return nodes, {**run_config, "output-dir": str(tmp_path / name / "server"), **extra}

    serve(LocalGrid(*setup("uninterrupted")), setup("uninterrupted")[1])
    nodes, run_config = setup("resumed")
    with pytest.raises(ServerStopped):
        serve(StoppedGrid(nodes, run_config, stop_round=4), run_config)
    last = tmp_path / "resumed" / "server" / "checkpoints" / "last.ckpt"
    federation_id = load_checkpoint(last)["executor"]["federation_id"]
    assert load_checkpoint(last)["round"] == 2
    state_dir = tmp_path / "resumed" / "site-state"
    site_states = [SiteStateStore(state_dir, federation_id, site) for site in ("site_0", "site_1")]
    # Round 2: the server's checkpoint; round 3: trained, evaluated but not checkpointed; round 4: a future.
    assert all(states.saved_rounds() == [2, 3, 4] for states in site_states)

    # Restarted SuperNodes: new contexts (empty memory), the same state folders; the same run config, from last.
    serve(LocalGrid(nodes, {**run_config, "ckpt-path": "last"}), {**run_config, "ckpt-path": "last"})
    resumed = load_checkpoint(last)
    uninterrupted = load_checkpoint(tmp_path / "uninterrupted" / "server" / "checkpoints" / "last.ckpt")
    assert resumed["round"] == uninterrupted["round"] == 4 and resumed["executor"] == {"federation_id": federation_id}
    assert resumed["global_state"].keys() == uninterrupted["global_state"].keys()
    for key, value in uninterrupted["global_state"].items():
        torch.testing.assert_close(resumed["global_state"][key], value, rtol=0, atol=0, msg=key)
    assert resumed["history"] == uninterrupted["history"] and resumed["best_round"] == uninterrupted["best_round"]
    for name in ("metrics.csv", "summary.json"):
        assert (tmp_path / "resumed" / "server" / name).read_bytes() == (
            tmp_path / "uninterrupted" / "server" / name
        ).read_bytes(), name
    assert all(states.saved_rounds() == [2, 3, 4] for states in site_states)  # disk use stays constant


def test_new_federation_ids_are_distinct_hex():
    ids = {new_federation_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(value) == 32 and int(value, 16) >= 0 for value in ids)
