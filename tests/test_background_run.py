"""scripts/background_run.py: the full study in the background across sessions."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "background_run.py"


@pytest.fixture(scope="module")
def bg():
    spec = importlib.util.spec_from_file_location("background_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def fake_run(tmp_path):
    """A stand-in for the training process (its command line names cnnstress), in its own group."""
    proc = subprocess.Popen([sys.executable, "-c", "import time  # cnnstress\ntime.sleep(120)"],
                            start_new_session=True)
    (tmp_path / "run.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + 10   # until it has exec'd (before, its command line is ours)
    while b"cnnstress" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.01)
    yield tmp_path, proc
    proc.kill()
    proc.wait()


def _command_lines() -> list[str]:
    lines = []
    for entry in Path("/proc").iterdir():
        try:
            lines.append(entry.joinpath("cmdline").read_bytes().replace(b"\0", b" ").decode().strip())
        except (OSError, NotADirectoryError):
            pass
    return lines


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_pause_stops_the_run_during_the_command_and_continues_it_after(bg, fake_run, capsys):
    home, proc = fake_run
    probe = home / "seen"
    code = f"import pathlib; pathlib.Path({str(probe)!r}).write_text(open('/proc/{proc.pid}/stat').read())"
    assert bg.main(["--home", str(home), "pause", "--max-minutes", "7.77", "--", sys.executable, "-c", code]) == 0
    assert probe.read_text().rsplit(")", 1)[1].split()[0] == "T"      # stopped while the command ran
    assert _state(proc.pid) in "RS"                                     # continued after
    logged = (home / "pauses.log").read_text().splitlines()
    assert len(logged) == 1 and sys.executable in logged[0]
    # no watchdog is left behind (466 s = 7.77 minutes: no other pause's)
    assert not [p for p in _command_lines() if p.endswith(f"cnnstress-watchdog {proc.pid} 466")]


def test_pause_passes_the_commands_exit_status_and_continues_on_failure(bg, fake_run):
    home, proc = fake_run
    assert bg.main(["--home", str(home), "pause", "--", sys.executable, "-c", "raise SystemExit(3)"]) == 3
    assert _state(proc.pid) in "RS"


def test_the_watchdog_continues_a_run_left_stopped(bg, fake_run):
    home, proc = fake_run
    # The pausing script is killed outright (no finally): only the watchdog can continue the run.
    pauser = subprocess.Popen([sys.executable, str(SCRIPT), "--home", str(home), "pause", "--max-minutes", "0.02",
                               "--", "sleep", "30"])
    deadline = time.monotonic() + 10
    while _state(proc.pid) != "T" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _state(proc.pid) == "T"
    pauser.kill()
    pauser.wait()
    deadline = time.monotonic() + 10
    while _state(proc.pid) == "T" and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _state(proc.pid) in "RS"


def test_a_stale_pid_file_is_not_a_running_run(bg, tmp_path):
    (tmp_path / "run.pid").write_text("999999999\n")
    assert bg.running_pid(tmp_path) is None
    other = subprocess.Popen(["sleep", "30"])   # alive, but not a cnnstress run (a reused pid)
    try:
        (tmp_path / "run.pid").write_text(f"{other.pid}\n")
        assert bg.running_pid(tmp_path) is None
    finally:
        other.kill()
        other.wait()


def test_status_reports_epochs_seconds_and_accuracy(bg, tmp_path, capsys):
    run = tmp_path / "run" / "baseline"
    run.mkdir(parents=True)
    history = [{"epoch": i + 1, "seconds": s, "val_acc": a} for i, (s, a) in enumerate([(440.0, 0.70), (450.0, 0.78),
                                                                                        (900.0, 0.75)])]
    (run / "history.json").write_text(json.dumps({"config": {"epochs": 30}, "history": history}))
    assert bg.main(["--home", str(tmp_path), "status"]) == 0
    out = capsys.readouterr().out
    assert "run: not running" in out
    assert "baseline: 3/30 epochs, median 450 s/epoch (last 900 s), val acc 75.00% (best 78.00% at epoch 2)" in out
    assert "improved: not started" in out
    assert "training left: 57 epochs, about 7.1 h at the median epoch time" in out   # 27 + 30 epochs x 450 s


def test_start_refuses_without_data_and_writes_nothing(bg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bg, "has_bf16", lambda: True)
    assert bg.main(["--home", str(tmp_path), "start", "--until", "10"]) == 2
    assert "no CIFAR-10 in" in capsys.readouterr().err
    assert not (tmp_path / "run.pid").exists()


def test_start_refuses_a_cpu_without_bf16(bg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bg, "has_bf16", lambda: False)
    assert bg.main(["--home", str(tmp_path), "start"]) == 2
    assert "no AVX-512 BF16" in capsys.readouterr().err


def test_start_refuses_a_second_run(bg, fake_run, capsys, monkeypatch):
    home, proc = fake_run
    monkeypatch.setattr(bg, "has_bf16", lambda: True)
    assert bg.main(["--home", str(home), "start"]) == 2
    assert f"already going (pid {proc.pid}" in capsys.readouterr().err


def test_publish_copies_the_outputs_and_exports_verified_weights(bg, analysed_run, tmp_path, capsys):
    import os

    from cnnstress.weights import METADATA_FILE, SUMS_FILE, verify_published
    from conftest import copy_run
    home = tmp_path / "home"
    copy_run(analysed_run, home / "run")     # a copy: the session fixture stays as it is
    (home / "run.log").write_text("console\n")
    dest = tmp_path / "results" / "full"
    assert bg.main(["--home", str(home), "publish", str(dest)]) == 0
    assert "check: python -m cnnstress run --weights" in capsys.readouterr().out
    assert list(dest.glob("baseline-*-of-*.pt")) and list(dest.glob("improved-*-of-*.pt"))
    assert all("-of-" in p.name for p in dest.rglob("*.pt"))   # weight shards only, no checkpoint
    assert not (dest / "baseline" / "checkpoint.pt").exists()
    for name in ("metrics.json", "analysis_report.txt", "report.html", "config.json", "baseline/history.json",
                 "improved/history.json", "training_console.log", SUMS_FILE):
        assert (dest / name).is_file(), name
    assert (dest / "metrics.json").read_bytes() == (analysed_run / "metrics.json").read_bytes()
    # both models' shards and weights.json, every hash matching
    assert set(verify_published(dest)) == {p.name for p in dest.glob("*-of-*.pt")} | {METADATA_FILE}
    # a checkpoint newer than the report: the run is not finished, nothing is published
    ckpt = home / "run" / "baseline" / "checkpoint.pt"
    later = (home / "run" / "analysis_report.txt").stat().st_mtime + 60
    os.utime(ckpt, (later, later))
    assert bg.main(["--home", str(home), "publish", str(tmp_path / "other")]) == 2
    assert "no report made from the final checkpoints" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()
