"""Array converters shared by the metric modules: anything array-like (torch
tensor on any device, numpy array, sequence) to a CPU numpy array."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch


def as_numpy(x: Any) -> np.ndarray:
    """A CPU numpy view/copy of a torch tensor, numpy array or sequence."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def as_int_vector(x: Any, name: str) -> np.ndarray:
    """`x` as int64 (N,); ValueError naming `name` unless it is 1-D and holds
    whole numbers."""
    arr = as_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError(f"{name} must hold integer class ids")
    return arr.astype(np.int64, copy=False)
