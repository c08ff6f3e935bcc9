"""Client LightningModules: models, losses, metrics, the perturbation step under Fabric and Trainer."""

import copy
import functools

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from callbacks import AmplitudeHarmonization
from harmofl.clients import ClassificationClient, SegmentationClient
from harmofl.losses import ce_dice_loss, soft_dice_loss
from harmofl.perturbation import WeightPerturbation

from helpers import SGD, tiny_classifier, tiny_segmenter


def _batch(num_classes=2, segmentation=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, 32, 32, generator=generator)
    shape = (8, 32, 32) if segmentation else (8,)
    return images, torch.randint(0, num_classes, shape, generator=generator)


def _fabric_step(client, precision: str, batch):
    fabric = L.Fabric(accelerator="cpu", devices=1, precision=precision)
    module, optimizer = fabric.setup(client, client.configure_optimizers())
    return module.training_step(batch, 0), optimizer


def test_training_step_is_the_perturbation_step_and_returns_the_unperturbed_loss():
    batch = _batch()
    client = tiny_classifier()
    reference = copy.deepcopy(client)
    with torch.no_grad():
        expected_loss = client.compute_loss(client(batch[0]), batch[1])
    loss, _ = _fabric_step(client, "32-true", batch)
    torch.testing.assert_close(loss, expected_loss)
    # The same step by hand on a copy with a plain WeightPerturbation.
    optimizer = WeightPerturbation(reference.parameters(), SGD, alpha=0.05)
    reference.compute_loss(reference(batch[0]), batch[1]).backward()
    optimizer.perturb()
    reference.compute_loss(reference(batch[0]), batch[1]).backward()
    optimizer.step()
    for p_ours, p_ref in zip(client.parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)


def test_bf16_mixed_step_matches_fp32():
    batch = _batch()
    fp32, bf16 = tiny_classifier(), tiny_classifier()
    start = [p.detach().clone() for p in fp32.parameters()]
    _fabric_step(fp32, "32-true", batch)
    _fabric_step(bf16, "bf16-mixed", batch)
    update = torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(fp32.parameters(), start)))
    difference = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(fp32.parameters(), bf16.parameters())))
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    assert difference < 0.05 * update, (float(difference), float(update))


def test_nan_loss_raises_a_clear_error():
    images, labels = _batch()
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="Non-finite training loss"):
        _fabric_step(tiny_classifier(batch_norm_stats="running"), "32-true", (images, labels))


def test_classification_metrics_binary_and_multiclass():
    binary = tiny_classifier()
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 0.0], [0.0, 1.0]])
    binary.update_metrics(binary.metrics["val"], logits, torch.tensor([0, 1, 1, 1]))
    values = binary.metrics["val"].compute()
    assert float(values["accuracy"]) == pytest.approx(0.75) and float(values["auroc"]) == pytest.approx(1.0)
    multi = tiny_classifier(num_classes=3)
    multi.update_metrics(multi.metrics["test"], torch.eye(3) * 3, torch.tensor([0, 1, 0]))
    assert float(multi.metrics["test"].compute()["accuracy"]) == pytest.approx(2 / 3)


def test_segmentation_loss_and_dice_against_formulas():
    targets = torch.zeros(2, 4, 4, dtype=torch.long)
    targets[:, :2] = 1
    logits = torch.zeros(2, 2, 4, 4)
    logits[:, 1, :2] = 20.0  # confident and right on the foreground
    logits[:, 0, 2:] = 20.0
    assert float(soft_dice_loss(logits, targets)) == pytest.approx(0.0, abs=1e-6)
    ce = torch.nn.functional.cross_entropy(logits, targets)
    torch.testing.assert_close(ce_dice_loss(logits, targets), 0.5 * (ce + soft_dice_loss(logits, targets)))
    client = tiny_segmenter()
    predictions = torch.zeros(2, 2, 4, 4)
    predictions[:, 1, :1] = 1.0  # predicts half of the foreground: dice = 2*8 / (8 + 16)
    client.update_metrics(client.metrics["val"], predictions, targets)
    assert float(client.metrics["val"].compute()["dice"]) == pytest.approx(2 * 8 / 24)


def test_models_are_built_by_name_and_train():
    seg = tiny_segmenter()
    loss, _ = _fabric_step(seg, "32-true", _batch(segmentation=True))
    assert torch.isfinite(loss)
    smp_client = SegmentationClient(backbone="resnet18", alpha=0.0)
    assert smp_client.eval()(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)
    densenet = ClassificationClient(backbone="harmofl_densenet121")
    assert densenet.eval()(torch.rand(2, 3, 96, 96)).shape == (2, 2)


def test_batch_statistics_mode_drops_running_statistics():
    client = tiny_classifier(batch_norm_stats="batch")
    assert not any("running_mean" in key for key in client.state_dict())
    assert any("running_mean" in key for key in tiny_classifier(batch_norm_stats="running").state_dict())


def test_local_weights_file_loads_strictly(tmp_path):
    source = tiny_classifier()
    path = tmp_path / "weights.pt"
    torch.save({"state_dict": source.model.state_dict()}, path)
    loaded = ClassificationClient(backbone="test_resnet", batch_norm_stats="batch", weights_path=str(path))
    for a, b in zip(source.model.state_dict().values(), loaded.model.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="do not fit the model"):
        ClassificationClient(backbone="test_resnet", batch_norm_stats="batch", num_classes=3, weights_path=str(path))
    with pytest.raises(ValueError, match="missing keys"):
        ClassificationClient(backbone="test_resnet", weights_path=str(path))  # running statistics absent
    running = tiny_classifier(batch_norm_stats="running")
    torch.save(running.model.state_dict(), path)  # a file with running statistics loads in batch mode
    ClassificationClient(backbone="test_resnet", batch_norm_stats="batch", weights_path=str(path))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ClassificationClient(backbone="test_resnet", weights_path=str(tmp_path / "missing.pt"))


def test_client_and_callback_also_train_under_a_plain_lightning_trainer():
    """The same module and callback are ordinary Lightning citizens (single-site training)."""
    images, labels = _batch()
    loader = DataLoader(TensorDataset(images, labels), batch_size=4)
    client = tiny_classifier(optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    harmonization = AmplitudeHarmonization()
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[harmonization],
    )
    before = [p.detach().clone() for p in client.parameters()]
    trainer.fit(client, train_dataloaders=loader)
    assert "local" in harmonization.client_targets
    assert any(not torch.equal(b, p) for b, p in zip(before, client.parameters()))


def test_fedprox_term_pulls_towards_the_starting_weights():
    """Two plain SGD steps (alpha 0) with FedProx equal the steps written out by hand."""
    images, labels = _batch()
    lr, mu = 0.1, 0.5
    client = tiny_classifier(alpha=0.0, proximal_mu=mu, optimizer=functools.partial(torch.optim.SGD, lr=lr))
    reference = copy.deepcopy(client)
    fabric = L.Fabric(accelerator="cpu", devices=1)
    module, _ = fabric.setup(client, client.configure_optimizers())
    client.on_train_client_start()
    losses = [module.training_step((images, labels), i) for i in range(2)]
    start = [p.detach().clone() for p in reference.parameters()]
    for _ in range(2):
        reference.zero_grad()
        loss = reference.compute_loss(reference(images), labels)
        loss.backward()
        with torch.no_grad():
            for p, s in zip(reference.parameters(), start):
                p -= lr * (p.grad + mu * (p - s))
    for p_ours, p_ref in zip(client.parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(losses[1], loss.detach())  # the logged loss is the task loss, without the term


def test_fedprox_outside_the_orchestrator_is_a_clear_error():
    client = tiny_classifier(proximal_mu=0.1)
    with pytest.raises(RuntimeError, match="FederatedTrainer"):
        client.local_objective(*_batch())


@pytest.mark.parametrize(
    "options",
    [
        {"channels_last": True},
        {"compile_model": True, "compile_kwargs": {"backend": "eager"}},
        {"channels_last": True, "contrastive_mu": 1.0, "compile_model": True, "compile_kwargs": {"backend": "eager"}},
    ],
)
def test_gpu_speed_options_give_the_same_step_and_keep_parameter_names(options):
    """channels-last and torch.compile (traced with dynamo; the eager backend keeps the test fast on CPU)."""
    batch = _batch()
    reference = tiny_classifier(contrastive_mu=options.get("contrastive_mu", 0.0))
    client = tiny_classifier(**options)
    for module in (reference, client):
        module.on_train_client_start()
        _fabric_step(module, "32-true", batch)
    assert list(client.state_dict()) == list(reference.state_dict())
    for p_ours, p_ref in zip(client.parameters(), reference.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)
    if options.get("channels_last"):
        assert client.model.conv1[0].weight.is_contiguous(memory_format=torch.channels_last)
