"""The per-agent state file: id, last epoch, and the tasks it started and finished.

One small JSON file per agent, replaced atomically (write a temporary file,
then ``os.replace``), so a crash leaves the old or the new state and never half
of one. It is written before anything that depends on it goes on the wire: the
epoch before CONNECT, a task id before the task runs, a result before it is
published. That is what lets an agent answer a task it has already seen with
the stored result, across restarts, instead of running it twice. The file is
not fsynced: it survives a crash of the agent, not a power cut of its host.
"""

import json
import os
from pathlib import Path
from typing import Any

from agent_sim.errors import StateFileError

STATE_VERSION = 1


class AgentState:
    """An agent's persistent state; every mutating method writes the file."""

    __slots__ = (
        "agent_id",
        "finished",
        "last_epoch",
        "max_finished",
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
        started: list[str] | None = None,
        finished: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.agent_id = agent_id
        self.max_finished = max_finished
        self.last_epoch = last_epoch
        # Task ids that began running and have no result yet. Usually empty, so
        # None rather than an empty list to keep thousands of agents small.
        self.started: list[str] | None = started or None
        #: task id -> the result as JSON text, oldest first.
        self.finished: dict[str, str] = finished or {}

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

    def mark_started(self, task_id: str) -> None:
        if self.started is None:
            self.started = []
        self.started.append(task_id)
        self.save()

    def finish(self, task_id: str, result_json: str) -> None:
        """Remember ``task_id``'s result and forget that it was running."""
        if self.started is not None and task_id in self.started:
            self.started.remove(task_id)
            if not self.started:
                self.started = None
        self.finished.pop(task_id, None)
        self.finished[task_id] = result_json
        self._trim()
        self.save()

    def result_of(self, task_id: str) -> str | None:
        return self.finished.get(task_id)

    def _trim(self) -> None:
        while len(self.finished) > self.max_finished:
            del self.finished[next(iter(self.finished))]

    def save(self) -> None:
        data = {
            "v": STATE_VERSION,
            "agent_id": self.agent_id,
            "last_epoch": self.last_epoch,
            "started": self.started or [],
            "finished": list(self.finished.items()),
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateFileError(
                f"Cannot write agent state file {self.path}: {exc}"
            ) from exc


def state_path(state_dir: Path, index: int) -> Path:
    """Where agent number ``index`` of this host keeps its state."""
    return state_dir / f"agent-{index}.json"
