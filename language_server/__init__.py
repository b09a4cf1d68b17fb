"""language_server: the language half of disaggregated Qwen3-VL-MoE.

Owns the prompt and the receive pool (flow v3) and runs the text MoE decoder with DeepStack;
never loads the ViT, never decodes pixels (it reads image headers for their sizes) and never
imports ``encode_server``. One subpackage per role; arrows run one way, down this list:

- ``cli.py``: ``epd-language``, the composition root: flags, then every part built and wired.
- ``http/``: the OpenAI-compatible front door (app, request parsing, the service that drives a
  request through the other parts, metrics, the answer's text).
- ``prompt/``: chat template, tokens, image grids from headers, M-RoPE positions.
- ``encoders/``: links to encode servers (liveness, incarnations, load) and job dispatch.
- ``engines/``: the contract the service drives (``base.py``), one registry (``--engine``), the
  ``reference/`` and ``sglang/`` engines with their models.
- ``pool/``: blocks lent per image job, verification of what arrived, block lifetimes, the
  link to a pool held in another process.
- ``config.py``: ``LanguageConfig``, read by all.

``http`` may import ``prompt``, ``encoders``, ``engines`` (its ``base`` only) and ``pool``;
``encoders`` and ``engines`` may import ``pool``; ``pool`` and ``prompt`` import none of the
others; nothing but ``cli`` imports ``cli``. ``tests/language_server/test_imports.py`` checks it.
"""
