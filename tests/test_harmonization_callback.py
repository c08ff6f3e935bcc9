"""The harmonization callback: every stage's batches, per-client targets, sharing, state."""

from types import SimpleNamespace

import pytest
import torch

from callbacks import AmplitudeHarmonization
from harmofl.amplitude import amplitude_spectrum, harmonize


class _Trainer(SimpleNamespace):
    """What the callback reads of a trainer: the client, and the gathering and aggregation of client values."""

    def gather_client_values(self, values):
        return dict(sorted(values.items()))

    def aggregate_client_values(self, values):
        clients = sorted(values)
        return {"amplitude": sum(values[c]["amplitude"] for c in clients) / len(clients)} if clients else None


def _batch(seed: int, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 8, 8, generator=generator) * scale, torch.zeros(4, dtype=torch.long)]


def test_training_batches_set_the_target_from_the_first_batch_and_are_harmonized_in_place():
    callback = AmplitudeHarmonization(preset="reference")
    trainer = _Trainer(current_client="a")
    batch = _batch(0)
    raw = batch[0].clone()
    callback.on_train_batch_start(trainer, None, batch, 0)
    target = amplitude_spectrum(raw).mean(0)
    # The DC-only window is all the client keeps: [C, 1, 1], the DC coefficients of the mean amplitude.
    assert torch.equal(callback.client_targets["a"], target[:, :1, :1])
    assert torch.equal(batch[0], harmonize(raw, target, 0.0))
    second = _batch(1, scale=0.5)
    callback.on_train_batch_start(trainer, None, second, 1)
    assert torch.equal(callback.client_targets["a"], target[:, :1, :1])  # momentum 0: never updated


@pytest.mark.parametrize("hook", ["on_validation_batch_start", "on_test_batch_start", "on_predict_batch_start"])
def test_evaluation_batches_are_harmonized_without_updating_the_target(hook):
    callback = AmplitudeHarmonization(preset="paper")
    trainer = _Trainer(current_client="a")
    callback.on_train_batch_start(trainer, None, _batch(0), 0)
    target = callback.client_targets["a"].clone()
    batch = _batch(1, scale=0.3)
    raw = batch[0].clone()
    getattr(callback, hook)(trainer, None, batch, 0)
    torch.testing.assert_close(callback.client_targets["a"], target)
    torch.testing.assert_close(batch[0], harmonize(raw, target, 0.5))


def test_paper_preset_updates_a_running_mean():
    callback = AmplitudeHarmonization(preset="paper")
    trainer = _Trainer(current_client="a")
    first, second = _batch(0), _batch(1, scale=0.5)
    amp_first, amp_second = amplitude_spectrum(first[0]).mean(0), amplitude_spectrum(second[0]).mean(0)
    callback.on_train_batch_start(trainer, None, first, 0)
    callback.on_train_batch_start(trainer, None, second, 1)
    torch.testing.assert_close(callback.client_targets["a"], 0.9 * amp_first + 0.1 * amp_second)


def test_first_round_sharing_averages_once_then_freezes():
    callback = AmplitudeHarmonization(preset="paper", share_target="first_round")
    trainer = _Trainer(current_client="a")
    callback.on_train_batch_start(trainer, None, _batch(0), 0)
    trainer.current_client = "b"
    callback.on_train_batch_start(trainer, None, _batch(1, scale=0.5), 0)
    expected = (callback.client_targets["a"] + callback.client_targets["b"]) / 2
    callback.on_aggregate(trainer, None, round_idx=0)
    assert callback.frozen
    torch.testing.assert_close(callback.shared_target, expected)
    # Frozen: no more updates, and every client (even one never seen) uses the shared target.
    before = callback.client_targets["b"].clone()
    batch = _batch(2, scale=2.0)
    raw = batch[0].clone()
    callback.on_train_batch_start(trainer, None, batch, 1)
    torch.testing.assert_close(callback.client_targets["b"], before)
    torch.testing.assert_close(batch[0], harmonize(raw, expected, 0.5))
    callback.client_targets["a"] += 1.0
    callback.on_aggregate(trainer, None, round_idx=1)
    torch.testing.assert_close(callback.shared_target, expected)


def test_never_sharing_keeps_each_client_on_its_own_target():
    callback = AmplitudeHarmonization(share_target="never")
    trainer = _Trainer(current_client="a")
    callback.on_train_batch_start(trainer, None, _batch(0), 0)
    callback.on_aggregate(trainer, None, round_idx=0)
    assert callback.shared_target is None and not callback.frozen


def test_state_round_trips_globally_and_per_client():
    callback = AmplitudeHarmonization(preset="paper")
    trainer = _Trainer(current_client="a")
    callback.on_train_batch_start(trainer, None, _batch(0), 0)
    callback.on_aggregate(trainer, None, round_idx=0)
    restored = AmplitudeHarmonization(preset="paper")
    restored.load_state_dict(callback.state_dict())
    restored.load_client_state_dict("a", callback.client_state_dict("a"))
    assert restored.frozen
    torch.testing.assert_close(restored.shared_target, callback.shared_target)
    torch.testing.assert_close(restored.client_targets["a"], callback.client_targets["a"])
    assert restored.client_state_dict("unknown") == {"target": None}
    assert callback.client_state_dict("a")["image_shape"] == [3, 8, 8]


def test_untrained_client_passes_images_through_with_a_warning():
    callback = AmplitudeHarmonization()
    batch = _batch(0)
    raw = batch[0].clone()
    with pytest.warns(UserWarning, match="no amplitude target"):
        callback.on_test_batch_start(_Trainer(current_client="x"), None, batch, 0)
    assert torch.equal(batch[0], raw)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="band"):
        AmplitudeHarmonization(band=0.7)
    with pytest.raises(ValueError, match="momentum"):
        AmplitudeHarmonization(momentum=1.5)
    with pytest.raises(ValueError, match="'sometimes'"):
        AmplitudeHarmonization(share_target="sometimes")
    with pytest.raises(ValueError, match="'fancy'"):
        AmplitudeHarmonization(preset="fancy")


def test_a_training_batch_costs_one_forward_fft_under_the_paper_preset(monkeypatch):
    # The batch's spectrum updates the running target and is harmonized: one FFT there and one inverse back.
    callback = AmplitudeHarmonization(preset="paper")
    trainer = _Trainer(current_client="a")
    callback.on_train_batch_start(trainer, None, _batch(0), 0)
    calls = []
    forward = torch.fft.rfft2
    monkeypatch.setattr(torch.fft, "rfft2", lambda *args, **kwargs: calls.append(1) or forward(*args, **kwargs))
    batch = _batch(1)
    raw = batch[0].clone()
    callback.on_train_batch_start(trainer, None, batch, 1)
    assert len(calls) == 1
    torch.testing.assert_close(batch[0], harmonize(raw, callback.target_for("a"), 0.5))
