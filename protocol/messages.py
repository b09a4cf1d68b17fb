"""Control-plane messages: one frozen, typed struct per step of the request flow.

Every message carries a ``type`` tag (its class's wire name) and a ``version``. Messages carry
descriptors only (ids, shapes, dtypes, addresses) and, in ``EncodeJob``, the encoded image;
tensors travel on the data plane. Field constraints are declared on the types and checked while
decoding (see ``protocol.codec``); cross-field rules live in ``__post_init__`` so that decoding
and construction agree.

Request flow v3 (DESIGN.md): the language side prepares the prompt, takes blocks from its pool
and sends one ``EncodeJob`` per image, carrying the blocks' remote addresses; no round trip
precedes the write::

    language -> encode    EncodeJob, Abort, Heartbeat
    encode   -> language  TransferDone, EncodeFailed, EncoderHello, Heartbeat

Blocks are lent to the job's writer. They come back when its ``TransferDone`` was verified and
the rows consumed, when an ``EncodeFailed`` says ``write_stopped``, or when the writer can no
longer write (its ``incarnation`` changed, or it was declared dead and the transport's own
timeout has passed since).
"""

from __future__ import annotations

import itertools
from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 4  # 4: an EncodeJob may carry a video (frames); 3: one job per image with blocks

MAX_SEQ_TOKENS = 1 << 20  # prompt tokens in one request
MAX_IMAGES = 64  # images in one request
MAX_IMAGE_BYTES = 64 << 20  # one encoded image (PNG/JPEG/...), or one video with all its frames
MAX_VIDEO_FRAMES = 4096  # frames sampled from one video
MAX_TEXT = 1 << 22  # characters in one text part
MAX_BLOCKS = 1 << 20  # blocks in one grant
MAX_HIDDEN = 1 << 16
MAX_REASON = 4096

Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
U64 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # msgspec bounds fit int64
Tokens = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ_TOKENS)]
Hidden = Annotated[int, msgspec.Meta(ge=1, le=MAX_HIDDEN)]
DType = Literal["float32", "bfloat16", "float16"]
Seconds = Annotated[float, msgspec.Meta(ge=0.0, le=86400.0)]


class Message(
    msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, tag_field="type"
):
    """Base of every message. ``version`` is checked on decode."""

    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if self.version != PROTOCOL_VERSION:
            raise ValueError(
                f"unsupported protocol version {self.version} (this side speaks {PROTOCOL_VERSION})"
            )


def _check(cond: bool, reason: str) -> None:
    if not cond:
        raise ValueError(reason)


# --- a chat prompt, as the front door validated it (language side only) ---------------------


class ContentPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One part of a chat turn: text, or a reference to the request's visual item ``image``
    (its images and videos share one list, in prompt order: ``kind`` says which it is)."""

    kind: Literal["text", "image", "video"]
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT)] = ""
    image: Annotated[int, msgspec.Meta(ge=-1, lt=MAX_IMAGES)] = -1


class ChatTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    parts: Annotated[list[ContentPart], msgspec.Meta(max_length=256)]


# --- language -> encode -----------------------------------------------------------------------

ImageIndex = Annotated[int, msgspec.Meta(ge=0, lt=MAX_IMAGES)]
Grid = Annotated[
    list[Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]], msgspec.Meta(min_length=3, max_length=3)
]


class EncodeJob(Message, frozen=True, kw_only=True, tag="job"):
    """Encode visual item ``image`` of request ``rid`` and write its rows into the lent blocks.

    An image: ``data`` is its encoded bytes. A video (``is_video``): either ``data`` is its
    container and ``frames`` the container frame indices to sample (increasing, in decode
    order), or ``frame_data`` holds the frames the client sampled, each an encoded image
    (``data`` then empty). The language side read the size from the header (container
    metadata for a video) and computed ``grid`` ([t, h, w] patches) and ``n_tokens`` (visual
    rows) with the image (video) processor's own resize rule; the encoder refuses the job when
    its preprocessing disagrees. Row ``r`` of the image lands in
    block ``blocks[r // block_tokens]``, at ``embed_addrs[i]`` / ``deepstack_addrs[i]`` of
    ``session``. ``generation`` is a fresh random nonce per lending: the done message must
    carry it back, so a late message can never claim blocks lent again since.
    """

    rid: Rid
    image: ImageIndex = 0
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_IMAGE_BYTES)]
    frames: Annotated[list[U32], msgspec.Meta(max_length=MAX_VIDEO_FRAMES)] = []
    frame_data: Annotated[
        list[Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_IMAGE_BYTES)]],
        msgspec.Meta(max_length=MAX_VIDEO_FRAMES),
    ] = []
    grid: Grid
    n_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_SEQ_TOKENS)]
    hidden: Hidden
    dtype: DType
    generation: U64
    session: Name
    block_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    blocks: Annotated[list[U32], msgspec.Meta(min_length=1, max_length=MAX_BLOCKS)]
    embed_addrs: Annotated[list[U64], msgspec.Meta(max_length=MAX_BLOCKS)]
    deepstack_addrs: Annotated[list[U64], msgspec.Meta(max_length=MAX_BLOCKS)]

    def __post_init__(self) -> None:
        super().__post_init__()
        n = len(self.blocks)
        _check(
            len(self.embed_addrs) == n and len(self.deepstack_addrs) == n, "one address per block"
        )
        _check(len(set(self.blocks)) == n, "duplicate block ids")
        need = -(-self.n_tokens // self.block_tokens)
        _check(n == need, f"{n} blocks lent for {self.n_tokens} tokens, need {need}")
        t, h, w = self.grid
        _check(t * h * w >= self.n_tokens, "grid holds fewer patches than visual tokens")
        _check(bool(self.data) != bool(self.frame_data), "exactly one of data and frame_data")
        _check(not (self.frames and self.frame_data), "frames index a container, not frame_data")
        _check(all(a < b for a, b in itertools.pairwise(self.frames)),
               "frame indices must increase")  # fmt: skip
        _check(sum(map(len, self.frame_data)) <= MAX_IMAGE_BYTES,
               f"frames larger than {MAX_IMAGE_BYTES} bytes in all")  # fmt: skip

    @property
    def is_video(self) -> bool:
        return bool(self.frames or self.frame_data)


class Abort(Message, frozen=True, kw_only=True, tag="abort"):
    """The language side gave up on ``rid`` (every image, or just ``image`` when >= 0).

    The encoder drops the job's work and answers ``EncodeFailed(stage="aborted")`` once its
    write into the lent blocks has stopped (at once when none was running, or for a job it
    does not know).
    """

    rid: Rid
    image: Annotated[int, msgspec.Meta(ge=-1, lt=MAX_IMAGES)] = -1
    reason: Reason = ""


# --- encode -> language -----------------------------------------------------------------------


class EncodeTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the encoder spent one job's time (seconds), for TTFT breakdowns."""

    queue_s: Seconds = 0.0  # EncodeJob read off the socket -> preprocessing starts
    preprocess_s: Seconds = 0.0  # image (video) decode, resize, patches
    decode_s: Seconds = 0.0  # of preprocess_s: the decode alone (a video's frames)
    vision_s: Seconds = 0.0  # the ViT forward of the batch this job was in
    transfer_s: Seconds = 0.0  # submit -> transport reports DONE
    vision_cached: bool = False  # the rows came from the encoder's cache: no decode, no ViT


class TransferDone(Message, frozen=True, kw_only=True, tag="done"):
    """All ``n_tokens`` rows of image ``image`` of ``rid`` are in the blocks of ``generation``;
    the write has ended."""

    rid: Rid
    image: ImageIndex = 0
    generation: U64
    n_tokens: Tokens
    checksum: U64
    timings: EncodeTimings = EncodeTimings()


class EncodeFailed(Message, frozen=True, kw_only=True, tag="failed"):
    """The encoder could not finish a job (bad input, ViT error, transfer error, abort).

    ``write_stopped`` is the writer's promise that nothing it started will land in the job's
    blocks any more (true for every stage before the write). A failed write the transport may
    still be performing is reported with ``write_stopped=False`` first, then again with
    ``write_stopped=True`` once the transport says it ended.
    """

    rid: Rid
    image: Annotated[int, msgspec.Meta(ge=-1, lt=MAX_IMAGES)] = 0
    generation: U64 = 0
    stage: Literal["job", "preprocess", "vision", "transfer", "aborted", "overloaded"] = (
        "preprocess"
    )
    reason: Reason = ""
    write_stopped: bool = True


class EncoderHello(Message, frozen=True, kw_only=True, tag="hello"):
    """An encoder (re)joined: its id, transport backend, data-plane session and incarnation
    (a random number per process start: a new one means every older job is gone)."""

    encoder_id: Name
    transport: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    session: Name
    incarnation: U64 = 0


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    """Liveness, both ways. From an encoder: its incarnation and ``inflight`` jobs (its load,
    across every language server it serves)."""

    encoder_id: Name
    inflight: U32 = 0
    sent_at: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    incarnation: U64 = 0


ANY_MESSAGE = EncodeJob | Abort | TransferDone | EncodeFailed | EncoderHello | Heartbeat
ALL_MESSAGES: tuple[type[Message], ...] = ANY_MESSAGE.__args__  # type: ignore[attr-defined]
