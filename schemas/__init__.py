"""The message contract of kbbus: every payload on the bus and every topic name.

``schemas`` owns the pydantic models of all messages (``schemas.messages``), the
KB definition model (``schemas.kb``), the read models the controller answers
look-ups with (``schemas.views``), the one place where topic strings are built
and parsed (``schemas.topics``) and the codec that turns bytes into models with a
size limit (``schemas.codec``). It imports nothing of ``controller``,
``bridge_http``, ``agent_sim`` or ``kbbus``; they all import it.
"""

from schemas.codec import DEFAULT_MAX_PAYLOAD_BYTES, decode, encode
from schemas.errors import KbbusError, MessageError, PayloadTooLarge

SCHEMA_VERSION = 1

__all__ = [
    "DEFAULT_MAX_PAYLOAD_BYTES",
    "SCHEMA_VERSION",
    "KbbusError",
    "MessageError",
    "PayloadTooLarge",
    "decode",
    "encode",
]
