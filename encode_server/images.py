"""Untrusted encoded image bytes -> a PIL RGB image, with every size check before decoding pixels.

``decode_image`` is the encoder's only image entry point (flow v3: the language side sends each
image's bytes in an encode job; the encoder never sees URLs or prompt text). Every rejection is a
ValueError whose message says what was wrong.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image, ImageOps

MAX_ASPECT = 200  # the image processor's own bound (smart_resize)


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on one untrusted image: encoded bytes, and width * height from its header."""

    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if min(self.max_bytes, self.max_pixels) < 1:
            raise ValueError("image limits must be positive")


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Decode ``data``: RGB, EXIF-transposed. ValueError for anything not served.

    The pixel limit is checked on the header before any pixel is decoded; PIL's decompression
    bomb warning is an error here.
    """
    if len(data) > limits.max_bytes:
        raise ValueError(f"image larger than {limits.max_bytes} bytes")
    image = _pil(lambda: Image.open(io.BytesIO(data)))
    _check_size(image, limits)
    return _pil(lambda: ImageOps.exif_transpose(image).convert("RGB"))


def _pil(step: Callable[[], Image.Image]) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return step()
    except Exception as exc:  # PIL's plugins raise many types on hostile bytes
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from None


def _check_size(image: Image.Image, limits: ImageLimits) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ValueError(f"image size {width}x{height} is out of bounds")
    if width * height > limits.max_pixels:
        raise ValueError(f"image has {width * height} pixels, more than {limits.max_pixels}")
    if max(width, height) / min(width, height) > MAX_ASPECT:
        raise ValueError(f"image aspect ratio {width}x{height} exceeds {MAX_ASPECT}:1")
