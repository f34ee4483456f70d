"""Short causal depthwise conv with cache (hymba_plus.kernels.conv)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hymba_plus.kernels import dispatch
from hymba_plus.kernels.conv import causal_conv1d, causal_conv1d_ref
from tests.conftest import rel_err


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
