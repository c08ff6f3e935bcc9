"""The Flower apps driven in one process through a local Grid (no network): the same results as the in-process
orchestrator, exactly what crosses the network, failures, local DP, configuration errors. The deployment runtime
on loopback is tested in tests/test_flower_deployment.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from flwr.app import Context, Error, Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build
from harmofl.flower import FlowerExecutor, app, wire
from harmofl.flower.site_policy import RefusedRequest
from harmofl.flower.site_store import SiteStateStore
from harmofl.reporting import read_metrics_csv

from helpers import FLOWER_TINY

SERVER_NODE = 0
NO_REPLY = "no reply"  # a LocalGrid failure that drops the reply, as a site that never answers


class LocalGrid(Grid):
    """A Flower Grid that hands each message to the ClientApp of its node, in this process, and records every
    message and reply: the network of a deployment, without the network."""

    def __init__(self, node_configs: list[dict], run_config: dict, fail: dict | None = None, tamper=None) -> None:
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config=run_config)
            for node, config in enumerate(node_configs, start=1)
        }
        self.fail = {} if fail is None else fail  # (message type, group id, node) -> the error its reply carries
        self.tamper = tamper  # rewrites a site's reply in place, as a hostile site would (tests/test_flower_replies.py)
        self.traffic: list[tuple[Message, Message]] = []
        self.replies: dict[str, Message] = {}  # by the id of the message they answer, until pulled

    def set_run(self, run):
        pass

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, *args, **kwargs):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Each message's id (given as Flower's grid gives it); its node answers it now, the reply waits for a pull."""
        message_ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = message.object_id  # as Flower's grid does when it pushes
            message_ids.append(message.metadata.message_id)
            reply = self.deliver(message)
            if reply is not None:
                self.traffic.append((message, reply))
                self.replies[message.metadata.message_id] = reply
        return message_ids

    def pull_messages(self, message_ids):
        return [self.replies.pop(message_id) for message_id in list(message_ids) if message_id in self.replies]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def deliver(self, message: Message) -> Message | None:
        """The reply of the message's node (None: the reply is lost)."""
        node = message.metadata.dst_node_id
        TaskIdentity.node_id = node  # the reply comes from the node
        try:
            failure = self.fail.get((message.metadata.message_type, message.metadata.group_id, node))
            if failure == NO_REPLY:
                return None
            if failure:
                return Message(Error(code=0, reason=failure), reply_to=message)
            reply = app.client_app(message, self.contexts[node])
            if self.tamper:
                self.tamper(reply)
            return reply
        except Exception as error:  # as flwr-clientapp does: the exception becomes the reply's error
            return Message(Error(code=0, reason=f"{type(error)}:<'{error}'>"), reply_to=message)
        finally:
            TaskIdentity.node_id = SERVER_NODE


def run_flower(
    tmp_path: Path, overrides: str = FLOWER_TINY, sites=("site_0", "site_1"), fail=None, tamper=None, **run_config
) -> LocalGrid:
    run_config = {
        "config": "configs/demo.yaml",
        "overrides": overrides,
        "num-sites": len(sites),
        "output-dir": str(tmp_path / "flower"),
        "connect-timeout": 5,
        **run_config,
    }
    state_dir = {"state-dir": str(tmp_path / "site-state")}  # each site's own disk, in the test's folder
    node_configs = [{**state_dir, **(site if isinstance(site, dict) else {"site": site})} for site in sites]
    grid = LocalGrid(node_configs, run_config, fail, tamper)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SERVER_NODE, 1
    app.run_server(
        grid, Context(run_id=1, node_id=SERVER_NODE, node_config={}, state=RecordDict(), run_config=run_config)
    )
    return grid


def sent_to(grid: LocalGrid, node: int) -> list[tuple[str, str]]:
    """The type and group of every message node ``node`` answered, in order."""
    return [(m.metadata.message_type, m.metadata.group_id) for m, _ in grid.traffic if m.metadata.dst_node_id == node]


def run_in_process(tmp_path: Path, overrides: str = FLOWER_TINY) -> Path:
    run_config = {"config": "configs/demo.yaml", "overrides": overrides}
    folder = tmp_path / "in_process"
    cli = build(
        app.configuration_args(run_config, [f"trainer.default_root_dir={folder}", "trainer.enable_progress_bar=false"])
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    return folder


def test_flower_run_equals_the_in_process_run(tmp_path):
    # FedBN-style local norms on top of HarmoFL: local keys and the amplitude target are both exercised.
    overrides = FLOWER_TINY + " trainer.local_modules=[norm]"
    run_flower(tmp_path, overrides)
    reference = run_in_process(tmp_path, overrides)
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    simulated = load_checkpoint(reference / "checkpoints" / "last.ckpt")
    assert flower["global_state"].keys() == simulated["global_state"].keys()
    for key, value in simulated["global_state"].items():
        torch.testing.assert_close(flower["global_state"][key], value, rtol=0, atol=0, msg=key)
    assert flower["history"] == simulated["history"]
    harmonization = flower["callbacks"]["AmplitudeHarmonization"]
    assert harmonization["frozen"]
    torch.testing.assert_close(
        harmonization["shared_target"], simulated["callbacks"]["AmplitudeHarmonization"]["shared_target"]
    )
    assert flower["best_round"] == simulated["best_round"]
    assert (tmp_path / "flower" / "summary.json").is_file()
    assert "local_modules:\n  - norm" in (tmp_path / "flower" / "config.yaml").read_text()
    assert read_metrics_csv(tmp_path / "flower" / "metrics.csv") == read_metrics_csv(reference / "metrics.csv")


def test_held_out_site_sampling_and_server_momentum_as_in_process(tmp_path):
    # 3 sites of different sizes, one held out (evaluates only), 1 of the other 2 sampled per round, weights by
    # data size, server momentum, harmonization target shared every round.
    overrides = (
        FLOWER_TINY.replace("data.init_args.num_sites=2", "data.init_args.num_sites=3")
        + " trainer.held_out_clients=[site_2] trainer.clients_per_round=1 trainer.client_weighting=samples"
        " trainer.server_optimizer=harmofl.server_optimizers.FedAvgM"
        " trainer.callbacks.init_args.share_target=every_round"
    )
    grid = run_flower(tmp_path, overrides, sites=("site_0", "site_1", "site_2"))
    trained = {
        (message.metadata.group_id, message.metadata.dst_node_id)
        for message, _ in grid.traffic
        if message.metadata.message_type == "train"
    }
    assert len(trained) == 2 and all(node != 3 for _, node in trained)
    # Round 1's evaluation: the sites that do not train in round 2 (the held-out one too) evaluate alone, in the
    # same exchange as round 2's training, which carries the participant's evaluation.
    [(_, second)] = [(group, node) for group, node in trained if group == "round-2"]
    evaluate_one = {m.metadata.dst_node_id for m, _ in grid.traffic if m.metadata.group_id == "evaluate-1"}
    assert evaluate_one == {1, 2, 3} - {second}
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    simulated = load_checkpoint(run_in_process(tmp_path, overrides) / "checkpoints" / "last.ckpt")
    for key, value in simulated["global_state"].items():
        torch.testing.assert_close(flower["global_state"][key], value, rtol=0, atol=0, msg=key)
    assert flower["history"] == simulated["history"]
    torch.testing.assert_close(flower["server_optimizer"], simulated["server_optimizer"], rtol=0, atol=0)


def test_only_shared_weights_and_the_round_one_target_cross_the_network(tmp_path):
    grid = run_flower(tmp_path, FLOWER_TINY + " trainer.local_modules=[norm]")
    cli = build(app.configuration_args(grid.contexts[1].run_config, ["trainer.enable_progress_bar=false"]))
    names = dict(cli.model.named_modules())
    norm_keys = {
        key
        for key in cli.model.state_dict()
        if isinstance(names[key.rsplit(".", 1)[0]], torch.nn.modules.batchnorm._NormBase)
    }
    shared_keys = set(cli.model.state_dict()) - norm_keys
    assert norm_keys and shared_keys
    image_size = 32
    # One exchange per round: round 2's training carries round 1's evaluation; round 2's evaluation comes alone.
    exchanges = [(message.metadata.message_type, message.metadata.group_id) for message, _ in grid.traffic]
    assert (
        exchanges
        == [("query", "setup")] * 2
        + [("train", "round-1")] * 2
        + [("train", "round-2")] * 2
        + [("evaluate", "evaluate-2")] * 2
    )
    for message, reply in grid.traffic:
        kind, group = message.metadata.message_type, message.metadata.group_id
        for content in (message.content, reply.content):
            assert set(content.array_records) <= {wire.ARRAYS}
            if wire.ARRAYS in content.array_records:
                # The weights minus the local (normalization) keys, and nothing of the data's size.
                assert set(wire.read_weights(content)) == shared_keys, kind
        if kind == "query":
            assert reply.content.config_records[wire.SITE][wire.SITE] in ("site_0", "site_1")
            assert set(reply.content.config_records[wire.SITE]) == {wire.SITE, wire.TRAIN_SAMPLES}
        if kind == "train":
            assert set(reply.content.metric_records[wire.METRICS]) == {"loss", "num-steps"}
            combined = group == "round-2"  # with round 1's evaluation, on the splits the message names
            assert message.content.config_records[wire.CONFIG].get("splits") == ("val,test" if combined else None)
            evaluation = reply.content.metric_records.get(wire.EVALUATION)
            assert {key.split("/")[0] for key in evaluation or {}} == ({"val", "test"} if combined else set())
            if group == "round-1":  # the site's amplitude target, round 1 only: the DC window [C, 1, 1]
                states = wire.read_blob(reply.content, wire.CLIENT_STATE)
                assert list(states) == ["AmplitudeHarmonization"]
                assert states["AmplitudeHarmonization"]["target"].shape == (3, 1, 1)
                assert states["AmplitudeHarmonization"]["image_shape"] == [3, image_size, image_size]
            else:
                assert wire.CLIENT_STATE not in reply.content.config_records
        if kind == "evaluate":
            assert set(reply.content.config_records) == set() and set(reply.content.array_records) == set()
            assert {key.split("/")[0] for key in reply.content.metric_records[wire.METRICS]} == {"val", "test"}
    # Every tensor that crossed: a model-sized weight or buffer, or an amplitude map; never a batch of images.
    for message, reply in grid.traffic:
        for content in (message.content, reply.content):
            for name in content.config_records:
                if name in (wire.SERVER_STATE, wire.CLIENT_STATE):
                    for state in wire.read_blob(content, name).values():
                        for value in state.values():
                            assert not isinstance(value, torch.Tensor) or value.dim() == 3


def test_site_state_stays_at_the_site_between_rounds(tmp_path):
    grid = run_flower(tmp_path, FLOWER_TINY + " trainer.local_modules=[norm]")
    federation_id = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")["executor"]["federation_id"]
    for site in ("site_0", "site_1"):  # on the site's disk (tests/test_flower_resume.py), not in the node's memory
        state = SiteStateStore(tmp_path / "site-state", federation_id, site).load(2)
        assert state["record"]["local_state"] and state["record"]["optimizer_state"]["state"]
        assert state["callbacks"]["AmplitudeHarmonization"]["target"].shape == (3, 1, 1)  # the DC window
    assert all(not context.state.config_records for context in grid.contexts.values())


def test_a_failing_site_is_skipped_or_stops_the_run(tmp_path):
    fail = {("train", "round-2", 2): "OSError: disk read failed"}
    grid = run_flower(tmp_path, FLOWER_TINY + " trainer.client_failure=skip", fail=fail)
    checkpoint = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    assert checkpoint["failures"] == [
        {"round": 2, "client": "site_1", "error": "site 'site_1' raised OSError: disk read failed"}
    ]
    # Round 2's global model is site_0's update alone.
    round_two = [
        reply
        for message, reply in grid.traffic
        if message.metadata.group_id == "round-2" and reply.metadata.src_node_id == 1
    ]
    expected = wire.read_weights(round_two[0].content)
    for key, value in expected.items():
        torch.testing.assert_close(checkpoint["global_state"][key], value, rtol=0, atol=0)

    with pytest.raises(RuntimeError, match="Site 'site_1' failed in round 2 .*disk read failed.*client_failure: skip"):
        run_flower(tmp_path / "raise", fail=fail)


def test_a_site_that_does_not_answer_in_time_has_failed(tmp_path, caplog):
    grid = run_flower(
        tmp_path,
        FLOWER_TINY + " trainer.client_failure=skip",
        fail={("train", "round-1", 1): NO_REPLY},
        **{"reply-timeout": 1, "combined-exchange": False},  # two exchanges per round, as asked
    )
    assert sent_to(grid, 2) == [
        ("query", "setup"),
        ("train", "round-1"),
        ("evaluate", "evaluate-1"),
        ("train", "round-2"),
        ("evaluate", "evaluate-2"),
    ]
    checkpoint = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    assert checkpoint["failures"] == [
        {"round": 1, "client": "site_0", "error": "no reply from site 'site_0' within 1.0 s"}
    ]
    assert "Round 2/2: mean val accuracy" in caplog.text and "1 site failures so far" in caplog.text


def test_a_retried_site_gives_the_fault_free_run(tmp_path):
    run_flower(tmp_path / "clean")

    class FlakyOnce(dict):
        def get(self, key, default=None):  # the first train message of round 2 to node 2 fails, its retry works
            if key == ("train", "round-2", 2) and not self.get_called:
                self.get_called = True
                return "ConnectionError: node restarted"
            return default

    flaky = FlakyOnce()
    flaky.get_called = False
    grid = run_flower(tmp_path / "flaky", FLOWER_TINY + " trainer.client_retries=1", fail=flaky)
    # Round 2's training came with round 1's evaluation, and the whole message failed: the site is asked to evaluate
    # alone (in the same round), then its training is retried with a plain train message.
    assert sent_to(grid, 2)[2:] == [
        ("train", "round-2"),
        ("evaluate", "evaluate-1"),
        ("train", "round-2"),
        ("evaluate", "evaluate-2"),
    ]

    def fail_training_once(reply):
        # site_1's round-2 training fails at the site after its evaluation of round 1: the site's reply keeps it
        if reply.metadata.group_id == "round-2" and reply.metadata.src_node_id == 2 and not failed:
            failed.append(reply)
            evaluation = wire.read_evaluation(reply.content, wire.EVALUATION)
            for name in list(reply.content):
                del reply.content[name]
            reply.content.update(wire.failed_training_reply(evaluation, "OSError (correlation id 0badc0de; ...)"))

    failed: list[Message] = []
    grid = run_flower(tmp_path / "failed", FLOWER_TINY + " trainer.client_retries=1", tamper=fail_training_once)
    assert sent_to(grid, 2)[2:] == [("train", "round-2"), ("train", "round-2"), ("evaluate", "evaluate-2")]
    retry = [m for m, _ in grid.traffic if m.metadata.dst_node_id == 2][3]
    assert "splits" not in retry.content.config_records[wire.CONFIG]  # a plain train message

    clean = load_checkpoint(tmp_path / "clean" / "flower" / "checkpoints" / "last.ckpt")
    for folder in ("flaky", "failed"):
        retried = load_checkpoint(tmp_path / folder / "flower" / "checkpoints" / "last.ckpt")
        for key, value in clean["global_state"].items():
            torch.testing.assert_close(retried["global_state"][key], value, rtol=0, atol=0)
        assert retried["history"] == clean["history"] and retried["failures"] == []


def test_local_dp_clips_each_site_update(tmp_path):
    clip = 0.05
    # A huge epsilon: (almost) no noise, so the clipping shows exactly.
    grid = run_flower(
        tmp_path,
        FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=1"),
        **{"local-dp-clipping-norm": clip, "local-dp-epsilon": 1e12, "local-dp-delta": 1e-5},
    )
    for message, reply in grid.traffic:
        if message.metadata.message_type == "train":
            sent = message.content.array_records[wire.ARRAYS].to_torch_state_dict()
            received = reply.content.array_records[wire.ARRAYS].to_torch_state_dict()
            distance = torch.sqrt(sum(((received[k].double() - sent[k].double()) ** 2).sum() for k in sent))
            assert distance <= clip * (1 + 1e-4)


def test_configuration_errors_name_the_setting(tmp_path):
    with pytest.raises(ValueError, match="needs `config`"):
        app.configuration_args({"overrides": ""}, [])
    with pytest.raises(RefusedRequest, match="configs/missing.yaml"):
        app.configuration_args({"config": "configs/missing.yaml"}, [])
    with pytest.raises(ValueError, match="key=value"):
        app.configuration_args({"config": "configs/demo.yaml", "overrides": "--trainer.rounds 2"}, [])
    with pytest.raises(RuntimeError, match="could not describe its site.*site_7"):
        run_flower(tmp_path, sites=("site_0", "site_7"))
    # The demo has no root: the server learns the error's class, the site's log has jsonargparse's text.
    with pytest.raises(RuntimeError, match=r"could not describe its site.*ArgumentError \(correlation id"):
        run_flower(tmp_path, sites=({"site": "site_0", "data-path": str(tmp_path)}, "site_1"))
    with pytest.raises(ValueError, match="both serve site 'site_0'"):
        run_flower(tmp_path, sites=("site_0", "site_0"))
    with pytest.raises(TimeoutError, match="2 of num-sites=3 SuperNodes"):
        run_flower(tmp_path, **{"num-sites": 3, "connect-timeout": 0})
    with pytest.raises(ValueError, match=r"Callbacks \['Scaffold'\] keep per-client state"):
        run_flower(tmp_path, config="configs/demo.yaml,configs/strategies/scaffold.yaml")
    with pytest.raises(ValueError, match="pool_clients"):
        run_flower(tmp_path, FLOWER_TINY + " trainer.pool_clients=true")
    with pytest.raises(RuntimeError, match="needs a Flower grid"):
        FlowerExecutor(None, 1, 0, None)


def test_wire_refuses_pickled_code():
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    import pickle

    with pytest.raises(pickle.UnpicklingError):
        wire.from_bytes(wire.to_bytes({"x": Payload()}))
