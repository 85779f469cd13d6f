"""Fixtures of the operator's end-to-end tests: the real control plane of tests/cluster (its fixtures are imported
here), the CRD applied once per session, and helpers in operator_harness.py (the chart's RBAC, the operator
process, pipelines)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest
from cluster.fixtures import *  # noqa: F401,F403  (k8s_cluster, k8s_api, k8s_namespace, pod_s3, ...)
from cluster.fixtures import CURRENT, pod_s3_endpoint
from operator_harness import (
    BUILD_HELM,
    CRD_FILE,
    OPERATOR_NAMESPACE,
    RecordingListener,
    install_chart,
    wait_for_crd,
    wait_operator_running,
)


@pytest.fixture(scope="session")
def crd(k8s_cluster) -> Iterator[str]:
    """The RLHFPipeline CRD from crds/, applied with kubectl and Established."""
    k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    wait_for_crd(k8s_cluster)
    yield "rlhfpipelines.rlhf-operator.io"


@pytest.fixture(scope="session")
def allowed_listener() -> Iterator[RecordingListener]:
    """A recording listener on loopback that the session's operator is allowed to talk to (in the chart's
    storage.allowedEndpoints), to prove what reaches even an allowed endpoint."""
    listener = RecordingListener()
    yield listener
    listener.close()


@pytest.fixture(scope="session")
def operator(k8s_cluster, k8s_api, crd, allowed_listener, request) -> Iterator[list[dict]]:
    """The chart rendered by ``helm template`` and applied: its CRD, ServiceAccount, least-privilege RBAC and
    Deployment, whose pod runs ``rlhf operator`` (cluster-wide) with the chart's ServiceAccount token. One
    operator for the whole session; yields the rendered objects. Its allowed S3 endpoints are the pods' S3 server
    and ``allowed_listener``."""
    endpoints = [e for e in (pod_s3_endpoint(k8s_cluster, request), allowed_listener.endpoint) if e]
    docs = install_chart(k8s_cluster, k8s_api, "resyncSeconds=10", "logFormat=text",
                         f"storage.allowedEndpoints={{{','.join(endpoints)}}}")
    wait_operator_running(k8s_api)
    yield docs


class OperatorTestHooks:
    """Hooks of this folder, registered as a plugin so that the cluster fixtures' hooks (imported above with the
    same names) keep working: helm is built before the first test, and failed tests carry the operator's log."""

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        if session.config.option.collectonly:
            return
        if any("operator" in getattr(item, "fixturenames", ()) for item in session.items):
            subprocess.run([str(BUILD_HELM)], check=False, capture_output=True, timeout=1800)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        cluster = CURRENT.get("cluster")
        if report.failed and cluster is not None and cluster.local and "operator" in getattr(item, "fixturenames",
                                                                                              ()):
            for path in cluster.pod_log_files(OPERATOR_NAMESPACE)[-2:]:
                try:
                    tail = path.read_bytes()[-8000:].decode(errors="replace")
                except OSError:
                    continue
                report.sections.append((f"operator log {path.name} (tail)", tail))
        return report


def pytest_configure(config: pytest.Config) -> None:
    if not config.pluginmanager.has_plugin("rlhf-operator-tests"):
        config.pluginmanager.register(OperatorTestHooks(), "rlhf-operator-tests")
