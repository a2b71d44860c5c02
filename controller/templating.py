"""Rendering a KB step's arguments with Jinja2, sandboxed and strict.

KB files come from operators, not from agents, but a template still must not
reach into Python objects: the environment is Jinja2's sandbox, and an
undefined name is an error rather than an empty string.

A string that is exactly one expression, such as ``"{{ params.days }}"``, keeps
the expression's type (an integer stays an integer); any other string renders
to a string. Lists and dicts are rendered element by element.
"""

import re
from collections.abc import Iterator, Mapping
from functools import lru_cache
from typing import Any

from jinja2 import StrictUndefined, TemplateError, Undefined, meta, nodes
from jinja2.sandbox import SandboxedEnvironment

from schemas.errors import KbbusError

# Names a template may use: the workflow's parameters and earlier steps' results.
CONTEXT_NAMES = frozenset({"params", "steps"})

_SINGLE_EXPRESSION = re.compile(r"^\s*\{\{(?P<expr>.*)\}\}\s*$", re.DOTALL)
_JSON_SCALARS = (str, int, float, bool, type(None))

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class ArgsTemplateError(KbbusError):
    """A step's arguments could not be compiled or rendered."""


def _is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def _single_expression(text: str) -> str | None:
    match = _SINGLE_EXPRESSION.match(text)
    if match is None:
        return None
    expr = match.group("expr")
    # "{{ a }} and {{ b }}" also matches the pattern: it is not one expression.
    if "{{" in expr or "}}" in expr or "{%" in expr:
        return None
    return expr


@lru_cache(maxsize=1024)
def _parse(text: str) -> nodes.Template:
    return _env.parse(text)


@lru_cache(maxsize=1024)
def _compile_expression(expr: str) -> Any:
    return _env.compile_expression(expr, undefined_to_none=False)


@lru_cache(maxsize=1024)
def _compile_template(text: str) -> Any:
    return _env.from_string(text)


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    """Every string inside ``value`` with its dotted path."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _strings(item, f"{path}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _strings(item, f"{path}.{i}")


@lru_cache(maxsize=1024)
def _names_used(text: str) -> tuple[frozenset[str], frozenset[str]]:
    """Top-level names, and the step ids reached as ``steps.<id>``."""
    tree = _parse(text)
    # meta knows Jinja's scoping: a loop variable is not a context name. It
    # runs Jinja's code generator, hence the cache: this is asked every step.
    top = meta.find_undeclared_variables(tree)
    step_ids: set[str] = set()
    for node in tree.find_all(nodes.Getattr):
        if isinstance(node.node, nodes.Name) and node.node.name == "steps":
            step_ids.add(node.attr)
    for item in tree.find_all(nodes.Getitem):
        if (
            isinstance(item.node, nodes.Name)
            and item.node.name == "steps"
            and isinstance(item.arg, nodes.Const)
            and isinstance(item.arg.value, str)
        ):
            step_ids.add(item.arg.value)
    return frozenset(top), frozenset(step_ids)


def check_args(args: Mapping[str, Any], earlier_steps: set[str]) -> None:
    """Compile every template in ``args``; raise naming the first bad one.

    Only ``params`` and ``steps`` may be used, and ``steps.<id>`` must name a
    step that comes earlier in the KB.
    """
    for path, text in _strings(args, "args"):
        if not _is_template(text):
            continue
        try:
            top, step_ids = _names_used(text)
        except TemplateError as exc:
            raise ArgsTemplateError(f"{path}: {exc}") from None
        unknown = top - CONTEXT_NAMES
        if unknown:
            raise ArgsTemplateError(
                f"{path}: unknown name {sorted(unknown)[0]!r}; "
                "a template may use only 'params' and 'steps'."
            )
        later = step_ids - earlier_steps
        if later:
            raise ArgsTemplateError(
                f"{path}: 'steps.{sorted(later)[0]}' is not an earlier step."
            )


def uses_steps(args: Mapping[str, Any]) -> bool:
    """Whether rendering ``args`` needs earlier steps' results."""
    for _path, text in _strings(args, "args"):
        if _is_template(text) and "steps" in _names_used(text)[0]:
            return True
    return False


def _render_string(text: str, context: Mapping[str, Any]) -> Any:
    if not _is_template(text):
        return text
    expr = _single_expression(text)
    if expr is None:
        return _compile_template(text).render(context)
    value = _compile_expression(expr)(**context)
    if isinstance(value, Undefined):
        # StrictUndefined raises on any use; str() is such a use.
        str(value)
    return _jsonable(value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return str(value)


def _render(value: Any, context: Mapping[str, Any]) -> Any:
    if isinstance(value, str):
        return _render_string(value, context)
    if isinstance(value, Mapping):
        return {k: _render(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [_render(v, context) for v in value]
    return value


def render_args(args: Mapping[str, Any], context: Mapping[str, Any]) -> dict[str, Any]:
    """Render every template in ``args`` with ``context`` (params, steps)."""
    try:
        rendered = _render(args, context)
    except Exception as exc:
        # A template can fail in any way its expression can (an undefined name,
        # a sandbox refusal, 1/0): each is the KB's or the caller's mistake.
        raise ArgsTemplateError(f"cannot render the step's arguments: {exc}") from None
    assert isinstance(rendered, dict)
    return rendered
