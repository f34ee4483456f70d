"""Short causal depthwise conv with cache (hymba_plus.kernels.conv): the reference against
F.conv1d, the decode-step Triton kernel (``conv_update``) in Triton's CPU interpreter, and both
fast paths on a GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hymba_plus.kernels import dispatch
from hymba_plus.kernels.conv import causal_conv1d, causal_conv1d_ref
from tests.conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def oracle(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """Plain F.conv1d over the whole sequence, zero history."""
    K = w.shape[1]
    y = F.conv1d(F.pad(x.transpose(1, 2), (K - 1, 0)), w[:, None], b, groups=x.shape[2]).transpose(1, 2)
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("K", [2, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_matches_conv1d(K, activation):
    g = torch.Generator().manual_seed(K)
    x = torch.randn(2, 11, 6, generator=g, dtype=torch.float64)
    w = torch.randn(6, K, generator=g, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    y, state = causal_conv1d(x, w, b, activation=activation)
    assert y.shape == x.shape and state.shape == (2, 6, K - 1)
    assert rel_err(y, oracle(x, w, b, activation)) < 1e-12
    assert torch.equal(state, x[:, -(K - 1):].transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_inputs_compute_in_float32_with_one_rounding(dtype):
    """16-bit x: the reference sums in float32 with the float32 weight and bias as given and rounds
    once at the output, as fla's training kernel does (so a cached prefill / decode step sees the
    numbers training saw): equal to the float32 computation on the same (16-bit-exact) inputs cast
    once, with a float32 weight whose values are not representable in x's dtype; the state stays
    in x's dtype, bit-equal to the inputs."""
    g = torch.Generator().manual_seed(3)
    B, T, C, K = 2, 9, 40, 4
    x = torch.randn(B, T, C, generator=g).to(dtype)
    state = torch.randn(B, C, K - 1, generator=g).to(dtype)
    w = torch.randn(C, K, generator=g) * (1 + 2 ** -12)  # not exact in 16 bits
    bias = torch.randn(C, generator=g) * (1 + 2 ** -12)
    for act in (None, "silu"):
        y, s = causal_conv1d_ref(x, w, bias, state, activation=act)
        y32, s32 = causal_conv1d_ref(x.float(), w, bias, state.float(), activation=act)
        assert y.dtype == dtype and s.dtype == dtype
        assert torch.equal(y, y32.to(dtype)), act
        assert torch.equal(s.float(), s32)


def test_short_input_state_is_left_padded_with_zeros():
    x = torch.randn(1, 2, 3)
    w = torch.randn(3, 5)
    _, state = causal_conv1d(x, w, None, activation=None)
    assert torch.equal(state[:, :, :2], torch.zeros(1, 3, 2))
    assert torch.equal(state[:, :, 2:], x.transpose(1, 2))


@pytest.mark.parametrize("K", [2, 4])
def test_chunks_with_state_equal_one_pass(K):
    g = torch.Generator().manual_seed(1)
    T = 23
    x = torch.randn(3, T, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, K, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    full = oracle(x, w, b, "silu")
    for _ in range(5):
        cuts = sorted(torch.randperm(T - 1, generator=g)[:4].add(1).tolist())
        state, outs = None, []
        for lo, hi in zip([0, *cuts], [*cuts, T]):
            y, state = causal_conv1d(x[:, lo:hi], w, b, state=state, activation="silu")
            outs.append(y)
        assert rel_err(torch.cat(outs, 1), full) < 1e-12
        assert torch.equal(state, x[:, -(K - 1):].transpose(1, 2))


@pytest.mark.parametrize("K", [3, 4])
def test_lengths_keep_only_real_inputs(K):
    """Rows with lengths[b] real tokens (then garbage) continue exactly like the real tokens alone,
    including lengths 0 (state kept) and lengths < K-1 (state reaches into the old one)."""
    g = torch.Generator().manual_seed(2)
    C, T1, T2 = 4, 6, 5
    w = torch.randn(C, K, generator=g, dtype=torch.float64)
    b = torch.randn(C, generator=g, dtype=torch.float64)
    lengths = torch.tensor([6, 0, 1, 2, 4])
    B = lengths.numel()
    first = torch.randn(B, 3, C, generator=g, dtype=torch.float64)  # real history of every row
    chunk = torch.randn(B, T1, C, generator=g, dtype=torch.float64)  # real prefix + garbage tail
    nxt = torch.randn(B, T2, C, generator=g, dtype=torch.float64)
    _, s0 = causal_conv1d(first, w, b)
    y1, s1 = causal_conv1d(chunk, w, b, state=s0, lengths=lengths)
    y2, _ = causal_conv1d(nxt, w, b, state=s1)
    assert torch.isfinite(y1).all()
    for r in range(B):
        L = int(lengths[r])
        seq = torch.cat([first[r], chunk[r, :L], nxt[r]])[None]
        ref = oracle(seq, w, b, "silu")[0]
        if L:
            assert rel_err(y1[r, :L], ref[3:3 + L]) < 1e-12
        assert rel_err(y2[r], ref[3 + L:]) < 1e-12
        real = torch.cat([first[r], chunk[r, :L]])
        assert torch.equal(s1[r], real[-(K - 1):].T)


def test_gradients_flow_to_state_weight_bias():
    x = torch.randn(2, 7, 3, requires_grad=True)
    w = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    s = torch.randn(2, 3, 3, requires_grad=True)
    y, _ = causal_conv1d(x, w, b, state=s)
    y.square().sum().backward()
    for t in (x, w, b, s):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_bad_activation():
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(torch.randn(1, 2, 3), torch.randn(3, 2), activation="relu")


def test_decode_step_stays_on_the_reference_on_cpu_and_with_gradients(monkeypatch):
    """``conv_update`` is asked for only for a one-token step with a state, without gradients
    (the kernel has no backward); on CPU the reference runs."""
    import hymba_plus.kernels.conv as CV

    asked = []
    monkeypatch.setattr(CV.dispatch, "use_fast", lambda name, *t: asked.append(name) or False)
    x, w, s = torch.randn(2, 1, 5), torch.randn(5, 3), torch.randn(2, 5, 2)
    with torch.no_grad():
        y, st = causal_conv1d(x, w, None, s)
        causal_conv1d(torch.randn(2, 2, 5), w, None, s)  # two tokens: the reference
    assert asked == ["conv_update"]
    assert torch.equal(y, causal_conv1d_ref(x, w, None, s)[0]) and torch.equal(st, causal_conv1d_ref(x, w, None, s)[1])
    asked.clear()
    causal_conv1d(x, w.requires_grad_(), None, s)  # a gradient is needed: never the kernel
    assert asked == []


def test_conv_update_kernel_in_interpreter_matches_reference():
    """The decode-step kernel (T == 1 with a state), run by Triton's CPU interpreter in a
    subprocess (TRITON_INTERPRET must be set before import), against ``causal_conv1d_ref``: C not
    a power of two and above one block, K = 2, 3, 4, bias / no bias, SiLU / none, lengths with
    zeros (inert rows keep their state), a strided x and a sliced state, float32 weights under
    16-bit inputs.

    float32: bit-equal without the SiLU (products and sums in float32 in the reference's order, no
    fused multiply-add), the SiLU to 1e-6 (numpy's exp here, PyTorch's vectorised one in the reference).
    float16: bit-equal without the SiLU (the same float32 sum, one rounding at the output), within one
    fp16 rounding with it.
    bfloat16: the interpreter converts float32 -> bf16 by truncation, not round-to-nearest-even
    as GPUs and PyTorch do, so only a few bf16 ulps are asserted here; the GPU test holds bf16 to
    one rounding. The new state is a copy of inputs: bit-equal always."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        import hymba_plus.kernels.conv as CV
        g = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
        n = 0
        for B, C, K in ((3, 7, 2), (2, 100, 3), (4, 37, 4), (2, 1100, 4)):
            for dt in (torch.float32, torch.float16, torch.bfloat16):
                for has_bias in (False, True):
                    for act in (None, "silu"):
                        for lens in (None, torch.tensor([1, 0, 1, 0])[:B]):
                            x = torch.randn(B, 1, 2 * C, generator=g).to(dt)[:, :, ::2]  # strided channels
                            w = torch.randn(C, K, generator=g)
                            bias = torch.randn(C, generator=g) if has_bias else None
                            st = torch.randn(B, C + 3, K - 1, generator=g).to(dt)[:, 2:C + 2]  # a slice
                            y, s = CV.conv_update_triton(x, w, bias, st, lens, act)
                            y0, s0 = CV.causal_conv1d_ref(x, w, bias, st, lens, act)
                            case = (B, C, K, dt, has_bias, act, lens)
                            assert y.shape == (B, 1, C) and y.dtype == dt and y.is_contiguous(), case
                            assert s.shape == (B, C, K - 1) and s.dtype == dt and torch.equal(s, s0), case
                            if lens is not None:  # outputs of inert rows are don't-care
                                y, y0 = y[lens.bool()], y0[lens.bool()]
                            if dt == torch.bfloat16:
                                assert rel(y, y0) < 3e-2, case
                            elif act:  # exp differs in the last float32 bit: at most one fp16 rounding
                                assert rel(y, y0) < (1e-6 if dt == torch.float32 else 1e-3), case
                            else:
                                assert torch.equal(y, y0), case
                            n += 1
        print("ok", n)
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok 96" in res.stdout, res.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T", [1, 3, 64, 1000])
def test_fast_matches_reference(monkeypatch, dtype, T, fla_one_launch_config):
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    dev = torch.device("cuda")
    torch.manual_seed(T)
    C, K = 96, 4
    x = torch.randn(2, T, C, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(C, K, device=dev, dtype=dtype) * 0.5).requires_grad_()
    assert dispatch.use_fast("causal_conv1d", x, w)
    dy = torch.randn(2, T, C, device=dev, dtype=dtype)
    y, s = causal_conv1d(x, w, None, activation="silu")
    gx, gw = torch.autograd.grad((y * dy).sum(), (x, w))
    x32, w32 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    yr, sr = causal_conv1d_ref(x32, w32, None, activation="silu")
    rx, rw = torch.autograd.grad((yr * dy.float()).sum(), (x32, w32))
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert rel_err(y.float(), yr) < tol
    assert torch.equal(s.float(), sr)
    assert rel_err(gx.float(), rx) < tol
    assert rel_err(gw.float(), rw) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_decode_step_kernel_matches_reference(monkeypatch, dtype):
    """``causal_conv1d`` for T == 1 with a state runs the ``conv_update`` kernel on CUDA and gives
    the reference's numbers: bit-equal without the SiLU (float32 sums in the reference's order, one
    rounding at the output), with it float32 to 1e-6 and bf16 to one bf16 rounding, the new state bit-equal (a new tensor; the old state is not written); K 2-4,
    C not a power of two, bias, lengths with zeros, float32 weights under bf16 inputs."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for B, C, K in ((3, 7, 2), (2, 100, 3), (4, 1100, 4), (1, 6144, 4)):
        x = torch.randn(B, 1, C, generator=g).to(dev, dtype)
        w = torch.randn(C, K, generator=g).to(dev)
        st = torch.randn(B, C, K - 1, generator=g).to(dev, dtype)
        st_before = st.clone()
        lens = (torch.arange(B) % 3 != 1).long().to(dev)
        assert dispatch.use_fast("conv_update", x, w, st)
        for bias in (None, torch.randn(C, generator=g).to(dev)):
            for act in (None, "silu"):
                for lengths in (None, lens):
                    with torch.no_grad():
                        y, s = causal_conv1d(x, w, bias, st, lengths, act)
                    y0, s0 = causal_conv1d_ref(x, w, bias, st, lengths, act)
                    assert torch.equal(s, s0) and torch.equal(st, st_before)
                    if lengths is not None:
                        y, y0 = y[lengths.bool()], y0[lengths.bool()]
                    if act is None:
                        assert torch.equal(y, y0), (B, C, K)
                    else:
                        assert rel_err(y.float(), y0.float()) <= (1e-6 if dtype == torch.float32 else 1e-2), (B, C, K)


@pytest.mark.gpu
def test_gpu_decode_step_kernel_in_a_cuda_graph(monkeypatch):
    """The kernel is CUDA-graph capturable (fixed grid, no host read): a replay on new inputs
    equals an eager call on them."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    dev = torch.device("cuda")
    x = torch.randn(2, 1, 300, device=dev, dtype=torch.bfloat16)
    w = torch.randn(300, 4, device=dev)
    st = torch.randn(2, 300, 3, device=dev, dtype=torch.bfloat16)
    with torch.no_grad():
        causal_conv1d(x, w, None, st)  # probe + compile outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, s = causal_conv1d(x, w, None, st)
        x.copy_(torch.randn_like(x))
        st.copy_(torch.randn_like(st))
        graph.replay()
        y0, s0 = causal_conv1d(x, w, None, st)
    assert torch.equal(y, y0) and torch.equal(s, s0)


def test_float64_inputs_take_the_reference_without_probing_fla(monkeypatch):
    """fla's causal_conv1d computes in float32 (its tiles are cast to float32, the result back to
    x's dtype): a float64 call takes the reference, which computes in float64, without asking for
    the fast path (no probe, no fallback notice, no error under ``HYMBA_KERNELS=fast``); float16 /
    bfloat16 / float32 calls still take fla. (The fast path is registered for the CPU here, with a
    stand-in for fla that runs the reference.)"""
    from hymba_plus.kernels import conv

    probes, fla = [], []

    def stand_in(*, x, weight, bias, activation):
        fla.append(x.dtype)
        return causal_conv1d_ref(x, weight, bias, None, None, activation)

    monkeypatch.setitem(dispatch._FAST, "causal_conv1d",
                        dispatch.FastPath("causal_conv1d", lambda: probes.append(1), "fla stand-in", device="cpu"))
    monkeypatch.setattr(conv, "_fla_causal_conv1d", lambda: stand_in)
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    x, w = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)
    y, s = causal_conv1d(x, w, None, activation="silu")
    assert probes == [] and fla == []
    yr, sr = causal_conv1d_ref(x, w, None, activation="silu")
    assert torch.equal(y, yr) and torch.equal(s, sr)
    causal_conv1d(x.float(), w.float(), None, activation="silu")
    assert probes == [1] and fla == [torch.float32]
