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
