"""The controller's Prometheus metrics, on a registry of its own.

Each ``Metrics`` has its own ``CollectorRegistry``, so several controllers in
one process (the tests) count separately.
"""

import threading
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

AGENT_STATES = ("online", "offline")


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
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.heartbeat_flush_seconds = Histogram(
            "kbbus_heartbeat_flush_duration_seconds",
            "Time of one batched heartbeat write.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.rpc_seconds = Histogram(
            "kbbus_rpc_duration_seconds",
            "Time from a request's arrival to its commit, by method.",
            ["method"],
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "kbbus_controller_mqtt_connected",
            "1 while the controller is connected to the broker.",
            registry=r,
        )
        for state in AGENT_STATES:
            self.agents.labels(state).set(0)

    def set_agent_counts(self, counts: dict[str, int]) -> None:
        for state in AGENT_STATES:
            self.agents.labels(state).set(counts.get(state, 0))

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
