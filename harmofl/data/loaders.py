"""One loader per process for every client split it reads, so that worker processes start once, not per client,
split, round and epoch.

:class:`LoaderPool` keeps one :class:`~torch.utils.data.DataLoader` over the concatenation of the datasets it has
been asked for, with persistent workers. Each epoch of a :class:`SplitLoader` points the pool's batch sampler at its
own rows; the indices are drawn in the main process, so the workers never need to know which split they serve.
The order of an epoch is drawn exactly as a fresh ``DataLoader(dataset, shuffle=..., generator=...)`` draws it
(the same random draws, from the same generators), so that batches, and every later draw, are the same as with a
loader made per round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler


def length(dataset: Dataset) -> int:
    """The number of rows of a map-style dataset (``Dataset`` itself declares no ``__len__``)."""
    return len(dataset)  # type: ignore[arg-type]


@dataclass(frozen=True)
class LoaderOptions:
    """What every loader of a data module shares."""

    num_workers: int
    pin_memory: bool


def fresh_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None, options: LoaderOptions
) -> DataLoader:
    """A loader of its own over ``dataset`` (workers started per epoch): the reference order :class:`LoaderPool`
    reproduces, and the loader of an epoch read while the pool is busy with another."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator if shuffle else None,
        num_workers=options.num_workers,
        pin_memory=options.pin_memory,
        persistent_workers=False,
    )


def epoch_batches(
    num_samples: int, batch_size: int, shuffle: bool, generator: torch.Generator | None
) -> Iterator[list[int]]:
    """The batches (row indices) of one epoch, drawn as ``DataLoader(shuffle=shuffle, generator=generator)`` draws
    them: first the loader's per-epoch base seed (from ``generator``, else torch's global RNG), then torch's own
    samplers; the last, partial batch is kept."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # DataLoader's base seed, drawn every epoch
    rows = range(num_samples)
    sampler = RandomSampler(rows, generator=generator) if shuffle else SequentialSampler(rows)
    yield from BatchSampler(sampler, batch_size, drop_last=False)


@dataclass(frozen=True)
class EpochPlan:
    """What the pool's next epoch reads: ``members[i]`` is the pool index of row ``i``."""

    members: Sequence[int]
    batch_size: int
    shuffle: bool
    generator: torch.Generator | None


class _PlannedBatches(Sampler[list[int]]):
    """The pool's batch sampler: the batches of the plan set before each epoch, as pool indices."""

    def __init__(self) -> None:
        self.plan: EpochPlan | None = None

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        assert plan is not None, "LoaderPool sets a plan before each epoch"
        for batch in epoch_batches(len(plan.members), plan.batch_size, plan.shuffle, plan.generator):
            yield [plan.members[row] for row in batch]

    def __len__(self) -> int:
        assert self.plan is not None
        return -(-len(self.plan.members) // self.plan.batch_size)


class LoaderPool:
    """One persistent loader over every dataset it serves (workers started once while the datasets stay the same).

    A dataset not yet in the pool rebuilds it (and restarts its workers) with every dataset ``loaded()`` returns; a
    process loads its clients up front, so this happens once.
    """

    def __init__(self, options: LoaderOptions, loaded: Callable[[], list[Dataset]]) -> None:
        self.options, self.loaded = options, loaded
        self.datasets: list[Dataset] = []
        self.offsets: dict[int, int] = {}  # id(dataset) -> its first pool index
        self.loader: DataLoader | None = None
        self.sampler = _PlannedBatches()
        self.busy = False

    def members(self, datasets: Sequence[Dataset]) -> Sequence[int]:
        """The pool indices of the rows of ``datasets``, concatenated (their order in a ``ConcatDataset``)."""
        missing = [dataset for dataset in datasets if id(dataset) not in self.offsets]
        if missing or self.loader is None:
            every = [*self.datasets, *self.loaded(), *missing]
            self._rebuild(list({id(dataset): dataset for dataset in every}.values()))
        spans = [range(self.offsets[id(d)], self.offsets[id(d)] + length(d)) for d in datasets]
        return spans[0] if len(spans) == 1 else [row for span in spans for row in span]

    def _rebuild(self, datasets: list[Dataset]) -> None:
        self.close()
        self.datasets = datasets
        starts = ConcatDataset(datasets).cumulative_sizes
        self.offsets = {id(dataset): end - length(dataset) for dataset, end in zip(datasets, starts)}
        self.loader = DataLoader(
            ConcatDataset(datasets),
            batch_sampler=self.sampler,
            num_workers=self.options.num_workers,
            pin_memory=self.options.pin_memory,
            persistent_workers=self.options.num_workers > 0,
            generator=torch.Generator(),  # the workers' seeds: never torch's global RNG, which clients' code uses
        )

    def epoch(self, plan: EpochPlan) -> Iterator[Any]:
        """The batches of one epoch of ``plan`` (the pool must not be busy)."""
        assert self.loader is not None and not self.busy
        self.busy = True
        try:
            self.sampler.plan = plan
            yield from self.loader
        finally:
            self.busy = False

    def close(self) -> None:
        """Let the workers go: the loader's iterator stops them when it is collected (at the latest with the
        process)."""
        self.loader = None


class SplitLoader:
    """The batches of one client's split (or of the pooled union of training splits): each iteration is one epoch,
    shuffled with ``generator`` when ``shuffle``. It reads through the pool, or, when an epoch starts while the
    pool serves another (a callback reading a client's data from inside a step), through a loader of its own."""

    def __init__(
        self,
        pool: LoaderPool,
        datasets: Sequence[Dataset],
        batch_size: int,
        shuffle: bool,
        generator: torch.Generator | None,
    ) -> None:
        self.pool, self.datasets = pool, list(datasets)
        self.batch_size, self.shuffle, self.generator = batch_size, shuffle, generator
        self.num_samples = sum(length(dataset) for dataset in self.datasets)

    @property
    def dataset(self) -> Dataset:
        """The rows this loader reads."""
        return self.datasets[0] if len(self.datasets) == 1 else ConcatDataset(self.datasets)

    def __len__(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[Any]:
        if self.pool.busy:
            yield from fresh_loader(self.dataset, self.batch_size, self.shuffle, self.generator, self.pool.options)
            return
        members = self.pool.members(self.datasets)
        yield from self.pool.epoch(EpochPlan(members, self.batch_size, self.shuffle, self.generator))
