"""The pipeline: the stages in order (cnnstress.stages.STAGES), run on one Study.

Each stage reads what earlier runs left under the output folder when it
matches the config, so any stage can be rerun on its own without retraining
(see cnnstress.study for the object the notebook drives, and
cnnstress.stages.base for what a stage provides).
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from .budget import TimeBudgetReached
from .config import Config, default_profile  # noqa: F401  (the CLI's defaults)
from .io import default_data_dir, default_out_dir  # noqa: F401
from .lock import output_lock
from .registry import MODEL_OF_PRESET as RUN_NAMES  # noqa: F401  (augment preset -> model name, as before)
from .study import Study


@contextmanager
def _saving_config(study: Study) -> Iterator[None]:
    """Write config.json when the block ends (under the lock), if a model was
    trained or loaded with the config by then: a run refused before that (data,
    device, checkpoint) leaves the previous config.json, which matches metrics.json."""
    try:
        yield
    finally:
        if study.trained:
            study.save_config()


def run_study(study: Study, *, only: str | None = None, force_only: bool = False) -> Study:
    """Run every stage in order. only="stress" or "explanations" (the
    commands of those names) runs that stage, recomputed when force_only, and
    includes the other analysis stage only from its cache. Each stage is
    timed (cnnstress.runlog); the report stage writes run_log.json."""
    analyses = [s.name for s in study.stage_list if s.analysis]
    if only is not None and only not in analyses:
        raise ValueError(f"only must be one of {', '.join(analyses)} or None, got {only!r}")
    study.timer.restart()
    study.splits  # noqa: B018  (load, check and log the data first: bad data leaves the output folder alone)
    with output_lock(study.out, log=study.log), _saving_config(study):
        done = None
        for stage in study.stage_list:
            if stage.name != only and not stage.enabled(study):
                continue
            if study.budget is not None and done is not None and study.budget.spent:
                left = [s.name for s in study.stage_list[study.stage_list.index(stage):] if s.enabled(study)]
                raise TimeBudgetReached(f"time budget reached ({study.budget.ends_at()}) after the {done} stage; "
                                        f"{', '.join(left)} not run yet (finished stages are cached)")
            kwargs = {}
            if stage.analysis:
                study.say(f"== {stage.banner or stage.title} ==")
                kwargs["cached_only"] = only is not None and stage.name != only
            force = study.force or (stage.name == only and force_only)
            result = stage.run(study, force=force, **kwargs)
            if result is None:  # an analysis stage with nothing cached
                study.results.pop(stage.name, None)
                study.skipped.add(stage.name)
                continue
            study.results[stage.name] = result
            done = stage.name
            line = stage.summary(study, result)
            if line:
                study.say(line)
    return study


def run_pipeline(config: Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
                 force: bool = False, train: bool = True, focus: str | None = None, force_focus: bool = False,
                 weights: str | Path | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = print, timer=None, time_budget=None) -> Study:
    """The whole study in one call (what `python -m cnnstress run` does):
    a Study of `config` run through every stage. train=False never trains;
    weights=DIR analyses the models published in DIR. focus: "stress" or
    "explain"/"explanations" (see run_study's `only`). time_budget: see Study."""
    from .runlog import StageTimer
    study = Study(config=config, data_dir=data_dir, out_dir=out_dir, weights=weights, train=train, force=force,
                  progress=progress, log=log, timer=timer if timer is not None else StageTimer(log=log),
                  time_budget=time_budget)
    only = {"explain": "explanations"}.get(focus, focus)
    return run_study(study, only=only, force_only=force_focus)
