"""Device and dtype names, and the CUDA-only code paths' selection logic (checked on the CPU)."""

from __future__ import annotations

import pytest
import torch

from expertmesh.errors import DeviceError
from expertmesh.model.attention import AttentionSpec, _einsum_lse, _sdpa_lse, batched_decode_attention, lse_kernel
from expertmesh.model.device import (
    DTYPES, check_device_dtype, local_device_error, resolve_device, resolve_dtype,
)
from expertmesh.model.moe import ExpertBank, use_grouped_mm

NO_CUDA = not torch.cuda.is_available()


def test_auto_resolves_to_what_this_process_has():
    dev = resolve_device("auto")
    assert dev.type == ("cpu" if NO_CUDA else "cuda")
    assert resolve_dtype("auto", dev) == (torch.float32 if NO_CUDA else torch.bfloat16)
    assert resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float16", dev) == torch.float16 and resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_fails_in_the_actor_not_on_the_driver():
    assert check_device_dtype("cuda", "bfloat16") == ("cuda", "bfloat16")  # the driver may have no GPU
    assert check_device_dtype("cuda:1", "auto") == ("cuda:1", "auto")
    msg = local_device_error("cuda")
    assert "no CUDA device is visible to this process" in msg and torch.__version__ in msg and "'cpu'" in msg
    with pytest.raises(DeviceError, match="no CUDA device is visible"):
        resolve_device("cuda:0")
    assert isinstance(DeviceError("x"), ValueError) and local_device_error("cpu") is None


def test_bad_names_list_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'auto', 'cpu', 'cuda'.*cuda:N"):
        check_device_dtype("gpu", "auto")
    with pytest.raises(ValueError, match="'auto', 'float32', 'bfloat16', 'float16'"):
        check_device_dtype("cpu", "fp8")
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype("half", torch.device("cpu"))
    with pytest.raises(ValueError):
        resolve_device("cuda:x")
    assert DTYPES == ("auto", "float32", "bfloat16", "float16")


def test_lse_kernel_selection():
    assert lse_kernel("cpu", True, False, 4, 9) == "cpu_flash"
    assert lse_kernel("cuda", False, False, 4, 9) == "cuda_efficient"
    assert lse_kernel("cuda", False, True, 9, 9) == "cuda_efficient"
    assert lse_kernel("cuda", True, False, 4, 9) == "einsum"  # masks: the plain path
    assert lse_kernel("cuda", False, True, 4, 9) == "einsum"  # its causal mask aligns top-left
    assert lse_kernel("mps", False, False, 4, 9) == "einsum"


@pytest.mark.parametrize("causal", [False, True])
def test_einsum_fallback_equals_the_cpu_kernel(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, n, 16, generator=g) for n in (7, 7, 7))
    mask = None if causal else torch.rand(7, 7, generator=g) > 0.3
    o1, l1 = _sdpa_lse(q, k, v, 0.25, mask, causal)
    o2, l2 = _einsum_lse(q, k, v, 0.25, mask, causal)
    seen = torch.isfinite(l2)
    assert torch.allclose(o1[seen], o2[seen], atol=1e-5) and torch.allclose(l1[seen], l2[seen], atol=1e-5)


def test_grouped_expert_matmul_equals_the_loop():
    torch.manual_seed(0)
    bank = ExpertBank(4, 32, 16, first=4).to(torch.bfloat16)
    for p in bank.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 32, dtype=torch.bfloat16)
    experts = torch.randint(4, 8, (40,))
    experts[experts == 6] = 5  # an expert with no rows
    order = torch.argsort(experts - 4, stable=True)
    counts = torch.bincount(experts - 4, minlength=4)
    with torch.no_grad():
        a, b = bank.grouped(x[order], counts), bank.looped(x[order], counts.tolist())
    assert ((a.float() - b.float()).abs().max() / b.float().abs().max()) < 2e-2
    assert not use_grouped_mm(x)  # CPU keeps the loop; bf16 on CUDA takes the grouped kernel
    assert not use_grouped_mm(x.float())


def test_decode_attention_keeps_tensors_on_the_query_device():
    q = torch.randn(2, 4, 8)
    ks = [torch.randn(5, 2, 8), torch.randn(3, 2, 8)]
    out, lse = batched_decode_attention(q, torch.tensor([5, 3]), ks, ks, [torch.arange(5), torch.arange(3)],
                                        AttentionSpec(scale=0.35))
    assert out.shape == (2, 4, 8) and out.dtype == torch.float32 and bool(torch.isfinite(lse).all())
