"""Property-based: decoding any bytes as any bus message raises only MessageError.

Every model in ``schemas.messages`` is tried with arbitrary bytes, arbitrary
JSON, and objects that carry the model's own field names (and ``v: 1``) with
arbitrary values, so the validators of every field are reached, not only the
JSON parser.
"""

import contextlib
import inspect
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from schemas import MessageError, decode, encode
from schemas import messages as messages_module

MODELS: list[type[BaseModel]] = sorted(
    (
        cls
        for _, cls in inspect.getmembers(messages_module, inspect.isclass)
        if issubclass(cls, messages_module.Message)
        and cls.__module__ == messages_module.__name__
    ),
    key=lambda cls: cls.__name__,
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=10,
)


def shaped_like(model: type[BaseModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with (some of) the model's field names and arbitrary values."""
    fields = sorted(model.model_fields)
    return st.fixed_dictionaries(
        {"v": st.sampled_from([1, 1, 1, 2, "1", None])},
        optional={name: json_values for name in fields if name != "v"},
    )


def test_every_message_model_is_covered() -> None:
    names = {m.__name__ for m in MODELS}
    assert {"AgentStatus", "Heartbeat", "Task", "TaskResult", "Event"} <= names
    assert "TriggerRequest" in names
    assert "LookupReply" in names


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=20, deadline=None)
@given(payload=st.binary(max_size=512))
def test_any_bytes(model: type[BaseModel], payload: bytes) -> None:
    with contextlib.suppress(MessageError):
        decode(model, payload)


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=20, deadline=None)
@given(value=json_values)
def test_any_json(model: type[BaseModel], value: object) -> None:
    with contextlib.suppress(MessageError):
        decode(model, json.dumps(value))


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_objects_with_the_models_fields(
    model: type[BaseModel], data: st.DataObject
) -> None:
    value = data.draw(shaped_like(model))
    try:
        decoded = decode(model, json.dumps(value))
    except MessageError:
        return
    # What decodes re-encodes and decodes to the same message.
    assert decode(model, encode(decoded)) == decoded
