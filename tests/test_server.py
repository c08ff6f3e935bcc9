"""Server optimizers against the FedOpt update rules, written out by hand."""

import pytest
import torch

from harmofl.server_optimizers import FedAdam, FedAvg, FedAvgM, FedYogi


def _states(seed: int):
    generator = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=generator), "n": torch.tensor(7)}


def _rounds():
    """A global model and the clients' means of three rounds."""
    return _states(0), [_states(1), _states(2), _states(3)]


def test_fedavg_with_lr_one_is_the_mean_exactly_and_with_lr_a_step_towards_it():
    start, means = _rounds()
    assert FedAvg().step(start, means[0]) == means[0]
    stepped = FedAvg(lr=0.5).step(start, means[0])
    torch.testing.assert_close(stepped["w"], start["w"] + 0.5 * (means[0]["w"] - start["w"]))
    assert int(stepped["n"]) == 7  # integer buffers take the clients' mean


def test_fedavgm_accumulates_server_momentum():
    x, means = _rounds()
    optimizer, m = FedAvgM(lr=0.7, momentum=0.9), torch.zeros(4, 3)
    for mean in means:
        new = optimizer.step(x, mean)
        m = 0.9 * m + (mean["w"] - x["w"])
        expected = x["w"] + 0.7 * m
        torch.testing.assert_close(new["w"], expected)
        x = new


@pytest.mark.parametrize("yogi", [False, True])
def test_fedadam_and_fedyogi_follow_reddi_et_al(yogi):
    x, means = _rounds()
    lr, beta1, beta2, tau = 0.1, 0.9, 0.99, 1e-3
    optimizer = (FedYogi if yogi else FedAdam)(lr=lr, beta1=beta1, beta2=beta2, tau=tau)
    m, v = torch.zeros(4, 3), torch.full((4, 3), tau**2)
    for mean in means:
        delta = mean["w"] - x["w"]
        m = beta1 * m + (1 - beta1) * delta
        if yogi:
            v = v - (1 - beta2) * delta**2 * torch.sign(v - delta**2)
        else:
            v = beta2 * v + (1 - beta2) * delta**2
        new = optimizer.step(x, mean)
        torch.testing.assert_close(new["w"], x["w"] + lr * m / (v.sqrt() + tau))
        x = new


def test_moments_round_trip_through_state_dict():
    x, means = _rounds()
    optimizer = FedAdam()
    x = optimizer.step(x, means[0])
    restored = FedAdam()
    restored.load_state_dict(optimizer.state_dict())
    torch.testing.assert_close(restored.step(x, means[1])["w"], optimizer.step(x, means[1])["w"])


@pytest.mark.parametrize(
    "make", [lambda: FedAvg(lr=0), lambda: FedAvgM(momentum=1.0), lambda: FedAdam(tau=0), lambda: FedYogi(beta2=-0.1)]
)
def test_bad_settings_are_rejected(make):
    with pytest.raises(ValueError, match="Server optimizer"):
        make()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_is_normalized_averaging_of_wang_et_al(momentum):
    from harmofl.server_optimizers import Contribution, FedNova

    x = _states(0)
    clients = [_states(1), _states(2), _states(3)]
    contributions = [
        Contribution(weight=1.0, num_steps=2),
        Contribution(weight=2.0, num_steps=5),
        Contribution(weight=1.0, num_steps=9),
    ]
    optimizer = FedNova(momentum=momentum)

    def a(tau):  # the paper's normalizer for SGD with momentum rho
        return tau if momentum == 0 else (tau - momentum * (1 - momentum**tau) / (1 - momentum)) / (1 - momentum)

    p = [c.weight / 4.0 for c in contributions]
    tau_eff = sum(pk * a(c.num_steps) for pk, c in zip(p, contributions))
    expected = x["w"] - tau_eff * sum(
        pk * (x["w"] - y["w"]) / a(c.num_steps) for pk, y, c in zip(p, clients, contributions)
    )
    # What the orchestrator hands the server: the mean weighted by weight x aggregation_factor(steps).
    factors = [c.weight * optimizer.aggregation_factor(c.num_steps) for c in contributions]
    mean = {"w": sum(f * y["w"] for f, y in zip(factors, clients)) / sum(factors), "n": torch.tensor(7)}
    torch.testing.assert_close(optimizer.step(x, mean, contributions)["w"], expected)


def test_fednova_with_equal_steps_is_fedavg():
    from harmofl.server_optimizers import Contribution, FedNova

    x, means = _rounds()
    same = [Contribution(1.0, 4), Contribution(3.0, 4)]
    torch.testing.assert_close(FedNova(momentum=0.9).step(x, means[0], same)["w"], means[0]["w"])
