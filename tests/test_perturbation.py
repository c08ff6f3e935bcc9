"""Weight perturbation: one step equals the same step written out by hand in plain PyTorch."""

import functools

import pytest
import torch
from torch import nn

from harmofl.perturbation import WeightPerturbation, global_grad_norm

ALPHA = 0.05


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _data():
    generator = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 8, 8, generator=generator), torch.randint(0, 2, (8,), generator=generator)


def _loss(model, images, labels):
    return nn.functional.cross_entropy(model(images), labels)


def _by_hand(model: nn.Module, base: torch.optim.Optimizer, images, labels, max_grad_norm=None) -> None:
    """The reference §2 step, spelled out."""
    params = list(model.parameters())
    _loss(model, images, labels).backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in params))
    deltas = [ALPHA * p.grad / (norm + 1e-12) for p in params]
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.add_(d)
    base.zero_grad()
    _loss(model, images, labels).backward()
    with torch.no_grad():
        for p, d in zip(params, deltas):
            p.sub_(d)
    if max_grad_norm is not None:
        total = torch.sqrt(sum((p.grad**2).sum() for p in params))
        factor = min(1.0, max_grad_norm / (float(total) + 1e-6))
        for p in params:
            p.grad.mul_(factor)
    base.step()
    base.zero_grad()


def _wrapped(model: nn.Module, optimizer: WeightPerturbation, images, labels) -> None:
    _loss(model, images, labels).backward()
    optimizer.perturb()
    _loss(model, images, labels).backward()
    optimizer.step()
    optimizer.zero_grad()


BASES = {
    "sgd": functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-4),
    "adam": functools.partial(torch.optim.Adam, lr=1e-2, weight_decay=1e-4),
    "adamw": functools.partial(torch.optim.AdamW, lr=1e-2, weight_decay=1e-2),
}


@pytest.mark.parametrize("name", sorted(BASES))
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_steps_equal_the_hand_written_step(name, max_grad_norm):
    images, labels = _data()
    reference, ours = _model(), _model()
    base = BASES[name](reference.parameters())
    wrapper = WeightPerturbation(ours.parameters(), BASES[name], alpha=ALPHA, max_grad_norm=max_grad_norm)
    for _ in range(3):  # several steps, so that momentum / Adam moments take part
        _by_hand(reference, base, images, labels, max_grad_norm)
        _wrapped(ours, wrapper, images, labels)
    for p_ref, p_ours in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=1e-6, rtol=0)


def test_perturb_moves_weights_by_alpha_along_the_normalized_gradient_and_step_restores_them():
    images, labels = _data()
    model = _model()
    optimizer = WeightPerturbation(model.parameters(), functools.partial(torch.optim.SGD, lr=0.0), alpha=ALPHA)
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, images, labels).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    norm = optimizer.perturb()
    torch.testing.assert_close(norm, torch.sqrt(sum((g**2).sum() for g in grads)))
    moved = torch.sqrt(sum(((p - b) ** 2).sum() for p, b in zip(model.parameters(), before)))
    torch.testing.assert_close(moved, torch.tensor(ALPHA), atol=1e-6, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    _loss(model, images, labels).backward()
    optimizer.step()  # lr 0: the weights must come back exactly
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_alpha_zero_is_the_base_optimizer():
    images, labels = _data()
    reference, ours = _model(), _model()
    base = BASES["sgd"](reference.parameters())
    wrapper = WeightPerturbation(ours.parameters(), BASES["sgd"], alpha=0.0)
    assert not wrapper.perturbs
    for model, optimizer in ((reference, base), (ours, wrapper)):
        _loss(model, images, labels).backward()
        optimizer.step()
    for p_ref, p_ours in zip(reference.parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours, p_ref, atol=0, rtol=0)


def test_state_dict_is_the_base_optimizers_and_round_trips():
    images, labels = _data()
    model = _model()
    optimizer = WeightPerturbation(model.parameters(), BASES["adam"], alpha=ALPHA)
    _wrapped(model, optimizer, images, labels)
    state = optimizer.state_dict()
    assert set(state["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    fresh = WeightPerturbation(model.parameters(), BASES["adam"], alpha=ALPHA)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.base_optimizer.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert fresh.param_groups is fresh.base_optimizer.param_groups


def test_a_scheduler_drives_the_base_learning_rate():
    model = _model()
    optimizer = WeightPerturbation(model.parameters(), BASES["sgd"], alpha=ALPHA)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    assert optimizer.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_errors_name_the_bad_value():
    with pytest.raises(ValueError, match="-0.1"):
        WeightPerturbation(_model().parameters(), BASES["sgd"], alpha=-0.1)
    with pytest.raises(ValueError, match="max_grad_norm"):
        WeightPerturbation(_model().parameters(), BASES["sgd"], max_grad_norm=0.0)
    with pytest.raises(RuntimeError, match="no gradients"):
        WeightPerturbation(_model().parameters(), BASES["sgd"]).perturb()


def test_global_grad_norm_is_the_norm_of_all_gradients_together():
    model = _model()
    images, labels = _data()
    _loss(model, images, labels).backward()
    flat = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(global_grad_norm(model.parameters()), flat.norm())
