"""Prometheus metrics of the server (text format 0.0.4, no client library): requests by endpoint and status with
a latency histogram and recent quantiles (`RequestMetrics`, recorded by `MetricsMiddleware`), the feature
cache's counters (`cache_lines`) and each batcher's queue depth, batch sizes and refusals (`batcher_lines`)."""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

import numpy as np

from .batching import DynamicBatcher

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def prometheus_response(lines: list[str]):
    """Metric lines -> the GET /metrics answer (a PlainTextResponse)."""
    from fastapi.responses import PlainTextResponse

    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")


def cache_lines(stats: dict[str, Any] | None) -> list[str]:
    """FeatureCache.stats() (None: no cache) -> hits, misses, hit rate, entries, evictions."""
    if stats is None:
        return ["# cache disabled"]
    return [
        "# HELP mmfusion_cache_hits_total Feature cache hits.",
        "# TYPE mmfusion_cache_hits_total counter",
        f"mmfusion_cache_hits_total {stats['hits']}",
        "# HELP mmfusion_cache_misses_total Feature cache misses.",
        "# TYPE mmfusion_cache_misses_total counter",
        f"mmfusion_cache_misses_total {stats['misses']}",
        "# HELP mmfusion_cache_hit_rate Hits / (hits + misses) since start.",
        "# TYPE mmfusion_cache_hit_rate gauge",
        f"mmfusion_cache_hit_rate {stats['hit_rate']:.6f}",
        "# TYPE mmfusion_cache_entries gauge",
        f"mmfusion_cache_entries {stats['entries']}",
        "# TYPE mmfusion_cache_evictions_total counter",
        f"mmfusion_cache_evictions_total {stats['evictions']}",
    ]


def batcher_lines(batchers: dict[str, DynamicBatcher]) -> list[str]:
    """Per batcher (label `encoder`): queue depth, model calls, a batch-size histogram, 503 refusals."""
    lines = [
        "# HELP mmfusion_queue_depth Items waiting in each encoder's batching queue.",
        "# TYPE mmfusion_queue_depth gauge",
    ]
    lines += [f'mmfusion_queue_depth{{encoder="{n}"}} {b.queue_depth}' for n, b in batchers.items()]
    lines += [
        "# HELP mmfusion_model_executions_total Batched model calls.",
        "# TYPE mmfusion_model_executions_total counter",
    ]
    lines += [f'mmfusion_model_executions_total{{encoder="{n}"}} {b.executions}' for n, b in batchers.items()]
    lines += [
        "# HELP mmfusion_batch_size Items per model call.",
        "# TYPE mmfusion_batch_size histogram",
    ]
    for n, b in batchers.items():
        for le in BATCH_BUCKETS:
            count = sum(c for size, c in b.batch_sizes.items() if size <= le)
            lines.append(f'mmfusion_batch_size_bucket{{encoder="{n}",le="{le}"}} {count}')
        lines.append(f'mmfusion_batch_size_bucket{{encoder="{n}",le="+Inf"}} {b.executions}')
        lines.append(f'mmfusion_batch_size_sum{{encoder="{n}"}} {b.items}')
        lines.append(f'mmfusion_batch_size_count{{encoder="{n}"}} {b.executions}')
    lines += [
        "# HELP mmfusion_rejected_total Items refused with 503 (queue_full, timeout).",
        "# TYPE mmfusion_rejected_total counter",
    ]
    for n, b in batchers.items():
        for reason in ("queue_full", "timeout"):
            lines.append(f'mmfusion_rejected_total{{encoder="{n}",reason="{reason}"}} {b.rejected[reason]}')
    return lines


class RequestMetrics:
    """Request counts by (endpoint, status), a latency histogram per endpoint, and recent quantiles."""

    def __init__(self, window: int = 2048):
        self.counts: Counter[tuple[str, int]] = Counter()
        self.buckets: dict[str, list[int]] = {}
        self.sums: Counter[str] = Counter()
        self.recent: dict[str, deque[float]] = {}
        self.window = window
        self.in_flight = 0

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.counts[(endpoint, status)] += 1
        b = self.buckets.setdefault(endpoint, [0] * len(LATENCY_BUCKETS))
        for i, le in enumerate(LATENCY_BUCKETS):
            if seconds <= le:
                b[i] += 1
        self.sums[endpoint] += seconds
        self.recent.setdefault(endpoint, deque(maxlen=self.window)).append(seconds)

    def lines(self) -> list[str]:
        out = [
            "# HELP mmfusion_requests_total HTTP requests by endpoint and status.",
            "# TYPE mmfusion_requests_total counter",
        ]
        out += [
            f'mmfusion_requests_total{{endpoint="{e}",status="{s}"}} {n}'
            for (e, s), n in sorted(self.counts.items())
        ]
        out += [
            "# HELP mmfusion_request_duration_seconds Request latency.",
            "# TYPE mmfusion_request_duration_seconds histogram",
        ]
        for e, b in sorted(self.buckets.items()):
            total = sum(n for (ep, _), n in self.counts.items() if ep == e)
            out += [
                f'mmfusion_request_duration_seconds_bucket{{endpoint="{e}",le="{le}"}} {c}'
                for le, c in zip(LATENCY_BUCKETS, b)
            ]
            out.append(f'mmfusion_request_duration_seconds_bucket{{endpoint="{e}",le="+Inf"}} {total}')
            out.append(f'mmfusion_request_duration_seconds_sum{{endpoint="{e}"}} {self.sums[e]:.6f}')
            out.append(f'mmfusion_request_duration_seconds_count{{endpoint="{e}"}} {total}')
        out += [
            f"# HELP mmfusion_request_latency_seconds Latency quantiles over the last {self.window} requests.",
            "# TYPE mmfusion_request_latency_seconds summary",
        ]
        for e, r in sorted(self.recent.items()):
            arr = np.asarray(r)
            for q in (0.5, 0.9, 0.99):
                out.append(
                    f'mmfusion_request_latency_seconds{{endpoint="{e}",quantile="{q}"}} {np.quantile(arr, q):.6f}'
                )
            out.append(f'mmfusion_request_latency_seconds_sum{{endpoint="{e}"}} {arr.sum():.6f}')
            out.append(f'mmfusion_request_latency_seconds_count{{endpoint="{e}"}} {arr.size}')
        out += ["# TYPE mmfusion_requests_in_flight gauge", f"mmfusion_requests_in_flight {self.in_flight}"]
        return out


class MetricsMiddleware:
    """Pure ASGI middleware: time each HTTP request and count it under its route template and status."""

    def __init__(self, app, metrics: RequestMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [500]

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight -= 1
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "other"
            self.metrics.observe(endpoint, status[0], time.perf_counter() - start)


__all__ = [
    "MetricsMiddleware",
    "RequestMetrics",
    "batcher_lines",
    "cache_lines",
    "prometheus_response",
]
