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


def wait_for_crd(cluster, timeout_s: float = 60) -> None:
    established = "{.status.conditions[?(@.type=='Established')].status}"
    wait_for(lambda: cluster.kubectl("get", f"crd/{PLURAL}.{GROUP}", "-o", f"jsonpath={established}",
                                     check=False).stdout == "True", timeout_s, "the CRD to be Established",
             interval_s=0.3)
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


# ---------------------------------------------------------------------------------------------- the chart
CHART = REPO / "helm" / "rlhf-operator"
BUILD_HELM = REPO / "scripts" / "build-helm.sh"
RELEASE = "rlhf-operator"
OPERATOR_NAMESPACE = "rlhf-system"
OPERATOR_SELECTOR = "app.kubernetes.io/name=rlhf-operator,app.kubernetes.io/instance=rlhf-operator"


def helm() -> str:
    """The pinned helm binary (built once from the Go module proxy and cached, scripts/build-helm.sh)."""
    return subprocess.run([str(BUILD_HELM)], check=True, capture_output=True, text=True,
                          timeout=1800).stdout.strip()


def render_chart(*sets: str, namespace: str = OPERATOR_NAMESPACE) -> list[dict[str, Any]]:
    """``helm template`` of the chart (CRD included) as a list of objects."""
    import yaml

    argv = [helm(), "template", RELEASE, str(CHART), "--namespace", namespace, "--include-crds"]
    for value in sets:
        argv += ["--set", value]
    out = subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def install_chart(cluster, api, *sets: str) -> list[dict[str, Any]]:
    """Render the chart and apply it with kubectl, as `helm install` would; the operator Deployment's pod then
    runs `rlhf operator` on the node agent with the chart's ServiceAccount token."""
    from kubernetes import client

    docs = render_chart(*sets)
    try:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": OPERATOR_NAMESPACE}})
    except client.ApiException as error:
        if error.status != 409:
            raise
    crds = [d for d in docs if d["kind"] == "CustomResourceDefinition"]
    rest = [d for d in docs if d["kind"] != "CustomResourceDefinition"]
    for batch in (crds, rest):
        subprocess.run([cluster.kubectl_path, f"--kubeconfig={cluster.kubeconfig}", "apply", "--server-side",
                        "--force-conflicts", "-f", "-"], input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                                           "items": batch}),
                       check=True, capture_output=True, text=True, timeout=120)
        if batch is crds:
            wait_for_crd(cluster)
    return docs


def operator_pods(api) -> list[dict[str, Any]]:
    from kubernetes import client

    pods = client.CoreV1Api(api).list_namespaced_pod(OPERATOR_NAMESPACE, label_selector=OPERATOR_SELECTOR).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


def wait_operator_running(api, timeout_s: float = 120) -> str:
    """The name of the operator's running pod, once its /readyz answers (it is watching)."""
    import urllib.request

    def running() -> str | None:
        for pod in operator_pods(api):
            if pod.status.phase == "Running" and pod.status.pod_ip:
                try:
                    with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/readyz", timeout=2) as answer:
                        if answer.status == 200:
                            return pod.metadata.name
                except OSError:
                    return None
        return None

    return eventually(running, timeout_s, "the operator pod to be ready")


def operator_metrics(api) -> str:
    import urllib.request

    [pod] = [p for p in operator_pods(api) if p.status.phase == "Running"]
    with urllib.request.urlopen(f"http://{pod.status.pod_ip}:8080/metrics", timeout=5) as answer:
        return answer.read().decode()


# ---------------------------------------------------------------------------------------------- pipelines
def get_pipeline(api, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    return client.CustomObjectsApi(api).get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)


def wait_phase(api, namespace: str, name: str, phases: tuple[str, ...] | str, timeout_s: float) -> dict[str, Any]:
    phases = (phases,) if isinstance(phases, str) else phases

    def reached() -> dict[str, Any] | None:
        body = get_pipeline(api, namespace, name)
        return body if (body.get("status") or {}).get("phase") in phases else None

    try:
        return eventually(reached, timeout_s, f"pipeline {namespace}/{name} to be {'/'.join(phases)}", 1.0)
    except AssertionError as error:
        status = (get_pipeline(api, namespace, name).get("status") or {})
        raise AssertionError(f"{error}\nstatus: {json.dumps(status, indent=1)[:3000]}") from None


def stage_status(body: dict[str, Any], stage: str) -> dict[str, Any]:
    return next(s for s in body["status"]["stages"] if s["name"] == stage)


def pipeline_jobs(api, namespace: str, name: str) -> list[Any]:
    from kubernetes import client

    return client.BatchV1Api(api).list_namespaced_job(
        namespace, label_selector=f"rlhf-operator.io/pipeline={name}").items


def pipeline_events(api, namespace: str, name: str) -> list[Any]:
    from kubernetes import client

    events = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=RLHFPipeline").items
    return sorted(events, key=lambda e: (e.last_timestamp or e.event_time or 0, e.metadata.creation_timestamp))


def succeeded_pipeline_reasons(api, namespace: str, name: str, timeout_s: float = 30) -> list[str]:
    """The reasons of the pipeline's Events, in order, once its ``Succeeded`` Event is recorded. The controller
    records a transition's Events just after the status patch that shows it, so a test that has seen the phase
    may be ahead of them; ``Succeeded`` is the last Event a pipeline gets."""

    def reasons() -> list[str] | None:
        found = [e.reason for e in pipeline_events(api, namespace, name)]
        return found if "Succeeded" in found else None

    return eventually(reasons, timeout_s, f"the Succeeded event of {namespace}/{name}")


def tiny_spec(model_dir: Path, s3, **stages: Any) -> dict[str, Any]:
    """A pipeline on the tiny test model, stored in the test's bucket with the Secret's credentials. Stages
    given as keyword arguments replace the defaults (None disables a stage)."""
    train = {"maxSteps": 3, "perDeviceTrainBatchSize": 4, "learningRate": 1e-3, "maxLength": 96,
             "saveSteps": 1, "loggingSteps": 1}
    gen = {"maxNewTokens": 24, "temperature": 1.0}
    spec: dict[str, Any] = {
        "model": {"uri": model_dir.as_uri()},
        "storage": {"uri": f"{s3.uri}/runs", "endpoint": s3.endpoint, "region": s3.region,
                    "addressingStyle": "path", "credentialsSecret": {"name": s3.secret_name}},
        "sft": {"dataset": {"uri": "builtin://movie-reviews/sft", "limit": 16}, **train},
        "preferences": {"prompts": {"uri": "builtin://movie-reviews/prompts-train", "limit": 16},
                        "numSamplesPerPrompt": 4, "minScoreMargin": 0.0, "generation": gen},
        "reward": {"evalFraction": 0.25, **train, "maxLength": 160},
        "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train", "limit": 8}, "batchSize": 4,
                "miniBatchSize": 2, "totalEpisodes": 8, "numPpoEpochs": 1, "learningRate": 1e-3,
                "generation": {"maxNewTokens": 8, "temperature": 1.0}, "judge": {"type": "vader"}},
        "evaluate": {"prompts": {"uri": "builtin://movie-reviews/prompts-eval", "limit": 4}, "generation": gen},
    }
    for stage, value in stages.items():
        spec[stage] = {"enabled": False} if value is None else value
    return spec


EXAMPLE = REPO / "examples" / "kind-pipeline.yaml"


def example_spec(model_dir: Path, s3) -> dict[str, Any]:
    """examples/kind-pipeline.yaml's spec with only what differs here replaced: the model's folder (the image
    bakes it in at /opt/rlhf/models) and the store (the test's bucket on the session's MinIO)."""
    import yaml

    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["model"]["uri"] = model_dir.as_uri()
    spec["storage"].update(uri=f"{s3.uri}/runs", endpoint=s3.endpoint, region=s3.region,
                           credentialsSecret={"name": s3.secret_name})
    return spec


# ---------------------------------------------------------------------------------------------- tenancy
class RecordingListener:
    """A plain HTTP listener on 127.0.0.1 that answers every request 403 (S3's AccessDenied) and records it: the
    attacker's (or a merely allowed) endpoint, to prove what the operator sends there."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[dict[str, Any]] = []
        listener = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _record(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                listener.requests.append({"method": self.command, "path": self.path,
                                          "headers": dict(self.headers.items()), "body": body})
                answer = b"<Error><Code>AccessDenied</Code><Message>denied</Message></Error>"
                self.send_response(403)
                self.send_header("Content-Type", "application/xml")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(answer)

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _record

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def leaked(self, *secrets: str) -> list[str]:
        """What of a credential reached this listener: Authorization headers, and any of ``secrets`` anywhere in
        a request (path, headers, body)."""
        found = []
        for request in self.requests:
            text = request["path"] + json.dumps(request["headers"]) + request["body"].decode(errors="replace")
            found += [f"{request['method']} {request['path']}: Authorization header"
                      for name in request["headers"] if name.lower() == "authorization"]
            found += [f"{request['method']} {request['path']}: {secret[:4]}..." for secret in secrets if secret in text]
        return found

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
