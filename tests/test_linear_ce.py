"""Fused linear + cross entropy (kernels/linear_ce.py) and the model's fused training loss:
the chunked reference equals F.cross_entropy over the full logits (loss and every gradient),
HybridLM.forward(labels, return_logits=False) equals lm_loss over the logits, and the fast path
(Liger-Kernel's CE kernel in a capturable chunk loop) equals the reference in Triton's CPU
interpreter and on CUDA, eagerly and replayed from a CUDA graph."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hymba_plus import build_model
from hymba_plus.kernels import dispatch
from hymba_plus.kernels import linear_ce as linear_ce_mod
from hymba_plus.kernels.linear_ce import (
    chunk_rows,
    linear_cross_entropy,
    linear_cross_entropy_fused,
    linear_cross_entropy_ref,
)
from hymba_plus.objectives.next_token import NextToken
from tests.conftest import rel_err, rms_rel
from tests.helpers import tiny_recipe


def inputs(N=50, D=16, V=37, dtype=torch.float64, ignore_every=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64)
    w = 0.5 * torch.randn(V, D, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (N,), generator=g)
    if ignore_every:
        t[::ignore_every] = -100
    return h.to(device, dtype), w.to(device, dtype), t.to(device)


def loss_and_grads(fn, h, w, t):
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = fn(h, w, t)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


def full_ce(h, w, t):
    return F.cross_entropy(F.linear(h, w).float() if h.dtype != torch.float64 else F.linear(h, w), t,
                           ignore_index=-100)


@pytest.mark.parametrize("rows", [1, 7, 16, 50, 64, None])
def test_chunked_reference_equals_full_cross_entropy_float64(rows):
    """Any chunking (one row, chunks not dividing N, one chunk, more rows than N): loss, dh, dW
    equal F.cross_entropy over the full logits to float64 round-off; ignored rows get dh = 0."""
    h, w, t = inputs()
    got = loss_and_grads(lambda a, b, c: linear_cross_entropy_ref(a, b, c, rows=rows), h, w, t)
    want = loss_and_grads(full_ce, h, w, t)
    assert got[0].dtype == torch.float64
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12
    assert torch.all(got[1][t == -100] == 0)


def test_float32_and_the_dispatcher_on_cpu():
    """float32: equal to 1e-5 (float32 loss); ``linear_cross_entropy`` on CPU is the reference
    and takes any leading shape ([B, T, D] with targets [B, T])."""
    h, w, t = inputs(N=60, dtype=torch.float32)
    got = loss_and_grads(lambda a, b, c: linear_cross_entropy(a.view(4, 15, -1), b, c.view(4, 15), rows=8), h, w, t)
    want = loss_and_grads(full_ce, h, w, t)
    assert got[0].dtype == torch.float32
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-5
    assert dispatch.use_fast("linear_cross_entropy", h, w) is False


def test_no_scored_row_is_nan_with_zero_gradients_as_f_cross_entropy():
    h, w, _ = inputs(N=9)
    t = torch.full((9,), -100)
    got = loss_and_grads(lambda a, b, c: linear_cross_entropy_ref(a, b, c, rows=4), h, w, t)
    want = loss_and_grads(full_ce, h, w, t)
    assert torch.isnan(got[0]) and torch.isnan(want[0])
    for a, b in zip(got[1:], want[1:]):
        assert torch.equal(a, b) and not a.any()


def test_bf16_autocast_matches_the_unfused_head():
    """Under bf16 autocast with float32 weights (the training precision), the fused loss rounds
    the logits to bf16 as ``lm_head(h).float()`` does: loss and gradients (float32, reaching
    the float32 parameters through the autocast casts) match the unfused form."""
    h, w, t = inputs(N=96, D=32, V=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_and_grads(lambda a, b, c: linear_cross_entropy(a, b, c, rows=40), h, w, t)
        want = loss_and_grads(lambda a, b, c: F.cross_entropy(F.linear(a, b).float(), c), h, w, t)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    assert abs(float(got[0] - want[0])) < 1e-3 * float(want[0])
    for a, b in zip(got[1:], want[1:]):
        assert rms_rel(a, b) < 1e-2


def test_bad_shapes_and_mixed_dtypes_are_one_line_errors():
    h, w, t = inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="weight \\[V, D\\]"):
        linear_cross_entropy(h, w[:, :-1], t)
    with pytest.raises(ValueError, match="must match"):
        linear_cross_entropy(h.double(), w, t)


def test_chunk_rows():
    assert chunk_rows(16384, 32000) == 2048
    assert chunk_rows(100, 32000) == 100
    assert chunk_rows(10**6, 1 << 30) == 1


def test_fused_in_the_triton_interpreter_matches_reference():
    """The fast path (our chunk loop around Liger-Kernel's Triton cross-entropy kernel, as it
    calls the kernel: argument order, ignore_index, ``reduction="sum"`` scaled on the device,
    float32 weight-gradient accumulation, one chunk and several, NaN with no scored row, a scaled
    upstream gradient, a gradient for h only, no_grad), run by Triton's CPU interpreter in a
    subprocess (TRITON_INTERPRET must be set before import), equals the chunked reference;
    float32 and bf16."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    pytest.importorskip("triton")  # the dev extra installs triton and liger-kernel on x86-64
    pytest.importorskip("liger_kernel")
    code = textwrap.dedent("""
        import torch
        from hymba_plus.kernels.linear_ce import linear_cross_entropy_fused as fused, linear_cross_entropy_ref as ref
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        g = torch.Generator().manual_seed(0)
        for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
            h0, w0 = torch.randn(70, 32, generator=g), 0.5 * torch.randn(300, 32, generator=g)
            t = torch.randint(0, 300, (70,), generator=g)
            t[::7] = -100
            for rows in (None, 16):  # one chunk; five, the last partial
                res = []
                for fn in (lambda a, b, c: fused(a, b, c, rows=rows), lambda a, b, c: ref(a, b, c, rows=16)):
                    h, w = h0.to(dt).requires_grad_(), w0.to(dt).requires_grad_()
                    loss = fn(h, w, t)
                    res.append([loss.detach(), *torch.autograd.grad(loss / 4, (h, w))])
                for a, b in zip(*res):
                    assert a.dtype == b.dtype and rel(a, b) < tol, (dt, rows, rel(a, b))
            h = h0.to(dt).requires_grad_()
            loss = fused(h, w0.to(dt), t, rows=16)  # the weight needs no gradient
            (dh,) = torch.autograd.grad(loss, (h,))
            assert rel(dh, torch.autograd.grad(ref(h, w0.to(dt), t), (h,))[0]) < tol
            with torch.no_grad():
                assert rel(fused(h0.to(dt), w0.to(dt), t), ref(h0.to(dt), w0.to(dt), t)) < tol
            h, w = h0.to(dt).requires_grad_(), w0.to(dt).requires_grad_()
            loss = fused(h, w, torch.full_like(t, -100))
            dh, dw = torch.autograd.grad(loss, (h, w))
            assert torch.isnan(loss) and not dh.any() and not dw.any()
        print("ok")
    """)
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=root)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


# ----------------------------------------------------------------------------- the model


def model(tie=True, meta=2, vocab=97):
    torch.manual_seed(0)
    return build_model(tiny_recipe("GD | GA", {"gdn": {"n_heads": 2, "chunk_size": 8}, "gated_attn": {"n_heads": 2}},
                                   vocab_size=vocab, meta_tokens=meta, tie_embeddings=tie, ffn="mlp"))


def batch(B=3, T=21, V=97, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    labels = ids.clone()
    labels[0, 3:7] = -100
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    mask[2, -4:] = 0  # right padding
    return ids, labels, mask


@pytest.fixture
def small_chunks(monkeypatch):
    """The model's fused loss in chunks of 16 rows (tiny batches are otherwise one chunk)."""
    import hymba_plus.kernels.linear_ce as lce

    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 16 * 97)
    assert lce.chunk_rows(63, 97) == 16


def grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_forward_fused_loss_equals_lm_loss_over_logits(tie, masked, small_chunks):
    """``forward(labels, return_logits=False)``: no logits, the same loss as ``lm_loss`` over the
    logits (position t predicts labels[t+1]; -100 and pads ignored) and the same gradient of
    every parameter (the head's weight, or the tied embedding, included)."""
    m = model(tie=tie)
    ids, labels, mask = batch()
    mask = mask if masked else None
    out = m(ids, labels=labels, attention_mask=mask)
    out.loss.backward()
    want = grads(m)
    m.zero_grad(set_to_none=True)
    fused = m(ids, labels=labels, attention_mask=mask, return_logits=False)
    assert fused.logits is None
    fused.loss.backward()
    got = grads(m)
    assert rel_err(fused.loss, out.loss) < 1e-6
    assert set(got) == set(want) and ("embed.weight" in got) and (tie or "lm_head.weight" in got)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name
    assert torch.equal(out.loss, m.lm_loss(out.logits, labels, mask))


def test_float64_model_fused_loss_equals_lm_loss_to_float64_round_off(small_chunks):
    """A float64 model: the fused loss is float64 (``F.cross_entropy``'s dtype), so ``lm_loss`` over the
    logits must be too; it cast float64 logits down to float32 and the two disagreed by ~1e-7."""
    m = model(tie=False).double()
    ids, labels, mask = batch()
    out = m(ids, labels=labels, attention_mask=mask)
    fused = m(ids, labels=labels, attention_mask=mask, return_logits=False)
    assert out.loss.dtype == fused.loss.dtype == torch.float64
    assert rel_err(fused.loss, out.loss) < 1e-12
    assert m.lm_loss(out.logits.float(), labels, mask).dtype == torch.float32  # (16/32-bit logits: float32)


def test_float64_model_under_autocast_is_not_cast_down(small_chunks):
    """Autocast leaves float64 tensors alone (``nn.Linear`` of a float64 model stays float64 under bf16
    autocast), so the fused loss must too: it cast h and W to bf16 and differed by ~1e-5."""
    m = model(tie=True).double()
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, labels=labels, attention_mask=mask)
        fused = m(ids, labels=labels, attention_mask=mask, return_logits=False)
    assert out.logits.dtype == fused.loss.dtype == torch.float64
    assert rel_err(fused.loss, out.loss) < 1e-12


def test_forward_fused_loss_under_bf16_autocast(small_chunks):
    m = model(tie=True)
    ids, labels, mask = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(ids, labels=labels, attention_mask=mask)
        fused = m(ids, labels=labels, attention_mask=mask, return_logits=False)
    assert fused.loss.dtype == torch.float32
    assert abs(float(fused.loss - out.loss)) < 2e-3 * float(out.loss)
    (ga,) = torch.autograd.grad(out.loss, m.embed.weight)
    (gb,) = torch.autograd.grad(fused.loss, m.embed.weight)
    assert rms_rel(gb, ga) < 2e-2


def test_return_logits_false_without_labels_and_the_objective():
    """Without labels ``return_logits=False`` returns no logits and no loss; the next-token
    objective's training forward asks for no logits unless told to (``--distill``)."""
    m = model()
    ids, labels, _ = batch()
    assert m(ids, return_logits=False).logits is None
    obj = NextToken()
    out = obj.train_forward(m, m, ids, labels)
    assert out.logits is None and out.loss is not None
    out2 = obj.train_forward(m, m, ids, labels, return_logits=True)
    assert out2.logits.shape == (*ids.shape, 97) and torch.allclose(out2.loss, out.loss, rtol=1e-6)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("N, V", [(300, 1000), (4099, 32000)])
def test_fused_matches_reference(monkeypatch, dtype, N, V):
    """The fused linear cross entropy (the fast path: Liger-Kernel's CE kernel in our chunk loop)
    vs the chunked reference on the same CUDA inputs: loss and gradients (RMS relative), ignored
    rows included."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    h, w, t = inputs(N=N, D=256, V=V, dtype=dtype, ignore_every=7, device="cuda")
    w = w * 0.2
    assert dispatch.use_fast("linear_cross_entropy", h, w)
    got = loss_and_grads(linear_cross_entropy_fused, h, w, t)
    want = loss_and_grads(lambda a, b, c: linear_cross_entropy_ref(a, b, c, rows=1024), h, w, t)
    full = loss_and_grads(full_ce, h, w, t)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    assert abs(float(got[0] - want[0])) < tol * float(want[0])
    assert abs(float(want[0] - full[0])) < tol * float(full[0])
    for a, b, c in zip(got[1:], want[1:], full[1:]):
        assert a.dtype == b.dtype == dtype
        assert rms_rel(a, b) < tol and rms_rel(b, c) < tol
    # the dispatcher picks the fast path here; with no scored row both are NaN with zero gradients
    t_none = torch.full_like(t, -100)
    for fn in (linear_cross_entropy_fused, linear_cross_entropy_ref):
        res = loss_and_grads(fn, h, w, t_none)
        assert torch.isnan(res[0]) and not res[1].any() and not res[2].any()


@pytest.mark.gpu
def test_fused_is_captured_in_a_cuda_graph(monkeypatch):
    """The fast path inside a CUDA graph (``hymba train``'s default mode on CUDA): the
    dispatcher still picks it while capturing (nothing is read back to the host), and the
    replayed loss and gradients, for new inputs copied into the captured ones, equal an eager
    call's bit for bit (the same kernels in the same order)."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    h0, w0, t0 = inputs(N=4099, D=256, V=32000, dtype=torch.bfloat16, ignore_every=7, device="cuda")
    w0 = w0 * 0.2
    assert dispatch.use_fast("linear_cross_entropy", h0, w0)  # probed before the capture
    h, w, t = h0.clone().requires_grad_(), w0.clone().requires_grad_(), t0.clone()
    picked = []
    real = linear_ce_mod.linear_cross_entropy_fused
    monkeypatch.setattr(linear_ce_mod, "linear_cross_entropy_fused", lambda *a, **k: picked.append(1) or real(*a, **k))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph's docs ask
        for _ in range(2):
            torch.autograd.grad(linear_ce_mod.linear_cross_entropy(h, w, t), (h, w))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = linear_ce_mod.linear_cross_entropy(h, w, t)
        dh, dw = torch.autograd.grad(loss, (h, w))
    assert len(picked) == 3  # the fast path, also while capturing
    h1, w1, t1 = inputs(N=4099, D=256, V=32000, dtype=torch.bfloat16, ignore_every=5, seed=1, device="cuda")
    with torch.no_grad():
        h.copy_(h1), w.copy_(w1 * 0.2), t.copy_(t1)
    graph.replay()
    want = loss_and_grads(linear_cross_entropy_fused, h1, w1 * 0.2, t1)
    for a, b in zip((loss, dh, dw), want):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_fused_training_loss_equals_unfused_and_saves_memory(monkeypatch):
    """bf16 autocast with float32 weights on CUDA: the fused loss (the fast path) equals the unfused one
    and its gradients, and the peak memory of forward + backward drops by at least the bf16
    logits (N x V x 2 bytes), for the reference and the fast path."""
    dev = torch.device("cuda")
    V, B, T = 32000, 4, 1024
    torch.manual_seed(0)
    m = build_model(tiny_recipe("GA | GA", {"gated_attn": {"n_heads": 2}}, vocab_size=V, d_model=128,
                                max_seq_len=T, ffn="mlp")).to(dev)  # no fla kernel needed
    ids = torch.randint(0, V, (B, T), device=dev)

    def step(fused: bool) -> tuple[float, torch.Tensor, int]:
        m.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = m(ids, labels=ids, return_logits=not fused).loss
        loss.backward()
        torch.cuda.synchronize()
        return float(loss), m.embed.weight.grad.clone(), torch.cuda.max_memory_allocated() - base

    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    l0, g0, peak0 = step(False)
    l1, g1, peak1 = step(True)
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    l2, g2, peak2 = step(True)
    logits_bytes = B * T * V * 2
    print(f"peak unfused {peak0 / 2**20:.0f} MiB, fast {peak1 / 2**20:.0f} MiB, reference {peak2 / 2**20:.0f} MiB")
    assert abs(l1 - l0) < 1e-2 * l0 and abs(l2 - l0) < 1e-2 * l0
    assert rms_rel(g1, g0) < 2e-2 and rms_rel(g2, g0) < 2e-2
    assert peak1 < peak0 - logits_bytes and peak2 < peak0 - logits_bytes
