"""The study's stages, in the order they run (see stages.base for the contract).

Adding a stage: write a module with a `Stage` subclass and add its instance to
STAGES (before the report, which renders every stage that ran).
"""
from .base import Stage
from .comparison import stage as comparison
from .explanations import stage as explanations
from .failures import stage as failures
from .report import stage as report
from .stress import stage as stress
from .training import stage as training

STAGES: list[Stage] = [training, failures, comparison, stress, explanations, report]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


__all__ = ["STAGES", "Stage", "get_stage"]
