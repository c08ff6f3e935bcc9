"""HarmoFL-Lightning's command line: ``python cli.py fit|validate|test|predict|compare --config configs/demo.yaml``.

Every setting is a typed constructor argument of the trainer (:class:`harmofl.FederatedTrainer`), the client
model (:class:`harmofl.FederatedClient` subclasses) or the data (:class:`harmofl.data.FederatedDataModule`
subclasses); ``python cli.py fit --help`` lists them and ``--print_config`` shows a full configuration.
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from harmofl import compare_cli
from harmofl.clients import FederatedClient
from harmofl.data import FederatedDataModule
from harmofl.run_folder import atomic_write_text
from harmofl.trainer import FederatedTrainer


class AtomicSaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` of the run, written atomically as every output of a run
    (:mod:`harmofl.run_folder`), by rank 0 once the trainer holds the run folder (its ``setup`` hook, inside ``fit``);
    an existing one is replaced: a resumed run records the configuration it continued with."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if trainer.is_global_zero:
            text = self.parser.dump(self.config, skip_none=False)
            atomic_write_text(Path(trainer.log_dir or ".") / self.config_filename, text)
            for logger in trainer.loggers:  # W&B shows the run's resolved configuration
                logger.log_hyperparams(yaml.safe_load(text))
        self.already_saved = True


class HarmoFLCLI(LightningCLI):
    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # Federated training, per-client evaluation of checkpoints, and prediction on unlabelled inputs
        # (`--predict.input`). `fit`'s executor is an object the Flower server passes in code, no setting: left out,
        # a saved config.yaml serves `test` and `predict` as it is.
        subcommands = LightningCLI.subcommands()
        return {**subcommands, "fit": {*subcommands["fit"], "executor"}}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # One seed for the whole run: model initialization and the per-round, per-client data order. A boolean
        # seed_everything is resolved in `before_instantiate_classes`, once Lightning has drawn the seed.
        parser.link_arguments("seed_everything", "trainer.seed", compute_fn=_trainer_seed)
        # Data that read class labels from files (SiteFolders) refuse a label the model has no class for before
        # training; jsonargparse links only into data classes that take `num_classes`.
        parser.link_arguments("model.init_args.num_classes", "data.init_args.num_classes")

    def before_instantiate_classes(self) -> None:
        # Without a subcommand (``run=False``: the Flower apps build their objects) the config is top-level.
        config = self.config[self.subcommand] if self.subcommand else self.config
        # `seed_everything: true` has been replaced by the random seed drawn (and inherited by the processes
        # the trainer launches); `false` seeds nothing globally, and the trainer's per-client seeds use 0.
        config.trainer.seed = _trainer_seed(config.seed_everything)
        if config.trainer.default_root_dir is None:
            config_files = config.get("config") or []
            name = Path(str(config_files[-1])).stem if config_files else "harmofl"
            config.trainer.default_root_dir = str(Path("runs") / name)
        if self.subcommand not in ("fit", None):
            # Evaluating a checkpoint must not overwrite the config.yaml that records how it was trained.
            self.save_config_callback = None


def _trainer_seed(seed_everything: bool | int) -> int:
    return 0 if isinstance(seed_everything, bool) else int(seed_everything)


def build(args: list[str], save_config: bool = False) -> HarmoFLCLI:
    """The trainer, client model and data a configuration describes (``args`` as on the command line, without
    a subcommand), instantiated as ``cli.py fit`` would: ``cli.trainer``, ``cli.model``, ``cli.datamodule``;
    ``save_config``: the trainer's ``fit`` writes ``config.yaml`` in its run folder, as ``cli.py fit`` does."""
    return _parsed(HarmoFLCLI, args, AtomicSaveConfig if save_config else None)


def _parsed(
    cli_class: type[HarmoFLCLI], args: list[str], save_config_callback: type[SaveConfigCallback] | None
) -> HarmoFLCLI:
    with warnings.catch_warnings():
        # The process's own command line (pytest's, flwr-clientapp's) is not this configuration's: nothing to warn.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        # A bad setting raises (ArgumentError names it) instead of exiting the process: a Flower app reports it.
        return cli_class(
            **_cli_kwargs(),
            args=args,
            run=False,
            save_config_callback=save_config_callback,
            parser_kwargs={"exit_on_error": False},
        )


class _ConfigCheckCLI(HarmoFLCLI):
    """Parses and checks a configuration as ``fit`` would, instantiating nothing."""

    def instantiate_classes(self) -> None:
        pass


def parse_fit_config(args: list[str]) -> tuple[LightningArgumentParser, Namespace]:
    """The parser and the checked configuration ``cli.py fit`` would run with ``args`` (without a subcommand),
    nothing instantiated: a bad key or value raises ``ArgumentError`` naming it, in about a second."""
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)  # a check seeds nothing worth announcing (compare checks once per strategy)
    try:
        cli = _parsed(_ConfigCheckCLI, args, None)
    finally:
        seed_log.setLevel(level)
    return cli.parser, cli.config


def _cli_kwargs() -> dict:
    return dict(
        model_class=FederatedClient,
        subclass_mode_model=True,
        datamodule_class=FederatedDataModule,
        subclass_mode_data=True,
        trainer_class=FederatedTrainer,
        seed_everything_default=0,
        # The client builds its own WeightPerturbation around the optimizer it is configured with.
        auto_configure_optimizers=False,
    )


def main() -> None:
    if sys.argv[1:2] == ["compare"]:
        # Many fits side by side: a typed function of its own that also takes every fit argument.
        compare_cli.main(sys.argv[2:])
        return
    HarmoFLCLI(**_cli_kwargs(), save_config_callback=AtomicSaveConfig)
