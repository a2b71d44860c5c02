"""Operator commands (trigger, status, watch, kbs): HTTP calls to the bridge."""

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Column, Table

from schemas.views import FINAL_WORKFLOW_STATES

# Exit codes scripts can rely on.
EXIT_OK = 0
EXIT_WORKFLOW_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_WAIT_TIMEOUT = 4


class OperatorError(Exception):
    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def operator_token() -> str | None:
    """KBBUS_OPERATOR_TOKEN, else the one ``kbbus up`` keeps in its data dir.

    The fallback lets ``kbbus status`` work beside a local ``kbbus up`` with
    nothing exported; the file is readable by its owner only.
    """
    token = os.environ.get("KBBUS_OPERATOR_TOKEN")
    if token:
        return token
    path = Path(os.environ.get("KBBUS_DATA_DIR", ".kbbus")) / "secrets.json"
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    value = stored.get("operator_token") if isinstance(stored, dict) else None
    return value if isinstance(value, str) and value else None


def _headers() -> dict[str, str]:
    token = operator_token()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client(http_url: str, timeout_s: float | None = 10.0) -> httpx.Client:
    return httpx.Client(base_url=http_url, timeout=timeout_s, headers=_headers())


_AUTH_HINT = {
    401: "the bridge needs the operator token: set KBBUS_OPERATOR_TOKEN "
    "(`kbbus up` prints it)",
    403: "the bridge refused the operator token in KBBUS_OPERATOR_TOKEN",
}


def _call(client: httpx.Client, method: str, path: str, **kw: Any) -> Any:
    try:
        response = client.request(method, path, **kw)
    except httpx.HTTPError as exc:
        raise OperatorError(
            f"cannot reach the bridge at {client.base_url}: {exc}; "
            "is `kbbus up` running (or pass --http-url)?",
            EXIT_UNREACHABLE,
        ) from None
    if response.status_code >= 400:
        try:
            detail = response.json()
        except ValueError:
            detail = response.text
        code = EXIT_UNREACHABLE if response.status_code >= 500 else EXIT_USAGE
        if response.status_code in _AUTH_HINT:
            detail = _AUTH_HINT[response.status_code]
        raise OperatorError(f"{response.status_code}: {detail}", code)
    return response.json() if response.content else None


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs; a value that parses as JSON (numbers, true) is taken as such."""
    params: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OperatorError(f"--param {pair!r} is not of the form k=v", EXIT_USAGE)
        try:
            params[key] = json.loads(value)
        except ValueError:
            params[key] = value
    return params


def _step_line(step: dict[str, Any]) -> str:
    attempts = step.get("attempts") or []
    last = attempts[-1] if attempts else {}
    mark = {
        "succeeded": "[green]✔[/]",
        "failed": "[red]✘[/]",
        "timed_out": "[red]⧖[/]",
        "canceled": "[yellow]⊘[/]",
        "dispatched": "[cyan]…[/]",
    }.get(step["status"], "·")
    extra = f" attempt {last.get('attempt')}" if len(attempts) > 1 else ""
    code = last.get("exit_code")
    code_s = f" exit {code}" if code is not None else ""
    name = f"{step['index'] + 1}. {step['step_id']} ({step['action']})"
    return f"  {mark} {name}{extra}{code_s}"


def trigger(
    http_url: str,
    agent_id: str,
    kb_id: str,
    params: dict[str, Any],
    *,
    wait: bool,
    timeout_s: float,
    idempotency_key: str | None,
    console: Console,
) -> int:
    body: dict[str, Any] = {"agent_id": agent_id, "kb_id": kb_id, "params": params}
    if idempotency_key:
        body["idempotency_key"] = idempotency_key
    with _client(http_url) as client:
        accepted = _call(client, "POST", "/api/v1/internal/trigger_kb", json=body)
        workflow_id = accepted["workflow_id"]
        console.print(f"workflow [bold]{workflow_id}[/] {accepted['status']}")
        if not wait:
            return EXIT_OK
        return follow(client, workflow_id, timeout_s, console)


def follow(
    client: httpx.Client, workflow_id: str, timeout_s: float, console: Console
) -> int:
    deadline = time.monotonic() + timeout_s
    shown: dict[str, str] = {}
    status = "queued"
    with console.status(f"workflow {workflow_id}: queued") as spinner:
        while True:
            wf = _call(client, "GET", f"/api/v1/workflows/{workflow_id}")
            for step in wf.get("steps", []):
                key = step["step_id"]
                state = f"{step['status']}/{len(step.get('attempts') or [])}"
                if shown.get(key) != state and step["status"] != "pending":
                    shown[key] = state
                    console.print(_step_line(step))
            status = wf["status"]
            spinner.update(f"workflow {workflow_id}: {status}")
            if status in FINAL_WORKFLOW_STATES:
                break
            if time.monotonic() > deadline:
                console.print(f"[red]gave up waiting after {timeout_s:.0f}s[/]")
                return EXIT_WAIT_TIMEOUT
            time.sleep(0.2)
    colour = "green" if status == "succeeded" else "red"
    console.print(f"workflow {workflow_id} [{colour}]{status}[/]")
    return EXIT_OK if status == "succeeded" else EXIT_WORKFLOW_FAILED


def status(http_url: str, console: Console, limit: int = 20) -> int:
    with _client(http_url) as client:
        agents = _call(client, "GET", "/api/v1/agents")
        workflows = _call(client, "GET", "/api/v1/workflows", params={"limit": limit})
    online = sum(1 for a in agents if a["status"] == "online")
    console.print(
        f"[bold]{len(agents)}[/] agents: [green]{online} online[/], "
        f"[red]{len(agents) - online} offline[/]"
    )
    now = datetime.now(UTC)
    # Whole ids, never cut: they are what `kbbus trigger` takes.
    table = Table(_id_column("agent"), "hostname", "status", "last seen", box=None)
    for agent in agents[:limit]:
        colour = "green" if agent["status"] == "online" else "red"
        table.add_row(
            agent["agent_id"],
            agent.get("hostname", ""),
            f"[{colour}]{agent['status']}[/]",
            _ago(agent.get("last_seen_at"), now),
        )
    console.print(table)
    running = [w for w in workflows if w["status"] in ("queued", "running")]
    console.print(
        f"[bold]{len(running)}[/] queued or running workflows; the latest "
        f"{min(limit, len(workflows))}:"
    )
    wtable = Table(
        _id_column("workflow"), _id_column("agent"), "kb", "status", "created", box=None
    )
    for wf in workflows[:limit]:
        wtable.add_row(
            wf["workflow_id"],
            wf["agent_id"],
            wf["kb_id"],
            wf["status"],
            _ago(wf.get("created_at"), now),
        )
    console.print(wtable)
    return EXIT_OK


def _id_column(header: str) -> Column:
    return Column(header, no_wrap=True, min_width=36)


def _ago(timestamp: str | None, now: datetime) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``; older ones as a UTC date and time."""
    if not timestamp:
        return "never"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int((now - then).total_seconds()))
    if seconds < 60:
        return f"{seconds}s ago"
    if seconds < 3600:
        return f"{seconds // 60}m ago"
    if seconds < 86400:
        return f"{seconds // 3600}h ago"
    return then.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def kbs(http_url: str, console: Console) -> int:
    with _client(http_url) as client:
        catalog = _call(client, "GET", "/api/v1/kbs")
    table = Table("kb", "title", "steps", "parameters", box=None)
    for kb in catalog:
        props = (kb.get("params_schema") or {}).get("properties", {})
        table.add_row(kb["kb_id"], kb["title"], str(len(kb["steps"])), ", ".join(props))
    console.print(table)
    return EXIT_OK


def iter_events(http_url: str) -> Iterator[dict[str, Any]]:
    """Events from the bridge's Server-Sent Events stream, forever."""
    try:
        with (
            _client(http_url, timeout_s=None) as client,
            client.stream("GET", "/api/v1/events") as response,
        ):
            if response.status_code in _AUTH_HINT:
                raise OperatorError(
                    f"{response.status_code}: {_AUTH_HINT[response.status_code]}",
                    EXIT_USAGE,
                )
            if response.status_code != 200:
                raise OperatorError(
                    f"{response.status_code} from /api/v1/events", EXIT_UNREACHABLE
                )
            for line in response.iter_lines():
                if line.startswith("data:"):
                    yield json.loads(line[5:].strip())
    except httpx.HTTPError as exc:
        raise OperatorError(
            f"lost the event stream from {http_url}: {exc}", EXIT_UNREACHABLE
        ) from None


def watch(http_url: str, console: Console) -> int:
    console.print(f"watching events from {http_url} (Ctrl-C to stop)")
    for event in iter_events(http_url):
        kind = event.get("kind", "?")
        who = event.get("workflow_id") or ""
        agent = event.get("agent_id") or ""
        data = event.get("data") or {}
        detail = " ".join(f"{k}={v}" for k, v in data.items() if k != "output")
        colour = "red" if "offline" in kind or "failed" in json.dumps(data) else "cyan"
        console.print(
            f"{event.get('ts', '')[:23]} [{colour}]{kind:18}[/] agent={agent} "
            f"{'workflow=' + who if who else ''} {detail}".rstrip()
        )
    return EXIT_OK
