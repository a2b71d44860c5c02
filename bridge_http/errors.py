"""The bridge's exceptions, all answered over HTTP with a JSON ``detail``.

``BridgeError`` is the root; each subclass carries the HTTP status it maps to.

- ``BusUnavailable`` (503): the bridge is not connected to the broker, or the
  broker did not acknowledge a publish in time.
- ``ControllerTimeout`` (503): the controller did not answer a request in time.
- ``ControllerRefused``: the controller answered with an error; its
  ``ErrorCode`` picks the status (404, 409, 422, 503, 502).
- ``BodyTooLarge`` (413): a request body or the message made of it is over
  the size limit.
- ``Unauthorized`` (401): no bearer token where one is required.
- ``Forbidden`` (403): a bearer token that is not the right one.
- ``TooManyRequests`` (429): over a rate limit; ``Retry-After`` says when.
- ``CannotServe``: the bridge cannot listen on its address (at start, not
  over HTTP).
"""

import math

from schemas.messages import ErrorCode

_STATUS_BY_CODE = {
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.INVALID: 422,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.UNAUTHORIZED: 403,
    # The controller failed on its side: the bridge itself is fine.
    ErrorCode.INTERNAL: 502,
}


class BridgeError(Exception):
    """Root of the errors the bridge answers with a status other than 500."""

    status_code = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.headers: dict[str, str] = {}


class BusUnavailable(BridgeError):
    status_code = 503


class ControllerTimeout(BridgeError):
    status_code = 503

    def __init__(self, method: str, timeout_s: float) -> None:
        super().__init__(
            f"The controller did not answer the {method} request within "
            f"{timeout_s:g} s; check that a controller is running and connected "
            "to the broker, then retry."
        )
        self.method = method


class ControllerRefused(BridgeError):
    @classmethod
    def malformed(cls, what: str) -> "ControllerRefused":
        """The controller answered, but not with what the request needs."""
        return cls(ErrorCode.INTERNAL, f"The controller sent a malformed {what}.")

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status_code = _STATUS_BY_CODE.get(code, 502)


class BodyTooLarge(BridgeError):
    status_code = 413

    def __init__(self, size: int | None, limit: int) -> None:
        what = f"{size} bytes" if size is not None else "more bytes"
        super().__init__(
            f"The request body of {what} is over the limit of {limit} bytes; "
            "send less output."
        )


class Unauthorized(BridgeError):
    status_code = 401

    def __init__(self, what: str) -> None:
        super().__init__(
            f"This endpoint needs {what}: send the header "
            "'Authorization: Bearer <token>'."
        )
        self.headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(BridgeError):
    status_code = 403

    def __init__(self, what: str) -> None:
        super().__init__(f"The bearer token is not {what}.")
        self.headers = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


class TooManyRequests(BridgeError):
    status_code = 429

    def __init__(self, retry_after_s: float) -> None:
        seconds = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"Too many registrations from this address; retry in {seconds} s."
        )
        self.headers = {"Retry-After": str(seconds)}


class CannotServe(BridgeError):
    def __init__(self, host: str, port: int, reason: object) -> None:
        super().__init__(
            f"The bridge cannot listen on {host}:{port} ({reason}); choose another "
            "--port, or stop what uses it."
        )
