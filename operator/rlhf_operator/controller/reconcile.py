"""One pipeline, level-based: observe its Jobs (and the store), ask :func:`rlhf_operator.plan.plan` what comes
next, do it, and write the status and Events. The same loop as the local runner (``runner.py``), with Jobs for
subprocesses.

Nothing is remembered between reconciles except what the API server holds: the Jobs (found by label and owner
uid, named deterministically, see ``names``) and the pipeline's own status, which caches what a finished
stage's manifest said so that a finished pipeline costs no store requests. Any trigger (the pipeline changed,
one of its Jobs changed, a periodic timer, an operator restart) runs the same function, so missed or reordered
events do no harm.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import replace
from typing import Any

from kubernetes.client.rest import ApiException

from rlhf_api.artifacts import (
    NotFoundError,
    Store,
    StoreError,
    is_complete,
    manifest_uri,
    open_store,
    read_manifest,
    read_progress,
)
from rlhf_api.artifacts.checkpoints import read_pointer
from rlhf_api.phases import PipelinePhase, Reason, StagePhase, parse_time, rfc3339
from rlhf_api.spec import STAGE_ORDER, RLHFPipeline, Stage
from rlhf_api.stage_config import pipeline_prefix, pipeline_ref, storage_options
from rlhf_api.status import Condition, ConditionType, PipelineStatus
from rlhf_operator.controller import names
from rlhf_operator.controller.access import StoragePolicy, StoreRefused
from rlhf_operator.controller.conditions import EventSpec, StageFacts, build_status, transitions
from rlhf_operator.controller.kube import Kube
from rlhf_operator.controller.manifests import PodLimits, StageObjects, build_stage
from rlhf_operator.controller.metrics import Metrics
from rlhf_operator.controller.observe import JobPhase, JobState, job_state, observation
from rlhf_operator.loading import SpecError, parse_pipeline
from rlhf_operator.plan import (
    Observed,
    Plan,
    StageObservation,
    StartStage,
    SuspendStage,
    plan,
    stages_to_run,
)

log = logging.getLogger("rlhf_operator.controller")
STORE_CACHE_SIZE = 16


class RetryLater(Exception):
    """The reconcile could not finish (API or store unavailable); it runs again later."""


class AdoptionRefused(Exception):
    """An object of a stage's name exists but is not this pipeline's: it is neither used nor touched."""


def check_adoptable(doc: RLHFPipeline, wanted: dict[str, Any], existing: dict[str, Any]) -> None:
    """Raise ``AdoptionRefused`` unless ``existing`` (found where ``wanted`` was to be created) is the pipeline's own:
    an ownerReference to its uid, and for a ConfigMap the same immutable content (anyone who may create ConfigMaps
    in the namespace can write an ownerReference; nobody can change an immutable ConfigMap's data)."""
    meta = existing.get("metadata") or {}
    kind, where = wanted["kind"], f"{meta.get('namespace')}/{meta.get('name')}"
    owned = any(ref.get("uid") == doc.metadata.uid for ref in meta.get("ownerReferences") or [])
    same = kind != "ConfigMap" or (existing.get("immutable") is True and existing.get("data") == wanted["data"])
    if not (owned and same):
        why = "is not owned by this pipeline" if not owned else "holds another stage config"
        raise AdoptionRefused(
            f"{kind} {where} already exists and {why}: the operator neither uses nor changes it, and starts "
            f"nothing that would; delete it, or set the annotation {names.ANNOTATION_RESTARTED_AT} on the "
            "pipeline to any new value (the stage's objects then get new names)")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Reconciler:
    """Reconciles pipelines; safe to call from several threads (one pipeline at a time)."""

    def __init__(self, kube: Kube, metrics: Metrics | None = None, *, stall_after_s: float | None = 1800.0,
                 default_image: str | None = None, policy: StoragePolicy | None = None,
                 limits: PodLimits | None = None) -> None:
        self.kube = kube
        self.limits = limits or PodLimits()
        self.policy = policy or StoragePolicy()
        self.default_image = default_image
        self.metrics = metrics or Metrics()
        self.stall_after_s = stall_after_s
        self._locks: dict[tuple[str, str], threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._stores: OrderedDict[tuple, Store] = OrderedDict()
        self._stores_guard = threading.Lock()

    # ------------------------------------------------------------------------------------------ entry points
    def reconcile(self, namespace: str, name: str) -> PipelinePhase | None:
        """Bring one pipeline a step closer to done. Returns its phase (None when it is gone or being deleted).

        Raises:
            RetryLater: the API server or the store did not answer; nothing inconsistent was left behind.
        """
        started = time.monotonic()
        error = None
        try:
            with self._lock(namespace, name):
                body = self.kube.get_pipeline(namespace, name)
                if body is None or body["metadata"].get("deletionTimestamp"):
                    self.forget(namespace, name)
                    return None
                return self._reconcile(body)
        except (ApiException, StoreError, OSError) as exc:
            error = type(exc).__name__
            raise RetryLater(f"{namespace}/{name}: {exc}") from exc
        except Exception as exc:
            error = type(exc).__name__
            raise
        finally:
            self.metrics.reconciled(time.monotonic() - started, error)

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.pipeline_phase(namespace, name, None)
        with self._locks_guard:
            self._locks.pop((namespace, name), None)

    def delete_artifacts(self, body: dict[str, Any]) -> int:
        """Delete everything the pipeline stored (``spec.storage.keepArtifactsOnDelete: false``), after its
        Jobs' pods are gone. Returns how many objects were deleted.

        Raises:
            RetryLater: pods are still running (they could write after the deletion) or the store failed.
        """
        meta = body["metadata"]
        doc = parse_pipeline(body)
        selector = names.label_selector(names.selector(meta["name"]))
        pods = self.kube.list_pods(meta["namespace"], selector)
        if pods:
            for job in self._owned_jobs(doc):
                self.kube.delete_job(meta["namespace"], job["metadata"]["name"], propagation="Foreground")
            raise RetryLater(f"waiting for {len(pods)} pod(s) of {meta['namespace']}/{meta['name']} to go")
        root = doc.spec.storage.uri
        if root is None:
            return 0
        try:
            return self._store(doc).delete_prefix(pipeline_prefix(root, pipeline_ref(doc)) + "/")
        except StoreRefused as refused:  # the operator may not touch that store: nothing it could delete
            log.warning("not deleting the artifacts of %s/%s: %s", meta["namespace"], meta["name"], refused)
            self.kube.event(body, "Warning", Reason.STORAGE_REFUSED, f"artifacts not deleted: {refused}")
            return 0
        except StoreError as exc:
            raise RetryLater(str(exc)) from exc

    # ------------------------------------------------------------------------------------------ the loop
    def _reconcile(self, body: dict[str, Any]) -> PipelinePhase:
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        previous = PipelineStatus.model_validate(body.get("status") or {})
        try:
            doc = parse_pipeline(body, f"{namespace}/{name}")
        except SpecError as err:
            return self._invalid(body, previous, "the spec is invalid: " + "; ".join(err.problems))
        annotations = meta.get("annotations") or {}
        dry_run = annotations.get(names.ANNOTATION_DRY_RUN) == "true"
        restarted_at = annotations.get(names.ANNOTATION_RESTARTED_AT)
        try:
            self._check_storage(doc, dry_run)
        except StoreRefused as refused:
            return self._invalid(body, previous, f"storage refused: {refused}", Reason.STORAGE_REFUSED)
        try:
            expected = {stage: build_stage(doc, stage, dry_run=dry_run, restarted_at=restarted_at,
                                           default_image=self.default_image, limits=self.limits)
                        for stage in stages_to_run(doc.spec)}
        except ValueError as err:  # e.g. no storage.uri on an API server without the CRD's rules
            return self._invalid(body, previous, f"the spec is invalid: {err}")

        jobs = {job["metadata"]["name"]: job for job in self._owned_jobs(doc)}
        self._delete_superseded(doc, jobs, expected)
        observed, facts = self._observe(doc, jobs, expected, previous, dry_run)
        decision = plan(doc.spec, observed)
        try:
            facts = self._act(doc, decision, expected, jobs, facts)
        except AdoptionRefused as refused:
            return self._invalid(body, previous, f"not adopted: {refused}", Reason.ADOPTION_REFUSED)

        status = build_status(decision, facts, previous, generation=meta.get("generation"), now=_now(),
                              stall_after_s=self.stall_after_s)
        self._publish(body, previous, status)
        return decision.phase

    def _owned_jobs(self, doc: RLHFPipeline) -> list[dict[str, Any]]:
        selector = names.label_selector(names.selector(doc.metadata.name))
        return [job for job in self.kube.list_jobs(doc.metadata.namespace, selector)
                if any(ref.get("uid") == doc.metadata.uid for ref in job["metadata"].get("ownerReferences") or [])]

    def _delete_superseded(self, doc: RLHFPipeline, jobs: dict[str, dict[str, Any]],
                           expected: dict[Stage, StageObjects]) -> None:
        """Unfinished Jobs that no longer match the spec (it changed, or the stage was disabled) are deleted;
        finished ones stay as history."""
        current = {objects.name for objects in expected.values()}
        for job_name, job in list(jobs.items()):
            if job_name in current or job_state(job).finished:
                continue
            log.info("deleting superseded Job %s/%s", doc.metadata.namespace, job_name)
            self.kube.delete_job(doc.metadata.namespace, job_name)
            jobs.pop(job_name)

    # ------------------------------------------------------------------------------------------ observe
    def _observe(self, doc: RLHFPipeline, jobs: dict[str, dict[str, Any]], expected: dict[Stage, StageObjects],
                 previous: PipelineStatus, dry_run: bool) -> tuple[dict[Stage, StageObservation],
                                                                   dict[Stage, StageFacts]]:
        """Each stage in order until the first one that is not done (the plan decides nothing beyond it)."""
        before = {Stage(s.name): s for s in previous.stages}
        observed: dict[Stage, StageObservation] = {}
        facts: dict[Stage, StageFacts] = {}
        for stage in STAGE_ORDER:
            settings = doc.spec.stage(stage)
            if stage not in expected:
                facts[stage] = StageFacts(stage, artifact_uri=settings.artifact)
                continue
            objects = expected[stage]
            job = jobs.get(objects.name)
            pods = None
            if job is not None and not job_state(job).phase is JobPhase.COMPLETE:
                pods = self.kube.list_pods(doc.metadata.namespace,
                                           names.label_selector({names.LABEL_JOB_NAME: objects.name}))
            state = job_state(job, pods) if job is not None else None
            fact = StageFacts(stage, job=state, job_name=objects.name, artifact_uri=objects.config.output_uri,
                              config_digest=objects.config.digest)
            old = before.get(stage)
            if (old is not None and old.phase == StagePhase.SUCCEEDED and old.job_name == objects.name
                    and old.config_digest == objects.config.digest and (old.manifest_digest or dry_run)):
                manifest_ok = True  # verified when it finished; the status remembers what the manifest said
                fact = replace(fact, manifest_digest=old.manifest_digest, metrics=dict(old.metrics))
            elif dry_run:
                manifest_ok = state is not None and state.phase is JobPhase.COMPLETE
            elif state is None or state.phase is JobPhase.COMPLETE:
                manifest = self._verified_manifest(doc, objects)
                manifest_ok = manifest is not None
                if manifest is not None:
                    fact = replace(fact, manifest_digest=manifest[0], metrics=manifest[1])
            else:
                manifest_ok = False
            seen = observation(state, manifest_ok=manifest_ok)
            if seen.state is Observed.RUNNING and not dry_run:
                fact = replace(fact, **self._progress(doc, objects))
            if seen.state is Observed.FAILED:
                fact = replace(fact, message=seen.message)
            observed[stage], facts[stage] = seen, fact
            if seen.state is not Observed.SUCCEEDED:
                break
        for stage in STAGE_ORDER:  # the stages after the one that is not done
            if stage not in facts:
                objects = expected.get(stage)
                facts[stage] = StageFacts(stage, job_name=objects.name if objects else None,
                                          artifact_uri=objects.config.output_uri if objects else
                                          doc.spec.stage(stage).artifact,
                                          config_digest=objects.config.digest if objects else None)
        return observed, facts

    def _verified_manifest(self, doc: RLHFPipeline, objects: StageObjects) -> tuple[str, dict[str, Any]] | None:
        """(sha256 of manifest.json, its metrics) when the stage's output is complete with this digest."""
        store = self._store(doc)
        uri = objects.config.output_uri
        if not is_complete(uri, store, objects.config.digest):
            return None
        raw = store.read_bytes(manifest_uri(uri))
        manifest = read_manifest(uri, store)
        return hashlib.sha256(raw).hexdigest(), dict(manifest.metrics) if manifest else {}

    def _progress(self, doc: RLHFPipeline, objects: StageObjects) -> dict[str, Any]:
        """Live progress of a running stage from what it published: ``progress.json`` (step and metrics) when
        the trainer writes one, else the step of its latest checkpoint. Never fails the reconcile."""
        try:
            store = self._store(doc)
            uri = objects.config.output_uri
            progress = read_progress(uri, store, objects.config.digest)
            if progress is not None:
                return {"step": progress.step, "metrics": progress.metrics}
            pointer = read_pointer(uri, store, objects.config.digest)
            if pointer is not None:
                return {"step": pointer.global_step}
        except NotFoundError:
            pass
        except (StoreError, ValueError, KeyError, TypeError, ApiException) as exc:
            log.debug("no progress for %s: %s", objects.name, exc)
        return {}

    def _check_storage(self, doc: RLHFPipeline, dry_run: bool) -> None:
        """Refuse (``StoreRefused``) storage settings this operator may not act on: a file:// root, an endpoint
        that is not allowed, a Secret without the opt-in label, no Secret where the store is needed."""
        self.policy.check_spec(doc)
        secret = doc.spec.storage.credentials_secret
        labels = self.kube.read_secret_labels(doc.metadata.namespace, secret.name) if secret else None
        self.policy.check_secret(doc, labels, needs_store=self.policy.needs_store(doc, dry_run))

    def _store(self, doc: RLHFPipeline) -> Store:
        """The pipeline's store, with the credentials of ``spec.storage.credentialsSecret`` (cached); never the
        operator's own identity. Raises ``StoreRefused`` where :meth:`_check_storage` would."""
        storage = doc.spec.storage
        self._check_storage(doc, dry_run=False)
        credentials = None
        if storage.credentials_secret is not None:
            ref = storage.credentials_secret
            data = self.kube.read_secret(doc.metadata.namespace, ref.name)
            try:
                credentials = (data[ref.access_key_id_key], data[ref.secret_access_key_key])
            except KeyError as missing:
                raise StoreError(f"Secret {doc.metadata.namespace}/{ref.name} has no key {missing}") from None
        options = storage_options(storage)
        key = ((storage.uri or "").partition("://")[0], options, credentials)
        with self._stores_guard:
            store = self._stores.get(key)
            if store is None:
                store = open_store(storage.uri or "", options, credentials)
                self._stores[key] = store
                while len(self._stores) > STORE_CACHE_SIZE:
                    self._stores.popitem(last=False)
            self._stores.move_to_end(key)
            return store

    # ------------------------------------------------------------------------------------------ act
    def _act(self, doc: RLHFPipeline, decision: Plan, expected: dict[Stage, StageObjects],
             jobs: dict[str, dict[str, Any]], facts: dict[Stage, StageFacts]) -> dict[Stage, StageFacts]:
        namespace = doc.metadata.namespace
        for action in decision.actions:
            objects = expected[action.stage]
            if isinstance(action, StartStage):
                for wanted in filter(None, (objects.config_map, objects.service)):
                    created, existing = self.kube.create(wanted)
                    if not created and existing is not None:
                        check_adoptable(doc, wanted, existing)
                created, job = self.kube.create(objects.job)
                if not created and job is not None:
                    check_adoptable(doc, objects.job, job)
                if created:
                    self.metrics.job_created(action.stage.value)
                    log.info("created Job %s/%s for stage %s", namespace, objects.name, action.stage.value)
                elif job is not None and job_state(job).phase is JobPhase.SUSPENDED:
                    self.kube.patch_job(namespace, objects.name, {
                        "metadata": {"annotations": {names.ANNOTATION_SUSPENDED: None}},
                        "spec": {"suspend": False}})
                    log.info("resumed Job %s/%s", namespace, objects.name)
                facts[action.stage] = replace(facts[action.stage], started=True, message="")
            elif isinstance(action, SuspendStage):
                self.kube.patch_job(namespace, objects.name, {
                    "metadata": {"annotations": {names.ANNOTATION_SUSPENDED: "true"}},
                    "spec": {"suspend": True}})
                log.info("suspended Job %s/%s", namespace, objects.name)
        return facts

    # ------------------------------------------------------------------------------------------ report
    def _publish(self, body: dict[str, Any], previous: PipelineStatus, status: PipelineStatus) -> None:
        meta = body["metadata"]
        if status.model_dump() != previous.model_dump():
            self.kube.patch_status(meta["namespace"], meta["name"], status.model_dump(mode="json", by_alias=True))
            for event in transitions(previous, status):
                self.kube.event(body, event.type, event.reason, event.message)
            self._stage_durations(previous, status)
        self.metrics.pipeline_phase(meta["namespace"], meta["name"], str(PipelinePhase(status.phase).value))

    def _stage_durations(self, previous: PipelineStatus, status: PipelineStatus) -> None:
        before = {s.name: s.phase for s in previous.stages}
        for entry in status.stages:
            if entry.phase in (StagePhase.SUCCEEDED, StagePhase.FAILED) and before.get(entry.name) != entry.phase:
                start, end = parse_time(entry.start_time), parse_time(entry.completion_time)
                if start and end:
                    self.metrics.stage_finished(str(entry.name), str(entry.phase).lower(),
                                                (end - start).total_seconds())

    def _invalid(self, body: dict[str, Any], previous: PipelineStatus, message: str,
                 reason: str = Reason.INVALID_SPEC) -> PipelinePhase:
        """A spec the CRD let through but pydantic refuses (an API server without CEL, say), or storage settings
        the operator refuses (``reason`` StorageRefused): Failed, with what to fix in the message. Nothing is
        created for the pipeline."""
        meta = body["metadata"]
        stamp = rfc3339(_now())
        old = {c.type: c for c in previous.conditions}

        def condition(kind: str, true: bool) -> Condition:
            status = "True" if true else "False"
            since = old[kind].last_transition_time if kind in old and old[kind].status == status else stamp
            return Condition(type=kind, status=status, reason=reason, message=message,
                             last_transition_time=since, observed_generation=meta.get("generation"))

        status = PipelineStatus(
            phase=PipelinePhase.FAILED, message=message, observed_generation=meta.get("generation"),
            stages=previous.stages,
            conditions=[condition(ConditionType.READY, False), condition(ConditionType.PROGRESSING, False),
                        condition(ConditionType.DEGRADED, True)])
        if status.model_dump() != previous.model_dump():
            self.kube.patch_status(meta["namespace"], meta["name"], status.model_dump(mode="json", by_alias=True))
            if previous.message != message:
                self.kube.event(body, "Warning", reason, message)
        self.metrics.pipeline_phase(meta["namespace"], meta["name"], PipelinePhase.FAILED.value)
        return PipelinePhase.FAILED

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault((namespace, name), threading.Lock())


__all__ = ["AdoptionRefused", "EventSpec", "JobState", "Reconciler", "RetryLater", "check_adoptable"]
