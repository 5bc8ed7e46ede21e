"""Stage timing and the machine-readable run log (run_log.json).

Every stage of a run logs one line in one format,

    [2026-11-30T03:40:12Z] stage train baseline: 41.3 s, 1,350,000 images, 32,688 img/s (epochs x training images)

and the run writes the stages, the hardware and the library versions to
run_log.json, so a GPU run's speed can be read back without its console.
Stages are laps: `lap(name)` closes the stage that ran since the previous lap
(or since the timer started), so timing a stage adds one line after it.
"""
from __future__ import annotations

import datetime as _dt
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .io import save_json


def utc_stamp(when: float | None = None) -> str:
    """ISO-8601 UTC time stamp to the second, e.g. 2026-11-30T03:40:12Z."""
    moment = _dt.datetime.fromtimestamp(time.time() if when is None else when, _dt.timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StageTime:
    """One timed stage. images: images the stage processed (None when the
    count means nothing for it); what: what was counted."""
    name: str
    started: str                 # UTC time stamp of the stage's start
    ended: str
    seconds: float
    images: int | None = None
    what: str = ""

    @property
    def images_per_second(self) -> float | None:
        if not self.images or self.seconds <= 0:
            return None
        return self.images / self.seconds

    def line(self) -> str:
        text = f"[{self.ended}] stage {self.name}: {self.seconds:.1f} s"
        if self.images:
            text += f", {self.images:,} images, {self.images_per_second:,.0f} img/s"
        if self.what:
            text += f" ({self.what})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "images_per_second": self.images_per_second}


def library_versions() -> dict[str, str | None]:
    """Python and the versions of the libraries the results depend on."""
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                       "cuda": torch.version.cuda, "cudnn": None}
    if torch.backends.cudnn.is_available():
        versions["cudnn"] = str(torch.backends.cudnn.version())
    for label, name in (("torchvision", "torchvision"), ("numpy", "numpy"), ("scipy", "scipy"),
                        ("opencv", "cv2"), ("pillow", "PIL"), ("matplotlib", "matplotlib")):
        module = sys.modules.get(name)
        if module is None and name == "torchvision":   # importing it takes 1-2 s (its models import dynamo)
            versions[label] = unimported_version(name)
            continue
        if module is None:
            try:
                module = __import__(name)
            except Exception:  # noqa: BLE001 - a missing optional library is recorded as None
                versions[label] = None
                continue
        versions[label] = getattr(module, "__version__", None)
    return versions


def unimported_version(package: str) -> str | None:
    """`package.__version__` without importing the package: the literal in its
    version.py (torchvision's, with the build's local tag such as +cpu), else
    the installed distribution's version; None when it is not installed."""
    import importlib.metadata
    import importlib.util
    import re

    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    for folder in spec.submodule_search_locations or ():
        try:
            text = (Path(folder) / "version.py").read_text(encoding="utf-8")
        except OSError:
            continue
        found = re.search(r"^__version__\s*=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
        if found:
            return found.group(1)
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software of this run, JSON-ready."""
    from .runtime import describe_hardware
    env: dict[str, Any] = {"hardware": describe_hardware(device), "device": str(device),
                           "platform": platform.platform(), "cpu_count": _cpu_count(),
                           "torch_threads": torch.get_num_threads(), "versions": library_versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                      "capability": f"{props.major}.{props.minor}",
                      "multiprocessors": props.multi_processor_count}
    return env


def _cpu_count() -> int | None:
    import os
    return os.cpu_count()


@dataclass
class StageTimer:
    """Times stages as laps and logs each through `log` in StageTime.line's
    format; `prefix` is put before every stage name (e.g. "seed 43 ")."""
    log: Callable[[str], None] | None = print
    prefix: str = ""
    stages: list[StageTime] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    _lap_start: float = field(default_factory=time.perf_counter, repr=False)
    _lap_wall: float = field(default_factory=time.time, repr=False)

    def restart(self) -> None:
        """Start the next lap now (what ran since the last lap is not a stage)."""
        self._lap_start, self._lap_wall = time.perf_counter(), time.time()

    def lap(self, name: str, images: int | None = None, what: str = "") -> StageTime:
        """Close the stage that ran since the previous lap, log and keep it."""
        now, wall = time.perf_counter(), time.time()
        stage = StageTime(name=self.prefix + name, started=utc_stamp(self._lap_wall), ended=utc_stamp(wall),
                          seconds=now - self._lap_start, images=images or None, what=what)
        self.stages.append(stage)
        self._lap_start, self._lap_wall = now, wall
        if self.log:
            self.log(stage.line())
        return stage

    def to_dict(self) -> dict[str, Any]:
        return {"started": utc_stamp(self.started), "written": utc_stamp(),
                "seconds": time.time() - self.started, "stages": [s.to_dict() for s in self.stages]}

    def write(self, path: str | Path, device: torch.device, **extra: Any) -> Path:
        """run_log.json: the stages, the environment and `extra` (JSON-ready)."""
        path = Path(path)
        save_json(path, {**self.to_dict(), "environment": environment(device), **extra})
        return path
