"""Prefill + decode with a KV cache for ``Qwen3MoeForCausalLMWithDeepStack``, one sequence at a time.

Decode steps continue M-RoPE the way transformers' ``rope_deltas`` do: the i-th generated token
(i = 0, 1, ...) sits at position ``positions.max() + 1 + i`` on all three axes, so text after an
image continues from the image's largest position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from language_server.engines.base import SamplingParams
from language_server.engines.reference.model import Qwen3MoeForCausalLMWithDeepStack

N_DEEPSTACK = 3


@dataclass(frozen=True)
class GenerationResult:
    """Generated token ids (stop token excluded) and why generation ended: "stop" or "length"."""

    token_ids: tuple[int, ...]
    finish_reason: str


def build_input_embeds(
    model: Qwen3MoeForCausalLMWithDeepStack,
    input_ids: torch.Tensor,
    visual_mask: torch.Tensor,
    embeds: torch.Tensor,
    deepstack: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_embeds [seq, H], input_deepstack_embeds [seq, 3H])`` for one sequence.

    Text rows come from the model's embedding table, visual rows (``visual_mask``, in order) from
    ``embeds [n_vis, H]``; the deepstack rows are ``deepstack [n_vis, 3H]`` there and zero elsewhere.
    """
    hidden = model.config.hidden_size
    n_vis = int(visual_mask.sum())
    if visual_mask.shape != input_ids.shape or visual_mask.dtype != torch.bool:
        raise ValueError("visual_mask must be a bool tensor shaped like input_ids")
    if embeds.shape != (n_vis, hidden) or deepstack.shape != (n_vis, N_DEEPSTACK * hidden):
        raise ValueError(
            f"expected embeds [{n_vis}, {hidden}] and deepstack [{n_vis}, {N_DEEPSTACK * hidden}]"
            f", got {tuple(embeds.shape)} and {tuple(deepstack.shape)}"
        )
    mask = visual_mask.to(model.device)
    input_embeds = model.embed(input_ids).detach().clone()
    input_embeds[mask] = embeds.to(model.device, model.dtype)
    stacked = torch.zeros(
        len(input_ids), N_DEEPSTACK * hidden, device=model.device, dtype=model.dtype
    )
    stacked[mask] = deepstack.to(model.device, model.dtype)
    return input_embeds, stacked


def next_token(logits: torch.Tensor, params: SamplingParams, generator=None) -> int:
    """Pick one token id from ``logits [vocab]``."""
    if params.greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs >= params.top_p
        probs = probs.scatter(0, order, sorted_probs.masked_fill(drop, 0.0))
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.inference_mode()
def stream(
    model: Qwen3MoeForCausalLMWithDeepStack,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    params: SamplingParams,
    input_embeds: torch.Tensor | None = None,
    input_deepstack_embeds: torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
) -> Iterator[int]:
    """Yield generated token ids one by one (prefill, then one cached decode step per token).

    ``input_ids [seq]`` and ``positions [3, seq]`` describe the prompt; with images pass
    ``input_embeds``/``input_deepstack_embeds`` from ``build_input_embeds``. Blocking per token.
    """
    if input_ids.ndim != 1 or input_ids.shape[0] == 0:
        raise ValueError("input_ids must be a non-empty [seq] tensor")
    device = model.device
    generator = None
    if not params.greedy and params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    cache = model.new_cache()
    next_pos = int(positions.max()) + 1
    logits = model(
        None if input_embeds is not None else input_ids.to(device),
        positions.to(device),
        input_embeds,
        input_deepstack_embeds,
        cache=cache,
        visual_mask=visual_mask,
        last_only=True,
    )
    for step in range(params.max_new_tokens):
        token = next_token(logits[-1], params, generator)
        if token in params.stop_token_ids:
            return
        yield token
        if step + 1 == params.max_new_tokens:
            return
        step_pos = torch.full((3, 1), next_pos + step, dtype=torch.long, device=device)
        ids = torch.tensor([token], device=device)
        logits = model(ids, step_pos, cache=cache, last_only=True)


def generate(
    model: Qwen3MoeForCausalLMWithDeepStack,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    params: SamplingParams,
    input_embeds: torch.Tensor | None = None,
    input_deepstack_embeds: torch.Tensor | None = None,
    visual_mask: torch.Tensor | None = None,
    on_token: Callable[[int], None] | None = None,
) -> GenerationResult:
    """Run ``stream`` to the end; ``on_token`` (optional) is called with each new token id."""
    tokens = []
    for token in stream(
        model, input_ids, positions, params, input_embeds, input_deepstack_embeds, visual_mask
    ):
        tokens.append(token)
        if on_token is not None:
            on_token(token)
    reason = "length" if len(tokens) == params.max_new_tokens else "stop"
    return GenerationResult(tuple(tokens), reason)
