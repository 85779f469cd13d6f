"""The API calls the reconciler makes, with the Kubernetes Python client, on plain dicts.

Reads use ``_preload_content=False`` and JSON, so objects stay the dicts the API server sent (cheaper than the
client's model classes, and what the pure builders and observers take). Creates answer "already exists" with
the existing object: a second reconcile, or a restarted operator, adopts instead of duplicating.
"""

from __future__ import annotations

import base64
import json
import logging
import socket
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from rlhf_api.phases import now_rfc3339
from rlhf_api.spec import GROUP, KIND, PLURAL, VERSION

log = logging.getLogger("rlhf_operator.controller")
MERGE_PATCH = "application/merge-patch+json"
PARTIAL_METADATA = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
COMPONENT = "rlhf-operator"


def _json(response: Any) -> Any:
    return json.loads(response.data)


class Kube:
    """Typed access to pipelines, their Jobs, pods, ConfigMaps, Services, Secrets and Events."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.instance = socket.gethostname()

    # ------------------------------------------------------------------------------------------ pipelines
    def get_pipeline(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return _json(self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                                  _preload_content=False))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch ``status`` (the status subresource: the controller never writes spec)."""
        self.custom.patch_namespaced_custom_object_status(GROUP, VERSION, namespace, PLURAL, name,
                                                          {"status": status}, _content_type=MERGE_PATCH)

    # ------------------------------------------------------------------------------------------ children
    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return _json(self.batch.list_namespaced_job(namespace, label_selector=selector,
                                                    _preload_content=False))["items"]

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return _json(self.core.list_namespaced_pod(namespace, label_selector=selector,
                                                   _preload_content=False))["items"]

    def create(self, obj: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
        """Create a Job, Service or ConfigMap; ``(False, existing)`` when one of that name exists already."""
        namespace, kind = obj["metadata"]["namespace"], obj["kind"]
        create, read = {
            "Job": (self.batch.create_namespaced_job, self.batch.read_namespaced_job),
            "Service": (self.core.create_namespaced_service, self.core.read_namespaced_service),
            "ConfigMap": (self.core.create_namespaced_config_map, self.core.read_namespaced_config_map),
        }[kind]
        try:
            return True, _json(create(namespace, obj, _preload_content=False))
        except ApiException as error:
            if error.status != 409:
                raise
        try:
            return False, _json(read(obj["metadata"]["name"], namespace, _preload_content=False))
        except ApiException as error:
            if error.status == 404:  # deleted in between (e.g. a superseded Job): the next reconcile creates it
                return False, None
            raise

    def patch_job(self, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.batch.patch_namespaced_job(name, namespace, patch, _content_type=MERGE_PATCH)

    def delete_job(self, namespace: str, name: str, propagation: str = "Background") -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy=propagation)
        except ApiException as error:
            if error.status != 404:
                raise

    def read_secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's labels, None when it does not exist. Only its metadata travels (PartialObjectMetadata): the
        operator decides from the labels whether it may read the data at all."""
        try:
            response = self.api.call_api(
                "/api/v1/namespaces/{namespace}/secrets/{name}", "GET",
                path_params={"namespace": namespace, "name": name},
                header_params={"Accept": PARTIAL_METADATA}, auth_settings=["BearerToken"],
                response_types_map={}, _return_http_data_only=True, _preload_content=False)
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return _json(response)["metadata"].get("labels") or {}

    def read_secret(self, namespace: str, name: str) -> dict[str, str]:
        secret = _json(self.core.read_namespaced_secret(name, namespace, _preload_content=False))
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    # ------------------------------------------------------------------------------------------ events
    def event(self, pipeline: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event on the pipeline (``kubectl describe rlhf NAME`` shows it). Best effort."""
        meta = pipeline["metadata"]
        stamp = now_rfc3339()
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "name": meta["name"],
                               "namespace": meta["namespace"], "uid": meta["uid"],
                               "resourceVersion": meta.get("resourceVersion")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": COMPONENT}, "reportingComponent": COMPONENT,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1,
        }
        try:
            self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)
        except ApiException as error:
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"],
                        error.reason)
