"""The ``kbbus`` command line."""

import asyncio
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from kbbus import operator
from kbbus.broker import TlsFiles
from kbbus.up import UpError, UpOptions, run_up

app = typer.Typer(
    name="kbbus",
    help="A control plane for fleets of machine agents, carried over MQTT.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema management.", no_args_is_help=True)
app.add_typer(db_app, name="db")
keys_app = typer.Typer(
    help="The controller's task-signing keys (a running controller picks up "
    "changes within --signing-key-check-s).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")
KeyDir = Annotated[
    Path,
    typer.Option(
        "--signing-key-dir",
        envvar="KBBUS_SIGNING_KEY_DIR",
        help="The controller's key directory.",
    ),
]
DEFAULT_KEY_DIR = Path(".kbbus/keys")

console = Console()
err_console = Console(stderr=True)

HttpUrl = Annotated[
    str,
    typer.Option(
        "--http-url",
        envvar="KBBUS_HTTP_URL",
        help="Where the HTTP bridge listens.",
    ),
]
DEFAULT_HTTP_URL = "http://127.0.0.1:8080"
#: Names the command in the --help of a process run through ``kbbus``.
PROG_ENV = "KBBUS_CLI_PROG"
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}


def _exit(code: int) -> None:
    raise typer.Exit(code)


def _exec_module(module: str, command: str, args: list[str]) -> None:
    """Replace this process by ``python -m module args`` (same flags, same env);
    its ``--help`` and errors then name it ``kbbus <command>``."""
    env = {**os.environ, PROG_ENV: f"kbbus {command}"}
    os.execve(sys.executable, [sys.executable, "-m", module, *args], env)


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def controller(ctx: typer.Context) -> None:
    """Run the controller alone (flags: see `kbbus controller --help`)."""
    _exec_module("controller", "controller", ctx.args)


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def bridge(ctx: typer.Context) -> None:
    """Run the HTTP bridge alone (flags: see `kbbus bridge --help`)."""
    _exec_module("bridge_http", "bridge", ctx.args)


@app.command(context_settings=PASS_THROUGH, add_help_option=False)
def agents(ctx: typer.Context) -> None:
    """Run simulated agents (flags: see `kbbus agents --help`)."""
    _exec_module("agent_sim", "agents", ctx.args)


@app.command()
def up(
    mqtt_port: Annotated[
        int, typer.Option(envvar="KBBUS_MQTT_PORT", help="Embedded broker port.")
    ] = 1883,
    http_port: Annotated[
        int, typer.Option(envvar="KBBUS_HTTP_PORT", help="HTTP bridge port.")
    ] = 8080,
    db_url: Annotated[
        str | None,
        typer.Option(
            envvar="KBBUS_DB_URL", help="SQLAlchemy URL; default SQLite in ./.kbbus/."
        ),
    ] = None,
    agents: Annotated[
        int, typer.Option(envvar="KBBUS_AGENTS", help="Simulated agents to start.")
    ] = 0,
    offline_after_s: Annotated[
        float | None,
        typer.Option(envvar="KBBUS_OFFLINE_AFTER_S", help="Controller presence timer."),
    ] = None,
    sweep_interval_s: Annotated[
        float | None,
        typer.Option(envvar="KBBUS_SWEEP_INTERVAL_S", help="Presence sweep interval."),
    ] = None,
    heartbeat_s: Annotated[
        float | None,
        typer.Option(envvar="KBBUS_HEARTBEAT_S", help="Simulated agents' heartbeat."),
    ] = None,
    data_dir: Annotated[
        Path, typer.Option(envvar="KBBUS_DATA_DIR", help="Where state is kept.")
    ] = Path(".kbbus"),
    log_format: Annotated[
        str, typer.Option(envvar="KBBUS_LOG_FORMAT", help="text or json.")
    ] = "text",
    open_enrolment: Annotated[
        bool,
        typer.Option(
            envvar="KBBUS_OPEN_ENROLMENT",
            help="A lab: anyone may connect to the broker and register.",
        ),
    ] = False,
    enrolment_token: Annotated[
        str | None,
        typer.Option(
            envvar="KBBUS_ENROLMENT_TOKEN",
            help="Agents register with this; generated when unset.",
            show_default=False,
        ),
    ] = None,
    tls_certfile: Annotated[
        Path | None,
        typer.Option(envvar="KBBUS_TLS_CERTFILE", help="Broker TLS certificate."),
    ] = None,
    tls_keyfile: Annotated[
        Path | None,
        typer.Option(envvar="KBBUS_TLS_KEYFILE", help="Broker TLS private key."),
    ] = None,
) -> None:
    """Everything on embedded defaults: broker, controller, bridge, and agents.

    Secure unless --open-enrolment: the broker requires accounts, and agents
    register with an enrolment token (generated, kept in DATA_DIR/secrets.json
    and printed when none is given).
    """
    if (tls_certfile is None) != (tls_keyfile is None):
        err_console.print("kbbus up: give both --tls-certfile and --tls-keyfile")
        _exit(operator.EXIT_USAGE)
    tls = (
        TlsFiles(tls_certfile, tls_keyfile)
        if tls_certfile is not None and tls_keyfile is not None
        else None
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    # amqtt logs every connection and its state machine every transition at
    # INFO (and payloads at DEBUG): with a fleet that drowns our own lines.
    for noisy in ("amqtt", "transitions"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    controller_args = ["--log-format", log_format]
    if offline_after_s is not None:
        controller_args += ["--offline-after-s", str(offline_after_s)]
    if sweep_interval_s is not None:
        controller_args += ["--sweep-interval-s", str(sweep_interval_s)]
    agent_args = []
    if heartbeat_s is not None:
        agent_args += ["--heartbeat-s", str(heartbeat_s)]
    opts = UpOptions(
        mqtt_port=mqtt_port,
        http_port=http_port,
        db_url=db_url,
        agents=agents,
        data_dir=data_dir,
        controller_args=controller_args,
        bridge_args=["--log-format", log_format],
        agent_args=agent_args,
        open_enrolment=open_enrolment,
        enrolment_token=enrolment_token,
        tls=tls,
    )
    try:
        code = asyncio.run(run_up(opts))
    except UpError as exc:
        err_console.print(f"kbbus up: {exc}", highlight=False, soft_wrap=True)
        _exit(operator.EXIT_USAGE)
    _exit(code)


def _operator_call(fn: object, *args: object, **kw: object) -> None:
    try:
        code = fn(*args, **kw)  # type: ignore[operator]
    except operator.OperatorError as exc:
        err_console.print(f"kbbus: {exc}", highlight=False, soft_wrap=True)
        _exit(exc.exit_code)
    except KeyboardInterrupt:
        _exit(130)
    _exit(code)


@app.command()
def trigger(
    agent_id: Annotated[str, typer.Argument(help="The agent to run the KB on.")],
    kb_id: Annotated[str, typer.Argument(help="The KB, e.g. dns-flush-kb.")],
    param: Annotated[
        list[str] | None, typer.Option("--param", "-p", help="A parameter, k=v.")
    ] = None,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once the workflow is accepted.")
    ] = False,
    timeout_s: Annotated[
        float, typer.Option(help="How long to follow the workflow.")
    ] = 600.0,
    idempotency_key: Annotated[str | None, typer.Option()] = None,
    http_url: HttpUrl = DEFAULT_HTTP_URL,
) -> None:
    """Trigger a KB on an agent and follow it to its end.

    Exit codes: 0 succeeded, 1 failed/timed out/canceled, 2 refused (unknown
    agent or KB, bad parameters), 3 bridge or controller unreachable, 4 gave up
    waiting.
    """
    try:
        params = operator.parse_params(param or [])
    except operator.OperatorError as exc:
        err_console.print(f"kbbus: {exc}")
        _exit(exc.exit_code)
    _operator_call(
        operator.trigger,
        http_url,
        agent_id,
        kb_id,
        params,
        wait=not no_wait,
        timeout_s=timeout_s,
        idempotency_key=idempotency_key,
        console=console,
    )


@app.command()
def status(http_url: HttpUrl = DEFAULT_HTTP_URL) -> None:
    """The fleet and recent workflows, as tables."""
    _operator_call(operator.status, http_url, console)


@app.command()
def watch(http_url: HttpUrl = DEFAULT_HTTP_URL) -> None:
    """A live view of agent and workflow events."""
    _operator_call(operator.watch, http_url, console)


@app.command()
def kbs(http_url: HttpUrl = DEFAULT_HTTP_URL) -> None:
    """The KB catalog."""
    _operator_call(operator.kbs, http_url, console)


@app.command()
def bench(
    quick: Annotated[
        bool, typer.Option("--quick", help="Small sizes: under a minute.")
    ] = False,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the figures to this file.")
    ] = None,
    broker: Annotated[
        str, typer.Option(help="Broker to start: mosquitto or amqtt.")
    ] = "mosquitto",
    db: Annotated[str, typer.Option(help="Database: postgres or sqlite.")] = "postgres",
    mqtt_url: Annotated[
        str | None, typer.Option(help="Use this broker instead of starting one.")
    ] = None,
    db_url: Annotated[
        str | None, typer.Option(help="Use this database instead of a new one.")
    ] = None,
    only: Annotated[
        list[str] | None,
        typer.Option(
            help="Run only these scenarios (workflow, heartbeats, presence, "
            "longpoll, fleet)."
        ),
    ] = None,
) -> None:
    """Measure kbbus against the raw broker, in one run."""
    from kbbus import bench as bench_mod

    if broker not in ("mosquitto", "amqtt") or db not in ("postgres", "sqlite"):
        err_console.print("kbbus bench: --broker mosquitto|amqtt, --db postgres|sqlite")
        _exit(operator.EXIT_USAGE)
    unknown = set(only or []) - set(bench_mod.SCENARIOS)
    if unknown:
        err_console.print(f"kbbus bench: unknown scenarios {sorted(unknown)}")
        _exit(operator.EXIT_USAGE)
    _exit(
        bench_mod.main(
            quick=quick,
            json_path=json_file,
            broker=broker,
            db=db,
            mqtt_url=mqtt_url,
            db_url=db_url,
            only=only or [],
            console=console,
        )
    )


@db_app.command("upgrade")
def db_upgrade(
    db_url: Annotated[
        str, typer.Option(envvar="KBBUS_DB_URL", help="SQLAlchemy URL.")
    ] = "sqlite:///.kbbus/kbbus.db",
) -> None:
    """Bring the database schema up to date (the controller also does on start)."""
    from controller.store import upgrade

    if db_url.startswith("sqlite:///"):
        Path(db_url.removeprefix("sqlite:///")).parent.mkdir(
            parents=True, exist_ok=True
        )
    upgrade(db_url)
    console.print(f"database at {db_url} is up to date")


@app.command("mosquitto-dynsec")
def mosquitto_dynsec(
    path: Annotated[Path, typer.Argument(help="The file to write.")],
    topic_root: Annotated[
        str, typer.Option(envvar="KBBUS_TOPIC_ROOT", help="Topic root.")
    ] = "kbbus/v1",
) -> None:
    """Write Mosquitto's dynamic-security file: the service accounts (passwords
    from KBBUS_MQTT_CONTROLLER_PASSWORD, _BRIDGE_, _OPERATOR_) and the enrolment
    account (KBBUS_ENROLMENT_TOKEN). The controller adds agents at run time
    (--mosquitto-dynsec)."""
    import json

    from controller.dynsec import initial_config
    from schemas.access import SERVICE_ROLES

    passwords = {}
    for username in SERVICE_ROLES:
        name = username.removeprefix("kbbus-").upper()
        value = os.environ.get(f"KBBUS_MQTT_{name}_PASSWORD")
        if value:
            passwords[username] = value
    token = os.environ.get("KBBUS_ENROLMENT_TOKEN")
    config = initial_config(topic_root, passwords, token)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(config, out, indent=2)
    console.print(
        f"wrote {path}: accounts {', '.join(sorted(passwords)) or 'none'}"
        f"{', kbbus-enrol' if token else ''}"
    )


def _keys_call(fn: object, *args: object) -> object:
    from controller.signing import SigningError

    try:
        return fn(*args)  # type: ignore[operator]
    except SigningError as exc:
        err_console.print(f"kbbus keys: {exc}", highlight=False, soft_wrap=True)
        _exit(operator.EXIT_USAGE)
    return None  # pragma: no cover


@keys_app.command("list")
def keys_list(key_dir: KeyDir = DEFAULT_KEY_DIR) -> None:
    """The keys agents accept, the active (signing) one first."""
    from controller.signing import Keyring

    keyring = _keys_call(Keyring.load, key_dir)
    assert isinstance(keyring, Keyring)
    for i, key in enumerate(keyring.signing_keys()):
        mark = "active " if i == 0 else "listed "
        console.print(f"{mark}{key.key_id} {key.public_key}", highlight=False)


@keys_app.command("rotate")
def keys_rotate(key_dir: KeyDir = DEFAULT_KEY_DIR) -> None:
    """Make a new signing key; older keys stay listed until retired."""
    from controller.signing import rotate

    key_id = _keys_call(rotate, key_dir)
    console.print(
        f"new active key {key_id} in {key_dir}; agents learn it from the signed "
        "key set the controller publishes. Retire the old key once they have.",
        highlight=False,
    )


@keys_app.command("retire")
def keys_retire(
    key_id: Annotated[str, typer.Argument(help="The key to stop accepting.")],
    key_dir: KeyDir = DEFAULT_KEY_DIR,
) -> None:
    """Remove a key: agents drop it with the next key set."""
    from controller.signing import retire

    _keys_call(retire, key_dir, key_id)
    console.print(f"retired {key_id}", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
