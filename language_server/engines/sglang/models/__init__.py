"""Out-of-tree SGLang models of this project (``SGLANG_EXTERNAL_MODEL_PACKAGE``).

SGLang imports this package in every one of its processes when the environment variable
``SGLANG_EXTERNAL_MODEL_PACKAGE=language_server.engines.sglang.models`` is set, and registers the
``EntryClass`` of each submodule under its class name (``sglang/srt/models/registry.py``). An
import error in a submodule is only logged there, so ``language_server.engines.sglang.engine`` imports the
submodule itself first to surface it.

- ``qwen3_moe_deepstack``: ``Qwen3MoeForCausalLMWithDeepStack`` (with
  ``Qwen3MoeModelWithDeepStack``), the language half of Qwen3-VL-MoE on SGLang's Qwen3-MoE layers.
  It never builds or loads a vision parameter; the visual rows and the DeepStack block arrive
  precomputed from the encode servers.

Only modules in this package (and ``language_server.engines.sglang.engine``) import ``sglang``.
"""

EXTERNAL_PACKAGE = __name__
ARCHITECTURE = "Qwen3MoeForCausalLMWithDeepStack"
