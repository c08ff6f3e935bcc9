"""The record of a run: its per-round history, best round and client failures, and the files made from them
(``metrics.csv``, ``summary.json``, ``convergence.png``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn

from harmofl import reporting
from harmofl.reporting import Results


class RunRecord:
    """History, best round and failures of a run, written to ``root_dir``.

    Args:
        root_dir: where ``metrics.csv``, ``summary.json`` and ``convergence.png`` go.
        rounds: the run's number of rounds.
        held_out: clients reported apart from the mean.
        metric: the validation metric that selects the best round (``accuracy``, ``dice``).
    """

    def __init__(self, root_dir: Path, rounds: int, held_out: list[str], metric: str) -> None:
        self.root_dir, self.rounds, self.held_out, self.metric = root_dir, rounds, held_out, metric
        #: One row per round, client and split (:func:`harmofl.reporting.history_rows`).
        self.history: list[dict[str, Any]] = []
        self.best_round: int | None = None
        self.best_score = float("-inf")
        #: The latest evaluated round's mean validation metric, and that round.
        self.last_score = float("nan")
        self.last_evaluated: int | None = None
        #: Client failures so far: ``{"round", "client", "error"}`` (rounds from 1), in the checkpoint and summary.
        self.failures: list[dict[str, Any]] = []

    def add_round(
        self, round_number: int, results: Results, server_metrics: Mapping[str, float] | None = None
    ) -> list[dict[str, Any]]:
        """Add round ``round_number``'s per-client results and the server's values (``privacy/epsilon``); returns its
        rows. A better mean validation metric than every evaluated round before makes it the best round; a round
        without validation results (``trainer.evaluate_every_n_rounds``) is never the best."""
        rows = reporting.history_rows(round_number, results, self.held_out, server_metrics)
        self.history.extend(rows)
        validation = reporting.mean_over_clients(results, self.held_out).get("val")
        if validation is None:
            return rows
        self.last_score, self.last_evaluated = validation[self.metric], round_number
        if self.last_score > self.best_score:
            self.best_round, self.best_score = round_number, self.last_score
        return rows

    def round_line(self, round_number: int, noun: str = "client") -> str:
        """One log line of the latest round, for runs watched through their log (servers, no progress bar)."""
        evaluated = (
            f"mean val {self.metric} {self.last_score:.4f}"
            if self.last_evaluated == round_number
            else f"not evaluated (last: round {self.last_evaluated})"
        )
        return (
            f"Round {round_number}/{self.rounds}: {evaluated} (best round {self.best_round}); {len(self.failures)} "
            f"{noun} failures so far."
        )

    def record_failures(self, round_idx: int, failures: Mapping[str, str], noun: str = "client") -> None:
        """Record and warn about the clients left out of round ``round_idx`` (``failures`` in the clients' order)."""
        for client, error in failures.items():
            self.failures.append({"round": round_idx + 1, "client": client, "error": error})
            rank_zero_warn(
                f"{noun.capitalize()} {client!r} failed in round {round_idx + 1} and is left out of this round's "
                f"aggregation: {error}"
            )

    def summary(self) -> dict[str, Any]:
        """``summary.json``: the best round's metrics, the latest round's server values (the privacy spent by every
        round so far, not only up to the best), and the client failures so far."""
        best = reporting.results_at_round(self.history, self.best_round, ("val", "test")) if self.best_round else {}
        result = reporting.summary(self.rounds, self.best_round, best, self.held_out)
        server_rows = [row for row in self.history if row["client"] == reporting.SERVER]
        if server_rows:
            fields = ("round", "client", "split")
            result[reporting.SERVER] = {key: value for key, value in server_rows[-1].items() if key not in fields}
        if self.failures:
            result["failures"] = self.failures
        return result

    def write_outputs(self) -> None:
        reporting.write_metrics_csv(self.history, self.root_dir / "metrics.csv")
        reporting.write_json(self.summary(), self.root_dir / "summary.json")

    def write_final_report(self) -> None:
        """At the end of a fit: ``convergence.png`` and the best round's table."""
        result = self.summary()
        best = {**result["clients"], **result.get("held_out", {})}
        if best:
            # Once per fit, not per round: a plot costs more than a small model's round of bookkeeping, and
            # metrics.csv (and the loggers) already follow the run live.
            reporting.plot_convergence(self.history, self.metric, self.root_dir / "convergence.png")
            reporting.print_results_table(f"Best round {self.best_round} of {self.rounds}", best, self.held_out)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_round": self.best_round,
            "best_score": self.best_score,
            "history": self.history,
            "failures": self.failures,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.history = list(state["history"])
        self.failures = list(state.get("failures", []))
        self.best_round, self.best_score = state["best_round"], state["best_score"]
