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

from typing import Annotated, Any, Literal

import msgspec
import numpy as np

PROTOCOL_VERSION = 2  # 2: AllocRequest's token ids and positions are packed int32 arrays

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
# int32 arrays travel as little-endian bytes: a 16k-token prompt's ids and M-RoPE positions
# decoded as MessagePack int lists took 1.6 ms (and as long again to become tensors)
Int32s = Annotated[bytes, msgspec.Meta(max_length=4 * 3 * MAX_SEQ_TOKENS)]
_I32 = np.dtype("<i4")
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


def int32s(values: Any) -> bytes:
    """Pack integers (a sequence, nested sequences or an array) as little-endian int32 bytes."""
    arr = np.asarray(values)
    if arr.size and (arr.min() < 0 or arr.max() >= 1 << 31):
        raise ValueError("values must lie in [0, 2**31)")
    return np.ascontiguousarray(arr, dtype=_I32).tobytes()


class AllocRequest(Message, frozen=True, kw_only=True, tag="alloc"):
    """The encoder tokenized ``rid`` and needs room for ``n_tokens`` visual rows.

    ``input_ids`` ``[seq]`` and the M-RoPE ``positions`` ``[3, seq]`` (row-major) are
    little-endian int32 arrays (pack with ``int32s``; read with ``token_ids`` and
    ``position_ids``), every value in ``[0, 2**31)``.
    """

    rid: Rid
    encoder_id: Name
    n_tokens: Tokens
    hidden: Hidden
    dtype: DType
    input_ids: Int32s
    positions: Int32s
    # [t, h, w] patch grid of each image, in prompt order (engines such as SGLang need it)
    image_grid_thw: Annotated[
        list[Annotated[list[Annotated[int, msgspec.Meta(ge=1, le=1 << 16)]],
                       msgspec.Meta(min_length=3, max_length=3)]],
        msgspec.Meta(max_length=MAX_IMAGES),
    ] = []  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.input_ids) % 4 == 0, "input_ids is not a whole number of int32")
        seq = len(self.input_ids) // 4
        _check(seq >= 1, "empty prompt")
        _check(seq <= MAX_SEQ_TOKENS, f"prompt longer than {MAX_SEQ_TOKENS} tokens")
        _check(len(self.positions) == 12 * seq, "positions must be [3][len(input_ids)] int32")
        _check(self.n_tokens <= seq, "more visual tokens than prompt tokens")
        _check(int(self.token_ids().min()) >= 0, "negative token id")
        _check(int(self.position_ids().min()) >= 0, "negative position")

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) // 4

    def token_ids(self) -> np.ndarray:
        """``[seq]`` int32, read-only (a view of the message)."""
        return np.frombuffer(self.input_ids, dtype=_I32)

    def position_ids(self) -> np.ndarray:
        """``[3, seq]`` int32, read-only (a view of the message)."""
        return np.frombuffer(self.positions, dtype=_I32).reshape(3, -1)


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
