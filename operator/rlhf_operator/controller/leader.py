"""Leader election over a coordination.k8s.io Lease, so that two replicas can run and only one reconciles.

The candidate that holds the Lease (``holderIdentity`` is its identity and ``renewTime`` is fresher than
``leaseDurationSeconds``) leads; the others retry every ``retry_s``. The leader renews every ``renew_s``; if it
cannot renew before the lease would expire, it stops leading and the process exits (and is restarted), the
usual way for controllers, so two leaders never act at once for longer than the clock skew. On a graceful
shutdown the leader releases the Lease, so a standby takes over at once.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("rlhf_operator.controller.leader")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _micro(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: Any) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)
    return dt.datetime.strptime(value.replace("Z", ""), "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=dt.timezone.utc)


class LeaderElector:
    def __init__(self, api: client.ApiClient, namespace: str, name: str, identity: str, *,
                 lease_s: int = 15, renew_s: float = 5.0, retry_s: float = 2.0) -> None:
        self.leases = client.CoordinationV1Api(api)
        self.namespace, self.name, self.identity = namespace, name, identity
        self.lease_s, self.renew_s, self.retry_s = lease_s, renew_s, retry_s
        self.leading = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease. True when this candidate holds it afterwards."""
        now = _now()
        try:
            lease = self.leases.read_namespaced_lease(self.name, self.namespace)
        except ApiException as error:
            if error.status != 404:
                raise
            body = {"metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_s,
                             "acquireTime": _micro(now), "renewTime": _micro(now), "leaseTransitions": 0}}
            try:
                self.leases.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException as create_error:
                if create_error.status == 409:
                    return False
                raise
        spec = lease.spec
        holder = spec.holder_identity
        renewed = _parse(spec.renew_time)
        duration = spec.lease_duration_seconds or self.lease_s
        expired = renewed is None or (now - renewed).total_seconds() > duration
        if holder not in (None, "", self.identity) and not expired:
            return False
        transitions = (spec.lease_transitions or 0) + (0 if holder == self.identity else 1)
        spec_patch = {"holderIdentity": self.identity, "leaseDurationSeconds": self.lease_s,
                      "renewTime": _micro(now), "leaseTransitions": transitions}
        if holder != self.identity:
            spec_patch["acquireTime"] = _micro(now)
        body = {"metadata": {"name": self.name, "namespace": self.namespace,
                             "resourceVersion": lease.metadata.resource_version}, "spec": spec_patch}
        try:  # replace with the resourceVersion read: a concurrent candidate makes this a 409
            self.leases.replace_namespaced_lease(self.name, self.namespace, body)
            return True
        except ApiException as error:
            if error.status == 409:
                return False
            raise

    def wait_for_leadership(self, stop: threading.Event | None = None) -> bool:
        """Block until this candidate leads (True) or ``stop`` is set (False); then keep renewing in a thread."""
        log.info("waiting to lead (Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        while not (stop and stop.is_set()):
            try:
                if self.try_acquire():
                    break
            except ApiException as error:
                log.warning("leader election: %s", error.reason)
            time.sleep(self.retry_s)
        else:
            return False
        log.info("leading as %s", self.identity)
        self.leading.set()
        self._thread = threading.Thread(target=self._renew, name="lease-renewal", daemon=True)
        self._thread.start()
        return True

    def _renew(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.renew_s):
            try:
                if self.try_acquire():
                    last = time.monotonic()
                    continue
            except ApiException as error:
                log.warning("lease renewal failed: %s", error.reason)
            if time.monotonic() - last > self.lease_s:
                log.error("lost the Lease %s/%s: stopping", self.namespace, self.name)
                self.leading.clear()
                self.lost.set()
                return

    def release(self) -> None:
        """Stop renewing and hand the Lease over (best effort)."""
        self._stop.set()
        if not self.leading.is_set():
            return
        self.leading.clear()
        try:
            self.leases.patch_namespaced_lease(self.name, self.namespace,
                                               {"spec": {"holderIdentity": None, "renewTime": None}},
                                               _content_type="application/merge-patch+json")
        except ApiException as error:
            log.warning("could not release the Lease: %s", error.reason)
