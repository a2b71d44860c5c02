"""Flags of ``python -m controller`` and ``kbbus controller``; env prefix ``KBBUS_``."""

import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from controller.credentials import Enrolment
from schemas.topics import DEFAULT_ROOT


class Settings(BaseSettings):
    """The controller: agents, presence and workflows over MQTT, state in a database."""

    model_config = SettingsConfigDict(
        env_prefix="KBBUS_",
        extra="ignore",
        cli_kebab_case=True,
        # Boolean flags as bare switches: --open-enrolment, --no-sign-tasks.
        cli_implicit_flags=True,
        # "kbbus controller" when run through the kbbus command.
        cli_prog_name=os.environ.get("KBBUS_CLI_PROG", "python -m controller"),
    )

    mqtt_url: str = Field(
        default="mqtt://127.0.0.1:1883", description="mqtt://[user:password@]host:port"
    )
    db_url: str = Field(
        default="sqlite:///./.kbbus/kbbus.db",
        description="SQLAlchemy URL; PostgreSQL as postgresql+psycopg://...",
    )
    topic_root: str = DEFAULT_ROOT
    client_id: str = Field(
        default="kbbus-controller-main",
        description="MQTT client id; keep it stable so the broker keeps the session.",
    )
    kb_dir: Path | None = Field(default=None, description="Extra KB definition files.")

    # Presence.
    offline_after_s: float = Field(
        default=30.0, gt=0, description="Offline when silent this long (timer)."
    )
    sweep_interval_s: float = Field(
        default=5.0, gt=0, description="How often the timer looks."
    )

    # Processing.
    tick_interval_s: float = Field(default=0.5, gt=0, description="Engine timer.")
    heartbeat_flush_ms: float = Field(default=150.0, gt=0)
    heartbeat_flush_size: int = Field(default=2000, ge=1)
    batch_size: int = Field(default=200, ge=1, description="Messages per transaction.")
    max_queued_incoming: int = Field(
        default=20_000, ge=1, description="QoS 0 messages buffered before dropping."
    )
    max_inflight_publishes: int = Field(default=200, ge=1)
    mqtt_keepalive_s: int = Field(default=30, ge=1, le=65535)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)

    # Task signing and HTTP agent tokens (see controller/signing.py).
    signing_key_dir: Path = Field(
        default=Path("./.kbbus/keys"),
        description="Ed25519 task-signing keys; a key is made on first start.",
    )
    sign_tasks: bool = Field(
        default=True,
        description="Sign every task; false only for an open lab (agents that "
        "already hold keys refuse unsigned tasks).",
    )
    signing_key_check_s: float = Field(
        default=5.0, gt=0, description="How often to look for rotated keys."
    )
    agent_secret: SecretStr | None = Field(
        default=None,
        description="Secret the agents' MQTT passwords and HTTP tokens are derived "
        "from; the bridge and the embedded broker need the same one. Unset: no "
        "credentials are issued.",
    )

    # Security (README, "Security"): one of the first two is required.
    enrolment_token: SecretStr | None = Field(
        default=None, description="New agents must register with this token."
    )
    open_enrolment: bool = Field(
        default=False,
        description="Lab mode: anyone may register, no credentials are issued.",
    )
    mosquitto_dynsec: bool = Field(
        default=False,
        description="Create each agent's account in Mosquitto's dynamic-security "
        "plugin (the controller's account must be its admin).",
    )

    metrics_port: int = Field(default=0, ge=0, le=65535, description="0 = off.")
    metrics_host: str = "127.0.0.1"
    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_mqtt_url(self) -> "Settings":
        url = urlsplit(self.mqtt_url)
        if url.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not url.hostname:
            raise ValueError(
                f"--mqtt-url {self.mqtt_url!r} is not mqtt://host:port; "
                "give e.g. mqtt://127.0.0.1:1883 (or mqtts:// for TLS)."
            )
        return self

    @model_validator(mode="after")
    def _check_enrolment(self) -> "Settings":
        # Never open by accident: an operator says which it is.
        if self.enrolment_token is None and not self.open_enrolment:
            raise ValueError(
                "the controller needs --enrolment-token (KBBUS_ENROLMENT_TOKEN), "
                "or --open-enrolment to let anyone register (a lab only)."
            )
        if self.enrolment_token is not None and self.open_enrolment:
            # Given both (an inherited KBBUS_OPEN_ENROLMENT, say), the safer one
            # wins.
            self.open_enrolment = False
        if (
            self.enrolment_token is not None
            and not self.enrolment_token.get_secret_value()
        ):
            raise ValueError("--enrolment-token must not be empty.")
        return self

    def enrolment(self) -> Enrolment:
        token = self.enrolment_token
        secret = self.agent_secret
        return Enrolment(
            token=None if token is None else token.get_secret_value(),
            agent_secret=None if secret is None else secret.get_secret_value(),
        )

    @property
    def mqtt_host(self) -> str:
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port(self) -> int:
        return urlsplit(self.mqtt_url).port or 1883
