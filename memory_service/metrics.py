"""Request counters, lookup latency percentiles and state gauges of one shard, optionally mirrored to
Ray's metrics (which Ray's dashboard exports to Prometheus; cluster/grafana/ draws them)."""
from __future__ import annotations

import collections
import time

import numpy as np

RATE_WINDOW_S = 10.0
LATENCY_SAMPLES = 4096


class ShardMetrics:
    """Counts requests and keeps the most recent lookup latencies for p50/p99."""

    def __init__(self, exporter: "RayMetricsExporter | None" = None):
        self.requests_total = 0
        self._recent_requests: collections.deque[float] = collections.deque()
        self._lookup_seconds: collections.deque[float] = collections.deque(maxlen=LATENCY_SAMPLES)
        self._exporter = exporter

    def record(self, method: str, seconds: float, rows: int, wire_bytes: int = 0) -> None:
        """One served request: its latency, the rows it looked up or updated, the row bytes it carried."""
        now = time.monotonic()
        self.requests_total += 1
        self._recent_requests.append(now)
        if method == "lookup":
            self._lookup_seconds.append(seconds)
        if self._exporter is not None:
            self._exporter.record(method, seconds, rows, wire_bytes)

    def set_state(self, held_bytes: int, pending_steps: int) -> None:
        """The shard's rows and optimizer state in bytes, and its synchronous steps still waiting for ranks."""
        if self._exporter is not None:
            self._exporter.set_state(held_bytes, pending_steps)

    def requests_per_s(self) -> float:
        horizon = time.monotonic() - RATE_WINDOW_S
        while self._recent_requests and self._recent_requests[0] < horizon:
            self._recent_requests.popleft()
        return len(self._recent_requests) / RATE_WINDOW_S

    def lookup_percentiles_ms(self) -> tuple[float, float]:
        """(p50, p99) over the recent lookups; zeros before the first."""
        if not self._lookup_seconds:
            return 0.0, 0.0
        p50, p99 = np.percentile(np.fromiter(self._lookup_seconds, dtype=np.float64), [50, 99]) * 1e3
        return float(p50), float(p99)


class RayMetricsExporter:
    """Mirrors shard metrics to Ray's metrics API (scraped by Prometheus with the Ray dashboard)."""

    def __init__(self, shard_index: int):
        from ray.util import metrics  # imported here: the row-serving path must not need Ray

        tags = {"shard": str(shard_index)}
        self._requests = metrics.Counter("engram_memory_requests", "gRPC requests served", tag_keys=("shard", "method"))
        self._rows = metrics.Counter("engram_memory_rows", "rows looked up or updated", tag_keys=("shard", "method"))
        self._wire_bytes = metrics.Counter("engram_memory_wire_bytes", "row and gradient bytes served or received",
                                           tag_keys=("shard", "method"))
        self._latency = metrics.Histogram(
            "engram_memory_latency_s", "request latency in seconds",
            boundaries=[1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0], tag_keys=("shard", "method"),
        )
        self._held_bytes = metrics.Gauge("engram_memory_held_bytes", "bytes of rows and optimizer state held",
                                         tag_keys=("shard",))
        self._pending_steps = metrics.Gauge("engram_memory_pending_steps",
                                            "synchronous steps waiting for some rank's push", tag_keys=("shard",))
        for metric in (self._requests, self._rows, self._wire_bytes, self._latency, self._held_bytes,
                       self._pending_steps):
            metric.set_default_tags(tags)

    def record(self, method: str, seconds: float, rows: int, wire_bytes: int) -> None:
        tags = {"method": method}
        self._requests.inc(1, tags)
        if rows:
            self._rows.inc(rows, tags)
        if wire_bytes:
            self._wire_bytes.inc(wire_bytes, tags)
        self._latency.observe(seconds, tags)

    def set_state(self, held_bytes: int, pending_steps: int) -> None:
        self._held_bytes.set(held_bytes)
        self._pending_steps.set(pending_steps)
