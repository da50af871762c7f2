"""A bounded chaos soak: steady streaming clients through Serve on a Ray cluster of real hosts
(Linux network namespaces, tests/hosts/netns.py; root and iproute2) while a schedule of faults
runs, and what the clients saw.

Cluster: host 0 (head: Serve's controller and the tenants' shared limits, no mesh actor, as the
chart places them; GCS fault tolerance on Redis, host 9, as the chart's `serve.gcsFaultTolerance`),
hosts 1-2 (a context shard each), hosts 3 and 7 (an expert group each), host 4 (the edge: Serve's replica and the proxy the
clients talk to, and the driver), hosts 5-6 (a router each); a store on local disk; tiny Mixtral;
the chart's node failure detection on the head. Clients (`--clients`, default 3) stream
`/v1/completions` over a shared registered context back to back, in turn: greedy, sampled with a
seed, sampled without one (the server seeds it). Faults, one every `--every` seconds, in turn:
  kill a context shard's process, kill an expert group's process, kill a router's process
  (Ray restarts each), cut a shard host's link (its processes alive: the silent loss; a new
  host replaces it), SIGKILL the expert host (a new host replaces it), add a shard host and a
  shard (`add_shards` + `rebalance`), cut the expert host's link, cut a router host's link (a
  new host replaces each), take the added shard out (`remove_shards`), lose the head (every
  process SIGKILLed; started again on its address 5 s later, as KubeRay restarts a head pod).
Not in the schedule: a Serve replica's loss (it cuts its streams: Serve does not carry a stream
over to another replica).

Report: requests answered right, refused before their first token (429/503), cut mid-stream
(target 0), wrong (greedy and seeded answers against the same request before any fault; target
0), the longest gap between two tokens a client saw, the resident memory of the mesh's and its
Serve app's actor processes at the start and the end (hosts lost meanwhile left out, replacements
in), and those processes left after shutdown (target none).

Writes benchmarks/results/soak.json.

    python benchmarks/bench_soak.py [--minutes 10] [--every 45] [--clients 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

DRIVER = r'''
import json, sys, threading, time
from pathlib import Path
import httpx
import ray
import expertmesh as em
from expertmesh.dataplane.liveness import actor_info, actor_state
from tests.hosts.netns import Hosts

hosts = Hosts.attach()
ckpt, store, minutes, every, clients = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
head_env = json.loads(sys.argv[6])
ray.init(address=hosts.head, _node_ip_address=hosts.address(4))  # this host, not the head's node
mesh = em.Mesh.start(ckpt, context_shards=2, expert_groups=2, routers=2, address=hosts.head, store=store,
                     page_size=16, name="soak", detached=True)
from ray import serve
from expertmesh.pipelines.serve import ExpertMeshServer
serve.start(proxy_location="EveryNode", http_options={"host": "0.0.0.0", "port": 8000})
serve.run(ExpertMeshServer.options(ray_actor_options={"num_cpus": 0, "resources": {"serve": 0.01}}).bind(
    {"checkpoint": ckpt, "mesh_name": "soak", "store": store}), name="expertmesh", route_prefix="/")
base = f"http://{hosts.address(4)}:8000"  # the edge host's proxy
where = lambda h: ray.get(h.__ray_call__.remote(lambda self: ray.util.get_node_ip_address()), timeout=30)
host_of = lambda h: int(where(h).rsplit(".", 1)[1]) - 1
http = httpx.Client(timeout=300)
ctx = http.post(f"{base}/v1/contexts", json={"text": "The lighthouse keeper wrote in the log every night. " * 40,
                                             "visibility": "shared"}).json()["id"]
KINDS = [{"temperature": 0.0}, {"temperature": 0.8, "seed": 7}, {"temperature": 0.8}]
PROMPTS = [" The keeper", " Every night", " The log said"]
def body(k, p):
    return {"model": "expertmesh", "prompt": PROMPTS[p], "context_id": ctx, "max_tokens": 24, **KINDS[k]}
refs = {(k, p): http.post(f"{base}/v1/completions", json=body(k, p)).json()["choices"][0]["text"]
        for k in (0, 1) for p in range(len(PROMPTS))}  # greedy and seeded: the answers before any fault

def rss(pids):
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total
gone = set()  # hosts cut off or killed: what still runs there is not the mesh's any more
ROLES = (b"ray::ContextShard", b"ray::ExpertGroup", b"ray::Router", b"ray::ServeReplica", b"ray::ProxyActor",
         b"ray::ServeController", b"ray::TenantLimits")
def mesh_pids(roles=ROLES):
    """The mesh's and its Serve app's actor processes on the hosts still in the cluster."""
    out = []
    for i in range(64):
        if i in gone:
            continue
        for pid in hosts.pids(i):
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(roles):
                    out.append(pid)
            except OSError:
                pass
    return out

outcomes, gaps, lock, stop = [], [], threading.Lock(), threading.Event()
def client(c):
    n = 0
    while not stop.is_set():
        k, p = (c + n) % 3, n % len(PROMPTS)
        n += 1
        t_start, text, first, last, gap, outcome = time.monotonic(), "", None, None, 0.0, None
        try:
            with httpx.stream("POST", f"{base}/v1/completions", json=body(k, p) | {"stream": True}, timeout=300) as r:
                if r.status_code != 200:
                    r.read()
                    outcome = "refused" if r.status_code in (429, 503) else f"http {r.status_code}"
                else:
                    done = False
                    for line in r.iter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: {"):
                            ev = json.loads(line[6:])
                            if "error" in ev:
                                break
                            now = time.monotonic()
                            if last is not None:
                                gap = max(gap, now - last)
                            last = now
                            text += ev["choices"][0]["text"]
                    if not done:
                        outcome = "cut" if last is not None else "refused"
                    elif k < 2 and text != refs[(k, p)]:
                        outcome = "wrong"
                    else:
                        outcome = "right"
        except httpx.HTTPError as exc:
            outcome = "cut" if last is not None else f"error {type(exc).__name__}"
        with lock:
            outcomes.append({"client": c, "kind": ["greedy", "seeded", "unseeded"][k], "outcome": outcome,
                             "t": t_start, "s": time.monotonic() - t_start, "gap_s": gap})

threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(clients)]
time.sleep(2)
mem_start = rss(mesh_pids())
t0 = time.monotonic()
for t in threads:
    t.start()
faults, next_host, added = [], [10], []
def new_host(resources):
    i = next_host[0]
    next_host[0] += 1
    hosts.add(i, resources)
    return i
def wait_alive(handle, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while actor_state(handle) != "ALIVE" and time.monotonic() < deadline:
        time.sleep(0.2)
    return actor_state(handle)
def kill_and_wait(handle, timeout_s=120):
    """ray.kill (Ray restarts it); back once Ray reports it alive after one more restart."""
    restarts = actor_info(handle)[1]
    ray.kill(handle, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while (actor_info(handle)[1] <= restarts or actor_state(handle) != "ALIVE") and time.monotonic() < deadline:
        time.sleep(0.05)
    return actor_state(handle)
KINDS_OF_FAULT = ["kill shard", "kill expert group", "kill router", "cut shard host link", "kill expert host",
                  "add shard host", "cut expert host link", "cut router host link", "remove shard", "restart head"]
def cut_and_replace(handle, resources, f):
    """Cut the link of the handle's host; once Ray declares the actor's host dead, a new host with
    these resources joins and the actor restarts there."""
    h = host_of(handle); hosts.cut(h); gone.add(h); f["host"] = h
    while actor_state(handle) == "ALIVE" and time.monotonic() - t0 < minutes * 60:
        time.sleep(0.2)
    f["ray_declared_dead_s"] = time.monotonic() - t0 - f["at_s"]
    f["replaced_by"] = new_host(resources); f["state"] = wait_alive(handle)
n = 0
while time.monotonic() - t0 < minutes * 60 - every:
    time.sleep(every)
    kind = KINDS_OF_FAULT[n % len(KINDS_OF_FAULT)]
    n += 1
    f = {"fault": kind, "at_s": time.monotonic() - t0}
    try:
        if kind == "kill shard":
            f["state"] = kill_and_wait(mesh.shards[0])
        elif kind == "kill expert group":
            f["state"] = kill_and_wait(mesh.groups[1])
        elif kind == "kill router":
            f["state"] = kill_and_wait(mesh.routers[n % 2])
        elif kind == "cut shard host link":
            cut_and_replace(mesh.shards[1], {"context_shard": 1}, f)
        elif kind == "kill expert host":
            g = next(i for i, grp in enumerate(mesh.groups) if host_of(grp) != 0)  # not the head's
            h = host_of(mesh.groups[g]); hosts.kill(h); gone.add(h); f["host"] = h
            f["replaced_by"] = new_host({"expert_group": 1}); f["state"] = wait_alive(mesh.groups[g])
        elif kind == "add shard host":
            f["host"] = new_host({"context_shard": 1})
            f["added"] = mesh.add_shards(1); f["moved"] = len(mesh.rebalance()["moved"])
            added.extend(f["added"])
        elif kind == "cut expert host link":
            g = 1
            cut_and_replace(mesh.groups[g], {"expert_group": 1}, f)
        elif kind == "cut router host link":
            cut_and_replace(mesh.routers[n % 2], {"router": 1}, f)
        elif kind == "remove shard":
            if not added:
                raise ValueError("no shard added to take out")
            gone_shard = added.pop()
            f["removed"] = gone_shard; f["moved"] = len(mesh.remove_shards([gone_shard])["moved"])
        elif kind == "restart head":
            hosts.kill(0)
            time.sleep(5)
            hosts.start(0, {}, 2, head_env["env"], tuple(head_env["args"]))
            f["head_started_s"] = time.monotonic() - t0 - f["at_s"]
            while time.monotonic() - t0 - f["at_s"] < 120:  # Ray's state API answering for the hosts in use
                try:
                    f["state"] = f"{sum(1 for x in ray.nodes() if x['Alive'])} hosts alive"
                    break
                except Exception:
                    time.sleep(0.5)
            f["state_api_back_s"] = time.monotonic() - t0 - f["at_s"]
    except Exception as exc:
        f["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    f["took_s"] = time.monotonic() - t0 - f["at_s"]
    faults.append(f)
while time.monotonic() - t0 < minutes * 60:
    time.sleep(1)
stop.set()
for t in threads:
    t.join(320)
mem_end = rss(mesh_pids())
serve.shutdown()
mesh.shutdown(stop_actors=True)
time.sleep(3)
left = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0].decode() for p in mesh_pids()]
count = lambda what: sum(1 for o in outcomes if o["outcome"] == what)
print("RESULT " + json.dumps({
    "minutes": minutes, "every_s": every, "clients": clients, "requests": len(outcomes),
    "right": count("right"), "refused": count("refused"), "cut": count("cut"), "wrong": count("wrong"),
    "other": sorted({o["outcome"] for o in outcomes} - {"right", "refused", "cut", "wrong"}),
    "by_kind": {k: {w: sum(1 for o in outcomes if o["kind"] == k and o["outcome"] == w)
                    for w in ("right", "refused", "cut", "wrong")} for k in ("greedy", "seeded", "unseeded")},
    "longest_gap_s": max((o["gap_s"] for o in outcomes), default=0.0),
    "memory_start_bytes": mem_start, "memory_end_bytes": mem_end, "left_after_shutdown": left,
    "faults": faults, "outcomes": outcomes}))
'''


def summarize(out: dict) -> dict:
    """Per fault, the requests in flight when it struck and the longest gap between tokens they
    saw, and the requests begun in the minute after; the per-request records themselves are not
    kept (thousands of them)."""
    outcomes = out.pop("outcomes")
    t0 = min((o["t"] for o in outcomes), default=0.0)
    for f in out["faults"]:
        hit = [o for o in outcomes if o["t"] - t0 <= f["at_s"] <= o["t"] - t0 + o["s"]]
        f["requests_in_flight"] = len(hit)
        f["longest_gap_in_flight_s"] = max((o["gap_s"] for o in hit), default=0.0)
        f["requests_in_the_minute_after"] = sum(1 for o in outcomes if f["at_s"] < o["t"] - t0 < f["at_s"] + 60)
        f["in_flight_outcomes"] = dict(collections.Counter(o["outcome"] for o in hit))
        f["not_right_begun_while_it_ran"] = dict(collections.Counter(
            o["outcome"] for o in outcomes if f["at_s"] < o["t"] - t0 < f["at_s"] + f["took_s"] and o["outcome"] != "right"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--every", type=float, default=45.0, help="seconds between faults")
    ap.add_argument("--clients", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tests.conftest import build_tiny
    from tests.hosts.netns import Hosts, unavailable

    why = unavailable()
    if why:
        raise SystemExit(f"the soak needs network namespaces: {why}")
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="expertmesh-soak-"))
    ckpt = build_tiny("mixtral", work / "mixtral")
    hosts = Hosts.create()
    try:
        import secrets

        password = secrets.token_hex(16)
        hosts.redis(9, password)  # the GCS's external store (GCS fault tolerance)
        head = {"env": {"RAY_REDIS_ADDRESS": f"{hosts.address(9)}:6379", "RAY_external_storage_namespace": "soak"},
                "args": ["--redis-password", password]}
        hosts.add(0, {}, num_cpus=2, env=head["env"], head_args=tuple(head["args"]))
        for i, res in ((1, {"context_shard": 1}), (2, {"context_shard": 1}), (3, {"expert_group": 1}),
                       (4, {"serve": 1}), (5, {"router": 1}), (6, {"router": 1}), (7, {"expert_group": 1})):
            hosts.add(i, res)
        t0 = time.monotonic()
        proc = hosts.driver(DRIVER, ckpt, str(work / "store"), str(args.minutes), str(args.every), str(args.clients),
                            json.dumps(head), timeout=args.minutes * 60 + 900, host=4)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            raise SystemExit(f"the soak's driver failed ({proc.returncode}): {proc.stderr[-4000:]}")
        out = summarize(json.loads(line[7:]))
        out["wall_s"] = time.monotonic() - t0
        out["machine"] = "2-core CPU VM; hosts are Linux network namespaces on it"
        out["date"] = time.strftime("%Y-%m-%d")
    finally:
        hosts.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=1) + "\n")
    summary = {k: out[k] for k in ("requests", "right", "refused", "cut", "wrong", "longest_gap_s",
                                   "memory_start_bytes", "memory_end_bytes", "left_after_shutdown")}
    print(json.dumps(summary, indent=1))
    print(json.dumps([{k: f[k] for k in f if k != "at_s"} for f in out["faults"]], indent=1))


if __name__ == "__main__":
    main()
