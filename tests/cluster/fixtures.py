"""Pytest fixtures for tests that run against a real Kubernetes cluster (see README.md in this folder).

- ``k8s_cluster`` (session): the cluster (``cluster.Cluster``): by default a local one started for the session;
  with ``RLHF_TEST_CLUSTER=kubeconfig`` the existing cluster that ``KUBECONFIG`` points at.
- ``k8s_api`` (session): an admin ``kubernetes.client.ApiClient``.
- ``k8s_namespace`` (function): a fresh namespace (its ``default`` ServiceAccount exists), deleted afterwards.
- ``as_service_account`` (function): ``as_service_account(name, namespace)`` creates the ServiceAccount if needed
  and returns a ``ServiceAccountAccess`` (kubeconfig path and ApiClient) that acts as it, to prove RBAC.
- ``pod_s3`` (function): the session's S3 server as the pods see it, a fresh bucket, and a Secret with the
  standard ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` keys in the test's namespace.

Other test folders use them by importing them into their own conftest.py:
``from cluster.fixtures import *  # noqa: F401,F403``. That also brings the hooks below: the binaries are built
before the first test (so a cold build counts against no test's timeout), and a failed test's report carries the
tail of the cluster's logs.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import binaries
from .cluster import Cluster, existing, start_local
from .processes import kill_pod_processes

#: the session's cluster, for the failure-report hook in conftest.py
CURRENT: dict[str, Cluster] = {}
NAMESPACE_READY_TIMEOUT_S = 60
WORKDIR_PREFIX = "rlhf-cluster-"


def use_existing_cluster() -> bool:
    return os.environ.get("RLHF_TEST_CLUSTER", "local") == "kubeconfig"


@pytest.fixture(scope="session")
def k8s_cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The cluster under test, for the whole session."""
    mode = os.environ.get("RLHF_TEST_CLUSTER", "local")
    if mode not in ("local", "kubeconfig"):
        raise pytest.UsageError(f"RLHF_TEST_CLUSTER={mode!r}: use 'local' (default) or 'kubeconfig'")
    _sweep_stale_workdirs()
    workdir = Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
    (workdir / "owner.pid").write_text(str(os.getpid()))
    try:
        if mode == "kubeconfig":
            kubeconfig = os.environ.get("KUBECONFIG", str(Path.home() / ".kube" / "config")).split(os.pathsep)[0]
            cluster = existing(Path(kubeconfig), workdir)
        else:
            cluster = start_local(workdir)
        CURRENT["cluster"] = cluster
        try:
            yield cluster
        finally:
            CURRENT.pop("cluster", None)
            cluster.stop()
    finally:
        if request.session.testsfailed and (workdir / "logs").is_dir():
            kept = tmp_path_factory.getbasetemp() / "cluster-logs"  # pytest keeps the basetemp of its last 3 runs
            shutil.copytree(workdir / "logs", kept, dirs_exist_ok=True)
            request.config.stash[KEPT_LOGS] = kept
        shutil.rmtree(workdir, ignore_errors=True)


KEPT_LOGS = pytest.StashKey[Path]()
_LOGS_REPORTED = pytest.StashKey[bool]()


def _sweep_stale_workdirs() -> None:
    """Remove work directories of earlier sessions that were killed before they could clean up (their children
    died with them: PR_SET_PDEATHSIG)."""
    for directory in Path(tempfile.gettempdir()).glob(WORKDIR_PREFIX + "*"):
        try:
            owner = int((directory / "owner.pid").read_text())
        except (OSError, ValueError):
            continue
        if not Path(f"/proc/{owner}").exists():
            kill_pod_processes(directory / "agent" / "pods")
            shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="session")
def k8s_api(k8s_cluster: Cluster):
    """An admin ApiClient for the session's cluster."""
    with k8s_cluster.api_client() as api:
        yield api


def _namespace_name(request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")
    return f"t-{slug[:44].strip('-')}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def k8s_namespace(request: pytest.FixtureRequest, k8s_cluster: Cluster, k8s_api) -> Iterator[str]:
    """A fresh namespace for one test; deleted (in the background) after it."""
    from kubernetes import client

    from .processes import wait_for

    core = client.CoreV1Api(k8s_api)
    name = _namespace_name(request)
    core.create_namespace({"metadata": {"name": name, "labels": {"rlhf-operator.io/test": "true"}}})
    wait_for(lambda: core.read_namespaced_service_account("default", name), NAMESPACE_READY_TIMEOUT_S,
             f"the default ServiceAccount of namespace {name}")
    yield name
    try:
        core.delete_namespace(name, propagation_policy="Background")
    except client.ApiException as error:
        if error.status != 404:
            raise


@dataclass
class ServiceAccountAccess:
    """Credentials that act as one ServiceAccount."""

    namespace: str
    name: str
    kubeconfig: Path
    api_client: object  # kubernetes.client.ApiClient


@pytest.fixture
def as_service_account(k8s_cluster: Cluster, k8s_api) -> Iterator[Callable[..., ServiceAccountAccess]]:
    """``as_service_account(name, namespace, create=True)``: a kubeconfig and ApiClient acting as that
    ServiceAccount (a bound token from the TokenRequest API, valid for an hour)."""
    from kubernetes import client

    core = client.CoreV1Api(k8s_api)
    made: list[ServiceAccountAccess] = []
    directory = Path(tempfile.mkdtemp(prefix="sa-", dir=k8s_cluster.workdir))

    def make(name: str, namespace: str, create: bool = True) -> ServiceAccountAccess:
        if create:
            try:
                core.create_namespaced_service_account(namespace, {"metadata": {"name": name}})
            except client.ApiException as error:
                if error.status != 409:
                    raise
        token = core.create_namespaced_service_account_token(
            name, namespace, {"spec": {"expirationSeconds": 3600}}
        ).status.token
        kubeconfig = k8s_cluster.write_token_kubeconfig(
            directory / f"{namespace}-{name}.yaml", token, user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )
        access = ServiceAccountAccess(namespace, name, kubeconfig, k8s_cluster.api_client(kubeconfig))
        made.append(access)
        return access

    yield make
    for access in made:
        access.api_client.close()
    shutil.rmtree(directory, ignore_errors=True)


@dataclass
class PodS3:
    """The S3 server as pods reach it, with a fresh bucket and a Secret holding the credentials."""

    endpoint: str
    bucket: str
    uri: str  # s3://bucket
    secret_name: str  # keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY
    access_key: str
    secret_key: str
    region: str


def pod_s3_endpoint(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> str | None:
    """The S3 endpoint the pods of this session use (what :func:`pod_s3` gives them), None when there is none."""
    if k8s_cluster.local:
        return request.getfixturevalue("s3_server").endpoint
    return os.environ.get("RLHF_TEST_S3_ENDPOINT")


@pytest.fixture
def pod_s3(k8s_cluster: Cluster, k8s_api, k8s_namespace: str, request: pytest.FixtureRequest) -> PodS3:
    """S3 for the pods of this test. On the local cluster pods are local processes, so the session's S3 server
    (``s3_server``, MinIO or moto on loopback) serves them; on an existing cluster the server the pods can reach
    is given by RLHF_TEST_S3_ENDPOINT, RLHF_TEST_S3_ACCESS_KEY and RLHF_TEST_S3_SECRET_KEY (kind-e2e.sh sets them)."""
    from kubernetes import client

    from rlhf_api.tenancy import STORE_CREDENTIALS_LABEL, STORE_CREDENTIALS_LABEL_VALUE

    if k8s_cluster.local:
        server = request.getfixturevalue("s3_server")
        endpoint, access_key, secret_key, region = (server.endpoint, server.access_key, server.secret_key,
                                                    server.region)
        admin_endpoint = endpoint
    else:
        try:
            endpoint = os.environ["RLHF_TEST_S3_ENDPOINT"]
            access_key = os.environ["RLHF_TEST_S3_ACCESS_KEY"]
            secret_key = os.environ["RLHF_TEST_S3_SECRET_KEY"]
        except KeyError as missing:
            pytest.skip(f"existing cluster without {missing.args[0]}: no S3 server the pods can reach")
        region = os.environ.get("RLHF_TEST_S3_REGION", "us-east-1")
        admin_endpoint = os.environ.get("RLHF_TEST_S3_ADMIN_ENDPOINT", endpoint)
    import boto3
    from botocore.config import Config

    bucket = f"rlhf-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3", endpoint_url=admin_endpoint, region_name=region, aws_access_key_id=access_key,
                 aws_secret_access_key=secret_key,
                 config=Config(s3={"addressing_style": "path"})).create_bucket(Bucket=bucket)
    secret_name = "s3-credentials"
    client.CoreV1Api(k8s_api).create_namespaced_secret(k8s_namespace, {
        # opted in as store credentials: the operator reads no Secret without this label (rlhf_api.tenancy)
        "metadata": {"name": secret_name, "labels": {STORE_CREDENTIALS_LABEL: STORE_CREDENTIALS_LABEL_VALUE}},
        "stringData": {"AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key},
    })
    return PodS3(endpoint, bucket, f"s3://{bucket}", secret_name, access_key, secret_key, region)


# ------------------------------------------------------------------------------------------------ hooks
LOG_TAIL_BYTES = 4000


def _uses(session: pytest.Session, fixture: str) -> bool:
    return any(fixture in getattr(item, "fixturenames", ()) for item in session.items)


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly:
        return
    if not use_existing_cluster() and _uses(session, "k8s_cluster"):
        for component in ("kubernetes", "etcd"):
            try:
                binaries.ensure(component)
            except RuntimeError:
                pass  # remembered in binaries.FAILED: every test that needs the cluster errors with the reason
    s3_choice = os.environ.get("RLHF_TEST_S3_SERVER", "auto")
    if s3_choice in ("auto", "minio") and _uses(session, "s3_server"):
        try:
            binaries.ensure("minio")
        except RuntimeError as error:
            if s3_choice == "minio":
                return  # remembered in binaries.FAILED: the S3 tests error with the reason
            message = f"MinIO could not be built, the S3 tests use moto instead: {error}"
            print(message, file=sys.__stderr__)
            warnings.warn(message, stacklevel=1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    cluster = CURRENT.get("cluster")
    if report.failed and cluster is not None and cluster.local:
        namespace = getattr(item, "funcargs", {}).get("k8s_namespace")
        files = cluster.log_files() + (cluster.pod_log_files(namespace) if isinstance(namespace, str) else [])
        for path in files:
            try:
                data = path.read_bytes()[-LOG_TAIL_BYTES:].decode(errors="replace")
            except OSError:
                continue
            report.sections.append((f"cluster log {path.name} (tail)", data))
    return report


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    kept = config.stash.get(KEPT_LOGS, None)
    if kept is not None and not config.stash.get(_LOGS_REPORTED, False):
        config.stash[_LOGS_REPORTED] = True  # several conftests may import this hook
        terminalreporter.write_line(f"test cluster logs kept in {kept}")
