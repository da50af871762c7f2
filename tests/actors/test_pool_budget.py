"""A context shard's default hot-page budget follows where its pool lives: an eighth of host
memory for a host pool; on a GPU, what is free of the shard's share of the GPU (in process, no
Ray; the GPU's memory figures are given to the function, as torch.cuda would report them)."""

import numpy as np
import pytest
import torch

from expertmesh.actors import context_shard as cs
from expertmesh.model.attention import AttentionSpec

GIB = 1 << 30


def test_host_pool_defaults_to_an_eighth_of_host_memory_and_sizes_its_slots_from_it():
    shard = cs.ContextShard(0, [AttentionSpec(scale=0.25)], None, 8, 1, None, None, "float32")
    assert shard.stats()["pool"]["memory_bytes"] is None  # decided when the pool is made
    shard.begin("c", "seg", 0, 40, 1, 2, 16)
    shard.append("c", 0, [np.zeros((40, 2, 16), np.float32)], [np.zeros((40, 2, 16), np.float32)], np.arange(40))
    shard.finish("c")
    pool = shard.stats()["pool"]
    assert pool["memory_bytes"] == cs.host_memory_bytes() // 8
    assert pool["slots"] == pool["memory_bytes"] // (2 * 8 * 2 * 16 * 4)  # K and V pages of 8 x 2 x 16 fp32


def test_gpu_pool_takes_the_free_part_of_its_share(monkeypatch):
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (60 * GIB, 80 * GIB))
    assert cs.default_pool_bytes(gpu, 0.1) == int(0.9 * 8 * GIB)  # its share (1/10 of 80 GiB) is free
    assert cs.default_pool_bytes(gpu, None) == int(0.9 * 60 * GIB)  # a whole GPU: what is free
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2 * GIB, 80 * GIB))
    assert cs.default_pool_bytes(gpu, 0.5) == int(0.9 * 2 * GIB)  # others' weights took the rest
    assert cs.default_pool_bytes(torch.device("cpu"), 0.5) == cs.host_memory_bytes() // 8


def test_a_budget_below_one_byte_is_refused():
    with pytest.raises(ValueError, match="memory_bytes must be >= 1"):
        cs.ContextShard(0, [AttentionSpec(scale=0.25)], None, 8, 1, None, 0, "float32")
