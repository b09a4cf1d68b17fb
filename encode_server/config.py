"""Configuration of one encode server process; command-line flags map onto it one to one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from encode_server.videos import VideoLimits
from transfer import BACKENDS, DTYPES
from transfer.registry import advertised_host, endpoint_options


@dataclass(frozen=True, slots=True)
class EncodeConfig:
    model: Path
    host: str = "127.0.0.1"
    port: int = 7100
    encoder_id: str = ""  # default: "<hostname>:<port>"
    transport: str = "mooncake"
    mooncake_protocol: str = "tcp"  # "rdma" on GPU nodes
    mooncake_device: str = ""  # RDMA NIC names, e.g. "mlx5_0,mlx5_1"
    advertise_host: str = ""  # address peers reach this host at (default: host, or hostname)
    device: str = "cpu"
    dtype: str = "float32"
    max_batch_images: int = 16
    max_batch_tokens: int = 16384
    staging_tokens: int = 0  # rows of the registered staging arena (0: 2 x max_batch_tokens)
    max_queue: int = 256  # jobs waiting for preprocessing before new ones are refused
    transfer_timeout_s: float = 60.0
    peer_timeout_s: float = 10.0  # a language server silent this long is gone: drop its work
    curve_keys: Path | None = None  # this encoder's secret certificate (CURVE on when set)
    curve_clients: Path | None = None  # directory of authorized language-server public keys
    torch_threads: int = 0  # 0: torch's default
    image_cache: bool = True  # recent ViT outputs by image bytes (issue 18)
    image_cache_mb: int = 1024  # their bound, MiB of rows on the encoder's device
    max_video_frames: int = 65536  # frames decoded from one video to reach those it samples
    max_video_decode_s: float = 60.0  # wall time of one video's decode
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not (self.model / "config.json").is_file():
            raise ValueError(f"--model {self.model} is not a checkpoint directory (no config.json)")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range")
        if self.transport not in BACKENDS:
            raise ValueError(f"--transport must be one of {sorted(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {sorted(DTYPES)}")
        if self.staging_tokens < 0:
            raise ValueError("--staging-tokens must be >= 0")
        if self.image_cache_mb < 0:
            raise ValueError("--image-cache-mb must be >= 0")
        if min(self.max_batch_images, self.max_batch_tokens, self.max_queue) < 1:
            raise ValueError("--max-batch-images and --max-batch-tokens must be >= 1")
        if self.max_video_frames < 1 or not self.max_video_decode_s > 0:
            raise ValueError("--max-video-frames and --max-video-decode-s must be > 0")
        if min(self.transfer_timeout_s, self.peer_timeout_s) <= 0:
            raise ValueError("--transfer-timeout and --peer-timeout must be > 0")

    def video_limits(self) -> VideoLimits:
        return VideoLimits(max_frames=self.max_video_frames, max_decode_s=self.max_video_decode_s)

    @property
    def bind_address(self) -> str:
        return f"tcp://{self.host}:{self.port}"

    @property
    def public_host(self) -> str:
        return advertised_host(self.host, self.advertise_host)

    @property
    def name(self) -> str:
        return self.encoder_id or f"{self.public_host}:{self.port}"

    def sender_options(self) -> dict[str, object]:
        return endpoint_options(
            self.transport, self.public_host, self.mooncake_protocol, self.mooncake_device
        )
