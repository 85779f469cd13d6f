"""The storage rules of issue 36 (rlhf_api.tenancy, the operator's StoragePolicy), without a cluster: the
end-to-end attacks are tests/operator/test_tenancy.py."""

from __future__ import annotations

import pytest

from rlhf_api.spec import RLHFPipeline
from rlhf_api.tenancy import STORE_CREDENTIALS_LABEL, endpoint_allowed, normalize_endpoint, parse_allowed_endpoints
from rlhf_operator.controller.access import StoragePolicy, StoreRefused
from rlhf_operator.controller.main import parse_args

OPTED_IN = {STORE_CREDENTIALS_LABEL: "true"}


def doc(**storage) -> RLHFPipeline:
    return RLHFPipeline.model_validate({
        "metadata": {"name": "p", "namespace": "team-a"},
        "spec": {"model": {"uri": "s3://m/base"}, "storage": {"uri": "s3://b/runs", **storage},
                 "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}}}})


@pytest.mark.parametrize(("url", "normal"), [
    ("http://MinIO.storage:9000/", "http://minio.storage:9000"),
    ("https://s3.example.com", "https://s3.example.com:443"),
    ("http://[::1]:9000", "http://[::1]:9000"),
])
def test_endpoints_compare_normalised(url, normal):
    assert normalize_endpoint(url) == normal


@pytest.mark.parametrize("url", ["http://user:pw@minio.storage:9000", "http://minio.storage:9000?x=1",
                                 "http://minio.storage:9000#f", "ftp://minio.storage:9000", "http://minio:notaport"])
def test_odd_endpoints_match_no_allowed_entry(url):
    assert not endpoint_allowed(url, ["http://minio.storage:9000"])


def test_allowed_endpoints_from_flags_and_the_environment(monkeypatch):
    monkeypatch.setenv("RLHF_ALLOWED_ENDPOINTS", "http://a:9000, http://b:9000/")
    args = parse_args(["--allowed-endpoint", "http://c:9000", "--allowed-endpoint", "http://a:9000"])
    assert args.allowed_endpoints == ("http://a:9000", "http://b:9000", "http://c:9000")
    monkeypatch.delenv("RLHF_ALLOWED_ENDPOINTS")
    assert parse_args([]).allowed_endpoints == () == parse_allowed_endpoints(["", " "])


def test_aws_is_allowed_without_a_list_and_nothing_else_is():
    policy = StoragePolicy()
    policy.check_spec(doc())
    policy.check_spec(doc(region="eu-west-1"))
    with pytest.raises(StoreRefused, match=r"spec.storage.endpoint: 'http://evil:80'.*storage.allowedEndpoints"):
        policy.check_spec(doc(endpoint="http://evil:80"))
    StoragePolicy(("http://evil:80",)).check_spec(doc(endpoint="http://evil"))


def test_a_region_that_could_steer_the_aws_host_is_refused():
    with pytest.raises(StoreRefused, match="spec.storage.region"):
        StoragePolicy().check_spec(doc(region="evil.example.com#"))
    StoragePolicy(("http://minio:9000",)).check_spec(doc(endpoint="http://minio:9000", region="garage"))


def test_file_roots_are_refused_by_the_operator_too():
    with pytest.raises(StoreRefused, match=r"spec.storage.uri: 'file:///etc'.*s3://BUCKET/PREFIX"):
        StoragePolicy().check_spec(doc(uri="file:///etc"))


def test_secrets_only_with_the_label_and_the_store_only_with_a_secret():
    policy = StoragePolicy()
    with_secret = doc(credentialsSecret={"name": "creds"})
    policy.check_secret(with_secret, OPTED_IN, needs_store=True)
    with pytest.raises(StoreRefused, match="kubectl label secret creds rlhf-operator.io/store-credentials=true"):
        policy.check_secret(with_secret, {STORE_CREDENTIALS_LABEL: "yes"}, needs_store=True)
    with pytest.raises(StoreRefused, match="team-a/creds does not exist"):
        policy.check_secret(with_secret, None, needs_store=False)
    with pytest.raises(StoreRefused, match="spec.storage.credentialsSecret: required"):
        policy.check_secret(doc(), None, needs_store=True)
    policy.check_secret(doc(), None, needs_store=False)  # a dry run that keeps its artifacts reads no store
    assert policy.needs_store(doc(), dry_run=False) and not policy.needs_store(doc(), dry_run=True)
    assert policy.needs_store(doc(keepArtifactsOnDelete=False), dry_run=True)
