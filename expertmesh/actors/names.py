"""Where a mesh's named actors live, and how a name becomes a handle.

Actors are passed to each other by name (not by handle), so an actor that restarts after its
creator is gone can still find its peers (Ray keeps handles passed as constructor arguments
only while their creator lives).
"""

from __future__ import annotations

import ray

NAMESPACE = "expertmesh"  # where a mesh's named actors live (Mesh.attach, restarts)


def lookup(targets: list) -> list:
    """Actor handles (or in-process objects) as given; names looked up in the mesh namespace."""
    return [ray.get_actor(t, namespace=NAMESPACE) if isinstance(t, str) else t for t in targets]
