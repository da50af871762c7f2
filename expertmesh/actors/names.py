"""Where a mesh's named actors live, and how a name becomes a handle.

Actors are passed to each other by name (not by handle), so an actor that restarts after its
creator is gone can still find its peers (Ray keeps handles passed as constructor arguments
only while their creator lives).
"""

from __future__ import annotations

import ray

NAMESPACE = "expertmesh"  # where a mesh's named actors live (Mesh.attach, restarts)
CONTEXT_SHARD = "context_shard"
EXPERT_GROUP = "expert_group"
WORKER = "worker"  # a colocated actor: a context shard and an expert group
ROUTER = "router"  # hosts that may run routers, where a cluster declares it (else anywhere)


def actor_name(mesh: str, kind: str | None, index: int = 0) -> str:
    """The name of one actor of a mesh: `<mesh>.router`, `<mesh>.context_shard3`, ...

    A restarted actor runs its constructor again with the arguments it was created with; an
    argument holding actor handles lives in its creator's object store and is gone with it (a
    Serve replica that started a detached mesh). The router is therefore given its shards' and
    groups' names and looks them up."""
    if kind is None:  # routers: `<mesh>.router`, `<mesh>.router1`, ...
        return f"{mesh}.router" if index == 0 else f"{mesh}.router{index}"
    return f"{mesh}.{kind}{index}"


def mesh_of(router_name: str | None) -> str | None:
    """The mesh a router's actor name belongs to (`<mesh>.router<i>` -> `<mesh>`)."""
    if not router_name:
        return None
    mesh, sep, tail = router_name.rpartition(".router")
    return mesh if sep and (tail == "" or tail.isdigit()) else None


def own_mesh() -> str | None:
    """The mesh of this actor (`<mesh>.<kind><i>` -> `<mesh>`); None outside a named actor."""
    name = own_name()
    return name.rpartition(".")[0] or None if name else None


def routers_of(mesh: str) -> list[str]:
    """The names of a running mesh's routers, in order."""
    return _running(lambda i: actor_name(mesh, None, i))


def _running(name_of) -> list[str]:
    """name_of(0), name_of(1), ... while an actor of that name exists."""
    names: list[str] = []
    while True:
        name = name_of(len(names))
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            return names
        names.append(name)


def lookup(targets: list) -> list:
    """Actor handles (or in-process objects) as given; names looked up in the mesh namespace."""
    return [ray.get_actor(t, namespace=NAMESPACE) if isinstance(t, str) else t for t in targets]


def present(targets: list) -> list:
    """`lookup`, with None for a name no actor has (an expert group taken out of the mesh)."""
    out = []
    for t in targets:
        try:
            out.append(lookup([t])[0])
        except ValueError:
            out.append(None)
    return out


GAP = 8  # names past the last one found that are tried before a scan stops


def added(kind: str, router_name: str | None, first: int) -> list[str | None]:
    """Names of the context shards or expert groups (`kind`) added to a running mesh
    (`Mesh.add_shards`, `Mesh.add_groups`) from index `first` on, None where one was taken out
    again (`remove_shards`, `remove_groups`): a restarted router finds them (its constructor
    names only the first ones)."""
    mesh = mesh_of(router_name)
    if mesh is None:
        return []
    found: list[str | None] = []
    missing = 0
    while missing < GAP:
        name = actor_name(mesh, kind, first + len(found) + missing)
        try:
            ray.get_actor(name, namespace=NAMESPACE)
        except ValueError:
            missing += 1
            continue
        found += [None] * missing + [name]
        missing = 0
    return found


def own_name() -> str | None:
    """This actor's name (None outside an actor, e.g. an in-process router)."""
    try:
        return ray.get_runtime_context().get_actor_name()
    except Exception:  # noqa: BLE001 - not an actor
        return None
