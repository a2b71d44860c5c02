"""The FastAPI app and the process that serves it."""

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Generator

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from bridge_http import api_agent, api_ops
from bridge_http.core import Bridge
from bridge_http.deps import BridgeDep
from bridge_http.errors import BridgeError, CannotServe
from bridge_http.middleware import BodyLimit, CountRequests
from bridge_http.models import Health
from bridge_http.settings import Settings

log = logging.getLogger("kbbus.bridge")

# Parked polls are released before uvicorn waits for connections, so this
# only bounds requests stuck on a controller or broker deadline.
GRACEFUL_SHUTDOWN_S = 10


def create_app(settings: Settings) -> FastAPI:
    """The bridge app; its lifespan owns the MQTT connection."""
    bridge = Bridge(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bridge.start()
        try:
            yield
        finally:
            await bridge.stop()

    app = FastAPI(
        title="kbbus HTTP bridge",
        version="1.0.0",
        description=(
            "The original service's HTTP endpoints for agents and operators, "
            "mapped onto kbbus MQTT topics."
        ),
        lifespan=lifespan,
        # A path with a stray slash is an unknown path (404 JSON), not a
        # redirect that scripts posting bodies would not follow.
        redirect_slashes=False,
    )
    app.state.bridge = bridge
    app.include_router(api_agent.router)
    app.include_router(api_ops.router)
    app.add_api_route(
        "/healthz",
        healthz,
        methods=["GET"],
        response_model=Health,
        responses={503: {"model": Health, "description": "Not connected to MQTT."}},
        tags=["service"],
        summary="Liveness and the state of the MQTT connection.",
    )
    app.add_api_route(
        "/metrics",
        metrics,
        methods=["GET"],
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}},
        tags=["service"],
        summary="Prometheus metrics.",
    )
    app.add_exception_handler(BridgeError, _bridge_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _unexpected)
    # Each add wraps the app so far: CountRequests, added last, is outermost
    # and also counts the 413s that BodyLimit answers on its own.
    app.add_middleware(BodyLimit, limit_bytes=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=bridge.metrics)
    return app


async def healthz(bridge: BridgeDep) -> JSONResponse:
    up = bridge.bus.connected.is_set()
    health = Health(
        status="ok" if up else "degraded",
        mqtt="connected" if up else "disconnected",
        client_id=bridge.bus.client_id,
        longpoll_waiters=bridge.board.waiter_count,
        known_agents=bridge.board.agent_count,
    )
    return JSONResponse(health.model_dump(), status_code=200 if up else 503)


async def metrics(bridge: BridgeDep) -> Response:
    return Response(
        generate_latest(bridge.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )


async def _bridge_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BridgeError)
    return JSONResponse(
        {"detail": exc.message}, status_code=exc.status_code, headers=exc.headers
    )


async def _invalid(request: Request, exc: Exception) -> Response:
    """422 with where and what, without echoing the input back.

    FastAPI's own handler includes each error's input, which can be large and
    is not always JSON (a NaN makes the answer itself fail).
    """
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]}
        for e in exc.errors()
    ]
    return JSONResponse({"detail": errors}, status_code=422)


# FastAPI answers a body that is not even text (bad UTF-8 / UTF-16 bytes) with
# a bare 400 under this detail, unlike every other malformed body (422,
# json_invalid). The fuzz test notices if a FastAPI upgrade changes the text.
_FASTAPI_UNPARSABLE = "There was an error parsing the body"


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 400 and exc.detail == _FASTAPI_UNPARSABLE:
        error = {
            "type": "json_invalid",
            "loc": ["body"],
            "msg": "The body is not JSON text in UTF-8; send Content-Type "
            "application/json with a UTF-8 JSON document.",
            "input": {},
        }
        return JSONResponse({"detail": [error]}, status_code=422)
    return await http_exception_handler(request, exc)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error(
        "unexpected error on %s %s",
        request.method,
        request.url.path,
        exc_info=exc,
    )
    return JSONResponse(
        {"detail": "The bridge failed unexpectedly; see its log."}, status_code=500
    )


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling, releasing parked polls first.

    ``run`` is cancelled by its owner (``python -m bridge_http`` on a signal,
    or ``kbbus up``), which owns the signals.
    """

    def __init__(self, config: uvicorn.Config, bridge: Bridge) -> None:
        super().__init__(config)
        self._bridge = bridge

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._bridge.release_clients()
        await super().shutdown(sockets)  # type: ignore[arg-type]


def _listen(host: str, port: int) -> socket.socket:
    """Bind the HTTP socket up front: a port in use is a clear error here,
    where uvicorn would log it and exit the whole process."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Name the protocol: asyncio turns Nagle off (TCP_NODELAY) only on sockets
    # whose proto is IPPROTO_TCP, and accepted sockets inherit proto 0 from a
    # plain socket(). With Nagle on, every keep-alive response waited ~40 ms
    # for the client's delayed ACK between uvicorn's header and body writes.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise CannotServe(host, port, exc.strerror or exc) from None
    return sock


async def run(settings: Settings) -> None:
    """Serve the bridge until cancelled, then shut down cleanly.

    Raises ``CannotServe`` if the HTTP address cannot be bound.
    """
    sock = _listen(settings.host, settings.port)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config, app.state.bridge)
    host, port = sock.getsockname()[:2]
    log.info("serving HTTP on http://%s:%s", host, port)
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        await serving
        raise
    finally:
        sock.close()
