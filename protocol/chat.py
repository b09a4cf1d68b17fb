"""OpenAI-style chat messages <-> validated ``ChatTurn`` parts plus image and video bytes,
decoding no pixel.

The language server (the front door) turns the client's messages into ``ChatTurn`` parts plus
the raw bytes of each image (from a ``data:`` URL, or a local file when the policy names a
directory) and each video (``VideoSource``: a container, or the frames a client sampled itself);
its prompt builder turns them back into messages for the chat template, and each
image's bytes go to an encoder as one job. Remote URLs are never fetched. Every rejection is a
``ValueError`` whose message names the field and says what was wrong, fit for an HTTP 400.

Local paths are untrusted input too: they are read only under ``ImageSourcePolicy.local_root``
(after resolving symlinks and ``..``), and every refused path gets the same message, so an
answer never tells whether a file exists.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from protocol.messages import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES,
    MAX_TEXT,
    MAX_VIDEO_FRAMES,
    ChatTurn,
    ContentPart,
)

ROLES = ("system", "user", "assistant")
MAX_PARTS = 256  # content parts of one message (ChatTurn.parts)
MAX_PATH_CHARS = 4096  # PATH_MAX on Linux
MAX_FPS = 240.0  # frames a second a client may ask a video to be sampled at


@dataclass(frozen=True)
class VideoSource:
    """One video of a request as the client sent it: a container's bytes (``data``), or the
    frames it sampled itself (``frames``, each an encoded image, at ``fps`` frames a second),
    with its sampling options (None: the checkpoint's video processor decides)."""

    data: bytes = b""
    frames: tuple[bytes, ...] = ()
    fps: float | None = None
    max_frames: int | None = None


@dataclass(frozen=True)
class ImageSourcePolicy:
    """Where image bytes may come from and how many.

    Local paths are read only when ``local_root`` is set (and ``allow_local_files`` is left on),
    and only inside that directory; relative paths are relative to it.
    """

    max_images: int = 16
    max_bytes: int = 32 << 20
    local_root: Path | None = None
    allow_local_files: bool = True  # False refuses every path even with a root

    def __post_init__(self) -> None:
        if not 1 <= self.max_images <= MAX_IMAGES or not 1 <= self.max_bytes <= MAX_IMAGE_BYTES:
            raise ValueError(f"max_images must be 1..{MAX_IMAGES}, max_bytes 1..{MAX_IMAGE_BYTES}")
        if self.local_root is not None:
            root = Path(self.local_root).resolve()
            if not root.is_dir():
                raise ValueError(f"the allowed local media path {root} is not a directory")
            object.__setattr__(self, "local_root", root)

    @property
    def reads_files(self) -> bool:
        return self.local_root is not None and self.allow_local_files


def refused_path_message(where: str, policy: ImageSourcePolicy, media: str = "image") -> str:
    """The one answer for every refused path of an ``media`` part (image or video): it does
    not depend on the path."""
    return (
        f"{where}: {media} path refused. This server reads local media only when started with "
        f"--allowed-local-media-path, and only readable files of at most {policy.max_bytes} "
        f"bytes inside that directory; send the {media} as a data:{media}/<type>;base64,"
        "<payload> URL"
    )


def data_url_bytes(url: str, max_bytes: int, where: str = "image", media: str = "image") -> bytes:
    """The payload of ``data:<media>/<type>;base64,<payload>`` (``media``: image or video)."""
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith(f"data:{media}/") or not header.endswith(";base64"):
        raise ValueError(f"{where}: a data URL must look like data:{media}/<type>;base64,<payload>")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise ValueError(f"{where}: {media} data larger than {max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"{where}: {media} data URL is not valid base64: {exc}") from None
    if not 1 <= len(data) <= max_bytes:
        raise ValueError(f"{where}: {media} data must be 1..{max_bytes} bytes, got {len(data)}")
    return data


def file_bytes(
    path_str: str, policy: ImageSourcePolicy, where: str = "image", media: str = "image"
) -> bytes:
    """The bytes of a local image file inside the policy's root, within its size limit.

    ``path_str`` is a path (relative ones are relative to the root) or a ``file://`` URL. Any
    refusal (paths off, outside the root, missing, not a regular file, unreadable, too big,
    too long a name) raises the same ``ValueError``.
    """
    data = None
    if policy.reads_files:
        assert policy.local_root is not None
        try:
            data = _read_confined(policy.local_root, _as_path(path_str), policy.max_bytes)
        except (OSError, ValueError, RuntimeError):  # RuntimeError: a symlink loop (3.11)
            data = None
    if data is None:
        raise ValueError(refused_path_message(where, policy, media))
    return data


def _as_path(ref: str) -> str:
    if not ref.startswith("file://"):
        return ref
    url = urlsplit(ref)
    if url.netloc not in ("", "localhost"):
        raise ValueError("a file URL on another host")
    return unquote(url.path, errors="strict")


def _read_confined(root: Path, raw: str, max_bytes: int) -> bytes | None:
    """``root / raw`` if it resolves inside ``root`` to a regular file of 1..max_bytes bytes."""
    if not raw or len(raw) > MAX_PATH_CHARS:
        return None
    path = (root / raw).resolve(strict=True)  # symlinks and ".." resolved
    if not path.is_relative_to(root):
        return None
    # O_NOFOLLOW: the last component cannot have become a symlink since; O_NONBLOCK: a FIFO
    # does not block the open (it is refused below as not a regular file).
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
            return None
        data = f.read(max_bytes + 1)
    return data if 1 <= len(data) <= max_bytes else None


def source_bytes(url: str, policy: ImageSourcePolicy, where: str = "image",
                 media: str = "image", max_bytes: int = 0) -> bytes:  # fmt: skip
    """Bytes behind an image (video) URL: ``data:`` URLs, and local paths when the policy
    allows; at most ``max_bytes`` (0: the policy's)."""
    limit = max_bytes or policy.max_bytes
    if url.startswith("data:"):
        return data_url_bytes(url, limit, where, media)
    if "://" in url and not url.startswith("file://"):
        scheme = ascii(url.split("://", 1)[0][:16])
        raise ValueError(f"{where}: {media} URL scheme {scheme} is not accepted (use data:)")
    if limit < policy.max_bytes:
        policy = replace(policy, max_bytes=limit)
    return file_bytes(url, policy, where, media)


def check_text(value: str, where: str) -> str:
    """``value`` if it is valid Unicode (no lone surrogate such as a JSON ``"\\ud800"``)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"{where} is not valid Unicode: it holds a lone surrogate at character {exc.start}"
        ) from None
    return value


def to_turns(
    messages: Any, policy: ImageSourcePolicy
) -> tuple[list[ChatTurn], list[bytes | VideoSource]]:
    """Validate OpenAI chat ``messages``; return their turns and their visual items in order
    (an image's bytes, or a ``VideoSource``)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    turns: list[ChatTurn] = []
    images: list[bytes | VideoSource] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ValueError(f"{where} must be an object with a role and a content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ValueError(f"{where}.role must be one of {ROLES}")
        parts = _parts(message.get("content"), where, images, policy)
        turns.append(ChatTurn(role=role, parts=parts))  # type: ignore[arg-type]  # checked above
    return turns, images


def _parts(
    content: Any, where: str, images: list[bytes | VideoSource], policy: ImageSourcePolicy
) -> list[ContentPart]:
    if isinstance(content, str):
        return [ContentPart(kind="text", text=_text(content, f"{where}.content"))]
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of parts")
    if len(content) > MAX_PARTS:
        raise ValueError(f"{where}.content has {len(content)} parts, at most {MAX_PARTS}")
    return [_part(p, f"{where}.content[{j}]", images, policy) for j, p in enumerate(content)]


def _text(value: str, where: str) -> str:
    if len(value) > MAX_TEXT:
        raise ValueError(f"{where} has {len(value)} characters, at most {MAX_TEXT}")
    return check_text(value, where)


def _part(
    part: Any, where: str, images: list[bytes | VideoSource], policy: ImageSourcePolicy
) -> ContentPart:
    if not isinstance(part, dict):
        raise ValueError(f"{where} must be an object")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.text must be a string")
        return ContentPart(kind="text", text=_text(part["text"], f"{where}.text"))
    if kind not in ("image_url", "image", "video_url", "video"):
        shown = ascii(kind)[:40]
        raise ValueError(f"{where}.type must be 'text', 'image_url', 'image', 'video_url' or "
                         f"'video', got {shown}")  # fmt: skip
    if len(images) >= policy.max_images:
        raise ValueError(f"too many images and videos: more than {policy.max_images} in one "
                         "request")  # fmt: skip
    if kind in ("image_url", "image"):
        images.append(source_bytes(_url(part.get(kind), f"{where}.{kind}"), policy,
                                   f"{where}.{kind}"))  # fmt: skip
        return ContentPart(kind="image", image=len(images) - 1)
    images.append(_video(part, kind, f"{where}.{kind}", policy))
    return ContentPart(kind="video", image=len(images) - 1)


def _url(ref: Any, where: str) -> str:
    url = ref.get("url") if isinstance(ref, dict) else ref
    if not isinstance(url, str):
        raise ValueError(f"{where} must carry a URL string")
    return url


def _video(part: dict[str, Any], kind: str, where: str, policy: ImageSourcePolicy) -> VideoSource:
    """``video_url`` (a container: ``data:video/...`` URL or local path), or ``video`` with
    either such a URL or the list of frames a client sampled (image URLs). Sampling options
    ``fps`` and ``max_frames`` may sit beside the URL (``{"url": ..., "fps": 1}``)."""
    ref = part.get(kind)
    options = ref if isinstance(ref, dict) else part
    fps = sampling_fps(options.get("fps"), f"{where}.fps")
    max_frames = sampling_max_frames(options.get("max_frames"), f"{where}.max_frames")
    if kind == "video" and isinstance(ref, list):
        if not 1 <= len(ref) <= MAX_VIDEO_FRAMES:
            raise ValueError(f"{where} must list 1..{MAX_VIDEO_FRAMES} frames, got {len(ref)}")
        frames, left = [], policy.max_bytes
        for j, frame in enumerate(ref):
            if not isinstance(frame, str):
                raise ValueError(f"{where}[{j}] must be an image URL string")
            if left < 1:
                raise ValueError(f"{where}: the frames are larger than {policy.max_bytes} bytes "
                                 "in all")  # fmt: skip
            try:
                frames.append(source_bytes(frame, policy, f"{where}[{j}]", max_bytes=left))
            except ValueError as exc:
                if left < policy.max_bytes and "larger than" in str(exc):
                    raise ValueError(f"{where}: the frames are larger than {policy.max_bytes} "
                                     "bytes in all") from None  # fmt: skip
                raise
            left -= len(frames[-1])
        return VideoSource(frames=tuple(frames), fps=fps, max_frames=max_frames)
    data = source_bytes(_url(ref, where), policy, where, media="video")
    return VideoSource(data=data, fps=fps, max_frames=max_frames)


def sampling_fps(value: Any, where: str) -> float | None:
    """A client's frames-a-second for sampling a video: None, or a number in (0, MAX_FPS]."""
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not 0 < value <= MAX_FPS or value != value:
        raise ValueError(f"{where} must be a number in (0, {MAX_FPS:g}], got {ascii(value)[:40]}")
    return float(value)


def sampling_max_frames(value: Any, where: str) -> int | None:
    """A client's cap on a video's sampled frames: None, or an integer in 2..MAX_VIDEO_FRAMES."""
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or not 2 <= value <= MAX_VIDEO_FRAMES:
        raise ValueError(f"{where} must be an integer in 2..{MAX_VIDEO_FRAMES}, got "
                         f"{ascii(value)[:40]}")  # fmt: skip
    return value


def to_messages(turns: list[ChatTurn], images: list[Any]) -> list[dict[str, Any]]:
    """Turns back into OpenAI-style messages, visual parts as ``{"type": "image", "image": x}``
    (``"video"`` for a video) with ``x = images[part.image]`` (bytes, or whatever the caller
    decoded them into)."""
    return [
        {
            "role": turn.role,
            "content": [
                {"type": "text", "text": p.text}
                if p.kind == "text"
                else {"type": p.kind, p.kind: images[p.image]}
                for p in turn.parts
            ],
        }
        for turn in turns
    ]
