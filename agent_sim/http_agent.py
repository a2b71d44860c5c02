"""The agent over the HTTP bridge only, for hosts where MQTT is blocked.

Register (the controller issues the id, kept in the state file), heartbeat on
an interval, long-poll for the next task, run it under the same rules as the
MQTT agent (``core``), post the result. An HTTP agent has no Will: the
controller's timer marks it offline when its heartbeats stop.

Registration sends the enrolment token (``--enrolment-token``) as a bearer
token when one is set; the answer carries the agent's own HTTP token, kept in
``agent-<n>.http-token`` beside the state file (mode 0600) and sent on every
later call, and the controller's signing keys. A task signed by a key the
agent does not know yet makes it fetch the controller's current key set
(``GET /api/v1/agent/keys``), which it accepts only if a key it trusts signed
it.
"""

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

import httpx

from agent_sim.core import AgentCore, Counters
from agent_sim.runtime import local_address, os_name, runner_from
from agent_sim.settings import Settings
from agent_sim.store import AgentState, state_path
from agent_sim.trust import Mode, TrustStore
from agent_sim.wire import Backoff
from schemas import MessageError, decode
from schemas.messages import ControllerKeys, SigningKey, Task

log = logging.getLogger("kbbus.agent")

SEEN_AGAIN_PAUSE_S = 0.2


class UnknownAgent(Exception):
    """The bridge answered 404 for our id, or refused our token: register again."""


def _read_token(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_token(path: Path, token: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token)
    os.replace(tmp, path)


class HttpAgent:
    def __init__(
        self,
        settings: Settings,
        http: httpx.AsyncClient,
        index: int = 0,
        counters: Counters | None = None,
        trust: TrustStore | None = None,
    ) -> None:
        self.settings = settings
        self.http = http
        self.index = index
        self.counters = counters or Counters()
        self.trust = trust or TrustStore(None)
        self.path = state_path(settings.state_dir, index)
        self.token_path = self.path.with_name(f"{self.path.stem}.http-token")
        self.token: str | None = None
        self.runner = runner_from(settings)
        self.core: AgentCore | None = None
        self.backoff = Backoff(settings.reconnect_min_s, settings.reconnect_max_s)

    @property
    def agent_id(self) -> str | None:
        return self.core.agent_id if self.core else None

    async def run(self) -> None:
        beating: asyncio.Task[None] | None = None
        try:
            while True:
                try:
                    core = await self._ensure_registered()
                    if beating is None or beating.done():
                        beating = asyncio.create_task(self._heartbeats())
                    await self._serve(core)
                except UnknownAgent:
                    log.warning(
                        "the controller does not know us, registering again: "
                        "agent_id=%s",
                        self.agent_id,
                    )
                    self.core = None
                except httpx.HTTPError as exc:
                    delay = self.backoff.next_s()
                    log.warning(
                        "bridge %s unreachable (%s); retrying in %.2fs: agent_id=%s",
                        self.settings.http_url,
                        exc,
                        delay,
                        self.agent_id,
                    )
                    await asyncio.sleep(delay)
        finally:
            if beating is not None:
                beating.cancel()
            await self._interrupt()

    # --- registration -------------------------------------------------------
    async def _ensure_registered(self) -> AgentCore:
        if self.core is not None:
            return self.core
        state = AgentState.load(self.path, max_finished=self.settings.max_finished)
        self.token = _read_token(self.token_path)
        if state is not None and await self._heartbeat(state.agent_id):
            log.info("known to the controller: agent_id=%s", state.agent_id)
            if self.trust.mode is Mode.UNKNOWN:
                await self._refresh_keys(first=True)
        else:
            state = await self._register()
        self.core = AgentCore(
            state,
            self.runner,
            lambda _payload: None,  # results are posted by _serve
            counters=self.counters,
            seed=self.settings.seed,
            index=self.index,
            trust=self.trust,
        )
        self.counters.connected += 1
        self.counters.online += 1
        return self.core

    async def _register(self) -> AgentState:
        hostname = self.settings.hostname
        if self.settings.count > 1:
            hostname = f"{hostname}-sim-{self.index}"
        body = {"hostname": hostname, "ip_address": local_address(), "os": os_name()}
        enrolment = self.settings.enrolment_token
        headers = (
            {"Authorization": f"Bearer {enrolment.get_secret_value()}"}
            if enrolment is not None
            else {}
        )
        response = await self.http.post(
            "/api/v1/agent/register", json=body, headers=headers
        )
        response.raise_for_status()
        answer = response.json()
        agent_id = str(answer["agent_id"])
        state = AgentState(self.path, agent_id, max_finished=self.settings.max_finished)
        state.save()
        token = (answer.get("credentials") or {}).get("http_token")
        self.token = str(token) if token else None
        if self.token is not None:
            _write_token(self.token_path, self.token)
        else:
            self.token_path.unlink(missing_ok=True)
        keys = [SigningKey.model_validate(k) for k in answer.get("signing_keys", [])]
        self.trust.registered(keys)
        log.info("registered over HTTP: agent_id=%s", agent_id)
        return state

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    async def _refresh_keys(self, *, first: bool = False) -> None:
        """Fetch the controller's key set; trusted as described in ``trust``.

        ``first``: an agent registered before it kept keys (an older state
        directory) takes the set as its anchor, as it would have at
        registration; 404 means the controller does not sign.
        """
        response = await self.http.get("/api/v1/agent/keys")
        if response.status_code == 404:
            if first:
                self.trust.registered([])
            return
        response.raise_for_status()
        if first and self.trust.mode is Mode.UNKNOWN:
            try:
                offered = decode(ControllerKeys, response.content)
            except MessageError as exc:
                log.warning("ignoring an invalid key set from the bridge: %s", exc)
                return
            self.trust.registered(list(offered.keys))
        self.trust.key_set(response.content)

    async def _heartbeat(self, agent_id: str) -> bool:
        response = await self.http.post(
            "/api/v1/agent/heartbeat", json={"agent_id": agent_id}, headers=self._auth()
        )
        if response.status_code in (401, 403, 404):
            return False
        response.raise_for_status()
        return True

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            agent_id = self.agent_id
            if agent_id is None:
                continue
            try:
                if not await self._heartbeat(agent_id):
                    log.warning("heartbeat refused: unknown agent_id=%s", agent_id)
            except httpx.HTTPError as exc:
                log.info("heartbeat failed (%s): agent_id=%s", exc, agent_id)

    # --- tasks ----------------------------------------------------------------
    async def _serve(self, core: AgentCore) -> None:
        while True:
            task = await self._poll(core.agent_id)
            self.backoff.reset()
            if task is None:
                continue
            if core.must_wait(task):
                await self._refresh_keys()
            answer = core.admit(task)
            if answer is not None:
                await self._post(core.agent_id, answer)
                # The bridge may hand the same task out until the controller has
                # moved on; do not spin on it.
                await asyncio.sleep(SEEN_AGAIN_PAUSE_S)
                continue
            await self._post(core.agent_id, await core.execute(task))

    async def _poll(self, agent_id: str) -> Task | None:
        timeout_s = self.settings.poll_timeout_s
        response = await self.http.get(
            "/api/v1/agent/tasks",
            params={"agent_id": agent_id, "timeout": f"{timeout_s:g}"},
            headers=self._auth(),
            timeout=httpx.Timeout(
                timeout_s + 10, connect=self.settings.connect_timeout_s
            ),
        )
        if response.status_code == 204:
            return None
        if response.status_code in (401, 403, 404):
            raise UnknownAgent(agent_id)
        response.raise_for_status()
        try:
            return decode(Task, response.content)
        except MessageError as exc:
            self.counters.rejected += 1
            log.warning("ignoring an invalid task: agent_id=%s error=%s", agent_id, exc)
            return None

    async def _post(self, agent_id: str, payload: bytes) -> None:
        """Post a result until the bridge has it on the bus (202) or refuses it."""
        backoff = Backoff(self.settings.reconnect_min_s, self.settings.reconnect_max_s)
        deadline = time.monotonic() + self.settings.action_timeout_s
        while True:
            try:
                response = await self.http.post(
                    "/api/v1/agent/tasks/results",
                    content=payload,
                    headers={"content-type": "application/json", **self._auth()},
                )
                if response.status_code < 500:
                    break
                problem: Any = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                problem = exc
            if time.monotonic() > deadline:
                log.error(
                    "giving up posting a result (%s); the task is answered from the "
                    "state file if it comes again: agent_id=%s",
                    problem,
                    agent_id,
                )
                return
            await asyncio.sleep(backoff.next_s())
        if response.status_code in (404, 409):
            log.warning(
                "result refused with %d (%s): agent_id=%s",
                response.status_code,
                response.text[:200],
                agent_id,
            )
        elif response.status_code >= 400:
            response.raise_for_status()

    async def _interrupt(self) -> None:
        if self.core is None:
            return
        payload = self.core.interrupt()
        if payload is not None:
            try:
                async with asyncio.timeout(3):
                    await self._post(self.core.agent_id, payload)
            except (TimeoutError, httpx.HTTPError):
                pass


async def run_http_agents(settings: Settings) -> None:
    """``--count`` HTTP agents sharing one connection pool, ramped in."""
    assert settings.http_url is not None
    limits = httpx.Limits(max_connections=2 * settings.count + 8)
    counters = Counters()
    trust = TrustStore.load(settings.state_dir)
    async with (
        httpx.AsyncClient(
            base_url=settings.http_url,
            limits=limits,
            timeout=httpx.Timeout(30, connect=settings.connect_timeout_s),
        ) as http,
        asyncio.TaskGroup() as group,
    ):
        for index in range(settings.count):
            group.create_task(HttpAgent(settings, http, index, counters, trust).run())
            if settings.ramp_per_s > 0:
                await asyncio.sleep(1 / settings.ramp_per_s)
