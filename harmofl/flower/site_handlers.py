"""A site's handling of the server's messages (the ClientApp's ``query``, ``train`` and ``evaluate``), imported by
:mod:`harmofl.flower.app`'s handlers when a message needs it: the site built from the run's configuration and the
node's config, its state restored from and kept on its own disk (:mod:`harmofl.flower.site_store`)."""

from __future__ import annotations

from pathlib import Path
from typing import cast

from flwr.app import ConfigRecord, Context, Message, RecordDict

from harmofl.cli import HarmoFLCLI, build
from harmofl.data.base import Split
from harmofl.flower import site_policy, site_store, wire
from harmofl.flower.app import configuration_args
from harmofl.flower.site import FlowerSite
from harmofl.trainer import FederatedTrainer


def trainer(cli: HarmoFLCLI) -> FederatedTrainer:
    """The configuration's trainer: a FederatedTrainer (LightningCLI types it as a Trainer)."""
    return cast(FederatedTrainer, cli.trainer)


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


def describe(message: Message, context: Context) -> Message:
    """The site's name and training samples."""
    site = open_site(context)
    description = ConfigRecord({wire.SITE: site.site, wire.TRAIN_SAMPLES: site.train_samples})
    return Message(RecordDict({wire.SITE: description}), reply_to=message)


def train(message: Message, context: Context) -> Message:
    """Train in the message's round; a combined message (with ``splits``) first evaluates the weights it carries,
    the previous round's global model, and its reply keeps that evaluation even if the training fails."""
    config = message.content.config_records[wire.CONFIG]
    instruction = wire.read_train_instruction(config)
    site = open_site(context)
    round_idx, evaluation = instruction.round_idx, None
    states = restore_site_state(site, context, config, completed_rounds=round_idx)
    # What a server at this round can no longer ask for (a retry starts again here too). A combined message comes
    # before the server checkpoints the round it evaluates: the state of a resume from the round before stays.
    states.prune(round_idx - 1 if instruction.splits else round_idx, newest=round_idx)
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    if instruction.splits:  # an evaluation error fails the whole reply: the server stops the run, as for `evaluate`
        evaluation = site.evaluate(wire.read_weights(message.content), cast(tuple[Split, ...], instruction.splits))
    try:
        update = site.train(wire.read_weights(message.content), round_idx, instruction.seed)
        client_states = site.client_states(instruction.requested_states)
        keep_site_state(site, states, round_idx + 1)
    except Exception as error:
        if evaluation is None:
            raise
        reason = site_policy.logged_error_reason(error, "train")
        return Message(wire.failed_training_reply(evaluation, reason), reply_to=message)
    reply = wire.train_reply(update.state, update.loss, update.num_steps, client_states, evaluation)
    return Message(reply, reply_to=message)


def evaluate(message: Message, context: Context) -> Message:
    """The site's metrics of the global model the message carries (the site's state after that round)."""
    site = open_site(context)
    config = message.content.config_records[wire.CONFIG]
    restore_site_state(site, context, config, completed_rounds=int(config["round"]) + 1)  # type: ignore[arg-type]
    site.load_server_state(wire.read_blob(message.content, wire.SERVER_STATE))
    splits = cast(tuple[Split, ...], tuple(wire.listed(config, "splits")))
    return Message(wire.evaluate_reply(site.evaluate(wire.read_weights(message.content), splits)), reply_to=message)
