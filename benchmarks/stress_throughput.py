"""Throughput of the stress stage's parts: corruption generation per type,
all types with 1 and with N worker processes, and FGSM / PGD attacks.

    python benchmarks/stress_throughput.py [--data-dir data] [--device auto] [--images 1000]
                                           [--workers N] [--pgd-steps 10] [--attack-images 256]
                                           [--repeats 2] [--json]

Corruptions: `cnnstress.robustness.corruptions.corrupt` on the first --images test images,
all five severities of each type (CPU work, whatever --device says). Then all
70 cells at once through `corrupt_cells`, as the stress stage makes them, with
1 worker (in-process) and with --workers processes (default: every CPU this
process may use), alternating within each repeat so that both see the same
machine load; each parallel run starts its own pool, as the stage does, so its
time includes starting the workers. Besides wall-clock img/s it reports the
CPU seconds spent (this process and its workers): on a machine shared with
other work the wall-clock ratio understates the speed-up, while the CPU
seconds show the parallel overhead. Attacks:
`cnnstress.robustness.adversarial.fgsm` and `pgd` at eps 8/255 on --attack-images images
with a seeded random-init ResNet-18 (throughput does not depend on the
weights). Prints min and median images/second over the repeats (an image
corrupted at all five severities counts five times); with --json one object.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cnnstress.robustness.adversarial import fgsm, pgd  # noqa: E402
from cnnstress.augment import to_float  # noqa: E402
from cnnstress.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt, corrupt_cells  # noqa: E402
from cnnstress.model import resnet18  # noqa: E402
from cnnstress.runtime import describe_hardware, usable_cpus  # noqa: E402
from benchmarks.timing import open_test_set, warm_rates  # noqa: E402

EPS = 8 / 255


def _rates(fn, n: int, device: torch.device, repeats: int) -> dict[str, float]:
    rates = warm_rates(fn, n, device, repeats)
    return {"median": statistics.median(rates), "min": min(rates)}


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the pool's
    workers count once the pool has shut down)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _all_cells(sample: torch.Tensor, workers_list: list[int], repeats: int) -> dict[str, dict[str, float]]:
    """Wall-clock image-cells/s and CPU seconds of making every (type,
    severity) cell with corrupt_cells at each worker count, the counts
    alternating within each repeat."""
    cells = [(c, s) for c in CORRUPTIONS for s in SEVERITIES]
    n = int(sample.shape[0]) * len(cells)
    runs: dict[int, list[tuple[float, float]]] = {w: [] for w in workers_list}
    for _ in range(repeats):
        for w in workers_list:
            c0, t0 = _cpu_seconds(), time.perf_counter()
            for _x in corrupt_cells(sample, cells, seed=0, workers=w):
                pass
            runs[w].append((time.perf_counter() - t0, _cpu_seconds() - c0))
    return {str(w): {"median": statistics.median(n / t for t, _ in r), "min": min(n / t for t, _ in r),
                     "seconds": statistics.median(t for t, _ in r),
                     "cpu_seconds": statistics.median(c for _, c in r)} for w, r in runs.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default="data")
    p.add_argument("--device", default="auto")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes for the parallel run (default: the CPUs this process may use)")
    p.add_argument("--attack-images", type=int, default=256)
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        p.error(f"--workers must be >= 1 (got {args.workers})")
    loaded = open_test_set(args.data_dir, args.device)
    if loaded is None:
        return 2
    device, images, labels = loaded
    sample = images[:args.images]
    n = int(sample.shape[0]) * len(SEVERITIES)
    corruptions = {name: _rates(lambda name=name: [corrupt(sample, name, s, seed=0) for s in SEVERITIES],
                                n, torch.device("cpu"), args.repeats) for name in CORRUPTIONS}
    cpus = usable_cpus()
    workers = args.workers or cpus
    all_cells = _all_cells(sample, sorted({1, workers}), args.repeats)
    torch.manual_seed(0)
    model = resnet18().to(device).to(memory_format=torch.channels_last).eval()
    x = to_float(images[:args.attack_images]).to(device)
    y = labels[:args.attack_images].to(device)
    m = int(y.numel())
    attacks = {"fgsm": _rates(lambda: fgsm(model, x, y, EPS), m, device, args.repeats),
               f"pgd{args.pgd_steps}": _rates(lambda: pgd(model, x, y, EPS, steps=args.pgd_steps), m, device,
                                               args.repeats)}
    result = {
        "corruption_img_per_s": corruptions, "attack_img_per_s": attacks,
        "corruption_all_types_seconds_per_1000_images": sum(1000 * len(SEVERITIES) / r["median"]
                                                             for r in corruptions.values()),
        "all_cells_img_per_s": all_cells, "workers": workers, "cpus": cpus,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "images": int(sample.shape[0]), "attack_images": m, "pgd_steps": args.pgd_steps, "eps": EPS,
        "repeats": args.repeats, "device": str(device), "hardware": describe_hardware(device),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(result["hardware"])
    print(f"corruptions (CPU, {result['images']} images x {len(SEVERITIES)} severities), img/s median / min:")
    for name, r in corruptions.items():
        print(f"  {name:<18} {r['median']:8.0f} / {r['min']:.0f}")
    print(f"  all {len(CORRUPTIONS)} types at every severity: "
          f"{result['corruption_all_types_seconds_per_1000_images']:.1f} s per 1000 test images")
    print(f"all {len(CORRUPTIONS) * len(SEVERITIES)} cells through corrupt_cells ({cpus} CPUs, load average "
          f"{', '.join(f'{v:.1f}' for v in result['load_average'] or ())}), img/s median / min, wall s, CPU s:")
    for w, r in all_cells.items():
        print(f"  {w:>3} worker{'s' if w != '1' else ' '}  {r['median']:8.0f} / {r['min']:.0f}   "
              f"{r['seconds']:6.1f} s   {r['cpu_seconds']:6.1f} s")
    for name, r in attacks.items():
        print(f"{name.upper()} (eps 8/255, {m} images, {device}): median {r['median']:.1f} img/s, min {r['min']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
