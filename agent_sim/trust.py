"""Which controller keys an agent accepts task signatures from.

One ``TrustStore`` per process (a fleet shares it), kept in
``<state dir>/controller-keys.json``:

- the registration reply is the anchor: its ``signing_keys`` replace what is
  trusted (the reply comes from the controller on the agent's own reply topic,
  or from the bridge over the agent's HTTP connection);
- after that, keys change only through a ``ControllerKeys`` set signed by a key
  already trusted and no older than the last one accepted: that is rotation
  without registering again;
- a registration reply without keys, while nothing is trusted yet, means the
  controller runs with signing off (``--no-sign-tasks``): the store is then
  *open* and unsigned tasks run. Open is never written to disk, and a store
  that holds keys never becomes open again: such an agent refuses unsigned
  tasks until its state directory is wiped.

Until the first registration answers, a store with no keys is *unknown*:
tasks wait (``AgentCore`` holds them) rather than being run or refused.
"""

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent_sim.errors import StateFileError
from schemas import MessageError, decode
from schemas.messages import ControllerKeys, SigningKey, Task
from schemas.signing import canonical_keys, canonical_task, public_key, verify

log = logging.getLogger("kbbus.agent")

TRUST_FILE = "controller-keys.json"


class Mode(Enum):
    UNKNOWN = "unknown"  # no keys and no registration answer yet
    OPEN = "open"  # the controller does not sign; unsigned tasks run
    SIGNED = "signed"  # every task must carry a good signature


# Refusal reasons, as they appear after "refused: " in a result's error.
UNSIGNED = "unsigned"
UNKNOWN_KEY = "unknown key"
BAD_SIGNATURE = "bad signature"


class TrustStore:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._keys: dict[str, Ed25519PublicKey] = {}
        self._listed: list[SigningKey] = []
        self._issued_at: datetime | None = None
        self._open = False
        self._last_set: bytes | None = None
        #: Called (no arguments) after every change: cores retry held tasks.
        self.listeners: set[Callable[[], None]] = set()

    @classmethod
    def load(cls, state_dir: Path) -> "TrustStore":
        store = cls(state_dir / TRUST_FILE)
        assert store.path is not None
        try:
            data: dict[str, Any] = json.loads(store.path.read_bytes())
        except FileNotFoundError:
            return store
        except (OSError, ValueError) as exc:
            raise StateFileError(
                f"Trusted controller keys in {store.path} cannot be read ({exc}); "
                "delete the file to trust the keys of the next registration."
            ) from exc
        try:
            keys = [SigningKey.model_validate(k) for k in data.get("keys", [])]
            issued = data.get("issued_at")
            store._set_keys(keys)
            store._issued_at = datetime.fromisoformat(issued) if issued else None
        except (ValueError, TypeError) as exc:
            raise StateFileError(
                f"Trusted controller keys in {store.path} are not valid ({exc}); "
                "delete the file to trust the keys of the next registration."
            ) from exc
        return store

    # --- state -------------------------------------------------------------------
    @property
    def mode(self) -> Mode:
        if self._keys:
            return Mode.SIGNED
        return Mode.OPEN if self._open else Mode.UNKNOWN

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self._listed]

    def _set_keys(self, keys: list[SigningKey]) -> None:
        parsed = {k.key_id: public_key(k.public_key) for k in keys}
        self._keys = parsed
        self._listed = list(keys)

    def _changed(self) -> None:
        self._save()
        for listener in list(self.listeners):
            listener()

    def _save(self) -> None:
        if self.path is None or not self._listed:
            return
        data = {
            "keys": [k.model_dump() for k in self._listed],
            "issued_at": self._issued_at.isoformat() if self._issued_at else None,
        }
        tmp = self.path.with_name(f"{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StateFileError(f"Cannot write {self.path}: {exc}") from exc

    # --- learning keys -----------------------------------------------------------
    def registered(self, keys: list[SigningKey]) -> None:
        """A registration answered with ``keys`` (empty: signing is off)."""
        if keys:
            if [k.key_id for k in keys] != self.key_ids:
                try:
                    self._set_keys(keys)
                except ValueError as exc:
                    log.error("registration carried an unusable key (%s)", exc)
                    return
                log.info("trusting controller keys %s", ",".join(self.key_ids))
                self._changed()
            return
        if self._keys:
            log.warning(
                "the controller sent no signing keys, but keys are trusted "
                "already: unsigned tasks stay refused (%s)",
                self.path,
            )
            return
        if not self._open:
            self._open = True
            log.warning(
                "the controller does not sign tasks (open lab mode): tasks run "
                "unverified"
            )
            self._changed()

    def key_set(self, payload: bytes) -> bool:
        """A ``ControllerKeys`` message; True if it changed what is trusted."""
        if not payload or payload == self._last_set:
            return False
        try:
            offered = decode(ControllerKeys, payload)
        except MessageError as exc:
            log.warning("ignoring an invalid controller key set: %s", exc)
            return False
        if not self._keys:
            # Nothing to check it against: registration comes first.
            return False
        if self._issued_at is not None and offered.issued_at < self._issued_at:
            log.warning(
                "ignoring a controller key set older than the one trusted "
                "(issued_at=%s)",
                offered.issued_at.isoformat(),
            )
            return False
        message = canonical_keys(offered)
        if not any(
            s.key_id in self._keys
            and verify(self._keys[s.key_id], message, s.signature)
            for s in offered.signatures
        ):
            log.warning(
                "ignoring a controller key set no trusted key signed: keys=%s",
                ",".join(k.key_id for k in offered.keys),
            )
            return False
        self._last_set = payload
        self._issued_at = offered.issued_at
        if [k.key_id for k in offered.keys] == self.key_ids:
            return False
        try:
            self._set_keys(list(offered.keys))
        except ValueError as exc:
            log.error("controller key set carried an unusable key (%s)", exc)
            return False
        log.info("controller keys rotated: now trusting %s", ",".join(self.key_ids))
        self._changed()
        return True

    # --- checking tasks ----------------------------------------------------------
    def check(self, task: Task) -> str | None:
        """Why ``task``'s signature is refused, or None if it may run.

        Only meaningful in ``Mode.SIGNED``; open and unknown stores are the
        caller's to handle.
        """
        if task.signature is None or task.key_id is None or task.nonce is None:
            return UNSIGNED
        key = self._keys.get(task.key_id)
        if key is None:
            return UNKNOWN_KEY
        if not verify(key, canonical_task(task), task.signature):
            return BAD_SIGNATURE
        return None
