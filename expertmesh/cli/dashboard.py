"""`expertmesh dashboard`: the Grafana dashboard over the mesh's Ray metrics (platform/dashboard.py).

    expertmesh dashboard --out expertmesh-dashboard.json   # import in Grafana, or provision it
    expertmesh dashboard                                   # the JSON on standard output
    expertmesh dashboard --queries                         # each panel's PromQL, one a line

The repository ships the same JSON as deploy/grafana/expertmesh-dashboard.json, and the Helm chart
provisions it for Grafana's dashboard sidecar (`monitoring.dashboard.enabled`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("dashboard", help="write the Grafana dashboard (JSON) over the mesh's Ray metrics")
    p.add_argument("--out", default="-", help="file to write (default: standard output)")
    p.add_argument("--queries", action="store_true",
                   help="print each panel's PromQL instead (panel, legend, query; tab-separated)")
    p.set_defaults(func=cmd_dashboard)


def cmd_dashboard(args: argparse.Namespace) -> int:
    from expertmesh.platform import dashboard

    if args.queries:
        text = "".join(f"{title}\t{legend}\t{expr}\n" for title, legend, expr in
                       dashboard.queries(dashboard.dashboard()))
    else:
        text = dashboard.render()
    if args.out == "-":
        sys.stdout.write(text)
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"wrote {out} ({len(text):,} bytes)", file=sys.stderr)
    return 0
