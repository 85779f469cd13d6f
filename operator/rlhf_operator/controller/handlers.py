"""The kopf handlers: every trigger runs the same level-based reconcile of one pipeline.

* a pipeline is created, changed (spec, labels, annotations) or found at operator start: reconcile it;
* one of its Jobs changes (a pod started, failed, the Job finished): reconcile the owner, found by label;
* a timer re-reconciles unfinished pipelines, to refresh live progress and to heal anything missed;
* a pipeline with ``storage.keepArtifactsOnDelete: false`` gets a finalizer, and its artifacts are deleted
  when it is (its Jobs, Services and ConfigMaps go through owner references, in every case).

Handlers are synchronous (the reconciler uses the Kubernetes client), so kopf runs them in its thread pool;
the reconciler serialises work per pipeline.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from rlhf_api.spec import GROUP, PLURAL, VERSION
from rlhf_operator.controller import names
from rlhf_operator.controller.reconcile import Reconciler, RetryLater
from rlhf_operator.plan import PipelinePhase

RETRY_DELAY_S = 5.0
FINALIZER = f"{GROUP}/artifacts"
TERMINAL = (PipelinePhase.SUCCEEDED.value, PipelinePhase.FAILED.value)
PIPELINES = (GROUP, VERSION, PLURAL)
MANAGED_JOBS = {names.LABEL_MANAGED_BY: names.MANAGED_BY}


def _deletes_artifacts(spec: dict[str, Any], **_: Any) -> bool:
    return (spec.get("storage") or {}).get("keepArtifactsOnDelete") is False


def _unfinished(status: dict[str, Any], **_: Any) -> bool:
    return (status or {}).get("phase") not in TERMINAL


def _reconcile(memo: kopf.Memo, namespace: str, name: str) -> None:
    reconciler: Reconciler = memo.reconciler
    try:
        reconciler.reconcile(namespace, name)
    except RetryLater as exc:
        raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY_S) from exc


def register(registry: kopf.OperatorRegistry, *, resync_interval_s: float = 30.0) -> kopf.OperatorRegistry:
    """Register the handlers in ``registry`` (the timer's interval is a command-line option)."""

    @kopf.on.startup(registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's own bookkeeping goes into annotations under our group, never into spec or status.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration")
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.WARNING  # our own Events say what happened; kopf's only on trouble
        settings.posting.reporting_component = "rlhf-operator"
        # Only our Jobs travel from the API server: the label is filtered server-side.
        settings.watching.label_selectors["batch", "jobs"] = names.label_selector(MANAGED_JOBS)
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.batching.error_delays = (1, 2, 5, 10, 30, 60)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # A registry of our own has none of kopf's default login handlers. Log in as the Kubernetes client does:
        # in a pod, the ServiceAccount token and KUBERNETES_SERVICE_HOST/PORT; elsewhere the kubeconfig.
        return kopf.login_via_client(**kwargs)

    @kopf.on.resume(*PIPELINES, registry=registry)
    @kopf.on.create(*PIPELINES, registry=registry)
    @kopf.on.update(*PIPELINES, registry=registry)
    def pipeline_changed(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
        _reconcile(memo, namespace, name)

    @kopf.on.event("batch", "v1", "jobs", labels=MANAGED_JOBS, registry=registry)
    def job_changed(memo: kopf.Memo, namespace: str, labels: dict[str, str], type: str | None,
                    logger: logging.Logger, **_: Any) -> None:
        pipeline = labels.get(names.LABEL_PIPELINE)
        if not pipeline:
            return
        try:
            memo.reconciler.reconcile(namespace, pipeline)
        except RetryLater as exc:  # events are not retried: the timer or the next event will
            logger.warning("reconcile after a Job %s event failed: %s", type or "listing", exc)

    @kopf.timer(*PIPELINES, interval=resync_interval_s, initial_delay=resync_interval_s, when=_unfinished,
                registry=registry)
    def resync(memo: kopf.Memo, namespace: str, name: str, **_: Any) -> None:
        _reconcile(memo, namespace, name)

    @kopf.on.delete(*PIPELINES, when=_deletes_artifacts, registry=registry)
    def delete_artifacts(memo: kopf.Memo, body: kopf.Body, logger: logging.Logger, **_: Any) -> None:
        try:
            deleted = memo.reconciler.delete_artifacts(dict(body))
        except RetryLater as exc:
            raise kopf.TemporaryError(str(exc), delay=2) from exc
        logger.info("deleted %d stored object(s) of the pipeline (keepArtifactsOnDelete: false)", deleted)

    return registry
