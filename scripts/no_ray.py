"""Run `expertmesh` commands (data generation, scripts/train_plain.py) where Ray is not installed.

The GPU machines lent to this project have PyTorch and pyarrow but no Ray, and Ray's wheel is
larger than what one call may carry. Importing the `expertmesh` package imports the mesh
(`expertmesh.platform.mesh`, which imports Ray) even for code that never uses it: the data
generator and the training step. Where `import ray` fails, this module installs a stand-in
`ray` (any attribute, any call) so those imports succeed; anything that really calls Ray fails.

    python3 scripts/no_ray.py data --out data/demo-train-v2 --text train ...   # = expertmesh data ...
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types


class _Missing:
    """Stands for any Ray attribute: calling it or reading from it gives another stand-in."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __call__(self, *args, **kwargs) -> "_Missing":
        return _Missing(f"{self._name}()")

    def __getattr__(self, key: str) -> "_Missing":
        if key.startswith("__"):
            raise AttributeError(key)
        return _Missing(f"{self._name}.{key}")

    def __mro_entries__(self, bases):  # `class X(ray.SomeError)` at import time
        return (Exception,)

    def __repr__(self) -> str:
        return f"<no Ray: {self._name}>"


class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name == "ray" or name.startswith("ray."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def attr(key: str, prefix: str = spec.name):
            if key.startswith("__"):
                raise AttributeError(key)
            return _Missing(f"{prefix}.{key}")

        module.__getattr__ = attr
        return module

    def exec_module(self, module) -> None:
        pass


def install() -> bool:
    """Install the stand-in if Ray is missing; True if it was installed."""
    try:
        import ray  # noqa: F401
        return False
    except ImportError:
        for name in [m for m in sys.modules if m == "ray" or m.startswith("ray.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _StandIn())
        return True


install()  # at import: worker processes started with "spawn" import this main module first

if __name__ == "__main__":
    from expertmesh.cli import main

    sys.exit(main())
