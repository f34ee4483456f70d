"""Attention of a few queries over a position-masked KV cache (kernels/decode_attention.py):
the masked-SDPA reference against an explicit float64 softmax, the Triton FlashDecoding
kernels in Triton's CPU interpreter against the reference (kernel level and through whole
models decoding with the engine), and on a GPU the compiled kernels and the decode engine."""

from __future__ import annotations

import math

import pytest
import torch

from hymba_plus.kernels import decode_attention as A
from hymba_plus.kernels import dispatch
from tests.conftest import rel_err, run_in_interpreter


def _cache(B: int, S: int, n: int, Tq: int, pad: list[int], gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot positions [B, S] of a static cache filled up to slot n (the last Tq slots are the
    queries' own keys), row b left-padded by pad[b] slots (position -1), empty slots -1;
    qpos [B, Tq]. Positions start at 0 after the padding."""
    kpos = torch.full((B, S), -1, dtype=torch.long)
    for b in range(B):
        kpos[b, pad[b]:n] = torch.arange(n - pad[b])
    return kpos[:, n - Tq:n].clone(), kpos


def test_reference_is_softmax_over_the_visible_slots():
    """decode_attention_ref == an explicit float64 softmax over the keys ``visible`` lets each
    query see: query head h reads kv head h // (Hq / Hkv), scale 1 / sqrt(D); windows keep the
    meta tokens; the bidirectional chunk sees itself both ways."""
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S, n, Tq = 2, 4, 2, 8, 13, 11, 3
    qpos, kpos = _cache(B, S, n, Tq, [0, 3], g)
    q = torch.randn(B, Tq, Hq, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    for window, n_meta, bidir in ((None, 0, False), (3, 2, False), (None, 1, True), (2, 2, True)):
        got = A.decode_attention_ref(q, k, v, qpos, kpos, window=window, n_meta=n_meta, bidirectional=bidir)
        want = torch.zeros_like(got)
        for b in range(B):
            for i in range(Tq):
                qp = int(qpos[b, i])
                start = max(int(qpos[b, 0]), n_meta)
                seen = []
                for j in range(S):
                    kp = int(kpos[b, j])
                    ok = 0 <= kp <= qp and (window is None or qp - kp < window or kp < n_meta)
                    ok = ok or (bidir and kp >= start and qp >= start)
                    if ok:
                        seen.append(j)
                assert seen, (b, i)
                for h in range(Hq):
                    kk, vv = k[b, h // (Hq // Hkv), seen], v[b, h // (Hq // Hkv), seen]
                    w = torch.softmax(kk @ q[b, i, h] / math.sqrt(D), 0)
                    want[b, i, h] = w @ vv
        assert rel_err(got, want) < 1e-12, (window, n_meta, bidir)


def test_cpu_calls_take_the_reference():
    """On the CPU ``decode_attention`` is the reference itself (the layer's numbers there are
    what they were before the kernel existed)."""
    g = torch.Generator().manual_seed(1)
    qpos, kpos = _cache(2, 9, 7, 1, [0, 2], g)
    q, k, v = torch.randn(2, 1, 4, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    got = A.decode_attention(q, k, v, qpos, kpos, window=4, n_meta=1, n_filled=torch.tensor([7]))
    assert torch.equal(got, A.decode_attention_ref(q, k, v, qpos, kpos, window=4, n_meta=1))


def test_supported_shapes():
    q, k = torch.zeros(2, 1, 8, 64), torch.zeros(2, 2, 30, 64)
    if A.triton is None:
        assert not A.supported(q, k, k)
        return
    assert A.supported(q, k, k) and A.supported(q.bfloat16(), k.bfloat16(), k.bfloat16())
    assert not A.supported(torch.zeros(2, 17, 8, 64), k, k)  # more than MAX_TQ queries
    assert not A.supported(q.bfloat16(), k, k)  # mixed dtypes
    assert not A.supported(torch.zeros(2, 1, 6, 64), torch.zeros(2, 4, 30, 64), torch.zeros(2, 4, 30, 64))  # 6 % 4
    assert not A.supported(torch.zeros(2, 1, 2, 512), torch.zeros(2, 1, 30, 512), torch.zeros(2, 1, 30, 512))
    big_q, big_k = torch.zeros(2, 8, 4, 256), torch.zeros(2, 1, 30, 256)  # 32 rows x 256: float32 spills
    assert not A.supported(big_q, big_k, big_k) and A.supported(big_q.bfloat16(), big_k.bfloat16(), big_k.bfloat16())




def test_kernels_in_interpreter_match_reference():
    """The split-K kernel and its combine (and the unsplit single kernel), run by Triton's CPU
    interpreter in a subprocess, against the masked-SDPA reference: GQA ratios 1 and 4, head
    dims 32, 64 and 48 (padded to a power of two), a capacity that is no multiple of the key
    block with empty slots past the fill counter, left-padded rows, window with meta tokens on
    and off, 1 and 3 queries, a bidirectional chunk, fp32 and bf16, strided q / cache views,
    and an inert query slot (padding) that sees no key: finite (0)."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.kernels.decode_attention as A
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        def cache(B, S, n, Tq, pad):
            kpos = torch.full((B, S), -1, dtype=torch.long)
            for b in range(B):
                kpos[b, pad[b]:n] = torch.arange(n - pad[b])
            return kpos[:, n - Tq:n].clone(), kpos
        cases = [  # B, Hq, Hkv, D, S, n, Tq, window, n_meta, bidir, splits, use_n
            (2, 4, 4, 32, 45, 40, 1, None, 0, False, None, True),
            (3, 8, 2, 64, 77, 70, 1, None, 0, False, 3, True),
            (2, 8, 2, 64, 100, 77, 3, 9, 2, False, 4, True),
            (2, 4, 1, 32, 70, 70, 3, None, 2, True, 2, False),
            (2, 4, 1, 48, 130, 101, 1, 20, 0, False, 1, True),
            (1, 4, 4, 32, 200, 190, 1, 30, 3, False, 5, True),
            (2, 2, 2, 16, 33, 20, 3, 4, 1, True, 3, True),
        ]
        for B, Hq, Hkv, D, S, n, Tq, window, n_meta, bidir, splits, use_n in cases:
            qpos, kpos = cache(B, S, n, Tq, [3 * b for b in range(B)])
            for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
                q = torch.randn(B, Tq, Hq, D, generator=g).to(dt)
                k = torch.randn(B, Hkv, S, D, generator=g).to(dt)
                v = torch.randn(B, Hkv, S, D, generator=g).to(dt)
                kw = dict(window=window, n_meta=n_meta, bidirectional=bidir)
                ref = A.decode_attention_ref(q.float(), k.float(), v.float(), qpos, kpos, **kw)
                out = A.decode_attention_triton(q, k, v, qpos, kpos, n_filled=torch.tensor([n]) if use_n else None,
                                                n_splits=splits, **kw)
                assert out.dtype == dt and out.shape == ref.shape
                assert rel(out, ref) < tol, (B, Hq, Hkv, D, S, n, Tq, window, bidir, splits, dt, rel(out, ref))
        # strided views: q a head slice of a wider tensor, the cache a slot range of a bigger buffer
        qpos, kpos = cache(2, 64, 50, 1, [0, 5])
        qw = torch.randn(2, 1, 12, 32, generator=g)
        q = qw[:, :, 2:10]
        big = torch.randn(2, 4, 80, 32, generator=g)
        k, v = big[:, 1:3, :64], big[:, 2:4, 10:74]
        ref = A.decode_attention_ref(q, k, v, qpos, kpos)
        assert rel(A.decode_attention_triton(q, k, v, qpos, kpos, n_splits=2), ref) < 1e-5
        # an inert query slot (padding): its position sees nothing -> 0, the real one as the reference
        qpos, kpos = cache(1, 16, 10, 2, [0])
        kpos[0, 9] = -1
        qpos[0, 1] = -1
        q, k, v = torch.randn(1, 2, 2, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g), torch.randn(1, 1, 16, 16, generator=g)
        valid = torch.tensor([[True, False]])
        out = A.decode_attention_triton(q, k, v, qpos, kpos, n_splits=2)
        ref = A.decode_attention_ref(q, k, v, qpos, kpos, valid=valid)
        assert torch.isfinite(out).all() and torch.equal(out[:, 1], torch.zeros_like(out[:, 1]))
        assert rel(out[:, :1], ref[:, :1]) < 1e-5
        print("ok")
    """)


def test_models_decode_through_kernel_in_interpreter():
    """Whole models on the CPU with the decode_attention fast path forced on (the kernels in
    Triton's interpreter): greedy tokens of the static engine (fill counter, in-place appends,
    a KV-sharing pair reading the producer's counter; the windowed config) or of the dynamic
    cache (the global one) equal the reference path's, in left-padded batches, and so are the logits of every step (1e-5); with
    GQA 4 + window + meta tokens and with plain global attention; and the kernel did run."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.kernels.decode_attention as A
        from tests.test_invariant import make, V
        from tests.decode_kernel_checks import counting, decode_matches_reference, left_padded_prompt
        ids, mask = left_padded_prompt(V)
        with counting(A, "decode_attention_triton") as calls:
            for attn, meta in (({"n_heads": 4, "n_kv_heads": 1, "head_dim": 16, "window": 5, "kv_share": True}, 2),
                               ({"n_heads": 2, "head_dim": 32}, 0)):
                model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                                     "meta_tokens": meta, "block_pattern": "GA | GA | GD"},
                              "components": {"gated_attn": attn}})
                # every decode step of both GA layers; one engine each (CI time)
                decode_matches_reference(model, ids, mask, ("decode_attention",), calls,
                                         engines={"static" if meta else "dynamic": 2 * 4})
        print("ok")
    """)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_reference(monkeypatch, dtype):
    """The compiled kernels (HYMBA_KERNELS=fast: a failed probe is an error) against the masked
    SDPA reference on CUDA at the issue's shape (batch 16, 8 q / 2 kv heads, head dim 256, a
    2k cache) and smaller ones: windows, meta tokens, several queries, a partly filled static
    capacity, left padding."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    tol = 2e-2 if dtype == torch.bfloat16 else 2e-5
    for B, Hq, Hkv, D, S, n, Tq, window in ((16, 8, 2, 256, 2304, 2048, 1, None), (16, 8, 2, 256, 2304, 2048, 1, 512),
                                            (4, 8, 8, 64, 300, 257, 4, None), (3, 4, 1, 128, 1024, 700, 2, 100),
                                            (2, 8, 2, 64, 256, 5, 1, None)):
        if dtype == torch.float32 and not A.supported(torch.empty(1, Tq, Hq, D, dtype=dtype),
                                                      *(torch.empty(1, Hkv, S, D, dtype=dtype),) * 2):
            continue
        qpos, kpos = _cache(B, S, n, Tq, [min((7 * b) % 13, n - Tq) for b in range(B)], g)
        q = torch.randn(B, Tq, Hq, D, generator=g).to("cuda", dtype)
        k = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dtype)
        v = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dtype)
        qpos, kpos = qpos.cuda(), kpos.cuda()
        kw = dict(window=window, n_meta=2)
        ref = A.decode_attention_ref(q, k, v, qpos, kpos, **kw)
        for n_filled in (torch.tensor([n], device="cuda"), None):
            out = A.decode_attention(q, k, v, qpos, kpos, n_filled=n_filled, **kw)
            assert dispatch.statuses()[A.FAST] is True
            assert rel_err(out.float(), ref.float()) < tol, (B, Hq, Hkv, D, S, n, Tq, window, dtype)


@pytest.mark.gpu
def test_gpu_kernel_replays_in_a_cuda_graph(monkeypatch):
    """Captured once, the kernels follow the fill counter and the positions written between
    replays (no host read: the split of the slots is computed on the device)."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, D, S = 4, 8, 2, 128, 1024
    q = torch.randn(B, 1, Hq, D, generator=g).cuda().bfloat16()
    k = torch.randn(B, Hkv, S, D, generator=g).cuda().bfloat16()
    v = torch.randn(B, Hkv, S, D, generator=g).cuda().bfloat16()
    kpos = torch.full((B, S), -1, dtype=torch.long, device="cuda")
    qpos = torch.zeros(B, 1, dtype=torch.long, device="cuda")
    n = torch.zeros(1, dtype=torch.long, device="cuda")

    def fill(m: int) -> None:
        kpos.fill_(-1)
        kpos[:, :m] = torch.arange(m, device="cuda")
        qpos.fill_(m - 1)
        n.fill_(m)

    fill(10)
    A.decode_attention(q, k, v, qpos, kpos, n_filled=n)  # compiles and probes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = A.decode_attention(q, k, v, qpos, kpos, n_filled=n)
    for m in (10, 333, 1024, 1):
        fill(m)
        graph.replay()
        ref = A.decode_attention_ref(q, k, v, qpos, kpos)
        assert rel_err(out.float(), ref.float()) < 2e-2, m


@pytest.mark.slow
def test_kernels_compile_for_sm90():
    """Triton's real compiler (TTIR -> PTX -> cubin) for an H100/H200 without a GPU, at the
    launch configs ``_launch_config`` picks for the issue's shape (bf16, 8 q / 2 kv heads, head
    dim 256, one query) and for float32 head dim 64 with 4 queries, window and bidirectional
    variants, split and unsplit, and the combine kernel (the interpreter tests check the numbers)."""
    pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for

    ptr_of = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype, rows, D, window, bidir, split in ((torch.bfloat16, 4, 256, False, False, True),
                                                (torch.bfloat16, 4, 256, True, False, False),
                                                (torch.float32, 16, 64, True, True, True)):
        bm, bn, bd, _, warps = A._launch_config(16, 2, 2048, rows, D, dtype, torch.device("cpu"))
        const = dict(D=D, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, HAS_N=True, WINDOW=window, BIDIR=bidir, SPLIT=split,
                     IEEE=dtype == torch.float32, UPCAST=False)
        sig = {}
        for name in A._decode_attn_kernel.arg_names:
            sig[name] = ("constexpr" if name in const else ptr_of[dtype] if name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")
                         else "*i64" if name in ("qpos_ptr", "kpos_ptr", "n_ptr") else "*fp32" if name.endswith("_ptr")
                         else "fp32" if name == "qk_scale" else "i32")
        k = compile_for(A._decode_attn_kernel, sig, const, warps)
        assert k.asm["cubin"], (dtype, rows, D, window, bidir, split)
    const = dict(D=256, BLOCK_M=16, BLOCK_D=256, BLOCK_S=64)
    sig = {name: "constexpr" if name in const else "*bf16" if name == "o_ptr" else "*fp32" if name.endswith("_ptr")
           else "i32" for name in A._decode_combine_kernel.arg_names}
    k = compile_for(A._decode_combine_kernel, sig, const, 4)
    assert k.asm["cubin"]


def test_inputs_that_need_a_gradient_take_the_reference_without_probing(monkeypatch):
    """The Triton kernels have no backward (their output has no autograd node): a call whose q, k
    or v needs a gradient takes the reference, which has one, without asking for the fast path;
    without autograd the kernel is taken. (The fast path is registered for the CPU here, with a
    stand-in for the kernels that returns the reference's numbers detached, as the kernels do.)"""
    probes, kernel = [], []

    def stand_in(q, k, v, qpos, kpos, **kw):
        kernel.append(1)
        kw.pop("n_filled")
        return A.decode_attention_ref(q, k, v, qpos, kpos, **kw).detach()

    monkeypatch.setitem(dispatch._FAST, A.FAST,
                        dispatch.FastPath(A.FAST, lambda: probes.append(1), "kernel stand-in", device="cpu"))
    monkeypatch.setattr(A, "decode_attention_triton", stand_in)
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    g = torch.Generator().manual_seed(2)
    qpos, kpos = _cache(2, 9, 7, 1, [0, 2], g)
    q, k, v = torch.randn(2, 1, 4, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g), torch.randn(2, 2, 9, 16, generator=g)
    for need in (q, k, v):
        need.requires_grad_()
        out = A.decode_attention(q, k, v, qpos, kpos, window=4, n_meta=1)
        (grad,) = torch.autograd.grad(out.square().sum(), need)
        assert probes == [] and kernel == [] and grad.abs().sum() > 0
        need.requires_grad_(False)
    q.requires_grad_()
    with torch.no_grad():
        A.decode_attention(q, k, v, qpos, kpos, window=4, n_meta=1)
    assert probes == [1] and kernel == [1]
