"""Latent segment files (MLA): one tensor per token and layer that is key and value; no V on
disk; sizes as `segment_bytes` says (the figure benchmarks/kv_sizes.py reports); checksums and
the safetensors view hold as for K/V files."""

import numpy as np
import pytest
import torch

from expertmesh.store.pages import PageShape, SegmentFile, StoreCorrupted, segment_bytes
from tests.store.test_pages import L, S, flip_key_byte
from tests.store.test_pages import write as write_file

D, T = 40, 100


def write(path, latent=True, dtype="float32"):
    k, _ = write_file(path, t=T, start=500, dtype=dtype, pieces=(48, 52), heads=1, dim=D, latent=latent)
    return PageShape(L, -(-T // S), S, 1, D, dtype, latent), k


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
    flip_key_byte(tmp_path / "a.kv", 2, 3, at=7)
    f = SegmentFile.open(tmp_path / "a.kv")
    with pytest.raises(StoreCorrupted, match=r"a\.kv: page 3 of layer 2 fails its checksum"):
        f.read(2, np.arange(f.shape.pages))
    f.close()
