"""The operator's Prometheus metrics, kept and exposed by ``prometheus_client``.

* ``rlhf_operator_pipelines{phase}``: pipelines this operator reconciled, by phase (gauge);
* ``rlhf_operator_stage_duration_seconds{stage,outcome}``: stage durations from Job start to finish (histogram);
* ``rlhf_operator_reconcile_total`` / ``rlhf_operator_reconcile_errors_total{error}``: reconciles, failed ones;
* ``rlhf_operator_reconcile_duration_seconds``: time per reconcile (histogram);
* ``rlhf_operator_jobs_created_total{stage}``: stage Jobs created (a restarted operator adopts: no increase).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rlhf_api.phases import PipelinePhase

STAGE_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 48 * 3600.0)
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# No `<name>_created` series beside each counter and histogram: nothing reads them, and they would double the
# exposition's series. A process-wide switch of prometheus_client; the operator is its only user here.
disable_created_metrics()


class PhaseCollector(Collector):
    """``rlhf_operator_pipelines{phase}``, counted when scraped from each pipeline's last phase, so a deleted
    pipeline or one that moved on leaves no stale count; every phase is present, at 0 too."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # handlers write from kopf's thread pool while the event loop scrapes
        self._phases: dict[tuple[str, str], str] = {}  # (namespace, name) -> phase

    def set(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self._phases.pop((namespace, name), None)
            else:
                self._phases[(namespace, name)] = phase

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            by_phase = {phase.value: 0 for phase in PipelinePhase}
            for phase in self._phases.values():
                by_phase[phase] = by_phase.get(phase, 0) + 1
        family = GaugeMetricFamily("rlhf_operator_pipelines", "Pipelines reconciled by this operator, by phase.",
                                   labels=["phase"])
        for phase, count in sorted(by_phase.items()):
            family.add_metric([phase], count)
        yield family


class Metrics:
    """One registry per instance, so that several (tests) never share series. Thread-safe: handlers run in
    kopf's thread pool, and prometheus_client's metrics lock themselves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.phases = PhaseCollector()
        self.registry.register(self.phases)
        self.reconciles = Counter("rlhf_operator_reconcile_total", "Reconciles run.", registry=self.registry)
        self.errors = Counter("rlhf_operator_reconcile_errors_total", "Reconciles that failed, by error.",
                              ["error"], registry=self.registry)
        self.jobs_created = Counter("rlhf_operator_jobs_created_total", "Stage Jobs created.", ["stage"],
                                    registry=self.registry)
        self.stage_durations = Histogram("rlhf_operator_stage_duration_seconds",
                                         "Stage durations, Job start to finish.", ["stage", "outcome"],
                                         buckets=STAGE_BUCKETS, registry=self.registry)
        self.reconcile_durations = Histogram("rlhf_operator_reconcile_duration_seconds", "Time per reconcile.",
                                             buckets=RECONCILE_BUCKETS, registry=self.registry)

    def pipeline_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a pipeline's phase; None forgets the pipeline (it was deleted)."""
        self.phases.set(namespace, name, phase)

    def reconciled(self, seconds: float, error: str | None = None) -> None:
        self.reconciles.inc()
        if error:
            self.errors.labels(error=error).inc()
        self.reconcile_durations.observe(seconds)

    def job_created(self, stage: str) -> None:
        self.jobs_created.labels(stage=stage).inc()

    def stage_finished(self, stage: str, outcome: str, seconds: float) -> None:
        self.stage_durations.labels(stage=stage, outcome=outcome).observe(seconds)

    def render(self) -> str:
        """The exposition in the Prometheus text format (serve it as ``prometheus_client.CONTENT_TYPE_LATEST``)."""
        return generate_latest(self.registry).decode("utf-8")
