"""The pipeline's state machine: one pure function from (spec, what was observed) to what happens next.

Both executors drive it: the local runner (stages as subprocesses) and the kopf operator (stages as Jobs).
Each observes its stages (process exit code or Job conditions, plus whether the stage's manifest exists
in the store), calls :func:`plan`, and carries out the actions it returns. ``plan`` does no I/O and keeps
no state, so a restarted executor simply observes again and gets the same answer.

Rules, stage by stage in pipeline order:

* a disabled stage is ``Skipped``; a stage given an existing ``artifact`` is ``Provided``;
* a stage whose manifest exists is ``Succeeded``, whatever its process or Job did afterwards;
* a ``Running`` stage is waited for; the stages after it are ``Pending``;
* a ``Failed`` stage is started again while it has retries left and its failure was retryable
  (a configuration error never is); otherwise the pipeline is ``Failed`` and what came before is kept;
* with ``spec.suspend`` no stage starts and a running one is suspended;
* when every stage is ``Succeeded``, ``Skipped`` or ``Provided``, the pipeline is ``Succeeded``.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, replace

from rlhf_api.phases import PipelinePhase, Reason, StagePhase
from rlhf_api.spec import STAGE_ORDER, RLHFPipelineSpec, Stage


class Observed(str, enum.Enum):
    """What an executor saw of one stage."""

    ABSENT = "Absent"  # never started, or started and left no trace (no process, no Job, no manifest)
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"  # the stage's manifest exists and verifies
    FAILED = "Failed"


@dataclass(frozen=True)
class StageObservation:
    """One stage as observed: its state, how many attempts were made, and whether a failure may be retried."""

    state: Observed = Observed.ABSENT
    attempts: int = 0
    retryable: bool = True
    message: str = ""


@dataclass(frozen=True)
class StartStage:
    """Start (or restart) a stage; ``attempt`` counts from 1."""

    stage: Stage
    attempt: int


@dataclass(frozen=True)
class SuspendStage:
    """Pause a running stage (the operator suspends its Job)."""

    stage: Stage


Action = StartStage | SuspendStage


@dataclass(frozen=True)
class Plan:
    phase: PipelinePhase
    stages: Mapping[Stage, StagePhase]
    actions: tuple[Action, ...] = ()
    current: Stage | None = None  # the stage the pipeline stands at (running, next to run, or failed)
    reason: str = ""  # CamelCase, for conditions and events
    message: str = ""

    @property
    def start(self) -> StartStage | None:
        return next((a for a in self.actions if isinstance(a, StartStage)), None)


def plan(spec: RLHFPipelineSpec, observed: Mapping[Stage, StageObservation]) -> Plan:
    """Decide the pipeline's phase, each stage's phase, and the next actions.

    Args:
        spec: the validated pipeline spec.
        observed: what the executor saw of each stage; a missing stage counts as never started.

    Returns:
        A :class:`Plan`. At most one stage runs at a time, since each stage needs the one before it.
    """
    phases: dict[Stage, StagePhase] = {}
    verdict: Plan | None = None  # set by the first unfinished stage; every later stage is then Pending

    for stage in STAGE_ORDER:
        if verdict is not None:
            phases[stage] = StagePhase.PENDING if spec.stage(stage).runs else _static_phase(spec, stage)
        elif not spec.stage(stage).runs:
            phases[stage] = _static_phase(spec, stage)
        else:
            phases[stage], verdict = _decide(spec, stage, observed.get(stage, StageObservation()))

    if verdict is None:
        verdict = Plan(PipelinePhase.SUCCEEDED, {}, (), None, Reason.SUCCEEDED, "every stage is done")
    return replace(verdict, stages=phases)


def _decide(spec: RLHFPipelineSpec, stage: Stage, seen: StageObservation) -> tuple[StagePhase, Plan | None]:
    """The phase of a stage that runs, and the pipeline's outcome when the walk stops there (None: it goes on)."""
    settings = spec.stage(stage)
    if seen.state is Observed.SUCCEEDED:
        return StagePhase.SUCCEEDED, None

    if seen.state is Observed.RUNNING:
        if spec.suspend:
            return StagePhase.RUNNING, _verdict(PipelinePhase.SUSPENDED, stage, (SuspendStage(stage),),
                                                Reason.SUSPENDED, f"spec.suspend is set: stage {stage.value} is paused")
        return StagePhase.RUNNING, _verdict(PipelinePhase.RUNNING, stage, (), Reason.STAGE_RUNNING,
                                            f"stage {stage.value} is running (attempt {max(seen.attempts, 1)})")

    if seen.state is Observed.FAILED:
        retries_left = seen.attempts <= settings.max_retries
        if not seen.retryable or not retries_left:
            why = "it failed with a configuration error" if not seen.retryable else (
                f"it failed {seen.attempts} time(s) and maxRetries is {settings.max_retries}")
            detail = f": {seen.message}" if seen.message else ""
            return StagePhase.FAILED, _verdict(PipelinePhase.FAILED, stage, (), Reason.STAGE_FAILED,
                                               f"stage {stage.value} will not be retried: {why}{detail}")

    # Absent, or failed with retries left: (re)start it unless suspended.
    if spec.suspend:
        return StagePhase.PENDING, _verdict(PipelinePhase.SUSPENDED, stage, (), Reason.SUSPENDED,
                                            f"spec.suspend is set: stage {stage.value} will start when it is cleared")
    attempt = seen.attempts + 1
    verb = "retrying" if seen.state is Observed.FAILED else "starting"
    return StagePhase.PENDING, _verdict(PipelinePhase.RUNNING, stage, (StartStage(stage, attempt),),
                                        Reason.STAGE_STARTING, f"{verb} stage {stage.value} (attempt {attempt})")


def _static_phase(spec: RLHFPipelineSpec, stage: Stage) -> StagePhase:
    """Phase of a stage that never runs: Provided by an artifact, or Skipped."""
    return StagePhase.PROVIDED if spec.stage(stage).artifact is not None else StagePhase.SKIPPED


def _verdict(phase: PipelinePhase, stage: Stage, actions: tuple[Action, ...], reason: str, message: str) -> Plan:
    """The pipeline's outcome decided at ``stage``; stage phases are filled in when the walk ends."""
    return Plan(phase, {}, actions, stage, reason, message)


def stages_to_run(spec: RLHFPipelineSpec) -> list[Stage]:
    """The stages this spec executes, in order."""
    return [s for s in STAGE_ORDER if spec.stage(s).runs]
