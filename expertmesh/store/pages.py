"""Segment page files: the K/V of one stored segment, in fixed-size pages, with checksums.

A segment file is a valid safetensors file (any safetensors reader opens it):

    8-byte little-endian header length N | N bytes of JSON header | tensor bytes

Tensors (S = page size, P = pages, L = layers, H = KV heads, D = head dim):

    pos      [P*S]          I64   position of each row; -1 in the last page's padding
    kmin     [L, P, H, D]   F32   element-wise min of the page's keys (Quest summary)
    kmax     [L, P, H, D]   F32   element-wise max
    crc      [L, P]         I64   zlib.crc32 of the page's K bytes then V bytes (latent: K bytes)
    k        [L, P, S, H, D] F32|BF16
    v        [L, P, S, H, D] F32|BF16   (absent in a latent file: there the key is also the value)

Every (layer, page) of `k`/`v` is one contiguous run of bytes, so one page is read alone,
and the pages of one layer are one contiguous run, so a layer streams sequentially. The
header's `__metadata__` carries the format, token count, page size and the crc32 of the
summary tensors (pos, kmin, kmax, crc). Reads are memory-mapped; pages are verified against
their checksum on read, and a mismatch names the file. The data start is aligned to 4096
bytes, so every page of a float32 file starts on an aligned offset.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

FORMAT = "expertmesh-kv/1"
KV_DTYPES = ("float32", "bfloat16")
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16"}
_NP_DTYPE = {"float32": np.float32, "bfloat16": np.uint16}  # bf16 travels as its raw 16 bits
_ALIGN = 4096


class StoreCorrupted(Exception):
    """A stored file is missing, truncated or fails its checksum (the message names the file)."""


@dataclass(frozen=True)
class PageShape:
    layers: int
    pages: int
    page_size: int
    heads: int
    head_dim: int
    kv_dtype: str
    latent: bool = False  # MLA (model/mla.py): one vector per token and layer, both key and value

    @property
    def tensors(self) -> tuple[str, ...]:
        return ("k",) if self.latent else ("k", "v")

    @property
    def page_elems(self) -> int:
        return self.page_size * self.heads * self.head_dim

    @property
    def itemsize(self) -> int:
        return 4 if self.kv_dtype == "float32" else 2

    @property
    def page_bytes(self) -> int:
        """Bytes of one page of K plus one of V (latent: K only) in the file."""
        return len(self.tensors) * self.page_elems * self.itemsize


def _layout(shape: PageShape) -> dict[str, tuple[str, list[int]]]:
    s = shape
    kv = [s.layers, s.pages, s.page_size, s.heads, s.head_dim]
    summ = [s.layers, s.pages, s.heads, s.head_dim]
    return {"pos": ("I64", [s.pages * s.page_size]), "kmin": ("F32", summ), "kmax": ("F32", summ),
            "crc": ("I64", [s.layers, s.pages]), **{name: (_ST_DTYPE[s.kv_dtype], kv) for name in s.tensors}}


_ITEMSIZE = {"I64": 8, "F32": 4, "BF16": 2}


def _header(shape: PageShape, metadata: dict[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    offsets, at, entries = {}, 0, {}
    for name, (dtype, dims) in _layout(shape).items():
        n = int(np.prod(dims)) * _ITEMSIZE[dtype]
        offsets[name] = (at, at + n)
        entries[name] = {"dtype": dtype, "shape": dims, "data_offsets": [at, at + n]}
        at += n
    entries["__metadata__"] = metadata
    text = json.dumps(entries, separators=(",", ":")).encode()
    pad = (-(8 + len(text))) % _ALIGN
    return text + b" " * pad, offsets


def segment_bytes(shape: PageShape) -> int:
    """Bytes of a segment file of this shape: header (aligned) + every tensor of the layout."""
    header, offsets = _header(shape, {"format": FORMAT, "num_tokens": "0", "page_size": "0", "start": "0",
                                      "kv_dtype": shape.kv_dtype, "summary_crc": "0" * 8})
    return 8 + len(header) + max(end for _, end in offsets.values())


def _to_storage(x: torch.Tensor, kv_dtype: str) -> np.ndarray:
    if kv_dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return x.to(torch.float32).numpy()


def _to_float(x: np.ndarray, kv_dtype: str) -> torch.Tensor:
    """Stored rows -> an owned float32 tensor."""
    if kv_dtype == "bfloat16":
        return torch.from_numpy(np.array(x).view(np.int16)).view(torch.bfloat16).float()
    return torch.from_numpy(np.array(x))


class SegmentFile:
    """Pages of one segment in one file: written in page-aligned pieces, read page by page.

    `SegmentFile.create(path, shape, ...)` makes a full-size file and accepts `write`s of
    page-aligned token ranges (readable at once: exact registration attends over the pages
    written so far); `finish()` writes the summaries and flushes. `SegmentFile.open(path)`
    maps an existing file and checks its header and summaries.
    """

    def __init__(self, path: Path, shape: PageShape, num_tokens: int, data_start: int,
                 offsets: dict[str, tuple[int, int]], fd: int, writable: bool) -> None:
        self.path, self.shape, self.num_tokens = path, shape, num_tokens
        self._data, self._off, self._fd, self.writable = data_start, offsets, fd, writable
        size = os.fstat(fd).st_size
        self._mm = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        self.written_pages = shape.pages if not writable else 0
        s = shape
        # views of the mapped file: resident only while read (writes go through pwrite, so a
        # segment being written does not stay in this process's resident memory either)
        self.pos, self.kmin, self.kmax = self._tensor("pos"), self._tensor("kmin"), self._tensor("kmax")
        self.crc = np.zeros((s.layers, s.pages), dtype=np.int64) if writable else self._tensor("crc")
        self.verified = np.zeros((s.layers, s.pages), dtype=bool)  # pages checked since opened

    # -- create / open ----------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path, shape: PageShape, num_tokens: int, start: int) -> "SegmentFile":
        meta = {"format": FORMAT, "num_tokens": str(num_tokens), "page_size": str(shape.page_size),
                "start": str(start), "kv_dtype": shape.kv_dtype, "summary_crc": "0" * 8}
        header, offsets = _header(shape, meta)
        total = 8 + len(header) + max(end for _, end in offsets.values())
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(fd, total)
        os.pwrite(fd, struct.pack("<Q", len(header)) + header, 0)
        return cls(path, shape, num_tokens, 8 + len(header), offsets, fd, writable=True)

    @classmethod
    def open(cls, path: Path) -> "SegmentFile":
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreCorrupted(f"stored segment file {path} is missing") from None
        try:
            size = os.fstat(fd).st_size
            raw = os.pread(fd, 8, 0)
            if len(raw) < 8:
                raise StoreCorrupted(f"stored segment file {path} is truncated ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size, 1 << 26):
                raise StoreCorrupted(f"stored segment file {path} has a bad header length ({n})")
            header = json.loads(os.pread(fd, n, 8))
            meta = header.pop("__metadata__", {})
            if meta.get("format") != FORMAT:
                raise StoreCorrupted(f"stored segment file {path}: format {meta.get('format')!r}, "
                                     f"expected {FORMAT!r}")
            k = header["k"]["shape"]
            shape = PageShape(k[0], k[1], k[2], k[3], k[4], meta["kv_dtype"], latent="v" not in header)
            offsets = {name: tuple(e["data_offsets"]) for name, e in header.items()}
            end = max(b for _, b in offsets.values())
            if size != 8 + n + end:
                raise StoreCorrupted(f"stored segment file {path} is {size:,} bytes; its header says "
                                     f"{8 + n + end:,} (truncated or padded)")
        except (ValueError, KeyError, IndexError, json.JSONDecodeError) as exc:
            os.close(fd)
            raise StoreCorrupted(f"stored segment file {path} has an unreadable header: {exc}") from None
        except StoreCorrupted:
            os.close(fd)
            raise
        seg = cls(path, shape, int(meta["num_tokens"]), 8 + n, offsets, fd, writable=False)
        if f"{seg._summary_crc():08x}" != meta.get("summary_crc"):
            seg.close()
            raise StoreCorrupted(f"stored segment file {path}: page summaries fail their checksum")
        seg._advise_out(seg._data + seg._off["pos"][0], seg._data + seg._off["crc"][1])
        return seg

    # -- writing ----------------------------------------------------------------------------
    def write(self, t0: int, k: list[torch.Tensor], v: list[torch.Tensor], pos: torch.Tensor) -> None:
        """Rows [t0, t0 + T) of the segment: k/v per layer [T, H, D], pos [T]; t0 page-aligned."""
        s = self.shape
        if t0 % s.page_size:
            raise ValueError(f"segment writes start on a page boundary ({s.page_size}); got row {t0}")
        t = len(pos)
        p0, p1 = t0 // s.page_size, -(-(t0 + t) // s.page_size)
        if t0 + t > self.num_tokens:
            raise ValueError(f"rows {t0}..{t0 + t} exceed the segment's {self.num_tokens} tokens")
        n, pad = p1 - p0, (p1 - p0) * s.page_size - t
        rows = np.full(n * s.page_size, -1, dtype=np.int64)
        rows[:t] = pos.numpy()
        self._pwrite("pos", p0 * s.page_size, rows)
        stored = {}
        for name, parts in (("k", k), ("v", v))[:len(s.tensors)]:
            for layer, x in enumerate(parts):
                xs = _to_storage(x, s.kv_dtype)
                if pad:
                    xs = np.concatenate([xs, np.zeros((pad, *xs.shape[1:]), dtype=xs.dtype)])
                stored[name, layer] = xs = np.ascontiguousarray(xs).reshape(n, s.page_size, s.heads, s.head_dim)
                self._pwrite(name, (layer * s.pages + p0) * s.page_elems, xs)
        summ = s.heads * s.head_dim
        for layer, x in enumerate(k):
            xf = x.float()
            if pad:  # padding rows repeat the last key: min/max stay those of the real keys
                xf = torch.cat([xf, xf[-1:].expand(pad, *xf.shape[1:])])
            pages = xf.view(n, s.page_size, s.heads, s.head_dim)
            self._pwrite("kmin", (layer * s.pages + p0) * summ, pages.amin(dim=1).numpy())
            self._pwrite("kmax", (layer * s.pages + p0) * summ, pages.amax(dim=1).numpy())
            kk = stored["k", layer]
            vv = kk if s.latent else stored["v", layer]
            for i in range(n):
                self.crc[layer, p0 + i] = zlib.crc32(vv[i], zlib.crc32(kk[i])) if not s.latent else zlib.crc32(kk[i])
        self.verified[:, p0:p1] = True
        self.written_pages = max(self.written_pages, p1)

    def _pwrite(self, name: str, index: int, arr: np.ndarray) -> None:
        """Write `arr` into tensor `name` from flat element `index` on (through the OS, not the map)."""
        dtype, _ = _layout(self.shape)[name]
        os.pwrite(self._fd, memoryview(np.ascontiguousarray(arr)).cast("B"),
                  self._data + self._off[name][0] + index * _ITEMSIZE[dtype])

    def finish(self) -> None:
        """Write the checksums and the header's summary checksum, flush to disk; the file is then final."""
        self._pwrite("crc", 0, self.crc)
        self.crc = self._tensor("crc")
        n = struct.unpack("<Q", os.pread(self._fd, 8, 0))[0]
        header = json.loads(os.pread(self._fd, n, 8))
        header["__metadata__"]["summary_crc"] = f"{self._summary_crc():08x}"
        text = json.dumps(header, separators=(",", ":")).encode()
        os.pwrite(self._fd, text + b" " * (n - len(text)), 8)  # same length: the crc field has fixed width
        os.fsync(self._fd)
        self._advise_out(0, self._data + max(b for _, b in self._off.values()))

    # -- reading ----------------------------------------------------------------------------
    def read(self, layer: int, pages: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k, v [n*S, H, D] float32 and pos [n*S] of the given pages (sorted), checksums verified."""
        s = self.shape
        kk = self._tensor("k")
        vv = kk if s.latent else self._tensor("v")
        pages = np.asarray(pages, dtype=np.int64)
        if len(pages) and int(pages.max()) >= self.written_pages:
            raise ValueError(f"page {int(pages.max())} of {self.path.name} is not written yet")
        if len(pages) and len(pages) == int(pages[-1]) - int(pages[0]) + 1:  # one run: slices
            ks, vs = kk[layer, pages[0]:pages[-1] + 1], vv[layer, pages[0]:pages[-1] + 1]
        else:
            ks, vs = kk[layer, pages], vv[layer, pages]
        unchecked = pages[~self.verified[layer, pages]]
        for p in unchecked.tolist():
            crc = zlib.crc32(kk[layer, p]) if s.latent else zlib.crc32(vv[layer, p], zlib.crc32(kk[layer, p]))
            if crc != int(self.crc[layer, p]):
                raise StoreCorrupted(f"stored segment file {self.path}: page {p} of layer {layer} fails "
                                     f"its checksum")
        self.verified[layer, unchecked] = True
        k = _to_float(ks, s.kv_dtype).view(-1, s.heads, s.head_dim)
        v = k if s.latent else _to_float(vs, s.kv_dtype).view(-1, s.heads, s.head_dim)
        rows = (pages[:, None] * s.page_size + np.arange(s.page_size)[None]).reshape(-1)
        pos = torch.from_numpy(self.pos[rows])
        self._release(layer, pages)
        return k, v, pos

    def _release(self, layer: int, pages: np.ndarray) -> None:
        """Drop the mapped pages from this process's resident set (they stay in the OS cache)."""
        if not len(pages):
            return
        s = self.shape
        for name in s.tensors:
            a, _ = self._off[name]
            base = self._data + a + (layer * s.pages) * s.page_elems * s.itemsize
            self._advise_out(base + int(pages[0]) * s.page_elems * s.itemsize,
                             base + (int(pages[-1]) + 1) * s.page_elems * s.itemsize)

    def _advise_out(self, lo: int, hi: int) -> None:
        lo -= lo % mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)
        except (OSError, AttributeError, ValueError):
            pass

    def _tensor(self, name: str) -> np.ndarray:
        a, b = self._off[name]
        dtype, dims = _layout(self.shape)[name]
        np_dtype = {"I64": np.int64, "F32": np.float32, "BF16": np.uint16}[dtype]
        return np.frombuffer(self._mm, dtype=np_dtype, count=(b - a) // _ITEMSIZE[dtype],
                             offset=self._data + a).reshape(dims)

    def _summary_crc(self) -> int:
        crc = 0
        for name in ("pos", "kmin", "kmax", "crc"):
            crc = zlib.crc32(np.ascontiguousarray(getattr(self, name)), crc)
        return crc

    @property
    def nbytes(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._mm is not None:
            self.pos = self.kmin = self.kmax = self.crc = None  # views of the mapping go before it closes
            try:
                self._mm.close()
            except BufferError:  # a view is still alive somewhere; the GC unmaps it later
                pass
            os.close(self._fd)
            self._mm = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
