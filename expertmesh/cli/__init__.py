"""The `expertmesh` command: `main` (its subcommands are in commands.py), `serve`, `pool`, `k8s_status`, `mesh_args`."""

from expertmesh.cli.commands import main

__all__ = ["main"]
