"""Model-parameter randomisation check, cascading (Adebayo et al. 2018,
"Sanity Checks for Saliency Maps").

An explanation that explains the *model* must change when the model's
parameters are destroyed. `ParameterRandomisation` (a Metric: the explanation
and the similarity are callables, as in Quantus' MPRT) re-initialises a copy
of the model block by block from the head down (linear, layer4, ..., the
stem), recomputes the maps after each step for the same images and the same
target classes, and scores each against the original map with
`similarity_func` (default |Spearman| of |maps|); further named similarity
functions may score the same pairs for the record. The check passes when,
once the target layer (and, head-down, everything above it) has been
randomised, the median similarity is below a threshold (`decide`).

`cascading_randomization` is that metric for a CAM method, with the scores the
explanation stage reports (signed Spearman, Spearman of |maps|, SSIM of the
[0, 1]-normalised maps) and the display maps; `verdict` explains its decision.

Everything runs on `copy.deepcopy(model)` (the caller's model, its modes and
the global RNG are left untouched); the copy costs one more model in memory.
The similarity scores live in cnnstress.xai.similarity.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import SanityError
from ..runtime import batch_slices
from .cam import CAM_METHODS, cam_explain_func, get_layer, normalize_maps
from .metric import ExplainFunc, Metric, SimilarityFunc
from .similarity import abs_spearman, spearman, ssim

__all__ = ["CascadeStep", "DEFAULT_ORDER", "ParameterRandomisation", "RandomisationResult", "SanityError",
           "SanityResult", "cascading_randomization", "decide", "display_ssim", "finite_median", "randomised_copies",
           "spearman_abs", "verdict"]

# Head first. Entries name one or more modules (dotted names, joined by "+");
# the stem's BatchNorm goes with the stem convolution.
DEFAULT_ORDER = ("linear", "layer4", "layer3", "layer2", "layer1", "conv1+bn1")


# --- the cascade ------------------------------------------------------------------

def _reinitialize(module: nn.Module) -> None:
    """reset_parameters() on every submodule that has it, and reset running
    statistics (BatchNorm: running mean 0, var 1, num_batches_tracked 0)."""
    for m in module.modules():
        reset = getattr(m, "reset_parameters", None)
        if callable(reset):
            reset()
        stats = getattr(m, "reset_running_stats", None)
        if callable(stats):
            stats()


def _not_reset(module: nn.Module, prefix: str) -> list[str]:
    """Parameters under `module` owned by a module without reset_parameters()."""
    out = []
    for name, m in module.named_modules(prefix=prefix):
        if not callable(getattr(m, "reset_parameters", None)):
            out += [f"{name}.{p}" for p, _ in m.named_parameters(recurse=False)]
    return out


def _covers(step_names: Sequence[str], layer: str) -> bool:
    return any(layer == m or layer.startswith(m + ".") for m in step_names)


@dataclass(frozen=True)
class CascadeStep:
    """One step of the cascade: `model` (the one deep copy, randomised
    cumulatively) after step `index` (0: the original parameters), which
    re-initialised the modules `names`; `not_reset`: parameters among them
    whose module has no reset_parameters() (left as they were)."""
    index: int
    names: list[str]
    model: nn.Module
    not_reset: list[str]


def randomised_copies(model: nn.Module, groups: Sequence[Sequence[str]], seed: int = 0) -> Iterator[CascadeStep]:
    """Deep-copy `model` and yield it unchanged (step 0), then after
    re-initialising each group of module names in turn (cumulative; groups
    head first, e.g. [["linear"], ["layer4"], ...]). Step k is seeded from
    `seed` and k only, inside torch.random.fork_rng (the global RNG state is
    left as it was). The caller's model is never touched; use each yielded
    model before asking for the next step (it is the same object)."""
    work = copy.deepcopy(model)
    yield CascadeStep(0, [], work, [])
    gen = torch.Generator().manual_seed(int(seed))
    step_seeds = torch.randint(0, 2**62, (len(groups),), generator=gen).tolist()
    cuda = sorted({p.device.index or 0 for p in work.parameters() if p.device.type == "cuda"})
    for step, (names, step_seed) in enumerate(zip(groups, step_seeds), start=1):
        not_reset: list[str] = []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(step_seed)
            for name in names:
                mod = get_layer(work, name)
                not_reset += _not_reset(mod, name)
                _reinitialize(mod)
        yield CascadeStep(step, list(names), work, not_reset)


VERDICT_WORDS = {True: "pass", False: "FAIL", None: "undecided"}


def verdict_word(passed: bool | None) -> str:
    """How a verdict's `passed` (True, False or None) is written in logs, figures and the report."""
    return VERDICT_WORDS[passed]


def finite_median(row: np.ndarray) -> float:
    """Median of the finite entries of `row` (nan when there is none)."""
    fin = row[np.isfinite(row)]
    return float(np.median(fin)) if fin.size else float("nan")


def decide(scores: np.ndarray, step: int | None, threshold: float) -> tuple[float, bool | None]:
    """The check's decision on similarity scores (S,N): (median of the finite
    scores in row `step`, median < threshold), or (nan, None) when the step is
    None (the layer is never randomised) or the row has no finite score. NaN
    scores (a constant map) count neither as changed nor as similar."""
    median = finite_median(scores[step]) if step is not None else float("nan")
    return median, None if np.isnan(median) else bool(median < threshold)


# --- the metric -------------------------------------------------------------------

@dataclass(frozen=True)
class RandomisationResult:
    """A ParameterRandomisation run on N images.

    steps:        ["original", *order] (S names).
    scores:       float64 (S,N): similarity_func(original map, map after step
                  s) per image; row 0 compares the original maps with themselves.
    step:         the row the decision reads (None: the cascade never reaches
                  the metric's `layer`).
    median:       median of the finite scores in that row (nan if none).
    passed:       median < threshold (the maps changed), or None when undefined.
    threshold:    the similarity below which the maps count as changed.
    similarities: {name: float64 (S,N)} the metric's further similarity
                  functions on the same map pairs (reported, not decided on).
    maps:         (S,N,H,W) what explain_func returned at each step (float32
                  when it returned float32), or None unless keep_maps.
    targets:      int64 (N,) the classes explained, fixed for every step.
    not_reset:    names of parameters inside the randomised modules whose
                  module has no reset_parameters() (left as they were).
    """
    steps: list[str]
    scores: np.ndarray
    step: int | None
    median: float
    passed: bool | None
    threshold: float
    similarities: dict[str, np.ndarray] = field(default_factory=dict)
    maps: np.ndarray | None = None
    targets: np.ndarray | None = None
    not_reset: list[str] = field(default_factory=list)


class ParameterRandomisation(Metric):
    """Model-parameter randomisation check (Adebayo et al. 2018) for any
    explanation method, as Quantus' MPRT(similarity_func=...): the maps of
    the explain_func on a cascade of randomised copies of the model (head
    first, cumulative, seeded; see randomised_copies) are compared with the
    original model's by similarity_func, image by image.

    The score is that similarity, so lower is better: maps that stay similar
    once the weights are destroyed do not depend on what the model learned.
    The check passes when the median similarity (finite scores only) at the
    decision step is below `threshold` (`decide`). The decision step is the
    first step that randomises `layer` (e.g. the CAM's target layer), or the
    last step when layer is None.

    similarity_func(a, b) -> float on two maps (H,W); default abs_spearman
    (|Spearman| of |maps|). similarities: further {name: similarity_func},
    scored on the same pairs and returned, not decided on. keep_maps: return
    every step's maps. explain_func(model, x, targets) -> maps (N,H,W), given
    when called; the targets stay fixed for every step.
    """
    name = "parameter_randomisation"
    higher_is_better = False

    def __init__(self, *, similarity_func: SimilarityFunc = abs_spearman, threshold: float = 0.5,
                 order: Sequence[str] | None = None, layer: str | None = None, seed: int = 0,
                 similarities: Mapping[str, SimilarityFunc] | None = None, keep_maps: bool = False) -> None:
        extra = dict(similarities or {})
        for what, func in [("similarity_func", similarity_func), *((f"similarities[{k!r}]", f) for k, f in extra.items())]:
            if not callable(func):
                raise SanityError(f"{what} must be callable; got {type(func).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise SanityError(f"threshold must be a finite number; got {threshold!r}")
        self.order = list(DEFAULT_ORDER if order is None else order)
        if not self.order or not all(isinstance(o, str) and o for o in self.order):
            raise SanityError(f"order must be a non-empty list of module names; got {self.order!r}")
        self.similarity_func, self.threshold, self.layer, self.seed = similarity_func, float(threshold), layer, seed
        self.similarities, self.keep_maps = extra, bool(keep_maps)

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                 explain_func: ExplainFunc) -> RandomisationResult:
        if not callable(explain_func):
            raise SanityError(f"explain_func must be callable; got {type(explain_func).__name__}")
        groups = [o.split("+") for o in self.order]
        for name in [n for g in groups for n in g] + ([self.layer] if self.layer else []):
            get_layer(model, name)                    # fail fast, before the copy
        n = int(images.shape[0])
        funcs = {"": self.similarity_func, **self.similarities}

        def explain(m: nn.Module) -> torch.Tensor:
            maps = explain_func(m, images, targets)
            if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != n:
                got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
                raise SanityError(f"explain_func must return maps (N,H,W) with N={n}; got {got}")
            return maps.detach().cpu()

        rows: dict[str, list] = {k: [] for k in funcs}
        kept, original, step, done, not_reset = [], None, None, [], []
        for cascade_step in randomised_copies(model, groups, self.seed):
            maps = explain(cascade_step.model)
            kept += [maps.numpy()] if self.keep_maps else []
            scored = maps.double().numpy()
            original = scored if original is None else original
            for key, func in funcs.items():
                rows[key].append([float(func(original[i], scored[i])) for i in range(n)])
            done += cascade_step.names
            not_reset += cascade_step.not_reset
            if step is None and self.layer is not None and _covers(done, self.layer):
                step = cascade_step.index
        if self.layer is None:
            step = len(groups)
        table = {k: np.asarray(r, dtype=np.float64).reshape(len(groups) + 1, n) for k, r in rows.items()}
        scores = table.pop("")
        median, passed = decide(scores, step, self.threshold)
        return RandomisationResult(
            steps=["original", *self.order], scores=scores, step=step, median=median, passed=passed,
            threshold=self.threshold, similarities=table, maps=np.stack(kept) if kept else None,
            targets=torch.as_tensor(targets).detach().cpu().long().numpy(), not_reset=sorted(set(not_reset)))


# --- the CAM check the explanation stage runs ---------------------------------------

@dataclass(frozen=True)
class SanityResult:
    """Cascading randomisation of S-1 steps (S rows with "original") of a CAM
    method on N images.

    steps:        ["original", *order]: row s holds the maps after randomising
                  the modules of steps[1..s] (cumulative).
    method:       the CAM method name (a key of cnnstress.xai.cam.CAM_METHODS).
    layer:        the CAM target layer's name.
    layer_step:   first row at which `layer` (or a module containing it) has
                  been randomised; None when the order never reaches it.
    targets:      int64 (N,): the classes explained, fixed for all steps (the
                  original model's).
    spearman:     float64 (S,N): rank correlation of each image's upsampled,
                  un-normalised map with its original map; nan where either
                  map is constant (e.g. all zero). Row 0 is 1 (or nan).
    spearman_abs: float64 (S,N): the same on absolute values. CAM maps are
                  ReLU'd (>= 0), so this equals `spearman`; both are kept for
                  the paper's two variants and for signed methods.
    ssim:         float64 (S,N): SSIM of the [0, 1]-normalised maps, data_range 1.
    maps:         float32 (S,N,H,W) on [0, 1]: the normalised maps (display).
    raw:          float32 (S,N,H,W) >= 0: the un-normalised maps upsampled to
                  the image size (what the scores compare).
    zero:         bool (S,N): all-zero raw map (no evidence at this layer).
    not_reset:    names of parameters inside the randomised modules whose
                  module has no reset_parameters() (left as they were).
    """
    steps: list[str]
    method: str
    layer: str
    layer_step: int | None
    targets: np.ndarray
    spearman: np.ndarray
    spearman_abs: np.ndarray
    ssim: np.ndarray
    maps: np.ndarray
    raw: np.ndarray
    zero: np.ndarray
    not_reset: list[str]


def spearman_abs(a: object, b: object) -> float:
    """Spearman rank correlation of |a| and |b| (signed; abs_spearman is its magnitude)."""
    return spearman(a, b, absolute=True)


def display_ssim(a: object, b: object) -> float:
    """SSIM (data_range 1) of two maps after the min-max normalisation to
    [0, 1] that the CAM's display maps get (cam.normalize_maps, float32)."""
    na, nb = (normalize_maps(torch.as_tensor(np.asarray(m), dtype=torch.float32)[None])[0].double().numpy()
              for m in (a, b))
    return ssim(na, nb, data_range=1.0)


# the scores cascading_randomization reports besides the decision's |Spearman|
CAM_SIMILARITIES = {"spearman": spearman, "spearman_abs": spearman_abs, "ssim": display_ssim}


def cascading_randomization(model: nn.Module, images: torch.Tensor, targets=None, *,
                            method: str = "gradcam", layer: str = "layer4", seed: int = 0,
                            order: Sequence[str] | None = None,
                            batch_size: int = 256) -> SanityResult:
    """ParameterRandomisation of a CAM method, with the scores and maps the
    explanation stage reports.

    model:   the classifier; never modified (the test runs on a deep copy).
    images:  float (N,3,H,W) NCHW, normalised (cnnstress.augment.normalize).
    targets: the classes to explain: None (the original model's predictions),
             an int, or N ints (sequence, ndarray or tensor). They stay fixed
             for every step.
    method:  a key of CAM_METHODS ("gradcam", "gradcam++").
    layer:   the CAM target layer's name (see cnnstress.xai.cam.get_layer).
    seed:    seeds the re-initialisation (per step, inside torch.random.fork_rng:
             the global RNG state is left as it was).
    order:   the cascade, head first; each entry names one or more modules of
             the model joined by "+" (default DEFAULT_ORDER: linear, layer4,
             layer3, layer2, layer1, conv1+bn1). Randomisation is cumulative.
    batch_size: images per CAM forward/backward.
    Returns a SanityResult (numpy arrays on the CPU).
    """
    if method not in CAM_METHODS:
        raise SanityError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")
    order = list(DEFAULT_ORDER if order is None else order)
    if not order or not all(isinstance(o, str) and o for o in order):
        raise SanityError(f"order must be a non-empty list of module names; got {order!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SanityError(f"batch_size must be a positive int; got {batch_size!r}")
    get_layer(model, layer)                       # fail fast, before any CAM
    for name in (n for o in order for n in o.split("+")):
        get_layer(model, name)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SanityError(f"images must be a float batch (N,3,H,W); got {shape}")
    n = images.shape[0]
    explain = cam_explain_func(method, layer, normalized=False, batch_size=batch_size)
    targets = _fixed_targets(model, images, targets, method, layer, batch_size)

    check = ParameterRandomisation(similarity_func=abs_spearman, order=order, layer=layer, seed=seed,
                                   similarities=CAM_SIMILARITIES, keep_maps=True)(
        model, images, targets, explain_func=explain)
    raw = check.maps.astype(np.float32)
    s = raw.shape[0]
    maps = normalize_maps(torch.from_numpy(raw).flatten(0, 1)).view(raw.shape).numpy()
    return SanityResult(
        steps=check.steps, method=method, layer=layer, layer_step=check.step, targets=check.targets,
        spearman=check.similarities["spearman"], spearman_abs=check.similarities["spearman_abs"],
        ssim=check.similarities["ssim"], maps=maps, raw=raw, zero=raw.reshape(s, n, -1).max(axis=2) == 0,
        not_reset=check.not_reset)


def _fixed_targets(model: nn.Module, images: torch.Tensor, targets, method: str, layer: str,
                   batch_size: int) -> torch.Tensor:
    """The classes explained at every step, int64 (N,): `targets` checked, an
    int repeated, or (None) the original model's predictions as the CAM sees them."""
    n = images.shape[0]
    if targets is None:
        cam = CAM_METHODS[method](model, get_layer(model, layer))
        return torch.cat([cam.attribute(images[b]).targets.cpu() for b in batch_slices(n, batch_size)])
    if isinstance(targets, (int, np.integer)) and not isinstance(targets, bool):
        return torch.full((n,), int(targets), dtype=torch.long)
    try:
        t = targets if isinstance(targets, torch.Tensor) else torch.as_tensor(np.asarray(targets))
    except (TypeError, ValueError, RuntimeError):
        raise SanityError("targets must be None, an int or N class indices") from None
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or tuple(t.shape) != (n,):
        raise SanityError(f"targets must be None, an int or N={n} integer class indices; got "
                          f"dtype {t.dtype}, shape {tuple(t.shape)}")
    return t.long()


def verdict(result: SanityResult, threshold: float = 0.5) -> dict:
    """Pass/fail of the CAM randomisation check, with the reason.

    Looks at row k = result.layer_step: the first step at which the CAM's
    target layer has been randomised (in the default head-down cascade: that
    layer and everything above it). The similarity of a randomised map to its
    original is |spearman_abs|: the magnitude of the rank correlation of the
    absolute maps (a map whose ranking flips, rho near -1, still mirrors the
    original's structure, so it counts as similar). The method passes when
    the median similarity over images is below `threshold` at that step
    (`decide`, as ParameterRandomisation decides): the maps depend on the
    learned parameters of the layer and those above it.

    NaN scores (an original or randomised map that is constant, typically all
    zero after the ReLU) are not counted as "changed" nor as "similar": they
    are left out of the median and reported as `n_nan`. If every score at
    that step is NaN, or the cascade never reaches the layer, `passed` is
    None and `reason` says why.

    Returns {"passed": bool | None, "reason": str, "step": name, "step_index": k,
    "metric": "|spearman_abs|", "threshold", "median" (of the similarity at step
    k), "median_ssim", "n_images", "n_used", "n_nan", "median_per_step": {step:
    median similarity (nan if no finite score)}}.
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold <= 1:
        raise SanityError(f"threshold must be a number in (0, 1]; got {threshold!r}")
    scores = np.abs(np.asarray(result.spearman_abs, dtype=np.float64))     # nan stays nan
    out = {"passed": None, "reason": "", "step": None, "step_index": result.layer_step,
           "metric": "|spearman_abs|", "threshold": float(threshold), "median": float("nan"),
           "median_ssim": float("nan"), "n_images": int(scores.shape[1]), "n_used": 0, "n_nan": 0,
           "median_per_step": {name: finite_median(row) for name, row in zip(result.steps, scores)}}
    k = result.layer_step
    if k is None:
        out["reason"] = (f"the cascade {result.steps[1:]} never randomises the target layer "
                         f"{result.layer!r}; add it to `order`")
        return out
    finite = np.isfinite(scores[k])
    out.update(step=result.steps[k], n_used=int(finite.sum()), n_nan=int((~finite).sum()),
               median_ssim=float(np.median(result.ssim[k])))
    median, passed = decide(scores, k, threshold)
    if passed is None:
        out["reason"] = (f"every map at step {result.steps[k]!r} (or its original) is constant, "
                         f"so no rank correlation is defined")
        return out
    out["median"], out["passed"] = median, passed
    relation = "<" if passed else ">="
    out["reason"] = (f"median |Spearman| {median:.3f} {relation} {threshold} after randomising "
                     f"down to {result.steps[k]!r} ({out['n_used']} images, {out['n_nan']} undefined)")
    return out
