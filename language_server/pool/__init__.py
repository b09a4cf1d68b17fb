"""The receive pool's lender: blocks lent per image job, what arrived checked, blocks taken back only
when their writer is done (the rule in ``transfer/base.py``).

- ``leases.py``: ``Pending`` (a request's images), ``Lease`` (one image's blocks), their states,
  ``ReceivedPrompt`` (what an engine gets), ``RequestError``.
- ``receiver.py``: ``Receiver``: lending (all of a request's blocks or none, a queue for room).
- ``arrivals.py``: messages from encoders, checked against the lending, rows verified.
- ``lifetimes.py``: endings: rows handed to the engine, failures, dead and restarted writers.
- ``host_link.py``: ``PoolHostLink``, the front door's channel to a pool held where the model
  runs (SGLang's scheduler process).

Imports only ``protocol`` and ``transfer``: no other subpackage of ``language_server``.
"""
