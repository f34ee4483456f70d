"""Gated DeltaNet block-diffusion support: ``boundary_forward`` (the clean pass of
``core.two_stream``) gives the ordinary forward and, for every block start, exactly the
state a cached forward of the prefix leaves; the kernel's ``states_at`` option likewise."""

from __future__ import annotations

import functools

import pytest
import torch

from hymba_plus.components.gdn import GatedDeltaNet, GatedDeltaNetConfig
from hymba_plus.core.cache import StepContext
from hymba_plus.core.two_stream import TwoStream, positions, recurrent_two_stream
from hymba_plus.kernels.gdn import chunk_gated_delta_rule_ref, gated_delta_rule, recurrent_gated_delta_rule_ref
from tests.test_gdn import make_inputs

D = 16


def ctx_for(B: int, T: int, start: int = 0) -> StepContext:
    return StepContext(positions=(start + torch.arange(T))[None].expand(B, -1))


def make_mixer(dtype=torch.float64, seed=0, **cfg) -> GatedDeltaNet:  # noqa: ANN001
    torch.manual_seed(seed)
    m = GatedDeltaNet(GatedDeltaNetConfig(**{"n_heads": 2, "head_dim": 4, **cfg}), d_model=D).to(dtype)
    with torch.no_grad():  # faster decay than the init so the states carry visible structure
        m.A_log.add_(1.0)
    return m


def prefix_state(m: GatedDeltaNet, x: torch.Tensor, p: int):  # noqa: ANN201
    """The state a cached forward of x[:, :p] leaves (the init state for p == 0)."""
    B = x.shape[0]
    st = m.init_state(B, x.device, x.dtype)
    if p:
        m(x[:, :p], ctx_for(B, p), st)
    return st


CONFIGS = {
    "conv": {},
    "no_conv": {"use_short_conv": False},
    "no_delta": {"delta_rule": False},
    "gva": {"n_v_heads": 4, "expand_v": 1.5},  # n_v_heads > n_heads, dv != dk
    "small_chunks": {"chunk_size": 3},  # block starts fall inside chunks
    "chunk_5_gva_nodelta": {"chunk_size": 5, "n_v_heads": 4, "delta_rule": False, "use_short_conv": False},
}


# ----------------------------------------------------------------------------- kernel


@pytest.mark.parametrize("delta_rule", [True, False])
@pytest.mark.parametrize("C", [1, 4, 16, 64])
def test_kernel_states_at_equals_recurrent_prefixes(delta_rule, C):
    T = 37
    q, k, v, g, beta, s0 = make_inputs(2, T, 2, 4, 8, 6, seed=C)
    at = torch.tensor([0, 1, 3, 4, 16, 17, 36, 37, 5])  # any order, both ends included
    o, s, st = chunk_gated_delta_rule_ref(q, k, v, g, beta, s0, use_qk_l2norm=True, chunk_size=C,
                                          delta_rule=delta_rule, states_at=at)
    o_plain, s_plain = chunk_gated_delta_rule_ref(q, k, v, g, beta, s0, use_qk_l2norm=True, chunk_size=C,
                                                  delta_rule=delta_rule)
    assert torch.equal(o, o_plain) and torch.equal(s, s_plain)  # the option changes nothing else
    assert st.shape == (2, at.numel(), 4, 8, 6) and st.dtype == torch.float64
    for m, p in enumerate(at.tolist()):
        want = s0 if p == 0 else recurrent_gated_delta_rule_ref(
            q[:, :p], k[:, :p], v[:, :p], g[:, :p], beta[:, :p], s0, use_qk_l2norm=True, delta_rule=delta_rule)[1]
        torch.testing.assert_close(st[:, m], want, rtol=0, atol=1e-12)


def test_dispatcher_states_at_and_bounds():
    q, k, v, g, beta, _ = make_inputs(1, 10, 1, 2, 4, 4, seed=1, h0=False)
    o, s, st = gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=4,
                                states_at=torch.tensor([10, 0]))
    torch.testing.assert_close(st[:, 0], s, rtol=0, atol=0)
    assert not st[:, 1].any()
    with pytest.raises(ValueError, match="states_at"):
        gated_delta_rule(q, k, v, g, beta, states_at=torch.tensor([11]))


def test_states_at_traces_whole_under_torch_compile():
    """The ``states_at`` range check reads the counts on the host: skipped while torch.compile traces
    (block diffusion's compiled two-stream step), as inside a CUDA-graph capture, so the call is one
    graph (``fullgraph``) with the eager result. Before, the capture check failed the trace on a CPU
    build and the host read broke the graph."""
    q, k, v, g, beta, _ = make_inputs(1, 10, 1, 2, 4, 4, seed=1, h0=False)
    at = torch.tensor([10, 0, 4])
    torch._dynamo.reset()
    f = torch.compile(functools.partial(gated_delta_rule, output_final_state=True, chunk_size=4), backend="eager",
                      fullgraph=True)
    got = f(q, k, v, g, beta, states_at=at)
    want = gated_delta_rule(q, k, v, g, beta, output_final_state=True, chunk_size=4, states_at=at)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- mixer


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("offset", [0, 3])
@pytest.mark.parametrize("block_size", [4, 8])
def test_boundary_forward_matches_forward_and_cached_prefixes(name, offset, block_size):
    B, nb = 2, 3
    T = offset + nb * block_size
    m = make_mixer(**CONFIGS[name])
    x = torch.randn(B, T, D, dtype=torch.float64)
    ctx = ctx_for(B, T)
    y, states = m.boundary_forward(x, ctx, block_size, offset)
    torch.testing.assert_close(y, m(x, ctx), rtol=0, atol=1e-12)
    inner, states_i = m.boundary_inner(x, ctx, block_size, offset)
    torch.testing.assert_close(m.out_proj(inner), y, rtol=0, atol=0)
    assert states.S.shape == (B * nb, m.hv, m.dk, m.dv) and states.S.dtype == torch.float64
    assert (states.conv is None) == (not m.cfg.use_short_conv)
    for j in range(nb):
        want = prefix_state(m, x, offset + j * block_size)
        rows = torch.arange(B) * nb + j
        torch.testing.assert_close(states.S[rows], want.S, rtol=0, atol=1e-12)
        torch.testing.assert_close(states_i.S[rows], states.S[rows], rtol=0, atol=0)
        if want.conv is not None:
            assert states.conv.shape == (B * nb, m.qkv_size, m.cfg.conv_size - 1)
            torch.testing.assert_close(states.conv[rows], want.conv, rtol=0, atol=1e-14)


@pytest.mark.parametrize("name", ["conv", "gva", "small_chunks"])
def test_boundary_forward_float32(name):
    B, bs, offset, nb = 2, 4, 3, 4
    T = offset + nb * bs
    m = make_mixer(torch.float32, **CONFIGS[name])
    x = torch.randn(B, T, D)
    y, states = m.boundary_forward(x, ctx_for(B, T), bs, offset)
    torch.testing.assert_close(y, m(x, ctx_for(B, T)), rtol=0, atol=1e-5)
    assert states.S.dtype == torch.float32 and states.conv.dtype == torch.float32
    for j in range(nb):
        want = prefix_state(m, x, offset + j * bs)
        rows = torch.arange(B) * nb + j
        torch.testing.assert_close(states.S[rows], want.S, rtol=0, atol=1e-5)
        torch.testing.assert_close(states.conv[rows], want.conv, rtol=0, atol=1e-6)


def test_boundary_states_gradients_match_cached_prefixes():
    """Gradients flow through the states, and equal those of the cached prefix runs."""
    B, bs, offset, nb = 2, 4, 3, 3
    T = offset + nb * bs
    m = make_mixer(chunk_size=5, n_v_heads=4)
    x = torch.randn(B, T, D, dtype=torch.float64)
    w = torch.randn(B * nb, m.hv, m.dk, m.dv, dtype=torch.float64)
    wc = torch.randn(B * nb, m.qkv_size, m.cfg.conv_size - 1, dtype=torch.float64)

    _, states = m.boundary_forward(x, ctx_for(B, T), bs, offset)
    ((states.S * w).sum() + (states.conv * wc).sum()).backward()
    got = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    assert {"qkv_proj.weight", "a_proj.weight", "b_proj.weight", "A_log", "dt_bias", "conv_weight"} <= set(got)
    for n, gr in got.items():
        if n == "z_proj.weight":  # the output gate does not reach the states: its block of the
            assert not gr.any()   # fused a|b|z GEMM (kernels.linear) gets a zero gradient
            continue
        assert torch.isfinite(gr).all() and gr.abs().sum() > 0, n

    m.zero_grad(set_to_none=True)
    loss = 0.0
    for j in range(nb):
        st = prefix_state(m, x, offset + j * bs)
        rows = torch.arange(B) * nb + j
        loss = loss + (st.S * w[rows]).sum() + (st.conv * wc[rows]).sum()
    loss.backward()
    for n, gr in got.items():
        torch.testing.assert_close(gr, m.get_parameter(n).grad, rtol=1e-9, atol=1e-12, msg=n)


def test_boundary_forward_rejects_bad_shapes():
    m = make_mixer()
    x = torch.randn(1, 10, D, dtype=torch.float64)
    with pytest.raises(ValueError, match="block_size"):
        m.boundary_forward(x, ctx_for(1, 10), 4, 3)  # 10 != 3 + nb * 4
    with pytest.raises(ValueError, match="block_size"):
        m.boundary_forward(x, ctx_for(1, 10), 4, 10)  # no block
    ctx = ctx_for(1, 10)
    ctx.lengths = torch.tensor([10])
    with pytest.raises(ValueError, match="padding"):
        m.boundary_forward(x, ctx, 5, 0)


def test_two_stream_noisy_blocks_equal_cached_block_forward():
    """``recurrent_two_stream`` over gdn: clean stream = forward, noisy block j = a cached forward
    of block j on top of the clean prefix (meta included)."""
    B, M, bs, nb = 2, 3, 4, 3
    ts = TwoStream(block_size=bs, n_meta=M, length=nb * bs)
    m = make_mixer(chunk_size=5)
    x = torch.randn(B, M + 2 * ts.length, D, dtype=torch.float64)
    ctx = StepContext(positions=positions(ts, B, x.device), n_meta=M, two_stream=ts)
    y = recurrent_two_stream(m, x, ctx)
    Mc = ts.clean_slots
    torch.testing.assert_close(y[:, :Mc], m(x[:, :Mc], ctx_for(B, Mc)), rtol=0, atol=1e-12)
    for j in range(nb):
        st = prefix_state(m, x, M + j * bs)
        noisy = x[:, Mc + j * bs: Mc + (j + 1) * bs]
        want = m(noisy, ctx_for(B, bs, M + j * bs), st)
        torch.testing.assert_close(y[:, Mc + j * bs: Mc + (j + 1) * bs], want, rtol=0, atol=1e-12)
