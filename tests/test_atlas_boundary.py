"""ATLAS block diffusion: ``Atlas.boundary_forward`` gives the ordinary forward's output and,
per block start, exactly the state a cached run over the prefix leaves (every field:
memory, momentum, the partial-chunk buffer, the window tail, the conv), with gradients."""

from __future__ import annotations

import pytest
import torch

from hymba_plus.components.atlas import Atlas, AtlasConfig, AtlasState
from hymba_plus.core.cache import StepContext

D_MODEL = 8
BASE = dict(n_heads=2, head_dim=4, window=3, poly_degree=2, memory_depth=2, memory_hidden=2, chunk_size=4,
            conv_size=4, ns_steps=5)
FIELDS = ("buf_k", "buf_v", "buf_gates", "n_buf", "tail_k", "tail_v", "tail_gamma", "conv")


def make(seed: int = 0, **over) -> Atlas:
    torch.manual_seed(seed)
    mod = Atlas(AtlasConfig(**{**BASE, **over}), d_model=D_MODEL).double()
    with torch.no_grad():  # break the init's symmetries (equal gate biases, Taylor coefficients)
        for p in mod.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return mod


def ctx_for(B: int, T: int) -> StepContext:
    return StepContext(positions=torch.arange(T)[None].expand(B, T))


def cached_prefix(mod: Atlas, x: torch.Tensor, P: int, split: int | None = None) -> AtlasState:
    """init_state, then a cached forward of x[:, :P] (in two calls at ``split`` if given)."""
    B = x.shape[0]
    st = mod.init_state(B, x.device, x.dtype)
    cuts = [0, P] if split is None or not 0 < split < P else [0, split, P]
    for a, b in zip(cuts[:-1], cuts[1:]):
        if b > a:
            mod(x[:, a:b], ctx_for(B, b - a), st)
    return st


def expected(mod: Atlas, st: AtlasState, name: str, B: int) -> list[torch.Tensor] | torch.Tensor:
    """A field of a cached state; a run that saw nothing keeps weights = momentum = None,
    which means the layer's initial memory and zero momentum."""
    v = getattr(st, name)
    if v is None and name == "weights":
        return [w[None].expand(B, *w.shape) for w in mod.memory]
    if v is None and name == "momentum":
        return [torch.zeros(B, *w.shape, dtype=w.dtype) for w in mod.memory]
    return v


CONFIGS = [  # (offset, block_size, nb, config overrides)
    (0, 4, 3, {}),  # block = chunk
    (3, 8, 2, {}),  # multiple of the chunk, meta offset: every block start mid-chunk
    (0, 8, 3, {"memory_depth": 3}),  # multiple of the chunk, aligned
    (0, 2, 5, {}),  # divides the chunk
    (3, 3, 4, {}),  # not aligned, smaller than the chunk
    (3, 6, 3, {"inner_optimizer": "sgd"}),  # not aligned, larger than the chunk
    (3, 3, 4, {"inner_optimizer": "muon_chunk"}),  # Newton-Schulz once per chunk
    (5, 1, 6, {"window": 1, "conv_size": 0}),  # one-token blocks, online rule, no conv
    (2, 5, 3, {"chunk_size": 3, "poly_degree": 1, "conv_size": 2}),
    (3, 2, 5, {"window": 7, "chunk_size": 3}),  # the window tail spans more than a chunk
]


@pytest.mark.parametrize("offset,bs,nb,over", CONFIGS)
def test_boundary_states_equal_cached_prefix_runs(offset, bs, nb, over):
    mod = make(**over)
    B, T = 2, offset + nb * bs
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    y, states = mod.boundary_forward(x, ctx_for(B, T), bs, offset)
    torch.testing.assert_close(y, mod(x, ctx_for(B, T), None), rtol=0, atol=1e-12)
    assert isinstance(states, AtlasState) and states.n_buf.shape == (B * nb,)
    for j in range(nb):
        P = offset + j * bs
        st = cached_prefix(mod, x, P, split=P // 2 + 1)
        rows = torch.arange(B) * nb + j
        for name in ("weights", "momentum"):
            want = expected(mod, st, name, B)
            got = getattr(states, name)
            assert len(got) == len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g[rows], w, rtol=0, atol=1e-12, msg=f"{name} block {j} (P={P})")
        for name in FIELDS:
            want, got = getattr(st, name), getattr(states, name)
            if want is None:
                assert got is None, name
                continue
            assert got.dtype == want.dtype and got.shape[1:] == want.shape[1:], name
            torch.testing.assert_close(got[rows], want, rtol=0, atol=1e-12, msg=f"{name} block {j} (P={P})")


@pytest.mark.parametrize("offset,bs,nb", [(3, 3, 3), (0, 8, 2)])
def test_noisy_blocks_from_states_equal_cached_block_runs(offset, bs, nb):
    """What ``recurrent_two_stream`` does with the states: all blocks at once as B*nb short
    sequences, each equal to a cached run of its block on top of the clean prefix."""
    mod = make(seed=1)
    B, T = 2, offset + nb * bs
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64)
    xn = torch.randn(B, nb * bs, D_MODEL, dtype=torch.float64)
    _, states = mod.boundary_forward(x, ctx_for(B, T), bs, offset)
    y_all = mod(xn.reshape(B * nb, bs, D_MODEL), ctx_for(B * nb, bs), states).view(B, nb, bs, -1)
    for j in range(nb):
        st = cached_prefix(mod, x, offset + j * bs)
        y_j = mod(xn[:, j * bs:(j + 1) * bs], ctx_for(B, bs), st)
        torch.testing.assert_close(y_all[:, j], y_j, rtol=0, atol=1e-12)


def _probe(tensors: list[torch.Tensor], gen: torch.Generator) -> torch.Tensor:
    return sum((t * torch.randn(t.shape, generator=gen, dtype=t.dtype)).sum() for t in tensors)


def _state_tensors(st: AtlasState) -> list[torch.Tensor]:
    return [*st.weights, *st.momentum, st.buf_k, st.buf_v, st.buf_gates, st.tail_k, st.tail_v, st.tail_gamma,
            st.conv]


def test_gradients_through_states_equal_cached_runs():
    """d(random probe of every state field)/d(parameters, input) is the same through
    boundary_forward as through the cached prefix runs, and reaches every parameter."""
    offset, bs, nb, B = 3, 3, 4, 2
    mod = make(seed=2)
    T = offset + nb * bs
    x = torch.randn(B, T, D_MODEL, dtype=torch.float64, requires_grad=True)
    params = [x, *mod.parameters()]
    _, states = mod.boundary_forward(x, ctx_for(B, T), bs, offset)
    g1 = torch.autograd.grad(_probe(_state_tensors(states), torch.Generator().manual_seed(0)), params,
                             allow_unused=True)
    rows = []
    for j in range(nb):
        st = cached_prefix(mod, x, offset + j * bs)
        st.weights, st.momentum = expected(mod, st, "weights", B), expected(mod, st, "momentum", B)
        rows.append(_state_tensors(st))
    # the same probe: stack the cached states in the boundary layout (row b*nb + j)
    stacked = [torch.stack(fs, 1).flatten(0, 1) for fs in zip(*rows)]
    g2 = torch.autograd.grad(_probe(stacked, torch.Generator().manual_seed(0)), params, allow_unused=True)
    names = ["x", *(n for n, _ in mod.named_parameters())]
    for name, a, b in zip(names, g1, g2):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=name)
    reached = {n for n, g in zip(names, g1) if g is not None and g.abs().sum() > 0}
    # g_proj / norm / o_proj only act on the output, not on the state
    assert {"x", "qkv_proj.weight", "conv_weight", "gate_proj.weight", "gate_proj.bias", "poly_coef",
            "memory.0", "memory.1"} <= reached


def test_float32_and_rejects_bad_layouts():
    mod = Atlas(AtlasConfig(**BASE), d_model=D_MODEL)
    x = torch.randn(2, 11, D_MODEL)
    y, st = mod.boundary_forward(x, ctx_for(2, 11), 4, 3)
    torch.testing.assert_close(y, mod(x, ctx_for(2, 11)), rtol=1e-5, atol=1e-6)
    assert st.weights[0].dtype == torch.float32 and st.n_buf.tolist() == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="offset"):
        mod.boundary_forward(x, ctx_for(2, 11), 3, 3)  # 8 is not a multiple of 3
    with pytest.raises(ValueError, match="offset"):
        mod.boundary_forward(x, ctx_for(2, 11), 4, 11)  # no block
    ctx = ctx_for(2, 11)
    ctx.lengths = torch.tensor([11, 9])
    with pytest.raises(ValueError, match="lengths"):
        mod.boundary_forward(x, ctx, 4, 3)
