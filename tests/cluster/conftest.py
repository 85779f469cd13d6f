"""Registers the cluster fixtures (fixtures.py) for the tests in this folder, builds the binaries before the first
test (so a cold build is not counted against any test's timeout) and keeps the cluster's logs for failed tests."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

from . import binaries
from .fixtures import *  # noqa: F401,F403  (the fixtures)
from .fixtures import CURRENT, KEPT_LOGS, use_existing_cluster

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
    if kept is not None:
        terminalreporter.write_line(f"test cluster logs kept in {kept}")
