"""Structure checks for the JSON caches (stress_<model>.json, explanations.json).

A cache file is untrusted input: it may be truncated, hand-edited or written
by another version. Before a cached result is used, its structure is checked
against a schema of what the readers (log lines, report, metrics, figures)
access; anything else is a cache miss and the stage is recomputed.

A schema is:
  a type              isinstance (float accepts int; int and float refuse bool)
  a tuple             any of its alternatives (None: the value None)
  a dict              an object with at least these keys, each matching
  Seq(item, n)        a list of items matching `item` (of length n when given)
  Each(value)         an object whose every value matches `value`
  Keys(names, value)  an object with exactly these keys, each value matching `value`
  Range(lo, hi, kind) a number of `kind` in [lo, hi] (a float NaN passes: undefined)
  Grid(ndim)          nested lists of numbers forming a regular ndim-dimensional array
  anything else       a constant the value must equal

Values are checked, not only types: a class 99, a position beyond the test
set or a missing corruption family would crash a reader as surely as a
missing key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .registry import BASELINE, IMPROVED
from .robustness.corruptions import CORRUPTIONS, FAMILIES, SEVERITIES
from .xai.checks import CAM_EXPLAINERS, RANDOM_BASELINES


@dataclass(frozen=True)
class Seq:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class Each:
    value: Any


@dataclass(frozen=True)
class Keys:
    names: tuple[str, ...]
    value: Any


@dataclass(frozen=True)
class Grid:
    ndim: int


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    kind: type = float


def mismatch(value: Any, schema: Any, where: str = "results") -> str | None:
    """None when `value` fits `schema`, else where and how it does not (one line)."""
    if isinstance(schema, tuple):
        problems = [mismatch(value, alt, where) for alt in schema]
        return None if any(p is None for p in problems) else problems[-1]
    if schema is None:
        return None if value is None else f"{where} is {_kind(value)}, expected null"
    if isinstance(schema, type):
        if isinstance(value, bool) and schema is not bool:
            ok = False
        else:
            ok = isinstance(value, (int, float) if schema is float else schema)
        return None if ok else f"{where} is {_kind(value)}, expected {schema.__name__}"
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, expected an object"
        for key, sub in schema.items():
            if key not in value:
                return f"{where}.{key} is missing"
            problem = mismatch(value[key], sub, f"{where}.{key}")
            if problem:
                return problem
        return None
    if isinstance(schema, Seq):
        if not isinstance(value, list):
            return f"{where} is {_kind(value)}, expected a list"
        if schema.length is not None and len(value) != schema.length:
            return f"{where} has {len(value)} items, expected {schema.length}"
        return next((p for i, v in enumerate(value) if (p := mismatch(v, schema.item, f"{where}[{i}]"))), None)
    if isinstance(schema, Grid):
        try:
            shape = np.asarray(value, dtype=np.float64).shape   # ragged or non-numeric: ValueError/TypeError
        except (ValueError, TypeError):
            return f"{where} is not a regular array of numbers"
        return None if len(shape) == schema.ndim else f"{where} has {len(shape)} dimensions, expected {schema.ndim}"
    if isinstance(schema, Range):
        problem = mismatch(value, schema.kind, where)
        if problem or value != value:   # NaN: an undefined number, allowed where floats are
            return problem
        return None if schema.lo <= value <= schema.hi else \
            f"{where} is {value!r}, expected {schema.lo}..{schema.hi}"
    if isinstance(schema, Keys):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, expected an object"
        if set(value) != set(schema.names):
            return f"{where} has keys {sorted(value)}, expected {sorted(schema.names)}"
        return next((p for k, v in value.items() if (p := mismatch(v, schema.value, f"{where}.{k}"))), None)
    if isinstance(schema, Each):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, expected an object"
        return next((p for k, v in value.items() if (p := mismatch(v, schema.value, f"{where}.{k}"))), None)
    return None if value == schema else f"{where} is {value!r}, expected {schema!r}"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


NUMBER, MAYBE_NUMBER = float, (float, None)   # JSON numbers (NaN included); None where undefined
FRACTION = Range(0.0, 1.0)                      # accuracies, calibration errors, fractions of images
MAYBE_FRACTION = (FRACTION, None)
COUNT = Range(0, float("inf"), int)


def stress_schema(n_eps: int) -> dict:
    """One model's stress results as the readers use them; `n_eps` attack budgets."""
    bins = {"ece": FRACTION, "mce": FRACTION, "nll": NUMBER, "count": Seq(COUNT),
            "accuracy": Seq(MAYBE_FRACTION), "confidence": Seq(MAYBE_FRACTION)}
    per_cell = {c: Seq(FRACTION, len(SEVERITIES)) for c in CORRUPTIONS}
    families = tuple(dict.fromkeys(FAMILIES[c] for c in CORRUPTIONS))
    return {
        "calibration": {"bins": COUNT, "temperature": NUMBER, "val_n": COUNT, "test_n": COUNT,
                        "uncalibrated": bins, "calibrated": bins},
        "corruptions": {"n": COUNT, "clean_accuracy": FRACTION, "mean_corruption_accuracy": FRACTION,
                        "mean_corruption_accuracy_without_frost": FRACTION,
                        "drop_from_clean": Range(-1.0, 1.0), "accuracy": per_cell, "ece": per_cell,
                        "ece_calibrated": per_cell, "accuracy_by_family": Keys(families, FRACTION),
                        "accuracy_by_severity": Seq(FRACTION, len(SEVERITIES)),
                        "ece_by_severity": Seq(FRACTION, len(SEVERITIES)),
                        "ece_calibrated_by_severity": Seq(FRACTION, len(SEVERITIES))},
        "adversarial": {"n": COUNT, "steps": COUNT, "clean_accuracy": MAYBE_FRACTION, "eps": Seq(NUMBER, n_eps),
                        "eps_255": Seq(Range(0, 255, int), n_eps), "fgsm": Seq(MAYBE_FRACTION, n_eps),
                        "pgd": Seq(MAYBE_FRACTION, n_eps)},
    }


def explanations_schema(models: list[str], n_test: int | None = None) -> dict:
    """explanations.json's results as the readers use them, for these models
    (positions in a test split of `n_test` images, when given)."""
    method = {"deletion_auc": NUMBER, "insertion_auc": NUMBER, "deletion_curve": Seq(NUMBER),
              "insertion_curve": Seq(NUMBER)}
    explained = {**method, "verdict": str, "verdict_smooth": str}   # vs pixel noise, vs smooth noise
    group = ({"n": 0}, {"n": COUNT, "fractions": Seq(FRACTION),
                        "methods": {**{m: explained for m in CAM_EXPLAINERS}, **{m: method for m in RANDOM_BASELINES}}})
    sanity_method = {"steps": Seq(str), "median_spearman_signed": Seq(MAYBE_NUMBER), "median_ssim": Seq(NUMBER),
                     "verdict": {"passed": (bool, None), "reason": str, "step_index": (int, None),
                                 "median_ssim": NUMBER, "median_per_step": Each(NUMBER)}}
    position = COUNT if n_test is None else Range(0, n_test - 1, int)
    suspects = {"n_test": COUNT, "suspects": COUNT, "flagged_fraction": FRACTION, "reliable": bool,
                "suspect_positions": Seq(position), "failures": COUNT, "suspect_failures": COUNT,
                "suspect_failure_positions": Seq(position), "model_error_positions": Seq(position)}
    schema: dict[str, Any] = {
        "faithfulness": {m: {"failures": group, "sample": group} for m in models},
        "sanity": {m: {"n": COUNT, **{c: sanity_method for c in CAM_EXPLAINERS}} for m in models},
        "label_suspects": {m: suspects for m in models},
        "sanity_maps": (None, {"model": str, "steps": Seq(str), "maps": Grid(4)}),
    }
    if {BASELINE, IMPROVED} <= set(models):
        drift_group = ({"n": 0}, {"n": COUNT, "median_spearman": MAYBE_NUMBER, "moved_onto_centre": COUNT,
                                  "centre_fraction": {BASELINE: FRACTION, IMPROVED: FRACTION}})
        schema["drift"] = {"layer": str, "fixed": drift_group, "persisting": drift_group, "new": drift_group}
        schema["label_agreement"] = {"count": COUNT, "positions": Seq(position),
                                     "failures": {BASELINE: Seq(position), IMPROVED: Seq(position)}}
    return schema


MAX_CACHE_BYTES = 64 * 2**20   # our JSON caches are kilobytes to a few megabytes: larger is not read


def read_cache(path: Path, key: dict, schema: dict | None = None,
               log: Callable[[str], None] | None = None) -> dict | None:
    """The results of a JSON cache {"key": ..., "results": ...} when its key
    equals `key` and its results fit `schema`; None when it is missing, made
    otherwise, unreadable or malformed (the last two logged)."""
    try:
        size = path.stat().st_size
        cached = json.loads(path.read_text()) if size <= MAX_CACHE_BYTES else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError, RecursionError) as exc:   # RecursionError: JSON nested too deep
        problem = f"unreadable ({type(exc).__name__})"
    else:
        if size > MAX_CACHE_BYTES:
            problem = f"{size >> 20} MB, far more than a cache of ours: not read"
        else:
            problem = mismatch(cached, {"key": dict, "results": dict}, "the file")
        if problem is None and cached["key"] != key:
            return None
        if problem is None and schema is not None:
            problem = mismatch(cached["results"], schema)
        if problem is None:
            return cached["results"]
    if log:
        log(f"{path.name}: not a valid cache ({problem}); recomputing")
    return None
