"""Device, precision and seeding: the run-time choices every stage shares."""
from __future__ import annotations

import contextlib
import os
import random
import sys
from functools import lru_cache
from typing import Iterator

import numpy as np
import torch
from torch import nn

from .errors import DeviceError


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and PyTorch's global generators (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def tune_backend(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape
    and keep the fastest (the shapes repeat every step). GPU training is not
    bit-reproducible anyway; the CPU path is left as it is."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device this machine
    lacks is an error naming the fix."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} asked for, but this machine has no CUDA GPU; use --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) exist")
    elif device.type != "cpu":
        raise DeviceError(f"device type {device.type!r} is not supported; use auto, cpu or cuda")
    return device


def usable_cpus() -> int:
    """The cores this process may run on (its affinity where the OS has one:
    a container or `taskset` can allow fewer than the machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`; None means plain fp32.
    'auto' picks bf16 where the hardware computes it natively."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def describe_hardware(device: torch.device) -> str:
    """One line naming the compute device, for reports and logs."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    bf16 = ", AVX-512 BF16" if cpu_has_bf16() else ""
    return f"{cpu}, {os.cpu_count()} cores{bf16}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag on exit,
    exceptions included (a model may mix modes, e.g. frozen BatchNorm inside
    a training model)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, training in modes:
            m.training = training


def in_notebook() -> bool:
    shell = sys.modules.get("IPython")
    ip = shell.get_ipython() if shell is not None and hasattr(shell, "get_ipython") else None
    # Jupyter's kernel shell, or a subclass of it (Colab's)
    return ip is not None and any(c.__name__ == "ZMQInteractiveShell" for c in type(ip).__mro__)


def progress_enabled(progress: bool | None) -> bool:
    """Show bars in a terminal or notebook; stay quiet in logs and CI."""
    if progress is not None:
        return progress
    return in_notebook() or sys.stderr.isatty()


def progress_bar(total: int, desc: str, show: bool):
    """A tqdm bar of `total` steps, or None when `show` is false."""
    if not show:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


# Named seed streams, as offsets from config.seed: every sample or random draw
# of the analysis says which stream it uses, so two draws never share one by
# accident. Streams at the same offset feed different generators (a
# stratified sample, torch noise, NumPy maps), which is how the published
# numbers were made; changing an offset changes them.
SEED_STREAMS = {
    "corruption_sample": 0,     # which test images are corrupted (and the corruption noise)
    "attack_sample": 1,         # which test images are attacked
    "faithfulness_sample": 2,   # the stratified faithfulness group
    "sanity_sample": 3,         # the images of the parameter-randomisation test
    "random_maps": 0,           # pixel-noise random explanation maps
    "smooth_random_maps": 4,    # smooth random maps (CAM resolution, upsampled)
    "tie_breaking": 5,          # ranking ties in deletion/insertion
    "randomisation": 0,         # re-initialised weights in the sanity check
}


def seed_stream(seed: int, stream: str) -> int:
    """The seed of a named stream (SEED_STREAMS) for a run seeded with `seed`."""
    return seed + SEED_STREAMS[stream]


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """The one batching rule of the package: consecutive slices covering
    range(n), each `batch_size` long but the last (shorter when n is not a
    multiple). n = 0 gives no slices. Every batched loop (inference, attacks,
    CAMs, deletion/insertion, randomisation) walks these, so a result never
    depends on which loop cut the batches."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number >= 1, got {batch_size!r}")
    return [slice(start, min(start + batch_size, n)) for start in range(0, max(int(n), 0), batch_size)]

