"""Grad-CAM (Selvaraju et al. 2017) and Grad-CAM++ (Chattopadhay et al. 2018)
for the CIFAR ResNet, batched.

For a target layer with activations A (N,K,h,w) and a target score y_c per
image, Grad-CAM weighs each channel by its spatially averaged gradient

    alpha_k = mean_{i,j} dy_c / dA_k[i,j]          (N,K)
    raw     = ReLU(sum_k alpha_k A_k)              (N,h,w), >= 0

then upsamples the map to the input size and rescales it to [0, 1] for
display. The three steps are separate public functions, so that maps can be
compared before any normalisation (two models on one scale):

    compute_cam(activations, gradients) -> raw   (N,h,w)  at the layer's resolution
    upsample(raw, size)                  -> (N,H,W)  bilinear, align_corners=False
    normalize_maps(maps, scale=None)     -> (N,H,W)  on [0, 1]

`GradCAM(model)(x)` does all three; `GradCAM(model).attribute(x)` also returns
the raw maps, targets and logits (`CamResult`).

Grad-CAM++ differs only in the channel weights (the first step):

    compute_cam_plus_plus(activations, gradients) -> raw   (N,h,w), >= 0

and `GradCAMPlusPlus` has the same interface as `GradCAM`; both are
`CamExplainer`s sharing the hooks, forward, backward and checks, and
`CAM_METHODS` maps the names "gradcam" / "gradcam++" to them. `get_layer`
resolves a layer name ("layer4", "layer3.1.conv2") to the module. Images are NCHW tensors,
normalised with the CIFAR mean/std (cnnstress.augment.normalize); display
images are HWC RGB float arrays on [0, 1] (`to_display_image`, `overlay`).

The computation runs in eval mode and fp32 (autocast off), with one forward
and one backward for the whole batch; gradients come from torch.autograd.grad
with respect to the captured activation, so parameters' `.grad` are never
touched. The forward hook lives only for the duration of a call, and the
model's (per-module) train/eval modes are restored afterwards, also when the
forward raises.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..arrays import as_numpy
from ..augment import denormalize
from ..errors import GradCAMError
from ..runtime import eval_mode

__all__ = [
    "CAM_METHODS", "CamExplainer", "CamResult", "GradCAM", "GradCAMError", "GradCAMPlusPlus", "cam_explain_func",
    "compute_cam", "compute_cam_plus_plus", "get_layer", "normalize_maps", "overlay",
    "to_display_image", "upsample",
]

# A target: a class index, or a callable on the logits returning the score to
# explain (like pytorch_grad_cam.utils.model_targets.ClassifierOutputTarget).
Target = int | Callable[[torch.Tensor], torch.Tensor]
Targets = None | Target | Sequence[Target] | torch.Tensor | np.ndarray


@dataclass(frozen=True)
class CamResult:
    """Grad-CAM (or Grad-CAM++) of a batch of N images of size HxW; all tensors
    detached, on the model's device.

    raw:     float32 (N,h,w), >= 0: ReLU(sum_k alpha_k A_k) at the target
             layer's resolution (alpha_k: the method's channel weights), not
             normalised (comparable across models).
    maps:    float32 (N,H,W) on [0, 1]: `raw` upsampled to the input size and
             min-max normalised per image (`normalize_maps(upsample(raw))`).
    targets: int64 (N,): the class explained for each image; -1 where the
             target was a callable without an int `category` attribute.
    logits:  float32 (N,C): the model's outputs (eval mode, fp32).
    zero:    bool (N,): True where `raw` is all zero (no evidence for the
             target at this layer); those `maps` are all zeros, never NaN.
             (A flat but non-zero `raw`, rare, also gives an all-zero map:
             min-max has no range to spread; `raw` keeps its level.)
    """
    raw: torch.Tensor
    maps: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    zero: torch.Tensor


# --- the three steps ---------------------------------------------------------

def compute_cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM at the layer's resolution.

    activations, gradients: float (N,K,h,w), the target layer's output and the
    gradient of each image's target score with respect to it.
    Returns float (N,h,w) = ReLU(sum_k alpha_k A_k), alpha_k = mean_{h,w} grad_k;
    values >= 0, not normalised.
    """
    if activations.ndim != 4 or activations.shape != gradients.shape:
        raise GradCAMError(
            f"compute_cam needs activations and gradients of one shape (N,K,h,w); got "
            f"{tuple(activations.shape)} and {tuple(gradients.shape)}")
    alpha = gradients.mean(dim=(2, 3), keepdim=True)          # (N,K,1,1)
    return F.relu((alpha * activations).sum(dim=1))


def compute_cam_plus_plus(activations: torch.Tensor, gradients: torch.Tensor,
                          eps: float = 1e-6) -> torch.Tensor:
    """Grad-CAM++ at the layer's resolution.

    activations, gradients: float (N,K,h,w), as for `compute_cam`.
    Returns float (N,h,w) = ReLU(sum_k w_k A_k), values >= 0, not normalised,
    with the Grad-CAM++ weights in the closed form for an exponential score
    (Chattopadhay et al. 2018, eq. 19), as pytorch-grad-cam computes them:

        a_kij = g^2 / (2 g^2 + (sum_ij A_k) g^3 + eps),  0 where g == 0
        w_k   = sum_ij ReLU(g_kij) a_kij

    with g = d(score)/dA (the gradient of the score itself, not of exp(score)).
    `eps` (1e-6, pytorch-grad-cam's value) is not negligible: for gradients
    below ~1e-3 (small or random models) it dominates the denominator and the
    weights scale like g^3 / eps; keep it for comparability.
    """
    if activations.ndim != 4 or activations.shape != gradients.shape:
        raise GradCAMError(
            f"compute_cam_plus_plus needs activations and gradients of one shape (N,K,h,w); got "
            f"{tuple(activations.shape)} and {tuple(gradients.shape)}")
    g2 = gradients * gradients
    g3 = g2 * gradients
    sum_acts = activations.sum(dim=(2, 3), keepdim=True)       # (N,K,1,1)
    aij = g2 / (2 * g2 + sum_acts * g3 + eps)
    aij = torch.where(gradients != 0, aij, torch.zeros_like(aij))
    weights = (F.relu(gradients) * aij).sum(dim=(2, 3), keepdim=True)   # (N,K,1,1)
    return F.relu((weights * activations).sum(dim=1))


def upsample(raw: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False, like cv2.resize INTER_LINEAR)
    of maps (N,h,w) to (N,H,W), size = (H, W) or an int for HxH. Values stay
    within each map's [min, max] (a convex combination), so >= 0 stays >= 0."""
    if raw.ndim != 3:
        raise GradCAMError(f"upsample needs maps of shape (N,h,w); got {tuple(raw.shape)}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    out = F.interpolate(raw.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False)
    return out.squeeze(1)


def normalize_maps(maps: torch.Tensor, scale: float | torch.Tensor | None = None) -> torch.Tensor:
    """Rescale maps (N,H,W) (or (N,h,w)) to [0, 1], float32.

    scale=None: min-max per map, (m - min) / (max - min). A flat map
    (max == min, e.g. all zero) becomes all zeros; nothing is divided by zero.
    scale given (a number, a 0-d tensor, or one value per map (N,)): m / scale,
    clipped to [0, 1], with 0 kept as 0 (the ReLU floor). Pass one shared scale
    (e.g. the largest `raw.max()` of several results) to put the maps of
    several images or models on one scale. A scale <= 0 gives zeros.
    """
    if maps.ndim != 3:
        raise GradCAMError(f"normalize_maps needs maps of shape (N,H,W); got {tuple(maps.shape)}")
    maps = maps.float()
    if scale is None:
        flat = maps.flatten(1)
        lo = flat.amin(dim=1).view(-1, 1, 1)
        span = flat.amax(dim=1).view(-1, 1, 1) - lo
        ok = span > 0
        return torch.where(ok, (maps - lo) / torch.where(ok, span, torch.ones_like(span)),
                           torch.zeros_like(maps)).clamp_(0.0, 1.0)
    s = torch.as_tensor(scale, dtype=torch.float32, device=maps.device)
    if s.ndim == 1 and s.numel() == maps.shape[0]:
        s = s.view(-1, 1, 1)
    elif s.ndim != 0:
        raise GradCAMError(
            f"scale must be a number or one value per map ({maps.shape[0]}); got shape {tuple(s.shape)}")
    ok = s > 0
    return torch.where(ok, maps / torch.where(ok, s, torch.ones_like(s)),
                       torch.zeros_like(maps)).clamp_(0.0, 1.0)


# --- hooks and modes ---------------------------------------------------------

@contextmanager
def capture_output(layer: nn.Module) -> Iterator[list]:
    """Record every output of `layer` during the `with` block into the yielded
    list; the forward hook is removed on exit, also when the block raises."""
    outputs: list = []
    handles = [layer.register_forward_hook(lambda _m, _inp, out: outputs.append(out))]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
        outputs.clear()


# --- targets -----------------------------------------------------------------

def _category(fn: Callable) -> int:
    cat = getattr(fn, "category", None)
    return int(cat) if isinstance(cat, (int, np.integer)) and not isinstance(cat, bool) else -1


def _is_index(t: object) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


def _as_score(value: object, shape: tuple, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        raise GradCAMError(f"{what} must return a float tensor; got {type(value).__name__}")
    if value.numel() != int(np.prod(shape)):
        raise GradCAMError(f"{what} must return a score of shape {shape}; got {tuple(value.shape)}")
    return value.reshape(shape)


def _resolve_targets(targets: object, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (class index per image (N,) int64, score per image (N,) in the graph)."""
    n, c = logits.shape
    dev = logits.device
    if targets is None:
        idx = logits.detach().argmax(dim=1)
    elif _is_index(targets):
        idx = torch.full((n,), int(targets), dtype=torch.long, device=dev)
    elif isinstance(targets, (torch.Tensor, np.ndarray)):
        t = torch.as_tensor(targets)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise GradCAMError(f"targets must hold integer class indices; got dtype {t.dtype}")
        if t.ndim == 0:
            t = t.expand(n)
        elif t.ndim != 1 or t.numel() != n:
            raise GradCAMError(
                f"targets has shape {tuple(t.shape)} but the batch has {n} images: "
                f"give one class per image, a single int, or None")
        idx = t.to(device=dev, dtype=torch.long)
    elif callable(targets):
        score = _as_score(targets(logits), (n,), "a target callable applied to the (N,C) logits")
        return torch.full((n,), _category(targets), dtype=torch.long, device=dev), score
    elif isinstance(targets, Sequence) and not isinstance(targets, (str, bytes)):
        items = list(targets)
        if len(items) != n:
            raise GradCAMError(
                f"targets has {len(items)} entries but the batch has {n} images: "
                f"give one target per image, a single int, or None")
        bad = [t for t in items if not (_is_index(t) or callable(t))]
        if bad:
            raise GradCAMError(f"targets must be class indices or callables; got {bad[0]!r}")
        if any(callable(t) for t in items):
            _check_range([int(t) for t in items if _is_index(t)], c)
            scores = [logits[i, int(t)] if _is_index(t)
                      else _as_score(t(logits[i]), (), f"target callable #{i} applied to logits[{i}]")
                      for i, t in enumerate(items)]
            idx = torch.tensor([int(t) if _is_index(t) else _category(t) for t in items],
                               dtype=torch.long, device=dev)
            return idx, torch.stack(scores)
        idx = torch.tensor([int(t) for t in items], dtype=torch.long, device=dev)
    else:
        raise GradCAMError(
            f"targets must be None, an int, N ints (sequence or tensor) or callables; "
            f"got {type(targets).__name__}")
    _check_range(idx.tolist(), c)
    return idx, logits.gather(1, idx.view(-1, 1)).squeeze(1)


def _check_range(indices: list[int], num_classes: int) -> None:
    bad = [i for i in indices if not 0 <= i < num_classes]
    if bad:
        raise GradCAMError(f"target class {bad[0]} is out of range for {num_classes} classes")


# --- the explainer -----------------------------------------------------------

def get_layer(model: nn.Module, name: str) -> nn.Module:
    """The submodule of `model` called `name`: a top-level name ("layer4") or a
    dotted path ("layer4.1.conv2", as in `model.named_modules()`). Raises a
    GradCAMError naming the valid top-level choices for an unknown name."""
    if isinstance(name, str) and name:
        try:
            return model.get_submodule(name)
        except AttributeError:
            pass
    children = [n for n, _ in model.named_children()]
    nested = next((f"{n}.{c}" for n, m in model.named_children()
                   for c, _ in m.named_children()), None)
    hint = f" (or a dotted path into them, e.g. {nested})" if nested else ""
    raise GradCAMError(f"no layer {name!r} in {type(model).__name__}; valid: "
                       f"{', '.join(children) or '(no submodules)'}{hint}")


class CamExplainer:
    """Base of the gradient-weighted CAM explainers: runs one forward and one
    backward for the batch with a forward hook on `target_layer`, checks the
    layer, targets and inputs, and turns the raw map into `CamResult`.
    Subclasses differ only in `raw_map(activations, gradients) -> (N,h,w)`
    and their `method` name (used in messages).

    `target_layer` (default `model.layer4`, the last conv stage of the CIFAR
    ResNet: a 4x4 map for 32x32 inputs) is a submodule of `model` or its name
    (see `get_layer`), whose output must be a feature map (N,C,h,w) with
    h*w > 1; this is checked on each call (the output shape depends on the
    input). Holds no hooks between calls.
    """

    method = "CAM"

    @staticmethod
    def raw_map(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
        """(N,K,h,w) activations and gradients -> raw map (N,h,w) >= 0."""
        raise NotImplementedError

    def __init__(self, model: nn.Module, target_layer: nn.Module | str | None = None) -> None:
        if isinstance(target_layer, str):
            target_layer = get_layer(model, target_layer)
        if target_layer is None:
            target_layer = getattr(model, "layer4", None)
            if not isinstance(target_layer, nn.Module):
                raise GradCAMError(
                    f"{type(model).__name__} has no `layer4`: pass target_layer=, the last "
                    f"convolutional block before global pooling")
        name = next((n for n, m in model.named_modules() if m is target_layer), None)
        if name is None:
            raise GradCAMError(
                f"target_layer ({type(target_layer).__name__}) is not a submodule of the model; "
                f"pass one of its modules, e.g. model.layer4")
        self.model = model
        self.target_layer = target_layer
        self.layer_name = name or "<the model itself>"

    def __call__(self, x: torch.Tensor, targets: Targets = None) -> torch.Tensor:
        """Maps float32 (N,H,W) on [0, 1] for normalised images x (N,3,H,W);
        see `attribute` for `targets`."""
        return self.attribute(x, targets).maps

    def attribute(self, x: torch.Tensor, targets: Targets = None) -> CamResult:
        """The CAM (Grad-CAM, Grad-CAM++: see the subclass) of a batch.

        x: float (N,3,H,W), NCHW, normalised (cnnstress.augment.normalize);
           moved to the model's device and computed in fp32.
        targets: None (each image's predicted class), an int (one class for
           all), N ints (sequence, ndarray or tensor), one callable mapping the
           (N,C) logits to (N,) scores, or a sequence of N ints/callables, each
           callable mapping one image's logits (C,) to a scalar score (e.g.
           pytorch-grad-cam's ClassifierOutputTarget).
        Returns a CamResult (raw (N,h,w), maps (N,H,W) on [0, 1], targets,
        logits, zero). Raises GradCAMError for a bad layer, targets or input;
        errors from the model itself propagate unchanged.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or not x.is_floating_point():
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise GradCAMError(f"{self.method} needs a float batch (N,3,H,W) of normalised images; "
                               f"got {shape}")
        if x.shape[0] == 0:
            raise GradCAMError(f"{self.method} got an empty batch")
        wrong = next((p.dtype for p in self.model.parameters()
                      if p.is_floating_point() and p.dtype != torch.float32), None)
        if wrong is not None:
            raise GradCAMError(
                f"model parameters are {wrong}; {self.method} runs in fp32: pass model.float()")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else x.device
        n, _, height, width = x.shape

        with eval_mode(self.model), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False), capture_output(self.target_layer) as outs:
            # A private copy that requires grad, so that the graph reaches the
            # layer even in a frozen model; only d(score)/dA is computed.
            inp = x.detach().to(device=device, dtype=torch.float32, copy=True).requires_grad_(True)
            logits = self.model(inp)
            acts = self._check_output(outs)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != n:
                shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
                raise GradCAMError(f"the model must return logits (N,C) = ({n},C); got {shape}")
            idx, scores = _resolve_targets(targets, logits)
            (grads,) = torch.autograd.grad(scores.sum(), acts, allow_unused=True)
            if grads is None:
                raise GradCAMError(
                    f"the target score does not depend on layer {self.layer_name!r}; pick a layer "
                    f"on the path to the logits, e.g. model.layer4")
            raw = self.raw_map(acts.detach(), grads.detach())

        finite = torch.isfinite(raw).flatten(1).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise GradCAMError(f"non-finite activations or gradients at {self.layer_name!r} "
                               f"for images {bad[:10]} (NaN/inf in the model or its inputs)")
        zero = raw.flatten(1).amax(dim=1) == 0
        maps = normalize_maps(upsample(raw, (height, width)))
        return CamResult(raw=raw, maps=maps, targets=idx, logits=logits.detach(), zero=zero)

    def _suggestion(self) -> str:
        layer4 = getattr(self.model, "layer4", None)
        if isinstance(layer4, nn.Module) and layer4 is not self.target_layer:
            return "use model.layer4 (the last convolutional stage)"
        return "use the last convolutional block before global pooling"

    def _check_output(self, outs: list) -> torch.Tensor:
        where = f"target layer {self.layer_name!r} ({type(self.target_layer).__name__})"
        if not outs:
            raise GradCAMError(f"{where} did not run in the model's forward; "
                               f"{self._suggestion()}")
        if len(outs) > 1:
            raise GradCAMError(f"{where} ran {len(outs)} times in one forward; {self.method} needs a "
                               f"layer that runs once: pick a module that is not shared")
        out = outs[0]
        if not isinstance(out, torch.Tensor) or out.ndim != 4:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GradCAMError(f"{where} outputs {shape}, not a (N,C,h,w) convolutional feature "
                               f"map; {self._suggestion()}")
        if out.shape[2] * out.shape[3] == 1:
            raise GradCAMError(f"{where} outputs a 1x1 map {tuple(out.shape)} (after pooling?), "
                               f"which has no spatial extent; {self._suggestion()}")
        if not out.requires_grad:
            raise GradCAMError(f"{where} output is not connected to the autograd graph "
                               f"(detached inside the model?)")
        return out


class GradCAM(CamExplainer):
    """Grad-CAM explainer (channel weights = spatially averaged gradients,
    `compute_cam`) for `model` at `target_layer`; see `CamExplainer`."""

    method = "Grad-CAM"
    raw_map = staticmethod(compute_cam)


class GradCAMPlusPlus(CamExplainer):
    """Grad-CAM++ explainer (`compute_cam_plus_plus` weights) for `model` at
    `target_layer`; same interface, checks and hygiene as `GradCAM`."""

    method = "Grad-CAM++"
    raw_map = staticmethod(compute_cam_plus_plus)


# Explainers by name, e.g. for a CLI flag or cnnstress.xai.randomisation.
CAM_METHODS: dict[str, type[CamExplainer]] = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus}


def cam_explain_func(method: str = "gradcam", layer: str = "layer4", *, normalized: bool = True,
                     batch_size: int = 256) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """A CAM method as an explain_func for the metrics (cnnstress.xai.metric):
    f(model, x, targets) -> float32 CPU maps (N,H,W) of `method` (a key of
    CAM_METHODS) at `layer` of whatever model it is given (e.g. a randomised
    copy). normalized=True: the [0, 1] maps; False: the raw map upsampled to
    (H,W), >= 0, un-normalised (what the explanation stage scores)."""
    if method not in CAM_METHODS:
        raise GradCAMError(f"unknown CAM method {method!r}; choose one of {', '.join(CAM_METHODS)}")

    def explain(model: nn.Module, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        cam = CAM_METHODS[method](model, get_layer(model, layer))
        out = []
        for s in range(0, x.shape[0], batch_size):
            res = cam.attribute(x[s:s + batch_size], targets[s:s + batch_size])
            out.append((res.maps if normalized else upsample(res.raw, tuple(x.shape[2:]))).cpu())
        return torch.cat(out)

    return explain


# --- display -----------------------------------------------------------------

def to_display_image(x: torch.Tensor) -> np.ndarray:
    """Normalised image(s) back to viewable RGB: x float (3,H,W) CHW (or
    (N,3,H,W)) normalised with the CIFAR mean/std -> float32 ndarray (H,W,3)
    HWC (or (N,H,W,3)) on [0, 1] (clamped)."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (3, 4) or x.shape[-3] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise GradCAMError(f"to_display_image needs a normalised tensor (3,H,W) or (N,3,H,W); got {shape}")
    batch = x.detach().float().cpu()
    single = batch.ndim == 3
    out = denormalize(batch.unsqueeze(0) if single else batch).permute(0, 2, 3, 1)
    out = out.contiguous().numpy().astype(np.float32, copy=False)
    return out[0] if single else out


def overlay(image: np.ndarray | torch.Tensor, cam: np.ndarray | torch.Tensor,
            alpha: float = 0.5, colormap: str = "jet") -> np.ndarray:
    """Blend a colour-mapped CAM onto an image.

    image: (H,W,3) HWC RGB, uint8 0..255 or float on [0, 1] (see
           `to_display_image` for a normalised tensor).
    cam:   (H,W) float on [0, 1] (e.g. `CamResult.maps[i]`).
    alpha: weight of the heatmap, in [0, 1].
    colormap: a matplotlib colormap name ("jet": 0 -> dark blue, 1 -> dark red)
           or a matplotlib Colormap; its RGB output is used, so red is channel 0.
    Returns float32 (H,W,3) RGB on [0, 1] = (1 - alpha) * image + alpha * heatmap.
    """
    import matplotlib  # deferred: only display needs it

    img = as_numpy(image)
    heat_in = as_numpy(cam)
    if img.ndim != 3 or img.shape[2] != 3:
        raise GradCAMError(f"overlay needs an RGB image (H,W,3) in HWC layout; got shape {img.shape}")
    if heat_in.shape != img.shape[:2]:
        raise GradCAMError(f"cam shape {heat_in.shape} does not match the image's (H,W) {img.shape[:2]}")
    if img.dtype == np.uint8:
        img = img.astype(np.float32) / 255.0
    elif np.issubdtype(img.dtype, np.floating):
        img = img.astype(np.float32)
        if not np.isfinite(img).all() or img.min() < 0.0 or img.max() > 1.0:
            raise GradCAMError("a float image must lie on [0, 1]; for a normalised tensor use "
                               "to_display_image() first")
    else:
        raise GradCAMError(f"image must be uint8 or float; got {img.dtype}")
    heat_in = heat_in.astype(np.float32)
    if not np.isfinite(heat_in).all() or heat_in.min() < 0.0 or heat_in.max() > 1.0:
        raise GradCAMError("cam must lie on [0, 1] (use CamResult.maps or normalize_maps)")
    if not 0.0 <= alpha <= 1.0:
        raise GradCAMError(f"alpha must be in [0, 1]; got {alpha}")
    if isinstance(colormap, str):
        try:
            cmap = matplotlib.colormaps[colormap]
        except KeyError:
            raise GradCAMError(f"unknown matplotlib colormap {colormap!r}") from None
    else:
        cmap = colormap
    heat = np.asarray(cmap(heat_in), dtype=np.float32)[..., :3]   # RGBA -> RGB
    out = (1.0 - alpha) * img + alpha * heat
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


_REGIONS = (("upper left", "top", "upper right"), ("left", "centre", "right"),
            ("lower left", "bottom", "lower right"))


def describe_cam(cam: np.ndarray | torch.Tensor) -> dict:
    """Where a map's mass lies, in words and numbers, for the report.

    cam: (H,W) non-negative. Returns region (3x3 grid cell of the centroid),
    centroid (row, col) in pixels, peak (row, col) and peak_region (its 3x3
    grid cell; a map with two blobs can have its centroid between them, so the
    peak is what a reader sees as "where it looks"), centre_fraction (share of
    the mass in the central quarter of the image: the middle half of the rows
    and of the columns). An all-zero map gives region 'nowhere (all-zero map)'."""
    m = as_numpy(cam).astype(np.float64)
    h, w = m.shape
    total = m.sum()
    if total <= 0:
        return {"region": "nowhere (all-zero map)", "centroid": (float("nan"), float("nan")),
                "peak": (0, 0), "peak_region": "nowhere (all-zero map)", "centre_fraction": 0.0}
    rows, cols = np.arange(h), np.arange(w)
    cy = float((m.sum(1) * rows).sum() / total)
    cx = float((m.sum(0) * cols).sum() / total)
    peak = np.unravel_index(int(m.argmax()), m.shape)
    centre = m[h // 4:h - h // 4, w // 4:w - w // 4].sum() / total

    def cell(r: float, c: float) -> str:
        return _REGIONS[min(int(3 * (r + 0.5) / h), 2)][min(int(3 * (c + 0.5) / w), 2)]

    return {"region": cell(cy, cx), "centroid": (cy, cx), "peak": (int(peak[0]), int(peak[1])),
            "peak_region": cell(float(peak[0]), float(peak[1])), "centre_fraction": float(centre)}
