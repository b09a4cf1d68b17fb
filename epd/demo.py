"""``epd-demo``: the main job on the embedded default, end to end, with a parity check.

Creates the tiny Qwen3-VL-MoE checkpoint if missing, starts one encode server and one language
server as real processes on loopback (Mooncake over TCP), sends a chat request with an image,
prints the answer and the transfer figures, sends the same image again (served from the language
server's image cache: no encoder work, nothing sent), checks the served greedy tokens of both
against transformers' monolithic Qwen3VLMoeForConditionalGeneration, and shuts both servers down.
"""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import sys
import time
from pathlib import Path

from epd.cluster import LocalCluster

log = logging.getLogger("epd.demo")
QUESTION = "What is in this picture?"


def demo_image(flip: bool = False):
    """A deterministic, non-square picture: a few shapes on a gradient (``flip``: mirrored, the
    warm-up's, so the measured request is not served from the image cache)."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageOps

    y, x = np.mgrid[0:160, 0:224]
    base = np.stack([x * 255 // 224, y * 255 // 160, (x + y) * 255 // 384], -1).astype(np.uint8)
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, 100, 100), fill=(220, 40, 40))
    draw.rectangle((120, 50, 200, 140), fill=(40, 40, 220))
    return ImageOps.mirror(image) if flip else image


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def monolithic_tokens(model_dir: Path, image, n: int) -> list[int]:
    """Greedy tokens of transformers' own model on the same prompt (the correctness oracle)."""
    import torch
    from transformers import AutoProcessor, Qwen3VLMoeForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    content = [{"type": "image", "image": image}, {"type": "text", "text": QUESTION}]
    inputs = processor.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=True, add_generation_prompt=True,
        return_dict=True, return_tensors="pt",
    )  # fmt: skip
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="epd-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", type=Path, default=Path("out/tiny-model"),
                   help="checkpoint directory; the tiny one is created there if missing")  # fmt: skip
    p.add_argument("--transport", default="mooncake", choices=["mooncake", "shm"],
                   help="data plane between the two servers")  # fmt: skip
    p.add_argument("--max-tokens", type=int, default=16, help="tokens to generate")
    p.add_argument("--log-dir", type=Path, default=Path("out/logs/demo"), help="server logs")
    p.add_argument("--no-parity", action="store_true", help="skip the transformers parity check")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[demo] %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not (args.model / "config.json").is_file():
        from epd.tiny_model import make_tiny_model

        log.info("creating the tiny Qwen3-VL-MoE checkpoint in %s", args.model)
        make_tiny_model(args.model)
    image = demo_image()

    def body(picture) -> dict:
        return {
            "model": args.model.resolve().name,  # the served name: the checkpoint directory's
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url(picture)}},
                {"type": "text", "text": QUESTION}]}],
            "max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True,
        }  # fmt: skip

    log.info("starting 1 encode server + 1 language server (%s); logs in %s", args.transport,
             args.log_dir)  # fmt: skip
    t0 = time.perf_counter()
    with LocalCluster(
        args.model, n_encoders=1, transport=args.transport, log_dir=args.log_dir
    ) as c:
        log.info("servers ready in %.1f s at %s", time.perf_counter() - t0, c.url)
        c.chat(body(demo_image(flip=True)))  # warm-up: also opens the Mooncake connection
        status, reply = c.chat(body(image))
        again_status, again = c.chat(body(image))  # the same image: from the image cache
        health = c.health()
        log.info("shutting the servers down")
    if status != 200 or again_status != 200:
        log.error("request failed with %d: %s", max(status, again_status), reply, again)
        return 1
    _report(reply, again, health)
    if args.no_parity:
        return 0
    expected = monolithic_tokens(args.model, image, args.max_tokens)
    same = reply["epd"]["token_ids"] == expected == again["epd"]["token_ids"]
    print(f"parity vs transformers Qwen3VLMoeForConditionalGeneration (greedy, {len(expected)} "
          f"tokens, cold and cached): {'MATCH' if same else 'MISMATCH'}")  # fmt: skip
    if not same:
        print(f"  served:   {reply['epd']['token_ids']}\n  cached:   "
              f"{again['epd']['token_ids']}\n  expected: {expected}")  # fmt: skip
    return 0 if same else 1


def _report(reply: dict, again: dict, health: dict) -> None:
    t = reply["epd"]["timings"]
    ms = {k: v * 1e3 for k, v in t.items() if k.endswith("_s")}
    print(f"answer ({reply['usage']['completion_tokens']} tokens, random tiny weights): "
          f"{reply['choices'][0]['message']['content']!r}")  # fmt: skip
    print(f"token ids: {reply['epd']['token_ids']}")
    print(f"data plane: {t['visual_tokens']} visual tokens, {t['transfer_bytes']} bytes "
          f"(embeds + deepstack) in {ms['transfer_s']:.2f} ms (a warm-up request with another "
          f"image opened the connection)")  # fmt: skip
    print(
        "time to first token {ttft_s:.1f} ms = preprocess {preprocess_s:.1f} + vision "
        "{vision_s:.1f} + block wait {block_wait_s:.1f} + transfer {transfer_s:.1f} + prefill "
        "{prefill_s:.1f} + orchestration {overhead_s:.1f} (queue {queue_s:.2f})".format(**ms)
    )
    a = again["epd"]["timings"]
    print(f"the same image again: {a['cached_images']} of {a['images']} image(s) from the image "
          f"cache, {a['transfer_bytes']} bytes sent, time to first token "
          f"{a['ttft_s'] * 1e3:.1f} ms")  # fmt: skip
    pool = health["pool"]
    print(f"receive pool after the requests: {pool['free_blocks']}/{pool['total_blocks']} "
          f"blocks free, {pool.get('resident_blocks', 0)} holding "
          f"{pool.get('resident_images', 0)} resident image(s) (evicted when room is needed)")  # fmt: skip
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
