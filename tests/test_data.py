import pickle

import numpy as np
import pytest
import torch

from cnnstress.config import get_config
from cnnstress.data import (BATCHES_DIR, load_cifar10, load_splits, read_batch, stratified_split)
from cnnstress.errors import DataError

from conftest import write_batch


def test_reads_fixture_in_official_layout(shared_cifar_dir):
    (train_x, train_y), (test_x, test_y) = load_cifar10(shared_cifar_dir, download=False)
    assert train_x.shape == (300, 3, 32, 32) and train_x.dtype == torch.uint8
    assert train_y.dtype == torch.int64 and int(train_y.max()) <= 9
    assert test_x.shape == (100, 3, 32, 32)


def test_stratified_split_is_proportional_seeded_and_disjoint():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    first, rest = stratified_split(labels, 20, seed=42)
    assert sorted(torch.bincount(labels[first]).tolist()) == [2, 6, 12]
    assert set(first.tolist()).isdisjoint(rest.tolist())
    assert len(first) + len(rest) == 100
    again, _ = stratified_split(labels, 20, seed=42)
    other, _ = stratified_split(labels, 20, seed=7)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_splits_follow_config(shared_cifar_dir):
    cfg = get_config("smoke", val_size=50, train_subset=100, test_subset=40)
    s = load_splits(shared_cifar_dir, cfg, download=False)
    assert (len(s.train), len(s.val), len(s.test)) == (100, 50, 40)
    assert set(s.train.indices.tolist()).isdisjoint(s.val.indices.tolist())
    # every class in validation, in proportion (300 images, 30 per class -> 5 each)
    assert torch.bincount(s.val.labels, minlength=10).tolist() == [5] * 10


def test_val_larger_than_training_set_is_a_clear_error(shared_cifar_dir):
    with pytest.raises(DataError, match="val_size"):
        load_splits(shared_cifar_dir, get_config("smoke", val_size=5000), download=False)


def test_missing_data_without_network_names_the_folder(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise OSError("network unreachable")
    monkeypatch.setattr(tvu, "download_and_extract_archive", offline)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path / "nowhere")
    msg = str(err.value)
    assert "download failed" in msg and str(tmp_path / "nowhere" / BATCHES_DIR) in msg
    assert "\n" not in msg


def test_truncated_batch_names_the_file(cifar_dir):
    path = cifar_dir / BATCHES_DIR / "data_batch_3"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_3.*truncated"):
        load_cifar10(cifar_dir, download=False)


def test_non_cifar_pickle_is_rejected(tmp_path):
    path = tmp_path / "data_batch_1"
    with open(path, "wb") as f:
        pickle.dump({"weights": [1, 2, 3]}, f)
    with pytest.raises(DataError, match="data_batch_1.*not a CIFAR-10 batch"):
        read_batch(path)


@pytest.mark.parametrize("data, labels, match", [
    (np.zeros((4, 3072), np.uint8), [0, 1, 2, 10], "label 10 out of range"),
    (np.zeros((4, 3072), np.uint8), [0, 1, -1, 2], "label -1 out of range"),
    (np.zeros((4, 1000), np.uint8), [0, 1, 2, 3], r"shape \(4, 1000\)"),
    (np.zeros((4, 3072), np.float32), [0, 1, 2, 3], "dtype float32"),
    (np.zeros((4, 3072), np.uint8), [0, 1, 2], "3 labels for 4 images"),
])
def test_bad_batch_contents(tmp_path, data, labels, match):
    path = tmp_path / "test_batch"
    write_batch(path, data, labels)
    with pytest.raises(DataError, match=match):
        read_batch(path)


class _RunsCode:
    """Unpickling this calls `func(*args)`: how a crafted pickle runs code."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["open", "system"])
def test_batch_that_would_run_code_is_refused_and_runs_nothing(tmp_path, payload):
    import os
    marker = tmp_path / "marker"
    call = (open, (str(marker), "w")) if payload == "open" else (os.system, (f"touch {marker}",))
    path = tmp_path / "data_batch_1"
    write_batch(path, np.zeros((2, 3072), np.uint8), [0, 1], extra=_RunsCode(*call))
    # the payload is live: a plain unpickler runs it
    with open(path, "rb") as f:
        pickle.load(f, encoding="bytes")
    assert marker.exists()
    marker.unlink()
    with pytest.raises(DataError) as err:
        read_batch(path)
    msg = str(err.value)
    assert "\n" not in msg and "data_batch_1" in msg and "refused" in msg and "fresh copy" in msg
    assert not marker.exists()


@pytest.mark.parametrize("protocol, numpy_module", [(2, "numpy.core"), (2, "numpy._core"),
                                                    (4, "numpy._core"), (5, "numpy._core")])
def test_batches_pickled_by_numpy_1_and_2_are_read(tmp_path, protocol, numpy_module):
    """The official files (protocol 2) name numpy 1's module numpy.core.multiarray;
    files written with numpy 2 name numpy._core; protocol 5 uses _frombuffer."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(5, 3072)).astype(np.uint8)
    blob = pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3, 9], b"batch_label": b"x"}, protocol=protocol)
    other = "numpy._core" if numpy_module == "numpy.core" else "numpy.core"
    if protocol == 2:  # GLOBAL names are newline-terminated text: rename numpy's module as the other version does
        blob = blob.replace(f"c{other}.multiarray\n".encode(), f"c{numpy_module}.multiarray\n".encode())
    assert numpy_module.encode() in blob
    path = tmp_path / "data_batch_1"
    path.write_bytes(blob)
    images, labels = read_batch(path)
    np.testing.assert_array_equal(images.reshape(5, -1), data)
    np.testing.assert_array_equal(labels, [0, 1, 2, 3, 9])


def test_sample_positions_stratified_and_all():
    from cnnstress.data import sample_positions
    labels = torch.arange(100) % 10
    pos = sample_positions(labels, 30, seed=1)
    assert pos.numel() == 30 and torch.equal(pos, pos.sort().values)
    assert torch.bincount(labels[pos], minlength=10).tolist() == [3] * 10
    assert torch.equal(sample_positions(labels, None, 1), torch.arange(100))
    assert torch.equal(sample_positions(labels, 500, 1), torch.arange(100))
    assert torch.equal(pos, sample_positions(labels, 30, seed=1))
