"""The operator process: ``rlhf operator`` or ``python -m rlhf_operator.controller``.

    rlhf operator [--namespace NS ...] [--kubeconfig FILE] [--port 8080] [--leader-elect] ...

* watches every namespace (``--all-namespaces``, the default) or the ``--namespace`` ones;
* serves ``/healthz`` (the process and its event loop answer), ``/readyz`` (kopf is watching, and this replica
  leads when leader election is on) and ``/metrics`` (Prometheus text format, by prometheus_client) on ``--port``;
* logs one JSON object per line (``--log-format json``, the default in the image) or plain text;
* on SIGTERM/SIGINT stops watching, lets running handlers finish (kopf), releases the Lease and exits 0;
* two replicas: ``--leader-elect`` (a coordination.k8s.io Lease; the standby waits, ready=false) or kopf's
  peering (``--peering NAME``, needs kopf's peering CRDs), or neither for one replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading

from rlhf_api.tenancy import ALLOWED_ENDPOINTS_ENV, parse_allowed_endpoints

LOG_FORMATS = ("json", "text")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="rlhf operator", description="the RLHFPipeline operator (kopf)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[],
                       help="watch this namespace (repeatable); default: every namespace")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (default)")
    parser.add_argument("--kubeconfig", default=env("KUBECONFIG"),
                        help="kubeconfig file (default: in-cluster ServiceAccount, else ~/.kube/config)")
    parser.add_argument("--port", type=int, default=int(env("RLHF_OPERATOR_PORT", "8080")),
                        help="port of /healthz, /readyz and /metrics (0: no HTTP server)")
    parser.add_argument("--bind", default=env("RLHF_OPERATOR_BIND", "0.0.0.0"), help="address of that server")
    parser.add_argument("--resync-seconds", type=float, default=30.0,
                        help="re-reconcile unfinished pipelines this often (live progress, self-healing)")
    parser.add_argument("--stall-seconds", type=float, default=1800.0,
                        help="set the Stalled condition when a running stage publishes no new step for this long")
    parser.add_argument("--trainer-image", default=env("RLHF_TRAINER_IMAGE"),
                        help="trainer image for pipelines that name none (instead of the built-in default)")
    parser.add_argument("--allowed-endpoint", action="append", dest="allowed_endpoints",
                        default=[env(ALLOWED_ENDPOINTS_ENV, "")],
                        help="an S3 endpoint pipelines may name in storage.endpoint (repeatable; also "
                        f"{ALLOWED_ENDPOINTS_ENV}, comma-separated); a pipeline without one means AWS S3")
    parser.add_argument("--workspace-size-limit", default=env("RLHF_WORKSPACE_SIZE_LIMIT", "100Gi"),
                        help="sizeLimit of each trainer pod's scratch workspace (an emptyDir on the node's disk)")
    parser.add_argument("--shm-size-limit", default=env("RLHF_SHM_SIZE_LIMIT", "8Gi"),
                        help="sizeLimit of a GPU trainer pod's /dev/shm (memory-backed, counts against its memory)")
    parser.add_argument("--workers", type=int, default=8, help="reconciles in parallel (thread pool)")
    parser.add_argument("--leader-elect", action="store_true", help="run only while holding the Lease")
    parser.add_argument("--lease-name", default="rlhf-operator-leader")
    parser.add_argument("--lease-namespace", default=env("POD_NAMESPACE"),
                        help="namespace of the Lease (default: the pod's namespace, POD_NAMESPACE)")
    parser.add_argument("--peering", metavar="NAME", help="use kopf peering with this name instead of a Lease")
    parser.add_argument("--log-format", choices=LOG_FORMATS, default=env("RLHF_OPERATOR_LOG_FORMAT", "json"))
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    args.allowed_endpoints = parse_allowed_endpoints(args.allowed_endpoints)
    if args.leader_elect and not args.lease_namespace:
        parser.error("--leader-elect needs --lease-namespace (or POD_NAMESPACE)")
    return args


def configure_logging(log_format: str, verbose: bool) -> None:
    import kopf

    kopf.configure(verbose=verbose, log_format=kopf.LogFormat.JSON if log_format == "json" else kopf.LogFormat.FULL,
                   log_prefix=log_format != "json")
    for noisy in ("botocore", "boto3", "urllib3", "aiohttp.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def api_client(kubeconfig: str | None):
    from kubernetes import client, config

    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config()


async def serve_http(bind: str, port: int, metrics, ready: asyncio.Event, leading: threading.Event | None):
    """/healthz, /readyz and /metrics. Returns the runner (to clean up)."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        ok = ready.is_set() and (leading is None or leading.is_set())
        return web.Response(text="ready\n" if ok else "not ready\n", status=200 if ok else 503)

    async def exposition(_: web.Request) -> web.Response:
        return web.Response(body=metrics.render().encode("utf-8"), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", exposition)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, bind, port).start()
    return runner


async def run(args: argparse.Namespace) -> int:
    import kopf

    from rlhf_operator.controller.access import StoragePolicy
    from rlhf_operator.controller.handlers import register
    from rlhf_operator.controller.kube import Kube
    from rlhf_operator.controller.manifests import PodLimits
    from rlhf_operator.controller.metrics import Metrics
    from rlhf_operator.controller.reconcile import Reconciler

    log = logging.getLogger("rlhf_operator.controller")
    api = api_client(args.kubeconfig)
    metrics = Metrics()
    reconciler = Reconciler(Kube(api), metrics, stall_after_s=args.stall_seconds, default_image=args.trainer_image,
                            policy=StoragePolicy(allowed_endpoints=args.allowed_endpoints),
                            limits=PodLimits(args.workspace_size_limit, args.shm_size_limit))
    log.info("stores allowed: AWS S3%s", "".join(f", {e}" for e in args.allowed_endpoints))
    registry = register(kopf.OperatorRegistry(), resync_interval_s=args.resync_seconds)
    stop, ready = asyncio.Event(), asyncio.Event()
    stopping = threading.Event()
    handle_signals(log, stop, stopping)

    elector = leader_elector(api, args)
    runner = await serve_http(args.bind, args.port, metrics, ready, elector.leading if elector else None) \
        if args.port else None
    lease_task: asyncio.Task | None = None  # held here: asyncio keeps only weak references to tasks
    try:
        if elector is not None:
            if not await asyncio.to_thread(elector.wait_for_leadership, stopping):
                return 0
            lease_task = asyncio.create_task(watch_lease(log, elector, stop, stopping))
        settings = kopf.OperatorSettings()
        settings.execution.max_workers = args.workers
        namespaces = args.namespace
        await kopf.operator(
            registry=registry, settings=settings, memo=kopf.Memo(reconciler=reconciler),
            clusterwide=not namespaces, namespaces=namespaces,
            standalone=not args.peering, peering_name=args.peering,
            stop_flag=stop, ready_flag=ready,
        )
        lost = elector is not None and elector.lost.is_set() and not stopping.is_set()
        return 1 if lost else 0
    finally:
        if elector is not None:
            elector.release()
            await end_lease_watch(elector, lease_task)
        if runner is not None:
            await runner.cleanup()
        api.close()


def handle_signals(log: logging.Logger, stop: asyncio.Event, stopping: threading.Event) -> None:
    """SIGTERM and SIGINT stop kopf (``stop``) and the wait for leadership (``stopping``, read by a thread)."""
    def shutdown(signum: int) -> None:
        log.info("received %s: shutting down", signal.Signals(signum).name)
        stopping.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, shutdown, signum)


def leader_elector(api, args: argparse.Namespace):
    """The Lease candidate of this process with ``--leader-elect``, else None."""
    if not args.leader_elect:
        return None
    from rlhf_operator.controller.leader import LeaderElector

    identity = f"{socket.gethostname()}-{os.getpid()}"
    return LeaderElector(api, args.lease_namespace, args.lease_name, identity)


async def watch_lease(log: logging.Logger, elector, stop: asyncio.Event, stopping: threading.Event) -> None:
    """Stops kopf when the Lease is lost while leading (the process then exits 1 and is restarted)."""
    await asyncio.to_thread(elector.lost.wait)
    if not stopping.is_set():
        log.error("leadership lost: stopping")
        stop.set()


async def end_lease_watch(elector, lease_task: asyncio.Task | None) -> None:
    """Ends :func:`watch_lease` on the way out: cancelled first, so shutting down is not reported as a lost
    Lease, then ``lost`` set to free the thread it waits in."""
    if lease_task is not None:
        lease_task.cancel()
    elector.lost.set()
    if lease_task is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await lease_task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.kubeconfig:  # before the Kubernetes client is imported: it reads KUBECONFIG at import
        os.environ["KUBECONFIG"] = args.kubeconfig
    configure_logging(args.log_format, args.verbose)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
