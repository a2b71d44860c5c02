"""Who may connect to the bus and what each account may do there.

One definition shared by the controller (which issues agent credentials and
keeps Mosquitto's dynamic-security plugin in step) and the embedded broker
(which checks them, statelessly). The accounts:

- **agent**: username = client id = agent id; password derived from the
  controller's agent secret (``mqtt_password``), so a broker that knows the
  secret verifies it without a list of agents. It publishes its own status,
  heartbeat and results and the ``register``/``heartbeat`` requests; it reads
  its own tasks, the replies to itself and the controller's signing keys.
- **enrol** (``kbbus-enrol``, password = the operator's enrolment token): a
  new agent's first connection, client id ``kbbus-enrol-<random>``. It may
  only publish ``rpc/register`` and read ``replies/enrol/<its client id>``,
  which is what keeps one enrolling client from reading another's
  credentials.
- **controller**: everything under the root.
- **bridge**: heartbeats and results for HTTP agents, every request; reads
  agents, replies, events and the signing keys.
- **operator**: reads everything, writes nothing.
"""

import base64
import hashlib
import hmac
from enum import StrEnum

from schemas.errors import TopicError
from schemas.topics import Topics

ENROL_USERNAME = "kbbus-enrol"
CONTROLLER_USERNAME = "kbbus-controller"
BRIDGE_USERNAME = "kbbus-bridge"
OPERATOR_USERNAME = "kbbus-operator"
#: The level under ``{root}/replies/`` that enrolling clients answer on.
ENROL_REPLY_LEVEL = "enrol"
#: Enrolling clients name themselves ``kbbus-enrol-<random>``: a client id in a
#: namespace of its own cannot take over an agent's session, and the random
#: part keeps their reply topics apart.
ENROL_CLIENT_PREFIX = "kbbus-enrol-"


class Role(StrEnum):
    AGENT = "agent"
    ENROL = "enrol"
    CONTROLLER = "controller"
    BRIDGE = "bridge"
    OPERATOR = "operator"


SERVICE_ROLES = {
    CONTROLLER_USERNAME: Role.CONTROLLER,
    BRIDGE_USERNAME: Role.BRIDGE,
    OPERATOR_USERNAME: Role.OPERATOR,
}


def mqtt_password(agent_secret: str, agent_id: str) -> str:
    """An agent's MQTT password: base64url(HMAC-SHA256(secret, "mqtt:" + id))."""
    digest = hmac.new(
        agent_secret.encode(), f"mqtt:{agent_id}".encode(), hashlib.sha256
    ).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def valid_agent_id(agent_id: str) -> bool:
    """Whether ``agent_id`` can stand as one topic level (and so as a username)."""
    try:
        Topics().status(agent_id)
    except TopicError:
        return False
    return True


def same_secret(given: str | None, expected: str) -> bool:
    """Constant-time comparison; a missing secret never matches."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode(), expected.encode())


def enrol_reply_topic(root: str, client_id: str) -> str:
    """Where the enrolling client ``client_id`` waits for its reply."""
    return f"{root}/replies/{ENROL_REPLY_LEVEL}/{client_id}"


# --- topic rules ---------------------------------------------------------------
#
# A rule is a topic filter in which ``{root}`` and ``{me}`` (the client id)
# are filled in. A subscription is allowed when every topic it can match is
# covered by one read rule, so ``kbbus/v1/agents/+/tasks`` is refused to an
# agent that may read only its own.

_PUBLISH: dict[Role, tuple[str, ...]] = {
    Role.AGENT: (
        "{root}/agents/{me}/status",
        "{root}/agents/{me}/heartbeat",
        "{root}/agents/{me}/results",
        "{root}/rpc/register",
        "{root}/rpc/heartbeat",
    ),
    Role.ENROL: ("{root}/rpc/register",),
    Role.CONTROLLER: ("{root}/#",),
    Role.BRIDGE: (
        "{root}/agents/+/heartbeat",
        "{root}/agents/+/results",
        "{root}/rpc/+",
    ),
    Role.OPERATOR: (),
}
_READ: dict[Role, tuple[str, ...]] = {
    Role.AGENT: (
        "{root}/agents/{me}/tasks",
        "{root}/replies/{me}",
        "{root}/controller/keys",
    ),
    # Its own reply topic; ``allowed_subscription`` refuses wildcards.
    Role.ENROL: (f"{{root}}/replies/{ENROL_REPLY_LEVEL}/{{me}}",),
    Role.CONTROLLER: ("{root}/#",),
    Role.BRIDGE: (
        "{root}/agents/#",
        "{root}/replies/#",
        "{root}/events/#",
        "{root}/controller/keys",
    ),
    Role.OPERATOR: ("{root}/#", "$SYS/#"),
}


def _rules(
    table: dict[Role, tuple[str, ...]], role: Role, root: str, me: str
) -> list[str]:
    return [rule.format(root=root, me=me) for rule in table[role]]


def publish_rules(role: Role, root: str, client_id: str) -> list[str]:
    return _rules(_PUBLISH, role, root, client_id)


def read_rules(role: Role, root: str, client_id: str) -> list[str]:
    return _rules(_READ, role, root, client_id)


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT matching of a concrete ``topic`` against ``topic_filter``."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and not topic_filter.startswith("$"):
        return False  # MQTT 3.1.1 section 4.7.2: wildcards never match $ topics
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels) or (level != "+" and level != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def filter_within(topic_filter: str, rule: str) -> bool:
    """Whether every topic ``topic_filter`` matches is also matched by ``rule``."""
    f_levels, r_levels = topic_filter.split("/"), rule.split("/")
    for i, level in enumerate(f_levels):
        if i >= len(r_levels):
            return False
        r = r_levels[i]
        if r == "#":
            return True
        if level == "#" or (level == "+" and r != "+"):
            return False
        if r != "+" and r != level:
            return False
    return len(f_levels) == len(r_levels)


def allowed_publish(role: Role, root: str, client_id: str, topic: str) -> bool:
    return any(topic_matches(r, topic) for r in publish_rules(role, root, client_id))


def allowed_subscription(
    role: Role, root: str, client_id: str, topic_filter: str
) -> bool:
    if role is Role.ENROL and ("+" in topic_filter or "#" in topic_filter):
        return False
    return any(
        filter_within(topic_filter, r) for r in read_rules(role, root, client_id)
    )


def allowed_receive(role: Role, root: str, client_id: str, topic: str) -> bool:
    return any(topic_matches(r, topic) for r in read_rules(role, root, client_id))
