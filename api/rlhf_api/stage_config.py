"""The contract between an executor and ``rlhf-train``: one JSON stage config per stage.

Executors (the local runner, the operator) build it from the spec with :func:`build_stage_config`, a
pure function, and hand it to ``rlhf-train STAGE --config FILE`` (or the ``RLHF_STAGE_CONFIG``
variable). It carries URIs, hyperparameters and the storage endpoint, never credentials.

Where each stage reads and writes::

    <storage root>/<namespace>/<pipeline>/<uid, 8 chars>/<stage>/     outputs, manifest.json last

A stage's ``digest`` covers everything that changes its result: its own settings, the model spec and
the digests of the stages it reads from. A manifest records the digest it was made with, so a stage
whose manifest carries another digest is stale and runs again, and so does everything after it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rlhf_api.artifacts.store import StorageOptions
from rlhf_api.spec import (
    API_VERSION,
    STAGE_SPECS,
    ModelSpec,
    RLHFPipeline,
    RLHFPipelineSpec,
    Stage,
    StageSpec,
    StorageSpec,
)

# Settings that say where and how a stage runs, not what it computes: they never invalidate an output.
OPERATIONAL_FIELDS = frozenset(
    {"enabled", "artifact", "image", "resources", "distributed", "node_selector", "tolerations",
     "priority_class_name", "max_retries", "active_deadline_seconds"}
)


class ConfigModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class PipelineRef(ConfigModel):
    namespace: str
    name: str
    uid: str = Field(description="the pipeline's uid, shortened to 8 characters; 'local' for local runs")


class InputRef(ConfigModel):
    uri: str
    produced_by: Stage | None = Field(
        None,
        description="the stage whose output this is: then the input is read through its manifest, "
        "which must exist and verify. None for inputs from outside the pipeline (base model, artifacts).",
    )


class StageConfig(ConfigModel):
    api_version: Literal["rlhf-operator.io/v1alpha1"] = API_VERSION
    kind: Literal["StageConfig"] = "StageConfig"
    stage: Stage
    pipeline: PipelineRef
    output_uri: str
    inputs: dict[str, InputRef]
    model: ModelSpec
    storage: StorageSpec
    settings: dict[str, Any] = Field(description="the stage's section of the spec, as JSON (camelCase)")
    digest: str

    def stage_settings(self) -> StageSpec:
        """The stage's settings parsed back into their spec model."""
        return STAGE_SPECS[self.stage].model_validate(self.settings)  # type: ignore[return-value]

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True, indent=2)


def short_uid(uid: str | None) -> str:
    return uid.replace("-", "")[:8] if uid else "local"


def pipeline_prefix(root: str, pipeline: PipelineRef) -> str:
    """Where everything one pipeline (one uid of it) stores: ``<root>/<namespace>/<name>/<uid>``."""
    return f"{root.rstrip('/')}/{pipeline.namespace}/{pipeline.name}/{pipeline.uid}"


def stage_output_uri(root: str, pipeline: PipelineRef, stage: Stage) -> str:
    return f"{pipeline_prefix(root, pipeline)}/{stage.value}"


def storage_options(storage: StorageSpec) -> StorageOptions:
    """How to reach the spec's store (endpoint, region, addressing style); credentials come separately."""
    return StorageOptions(storage.endpoint, storage.region, storage.addressing_style)


def pipeline_ref(doc: RLHFPipeline) -> PipelineRef:
    meta = doc.metadata
    return PipelineRef(namespace=meta.namespace, name=meta.name, uid=short_uid(meta.uid))


def stage_inputs(spec: RLHFPipelineSpec, root: str, pipeline: PipelineRef, stage: Stage) -> dict[str, InputRef]:
    """Which URIs a stage reads, by role. Pure: decided from the spec alone."""

    def output_of(s: Stage) -> InputRef | None:
        settings = spec.stage(s)
        if settings.artifact is not None:
            return InputRef(uri=settings.artifact)
        if settings.enabled:
            return InputRef(uri=stage_output_uri(root, pipeline, s), produced_by=s)
        return None

    base = InputRef(uri=spec.model.uri)
    sft = output_of(Stage.SFT) or base  # with SFT disabled, pi_SFT is the base model
    inputs: dict[str, InputRef | None]
    if stage is Stage.SFT:
        inputs = {"model": base}
    elif stage is Stage.PREFERENCES:
        inputs = {"policy": sft}
    elif stage is Stage.REWARD:
        pairs = InputRef(uri=spec.reward.dataset.uri) if spec.reward.dataset else output_of(Stage.PREFERENCES)
        inputs = {"model": sft if spec.reward.init_from == "sft" else base, "preferences": pairs}
    elif stage is Stage.PPO:
        inputs = {"policy": sft, "reward_model": output_of(Stage.REWARD)}
    else:
        inputs = {"reference": sft, "policy": output_of(Stage.PPO), "reward_model": output_of(Stage.REWARD)}
    return {role: ref for role, ref in inputs.items() if ref is not None}


def stage_digest(spec: RLHFPipelineSpec, stage: Stage, root: str, pipeline: PipelineRef) -> str:
    """sha256 over what determines the stage's output, including the digests of the stages it reads."""
    settings = spec.stage(stage).model_dump(mode="json", exclude=set(OPERATIONAL_FIELDS))
    upstream = {}
    for role, ref in sorted(stage_inputs(spec, root, pipeline, stage).items()):
        upstream[role] = stage_digest(spec, ref.produced_by, root, pipeline) if ref.produced_by else ref.uri
    payload = {
        "stage": stage.value,
        "settings": settings,
        "model": spec.model.model_dump(mode="json"),
        "inputs": upstream,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def build_stage_config(doc: RLHFPipeline, stage: Stage, storage_root: str | None = None) -> StageConfig:
    """The config ``rlhf-train`` gets for one stage of one pipeline.

    Args:
        doc: the validated pipeline document.
        stage: the stage to configure.
        storage_root: overrides ``spec.storage.uri`` (the local runner passes WORKDIR/artifacts).

    Raises:
        ValueError: when no storage root is known.
    """
    spec = doc.spec
    root = storage_root or spec.storage.uri
    if root is None:
        raise ValueError("spec.storage.uri is required: set it to s3://BUCKET/PREFIX (or file:///PATH locally)")
    ref = pipeline_ref(doc)
    return StageConfig(
        stage=stage,
        pipeline=ref,
        output_uri=stage_output_uri(root, ref, stage),
        inputs=stage_inputs(spec, root, ref, stage),
        model=spec.model,
        storage=spec.storage.model_copy(update={"uri": root}),
        settings=spec.stage(stage).model_dump(mode="json", by_alias=True),
        digest=stage_digest(spec, stage, root, ref),
    )

