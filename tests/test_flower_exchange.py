"""One exchange per round on Flower: a round's evaluation carries the next round's training (a combined ``train``
message), sites that do not train then get an ``evaluate`` message in the same exchange, and the trainer's results
stay those of the in-process run. What the combined instruction holds, what a site refuses, what a failed half of a
combined reply does, and when the server sends the training apart."""

from __future__ import annotations

import types

import pytest
import torch

pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_flower import SERVER_NODE, LocalGrid, run_flower, run_in_process

from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build
from harmofl.federation.callback import FederatedCallback
from harmofl.flower import FlowerExecutor, app, wire
from harmofl.flower.executor import PrefetchedTraining
from harmofl.flower.site_policy import RefusedRequest
from harmofl.flower.site_store import SiteStateStore

from helpers import FLOWER_TINY

FEDERATION = "0123456789abcdef0123456789abcdef"


# -- the combined instruction ---------------------------------------------------------------------------------------


def test_a_combined_instruction_encodes_and_decodes():
    broadcast = wire.broadcast_records({"w": torch.ones(2)}, {})
    combined = wire.train_instruction(broadcast, 3, 7, ["AmplitudeHarmonization"], FEDERATION, ("val", "test"))
    plain = wire.train_instruction(broadcast, 3, 7, [], FEDERATION)
    assert wire.read_train_instruction(combined.config_records[wire.CONFIG]) == wire.TrainInstruction(
        3, 7, ["AmplitudeHarmonization"], ("val", "test")
    )
    assert wire.read_train_instruction(plain.config_records[wire.CONFIG]) == wire.TrainInstruction(3, 7, [], ())
    assert torch.equal(wire.read_weights(combined)["w"], torch.ones(2))


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"splits": "val,train"}, "splits='val,train'"),
        ({"splits": 3}, "splits=3"),
        ({"round": "2"}, "round='2'"),
        ({"seed": -1}, "seed=-1"),
        ({"round": True}, "round=True"),
        ({"client-states": 1}, "client-states=1"),
    ],
)
def test_a_malformed_instruction_is_refused_naming_the_entry(change, named):
    config = wire.train_instruction({}, 1, 0, [], FEDERATION, ("val",)).config_records[wire.CONFIG]
    config.update(change)
    with pytest.raises(RefusedRequest, match=f"train instruction is malformed: {named}"):
        wire.read_train_instruction(config)


def test_a_site_refuses_a_malformed_combined_message_and_writes_nothing(tmp_path):
    grid = LocalGrid(
        [{"site": "site_0", "state-dir": str(tmp_path)}], {"config": "configs/demo.yaml", "overrides": FLOWER_TINY}
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    content = wire.train_instruction(wire.broadcast_records({}, {}), 1, 0, [], FEDERATION, ("val",))
    content.config_records[wire.CONFIG]["splits"] = "val,train"  # the training split's metrics are not the server's
    [reply] = grid.send_and_receive([Message(content, dst_node_id=1, message_type="train", group_id="round-2")])
    assert reply.error.reason.startswith("RefusedRequest: The server's train instruction is malformed: splits=")
    assert list(tmp_path.iterdir()) == []


def test_the_fingerprint_is_of_content_not_storage():
    base = torch.arange(6.0).reshape(2, 3)
    state = {"a": base[0], "b": {"frozen": True, "target": base.T}}
    same = {"a": torch.tensor([0.0, 1.0, 2.0]), "b": {"frozen": True, "target": base.T.contiguous()}}
    assert wire.fingerprint(state) == wire.fingerprint(same)
    for other in (
        {**same, "a": torch.tensor([0.0, 1.0, 2.5])},
        {**same, "a": same["a"].double()},
        {**same, "b": {"frozen": False, "target": base.T}},
        {"b": same["b"], "a": same["a"]},  # the order of keys is part of a message
    ):
        assert wire.fingerprint(other) != wire.fingerprint(state)


def test_a_site_keeps_the_state_a_resume_needs_while_the_server_checkpoints_late(tmp_path):
    states = SiteStateStore(tmp_path, FEDERATION, "site_0")
    for round_number in (1, 2, 3):
        states.save(round_number, {"record": {}, "callbacks": {}})
    states.save(5, {"record": {}, "callbacks": {}})  # a future the server rolled back
    # Round 3 evaluated and round 4 trained in one message: the server's checkpoint is of round 2 until it is in.
    states.prune(2, newest=3)
    assert states.saved_rounds() == [2, 3]


# -- through the trainer --------------------------------------------------------------------------------------------


def exchanges(grid: LocalGrid) -> list[tuple[str, str, int]]:
    return [(m.metadata.message_type, m.metadata.group_id, m.metadata.dst_node_id) for m, _ in grid.traffic]


def test_evaluating_every_second_round_through_flower_equals_the_in_process_run(tmp_path):
    # 3 rounds: round 1 trains only, round 2 is evaluated with round 3's training, round 3 evaluated alone.
    overrides = FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=3") + " trainer.evaluate_every_n_rounds=2"
    grid = run_flower(tmp_path, overrides, **{"combined-exchange": True})
    groups = [(kind, group) for kind, group, _ in exchanges(grid)[2::2]]
    assert groups == [("train", "round-1"), ("train", "round-2"), ("train", "round-3"), ("evaluate", "evaluate-3")]
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    simulated = load_checkpoint(run_in_process(tmp_path, overrides) / "checkpoints" / "last.ckpt")
    assert flower["history"] == simulated["history"] and flower["best_round"] == simulated["best_round"]
    assert {row["split"] for row in flower["history"] if row["round"] == 1} == {"train"}


# -- when the training goes apart -----------------------------------------------------------------------------------


class Changing(FederatedCallback):
    changes_state_between_rounds = True


def bound_executor(callbacks: list, round_idx: int = 0) -> FlowerExecutor:
    """An executor bound to the parts of a trainer it reads to prefetch a round."""
    executor = FlowerExecutor(LocalGrid([], {}), 1, 0, None)
    federation = types.SimpleNamespace(participants=lambda r: ["site_0", "site_1"])
    executor.trainer = types.SimpleNamespace(  # type: ignore[assignment]
        federated_callbacks=callbacks, rounds=3, current_round=round_idx, federation=federation
    )
    return executor


def test_a_callback_that_changes_its_state_between_rounds_gets_its_training_apart():
    assert bound_executor([FederatedCallback()])._next_trainees() == ["site_0", "site_1"]
    assert bound_executor([FederatedCallback(), Changing()])._next_trainees() == []
    assert bound_executor([FederatedCallback()], round_idx=2)._next_trainees() == []  # after the last round


def test_an_instruction_that_changed_since_it_was_sent_is_sent_again():
    class Counter(FederatedCallback):
        def __init__(self) -> None:
            self.count = 0

        def state_dict(self):
            return {"count": self.count}

    counter = Counter()
    executor = bound_executor([counter])
    shared = {"w": torch.ones(2)}
    sent = executor._instruction_fingerprint(1, ["site_0"], shared, [])
    executor.prefetched = PrefetchedTraining(1, sent, {"site_0": "received"})
    assert executor._take_prefetched(1, ["site_0"], {"w": torch.ones(2)}, []) == {"site_0": "received"}
    assert executor.prefetched is None  # used once

    executor.prefetched = PrefetchedTraining(1, sent, {"site_0": "received"})
    counter.count = 1  # changed in on_round_end / on_round_start, undeclared
    with pytest.warns(UserWarning, match="Round 2's training instruction changed after it was sent"):
        assert executor._take_prefetched(1, ["site_0"], shared, []) is None
    executor.prefetched = PrefetchedTraining(1, sent, {"site_0": "received"})
    assert executor._take_prefetched(2, ["site_0"], shared, []) is None  # another round's


def test_a_training_failure_at_the_site_comes_back_with_the_evaluation(tmp_path, monkeypatch, caplog):
    from harmofl.flower.site import FlowerSite

    def failing_train(self, *args, **kwargs):
        raise OSError(f"disk read failed at {tmp_path}")  # a detail that stays in the site's log

    monkeypatch.setattr(FlowerSite, "train", failing_train)
    run_config = {"config": "configs/demo.yaml", "overrides": FLOWER_TINY}
    grid = LocalGrid([{"site": "site_0", "state-dir": str(tmp_path)}], run_config)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    model = build(app.configuration_args(run_config, ["trainer.enable_progress_bar=false"])).model
    content = wire.train_instruction(wire.broadcast_records(model.state_dict(), {}), 1, 0, [], FEDERATION, ("val",))
    [reply] = grid.send_and_receive([Message(content, dst_node_id=1, message_type="train", group_id="round-2")])
    assert not reply.has_error() and set(reply.content) == {wire.EVALUATION, wire.TRAIN_ERROR}
    assert set(wire.read_evaluation(reply.content, wire.EVALUATION)) == {"val"}
    reason = reply.content.config_records[wire.TRAIN_ERROR]["reason"]
    assert reason.startswith("OSError (correlation id") and str(tmp_path) not in reason
    assert str(tmp_path) in caplog.text


def test_local_dp_noises_an_update_and_passes_a_failed_training_untouched():
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    content = wire.train_instruction(wire.broadcast_records({"w": torch.zeros(4)}, {}), 1, 0, [], FEDERATION, ("val",))
    message = Message(content, dst_node_id=1, message_type="train", group_id="round-2")
    dp = {"local-dp-clipping-norm": 0.1, "local-dp-epsilon": 1e12, "local-dp-delta": 1e-5}  # no noise to speak of
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config=dp)
    evaluation = {"val": {"accuracy": 0.5}}
    TaskIdentity.node_id = 1
    try:
        failed = wire.failed_training_reply(evaluation, "OSError (correlation id 0badc0de; details in ...)")
        reply = app.local_dp(message, context, lambda m, c: Message(failed, reply_to=m))
        assert not reply.has_error() and set(reply.content) == {wire.EVALUATION, wire.TRAIN_ERROR}
        update = wire.train_reply({"w": torch.full((4,), 3.0)}, 0.1, 1, {}, evaluation)
        reply = app.local_dp(message, context, lambda m, c: Message(update, reply_to=m))
    finally:
        TaskIdentity.node_id = SERVER_NODE
    assert float(wire.read_weights(reply.content)["w"].norm()) == pytest.approx(0.1, rel=1e-4)  # clipped
    assert wire.read_evaluation(reply.content, wire.EVALUATION) == evaluation
