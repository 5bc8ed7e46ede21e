"""Shared fixtures: tiny CIFAR-10 folders in the official python-pickle layout.

The tests never need the real dataset: each class gets its own colour and
stripe position plus noise, so a ResNet can learn something in one epoch.

The suite runs on every core with pytest-xdist (`-n auto` in pyproject.toml;
`-n 0` for one process). The session's folders (the tiny CIFAR-10, the trained
and the analysed smoke runs) are built once by whichever worker needs them
first and read by the others (`shared_folder`).
"""
from __future__ import annotations

import os
import pickle
from collections import Counter
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from cnnstress.data import BATCHES_DIR, CLASSES, TEST_FILE, TRAIN_FILES


def synthetic_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """uint8 (N, 3072) images whose content depends on the label."""
    n = labels.shape[0]
    img = rng.integers(0, 60, size=(n, 3, 32, 32)).astype(np.int16)
    for i, c in enumerate(labels):
        img[i, c % 3] += 120 + 10 * (c // 3)                 # dominant channel per class
        img[i, :, 3 * c:3 * c + 3, :] += 70                   # a horizontal stripe per class
    return np.clip(img, 0, 255).astype(np.uint8).reshape(n, -1)


def write_batch(path: Path, data: np.ndarray, labels, **extra) -> None:
    entry = {b"batch_label": b"fixture", b"labels": list(labels), b"data": data,
             b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))], **extra}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar(root: Path, per_batch: int = 60, n_test: int = 100, seed: int = 0) -> Path:
    """Write data_batch_1..5, test_batch and batches.meta under root/cifar-10-batches-py.
    Returns root (the --data-dir to pass)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / BATCHES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAIN_FILES:
        labels = np.arange(per_batch) % len(CLASSES)
        rng.shuffle(labels)
        write_batch(folder / name, synthetic_images(labels, rng), labels.tolist())
    labels = np.arange(n_test) % len(CLASSES)
    rng.shuffle(labels)
    write_batch(folder / TEST_FILE, synthetic_images(labels, rng), labels.tolist())
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES], b"num_cases_per_batch": per_batch}, f)
    return Path(root)


@pytest.fixture
def cifar_dir(tmp_path: Path) -> Path:
    """A fresh tiny CIFAR-10 folder (300 train, 100 test images)."""
    return write_cifar(tmp_path / "data")


def pytest_configure(config) -> None:
    # Each xdist worker gets its share of the cores: two workers with two
    # torch threads each would oversubscribe a 2-core machine, and OpenMP
    # threads that wait on a descheduled peer slow down badly.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        from cnnstress.runtime import usable_cpus
        threads = max(1, usable_cpus() // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)      # the notebook kernel and CLI subprocesses


def pytest_collection_modifyitems(config, items) -> None:
    # xdist hands out whole files (--dist loadfile) in this order: the files
    # with the most end-to-end (`slow`) tests go first, so the longest ones
    # (the notebook's, 50 s) start early instead of ending the run on one
    # worker while the other waits. A stable sort: pytest-randomly has
    # shuffled the files already (its hook runs before this one), and the
    # order within each group stays its order.
    slow = Counter(item.path for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: -slow[item.path])


def shared_folder(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A session folder built once for all xdist workers: the first worker to
    ask builds it under a file lock, the others wait and read it. `build`
    fills the folder it is given; a marker file says it finished."""
    from filelock import FileLock

    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        folder = tmp_path_factory.mktemp(name)
        build(folder)
        return folder
    root = tmp_path_factory.getbasetemp().parent          # shared by the workers of this run
    folder, done = root / name, root / f"{name}.done"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            if folder.exists():                           # a worker failed half-way: start again
                import shutil
                shutil.rmtree(folder)
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def shared_cifar_dir(tmp_path_factory) -> Path:
    """A tiny CIFAR-10 folder shared by tests that only read it."""
    return shared_folder(tmp_path_factory, "cifar", lambda folder: write_cifar(folder / "data")) / "data"


def tiny_training_config(**kw):
    """The smoke profile cut to 128 training images in fp32: an epoch takes a
    second or two on a 2-core CPU (training-loop tests)."""
    from cnnstress.config import get_config
    base = dict(val_size=50, train_subset=128, device="cpu", batch_size=32, epochs=2, precision="fp32")
    base.update(kw)
    return get_config("smoke", **base)


@pytest.fixture(scope="session")
def tiny_splits(shared_cifar_dir):
    """The splits of `shared_cifar_dir` under tiny_training_config."""
    from cnnstress.data import load_splits
    return load_splits(shared_cifar_dir, tiny_training_config(), download=False)


@pytest.fixture(scope="session")
def two_epoch_runs(tiny_splits, tmp_path_factory):
    """For each preset, the tiny 2-epoch run trained whole and the same run
    stopped after epoch 1, checkpoints kept: the references the resume tests
    share (trained once for all workers; each reads the models back from the
    checkpoints). Read only: a test copies the checkpoint it resumes or edits."""
    from types import SimpleNamespace

    from cnnstress.checkpoint import read_checkpoint
    from cnnstress.model import resnet18_for
    from cnnstress.train import fit

    def build(root: Path) -> None:
        for augment in ("baseline", "enhanced"):
            cfg = tiny_training_config(epochs=2, augment=augment)
            fit(cfg, tiny_splits, checkpoint_path=root / f"{augment}-whole.pt", log=None)
            fit(cfg, tiny_splits, checkpoint_path=root / f"{augment}-part.pt", log=None, stop_after_epoch=1)

    def trained(path: Path) -> SimpleNamespace:
        ckpt = read_checkpoint(path)
        model = resnet18_for(tiny_training_config())
        model.load_state_dict(ckpt["model"])
        return SimpleNamespace(model=model, history=ckpt["history"])

    root = shared_folder(tmp_path_factory, "two_epoch_runs", build)
    return {augment: SimpleNamespace(cfg=tiny_training_config(epochs=2, augment=augment),
                                     whole=trained(root / f"{augment}-whole.pt"),
                                     part=trained(root / f"{augment}-part.pt"),
                                     whole_path=root / f"{augment}-whole.pt", part_path=root / f"{augment}-part.pt")
            for augment in ("baseline", "enhanced")}


def weights_equal(a, b) -> bool:
    """Two models hold bit-identical parameters and buffers."""
    import torch
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def strip_time(history):
    """A training history without its wall times (the only field that differs between identical runs)."""
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


def cli(command: str, data_dir: Path, out_dir: Path, *extra: str) -> list[str]:
    """Arguments for `python -m cnnstress <command>` in the smoke profile on the CPU, quiet."""
    return [command, "--profile", "smoke", "--device", "cpu", "--no-progress",
            "--data-dir", str(data_dir), "--out-dir", str(out_dir), *extra]


def copy_run(source: Path, dest: Path) -> Path:
    """A private copy of a run folder (copytree keeps the file times, so the
    checkpoint stamps in the caches still match and nothing is recomputed)."""
    import shutil
    shutil.copytree(source, dest)
    return dest


@pytest.fixture(scope="session")
def trained_run(shared_cifar_dir, tmp_path_factory) -> Path:
    """`python -m cnnstress run --no-stress --no-explain` in the smoke profile:
    both models trained once for the whole session, their failures, comparison,
    report and figures. Read only: a test that writes takes `trained_copy`."""
    from cnnstress.__main__ import main

    def build(out: Path) -> None:
        assert main(cli("run", shared_cifar_dir, out, "--no-stress", "--no-explain")) == 0
    return shared_folder(tmp_path_factory, "trained_run", build)


@pytest.fixture
def trained_copy(trained_run, tmp_path) -> Path:
    """A private copy of `trained_run` for a test that writes into it."""
    return copy_run(trained_run, tmp_path / "trained_copy")


@pytest.fixture(scope="session")
def analysed_run(trained_run, shared_cifar_dir, tmp_path_factory) -> Path:
    """`python -m cnnstress run` with every stage (stress and explanations
    included) on the session's trained pair, shared by the stage tests. Read
    only: a test that writes takes `analysed_copy`."""
    from cnnstress.__main__ import main

    def build(folder: Path) -> None:
        out = copy_run(trained_run, folder / "run")
        assert main(cli("run", shared_cifar_dir, out)) == 0
    return shared_folder(tmp_path_factory, "analysed_run", build) / "run"


@pytest.fixture
def analysed_copy(analysed_run, tmp_path) -> Path:
    """A private copy of `analysed_run` for a test that writes into it, so that
    test order never decides what later tests see."""
    return copy_run(analysed_run, tmp_path / "analysed_copy")
