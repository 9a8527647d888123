"""Leader election on a coordination.k8s.io/v1 Lease: one replica writes status and Events, every
replica serves xDS.

The algorithm is the one Kubernetes controllers use. A candidate reads the Lease; if another
identity holds it and the record has not changed for ``leaseDurationSeconds`` *as measured on
this replica's own clock* (no trust in other machines' clocks), it takes the Lease over with a
PUT carrying the resourceVersion it read (a 409 means another candidate won). The leader renews
every `retry_period`; when no renewal succeeded for `renew_deadline` (or another holder shows
up) it steps down: `on_change(False)`, writes stop, the process keeps serving and competes again.
On a clean stop the leader releases the Lease (holder cleared, 1 s duration) so another replica
takes over at its next try instead of waiting out the lease.
"""

from __future__ import annotations

import math
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import anyio

from controlplane.status.kube import KubeApiError, KubeJson
from controlplane.status.merge import micro_timestamp
from shared.logging import get_logger

log = get_logger("controlplane.leader")

DEFAULT_LEASE_NAME: Final = "agentgate-controlplane"
# Acquire attempts wait retry_period * (1 + JITTER * random) so candidates do not move in step.
JITTER: Final = 1.2
_SERVICE_ACCOUNT_NAMESPACE: Final = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def default_identity(environ: Mapping[str, str] = os.environ) -> str:
    """The pod's name (POD_NAME, from the downward API), else hostname.pid."""
    return environ.get("POD_NAME") or f"{socket.gethostname()}.{os.getpid()}"


def default_namespace(
    environ: Mapping[str, str] = os.environ, service_account: Path = _SERVICE_ACCOUNT_NAMESPACE
) -> str:
    """POD_NAMESPACE, else the service account's namespace in a pod, else "default"."""
    if environ.get("POD_NAMESPACE"):
        return environ["POD_NAMESPACE"]
    try:
        return service_account.read_text().strip() or "default"
    except OSError:
        return "default"


@dataclass(frozen=True)
class LeaderElectionSettings:
    lease_name: str = DEFAULT_LEASE_NAME
    namespace: str = "default"
    identity: str = ""
    # Seconds a Lease stays held without renewal; the leader gives up after renew_deadline
    # without a successful renewal; attempts every retry_period.
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def problems(self) -> list[str]:
        """What is wrong with these settings, as flag names (empty: usable)."""
        found = []
        if not self.lease_name:
            found.append("--leader-elect-lease-name must not be empty")
        if self.retry_period <= 0:
            found.append("--leader-elect-retry-period must be > 0")
        if self.lease_duration <= self.renew_deadline:
            found.append("--leader-elect-lease-duration must be greater than --leader-elect-renew-deadline")
        if self.renew_deadline <= JITTER * self.retry_period:
            found.append(f"--leader-elect-renew-deadline must be greater than {JITTER} x --leader-elect-retry-period")
        return found


def _utc_now() -> datetime:
    return datetime.now(UTC)


class LeaderElector:
    def __init__(
        self,
        client: KubeJson,
        settings: LeaderElectionSettings,
        *,
        on_change: Callable[[bool], None] = lambda leading: None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = _utc_now,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.settings = settings
        self.identity = settings.identity or default_identity()
        self.leading = False
        # The holder last seen in the Lease ("" when free or unknown).
        self.holder = ""
        self._on_change = on_change
        self._clock, self._now, self._rng = clock, now, rng
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at = 0.0

    async def tick(self) -> bool:
        """One attempt to acquire or renew; steps down when renewal failed past the deadline or
        another holder took over. Never raises for API trouble. Returns whether this replica leads."""
        started = self._clock()
        acquired, other = False, False
        try:
            with anyio.fail_after(self.settings.renew_deadline):
                acquired, other = await self._try_acquire_or_renew()
        except (KubeApiError, TimeoutError) as exc:
            log.warning("lease request failed", lease=self._lease_ref, identity=self.identity,
                        error=str(exc) or "timed out", leading=self.leading)
        if acquired:
            self._renewed_at = started
            if not self.leading:
                log.info("leadership acquired", lease=self._lease_ref, identity=self.identity)
                self._set(True)
        elif self.leading:
            if other:
                log.warning("leadership lost: another replica holds the lease", lease=self._lease_ref,
                            identity=self.identity, holder=self.holder)
                self._set(False)
            elif self._clock() - self._renewed_at >= self.settings.renew_deadline:
                log.warning("leadership lost: lease not renewed within the deadline", lease=self._lease_ref,
                            identity=self.identity, deadline=self.settings.renew_deadline)
                self._set(False)
        return self.leading

    async def run(self) -> None:
        """Compete and renew until cancelled; then release the Lease if held."""
        try:
            while True:
                await self.tick()
                delay = self.settings.retry_period
                if not self.leading:
                    delay *= 1 + JITTER * self._rng()
                await anyio.sleep(delay)
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(self.settings.retry_period * 2):
                await self.release()

    async def release(self) -> None:
        """Give the Lease up (holder cleared, 1 s duration) if this replica holds it."""
        if not self.leading:
            return
        self._set(False)
        try:
            lease = await self.client.get("Lease", self.settings.namespace, self.settings.lease_name)
            spec = lease.get("spec") or {}
            if spec.get("holderIdentity") != self.identity:
                return
            stamp = micro_timestamp(self._now())
            released = {"leaseDurationSeconds": 1, "acquireTime": stamp, "renewTime": stamp,
                        "leaseTransitions": int(spec.get("leaseTransitions") or 0)}
            await self.client.replace("Lease", self.settings.namespace, self.settings.lease_name,
                                      {**lease, "spec": released})
            log.info("lease released", lease=self._lease_ref, identity=self.identity)
        except KubeApiError as exc:
            log.warning("lease release failed; another replica takes over when it expires",
                        lease=self._lease_ref, error=str(exc))

    @property
    def _lease_ref(self) -> str:
        return f"{self.settings.namespace}/{self.settings.lease_name}"

    def _set(self, leading: bool) -> None:
        self.leading = leading
        self._on_change(leading)

    def _observe(self, spec: Mapping[str, Any]) -> None:
        """Remember when (on our clock) the record last changed: expiry is measured from then."""
        record = tuple(spec.get(k) for k in ("holderIdentity", "renewTime", "leaseDurationSeconds",
                                              "leaseTransitions", "acquireTime"))
        if record != self._observed:
            self._observed, self._observed_at = record, self._clock()
        self.holder = str(spec.get("holderIdentity") or "")

    async def _try_acquire_or_renew(self) -> tuple[bool, bool]:
        """(acquired or renewed, held by another replica)."""
        namespace, name = self.settings.namespace, self.settings.lease_name
        stamp = micro_timestamp(self._now())
        duration = math.ceil(self.settings.lease_duration)
        try:
            lease = await self.client.get("Lease", namespace, name)
        except KubeApiError as exc:
            if exc.status != 404:
                raise
            spec = {"holderIdentity": self.identity, "leaseDurationSeconds": duration, "acquireTime": stamp,
                    "renewTime": stamp, "leaseTransitions": 0}
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": name, "namespace": namespace}, "spec": spec}
            try:
                await self.client.create("Lease", namespace, body)
            except KubeApiError as created:
                if created.status == 409:
                    return False, False  # another candidate created it first
                raise
            self._observe(spec)
            return True, False
        spec = lease.get("spec") or {}
        self._observe(spec)
        holder = self.holder
        held_for = float(spec.get("leaseDurationSeconds") or self.settings.lease_duration)
        if holder and holder != self.identity and self._clock() < self._observed_at + held_for:
            return False, True
        mine = holder == self.identity
        renewed = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": duration,
            "acquireTime": spec.get("acquireTime") if mine and spec.get("acquireTime") else stamp,
            "renewTime": stamp,
            "leaseTransitions": int(spec.get("leaseTransitions") or 0) + (0 if mine else 1),
        }
        try:
            await self.client.replace("Lease", namespace, name, {**lease, "spec": renewed})
        except KubeApiError as exc:
            if exc.status == 409:
                return False, False  # changed since we read it: look again next time
            raise
        self._observe(renewed)
        return True, False
