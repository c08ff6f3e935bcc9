"""The server's guarded reader of the sites' replies (harmofl/flower/replies.py): each hostile or broken reply a
site can send is refused with a reason naming the site and the problem, and ``trainer.client_failure`` applies to
it. Pure checks first, then the Flower apps in process (tests/test_flower.py's LocalGrid), a site tampering its
replies as a hostile site would."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import DataLoader

flwr = pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")

from flwr.app import ConfigRecord, MetricRecord, RecordDict
from test_flower import run_flower

from harmofl.clients.segmentation import SegmentationClient
from harmofl.federation.runner import batches_per_epoch, local_step_count
from harmofl.flower import wire
from harmofl.flower.replies import (
    RefusedReply,
    SiteRoster,
    parse_counts,
    read_description,
    read_evaluation_reply,
    read_train_reply,
)

from helpers import FLOWER_TINY

ONE_ROUND = FLOWER_TINY.replace("trainer.rounds=2", "trainer.rounds=1")
STATE = {"conv.weight": torch.ones(2, 3), "bn.num_batches_tracked": torch.tensor(4)}
EXPECTED_METRICS = {"val": ["accuracy", "auroc"], "test": ["accuracy", "auroc"]}


def train_reply(num_steps=4, loss=0.5, states=None) -> RecordDict:
    return wire.train_reply(STATE, loss, num_steps, states or {})


def evaluate_reply(**changes) -> RecordDict:
    results = {split: {"accuracy": 0.75, "auroc": 0.5} for split in ("val", "test")}
    results["val"].update(changes)
    return wire.evaluate_reply(results)


# -- pure checks -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_samples", "batch_size"), [(32, 16), (33, 16), (5, 16), (1, 1)])
def test_the_server_counts_a_sites_batches_as_its_loader_does(num_samples, batch_size):
    loader = DataLoader(range(num_samples), batch_size=batch_size, shuffle=True)
    assert batches_per_epoch(num_samples, batch_size) == len(loader)
    assert local_step_count(len(loader), local_epochs=3, local_steps=None) == 3 * len(loader)
    assert local_step_count(len(loader), local_epochs=3, local_steps=7) == 7
    assert batches_per_epoch(10**12 + 1, 16) == 10**12 // 16 + 1  # exact for any count (integer arithmetic)


def test_a_well_formed_train_reply_is_read():
    received = read_train_reply(train_reply(states={"H": {"target": torch.ones(3)}}), ["H"], expected_steps=4)
    assert received.loss == 0.5 and received.client_states.keys() == {"H"}
    for key, value in STATE.items():
        torch.testing.assert_close(received.state[key], value)


def corrupt_buffers(content):
    content[wire.BUFFERS] = ConfigRecord({"blob": b"\x80\x02not a torch file"})


def buffers_of_strings(content):
    content[wire.BUFFERS] = wire.blob_record({"bn.num_batches_tracked": "4"})


def buffers_not_a_dict(content):
    content[wire.BUFFERS] = wire.blob_record([1, 2])


def buffers_sparse(content):
    content[wire.BUFFERS] = wire.blob_record({"bn.num_batches_tracked": torch.tensor([4]).to_sparse()})


def no_metrics(content):
    del content[wire.METRICS]


def extra_metric(content):
    content[wire.METRICS] = MetricRecord({"loss": 0.5, "num-steps": 4, "round": 9})


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (corrupt_buffers, r"its weights cannot be read \(UnpicklingError"),
        (buffers_of_strings, r"its weights \['bn.num_batches_tracked'\] are not dense CPU tensors"),
        (buffers_not_a_dict, "its weights cannot be read"),
        (buffers_sparse, "not dense CPU tensors"),
        (no_metrics, "it lacks the record 'metrics'"),
        (extra_metric, r"its training metrics are \['loss', 'num-steps', 'round'\]"),
    ],
)
def test_a_malformed_train_reply_is_refused(tamper, reason):
    content = train_reply()
    tamper(content)
    with pytest.raises(RefusedReply, match=reason):
        read_train_reply(content, [], expected_steps=4)


@pytest.mark.parametrize(
    ("reply", "requested", "reason"),
    [
        (train_reply(num_steps=1), [], "it reported 1 local steps, the configuration gives 4"),
        (train_reply(num_steps=10**12), [], "it reported 1000000000000 local steps, the configuration gives 4"),
        (train_reply(loss=math.nan), [], "its loss is nan, not a finite number >= 0"),
        (train_reply(loss=-1.0), [], "its loss is -1.0"),
        (train_reply(), ["H"], "it lacks the record 'client-state'"),
        (train_reply(states={"other": {}}), ["H"], r"lacks the requested callback states \['H'\]"),
    ],
)
def test_a_train_reply_that_breaks_the_configuration_is_refused(reply, requested, reason):
    with pytest.raises(RefusedReply, match=reason):
        read_train_reply(reply, requested, expected_steps=4)


def test_an_evaluation_holds_exactly_the_models_metrics_in_range():
    assert read_evaluation_reply(evaluate_reply(), EXPECTED_METRICS)["val"] == {"accuracy": 0.75, "auroc": 0.5}
    assert read_evaluation_reply(evaluate_reply(loss=2.5), EXPECTED_METRICS)["val"]["loss"] == 2.5  # loss: >= 0
    refused = {
        "its val/accuracy is nan, not a finite number in \\[0, 1\\]": evaluate_reply(accuracy=math.nan),
        "its val/auroc is 1.5, not a finite number in \\[0, 1\\]": evaluate_reply(auroc=1.5),
        "its val/accuracy is -0.1": evaluate_reply(accuracy=-0.1),
        "its val/loss is inf": evaluate_reply(loss=math.inf),
        r"unknown \['round'\]": evaluate_reply(round=0.5),  # would overwrite the history's round field
        r"unknown \['client'\]": evaluate_reply(client=0.5),
        r"missing \['auroc'\]": wire.evaluate_reply(
            {"val": {"accuracy": 0.7}, "test": {"accuracy": 0.7, "auroc": 0.5}}
        ),
        r"evaluated the splits \['test', 'train', 'val'\]": wire.evaluate_reply(
            {split: {"accuracy": 0.5, "auroc": 0.5} for split in ("train", "val", "test")}
        ),
        "'split/name': number entry": RecordDict({wire.METRICS: MetricRecord({"accuracy": 0.5})}),
        "it lacks the record 'metrics'": RecordDict(),
    }
    for reason, reply in refused.items():
        with pytest.raises(RefusedReply, match=reason):
            read_evaluation_reply(reply, EXPECTED_METRICS)


def test_a_distance_metric_the_model_declares_unbounded_may_exceed_one_but_not_go_negative():
    expected = {"val": ["dice", "hd95"], "test": ["dice", "hd95"]}

    def reply(hd95: float) -> RecordDict:
        return wire.evaluate_reply({split: {"dice": 0.8, "hd95": hd95} for split in ("val", "test")})

    unbounded = SegmentationClient.unbounded_metrics
    assert read_evaluation_reply(reply(7.5), expected, unbounded=unbounded)["val"]["hd95"] == 7.5
    with pytest.raises(RefusedReply, match="its val/hd95 is 7.5, not a finite number in"):
        read_evaluation_reply(reply(7.5), expected)  # not declared: a fraction
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(RefusedReply, match="not a finite number >= 0"):
            read_evaluation_reply(reply(bad), expected, unbounded=unbounded)


def description(site, samples) -> RecordDict:
    return RecordDict({wire.SITE: ConfigRecord({wire.SITE: site, wire.TRAIN_SAMPLES: samples})})


def test_a_sites_description_and_its_admission():
    assert read_description(description("site_0", 32)) == ("site_0", 32)
    for site, samples, reason in [("", 3, "site name is ''"), ("a", True, "True, not an int"), ("a", -1, "-1")]:
        with pytest.raises(RefusedReply, match=reason):
            read_description(description(site, samples))
    with pytest.raises(RefusedReply, match="lacks the record 'site'"):
        read_description(RecordDict())

    capped = SiteRoster()
    assert capped.admit("anyone", 48) == 48
    with pytest.raises(
        RefusedReply, match="claims 1000000000000 training samples, more than `max-site-samples`=10000000"
    ):
        capped.admit("site_1", 10**12)
    roster = SiteRoster.from_run_config({"site-names": "site_0, site_1", "site-samples": "site_0=48,site_1=32"})
    assert roster.sites == ("site_0", "site_1") and roster.admit("site_1", 32) == 32
    with pytest.raises(RefusedReply, match="claims 10 training samples, the run config's `site-samples` gives 48"):
        roster.admit("site_0", 10)
    with pytest.raises(RefusedReply, match=r"site 'site_9', which is not among the run config's `site-names`"):
        roster.admit("site_9", 1)
    assert roster.missing(["site_1"]) == ["site_0"]
    assert roster.trusted_claims(counts_matter=True) == []
    assert capped.trusted_claims(counts_matter=False) == [
        "Run config `site-names` is empty: any SuperNode that connects becomes a site. Name them."
    ]
    assert "`site-samples` is empty" in capped.trusted_claims(counts_matter=True)[1]
    with pytest.raises(ValueError, match="exactly the `site-names`"):
        SiteRoster.from_run_config({"site-names": "site_0,site_1", "site-samples": "site_0=48"})
    with pytest.raises(ValueError, match="names a site twice"):
        SiteRoster(sites=("a", "a"))
    for text in ("site_0", "site_0=-3", "site_0=4,site_0=5", "=4"):
        with pytest.raises(ValueError, match="site=count items"):
            parse_counts(text)


# -- the server, sites tampering with their replies ----------------------------------------------------------------


def tampering(message_type: str, node: int, change, group: str | None = None):
    """A LocalGrid hook: node ``node`` rewrites its ``message_type`` replies (of ``group`` only, when given)."""

    def tamper(reply):
        meta = reply.metadata
        if meta.message_type == message_type and meta.src_node_id == node and group in (None, meta.group_id):
            change(reply.content)

    return tamper


def claim_steps(num_steps):
    def change(content):
        content[wire.METRICS] = MetricRecord({"loss": 0.1, "num-steps": num_steps})

    return change


FEDNOVA = ONE_ROUND + " trainer.server_optimizer=harmofl.server_optimizers.FedNova"


def test_fednova_refuses_a_forged_step_count_and_skips_the_site(tmp_path):
    with pytest.raises(RuntimeError, match="Site 'site_1' failed in round 1 .*reported 1 local steps, the config"):
        run_flower(tmp_path / "raise", FEDNOVA, tamper=tampering("train", 2, claim_steps(1)))

    # The operator names the sites and their data: a site is skipped, the run finishes with the other.
    roster = {"site-names": "site_0,site_1", "site-samples": "site_0=32,site_1=32"}
    skip = FEDNOVA + " trainer.client_failure=skip trainer.client_weighting=samples"
    run_flower(tmp_path, skip, tamper=tampering("train", 2, claim_steps(10**12)), **roster)
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["best_round"] == 1 and set(summary["clients"]) == {"site_0", "site_1"}
    assert summary["failures"] == [
        {
            "round": 1,
            "client": "site_1",
            "error": "the server refuses the reply of site 'site_1': it reported 1000000000000 local steps, the "
            "configuration gives 2",
        }
    ]


def test_malformed_replies_are_that_sites_failure(tmp_path):
    # Round 1: site_1 leaves out its amplitude target; round 2: its buffers do not decode. Neither aborts the run.
    tamper_round_one = tampering("train", 2, lambda content: content.pop(wire.CLIENT_STATE), "round-1")
    tamper_round_two = tampering("train", 2, corrupt_buffers, "round-2")

    def tamper(reply):
        tamper_round_one(reply)
        tamper_round_two(reply)

    run_flower(tmp_path, FLOWER_TINY + " trainer.client_failure=skip", tamper=tamper)
    failures = json.loads((tmp_path / "flower" / "summary.json").read_text())["failures"]
    assert [(f["round"], f["client"]) for f in failures] == [(1, "site_1"), (2, "site_1")]
    assert failures[0]["error"].endswith("it lacks the record 'client-state'")
    assert "its weights cannot be read (UnpicklingError" in failures[1]["error"]


def test_a_forged_amplitude_target_is_that_sites_failure(tmp_path):
    # Round 1: site_1 sends a target that would wash out every site's images (1e9 per coefficient).
    def forge(content):
        states = wire.read_blob(content, wire.CLIENT_STATE)
        states["AmplitudeHarmonization"]["target"] = torch.full_like(states["AmplitudeHarmonization"]["target"], 1e9)
        content[wire.CLIENT_STATE] = wire.blob_record(states)

    run_flower(tmp_path, ONE_ROUND + " trainer.client_failure=skip", tamper=tampering("train", 2, forge))
    failures = json.loads((tmp_path / "flower" / "summary.json").read_text())["failures"]
    assert [(f["round"], f["client"]) for f in failures] == [(1, "site_1")]
    assert "the amplitude target of client 'site_1' is refused" in failures[0]["error"]
    checkpoint = torch.load(tmp_path / "flower" / "checkpoints" / "last.ckpt", weights_only=True)
    shared = checkpoint["callbacks"]["AmplitudeHarmonization"]["shared_target"]
    assert float(shared.max()) < 1e4  # site_0's own target alone: 32x32 images in [0, 1] have DC <= 1024


def test_a_site_that_claims_huge_data_or_an_unknown_name_is_refused_at_connect(tmp_path):
    def claim(samples):
        def change(content):
            content[wire.SITE] = ConfigRecord({wire.SITE: "site_1", wire.TRAIN_SAMPLES: samples})

        return change

    huge = tampering("query", 2, claim(10**12))
    with pytest.raises(ValueError, match="SuperNode 2 is refused: site 'site_1' claims 1000000000000 training"):
        run_flower(tmp_path, tamper=huge)
    with pytest.raises(ValueError, match="claims 1000000000000 training samples, the run config's `site-samples` gi"):
        run_flower(tmp_path, tamper=huge, **{"site-samples": "site_0=32,site_1=32"})
    with pytest.raises(ValueError, match=r"serves site 'site_1', which is not among the run config's `site-names`"):
        run_flower(tmp_path, sites=("site_0", "site_1"), **{"site-names": "site_0,site_2"})
    with pytest.raises(TimeoutError, match=r"2 of num-sites=3 SuperNodes .*\['site_2'\] did not"):
        run_flower(tmp_path, **{"site-names": "site_0,site_1,site_2", "connect-timeout": 0})


@pytest.mark.parametrize(
    ("metric", "value", "combined"), [("accuracy", math.nan, False), ("round", 0.5, True)], ids=["alone", "combined"]
)
def test_an_evaluation_out_of_range_stops_the_run_naming_the_site(tmp_path, metric, value, combined):
    # Alone: the last round's evaluate reply; combined: round 1's evaluation in the reply to round 2's training.
    record = wire.EVALUATION if combined else wire.METRICS

    def change(content):
        content[record] = MetricRecord({**content[record], f"val/{metric}": value})

    if combined:
        overrides, tamper = FLOWER_TINY, tampering("train", 1, change, "round-2")
    else:
        overrides, tamper = ONE_ROUND, tampering("evaluate", 1, change)
    with pytest.raises(RuntimeError, match=f"Site 'site_0' failed to evaluate round 1: the server refuses .*{metric}"):
        run_flower(tmp_path, overrides, tamper=tamper)
    assert not (tmp_path / "flower" / "checkpoints" / "best.ckpt").exists()
