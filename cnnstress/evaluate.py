"""Inference on a split (logits, probabilities, predictions) and metrics on
the predictions: confusion matrix, per-class accuracy, most confused pairs,
high-confidence failures and a JSON-ready summary."""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .arrays import as_int_vector, as_numpy
from .augment import normalize, to_float
from .data import CLASSES
from .io import atomic_write
from .runtime import autocast, batch_slices, eval_mode, resolve_device, resolve_precision


@dataclass(frozen=True)
class Predictions:
    """Test-time outputs for N images, all on the CPU: logits and probs float32
    (N,C), preds and labels int64 (N,)."""
    logits: torch.Tensor
    probs: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).float().mean()) if len(self.labels) else float("nan")

    @property
    def loss(self) -> float:
        return float(F.cross_entropy(self.logits, self.labels)) if len(self.labels) else float("nan")

    @property
    def confidence(self) -> torch.Tensor:
        """Probability of the predicted class, (N,)."""
        return self.probs.max(1).values

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, *, device: torch.device,
          batch_size: int = 512, amp_dtype: torch.dtype | None = None,
          channels_last: bool = True) -> torch.Tensor:
    """Logits float32 (N,C) on the CPU for uint8 images (N,3,H,W). The model is
    put in eval mode for the call and handed back in the mode it had."""
    out = []
    # One copy to the device up front (uint8: 3 KB an image), none per batch;
    # the logits stay there until the single read-back at the end.
    images = images.to(device)
    with eval_mode(model):
        for batch in batch_slices(images.shape[0], batch_size):
            x = normalize(to_float(images[batch]))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                out.append(model(x).float())
    if not out:
        return torch.empty(0, getattr(model, "num_classes", 10))
    return torch.cat(out).cpu()


def predict(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
            batch_size: int = 512, amp_dtype: torch.dtype | None = None,
            channels_last: bool = True) -> Predictions:
    """Predictions for one split (eval mode, no grad; the model's mode is restored)."""
    logits = infer(model, images, device=device, batch_size=batch_size,
                   amp_dtype=amp_dtype, channels_last=channels_last)
    return Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1),
                       labels=labels.cpu().long())


# ---------------------------------------------------------------------------
# Metrics on predictions: confusion matrix, per-class accuracy, confused pairs,
# high-confidence failures, and a JSON-ready summary.
# ---------------------------------------------------------------------------

def _check_names(classes: Sequence[str], num_classes: int) -> tuple[str, ...]:
    classes = tuple(classes)
    if len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names given for {num_classes} classes")
    return classes


def confusion_matrix(labels: Any, preds: Any, num_classes: int = 10) -> np.ndarray:
    """Counts int64 (C,C): row = true class, column = predicted class."""
    labels = as_int_vector(labels, "labels")
    preds = as_int_vector(preds, "preds")
    if labels.shape != preds.shape:
        raise ValueError(f"labels and preds differ in length ({labels.size} vs {preds.size})")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    for name, arr in (("labels", labels), ("preds", preds)):
        if arr.size and (arr.min() < 0 or arr.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}); "
                             f"found {int(arr.min())}..{int(arr.max())}")
    flat = np.bincount(labels * num_classes + preds, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each true class, float64 (C,); NaN for a class with no samples."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    support = cm.sum(1).astype(np.float64)
    correct = np.diag(cm).astype(np.float64)
    out = np.full(cm.shape[0], np.nan)
    np.divide(correct, support, out=out, where=support > 0)
    return out


def most_confused_pairs(cm: np.ndarray, k: int = 5,
                        classes: Sequence[str] = CLASSES) -> list[dict[str, Any]]:
    """The `k` unordered class pairs with the most confusions in both directions.

    Each entry: a, b (names, a before b in class order), a_as_b (true a
    predicted b), b_as_a, total, rate = total / (support_a + support_b).
    Pairs never confused are left out; ties in total go to the earlier pair in
    class order."""
    cm = np.asarray(cm)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {cm.shape}")
    names = _check_names(classes, cm.shape[0])
    if k <= 0:
        return []
    ia, ib = np.triu_indices(cm.shape[0], k=1)
    a_as_b, b_as_a = cm[ia, ib], cm[ib, ia]
    total = a_as_b + b_as_a
    support = cm.sum(1)
    # Stable sort on -total keeps the (a, b) class order among ties.
    order = np.argsort(-total, kind="stable")
    order = order[total[order] > 0][:k]
    out = []
    for j in order:
        a, b = int(ia[j]), int(ib[j])
        denom = int(support[a] + support[b])
        out.append({"a": names[a], "b": names[b], "a_as_b": int(a_as_b[j]),
                    "b_as_a": int(b_as_a[j]), "total": int(total[j]),
                    "rate": int(total[j]) / denom if denom else float("nan")})
    return out


@dataclass(frozen=True)
class Failure:
    """A wrong prediction made with high confidence.

    position: index in the evaluated split; dataset_index: index in the
    official test set (the position unless the miner was told otherwise);
    true/pred: class ids; confidence: probability of `pred`; top3: the three
    most probable classes as (class_id, prob), most probable first."""
    position: int
    dataset_index: int
    true: int
    pred: int
    confidence: float
    top3: tuple[tuple[int, float], ...]


CSV_HEADER = ("rank", "position", "dataset_index", "true", "true_name", "pred", "pred_name",
              "confidence", "top1", "top1_prob", "top2", "top2_prob", "top3", "top3_prob")


@dataclass
class FailureTable:
    """High-confidence failures ranked by confidence (highest first)."""
    rows: list[Failure]
    threshold: float | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[Failure]:
        return iter(self.rows)

    @property
    def positions(self) -> np.ndarray:
        """Positions in the evaluated split, int64, in rank order."""
        return np.fromiter((r.position for r in self.rows), dtype=np.int64, count=len(self.rows))

    def to_csv(self, path: str | Path, classes: Sequence[str] = CLASSES) -> None:
        """Write the table (header CSV_HEADER, rank from 1) atomically. The
        topN columns hold class names, the topN_prob columns probabilities."""
        classes = tuple(classes)

        def name(i: int) -> str:
            if not 0 <= i < len(classes):
                raise ValueError(f"class id {i} has no name in the {len(classes)} given")
            return classes[i]

        lines = []
        for rank, r in enumerate(self.rows, 1):
            top = []
            for j in range(3):
                if j < len(r.top3):
                    cid, p = r.top3[j]
                    top += [name(int(cid)), repr(float(p))]
                else:
                    top += ["", ""]
            lines.append([rank, r.position, r.dataset_index, r.true, name(r.true), r.pred,
                          name(r.pred), repr(float(r.confidence)), *top])

        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(CSV_HEADER)
                w.writerows(lines)

        atomic_write(path, write)

    @classmethod
    def from_csv(cls, path: str | Path, classes: Sequence[str] = CLASSES) -> "FailureTable":
        """Read a table written by to_csv (top-k names mapped back with `classes`)."""
        lookup = {n: i for i, n in enumerate(classes)}
        rows = []
        with open(path, newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None or tuple(header) != CSV_HEADER:
                raise ValueError(f"{path}: not a failure table (header {header!r})")
            for lineno, rec in enumerate(reader, 2):
                if not rec:
                    continue
                if len(rec) != len(CSV_HEADER):
                    raise ValueError(f"{path}:{lineno}: expected {len(CSV_HEADER)} fields, got {len(rec)}")
                f = dict(zip(CSV_HEADER, rec))
                top3 = []
                for j in (1, 2, 3):
                    nm = f[f"top{j}"]
                    if nm == "":
                        continue
                    if nm not in lookup:
                        raise ValueError(f"{path}:{lineno}: unknown class name {nm!r}")
                    top3.append((lookup[nm], float(f[f"top{j}_prob"])))
                rows.append(Failure(position=int(f["position"]), dataset_index=int(f["dataset_index"]),
                                    true=int(f["true"]), pred=int(f["pred"]),
                                    confidence=float(f["confidence"]), top3=tuple(top3)))
        return cls(rows=rows)


def mine_failures(probs: Any, labels: Any, threshold: float = 0.8,
                  dataset_indices: Any = None) -> FailureTable:
    """Wrong predictions (argmax of `probs` != label) whose confidence is
    strictly greater than `threshold`, ranked by confidence descending, ties by
    lower position. The comparison is done in the dtype of `probs`, so a
    float32 probability of exactly 0.8 is not above a threshold of 0.8."""
    threshold_f = float(threshold)
    if not 0.0 <= threshold_f < 1.0:  # also rejects NaN
        raise ValueError(f"threshold must be in [0, 1) (a probability that a wrong "
                         f"prediction must exceed), got {threshold!r}")
    p = as_numpy(probs)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {tuple(p.shape)}")
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    y = as_int_vector(labels, "labels")
    n, c = p.shape
    if y.shape[0] != n:
        raise ValueError(f"probs has {n} rows but labels has {y.shape[0]}")
    if dataset_indices is None:
        ds = np.arange(n, dtype=np.int64)
    else:
        ds = as_int_vector(dataset_indices, "dataset_indices")
        if ds.shape[0] != n:
            raise ValueError(f"dataset_indices has {ds.shape[0]} entries for {n} predictions")
    if n == 0 or c == 0:
        return FailureTable(rows=[], threshold=threshold_f)

    pred = p.argmax(1)
    conf = p[np.arange(n), pred]
    hit = np.flatnonzero((pred != y) & (conf > np.asarray(threshold_f, dtype=p.dtype)))
    # lexsort: last key is primary -> confidence descending, then position ascending.
    hit = hit[np.lexsort((hit, -conf[hit]))]
    sub = p[hit]
    k = min(3, c)
    top = np.argsort(-sub, axis=1, kind="stable")[:, :k]
    top_p = np.take_along_axis(sub, top, axis=1)
    rows = [Failure(position=int(i), dataset_index=int(ds[i]), true=int(y[i]), pred=int(pred[i]),
                    confidence=float(conf[i]),
                    top3=tuple((int(t), float(q)) for t, q in zip(top[r], top_p[r])))
            for r, i in enumerate(hit.tolist())]
    return FailureTable(rows=rows, threshold=threshold_f)


def _json_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def summarize(predictions: Predictions, threshold: float = 0.8,
              classes: Sequence[str] = CLASSES, k: int = 5) -> dict[str, Any]:
    """A JSON-ready summary of one split's predictions. Undefined values (an
    empty split, a class with no samples) are None."""
    num_classes = int(predictions.probs.shape[1])
    names = _check_names(classes, num_classes)
    cm = confusion_matrix(predictions.labels, predictions.preds, num_classes)
    failures = mine_failures(predictions.probs, predictions.labels, threshold)
    n = len(predictions)
    return {
        "test_accuracy": _json_float(predictions.accuracy),
        "n": n,
        "loss": _json_float(predictions.loss),
        "per_class_accuracy": {nm: _json_float(a) for nm, a in zip(names, per_class_accuracy(cm))},
        "high_confidence_failures": len(failures),
        "threshold": float(threshold),
        "mean_confidence": _json_float(predictions.confidence.mean()) if n else None,
        "confusion_matrix": cm.tolist(),
        "top_confused_pairs": [{**d, "rate": _json_float(d["rate"])}
                               for d in most_confused_pairs(cm, k=k, classes=names)],
    }


def evaluate_split(trained: Any, split: Any) -> Predictions:
    """Predictions of a trained model (anything with .model and .config, e.g.
    stages.training.Trained) on one split (data.Split), with its config's
    device, precision, batch size and memory layout."""
    config = trained.config
    device = resolve_device(config.device)
    return predict(trained.model, split.images, split.labels, device=device, batch_size=config.eval_batch_size,
                   amp_dtype=resolve_precision(config.precision, device), channels_last=config.channels_last)
