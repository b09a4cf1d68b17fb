"""The reference engine (``--engine transformers``): transformers' modules, one worker thread.

- ``model.py``: ``Qwen3MoeModel``, ``Qwen3MoeModelWithDeepStack`` and
  ``Qwen3MoeForCausalLMWithDeepStack`` (built on transformers' Qwen3-VL-MoE text modules; loads
  only the language tensors through ``engines/weights.py``).
- ``generate.py``: KV-cached ``stream`` / ``generate``, ``build_input_embeds``, ``next_token``.
- ``engine.py``: ``Engine`` (``EngineBase``), sequences interleaved one token per round; its
  ``build`` is what the registry calls.

Imports ``engines.base``, ``engines.weights``, ``language_server.config`` and the pool's
``ReceivedPrompt``; never ``engines.sglang``.
"""
