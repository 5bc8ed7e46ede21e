"""cnnstress.arrays: the shared array converters."""
import numpy as np
import pytest
import torch

from cnnstress.arrays import as_int_vector, as_numpy


def test_as_numpy_accepts_tensors_arrays_and_lists():
    t = torch.arange(6.0, requires_grad=True).reshape(2, 3)
    np.testing.assert_array_equal(as_numpy(t), np.arange(6.0).reshape(2, 3))
    np.testing.assert_array_equal(as_numpy([1, 2]), np.array([1, 2]))


def test_as_int_vector_checks_shape_and_whole_numbers():
    out = as_int_vector(np.array([1.0, 2.0]), "labels")
    assert out.dtype == np.int64 and out.tolist() == [1, 2]
    assert as_int_vector(torch.tensor([3, 4], dtype=torch.int32), "x").dtype == np.int64
    with pytest.raises(ValueError, match="preds must be 1-D"):
        as_int_vector(np.zeros((2, 2)), "preds")
    with pytest.raises(ValueError, match="labels must hold integer class ids"):
        as_int_vector([0.5], "labels")
