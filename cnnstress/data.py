"""CIFAR-10: find or download, read and validate, split.

Images are held as uint8 tensors in NCHW layout (N, 3, 32, 32), values 0..255;
labels as int64 (N,). Normalisation happens on the training device, batch by
batch (see cnnstress.augment), so the same uint8 tensors serve every model.
"""
from __future__ import annotations

import codecs
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DataError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = len(CLASSES)
IMAGE_SHAPE = (3, 32, 32)
# Per-channel statistics of the CIFAR-10 training set (RGB, on [0, 1]).
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)

BATCHES_DIR = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
# The official archive and the MD5 of the archive itself (not of the files in
# it: a local copy of the batches may legitimately differ).
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"


@dataclass(frozen=True)
class Split:
    """One split: images uint8 (N,3,32,32), labels int64 (N,), and their
    positions in the official file order (for tracing an image back)."""
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class CifarSplits:
    train: Split
    val: Split
    test: Split

    def counts(self) -> "SplitCounts":
        """Images per split and per class."""
        return SplitCounts({name: torch.bincount(getattr(self, name).labels, minlength=NUM_CLASSES).tolist()
                            for name in ("train", "val", "test")})


@dataclass
class SplitCounts:
    """Images per class of each split ({split: [count per class]}); a notebook
    shows it as a table. `figure`: a grid of sample images, when one was drawn."""
    per_class: dict[str, list[int]]
    figure: Any = None

    def __str__(self) -> str:
        return "\n".join(f"{name:>5}: {sum(c):>6,} images, per class {c}" for name, c in self.per_class.items())

    def _repr_markdown_(self) -> str:
        head = "| split | images | " + " | ".join(CLASSES) + " |\n|---|" + "---|" * (NUM_CLASSES + 1) + "\n"
        return head + "\n".join(f"| {name} | {sum(c):,} | " + " | ".join(f"{v:,}" for v in c) + " |"
                                 for name, c in self.per_class.items())


def _batches_dir(data_dir: str | Path) -> Path:
    return Path(data_dir) / BATCHES_DIR


def ensure_cifar10(data_dir: str | Path, download: bool = True) -> Path:
    """Return the folder holding the python-format batches, downloading the
    official archive into `data_dir` when they are missing."""
    folder = _batches_dir(data_dir)
    where = f"put the python-version batches in {folder}/ (data_batch_1..5, test_batch)"
    # Something that is there but not a plain file (a device, a FIFO, a folder, a link to
    # one) is not downloaded over, nor opened: reading a FIFO or /dev/zero never ends.
    for path in [Path(data_dir), folder]:
        if path.exists() and not path.is_dir():
            raise DataError(f"{path} is not a folder; {where}")
    odd = [folder / f for f in TRAIN_FILES + (TEST_FILE,) if (folder / f).exists() and not (folder / f).is_file()]
    if odd:
        raise DataError(f"{odd[0]} is not a regular file (a folder, device or pipe); replace it: {where}")
    missing = [f for f in TRAIN_FILES + (TEST_FILE,) if not (folder / f).is_file()]
    if not missing:
        return folder
    if not download:
        raise DataError(f"CIFAR-10 not found: {folder / missing[0]} is missing; {where}")
    made = [p for p in [Path(data_dir), *Path(data_dir).parents] if not os.path.lexists(p)]
    try:
        from torchvision.datasets.utils import download_and_extract_archive
        download_and_extract_archive(ARCHIVE_URL, download_root=str(data_dir), md5=ARCHIVE_MD5)
    except Exception as exc:  # any network or checksum failure ends the same way
        for path in made:   # the folders the download made, left empty: a refused run leaves nothing
            try:
                path.rmdir()
            except OSError:
                break
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"CIFAR-10 not found in {folder} and the download failed ({reason}); {where}") from None
    still = [f for f in TRAIN_FILES + (TEST_FILE,) if not (folder / f).is_file()]
    if still:
        raise DataError(f"downloaded archive lacks {still[0]}; {where}")
    return folder


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle referring to something outside the allow-list (its message: module.name)."""


def _empty_bytes() -> bytes:
    """bytes() as protocol-2 pickles spell an empty bytes object (__builtin__.bytes
    called with no arguments); any argument, e.g. a size to allocate, is refused."""
    return b""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """_codecs.encode as Python 3's protocol-2 pickles use it for bytes, latin-1 only."""
    if encoding not in ("latin1", "latin-1"):
        raise _ForbiddenGlobal(f"_codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_globals() -> dict[tuple[str, str], object]:
    """What pickled numpy arrays need: the reconstructor (numpy 1 and 2 module
    names, as the official files and numpy 2 writers name it), ndarray, dtype
    and protocol 5's buffer constructor."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric
    found = {}
    for module in ("numpy.core", "numpy._core"):
        found[(f"{module}.multiarray", "_reconstruct")] = multiarray._reconstruct
        found[(f"{module}.numeric", "_frombuffer")] = numeric._frombuffer
    found[("numpy", "ndarray")] = np.ndarray
    found[("numpy", "dtype")] = np.dtype
    found[("_codecs", "encode")] = _latin1_encode
    found[("__builtin__", "bytes")] = found[("builtins", "bytes")] = _empty_bytes
    return found


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR-10 python batch contains (dicts, lists,
    bytes/str, numbers, numpy arrays): any other global, which is how a pickle
    runs code, is refused before anything is called."""

    def find_class(self, module: str, name: str):
        allowed = _numpy_globals()
        if (module, name) not in allowed:
            raise _ForbiddenGlobal(f"{module}.{name}")
        return allowed[(module, name)]


# An official batch is 31 MB (10,000 images of 3,072 bytes, labels, file names).
# A file far beyond that is not one, and is refused before it is read: a
# crafted pickle can declare gigabytes.
MAX_BATCH_BYTES = 64 * 2**20


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one python-format batch: images uint8 (N,3,32,32), labels int64 (N,).

    Raises DataError naming the file for anything that is not a CIFAR-10 batch.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; put the CIFAR-10 python batches there")
    fix = "replace it with a fresh copy"
    try:
        size = path.stat().st_size
        if size > MAX_BATCH_BYTES:
            raise DataError(f"{path}: {size / 2**20:.0f} MB, far more than a CIFAR-10 batch (31 MB); refused "
                            f"unread: {fix}")
        with open(path, "rb") as f:
            raw = f.read(MAX_BATCH_BYTES + 1)   # bounded even if the file grows meanwhile
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror or exc}); {fix}") from None
    if len(raw) > MAX_BATCH_BYTES:
        raise DataError(f"{path}: more than {MAX_BATCH_BYTES >> 20} MB, not a CIFAR-10 batch; refused: {fix}")
    try:
        # From memory: an object declared larger than the file fails at the file's end
        # instead of being read from disk (or a device) into memory first.
        entry = _BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except _ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused to read, the file asks to run {exc} (a CIFAR-10 batch holds only "
                        f"dicts, lists, bytes and numpy arrays): {fix}") from None
    except MemoryError:
        raise DataError(f"{path}: declares an object larger than memory; not a CIFAR-10 batch: {fix}") from None
    except Exception as exc:
        raise DataError(f"{path}: cannot be unpickled ({type(exc).__name__}); the file is truncated "
                        f"or not a CIFAR-10 batch: {fix}") from None
    if not isinstance(entry, dict):
        raise DataError(f"{path}: not a CIFAR-10 batch (holds {type(entry).__name__}, expected a dict)")
    data = entry.get(b"data", entry.get("data"))
    labels = entry.get(b"labels", entry.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: not a CIFAR-10 batch (no 'data'/'labels' entries); replace it")
    if not isinstance(data, np.ndarray):   # a list could expand (repeated references) far beyond the file
        raise DataError(f"{path}: image data is a {type(data).__name__}, expected a uint8 numpy array; {fix}")
    if data.dtype != np.uint8:
        raise DataError(f"{path}: image data has dtype {data.dtype}, expected uint8")
    if data.ndim != 2 or data.shape[1] != int(np.prod(IMAGE_SHAPE)):
        raise DataError(f"{path}: image data has shape {data.shape}, expected (N, 3072)")
    if data.shape[0] == 0:
        raise DataError(f"{path}: holds no images; a CIFAR-10 batch has 10,000: {fix}")
    labels = _labels(labels, path, fix)
    if labels.shape[0] != data.shape[0]:
        raise DataError(f"{path}: {labels.shape[0]} labels for {data.shape[0]} images")
    return data.reshape(-1, *IMAGE_SHAPE), labels


def _labels(raw, path: Path, fix: str) -> np.ndarray:
    """The labels as int64 (N,): whole numbers 0..9 only (a NaN, None, 3.7 or
    -0.5 is refused, never truncated to a class)."""
    if isinstance(raw, np.ndarray):
        if raw.ndim != 1 or raw.dtype.kind not in "iu":
            raise DataError(f"{path}: labels are a {raw.dtype} array of shape {raw.shape}, expected whole "
                            f"numbers (N,); {fix}")
        values = raw
    elif isinstance(raw, list):
        odd = next((i for i, v in enumerate(raw) if isinstance(v, bool) or not isinstance(v, (int, np.integer))),
                   None)
        if odd is not None:
            # repr only of scalars: a crafted label may be a list nested too deep to print
            shown = repr(raw[odd]) if raw[odd] is None or isinstance(raw[odd], (bool, float)) else \
                f"of type {type(raw[odd]).__name__}"
            raise DataError(f"{path}: label {shown} at position {odd} is not a class number 0..{NUM_CLASSES - 1}; "
                            f"the file is not CIFAR-10: {fix}")
        values = raw
    else:
        raise DataError(f"{path}: labels are a {type(raw).__name__}, expected a list of class numbers; {fix}")
    bad = [v for v in values if not 0 <= v < NUM_CLASSES]   # Python ints: no overflow before the check
    if bad:
        raise DataError(f"{path}: label {int(bad[0])} out of range 0..{NUM_CLASSES - 1} "
                        f"({len(bad)} bad labels); the file is not CIFAR-10")
    return np.asarray(values, dtype=np.int64)


def load_cifar10(data_dir: str | Path, download: bool = True
                 ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """((train_images, train_labels), (test_images, test_labels)) as tensors,
    the official split, in file order."""
    folder = ensure_cifar10(data_dir, download=download)
    parts = [read_batch(folder / name) for name in TRAIN_FILES]
    train_x = np.concatenate([p[0] for p in parts])
    train_y = np.concatenate([p[1] for p in parts])
    test_x, test_y = read_batch(folder / TEST_FILE)
    return ((torch.from_numpy(train_x), torch.from_numpy(train_y)),
            (torch.from_numpy(test_x), torch.from_numpy(test_y)))


def stratified_split(labels: torch.Tensor, first_size: int, seed: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Split positions 0..N-1 into (first, rest) with `first_size` items in
    `first`, each class in proportion to its share (largest remainders), drawn
    with a generator seeded by `seed`. Both index tensors are sorted."""
    n = int(labels.shape[0])
    if not 0 < first_size < n:
        raise DataError(f"cannot take {first_size} of {n} images (need 0 < size < {n}); "
                        "lower val_size/train_subset or use more data")
    gen = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * first_size / n
    take = exact.floor().long()
    # Hand out the remaining slots to the largest fractional parts (ties: lower class).
    short = first_size - int(take.sum())
    order = torch.argsort(exact - take.double(), descending=True, stable=True)
    take[order[:short]] += 1
    first, rest = [], []
    for cls, k in zip(classes.tolist(), take.tolist()):
        members = torch.nonzero(labels == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        first.append(members[:k])
        rest.append(members[k:])
    return torch.cat(first).sort().values, torch.cat(rest).sort().values


def make_splits(train: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor],
                *, val_size: int, seed: int, train_subset: int | None = None,
                test_subset: int | None = None) -> CifarSplits:
    """Validation = a stratified, seeded `val_size` out of the official training
    set; training = the rest (optionally a stratified `train_subset` of it);
    test = the official test set (optionally its first `test_subset` images,
    a stratified draw)."""
    train_x, train_y = train
    test_x, test_y = test
    val_idx, train_idx = stratified_split(train_y, val_size, seed)
    if train_subset is not None and train_subset < train_idx.numel():
        keep, _ = stratified_split(train_y[train_idx], train_subset, seed + 1)
        train_idx = train_idx[keep]
    test_idx = torch.arange(test_y.numel())
    if test_subset is not None and test_subset < test_idx.numel():
        test_idx, _ = stratified_split(test_y, test_subset, seed + 2)
    return CifarSplits(
        train=Split(train_x[train_idx], train_y[train_idx], train_idx),
        val=Split(train_x[val_idx], train_y[val_idx], val_idx),
        test=Split(test_x[test_idx], test_y[test_idx], test_idx),
    )


def load_splits(data_dir: str | Path, config, download: bool = True) -> CifarSplits:
    """Read CIFAR-10 from `data_dir` and split it as `config` says."""
    train, test = load_cifar10(data_dir, download=download)
    return make_splits(train, test, val_size=config.val_size, seed=config.seed,
                       train_subset=config.train_subset, test_subset=config.test_subset)


def sample_positions(labels: torch.Tensor, size: int | None, seed: int) -> torch.Tensor:
    """Sorted positions of a stratified, seeded sample of `size` items (all
    positions when size is None or not smaller than the split)."""
    n = int(labels.shape[0])
    if size is None or size >= n:
        return torch.arange(n)
    first, _ = stratified_split(labels, size, seed)
    return first
