"""The bridge's Prometheus metrics, in a registry of its own per app."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Long-poll wake-ups are expected in well under a millisecond; the upper
# buckets catch an overloaded event loop.
WAKE_BUCKETS_S = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
)
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class BridgeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter(
            "kbbus_bridge_http_requests",
            "HTTP requests answered, by route template, method and status code.",
            ["route", "method", "code"],
            registry=r,
        )
        self.waiters = Gauge(
            "kbbus_bridge_longpoll_waiters",
            "Long polls currently waiting for a task.",
            registry=r,
        )
        self.wake_latency = Histogram(
            "kbbus_bridge_longpoll_wake_seconds",
            "From a task message reaching the bridge to its waiting poll resuming.",
            buckets=WAKE_BUCKETS_S,
            registry=r,
        )
        self.longpolls = Counter(
            "kbbus_bridge_longpolls",
            "Long polls finished, by outcome (task, pending, empty, gone).",
            ["outcome"],
            registry=r,
        )
        self.rpc_latency = Histogram(
            "kbbus_bridge_rpc_seconds",
            "Round trip of requests answered by the controller, by method.",
            ["method"],
            buckets=RPC_BUCKETS_S,
            registry=r,
        )
        self.rpc_timeouts = Counter(
            "kbbus_bridge_rpc_timeouts",
            "Requests the controller did not answer within the deadline.",
            ["method"],
            registry=r,
        )
        self.results_published = Counter(
            "kbbus_bridge_results_published",
            "Task results published on behalf of HTTP agents.",
            registry=r,
        )
        self.mqtt_connected = Gauge(
            "kbbus_bridge_mqtt_connected",
            "1 while the bridge is connected to the broker.",
            registry=r,
        )
        self.mqtt_messages = Counter(
            "kbbus_bridge_mqtt_messages",
            "Messages received from the broker, by kind and whether accepted.",
            ["kind", "outcome"],
            registry=r,
        )
        self.sse_clients = Gauge(
            "kbbus_bridge_sse_clients",
            "Clients following GET /api/v1/events.",
            registry=r,
        )
        self.sse_dropped = Counter(
            "kbbus_bridge_sse_dropped_events",
            "Events dropped because a slow client's queue was full.",
            registry=r,
        )
