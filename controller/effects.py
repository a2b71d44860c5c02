"""What a committed transition asks to be published, in order."""

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Publish:
    """One MQTT publish to make after the transaction that produced it commits."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    #: On a step.finished event: the step's final status and its seconds from
    #: dispatch; on workflow.finished: the workflow's final status. Counted in
    #: the metrics once the transition is committed, never before.
    step_finished: tuple[str, float] | None = None
    workflow_finished: str | None = None
