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


class Unavailable(ExpertMeshError):
    """A part of the mesh is restarting or unreachable; the same request may succeed shortly.

    Retryable (HTTP 503 with `Retry-After`): `retry_after_s` is a hint of when to try again.
    """

    def __init__(self, message: str, retry_after_s: float = 2.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):  # keep retry_after_s through Ray's pickling
        return type(self), (str(self), self.retry_after_s)


class DeadlineExceeded(ExpertMeshError, TimeoutError):
    """A request its router could not finish by the deadline it carried (`Request.deadline`);
    the message says by how much it missed and how far it got."""


class NoTokenizer(ExpertMeshError, ValueError):
    """A text call on a checkpoint without a usable tokenizer (use token ids)."""


class PlacementError(ExpertMeshError, RuntimeError):
    """The cluster cannot place (or start) the mesh's actors; the message names what is missing."""


class DeviceError(ExpertMeshError, ValueError):
    """A device this process cannot use (e.g. `cuda` where no CUDA device is visible)."""


class DataPlaneError(RuntimeError):
    """The process group carrying a router step's tensors broke (an actor died under it); the
    router forms a new one and runs the step again."""


class InvalidRequest(ExpertMeshError, ValueError):
    """A request a mesh actor refused as asked (a layer, expert id or size outside what it
    holds); the message says what is allowed. A ValueError, so callers that catch those keep
    working (HTTP 400)."""


class MeshActorError(ExpertMeshError, RuntimeError):
    """A context shard or expert group failed a step with an error of no more specific kind
    (its type and message are in the text; see dataplane/wire.py for the kinds that keep their class)."""
