"""The few-token MoE experts path ``moe_decode`` (kernels/moe.py: ``moe_decode_triton``, two
Triton GEMV kernels for the routed SwiGLU experts of a decode step): the kernels in Triton's
CPU interpreter against ``moe_experts(..., impl="padded")``, whole MoE models decoding through
them, when the path is taken, and on a GPU the compiled kernels, a CUDA-graph replay and the
decode engine."""

from __future__ import annotations

import pytest
import torch

from hymba_plus.components.moe import MoE, MoEConfig
from hymba_plus.kernels import dispatch
from hymba_plus.kernels import moe as K
from tests.conftest import rel_err, run_in_interpreter


def _inputs(N: int, k: int, E: int, d: int, h: int, gen: torch.Generator, repeat: bool = False):
    """x, experts, weights, w_gate_up, w_down; ``repeat``: every token picks from the same few
    experts (an expert shared by many tokens)."""
    x = torch.randn(N, d, generator=gen)
    w1 = torch.randn(E, d, 2 * h, generator=gen) / d ** 0.5
    w2 = torch.randn(E, h, d, generator=gen) / h ** 0.5
    pool = k + 1 if repeat else E
    experts = torch.stack([torch.randperm(pool, generator=gen)[:k] for _ in range(N)])
    weights = torch.rand(N, k, generator=gen)
    return x, experts, weights, w1, w2


def test_path_is_taken_only_for_few_tokens_without_gradients(monkeypatch):
    """``decode_supported``: no gradient needed, N k <= DECODE_MAX_ASSIGNMENTS, dropless, one
    16/32-bit dtype, and dispatch's answer (CUDA + probe); the CPU never takes it."""
    g = torch.Generator().manual_seed(0)
    x, experts, weights, w1, w2 = _inputs(4, 2, 6, 16, 8, g)
    assert not K.decode_supported(x, 2, w1, w2)  # CPU: dispatch says no
    monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: name == K.DECODE)
    assert K.decode_supported(x, 2, w1, w2)
    assert not K.decode_supported(x, 2, w1, w2, capacity=4)
    big = torch.randn(K.DECODE_MAX_ASSIGNMENTS // 2 + 1, 16)
    assert not K.decode_supported(big, 2, w1, w2)
    assert not K.decode_supported(x.double(), 2, w1.double(), w2.double())
    assert not K.decode_supported(x.bfloat16(), 2, w1, w2)  # mixed dtypes: the reference's bmm would refuse
    w1g = w1.clone().requires_grad_()
    assert not K.decode_supported(x, 2, w1g, w2)
    with torch.no_grad():
        assert K.decode_supported(x, 2, w1g, w2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # moe_experts casts all to bf16 first
        assert K.decode_supported(x, 2, w1, w2)


def test_layer_skips_the_fused_layer_for_a_decode_step(monkeypatch):
    """With the path available, a no-grad MoE layer call with few tokens runs the composed
    layer (router, moe_decode, shared expert) instead of ``moe_layer``; with gradients the
    fused-layer decision is unchanged."""
    m = MoE(MoEConfig(n_experts=6, top_k=2, n_shared=1, d_expert=8), d_model=16)
    xf = torch.randn(3, 16)
    monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: name == K.DECODE)
    monkeypatch.setattr(K, "fused_layer_supported", lambda *a, **k: True)
    assert m._fused(xf, None, None)  # parameters need gradients: no decode path
    with torch.no_grad():
        assert not m._fused(xf, None, None)
    m.impl = "fused"
    with torch.no_grad():
        assert m._fused(xf, None, None)  # an explicit impl is obeyed


def test_kernels_in_interpreter_match_padded_reference():
    """K1 (gate/up GEMV + SwiGLU x weight) and K2 (down GEMV + k-slot sum, counts, dropped)
    in Triton's CPU interpreter against ``moe_experts(..., impl="padded")``: N 1-16, k 1 / 2 /
    4, E 8 / 12, d and h no powers of two (and past one block), experts repeated across
    tokens, fp32 (1e-5) and bf16 (3e-2: the interpreter truncates bf16 casts, and the CPU
    reference rounds each product of its SwiGLU); strided (non-contiguous) experts / weights;
    counts equal the reference's, dropped is 0; no tokens."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.kernels.moe as K
        from tests.test_moe_decode import _inputs
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        cases = [(1, 1, 8, 40, 24, False), (2, 2, 12, 72, 40, True), (5, 4, 12, 100, 136, False),
                 (16, 4, 8, 24, 70, True), (16, 2, 12, 130, 20, False), (9, 1, 8, 65, 33, True)]
        for N, k, E, d, h, repeat in cases:
            x, experts, weights, w1, w2 = _inputs(N, k, E, d, h, g, repeat)
            for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
                ins = [t.to(dt) if t.is_floating_point() else t for t in (x, experts, weights, w1, w2)]
                y, dropped, counts = K.moe_decode_triton(*ins)
                ry, rd, rc = K.moe_experts(*ins, impl="padded")
                assert y.dtype == dt and y.shape == ry.shape
                assert rel(y, ry) < tol, (N, k, E, d, h, dt, rel(y, ry))
                assert torch.equal(counts, rc) and counts.dtype == torch.long and int(dropped) == 0
        # strided routing tensors (columns of wider ones) and a row-strided x
        x, experts, weights, w1, w2 = _inputs(4, 2, 8, 48, 24, g)
        xw = torch.randn(4, 60, generator=g)
        xw[:, 5:53] = x
        ew = torch.stack([experts, experts], -1)[..., 0]
        ww = torch.stack([weights, weights], -1)[..., 1]
        assert not ew.is_contiguous() and not ww.is_contiguous()
        y, _, counts = K.moe_decode_triton(xw[:, 5:53], ew, ww, w1, w2)
        ry, _, rc = K.moe_experts(x, experts, weights, w1, w2, impl="padded")
        assert rel(y, ry) < 1e-5 and torch.equal(counts, rc)
        y, dropped, counts = K.moe_decode_triton(x[:0], experts[:0], weights[:0], w1, w2)
        assert y.shape == (0, 48) and int(dropped) == 0 and int(counts.sum()) == 0
        print("ok")
    """)


@pytest.mark.slow  # ~12-26 s in the interpreter; the kernel-level interpreter test stays in `make test`
def test_models_decode_through_kernels_in_interpreter():
    """Whole float32 MoE models on the CPU with ``moe_decode`` forced on (the kernels in
    Triton's interpreter): greedy tokens of the static engine (with a shared expert) or of the
    dynamic cache (without) equal the reference path's in a left-padded batch, so are the logits of every step (1e-5), and
    the kernels did run (every decode step of every MoE layer); with and without a shared
    expert."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.kernels.moe as K
        from tests.test_invariant import make, V
        from tests.decode_kernel_checks import counting, decode_matches_reference, left_padded_prompt
        ids, mask = left_padded_prompt(V)

        def both_layers_one_step(eng, calls):  # each step: both MoE layers, 3 tokens each
            assert calls == [3, 3], calls

        with counting(K, "moe_decode_triton", lambda a, k: a[0].shape[0]) as calls:
            for moe in ({"n_experts": 6, "top_k": 2, "n_shared": 1, "d_expert": 24},
                        {"n_experts": 5, "top_k": 3, "n_shared": 0, "d_expert": 20, "norm_topk": False}):
                model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                                     "block_pattern": "GA+moe | GD+moe"},
                              "components": {"moe": moe}})
                # one engine each (CI time); every decode step of both MoE layers
                decode_matches_reference(model, ids, mask, (K.DECODE,), calls,
                                         engines={"static" if moe["n_shared"] else "dynamic": 2 * 4},
                                         on_step=both_layers_one_step)
        print("ok")
    """)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernels_match_padded_reference(monkeypatch, dtype):
    """The compiled kernels (HYMBA_KERNELS=fast: a failed probe is an error) against the padded
    reference on CUDA at the issue's shape (batch 16, 64 experts of 512, top-4, d 1024) and
    smaller ones; ``moe_experts`` takes the path under no_grad only."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for N, k, E, d, h, repeat in ((16, 4, 64, 1024, 512, False), (16, 4, 64, 1024, 512, True), (1, 1, 12, 200, 72, False),
                                  (7, 2, 12, 1000, 136, True), (3, 4, 8, 96, 1100, False)):
        ins = [t.cuda().to(dtype) if t.is_floating_point() else t.cuda() for t in _inputs(N, k, E, d, h, g, repeat)]
        with torch.no_grad():
            ref = K.moe_experts(*ins, impl="padded")
            got = K.moe_experts(*ins)
        assert dispatch.statuses()[K.DECODE] is True
        assert got[0].dtype == dtype and rel_err(got[0].float(), ref[0].float()) < tol, (N, k, E, d, h)
        assert torch.equal(got[2], ref[2]) and int(got[1]) == 0
        direct = K.moe_decode_triton(*ins)
        assert torch.equal(direct[0], got[0])  # deterministic


@pytest.mark.gpu
def test_gpu_kernels_replay_in_a_cuda_graph(monkeypatch):
    """Captured once, the two kernels follow the tokens, experts and weights written into their
    input buffers between replays (no host read, no sort)."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    g = torch.Generator().manual_seed(0)
    N, k, E, d, h = 16, 4, 64, 1024, 512
    x, experts, weights, w1, w2 = (t.cuda().bfloat16() if t.is_floating_point() else t.cuda()
                                   for t in _inputs(N, k, E, d, h, g))
    K.moe_decode_triton(x, experts, weights, w1, w2)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, dropped, counts = K.moe_decode_triton(x, experts, weights, w1, w2)
    for seed in range(3):
        nx, ne, nw, _, _ = _inputs(N, k, E, d, h, torch.Generator().manual_seed(seed + 1), repeat=seed == 1)
        x.copy_(nx)
        experts.copy_(ne)
        weights.copy_(nw)
        graph.replay()
        with torch.no_grad():
            ref = K.moe_experts(x, experts, weights, w1, w2, impl="padded")
        assert rel_err(y.float(), ref[0].float()) < 2e-2 and torch.equal(counts, ref[2]) and int(dropped) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_engine_with_moe_decode_equals_reference(monkeypatch, dtype):
    """A small MoE model's greedy decoding on the graph engine (moe_decode captured in the
    step) gives the tokens of ``HYMBA_KERNELS=reference`` decoding on the dynamic cache."""
    from tests.test_invariant import V, make

    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 64, "max_seq_len": 128, "ffn": "none",
                                         "block_pattern": "GA+moe | GD+moe"},
                  "components": {"moe": {"n_experts": 12, "top_k": 4, "n_shared": 1, "d_expert": 40}}})
    model = model.to(device="cuda", dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (4, 9), generator=g).cuda()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        monkeypatch.setenv("HYMBA_KERNELS", "reference")
        want = model.generate(ids, max_new_tokens=12, attention_mask=mask, engine="dynamic")
        monkeypatch.setenv("HYMBA_KERNELS", "auto")
        stats: dict = {}
        got = model.generate(ids, max_new_tokens=12, attention_mask=mask, engine="graph", stats=stats)
    assert stats["engine"] == "graph", stats.get("engine_notice")
    assert dispatch.statuses()[K.DECODE] is True
    assert torch.equal(got, want)


@pytest.mark.slow
def test_kernels_compile_for_sm90_without_spills():
    """Triton's real compiler (TTIR -> PTX -> cubin) for an H100/H200 without a GPU, at the
    launch configs ``_decode_launch`` picks for the issue's shape (bf16, d 1024, h 512, 64
    experts, batch 16, top-4) and for float32; ptxas must report no spilled registers."""
    pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for, ptxas_resources

    for dtype, ptr in ((torch.bfloat16, "*bf16"), (torch.float32, "*fp32")):
        c = K._decode_launch(16, 4, 1024, 512, 64)
        for fn, const in ((K._decode_gate_up_kernel, dict(K=4, BLOCK_D=c["BLOCK_D1"], BLOCK_H=c["BLOCK_H1"])),
                          (K._decode_down_kernel, dict(K=4, BLOCK_H=c["BLOCK_H2"], BLOCK_D=c["BLOCK_D2"],
                                                       BLOCK_P=c["BLOCK_P"], BLOCK_E=c["BLOCK_E"]))):
            sig = {}
            for name in fn.arg_names:
                sig[name] = ("constexpr" if name in const else "*i64" if name in ("e_ptr", "cnt_ptr", "drop_ptr")
                             else ptr if name.endswith("_ptr") else "i32")
            kern = compile_for(fn, sig, const, 4, enable_fp_fusion=False)
            assert kern.asm["cubin"]
            res = ptxas_resources(kern.asm["ptx"])
            if res is not None:  # ptxas -v: spilled bytes per thread
                assert res["spill_stores"] == res["spill_loads"] == 0, (fn.__name__, dtype, res["ptxas"])


