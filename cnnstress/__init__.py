"""cnnstress: stress-test a CIFAR-10 image classifier.

Train a CIFAR ResNet-18, find its high-confidence failures, explain them with
Grad-CAM, try one constrained improvement and measure what it changed.
"""
from .config import PROFILES, Config, get_config
from .data import CIFAR_MEAN, CIFAR_STD, CLASSES, load_splits
from .errors import CnnstressError
from .evaluate import Predictions, predict
from .xai.cam import GradCAM, GradCAMPlusPlus
from .model import resnet18
from .runtime import resolve_device, resolve_precision, seed_everything
from .study import Study
from .train import FitResult, fit, load_model
from .version import __version__  # noqa: F401  (cnnstress.__version__)

__all__ = [
    "CIFAR_MEAN", "CIFAR_STD", "CLASSES", "PROFILES", "CnnstressError", "Config", "FitResult", "GradCAM",
    "GradCAMPlusPlus", "Predictions", "fit", "get_config", "load_model", "load_splits", "predict", "resnet18",
    "resolve_device", "resolve_precision", "seed_everything", "Study",
]
