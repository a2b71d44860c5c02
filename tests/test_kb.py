"""The KB catalog and argument templates: loading, checking, rendering."""

import json
from pathlib import Path

import pytest
import yaml
from jsonschema import Draft202012Validator

from controller.kb import BUILTIN_DIR, KBCatalog, KBLoadError, ParamsError
from controller.templating import ArgsTemplateError, render_args, uses_steps

SHIPPED = {
    "dns-flush-kb",
    "disk-cleanup-kb",
    "service-restart-kb",
    "collect-diagnostics-kb",
}
KB_JSON_SCHEMA = Path(__file__).parents[1] / "schemas/jsonschema/kb-definition.json"

GOOD = {
    "id": "good-kb",
    "title": "Good",
    "steps": [
        {"id": "first", "action": "echo", "args": {"message": "hi"}},
        {"id": "second", "action": "echo", "args": {"message": "hi"}},
    ],
}


def write_kb(directory: Path, name: str, body: object) -> Path:
    path = directory / name
    path.write_text(body if isinstance(body, str) else yaml.safe_dump(body))
    return path


def test_shipped_catalog_has_the_four_kbs() -> None:
    catalog = KBCatalog.load()
    assert set(catalog.kbs) == SHIPPED
    views = catalog.views()
    assert [v.kb_id for v in views] == sorted(SHIPPED)
    dns = next(v for v in views if v.kb_id == "dns-flush-kb")
    assert [s["action"] for s in dns.steps] == ["dns.flush", "dns.resolve"]
    assert dns.params_schema["properties"]["name"]["default"] == "example.com"


@pytest.mark.parametrize("path", sorted(BUILTIN_DIR.glob("*.yaml")), ids=str)
def test_shipped_kb_files_match_the_published_json_schema(path: Path) -> None:
    schema = json.loads(KB_JSON_SCHEMA.read_text())
    errors = list(
        Draft202012Validator(schema).iter_errors(yaml.safe_load(path.read_text()))
    )
    assert errors == []


def test_builtin_dir_given_again_is_read_once(tmp_path: Path) -> None:
    write_kb(tmp_path, "good.yaml", GOOD)
    catalog = KBCatalog.load(BUILTIN_DIR, tmp_path, tmp_path)
    assert set(catalog.kbs) == SHIPPED | {"good-kb"}
    assert set(KBCatalog.load(tmp_path, include_builtin=False).kbs) == {"good-kb"}


def _bad(**changes: object) -> dict[str, object]:
    kb: dict[str, object] = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target: object = kb
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]  # type: ignore[index]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            assert isinstance(target, dict)
            target[last] = value
    return kb


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (_bad(steps__0__timeout_s=0), "steps.0.timeout_s"),
        (_bad(steps__1__on_failure="retry"), "steps.1.on_failure"),
        (_bad(steps__0__bogus=1), "steps.0.bogus"),
        (_bad(steps__0__action="Not An Action"), "steps.0.action"),
        (_bad(title=""), "title"),
        (_bad(steps=[]), "steps"),
        (_bad(steps__1__id="first"), "used twice"),
        (_bad(params={"type": "object", "properties": {"x": {"type": 12}}}), "params"),
        (_bad(steps__1__args={"m": "{{ params.x "}), "steps.1.args.m"),
        (_bad(steps__0__args={"m": "{{ steps.second.output }}"}), "steps.0.args.m"),
        (_bad(steps__1__args={"m": {"n": ["{{ os.system }}"]}}), "steps.1.args.m.n.0"),
        ("- just\n- a list\n", "(root)"),
        ("id: [unclosed\n", "cannot be read"),
    ],
)
def test_malformed_kb_stops_the_load_naming_file_and_field(
    tmp_path: Path, body: object, field: str
) -> None:
    path = write_kb(tmp_path, "broken.yaml", body)
    with pytest.raises(KBLoadError) as info:
        KBCatalog.load(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert field in message


def test_the_same_kb_id_in_two_files_is_an_error(tmp_path: Path) -> None:
    first = write_kb(tmp_path, "a.yaml", GOOD)
    second = write_kb(tmp_path, "b.json", json.dumps(GOOD))
    with pytest.raises(KBLoadError, match="already defined") as info:
        KBCatalog.load(tmp_path, include_builtin=False)
    assert str(second) in str(info.value)
    assert str(first) in str(info.value)


def test_a_missing_kb_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(KBLoadError, match="not a directory"):
        KBCatalog.load(tmp_path / "nope")


def test_params_get_defaults_and_errors_name_the_field() -> None:
    catalog = KBCatalog.load()
    assert catalog.params("disk-cleanup-kb", {"path": "/var/log"}) == {
        "path": "/var/log",
        "older_than_days": 7,
    }
    with pytest.raises(ParamsError, match=r"^params\.service: a value is required"):
        catalog.params("service-restart-kb", {})
    with pytest.raises(ParamsError, match=r"^params\.older_than_days: 'x' is not"):
        catalog.params("disk-cleanup-kb", {"older_than_days": "x"})
    with pytest.raises(ParamsError, match="'extra' was unexpected"):
        catalog.params("dns-flush-kb", {"extra": 1})


def test_nested_defaults_are_applied(tmp_path: Path) -> None:
    kb = _bad(
        params={
            "type": "object",
            "properties": {
                "limits": {
                    "type": "object",
                    "default": {},
                    "properties": {"count": {"type": "integer", "default": 3}},
                }
            },
        }
    )
    write_kb(tmp_path, "nested.yaml", kb)
    catalog = KBCatalog.load(tmp_path, include_builtin=False)
    assert catalog.params("good-kb", {}) == {"limits": {"count": 3}}
    assert catalog.params("good-kb", {"limits": {"count": 5}}) == {
        "limits": {"count": 5}
    }


# --- templates -----------------------------------------------------------------


def test_a_single_expression_keeps_its_type_and_text_renders_to_text() -> None:
    context = {
        "params": {"days": 7, "names": ["a", "b"]},
        "steps": {"probe": {"output": " 10.0.0.1\n", "exit_code": 0}},
    }
    args = {
        "days": "{{ params.days }}",
        "names": "{{ params.names }}",
        "line": "keep {{ params.days }} days",
        "address": ["{{ steps.probe.output | trim }}"],
        "code": {"nested": "{{ steps.probe.exit_code }}"},
        "literal": 5,
        "plain": "no template",
        "two": "{{ params.days }}-{{ params.days }}",
    }
    assert render_args(args, context) == {
        "days": 7,
        "names": ["a", "b"],
        "line": "keep 7 days",
        "address": ["10.0.0.1"],
        "code": {"nested": 0},
        "literal": 5,
        "plain": "no template",
        "two": "7-7",
    }


@pytest.mark.parametrize(
    ("template", "why"),
    [
        ("{{ params.missing }}", "has no attribute 'missing'"),
        ("x {{ params.missing }}", "has no attribute 'missing'"),
        ("{{ params.__class__.__mro__ }}", "unsafe"),
        ("{{ ''.__class__.__base__.__subclasses__() }}", "unsafe"),
        ("{{ 1 / 0 }}", "division"),
    ],
)
def test_rendering_is_strict_and_sandboxed(template: str, why: str) -> None:
    with pytest.raises(ArgsTemplateError, match=why):
        render_args({"x": template}, {"params": {}, "steps": {}})


def test_uses_steps_sees_through_nesting_and_loops() -> None:
    assert not uses_steps({"a": "{{ params.x }}", "b": [1, "plain"]})
    assert uses_steps({"a": {"b": ["{{ steps.first.output }}"]}})
    loop = "{% for line in steps.first.output.splitlines() %}{{ line }}{% endfor %}"
    assert uses_steps({"a": loop})
    assert render_args(
        {"a": loop}, {"params": {}, "steps": {"first": {"output": "x\ny"}}}
    ) == {"a": "xy"}
