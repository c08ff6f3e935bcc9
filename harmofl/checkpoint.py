"""Federated checkpoints on disk: written atomically, loaded without executing pickled code.

A checkpoint is a small *manifest* and one *record file* per client, in the ``records`` folder beside it::

    checkpoints/
        last.ckpt                           the manifest of the last completed round
        best.ckpt                           a copy of the best round's manifest (the same references)
        records/<client>-<digest>.pt        one client's record, named by what it holds

The manifest (format :data:`FORMAT_VERSION`, ``torch.save`` of a dict) holds the round, the global weights, the
callbacks', server optimizer's, aggregator's and executor's state, the run record (history, best round, failures)
and ``clients``: each client's record file, relative to the manifest's folder. A record file holds
``{RECORD_KEY: RECORD_VERSION, "client": name, "entry": entry}``, the entry being the client's local keys, optimizer
state, module state and callbacks' client state (:meth:`~harmofl.federation.store.ClientStore.entry`); the digest
in its name is :func:`content_digest` of its client and entry, checked when it is read. A file is thus never
overwritten with other content: a manifest's references stay valid for as long as it exists, and runs of bitwise
equal state write bitwise equal manifests. Each record is written once its client's state changed, by the process
that holds the client, before the manifest that references it; the records no manifest references are removed
after the manifest is written (:func:`remove_unreferenced_records`), so a crash leaves extra files, never a missing
one. Every file is read with ``weights_only=True``.

Format 1, written before records had files of their own (every client's entry inline under ``clients``), is read
for evaluation and to continue a fit.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from harmofl.run_folder import atomic_file, remove_stale_temporaries

FORMAT_KEY = "harmofl_checkpoint"
FORMAT_VERSION = 2
#: The format whose manifest holds every client's entry inline.
INLINE_FORMAT_VERSION = 1
RECORD_KEY = "harmofl_client_record"
RECORD_VERSION = 1
RECORDS_FOLDER = "records"
# Record files written at once: 3x faster than one at a time for 100 small records on an ext4 VM disk.
_WRITERS = 8
# Hex digits of the content digest in a record's name: 128 bits.
_DIGEST_LENGTH = 32
_RECORD_REFERENCE = re.compile(
    rf"{RECORDS_FOLDER}/[A-Za-z0-9_-][A-Za-z0-9_.-]{{0,47}}-([0-9a-f]{{{_DIGEST_LENGTH}}})\.pt"
)


def atomic_torch_save(data: Any, path: Path) -> None:
    """``torch.save`` through :func:`harmofl.run_folder.atomic_file`: a crash at any moment leaves either the
    previous file or the new one, never a truncated one."""
    with atomic_file(path) as handle:
        torch.save(data, handle)


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write a checkpoint's manifest atomically: a crash never leaves a truncated file. Its only writer (the holder
    of the run folder's lock) also removes the temporary files of writers killed before."""
    atomic_torch_save({FORMAT_KEY: FORMAT_VERSION, **state}, path)
    remove_stale_temporaries(path)


def copy_checkpoint(source: Path, destination: Path) -> None:
    """Atomically copy a manifest (``last.ckpt`` to ``best.ckpt``: the same record files); its only writer, like
    :func:`save_checkpoint`, also removes what killed writers left."""
    with atomic_file(destination) as handle, source.open("rb") as original:
        shutil.copyfileobj(original, handle)
    remove_stale_temporaries(destination)


def load_manifest(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint's manifest as stored (format 2: ``clients`` holds references; format 1: entries), loaded on the
    CPU with ``weights_only=True``; ``mmap`` maps the tensors instead of reading them. Errors say what is wrong."""
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint {str(path)!r} does not exist: pass the path of a .ckpt written by `fit`.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # a truncated file, or one holding arbitrary pickled objects
        raise ValueError(f"Checkpoint {str(path)!r} cannot be loaded safely: {error}") from error
    if not isinstance(state, dict) or state.get(FORMAT_KEY) not in (INLINE_FORMAT_VERSION, FORMAT_VERSION):
        raise ValueError(
            f"{str(path)!r} is not a HarmoFL federated checkpoint (format {INLINE_FORMAT_VERSION} or "
            f"{FORMAT_VERSION}): use checkpoints/last.ckpt or checkpoints/best.ckpt from a `fit` run."
        )
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The whole checkpoint, every client's entry read from its record file into ``clients`` (as format 1 held
    them); safe loads throughout. To restore only some clients, :func:`load_manifest` and :func:`client_entry`."""
    manifest = load_manifest(path)
    if "clients" in manifest:
        manifest["clients"] = {client: client_entry(manifest, path, client) for client in manifest["clients"]}
    return manifest


def record_references(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Each client's record file (relative to the manifest's folder); empty for a format-1 manifest."""
    if manifest.get(FORMAT_KEY) == INLINE_FORMAT_VERSION:
        return {}
    return dict(manifest.get("clients", {}))


def client_entry(manifest: Mapping[str, Any], path: Path, client: str) -> dict[str, Any] | None:
    """``client``'s entry in the checkpoint whose manifest, read from ``path``, is ``manifest``; None if absent."""
    if client not in manifest.get("clients", {}):
        return None
    if manifest[FORMAT_KEY] == INLINE_FORMAT_VERSION:
        return manifest["clients"][client]
    return read_client_record(path, manifest["clients"][client], client)


# -- client record files ------------------------------------------------------------------------------------------


def content_digest(value: Any) -> str:
    """SHA-256 (hex) of a nested structure of dicts, lists, tuples, tensors and plain values: equal for bitwise equal
    contents (tensors by dtype, shape and element bytes; other values by type and ``repr``), whatever their storage."""
    digest = hashlib.sha256()
    _feed(digest, value)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"T{flat.dtype}{list(value.shape)}:".encode())
        digest.update(flat.view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        digest.update(f"D{len(value)}:".encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__}{len(value)}:".encode())
        for item in value:
            _feed(digest, item)
    else:
        text = repr(value)
        digest.update(f"{type(value).__name__}{len(text)}:{text}".encode())


def write_client_record(checkpoint_dir: Path, client: str, entry: Mapping[str, Any]) -> str:
    """Write ``client``'s record file atomically into ``checkpoint_dir/records``; returns its reference (the path
    relative to ``checkpoint_dir``), named by the content's digest."""
    content = {"client": client, "entry": entry}
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", client).lstrip(".")[:48] or "client"
    reference = f"{RECORDS_FOLDER}/{slug}-{content_digest(content)[:_DIGEST_LENGTH]}.pt"
    atomic_torch_save({RECORD_KEY: RECORD_VERSION, **content}, checkpoint_dir / reference)
    return reference


def write_client_records(checkpoint_dir: Path, entries: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """:func:`write_client_record` of each ``{client: entry}``, several at a time (each waits on its disk flushes,
    which the filesystem then commits together); returns each client's reference."""
    with ThreadPoolExecutor(max_workers=_WRITERS) as pool:
        references = pool.map(lambda client: write_client_record(checkpoint_dir, client, entries[client]), entries)
        return dict(zip(entries, references))


def read_client_record(manifest_path: Path, reference: str, client: str) -> dict[str, Any]:
    """``client``'s entry from its record file ``reference`` (relative to the manifest's folder), loaded with
    ``weights_only=True`` and checked against its name; errors name the file and what to do."""
    remedy = (
        f"A checkpoint is its manifest {str(manifest_path)!r} together with the {RECORDS_FOLDER}/ folder beside it: "
        "copy or move them together, restore the folder from a copy, or use another checkpoint."
    )
    matched = _RECORD_REFERENCE.fullmatch(reference) if isinstance(reference, str) else None
    if matched is None:
        raise ValueError(
            f"Checkpoint {str(manifest_path)!r} names {reference!r} as client {client!r}'s record, not a "
            f"file of its {RECORDS_FOLDER}/ folder: the manifest is damaged. {remedy}"
        )
    path = manifest_path.parent / reference
    if not path.is_file():
        raise FileNotFoundError(f"Client {client!r}'s record {str(path)!r} is missing. {remedy}")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file, or one holding arbitrary pickled objects
        raise ValueError(
            f"Client {client!r}'s record {str(path)!r} cannot be loaded safely: {error}. {remedy}"
        ) from error
    if (
        not isinstance(content, dict)
        or content.get(RECORD_KEY) != RECORD_VERSION
        or content.get("client") != client
        or content_digest({"client": client, "entry": content.get("entry")})[:_DIGEST_LENGTH] != matched.group(1)
    ):
        raise ValueError(
            f"{str(path)!r} does not hold client {client!r}'s record that its name promises: it was damaged or "
            f"replaced. {remedy}"
        )
    return content["entry"]


def remove_unreferenced_records(checkpoint_dir: Path, manifests: Iterable[str] = ("last.ckpt", "best.ckpt")) -> None:
    """Delete the record files (and killed writers' temporary files) that none of ``manifests`` (in
    ``checkpoint_dir``) references. Only for the run's one manifest writer, while no process writes records."""
    folder = checkpoint_dir / RECORDS_FOLDER
    if not folder.is_dir():
        return
    kept = {
        reference
        for name in manifests
        if (checkpoint_dir / name).is_file()
        for reference in record_references(load_manifest(checkpoint_dir / name, mmap=True)).values()
    }
    for path in folder.iterdir():
        temporary = path.name.startswith(".") and ".pt.tmp." in path.name  # what a killed writer left
        if temporary or (path.suffix == ".pt" and f"{RECORDS_FOLDER}/{path.name}" not in kept):
            path.unlink(missing_ok=True)
