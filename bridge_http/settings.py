"""Bridge settings: flags, or environment variables prefixed ``KBBUS_``."""

import os
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import DEFAULT_ROOT


class Settings(BaseSettings):
    """Everything ``python -m bridge_http`` and ``kbbus bridge`` accept."""

    model_config = SettingsConfigDict(
        env_prefix="KBBUS_",
        cli_kebab_case=True,
        # Boolean flags as bare switches: --open-enrolment, --no-sign-tasks.
        cli_implicit_flags=True,
        # "kbbus bridge" when run through the kbbus command.
        cli_prog_name=os.environ.get("KBBUS_CLI_PROG", "python -m bridge_http"),
        extra="ignore",
    )

    mqtt_url: str = Field(
        default="mqtt://127.0.0.1:1883", description="The broker, mqtt://host:port."
    )
    host: str = Field(default="127.0.0.1", description="Address to serve HTTP on.")
    port: int = Field(default=8080, ge=0, le=65535, description="HTTP port.")
    topic_root: str = Field(default=DEFAULT_ROOT, description="Root of all topics.")
    request_timeout_s: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="Deadline for a controller reply or a broker acknowledgement.",
    )
    client_id: str | None = Field(
        default=None, description="MQTT client id; kbbus-bridge-<random> if unset."
    )
    disconnect_check_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often a waiting long poll checks that its client is there.",
    )
    max_body_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Largest request body accepted."
    )
    # Protection (README, "Security"). Unset tokens leave their endpoints open.
    operator_token: SecretStr | None = Field(
        default=None,
        description="Bearer token the operator endpoints (trigger, cancel, "
        "look-ups, events) require.",
    )
    agent_secret: SecretStr | None = Field(
        default=None,
        description="The controller's agent secret: agent endpoints then require "
        "the agent's own bearer token.",
    )
    enrolment_token: SecretStr | None = Field(
        default=None,
        description="Registration requires this bearer token (the controller "
        "checks it too).",
    )
    register_rate_per_s: float = Field(
        default=10.0,
        ge=0,
        description="Registrations per second per client "
        "address, sustained; 0 = no limit.",
    )
    register_burst: int = Field(
        default=100, ge=1, description="Registrations per client address at once."
    )
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
