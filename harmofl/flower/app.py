"""The Flower apps: ``server_app`` (the orchestrator with a :class:`FlowerExecutor`) and ``client_app`` (one site,
:class:`FlowerSite`), both built from the run's YAML configuration, exactly as ``cli.py fit`` builds its objects.

Run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, or ``flwr run --run-config``):
    ``config`` the YAML configuration, ``.yaml``/``.yml`` files of the app's ``configs/`` folder given relative to
    the app's folder (several, comma-separated, are merged in order as repeated ``cli.py --config``:
    ``"configs/demo.yaml,configs/strategies/fedbn.yaml"``); ``overrides`` settings on top of it, as ``cli.py`` flags
    without dashes, separated by spaces (``"trainer.rounds=2 data.init_args.batch_size=16"``): a site accepts
    training hyperparameters only and refuses a run with others (:mod:`harmofl.flower.site_policy`);
    ``site-names`` the expected sites, comma-separated: exactly those join, and ``num-sites`` is their number
    (empty: any node that connects, with a warning); ``site-samples`` each site's training samples
    (``"site_0=48,site_1=32"``; empty: the sites' claims, at most ``max-site-samples``); every reply is checked
    (:mod:`harmofl.flower.replies`);
    ``num-sites`` the SuperNodes to wait for; ``connect-timeout`` how long (s); ``reply-timeout`` how long a site
    may take to answer a round's message (0: no limit); ``output-dir`` where the server writes checkpoints and
    results (default ``runs/<config name>-flower``, relative to the SuperLink's working folder); ``local-dp-*``
    Flower's local differential privacy at every site (off unless ``local-dp-clipping-norm`` > 0, with
    ``local-dp-epsilon``, ``local-dp-delta``, optional ``local-dp-sensitivity``), never weaker than a site's own;
    ``ckpt-path`` (default empty: a new federation) ``last``, ``best`` or a file of ``<output-dir>/checkpoints``
    to continue the federation from (the sites continue from their own saved states).
Node config (``flower-supernode --node-config``), the site's own settings, which no run can change: ``site`` the
    client this node serves (a name the data module gives, e.g. ``site_0`` of the demo, or the site's folder name);
    ``data-path`` (optional) the folder of the site's data, which replaces ``data.init_args.root``; ``cache-dir``
    (optional) the data module's cache folder (its ``cache_dir``, where it has one); ``accelerator`` (optional)
    ``cpu`` / ``gpu``; ``local-dp-clipping-norm``, ``local-dp-epsilon``, ``local-dp-delta`` (optional) the site's
    minimum local DP: of each, the stricter of the run's and the site's applies; ``allow-overrides`` (optional) more
    override keys the site accepts (``fnmatch`` patterns, space-separated);
    ``state-dir`` (default ``~/.harmofl/site-state``) the folder on the site's own disk where it keeps its state
    between rounds and restarts, ``<state-dir>/<federation id>/<site>/`` (:mod:`harmofl.flower.site_store`).
A site's error replies name the exception's class and a correlation id only; the details are in its log (logger
``harmofl.flower.site``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from harmofl.cli import HarmoFLCLI, build
from harmofl.data.base import Split
from harmofl.flower import site_policy, site_store, wire
from harmofl.flower.executor import FlowerExecutor
from harmofl.flower.replies import SiteRoster
from harmofl.flower.site import FlowerSite, site_log
from harmofl.trainer import FederatedTrainer

#: The app's folder: relative ``config`` paths are read from here (the FAB holds ``configs/``).
APP_DIR = Path(__file__).resolve().parents[2]


def configuration_args(
    run_config: Mapping[str, Any], role_overrides: list[str], node_config: Mapping[str, Any] | None = None
) -> list[str]:
    """``cli.py``-style arguments of the run's configuration: ``--config`` YAML files of the app's ``configs/``, the
    run's overrides, then ``role_overrides`` (the server's or a site's settings, which win). With a site's
    ``node_config``, the run's overrides pass the site's policy first (:mod:`harmofl.flower.site_policy`)."""
    paths = site_policy.config_paths(str(run_config.get("config", "")), APP_DIR)
    overrides = site_policy.override_items(str(run_config.get("overrides", "")))
    if node_config is not None:
        overrides = site_policy.site_overrides(overrides, str(node_config.get("allow-overrides", "")))
    config_args = [arg for path in paths for arg in ("--config", str(path))]
    return [*config_args, *(f"--{item}" for item in overrides + role_overrides)]


def trainer(cli: HarmoFLCLI) -> FederatedTrainer:
    """The configuration's trainer: a FederatedTrainer (LightningCLI types it as a Trainer)."""
    return cast(FederatedTrainer, cli.trainer)


# -- the server ---------------------------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def run_server(grid: Grid, context: Context) -> None:
    run_config = context.run_config
    config_name = Path(str(run_config["config"]).split(",")[-1].strip()).stem
    output_dir = str(run_config.get("output-dir") or Path("runs") / f"{config_name}-flower")
    # The server only aggregates and decides: one process, on the CPU.
    args = configuration_args(
        run_config,
        [
            f"trainer.default_root_dir={output_dir}",
            "trainer.devices=1",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ],
    )
    cli = build(args, save_config=True)  # fit writes the configuration the run used, as `cli.py fit` does
    reply_timeout = float(run_config.get("reply-timeout", 0))
    roster = SiteRoster.from_run_config(run_config)
    executor = FlowerExecutor(
        grid,
        num_sites=len(roster.sites) or int(run_config.get("num-sites", 2)),  # `site-names` names them: that many
        connect_timeout=float(run_config.get("connect-timeout", 300)),
        reply_timeout=reply_timeout if reply_timeout > 0 else None,
        roster=roster,
    )
    # The data module gives only its batch size (each site's local steps): the server sets up no data.
    ckpt_path = resume_from(run_config, trainer(cli).checkpoint_dir)
    trainer(cli).fit(cli.model, cli.datamodule, executor=executor, ckpt_path=ckpt_path)


def resume_from(run_config: Mapping[str, Any], checkpoint_dir: Path) -> str | None:
    """The run config's ``ckpt-path`` for ``fit``: None (empty: a new federation), ``last``, ``best``, or a file of
    the run's ``checkpoints`` folder (its name, or a path inside it): the server reads no other file."""
    ckpt_path = str(run_config.get("ckpt-path", ""))
    if ckpt_path in ("", "last", "best"):
        return ckpt_path or None
    path = checkpoint_dir / ckpt_path  # an absolute ckpt-path stays as it is
    if not path.resolve().is_relative_to(checkpoint_dir.resolve()):
        raise ValueError(
            f"Run config ckpt-path={ckpt_path!r} is not in the run's checkpoints folder {str(checkpoint_dir)!r}: use "
            "'last', 'best' or the name of a file in it."
        )
    return str(path)


# -- a site -------------------------------------------------------------------------------------------------------


def reply_errors(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Any exception of the site's handling becomes an error reply that names its class and a correlation id only
    (its text may quote the site's files); the traceback goes to the site's log (logger ``harmofl.flower.site``)
    under that id. A :class:`~harmofl.flower.site_policy.RefusedRequest` says which setting was refused."""
    try:
        return call_next(message, context)
    except Exception as error:
        correlation_id = secrets.token_hex(4)
        site_log.exception(
            "The site failed on the server's %s message (correlation id %s).",
            message.metadata.message_type,
            correlation_id,
        )
        reason = site_policy.error_reason(error, correlation_id)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def local_dp(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``LocalDpMod`` on training replies when the run or the node asks for it, with the stricter of
    their settings (:func:`~harmofl.flower.site_policy.effective_local_dp`): the site clips its update's
    floating-point weights and adds Gaussian noise before anything is sent."""
    settings = site_policy.effective_local_dp(context.run_config, context.node_config)
    if settings is None or message.metadata.message_type != "train":
        return call_next(message, context)
    mod = LocalDpMod(settings.clipping_norm, settings.sensitivity, settings.epsilon, settings.delta)
    return mod(message, context, call_next)


client_app = ClientApp(mods=[reply_errors, local_dp])


def open_site(context: Context) -> FlowerSite:
    """This node's site, built from the run's configuration and the node's config (its state on its disk:
    :func:`restore_site_state`)."""
    node_config = context.node_config
    if "site" not in node_config:
        raise ValueError("The SuperNode needs its site's name: flower-supernode --node-config \"site='site_0'\".")
    overrides = ["trainer.devices=1", "trainer.enable_progress_bar=false", "trainer.logger=null"]
    if node_config.get("data-path"):
        overrides.append(f"data.init_args.root={node_config['data-path']}")
    if node_config.get("accelerator"):
        overrides.append(f"trainer.accelerator={node_config['accelerator']}")
    cli = build(configuration_args(context.run_config, overrides, node_config))
    if node_config.get("cache-dir") and hasattr(cli.datamodule, "cache_dir"):  # the demo's and the prostate data's
        cli.datamodule.cache_dir = Path(str(node_config["cache-dir"])).expanduser()
    return FlowerSite(trainer(cli), cli.model, cli.datamodule, str(node_config["site"]))


def restore_site_state(
    site: FlowerSite, context: Context, config: ConfigRecord, completed_rounds: int
) -> site_store.SiteStateStore:
    """Load ``site``'s state after ``completed_rounds`` rounds of the federation that the message's ``config`` names
    from the node's ``state-dir`` (nothing before the site first trains); returns the site's store of states."""
    root = Path(str(context.node_config.get("state-dir") or site_store.DEFAULT_STATE_DIR))
    federation_id = site_store.check_federation_id(config.get(wire.FEDERATION_ID))
    states = site_store.SiteStateStore(root, federation_id, site.site)
    state = states.load(completed_rounds)
    if state is not None:
        site.load_site_state(state)
    return states


def keep_site_state(site: FlowerSite, states: site_store.SiteStateStore, round_number: int) -> None:
    """Save ``site``'s state after it trained in round ``round_number`` (1-based) on its disk."""
    states.save(round_number, site.site_state())


@client_app.query()
def describe(message: Message, context: Context) -> Message:
    site = open_site(context)
    description = ConfigRecord({wire.SITE: site.site, wire.TRAIN_SAMPLES: site.train_samples})
    return Message(RecordDict({wire.SITE: description}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    site = open_site(context)
    config = message.content.config_records[wire.CONFIG]
    round_idx = int(config["round"])  # type: ignore[arg-type]  # an int the server sends
    states = restore_site_state(site, context, config, completed_rounds=round_idx)
    states.prune(round_idx)  # what a server at this round can no longer ask for (a retry starts again here too)
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    update = site.train(wire.read_weights(message.content), round_idx, int(config["seed"]))  # type: ignore[arg-type]
    client_states = site.client_states(wire.listed(config, "client-states"))
    keep_site_state(site, states, round_idx + 1)
    return Message(wire.train_reply(update.state, update.loss, update.num_steps, client_states), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = open_site(context)
    config = message.content.config_records[wire.CONFIG]
    restore_site_state(site, context, config, completed_rounds=int(config["round"]) + 1)  # type: ignore[arg-type]
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    splits = cast(tuple[Split, ...], tuple(wire.listed(config, "splits")))
    return Message(wire.evaluate_reply(site.evaluate(wire.read_weights(message.content), splits)), reply_to=message)
