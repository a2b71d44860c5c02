"""Pure ASGI middleware: the request body limit and per-route counters."""

import json

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bridge_http.errors import BodyTooLarge
from bridge_http.metrics import BridgeMetrics


class BodyLimit:
    """Refuse bodies over ``limit_bytes`` with 413, declared or streamed.

    A declared Content-Length over the limit is answered before anything is
    read; a chunked body is counted as it arrives, and the endpoint reading
    it gets an HTTPException(413), which FastAPI answers as JSON.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared, chunked = _body_headers(scope)
        if declared is not None and declared > self.limit_bytes:
            error = BodyTooLarge(declared, self.limit_bytes)
            await _send_json(send, 413, error.message)
            return
        if not chunked:
            # The server enforces a declared length; leaving ``receive``
            # unwrapped also keeps the server's own disconnect flag in reach
            # of the long poll (see api_agent._client_gone_probe).
            await self.app(scope, receive, send)
            return
        received = 0
        limit = self.limit_bytes

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise HTTPException(413, BodyTooLarge(None, limit).message)
            return message

        await self.app(scope, limited, send)


class CountRequests:
    """Count answered requests by route template (not raw path), method, code."""

    def __init__(self, app: ASGIApp, metrics: BridgeMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.http_requests.labels(path, scope["method"], str(status)).inc()


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """The declared Content-Length, and whether the body comes chunked."""
    length: int | None = None
    chunked = False
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                length = None
        elif name == b"transfer-encoding":
            chunked = True
    return length, chunked


async def _send_json(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
