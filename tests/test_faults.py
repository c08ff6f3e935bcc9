"""Run integrity in one process: client failures, retries, update checks and bounds, robust aggregation."""

import copy
import json

import pytest
import torch
from lightning.pytorch import Callback

from callbacks import AmplitudeHarmonization
from harmofl import validation
from harmofl.aggregation import coordinate_median, trimmed_mean, weighted_average
from harmofl.aggregators import Median, TrimmedMean
from harmofl.checkpoint import load_checkpoint
from harmofl.trainer import FederatedTrainer

from helpers import tiny_classifier, tiny_histology


class FailingClient(Callback):
    """Raises at the second batch of ``client`` in ``rounds`` (0-based), after one step changed its weights,
    optimizer and amplitude target, for its first ``times`` attempts of each round."""

    def __init__(self, client, rounds, times=1, error: Exception | None = None):
        self.client, self.rounds, self.times = client, set(rounds), times
        self.error = error or RuntimeError("disk read failed")
        self.attempts = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        key = (trainer.current_round, trainer.current_client)
        if batch_idx == 0:
            self.attempts[key] = self.attempts.get(key, 0) + 1
        failing = trainer.current_client == self.client and trainer.current_round in self.rounds
        if failing and batch_idx == 1 and self.attempts[key] <= self.times:
            raise self.error


class Poison(Callback):
    """After ``client``'s last local batch, adds ``shift`` to (or, with NaN, overwrites) its classifier bias."""

    def __init__(self, client, shift):
        self.client, self.shift = client, shift

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_client == self.client and batch_idx == 1:  # tiny data: 2 batches per epoch
            with torch.no_grad():
                pl_module.model.fc.bias.add_(self.shift)


class Trained(Callback):
    """Each client's state after local training, and the global state each round started from."""

    def __init__(self):
        self.states, self.round_start, self.records_after = {}, {}, {}

    def on_round_start(self, trainer, round_idx):
        self.round_start[round_idx] = {k: v.clone() for k, v in trainer.global_state.items()}

    def on_train_client_end(self, trainer, pl_module, client):
        self.states[(trainer.current_round, client)] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_round_end(self, trainer, round_idx):
        self.records_after[round_idx] = copy.deepcopy(trainer.client_records)


def _fit(trainer_kwargs, callbacks=(), num_sites=2, model_kwargs=None, **kwargs):
    trainer = FederatedTrainer(callbacks=list(callbacks), **{"rounds": 2, **kwargs}, **trainer_kwargs)
    summary = trainer.fit(tiny_classifier(**(model_kwargs or {})), tiny_histology(num_sites=num_sites))
    return trainer, summary


def test_a_failing_client_stops_the_run_by_default_with_its_name_and_round(trainer_kwargs):
    with pytest.raises(RuntimeError, match="disk read failed") as raised:
        _fit(trainer_kwargs, [FailingClient("site_1", rounds=[1])])
    assert "Client 'site_1' failed in round 2" in "".join(raised.value.__notes__)
    trainer = FederatedTrainer(rounds=2, **trainer_kwargs)  # the round-1 checkpoint is intact and resumable
    assert load_checkpoint(trainer.checkpoint_dir / "last.ckpt")["round"] == 1
    trainer.fit(tiny_classifier(), tiny_histology(), ckpt_path="last")
    assert trainer.history[-1]["round"] == 2


def test_skip_policy_aggregates_the_others_and_reports_the_failure(trainer_kwargs):
    trained = Trained()
    with pytest.warns(UserWarning, match="site_1' failed in round 2"):
        trainer, summary = _fit(
            trainer_kwargs, [FailingClient("site_1", rounds=[1]), trained], num_sites=3, client_failure="skip"
        )
    assert (1, "site_1") not in trained.states
    expected = weighted_average([trained.states[(1, c)] for c in ("site_0", "site_2")], [1.0, 1.0])
    for key, value in expected.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-7, rtol=0)
    failure = {"round": 2, "client": "site_1", "error": "RuntimeError: disk read failed"}
    assert summary["failures"] == [failure]
    assert json.loads((trainer.checkpoint_dir.parent / "summary.json").read_text())["failures"] == [failure]
    assert load_checkpoint(trainer.checkpoint_dir / "last.ckpt")["failures"] == [failure]
    # Its record is still the one of round 1: the failed attempt changed nothing it keeps.
    kept = trainer.client_records["site_1"].optimizer_state["state"]
    after_round_one = trained.records_after[0]["site_1"].optimizer_state["state"]
    assert kept and all(torch.equal(after_round_one[k]["momentum_buffer"], kept[k]["momentum_buffer"]) for k in kept)


def test_a_retried_transient_fault_changes_nothing(trainer_kwargs, tmp_path):
    harmonization = AmplitudeHarmonization(preset="paper")
    faulty, _ = _fit(trainer_kwargs, [harmonization, FailingClient("site_0", rounds=[0, 1])], client_retries=1)
    clean_kwargs = {**trainer_kwargs, "default_root_dir": str(tmp_path / "clean")}
    clean_harmonization = AmplitudeHarmonization(preset="paper")
    clean, _ = _fit(clean_kwargs, [clean_harmonization])
    for key, value in clean.global_state.items():
        assert torch.equal(faulty.global_state[key], value), key
    assert torch.equal(harmonization.shared_target, clean_harmonization.shared_target)
    assert faulty.history == clean.history and not faulty.failures


def test_too_few_successful_clients_stop_the_run_with_a_resumable_checkpoint(trainer_kwargs):
    with pytest.raises(RuntimeError, match="min_clients=2"):
        _fit(trainer_kwargs, [FailingClient("site_0", rounds=[1])], client_failure="skip", min_clients=2)
    assert load_checkpoint(FederatedTrainer(**trainer_kwargs).checkpoint_dir / "last.ckpt")["round"] == 1
    with pytest.raises(ValueError, match="min_clients=3"):
        _fit(trainer_kwargs, min_clients=3)


def test_non_finite_weights_are_refused_by_the_server(trainer_kwargs):
    trained = Trained()
    with pytest.warns(UserWarning, match="NaN or Inf"):
        trainer, summary = _fit(
            trainer_kwargs, [Poison("site_1", float("nan")), trained], rounds=1, client_failure="skip"
        )
    assert summary["failures"][0]["client"] == "site_1" and "model.fc.bias" in summary["failures"][0]["error"]
    for key, value in trained.states[(0, "site_0")].items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=0, rtol=0)


def test_update_distance_bound_clips_or_rejects(trainer_kwargs, tmp_path):
    trained = Trained()
    trainer, _ = _fit(trainer_kwargs, [trained], rounds=1, max_update_distance=0.01)
    start = trained.round_start[0]
    for client in ("site_0", "site_1"):
        assert validation.update_distance(trained.states[(0, client)], start) == pytest.approx(0.01, rel=1e-4)
    assert validation.update_distance(trainer.global_state, start) <= 0.01 * (1 + 1e-6)
    reject_kwargs = {**trainer_kwargs, "default_root_dir": str(tmp_path / "reject")}
    with pytest.raises(RuntimeError, match="min_clients"), pytest.warns(UserWarning, match="beyond the bound"):
        _fit(reject_kwargs, rounds=1, max_update_distance=0.01, update_distance_policy="reject", client_failure="skip")


@pytest.mark.parametrize("aggregator", [Median(), TrimmedMean(trim_ratio=0.34)])
def test_robust_aggregation_ignores_one_poisoned_site(trainer_kwargs, aggregator):
    trained = Trained()
    trainer, _ = _fit(trainer_kwargs, [Poison("site_2", 1000.0), trained], num_sites=3, rounds=1, aggregator=aggregator)
    states = [trained.states[(0, c)] for c in ("site_0", "site_1", "site_2")]
    expected = coordinate_median(states, states[0])
    for key, value in expected.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-7, rtol=0)
    assert trainer.global_state["model.fc.bias"].abs().max() < 10  # the poisoned bias is 1000 away


def test_robust_centers_against_torch():
    generator = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(4, 3, generator=generator), "n": torch.tensor(i)} for i in (1, 7, 2, 9, 4)]
    median = coordinate_median(states, states[0])
    torch.testing.assert_close(median["w"], torch.stack([s["w"] for s in states]).median(dim=0).values)
    assert median["n"].item() == 4 and median["n"].dtype == states[0]["n"].dtype
    stacked = torch.stack([s["w"] for s in states]).sort(dim=0).values
    torch.testing.assert_close(trimmed_mean(states, 0.2, states[0])["w"], stacked[1:4].mean(dim=0))
    torch.testing.assert_close(trimmed_mean(states, 0.0, states[0])["w"], stacked.mean(dim=0))
    even = coordinate_median(states[:4], states[0])["w"]
    middle_two = torch.stack([s["w"] for s in states[:4]]).sort(dim=0).values[1:3].mean(dim=0)
    torch.testing.assert_close(even, middle_two)
    with pytest.raises(ValueError, match="trim_ratio"):
        trimmed_mean(states, 0.5, states[0])


def test_update_checks_name_the_problem():
    reference = {"w": torch.zeros(2, 2), "n": torch.tensor(0)}
    validation.check_update({"w": torch.ones(2, 2), "n": torch.tensor(3)}, reference)
    cases = [
        ({"w": torch.zeros(2, 2)}, "missing keys \\['n'\\]"),
        ({**reference, "x": torch.zeros(1)}, "extra keys \\['x'\\]"),
        ({**reference, "w": torch.zeros(4)}, "'w' is torch.float32 \\(4,\\)"),
        ({**reference, "w": torch.zeros(2, 2, dtype=torch.float64)}, "torch.float64"),
        ({**reference, "w": torch.tensor([[0.0, float("inf")], [0.0, 0.0]])}, "'w' holds NaN or Inf"),
    ]
    for update, message in cases:
        with pytest.raises(validation.InvalidUpdate, match=message):
            validation.check_update(update, reference)


def test_bound_update_scales_onto_the_bound():
    start = {"w": torch.zeros(2), "n": torch.tensor(5)}
    update = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(6)}
    assert validation.update_distance(update, start) == pytest.approx(5.0)
    clipped = validation.bound_update(update, start, 1.0, "clip")
    torch.testing.assert_close(clipped["w"], torch.tensor([0.6, 0.8]))
    assert clipped["n"].item() == 6
    assert validation.bound_update(update, start, 10.0, "reject") == update
    with pytest.raises(validation.InvalidUpdate, match="beyond the bound"):
        validation.bound_update(update, start, 1.0, "reject")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"client_failure": "ignore"}, "client_failure"),
        ({"client_retries": -1}, "client_retries"),
        ({"min_clients": 0}, "min_clients"),
        ({"max_update_distance": 0.0}, "max_update_distance"),
        ({"update_distance_policy": "drop"}, "update_distance_policy"),
        ({"aggregator": "krum"}, "aggregator"),
        ({"aggregator": lambda: TrimmedMean(trim_ratio=0.5)}, "trim_ratio"),
    ],
)
def test_bad_integrity_settings_are_rejected_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederatedTrainer(enable_progress_bar=False, **{k: v() if callable(v) else v for k, v in kwargs.items()})


def test_fednova_needs_the_weighted_mean():
    from harmofl.server_optimizers import FedNova

    with pytest.raises(ValueError, match="FedNova"):
        FederatedTrainer(aggregator=Median(), server_optimizer=FedNova(), enable_progress_bar=False)


class _RunsCode:
    """A pickle that, if unpickled, creates a marker file: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_a_checkpoint_or_weights_file_never_runs(tmp_path, trainer_kwargs):
    from harmofl.checkpoint import FORMAT_KEY, FORMAT_VERSION

    marker = tmp_path / "code_ran"
    hostile = tmp_path / "hostile.ckpt"
    torch.save({FORMAT_KEY: FORMAT_VERSION, "payload": _RunsCode(marker)}, hostile)
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(hostile)
    with pytest.raises(Exception, match="Unsupported global|weights_only"):
        tiny_classifier(weights_path=str(hostile))
    assert not marker.exists()


def test_a_checkpoint_of_another_shape_or_federation_is_refused_by_name(trainer_kwargs):
    FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology())
    with pytest.raises(ValueError, match="'model.fc.weight' is torch.float32 \\(2, 96\\).*\\(3, 96\\)"):
        FederatedTrainer(**trainer_kwargs).test(tiny_classifier(num_classes=3), tiny_histology())
    with pytest.raises(ValueError, match="trained with clients \\['site_0', 'site_1'\\]"):
        FederatedTrainer(rounds=2, **trainer_kwargs).fit(
            tiny_classifier(), tiny_histology(num_sites=3), ckpt_path="last"
        )
