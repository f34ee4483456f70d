"""kernels.add_norm: the residual add fused with the next pre-norm (and the cast to the GEMMs'
dtype). Reference against the composed formula, the block against its textbook form, the Triton
kernels in Triton's CPU interpreter against the reference (outputs and gradients), and the fast
path on a GPU (also inside a whole model under autocast and in a CUDA graph)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hymba_plus.kernels import add_norm as A
from hymba_plus.kernels import norm as N
from hymba_plus.models.lm import build_model
from tests.conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(pattern: str = "(GA+mlp)*2", d: int = 64) -> dict:
    return {"name": "add-norm", "model": {"vocab_size": 97, "d_model": d, "max_seq_len": 64, "block_pattern": pattern,
                                          "ffn": "mlp", "meta_tokens": 0},
            "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 96}}}


@pytest.mark.parametrize("zero_centered", [True, False])
def test_reference_is_the_add_then_the_norm_then_the_cast(zero_centered):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 5, 48, generator=g), torch.randn(2, 5, 48, generator=g).bfloat16()
    w = 0.1 * torch.randn(48, generator=g) + (0.0 if zero_centered else 1.0)
    scale = 1 + w if zero_centered else w
    s, h = A.add_rms_norm_ref(x, y, w, 1e-6, zero_centered, torch.bfloat16)
    want = x + y.float()
    assert s.dtype == torch.float32 and torch.equal(s, want)
    assert h.dtype == torch.bfloat16 and torch.equal(h, N.rms_norm_ref(want, scale, 1e-6).bfloat16())
    s1, h1 = A.add_rms_norm_ref(x, None, w, 1e-6, zero_centered)  # no add; out dtype = x's
    assert s1 is x and h1.dtype == x.dtype and torch.equal(h1, N.rms_norm_ref(x, scale, 1e-6))


def test_blocks_are_the_pre_norm_blocks():
    """The model's trunk (each residual add inside the next norm: ``Block(pending=, defer=)`` in
    ``PlainStack``) == the textbook loop ``x = x + mixer(norm1(x)); x = x + ffn(norm2(x))`` exactly
    (float32, CPU), including a block without ffn and one without mixer; a block called on its
    own (``block(x, ctx)``, as ETD and MTP call it) is the textbook block; under autocast the
    sublayers get their input in the autocast dtype while the residual stream stays float32."""
    from hymba_plus.core.cache import StepContext

    torch.manual_seed(0)
    model = build_model(_recipe("GA+mlp | GA | -+mlp | GA+mlp")).eval()
    ids = torch.randint(0, 97, (2, 9))
    seen = []  # the dtype each sublayer receives
    for blk in model.blocks:
        for sub in (blk.mixer, blk.ffn):
            if sub is not None:
                sub.register_forward_pre_hook(lambda m, a: seen.append(a[0].dtype))

    def textbook(blk, x, c):  # noqa: ANN001, ANN202
        if blk.mixer is not None:
            x = x + blk.mixer(blk.norm1(x), c, None)
        if blk.ffn is not None:
            x = x + blk.ffn(blk.norm2(x), c)
        return x

    with torch.no_grad():
        got = model(ids, return_hidden=True).hidden_states
        x = model.embed_tokens(ids)
        pos = torch.arange(9)[None].expand(2, -1)
        for blk in model.blocks:
            c = StepContext(positions=pos)
            one = blk(x, c)  # a block on its own
            x = textbook(blk, x, StepContext(positions=pos))
            assert one.dtype == torch.float32 and torch.equal(one, x)
        want = model.norm(x)
    assert torch.equal(got, want)
    assert set(seen) == {torch.float32}
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss) and set(seen) == {torch.bfloat16}


def test_kernels_in_interpreter_match_the_reference():
    """Forward and backward kernels in Triton's CPU interpreter (subprocess) against autograd
    through the reference: the autocast training case (float32 residual, bf16 branch and output),
    no add (the first norm), float32 throughout and fp16 throughout; D 96 and 300 (not powers of
    two), zero-centered or plain; a transposed input; 1, 5 and the default number of backward
    programs; then the autograd node: only the asked gradients, x and y of one dtype sharing one
    gradient tensor, an unused h or s, a differentiable backward under create_graph, and no rows.
    float32 to 1e-6 forward / 1e-5 backward; fp16 forward within its last bit; bf16 within the interpreter's
    truncating float32 -> bf16 casts (2e-2)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import hymba_plus.kernels.add_norm as A
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.detach().float() - b.detach().float()).abs().max() / b.detach().float().abs().max().clamp_min(1e-12))
        f32, bf, f16 = torch.float32, torch.bfloat16, torch.float16
        n = 0
        for D in (96, 300):
            for xdt, ydt, wdt, odt in ((f32, bf, f32, bf), (f32, None, f32, bf), (f32, f32, f32, None),
                                       (f16, f16, f16, f16), (bf, bf, bf, bf)):
                lo = bf in (xdt, ydt, wdt, odt)
                for zc in (True, False):
                    x = torch.randn(2, 7, D, generator=g).to(xdt)
                    y = None if ydt is None else torch.randn(2, 7, D, generator=g).to(ydt)
                    w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to(wdt)
                    case = (D, xdt, ydt, wdt, odt, zc)
                    s, h = A.add_rms_norm_triton(x, y, w, 1e-6, zc, odt)
                    s0, h0 = A.add_rms_norm_ref(x, y, w, 1e-6, zc, odt)
                    assert (s.dtype, h.dtype, h.shape) == (s0.dtype, h0.dtype, h0.shape), case
                    assert torch.equal(s, s0) if s.dtype != bf else rel(s, s0) < 1e-2, case
                    if xdt == f16:  # fp16's last bit at most: the float32 sum of squares runs in another order
                        assert ((h.float() - h0.float()).abs() <= h0.float().abs() * 2.0 ** -10).all(), case
                    else:
                        assert rel(h, h0) < (2e-2 if lo else 1e-6), case
                    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
                    yr = None if y is None else y.clone().requires_grad_()
                    ins = [t for t in (xr, yr, wr) if t is not None]
                    s0, h0 = A.add_rms_norm_ref(xr, yr, wr, 1e-6, zc, odt)
                    dh = torch.randn(h0.shape, generator=g).to(h0.dtype)
                    ds = torch.randn(s0.shape, generator=g).to(s0.dtype)
                    outs0, grads = ((h0,), (dh,)) if y is None else ((s0, h0), (ds, dh))
                    want = torch.autograd.grad(outs0, ins, grads)
                    for programs in ((None, 1, 5) if D == 96 else (None,)):
                        sc = s0.detach().contiguous()
                        got = A.add_rms_norm_bwd_triton(sc, w, dh, None if y is None else ds, 1e-6, zc, xdt,
                                                        ydt, programs=programs)
                        got = [t for t in got if t is not None]
                        assert len(got) == len(want), case
                        for a, b in zip(got, want):
                            tol = 2e-2 if lo else (2e-3 if xdt == f16 else 1e-5)
                            assert a.dtype == b.dtype and a.shape == b.shape and rel(a, b) < tol, (case, programs, rel(a, b))
                        n += 1
        # a transposed (non-contiguous) x, float32
        xt, yt = torch.randn(3, 8, 40, generator=g).transpose(0, 1), torch.randn(8, 3, 40, generator=g)
        wt = 0.1 * torch.randn(40, generator=g)
        for a, b in zip(A.add_rms_norm_triton(xt, yt, wt, 1e-5), A.add_rms_norm_ref(xt, yt, wt, 1e-5)):
            assert rel(a, b) < 1e-6
        # the autograd node
        x, y, w = torch.randn(4, 6, 96, generator=g), torch.randn(4, 6, 96, generator=g).to(bf), 0.1 * torch.randn(96, generator=g)
        dh, ds = torch.randn(4, 6, 96, generator=g).to(bf), torch.randn(4, 6, 96, generator=g)
        bwd, calls = A.add_rms_norm_bwd_triton, []
        A.add_rms_norm_bwd_triton = lambda *a, **k: calls.append(a[-1]) or bwd(*a, **k)
        for needs in ((True, True, True), (True, False, True), (False, True, False)):
            ins = [t.clone().requires_grad_(r) for t, r in zip((x, y, w), needs)]
            s, h = A._AddRMSNormFn.apply(*ins, 1e-6, True, bf)
            got = torch.autograd.grad((s, h), [t for t in ins if t.requires_grad], (ds, dh))
            ref_ins = [t.clone().requires_grad_(r) for t, r in zip((x, y, w), needs)]
            want = torch.autograd.grad(A.add_rms_norm_ref(*ref_ins, 1e-6, True, bf), [t for t in ref_ins if t.requires_grad], (ds, dh))
            assert len(got) == len(want) and all(rel(a, b) < 2e-2 for a, b in zip(got, want)), needs
        assert calls == [(True, True, True), (True, False, True), (False, True, False)], calls
        # x and y of one dtype: one gradient tensor for both
        x2, y2 = x.clone().requires_grad_(), y.float().requires_grad_()
        s, h = A._AddRMSNormFn.apply(x2, y2, w, 1e-6, True, None)
        gx, gy = torch.autograd.grad((s, h), (x2, y2), (ds, dh.float()))
        assert gx is gy and calls[-1] == (True, False, False)
        # only s used (h's gradient None), only h used (s's None)
        x3, y3 = x.clone().requires_grad_(), y.float().requires_grad_()
        s, h = A._AddRMSNormFn.apply(x3, y3, w, 1e-6, True, None)
        assert torch.equal(torch.autograd.grad(s, x3, ds, retain_graph=True)[0], ds)
        gh = torch.autograd.grad(h, x3, dh.float())[0]
        s4, h4 = A.add_rms_norm_ref((x + y.float()).requires_grad_(), None, w, 1e-6, True)
        assert rel(gh, torch.autograd.grad(h4, s4, dh.float())[0]) < 1e-5
        # create_graph: the reference's ops, differentiable
        ins = [t.clone().requires_grad_() for t in (x, y.float(), w)]
        g2 = torch.autograd.grad(A._AddRMSNormFn.apply(*ins, 1e-6, True, None), ins, (ds, dh.float()), create_graph=True)
        ref_ins = [t.clone().requires_grad_() for t in (x, y.float(), w)]
        want = torch.autograd.grad(A.add_rms_norm_ref(*ref_ins, 1e-6, True), ref_ins, (ds, dh.float()))
        assert all(a.requires_grad and rel(a, b) < 1e-5 for a, b in zip(g2, want))
        A.add_rms_norm_bwd_triton = bwd
        e = torch.zeros(0, 96)
        s, h = A.add_rms_norm_triton(e, e, w, 1e-6)
        dx, dy, dw = A.add_rms_norm_bwd_triton(e, w, e, e, 1e-6, True, f32, f32)
        assert s.shape == h.shape == dx.shape == dy.shape == e.shape and torch.equal(dw, torch.zeros(96))
        print("ok", n)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok 40" in res.stdout, res.stderr[-3000:] + res.stdout[-500:]


@pytest.mark.gpu
def test_gpu_fast_path_matches_reference(monkeypatch):
    """On CUDA the op runs the kernels (HYMBA_KERNELS=fast) and matches autograd through the
    reference: the autocast training case at the attn row's width (float32 residual, bf16 branch
    and output, D 1024), no add, a bf16 model; outputs and every gradient (bf16 to 2e-2, float32 to
    1e-5); the forward also without gradients (decoding) and replayed from a CUDA graph."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    f32, bf = torch.float32, torch.bfloat16
    for xdt, ydt, wdt, odt, D in ((f32, bf, f32, bf, 1024), (f32, None, f32, bf, 1024), (bf, bf, bf, bf, 96),
                                  (f32, f32, f32, f32, 300)):
        for zc in (True, False):
            x = torch.randn(4, 33, D, generator=g).to("cuda", xdt).requires_grad_()
            y = None if ydt is None else torch.randn(4, 33, D, generator=g).to("cuda", ydt).requires_grad_()
            w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to("cuda", wdt).requires_grad_()
            ins = [t for t in (x, y, w) if t is not None]
            s, h = A.add_rms_norm(x, y, w, 1e-6, zc, odt)
            assert h.grad_fn is not None and "AddRMSNorm" in type(h.grad_fn).__name__
            s0, h0 = A.add_rms_norm_ref(x, y, w, 1e-6, zc, odt)
            dh = torch.randn(h.shape, generator=g).to("cuda", odt)
            ds = torch.randn(s.shape, generator=g).to("cuda", s.dtype)
            outs, outs0, grads = ((h,), (h0,), (dh,)) if y is None else ((s, h), (s0, h0), (ds, dh))
            got = (*outs, *torch.autograd.grad(outs, ins, grads))
            want = (*outs0, *torch.autograd.grad(outs0, ins, grads))
            tol = 2e-2 if bf in (xdt, ydt, wdt, odt) else 1e-5
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < tol, (xdt, ydt, odt, D, zc)
            with torch.no_grad():  # decoding: the forward kernel alone, in a CUDA graph too
                xs, ys = x.detach().clone(), None if y is None else y.detach().clone()
                want = A.add_rms_norm(xs, ys, w, 1e-6, zc, odt)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    got = A.add_rms_norm(xs, ys, w, 1e-6, zc, odt)
                xs.mul_(0.5)
                graph.replay()
                want = A.add_rms_norm(xs, ys, w, 1e-6, zc, odt)
                for a, b in zip(got, want):
                    assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_model_with_and_without_the_fused_op(monkeypatch):
    """A (GA+mlp)*2 model trains the same under bf16 autocast with the fused op as without it
    (its fast path forced off): loss and every parameter gradient within bf16 round-off."""
    from hymba_plus.kernels import dispatch

    torch.manual_seed(0)
    model = build_model(_recipe(d=128)).cuda()
    ids = torch.randint(0, 97, (4, 64), device="cuda")
    runs = []
    for on in (True, False):
        fp = dispatch._FAST[A.FAST]
        if not on:
            monkeypatch.setattr(fp, "status", False)
            monkeypatch.setattr(fp, "warned", True)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (l1, g1), (l0, g0) = runs
    assert rel_err(l1, l0) < 1e-2
    for n in g0:
        assert rel_err(g1[n].float(), g0[n].float()) < 5e-2, n
