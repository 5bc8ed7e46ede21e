"""The frost photographs that CIFAR-10-C's frost corruption overlays.

The five photographs make_cifar_c.py draws from ship as package data,
byte for byte (cnnstress/resources/frost, README.md there: source, licence,
SHA-256 and why the originals rather than pre-resized overlays):

    overlays = frost_overlays()   # five uint8 (H, W, 3) BGR arrays, read-only

Each file is read once per process, its SHA-256 checked against FROST_FILES,
decoded by OpenCV from the bytes that were hashed (as the authors' cv2.imread:
BGR, the PNGs' alpha dropped) and resized by 0.2 with OpenCV's default
(bilinear) interpolation, as the authors' generator does before cropping.
"""
from __future__ import annotations

import functools
import hashlib
from importlib import resources
from typing import Any

import cv2
import numpy as np

from ..errors import DataError

__all__ = ["FROST_FILES", "FROST_SCALE", "frost_overlays", "load_overlays"]

# make_cifar_c.py's list order; frost6.jpg is never drawn for CIFAR (np.random.randint(5)), so not shipped.
FROST_FILES: dict[str, str] = {
    "frost1.png": "ff9f907860bd7a835d459e32f9d588062b7f61ee267343cc7222b56753a14755",
    "frost2.png": "fe211a89b336999c207a852ce05818d4545d0b57c5beadd824b4cc9d9a9b6137",
    "frost3.png": "2d0d50b4a9bb213f38b024ef7768731bb83cc08d2f26b5766bbc167cdfa0e504",
    "frost4.jpg": "3f8b91ca1a9fa7167b09e773da53f5ae60d0a1fd88f02a783f6e328a72887f6e",
    "frost5.jpg": "5fc6a19df4a429ba68abdcc8f8a4278d4c9f81c9ccafd2c92ab0c8cf8992ebd2",
}
FROST_SCALE = 0.2  # cv2.resize(frost, (0, 0), fx=0.2, fy=0.2) in make_cifar_c.py


def load_overlays(folder: Any) -> tuple[np.ndarray, ...]:
    """The five overlays from `folder` (a Path or importlib.resources
    Traversable holding FROST_FILES): each hash-checked, decoded to BGR
    uint8 and resized by FROST_SCALE. DataError (one line, naming the file
    and the fix) for a missing, altered or undecodable file."""
    overlays = []
    for name, expected in FROST_FILES.items():
        path = folder.joinpath(name)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(f"the frost photograph {path} cannot be read ({type(exc).__name__}); "
                            f"reinstall cnnstress or restore it from the cnnstress sources") from None
        digest = hashlib.sha256(data).hexdigest()
        if digest != expected:
            raise DataError(f"the frost photograph {path} is altered (SHA-256 {digest[:16]}..., expected "
                            f"{expected[:16]}...); restore it from the cnnstress sources or reinstall cnnstress")
        # Decoded from the bytes just hashed (no second read); IMREAD_COLOR is cv2.imread's default.
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise DataError(f"OpenCV could not decode the frost photograph {path}; "
                            f"install an opencv-python build with PNG and JPEG support")
        image = cv2.resize(image, (0, 0), fx=FROST_SCALE, fy=FROST_SCALE)
        image.setflags(write=False)  # shared by every call through the cache
        overlays.append(image)
    return tuple(overlays)


@functools.lru_cache(maxsize=1)
def frost_overlays() -> tuple[np.ndarray, ...]:
    """The shipped overlays (load_overlays on cnnstress/resources/frost),
    loaded on first use and kept for the process."""
    return load_overlays(resources.files("cnnstress.resources").joinpath("frost"))
