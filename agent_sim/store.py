"""The per-agent state file: id, last epoch, and the tasks it started and finished.

It is written before anything that depends on it goes on the wire: the epoch
before CONNECT, a task id before the task runs, a result before it is
published. That is what lets an agent answer a task it has already seen with
the stored result, across restarts, instead of running it twice. It is not
fsynced: it survives a crash of the agent, not a power cut of its host.

Two slots, ``agent-N.json`` and ``agent-N.json.b``, written in turn in place.
Each holds a header line (``kbbus-agent-state v1 seq=.. len=.. crc32=..``)
and the state as JSON; loading takes the valid slot with the highest
sequence number, so a write cut short by a crash leaves the slot written
before it. Creating a file and renaming it over the old one, twice per task,
cost the kernel ~100 us a write and was most of a simulated fleet's CPU;
overwriting an existing file costs a few. A file of one plain JSON object
(written before the slots) is read as the first of them.
"""

import asyncio
import json
import os
import re
import threading
import zlib
from pathlib import Path
from typing import Any

from agent_sim.errors import StateFileError

STATE_VERSION = 1
_HEADER = b"kbbus-agent-state v1 seq=%d len=%d crc32=%08x\n"
_HEADER_RE = re.compile(
    rb"kbbus-agent-state v1 seq=(\d+) len=(\d+) crc32=([0-9a-f]{8})\n"
)
#: One state write at a time in this process: a slot is never written by two
#: threads at once, and the other slot always holds a whole earlier state.
_WRITE_LOCK = threading.Lock()


class AgentState:
    """An agent's persistent state.

    ``next_epoch`` and ``load_or_create`` write the file; the other changes
    are made in memory and stored by ``save`` (blocking) or ``persist``
    (in a worker thread), which the caller awaits before acting on them.
    """

    __slots__ = (
        "_seq",
        "_writing",
        "agent_id",
        "finished",
        "last_epoch",
        "max_finished",
        "mqtt_password",
        "path",
        "started",
    )

    def __init__(
        self,
        path: Path,
        agent_id: str,
        *,
        max_finished: int = 64,
        last_epoch: int = 0,
        mqtt_password: str | None = None,
        started: list[str] | None = None,
        finished: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.agent_id = agent_id
        self.max_finished = max_finished
        self.last_epoch = last_epoch
        #: The agent's own broker password, issued at enrolment (None: none yet,
        #: or a broker without accounts).
        self.mqtt_password = mqtt_password
        # Task ids that began running and have no result yet. Usually empty, so
        # None rather than an empty list to keep thousands of agents small.
        self.started: list[str] | None = started or None
        #: task id -> the result as JSON text, oldest first.
        self.finished: dict[str, str] = finished or {}
        self._writing: asyncio.Future[None] | None = None
        #: The sequence number of the last snapshot taken (0: none yet).
        self._seq = 0

    # --- loading ------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, *, max_finished: int = 64) -> "AgentState | None":
        """The state stored at ``path``, or None when there is no file yet."""
        found: list[tuple[int, dict[str, Any]]] = []
        problems: list[str] = []
        for slot in (path, _other_slot(path)):
            try:
                raw = slot.read_bytes()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise StateFileError(
                    f"Cannot read agent state file {slot}: {exc}"
                ) from exc
            try:
                found.append(_parse_slot(raw))
            except ValueError as exc:
                problems.append(f"{slot.name}: {exc}")
        if not found:
            if not problems:
                return None
            raise StateFileError(
                f"Agent state file {path} is not valid ({'; '.join(problems)}); "
                "repair it, or delete it to start as a new agent with a new id."
            )
        seq, data = max(found, key=lambda item: item[0])
        try:
            agent_id = data["agent_id"]
            if not isinstance(agent_id, str) or not agent_id:
                raise ValueError("agent_id is not a non-empty string")
            state = cls(
                path,
                agent_id,
                max_finished=max_finished,
                last_epoch=int(data.get("last_epoch", 0)),
                mqtt_password=data.get("mqtt_password") or None,
                started=[str(t) for t in data.get("started", [])],
                finished={str(t): str(r) for t, r in data.get("finished", [])},
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(
                f"Agent state file {path} is not valid ({exc}); repair it, or delete "
                "it to start as a new agent with a new id."
            ) from exc
        state._seq = seq
        state._trim()
        return state

    @classmethod
    def load_or_create(
        cls, path: Path, new_id: str, *, max_finished: int = 64
    ) -> "AgentState":
        state = cls.load(path, max_finished=max_finished)
        if state is None:
            state = cls(path, new_id, max_finished=max_finished)
            state.save()
        return state

    # --- changes --------------------------------------------------------------
    def next_epoch(self, now_ms: int) -> int:
        """A connection epoch strictly greater than every earlier one, stored."""
        self.last_epoch = max(now_ms, self.last_epoch + 1)
        self.save()
        return self.last_epoch

    async def next_epoch_async(self, now_ms: int) -> int:
        """``next_epoch`` with the file written off the event loop."""
        self.last_epoch = max(now_ms, self.last_epoch + 1)
        epoch = self.last_epoch
        await self.persist()
        return epoch

    def mark_started(self, task_id: str) -> None:
        if self.started is None:
            self.started = []
        self.started.append(task_id)

    def finish(self, task_id: str, result_json: str) -> None:
        """Remember ``task_id``'s result and forget that it was running (in
        memory: call ``save`` or ``persist`` to store it)."""
        if self.started is not None and task_id in self.started:
            self.started.remove(task_id)
            if not self.started:
                self.started = None
        self.finished.pop(task_id, None)
        self.finished[task_id] = result_json
        self._trim()

    def result_of(self, task_id: str) -> str | None:
        return self.finished.get(task_id)

    def _trim(self) -> None:
        while len(self.finished) > self.max_finished:
            del self.finished[next(iter(self.finished))]

    def _snapshot(self) -> tuple[int, str]:
        """The state as JSON, with the sequence number it is stored under."""
        data = {
            "v": STATE_VERSION,
            "agent_id": self.agent_id,
            "last_epoch": self.last_epoch,
            **({"mqtt_password": self.mqtt_password} if self.mqtt_password else {}),
            "started": self.started or [],
            "finished": list(self.finished.items()),
        }
        self._seq += 1
        return self._seq, json.dumps(data, separators=(",", ":"))

    def _write(self, snapshot: tuple[int, str]) -> None:
        seq, text = snapshot
        body = text.encode()
        data = _HEADER % (seq, len(body), zlib.crc32(body)) + body
        # Odd sequence numbers go to agent-N.json, even ones to agent-N.json.b.
        slot = self.path if seq % 2 else _other_slot(self.path)
        try:
            with _WRITE_LOCK:
                if seq == 1:
                    # A new state object (a new agent, or a new identity):
                    # whatever an older one left in the other slot must not
                    # outrank it. Removed first: a crash in between leaves
                    # the old state whole, as if this write never began.
                    _other_slot(self.path).unlink(missing_ok=True)
                    _create(slot, data)
                    return
                try:
                    fd = os.open(slot, os.O_WRONLY)
                except FileNotFoundError:
                    _create(slot, data)
                    return
                try:
                    written = 0
                    while written < len(data):
                        written += os.pwrite(fd, data[written:], written)
                finally:
                    os.close(fd)
        except OSError as exc:
            raise StateFileError(
                f"Cannot write agent state file {slot}: {exc}"
            ) from exc

    def save(self) -> None:
        """Write the state now, blocking."""
        self._write(self._snapshot())

    async def persist(self) -> None:
        """Write the state in a worker thread; returns once it is on disk.

        A rename costs up to a few milliseconds on a busy disk: thousands of
        agents must not wait for each other's on the event loop. Writes of one
        agent never overlap, and a write that started before this call is
        followed by one that includes everything changed until now.
        """
        while (earlier := self._writing) is not None:
            # A finished write whose owner has not resumed yet is still
            # here: awaiting a done future does not yield, so clear it
            # rather than spin. ``wait`` neither raises the earlier write's
            # error (its owner gets that) nor cancels it if we are cancelled.
            if not earlier.done():
                await asyncio.wait([earlier])
            if self._writing is earlier:
                self._writing = None
        loop = asyncio.get_running_loop()
        writing = loop.run_in_executor(None, self._write, self._snapshot())
        self._writing = writing
        try:
            await asyncio.shield(writing)
        finally:
            if self._writing is writing:
                self._writing = None


def _other_slot(path: Path) -> Path:
    return path.with_name(f"{path.name}.b")


def _parse_slot(raw: bytes) -> tuple[int, dict[str, Any]]:
    """(sequence number, state) of one slot; ValueError if it is not whole."""
    if raw.startswith(b"{"):
        # One plain JSON object: the format before the slots, the first state.
        return 1, _object(raw)
    header = _HEADER_RE.match(raw)
    if header is None:
        raise ValueError("no kbbus-agent-state header")
    seq, length, crc = int(header[1]), int(header[2]), int(header[3], 16)
    body = raw[header.end() : header.end() + length]
    if len(body) != length or zlib.crc32(body) != crc:
        raise ValueError(f"state {seq} is incomplete (a write cut short)")
    return seq, _object(body)


def _object(raw: bytes) -> dict[str, Any]:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _create(slot: Path, data: bytes) -> None:
    """Make ``slot`` with ``data`` whole or not at all (the first write of a slot)."""
    # One temporary file per thread: an abandoned write cannot interleave.
    tmp = slot.with_name(f"{slot.name}.{threading.get_ident()}.tmp")
    slot.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_bytes(data)
    os.replace(tmp, slot)


def state_path(state_dir: Path, index: int) -> Path:
    """Where agent number ``index`` of this host keeps its state."""
    return state_dir / f"agent-{index}.json"
