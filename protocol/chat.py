"""OpenAI-style chat messages <-> validated ``ChatTurn`` parts plus image bytes, decoding no image.

The language server (the front door) turns the client's messages into ``ChatTurn`` parts plus
the raw bytes of each image (from a ``data:`` URL or a local file); its prompt builder turns
them back into messages for the chat template, and each image's bytes go to an encoder as one
job. Remote URLs are never fetched. Every rejection is a
``ValueError`` whose message says what was wrong, fit for an HTTP 400.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from protocol.messages import MAX_IMAGE_BYTES, MAX_IMAGES, ChatTurn, ContentPart

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Where image bytes may come from and how many: ``local_root`` confines file paths."""

    max_images: int = 16
    max_bytes: int = 32 << 20
    allow_local_files: bool = True
    local_root: Path | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.max_images <= MAX_IMAGES or not 1 <= self.max_bytes <= MAX_IMAGE_BYTES:
            raise ValueError(f"max_images must be 1..{MAX_IMAGES}, max_bytes 1..{MAX_IMAGE_BYTES}")


def data_url_bytes(url: str, max_bytes: int) -> bytes:
    """The payload of ``data:image/<type>;base64,<payload>``."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError("data URL must look like data:image/<type>;base64,<payload>")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ValueError(f"image data larger than {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"image data URL is not valid base64: {exc}") from None


def file_bytes(path_str: str, policy: ImageSourcePolicy) -> bytes:
    """The bytes of a local image file, within the policy's root and size limit."""
    if not policy.allow_local_files:
        raise ValueError("local image paths are not accepted by this server")
    path = Path(path_str.removeprefix("file://")).expanduser().resolve()
    if policy.local_root is not None and not path.is_relative_to(policy.local_root.resolve()):
        raise ValueError(f"image path {path_str!r} is outside the allowed directory")
    if not path.is_file():
        raise ValueError(f"image path {path_str!r} is not a readable file")
    if path.stat().st_size > policy.max_bytes:
        raise ValueError(f"image file larger than {policy.max_bytes} bytes")
    return path.read_bytes()


def source_bytes(url: str, policy: ImageSourcePolicy) -> bytes:
    """Bytes behind an image URL: ``data:`` URLs and local paths only."""
    if url.startswith("data:"):
        return data_url_bytes(url, policy.max_bytes)
    if "://" in url and not url.startswith("file://"):
        scheme = url.split("://", 1)[0][:16]
        raise ValueError(f"image URL scheme {scheme!r} is not accepted (use data: or a file path)")
    return file_bytes(url, policy)


def to_turns(messages: Any, policy: ImageSourcePolicy) -> tuple[list[ChatTurn], list[bytes]]:
    """Validate OpenAI chat ``messages``; return their turns and the images' bytes, in order."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    turns: list[ChatTurn] = []
    images: list[bytes] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ValueError(f"messages[{i}] must be an object with role in {ROLES}")
        content = message.get("content")
        if isinstance(content, str):
            parts = [ContentPart(kind="text", text=content)]
        elif isinstance(content, list):
            parts = [
                _part(p, f"messages[{i}].content[{j}]", images, policy)
                for j, p in enumerate(content)
            ]
        else:
            raise ValueError(f"messages[{i}].content must be a string or a list of parts")
        turns.append(ChatTurn(role=message["role"], parts=parts))
    return turns, images


def _part(part: Any, where: str, images: list[bytes], policy: ImageSourcePolicy) -> ContentPart:
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        return ContentPart(kind="text", text=part["text"])
    if kind in ("image_url", "image"):
        ref = part.get(kind)
        url = ref.get("url") if isinstance(ref, dict) else ref
        if not isinstance(url, str):
            raise ValueError(f"{where}.{kind} must carry a URL string")
        if len(images) >= policy.max_images:
            raise ValueError(f"too many images: more than {policy.max_images} in one request")
        images.append(source_bytes(url, policy))
        return ContentPart(kind="image", image=len(images) - 1)
    raise ValueError(f"{where}.type must be 'text', 'image_url' or 'image', got {kind!r}")


def to_messages(turns: list[ChatTurn], images: list[Any]) -> list[dict[str, Any]]:
    """Turns back into OpenAI-style messages, image parts as ``{"type": "image", "image": x}``
    with ``x = images[part.image]`` (bytes, or whatever the caller decoded them into)."""
    return [
        {
            "role": turn.role,
            "content": [
                {"type": "text", "text": p.text}
                if p.kind == "text"
                else {"type": "image", "image": images[p.image]}
                for p in turn.parts
            ],
        }
        for turn in turns
    ]
