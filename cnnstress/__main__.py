"""Command line: python -m cnnstress {train,run,stress,explain,analyse} ...

User errors (bad data, config, device, checkpoint) print one line to stderr
and exit with status 2; nothing already saved is overwritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

from .budget import TimeBudget, TimeBudgetReached
from .config import GROUPS, PROFILES, Config, get_config
from .errors import CnnstressError, ConfigError
from . import pipeline
from .registry import BASELINE, MODEL_NAMES, MODEL_OF_PRESET, checkpoint_path
from .weights import analysis_config


# Each command's flags: the config fields of these groups (flag = field name),
# less the fields it sets itself: run, stress and explain train or load both
# models, whose augment preset is fixed (baseline, enhanced); stress and explain
# always run their stage. The training group also names the models to analyse
# (a checkpoint is found by its training fields).
COMMAND_GROUPS = {"train": ("training", "runtime"), "run": GROUPS,
                  "stress": ("training", "runtime", "failures", "stress"),
                  "explain": ("training", "runtime", "failures", "explanations"),
                  "analyse": ("runtime", "failures", "stress", "explanations")}
COMMAND_SKIPS = {"train": (), "run": ("augment",), "stress": ("augment", "stress"), "explain": ("augment", "explain"),
                 # analyse: one --cam-layer per --model; nothing is trained or compiled
                 "analyse": ("cam_layer", "compile", "checkpoint_every", "fused_adam")}
# Older flag names, kept working as aliases of the field's flag.
ALIASES = {"augment": ("--aug",), "failure_threshold": ("--threshold",), "cam_layer": ("--layer",),
           "faithfulness_samples": ("--samples",)}
GROUP_TITLES = {"training": "training (what is learned: a checkpoint is reused only when these match)",
                "runtime": "runtime (device and speed: the same model either way)",
                "failures": "failures (mining high-confidence failures)",
                "stress": "stress (corruptions, calibration, adversarial attacks)",
                "explanations": "explanations (faithfulness, sanity check, label suspects)"}
FIELD_HINTS = typing.get_type_hints(Config)


def flag_name(field_name: str) -> str:
    """The CLI flag of a config field: adv_eps -> --adv-eps."""
    return "--" + field_name.replace("_", "-")


def _value_type(name: str, base: type, optional: bool, element: bool = False):
    """argparse `type` for field `name`: parse text as `base` (`none` -> None
    when `optional`) and check it as Config would, so a bad value is an
    argparse error naming the flag."""
    def parse(text: str):
        if optional and text.lower() == "none":
            return None
        try:
            value = base(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if base is int else 'a number'}"
                                             f"{' or none' if optional else ''}, got {text!r}") from None
        try:
            Config().replace(**{name: (value,) if element else value})
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value
    parse.__name__ = base.__name__
    return parse


def _add_field(group, f: dataclasses.Field) -> None:
    """One flag for config field `f`. A flag not given leaves no attribute
    (argparse.SUPPRESS): the value is then the profile's (or --config's), and
    `--adv-subset none` can still ask for None."""
    hint = FIELD_HINTS[f.name]
    names = [flag_name(f.name), *ALIASES.get(f.name, ())]
    help_text = f.metadata["help"]
    if f.name == "profile":
        group.add_argument(*names, dest=f.name, default=None,
                           help=f"start from this profile: {', '.join(PROFILES)} (default: $CNNSTRESS_PROFILE, "
                                "else full on a GPU, quick on a CPU)")
        return
    if hint is bool:
        group.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=f"{help_text} (default: the profile's)")
        return
    kw: dict = {}
    if typing.get_origin(hint) is tuple:
        base, kw["nargs"] = typing.get_args(hint)[0], "+"
        kw["type"] = _value_type(f.name, base, False, element=True)
    else:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if args else hint
        kw["type"] = (_value_type(f.name, base, optional=bool(args)) if base in (int, float) else
                      _value_type(f.name, str, False) if "choices" in f.metadata else str)
    if "choices" in f.metadata:
        kw["metavar"] = "{" + ",".join(f.metadata["choices"]) + "}"
    else:
        kw["metavar"] = ("N" if base is int else "X" if base is float else "TEXT") + (
            "|none" if typing.get_args(hint) and typing.get_origin(hint) is not tuple else "")
    group.add_argument(*names, dest=f.name, default=argparse.SUPPRESS, help=f"{help_text} (default: the profile's)",
                       **kw)


def add_config_flags(parser: argparse.ArgumentParser, command: str) -> None:
    """The config-field flags of `command`, one argparse group per config group."""
    for group_name in COMMAND_GROUPS[command]:
        group = parser.add_argument_group(GROUP_TITLES[group_name])
        for f in dataclasses.fields(Config):
            if f.metadata["group"] == group_name and f.name not in COMMAND_SKIPS[command]:
                _add_field(group, f)


def _common(p: argparse.ArgumentParser, command: str,
            force_help: str = "retrain even when a checkpoint exists") -> None:
    p.add_argument("--config", default=None, metavar="PATH",
                   help="start from a saved config (e.g. outputs/config.json, which every run writes) instead of "
                        "the profile; flags given as well override it")
    p.add_argument("--data-dir", default=None, help="folder holding cifar-10-batches-py/ (default: $CNNSTRESS_DATA_DIR or data)")
    p.add_argument("--out-dir", default=None, help="output folder (default: $CNNSTRESS_OUT_DIR or outputs)")
    p.add_argument("--force", action="store_true", help=force_help)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_flags(p, command)


def _time_budget_arg(text: str) -> TimeBudget:
    try:
        return TimeBudget.parse(text)
    except CnnstressError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--time-budget ")) from None


def _time_budget(p: argparse.ArgumentParser) -> None:
    p.add_argument("--time-budget", type=_time_budget_arg, default=None, metavar="MINUTES|END",
                   help="stop cleanly before this many minutes have passed, or before an end time (HH:MM, or "
                        "e.g. 2026-12-06T04:43Z): training ends after the last epoch that fits, its checkpoint "
                        "saved, no later stage starts once it is spent, and the same command continues (exit 0)")


def _weights(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", default=None, metavar="DIR",
                   help="analyse the models published in DIR (e.g. results/full) instead of training: hashes "
                        "verified, config checked against --profile (default full), CPU-sized analysis samples")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument on one line (exit status 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cnnstress", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train one model and report its validation and test accuracy")
    train.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoint "
                                                             "(implied by --time-budget)")
    _time_budget(train)
    _common(train, "train")
    run = sub.add_parser("run", help="the whole study: both models, failures, Grad-CAM, comparison, stress "
                                     "tests, explanation checks, report")
    _weights(run)
    _time_budget(run)
    _common(run, "run")
    stress = sub.add_parser("stress", help="stress-test the two trained models (corruptions, calibration, "
                                           "adversarial) and refresh the report; never trains")
    _weights(stress)
    _common(stress, "stress", force_help="recompute the stress results even when cached ones match")
    explain = sub.add_parser("explain", help="check the explanations (faithfulness, sanity check, drift) and "
                                             "triage the failures (label suspects); refresh the report; never trains")
    _weights(explain)
    _common(explain, "explain", force_help="recompute the explanation results even when cached ones match")
    analyse = sub.add_parser("analyse", help="stress-test classifiers you supply (any CIFAR-10 model): failures, "
                                             "Grad-CAM, stress tests, explanation checks, label review, report; "
                                             "with two models also the comparison; never trains")
    models = analyse.add_argument_group("the models (each flag once per --model, in the same order)")
    models.add_argument("--model", action="append", required=True, metavar="PKG.MODULE:FACTORY",
                        help="a function or class that builds the model (imported, then called with no "
                             "arguments), e.g. cnnstress.model:resnet18; once or twice")
    models.add_argument("--weights", action="append", metavar="FILE|DIR",
                        help="its weights: a file holding a state_dict (read with torch.load(weights_only=True); "
                             "our checkpoint.pt works), or a published-weights folder (e.g. results/full, "
                             "the model --name)")
    models.add_argument("--name", action="append", metavar="NAME",
                        help="its name in files and the report (default: the factory's name)")
    models.add_argument("--cam-layer", action="append", dest="cam_layers", metavar="LAYER",
                        help="its Grad-CAM layer, a dotted name as in model.named_modules() (default: the "
                             "deepest layer with a spatial feature map)")
    models.add_argument("--mean", action="append", nargs=3, type=float, metavar="X",
                        help="its own input normalisation: the mean of [0, 1] RGB (with --std; default: the "
                             "model takes cnnstress's CIFAR normalisation)")
    models.add_argument("--std", action="append", nargs=3, type=float, metavar="X",
                        help="its own input normalisation: the std of [0, 1] RGB (with --mean)")
    _common(analyse, "analyse", force_help="recompute every analysis even when cached results match")
    return parser


def _config(args: argparse.Namespace, **forced) -> Config:
    """The run's config: --config's file or the profile, then every field flag
    given (a flag not given has no attribute), then `forced` (what the command sets)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
              if f.name != "profile" and hasattr(args, f.name)}
    values.update(forced)
    if args.config:
        if args.profile is not None:
            raise CnnstressError(f"--profile does not apply with --config {args.config}: the saved config "
                                 "already names its profile; drop one of them")
        return Config.load(args.config).replace(**values)
    if getattr(args, "weights", None):
        learned = [n for n in Config.fields_in("training") if n in values and n != "precision"]
        if learned:
            raise CnnstressError(f"{flag_name(learned[0])} does not apply to published weights (--weights): "
                                 "they are not trained here")
        return analysis_config(pipeline.default_profile(args.profile, fallback="full")).replace(**values)
    # replace, not get_config's overrides: those skip None, and `--adv-subset none` means None
    return get_config(pipeline.default_profile(args.profile)).replace(**values)


def cmd_train(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_split
    from .stages.training import train_model
    from .study import Study

    config = _config(args)
    study = Study(config=config, data_dir=args.data_dir, out_dir=args.out_dir)
    splits = study.splits
    print(f"profile {config.profile}: {len(splits.train)} train / {len(splits.val)} val / "
          f"{len(splits.test)} test images, {config.epochs} epoch{'s' if config.epochs != 1 else ''}, augment {config.augment}")
    from .lock import output_lock
    with output_lock(study.out):
        # A budgeted run is meant to be continued by the same command: it resumes.
        trained = train_model(config, splits, study.out, force=args.force,
                              resume=args.resume or args.time_budget is not None,
                              progress=False if args.no_progress else None, budget=args.time_budget)
        if not trained.result.budget_stopped:
            study.save_config()   # out/config.json, under the lock: rerun with --config
    if trained.result.budget_stopped:
        raise TimeBudgetReached(f"time budget reached ({args.time_budget.ends_at()}): {trained.name} "
                                f"{trained.result.epochs_done}/{config.epochs} epochs, checkpoint {trained.checkpoint} saved")
    test = evaluate_split(trained, splits.test)
    last = trained.result.history[-1]
    print(f"{trained.name}: validation accuracy {last['val_acc']:.4f}, test accuracy {test.accuracy:.4f} "
          f"({len(test)} images), training {trained.result.train_seconds:.0f}s; checkpoint {trained.checkpoint}")
    return 0


def _print_result(study) -> None:
    """Each stage's one summary line (the lines its run logged), then where the outputs are."""
    for name, result in study.results.items():
        line = study.get_stage(name).summary(study, result)
        if line and name != "report":
            print(line)
    print(f"outputs in {study.out}/ (analysis_report.txt, report.html, metrics.json, figures)")


def cmd_run(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")  # headless: files only
    config = _config(args)
    result = pipeline.run_pipeline(config, args.data_dir, args.out_dir, force=args.force, weights=args.weights,
                                   progress=False if args.no_progress else None, time_budget=args.time_budget)
    _print_result(result)
    return 0


def _analysis_command(args: argparse.Namespace, focus: str) -> int:
    """`stress` / `explain`: load the trained models, run that stage (recomputed
    with --force), take the other analysis stage from its cache, rewrite the report."""
    import matplotlib
    matplotlib.use("Agg")
    config = _config(args, **{focus: True})
    result = pipeline.run_pipeline(config, args.data_dir, args.out_dir, train=False, focus=focus,
                                   force_focus=args.force, weights=args.weights,
                                   progress=False if args.no_progress else None)
    _print_result(result)
    return 0


def cmd_stress(args: argparse.Namespace) -> int:
    return _analysis_command(args, "stress")


def cmd_explain(args: argparse.Namespace) -> int:
    return _analysis_command(args, "explain")


def _per_model(flag: str, values: list | None, n: int) -> list:
    """A per-model flag's values, one per --model (or None for each when not given)."""
    if values is None:
        return [None] * n
    if len(values) != n:
        raise CnnstressError(f"{flag} is given {len(values)} time(s) for {n} --model(s); give it once per "
                             "--model, in the same order, or not at all")
    return values


def cmd_analyse(args: argparse.Namespace) -> int:
    import matplotlib
    matplotlib.use("Agg")
    from torch import nn

    from .runlog import StageTimer
    from .study import Study
    from .supplied import SuppliedModelError, import_factory, load_state

    n = len(args.model)
    if n > 2:
        raise CnnstressError(f"analyse takes one or two --model (the second is compared with the first); got {n}")
    weights, names, layers = (_per_model(f, v, n) for f, v in (("--weights", args.weights), ("--name", args.name),
                                                               ("--cam-layer", args.cam_layers)))
    means, stds = _per_model("--mean", args.mean, n), _per_model("--std", args.std, n)
    if (args.mean is None) != (args.std is None):
        raise CnnstressError("--mean and --std go together (the model's own input normalisation); give both")
    names = [name or spec.rpartition(":")[2].rpartition(".")[2] for name, spec in zip(names, args.model)]
    if len(set(names)) != n:
        raise CnnstressError(f"both models are called {names[0]!r}; name them with --name A --name B")
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config)
              if f.name != "profile" and hasattr(args, f.name)}
    config = (Config.load(args.config) if args.config else
              analysis_config(pipeline.default_profile(args.profile, fallback="quick"))).replace(**values)
    models, sources = {}, {}
    for spec, name, path in zip(args.model, names, weights):
        factory = import_factory(spec)
        try:
            model = factory()
        except Exception as exc:
            raise SuppliedModelError(f"--model {spec}: calling {spec.rpartition(':')[2]}() failed: "
                                     f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}") from None
        if not isinstance(model, nn.Module):
            raise SuppliedModelError(f"--model {spec} returned a {type(model).__name__}, not a torch.nn.Module")
        digest = load_state(model, path, name) if path else None
        models[name] = model
        sources[name] = {"source": spec, "weights": path, "sha256": digest}
    study = Study.from_models(models, cam_layer=dict(zip(names, layers)),
                              preprocess={nm: (m, s) if m is not None else None
                                          for nm, m, s in zip(names, means, stds)},
                              config=config, data_dir=args.data_dir, out_dir=args.out_dir, sources=sources,
                              force=args.force, progress=False if args.no_progress else None,
                              timer=StageTimer(log=print))
    study.run()
    _print_result(study)
    return 0


COMMANDS = {"train": cmd_train, "run": cmd_run, "stress": cmd_stress, "explain": cmd_explain,
            "analyse": cmd_analyse}


def _interrupted(args: argparse.Namespace, argv: list[str], started: float) -> str:
    """What survived an interruption, and a command that continues from there."""
    import shlex

    out = Path(args.out_dir or pipeline.default_out_dir())
    # train: the model its --augment preset trains (no flag: the config's default, the baseline's)
    names = [MODEL_OF_PRESET.get(getattr(args, "augment", None), BASELINE)] if args.command == "train" else MODEL_NAMES
    ckpts = [p for p in (checkpoint_path(out, name) for name in names) if p.is_file()]
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
    except TimeBudgetReached as exc:
        import shlex
        # --force would start over again: the continuation must not repeat it.
        rerun = [a for a in argv if a != "--force"]
        print(f"{exc}; the same command continues: python -m cnnstress {shlex.join(rerun)}")
        return 0
    except KeyboardInterrupt as exc:
        print(_interrupted(args, argv, started), file=sys.stderr)
        return 128 + int(signal.SIGTERM if isinstance(exc, _Terminated) else signal.SIGINT)
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
