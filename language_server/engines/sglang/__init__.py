"""``--engine sglang``: SGLang's ``Engine`` in the front door's process, our model in its scheduler.

- ``launch.py``: SGLang's arguments from ``LanguageConfig``, its start-up (our model package
  registered, the pool's spec handed to the scheduler), the registry's ``build``.
- ``engine.py``: ``SGLangEngine`` (``EngineBase``): jobs onto SGLang's loop on its own thread,
  its output streamed back, blocks released when a request ends.
- ``models/``: the package SGLang imports in its processes (``SGLANG_EXTERNAL_MODEL_PACKAGE``):
  ``Qwen3MoeForCausalLMWithDeepStack`` on SGLang's layers and the receive pool's host.

Imports ``engines.base``, ``engines.weights``, ``language_server.config`` and the pool's
``ReceivedPrompt``; never ``engines.reference``. Nothing else in ``language_server`` imports ``sglang``.
"""
