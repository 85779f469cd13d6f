"""Reading an RLHFPipeline YAML file, with errors that name the field and say what to do."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from rlhf_api.spec import RLHFPipeline, RLHFPipelineSpec, camel_path


class SpecError(Exception):
    """A pipeline document that does not validate; ``problems`` holds one 'field: message' line each."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source} is not a valid RLHFPipeline:\n" + "\n".join(f"  {p}" for p in problems))


def _known_fields(model: type, loc: tuple) -> list[str]:
    """The camelCase fields a model accepts at ``loc`` (for 'unknown field' messages)."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part) or next(
            (f for f in getattr(current, "model_fields", {}).values() if f.alias == part), None)
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if hasattr(c, "model_fields")), None)
        if current is None:
            return []
    return [f.alias or name for name, f in current.model_fields.items()]


def describe(err: ValidationError, model: type = RLHFPipeline) -> list[str]:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = camel_path(loc) or "(document)"
        if e["type"] == "extra_forbidden":
            known = _known_fields(model, loc)
            hint = f"; valid fields here: {', '.join(known)}" if known else ""
            lines.append(f"{path}: unknown field{hint}")
        elif e["type"] == "missing":
            lines.append(f"{path}: required field is missing")
        else:
            message = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            scalar = got is not None and not isinstance(got, (dict, list))
            shown = f" (got {got!r})" if scalar and repr(got) not in message else ""
            lines.append(f"{path}: {message}{shown}")
    return lines


def parse_pipeline(data: Any, source: str = "<input>") -> RLHFPipeline:
    if not isinstance(data, dict):
        raise SpecError(source, ["(document): expected a YAML mapping with apiVersion, kind, metadata and spec"])
    try:
        return RLHFPipeline.model_validate(data)
    except ValidationError as err:
        raise SpecError(source, describe(err)) from None


def load_pipeline(path: str | Path) -> RLHFPipeline:
    path = Path(path)
    try:
        documents = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d is not None]
    except FileNotFoundError:
        raise SpecError(str(path), ["(file): no such file"]) from None
    except yaml.YAMLError as err:
        raise SpecError(str(path), [f"(yaml): {err}"]) from None
    if len(documents) != 1:
        raise SpecError(str(path), [f"(file): expected one YAML document, found {len(documents)}"])
    return parse_pipeline(documents[0], str(path))


__all__ = ["SpecError", "load_pipeline", "parse_pipeline", "describe", "RLHFPipelineSpec"]
