"""A real Kubernetes control plane on loopback: etcd, kube-apiserver, kube-controller-manager, kube-scheduler.

Everything lives in one work directory (certificates, etcd data, kubeconfigs, logs); every component binds
127.0.0.1 on free ports. ``ControlPlane.start()`` returns once the API server is ready and the controller
manager and scheduler answer their health checks; ``stop()`` stops them in reverse order.
"""

from __future__ import annotations

import ssl
import urllib.request
from pathlib import Path

import yaml

from .pki import CertPair, ClusterPKI
from .processes import ManagedProcess, free_port, wait_for

SERVICE_CIDR = "10.96.0.0/16"  # virtual service addresses; nothing ever binds them
CLUSTER_DOMAIN = "cluster.local"
SERVICE_ACCOUNT_ISSUER = f"https://kubernetes.default.svc.{CLUSTER_DOMAIN}"
START_TIMEOUT_S = 180.0


def write_kubeconfig(path: Path, server: str, ca: Path, *, user: str, client: CertPair | None = None,
                     token: str | None = None, namespace: str | None = None) -> Path:
    """A kubeconfig with one cluster, one user (client certificate or bearer token) and one current context."""
    credentials: dict[str, str] = {}
    if client is not None:
        credentials = {"client-certificate": str(client.cert), "client-key": str(client.key)}
    if token is not None:
        credentials["token"] = token
    context = {"cluster": "rlhf-test", "user": user}
    if namespace:
        context["namespace"] = namespace
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "rlhf-test", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": credentials}],
        "contexts": [{"name": user, "context": context}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class ControlPlane:
    """The four control-plane processes of one test cluster under ``workdir``."""

    def __init__(self, workdir: Path, kubernetes_bin: Path, etcd_bin: Path) -> None:
        self.workdir = workdir
        self.kubernetes_bin = kubernetes_bin
        self.etcd_bin = etcd_bin
        self.logs = workdir / "logs"
        self.pki = ClusterPKI(workdir / "pki")
        self.apiserver_port = free_port()
        self.server = f"https://127.0.0.1:{self.apiserver_port}"
        self.processes: list[ManagedProcess] = []
        kubeconfigs = workdir / "kubeconfig"
        kubeconfigs.mkdir(parents=True, exist_ok=True)
        self.admin_cert = self.pki.issue("admin", "rlhf-test-admin", ("system:masters",))
        self.admin_kubeconfig = write_kubeconfig(
            kubeconfigs / "admin.yaml", self.server, self.pki.ca.cert, user="admin", client=self.admin_cert
        )
        self._component_kubeconfigs = {
            name: write_kubeconfig(
                kubeconfigs / f"{name}.yaml", self.server, self.pki.ca.cert, user=user,
                client=self.pki.issue(name, user),
            )
            for name, user in (
                ("kube-controller-manager", "system:kube-controller-manager"),
                ("kube-scheduler", "system:kube-scheduler"),
            )
        }

    # ------------------------------------------------------------------ start/stop
    def start(self) -> None:
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._start_scheduler()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()

    def check_alive(self) -> None:
        for process in self.processes:
            process.check_alive()

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, self.logs / f"{name}.log", cwd=self.workdir)
        self.processes.append(process)
        process.start()
        return process

    def _start_etcd(self) -> None:
        client_port, peer_port = free_port(), free_port()
        client_url, peer_url = f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        self.etcd_url = client_url
        etcd = self._spawn("etcd", [
            str(self.etcd_bin),
            "--name=default",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--initial-cluster-state=new",
            "--unsafe-no-fsync",  # throwaway data; fsync would only slow the tests down
            "--log-level=warn",
        ])
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        wait_for(
            lambda: b'"health":"true"' in opener.open(f"{client_url}/health", timeout=2).read(),
            START_TIMEOUT_S, "etcd to be healthy", check=etcd.check_alive,
        )

    def _start_apiserver(self) -> None:
        serving = self.pki.issue(
            "apiserver", "kube-apiserver",
            server_names=("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                          f"kubernetes.default.svc.{CLUSTER_DOMAIN}"),
            server_ips=("127.0.0.1", "10.96.0.1"),
        )
        # The front proxy (aggregation layer) identity, as kubeadm sets it up: without it every component logs
        # "missing content for CA bundle requestheader-client-ca-file" forever.
        front_proxy = self.pki.issue("front-proxy-client", "front-proxy-client")
        apiserver = self._spawn("kube-apiserver", [
            str(self.kubernetes_bin / "kube-apiserver"),
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self.apiserver_port}",
            f"--cert-dir={self.workdir / 'pki' / 'apiserver-generated'}",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={self.pki.ca.cert}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={self.pki.service_account_pub}",
            f"--service-account-signing-key-file={self.pki.service_account_key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            # The default admission plugins (NamespaceLifecycle, LimitRanger, ServiceAccount, PodSecurity,
            # DefaultTolerationSeconds, ResourceQuota, the webhooks, ...) stay on; NodeRestriction as kubeadm adds.
            "--enable-admission-plugins=NodeRestriction",
            "--allow-privileged=true",
            f"--requestheader-client-ca-file={self.pki.ca.cert}",
            "--requestheader-allowed-names=front-proxy-client",
            "--requestheader-username-headers=X-Remote-User",
            "--requestheader-group-headers=X-Remote-Group",
            "--requestheader-extra-headers-prefix=X-Remote-Extra-",
            f"--proxy-client-cert-file={front_proxy.cert}",
            f"--proxy-client-key-file={front_proxy.key}",
            "--profiling=false",
            "--v=1",
        ])
        context = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(self.admin_cert.cert), str(self.admin_cert.key))
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        wait_for(
            lambda: opener.open(f"{self.server}/readyz", timeout=5).read() == b"ok",
            START_TIMEOUT_S, "kube-apiserver to be ready", interval_s=0.5, check=apiserver.check_alive,
        )

    def _serving_flags(self, name: str) -> tuple[list[str], int]:
        port = free_port()
        kubeconfig = self._component_kubeconfigs[name]
        return [
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'pki' / (name + '-generated')}",
            "--leader-elect=false",
            "--profiling=false",
        ], port

    def _wait_healthy(self, process: ManagedProcess, port: int) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # self-signed serving cert of the component; only /healthz is read
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        wait_for(
            lambda: opener.open(f"https://127.0.0.1:{port}/healthz", timeout=5).read() == b"ok",
            START_TIMEOUT_S, f"{process.name} to be healthy", interval_s=0.5, check=process.check_alive,
        )

    def _start_controller_manager(self) -> None:
        flags, port = self._serving_flags("kube-controller-manager")
        process = self._spawn("kube-controller-manager", [
            str(self.kubernetes_bin / "kube-controller-manager"),
            *flags,
            "--controllers=*",  # the default set: job, garbage collector, namespace, serviceaccount, token, ...
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={self.pki.service_account_key}",
            f"--root-ca-file={self.pki.ca.cert}",
            f"--cluster-signing-cert-file={self.pki.ca.cert}",
            f"--cluster-signing-key-file={self.pki.ca.key}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--cluster-name=rlhf-test",
            "--v=2",
        ])
        self._wait_healthy(process, port)

    def _start_scheduler(self) -> None:
        flags, port = self._serving_flags("kube-scheduler")
        process = self._spawn("kube-scheduler", [str(self.kubernetes_bin / "kube-scheduler"), *flags, "--v=1"])
        self._wait_healthy(process, port)
