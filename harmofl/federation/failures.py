"""What a failing client does to a round: retries, then stop (``raise``) or continue without it (``skip``), and the
fewest valid updates a round needs. One policy for every executor: in process a retry trains the client again,
in a deployment it resends the site its instruction."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_warn

FailureAction = Literal["raise", "skip"]


@dataclass(frozen=True)
class ClientFailure:
    """A participant that sent no valid update this round, and why."""

    error: str


@dataclass(frozen=True)
class FailurePolicy:
    """``trainer.client_failure``, ``trainer.client_retries`` and ``trainer.min_clients``.

    Args:
        action: after the retries, ``raise`` stops the run naming the client and round; ``skip`` leaves the client
            out of the round's aggregation (the others' weights renormalized).
        retries: how many times a failed client is tried again from the same start and seed.
        min_clients: the fewest valid updates a round needs.
    """

    action: FailureAction = "raise"
    retries: int = 0
    min_clients: int = 1

    def __post_init__(self) -> None:
        if self.action not in ("raise", "skip"):
            raise ValueError(f"trainer.client_failure must be one of ('raise', 'skip'), got {self.action!r}.")
        if self.min_clients < 1:
            raise ValueError(f"trainer.min_clients must be >= 1, got {self.min_clients}.")
        if self.retries < 0:
            raise ValueError(f"trainer.client_retries must be >= 0, got {self.retries}.")

    @property
    def tolerant(self) -> bool:
        """Whether a failure can be survived (retried or skipped): only then is a client's state saved to roll back."""
        return self.retries > 0 or self.action == "skip"

    def retry(
        self, client: str, round_idx: int, attempt: int, error: BaseException | str, noun: str = "client"
    ) -> bool:
        """Decide after ``client``'s attempt ``attempt`` (0-based) failed with ``error``: True to try again, False
        to skip it this round; under ``raise``, after the last retry, raise (an exception is re-raised with a note
        naming the client and round)."""
        where = f"{noun.capitalize()} {client!r} failed in round {round_idx + 1} (attempt {attempt + 1})"
        description = describe(error) if isinstance(error, BaseException) else error
        if attempt < self.retries:
            rank_zero_warn(f"{where}: {description}. Retrying.")
            return True
        if self.action == "skip":
            return False
        advice = f"Set trainer.client_failure: skip to continue without a failing {noun}."
        if isinstance(error, BaseException):
            error.add_note(f"{where}. {advice}")
            raise error
        raise RuntimeError(f"{where}: {error}. {advice}")

    def check_enough(self, valid: int, participants: int, round_idx: int, failures: Sequence[dict[str, Any]]) -> None:
        """Stop the run when fewer than ``min_clients`` of the round's ``participants`` sent a valid update."""
        if valid < self.min_clients:
            raise RuntimeError(
                f"Only {valid} of {participants} clients sent a valid update in round {round_idx + 1}, fewer than "
                f"trainer.min_clients={self.min_clients}: {list(failures[-5:])}. The checkpoint of round {round_idx} "
                "is intact: fix the cause and continue with --ckpt_path last."
            )


def describe(error: BaseException) -> str:
    """How a client's exception is reported (warnings, ``summary.json``)."""
    return f"{type(error).__name__}: {error}"
