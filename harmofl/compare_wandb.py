"""A comparison as one W&B group: each fit a run named ``<strategy>-seed<k>`` (job type: the strategy), and one
``comparison`` run (job type ``summary``) holding the final table and ``comparison.png``.

Compare finds W&B in the fit config (``--trainer.logger WandbLogger``); each fit learns its group, name, job type and
through W&B's own environment variables, so its command (and run key) stays the fit's. Without
``WANDB_API_KEY`` (and no ``WANDB_MODE``) everything logs offline, as a fit does.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

from harmofl.compare_report import Run


def summary_init_arguments(fit_config: Any) -> dict[str, Any] | None:
    """``wandb.init`` arguments that put the summary run where the fits' ``WandbLogger`` (of ``trainer.logger``, one
    or a list) puts theirs: its project (as the logger defaults it), folder, entity and offline mode; None without
    a ``WandbLogger``."""
    loggers = fit_config.trainer.logger
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if logger is not None and str(logger.get("class_path", "")).endswith("WandbLogger"):
            settings = {**(logger.get("dict_kwargs") or {}), **_as_dict(logger.get("init_args"))}
            return {
                "project": settings.get("project") or os.environ.get("WANDB_PROJECT", "lightning_logs"),
                "dir": str(settings.get("save_dir") or settings.get("dir") or "."),
                "entity": settings.get("entity"),
                **({"mode": "offline"} if settings.get("offline") else {}),
            }
    return None


def _as_dict(namespace: Any) -> dict[str, Any]:
    return namespace.as_dict() if namespace is not None else {}


def run_environment(group: str, run: Run) -> dict[str, str]:
    """W&B's variables for ``run``'s fit: group, name (``<strategy>-seed<k>``, ``-<held-out site>`` in ``loso``) and
    job type (the strategy). Its config is the fit's resolved configuration (``seed_everything``: the seed)."""
    name = f"{run.strategy}-seed{run.seed}" + (f"-{run.fold}" if run.fold else "")
    return {"WANDB_RUN_GROUP": group, "WANDB_NAME": name, "WANDB_JOB_TYPE": run.strategy}


def log_summary(init_arguments: dict[str, Any], group: str, output: Path, command: str) -> None:
    """The ``comparison`` run of the group (``init_arguments``: :func:`summary_init_arguments`): ``comparison.csv``
    as a ``wandb.Table``, ``comparison.png`` as a ``wandb.Image``, the compare command as its config."""
    import wandb

    if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")):
        os.environ["WANDB_MODE"] = "offline"  # as a fit does (harmofl.federation.settings): never block on a login
    with (output / "comparison.csv").open() as handle:
        rows = list(csv.reader(handle))
    columns: list[str | int] = list(rows[0])
    run = wandb.init(**init_arguments, group=group, name="comparison", job_type="summary", config={"command": command})
    try:
        logged: dict[str, Any] = {"comparison_table": wandb.Table(columns=columns, data=rows[1:])}
        if (output / "comparison.png").is_file():
            logged["comparison"] = wandb.Image(str(output / "comparison.png"))
        run.log(logged)
    finally:
        run.finish()
