"""GPU-node checks, run by scripts/gpu_check.sh on a machine with a GPU (elsewhere they skip):
bfloat16 parity of the split halves against transformers' monolithic model, both servers end to
end with ``--device``, and Mooncake writes between GPU-resident buffers (sources and receive
pool in GPU memory).

``EPD_GPU_DEVICE`` picks the device (default ``cuda:0``; ``cpu`` runs the same code on the CPU,
which is how this file was checked without a GPU). ``EPD_GPU_MOONCAKE_PROTOCOL`` (tcp) and
``EPD_GPU_MOONCAKE_DEVICE`` ("") choose the Mooncake transport of the transfer check. Each
check prints one ``[gpu]`` line that scripts/gpu_check.sh collects.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from tests.faults.conftest import image_body

DEVICE = os.environ.get("EPD_GPU_DEVICE", "cuda:0")
PROTOCOL = os.environ.get("EPD_GPU_MOONCAKE_PROTOCOL", "tcp")
NIC = os.environ.get("EPD_GPU_MOONCAKE_DEVICE", "")
N_TOKENS = 16
# bf16 keeps 8 bits of mantissa: the two paths may round differently (other kernels, batched
# ViT shapes), so logits agree to a fraction of their scale, not to float32's 1e-4.
REL_TOL = 0.02
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def device() -> str:
    import torch

    if DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"no CUDA device for {DEVICE} (scripts/gpu_check.sh runs these on a GPU node)")
    return DEVICE


@pytest.fixture(scope="module")
def halves(tiny_model_dir, device):
    """(monolithic transformers model, split pipeline, language half), all bf16 on ``device``."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    from epd.local import SplitPipeline
    from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack

    mono = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    pipeline = SplitPipeline.from_pretrained(tiny_model_dir, device=device, dtype=torch.bfloat16)
    language = Qwen3MoeForCausalLMWithDeepStack.from_pretrained(
        tiny_model_dir, device=device, dtype=torch.bfloat16
    )
    return mono.to(device).eval(), pipeline, language


@pytest.mark.parametrize("name", ["text_only", "one_image", "two_images", "long_image"])
def test_parity_bf16(name, halves, make_image, device):
    import torch

    from epd.local import generate_encoded, prefill_logits
    from language_server.engines.base import SamplingParams
    from tests.parity.test_parity import PROMPTS, _messages

    mono, pipeline, language = halves
    ours, theirs = _messages(PROMPTS[name], make_image)
    encoded = pipeline.encode(ours)
    inputs = pipeline.processor.apply_chat_template(
        theirs, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    ).to(device)
    with torch.no_grad():
        ref = mono(**inputs).logits[0].float()
        out = mono.generate(**inputs, max_new_tokens=N_TOKENS, do_sample=False)
    got = prefill_logits(language, encoded).float()
    ref_tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
    tokens = generate_encoded(language, encoded, SamplingParams(max_new_tokens=N_TOKENS)).token_ids
    pairs = zip(tokens, ref_tokens, strict=False)  # the monolithic one may stop at eos
    same = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(tokens), len(ref_tokens)))
    diff, scale = (got - ref).abs().max().item(), ref.abs().max().item()
    print(f"[gpu] parity-bf16 {name} on {device}: max abs logit diff {diff:.3g} (scale "
          f"{scale:.3g}); first {same}/{N_TOKENS} greedy tokens equal")  # fmt: skip
    assert got.shape == ref.shape
    assert diff <= REL_TOL * scale, (diff, scale)
    assert same >= 1, (tokens, ref_tokens)  # later tokens may part on a near tie in bf16


def test_servers_end_to_end_on_device(tiny_model_dir, device, make_image, tmp_path):
    from epd.cluster import LocalCluster

    on_device = ["--device", device, "--dtype", "bfloat16"]
    with LocalCluster(
        tiny_model_dir, n_encoders=2, log_dir=tmp_path, encoder_args=on_device,
        language_args=[*on_device, "--num-blocks", "64", "--block-tokens", "16"],
    ) as cluster:  # fmt: skip
        model = cluster.health()["model"]
        times = []
        for seed, size in enumerate([(80, 112), (224, 320), (96, 160), (448, 448)]):
            body = image_body(make_image, *size, seed=seed, max_tokens=8, model=model)
            status, reply = cluster.chat(body)
            assert status == 200, reply
            assert reply["usage"]["completion_tokens"] == 8
            times.append(reply["epd"]["timings"])
        pool = cluster.health()["pool"]
        assert pool["available_blocks"] == pool["total_blocks"], pool
    ttft = statistics.median(t["ttft_s"] for t in times) * 1e3
    print(f"[gpu] e2e --device {device}: 4 requests with images, 2 encoders, all 200; median "
          f"ttft {ttft:.1f} ms; every block free after")  # fmt: skip


def test_mooncake_between_device_buffers(device):
    """Sources and receive pool both in ``device`` memory; rows checked after every write."""
    import torch

    from transfer import Destination, MultimodalDataBuffers, TransferState
    from transfer.registry import make_receiver, make_sender

    hidden, block_tokens, sizes, reps = 2048, 64, (256, 1024, 4096, 16384), 5
    options = {"hostname": "127.0.0.1", "protocol": PROTOCOL, "device_name": NIC}
    receiver = make_receiver("mooncake", **options)
    sender = make_sender("mooncake", register_sources=True, **options)
    buffers = MultimodalDataBuffers(max(sizes) // block_tokens, block_tokens, hidden,
                                    torch.bfloat16, receiver=receiver, device=device)  # fmt: skip
    n_max = max(sizes)
    arena = torch.randn(n_max * 4 * hidden, device=device).to(torch.bfloat16)
    embeds = arena[: n_max * hidden].view(n_max, hidden)
    deepstack = arena[n_max * hidden :].view(n_max, 3 * hidden)
    sender.register_arena(arena)
    results = []
    try:
        for n in sizes:
            seconds = []
            for rep in range(reps):
                blocks = buffers.alloc(n)
                assert blocks is not None
                addrs = buffers.describe(blocks)
                dest = Destination(addrs.session, addrs.block_tokens, tuple(addrs.embed_addrs),
                                   tuple(addrs.deepstack_addrs))  # fmt: skip
                buffers.embeds.zero_()
                buffers.deepstack.zero_()
                if device.startswith("cuda"):
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                sender.submit(f"r{n}-{rep}", dest, embeds[:n], deepstack[:n])
                state = sender.wait(f"r{n}-{rep}", timeout_s=60)
                seconds.append(time.perf_counter() - t0)
                assert state is TransferState.DONE, state
                got_e, got_d = buffers.gather(blocks, n)
                assert torch.equal(got_e, embeds[:n]) and torch.equal(got_d, deepstack[:n])
                sender.release(f"r{n}-{rep}")
                buffers.free(blocks)
            mib = n * 4 * hidden * 2 / 2**20
            results.append(f"{mib:.0f} MiB {mib * 2**20 / statistics.median(seconds) / 1e9:.2f}")
    finally:
        sender.close()
        receiver.close()
    print(f"[gpu] transfer {device}->{device} mooncake/{PROTOCOL} bf16 H={hidden}, median GB/s: "
          + ", ".join(results))  # fmt: skip
