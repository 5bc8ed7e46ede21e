#!/usr/bin/env python3
"""Training throughput of cnnstress against a seed-style PyTorch loop.

Measures, in one run and on the same CIFAR-10 training files (images/second):

* cnnstress baseline / enhanced: the project's real training path,
  `cnnstress.train.train_epoch` with `make_step` (uint8 images held on the
  device, batched on-device augmentation, channels_last, the chosen autocast
  precision, on-device metric accumulation read back every SYNC_EVERY steps and
  after the last step), `--steps` steps per repeat after `--warmup` steps;
* the step-only ceiling: the same model, precision, channels_last and optimiser
  step fed ONE pre-made normalised batch over and over, so whatever the data
  path, augmentation and bookkeeping cost shows as the gap to it;
* cnnstress variants of the baseline step, to measure each speed switch both
  ways: `fused` / `unfused` (Adam's fused kernel on / off; by default it is on
  on CUDA only), `compile` (torch.compile of the model, mode "default") and
  `cudagraphs` (mode "reduce-overhead": CUDA graphs); compile time is paid in
  the warm-up and reported separately;
* seed-style baseline / enhanced: torchvision's CIFAR10 dataset + DataLoader
  (shuffle, num_workers=2 on >= 2 cores else 0) with PIL transforms, a plain
  fp32 NCHW ResNet-18 (cnnstress.resnet18), Adam(lr 1e-3, wd 1e-4), and the
  usual per-step `loss.item()` / accuracy `.item()` bookkeeping.

Each variant is timed `--repeats` times; min and median are reported, plus the
ratios cnnstress/seed-style, cnnstress/ceiling and switch/baseline (medians).
The cnnstress and ceiling variants are all built and warmed up first, then
timed round-robin (one repeat of each in turn), so a load change on a shared
machine hits every variant alike rather than one of them. DataLoader worker
start-up is paid during warm-up and left out of the timing (a real epoch pays
it once per ~390 steps), which if anything favours the seed-style figure.

The defaults are short (the figures are ratios within one run): 4 timed steps
x 2 repeats after 1 warm-up step (which compiles, for the compiled variants),
and the variants that answer "what does each switch buy here" (baseline, enhanced, ceiling, the fused-Adam variant that is
not the device's default, compile; cudagraphs on CUDA). `--all` adds the
seed-style loop (and cudagraphs anywhere), `--long` the old 30 x 3 after 5.

    python benchmarks/train_throughput.py                   # readable table, a few minutes on 2 CPU cores
    python benchmarks/train_throughput.py --json            # one JSON object
    python benchmarks/train_throughput.py --long --all      # the long form: every variant, 30 steps x 3
    python benchmarks/train_throughput.py --variants baseline,fused --steps 3 --warmup 1 --repeats 1
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from cnnstress.augment import normalize, to_float  # noqa: E402
from cnnstress.config import Config  # noqa: E402
from cnnstress.data import BATCHES_DIR, CIFAR_MEAN, CIFAR_STD, NUM_CLASSES, TRAIN_FILES, load_cifar10  # noqa: E402
from cnnstress.errors import CnnstressError  # noqa: E402
from cnnstress.model import resnet18  # noqa: E402
from cnnstress.runtime import describe_hardware, resolve_device, resolve_precision, seed_everything  # noqa: E402
from cnnstress.train import build_model, build_optimizer, make_step, train_epoch  # noqa: E402
from benchmarks.timing import images_per_second, sync  # noqa: E402

PRESETS = ("baseline", "enhanced")
# variant -> Config changes on the cnnstress baseline step
SWITCHES = {"fused": {"fused_adam": "on"}, "unfused": {"fused_adam": "off"},
            "compile": {"compile": "default"}, "cudagraphs": {"compile": "reduce-overhead"}}
VARIANTS = ("baseline", "enhanced", "ceiling", "seed_style", *SWITCHES)
LONG = {"steps": 30, "warmup": 5, "repeats": 3}
OFFLINE_TOOL = "python ../shared/tools/cifar10_offline.py"


# --- cnnstress: the real training path --------------------------------------

def default_variants(device: torch.device) -> list[str]:
    """baseline, enhanced, ceiling, the Adam implementation that is not this
    device's default, compile; and CUDA graphs on CUDA."""
    chosen = ["baseline", "enhanced", "ceiling", "unfused" if device.type == "cuda" else "fused", "compile"]
    return chosen + (["cudagraphs"] if device.type == "cuda" else [])


def prepare_cnnstress(preset: str, train_x: torch.Tensor, train_y: torch.Tensor, *, device: torch.device,
                      precision: str, batch_size: int, switches: dict[str, str] | None = None
                      ) -> Callable[[int], int]:
    """run(steps) -> images: `steps` steps of the real training path."""
    config = Config(augment=preset, batch_size=batch_size, precision=precision, device=str(device),
                    **(switches or {}))
    amp_dtype = resolve_precision(config.precision, device)
    model = build_model(config, device)
    optimizer, _ = build_optimizer(model, config)
    step = make_step(model, optimizer, device, amp_dtype, config.compile)
    epoch = 0

    def run(max_steps: int) -> int:
        nonlocal epoch
        stats = train_epoch(model, step, train_x, train_y, config=config, epoch=epoch, max_steps=max_steps)
        epoch += 1  # a fresh batch order and augmentation draw each call, as in fit
        return int(stats["seen"])

    return run


def prepare_ceiling(train_x: torch.Tensor, train_y: torch.Tensor, *, device: torch.device, precision: str,
                    batch_size: int) -> Callable[[int], int]:
    """run(steps) -> images: the same step on one pre-made, normalised, channels_last batch."""
    config = Config(batch_size=batch_size, precision=precision, device=str(device))
    amp_dtype = resolve_precision(config.precision, device)
    model = build_model(config, device)
    model.train()
    optimizer, _ = build_optimizer(model, config)
    step = make_step(model, optimizer, device, amp_dtype, config.compile)
    n = min(batch_size, train_x.shape[0])
    x = normalize(to_float(train_x[:n]))
    if config.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = train_y[:n]

    def run(count: int) -> int:
        loss = None
        for _ in range(count):
            loss, _ = step(x, y)
        if loss is not None:
            float(loss.detach())  # wait for the last step, as train_epoch's final read-back does
        return count * n

    return run


def interleaved_rates(runners: dict[str, Callable[[int], int]], *, device: torch.device, steps: int,
                      warmup: int, repeats: int, log: Callable[[str], None]) -> tuple[dict, dict]:
    """({name: img/s per repeat}, {name: warm-up seconds}): every runner warmed
    up (compiling, for the compiled ones), then the repeats taken round-robin,
    so a load change on a shared machine hits every variant alike."""
    warm = {}
    for name, run in runners.items():
        log(f"warm-up {name} ...")
        sync(device)
        t0 = time.perf_counter()
        if warmup:
            run(warmup)
        sync(device)
        warm[name] = time.perf_counter() - t0
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(repeats):
        log(f"repeat {r + 1}/{repeats} ...")
        for name, run in runners.items():
            rates[name] += images_per_second(lambda run=run: run(steps), device, 1)
    return rates, warm


# --- seed-style reference ----------------------------------------------------

def _local_cifar10_class():
    import torchvision

    class LocalCIFAR10(torchvision.datasets.CIFAR10):
        """torchvision's CIFAR10 over a local copy of the python batches.

        torchvision insists on the MD5s of the official files. The copy here
        (e.g. written by ../shared/tools/cifar10_offline.py from the JPEG
        archive, in the official pickle layout) has the same format but other
        bytes, so its checksums differ by design; checking that the files exist
        is all this benchmark needs (their content is validated by
        cnnstress.data, which reads the same files for the cnnstress runs)."""

        meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # None: existence only

        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

    return LocalCIFAR10


def seed_style_transform(preset: str):
    from torchvision import transforms as T

    tail = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    if preset == "baseline":
        return T.Compose(tail)
    return T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.RandomRotation(15),
                      T.ColorJitter(0.2, 0.2, 0.2, 0.1), *tail, T.RandomErasing()])


def seed_style_workers() -> int:
    return 2 if (os.cpu_count() or 1) >= 2 else 0


def bench_seed_style(preset: str, data_dir: Path, *, device: torch.device, batch_size: int, steps: int,
                     warmup: int, repeats: int) -> list[float]:
    dataset = _local_cifar10_class()(root=str(data_dir), train=True, download=False,
                                     transform=seed_style_transform(preset))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True,
                                         num_workers=seed_style_workers())
    seed_everything(42)
    model = resnet18(NUM_CLASSES).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    model.train()
    batches = iter(loader)
    tally = {"loss": 0.0, "correct": 0, "seen": 0}

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:  # a new epoch, as the seed's epoch loop would start one
            batches = iter(loader)
            return next(batches)

    def run(count: int) -> int:
        images = 0
        for _ in range(count):
            inputs, targets = next_batch()
            inputs, targets = inputs.to(device), targets.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, targets)
            loss.backward()
            optimizer.step()
            tally["loss"] += loss.item() * targets.size(0)
            tally["correct"] += outputs.argmax(1).eq(targets).sum().item()
            tally["seen"] += targets.size(0)
            images += targets.size(0)
        return images

    try:
        if warmup:
            run(warmup)  # also starts the DataLoader workers
        return images_per_second(lambda: run(steps), device, repeats)
    finally:
        del batches  # shut the workers down before the next measurement


# --- driver -------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                    help="autocast precision of the cnnstress runs (seed-style is always fp32)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data-dir", default="data", help="folder holding cifar-10-batches-py/ (default data)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 4; --long 30)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps before the repeats (default 1; --long 5)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (default 2; --long 3)")
    ap.add_argument("--long", action="store_true", help="the long form: 30 steps x 3 repeats after 5 warm-up steps")
    ap.add_argument("--variants", default=None,
                    help=f"comma-separated, from {', '.join(VARIANTS)} (default: see above)")
    ap.add_argument("--all", action="store_true", help="every variant (seed-style included)")
    ap.add_argument("--skip-seed-style", action="store_true", help="leave the seed-style variants out")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = ap.parse_args(argv)
    short = {"steps": 4, "warmup": 1, "repeats": 2}
    for name in ("steps", "warmup", "repeats"):
        if getattr(args, name) is None:
            setattr(args, name, (LONG if args.long else short)[name])
    if args.variants is not None:
        args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
        unknown = [v for v in args.variants if v not in VARIANTS]
        if unknown or not args.variants:
            ap.error(f"unknown variant(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(VARIANTS)}")
    elif args.all:
        args.variants = list(VARIANTS)
    if args.skip_seed_style and args.variants:
        args.variants = [v for v in args.variants if v != "seed_style"]
    for name in ("batch_size", "steps", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.batch_size < 2:
        ap.error("--batch-size must be >= 2 (BatchNorm needs two images)")
    return args


def _missing_data(data_dir: Path, need_meta: bool) -> str | None:
    folder = data_dir / BATCHES_DIR
    names = list(TRAIN_FILES) + ["test_batch"] + (["batches.meta"] if need_meta else [])
    missing = [n for n in names if not (folder / n).is_file()]
    if not missing:
        return None
    return (f"CIFAR-10 not found: {folder / missing[0]} is missing; "
            f"create it with: {OFFLINE_TOOL} {data_dir}")


def _summary(rates: list[float] | None) -> dict[str, float | None]:
    if not rates:
        return {"median": None, "min": None}
    return {"median": statistics.median(rates), "min": min(rates)}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    data_dir = Path(args.data_dir)
    device = resolve_device(args.device)
    amp_dtype = resolve_precision(args.precision, device)
    precision = "bf16" if amp_dtype == torch.bfloat16 else "fp32"
    (train_x, train_y), _ = load_cifar10(data_dir, download=False)
    train_x, train_y = train_x.to(device), train_y.to(device)
    train_images = int(train_x.shape[0])
    variants = args.variants or default_variants(device)
    common = dict(device=device, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup,
                  repeats=args.repeats)
    started = time.perf_counter()
    raw: dict[str, list[float] | None] = {"step_ceiling": None, **{f"cnnstress_{p}": None for p in PRESETS},
                                          **{f"cnnstress_baseline_{n}": None for n in SWITCHES}}
    made = dict(device=device, batch_size=args.batch_size, precision=args.precision)
    runners: dict[str, Callable[[int], int]] = {}
    if "ceiling" in variants:
        runners["step_ceiling"] = prepare_ceiling(train_x, train_y, **made)
    for preset in PRESETS:
        if preset in variants:
            runners[f"cnnstress_{preset}"] = prepare_cnnstress(preset, train_x, train_y, **made)
    for name, switches in SWITCHES.items():
        if name in variants:
            runners[f"cnnstress_baseline_{name}"] = prepare_cnnstress("baseline", train_x, train_y,
                                                                      switches=switches, **made)
    log(f"{', '.join(runners)} ({precision}, batch {args.batch_size}) ...")
    rates, warmups = interleaved_rates(runners, device=device, steps=args.steps, warmup=args.warmup,
                                       repeats=args.repeats, log=log)
    raw.update(rates)
    del runners, train_x, train_y
    for preset in PRESETS:
        raw[f"seed_style_{preset}"] = None
        if "seed_style" in variants:
            log(f"seed-style {preset} (fp32, DataLoader num_workers={seed_style_workers()}) ...")
            raw[f"seed_style_{preset}"] = bench_seed_style(preset, data_dir, **common)

    result: dict[str, Any] = {}
    for name, rates in raw.items():
        s = _summary(rates)
        result[f"{name}_img_per_s"] = s["median"]
        result[f"{name}_img_per_s_min"] = s["min"]
    for preset in PRESETS:
        mine = result[f"cnnstress_{preset}_img_per_s"]
        result[f"ratio_{preset}_cnnstress_vs_seed_style"] = _ratio(mine, result[f"seed_style_{preset}_img_per_s"])
        result[f"ratio_{preset}_cnnstress_vs_ceiling"] = _ratio(mine, result["step_ceiling_img_per_s"])
    for name in SWITCHES:
        result[f"ratio_baseline_{name}_vs_baseline"] = _ratio(result[f"cnnstress_baseline_{name}_img_per_s"],
                                                              result["cnnstress_baseline_img_per_s"])
    result.update({
        "variants": variants,
        "warmup_seconds": warmups,
        "default_fused_adam": device.type == "cuda",
        "repeats_img_per_s": raw,
        "device": str(device),
        "hardware": describe_hardware(device),
        "precision": precision,
        "seed_style_precision": "fp32",
        "torch_version": torch.__version__,
        "torchvision_version": _torchvision_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "seed_style_num_workers": seed_style_workers() if "seed_style" in variants else None,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "repeats": args.repeats,
        "train_images": train_images,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
    })
    return result


def _torchvision_version() -> str | None:
    try:
        import torchvision
    except ImportError:
        return None
    return torchvision.__version__


def format_table(r: dict[str, Any]) -> str:
    def num(v: float | None, fmt: str = "{:9.1f}") -> str:
        return fmt.format(v) if v is not None else f"{'-':>9}"

    rows = [
        ("cnnstress baseline", "cnnstress_baseline"),
        ("cnnstress enhanced", "cnnstress_enhanced"),
        ("seed-style baseline", "seed_style_baseline"),
        ("seed-style enhanced", "seed_style_enhanced"),
        ("step-only ceiling", "step_ceiling"),
        ("baseline, fused Adam", "cnnstress_baseline_fused"),
        ("baseline, unfused Adam", "cnnstress_baseline_unfused"),
        ("baseline, compiled", "cnnstress_baseline_compile"),
        ("baseline, CUDA graphs", "cnnstress_baseline_cudagraphs"),
    ]
    lines = [
        f"CIFAR-10 ResNet-18 training throughput, images/second "
        f"(batch {r['batch_size']}, {r['steps']} timed steps x {r['repeats']} repeats, "
        f"{r['warmup']} warm-up steps)",
        f"device {r['device']}: {r['hardware']}",
        f"cnnstress/ceiling precision {r['precision']}, channels_last; "
        + ("seed-style skipped" if r["seed_style_num_workers"] is None else
           f"seed-style fp32 NCHW, DataLoader num_workers={r['seed_style_num_workers']}")
        + f"; {r['date']}",
        "",
        f"{'':24}{'median':>9}  {'min':>9}",
    ]
    for label, key in rows:
        if r[f"{key}_img_per_s"] is None:
            continue
        warm = r["warmup_seconds"].get(key)
        lines.append(f"{label:24}{num(r[f'{key}_img_per_s'])}  {num(r[f'{key}_img_per_s_min'])}"
                     + (f"   warm-up {warm:.1f} s" if warm is not None else ""))
    lines.append("")
    for name in SWITCHES:
        ratio = r[f"ratio_baseline_{name}_vs_baseline"]
        if ratio is not None:
            lines.append(f"baseline {name} / baseline {ratio:6.2f}")
    for preset in PRESETS:
        vs_seed = r[f"ratio_{preset}_cnnstress_vs_seed_style"]
        vs_ceil = r[f"ratio_{preset}_cnnstress_vs_ceiling"]
        if vs_seed is None and vs_ceil is None:
            continue
        lines.append(f"{preset:9} cnnstress/seed-style {num(vs_seed, '{:6.2f}x').strip():>8}   "
                     f"cnnstress/ceiling {num(vs_ceil, '{:6.2f}').strip():>6}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    data_dir = Path(args.data_dir)
    problem = _missing_data(data_dir, need_meta="seed_style" in (args.variants or ()))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    log = (lambda msg: print(msg, file=sys.stderr, flush=True))
    try:
        result = measure(args, log)
    except CnnstressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        print(format_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
