"""A Ray cluster of real hosts on one machine: each host is a Linux network namespace with its
own address on a private bridge, running its own `ray start` (token authentication on; the
head with the Helm chart's node failure detection).

The bridge lives in a namespace of its own, so the machine's network is never touched; the
addresses come from 198.18.0.0/15 (RFC 2544's benchmarking range, never routed). Traffic
between hosts crosses veth pairs and the bridge over TCP, as between pods. Killing a host
SIGKILLs every process in its namespace, as a preempted node; cutting one takes its bridge port
down, as a pulled cable (its processes live on, no connection is reset).

`Hosts` is driven from the test process (which cleans up every namespace and process of its
tag, also when a test fails) and from the driver script run inside the head's namespace
(`Hosts.attach`), which adds and kills hosts while the mesh serves.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def unavailable() -> str | None:
    """Why this machine cannot run the multi-host suite (None: it can)."""
    if sys.platform != "linux":
        return "Linux network namespaces are needed"
    if os.geteuid() != 0:
        return "root is needed to make network namespaces (`ip netns`)"
    if shutil.which("ip") is None or shutil.which("nsenter") is None:
        return "iproute2's `ip` and util-linux's `nsenter` are needed"
    probe = f"emprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Hosts:
    def __init__(self, tag: str, subnet: int, token: str, root: str, mounts: str) -> None:
        """mounts: the test process's mount namespace. `ip netns` names namespaces with bind
        mounts, and `ip netns exec` runs its command in a mount namespace of its own: the driver
        (run so) makes and kills hosts through the test's, or the test could not see them to
        clean them up."""
        self.tag, self.subnet, self.token, self.root, self.mounts = tag, subnet, token, Path(root), mounts

    def _cmd(self, *args: str) -> list[str]:
        here = os.readlink("/proc/self/ns/mnt")
        return list(args) if here == os.readlink(self.mounts) else ["nsenter", f"--mount={self.mounts}", *args]

    def _ip(self, *args: str) -> None:
        subprocess.run(self._cmd("ip", *args), check=True, capture_output=True, text=True)

    @classmethod
    def create(cls) -> "Hosts":
        """A bridge namespace; hosts come with `add`. Ray's files go to /tmp/em<tag> (its Unix
        socket paths must stay under 108 bytes)."""
        tag = secrets.token_hex(3)
        hosts = cls(tag, 1 + secrets.randbelow(250), secrets.token_hex(24), f"/tmp/em{tag}",
                    f"/proc/{os.getpid()}/ns/mnt")
        hosts._ip("netns", "add", hosts.bridge)
        hosts._ip("-n", hosts.bridge, "link", "set", "lo", "up")
        hosts._ip("-n", hosts.bridge, "link", "add", "br0", "type", "bridge")
        hosts._ip("-n", hosts.bridge, "link", "set", "br0", "up")
        return hosts

    @classmethod
    def attach(cls) -> "Hosts":
        """The driver's view of the test's hosts (from EXPERTMESH_HOSTS)."""
        return cls(**json.loads(os.environ["EXPERTMESH_HOSTS"]))

    def spec(self) -> str:
        return json.dumps({"tag": self.tag, "subnet": self.subnet, "token": self.token, "root": str(self.root),
                           "mounts": self.mounts})

    @property
    def bridge(self) -> str:
        return f"em{self.tag}-br"

    def name(self, i: int) -> str:
        return f"em{self.tag}-h{i}"

    def address(self, i: int) -> str:
        return f"198.18.{self.subnet}.{i + 1}"

    @property
    def head(self) -> str:
        return f"{self.address(0)}:6379"

    def env(self) -> dict[str, str]:
        return dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, RAY_USAGE_STATS_ENABLED="0",
                    PYTHONWARNINGS="ignore", EXPERTMESH_HOSTS=self.spec())

    def add(self, i: int, resources: dict[str, float], num_cpus: int = 1, env: dict[str, str] | None = None,
            head_args: tuple[str, ...] = ()) -> float:
        """Host i (0: the head) joins the cluster with these Ray resources; seconds it took.
        env: more of Ray's settings for its processes; head_args: more `ray start --head` flags."""
        t0 = time.monotonic()
        self.link(i)
        self.start(i, resources, num_cpus, env, head_args)
        return time.monotonic() - t0

    def link(self, i: int) -> None:
        """Host i's namespace and its link to the bridge (nothing runs there yet)."""
        ns = self.name(i)
        self._ip("netns", "add", ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"p{i}", "netns", self.bridge)
        self._ip("-n", self.bridge, "link", "set", f"p{i}", "master", "br0")
        self._ip("-n", self.bridge, "link", "set", f"p{i}", "up")
        self._ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")

    def start(self, i: int, resources: dict[str, float], num_cpus: int = 1, env: dict[str, str] | None = None,
              head_args: tuple[str, ...] = ()) -> None:
        """`ray start` on host i (its namespace made by `link`; again after `kill`: a restarted node)."""
        where = ["--head", "--port", "6379", "--include-dashboard=false", *head_args] if i == 0 \
            else ["--address", self.head]
        full = self.env() | (env or {})
        if i == 0:  # the Helm chart's node failure detection (head.nodeFailureDetection), not Ray's 15-50 s
            full.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="2000",
                        RAY_health_check_failure_threshold="5")
        temp, again = self.root / f"h{i}", 0
        while temp.exists():  # a restarted host starts on an empty disk, as a new pod (and `ray start
            again += 1  # --head` would take the other hosts' processes on this machine for a GCS running)
            temp = self.root / f"h{i}r{again}"
        temp.mkdir(parents=True)
        cmd = self._cmd("ip", "netns", "exec", self.name(i), RAY, "start", *where, "--node-ip-address",
                        self.address(i), "--num-cpus", str(num_cpus), "--resources", json.dumps(resources),
                        "--disable-usage-stats", "--object-store-memory", str(200 << 20), "--temp-dir", str(temp))
        done = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"ray start on host {i} failed: {done.stderr[-2000:]}")

    def redis(self, i: int, password: str) -> subprocess.Popen:
        """A Redis server (the distribution's) as host i, on its address, port 6379, with a password
        and no persistence: the external store of Ray's GCS fault tolerance."""
        self.link(i)
        cmd = self._cmd("ip", "netns", "exec", self.name(i), "redis-server", "--bind", self.address(i),
                        "--port", "6379", "--requirepass", password, "--save", "", "--appendonly", "no",
                        "--dir", str(self.root))
        self.root.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        probe = self._cmd("ip", "netns", "exec", self.name(i), "redis-cli", "-h", self.address(i), "--no-auth-warning",
                          "-a", password, "ping")
        while subprocess.run(probe, capture_output=True, text=True).stdout.strip() != "PONG":
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on host {i} did not start (exit {proc.poll()})")
            time.sleep(0.1)
        return proc

    def cut(self, i: int) -> None:
        """Cut host i's link (its bridge port down): its processes live on and nothing resets a
        connection, as a pulled cable, a failed switch port or a partition."""
        self._ip("-n", self.bridge, "link", "set", f"p{i}", "down")

    def pids(self, i: int) -> list[int]:
        out = subprocess.run(self._cmd("ip", "netns", "pids", self.name(i)), capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def kill(self, i: int) -> None:
        """SIGKILL every process of host i (a preempted node); its namespace stays, empty."""
        deadline = time.monotonic() + 10
        while (pids := self.pids(i)) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.05)

    def driver(self, script: str, *args: str, timeout: float = 600, host: int = 0) -> subprocess.CompletedProcess:
        """Run a Python driver inside a host's namespace (the head's by default)."""
        return subprocess.run(["ip", "netns", "exec", self.name(host), sys.executable, "-c", script, *args],
                              env=self.env(), capture_output=True, text=True, timeout=timeout)

    def close(self) -> None:
        """Kill every process in this tag's namespaces and delete them (hosts the driver added too)."""
        listed = subprocess.run(self._cmd("ip", "netns", "list"), capture_output=True, text=True).stdout.split("\n")
        names = [line.split()[0] for line in listed if line.startswith(f"em{self.tag}-")]
        for ns in names:
            if ns != self.bridge:
                self.kill(int(ns.rsplit("-h", 1)[1]))
        for ns in names:
            subprocess.run(self._cmd("ip", "netns", "del", ns), capture_output=True)
        for proc in Path("/proc").iterdir():  # anything of this tag still running (a host missed above)
            try:
                if proc.name.isdigit() and str(self.root).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        shutil.rmtree(self.root, ignore_errors=True)
