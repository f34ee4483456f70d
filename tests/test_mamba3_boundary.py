"""Mamba-3 ``boundary_forward`` (block diffusion, ``core.two_stream``): the clean output equals
the ordinary forward, and the state at every block start equals the state a cached prefix
forward leaves (every field: h, previous-token k / v, angle sum theta); gradients flow."""

from __future__ import annotations

import math

import pytest
import torch

from hymba_plus.components.mamba3 import Mamba3, Mamba3Config
from hymba_plus.core.cache import StepContext
from tests.conftest import rel_err

F64 = torch.float64
D_MODEL = 16


def make_mixer(R: int, chunk: int, dtype: torch.dtype = F64) -> Mamba3:
    torch.manual_seed(0)
    cfg = Mamba3Config(state_size=8, head_dim=8, expand=2, mimo_rank=R, chunk_size=chunk)
    m = Mamba3(cfg, d_model=D_MODEL)
    with torch.no_grad():  # move away from the init (small Δ, unit biases) so every term matters
        m.dt_bias.normal_(0.0, 1.0)
        for p in (m.B_bias, m.C_bias, m.D):
            p.normal_()
        if R > 1:
            for p in (m.mimo_x, m.mimo_z, m.mimo_o):
                p.normal_()
    return m.to(dtype)


def ctx_for(batch: int, T: int) -> StepContext:
    return StepContext(positions=torch.arange(T)[None].expand(batch, T))


def angle_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference of two angle tensors mod 2π."""
    if a.numel() == 0:
        return 0.0
    return float((torch.remainder(a - b + math.pi, 2 * math.pi) - math.pi).abs().max())


CONFIGS = [(R, offset, bs, chunk) for R in (1, 2) for offset in (0, 3) for bs in (4, 8) for chunk in (6, 16)]


@pytest.mark.parametrize("R,offset,bs,chunk", CONFIGS)
def test_boundary_states_equal_cached_prefix_runs(R, offset, bs, chunk):
    B, nb = 2, 3
    T = offset + nb * bs
    m = make_mixer(R, chunk)
    x = torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(1), dtype=F64)
    with torch.no_grad():
        y, states = m.boundary_forward(x, ctx_for(B, T), bs, offset)
        ref = m(x, ctx_for(B, T), None)
        assert y.shape == ref.shape and rel_err(y, ref) <= 1e-10
        assert states.h.shape[0] == B * nb
        for j in range(nb):
            n = offset + j * bs
            st = m.init_state(B, x.device, x.dtype)
            if n:
                m(x[:, :n], ctx_for(B, n), st)
            for b in range(B):
                row = b * nb + j
                assert rel_err(states.h[row], st.h[b]) <= 1e-10, (j, b, "h")
                assert (states.k[row] - st.k[b]).abs().max() <= 1e-10, (j, b, "k")
                assert (states.v[row] - st.v[b]).abs().max() <= 1e-10, (j, b, "v")
                assert angle_err(states.theta[row], st.theta[b]) <= 1e-10, (j, b, "theta")
                assert states.theta.shape[-1] == m.K > 0


@pytest.mark.parametrize("R", [1, 2])
def test_boundary_float32_and_noisy_blocks_from_states(R):
    """float32 round-off bound, and running every block from its start state as B*nb short
    sequences (what ``recurrent_two_stream`` does) equals the cached per-block run."""
    B, nb, bs, offset = 2, 4, 4, 3
    T = offset + nb * bs
    m = make_mixer(R, 16, torch.float32)
    x = torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y, states = m.boundary_forward(x, ctx_for(B, T), bs, offset)
        assert rel_err(y, m(x, ctx_for(B, T), None)) <= 1e-5
        blocks = x[:, offset:].reshape(B * nb, bs, D_MODEL)
        y_blocks = m(blocks, ctx_for(B * nb, bs), states).reshape(B, nb * bs, -1)
        st = m.init_state(B, x.device, x.dtype)
        m(x[:, :offset], ctx_for(B, offset), st)
        y_cached = m(x[:, offset:], ctx_for(B, nb * bs), st)
    assert rel_err(y_blocks[:, :bs], y_cached[:, :bs]) <= 1e-5  # block 0 from the state after offset
    assert rel_err(y_blocks, y_cached) <= 1e-5  # clean blocks from the clean states == one cached run


@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("offset", [0, 3])
def test_boundary_gradients_flow(R, offset):
    B, nb, bs = 2, 3, 4
    T = offset + nb * bs
    m = make_mixer(R, 6)
    x = torch.randn(B, T, D_MODEL, generator=torch.Generator().manual_seed(3), dtype=F64, requires_grad=True)
    _, states = m.boundary_forward(x, ctx_for(B, T), bs, offset)
    loss = sum((t.sin() if name == "theta" else t).pow(2).sum() for name, t in states.tensors())
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().max() > 0
    for name in ("in_proj.weight", "dt_bias", "B_bias"):
        g = dict(m.named_parameters())[name].grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, name


def test_boundary_rejects_padding_and_bad_lengths():
    m = make_mixer(1, 8)
    x = torch.randn(2, 11, D_MODEL, dtype=F64)
    with pytest.raises(ValueError):
        m.boundary_forward(x, ctx_for(2, 11), 4, 0)
    with pytest.raises(ValueError, match="block_size=0"):  # (was a ZeroDivisionError)
        m.boundary_forward(x, ctx_for(2, 11), 0, 3)
    ctx = StepContext(positions=torch.arange(11)[None].expand(2, 11), lengths=torch.tensor([11, 9]))
    with pytest.raises(ValueError):
        m.boundary_forward(x, ctx, 4, 3)
