"""Client-level DP (DP-FedAvg): clipping, the noise's statistics, Opacus' numbers for ε, adaptive clipping, refused
settings, exact resume, process layouts, the command line and Flower."""

import json
import math

import pytest
import torch
from lightning.fabric import Fabric
from opacus.accountants import RDPAccountant

from harmofl import differential_privacy as dp
from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build
from harmofl.private_aggregation import DPFedAvg
from harmofl.reporting import read_metrics_csv
from harmofl.server_optimizers import FedNova
from harmofl.trainer import FederatedTrainer

from helpers import CLI_TINY, FLOWER_TINY, federation_of, run_cli, tiny_classifier, tiny_histology

FABRIC = Fabric(accelerator="cpu", devices=1)
DP_OVERLAY = "configs/strategies/dp_fedavg.yaml"
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
# Fixed noise seeds keep these tests deterministic; DPFedAvg warns that they are for experiments only.
pytestmark = pytest.mark.filterwarnings("ignore:DPFedAvg noise_seed")


def _federation(clients=4, clients_per_round=None, client_weighting="uniform"):
    return federation_of(
        {f"site_{i}": 10 + i for i in range(clients)},
        clients_per_round=clients_per_round,
        client_weighting=client_weighting,
    )


def _shared(coordinates=8):
    generator = torch.Generator().manual_seed(0)
    return {
        "weight": torch.randn(coordinates, generator=generator),
        "bias": torch.randn(3, generator=generator),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def _aggregate(aggregator, shared, updates, federation, round_idx=0):
    """One round of ``aggregator`` over ``updates`` (client → state), as the trainer runs it."""
    aggregator.start_round(round_idx, federation)
    aggregator.reset(shared, torch.device("cpu"))
    for client, update in updates.items():
        aggregator.add(client, update, 1.0)
    return aggregator.center(FABRIC, shared, federation.trainees, float(len(updates)))


def test_clip_update_scales_a_long_update_onto_the_bound_and_keeps_a_short_one():
    long = {"a": torch.tensor([30.0, 40.0]), "b": torch.tensor([0.0])}  # norm 50
    clipped, within = dp.clip_update(long, 5.0)
    assert not within and dp.update_norm(clipped) == pytest.approx(5.0)
    torch.testing.assert_close(clipped["a"], torch.tensor([3.0, 4.0], dtype=torch.float64))
    short, within = dp.clip_update({"a": torch.tensor([0.3, 0.4])}, 5.0)
    assert within and torch.equal(short["a"], torch.tensor([0.3, 0.4]).double())


def test_a_long_update_moves_the_mean_by_the_clipped_update_over_the_expected_participants():
    shared, federation, clip = _shared(), _federation(clients=4), 0.5
    direction = {key: torch.randn_like(value) for key, value in shared.items() if value.is_floating_point()}
    norm = dp.update_norm(direction)
    # One participant's update has norm 10·S; one answered nothing (a failure): the denominator stays m = 4.
    updates = {"site_0": {**shared, **{key: shared[key] + 10 * clip * d / norm for key, d in direction.items()}}}
    updates |= {"site_1": dict(shared), "site_2": dict(shared)}
    center = _aggregate(DPFedAvg(noise_multiplier=1e-12, clipping_norm=clip, noise_seed=0), shared, updates, federation)
    for key, d in direction.items():
        torch.testing.assert_close(center[key], shared[key] + clip * d / norm / 4, rtol=0, atol=1e-6)
    assert torch.equal(center["bn.num_batches_tracked"], shared["bn.num_batches_tracked"])  # the global value


def test_the_noise_on_the_mean_has_std_z_s_over_m_and_mean_zero():
    coordinates, z, clip, m = 200_000, 1.5, 0.8, 4
    shared, federation = _shared(coordinates), _federation(clients=m)
    updates = {client: dict(shared) for client in federation.trainees}  # Δ = 0: the center is θ + noise
    center = _aggregate(DPFedAvg(noise_multiplier=z, clipping_norm=clip, noise_seed=1), shared, updates, federation)
    noise = (center["weight"] - shared["weight"]).double()
    expected_std = dp.noise_std(z, clip, m)
    assert expected_std == pytest.approx(z * clip / m)
    # The sample std of n normal draws has relative spread ~ 1/sqrt(2n) (chi-square); the mean, std/sqrt(n).
    assert float(noise.std()) == pytest.approx(expected_std, rel=6 / math.sqrt(2 * coordinates))
    assert abs(float(noise.mean())) < 6 * expected_std / math.sqrt(coordinates)
    assert torch.equal(center["bn.num_batches_tracked"], shared["bn.num_batches_tracked"])


def test_the_noise_secret_is_drawn_once_kept_in_the_state_and_restores_the_same_noise():
    shared, federation = _shared(1000), _federation(clients=2)
    updates = {client: dict(shared) for client in federation.trainees}
    first, second = DPFedAvg(), DPFedAvg()
    _aggregate(first, shared, updates, federation)
    _aggregate(second, shared, updates, federation)
    secret = first.state_dict()["noise_secret"]
    assert isinstance(secret, int) and secret != second.state_dict()["noise_secret"]  # from the OS, per run
    resumed = DPFedAvg()
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(
        _aggregate(resumed, shared, updates, federation, round_idx=1)["weight"],
        _aggregate(first, shared, updates, federation, round_idx=1)["weight"],
    )


def test_reported_epsilon_is_opacus_rdp_accountant_for_the_rounds_and_sampling_rate():
    shared, federation = _shared(), _federation(clients=5, clients_per_round=2)  # q = 2/5
    aggregator, reference = DPFedAvg(noise_multiplier=0.9, delta=1e-6, noise_seed=0), RDPAccountant()
    for round_idx in range(4):
        participants = federation.participants(round_idx)
        _aggregate(aggregator, shared, {c: dict(shared) for c in participants}, federation, round_idx)
        reference.step(noise_multiplier=0.9, sample_rate=0.4)
        metrics = aggregator.round_metrics()
        assert metrics["privacy/epsilon"] == reference.get_epsilon(1e-6) and metrics["privacy/delta"] == 1e-6
        assert "privacy/clipping_norm" not in metrics
    assert aggregator.state_dict()["accountant_history"] == [(0.9, 0.4, 4)]


def test_adaptive_clipping_follows_the_unclipped_fraction_and_accounts_with_z_delta():
    z, count_std, clip = 1.0, 2.0, 0.5
    z_delta = dp.update_noise_multiplier(z, count_std)
    assert z_delta == pytest.approx((z**-2 - (2 * count_std) ** -2) ** -0.5)
    # Andrew et al.'s Theorem 1: updates at z_Δ plus the count at 2σ_b cost what one mechanism at z costs.
    together, alone = RDPAccountant(), RDPAccountant()
    together.history, alone.history = [(z_delta, 1.0, 5), (2 * count_std, 1.0, 5)], [(z, 1.0, 5)]
    assert together.get_epsilon(1e-5) == pytest.approx(alone.get_epsilon(1e-5), rel=1e-9)

    shared, federation = _shared(), _federation(clients=4)
    aggregator = DPFedAvg(noise_multiplier=z, clipping_norm=clip, adaptive=True, count_noise_std=count_std)
    _aggregate(aggregator, shared, {c: dict(shared) for c in federation.trainees}, federation)
    metrics, reference = aggregator.round_metrics(), RDPAccountant()
    reference.step(noise_multiplier=z_delta, sample_rate=1.0)
    assert metrics["privacy/clipping_norm"] == clip and metrics["privacy/epsilon"] == reference.get_epsilon(1e-5)
    # Every update was unclipped (b = 1 ± the count noise): the norm shrinks by exp(−η_C·(b̃ − γ)).
    unclipped = math.log(aggregator.clipping_norm / clip) / -0.2 + 0.5
    assert abs(unclipped - 1.0) < 6 * count_std / 4
    assert dp.adapted_clipping_norm(2.0, 1.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.1))
    assert dp.adapted_clipping_norm(2.0, 0.0, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        (dict(noise_multiplier=0.0), "noise_multiplier must be > 0, got 0.0"),
        (dict(clipping_norm=-1.0), "clipping_norm must be > 0, got -1.0"),
        (dict(delta=1.0), r"delta must be in \(0, 1\), got 1.0"),
        (dict(target_unclipped_quantile=1.5), "target_unclipped_quantile must be in"),
        (dict(clip_learning_rate=0.0), "clip_learning_rate must be > 0"),
        (dict(adaptive=True, count_noise_std=0.4), "count_noise_std=0.4 must exceed noise_multiplier/2"),
    ],
)
def test_bad_privacy_settings_are_refused_by_name(settings, named):
    with pytest.raises(ValueError, match=named):
        DPFedAvg(**settings)


def test_sample_weights_fednova_and_a_too_small_default_count_noise_are_refused():
    with pytest.raises(ValueError, match="client_weighting: uniform"):
        DPFedAvg().start_round(0, _federation(client_weighting="samples"))
    with pytest.raises(ValueError, match="DPFedAvg cannot serve FedNova"):
        FederatedTrainer(aggregator=DPFedAvg(), server_optimizer=FedNova(), accelerator="cpu")
    with pytest.raises(ValueError, match="count_noise_std=0.2 must exceed"):  # σ_b = m/20 with m = 4
        DPFedAvg(adaptive=True).start_round(0, _federation(clients=4))


def test_callback_values_get_the_plain_mean_with_a_warning_that_epsilon_does_not_cover_them():
    values = [{"target": torch.tensor([1.0, 2.0])}, {"target": torch.tensor([3.0, 6.0])}]
    with pytest.warns(UserWarning, match="privacy/epsilon does not cover them"):
        combined = DPFedAvg().combine(values, [1.0, 1.0])
    torch.testing.assert_close(combined["target"], torch.tensor([2.0, 4.0]))


def _private_trainer(rounds, root):
    aggregator = DPFedAvg(noise_multiplier=0.5, clipping_norm=0.3, adaptive=True, count_noise_std=1.0, noise_seed=3)
    return FederatedTrainer(
        rounds=rounds, aggregator=aggregator, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(root)
    )


def test_a_resumed_private_fit_adds_the_noise_of_the_uninterrupted_one_and_reports_epsilon(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _private_trainer(3, straight).fit(tiny_classifier(), tiny_histology())
    _private_trainer(2, resumed).fit(tiny_classifier(), tiny_histology())
    _private_trainer(3, resumed).fit(tiny_classifier(), tiny_histology(), ckpt_path="last")
    one, two = (load_checkpoint(root / "checkpoints" / "last.ckpt") for root in (straight, resumed))
    for key, value in one["global_state"].items():
        torch.testing.assert_close(two["global_state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert two["aggregator"] == one["aggregator"] and two["history"] == one["history"]
    rows = [row for row in read_metrics_csv(resumed / "metrics.csv") if row["client"] == "server"]
    assert [row["round"] for row in rows] == [1, 2, 3] and all(row["split"] == "train" for row in rows)
    reference = RDPAccountant()
    reference.history = [(dp.update_noise_multiplier(0.5, 1.0), 1.0, 3)]  # two sites, both every round: q = 1
    assert rows[-1]["privacy/epsilon"] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)
    assert rows[0]["privacy/clipping_norm"] == 0.3 and rows[1]["privacy/clipping_norm"] != 0.3
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["server"]["privacy/epsilon"] == rows[-1]["privacy/epsilon"]


def test_continuing_a_run_without_privacy_under_dp_fedavg_is_refused(tmp_path):
    root = tmp_path / "plain"
    FederatedTrainer(rounds=1, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(root)).fit(
        tiny_classifier(), tiny_histology()
    )
    with pytest.raises(ValueError, match="holds no DPFedAvg state"):
        _private_trainer(2, root).fit(tiny_classifier(), tiny_histology(), ckpt_path="last")


def test_the_cli_overlay_on_two_processes_reports_epsilon_and_aggregates_as_one_process(tmp_path):
    """``cli.py fit`` with the overlay on two processes, against the same configuration in this one process."""
    settings = [
        *("--config", "configs/demo.yaml", "--config", DP_OVERLAY, "--trainer.rounds", "1"),
        *("--trainer.aggregator.init_args.noise_seed", "11", *CLI_TINY),
    ]
    two = tmp_path / "devices2"
    run_cli("fit", *settings, "--trainer.devices", "2", "--trainer.default_root_dir", str(two), env=ONE_THREAD)
    summary = json.loads((two / "summary.json").read_text())
    assert summary["server"]["privacy/epsilon"] > 0 and summary["server"]["privacy/delta"] == 1e-5
    one = tmp_path / "devices1"
    cli = build([*settings, "--trainer.default_root_dir", str(one)])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses' thread count, so that both do the same arithmetic
    try:
        cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch.set_num_threads(threads)
    states = {root: load_checkpoint(root / "checkpoints" / "last.ckpt") for root in (one, two)}
    for key, value in states[one]["global_state"].items():
        torch.testing.assert_close(states[two]["global_state"][key], value, rtol=0, atol=1e-6, msg=key)
    assert states[two]["aggregator"] == states[one]["aggregator"]
    assert read_metrics_csv(two / "metrics.csv")[-1] == read_metrics_csv(one / "metrics.csv")[-1]  # the server row


def test_flower_runs_dp_fedavg_on_the_server_as_in_process(tmp_path):
    pytest.importorskip("flwr", reason="Flower is an optional extra: pip install -e '.[flower]'")
    from test_flower import run_flower

    from harmofl.flower import app

    overrides = f"{FLOWER_TINY} trainer.aggregator.init_args.noise_seed=11"
    run_config = {"config": f"configs/demo.yaml,{DP_OVERLAY}", "overrides": overrides}
    run_flower(tmp_path, overrides, config=run_config["config"])
    folder = tmp_path / "in_process"
    cli = build(
        app.configuration_args(run_config, [f"trainer.default_root_dir={folder}", "trainer.enable_progress_bar=false"])
    )
    cli.trainer.fit(cli.model, cli.datamodule)
    flower = load_checkpoint(tmp_path / "flower" / "checkpoints" / "last.ckpt")
    for key, value in load_checkpoint(folder / "checkpoints" / "last.ckpt")["global_state"].items():
        torch.testing.assert_close(flower["global_state"][key], value, rtol=0, atol=0, msg=key)
    rows = [row for row in read_metrics_csv(tmp_path / "flower" / "metrics.csv") if row["client"] == "server"]
    assert len(rows) == 2 and rows == [
        row for row in read_metrics_csv(folder / "metrics.csv") if row["client"] == "server"
    ]
    summary = json.loads((tmp_path / "flower" / "summary.json").read_text())
    assert summary["server"]["privacy/epsilon"] == rows[-1]["privacy/epsilon"]


@pytest.mark.parametrize("name", ["server", "mean"])
def test_a_site_named_like_a_summary_row_is_refused(name):
    # metrics.csv's rows of the server's privacy values and of the mean over clients use these client names.
    with pytest.raises(ValueError, match=f"Client names \\['{name}'\\] are reserved"):
        federation_of({"site_0": 10, name: 10})
