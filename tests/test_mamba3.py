"""Mamba-3 (mamba3 / M3): chunked scan == exact recurrence == complex SSM, cache invariant,
padding, state size, reorder, gradients, MQAR learning, and fast kernels vs reference (GPU)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import RecipeError, build_model, load_recipe, registry
from hymba_plus.kernels import dispatch
from hymba_plus.kernels.mamba3 import (
    Mamba3Carry,
    mamba3,
    mamba3_chunked,
    mamba3_mimo_fast,
    mamba3_recurrent,
    mamba3_siso_fast,
    mamba3_step,
    zero_carry,
)
from tests.conftest import rel_err, rms_rel
from tests.helpers import tiny_recipe, train_mqar

F64 = torch.float64




def make_inputs(B=2, T=16, R=1, G=1, N=8, H=4, P=6, K=2, dtype=F64, device="cpu", seed=0, mimo=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    dt = F.softplus(r(B, T, H) - 1.0)
    args = dict(q=r(B, T, R, G, N), k=r(B, T, R, G, N), v=r(B, T, H, P), dt=dt,
                adt=-dt * torch.rand(B, T, H, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) * 2,
                trap=r(B, T, H), angles=r(B, T, H, K), q_bias=r(H, R, N), k_bias=r(H, R, N))
    kw = dict(D=r(H), z=r(B, T, H, P))
    if mimo if mimo is not None else R > 1:
        kw.update(mimo_v=r(H, R, P), mimo_z=r(H, R, P), mimo_o=r(H, R, P))
    return args, kw


def random_carry(B, H, N, P, R, K, dtype=F64, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)  # noqa: E731
    return Mamba3Carry(r(B, H, N, P), r(B, H, R, N), r(B, H, P), r(B, H, K).remainder(2 * math.pi))


def carry_err(a: Mamba3Carry, b: Mamba3Carry) -> float:
    """Largest relative difference of two carries (angles compared through cos / sin)."""
    errs = [rel_err(a.h, b.h), rel_err(a.k, b.k), rel_err(a.v, b.v)]
    if a.theta.numel():
        errs += [float((torch.cos(a.theta) - torch.cos(b.theta)).abs().max()),
                 float((torch.sin(a.theta) - torch.sin(b.theta)).abs().max())]
    return max(errs)


# ----------------------------------------------------------------------------- kernel: exactness
@pytest.mark.parametrize("R", [1, 2])
@pytest.mark.parametrize("T", [1, 5, 63, 64, 65, 130])
def test_chunked_equals_recurrence_float64(T, R):
    pairing = "interleaved" if R == 1 else "half"
    args, kw = make_inputs(T=T, R=R, N=8, K=2, seed=T)
    carry = random_carry(2, 4, 8, 6, R, 2)
    y_ref, c_ref = mamba3_recurrent(**args, carry=carry, pairing=pairing, **kw)
    y, c = mamba3_chunked(**args, carry=carry, chunk_size=64, pairing=pairing, **kw)
    assert rel_err(y, y_ref) <= 1e-8
    assert carry_err(c, c_ref) <= 1e-8
    # a different chunk size gives the same answer
    y16, c16 = mamba3_chunked(**args, carry=carry, chunk_size=16, pairing=pairing, **kw)
    assert rel_err(y16, y_ref) <= 1e-8 and carry_err(c16, c_ref) <= 1e-8


@pytest.mark.parametrize("R", [1, 2])
def test_split_calls_carry_state(R):
    """Two chunked calls through the carry == one call (state passing incl. the trapezoid term)."""
    pairing = "interleaved" if R == 1 else "half"
    args, kw = make_inputs(T=40, R=R, seed=3)
    y, c = mamba3_chunked(**args, chunk_size=8, pairing=pairing, **kw)
    cut = lambda d, a, b: {k: (v[:, a:b] if v.dim() >= 3 and v.shape[1] == 40 else v) for k, v in d.items()}  # noqa: E731
    y1, c1 = mamba3_chunked(**cut(args, 0, 13), chunk_size=8, pairing=pairing, **cut(kw, 0, 13))
    y2, c2 = mamba3_chunked(**cut(args, 13, 40), carry=c1, chunk_size=8, pairing=pairing, **cut(kw, 13, 40))
    assert rel_err(torch.cat([y1, y2], 1), y) <= 1e-10
    assert carry_err(c2, c) <= 1e-10


def complex_ssm(args, kw, pairing):
    """Oracle: the complex-valued SSM (paper §3.2) run token by token with complex128 states.

    Pair j of the state (dims (2j, 2j+1) or (j, j + N/2)) is one complex number; it decays by
    exp(Δ_t (A_t - i ω_{t,j})) with ω = π tanh(angle) (0 for unrotated pairs); the
    exponential-trapezoid weights use the same complex transition. SISO, no groups.
    """
    q, k, v = args["q"][:, :, 0, 0], args["k"][:, :, 0, 0], args["v"]
    B, T, N = q.shape
    H, P = v.shape[2], v.shape[3]
    K = args["angles"].shape[-1]
    qb, kb = args["q_bias"][:, 0], args["k_bias"][:, 0]

    def cplx(x):  # [..., N] -> [..., N/2] complex
        if pairing == "interleaved":
            return torch.complex(x[..., 0::2], x[..., 1::2])
        return torch.complex(x[..., : N // 2], x[..., N // 2:])

    dt, adt = args["dt"], args["adt"]
    lam = torch.sigmoid(args["trap"])
    omega = F.pad(math.pi * torch.tanh(args["angles"]), (0, N // 2 - K))  # [B,T,H,N/2]
    h = torch.zeros(B, H, N // 2, P, dtype=torch.complex128)
    prev = torch.zeros(B, H, N // 2, P, dtype=torch.complex128)
    ys = []
    for t in range(T):
        a = torch.exp(adt[:, t, :, None] - 1j * dt[:, t, :, None] * omega[:, t])  # [B,H,N/2]
        b = cplx(k[:, t, None] + kb)  # [B,H,N/2]
        c = cplx(q[:, t, None] + qb)
        cur = b[..., None] * v[:, t, :, None, :]  # [B,H,N/2,P]
        h = (a[..., None] * h + ((1 - lam[:, t]) * dt[:, t])[..., None, None] * a[..., None] * prev
             + (lam[:, t] * dt[:, t])[..., None, None] * cur)
        prev = cur
        y = (c.conj()[..., None] * h).real.sum(-2)  # Re <c, h>
        y = (y + kw["D"][:, None] * v[:, t]) * F.silu(kw["z"][:, t])
        ys.append(y)
    return torch.stack(ys, 1)


@pytest.mark.parametrize("pairing,K", [("interleaved", 4), ("interleaved", 2), ("half", 4), ("half", 1)])
def test_rotated_real_scan_equals_complex_ssm(pairing, K):
    args, kw = make_inputs(T=37, R=1, N=8, K=K, seed=11, mimo=False)
    y_c = complex_ssm(args, kw, pairing)
    y, _ = mamba3_chunked(**args, chunk_size=16, pairing=pairing, **kw)
    assert rel_err(y, y_c) <= 1e-10


@pytest.mark.parametrize("R", [1, 2])
def test_inert_slots_leave_state_alone(R):
    """lengths: rows advance by exactly lengths[b] tokens, in the chunked form and the step."""
    pairing = "interleaved" if R == 1 else "half"
    args, kw = make_inputs(B=3, T=20, R=R, seed=5)
    carry = random_carry(3, 4, 8, 6, R, 2)
    lengths = torch.tensor([20, 7, 0])
    y, c = mamba3_chunked(**args, carry=carry, lengths=lengths, chunk_size=8, pairing=pairing, **kw)
    y_loop, c_loop = mamba3_recurrent(**args, carry=carry, lengths=lengths, pairing=pairing, **kw)
    assert carry_err(c, c_loop) <= 1e-10
    for b in range(3):
        n = int(lengths[b])
        sl = {k_: (v_[b:b + 1, :n] if v_.dim() >= 3 and v_.shape[1] == 20 else v_) for k_, v_ in {**args, **kw}.items()}
        cb = Mamba3Carry(*(t[b:b + 1] for t in carry))
        if n == 0:
            assert carry_err(Mamba3Carry(*(t[b:b + 1] for t in c)), cb) == 0.0
            continue
        y_b, c_b = mamba3_chunked(**{k_: sl[k_] for k_ in args}, carry=cb, chunk_size=8, pairing=pairing,
                                  **{k_: sl[k_] for k_ in kw})
        assert rel_err(y[b:b + 1, :n], y_b) <= 1e-10
        assert carry_err(Mamba3Carry(*(t[b:b + 1] for t in c)), c_b) <= 1e-10


def test_step_with_invalid_row_keeps_state():
    args, kw = make_inputs(B=2, T=1, R=2, seed=7)
    one = {k_: (v_[:, 0] if v_.dim() >= 3 and v_.shape[1] == 1 else v_) for k_, v_ in {**args, **kw}.items()}
    c0 = zero_carry(2, 4, 8, 6, 2, 2, dtype=F64)
    c0 = Mamba3Carry(*(t + torch.randn_like(t) for t in c0))
    c0 = c0._replace(theta=c0.theta.remainder(2 * math.pi))
    y, c1 = mamba3_step(**one, carry=c0, pairing="half", valid=torch.tensor([True, False]))
    assert all(torch.equal(a[1], b[1]) for a, b in zip(c1, c0))
    assert not torch.equal(c1.h[0], c0.h[0]) and torch.isfinite(y).all()


def test_dispatch_is_reference_on_cpu():
    args, kw = make_inputs(T=9)
    y, c = mamba3(**args, chunk_size=4, **kw)
    y2, c2 = mamba3_chunked(**args, chunk_size=4, **kw)
    assert torch.equal(y, y2) and carry_err(c, c2) == 0.0
    assert "mamba3" in dispatch.available() and "mamba3_mimo" in dispatch.available()


# ----------------------------------------------------------------------------- module / model
def m3_recipe(pattern="M3|M3", R=1, **model):
    comp = {"mamba3": {"mimo_rank": R, "state_size": 16, "head_dim": 16, "chunk_size": 8}}
    return tiny_recipe(pattern, comp, **model)


def test_registered_and_config_checks():
    assert registry.canonical("M3") == "mamba3"
    with pytest.raises(RecipeError, match="head_dim"):
        load_recipe(tiny_recipe("M3", {"mamba3": {"head_dim": 48}}))
    with pytest.raises(RecipeError, match="n_groups"):
        load_recipe(tiny_recipe("M3", {"mamba3": {"head_dim": 32, "n_groups": 3}}))
    with pytest.raises(RecipeError, match="dt_min"):
        load_recipe(tiny_recipe("M3", {"mamba3": {"dt_min": 0.5, "dt_max": 0.1}}))
    with pytest.raises(RecipeError, match="rope_fraction"):
        load_recipe(tiny_recipe("M3", {"mamba3": {"rope_fraction": 1.5}}))


@pytest.mark.parametrize("R,G,frac,act", [(1, 1, 0.5, None), (1, 2, 1.0, "heavy_tail"), (2, 1, 0.5, None),
                                          (4, 2, 1.0, None), (1, 1, 0.0, None)])
def test_layer_equals_the_official_step_loop(R, G, frac, act):
    """The whole layer against a per-token loop written from the official module
    (state-spaces/mamba ``mamba_ssm/modules/mamba3.py``) and its step references
    (``mamba3_siso_step_ref``, ``mamba3_MIMO_step_ref``): in_proj split [z|x|B|C|dd_dt|dd_A|trap|angles],
    B/C RMSNorm (eps 1e-5) over N then per-head/rank biases, groups read by heads h // (H / G),
    A = -max(f(dd_A), A_floor), Δ = softplus(dd_dt + dt_bias), angle Θ += π tanh(angles) Δ before the
    rotation (pairs (2i, 2i+1) for SISO, (i, i + N/2) for MIMO), h = α h + (1-λ)Δα k_prev v_prev^T +
    λΔ k v^T with v = x ⊙ W^x_r, y_r = (h^T q_r + D v_r) SiLU(z ⊙ W^z_r), summed with W^o_r, out_proj."""
    from hymba_plus.components.mamba3 import Mamba3, Mamba3Config
    from hymba_plus.core.cache import StepContext

    torch.manual_seed(0)
    N, P, d = 8, 4, 8
    m = Mamba3(Mamba3Config(state_size=N, head_dim=P, n_groups=G, mimo_rank=R, rope_fraction=frac,
                            a_activation=act), d_model=d).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    B, T = 2, 6
    u = torch.randn(B, T, d, dtype=torch.float64)
    y = m(u, StepContext(positions=torch.arange(T).expand(B, T)))

    H, K = m.H, m.K
    z, x, Bm, Cm, ddt, dA, trap, ang = (u @ m.in_proj.weight.T).split(m.splits, -1)
    rms = lambda t, w: t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
    Bm = rms(Bm.view(B, T, R, G, N), m.B_norm.weight).repeat_interleave(H // G, 3)  # [B,T,R,H,N]
    Cm = rms(Cm.view(B, T, R, G, N), m.C_norm.weight).repeat_interleave(H // G, 3)
    f = (dA.clamp_min(0) + 1 / (1 - dA.clamp_max(0))) if act == "heavy_tail" else F.softplus(dA)
    A, DT, lam = -f.clamp_min(1e-4), F.softplus(ddt + m.dt_bias), torch.sigmoid(trap)
    ones = torch.ones(H, R, P, dtype=torch.float64)
    mx, mz, mo = (ones, ones, ones) if R == 1 else (m.mimo_x, m.mimo_z, m.mimo_o)

    def rot(t, c, s):  # the first K pairs rotated by Θ, the rest of the state real
        a, b = (t[..., 0::2], t[..., 1::2]) if R == 1 else (t[..., : N // 2], t[..., N // 2:])
        c, s = F.pad(c, (0, N // 2 - K), value=1.0), F.pad(s, (0, N // 2 - K))
        a, b = a * c - b * s, a * s + b * c
        return torch.stack([a, b], -1).flatten(-2) if R == 1 else torch.cat([a, b], -1)

    out = torch.zeros(B, T, H, P, dtype=torch.float64)
    for r in range(B):
        th, S = torch.zeros(H, K, dtype=torch.float64), torch.zeros(H, P, N, dtype=torch.float64)
        kp, vp = torch.zeros(H, R, N, dtype=torch.float64), torch.zeros(H, R, P, dtype=torch.float64)
        for t in range(T):
            th = th + math.pi * torch.tanh(ang[r, t]) * DT[r, t, :, None]
            c, s = torch.cos(th)[:, None], torch.sin(th)[:, None]
            q = rot(Cm[r, t].transpose(0, 1) + m.C_bias, c, s)  # [H,R,N]
            k = rot(Bm[r, t].transpose(0, 1) + m.B_bias, c, s)
            v = x[r, t].view(H, 1, P) * mx  # [H,R,P]
            al = torch.exp(A[r, t] * DT[r, t])[:, None, None]
            S = (al * S + ((1 - lam[r, t]) * DT[r, t])[:, None, None] * al * torch.einsum("hrn,hrp->hpn", kp, vp)
                 + (lam[r, t] * DT[r, t])[:, None, None] * torch.einsum("hrn,hrp->hpn", k, v))
            o = (torch.einsum("hpn,hrn->hrp", S, q) + m.D[:, None, None] * v) * F.silu(z[r, t].view(H, 1, P) * mz)
            out[r, t] = (o * mo).sum(1)
            kp, vp = k, v
    assert rel_err(y, out.reshape(B, T, -1) @ m.out_proj.weight.T) <= 1e-12


def test_heavy_tail_a_activation():
    """``a_activation: heavy_tail`` (state-spaces/mamba#962): A_t = -(pos(x) + 1 / (1 - neg(x))), floored;
    the layer's decay follows it, and a cached model still equals its full forward."""
    from hymba_plus.components.mamba3 import a_magnitude

    x = torch.tensor([-3.0, -0.5, 0.0, 3.0], dtype=torch.float64)
    assert a_magnitude(x, "heavy_tail").tolist() == pytest.approx([0.25, 1 / 1.5, 1.0, 4.0])
    assert torch.allclose(a_magnitude(x, "softplus"), torch.nn.functional.softplus(x))
    rec = m3_recipe("M3 | GA", 1, meta_tokens=2)
    rec["components"]["mamba3"]["a_activation"] = "heavy_tail"
    torch.manual_seed(0)
    model = build_model(rec).double().eval()
    layer = next(m for m in model.modules() if type(m).__name__ == "Mamba3")
    u = torch.randn(1, 5, model.config.d_model, dtype=torch.float64)
    dd_A = torch.split(layer.in_proj(u), layer.splits, dim=-1)[5]
    dt = torch.nn.functional.softplus(torch.split(layer.in_proj(u), layer.splits, dim=-1)[4] + layer.dt_bias)
    assert torch.allclose(layer._project(u)[3], -a_magnitude(dd_A, "heavy_tail").clamp(min=1e-4) * dt)
    ids = torch.randint(0, 64, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, :7], cache=cache).logits] + [model(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(7, 19)]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-8
    with pytest.raises(RecipeError, match="a_activation"):
        load_recipe(tiny_recipe("M3", {"mamba3": {"a_activation": "exp"}}))


@pytest.mark.parametrize("pattern", ["M3 | GA", "M3|M3"])
@pytest.mark.parametrize("R", [1, 2])
@settings(max_examples=3, deadline=None)
@given(cuts=st.lists(st.integers(1, 36), min_size=1, max_size=4, unique=True))
def test_chunked_cache_invariant(pattern, R, cuts):
    torch.manual_seed(0)
    model = build_model(m3_recipe(pattern, R, meta_tokens=3)).eval()
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(1))
    bounds = [0, *sorted(cuts), 37]
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in zip(bounds[:-1], bounds[1:])]
    assert rel_err(torch.cat(parts, 1), full) <= 1e-4


@pytest.mark.parametrize("R", [1, 2])
def test_left_padding(R):
    torch.manual_seed(0)
    model = build_model(m3_recipe("M3 | GA", R, meta_tokens=3)).eval()
    ids = torch.randint(1, 64, (2, 12))
    nxt = torch.randint(1, 64, (2, 3))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    with torch.no_grad():
        cache = model.new_cache(2)
        out = model(ids, attention_mask=mask, cache=cache).logits
        step = [model(nxt[:, i:i + 1], cache=cache).logits for i in range(3)]
        ref_cache = model.new_cache(1)
        ref = model(ids[1:, 5:], cache=ref_cache).logits
        ref_step = [model(nxt[1:, i:i + 1], cache=ref_cache).logits for i in range(3)]
    assert rel_err(out[1, 5:], ref[0]) <= 1e-4
    for a, b in zip(step, ref_step):
        assert rel_err(a[1], b[0]) <= 1e-4


def test_state_bytes_constant_and_reorder():
    torch.manual_seed(0)
    model = build_model(m3_recipe("M3|M3", 2)).eval()
    ids = torch.randint(0, 64, (3, 30))
    with torch.no_grad():
        cache = model.new_cache(3)
        model(ids[:, :4], cache=cache)
        n4 = cache.nbytes()
        model(ids[:, 4:29], cache=cache)
        assert cache.nbytes() == n4 == model.new_cache(3).nbytes()
        assert 3 * sum(b.mixer.state_nbytes(29, model.dtype) for b in model.blocks) == n4
        idx = torch.tensor([2, 0])
        cache.reorder(idx)
        out = model(ids[idx, 29:], cache=cache).logits
        ref = model(ids[idx]).logits[:, 29:]
    assert rel_err(out, ref) <= 1e-4


@pytest.mark.parametrize("R", [1, 2])
def test_gradients_finite_and_nonzero(R):
    torch.manual_seed(0)
    model = build_model(m3_recipe("M3|M3", R))
    ids = torch.randint(0, 64, (2, 20))
    model(ids, labels=ids).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_decode_step_matches_chunk_float64():
    torch.manual_seed(0)
    model = build_model(m3_recipe("M3", 2)).to(F64).eval()
    ids = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        steps = [model(ids[:, i:i + 1], cache=cache).logits for i in range(10)]
    assert rel_err(torch.cat(steps, 1), full) <= 1e-10


def test_learns_mqar():
    """2-layer Mamba-3 (SISO, defaults) on multi-query associative recall, 4 pairs in 32 tokens.

    Chance is 1 / (V/2) = 1/32; always answering some value seen in the context would give
    1/4, so the bar (0.35) needs real key -> value recall. Measured: 0.55 (250 steps, batch 16).
    """
    recipe = tiny_recipe("M3|M3", {"mamba3": {"chunk_size": 32}})
    acc = train_mqar(recipe, steps=250, batch=16, seq_len=32, n_pairs=4, lr=3e-3)
    print(f"mamba3 MQAR accuracy: {acc:.3f} (chance {1 / 32:.3f})")
    assert acc >= 0.35


# ----------------------------------------------------------------------------- GPU: fast vs reference
def _need(name: str) -> None:
    """The GPU tests exist to test the fast path: on a CUDA machine without it they fail
    (set the machine up with ``source benchmarks/gpu_env.sh``), never skip silently."""
    fp = dispatch._FAST[name]
    assert fp.ok(), f"fast path {name!r} not importable here ({fp.error}): source benchmarks/gpu_env.sh first"


def _grads(out, inputs, seed=0):
    g = torch.Generator(device=out.device).manual_seed(seed)
    do = torch.randn(out.shape, generator=g, device=out.device, dtype=torch.float32)
    return torch.autograd.grad((out.float() * do).sum(), inputs, allow_unused=True)


GRAD_KEYS = ("q", "k", "v", "adt", "dt", "trap", "angles", "q_bias", "k_bias")


# Quantities that go through the kernel's angle path (bf16 angles, PTX tanh.approx /
# sin.approx / cos.approx, a reverse cumsum over T for d angles) and their (RMS, max-abs)
# bounds. Worst measured on an H100 over T in {1, 63, 64, 1000, 4096}, with and without a
# state (mamba-ssm 2.3.2.post1): d angles 0.061 / 0.047 (grows with T), d dt 0.018 / 0.013,
# d trap 0.018 / 0.022, d k_bias 0.012 / 0.027, cos(theta) 0.009 / 0.031. Everything else
# stayed under 0.01 RMS (outputs 0.0075, carried h 0.0068, k 0.0063; other gradients <= 0.0099).
ANGLE_PATH_BOUNDS = {"dangles": (0.1, 0.1), "ddt": (3e-2, 3e-2), "dtrap": (3e-2, 4e-2),
                     "dk_bias": (2e-2, 4e-2), "cos_theta": (1e-2, 5e-2)}


def _check_close(label, pairs, fast, ref, fast_ins, ref_ins, loose=None):
    """Outputs/carries (``pairs``) and the gradient of every input in ``fast_ins`` / ``ref_ins``
    (name -> leaf tensor), fast vs reference: RMS relative error < 1e-2 and max-abs relative
    error < 3e-2, except the quantities in ``loose`` (name -> (rms, max-abs) bounds). A
    gradient that is zero in exact arithmetic (reference below 1e-4 of the largest) is
    compared in absolute terms (< 1e-3). All errors are collected first so one run reports
    every quantity."""
    loose = loose or {}
    names = list(fast_ins)
    gf, gr = _grads(fast, [fast_ins[n] for n in names]), _grads(ref, [ref_ins[n] for n in names])
    scale = max(float(b.abs().max()) for b in gr)
    bad, errs = {}, {}
    for name, a, b in zip(names, gf, gr):
        if float(b.abs().max()) < 1e-4 * scale:
            errs["d" + name] = float(a.abs().max()) / scale
            if errs["d" + name] > 1e-3:
                bad["d" + name] = errs["d" + name]
            continue
        pairs["d" + name] = (a, b)
    for name, (a, b) in pairs.items():
        errs[name] = (round(rms_rel(a, b), 5), round(rel_err(a.detach().float(), b.detach().float()), 5))
        rms_bound, max_bound = loose.get(name, (1e-2, 3e-2))
        if errs[name][0] >= rms_bound or errs[name][1] >= max_bound:
            bad[name] = errs[name]
    print(f"{label}: (rms, max-abs) {errs}")
    assert not bad, f"over the bound: {bad}; all: {errs}"


@pytest.fixture
def one_launch_config():
    """Autotuning mamba-ssm's kernels costs minutes of compile per T class; the numerics do
    not depend on the launch config (benchmarks/mixers.py times the autotuned path)."""
    _need("mamba3")
    with dispatch.pinned_autotune("mamba_ssm.") as n:
        assert n >= 4  # mamba-ssm 2.3.2: angle_dt fwd/bwd, the forward and four backward kernels
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 63, 64, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_state", [False, True])
def test_siso_fast_matches_reference(T, dtype, with_state, one_launch_config):
    """mamba-ssm's SISO kernel (bf16 inside: its wrapper casts q/k/v/z/trap/angles, and it
    uses PTX tanh/sin/cos approximations) vs the float32 reference on the same inputs, with
    ``_check_close``'s bounds; the angle path has the looser ``ANGLE_PATH_BOUNDS`` (measured,
    above the issue's 1e-2). d/d angles at T = 1 without a state is zero in exact arithmetic
    (the rotation cancels in q.k)."""
    _need("mamba3")
    B, H, N, P, K = 2, 4, 64, 64, 16
    args, kw = make_inputs(B=B, T=T, N=N, H=H, P=P, K=K, dtype=dtype, device="cuda", seed=T, mimo=False)
    args["q"], args["k"] = F.rms_norm(args["q"], (N,)), F.rms_norm(args["k"], (N,))
    args["dt"] = args["dt"] * 0.1
    args["adt"] = args["adt"] * 0.1
    carry = random_carry(B, H, N, P, 1, K, torch.float32, "cuda") if with_state else None
    ins = {k_: v_.detach().requires_grad_() for k_, v_ in args.items()}
    fast, cf = mamba3_siso_fast(**ins, carry=carry, chunk_size=64, need_state=True, **kw)
    ref_ins = {k_: v_.detach().float().requires_grad_() for k_, v_ in args.items()}
    ref, cr = mamba3_chunked(**ref_ins, carry=carry, chunk_size=64,
                             **{k_: v_.float() for k_, v_ in kw.items()})
    pairs = {"y": (fast, ref), "h": (cf.h, cr.h), "k": (cf.k, cr.k), "v": (cf.v, cr.v),
             "cos_theta": (torch.cos(cf.theta), torch.cos(cr.theta))}
    _check_close(f"T={T} {dtype} state={with_state}", pairs, fast, ref,
                 {k_: ins[k_] for k_ in GRAD_KEYS}, {k_: ref_ins[k_] for k_ in GRAD_KEYS}, loose=ANGLE_PATH_BOUNDS)
    if dtype == torch.float32:  # the dispatcher keeps float32 on the exact reference
        y, _ = mamba3(**{k_: v_.detach() for k_, v_ in args.items()}, carry=carry, chunk_size=64, **kw)
        y_ref, _ = mamba3_chunked(**{k_: v_.detach() for k_, v_ in args.items()}, carry=carry, chunk_size=64, **kw)
        assert rel_err(y, y_ref) < 1e-6


def _mimo_inputs(T, R):
    B, H, N, P, K = 2, 4, 64, 64, 16
    args, kw = make_inputs(B=B, T=T, R=R, N=N, H=H, P=P, K=K, dtype=torch.bfloat16, device="cuda", seed=T)
    args["q"], args["k"] = F.rms_norm(args["q"], (N,)), F.rms_norm(args["k"], (N,))
    args["dt"] = args["dt"] * 0.1
    args["adt"] = args["adt"] * 0.1
    kw["mimo_v"], kw["mimo_o"] = kw["mimo_v"] / R, kw["mimo_o"] / R
    return args, kw


def _mimo_ref(args, kw):
    ins = {k_: v_.detach().float() for k_, v_ in {**args, **kw}.items()}
    return mamba3_chunked(**ins, chunk_size=64, pairing="half")[0]


@pytest.mark.gpu
@pytest.mark.parametrize("T", [63, 64, 1000, 4096])
@pytest.mark.parametrize("R", [2, 4])
def test_mimo_fast_forward_matches_reference(T, R):
    """The TileLang MIMO forward (used without gradients: evaluation, scoring) vs the float32
    reference. Measured on an H100: <= 0.75% max-abs relative at T 63 / 1000, R 2 / 4; on an
    H200 with TileLang 0.1.8, 1.03% at T 4096, R 4. Bounds as for SISO: 1e-2 RMS-relative,
    3e-2 max-abs relative (the kernel keeps its chunk products in bf16)."""
    _need("mamba3_mimo")
    args, kw = _mimo_inputs(T, R)
    with torch.no_grad():
        fast = mamba3_mimo_fast(**args, chunk_size=64 // R, **kw)
        ref = _mimo_ref(args, kw)
    assert rms_rel(fast.float(), ref) < 1e-2
    assert rel_err(fast.float(), ref) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("T", [63, 64, 1000, 4096])
@pytest.mark.parametrize("R", [2, 4])
def test_mimo_fast_backward_matches_reference(T, R):
    """Gradients of the TileLang MIMO kernel with respect to every input (the scan inputs and
    the D skip, the gate z and the three MIMO projections), with ``_check_close``'s bounds and
    the angle path's ``ANGLE_PATH_BOUNDS``, as for SISO. Its backward does not compile with
    every TileLang release (see ``_probe_mimo_backward``); then this path is not used,
    training stays on the reference, and this test is reported as an expected failure with the
    compiler's error (TileLang 0.1.15; ``gpu_suite.sh mimo_alt`` runs it on 0.1.8, where it passes).
    Any other failure of the probe (the package missing, a forward that does not compile, wrong or
    non-finite gradients) fails it, as ``_need`` does."""
    _need("mamba3_mimo")
    fp = dispatch._FAST["mamba3_mimo_train"]
    if not fp.ok() and fp.error.startswith("InternalError"):  # TVM's compiler error, raised by TileLang
        pytest.xfail(f"this TileLang release does not compile mamba-ssm's MIMO backward ({fp.error[:200]}); "
                     "training stays on the reference")
    _need("mamba3_mimo_train")
    args, kw = _mimo_inputs(T, R)
    ins = {k_: v_.detach().requires_grad_() for k_, v_ in {**args, **kw}.items()}
    fast = mamba3_mimo_fast(**ins, chunk_size=64 // R)
    ref_ins = {k_: v_.detach().float().requires_grad_() for k_, v_ in {**args, **kw}.items()}
    ref, _ = mamba3_chunked(**ref_ins, chunk_size=64, pairing="half")
    _check_close(f"MIMO R={R} T={T}", {"y": (fast, ref)}, fast, ref, ins, ref_ins, loose=ANGLE_PATH_BOUNDS)


def test_mimo_dispatch_asks_for_the_backward_only_when_autograd_records():
    """Training needs the MIMO backward, which has its own probe; evaluation needs only the forward."""
    from hymba_plus.kernels.mamba3 import _mimo_path

    x = torch.randn(2, 3)
    w = torch.randn(2, 3, requires_grad=True)
    assert _mimo_path(x, None) == "mamba3_mimo"
    assert _mimo_path(x, w) == "mamba3_mimo_train"
    with torch.no_grad():
        assert _mimo_path(x, w) == "mamba3_mimo"
    assert {"mamba3_mimo", "mamba3_mimo_train"} <= set(dispatch.available())


@pytest.mark.gpu
def test_model_cache_invariant_on_gpu_bf16():
    """Fast prefill (with padding) + reference decode through one cache vs a full forward."""
    _need("mamba3")
    torch.manual_seed(0)
    recipe = tiny_recipe("M3 | GA", {"mamba3": {"state_size": 64, "head_dim": 64}}, meta_tokens=3)
    model = build_model(recipe).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(1, 64, (2, 200), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, :17] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits.float()
        cache = model.new_cache(2)
        parts = [model(ids[:, :150], attention_mask=mask[:, :150], cache=cache).logits]
        parts += [model(ids[:, i:i + 1], cache=cache).logits for i in range(150, 160)]
        parts += [model(ids[:, 160:], cache=cache).logits]
    out = torch.cat(parts, 1).float()
    assert rel_err(out[0], full[0]) < 5e-2 and rel_err(out[1, 17:], full[1, 17:]) < 5e-2


def test_reference_kernels_compute_in_float32_under_bf16_autocast():
    """Autocast would round every matmul of the reference scans to bf16 (states ~3e-3 off); the
    kernels turn it off (``dispatch.reference_math``): the same bits as without autocast."""
    from hymba_plus.kernels.gdn import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

    for R in (1, 2):
        args, kw = make_inputs(T=40, R=R, N=8, K=2, seed=3, dtype=torch.float32)
        carry = random_carry(2, 4, 8, 6, R, 2, dtype=torch.float32)
        for fn in (mamba3_chunked, mamba3_recurrent):
            plain = fn(**args, carry=carry, pairing="half", **kw)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                auto = fn(**args, carry=carry, pairing="half", **kw)
            assert torch.equal(auto[0], plain[0]) and torch.equal(auto[1].h, plain[1].h), (fn.__name__, R)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 33, 2, 16, generator=g) for _ in range(3))
    gate, beta = -torch.rand(1, 33, 2, generator=g) * 0.1, torch.rand(1, 33, 2, generator=g)
    for fn in (chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref):
        plain = fn(q, k, v, gate, beta, None, None, True, use_qk_l2norm=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            auto = fn(q, k, v, gate, beta, None, None, True, use_qk_l2norm=True)
        assert torch.equal(auto[0], plain[0]) and torch.equal(auto[1], plain[1]), fn.__name__
