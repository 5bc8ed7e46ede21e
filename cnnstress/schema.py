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
  anything else       a constant the value must equal
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .robustness.corruptions import CORRUPTIONS, SEVERITIES
from .xai.checks import CAM_EXPLAINERS, RANDOM_BASELINES


@dataclass(frozen=True)
class Seq:
    item: Any
    length: int | None = None


@dataclass(frozen=True)
class Each:
    value: Any


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
    if isinstance(schema, Each):
        if not isinstance(value, dict):
            return f"{where} is {_kind(value)}, expected an object"
        return next((p for k, v in value.items() if (p := mismatch(v, schema.value, f"{where}.{k}"))), None)
    return None if value == schema else f"{where} is {value!r}, expected {schema!r}"


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


NUMBER, MAYBE_NUMBER = float, (float, None)   # JSON numbers (NaN included); None where undefined


def stress_schema(n_eps: int) -> dict:
    """One model's stress results as the readers use them; `n_eps` attack budgets."""
    bins = {"ece": NUMBER, "mce": NUMBER, "nll": NUMBER, "count": Seq(int),
            "accuracy": Seq(MAYBE_NUMBER), "confidence": Seq(MAYBE_NUMBER)}
    per_cell = {c: Seq(NUMBER, len(SEVERITIES)) for c in CORRUPTIONS}
    return {
        "calibration": {"bins": int, "temperature": NUMBER, "val_n": int, "test_n": int,
                        "uncalibrated": bins, "calibrated": bins},
        "corruptions": {"n": int, "clean_accuracy": NUMBER, "mean_corruption_accuracy": NUMBER,
                        "mean_corruption_accuracy_without_frost": NUMBER,
                        "drop_from_clean": NUMBER, "accuracy": per_cell, "ece": per_cell, "ece_calibrated": per_cell,
                        "accuracy_by_family": Each(NUMBER), "accuracy_by_severity": Seq(NUMBER, len(SEVERITIES)),
                        "ece_by_severity": Seq(NUMBER, len(SEVERITIES)),
                        "ece_calibrated_by_severity": Seq(NUMBER, len(SEVERITIES))},
        "adversarial": {"n": int, "steps": int, "clean_accuracy": MAYBE_NUMBER, "eps": Seq(NUMBER, n_eps),
                        "eps_255": Seq(int, n_eps), "fgsm": Seq(MAYBE_NUMBER, n_eps), "pgd": Seq(MAYBE_NUMBER, n_eps)},
    }


def explanations_schema(models: list[str]) -> dict:
    """explanations.json's results as the readers use them, for these models."""
    method = {"deletion_auc": NUMBER, "insertion_auc": NUMBER, "deletion_curve": Seq(NUMBER),
              "insertion_curve": Seq(NUMBER)}
    explained = {**method, "verdict": str, "verdict_smooth": str}   # vs pixel noise, vs smooth noise
    group = ({"n": 0}, {"n": int, "fractions": Seq(NUMBER),
                        "methods": {**{m: explained for m in CAM_EXPLAINERS}, **{m: method for m in RANDOM_BASELINES}}})
    sanity_method = {"steps": Seq(str), "median_spearman_signed": Seq(MAYBE_NUMBER), "median_ssim": Seq(NUMBER),
                     "verdict": {"passed": (bool, None), "reason": str, "step_index": (int, None),
                                 "median_ssim": NUMBER, "median_per_step": Each(NUMBER)}}
    suspects = {"n_test": int, "suspects": int, "flagged_fraction": NUMBER, "reliable": bool,
                "suspect_positions": Seq(int), "failures": int, "suspect_failures": int,
                "suspect_failure_positions": Seq(int), "model_error_positions": Seq(int)}
    schema: dict[str, Any] = {
        "faithfulness": {m: {"failures": group, "sample": group} for m in models},
        "sanity": {m: {"n": int, **{c: sanity_method for c in CAM_EXPLAINERS}} for m in models},
        "label_suspects": {m: suspects for m in models},
        "sanity_maps": (None, {"model": str, "steps": Seq(str), "maps": Seq(Seq(Seq(Seq(NUMBER))))}),
    }
    if {"baseline", "improved"} <= set(models):
        drift_group = ({"n": 0}, {"n": int, "median_spearman": MAYBE_NUMBER, "moved_onto_centre": int,
                                  "centre_fraction": {"baseline": NUMBER, "improved": NUMBER}})
        schema["drift"] = {"layer": str, "fixed": drift_group, "persisting": drift_group, "new": drift_group}
        schema["label_agreement"] = {"count": int, "positions": Seq(int),
                                     "failures": {"baseline": Seq(int), "improved": Seq(int)}}
    return schema


def read_cache(path: Path, key: dict, schema: dict | None = None,
               log: Callable[[str], None] | None = None) -> dict | None:
    """The results of a JSON cache {"key": ..., "results": ...} when its key
    equals `key` and its results fit `schema`; None when it is missing, made
    otherwise, unreadable or malformed (the last two logged)."""
    try:
        cached = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        problem = f"unreadable ({type(exc).__name__})"
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
