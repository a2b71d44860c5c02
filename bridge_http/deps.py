"""What every endpoint shares: the bridge dependency and error documentation."""

from typing import Annotated, Any

from fastapi import Depends, Request

from bridge_http.core import Bridge
from bridge_http.models import ErrorAnswer


def get_bridge(request: Request) -> Bridge:
    bridge: Bridge = request.app.state.bridge
    return bridge


BridgeDep = Annotated[Bridge, Depends(get_bridge)]

_MEANING = {
    401: "No bearer token where one is required.",
    403: "The bearer token is not the right one.",
    404: "Unknown agent, task, workflow or KB.",
    409: "The task belongs to another agent, or the request conflicts.",
    413: "The body is over the size limit.",
    429: "Too many registrations from this address; see Retry-After.",
    502: "The controller failed to handle the request.",
    503: "The broker or the controller did not answer in time.",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for refusals answered with ``ErrorAnswer``."""
    return {c: {"model": ErrorAnswer, "description": _MEANING[c]} for c in codes}
