"""Training-time augmentation (harmofl/data/augmentation.py): each transform against torch's own or its formula, masks
moving with their images, per-sample draws seeded per (round, client), and the runner augmenting training batches
only, reproducibly and resumably."""

import math
from pathlib import Path

import pytest
import torch

from harmofl.checkpoint import load_checkpoint
from harmofl.cli import build, parse_fit_config
from harmofl.data.augmentation import (
    DRAW_COLUMNS,
    FLIP_H,
    FLIP_V,
    TURN,
    Augmentation,
    affine_matrices,
    augmentation_generator,
    grayscale,
    jitter_colour,
    warp,
)
from harmofl.federation.callback import FederatedCallback
from harmofl.federation.topology import derive_seed
from harmofl.trainer import FederatedTrainer

from helpers import tiny_nuclei, tiny_segmenter

EVERYTHING = Augmentation(
    flip=True, rotate90=True, affine_degrees=20, affine_scale=(0.9, 1.1), affine_translate=0.1, color_jitter=0.2
)
QUARTER_TURNS = Augmentation(flip=True, rotate90=True, rotate90_weights=(2, 1, 1, 1))  # the prostate config's


@pytest.fixture(autouse=True)
def one_thread():
    """Runs compared bitwise do the same arithmetic: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _neutral(batch_size: int) -> torch.Tensor:
    """Draws that leave every transform at the identity (no turn, no flip, angle 0, shifts 0, jitter factors 1)."""
    uniforms = torch.full((batch_size, DRAW_COLUMNS), 0.5)
    uniforms[:, TURN] = 0.0
    uniforms[:, [FLIP_H, FLIP_V]] = 0.9
    return uniforms


def _images_and_masks(batch_size: int = 4, height: int = 8, width: int = 8):
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 3, height, width, generator=generator)
    return images, torch.randint(0, 3, (batch_size, height, width), generator=generator)


# --- each transform against a plain reference ------------------------------------------------------------------


def test_quarter_turns_follow_the_weights_and_are_torch_rot90_of_each_image_and_its_mask():
    images, masks = _images_and_masks(8)
    uniforms = _neutral(8)
    # Weights [2, 1, 1, 1]: [0, 0.4) no turn, [0.4, 0.6) one, [0.6, 0.8) two, [0.8, 1) three.
    uniforms[:, TURN] = torch.tensor([0.1, 0.39, 0.41, 0.59, 0.61, 0.79, 0.81, 0.99])
    turned, turned_masks = QUARTER_TURNS.apply(images, masks, uniforms)
    for index, turns in enumerate([0, 0, 1, 1, 2, 2, 3, 3]):
        assert torch.equal(turned[index], torch.rot90(images[index], turns, dims=(-2, -1)))
        assert torch.equal(turned_masks[index], torch.rot90(masks[index], turns, dims=(-2, -1)))


def test_flips_are_torch_flip_of_each_image_and_its_mask():
    images, masks = _images_and_masks(4)
    uniforms = _neutral(4)
    uniforms[:, FLIP_H] = torch.tensor([0.1, 0.9, 0.1, 0.9])
    uniforms[:, FLIP_V] = torch.tensor([0.9, 0.1, 0.1, 0.9])
    flipped, flipped_masks = Augmentation(flip=True).apply(images, masks, uniforms)
    for x, y in ((images, flipped), (masks, flipped_masks)):
        expected = [x[0].flip(-1), x[1].flip(-2), x[2].flip(-1).flip(-2), x[3]]
        assert all(torch.equal(y[index], value) for index, value in enumerate(expected))


def test_the_identity_warp_is_the_identity_and_a_quarter_turn_or_shift_moves_whole_pixels():
    images, masks = _images_and_masks(2)
    identity = affine_matrices(torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 2), 8, 8)
    torch.testing.assert_close(warp(images, identity), images, atol=1e-6, rtol=0)
    assert torch.equal(warp(masks, identity), masks) and warp(masks, identity).dtype == torch.long
    quarter = affine_matrices(torch.tensor([[math.pi / 2, 1.0, 0.0, 0.0]] * 2), 8, 8)  # clockwise on screen
    torch.testing.assert_close(warp(images, quarter), torch.rot90(images, -1, dims=(-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(warp(masks, quarter), torch.rot90(masks, -1, dims=(-2, -1)))
    shift = affine_matrices(torch.tensor([[0.0, 1.0, 0.25, 0.0]] * 2), 8, 8)  # a quarter of the width: 2 pixels
    shifted = warp(masks, shift)
    assert torch.equal(shifted[..., 2:], masks[..., :-2]) and not shifted[..., :2].any()  # zeros come in


def test_a_warped_mask_stays_class_indices_and_covers_its_object_in_the_warped_image():
    images = torch.zeros(6, 1, 32, 48)
    masks = torch.zeros(6, 32, 48, dtype=torch.long)
    images[:, :, 10:18, 12:30] = 1.0  # one object, class 2, at a known place
    masks[:, 10:18, 12:30] = 2
    augmentation = Augmentation(flip=True, affine_degrees=30, affine_scale=(0.8, 1.2), affine_translate=0.1)
    warped, warped_masks = augmentation(images, masks, torch.Generator().manual_seed(0))
    assert warped_masks.dtype == torch.long and set(warped_masks.unique().tolist()) == {0, 2}
    assert (warped_masks == 2).any(dim=(1, 2)).all()
    interior = warped[:, 0] > 1 - 1e-5  # where bilinear sees only object pixels, nearest does too
    assert interior.any() and (warped_masks[interior] == 2).all()
    assert (warped[:, 0][warped_masks == 2] >= 0.25 - 1e-6).all()  # nearest's source pixel is one of bilinear's 4
    assert not all(torch.equal(warped_masks[0], mask) for mask in warped_masks[1:])  # a transform per sample


def test_colour_jitter_is_torchvision_s_brightness_contrast_saturation_on_images_only():
    images, masks = _images_and_masks(3)
    factors = torch.tensor([[1.5, 1.0, 1.0], [1.0, 0.5, 1.0], [1.0, 1.0, 0.0]])
    jittered = jitter_colour(images, factors)
    torch.testing.assert_close(jittered[0], images[0] * 1.5)
    mean = grayscale(images[1:2]).mean()
    torch.testing.assert_close(jittered[1], (images[1] - mean) * 0.5 + mean)
    torch.testing.assert_close(jittered[2], grayscale(images[2:3])[0].expand(3, -1, -1))  # saturation 0: gray
    labels = torch.tensor([0, 1, 1])
    for targets in (masks, labels):
        _, untouched = Augmentation(color_jitter=0.2)(images, targets, torch.Generator().manual_seed(0))
        assert untouched is targets


def test_class_labels_pass_through_geometric_transforms():
    images, labels = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
    augmented, targets = EVERYTHING(images, labels, torch.Generator().manual_seed(0))
    assert targets is labels and augmented.shape == images.shape and not torch.equal(augmented, images)


def test_the_batch_is_augmented_per_sample_exactly_as_each_sample_alone():
    images, masks = _images_and_masks(6, 16, 16)
    uniforms = EVERYTHING.draw(6, torch.Generator().manual_seed(1))
    batch_images, batch_masks = EVERYTHING.apply(images, masks, uniforms)
    for index in range(6):
        alone_image, alone_mask = EVERYTHING.apply(
            images[index : index + 1], masks[index : index + 1], uniforms[[index]]
        )
        torch.testing.assert_close(batch_images[index : index + 1], alone_image, atol=1e-6, rtol=0)
        assert torch.equal(batch_masks[index : index + 1], alone_mask)
    same = images[:1].expand(6, -1, -1, -1)  # one image six times: six different results
    results = EVERYTHING.apply(same, masks[:1].expand(6, -1, -1), uniforms)[0]
    assert all(not torch.equal(results[i], results[j]) for i in range(6) for j in range(i))


# --- seeding -------------------------------------------------------------------------------------------------


def test_draws_are_seeded_per_round_and_client_apart_from_the_data_order():
    images, masks = _images_and_masks(4, 16, 16)

    def augmented(round_idx: int, client_index: int):
        return EVERYTHING(images, masks, augmentation_generator(derive_seed(0, round_idx, client_index)))

    first = augmented(1, 0)
    assert all(torch.equal(a, b) for a, b in zip(first, augmented(1, 0)))
    assert not torch.equal(first[0], augmented(2, 0)[0]) and not torch.equal(first[0], augmented(1, 1)[0])
    seed = derive_seed(0, 1, 0)  # the augmentation's stream is not the loader's (seeded with the same seed)
    assert not torch.equal(
        torch.rand(8, generator=torch.Generator().manual_seed(seed)),
        EVERYTHING.draw(8, augmentation_generator(seed))[:, 0],
    )


# --- through the runner ----------------------------------------------------------------------------------------


class RecordBatches(FederatedCallback):
    """The batches each step sees: training batches per client, validation and test batches in order."""

    def __init__(self) -> None:
        self.train: dict[str, list] = {}
        self.evaluation: list = []
        self.client = ""

    def on_train_client_start(self, trainer, pl_module, client, num_batches):
        self.client = client
        self.train[client] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train[self.client].append([x.clone() for x in batch])

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.evaluation.append([x.clone() for x in batch])

    on_test_batch_start = on_validation_batch_start


def _fit(root: Path, augmentation: Augmentation, rounds: int, ckpt_path: str | None = None):
    recorder = RecordBatches()
    trainer = FederatedTrainer(
        rounds=rounds,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[recorder],
    )
    trainer.fit(tiny_segmenter(), tiny_nuclei(augmentation=augmentation), ckpt_path=ckpt_path)
    return trainer, recorder, load_checkpoint(root / "checkpoints" / "last.ckpt")


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)


def test_only_training_batches_are_augmented_the_same_twice_and_the_weights_follow(tmp_path):
    trainer, augmented, checkpoint = _fit(tmp_path / "on", QUARTER_TURNS, rounds=1)
    _, plain, plain_checkpoint = _fit(tmp_path / "off", Augmentation(), rounds=1)
    _, _, again = _fit(tmp_path / "again", QUARTER_TURNS, rounds=1)
    # The same loader order (its own generator) and each client's batches augmented with its round generator.
    for client, batches in plain.train.items():
        generator = augmentation_generator(trainer.federation.client_seed(0, client))
        for (images, masks), (seen_images, seen_masks) in zip(batches, augmented.train[client]):
            expected_images, expected_masks = QUARTER_TURNS(images, masks, generator)
            assert torch.equal(seen_images, expected_images) and torch.equal(seen_masks, expected_masks)
    assert any(not torch.equal(a[1], b[1]) for a, b in zip(plain.train["site_0"], augmented.train["site_0"]))
    # Validation and test batches are the loader's.
    assert len(augmented.evaluation) == len(plain.evaluation) > 0
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(augmented.evaluation, plain.evaluation)
    )
    assert _same_weights(checkpoint["global_state"], again["global_state"])
    assert not _same_weights(checkpoint["global_state"], plain_checkpoint["global_state"])


def test_a_resumed_run_augments_as_an_uninterrupted_one(tmp_path):
    _, _, uninterrupted = _fit(tmp_path / "uninterrupted", EVERYTHING, rounds=2)
    _fit(tmp_path / "resumed", EVERYTHING, rounds=1)
    _, _, resumed = _fit(tmp_path / "resumed", EVERYTHING, rounds=2, ckpt_path="last")
    assert _same_weights(resumed["global_state"], uninterrupted["global_state"])
    assert resumed["history"] == uninterrupted["history"]


# --- settings --------------------------------------------------------------------------------------------------


def test_the_command_line_sets_it_and_the_prostate_config_follows_the_reference_loader():
    cli = build(
        [
            "--config",
            "configs/demo_seg.yaml",
            "--data.augmentation.flip",
            "true",
            "--data.augmentation.affine_scale",
            "[0.9, 1.1]",
        ]
    )
    assert cli.datamodule.augmentation == Augmentation(flip=True, affine_scale=(0.9, 1.1))
    _, config = parse_fit_config(["--config", "configs/prostate.yaml", "--data.init_args.root", "/data"])
    assert Augmentation(**config.data.init_args.augmentation.as_dict()) == QUARTER_TURNS
    default = build(["--config", "configs/demo_seg.yaml"]).datamodule.augmentation
    assert default == Augmentation() and not default.enabled


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"affine_degrees": -5}, r"affine_degrees must be in \[0, 180\].*got -5"),
        ({"affine_scale": (1.2, 0.8)}, r"affine_scale must be \[low, high\].*\[1.2, 0.8\].*smaller factor first"),
        ({"affine_scale": (0.0, 1.0)}, "0 < low <= high"),
        ({"affine_translate": 1.0}, r"affine_translate must be in \[0, 1\)"),
        ({"color_jitter": -0.1}, r"color_jitter must be in \[0, 1\)"),
        ({"rotate90_weights": (1, 1, 1)}, "rotate90_weights must be 4 non-negative weights"),
        ({"rotate90_weights": (0, 0, 0, 0)}, "positive sum"),
    ],
)
def test_bad_settings_are_refused_with_the_setting_named(settings, message):
    with pytest.raises(ValueError, match=message):
        Augmentation(**settings)


def test_quarter_turns_of_non_square_images_are_refused():
    images, masks = _images_and_masks(2, 8, 12)
    with pytest.raises(ValueError, match="rotate90 needs square images.*got 8x12"):
        Augmentation(rotate90=True)(images, masks, torch.Generator())


def test_a_bad_setting_on_the_command_line_names_it():
    with pytest.raises(Exception, match="affine_degrees must be in"):
        build(["--config", "configs/demo_seg.yaml", "--data.augmentation.affine_degrees", "-5"])
