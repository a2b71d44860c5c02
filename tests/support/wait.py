"""Waiting on conditions with a deadline, never on a guessed sleep."""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class DeadlineExceeded(AssertionError):
    pass


def wait_until(
    predicate: Callable[[], T], *, timeout_s: float = 10.0, what: str = "condition"
) -> T:
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what} not reached within {timeout_s}s")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


async def async_wait_until(
    predicate: Callable[[], Awaitable[T]],
    *,
    timeout_s: float = 10.0,
    what: str = "condition",
) -> T:
    """Await ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        value = await predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise DeadlineExceeded(f"{what} not reached within {timeout_s}s")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)
