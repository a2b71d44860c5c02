"""The KB catalog: the KB definition files shipped with the controller.

A KB file (YAML or JSON) is a ``schemas.kb.KBDefinition``. Loading checks
everything that can be checked before a workflow runs: the file's shape, the
parameters' JSON Schema, and every argument template (syntax, names, and that
``steps.<id>`` names an earlier step). The first problem stops the load with a
``KBLoadError`` that names the file and the field.
"""

import copy
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, ValidationError, best_match
from pydantic import ValidationError as ModelError

from controller.templating import ArgsTemplateError, check_args
from schemas.errors import KbbusError
from schemas.kb import KBDefinition
from schemas.views import KBView

BUILTIN_DIR = Path(__file__).parent / "kbs"
KB_SUFFIXES = (".yaml", ".yml", ".json")


class KBLoadError(KbbusError):
    """A KB file is unreadable or invalid; the message names file and field."""


class ParamsError(KbbusError):
    """Parameters do not match a KB's schema; the message names the field."""


def _model_error(path: Path, exc: ModelError) -> KBLoadError:
    first = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in first["loc"]) or "(root)"
    return KBLoadError(f"{path}: {where}: {first['msg']}")


def parse_file(path: Path) -> KBDefinition:
    """Read and check one KB file."""
    try:
        text = path.read_text(encoding="utf-8")
        raw = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:
        raise KBLoadError(f"{path}: cannot be read as a KB file: {exc}") from None
    if not isinstance(raw, dict):
        raise KBLoadError(f"{path}: (root): a KB file must hold a mapping.")
    try:
        kb = KBDefinition.model_validate(raw)
    except ModelError as exc:
        raise _model_error(path, exc) from None
    try:
        Draft202012Validator.check_schema(kb.params)
    except SchemaError as exc:
        where = ".".join(str(p) for p in exc.absolute_path)
        raise KBLoadError(
            f"{path}: params{'.' + where if where else ''}: "
            f"not a valid JSON Schema: {exc.message}"
        ) from None
    earlier: set[str] = set()
    for i, step in enumerate(kb.steps):
        try:
            check_args(step.args, earlier)
        except ArgsTemplateError as exc:
            raise KBLoadError(f"{path}: steps.{i}.{exc}") from None
        earlier.add(step.id)
    return kb


def with_defaults(
    schema: Mapping[str, Any], value: Mapping[str, Any]
) -> dict[str, Any]:
    """``value`` with the schema's ``default`` filled in for missing properties."""
    result = dict(value)
    properties = schema.get("properties", {})
    if not isinstance(properties, Mapping):
        return result
    for name, sub in properties.items():
        if not isinstance(sub, Mapping):
            continue
        if name not in result and "default" in sub:
            result[name] = copy.deepcopy(sub["default"])
        if isinstance(result.get(name), Mapping):
            result[name] = with_defaults(sub, result[name])
    return result


def _params_message(error: ValidationError) -> str:
    path = "".join(f".{p}" for p in error.absolute_path)
    required = error.validator_value
    if (
        error.validator == "required"
        and isinstance(required, list)
        and isinstance(error.instance, Mapping)
    ):
        missing = [n for n in required if n not in error.instance]
        if missing:
            return f"params{path}.{missing[0]}: a value is required."
    return f"params{path}: {error.message}"


class KBCatalog:
    """The KBs by id, each with its compiled parameter validator."""

    def __init__(self, kbs: dict[str, KBDefinition]) -> None:
        self.kbs = kbs
        self._validators = {
            kb_id: Draft202012Validator(kb.params) for kb_id, kb in kbs.items()
        }

    @classmethod
    def load(cls, *dirs: Path, include_builtin: bool = True) -> "KBCatalog":
        """Load the shipped KBs (unless told not to) and every KB file in ``dirs``.

        A directory given twice, or the shipped one given explicitly, is read
        once. Two files defining the same KB id are an error.
        """
        seen_dirs: list[Path] = []
        for d in [BUILTIN_DIR, *dirs] if include_builtin else list(dirs):
            resolved = Path(d).resolve()
            if resolved not in seen_dirs:
                seen_dirs.append(resolved)
        kbs: dict[str, KBDefinition] = {}
        origin: dict[str, Path] = {}
        for path in _kb_files(seen_dirs):
            kb = parse_file(path)
            if kb.id in kbs:
                raise KBLoadError(
                    f"{path}: id: KB {kb.id!r} is already defined in {origin[kb.id]}."
                )
            kbs[kb.id] = kb
            origin[kb.id] = path
        return cls(kbs)

    def get(self, kb_id: str) -> KBDefinition | None:
        return self.kbs.get(kb_id)

    def params(self, kb_id: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The parameters with defaults applied; ``ParamsError`` if invalid."""
        kb = self.kbs[kb_id]
        full = with_defaults(kb.params, params)
        error = best_match(self._validators[kb_id].iter_errors(full))
        if error is not None:
            raise ParamsError(_params_message(error))
        return full

    def views(self) -> list[KBView]:
        return [kb_view(self.kbs[kb_id]) for kb_id in sorted(self.kbs)]


def kb_view(kb: KBDefinition) -> KBView:
    return KBView(
        kb_id=kb.id,
        title=kb.title,
        description=kb.description,
        params_schema=kb.params,
        steps=[step.model_dump(mode="json") for step in kb.steps],
    )


def _kb_files(dirs: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for d in dirs:
        if not d.is_dir():
            raise KBLoadError(f"{d}: is not a directory of KB files.")
        files.extend(
            sorted(p for p in d.iterdir() if p.suffix in KB_SUFFIXES and p.is_file())
        )
    return files
