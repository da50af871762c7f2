"""The `expertmesh` command: `main` (subcommands), `serve`, `pool`, `k8s_status`, `mesh_args`."""

from expertmesh.cli.main import main

__all__ = ["main"]
