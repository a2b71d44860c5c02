"""The only place kbbus topic strings are built and parsed.

Default root ``kbbus/v1``::

    {root}/agents/{agent_id}/status      retained presence (online/offline)
    {root}/agents/{agent_id}/heartbeat   liveness
    {root}/agents/{agent_id}/tasks       retained current task ("" clears it)
    {root}/agents/{agent_id}/results     task outcomes
    {root}/rpc/{method}                  requests to the controller
    {root}/replies/{client_id}           replies, named by the request's reply_to
    {root}/controller/keys               retained controller signing keys
    {root}/events/agents/{agent_id}/{kind}
    {root}/events/workflows/{workflow_id}/{kind}
"""

import re
from dataclasses import dataclass
from enum import StrEnum

from schemas.errors import TopicError

DEFAULT_ROOT = "kbbus/v1"
_LEVEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


class AgentChannel(StrEnum):
    STATUS = "status"
    HEARTBEAT = "heartbeat"
    TASKS = "tasks"
    RESULTS = "results"


class RpcMethod(StrEnum):
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    TRIGGER = "trigger"
    CANCEL = "cancel"
    TASK_CHECK = "task_check"
    LOOKUP = "lookup"


@dataclass(frozen=True, slots=True)
class AgentTopic:
    agent_id: str
    channel: AgentChannel


def _level(value: str, what: str) -> str:
    if not _LEVEL.match(value):
        raise TopicError(f"{what} {value!r} cannot be used as a topic level.")
    return value


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic names under one root; build with methods, parse with ``parse_*``."""

    root: str = DEFAULT_ROOT

    # --- agent channels
    def agent(self, agent_id: str, channel: AgentChannel) -> str:
        return f"{self.root}/agents/{_level(agent_id, 'agent id')}/{channel.value}"

    def status(self, agent_id: str) -> str:
        return self.agent(agent_id, AgentChannel.STATUS)

    def heartbeat(self, agent_id: str) -> str:
        return self.agent(agent_id, AgentChannel.HEARTBEAT)

    def tasks(self, agent_id: str) -> str:
        return self.agent(agent_id, AgentChannel.TASKS)

    def results(self, agent_id: str) -> str:
        return self.agent(agent_id, AgentChannel.RESULTS)

    def all_agents(self, channel: AgentChannel) -> str:
        """Subscription filter for one channel of every agent."""
        return f"{self.root}/agents/+/{channel.value}"

    def parse_agent(self, topic: str) -> AgentTopic:
        prefix = f"{self.root}/agents/"
        if not topic.startswith(prefix):
            raise TopicError(f"{topic!r} is not an agent topic.")
        parts = topic[len(prefix) :].split("/")
        if len(parts) != 2:
            raise TopicError(f"{topic!r} is not an agent topic.")
        try:
            channel = AgentChannel(parts[1])
        except ValueError:
            raise TopicError(f"{topic!r} names no known agent channel.") from None
        return AgentTopic(_level(parts[0], "agent id"), channel)

    # --- request/reply
    def rpc(self, method: RpcMethod) -> str:
        return f"{self.root}/rpc/{method.value}"

    def rpc_filter(self, share_group: str | None = None) -> str:
        """Every request; with ``share_group`` a ``$share`` subscription."""
        base = f"{self.root}/rpc/+"
        return f"$share/{share_group}/{base}" if share_group else base

    def parse_rpc(self, topic: str) -> RpcMethod:
        prefix = f"{self.root}/rpc/"
        if not topic.startswith(prefix):
            raise TopicError(f"{topic!r} is not a request topic.")
        try:
            return RpcMethod(topic[len(prefix) :])
        except ValueError:
            raise TopicError(f"{topic!r} names no known request.") from None

    def reply(self, client_id: str) -> str:
        return f"{self.root}/replies/{_level(client_id, 'client id')}"

    def is_reply(self, topic: str) -> bool:
        return topic.startswith(f"{self.root}/replies/")

    def kind(self, topic: str) -> str:
        """A topic's kind, for metrics labels: an agent topic's channel
        (``tasks``, ``status``, ...), else its first level under the root
        (``events``, ``replies``, ``controller``); ``other`` outside the root."""
        prefix = f"{self.root}/"
        if not topic.startswith(prefix):
            return "other"
        first, _, rest = topic[len(prefix) :].partition("/")
        if first == "agents":
            return rest.rpartition("/")[2] or "other"
        return first

    # --- controller
    def controller_keys(self) -> str:
        return f"{self.root}/controller/keys"

    # --- events
    def agent_event(self, agent_id: str, kind: str) -> str:
        return f"{self.root}/events/agents/{_level(agent_id, 'agent id')}/{kind}"

    def workflow_event(self, workflow_id: str, kind: str) -> str:
        wid = _level(workflow_id, "workflow id")
        return f"{self.root}/events/workflows/{wid}/{kind}"

    def events_filter(self) -> str:
        return f"{self.root}/events/#"
