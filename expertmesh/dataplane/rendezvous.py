"""The rendezvous of the gloo and NCCL transports, through Ray instead of a TCP store.

`torch.distributed.TCPStore` listens on a port with no authentication: anyone who reaches it
can read and write the keys a process group forms from (gloo's pair addresses, NCCL's unique
id) and so place itself in the group. Here the keys live in a small Ray actor that the router
starts (`RendezvousStore`), and the members reach it through `RayStore`, a
`torch.distributed.Store` whose every operation is a Ray call: the rendezvous travels over
Ray's control plane (token-authenticated where the cluster enables Ray's auth), and no
rendezvous port is open. What the formed group's own sockets carry (gloo's pairs, NCCL's
bootstrap and transport) stays as trusted as in any gloo or NCCL deployment; docs/dataplane.md's
"Security model" says how the chart limits who reaches them.
"""

from __future__ import annotations

import asyncio
import datetime

import ray
import torch.distributed as dist

MAX_VALUE_BYTES = 1 << 20  # a rendezvous value (addresses, an NCCL id): small


@ray.remote(num_cpus=0)
class RendezvousStore:
    """Keys and values of the groups a router forms (one actor per router)."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.changed = asyncio.Condition()

    async def set(self, key: str, value: bytes) -> None:
        if len(value) > MAX_VALUE_BYTES:
            raise ValueError(f"a rendezvous value of {len(value)} bytes; at most {MAX_VALUE_BYTES}")
        async with self.changed:
            self.data[key] = value
            self.changed.notify_all()

    async def get(self, keys: list[str], timeout_s: float) -> list[bytes] | None:
        """The values of `keys` once all are set; None after timeout_s."""
        async with self.changed:
            try:
                await asyncio.wait_for(self.changed.wait_for(lambda: all(k in self.data for k in keys)), timeout_s)
            except asyncio.TimeoutError:
                return None
            return [self.data[k] for k in keys]

    async def add(self, key: str, n: int) -> int:
        async with self.changed:
            value = int(self.data.get(key, b"0")) + n
            self.data[key] = str(value).encode()
            self.changed.notify_all()
            return value

    async def compare_set(self, key: str, expected: bytes, desired: bytes) -> bytes:
        async with self.changed:
            current = self.data.get(key)
            if (current is None and not expected) or current == expected:
                self.data[key] = desired
                self.changed.notify_all()
                return desired
            return expected if current is None else current

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def delete_key(self, key: str) -> bool:
        return self.data.pop(key, None) is not None

    def num_keys(self) -> int:
        return len(self.data)

    def forget(self, prefix: str) -> None:
        """Drop the keys of an earlier generation."""
        for k in [k for k in self.data if k.startswith(prefix)]:
            del self.data[k]


def _bytes(value) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class RayStore(dist.Store):
    """A torch.distributed store whose keys (under `prefix`: one group generation's) live in a
    `RendezvousStore` actor. Keep a reference while a group uses it: the group holds only the
    C++ side of a Python store."""

    def __init__(self, actor, timeout: datetime.timedelta, prefix: str = "") -> None:
        super().__init__()
        self.actor, self.timeout_s, self.prefix = actor, timeout.total_seconds(), prefix

    def _call(self, method: str, *args):
        return ray.get(getattr(self.actor, method).remote(*args), timeout=self.timeout_s + 10)

    def set(self, key, value) -> None:
        self._call("set", self.prefix + key, _bytes(value))

    def get(self, key) -> bytes:
        got = self._call("get", [self.prefix + key], self.timeout_s)
        if got is None:
            raise RuntimeError(f"Timed out after {self.timeout_s:g} s waiting for rendezvous key {key!r}")
        return got[0]

    def wait(self, keys, timeout=None) -> None:
        seconds = self.timeout_s if timeout is None else timeout.total_seconds()
        if self._call("get", [self.prefix + k for k in keys], seconds) is None:
            raise RuntimeError(f"Timed out after {seconds:g} s waiting for rendezvous keys {list(keys)}")

    def add(self, key, value: int) -> int:
        return self._call("add", self.prefix + key, int(value))

    def compare_set(self, key, expected, desired) -> bytes:
        return self._call("compare_set", self.prefix + key, _bytes(expected), _bytes(desired))

    def check(self, keys) -> bool:
        return self._call("check", [self.prefix + k for k in keys])

    def delete_key(self, key) -> bool:
        return self._call("delete_key", self.prefix + key)

    def num_keys(self) -> int:
        return self._call("num_keys")
