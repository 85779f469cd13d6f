"""Operator reaction times and footprint on the real control plane (tests/cluster: etcd, kube-apiserver,
controller-manager, scheduler, and the node agent running pods as local processes).

The operator runs as a local process (``python -m rlhf_operator.controller``, so its RSS and CPU can be read
from /proc) against a fresh cluster. Pipelines carry the ``rlhf-operator.io/dry-run`` annotation: every stage is a
real Job whose pod runs ``rlhf-train STAGE --dry-run`` (validates its config, trains nothing), so the figures are
the operator's and the control plane's, not training's. Times are taken by one watch on Jobs in this process:

* apply -> first Job: from the create call of a pipeline to the ADDED event of its first stage's Job;
* Job complete -> next stage's Job: from the event that shows a stage Job's Complete condition to the ADDED
  event of the next stage's Job (3 stages per pipeline: 2 hand-overs each);
* footprint: ``--pipelines`` pipelines (one dry-run stage each) present and run to Succeeded; the operator's
  RSS (at the end, and its peak) and CPU seconds over that phase.

One line per figure. The machine's other load slows everything; the load average is printed too.

    scripts/in-venv python bench/operator_latency.py [--latency-pipelines 20] [--pipelines 200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from cluster.cluster import start_local  # noqa: E402  (the test harness's real control plane)
from cluster.processes import free_port, wait_for  # noqa: E402

GROUP, VERSION, PLURAL = "rlhf-operator.io", "v1alpha1", "rlhfpipelines"
NAMESPACE = "bench"
THREE_STAGES = {
    "model": {"uri": "s3://models/base"},
    "storage": {"uri": "s3://bench/runs"},
    "sft": {"dataset": {"uri": "builtin://movie-reviews/sft"}},
    "reward": {"dataset": {"uri": "s3://bench/pairs.jsonl"}},
    "ppo": {"prompts": {"uri": "builtin://movie-reviews/prompts-train"}},
}
ONE_STAGE = {k: v for k, v in THREE_STAGES.items() if k in ("model", "storage", "sft")}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summary(values: list[float]) -> str:
    return f"p50 {percentile(values, 0.5):.2f} s, p95 {percentile(values, 0.95):.2f} s (n={len(values)})"


class JobWatch:
    """Monotonic times of Job events in the bench namespace: ADDED per Job, and the first time each Job was
    seen Complete."""

    def __init__(self, api) -> None:
        self.api = api
        self.added: dict[str, float] = {}
        self.complete: dict[str, float] = {}
        self.stage_of: dict[str, tuple[str, str]] = {}  # job -> (pipeline, stage)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from kubernetes import client, watch

        batch = client.BatchV1Api(self.api)
        version = None
        while not self._stop.is_set():
            stream = watch.Watch()
            try:
                options = {"resource_version": version} if version else {}
                for event in stream.stream(batch.list_namespaced_job, NAMESPACE, timeout_seconds=10, **options):
                    self._seen(event)
                    if self._stop.is_set():
                        stream.stop()
                version = stream.resource_version  # the next stream continues where this one ended
            except Exception:  # the API server went away (shutdown) or the stream broke: reconnect or stop
                if self._stop.is_set():
                    return
                version = None
                time.sleep(0.5)

    def _seen(self, event: dict) -> None:
        now = time.monotonic()
        job = event["object"]
        name = job.metadata.name
        if event["type"] == "ADDED":
            self.added.setdefault(name, now)
            labels = job.metadata.labels or {}
            self.stage_of[name] = (labels.get("rlhf-operator.io/pipeline", ""),
                                   labels.get("rlhf-operator.io/stage", ""))
        if any(c.type == "Complete" and c.status == "True" for c in job.status.conditions or []):
            self.complete.setdefault(name, now)

    def first_job(self, pipeline: str) -> float | None:
        times = [self.added[j] for j, (p, _) in self.stage_of.items() if p == pipeline]
        return min(times) if times else None

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(15)


def proc_stats(pid: int) -> tuple[float, float, float]:
    """(CPU seconds, RSS MB, peak RSS MB) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return cpu, int(status["VmRSS"].split()[0]) / 1024, int(status["VmHWM"].split()[0]) / 1024


def create(objects, name: str, spec: dict) -> None:
    body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "RLHFPipeline",
            "metadata": {"name": name, "annotations": {"rlhf-operator.io/dry-run": "true"}}, "spec": spec}
    objects.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, body)


def phases(objects) -> dict[str, str]:
    items = objects.list_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL)["items"]
    return {i["metadata"]["name"]: (i.get("status") or {}).get("phase", "") for i in items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency-pipelines", type=int, default=20, help="pipelines for the latency figures")
    parser.add_argument("--pipelines", type=int, default=200, help="pipelines present for the footprint figure")
    parser.add_argument("--gap", type=float, default=1.0, help="seconds between the latency pipelines' creation")
    args = parser.parse_args()

    from kubernetes import client

    workdir = Path(tempfile.mkdtemp(prefix="rlhf-cluster-bench-"))
    (workdir / "owner.pid").write_text(str(os.getpid()))
    cluster = start_local(workdir)
    operator = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "rlhf-operator.io_rlhfpipelines.yaml"))
        cluster.kubectl("wait", "--for=condition=Established", f"crd/{PLURAL}.{GROUP}", "--timeout=60s")
        cluster.kubectl("create", "namespace", NAMESPACE)
        api = cluster.api_client()
        objects = client.CustomObjectsApi(api)
        wait_for(lambda: client.CoreV1Api(api).read_namespaced_service_account("default", NAMESPACE), 60,
                 "the default ServiceAccount")

        log = open(workdir / "operator.log", "wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "rlhf_operator.controller", f"--kubeconfig={cluster.kubeconfig}",
             f"--namespace={NAMESPACE}", f"--port={free_port()}", "--bind=127.0.0.1", "--log-format=text"],
            stdout=log, stderr=subprocess.STDOUT)
        time.sleep(5)  # the operator starts watching
        watch = JobWatch(api)
        watch.thread.start()

        # Latency: pipelines created one by one, three dry-run stages each.
        applied: dict[str, float] = {}
        for index in range(args.latency_pipelines):
            name = f"lat-{index:03d}"
            applied[name] = time.monotonic()
            create(objects, name, THREE_STAGES)
            time.sleep(args.gap)
        wait_for(lambda: all(p == "Succeeded" for p in phases(objects).values()) and len(phases(objects)) ==
                 args.latency_pipelines, 900, "the latency pipelines to succeed", interval_s=1)
        first = [watch.first_job(name) - t for name, t in applied.items() if watch.first_job(name)]
        handover = []
        order = ["sft", "reward", "ppo"]
        by_stage = {v: k for k, v in watch.stage_of.items()}
        for name in applied:
            for before, after in zip(order, order[1:]):
                done, nxt = by_stage.get((name, before)), by_stage.get((name, after))
                if done in watch.complete and nxt in watch.added:
                    handover.append(watch.added[nxt] - watch.complete[done])
        print(f"apply -> first Job: {summary(first)}", flush=True)
        print(f"Job complete -> next stage's Job: {summary(handover)}", flush=True)

        # Footprint: many pipelines present, each one dry-run stage.
        cpu0, _, _ = proc_stats(operator.pid)
        t0 = time.monotonic()
        for index in range(args.pipelines):
            create(objects, f"many-{index:03d}", ONE_STAGE)
        wait_for(lambda: sum(p == "Succeeded" for p in phases(objects).values()) ==
                 args.latency_pipelines + args.pipelines, 3600, "every pipeline to succeed", interval_s=2)
        elapsed = time.monotonic() - t0
        time.sleep(5)  # a quiet moment: what the operator holds with every pipeline present
        cpu1, rss, peak = proc_stats(operator.pid)
        total = args.latency_pipelines + args.pipelines
        print(f"operator with {total} pipelines present: RSS {rss:.0f} MB (peak {peak:.0f} MB), "
              f"CPU {cpu1 - cpu0:.1f} s over {elapsed:.0f} s while {args.pipelines} ran "
              f"({(cpu1 - cpu0) / elapsed:.2f} cores)", flush=True)
        print(f"load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs", flush=True)
        watch.stop()
        return 0
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
