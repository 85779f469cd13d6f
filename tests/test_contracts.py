"""The contracts between the executors (the local runner, the operator) and the trainer, each defined once in
``rlhf_api``: here one side writes through the contract and the other side reads what was written.

(The metric names of ``rlhf_api.metric_keys`` are checked where stages really run: ``test_pipeline.py`` and
``test_ppo_stage.py`` assert that each stage publishes its headline metrics.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from rlhf_api import entrypoint
from rlhf_api.artifacts import open_store
from rlhf_api.spec import Stage
from rlhf_api.stage_config import build_stage_config
from rlhf_operator import runner
from rlhf_operator.controller.access import StoragePolicy
from rlhf_operator.controller.manifests import CONTAINER, build_stage
from rlhf_operator.controller.observe import termination_error
from rlhf_operator.controller.reconcile import Reconciler
from rlhf_operator.loading import parse_pipeline
from rlhf_trainer import cli as trainer_cli
from rlhf_trainer.checkpoints import StageCheckpoints
from rlhf_trainer.errors import Preempted
from rlhf_trainer.workspace import Workspace


def pipeline(store: Path):
    return parse_pipeline({
        "apiVersion": "rlhf-operator.io/v1alpha1", "kind": "RLHFPipeline",
        "metadata": {"name": "contract", "namespace": "ml", "uid": "0b6f1f7e-2f4c-4d59-9a43-5d1d7c2a0009"},
        "spec": {"model": {"uri": "builtin://smollm2-135m-instruct"}, "storage": {"uri": store.as_uri()},
                 "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}}}})


def job_action(job: dict, exit_code: int) -> str:
    """What the Job's podFailurePolicy does with a trainer container that exits with ``exit_code``."""
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        codes = rule.get("onExitCodes")
        if codes and codes["containerName"] == CONTAINER and exit_code in codes["values"]:
            return rule["action"]
    return "Count"


def write_config(tmp_path: Path, doc, stage: Stage = Stage.SFT) -> Path:
    path = tmp_path / f"{stage.value}.json"
    path.write_text(build_stage_config(doc, stage).to_json())
    return path


def test_the_exit_codes_rlhf_train_returns_are_those_the_job_and_the_runner_act_on(tmp_path, monkeypatch):
    doc = pipeline(tmp_path / "store")
    job = build_stage(doc, Stage.SFT).job

    config_error = trainer_cli.main(["reward", "--config", str(write_config(tmp_path, doc))])  # another stage's
    assert job_action(job, config_error) == "FailJob"
    assert config_error in entrypoint.NON_RETRYABLE_EXIT_CODES  # the local runner's test of a retry

    def preempted(config, workspace):
        raise Preempted("stopped on SIGTERM after checkpointing")

    monkeypatch.setattr(trainer_cli, "run_stage", preempted)
    stopped = trainer_cli.main(["sft", "--config", str(write_config(tmp_path, doc)), "--workspace",
                                str(tmp_path / "ws")])
    assert job_action(job, stopped) == "Ignore"  # a checkpointed stop is not a failure
    assert job_action(job, 1) == "Count"


def test_the_error_rlhf_train_reports_is_the_one_the_operator_shows(tmp_path, monkeypatch):
    log = tmp_path / "termination-log"
    monkeypatch.setenv(entrypoint.TERMINATION_LOG_ENV, str(log))
    (tmp_path / "broken.json").write_text("{}")
    assert trainer_cli.main(["sft", "--config", str(tmp_path / "broken.json")]) == entrypoint.EXIT_CONFIG_ERROR
    pod = {"metadata": {"name": "p", "creationTimestamp": "2026-12-07T10:00:00Z"},
           "status": {"phase": "Failed", "containerStatuses": [
               {"name": CONTAINER, "state": {"terminated": {"exitCode": 78, "message": log.read_text()}}}]}}
    assert termination_error([pod]).startswith("invalid stage config")


def test_the_runner_and_the_job_give_the_trainer_the_same_environment(tmp_path):
    doc = pipeline(tmp_path / "store")
    job = build_stage(doc, Stage.SFT).job
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    local = runner.trainer_env()
    for name, value in entrypoint.TRAINER_ENV.items():
        assert env[name] == value and local[name] == value
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert env[entrypoint.WORKSPACE_ENV] == mounts["workspace"]  # the trainer works in the pod's emptyDir
    assert container["command"][0] == entrypoint.COMMAND
    assert runner.trainer_command(Stage.SFT, Path("c.json"), Path("w"))[-5:] == \
        entrypoint.trainer_args(Stage.SFT, "c.json", workspace="w")


@pytest.mark.parametrize("digest_matches", [True, False])
def test_the_checkpoint_the_trainer_points_to_is_the_progress_the_operator_shows(tmp_path, digest_matches):
    doc = pipeline(tmp_path / "store")
    objects = build_stage(doc, Stage.SFT)
    config = objects.config if digest_matches else objects.config.model_copy(update={"digest": "other"})
    checkpoints = StageCheckpoints(Workspace(config, tmp_path / "ws"))
    for step in (2, 4):
        (tmp_path / f"ckpt-{step}").mkdir()
        (tmp_path / f"ckpt-{step}" / "state.json").write_text("{}")
        checkpoints.publish(tmp_path / f"ckpt-{step}", step)
        checkpoints.point_to(step)

    reconciler = Reconciler(kube=None, policy=StoragePolicy(allow_file_roots=True))  # file://: no Secret
    progress = reconciler._progress(doc, objects)
    assert progress == ({"step": 4} if digest_matches else {})
    store = open_store(config.output_uri)
    assert [o.uri.rsplit("/checkpoints/", 1)[1] for o in store.list(config.output_uri + "/checkpoints/")
            if o.uri.endswith("state.json")] == ["checkpoint-4/state.json"]  # one resume point is kept
