"""The seed's curl sequence, over real HTTP, against real processes.

A real broker (amqtt and Mosquitto), the real controller as a subprocess on a
real database (SQLite and PostgreSQL), the bridge as a subprocess on a free
port, and an HTTP-only agent played by this test: it never opens MQTT.
"""

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.support.infra import BrokerHandle, free_port
from tests.support.wait import wait_until

OFFLINE_AFTER_S = 2.0


@dataclass
class Process:
    name: str
    proc: "subprocess.Popen[bytes]"
    log: Path

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"{self.name} exited with {self.proc.returncode}:\n"
                + self.log.read_text()[-4000:]
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start(name: str, args: list[str], workdir: Path) -> Process:
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], stdout=out, stderr=subprocess.STDOUT
        )
    return Process(name, proc, log)


@pytest.fixture
def system(broker: BrokerHandle, db_url: str, tmp_path: Path) -> Iterator[str]:
    """Controller and bridge processes on ``broker``; yields the bridge's URL."""
    port = free_port()
    controller = start(
        "controller",
        [
            "controller",
            "--mqtt-url",
            broker.url,
            "--db-url",
            db_url,
            "--client-id",
            f"kbbus-controller-{port}",
            "--offline-after-s",
            str(OFFLINE_AFTER_S),
            "--sweep-interval-s",
            "0.2",
        ],
        tmp_path,
    )
    bridge = start(
        "bridge",
        ["bridge_http", "--mqtt-url", broker.url, "--port", str(port)],
        tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            controller.check()
            bridge.check()
            try:
                # The KB catalog answers only once bridge and controller talk.
                return httpx.get(f"{url}/api/v1/kbs", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout_s=30, what="controller answering through the bridge")
        yield url
    finally:
        bridge.stop()
        controller.stop()


def test_seed_curl_sequence_with_an_http_only_agent(system: str) -> None:
    with httpx.Client(base_url=system, timeout=15) as http:
        registered = http.post(
            "/api/v1/agent/register",
            json={
                "hostname": "my-dev-machine",
                "ip_address": "192.168.1.100",
                "os": "Ubuntu 22.04",
            },
        )
        assert registered.status_code == 201, registered.text
        agent_id = registered.json()["agent_id"]

        beat = http.post("/api/v1/agent/heartbeat", json={"agent_id": agent_id})
        assert beat.status_code == 200, beat.text
        fake = http.post(
            "/api/v1/agent/heartbeat", json={"agent_id": "this-is-a-fake-id"}
        )
        assert fake.status_code == 404, fake.text

        idle = http.get(
            "/api/v1/agent/tasks", params={"agent_id": agent_id, "timeout": 0.3}
        )
        assert idle.status_code == 204

        trigger = http.post(
            "/api/v1/internal/trigger_kb",
            json={"agent_id": agent_id, "kb_id": "dns-flush-kb"},
        )
        assert trigger.status_code == 202, trigger.text
        workflow_id = trigger.json()["workflow_id"]

        done: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            workflow = http.get(f"/api/v1/workflows/{workflow_id}").json()
            if workflow["status"] in ("succeeded", "failed", "timed_out", "canceled"):
                break
            http.post("/api/v1/agent/heartbeat", json={"agent_id": agent_id})
            poll = http.get(
                "/api/v1/agent/tasks", params={"agent_id": agent_id, "timeout": 1}
            )
            if poll.status_code == 204:
                continue
            assert poll.status_code == 200, poll.text
            task = poll.json()
            assert task["agent_id"] == agent_id
            assert task["task_id"] not in done, "a task came back after its result"
            posted = http.post(
                "/api/v1/agent/tasks/results",
                json={
                    "agent_id": agent_id,
                    "task_id": task["task_id"],
                    "status": "succeeded",
                    "exit_code": 0,
                    "output": f"{task['action']} ok",
                },
            )
            assert posted.status_code == 202, posted.text
            done.append(task["task_id"])
        assert workflow["status"] == "succeeded", workflow
        assert [s["step_id"] for s in workflow["steps"]] == ["flush", "verify"]
        assert len(done) == 2
        outputs = [s["attempts"][-1]["output"] for s in workflow["steps"]]
        assert outputs == ["dns.flush ok", "dns.resolve ok"]

        # An agent that only spoke HTTP goes offline by the controller's timer
        # once it stops heartbeating.
        def offline() -> bool:
            agent = http.get(f"/api/v1/agents/{agent_id}").json()
            return bool(agent["status"] == "offline")

        assert http.get(f"/api/v1/agents/{agent_id}").json()["status"] == "online"
        wait_until(offline, timeout_s=OFFLINE_AFTER_S + 10, what="agent offline")
