"""Who uses a store now: one lease file per live mesh (router), renewed while it runs.

Several meshes may share one store (a RayService upgrade runs the old and the new cluster side
by side; two deployments may mount one volume). Each router holds a lease `members/<id>.json`
({"id", "group", "host", "pid", "renewed", "ttl_s"}), written at start and renewed at least
every `RENEW_S`; a lease not renewed for `ttl_s` belongs to a router that is gone. `group`
names the mesh (its routers share one): another mesh's live lease is what tells a router that
the store may change under it (catalog.py). Clean-up removes
only what such dead members left (their registrations in flight, their scratch files), and a
drop deletes segment files at once only when no other member is live (otherwise after a grace
period: catalog.py). Leases compare wall clocks across hosts: they assume clocks agree to well
under `LEASE_TTL_S` (NTP), as Kubernetes leases do.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid

from expertmesh.store.location import StoreLocation

LEASE_TTL_S = 30.0  # a lease older than this is a dead member's
RENEW_S = 5.0  # renewed at least this often (the router's directory sync)


class Membership:
    def __init__(self, location: StoreLocation, ttl_s: float = LEASE_TTL_S, group: str | None = None) -> None:
        """group: the mesh this member belongs to (None: a mesh of its own)."""
        self.location, self.ttl_s = location, ttl_s
        self.id = f"{socket.gethostname()[:40]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.group = group or self.id
        self.renewed = 0.0

    def renew(self, force: bool = False) -> None:
        now = time.time()
        if force or now - self.renewed >= RENEW_S:
            body = {"id": self.id, "group": self.group, "host": socket.gethostname(), "pid": os.getpid(),
                    "renewed": now, "ttl_s": self.ttl_s}
            self.location.write_bytes(f"members/{self.id}.json", json.dumps(body).encode())
            self.renewed = now

    def live(self) -> set[str]:
        """Ids of the members whose lease is current (this one included once renewed)."""
        return set(self.live_groups())

    def live_groups(self) -> dict[str, str]:
        """Member id -> its group (mesh), for the members whose lease is current."""
        out, now = {}, time.time()
        for name in self.location.list("members"):
            if not name.endswith(".json"):
                continue
            raw = self.location.read_bytes(f"members/{name}")
            try:
                lease = json.loads(raw or b"")
                fresh = now - float(lease["renewed"]) < float(lease.get("ttl_s", LEASE_TTL_S))
            except (ValueError, KeyError, TypeError):
                fresh = False  # unreadable: a torn write of a dead member, or not ours
            if fresh:
                member = name[:-len(".json")]
                out[member] = str(lease.get("group") or member)  # a lease without a group: a mesh of its own
            elif raw is not None and now - _renewed(raw) > 10 * LEASE_TTL_S:
                self.location.delete(f"members/{name}")  # long gone: keep the directory short
        return out

    def others_live(self) -> bool:
        return bool(self.live() - {self.id})

    def leave(self) -> None:
        self.location.delete(f"members/{self.id}.json")


def _renewed(raw: bytes) -> float:
    try:
        return float(json.loads(raw)["renewed"])
    except (ValueError, KeyError, TypeError):
        return 0.0
