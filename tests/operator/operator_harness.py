"""Helpers of the operator's end-to-end tests: the CRD, the chart's RBAC, the operator as a process, and
RLHFPipeline documents for the tiny models."""

from __future__ import annotations

import copy
import json
import subprocess
import time
from pathlib import Path
from typing import Any

from cluster.processes import wait_for

REPO = Path(__file__).resolve().parents[2]
CRD_FILE = REPO / "crds" / "rlhf-operator.io_rlhfpipelines.yaml"
GROUP, VERSION, PLURAL = "rlhf-operator.io", "v1alpha1", "rlhfpipelines"
#: log files of the operator processes started by the tests (attached to a failed test's report)
OPERATOR_LOGS: list[Path] = []


def wait_for_crd(cluster, timeout_s: float = 60) -> None:
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", f"--timeout={int(timeout_s)}s")
    # The API server serves the new resource a moment after Established; discovery proves it.
    wait_for(lambda: cluster.kubectl("get", PLURAL, "-A", check=False).returncode == 0, timeout_s,
             "the RLHFPipeline resource to be served", interval_s=0.3)


def pipeline_doc(name: str, spec: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLHFPipeline",
            "metadata": {"name": name, **metadata}, "spec": copy.deepcopy(spec)}


def kubectl_apply(cluster, doc: dict[str, Any], namespace: str, *, check: bool = True,
                  kubeconfig: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``kubectl apply -f -`` of one document (client-side apply, strict field validation: kubectl's default)."""
    result = subprocess.run(
        [cluster.kubectl_path, f"--kubeconfig={kubeconfig or cluster.kubeconfig}", "-n", namespace, "apply",
         "-f", "-"], input=json.dumps(doc), capture_output=True, text=True, timeout=60,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl apply failed ({result.returncode}):\n{result.stderr}")
    return result


def eventually(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    """``predicate()``'s first truthy value within ``timeout_s``; an AssertionError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")
