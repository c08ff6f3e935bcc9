"""A site decides what it runs: configuration files only from the app's configs/, an allowlist of the run's
overrides, local DP no weaker than the site's own, and error replies that keep the site's files, folder listings and
CSV cells in the site's log. Each test plays a server's attack, through the ClientApp where the reply matters."""

from __future__ import annotations

import logging
import re

import pytest
import torch

flwr = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from test_flower import run_flower  # tests/test_flower.py's in-process Flower run (its LocalGrid)

from harmofl.flower import app, wire
from harmofl.flower.site_policy import (
    RefusedRequest,
    config_paths,
    effective_local_dp,
    error_reason,
    site_overrides,
)

from helpers import FLOWER_TINY

SECRET = "PATIENT-4711-SECRET"
CORRELATION_ID = re.compile(r"correlation id ([0-9a-f]{8})")


def reason(reply: Message) -> str:
    assert reply.has_error()
    return str(reply.error.reason)


def ask_site(run_config: dict, node_config: dict) -> Message:
    """The site's reply to the server's `query` (the first message of a run), as flwr-clientapp runs it."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    message = Message(RecordDict(), dst_node_id=1, message_type="query", group_id="setup")
    context = Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config=run_config)
    TaskIdentity.node_id = 1
    try:
        return app.client_app(message, context)
    finally:
        TaskIdentity.node_id = 0


def test_config_files_come_only_from_the_apps_configs_folder(tmp_path):
    secret = tmp_path / "secret.yaml"
    secret.write_text(f"trainer:\n  rounds: {SECRET}\n")
    bundle = tmp_path / "app"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "link.yaml").symlink_to(secret)  # inside configs/ by name, outside once resolved
    (bundle / "configs" / "notes.txt").write_text(SECRET)
    (bundle / "configs" / "ok.yml").write_text("seed_everything: 1\n")
    for entry in (str(secret), "../secret.yaml", "configs/../../secret.yaml", "configs/link.yaml", "configs/notes.txt"):
        with pytest.raises(RefusedRequest, match=re.escape(f"entry {entry!r} is refused")) as refused:
            config_paths(f"configs/ok.yml, {entry}", bundle)
        assert SECRET not in str(refused.value)
    assert config_paths("configs/ok.yml", bundle) == [(bundle / "configs" / "ok.yml").resolve()]
    with pytest.raises(RefusedRequest, match="entry 'README.md' is refused"):  # a text file of the real app
        app.configuration_args({"config": "README.md"}, [])
    with pytest.raises(RefusedRequest, match="'configs/missing.yaml' does not exist"):
        config_paths("configs/missing.yaml", bundle)

    # Through the ClientApp: the reply names the entry, never the file's contents.
    reply = ask_site({"config": str(secret)}, {"site": "site_0"})
    assert reason(reply).startswith("RefusedRequest: Run config `config` entry") and SECRET not in reason(reply)


def test_a_data_error_reaches_only_the_sites_log(tmp_path, caplog):
    site = tmp_path / "sites" / "site_0"
    site.mkdir(parents=True)
    (site / f"{SECRET}.png").write_bytes(b"not an image")
    (site / "labels.csv").write_text(f"image,label,split\n{SECRET}.png,0,{SECRET}-split\n")
    run_config = {"config": "configs/site_folders.yaml", "overrides": "trainer.rounds=1"}
    with caplog.at_level(logging.ERROR, logger="harmofl.flower.site"):
        reply = ask_site(run_config, {"site": "site_0", "data-path": str(tmp_path / "sites")})
    assert re.fullmatch(r"DataError \(correlation id [0-9a-f]{8}; details in the site's log\)", reason(reply))
    # The site's log has the details (the CSV cell) and the traceback under the same correlation id.
    (record,) = [r for r in caplog.records if r.name == "harmofl.flower.site"]
    assert CORRELATION_ID.findall(record.getMessage()) == CORRELATION_ID.findall(reason(reply))
    assert record.exc_info and SECRET in str(record.exc_info[1])


def test_an_unknown_site_is_refused_without_listing_the_sites_data(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="harmofl.flower.site"):
        reply = ask_site({"config": "configs/demo.yaml", "overrides": FLOWER_TINY}, {"site": "site_7"})
    assert reason(reply).startswith("RefusedRequest: This node serves site 'site_7', which the run's data")
    assert "site_0" not in reason(reply) and "['site_0', 'site_1']" in caplog.text


@pytest.mark.parametrize(
    "override",
    [
        "model.class_path=harmofl.SegmentationClient",
        "data.init_args.root=/etc",
        "data.init_args.cache_dir=/tmp/elsewhere",
        "model.init_args.weights_path=/etc/passwd",
        "model.init_args.backbone_kwargs={checkpoint_path: /etc/passwd}",
        "model.init_args.optimizer=torch.optim.Adam",
        "trainer.callbacks=[callbacks.Scaffold]",
        "trainer.logger=lightning.pytorch.loggers.CSVLogger",
        "trainer.default_root_dir=/",
        "data=harmofl.data.SiteFolders",
    ],
)
def test_overrides_beyond_training_hyperparameters_are_refused(override):
    key = override.split("=", 1)[0]
    with pytest.raises(RefusedRequest, match=re.escape(f"overrides of ['{key}']")):
        site_overrides(["trainer.rounds=2", override])


def test_a_refused_override_stops_the_site_and_names_the_keys():
    overrides = f"{FLOWER_TINY} data.init_args.root=/etc trainer.logger=x"
    refused = reason(ask_site({"config": "configs/demo.yaml", "overrides": overrides}, {"site": "site_0"}))
    assert "RefusedRequest: This site does not accept the run config's overrides of" in refused
    assert "['data.init_args.root', 'trainer.logger']" in refused


def test_allowed_overrides_apply_and_server_only_ones_are_left_to_the_server():
    items = [*FLOWER_TINY.split(), "trainer.server_optimizer=harmofl.server_optimizers.FedAvgM", "trainer.seed=3"]
    assert site_overrides(items) == [*FLOWER_TINY.split(), "trainer.seed=3"]
    extra = ["model.init_args.num_classes=3", "data.init_args.fractions=[0.5,0.25,0.25]"]
    with pytest.raises(RefusedRequest, match=re.escape("['model.init_args.num_classes', 'data.init_args.fractions']")):
        site_overrides(extra)
    assert site_overrides(extra, "model.init_args.num_classes, data.init_args.frac*") == extra


def test_error_replies_name_the_class_and_pass_only_refusals_through():
    leaked = OSError(f"cannot read /data/{SECRET}.png: listing {SECRET}-a, {SECRET}-b")
    assert error_reason(leaked, "3f2a0b1c") == "OSError (correlation id 3f2a0b1c; details in the site's log)"
    refused = error_reason(RefusedRequest("setting x is refused"), "3f2a0b1c")
    assert refused == "RefusedRequest: setting x is refused (correlation id 3f2a0b1c)"


def dp(clip: float, epsilon: float, delta: float, sensitivity: float | None = None) -> dict:
    settings = {"local-dp-clipping-norm": clip, "local-dp-epsilon": epsilon, "local-dp-delta": delta}
    return settings if sensitivity is None else {**settings, "local-dp-sensitivity": sensitivity}


def test_local_dp_is_the_stricter_of_the_runs_and_the_sites():
    assert effective_local_dp({}, {}) is None
    assert effective_local_dp({"local-dp-clipping-norm": 0}, {}) is None
    site = dp(0.5, 2.0, 1e-6)
    only_site = effective_local_dp({}, site)  # the run has DP off: the site's own applies
    assert only_site and (only_site.clipping_norm, only_site.sensitivity, only_site.epsilon) == (0.5, 0.5, 2.0)
    looser = effective_local_dp(dp(10.0, 50.0, 1e-2), site)
    assert looser and (looser.clipping_norm, looser.epsilon, looser.delta) == (0.5, 2.0, 1e-6)
    mixed = effective_local_dp(dp(0.1, 8.0, 1e-7, sensitivity=0.2), site)  # stricter clip and delta from the run
    assert mixed and (mixed.clipping_norm, mixed.sensitivity, mixed.epsilon, mixed.delta) == (0.1, 0.2, 2.0, 1e-7)
    small_sensitivity = effective_local_dp(dp(10.0, 50.0, 1e-2, sensitivity=1e-9), site)
    assert small_sensitivity and small_sensitivity.sensitivity == 0.5  # never below the clipping norm
    with pytest.raises(RefusedRequest, match=r"run config sets local-dp-clipping-norm but not \['local-dp-delta'\]"):
        effective_local_dp({"local-dp-clipping-norm": 1.0, "local-dp-epsilon": 1.0}, site)
    with pytest.raises(RefusedRequest, match="epsilon > 0 and 0 < delta < 1"):
        effective_local_dp({}, dp(1.0, 1.0, 1.5))


def update_distances(grid) -> dict[int, float]:
    """The L2 distance of each node's training reply from the weights it was sent."""
    distances = {}
    for message, reply in grid.traffic:
        if message.metadata.message_type == "train":
            sent, received = wire.read_weights(message.content), wire.read_weights(reply.content)
            squares = torch.stack([((received[k].double() - sent[k].double()) ** 2).sum() for k in sent])
            distances[message.metadata.dst_node_id] = float(squares.sum().sqrt())
    return distances


@pytest.mark.parametrize("run_dp", [{}, dp(1e3, 1e13, 1e-2)], ids=["run-dp-off", "run-dp-looser"])
def test_a_sites_local_dp_holds_whatever_the_run_says(tmp_path, run_dp):
    clip = 0.05  # a huge epsilon: (almost) no noise, so the clipping shows exactly
    sites = ({"site": "site_0", **dp(clip, 1e12, 1e-5)}, "site_1")
    grid = run_flower(tmp_path, FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=1"), sites=sites, **run_dp)
    distances = update_distances(grid)
    assert distances[1] <= clip * (1 + 1e-4)
    assert distances[2] > clip  # site_1 asked for nothing: the run's setting (or none) applies


def test_the_nodes_cache_dir_replaces_the_configs(tmp_path):
    reply = ask_site(
        {"config": "configs/demo.yaml", "overrides": FLOWER_TINY}, {"site": "site_0", "cache-dir": str(tmp_path)}
    )
    assert not reply.has_error(), reason(reply)
    assert any(path.is_file() for path in tmp_path.rglob("*"))  # the demo's generated splits, in the node's cache
