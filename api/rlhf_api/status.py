"""The RLHFPipeline status: what the executors report, in the shape `kubectl`, Argo CD and Flux read.

``conditions`` follow the standard Kubernetes shape (type, status, reason, message,
lastTransitionTime, observedGeneration), so ``kubectl wait --for=condition=Ready`` works.
The CRD's status schema is generated from these models, like the spec's.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from rlhf_api.phases import PipelinePhase, StagePhase
from rlhf_api.spec import STAGE_ORDER, Stage


class StatusModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore",
                              use_enum_values=True)


class ConditionType:
    """Condition types, each with what it means when True."""

    READY = "Ready"  # means that every stage finished and the final artifacts are in the store
    PROGRESSING = "Progressing"  # means that a stage is running or about to start
    DEGRADED = "Degraded"  # means that a stage failed and will not be retried without a change to the spec
    STALLED = "Stalled"  # means that a running stage made no progress for the configured time
    REWARD_HACKING_SUSPECTED = "RewardHackingSuspected"  # means that a PPO guardrail fired


class Condition(StatusModel):
    type: str = Field(description="type: the condition's type, e.g. Ready.")
    status: Literal["True", "False", "Unknown"] = Field(description="status: True, False or Unknown.")
    reason: str = Field(description="reason: a CamelCase word for machines.")
    message: str = Field("", description="message: a sentence for people.")
    last_transition_time: str = Field(description="lastTransitionTime: when status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        None, description="observedGeneration: the spec generation this condition was computed from."
    )


class StageProgress(StatusModel):
    step: int | None = Field(None, description="step: the last step the stage published.")
    total_steps: int | None = Field(None, description="totalSteps: the steps the stage will make, when known.")
    updated: str | None = Field(None, description="updated: when the operator last read the progress (RFC 3339).")


class StageStatus(StatusModel):
    name: Stage = Field(description="name: the stage (sft, preferences, reward, ppo, evaluate).")
    phase: StagePhase = Field(description="phase: Pending, Running, Succeeded, Failed, Skipped or Provided.")
    job_name: str | None = Field(None, description="jobName: the stage's Job (operator) or process (local).")
    attempts: int = Field(
        0, description="attempts: pods the stage's Job started (preempted or deleted ones included)."
    )
    pod_name: str | None = Field(
        None, description="podName: the stage's latest pod (index 0 of a multi-node stage), for kubectl logs."
    )
    start_time: str | None = Field(None, description="startTime: when the current attempt started.")
    completion_time: str | None = Field(None, description="completionTime: when the stage finished.")
    artifact_uri: str | None = Field(None, description="artifactUri: where the stage's output is stored.")
    manifest_digest: str | None = Field(None, description="manifestDigest: sha256 of the output's manifest.")
    config_digest: str | None = Field(
        None, description="configDigest: the digest of the stage config the output was made with."
    )
    metrics: dict[str, float] = Field(
        default_factory=dict, description="metrics: headline metrics (loss, accuracy, reward, kl...)."
    )
    progress: StageProgress | None = Field(None, description="progress: live progress of a running stage.")
    message: str = Field("", description="message: the last thing said about the stage.")


class PipelineStatus(StatusModel):
    phase: PipelinePhase = Field(
        PipelinePhase.PENDING, description="phase: Pending, Running, Succeeded, Failed or Suspended."
    )
    current_stage: str | None = Field(None, description="currentStage: the stage the pipeline stands at.")
    reward: float | None = Field(None, description="reward: latest mean reward-model score (PPO, evaluate).")
    kl: float | None = Field(None, description="kl: latest mean per-token KL to the reference policy.")
    message: str = Field("", description="message: what the pipeline is doing, in a sentence.")
    observed_generation: int | None = Field(
        None, description="observedGeneration: the spec generation the status reflects."
    )
    stages: list[StageStatus] = Field(
        default_factory=list, max_length=len(STAGE_ORDER), description="stages: one entry per stage."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="conditions: standard conditions, one per type."
    )
