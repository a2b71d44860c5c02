"""Bridge settings: flags, or environment variables prefixed ``KBBUS_``."""

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import DEFAULT_ROOT


class Settings(BaseSettings):
    """Everything ``python -m bridge_http`` and ``kbbus bridge`` accept."""

    model_config = SettingsConfigDict(
        env_prefix="KBBUS_",
        cli_kebab_case=True,
        cli_prog_name="bridge_http",
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
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"
