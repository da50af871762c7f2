"""Latent segment files (MLA): one tensor per token and layer that is key and value; no V on
disk; sizes as `segment_bytes` says (the figure benchmarks/kv_sizes.py reports); checksums and
the safetensors view hold as for K/V files."""

import numpy as np
import pytest
import torch

from expertmesh.store.pages import PageShape, SegmentFile, StoreCorrupted, segment_bytes

L, D, S, T = 3, 40, 16, 100


def write(path, latent=True, dtype="float32"):
    shape = PageShape(L, -(-T // S), S, 1, D, dtype, latent)
    g = torch.Generator().manual_seed(0)
    k = [torch.randn(T, 1, D, generator=g) for _ in range(L)]
    v = [] if latent else [torch.randn(T, 1, D, generator=g) for _ in range(L)]
    f = SegmentFile.create(path, shape, T, 500)
    f.write(0, [x[:48] for x in k], [x[:48] for x in v], torch.arange(500, 548))
    f.write(48, [x[48:] for x in k], [x[48:] for x in v], torch.arange(548, 600))
    f.finish()
    f.close()
    return shape, k


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_latent_round_trip_value_is_key_and_size_is_the_layout(tmp_path, dtype):
    shape, k = write(tmp_path / "a.kv", dtype=dtype)
    f = SegmentFile.open(tmp_path / "a.kv")
    assert f.shape.latent and f.shape.tensors == ("k",)
    cast = (lambda x: x) if dtype == "float32" else (lambda x: x.to(torch.bfloat16).float())
    for layer in range(L):
        kk, vv, pos = f.read(layer, np.arange(shape.pages))
        assert vv is kk and torch.equal(kk[:T], cast(k[layer])) and pos[:T].tolist() == list(range(500, 600))
    assert f.nbytes == segment_bytes(shape)
    f.close()
    full, _ = write(tmp_path / "b.kv", latent=False, dtype=dtype)
    kv_bytes = shape.layers * shape.pages * shape.page_elems * shape.itemsize
    assert segment_bytes(full) - segment_bytes(shape) == kv_bytes  # exactly the V tensor is gone


def test_latent_safetensors_view_and_checksums(tmp_path):
    from safetensors import safe_open

    _, k = write(tmp_path / "a.kv")
    with safe_open(str(tmp_path / "a.kv"), "pt") as st:
        assert set(st.keys()) == {"pos", "kmin", "kmax", "crc", "k"}
        assert torch.equal(st.get_tensor("k")[2].reshape(-1, 1, D)[:T], k[2])
    f = SegmentFile.open(tmp_path / "a.kv")
    off = f._data + f._off["k"][0] + (2 * f.shape.pages + 3) * f.shape.page_elems * 4 + 7  # layer 2, page 3
    f.close()
    raw = bytearray((tmp_path / "a.kv").read_bytes())
    raw[off] ^= 0xFF
    (tmp_path / "a.kv").write_bytes(bytes(raw))
    f = SegmentFile.open(tmp_path / "a.kv")
    with pytest.raises(StoreCorrupted, match=r"a\.kv: page 3 of layer 2 fails its checksum"):
        f.read(2, np.arange(f.shape.pages))
    f.close()
