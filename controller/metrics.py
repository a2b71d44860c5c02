"""The controller's Prometheus metrics, on a registry of its own.

Each ``Metrics`` has its own ``CollectorRegistry``, so several controllers in
one process (the tests) count separately.
"""

import threading
from collections.abc import Callable, Iterable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from controller.db import ACTIVE_WORKFLOW_STATES
from controller.effects import Publish

AGENT_STATES = ("online", "offline")
#: For the controller's own work: a sweep, a flush, a transaction.
WORK_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: For a step, from dispatch to its end (timeouts reach minutes).
STEP_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.agents = Gauge(
            "kbbus_agents", "Registered agents by status.", ["status"], registry=r
        )
        self.heartbeats = Counter(
            "kbbus_heartbeats_ingested",
            "Heartbeats written to the database (after coalescing per agent).",
            registry=r,
        )
        self.heartbeat_messages = Counter(
            "kbbus_heartbeat_messages",
            "Heartbeat messages accepted from the bus, before coalescing.",
            registry=r,
        )
        self.rejected = Counter(
            "kbbus_messages_rejected",
            "Messages refused, by reason and channel.",
            ["reason", "channel"],
            registry=r,
        )
        self.dropped = Counter(
            "kbbus_messages_dropped",
            "QoS 0 messages dropped because the incoming queue was full.",
            registry=r,
        )
        self.processed = Counter(
            "kbbus_messages_processed",
            "Messages processed, by channel.",
            ["channel"],
            registry=r,
        )
        self.transitions = Counter(
            "kbbus_agent_transitions",
            "Presence transitions, by new state and reason.",
            ["state", "reason"],
            registry=r,
        )
        self.sweep_seconds = Histogram(
            "kbbus_presence_sweep_duration_seconds",
            "Time of one presence sweep (the UPDATE and its publishes).",
            buckets=WORK_SECONDS,
            registry=r,
        )
        self.heartbeat_flush_seconds = Histogram(
            "kbbus_heartbeat_flush_duration_seconds",
            "Time of one batched heartbeat write.",
            buckets=WORK_SECONDS,
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "kbbus_rpc_duration_seconds",
            "Time from a request's arrival to its commit, by method.",
            ["method"],
            registry=r,
        )
        self.workflows = Gauge(
            "kbbus_workflows",
            "Workflows not finished yet, by status (refreshed each sweep).",
            ["status"],
            registry=r,
        )
        self.workflows_finished = Counter(
            "kbbus_workflows_finished",
            "Workflows finished, by final status.",
            ["status"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "kbbus_step_duration_seconds",
            "From a step's dispatch to its end (result, timeout or cancel), "
            "by final status.",
            ["status"],
            buckets=STEP_SECONDS,
            registry=r,
        )
        self.published = Counter(
            "kbbus_messages_published",
            "Messages the broker acknowledged, by kind (tasks, status, events, ...).",
            ["kind"],
            registry=r,
        )
        self.db_batch_size = Histogram(
            "kbbus_db_batch_size",
            "Messages applied in one database transaction, by channel.",
            ["channel"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
            registry=r,
        )
        self.db_seconds = Histogram(
            "kbbus_db_transaction_seconds",
            "Time of one batched database transaction, by channel.",
            ["channel"],
            buckets=WORK_SECONDS,
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "kbbus_controller_mqtt_connected",
            "1 while the controller is connected to the broker.",
            registry=r,
        )
        for state in AGENT_STATES:
            self.agents.labels(state).set(0)
        for state in ACTIVE_WORKFLOW_STATES:
            self.workflows.labels(state).set(0)

    def set_agent_counts(self, counts: dict[str, int]) -> None:
        for state in AGENT_STATES:
            self.agents.labels(state).set(counts.get(state, 0))

    def set_workflow_counts(self, counts: dict[str, int]) -> None:
        for state in ACTIVE_WORKFLOW_STATES:
            self.workflows.labels(state).set(counts.get(state, 0))

    def committed(self, effects: Iterable[Publish]) -> None:
        """Count what a committed transition finished."""
        for effect in effects:
            if effect.step_finished is not None:
                status, seconds = effect.step_finished
                self.step_seconds.labels(status).observe(seconds)
            if effect.workflow_finished is not None:
                self.workflows_finished.labels(effect.workflow_finished).inc()

    def batch(self, channel: str, size: int, seconds: float) -> None:
        self.db_batch_size.labels(channel).observe(size)
        self.db_seconds.labels(channel).observe(seconds)

    def reject(self, reason: str, channel: str) -> None:
        self.rejected.labels(reason, channel).inc()

    def value(self, name: str, labels: dict[str, str] | None = None) -> float:
        """A sample's current value (0 when absent); for tests and logs."""
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def serve(self, host: str, port: int) -> Callable[[], None]:
        """Serve ``/metrics`` over HTTP on ``host:port``; returns a stop function."""
        server: WSGIServer
        thread: threading.Thread
        server, thread = start_http_server(port, host, registry=self.registry)

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        return stop
