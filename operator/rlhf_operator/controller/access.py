"""Which store a pipeline may make the operator use, and with which credentials (:mod:`rlhf_api.tenancy` holds the
rules and the label). A refusal names the spec field and the fix; the reconciler shows it in the status and an
Event, and creates nothing for the pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_api.artifacts import StoreError
from rlhf_api.spec import RLHFPipeline
from rlhf_api.tenancy import (
    REGION_PATTERN,
    STORE_CREDENTIALS_LABEL,
    STORE_CREDENTIALS_LABEL_VALUE,
    endpoint_allowed,
    opted_in,
)


class StoreRefused(StoreError):
    """The pipeline's storage settings are not allowed on this operator; the message names the field and the fix."""


@dataclass(frozen=True)
class StoragePolicy:
    """The platform's rules for the stores pipelines may name (the chart's ``storage`` values)."""

    allowed_endpoints: tuple[str, ...] = ()
    allow_file_roots: bool = False
    """file:// roots, read with no credentials: only for tests that run the reconciler in-process (never a flag)."""

    def check_spec(self, doc: RLHFPipeline) -> None:
        """The checks that need no API call: the storage root's scheme, the endpoint, the AWS region."""
        storage = doc.spec.storage
        uri = storage.uri or ""
        if uri.startswith("file://") and not self.allow_file_roots:
            raise StoreRefused(
                f"spec.storage.uri: {uri!r} is refused: a file:// root on a cluster is the operator's own "
                "filesystem; store the artifacts under s3://BUCKET/PREFIX")
        if not endpoint_allowed(storage.endpoint, self.allowed_endpoints):
            allowed = ", ".join(self.allowed_endpoints) or "none besides AWS S3 (no endpoint)"
            raise StoreRefused(
                f"spec.storage.endpoint: {storage.endpoint!r} is not an endpoint this operator may send credentials "
                f"to (allowed: {allowed}); use an allowed one, or ask the platform admins to add it to the chart's "
                "storage.allowedEndpoints")
        if storage.endpoint is None and storage.region and not REGION_PATTERN.fullmatch(storage.region):
            raise StoreRefused(
                f"spec.storage.region: {storage.region!r} is not an AWS region name (e.g. us-east-1); fix it, or "
                "set storage.endpoint to an allowed S3-compatible server")

    def check_secret(self, doc: RLHFPipeline, labels: dict[str, str] | None, *, needs_store: bool) -> None:
        """The credentials Secret: ``labels`` are its labels, None when it does not exist. ``needs_store``: the
        operator must read the store for this pipeline (every pipeline but a dry run that keeps its artifacts)."""
        secret = doc.spec.storage.credentials_secret
        label = f"{STORE_CREDENTIALS_LABEL}={STORE_CREDENTIALS_LABEL_VALUE}"
        where = f"{doc.metadata.namespace}/"
        if secret is None:
            if needs_store and not (self.allow_file_roots and (doc.spec.storage.uri or "").startswith("file://")):
                raise StoreRefused(
                    "spec.storage.credentialsSecret: required: the operator has no store credentials of its own and "
                    "reads the store only with a Secret of the pipeline's namespace labelled "
                    f"{label}; create one with the keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, label it, "
                    "and name it here")
            return
        if labels is None:
            raise StoreRefused(
                f"spec.storage.credentialsSecret.name: Secret {where}{secret.name} does not exist; create it "
                f"(labelled {label}) or fix the name")
        if not opted_in(labels):
            raise StoreRefused(
                f"spec.storage.credentialsSecret.name: Secret {where}{secret.name} is not labelled {label}, so the "
                "operator neither reads it nor passes it to stage pods; if it is meant for this, label it "
                f"(kubectl label secret {secret.name} {label}) and re-apply the pipeline")

    @staticmethod
    def needs_store(doc: RLHFPipeline, dry_run: bool) -> bool:
        return not dry_run or not doc.spec.storage.keep_artifacts_on_delete
