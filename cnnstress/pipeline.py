"""The pipeline: one call that builds a Study and runs every stage on it
(Study.run walks cnnstress.stages.STAGES: the one run loop).

Each stage reads what earlier runs left under the output folder when it
matches the config, so any stage can be rerun on its own without retraining
(see cnnstress.study for the object the notebook drives, and
cnnstress.stages.base for what a stage provides).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from .config import Config, default_profile  # noqa: F401  (the CLI's defaults)
from .io import default_data_dir, default_out_dir  # noqa: F401
from .registry import MODEL_OF_PRESET as RUN_NAMES  # noqa: F401  (augment preset -> model name, as before)
from .study import Study


def run_pipeline(config: Config, data_dir: str | Path | None = None, out_dir: str | Path | None = None, *,
                 force: bool = False, train: bool = True, focus: str | None = None, force_focus: bool = False,
                 weights: str | Path | None = None, progress: bool | None = None,
                 log: Callable[[str], None] | None = print, timer=None, time_budget=None) -> Study:
    """The whole study in one call (what `python -m cnnstress run` does):
    a Study of `config` run through every stage. train=False never trains;
    weights=DIR analyses the models published in DIR. focus: "stress" or
    "explain"/"explanations" (see Study.run's `only`). time_budget: see Study."""
    from .runlog import StageTimer
    study = Study(config=config, data_dir=data_dir, out_dir=out_dir, weights=weights, train=train, force=force,
                  progress=progress, log=log, timer=timer if timer is not None else StageTimer(log=log),
                  time_budget=time_budget)
    only = {"explain": "explanations"}.get(focus, focus)
    return study.run(only=only, force_only=force_focus)
