"""Can the explanations and the failures be trusted? The explanation stage.

* **Faithfulness** (Petsiuk et al. 2018): deletion and insertion AUC of
  Grad-CAM, Grad-CAM++ and two random maps (pixel noise, and smooth noise at
  the CAM's resolution upsampled like the CAM), explaining each image's
  predicted class, on two groups of test images: the model's high-confidence
  failures (the most confident first) and a fixed stratified sample. A method
  is "better than random" only when its paired difference to a random map is
  clear (95% Student-t interval away from zero) for deletion *and*
  insertion; it gets one verdict against each random map.
* **Sanity check** (Adebayo et al. 2018): cascading model-parameter
  randomisation on a copy of the model; the maps must change once the target
  layer and everything above it are re-initialised.
* **Explanation drift**: for the same images, the rank correlation between the
  baseline's and the improved model's Grad-CAM (each explaining its own
  prediction) and the change of map mass in the central quarter, for the
  fixed, persisting, new (the baseline was right) and newly confident (the
  baseline was wrong too, with less confidence) failures separately.
* **Label suspects**: confident learning (cnnstress.xai.label_errors) on the test
  probabilities, which are out-of-sample for a model trained on the training
  split; a high-confidence failure that is also a suspect may be a wrong label
  rather than a model error.

All results are JSON-ready dicts; every number comes from the models.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ..augment import normalize, to_float
from ..config import Config
from ..evaluate import FailureTable, Predictions
from ..data import sample_positions
from ..runtime import seed_stream
from ..supplied import cascade_order
from .cam import CAM_METHODS, cam_explain_func, describe_cam, get_layer
from .faithfulness import Deletion, Insertion, random_explain_func, trapezoid_auc
from .metric import ExplainFunc
from .label_errors import find_label_issues
from .randomisation import cascading_randomization, verdict
from .similarity import spearman

EXPLAIN_VERSION = 6  # 2: sanity summaries carry the signed Spearman; 3: median |rho| only in the verdict;
# 4: Student-t paired intervals, prune counts truncated as cleanlab does; 5: drift of newly confident failures;
# 6: smooth random baseline, random tie-breaking
CAM_EXPLAINERS = tuple(CAM_METHODS)   # "gradcam", "gradcam++": the one CAM registry is xai.cam
# The chance levels: "random" = pixel noise; "random_smooth" = noise at the CAM layer's
# resolution upsampled like the CAM, so that beating it is not just being smooth.
RANDOM_BASELINES = ("random", "random_smooth")
FAITHFULNESS_METHODS = CAM_EXPLAINERS + RANDOM_BASELINES
# Every seed below is a named stream of runtime.SEED_STREAMS (offsets from config.seed).
CONFIDENCE = 0.95  # of the paired intervals (Student's t: the groups hold only 8 to 32 images)
DRIFT_GROUPS = ("fixed", "persisting", "new", "newly_confident")  # compare_failures' groups
SANITY_THRESHOLD = 0.5  # median |Spearman| below this once the layer is randomised = the maps changed


def _inputs(images_u8: torch.Tensor, device: torch.device) -> torch.Tensor:
    return normalize(to_float(images_u8.to(device)))


def _t_two_sided_mass(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with integer df >= 1 (t >= 0), by the finite
    series of Abramowitz & Stegun 26.7.3/26.7.4 in theta = atan(t / sqrt(df))."""
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:  # sin(theta) * (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ... up to cos^(df-2))
        term = total = 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            total += term
        return s * total
    if df == 1:
        return 2.0 * theta / math.pi
    # 2/pi * (theta + sin(theta) cos(theta) (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ... up to cos^(df-3)))
    term = total = 1.0
    for k in range(1, (df - 1) // 2):
        term *= c2 * (2 * k) / (2 * k + 1)
        total += term
    return 2.0 / math.pi * (theta + s * math.cos(theta) * total)


def t_quantile(p: float, df: int) -> float:
    """The p-quantile (0.5 <= p < 1) of Student's t with integer df >= 1,
    by bisection on the exact CDF (no SciPy at run time; tested against
    scipy.stats.t.ppf). t_quantile(0.975, 7) = 2.365, (0.975, 31) = 2.040."""
    if isinstance(df, bool) or int(df) != df or df < 1:
        raise ValueError(f"df must be a positive integer, got {df!r}")
    if not 0.5 <= p < 1.0:
        raise ValueError(f"p must be in [0.5, 1), got {p!r}")
    df, target = int(df), 2.0 * p - 1.0
    lo, hi = 0.0, 1.0
    while _t_two_sided_mass(hi, df) < target:
        hi *= 2.0
    for _ in range(200):  # the bracket halves each time: far below float resolution
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        lo, hi = (mid, hi) if _t_two_sided_mass(mid, df) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _paired(method_auc: np.ndarray, random_auc: np.ndarray) -> dict[str, float]:
    """Mean of the per-image differences method - random and its two-sided
    CONFIDENCE Student-t interval (n - 1 degrees of freedom): with 8 to 32
    images the normal quantile 1.96 would make the interval too narrow."""
    d = method_auc - random_auc
    n = d.size
    if n < 2:
        nan = float("nan")
        return {"mean_diff": float(d.mean()) if n else nan, "low": nan, "high": nan}
    mean = float(d.mean())
    half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * float(d.std(ddof=1) / math.sqrt(n))
    return {"mean_diff": mean, "low": mean - half, "high": mean + half}


def _side(interval: dict, higher_is_better: bool) -> str | None:
    """'better' / 'worse' when the interval of method - random excludes 0,
    read by the metric's declared direction; None when it straddles 0."""
    if interval["low"] > 0:
        return "better" if higher_is_better else "worse"
    if interval["high"] < 0:
        return "worse" if higher_is_better else "better"
    return None


def _judge(deletion: dict, insertion: dict) -> str:
    """The verdict against the random map from the paired 95% intervals
    (deletion: lower AUC is better; insertion: higher is better): 'better than
    random' only when both are clearly better, 'worse than random' when both
    are clearly worse, else which metric (if any) separates them."""
    d, i = _side(deletion, Deletion.higher_is_better), _side(insertion, Insertion.higher_is_better)
    if d == i and d is not None:
        return f"{d} than random"
    if d is None and i is None:
        return "not distinguishable from random"
    parts = [f"{word} on {metric}" for metric, word in (("deletion", d), ("insertion", i)) if word]
    return " and ".join(parts) + " only" if len(parts) == 1 else ", ".join(parts)


def cam_resolution(model: nn.Module, x: torch.Tensor, layer: str) -> tuple[int, int]:
    """(h, w) of the CAM at `layer` for inputs like x (N,3,H,W), e.g. (4, 4)
    for a CIFAR ResNet-18's layer4: the raw map's size, from one image."""
    raw = CAM_METHODS["gradcam"](model, get_layer(model, layer)).attribute(x[:1]).raw
    return int(raw.shape[1]), int(raw.shape[2])


def faithfulness_methods(config: Config, resolution: tuple[int, int], layer: str | None = None
                         ) -> dict[str, ExplainFunc]:
    """The methods the faithfulness check scores, as explain functions: each
    CAM method's raw map at `layer` (default config.cam_layer) upsampled to the image (only the
    order matters), pixel noise ("random") and smooth noise at the CAM's
    `resolution` upsampled like the CAM ("random_smooth")."""
    layer = layer or config.cam_layer
    methods: dict[str, ExplainFunc] = {m: cam_explain_func(m, layer, normalized=False)
                                       for m in CAM_EXPLAINERS}
    methods["random"] = random_explain_func(seed_stream(config.seed, "random_maps"))
    methods["random_smooth"] = random_explain_func(seed_stream(config.seed, "smooth_random_maps"),
                                                   resolution=resolution)
    return methods


def faithfulness_group(model: nn.Module, images_u8: torch.Tensor, targets: torch.Tensor, config: Config,
                       device: torch.device, layer: str | None = None) -> dict[str, Any]:
    """Deletion/insertion (the Deletion and Insertion metrics) of every
    faithfulness method on one group of images (targets: the classes
    explained). Returns per method the mean AUCs, mean curves and per-image
    AUCs; per CAM method also the paired comparison and verdict against each
    random baseline: pixel noise ("vs_random", "verdict") and smooth noise at
    the CAM's resolution ("vs_random_smooth", "verdict_smooth"). Ties in every
    map are broken at random (seeded). layer: the CAM layer, default config.cam_layer."""
    layer = layer or config.cam_layer
    n = int(targets.shape[0])
    if n == 0:
        return {"n": 0}
    x = _inputs(images_u8, device)
    res = cam_resolution(model, x, layer)
    settings = dict(steps=config.faithfulness_steps, baseline=config.faithfulness_baseline,
                    batch_size=config.eval_batch_size, seed=seed_stream(config.seed, "tie_breaking"))
    metrics = (Deletion(**settings), Insertion(**settings))
    out: dict[str, Any] = {"n": n, "cam_resolution": list(res), "methods": {}}
    for method, explain in faithfulness_methods(config, res, layer).items():
        maps = explain(model, x, targets).to(device)      # once, for both metrics
        scored: dict[str, Any] = {}
        for metric in metrics:
            curves, fractions = metric.curves(model, x, targets.to(device), maps=maps)
            aucs = trapezoid_auc(curves, fractions)
            scored.update({metric.name: float(aucs.mean()), f"{metric.mode}_curve": curves.mean(0).tolist(),
                           f"{metric.name}s": aucs.tolist()})
            out["fractions"] = fractions.tolist()
        keys = ("deletion_auc", "insertion_auc", "deletion_curve", "insertion_curve", "deletion_aucs",
                "insertion_aucs")
        out["methods"][method] = {k: scored[k] for k in keys}      # in the cache's key order
    for method in CAM_EXPLAINERS:
        me = out["methods"][method]
        for baseline, suffix in zip(RANDOM_BASELINES, ("", "_smooth")):
            rnd = out["methods"][baseline]
            vs = {m.mode: _paired(np.array(me[f"{m.name}s"]), np.array(rnd[f"{m.name}s"])) for m in metrics}
            me[f"vs_random{suffix}"] = vs
            me[f"verdict{suffix}"] = _judge(vs["deletion"], vs["insertion"])
    return out


def faithfulness_report(model: nn.Module, test_images: torch.Tensor, preds: Predictions, failures: FailureTable,
                        config: Config, device: torch.device, layer: str | None = None) -> dict[str, Any]:
    """Faithfulness on the top failures and on a fixed stratified sample (CAM at `layer`, default config's)."""
    k = config.faithfulness_samples
    fail_pos = torch.as_tensor(failures.positions[:k], dtype=torch.long)
    sample_pos = sample_positions(preds.labels, k, seed_stream(config.seed, "faithfulness_sample"))
    groups = {"failures": fail_pos, "sample": sample_pos}
    return {name: faithfulness_group(model, test_images[pos], preds.preds[pos], config, device, layer)
            for name, pos in groups.items()}


def _row_medians(scores: np.ndarray) -> list[float | None]:
    """Median of each row over its finite entries (None for a row with none)."""
    return [float(np.median(r[np.isfinite(r)])) if np.isfinite(r).any() else None for r in scores]


def sanity_report(model: nn.Module, test_images: torch.Tensor, preds: Predictions, config: Config,
                  device: torch.device, layer: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Cascading randomisation of a copy of `model` for Grad-CAM and Grad-CAM++
    at `layer` (default config.cam_layer) on a fixed sample, the cascade over
    the model's own top-level layers (supplied.cascade_order). Returns
    (JSON-ready summary, {method: SanityResult}) — the second for the figure;
    the model is never modified."""
    pos = sample_positions(preds.labels, config.sanity_samples, seed_stream(config.seed, "sanity_sample"))
    x = _inputs(test_images[pos], device)
    summary, results = {"n": int(pos.numel()), "dataset_positions": pos.tolist()}, {}
    for method in CAM_EXPLAINERS:
        res = cascading_randomization(model, x, preds.preds[pos].to(device), method=method,
                                      layer=layer or config.cam_layer, order=cascade_order(model),
                                      seed=seed_stream(config.seed, "randomisation"))
        results[method] = res
        v = verdict(res, SANITY_THRESHOLD)
        summary[method] = {"steps": list(res.steps), "verdict": v,
                           # the verdict holds the median |rho| per step; the signed rho beside it
                           "median_spearman_signed": _row_medians(res.spearman),
                           "median_ssim": [float(np.median(r)) for r in res.ssim]}
    return summary, results


# Northcutt, Athalye & Mueller 2021 ("Pervasive label errors in test sets") found 54 label
# errors in CIFAR-10's 10,000 test images. Far more flags than that means confident
# learning is flagging the model's own mistakes, not wrong labels.
KNOWN_TEST_LABEL_ERRORS = 54
PLAUSIBLE_FLAG_FRACTION = 0.05  # 10x the known rate: above it the flags are called unreliable


def label_suspects(preds: Predictions, failures: FailureTable) -> dict[str, Any]:
    """Confident-learning suspects on the whole test split, and which of the
    high-confidence failures are suspects (positions in rank order).
    `reliable` is False when the flags cover more than PLAUSIBLE_FLAG_FRACTION
    of the test set: the model is then too weak for the method to tell wrong
    labels from its own confident mistakes."""
    flags = find_label_issues(preds.probs.numpy(), preds.labels.numpy())
    fail_pos = failures.positions
    suspect_failures = [int(p) for p in fail_pos if flags[p]]
    fraction = float(flags.mean()) if flags.size else 0.0
    return {"n_test": len(preds), "suspects": int(flags.sum()), "flagged_fraction": fraction,
            "reliable": fraction <= PLAUSIBLE_FLAG_FRACTION,
            "suspect_positions": np.flatnonzero(flags).tolist(),
            "failures": int(fail_pos.size), "suspect_failures": len(suspect_failures),
            "suspect_failure_positions": suspect_failures,
            "model_error_positions": [int(p) for p in fail_pos if not flags[p]],
            "method": "confident learning, prune_by_noise_rate (Northcutt et al. 2021)"}


def agreed_suspects(suspects: Mapping[str, dict], preds: Mapping[str, Predictions]) -> dict[str, Any]:
    """Images flagged under *both* models' probabilities, with both models
    predicting the same other class. The two models are *not* independent:
    they start from the same initial weights and see the same batch order
    (the same seed, by design: augmentation is the only change), so they
    tend to share mistakes. Their agreement is therefore weaker evidence of
    a wrong label than agreement between independently trained models would
    be; it mainly drops the suspects that only one augmentation regime
    produces. `preds`: the two models', the reference first."""
    first, second = preds
    a, b = (set(suspects[n]["suspect_positions"]) for n in (first, second))
    pa, pb = preds[first].preds, preds[second].preds
    both = sorted(p for p in a & b if int(pa[p]) == int(pb[p]))
    return {"positions": both, "count": len(both),
            "failures": {n: [p for p in suspects[n]["suspect_failure_positions"] if p in set(both)]
                         for n in preds}}


def drift_report(models: Mapping[str, nn.Module], test_images: torch.Tensor, preds: Mapping[str, Predictions],
                 comparison_failures: Mapping[str, Any], config: Config, device: torch.device,
                 layers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The two models' Grad-CAM (the reference first: baseline vs improved) on the same images, per failure group
    (fixed, persisting, new, newly_confident: see compare.compare_failures),
    each model explaining its own prediction:
    median rank correlation of the maps, and the mean share of map mass in the
    central quarter for each model. layers: each model's CAM layer (default config.cam_layer)."""
    first, second = models
    layers = {n: (layers or {}).get(n) or config.cam_layer for n in models}
    same = len(set(layers.values())) == 1
    out: dict[str, Any] = {"layer": layers[first] if same else ", ".join(f"{n} {l}" for n, l in layers.items())}
    for group in DRIFT_GROUPS:
        pos = torch.as_tensor(list(comparison_failures[group])[:config.faithfulness_samples * 4], dtype=torch.long)
        if pos.numel() == 0:
            out[group] = {"n": 0}
            continue
        x = _inputs(test_images[pos], device)
        raw = {name: cam_explain_func("gradcam", layers[name], normalized=False)(m, x, preds[name].preds[pos]).numpy()
               for name, m in models.items()}
        rho = np.array([spearman(a, b) for a, b in zip(raw[first], raw[second])])
        centre = {name: np.array([describe_cam(m)["centre_fraction"] for m in raw[name]]) for name in raw}
        finite = np.isfinite(rho)
        out[group] = {"n": int(pos.numel()),
                      "median_spearman": float(np.median(rho[finite])) if finite.any() else None,
                      "undefined": int((~finite).sum()),
                      "centre_fraction": {name: float(c.mean()) for name, c in centre.items()},
                      "centre_shift": float((centre[second] - centre[first]).mean()),
                      "moved_onto_centre": int((centre[second] > centre[first]).sum())}
    return out
