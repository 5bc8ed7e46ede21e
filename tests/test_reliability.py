"""A hostile user's tour (issue 12, item 9): broken caches are recomputed,
a full disk and a busy output folder are one-line errors, interruptions
(Ctrl-C, SIGTERM, kill -9) leave nothing half-written and advise a command
that works, and a failed run leaves no misleading output."""
from __future__ import annotations

import errno
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cnnstress.__main__ import build_parser, main
from cnnstress.checkpoint import atomic_write, read_checkpoint, save_checkpoint
from cnnstress.errors import CnnstressError
from cnnstress.lock import LOCK_FILE
from cnnstress.schema import Seq, explanations_schema, mismatch, stress_schema
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


@pytest.fixture(scope="module")
def trained(shared_cifar_dir, tmp_path_factory) -> Path:
    """An output folder with a finished smoke baseline (python -m cnnstress train)."""
    out = tmp_path_factory.mktemp("trained")
    assert main(cli("train", shared_cifar_dir, out)) == 0
    return out


@pytest.fixture
def analysed_copy(analysed_run, tmp_path) -> Path:
    """A private copy of a full smoke run (copytree keeps the mtimes, so the
    checkpoint stamps in the caches still match)."""
    out = tmp_path / "run"
    shutil.copytree(analysed_run, out)
    return out


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
    capsys.readouterr()
    study.predictions.clear()                          # as after a kernel restart: read the cache again
    again = failures.predictions(study, "baseline")
    logged = capsys.readouterr().out
    assert logged.count("\n") == 1 and logged.startswith(f"predictions: {path}") and "; recomputing" in logged
    for field in ("logits", "probs", "preds", "labels"):
        assert torch.equal(getattr(again, field), getattr(good, field)), field
    with np.load(path) as npz:                           # the cache was rewritten whole
        assert npz["probs"].shape == (len(splits.test), 10)


def test_schema_check_hand_worked():
    schema = {"a": float, "b": Seq(int, 2), "c": ({"n": 0}, {"n": int, "x": str})}
    assert mismatch({"a": 1, "b": [1, 2], "c": {"n": 0}}, schema) is None
    assert mismatch({"a": 1.5, "b": [1, 2], "c": {"n": 3, "x": "y"}}, schema) is None
    assert mismatch([], schema) == "results is list, expected an object"
    assert mismatch(None, schema) == "results is null, expected an object"
    assert mismatch({"a": True, "b": [1, 2], "c": {"n": 0}}, schema) == "results.a is bool, expected float"
    assert mismatch({"a": 1, "b": [1], "c": {"n": 0}}, schema) == "results.b has 1 items, expected 2"
    assert mismatch({"a": 1, "b": [1, 2.5], "c": {"n": 0}}, schema) == "results.b[1] is float, expected int"
    assert mismatch({"a": 1, "b": [1, 2], "c": {"n": 3}}, schema) == "results.c.x is missing"
    assert mismatch({"b": [1, 2], "c": {"n": 0}}, schema) == "results.a is missing"


def test_real_caches_fit_their_schemas(analysed_run):
    """The schemas describe what the stages really write (else every run would recompute)."""
    from cnnstress.config import get_config
    n_eps = len(get_config("smoke").adv_eps)
    for name in ("baseline", "improved"):
        results = json.loads((analysed_run / f"stress_{name}.json").read_text())["results"]
        assert mismatch(results, stress_schema(n_eps)) is None
    results = json.loads((analysed_run / "explanations.json").read_text())["results"]
    assert mismatch(results, explanations_schema(["baseline", "improved"])) is None


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
    from cnnstress.schema import read_cache
    good = json.loads((analysed_run / cache).read_text())
    schema = stress_schema(2) if cache.startswith("stress") else explanations_schema(["baseline", "improved"])
    path = tmp_path / cache
    path.write_text(json.dumps(good))
    assert read_cache(path, good["key"], schema) == good["results"]
    path.write_text(json.dumps(_damaged(good, content, field)))
    logged = []
    assert read_cache(path, good["key"], schema, logged.append) is None
    assert len(logged) == 1 and logged[0].startswith(f"{cache}: not a valid cache (")
    if content.endswith("missing field"):
        assert f"results.{field} is missing" in logged[0]


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
    assert mismatch(redone["results"], stress_schema(2) if command == "stress"
                    else explanations_schema(["baseline", "improved"])) is None


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
