"""FedRDN's random domain normalization and FedDG's amplitude interpolation: formulas, callbacks in a real fit."""

import numpy as np
import pytest
import torch

from callbacks import AmplitudeExchange, RandomDomainNormalization
from harmofl.amplitude import amplitude_spectrum
from harmofl.federation.callback import FederatedCallback
from harmofl.frequency_interpolation import draw_amplitudes, interpolate_amplitude
from harmofl.random_normalization import channel_statistics, normalize, random_site_normalization
from harmofl.trainer import FederatedTrainer

from helpers import tiny_classifier, tiny_histology


class BatchSpy(FederatedCallback):
    """Records the batches it is handed, by (round, client, stage): placed before a transforming callback it sees
    the raw batches, after it the transformed ones; also the training batch sizes the model sees."""

    def __init__(self):
        self.batches = {}
        self.train_sizes = {}

    def transform_batch(self, trainer, pl_module, batch, stage):
        key = (trainer.current_round, trainer.current_client, stage)
        self.batches.setdefault(key, []).append([tensor.clone() for tensor in batch])
        return batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train_sizes.setdefault(trainer.current_round, []).append(len(batch[0]))


def _all_training_images(data, client):
    return torch.cat([images for images, _ in data.dataloader(client, "train")])


def _pixel_statistics(images):
    per_channel = images.transpose(0, 1).reshape(images.shape[1], -1)
    return per_channel.mean(dim=1), per_channel.std(dim=1, correction=0)


# -- FedRDN: formulas --------------------------------------------------------------------------------------------


def test_normalize_is_x_minus_mean_over_std_per_channel():
    images = torch.rand(2, 3, 4, 5)
    mean, std = torch.tensor([0.1, 0.5, -0.2]), torch.tensor([0.5, 2.0, 0.25])
    expected = torch.stack([(images[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    torch.testing.assert_close(normalize(images, mean, std), expected)


def test_random_site_normalization_normalizes_each_image_with_one_sites_statistics():
    images = torch.rand(32, 2, 4, 4)
    means = torch.tensor([[0.0, 0.0], [0.5, -0.5], [1.0, 2.0]])
    stds = torch.tensor([[1.0, 1.0], [0.5, 2.0], [0.25, 4.0]])
    torch.manual_seed(0)
    out = random_site_normalization(images, means, stds)
    candidates = [(images - m[:, None, None]) / s[:, None, None] for m, s in zip(means, stds)]
    used = set()
    for index in range(len(images)):
        matches = [k for k, candidate in enumerate(candidates) if torch.allclose(out[index], candidate[index])]
        assert len(matches) == 1
        used.add(matches[0])
    assert used == {0, 1, 2}  # per image, not per batch
    torch.manual_seed(0)
    assert torch.equal(random_site_normalization(images, means, stds), out)  # from torch's global RNG


def test_channel_statistics_accumulated_in_pieces_are_those_over_all_pixels():
    images = torch.rand(10, 3, 5, 6) * torch.tensor([1.0, 3.0, 0.5])[:, None, None] + 2.0
    mean, std = channel_statistics([images[:3], images[3:7], images[7:]])
    expected_mean, expected_std = _pixel_statistics(images)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(std, expected_std)
    assert mean.dtype == std.dtype == torch.float32


def test_channel_statistics_refuse_no_images_and_constant_channels():
    with pytest.raises(ValueError, match="empty"):
        channel_statistics([])
    images = torch.rand(2, 3, 4, 4)
    images[:, 1] = 0.5
    with pytest.raises(ValueError, match=r"\[1\]"):
        channel_statistics([images])


# -- FedDG: formulas ---------------------------------------------------------------------------------------------


def _reference_interpolation(images, other_amplitudes, lam, band):
    """FedDG's released numpy code (fftshift, centred slice), with the interpolation of its paper."""
    out = []
    for image, other, weight in zip(images.double().numpy(), other_amplitudes.double().numpy(), lam.double().numpy()):
        spectrum = np.fft.fft2(image, axes=(-2, -1))
        amplitude = np.fft.fftshift(np.abs(spectrum), axes=(-2, -1))
        other = np.fft.fftshift(other, axes=(-2, -1))
        height, width = image.shape[-2:]
        bh, bw, ch, cw = int(height * band), int(width * band), height // 2, width // 2
        window = (slice(None), slice(ch - bh, ch + bh + 1), slice(cw - bw, cw + bw + 1))
        amplitude[window] = (1 - weight) * amplitude[window] + weight * other[window]
        amplitude = np.fft.ifftshift(amplitude, axes=(-2, -1))
        out.append(np.real(np.fft.ifft2(amplitude * np.exp(1j * np.angle(spectrum)), axes=(-2, -1))))
    return torch.from_numpy(np.stack(out)).float()


@pytest.mark.parametrize(("size", "band"), [((8, 8), 0.0), ((12, 10), 0.2), ((9, 9), 0.3), ((8, 8), 0.5)])
def test_interpolate_amplitude_matches_the_numpy_reference(size, band):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(3, 2, *size, generator=generator)
    others = amplitude_spectrum(torch.rand(3, 2, *size, generator=generator) * 3.0)
    lam = torch.tensor([0.0, 0.3, 1.0])
    out = interpolate_amplitude(images, others, lam, band)
    torch.testing.assert_close(out, _reference_interpolation(images, others, lam, band), atol=1e-5, rtol=1e-5)
    # In spectral terms: the window's amplitude interpolated, the rest of it unchanged, the phase kept.
    before, after = torch.fft.fft2(images.double()), torch.fft.fft2(out.double())
    height, width = size
    rows = torch.fft.fftfreq(height, 1 / height).abs() <= int(height * band)
    cols = torch.fft.fftfreq(width, 1 / width).abs() <= int(width * band)
    window = rows[:, None] & cols[None, :]
    weight = lam.double()[:, None, None, None]
    expected_amplitude = torch.where(window, (1 - weight) * before.abs() + weight * others.double(), before.abs())
    torch.testing.assert_close(after.abs(), expected_amplitude, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, torch.polar(expected_amplitude, before.angle()), atol=1e-4, rtol=1e-4)


def test_interpolate_amplitude_at_the_ends_of_lambda():
    generator = torch.Generator().manual_seed(1)
    images, other_images = torch.rand(2, 3, 8, 8, generator=generator), torch.rand(2, 3, 8, 8, generator=generator)
    others = amplitude_spectrum(other_images)
    torch.testing.assert_close(interpolate_amplitude(images, others, torch.zeros(2), 0.2), images)
    swapped = torch.fft.fft2(interpolate_amplitude(images, others, torch.ones(2), 0.5))
    torch.testing.assert_close(swapped.abs(), others, atol=1e-5, rtol=1e-5)  # the other amplitude ...
    torch.testing.assert_close(swapped, torch.polar(others, torch.fft.fft2(images).angle()), atol=1e-5, rtol=1e-5)


def test_interpolate_amplitude_keeps_half_precision_inputs_dtype():
    images = torch.rand(2, 3, 8, 8)
    others = amplitude_spectrum(torch.rand(2, 3, 8, 8))
    out = interpolate_amplitude(images.bfloat16(), others, torch.full((2,), 0.5), 0.2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(
        out.float(), interpolate_amplitude(images, others, torch.full((2,), 0.5), 0.2), atol=0.02, rtol=0.02
    )


def test_draw_amplitudes_draws_rows_of_the_banks_sites():
    bank = [
        torch.arange(2.0)[:, None, None, None].expand(2, 1, 2, 2),
        10 + torch.arange(5.0)[:, None, None, None].expand(5, 1, 2, 2),
    ]
    torch.manual_seed(0)
    drawn = draw_amplitudes(bank, 200, torch.device("cpu"))
    assert drawn.shape == (200, 1, 2, 2)
    values = set(drawn[:, 0, 0, 0].tolist())
    assert values == {0.0, 1.0, 10.0, 11.0, 12.0, 13.0, 14.0}
    from_first = (drawn[:, 0, 0, 0] < 10).float().mean()
    assert 0.35 < from_first < 0.65  # sites uniformly, not spectra
    with pytest.raises(ValueError, match=r"\[2, 0\]"):
        draw_amplitudes([bank[0], torch.zeros(0, 1, 2, 2)], 4, torch.device("cpu"))


# -- errors ------------------------------------------------------------------------------------------------------


def test_bad_settings_and_shapes_are_refused_naming_the_value():
    with pytest.raises(ValueError, match="0.7"):
        AmplitudeExchange(band=0.7)
    with pytest.raises(ValueError, match="bank_size.*0"):
        AmplitudeExchange(bank_size=0)
    flat = torch.rand(3, 4, 4)
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        normalize(flat, torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        random_site_normalization(flat, torch.zeros(1, 3), torch.ones(1, 3))
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        channel_statistics([flat])
    with pytest.raises(ValueError, match=r"\(3, 4, 4\)"):
        interpolate_amplitude(flat, flat, torch.zeros(3), 0.1)
    images = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"mean has shape \(2,\)"):
        normalize(images, torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"means has shape \(2, 2\)"):
        random_site_normalization(images, torch.zeros(2, 2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="0.6"):
        interpolate_amplitude(images, amplitude_spectrum(images), torch.zeros(2), 0.6)
    with pytest.raises(ValueError, match="1.5"):
        interpolate_amplitude(images, amplitude_spectrum(images), torch.tensor([0.0, 1.5]), 0.1)
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\)"):
        interpolate_amplitude(images, torch.rand(2, 3, 8, 8), torch.zeros(2), 0.1)


# -- the callbacks in a real fit ---------------------------------------------------------------------------------


def test_fedrdn_in_a_fit_shares_statistics_once_and_normalizes_as_specified(trainer_kwargs):
    data = tiny_histology(num_sites=3)
    raw, rdn, seen = BatchSpy(), RandomDomainNormalization(), BatchSpy()
    trainer = FederatedTrainer(rounds=2, held_out_clients=["site_2"], callbacks=[raw, rdn, seen], **trainer_kwargs)
    trainer.fit(tiny_classifier(), data)

    # The bank: every training site's statistics over all its training pixels, gathered after round 1.
    assert list(rdn.bank) == ["site_0", "site_1"] and rdn.complete and not rdn.shares_client_states()
    own = {client: _pixel_statistics(_all_training_images(data, client)) for client in data.client_names}
    for client in ("site_0", "site_1"):
        torch.testing.assert_close(rdn.bank[client]["mean"], own[client][0])
        torch.testing.assert_close(rdn.bank[client]["std"], own[client][1])

    def formula(images, client):
        return normalize(images, *own[client])

    # Round 1: no bank yet, a client normalizes with its own statistics.
    for (before, _), (after, _) in zip(raw.batches[(0, "site_0", "train")], seen.batches[(0, "site_0", "train")]):
        torch.testing.assert_close(after, formula(before, "site_0"))
    # Round 2: each image with the statistics of one of the bank's sites, both sites in use.
    used = set()
    for (before, _), (after, _) in zip(raw.batches[(1, "site_1", "train")], seen.batches[(1, "site_1", "train")]):
        for image, normalized in zip(before, after):
            matches = [c for c in rdn.bank if torch.allclose(normalized, formula(image[None], c)[0], atol=1e-5)]
            assert len(matches) == 1
            used.update(matches)
    assert used == {"site_0", "site_1"}
    # The held-out site evaluates with its own statistics (from its own training images), never shared.
    for stage in ("val", "test"):
        for (before, _), (after, _) in zip(raw.batches[(1, "site_2", stage)], seen.batches[(1, "site_2", stage)]):
            torch.testing.assert_close(after, formula(before, "site_2"))

    resumed = RandomDomainNormalization()
    FederatedTrainer(rounds=2, held_out_clients=["site_2"], callbacks=[resumed], **trainer_kwargs).fit(
        tiny_classifier(), tiny_histology(num_sites=3), ckpt_path="last"
    )
    assert list(resumed.bank) == list(rdn.bank) and resumed.complete
    for client in rdn.bank:
        torch.testing.assert_close(resumed.bank[client], rdn.bank[client])
    for client in data.client_names:  # every client's own statistics, from its record
        torch.testing.assert_close(resumed.client_summaries[client], rdn.client_summaries[client])


def _interpolation_weight(before, after, candidate, window):
    """The λ that best explains ``after``'s window amplitude from ``before``'s and ``candidate``, and its residual."""
    own, new = torch.fft.fft2(before.double()).abs()[..., window], torch.fft.fft2(after.double()).abs()[..., window]
    direction = candidate.double()[..., window] - own
    lam = float((new - own).mul(direction).sum() / direction.square().sum())
    return lam, float((own + lam * direction - new).abs().max())


def test_feddg_in_a_fit_banks_spectra_and_trains_on_both_versions(trainer_kwargs):
    raw, exchange, seen = BatchSpy(), AmplitudeExchange(band=0.1, bank_size=4), BatchSpy()
    trainer = FederatedTrainer(rounds=2, held_out_clients=["site_2"], callbacks=[raw, exchange, seen], **trainer_kwargs)
    trainer.fit(tiny_classifier(), tiny_histology(num_sites=3))

    # The bank: the first 4 training images' spectra of every training site, gathered after round 1.
    assert list(exchange.bank) == ["site_0", "site_1"] and exchange.complete
    for client in exchange.bank:
        first = raw.batches[(0, client, "train")][0][0][:4]
        torch.testing.assert_close(exchange.bank[client], amplitude_spectrum(first))
    # Round 1 trains on the batches as they are; round 2 on the originals and their interpolated copies.
    assert set(seen.train_sizes[0]) == {8} and set(seen.train_sizes[1]) == {16}
    window = torch.zeros(32, 32, dtype=torch.bool)
    window[torch.fft.fftfreq(32, 1 / 32).abs() <= 3] = True
    window &= window.clone().T
    for (before, targets), (after, after_targets) in zip(
        raw.batches[(1, "site_0", "train")], seen.batches[(1, "site_0", "train")]
    ):
        assert torch.equal(after[:8], before) and torch.equal(after_targets, torch.cat([targets, targets]))
        for image, interpolated in zip(before, after[8:]):
            spectrum, new = torch.fft.fft2(image.double()), torch.fft.fft2(interpolated.double())
            torch.testing.assert_close(new[..., ~window], spectrum[..., ~window], atol=1e-4, rtol=1e-4)
            # Explained by one of the other site's spectra and a λ in [0, 1].
            fits = [_interpolation_weight(image, interpolated, c, window) for c in exchange.bank["site_1"]]
            assert any(-1e-6 <= lam <= 1 + 1e-6 and residual < 1e-3 for lam, residual in fits)
    # Evaluation batches pass through unchanged.
    for stage in ("val", "test"):
        for (before, _), (after, _) in zip(raw.batches[(1, "site_2", stage)], seen.batches[(1, "site_2", stage)]):
            assert torch.equal(after, before)

    resumed = AmplitudeExchange(band=0.1, bank_size=4)
    FederatedTrainer(rounds=2, held_out_clients=["site_2"], callbacks=[resumed], **trainer_kwargs).fit(
        tiny_classifier(), tiny_histology(num_sites=3), ckpt_path="last"
    )
    assert list(resumed.bank) == list(exchange.bank) and resumed.complete
    for client in exchange.bank:
        torch.testing.assert_close(resumed.bank[client], exchange.bank[client])
        torch.testing.assert_close(resumed.client_summaries[client], exchange.client_summaries[client])
