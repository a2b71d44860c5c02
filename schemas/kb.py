"""The KB definition: a knowledge-base remediation runbook as ordered steps."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from schemas.messages import ID_PATTERN

StepId = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class KBStep(BaseModel):
    """One step: an action with templated arguments, a timeout and retries.

    String values in ``args`` are Jinja2 templates rendered with ``params``
    (the workflow's parameters) and ``steps`` (earlier steps' results by id:
    ``steps.flush.output``, ``steps.flush.exit_code``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: StepId
    action: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.]{0,63}$")]
    args: dict[str, Any] = Field(default_factory=dict)
    timeout_s: float = Field(default=30.0, gt=0, le=86400)
    max_attempts: int = Field(default=1, ge=1, le=20)
    backoff_s: float = Field(
        default=1.0, ge=0, le=3600, description="Delay before attempt 2; doubles."
    )
    on_failure: Literal["abort", "continue"] = "abort"


class KBDefinition(BaseModel):
    """A KB file: id, title, typed parameters (JSON Schema) and ordered steps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    v: Literal[1] = 1
    id: StepId
    title: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    description: str = ""
    params: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}},
        description="JSON Schema (draft 2020-12) of the parameters, with defaults.",
    )
    steps: list[KBStep] = Field(min_length=1, max_length=100)

    @model_validator(mode="after")
    def _unique_step_ids(self) -> "KBDefinition":
        seen: set[str] = set()
        for step in self.steps:
            if step.id in seen:
                raise ValueError(f"step id {step.id!r} is used twice")
            seen.add(step.id)
        if self.params.get("type", "object") != "object":
            raise ValueError("params must be a JSON Schema of type 'object'")
        return self
