"""The HTTP front door: what a client talks to.

- ``app.py``: the FastAPI app (``/v1/chat/completions``, ``/v1/models``, ``/health``,
  ``/metrics``), body limits, streaming, client disconnects.
- ``chat_request.py``: an untrusted JSON body -> ``ChatRequest`` (or a 4xx).
- ``service.py``: ``ChatService``, one request from parsed body to engine job: prompt, blocks,
  encode jobs, rows, generation.
- ``metrics.py``: Prometheus metrics; ``text.py``: incremental detokenizing, stop strings.

Imports ``prompt``, ``encoders``, ``pool``, ``engines.base`` (never an engine itself) and
``language_server.config``.
"""
