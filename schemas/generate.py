"""Write the JSON Schema files and the AsyncAPI document from the models.

Run ``python -m schemas.generate`` after changing a model; a test fails while
the committed files differ from what this produces.
"""

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from schemas import messages as m
from schemas.kb import KBDefinition
from schemas.topics import DEFAULT_ROOT

HERE = Path(__file__).parent
JSONSCHEMA_DIR = HERE / "jsonschema"
ASYNCAPI_FILE = HERE / "asyncapi.yaml"

MODELS: dict[str, type[BaseModel]] = {
    "agent-status": m.AgentStatus,
    "heartbeat": m.Heartbeat,
    "task": m.Task,
    "task-result": m.TaskResult,
    "register-request": m.RegisterRequest,
    "register-reply": m.RegisterReply,
    "heartbeat-request": m.HeartbeatRequest,
    "heartbeat-reply": m.HeartbeatReply,
    "trigger-request": m.TriggerRequest,
    "trigger-reply": m.TriggerReply,
    "cancel-request": m.CancelRequest,
    "cancel-reply": m.CancelReply,
    "task-check-request": m.TaskCheckRequest,
    "task-check-reply": m.TaskCheckReply,
    "lookup-request": m.LookupRequest,
    "lookup-reply": m.LookupReply,
    "event": m.Event,
    "controller-keys": m.ControllerKeys,
    "kb-definition": KBDefinition,
}

# channel address, who publishes, qos, retained, message names, description
CHANNELS: list[tuple[str, str, str, int, bool, list[str], str]] = [
    (
        "agentStatus",
        "agents/{agent_id}/status",
        "agent (online), broker Will and controller timer (offline)",
        1,
        True,
        ["agent-status"],
        "Presence. The newest epoch wins; a Will with an older epoch is ignored.",
    ),
    (
        "agentHeartbeat",
        "agents/{agent_id}/heartbeat",
        "agent, or the bridge",
        0,
        False,
        ["heartbeat"],
        "Liveness and light metrics.",
    ),
    (
        "agentTasks",
        "agents/{agent_id}/tasks",
        "controller",
        1,
        True,
        ["task"],
        "The agent's current task; an empty retained message clears it.",
    ),
    (
        "agentResults",
        "agents/{agent_id}/results",
        "agent, or the bridge",
        1,
        False,
        ["task-result"],
        "A task's outcome; duplicates change nothing.",
    ),
    (
        "rpcRegister",
        "rpc/register",
        "agent, bridge",
        1,
        False,
        ["register-request"],
        "Register or re-register an agent; answered on reply_to.",
    ),
    (
        "rpcHeartbeat",
        "rpc/heartbeat",
        "bridge",
        1,
        False,
        ["heartbeat-request"],
        "A confirmed heartbeat (HTTP agents).",
    ),
    (
        "rpcTrigger",
        "rpc/trigger",
        "bridge, operators",
        1,
        False,
        ["trigger-request"],
        "Trigger a KB workflow on an agent.",
    ),
    (
        "rpcCancel",
        "rpc/cancel",
        "bridge, operators",
        1,
        False,
        ["cancel-request"],
        "Cancel a workflow.",
    ),
    (
        "rpcTaskCheck",
        "rpc/task_check",
        "bridge",
        1,
        False,
        ["task-check-request"],
        "May this agent post a result for this task?",
    ),
    (
        "rpcLookup",
        "rpc/lookup",
        "bridge, operators",
        1,
        False,
        ["lookup-request"],
        "Agents, workflows and the KB catalog.",
    ),
    (
        "replies",
        "replies/{client_id}",
        "controller",
        1,
        False,
        [
            "register-reply",
            "heartbeat-reply",
            "trigger-reply",
            "cancel-reply",
            "task-check-reply",
            "lookup-reply",
        ],
        "Replies, on the topic a request named in reply_to, with its request_id.",
    ),
    (
        "enrolReplies",
        "replies/enrol/{client_id}",
        "controller",
        1,
        False,
        ["register-reply"],
        "The registration reply to a new agent on the enrolment account "
        "(client id kbbus-enrol-<random>): its own credentials and the "
        "controller's signing keys. Enrolling clients may not subscribe there "
        "with a wildcard.",
    ),
    (
        "controllerKeys",
        "controller/keys",
        "controller",
        1,
        True,
        ["controller-keys"],
        "The keys agents accept task signatures from, signed by each of them.",
    ),
    (
        "agentEvents",
        "events/agents/{agent_id}/{kind}",
        "controller",
        1,
        False,
        ["event"],
        "Agent events: registered, online, offline.",
    ),
    (
        "workflowEvents",
        "events/workflows/{workflow_id}/{kind}",
        "controller",
        1,
        False,
        ["event"],
        "Workflow events: queued, started, step dispatched and finished, finished.",
    ),
]


def json_schemas() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://kbbus.dev/schemas/v1/{name}.json"
        out[name] = schema
    return out


def asyncapi() -> dict[str, Any]:
    schemas = json_schemas()
    messages: dict[str, Any] = {}
    for name, _schema in schemas.items():
        if name == "kb-definition":
            continue
        messages[name] = {
            "name": name,
            "contentType": "application/json",
            "payload": {"$ref": f"jsonschema/{name}.json"},
        }
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    for key, address, who, qos, retain, msgs, description in CHANNELS:
        params = {
            p: {"description": p.replace("_", " ")}
            for p in ("agent_id", "client_id", "workflow_id", "kind")
            if "{" + p + "}" in address
        }
        channel: dict[str, Any] = {
            "address": f"{DEFAULT_ROOT}/{address}",
            "description": f"{description} Published by: {who}.",
            "messages": {n: {"$ref": f"#/components/messages/{n}"} for n in msgs},
        }
        if params:
            channel["parameters"] = params
        channels[key] = channel
        operations[f"publish_{key}"] = {
            "action": "send",
            "summary": f"Published by {who}.",
            "channel": {"$ref": f"#/channels/{key}"},
            "bindings": {"mqtt": {"qos": qos, "retain": retain}},
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "kbbus",
            "version": "1.0.0",
            "description": (
                "Topics and payloads of kbbus, a control plane for fleets of "
                "machine agents. MQTT 3.1.1; every payload is JSON with a schema "
                f"version field v. The root {DEFAULT_ROOT} is configurable."
            ),
        },
        "servers": {
            "embedded": {
                "host": "127.0.0.1:1883",
                "protocol": "mqtt",
                "protocolVersion": "3.1.1",
            }
        },
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> dict[Path, str]:
    """Every generated file and its exact content."""
    files = {
        JSONSCHEMA_DIR / f"{name}.json": json.dumps(schema, indent=2, sort_keys=True)
        + "\n"
        for name, schema in json_schemas().items()
    }
    files[ASYNCAPI_FILE] = (
        "# Generated by `python -m schemas.generate`; do not edit by hand.\n"
        + yaml.safe_dump(asyncapi(), sort_keys=False, width=88)
    )
    return files


def main() -> None:
    JSONSCHEMA_DIR.mkdir(exist_ok=True)
    for path, text in render().items():
        path.write_text(text)
        print(path.relative_to(HERE.parent))


if __name__ == "__main__":
    main()
