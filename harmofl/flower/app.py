"""The Flower apps: ``server_app`` (the orchestrator with a :class:`FlowerExecutor`) and ``client_app`` (one site,
:class:`FlowerSite`), both built from the run's YAML configuration, exactly as ``cli.py fit`` builds its objects.

Run config (``[tool.flwr.app.config]`` in ``pyproject.toml``, or ``flwr run --run-config``):
    ``config`` the YAML configuration, relative to the app's folder or absolute (several, comma-separated, are
    merged in order as repeated ``cli.py --config``: ``"configs/demo.yaml,configs/strategies/fedbn.yaml"``);
    ``overrides`` settings on top of it, as ``cli.py`` flags without dashes, separated by spaces
    (``"trainer.rounds=2 data.init_args.batch_size=16"``);
    ``num-sites`` the SuperNodes to wait for; ``connect-timeout`` how long (s); ``reply-timeout`` how long a site
    may take to answer a round's message (0: no limit); ``output-dir`` where the server writes checkpoints and
    results (default ``runs/<config name>-flower``, relative to the SuperLink's working folder); ``local-dp-*``
    Flower's local differential privacy at every site (off unless ``local-dp-clipping-norm`` > 0).
Node config (``flower-supernode --node-config``): ``site`` the client this node serves (a name the data module
    gives, e.g. ``site_0`` of the demo, or the site's folder name); ``data-path`` (optional) the folder of the
    site's data, which replaces ``data.init_args.root``; ``accelerator`` (optional) ``cpu`` / ``gpu``.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import LocalDpMod
from flwr.serverapp import Grid, ServerApp

from harmofl.cli import HarmoFLCLI, build
from harmofl.data.base import Split
from harmofl.flower import wire
from harmofl.flower.executor import FlowerExecutor
from harmofl.flower.site import FlowerSite
from harmofl.trainer import FederatedTrainer

#: The app's folder: relative ``config`` paths are read from here (the FAB holds ``configs/``).
APP_DIR = Path(__file__).resolve().parents[2]
#: Where a node keeps its site's state between the messages of a run (``Context.state``, the node's memory).
SITE_STATE = "harmofl-site"


def configuration_args(run_config: Mapping[str, Any], role_overrides: list[str]) -> list[str]:
    """``cli.py``-style arguments of the run's configuration: ``--config`` YAML, the run's overrides, then
    ``role_overrides`` (the server's or a site's settings, which win)."""
    names = [name.strip() for name in str(run_config.get("config", "")).split(",") if name.strip()]
    if not names:
        raise ValueError("The run config needs `config`, the YAML configuration (e.g. config = 'configs/demo.yaml').")
    paths = [Path(name) if Path(name).is_absolute() else APP_DIR / name for name in names]
    missing = [str(path) for path in paths if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"The run's configuration {missing} does not exist: check `config` in the run config.")
    overrides = shlex.split(str(run_config.get("overrides", "")))
    malformed = [item for item in overrides if "=" not in item or item.startswith("-")]
    if malformed:
        raise ValueError(f"Run config `overrides` takes key=value items, got {malformed}.")
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
    cli = build(args)
    Path(output_dir).mkdir(parents=True, exist_ok=True)  # the configuration the run used, as `cli.py fit` keeps it
    cli.parser.save(cli.config, str(Path(output_dir) / "config.yaml"), skip_none=False, overwrite=True)
    reply_timeout = float(run_config.get("reply-timeout", 0))
    executor = FlowerExecutor(
        grid,
        num_sites=int(run_config.get("num-sites", 2)),
        connect_timeout=float(run_config.get("connect-timeout", 300)),
        reply_timeout=reply_timeout if reply_timeout > 0 else None,
    )
    trainer(cli).fit(cli.model, executor=executor)


# -- a site -------------------------------------------------------------------------------------------------------


def local_dp(message: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Flower's ``LocalDpMod`` on training replies when the run config asks for it (``local-dp-clipping-norm``
    > 0): the site clips its update's floating-point weights and adds Gaussian noise before anything is sent."""
    clipping_norm = float(context.run_config.get("local-dp-clipping-norm", 0.0))
    if clipping_norm <= 0 or message.metadata.message_type != "train":
        return call_next(message, context)
    sensitivity = float(context.run_config.get("local-dp-sensitivity", 0.0)) or clipping_norm  # 0: the clip bound
    mod = LocalDpMod(
        clipping_norm,
        sensitivity,
        float(context.run_config["local-dp-epsilon"]),
        float(context.run_config["local-dp-delta"]),
    )
    return mod(message, context, call_next)


client_app = ClientApp(mods=[local_dp])


def open_site(context: Context) -> FlowerSite:
    """This node's site, built from the run's configuration and the node's config, with its state restored."""
    node_config = context.node_config
    if "site" not in node_config:
        raise ValueError("The SuperNode needs its site's name: flower-supernode --node-config \"site='site_0'\".")
    overrides = ["trainer.devices=1", "trainer.enable_progress_bar=false", "trainer.logger=null"]
    if node_config.get("data-path"):
        overrides.append(f"data.init_args.root={node_config['data-path']}")
    if node_config.get("accelerator"):
        overrides.append(f"trainer.accelerator={node_config['accelerator']}")
    cli = build(configuration_args(context.run_config, overrides))
    site = FlowerSite(trainer(cli), cli.model, cli.datamodule, str(node_config["site"]))
    if SITE_STATE in context.state.config_records:
        site.load_site_state(wire.read_blob(context.state, SITE_STATE))
    return site


def keep_site_state(site: FlowerSite, context: Context) -> None:
    context.state.config_records[SITE_STATE] = wire.blob_record(site.site_state())


@client_app.query()
def describe(message: Message, context: Context) -> Message:
    site = open_site(context)
    description = ConfigRecord({wire.SITE: site.site, wire.TRAIN_SAMPLES: site.train_samples})
    return Message(RecordDict({wire.SITE: description}), reply_to=message)


@client_app.train()
def train(message: Message, context: Context) -> Message:
    site = open_site(context)
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    config = message.content.config_records[wire.CONFIG]
    update = site.train(wire.read_weights(message.content), int(config["round"]), int(config["seed"]))  # type: ignore[arg-type]
    client_states = site.client_states(wire.listed(config, "client-states"))
    keep_site_state(site, context)
    return Message(wire.train_reply(update.state, update.loss, update.num_steps, client_states), reply_to=message)


@client_app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    site = open_site(context)
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    splits = cast(tuple[Split, ...], tuple(wire.listed(message.content.config_records[wire.CONFIG], "splits")))
    return Message(wire.evaluate_reply(site.evaluate(wire.read_weights(message.content), splits)), reply_to=message)
