"""Inference on a split: logits, probabilities, predictions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .augment import normalize, to_float
from .runtime import autocast


@dataclass(frozen=True)
class Predictions:
    """Test-time outputs for N images, all on the CPU: logits and probs float32
    (N,C), preds and labels int64 (N,)."""
    logits: torch.Tensor
    probs: torch.Tensor
    preds: torch.Tensor
    labels: torch.Tensor

    @property
    def accuracy(self) -> float:
        return float((self.preds == self.labels).float().mean()) if len(self.labels) else float("nan")

    @property
    def loss(self) -> float:
        return float(F.cross_entropy(self.logits, self.labels)) if len(self.labels) else float("nan")

    @property
    def confidence(self) -> torch.Tensor:
        """Probability of the predicted class, (N,)."""
        return self.probs.max(1).values

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@torch.no_grad()
def infer(model: nn.Module, images: torch.Tensor, *, device: torch.device,
          batch_size: int = 512, amp_dtype: torch.dtype | None = None,
          channels_last: bool = True) -> torch.Tensor:
    """Logits float32 (N,C) on the CPU for uint8 images (N,3,H,W). The model is
    put in eval mode for the call and handed back in the mode it had."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, images.shape[0], batch_size):
            x = normalize(to_float(images[start:start + batch_size].to(device, non_blocking=True)))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device, amp_dtype):
                out.append(model(x).float())
    finally:
        model.train(was_training)
    if not out:
        return torch.empty(0, getattr(model, "num_classes", 10))
    return torch.cat(out).cpu()


def predict(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, *, device: torch.device,
            batch_size: int = 512, amp_dtype: torch.dtype | None = None,
            channels_last: bool = True) -> Predictions:
    """Predictions for one split (eval mode, no grad; the model's mode is restored)."""
    logits = infer(model, images, device=device, batch_size=batch_size,
                   amp_dtype=amp_dtype, channels_last=channels_last)
    return Predictions(logits=logits, probs=logits.softmax(1), preds=logits.argmax(1),
                       labels=labels.cpu().long())
