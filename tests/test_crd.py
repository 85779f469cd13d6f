"""The CRD in crds/ is generated from the pydantic models and must stay in sync with them."""

from __future__ import annotations

from pathlib import Path

import yaml

from rlhf_api import spec as api
from rlhf_operator.crd import crd, crd_yaml

CRD_FILE = Path(__file__).resolve().parents[1] / "crds" / "rlhf-operator.io_rlhfpipelines.yaml"


def walk(node, path="$"):
    yield path, node
    if isinstance(node, dict):
        for key, child in node.get("properties", {}).items():
            yield from walk(child, f"{path}.{key}")
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_is_up_to_date():
    assert CRD_FILE.read_text() == crd_yaml(), "crds/ is stale: run `make crd` (rlhf crd > crds/...) and commit"
    chart_copy = CRD_FILE.parents[1] / "helm" / "rlhf-operator" / "crds" / CRD_FILE.name
    assert chart_copy.read_text() == crd_yaml(), "the chart's CRD is stale: run `make crd` and commit"


def test_schema_is_structural_and_documented():
    version = crd()["spec"]["versions"][0]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in walk(spec):
        for banned in ("$ref", "anyOf", "allOf", "oneOf", "$defs", "const", "title"):
            assert banned not in node, f"{path} has {banned}"
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        if path != "$" and not path.endswith(("[]", "{}")):  # fields are documented; list items need not be
            assert node.get("description"), f"{path} has no description"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_every_string_list_and_map_of_the_spec_is_bounded():
    """No pipeline (nor a stage ConfigMap made from it) can grow without limit: issue 36."""
    spec = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    for path, node in walk(spec):
        if node.get("type") == "string" and "enum" not in node:
            assert 0 < node.get("maxLength", 0) <= api.MAX_STRING_LENGTH, path
        if node.get("type") == "array":
            assert 0 < node.get("maxItems", 0) <= api.MAX_LIST_ITEMS, path
        if isinstance(node.get("additionalProperties"), dict):
            assert 0 < node.get("maxProperties", 0) <= api.MAX_MAP_PROPERTIES, path
    distributed = spec["properties"]["ppo"]["properties"]["distributed"]["properties"]
    assert distributed["nodes"]["maximum"] == api.MAX_NODES == 64
    assert distributed["procsPerNode"]["maximum"] == api.MAX_PROCS_PER_NODE == 16


def test_crd_shape():
    doc = yaml.safe_load(CRD_FILE.read_text())
    assert doc["metadata"]["name"] == "rlhfpipelines.rlhf-operator.io"
    assert doc["spec"]["names"]["shortNames"] == ["rlhf"]
    version = doc["spec"]["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Stage", "Phase", "Reward", "KL", "Age"]
    props = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    assert props["sft"]["properties"]["learningRate"]["exclusiveMinimum"] is True
    assert props["model"]["properties"]["uri"]["pattern"].startswith("^(s3|file|builtin)")
    assert props["model"]["required"] == ["uri"]
    conditions = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]["conditions"]
    assert set(conditions["items"]["required"]) >= {"type", "status", "reason", "lastTransitionTime"}


def test_rlhf_crd_prints_it(capsys):
    from rlhf_operator.cli import main

    assert main(["crd"]) == 0
    assert capsys.readouterr().out == crd_yaml()


def test_cross_field_rules_are_cel_validations():
    """The rules the API server enforces at admission (tests/operator/test_admission.py applies them)."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    spec = schema["properties"]["spec"]
    ppo_rules = {r["fieldPath"]: r["rule"] for r in spec["properties"]["ppo"]["x-kubernetes-validations"]}
    assert ppo_rules[".miniBatchSize"] == "self.batchSize % self.miniBatchSize == 0"
    assert ".prompts" in ppo_rules and ".gradientAccumulationSteps" in ppo_rules
    assert {r["fieldPath"] for r in spec["x-kubernetes-validations"]} == {
        ".storage", ".reward", ".ppo", ".evaluate",
        *(f".{stage}.distributed.zeroStage" for stage in ("sft", "reward", "ppo"))}  # no quantization under ZeRO-3
    lora = spec["properties"]["sft"]["properties"]["lora"]
    assert "default" not in lora["properties"]["r"]  # a CEL rule must see an unset rank as unset
    transition = [r for r in schema["x-kubernetes-validations"] if "oldSelf" in r["rule"]]
    assert [r["fieldPath"] for r in transition] == [".spec.sft", ".spec.preferences", ".spec.reward", ".spec.ppo",
                                                     ".spec.evaluate"]
    assert schema["properties"]["metadata"]["properties"]["name"]["maxLength"] == 40
