"""Prometheus metrics of one language server (its own registry, served at /metrics)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, cache: Any = None, encoders: Any = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        if cache is not None:
            r.register(_CacheCollector(cache))
        if encoders is not None:
            r.register(_EncoderCacheCollector(encoders))
        self.requests = Counter(
            "epd_requests",
            "Chat requests by HTTP status (499: the client went "
            "away and its generation was cancelled)",
            ["status"],
            registry=r,
        )
        self.ttft = Histogram(
            "epd_ttft_seconds", "Time to first token", buckets=_LATENCY, registry=r
        )
        self.latency = Histogram(
            "epd_request_seconds", "Whole request", buckets=_LATENCY, registry=r
        )
        self.transfer_bytes = Counter("epd_transfer_bytes", "Bytes received on the data plane",
                                      registry=r)  # fmt: skip
        self.transfer_seconds = Histogram("epd_transfer_seconds", "Data-plane write time per request",
                                          buckets=_LATENCY, registry=r)  # fmt: skip
        self.tokens = Counter("epd_generated_tokens", "Generated tokens", registry=r)
        self.pool_free = Gauge("epd_pool_free_blocks", "Free receive blocks", registry=r)
        self.pool_total = Gauge("epd_pool_blocks", "Receive blocks in the pool", registry=r)
        self.pool_peak = Gauge(
            "epd_pool_peak_used_blocks", "Most blocks in use at once", registry=r
        )
        self.waiting = Gauge("epd_alloc_waiting", "Requests waiting for blocks", registry=r)


class _CacheCollector:
    """The image cache's own counters (``pool/cache.py``), read at each scrape."""

    def __init__(self, cache: Any) -> None:
        self.cache = cache

    def collect(self) -> Any:
        c = self.cache
        yield CounterMetricFamily("epd_image_cache_hits", "Images served from resident rows",
                                  value=c.hits)  # fmt: skip
        yield CounterMetricFamily("epd_image_cache_misses", "Images encoded and sent",
                                  value=c.misses)  # fmt: skip
        yield CounterMetricFamily("epd_image_cache_saved_bytes",
                                  "Data-plane bytes not sent because the rows were resident",
                                  value=c.hit_tokens * c.bytes_per_token)  # fmt: skip
        yield CounterMetricFamily("epd_image_cache_evictions", "Resident images evicted",
                                  value=c.evictions)  # fmt: skip
        yield GaugeMetricFamily("epd_image_cache_resident_blocks", "Blocks resident images hold",
                                value=c.blocks)  # fmt: skip

    def describe(self) -> list[Any]:
        return []


class _EncoderCacheCollector:
    """The encoders' cache hits as this server counted them per link (``EncoderLink``)."""

    def __init__(self, encoders: Any) -> None:
        self.encoders = encoders

    def collect(self) -> Any:
        yield CounterMetricFamily(
            "epd_encoder_cache_hits",
            "Images an encoder served from its cache of ViT outputs (sent again, not encoded)",
            value=sum(link.cache_hits for link in self.encoders.links),
        )

    def describe(self) -> list[Any]:
        return []
