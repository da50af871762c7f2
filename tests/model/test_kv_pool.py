"""The router's paged pool of requests' own KV (kv_pool.py) holds what per-request KVCaches hold:
same rows and positions per layer after ragged appends, growth and truncation; padded reads equal
the padded per-request keys; a collected request's pages come back and an idle pool shrinks."""

import gc

import torch

from expertmesh.model.attention import AttentionSpec, batched_decode_attention, padded_decode_attention
from expertmesh.model.kv_cache import KVCache
from expertmesh.model.kv_pool import FIRST_PAGES, PAGE, KVPool


def test_the_pool_holds_what_per_request_caches_hold():
    g = torch.Generator().manual_seed(0)
    pool, layers = KVPool(2), 2
    seqs = [pool.handle() for _ in range(5)]
    refs = [KVCache(layers) for _ in seqs]
    lens = [0] * 5
    for step in range(40):  # ragged prefills then decodes; the pool grows past its first pages
        counts = [int(torch.randint(1, 90 if step < 3 else 2, (1,), generator=g)) for _ in seqs]
        for layer in range(layers):
            k = torch.randn(sum(counts), 2, 4, generator=g)
            v = torch.randn(sum(counts), 2, 4, generator=g)
            pos = torch.cat([torch.arange(n0, n0 + n) for n0, n in zip(lens, counts)])
            pool.append(layer, seqs, counts, k, v, pos)
            a = 0
            for ref, n in zip(refs, counts):
                ref.append(layer, k[a:a + n], v[a:a + n], pos[a:a + n])
                a += n
        lens = [n0 + n for n0, n in zip(lens, counts)]
        if step == 20:  # a failed step's rows are forgotten, then written again
            for s, r in zip(seqs, refs):
                s.truncate(lens[0] - 1 if len(s) > lens[0] - 1 else len(s))
                r.truncate(lens[0] - 1 if len(r) > lens[0] - 1 else len(r))
            lens = [len(r) for r in refs]
    assert pool.pages > FIRST_PAGES
    for s, r in zip(seqs, refs):
        assert len(s) == len(r)
        for layer in range(layers):
            for got, want in zip(s.get(layer), r.get(layer)):
                assert torch.equal(got, want)
    q = torch.randn(5, 4, 4, generator=g)
    q_pos = torch.tensor([len(r) - 1 for r in refs])
    for spec in (AttentionSpec(0.3), AttentionSpec(0.3, chunk_size=32), AttentionSpec(0.3, window=7)):
        k, v, pos = pool.padded(1, seqs)
        want = batched_decode_attention(q, q_pos, *zip(*[r.get(1) for r in refs]), spec)
        got = padded_decode_attention(q, q_pos, k, v, pos, spec)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_pages_come_back_and_an_idle_pool_lets_its_memory_go():
    pool = KVPool(1)
    keep, burst = pool.handle(), [pool.handle() for _ in range(4)]
    rows = PAGE * FIRST_PAGES  # the burst needs more than the first pages
    pool.append(0, [keep, *burst], [3] + [rows // 2] * 4, torch.ones(3 + 2 * rows, 1, 2),
                torch.ones(3 + 2 * rows, 1, 2), torch.arange(3 + 2 * rows))
    assert pool.pages > FIRST_PAGES and pool.used_pages == 1 + 4 * (rows // 2 // PAGE)
    del burst
    gc.collect()
    pool.append(0, [keep], [1], torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.tensor([3]))
    assert pool.used_pages == 1 and len(keep) == 4  # the burst's pages are back; the pool is in use: it stays
    del keep
    gc.collect()
    new = pool.handle()
    pool.append(0, [new], [1], torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.tensor([0]))
    assert pool.pages == FIRST_PAGES and pool.used_pages == 1  # idle: back to its first size
