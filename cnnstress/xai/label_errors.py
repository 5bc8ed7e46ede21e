"""Suspected label errors by confident learning (Northcutt, Jiang & Chuang 2021,
"Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 70).

The core of cleanlab's `count.compute_confident_joint`,
`count.calibrate_confident_joint` and `filter.find_label_issues` for ordinary
(single-label) classification, written out in NumPy so that the project does
not depend on cleanlab (which brings pandas, scikit-learn and termcolor) for
about a hundred lines.

Inputs everywhere: `probs` float (N,C), each row a probability vector (sums to
1, entries in [0, 1]); `labels` int (N,), the *given* labels, in [0, C).
`probs` must be out-of-sample: predicted by a model that never trained on
those examples (here: the test set, or cross-validated predictions). On its
own training data a model has memorised the given labels, wrong ones
included, and confident learning then finds almost nothing.

Layout of the (C,C) joint matrices: row i = given label, column j = "true"
(confidently predicted) label; the off-diagonal cells count suspected errors.

Differences from cleanlab 2.x that remain (none matters for typical data):
* Two or more classes above their thresholds: the example goes to the most
  probable of *those* classes (the paper's Eq. 2). cleanlab takes the argmax
  over all classes, which differs only when that class is below its own
  threshold.
* `confident_joint` returns the plain counts. cleanlab's version also raises
  every diagonal cell to at least 1 ("at least one correctly labelled example
  per class"); `find_label_issues` does that too before calibrating, so its
  flags are unaffected.
* `calibrate_confident_joint` puts the examples of a given label that has no
  confident counts on the diagonal (treats them as correct), so row sums
  always equal the label counts; cleanlab leaves such a row at 0 and rescales
  the other rows (its own pipeline never produces such a row, see above).
* Ties (equal margins, equal rounding remainders after snapping to 1e-9)
  are broken deterministically with stable sorts, in the order cleanlab's
  code gives when its sort happens to be stable. cleanlab uses NumPy's
  default sort, which is not stable (SIMD on x86) and sees float noise, so
  on exact ties it may pick another example or cell. Checked against
  cleanlab 2.9.0 on 299 random data sets (60,094 examples, 2-7 classes,
  0-30% flipped labels): thresholds and confident joints identical; 22 of
  ~9,700 "prune_by_noise_rate" flags differed and no "confident_learning"
  flag; with cleanlab's sorts made stable and its rounding input snapped to
  1e-9, nothing differed.
* Only `filter_by` "prune_by_noise_rate" (the default) and
  "confident_learning"; no `frac_noise`, `num_to_remove_per_class`,
  `min_examples_per_class` (fixed at cleanlab's default 1), ranking,
  multi-label or multiprocessing.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from ..arrays import as_int_vector, as_numpy

FLOAT_TOL = 1e-6          # cleanlab's FLOATING_POINT_COMPARISON: p >= t - tol counts as above
THRESHOLD_FLOOR = 2e-6    # cleanlab's CONFIDENT_THRESHOLDS_LOWER_BOUND (> FLOAT_TOL)
NO_LABEL_THRESHOLD = 2.0  # > any probability: nothing is counted into a class nobody is labelled as
ROW_SUM_TOL = 1e-3        # how far a row of probs may be from summing to 1
MIN_EXAMPLES_PER_CLASS = 1  # cleanlab's default: a given label with <= 1 example is not pruned
FILTERS = ("prune_by_noise_rate", "confident_learning")


# --- validation ------------------------------------------------------------

def _check(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = as_numpy(probs)
    if p.ndim != 2 or p.shape[1] < 1:
        raise ValueError(f"probs must be 2-D (N, C) with C >= 1, got shape {tuple(p.shape)}")
    if not (np.issubdtype(p.dtype, np.floating) or np.issubdtype(p.dtype, np.integer)):
        raise ValueError(f"probs must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    y = as_int_vector(labels, "labels")
    n, c = p.shape
    if y.shape[0] != n:
        raise ValueError(f"probs has {n} rows but labels has {y.shape[0]}")
    if n:
        if not np.isfinite(p).all() or p.min() < -FLOAT_TOL or p.max() > 1 + FLOAT_TOL:
            raise ValueError("probs must be probabilities in [0, 1] (found NaN, inf or values outside); "
                             "pass softmax outputs, not logits")
        worst = float(np.abs(p.sum(1) - 1.0).max())
        if worst > ROW_SUM_TOL:
            raise ValueError(f"each row of probs must sum to 1 (within {ROW_SUM_TOL}); "
                             f"the worst row is off by {worst:.3g}")
        if y.min() < 0 or y.max() >= c:
            raise ValueError(f"labels must lie in [0, {c}); found {int(y.min())}..{int(y.max())}")
    return p, y


# --- thresholds and the confident joint ------------------------------------

def per_class_thresholds(probs: Any, labels: Any) -> np.ndarray:
    """Per-class confidence thresholds, float64 (C,).

    t_j = mean of probs[:, j] over the examples whose given label is j (the
    model's average self-confidence in class j), floored at 2e-6 as cleanlab
    does. A class with no examples gets 2.0, above any probability, so no
    example is ever counted into it (instead of a NaN mean)."""
    p, y = _check(probs, labels)
    c = p.shape[1]
    counts = np.bincount(y, minlength=c)
    sums = np.zeros(c)
    np.add.at(sums, y, p[np.arange(y.size), y])
    t = np.full(c, NO_LABEL_THRESHOLD)
    np.divide(sums, counts, out=t, where=counts > 0)
    return np.maximum(t, THRESHOLD_FLOOR)


def _confident_columns(p: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each example the class it is confidently counted into, int64 (N,):
    the most probable class among those with p >= t - 1e-6; -1 for none."""
    above = p >= thresholds - FLOAT_TOL
    col = np.where(above, p, -np.inf).argmax(1)
    return np.where(above.any(1), col, -1)


def _check_thresholds(thresholds: Any, c: int) -> np.ndarray:
    t = as_numpy(thresholds).astype(np.float64).reshape(-1)
    if t.shape != (c,) or not np.isfinite(t).all():
        raise ValueError(f"thresholds must be {c} finite numbers (one per class), got shape "
                         f"{tuple(as_numpy(thresholds).shape)}")
    return t


def _count(cols: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
    hit = cols >= 0
    flat = np.bincount(y[hit] * c + cols[hit], minlength=c * c)
    return flat.reshape(c, c).astype(np.int64)


def confident_joint(probs: Any, labels: Any, thresholds: Any = None) -> np.ndarray:
    """The confident joint C[i, j], int64 (C,C): the number of examples with
    given label i that are confidently class j.

    An example counts in column argmax_j probs[i, j] over the classes j with
    probs[i, j] >= t_j (within 1e-6); an example above no threshold is not
    counted, so the total is at most N. `thresholds` (C,) default to
    `per_class_thresholds`. Not calibrated (see `calibrate_confident_joint`)."""
    p, y = _check(probs, labels)
    c = p.shape[1]
    t = per_class_thresholds(p, y) if thresholds is None else _check_thresholds(thresholds, c)
    return _count(_confident_columns(p, t), y, c)


def _round_preserving_sum(row: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) total: cleanlab's
    round_preserving_sum. The entries rounded furthest from their value are
    adjusted first; among ties, as cleanlab's sort would order them if it
    were stable (raising: the later entry first; lowering: the earlier)."""
    # Snap to 1e-9 first: exact ties (1/3 + 1/3 + 1/3 scaled) otherwise fall
    # whichever way float noise in the scaling pushes them.
    row = np.round(row, 9)
    ints = np.round(row)
    target = np.round(row.sum())
    while (diff := int(target - ints.sum())) != 0:
        step = 1 if diff > 0 else -1
        # diff > 0: raise the most under-rounded entries; < 0: lower the most over-rounded.
        order = np.argsort(row - ints, kind="stable")
        pick = order[::-1] if step > 0 else order
        ints[pick[:min(abs(diff), row.size)]] += step
    return ints


def _round_preserving_row_totals(m: np.ndarray) -> np.ndarray:
    return np.stack([_round_preserving_sum(r) for r in m]).astype(np.int64) if m.size else m.astype(np.int64)


def calibrate_confident_joint(joint: Any, labels: Any) -> np.ndarray:
    """Rescale a confident joint (C,C) into estimated counts, int64 (C,C),
    whose row i sums to the number of examples given label i, hence the whole
    to N (cleanlab's calibrate_confident_joint): each row is scaled to its
    label count, then rounded to integers preserving the row total. A row
    with no confident counts but with examples puts them all on the diagonal.
    `labels`: the given labels, int (N,) in [0, C)."""
    cj = as_numpy(joint).astype(np.float64)
    if cj.ndim != 2 or cj.shape[0] != cj.shape[1] or cj.shape[0] < 1:
        raise ValueError(f"the confident joint must be square (C, C), got shape {tuple(cj.shape)}")
    if not np.isfinite(cj).all() or (cj < 0).any():
        raise ValueError("the confident joint must hold finite counts >= 0")
    c = cj.shape[0]
    y = as_int_vector(labels, "labels")
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}); found {int(y.min())}..{int(y.max())}")
    counts = np.bincount(y, minlength=c).astype(np.float64)
    rows = cj.sum(1)
    cal = np.zeros_like(cj)
    np.divide(cj, rows[:, None], out=cal, where=rows[:, None] > 0)
    cal *= counts[:, None]
    empty = np.flatnonzero((rows == 0) & (counts > 0))
    cal[empty, empty] = counts[empty]
    # cleanlab then rescales the whole to sum to N: a no-op here, since every
    # row already sums to its label count.
    return _round_preserving_row_totals(cal)


# --- finding the issues ------------------------------------------------------

def keep_at_least_n_per_class(prune: np.ndarray, n: int) -> np.ndarray:
    """cleanlab's _keep_at_least_n_per_class (frac_noise=1) on the prune-count
    matrix (true, given) = calibrated joint transposed: raise each diagonal
    cell to at least n, taking the increase evenly from the non-zero
    off-diagonal cells of its column, so that pruning leaves n examples of
    every given label. Like cleanlab, the fractional off-diagonal counts are
    then truncated (its _reduce_prune_counts ends in astype(int); its final
    round_preserving_row_totals sees integers and changes nothing), so a
    column may end up pruning fewer examples than before the raise, never
    more. Checked against cleanlab 2.9.0's function on random matrices."""
    diag = np.diagonal(prune).astype(np.float64)
    new_diag = np.maximum(diag, n)
    per_col = np.maximum(np.count_nonzero(prune, axis=0) - 1.0, 1.0)
    out = prune - (new_diag - diag) / per_col
    out[out < 0] = 0
    np.fill_diagonal(out, new_diag)
    return np.trunc(out).astype(np.int64)


def find_label_issues(probs: Any, labels: Any, *, filter_by: str = "prune_by_noise_rate") -> np.ndarray:
    """Suspected label errors, bool (N,), by confident learning.

    probs: float (N,C) *out-of-sample* probabilities (rows sum to 1); labels:
    the given labels, int (N,) in [0, C).

    * "prune_by_noise_rate" (cleanlab's default): compute the confident joint,
      raise its diagonal to >= 1, calibrate it (rows sum to the label counts),
      keep at least one example per given label; then for every off-diagonal
      cell (given i, true j) flag the n_ij examples given label i with the
      largest margin probs[:, j] - probs[:, i]. Given labels with a single
      example are not pruned.
    * "confident_learning": flag the examples counted off the diagonal of the
      confident joint (confidently some class other than their given label).

    As in cleanlab, both finally clear the flag of any example whose most
    probable class (argmax) is its given label."""
    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {FILTERS}, got {filter_by!r}")
    p, y = _check(probs, labels)
    n, c = p.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    cols = _confident_columns(p, per_class_thresholds(p, y))
    if filter_by == "confident_learning":
        issues = (cols >= 0) & (cols != y)
    else:
        cj = _count(cols, y, c)
        np.fill_diagonal(cj, np.maximum(np.diagonal(cj), 1))
        prune = keep_at_least_n_per_class(calibrate_confident_joint(cj, y).T, MIN_EXAMPLES_PER_CLASS)
        issues = np.zeros(n, dtype=bool)
        for i in range(c):                       # given label
            members = np.flatnonzero(y == i)
            if members.size <= MIN_EXAMPLES_PER_CLASS:
                continue
            for j in range(c):                   # suspected true label
                k = int(prune[j, i])
                if j == i or k <= 0:
                    continue
                margin = p[members, j] - p[members, i]
                issues[members[np.argsort(-margin, kind="stable")[:k]]] = True
    return issues & (p.argmax(1) != y)
