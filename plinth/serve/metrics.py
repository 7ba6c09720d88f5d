"""Prometheus metrics for /metrics: request counts, token counts, batch size, queue depth, and
time-to-first-token / inter-token latency histograms (rendered by `prometheus_client`)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

ROUTES = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
          "/v1/images/generations"}
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class EngineCollector:
    """Reads the engine's counters at scrape time (the engine thread alone writes them)."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        s = self.engine.stats
        for name, value, doc in [("prompt_tokens", s.prompt_tokens, "Prompt tokens admitted"),
                                 ("generation_tokens", s.generated_tokens, "Tokens generated"),
                                 ("requests_finished", s.finished, "Generation requests finished"),
                                 ("requests_cancelled", s.cancelled, "Generation requests cancelled (client gone)"),
                                 ("requests_failed", s.failed, "Generation requests failed"),
                                 ("engine_steps", s.steps, "Engine steps run")]:
            yield CounterMetricFamily(f"plinth_{name}", doc, value=value)
        for name, value, doc in [("batch_size", s.last_batch, "Sequences in the last batched forward pass"),
                                 ("running", len(self.engine.running), "Sequences holding a KV-cache slot"),
                                 ("queue_depth", self.engine.queue_depth, "Requests waiting for a slot"),
                                 ("threads", self.engine.threads_in_use,
                                  "Model compute threads (fewer while other processes keep a core busy)"),
                                 ("compiled", int(self.engine.decoder is not None),
                                  "1 while decoding goes through compiled programs, 0 while eager")]:
            yield GaugeMetricFamily(f"plinth_{name}", doc, value=value)


class Metrics:
    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(engine))
        self.requests = Counter("plinth_http_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.ttft = Histogram("plinth_time_to_first_token_seconds", "Time to first token",
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.itl = Histogram("plinth_inter_token_latency_seconds", "Time between tokens of a sequence",
                             buckets=LATENCY_BUCKETS, registry=self.registry)

    def request(self, path: str, status: int):
        route = path if path in ROUTES else "other"  # a fixed label set: unknown paths must not add series
        self.requests.labels(route, str(status)).inc()

    def token_latency(self, seconds: float, first: bool):
        (self.ttft if first else self.itl).observe(seconds)

    def render(self) -> str:
        return generate_latest(self.registry).decode()
