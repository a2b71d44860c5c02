"""Protected HTTP: operator and agent bearer tokens, enrolment, the rate limit.

The bridge runs in the test's loop against a fake controller (as in
``test_bridge.py``); the seed's flow with tokens runs against the real
controller and bridge processes at the end.
"""

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bridge_http.auth import RateLimiter
from schemas import decode
from schemas.messages import ControllerKeys, SigningKey, Task
from schemas.signing import canonical_task, http_token, public_key, verify
from tests.support.infra import BrokerHandle, free_port
from tests.support.wait import wait_until
from tests.test_bridge import Stack, bridge_stack

OPERATOR = "op-token-for-tests"
SECRET = "agent-secret-for-tests"
ENROL = "enrol-token-for-tests"
HOST = {"hostname": "h1", "ip_address": "10.0.0.1", "os": "Linux"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def register(stack: Stack) -> str:
    response = await stack.http.post(
        "/api/v1/agent/register", json=HOST, headers=bearer(ENROL)
    )
    assert response.status_code == 201, response.text
    agent_id: str = response.json()["agent_id"]
    return agent_id


def assert_refused(response: httpx.Response, status: int, what: str) -> None:
    assert response.status_code == status, (what, response.text)
    assert response.headers["www-authenticate"].startswith("Bearer"), what
    assert "detail" in response.json(), what


async def test_operator_endpoints_need_the_operator_token(
    broker: BrokerHandle,
) -> None:
    async with bridge_stack(
        broker, operator_token=OPERATOR, agent_secret=SECRET, enrolment_token=ENROL
    ) as stack:
        agent_id = await register(stack)
        wf = await stack.http.post(
            "/api/v1/internal/trigger_kb",
            json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
            headers=bearer(OPERATOR),
        )
        assert wf.status_code == 202, wf.text
        workflow_id = wf.json()["workflow_id"]
        calls = [
            ("GET", "/api/v1/agents", None, 200),
            ("GET", f"/api/v1/agents/{agent_id}", None, 200),
            ("GET", "/api/v1/workflows", None, 200),
            ("GET", f"/api/v1/workflows/{workflow_id}", None, 200),
            ("GET", "/api/v1/kbs", None, 200),
            (
                "POST",
                "/api/v1/internal/trigger_kb",
                {"agent_id": agent_id, "kb_id": "dns-flush-kb"},
                202,
            ),
            ("POST", f"/api/v1/internal/workflows/{workflow_id}/cancel", None, 202),
        ]
        for method, path, body, ok in calls:
            what = f"{method} {path}"
            none = await stack.http.request(method, path, json=body)
            assert_refused(none, 401, what)
            for wrong in (
                "wrong",
                OPERATOR[:-1],
                http_token(SECRET, agent_id),  # an agent's token is no operator's
                ENROL,
            ):
                refused = await stack.http.request(
                    method, path, json=body, headers=bearer(wrong)
                )
                assert_refused(refused, 403, what)
            right = await stack.http.request(
                method, path, json=body, headers=bearer(OPERATOR)
            )
            assert right.status_code == ok, (what, right.text)
        # A scheme other than Bearer is no token at all.
        basic = await stack.http.get(
            "/api/v1/agents", headers={"Authorization": f"Basic {OPERATOR}"}
        )
        assert basic.status_code == 401
        # The event stream too: refused before it opens.
        events = await stack.http.get("/api/v1/events")
        assert_refused(events, 401, "GET /api/v1/events")
        async with stack.http.stream(
            "GET", "/api/v1/events", headers=bearer(OPERATOR)
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
        # Liveness, metrics and the API description stay open.
        for path in ("/healthz", "/metrics", "/openapi.json"):
            assert (await stack.http.get(path)).status_code == 200, path


async def test_agent_endpoints_need_the_agents_own_token(
    broker: BrokerHandle,
) -> None:
    async with bridge_stack(
        broker, operator_token=OPERATOR, agent_secret=SECRET, enrolment_token=ENROL
    ) as stack:
        http = stack.http
        no_token = await http.post("/api/v1/agent/register", json=HOST)
        assert_refused(no_token, 401, "register without a token")
        wrong = await http.post(
            "/api/v1/agent/register", json=HOST, headers=bearer(OPERATOR)
        )
        assert_refused(wrong, 403, "register with the operator token")
        # Refused by the bridge: the controller never heard of either.
        assert stack.controller.agents == {}
        me = await register(stack)
        other = await register(stack)
        mine = bearer(http_token(SECRET, me))
        theirs = bearer(http_token(SECRET, other))

        task = await stack.controller.publish_task(me)
        calls: list[tuple[str, str, dict[str, object] | None, int]] = [
            ("POST", "/api/v1/agent/heartbeat", {"agent_id": me}, 200),
            ("GET", f"/api/v1/agent/tasks?agent_id={me}&timeout=0", None, 200),
            (
                "POST",
                "/api/v1/agent/tasks/results",
                {"agent_id": me, "task_id": task.task_id, "status": "succeeded"},
                202,
            ),
        ]
        for method, path, body, ok in calls:
            what = f"{method} {path}"
            assert_refused(await http.request(method, path, json=body), 401, what)
            for headers in (theirs, bearer("x" * 43), bearer(OPERATOR)):
                refused = await http.request(method, path, json=body, headers=headers)
                assert_refused(refused, 403, what)
            right = await http.request(method, path, json=body, headers=mine)
            assert right.status_code == ok, (what, right.text)
        assert [r.task_id for r in stack.controller.results] == [task.task_id]
        # A missing token is refused before the body is validated (only JSON
        # that does not even parse is answered 422 first, by FastAPI).
        garbage = await http.post(
            "/api/v1/agent/tasks/results", json={"agent_id": 12, "status": "maybe"}
        )
        assert garbage.status_code == 401


async def test_no_token_is_ever_logged(
    broker: BrokerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with bridge_stack(
        broker, operator_token=OPERATOR, agent_secret=SECRET, enrolment_token=ENROL
    ) as stack:
        agent_id = await register(stack)
        token = http_token(SECRET, agent_id)
        await stack.http.post(
            "/api/v1/agent/heartbeat",
            json={"agent_id": agent_id},
            headers=bearer(token),
        )
        await stack.http.post(
            "/api/v1/agent/heartbeat", json={"agent_id": agent_id}, headers=bearer("w")
        )
        await stack.http.post(
            "/api/v1/internal/trigger_kb",
            json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
            headers=bearer(OPERATOR),
        )
        await stack.http.get("/api/v1/agents", headers=bearer("guess"))
    # Ours, and the HTTP server's. (amqtt at DEBUG logs whole payloads, the
    # enrolment token of a registration among them: never run it so.)
    text = "\n".join(
        r.getMessage()
        for r in caplog.records
        if not r.name.startswith(("amqtt", "transitions"))
    )
    assert "agent registered over HTTP" in text, "the log was not captured"
    for secret in (OPERATOR, SECRET, ENROL, token):
        assert secret not in text


async def test_registration_is_rate_limited_per_address(
    broker: BrokerHandle,
) -> None:
    async with bridge_stack(broker, register_rate_per_s=0.2, register_burst=3) as stack:
        codes = []
        for _ in range(5):
            r = await stack.http.post("/api/v1/agent/register", json=HOST)
            codes.append(r.status_code)
        assert codes == [201, 201, 201, 429, 429]
        limited = await stack.http.post("/api/v1/agent/register", json=HOST)
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 5
        assert "detail" in limited.json()
        # Only registration is limited.
        assert (await stack.http.get("/api/v1/kbs")).status_code == 200


def test_token_bucket_refills_and_forgets_quiet_clients() -> None:
    limiter = RateLimiter(rate_per_s=2.0, burst=2, max_clients=2)
    assert limiter.wait_s("a", now=0.0) == 0
    assert limiter.wait_s("a", now=0.0) == 0
    assert limiter.wait_s("a", now=0.0) == pytest.approx(0.5)
    assert limiter.wait_s("a", now=0.5) == 0  # one token back after 0.5 s
    assert limiter.wait_s("b", now=0.5) == 0  # another address, its own bucket
    assert limiter.wait_s("c", now=0.5) == 0
    assert len(limiter._buckets) == 2  # bounded; "a" was the least recent
    assert RateLimiter(rate_per_s=0, burst=1).wait_s("a") == 0  # 0 = off


async def test_open_bridge_without_tokens_configured(broker: BrokerHandle) -> None:
    """No secrets configured: the original service's behaviour, for a lab."""
    async with bridge_stack(broker) as stack:
        agent_id = await stack.register()
        beat = await stack.http.post(
            "/api/v1/agent/heartbeat", json={"agent_id": agent_id}
        )
        assert beat.status_code == 200
        assert (await stack.http.get("/api/v1/agents")).status_code == 200


# --- the seed's flow with tokens, real processes ---------------------------------


def _start(
    name: str, args: list[str], env: dict[str, str], workdir: Path
) -> "subprocess.Popen[bytes]":
    with (workdir / f"{name}.log").open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
        )


@pytest.fixture
def secured(broker: BrokerHandle, db_url: str, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = {
        "KBBUS_AGENT_SECRET": SECRET,
        "KBBUS_ENROLMENT_TOKEN": ENROL,
        "KBBUS_OPEN_ENROLMENT": "false",
        "KBBUS_OPERATOR_TOKEN": OPERATOR,
        "KBBUS_SIGNING_KEY_DIR": str(tmp_path / "keys"),
    }
    procs = [
        _start(
            "controller",
            [
                "controller",
                "--mqtt-url",
                broker.url,
                "--db-url",
                db_url,
                "--client-id",
                f"kbbus-controller-{port}",
            ],
            env,
            tmp_path,
        ),
        _start(
            "bridge",
            ["bridge_http", "--mqtt-url", broker.url, "--port", str(port)],
            env,
            tmp_path,
        ),
    ]
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        for proc, name in zip(procs, ("controller", "bridge"), strict=True):
            if proc.poll() is not None:
                log = (tmp_path / f"{name}.log").read_text()[-3000:]
                raise AssertionError(f"{name} exited:\n{log}")
        try:
            kbs = httpx.get(f"{url}/api/v1/kbs", headers=bearer(OPERATOR), timeout=2)
        except httpx.HTTPError:
            return False
        return kbs.status_code == 200

    try:
        wait_until(ready, timeout_s=30, what="controller answering through the bridge")
        yield url
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _verifies(keys: list[SigningKey], task: Task) -> bool:
    by_id = {k.key_id: k.public_key for k in keys}
    assert task.key_id in by_id, task.key_id
    assert task.signature is not None
    return verify(public_key(by_id[task.key_id]), canonical_task(task), task.signature)


def test_seed_flow_with_tokens_and_signed_tasks(secured: str) -> None:
    """The seed's curl sequence, each call with the header it now needs."""
    with httpx.Client(base_url=secured, timeout=15) as http:
        refused = http.post("/api/v1/agent/register", json=HOST)
        assert refused.status_code == 401
        registered = http.post(
            "/api/v1/agent/register", json=HOST, headers=bearer(ENROL)
        )
        assert registered.status_code == 201, registered.text
        body = registered.json()
        agent_id = body["agent_id"]
        token = body["credentials"]["http_token"]
        assert token == http_token(SECRET, agent_id)
        keys = [SigningKey(**k) for k in body["signing_keys"]]
        assert keys, "no signing keys in the registration answer"
        published = decode(ControllerKeys, http.get("/api/v1/agent/keys").content)
        assert published.keys == keys
        me = bearer(token)

        assert (
            http.post(
                "/api/v1/agent/heartbeat", json={"agent_id": agent_id}
            ).status_code
            == 401
        )
        beat = http.post(
            "/api/v1/agent/heartbeat", json={"agent_id": agent_id}, headers=me
        )
        assert beat.status_code == 200, beat.text
        fake = http.post(
            "/api/v1/agent/heartbeat",
            json={"agent_id": "this-is-a-fake-id"},
            headers=bearer(http_token(SECRET, "this-is-a-fake-id")),
        )
        assert fake.status_code == 404, fake.text

        assert (
            http.post(
                "/api/v1/internal/trigger_kb",
                json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
                headers=me,
            ).status_code
            == 403
        )
        trigger = http.post(
            "/api/v1/internal/trigger_kb",
            json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
            headers=bearer(OPERATOR),
        )
        assert trigger.status_code == 202, trigger.text
        workflow_id = trigger.json()["workflow_id"]

        done: list[str] = []
        deadline = time.monotonic() + 30
        status = "running"
        while time.monotonic() < deadline and len(done) < 2:
            poll = http.get(
                "/api/v1/agent/tasks",
                params={"agent_id": agent_id, "timeout": 1},
                headers=me,
            )
            if poll.status_code == 204:
                continue
            assert poll.status_code == 200, poll.text
            task = decode(Task, poll.content)
            if task.task_id in done:
                continue
            assert _verifies(keys, task), "a task that does not verify"
            posted = http.post(
                "/api/v1/agent/tasks/results",
                json={
                    "agent_id": agent_id,
                    "task_id": task.task_id,
                    "status": "succeeded",
                    "exit_code": 0,
                    "output": f"{task.action} ok",
                },
                headers=me,
            )
            assert posted.status_code == 202, posted.text
            done.append(task.task_id)

        def finished() -> bool:
            nonlocal status
            wf = http.get(f"/api/v1/workflows/{workflow_id}", headers=bearer(OPERATOR))
            status = str(wf.json()["status"])
            return status != "running"

        wait_until(finished, timeout_s=10, what="workflow finished")
        assert status == "succeeded"
        assert len(done) == 2


def test_http_agent_registers_with_tokens_and_runs_signed_tasks(
    secured: str, tmp_path: Path
) -> None:
    """``python -m agent_sim --http-url``: enrolment token, then its own token."""
    state_dir = tmp_path / "http-agent"
    log = tmp_path / "http-agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent_sim",
                "--http-url",
                secured,
                "--state-dir",
                str(state_dir),
                "--heartbeat-s",
                "1",
                "--poll-timeout-s",
                "1",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "KBBUS_ENROLMENT_TOKEN": ENROL},
        )
    try:
        token_file = state_dir / "agent-0.http-token"
        wait_until(token_file.exists, timeout_s=20, what="HTTP agent registered")
        assert token_file.stat().st_mode & 0o077 == 0
        with httpx.Client(base_url=secured, timeout=15) as http:
            agents = http.get("/api/v1/agents", headers=bearer(OPERATOR)).json()
            agent_id = agents[0]["agent_id"]
            assert token_file.read_text() == http_token(SECRET, agent_id)
            trigger = http.post(
                "/api/v1/internal/trigger_kb",
                json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
                headers=bearer(OPERATOR),
            )
            assert trigger.status_code == 202, trigger.text
            workflow_id = trigger.json()["workflow_id"]

            def finished() -> str | None:
                wf = http.get(
                    f"/api/v1/workflows/{workflow_id}", headers=bearer(OPERATOR)
                ).json()
                status = str(wf["status"])
                return None if status in ("queued", "running") else status

            status = wait_until(finished, timeout_s=30, what="workflow finished")
        assert status == "succeeded", log.read_text()[-3000:]
        assert (state_dir / "controller-keys.json").exists()
        assert "refused" not in log.read_text()
    finally:
        agent.terminate()
        agent.wait(timeout=10)
