"""Errors users of the platform can catch by name."""


class ExpertMeshError(Exception):
    """Base class of expertmesh's own errors."""


class ContextNotFound(ExpertMeshError, KeyError):
    """A context id that is not registered (or was dropped)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else "context not found"


class CapacityError(ExpertMeshError):
    """A context that does not fit in the mesh's context shards."""


class UnsupportedArchitecture(ExpertMeshError, ValueError):
    """A checkpoint whose architecture expertmesh cannot run."""


class CheckpointError(ExpertMeshError, FileNotFoundError):
    """A checkpoint directory that is incomplete or unreadable."""
