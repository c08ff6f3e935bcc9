"""A site's own state on its own disk: what a Flower site keeps between the messages of a federation and across
restarts of its SuperNode (its local weights, optimizer state, module and callbacks' client state:
:meth:`~harmofl.flower.site.FlowerSite.site_state`). Pure file logic, no Flower.

Files: ``<state-dir>/<federation id>/<site>/round-<N>.pt``, the state after the site trained in round ``N``
(1-based), written atomically (a temporary file in the same folder, flushed to disk, renamed) and read with
``weights_only=True``. A server at round ``r`` (``r`` rounds completed, its ``last.ckpt``) can ask for the newest
state saved at a round ``<= r`` (a resume), and, while it evaluates round ``r + 1`` with the training of round
``r + 2`` in the same message, for the state of round ``r + 1``: :meth:`SiteStateStore.prune` deletes the rest, so
a site keeps at most three files per federation (those two, and the round it is training).
"""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from typing import Any

import torch

from harmofl.checkpoint import atomic_torch_save

#: The site's state folder when its node config sets no ``state-dir``.
DEFAULT_STATE_DIR = "~/.harmofl/site-state"
#: A federation id: a uuid4 in 32 lowercase hexadecimal digits (it names a folder at every site).
FEDERATION_ID = re.compile(r"[0-9a-f]{32}")
FORMAT_VERSION = 1
_STATE_FILE = re.compile(r"round-([0-9]+)\.pt")


def new_federation_id() -> str:
    """A new federation's id, created by the server at the first start of a run."""
    return uuid.uuid4().hex


def check_federation_id(value: object) -> str:
    """``value`` if it is a federation id; it becomes a folder name at the site, so nothing else is accepted."""
    if not isinstance(value, str) or not FEDERATION_ID.fullmatch(value):
        raise ValueError(
            f"Federation id {str(value)[:80]!r} is malformed: expected 32 lowercase hexadecimal digits (a uuid4 the "
            "server creates). The server and the sites must run the same version of harmofl."
        )
    return value


class SiteStateStore:
    """One site's saved states in one federation.

    Args:
        root: the site's state folder (its node config's ``state-dir``; ``~`` is expanded).
        federation_id: the federation the server's messages name (:func:`check_federation_id`).
        site: the site's name (a plain folder name).
    """

    def __init__(self, root: Path, federation_id: str, site: str) -> None:
        if not site or Path(site).name != site or site in (".", ".."):
            raise ValueError(f"Site name {site!r} cannot name a state folder: use a plain name such as 'site_0'.")
        self.federation_id, self.site = check_federation_id(federation_id), site
        self.folder = root.expanduser() / federation_id / site

    def saved_rounds(self) -> list[int]:
        """The rounds whose states are on disk, in increasing order."""
        if not self.folder.is_dir():
            return []
        found = (_STATE_FILE.fullmatch(path.name) for path in self.folder.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def path(self, round_number: int) -> Path:
        return self.folder / f"round-{round_number}.pt"

    def header(self, round_number: int) -> dict[str, Any]:
        """What a state file says it is: a file copied into another site's or federation's folder is refused."""
        return {"format": FORMAT_VERSION, "federation_id": self.federation_id, "site": self.site, "round": round_number}

    def base_round(self, completed_rounds: int) -> int | None:
        """The newest round ``<= completed_rounds`` with a saved state; None for a site that has not trained in this
        federation. A site that trained but only in later rounds refuses: its state at ``completed_rounds`` is gone."""
        saved = self.saved_rounds()
        earlier = [round_number for round_number in saved if round_number <= completed_rounds]
        if earlier:
            return earlier[-1]
        if saved:
            raise ValueError(
                f"Site {self.site!r} has no state of federation {self.federation_id} at round {completed_rounds} or "
                f"before (it keeps rounds {saved} in {self.folder}): the server resumed from an older checkpoint than "
                "the sites keep. Resume from the latest checkpoint (ckpt-path='last'), or start a new run."
            )
        return None

    def load(self, completed_rounds: int) -> dict[str, Any] | None:
        """The site's state after ``completed_rounds`` rounds (:meth:`base_round`); None if it has not trained."""
        round_number = self.base_round(completed_rounds)
        if round_number is None:
            return None
        path = self.path(round_number)
        try:
            content = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # unreadable, or holding arbitrary pickled objects
            raise ValueError(f"Site state {str(path)!r} cannot be loaded safely: {error}") from error
        header = self.header(round_number)
        if not isinstance(content, dict) or {key: content.get(key) for key in header} != header:
            raise ValueError(
                f"Site state {str(path)!r} is not this site's state of round {round_number} in federation "
                f"{self.federation_id}: remove the file (the site then cannot continue this federation)."
            )
        return dict(content["state"])

    def save(self, round_number: int, state: dict[str, Any]) -> None:
        """Keep the site's ``state`` after it trained in round ``round_number`` (1-based), atomically."""
        atomic_torch_save({**self.header(round_number), "state": state}, self.path(round_number))

    def prune(self, completed_rounds: int, newest: int | None = None) -> None:
        """Delete what a server after ``completed_rounds`` rounds can no longer ask for: states older than
        :meth:`base_round`, states of rounds after ``newest`` (default ``completed_rounds``: a future the server
        rolled back; one more round while the server has not checkpointed the round it evaluates), and the temporary
        files of writers killed mid-write. Only the site's own training calls it (the folder's one writer)."""
        newest = completed_rounds if newest is None else newest
        self.base_round(newest)  # refuses a site that holds later states only, before anything is deleted
        earlier = [round_number for round_number in self.saved_rounds() if round_number <= completed_rounds]
        oldest = earlier[-1] if earlier else 0
        for round_number in self.saved_rounds():
            if not oldest <= round_number <= newest:
                self.path(round_number).unlink(missing_ok=True)
        for temporary in self.folder.glob(".round-*.pt.tmp.*"):
            temporary.unlink(missing_ok=True)
