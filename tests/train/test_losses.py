"""Training math, no Ray: the batched forward and the losses against their references."""

from __future__ import annotations

import pytest
import torch
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

from expertmesh.model.batched import forward_batch
from expertmesh.model.block import init_weights
from expertmesh.model.checkpoint import load_model
from expertmesh.model.config import ModelConfig
from expertmesh.model.default import DEFAULT_HF_CONFIG
from expertmesh.model.losses import load_balancing_loss, router_z_loss, token_loss
from expertmesh.model.transformer import MoETransformer


@pytest.mark.parametrize("arch", ["mixtral", "llama4", "qwen2moe"])
def test_batched_forward_equals_single_sequence_forward(arch, tiny_checkpoint):
    model = load_model(tiny_checkpoint(arch))
    ids = torch.randint(3, 290, (3, 40))
    with torch.no_grad():
        logits, router = forward_batch(model, ids)
        for b in range(3):
            ref, ref_router = model(ids[b], return_router_logits=True)
            assert torch.allclose(logits[b], ref, atol=1e-4), (logits[b] - ref).abs().max()
            for got, want in zip(router, ref_router):
                assert torch.allclose(got.view(3, 40, -1)[b], want, atol=1e-5)


def test_batched_forward_chunked_layers_cross_chunks():
    """Default architecture with small chunks: sequences spanning several chunks, one ragged."""
    cfg = ModelConfig.from_hf({**DEFAULT_HF_CONFIG, "attention_chunk_size": 16, "floor_scale": 8})
    model = MoETransformer(cfg)
    init_weights(model, seed=3)
    ids = torch.randint(4, 260, (2, 45))
    with torch.no_grad():
        logits, _ = forward_batch(model, ids)
        for b in range(2):
            assert torch.allclose(logits[b], model(ids[b]), atol=1e-4)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_load_balancing_loss_equals_hugging_face(top_k, masked):
    gen = torch.Generator().manual_seed(top_k)
    logits = [torch.randn(4 * 30, 8, generator=gen) for _ in range(3)]
    mask = None
    if masked:
        mask = torch.ones(4, 30)
        mask[1, 20:] = 0
        mask[3, 5:] = 0
    ours = load_balancing_loss(logits, 8, top_k, mask)
    theirs = load_balancing_loss_func(tuple(logits), 8, top_k, mask)
    assert torch.allclose(ours, theirs, atol=1e-6), (ours, theirs)


def test_load_balancing_loss_is_one_when_balanced_and_higher_when_not():
    balanced = [torch.eye(4).repeat(25, 1) * 5]  # every expert chosen equally, probs symmetric
    skewed = [torch.tensor([[5.0, 0, 0, 0]]).repeat(100, 1)]
    assert load_balancing_loss(balanced, 4, 1).item() == pytest.approx(1.0, abs=1e-5)
    assert load_balancing_loss(skewed, 4, 1).item() > 2.5


def test_z_loss_and_token_loss():
    logits = [torch.zeros(6, 4)]
    assert router_z_loss(logits).item() == pytest.approx(torch.log(torch.tensor(4.0)).item() ** 2)
    lg = torch.zeros(1, 3, 5)
    lg[0, 0, 2] = 10.0  # right at position 0, uniform elsewhere
    targets = torch.tensor([[2, 1, 0]])
    only_first = token_loss(lg, targets, torch.tensor([[1.0, 0.0, 0.0]]))
    both = token_loss(lg, targets, torch.tensor([[1.0, 1.0, 0.0]]))
    assert only_first.item() < 1e-3
    assert both.item() == pytest.approx((only_first.item() + torch.log(torch.tensor(5.0)).item()) / 2, rel=1e-3)
