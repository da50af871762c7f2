"""The `expertmesh` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="Hugging Face model directory or URI (default: built-in model)")
    p.add_argument("--context-shards", type=int, default=4, help="context shard actors (default 4)")
    p.add_argument("--expert-groups", type=int, default=2, help="expert group actors (default 2)")
    p.add_argument("--address", default=None, help="Ray address to join ('auto' or URL); default: start locally")


def cmd_generate(args: argparse.Namespace) -> int:
    import expertmesh as em

    mesh = em.Mesh.start(checkpoint=args.checkpoint, context_shards=args.context_shards,
                         expert_groups=args.expert_groups, address=args.address)
    try:
        ctx = None
        if args.context_file:
            text = Path(args.context_file).read_text(encoding="utf-8")
            ctx = mesh.register_context(mesh.tokenizer.encode(text), mode=args.mode)
        res = mesh.generate(mesh.tokenizer.encode(args.prompt), context_id=ctx.id if ctx else None,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_shards=args.top_shards, seed=args.seed)
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


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ray import serve

    from expertmesh.pipelines.serve import build_app
    from expertmesh.platform.cluster import connect
    from expertmesh.platform.tenancy import load_tenants

    if args.tenants is None and args.host != "127.0.0.1":
        raise ValueError(f"refusing to bind {args.host} without --tenants: an open server (no API keys) "
                         "only binds 127.0.0.1")
    settings = {"checkpoint": args.checkpoint, "context_shards": args.context_shards,
                "expert_groups": args.expert_groups, "max_queue": args.max_queue,
                "max_completion_tokens": args.max_completion_tokens}
    if args.tenants:  # parsed here (clear errors) and passed inline, so no node needs the file
        settings["tenants"] = load_tenants(args.tenants).model_dump()
    connect(args.address, args.context_shards, args.expert_groups)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(settings), name="expertmesh", route_prefix="/")
    print(f"expertmesh serving on http://{args.host}:{args.port} (OpenAI base URL http://{args.host}:{args.port}/v1)",
          flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.delete("expertmesh")
    serve.shutdown()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from expertmesh.pipelines import demo

    demo.run(context_tokens=args.context_tokens, context_shards=args.context_shards,
             expert_groups=args.expert_groups, checkpoint=args.checkpoint, address=args.address, mode=args.mode)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="expertmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="answer a prompt, optionally over a registered context file")
    _mesh_args(g)
    g.add_argument("--context-file", help="text file registered as the shared context")
    g.add_argument("--mode", choices=("exact", "blockwise"), default="exact")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--top-shards", type=int, default=None, help="visit only the k best-scoring shards")
    g.add_argument("--json", action="store_true", help="print the result as JSON")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible multi-tenant HTTP API on Ray Serve")
    _mesh_args(s)
    s.add_argument("--tenants", default=None, help="tenants YAML (API key hashes and limits)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-queue", type=int, default=256, help="requests admitted at once; more get 503")
    s.add_argument("--max-completion-tokens", type=int, default=4096, help="largest max_tokens a request may ask")
    s.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="the main job: questions over a long shared context")
    _mesh_args(d)
    d.add_argument("--context-tokens", type=int, default=16384)
    d.add_argument("--mode", choices=("exact", "blockwise"), default="exact")
    d.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"expertmesh: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
