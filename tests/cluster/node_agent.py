"""A stand-in for the kubelet of the test cluster: registers Nodes and runs the pods bound to them as local
processes.

What it does, per node:
- creates the Node with capacity/allocatable (cpu, memory, pods, ephemeral-storage and a fake ``nvidia.com/gpu``
  count, so GPU requests schedule), the Ready condition, and keeps both its status and its Lease in
  ``kube-node-lease`` renewed;
- for each pod bound to it: runs each container's ``command`` + ``args`` as a local process in this Python
  environment, with this checkout's packages (``PYTHONPATH`` is passed on). **The image is never pulled**:
  ``command`` must name a program that exists here (``python``, ``rlhf-train``, ...); a container without
  ``command`` fails with reason ``NoCommand``. Init containers run first, in order.
- env: ``value`` (with ``$(VAR)`` expansion), ``valueFrom`` secretKeyRef / configMapKeyRef / fieldRef (including
  ``metadata.annotations['batch.kubernetes.io/job-completion-index']``) / resourceFieldRef, and ``envFrom``;
- volumes: configMap, secret, emptyDir, downwardAPI and projected (service-account token, configMap, secret,
  downwardAPI) are materialised under ``<workdir>/pods/<ns>_<pod>_<uid>/volumes/<volume>``; hostPath is the host
  path itself. Each container starts through ``pod_init.py``, which mounts them (and the termination-message file)
  at their ``mountPath`` in the container's own mount namespace, so ``/dev/termination-log`` and
  ``/var/run/secrets/kubernetes.io/serviceaccount`` work as in a cluster; only a mountPath that would need a new
  top-level directory (``/data``, say) is instead rewritten to the materialised directory wherever it occurs in
  command, args, env values and ``workingDir``, as every mountPath is when namespaces are not permitted.
  ``RLHF_TERMINATION_MESSAGE_PATH`` holds the termination-message file's real path.
- status: Running with a 127.0.0.x podIP and Ready conditions, then Succeeded/Failed with containerStatuses exit
  codes, reasons and the termination message (file first; the log tail with ``FallbackToLogsOnError``);
  restartPolicy OnFailure/Always restarts the container in place.
- deletion: SIGTERM to the container's process group, SIGKILL after the grace period, then the final delete.
- network: pods share the machine's network; each gets its own 127.0.0.x address (all of 127/8 is loopback on
  Linux), and ``podnet.c``, compiled at start and loaded with LD_PRELOAD, turns a bind() to the wildcard address
  into a bind() to that address, so a pod's servers (torch's TCPStore binds ``[::]``) stay on loopback;
- hostnames: each container runs in its own mount and UTS namespace (root only) whose hostname is the
  pod's hostname and whose ``/etc/hosts`` is a per-pod file (bind-mounted, nothing global changes) naming the pod
  itself and every running pod with ``spec.hostname`` + ``spec.subdomain`` under a headless Service of that name,
  as ``<hostname>.<subdomain>``, ``...<ns>``, ``...<ns>.svc`` and ``...<ns>.svc.cluster.local``, the way cluster
  DNS answers for an Indexed Job's pods. Without root, pods run without namespaces and these names do not resolve.

Not supported (the tests do not need them): image pulls, exec/logs/port-forward through the API, probes (a running
container is Ready), resource limits, PersistentVolumeClaims, sidecar restart semantics.

usage: python node_agent.py --kubeconfig FILE --workdir DIR --node NAME [--node NAME ...] [--gpus N] ...
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger("node-agent")

COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
CLUSTER_DOMAIN = "cluster.local"
LEASE_DURATION_S = 40
HEARTBEAT_S = 10.0
TICK_S = 0.3
MAX_TERMINATION_MESSAGE = 4096
#: The Python client would send a dict body as a JSON patch; the kubelet uses strategic merge patches.
SMP = "application/strategic-merge-patch+json"
#: Environment the agent passes on to every container (a real kubelet passes nothing; a local process needs PATH
#: and the machine's numeric-library settings).
#: PYTHONPATH: scripts/in-venv puts the calling checkout's packages first on it. The virtualenv is shared by every
#: checkout on the machine and its editable install points at whichever one last ran scripts/in-venv, so without it
#: the pods would import another checkout's code.
PASSTHROUGH_ENV = ("PATH", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
                   "OMP_NUM_THREADS", "MKL_NUM_THREADS", "VIRTUAL_ENV")
PASSTHROUGH_PREFIXES = ("RLHF_", "HF_", "TRANSFORMERS_", "TORCH_")


POD_INIT = Path(__file__).resolve().parent / "pod_init.py"
_NAMESPACE_PROBE = """
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000 | 0x04000000) != 0:
    sys.exit(os.strerror(ctypes.get_errno()))
if libc.mount(None, b"/", None, (1 << 14) | (1 << 18), None) != 0:
    sys.exit(os.strerror(ctypes.get_errno()))
"""


def _mountable(path: str) -> bool:
    """Whether pod_init.py can mount at ``path``: it exists, or its nearest existing ancestor is not ``/`` (it
    never creates top-level directories, which would outlive the namespace)."""
    if os.path.exists(path):
        return True
    ancestor = os.path.dirname(os.path.normpath(path))
    while not os.path.isdir(ancestor):
        ancestor = os.path.dirname(ancestor)
    return os.path.realpath(ancestor) != "/"


def now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def rfc3339(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


# ---------------------------------------------------------------------------------------------- env and paths
class ConfigError(Exception):
    """The pod cannot start yet (a referenced ConfigMap/Secret/key is missing): the kubelet's
    CreateContainerConfigError. Retried on later ticks."""


_VAR_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are substituted, ``$$`` escapes, others stay."""
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))
    return _VAR_REF.sub(replace, value)


def rewrite_paths(value: str, mounts: list[tuple[str, str]]) -> str:
    """Replace each container path (as a whole path prefix) by its host path, in one pass, longest path first."""
    if not mounts:
        return value
    table = {container.rstrip("/") or "/": host for container, host in mounts}
    alternatives = "|".join(re.escape(path) for path in sorted(table, key=len, reverse=True))
    pattern = r"(?<![\w./-])(" + alternatives + r")(?=/|$|[^\w.-])"
    return re.sub(pattern, lambda match: table[match.group(1)], value)


_FIELD_KEY = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


def field_value(pod: dict, path: str) -> str:
    match = _FIELD_KEY.match(path)
    if match:
        return (pod["metadata"].get(match.group(1)) or {}).get(match.group(2), "")
    simple = {
        "metadata.name": pod["metadata"]["name"],
        "metadata.namespace": pod["metadata"]["namespace"],
        "metadata.uid": pod["metadata"]["uid"],
        "spec.nodeName": pod["spec"].get("nodeName", ""),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
        "status.podIP": (pod.get("status") or {}).get("podIP", ""),
        "status.podIPs": (pod.get("status") or {}).get("podIP", ""),
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path not in simple:
        raise ConfigError(f"unsupported fieldRef {path!r}")
    return simple[path]


def _quantity(value: str) -> float:
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
                "Ti": 2**40}
    for suffix in sorted(suffixes, key=len, reverse=True):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * suffixes[suffix]
    return float(value)


# ---------------------------------------------------------------------------------------------- pod state
@dataclass
class ContainerRun:
    spec: dict
    init: bool
    log_path: Path
    termination_path: Path
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    mounts: list[dict] = field(default_factory=list)  # for pod_init.py
    process: subprocess.Popen[bytes] | None = None
    started_at: datetime.datetime | None = None
    finished_at: datetime.datetime | None = None
    exit_code: int | None = None
    restart_count: int = 0
    restart_after: float = 0.0
    reason: str = ""
    message: str = ""

    @property
    def name(self) -> str:
        return self.spec["name"]

    def running(self) -> bool:
        return self.process is not None and self.exit_code is None


@dataclass
class PodRun:
    uid: str
    namespace: str
    name: str
    node: str
    directory: Path
    ip: str
    hostname: str
    subdomain: str
    hosts_file: Path
    restart_policy: str
    init_containers: list[ContainerRun]
    containers: list[ContainerRun]
    started_at: datetime.datetime
    phase: str = "Pending"
    terminating_since: float | None = None
    kill_deadline: float | None = None
    reported: dict | None = None
    deleted: bool = False

    def all_runs(self) -> list[ContainerRun]:
        return [*self.init_containers, *self.containers]


# ---------------------------------------------------------------------------------------------- the agent
class NodeAgent:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.nodes: list[str] = args.node
        self.workdir = Path(args.workdir)
        self.pods_dir = self.workdir / "pods"
        self.pods_dir.mkdir(parents=True, exist_ok=True)
        self.logs_dir = Path(args.logs_dir) if args.logs_dir else self.workdir / "pod-logs"
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        config.load_kube_config(config_file=args.kubeconfig)
        self.core = client.CoreV1Api(client.ApiClient())
        self.api = client.ApiClient()
        self.pods: dict[str, PodRun] = {}
        # Pod addresses, from a random starting point so that two test sessions on one machine rarely collide.
        pool = [f"127.0.0.{i}" for i in range(10, 255)]
        start = random.randrange(len(pool))
        self.free_ips = pool[start:] + pool[:start] + [f"127.0.1.{i}" for i in range(1, 255)]
        self.stopping = threading.Event()
        self.use_namespaces = self._namespaces_work()
        self.podnet = self._build_podnet()
        self.apiserver_port = str(client.Configuration.get_default_copy().host.rsplit(":", 1)[-1])
        self.bin_dir = str(Path(sys.executable).parent)

    @staticmethod
    def _namespaces_work() -> bool:
        probe = subprocess.run([sys.executable, "-c", _NAMESPACE_PROBE], capture_output=True)
        if probe.returncode != 0:
            log.warning("new mount/UTS namespaces are not permitted (%s): pods run without their own /etc/hosts, "
                        "hostname and mounts, so Indexed Job hostnames do not resolve and volume paths are "
                        "rewritten", probe.stderr.decode().strip())
        return probe.returncode == 0

    def _build_podnet(self) -> str | None:
        """Compile podnet.c (binds of the wildcard address go to the pod's IP); None without a C compiler."""
        source = Path(__file__).resolve().parent / "podnet.c"
        target = self.workdir / "podnet.so"
        compiler = shutil.which("cc") or shutil.which("gcc")
        if compiler is None:
            log.warning("no C compiler: pods that bind the wildcard address will listen beyond loopback")
            return None
        subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(target), str(source), "-ldl"], check=True)
        return str(target)

    # ---------------------------------------------------------------- nodes and leases
    def node_status(self) -> dict:
        capacity = {
            "cpu": str(self.args.cpu),
            "memory": self.args.memory,
            "pods": str(self.args.max_pods),
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.args.gpus),
        }
        stamp = rfc3339(now())

        def condition(kind: str, status: str, reason: str, message: str) -> dict:
            return {"type": kind, "status": status, "reason": reason, "message": message,
                    "lastHeartbeatTime": stamp, "lastTransitionTime": self.started}

        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "node agent: no pressure"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "node agent: no pressure"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "node agent: no pressure"),
                condition("Ready", "True", "KubeletReady", "the test node agent is posting ready status"),
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "", "systemUUID": "", "bootID": "", "kernelVersion": os.uname().release,
                "osImage": "local processes (rlhf-operator test node agent)",
                "containerRuntimeVersion": "local-process://1",
                "kubeletVersion": self.args.kubelet_version, "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    def register_nodes(self) -> None:
        self.started = rfc3339(now())
        for name in self.nodes:
            body = {
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": {
                    "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "local-process",
                }},
            }
            try:
                self.core.create_node(body)
            except ApiException as error:
                if error.status != 409:
                    raise
            self.core.patch_node_status(name, {"status": self.node_status()}, _content_type=SMP)
            self.renew_lease(name, self.api)
            log.info("registered node %s", name)

    def renew_lease(self, name: str, api: client.ApiClient) -> None:
        coordination = client.CoordinationV1Api(api)
        stamp = now().strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        spec = {"holderIdentity": name, "leaseDurationSeconds": LEASE_DURATION_S, "renewTime": stamp}
        try:
            coordination.patch_namespaced_lease(name, "kube-node-lease", {"spec": spec}, _content_type=SMP)
        except ApiException as error:
            if error.status != 404:
                raise
            node = client.CoreV1Api(api).read_node(name)
            coordination.create_namespaced_lease("kube-node-lease", {
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "ownerReferences": [
                    {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node.metadata.uid}]},
                "spec": {**spec, "acquireTime": stamp},
            })

    def heartbeat_loop(self) -> None:
        api = client.ApiClient()
        core = client.CoreV1Api(api)
        while not self.stopping.wait(HEARTBEAT_S):
            for name in self.nodes:
                try:
                    core.patch_node_status(name, {"status": self.node_status()}, _content_type=SMP)
                    self.renew_lease(name, api)
                except Exception:  # noqa: BLE001 - keep beating; the API server may be briefly busy
                    log.exception("heartbeat for node %s failed", name)

    # ---------------------------------------------------------------- main loop
    def run(self) -> None:
        self.register_nodes()
        threading.Thread(target=self.heartbeat_loop, name="heartbeat", daemon=True).start()
        while not self.stopping.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - one bad tick must not kill the node
                log.exception("reconcile failed")
            self.stopping.wait(TICK_S)
        self.shutdown()

    def list_pods(self) -> list[dict]:
        pods = []
        for name in self.nodes:
            response = self.core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}",
                                                             _preload_content=False)
            pods += _json(response)["items"]
        return pods

    def tick(self) -> None:
        api_pods = {pod["metadata"]["uid"]: pod for pod in self.list_pods()}
        headless = self.headless_services()
        # Pods gone from the API: stop what is left of them at once.
        for uid in list(self.pods):
            if uid not in api_pods:
                run = self.pods.pop(uid)
                self.kill(run, signal.SIGKILL)
                self.forget(run)
        for uid, pod in api_pods.items():
            run = self.pods.get(uid)
            phase = (pod.get("status") or {}).get("phase", "Pending")
            deleting = pod["metadata"].get("deletionTimestamp") is not None
            if run is None:
                if deleting or phase in ("Succeeded", "Failed"):
                    if deleting:
                        self.final_delete(pod)
                    continue
                try:
                    run = self.prepare(pod)
                except ConfigError as error:
                    self.report_waiting(pod, "CreateContainerConfigError", str(error))
                    continue
                self.pods[uid] = run
            if deleting and run.terminating_since is None:
                grace = pod["metadata"].get("deletionGracePeriodSeconds")
                grace = 30 if grace is None else int(grace)
                run.terminating_since = time.monotonic()
                run.kill_deadline = run.terminating_since + grace
                log.info("pod %s/%s deleted: SIGTERM, SIGKILL after %d s", run.namespace, run.name, grace)
                self.kill(run, signal.SIGTERM)
            self.step(run, pod)
        self.update_hosts(headless)

    def headless_services(self) -> set[tuple[str, str]]:
        response = client.CoreV1Api(self.api).list_service_for_all_namespaces(_preload_content=False)
        return {
            (svc["metadata"]["namespace"], svc["metadata"]["name"])
            for svc in _json(response)["items"]
            if svc["spec"].get("clusterIP") == "None"
        }

    # ---------------------------------------------------------------- starting a pod
    def prepare(self, pod: dict) -> PodRun:
        meta, spec = pod["metadata"], pod["spec"]
        directory = self.pods_dir / f"{meta['namespace']}_{meta['name']}_{meta['uid']}"
        directory.mkdir(parents=True, exist_ok=True)
        volumes = self.materialise_volumes(pod, directory / "volumes")  # may raise ConfigError: nothing started yet
        ip = self.free_ips.pop(0)
        hostname = (spec.get("hostname") or meta["name"])[:63]
        pod_for_env = {**pod, "status": {**(pod.get("status") or {}), "podIP": ip}}

        def runs(key: str, init: bool) -> list[ContainerRun]:
            out = []
            for container in spec.get(key) or []:
                cdir = directory / "containers" / container["name"]
                cdir.mkdir(parents=True, exist_ok=True)
                termination = cdir / "termination-log"
                termination.touch()
                log_path = self.logs_dir / f"{meta['namespace']}_{meta['name']}_{container['name']}.log"
                run = ContainerRun(container, init, log_path, termination)
                try:
                    self.resolve(run, pod_for_env, volumes, directory, hostname)
                except ConfigError:
                    self.free_ips.insert(0, ip)
                    raise
                out.append(run)
            return out

        init_runs = runs("initContainers", True)
        main_runs = runs("containers", False)
        run = PodRun(
            uid=meta["uid"], namespace=meta["namespace"], name=meta["name"], node=spec["nodeName"],
            directory=directory, ip=ip, hostname=hostname, subdomain=spec.get("subdomain", ""),
            hosts_file=directory / "etc-hosts", restart_policy=spec.get("restartPolicy", "Always"),
            init_containers=init_runs, containers=main_runs, started_at=now(),
        )
        run.hosts_file.write_text(self.hosts_content(run, {}))
        log.info("pod %s/%s: ip %s, hostname %s", run.namespace, run.name, ip, hostname)
        return run

    def materialise_volumes(self, pod: dict, root: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        paths: dict[str, Path] = {}
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            target = root / name
            if "hostPath" in volume:
                paths[name] = Path(volume["hostPath"]["path"])
                continue
            target.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                self.write_items(target, self.config_data(namespace, volume["configMap"], secret=False),
                                 volume["configMap"].get("items"))
            elif "secret" in volume:
                source = {**volume["secret"], "name": volume["secret"].get("secretName")}
                self.write_items(target, self.config_data(namespace, source, secret=True), source.get("items"))
            elif "downwardAPI" in volume:
                for item in volume["downwardAPI"].get("items") or []:
                    self.write_file(target / item["path"], self.downward(pod, item).encode())
            elif "projected" in volume:
                for source in volume["projected"].get("sources") or []:
                    if "serviceAccountToken" in source:
                        token = self.service_account_token(pod, source["serviceAccountToken"])
                        self.write_file(target / source["serviceAccountToken"]["path"], token.encode())
                    elif "configMap" in source:
                        self.write_items(target, self.config_data(namespace, source["configMap"], secret=False),
                                         source["configMap"].get("items"))
                    elif "secret" in source:
                        self.write_items(target, self.config_data(namespace, source["secret"], secret=True),
                                         source["secret"].get("items"))
                    elif "downwardAPI" in source:
                        for item in source["downwardAPI"].get("items") or []:
                            self.write_file(target / item["path"], self.downward(pod, item).encode())
            elif "emptyDir" not in volume:
                log.warning("volume %s of pod %s: unsupported kind, given an empty directory", name,
                            pod["metadata"]["name"])
            paths[name] = target
        return paths

    def downward(self, pod: dict, item: dict) -> str:
        if "fieldRef" in item:
            return field_value(pod, item["fieldRef"]["fieldPath"])
        raise ConfigError("downwardAPI resourceFieldRef volumes are not supported")

    def service_account_token(self, pod: dict, source: dict) -> str:
        request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {
            "expirationSeconds": source.get("expirationSeconds", 3607),
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": pod["metadata"]["name"],
                               "uid": pod["metadata"]["uid"]},
        }}
        if source.get("audience"):
            request["spec"]["audiences"] = [source["audience"]]
        response = self.core.create_namespaced_service_account_token(
            pod["spec"].get("serviceAccountName", "default"), pod["metadata"]["namespace"], request,
            _preload_content=False,
        )
        return _json(response)["status"]["token"]

    def config_data(self, namespace: str, ref: dict, *, secret: bool) -> dict[str, bytes]:
        """The data of the referenced ConfigMap/Secret as bytes; {} if it is optional and missing."""
        name = ref.get("name")
        try:
            if secret:
                obj = _json(self.core.read_namespaced_secret(name, namespace, _preload_content=False))
                return {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
            obj = _json(self.core.read_namespaced_config_map(name, namespace, _preload_content=False))
            data = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
            return data
        except ApiException as error:
            if error.status == 404 and ref.get("optional"):
                return {}
            if error.status == 404:
                raise ConfigError(f"{'secret' if secret else 'configmap'} {name!r} not found") from None
            raise

    def write_items(self, target: Path, data: dict[str, bytes], items: list[dict] | None) -> None:
        if items:
            for item in items:
                if item["key"] not in data:
                    raise ConfigError(f"key {item['key']!r} not found")
                self.write_file(target / item["path"], data[item["key"]])
        else:
            for key, value in data.items():
                self.write_file(target / key, value)

    @staticmethod
    def write_file(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def resolve(self, run: ContainerRun, pod: dict, volumes: dict[str, Path], directory: Path, hostname: str) -> None:
        container, namespace = run.spec, pod["metadata"]["namespace"]
        wanted = []  # (container path, host path, read only)
        for mount in container.get("volumeMounts") or []:
            if mount["name"] not in volumes:
                raise ConfigError(f"volume {mount['name']!r} not found")
            host = volumes[mount["name"]]
            if mount.get("subPath"):
                host = host / mount["subPath"]
                if not host.exists():
                    host.mkdir(parents=True)
            wanted.append((mount["mountPath"], str(host), bool(mount.get("readOnly"))))
        termination_path = container.get("terminationMessagePath") or "/dev/termination-log"
        wanted.append((termination_path, str(run.termination_path), False))
        # In the container's own mount namespace (pod_init.py) a path is mounted where the pod expects it, unless
        # that would need a new top-level directory on this machine; such paths, and all paths when there are no
        # namespaces, are rewritten in command, args and env instead.
        run.mounts = []
        mounts: list[tuple[str, str]] = []
        for container_path, host_path, read_only in wanted:
            if self.use_namespaces and _mountable(container_path):
                run.mounts.append({"source": host_path, "target": container_path, "read_only": read_only})
            else:
                mounts.append((container_path, host_path))

        env: dict[str, str] = {k: v for k, v in os.environ.items()
                               if k in PASSTHROUGH_ENV or k.startswith(PASSTHROUGH_PREFIXES)}
        env["PATH"] = f"{self.bin_dir}:{env.get('PATH', '/usr/local/bin:/usr/bin:/bin')}"
        home = directory / "home"
        tmp = directory / "tmp"
        home.mkdir(exist_ok=True)
        tmp.mkdir(exist_ok=True)
        env.update({
            "HOME": str(home), "TMPDIR": str(tmp), "HOSTNAME": hostname,
            "KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": self.apiserver_port,
            "RLHF_TERMINATION_MESSAGE_PATH": str(run.termination_path), "RLHF_POD_DIR": str(directory),
            "RLHF_POD_IP": pod["status"]["podIP"],
        })
        if self.podnet:
            env["LD_PRELOAD"] = self.podnet
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "configMapRef" in source:
                data = self.config_data(namespace, source["configMapRef"], secret=False)
            else:
                data = self.config_data(namespace, source["secretRef"], secret=True)
            env.update({prefix + k: v.decode() for k, v in data.items()})
        for var in container.get("env") or []:
            env[var["name"]] = self.env_value(var, pod, container, env)
        if self.podnet and env.get("LD_PRELOAD") != self.podnet:  # the pod set its own: keep ours first
            env["LD_PRELOAD"] = f"{self.podnet}:{env['LD_PRELOAD']}"
        env = {k: rewrite_paths(v, mounts) for k, v in env.items()}

        command = container.get("command") or []  # empty: spawn() fails the container (no image to run)
        run.argv = [rewrite_paths(expand(arg, env), mounts) for arg in [*command, *(container.get("args") or [])]]
        run.env = env
        working_dir = container.get("workingDir")
        if working_dir:
            working_dir = rewrite_paths(working_dir, mounts)
            if not os.path.isdir(working_dir) and not (self.use_namespaces and _mountable(working_dir)):
                working_dir = str(directory / "rootfs" / working_dir.lstrip("/"))
                os.makedirs(working_dir, exist_ok=True)
        else:
            working_dir = str(directory / "rootfs")
            os.makedirs(working_dir, exist_ok=True)
        run.cwd = working_dir

    def env_value(self, var: dict, pod: dict, container: dict, env: dict[str, str]) -> str:
        if "valueFrom" not in var:
            return expand(var.get("value", ""), env)
        source = var["valueFrom"]
        namespace = pod["metadata"]["namespace"]
        for kind, secret in (("secretKeyRef", True), ("configMapKeyRef", False)):
            if kind in source:
                ref = source[kind]
                data = self.config_data(namespace, ref, secret=secret)
                if ref["key"] not in data:
                    if ref.get("optional"):
                        return ""
                    raise ConfigError(f"key {ref['key']!r} not found in {kind} {ref.get('name')!r}")
                return data[ref["key"]].decode()
        if "fieldRef" in source:
            return field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            ref = source["resourceFieldRef"]
            kind, _, resource = ref["resource"].partition(".")
            value = ((container.get("resources") or {}).get(kind) or {}).get(resource)
            if value is None:
                value = {"cpu": str(self.args.cpu), "memory": self.args.memory}.get(resource, "0")
            divisor = _quantity(ref.get("divisor", "1") or "1")
            return str(math.ceil(_quantity(str(value)) / divisor))
        raise ConfigError(f"unsupported valueFrom in env {var['name']!r}")

    # ---------------------------------------------------------------- running
    def spawn(self, run: PodRun, container: ContainerRun) -> None:
        argv = container.argv
        if not argv:
            container.exit_code, container.reason = 128, "NoCommand"
            container.message = "the test node agent runs no image: the container needs a command"
            container.finished_at = now()
            return
        cwd = container.cwd
        if self.use_namespaces:
            spec = {"hostname": run.hostname, "hosts_file": str(run.hosts_file), "workdir": container.cwd,
                    "shadow_dir": str(run.directory / "shadow" / container.name), "mounts": container.mounts}
            spec_path = run.directory / "containers" / container.name / "pod-init.json"
            spec_path.write_text(json.dumps(spec))
            argv = [sys.executable, str(POD_INIT), str(spec_path), "--", *argv]
            cwd = str(run.directory)
        out = open(container.log_path, "ab")
        try:
            container.process = subprocess.Popen(
                argv, env=container.env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        except OSError as error:  # the command does not exist here
            out.write(f"node agent: cannot start {argv[0]!r}: {error}\n".encode())
            container.exit_code, container.reason, container.message = 128, "StartError", str(error)
            container.finished_at = now()
            return
        finally:
            out.close()
        container.started_at = now()
        container.exit_code = None
        log.info("pod %s/%s container %s: pid %d", run.namespace, run.name, container.name, container.process.pid)

    def step(self, run: PodRun, pod: dict) -> None:
        """Advance one pod: start/restart containers, notice exits, finish terminations, report status."""
        for container in run.all_runs():
            if container.process is not None and container.exit_code is None:
                code = container.process.poll()
                if code is not None:
                    self.finish_container(run, container, code)
        if run.terminating_since is not None:
            if any(c.running() for c in run.all_runs()):
                if time.monotonic() >= (run.kill_deadline or 0):
                    self.kill(run, signal.SIGKILL)
                self.report(run, pod)
                return
            if run.phase not in ("Succeeded", "Failed"):
                run.phase = "Succeeded" if all(c.exit_code == 0 for c in run.containers) else "Failed"
            self.report(run, pod)
            if not run.deleted:
                self.final_delete(pod)
                run.deleted = True
            return
        if run.phase in ("Succeeded", "Failed"):
            self.report(run, pod)
            return
        # Init containers run one at a time, each to success, before the app containers.
        for container in run.init_containers:
            if container.exit_code == 0:
                continue
            if container.process is None:
                self.spawn(run, container)
            elif container.exit_code is not None:
                if run.restart_policy == "Never":
                    run.phase = "Failed"
                elif time.monotonic() >= container.restart_after:
                    container.restart_count += 1
                    self.spawn(run, container)
            self.report(run, pod)
            return
        for container in run.containers:
            if container.process is None and container.exit_code is None:
                self.spawn(run, container)
            elif container.exit_code is not None and self.should_restart(run, container):
                if time.monotonic() >= container.restart_after:
                    container.restart_count += 1
                    self.spawn(run, container)
        if all(c.exit_code is not None and not self.should_restart(run, c) for c in run.containers):
            run.phase = "Succeeded" if all(c.exit_code == 0 for c in run.containers) else "Failed"
        else:
            run.phase = "Running"
        self.report(run, pod)

    def should_restart(self, run: PodRun, container: ContainerRun) -> bool:
        if container.exit_code is None:
            return False
        return run.restart_policy == "Always" or (run.restart_policy == "OnFailure" and container.exit_code != 0)

    def finish_container(self, run: PodRun, container: ContainerRun, code: int) -> None:
        # A process killed by a signal is reported as 128 + signal, as container runtimes do.
        container.exit_code = 128 - code if code < 0 else code
        container.finished_at = now()
        container.reason = "Completed" if container.exit_code == 0 else "Error"
        _signal_group(container.process.pid, signal.SIGKILL)  # nothing of it outlives it
        message = container.termination_path.read_bytes()[:MAX_TERMINATION_MESSAGE].decode(errors="replace")
        if not message and container.exit_code != 0 and \
                container.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            lines = container.log_path.read_bytes()[-2048:].decode(errors="replace").splitlines()[-80:]
            message = "\n".join(lines)
        container.message = message
        container.restart_after = time.monotonic() + min(10.0, 1.0 * 2 ** container.restart_count)
        log.info("pod %s/%s container %s exited %d", run.namespace, run.name, container.name, container.exit_code)

    def kill(self, run: PodRun, sig: int) -> None:
        for container in run.all_runs():
            if container.process is not None and (container.exit_code is None or sig == signal.SIGKILL):
                _signal_group(container.process.pid, sig)
        if sig == signal.SIGKILL:
            for container in run.all_runs():
                if container.process is not None and container.exit_code is None:
                    try:
                        code = container.process.wait(timeout=5)
                        self.finish_container(run, container, code)
                    except subprocess.TimeoutExpired:
                        pass

    def final_delete(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            # With a body the API server reads the options from it alone, so the grace period goes there too.
            self.core.delete_namespaced_pod(meta["name"], meta["namespace"],
                                            body={"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}})
        except ApiException as error:
            if error.status not in (404, 409):
                raise

    def forget(self, run: PodRun) -> None:
        self.free_ips.append(run.ip)
        shutil.rmtree(run.directory, ignore_errors=True)
        log.info("pod %s/%s removed", run.namespace, run.name)

    # ---------------------------------------------------------------- status
    def container_status(self, container: ContainerRun) -> dict:
        status = {"name": container.name, "image": container.spec.get("image", ""), "imageID": "",
                  "restartCount": container.restart_count, "ready": False, "started": False}
        if container.process is not None:
            status["containerID"] = f"local-process://{container.process.pid}"
        if container.running():
            status.update(ready=True, started=True,
                          state={"running": {"startedAt": rfc3339(container.started_at)}})
        elif container.exit_code is not None:
            terminated = {"exitCode": container.exit_code, "reason": container.reason,
                          "finishedAt": rfc3339(container.finished_at or now())}
            if container.started_at:
                terminated["startedAt"] = rfc3339(container.started_at)
            if container.message:
                terminated["message"] = container.message
            status["state"] = {"terminated": terminated}
        else:
            status["state"] = {"waiting": {"reason": "PodInitializing" if not container.init else "Waiting"}}
        return status

    def report(self, run: PodRun, pod: dict) -> None:
        stamp = rfc3339(now())
        ready = run.phase == "Running" and all(c.running() for c in run.containers)
        initialized = all(c.exit_code == 0 for c in run.init_containers)

        def condition(kind: str, ok: bool, reason: str = "") -> dict:
            out = {"type": kind, "status": "True" if ok else "False", "lastTransitionTime": stamp}
            if reason and not ok:
                out["reason"] = reason
            return out

        done_reason = "PodCompleted" if run.phase in ("Succeeded", "Failed") else "ContainersNotReady"
        status = {
            "phase": run.phase,
            "hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": run.ip, "podIPs": [{"ip": run.ip}],
            "startTime": rfc3339(run.started_at),
            "conditions": [
                condition("PodReadyToStartContainers", True),
                condition("Initialized", initialized, "ContainersNotInitialized"),
                condition("ContainersReady", ready, done_reason),
                condition("Ready", ready, done_reason),
            ],
            "containerStatuses": [self.container_status(c) for c in run.containers],
        }
        if run.init_containers:
            status["initContainerStatuses"] = [self.container_status(c) for c in run.init_containers]
        comparable = {**status, "conditions": [{k: v for k, v in c.items() if k != "lastTransitionTime"}
                                               for c in status["conditions"]]}
        if comparable == run.reported:
            return
        previous = {c["type"]: c for c in ((pod.get("status") or {}).get("conditions") or [])}
        for cond in status["conditions"]:  # keep transition times of unchanged conditions
            old = previous.get(cond["type"])
            if old and old.get("status") == cond["status"] and old.get("lastTransitionTime"):
                cond["lastTransitionTime"] = old["lastTransitionTime"]
        try:
            self.core.patch_namespaced_pod_status(run.name, run.namespace, {"status": status}, _content_type=SMP)
            run.reported = comparable
        except ApiException as error:
            if error.status != 404:
                raise

    def report_waiting(self, pod: dict, reason: str, message: str) -> None:
        meta = pod["metadata"]
        statuses = [{"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0,
                     "ready": False, "started": False, "state": {"waiting": {"reason": reason, "message": message}}}
                    for c in pod["spec"].get("containers") or []]
        current = (pod.get("status") or {}).get("containerStatuses")
        if current == statuses:
            return
        try:
            self.core.patch_namespaced_pod_status(meta["name"], meta["namespace"],
                                                  {"status": {"containerStatuses": statuses}}, _content_type=SMP)
        except ApiException as error:
            if error.status != 404:
                raise

    # ---------------------------------------------------------------- hostnames
    def hosts_content(self, run: PodRun, entries: dict[tuple[str, str], list[tuple[str, str]]]) -> str:
        lines = ["# Kubernetes-managed hosts file (rlhf-operator test node agent).",
                 "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        if run.subdomain:
            fqdn = f"{run.hostname}.{run.subdomain}.{run.namespace}.svc.{CLUSTER_DOMAIN}"
            lines.append(f"{run.ip}\t{fqdn}\t{run.hostname}")
        else:
            lines.append(f"{run.ip}\t{run.hostname}")
        for (namespace, subdomain), pods in sorted(entries.items()):
            for hostname, ip in pods:
                fq = f"{hostname}.{subdomain}.{namespace}"
                names = [f"{fq}.svc.{CLUSTER_DOMAIN}", f"{fq}.svc", fq]
                if namespace == run.namespace:
                    names.append(f"{hostname}.{subdomain}")
                lines.append(f"{ip}\t{' '.join(names)}")
        return "\n".join(lines) + "\n"

    def update_hosts(self, headless: set[tuple[str, str]]) -> None:
        """Rewrite each pod's hosts file in place (the bind mount follows the inode) when its content changes."""
        entries: dict[tuple[str, str], list[tuple[str, str]]] = {}
        for run in self.pods.values():
            if run.subdomain and (run.namespace, run.subdomain) in headless and run.phase == "Running" \
                    and run.terminating_since is None:
                entries.setdefault((run.namespace, run.subdomain), []).append((run.hostname, run.ip))
        for run in self.pods.values():
            content = self.hosts_content(run, entries)
            try:
                with open(run.hosts_file, "r+") as handle:
                    if handle.read() == content:
                        continue
                    handle.seek(0)
                    handle.write(content)
                    handle.truncate()
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------------- shutdown
    def shutdown(self) -> None:
        log.info("stopping: terminating %d pods", len(self.pods))
        for run in self.pods.values():
            self.kill(run, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
                c.process.poll() is None for r in self.pods.values() for c in r.all_runs() if c.process):
            time.sleep(0.1)
        for run in self.pods.values():
            self.kill(run, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _json(response) -> dict:
    return json.loads(response.data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--logs-dir", help="where container output goes (default: <workdir>/pod-logs)")
    parser.add_argument("--node", action="append", required=True, help="node name (repeat for several nodes)")
    parser.add_argument("--cpu", default=8, type=int, help="cpu capacity reported per node (not enforced)")
    parser.add_argument("--memory", default="32Gi", help="memory capacity reported per node (not enforced)")
    parser.add_argument("--gpus", default=4, type=int, help="fake nvidia.com/gpu count per node")
    parser.add_argument("--max-pods", default=110, type=int)
    parser.add_argument("--kubelet-version", default="v0.0.0-node-agent")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    agent = NodeAgent(args)

    def stop(*_: object) -> None:
        agent.stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    agent.run()


if __name__ == "__main__":
    main()
