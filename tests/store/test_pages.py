"""Segment page files: round trips, single-page reads, checksums that catch corruption."""

import numpy as np
import pytest
import torch

from expertmesh.store.pages import PageShape, SegmentFile, StoreCorrupted

L, H, D, S = 3, 2, 8, 16


def kv(t, seed=0, heads=H, dim=D, latent=False):
    g = torch.Generator().manual_seed(seed)
    k = [torch.randn(t, heads, dim, generator=g) for _ in range(L)]
    return k, ([] if latent else [torch.randn(t, heads, dim, generator=g) for _ in range(L)])


def write(path, t=100, start=1000, dtype="float32", pieces=(32, 48, 20), heads=H, dim=D, latent=False):
    """A segment file written in `pieces`; (k, v) as written (latent: v is [])."""
    shape = PageShape(L, -(-t // S), S, heads, dim, dtype, latent)
    k, v = kv(t, heads=heads, dim=dim, latent=latent)
    f = SegmentFile.create(path, shape, t, start)
    at = 0
    for n in pieces:
        f.write(at, [x[at:at + n] for x in k], [x[at:at + n] for x in v], torch.arange(start + at, start + at + n))
        at += n
    f.finish()
    f.close()
    return k, v


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_every_page_and_single_pages(tmp_path, dtype):
    k, v = write(tmp_path / "a.kv", dtype=dtype)
    f = SegmentFile.open(tmp_path / "a.kv")
    assert f.num_tokens == 100 and f.shape.pages == 7
    cast = (lambda x: x) if dtype == "float32" else (lambda x: x.to(torch.bfloat16).float())
    for layer in range(L):
        kk, vv, pos = f.read(layer, np.arange(7))
        assert torch.equal(kk[:100], cast(k[layer])) and torch.equal(vv[:100], cast(v[layer]))
        assert pos[:100].tolist() == list(range(1000, 1100)) and (pos[100:] == -1).all()
        one, _, p = f.read(layer, np.array([3]))  # one page alone
        assert torch.equal(one, cast(k[layer][48:64])) and p.tolist() == list(range(1048, 1064))
        assert np.allclose(f.kmin[layer, 6], k[layer][96:100].amin(0).numpy())  # partial page: real keys only
        assert np.allclose(f.kmax[layer, 0], k[layer][:16].amax(0).numpy())
    f.close()


def test_file_is_readable_by_safetensors(tmp_path):
    from safetensors import safe_open

    k, _ = write(tmp_path / "a.kv")
    with safe_open(str(tmp_path / "a.kv"), "pt") as st:
        assert st.metadata()["format"] == "expertmesh-kv/1"
        assert torch.equal(st.get_tensor("k")[1].reshape(-1, H, D)[:100], k[1])


def flip_key_byte(path, layer: int, page: int, at: int = 5) -> None:
    """Corrupt one byte of a page's K (fp32 file)."""
    f = SegmentFile.open(path)
    off = f._data + f._off["k"][0] + (layer * f.shape.pages + page) * f.shape.page_elems * 4 + at
    f.close()
    raw = bytearray(path.read_bytes())
    raw[off] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupted_page_names_the_file_and_page(tmp_path):
    write(tmp_path / "a.kv")
    flip_key_byte(tmp_path / "a.kv", 1, 2)
    f = SegmentFile.open(tmp_path / "a.kv")  # summaries intact: opens
    f.read(1, np.array([0, 1]))  # other pages still read
    with pytest.raises(StoreCorrupted, match=r"a\.kv: page 2 of layer 1 fails its checksum"):
        f.read(1, np.arange(7))
    f.close()


def test_corrupted_summaries_truncated_and_missing_files(tmp_path):
    write(tmp_path / "a.kv")
    raw = bytearray((tmp_path / "a.kv").read_bytes())
    f = SegmentFile.open(tmp_path / "a.kv")
    off = f._data + f._off["kmin"][0] + 3
    f.close()
    bad = bytearray(raw)
    bad[off] ^= 0x01
    (tmp_path / "b.kv").write_bytes(bytes(bad))
    with pytest.raises(StoreCorrupted, match="b.kv: page summaries fail their checksum"):
        SegmentFile.open(tmp_path / "b.kv")
    (tmp_path / "c.kv").write_bytes(bytes(raw[:-100]))
    with pytest.raises(StoreCorrupted, match="c.kv is .* bytes; its header says"):
        SegmentFile.open(tmp_path / "c.kv")
    (tmp_path / "d.kv").write_bytes(b"\x00" * 4)
    with pytest.raises(StoreCorrupted, match="d.kv is truncated"):
        SegmentFile.open(tmp_path / "d.kv")
    with pytest.raises(StoreCorrupted, match="e.kv is missing"):
        SegmentFile.open(tmp_path / "e.kv")


def test_writes_must_start_on_page_boundaries(tmp_path):
    shape = PageShape(L, 2, S, H, D, "float32")
    f = SegmentFile.create(tmp_path / "a.kv", shape, 32, 0)
    k, v = kv(8)
    with pytest.raises(ValueError, match="page boundary"):
        f.write(3, k, v, torch.arange(3, 11))
    with pytest.raises(ValueError, match="not written yet"):
        f.read(0, np.array([1]))
    f.close()
