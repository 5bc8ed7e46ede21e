"""Command line: python -m cnnstress {train,run,stress,explain} ...

User errors (bad data, config, device, checkpoint) print one line to stderr
and exit with status 2; nothing already saved is overwritten.
"""
from __future__ import annotations

import argparse
import sys

from .augment import PRESETS
from .config import COMPILE_MODES, PRECISIONS, PROFILES, get_config
from .errors import CnnstressError
from . import pipeline
from .weights import analysis_config


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _common(p: argparse.ArgumentParser, force_help: str = "retrain even when a checkpoint exists") -> None:
    p.add_argument("--profile", default=None,
                   help=f"one of {', '.join(PROFILES)} (default: $CNNSTRESS_PROFILE, else full on a GPU, quick on a CPU)")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $CNNSTRESS_DATA_DIR or data)")
    p.add_argument("--out-dir", default=None, help="output folder (default: $CNNSTRESS_OUT_DIR or outputs)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--epochs", type=_positive_int, default=None, help="override the profile's epoch count")
    p.add_argument("--precision", default=None, help=f"autocast precision: {', '.join(PRECISIONS)} (default: auto)")
    p.add_argument("--compile", default=None, choices=COMPILE_MODES,
                   help="torch.compile the model in the training step (default off; reduce-overhead adds CUDA graphs)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="analyse the models published in DIR (e.g. results/full) instead of training: hashes "
                        "verified, config checked against --profile (default full), CPU-sized analysis samples")


def _threshold(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threshold", type=float, default=None,
                   help="confidence above which a wrong prediction counts as a failure (default 0.8)")


def _stress_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corruption-subset", type=_positive_int, default=None,
                   help="test images per corruption and severity (default: the profile's)")
    p.add_argument("--adv-subset", type=_positive_int, default=None,
                   help="test images attacked (default: the profile's)")


def _explain_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--layer", default=None, help="Grad-CAM target layer: layer3 (8x8) or layer4 (4x4, default)")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="images per faithfulness group (default: the profile's)")


def _analysis_overrides(args: argparse.Namespace) -> dict:
    """Config overrides of the stress and explanation options a command has."""
    names = {"corruption_subset": "corruption_subset", "adv_subset": "adv_subset", "layer": "cam_layer",
             "samples": "faithfulness_samples", "threshold": "failure_threshold"}
    return {field: getattr(args, arg) for arg, field in names.items() if hasattr(args, arg)}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cnnstress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one model and report its validation and test accuracy")
    _common(train)
    train.add_argument("--aug", default="baseline", help=f"augmentation preset: {', '.join(PRESETS)} (default: baseline)")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint")
    run = sub.add_parser("run", help="the whole study: both models, failures, Grad-CAM, comparison, stress "
                                     "tests, explanation checks, report")
    _common(run)
    _threshold(run)
    _weights(run)
    run.add_argument("--no-stress", action="store_true",
                     help="skip the stress stage (corruptions, calibration, adversarial)")
    run.add_argument("--no-explain", action="store_true",
                     help="skip the explanation stage (faithfulness, sanity check, drift, label suspects)")
    _stress_options(run)
    _explain_options(run)
    stress = sub.add_parser("stress", help="stress-test the two trained models (corruptions, calibration, "
                                           "adversarial) and refresh the report; never trains")
    _common(stress, force_help="recompute the stress results even when cached ones match")
    _threshold(stress)
    _weights(stress)
    _stress_options(stress)
    explain = sub.add_parser("explain", help="check the explanations (faithfulness, sanity check, drift) and "
                                             "triage the failures (label suspects); refresh the report; never trains")
    _common(explain, force_help="recompute the explanation results even when cached ones match")
    _threshold(explain)
    _weights(explain)
    _explain_options(explain)
    return parser


def _config(args: argparse.Namespace, **extra):
    if getattr(args, "weights", None):
        if args.epochs is not None:
            raise CnnstressError("--epochs does not apply to published weights (--weights): they are not trained here")
        return analysis_config(pipeline.default_profile(args.profile, fallback="full"), device=args.device,
                               precision=args.precision, **extra)
    return get_config(pipeline.default_profile(args.profile), device=args.device, epochs=args.epochs,
                      precision=args.precision, compile=args.compile, **extra)


def cmd_train(args: argparse.Namespace) -> int:
    from .stages.failures import evaluate_split
    from .stages.training import train_model
    from .study import Study

    config = _config(args, augment=args.aug)
    study = Study(config=config, data_dir=args.data_dir, out_dir=args.out_dir)
    splits = study.splits
    print(f"profile {config.profile}: {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test images, {config.epochs} epoch{'s' if config.epochs != 1 else ''}, augment {config.augment}")
    from .lock import output_lock
    with output_lock(study.out):
        trained = train_model(config, splits, study.out, force=args.force, resume=args.resume,
                              progress=False if args.no_progress else None)
    test = evaluate_split(trained, splits.test)
    last = trained.result.history[-1]
    print(f"{trained.name}: validation accuracy {last['val_acc']:.4f}, test accuracy {test.accuracy:.4f} "
          f"({len(test)} images), training {trained.result.train_seconds:.0f}s; checkpoint {trained.checkpoint}")
    return 0


def _print_result(study) -> None:
    """Each stage's one summary line (the lines its run logged), then where the outputs are."""
    from .stages import get_stage
    for name, result in study.results.items():
        line = get_stage(name).summary(study, result)
        if line and name != "report":
            print(line)
    print(f"outputs in {study.out}/ (analysis_report.txt, report.html, metrics.json, figures)")


def cmd_run(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")  # headless: files only
    config = _config(args, stress=False if args.no_stress else None, explain=False if args.no_explain else None,
                     **_analysis_overrides(args))
    result = pipeline.run_pipeline(config, args.data_dir, args.out_dir, force=args.force, weights=args.weights,
                                   progress=False if args.no_progress else None)
    _print_result(result)
    return 0


def _analysis_command(args: argparse.Namespace, focus: str) -> int:
    """`stress` / `explain`: load the trained models, run that stage (recomputed
    with --force), take the other analysis stage from its cache, rewrite the report."""
    import matplotlib
    matplotlib.use("Agg")
    config = _config(args, **{focus: True}, **_analysis_overrides(args))
    result = pipeline.run_pipeline(config, args.data_dir, args.out_dir, train=False, focus=focus,
                                   force_focus=args.force, weights=args.weights,
                                   progress=False if args.no_progress else None)
    _print_result(result)
    return 0


def cmd_stress(args: argparse.Namespace) -> int:
    return _analysis_command(args, "stress")


def cmd_explain(args: argparse.Namespace) -> int:
    return _analysis_command(args, "explain")


COMMANDS = {"train": cmd_train, "run": cmd_run, "stress": cmd_stress, "explain": cmd_explain}


def _interrupted(args: argparse.Namespace, argv: list[str], started: float) -> str:
    """What survived an interruption, and a command that continues from there."""
    import shlex
    import time
    from pathlib import Path

    out = Path(args.out_dir or pipeline.default_out_dir())
    names = [pipeline.RUN_NAMES.get(args.aug, "baseline")] if args.command == "train" else ["baseline", "improved"]
    ckpts = [p for p in (out / name / "checkpoint.pt" for name in names) if p.is_file()]
    ours = [p for p in ckpts if p.stat().st_mtime >= started]   # written by this very command
    rerun = [a for a in argv if a != "--force"] if ours and ckpts == ours else list(argv)
    if args.command == "train" and ckpts and "--force" not in rerun and "--resume" not in rerun:
        rerun.append("--resume")   # train refuses an unfinished checkpoint without it; run resumes by itself
    command = "python -m cnnstress " + shlex.join(rerun)
    if args.command in ("stress", "explain"):
        return f"interrupted; results finished so far are cached; rerun `{command}`"
    if not ckpts:
        return f"interrupted before any checkpoint was written; start again with `{command}`"
    return f"interrupted; training checkpoints are kept ({', '.join(map(str, ckpts))}); continue with `{command}`"


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that cleanups run as for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading
    import time

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    started = time.time()
    main_thread = threading.current_thread() is threading.main_thread()   # only it may set handlers
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
    try:
        return COMMANDS[args.command](args)
    except CnnstressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(_interrupted(args, argv, started), file=sys.stderr)
        return 128 + int(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
