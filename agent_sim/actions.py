"""The actions KB steps call, simulated by default and real with ``--exec``.

A simulated action sleeps for a latency drawn from the configured distribution,
fails at the configured rate and otherwise prints output shaped like the real
thing; with the same seed and the same tasks it does the same. A real action
runs only if ``--exec`` is on and its name is on the allow-list. Real actions
run commands as argument vectors (never through a shell), each under a
timeout, and an unknown action fails the step with a message naming the known
ones.
"""

import asyncio
import json
import os
import re
import shutil
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import psutil

from schemas.messages import ResultStatus

MAX_OUTPUT_CHARS = 64 * 1024
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9@._-]{0,127}$")
_HOST_NAME = re.compile(r"^[A-Za-z0-9._:-]{1,253}$")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What running an action produced."""

    status: ResultStatus
    exit_code: int | None
    output: str = ""
    error: str | None = None

    @classmethod
    def ok(cls, output: str) -> "Outcome":
        return cls(ResultStatus.SUCCEEDED, 0, output[:MAX_OUTPUT_CHARS])

    @classmethod
    def failed(
        cls, error: str, output: str = "", exit_code: int | None = 1
    ) -> "Outcome":
        return cls(
            ResultStatus.FAILED, exit_code, output[:MAX_OUTPUT_CHARS], error[:255]
        )


Args = dict[str, Any]
Simulated = Callable[[Args, Random], str]
Real = Callable[[Args, "ActionRunner", float], Awaitable[Outcome]]


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    simulate: Simulated
    real: Real
    describe: str


# --- simulated outputs ---------------------------------------------------------


def _sim_dns_flush(args: Args, rng: Random) -> str:
    return f"Flushed DNS resolver caches: {rng.randint(0, 400)} entries removed."


def _sim_dns_resolve(args: Args, rng: Random) -> str:
    name = str(args.get("name") or args.get("host") or "example.com")
    ip = f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
    return f"{name} -> {ip}"


def _sim_service_restart(args: Args, rng: Random) -> str:
    name = str(args.get("name", "app"))
    old, new = rng.randint(300, 30000), rng.randint(30001, 60000)
    return f"{name}: restarted (pid {old} -> {new}), active (running)"


def _sim_service_status(args: Args, rng: Random) -> str:
    return f"{args.get('name', 'app')}: active (running)"


def _sim_disk_usage(args: Args, rng: Random) -> str:
    total = 100 * 1024**3
    used = int(total * rng.uniform(0.2, 0.95))
    return _usage_text(str(args.get("path", "/")), total, used, total - used)


def _sim_disk_cleanup(args: Args, rng: Random) -> str:
    files = rng.randint(0, 500)
    return f"removed {files} files from {args.get('path', '/tmp')}, freed " + (
        f"{files * rng.randint(10, 4000) // 1024} MiB"
    )


def _sim_diagnostics(args: Args, rng: Random) -> str:
    return json.dumps(
        {
            "load1": round(rng.uniform(0.0, 4.0), 2),
            "cpu_percent": round(rng.uniform(1, 99), 1),
            "mem_percent": round(rng.uniform(10, 95), 1),
            "disk_percent": round(rng.uniform(10, 95), 1),
            "processes": rng.randint(80, 600),
            "uptime_s": rng.randint(60, 3_000_000),
        },
        sort_keys=True,
    )


def _sim_sleep(args: Args, rng: Random) -> str:
    return f"slept {float(args.get('seconds', 0)):g}s"


def _sim_echo(args: Args, rng: Random) -> str:
    return _echo_text(args)


def _echo_text(args: Args) -> str:
    if "message" in args:
        return str(args["message"])
    return json.dumps(args, sort_keys=True, default=str)


def _usage_text(path: str, total: int, used: int, free: int) -> str:
    gib = 1024**3
    return (
        f"{path}: total {total / gib:.1f} GiB, used {used / gib:.1f} GiB "
        f"({100 * used / max(total, 1):.0f}%), free {free / gib:.1f} GiB"
    )


# --- real implementations ----------------------------------------------------


async def run_argv(argv: list[str], timeout_s: float) -> Outcome:
    """Run a command (no shell) under a deadline; kill it when the deadline passes."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
    except OSError as exc:
        return Outcome.failed(
            f"cannot run {argv[0]}: {exc.strerror or exc}", exit_code=None
        )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return Outcome.failed(f"{argv[0]} did not finish within {timeout_s:g}s")
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        return Outcome.failed(
            f"{' '.join(argv)} exited with {proc.returncode}", text, proc.returncode
        )
    return Outcome.ok(text)


def _dns_flush_argv() -> list[str] | None:
    """The platform's command to flush its DNS cache, if it has one."""
    if sys.platform == "darwin":
        return ["dscacheutil", "-flushcache"]
    if sys.platform == "win32":
        return ["ipconfig", "/flushdns"]
    for argv in (
        ["resolvectl", "flush-caches"],
        ["systemd-resolve", "--flush-caches"],
        ["nscd", "--invalidate=hosts"],
    ):
        if shutil.which(argv[0]):
            return argv
    return None


async def _real_dns_flush(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    argv = _dns_flush_argv()
    if argv is None:
        return Outcome.failed(
            "no DNS cache to flush here: none of resolvectl, systemd-resolve or "
            "nscd is installed",
            exit_code=None,
        )
    outcome = await run_argv(argv, timeout_s)
    if outcome.status is ResultStatus.SUCCEEDED and not outcome.output:
        return Outcome.ok(f"{' '.join(argv)}: DNS caches flushed")
    return outcome


async def _real_dns_resolve(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    name = str(args.get("name") or args.get("host") or "")
    if not _HOST_NAME.match(name):
        return Outcome.failed(f"dns.resolve needs a host name in 'name', got {name!r}")
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout_s):
            infos = await loop.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except TimeoutError:
        return Outcome.failed(f"resolving {name} took longer than {timeout_s:g}s")
    except socket.gaierror as exc:
        return Outcome.failed(f"cannot resolve {name}: {exc.strerror}")
    addresses = sorted({str(info[4][0]) for info in infos})
    took_ms = (time.monotonic() - started) * 1000
    return Outcome.ok(f"{name} -> {', '.join(addresses)} ({took_ms:.1f} ms)")


async def _real_service(
    verb: str, args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    name = str(args.get("name", ""))
    if not _SERVICE_NAME.match(name):
        return Outcome.failed(
            f"service.{verb} needs a unit name in 'name', got {name!r}"
        )
    if shutil.which("systemctl") is None:
        return Outcome.failed("systemctl is not installed on this host", exit_code=None)
    cmd = "is-active" if verb == "status" else "restart"
    return await run_argv(["systemctl", cmd, "--", name], timeout_s)


async def _real_service_restart(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    return await _real_service("restart", args, runner, timeout_s)


async def _real_service_status(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    return await _real_service("status", args, runner, timeout_s)


async def _real_disk_usage(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    path = str(args.get("path", "/"))
    try:
        usage = shutil.disk_usage(path)
    except OSError as exc:
        return Outcome.failed(f"cannot read disk usage of {path}: {exc.strerror}")
    return Outcome.ok(_usage_text(path, usage.total, usage.used, usage.free))


def _cleanup(
    path: str, older_than_s: float, allowed: tuple[Path, ...], deadline: float
) -> Outcome:
    root = Path(path).resolve()
    if not any(root == r or root.is_relative_to(r) for r in allowed):
        return Outcome.failed(
            f"disk.cleanup may not touch {root}: it is outside --cleanup-roots"
        )
    removed = freed = 0
    cutoff = time.time() - older_than_s
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if time.monotonic() > deadline:
                break
            file = Path(dirpath) / name
            try:
                info = file.lstat()
                if file.is_symlink() or info.st_mtime > cutoff:
                    continue
                file.unlink()
            except OSError:
                continue
            removed += 1
            freed += info.st_size
    return Outcome.ok(f"removed {removed} files from {root}, freed {freed // 1024} KiB")


async def _real_disk_cleanup(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    days = float(args.get("older_than_days", 7))
    deadline = time.monotonic() + timeout_s
    return await asyncio.to_thread(
        _cleanup, str(args.get("path", "")), days * 86400, runner.cleanup_dirs, deadline
    )


async def _real_diagnostics(
    args: Args, runner: "ActionRunner", timeout_s: float
) -> Outcome:
    def collect() -> dict[str, float]:
        return {
            "load1": os.getloadavg()[0],
            "cpu_percent": psutil.cpu_percent(interval=0.1),
            "mem_percent": psutil.virtual_memory().percent,
            "disk_percent": psutil.disk_usage("/").percent,
            "processes": len(psutil.pids()),
            "uptime_s": round(time.time() - psutil.boot_time()),
        }

    async with asyncio.timeout(timeout_s):
        figures = await asyncio.to_thread(collect)
    return Outcome.ok(json.dumps(figures, sort_keys=True))


async def _real_sleep(args: Args, runner: "ActionRunner", timeout_s: float) -> Outcome:
    seconds = float(args.get("seconds", 0))
    await asyncio.sleep(seconds)
    return Outcome.ok(_sim_sleep(args, Random(0)))


async def _real_echo(args: Args, runner: "ActionRunner", timeout_s: float) -> Outcome:
    return Outcome.ok(_echo_text(args))


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action("dns.flush", _sim_dns_flush, _real_dns_flush, "flush the DNS cache"),
        Action("dns.resolve", _sim_dns_resolve, _real_dns_resolve, "resolve a name"),
        Action(
            "service.restart",
            _sim_service_restart,
            _real_service_restart,
            "restart a systemd unit",
        ),
        Action(
            "service.status",
            _sim_service_status,
            _real_service_status,
            "is a systemd unit active",
        ),
        Action("disk.usage", _sim_disk_usage, _real_disk_usage, "disk figures"),
        Action(
            "disk.cleanup",
            _sim_disk_cleanup,
            _real_disk_cleanup,
            "remove old files under an allowed root",
        ),
        Action(
            "diagnostics.collect",
            _sim_diagnostics,
            _real_diagnostics,
            "load, CPU, memory, disk and process figures",
        ),
        Action("sleep", _sim_sleep, _real_sleep, "wait for 'seconds'"),
        Action("echo", _sim_echo, _real_echo, "answer with the arguments"),
    )
}


class ActionRunner:
    """Runs named actions the way the agent's flags say: simulated or real."""

    def __init__(
        self,
        *,
        exec_real: bool = False,
        allow: frozenset[str] = frozenset(),
        latency_ms: float = 0.0,
        latency_dist: str = "fixed",
        fail_rate: float = 0.0,
        action_timeout_s: float = 300.0,
        cleanup_dirs: tuple[Path, ...] = (),
    ) -> None:
        self.exec_real = exec_real
        self.allow = allow
        self.latency_ms = latency_ms
        self.latency_dist = latency_dist
        self.fail_rate = fail_rate
        self.action_timeout_s = action_timeout_s
        self.cleanup_dirs = cleanup_dirs

    def latency_s(self, rng: Random) -> float:
        mean = self.latency_ms / 1000
        if mean <= 0:
            return 0.0
        if self.latency_dist == "uniform":
            return rng.uniform(0, 2 * mean)
        if self.latency_dist == "exponential":
            return rng.expovariate(1 / mean)
        return mean

    async def run(
        self, name: str, args: Args, timeout_s: float, rng: Random
    ) -> Outcome:
        """Run ``name`` within ``timeout_s``; every failure becomes an Outcome."""
        action = ACTIONS.get(name)
        if action is None:
            return Outcome.failed(
                f"unknown action {name!r}; this agent knows "
                + ", ".join(sorted(ACTIONS)),
                exit_code=None,
            )
        timeout_s = min(timeout_s, self.action_timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                if self.exec_real:
                    return await self._run_real(action, args, timeout_s)
                return await self._simulate(action, args, rng)
        except TimeoutError:
            return Outcome.failed(f"{name} did not finish within {timeout_s:g}s")
        except (ValueError, TypeError) as exc:
            return Outcome.failed(f"{name}: bad arguments: {exc}")

    async def _run_real(self, action: Action, args: Args, timeout_s: float) -> Outcome:
        if action.name not in self.allow:
            return Outcome.failed(
                f"action {action.name!r} is not on this agent's --exec-allow list",
                exit_code=None,
            )
        return await action.real(args, self, timeout_s)

    async def _simulate(self, action: Action, args: Args, rng: Random) -> Outcome:
        # Draw everything first, so an outcome depends only on the seed.
        delay = self.latency_s(rng)
        fails = self.fail_rate > 0 and rng.random() < self.fail_rate
        output = action.simulate(args, rng)
        if action.name == "sleep":
            delay += float(args.get("seconds", 0))
        if delay > 0:
            await asyncio.sleep(delay)
        if fails:
            return Outcome.failed(
                f"{action.name} failed (simulated)", f"error: {action.describe} failed"
            )
        return Outcome.ok(output)
