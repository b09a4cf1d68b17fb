"""Turn untrusted OpenAI-style chat messages into template messages plus decoded PIL images.

Accepted image parts: ``{"type": "image_url", "image_url": {"url": URL}}`` where URL is a
``data:image/...;base64,...`` URL, a ``file://`` URL or a local path, and
``{"type": "image", "image": PIL.Image.Image | bytes | URL}``. Remote URLs are never fetched. Every
rejection is a ValueError whose message says what was wrong; nothing here touches the network.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from protocol.chat import ImageSourcePolicy, source_bytes

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageLimits:
    """Bounds on untrusted image input; ``local_root`` (when set) confines local file paths."""

    max_images: int = 16
    max_bytes: int = 32 * 1024 * 1024
    max_pixels: int = 64 * 1024 * 1024
    allow_local_files: bool = True
    local_root: Path | None = None

    def __post_init__(self) -> None:
        if min(self.max_images, self.max_bytes, self.max_pixels) < 1:
            raise ValueError("image limits must be positive")

    @property
    def source_policy(self) -> ImageSourcePolicy:
        return ImageSourcePolicy(
            max_images=self.max_images,
            max_bytes=self.max_bytes,
            allow_local_files=self.allow_local_files,
            local_root=self.local_root,
        )


def split_messages(
    messages: Any, limits: ImageLimits
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """Validate ``messages``; return them with image parts as ``{"type": "image"}`` and the images.

    Images come back RGB, EXIF-transposed, in prompt order.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    out, images = [], []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be an object with role in {ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            out.append({"role": message["role"], "content": content})
            continue
        if not isinstance(content, list):
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        parts = [_part(p, f"messages[{i}].content[{j}]", images) for j, p in enumerate(content)]
        out.append({"role": message["role"], "content": parts})
        if len(images) > limits.max_images:
            raise ValueError(f"too many images: more than {limits.max_images} in one prompt")
    return out, [_load(src, limits) for src in images]


def _part(part: Any, where: str, images: list[Any]) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        ref = part.get("image_url")
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ValueError(f"{where}.image_url.url must be a string")
        images.append(url)
        return {"type": "image"}
    if kind == "image":
        if not isinstance(part.get("image"), (str, bytes, Image.Image)):
            raise ValueError(f"{where}.image must be a PIL image, encoded bytes or a URL string")
        images.append(part["image"])
        return {"type": "image"}
    raise ValueError(f"{where}.type must be 'text', 'image_url' or 'image', got {kind!r}")


def _load(source: str | bytes | Image.Image, limits: ImageLimits) -> Image.Image:
    if isinstance(source, Image.Image):
        return _finish(source, limits)
    if isinstance(source, bytes):
        if len(source) > limits.max_bytes:
            raise ValueError(f"image larger than {limits.max_bytes} bytes")
        return _decode(source, limits)
    return _decode(source_bytes(source, limits.source_policy), limits)


def _decode(data: bytes, limits: ImageLimits) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_pixels:
                raise ValueError(f"image has more than {limits.max_pixels} pixels")
            image.load()
    except ValueError:
        raise
    except (OSError, SyntaxError, Image.DecompressionBombError, Warning) as exc:
        raise ValueError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
    return _finish(image, limits)


def _finish(image: Image.Image, limits: ImageLimits) -> Image.Image:
    if image.width < 1 or image.height < 1 or image.width * image.height > limits.max_pixels:
        raise ValueError(f"image size {image.width}x{image.height} is out of bounds")
    if max(image.size) / min(image.size) > 200:
        raise ValueError(f"image aspect ratio {image.width}x{image.height} exceeds 200:1")
    return ImageOps.exif_transpose(image).convert("RGB")
