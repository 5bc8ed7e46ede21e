"""Typed results: dataclasses whose dict form is the metrics.json and cache schema.

A result class subclasses `Record` and declares its fields with type hints;
`to_dict()` gives the JSON-ready dict and `from_dict()` reads one back, so the
fields *are* the schema. Field names equal the JSON keys; keys that are not
identifiers ("gradcam++", "1/255") live in `dict[str, X]` fields.

Supported field types: the JSON scalars (bool, int, float, str, None), Record
subclasses, list[X], tuple[X, ...], dict[str, X], X | None, and Any (kept
as is). `from_dict` checks types as it goes and raises `ResultFormatError`
naming the first path that does not fit; a cache reader treats that as a miss.
Keys the type does not name are ignored by `from_dict` (so a metrics.json
section with extra keys reads as its Record).

Three field markers keep the dict form exactly as the producers write it:
  optional()     a key some dicts lack: default None, left out of to_dict when
                 None (a present null and an absent key differ in JSON; a
                 Record can override `omits` for a rule of its own).
  other_keys()   a dict[str, X] field holding every key the other fields do
                 not name, written flat in its place ({"n": 3, "gradcam": ...}).
  transient()    in memory only (e.g. the predictions a later stage reads):
                 never written, None when read back.
to_dict writes the fields in declaration order, so a Record's fields are
declared in the order its producer writes the keys.

Ranges: a field typed Fraction, Signed, Count or GreyLevel (a number
Annotated with a Range) is refused by from_dict outside it, so a cache with
an impossible value is a miss like a malformed one.

Units: accuracies, ECE/MCE and other rates are fractions in [0, 1]; AUCs are
in [0, 1]; positions are indices into the loaded test split; seconds are wall
time. NaN (an undefined statistic) may appear where a float is allowed.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from .errors import ResultFormatError

if TYPE_CHECKING:
    from .evaluate import Predictions

R = TypeVar("R", bound="Record")

_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls, include_extras=True)
    return _HINTS[cls]


@dataclass(frozen=True)
class Range:
    """Annotated[float | int, Range(lo, hi)]: a number from_dict accepts only
    in [lo, hi] (a NaN passes: an undefined statistic)."""
    lo: float
    hi: float

    def problem(self, value: Any, where: str) -> str | None:
        if value != value or self.lo <= value <= self.hi:
            return None
        return f"{where} is {value!r}, expected {self.lo}..{self.hi}"


Fraction = Annotated[float, Range(0.0, 1.0)]      # accuracies, calibration errors, shares of images
Signed = Annotated[float, Range(-1.0, 1.0)]       # differences of fractions, correlations
Count = Annotated[int, Range(0, math.inf)]         # images, steps, bins; positions (bounded by the split)
GreyLevel = Annotated[int, Range(0, 255)]


def optional() -> Any:
    """A field for a key that some dicts lack: None when absent, and left out
    of to_dict when None."""
    return field(default=None, metadata={"omit_none": True})


def transient() -> Any:
    """A field for what a result carries in memory only (tensors a later stage
    reads): never in to_dict, None when read back from a dict."""
    return field(default=None, compare=False, repr=False, metadata={"transient": True})


def other_keys() -> Any:
    """A dict[str, X] field that holds the keys no other field names, written
    flat at its place in to_dict (at most one per Record)."""
    return field(default_factory=dict, metadata={"rest": True})


def _rest_field(cls: type) -> dataclasses.Field | None:
    rest = [f for f in dataclasses.fields(cls) if f.metadata.get("rest")]  # type: ignore[arg-type]
    if len(rest) > 1:
        raise TypeError(f"{cls.__name__} has more than one other_keys() field")
    return rest[0] if rest else None


class Record:
    """Mixin for result dataclasses: dict round trip driven by the type hints."""

    def omits(self, f: dataclasses.Field, value: Any) -> bool:
        """Whether to_dict leaves field `f` (holding `value`) out: by default an
        optional() field holding None."""
        return value is None and bool(f.metadata.get("omit_none"))

    def to_dict(self) -> dict[str, Any]:
        fields = dataclasses.fields(self)  # type: ignore[arg-type]
        out: dict[str, Any] = {}
        for f in fields:
            value = getattr(self, f.name)
            if f.metadata.get("transient") or self.omits(f, value):
                continue
            if f.metadata.get("rest"):
                clash = sorted(set(value) & {g.name for g in fields})
                if clash:
                    raise ValueError(f"{type(self).__name__}.{f.name} holds keys that are fields: {clash}")
                out.update((k, _dump(v)) for k, v in value.items())
            else:
                out[f.name] = _dump(value)
        return out

    @classmethod
    def from_dict(cls: type[R], data: Any, where: str | None = None) -> R:
        return _load(cls, data, where or cls.__name__)


def _dump(value: Any) -> Any:
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, dict):
        return {k: _dump(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_dump(v) for v in value]
    return value


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _load(tp: Any, data: Any, where: str) -> Any:
    if tp is Any:
        return data
    if typing.get_origin(tp) is Annotated:
        base, *marks = typing.get_args(tp)
        value = _load(base, data, where)
        problem = next((m.problem(value, where) for m in marks if isinstance(m, Range)), None)
        if problem:
            raise ResultFormatError(problem)
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        alternatives = typing.get_args(tp)
        if data is None and type(None) in alternatives:
            return None
        last = None
        for alt in alternatives:
            if alt is type(None):
                continue
            try:
                return _load(alt, data, where)
            except ResultFormatError as exc:
                last = exc
        raise last or ResultFormatError(f"{where} is {_kind(data)}, expected one of {tp}")
    if origin in (list, tuple):
        if not isinstance(data, (list, tuple)):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a list")
        args = typing.get_args(tp)
        item = args[0] if args else Any
        items = [_load(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(data, dict):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected an object")
        value_type = typing.get_args(tp)[1] if typing.get_args(tp) else Any
        return {k: _load(value_type, v, f"{where}.{k}") for k, v in data.items()}
    if isinstance(tp, type) and issubclass(tp, Record):
        if not isinstance(data, dict):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected an object")
        values = {}
        rest = _rest_field(tp)
        if rest is not None:
            named = {f.name for f in dataclasses.fields(tp) if f is not rest}  # type: ignore[arg-type]
            values[rest.name] = _load(_hints(tp)[rest.name], {k: v for k, v in data.items() if k not in named},
                                      where)
        for f in dataclasses.fields(tp):  # type: ignore[arg-type]
            if f is rest or f.metadata.get("transient"):
                continue
            if f.name in data:
                values[f.name] = _load(_hints(tp)[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ResultFormatError(f"{where}.{f.name} is missing")
        return tp(**values)
    if tp is type(None):
        if data is not None:
            raise ResultFormatError(f"{where} is {_kind(data)}, expected null")
        return None
    if tp is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a number")
        return data  # an int stays an int, so a round trip gives back the same JSON
    if tp is int:
        if isinstance(data, bool) or not isinstance(data, int):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected a whole number")
        return data
    if tp in (str, bool):
        if not isinstance(data, tp):
            raise ResultFormatError(f"{where} is {_kind(data)}, expected {tp.__name__}")
        return data
    raise TypeError(f"{where}: unsupported field type {tp!r} in a Record")


# ---------------------------------------------------------------------------
# Failures stage: evaluate.summarize()
# ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class ConfusedPair(Record):
    """An unordered class pair: a before b in class order; a_as_b = images of
    class a predicted b (count), b_as_a likewise; total = their sum; rate =
    total / (support a + support b), a fraction (None when undefined)."""
    a: str
    b: str
    a_as_b: int
    b_as_a: int
    total: int
    rate: float | None


@dataclass(frozen=True, kw_only=True)
class TestSummary(Record):
    """One model on the test split (evaluate.summarize). Accuracies, loss and
    confidences are None when undefined (empty split, class without images).
    confusion_matrix: counts (C,C), row = true class, column = prediction;
    high_confidence_failures: wrong predictions above `threshold` confidence."""
    __test__ = False  # a result type, not a pytest class
    test_accuracy: float | None
    n: int
    loss: float | None                             # mean cross-entropy, nats
    per_class_accuracy: dict[str, float | None]    # class name -> recall
    high_confidence_failures: int
    threshold: float                               # confidence in [0, 1)
    mean_confidence: float | None
    confusion_matrix: list[list[int]]
    top_confused_pairs: list[ConfusedPair]


# ---------------------------------------------------------------------------
# Comparison stage: pipeline.compare_models() and compare.*
# ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class AccuracyDiff(Record):
    """Paired bootstrap of acc_b - acc_a (compare.bootstrap_accuracy_diff):
    diff, low, high in [-1, 1] (the percentile interval at `confidence`);
    acc_a, acc_b in [0, 1]; n paired images, n_boot resamples."""
    diff: float
    low: float
    high: float
    n_boot: int
    confidence: float
    seed: int
    n: int
    acc_a: float
    acc_b: float


@dataclass(frozen=True, kw_only=True)
class McNemar(Record):
    """McNemar's test (compare.mcnemar): b = A right & B wrong, c = A wrong &
    B right (image counts); method "exact" (binomial) or "chi2_cc"."""
    b: int
    c: int
    n_discordant: int
    n: int
    statistic: float
    p_value: float
    method: str


@dataclass(frozen=True, kw_only=True)
class FailureCounts(Record):
    """Sizes of A's and B's failure tables and of each FailureGroups list."""
    a: int
    b: int
    fixed: int
    persisting: int
    still_high_confidence: int
    wrong_low_confidence: int
    new: int
    newly_confident: int


@dataclass(frozen=True, kw_only=True)
class FailureGroups(Record):
    """Where A's high-confidence failures went under B and where B's came from
    (compare.compare_failures): sorted positions in the test split."""
    fixed: list[int]
    persisting: list[int]
    still_high_confidence: list[int]
    wrong_low_confidence: list[int]
    new: list[int]
    newly_confident: list[int]
    counts: FailureCounts


@dataclass(frozen=True, kw_only=True)
class Comparison(Record):
    """Baseline (A) vs improved (B) on the same test images
    (pipeline.compare_models). config_diff ({field: [baseline, improved]}) is
    in metrics.json's copy only: absent from compare_models' dict."""
    config_diff: dict[str, list[Any]] | None = optional()
    accuracy_diff: AccuracyDiff
    mcnemar: McNemar
    failures: FailureGroups
    threshold: float | None        # failure confidence threshold in [0, 1)
    # model -> {class: test accuracy} of the predictions compared (the report's per-class gains)
    per_class_accuracy: dict[str, dict[str, float | None]] = transient()

    def _repr_markdown_(self) -> str:
        """In a notebook: the accuracy change with its interval and test, and the failure groups."""
        d, mc, fc = self.accuracy_diff, self.mcnemar, self.failures.counts
        t = f" above {self.threshold:.0%} confidence" if self.threshold is not None else ""
        return (f"**comparison**: test accuracy {100 * d.acc_a:.2f}% -> {100 * d.acc_b:.2f}% "
                f"({100 * d.diff:+.2f} points, {d.confidence:.0%} interval [{100 * d.low:+.2f}, "
                f"{100 * d.high:+.2f}]; McNemar p = {mc.p_value:.3g})\n\n"
                f"| failures{t} | baseline | improved | fixed | still failing | new | newly confident |\n"
                "|---|---|---|---|---|---|---|\n"
                f"| count | {fc.a} | {fc.b} | {fc.fixed} | {fc.still_high_confidence} | {fc.new} | "
                f"{fc.newly_confident} |")


# ---------------------------------------------------------------------------
# Stress stage: stress.calibration_report / corruption_report,
# adversarial.adversarial_accuracy, pipeline.stress_test
# ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class CalibrationBins(Record):
    """Calibration on the clean test set with equal-width confidence bins:
    ece, mce fractions in [0, 1]; count (bins,) images per bin; accuracy and
    confidence (bins,) per bin, None for an empty bin; nll in nats; failures:
    wrong predictions above the failure threshold (set by with_failure_counts)."""
    ece: Fraction
    mce: Fraction
    count: list[Count]
    accuracy: list[Fraction | None]
    confidence: list[Fraction | None]
    nll: float
    failures: Count | None = optional()


@dataclass(frozen=True, kw_only=True)
class Calibration(Record):
    """Temperature scaling fitted on val_n validation images, measured on
    test_n test images, before (uncalibrated) and after (calibrated);
    temperature > 0 divides the logits; bins: number of ECE bins."""
    bins: Count
    temperature: float
    val_n: Count
    test_n: Count
    uncalibrated: CalibrationBins
    calibrated: CalibrationBins
    failure_threshold: float | None = optional()   # confidence in [0, 1) of the failure counts


@dataclass(frozen=True, kw_only=True)
class CorruptionGrid(Record):
    """One model on n stratified test images under every corruption type at
    severities 1-5. accuracy/ece/ece_calibrated: {type: [5 values]},
    fractions; the means and drop_from_clean (clean - mean corruption
    accuracy) likewise, mean_corruption_accuracy over all 15 types and
    mean_corruption_accuracy_without_frost over the 14 of earlier runs;
    *_by_severity: 5 values; accuracy_by_family: {family: mean accuracy}."""
    n: Count
    positions_seed: int
    clean_accuracy: Fraction
    clean_ece: Fraction
    accuracy: dict[str, list[Fraction]]
    ece: dict[str, list[Fraction]]
    ece_calibrated: dict[str, list[Fraction]]
    mean_corruption_accuracy: Fraction
    mean_corruption_accuracy_without_frost: Fraction
    drop_from_clean: Signed
    accuracy_by_severity: list[Fraction]
    accuracy_by_family: dict[str, Fraction]
    ece_by_severity: list[Fraction]
    ece_calibrated_by_severity: list[Fraction]


@dataclass(frozen=True, kw_only=True)
class AttackCurves(Record):
    """Accuracy of one model on n attacked test images
    (adversarial.adversarial_accuracy): eps in pixel units ([0, 1] scale),
    eps_255 the same budgets in grey levels (added by the stress stage);
    fgsm/pgd: accuracy per eps (None when n = 0), present for the attacks
    run; steps: PGD iterations."""
    n: Count
    eps: list[float]
    clean_accuracy: Fraction | None
    fgsm: list[Fraction | None] | None = optional()
    pgd: list[Fraction | None] | None = optional()
    steps: Count
    step_size_rule: str
    seed: int
    eps_255: list[GreyLevel] | None = optional()


@dataclass(frozen=True, kw_only=True)
class StressSeconds(Record):
    """Wall time of the stress stage for one model, seconds (the corruption
    pass is shared by the models and split evenly)."""
    calibration_and_corruptions: float
    adversarial: float


@dataclass(frozen=True, kw_only=True)
class StressResult(Record):
    """One model's stress results (stress_<model>.json "results")."""
    calibration: Calibration
    corruptions: CorruptionGrid
    adversarial: AttackCurves
    seconds: StressSeconds


def with_failure_counts(calibration: Calibration, test_predictions: "Predictions",
                        threshold: float) -> Calibration:
    """A copy of `calibration` with the failure counts (wrong predictions
    with confidence above `threshold`, before and after temperature scaling)
    and failure_threshold set; the numbers stress.count_failures writes."""
    from .robustness.calibration import apply_temperature, confident_errors

    labels = test_predictions.labels
    scaled = apply_temperature(test_predictions.logits, calibration.temperature)
    return dataclasses.replace(
        calibration, failure_threshold=threshold,
        uncalibrated=dataclasses.replace(calibration.uncalibrated,
                                         failures=confident_errors(test_predictions.probs, labels, threshold)),
        calibrated=dataclasses.replace(calibration.calibrated, failures=confident_errors(scaled, labels, threshold)))


# ---------------------------------------------------------------------------
# Explanation stage: explain.* and pipeline.explain_models
# ---------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class PairedDiff(Record):
    """Mean per-image AUC difference method - random map and its 95% Student-t
    interval [low, high] (NaN with fewer than two images)."""
    mean_diff: float
    low: float
    high: float


@dataclass(frozen=True, kw_only=True)
class PairedComparison(Record):
    """A CAM method against one random map, on deletion and on insertion AUC."""
    deletion: PairedDiff
    insertion: PairedDiff


@dataclass(frozen=True, kw_only=True)
class MethodFaithfulness(Record):
    """Deletion/insertion of one saliency method on a group: mean AUCs in
    [0, 1] (deletion: lower is better), mean curves (steps + 1 values, the
    predicted class's probability), per-image AUCs. For a CAM method also the
    paired comparison and verdict against pixel noise (vs_random, verdict)
    and smooth noise (vs_random_smooth, verdict_smooth); absent for the
    random maps themselves."""
    deletion_auc: float
    insertion_auc: float
    deletion_curve: list[float]
    insertion_curve: list[float]
    deletion_aucs: list[float]
    insertion_aucs: list[float]
    vs_random: PairedComparison | None = optional()
    verdict: str | None = optional()
    vs_random_smooth: PairedComparison | None = optional()
    verdict_smooth: str | None = optional()


@dataclass(frozen=True, kw_only=True)
class FaithfulnessGroup(Record):
    """Faithfulness on n images (explain.faithfulness_group); an empty group is
    {"n": 0} only. cam_resolution: (h, w) of the raw CAM; methods: {method:
    stats} for "gradcam", "gradcam++", "random", "random_smooth"; fractions:
    share of pixels removed/inserted at each step, in [0, 1]."""
    n: Count
    cam_resolution: list[int] | None = optional()
    methods: dict[str, MethodFaithfulness] | None = optional()
    fractions: list[Fraction] | None = optional()


@dataclass(frozen=True, kw_only=True)
class Faithfulness(Record):
    """One model's faithfulness on its top failures and on a fixed stratified sample."""
    failures: FaithfulnessGroup
    sample: FaithfulnessGroup


@dataclass(frozen=True, kw_only=True)
class SanityVerdict(Record):
    """Pass/fail of the parameter-randomisation test (sanity.verdict): passed
    None when undecidable (reason says why); median: median |Spearman| in
    [0, 1] at step `step` (index step_index); median_per_step: {step: median};
    n_used images with a defined score, n_nan without."""
    passed: bool | None
    reason: str
    step: str | None
    step_index: int | None
    metric: str
    threshold: float
    median: float
    median_ssim: float
    n_images: int
    n_used: int
    n_nan: int
    median_per_step: dict[str, float]


@dataclass(frozen=True, kw_only=True)
class SanityMethod(Record):
    """One CAM method's cascading randomisation: steps ("original", then each
    re-initialised block), the verdict, and per step the median signed
    Spearman in [-1, 1] (None when undefined) and median SSIM."""
    steps: list[str]
    verdict: SanityVerdict
    median_spearman_signed: list[float | None]
    median_ssim: list[float]


@dataclass(frozen=True, kw_only=True)
class SanitySummary(Record):
    """explain.sanity_report's summary for one model: n images at
    dataset_positions (positions in the test split) and, flat beside them,
    {method: SanityMethod} for "gradcam" and "gradcam++"."""
    n: Count
    dataset_positions: list[Count]
    methods: dict[str, SanityMethod] = other_keys()


@dataclass(frozen=True, kw_only=True)
class LabelTriage(Record):
    """Confident-learning label suspects for one model (explain.label_suspects):
    counts of n_test images; flagged_fraction in [0, 1]; reliable False when
    too many are flagged to tell wrong labels from model errors; positions in
    the test split (failure positions in rank order)."""
    n_test: Count
    suspects: Count
    flagged_fraction: Fraction
    reliable: bool
    suspect_positions: list[Count]
    failures: Count
    suspect_failures: Count
    suspect_failure_positions: list[Count]
    model_error_positions: list[Count]
    method: str


@dataclass(frozen=True, kw_only=True)
class LabelAgreement(Record):
    """Suspects flagged under both models with the same predicted class
    (explain.agreed_suspects): positions, their count, and per model its
    suspect failures among them."""
    positions: list[Count]
    count: Count
    failures: dict[str, list[Count]]


@dataclass(frozen=True, kw_only=True)
class DriftGroup(Record):
    """Baseline vs improved Grad-CAM on n images of one failure group: median
    Spearman in [-1, 1] (None when no image has a defined one; `undefined`
    counts those), mean share of map mass in the central quarter per model
    (in [0, 1]), its mean shift and how many images moved onto the centre.
    An empty group is {"n": 0} only."""
    n: Count
    median_spearman: float | None = None
    undefined: int | None = None
    centre_fraction: dict[str, Fraction] | None = None
    centre_shift: float | None = None
    moved_onto_centre: Count | None = None

    def omits(self, f: dataclasses.Field, value: Any) -> bool:
        # All or nothing: median_spearman may be a present null in a non-empty group.
        return self.n == 0 and f.name != "n"


@dataclass(frozen=True, kw_only=True)
class Drift(Record):
    """explain.drift_report: the CAM layer and, flat beside it, {group:
    DriftGroup} for fixed, persisting, new and newly_confident."""
    layer: str
    groups: dict[str, DriftGroup] = other_keys()


@dataclass(frozen=True, kw_only=True)
class SanityMaps(Record):
    """Grad-CAM maps of the first model for the sanity figure: maps
    (steps, images, H, W) in [0, 1], rounded to 3 decimals."""
    model: str
    steps: list[str]
    maps: list[list[list[list[float]]]]


@dataclass(frozen=True, kw_only=True)
class Explanations(Record):
    """explanations.json "results" (pipeline.explain_models): per model
    faithfulness, sanity summary, label suspects and seconds (plus "total");
    label_agreement and drift only with both models; sanity_maps absent from
    metrics.json's copy."""
    faithfulness: dict[str, Faithfulness]
    sanity: dict[str, SanitySummary]
    label_suspects: dict[str, LabelTriage]
    seconds: dict[str, float]
    label_agreement: LabelAgreement | None = optional()
    drift: Drift | None = optional()
    sanity_maps: SanityMaps | None = optional()

    def _repr_markdown_(self) -> str:
        """In a notebook: per model, the faithfulness and sanity verdicts and the label suspects."""
        rows = []
        for name, f in self.faithfulness.items():
            cam = (f.sample.methods or {}).get("gradcam")
            faith = f"{cam.verdict} / {cam.verdict_smooth}" if cam is not None and cam.verdict else "no sample"
            passed = self.sanity[name].methods["gradcam"].verdict.passed
            sanity = {True: "passed", False: "failed", None: "undecided"}[passed]
            ls = self.label_suspects[name]
            rows.append(f"| {name} | {faith} | {sanity} | {ls.suspect_failures} of {ls.failures}"
                        f"{'' if ls.reliable else ' (unreliable)'} |")
        return ("**explanations** (Grad-CAM)\n\n| model | faithful vs pixel / smooth noise (sample) | "
                "randomisation check | failures flagged as label errors |\n|---|---|---|---|\n" + "\n".join(rows))
