"""Generate the RLHFPipeline CustomResourceDefinition from the pydantic models.

Pydantic writes JSON Schema (2020-12) with ``$ref``/``$defs`` and ``anyOf`` for optional fields; the API
server wants a *structural* OpenAPI v3 schema: everything inlined, ``nullable`` instead of a null
branch, ``x-kubernetes-int-or-string`` for quantities, and no ``additionalProperties`` beside
``properties``. :func:`structural` does that translation; :func:`crd` assembles the whole object.
``crds/`` holds its output, and a test fails when the two differ.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from rlhf_api import spec as api
from rlhf_api.status import PipelineStatus

_DROP = {"title", "$defs", "additionalProperties", "const"}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """Translate one pydantic JSON Schema node into a Kubernetes structural schema node."""
    defs = schema.get("$defs", {}) if defs is None else defs
    node = copy.deepcopy(schema)

    if "$ref" in node:  # inline the definition; sibling keys (description, default) win
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**copy.deepcopy(target), **node}

    if "anyOf" in node:
        union = node.pop("anyOf")
        branches = [b for b in union if b.get("type") != "null"]
        default = node.pop("default", None)
        types = sorted(b.get("type", "") for b in branches)
        if types == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True
        elif len(branches) == 1:
            node = {**structural(branches[0], defs), **node}
        else:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
        if len(branches) < len(union):
            node["nullable"] = True
        if default is not None:
            node["default"] = default

    if "const" in node:
        node["enum"] = [node["const"]]
    if "enum" in node and "type" not in node:
        kinds = {type(v) for v in node["enum"]}
        node["type"] = {int: "integer", str: "string", float: "number", bool: "boolean"}[kinds.pop()]
    for bound in ("exclusiveMinimum", "exclusiveMaximum"):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node["minimum" if bound == "exclusiveMinimum" else "maximum"] = node[bound]
            node[bound] = True

    if node.get("type") == "object":
        if "properties" in node:
            node["properties"] = {k: structural(v, defs) for k, v in node["properties"].items()}
        elif isinstance(node.get("additionalProperties"), dict):
            node["additionalProperties"] = structural(node["additionalProperties"], defs)
            return {k: v for k, v in node.items() if k not in _DROP - {"additionalProperties"}}
    if node.get("type") == "array" and "items" in node:
        node["items"] = structural(node["items"], defs)
    return {k: v for k, v in node.items() if k not in _DROP}


def bounded(node: dict[str, Any]) -> dict[str, Any]:
    """``node`` with a size bound on every string (maxLength), list (maxItems) and map (maxProperties) that has
    none of its own: :data:`rlhf_api.spec.MAX_STRING_LENGTH` and its siblings. Enums are bounded already."""
    kind = node.get("type")
    if kind == "string" and "enum" not in node:
        node.setdefault("maxLength", api.MAX_STRING_LENGTH)
    elif kind == "array":
        node.setdefault("maxItems", api.MAX_LIST_ITEMS)
        bounded(node["items"])
    elif kind == "object" and isinstance(node.get("additionalProperties"), dict):
        node.setdefault("maxProperties", api.MAX_MAP_PROPERTIES)
        bounded(node["additionalProperties"])
    for child in node.get("properties", {}).values():
        bounded(child)
    return node


def spec_schema() -> dict[str, Any]:
    schema = api.RLHFPipelineSpec.model_json_schema(by_alias=True, mode="validation")
    out = bounded(structural(schema))
    out["description"] = (
        "RLHFPipeline runs SFT, preference data, reward model, PPO and evaluation as Kubernetes Jobs, "
        "stage by stage, handing checkpoints from stage to stage through S3-compatible storage."
    )
    return out


def status_schema() -> dict[str, Any]:
    out = structural(PipelineStatus.model_json_schema(by_alias=True, mode="serialization"))
    out["description"] = "Where the pipeline stands: written by the operator, never by users."
    return out


def _immutable_while_running(stage: str) -> api.Rule:
    """A transition rule: ``spec.<stage>`` cannot change while the status says that stage is running (its Job
    runs with the settings it was created with). Rules with ``oldSelf`` are checked on updates only."""
    running = (f"has(oldSelf.status) && has(oldSelf.status.stages) && "
               f"oldSelf.status.stages.exists(s, s.name == '{stage}' && s.phase == 'Running')")
    same = (f"(has(self.spec.{stage}) ? has(oldSelf.spec.{stage}) && self.spec.{stage} == oldSelf.spec.{stage} "
            f": !has(oldSelf.spec.{stage}))")
    return api.Rule(f"!({running}) || {same}",
                    f"spec.{stage} cannot change while the {stage} stage is running: set spec.suspend: true and "
                    "wait for the stage to pause, or wait for it to finish",
                    f".spec.{stage}", reason="FieldValueForbidden")


def root_rules() -> list[dict[str, str]]:
    """CEL rules on the whole object: a running stage's settings are immutable."""
    return [_immutable_while_running(s.value).schema() for s in api.STAGE_ORDER]


def metadata_schema() -> dict[str, Any]:
    """Only ``metadata.name`` may be constrained in a CRD: stage Job and Service names are derived from it."""
    return {
        "type": "object",
        "properties": {
            "name": {
                "type": "string",
                "maxLength": api.NAME_MAX_LENGTH,
                "pattern": api.NAME_PATTERN,
                "description": f"name: at most {api.NAME_MAX_LENGTH} lowercase letters, digits and '-', starting "
                "with a letter (stage Job and Service names are derived from it).",
            }
        },
    }


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": api.SHORT_NAMES,
                "categories": ["all", "rlhf"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        {"name": "Stage", "type": "string", "jsonPath": ".status.currentStage"},
                        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
                        {"name": "Reward", "type": "number", "jsonPath": ".status.reward", "format": "float"},
                        {"name": "KL", "type": "number", "jsonPath": ".status.kl", "format": "float"},
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": f"{api.KIND} is one RLHF training run, from base model to aligned policy.",
                            "required": ["spec"],
                            "x-kubernetes-validations": root_rules(),
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": metadata_schema(),
                                "spec": spec_schema(),
                                "status": status_schema(),
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# Generated by `rlhf crd` from api/rlhf_api/spec.py and status.py. Do not edit.\n"
    return header + yaml.safe_dump(crd(), sort_keys=False, width=120)
