"""Fixtures of the operator's end-to-end tests: the real control plane of tests/cluster (its fixtures are imported
here), the CRD applied once per session, and helpers in operator_harness.py (the chart's RBAC, the operator
process, pipelines)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cluster.fixtures import *  # noqa: F401,F403  (k8s_cluster, k8s_api, k8s_namespace, pod_s3, ...)
from operator_harness import CRD_FILE, OPERATOR_LOGS, wait_for_crd


@pytest.fixture(scope="session")
def crd(k8s_cluster) -> Iterator[str]:
    """The RLHFPipeline CRD from crds/, applied with kubectl and Established."""
    k8s_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    wait_for_crd(k8s_cluster)
    yield "rlhfpipelines.rlhf-operator.io"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """A failed test's report carries the tail of the operator's log (the cluster's logs are kept by the
    cluster fixtures' own hooks when tests/cluster is collected too)."""
    report = yield
    if report.failed:
        for path in OPERATOR_LOGS:
            try:
                tail = path.read_bytes()[-6000:].decode(errors="replace")
            except OSError:
                continue
            report.sections.append((f"operator log {path.name} (tail)", tail))
    return report
