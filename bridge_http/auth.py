"""Who may call what: bearer tokens, and the registration rate limit.

Three kinds of caller, each with its own bearer token:

- operators (trigger, cancel, look-ups, events): ``--operator-token``;
- agents (heartbeat, long poll, results): their own token, which the
  controller issued at registration as HMAC-SHA256(agent secret,
  ``"http:" + agent_id``). The bridge holds the same ``--agent-secret`` and
  recomputes it, so it keeps no table of tokens and needs no look-up;
- new agents (register): the enrolment token, forwarded to the controller,
  which decides; when the bridge is given it too it refuses a wrong one
  without bothering the controller.

A kind whose secret is not configured is open: a lab bridge behaves as the
original service did. Tokens are compared in constant time and never logged.
"""

import math
import time
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from bridge_http.errors import Forbidden, TooManyRequests, Unauthorized
from bridge_http.settings import Settings
from schemas.signing import http_token, token_matches

_bearer = HTTPBearer(
    auto_error=False,
    description="Operator token, the agent's own token, or the enrolment token.",
)
Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]

OPERATOR = "the operator token"
AGENT = "this agent's token"
ENROLMENT = "the enrolment token"


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None


class Auth:
    def __init__(self, settings: Settings) -> None:
        self._operator = _secret(settings.operator_token)
        self._agent_secret = _secret(settings.agent_secret)
        self._enrolment = _secret(settings.enrolment_token)

    @property
    def agents_protected(self) -> bool:
        return self._agent_secret is not None

    def operator(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        if self._operator is None:
            return
        if credentials is None:
            raise Unauthorized(OPERATOR)
        if not token_matches(credentials.credentials, self._operator):
            raise Forbidden(OPERATOR)

    def agent_present(self, credentials: HTTPAuthorizationCredentials | None) -> None:
        """Before the body is read: a token at all, when agents need one."""
        if self._agent_secret is not None and credentials is None:
            raise Unauthorized(AGENT)

    def agent(
        self, credentials: HTTPAuthorizationCredentials | None, agent_id: str
    ) -> None:
        """The token is ``agent_id``'s own (checked once the id is known)."""
        if self._agent_secret is None:
            return
        if credentials is None:
            raise Unauthorized(AGENT)
        expected = http_token(self._agent_secret, agent_id)
        if not token_matches(credentials.credentials, expected):
            raise Forbidden(AGENT)

    def enrolment(self, credentials: HTTPAuthorizationCredentials | None) -> str | None:
        """The enrolment token to forward to the controller, if any."""
        given = credentials.credentials if credentials is not None else None
        if self._enrolment is None:
            return given
        if given is None:
            raise Unauthorized(ENROLMENT)
        if not token_matches(given, self._enrolment):
            raise Forbidden(ENROLMENT)
        return given


class RateLimiter:
    """A token bucket per client address, for registrations.

    At most ``max_clients`` buckets are kept (least recently used dropped), so
    a flood from many addresses costs bounded memory; a dropped bucket starts
    full again, which only forgives a client that was quiet for a while.
    """

    def __init__(
        self, rate_per_s: float, burst: int, *, max_clients: int = 10_000
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = float(burst)
        self.max_clients = max_clients
        #: address -> (tokens, last refill, monotonic seconds)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def wait_s(self, key: str, now: float | None = None) -> float:
        """Take one token for ``key``: 0 if allowed, else seconds until one."""
        if self.rate_per_s <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate_per_s
        self._buckets[key] = (tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait

    def check(self, key: str) -> None:
        wait = self.wait_s(key)
        if wait > 0:
            raise TooManyRequests(math.ceil(wait * 1000) / 1000)


def get_auth(request: Request) -> Auth:
    auth: Auth = request.app.state.bridge.auth
    return auth


AuthDep = Annotated[Auth, Depends(get_auth)]


async def require_operator(auth: AuthDep, credentials: Bearer) -> None:
    """Dependency of every operator endpoint."""
    auth.operator(credentials)


async def agent_bearer(
    auth: AuthDep, credentials: Bearer
) -> HTTPAuthorizationCredentials | None:
    """Dependency of agent endpoints: 401 at once without a token; the
    endpoint checks it against the agent id with ``Auth.agent``."""
    auth.agent_present(credentials)
    return credentials


AgentBearer = Annotated[HTTPAuthorizationCredentials | None, Depends(agent_bearer)]
