"""Splitting a site's samples into train, val and test: by fractions, whole groups (patients, cases) at a time.

Every loader that splits by fractions calls :func:`split_groups`: the site's groups (one per patient, per case or
per sample) are put in a random order drawn from a seeded stream, and the first groups of that order go to train,
the next to val, the rest to test, cut where :func:`split_bounds` says. A group lands in one split only.

Two things differ between loaders, and stay as they are because they decide which sample lands where in runs
already made: the random stream (:func:`site_rng`, numpy's, for the loaders of file lists; :func:`named_generator`,
torch's, for the others) and, for the prostate cases, how the cuts are rounded (half to even, at least one case per
split) where the other loaders round halves up.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from harmofl.data.base import SPLITS, Split

Fractions = tuple[float, float, float]
Rounding = Literal["half_up", "half_even"]
Stream = np.random.Generator | torch.Generator


def check_fractions(fractions: Sequence[float], name: str, allow_empty: bool = True) -> Fractions:
    """Three train/val/test fractions summing to 1; each ``> 0`` unless ``allow_empty``."""
    smallest = min(fractions, default=-1.0)
    if len(fractions) != 3 or smallest < 0 or (smallest == 0 and not allow_empty) or abs(sum(fractions) - 1) > 1e-6:
        kind = ">= 0" if allow_empty else "> 0"
        raise ValueError(f"data.{name} must be 3 fractions (train, val, test) {kind} summing to 1, got {fractions}.")
    return (float(fractions[0]), float(fractions[1]), float(fractions[2]))


def named_generator(*parts: object) -> torch.Generator:
    """A torch generator seeded from ``parts`` (e.g. a namespace, the run seed, a site, a split).

    Each (site, split) gets its own stream, so adding a site or resizing one split never changes another.
    """
    digest = hashlib.blake2b("/".join(str(part) for part in parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little"))


def site_rng(seed: int, site: int | str) -> np.random.Generator:
    """numpy's stream of one site, seeded by ``(seed, site)``: a site's split does not depend on the other sites.

    A site named by text (a folder) is keyed by the CRC-32 of its name, a numbered one (a hospital) by its number.
    """
    key = zlib.crc32(site.encode("utf-8")) if isinstance(site, str) else site
    return np.random.default_rng([seed, key])


def permutation(count: int, stream: Stream) -> np.ndarray:
    """A random order of ``range(count)`` drawn from ``stream`` (int64)."""
    if isinstance(stream, torch.Generator):
        return torch.randperm(count, generator=stream).numpy()
    return stream.permutation(count)


def split_bounds(
    count: int, fractions: Fractions, rounding: Rounding = "half_up", at_least_one: bool = False
) -> tuple[int, int]:
    """Where ``count`` ordered groups are cut into train | val | test: the cumulative train and train + val
    fractions times ``count``, rounded; with ``at_least_one`` the cuts then move so that every split keeps a group
    (``count >= 3``)."""
    totals = (fractions[0], fractions[0] + fractions[1])
    if rounding == "half_even":
        train_end, val_end = (round(total * count) for total in totals)
    else:
        train_end, val_end = (math.floor(total * count + 0.5) for total in totals)
    if at_least_one:
        train_end = min(max(train_end, 1), count - 2)
        val_end = min(max(val_end, train_end + 1), count - 1)
    return train_end, val_end


def split_groups(
    group_of: np.ndarray,
    num_groups: int,
    fractions: Fractions,
    stream: Stream,
    rounding: Rounding = "half_up",
    at_least_one: bool = False,
) -> np.ndarray:
    """The split code (0 train, 1 val, 2 test) of every row, whole groups at a time, so that no group is in two splits.

    ``group_of`` holds each row's group, in ``range(num_groups)``; a group without rows still takes its place in
    the order. The groups are ordered by :func:`permutation` of ``stream``; the group at position ``r`` of that
    order goes to the split whose cut (:func:`split_bounds`) first lies beyond ``r``.
    """
    bounds = split_bounds(num_groups, fractions, rounding, at_least_one)
    code_of_group = np.empty(num_groups, dtype=np.int64)
    code_of_group[permutation(num_groups, stream)] = np.searchsorted(bounds, np.arange(num_groups), side="right")
    return code_of_group[group_of]


def rows_by_code(codes: np.ndarray) -> dict[Split, np.ndarray]:
    """Row indices of each split, in row order, from split codes 0/1/2."""
    return {split: np.flatnonzero(codes == code) for code, split in enumerate(SPLITS)}


def random_subset(count: int, keep: int, generator: torch.Generator) -> Tensor:
    """``keep`` of ``range(count)`` (all if fewer), drawn from ``generator``, sorted so that samples keep their order.

    Always draws a permutation of ``count``, so the generator advances the same whether or not anything is dropped.
    """
    return torch.randperm(count, generator=generator)[:keep].sort().values
