"""What every loader checks before training: settings, folders and files, and each sample under an explicit policy.

A loader checks what it can before training starts (folders, columns, listed files that are absent, images that
fail their integrity check, masks whose shape differs from their image) and raises :class:`DataError` naming the
file and what is wrong. A bad sample is never dropped silently: with ``on_bad_sample="skip"`` it is left out and
the count per client is reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal, TypeVar

from lightning.pytorch.utilities import rank_zero_warn

BadSamplePolicy = Literal["error", "skip"]
Sample = TypeVar("Sample")


class DataError(ValueError):
    """Bad data on disk; the message names the file or folder and what is wrong."""


def check_at_least(name: str, value: float | None, minimum: float, unit: str = "", nullable: bool = False) -> None:
    """Raise a ValueError naming ``data.<name>`` unless ``value >= minimum`` (or None, where ``nullable``)."""
    if value is None and nullable:
        return
    if value is None or value < minimum:
        bound = f">= {minimum}{unit}" + (" or null" if nullable else "")
        raise ValueError(f"data.{name} must be {bound}, got {value}.")


def check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    """Raise a ValueError naming ``data.<name>`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        allowed = " or ".join(map(repr, choices))
        raise ValueError(f"data.{name} must be {allowed}, got {value!r}.")


def check_distinct(name: str, values: Sequence[object] | None, what: str) -> None:
    """Raise a ValueError unless ``values`` (a selection of sites or hospitals) is None or names each one once."""
    if values is not None and (not values or len(set(values)) != len(values)):
        raise ValueError(f"data.{name} must name at least one {what}, each once, or be null (all), got {values}.")


def check_bad_sample_policy(policy: str) -> BadSamplePolicy:
    """``policy`` as a :data:`BadSamplePolicy`; a ValueError naming ``data.on_bad_sample`` unless error or skip."""
    check_choice("on_bad_sample", policy, ("error", "skip"))
    return policy  # type: ignore[return-value]


def require_dir(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a folder, else a :class:`DataError` saying what was expected there."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"{what} {str(folder)!r} is not a folder: set the data root to where the data set lies.")
    return folder


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path if it is a file, else a :class:`DataError` saying what was expected there."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"{what} {str(file)!r} does not exist.")
    return file


def path_outside(folder: Path, relative: str) -> str | None:
    """None if ``relative``, joined to ``folder`` and resolved (``..`` and symbolic links followed), lies inside
    ``folder`` (resolved too); else why not, for an error message. The path need not exist."""
    if Path(relative).is_absolute():
        return "is an absolute path"
    base = folder.resolve()
    target = (base / relative).resolve()
    if not target.is_relative_to(base):
        return f"resolves to {str(target)!r}, outside the folder"
    return None


def keep_good_samples(
    client: str,
    samples: Sequence[Sample],
    problem_of: Callable[[Sample], str | None],
    name_of: Callable[[Sample], str],
    policy: BadSamplePolicy,
) -> tuple[list[Sample], int]:
    """Check every sample before training; raise on the first bad one, or drop the bad ones and count them."""
    check_bad_sample_policy(policy)
    good: list[Sample] = []
    skipped = 0
    for sample in samples:
        problem = problem_of(sample)
        if problem is None:
            good.append(sample)
        elif policy == "error":
            raise DataError(
                f"Client {client!r}: {name_of(sample)}: {problem}. Fix or remove the sample, or set "
                "data.on_bad_sample: skip to leave bad samples out (their count is reported)."
            )
        else:
            skipped += 1
    if skipped:
        rank_zero_warn(
            f"Client {client!r}: skipped {skipped} bad sample(s) of {len(samples)} (data.on_bad_sample=skip)."
        )
    return good, skipped
