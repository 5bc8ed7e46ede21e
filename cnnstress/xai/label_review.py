"""Ground truth for failure triage: a human review of CIFAR-10 test labels.

Northcutt, Athalye & Mueller ("Pervasive Label Errors in Test Sets
Destabilize Machine Learning Benchmarks", NeurIPS 2021 Datasets and
Benchmarks) had five crowd workers judge each of 275 CIFAR-10 test images
that confident learning had flagged; 54 are label errors by the paper's
criterion (fewer than 3 of 5 workers chose the given label). The review and
the official test label sequence ship as package data (cnnstress/resources,
from cleanlab/label-errors, Apache-2.0).

Every index here is an official test index (position in the official
test_batch), never a position in the loaded split: a loaded split's
`indices` (cnnstress.data.Split) maps positions to official indices. The
review only applies when the loaded test set is in the official order;
`check_order` tells, and the ground-truth parts step aside otherwise.

The 275 reviewed images are not a random sample but the ones the paper's
models found most suspicious, so precision is measured on the reviewed
images only (an unreviewed flag is neither right nor wrong) and recall on
the confirmed errors present in the loaded test set.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping

import numpy as np

from ..arrays import as_int_vector, as_numpy
from ..errors import DataError
from ..results import Record

REVIEW_FILE = "cifar10-test-label-review.csv"
LABELS_FILE = "cifar10-test-labels.txt"
REVIEW_COLUMNS = ("index", "given_label", "guessed_label", "votes_given", "votes_guessed", "votes_neither",
                  "votes_both", "label_error")
N_TEST = 10_000
N_CLASSES = 10
N_REVIEWED = 275
N_CONFIRMED = 54
WORKERS = 5            # judgements per reviewed image
ERROR_BELOW = 3        # a label error: fewer than 3 of the 5 chose the given label
SKIPPED = "ground-truth triage is skipped — regenerate data/ with ../shared/tools/cifar10_offline.py"
LABEL_ERROR = "reviewed: label error"
LABEL_CORRECT = "reviewed: label correct"
NOT_REVIEWED = "not reviewed"


# --- the package data -----------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ReviewEntry(Record):
    """One reviewed image: its official test index, the given (official) and
    the guessed label (class ids 0-9), the five workers' votes for the given
    label, the guessed one, neither, both (they sum to 5), and label_error
    (votes_given < 3, the paper's criterion)."""
    index: int
    given_label: int
    guessed_label: int
    votes_given: int
    votes_guessed: int
    votes_neither: int
    votes_both: int
    label_error: bool


def _damaged(name: str, why: str) -> DataError:
    return DataError(f"the package data file cnnstress/resources/{name} is damaged ({why}); "
                     f"restore it from the cnnstress sources or reinstall cnnstress")


def _text(name: str) -> str:
    try:
        return resources.files("cnnstress.resources").joinpath(name).read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise _damaged(name, f"unreadable: {type(exc).__name__}") from None


def _lines(text: str) -> tuple[list[str], list[tuple[int, str]]]:
    """The leading '#' comment lines (without '#') and the other non-blank
    lines as (line number, text)."""
    header, body = [], []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line.startswith("#") and not body:
            header.append(line.lstrip("#").strip())
        elif line:
            body.append((number, line))
    return header, body


def source_line(name: str = REVIEW_FILE) -> str:
    """The header's 'Source: ...' line of a package data file (where it comes
    from and its licence), without the '#'."""
    for line in _lines(_text(name))[0]:
        if line.startswith("Source:"):
            return line
    raise _damaged(name, "no 'Source:' line in its header")


def parse_official_labels(text: str) -> np.ndarray:
    """The label file's text (comment header, then lines of digits) as int64
    (10000,) in [0, 10); DataError unless it holds exactly 10,000 digits."""
    _, body = _lines(text)
    for number, line in body:
        if not (line.isascii() and line.isdigit()):
            raise _damaged(LABELS_FILE, f"line {number} holds something other than digits")
    labels = np.frombuffer("".join(line for _, line in body).encode("ascii"), dtype=np.uint8) - ord("0")
    if labels.size != N_TEST:
        raise _damaged(LABELS_FILE, f"{labels.size} labels instead of {N_TEST}")
    return labels.astype(np.int64)


@functools.cache
def _official() -> np.ndarray:
    return parse_official_labels(_text(LABELS_FILE))


def official_test_labels() -> np.ndarray:
    """The official CIFAR-10 test labels in test_batch order, int64 (10000,)
    in [0, 10)."""
    return _official().copy()


def _entry(number: int, line: str, official: np.ndarray) -> ReviewEntry:
    fields = line.split(",")
    if len(fields) != len(REVIEW_COLUMNS) or not all(re.fullmatch(r"[0-9]+", f) for f in fields):
        raise _damaged(REVIEW_FILE, f"line {number} is not {len(REVIEW_COLUMNS)} whole numbers")
    index, given, guessed, v_given, v_guessed, v_neither, v_both, error = map(int, fields)
    why = None
    if index >= N_TEST:
        why = f"index {index} is not a test index"
    elif given >= N_CLASSES or guessed >= N_CLASSES or given == guessed:
        why = "labels outside 0-9 or given = guessed"
    elif given != official[index]:
        why = f"given label {given} differs from the official label {official[index]} of image {index}"
    elif v_given + v_guessed + v_neither + v_both != WORKERS:
        why = f"the votes do not add up to {WORKERS}"
    elif error not in (0, 1) or bool(error) != (v_given < ERROR_BELOW):
        why = f"label_error {error} does not follow from {v_given} of {WORKERS} votes for the given label"
    if why:
        raise _damaged(REVIEW_FILE, f"line {number}: {why}")
    return ReviewEntry(index=index, given_label=given, guessed_label=guessed, votes_given=v_given,
                       votes_guessed=v_guessed, votes_neither=v_neither, votes_both=v_both, label_error=bool(error))


def parse_review(text: str, official: np.ndarray) -> dict[int, ReviewEntry]:
    """The review file's text (comment header, the REVIEW_COLUMNS line, one
    row per image) as entries keyed by official index, checked row by row
    against `official` (int (10000,), the official labels): whole numbers,
    ranges, votes adding up to 5, label_error = votes_given < 3, given label
    = official label, no image twice. DataError naming the first bad line."""
    _, body = _lines(text)
    if not body or tuple(body[0][1].split(",")) != REVIEW_COLUMNS:
        raise _damaged(REVIEW_FILE, f"its column header is not {','.join(REVIEW_COLUMNS)}")
    entries: dict[int, ReviewEntry] = {}
    for number, line in body[1:]:
        entry = _entry(number, line, official)
        if entry.index in entries:
            raise _damaged(REVIEW_FILE, f"line {number}: image {entry.index} appears twice")
        entries[entry.index] = entry
    return entries


@functools.cache
def _review() -> tuple[ReviewEntry, ...]:
    entries = parse_review(_text(REVIEW_FILE), _official())
    errors = sum(e.label_error for e in entries.values())
    if len(entries) != N_REVIEWED or errors != N_CONFIRMED:   # it must be the paper's review, all of it
        raise _damaged(REVIEW_FILE, f"{len(entries)} images with {errors} label errors instead of "
                                    f"{N_REVIEWED} with {N_CONFIRMED}")
    return tuple(entries.values())


def load_review() -> dict[int, ReviewEntry]:
    """The 275 reviewed images keyed by official test index (ascending). The
    file is validated (columns, ranges, votes, given label = official label,
    275 images, 54 label errors); a damaged one raises a one-line DataError."""
    return {e.index: e for e in sorted(_review(), key=lambda e: e.index)}


def review_note(entry: ReviewEntry, classes: Any, *, short: bool = False) -> str:
    """The review of one image in a line for a figure: 'reviewed: label error,
    5 of 5 reviewers: frog' (the votes for the reviewers' guessed label) or
    'reviewed: label correct, 4 of 5 reviewers: cat' (the votes for the given
    label); short (an image tile): '5 of 5 reviewers: frog' or 'reviewed:
    label correct'. classes: class names indexed by class id."""
    votes = f"{entry.votes_guessed} of {WORKERS} reviewers: {classes[entry.guessed_label]}"
    if entry.label_error:
        return votes if short else f"{LABEL_ERROR}, {votes}"
    if short:
        return LABEL_CORRECT
    return f"{LABEL_CORRECT}, {entry.votes_given} of {WORKERS} reviewers: {classes[entry.given_label]}"


def review_verdict(index: int, review: Mapping[int, ReviewEntry]) -> str:
    """'reviewed: label error', 'reviewed: label correct' or 'not reviewed'
    for the image at official test index `index`."""
    entry = review.get(int(index))
    if entry is None:
        return NOT_REVIEWED
    return LABEL_ERROR if entry.label_error else LABEL_CORRECT


# --- is the loaded test set the official one? -----------------------------------

@dataclass(frozen=True, kw_only=True)
class OrderCheck(Record):
    """Whether the loaded test labels are the official labels at their
    indices (check_order): n loaded images; differing labels (None when the
    indices cannot be compared: wrong length, out of range, repeated);
    reason: one line when not official, else None."""
    official: bool
    n: int
    differing: int | None
    reason: str | None


def check_order(labels: Any, dataset_indices: Any = None, official: Any = None) -> OrderCheck:
    """Is the loaded test set in the official order? labels: int (N,) as
    loaded; dataset_indices: int (N,) official test indices of those images
    (Split.indices; default 0..N-1, the whole set in file order); official:
    int (10000,) the official labels (default official_test_labels()).

    Official when labels == official_test_labels()[dataset_indices]: the full
    set or a subset named by its official indices. Labels are all it sees:
    a reordering that only swaps images of the same class goes unnoticed, and
    a handful of images can match by chance; for any real reordering of
    hundreds of images a mismatch is certain in practice."""
    y = as_int_vector(labels, "labels")
    idx = np.arange(y.size) if dataset_indices is None else as_int_vector(dataset_indices, "dataset_indices")
    n = int(y.size)
    if idx.size != n:
        why = f"the loaded test set has {n} labels but {idx.size} indices"
    elif idx.size and (idx.min() < 0 or idx.max() >= N_TEST):
        why = (f"the loaded test set's indices are not official test indices "
               f"({int(((idx < 0) | (idx >= N_TEST)).sum())} outside 0-{N_TEST - 1})")
    elif np.unique(idx).size != idx.size:
        why = f"the loaded test set repeats official test indices ({idx.size - np.unique(idx).size} repeats)"
    else:
        reference = _official() if official is None else as_int_vector(official, "official")
        differing = int((reference[idx] != y).sum())
        if differing == 0:
            return OrderCheck(official=True, n=n, differing=0, reason=None)
        return OrderCheck(official=False, n=n, differing=differing,
                          reason=f"the loaded test set is not in the official order ({differing} of {n} labels "
                                 f"differ); {SKIPPED}")
    return OrderCheck(official=False, n=n, differing=None, reason=f"{why}; {SKIPPED}")


def applicable_review(labels: Any, dataset_indices: Any) -> tuple[OrderCheck, dict[int, ReviewEntry]]:
    """check_order of a loaded test set (labels, dataset_indices: int (N,) as
    in check_order) and the review when it applies: load_review() when the
    set is official, else {} (the ground-truth parts then step aside). The
    one place the stages look the official labels and the review up."""
    order = check_order(labels, dataset_indices, official=official_test_labels())
    return order, (load_review() if order.official else {})


# --- triage against the review --------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Ratio(Record):
    """hits of total and value = hits / total in [0, 1], None when total = 0
    (so a reader sees 3/5, not just 0.6)."""
    hits: int
    total: int
    value: float | None


def ratio(hits: int, total: int) -> Ratio:
    return Ratio(hits=int(hits), total=int(total), value=hits / total if total else None)


@dataclass(frozen=True, kw_only=True)
class FlagScore(Record):
    """A set of flagged test images against the review (flag_scores): flagged
    images, how many the review covers (reviewed); precision = flagged
    confirmed errors / flagged reviewed images; recall = flagged confirmed
    errors / confirmed errors in the loaded test set; confirmed and
    reviewed_correct: the flagged images the review calls a label error /
    correctly labelled (official indices, ascending)."""
    flagged: int
    reviewed: int
    precision: Ratio
    recall: Ratio
    confirmed: list[int]
    reviewed_correct: list[int]


@dataclass(frozen=True, kw_only=True)
class PrecisionAtK(Record):
    """Among the k most suspicious failures, hits confirmed label errors;
    precision = hits / k in [0, 1]."""
    k: int
    hits: int
    precision: float


@dataclass(frozen=True, kw_only=True)
class GroundTruthTriage(Record):
    """One model's high-confidence failures against the review (triage).
    Indices are official test indices, ascending unless ranked.

    failures: how many; confirmed_loaded: confirmed label errors in the
    loaded test set (54 on the full set); errors_among_failures: of those,
    how many the model fails on confidently; failures_with_label_error: of
    the failures, how many are confirmed label errors; label_error /
    label_correct: the failures the review calls a label error / correctly
    labelled ('reviewed: label correct'); not_reviewed: failures the review
    does not cover; flags: the confident-learning flags (all loaded images,
    not only failures) against the review; ranked: the failures most
    suspicious first (lowest score; ties by index) and precision_at_k for
    k = 1..failures, both None without scores."""
    failures: int
    confirmed_loaded: int
    errors_among_failures: Ratio
    failures_with_label_error: Ratio
    label_error: list[int]
    label_correct: list[int]
    not_reviewed: int
    flags: FlagScore
    ranked: list[int] | None
    precision_at_k: list[PrecisionAtK] | None


def _loaded(loaded_indices: Any) -> np.ndarray:
    idx = as_int_vector(loaded_indices, "loaded_indices")
    if idx.size and (idx.min() < 0 or idx.max() >= N_TEST):
        raise ValueError(f"loaded_indices must be official test indices in [0, {N_TEST})")
    if np.unique(idx).size != idx.size:
        raise ValueError("loaded_indices repeats an index")
    return idx


def _subset(indices: Any, name: str, loaded: np.ndarray) -> np.ndarray:
    """`indices` as int64 (K,) after checking they are distinct and loaded."""
    idx = as_int_vector(indices, name)
    if np.unique(idx).size != idx.size:
        raise ValueError(f"{name} repeats an index")
    if not np.isin(idx, loaded).all():
        raise ValueError(f"{name} must be official indices of loaded test images (map positions with Split.indices)")
    return idx


def _errors(review: Mapping[int, ReviewEntry]) -> set[int]:
    return {i for i, e in review.items() if e.label_error}


def _flag_scores(flagged: np.ndarray, review: Mapping[int, ReviewEntry], loaded: np.ndarray) -> FlagScore:
    errors = _errors(review)
    reviewed = [int(i) for i in flagged if int(i) in review]
    confirmed = sorted(i for i in reviewed if i in errors)
    errors_loaded = sum(int(i) in errors for i in loaded)
    return FlagScore(flagged=int(flagged.size), reviewed=len(reviewed),
                     precision=ratio(len(confirmed), len(reviewed)), recall=ratio(len(confirmed), errors_loaded),
                     confirmed=confirmed, reviewed_correct=sorted(i for i in reviewed if i not in errors))


def flag_scores(flagged_indices: Any, review: Mapping[int, ReviewEntry], loaded_indices: Any) -> FlagScore:
    """Precision and recall of flagged images against the review, for the
    confident-learning flags of one model or the two-model agreement set.
    flagged_indices: int (K,) distinct official indices, all among
    loaded_indices: int (N,) the loaded test set's official indices."""
    loaded = _loaded(loaded_indices)
    return _flag_scores(_subset(flagged_indices, "flagged_indices", loaded), review, loaded)


def precision_at_k(ranked_indices: Any, review: Mapping[int, ReviewEntry]) -> list[PrecisionAtK]:
    """Precision at k = 1..K of a ranking (int (K,) official indices, most
    suspicious first): the share of the first k that are confirmed label
    errors. An unreviewed image counts as not a confirmed error, so this is
    a lower bound where the ranking reaches beyond the reviewed images."""
    errors = _errors(review)
    hits = np.cumsum([int(i) in errors for i in as_int_vector(ranked_indices, "ranked_indices")])
    return [PrecisionAtK(k=k, hits=int(h), precision=float(h) / k) for k, h in enumerate(hits, 1)]


def triage(failure_indices: Any, flagged_indices: Any, review: Mapping[int, ReviewEntry], loaded_indices: Any,
           scores: Any = None) -> GroundTruthTriage:
    """One model's failures and confident-learning flags against the review.

    Call only when check_order says the loaded test set is official.
    failure_indices: int (F,) official indices of the high-confidence
    failures; flagged_indices: int (K,) official indices of the model's
    confident-learning flags over the loaded test set; review: load_review();
    loaded_indices: int (N,) official indices of the loaded test images
    (Split.indices); scores: float (F,) label-quality scores of the failures
    in failure_indices' order (label_quality_scores: lower = more suspicious)
    or None. Precision at k counts an unreviewed failure as not a confirmed
    error (see precision_at_k). Raises ValueError when an index repeats or is
    not loaded, or scores has the wrong shape."""
    loaded = _loaded(loaded_indices)
    failures = _subset(failure_indices, "failure_indices", loaded)
    flagged = _subset(flagged_indices, "flagged_indices", loaded)
    errors = _errors(review)
    label_error = sorted(int(i) for i in failures if int(i) in errors)
    label_correct = sorted(int(i) for i in failures if int(i) in review and int(i) not in errors)
    confirmed_loaded = sum(int(i) in errors for i in loaded)
    ranked = at_k = None
    if scores is not None:
        s = as_numpy(scores).astype(np.float64)
        if s.shape != failures.shape or not np.isfinite(s).all():
            raise ValueError(f"scores must be {failures.size} finite numbers, one per failure, got shape {s.shape}")
        ranked = [int(i) for i in failures[np.lexsort((failures, s))]]   # by score, then index
        at_k = precision_at_k(ranked, review)
    return GroundTruthTriage(
        failures=int(failures.size), confirmed_loaded=confirmed_loaded,
        errors_among_failures=ratio(len(label_error), confirmed_loaded),
        failures_with_label_error=ratio(len(label_error), failures.size),
        label_error=label_error, label_correct=label_correct,
        not_reviewed=int(failures.size) - len(label_error) - len(label_correct),
        flags=_flag_scores(flagged, review, loaded), ranked=ranked, precision_at_k=at_k)
