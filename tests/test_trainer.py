"""The Fabric orchestrator in one process: the round, aggregation, outputs, checkpoints, evaluation."""

import json
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from callbacks import AmplitudeHarmonization
from harmofl.aggregation import weighted_average
from harmofl.checkpoint import load_checkpoint
from harmofl.reporting import read_metrics_csv
from harmofl.trainer import FederatedTrainer

from helpers import tiny_classifier, tiny_histology, tiny_nuclei, tiny_segmenter


class Recorder(Callback):
    """Records what the orchestrator does, through its hooks."""

    def __init__(self):
        self.trained = {}  # (round, client) -> state after local training
        self.optimizer_at_start = {}  # (round, client) -> momentum buffers at the start of local training
        self.losses = []  # (loss before the step at the batch's weights, the loss the step returned)
        self._pending = None

    def on_train_client_start(self, trainer, pl_module, client):
        state = trainer.optimizer.state_dict()["state"]
        self.optimizer_at_start[(trainer.current_round, client)] = {
            k: v["momentum_buffer"].clone() for k, v in state.items()
        }

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            self._pending = float(pl_module.compute_loss(pl_module(batch[0]), batch[1]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((self._pending, float(outputs)))

    def on_train_client_end(self, trainer, pl_module, client):
        self.trained[(trainer.current_round, client)] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def test_fit_aggregates_the_uniform_mean_and_writes_every_output(trainer_kwargs, tmp_path):
    recorder = Recorder()
    harmonization = AmplitudeHarmonization()
    trainer = FederatedTrainer(rounds=2, callbacks=[harmonization, recorder], **trainer_kwargs)
    result = trainer.fit(tiny_classifier(), tiny_histology())
    clients = ["site_0", "site_1"]

    # Aggregation: the global model is the uniform mean of the clients' trained weights.
    expected = weighted_average([recorder.trained[(1, c)] for c in clients], [1.0, 1.0])
    for key, value in expected.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-7, rtol=0)
    # Round 2 starts from round 1's aggregate, and each client from its own optimizer state.
    for client in clients:
        momentum = recorder.optimizer_at_start[(1, client)]
        stored_after_round_1 = recorder.optimizer_at_start[(0, client)]
        assert not stored_after_round_1  # a fresh optimizer in round 1
        assert momentum and all(v.abs().sum() > 0 for v in momentum.values())
    # The logged loss is the one of the unperturbed pass, at the weights the step started from (after
    # the harmonization callback, which comes first, changed the batch).
    for before, returned in recorder.losses:
        assert returned == pytest.approx(before, rel=1e-5)

    run = tmp_path / "run"
    rows = read_metrics_csv(run / "metrics.csv")
    assert len(rows) == 2 * 3 * 3  # rounds x (clients + mean) x splits
    assert {(r["client"], r["split"]) for r in rows} == {
        (c, s) for c in [*clients, "mean"] for s in ("train", "val", "test")
    }
    summary = json.loads((run / "summary.json").read_text())
    assert summary == result
    assert summary["rounds"] == 2 and set(summary["clients"]) == set(clients)
    mean_val = {r["round"]: r["accuracy"] for r in rows if r["client"] == "mean" and r["split"] == "val"}
    assert summary["best_round"] == max(mean_val, key=lambda r: (mean_val[r], -r))
    for split in ("val", "test"):
        assert set(summary["mean"][split]) == {"accuracy", "auroc"}
        for client in clients:
            assert all(0.0 <= v <= 1.0 for v in summary["clients"][client][split].values())
    assert (run / "convergence.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run / "checkpoints" / "best.ckpt").is_file()

    checkpoint = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert checkpoint["round"] == 2 and checkpoint["client_names"] == clients
    state = checkpoint["callbacks"][harmonization.state_key]
    assert state["frozen"] and state["shared_target"] is not None  # averaged after round 1, then frozen
    for client in clients:
        assert checkpoint["clients"][client]["optimizer_state"]["state"]
        assert checkpoint["clients"][client]["callbacks"][harmonization.state_key]["target"] is not None


def test_test_on_best_checkpoint_reproduces_the_best_rounds_test_metrics(trainer_kwargs, tmp_path):
    summary = FederatedTrainer(rounds=2, callbacks=[AmplitudeHarmonization()], **trainer_kwargs).fit(
        tiny_classifier(), tiny_histology()
    )
    # A fresh model and callback, as `cli.py test` has: everything comes from the checkpoint.
    evaluator = FederatedTrainer(callbacks=[AmplitudeHarmonization()], **trainer_kwargs)
    tested = evaluator.test(tiny_classifier(), tiny_histology(), ckpt_path="best")
    assert tested["best_round"] == summary["best_round"]
    for client, splits in summary["clients"].items():
        assert tested["clients"][client]["test"] == splits["test"]
    written = json.loads((tmp_path / "run" / "checkpoints" / "test_summary.json").read_text())
    assert written == tested
    validated = FederatedTrainer(callbacks=[AmplitudeHarmonization()], **trainer_kwargs).validate(
        tiny_classifier(), tiny_histology(), ckpt_path="best"
    )
    for client, splits in summary["clients"].items():
        assert validated["clients"][client] == {"val": splits["val"]}
    assert (tmp_path / "run" / "checkpoints" / "val_summary.json").is_file()


def test_local_modules_stay_local(trainer_kwargs):
    recorder = Recorder()
    trainer = FederatedTrainer(rounds=1, local_modules=["norm"], callbacks=[recorder], **trainer_kwargs)
    model = tiny_classifier(batch_norm_stats="running")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, tiny_histology())
    norm_keys = {
        f"{name}.{key}"
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.BatchNorm2d)
        for key in module.state_dict()
    }
    assert trainer.local_keys == norm_keys and norm_keys
    for key in trainer.local_keys:
        assert torch.equal(trainer.global_state[key], initial[key])  # never aggregated
        for client in ("site_0", "site_1"):
            assert torch.equal(trainer.client_records[client].local_state[key], recorder.trained[(0, client)][key])
    shared = [k for k in initial if k not in trainer.local_keys]
    expected = weighted_average([recorder.trained[(0, c)] for c in ("site_0", "site_1")], [1.0, 1.0], shared)
    for key in shared:
        torch.testing.assert_close(trainer.global_state[key], expected[key], atol=1e-7, rtol=0)


def test_sample_weighting_and_local_steps(trainer_kwargs):
    recorder = Recorder()
    data = tiny_histology(train_per_site=16)
    trainer = FederatedTrainer(
        rounds=1, local_steps=3, client_weighting="samples", callbacks=[recorder], **trainer_kwargs
    )
    trainer.fit(tiny_classifier(), data)
    assert len(recorder.losses) == 2 * 3
    assert trainer.federation.client_weight == {"site_0": 16.0, "site_1": 16.0}


def test_segmentation_fit_reports_dice_iou_hd95(trainer_kwargs):
    summary = FederatedTrainer(rounds=1, callbacks=[AmplitudeHarmonization(preset="paper")], **trainer_kwargs).fit(
        tiny_segmenter(), tiny_nuclei()
    )
    test = summary["mean"]["test"]
    assert set(test) == {"dice", "iou", "hd95"} and 0.0 <= test["dice"] <= 1.0 and 0.0 <= test["iou"] <= 1.0
    assert test["hd95"] >= 0.0
    header = (Path(trainer_kwargs["default_root_dir"]) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"dice", "iou", "hd95"} <= set(header)


def test_fit_continues_from_a_checkpoint(trainer_kwargs):
    FederatedTrainer(rounds=1, callbacks=[AmplitudeHarmonization()], **trainer_kwargs).fit(
        tiny_classifier(), tiny_histology()
    )
    resumed = FederatedTrainer(rounds=2, callbacks=[AmplitudeHarmonization()], **trainer_kwargs)
    summary = resumed.fit(tiny_classifier(), tiny_histology(), ckpt_path="last")
    assert summary["rounds"] == 2 and sorted({row["round"] for row in resumed.history}) == [1, 2]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"precision": "16-mixed"}, "16-mixed"),
        ({"rounds": 0}, "trainer.rounds"),
        ({"client_weighting": "by_size"}, "by_size"),
        ({"local_modules": ["BatchNormal"]}, "BatchNormal"),
    ],
)
def test_bad_trainer_settings_are_rejected_before_any_work(trainer_kwargs, kwargs, message):
    with pytest.raises(ValueError, match=message):
        FederatedTrainer(**{**trainer_kwargs, **kwargs})


def test_checkpoint_of_another_model_is_refused_with_the_keys(trainer_kwargs):
    FederatedTrainer(rounds=1, **trainer_kwargs).fit(tiny_classifier(), tiny_histology())
    with pytest.raises(ValueError, match="missing keys"):
        FederatedTrainer(**trainer_kwargs).test(tiny_classifier(batch_norm_stats="running"), tiny_histology())


def test_missing_checkpoint_is_a_clear_error(trainer_kwargs):
    with pytest.raises(FileNotFoundError, match="best.ckpt"):
        FederatedTrainer(**trainer_kwargs).test(tiny_classifier(), tiny_histology())


def test_server_optimizer_turns_the_clients_mean_into_the_global_model(trainer_kwargs):
    from harmofl.server_optimizers import FedAdam

    recorder = Recorder()
    trainer = FederatedTrainer(rounds=2, server_optimizer=FedAdam(lr=0.05), callbacks=[recorder], **trainer_kwargs)
    model = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, tiny_histology())
    expected_optimizer, expected = FedAdam(lr=0.05), start
    for round_idx in range(2):
        mean = weighted_average([recorder.trained[(round_idx, c)] for c in ("site_0", "site_1")], [1.0, 1.0])
        expected = expected_optimizer.step(expected, mean)
    for key, value in expected.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-6, rtol=0)
    moments = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")["server_optimizer"]["moments"]
    assert set(moments) == {"m", "v"} and moments["m"]


@pytest.mark.parametrize("clients_per_round", [1, 0.5])
def test_partial_participation_trains_a_seeded_sample_and_averages_only_it(trainer_kwargs, clients_per_round):
    recorder = Recorder()
    trainer = FederatedTrainer(rounds=3, clients_per_round=clients_per_round, callbacks=[recorder], **trainer_kwargs)
    trainer.fit(tiny_classifier(), tiny_histology(num_sites=3))
    for round_idx in range(3):
        participants = trainer.participants(round_idx)
        assert len(participants) == 2 if clients_per_round == 0.5 else len(participants) == 1
        assert {c for (r, c) in recorder.trained if r == round_idx} == set(participants)
    again = Recorder()  # the same seed draws the same participants
    FederatedTrainer(rounds=3, clients_per_round=clients_per_round, callbacks=[again], **trainer_kwargs).fit(
        tiny_classifier(), tiny_histology(num_sites=3)
    )
    assert set(again.trained) == set(recorder.trained)
    last = weighted_average(
        [recorder.trained[(2, c)] for c in trainer.participants(2)], [1.0] * len(trainer.participants(2))
    )
    for key, value in last.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-7, rtol=0)
    train_rows = [r for r in trainer.history if r["split"] == "train" and r["client"] != "mean"]
    assert len(train_rows) == 3 * len(trainer.participants(0))
    evaluated = {r["client"] for r in trainer.history if r["split"] == "test"}
    assert evaluated == {"site_0", "site_1", "site_2", "mean"}  # every client evaluates the global model


def test_bad_participation_is_rejected():
    with pytest.raises(ValueError, match="clients_per_round"):
        FederatedTrainer(clients_per_round=1.5, enable_progress_bar=False)


def test_local_training_keeps_every_module_local(trainer_kwargs):
    recorder = Recorder()
    trainer = FederatedTrainer(rounds=2, local_modules=["Module"], callbacks=[recorder], **trainer_kwargs)
    model = tiny_classifier()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer.fit(model, tiny_histology())
    assert trainer.local_keys == set(initial)
    for key, value in initial.items():
        assert torch.equal(trainer.global_state[key], value)
    for client in ("site_0", "site_1"):
        for key, value in recorder.trained[(1, client)].items():
            assert torch.equal(trainer.client_records[client].local_state[key], value)


def test_held_out_site_never_trains_and_is_reported_apart(trainer_kwargs):
    recorder = Recorder()
    trainer = FederatedTrainer(
        rounds=2, held_out_clients=["site_2"], callbacks=[AmplitudeHarmonization(), recorder], **trainer_kwargs
    )
    summary = trainer.fit(tiny_classifier(), tiny_histology(num_sites=3))
    assert {client for _, client in recorder.trained} == {"site_0", "site_1"}
    assert set(summary["clients"]) == {"site_0", "site_1"} and set(summary["held_out"]) == {"site_2"}
    accuracies = [summary["clients"][client]["test"]["accuracy"] for client in ("site_0", "site_1")]
    assert summary["mean"]["test"]["accuracy"] == pytest.approx(sum(accuracies) / 2)
    tested = FederatedTrainer(held_out_clients=["site_2"], callbacks=[AmplitudeHarmonization()], **trainer_kwargs).test(
        tiny_classifier(), tiny_histology(num_sites=3)
    )
    assert tested["held_out"]["site_2"]["test"] == summary["held_out"]["site_2"]["test"]
    with pytest.raises(ValueError, match="site_9"):
        FederatedTrainer(held_out_clients=["site_9"], **trainer_kwargs).fit(tiny_classifier(), tiny_histology())


def test_fednova_normalizes_by_each_clients_local_steps(trainer_kwargs):
    from torch.utils.data import Subset

    from harmofl.data import FederatedDataModule
    from harmofl.server_optimizers import Contribution, FedNova

    class Uneven(FederatedDataModule):
        """site_1 keeps half of its training data: 1 local step against site_0's 2."""

        def __init__(self):
            super().__init__(batch_size=8)
            self.inner = tiny_histology()

        @property
        def client_names(self):
            return self.inner.client_names

        def setup(self, stage=None):
            self.inner.setup()
            self._datasets = {(c, s): self.inner.dataset(c, s) for c in self.client_names for s in ("val", "test")}
            self._datasets[("site_0", "train")] = self.inner.dataset("site_0", "train")
            self._datasets[("site_1", "train")] = Subset(self.inner.dataset("site_1", "train"), range(8))

    recorder = Recorder()
    model = tiny_classifier()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = FederatedTrainer(rounds=1, server_optimizer=FedNova(momentum=0.9), callbacks=[recorder], **trainer_kwargs)
    trainer.fit(model, Uneven())
    contributions = [Contribution(1.0, 2), Contribution(1.0, 1)]
    server = FedNova(momentum=0.9)
    factors = [server.aggregation_factor(c.num_steps) for c in contributions]
    mean = weighted_average([recorder.trained[(0, c)] for c in ("site_0", "site_1")], factors)
    expected = server.step(start, mean, contributions)
    for key, value in expected.items():
        torch.testing.assert_close(trainer.global_state[key], value, atol=1e-6, rtol=0)
    assert sum(1 for _ in recorder.losses) == 3
