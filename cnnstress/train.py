"""The training loop: fit a CIFAR ResNet-18, checkpointing every epoch.

Reproducibility: the seed fixes the initial weights (global RNG, seeded right
before the model is built), the validation split (cnnstress.data) and, per
epoch, the batch order and the augmentation draws (generators seeded from
(seed, epoch)). Because each epoch's randomness is derived rather than carried
over, a run resumed from a checkpoint continues exactly as an uninterrupted
one would (bit-identical on the CPU).

Metrics are accumulated on the device and read back only every
`SYNC_EVERY` steps (progress bar, NaN check) and at the end of an epoch, so a
GPU run is not stalled by host synchronisation on every step.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .augment import DRAWS_VERSION, PRESETS, Augmenter
from .budget import TimeBudget
from .checkpoint import check_config_matches, read_checkpoint, save_checkpoint
from .config import Config
from .data import NUM_CLASSES, CifarSplits
from .errors import CheckpointError, TrainingDiverged
from .evaluate import predict
from .io import save_json
from .model import resnet18_for
from .runtime import (autocast, in_notebook, progress_bar, progress_enabled, resolve_device,  # noqa: F401 (in_notebook: re-exported)
                      resolve_precision, seed_everything, tune_backend)

SYNC_EVERY = 20  # steps between host reads of the running loss (progress bar, NaN check)


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    config: Config
    resumed_from_epoch: int = 0
    reused: bool = False            # True when a finished checkpoint was loaded, no training done
    extra: dict[str, Any] = field(default_factory=dict)
    budget_stopped: bool = False    # True when the time budget ended training before config.epochs

    @property
    def epochs_done(self) -> int:
        return len(self.history)

    @property
    def train_seconds(self) -> float:
        return float(sum(h["seconds"] for h in self.history))


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch, stream)."""
    return (seed * 1_000_003 + epoch * 101 + stream) % (2**63 - 1)


def build_model(config: Config, device: torch.device) -> nn.Module:
    """A freshly initialised ResNet-18 of config.width, the init fixed by config.seed."""
    seed_everything(config.seed)
    model = resnet18_for(config, NUM_CLASSES).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def use_fused_adam(config: Config, device: torch.device) -> bool:
    """Whether Adam runs as one fused kernel: config.fused_adam "on"/"off", or
    "auto" = on CUDA only. Fused Adam is the same algorithm (L2 weight decay
    added to the gradient, as torch.optim.Adam) in fewer kernel launches; on
    the CPU `auto` keeps torch's default so CPU results stay as they were."""
    if config.fused_adam == "auto":
        return device.type == "cuda"
    return config.fused_adam == "on"


def build_optimizer(model: nn.Module, config: Config):
    device = next(model.parameters()).device
    fused = use_fused_adam(config, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                 **({"fused": True} if fused else {}))
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    return optimizer, scheduler


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load an Adam state saved by a fused or an unfused optimizer into this
    one, keeping this run's implementation: load_state_dict would take the
    saved `fused`/`foreach` flags, and fused Adam keeps `step` on the device."""
    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, flags in zip(optimizer.param_groups, impl):
        group.update(flags)
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            if any(torch.is_tensor(st.get(k)) and st[k].shape != p.shape for k in ("exp_avg", "exp_avg_sq")):
                raise ValueError("an Adam moment does not have its parameter's shape")
            if torch.is_tensor(st.get("step")):
                st["step"] = (st["step"].to(p.device, torch.float32) if flags["fused"]
                              else st["step"].to("cpu", torch.float32))


def _rng_states() -> dict[str, Any]:
    """Every RNG's state as tensors, numbers and tuples only, so the checkpoint
    loads with torch.load(weights_only=True)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
              "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _restore_rng(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    state = states["numpy"]
    if isinstance(state, dict):
        state = (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], state["has_gauss"],
                 state["cached_gaussian"])
    np.random.set_state(state)  # a tuple: format-1 checkpoints
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _check_finite(value: float, epoch: int, step: int, checkpoint_path: Path | None) -> None:
    if math.isfinite(value):
        return
    kept = (f"the last good checkpoint {checkpoint_path} is kept" if checkpoint_path and checkpoint_path.exists()
            else "no checkpoint was written")
    raise TrainingDiverged(f"training loss became {value} in epoch {epoch + 1} (by step {step}); {kept}; "
                           "lower the learning rate or use precision fp32")


def load_model(path: str | Path, config: Config | None = None,
               device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """A trained model from a checkpoint (eval mode) and the checkpoint dict.
    With `config`, the checkpoint must have been trained with it."""
    ckpt = read_checkpoint(path)
    if config is not None:
        check_config_matches(ckpt, config, path)
    saved = Config.from_dict(ckpt["config"])   # a config saved before `width` existed reads as 64
    model = resnet18_for(saved, NUM_CLASSES)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not fit a CIFAR ResNet-18 "
                              f"({str(exc).splitlines()[0]}); retrain with --force") from None
    model = model.to(device)
    if (config or saved).channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval(), ckpt


def fit(config: Config, splits: CifarSplits, *, checkpoint_path: str | Path | None = None,
        resume: bool = False, progress: bool | None = None,
        log: Callable[[str], None] | None = print,
        stop_after_epoch: int | None = None, budget: TimeBudget | None = None) -> FitResult:
    """Train a fresh ResNet-18 on splits.train, validating on splits.val after
    every epoch; returns the model (eval mode) and the per-epoch history
    [{epoch, train_loss, train_acc, val_loss, val_acc, lr, seconds}].

    checkpoint_path: written atomically after every config.checkpoint_every
    epochs and after the last one (and history.json with it). With resume=True an
    existing checkpoint there (same training config) is continued from its
    last epoch; a finished one is returned without training.
    stop_after_epoch: end after that many epochs as if interrupted (tests).
    budget: a cnnstress.budget.TimeBudget; an epoch starts only when it is
    expected to end before the deadline, else training stops there with its
    checkpoint saved (result.budget_stopped) and resume continues it.
    """
    device = resolve_device(config.device)
    amp_dtype = resolve_precision(config.precision, device)
    tune_backend(device)
    ckpt_path = Path(checkpoint_path) if checkpoint_path is not None else None
    model = build_model(config, device)
    ckpt = None
    if resume and ckpt_path is not None and ckpt_path.exists():
        ckpt = read_checkpoint(ckpt_path, map_location=device)
        check_config_matches(ckpt, config, ckpt_path)
    start = int(ckpt["epoch"]) if ckpt is not None else 0
    # A finished run is only read back: it needs no optimizer (building Adam imports torch._dynamo,
    # about a second of a cached rerun).
    finished = start >= config.epochs
    optimizer, scheduler = (None, None) if finished else build_optimizer(model, config)
    history: list[dict[str, float]] = []
    if ckpt is not None:
        try:   # states that fit their types but not this model/optimizer: one line, nothing trained
            model.load_state_dict(ckpt["model"])
            if not finished:
                load_optimizer_state(optimizer, ckpt["optimizer"])
                scheduler.load_state_dict(ckpt["scheduler"])
            _restore_rng(ckpt["rng"])
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {ckpt_path} cannot be resumed ({type(exc).__name__}: "
                                  f"{(str(exc).splitlines() or [''])[0][:200]}); it is damaged: "
                                  "retrain with --force") from None
        history = list(ckpt["history"])
        repair_history_file(ckpt_path.with_name("history.json"), ckpt["config"], history, log)
        if log and not finished:
            log(f"resuming from {ckpt_path} after epoch {start}/{config.epochs}")
    result = FitResult(model=model, history=history, config=config, resumed_from_epoch=start, reused=finished)
    if result.reused:
        return _finish(result)

    step_fn = make_step(model, optimizer, device, amp_dtype, config.compile, log=log)
    train_x = splits.train.images.to(device)
    train_y = splits.train.labels.to(device)
    total_steps = len(batch_bounds(train_x.shape[0], config.batch_size))
    show = progress_enabled(progress)
    last = config.epochs if stop_after_epoch is None else min(config.epochs, stop_after_epoch)

    def save(epochs_done: int) -> None:
        save_checkpoint(ckpt_path, {
            "epoch": epochs_done, "num_classes": NUM_CLASSES, "config": config.to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_states(), "history": history,
            "finished": epochs_done == config.epochs, "augment_draws": DRAWS_VERSION,
        })
        save_json(ckpt_path.with_name("history.json"), {"config": config.to_dict(), "history": history})

    saved = start
    for epoch in range(start, last):
        if budget is not None and not budget.epoch_fits(history):
            result.budget_stopped = True
            break
        t0 = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        bar = progress_bar(total_steps, f"{config.augment} epoch {epoch + 1}/{config.epochs}", show)

        def on_sync(steps_done: int, _total: int, running: float, correct: torch.Tensor, seen: int) -> None:
            _check_finite(running, epoch, steps_done, ckpt_path)
            if bar is not None:
                bar.set_postfix(loss=f"{running:.3f}", acc=f"{int(correct) / seen:.3f}", refresh=False)
                bar.update(steps_done - bar.n)

        stats = train_epoch(model, step_fn, train_x, train_y, config=config, epoch=epoch, on_sync=on_sync)
        if bar is not None:
            bar.close()
        scheduler.step()
        val = predict(model, splits.val.images, splits.val.labels, device=device,
                      batch_size=config.eval_batch_size, amp_dtype=amp_dtype,
                      channels_last=config.channels_last)
        record = {"epoch": epoch + 1, "train_loss": stats["train_loss"], "train_acc": stats["train_acc"],
                  "val_loss": val.loss, "val_acc": val.accuracy, "lr": lr,
                  "seconds": time.perf_counter() - t0}
        history.append(record)
        if log:
            log(f"[{config.augment}] epoch {epoch + 1:>2}/{config.epochs}  "
                f"train loss {record['train_loss']:.4f} acc {record['train_acc']:.4f}  "
                f"val loss {record['val_loss']:.4f} acc {record['val_acc']:.4f}  "
                f"lr {lr:.2e}  {record['seconds']:.1f}s")
        # Every checkpoint_every epochs and at the end: a full checkpoint is
        # ~135 MB, a sizeable share of a 1.5 s GPU epoch.
        if ckpt_path is not None and ((epoch + 1) % config.checkpoint_every == 0 or epoch + 1 == last):
            save(epoch + 1)
            saved = epoch + 1
        if budget is not None:
            budget.record_epoch(time.perf_counter() - t0)   # checkpoint write included
    if ckpt_path is not None and result.budget_stopped and saved < len(history):
        save(len(history))   # checkpoint_every > 1: keep every epoch that ran
    return _finish(result)


def repair_history_file(path: Path, config: dict[str, Any], history: list[dict[str, float]],
                        log: Callable[[str], None] | None = None) -> None:
    """Rewrite history.json from the checkpoint's history when it is missing,
    unreadable or different (it is only a readable copy; the checkpoint rules)."""
    import json
    wanted = {"config": config, "history": history}
    try:
        ok = json.loads(path.read_text()) == json.loads(json.dumps(wanted, default=str))  # tuples -> lists
    except (OSError, ValueError, RecursionError):   # RecursionError: JSON nested too deep
        ok = False
    if not ok:
        save_json(path, wanted)
        if log:
            log(f"{path} was missing, unreadable or out of date; rewrote it from the checkpoint")


def batch_bounds(n: int, batch_size: int) -> list[int]:
    """Start positions of an epoch's batches over n images. A last batch of one
    image would break BatchNorm, so it is folded into the previous one."""
    bounds = list(range(0, n, batch_size))
    if len(bounds) > 1 and n - bounds[-1] < 2:
        bounds.pop()
    return bounds


def train_epoch(model: nn.Module, step: Callable, images: torch.Tensor, labels: torch.Tensor, *,
                config: Config, epoch: int, augmenter: Augmenter | None = None,
                max_steps: int | None = None,
                on_sync: Callable[[int, int, float, torch.Tensor, int], None] | None = None
                ) -> dict[str, float | int]:
    """One training epoch, as `fit` runs it: the epoch's seeded batch order ->
    augment (uint8 -> normalised float) -> channels_last (per config) ->
    `step` (see make_step) -> loss/accuracy accumulated on the device, read
    back every SYNC_EVERY steps and after the last step.

    images: uint8 (N,3,H,W) and labels int64 (N,), both on the training device.
    augmenter: defaults to config.augment's preset seeded from (config.seed, epoch).
    max_steps: stop after that many steps (benchmarks); None = the whole epoch.
    on_sync(steps_done, total_steps, running_loss, correct, seen) is called at
    every read-back; `correct` is the on-device count (0-dim tensor). It may
    raise to abort the epoch (fit's NaN check does).

    Returns {loss_sum, correct, seen, steps, train_loss, train_acc} (host numbers).
    """
    device = images.device
    model.train()
    n = images.shape[0]
    # Drawn on the CPU (the same order on every device), moved once: slicing a
    # device tensor per step needs no host-to-device copy in the loop.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(config.seed, epoch, 0))).to(device)
    bounds = batch_bounds(n, config.batch_size)
    if augmenter is None:
        augmenter = Augmenter(PRESETS[config.augment], device, epoch_seed(config.seed, epoch, 1))
    steps = len(bounds) if max_steps is None else max(0, min(len(bounds), max_steps))
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    running = float("nan")
    for i in range(steps):
        lo = bounds[i]
        hi = bounds[i + 1] if i + 1 < len(bounds) else n
        idx = order[lo:hi]
        x = augmenter(images[idx])
        if config.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels[idx]
        loss, batch_correct = step(x, y)
        loss_sum += loss.detach() * y.shape[0]
        correct += batch_correct
        seen += y.shape[0]
        if (i + 1) % SYNC_EVERY == 0 or i + 1 == steps:
            running = float(loss_sum) / seen
            if on_sync is not None:
                on_sync(i + 1, len(bounds), running, correct, seen)
    total_correct = int(correct)
    return {"loss_sum": float(loss_sum), "correct": total_correct, "seen": seen, "steps": steps,
            "train_loss": running, "train_acc": total_correct / seen if seen else float("nan")}


def _finish(result: FitResult) -> FitResult:
    result.model.eval()
    return result


def make_step(model: nn.Module, optimizer, device: torch.device, amp_dtype, compile_mode: str | bool = "off",
              log: Callable[[str], None] | None = print):
    """A function doing one optimiser step on a prepared batch (normalised
    float, in the model's memory format) -> (loss, correct count), both on
    the device; nothing is read back to the host.

    compile_mode: "off" (eager) or a torch.compile mode for the model
    (Config.compile; True means "default"). Compiling is lazy: when it fails
    (an old torch, no compiler, an unsupported backend) the step says so once
    through `log` and runs eagerly from then on, repeating the failed batch
    from scratch (gradients are cleared before every backward)."""
    mode = ("default" if compile_mode else "off") if isinstance(compile_mode, bool) else compile_mode
    forward = model
    compiled = None
    if mode != "off":
        try:
            compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=False)
        except Exception as exc:  # noqa: BLE001 - any failure means: run eagerly
            _compile_failed(mode, exc, log)
    mark_step = getattr(getattr(torch, "compiler", None), "cudagraph_mark_step_begin", None)
    graphs = mode in ("reduce-overhead", "max-autotune") and device.type == "cuda" and mark_step is not None

    def forward_backward(fwd, x: torch.Tensor, y: torch.Tensor):
        with autocast(device, amp_dtype):
            logits = fwd(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        # Read the CUDA-graph outputs before the next replay overwrites them.
        return loss.detach(), (logits.detach().argmax(1) == y).sum()

    def step(x: torch.Tensor, y: torch.Tensor):
        nonlocal compiled
        if compiled is not None:
            try:
                if graphs:
                    mark_step()
                loss, correct = forward_backward(compiled, x, y)
            except Exception as exc:  # noqa: BLE001 - compile errors surface at the first call
                _compile_failed(mode, exc, log)
                compiled = None
                loss, correct = forward_backward(forward, x, y)
        else:
            loss, correct = forward_backward(forward, x, y)
        optimizer.step()
        return loss, correct

    return step


def _compile_failed(mode: str, exc: BaseException, log: Callable[[str], None] | None) -> None:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    (log or print)(f"torch.compile (mode {mode}) failed, training eagerly instead: {type(exc).__name__}: {first}")


