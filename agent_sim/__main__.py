"""``python -m agent_sim --mqtt-url mqtt://host:port --count N ...``"""

import asyncio
import contextlib
import signal

from agent_sim.app import configure_logging, run
from agent_sim.settings import Settings


async def _main(settings: Settings) -> None:
    task = asyncio.current_task()
    assert task is not None
    # SIGTERM (containers, process managers) stops the agents the way Ctrl-C
    # does: cancelled, so they publish offline before disconnecting.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run(settings)


def main() -> None:
    settings = Settings(_cli_parse_args=True, _cli_implicit_flags=True)
    configure_logging(settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(settings))


if __name__ == "__main__":
    main()
