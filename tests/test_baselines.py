"""SCAFFOLD, MOON and pooled training against their papers' update rules, by hand and through the orchestrator."""

import copy
import functools
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback

from callbacks import Scaffold
from harmofl import scaffold
from harmofl.checkpoint import load_checkpoint
from harmofl.contrastive import flatten_representation, model_contrastive_loss
from harmofl.federation.topology import POOLED_CLIENT
from harmofl.reporting import read_metrics_csv
from harmofl.trainer import FederatedTrainer

from helpers import tiny_classifier, tiny_histology, tiny_segmenter

LR = 0.1


def _batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(8, 3, 32, 32, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def _plain_sgd_client(**kwargs):
    return tiny_classifier(alpha=0.0, optimizer=functools.partial(torch.optim.SGD, lr=LR), **kwargs)


def _setup(client):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module, _ = fabric.setup(client, client.configure_optimizers())
    return module


class Recorder(Callback):
    """The global weights each round starts from, each client's weights after local training, batch counts."""

    def __init__(self):
        self.round_start, self.trained, self.batches = {}, {}, {}

    def on_round_start(self, trainer, round_idx):
        self.round_start[round_idx] = {k: v.clone() for k, v in trainer.global_state.items()}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        key = (trainer.current_round, trainer.current_client)
        self.batches[key] = self.batches.get(key, 0) + len(batch[0])

    def on_train_client_end(self, trainer, pl_module, client):
        self.trained[(trainer.current_round, client)] = {k: v.clone() for k, v in pl_module.state_dict().items()}


# -- SCAFFOLD ---------------------------------------------------------------------------------------------------


def test_accumulated_steps_is_how_far_momentum_sgd_moves_under_a_constant_gradient():
    for momentum in (0.0, 0.5, 0.9):
        for steps in (1, 3, 7):
            weight = torch.nn.Parameter(torch.zeros(1))
            optimizer = torch.optim.SGD([weight], lr=0.1, momentum=momentum)
            for _ in range(steps):
                weight.grad = torch.ones(1)
                optimizer.step()
            assert -weight.detach().item() == pytest.approx(0.1 * scaffold.accumulated_steps(steps, momentum), rel=1e-5)
    with pytest.raises(ValueError, match="local step"):
        scaffold.accumulated_steps(0)


def test_control_updates_are_the_papers_option_two():
    generator = torch.Generator().manual_seed(0)
    c, c_i, x, y = ({"w": torch.randn(3, generator=generator)} for _ in range(4))
    updated = scaffold.updated_client_control(c_i, c, x, y, num_steps=4, lr=0.05)
    torch.testing.assert_close(updated["w"], c_i["w"] - c["w"] + (x["w"] - y["w"]) / (4 * 0.05))
    torch.testing.assert_close(scaffold.gradient_correction(c, c_i)["w"], c["w"] - c_i["w"])
    server = scaffold.updated_server_control(c, {"w": y["w"]}, participation=0.5)
    torch.testing.assert_close(server["w"], c["w"] + 0.5 * y["w"])
    with pytest.raises(ValueError, match="learning rate"):
        scaffold.updated_client_control(c_i, c, x, y, num_steps=1, lr=0.0)


def test_corrected_local_steps_follow_the_corrected_gradient():
    """Two local SGD steps with a correction d = c − c_i equal w ← w − η(g(w) + d), written out by hand."""
    images, labels = _batch()
    client = _plain_sgd_client()
    reference = copy.deepcopy(client)
    generator = torch.Generator().manual_seed(1)
    correction = {name: 0.1 * torch.randn(p.shape, generator=generator) for name, p in client.named_parameters()}
    module = _setup(client)
    client.gradient_correction = correction
    for i in range(2):
        module.training_step((images, labels), i)
    for _ in range(2):
        reference.zero_grad()
        reference.compute_loss(reference(images), labels).backward()
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p -= LR * (p.grad + correction[name])
    for p_ours, p_ref in zip(client.parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)


def test_scaffold_controls_through_the_orchestrator(trainer_kwargs):
    """Two rounds of 2 momentum-SGD steps per client: every control equals the paper's update of the recorded
    weights; with full participation the server control is the clients' mean; everything is checkpointed."""
    recorder, callback = Recorder(), Scaffold()
    optimizer = functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    trainer = FederatedTrainer(rounds=2, local_steps=2, callbacks=[callback, recorder], **trainer_kwargs)
    trainer.fit(tiny_classifier(alpha=0.0, optimizer=optimizer), tiny_histology())
    clients = ["site_0", "site_1"]
    names = [name for name, p in trainer.module.named_parameters()]
    server = {name: torch.zeros_like(recorder.round_start[0][name]) for name in names}
    controls = {client: dict(server) for client in clients}
    for round_idx in range(2):
        updated = {
            client: scaffold.updated_client_control(
                controls[client],
                server,
                recorder.round_start[round_idx],
                recorder.trained[(round_idx, client)],
                num_steps=2,
                lr=0.05,
                momentum=0.9,
            )
            for client in clients
        }
        mean_delta = {name: sum(updated[c][name] - controls[c][name] for c in clients) / 2 for name in names}
        server = scaffold.updated_server_control(server, mean_delta, participation=1.0)
        controls = updated
    for name in names:
        torch.testing.assert_close(callback.server_control[name], server[name], atol=1e-5, rtol=1e-5)
        client_mean = (controls["site_0"][name] + controls["site_1"][name]) / 2
        torch.testing.assert_close(callback.server_control[name], client_mean, atol=1e-5, rtol=1e-5)
        for client in clients:
            torch.testing.assert_close(
                callback.client_controls[client][name], controls[client][name], atol=1e-5, rtol=1e-5
            )
    checkpoint = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")
    saved = checkpoint["callbacks"][callback.state_key]["server_control"]
    assert all(torch.equal(saved[name], callback.server_control[name]) for name in names)
    for client in clients:
        saved = checkpoint["clients"][client]["callbacks"][callback.state_key]["control"]
        assert all(torch.equal(saved[name], callback.client_controls[client][name]) for name in names)
    # The second round really was corrected: its updates differ from uncorrected FedAvg's.
    plain = Recorder()
    FederatedTrainer(rounds=2, local_steps=2, callbacks=[plain], **trainer_kwargs).fit(
        tiny_classifier(alpha=0.0, optimizer=optimizer), tiny_histology()
    )

    def fc_weight(states, round_idx):
        return states[(round_idx, "site_0")]["model.fc.weight"]

    assert torch.equal(fc_weight(plain.trained, 0), fc_weight(recorder.trained, 0))
    assert not torch.allclose(fc_weight(plain.trained, 1), fc_weight(recorder.trained, 1))


def test_scaffold_leaves_local_modules_out_and_refuses_adaptive_optimizers(trainer_kwargs):
    callback = Scaffold()
    trainer = FederatedTrainer(rounds=1, local_modules=["norm"], callbacks=[callback], **trainer_kwargs)
    trainer.fit(tiny_classifier(alpha=0.0), tiny_histology())
    shared = {name for name, _ in trainer.module.named_parameters()} - trainer.local_keys
    assert set(callback.server_control) == shared and "model.bn1.weight" not in shared
    with pytest.raises(ValueError, match="Adam"):
        FederatedTrainer(rounds=1, callbacks=[Scaffold()], **trainer_kwargs).fit(tiny_segmenter(), tiny_histology())


# -- MOON ---------------------------------------------------------------------------------------------------------


def test_model_contrastive_loss_is_the_papers_formula():
    generator = torch.Generator().manual_seed(0)
    z, z_global, z_previous = (torch.randn(5, 7, generator=generator) for _ in range(3))
    tau = 0.5

    def cosine(a, b):
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))

    positive, negative = torch.exp(cosine(z, z_global) / tau), torch.exp(cosine(z, z_previous) / tau)
    expected = -torch.log(positive / (positive + negative)).mean()
    torch.testing.assert_close(model_contrastive_loss(z, z_global, z_previous, tau), expected)
    torch.testing.assert_close(model_contrastive_loss(z, z, z, tau), torch.tensor(math.log(2)))
    assert flatten_representation([torch.ones(2, 3, 4, 4), torch.full((2, 5, 2, 2), 2.0)]).tolist() == [[2.0] * 5] * 2
    with pytest.raises(ValueError, match="shape"):
        flatten_representation(torch.ones(2, 3, 4))


def test_moon_local_step_matches_the_objective_written_out_by_hand():
    """One SGD step on CE + μ·ℓ_con with timm's own pre-logits features as z, global and previous models frozen."""
    images, labels = _batch()
    mu, tau = 2.0, 0.5
    client = _plain_sgd_client(contrastive_mu=mu, contrastive_temperature=tau)
    reference = copy.deepcopy(client.model)
    global_net = copy.deepcopy(client.model).eval()
    previous_net = copy.deepcopy(client.model).eval()
    with torch.no_grad():
        for p in previous_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    module = _setup(client)
    client.load_persistent_client_state({"previous_weights": previous_net.state_dict()})
    client.on_train_client_start()
    loss = module.training_step((images, labels), 0)

    def features(net):
        return net.forward_head(net.forward_features(images), pre_logits=True)

    z = features(reference)
    with torch.no_grad():
        z_global, z_previous = features(global_net), features(previous_net)
    task = F.cross_entropy(reference.get_classifier()(z), labels)
    (task + mu * model_contrastive_loss(z, z_global, z_previous, tau)).backward()
    with torch.no_grad():
        for p in reference.parameters():
            p -= LR * p.grad
    torch.testing.assert_close(loss, task.detach())  # the logged loss is the task loss alone
    for p_ours, p_ref in zip(client.model.parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)


def test_moon_first_round_compares_with_the_global_model_twice():
    images, labels = _batch()
    client = _plain_sgd_client(contrastive_mu=3.0)
    client.on_train_client_start()  # no previous local model yet: the previous one is the global one
    objective, loss = client.local_objective(images, labels, client.reference_representations(images))
    torch.testing.assert_close(objective - loss, torch.tensor(3.0 * math.log(2)))


def test_moon_keeps_each_clients_previous_model_across_rounds_and_checkpoints(trainer_kwargs):
    recorder = Recorder()
    trainer = FederatedTrainer(rounds=2, callbacks=[recorder], **trainer_kwargs)
    trainer.fit(tiny_classifier(alpha=0.0, contrastive_mu=1.0), tiny_histology())
    checkpoint = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")
    for client in ("site_0", "site_1"):
        trained = {k.removeprefix("model."): v for k, v in recorder.trained[(1, client)].items()}
        for state in (trainer.client_records[client].module_state, checkpoint["clients"][client]["module_state"]):
            assert state["previous_weights"].keys() == trained.keys()
            assert all(torch.equal(state["previous_weights"][k], trained[k]) for k in trained)


def test_moon_reads_the_segmentation_encoders_deepest_features():
    client = tiny_segmenter(contrastive_mu=1.0)
    images = torch.rand(2, 3, 32, 32)
    client.on_train_client_start()
    z_global, z_previous = client.reference_representations(images)
    assert z_global.shape == (2, 2 * 4 * 8) and torch.equal(z_global, z_previous)  # bottleneck width 2·8·base


# -- pooled ---------------------------------------------------------------------------------------------------------


def test_pooled_training_trains_one_model_on_every_clients_data(trainer_kwargs):
    recorder = Recorder()
    data = tiny_histology(num_sites=3)
    trainer = FederatedTrainer(
        rounds=2, held_out_clients=["site_2"], pool_clients=True, callbacks=[recorder], **trainer_kwargs
    )
    summary = trainer.fit(tiny_classifier(alpha=0.0), data)
    assert set(recorder.trained) == {(0, POOLED_CLIENT), (1, POOLED_CLIENT)}
    # A round is one pass over the training clients' union (16 samples each), never over the held-out site.
    assert recorder.batches == {(0, POOLED_CLIENT): 32, (1, POOLED_CLIENT): 32}
    for key, value in recorder.trained[(1, POOLED_CLIENT)].items():
        assert torch.equal(trainer.global_state[key], value)
    assert set(summary["clients"]) == {"site_0", "site_1"} and set(summary["held_out"]) == {"site_2"}
    rows = read_metrics_csv(trainer.checkpoint_dir.parent / "metrics.csv")
    assert {(r["client"], r["split"]) for r in rows if r["round"] == 2} >= {
        (POOLED_CLIENT, "train"),
        ("site_0", "test"),
        ("site_2", "test"),
        ("mean", "test"),
    }
    checkpoint = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")
    assert checkpoint["clients"][POOLED_CLIENT]["optimizer_state"]["state"]  # its momentum continues on resume
    resumed = FederatedTrainer(rounds=3, held_out_clients=["site_2"], pool_clients=True, **trainer_kwargs)
    resumed.fit(tiny_classifier(alpha=0.0), tiny_histology(num_sites=3), ckpt_path="last")
    assert resumed.client_records[POOLED_CLIENT].optimizer_state is not None and resumed.best_round is not None


def test_pooled_loader_is_the_union_of_the_clients_training_data():
    data = tiny_histology(num_sites=3)
    data.setup()
    loader = data.pooled_dataloader(["site_0", "site_2"], generator=torch.Generator().manual_seed(0))
    assert sum(len(images) for images, _ in loader) == 32
    with pytest.raises(ValueError, match="at least one"):
        data.pooled_dataloader([])


@pytest.mark.parametrize("kwargs", [{"local_modules": ["norm"]}, {"clients_per_round": 1}])
def test_pooled_training_refuses_settings_it_cannot_honour(kwargs):
    with pytest.raises(ValueError, match="pool_clients"):
        FederatedTrainer(pool_clients=True, enable_progress_bar=False, **kwargs)
