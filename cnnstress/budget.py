"""A time budget for sessions that end (Colab, Kaggle, a cluster's job limit).

`--time-budget 170` (minutes) or `--time-budget 04:43` / `2026-12-06T04:43Z`
(an end time): training starts an epoch only when it is expected to finish
before the deadline, so the run stops cleanly after the last epoch that fits,
its checkpoint saved, and the same command continues it. Analysis stages are
not cut: the budget is checked before each one (they are cached, so a stage
stopped with the session is recomputed from its last cached unit).

The epoch estimate is 1.1 x the fastest of the last five epochs' wall times
(from the run's history, plus the checkpoint write; for a model not started
yet, those measured under this budget): pauses and other work beside the run
only ever lengthen an epoch, so the fastest recent one is the closest to what
an undisturbed epoch costs. The first epoch of a fresh run with nothing
measured yet has no estimate: it starts whenever any budget is left.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Callable, Iterable

from .errors import CnnstressError

FORMATS = "minutes (e.g. 170) or an end time (HH:MM, or e.g. 2026-12-06T04:43Z)"
SAVE_MARGIN_S = 5.0   # a history epoch's seconds exclude the checkpoint write (~135 MB)
RECENT = 5            # epochs the estimate looks back over
DRIFT = 1.1           # the fastest of them, plus 10%


class TimeBudgetReached(Exception):
    """Work stopped cleanly at the budget; the message says how far it got and
    how to continue. Not an error: the command exits 0."""


def parse_time_budget(text: str, *, now: datetime | None = None) -> float:
    """The deadline (seconds since the epoch, as time.time()) that `text` names:
    minutes from now, HH:MM (the next time the local clock shows it) or an ISO
    8601 date and time (local time unless it carries Z or an offset)."""
    now = now or datetime.now().astimezone()
    raw = str(text).strip()
    try:
        minutes = float(raw)
    except ValueError:
        minutes = None
    if minutes is not None:
        if not minutes >= 0 or minutes == float("inf"):
            raise CnnstressError(f"--time-budget must be a non-negative number of minutes, got {text!r}")
        return now.timestamp() + 60.0 * minutes
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", raw)
    if match:
        hour, minute = int(match[1]), int(match[2])
        if hour > 23 or minute > 59:
            raise CnnstressError(f"--time-budget {text!r} is not a clock time; give {FORMATS}")
        end = now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if end <= now:
            end += timedelta(days=1)
        return end.timestamp()
    try:
        end = datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise CnnstressError(f"--time-budget {text!r} is neither; give {FORMATS}") from None
    if end.tzinfo is None:
        end = end.astimezone()   # naive: local time
    return end.timestamp()


@dataclass
class TimeBudget:
    """A deadline, and the clock it is read with (time.time; tests pass their own)."""
    deadline: float
    clock: Callable[[], float] = field(default=time.time, repr=False)
    # Epoch wall times measured under this budget (both models of a study share
    # one budget, so the second model's first epoch has an estimate too).
    measured: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def parse(cls, text: str | None) -> "TimeBudget | None":
        return None if text is None else cls(parse_time_budget(text))

    @classmethod
    def minutes(cls, minutes: float, clock: Callable[[], float] = time.time) -> "TimeBudget":
        return cls(clock() + 60.0 * minutes, clock)

    def remaining(self) -> float:
        """Seconds left (negative once past the deadline)."""
        return self.deadline - self.clock()

    @property
    def spent(self) -> bool:
        return self.remaining() <= 0

    def fits(self, seconds: float | None) -> bool:
        """Whether work expected to take `seconds` (None: unknown) ends in time."""
        left = self.remaining()
        return left > 0 and (seconds is None or seconds <= left)

    def epoch_fits(self, history: Iterable[dict]) -> bool:
        """Whether one more epoch of a run with this `history` ends in time."""
        return self.fits(epoch_estimate(self.measured, history))

    def record_epoch(self, seconds: float) -> None:
        self.measured.append(float(seconds))

    def ends_at(self) -> str:
        return datetime.fromtimestamp(self.deadline, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def epoch_estimate(measured: Iterable[float], history: Iterable[dict]) -> float | None:
    """Expected seconds of the next epoch: 1.1 x the fastest of the last five
    epochs in the run's history (+ the checkpoint write), else of the last
    five measured under this budget (a model not started yet: the other
    model's), else None (nothing known yet).

    The fastest, not the median: a pause (SIGSTOP), a kernel restart or other
    work beside the run only ever lengthens an epoch, and several disturbed
    epochs in a row must not hold back an epoch that fits; 10% for drift."""
    recorded = [float(h["seconds"]) + SAVE_MARGIN_S for h in history][-RECENT:]
    if recorded:
        return DRIFT * min(recorded)
    measured = list(measured)[-RECENT:]
    return DRIFT * min(measured) if measured else None
