"""``epd-language``: the language server and front door (HTTP), fed by one or more encoders."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
from pathlib import Path

from language_server.config import LanguageConfig
from language_server.engines import ENGINES, engine_entry
from transfer.registry import add_transport_flags


def parse_args(argv: list[str] | None = None) -> LanguageConfig:
    d = LanguageConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="epd-language",
        description="Language server: OpenAI-compatible HTTP API running "
        "Qwen3MoeForCausalLMWithDeepStack on embeddings + deepstack rows written by encode servers.",
    )
    p.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory")
    p.add_argument("--host", default=d["host"].default, help="HTTP bind address (default loopback)")
    p.add_argument("--port", type=int, default=d["port"].default, help="HTTP port")
    p.add_argument("--encoder", action="append", default=[], metavar="ADDR",
                   help="an encode server, tcp://HOST:PORT (repeat for several)")  # fmt: skip
    p.add_argument("--served-model-name", nargs="+", default=[], metavar="NAME",
                   help="model names the API answers to; the first is the one reported "
                   "(default: the checkpoint directory's name); any other model gets 404")  # fmt: skip
    p.add_argument("--engine", default="transformers", choices=list(ENGINES),
                   help="generation engine: " + "; ".join(f"{e.name}: {e.help}"
                                                          for e in ENGINES.values()))  # fmt: skip
    p.add_argument("--sglang-args", default="", metavar="JSON",
                   help='extra SGLang ServerArgs for --engine sglang, e.g. \'{"tp_size": 8}\'')  # fmt: skip
    add_transport_flags(p, peers="encoders")
    p.add_argument("--device", default="cpu", help="torch device for the language model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model and receive-buffer dtype (must match the encoders')")  # fmt: skip
    p.add_argument("--num-blocks", type=int, default=d["num_blocks"].default,
                   help="receive blocks in the pool")  # fmt: skip
    p.add_argument("--block-tokens", type=int, default=d["block_tokens"].default,
                   help="visual tokens per block")  # fmt: skip
    p.add_argument("--max-waiting-allocs", type=int, default=d["max_waiting_allocs"].default,
                   help="requests that may wait for free blocks before 503")  # fmt: skip
    p.add_argument("--no-image-cache", action="store_true",
                   help="do not keep the rows of recent images resident in the pool (every "
                   "image is encoded and sent again); see README's trust model")  # fmt: skip
    p.add_argument("--image-cache-blocks", type=int, default=d["image_cache_blocks"].default,
                   help="most pool blocks the rows of recent images may stay resident in "
                   "(default -1: the whole pool; idle residents are evicted whenever a request "
                   "needs room; 0: off, as --no-image-cache)")  # fmt: skip
    p.add_argument("--alloc-wait", type=float, default=d["alloc_wait_s"].default,
                   help="seconds a request may wait for free blocks before 503")  # fmt: skip
    p.add_argument("--dead-writer-wait", type=float, default=d["dead_writer_s"].default,
                   help="seconds after an encoder is declared dead before the blocks it was "
                   "writing come back (default -1: the transport's own timeout, 31 s for "
                   "Mooncake, 0 for shm)")  # fmt: skip
    p.add_argument("--max-inflight", type=int, default=d["max_inflight"].default,
                   help="HTTP requests in flight before new ones get 503")  # fmt: skip
    p.add_argument("--heartbeat", type=float, default=d["heartbeat_s"].default,
                   help="seconds between heartbeats to each encoder")  # fmt: skip
    p.add_argument("--encoder-dead-after", type=float, default=d["encoder_dead_after_s"].default,
                   help="seconds of encoder silence before its requests move elsewhere")  # fmt: skip
    p.add_argument("--request-timeout", type=float, default=d["request_timeout_s"].default,
                   help="seconds from sending a request to an encoder to its rows arriving")  # fmt: skip
    p.add_argument("--max-images", type=int, default=d["max_images"].default,
                   help="images and videos in one request at most")  # fmt: skip
    p.add_argument("--max-image-pixels", type=int, default=d["max_image_pixels"].default,
                   help="pixels (width x height, from the header) of one image or video "
                   "frame at most")  # fmt: skip
    p.add_argument("--max-image-tokens", type=int, default=d["max_image_tokens"].default,
                   help="visual tokens of one image or video at most")  # fmt: skip
    p.add_argument("--max-video-frames", type=int, default=d["max_video_frames"].default,
                   help="frames in one video's container at most (413 beyond)")  # fmt: skip
    p.add_argument("--max-video-seconds", type=float, default=d["max_video_seconds"].default,
                   help="duration of one video at most, from its container (413 beyond)")  # fmt: skip
    p.add_argument("--max-prompt-tokens", type=int, default=d["max_prompt_tokens"].default,
                   help="prompt tokens at most (after image expansion)")  # fmt: skip
    p.add_argument("--max-image-bytes", type=int, default=d["max_image_bytes"].default,
                   help="bytes of one encoded image or video (data: URL payload or "
                   "file; a video's frames in all) at most")  # fmt: skip
    p.add_argument("--max-body-bytes", type=int, default=d["max_body_bytes"].default,
                   help="bytes of one HTTP request body at most, 413 beyond (default 0: room "
                   "for --max-images images of --max-image-bytes in base64, at most 64 MiB)")  # fmt: skip
    p.add_argument("--allowed-local-media-path", type=Path, default=None, metavar="DIR",
                   help="read image paths and file:// URLs, only inside DIR (symlinks and .. "
                   "resolved first); without it local paths are refused")  # fmt: skip
    p.add_argument("--no-local-images", action="store_true",
                   help="accepted for old scripts; local paths are off by default now")  # fmt: skip
    p.add_argument("--curve-keys", type=Path, default=None,
                   help="secret CURVE certificate of this server (from epd-keys); with "
                   "--curve-server-key it authenticates and encrypts the control plane")  # fmt: skip
    p.add_argument("--curve-server-key", type=Path, default=None,
                   help="the encoders' public CURVE certificate (env: EPD_CURVE_SERVER_KEY)")  # fmt: skip
    p.add_argument("--torch-threads", type=int, default=0,
                   help="torch intra-op threads (default: torch's choice, one per core), in "
                   "this process and, with --engine sglang, in SGLang's scheduler processes "
                   "too; set 1 when several servers share a small host")  # fmt: skip
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    a = p.parse_args(argv)
    if a.no_local_images and a.allowed_local_media_path is not None:
        p.error("--no-local-images contradicts --allowed-local-media-path")
    try:
        return LanguageConfig(
            model=a.model, encoders=tuple(a.encoder), host=a.host, port=a.port,
            served_model_name=tuple(a.served_model_name), engine=a.engine, sglang_args=a.sglang_args, transport=a.transport,
            mooncake_protocol=a.mooncake_protocol, mooncake_device=a.mooncake_device,
            advertise_host=a.advertise_host, device=a.device, dtype=a.dtype,
            num_blocks=a.num_blocks, block_tokens=a.block_tokens,
            max_waiting_allocs=a.max_waiting_allocs, alloc_wait_s=a.alloc_wait,
            image_cache=not a.no_image_cache, image_cache_blocks=a.image_cache_blocks,
            dead_writer_s=a.dead_writer_wait, max_image_pixels=a.max_image_pixels,
            max_image_tokens=a.max_image_tokens, max_inflight=a.max_inflight, heartbeat_s=a.heartbeat,
            encoder_dead_after_s=a.encoder_dead_after, request_timeout_s=a.request_timeout,
            max_images=a.max_images, max_prompt_tokens=a.max_prompt_tokens,
            max_image_bytes=a.max_image_bytes, max_body_bytes=a.max_body_bytes,
            max_video_frames=a.max_video_frames, max_video_seconds=a.max_video_seconds,
            allowed_local_media_path=a.allowed_local_media_path, log_level=a.log_level,
            torch_threads=a.torch_threads, curve_keys=a.curve_keys, curve_server_key=a.curve_server_key,
        )  # fmt: skip
    except ValueError as exc:
        p.error(str(exc))


def build_app(config: LanguageConfig):
    """Load the model, allocate and register the receive pool, wire the service; return the app."""
    from language_server.encoders.links import EncoderPool
    from language_server.http.app import create_app
    from language_server.http.metrics import Metrics
    from language_server.http.service import ChatService
    from language_server.pool.cache import ImageCache
    from language_server.pool.receiver import Receiver
    from language_server.prompt.builder import PromptBuilder, PromptLimits
    from protocol.keys import client_keys
    from transfer import DTYPES, MultimodalDataBuffers, make_receiver
    from transfer.buffers import PoolLayout

    dtype = DTYPES[config.dtype]
    log = logging.getLogger("epd.language")
    entry = engine_entry(config.engine)
    link = None
    if entry.hosts_pool:  # the pool lives where the model runs (SGLang's scheduler process)
        from language_server.pool.host_link import PoolHostLink

        link = PoolHostLink()
    try:
        engine = entry.build(config, link.address if link else "")
    except BaseException:
        if link is not None:
            link.close()
        raise
    limits = PromptLimits(max_prompt_tokens=config.max_prompt_tokens, max_images=config.max_images,
                          max_image_pixels=config.max_image_pixels,
                          max_image_tokens=config.max_image_tokens,
                          max_video_frames=config.max_video_frames,
                          max_video_seconds=config.max_video_seconds)  # fmt: skip
    builder = PromptBuilder.from_pretrained(config.model, limits, config.dtype)
    hidden = builder.config.text_config.hidden_size  # type: ignore[union-attr]
    transport = None
    if link is not None:
        try:
            hello = link.wait_hello()
            if hello.hidden != hidden or hello.dtype != config.dtype:
                raise SystemExit(f"the pool's host has hidden {hello.hidden} {hello.dtype}; "
                                 f"the checkpoint says {hidden} {config.dtype}")  # fmt: skip
        except BaseException:
            engine.close()
            link.close()
            raise
        buffers: PoolLayout = PoolLayout.from_hello(hello)
        where = f"SGLang's scheduler process (pid {hello.pid}, {hello.device})"
    else:
        transport = make_receiver(config.transport, **config.receiver_options())
        buffers = MultimodalDataBuffers(config.num_blocks, config.block_tokens,
                                        hidden, dtype, transport, config.device)  # fmt: skip
        where = f"this process ({config.device})"
    cache = None
    if config.image_cache and config.image_cache_blocks != 0:
        size = config.image_cache_blocks
        size = buffers.num_blocks if size < 0 else min(size, buffers.num_blocks)
        cache = ImageCache(size, buffers.bytes_per_token)
    receiver = Receiver(buffers, config.max_waiting_allocs, config.alloc_wait_s,
                        config.dead_writer_wait_s, host=link, cache=cache)  # fmt: skip
    keys = client_keys(config.curve_keys, config.curve_server_key)
    encoders = EncoderPool(config.encoders, config.transport, receiver.on_message,
                           config.heartbeat_s, config.encoder_dead_after_s, keys)  # fmt: skip
    service = ChatService(config, engine, builder, receiver, encoders)
    log.info("receive pool: %d blocks x %d tokens, %.1f MiB, transport %s session %s, in %s",
             buffers.num_blocks, buffers.block_tokens,
             buffers.capacity_tokens * buffers.bytes_per_token / 2**20, config.transport,
             buffers.session, where)  # fmt: skip

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        if link is not None:
            link.start()
        await service.startup()
        yield
        await service.shutdown()
        if link is not None:
            await link.stop()
        engine.close()
        if link is not None:
            link.close()
        if transport is not None:
            transport.close()

    return create_app(service, Metrics(cache, encoders), lifespan)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("MC_LOG_LEVEL", "ERROR")
    import uvicorn

    if config.torch_threads > 0:
        import torch

        torch.set_num_threads(config.torch_threads)
    # Take the HTTP port before loading anything: SGLang picks free ports for itself while it
    # starts (tens of seconds), and one of them could otherwise be ours. Bound, not listening:
    # clients are refused until the server is ready.
    sock = _bind(config.host, config.port)
    app = build_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port,
                                           log_level=config.log_level.lower(), access_log=False))  # fmt: skip
    server.run(sockets=[sock])
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise SystemExit(f"cannot listen on {host}:{port}: {exc}") from None
    return sock


if __name__ == "__main__":
    raise SystemExit(main())
