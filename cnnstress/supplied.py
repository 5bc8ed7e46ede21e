"""Classifiers the user supplies: any CIFAR-10 model through the analysis stages.

Every stage feeds a model float images (N,3,32,32) normalised with the CIFAR
mean/std (cnnstress.augment.normalize), as our ResNet-18 takes them. A model
that wants something else gets its preprocessing from `Preprocessed`, which
undoes our normalisation and applies the model's own (a mean/std pair or a
callable on [0, 1] images); its layers keep their own names (get_layer looks
them up in the wrapped model).

    SuppliedModel   one model as the study analyses it: the module, its CAM
                    layer, where it came from, the identity caches key on
    supply          checks a model and makes a SuppliedModel (CAM layer found
                    when not given, output checked to be (N, 10) logits)
    import_factory  "pkg.module:function" -> the function (the CLI's --model)
    load_state      a weights file (state_dict, read with weights_only=True)
                    into a model, missing/unexpected keys named
    feature_maps    (name, (h, w)) of every module whose output is a feature
                    map, in the order they finish; find_cam_layer, cascade_order
"""
from __future__ import annotations

import hashlib
import importlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .augment import denormalize
from .data import NUM_CLASSES
from .errors import CnnstressError
from .model import count_parameters
from .runtime import eval_mode
from .weights import published_state, sha256_file

__all__ = ["NAME_PATTERN", "Preprocessed", "SuppliedModel", "SuppliedModelError", "cascade_order",
           "check_name", "feature_maps", "find_cam_layer", "finer_layer", "import_factory",
           "layer_root", "load_state", "state_sha256", "supply"]

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}")   # a name is a file-name part too
MAX_KEYS_NAMED = 5   # missing / unexpected weight names listed in an error


class SuppliedModelError(CnnstressError, ValueError):
    """A supplied model, its weights, factory or layer that cannot be used."""


def check_name(name: object) -> str:
    """A model name: it names files (predictions_<name>.npz) and report columns."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in (".", ".."):
        raise SuppliedModelError(f"model name {name!r} is not usable; use 1-40 letters, digits, '_', '.' or '-', "
                                 "starting with a letter or digit")
    return name


class Preprocessed(nn.Module):
    """`net` behind its own preprocessing, fed our normalised images: x ->
    net(p(denormalize(x))), p = (v - mean) / std per channel, or a callable
    on [0, 1] images (N,3,H,W). Its layers keep their names in `net`."""

    def __init__(self, net: nn.Module, *, mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None, fn: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        if (fn is None) == (mean is None or std is None):
            raise SuppliedModelError("preprocessing is either mean and std (three numbers each) or a callable")
        self.net = net
        self.fn = fn
        if fn is None:
            m, s = (torch.tensor([float(v) for v in t]).view(1, -1, 1, 1) for t in (mean, std))
            if m.numel() != 3 or s.numel() != 3 or not bool((s > 0).all()):
                raise SuppliedModelError(f"preprocessing mean and std need three numbers each, std > 0; got "
                                         f"{tuple(mean)} and {tuple(std)}")
            self.register_buffer("mean", m, persistent=False)
            self.register_buffer("std", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = denormalize(x)
        return self.net(self.fn(images) if self.fn is not None else (images - self.mean) / self.std)

    def get_submodule(self, target: str) -> nn.Module:
        """A layer by the wrapped model's own name ("features.28"), or by ours ("net.features.28")."""
        if target:
            try:
                return self.net.get_submodule(target)
            except AttributeError:
                pass
        return super().get_submodule(target)

    def describe(self) -> str:
        if self.fn is not None:
            return f"callable {getattr(self.fn, '__qualname__', type(self.fn).__name__)} on [0, 1] images"
        return f"mean {tuple(round(v, 6) for v in self.mean.flatten().tolist())}, " \
               f"std {tuple(round(v, 6) for v in self.std.flatten().tolist())} on [0, 1] images"


def layer_root(model: nn.Module) -> nn.Module:
    """The module whose names the user's layer names are: the wrapped model for a Preprocessed one."""
    return model.net if isinstance(model, Preprocessed) else model


def feature_maps(model: nn.Module, size: int = 32) -> list[tuple[str, tuple[int, int]]]:
    """(name, (h, w)) of each submodule whose output is a 4-D feature map, in
    the order their forward passes finish (a container after its children),
    from one forward pass of zeros (2,3,size,size) in eval mode under no_grad.
    Names are the user's (inside a Preprocessed model, the wrapped model's)."""
    root = layer_root(model)
    seen: list[tuple[str, tuple[int, int]]] = []
    hooks = []
    for name, module in root.named_modules():
        if name:
            def hook(_m, _inp, out, name=name):
                if isinstance(out, torch.Tensor) and out.ndim == 4:
                    seen.append((name, (int(out.shape[2]), int(out.shape[3]))))
            hooks.append(module.register_forward_hook(hook))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    try:
        with torch.no_grad(), eval_mode(model):
            model(torch.zeros(2, 3, size, size, device=device))
    finally:
        for h in hooks:
            h.remove()
    return seen


def find_cam_layer(model: nn.Module) -> str:
    """The layer Grad-CAM reads when none is named: the last module to finish
    with a feature map larger than 1x1, i.e. the deepest spatial features
    before global pooling ("layer4" of our ResNet-18). A model with none is a
    one-line error naming the option."""
    spatial = [name for name, (h, w) in feature_maps(model) if h * w > 1]
    if not spatial:
        raise SuppliedModelError(f"{type(layer_root(model)).__name__} has no layer with a spatial feature map for "
                                 "Grad-CAM; name one with cam_layer= (--cam-layer)")
    return spatial[-1]


def finer_layer(model: nn.Module, layer: str) -> str | None:
    """The last module to finish with a feature map larger than `layer`'s
    (e.g. "layer3", 8x8, for "layer4", 4x4): the same CAM one resolution finer."""
    maps = feature_maps(model)
    size = next((h * w for name, (h, w) in reversed(maps) if name == layer), None)
    finer = [name for name, (h, w) in maps if size is not None and h * w > size]
    return finer[-1] if finer else None


def cascade_order(model: nn.Module) -> list[str]:
    """The parameter-randomisation cascade for any model, head first: its
    top-level submodules that hold parameters, last first, a normalisation
    layer joined to the convolution it follows ("conv1+bn1"). For our
    ResNet-18: linear, layer4, layer3, layer2, layer1, conv1+bn1."""
    root = layer_root(model)
    groups: list[list[str]] = []
    previous: nn.Module | None = None
    for name, child in root.named_children():
        if next(child.parameters(), None) is None:
            continue
        norm = isinstance(child, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d))
        if norm and isinstance(previous, nn.Conv2d) and groups:
            groups[-1].append(name)
        else:
            groups.append([name])
        previous = child
    if not groups:
        raise SuppliedModelError(f"{type(root).__name__} has no parameters to randomise")
    return ["+".join(g) for g in reversed(groups)]


def state_sha256(model: nn.Module) -> str:
    """SHA-256 over the model's state_dict (names, dtypes, shapes and bytes, in
    name order): the identity of a model supplied without a weights file."""
    h = hashlib.sha256()
    for key, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(json.dumps([key, str(t.dtype), list(t.shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def import_factory(spec: str) -> Callable[[], nn.Module]:
    """"pkg.module:function" -> that function (code the user names, imported as such)."""
    module_name, sep, attr = str(spec).partition(":")
    if not sep or not module_name or not attr:
        raise SuppliedModelError(f"--model {spec!r} must be PKG.MODULE:FACTORY, e.g. cnnstress.model:resnet18")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SuppliedModelError(f"cannot import {module_name!r} for --model {spec}: {exc}; put its folder on "
                                 "PYTHONPATH or install it") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise SuppliedModelError(f"{module_name} has no {attr!r} (--model {spec})")
    if not callable(factory):
        raise SuppliedModelError(f"--model {spec}: {attr} is a {type(factory).__name__}, not a function or class")
    return factory


def load_state(model: nn.Module, path: str | Path, name: str | None = None) -> str:
    """Load weights into `model`: a file holding a state_dict (possibly under
    a "state_dict" or "model" key, as our checkpoints hold it), read with
    torch.load(weights_only=True) so nothing in it runs; or a folder of our
    published weights (cnnstress.weights, hashes verified), model `name` of it.
    Keys must match exactly (at most MAX_KEYS_NAMED of the missing and
    unexpected ones are named). Returns the identity caches key on: the
    file's SHA-256, or the published model's stamp."""
    path = Path(path)
    if path.is_dir():
        data, digest = published_state(path, name or "")
        _fit(model, data, path)
        return digest
    if not path.is_file():
        raise SuppliedModelError(f"weights file {path} not found; pass the file holding the model's state_dict")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:   # pickle errors, zip errors, a forbidden global: all one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SuppliedModelError(f"cannot read {path} as weights (torch.load, weights_only=True): {first[:200]}") \
            from None
    for key in ("state_dict", "model"):
        if isinstance(data, Mapping) and isinstance(data.get(key), Mapping):
            data = data[key]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise SuppliedModelError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    _fit(model, data, path)
    return sha256_file(path)


def _fit(model: nn.Module, data: Mapping[str, torch.Tensor], path: Path) -> None:
    """Copy `data` into `model` when its names and shapes are exactly the model's."""
    own = model.state_dict()
    missing = [k for k in own if k not in data]
    unexpected = [k for k in data if k not in own]
    if missing or unexpected:
        def some(keys: list[str]) -> str:
            return ", ".join(keys[:MAX_KEYS_NAMED]) + (f" (+{len(keys) - MAX_KEYS_NAMED} more)"
                                                       if len(keys) > MAX_KEYS_NAMED else "")
        parts = ([f"missing {some(missing)}"] if missing else []) + \
                ([f"unexpected {some(unexpected)}"] if unexpected else [])
        raise SuppliedModelError(f"{path} does not fit {type(model).__name__}: {'; '.join(parts)}")
    wrong = [k for k in own if tuple(own[k].shape) != tuple(data[k].shape)]
    if wrong:
        k = wrong[0]
        raise SuppliedModelError(f"{path} does not fit {type(model).__name__}: {k} has shape "
                                 f"{tuple(data[k].shape)}, the model {tuple(own[k].shape)}")
    model.load_state_dict(data)


@dataclass(frozen=True)
class SuppliedModel:
    """One supplied model as the study analyses it.

    module:     what the stages call (the user's model, behind Preprocessed
                when it has its own preprocessing), in eval mode, fp32.
    cam_layer:  the Grad-CAM layer, by the user's name; found when not given.
    cam_found:  True when cam_layer was found (find_cam_layer), not named.
    source:     where it came from ("cnnstress.model:resnet18", "python object").
    weights:    the weights file, or None.
    sha256:     the weights file's SHA-256, else of the state_dict (state_sha256).
    parameters: parameter count.
    preprocessing: how inputs are prepared ("CIFAR mean/std" when unchanged).
    stamp:      what caches key on: weights, preprocessing and CAM layer
                ("" with a callable preprocessing: nothing cached).
    """
    name: str
    module: nn.Module
    cam_layer: str
    cam_found: bool
    source: str
    weights: str | None
    sha256: str
    parameters: int
    preprocessing: str
    stamp: str

    def info(self) -> dict[str, Any]:
        """What the report and metrics.json say about the model."""
        return {"source": self.source, "weights": self.weights, "sha256": self.sha256,
                "cam_layer": self.cam_layer, "cam_layer_found": self.cam_found, "parameters": self.parameters,
                "preprocessing": self.preprocessing}


def supply(name: str, model: nn.Module, *, cam_layer: str | nn.Module | None = None,
           preprocess: Any = None, source: str = "python object", weights: str | Path | None = None,
           sha256: str | None = None, device: torch.device | str = "cpu") -> SuppliedModel:
    """Check `model` and describe it for the study.

    preprocess: None (the model takes our normalised images), (mean, std) on
    [0, 1] images, or a callable on [0, 1] images. cam_layer: a dotted name,
    the module itself, or None (find_cam_layer). The model must return logits
    (N, 10) and is put on `device` in fp32 and eval mode."""
    check_name(name)
    if not isinstance(model, nn.Module):
        raise SuppliedModelError(f"model {name!r} is a {type(model).__name__}, not a torch.nn.Module")
    model = model.to(device=device, dtype=torch.float32).eval()
    if preprocess is None:
        module, prep, callable_prep = model, "CIFAR mean/std (as cnnstress normalises)", False
    elif callable(preprocess):
        module, callable_prep = Preprocessed(model, fn=preprocess), True
        prep = module.describe()
    else:
        try:
            mean, std = preprocess
        except (TypeError, ValueError):
            raise SuppliedModelError("preprocess must be None, (mean, std) or a callable on [0, 1] images") from None
        module, callable_prep = Preprocessed(model, mean=mean, std=std), False
        prep = module.describe()
    module = module.to(device).eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, 3, 32, 32, device=device))
    except Exception as exc:
        raise SuppliedModelError(f"model {name!r} fails on a batch of CIFAR-10 images (2, 3, 32, 32): "
                                 f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}") from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, NUM_CLASSES):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise SuppliedModelError(f"model {name!r} returns {got} for 2 images; the analysis needs logits "
                                 f"(N, {NUM_CLASSES}), one per CIFAR-10 class")
    if isinstance(cam_layer, nn.Module):
        named = [n for n, m in layer_root(module).named_modules() if m is cam_layer and n]
        if not named:
            raise SuppliedModelError(f"the cam_layer module given for {name!r} is not inside the model")
        cam_layer = named[0]
    found = cam_layer is None
    layer = find_cam_layer(module) if found else str(cam_layer)
    try:
        module.get_submodule(layer)
    except AttributeError:
        top = ", ".join(n for n, _ in layer_root(module).named_children()) or "(no submodules)"
        raise SuppliedModelError(f"model {name!r} has no layer {layer!r} for Grad-CAM; its top-level layers: {top} "
                                 "(a dotted path reaches inside them, as in model.named_modules())") from None
    digest = sha256 or state_sha256(model)
    stamp = "" if callable_prep else "supplied:" + hashlib.sha256(
        json.dumps([digest, prep, layer]).encode()).hexdigest()
    return SuppliedModel(name=name, module=module, cam_layer=layer, cam_found=found, source=source,
                         weights=None if weights is None else str(weights), sha256=digest,
                         parameters=count_parameters(model), preprocessing=prep, stamp=stamp)
