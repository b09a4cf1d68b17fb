"""``epd-encode``: run one encode server (processor + ViT) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from pathlib import Path

from encode_server.config import EncodeConfig
from transfer.registry import add_transport_flags


def parse_args(argv: list[str] | None = None) -> EncodeConfig:
    d = EncodeConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="epd-encode",
        description="Encode server: decodes images, runs the Qwen3-VL-MoE image processor and "
        "vision tower, and writes embeddings + deepstack rows into the blocks each job names.",
    )
    p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default=d["host"].default, help="address to bind (default loopback)")
    p.add_argument("--port", type=int, default=d["port"].default, help="ZeroMQ port to bind")
    p.add_argument("--encoder-id", default="", help="name in logs and /health (default host:port)")
    add_transport_flags(p, peers="language servers")
    p.add_argument("--device", default="cpu", help="torch device for the ViT (cpu, cuda:0, ...)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="ViT and data-plane dtype (must match the language server's)")  # fmt: skip
    p.add_argument("--max-batch-images", type=int, default=d["max_batch_images"].default,
                   help="images in one ViT forward at most")  # fmt: skip
    p.add_argument("--max-batch-tokens", type=int, default=d["max_batch_tokens"].default,
                   help="visual tokens in one ViT forward at most")  # fmt: skip
    p.add_argument("--staging-tokens", type=int, default=d["staging_tokens"].default,
                   help="visual-token rows of the staging arena the writes read from, registered "
                   "once (default 0: twice --max-batch-tokens); a full arena holds the next ViT "
                   "batch back")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=d["max_queue"].default,
                   help="image jobs waiting for preprocessing before new ones are refused")  # fmt: skip
    p.add_argument("--transfer-timeout", type=float, default=d["transfer_timeout_s"].default,
                   help="seconds a transfer may take before it is failed")  # fmt: skip
    p.add_argument("--peer-timeout", type=float, default=d["peer_timeout_s"].default,
                   help="seconds of silence after which a language server's work is dropped")  # fmt: skip
    p.add_argument("--curve-keys", type=Path, default=None,
                   help="secret CURVE certificate of this encoder (from epd-keys); turns on "
                   "authentication and encryption (env: EPD_CURVE_SECRET_KEY)")  # fmt: skip
    p.add_argument("--curve-clients", type=Path, default=None,
                   help="directory of authorized language-server public keys")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice, one per core); "
                   "set 1 when several servers share a small host")  # fmt: skip
    p.add_argument("--image-cache-mb", type=int, default=d["image_cache_mb"].default,
                   help="MiB of recent ViT outputs kept on the encoder's device, by image bytes: "
                   "a repeated image skips decode and ViT (default %(default)s; 0: off)")  # fmt: skip
    p.add_argument(
        "--no-image-cache",
        action="store_true",
        help="keep no ViT outputs: every image is decoded and encoded again",
    )
    p.add_argument("--max-video-frames", type=int, default=d["max_video_frames"].default,
                   help="frames decoded from one video at most (a job asking for a later "
                   "frame fails with a clear error)")  # fmt: skip
    p.add_argument("--max-video-decode-s", type=float, default=d["max_video_decode_s"].default,
                   help="seconds of decoding one video at most")  # fmt: skip
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    a = p.parse_args(argv)
    try:
        return EncodeConfig(
            model=a.model, host=a.host, port=a.port, encoder_id=a.encoder_id,
            transport=a.transport, mooncake_protocol=a.mooncake_protocol,
            mooncake_device=a.mooncake_device, advertise_host=a.advertise_host, device=a.device,
            dtype=a.dtype, max_batch_images=a.max_batch_images, max_batch_tokens=a.max_batch_tokens,
            max_queue=a.max_queue, staging_tokens=a.staging_tokens, transfer_timeout_s=a.transfer_timeout,
            peer_timeout_s=a.peer_timeout, curve_keys=a.curve_keys, curve_clients=a.curve_clients,
            torch_threads=a.torch_threads, image_cache=not a.no_image_cache,
            image_cache_mb=a.image_cache_mb, log_level=a.log_level,
            max_video_frames=a.max_video_frames, max_video_decode_s=a.max_video_decode_s,
        )  # fmt: skip
    except ValueError as exc:
        p.error(str(exc))


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    import torch

    from encode_server.server import EncodeServer
    from encode_server.vision import VisionEncoder
    from transfer import DTYPES, make_sender

    encoder = VisionEncoder.from_pretrained(config.model, config.device, DTYPES[config.dtype],
                                            video_limits=config.video_limits())  # fmt: skip
    sender = make_sender(config.transport, **config.sender_options())
    server = EncodeServer(config, encoder, sender)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    torch.set_grad_enabled(False)
    if config.torch_threads > 0:
        torch.set_num_threads(config.torch_threads)
    try:
        server.serve_forever(stop)
    finally:
        server.close()
        sender.close()
        stats = {**server.stats, **(server.cache.stats() if server.cache is not None else {})}
        logging.getLogger("epd.encode").info("encode server stopped: %s", stats)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
