"""`expertmesh serve`: a supervisor process, and the server (Ray, Serve, the app) it runs in a
session of its own so that a terminal's or a container runtime's signal drains and stops it
cleanly."""

from __future__ import annotations

import argparse
import sys

STOP_GRACE_S = 45.0  # after SIGINT/SIGTERM: drain (<= 10 s), stop the mesh, Serve and Ray; then kill


def cmd_serve(args: argparse.Namespace) -> int:
    """`expertmesh serve`: a supervisor process and the server in a session of its own.

    Ray starts its processes (GCS, raylet, workers) in the process group of the driver that
    starts them. A terminal's Ctrl-C, or a container runtime's SIGTERM, goes to the whole
    foreground process group: it would hit Ray's own processes while the driver still needs them
    to drain and stop. So the server (driver, Ray, Serve) runs in its own session, and this
    process only forwards the first SIGINT/SIGTERM as one SIGINT, waits for a clean stop (drain
    in-flight streams for up to 10 s, stop the mesh, Serve and Ray), and kills what is left after
    STOP_GRACE_S.
    """
    import os
    import signal
    import subprocess
    import threading
    import time

    if args.tenants is None and args.host != "127.0.0.1":
        raise ValueError(f"refusing to bind {args.host} without --tenants: an open server (no API keys) "
                         "only binds 127.0.0.1")
    if os.environ.get("EXPERTMESH_SERVE_CHILD") == str(os.getppid()):
        code = _serve(args)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # everything is stopped; skip seconds of interpreter teardown (torch, Ray threads)
    child = subprocess.Popen([sys.executable, "-m", "expertmesh.cli", *args.argv], start_new_session=True,
                             env=dict(os.environ, EXPERTMESH_SERVE_CHILD=str(os.getpid())))
    stop = threading.Event()

    def forward(signum, _frame) -> None:
        if not stop.is_set() and child.poll() is None:
            print(f"expertmesh: {signal.Signals(signum).name}: draining and stopping", file=sys.stderr, flush=True)
            child.send_signal(signal.SIGINT)  # Ray's processes also handle SIGTERM; the server's own handler: SIGINT
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, forward)
    while child.poll() is None and not stop.wait(0.2):
        pass
    stopped_at = time.monotonic()
    try:
        child.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        print(f"expertmesh: not stopped after {STOP_GRACE_S:g} s; killing it", file=sys.stderr, flush=True)
    try:  # whatever the server's session still holds (nothing, after a clean stop)
        os.killpg(child.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    child.wait()
    if stop.is_set():
        print(f"expertmesh: stopped in {time.monotonic() - stopped_at:.1f} s", file=sys.stderr, flush=True)
    return child.returncode if child.returncode >= 0 else 0 if stop.is_set() else 1


def _serve(args: argparse.Namespace) -> int:
    """The server: Ray (started here, or joined), Serve, the app; on SIGTERM a clean stop."""
    import os
    import signal
    import threading
    import time

    import ray
    from ray import serve

    import expertmesh as em
    from expertmesh.cli.mesh_args import mesh_kwargs
    from expertmesh.pipelines.serve import ServeSettings, build_app
    from expertmesh.platform.cluster import NAMESPACE, connect
    from expertmesh.platform.tenancy import load_tenants

    stop = threading.Event()
    parent = os.getppid()

    def watch_parent() -> None:  # the supervisor died (SIGKILL): stop too
        while os.getppid() == parent:
            time.sleep(0.5)
        stop.set()

    threading.Thread(target=watch_parent, daemon=True).start()

    settings = {"checkpoint": args.checkpoint, "context_shards": args.context_shards,
                "expert_groups": args.expert_groups, "max_queue": args.max_queue,
                "max_completion_tokens": args.max_completion_tokens, **mesh_kwargs(args)}
    if args.tenants:  # parsed here (clear errors) and passed inline, so no node needs the file
        settings["tenants"] = load_tenants(args.tenants).model_dump()
    app = build_app(settings)
    mesh_name = ServeSettings(**settings).mesh_name
    # Serve's controller (created by this job) checks its proxies every 10 s and replaces one
    # after 3 failed checks: a killed proxy would cost ~30 s. Every 2 s: ~6 s.
    started = connect(args.address, args.context_shards, args.expert_groups,
                      env={"RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": "2"})
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own SIGTERM handler
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(app, name="expertmesh", route_prefix="/")
        print(f"expertmesh serving on http://{args.host}:{args.port} (OpenAI base URL "
              f"http://{args.host}:{args.port}/v1)", flush=True)
        while not stop.wait(0.5):
            pass
        t0 = time.monotonic()
        serve.delete("expertmesh")  # replicas drain their in-flight streams (graceful_shutdown_timeout_s)
        print(f"expertmesh: drained in {time.monotonic() - t0:.1f} s", file=sys.stderr, flush=True)
    finally:
        t0 = time.monotonic()
        try:  # the mesh and the tenant limits outlive replicas, not the server
            em.Mesh.attach(mesh_name).shutdown(stop_actors=True)
            ray.kill(ray.get_actor(f"{mesh_name}.tenants", namespace=NAMESPACE))
        except Exception:  # noqa: BLE001 - never started, or already gone
            pass
        if started:  # Serve's actors end with the cluster this process started
            ray.shutdown()
        else:  # a joined cluster lives on: stop Serve's controller and proxies in it
            serve.shutdown()
        print(f"expertmesh: mesh, Serve and Ray stopped in {time.monotonic() - t0:.1f} s", file=sys.stderr,
              flush=True)
    return 0
