"""Configuration of the language server process; command-line flags map onto it one to one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from protocol.chat import ImageSourcePolicy
from protocol.messages import MAX_IMAGE_BYTES, MAX_IMAGES
from transfer import BACKENDS, DTYPES
from transfer.registry import advertised_host, endpoint_options

DEFAULT_MAX_BODY_BYTES = 64 << 20  # the automatic HTTP body limit never exceeds this
ENCODER_IMAGE_BYTES = 32 << 20  # what an encoder accepts per image (encode_server ImageLimits);
# below MAX_IMAGE_BYTES, so one image always fits one EncodeJob


@dataclass(frozen=True, slots=True)
class LanguageConfig:
    model: Path
    encoders: tuple[str, ...] = ()  # tcp://host:port of each encode server
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: tuple[str, ...] = ()  # names the API answers to; the first is reported
    # (default: the checkpoint directory's name)
    engine: str = "transformers"  # a name in language_server.engines.ENGINES
    sglang_args: str = ""  # JSON object of extra sglang ServerArgs, e.g. {"tp_size": 8}
    transport: str = "mooncake"
    mooncake_protocol: str = "tcp"
    mooncake_device: str = ""
    advertise_host: str = ""  # address encoders reach this host at (default: host or hostname)
    device: str = "cpu"
    dtype: str = "float32"
    num_blocks: int = 256
    block_tokens: int = 64
    max_waiting_allocs: int = 64  # requests queued for blocks when the pool is full
    image_cache: bool = True  # rows of recent images stay resident in the pool (issue 18)
    image_cache_blocks: int = -1  # most blocks resident images may hold (-1: the pool, 0: off)
    alloc_wait_s: float = 10.0  # how long a request may wait for blocks before 503
    dead_writer_s: float = -1.0  # blocks lent to an encoder declared dead come back this long
    # after (-1: the transport's own write timeout; transfer/base.py, rule 2c)
    max_inflight: int = 256  # HTTP requests in flight before 503
    request_timeout_s: float = 60.0  # a request's first EncodeJob -> its last TransferDone
    heartbeat_s: float = 1.0
    encoder_dead_after_s: float = 5.0
    max_new_tokens_limit: int = 4096
    max_prompt_tokens: int = 32768
    max_images: int = 16
    max_image_pixels: int = 64 * 1024 * 1024  # width x height of one image (from its header)
    max_image_tokens: int = 16384  # visual tokens of one image
    max_image_bytes: int = 32 << 20  # one encoded image or video (data: URL payload or file)
    max_video_frames: int = 65536  # frames in one video's container
    max_video_seconds: float = 4 * 3600.0  # one video's duration (its frames / its rate)
    max_body_bytes: int = 0  # HTTP body; 0: room for max_images images in base64, <= 64 MiB
    allowed_local_media_path: Path | None = None  # local image paths are read only under it
    curve_keys: Path | None = None  # this server's secret certificate (CURVE on when set)
    curve_server_key: Path | None = None  # the encoders' public certificate
    torch_threads: int = 0  # 0: torch's default
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not (self.model / "config.json").is_file():
            raise ValueError(f"--model {self.model} is not a checkpoint directory (no config.json)")
        for addr in self.encoders:
            if not addr.startswith(("tcp://", "ipc://")):
                raise ValueError(f"--encoder {addr!r} must look like tcp://HOST:PORT")
        if self.transport not in BACKENDS:
            raise ValueError(f"--transport must be one of {sorted(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
        if self.image_cache_blocks < -1:
            raise ValueError("--image-cache-blocks must be >= 0, or -1 for the whole pool")
        if self.max_video_frames < 1 or not self.max_video_seconds > 0:
            raise ValueError("--max-video-frames and --max-video-seconds must be > 0")
        if min(self.num_blocks, self.block_tokens, self.max_images) < 1:
            raise ValueError("--num-blocks, --block-tokens and --max-images must be >= 1")
        if self.max_images > MAX_IMAGES:
            raise ValueError(f"--max-images must be <= {MAX_IMAGES} (the protocol's limit)")
        if not 1 <= self.max_image_bytes <= min(ENCODER_IMAGE_BYTES, MAX_IMAGE_BYTES):
            raise ValueError(f"--max-image-bytes must be 1..{ENCODER_IMAGE_BYTES} (what an "
                             "encoder accepts for one image)")  # fmt: skip
        if self.max_body_bytes != 0 and self.max_body_bytes < 1024:
            raise ValueError("--max-body-bytes must be >= 1024 (or 0: automatic)")
        if not all(self.served_model_name):
            raise ValueError("--served-model-name: names must not be empty")
        root = self.allowed_local_media_path
        if root is not None and not root.resolve().is_dir():
            raise ValueError(f"--allowed-local-media-path {root} is not a directory")
        if self.max_waiting_allocs < 0:
            raise ValueError("--max-waiting-allocs must be >= 0")
        if self.max_inflight < 1 or self.alloc_wait_s < 0:
            raise ValueError("--max-inflight must be >= 1; --alloc-wait >= 0")
        if self.dead_writer_s < 0 and self.dead_writer_s != -1:
            raise ValueError("--dead-writer-wait must be >= 0 (or -1: the transport's timeout)")
        if min(self.request_timeout_s, self.heartbeat_s, self.encoder_dead_after_s) <= 0:
            raise ValueError("timeouts must be > 0")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name a request's ``model`` may use; the first is the one reported."""
        return self.served_model_name or (self.model.resolve().name,)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def body_limit(self) -> int:
        """Bytes of one HTTP request body: ``max_images`` images of ``max_image_bytes`` as
        base64 plus 1 MiB of text, at most 64 MiB, unless ``--max-body-bytes`` says otherwise.
        Each image still goes to an encoder on its own (``max_image_bytes`` fits one job)."""
        if self.max_body_bytes:
            return self.max_body_bytes
        images = self.max_images * (4 * -(-self.max_image_bytes // 3))
        return min(DEFAULT_MAX_BODY_BYTES, images + (1 << 20))

    def image_policy(self) -> ImageSourcePolicy:
        return ImageSourcePolicy(max_images=self.max_images, max_bytes=self.max_image_bytes,
                                 local_root=self.allowed_local_media_path)  # fmt: skip

    @property
    def dead_writer_wait_s(self) -> float:
        from transfer.registry import write_timeout_s

        return write_timeout_s(self.transport) if self.dead_writer_s < 0 else self.dead_writer_s

    @property
    def public_host(self) -> str:
        return advertised_host(self.host, self.advertise_host)

    def receiver_options(self) -> dict[str, object]:
        return endpoint_options(
            self.transport, self.public_host, self.mooncake_protocol, self.mooncake_device
        )
