"""The study's stages, in the order they run (see stages.base for the contract).

Adding a stage: write a module with a `Stage` subclass and add its instance to
STAGES (before the report, which renders every stage that ran).
"""
from . import comparison, explanations, failures, label_review, report, stress, training
from .base import Stage

STAGES: list[Stage] = [training.stage, failures.stage, comparison.stage, stress.stage, explanations.stage,
                       label_review.stage, report.stage]


def get_stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise KeyError(f"no stage {name!r}; the stages are {', '.join(s.name for s in STAGES)}")


__all__ = ["STAGES", "Stage", "get_stage"]
