"""The `expertmesh` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from expertmesh.cli.mesh_args import mesh_args, spec_of
from expertmesh.pipelines.progress import registration_bar
from expertmesh.cli.serve import cmd_serve


def cmd_generate(args: argparse.Namespace) -> int:
    import expertmesh as em

    mesh = em.Mesh.start(spec=spec_of(args), address=args.address)
    try:
        ctx = None
        if args.context_file:  # on a store, the same file again reuses its stored KV
            text = Path(args.context_file).read_text(encoding="utf-8")
            ids = mesh.tokenizer.encode(text)
            with registration_bar(len(ids)) as progress:
                ctx = mesh.register_context(ids, mode=args.mode, progress=progress)
        elif args.context_id:
            ctx = next((c for c in mesh.contexts() if c.id == args.context_id), None)
            if ctx is None:
                raise em.ContextNotFound(f"context {args.context_id!r} is not in the store "
                                         f"({len(mesh.contexts())} stored contexts)")
        res = mesh.generate(mesh.tokenizer.encode(args.prompt), context_id=ctx.id if ctx else None,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_shards=args.top_shards, seed=args.seed, top_pages=args.top_pages)
        if args.json:
            print(json.dumps({"text": res.text, "token_ids": res.token_ids, "pathway": res.pathway,
                              "context": ctx.__dict__ if ctx else None, "ttft_s": res.ttft_s,
                              "total_s": res.total_s}))
        else:
            print(res.text)
            shards = res.pathway.get("shards", [])
            print(f"[{res.completion_tokens} tokens, ttft {res.ttft_s * 1e3:.0f} ms, shards {shards}]",
                  file=sys.stderr)
        return 0
    finally:
        mesh.shutdown()


JOB_MODULES = {"train": "expertmesh.pipelines.train", "ingest": "expertmesh.pipelines.ingest"}


def cmd_submit(args: argparse.Namespace) -> int:
    """Ray Jobs: submit training or ingestion, and follow jobs, through the dashboard's job API."""
    import shlex
    import time

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(args.address)
    if args.action in JOB_MODULES:
        rest = args.rest
        entrypoint = " ".join(["python", "-m", JOB_MODULES[args.action], *map(shlex.quote, rest)])
        runtime_env: dict = {"env_vars": {"PYTHONWARNINGS": "ignore"}}
        if args.working_dir:
            runtime_env.update(working_dir=args.working_dir,
                               excludes=[".venv", ".git", "*.safetensors.partial", "benchmarks/results"])
        if args.pip:
            runtime_env["pip"] = args.pip
        deadline = time.time() + 120
        while True:  # a freshly started head answers "no available agent" until its agent is up
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                           submission_id=args.job_id)
                break
            except RuntimeError as exc:
                if "No available agent" not in str(exc) or time.time() > deadline:
                    raise
                time.sleep(2)
        print(job_id)
        if not args.wait:
            return 0
        args.job_id = job_id
        args.action = "wait"
    if args.job_id is None:
        raise ValueError(f"submit {args.action} needs a job id")
    if args.action == "status":
        print(client.get_job_status(args.job_id).value)
    elif args.action == "logs":
        print(client.get_job_logs(args.job_id), end="")
    elif args.action == "stop":
        print("stopped" if client.stop_job(args.job_id) else "not running")
    elif args.action == "wait":
        while (status := client.get_job_status(args.job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                                      JobStatus.STOPPED}:
            time.sleep(1)
        print(status.value)
        return 0 if status == JobStatus.SUCCEEDED else 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from expertmesh.pipelines import demo

    if args.real:  # a real trained model (upcycled SmolLM2) over a shared document
        from expertmesh.pipelines import demo_real

        demo_real.run(address=args.address)
        return 0
    demo.run(context_tokens=args.context_tokens, context_shards=args.context_shards,
             expert_groups=args.expert_groups, checkpoint=args.checkpoint, address=args.address, mode=args.mode,
             store=args.store, shard_backend=args.shard_backend, expert_backend=args.expert_backend,
             device=args.device, dtype=args.dtype, colocate=args.colocate, data_plane=args.data_plane,
             routers=args.routers)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from expertmesh.pipelines.train import run_from_args

    return run_from_args(args)


def _lengths(value: str) -> tuple[tuple[int, ...], tuple[int, int] | None]:
    """'1024,2048' -> fixed lengths; '1100-16383' -> a random range."""
    if "-" in value:
        lo, hi = (int(x) for x in value.split("-", 1))
        return (), (lo, hi)
    return tuple(int(x) for x in value.split(",")), None


def cmd_data(args: argparse.Namespace) -> int:
    from expertmesh.pipelines import text_sources
    from expertmesh.pipelines.train_data import DataSpec, write_dataset

    if args.list_sources:
        for s in text_sources.SOURCES.values():
            print(f"{s.name:18s} {s.split:8s} {', '.join(p.spec for p in s.packages):48s} {s.about}")
        return 0
    if args.fetch_text:
        manifest = text_sources.fetch(args.text or "train,heldout", args.text_cache)
        print(json.dumps({"text_cache": args.text_cache, "sources": {k: {"split": v["split"], "bytes": v["bytes"]}
                                                                     for k, v in sorted(manifest.items())}}))
        if not args.out:
            return 0
    if not args.out:
        raise ValueError("data needs --out (or --fetch-text / --list-sources alone)")
    lengths, length_range = _lengths(args.lengths)
    text = tuple(text_sources.resolve(args.text)) if args.text else ()
    heldout = [n for n in text if text_sources.SOURCES.get(n) and text_sources.SOURCES[n].split != "train"]
    if heldout and not args.allow_heldout:
        raise ValueError(f"{heldout} are held out for evaluation; train on them only with --allow-heldout")
    spec = DataSpec(rows=args.rows, lengths=lengths or (1024,), length_range=length_range,
                    multikey_share=args.multikey_share, prose_share=args.prose_share, group_rows=args.group_rows,
                    seed=args.seed, text=text, text_cache=args.text_cache, synthetic_share=args.synthetic_share,
                    mix_share=args.mix_share, max_keys=args.max_keys, eos=args.eos,
                    boundary_share=args.boundary_share, boundary_tail=args.boundary_tail)
    paths = write_dataset(args.out, spec, files=args.files, workers=args.workers)
    print(json.dumps({"out": args.out, "files": len(paths), "rows": spec.rows, "lengths": args.lengths,
                      "text": list(text), "eos": spec.eos}))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import expertmesh as em
    from expertmesh.pipelines import text_sources
    from expertmesh.pipelines.evaluate import SYNTHETIC, evaluate

    lengths = [int(x) for x in args.lengths.split(",")]
    modes = args.modes.split(",")
    offsets = [int(x) for x in args.offsets.split(",")] if args.offsets else None
    haystack, split = None, SYNTHETIC
    if args.source != SYNTHETIC:
        names = text_sources.resolve(args.source)
        if len(names) != 1:
            raise ValueError(f"--source names one text, got {names}")
        text = text_sources.load(names[0], args.text_cache)
        split = text.split
        if split == text_sources.TRAIN:
            print(f"note: {text.name} is a training source of the demo model, not held out", file=sys.stderr)
        haystack = text_sources.Haystack([text], mix_share=0.0)
    capacity = max(1 << 20, -(-(max(lengths) + 4096) // (args.context_shards or 1)) + 4096)
    mesh = em.Mesh.start(spec=spec_of(args, shard_capacity_tokens=capacity), address=args.address)
    layout = {"context_shards": len(mesh.shards), "expert_groups": len(mesh.groups), "colocate": mesh.colocated}
    try:
        cells = evaluate(mesh, args.task, lengths, modes, args.samples, seed=args.seed, keys=args.keys,
                         log=lambda s: print(s, flush=True), haystack=haystack, offsets=offsets,
                         random_offsets=args.random_offsets)
    finally:
        mesh.shutdown()
    rows = [c.row() for c in cells]
    source = haystack.texts[0].cite if haystack is not None else SYNTHETIC
    if args.json:
        Path(args.json).write_text(json.dumps({"task": args.task, "checkpoint": args.checkpoint or "default",
                                               "source": source, "source_split": split,
                                               "offsets": "random" if args.random_offsets and not offsets else offsets,
                                               **layout, "results": rows}, indent=1))
    print(f"{'task':8s} {'length':>9s} {'mode':9s} {'offset':>6s} {'accuracy':>8s} {'stops':>6s}  source")
    for r in rows:
        off = "" if r["offset"] is None else str(r["offset"])  # an offset, or "random"
        print(f"{r['task']:8s} {r['length']:>9,d} {r['mode']:9s} {off:>6s} {r['accuracy']:>8.1%} "
              f"{r['stop_rate']:>6.1%}  {r['source']}")
    return 0


def cmd_upcycle(args: argparse.Namespace) -> int:
    import time

    from expertmesh.pipelines.upcycle import upcycle

    start = time.perf_counter()
    out = upcycle(args.source, args.out, args.experts, args.top_k, dtype=args.dtype, seed=args.seed)
    config = json.loads((out / "config.json").read_text())
    print(json.dumps({"out": str(out), "architecture": config["architectures"][0], "experts": args.experts,
                      "top_k": args.top_k, "dtype": args.dtype,
                      "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
                      "seconds": round(time.perf_counter() - start, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt, optionally over a registered context file")
    mesh_args(g)
    g.add_argument("--context-file", help="text file registered as the shared context")
    g.add_argument("--mode", choices=("exact", "blockwise"), default="exact")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--top-shards", type=int, default=None, help="visit only the k best-scoring shards")
    g.add_argument("--top-pages", type=int, default=None, help="in each shard, only the p best-bounded KV pages")
    g.add_argument("--context-id", default=None, help="a context already in the --store (instead of --context-file)")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible multi-tenant HTTP API on Ray Serve")
    mesh_args(s)
    s.add_argument("--tenants", default=None, help="tenants YAML (API key hashes and limits)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get 503")
    s.add_argument("--max-completion-tokens", type=int, default=4096, help="largest max_tokens a request may ask")
    s.set_defaults(func=cmd_serve)

    j = sub.add_parser("submit", help="Ray Jobs: submit train/ingest (job arguments after --), "
                                      "or status/logs/stop/wait ID")
    j.add_argument("action", choices=("train", "ingest", "status", "logs", "stop", "wait"))
    j.add_argument("job_id", nargs="?", default=None, help="job id (status/logs/stop/wait; optional id for new jobs)")
    j.add_argument("--address", default="http://127.0.0.1:8265", help="Ray dashboard URL of the cluster")
    j.add_argument("--working-dir", default=None, help="upload this directory as the job's working_dir")
    j.add_argument("--pip", nargs="*", default=None, help="pip packages for the job's runtime_env")
    j.add_argument("--wait", action="store_true", help="wait for the new job and exit with its outcome")
    j.set_defaults(func=cmd_submit)

    d = sub.add_parser("demo", help="the main job: questions over a long shared context")
    mesh_args(d)
    d.add_argument("--context-tokens", type=int, default=16384)
    d.add_argument("--mode", choices=("exact", "blockwise"), default="exact")
    d.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct (from PyPI), upcycled to a MoE, "
                   "answering questions over a shared document in its own chat format")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train on Ray Train (TorchTrainer) from a YAML config")
    from expertmesh.pipelines.train import add_arguments

    add_arguments(t)
    t.set_defaults(func=cmd_train)

    dd = sub.add_parser("data", help="generate the long-context training tasks into Parquet (synthetic or real text)")
    dd.add_argument("--out", default=None, help="output directory")
    dd.add_argument("--rows", type=int, default=2048)
    dd.add_argument("--lengths", default="1024,2048,4096",
                    help="comma-separated sequence lengths (tokens), or a range LO-HI of random lengths "
                         "(log-uniform, never a multiple of the 2048-token chunk)")
    dd.add_argument("--multikey-share", type=float, default=0.4)
    dd.add_argument("--prose-share", type=float, default=0.2, help="synthetic fillers: share of generated prose")
    dd.add_argument("--group-rows", type=int, default=16, help="rows of one length per Parquet row group")
    dd.add_argument("--files", type=int, default=4)
    dd.add_argument("--seed", type=int, default=0)
    dd.add_argument("--text", default=None,
                    help="real-text haystacks: 'train' (the pinned training sources), source names or paths, "
                         "comma-separated; default: synthetic fillers only (see --list-sources)")
    dd.add_argument("--text-cache", default="data/text", help="where fetched sources are kept (default data/text)")
    dd.add_argument("--fetch-text", action="store_true",
                    help="apt-get download the pinned packages of --text (default: train,heldout), check their "
                         "sha256, extract their text into --text-cache")
    dd.add_argument("--list-sources", action="store_true", help="print the pinned text sources and their split")
    dd.add_argument("--allow-heldout", action="store_true", help="let --text name held-out (evaluation) sources")
    dd.add_argument("--synthetic-share", type=float, default=0.1, help="with --text: rows on synthetic fillers")
    dd.add_argument("--mix-share", type=float, default=0.3, help="with --text: haystacks of 2-3 sources in a row")
    dd.add_argument("--max-keys", type=int, default=4, help="multikey rows have 1..max-keys needle lines")
    dd.add_argument("--boundary-share", type=float, default=0.0,
                    help="with a range of --lengths: the share of row groups that end 1..--boundary-tail "
                         "tokens past a chunk boundary (the question or the answer at or across it)")
    dd.add_argument("--boundary-tail", type=int, default=160,
                    help="how far past the boundary those groups end (160 covers a multi-key question and "
                         "answer; <= 10 puts the answer itself across the boundary)")
    dd.add_argument("--eos", action="store_true", help="end each sequence with the eos token right after the answer")
    dd.add_argument("--workers", type=int, default=1, help="with --text: processes writing files in parallel")
    dd.set_defaults(func=cmd_data)

    e = sub.add_parser("eval", help="long-context retrieval accuracy (passkey, multikey) over a mesh")
    e.add_argument("task", choices=("passkey", "multikey"))
    mesh_args(e)
    e.add_argument("--lengths", default="4096,32768,131072", help="comma-separated context lengths (tokens)")
    e.add_argument("--modes", default="exact,blockwise", help="registration modes, comma-separated")
    e.add_argument("--samples", type=int, default=20, help="needles per length and mode (depths spread 0-100%%)")
    e.add_argument("--keys", type=int, default=4, help="needle lines per multikey context")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--source", default="synthetic",
                   help="haystack text: 'synthetic' (the standard filler), a held-out source "
                        "(kjv, debian-reference, debian-docs; see `expertmesh data --list-sources`) or a text file")
    e.add_argument("--text-cache", default="data/text", help="where fetched text sources are kept")
    e.add_argument("--offsets", default=None,
                   help="comma-separated offsets of the question's first token within an attention chunk "
                        "(negative: from the chunk's end), one cell each; default: where the length puts it")
    e.add_argument("--random-offsets", action="store_true",
                   help="each sample's question at a random offset within a chunk (lengths within half a "
                        "chunk of the stated ones, not multiples of it)")
    e.add_argument("--json", default=None, help="write the results here")
    e.set_defaults(func=cmd_eval)

    u = sub.add_parser("upcycle", help="a dense checkpoint or GGUF -> a MoE whose experts copy its MLP "
                                       "(sparse upcycling; function-preserving at step 0)")
    from expertmesh.pipelines.upcycle import add_arguments as add_upcycle_arguments

    add_upcycle_arguments(u)
    u.set_defaults(func=cmd_upcycle)

    from expertmesh.cli.dashboard import add_parser as add_dashboard_parser
    from expertmesh.cli.k8s_status import add_parser as add_k8s_parser
    from expertmesh.cli.pool import add_parser as add_pool_parser

    add_k8s_parser(sub)
    add_pool_parser(sub)
    add_dashboard_parser(sub)

    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:  # everything after "--" goes to the submitted job's module
        cut = argv.index("--")
        argv, rest = argv[:cut], argv[cut + 1:]
    args = parser.parse_args(argv)
    args.rest = rest
    args.argv = argv + (["--", *rest] if rest else [])
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
