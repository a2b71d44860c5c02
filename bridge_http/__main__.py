"""``python -m bridge_http --mqtt-url mqtt://host:1883 --port 8080``."""

import asyncio
import contextlib
import signal
import sys

from pydantic_settings import CliApp

from bridge_http import logs
from bridge_http.app import run
from bridge_http.errors import CannotServe
from bridge_http.settings import Settings


async def _main(settings: Settings) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await run(settings)


def main() -> None:
    settings = CliApp.run(Settings)
    logs.configure(settings.log_format, settings.log_level)
    try:
        asyncio.run(_main(settings))
    except CannotServe as exc:
        print(f"{Settings.model_config['cli_prog_name']}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
