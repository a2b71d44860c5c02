"""The message contract: generated files in step, codec limits, topic parsing."""

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas import MessageError, PayloadTooLarge, decode, encode
from schemas.bus import redact_url
from schemas.errors import TopicError
from schemas.generate import render
from schemas.messages import AgentState, AgentStatus, Heartbeat, TaskResult
from schemas.topics import AgentChannel, RpcMethod, Topics


def test_committed_schema_files_match_the_models() -> None:
    stale = [
        str(path.name)
        for path, text in render().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `python -m schemas.generate`; stale: {stale}"


def test_round_trip_keeps_every_field() -> None:
    status = AgentStatus(agent_id="a-1", state=AgentState.OFFLINE, epoch=7, reason="x")
    assert decode(AgentStatus, encode(status)) == status


def test_oversized_payload_is_refused_before_parsing() -> None:
    payload = b"{" + b" " * 300_000 + b"}"
    with pytest.raises(PayloadTooLarge) as info:
        decode(Heartbeat, payload)
    assert info.value.reason == "oversized"


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b'{"v": 2, "agent_id": "a"}', "version"),
        (b'{"agent_id": "a/b"}', "schema"),
        (b'{"agent_id": 5}', "schema"),
        (b"[]", "schema"),
    ],
)
def test_bad_payloads_name_their_reason(payload: bytes, reason: str) -> None:
    with pytest.raises(MessageError) as info:
        decode(Heartbeat, payload)
    assert info.value.reason == reason


@given(st.binary(max_size=2048))
def test_decode_raises_only_message_error_on_bytes(payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(TaskResult, payload)


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=20,
    )
)
def test_decode_raises_only_message_error_on_json(value: object) -> None:
    with contextlib.suppress(MessageError):
        decode(TaskResult, json.dumps(value))


def test_topics_round_trip_and_refuse_wildcards() -> None:
    topics = Topics()
    parsed = topics.parse_agent(topics.results("agent-1"))
    assert (parsed.agent_id, parsed.channel) == ("agent-1", AgentChannel.RESULTS)
    assert topics.parse_rpc(topics.rpc(RpcMethod.TRIGGER)) is RpcMethod.TRIGGER
    for bad in ("a/b", "+", "#", ""):
        with pytest.raises(TopicError):
            topics.tasks(bad)
    with pytest.raises(TopicError):
        topics.parse_agent("kbbus/v1/agents/a/b/status")
    assert topics.rpc_filter("ctl") == "$share/ctl/kbbus/v1/rpc/+"


def test_topic_kinds_label_the_controllers_metrics() -> None:
    t = Topics("site/kb")
    assert t.kind(t.tasks("a-1")) == "tasks"
    assert t.kind(t.status("a-1")) == "status"
    assert t.kind(t.workflow_event("w-1", "step.finished")) == "events"
    assert t.kind(t.agent_event("a-1", "agent.online")) == "events"
    assert t.kind(t.reply("client-1")) == "replies"
    assert t.kind(t.controller_keys()) == "controller"
    assert t.kind("kbbus/v1/agents/a-1/tasks") == "other"  # another root


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("mqtt://u:s3cret@broker:1884", "mqtt://u:***@broker:1884"),
        (
            "mqtts://kbbus-controller:p%2Fw@10.0.0.1",
            "mqtts://kbbus-controller:***@10.0.0.1",
        ),
        ("mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1883"),
        ("mqtt://only-user@host:1883", "mqtt://only-user@host:1883"),
    ],
)
def test_logged_urls_carry_no_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown
