"""--time-budget: training stops after the last epoch that fits, checkpoint
saved, and the same command continues bit-identically."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cnnstress.__main__ import main
from cnnstress.budget import TimeBudget, TimeBudgetReached, epoch_estimate, parse_time_budget
from cnnstress.checkpoint import read_checkpoint
from cnnstress.config import get_config
from cnnstress.data import load_splits
from cnnstress.errors import CnnstressError
from cnnstress.pipeline import run_pipeline
from cnnstress.train import fit

from conftest import cli, strip_time, tiny_training_config, weights_equal


def _config(**kw):
    return tiny_training_config(**{"epochs": 3, **kw})


NOW = datetime(2026, 12, 6, 1, 53, 44, tzinfo=timezone.utc)


class SteppedClock:
    """A clock that reads `times` in turn, then stays at the last one."""

    def __init__(self, *times: float):
        self.times = list(times)
        self.calls = 0

    def __call__(self) -> float:
        self.calls += 1
        return self.times.pop(0) if len(self.times) > 1 else self.times[0]


@pytest.fixture(scope="module")
def splits(shared_cifar_dir):
    return load_splits(shared_cifar_dir, _config(), download=False)


# --- parsing ------------------------------------------------------------------
def test_minutes_are_counted_from_now():
    assert parse_time_budget("90", now=NOW) == NOW.timestamp() + 5400
    assert parse_time_budget("0.5", now=NOW) == NOW.timestamp() + 30
    assert parse_time_budget("0", now=NOW) == NOW.timestamp()


def test_a_clock_time_is_its_next_occurrence():
    local = NOW.astimezone()
    later = (local + timedelta(minutes=10)).replace(second=0, microsecond=0)
    assert parse_time_budget(later.strftime("%H:%M"), now=local) == later.timestamp()
    earlier = (local - timedelta(minutes=10)).replace(second=0, microsecond=0)
    assert parse_time_budget(earlier.strftime("%H:%M"), now=local) == (earlier + timedelta(days=1)).timestamp()


def test_iso_end_times_with_and_without_zone():
    assert parse_time_budget("2026-12-06T04:43Z", now=NOW) == datetime(2026, 12, 6, 4, 43, tzinfo=timezone.utc).timestamp()
    assert parse_time_budget("2026-12-06T05:43+01:00", now=NOW) == datetime(2026, 12, 6, 4, 43,
                                                                            tzinfo=timezone.utc).timestamp()
    naive = datetime(2026, 12, 6, 4, 43)
    assert parse_time_budget("2026-12-06T04:43", now=NOW) == naive.astimezone().timestamp()


@pytest.mark.parametrize("text, words", [("-5", "non-negative"), ("nan", "non-negative"), ("inf", "non-negative"),
                                         ("25:00", "not a clock time"), ("soon", "neither")])
def test_bad_budgets_are_refused_in_one_line(text, words):
    with pytest.raises(CnnstressError, match=words) as info:
        parse_time_budget(text, now=NOW)
    assert "\n" not in str(info.value)


def test_epoch_estimate_is_the_fastest_recent_epoch_plus_a_tenth():
    # what this session's run saw: quiet epochs, then three lengthened by pauses and a test suite beside it
    history = [{"seconds": s} for s in (443.3, 442.6, 433.3, 509.6, 3225.5, 2459.8, 1990.0)]
    assert epoch_estimate([], history) == pytest.approx(1.1 * (433.3 + 5.0))   # the last five; + the write
    assert epoch_estimate([], history[-3:]) == pytest.approx(1.1 * (1990.0 + 5.0))
    # a model not started yet: the epochs measured under the budget (the other model's)
    assert epoch_estimate([460.0, 2000.0, 470.0], []) == pytest.approx(1.1 * 460.0)
    assert epoch_estimate([], []) is None


def test_fits_needs_time_left_and_room_for_the_estimate():
    budget = TimeBudget(deadline=100.0, clock=lambda: 40.0)
    assert budget.remaining() == 60.0 and not budget.spent
    assert budget.fits(None) and budget.fits(60.0) and not budget.fits(60.5)
    spent = TimeBudget(deadline=100.0, clock=lambda: 100.0)
    assert spent.spent and not spent.fits(None) and not spent.fits(0.0)


# --- training under a budget ---------------------------------------------------
def test_a_budget_of_zero_trains_nothing_and_writes_no_checkpoint(splits, tmp_path):
    result = fit(_config(), splits, checkpoint_path=tmp_path / "c.pt", log=None,
                 budget=TimeBudget(deadline=10.0, clock=lambda: 10.0))
    assert result.budget_stopped and result.epochs_done == 0
    assert not (tmp_path / "c.pt").exists()


def test_a_budget_of_one_epoch_stops_there_and_resumes_bit_identically(splits, two_epoch_runs, tmp_path):
    # Epoch 1 is not a regular checkpoint: the stop must still save it. The uninterrupted reference is the
    # shared 2-epoch run, which checkpointed every epoch: how often it saves does not change the training.
    cfg = two_epoch_runs["baseline"].cfg.replace(checkpoint_every=2)
    whole = two_epoch_runs["baseline"].whole
    # The first epoch has no estimate and starts; before the second, 1 ms is left: less than any epoch.
    clock = SteppedClock(0.0, 49.999)
    part = fit(cfg, splits, checkpoint_path=tmp_path / "part.pt", log=None, budget=TimeBudget(50.0, clock))
    assert part.budget_stopped and part.epochs_done == 1 and clock.calls == 2
    ckpt = read_checkpoint(tmp_path / "part.pt")
    assert ckpt["epoch"] == 1 and not ckpt["finished"]
    resumed = fit(cfg, splits, checkpoint_path=tmp_path / "part.pt", resume=True, log=None)
    assert resumed.resumed_from_epoch == 1 and not resumed.budget_stopped
    assert weights_equal(whole.model, resumed.model)
    assert strip_time(whole.history) == strip_time(resumed.history)


def test_a_budget_that_fits_every_epoch_trains_them_all(splits, tmp_path):
    budget = TimeBudget.minutes(60)
    result = fit(_config(epochs=2), splits, checkpoint_path=tmp_path / "c.pt", log=None, budget=budget)
    assert not result.budget_stopped and result.epochs_done == 2
    assert read_checkpoint(tmp_path / "c.pt")["finished"]
    assert len(budget.measured) == 2 and all(s > 0 for s in budget.measured)


def test_the_estimate_from_a_resumed_history_keeps_a_long_epoch_from_starting(splits, two_epoch_runs, tmp_path):
    import shutil
    cfg = two_epoch_runs["baseline"].cfg
    shutil.copyfile(two_epoch_runs["baseline"].part_path, tmp_path / "c.pt")
    # The checkpoint's epoch took well over a millisecond: with 1 ms left, no epoch starts.
    result = fit(cfg, splits, checkpoint_path=tmp_path / "c.pt", resume=True, log=None,
                 budget=TimeBudget(deadline=1.001, clock=lambda: 1.0))
    assert result.budget_stopped and result.epochs_done == 1


# --- the pipeline and the command line -----------------------------------------
def test_run_stops_before_the_analysis_when_the_budget_is_spent(shared_cifar_dir, tmp_path):
    cfg = get_config("smoke", device="cpu")
    # Each model's single epoch checks the clock once (time left); then the budget is spent.
    budget = TimeBudget(100.0, SteppedClock(0.0, 0.0, 1000.0))
    with pytest.raises(TimeBudgetReached, match="after the training stage; failures, .*report not run yet"):
        run_pipeline(cfg, shared_cifar_dir, tmp_path / "out", log=None, progress=False, time_budget=budget)
    for name in ("baseline", "improved"):
        assert read_checkpoint(tmp_path / "out" / name / "checkpoint.pt")["finished"]
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_cli_budget_zero_then_the_same_command_continues(shared_cifar_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = cli("train", shared_cifar_dir, out, "--time-budget", "0")
    assert main(args) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert "time budget reached" in said and "baseline 0/1 epochs" in said
    assert said.endswith("the same command continues: python -m cnnstress " + " ".join(args))
    assert not (out / "baseline" / "checkpoint.pt").exists()
    args[-1] = "30"
    assert main(args) == 0   # without --resume: a budgeted train resumes by itself
    assert "test accuracy" in capsys.readouterr().out
    assert read_checkpoint(out / "baseline" / "checkpoint.pt")["finished"]


def test_cli_run_with_budget_zero_names_both_models(shared_cifar_dir, tmp_path, capsys):
    assert main(cli("run", shared_cifar_dir, tmp_path / "out", "--time-budget", "0", "--force")) == 0
    said = capsys.readouterr().out.strip().splitlines()[-1]
    assert "baseline 0/1 epochs, improved 0/1 epochs, checkpoints saved" in said
    assert "--force" not in said.split("continues:")[1]   # continuing must not start over


@pytest.mark.parametrize("value", ["soon", "-3", "24:30"])
def test_cli_bad_budget_is_one_line_exit_2(shared_cifar_dir, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as info:
        main(cli("run", shared_cifar_dir, tmp_path / "out", "--time-budget", value))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--time-budget" in err
    assert not (tmp_path / "out").exists()
