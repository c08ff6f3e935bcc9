"""FedFA: the layer against its formula with the same draws, the server's variance, and the callback through the
orchestrator (global state, evaluation, checkpoint and resume)."""

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Callback

from callbacks import FeatureAugmentation
from callbacks.feature_augmentation import output_channels
from harmofl.checkpoint import load_checkpoint
from harmofl.feature_augmentation import (
    FeatureStatisticsAugmentation,
    augmentation_scales,
    channel_weights,
    feature_statistics,
    federation_variance,
    restyle,
)
from harmofl.trainer import FederatedTrainer

from helpers import CLI_TINY, run_cli, tiny_classifier, tiny_histology, tiny_segmenter

EPS = 1e-6
SMALL_MAPS = "ignore:FeatureStatisticsAugmentation passes"  # test_resnet's layer4 is 1x1 on 32x32 images
SITES = ["site_0", "site_1", "site_2"]


def _features(seed=0, shape=(4, 3, 5, 6)):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * 2.0 + 0.5


# -- the pure functions against their formulas --------------------------------------------------------------------


def test_feature_statistics_are_the_spatial_mean_and_std():
    x = _features()
    mu, sigma = feature_statistics(x, EPS)
    flat = x.flatten(2)
    n = flat.shape[-1]
    expected_mu = flat.sum(-1) / n
    expected_var = ((flat - expected_mu[..., None]) ** 2).sum(-1) / (n - 1)
    torch.testing.assert_close(mu, expected_mu)
    torch.testing.assert_close(sigma, (expected_var + EPS).sqrt())


def test_channel_weights_are_the_normalized_shrunk_federation_variance():
    v = torch.tensor([0.0, 0.5, 1.0, 4.0])
    shrunk = [1 / (1 + 1 / (value + EPS)) for value in v.tolist()]
    expected = torch.tensor([len(shrunk) * s / sum(shrunk) for s in shrunk])
    gamma = channel_weights(v, EPS)
    torch.testing.assert_close(gamma, expected)
    torch.testing.assert_close(gamma.mean(), torch.tensor(1.0))
    torch.testing.assert_close(channel_weights(torch.ones(5), EPS), torch.ones(5))  # no disagreement: uniform


def test_augmentation_scales_mix_batch_and_federation_variances():
    mu, sigma = feature_statistics(_features(), EPS)
    var_mu_fed, var_sigma_fed = torch.tensor([0.1, 1.0, 3.0]), torch.tensor([2.0, 0.0, 0.5])
    std_mu, std_sigma = augmentation_scales(mu, sigma, var_mu_fed, var_sigma_fed, EPS)
    torch.testing.assert_close(std_mu**2, (channel_weights(var_mu_fed, EPS) + 1) * (torch.var(mu, dim=0) + EPS))
    torch.testing.assert_close(
        std_sigma**2, (channel_weights(var_sigma_fed, EPS) + 1) * (torch.var(sigma, dim=0) + EPS)
    )


def test_restyle_with_the_own_statistics_is_the_identity_and_sets_new_ones():
    x = _features()
    mu, sigma = feature_statistics(x, EPS)
    torch.testing.assert_close(restyle(x, mu, sigma, mu, sigma), x)  # Σ = 0: the features are unchanged
    new_mu, new_sigma = torch.full_like(mu, 3.0), torch.full_like(sigma, 0.5)
    out_mu, out_sigma = feature_statistics(restyle(x, mu, sigma, new_mu, new_sigma), EPS)
    torch.testing.assert_close(out_mu, new_mu)
    torch.testing.assert_close(out_sigma, new_sigma, atol=1e-4, rtol=1e-4)


def test_federation_variance_is_the_unbiased_variance_over_clients():
    values = [_features(seed).mean((0, 2, 3)) for seed in range(3)]
    torch.testing.assert_close(federation_variance(values), torch.var(torch.stack(values), dim=0, unbiased=True))
    with pytest.raises(ValueError, match="at least 2 clients' values, got 1"):
        federation_variance(values[:1])


# -- the layer ----------------------------------------------------------------------------------------------------


def test_layer_output_is_the_formula_with_the_same_draws_and_updates_the_running_statistics():
    layer = FeatureStatisticsAugmentation(3, probability=1.0, momentum=0.99, eps=EPS)
    layer.federation_var_mean.copy_(torch.tensor([0.2, 1.0, 5.0]))
    layer.federation_var_std.copy_(torch.tensor([3.0, 0.1, 1.0]))
    x = _features()
    torch.manual_seed(7)
    out = layer(x)
    # Written out: the probability draw, then β ~ N(μ, Σ_μ²), then γ̂ ~ N(σ, Σ_σ²), per sample and channel.
    torch.manual_seed(7)
    torch.rand(())
    mu = x.mean((2, 3))
    sigma = (x.var((2, 3)) + EPS).sqrt()
    gamma_mu = channel_weights(layer.federation_var_mean, EPS)
    gamma_sigma = channel_weights(layer.federation_var_std, EPS)
    std_mu = ((gamma_mu + 1) * (mu.var(0) + EPS)).sqrt()
    std_sigma = ((gamma_sigma + 1) * (sigma.var(0) + EPS)).sqrt()
    beta = mu + torch.randn_like(mu) * std_mu
    gamma_hat = sigma + torch.randn_like(sigma) * std_sigma
    expected = (x - mu[..., None, None]) / sigma[..., None, None] * gamma_hat[..., None, None] + beta[..., None, None]
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(layer.running_mean, 0.01 * mu.mean(0))
    torch.testing.assert_close(layer.running_std, 0.99 * torch.ones(3) + 0.01 * sigma.mean(0))


def test_layer_is_the_identity_in_evaluation_and_when_not_drawn():
    x = _features()
    evaluated = FeatureStatisticsAugmentation(3, probability=1.0).eval()
    torch.manual_seed(0)
    assert evaluated(x) is x
    drawn = torch.rand(())
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(()))  # evaluation draws nothing
    never = FeatureStatisticsAugmentation(3, probability=0.0).train()
    assert all(never(x) is x for _ in range(10))
    for layer in (evaluated, never):
        assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_std, torch.ones(3))


def test_layer_augments_about_the_given_fraction_of_forwards():
    layer = FeatureStatisticsAugmentation(3, probability=0.5)
    x = _features()
    torch.manual_seed(0)
    augmented = sum(layer(x) is not x for _ in range(400))
    assert 160 < augmented < 240


def test_layer_passes_maps_without_statistics_through_with_a_warning():
    layer = FeatureStatisticsAugmentation(3, probability=1.0)
    for shape in [(4, 3, 1, 1), (1, 3, 4, 4)]:
        x = _features(shape=shape)
        with pytest.warns(UserWarning, match="at least 2 samples and 2 spatial positions"):
            assert layer(x) is x
    assert torch.equal(layer.running_mean, torch.zeros(3))


def test_layer_refuses_bad_settings_and_feature_maps():
    with pytest.raises(ValueError, match="probability must be in \\[0, 1\\], got 1.5"):
        FeatureStatisticsAugmentation(3, probability=1.5)
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\], got -0.1"):
        FeatureStatisticsAugmentation(3, momentum=-0.1)
    with pytest.raises(ValueError, match="channels must be >= 1, got 0"):
        FeatureStatisticsAugmentation(0)
    with pytest.raises(ValueError, match="built for feature maps \\[B, 4, \\*spatial\\], got shape \\(4, 3, 5, 6\\)"):
        FeatureStatisticsAugmentation(4, probability=1.0)(_features())


# -- the callback on a module ---------------------------------------------------------------------------------------


def test_output_channels_are_read_from_the_stages_last_layers():
    resnet, unet = tiny_classifier().model, tiny_segmenter().model
    shapes = {}
    for name in ("layer1", "layer2", "layer3", "layer4"):
        resnet.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    resnet(torch.zeros(2, 3, 32, 32))
    assert {name: output_channels(resnet.get_submodule(name), name) for name in shapes} == {
        name: shape[1] for name, shape in shapes.items()
    }
    assert [output_channels(unet.get_submodule(f"encoder{i}"), "") for i in range(1, 5)] == [4, 8, 16, 32]
    with pytest.raises(ValueError, match="'act1' .* no convolution or normalization layer"):
        output_channels(resnet.act1, "act1")


@pytest.mark.filterwarnings(SMALL_MAPS)
def test_setup_adds_the_layers_once_and_leaves_evaluation_unchanged():
    client, plain = tiny_classifier(), tiny_classifier()
    callback = FeatureAugmentation()
    callback.setup(None, client, "fit")
    callback.setup(None, client, "test")  # again, for evaluation: nothing added
    keys = [k for k in client.state_dict() if k.startswith("feature_augmentation.")]
    assert len(keys) == 16 and "feature_augmentation.layer3.federation_var_std" in keys
    assert all(len(client.model.get_submodule(stage)._forward_hooks) == 1 for stage in callback.stages)
    images = torch.rand(4, 3, 32, 32)
    client.eval(), plain.eval()
    torch.testing.assert_close(client(images), plain(images), rtol=0, atol=0)
    client.train(), plain.train()
    torch.manual_seed(0)  # the first layer's draw: augmented
    assert not torch.allclose(client(images), plain(images))


def test_callback_refuses_bad_settings_and_unknown_stages():
    with pytest.raises(ValueError, match="probability must be in \\[0, 1\\], got 2"):
        FeatureAugmentation(probability=2)
    with pytest.raises(ValueError, match="distinct submodules"):
        FeatureAugmentation(stages=["a.b", "a_b"])
    with pytest.raises(ValueError, match="non-empty list"):
        FeatureAugmentation(stages=[])
    with pytest.raises(ValueError, match="'encoder1' is not a submodule .* \\['conv1', 'bn1'"):
        FeatureAugmentation(stages=["encoder1"]).setup(None, tiny_classifier(), "fit")


def test_aggregate_uses_only_this_rounds_records_of_at_least_two_clients():
    client = tiny_classifier()
    callback = FeatureAugmentation(stages=["layer1"])
    callback.setup(None, client, "fit")
    key = "feature_augmentation.layer1.federation_var_mean"
    trainer = SimpleNamespace(
        global_state={k: v.clone() for k, v in client.state_dict().items()},
        gather_client_values=lambda values: dict(values),
    )
    stats = [torch.rand(32) for _ in range(3)]
    for round_idx, (name, value) in zip([0, 1, 1], zip(SITES, stats)):
        callback.load_client_state_dict(
            name, {"round": round_idx, "running_mean": {"layer1": value}, "running_std": {"layer1": value * 2}}
        )
    callback.on_aggregate(trainer, client, round_idx=1)  # site_0's record is stale
    torch.testing.assert_close(trainer.global_state[key], torch.var(torch.stack(stats[1:]), dim=0))
    torch.testing.assert_close(client.feature_augmentation.layer1.federation_var_mean, trainer.global_state[key])
    before = trainer.global_state[key].clone()
    callback.on_aggregate(trainer, client, round_idx=0)  # one client: left as it was
    assert torch.equal(trainer.global_state[key], before)


# -- through the orchestrator -------------------------------------------------------------------------------------


class Recorder(Callback):
    """Each client's layer statistics after its local training, the global state each round starts from."""

    def __init__(self):
        self.trained, self.round_start = {}, {}

    def on_round_start(self, trainer, pl_module, round_idx):
        self.round_start[round_idx] = {k: v.clone() for k, v in trainer.global_state.items()}

    def on_train_client_end(self, trainer, pl_module, client, loss):
        state = pl_module.state_dict()
        self.trained[(trainer.current_round, client)] = {
            k: state[k].clone() for k in state if k.startswith("feature_augmentation.")
        }


def _expected_variances(recorder, round_idx):
    expected = {}
    for key in recorder.trained[(round_idx, SITES[0])]:
        layer, buffer = key.rsplit(".", 1)
        if buffer in ("running_mean", "running_std"):
            stacked = torch.stack([recorder.trained[(round_idx, site)][key] for site in SITES])
            federation = {"running_mean": "federation_var_mean", "running_std": "federation_var_std"}[buffer]
            expected[f"{layer}.{federation}"] = torch.var(stacked, dim=0)
            expected[key] = stacked.mean(0)  # FedAvg, uniform weights
    return expected


@pytest.mark.filterwarnings(SMALL_MAPS)
def test_fit_sets_the_federation_variance_of_the_clients_statistics(trainer_kwargs):
    recorder, callback = Recorder(), FeatureAugmentation()
    trainer = FederatedTrainer(rounds=2, callbacks=[callback, recorder], **trainer_kwargs)
    trainer.fit(tiny_classifier(alpha=0.0), tiny_histology(num_sites=3))
    after_round_1 = recorder.round_start[1]
    for key, value in _expected_variances(recorder, 0).items():
        torch.testing.assert_close(after_round_1[key], value)
    assert after_round_1["feature_augmentation.layer1.federation_var_mean"].gt(0).all()
    for site in SITES:
        recorded = callback.client_statistics[site]
        assert recorded["round"] == 1
        torch.testing.assert_close(
            recorded["running_std"]["layer2"], recorder.trained[(1, site)]["feature_augmentation.layer2.running_std"]
        )
    checkpoint = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")
    for key, value in _expected_variances(recorder, 1).items():
        torch.testing.assert_close(checkpoint["global_state"][key], value)
    assert checkpoint["clients"]["site_2"]["callbacks"][callback.state_key]["round"] == 1
    # Evaluation sees no layer: the trained module gives the outputs of a plain network with the same weights.
    plain = tiny_classifier(alpha=0.0)
    plain.load_state_dict({k: v for k, v in trainer.global_state.items() if not k.startswith("feature_augmentation.")})
    trainer.module.load_state_dict(trainer.global_state)
    images = torch.rand(4, 3, 32, 32)
    trainer.module.eval(), plain.eval()
    torch.testing.assert_close(trainer.module(images), plain(images), rtol=0, atol=0)


@pytest.mark.filterwarnings(SMALL_MAPS)
def test_fit_resumes_from_a_checkpoint_with_the_layers(trainer_kwargs, tmp_path):
    first = FederatedTrainer(rounds=1, callbacks=[FeatureAugmentation()], **trainer_kwargs)
    first.fit(tiny_classifier(alpha=0.0), tiny_histology(num_sites=3))
    saved = load_checkpoint(first.checkpoint_dir / "last.ckpt")["global_state"]
    recorder = Recorder()
    resumed = FederatedTrainer(rounds=2, callbacks=[FeatureAugmentation(), recorder], **trainer_kwargs)
    summary = resumed.fit(tiny_classifier(alpha=0.0), tiny_histology(num_sites=3), ckpt_path="last")
    assert summary["rounds"] == 2 and list(recorder.round_start) == [1]
    for key, value in saved.items():
        assert torch.equal(recorder.round_start[1][key], value), key
    # Seeded per client and round: the same run gives the same weights, augmentation draws included.
    again = FederatedTrainer(
        rounds=1, callbacks=[FeatureAugmentation()], **{**trainer_kwargs, "default_root_dir": str(tmp_path / "again")}
    )
    again.fit(tiny_classifier(alpha=0.0), tiny_histology(num_sites=3))
    assert all(torch.equal(again.global_state[key], value) for key, value in saved.items())


def test_overlay_fits_and_resumes_through_the_cli(tmp_path):
    """`cli.py fit` with the strategy overlay, one round, then continued from its checkpoint to two."""
    root = tmp_path / "fedfa"
    fit = ["fit", "--config", "configs/demo.yaml", "--config", "configs/strategies/fedfa.yaml", *CLI_TINY]
    fit += ["--trainer.default_root_dir", str(root)]
    run_cli(*fit, "--trainer.rounds", "1", env={"OMP_NUM_THREADS": "1"})
    first = load_checkpoint(root / "checkpoints" / "last.ckpt")
    assert {"feature_augmentation.layer1.running_mean", "feature_augmentation.layer4.federation_var_std"} <= set(
        first["global_state"]
    )
    run_cli(*fit, "--trainer.rounds", "2", "--ckpt_path", "last", env={"OMP_NUM_THREADS": "1"})
    resumed = load_checkpoint(root / "checkpoints" / "last.ckpt")
    assert first["round"] == 1 and resumed["round"] == 2 and {row["round"] for row in resumed["history"]} == {1, 2}
    key = "feature_augmentation.layer2.federation_var_mean"
    assert not torch.equal(resumed["global_state"][key], first["global_state"][key])
