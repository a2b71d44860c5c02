"""Mosquitto's dynamic-security plugin, kept in step with registrations.

Mosquitto 2.0 cannot check our derived agent passwords itself, so with
``--mosquitto-dynsec`` the controller creates a dynamic-security client for
every agent it issues credentials to: username and client id pinned to the
agent id, its derived password, and a role of its own that allows exactly
what ``schemas.access`` allows an agent (2.0's dynamic-security ACLs have no
``%c`` patterns, so the role names the agent's topics). The commands go to
``$CONTROL/dynamic-security/v1`` before the registration reply, on the same
connection, so Mosquitto has the account before the agent can use it.

``initial_config`` writes the plugin's starting file: the service accounts
and the enrolment account with their roles (``kbbus mosquitto-dynsec``).
"""

import base64
import hashlib
import json
import os
from typing import Any

from controller.effects import Publish
from schemas.access import (
    BRIDGE_USERNAME,
    CONTROLLER_USERNAME,
    ENROL_REPLY_LEVEL,
    ENROL_USERNAME,
    OPERATOR_USERNAME,
    Role,
    publish_rules,
    read_rules,
)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
# What ``mosquitto_ctrl`` uses: PBKDF2-SHA512, 101 rounds, 12-byte salt.
PBKDF2_ROUNDS = 101
SALT_BYTES = 12


def agent_role_name(agent_id: str) -> str:
    return f"kbbus-agent-{agent_id}"


def _acl(
    kind: str, topic: str, allow: bool = True, priority: int = 0
) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "allow": allow, "priority": priority}


def role_acls(role: Role, root: str, client_id: str) -> list[dict[str, Any]]:
    acls = [_acl("publishClientSend", t) for t in publish_rules(role, root, client_id)]
    for topic in read_rules(role, root, client_id):
        acls += [_acl("subscribePattern", topic), _acl("publishClientReceive", topic)]
    if role is Role.ENROL:
        # Without %c (Mosquitto 2.1) the role cannot name the client's own
        # reply topic: it may read any one concrete topic under replies/enrol/,
        # and the random part of the client id is what keeps clients apart. A
        # wildcard would read every enrolling client's credentials.
        for wildcard in ("+", "#"):
            topic = f"{root}/replies/{ENROL_REPLY_LEVEL}/{wildcard}"
            acls.append(_acl("subscribeLiteral", topic, allow=False, priority=10))
    if role is Role.CONTROLLER:
        control = "$CONTROL/dynamic-security/#"
        acls += [
            _acl("publishClientSend", control),
            _acl("subscribePattern", control),
            _acl("publishClientReceive", control),
        ]
    return acls


def agent_commands(
    root: str, agent_id: str, password: str, *, set_password: bool = True
) -> Publish:
    """Create the agent's account; ``create*`` of an existing one fails
    harmlessly. ``set_password`` also resets its password, which makes
    Mosquitto disconnect every client logged in as the agent ("disconnected
    by administrative action"): only for a new agent, never for one that
    just proved it holds that very password, or it is kicked off on every
    registration and never hears the reply."""
    role = agent_role_name(agent_id)
    commands = [
        {
            "command": "createRole",
            "rolename": role,
            "acls": role_acls(Role.AGENT, root, agent_id),
        },
        {
            "command": "createClient",
            "username": agent_id,
            "password": password,
            "clientid": agent_id,
            "roles": [{"rolename": role}],
        },
    ]
    if set_password:
        commands.append(
            {"command": "setClientPassword", "username": agent_id, "password": password}
        )
    payload = json.dumps({"commands": commands}).encode()
    return Publish(CONTROL_TOPIC, payload, qos=1)


def _hashed(username: str, password: str, role: str) -> dict[str, Any]:
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, PBKDF2_ROUNDS)
    return {
        "username": username,
        "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(),
        "iterations": PBKDF2_ROUNDS,
        "roles": [{"rolename": role}],
    }


def initial_config(
    root: str, passwords: dict[str, str], enrolment_token: str | None
) -> dict[str, Any]:
    """The plugin's file: service accounts (``passwords``: username -> password)
    and, with a token, the enrolment account. Agents are added at run time."""
    roles = {
        CONTROLLER_USERNAME: Role.CONTROLLER,
        BRIDGE_USERNAME: Role.BRIDGE,
        OPERATOR_USERNAME: Role.OPERATOR,
    }
    clients, role_list = [], []
    for username, role in roles.items():
        if username not in passwords:
            continue
        clients.append(_hashed(username, passwords[username], username))
        role_list.append({"rolename": username, "acls": role_acls(role, root, "")})
    if enrolment_token:
        clients.append(_hashed(ENROL_USERNAME, enrolment_token, ENROL_USERNAME))
        acls = role_acls(Role.ENROL, root, "+")
        role_list.append({"rolename": ENROL_USERNAME, "acls": acls})
    return {
        "clients": clients,
        "roles": role_list,
        "groups": [],
        # Nothing is allowed unless a role says so, receiving included.
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
    }
