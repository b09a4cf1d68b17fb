"""language_server: the language half of disaggregated Qwen3-VL-MoE.

Owns the prompt and the receive pool (flow v3) and runs the text MoE decoder with DeepStack;
never loads the ViT, never decodes pixels (it reads image headers for their sizes) and never
imports ``encode_server``.

- ``prompt``: ``PromptBuilder`` (chat template, tokens, grids from image headers, M-RoPE).
- ``receiver``, ``dispatch``, ``encoders``: blocks lent per image job, jobs to encoders, liveness.
- ``service``, ``api``: the OpenAI-compatible HTTP front door; ``engine`` / ``sglang_engine``.

- ``model``: ``Qwen3MoeModel``, ``Qwen3MoeModelWithDeepStack`` and
  ``Qwen3MoeForCausalLMWithDeepStack`` (built on transformers' Qwen3-VL-MoE text modules).
- ``generate``: ``SamplingParams``, KV-cached ``stream`` / ``generate``, ``build_input_embeds``.
- ``weights``: reads only ``model.language_model.*`` and ``lm_head.weight``; both expert layouts.
"""
