"""Bytes to messages and back, with a size limit checked before parsing."""

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from schemas.errors import MessageError, PayloadTooLarge

DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024

M = TypeVar("M", bound=BaseModel)


def encode(message: BaseModel) -> bytes:
    """Serialise a message to compact JSON bytes."""
    return message.model_dump_json(exclude_none=True).encode()


def decode(
    model: type[M],
    payload: bytes | bytearray | str,
    *,
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> M:
    """Parse ``payload`` as ``model``.

    Raises ``PayloadTooLarge`` before parsing anything over ``max_bytes`` and
    ``MessageError`` for anything else that is not a valid ``model``; no other
    exception escapes.
    """
    raw = payload.encode() if isinstance(payload, str) else bytes(payload)
    if len(raw) > max_bytes:
        raise PayloadTooLarge(len(raw), max_bytes)
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise MessageError(
                f"{model.__name__}: payload is not valid JSON.",
                reason="malformed_json",
            ) from None
        if any(e["loc"][:1] == ("v",) for e in errors):
            raise MessageError(
                f"{model.__name__}: unsupported schema version 'v'.",
                reason="version",
            ) from None
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}"
            for e in errors[:5]
        )
        raise MessageError(f"{model.__name__}: {where}", reason="schema") from None
    except (ValueError, TypeError, RecursionError) as exc:  # pragma: no cover
        raise MessageError(f"{model.__name__}: {exc}", reason="schema") from None
