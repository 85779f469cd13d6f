"""The state machine, table-driven: one row per situation, the expected phases and the one action."""

from __future__ import annotations

import pytest

from rlhf_api.phases import PipelinePhase, StagePhase
from rlhf_api.spec import RLHFPipelineSpec, Stage
from rlhf_operator.plan import (
    Observed,
    StageObservation,
    StartStage,
    SuspendStage,
    plan,
    stages_to_run,
)

S, P, R, O, E = Stage.SFT, Stage.PREFERENCES, Stage.REWARD, Stage.PPO, Stage.EVALUATE
DATA = {"uri": "builtin://movie-reviews/sft"}
PROMPTS = {"uri": "builtin://movie-reviews/prompts-train"}


def make_spec(**overrides) -> RLHFPipelineSpec:
    """All five stages enabled unless overridden."""
    spec = {
        "model": {"uri": "builtin://smollm2-135m-instruct"},
        "sft": {"dataset": DATA},
        "preferences": {"prompts": PROMPTS},
        "reward": {},
        "ppo": {"prompts": PROMPTS},
        "evaluate": {"prompts": PROMPTS},
    }
    for key, value in overrides.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    return RLHFPipelineSpec.model_validate(spec)


def seen(state: Observed, attempts: int = 0, retryable: bool = True) -> StageObservation:
    return StageObservation(state, attempts, retryable, "boom" if state is Observed.FAILED else "")


DONE = seen(Observed.SUCCEEDED, 1)
RUNNING = seen(Observed.RUNNING, 1)

CASES = [
    # id, spec overrides, observations, expected pipeline phase, expected action, expected stage phases
    ("fresh pipeline starts sft", {}, {}, PipelinePhase.RUNNING, StartStage(S, 1),
     {S: "Pending", P: "Pending", R: "Pending", O: "Pending", E: "Pending"}),
    ("completed stages are skipped", {}, {S: DONE, P: DONE}, PipelinePhase.RUNNING, StartStage(R, 1),
     {S: "Succeeded", P: "Succeeded", R: "Pending", O: "Pending"}),
    ("running stage is waited for", {}, {S: DONE, P: RUNNING}, PipelinePhase.RUNNING, None,
     {S: "Succeeded", P: "Running", R: "Pending"}),
    ("retryable failure is retried", {}, {S: seen(Observed.FAILED, 1)}, PipelinePhase.RUNNING, StartStage(S, 2),
     {S: "Pending"}),
    ("last retry is allowed", {}, {S: seen(Observed.FAILED, 2)}, PipelinePhase.RUNNING, StartStage(S, 3), {}),
    ("retries exhausted fails the pipeline", {}, {S: DONE, P: seen(Observed.FAILED, 3)},
     PipelinePhase.FAILED, None, {S: "Succeeded", P: "Failed", R: "Pending", E: "Pending"}),
    ("maxRetries 0 fails at once", {"sft": {"maxRetries": 0}}, {S: seen(Observed.FAILED, 1)},
     PipelinePhase.FAILED, None, {S: "Failed"}),
    ("configuration error is never retried", {}, {S: seen(Observed.FAILED, 1, retryable=False)},
     PipelinePhase.FAILED, None, {S: "Failed", P: "Pending"}),
    ("disabled stages are skipped", {"preferences": {"enabled": False}, "reward": {"dataset": PROMPTS}},
     {S: DONE}, PipelinePhase.RUNNING, StartStage(R, 1), {P: "Skipped", R: "Pending"}),
    ("a stage given an artifact is provided", {"sft": {"artifact": "s3://b/my-sft"}}, {},
     PipelinePhase.RUNNING, StartStage(P, 1), {S: "Provided", P: "Pending"}),
    ("all done succeeds", {}, {s: DONE for s in Stage}, PipelinePhase.SUCCEEDED, None,
     {s: "Succeeded" for s in Stage}),
    ("done with disabled tail succeeds", {"ppo": {"enabled": False}}, {S: DONE, P: DONE, R: DONE, E: DONE},
     PipelinePhase.SUCCEEDED, None, {O: "Skipped", E: "Succeeded"}),
    ("suspend stops before the next stage", {"suspend": True}, {S: DONE}, PipelinePhase.SUSPENDED, None,
     {S: "Succeeded", P: "Pending"}),
    ("suspend pauses a running stage", {"suspend": True}, {S: RUNNING}, PipelinePhase.SUSPENDED,
     SuspendStage(S), {S: "Running"}),
    ("later stages wait for a running ppo", {}, {S: DONE, P: DONE, R: DONE, O: RUNNING},
     PipelinePhase.RUNNING, None, {O: "Running", E: "Pending"}),
    ("only ppo: sft and reward provided",
     {"sft": {"artifact": "s3://b/sft"}, "preferences": {"enabled": False}, "reward": {"artifact": "s3://b/rm"},
      "evaluate": {"enabled": False}}, {}, PipelinePhase.RUNNING, StartStage(O, 1),
     {S: "Provided", P: "Skipped", R: "Provided", O: "Pending", E: "Skipped"}),
]


@pytest.mark.parametrize("overrides, observed, phase, action, stage_phases",
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_plan(overrides, observed, phase, action, stage_phases):
    result = plan(make_spec(**overrides), observed)
    assert result.phase is phase, result.message
    assert result.actions == ((action,) if action else ())
    for stage, expected in stage_phases.items():
        assert result.stages[stage].value == expected, (stage, result.stages)
    assert set(result.stages) == set(Stage)


def test_failure_message_names_stage_and_cause():
    result = plan(make_spec(), {S: seen(Observed.FAILED, 1, retryable=False)})
    assert result.reason == "StageFailed"
    assert "sft" in result.message and "configuration error" in result.message and "boom" in result.message
    assert result.current is S


def test_at_most_one_stage_starts_whatever_is_observed():
    import itertools

    states = [None, DONE, RUNNING, seen(Observed.FAILED, 1), seen(Observed.FAILED, 5)]
    spec = make_spec()
    for combo in itertools.product(states, repeat=len(Stage)):
        observed = {s: o for s, o in zip(Stage, combo) if o is not None}
        result = plan(spec, observed)
        starts = [a for a in result.actions if isinstance(a, StartStage)]
        assert len(starts) <= 1
        if starts:  # a stage starts only when every earlier stage is done
            earlier = list(Stage)[: list(Stage).index(starts[0].stage)]
            assert all(observed.get(s) is DONE for s in earlier)
        running = [s for s, p in result.stages.items() if p is StagePhase.RUNNING]
        assert len(running) <= 1


def test_plan_is_pure():
    spec, observed = make_spec(), {S: DONE}
    assert plan(spec, observed) == plan(spec, observed)
    assert observed == {S: DONE}


def test_stages_to_run_follows_the_spec():
    assert stages_to_run(make_spec(ppo={"enabled": False})) == [S, P, R, E]
