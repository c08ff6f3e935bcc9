"""What a site accepts from a server's run config (pure policy, no Flower): which configuration files, which
override keys, which local differential-privacy settings, and what an error reply may say.

A site runs the app bundle's code; the server's run config only chooses among the bundle's configurations and sets
training hyperparameters on top. So:

* ``config`` entries must be relative paths that resolve (symlinks and ``..`` followed) to ``.yaml``/``.yml`` files
  inside the bundle's ``configs/`` folder; anything else is refused without being read.
* ``overrides`` keys must match :data:`SITE_OVERRIDES` (exact keys, or ``fnmatch`` patterns the node adds with its
  ``allow-overrides`` node config, e.g. ``allow-overrides='model.init_args.max_grad_norm data.init_args.fractions'``).
  They are the training hyperparameters: rounds, local epochs/steps, sampling and weighting of clients, held-out
  clients, local modules, seeds, failure handling, the client module's and its optimizer's numeric settings, the
  harmonization callbacks' settings, the data's batch and the demo's sizes. Everything else is refused, by name:
  class paths and the ``init_args`` of a class that is replaced, weights or checkpoint paths, data roots, caches,
  callbacks and loggers as a whole, output folders, backbones and their keyword arguments, local DP (which is not an
  override at all). :data:`SERVER_ONLY_OVERRIDES` (the server optimizer, the aggregator) are not refused but never
  applied at a site: only the server aggregates, so a site never instantiates the classes they name.
* Local DP is the stricter of the run's and the site's own settings (:func:`effective_local_dp`): a run can make it
  stricter, never weaker or off.
* Error replies name the exception's class and a correlation id only (:func:`error_reason`); an exception's text may
  quote the site's files, folder listings or CSV cells and stays in the site's log. :class:`RefusedRequest`, raised
  about the server's own request and never quoting site files, is the one exception whose text is sent.
"""

from __future__ import annotations

import logging
import secrets
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

#: Override keys a site applies (``fnmatch`` patterns; these are exact keys).
SITE_OVERRIDES = frozenset(
    {
        "seed_everything",
        *(
            f"trainer.{key}"
            for key in (
                "rounds",
                "local_epochs",
                "local_steps",
                "clients_per_round",
                "client_weighting",
                "held_out_clients",
                "local_modules",
                "pool_clients",
                "seed",
                "client_failure",
                "client_retries",
                "min_clients",
                "max_update_distance",
                "update_distance_policy",
                "precision",
                "evaluate_every_n_rounds",
            )
        ),
        *(
            f"model.init_args.{key}"
            for key in ("alpha", "proximal_mu", "contrastive_mu", "contrastive_temperature", "max_grad_norm")
        ),
        *(
            f"model.init_args.optimizer.init_args.{key}"
            for key in ("lr", "momentum", "weight_decay", "dampening", "nesterov", "betas", "eps", "amsgrad")
        ),
        *(
            f"trainer.callbacks.init_args.{key}"
            for key in ("band", "momentum", "share_target", "preset", "probability", "bank_size")
        ),
        *(
            f"data.init_args.{key}"
            for key in (
                "batch_size",
                "eval_batch_size",
                "num_sites",
                "train_per_site",
                "val_per_site",
                "test_per_site",
                "image_size",
                "seed",
            )
        ),
    }
)
#: Override keys that only the server uses: accepted, but left out of a site's configuration.
SERVER_ONLY_OVERRIDES = frozenset(
    {"trainer.server_optimizer", "trainer.server_optimizer.*", "trainer.aggregator", "trainer.aggregator.*"}
)
CONFIG_SUFFIXES = (".yaml", ".yml")
#: A site's own log: what it keeps from the server (its errors' details, its data's site names).
site_log = logging.getLogger("harmofl.flower.site")


class RefusedRequest(ValueError):
    """A site refuses a setting of the server's request. Its message names the setting and is sent to the server,
    so it must never quote the site's files or data."""


@dataclass(frozen=True)
class LocalDp:
    """Local DP settings: clip the update to ``clipping_norm``, then Gaussian noise for (``epsilon``, ``delta``) at
    L2 ``sensitivity``."""

    clipping_norm: float
    sensitivity: float
    epsilon: float
    delta: float


def config_paths(config: str, app_dir: Path) -> list[Path]:
    """The configuration files of the run config's ``config`` (comma-separated), each checked to be a YAML file of
    ``app_dir/configs``; nothing is read."""
    names = [name.strip() for name in config.split(",") if name.strip()]
    if not names:
        raise RefusedRequest("The run config needs `config`, the YAML configuration (e.g. 'configs/demo.yaml').")
    configs = (app_dir / "configs").resolve()
    paths = []
    for name in names:
        path = (app_dir / name).resolve()
        if Path(name).is_absolute() or not path.is_relative_to(configs) or path.suffix not in CONFIG_SUFFIXES:
            raise RefusedRequest(
                f"Run config `config` entry {name!r} is refused: a site reads only .yaml/.yml files inside the app's "
                "configs/ folder, given relative to the app (e.g. 'configs/demo.yaml')."
            )
        if not path.is_file():
            raise RefusedRequest(f"Run config `config` entry {name!r} does not exist in the app's configs/ folder.")
        paths.append(path)
    return paths


def override_items(overrides: str) -> list[str]:
    """The run config's ``overrides``: ``key=value`` items separated by spaces (shell quoting)."""
    items = shlex.split(overrides)
    malformed = [item for item in items if "=" not in item or item.startswith("-")]
    if malformed:
        raise RefusedRequest(f"Run config `overrides` takes key=value items, got {malformed}.")
    return items


def site_overrides(items: Iterable[str], allow_overrides: str = "") -> list[str]:
    """The ``key=value`` items a site applies: those whose key :data:`SITE_OVERRIDES` or the node's
    ``allow_overrides`` patterns (space- or comma-separated) match, without the server-only ones; any other key
    refuses the whole run."""
    allowed = {*SITE_OVERRIDES, *allow_overrides.replace(",", " ").split()}
    applied, refused = [], []
    for item in items:
        key = item.split("=", 1)[0]
        if any(fnmatchcase(key, pattern) for pattern in allowed):
            applied.append(item)
        elif not any(fnmatchcase(key, pattern) for pattern in SERVER_ONLY_OVERRIDES):
            refused.append(key)
    if refused:
        raise RefusedRequest(
            f"This site does not accept the run config's overrides of {refused}: a site accepts training "
            "hyperparameters only (harmofl.flower.site_policy); its operator may allow more keys with the node "
            "config `allow-overrides`."
        )
    return applied


def effective_local_dp(run_config: Mapping[str, Any], node_config: Mapping[str, Any]) -> LocalDp | None:
    """Local DP as the stricter of the run's and the node's ``local-dp-clipping-norm`` / ``-epsilon`` / ``-delta``
    (the smaller of each where both are on, > 0); None when neither asks for it. The sensitivity is the run's
    ``local-dp-sensitivity`` but never below the clipping norm (less would be less noise than the clip allows)."""
    settings = [dp for dp in (_local_dp(run_config, "run config"), _local_dp(node_config, "node config")) if dp]
    if not settings:
        return None
    clipping_norm = min(dp.clipping_norm for dp in settings)
    sensitivity = max(float(run_config.get("local-dp-sensitivity", 0.0)), clipping_norm)
    return LocalDp(clipping_norm, sensitivity, min(dp.epsilon for dp in settings), min(dp.delta for dp in settings))


def _local_dp(config: Mapping[str, Any], source: str) -> LocalDp | None:
    """One config's local DP (sensitivity: its clipping norm), on when its clipping norm is > 0."""
    clipping_norm = float(config.get("local-dp-clipping-norm", 0.0))
    if clipping_norm <= 0:
        return None
    missing = [key for key in ("local-dp-epsilon", "local-dp-delta") if key not in config]
    if missing:
        raise RefusedRequest(f"The {source} sets local-dp-clipping-norm but not {missing}: set both (e.g. 1.0, 1e-5).")
    epsilon, delta = float(config["local-dp-epsilon"]), float(config["local-dp-delta"])
    if epsilon <= 0 or not 0 < delta < 1:
        raise RefusedRequest(f"The {source}'s local DP needs epsilon > 0 and 0 < delta < 1, got {epsilon}, {delta}.")
    return LocalDp(clipping_norm, clipping_norm, epsilon, delta)


def error_reason(error: BaseException, correlation_id: str) -> str:
    """What a site's error reply says: a :class:`RefusedRequest`'s message, or only the exception's class."""
    if isinstance(error, RefusedRequest):
        return f"RefusedRequest: {error} (correlation id {correlation_id})"
    return f"{type(error).__name__} (correlation id {correlation_id}; details in the site's log)"


def logged_error_reason(error: Exception, what: str) -> str:
    """What the server may learn of ``error`` (:func:`error_reason`) while handling its ``what`` message; the
    traceback goes to the site's log under the reason's correlation id."""
    correlation_id = secrets.token_hex(4)
    site_log.exception("The site failed on the server's %s message (correlation id %s).", what, correlation_id)
    return error_reason(error, correlation_id)
