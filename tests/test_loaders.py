"""The data pipeline at scale: one loader pool per process whose epochs are a fresh loader's, each process loading only
its own clients' images, and the decoded cache (same tensors, keyed on the files, damage rebuilt or refused)."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_camelyon import wilds_rows, write_wilds
from torch.utils.data import ConcatDataset, TensorDataset

from harmofl import FederatedTrainer
from harmofl.data import Camelyon17
from harmofl.data.checks import DataError
from harmofl.data.decoded_cache import data_file
from harmofl.data.loaders import LoaderOptions, LoaderPool, SplitLoader, fresh_loader
from harmofl.federation.executor import clients_read_by

from helpers import federation_of, tiny_classifier, tiny_histology

# --- which files a process opens: Python's audit events, no patching ----------------------------------------------

_OPENED: list[list[str]] = []


def _record_open(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], (str, os.PathLike)):
        _OPENED[-1].append(os.fspath(args[0]))


sys.addaudithook(_record_open)


@contextmanager
def opened_images() -> Iterator[list[str]]:
    """The paths opened inside the block (PIL opens an image file with ``open``)."""
    _OPENED.append([])
    try:
        yield _OPENED[-1]
    finally:
        _OPENED.pop()


def pngs(paths: list[str]) -> set[str]:
    return {Path(path).name for path in paths if path.endswith(".png")}


@pytest.fixture(scope="module")
def wilds(tmp_path_factory) -> Path:
    return write_wilds(tmp_path_factory.mktemp("data") / "camelyon17_v1.0", wilds_rows())


def patches_of(module: Camelyon17, client: str) -> set[str]:
    files = module._files[client]
    return {files.path(row).name for rows in module._checked[client].values() for row in rows.tolist()}


# --- the loader pool ---------------------------------------------------------------------------------------------


def datasets() -> list[TensorDataset]:
    return [TensorDataset(torch.arange(n * 10, n * 10 + n).float(), torch.arange(n)) for n in (7, 12, 5)]


def batches(loader) -> list[list[float]]:
    return [images.tolist() for images, _ in loader]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_pool_epochs_are_a_fresh_loaders_batches_and_draws(num_workers):
    torch.set_num_threads(1)
    options = LoaderOptions(num_workers, pin_memory=False)
    parts = datasets()
    pool = LoaderPool(options, lambda: parts)
    for round_seed in (3, 4):  # one loader per client split, reused round after round, each with its generator
        for members in ([parts[1]], [parts[0], parts[2]]):  # a client's split; the pooled union
            reused_generator, fresh_generator = torch.Generator().manual_seed(round_seed), torch.Generator()
            fresh_generator.manual_seed(round_seed)
            reused = SplitLoader(pool, members, 4, True, reused_generator)
            union = members[0] if len(members) == 1 else ConcatDataset(members)
            fresh = fresh_loader(union, 4, True, fresh_generator, options)
            assert len(reused) == len(fresh)
            for _ in range(2):  # epochs of a round: each draws as a new loader iteration does
                assert batches(reused) == batches(fresh)
            cut_reused, cut_fresh = iter(reused), iter(fresh)  # an epoch cut short (local_steps)
            assert next(cut_reused)[0].tolist() == next(cut_fresh)[0].tolist()
            del cut_reused, cut_fresh
            assert torch.equal(reused_generator.get_state(), fresh_generator.get_state())
        torch.manual_seed(round_seed)
        in_order = batches(SplitLoader(pool, [parts[2]], 2, False, None))
        global_after_pool = torch.get_rng_state()
        torch.manual_seed(round_seed)
        assert in_order == batches(fresh_loader(parts[2], 2, False, None, options))
        assert torch.equal(torch.get_rng_state(), global_after_pool)  # evaluation draws what a loader draws


def test_an_epoch_started_inside_another_reads_a_loader_of_its_own():
    parts = datasets()
    pool = LoaderPool(LoaderOptions(0, False), lambda: parts)
    outer, inner = SplitLoader(pool, [parts[0]], 3, False, None), SplitLoader(pool, [parts[1]], 5, False, None)
    seen = []
    for images, _ in outer:
        seen.append((images.tolist(), batches(inner)))  # a callback reading a client's data inside a step
    assert seen == [(batch, batches(fresh_loader(parts[1], 5, False, None, pool.options))) for batch in batches(outer)]


def test_a_fit_with_loader_workers_equals_one_without(trainer_kwargs):
    torch.set_num_threads(1)
    states = []
    for num_workers in (0, 2):
        trainer = FederatedTrainer(rounds=2, **trainer_kwargs)
        trainer.fit(tiny_classifier(), tiny_histology(num_workers=num_workers))
        states.append(trainer.global_state)
    assert all(torch.equal(states[0][key], states[1][key]) for key in states[0])


# --- each process loads its own clients ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("held_out", "pooled", "rank", "expected"),
    [
        ([], False, 1, ["hospital_1"]),
        (["hospital_1"], False, 1, ["hospital_1", "hospital_3"]),  # evaluates the held-out site, trains another
        ([], True, 0, ["hospital_0", "hospital_3", "hospital_1"]),  # the pooled client reads the union
        ([], True, 1, ["hospital_1"]),
    ],
)
def test_a_process_reads_its_clients_and_decodes_only_theirs(wilds, held_out, pooled, rank, expected):
    module = Camelyon17(str(wilds), truncate_to_smallest=False)
    with opened_images() as before_load:
        module.setup()
    assert not pngs(before_load)  # setup checks that files exist: it decodes none
    counts = {client: module.num_samples(client, "train") for client in module.client_names}
    federation = federation_of(counts, held_out=held_out, pool_clients=pooled, world_size=2)
    readers = clients_read_by(federation, rank, 2)
    assert readers == expected
    with opened_images() as opened:
        module.load(readers)
    assert module.loaded_clients == [client for client in module.client_names if client in readers]
    assert pngs(opened) == set().union(*(patches_of(module, client) for client in readers))


def test_the_demo_generates_a_site_when_it_is_first_used():
    data = tiny_histology(num_sites=3, cache=False)
    data.setup()
    assert [data.num_samples(site, "train") for site in data.client_names] == [16, 16, 16]
    assert data.loaded_clients == []  # counting generated nothing
    data.load(["site_1"])
    assert data.loaded_clients == ["site_1"]


def test_a_bad_image_of_another_process_s_client_is_not_decoded_here(tmp_path):
    root = write_wilds(tmp_path / "c", wilds_rows())
    module = Camelyon17(str(root))
    module.setup()
    corrupt = next(iter(sorted(patches_of(module, "hospital_0"))))
    next(root.glob(f"patches/*/{corrupt}")).write_bytes(b"not a png")
    module.load(["hospital_1", "hospital_3"])  # rank 1's clients: its data is good
    with pytest.raises(DataError, match=f"{corrupt}: corrupt image"):
        module.load(["hospital_0"])


# --- the decoded cache ---------------------------------------------------------------------------------------------


def items(module: Camelyon17, client: str, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dataset = module.dataset(client, split)
    return [dataset[index] for index in range(len(dataset))]  # type: ignore[arg-type]


def same_items(first, second) -> bool:
    return len(first) == len(second) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, second)
    )


def test_the_decoded_cache_serves_the_decoded_tensors_and_decodes_once(wilds, tmp_path):
    decoded = Camelyon17(str(wilds), image_size=64)  # resized as they are read: both paths
    decoded.setup()
    cached = Camelyon17(str(wilds), image_size=64, decoded_cache=True, decoded_cache_dir=str(tmp_path))
    cached.setup()
    for split in ("train", "val", "test"):
        assert same_items(items(cached, "hospital_3", split), items(decoded, "hospital_3", split))
    again = Camelyon17(str(wilds), image_size=64, decoded_cache=True, decoded_cache_dir=str(tmp_path))
    again.setup()
    with opened_images() as opened:
        again.load(["hospital_3"])
        served = items(again, "hospital_3", "train")
    assert not pngs(opened)  # neither checked nor read again: the entry stands for these very files
    assert same_items(served, items(decoded, "hospital_3", "train"))


def test_a_changed_file_is_decoded_again_and_a_corrupt_one_refused(tmp_path):
    root = write_wilds(tmp_path / "c", wilds_rows())
    cache = tmp_path / "cache"

    def module() -> Camelyon17:
        data = Camelyon17(
            str(root), centers=[0], split_mode="patient", decoded_cache=True, decoded_cache_dir=str(cache)
        )
        data.setup()
        return data

    def every_item(data: Camelyon17) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [item for split in ("train", "val", "test") for item in items(data, "hospital_0", split)]

    def entries(data: Camelyon17) -> set[Path]:
        return {data.dataset("hospital_0", split).index for split in ("train", "val", "test")}  # type: ignore[attr-defined]

    first, first_entries = every_item(module()), entries(module())
    target = sorted((root / "patches").glob("patient_000_node_0/*.png"))[0]
    Image.fromarray(np.full((96, 96, 3), 7, dtype=np.uint8)).save(target)
    changed = module()
    assert len(entries(changed) - first_entries) == 1  # the split holding the file has a new entry
    plain = Camelyon17(str(root), centers=[0], split_mode="patient")
    plain.setup()
    assert same_items(every_item(changed), every_item(plain)) and not same_items(every_item(changed), first)
    target.write_bytes(target.read_bytes()[:200])  # damaged: refused by the strict decoder, never served
    with pytest.raises(DataError, match=f"{target.name}: corrupt image"):
        module().load(["hospital_0"])


def test_a_damaged_entry_is_rebuilt_or_refused(wilds, tmp_path):
    def module() -> Camelyon17:
        data = Camelyon17(
            str(wilds), centers=[1], split_mode="patient", decoded_cache=True, decoded_cache_dir=str(tmp_path)
        )
        data.setup()
        return data

    expected = items(module(), "hospital_1", "val")
    index = module().dataset("hospital_1", "val").index  # type: ignore[attr-defined]
    data = data_file(index)
    data.write_bytes(data.read_bytes()[:-8])  # cut short: the index no longer matches, so it is decoded again
    with opened_images() as opened:
        assert same_items(items(module(), "hospital_1", "val"), expected)
    assert pngs(opened)
    index.write_bytes(b"garbage")  # an unreadable index: decoded again too
    assert same_items(items(module(), "hospital_1", "val"), expected)
    damaged = bytearray(data.read_bytes())
    damaged[100] ^= 0xFF  # same size, wrong bytes: the image's checksum refuses it
    data.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=f"{index.name}.*is damaged.*delete"):
        items(module(), "hospital_1", "val")


def test_a_fit_on_the_decoded_cache_with_workers_equals_one_decoding(wilds, tmp_path, trainer_kwargs):
    torch.set_num_threads(1)
    states = []
    for cached, workers in ((False, 0), (True, 2), (True, 2)):  # the last run reads the entries the second wrote
        data = Camelyon17(
            str(wilds),
            image_size=32,
            batch_size=3,  # no batch of one sample (batch norm)
            eval_batch_size=8,
            max_per_split=6,
            num_workers=workers,
            decoded_cache=cached,
            decoded_cache_dir=str(tmp_path),
        )
        trainer = FederatedTrainer(rounds=1, **trainer_kwargs)  # one folder: the workers must not keep its lock
        trainer.fit(tiny_classifier(), data)
        states.append(trainer.global_state)
        assert not multiprocessing.active_children()  # the loader's workers stop with the fit
    assert all(torch.equal(states[0][key], state[key]) for state in states[1:] for key in states[0])
