"""``python -m controller --mqtt-url ... --db-url ...``: run the controller."""

import asyncio
import contextlib
import logging
import signal
import sys

from pydantic import ValidationError

from controller.app import run
from controller.logs import setup_logging
from controller.settings import Settings
from schemas.errors import KbbusError


async def _main(settings: Settings) -> None:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    # SIGTERM and Ctrl-C cancel run(), which shuts down cleanly.
    with contextlib.suppress(asyncio.CancelledError):
        await run(settings)


def main() -> None:
    try:
        settings = Settings(_cli_parse_args=True)
    except ValidationError as exc:
        # A missing or contradictory flag: one line per problem, no traceback.
        for error in exc.errors():
            print(
                f"{Settings.model_config['cli_prog_name']}: {error['msg']}",
                file=sys.stderr,
            )
        raise SystemExit(2) from None
    setup_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_main(settings))
    except KbbusError as exc:
        # A broken KB file and the like: one clear line, not a traceback.
        logging.getLogger("kbbus.controller").error("cannot start: %s", exc)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
