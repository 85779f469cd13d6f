"""Self-tests of the test cluster: the real Job controller, scheduler, RBAC and admission working with the node
agent's local-process pods, hostnames for torch rendezvous, process clean-up, and loopback-only listening."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import time
from pathlib import Path

import pytest
from kubernetes import client

from .processes import free_port, wait_for

pytestmark = pytest.mark.timeout(600)

JOB_TIMEOUT_S = 180
#: The image the pods name. The local node agent pulls nothing and runs the command in this environment; on an
#: existing cluster (kind-e2e.sh) it must hold python with torch and boto3: the trainer image.
IMAGE = os.environ.get("RLHF_TEST_IMAGE", "rlhf-operator/trainer:test")


# ------------------------------------------------------------------------------------------------ helpers
def job_manifest(name: str, script: str, *, backoff_limit: int = 0, env: list[dict] | None = None,
                 resources: dict | None = None, **spec: object) -> dict:
    container = {"name": "main", "image": IMAGE, "command": ["python", "-c", script],
                 "env": env or []}
    if resources:
        container["resources"] = resources
    pod_spec = {"restartPolicy": "Never", "containers": [container]}
    pod_spec.update(spec.pop("pod", {}))
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
        "spec": {"backoffLimit": backoff_limit, "template": {"spec": pod_spec}, **spec},
    }


def job_condition(batch: client.BatchV1Api, namespace: str, name: str, timeout_s: float = JOB_TIMEOUT_S) -> str:
    """Wait for the Job's terminal condition (``Complete`` or ``Failed``); return its type."""
    def terminal() -> str | None:
        job = batch.read_namespaced_job_status(name, namespace)
        for condition in job.status.conditions or []:
            if condition.type in ("Complete", "Failed") and condition.status == "True":
                return condition.type
        return None
    return wait_for(terminal, timeout_s, f"job {namespace}/{name} to finish", interval_s=0.5)


def job_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[client.V1Pod]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}").items
    return sorted(pods, key=lambda pod: pod.metadata.creation_timestamp)


def processes_with(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker.encode() in environ and "zombie" not in state:
            pids.append(int(entry.name))
    return pids


# ------------------------------------------------------------------------------------------------ tests
def test_job_completes_through_the_real_job_controller(k8s_cluster, k8s_api, k8s_namespace: str) -> None:
    """A plain Job whose pod runs ``python -c``: env from a ConfigMap, a Secret and the downward API, a ConfigMap
    volume, a GPU request, and the termination message all reach the pod and come back in its status."""
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    core.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "settings"},
                                                      "data": {"greeting": "hello", "stage.json": '{"lr": 0.1}'}})
    core.create_namespaced_secret(k8s_namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cret"}})
    script = textwrap.dedent("""
        import json, os, ssl, sys, urllib.error, urllib.request
        stage = json.load(open(sys.argv[1]))
        # In-cluster access as client libraries do it: the mounted token and CA, KUBERNETES_SERVICE_HOST/PORT.
        account = "/var/run/secrets/kubernetes.io/serviceaccount"
        namespace = open(f"{account}/namespace").read()
        url = (f"https://{os.environ['KUBERNETES_SERVICE_HOST']}:{os.environ['KUBERNETES_SERVICE_PORT']}"
               f"/api/v1/namespaces/{namespace}/secrets")
        request = urllib.request.Request(url, headers={"Authorization": f"Bearer {open(account + '/token').read()}"})
        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ssl.create_default_context(
                                                 cafile=f"{account}/ca.crt")))
        try:
            api_status = direct.open(request, timeout=30).status
        except urllib.error.HTTPError as error:
            api_status = error.code
        result = {"greeting": os.environ["GREETING"], "token": os.environ["TOKEN"], "pod": os.environ["POD_NAME"],
                  "lr": stage["lr"], "python": sys.executable, "namespace": namespace, "api_status": api_status}
        open("/dev/termination-log", "w").write(json.dumps(result))
    """)
    manifest = job_manifest(
        "hello", script,
        env=[
            {"name": "GREETING", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "greeting"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        ],
        resources={"requests": {"cpu": "100m", "nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}},
        pod={"volumes": [{"name": "config", "configMap": {"name": "settings"}}]},
    )
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    container["args"] = ["/etc/rlhf/stage.json"]
    container["volumeMounts"] = [{"name": "config", "mountPath": "/etc/rlhf"}]
    batch.create_namespaced_job(k8s_namespace, manifest)

    assert job_condition(batch, k8s_namespace, "hello") == "Complete"
    [pod] = job_pods(core, k8s_namespace, "hello")
    assert pod.status.phase == "Succeeded"
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0 and terminated.reason == "Completed"
    result = json.loads(terminated.message)
    assert result["greeting"] == "hello" and result["token"] == "s3cret" and result["pod"] == pod.metadata.name
    assert result["lr"] == 0.1
    assert result["namespace"] == k8s_namespace
    assert result["api_status"] == 403  # authenticated as the namespace's default ServiceAccount: not allowed
    if k8s_cluster.local:
        assert pod.status.pod_ip.startswith("127.0.")
        assert Path(result["python"]).parent == Path(sys.executable).parent  # the project's environment


def test_init_container_empty_dir_and_restart_on_failure(k8s_api, k8s_namespace: str) -> None:
    """An init container prepares an emptyDir; the main container fails once, is restarted in place
    (restartPolicy OnFailure) and then succeeds, as the emptyDir keeps its files across restarts."""
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    script = textwrap.dedent("""
        import os, sys
        assert open("/scratch/prepared").read() == "by init"
        if not os.path.exists("/scratch/first-try"):
            open("/scratch/first-try", "w").close()
            sys.exit(1)
    """)
    manifest = job_manifest("retry", script, backoff_limit=3, pod={
        "restartPolicy": "OnFailure",
        "volumes": [{"name": "scratch", "emptyDir": {}}],
        "initContainers": [{"name": "prepare", "image": IMAGE, "command": [
            "python", "-c", "open('/scratch/prepared', 'w').write('by init')"],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
    })
    manifest["spec"]["template"]["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "scratch", "mountPath": "/scratch"}]
    batch.create_namespaced_job(k8s_namespace, manifest)

    assert job_condition(batch, k8s_namespace, "retry") == "Complete"
    [pod] = job_pods(core, k8s_namespace, "retry")
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert pod.status.container_statuses[0].restart_count == 1
    assert pod.status.container_statuses[0].state.terminated.exit_code == 0


def test_failing_command_fails_the_job_after_its_backoff_limit(k8s_api, k8s_namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    script = "import sys; print('failing on purpose', file=sys.stderr); sys.exit(3)"
    batch.create_namespaced_job(k8s_namespace, job_manifest("fails", script, backoff_limit=1))

    assert job_condition(batch, k8s_namespace, "fails") == "Failed"
    job = batch.read_namespaced_job_status("fails", k8s_namespace)
    failed = next(c for c in job.status.conditions if c.type == "Failed")
    assert failed.reason == "BackoffLimitExceeded"
    assert job.status.failed == 2  # the first try and one retry
    pods = job_pods(core, k8s_namespace, "fails")
    assert len(pods) == 2
    for pod in pods:
        assert pod.status.phase == "Failed"
        assert pod.status.container_statuses[0].state.terminated.exit_code == 3


GLOO_SCRIPT = textwrap.dedent("""
    import json, os, socket
    from datetime import timedelta
    import torch
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    master = os.environ["MASTER_ADDR"]
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{os.environ['MASTER_PORT']}",
                            rank=rank, world_size=world, timeout=timedelta(seconds=120))
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor)
    dist.barrier()
    dist.destroy_process_group()
    with open(os.environ["TERMINATION_LOG"], "w") as out:
        json.dump({"sum": tensor.item(), "hostname": socket.gethostname(),
                   "master_ip": socket.gethostbyname(master), "own_ip": socket.gethostbyname(socket.gethostname())},
                  out)
""")


def test_indexed_job_under_headless_service_does_gloo_all_reduce(k8s_api, k8s_namespace: str) -> None:
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    core.create_namespaced_service(k8s_namespace, {
        "metadata": {"name": "workers"},
        "spec": {"clusterIP": "None", "selector": {"batch.kubernetes.io/job-name": "ddp"},
                 "ports": [{"name": "rendezvous", "port": 29500}]},
    })
    env = [
        {"name": "MASTER_ADDR", "value": "ddp-0.workers"},
        {"name": "MASTER_PORT", "value": str(free_port())},
        {"name": "WORLD_SIZE", "value": "2"},
        {"name": "RANK", "valueFrom": {"fieldRef": {
            "fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
        {"name": "TERMINATION_LOG", "value": "/dev/termination-log"},
    ]
    manifest = job_manifest("ddp", GLOO_SCRIPT, env=env, completions=2, parallelism=2, completionMode="Indexed",
                            pod={"subdomain": "workers"})
    batch.create_namespaced_job(k8s_namespace, manifest)

    assert job_condition(batch, k8s_namespace, "ddp") == "Complete"
    pods = {int(p.metadata.annotations["batch.kubernetes.io/job-completion-index"]): p
            for p in job_pods(core, k8s_namespace, "ddp")}
    assert sorted(pods) == [0, 1]
    ips = {index: pod.status.pod_ip for index, pod in pods.items()}
    assert ips[0] != ips[1]
    for index, pod in pods.items():
        result = json.loads(pod.status.container_statuses[0].state.terminated.message)
        assert result["sum"] == 3.0  # 1 + 2
        assert result["hostname"] == f"ddp-{index}"
        assert result["own_ip"] == ips[index]
        assert result["master_ip"] == ips[0]


def test_deleting_a_running_job_kills_its_processes(k8s_cluster, k8s_api, k8s_namespace: str,
                                                     tmp_path: Path) -> None:
    """The pod's main process ignores SIGTERM and has a child: after the grace period both are gone."""
    if not k8s_cluster.local:
        pytest.skip("inspects the pod's local processes")
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    marker = tmp_path / "got-sigterm"
    script = textwrap.dedent(f"""
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, lambda *_: open({str(marker)!r}, "w").write("SIGTERM"))
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("running", flush=True)
        while True:
            time.sleep(1)
    """)
    grace_s = 3
    batch.create_namespaced_job(
        k8s_namespace, job_manifest("sleeper", script, pod={"terminationGracePeriodSeconds": grace_s})
    )

    def running_pod() -> client.V1Pod | None:
        pods = job_pods(core, k8s_namespace, "sleeper")
        return pods[0] if pods and pods[0].status.phase == "Running" else None

    pod = wait_for(running_pod, JOB_TIMEOUT_S, "the sleeper pod to run", interval_s=0.5)
    pids = wait_for(lambda: len(processes_with(pod.metadata.uid)) >= 2 and processes_with(pod.metadata.uid), 60,
                    "the pod's process and its child")

    deleted_at = time.monotonic()
    batch.delete_namespaced_job("sleeper", k8s_namespace, propagation_policy="Background")
    wait_for(lambda: not processes_with(pod.metadata.uid), 60, f"processes {pids} to be gone", interval_s=0.2)
    elapsed = time.monotonic() - deleted_at
    assert marker.read_text() == "SIGTERM"
    assert elapsed >= grace_s - 0.5, "SIGKILL came before the grace period ended"
    wait_for(lambda: not job_pods(core, k8s_namespace, "sleeper"), 60, "the pod object to be deleted")


def test_kubectl_shows_the_node_ready(k8s_cluster) -> None:
    out = k8s_cluster.kubectl("get", "nodes", "--no-headers").stdout
    rows = [line.split() for line in out.splitlines()]
    assert {row[0] for row in rows} == set(k8s_cluster.nodes)
    assert all(row[1] == "Ready" for row in rows), out
    if k8s_cluster.local:
        from . import binaries

        version = binaries.versions()["KUBERNETES_VERSION"]
        node = json.loads(k8s_cluster.kubectl("get", "node", k8s_cluster.nodes[0], "-o", "json").stdout)
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "4"
        versions = json.loads(k8s_cluster.kubectl("version", "-o", "json").stdout)
        assert versions["serverVersion"]["gitVersion"] == version
        assert versions["clientVersion"]["gitVersion"] == version


def test_service_account_needs_a_role_binding_to_list_jobs(k8s_api, k8s_namespace: str, as_service_account,
                                                          k8s_cluster) -> None:
    worker = as_service_account("worker", k8s_namespace)
    jobs_as_worker = client.BatchV1Api(worker.api_client)
    with pytest.raises(client.ApiException) as forbidden:
        jobs_as_worker.list_namespaced_job(k8s_namespace)
    assert forbidden.value.status == 403
    assert k8s_cluster.kubectl("auth", "can-i", "list", "jobs", kubeconfig=worker.kubeconfig,
                               check=False).stdout.strip() == "no"

    rbac = client.RbacAuthorizationV1Api(k8s_api)
    rbac.create_namespaced_role(k8s_namespace, {
        "metadata": {"name": "job-reader"},
        "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["get", "list", "watch"]}],
    })
    rbac.create_namespaced_role_binding(k8s_namespace, {
        "metadata": {"name": "worker-reads-jobs"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "job-reader"},
        "subjects": [{"kind": "ServiceAccount", "name": "worker", "namespace": k8s_namespace}],
    })
    wait_for(lambda: jobs_as_worker.list_namespaced_job(k8s_namespace) is not None, 30, "the binding to apply")
    assert k8s_cluster.kubectl("auth", "can-i", "list", "jobs", kubeconfig=worker.kubeconfig).stdout.strip() == "yes"
    with pytest.raises(client.ApiException) as still_forbidden:  # only what the Role grants
        client.CoreV1Api(worker.api_client).list_namespaced_secret(k8s_namespace)
    assert still_forbidden.value.status == 403


def test_pod_reaches_s3_with_credentials_from_a_secret(k8s_api, k8s_namespace: str, pod_s3) -> None:
    batch = client.BatchV1Api(k8s_api)
    script = textwrap.dedent(f"""
        import os, boto3
        from botocore.config import Config
        s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT"], region_name={pod_s3.region!r},
                          config=Config(s3={{"addressing_style": "path"}}))
        s3.put_object(Bucket={pod_s3.bucket!r}, Key="from-pod.txt", Body=b"written by a pod")
    """)
    secret_env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": pod_s3.secret_name, "key": key}}}
                  for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]
    env = [{"name": "S3_ENDPOINT", "value": pod_s3.endpoint}, *secret_env]
    batch.create_namespaced_job(k8s_namespace, job_manifest("uploader", script, env=env))
    assert job_condition(batch, k8s_namespace, "uploader") == "Complete"

    import boto3
    from botocore.config import Config

    s3 = boto3.client("s3", endpoint_url=pod_s3.endpoint, region_name=pod_s3.region,
                      aws_access_key_id=pod_s3.access_key, aws_secret_access_key=pod_s3.secret_key,
                      config=Config(s3={"addressing_style": "path"}))
    assert s3.get_object(Bucket=pod_s3.bucket, Key="from-pod.txt")["Body"].read() == b"written by a pod"


# ------------------------------------------------------------------------------------------------ loopback only
def _listening_sockets() -> dict[str, str]:
    """socket inode -> "address:port" for every listening TCP socket and bound UDP socket in /proc/net."""
    found = {}
    for name, wanted_state in (("tcp", "0A"), ("tcp6", "0A"), ("udp", "07"), ("udp6", "07")):
        try:
            lines = Path(f"/proc/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] != wanted_state:
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            if len(raw) == 4:
                address = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:
                words = [raw[i:i + 4][::-1] for i in range(0, 16, 4)]
                address = socket.inet_ntop(socket.AF_INET6, b"".join(words))
            found[fields[9]] = f"{address}:{int(port_hex, 16)}"
    return found


def _descendants(pids: set[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text().splitlines()
                ppid = int(next(line for line in status if line.startswith("PPid:")).split()[1])
            except (OSError, StopIteration, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo += children.get(pid, [])
    return out


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[len("socket:["):-1])
    except OSError:
        pass
    return inodes


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0]
    return host.startswith("127.") or host in ("::1", "::ffff:127.0.0.1") or host.startswith("::ffff:127.")


LISTENER_SCRIPT = textwrap.dedent("""
    import socket, time
    servers = [socket.socket(socket.AF_INET6), socket.socket(socket.AF_INET)]
    servers[0].bind(("::", 0))
    servers[1].bind(("0.0.0.0", 0))
    for server in servers:
        server.listen()
    print("listening", [s.getsockname() for s in servers], flush=True)
    time.sleep(600)
""")


def test_nothing_listens_beyond_loopback(k8s_cluster, k8s_api, k8s_namespace: str, s3_server) -> None:
    """Every socket the harness's processes listen on (control plane, node agent, S3 server, and a pod that binds
    the wildcard address, as torch's TCPStore does) is on a loopback address."""
    if not k8s_cluster.local:
        pytest.skip("only the local cluster's processes are ours to inspect")
    core, batch = client.CoreV1Api(k8s_api), client.BatchV1Api(k8s_api)
    batch.create_namespaced_job(k8s_namespace, job_manifest("listener", LISTENER_SCRIPT))
    pod = wait_for(lambda: next((p for p in job_pods(core, k8s_namespace, "listener") if p.status.phase == "Running"),
                                None), JOB_TIMEOUT_S, "the listener pod to run", interval_s=0.5)
    roots = {p.pid for p in k8s_cluster.processes() if p.pid}
    if s3_server.process is not None:
        roots.add(s3_server.process.pid)

    def our_listeners() -> dict[str, int]:
        listening = _listening_sockets()
        ours = {}
        for pid in _descendants(roots):
            for inode in _socket_inodes(pid):
                if inode in listening:
                    ours[listening[inode]] = pid
        return ours

    def on_pod_ip(address: str) -> bool:
        return address.rsplit(":", 1)[0] in (pod.status.pod_ip, f"::ffff:{pod.status.pod_ip}")

    def with_pod_sockets() -> dict[str, int] | None:
        found = our_listeners()
        return found if sum(map(on_pod_ip, found)) >= 2 else None

    ours = wait_for(with_pod_sockets, 60, "the listener pod's two sockets on its own address")
    apiserver_port = int(k8s_cluster.control_plane.server.rsplit(":", 1)[1])
    assert f"127.0.0.1:{apiserver_port}" in ours, f"found no API server socket in {ours}"
    beyond = {addr: pid for addr, pid in ours.items() if not _is_loopback(addr)}
    assert not beyond, f"listening beyond loopback: {beyond}"
