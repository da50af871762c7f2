"""JAX compute for context shards and expert groups (TPU hosts, or any host where JAX is the
framework). No Ray here: `attention.py` (partial attention with log-sum-exp, its merge, the
Quest page bound) and `experts.py` (grouped SwiGLU experts), both jitted over bucketed static
shapes so a running mesh compiles each shape once.

Importing this package does not import JAX; `require_jax()` does, with a clear error where
JAX is not installed. Torch-only users never import it.
"""

from __future__ import annotations

import importlib

BACKENDS = ("torch", "jax")


def check_backend(what: str, value: str) -> str:
    """A compute backend name, or a ValueError naming the accepted ones."""
    if value not in BACKENDS:
        raise ValueError(f"{what} must be one of {BACKENDS}, got {value!r}")
    return value


_MISSING = ("the JAX backend needs JAX, which is not installed here{why}; install it with "
            "`pip install 'expertmesh[jax]'` (TPU hosts: `pip install 'jax[tpu]'`)")


def require_jax():
    """The `jax` module, or an ImportError that names the extra to install."""
    try:
        return importlib.import_module("jax")
    except ImportError as exc:
        raise ImportError(_MISSING.format(why=f" ({exc})")) from None


def check_jax_installed() -> None:
    """Raise the ImportError of `require_jax` where JAX is missing, without importing it (a
    driver that imports JAX before Ray forks its processes risks a deadlock)."""
    import importlib.util
    import sys

    found = sys.modules["jax"] is not None if "jax" in sys.modules else importlib.util.find_spec("jax") is not None
    if not found:
        raise ImportError(_MISSING.format(why=""))


def bucket(n: int, lo: int = 8) -> int:
    """The static size n is padded to: the next power of two, at least lo."""
    size = lo
    while size < n:
        size *= 2
    return size


def configure_jax(num_threads: int | None = None):
    """Import JAX for an actor (clear error where it is missing). With a CPU share of one
    thread, XLA's CPU runtime is kept to one thread too (set before JAX first loads)."""
    import os
    import sys

    if num_threads == 1 and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_cpu_multi_thread_eigen" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return require_jax()
