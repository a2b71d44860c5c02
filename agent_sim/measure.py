"""Measure a fleet: connect rate and memory per agent.

``python -m agent_sim.measure --mqtt-url mqtt://127.0.0.1:PORT --count 10000``
starts the fleet in this process, waits until every agent has connected and
published ``online``, prints the figures as JSON and stops the fleet cleanly.
Run it against a broker of its own: every agent is a real connection.
"""

import asyncio
import contextlib
import gc
import json
import time
from typing import Any

import psutil

from agent_sim.fleet import Fleet
from agent_sim.settings import Settings

ONLINE_TIMEOUT_S = 600.0


async def measure(settings: Settings) -> dict[str, Any]:
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    fleet = Fleet(settings)
    running = asyncio.create_task(fleet.run())
    started = time.monotonic()
    try:
        async with asyncio.timeout(ONLINE_TIMEOUT_S):
            await fleet.all_connected.wait()
            await fleet.all_online.wait()
        online_s = time.monotonic() - started
        gc.collect()
        rss_after = process.memory_info().rss
    finally:
        running.cancel()
        stop_started = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await running
        stop_s = time.monotonic() - stop_started
    connected_s = fleet.all_connected_s or 0.0
    return {
        "agents": settings.count,
        "connected_s": round(connected_s, 3),
        "connects_per_s": round(settings.count / max(connected_s, 1e-9), 1),
        "online_s": round(online_s, 3),
        "rss_before_mib": round(rss_before / 2**20, 1),
        "rss_after_mib": round(rss_after / 2**20, 1),
        "rss_per_agent_kib": round((rss_after - rss_before) / settings.count / 1024, 1),
        "stop_s": round(stop_s, 3),
        "reconnects": fleet.counters.reconnects,
    }


def main() -> None:
    settings = Settings(_cli_parse_args=True, _cli_implicit_flags=True)
    print(json.dumps(asyncio.run(measure(settings))))


if __name__ == "__main__":
    main()
