"""What makes two runs the same (the fit command, the code that runs it, every config file it reads), and the
markers in which a run folder of ``compare`` records it.

``compare`` reuses a finished run only when its key equals the new one (:func:`run_key`, :func:`finished`); it
never overwrites a run of another key (:func:`claim` refuses, naming how the keys differ, or sets the run aside).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from harmofl.run_folder import LOCK_FILE, RunFolderLock, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
# The code a `cli.py fit` run imports from this repository (its dependencies are pinned by the environment).
SOURCE_PACKAGES = ("harmofl", "callbacks")
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
STARTED_FILE = "compare_started.json"
DONE_FILE = "compare_done.json"


@functools.cache
def code_version() -> str:
    """``<package version>+<sha256 prefix>`` of the repository's ``cli.py`` and every ``*.py`` file of its
    packages (sorted paths and contents): an edit of the code is a new version, with or without a commit.
    Computed once per process."""
    import harmofl  # at call time: this module is imported while harmofl's __init__ runs

    hasher = hashlib.sha256()
    packages = (file for package in SOURCE_PACKAGES for file in (REPO / package).rglob("*.py"))
    files = [*(file for file in [REPO / "cli.py"] if file.is_file()), *packages]
    for file in sorted(files):
        hasher.update(file.relative_to(REPO).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"{harmofl.__version__}+{hasher.hexdigest()[:16]}"


def config_files(arguments: Sequence[str]) -> list[Path]:
    """Every config file a command line reads: each ``--config`` value, every argument naming an existing
    YAML/JSON file (``--model model.yaml``), and, recursively, the files those name (relative to the naming file's
    folder, or to the working folder, as jsonargparse resolves them). In the order first named."""
    named: dict[Path, None] = {}
    pending = [Path(value) for value in _named_files(arguments)]
    while pending:
        file = pending.pop(0)
        if file in named:
            continue
        if not file.is_file():
            raise FileNotFoundError(f"Config file {str(file)!r} of the run does not exist: pass an existing file.")
        named[file] = None
        pending += _files_named_in(file)
    return list(named)


def run_key(command: Sequence[str]) -> dict[str, Any]:
    """The key of the run ``command`` (its arguments, without the interpreter) makes: the command, the code
    version, and the SHA-256 of each config file it reads, by path."""
    return {
        "command": list(command),
        "code_version": code_version(),
        "config_sha256": {str(file): _sha256(file) for file in config_files(command)},
    }


def key_difference(recorded: Mapping[str, Any] | None, current: Mapping[str, Any]) -> str:
    """How the key a run folder records differs from ``current``, in words (``recorded`` None: no key)."""
    if recorded is None:
        return "it records no key (files compare did not make, or an unreadable marker)"
    changes = []
    if recorded.get("code_version") != current["code_version"]:
        before_version = recorded.get("code_version") or "unrecorded"
        changes.append(f"made by code version {before_version}, this is {current['code_version']}")
    before, after = recorded.get("config_sha256") or {}, current["config_sha256"]
    if not isinstance(before, Mapping):  # the first markers held one digest over the base config and overlay
        changes.append("its config files were recorded as one digest, before compare recorded them file by file")
        before = {}
    for file in dict.fromkeys([*before, *after]):
        if file not in before or file not in after:
            changes.append(f"config file {file} {'is new' if file not in before else 'is no longer read'}")
        elif before[file] != after[file]:
            changes.append(f"config file {file} changed")
    if recorded.get("command") != current["command"]:
        changes.append(f"its command was {recorded.get('command')}, this one is {current['command']}")
    return "; ".join(changes) or "the keys differ"


def finished(directory: Path, key: Mapping[str, Any]) -> bool:
    """Whether ``directory`` holds a finished run of ``key``."""
    return _recorded_key(directory / DONE_FILE) == key


def claim(directory: Path, key: Mapping[str, Any], rerun_changed: bool) -> bool:
    """Make ``directory`` the folder of a run of ``key`` (its started marker written); returns whether it holds an
    interrupted run of that key, to continue. A folder holding anything else (a finished run: ask :func:`finished`
    first whether to reuse it; a run of another key; files without a marker) is refused with how the keys differ
    or, with ``rerun_changed``, renamed to ``<directory>.replaced-<UTC time>`` (kept, not deleted)."""
    done, started = directory / DONE_FILE, directory / STARTED_FILE
    recorded = _recorded_key(done if done.is_file() else started)
    interrupted = not done.is_file() and recorded == key
    holds_files = directory.is_dir() and any(entry.name != LOCK_FILE for entry in directory.iterdir())
    if holds_files and not interrupted:
        _set_aside(directory, key_difference(recorded, key), rerun_changed)
    atomic_write_text(started, json.dumps(key) + "\n")
    return interrupted


def mark_done(directory: Path, key: Mapping[str, Any]) -> None:
    atomic_write_text(directory / DONE_FILE, json.dumps(key) + "\n")


def _set_aside(directory: Path, difference: str, rerun_changed: bool) -> None:
    if not rerun_changed:
        raise FileExistsError(
            f"Run folder {str(directory)!r} holds a run made with another key: {difference}. Compare never "
            "overwrites it: pass a new --output_dir, or --rerun_changed true to move it aside (to "
            f"{directory.name}.replaced-<UTC time>) and run again."
        )
    aside = directory.with_name(f"{directory.name}.replaced-{datetime.datetime.now(datetime.UTC):%Y%m%dT%H%M%S%fZ}")
    with RunFolderLock(directory):  # never while a fit still writes it
        directory.rename(aside)
    print(f"moved {directory} aside to {aside}: {difference}")


def _recorded_key(marker: Path) -> dict[str, Any] | None:
    """The key a marker records; None if there is none or it cannot be read."""
    try:
        key = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    return key if isinstance(key, dict) else None


def _named_files(arguments: Sequence[str]) -> Iterator[str]:
    for index, argument in enumerate(arguments):
        value = argument.split("=", 1)[1] if argument.startswith("--") and "=" in argument else argument
        is_config_option = arguments[index - 1 : index] == ["--config"] or argument.startswith("--config=")
        if is_config_option or (value.endswith(CONFIG_SUFFIXES) and Path(value).is_file()):
            yield value


def _files_named_in(file: Path) -> list[Path]:
    """The existing config files a YAML/JSON file names among its string values."""
    try:
        content = yaml.safe_load(file.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"Config file {str(file)!r} cannot be read as YAML: {error}") from error
    found = []
    for value in _strings(content):
        if value.endswith(CONFIG_SUFFIXES):
            existing = [candidate for candidate in (file.parent / value, Path(value)) if candidate.is_file()]
            found += existing[:1]
    return found


def _strings(content: Any) -> Iterator[str]:
    if isinstance(content, str):
        yield content
    elif isinstance(content, Mapping):
        for value in content.values():
            yield from _strings(value)
    elif isinstance(content, list):
        for value in content:
            yield from _strings(value)


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()
