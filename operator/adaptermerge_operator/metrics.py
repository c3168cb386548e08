"""The operator's Prometheus metrics (prometheus_client), served on /metrics (docs/operator.md, "Metrics").

- adaptermerge_merges{namespace,phase,reason}: AdapterMerges by phase and Ready reason, read at scrape
  time from an index kopf keeps current (so it is right after a restart and after deletions);
- adaptermerge_merge_queue_seconds / _run_seconds: Job created -> worker running, and the Job's start
  -> the verdict, observed once per generation when its status reaches that point;
- adaptermerge_jobs_created_total{namespace}, adaptermerge_api_errors_total{operation,code},
  adaptermerge_reconcile_seconds{handler}; plus prometheus_client's process metrics (RSS, CPU).
"""

from __future__ import annotations

import calendar
import functools
import time
from typing import Any, Awaitable, Callable, Iterable, Mapping, TypeVar

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
# Merges take seconds (tiny adapters) to hours (large models, long queues).
DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, float("inf"))

QUEUE_SECONDS = Histogram(
    "adaptermerge_merge_queue_seconds", "Seconds from the Job's creation until its worker pod runs.",
    buckets=DURATION_BUCKETS,
)
RUN_SECONDS = Histogram(
    "adaptermerge_merge_run_seconds", "Seconds from the Job's start until the merge's verdict.",
    ["phase"], buckets=DURATION_BUCKETS,
)
JOBS_CREATED = Counter("adaptermerge_jobs_created", "Merge Jobs the operator created.", ["namespace"])
API_ERRORS = Counter(
    "adaptermerge_api_errors", "Kubernetes API calls of the operator that failed.", ["operation", "code"]
)
RECONCILE_SECONDS = Histogram(
    "adaptermerge_reconcile_seconds", "Seconds a handler took (spec changes, Job and pod events).", ["handler"]
)


class MergeCollector(Collector):
    """adaptermerge_merges from kopf's index {(namespace, phase, reason): [uid, ...]}, read when scraped."""

    def __init__(self, index: Mapping[Any, Iterable[Any]]):
        self.index = index

    def collect(self):
        family = GaugeMetricFamily(
            "adaptermerge_merges", "AdapterMerges by phase and Ready reason.", labels=["namespace", "phase", "reason"]
        )
        for (namespace, phase, reason), uids in list(self.index.items()):
            family.add_metric([namespace, phase, reason], len(list(uids)))
        yield family


def verdict_key(namespace: str, status: Mapping[str, Any] | None) -> tuple[str, str, str]:
    """(namespace, phase, Ready reason) of a resource's status; a new resource counts as Pending."""
    status = status or {}
    ready = next((c for c in status.get("conditions") or [] if c.get("type") == "Ready"), {})
    return namespace, status.get("phase") or "Pending", ready.get("reason") or ""


def serve(port: int, merges_index: Mapping[Any, Iterable[Any]]) -> None:
    """Starts the /metrics endpoint (a daemon thread of prometheus_client) on all addresses."""
    REGISTRY.register(MergeCollector(merges_index))
    start_http_server(port)


def _seconds(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    return float(calendar.timegm(time.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ")))


def observe_status_change(
    previous: Mapping[str, Any], desired: Mapping[str, Any], job: Mapping[str, Any] | None, now: str
) -> None:
    """Queue and run durations, once each per generation: when the phase first turns Running, and
    when it first turns Succeeded or Failed (the caller passes only written status changes)."""
    phase, before = desired.get("phase"), previous.get("phase")
    same_generation = previous.get("observedGeneration") == desired.get("observedGeneration")
    if phase == before and same_generation:
        return
    if phase == "Running" and job is not None:
        created = _seconds((job.get("metadata") or {}).get("creationTimestamp"))
        if created is not None:
            QUEUE_SECONDS.observe(max(0.0, _seconds(now) - created))
    if phase in ("Succeeded", "Failed"):
        start, end = _seconds(desired.get("startTime")), _seconds(desired.get("completionTime"))
        if start is not None and end is not None:
            RUN_SECONDS.labels(phase).observe(max(0.0, end - start))


def count_api_error(operation: str, code: int | str | None) -> None:
    API_ERRORS.labels(operation, str(code or "none")).inc()


def count_job_created(namespace: str) -> None:
    JOBS_CREATED.labels(namespace).inc()


def timed(handler: str) -> Callable[[F], F]:
    """Decorator: the handler's latency into adaptermerge_reconcile_seconds{handler}."""

    def decorate(fn: F) -> F:
        histogram = RECONCILE_SECONDS.labels(handler)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            with histogram.time():
                return await fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
