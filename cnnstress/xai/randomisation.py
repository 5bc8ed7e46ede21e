"""Model-parameter randomisation test for CAM maps, cascading (Adebayo et al.
2018, "Sanity Checks for Saliency Maps").

A saliency method that explains the *model* must change its maps when the
model's parameters are destroyed. `cascading_randomization` re-initialises
a copy of the model block by block from the head down (linear, layer4, ...,
the stem), recomputes the maps after each step for the same images and the
same target classes, and scores them against the original maps:

    spearman      rank correlation (average ranks for ties), signed
    spearman_abs  rank correlation of the absolute values
    ssim          structural similarity of the [0, 1]-normalised maps

`verdict` turns the scores into pass/fail: the maps pass when, once the
target layer (and, in the head-down cascade, everything above it) has been
randomised, the median absolute Spearman correlation with the original maps
is below a threshold.

Everything runs on `copy.deepcopy(model)` (the caller's model, its modes and
the global RNG are left untouched); the copy costs one more model in memory.
The similarity scores live in cnnstress.xai.similarity.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import SanityError
from ..runtime import batch_slices
from .cam import CAM_METHODS, get_layer, upsample
from .metric import ExplainFunc, Metric, SimilarityFunc
from .similarity import abs_spearman, spearman, ssim

__all__ = ["CascadeStep", "DEFAULT_ORDER", "ParameterRandomisation", "RandomisationResult", "SanityError",
           "SanityResult", "cascading_randomization", "finite_median", "randomised_copies", "verdict"]

# Head first. Entries name one or more modules (dotted names, joined by "+");
# the stem's BatchNorm goes with the stem convolution.
DEFAULT_ORDER = ("linear", "layer4", "layer3", "layer2", "layer1", "conv1+bn1")


# --- the cascade ------------------------------------------------------------------

@dataclass(frozen=True)
class SanityResult:
    """Cascading randomisation of S-1 steps (S rows with "original") on N images.

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
    raw:          float32 (S,N,h,w) >= 0: the un-normalised maps at the layer.
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


def cascading_randomization(model: nn.Module, images: torch.Tensor, targets=None, *,
                            method: str = "gradcam", layer: str = "layer4", seed: int = 0,
                            order: Sequence[str] | None = None,
                            batch_size: int = 256) -> SanityResult:
    """Cascading model-parameter randomisation test of a CAM method.

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
    groups = [o.split("+") for o in order]
    get_layer(model, layer)                       # fail fast, before the copy
    for names in groups:
        for name in names:
            get_layer(model, name)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise SanityError(f"images must be a float batch (N,3,H,W); got {shape}")
    n, _, height, width = images.shape

    if targets is not None and not (isinstance(targets, (int, np.integer)) and not isinstance(targets, bool)):
        try:
            if not isinstance(targets, torch.Tensor):
                targets = torch.as_tensor(np.asarray(targets))
        except (TypeError, ValueError, RuntimeError):
            raise SanityError("targets must be None, an int or N class indices") from None
        if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex() \
                or tuple(targets.shape) != (n,):
            raise SanityError(f"targets must be None, an int or N={n} integer class indices; got "
                              f"dtype {targets.dtype}, shape {tuple(targets.shape)}")
        targets = targets.long()

    steps = randomised_copies(model, groups, seed)
    work = next(steps).model
    explainer = CAM_METHODS[method]

    def explain(tgt) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cam = explainer(work, get_layer(work, layer))
        raws, maps, idx = [], [], []
        for batch in batch_slices(n, batch_size):
            t = tgt[batch] if isinstance(tgt, torch.Tensor) else tgt
            res = cam.attribute(images[batch], targets=t)
            raws.append(res.raw.cpu())
            maps.append(res.maps.cpu())
            idx.append(res.targets.cpu())
        return torch.cat(raws), torch.cat(maps), torch.cat(idx)

    raw0, maps0, fixed = explain(targets)
    up0 = upsample(raw0, (height, width)).double().numpy()
    m0 = maps0.double().numpy()

    def scores(raw: torch.Tensor, mp: torch.Tensor) -> tuple[list, list, list]:
        up = upsample(raw, (height, width)).double().numpy()     # un-normalised
        mpd = mp.double().numpy()                                # on [0, 1]
        return ([spearman(up0[i], up[i]) for i in range(n)],
                [spearman(up0[i], up[i], absolute=True) for i in range(n)],
                [ssim(m0[i], mpd[i], data_range=1.0) for i in range(n)])

    raws, maps = [raw0], [maps0]
    rho, rho_abs, sims = ([row] for row in scores(raw0, maps0))   # row 0: original vs itself
    not_reset: list[str] = []
    layer_step = None
    done: list[str] = []
    for step in steps:
        not_reset += step.not_reset
        done += step.names
        if layer_step is None and _covers(done, layer):
            layer_step = step.index
        raw, mp, _ = explain(fixed)
        raws.append(raw)
        maps.append(mp)
        for acc, row in zip((rho, rho_abs, sims), scores(raw, mp)):
            acc.append(row)

    raw_all = torch.stack(raws).numpy().astype(np.float32)
    return SanityResult(
        steps=["original", *order], method=method, layer=layer, layer_step=layer_step,
        targets=fixed.numpy().astype(np.int64),
        spearman=np.asarray(rho, dtype=np.float64), spearman_abs=np.asarray(rho_abs, dtype=np.float64),
        ssim=np.asarray(sims, dtype=np.float64), maps=torch.stack(maps).numpy().astype(np.float32),
        raw=raw_all, zero=raw_all.reshape(raw_all.shape[0], n, -1).max(axis=2) == 0,
        not_reset=sorted(set(not_reset)))


VERDICT_WORDS = {True: "pass", False: "FAIL", None: "undecided"}


def verdict_word(passed: bool | None) -> str:
    """How a verdict's `passed` (True, False or None) is written in logs, figures and the report."""
    return VERDICT_WORDS[passed]


def finite_median(row: np.ndarray) -> float:
    """Median of the finite entries of `row` (nan when there is none)."""
    fin = row[np.isfinite(row)]
    return float(np.median(fin)) if fin.size else float("nan")


def verdict(result: SanityResult, threshold: float = 0.5) -> dict:
    """Pass/fail of the randomisation test.

    Looks at row k = result.layer_step: the first step at which the CAM's
    target layer has been randomised (in the default head-down cascade: that
    layer and everything above it). The similarity of a randomised map to its
    original is |spearman_abs|: the magnitude of the rank correlation of the
    absolute maps (a map whose ranking flips, rho near -1, still mirrors the
    original's structure, so it counts as similar). The method passes when
    the median similarity over images is below `threshold` at that step: the
    maps depend on the learned parameters of the layer and those above it.

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
    med = finite_median
    out = {"passed": None, "reason": "", "step": None, "step_index": result.layer_step,
           "metric": "|spearman_abs|", "threshold": float(threshold), "median": float("nan"),
           "median_ssim": float("nan"), "n_images": int(scores.shape[1]), "n_used": 0, "n_nan": 0,
           "median_per_step": {name: med(row) for name, row in zip(result.steps, scores)}}
    k = result.layer_step
    if k is None:
        out["reason"] = (f"the cascade {result.steps[1:]} never randomises the target layer "
                         f"{result.layer!r}; add it to `order`")
        return out
    row = scores[k]
    finite = np.isfinite(row)
    out.update(step=result.steps[k], n_used=int(finite.sum()), n_nan=int((~finite).sum()),
               median_ssim=float(np.median(result.ssim[k])))
    if not finite.any():
        out["reason"] = (f"every map at step {result.steps[k]!r} (or its original) is constant, "
                         f"so no rank correlation is defined")
        return out
    out["median"] = med(row)
    out["passed"] = bool(out["median"] < threshold)
    relation = "<" if out["passed"] else ">="
    out["reason"] = (f"median |Spearman| {out['median']:.3f} {relation} {threshold} after randomising "
                     f"down to {result.steps[k]!r} ({out['n_used']} images, {out['n_nan']} undefined)")
    return out


@dataclass(frozen=True)
class RandomisationResult:
    """A ParameterRandomisation run on N images.

    steps:     ["original", *order] (S names).
    scores:    float64 (S,N): similarity_func(original map, map after step s)
               per image; row 0 compares the original maps with themselves.
    step:      the row the verdict reads (None: the cascade never reaches
               the metric's `layer`).
    median:    median of the finite scores in that row (nan if none).
    passed:    median < threshold (the maps changed), or None when undefined.
    threshold: the similarity below which the maps count as changed.
    """
    steps: list[str]
    scores: np.ndarray
    step: int | None
    median: float
    passed: bool | None
    threshold: float


class ParameterRandomisation(Metric):
    """Model-parameter randomisation check (Adebayo et al. 2018) for any
    explanation method, as Quantus' MPRT(similarity_func=...): the maps of
    the explain_func on a cascade of randomised copies of the model (head
    first, cumulative, seeded; see randomised_copies) are compared with the
    original model's by similarity_func, image by image.

    The score is that similarity, so lower is better: maps that stay similar
    once the weights are destroyed do not depend on what the model learned.
    The check passes when the median similarity (finite scores only) at the
    verdict step is below `threshold`. The verdict step is the first step
    that randomises `layer` (e.g. the CAM's target layer), or the last step
    when layer is None.

    similarity_func(a, b) -> float on two maps (H,W); default abs_spearman
    (|Spearman| of |maps|: what `verdict` reads for the CAM cascade).
    explain_func(model, x, targets) -> maps (N,H,W), given when called; the
    targets stay fixed for every step.
    """
    name = "parameter_randomisation"
    higher_is_better = False

    def __init__(self, *, similarity_func: SimilarityFunc = abs_spearman, threshold: float = 0.5,
                 order: Sequence[str] | None = None, layer: str | None = None, seed: int = 0) -> None:
        if not callable(similarity_func):
            raise SanityError(f"similarity_func must be callable; got {type(similarity_func).__name__}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
            raise SanityError(f"threshold must be a finite number; got {threshold!r}")
        self.order = list(DEFAULT_ORDER if order is None else order)
        if not self.order or not all(isinstance(o, str) and o for o in self.order):
            raise SanityError(f"order must be a non-empty list of module names; got {self.order!r}")
        self.similarity_func, self.threshold, self.layer, self.seed = similarity_func, float(threshold), layer, seed

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor, *,
                 explain_func: ExplainFunc) -> RandomisationResult:
        if not callable(explain_func):
            raise SanityError(f"explain_func must be callable; got {type(explain_func).__name__}")
        groups = [o.split("+") for o in self.order]
        for name in [n for g in groups for n in g] + ([self.layer] if self.layer else []):
            get_layer(model, name)                    # fail fast, before the copy
        n = int(images.shape[0])

        def explain(m: nn.Module) -> np.ndarray:
            maps = explain_func(m, images, targets)
            if not isinstance(maps, torch.Tensor) or maps.ndim != 3 or maps.shape[0] != n:
                got = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
                raise SanityError(f"explain_func must return maps (N,H,W) with N={n}; got {got}")
            return maps.detach().cpu().double().numpy()

        rows, original, step, done = [], None, None, []
        for cascade_step in randomised_copies(model, groups, self.seed):
            maps = explain(cascade_step.model)
            original = maps if original is None else original
            rows.append([float(self.similarity_func(original[i], maps[i])) for i in range(n)])
            done += cascade_step.names
            if step is None and self.layer is not None and _covers(done, self.layer):
                step = cascade_step.index
        if self.layer is None:
            step = len(groups)
        scores = np.asarray(rows, dtype=np.float64).reshape(len(groups) + 1, n)
        median = finite_median(scores[step]) if step is not None else float("nan")
        passed = None if np.isnan(median) else bool(median < self.threshold)
        return RandomisationResult(steps=["original", *self.order], scores=scores, step=step, median=median,
                                   passed=passed, threshold=self.threshold)
