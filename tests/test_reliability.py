"""A hostile user's tour (issue 12, item 9): broken caches are recomputed,
a full disk and a busy output folder are one-line errors, interruptions
(Ctrl-C, SIGTERM, kill -9) leave nothing half-written and advise a command
that works, and a failed run leaves no misleading output."""
from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnstress.__main__ import build_parser, main
from cnnstress.checkpoint import atomic_write, read_checkpoint, save_checkpoint
from cnnstress.errors import CnnstressError
from cnnstress.lock import LOCK_FILE
from cnnstress.results import Count, Explanations, Fraction, Record, StressResult
from cnnstress.stages.base import load_cached
from cnnstress.stages.explanations import explanations_problem
from cnnstress.stages.stress import stress_problem
from conftest import cli

REPO = Path(__file__).resolve().parents[1]


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _one_line(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _advised(message: str) -> list[str]:
    """The arguments of the `python -m cnnstress ...` command a message advises."""
    command = message.split("`python -m cnnstress ", 1)[1].split("`", 1)[0]
    return shlex.split(command)


def _temp_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob(".*.tmp"))


@pytest.fixture
def trained(trained_copy) -> Path:
    """A private copy of the session's trained smoke pair (tests here write into it)."""
    return trained_copy


# --- broken caches -----------------------------------------------------------------

@pytest.mark.parametrize("damage", ["garbage", "truncated", "missing array", "wrong shape"])
def test_broken_predictions_cache_is_recomputed(trained, shared_cifar_dir, tmp_path, capsys, damage):
    from cnnstress.config import get_config
    cfg = get_config("smoke", device="cpu")
    from cnnstress.io import predictions_path
    from cnnstress.stages.failures import stage as failures
    from cnnstress.study import Study
    out = tmp_path / "out"
    shutil.copytree(trained, out)
    study = Study(config=cfg, data_dir=shared_cifar_dir, out_dir=out, train=False)
    splits = study.splits
    good = failures.predictions(study, "baseline")
    path = predictions_path(out, "baseline")
    raw = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00not an npz at all" * 10)
    elif damage == "truncated":
        path.write_bytes(raw[:len(raw) // 2])
    else:
        with np.load(path) as npz:
            arrays = dict(npz)
        if damage == "missing array":
            del arrays["logits"]
        else:
            arrays["probs"] = arrays["probs"][:, :3]
        with open(path, "wb") as f:
            np.savez_compressed(f, **arrays)
    study = Study(config=cfg, data_dir=shared_cifar_dir, out_dir=out, train=False)   # a kernel restart: read the cache again
    study.splits, study.model("baseline")              # noqa: B018  (their log lines first)
    capsys.readouterr()
    again = failures.predictions(study, "baseline")
    logged = capsys.readouterr().out
    assert logged.count("\n") == 1 and logged.startswith(f"predictions: {path}") and "; recomputing" in logged
    for field in ("logits", "probs", "preds", "labels"):
        assert torch.equal(getattr(again, field), getattr(good, field)), field
    with np.load(path) as npz:                           # the cache was rewritten whole
        assert npz["probs"].shape == (len(splits.test), 10)


def _read(path, key, log=None, n_eps: int = 2):
    """A JSON cache as its stage reads it: key, the Record's types and ranges, then the stage's own check."""
    if path.name.startswith("stress"):
        return load_cached(path, key, StressResult, lambda r: stress_problem(r, n_eps), log)
    n_test = len(key["test_indices"])
    return load_cached(path, key, Explanations, lambda r: explanations_problem(r, ("baseline", "improved"), n_test),
                       log)


@dataclass
class _Part(Record):
    n: Count
    x: str


@dataclass
class _Whole(Record):
    a: Fraction
    b: list[Count]
    c: _Part | None = None


def test_record_types_and_ranges_hand_worked():
    from cnnstress.errors import ResultFormatError

    def problem(data):
        try:
            _Whole.from_dict(data, "results")
        except ResultFormatError as exc:
            return str(exc)
        return None

    assert problem({"a": 1, "b": [1, 2]}) is None and problem({"a": 0.5, "b": [], "c": {"n": 3, "x": "y"}}) is None
    assert problem({"a": float("nan"), "b": [0]}) is None             # an undefined statistic
    assert problem([]) == "results is list, expected an object"
    assert problem(None) == "results is null, expected an object"
    assert problem({"a": True, "b": [1, 2]}) == "results.a is bool, expected a number"
    assert problem({"a": 1.5, "b": [1, 2]}) == "results.a is 1.5, expected 0.0..1.0"
    assert problem({"a": 1, "b": [1, -2]}) == "results.b[1] is -2, expected 0..inf"
    assert problem({"a": 1, "b": [1, 2.5]}) == "results.b[1] is float, expected a whole number"
    assert problem({"a": 1, "b": [1, 2], "c": {"n": 3}}) == "results.c.x is missing"
    assert problem({"b": [1, 2]}) == "results.a is missing"


def test_real_caches_read_back_whole(analysed_run):
    """The records and the stages' checks accept what the stages really write (else every run would recompute)."""
    from cnnstress.config import get_config
    n_eps = len(get_config("smoke").adv_eps)
    for name in ("baseline_", "improved_", ""):
        path = analysed_run / (f"stress_{name[:-1]}.json" if name else "explanations.json")
        good = json.loads(path.read_text())
        assert _read(path, good["key"], n_eps=n_eps).to_dict() == good["results"]


def _drop(results: dict, dotted: str) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        results = results[p]
    del results[last]


def _damaged(good: dict, content: str, field: str):
    if content == "[]":
        return []
    if content == "null":
        return None
    bad = json.loads(json.dumps(good))
    if content == "matching key, empty results":
        bad["results"] = {}
    else:
        _drop(bad["results"], field)
    return bad


CONTENTS = ["[]", "null", "matching key, empty results", "matching key, missing field"]
CACHES = [("stress_baseline.json", "calibration.temperature"),
          ("explanations.json", "sanity.improved.gradcam.verdict")]


@pytest.mark.parametrize("content", CONTENTS)
@pytest.mark.parametrize("cache, field", CACHES)
def test_malformed_json_cache_is_a_miss(analysed_run, tmp_path, cache, field, content):
    good = json.loads((analysed_run / cache).read_text())
    path = tmp_path / cache
    path.write_text(json.dumps(good))
    assert _read(path, good["key"]).to_dict() == good["results"]
    path.write_text(json.dumps(_damaged(good, content, field)))
    logged = []
    assert _read(path, good["key"], logged.append) is None
    assert len(logged) == 1 and logged[0].startswith(f"{cache}: not a valid cache (")
    if content.endswith("missing field"):
        assert f"results.{field} is missing" in logged[0]


@pytest.mark.slow
@pytest.mark.parametrize("cache, field, content", [(*CACHES[0], CONTENTS[3]), (*CACHES[1], CONTENTS[0])])
def test_malformed_json_cache_is_recomputed(analysed_copy, shared_cifar_dir, capsys, cache, field, content):
    path = analysed_copy / cache
    good = json.loads(path.read_text())
    path.write_text(json.dumps(_damaged(good, content, field)))
    command = "stress" if cache.startswith("stress") else "explain"
    # the options the cache was made with (other tests rerun the shared run with --layer layer3)
    extra = ["--layer", good["key"]["settings"]["cam_layer"]] if command == "explain" else []
    code, out, err = _run(capsys, cli(command, shared_cifar_dir, analysed_copy, *extra))
    assert code == 0, err
    assert f"{cache}: not a valid cache (" in out and "; recomputing" in out
    redone = json.loads(path.read_text())
    assert redone["key"] == good["key"]
    assert _read(path, good["key"]).to_dict() == redone["results"]


# --- a full disk ---------------------------------------------------------------------

def _disk_full_after(nbytes: int):
    """A torch.save that writes `nbytes` and then runs out of space."""
    def save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"\x00" * nbytes)
        raise OSError(errno.ENOSPC, "No space left on device")
    return save


def test_full_disk_keeps_the_old_checkpoint_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / "baseline" / "checkpoint.pt"
    path.parent.mkdir()
    save_checkpoint(path, {"epoch": 1, "model": {}, "config": {}})
    before = path.read_bytes()
    monkeypatch.setattr(torch, "save", _disk_full_after(3 << 20))
    with pytest.raises(CnnstressError) as exc:
        save_checkpoint(path, {"epoch": 2, "model": {}, "config": {}})
    message = str(exc.value)
    assert "\n" not in message
    for needle in ("no space left on device", str(path.parent), "needs at least 3 MB", "is kept", "--out-dir"):
        assert needle in message, message
    assert path.read_bytes() == before and not _temp_files(tmp_path)


def test_torch_stream_writer_failure_on_a_full_disk(tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError without an errno."""
    def save(obj, f, *a, **k):
        Path(f).write_bytes(b"\x00" * 1000)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    monkeypatch.setattr(torch, "save", save)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=1000))
    with pytest.raises(CnnstressError, match="no space left on device"):
        save_checkpoint(tmp_path / "checkpoint.pt", {})
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(free=1 << 40))
    with pytest.raises(RuntimeError, match="unexpected pos"):   # plenty of room: some other failure, as it was
        save_checkpoint(tmp_path / "checkpoint.pt", {})
    assert not _temp_files(tmp_path)


def test_full_disk_in_train_is_a_one_line_error(shared_cifar_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "save", _disk_full_after(1000))
    code, _, err = _run(capsys, cli("train", shared_cifar_dir, tmp_path / "out"))
    assert code == 2
    _one_line(err, "error: no space left on device writing checkpoint.pt", str(tmp_path / "out" / "baseline"))
    assert not _temp_files(tmp_path / "out")


def test_other_json_writes_on_a_full_disk(tmp_path, monkeypatch):
    def write(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(CnnstressError, match=r"no space left on device writing metrics.json .*is kept"):
        atomic_write(tmp_path / "metrics.json", write)
    assert (tmp_path / "metrics.json").read_text() == "{}" and not _temp_files(tmp_path)


# --- interruptions ---------------------------------------------------------------------

def test_stale_temp_files_are_removed_by_the_next_run(trained, shared_cifar_dir, capsys):
    ours = [trained / "baseline" / ".checkpoint.pt.k2x_9ab0.tmp", trained / ".metrics.json.a1b2c3d4.tmp"]
    others = [trained / ".notes.tmp", trained / "keep.a1b2c3d4.tmp", trained / "baseline" / ".x.pt.toolong123.tmp",
              trained / ".editor.swp.a1b2c3d4.tmp", trained / "elsewhere" / ".metrics.json.a1b2c3d4.tmp"]
    (trained / "elsewhere").mkdir()
    for p in ours + others:
        p.write_bytes(b"left by kill -9")
    code, out, _ = _run(capsys, cli("train", shared_cifar_dir, trained))
    assert code == 0
    assert not any(p.exists() for p in ours) and all(p.exists() for p in others)
    assert "removed 1 temporary file left by an interrupted write" in out
    for p in others:
        p.unlink()
    (trained / "elsewhere").rmdir()


def test_stale_temp_cleanup_leaves_a_linked_model_folder_alone(tmp_path):
    """A baseline/ linked in from another output folder is not covered by this
    folder's lock (a run there may be writing): its temporary files stay."""
    from cnnstress.lock import output_lock

    other = tmp_path / "other_run" / "baseline"
    other.mkdir(parents=True)
    theirs = other / ".checkpoint.pt.a1b2c3d4.tmp"
    theirs.write_bytes(b"being written by the other run")
    out = tmp_path / "out"
    (out / "improved").mkdir(parents=True)
    (out / "baseline").symlink_to(other, target_is_directory=True)
    ours = [out / ".metrics.json.a1b2c3d4.tmp", out / "improved" / ".checkpoint.pt.k2x_9ab0.tmp"]
    for p in ours:
        p.write_bytes(b"left by kill -9")
    said = []
    with output_lock(out, log=said.append):
        pass
    assert theirs.read_bytes() == b"being written by the other run"
    assert not any(p.exists() for p in ours)
    assert len([line for line in said if line.startswith("removed 1 temporary file")]) == 2


SIGTERM_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    real_save = torch.save
    def save(obj, f, *a, **k):  # SIGTERM arrives in the middle of the checkpoint write
        real_save(obj, f, *a, **k)
        open(os.path.join(os.path.dirname(f), "tmp-was-there"), "w").write(str(f))
        os.kill(os.getpid(), signal.SIGTERM)
    torch.save = save
    from cnnstress.__main__ import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigterm_during_a_checkpoint_write_cleans_up(shared_cifar_dir, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", SIGTERM_SCRIPT, *cli("train", shared_cifar_dir, out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr[-2000:])
    assert Path((out / "baseline" / "tmp-was-there").read_text()).name.startswith(".checkpoint.pt.")
    assert not _temp_files(out)
    message = _one_line(proc.stderr, "interrupted before any checkpoint was written")
    assert "--resume" not in message and _advised(message) == cli("train", shared_cifar_dir, out)


def _interrupt_improved(monkeypatch):
    """Train the baseline as usual, then 'press Ctrl-C' when the improved model starts."""
    from cnnstress.stages import training
    real = training.train_model

    def train_model(config, *a, **k):
        if config.augment == "enhanced":
            raise KeyboardInterrupt
        return real(config, *a, **k)
    monkeypatch.setattr(training, "train_model", train_model)


def test_ctrl_c_in_run_advises_a_command_that_works(shared_cifar_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = cli("run", shared_cifar_dir, out, "--no-stress", "--no-explain")
    with monkeypatch.context() as mp:
        mp.setattr("cnnstress.data.load_splits", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        code, _, err = _run(capsys, argv)
    assert code == 130
    message = _one_line(err, "interrupted before any checkpoint was written")
    assert "--resume" not in message and _advised(message) == argv
    with monkeypatch.context() as mp:
        _interrupt_improved(mp)
        code, _, err = _run(capsys, argv + ["--force"])
    assert code == 130
    message = _one_line(err, "checkpoints are kept", str(out / "baseline" / "checkpoint.pt"))
    advised = _advised(message)
    assert "--resume" not in advised and "--force" not in advised   # the baseline is new: keep it
    build_parser().parse_args(advised)
    # ...and following the advice works: the baseline is reused, the improved model trained
    code, stdout, err = _run(capsys, advised)
    assert code == 0, err
    assert "reusing finished checkpoint" in stdout and "[enhanced] epoch" in stdout
    assert not (out / LOCK_FILE).read_text()   # released


def test_ctrl_c_in_train_advises_resume_only_with_a_checkpoint(shared_cifar_dir, tmp_path, monkeypatch, capsys):
    import cnnstress.train as train_mod
    real_epoch = train_mod.train_epoch

    def epoch_then_ctrl_c(*a, epoch, **k):
        if epoch == 1:
            raise KeyboardInterrupt
        return real_epoch(*a, epoch=epoch, **k)
    argv = cli("train", shared_cifar_dir, tmp_path / "out", "--epochs", "2")
    with monkeypatch.context() as mp:
        mp.setattr(train_mod, "train_epoch", epoch_then_ctrl_c)
        code, _, err = _run(capsys, argv)
    assert code == 130
    message = _one_line(err, "checkpoints are kept")
    assert _advised(message) == argv + ["--resume"]
    code, stdout, _ = _run(capsys, _advised(message))
    assert code == 0 and "resuming" in stdout and "epoch  2/2" in stdout


@pytest.mark.parametrize("tamper, needle", [
    (lambda ck: ck.update(arch="vit_tiny"), "architecture 'vit_tiny'"),
    (lambda ck: ck.update(epoch=0), "unfinished"),
])
def test_stress_and_explain_advise_a_command_that_retrains(analysed_copy, shared_cifar_dir, capsys, tamper, needle):
    path = analysed_copy / "improved" / "checkpoint.pt"
    ckpt = torch.load(path, weights_only=False)
    tamper(ckpt)
    torch.save(ckpt, path)
    for command in ("stress", "explain"):
        code, _, err = _run(capsys, cli(command, shared_cifar_dir, analysed_copy, "--force"))
        assert code == 2
        message = _one_line(err, needle, "`python -m cnnstress run")
        assert "retrain with --force" not in message
        advised = build_parser().parse_args(_advised(message))
        assert advised.command == "run"


def test_config_mismatch_advice_for_stress(analysed_copy, shared_cifar_dir, capsys):
    code, _, err = _run(capsys, cli("stress", shared_cifar_dir, analysed_copy, "--epochs", "2"))
    assert code == 2
    message = _one_line(err, "different config", "epochs: checkpoint 1 vs now 2")
    assert "retrain with --force" not in message
    assert "`python -m cnnstress run --force` and the same options" in message


# --- one writer per output folder ------------------------------------------------------------

HOLDER_SCRIPT = textwrap.dedent("""
    import sys, time
    from cnnstress.lock import output_lock
    with output_lock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(120)
""")


def test_second_writer_is_refused_and_a_killed_holder_is_taken_over(trained, shared_cifar_dir, capsys):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(trained)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        ckpt = trained / "baseline" / "checkpoint.pt"
        before = ckpt.stat().st_mtime_ns
        code, _, err = _run(capsys, cli("train", shared_cifar_dir, trained, "--force"))
        assert code == 2
        _one_line(err, f"output folder {trained} is in use by pid {holder.pid}", "--out-dir")
        assert ckpt.stat().st_mtime_ns == before          # nothing was touched
        with pytest.raises(CnnstressError, match=f"in use by pid {holder.pid}"):   # nor can a notebook write
            from cnnstress.config import get_config
            from cnnstress.study import Study
            Study(config=get_config("smoke"), out_dir=trained, log=None).curves(show=False)
    finally:
        holder.kill()                                     # kill -9: no chance to release the lock itself
        holder.wait()
    assert json.loads((trained / LOCK_FILE).read_text())["pid"] == holder.pid   # the stale lock is left
    code, out, err = _run(capsys, cli("train", shared_cifar_dir, trained))
    assert code == 0, err
    assert f"from pid {holder.pid}" in out and "no longer running" in out


def test_lock_is_reentrant_and_released(tmp_path):
    from cnnstress.lock import output_lock
    with output_lock(tmp_path, log=None):
        with output_lock(tmp_path, log=None):           # nested stages of one process
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        assert (tmp_path / LOCK_FILE).read_text()         # still held by the outer block
    assert (tmp_path / LOCK_FILE).read_text() == ""
    probe = subprocess.run([sys.executable, "-c", HOLDER_SCRIPT.replace("time.sleep(120)", "pass"), str(tmp_path)],
                           capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert probe.returncode == 0 and "held" in probe.stdout


# --- what a failed or damaged run leaves ------------------------------------------------------

def test_garbage_history_json_is_repaired_from_the_checkpoint(trained, shared_cifar_dir, capsys):
    history = trained / "baseline" / "history.json"
    history.write_text("{ garbage")
    code, out, _ = _run(capsys, cli("train", shared_cifar_dir, trained))
    assert code == 0
    ckpt = read_checkpoint(trained / "baseline" / "checkpoint.pt")
    saved = json.loads(history.read_text())
    assert saved["history"] == json.loads(json.dumps(ckpt["history"]))
    assert saved["config"]["profile"] == "smoke"
    assert "rewrote it from the checkpoint" in out
    stamp = history.stat().st_mtime_ns
    code, out, _ = _run(capsys, cli("train", shared_cifar_dir, trained))
    assert code == 0 and "rewrote" not in out and history.stat().st_mtime_ns == stamp   # intact: left alone


def test_failed_run_leaves_no_one_model_training_curves(shared_cifar_dir, tmp_path, monkeypatch, capsys):
    from cnnstress.stages import training
    real = training.train_model

    def train_model(config, *a, **k):
        if config.augment == "enhanced":
            raise CnnstressError("simulated failure of the improved model")
        return real(config, *a, **k)
    monkeypatch.setattr(training, "train_model", train_model)
    out = tmp_path / "out"
    code, _, err = _run(capsys, cli("run", shared_cifar_dir, out, "--no-stress", "--no-explain"))
    assert code == 2 and "simulated failure" in err
    assert (out / "baseline" / "checkpoint.pt").is_file()
    assert not (out / "training_curves.png").exists()


# --- round 2 (issue 20): a second hostile tour ---------------------------------------------

def _code(capsys, argv):
    """(exit status, stdout, stderr) of main, argparse's own exits included."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def _snapshot(folder: Path) -> dict:
    """Every path under `folder` with its content and mtime (files) or None (folders, links)."""
    return {p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() and not p.is_symlink()
            else None for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("plant", ["symlink", "hard link", "someone's file"])
def test_a_lock_file_that_is_not_ours_is_refused_and_left_intact(shared_cifar_dir, tmp_path, capsys, plant):
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n")
    out = tmp_path / "o"
    out.mkdir()
    if plant == "symlink":
        (out / LOCK_FILE).symlink_to("../notes.txt")
    elif plant == "hard link":
        os.link(notes, out / LOCK_FILE)
    else:
        (out / LOCK_FILE).write_text("precious\n")
    before = _snapshot(tmp_path)
    code, _, err = _code(capsys, cli("run", shared_cifar_dir, out))
    assert code == 2
    _one_line(err, str(out / LOCK_FILE), "not a cnnstress lock", "remove it")
    assert notes.read_text() == "precious\n" and _snapshot(tmp_path) == before


def test_a_batch_declaring_gigabytes_is_refused_before_it_is_read(tmp_path):
    import struct

    from cnnstress.data import read_batch
    from cnnstress.errors import DataError
    path = tmp_path / "data_batch_1"
    header = b"\x80\x04\x8e" + struct.pack("<Q", 3 << 30)   # BINBYTES8 of 3 GB
    path.write_bytes(header)
    os.truncate(path, 3 << 30)                             # sparse: the size is there, the bytes are not read
    with pytest.raises(DataError, match=r"data_batch_1: 3072 MB, far more than a CIFAR-10 batch .*refused unread"):
        read_batch(path)
    path.write_bytes(header + b"\x00" * 100)                # declared, but the file ends long before
    with pytest.raises(DataError, match="data_batch_1: cannot be unpickled .*truncated"):
        read_batch(path)


def test_a_batch_that_would_expand_in_memory_is_refused(tmp_path):
    """Image data as a list of repeated references (a few bytes each in the file)
    would become len x 3072 bytes in np.asarray; bytes(n) would allocate n."""
    import pickle

    from cnnstress.data import read_batch
    from cnnstress.errors import DataError
    from conftest import write_batch

    class Allocates:
        def __reduce__(self):
            return bytes, (10 ** 12,)
    path = tmp_path / "data_batch_1"
    write_batch(path, [b"\x00" * 3072] * 1000, [0] * 1000)
    with pytest.raises(DataError, match="image data is a list, expected a uint8 numpy array"):
        read_batch(path)
    path.write_bytes(pickle.dumps({b"data": Allocates(), b"labels": [0]}, protocol=2))
    assert b"c__builtin__\nbytes" in path.read_bytes()
    with pytest.raises(DataError, match="cannot be unpickled"):
        read_batch(path)


def test_refused_runs_leave_config_json_and_the_folder_alone(shared_cifar_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"epochs": 7}\n')   # what an earlier run left
    before = _snapshot(out)
    with monkeypatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: False)
        code, _, err = _code(capsys, cli("run", shared_cifar_dir, out, "--device", "cuda"))
    assert code == 2
    _one_line(err, "no CUDA GPU")
    assert _snapshot(out) == before
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER_SCRIPT, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(out)
        code, _, err = _code(capsys, cli("run", shared_cifar_dir, out, "--threshold", "0.5"))
        assert code == 2
        _one_line(err, "is in use by pid")
        assert _snapshot(out) == before
    finally:
        holder.kill()
        holder.wait()


def test_an_empty_test_set_is_refused_before_any_cache_is_written(tmp_path, capsys):
    from cnnstress.data import BATCHES_DIR, TEST_FILE
    from conftest import write_batch, write_cifar
    data = write_cifar(tmp_path / "data")
    write_batch(data / BATCHES_DIR / TEST_FILE, np.zeros((0, 3072), np.uint8), [])   # protocol 2: bytes() inside
    out = tmp_path / "out"
    code, _, err = _code(capsys, cli("run", data, out))
    assert code == 2
    _one_line(err, "test_batch: holds no images")
    assert not list(out.glob("predictions_*")) and not (out / "config.json").exists()


def test_a_protocol_2_batch_with_empty_bytes_is_read(tmp_path):
    from cnnstress.data import read_batch
    from conftest import write_batch
    path = tmp_path / "data_batch_1"
    write_batch(path, np.zeros((2, 3072), np.uint8), [0, 1], note=b"")
    assert b"c__builtin__\nbytes" in path.read_bytes()
    images, labels = read_batch(path)
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1]


@pytest.mark.parametrize("label", [float("nan"), None, 3.7, -0.5, True])
def test_labels_that_are_not_class_numbers_are_refused(tmp_path, label):
    from cnnstress.data import read_batch
    from cnnstress.errors import DataError
    from conftest import write_batch
    path = tmp_path / "data_batch_1"
    write_batch(path, np.zeros((4, 3072), np.uint8), [0, 1, label, 2])
    with pytest.raises(DataError, match=rf"data_batch_1: label {label!r} at position 2 is not a class number"):
        read_batch(path)


def _predictions(folder: Path, name: str) -> dict:
    with np.load(folder / f"predictions_{name}.npz") as npz:
        return dict(npz)


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


@pytest.mark.parametrize("damage, needle", [
    ("class 99", "preds"), ("NaN logit", "logits"), ("probabilities of 2", "probs"), ("other labels", "labels")])
def test_a_predictions_cache_with_impossible_values_is_a_miss(analysed_run, tmp_path, damage, needle):
    from cnnstress.stages.failures import read_predictions
    arrays = _predictions(analysed_run, "improved")
    stamp, indices, labels = str(arrays["checkpoint_stamp"]), arrays["dataset_indices"], arrays["labels"].copy()
    path = tmp_path / "predictions_improved.npz"
    _save_npz(path, arrays)
    assert read_predictions(path, stamp, indices, None, labels) is not None
    if damage == "class 99":
        arrays["preds"][0] = 99
    elif damage == "NaN logit":
        arrays["logits"][0, 0] = np.nan
    elif damage == "probabilities of 2":
        arrays["probs"][0] *= 2
    else:
        arrays["labels"][0] = (arrays["labels"][0] + 1) % 10
    _save_npz(path, arrays)
    logged = []
    assert read_predictions(path, stamp, indices, logged.append, labels) is None
    assert logged == [f"predictions: {path} holds a malformed {needle} array; recomputing"]


@pytest.mark.slow
def test_a_class_99_prediction_is_recomputed_by_the_cli(analysed_copy, shared_cifar_dir, capsys):
    path = analysed_copy / "predictions_improved.npz"
    arrays = _predictions(analysed_copy, "improved")
    arrays["preds"][0] = 99
    _save_npz(path, arrays)
    code, out, err = _code(capsys, cli("stress", shared_cifar_dir, analysed_copy))
    assert code == 0, err
    assert "holds a malformed preds array; recomputing" in out
    assert _predictions(analysed_copy, "improved")["preds"].max() < 10


def _edit(results: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        results = results[p]
    results[last] = value


@pytest.mark.parametrize("cache, field, value, needle", [
    ("stress_baseline.json", "corruptions.accuracy_by_family", {}, "accuracy_by_family has keys []"),
    ("stress_improved.json", "corruptions.clean_accuracy", 7.5, "clean_accuracy is 7.5, expected 0.0..1.0"),
    ("explanations.json", "label_suspects.baseline.suspect_positions", [10 ** 9], "suspect_positions[0] is 1000000000"),
    ("explanations.json", "label_agreement.failures.improved", [-1], "improved[0] is -1"),
])
def test_a_json_cache_with_impossible_values_is_a_miss(analysed_run, tmp_path, cache, field, value, needle):
    good = json.loads((analysed_run / cache).read_text())
    path = tmp_path / cache
    path.write_text(json.dumps(good))
    assert _read(path, good["key"]).to_dict() == good["results"]
    _edit(good["results"], field, value)
    path.write_text(json.dumps(good))
    logged = []
    assert _read(path, good["key"], logged.append) is None
    assert len(logged) == 1 and needle in logged[0] and logged[0].endswith("; recomputing"), logged


def test_write_errors_other_than_a_full_disk_are_one_line(tmp_path, monkeypatch):
    import tempfile

    from cnnstress.config import Config
    (tmp_path / "config.json").mkdir()
    with pytest.raises(CnnstressError, match=r"cannot write config.json in .* is a folder: move it out of the way"):
        Config().save(tmp_path / "config.json")
    assert (tmp_path / "config.json").is_dir() and not _temp_files(tmp_path)

    def read_only(*a, **k):   # the folder made read-only half-way (root would not notice a chmod)
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    with pytest.raises(CnnstressError, match=r"cannot write metrics.json in .*\(Permission denied\); check the folder"):
        atomic_write(tmp_path / "metrics.json", lambda tmp: tmp.write_text("{}"))


def test_a_full_disk_while_taking_the_lock_is_one_line(shared_cifar_dir, tmp_path, monkeypatch, capsys):
    def pwrite(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", pwrite)
    code, _, err = _code(capsys, cli("train", shared_cifar_dir, tmp_path / "out"))
    assert code == 2
    _one_line(err, "cannot write the lock file", "No space left on device")


@pytest.fixture(scope="module")
def published_run(analysed_run, tmp_path_factory) -> Path:
    from cnnstress.weights import export_weights
    dest = tmp_path_factory.mktemp("published") / "smoke"
    export_weights(analysed_run, dest)
    return dest


def _republish(published_run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the published folder with weights.json edited and SHA256SUMS regenerated (as an attacker would)."""
    import hashlib

    from cnnstress.weights import METADATA_FILE, SUMS_FILE
    dest = tmp_path / "pub"
    shutil.copytree(published_run, dest)
    meta = json.loads((dest / METADATA_FILE).read_text())
    edit(meta, dest)
    (dest / METADATA_FILE).write_text(json.dumps(meta))
    (dest / SUMS_FILE).write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                          for p in sorted(dest.iterdir()) if p.name != SUMS_FILE))
    return dest


def _nan_shard(meta: dict, dest: Path) -> None:
    shard = dest / meta["models"]["improved"]["shards"][0]
    part = torch.load(shard, weights_only=True)
    key = next(k for k, t in part.items() if t.is_floating_point())
    part[key] = torch.full_like(part[key], float("nan"))
    torch.save(part, shard)


def _int_shard(meta: dict, dest: Path) -> None:
    shard = dest / meta["models"]["baseline"]["shards"][0]
    part = torch.load(shard, weights_only=True)
    key = next(k for k, t in part.items() if t.is_floating_point())
    part[key] = torch.full(part[key].shape, 10 ** 6, dtype=torch.int64)   # load_state_dict would cast it
    torch.save(part, shard)


@pytest.mark.parametrize("edit, needle", [
    (lambda m, d: m["models"]["baseline"].update(epochs="one"), "baseline model's epochs is 'one'"),
    (lambda m, d: m["models"]["baseline"].pop("shards"), "baseline model's shards are not a list of file names"),
    (lambda m, d: m["models"]["improved"].update(history=[{"epoch": 1}]), "history[0].train_loss is None"),
    (lambda m, d: m["models"]["improved"].update(reference={"test_accuracy": "high", "n": 9}),
     "reference test_accuracy is 'high'"),
    (_nan_shard, "holds NaN or infinite values"),
    (_int_shard, "has dtype int64"),
])
def test_malformed_published_weights_are_one_line_errors(published_run, tmp_path, shared_cifar_dir, capsys,
                                                         edit, needle):
    dest = _republish(published_run, tmp_path, edit)
    code, out, err = _code(capsys, cli("run", shared_cifar_dir, tmp_path / "out", "--weights", str(dest)))
    assert code == 2
    _one_line(err, needle, "export")
    assert not list((tmp_path / "out").glob("*.npz")) and "%" not in out   # refused before any accuracy


@pytest.mark.parametrize("field, value, needle", [
    ("epoch", "one", "epoch is 'one'"),
    ("model", [1, 2], "model is not a dict of tensors"),
    ("history", "long", "history is a str, expected a list"),
    ("config", {"epochs": "x"}, "config is invalid"),
    ("rng", {"torch": 1}, "rng lacks"),
])
def test_malformed_checkpoint_fields_are_one_line_errors(trained, shared_cifar_dir, tmp_path, capsys,
                                                         field, value, needle):
    ckpt = torch.load(trained / "baseline" / "checkpoint.pt", weights_only=True)
    ckpt[field] = value
    path = tmp_path / "out" / "baseline" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    before = path.read_bytes()
    code, _, err = _code(capsys, cli("train", shared_cifar_dir, tmp_path / "out"))
    assert code == 2
    _one_line(err, "is malformed", needle, "--force")
    assert path.read_bytes() == before


@pytest.mark.parametrize("flags, needle", [
    (["--seed", str(2 ** 64)], "seed must be in 0..2**63-1"),
    (["--weight-decay", "nan"], "weight_decay must be a finite number"),
    (["--lr", "inf"], "lr must be a finite number"),
    (["--calibration-bins", str(10 ** 9)], "calibration_bins must be in 1..1000"),
])
def test_config_values_out_of_range_are_refused_up_front(shared_cifar_dir, tmp_path, capsys, flags, needle):
    out = tmp_path / "out"
    code, _, err = _code(capsys, cli("run", shared_cifar_dir, out, *flags))
    assert code == 2
    _one_line(err, needle)
    config = tmp_path / "config.json"
    name, value = flags[0].removeprefix("--").replace("-", "_"), flags[1]
    config.write_text(f'{{"{name}": {dict(nan="NaN", inf="Infinity").get(value, value)}}}')
    code, _, err = _code(capsys, ["run", "--config", str(config), "--device", "cpu", "--no-progress",
                                  "--data-dir", str(shared_cifar_dir), "--out-dir", str(out)])
    assert code == 2
    _one_line(err, str(config), needle)
    assert not out.exists()


def test_notebook_values_of_the_wrong_type_are_refused():
    from cnnstress.config import get_config
    from cnnstress.errors import ConfigError
    for bad, needle in ((dict(epochs=2.5), "epochs=2.5 (expected int)"), (dict(batch_size=True), "batch_size=True"),
                        (dict(seed="42"), "seed='42'")):
        with pytest.raises(ConfigError, match=re.escape(needle)):
            get_config("smoke", **bad)
    assert get_config("smoke", epochs=np.int64(2)).epochs == 2 and type(get_config("smoke", lr=np.float32(0.5)).lr) is float


def test_outputs_inside_the_published_folder_are_refused(shared_cifar_dir, tmp_path, capsys):
    weights = tmp_path / "W"
    weights.mkdir()
    (weights / "SHA256SUMS").write_text("")
    before = _snapshot(weights)
    code, _, err = _code(capsys, cli("run", shared_cifar_dir, weights / "analysis", "--weights", str(weights)))
    assert code == 2
    _one_line(err, "is inside the published weights folder", "--out-dir")
    assert _snapshot(weights) == before


def test_an_empty_output_path_is_refused(shared_cifar_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--profile", "smoke", "--device", "cpu", "--no-progress", "--data-dir", str(shared_cifar_dir)]
    code, _, err = _code(capsys, argv + ["--out-dir", ""])
    assert code == 2
    _one_line(err, "--out-dir is an empty path")
    monkeypatch.setenv("CNNSTRESS_OUT_DIR", "")
    code, _, err = _code(capsys, argv)
    assert code == 2
    _one_line(err, "$CNNSTRESS_OUT_DIR is set but empty")
    assert not list(tmp_path.iterdir())


# --- round 2, own tour (issue 20, "what else does a user or an attacker control") ----------

def test_data_entries_that_are_not_files_are_refused_without_a_download(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tvu

    from cnnstress.data import BATCHES_DIR, TEST_FILE
    from conftest import write_cifar

    def no_download(*a, **k):
        raise AssertionError("downloaded over a file that is there")
    monkeypatch.setattr(tvu, "download_and_extract_archive", no_download)
    data = write_cifar(tmp_path / "data")
    test_batch = data / BATCHES_DIR / TEST_FILE
    for plant, needle in ((lambda: os.mkfifo(test_batch), "is not a regular file"),
                          (lambda: test_batch.symlink_to("/dev/zero"), "is not a regular file"),
                          (lambda: test_batch.mkdir(), "is not a regular file")):
        if test_batch.is_dir() and not test_batch.is_symlink():
            test_batch.rmdir()
        elif os.path.lexists(test_batch):
            test_batch.unlink()
        plant()
        code, _, err = _code(capsys, cli("train", data, tmp_path / "out"))
        assert code == 2
        _one_line(err, str(test_batch), needle)
    afile = tmp_path / "afile"
    afile.write_text("keep")
    code, _, err = _code(capsys, cli("train", afile, tmp_path / "out"))
    assert code == 2
    _one_line(err, f"{afile} is not a folder")


def test_a_label_nested_too_deep_to_print_is_one_line(tmp_path):
    import pickle

    from cnnstress.data import read_batch
    from cnnstress.errors import DataError
    blob = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"labels": ["PLACEHOLDER"]}, protocol=2)
    depth = 100_000   # "]" pushes a list, "a" appends it to the one below: a list nested 100,000 deep
    blob = blob.replace(b"X\x0b\x00\x00\x00PLACEHOLDER", b"]" * depth + b"a" * (depth - 1))
    path = tmp_path / "test_batch"
    path.write_bytes(blob)
    with pytest.raises(DataError, match="test_batch: label of type list at position 0 is not a class number"):
        read_batch(path)


@pytest.mark.parametrize("content, needle", [
    ("/dev/zero", "is not a regular file"),
    ("fifo", "is not a regular file"),
    ("2 MB", "is 2 MB, not a config"),
    ("[" * 100_000 + "]" * 100_000, "nests too deeply"),
])
def test_a_config_file_that_cannot_be_a_config_is_not_read(tmp_path, shared_cifar_dir, capsys, content, needle):
    path = tmp_path / "config.json"
    if content == "/dev/zero":
        path.symlink_to("/dev/zero")
    elif content == "fifo":
        os.mkfifo(path)   # reading it would wait for a writer forever
    elif content == "2 MB":
        path.write_text("{}")
        os.truncate(path, 2 << 20)
    else:
        path.write_text(content)
    code, _, err = _code(capsys, ["run", "--config", str(path), "--device", "cpu", "--no-progress",
                                  "--data-dir", str(shared_cifar_dir), "--out-dir", str(tmp_path / "out")])
    assert code == 2
    _one_line(err, str(path), needle)


def test_config_values_no_command_line_could_give_are_refused():
    from cnnstress.config import get_config
    from cnnstress.errors import ConfigError
    with pytest.raises(ConfigError, match="adv_eps must be whole grey levels in 0..255, at least one"):
        get_config("smoke", adv_eps=())
    with pytest.raises(ConfigError, match="corruption_workers must be at most 256"):
        get_config("smoke", corruption_workers=100_000)


def test_json_nested_too_deep_is_a_cache_miss_and_not_a_lock_record(tmp_path):
    from cnnstress.io import read_json_cache
    from cnnstress.lock import output_lock
    path = tmp_path / "stress_baseline.json"
    path.write_text("[" * 100_000)
    logged = []
    assert read_json_cache(path, {}, logged.append) is None
    assert logged == ["stress_baseline.json: not a valid cache (unreadable (RecursionError)); recomputing"]
    (tmp_path / LOCK_FILE).write_text("[" * 4000)
    with pytest.raises(CnnstressError, match="is not a cnnstress lock record"):
        with output_lock(tmp_path, log=None):
            pass


def test_ragged_sanity_maps_are_a_cache_miss(analysed_run, tmp_path):
    good = json.loads((analysed_run / "explanations.json").read_text())
    good["results"]["sanity_maps"]["maps"][0] = good["results"]["sanity_maps"]["maps"][0][:1]
    path = tmp_path / "explanations.json"
    path.write_text(json.dumps(good))
    logged = []
    assert _read(path, good["key"], logged.append) is None
    assert "sanity_maps.maps is not a regular array of numbers" in logged[0]


@pytest.mark.parametrize("tamper, needle", [
    (lambda ck: ck["model"]["linear.weight"].fill_(float("nan")), "linear.weight holds NaN or infinite values"),
    (lambda ck: ck["model"].update({"conv1.weight": ck["model"]["conv1.weight"].long()}),
     "conv1.weight has dtype int64"),
    (lambda ck: ck["rng"].update(torch=torch.zeros(3)), "rng lacks"),
    (lambda ck: ck["optimizer"].update(param_groups=ck["optimizer"]["param_groups"] * 2),
     "cannot be resumed (ValueError"),
    (lambda ck: ck["optimizer"]["state"][0].update(exp_avg=torch.zeros(1)), "cannot be resumed (ValueError"),
])
def test_checkpoint_states_that_cannot_be_used_are_one_line(trained, shared_cifar_dir, tmp_path, capsys,
                                                            tamper, needle):
    ckpt = torch.load(trained / "baseline" / "checkpoint.pt", weights_only=True)
    tamper(ckpt)
    ckpt.update(epoch=0, finished=False)   # resumed by train --resume, reusing nothing
    path = tmp_path / "out" / "baseline" / "checkpoint.pt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    before = path.read_bytes()
    code, out, err = _code(capsys, cli("train", shared_cifar_dir, tmp_path / "out", "--resume"))
    assert code == 2
    _one_line(err, str(path), needle, "--force")
    assert path.read_bytes() == before and "[baseline] epoch" not in out


@pytest.mark.parametrize("command", ["train", "run", "stress"])
def test_bad_data_leaves_the_output_folder_as_it_was(tmp_path, capsys, command):
    """Data is read and checked before the output folder is made or locked: a
    refused run leaves no empty folder, and an existing one untouched (mtimes too)."""
    import pickle

    from cnnstress.data import BATCHES_DIR, TEST_FILE
    from conftest import write_cifar
    data = write_cifar(tmp_path / "data")
    with open(data / BATCHES_DIR / TEST_FILE, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    fresh = tmp_path / "fresh" / "out"
    code, _, err = _code(capsys, cli(command, data, fresh))
    assert code == 2
    _one_line(err, "test_batch: label 10 out of range")
    assert not (tmp_path / "fresh").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "notes.txt").write_text("mine\n")
    before = _snapshot(tmp_path), existing.stat().st_mtime_ns
    code, _, err = _code(capsys, cli(command, data, existing))
    assert code == 2
    _one_line(err, "test_batch: label 10 out of range")
    assert (_snapshot(tmp_path), existing.stat().st_mtime_ns) == before
