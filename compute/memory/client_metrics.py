"""The client's side of the memory service: rows and row bytes per method, and as Ray metrics call latency too.

The Ray metrics are recorded only in processes where Ray is initialised (training and serving workers),
whose metrics Ray's dashboard exports to Prometheus next to the shards' (cluster/grafana/ draws both);
the totals are kept in every process, for a job's own report and the benchmarks.
"""
from __future__ import annotations

import collections
import sys
import threading

LATENCY_BOUNDARIES_S = [1e-4, 5e-4, 1e-3, 5e-3, 1e-2, 5e-2, 0.1, 0.5, 1.0, 5.0]


class ClientMetrics:
    """Counts one client's rows and row bytes by method (``lookup``, ``pull``: rows a push brought back,
    ``lookup_state``, ``push``: gradients, ``read_shared``: rows read from shards' shared memory, no wire bytes);
    outside Ray only in ``totals``."""

    def __init__(self):
        self._totals: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self._lock = threading.Lock()
        ray = sys.modules.get("ray")
        self._enabled = ray is not None and ray.is_initialized()
        if not self._enabled:
            return
        from ray.util import metrics

        self._latency = metrics.Histogram("engram_client_latency_s", "memory-service call latency seen by a client",
                                          boundaries=LATENCY_BOUNDARIES_S, tag_keys=("method",))
        self._rows = metrics.Counter("engram_client_rows", "rows a client looked up or pushed", tag_keys=("method",))
        self._wire_bytes = metrics.Counter("engram_client_wire_bytes", "row and gradient bytes a client moved",
                                           tag_keys=("method",))

    def totals(self) -> dict[str, dict[str, int]]:
        """``{method: {"calls", "rows", "bytes"}}`` since the client was made."""
        with self._lock:
            return {method: dict(counts) for method, counts in self._totals.items()}

    def record(self, method: str, seconds: float | None, rows: int, wire_bytes: int) -> None:
        """One call of ``method``; ``seconds`` None where it was no call of its own (rows a push brought back)."""
        with self._lock:
            self._totals[method].update(calls=1, rows=rows, bytes=wire_bytes)
        if not self._enabled:
            return
        tags = {"method": method}
        if seconds is not None:
            self._latency.observe(seconds, tags)
        if rows:  # Ray's counters take only positive increments; an empty call moves none
            self._rows.inc(rows, tags)
        if wire_bytes:  # rows read out of shared memory cross no wire
            self._wire_bytes.inc(wire_bytes, tags)
