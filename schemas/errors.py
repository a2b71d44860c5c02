"""The exception tree shared by every kbbus package.

``KbbusError`` is the root: callers that want "anything kbbus refused" catch it.

- ``MessageError``: a payload could not be turned into a message (not JSON, not
  the right shape, an unknown schema version).
  - ``PayloadTooLarge``: the payload is over the size limit; it was not parsed.
- ``TopicError``: a topic string is not one of ours.
"""


class KbbusError(Exception):
    """Root of every error raised on purpose by kbbus."""


class MessageError(KbbusError):
    """A payload is not a valid message of the expected kind."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        #: A short stable label for metrics (``malformed_json``, ``schema`` ...).
        self.reason = reason


class PayloadTooLarge(MessageError):
    """A payload is larger than the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"Payload of {size} bytes is over the limit of {limit} bytes; "
            "send less output or raise the limit.",
            reason="oversized",
        )
        self.size = size
        self.limit = limit


class TopicError(KbbusError):
    """A topic does not belong to the kbbus topic tree."""
