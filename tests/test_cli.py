"""The `kbbus` command as a user runs it: a real process, real ports."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.infra import free_port
from tests.support.wait import wait_until

KBBUS = [sys.executable, "-m", "kbbus.cli"]


def run_kbbus(
    *args: str, cwd: Path, timeout_s: float = 30
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KBBUS, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, "COLUMNS": "200"},
    )


@pytest.mark.parametrize("flag", ["--mqtt-port", "--http-port"])
def test_up_names_the_flag_of_a_port_in_use(tmp_path: Path, flag: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        other = "--http-port" if flag == "--mqtt-port" else "--mqtt-port"
        result = run_kbbus("up", flag, str(port), other, str(free_port()), cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert flag in lines[0]
    assert str(port) in lines[0]


def test_trigger_reports_an_unreachable_bridge(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    result = run_kbbus(
        "trigger", "a-1", "dns-flush-kb", "--http-url", url, cwd=tmp_path
    )
    assert result.returncode == 3
    assert "cannot reach the bridge" in result.stderr


def test_trigger_refuses_a_malformed_param(tmp_path: Path) -> None:
    result = run_kbbus(
        "trigger", "a-1", "dns-flush-kb", "--param", "novalue", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "k=v" in result.stderr


@pytest.mark.parametrize("command", ["controller", "bridge", "agents"])
def test_process_commands_name_themselves_in_help_and_errors(
    tmp_path: Path, command: str
) -> None:
    shown = run_kbbus(command, "--help", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"usage: kbbus {command} ")
    assert "--mqtt-url" in shown.stdout
    refused = run_kbbus(command, "--mqtt-url", cwd=tmp_path)
    assert refused.returncode == 2
    assert f"kbbus {command}" in refused.stderr


@pytest.mark.slow
def test_up_runs_the_whole_system_and_stops_on_sigterm(tmp_path: Path) -> None:
    mqtt_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *KBBUS,
            "up",
            "--mqtt-port",
            str(mqtt_port),
            "--http-port",
            str(http_port),
            "--agents",
            "2",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{http_port}"
    try:

        def two_online() -> bool:
            try:
                response = httpx.get(f"{base}/api/v1/agents", timeout=2)
            except httpx.HTTPError:
                return False
            if response.status_code != 200:
                return False
            return bool(sum(a["status"] == "online" for a in response.json()) == 2)

        wait_until(two_online, timeout_s=60, what="two simulated agents online")
        agents = httpx.get(f"{base}/api/v1/agents", timeout=2).json()
        result = run_kbbus(
            "trigger",
            agents[0]["agent_id"],
            "dns-flush-kb",
            "--http-url",
            base,
            "--timeout-s",
            "60",
            cwd=tmp_path,
            timeout_s=90,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "succeeded" in result.stdout
        status = run_kbbus("status", "--http-url", base, cwd=tmp_path)
        assert status.returncode == 0
        assert "2 online" in status.stdout
        # Whole ids, to copy into `kbbus trigger`, even on a narrow terminal.
        narrow = subprocess.run(
            [*KBBUS, "status", "--http-url", base],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "COLUMNS": "80"},
        )
        assert all(a["agent_id"] in narrow.stdout for a in agents), narrow.stdout
        assert "s ago" in narrow.stdout
    finally:
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 20
    assert "kbbus is up" in out
    assert (tmp_path / ".kbbus" / "kbbus.db").exists()
