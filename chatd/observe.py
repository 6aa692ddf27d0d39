"""Metrics: a Prometheus collector that reads chatd's live counters at scrape time
(nothing on the hot path), and a GC pause recorder.

Python's cyclic collector stops the event loop while it walks objects; with tens of
thousands of connections a full collection can take a second (DESIGN.md §8). chatd
freezes long-lived objects (app.py) and records every collection's pause here so
operators and `chatd bench` can see the worst one.
"""

from __future__ import annotations

import gc
import time
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily


class GcPauses:
    """Times each collection through gc.callbacks; install once per process."""

    def __init__(self) -> None:
        self.max_seconds = [0.0, 0.0, 0.0]
        self.total_seconds = [0.0, 0.0, 0.0]
        self.collections = [0, 0, 0]
        self._started = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        generation = info["generation"]
        self.collections[generation] += 1
        self.total_seconds[generation] += pause
        if pause > self.max_seconds[generation]:
            self.max_seconds[generation] = pause

    def install(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def reset(self) -> None:
        self.max_seconds = [0.0, 0.0, 0.0]

    @property
    def max_pause_ms(self) -> float:
        return max(self.max_seconds) * 1000


class ChatdCollector:
    """Prometheus collector over a running app.Server."""

    def __init__(self, server: Any, gc_pauses: GcPauses) -> None:
        self.server = server
        self.gc = gc_pauses

    def collect(self) -> Iterator[Any]:
        service = self.server.service
        yield GaugeMetricFamily("chatd_connections", "Authenticated WebSocket sessions.", value=len(service.sessions))
        yield GaugeMetricFamily("chatd_users_online", "Users with at least one session.", value=len(service.rooms.by_user))
        yield CounterMetricFamily("chatd_deliveries", "Frames handed to outboxes by fan-out.", value=service.rooms.deliveries)
        yield CounterMetricFamily("chatd_slow_consumers", "Deliveries refused because an outbox overflowed.", value=service.rooms.slow_consumers)
        yield CounterMetricFamily("chatd_writer_batches", "Group-commit transactions committed.", value=service.writer.batches)
        yield CounterMetricFamily("chatd_writer_mutations", "Durable mutations committed.", value=service.writer.committed)
        yield CounterMetricFamily("chatd_writer_lingered", "Batches that waited writer.linger for more mutations before starting.", value=service.writer.lingered)
        errors_by_code = CounterMetricFamily("chatd_command_errors", "Commands (hello included) answered with an error frame, by error code.", labels=["code"])
        for code, count in sorted(service.command_errors.items()):
            errors_by_code.add_metric([code], count)
        yield errors_by_code
        pending = service.writer._send.statistics().current_buffer_used
        yield GaugeMetricFamily("chatd_writer_queue", "Mutations waiting for the writer.", value=pending)
        merges = service.search_merges
        yield CounterMetricFamily("chatd_search_merges", "Background merges of the search index's pending list.", value=merges.merges)
        yield CounterMetricFamily("chatd_search_merged_pages", "Pending-list pages those merges moved into the search index.", value=merges.pages)
        yield CounterMetricFamily("chatd_search_merge_failures", "Background merges of the search index's pending list that failed.", value=merges.failures)
        pool = self.server.db.pool
        yield GaugeMetricFamily("chatd_db_connections_in_use", "Pooled database connections borrowed.", value=pool.in_use)
        gc_max = GaugeMetricFamily("chatd_gc_max_pause_seconds", "Longest garbage-collector pause.", labels=["generation"])
        gc_count = CounterMetricFamily("chatd_gc_collections", "Garbage collections.", labels=["generation"])
        gc_time = CounterMetricFamily("chatd_gc_pause_seconds", "Time spent in garbage collection.", labels=["generation"])
        for generation in range(3):
            gc_max.add_metric([str(generation)], self.gc.max_seconds[generation])
            gc_count.add_metric([str(generation)], self.gc.collections[generation])
            gc_time.add_metric([str(generation)], self.gc.total_seconds[generation])
        yield gc_max
        yield gc_count
        yield gc_time
        yield GaugeMetricFamily("chatd_draining", "1 while the server drains.", value=int(self.server.draining))


def metrics_text(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
