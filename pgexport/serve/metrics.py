"""`GET /metrics`: Prometheus text, named after vLLM's where they mean the same.

Histograms (seconds; server-side, from the request's arrival):
  pgexport_time_to_first_token_seconds, pgexport_inter_token_latency_seconds (every gap between
  two tokens of a request), pgexport_e2e_request_latency_seconds, pgexport_request_queue_time_seconds
  (submitted to the engine -> holding a row). Finished requests only (stop or length).
Gauges (read at scrape time):
  pgexport_num_requests_running (holding a row), pgexport_num_requests_waiting (accepted, not yet
  in a row: image decoding or the queue), pgexport_batch_rows_used, pgexport_batch_rows_max.
Counters:
  pgexport_prompt_tokens_total, pgexport_generation_tokens_total,
  pgexport_requests_total{finish_reason} (stop, length, cancelled, error),
  pgexport_request_errors_total{status} (every response with status >= 400, and errors inside a stream as 500).

Each app has its own registry, so several servers can live in one process (tests, Ray replicas).

    >>> metrics = Metrics(lambda: (0, 0, 0, 8))
    >>> b"pgexport_batch_rows_max 8.0" in metrics.render()
    True
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pgexport.engine import Request

# 1 ms (a small model's decode step) to 10 minutes (a long queue on a 3B model), roughly x2 apart.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5,
                   2.0, 3.0, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The server's Prometheus metrics. `load()` returns (running, waiting, rows used, rows max)."""

    def __init__(self, load: Callable[[], tuple[int, int, int, int]]):
        self.registry = r = CollectorRegistry()
        self.ttft = Histogram("pgexport_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("pgexport_inter_token_latency_seconds", "Gap between two consecutive tokens of a request.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("pgexport_e2e_request_latency_seconds", "Request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue = Histogram("pgexport_request_queue_time_seconds", "Submitted to the engine until it holds a row.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("pgexport_prompt_tokens", "Prompt tokens (image tokens included) of finished "
                                     "requests.", registry=r)
        self.generation_tokens = Counter("pgexport_generation_tokens", "Generated tokens.", registry=r)
        self.requests = Counter("pgexport_requests", "Requests that reached the engine, by finish reason.",
                                ["finish_reason"], registry=r)
        self.errors = Counter("pgexport_request_errors", "Responses with an error status (and errors inside a "
                              "stream, as 500).", ["status"], registry=r)
        gauges = {"pgexport_num_requests_running": "Requests holding a row of the batch.",
                  "pgexport_num_requests_waiting": "Requests accepted and not yet in a row (image decoding, queue).",
                  "pgexport_batch_rows_used": "Rows of the engine's KV buffer in use.",
                  "pgexport_batch_rows_max": "Rows of the engine's KV buffer (--max-batch)."}
        for i, (name, doc) in enumerate(gauges.items()):
            Gauge(name, doc, registry=r).set_function(lambda i=i: load()[i])

    def finished(self, request: Request, arrived: float) -> None:
        """Record a request the engine finished (`arrived`: time.perf_counter() when the HTTP request came)."""
        result = request.result(timeout=0)
        self.requests.labels(result.finish_reason).inc()
        self.generation_tokens.inc(result.completion_tokens)
        if result.finish_reason not in ("stop", "length"):
            return
        self.prompt_tokens.inc(result.prompt_tokens)
        timing = request.timing
        times = timing.token_times
        if times:
            self.ttft.observe(times[0] - arrived)
            for a, b in zip(times, times[1:]):
                self.itl.observe(b - a)
        if timing.finished is not None:
            self.e2e.observe(timing.finished - arrived)
        if timing.admitted is not None:
            self.queue.observe(timing.admitted - timing.submitted)

    def error(self, status: int) -> None:
        self.errors.labels(str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class CountErrors:
    """ASGI middleware: every response with status >= 400 counted in `metrics.errors` by status,
    whoever answered (a route, the API-key check, the router's 404)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def counting_send(message):
            if message["type"] == "http.response.start" and message["status"] >= 400:
                self.metrics.error(message["status"])
            await send(message)

        await self.app(scope, receive, counting_send)
