"""``kbbus up`` is secure by default: generated secrets, accounts, enrolment.

The embedded broker refuses anonymous clients, the simulated agents enrol
with the generated token (handed to them through the environment) and run a
workflow, the secrets are kept in a file only its owner can read and are
reused by the next start.
"""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import uuid
from pathlib import Path

import aiomqtt
import httpx
import pytest

from agent_sim.store import AgentState, state_path
from tests.support.infra import free_port
from tests.support.wait import wait_until

KBBUS = [sys.executable, "-m", "kbbus.cli"]


def secure_env() -> dict[str, str]:
    # The suite's lab-mode default (tests/conftest.py) must not reach kbbus up.
    env = {k: v for k, v in os.environ.items() if not k.startswith("KBBUS_")}
    return {**env, "COLUMNS": "200"}


def start_up(tmp_path: Path, *args: str) -> subprocess.Popen[bytes]:
    """``kbbus up`` in ``tmp_path``, its output in ``tmp_path/up.log``."""
    with (tmp_path / "up.log").open("ab") as log:
        return subprocess.Popen(
            [*KBBUS, "up", *args],
            cwd=tmp_path,
            env=secure_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def banner_printed(tmp_path: Path) -> bool:
    return "Press Ctrl-C" in (tmp_path / "up.log").read_text()


def stop(proc: subprocess.Popen[bytes], tmp_path: Path) -> str:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    out = (tmp_path / "up.log").read_text()
    assert proc.returncode == 0, out
    return out


async def connect(
    port: int, client_id: str, username: str | None, password: str | None
) -> None:
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=client_id, username=username, password=password
    ):
        pass


@pytest.mark.slow
def test_up_is_secure_by_default_and_keeps_its_secrets(tmp_path: Path) -> None:
    mqtt_port, http_port = free_port(), free_port()
    base = f"http://127.0.0.1:{http_port}"
    secrets_file = tmp_path / ".kbbus" / "secrets.json"
    ports = ["--mqtt-port", str(mqtt_port), "--http-port", str(http_port)]
    proc = start_up(tmp_path, *ports, "--agents", "2", "--heartbeat-s", "1")
    try:
        wait_until(secrets_file.exists, timeout_s=30, what="secrets.json written")
        stored = json.loads(secrets_file.read_text())
        headers = {"Authorization": f"Bearer {stored['operator_token']}"}

        def online() -> list[str]:
            try:
                response = httpx.get(f"{base}/api/v1/agents", headers=headers)
            except httpx.HTTPError:
                return []
            if response.status_code != 200:
                return []
            ids = [a["agent_id"] for a in response.json() if a["status"] == "online"]
            return ids if len(ids) == 2 else []

        agent_ids = wait_until(online, timeout_s=60, what="two agents online")
        wait_until(lambda: banner_printed(tmp_path), timeout_s=10, what="banner")
        # Anonymous clients, and the token as an agent's password, are refused.
        token = stored["enrolment_token"]
        for username, password in ((None, None), (agent_ids[0], token)):
            with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
                asyncio.run(connect(mqtt_port, agent_ids[0], username, password))
        result = subprocess.run(
            [*KBBUS, "trigger", agent_ids[0], "dns-flush-kb", "--http-url", base],
            cwd=tmp_path,
            env=secure_env(),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "succeeded" in result.stdout
    finally:
        out = stop(proc, tmp_path)
    assert stored["enrolment_token"] in out  # printed in the banner
    # The services' broker passwords and the agent secret are in no log line
    # (the controller and the bridge log their broker URL, password masked).
    for secret in ("kbbus-controller", "kbbus-bridge", "agent_secret"):
        assert stored[secret] not in out, secret
    assert "kbbus-controller:***@" in out
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600
    for index in range(2):
        state = AgentState.load(state_path(tmp_path / ".kbbus" / "agents", index))
        assert state is not None
        assert state.mqtt_password is not None

    # A restart keeps every secret, so the agents log in with what they stored.
    proc = start_up(tmp_path, *ports, "--agents", "2", "--heartbeat-s", "1")
    try:
        again = wait_until(online, timeout_s=60, what="two agents online again")
        assert sorted(again) == sorted(agent_ids)
    finally:
        stop(proc, tmp_path)
    assert json.loads(secrets_file.read_text()) == stored


def test_up_with_open_enrolment_generates_no_secrets(tmp_path: Path) -> None:
    """The lab switch: no secrets file, and the banner says security is off."""
    mqtt_port, http_port = free_port(), free_port()
    ports = ["--mqtt-port", str(mqtt_port), "--http-port", str(http_port)]
    proc = start_up(tmp_path, "--open-enrolment", *ports)
    try:
        wait_until(lambda: banner_printed(tmp_path), timeout_s=60, what="banner")
        # Anyone may publish: mosquitto_pub without an account gets in.
        name = f"anonymous-{uuid.uuid4().hex[:6]}"
        pub = subprocess.run(
            ["mosquitto_pub", "-p", str(mqtt_port), "-i", name, "-t", "x", "-m", "y"],
            timeout=10,
            check=False,
        )
        assert pub.returncode == 0
    finally:
        out = stop(proc, tmp_path)
    assert "security      OFF" in out
    assert not (tmp_path / ".kbbus" / "secrets.json").exists()
