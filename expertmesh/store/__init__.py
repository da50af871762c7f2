"""The context store, below the actors (no Ray here).

- pages.py: segment page files (format, checksums, memory-mapped reads)
- manifest.py: what a stored context is
- location.py: a local directory or a pyarrow.fs URI
- catalog.py: the manifests of a store, reuse and clean-up
- tiers.py: which pages are hot in memory, within a byte budget
- registry.py: how a context is cut into segments over the context shards
- fingerprint.py: which weights computed a store's KV
"""

from expertmesh.store.location import StoreMismatch
from expertmesh.store.pages import KV_DTYPES, StoreCorrupted

__all__ = ["KV_DTYPES", "StoreCorrupted", "StoreMismatch"]
