"""kernels.norm (RMSNorm, gated RMSNorm) and kernels.rotary (RoPE): references against the
textbook formulas, the Triton gated-RMSNorm and RoPE kernels in Triton's CPU interpreter, and
the fast paths on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hymba_plus.components.norm import GatedRMSNorm, RMSNorm
from hymba_plus.kernels import norm as N
from hymba_plus.kernels import rotary as R
from tests.conftest import rel_err
from tests.helpers import saved_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_rms_norm_reference_is_the_formula():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 16, generator=g, dtype=torch.float64)
    s = torch.randn(16, generator=g, dtype=torch.float64)
    want = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * s
    assert rel_err(N.rms_norm(x, s, 1e-6), want) < 1e-12
    xb = x.bfloat16()  # 16-bit input: float32 math, result in the input dtype
    got = N.rms_norm(xb, s.float(), 1e-6)
    assert got.dtype == torch.bfloat16 and rel_err(got.double(), want) < 1e-2


def test_fused_norm_keeps_a_float32_scale_in_float32(monkeypatch):
    """The fused kernel needs one dtype for x and scale: bf16 activations with a float32 scale
    (master weights under autocast) run it in float32, so the scale is not rounded to bf16 and
    the result is the reference's (here on CPU, where F.rms_norm is the composite form)."""
    monkeypatch.setattr(N.dispatch, "use_fast", lambda name, *t: True)  # as on a GPU
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, generator=g).bfloat16().requires_grad_()
    s = (1 + 1e-3 * torch.randn(64, generator=g)).requires_grad_()  # steps finer than bf16 resolves near 1
    y, ref = N.rms_norm(x, s, 1e-6), N.rms_norm_ref(x, s, 1e-6)
    assert y.dtype == torch.bfloat16 and torch.equal(y, ref)
    assert not torch.equal(N.rms_norm_ref(x, s.bfloat16(), 1e-6), ref)  # a bf16 copy of the scale would differ
    gy = torch.randn(y.shape, generator=g).bfloat16()
    for a, b in zip(torch.autograd.grad(y, (x, s), gy), torch.autograd.grad(ref, (x, s), gy)):
        assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < 1e-5


def test_norm_modules_use_the_op():
    torch.manual_seed(0)
    n = RMSNorm(8)  # zero-centered: scale 1 + w
    with torch.no_grad():
        n.weight.normal_()
    x, z = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert torch.equal(n(x), N.rms_norm(x, 1 + n.weight, n.eps))
    gn = GatedRMSNorm(8)
    assert torch.allclose(gn(x, z), N.rms_norm(x, 1 + gn.weight, gn.eps) * torch.nn.functional.silu(z))


def test_zero_centered_scale_of_bf16_weights_is_added_in_float32():
    """A bf16 model's zero-centered norms scale by 1 + w added in float32 (HF's Qwen3-Next / Gemma
    ``1.0 + weight.float()``): rounded to bf16, 1 + w would be exactly 1 for every |w| < 2^-9, so the
    small scales such a norm learns would vanish. The plain norm, the residual add + norm and the
    gated norm agree, on their references and on the Triton kernels in the interpreter (below)."""
    from hymba_plus.kernels.add_norm import add_rms_norm_ref

    g = torch.Generator().manual_seed(0)
    w = (1.5e-3 * (2 * torch.rand(64, generator=g) - 1)).bfloat16()  # below half of bf16's spacing at 1
    assert torch.equal(1.0 + w, torch.ones_like(w))  # what bf16 arithmetic would make of it
    scale = N.norm_scale(w, True)
    assert scale.dtype == torch.float32 and torch.equal(scale, 1.0 + w.float())
    assert N.norm_scale(w.double(), True).dtype == torch.float64 and N.norm_scale(w, False) is w
    x = torch.randn(4, 64, generator=g).bfloat16()
    xf = x.float()
    want = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w.float())).bfloat16()  # HF's form
    n = RMSNorm(64).bfloat16()
    with torch.no_grad():
        n.weight.copy_(w)
    assert torch.equal(n(x), want)
    assert not torch.equal(want, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())
    assert torch.equal(add_rms_norm_ref(x, None, w, 1e-6, True)[1], want)
    z = torch.randn(4, 64, generator=g).bfloat16()
    gn = GatedRMSNorm(64).bfloat16()
    with torch.no_grad():
        gn.weight.copy_(w)
    assert torch.equal(gn(x, z), (want.float() * torch.nn.functional.silu(z.float())).bfloat16())


def test_gated_norm_reference_is_the_formula_and_asks_for_the_kernel(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64) for _ in range(2))
    w = 0.1 * torch.randn(16, generator=g, dtype=torch.float64)
    want = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * (1 + w) * z * torch.sigmoid(z)
    assert rel_err(N.gated_rms_norm(x, z, w, 1e-6), want) < 1e-12
    assert rel_err(N.gated_rms_norm(x, z, 1 + w, 1e-6, zero_centered=False), want) < 1e-12
    asked = []
    monkeypatch.setattr(N.dispatch, "use_fast", lambda name, *t: asked.append(name) or False)
    gn = GatedRMSNorm(16)
    xf, zf = x.float(), z.float()
    y = gn(xf, zf)  # the weight requires a gradient: the kernel asked for (training forward too)
    assert asked == [N.GATED, N.FAST] and y.requires_grad  # unavailable here: the reference (its rms_norm)
    with torch.no_grad():
        assert torch.equal(gn(xf, zf), y.detach())
    assert asked == [N.GATED, N.FAST] * 2


def test_gated_norm_training_keeps_inputs_only_and_its_gradient_is_the_formula():
    """With gradients, gated RMSNorm is one autograd node that keeps x, gate and weight: its
    closed-form backward passes gradcheck (float64), equals autograd through the reference to
    round-off (float32 2e-7, bf16 inputs with a float32 weight 1e-2: the reference's rounding of
    the normalised value to bf16 is the identity here), the forward is the reference's bit for
    bit, and autograd keeps no float32 [.., D] copies (here: 3 x 4 KiB less than the reference)."""
    g = torch.Generator().manual_seed(0)
    for zc in (True, False):
        x, z = (torch.randn(2, 3, 4, 16, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
        w = (0.1 * torch.randn(16, generator=g, dtype=torch.float64) + (0 if zc else 1)).requires_grad_()
        assert torch.autograd.gradcheck(lambda x, z, w: N.gated_rms_norm(x, z, w, 1e-6, zc), (x, z, w))  # noqa: B023
        for dt, tol in ((torch.float32, 2e-7), (torch.bfloat16, 1e-2)):
            ins = [x.detach().to(dt).requires_grad_(), z.detach().to(dt).requires_grad_(),
                   w.detach().float().requires_grad_()]
            kept, dy = {}, torch.randn(x.shape, generator=g).to(dt)
            for name, fn in (("fn", N.gated_rms_norm), ("ref", N.gated_rms_norm_ref)):
                y, nbytes = saved_bytes(lambda fn=fn: fn(*ins, 1e-6, zc))  # noqa: B023
                kept[name] = (y, torch.autograd.grad(y, ins, dy), nbytes)
            (y, grads, b_fn), (y0, grads0, b_ref) = kept["fn"], kept["ref"]
            assert torch.equal(y, y0) and type(y.grad_fn).__name__ == "_GatedRMSNormFnBackward"
            for a, b in zip(grads, grads0):
                assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < tol, (dt, zc)
            assert b_fn == sum(t.numel() * t.element_size() for t in ins)  # x, gate, weight: nothing else
            assert b_ref - b_fn >= 3 * x.numel() * 4  # the reference keeps float32 copies


def test_gated_norm_triton_kernel_in_interpreter_matches_reference():
    """The one-kernel gated RMSNorm, run by Triton's CPU interpreter in a subprocess, against
    ``gated_rms_norm_ref``: D not a power of two, [..., H, D] and [N, D] inputs, a transposed
    (non-contiguous) input, zero-centered or plain scale, float32 / bf16 / fp16 with the weight in
    the input's dtype or float32. float32 to 1e-6 (the sum of squares in another order); float16
    bit-equal (the scale 1 + w added in float32, the normalised value and the result rounded where
    the reference rounds them); bf16 to 2e-2, because the interpreter converts float32 -> bf16 by truncation
    rather than round-to-nearest-even (the GPU test holds it to one rounding)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import hymba_plus.kernels.norm as N
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        n = 0
        for shape in ((2, 3, 4, 64), (5, 96), (1, 1, 3, 300)):
            D = shape[-1]
            for dt, wdt in ((torch.float32, torch.float32), (torch.float16, torch.float16),
                            (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)):
                for zc in (True, False):
                    x, z = (torch.randn(*shape, generator=g).to(dt) for _ in range(2))
                    w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to(wdt)
                    y, y0 = N.gated_rms_norm_triton(x, z, w, 1e-6, zc), N.gated_rms_norm_ref(x, z, w, 1e-6, zc)
                    case = (shape, dt, wdt, zc)
                    assert y.shape == x.shape and y.dtype == dt, case
                    if dt == torch.float16:
                        assert torch.equal(y, y0), case
                    else:
                        assert rel(y, y0) < (1e-6 if dt == torch.float32 else 2e-2), case
                    n += 1
        xt = torch.randn(2, 8, 3, 24, generator=g).transpose(1, 2)  # [B, T, H, D] from [B, H, T, D]
        zt, wt = torch.randn(2, 3, 8, 24, generator=g), 0.1 * torch.randn(24, generator=g)
        assert rel(N.gated_rms_norm_triton(xt, zt, wt, 1e-5), N.gated_rms_norm_ref(xt, zt, wt, 1e-5)) < 1e-6
        # the gate a column slice of a wider projection (gdn's z from the decode engine's packed
        # q|k|v|a|b|z GEMM), viewed as heads: read in place (no copy), same result
        for T in (1, 3):
            xs, wide = torch.randn(2, T, 3, 24, generator=g), torch.randn(2, T, 100, generator=g)
            zs = wide[..., 20:92].reshape(2, T, 3, 24)
            assert not zs.is_contiguous()
            assert rel(N.gated_rms_norm_triton(xs, zs, wt, 1e-5), N.gated_rms_norm_ref(xs, zs, wt, 1e-5)) < 1e-6
        print("ok", n)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok 24" in res.stdout, res.stderr[-3000:]


def test_gated_norm_backward_kernel_in_interpreter_matches_closed_form():
    """The gated-RMSNorm backward kernel, run by Triton's CPU interpreter in a subprocess, against
    the PyTorch closed form ``gated_rms_norm_bwd_ref`` (dx, d gate, d weight): D not a power of
    two (96, 300), the gate a column slice of a wider tensor viewed as [.., 3, D] (read through
    its strides), zero-centered or plain scale, 30 rows over 8 programs (each walks several rows
    and sums its part of d weight) and over 1 and 30 programs, float32 (1e-5) and bf16 inputs with
    a bf16 or float32 weight (2e-2: the interpreter rounds float32 -> bf16 by truncation, here the
    gradients -- with those truncations emulated it is bit-equal; the probe
    and the GPU test hold it to one rounding). Then
    the autograd node with ``fast`` on (its backward is the kernel): the same gradients, only
    those asked for, a differentiable backward under create_graph, and the result for no rows."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import hymba_plus.kernels.norm as N
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        n = 0
        for D in (96, 300):
            for dt, wdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                            (torch.bfloat16, torch.float32)):
                tol = 1e-5 if dt == torch.float32 else 2e-2
                for zc in (True, False):
                    x = torch.randn(2, 5, 3, D, generator=g).to(dt)
                    wide = torch.randn(2, 5, 3 * D + 20, generator=g).to(dt)
                    z = wide[..., 7:7 + 3 * D].view(2, 5, 3, D)  # GH = 3, rows strided
                    assert not z.is_contiguous()
                    w = (0.1 * torch.randn(D, generator=g) + (0.0 if zc else 1.0)).to(wdt)
                    dy = torch.randn(x.shape, generator=g).to(dt)
                    want = N.gated_rms_norm_bwd_ref(x, z, w, dy, 1e-6, zc)
                    for programs in ((None, 1, 30) if D == 96 else (None,)):
                        got = N.gated_rms_norm_bwd_triton(x, z, w, dy, 1e-6, zc, programs=programs)
                        for a, b in zip(got, want):
                            case = (D, dt, wdt, zc, programs, tuple(b.shape))
                            assert a.dtype == b.dtype and a.shape == b.shape and a.is_contiguous(), case
                            assert rel(a, b) < tol, (case, rel(a, b))
                        n += 1
        # the autograd node with the fast flag: forward and backward kernels, only the asked gradients
        x, wide = torch.randn(4, 7, 2, 96, generator=g), torch.randn(4, 7, 2 * 96 + 5, generator=g)
        z, w = wide[..., 5:].view(4, 7, 2, 96), 0.1 * torch.randn(96, generator=g)
        dy = torch.randn(x.shape, generator=g)
        bwd, calls = N.gated_rms_norm_bwd_triton, []
        N.gated_rms_norm_bwd_triton = lambda *a, **k: calls.append(a[6]) or bwd(*a, **k)  # a[6]: needs
        for needs in ((True, True, True), (True, False, True), (False, True, False)):
            ins = [t.clone().requires_grad_(r) for t, r in zip((x, z, w), needs)]
            y = N._GatedRMSNormFn.apply(*ins, 1e-6, True, True)
            assert torch.equal(y, N.gated_rms_norm_triton(x, z, w, 1e-6))
            got = torch.autograd.grad(y, [t for t in ins if t.requires_grad], dy)
            want = [b for b in N.gated_rms_norm_bwd_ref(x, z, w, dy, 1e-6, True, needs) if b is not None]
            assert len(got) == len(want) and all(rel(a, b) < 1e-5 for a, b in zip(got, want)), needs
        assert calls == [(True, True, True), (True, False, True), (False, True, False)], calls
        ins = [t.clone().requires_grad_() for t in (x, z, w)]
        g2 = torch.autograd.grad(N._GatedRMSNormFn.apply(*ins, 1e-6, True, True), ins, dy, create_graph=True)
        want = N.gated_rms_norm_bwd_ref(x, z, w, dy, 1e-6)  # create_graph: the PyTorch form, differentiable
        assert all(a.requires_grad and rel(a, b) < 1e-5 for a, b in zip(g2, want))
        assert len(calls) == 3
        N.gated_rms_norm_bwd_triton = bwd
        e = torch.zeros(0, 3, 96)
        dx, dz, dw = N.gated_rms_norm_bwd_triton(e, e, w, e, 1e-6)
        assert dx.shape == dz.shape == e.shape and torch.equal(dw, torch.zeros(96))
        print("ok", n)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok 24" in res.stdout, res.stderr[-3000:]


def test_rope_reference_rotates_pairs_and_keeps_the_rest():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 10, generator=g, dtype=torch.float64)
    ang = torch.randn(2, 5, 3, generator=g, dtype=torch.float64)  # R = 3 pairs of 10 dims
    y = R.rope_ref(x, ang.cos(), ang.sin())
    z = torch.complex(x[..., :3], x[..., 3:6]) * torch.exp(1j * ang)[:, :, None]
    assert torch.allclose(y[..., :3], z.real) and torch.allclose(y[..., 3:6], z.imag)
    assert torch.equal(y[..., 6:], x[..., 6:])
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1))  # a rotation


def test_rope_triton_kernel_in_interpreter_matches_reference():
    """The fused RoPE kernel forward and backward (rotation by -angle), run by Triton's CPU
    interpreter in a subprocess (TRITON_INTERPRET must be set before import); partial and full
    rotation, head counts that are not powers of two, fp32 and bf16, a strided input."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import hymba_plus.kernels.rotary as R
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        for B, T, H, D, r in ((2, 3, 3, 16, 8), (1, 4, 5, 12, 3), (2, 2, 2, 8, 2)):
            for dt in (torch.float32, torch.bfloat16):
                x = torch.randn(B, T, H, D, generator=g).to(dt).requires_grad_()
                ang = torch.randn(B, T, r, generator=g)
                cos, sin = ang.cos(), ang.sin()
                y = R._RopeTriton.apply(x, cos, sin)
                ref = R.rope_ref(x, cos, sin)
                gy = torch.randn(y.shape, generator=g).to(dt)
                gx = torch.autograd.grad(y, x, gy)[0]
                rx = torch.autograd.grad(ref, x, gy)[0]
                tol = 1e-6 if dt == torch.float32 else 1e-2
                assert y.dtype == dt and rel(y, ref) < tol and rel(gx, rx) < tol, (B, T, H, D, r, dt)
        # a head slice of a wider projection (strided tokens), cos/sin broadcast over the batch
        wide = torch.randn(2, 3, 4 * 16, generator=g)
        x = wide.view(2, 3, 4, 16)[:, :, 1:3]
        ang = torch.randn(1, 3, 8, generator=g).expand(2, 3, 8)
        assert rel(R._rope_triton(x, ang.cos(), ang.sin(), 1), R.rope_ref(x, ang.cos(), ang.sin())) < 1e-6
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
def test_gpu_fast_paths_match_references(monkeypatch):
    """Both fast paths run here (HYMBA_KERNELS=fast makes a missing one an error) and match
    their references: outputs and gradients, bf16 and fp32."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    for dt, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        x = torch.randn(4, 64, 16, 128, generator=g).to("cuda", dt).requires_grad_()
        s = (1 + 0.1 * torch.randn(128, generator=g)).to("cuda", dt).requires_grad_()
        ang = torch.randn(4, 64, 32, generator=g).cuda()
        for fast, ref, args, wrt in ((N.rms_norm, N.rms_norm_ref, (x, s, 1e-6), (x, s)),
                                     (R.apply_rope, R.rope_ref, (x, ang.cos(), ang.sin()), (x,))):
            y, y0 = fast(*args), ref(*args)
            gy = torch.randn_like(y)
            for a, b in zip((y, *torch.autograd.grad(y, wrt, gy)), (y0, *torch.autograd.grad(y0, wrt, gy))):
                assert rel_err(a.float(), b.float()) < tol, (fast.__name__, dt)
    # bf16 activations with a float32 scale (master weights under autocast): fused in float32
    x = torch.randn(4, 64, 16, 128, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    s = (1 + 0.1 * torch.randn(128, generator=g)).cuda().requires_grad_()
    y, y0 = N.rms_norm(x, s, 1e-6), N.rms_norm_ref(x, s, 1e-6)
    gy = torch.randn_like(y)
    for a, b in zip((y, *torch.autograd.grad(y, (x, s), gy)), (y0, *torch.autograd.grad(y0, (x, s), gy))):
        assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < 2e-2


@pytest.mark.gpu
def test_gpu_gated_norm_kernel_matches_reference(monkeypatch):
    """The gated RMSNorm kernel runs on CUDA without gradients (``GatedRMSNorm`` under no_grad)
    and matches the reference: float32 to 1e-5, bf16 (weight bf16 or float32) to one rounding,
    also with the gate a column slice of a wider tensor;
    with gradients the forward is the same kernel and the backward is the Triton backward kernel,
    whose gradients match autograd through the reference -- also at the gdn row's output norm
    shape with a smaller batch (x and the gate [2, 256, 3, 512], the gate a column slice of a
    wider projection, bf16 with a bf16 or float32 weight to 1e-2, float32 to 1e-5) -- and the
    PyTorch closed form (the same formulas: one rounding); both kernels replay in a CUDA graph."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    g = torch.Generator().manual_seed(0)
    for dt, wdt, tol in ((torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 1e-2),
                         (torch.bfloat16, torch.float32, 1e-2)):
        for zc in (True, False):
            gn = GatedRMSNorm(96, zero_centered=zc).to("cuda", wdt)
            with torch.no_grad():
                gn.weight.add_(0.1 * torch.randn(96, generator=g).cuda())
            x, z = (torch.randn(4, 1, 8, 96, generator=g).to("cuda", dt) for _ in range(2))
            assert N.dispatch.use_fast(N.GATED, x, z, gn.weight)
            with torch.no_grad():
                y = gn(x, z)
            y0 = N.gated_rms_norm_ref(x, z, gn.weight, gn.eps, zc)
            assert y.dtype == dt and rel_err(y.float(), y0.float()) < tol, (dt, wdt, zc)
            xg, zg = x.clone().requires_grad_(), z.clone().requires_grad_()
            yg = gn(xg, zg)  # training: the kernel forward, the Triton backward kernel
            assert yg.requires_grad and torch.equal(yg, y)
            dy = torch.randn(yg.shape, generator=g).to("cuda", dt)
            got = torch.autograd.grad(yg, (xg, zg, gn.weight), dy)
            xr, zr = x.clone().requires_grad_(), z.clone().requires_grad_()
            want = torch.autograd.grad(N.gated_rms_norm_ref(xr, zr, gn.weight, gn.eps, zc), (xr, zr, gn.weight), dy)
            for a, b in zip(got, want):
                assert a.dtype == b.dtype and rel_err(a.float(), b.float()) < max(tol, 1e-5), (dt, wdt, zc)
            # the gate a column slice of a wider projection (the decode engine's packed gdn GEMM)
            wide = torch.randn(4, 1, 8 * 96 + 40, generator=g).to("cuda", dt)
            zs = wide[..., 24:24 + 8 * 96].view(4, 1, 8, 96)
            with torch.no_grad():
                ys = gn(x, zs)
            assert rel_err(ys.float(), N.gated_rms_norm_ref(x, zs, gn.weight, gn.eps, zc).float()) < tol
    # the gdn row's output norm (smaller batch): training runs the backward kernel (counted)
    bwd, calls = N.gated_rms_norm_bwd_triton, []
    monkeypatch.setattr(N, "gated_rms_norm_bwd_triton", lambda *a, **k: calls.append(1) or bwd(*a, **k))
    for dt, wdt, tol in ((torch.bfloat16, torch.bfloat16, 1e-2), (torch.bfloat16, torch.float32, 1e-2),
                         (torch.float32, torch.float32, 1e-5)):
        for zc in (True, False):
            x = torch.randn(2, 256, 3, 512, generator=g).to("cuda", dt).requires_grad_()
            wide = torch.randn(2, 256, 3 * 512 + 64, generator=g).to("cuda", dt).requires_grad_()
            z = wide[..., 64:].view(2, 256, 3, 512)  # gdn's gate: a column slice of its projection
            w = (0.1 * torch.randn(512, generator=g) + (0.0 if zc else 1.0)).to("cuda", wdt).requires_grad_()
            dy = torch.randn(x.shape, generator=g).to("cuda", dt)
            y = N.gated_rms_norm(x, z, w, 1e-6, zc)
            got = torch.autograd.grad(y, (x, wide, w), dy)
            want = torch.autograd.grad(N.gated_rms_norm_ref(x, z, w, 1e-6, zc), (x, wide, w), dy)
            closed = list(N.gated_rms_norm_bwd_ref(x.detach(), z.detach(), w.detach(), dy, 1e-6, zc))
            closed[1] = closed[1].view(2, 256, 3 * 512)  # as the slice of d wide
            assert not got[1][..., :64].any()
            for name, a, b, c in zip(("dx", "dgate", "dw"), (got[0], got[1][..., 64:], got[2]),
                                     (want[0], want[1][..., 64:], want[2]), closed):
                case = (name, dt, wdt, zc)
                assert a.dtype == b.dtype == c.dtype and rel_err(a.float(), b.float()) < tol, case
                assert rel_err(a.float(), c.float()) < (1e-5 if a.dtype == torch.float32 else 1e-2), case
    assert len(calls) == 6
    x, z = (torch.randn(2, 1, 4, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.zeros(128, device="cuda")
    dy = torch.randn_like(x)
    with torch.no_grad():
        N.gated_rms_norm(x, z, w, 1e-6)
        bwd(x, z, w, dy, 1e-6)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = N.gated_rms_norm(x, z, w, 1e-6)
            grads = bwd(x, z, w, dy, 1e-6)
        x.copy_(torch.randn_like(x))
        dy.copy_(torch.randn_like(dy))
        graph.replay()
        assert torch.equal(y, N.gated_rms_norm(x, z, w, 1e-6))
        for a, b in zip(grads, bwd(x, z, w, dy, 1e-6)):
            assert torch.equal(a, b)
