"""The local runner: the pipeline on this machine, each stage a ``rlhf-train`` subprocess (one per process of a
stage whose ``distributed`` asks for several, with the variables torchrun would set).

It drives the same :func:`rlhf_operator.plan.plan` as the operator: observe (is the stage's manifest in the
store, with this config's digest? did its process fail, and how?), plan, carry out the one action, repeat.
A rerun therefore skips every finished stage, and a killed run resumes at the stage it was in.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rlhf_api import entrypoint, metric_keys
from rlhf_api.artifacts import is_complete, open_store, read_manifest
from rlhf_api.phases import PipelinePhase, StagePhase
from rlhf_api.spec import STAGE_ORDER, RLHFPipeline, Stage
from rlhf_api.stage_config import StageConfig, build_stage_config, storage_options
from rlhf_operator.malloc import with_tcmalloc
from rlhf_operator.plan import Observed, StageObservation, plan, stages_to_run


@dataclass
class StageReport:
    stage: Stage
    phase: StagePhase
    note: str = ""
    seconds: float | None = None
    attempts: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    phase: PipelinePhase
    message: str
    reports: dict[Stage, StageReport]
    artifacts_root: str
    seconds: float


def trainer_command(stage: Stage, config_path: Path, workspace: Path) -> list[str]:
    """The same entrypoint a Job runs: ``rlhf-train STAGE --config FILE`` (from this interpreter's env)."""
    exe = Path(sys.executable).parent / entrypoint.COMMAND
    head = [str(exe)] if exe.exists() else [sys.executable, "-m", entrypoint.MODULE]
    return [*head, *entrypoint.trainer_args(stage, str(config_path), workspace=str(workspace))]


def trainer_env() -> dict[str, str]:
    """This process's environment with the trainer's (:data:`rlhf_api.entrypoint.TRAINER_ENV`) and tcmalloc."""
    return with_tcmalloc({**os.environ, **entrypoint.TRAINER_ENV})


def rank_environments(env: dict[str, str], processes: int) -> list[dict[str, str]]:
    """One environment per process of a stage that runs ``processes`` processes (``nodes x procsPerNode``), all on
    this machine: the variables torchrun would set, with the rendezvous on a free loopback port."""
    if processes == 1:
        return [env]
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    return [{**env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(processes),
             "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(processes)}
            for rank in range(processes)]


def run_processes(cmd: list[str], environments: list[dict[str, str]], grace_s: float = 120.0) -> int:
    """Run one process per environment and return the stage's exit code: 0 when every one exits 0, else the first
    failure's. When one fails the others are stopped (SIGTERM: they checkpoint; SIGKILL after ``grace_s``), since
    they would wait for it in their next collective until the process group's timeout."""
    procs = [subprocess.Popen(cmd, env=env) for env in environments]
    try:
        while True:
            codes = [proc.poll() for proc in procs]
            failed = next((code for code in codes if code not in (None, 0)), None)
            if failed is not None or all(code == 0 for code in codes):
                break
            time.sleep(0.2)
    except KeyboardInterrupt:
        _stop(procs, grace_s)
        raise
    _stop(procs, grace_s)
    return failed or 0


def _stop(procs: list[subprocess.Popen], grace_s: float) -> None:
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in running:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalRunner:
    def __init__(self, doc: RLHFPipeline, workdir: Path, console: Console | None = None) -> None:
        self.doc = doc
        self.workdir = workdir.resolve()
        self.console = console or Console(stderr=True)
        self.root = doc.spec.storage.uri or (self.workdir / "artifacts").as_uri()
        self.store = open_store(self.root, storage_options(doc.spec.storage))
        self.configs: dict[Stage, StageConfig] = {
            s: build_stage_config(doc, s, self.root) for s in stages_to_run(doc.spec)
        }
        self.failures: dict[Stage, StageObservation] = {}

    def complete(self, stage: Stage) -> bool:
        config = self.configs[stage]
        return is_complete(config.output_uri, self.store, config.digest)

    def observe(self) -> dict[Stage, StageObservation]:
        observed = {}
        for stage in self.configs:
            if self.complete(stage):
                observed[stage] = StageObservation(Observed.SUCCEEDED)
            elif stage in self.failures:
                observed[stage] = self.failures[stage]
        return observed

    def run(self) -> RunResult:
        started = time.monotonic()
        reports = {s: StageReport(s, StagePhase.PENDING) for s in STAGE_ORDER}
        for stage in self.configs:
            if self.complete(stage):
                reports[stage].note = "skipped: its manifest is in the store"
                self.console.print(f"[bold]{stage.value}[/]: already done (manifest found), skipping")

        while True:
            decision = plan(self.doc.spec, self.observe())
            for stage, phase in decision.stages.items():
                reports[stage].phase = phase
            if decision.start is None:
                break
            self._run_stage(decision.start.stage, decision.start.attempt, reports[decision.start.stage])

        for stage, report in reports.items():
            if stage in self.configs:
                manifest = read_manifest(self.configs[stage].output_uri, self.store)
                report.metrics = dict(manifest.metrics) if manifest else {}
            elif report.phase is StagePhase.PROVIDED:
                report.note = f"provided: {self.doc.spec.stage(stage).artifact}"
        return RunResult(decision.phase, decision.message, reports, self.root, time.monotonic() - started)

    def _run_stage(self, stage: Stage, attempt: int, report: StageReport) -> None:
        config = self.configs[stage]
        config_path = self.workdir / "configs" / f"{stage.value}.json"
        config_path.parent.mkdir(parents=True, exist_ok=True)
        config_path.write_text(config.to_json())
        workspace = self.workdir / "work" / stage.value
        position = list(self.configs).index(stage) + 1
        self.console.rule(f"[{position}/{len(self.configs)}] [bold]{stage.value}[/] (attempt {attempt})")
        cmd = trainer_command(stage, config_path, workspace)
        t0 = time.monotonic()
        distributed = self.doc.spec.stage(stage).distributed
        code = run_processes(cmd, rank_environments(trainer_env(), distributed.nodes * distributed.procs_per_node))
        report.seconds = (report.seconds or 0.0) + time.monotonic() - t0
        report.attempts = attempt
        if code == 0 and self.complete(stage):
            self.failures.pop(stage, None)
            report.note = f"on attempt {attempt}" if attempt > 1 else ""  # not an earlier attempt's failure
            shutil.rmtree(workspace, ignore_errors=True)
            self.console.print(f"[green]{stage.value} done[/] in {time.monotonic() - t0:.0f}s")
            return
        message = f"exit code {code}" if code else "exited 0 but published no manifest"
        retryable = code not in entrypoint.NON_RETRYABLE_EXIT_CODES
        self.failures[stage] = StageObservation(Observed.FAILED, attempt, retryable, message)
        report.note = message
        self.console.print(f"[red]{stage.value} failed[/] ({message}{'' if retryable else ', not retryable'})")


def summary_table(result: RunResult) -> Table:
    table = Table(title=f"pipeline {result.phase.value.lower()} in {result.seconds:.0f}s")
    table.add_column("stage")
    table.add_column("result")
    table.add_column("time", justify="right")
    table.add_column("headline metrics")
    for stage, report in result.reports.items():
        shown = []
        for key, label in metric_keys.HEADLINES[stage]:
            value = report.metrics.get(key)
            if value is not None:
                shown.append(f"{label} {value:.3f}" if isinstance(value, float) else f"{label} {value}")
        time_text = f"{report.seconds:.0f}s" if report.seconds is not None else "-"
        result_text = report.phase.value + (f" ({report.note})" if report.note else "")
        table.add_row(stage.value, result_text, time_text, ", ".join(shown))
    return table
