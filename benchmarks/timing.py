"""Timing shared by the benchmark scripts: images/second over repeats, with
the device synchronised around each timed run so queued GPU work is counted."""
from __future__ import annotations

import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(run: Callable[[], int], device: torch.device, repeats: int) -> list[float]:
    """img/s of `run()` (which returns the number of images it processed), `repeats` times."""
    rates = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        images = run()
        sync(device)
        rates.append(images / (time.perf_counter() - t0))
    return rates


def warm_rates(fn: Callable[[], object], n: int, device: torch.device, repeats: int) -> list[float]:
    """img/s of `fn()` processing `n` images, after one untimed warm-up call
    (kernel selection, allocator)."""
    fn()
    return images_per_second(lambda: (fn(), n)[1], device, repeats)


def open_test_set(data_dir: str, device_name: str):
    """(device, test images uint8 (N,3,32,32), labels) for a benchmark, or None
    after printing the one-line error (missing data, unknown device)."""
    import sys

    from cnnstress.data import load_cifar10
    from cnnstress.errors import CnnstressError
    from cnnstress.runtime import resolve_device
    try:
        device = resolve_device(device_name)
        _, (images, labels) = load_cifar10(data_dir, download=False)
    except CnnstressError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return device, images, labels
