"""language_server: the language half of disaggregated Qwen3-VL-MoE.

Runs the text MoE decoder with DeepStack; never loads the ViT, never sees pixels and never imports
``encode_server``.

- ``model``: ``Qwen3MoeModel``, ``Qwen3MoeModelWithDeepStack`` and
  ``Qwen3MoeForCausalLMWithDeepStack`` (built on transformers' Qwen3-VL-MoE text modules).
- ``generate``: ``SamplingParams``, KV-cached ``stream`` / ``generate``, ``build_input_embeds``.
- ``weights``: reads only ``model.language_model.*`` and ``lm_head.weight``; both expert layouts.
"""
