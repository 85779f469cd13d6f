"""The pipeline's status from a plan and what was observed: phase, per-stage entries, the printer-column fields
(currentStage, reward, kl) and the standard conditions, plus the Events that the change from the previous
status calls for. Pure: time comes in as an argument.

Conditions (``rlhf_api.status.ConditionType``), each kept with its ``lastTransitionTime`` while its status
does not change, and stamped with the generation it was computed from:

* Ready: True once every stage is done;
* Progressing: True while a stage runs or is about to start;
* Degraded: True when a stage failed for good (the spec must change for it to run again);
* Stalled: True when the running stage published no new step for ``stall_after_s`` seconds;
* RewardHackingSuspected: True when PPO's reward-hacking guardrail (:mod:`rlhf_api.metric_keys`) fired (other fired
  guardrails are named in the message).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from rlhf_api import metric_keys
from rlhf_api.phases import PipelinePhase, Reason, StagePhase, parse_time, rfc3339
from rlhf_api.spec import STAGE_ORDER, Stage
from rlhf_api.status import Condition, ConditionType, PipelineStatus, StageProgress, StageStatus
from rlhf_operator.controller.observe import JobState
from rlhf_operator.plan import Plan

MAX_STAGE_METRICS = 24


@dataclass(frozen=True)
class StageFacts:
    """Everything observed about one stage that the status shows."""

    stage: Stage
    job: JobState | None = None
    job_name: str | None = None  # the Job the stage runs as now (created or about to be)
    artifact_uri: str | None = None
    config_digest: str | None = None
    manifest_digest: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int | None = None  # live progress of a running stage
    started: bool = False  # the reconciler just created or resumed its Job
    message: str = ""


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal | Warning
    reason: str
    message: str


def numeric_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers among a stage's metrics (booleans and text left out), at most MAX_STAGE_METRICS of them."""
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return dict(sorted(out.items())[:MAX_STAGE_METRICS])


def _stage_status(facts: StageFacts, phase: StagePhase, previous: StageStatus | None, now: str) -> StageStatus:
    same_job = previous is not None and previous.job_name == facts.job_name
    job = facts.job
    if facts.started and phase is StagePhase.PENDING:
        phase = StagePhase.RUNNING  # its Job exists now
    start = (job.start_time if job else None) or (previous.start_time if same_job and previous else None)
    if facts.started and not start:
        start = now
    finished = phase in (StagePhase.SUCCEEDED, StagePhase.FAILED)
    completion = None
    if finished:
        completion = (job.completion_time if job else None) or (
            previous.completion_time if same_job and previous else None) or now
    progress = None
    if phase is StagePhase.RUNNING and facts.step is not None:
        kept = previous.progress if same_job and previous and previous.progress else None
        updated = kept.updated if kept and kept.step == facts.step else now
        progress = StageProgress(step=facts.step, updated=updated)
    elif phase is StagePhase.RUNNING:
        kept = previous.progress if same_job and previous and previous.progress else None
        progress = kept or StageProgress(updated=start or now)
    # Attempts are counted in the status itself: pods that were deleted (suspension, eviction, a user) vanish
    # from the API, so each new pod seen for the same Job adds one.
    before_attempts = previous.attempts if same_job and previous else 0
    before_pod = previous.pod_name if same_job and previous else None
    pod = (job.pod_name if job else None) or before_pod
    if pod and before_pod and pod != before_pod:
        attempts = before_attempts + 1
    else:
        attempts = max(before_attempts, 1) if pod else before_attempts
    attempts = max(attempts, job.attempts if job else 0, 1 if facts.started else 0)
    return StageStatus(
        name=facts.stage, phase=phase, job_name=facts.job_name, attempts=attempts, pod_name=pod, start_time=start,
        completion_time=completion, artifact_uri=facts.artifact_uri, manifest_digest=facts.manifest_digest,
        config_digest=facts.config_digest, metrics=numeric_metrics(facts.metrics), progress=progress,
        message=facts.message,
    )


def _headline(stages: dict[Stage, StageStatus], keys: tuple[tuple[Stage, str], ...]) -> float | None:
    for stage, key in keys:
        entry = stages.get(stage)
        if entry is not None and key in entry.metrics:
            return round(entry.metrics[key], 4)
    return None


def _condition(kind: str, true: bool, reason: str, message: str, previous: dict[str, Condition],
               generation: int | None, now: str) -> Condition:
    status = "True" if true else "False"
    old = previous.get(kind)
    since = old.last_transition_time if old is not None and old.status == status else now
    return Condition(type=kind, status=status, reason=reason, message=message, last_transition_time=since,
                     observed_generation=generation)


def build_status(decision: Plan, facts: dict[Stage, StageFacts], previous: PipelineStatus, *,
                 generation: int | None, now: dt.datetime, stall_after_s: float | None = None) -> PipelineStatus:
    """The new status. ``previous`` keeps transition times, start times and progress timestamps stable."""
    stamp = rfc3339(now)
    before = {Stage(s.name): s for s in previous.stages}
    stages = {}
    for stage in STAGE_ORDER:
        phase = decision.stages.get(stage, StagePhase.SKIPPED)
        stages[stage] = _stage_status(facts.get(stage, StageFacts(stage)), phase, before.get(stage), stamp)

    current, message = _current_stage(decision, stages)
    conditions = _conditions(decision, current, message, stages, previous.conditions, generation=generation,
                             now=now, stall_after_s=stall_after_s)
    return PipelineStatus(
        phase=decision.phase,
        current_stage=current.value if current is not None else None,
        reward=_headline(stages, metric_keys.REWARD_COLUMN),
        kl=_headline(stages, metric_keys.KL_COLUMN),
        message=message,
        observed_generation=generation,
        stages=list(stages.values()),
        conditions=conditions,
    )


def _current_stage(decision: Plan, stages: dict[Stage, StageStatus]) -> tuple[Stage | None, str]:
    """The stage the Stage column shows and the pipeline's message (which counts a running stage's attempts)."""
    phase = decision.phase
    current = decision.current
    if current is None and phase is PipelinePhase.SUCCEEDED:  # the Stage column shows where the run ended
        current = next((s for s in reversed(STAGE_ORDER) if stages[s].phase == StagePhase.SUCCEEDED), None)
    if current is not None and stages[current].phase == StagePhase.RUNNING and phase is PipelinePhase.RUNNING:
        message = f"stage {current.value} is running"
        if stages[current].attempts > 1:
            message += f" (attempt {stages[current].attempts})"
    else:
        message = decision.message
    return current, message


def _conditions(decision: Plan, current: Stage | None, message: str, stages: dict[Stage, StageStatus],
                previous: list[Condition], *, generation: int | None, now: dt.datetime,
                stall_after_s: float | None) -> list[Condition]:
    """Ready, Progressing, Degraded, Stalled and RewardHackingSuspected, in that order."""
    stamp = rfc3339(now)
    conditions_before = {c.type: c for c in previous}

    def condition(kind: str, true: bool, reason: str, text: str) -> Condition:
        return _condition(kind, true, reason, text, conditions_before, generation, stamp)

    phase = decision.phase
    reason = decision.reason or phase.value
    running = phase is PipelinePhase.RUNNING
    failed = phase is PipelinePhase.FAILED
    stalled = _stalled_message(current, stages, now, stall_after_s) if running else ""
    ppo_metrics = stages[Stage.PPO].metrics
    fired = sorted(k.removeprefix(metric_keys.GUARDRAIL_PREFIX) for k, v in ppo_metrics.items()
                   if k.startswith(metric_keys.GUARDRAIL_PREFIX) and v)
    return [
        condition(ConditionType.READY, phase is PipelinePhase.SUCCEEDED, reason, message),
        condition(ConditionType.PROGRESSING, running, reason, message),
        condition(ConditionType.DEGRADED, failed, Reason.STAGE_FAILED if failed else Reason.AS_EXPECTED,
                  message if failed else "no stage failed"),
        condition(ConditionType.STALLED, bool(stalled), Reason.NO_PROGRESS if stalled else Reason.AS_EXPECTED,
                  stalled or "the pipeline is not stalled"),
        condition(ConditionType.REWARD_HACKING_SUSPECTED, bool(ppo_metrics.get(metric_keys.REWARD_HACKING)),
                  Reason.GUARDRAIL_FIRED if fired else Reason.NO_GUARDRAIL,
                  f"PPO guardrails fired: {', '.join(fired)}" if fired else "no PPO guardrail fired"),
    ]


def _stalled_message(current: Stage | None, stages: dict[Stage, StageStatus], now: dt.datetime,
                     stall_after_s: float | None) -> str:
    """Why the running stage counts as stalled, or "" when it published a step recently enough."""
    if current is None or not stall_after_s:
        return ""
    progress = stages[current].progress
    last = parse_time(progress.updated if progress else None)
    if last is not None and (now - last).total_seconds() > stall_after_s:
        return (f"stage {current.value} published no new step since {progress.updated} "
                f"(more than {int(stall_after_s)} s)")
    return ""


def transitions(previous: PipelineStatus, new: PipelineStatus) -> list[EventSpec]:
    """The Events a status change calls for: each stage that started, retried, succeeded or failed, and the
    pipeline's own phase changes. Comparing with the stored status makes them exactly-once across restarts."""
    events: list[EventSpec] = []
    before = {Stage(s.name): s for s in previous.stages}
    for entry in new.stages:
        old = before.get(Stage(entry.name))
        name = Stage(entry.name).value
        old_phase = StagePhase(old.phase) if old else None
        phase = StagePhase(entry.phase)
        new_job = old is None or old.job_name != entry.job_name
        if phase is StagePhase.RUNNING and (old_phase is not StagePhase.RUNNING or new_job):
            events.append(EventSpec("Normal", Reason.STAGE_STARTING,
                                    f"stage {name}: started Job {entry.job_name}"))
        elif phase is StagePhase.RUNNING and old is not None and entry.attempts > old.attempts:
            events.append(EventSpec("Warning", Reason.STAGE_RETRYING,
                                    f"stage {name}: Job {entry.job_name} started attempt {entry.attempts}"))
        if phase is StagePhase.SUCCEEDED and old_phase is not StagePhase.SUCCEEDED:
            shown = ", ".join(f"{k} {v:.4g}" for k, v in list(entry.metrics.items())[:4])
            events.append(EventSpec("Normal", Reason.STAGE_SUCCEEDED,
                                    f"stage {name} succeeded: {entry.artifact_uri}" + (f" ({shown})" if shown else "")))
        if phase is StagePhase.FAILED and old_phase is not StagePhase.FAILED:
            events.append(EventSpec("Warning", Reason.STAGE_FAILED, f"stage {name} failed: {entry.message}"))
    old_phase = PipelinePhase(previous.phase)
    phase = PipelinePhase(new.phase)
    if phase != old_phase or not previous.stages:
        if phase is PipelinePhase.SUCCEEDED:
            events.append(EventSpec("Normal", Reason.SUCCEEDED, "every stage is done"))
        elif phase is PipelinePhase.SUSPENDED:
            events.append(EventSpec("Normal", Reason.SUSPENDED, new.message))
        elif phase is PipelinePhase.RUNNING and old_phase is PipelinePhase.SUSPENDED:
            events.append(EventSpec("Normal", Reason.RESUMED, "spec.suspend was cleared: the pipeline runs again"))
        elif phase is PipelinePhase.FAILED:
            events.append(EventSpec("Warning", Reason.STAGE_FAILED, new.message))
    return events
