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
    to continue the federation from (the sites continue from their own saved states); ``combined-exchange``
    (default true) one message exchange per round: a round's evaluation carries the next round's training (false:
    a train and an evaluate exchange per round; the same results).
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

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from harmofl.flower import site_policy

# PyTorch, Lightning and the orchestrator are imported in the handlers (harmofl.flower.site_handlers, the server's
# modules): every message starts a fresh ClientApp process, and one the site refuses need not pay for them.

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


# -- the server ---------------------------------------------------------------------------------------------------

server_app = ServerApp()


@server_app.main()
def run_server(grid: Grid, context: Context) -> None:
    from harmofl.cli import build
    from harmofl.flower.executor import FlowerExecutor
    from harmofl.flower.replies import SiteRoster
    from harmofl.flower.site_handlers import trainer

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
        combine_exchanges=str(run_config.get("combined-exchange", True)).lower() not in ("false", "0"),
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
        reason = site_policy.logged_error_reason(error, message.metadata.message_type)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)


def local_dp(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``LocalDpMod`` on training replies when the run or the node asks for it, with the stricter of
    their settings (:func:`~harmofl.flower.site_policy.effective_local_dp`): the site clips its update's
    floating-point weights and adds Gaussian noise before anything is sent."""
    settings = site_policy.effective_local_dp(context.run_config, context.node_config)
    if settings is None or message.metadata.message_type != "train":
        return call_next(message, context)
    mod = LocalDpMod(settings.clipping_norm, settings.sensitivity, settings.epsilon, settings.delta)
    without_update: list[Message] = []

    def reply_or_aside(inner: Message, inner_context: Context) -> Message:
        """A reply without an update (a combined message whose training failed) passes LocalDpMod untouched: it
        sends no weights to noise, and the mod would turn it into an error that loses the evaluation."""
        reply = call_next(inner, inner_context)
        if reply.has_error() or reply.content.array_records:
            return reply
        without_update.append(reply)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="no update"), reply_to=inner)

    noised = mod(message, context, reply_or_aside)
    return without_update[0] if without_update else noised


client_app = ClientApp(mods=[reply_errors, local_dp])


@client_app.query()
def describe(message: Message, context: Context) -> Message:
    configuration_args(context.run_config, [], context.node_config)  # refused before PyTorch is imported
    from harmofl.flower import site_handlers

    return site_handlers.describe(message, context)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    configuration_args(context.run_config, [], context.node_config)
    from harmofl.flower import site_handlers

    return site_handlers.train(message, context)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    configuration_args(context.run_config, [], context.node_config)
    from harmofl.flower import site_handlers

    return site_handlers.evaluate(message, context)
