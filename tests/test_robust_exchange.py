"""Issue 14: a robust, minimal amplitude exchange (only the band window, only when due, checked, combined by the
configured aggregator), SCAFFOLD's control under robust aggregation, settings that trim nothing, integer and variance
entries in range."""

import pytest
import torch

from callbacks import AmplitudeHarmonization, Scaffold
from harmofl import validation
from harmofl.aggregation import weighted_average
from harmofl.aggregators import Mean, Median, TrimmedMean
from harmofl.amplitude import amplitude_spectrum, crop_window, harmonize, window_indices, window_shape
from harmofl.trainer import FederatedTrainer

from helpers import federation_of, tiny_classifier, tiny_histology

IMAGE_SHAPE = [3, 8, 8]


def _images(seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * scale


def _trainer(aggregator, clients, tmp_path, **federation) -> FederatedTrainer:
    """A real trainer's aggregation of client values (one process), over a federation of ``clients``."""
    trainer = FederatedTrainer(
        aggregator=aggregator, accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path)
    )
    trainer.federation = federation_of(dict.fromkeys(clients, 10), **federation)
    return trainer


def _trained(callback: AmplitudeHarmonization, client: str, images: torch.Tensor) -> None:
    callback.on_train_batch_start(type("T", (), {"current_client": client})(), None, [images], 0)


# -- only the band window, only when sharing is due ------------------------------------------------------------------


@pytest.mark.parametrize("band, window", [(0.0, (3, 1, 1)), (0.25, (3, 5, 5)), (0.5, (3, 8, 8))])
def test_a_site_keeps_and_sends_only_the_band_window_and_harmonizes_as_with_the_whole_spectrum(band, window):
    callback = AmplitudeHarmonization(band=band, momentum=0.1)
    images, second = _images(0), _images(1, scale=0.5)
    batch = images.clone()
    _trained(callback, "a", batch)
    _trained(callback, "a", second.clone())
    state = callback.client_state_dict("a")
    assert tuple(state["target"].shape) == window and state["image_shape"] == IMAGE_SHAPE
    full = torch.lerp(amplitude_spectrum(images).mean(0), amplitude_spectrum(second).mean(0), 0.1)
    assert torch.equal(state["target"], crop_window(full, band))
    # The first batch was harmonized to its own mean amplitude: bitwise what the whole spectrum gives.
    assert torch.equal(batch, harmonize(images, amplitude_spectrum(images).mean(0), band))


def test_a_dc_window_is_never_applied_to_images_of_another_size():
    # A [C, 1, 1] window fits any image size: the images' shape it comes from is kept with it, and checked.
    callback = AmplitudeHarmonization(momentum=0.1)
    _trained(callback, "a", _images(0))
    with pytest.raises(ValueError, match=r"changed shape from \(3, 8, 8\) to \(3, 16, 16\)"):
        _trained(callback, "a", torch.rand(4, 3, 16, 16))
    with pytest.raises(ValueError, match="every client must use the same image size"):
        callback.on_test_batch_start(type("T", (), {"current_client": "a"})(), None, [torch.rand(4, 3, 16, 16)], 0)


@pytest.mark.parametrize("size", [1, 2, 7, 8, 31, 96])
@pytest.mark.parametrize("band", [0.0, 0.1, 0.25, 0.4, 0.5])
def test_window_shape_counts_the_window_indices(size, band):
    assert window_shape((2, size, size + 1), band) == (
        2,
        len(window_indices(size, band)),
        len(window_indices(size + 1, band)),
    )


@pytest.mark.parametrize(
    "share_target, due", [("first_round", [True, False, False]), ("every_round", [True] * 3), ("never", [False] * 3)]
)
def test_targets_are_asked_of_the_sites_only_in_rounds_where_sharing_is_due(tmp_path, share_target, due):
    callback = AmplitudeHarmonization(share_target=share_target)
    trainer = _trainer(Mean(), ["a", "b"], tmp_path)
    asked = []
    for round_idx in range(3):
        asked.append(callback.shares_client_states())  # what the Flower executor asks the sites for
        _trained(callback, "a", _images(round_idx))
        _trained(callback, "b", _images(round_idx + 10))
        callback.on_aggregate(trainer, None, round_idx)
    assert asked == due


# -- strict checks of every contribution -------------------------------------------------------------------------------


def test_an_honest_target_at_the_amplitude_bound_is_accepted():
    callback = AmplitudeHarmonization()
    _trained(callback, "a", torch.ones(4, 3, 8, 8))  # DC = H·W·1, the largest amplitude of [0, 1] images
    state = callback.client_state_dict("a")
    assert state["target"].max().item() == 64.0
    AmplitudeHarmonization().load_client_state_dict("a", state)


@pytest.mark.parametrize(
    "target, image_shape, message",
    [
        (torch.full((3, 8, 8), 10.0), IMAGE_SHAPE, r"shape \(3, 8, 8\); the band=0.0 window of images \(3, 8, 8\)"),
        (torch.full((1, 1, 1), 10.0), IMAGE_SHAPE, r"shape \(1, 1, 1\)"),  # would broadcast
        (torch.full((3, 1), 10.0), IMAGE_SHAPE, r"shape \(3, 1\)"),
        (torch.tensor([[[10.0]], [[float("nan")]], [[10.0]]]), IMAGE_SHAPE, "NaN or Inf"),
        (torch.tensor([[[10.0]], [[-1.0]], [[10.0]]]), IMAGE_SHAPE, "negative amplitude"),
        (torch.full((3, 1, 1), 1e9), IMAGE_SHAPE, r"beyond H·W·max_pixel_value = 8·8·1.0 = 64"),
        (torch.full((3, 1, 1), 10, dtype=torch.int64), IMAGE_SHAPE, "not a floating-point tensor"),
        ("10", IMAGE_SHAPE, "str, not a floating-point tensor"),
        (torch.full((3, 1, 1), 10.0), [3, 8], "image shape"),
        (torch.full((3, 1, 1), 10.0), [3, -8, 8], "image shape"),
        (torch.full((3, 1, 1), 10.0), [3, True, 8], "image shape"),
        (torch.full((3, 1, 1), 1e30), [3, 10**200, 10**200], "image shape"),  # to loosen the bound
    ],
)
def test_a_forged_target_is_refused_naming_the_client(target, image_shape, message):
    callback = AmplitudeHarmonization()
    with pytest.raises(validation.InvalidUpdate, match=message) as refused:
        callback.load_client_state_dict("site_1", {"target": target, "image_shape": image_shape})
    assert "client 'site_1'" in str(refused.value)
    assert "site_1" not in callback.client_targets  # nothing of it was kept


def test_a_state_that_is_no_mapping_is_refused_naming_the_client():
    with pytest.raises(validation.InvalidUpdate, match="client 'site_1'.*its state is list, not a mapping"):
        AmplitudeHarmonization().load_client_state_dict("site_1", [torch.ones(3, 1, 1)])


def test_a_target_of_other_images_than_the_shared_one_is_refused():
    callback = AmplitudeHarmonization(share_target="every_round")
    callback.load_state_dict({**callback.state_dict(), "shared_target": torch.ones(3, 1, 1), "image_shape": [3, 8, 8]})
    # A larger claimed image would loosen the amplitude bound: once a shared target exists, its images decide.
    with pytest.raises(validation.InvalidUpdate, match=r"client 'b'.*images \(3, 512, 512\)"):
        callback.load_client_state_dict("b", {"target": torch.full((3, 1, 1), 1e5), "image_shape": [3, 512, 512]})


def test_a_server_target_out_of_range_is_refused_by_the_site():
    callback = AmplitudeHarmonization()
    state = {**callback.state_dict(), "shared_target": torch.full((3, 1, 1), -1.0), "image_shape": IMAGE_SHAPE}
    refused = r"amplitude target the server or checkpoint shares is refused.*negative"
    with pytest.raises(validation.InvalidUpdate, match=refused):
        callback.load_state_dict(state)


def test_a_whole_spectrum_target_of_an_older_checkpoint_loads_as_its_window():
    spectrum = amplitude_spectrum(_images(0)).mean(0)
    callback = AmplitudeHarmonization()
    callback.load_client_state_dict("a", {"target": spectrum})
    callback.load_state_dict({**callback.state_dict(), "shared_target": spectrum.clone(), "image_shape": None})
    assert torch.equal(callback.client_targets["a"], spectrum[:, :1, :1]) and callback.client_image_shapes["a"] == (
        3,
        8,
        8,
    )
    assert torch.equal(callback.target_for("a")[:, :1, :1], spectrum[:, :1, :1])


# -- combined by the configured aggregator ----------------------------------------------------------------------------


def _hostile_federation(aggregator, tmp_path):
    clients = ["s0", "s1", "s2", "s3", "evil"]
    callback = AmplitudeHarmonization(preset="paper")
    for index, client in enumerate(clients[:-1]):
        _trained(callback, client, _images(index))
    # In range (a constant image of 1s has DC = H·W), but far from every honest site: it would pull a mean.
    callback.load_client_state_dict("evil", {"target": torch.full((3, 8, 8), 63.0), "image_shape": IMAGE_SHAPE})
    windows = [callback.client_targets[client] for client in clients]
    callback.on_aggregate(_trainer(aggregator, clients, tmp_path), None, round_idx=0)
    return callback, windows


def test_median_of_targets_with_one_hostile_site_is_the_coordinate_median(tmp_path):
    callback, windows = _hostile_federation(Median(), tmp_path)
    assert torch.equal(callback.shared_target, torch.stack(windows).median(dim=0).values)
    honest = torch.stack(windows[:-1])
    assert bool((callback.shared_target <= honest.max(dim=0).values).all())
    mean, _ = _hostile_federation(Mean(), tmp_path / "mean")
    assert mean.shared_target.min() > 63 / 5  # what the weighted mean let one site do: every coefficient pulled


def test_the_weighted_mean_of_targets_is_the_formula_with_the_client_weights(tmp_path):
    trainer = _trainer(Mean(), ["a", "b", "c"], tmp_path, client_weighting="samples")
    trainer.federation.client_weight.update(a=1.0, b=3.0, c=5.0)
    values = {c: {"amplitude": amplitude_spectrum(_images(i)).mean(0)} for i, c in enumerate("abc")}
    combined = trainer.aggregate_client_values(values)
    assert torch.equal(combined["amplitude"], weighted_average(list(values.values()), [1.0, 3.0, 5.0])["amplitude"])


def test_a_target_of_another_image_shape_is_left_out_by_the_majority(tmp_path):
    callback = AmplitudeHarmonization()
    for index, client in enumerate(["a", "b", "c"]):
        _trained(callback, client, _images(index))
    # A consistent claim of 512x512 images: its DC coefficient may then be 4096 times larger.
    callback.load_client_state_dict("evil", {"target": torch.full((3, 1, 1), 1e5), "image_shape": [3, 512, 512]})
    with pytest.warns(UserWarning, match=r"clients \['evil'\].*left out"):
        callback.on_aggregate(_trainer(Mean(), ["a", "b", "c", "evil"], tmp_path), None, round_idx=0)
    assert callback.shared_image_shape == (3, 8, 8) and callback.shared_target.max() < 64


def test_no_majority_on_the_image_shape_stops_the_run(tmp_path):
    callback = AmplitudeHarmonization()
    _trained(callback, "a", _images(0))
    callback.load_client_state_dict("b", {"target": torch.full((3, 1, 1), 10.0), "image_shape": [3, 16, 16]})
    with pytest.raises(ValueError, match="No strict majority"):
        callback.on_aggregate(_trainer(Mean(), ["a", "b"], tmp_path), None, round_idx=0)


def test_a_bad_target_computed_in_simulation_stops_the_run_naming_the_client(tmp_path):
    callback = AmplitudeHarmonization()
    _trained(callback, "a", _images(0))
    _trained(callback, "b", _images(1, scale=3.0))  # pixels beyond max_pixel_value=1
    with pytest.raises(validation.InvalidUpdate, match="client 'b'.*raise the harmonization callback's max_pixel"):
        callback.on_aggregate(_trainer(Mean(), ["a", "b"], tmp_path), None, round_idx=0)


def test_scaffold_server_control_under_median_is_the_coordinate_median(tmp_path):
    clients = ["a", "b", "c", "d", "evil"]
    generator = torch.Generator().manual_seed(0)
    deltas = {c: {"w": torch.randn(4, 3, generator=generator)} for c in clients}
    deltas["evil"] = {"w": torch.full((4, 3), 1e6)}
    scaffold = Scaffold()
    scaffold._round_deltas = dict(deltas)
    scaffold.on_aggregate(_trainer(Median(), clients, tmp_path), None, round_idx=0)
    expected = torch.stack([deltas[c]["w"] for c in clients]).median(dim=0).values  # all participate: |S|/N = 1
    assert torch.equal(scaffold.server_control["w"], expected)
    assert scaffold.server_control["w"].abs().max() < 10


# -- settings that trim nothing --------------------------------------------------------------------------------------


def test_trimmed_mean_that_trims_nothing_is_refused():
    with pytest.raises(
        ValueError, match=r"TrimmedMean\(trim_ratio=0.1\) of 3 .*floor\(0.1·3\) = 0.*trim_ratio >= 0.334"
    ):
        TrimmedMean(0.1).check_count(3)
    with pytest.raises(ValueError, match="at least 3 clients"):
        TrimmedMean(0.4).check_count(2)
    TrimmedMean(0.334).check_count(3)  # the ratio the error suggests
    TrimmedMean(0.1).check_count(10)
    with pytest.raises(ValueError, match="0 trims nothing"):
        TrimmedMean(0.0)
    with pytest.raises(ValueError, match=r"TrimmedMean\(trim_ratio=0.1\) of 3"):
        TrimmedMean(0.1).combine([{"w": torch.zeros(2)}] * 3, [1.0] * 3)


def test_median_of_two_is_refused_before_any_client_trains():
    with pytest.raises(ValueError, match="Median of 2 client value"):
        Median().check_count(2)
    Median().check_count(3)
    federation = federation_of({"a": 1, "b": 1, "c": 1}, clients_per_round=2)
    with pytest.raises(ValueError, match="Median of 2"):
        Median().start_round(0, federation)


def test_a_run_with_median_of_two_sites_fails_in_round_one(trainer_kwargs):
    trainer = FederatedTrainer(rounds=2, aggregator=Median(), **trainer_kwargs)
    with pytest.raises(ValueError, match="Median of 2"):
        trainer.fit(tiny_classifier(), tiny_histology(num_sites=2))
    assert not (trainer.checkpoint_dir / "last.ckpt").exists()


# -- integer and variance entries -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, message",
    [
        (
            "bn.num_batches_tracked",
            torch.tensor(2**62),
            r"'bn.num_batches_tracked' holds integers in \[4611686018427387904",
        ),
        ("bn.num_batches_tracked", torch.tensor(-1), r"outside \[0, 2\*\*53\]"),
        ("index", torch.tensor([-(2**60), 1]), r"'index' holds integers"),
        ("bn.running_var", torch.tensor([1.0, -0.5]), r"'bn.running_var' holds a negative variance \(-0.5\)"),
    ],
)
def test_out_of_range_integer_and_variance_entries_are_refused(key, value, message):
    reference = {key: torch.zeros_like(value)}
    with pytest.raises(validation.InvalidUpdate, match=message):
        validation.check_update({key: value}, reference)


def test_in_range_integer_and_variance_entries_pass():
    update = {
        "bn.num_batches_tracked": torch.tensor(2**53),
        "index": torch.tensor([-3, 5]),
        "bn.running_var": torch.ones(2),
    }
    validation.check_update(update, {key: torch.zeros_like(value) for key, value in update.items()})
