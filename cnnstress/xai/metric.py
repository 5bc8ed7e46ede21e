"""The contract every explanation metric follows: it takes the explanation
method as a callable (as captum's `sensitivity_max(explanation_func, ...)`
and Quantus' `Metric(explain_func=..., similarity_func=...)`) and declares in
code which way its score is better (Quantus' `score_direction`).

    explain_func(model, x, targets) -> maps
        model:   the classifier (logits (B,C) for inputs (B,3,H,W));
        x:       float (N,3,H,W) normalised images;
        targets: int64 (N,) the classes to explain;
        maps:    (N,H,W) importance per pixel, e.g. on [0, 1]; any real scale
                 where a metric only uses the order.

    similarity_func(a, b) -> float
        two maps of one shape -> one similarity (higher = more alike).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import numpy as np
import torch
from torch import nn

__all__ = ["ExplainFunc", "Metric", "SimilarityFunc", "direction_word"]

ExplainFunc = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
SimilarityFunc = Callable[[np.ndarray, np.ndarray], float]


class Metric:
    """Base of the explanation metrics. A subclass sets `name` and
    `higher_is_better` (the direction of its score: True = a higher score
    means a better explanation) and implements __call__."""
    name: ClassVar[str]
    higher_is_better: ClassVar[bool]

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, **kwargs: Any) -> Any:
        raise NotImplementedError

    @classmethod
    def better(cls, a: float, b: float) -> bool:
        """True when score `a` is strictly better than score `b` by this metric's direction."""
        return a > b if cls.higher_is_better else a < b


def direction_word(higher_is_better: bool) -> str:
    """'higher is better' / 'lower is better', for reports and figure labels."""
    return "higher is better" if higher_is_better else "lower is better"
