"""The pipeline's stages, shared by the notebook and the command line.

Each stage reads what earlier stages left under the output folder when it
matches the config, so any stage can be rerun on its own without retraining.

    outputs/
      baseline/checkpoint.pt, history.json     (augment preset "baseline")
      improved/checkpoint.pt, history.json     (augment preset "enhanced")
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .checkpoint import check_config_matches, ensure_writable_dir, read_checkpoint
from .config import Config
from .data import CifarSplits, load_splits
from .errors import CheckpointError
from .evaluate import Predictions, predict
from .runtime import resolve_device, resolve_precision
from .train import FitResult, fit, load_model

DEFAULT_DATA_DIR = "data"
DEFAULT_OUT_DIR = "outputs"
ENV_PROFILE, ENV_DATA_DIR, ENV_OUT_DIR = "CNNSTRESS_PROFILE", "CNNSTRESS_DATA_DIR", "CNNSTRESS_OUT_DIR"
RUN_NAMES = {"baseline": "baseline", "enhanced": "improved"}  # augment preset -> model name


def default_data_dir() -> str:
    return os.environ.get(ENV_DATA_DIR, DEFAULT_DATA_DIR)


def default_out_dir() -> str:
    return os.environ.get(ENV_OUT_DIR, DEFAULT_OUT_DIR)


def default_profile(fallback: str | None = None) -> str:
    """$CNNSTRESS_PROFILE, else `fallback`, else full on a GPU and quick on a CPU."""
    if ENV_PROFILE in os.environ:
        return os.environ[ENV_PROFILE]
    if fallback:
        return fallback
    import torch
    return "full" if torch.cuda.is_available() else "quick"


def run_name(config: Config) -> str:
    return RUN_NAMES[config.augment]


def checkpoint_path(out_dir: str | Path, config: Config) -> Path:
    return Path(out_dir) / run_name(config) / "checkpoint.pt"


@dataclass
class Trained:
    """A trained model and what produced it."""
    name: str
    result: FitResult
    checkpoint: Path

    @property
    def model(self):
        return self.result.model

    @property
    def config(self) -> Config:
        return self.result.config


def load_data(config: Config, data_dir: str | Path | None = None) -> CifarSplits:
    """Stage 3: CIFAR-10 split as `config` says (downloads when missing)."""
    return load_splits(data_dir or default_data_dir(), config)


def train_model(config: Config, splits: CifarSplits, out_dir: str | Path | None = None, *,
                force: bool = False, resume: bool = True, progress: bool | None = None,
                log: Callable[[str], None] | None = print) -> Trained:
    """Stages 5 and 9: train one model, or reuse its finished checkpoint.

    An unfinished checkpoint with the same training config is continued
    (resume=True) or refused (resume=False); one with another config is
    refused unless force=True, which starts over and replaces it.
    """
    out_dir = Path(out_dir or default_out_dir())
    path = checkpoint_path(out_dir, config)
    ensure_writable_dir(path.parent)
    if path.exists() and not force:
        ckpt = read_checkpoint(path)
        check_config_matches(ckpt, config, path)
        done = int(ckpt["epoch"])
        if done < config.epochs and not resume:
            raise CheckpointError(f"{path} holds an unfinished run ({done}/{config.epochs} epochs); "
                                  "pass --resume to continue it or --force to start over")
        if done >= config.epochs and log:
            log(f"reusing finished checkpoint {path} ({done} epochs); --force retrains")
    result = fit(config, splits, checkpoint_path=path, resume=not force, progress=progress, log=log)
    return Trained(name=run_name(config), result=result, checkpoint=path)


def load_trained(config: Config, out_dir: str | Path | None = None) -> Trained:
    """A finished model from its checkpoint, without training."""
    path = checkpoint_path(out_dir or default_out_dir(), config)
    model, ckpt = load_model(path, config, device=resolve_device(config.device))
    if int(ckpt["epoch"]) < config.epochs:
        raise CheckpointError(f"{path} is unfinished ({ckpt['epoch']}/{config.epochs} epochs); train it first")
    result = FitResult(model=model, history=list(ckpt["history"]), config=config,
                       resumed_from_epoch=int(ckpt["epoch"]), reused=True)
    return Trained(name=run_name(config), result=result, checkpoint=path)


def evaluate_split(trained: Trained, split) -> Predictions:
    """Predictions of a trained model on one split (test set for the analysis)."""
    config = trained.config
    device = resolve_device(config.device)
    return predict(trained.model, split.images, split.labels, device=device,
                   batch_size=config.eval_batch_size,
                   amp_dtype=resolve_precision(config.precision, device),
                   channels_last=config.channels_last)
