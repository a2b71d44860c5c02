"""What a committed transition asks to be published, in order."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    """One MQTT publish to make after the transaction that produced it commits."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
