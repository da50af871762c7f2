import pytest
import torch

from expertmesh.model.attention import AttentionSpec, merge_partials, partial_attention, visible


def reference(q, q_pos, k, v, k_pos, spec):
    groups = q.shape[1] // k.shape[1]
    kh, vh = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    s = torch.einsum("thd,shd->hts", q, kh) * spec.scale
    s = s.masked_fill(~visible(q_pos, k_pos, spec)[None], float("-inf"))
    return torch.einsum("hts,shd->thd", torch.softmax(s, -1), vh)


@pytest.mark.parametrize("spec", [AttentionSpec(0.25), AttentionSpec(0.25, chunk_size=8),
                                  AttentionSpec(0.25, window=5)])
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_merge_of_partials_is_exact(spec, parts):
    g = torch.Generator().manual_seed(parts)
    t, hq, hkv, d = 37, 4, 2, 16
    q, k, v = torch.randn(t, hq, d, generator=g), torch.randn(t, hkv, d, generator=g), torch.randn(t, hkv, d, generator=g)
    pos = torch.arange(100, 100 + t)
    cuts = sorted(torch.randperm(t - 1, generator=g)[: parts - 1].add(1).tolist())
    bounds = [0, *cuts, t]
    partials = [partial_attention(q, pos, k[a:b], v[a:b], pos[a:b], spec) for a, b in zip(bounds, bounds[1:])]
    out, lse = merge_partials(partials)
    assert torch.allclose(out, reference(q, pos, k, v, pos, spec), atol=1e-5)
    assert torch.isfinite(lse).all()


def test_part_with_no_visible_key_is_neutral():
    q, k, v = torch.randn(3, 2, 8), torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    out, lse = partial_attention(q, torch.arange(3), k, v, torch.arange(10, 14), AttentionSpec(0.3))
    assert torch.isinf(lse).all() and (lse < 0).all() and (out == 0).all()
    full = partial_attention(q, torch.arange(3), k[:3], v[:3], torch.arange(3), AttentionSpec(0.3))
    merged = merge_partials([full, (out, lse)])
    assert torch.allclose(merged[0], full[0])


def test_prompt_over_context_needs_no_mask_and_matches_reference():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(5, 4, 8, generator=g), torch.randn(50, 4, 8, generator=g), torch.randn(50, 4, 8, generator=g)
    spec = AttentionSpec(0.35)
    out, _ = partial_attention(q, torch.arange(50, 55), k, v, torch.arange(50), spec)
    assert torch.allclose(out, reference(q, torch.arange(50, 55), k, v, torch.arange(50), spec), atol=1e-5)
