import torch

from expertmesh.model.config import ModelConfig
from expertmesh.model.moe import ExpertBank, dispatch_pairs, expert_partition, route

BASE = dict(architecture="MixtralForCausalLM", vocab_size=10, hidden_size=8, num_layers=1, num_heads=2,
            num_kv_heads=1, head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, rope_style="half",
            use_rope=(True,), chunk_size=(None,), moe_layers=(True,), num_experts=6, moe_intermediate_size=5)


def test_each_token_visits_exactly_k_distinct_experts():
    for k in (1, 2, 3):
        cfg = ModelConfig(**BASE, top_k=k, norm_topk_prob=True)
        experts, weights = route(torch.randn(50, 6), cfg)
        assert experts.shape == (50, k)
        assert all(len(set(row)) == k for row in experts.tolist())
        assert torch.allclose(weights.sum(-1), torch.ones(50))


def test_sigmoid_routing_scales_the_input_not_the_output():
    cfg = ModelConfig(**BASE, top_k=1, routing="sigmoid_topk", expert_input_scaling=True)
    logits = torch.randn(4, 6)
    experts, weights = route(logits, cfg)
    assert torch.equal(experts[:, 0], logits.argmax(-1))
    assert torch.allclose(weights[:, 0], torch.sigmoid(logits.max(-1).values))
    _, _, in_scale, out_w = dispatch_pairs(experts, weights, cfg)
    assert torch.allclose(in_scale, weights[:, 0]) and (out_w == 1).all()


def test_grouped_expert_compute_equals_per_token_loop():
    torch.manual_seed(0)
    bank = ExpertBank(3, 8, 5, first=2)
    for p in bank.parameters():
        torch.nn.init.normal_(p)
    x, experts = torch.randn(40, 8), torch.randint(2, 5, (40,))
    y = bank(x, experts)
    for i in range(40):
        e = experts[i] - 2
        h = torch.nn.functional.silu(bank.gate[e] @ x[i]) * (bank.up[e] @ x[i])
        assert torch.allclose(y[i], bank.down[e] @ h, atol=1e-5)
    for i in range(40):  # one row at a time (the single-row path) gives the same rows
        assert torch.allclose(bank(x[i:i + 1], experts[i:i + 1])[0], y[i], atol=1e-5)


def test_expert_partition_is_balanced_and_complete():
    parts = expert_partition(8, 3)
    assert [len(p) for p in parts] == [3, 3, 2]
    assert [e for p in parts for e in p] == list(range(8))
    try:
        expert_partition(2, 3)
    except ValueError as exc:
        assert "expert_groups (3)" in str(exc) and "num_experts (2)" in str(exc)
    else:
        raise AssertionError("expected ValueError")
