"""The server's Prometheus metrics, through prometheus-client (one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
ENDPOINTS = (
    "/v1/chat/completions",
    "/v1/judge",
    "/v1/critique",
    "/v1/models",
    "/health",
    "/metrics",
)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "verm_requests",
            "Requests by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "verm_request_seconds",
            "Request latency.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("verm_queue_depth", "Requests waiting for the model.", registry=r)
        self.in_flight = Gauge("verm_in_flight", "Requests running in the model.", registry=r)
        self.prefix_hits = Counter(
            "verm_prefix_cache_hits",
            "Requests whose ground-truth prefix was already evaluated.",
            registry=r,
        )
        self.prefix_misses = Counter(
            "verm_prefix_cache_misses", "Ground-truth prefixes evaluated.", registry=r
        )
        self.batches = Counter("verm_batches", "Batches run by the model.", registry=r)
        self.batched_requests = Counter(
            "verm_batched_requests", "Requests run in batches.", registry=r
        )
        self.worker_restarts = Counter(
            "verm_worker_restarts", "Model worker processes restarted after a crash.", registry=r
        )
        self.worker_crashes = Counter(
            "verm_worker_crashes",
            "Model workers killed by a signal, by signal.",
            ["signal"],
            registry=r,
        )
        self.context_tokens = Gauge(
            "verm_context_tokens",
            "Tokens each KV stream of the model's context holds (sized per batch for its "
            "prompts and the answer reserve; 0 before the first batch).",
            registry=r,
        )
        self.context_grows = Counter(
            "verm_context_grows",
            "Times the context grew during a decode because an answer needed more.",
            registry=r,
        )
        self.forward_passes = Counter(
            "verm_forward_passes",
            "Decode steps of answers (one per sequence per decode call; drafted text kept "
            "makes them fewer than the answer tokens).",
            registry=r,
        )
        self.drafted = Counter(
            "verm_drafted_tokens", "Grammar-dictated tokens drafted (speculation).", registry=r
        )
        self.accepted = Counter(
            "verm_accepted_tokens", "Drafted tokens the sampler kept.", registry=r
        )
        self._seen = {k: 0 for k in self._COUNTED}

    _COUNTED = (
        "prefix_hits",
        "prefix_misses",
        "context_grows",
        "forward_passes",
        "drafted",
        "accepted",
    )

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        known = endpoint if endpoint in ENDPOINTS else "other"
        self.requests.labels(known, str(status)).inc()
        self.latency.labels(known).observe(seconds)

    def worker_stats(self, stats: dict[str, int]) -> None:
        """The worker's cumulative counts since it started, as counter increments, and
        its context size."""
        for key in self._COUNTED:
            counter = getattr(self, key)
            if key in stats:
                counter.inc(max(0, stats[key] - self._seen[key]))
                self._seen[key] = stats[key]
        if "context_tokens" in stats:
            self.context_tokens.set(stats["context_tokens"])

    def restarted(self) -> None:
        self.worker_restarts.inc()
        self._seen = {k: 0 for k in self._seen}

    def render(self) -> bytes:
        return generate_latest(self.registry)
