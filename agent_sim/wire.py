"""Messages an agent sends about itself, and how it waits between reconnects."""

import time
import uuid
from random import Random

from schemas import encode
from schemas.messages import AgentState, AgentStatus, Heartbeat, RegisterRequest
from schemas.topics import Topics


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def status_payload(agent_id: str, online: bool, epoch: int, reason: str) -> bytes:
    state = AgentState.ONLINE if online else AgentState.OFFLINE
    return encode(
        AgentStatus(agent_id=agent_id, state=state, reason=reason, epoch=epoch)
    )


def heartbeat_payload(agent_id: str, seq: int, metrics: dict[str, float]) -> bytes:
    return encode(Heartbeat(agent_id=agent_id, seq=seq, metrics=metrics))


def register_request(
    topics: Topics,
    agent_id: str,
    hostname: str,
    ip_address: str,
    os_name: str,
    *,
    reply_to: str | None = None,
    enrolment_token: str | None = None,
    mqtt_password: str | None = None,
) -> tuple[str, bytes]:
    """A ``RegisterRequest`` keeping ``agent_id``; returns (request_id, payload).

    A first registration carries the enrolment token; a later one the agent's
    own MQTT password (README, "Security").
    """
    request_id = uuid.uuid4().hex
    payload = encode(
        RegisterRequest(
            request_id=request_id,
            reply_to=reply_to or topics.reply(agent_id),
            hostname=hostname[:255] or "unknown",
            ip_address=ip_address,
            os=os_name,
            agent_id=agent_id,
            enrolment_token=None if mqtt_password else enrolment_token,
            mqtt_password=mqtt_password,
        )
    )
    return request_id, payload


class Backoff:
    """Exponential delays with jitter, so a fleet that lost its broker does not
    come back in one synchronised wave."""

    __slots__ = ("attempt", "max_s", "min_s", "rng")

    def __init__(self, min_s: float, max_s: float, rng: Random | None = None) -> None:
        self.min_s = min_s
        self.max_s = max_s
        self.rng = rng or Random()
        self.attempt = 0

    def next_s(self) -> float:
        ceiling = min(self.max_s, self.min_s * 2**self.attempt)
        self.attempt += 1
        return self.rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0
