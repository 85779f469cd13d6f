"""The operator's /metrics exposition, read back with prometheus_client's own parser (no cluster)."""

from __future__ import annotations

import asyncio

from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from rlhf_api.phases import PipelinePhase
from rlhf_operator.controller.main import serve_http
from rlhf_operator.controller.metrics import RECONCILE_BUCKETS, STAGE_BUCKETS, Metrics


def families(metrics: Metrics) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(metrics.render())}


def samples(family, name: str) -> dict[tuple, float]:
    """A family's samples called ``name``, keyed by their sorted labels."""
    return {tuple(sorted(s.labels.items())): s.value for s in family.samples if s.name == name}


def exercised() -> Metrics:
    metrics = Metrics()
    metrics.pipeline_phase("ml", "a", PipelinePhase.SUCCEEDED.value)
    metrics.pipeline_phase("ml", "b", PipelinePhase.RUNNING.value)
    metrics.pipeline_phase("ml", "c", PipelinePhase.RUNNING.value)
    metrics.pipeline_phase("ml", "c", None)  # deleted: no longer counted
    metrics.reconciled(0.02)
    metrics.reconciled(0.3, error="ApiException")
    metrics.reconciled(20.0)
    metrics.job_created("sft")
    metrics.job_created("sft")
    metrics.job_created("ppo")
    metrics.stage_finished("sft", "succeeded", 10.0)
    metrics.stage_finished("ppo", "failed", 4000.0)
    return metrics


def test_every_family_is_exposed_with_its_type_even_before_anything_happened():
    found = {name: family.type for name, family in families(Metrics()).items()}
    # The parser names counters without their _total suffix (OpenMetrics' convention).
    assert found == {
        "rlhf_operator_pipelines": "gauge",
        "rlhf_operator_reconcile": "counter",
        "rlhf_operator_reconcile_errors": "counter",
        "rlhf_operator_jobs_created": "counter",
        "rlhf_operator_stage_duration_seconds": "histogram",
        "rlhf_operator_reconcile_duration_seconds": "histogram",
    }
    phases = samples(families(Metrics())["rlhf_operator_pipelines"], "rlhf_operator_pipelines")
    assert phases == {(("phase", phase.value),): 0.0 for phase in PipelinePhase}


def test_phase_gauge_counters_and_histograms_after_a_few_calls():
    found = families(exercised())
    phases = samples(found["rlhf_operator_pipelines"], "rlhf_operator_pipelines")
    assert phases[(("phase", "Succeeded"),)] == 1.0 and phases[(("phase", "Running"),)] == 1.0
    assert phases[(("phase", "Failed"),)] == 0.0

    assert samples(found["rlhf_operator_reconcile"], "rlhf_operator_reconcile_total") == {(): 3.0}
    assert samples(found["rlhf_operator_reconcile_errors"], "rlhf_operator_reconcile_errors_total") == {
        (("error", "ApiException"),): 1.0}
    assert samples(found["rlhf_operator_jobs_created"], "rlhf_operator_jobs_created_total") == {
        (("stage", "ppo"),): 1.0, (("stage", "sft"),): 2.0}

    stages = found["rlhf_operator_stage_duration_seconds"]
    assert samples(stages, "rlhf_operator_stage_duration_seconds_count") == {
        (("outcome", "failed"), ("stage", "ppo")): 1.0, (("outcome", "succeeded"), ("stage", "sft")): 1.0}
    ppo_buckets = {labels[0][1]: value for labels, value in
                   samples(stages, "rlhf_operator_stage_duration_seconds_bucket").items()
                   if ("stage", "ppo") in labels}
    assert [float(le) for le in ppo_buckets] == [*STAGE_BUCKETS, float("inf")]
    assert ppo_buckets["3600.0"] == 0.0 and ppo_buckets["14400.0"] == 1.0

    reconciles = found["rlhf_operator_reconcile_duration_seconds"]
    assert samples(reconciles, "rlhf_operator_reconcile_duration_seconds_count") == {(): 3.0}
    assert samples(reconciles, "rlhf_operator_reconcile_duration_seconds_sum") == {(): 20.32}
    buckets = samples(reconciles, "rlhf_operator_reconcile_duration_seconds_bucket")
    assert len(buckets) == len(RECONCILE_BUCKETS) + 1
    assert buckets[(("le", "0.5"),)] == 2.0 and buckets[(("le", "+Inf"),)] == 3.0


def test_instances_keep_separate_registries():
    exercised()
    assert samples(families(Metrics())["rlhf_operator_reconcile"], "rlhf_operator_reconcile_total") == {(): 0.0}


def test_the_http_endpoint_serves_the_exposition_with_prometheus_content_type():
    from aiohttp import ClientSession

    metrics = exercised()

    async def scrape() -> tuple[str, str]:
        runner = await serve_http("127.0.0.1", 0, metrics, asyncio.Event(), None)
        try:
            port = runner.addresses[0][1]
            async with ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as answer:
                return answer.headers["Content-Type"], await answer.text()
        finally:
            await runner.cleanup()

    content_type, text = asyncio.run(scrape())
    assert content_type == CONTENT_TYPE_LATEST
    # what the end-to-end test looks for in the operator pod's exposition
    assert 'rlhf_operator_pipelines{phase="Succeeded"} 1.0' in text
