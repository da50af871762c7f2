"""Loaded by every Python process the test session starts (its PYTHONPATH names this folder):
a Ray cluster such a process starts (`expertmesh serve`, `ray start`, a job's driver) starts its
workers through the session's zygote too (tests/zygote.py). Only Ray's constants module is
touched, once it is imported; nothing is imported here. The zygote's client falls back to Ray's
own worker start in another network namespace (the multi-host suite's hosts)."""

import os
import sys

if os.environ.get("EXPERTMESH_TEST_ZYGOTE") and os.environ.get("EXPERTMESH_TEST_ZYGOTE_CLIENT"):

    class _RayConstants:
        """On `ray._private.ray_constants`' import: point its setup-worker file at the client."""

        def find_spec(self, name, path, target=None):
            if name != "ray._private.ray_constants":
                return None
            sys.meta_path.remove(self)
            import importlib.util

            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                module.SETUP_WORKER_FILENAME = os.environ["EXPERTMESH_TEST_ZYGOTE_CLIENT"]

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _RayConstants())
