"""``python cli.py compare``'s command line: compare's own settings (:func:`harmofl.compare.run_comparison`'s
arguments) plus every argument ``cli.py fit`` takes (``--trainer.*``, ``--model.*``, ``--data.*``,
``--seed_everything``), passed to each run.

The command line is split by namespace: fit's arguments (with their values) go to fit's own parser, which checks
them once per strategy before the first run starts (:func:`harmofl.compare.check_fit_arguments`); the rest is parsed
strictly by compare's parser. ``--trainer.default_root_dir`` is the comparison's output folder (``--output_dir``
names the same), ``--seed_everything K`` a single seed (``--seeds K``).
"""

from __future__ import annotations

import argparse
import shlex
from collections.abc import Sequence
from typing import Any

import yaml
from jsonargparse import ArgumentParser, DefaultHelpFormatter

from harmofl.compare import STRATEGY_DIR, available_strategies, run_comparison

FIT_NAMESPACES = ("--trainer", "--model", "--data", "--seed_everything")
FLAGS = ("-h", "--help", "--print_config")  # compare's options that take no value


def split_arguments(arguments: Sequence[str]) -> tuple[list[str], list[str]]:
    """``(compare's arguments, fit's arguments)``: an option of a fit namespace and the values after it (up to the
    next option) are fit's; any other option and its value (the next word, even one starting with ``--``, as
    ``--overrides "--trainer.rounds 1"``) are compare's."""
    own: list[str] = []
    fit: list[str] = []
    index = 0
    while index < len(arguments):
        word = arguments[index]
        key = word.split("=", 1)[0]
        if key in FIT_NAMESPACES or key.startswith(tuple(f"{namespace}." for namespace in FIT_NAMESPACES)):
            fit.append(word)
            index += 1
            while index < len(arguments) and not arguments[index].startswith("--"):
                fit.append(arguments[index])
                index += 1
            continue
        takes_value = word.startswith("--") and "=" not in word and word not in FLAGS
        own += arguments[index : index + 1 + takes_value]
        index += 1 + takes_value
    return own, fit


def pop_option(arguments: list[str], key: str) -> str | None:
    """Remove ``key``'s occurrences (``--key value`` or ``--key=value``) from ``arguments``; its last value."""
    value = None
    index = 0
    while index < len(arguments):
        word = arguments[index]
        if word == key and index + 1 < len(arguments):
            value = arguments[index + 1]
            del arguments[index : index + 2]
        elif word.startswith(f"{key}="):
            value = word.split("=", 1)[1]
            del arguments[index]
        else:
            index += 1
    return value


def strategy_lines() -> str:
    """One line per strategy of ``configs/strategies/``: its name and its overlay's first comment line."""
    lines = []
    for name in available_strategies():
        first = (STRATEGY_DIR / f"{name}.yaml").read_text().splitlines()[:1]
        description = first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""
        lines.append(f"  {name:<14} {description}")
    return "\n".join(lines)


class KeepLinesFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help, the description and epilog kept line by line (one line per strategy)."""


def compare_parser() -> ArgumentParser:
    epilog = (
        "Every argument of `cli.py fit` (--trainer.*, --model.*, --data.*; see `python cli.py fit --help`) is "
        "passed to each run, checked once before the first run starts; --trainer.default_root_dir is the output "
        "folder, --seed_everything K runs the one seed K. With --trainer.logger WandbLogger the comparison is one "
        "W&B group. --print_config prints compare's settings and the fit config every run starts from (before its "
        "strategy's overlay).\n\nstrategies (configs/strategies/):\n" + strategy_lines()
    )

    parser = ArgumentParser(
        prog="cli.py compare", description=run_comparison.__doc__, epilog=epilog, formatter_class=KeepLinesFormatter
    )
    parser.add_function_arguments(run_comparison)
    return parser


def settings_from(arguments: Sequence[str]) -> tuple[dict[str, Any], bool]:
    """``run_comparison``'s keyword arguments from a ``compare`` command line, and whether ``--print_config`` was
    given. Fit's arguments are appended to ``overrides``.

    Raises:
        ValueError: ``--trainer.default_root_dir`` and ``--output_dir`` (or ``--seed_everything`` and ``--seeds``)
            given with different values.
    """
    own, fit = split_arguments(arguments)
    print_config = "--print_config" in own
    settings = compare_parser().parse_args([word for word in own if word != "--print_config"]).as_dict()
    root_dir = pop_option(fit, "--trainer.default_root_dir")
    if root_dir is not None:
        if settings["output_dir"] not in (None, root_dir):
            raise ValueError(
                f"--trainer.default_root_dir {root_dir!r} and --output_dir {settings['output_dir']!r} both name the "
                "comparison's output folder: give one of them."
            )
        settings["output_dir"] = root_dir
    seed = pop_option(fit, "--seed_everything")
    if seed is not None:
        if settings["seeds"] not in ("0,1,2", seed):  # run_comparison's default
            raise ValueError(f"--seed_everything {seed} and --seeds {settings['seeds']} disagree: give one of them.")
        settings["seeds"] = seed
    settings["overrides"] = shlex.join([*fit, *shlex.split(settings["overrides"])])
    return settings, print_config


def print_config(settings: dict[str, Any]) -> None:
    """Compare's settings, then the fit config every run starts from (the base config with the fit arguments,
    before the strategy's overlay), as YAML."""
    from harmofl.cli import parse_fit_config

    parser, config = parse_fit_config(["--config", settings["config"], *shlex.split(settings["overrides"])])
    print(yaml.safe_dump({"compare": settings}, sort_keys=False), end="")
    print("# the fit config of every run, before its strategy's overlay:")
    print(parser.dump(config, skip_none=False), end="")


def main(arguments: Sequence[str]) -> None:
    try:
        settings, wants_config = settings_from(arguments)
        print_config(settings) if wants_config else run_comparison(**settings)
    except ValueError as error:  # a setting compare or fit refuses: the message says what to change
        raise SystemExit(f"cli.py compare: {error}") from error
