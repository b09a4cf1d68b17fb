"""Control-plane messages: one frozen, typed struct per step of the request flow.

Every message carries a ``type`` tag (its class's wire name) and a ``version``. Messages carry
descriptors only (ids, shapes, dtypes, addresses); tensors travel on the data plane. Field
constraints are declared on the types and checked while decoding (see ``protocol.codec``);
cross-field rules live in ``__post_init__`` so that decoding and construction agree.

Request flow (DESIGN.md)::

    language -> encode    EncodeRequest, Abort
    encode   -> language  AllocRequest, TransferDone, EncodeFailed, EncoderHello, Heartbeat
    language -> encode    AllocGrant, AllocDenied
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

PROTOCOL_VERSION = 1

MAX_SEQ_TOKENS = 1 << 20  # prompt tokens in one request
MAX_IMAGES = 64  # images in one request
MAX_IMAGE_BYTES = 64 << 20  # one encoded image (PNG/JPEG/...)
MAX_TEXT = 1 << 22  # characters in one text part
MAX_BLOCKS = 1 << 20  # blocks in one grant
MAX_HIDDEN = 1 << 16
MAX_REASON = 4096

Rid = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Reason = Annotated[str, msgspec.Meta(max_length=MAX_REASON)]
U32 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 32) - 1)]
U64 = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # msgspec bounds fit int64
TokenId = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
Position = Annotated[int, msgspec.Meta(ge=0, lt=1 << 31)]
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


# --- language -> encode -----------------------------------------------------------------------


class ContentPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One part of a chat turn: text, or a reference to ``EncodeRequest.images[image]``."""

    kind: Literal["text", "image"]
    text: Annotated[str, msgspec.Meta(max_length=MAX_TEXT)] = ""
    image: Annotated[int, msgspec.Meta(ge=-1, lt=MAX_IMAGES)] = -1


class ChatTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    parts: Annotated[list[ContentPart], msgspec.Meta(max_length=256)]


class EncodeRequest(Message, frozen=True, kw_only=True, tag="encode"):
    """Encode one prompt: tokenize it, run the ViT on its images, ship the rows to ``reply_to``."""

    rid: Rid
    turns: Annotated[list[ChatTurn], msgspec.Meta(min_length=1, max_length=1024)]
    images: Annotated[
        list[Annotated[bytes, msgspec.Meta(max_length=MAX_IMAGE_BYTES)]],
        msgspec.Meta(max_length=MAX_IMAGES),
    ] = []
    add_generation_prompt: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        used = [p.image for t in self.turns for p in t.parts if p.kind == "image"]
        _check(
            sorted(used) == list(range(len(self.images))), "image parts must use each image once"
        )


class Abort(Message, frozen=True, kw_only=True, tag="abort"):
    """The language side gave up on ``rid``: drop its work and any source buffers."""

    rid: Rid
    reason: Reason = ""


class AllocGrant(Message, frozen=True, kw_only=True, tag="grant"):
    """Blocks granted for ``rid``; valid only for this ``generation`` (a per-grant nonce).

    ``embed_addrs[i]`` / ``deepstack_addrs[i]`` are the remote addresses of block ``blocks[i]`` in
    the embedding and deepstack regions; rows ``i*block_tokens ...`` of the request land there.
    """

    rid: Rid
    generation: U64
    session: Name
    block_tokens: Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]
    n_tokens: Tokens
    hidden: Hidden
    dtype: DType
    blocks: Annotated[list[U32], msgspec.Meta(max_length=MAX_BLOCKS)]
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
        _check(n == need, f"{n} blocks granted for {self.n_tokens} tokens, need {need}")


class AllocDenied(Message, frozen=True, kw_only=True, tag="denied"):
    """No blocks for ``rid``. ``code`` says whether retrying can help."""

    rid: Rid
    code: Literal["too_large", "pool_full", "bad_request", "unknown_request"] = "bad_request"
    reason: Reason = ""
    retry_after_s: Seconds = 0.0


# --- encode -> language -----------------------------------------------------------------------


class AllocRequest(Message, frozen=True, kw_only=True, tag="alloc"):
    """The encoder tokenized ``rid`` and needs room for ``n_tokens`` visual rows.

    ``positions`` are the M-RoPE position ids ``[3][len(input_ids)]``.
    """

    rid: Rid
    encoder_id: Name
    n_tokens: Tokens
    hidden: Hidden
    dtype: DType
    input_ids: Annotated[list[TokenId], msgspec.Meta(max_length=MAX_SEQ_TOKENS)]
    positions: Annotated[
        list[Annotated[list[Position], msgspec.Meta(max_length=MAX_SEQ_TOKENS)]],
        msgspec.Meta(min_length=3, max_length=3),
    ]
    # [t, h, w] patch grid of each image, in prompt order (engines such as SGLang need it)
    image_grid_thw: Annotated[
        list[Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]],
                       msgspec.Meta(min_length=3, max_length=3)]],
        msgspec.Meta(max_length=MAX_IMAGES),
    ] = []  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        seq = len(self.input_ids)
        _check(seq >= 1, "empty prompt")
        _check(all(len(p) == seq for p in self.positions), "positions must be [3][len(input_ids)]")
        _check(self.n_tokens <= seq, "more visual tokens than prompt tokens")


class EncodeTimings(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where the encoder spent a request's time (seconds), for TTFT breakdowns."""

    queue_s: Seconds = 0.0  # EncodeRequest received -> preprocessing starts
    preprocess_s: Seconds = 0.0
    vision_s: Seconds = 0.0  # the ViT forward of the batch this request was in
    grant_wait_s: Seconds = 0.0  # ViT done -> grant in hand (0 when the grant came first)
    transfer_s: Seconds = 0.0  # submit -> transport reports DONE


class TransferDone(Message, frozen=True, kw_only=True, tag="done"):
    """All ``n_tokens`` rows of ``rid`` are in the granted blocks of ``generation``."""

    rid: Rid
    generation: U64
    n_tokens: Tokens
    checksum: U64
    timings: EncodeTimings = EncodeTimings()


class EncodeFailed(Message, frozen=True, kw_only=True, tag="failed"):
    """The encoder could not finish ``rid`` (bad input, ViT error, transfer error)."""

    rid: Rid
    generation: U64 = 0
    stage: Literal["preprocess", "vision", "alloc", "transfer", "aborted", "overloaded"] = (
        "preprocess"
    )
    reason: Reason = ""


class EncoderHello(Message, frozen=True, kw_only=True, tag="hello"):
    """An encoder (re)joined: its id, transport backend and data-plane session."""

    encoder_id: Name
    transport: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    session: Name


class Heartbeat(Message, frozen=True, kw_only=True, tag="heartbeat"):
    encoder_id: Name
    inflight: U32 = 0
    sent_at: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0


ANY_MESSAGE = (
    EncodeRequest
    | Abort
    | AllocGrant
    | AllocDenied
    | AllocRequest
    | TransferDone
    | EncodeFailed
    | EncoderHello
    | Heartbeat
)
ALL_MESSAGES: tuple[type[Message], ...] = ANY_MESSAGE.__args__  # type: ignore[attr-defined]
