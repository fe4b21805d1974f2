"""cluster/grafana/engram-memory-dashboard.json queries metrics that exist, under the names Prometheus sees.

The metric names, kinds, tag keys and histogram buckets come from the code itself: the shards'
``RayMetricsExporter`` (memory_service/metrics.py) and the clients' ``ClientMetrics``
(compute/memory/client_metrics.py) are built against a stand-in for ``ray.util.metrics`` that records
what they define. Ray exports a custom metric NAME as ``ray_NAME`` to Prometheus; a Counter as
``ray_NAME_total``; a Histogram as ``ray_NAME_bucket`` / ``_sum`` / ``_count``. The ``method`` values the
panels select must be ones the servicer or the client records.
"""
from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "cluster" / "grafana" / "engram-memory-dashboard.json"
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "avg", "max", "min",
                "count", "on", "ignoring", "le", "label_values", "topk", "bottomk", "clamp_min", "or", "and", "unless"}
RAY_STANDARD_LABELS = {"ip", "Component", "instance", "job", "SessionName", "NodeAddress", "le"}


@pytest.fixture(scope="module")
def defined_metrics() -> dict[str, dict]:
    """name -> {kind, tag_keys, boundaries, source} for every Ray metric that the shards
    (memory_service/metrics.py) and the clients (compute/memory/client_metrics.py) define."""
    import ray
    import ray.util

    from compute.memory import client_metrics
    from memory_service import metrics as shard_metrics

    defined: dict[str, dict] = {}
    source = ""

    def recorder(kind):
        class Metric:
            def __init__(self, name, description="", boundaries=None, tag_keys=()):
                self.tag_keys = set(tag_keys)
                defined[name] = {"kind": kind, "tag_keys": self.tag_keys, "boundaries": boundaries, "source": source}

            def set_default_tags(self, tags):
                assert set(tags) <= self.tag_keys, f"default tags {tags} outside {self.tag_keys}"

        return Metric

    fake = types.SimpleNamespace(Counter=recorder("counter"), Gauge=recorder("gauge"), Histogram=recorder("histogram"))
    original, initialized = getattr(ray.util, "metrics", None), ray.is_initialized
    ray.util.metrics = fake  # what `from ray.util import metrics` inside the exporters picks up
    ray.is_initialized = lambda: True  # the client records metrics only inside Ray
    try:
        source = "shard"
        shard_metrics.RayMetricsExporter(shard_index=0)
        source = "client"
        client_metrics.ClientMetrics()
    finally:
        ray.is_initialized = initialized
        if original is None:
            del ray.util.metrics
        else:
            ray.util.metrics = original
    assert {spec["source"] for spec in defined.values()} == {"shard", "client"}
    return defined


def _prometheus_series(defined: dict[str, dict]) -> dict[str, tuple[str, dict]]:
    """Prometheus series name -> (metric name in metrics.py, its definition)."""
    series = {}
    for name, spec in defined.items():
        base = f"ray_{name}"
        if spec["kind"] == "counter":
            series[f"{base}_total"] = (name, spec)
        elif spec["kind"] == "histogram":
            for suffix in ("_bucket", "_sum", "_count"):
                series[base + suffix] = (name, spec)
        else:
            series[base] = (name, spec)
    return series


def _recorded_methods() -> set[str]:
    """The ``method`` tag values recorded: the servicer's, one per ``@_handler("...")``, and the client's."""
    servicer = (ROOT / "memory_service" / "servicer.py").read_text()
    client = (ROOT / "compute" / "memory" / "client.py").read_text()
    return set(re.findall(r'@_handler\("([a-z_]+)"\)', servicer)) | set(re.findall(r'_metrics\.record\("([a-z_]+)"', client))


def _dashboard() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def _exprs(dashboard: dict) -> list[tuple[str, str]]:
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def _metric_names(expr: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    without_labels = re.sub(r"\{[^}]*\}", "", without_strings)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_labels)
    without_groupings = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_ranges)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", without_groupings))
    return {n for n in names if n not in PROMQL_WORDS and not n.startswith("__")}


def test_the_metrics_carry_the_tags_the_dashboard_is_about(defined_metrics):
    kinds = {spec["kind"] for spec in defined_metrics.values()}
    assert {"counter", "histogram", "gauge"} <= kinds
    for spec in defined_metrics.values():  # shards: per request by method, state per shard; clients: by method
        expected = {"shard"} if spec["kind"] == "gauge" else {"shard", "method"}
        assert spec["tag_keys"] == (expected if spec["source"] == "shard" else {"method"})


def test_every_expression_names_a_metric_that_exists(defined_metrics):
    series = _prometheus_series(defined_metrics)
    exprs = _exprs(_dashboard())
    assert exprs
    for title, expr in exprs:
        names = _metric_names(expr)
        assert names, f"{title}: no metric in {expr!r}"
        for name in names:
            assert name in series, f"{title}: {name} is defined by neither the shards nor the clients"


def test_every_metric_of_the_module_is_on_the_dashboard(defined_metrics):
    used = set().union(*(_metric_names(e) for _, e in _exprs(_dashboard())))
    series = _prometheus_series(defined_metrics)
    shown = {series[name][0] for name in used if name in series}
    assert shown == set(defined_metrics)


def test_labels_and_methods_are_those_the_metrics_carry(defined_metrics):
    series = _prometheus_series(defined_metrics)
    methods = _recorded_methods()
    assert {"lookup", "update"} <= methods
    for title, expr in _exprs(_dashboard()):
        names = _metric_names(expr) & set(series)
        if not names:
            continue
        tag_keys = set().union(*(series[n][1]["tag_keys"] for n in names))
        for grouping in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (l.strip() for l in grouping.split(",")):
                assert label in tag_keys | RAY_STANDARD_LABELS, f"{title}: no label {label}"
        for matcher in re.findall(r"\{([^}]*)\}", expr):
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', matcher):
                assert label in tag_keys | RAY_STANDARD_LABELS, f"{title}: no label {label}"
                if label == "method":
                    for method in value.split("|"):
                        assert method in methods, f"{title}: the servicer records no method {method!r}"


def test_latency_quantiles_use_the_histogram_buckets(defined_metrics):
    histograms = {f"ray_{n}_bucket": spec for n, spec in defined_metrics.items() if spec["kind"] == "histogram"}
    quantile_exprs = [(t, e) for t, e in _exprs(_dashboard()) if "histogram_quantile" in e]
    quantiles = {float(q) for _, e in quantile_exprs for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)", e)}
    assert {0.5, 0.99} <= quantiles
    assert any('method="lookup"' in e for _, e in quantile_exprs)
    for title, expr in quantile_exprs:
        assert _metric_names(expr) & set(histograms), f"{title}: a quantile needs a _bucket series"
        assert re.search(r"by\s*\([^)]*\ble\b", expr), f"{title}: sum by le, or the quantile is meaningless"
    for name, spec in histograms.items():  # a panel on each histogram tells the precision its buckets give
        described = [panel for panel in _dashboard()["panels"] if "buckets" in panel["description"]
                     and any(name in target["expr"] for target in panel["targets"])]
        assert described, f"no panel lists the buckets of {name}"
        for panel in described:
            assert len(spec["boundaries"]) == len(re.findall(r"\d+(?:\.\d+)? m?s\b", panel["description"])), \
                panel["title"]


def test_required_panels_exist():
    titles = [panel["title"].lower() for panel in _dashboard()["panels"]]
    for words in (("lookups/s", "shard"), ("updates/s", "shard"), ("rows/s",), ("bytes",), ("lookup latency", "p99")):
        assert any(all(w in t for w in words) for t in titles), words
    dashboard = _dashboard()
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
