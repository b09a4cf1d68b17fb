"""Golden test of ``--engine sglang`` on CPU (SGLang's plain native mode) against transformers.

One SGLang engine (``Qwen3MoeForCausalLMWithDeepStack`` from ``language_server.engines.sglang.models``)
serves prompts with 0, 1 and 2 images through ``SGLangEngine`` exactly as the language server does:
the prompt builder's ids and M-RoPE positions and the encoder's embeddings and DeepStack rows go
in through ``job_for_text`` / ``job_for_image``. The greedy tokens and the first step's top-5 log-probabilities must equal those
of transformers' monolithic ``Qwen3VLMoeForConditionalGeneration`` on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import importlib.util
import multiprocessing as mp
import queue
import signal
import threading
import time

import pytest
import torch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("sglang") is None,
        reason="SGLang is not installed: bash scripts/setup_sglang.sh",
    ),
]
N_TOKENS = 8
ATOL = 1e-4  # float32, as the parity tests
CRASHED = threading.Event()  # set when SGLang's watchdog reports a dead child (SIGQUIT)
PROMPTS = {  # name -> list of (height, width, seed)
    "text_only": [],
    "one_image": [(80, 112, 1)],
    "two_images": [(200, 96, 2), (96, 160, 3)],
}


@pytest.fixture(scope="module")
def sglang_engine(tiny_model_dir):
    """SGLangEngine on the tiny checkpoint, recording top-5 log-probs per step.

    SGLang's engine is built on SGLangEngine's own thread, so it installs no signal handler in
    the pytest process; a child's crash would still SIGQUIT this process, which here only marks
    the engine dead (tests then fail instead of pytest being killed). SGLang's other global side
    effects (multiprocessing start method, event-loop policy) are undone afterwards.
    """
    from language_server.config import LanguageConfig
    from language_server.engines.sglang.engine import SGLangEngine
    from language_server.engines.sglang.launch import start_sglang

    method, policy = mp.get_start_method(allow_none=True), asyncio.get_event_loop_policy()
    previous = signal.signal(signal.SIGQUIT, lambda *_: CRASHED.set())
    config = LanguageConfig(model=tiny_model_dir, log_level="warning")
    t0 = time.perf_counter()
    engine = SGLangEngine(lambda: start_sglang(config), top_logprobs_num=5)
    print(f"SGLang engine started in {time.perf_counter() - t0:.1f} s")
    yield engine
    engine.close()
    signal.signal(signal.SIGQUIT, previous)
    mp.set_start_method(method, force=True)
    asyncio.set_event_loop_policy(policy)


def _messages(spec, make_image):
    content = []
    for k, (h, w, seed) in enumerate(spec):
        content += [
            {"type": "image", "image": make_image(h, w, seed)},
            {"type": "text", "text": f"{k}."},
        ]
    content.append({"type": "text", "text": "What is in the picture?"})
    return [{"role": "user", "content": content}]


def _job(engine, encoded, params, emit, deepstack=None):
    from language_server.pool.leases import ReceivedPrompt

    if encoded.n_vis == 0:
        return engine.job_for_text(encoded.input_ids, encoded.positions, params, emit)
    prompt = ReceivedPrompt(
        input_ids=encoded.input_ids, positions=encoded.positions, visual_mask=encoded.visual_mask,
        embeds=encoded.embeds, deepstack=encoded.deepstack if deepstack is None else deepstack,
        image_grid_thw=encoded.image_grid_thw, timings=None, kinds=encoded.kinds,
        item_rows=encoded.item_rows, video_grid_thw=encoded.video_grid_thw,
    )  # fmt: skip
    return engine.job_for_image(prompt, params, emit)


def _serve(engine, encoded, params, deepstack=None, timeout=120.0):
    """Run one job to its end; (tokens, finish reason, job)."""
    events: queue.Queue = queue.Queue()
    job = _job(engine, encoded, params, lambda kind, value: events.put((kind, value)), deepstack)
    engine.submit(job)
    tokens = []
    while True:
        kind, value = _next(events, timeout)
        if kind == "token":
            tokens.append(value)
        elif kind == "end":
            return tokens, value, job
        else:
            raise AssertionError(f"generation failed: {value}")


def _next(events: queue.Queue, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert not CRASHED.is_set(), "an SGLang child process died (see the log)"
        try:
            return events.get(timeout=0.2)
        except queue.Empty:
            continue
    raise TimeoutError(f"no event in {timeout} s")


def _reference(monolithic, processor, messages):
    """transformers' greedy tokens and first-step top-5 (log-prob, id) pairs."""
    inputs = processor.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    return _answer(monolithic, inputs)


def _answer(monolithic, inputs):
    with torch.no_grad():
        out = monolithic.generate(
            **inputs, max_new_tokens=N_TOKENS, min_new_tokens=N_TOKENS, do_sample=False
        )
        logits = monolithic(**inputs).logits[0, -1].float()
    top = torch.log_softmax(logits, -1).topk(5)
    pairs = list(zip(top.values.tolist(), top.indices.tolist(), strict=True))
    return out[0, inputs["input_ids"].shape[1] :].tolist(), pairs


@pytest.fixture(scope="module")
def cases(pipeline, monolithic, make_image):
    out = {}
    for name, spec in PROMPTS.items():
        messages = _messages(spec, make_image)
        encoded = pipeline.encode(messages)
        out[name] = (encoded, *_reference(monolithic, pipeline.processor, messages))
    return out


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_tokens_and_first_top5_equal_monolithic(name, sglang_engine, cases):
    from language_server.engines.base import SamplingParams

    encoded, ref_tokens, ref_top5 = cases[name]
    t0 = time.perf_counter()
    tokens, reason, job = _serve(sglang_engine, encoded, SamplingParams(max_new_tokens=N_TOKENS))
    ours = job.payload.top_logprobs[0]
    diffs = [abs(a - b) for (a, _), (b, _) in zip(ours, ref_top5, strict=True)]
    print(f"{name}: seq {len(encoded.input_ids)}, n_vis {encoded.n_vis}, "
          f"{time.perf_counter() - t0:.2f} s\n  sglang {tokens}\n  transformers {ref_tokens}\n"
          f"  top-5 ids {[t for _, t in ours]}, |logprob diff| {[f'{d:.2g}' for d in diffs]}")  # fmt: skip
    assert tokens == ref_tokens
    assert reason == "length"
    assert len(job.payload.top_logprobs) == N_TOKENS
    assert [t for _, t in ours] == [t for _, t in ref_top5]
    assert max(diffs) <= ATOL


@pytest.fixture(scope="module")
def video_cases(pipeline, monolithic, make_image):
    """Issue 19's prompts (tests/parity/test_parity_video.py) with transformers' answers."""
    from tests.e2e.conftest import transformers_inputs
    from tests.parity.test_parity_video import PROMPTS as VIDEOS
    from tests.parity.test_parity_video import _messages as video_messages

    out = {}
    for name, spec in VIDEOS.items():
        ours, *theirs = video_messages(spec, make_image)
        inputs = transformers_inputs(pipeline.processor, *theirs)
        out[name] = (pipeline.encode(ours), *_answer(monolithic, inputs))
    return out


@pytest.mark.parametrize("name", ["one_video", "image_and_video", "long_video"])
def test_videos_greedy_tokens_and_first_top5_equal_monolithic(name, sglang_engine, video_cases):
    """A video item (and an image item beside it) through SGLang: same tokens, same log-probs."""
    from language_server.engines.base import SamplingParams

    encoded, ref_tokens, ref_top5 = video_cases[name]
    assert encoded.video_grid_thw is not None and len(encoded.video_grid_thw) == 1
    tokens, reason, job = _serve(sglang_engine, encoded, SamplingParams(max_new_tokens=N_TOKENS))
    ours = job.payload.top_logprobs[0]
    diffs = [abs(a - b) for (a, _), (b, _) in zip(ours, ref_top5, strict=True)]
    print(f"{name}: n_vis {encoded.n_vis}, |logprob diff| {[f'{d:.2g}' for d in diffs]}")
    assert tokens == ref_tokens and reason == "length"
    assert [t for _, t in ours] == [t for _, t in ref_top5]
    assert max(diffs) <= ATOL


def test_deepstack_reaches_the_model(sglang_engine, cases):
    """Control: zeroed DeepStack rows change the first step's log-probs far beyond ATOL, so the
    golden test above would catch a model that dropped (or misplaced) the DeepStack additions."""
    from language_server.engines.base import SamplingParams

    encoded, _, ref_top5 = cases["two_images"]
    zeros = torch.zeros_like(encoded.deepstack)
    _, _, job = _serve(sglang_engine, encoded, SamplingParams(max_new_tokens=1), deepstack=zeros)
    ours = job.payload.top_logprobs[0]
    ours_by_id = {t: lp for lp, t in ours}
    common = [abs(ours_by_id[t] - lp) for lp, t in ref_top5 if t in ours_by_id]
    print(f"zeroed deepstack: top-5 ids {[t for _, t in ours]} vs {[t for _, t in ref_top5]}, "
          f"max |logprob diff| on common ids {max(common, default=float('nan')):.3g}")  # fmt: skip
    assert [t for _, t in ours] != [t for _, t in ref_top5] or max(common) > 100 * ATOL


def test_stop_token_ends_generation_and_is_not_returned(sglang_engine, cases):
    from language_server.engines.base import SamplingParams

    encoded, ref_tokens, _ = cases["one_image"]
    stop = ref_tokens[2]
    params = SamplingParams(max_new_tokens=N_TOKENS, stop_token_ids=(stop,))
    tokens, reason, _ = _serve(sglang_engine, encoded, params)
    assert tokens == ref_tokens[: ref_tokens.index(stop)]
    assert reason == "stop"


def test_cancel_stops_a_job(sglang_engine, cases):
    from language_server.engines.base import SamplingParams

    encoded, _, _ = cases["text_only"]
    events: queue.Queue = queue.Queue()
    params = SamplingParams(max_new_tokens=4000)
    job = _job(sglang_engine, encoded, params, lambda kind, value: events.put((kind, value)))
    sglang_engine.submit(job)
    assert _next(events, 60)[0] == "token"
    sglang_engine.cancel(job)
    sglang_engine.cancel(job)  # idempotent
    deadline = time.monotonic() + 30
    while sglang_engine.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sglang_engine.active == 0
    while not events.empty():
        assert events.get()[0] == "token"  # emitted before the cancel took effect; never "end"
    assert job.generated < 4000


def test_holds_no_vision_parameter(sglang_engine, tiny_model_dir, tmp_path):
    """Dump the state dict of the model inside SGLang's scheduler process and inspect it."""
    sglang_engine.engine.save_sharded_model(path=str(tmp_path), pattern=None, max_size=None)
    held: dict[str, list[int]] = {}
    for file in sorted(tmp_path.glob("*.safetensors")):
        held.update(_shapes(file))
    ckpt = _shapes(tiny_model_dir / "model.safetensors")
    vision = [s for k, s in ckpt.items() if k.startswith("model.visual.")]
    language = [s for k, s in ckpt.items() if not k.startswith("model.visual.")]
    print(f"SGLang model: {len(held)} tensors, {numel(held.values())} elements "
          f"(experts padded to SGLang's CPU alignment); checkpoint: language {numel(language)}, "
          f"vision {numel(vision)} in {len(vision)} tensors")  # fmt: skip
    assert held and vision
    assert not [k for k in held if "visual" in k or "merger" in k or "patch_embed" in k]
    prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    assert all(k.startswith(prefixes) for k in held), sorted(held)[:5]


def _shapes(path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        names = f.keys()
        return {name: f.get_slice(name).get_shape() for name in names}


def numel(shapes) -> int:
    return sum(torch.Size(s).numel() for s in shapes)
