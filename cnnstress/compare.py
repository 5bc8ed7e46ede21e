"""Comparing two classifiers evaluated on the same images (pure numpy + math).

- mcnemar: is the difference in error rates significant (paired test)?
- bootstrap_accuracy_diff: a paired bootstrap interval for acc_b - acc_a.
- compare_failures: which high-confidence failures of A were fixed by B,
  which persist, and which of B's are new (A was right) or newly confident
  (A was wrong with less confidence).

(Differences between two configs: see cnnstress.config.Config.diff.)
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np

from .arrays import as_int_vector, as_numpy
from .evaluate import FailureTable

# Below this many discordant pairs McNemar uses the exact binomial test.
EXACT_BELOW = 25


def _paired_bools(correct_a: Any, correct_b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = as_numpy(correct_a), as_numpy(correct_b)
    if a.ndim != 1 or b.ndim != 1:
        raise ValueError(f"correct_a and correct_b must be 1-D, got shapes {a.shape} and {b.shape}")
    if a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be paired (same length), "
                         f"got {a.shape[0]} and {b.shape[0]}")
    for name, arr in (("correct_a", a), ("correct_b", b)):
        if arr.dtype != np.bool_ and arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(f"{name} must be boolean (or 0/1)")
    return a.astype(bool, copy=False), b.astype(bool, copy=False)


def _binom_two_sided_half(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n trials at p = 1/2:
    min(1, 2 * P(X <= min(k, n-k))), in exact integer arithmetic."""
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1))
    return min(1.0, (2 * tail) / (2 ** n))  # int / int is correctly rounded


def chi2_sf_1dof(stat: float) -> float:
    """P(X > stat) for X ~ chi-square with 1 degree of freedom."""
    return math.erfc(math.sqrt(stat / 2.0)) if stat > 0 else 1.0


def mcnemar(correct_a: Any, correct_b: Any) -> dict[str, Any]:
    """McNemar's test on paired per-image correctness of classifiers A and B.

    b = A right & B wrong, c = A wrong & B right. With b + c < 25 the exact
    two-sided binomial test (statistic = min(b, c)); otherwise chi-square with
    continuity correction, 1 dof: (max(|b-c| - 1, 0))^2 / (b + c),
    p = erfc(sqrt(stat / 2)). b + c == 0 gives p_value 1.0."""
    a, bb = _paired_bools(correct_a, correct_b)
    b = int(np.count_nonzero(a & ~bb))
    c = int(np.count_nonzero(~a & bb))
    n_disc = b + c
    if n_disc < EXACT_BELOW:
        method = "exact"
        stat = float(min(b, c))
        p = 1.0 if n_disc == 0 else _binom_two_sided_half(b, n_disc)
    else:
        method = "chi2_cc"
        stat = max(abs(b - c) - 1, 0) ** 2 / n_disc
        p = chi2_sf_1dof(stat)
    return {"b": b, "c": c, "n_discordant": n_disc, "n": int(a.shape[0]),
            "statistic": float(stat), "p_value": float(p), "method": method}


def bootstrap_accuracy_diff(correct_a: Any, correct_b: Any, n_boot: int = 2000, seed: int = 0,
                            confidence: float = 0.95,
                            max_chunk_elems: int = 4_000_000) -> dict[str, Any]:
    """Paired bootstrap of acc_b - acc_a: images are resampled with replacement
    (the same draw for both classifiers) n_boot times; the interval is the
    percentile interval at `confidence`. Draws are made in chunks of at most
    `max_chunk_elems` indices, so memory stays bounded; the result depends only
    on the seed, not on the chunking."""
    a, b = _paired_bools(correct_a, correct_b)
    n = int(a.shape[0])
    if n == 0:
        raise ValueError("bootstrap needs at least one paired prediction")
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    n_boot = int(n_boot)
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    d = b.astype(np.int8) - a.astype(np.int8)  # per image: -1, 0 or +1
    diff = float(np.count_nonzero(b) - np.count_nonzero(a)) / n
    rng = np.random.default_rng(seed)
    rows = max(1, int(max_chunk_elems) // n)
    sums = np.empty(n_boot, dtype=np.int64)
    for start in range(0, n_boot, rows):
        m = min(rows, n_boot - start)
        # int64 draws take whole 64-bit words from the stream, so an (m, n)
        # block equals m successive rows: chunking does not change the result
        # (checked in tests/test_compare.py).
        idx = rng.integers(0, n, size=(m, n), dtype=np.int64)
        sums[start:start + m] = d[idx].sum(1, dtype=np.int64)
    stats = sums / n
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(stats, [alpha, 1.0 - alpha])
    return {"diff": diff, "low": float(low), "high": float(high), "n_boot": n_boot,
            "confidence": float(confidence), "seed": seed, "n": n,
            "acc_a": float(np.count_nonzero(a)) / n, "acc_b": float(np.count_nonzero(b)) / n}


def compare_failures(failures_a: FailureTable, failures_b: FailureTable, preds_b: Any,
                     labels: Any, *, preds_a: Any) -> dict[str, Any]:
    """How A's high-confidence failures fared under B, and where B's came from
    (by position in the split; preds_a, preds_b, labels: int (N,)).

    fixed: A's failures that B predicts correctly; persisting: A's failures B
    still gets wrong, split into still_high_confidence (also in B's table) and
    wrong_low_confidence (not in B's table). B's failures that are not in A's
    table split by A's prediction: new (A predicted the image correctly) and
    newly_confident (A was wrong too, but below the threshold). So
    b = still_high_confidence + new + newly_confident. Positions are sorted
    lists; counts holds their sizes."""
    preds_a = as_int_vector(preds_a, "preds_a")
    preds_b = as_int_vector(preds_b, "preds_b")
    labels = as_int_vector(labels, "labels")
    if preds_b.shape != labels.shape or preds_a.shape != labels.shape:
        raise ValueError(f"preds_a, preds_b and labels differ in length "
                         f"({preds_a.size}, {preds_b.size} and {labels.size})")
    pos_a = np.unique(failures_a.positions)
    pos_b = np.unique(failures_b.positions)
    for name, pos in (("failures_a", pos_a), ("failures_b", pos_b)):
        if pos.size and (pos[0] < 0 or pos[-1] >= labels.size):
            raise ValueError(f"{name} has positions outside the {labels.size} predictions given")
    b_correct_on_a = preds_b[pos_a] == labels[pos_a]
    fixed = pos_a[b_correct_on_a]
    persisting = pos_a[~b_correct_on_a]
    in_b = np.isin(persisting, pos_b)
    still_high = persisting[in_b]
    wrong_low = persisting[~in_b]
    only_b = np.setdiff1d(pos_b, pos_a)
    a_correct = preds_a[only_b] == labels[only_b]
    out: dict[str, Any] = {
        "fixed": fixed.tolist(),
        "persisting": persisting.tolist(),
        "still_high_confidence": still_high.tolist(),
        "wrong_low_confidence": wrong_low.tolist(),
        "new": only_b[a_correct].tolist(),
        "newly_confident": only_b[~a_correct].tolist(),
    }
    out["counts"] = {"a": int(pos_a.size), "b": int(pos_b.size),
                     **{k: len(v) for k, v in out.items()}}
    return out


def compare_models(preds: dict, failures: dict, config, n_boot: int = 2000) -> dict[str, Any]:
    """The paired comparison of two models on the same test images
    (evaluate.Predictions and FailureTable per model name, the reference
    first, e.g. BASELINE then IMPROVED): accuracy
    difference with a bootstrap interval (seeded by config.seed), McNemar's
    test, and which failures were fixed, persist, are new or newly confident.
    The dict form of results.Comparison (without config_diff)."""
    if len(preds) != 2 or list(preds) != list(failures):
        raise ValueError("compare_models needs the predictions and failure tables of the same two models")
    first, second = preds
    a, b = preds[first], preds[second]
    if not np.array_equal(np.asarray(a.labels), np.asarray(b.labels)):
        raise ValueError("the two models were evaluated on different test images")
    correct_a = np.asarray(a.preds == a.labels)
    correct_b = np.asarray(b.preds == b.labels)
    return {
        "accuracy_diff": bootstrap_accuracy_diff(correct_a, correct_b, n_boot=n_boot, seed=config.seed),
        "mcnemar": mcnemar(correct_a, correct_b),
        "failures": compare_failures(failures[first], failures[second], b.preds, b.labels, preds_a=a.preds),
        "threshold": failures[first].threshold,
    }



def better(delta: float, higher_is_better: bool = True, tol: float = 0.0) -> str:
    """'better', 'worse' or 'unchanged' for a change `delta` of a score with that direction."""
    if abs(delta) <= tol:
        return "unchanged"
    return "better" if (delta > 0) == higher_is_better else "worse"
