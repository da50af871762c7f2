"""Progress of long work on the terminal: a context's registration (tokens/s, an estimate)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def registration_bar(num_tokens: int, what: str = "registering") -> Iterator[Callable[[dict], None]]:
    """A progress bar on stderr fed by `Mesh.register_context(progress=...)`'s views: tokens done
    of all, tokens/s and the time left."""
    from tqdm import tqdm

    bar = tqdm(total=num_tokens, unit="tok", unit_scale=True, desc=what, file=sys.stderr, mininterval=0.5,
               dynamic_ncols=True, leave=True)

    def update(view: dict) -> None:
        bar.update(max(0, int(view.get("tokens_done", 0)) - bar.n))

    try:
        yield update
    finally:
        bar.close()
