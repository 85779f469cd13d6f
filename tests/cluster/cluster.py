"""A whole test cluster: the local one (control plane + node agent, all processes on this machine) or an existing
cluster reached through a kubeconfig (kind, say)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from rlhf_api.cache import cache_root

from . import binaries
from .control_plane import ControlPlane, write_kubeconfig
from .processes import ManagedProcess, kill_pod_processes, wait_for

HERE = Path(__file__).resolve().parent
NODE_NAMES = ("rlhf-node-1",)
#: fake capacity of each node; nvidia.com/gpu so that GPU requests schedule
NODE_GPUS = 4


@dataclass
class Cluster:
    """What a test needs to know about the cluster under test."""

    kubeconfig: Path
    local: bool
    kubectl_path: str
    workdir: Path
    nodes: tuple[str, ...] = ()
    control_plane: ControlPlane | None = None
    agent: ManagedProcess | None = None

    def api_client(self, kubeconfig: Path | None = None):
        """A fresh ``kubernetes.client.ApiClient`` for ``kubeconfig`` (default: the admin's)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(kubeconfig or self.kubeconfig))

    def kubectl(self, *args: str, kubeconfig: Path | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run kubectl with the admin kubeconfig (or ``kubeconfig``); text output."""
        result = subprocess.run(
            [self.kubectl_path, f"--kubeconfig={kubeconfig or self.kubeconfig}", *args],
            capture_output=True, text=True, timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result

    def processes(self) -> list[ManagedProcess]:
        """The harness's own long-running processes (empty for an existing cluster)."""
        owned = list(self.control_plane.processes) if self.control_plane else []
        if self.agent:
            owned.append(self.agent)
        return owned

    def check_alive(self) -> None:
        for process in self.processes():
            process.check_alive()

    def log_files(self) -> list[Path]:
        return [process.log for process in self.processes()]

    def pod_log_files(self, namespace: str) -> list[Path]:
        directory = self.workdir / "logs" / "pods"
        return sorted(directory.glob(f"{namespace}_*.log")) if directory.is_dir() else []

    def write_token_kubeconfig(self, path: Path, token: str, *, user: str, namespace: str | None = None) -> Path:
        """A kubeconfig for this cluster's API server that authenticates with a bearer ``token``."""
        from kubernetes import client, config

        configuration = client.Configuration()
        config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=configuration)
        ca = path.with_suffix(".ca.crt")
        shutil.copyfile(configuration.ssl_ca_cert, ca)
        return write_kubeconfig(path, configuration.host, ca, user=user, token=token, namespace=namespace)

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop(grace_s=15)
            kill_pod_processes(self.workdir / "agent" / "pods")
        if self.control_plane is not None:
            self.control_plane.stop()


def start_local(workdir: Path) -> Cluster:
    """Build (or reuse) the binaries, start the control plane and the node agent; return once the nodes are Ready."""
    kubernetes_dir = binaries.ensure("kubernetes")
    etcd_dir = binaries.ensure("etcd")
    control_plane = ControlPlane(workdir, kubernetes_dir, etcd_dir / "etcd")
    cluster = Cluster(
        kubeconfig=control_plane.admin_kubeconfig, local=True, kubectl_path=str(kubernetes_dir / "kubectl"),
        workdir=workdir, nodes=NODE_NAMES, control_plane=control_plane,
    )
    try:
        control_plane.start()
        argv = [sys.executable, str(HERE / "node_agent.py"), f"--kubeconfig={control_plane.admin_kubeconfig}",
                f"--workdir={workdir / 'agent'}", f"--logs-dir={workdir / 'logs' / 'pods'}",
                f"--gpus={NODE_GPUS}", f"--kubelet-version={binaries.versions()['KUBERNETES_VERSION']}"]
        argv += [f"--node={name}" for name in NODE_NAMES]
        # The pods' HOME is their own folder: RLHF_CACHE_DIR points them at this machine's cache instead, where a
        # builtin:// model is converted once (the trainer image sets it to its own cache folder the same way).
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "RLHF_CACHE_DIR": str(cache_root())}
        cluster.agent = ManagedProcess("node-agent", argv, workdir / "logs" / "node-agent.log", env=env, cwd=workdir)
        cluster.agent.start()
        wait_for(lambda: _nodes_ready(cluster), 120, "the nodes to be Ready and untainted", interval_s=0.5,
                 check=cluster.check_alive)
        wait_for(lambda: _default_service_account(cluster), 60, "the default ServiceAccount", interval_s=0.5)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _nodes_ready(cluster: Cluster) -> bool:
    from kubernetes import client

    with cluster.api_client() as api:
        nodes = {n.metadata.name: n for n in client.CoreV1Api(api).list_node().items}
    for name in cluster.nodes:
        node = nodes.get(name)
        if node is None or node.spec.taints:
            return False
        if not any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or []):
            return False
    return True


def _default_service_account(cluster: Cluster) -> bool:
    from kubernetes import client

    with cluster.api_client() as api:
        client.CoreV1Api(api).read_namespaced_service_account("default", "default")
    return True


def existing(kubeconfig: Path, workdir: Path) -> Cluster:
    """An existing cluster (``RLHF_TEST_CLUSTER=kubeconfig``): nothing is started or stopped."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        kubectl = str(binaries.binary("kubernetes", "kubectl"))
    cluster = Cluster(kubeconfig=kubeconfig, local=False, kubectl_path=kubectl, workdir=workdir)
    from kubernetes import client

    with cluster.api_client() as api:
        cluster.nodes = tuple(n.metadata.name for n in client.CoreV1Api(api).list_node().items)
    return cluster
