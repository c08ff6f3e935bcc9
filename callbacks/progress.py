"""A rich progress bar for federated runs: rounds, and the current client's steps."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback, LightningModule
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn


class RoundProgressBar(Callback):
    """Two bars on the main process: rounds completed, and the steps of the client now training."""

    def __init__(self) -> None:
        self._progress: Progress | None = None
        self._rounds: TaskID | None = None
        self._client: TaskID | None = None

    def on_fit_start(self, trainer: Any, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=True
        )
        self._progress.start()
        self._rounds = self._progress.add_task("rounds", total=trainer.rounds, completed=trainer.current_round)

    def on_round_start(self, trainer: Any, round_idx: int) -> None:
        if self._progress is not None and self._rounds is not None:
            self._progress.update(self._rounds, description=f"round {round_idx + 1}/{trainer.rounds}")

    def on_train_client_start(self, trainer: Any, client: str, num_batches: int) -> None:
        if self._progress is None:
            return
        if self._client is not None:
            self._progress.remove_task(self._client)
        self._client = self._progress.add_task(f"  client {client}", total=num_batches)

    def on_train_batch_end(
        self, trainer: Any, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._progress is not None and self._client is not None:
            self._progress.advance(self._client)

    def on_round_end(self, trainer: Any, round_idx: int, results: dict[str, Any]) -> None:
        if self._progress is None or self._rounds is None:
            return
        self._progress.advance(self._rounds)
        metric = trainer.lightning_module.primary_metric
        values = [
            splits["val"][metric]
            for client, splits in results.items()
            if metric in splits.get("val", {}) and client not in trainer.held_out
        ]
        mean = sum(values) / len(values) if values else float("nan")
        self._progress.console.print(
            f"round {round_idx + 1}/{trainer.rounds}: mean val {metric} {mean:.4f}"
            + (f" (best round {trainer.best_round})" if trainer.best_round else "")
        )

    def on_fit_end(self, trainer: Any, pl_module: LightningModule) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
