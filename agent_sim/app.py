"""Entry point: one agent, a fleet, or HTTP agents, as the settings say."""

import json
import logging
import sys
from typing import Any

from agent_sim.settings import Settings

log = logging.getLogger("kbbus.agent")


async def run(settings: Settings) -> None:
    """Run the agents until cancelled; on cancel they say goodbye and stop."""
    if settings.http_url is not None:
        from agent_sim.http_agent import run_http_agents

        await run_http_agents(settings)
    elif settings.count == 1 and not _chaos(settings):
        from agent_sim.runtime import MqttAgent

        await MqttAgent(settings).run()
    else:
        from agent_sim.fleet import Fleet

        await Fleet(settings).run()


def _chaos(settings: Settings) -> bool:
    return settings.chaos_every_s > 0 and (
        settings.chaos_drop > 0
        or settings.chaos_freeze > 0
        or settings.chaos_restart > 0
    )


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
