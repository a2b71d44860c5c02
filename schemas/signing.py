"""What the signer and the verifiers of kbbus must agree on, byte for byte.

- A ``Task`` is signed over its canonical form: every field but ``signature``,
  as JSON with sorted keys and no spaces (``canonical_task``). Both ends build
  it from the parsed model, so the JSON on the wire may differ in layout.
- A ``ControllerKeys`` set is signed the same way, without ``signatures``.
- Signatures and public keys are Ed25519, raw bytes in unpadded base64url.
- An HTTP agent's token is HMAC-SHA256(agent secret, ``"http:" + agent_id``)
  in unpadded base64url: the controller issues it, the bridge recomputes it,
  so neither keeps a table of tokens.
"""

import base64
import binascii
import hashlib
import hmac
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from schemas.messages import ControllerKeys, Task


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64url(text: str) -> bytes:
    """Decode unpadded base64url; raises ``ValueError`` on anything else."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"not base64url: {exc}") from None


def _canonical(data: object) -> bytes:
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode()


def canonical_task(task: Task) -> bytes:
    """The bytes a task signature covers: everything except the signature."""
    return _canonical(task.model_dump(mode="json", exclude={"signature"}))


def canonical_keys(keys: ControllerKeys) -> bytes:
    """The bytes each signature of a key set covers."""
    return _canonical(keys.model_dump(mode="json", exclude={"signatures"}))


def public_key(encoded: str) -> Ed25519PublicKey:
    """An Ed25519 public key from raw base64url; ``ValueError`` if it is not one."""
    return Ed25519PublicKey.from_public_bytes(unb64url(encoded))


def verify(key: Ed25519PublicKey, message: bytes, signature: str) -> bool:
    try:
        key.verify(unb64url(signature), message)
    except (InvalidSignature, ValueError):
        return False
    return True


def http_token(agent_secret: str, agent_id: str) -> str:
    """The bearer token of HTTP agent ``agent_id``."""
    mac = hmac.new(agent_secret.encode(), f"http:{agent_id}".encode(), hashlib.sha256)
    return b64url(mac.digest())


def token_matches(given: str, expected: str) -> bool:
    """Compare tokens in constant time (for equal lengths)."""
    return hmac.compare_digest(given.encode(), expected.encode())
