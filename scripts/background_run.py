#!/usr/bin/env python3
"""The full study on a CPU, in the background, across sessions that end.

    python scripts/background_run.py start --until 04:43   # start or resume (the one command)
    python scripts/background_run.py status                # epochs per model, s/epoch, accuracy
    python scripts/background_run.py pause -- python -m pytest -q   # run a heavy command beside it
    python scripts/background_run.py stop                  # SIGTERM: the last finished epoch is kept
    python scripts/background_run.py publish results/full  # once finished: outputs + weight shards

The run lives outside the checkout (default ~/cnnstress-full, or
$CNNSTRESS_RUN_HOME): data/, run/ (the output folder), code/ (the package as it
was when started: a later edit of the checkout cannot reach a running process
through a lazy import), run.log (the console, appended) and run.pid.

`start` refuses a CPU without AVX-512 BF16 (precision `auto` would continue in
fp32 at a fifth of the speed) and a second run. It runs
`nice -n 19 python -m cnnstress run --profile full --device cpu --time-budget UNTIL`,
so training stops after the last epoch that ends before UNTIL, checkpoint
saved, and the next `start` resumes it bit-identically.

`pause` is how other heavy work yields to it (one pause at a time: others wait): measured on a 2-core EPYC, a
test suite beside the run slowed its epoch by more than the suite's own
duration (two training threads wait on each other whenever one is
descheduled), so the run is stopped (SIGSTOP) while the command runs and
continued (SIGCONT) after. A detached watchdog continues it after
--max-minutes even if this script is killed, so the run cannot stay stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("CNNSTRESS_RUN_HOME", Path.home() / "cnnstress-full"))
MODELS = ("baseline", "improved")


def paths(home: Path) -> dict[str, Path]:
    return {"home": home, "data": home / "data", "run": home / "run", "code": home / "code",
            "log": home / "run.log", "pid": home / "run.pid"}


def has_bf16() -> bool:
    try:
        return "avx512_bf16" in Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False


def running_pid(home: Path) -> int | None:
    """The run's pid when it is alive (a stale pid file is ignored)."""
    try:
        pid = int(paths(home)["pid"].read_text().split()[0])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, ValueError, IndexError):
        return None
    return pid if "cnnstress" in cmdline else None


def process_state(pid: int) -> str:
    """R, S, T (stopped), ... from /proc/PID/stat."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


def snapshot_code(p: dict[str, Path]) -> str:
    """Copy the checkout's package into code/ (replaced each start); returns the commit."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "cnnstress"], capture_output=True,
                           text=True).stdout.strip()
    tmp = p["home"] / "code.new"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(REPO / "cnnstress", tmp / "cnnstress", ignore=shutil.ignore_patterns("__pycache__"))
    described = commit + (" (with uncommitted changes)" if dirty else "")
    (tmp / "COMMIT").write_text(described + "\n")
    shutil.rmtree(p["code"], ignore_errors=True)
    tmp.rename(p["code"])
    return described


def cmd_start(args) -> int:
    p = paths(args.home)
    if not has_bf16():
        print("error: this CPU has no AVX-512 BF16 (see `lscpu`): the run would continue in fp32 at about a "
              "fifth of the speed; not started", file=sys.stderr)
        return 2
    pid = running_pid(args.home)
    if pid is not None:
        print(f"error: the run is already going (pid {pid}, state {process_state(pid)}); see `status`",
              file=sys.stderr)
        return 2
    if not (p["data"] / "cifar-10-batches-py").is_dir():
        print(f"error: no CIFAR-10 in {p['data']}; write it with "
              f"`python ../shared/tools/cifar10_offline.py {p['data']}`", file=sys.stderr)
        return 2
    p["run"].mkdir(parents=True, exist_ok=True)
    commit = snapshot_code(p)
    command = [sys.executable, "-m", "cnnstress", "run", "--profile", "full", "--device", "cpu", "--no-progress",
               "--data-dir", str(p["data"]), "--out-dir", str(p["run"]), *args.extra]
    if args.until:
        command += ["--time-budget", args.until]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with open(p["log"], "a") as log:
        log.write(f"=== {stamp} start: code {commit}; {' '.join(command[1:])} ===\n")
        log.flush()
        env = {**os.environ, "PYTHONPATH": str(p["code"]), "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
        proc = subprocess.Popen(["nice", "-n", "19", *command], cwd=p["home"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    p["pid"].write_text(f"{proc.pid}\n")
    print(f"started pid {proc.pid} (code {commit}); console: {p['log']}")
    return 0


def model_progress(run: Path, name: str) -> str:
    try:
        data = json.loads((run / name / "history.json").read_text())
        history, epochs = data["history"], data["config"]["epochs"]
    except (OSError, ValueError, KeyError):
        return f"{name}: not started"
    if not history:
        return f"{name}: 0/{epochs} epochs"
    seconds = [h["seconds"] for h in history]
    last = history[-1]
    best = max(history, key=lambda h: h["val_acc"])
    return (f"{name}: {len(history)}/{epochs} epochs, median {statistics.median(seconds):.0f} s/epoch "
            f"(last {seconds[-1]:.0f} s), val acc {100 * last['val_acc']:.2f}% "
            f"(best {100 * best['val_acc']:.2f}% at epoch {best['epoch']})")


def training_left(run: Path) -> tuple[int, float] | None:
    """(epochs still to train over both models, seconds at the median epoch
    time so far), or None before the first epoch. A model not started yet
    needs the epochs the other one's config asks for (both use one config)."""
    seconds, done, wanted = [], {}, None
    for name in MODELS:
        try:
            data = json.loads((run / name / "history.json").read_text())
            seconds += [float(h["seconds"]) for h in data["history"]]
            done[name], wanted = len(data["history"]), int(data["config"]["epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if not seconds or wanted is None:
        return None
    left = sum(wanted - done.get(name, 0) for name in MODELS)
    return left, left * statistics.median(seconds)


def cmd_status(args) -> int:
    p = paths(args.home)
    pid = running_pid(args.home)
    state = {"T": "stopped (paused)", "R": "running", "S": "running", "D": "running"}.get(
        process_state(pid), "?") if pid else "not running"
    print(f"run: {state}" + (f" (pid {pid})" if pid else "") + f"; folder {p['run']}")
    for name in MODELS:
        print("  " + model_progress(p["run"], name))
    left = training_left(p["run"])
    if left:
        print(f"  training left: {left[0]} epochs, about {left[1] / 3600:.1f} h at the median epoch time")
    if p["log"].exists():
        tail = p["log"].read_text(errors="replace").splitlines()[-args.lines:]
        print("log tail:\n" + "\n".join("  " + line for line in tail))
    return 0


def signal_group(pid: int, sig: int) -> None:
    """Signal the run and its children (e.g. corruption workers): its process
    group when `start` made it a group leader, else the run alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def cmd_pause(args) -> int:
    if not args.command:
        print("error: give the command to run after --, e.g. pause -- python -m pytest -q", file=sys.stderr)
        return 2
    import fcntl
    args.home.mkdir(parents=True, exist_ok=True)
    # One pause at a time: a second waits here, so the first one's SIGCONT
    # cannot continue the run under the second one's command.
    with open(args.home / "pause.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return paused(args)


# Sleeps, then continues the run's process group (or the process, when it leads none).
WATCHDOG = """import os, signal, sys, time
pid, seconds = int(sys.argv[2]), int(sys.argv[3])
time.sleep(seconds)
(os.killpg if os.getpgid(pid) == pid else os.kill)(pid, signal.SIGCONT)
"""


def paused(args) -> int:
    pid = running_pid(args.home)
    if pid is None:
        return subprocess.call(args.command)
    # The watchdog continues the run even if this script dies without its finally. It is one process (no
    # shell with a sleep child), so killing and reaping it below leaves nothing behind.
    watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG, "cnnstress-watchdog", str(pid),
                                 str(int(args.max_minutes * 60))],
                                start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    started = time.monotonic()
    previous = {s: signal.signal(s, signal.default_int_handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        signal_group(pid, signal.SIGSTOP)
        return subprocess.call(args.command)
    except KeyboardInterrupt:
        return 130
    finally:
        signal_group(pid, signal.SIGCONT)
        watchdog.kill()
        watchdog.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
        took = time.monotonic() - started
        print(f"[background run {pid} paused {took:.0f} s, continued]", file=sys.stderr)
        # What the pauses cost the run, for the session's note.
        with open(args.home / "pauses.log", "a") as log:
            log.write(f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\t{took:.0f}s\t"
                      f"{' '.join(args.command)[:200]}\n")


def cmd_resume(args) -> int:
    pid = running_pid(args.home)
    if pid is not None:
        signal_group(pid, signal.SIGCONT)
    print(f"run: {'continued pid %d' % pid if pid else 'not running'}")
    return 0


def cmd_stop(args) -> int:
    pid = running_pid(args.home)
    if pid is None:
        print("run: not running")
        return 0
    signal_group(pid, signal.SIGCONT)
    os.kill(pid, signal.SIGTERM)   # the CLI keeps the last finished epoch's checkpoint
    print(f"sent SIGTERM to pid {pid}")
    return 0


def publishable(run: Path) -> list[Path]:
    """Every output of the run worth committing: figures, reports, metrics,
    config, predictions, CSVs, caches, histories; not checkpoints (the weights
    are published as shards), temporary or hidden files, or links."""
    keep = []
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run)
        if (path.is_symlink() or not path.is_file() or path.suffix in (".pt", ".tmp")
                or any(part.startswith(".") for part in rel.parts)):
            continue
        keep.append(path)
    return keep


def cmd_publish(args) -> int:
    p = paths(args.home)
    run, dest = p["run"], args.dest.resolve()
    if running_pid(args.home) is not None:
        print("error: the run is still going; publish once it has finished (see `status`)", file=sys.stderr)
        return 2
    report = run / "analysis_report.txt"
    checkpoints = [run / name / "checkpoint.pt" for name in MODELS]
    if not report.is_file() or any(not c.is_file() or c.stat().st_mtime > report.stat().st_mtime
                                   for c in checkpoints):
        print(f"error: {run} holds no report made from the final checkpoints; finish the run first "
              "(`start` resumes it)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    from cnnstress.weights import export_weights, verify_published
    dest.mkdir(parents=True, exist_ok=True)
    files = publishable(run)
    for src in files:
        target = dest / src.relative_to(run)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    if p["log"].is_file():
        shutil.copyfile(p["log"], dest / "training_console.log")   # every session's console, appended
    written = export_weights(run, dest)
    verify_published(dest)
    total = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"published {len(files)} output files and {len(written)} weight files into {dest} ({total:,} bytes); "
          f"check: python -m cnnstress run --weights {args.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=HOME, help=f"the run's folder (default {HOME})")
    sub = parser.add_subparsers(dest="cmd", required=True)
    start = sub.add_parser("start", help="start or resume the run in the background")
    start.add_argument("--until", default=None, metavar="MINUTES|END",
                       help="the run's --time-budget: end it 10 minutes before the session ends")
    start.add_argument("extra", nargs="*", help="more `run` flags, after --")
    status = sub.add_parser("status", help="progress per model and the log's tail")
    status.add_argument("--lines", type=int, default=5)
    pause = sub.add_parser("pause", help="run a command with the run stopped, then continue it")
    pause.add_argument("--max-minutes", type=float, default=30.0,
                       help="continue the run after this long whatever happens (default 30)")
    pause.add_argument("command", nargs=argparse.REMAINDER)
    sub.add_parser("resume", help="continue a run left stopped")
    sub.add_parser("stop", help="end the run (SIGTERM; finished epochs are kept)")
    publish = sub.add_parser("publish", help="copy the finished run's outputs and its weight shards to DEST")
    publish.add_argument("dest", type=Path, help="e.g. results/full")
    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    return {"start": cmd_start, "status": cmd_status, "pause": cmd_pause, "resume": cmd_resume,
            "stop": cmd_stop, "publish": cmd_publish}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
