"""The operator's Prometheus metrics, in the text exposition format (a few dozen lines instead of a dependency).

* ``rlhf_operator_pipelines{phase}``: pipelines this operator reconciled, by phase (gauge);
* ``rlhf_operator_stage_duration_seconds{stage,outcome}``: stage durations from Job start to finish (histogram);
* ``rlhf_operator_reconcile_total`` / ``rlhf_operator_reconcile_errors_total{error}``: reconciles, failed ones;
* ``rlhf_operator_reconcile_duration_seconds``: time per reconcile (histogram);
* ``rlhf_operator_jobs_created_total{stage}``: stage Jobs created (a restarted operator adopts: no increase).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict

STAGE_BUCKETS = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 4 * 3600.0, 12 * 3600.0, 48 * 3600.0)
RECONCILE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    if not pairs:
        return ""
    inner = ",".join(f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
                     for k, v in pairs)
    return "{" + inner + "}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts: dict[tuple, list[int]] = defaultdict(lambda: [0] * (len(buckets) + 1))
        self.sums: dict[tuple, float] = defaultdict(float)

    def observe(self, labels: tuple[tuple[str, str], ...], value: float) -> None:
        self.counts[labels][bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def render(self, name: str) -> list[str]:
        lines = []
        for labels, counts in sorted(self.counts.items()):
            running = 0
            for bound, count in zip((*self.buckets, float("inf")), counts):
                running += count
                le = "+Inf" if bound == float("inf") else repr(bound)
                lines.append(f"{name}_bucket{_labels((*labels, ('le', le)))} {running}")
            lines.append(f"{name}_sum{_labels(labels)} {self.sums[labels]}")
            lines.append(f"{name}_count{_labels(labels)} {running}")
        return lines


class Metrics:
    """Thread-safe: handlers run in kopf's thread pool."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phases: dict[tuple[str, str], str] = {}  # (namespace, name) -> phase
        self.reconciles = 0
        self.errors: dict[str, int] = defaultdict(int)
        self.jobs_created: dict[str, int] = defaultdict(int)
        self.stage_durations = Histogram(STAGE_BUCKETS)
        self.reconcile_durations = Histogram(RECONCILE_BUCKETS)

    def pipeline_phase(self, namespace: str, name: str, phase: str | None) -> None:
        with self._lock:
            if phase is None:
                self.phases.pop((namespace, name), None)
            else:
                self.phases[(namespace, name)] = phase

    def reconciled(self, seconds: float, error: str | None = None) -> None:
        with self._lock:
            self.reconciles += 1
            if error:
                self.errors[error] += 1
            self.reconcile_durations.observe((), seconds)

    def job_created(self, stage: str) -> None:
        with self._lock:
            self.jobs_created[stage] += 1

    def stage_finished(self, stage: str, outcome: str, seconds: float) -> None:
        with self._lock:
            self.stage_durations.observe((("stage", stage), ("outcome", outcome)), seconds)

    def render(self) -> str:
        from rlhf_api.phases import PipelinePhase

        with self._lock:
            by_phase = {phase.value: 0 for phase in PipelinePhase}
            for phase in self.phases.values():
                by_phase[phase] = by_phase.get(phase, 0) + 1
            lines = ["# HELP rlhf_operator_pipelines Pipelines reconciled by this operator, by phase.",
                     "# TYPE rlhf_operator_pipelines gauge"]
            lines += [f'rlhf_operator_pipelines{{phase="{p}"}} {n}' for p, n in sorted(by_phase.items())]
            lines += ["# HELP rlhf_operator_reconcile_total Reconciles run.",
                      "# TYPE rlhf_operator_reconcile_total counter",
                      f"rlhf_operator_reconcile_total {self.reconciles}",
                      "# HELP rlhf_operator_reconcile_errors_total Reconciles that failed, by error.",
                      "# TYPE rlhf_operator_reconcile_errors_total counter"]
            lines += [f"rlhf_operator_reconcile_errors_total{_labels((('error', e),))} {n}"
                      for e, n in sorted(self.errors.items())]
            lines += ["# HELP rlhf_operator_jobs_created_total Stage Jobs created.",
                      "# TYPE rlhf_operator_jobs_created_total counter"]
            lines += [f"rlhf_operator_jobs_created_total{_labels((('stage', s),))} {n}"
                      for s, n in sorted(self.jobs_created.items())]
            lines += ["# HELP rlhf_operator_stage_duration_seconds Stage durations, Job start to finish.",
                      "# TYPE rlhf_operator_stage_duration_seconds histogram"]
            lines += self.stage_durations.render("rlhf_operator_stage_duration_seconds")
            lines += ["# HELP rlhf_operator_reconcile_duration_seconds Time per reconcile.",
                      "# TYPE rlhf_operator_reconcile_duration_seconds histogram"]
            lines += self.reconcile_durations.render("rlhf_operator_reconcile_duration_seconds")
        return "\n".join(lines) + "\n"
