"""The gdn decode-step kernel (``kernels.gdn.gated_delta_rule_decode_``, fast path
``gdn_decode``): one Triton launch for the gates, the q/k l2norm and the gated-delta-rule step,
the state written in place. In Triton's CPU interpreter against ``gdn_gates`` +
``recurrent_gated_delta_rule_ref`` (kernel level and whole models decoding with the static
engine); the static-state wiring of the layer (only the decode engine's own buffers are written
in place, a fork of a dynamic cache never is); on a GPU the compiled kernel, its CUDA-graph
replay and the graph engine against HYMBA_KERNELS=reference."""

from __future__ import annotations

import pytest
import torch

import hymba_plus.components.gdn as gdn_mod
from hymba_plus.components.gdn import GDNState
from hymba_plus.kernels import dispatch
from hymba_plus.kernels import gdn as G
from hymba_plus.models.decode_engine import clear_engines, engine_for
from tests.conftest import check_graph_engine_against_reference, rel_err, run_in_interpreter
from tests.decode_kernel_checks import left_padded_prompt
from tests.test_invariant import V, make


def _model(pattern: str, gdn: dict | None = None, d_model: int = 32):
    """A float32 test model; a hymba layer (HY) gets gdn SSM heads."""
    components = {"gdn": {"n_heads": 2, **(gdn or {})}}
    if "HY" in pattern:
        components["hymba"] = {"ssm": "gdn"}
    return make({"name": "t", "model": {"vocab_size": V, "d_model": d_model, "max_seq_len": 64, "ffn": "none",
                                        "meta_tokens": 2, "block_pattern": pattern}, "components": components})


def _gdn_states(cache) -> list[GDNState]:  # noqa: ANN001
    """The cache's gdn states, hymba's SSM states included."""
    out = []
    for s in cache.states:
        s = getattr(s, "ssm", s)
        if isinstance(s, GDNState):
            out.append(s)
    return out


def _prompt(B: int = 3, T: int = 7):
    return left_padded_prompt(V, B, T)


# ----------------------------------------------------------------------------- interpreter


def test_kernel_in_interpreter_matches_reference():
    """The kernel, run by Triton's CPU interpreter in a subprocess, against ``gdn_gates`` +
    ``recurrent_gated_delta_rule_ref``: dk / dv 32 and 64, dv 48 (not a power of two), Hv = H,
    2H and 4H, q/k/v as views of one conv output (plus a q/k with a non-unit last stride),
    float32 / bfloat16 / float16, a = 30 (softplus's identity branch), an inert row (lengths 0:
    state bit-equal); the state is the same tensor afterwards, updated in place. float32: 1e-5.
    16-bit: the state to 1e-5 as well (the interpreter truncates casts to bf16, so the reference's
    beta is taken rounded or truncated, whichever the interpreter did), the output to one 16-bit
    rounding (1e-2)."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        from hymba_plus.kernels import gdn as G
        g0 = torch.Generator().manual_seed(0)
        rel = lambda a, b: float((a.double() - b.double()).abs().max() / b.double().abs().max())
        def trunc_bf16(x):  # what the interpreter's float32 -> bf16 cast does (round toward zero)
            return (x.float().view(torch.int32) & -65536).view(torch.float32)
        cases = [(2, 2, 2, 32, 32, torch.float32, False), (2, 1, 2, 64, 64, torch.bfloat16, True),
                 (3, 2, 4, 32, 48, torch.float32, True), (2, 1, 4, 64, 32, torch.float16, False),
                 (3, 2, 8, 32, 64, torch.bfloat16, False), (2, 2, 4, 64, 48, torch.float32, False)]
        for B, H, Hv, dk, dv, dt, inert in cases:
            qkv = torch.randn(B, 1, 2 * H * dk + Hv * dv + 3, generator=g0).to(dt)  # a wider conv output
            q = qkv[..., :H * dk].unflatten(-1, (H, dk))
            k = qkv[..., H * dk:2 * H * dk].unflatten(-1, (H, dk))
            v = qkv[..., 2 * H * dk:2 * H * dk + Hv * dv].unflatten(-1, (Hv, dv))
            if Hv == 4 * H:  # q, k with strided head dims too
                q = torch.randn(B, 1, dk, H, generator=g0).to(dt).transpose(2, 3)
                k = torch.randn(B, 1, dk, H, generator=g0).to(dt).transpose(2, 3)
                assert H == 1 or q.stride(3) == H
            ab = torch.randn(B, 1, 2 * Hv, generator=g0).to(dt)
            a, b = 4 * ab[..., :Hv], 3 * ab[..., Hv:]
            a[0, 0, 0] = 30.0  # + dt_bias > 20: softplus is the identity
            A_log = torch.empty(Hv).uniform_(1.0, 16.0, generator=g0).log()
            dt_bias = -2 - 5 * torch.rand(Hv, generator=g0)
            S = torch.randn(B, Hv, dk, dv, generator=g0)
            S0, ptr = S.clone(), S.data_ptr()
            lengths = (torch.arange(B) > 0).long() if inert else None
            o = G.gated_delta_rule_decode_(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True, lengths=lengths)
            assert S.data_ptr() == ptr and o.dtype == dt and o.shape == (B, 1, Hv, dv) and torch.isfinite(o).all()
            gg, beta = G.gdn_gates(a, b, A_log, dt_bias)
            betas = [beta] + ([trunc_bf16(torch.sigmoid(b.float()))] if dt == torch.bfloat16 else [])
            errs = []
            for bt in betas:
                o_r, S_r = G.recurrent_gated_delta_rule_ref(q.double(), k.double(), v.double(), gg.double(),
                                                            bt.double(), S0.double(), use_qk_l2norm=True)
                lo = 1 if inert else 0
                errs.append((rel(S[lo:], S_r[lo:]), rel(o[lo:], o_r[lo:])))
            s_err, o_err = min(errs)
            assert s_err < 1e-5, (B, H, Hv, dk, dv, dt, errs)
            assert o_err < (1e-5 if dt == torch.float32 else 1e-2), (B, H, Hv, dk, dv, dt, errs)
            if inert:
                assert torch.equal(S[0], S0[0])
            else:
                assert not torch.equal(S, S0)
        # fp32 state of a strided (non-contiguous) buffer: written through its strides
        B, H, Hv, dk, dv = 2, 2, 2, 32, 32
        q, k = torch.randn(B, 1, H, dk, generator=g0), torch.randn(B, 1, H, dk, generator=g0)
        v, a, b = torch.randn(B, 1, Hv, dv, generator=g0), torch.randn(B, 1, Hv, generator=g0), torch.randn(B, 1, Hv, generator=g0)
        A_log, dt_bias = torch.zeros(Hv), torch.zeros(Hv)
        big = torch.randn(B, Hv, dv, dk, generator=g0)
        S = big.transpose(2, 3)
        S0 = S.clone()
        o = G.gated_delta_rule_decode_(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True)
        o_r, S_r = G.recurrent_gated_delta_rule_ref(q, k, v, *G.gdn_gates(a, b, A_log, dt_bias), S0, use_qk_l2norm=True)
        assert rel(S, S_r) < 1e-5 and rel(o, o_r) < 1e-5 and rel(big.transpose(2, 3), S_r) < 1e-5
        print("ok")
    """)


def test_models_decode_through_kernel_in_interpreter():
    """Whole float32 models on the CPU with the gdn_decode fast path forced on (the kernel in
    Triton's interpreter), left-padded prompts: the static engine (``DecodeEngine``, graph=False)
    runs every gdn decode step through the kernel, in place (S stays the engine's buffer), and
    gives the reference path's greedy tokens and the logits of every step (1e-5); the dynamic
    cache never runs it (its states are not static) and gives the same tokens. Patterns: plain
    gdn with grouped value heads (Hv = 2H, dv 48) next to attention, and hymba with gdn heads."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.components.gdn as gdn_mod
        from tests.decode_kernel_checks import counting, decode_matches_reference, forced
        from tests.test_gdn_decode import _gdn_states, _model, _prompt
        ids, mask = _prompt()

        first = {}

        def wrote_engine_buffers(eng, calls):  # the kernel wrote the engine's own S buffers, in place
            buffers = sorted(s.S.data_ptr() for s in _gdn_states(eng.buffers))
            assert sorted(calls) == buffers == first.setdefault(id(eng), buffers), (calls, buffers)

        for pattern, gdn in (("GD | GA | GD", {"n_v_heads": 4, "head_dim": 16, "expand_v": 3.0}),
                             ("HY | GD", {"head_dim": 16})):
            model = _model(pattern, gdn)
            with counting(gdn_mod, "gated_delta_rule_decode_", lambda a, k: a[7].data_ptr()) as calls:
                # 4 decode steps x 2 gdn layers on the static engine
                want = decode_matches_reference(model, ids, mask, ("gdn_decode",), calls, engines={"static": 2 * 4},
                                                on_step=wrote_engine_buffers)
                with torch.no_grad(), forced("gdn_decode"):  # a dynamic cache is not static: never in place
                    calls.clear()
                    got = model.generate(ids, max_new_tokens=5, attention_mask=mask, engine="dynamic")
                assert torch.equal(got, want) and not calls, (pattern, "dynamic")
        print("ok")
    """)


# ----------------------------------------------------------------------------- static-state wiring (in process)


def _in_place_stand_in(calls: list):
    """What the kernel does, in PyTorch: the reference step from ``state``, written back into it."""
    def step(q, k, v, a, b, A_log, dt_bias, state, scale=None, use_qk_l2norm=False, lengths=None):
        calls.append(state.data_ptr())
        g, beta = G.gdn_gates(a, b, A_log, dt_bias)
        if lengths is not None:
            keep = (lengths > 0)[:, None, None]
            g, beta = torch.where(keep, g, 0.0), torch.where(keep, beta, torch.zeros_like(beta))
        o, S = G.recurrent_gated_delta_rule_ref(q, k, v, g, beta, state, scale, use_qk_l2norm=use_qk_l2norm)
        state.copy_(S)
        return o
    return step


def test_static_flag_follows_static_copy_and_fork():
    """``GDNState.static`` is set by ``static_copy`` (also nested in hymba's state), kept by
    ``fork``, untouched by ``load_`` (it describes the buffers, not their contents) and False
    for every dynamic state."""
    model = _model("GD | HY")
    cache = model.new_cache(2)
    with torch.no_grad():
        model(torch.randint(0, V, (2, 5)), cache=cache)
    gd, hy = cache.states
    assert not gd.static and not hy.ssm.static
    st = cache.static_copy(256)
    gd_s, hy_s = st.states
    assert gd_s.static and hy_s.ssm.static
    assert gd_s.S.data_ptr() != gd.S.data_ptr() and torch.equal(gd_s.S, gd.S)
    assert gd_s.fork().static and hy_s.fork().ssm.static and not gd.fork().static
    st.load_(cache)  # a dynamic cache into static buffers: the flag stays, the values are copied
    assert gd_s.static and torch.equal(gd_s.S, gd.S)
    assert not cache.fork().states[0].static


def test_layer_writes_in_place_only_on_static_states(monkeypatch):
    """With the kernel's availability forced (a PyTorch stand-in that does what it does: the
    reference step written into the given state), a one-token step on a static state (the decode
    engine's buffers) updates S in place (same tensor, so ``load_`` skips it), including a padded
    step (the inert row's S unchanged); on a dynamic cache it is never called: a fork advanced by
    a step leaves the original's S (same tensor object and values) as it was, so speculative
    decoding / block diffusion keep their rollback. Logits and states equal the reference path."""
    calls: list = []
    monkeypatch.setattr(gdn_mod, "decode_in_place_ok", lambda *a, **k: True)
    monkeypatch.setattr(gdn_mod, "gated_delta_rule_decode_", _in_place_stand_in(calls))
    model = _model("GD | GA | GD", {"n_v_heads": 4})
    ids, mask = _prompt()
    with torch.no_grad():
        cache = model.new_cache(3)
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        # dynamic: a fork's step does not touch the original
        before = [(s.S, s.S.clone()) for s in _gdn_states(cache)]
        fork = cache.fork()
        want = model(ids[:, :1], cache=fork, check_inputs=False).logits
        assert not calls
        for (S, S0), s in zip(before, _gdn_states(cache)):
            assert s.S is S and torch.equal(S, S0)
        assert all(f.S is not S for f, (S, _) in zip(_gdn_states(fork), before))
        # static: the same step through the engine's binding writes the buffers in place
        eng = engine_for(model, cache, 4, graph=False)
        bufs = [s.S for s in _gdn_states(eng.buffers)]
        got = eng.step(ids[:, 0])
        assert sorted(calls) == sorted(S.data_ptr() for S in bufs)
        assert all(s.S is S for s, S in zip(_gdn_states(eng.buffers), bufs))  # the same tensors, written
        assert rel_err(got, want[:, -1]) < 1e-5
        for S, f in zip(bufs, _gdn_states(fork)):
            assert rel_err(S, f.S) < 1e-5
        # a padded one-token step on a static state: the inert row keeps its S
        clear_engines(model)
        st = cache.static_copy(256)
        live = st.fork()
        calls.clear()
        S0 = [s.S.clone() for s in _gdn_states(st)]
        model(ids[:, :1], attention_mask=torch.tensor([[0], [1], [1]]), cache=live, check_inputs=False)
        assert len(calls) == 2
        for S, s in zip(S0, _gdn_states(st)):
            assert torch.equal(s.S[0], S[0]) and not torch.equal(s.S[1:], S[1:])


def test_kernel_selection_rules(monkeypatch):
    """``decode_in_place_ok``: never on the CPU; with the fast path available (``use_fast``
    forced), only for one token, a float32 state, q/k/v of one 16-bit or float32 dtype, dk <= 256
    and no gradient needed."""
    q, v, a = torch.zeros(1, 1, 2, 32), torch.zeros(1, 1, 2, 32), torch.zeros(1, 1, 2)
    S, p = torch.zeros(1, 2, 32, 32), torch.zeros(2)
    assert not G.decode_in_place_ok(q, q, v, a, a, p, p, S)  # CPU
    if G.triton is None:
        return
    monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: name == G.DECODE)
    assert G.decode_in_place_ok(q, q, v, a, a, p, p, S)
    h = q.bfloat16()
    assert G.decode_in_place_ok(h, h, v.bfloat16(), a, a, p, p, S)
    assert not G.decode_in_place_ok(h, h, v, a, a, p, p, S)  # mixed dtypes
    assert not G.decode_in_place_ok(q.double(), q.double(), v.double(), a, a, p, p, S)  # float64
    assert not G.decode_in_place_ok(q, q, v, a, a, p, p, S.double())  # float64 state
    q2, v2 = torch.zeros(1, 2, 2, 32), torch.zeros(1, 2, 2, 32)
    assert not G.decode_in_place_ok(q2, q2, v2, a, a, p, p, S)  # two tokens
    big = torch.zeros(1, 1, 2, 512)
    assert not G.decode_in_place_ok(big, big, v, a, a, p, p, torch.zeros(1, 2, 512, 32))  # dk > 256
    w = p.clone().requires_grad_()
    assert not G.decode_in_place_ok(q, q, v, a, a, w, p, S)  # a gradient is needed
    with torch.no_grad():
        assert G.decode_in_place_ok(q, q, v, a, a, w, p, S)


# ----------------------------------------------------------------------------- GPU


def _ref64(q, k, v, a, b, A_log, dt_bias, S0):
    g, beta = G.gdn_gates(a, b, A_log, dt_bias)
    return G.recurrent_gated_delta_rule_ref(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                            S0.double(), use_qk_l2norm=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_kernel_matches_reference(monkeypatch, dtype):
    """The compiled kernel (HYMBA_KERNELS=fast: a failed probe is an error) against gdn_gates +
    the recurrence in float64: the issue's shape (batch 16, 32 value heads of 128 x 128, grouped
    over 16 q/k heads) and smaller ones (dv 48, Hv = 4H), strided views, a = 30, an inert row;
    the state updated in place."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    gen = torch.Generator().manual_seed(0)
    for B, H, Hv, dk, dv in ((16, 16, 32, 128, 128), (3, 2, 2, 64, 64), (2, 1, 4, 32, 48), (2, 2, 2, 256, 128)):
        q, k, v, a, b, A_log, dt_bias = G.decode_case(B, H, Hv, dk, dv, dtype, gen)
        S = torch.randn(B, Hv, dk, dv, generator=gen).cuda()
        S0, ptr = S.clone(), S.data_ptr()
        lengths = (torch.arange(B, device="cuda") > 0).long()
        with torch.no_grad():
            assert G.decode_in_place_ok(q, k, v, a, b, A_log, dt_bias, S, lengths)
            o = G.gated_delta_rule_decode_(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True, lengths=lengths)
            o_r, S_r = _ref64(q, k, v, a, b, A_log, dt_bias, S0)
        assert S.data_ptr() == ptr and o.dtype == dtype and torch.equal(S[0], S0[0])
        assert rel_err(S[1:].double(), S_r[1:]) < 1e-4, (B, H, Hv, dk, dv)
        assert rel_err(o[1:].double(), o_r[1:]) < (1e-2 if dtype == torch.bfloat16 else 1e-4), (B, H, Hv, dk, dv)


@pytest.mark.gpu
def test_gpu_kernel_replays_in_a_cuda_graph(monkeypatch):
    """Captured once over fixed input buffers and a state buffer, replays follow new inputs
    and keep advancing the state in place: 5 steps == 5 reference steps."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    gen = torch.Generator().manual_seed(1)
    B, H, Hv, dk, dv = 4, 2, 4, 128, 128
    ins = [t.clone() for t in G.decode_case(B, H, Hv, dk, dv, torch.bfloat16, gen)]
    S = 0.1 * torch.randn(B, Hv, dk, dv, generator=gen).cuda()
    with torch.no_grad():
        assert G.decode_in_place_ok(*ins, S)
        G.gated_delta_rule_decode_(*ins, S.clone(), use_qk_l2norm=True)  # compile and probe outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = G.gated_delta_rule_decode_(*ins, S, use_qk_l2norm=True)
        S_ref = S.double()
        for _ in range(5):
            new = G.decode_case(B, H, Hv, dk, dv, torch.bfloat16, gen)
            for buf, x in zip(ins[:5], new[:5]):
                buf.copy_(x)
            graph.replay()
            o_r, S_ref = _ref64(*ins, S_ref)
            assert rel_err(out.double(), o_r) < 1e-2 and rel_err(S.double(), S_ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_engine_with_gdn_decode_equals_reference(monkeypatch, dtype):
    """The captured step with the gdn_decode kernel (in place on the engine's buffers) against
    HYMBA_KERNELS=reference on a dynamic cache, left-padded prompts: the logits of every step
    along the reference's greedy sequence, and in float32 the greedy tokens."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 128, "max_seq_len": 128, "ffn": "mlp",
                                         "meta_tokens": 2, "block_pattern": "GD | GA | GD"},
                  "components": {"gdn": {"n_heads": 2, "n_v_heads": 4, "head_dim": 64}}})
    model = model.to(device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    check_graph_engine_against_reference(monkeypatch, model, ids, mask, 16, G.DECODE, dtype)


@pytest.mark.slow
def test_kernel_compiles_for_sm90():
    """Triton's real compiler (TTIR -> PTX -> cubin) for an H100/H200 without a GPU, at the
    launch configs ``_decode_launch`` picks: dk/dv 128 bf16 (the issue's shape), 256 x 256 and
    64 x 48 float32, with and without lengths (the interpreter tests check the numbers)."""
    pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for

    ptr_of = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    for dtype, dk, dv, lengths in ((torch.bfloat16, 128, 128, False), (torch.float32, 256, 256, True),
                                   (torch.float32, 64, 48, False), (torch.bfloat16, 128, 128, True)):
        bk, bv, warps = G._decode_launch(dk, dv)
        const = dict(L2NORM=True, HAS_LENGTHS=lengths, BK=bk, BV=bv)
        sig = {}
        for name in G._gdn_decode_kernel.arg_names:
            sig[name] = ("constexpr" if name in const
                         else ptr_of[dtype] if name in ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "a_ptr", "b_ptr")
                         else "*i64" if name == "len_ptr" else "*fp32" if name.endswith("_ptr")
                         else "fp32" if name in ("scale", "eps") else "i32")
        kern = compile_for(G._gdn_decode_kernel, sig, const, warps, enable_fp_fusion=False)
        assert kern.asm["cubin"], (dtype, dk, dv, lengths)
