"""The full study as one command for a GPU machine, packed for the trip back.

    python scripts/remote_study.py OUT_DIR [--seeds 43 44] [--bench]
    (scripts/full_study.sh OUT_DIR ... wraps it and logs to OUT_DIR/study_log.txt)

A script beside the package, not part of it: it drives the same Study stages
(pipeline.run_pipeline, stages.training) as `python -m cnnstress`.

In order: record the versions; write the data from the carried archive when
it is missing; a smoke run on the device (a broken device path fails in
seconds, exit status 3); train both models of the main profile; publish
their weights into OUT_DIR (cnnstress.weights: shards, weights.json,
SHA256SUMS) so a run cut short still returns them; the analysis (run_pipeline
on the trained models); the results archive (results.tar.gz: everything the
work folder holds except checkpoints). Then, while time remains, a
training-throughput benchmark (`--bench`: eager vs compiled, fused vs unfused
Adam) and extra seeds (`--seeds`: baseline and improved per seed, training +
evaluation + failures, summarised as mean +- std and paired differences),
each followed by a fresh results archive.

OUT_DIR is checked against the transfer rules of the machine it runs on (by
default those of the remote GPU machine this was written for: at most 8 plain
files of at most 16 MiB, 64 MiB in all; --max-files, --max-file-mib and
--max-total-mib change them; names of letters, digits, '.', '_', '-'); a
breach is reported and makes the exit status 1.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

if __package__ in (None, ""):          # run as a file: the package is in the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cnnstress.registry import BASELINE, IMPROVED, MODELS  # noqa: E402

# The default transfer rules: those of the remote GPU machine this script was
# written for (what may come back from it); options override them per run.
MAX_FILES = 8
MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20
NAME_RE = re.compile(r"^[A-Za-z0-9._-]+$")
RESULTS_ARCHIVE = "results.tar.gz"
LOG_FILE = "study_log.txt"          # written by scripts/full_study.sh (tee)
SEEDS_JSON, SEEDS_TEXT = "seeds_summary.json", "seeds_summary.txt"
STUDY_LOG_JSON = "study_run_log.json"
BENCH_JSON = "bench_train.json"
DEFAULT_WORK_DIR = "outputs/study"
DEFAULT_KIT_DIR = ".gpu"            # scripts/prepare_gpu_kit.sh fills it: tools/, data/
OFFLINE_TOOL = Path("tools") / "cifar10_offline.py"
ENV = {"profile": "CNNSTRESS_STUDY_PROFILE", "device": "CNNSTRESS_STUDY_DEVICE",
       "compile": "CNNSTRESS_STUDY_COMPILE", "kit": "CNNSTRESS_KIT_DIR", "work": "CNNSTRESS_STUDY_WORK_DIR"}


# --- the transfer rules -----------------------------------------------------

def check_out_dir(out_dir: str | Path, *, max_files: int = MAX_FILES, max_file_bytes: int = MAX_FILE_BYTES,
                  max_total_bytes: int = MAX_TOTAL_BYTES) -> list[str]:
    """Every way OUT_DIR breaks the transfer rules, one sentence each; [] = fine."""
    out = Path(out_dir)
    entries = sorted(out.iterdir()) if out.is_dir() else []
    problems = []
    files = [p for p in entries if p.is_file() and not p.is_symlink()]
    for p in entries:
        if p not in files:
            problems.append(f"{p.name} is not a plain file (folders and links do not come back)")
        elif not NAME_RE.match(p.name):
            problems.append(f"{p.name!r} has characters other than letters, digits, '.', '_', '-'")
    if len(entries) > max_files:
        problems.append(f"{len(entries)} entries, more than {max_files}: {', '.join(p.name for p in entries)}")
    for p in files:
        if p.stat().st_size > max_file_bytes:
            problems.append(f"{p.name} is {p.stat().st_size:,} bytes, over {max_file_bytes:,}")
    total = sum(p.stat().st_size for p in files)
    if total > max_total_bytes:
        problems.append(f"{total:,} bytes in all, over {max_total_bytes:,}")
    return problems


def listing(out_dir: str | Path) -> str:
    out = Path(out_dir)
    rows = [f"{p.stat().st_size:>12,}  {p.name}" for p in sorted(out.iterdir()) if p.is_file()]
    return "\n".join(rows)


# --- packing ------------------------------------------------------------------

@dataclass(frozen=True)
class PackResult:
    path: Path
    bytes: int
    members: int
    dropped: tuple[str, ...]        # patterns left out (ALWAYS_DROP, then DROP_ORDER's to stay under the limit)


# Left out, in this order, when the archive would exceed its limit: per-image
# arrays of the extra seeds first, then the main run's (every figure in the
# report and metrics.json is kept).
DROP_ORDER = (("seed_*/predictions_*.npz",), ("*/predictions_*.npz", "predictions_*.npz"))
# The preflight (smoke) run travels as its numbers and logs only.
ALWAYS_DROP = ("preflight/*.png", "preflight/*.npz", "preflight/explanations.json", "published/*")


def _members(work: Path, drop: Sequence[str]) -> list[Path]:
    keep = []
    for p in sorted(work.rglob("*")):
        rel = p.relative_to(work)
        if not p.is_file() or p.is_symlink() or p.suffix in (".pt", ".tmp") or p.name.startswith("."):
            continue
        if any(rel.match(pattern) for pattern in drop):
            continue
        keep.append(p)
    return keep


def pack_results(work_dir: str | Path, dest: str | Path, *, name: str = RESULTS_ARCHIVE,
                 max_bytes: int = MAX_FILE_BYTES, log: Callable[[str], None] | None = print) -> PackResult:
    """tar.gz of everything under `work_dir` but checkpoints (*.pt) and
    temporary files, written atomically to dest/name. When it exceeds
    max_bytes, the predictions arrays are left out (DROP_ORDER, each step
    logged); still too big raises ValueError (nothing is written then)."""
    from cnnstress.io import atomic_write

    work, dest = Path(work_dir), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    drop: list[str] = list(ALWAYS_DROP)
    for extra in ((), *DROP_ORDER):
        drop.extend(extra)
        members = _members(work, drop)
        # Built in the work folder (skipped by _members: a dot file), so a run
        # killed while compressing leaves nothing half-written in dest.
        tmp = work / f".{name}.building"
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            for p in members:
                tar.add(p, arcname=str(Path(work.name) / p.relative_to(work)), recursive=False)
        size = tmp.stat().st_size
        if size <= max_bytes:
            atomic_write(dest / name, lambda t: shutil.copyfile(tmp, t))
            tmp.unlink()
            return PackResult(path=dest / name, bytes=size, members=len(members), dropped=tuple(drop))
        tmp.unlink()
        if log:
            log(f"warning: {name} would be {size:,} bytes (> {max_bytes:,}); leaving out the next of "
                f"{DROP_ORDER}")
    raise ValueError(f"{name} stays over {max_bytes:,} bytes even without the predictions arrays")


def publish_weights(work_main: Path, out_dir: Path, log: Callable[[str], None],
                    staging: Path | None = None) -> list[Path]:
    """The two trained models as weight shards in OUT_DIR (cnnstress.weights).
    With `staging`, the export is written there first and only changed files
    are copied over, SHA256SUMS last: a run killed meanwhile leaves the
    earlier, complete export rather than one without its sums file."""
    from cnnstress.io import atomic_write
    from cnnstress.weights import export_weights, sha256_file
    if staging is None:
        paths = export_weights(work_main, out_dir)
    else:
        paths = []
        for src in export_weights(work_main, staging):   # shards, weights.json, SHA256SUMS: in that order
            dst = out_dir / src.name
            if not dst.is_file() or sha256_file(dst) != sha256_file(src):
                atomic_write(dst, lambda t, src=src: shutil.copyfile(src, t))
            paths.append(dst)
    log(f"weights: {len(paths)} files in {out_dir} ({sum(p.stat().st_size for p in paths):,} bytes)")
    return paths


# --- seeds ----------------------------------------------------------------------

@dataclass(frozen=True)
class SeedFigures:
    """One model's headline numbers for one seed (fractions, not percent)."""
    test_accuracy: float
    failures: int                       # wrong predictions above the failure threshold
    ece: float                          # expected calibration error, 15 equal-width bins, uncalibrated
    mean_corruption_accuracy: float | None = None   # None when the stress stage did not run


@dataclass(frozen=True)
class SeedRun:
    seed: int
    baseline: SeedFigures
    improved: SeedFigures


@dataclass(frozen=True)
class FigureSummary:
    """One figure over the seeds that have it: means, sample standard
    deviations (n-1; None for one seed) and the paired difference improved -
    baseline per seed."""
    figure: str
    seeds: tuple[int, ...]
    baseline_mean: float
    baseline_std: float | None
    improved_mean: float
    improved_std: float | None
    diffs: tuple[float, ...]            # improved - baseline, in `seeds` order
    diff_mean: float
    diff_std: float | None


@dataclass(frozen=True)
class SeedsSummary:
    seeds: tuple[int, ...]
    figures: tuple[FigureSummary, ...]
    runs: tuple[SeedRun, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        percent = {"test_accuracy", "ece", "mean_corruption_accuracy"}
        lines = [f"Seeds: {', '.join(map(str, self.seeds))} (mean +- sample std over seeds; "
                 "paired difference improved - baseline per seed)"]
        for f in self.figures:
            scale, unit = (100.0, " pts") if f.figure in percent else (1.0, "")

            def ms(mean: float, std: float | None) -> str:
                s = f"{scale * mean:.2f}"
                return s + (f" +- {scale * std:.2f}" if std is not None else " (one seed)")
            per_seed = ", ".join(f"{s}: {scale * d:+.2f}" for s, d in zip(f.seeds, f.diffs))
            lines.append(f"  {f.figure} (n={len(f.seeds)}): baseline {ms(f.baseline_mean, f.baseline_std)}, "
                         f"improved {ms(f.improved_mean, f.improved_std)}; difference "
                         f"{ms(f.diff_mean, f.diff_std)}{unit} [{per_seed}]")
        return "\n".join(lines)


def _mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


FIGURES = ("test_accuracy", "failures", "ece", "mean_corruption_accuracy")


def summarize_seeds(runs: Iterable[SeedRun]) -> SeedsSummary:
    """Mean +- std of every headline figure over the seeds, with the paired
    difference per seed; a figure missing for some seeds (None) is summarised
    over the seeds that have it, and left out when none has it."""
    runs = tuple(sorted(runs, key=lambda r: r.seed))
    if not runs:
        raise ValueError("no seed runs to summarise")
    if len({r.seed for r in runs}) != len(runs):
        raise ValueError("each seed must appear once")
    figures = []
    for name in FIGURES:
        have = [r for r in runs if getattr(r.baseline, name) is not None and getattr(r.improved, name) is not None]
        if not have:
            continue
        base = [float(getattr(r.baseline, name)) for r in have]
        imp = [float(getattr(r.improved, name)) for r in have]
        diffs = [b - a for a, b in zip(base, imp)]
        (bm, bs), (im, is_), (dm, ds) = _mean_std(base), _mean_std(imp), _mean_std(diffs)
        figures.append(FigureSummary(figure=name, seeds=tuple(r.seed for r in have), baseline_mean=bm,
                                     baseline_std=bs, improved_mean=im, improved_std=is_, diffs=tuple(diffs),
                                     diff_mean=dm, diff_std=ds))
    return SeedsSummary(seeds=tuple(r.seed for r in runs), figures=tuple(figures), runs=runs)


def seed_run(study) -> SeedRun:
    """The headline figures of a finished study (pipeline.run_pipeline's result)."""
    from cnnstress.robustness.calibration import expected_calibration_error

    failures = study.results["failures"].models
    stress = study.results.get("stress")

    def figures(name: str) -> SeedFigures:
        preds = study.results["failures"].predictions[name]
        corr = None
        if stress is not None and name in stress.models:
            corr = float(stress.models[name].corruptions.mean_corruption_accuracy)
        return SeedFigures(test_accuracy=float(failures[name].summary.test_accuracy),
                           failures=int(failures[name].summary.high_confidence_failures),
                           ece=float(expected_calibration_error(preds.probs, preds.labels,
                                                                study.config.calibration_bins)),
                           mean_corruption_accuracy=corr)
    return SeedRun(seed=int(study.config.seed), baseline=figures(BASELINE), improved=figures(IMPROVED))


def write_seeds_summary(summary: SeedsSummary, folder: Path) -> None:
    from cnnstress.io import atomic_write, save_json
    save_json(folder / SEEDS_JSON, summary.to_dict())
    atomic_write(folder / SEEDS_TEXT, lambda t: t.write_text(summary.to_text() + "\n"))


# --- environment and data -------------------------------------------------------

def pinned_versions(requirements: Path) -> dict[str, str]:
    pins = {}
    if requirements.is_file():
        for line in requirements.read_text().splitlines():
            m = re.match(r"^\s*([A-Za-z0-9_.-]+)==([^\s#;]+)", line)
            if m:
                pins[m.group(1).lower()] = m.group(2)
    return pins


def version_lines(pins: dict[str, str]) -> list[str]:
    from cnnstress.runlog import library_versions
    found = library_versions()
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in found.items())]
    for name, pin in pins.items():
        have = found.get(name)
        if have is not None and have.split("+")[0] != pin:
            lines.append(f"note: {name} {pin} is pinned, {have} is installed; using the installed one "
                         "(no network here to install the pin)")
    return lines


def ensure_data(data_dir: Path, kit_dir: Path, log: Callable[[str], None]) -> bool:
    """Write CIFAR-10 into data_dir from the kit's archive when it is missing.
    Returns True when it had to be written."""
    from cnnstress.data import BATCHES_DIR, TEST_FILE, TRAIN_FILES
    from cnnstress.errors import DataError
    folder = data_dir / BATCHES_DIR
    if all((folder / n).is_file() for n in (*TRAIN_FILES, TEST_FILE)):
        log(f"data: {folder} is there")
        return False
    tool = kit_dir / OFFLINE_TOOL
    if not tool.is_file():
        raise DataError(f"CIFAR-10 is not in {folder} and the data kit {tool} is missing; run "
                        "scripts/prepare_gpu_kit.sh on a machine with ../shared (or set --data-dir)")
    log(f"data: writing {folder} from {kit_dir / 'data'} with {tool}")
    done = subprocess.run([sys.executable, str(tool), str(data_dir)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise DataError(f"{tool} failed (exit {done.returncode}): {tail[0]}")
    return True


# --- the command --------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from cnnstress.config import COMPILE_MODES, PROFILES
    ap = argparse.ArgumentParser(prog="python scripts/remote_study.py", description=__doc__.splitlines()[0])
    ap.add_argument("out_dir", help="folder for what comes back (see --max-files, --max-file-mib, --max-total-mib)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[],
                    help="extra seeds, trained and evaluated after the main study is packed")
    ap.add_argument("--seeds-stress", action="store_true", help="run the stress stage for the extra seeds too")
    ap.add_argument("--bench", action="store_true",
                    help="afterwards, time training (eager vs compiled, fused vs unfused Adam)")
    ap.add_argument("--profile", default=os.environ.get(ENV["profile"], "full"), choices=sorted(PROFILES),
                    help=f"main profile (default ${ENV['profile']} or full)")
    ap.add_argument("--device", default=os.environ.get(ENV["device"], "cuda"),
                    help=f"cuda, cuda:N or cpu (default ${ENV['device']} or cuda)")
    ap.add_argument("--compile", default=os.environ.get(ENV["compile"], "off"), choices=COMPILE_MODES,
                    help=f"torch.compile mode of the training step (default ${ENV['compile']} or off)")
    ap.add_argument("--data-dir", default=os.environ.get("CNNSTRESS_DATA_DIR", "data"))
    ap.add_argument("--kit-dir", default=os.environ.get(ENV["kit"], DEFAULT_KIT_DIR),
                    help="folder with tools/cifar10_offline.py and data/ (default .gpu)")
    ap.add_argument("--work-dir", default=os.environ.get(ENV["work"], DEFAULT_WORK_DIR),
                    help="where the runs write (checkpoints stay here; default outputs/study)")
    ap.add_argument("--checkpoint-every", type=int, default=None,
                    help="epochs between checkpoint writes in the main and seed runs (default 10 on CUDA, "
                         "where a 135 MB write is a sizeable share of an epoch; 1 on the CPU)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds this command may take: an extra seed or the benchmark starts only when "
                         "it is expected to end in time (estimated from the main run's training)")
    ap.add_argument("--no-preflight", action="store_true", help="skip the smoke run on the device")
    rules = ap.add_argument_group("transfer rules", "what OUT_DIR may hold (defaults: the remote GPU machine's)")
    rules.add_argument("--max-files", type=int, default=MAX_FILES, metavar="N",
                       help=f"at most N plain files (default {MAX_FILES})")
    rules.add_argument("--max-file-mib", type=float, default=MAX_FILE_BYTES / 2**20, metavar="MIB",
                       help=f"each at most MIB MiB (default {MAX_FILE_BYTES // 2**20})")
    rules.add_argument("--max-total-mib", type=float, default=MAX_TOTAL_BYTES / 2**20, metavar="MIB",
                       help=f"at most MIB MiB in all (default {MAX_TOTAL_BYTES // 2**20})")
    args = ap.parse_args(argv)
    for flag, value in (("--max-files", args.max_files), ("--max-file-mib", args.max_file_mib),
                        ("--max-total-mib", args.max_total_mib)):
        if not value > 0:      # also NaN
            ap.error(f"{flag} must be positive, got {value}")
    return args


def transfer_rules(args: argparse.Namespace) -> dict[str, int]:
    """check_out_dir's limits from the options."""
    return dict(max_files=args.max_files, max_file_bytes=int(args.max_file_mib * 2**20),
                max_total_bytes=int(args.max_total_mib * 2**20))


def _say(message: str) -> None:
    print(message, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")

    from cnnstress import pipeline
    from cnnstress.config import get_config
    from cnnstress.data import load_splits
    from cnnstress.io import ensure_writable_dir
    from cnnstress.lock import output_lock
    from cnnstress.stages.training import train_model, trained_images
    from cnnstress.errors import CnnstressError
    from cnnstress.runlog import StageTimer, utc_stamp
    from cnnstress.runtime import resolve_device

    out, work = Path(args.out_dir), Path(args.work_dir)
    rules = transfer_rules(args)
    out.mkdir(parents=True, exist_ok=True)
    timer = StageTimer(log=_say)
    problems_seen: list[str] = []
    _say(f"[{utc_stamp()}] study: profile {args.profile}, device {args.device}, compile {args.compile}, "
         f"seeds {args.seeds or 'none'}, out {out}, work {work}")
    try:
        device = resolve_device(args.device)
    except CnnstressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in version_lines(pinned_versions(Path(__file__).resolve().parent.parent / "requirements.txt")):
        _say(line)
    work.mkdir(parents=True, exist_ok=True)

    def write_log(**extra) -> None:
        timer.write(work / STUDY_LOG_JSON, device, profile=args.profile, compile=args.compile,
                    seeds=args.seeds, problems=problems_seen, **extra)

    def pack(stage: str) -> None:
        write_log()
        packed = pack_results(work, out, max_bytes=rules["max_file_bytes"], log=_say)
        timer.lap(f"pack {stage}", what=f"{RESULTS_ARCHIVE}: {packed.members} files, {packed.bytes:,} bytes"
                  + (f", left out {', '.join(packed.dropped)}" if packed.dropped else ""))
        check(stage)

    def check(stage: str) -> None:
        found = check_out_dir(out, **rules)
        for p in found:
            _say(f"warning: OUT_DIR breaks the transfer rules after {stage}: {p}")
        problems_seen.extend(p for p in found if p not in problems_seen)

    try:
        timer.restart()
        data_dir = Path(args.data_dir)
        ensure_data(data_dir, Path(args.kit_dir), _say)
        timer.lap("data files")
        overrides = dict(device=str(device), compile=args.compile)
        if not args.no_preflight:
            _say(f"== preflight: the smoke profile on {device} ==")
            timer.prefix = "preflight "
            pipeline.run_pipeline(get_config("smoke", **overrides), data_dir, work / "preflight", force=True,
                                  progress=False, log=_say, timer=timer)
            timer.prefix = ""
        every = args.checkpoint_every or (10 if device.type == "cuda" else 1)
        config = get_config(args.profile, checkpoint_every=every, **overrides)
        main_dir = ensure_writable_dir(work / "main")
        _say(f"== main study: profile {config.profile}, {config.epochs} epochs ==")
        timer.prefix = "main "
        configs = {name: config.replace(augment=preset) for name, preset in MODELS.items()}
        splits = load_splits(data_dir, configs[BASELINE])
        timer.lap("data", len(splits.train) + len(splits.val) + len(splits.test), "images loaded")
        with output_lock(main_dir, log=_say):
            for name, cfg in configs.items():
                trained = train_model(cfg, splits, main_dir, progress=False, log=_say)
                timer.lap(f"train {name}", *trained_images(trained.result, len(splits.train)))
        del splits
        try:
            publish_weights(main_dir, out, _say)
        except Exception as exc:  # noqa: BLE001 - the results must still be written
            problems_seen.append(f"weights not published: {type(exc).__name__}: {exc}")
            _say(f"warning: {problems_seen[-1]}")
        timer.lap("publish weights")
        check("weights")
        timer.prefix = "main analysis "
        result = pipeline.run_pipeline(config, data_dir, main_dir, train=False, progress=False, log=_say,
                                       timer=timer)
        timer.prefix = ""
        try:  # again, now that metrics.json holds the reference numbers
            publish_weights(main_dir, out, _say, staging=work / "published")
        except Exception as exc:  # noqa: BLE001
            _say(f"warning: weights not republished: {type(exc).__name__}: {exc}")
        timer.lap("publish weights with metrics")
        pack("main study")
        if args.bench and fits(args.budget_s, timer, BENCH_SECONDS, "the benchmark"):
            _say("== training throughput benchmark ==")
            bench(device, work / BENCH_JSON, data_dir)
            timer.lap("bench", what=BENCH_JSON)
            pack("bench")
        runs = [seed_run(result)]
        # An extra seed costs about the main run's training and evaluation again.
        per_seed = sum(s.seconds for s in timer.stages
                       if s.name.startswith(("main train ", "main analysis evaluate ")))
        for seed in args.seeds:
            if seed in [r.seed for r in runs]:
                continue
            if not fits(args.budget_s, timer, 1.2 * per_seed + 30, f"seed {seed}"):
                break
            _say(f"== seed {seed} ==")
            timer.prefix = f"seed {seed} "
            seeded = config.replace(seed=seed, stress=args.seeds_stress, explain=False)
            try:
                runs.append(seed_run(pipeline.run_pipeline(seeded, data_dir, work / f"seed_{seed}",
                                                           progress=False, log=_say, timer=timer)))
            except Exception as exc:  # noqa: BLE001 - the main study is packed; keep what the seeds gave
                problems_seen.append(f"seed {seed} failed: {type(exc).__name__}: {exc}")
                _say(f"warning: {problems_seen[-1]}")
                timer.prefix = ""
                continue
            timer.prefix = ""
            summary = summarize_seeds(runs)
            write_seeds_summary(summary, work)
            _say(summary.to_text())
            pack(f"seed {seed}")
    except Exception as exc:
        stage = timer.prefix.strip() or "study"
        write_log(failed=f"{stage}: {type(exc).__name__}: {exc}")
        if stage == "preflight":
            traceback.print_exc()  # a device-path bug: the whole trace is what the log is for
            print(f"error: the smoke run on {device} failed ({type(exc).__name__}: {exc}); "
                  "fix the device path before the full study", file=sys.stderr)
            return 3
        if (work / "main").is_dir():  # whatever the main run wrote so far is worth the trip back
            try:
                pack(f"failure in {stage}")
            except Exception as pack_exc:  # noqa: BLE001
                _say(f"warning: could not pack after the failure: {pack_exc}")
        if isinstance(exc, CnnstressError):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
    write_log()
    _say(f"[{utc_stamp()}] study finished in {timer.to_dict()['seconds']:.0f} s; OUT_DIR {out}:")
    _say(listing(out))
    final = check_out_dir(out, **rules)
    if final or problems_seen:
        for p in dict.fromkeys(problems_seen + final):
            _say(f"problem: {p}")
        return 1
    _say(f"OUT_DIR keeps the transfer rules ({rules['max_files']} files, "
         f"{rules['max_file_bytes'] / 2**20:g} MiB each and {rules['max_total_bytes'] / 2**20:g} MiB in all at most)")
    return 0


BENCH_SECONDS = 240.0   # the benchmark's defaults on a GPU, two compiles included (an estimate)


def fits(budget_s: float | None, timer, needed_s: float, what: str) -> bool:
    """Whether `what`, expected to take needed_s, ends within the budget."""
    import time
    if budget_s is None:
        return True
    left = budget_s - (time.time() - timer.started)
    if needed_s <= left:
        return True
    _say(f"skipping {what}: about {needed_s:.0f} s needed, {max(left, 0):.0f} s of "
         f"--budget-s {budget_s:.0f} left")
    return False


def bench(device, dest: Path, data_dir: Path, extra: Sequence[str] = ()) -> bool:
    """benchmarks/train_throughput.py (its defaults, then `extra` arguments)
    into `dest` (JSON); False, with a warning, when it fails."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "train_throughput.py"
    # the benchmark's defaults: baseline, enhanced, ceiling, fused Adam the other way, compile (+ CUDA graphs)
    cmd = [sys.executable, str(script), "--device", str(device), "--data-dir", str(data_dir), "--json", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        _say(f"warning: benchmark failed (exit {done.returncode}): {' | '.join(tail)}")
        return False
    dest.write_text(done.stdout)
    try:
        result = json.loads(done.stdout)
        _say("bench: " + ", ".join(f"{k} {v:,.0f}" for k, v in sorted(result.items())
                                   if k.endswith("_img_per_s") and isinstance(v, (int, float)) and math.isfinite(v)))
    except ValueError:
        _say("warning: benchmark printed no JSON")
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
