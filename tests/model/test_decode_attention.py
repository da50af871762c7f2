import pytest
import torch

from expertmesh.model.attention import AttentionSpec, batched_decode_attention, partial_attention


@pytest.mark.parametrize("spec", [AttentionSpec(0.2), AttentionSpec(0.2, chunk_size=4), AttentionSpec(0.2, window=3)])
def test_batched_decode_equals_per_sequence(spec):
    g = torch.Generator().manual_seed(3)
    lengths = [1, 5, 9, 12]
    ks = [torch.randn(n, 2, 8, generator=g) for n in lengths]
    vs = [torch.randn(n, 2, 8, generator=g) for n in lengths]
    starts = [100, 37, 0, 64]
    kpos = [torch.arange(s, s + n) for s, n in zip(starts, lengths)]
    qpos = torch.tensor([s + n - 1 for s, n in zip(starts, lengths)])  # the newest token of each
    q = torch.randn(4, 4, 8, generator=g)
    out, lse = batched_decode_attention(q, qpos, ks, vs, kpos, spec)
    for i in range(4):
        o, l = partial_attention(q[i:i + 1], qpos[i:i + 1], ks[i], vs[i], kpos[i], spec)
        assert torch.allclose(out[i], o[0], atol=1e-5) and torch.allclose(lse[i], l[0], atol=1e-5)
