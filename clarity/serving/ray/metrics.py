"""Clarity's metrics on a Ray cluster: recorded with Ray's metrics API, served summed by the ingress.

Every process of the application (ingress replicas, upscaler replicas, the job actor) calls `install()`
first: the API core's recording functions (api/metrics.py) then record into Ray's application metrics
(`ray.util.metrics`), one per `SPECS` entry, with the same name, help, labels and buckets. Ray's metrics agent
on each node exports them on the node's metrics export port as `ray_<name>`, with Ray's own tags added
(`NodeAddress`, `WorkerId`, `Component`, `SessionName`, `Version`, OpenTelemetry's `otel_scope_*`).

`GET /metrics` on the ingress (`cluster_exposition`) reads the export of every alive node (`ray.nodes()`),
keeps the Clarity series, drops Ray's prefix and every label that is not the spec's, and adds up the series
that differed only by those, as prometheus_client's multiprocess mode adds up the processes of one machine:
counters and histograms are summed, gauges combined by their spec's mode (`GAUGE_COMBINE`). No library merges
Prometheus expositions (Prometheus itself would, with `sum without (...)` in every query of the dashboard), so
that merge is written here, on prometheus_client's parser and its metric families.

How Ray differs (README, "Operating it"): values reach the export every `metrics_report_interval_ms` (10 s by
default); a histogram's `_sum` is Ray's estimate from bucket midpoints; a node that does not answer is left out
of the scrape (logged, and counted in `UNREADABLE_NODES`).

prometheus_client is imported where it is used, never at import time: the LitServe runtime's multiprocess mode
must be set before its first import, and the tests run both runtimes in one process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import httpx2 as httpx
import ray
from ray.util import metrics as ray_metrics

from clarity.api import metrics
from clarity.api.metrics import SPECS, MetricSpec

logger = logging.getLogger(__name__)

#: What Ray's metrics agent puts in front of an application metric's name.
RAY_PREFIX = "ray_"
#: Seconds between two re-recordings of every gauge. Ray's agent drops a gauge series not recorded again within
#: two export intervals (at least 1 s each), so a gauge set once would vanish; a process that dies stops
#: re-recording, so its gauges vanish too (prometheus_client's "live" modes).
GAUGE_REFRESH_SECONDS = 1.0
#: Seconds the ingress waits for one node's metrics.
NODE_TIMEOUT_SECONDS = 5.0
#: A metric of the scrape itself, on Ray only: nodes whose metrics it could not read.
UNREADABLE_NODES = "clarity_metrics_unreadable_nodes"
#: How a gauge's series from several processes combine, by its spec's multiprocess mode. No timestamps cross
#: Ray's export, so "most recent" is the largest: its one writer (the job actor) overlaps with a dead one's
#: series only for the seconds those take to vanish after a restart.
GAUGE_COMBINE: dict[str, Callable[[list[float]], float]] = {"livesum": sum, "livemax": max, "livemostrecent": max}
#: The samples of a histogram, by the suffix of their names.
HISTOGRAM_PARTS = ("_bucket", "_sum", "_count")


class RayRecorder:
    """The API core's `Recorder` on Ray: a `ray.util.metrics` metric per spec, in this process.

    A `device` label names the node too (`10.0.0.5/0`): device indexes repeat on every machine of a cluster.
    """

    def __init__(self) -> None:
        kinds = {"counter": ray_metrics.Counter, "gauge": ray_metrics.Gauge}
        self.metrics: dict[str, Any] = {
            spec.name: ray_metrics.Histogram(spec.name, spec.help, list(spec.buckets), spec.labels)
            if spec.kind == "histogram" else kinds[spec.kind](spec.name, spec.help, spec.labels)
            for spec in SPECS}
        self.node = ray.util.get_node_ip_address()
        self.gauges: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.lock = threading.Lock()  # over `gauges` and their recording, so a refresh never records a stale value
        threading.Thread(target=self._refresh_gauges, name="clarity-metrics-gauges", daemon=True).start()

    def _tags(self, labels: dict[str, str]) -> dict[str, str] | None:
        if "device" in labels:
            labels = {**labels, "device": f"{self.node}/{labels['device']}"}
        return labels or None

    def inc(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        self.metrics[spec.name].inc(amount, tags=self._tags(labels))

    def observe(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        self.metrics[spec.name].observe(value, tags=self._tags(labels))

    def set(self, spec: MetricSpec, value: float, labels: dict[str, str]) -> None:
        with self.lock:
            self._set(spec.name, frozenset(labels.items()), value)

    def add(self, spec: MetricSpec, amount: float, labels: dict[str, str]) -> None:
        with self.lock:
            key = frozenset(labels.items())
            self._set(spec.name, key, self.gauges.get((spec.name, key), 0.0) + amount)

    def _set(self, name: str, labels: frozenset[tuple[str, str]], value: float) -> None:
        self.gauges[name, labels] = value
        self.metrics[name].set(value, tags=self._tags(dict(labels)))

    def _refresh_gauges(self) -> None:
        while True:
            time.sleep(GAUGE_REFRESH_SECONDS)
            with self.lock:
                for (name, labels), value in self.gauges.items():
                    self.metrics[name].set(value, tags=self._tags(dict(labels)))


_installed: RayRecorder | None = None


def install() -> None:
    """Record this process's Clarity metrics with Ray (once per process; the replicas and the job actor call it
    in their constructors)."""
    global _installed
    if _installed is None:
        _installed = RayRecorder()
        metrics.install_recorder(_installed)


# --- the ingress's side: the cluster's series, read, merged and rendered -----------------------------------


#: Merged series of one metric: (sample suffix, the spec's label values, a bucket's `le`) -> the values to combine.
Series = dict[tuple[str, tuple[str, ...], float | None], list[float]]


def merge(families: Iterable[Any]) -> dict[str, Series]:
    """The Clarity series among the metric families prometheus_client's parser read from Ray's exports, by
    Clarity's metric name: Ray's prefix and every label but the spec's dropped, the values of series that
    differed only by those gathered to be combined (`combine`). Other families, and families whose type is not
    the spec's, are left out."""
    specs = {RAY_PREFIX + spec.name: spec for spec in SPECS}
    merged: dict[str, Series] = defaultdict(lambda: defaultdict(list))
    for family in families:
        for sample in family.samples:
            spec, suffix = _spec_of(specs, sample.name)
            if spec is None or family.type != spec.kind:
                continue
            le = float(sample.labels["le"]) if suffix == "_bucket" else None
            key = (suffix, tuple(sample.labels.get(label, "") for label in spec.labels), le)
            merged[spec.name][key].append(sample.value)
    return merged


def _spec_of(specs: dict[str, MetricSpec], sample: str) -> tuple[MetricSpec | None, str]:
    """The spec a sample's name belongs to, and its histogram suffix ("" for a counter's or gauge's sample)."""
    if sample in specs and specs[sample].kind != "histogram":
        return specs[sample], ""
    for suffix in HISTOGRAM_PARTS:
        spec = specs.get(sample.removesuffix(suffix)) if sample.endswith(suffix) else None
        if spec is not None and spec.kind == "histogram":
            return spec, suffix
    return None, ""


def combine(spec: MetricSpec, values: list[float]) -> float:
    """One value from the processes' values of one series: a sum, or for a gauge its mode's combination."""
    return GAUGE_COMBINE.get(spec.mode, sum)(values) if spec.kind == "gauge" else sum(values)


def render(merged: dict[str, Series], unreadable_nodes: int) -> bytes:
    """`merged` in Prometheus' text format, as prometheus_client renders the metrics of one machine."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

    families: list[Any] = []
    for spec in SPECS:
        series = merged.get(spec.name)
        if not series:
            continue
        if spec.kind == "histogram":
            families.append(family := HistogramMetricFamily(spec.name, spec.help, labels=spec.labels))
            for labels, (buckets, total) in _histograms(spec, series).items():
                family.add_metric(labels, buckets, total)
            continue
        kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
        families.append(family := kind(spec.name, spec.help, labels=spec.labels))
        for (_, labels, _), values in sorted(series.items()):
            family.add_metric(labels, combine(spec, values))
    families.append(GaugeMetricFamily(UNREADABLE_NODES, "Nodes of the Ray cluster whose metrics this scrape could"
                                      " not read: their processes' series are missing from it.", unreadable_nodes))
    registry = CollectorRegistry()
    registry.register(_Families(families))
    return generate_latest(registry)


def _histograms(spec: MetricSpec, series: Series) -> dict[tuple[str, ...], tuple[list[tuple[str, float]], float]]:
    """A histogram's buckets (`le` as prometheus_client writes it, cumulative counts) and sum, by label values."""
    buckets: dict[tuple[str, ...], list[tuple[float, float]]] = defaultdict(list)
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for (suffix, labels, le), values in series.items():
        if suffix == "_bucket" and le is not None:
            buckets[labels].append((le, sum(values)))
        elif suffix == "_sum":
            sums[labels] += sum(values)
    return {labels: ([(_le_text(le), count) for le, count in sorted(found)], sums[labels])
            for labels, found in sorted(buckets.items())}


def _le_text(le: float) -> str:
    """A bucket bound as prometheus_client writes it ("+Inf", "0.25", "10.0") for SPECS' bounds."""
    return "+Inf" if le == float("inf") else repr(le)


class _Families:
    """A prometheus_client collector of families built already (its documented custom-collector interface)."""

    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> list[Any]:
        return self.families


async def cluster_exposition() -> tuple[bytes, str]:
    """The Clarity metrics of every alive node of the cluster, merged, in Prometheus' text format, and its
    content type. A node whose export cannot be read or parsed is left out, with a warning."""
    from prometheus_client import CONTENT_TYPE_LATEST

    nodes = await asyncio.to_thread(_export_endpoints)
    async with httpx.AsyncClient(timeout=NODE_TIMEOUT_SECONDS) as client:
        texts = await asyncio.gather(*(_read(client, url) for url in nodes))
    # In a thread: parsing every node's export takes a while, and the event loop serves every request.
    return await asyncio.to_thread(merged_exposition, dict(zip(nodes, texts, strict=True))), CONTENT_TYPE_LATEST


def _export_endpoints() -> list[str]:
    """The metrics export endpoint of every alive node, from Ray's node table."""
    return [str(httpx.URL(scheme="http", host=node["NodeManagerAddress"], port=node["MetricsExportPort"],
                          path="/metrics"))
            for node in ray.nodes() if node["Alive"]]


async def _read(client: httpx.AsyncClient, url: str) -> str | None:
    """The text of one node's export; None (with a warning) if it cannot be read."""
    try:
        response = await client.get(url)
        response.raise_for_status()
    except httpx.HTTPError as error:
        logger.warning("metrics at %s not read (%s): that node's series are missing from this scrape", url, error)
        return None
    return response.text


def merged_exposition(texts: dict[str, str | None]) -> bytes:
    """The rendered merge of the nodes' exports `texts` (None: not read) by their URLs."""
    from prometheus_client.parser import text_string_to_metric_families

    families: list[Any] = []
    unreadable = 0
    for url, text in texts.items():
        if text is None:
            unreadable += 1
            continue
        try:
            families.extend(list(text_string_to_metric_families(text)))  # whole, or nothing of the node
        except ValueError as error:
            unreadable += 1
            logger.warning("metrics at %s not parsed (%s): that node's series are missing from this scrape", url,
                           error)
    return render(merge(families), unreadable)
