"""Flags of ``python -m agent_sim`` (and ``kbbus agents``); env prefix ``KBBUS_``."""

import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import DEFAULT_ROOT

DEFAULT_EXEC_ALLOW = "dns.flush,dns.resolve,disk.usage,diagnostics.collect,sleep,echo"


class Settings(BaseSettings):
    """One agent or a fleet of simulated agents, over MQTT or the HTTP bridge."""

    model_config = SettingsConfigDict(
        env_prefix="KBBUS_",
        extra="ignore",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        # "kbbus agents" when run through the kbbus command.
        cli_prog_name=os.environ.get("KBBUS_CLI_PROG", "python -m agent_sim"),
    )

    mqtt_url: str = "mqtt://127.0.0.1:1883"
    http_url: str | None = Field(
        default=None, description="Speak HTTP to the bridge instead of MQTT."
    )
    topic_root: str = DEFAULT_ROOT
    enrolment_token: SecretStr | None = Field(
        default=None,
        description="The operator's enrolment token, for a first registration.",
    )
    count: int = Field(default=1, ge=1, le=100_000)
    keepalive_s: int = Field(default=10, ge=1, le=65535)
    heartbeat_s: float = Field(default=10.0, gt=0)
    state_dir: Path = Path("./.kbbus/agents")
    hostname: str = Field(default_factory=socket.gethostname)
    # How many finished tasks each agent remembers (ids and results).
    max_finished: int = Field(default=64, ge=1, le=10_000)

    # Simulated actions.
    fail_rate: float = Field(default=0.0, ge=0.0, le=1.0)
    latency_ms: float = Field(default=0.0, ge=0.0, description="Mean action latency.")
    latency_dist: Literal["fixed", "uniform", "exponential"] = "fixed"
    seed: int | None = None

    # Real actions.
    exec: bool = Field(default=False, description="Run allow-listed actions for real.")
    exec_allow: str = Field(
        default=DEFAULT_EXEC_ALLOW, description="Comma-separated actions --exec runs."
    )
    action_timeout_s: float = Field(default=300.0, gt=0)
    cleanup_roots: str = Field(
        default="", description="Comma-separated dirs disk.cleanup may touch."
    )

    # Connections.
    ramp_per_s: float = Field(default=500.0, ge=0, description="0 = no limit.")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    register_timeout_s: float = Field(default=5.0, gt=0)
    reconnect_min_s: float = Field(default=0.5, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    max_inflight: int = Field(default=20, ge=1)
    max_queued: int = Field(default=200, ge=1)
    poll_timeout_s: float = Field(default=30.0, gt=0, le=60)

    # Fleet output and chaos.
    summary_interval_s: float = Field(default=2.0, ge=0, description="0 = off.")
    chaos_every_s: float = Field(default=0.0, ge=0, description="0 = no chaos.")
    chaos_drop: float = Field(default=0.0, ge=0, le=1)
    chaos_freeze: float = Field(default=0.0, ge=0, le=1)
    chaos_restart: float = Field(default=0.0, ge=0, le=1)
    chaos_down_s: float = Field(default=30.0, ge=0)

    log_format: Literal["text", "json"] = "text"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _check_urls(self) -> "Settings":
        url = urlsplit(self.mqtt_url)
        if url.scheme not in ("mqtt", "tcp", "mqtts", "ssl") or not url.hostname:
            raise ValueError(
                f"--mqtt-url {self.mqtt_url!r} is not mqtt://host:port; "
                "give e.g. mqtt://127.0.0.1:1883."
            )
        if self.http_url is not None:
            h = urlsplit(self.http_url)
            if h.scheme not in ("http", "https") or not h.hostname:
                raise ValueError(
                    f"--http-url {self.http_url!r} is not http(s)://host:port."
                )
        return self

    @property
    def mqtt_host(self) -> str:
        return urlsplit(self.mqtt_url).hostname or "127.0.0.1"

    @property
    def mqtt_port(self) -> int:
        return urlsplit(self.mqtt_url).port or 1883

    @property
    def exec_allowed(self) -> frozenset[str]:
        return frozenset(a.strip() for a in self.exec_allow.split(",") if a.strip())

    @property
    def cleanup_dirs(self) -> tuple[Path, ...]:
        return tuple(
            Path(p.strip()).resolve()
            for p in self.cleanup_roots.split(",")
            if p.strip()
        )
