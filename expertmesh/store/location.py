"""A store's location: a local directory, or a URI through `pyarrow.fs` (`file://`, `s3://`, `gs://`).

Layout under the root:

    STORE.json              format and the fingerprint of the model that wrote the store
    contexts/<id>.json      one manifest per context (written last, atomically)
    segments/<file>.kv      segment page files (`expertmesh.store.pages`)
    members/<id>.json       leases of the meshes using the store now (members.py)
    pending/<id>.json       registrations in flight: their member and segment files
    dropped/<id>.json       dropped contexts whose files wait out the grace period
    tmp/                    files being written; what dead members left is removed

A local directory is read in place (memory-mapped). A URI store is written through the
filesystem's output streams (an object store's PUT is atomic) and read from a local cache
copy of each segment file, which is then memory-mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import NamedTuple

STORE_FORMAT = "expertmesh-store/1"
DIRECTORIES = ("contexts", "segments", "members", "pending", "dropped")
SCRATCH_TTL_S = 600.0  # an atomic small-file write older than this was interrupted


class StoreMismatch(Exception):
    """A store written by another model (or format) than the mesh's."""


class Stamp(NamedTuple):
    """What a listing says of a file, to tell a rewritten one without reading it. A local
    directory's is exact (an atomic write is a new inode); an object store's is its mtime and
    size, and a same-size rewrite within the mtime's resolution looks unchanged."""

    inode: int | None
    mtime_ns: int | None
    size: int


def _cache_root() -> Path:
    return Path(os.environ.get("EXPERTMESH_CACHE", Path.home() / ".cache" / "expertmesh"))


class StoreLocation:
    def __init__(self, location: str | os.PathLike) -> None:
        text = str(location)
        self.uri = text
        self.local: Path | None = None
        if "://" in text:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.FileSystem.from_uri(text)
            self.root = self.root.rstrip("/")
            self.cache = _cache_root() / "kv" / hashlib.sha256(text.encode()).hexdigest()[:16]
            self.cache.mkdir(parents=True, exist_ok=True)
            for sub in DIRECTORIES:
                self.fs.create_dir(f"{self.root}/{sub}", recursive=True)
            self.scratch = self.cache / "tmp"
        else:
            self.local = Path(text).expanduser().resolve()
            for sub in (*DIRECTORIES, "tmp"):
                (self.local / sub).mkdir(parents=True, exist_ok=True)
            self.scratch = self.local / "tmp"
        self.scratch.mkdir(parents=True, exist_ok=True)

    # -- small files (STORE.json, manifests) -------------------------------------------------
    def read_bytes(self, rel: str) -> bytes | None:
        if self.local is not None:
            p = self.local / rel
            return p.read_bytes() if p.is_file() else None
        import pyarrow.fs as pafs

        if self.fs.get_file_info(f"{self.root}/{rel}").type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(f"{self.root}/{rel}") as f:
            return f.read()

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Atomic: a reader sees the old file or the new one, never a part."""
        if self.local is not None:
            tmp = self.scratch / f"{uuid.uuid4().hex}.part"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.local / rel)
            _fsync_dir(self.local / rel)
            return
        with self.fs.open_output_stream(f"{self.root}/{rel}") as f:
            f.write(data)

    def delete(self, rel: str) -> None:
        if self.local is not None:
            (self.local / rel).unlink(missing_ok=True)
            return
        try:
            self.fs.delete_file(f"{self.root}/{rel}")
        except FileNotFoundError:
            pass
        if rel.startswith("segments/"):
            (self.cache / Path(rel).name).unlink(missing_ok=True)

    def list(self, sub: str) -> list[str]:
        """File names directly under contexts/ or segments/."""
        return sorted(self.stamps(sub))

    def stamps(self, sub: str) -> dict[str, Stamp]:
        """File names directly under `sub`, each with its stamp; one listing."""
        if self.local is not None:
            out = {}
            with os.scandir(self.local / sub) as entries:
                for e in entries:
                    try:
                        if e.is_file():
                            st = e.stat()
                            out[e.name] = Stamp(st.st_ino, st.st_mtime_ns, st.st_size)
                    except FileNotFoundError:  # deleted while listed
                        continue
            return out
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(f"{self.root}/{sub}", allow_not_found=True))
        return {i.base_name: Stamp(None, i.mtime_ns, i.size) for i in infos if i.type == pafs.FileType.File}

    # -- segment files ------------------------------------------------------------------------
    def scratch_file(self, name: str) -> Path:
        """A local file to write a segment into before `publish`."""
        return self.scratch / f"{name}.{uuid.uuid4().hex[:8]}.part"

    def publish(self, tmp: Path, name: str) -> None:
        """Move a finished segment file to segments/<name> (atomic rename or one upload)."""
        if self.local is not None:
            os.replace(tmp, self.local / "segments" / name)
            _fsync_dir(self.local / "segments" / name)
            return
        with open(tmp, "rb") as src, self.fs.open_output_stream(f"{self.root}/segments/{name}") as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        os.replace(tmp, self.cache / name)  # the writer's host keeps a local copy to read

    def segment_path(self, name: str) -> Path:
        """A local path to read segments/<name> from (downloaded once for a URI store)."""
        if self.local is not None:
            return self.local / "segments" / name
        local = self.cache / name
        if not local.is_file():
            tmp = self.scratch / f"{name}.{uuid.uuid4().hex[:8]}.download"
            try:
                with self.fs.open_input_stream(f"{self.root}/segments/{name}") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 24)
            except FileNotFoundError:
                tmp.unlink(missing_ok=True)
                return local  # opening it reports the missing file by name
            os.replace(tmp, local)
        return local

    def scratch_files(self) -> list[Path]:
        """The scratch directory's files now (what `clean_scratch` may remove)."""
        return list(self.scratch.iterdir())

    def clean_scratch(self, files: list[Path], keep: set[str] = frozenset()) -> int:
        """Remove leftovers of interrupted writes among `files` (listed by `scratch_files` before
        `keep` was read); returns how many. A segment's scratch file (`<segment>.<random>.part` /
        `.download`) stays while `keep` names its segment (a live registration); a small file's
        (`<random>.part`) while younger than SCRATCH_TTL_S."""
        n, now = 0, time.time()
        for p in files:
            stem = p.name.rsplit(".", 1)[0]  # without .part / .download
            segment = stem.rsplit(".", 1)[0] if "." in stem else None
            try:
                young = now - p.stat().st_mtime < SCRATCH_TTL_S
            except FileNotFoundError:
                continue
            if (segment is not None and segment in keep) or (segment is None and young):
                continue
            p.unlink(missing_ok=True)
            n += 1
        return n

    # -- the store's identity -----------------------------------------------------------------
    def bind(self, fingerprint: str, model: dict) -> None:
        """Bind the store to a model on first use; refuse a store written by another model."""
        raw = self.read_bytes("STORE.json")
        if raw is None:
            self.write_bytes("STORE.json", json.dumps({"format": STORE_FORMAT, "model_fingerprint": fingerprint,
                                                       "model": model, "created": time.time()}, indent=1).encode())
            return
        try:
            have = json.loads(raw)
        except ValueError:
            raise StoreMismatch(f"context store {self.uri}: STORE.json is unreadable") from None
        if have.get("format") != STORE_FORMAT:
            raise StoreMismatch(f"context store {self.uri} has format {have.get('format')!r}; "
                                f"this version reads {STORE_FORMAT!r}")
        if have.get("model_fingerprint") != fingerprint:
            raise StoreMismatch(
                f"context store {self.uri} was written by another model (fingerprint "
                f"{str(have.get('model_fingerprint'))[:16]}..., {have.get('model')}); this mesh runs "
                f"{fingerprint[:16]}... ({model}). Its KV would be wrong for these weights: use another "
                f"store location, or start the mesh with the checkpoint that wrote it")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
