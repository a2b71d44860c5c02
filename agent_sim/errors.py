"""The errors ``agent_sim`` raises on purpose; ``AgentError`` is their root."""

from schemas.errors import KbbusError


class AgentError(KbbusError):
    """Something an agent cannot carry on with (a broken state file, bad flags)."""


class StateFileError(AgentError):
    """The state file exists but cannot be read as an agent's state."""
