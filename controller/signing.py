"""The controller's task-signing keys, and the signing of task envelopes.

Keys live in ``--signing-key-dir`` (default ``./.kbbus/keys``), one Ed25519
private key per file, ``<key_id>.pem`` (PKCS #8, mode 0600). Key ids start with
their creation time, so the newest file is the active key: it signs every
task. The older files stay listed, in the registration reply and in the key
set the controller publishes retained on ``{root}/controller/keys``, so tasks
they signed still verify while agents learn the new key.

Rotation is adding a file (``rotate``, or ``kbbus keys rotate``): a running
controller notices within ``--signing-key-check-s`` and publishes the new set,
signed by every key in it, so agents that trust any of them accept it without
registering again. Retiring is removing a file (``retire``) once every agent
has the newer set.

A task's ``nonce`` is an HMAC of its id under ``nonce.secret`` (kept beside the
keys): the same task republished after a restart or a rotation carries the same
nonce, which is what lets agents tell a redelivery from a replay.
"""

import contextlib
import fcntl
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.effects import Publish
from schemas.codec import decode, encode
from schemas.errors import KbbusError, MessageError, TopicError
from schemas.messages import ControllerKeys, KeySignature, SigningKey, Task, utcnow
from schemas.signing import b64url, canonical_keys, canonical_task, http_token
from schemas.topics import AgentChannel, Topics

log = logging.getLogger("kbbus.controller")

KEY_SUFFIX = ".pem"
NONCE_FILE = "nonce.secret"
LOCK_FILE = ".lock"
#: Keys listed at most; older files are ignored (and logged) until retired.
MAX_KEYS = 8


class SigningError(KbbusError):
    """The key directory cannot be used; the message says what to do."""


@dataclass(frozen=True, slots=True)
class _Key:
    key_id: str
    private: Ed25519PrivateKey
    public: SigningKey


_STAMP = "%Y%m%dT%H%M%S%f"


def _new_key_id(key_dir: Path) -> str:
    """A key id that sorts after every key already in ``key_dir``.

    Ids carry their creation time to the millisecond; two keys made within
    one millisecond (a rotation right after start-up) would otherwise tie
    and be ordered by their random suffix, so the newer stamp is bumped
    past the newest existing one. Callers hold the directory lock.
    """
    now = datetime.now(UTC).replace(tzinfo=None)
    newest = key_files(key_dir)
    if newest:
        try:
            last = datetime.strptime(newest[0].name[1:19] + "000", _STAMP)
        except ValueError:
            last = None
        if last is not None and now <= last + timedelta(microseconds=999):
            now = last + timedelta(milliseconds=1)
    return f"k{now:%Y%m%dT%H%M%S}{now.microsecond // 1000:03d}-{secrets.token_hex(3)}"


@contextlib.contextmanager
def _locked(key_dir: Path) -> Iterator[None]:
    """One process at a time creates or rotates keys in ``key_dir``."""
    try:
        key_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(key_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise SigningError(
            f"Cannot use the signing key directory {key_dir} ({exc}); give a "
            "writable --signing-key-dir."
        ) from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _create_key(key_dir: Path) -> str:
    key_id = _new_key_id(key_dir)
    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(key_dir / f"{key_id}{KEY_SUFFIX}", pem)
    return key_id


def _load_key(path: Path) -> _Key:
    try:
        private = serialization.load_pem_private_key(path.read_bytes(), None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(
            f"Signing key {path} cannot be read ({exc}); restore it or remove it."
        ) from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise SigningError(f"Signing key {path} is not an Ed25519 key; remove it.")
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key_id = path.name.removesuffix(KEY_SUFFIX)
    return _Key(key_id, private, SigningKey(key_id=key_id, public_key=b64url(raw)))


def key_files(key_dir: Path) -> list[Path]:
    """The key files in ``key_dir``, newest first."""
    if not key_dir.is_dir():
        return []
    return sorted(
        (p for p in key_dir.glob(f"k*{KEY_SUFFIX}") if p.is_file()),
        key=lambda p: p.name,
        reverse=True,
    )


def rotate(key_dir: Path) -> str:
    """Add a new active key to ``key_dir``; returns its key id."""
    with _locked(key_dir):
        return _create_key(key_dir)


def retire(key_dir: Path, key_id: str) -> None:
    """Remove key ``key_id``; agents stop trusting it with the next key set."""
    with _locked(key_dir):
        files = key_files(key_dir)
        path = key_dir / f"{key_id}{KEY_SUFFIX}"
        if path not in files:
            raise SigningError(f"No key {key_id!r} in {key_dir}.")
        if len(files) == 1:
            raise SigningError(
                f"{key_id!r} is the only key in {key_dir}; rotate first."
            )
        path.unlink()


class Keyring:
    """The keys of one key directory, as loaded; ``reload`` to see changes."""

    def __init__(self, key_dir: Path, keys: list[_Key], nonce_secret: bytes) -> None:
        self.key_dir = key_dir
        self._keys = keys
        self._nonce_secret = nonce_secret

    @classmethod
    def load(cls, key_dir: Path) -> "Keyring":
        """The keys in ``key_dir``; the first start creates a key and a secret."""
        with _locked(key_dir):
            files = key_files(key_dir)
            if not files:
                key_id = _create_key(key_dir)
                log.info("created signing key key_id=%s in %s", key_id, key_dir)
                files = key_files(key_dir)
            nonce_path = key_dir / NONCE_FILE
            if not nonce_path.exists():
                _write_private(nonce_path, secrets.token_bytes(32))
            try:
                nonce_secret = nonce_path.read_bytes()
            except OSError as exc:
                raise SigningError(f"Cannot read {nonce_path}: {exc}") from exc
        if len(files) > MAX_KEYS:
            log.warning(
                "%d signing keys in %s; only the newest %d are used: retire the rest",
                len(files),
                key_dir,
                MAX_KEYS,
            )
        return cls(key_dir, [_load_key(p) for p in files[:MAX_KEYS]], nonce_secret)

    def reload(self) -> "Keyring | None":
        """A new keyring if the key files changed since this one, else None."""
        names = [p.name.removesuffix(KEY_SUFFIX) for p in key_files(self.key_dir)]
        if names[:MAX_KEYS] == self.key_ids or not names:
            return None
        return Keyring.load(self.key_dir)

    @property
    def key_ids(self) -> list[str]:
        return [k.key_id for k in self._keys]

    @property
    def active_key_id(self) -> str:
        return self._keys[0].key_id

    def signing_keys(self) -> list[SigningKey]:
        """The public keys agents accept, the active one first."""
        return [k.public for k in self._keys]

    def nonce(self, task_id: str) -> str:
        mac = hmac.new(self._nonce_secret, task_id.encode(), hashlib.sha256)
        return b64url(mac.digest()[:16])

    def sign_task(self, task: Task) -> Task:
        """``task`` with its nonce, the active key's id and the signature."""
        key = self._keys[0]
        unsigned = task.model_copy(
            update={
                "nonce": self.nonce(task.task_id),
                "key_id": key.key_id,
                "signature": None,
            }
        )
        signature = b64url(key.private.sign(canonical_task(unsigned)))
        return unsigned.model_copy(update={"signature": signature})

    def key_set(self) -> ControllerKeys:
        """The current keys, signed by each of them."""
        unsigned = ControllerKeys(keys=self.signing_keys(), issued_at=utcnow())
        message = canonical_keys(unsigned)
        signatures = [
            KeySignature(key_id=k.key_id, signature=b64url(k.private.sign(message)))
            for k in self._keys
        ]
        return unsigned.model_copy(update={"signatures": signatures})


class TaskSealer:
    """Signs the task envelopes among a transaction's publishes.

    It works on the encoded publishes the engine produced, just before they go
    out, so the engine knows nothing of keys. An empty payload (a cleared task
    topic) needs no signature.
    """

    def __init__(self, topics: Topics, keyring: Keyring) -> None:
        self.topics = topics
        self.keyring = keyring
        self._suffix = f"/{AgentChannel.TASKS.value}"

    def seal(self, effects: Sequence[Publish]) -> list[Publish]:
        return [self._seal(e) for e in effects]

    def _seal(self, effect: Publish) -> Publish:
        if not (
            effect.retain and effect.payload and effect.topic.endswith(self._suffix)
        ):
            return effect
        try:
            agent_id = self.topics.parse_agent(effect.topic).agent_id
            task = decode(Task, effect.payload)
        except (TopicError, MessageError):
            return effect
        if task.agent_id != agent_id:
            # Never sign a task onto another agent's topic; the agent would
            # refuse it as misaddressed anyway.
            log.error(
                "not signing a task published on another agent's topic: "
                "agent_id=%s task_agent_id=%s task_id=%s",
                agent_id,
                task.agent_id,
                task.task_id,
            )
            return effect
        signed = self.keyring.sign_task(task)
        return Publish(effect.topic, encode(signed), effect.qos, effect.retain)


def agent_http_token(agent_secret: str | None, agent_id: str) -> str | None:
    """The HTTP token the controller issues at registration, if tokens are on."""
    return http_token(agent_secret, agent_id) if agent_secret else None
