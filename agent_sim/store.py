"""The per-agent state file: id, last epoch, and the tasks it started and finished.

One small JSON file per agent, replaced atomically (write a temporary file,
then ``os.replace``), so a crash leaves the old or the new state and never half
of one. It is written before anything that depends on it goes on the wire: the
epoch before CONNECT, a task id before the task runs, a result before it is
published. That is what lets an agent answer a task it has already seen with
the stored result, across restarts, instead of running it twice. The file is
not fsynced: it survives a crash of the agent, not a power cut of its host.
"""

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any

from agent_sim.errors import StateFileError

STATE_VERSION = 1


class AgentState:
    """An agent's persistent state.

    ``next_epoch`` and ``load_or_create`` write the file; the other changes
    are made in memory and stored by ``save`` (blocking) or ``persist``
    (in a worker thread), which the caller awaits before acting on them.
    """

    __slots__ = (
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

    # --- loading ------------------------------------------------------------
    @classmethod
    def load(cls, path: Path, *, max_finished: int = 64) -> "AgentState | None":
        """The state stored at ``path``, or None when there is no file yet."""
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"Cannot read agent state file {path}: {exc}") from exc
        try:
            data: dict[str, Any] = json.loads(raw)
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

    def _snapshot(self) -> str:
        data = {
            "v": STATE_VERSION,
            "agent_id": self.agent_id,
            "last_epoch": self.last_epoch,
            **({"mqtt_password": self.mqtt_password} if self.mqtt_password else {}),
            "started": self.started or [],
            "finished": list(self.finished.items()),
        }
        return json.dumps(data, separators=(",", ":"))

    def _write(self, text: str) -> None:
        # One temporary file per thread: a write abandoned by a cancelled
        # ``persist`` can never interleave with the next one.
        tmp = self.path.with_name(f"{self.path.name}.{threading.get_ident()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateFileError(
                f"Cannot write agent state file {self.path}: {exc}"
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


def state_path(state_dir: Path, index: int) -> Path:
    """Where agent number ``index`` of this host keeps its state."""
    return state_dir / f"agent-{index}.json"
