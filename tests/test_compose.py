"""compose.yaml: valid Compose, and everything it names exists and agrees.

No Docker engine runs here, so the file is checked the way an engine would
read it: against the Compose Specification's JSON Schema, then against the
repository (build context, mounted files, commands and their flags, ports,
broker accounts). Each check returns the problems it finds; every check is
also run on a broken copy to show it can fail.
"""

import importlib
import json
import re
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SPEC = Path(__file__).resolve().parent / "data" / "compose-spec.json"
PROCESS_MODULES = {"controller", "bridge_http", "agent_sim"}
BROKERS = ("mosquitto", "emqx1", "emqx2")
POSTGRES_PORT = 5432
EMQX_DASHBOARD_PORT = 18083

Compose = dict[str, Any]


def load_compose() -> Compose:
    doc: Compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    return doc


def interpolate(value: str) -> str:
    """Compose variable syntax with nothing set: defaults apply, $$ is $."""
    value = re.sub(r"\$\{[A-Za-z0-9_]+:?-([^}]*)\}", r"\1", value)
    value = re.sub(r"\$\{[A-Za-z0-9_]+\}", "", value)
    return value.replace("$$", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolate(str(value)) for key, value in env.items()}


def target_ports(service: dict[str, Any]) -> set[int]:
    ports: set[int] = set()
    for entry in service.get("ports") or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def bind_mounts(service: dict[str, Any]) -> dict[PurePosixPath, Path]:
    """Container path -> host path of each ./ bind mount."""
    mounts: dict[PurePosixPath, Path] = {}
    for entry in service.get("volumes") or []:
        source, target = str(entry).split(":")[:2]
        if source.startswith("."):
            mounts[PurePosixPath(target)] = REPO / source
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path | None:
    """Where a file the container reads comes from, if from the repository."""
    path = PurePosixPath(container_path)
    for target, source in bind_mounts(service).items():
        if path == target:
            return source
        if target in path.parents:
            return source / path.relative_to(target)
    return None


def mosquitto_conf() -> str:
    return (REPO / "broker_config" / "mosquitto" / "mosquitto.conf").read_text()


def mosquitto_listeners() -> dict[int, dict[str, str]]:
    """Port -> the options that follow its ``listener`` line."""
    listeners: dict[int, dict[str, str]] = {}
    current: dict[str, str] | None = None
    for line in mosquitto_conf().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "listener":
            current = listeners.setdefault(int(words[1]), {})
        elif current is not None and len(words) == 2:
            current[words[0]] = words[1]
    return listeners


def emqx_listeners() -> dict[str, int]:
    """Listener name -> port, from ``listeners.tcp.<name> { bind = ... }``."""
    text = (REPO / "broker_config" / "emqx" / "emqx.conf").read_text()
    found = re.findall(r'listeners\.tcp\.(\w+) \{\s*bind = "[0-9.]+:(\d+)"', text)
    return {name: int(port) for name, port in found}


def services_acl_users() -> set[str]:
    text = (REPO / "broker_config" / "mosquitto" / "services.acl").read_text()
    return set(re.findall(r"^user (\S+)$", text, re.MULTILINE))


# --- the checks ----------------------------------------------------------------


def schema_problems(doc: Compose) -> list[str]:
    validator = jsonschema.Draft7Validator(json.loads(SPEC.read_text()))
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(doc)
    ]


def process_settings(module: str) -> Any:
    return importlib.import_module(f"{module}.settings").Settings


def command_problems(doc: Compose) -> list[str]:
    """Our services run ``python -m <process>`` with flags and env it knows."""
    problems: list[str] = []
    for name, service in doc["services"].items():
        if "build" not in service:
            continue
        command = service.get("command")
        if not (isinstance(command, list) and command[:2] == ["python", "-m"]):
            problems.append(f"{name}: command {command!r} is not python -m <process>")
            continue
        module, args = command[2], command[3:]
        if (
            module not in PROCESS_MODULES
            or not (REPO / module / "__main__.py").is_file()
        ):
            problems.append(f"{name}: {module!r} is not a kbbus process")
            continue
        settings = process_settings(module)
        values: dict[str, str] = {}
        for key, value in environment(service).items():
            if key.startswith("KBBUS_"):
                values[key.removeprefix("KBBUS_").lower()] = value
        for arg in args:
            if arg.startswith("--"):
                flag, _, value = arg[2:].partition("=")
                values[flag.replace("-", "_")] = value or "true"
        for field in values:
            if field not in settings.model_fields:
                problems.append(f"{name}: {module} has no setting {field!r}")
        known = {k: v for k, v in values.items() if k in settings.model_fields}
        try:
            settings.model_validate(known)
        except ValueError as exc:
            problems.append(f"{name}: {module} rejects its settings: {exc}")
    return problems


def dockerfile_problems(context: Path) -> list[str]:
    dockerfile = context / "Dockerfile"
    if not dockerfile.is_file():
        return [f"build context {context} has no Dockerfile"]
    problems = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not words[1].startswith("--"):
            for source in words[1:-1]:
                if not (context / source).exists():
                    problems.append(f"Dockerfile copies missing {source!r}")
    return problems


def service_file_problems(name: str, service: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    if "build" in service:
        build = service["build"]
        context = REPO / (build if isinstance(build, str) else build["context"])
        problems += [f"{name}: {p}" for p in dockerfile_problems(context)]
    for target, source in bind_mounts(service).items():
        if not source.exists():
            problems.append(f"{name}: mounts {source} at {target}, which is missing")
    for part in service.get("entrypoint") or []:
        if str(part).startswith("/") and part.endswith(".sh"):
            script = host_path(service, part)
            if script is None or not script.is_file():
                problems.append(f"{name}: entrypoint {part} is not in the repo")
    return problems


def broker_file_problems(services: dict[str, Any]) -> list[str]:
    """The files mosquitto.conf and emqx.conf name reach the containers."""
    problems: list[str] = []
    mosquitto = services.get("mosquitto")
    if mosquitto is not None:
        entrypoint = host_path(mosquitto, mosquitto["entrypoint"][-1])
        script = entrypoint.read_text() if entrypoint and entrypoint.is_file() else ""
        for option in ("acl_file", "password_file"):
            for path in re.findall(rf"^{option} (\S+)$", mosquitto_conf(), re.M):
                source = host_path(mosquitto, path)
                # Password files are made at start in the data volume.
                made = option == "password_file" and PurePosixPath(path).name in script
                if not made and (source is None or not source.is_file()):
                    problems.append(f"mosquitto: {option} {path} is not provided")
    for name in ("emqx1", "emqx2"):
        emqx = services.get(name)
        if emqx is not None and host_path(emqx, "/opt/emqx/etc/acl.conf") is None:
            problems.append(f"{name}: etc/acl.conf named in emqx.conf is not mounted")
    return problems


def file_problems(doc: Compose) -> list[str]:
    """Build contexts, mounted files and the files the brokers are told to read."""
    problems: list[str] = []
    for name, service in doc["services"].items():
        problems += service_file_problems(name, service)
    return problems + broker_file_problems(doc["services"])


def broker_port_problems(services: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    listeners = set(mosquitto_listeners())
    if "mosquitto" in services:
        published = target_ports(services["mosquitto"])
        if published != listeners:
            problems.append(
                f"mosquitto publishes {sorted(published)},"
                f" mosquitto.conf listens on {sorted(listeners)}"
            )
    emqx_ports = set(emqx_listeners().values()) | {EMQX_DASHBOARD_PORT}
    for name in ("emqx1", "emqx2"):
        if name in services and not target_ports(services[name]) <= emqx_ports:
            problems.append(f"{name} publishes ports emqx.conf does not listen on")
    return problems


def mqtt_url_problems(services: dict[str, Any], where: str, url: str) -> list[str]:
    """Service accounts reach the services listener of either broker."""
    parts = urlsplit(url)
    problems: list[str] = []
    for broker in (b for b in BROKERS if b in services):
        if parts.hostname not in services[broker]["networks"]["default"]["aliases"]:
            problems.append(f"{where}: host {parts.hostname} is not {broker}")
    services_ports = {
        port
        for port, options in mosquitto_listeners().items()
        if "use_username_as_clientid" not in options
    }
    if parts.port not in services_ports or parts.port != emqx_listeners()["services"]:
        problems.append(f"{where}: port {parts.port} is no services listener")
    if parts.username not in services_acl_users():
        problems.append(f"{where}: account {parts.username} is not in services.acl")
    return problems


def url_problems(services: dict[str, Any], where: str, url: str) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme == "mqtt":
        return mqtt_url_problems(services, where, url)
    if parts.hostname == "bridge":
        bridge_port = int(environment(services["bridge"])["KBBUS_PORT"])
        if parts.port != bridge_port:
            return [f"{where}: port {parts.port}, the bridge's is {bridge_port}"]
    elif parts.hostname == "postgres":
        if parts.port != POSTGRES_PORT:
            return [f"{where}: port {parts.port} is not PostgreSQL's"]
    else:
        return [f"{where}: names unknown host {parts.hostname}"]
    return []


def process_port_problems(name: str, service: dict[str, Any]) -> list[str]:
    """A kbbus process publishes and probes exactly the ports it listens on."""
    env = environment(service)
    listening = {int(env[k]) for k in ("KBBUS_PORT", "KBBUS_METRICS_PORT") if k in env}
    problems: list[str] = []
    if target_ports(service) != listening:
        problems.append(
            f"{name} publishes {sorted(target_ports(service))}"
            f" but listens on {sorted(listening)}"
        )
    probe = " ".join(map(str, service.get("healthcheck", {}).get("test", [])))
    for port in re.findall(r"127\.0\.0\.1:(\d+)", probe):
        if int(port) not in listening:
            problems.append(f"{name}: healthcheck probes {port}, not listened on")
    return problems


def port_problems(doc: Compose) -> list[str]:
    """Published ports are ones the processes listen on; URLs point at them."""
    services = doc["services"]
    problems = broker_port_problems(services)
    for name, service in services.items():
        for key, value in environment(service).items():
            if key.endswith("_URL"):
                problems += url_problems(services, f"{name} {key}", value)
        if "build" in service:
            problems += process_port_problems(name, service)
    return problems


def dependency_problems(doc: Compose) -> list[str]:
    services = doc["services"]
    problems: list[str] = []
    for name, service in services.items():
        for target, condition in (service.get("depends_on") or {}).items():
            if target not in services:
                problems.append(f"{name} depends on unknown service {target}")
            elif condition.get("condition") == "service_healthy" and (
                "healthcheck" not in services[target]
            ):
                problems.append(f"{name} waits for {target}, which has no healthcheck")
    return problems


CHECKS: dict[str, Callable[[Compose], list[str]]] = {
    "schema": schema_problems,
    "commands": command_problems,
    "files": file_problems,
    "ports": port_problems,
    "dependencies": dependency_problems,
}


@pytest.mark.parametrize("check", CHECKS)
def test_compose_file_passes(check: str) -> None:
    assert CHECKS[check](load_compose()) == []


# --- the checks fail on broken copies ----------------------------------------------


def _set(path: str, value: Any) -> Callable[[Compose], None]:
    def breaker(doc: Compose) -> None:
        *parents, last = path.split(".")
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return breaker


BREAKAGES: list[tuple[str, str, Callable[[Compose], None]]] = [
    ("schema", "unknown top-level key", _set("servcies", {})),
    ("schema", "misspelt service key", _set("services.bridge.comand", ["python"])),
    (
        "schema",
        "unknown condition",
        _set("services.bridge.depends_on.controller.condition", "service_sleepy"),
    ),
    (
        "commands",
        "unknown flag",
        _set("services.controller.command", ["python", "-m", "controller", "--nope"]),
    ),
    (
        "commands",
        "unknown module",
        _set("services.agents.command", ["python", "-m", "agents"]),
    ),
    ("commands", "bad value", _set("services.bridge.environment.KBBUS_PORT", "http")),
    (
        "commands",
        "unknown setting",
        _set("services.agents.environment.KBBUS_CONT", "1"),
    ),
    (
        "files",
        "missing mount",
        _set(
            "services.mosquitto.volumes",
            ["./broker_config/mosquito:/mosquitto/config:ro"],
        ),
    ),
    ("files", "missing context", _set("services.controller.build", "./nowhere")),
    ("ports", "wrong bridge port", _set("services.bridge.ports", ["8080:8081"])),
    (
        "ports",
        "unlistened broker port",
        _set("services.mosquitto.ports", ["1885:1885"]),
    ),
    (
        "ports",
        "agents listener for the controller",
        _set(
            "services.controller.environment.KBBUS_MQTT_URL",
            "mqtt://kbbus-controller:pw@broker:1883",
        ),
    ),
    (
        "ports",
        "unknown account",
        _set(
            "services.bridge.environment.KBBUS_MQTT_URL",
            "mqtt://bridge:pw@broker:1884",
        ),
    ),
    (
        "dependencies",
        "unknown service",
        _set(
            "services.bridge.depends_on",
            {"controler": {"condition": "service_started"}},
        ),
    ),
    (
        "dependencies",
        "no healthcheck to wait for",
        _set(
            "services.bridge.depends_on", {"agents": {"condition": "service_healthy"}}
        ),
    ),
]


@pytest.mark.parametrize(
    ("check", "breakage", "breaker"),
    BREAKAGES,
    ids=[f"{check}: {breakage}" for check, breakage, _ in BREAKAGES],
)
def test_check_finds_a_broken_copy(
    check: str, breakage: str, breaker: Callable[[Compose], None]
) -> None:
    doc = load_compose()
    breaker(doc)
    assert CHECKS[check](doc) != [], f"{check} did not notice: {breakage}"


def test_default_profile_is_mosquitto_and_emqx_replaces_it() -> None:
    """docker compose reads COMPOSE_PROFILES from .env; --profile overrides it."""
    dotenv = (REPO / ".env").read_text()
    assert re.search(r"^COMPOSE_PROFILES=mosquitto$", dotenv, re.MULTILINE)
    services = load_compose()["services"]
    assert services["mosquitto"]["profiles"] == ["mosquitto"]
    assert services["emqx1"]["profiles"] == services["emqx2"]["profiles"] == ["emqx"]
    for name in ("controller", "bridge", "agents", "postgres"):
        assert "profiles" not in services[name], f"{name} must run in every profile"
