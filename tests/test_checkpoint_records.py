"""Checkpoints whose cost follows the participants: a record file per client, written when it changed, by its holder;
a small manifest per round; unreferenced files removed; exact resume; safe, checked loads."""

import functools
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from callbacks import AmplitudeHarmonization
from harmofl.checkpoint import (
    FORMAT_KEY,
    INLINE_FORMAT_VERSION,
    RECORD_KEY,
    RECORD_VERSION,
    content_digest,
    load_checkpoint,
    load_manifest,
)
from harmofl.federation.callback import FederatedCallback
from harmofl.trainer import FederatedTrainer

from helpers import REPO, tiny_classifier, tiny_histology


@pytest.fixture
def one_thread():
    """Runs compared bitwise do the same arithmetic: one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordFiles(FederatedCallback):
    """After each round: the record files on disk, and the manifest's references."""

    def __init__(self):
        self.files, self.references = [], []

    def on_round_end(self, trainer, pl_module, round_idx, results):
        folder = trainer.checkpoint_dir / "records"
        self.files.append({path.name: path.stat().st_size for path in folder.iterdir()})
        self.references.append(load_manifest(trainer.checkpoint_dir / "last.ckpt")["clients"])


class EvaluationCounter(FederatedCallback):
    """Per-client state that changes in evaluation, not in training: how many validation batches a client saw."""

    def __init__(self):
        self.counts = {}

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.counts[trainer.current_client] = self.counts.get(trainer.current_client, 0) + 1

    def client_state_dict(self, client):
        return {"validation_batches": self.counts.get(client, 0)}

    def load_client_state_dict(self, client, state):
        self.counts[client] = state["validation_batches"]


def _fit(root, rounds=3, ckpt_path=None, callbacks=(), model_kwargs=None, harmonized=True, **kwargs):
    harmonization = [AmplitudeHarmonization(preset="paper", share_target="every_round")] if harmonized else []
    trainer = FederatedTrainer(
        rounds=rounds,
        accelerator="cpu",
        enable_progress_bar=False,
        default_root_dir=str(root),
        callbacks=[*harmonization, *callbacks],
        **{"clients_per_round": 1, **kwargs},
    )
    trainer.fit(tiny_classifier(**(model_kwargs or {})), tiny_histology(num_sites=4), ckpt_path=ckpt_path)
    return trainer


def _same(one, two, where="<root>"):
    """Bitwise equality of two loaded checkpoints (tensors by dtype, shape and bytes)."""
    assert type(one) is type(two), where
    if isinstance(one, torch.Tensor):
        assert one.dtype == two.dtype and one.shape == two.shape and content_digest(one) == content_digest(two), where
    elif isinstance(one, dict):
        assert list(one) == list(two), where
        for key in one:
            _same(one[key], two[key], f"{where}/{key}")
    elif isinstance(one, (list, tuple)):
        assert len(one) == len(two), where
        for index, (a, b) in enumerate(zip(one, two)):
            _same(a, b, f"{where}[{index}]")
    else:
        assert one == two or (one != one and two != two), where  # NaN equals NaN


def test_a_round_writes_the_records_of_its_participants_only(tmp_path):
    files = RecordFiles()
    trainer = _fit(tmp_path / "run", callbacks=[files], held_out_clients=["site_3"])
    # Round 1 writes every client's first record (the held-out one too); later rounds only the participant's.
    assert len(files.files[0]) == 4 and set(files.references[0]) == {f"site_{i}" for i in range(4)}
    for round_idx in (1, 2):
        (participant,) = trainer.federation.participants(round_idx)
        before, after = files.references[round_idx - 1], files.references[round_idx]
        changed = [client for client in after if after[client] != before[client]]
        assert changed == [participant]
        new_files = set(files.files[round_idx]) - set(files.files[round_idx - 1])
        assert new_files == {after[participant].removeprefix("records/")}
        record_bytes = files.files[round_idx][after[participant].removeprefix("records/")]
        optimizer_bytes = sum(
            value.numel() * value.element_size()
            for state in trainer.client_records[participant].optimizer_state["state"].values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )
        assert optimizer_bytes < record_bytes < 1.2 * optimizer_bytes + 100_000  # one client's record, no more
    # A manifest holds no client's state: it is about one model's size, whatever the clients.
    model_bytes = sum(v.numel() * v.element_size() for v in trainer.global_state.values())
    assert (trainer.checkpoint_dir / "last.ckpt").stat().st_size < 1.2 * model_bytes + 100_000


def test_unreferenced_records_are_removed_and_best_keeps_its_own(tmp_path):
    """lr=0 and no harmonization: the model and its inputs never change, so round 1 stays the best (ties keep the
    earlier round) while every participant's momentum changes its record: best.ckpt must keep records that
    last.ckpt no longer references."""
    frozen = {"optimizer": functools.partial(torch.optim.SGD, lr=0.0, momentum=0.9)}
    files = RecordFiles()
    trainer = _fit(tmp_path / "run", rounds=4, callbacks=[files], model_kwargs=frozen, harmonized=False)
    checkpoints = trainer.checkpoint_dir
    best, last = (load_manifest(checkpoints / name) for name in ("best.ckpt", "last.ckpt"))
    assert best["best_round"] == 1 and last["round"] == 4 and best["clients"] != last["clients"]
    on_disk = {f"records/{path.name}" for path in (checkpoints / "records").iterdir()}
    assert on_disk == set(best["clients"].values()) | set(last["clients"].values())
    for round_idx in range(1, 4):  # each round's participant left a superseded record behind, now removed
        assert len(files.files[round_idx]) <= 4 + round_idx
    for name in ("best.ckpt", "last.ckpt"):  # both load completely, every record checked against its name
        assert set(load_checkpoint(checkpoints / name)["clients"]) == {f"site_{i}" for i in range(4)}


def test_a_client_state_changed_outside_training_is_written_again(tmp_path):
    counter = EvaluationCounter()
    trainer = _fit(tmp_path / "run", rounds=2, callbacks=[counter])
    non_participant = next(c for c in trainer.federation.client_names if c not in trainer.federation.participants(1))
    entry = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")["clients"][non_participant]
    assert entry["callbacks"]["EvaluationCounter"]["validation_batches"] == counter.counts[non_participant] > 1


@pytest.mark.parametrize(("resume_from", "stopped_after", "rounds"), [("last", 2, 3), ("best", 5, 6)])
def test_resuming_gives_the_uninterrupted_run_bitwise(tmp_path, one_thread, resume_from, stopped_after, rounds):
    uninterrupted = _fit(tmp_path / "uninterrupted", rounds=rounds)
    interrupted = _fit(tmp_path / "interrupted", rounds=stopped_after)
    if resume_from == "best":
        assert interrupted.best_round == 4  # the tiny demo's round 5 does not improve: this resumes an earlier round
    resumed = _fit(tmp_path / "interrupted", rounds=rounds, ckpt_path=resume_from)
    for name in ("last.ckpt", "best.ckpt"):
        # Equal references name bitwise equal records (their digests); load_checkpoint compares these too. A best.ckpt
        # of before the resume says the rounds the interrupted fit was set to run: a setting, not the state.
        one, two = (load_checkpoint(run.checkpoint_dir / name) for run in (resumed, uninterrupted))
        _same({**one, "rounds": None}, {**two, "rounds": None})
    on_disk = sorted(path.name for path in (resumed.checkpoint_dir / "records").iterdir())
    assert on_disk == sorted(path.name for path in (uninterrupted.checkpoint_dir / "records").iterdir())


def test_a_copied_checkpoint_evaluates_and_a_missing_or_damaged_record_is_named(tmp_path):
    trainer = _fit(tmp_path / "run", rounds=1)
    copy = tmp_path / "copy"
    shutil.copytree(trainer.checkpoint_dir, copy)  # references resolve beside the manifest, wherever it is
    evaluator = FederatedTrainer(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path / "eval"))
    tested = evaluator.test(tiny_classifier(), tiny_histology(num_sites=4), ckpt_path=str(copy / "best.ckpt"))
    assert set(tested["clients"]) == {f"site_{i}" for i in range(4)}

    reference = load_manifest(copy / "best.ckpt")["clients"]["site_2"]
    record = copy / reference
    content = record.read_bytes()
    record.write_bytes(content[: len(content) // 2])
    with pytest.raises(ValueError, match=f"'site_2'.*{record.name}.*cannot be loaded safely.*records/ folder"):
        load_checkpoint(copy / "best.ckpt")
    other = copy / load_manifest(copy / "best.ckpt")["clients"]["site_1"]
    shutil.copyfile(other, record)  # a whole record, of another client
    with pytest.raises(ValueError, match=f"{record.name}.*does not hold client 'site_2'"):
        load_checkpoint(copy / "best.ckpt")
    record.unlink()
    with pytest.raises(FileNotFoundError, match=f"'site_2'.*{record.name}.*is missing"):
        evaluator.test(tiny_classifier(), tiny_histology(num_sites=4), ckpt_path=str(copy / "best.ckpt"))


class _RunsCode:
    """Unpickling this opens (creates) ``marker``: code a safe load must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickled_code_in_a_record_never_runs(tmp_path):
    trainer = _fit(tmp_path / "run", rounds=1)
    path = trainer.checkpoint_dir / "last.ckpt"
    record = path.parent / load_manifest(path)["clients"]["site_0"]
    marker = tmp_path / "code_ran"
    torch.save({RECORD_KEY: RECORD_VERSION, "client": "site_0", "entry": _RunsCode(marker)}, record)
    with pytest.raises(ValueError, match=f"{record.name}.*cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_a_format_1_checkpoint_still_evaluates_and_resumes(tmp_path):
    trainer = _fit(tmp_path / "run", rounds=1)
    inline = load_checkpoint(trainer.checkpoint_dir / "last.ckpt")  # every entry inline, as format 1 held them
    old = tmp_path / "old" / "last.ckpt"
    old.parent.mkdir()
    torch.save({**inline, FORMAT_KEY: INLINE_FORMAT_VERSION}, old)
    evaluator = FederatedTrainer(accelerator="cpu", enable_progress_bar=False, default_root_dir=str(tmp_path / "eval"))
    assert set(evaluator.test(tiny_classifier(), tiny_histology(num_sites=4), ckpt_path=str(old))["clients"]) == {
        f"site_{i}" for i in range(4)
    }
    resumed = _fit(tmp_path / "resumed", rounds=2, ckpt_path=str(old))
    manifest = load_manifest(resumed.checkpoint_dir / "last.ckpt")
    assert manifest["round"] == 2 and all((resumed.checkpoint_dir / r).is_file() for r in manifest["clients"].values())


TWO_PROCESSES = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import torch

    sys.path.insert(0, str(Path(sys.argv[2]) / "tests"))
    from callbacks import AmplitudeHarmonization
    from harmofl.federation import checkpointing
    from harmofl.trainer import FederatedTrainer
    from helpers import tiny_classifier, tiny_histology

    root = Path(sys.argv[1])
    write = checkpointing.write_client_records

    def logged_write(folder, entries):  # which process writes which records
        references = write(folder, entries)
        with open(root / f"writes-{torch.distributed.get_rank()}.log", "a") as log:
            log.writelines(f"{client} {reference}\\n" for client, reference in references.items())
        return references

    checkpointing.write_client_records = logged_write
    trainer = FederatedTrainer(
        rounds=2, accelerator="cpu", devices=2, clients_per_round=2, enable_progress_bar=False,
        default_root_dir=str(root / "run"), callbacks=[AmplitudeHarmonization()],
    )
    trainer.fit(tiny_classifier(), tiny_histology(num_sites=4))
    """
)


def test_two_processes_write_each_record_once_from_its_holder(tmp_path):
    script = tmp_path / "two_processes.py"  # a file: Fabric starts the second process by running it again
    script.write_text(TWO_PROCESSES)
    process = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(REPO)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert process.returncode == 0, process.stderr[-3000:]
    writes = {rank: (tmp_path / f"writes-{rank}.log").read_text().split("\n")[:-1] for rank in (0, 1)}
    for rank, lines in writes.items():
        clients = [line.split()[0] for line in lines]
        assert all(int(client.removeprefix("site_")) % 2 == rank for client in clients)  # process r holds r, r+2
        assert len(lines) == len(set(lines))  # no record written twice
    # Round 1: every client's first record; round 2: its two participants' only.
    assert sum(len(lines) for lines in writes.values()) == 4 + 2
    manifest = load_manifest(tmp_path / "run" / "checkpoints" / "last.ckpt")
    written = {line.split()[1] for lines in writes.values() for line in lines}
    assert set(manifest["clients"].values()) <= written
    assert set(load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")["clients"]) == set(manifest["clients"])
