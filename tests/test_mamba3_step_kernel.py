"""The Mamba-3 decode-step Triton kernel (``kernels.mamba3.mamba3_step_triton``, fast path
``mamba3_step``) against the PyTorch reference step ``mamba3_step``: the dispatch on CPU, the
kernel in Triton's CPU interpreter (kernel level and whole models decoding through it), on a GPU
the compiled kernel, a CUDA-graph replay and the decode engine's captured step, and a compile
for sm_90 without a GPU."""

from __future__ import annotations

import math
import textwrap

import pytest
import torch
import torch.nn.functional as F

from hymba_plus.kernels import dispatch
from hymba_plus.kernels import mamba3 as M
from tests.conftest import check_graph_engine_against_reference, rel_err, run_in_interpreter


def step_inputs(B, R, G, H, N, P, K, dtype, *, dz=True, mimo=None, valid=False, device="cpu", seed=0, strided=False):
    """Random arguments of ``mamba3_step`` (keyword dict). ``strided``: the activations are views
    as the layer makes them (q, k, v, z slices of wider tensors; angles expanded over heads)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    dt = F.softplus(r(B, H) - 1.0)
    if strided:
        q, k = r(B, R, G, 2 * N)[..., 1::2], r(B, R, G, N + 3)[..., 3:]
        v, z = r(B, H + 1, P)[:, 1:], r(B, H, 2 * P)[:, :, ::2]
        angles = r(B, 1, K).expand(B, H, K)
    else:
        q, k, v, z, angles = r(B, R, G, N), r(B, R, G, N), r(B, H, P), r(B, H, P), r(B, H, K)
    kw = dict(q=q.to(dtype), k=k.to(dtype), v=v.to(dtype), adt=-dt * 0.8 * torch.rand(B, H, generator=g).to(device),
              dt=dt, trap=r(B, H).to(dtype), angles=(3 * angles).to(dtype), q_bias=r(H, R, N), k_bias=r(H, R, N),
              carry=M.Mamba3Carry(r(B, H, N, P), r(B, H, R, N), r(B, H, P), r(B, H, K).remainder(2 * math.pi)))
    if dz:
        kw.update(D=r(H), z=z.to(dtype))
    if mimo if mimo is not None else R > 1:
        kw.update(mimo_v=r(H, R, P), mimo_z=r(H, R, P), mimo_o=r(H, R, P))
    if valid:
        kw["valid"] = (torch.arange(B) % 3 != 1).to(device)
    return kw


def test_decode_dispatch_is_the_reference_on_cpu_and_with_gradients(monkeypatch):
    """``mamba3_decode`` asks for the kernel only when no gradient is needed and every tensor is
    16/32-bit; on CPU (and whenever it is refused) it is ``mamba3_step`` itself, bit for bit."""
    asked = []
    monkeypatch.setattr(M.dispatch, "use_fast", lambda name, *t: asked.append(name) or False)
    kw = step_inputs(3, 2, 1, 4, 8, 6, 2, torch.float32, valid=True)
    with torch.no_grad():
        y, c = M.mamba3_decode(**kw, pairing="half")
    y0, c0 = M.mamba3_step(**kw, pairing="half")
    assert asked == [M.STEP]
    assert torch.equal(y, y0) and all(torch.equal(a, b) for a, b in zip(c, c0))
    asked.clear()
    kw["q_bias"].requires_grad_()
    M.mamba3_decode(**kw, pairing="half")  # a gradient is needed: never the kernel
    with torch.no_grad():
        M.mamba3_decode(**{n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t)
                           for n, t in kw.items() if n != "carry"},
                        carry=M.Mamba3Carry(*(t.double() for t in kw["carry"])), pairing="half")  # float64
        kw1 = step_inputs(2, 2, 1, 4, 8, 6, 2, torch.float32)
        del kw1["mimo_o"]  # R > 1 without the output weights keeps a rank dim: the reference only
        M.mamba3_decode(**kw1, pairing="half")
    assert asked == []
    assert M.STEP in dispatch.available()


def test_launch_config_fits_registers():
    """Fixed by (N, P, R): the whole state column, P tiles of at most 32 (h tile <= 4096 float32),
    a warp per 1024 tile elements (the configs ptxas compiled without spills for sm_90)."""
    for R in (1, 2, 4):
        for N in (2, 16, 48, 64, 128, 256):
            for P in (1, 16, 40, 64, 128):
                bn, bp, warps = M.step_launch_config(N, P, R)
                assert bn >= N and bn * bp <= 4096 and 1 <= bp <= 32 and bp >= min(P, 16), (R, N, P)
                assert warps == (2 if bn <= 16 and R >= 4 else max(1, bn * bp // 1024)), (R, N, P)




#: the interpreter test's cases (indices into its list) and the variants they run: the CPU suite's five
#: (R 1, 2, both pairings, grouped heads, K = N/2 and N/4, N 256 over tiles, both 16-bit types), then
#: in ``make test-all`` the other six
STEP_CASE_SPLIT = [((0, 1, 5, 8, 10), 22), pytest.param((2, 3, 4, 6, 7, 9), 28, marks=pytest.mark.slow)]


@pytest.mark.parametrize("which, n_variants", STEP_CASE_SPLIT)
def test_step_kernel_in_interpreter_matches_reference(which, n_variants):
    """The kernel, run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET set before
    import), against ``mamba3_step``: R 1, 2 and 4, both pairings, K < N/2, K = N/2 and K = 0,
    N and P not powers of two, P split over several tiles (N 128 / 256), grouped heads (G < H),
    valid masks with False rows (their carry bit-equal to the old one), D / z present and absent,
    MIMO up-projections, strided activations (the layer's views, angles expanded over heads),
    float32 inputs for every case and variant, bfloat16 or float16 on alternate cases (with D / z,
    masks and strides). The outputs are new tensors and the inputs unchanged.

    Bounds: float32 y, h, k to 1e-5 of the largest (reduction orders differ), v bit-equal, the
    angle to 2e-6 through its cos / sin (the interpreter's tanh is an exp formula, Triton has no
    ``tl.tanh``); 16-bit y to 1e-2 (one rounding: the interpreter truncates float32 -> bf16)."""
    pytest.importorskip("triton")
    out = run_in_interpreter(f"WHICH = {which!r}\n" + textwrap.dedent("""
        import torch
        from hymba_plus.kernels import mamba3 as M
        from tests.test_mamba3_step_kernel import step_inputs
        rel = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))
        cases = [  # B, R, G, H, N, P, K, pairing
            (3, 1, 1, 4, 16, 8, 4, "interleaved"),     # K = N/4
            (3, 1, 2, 4, 16, 24, 8, "interleaved"),    # K = N/2, grouped heads
            (2, 1, 1, 2, 12, 6, 3, "interleaved"),     # N, P not powers of two
            (2, 1, 1, 2, 16, 8, 0, "interleaved"),     # no rotation
            (3, 1, 2, 4, 16, 8, 3, "half"),
            (3, 2, 1, 4, 32, 16, 16, "half"),          # MIMO, K = N/2
            (3, 2, 2, 4, 32, 40, 8, "half"),           # MIMO, K = N/4, grouped heads
            (2, 4, 2, 4, 16, 8, 8, "half"),            # R = 4
            (2, 2, 1, 2, 10, 8, 3, "interleaved"),     # MIMO with the other pairing
            (2, 1, 1, 2, 128, 80, 32, "interleaved"),  # P over 3 tiles of 32
            (2, 2, 1, 2, 256, 48, 128, "half"),        # N = 256: tiles of 16
        ]
        n = 0
        for i, (B, R, G, H, N, P, K, pairing) in enumerate(cases):
            if i not in WHICH:
                continue
            for dt in (torch.float32, (torch.bfloat16, torch.float16)[i % 2]):  # 16-bit: alternate (CI time)
                for dz, valid, strided, mimo in ((True, False, False, None), (False, True, True, None),
                                                 (True, True, True, None), (True, True, False, False)):
                    if (mimo is False and R > 1) or (dt != torch.float32 and not (valid and strided and dz)):
                        continue  # 16-bit: one variant per case (CI time), float32: all
                    kw = step_inputs(B, R, G, H, N, P, K, dt, dz=dz, valid=valid, strided=strided, mimo=mimo, seed=n)
                    before = {k_: (t.clone() if torch.is_tensor(t) else tuple(x.clone() for x in t))
                              for k_, t in kw.items()}
                    y, c = M.mamba3_step_triton(**kw, pairing=pairing)
                    y0, c0 = M.mamba3_step(**kw, pairing=pairing)
                    case = (B, R, G, H, N, P, K, pairing, dt, dz, valid, strided, mimo)
                    assert y.shape == y0.shape == (B, H, P) and y.dtype == y0.dtype == dt, case
                    for a, b in zip(c, c0):
                        assert a.shape == b.shape and a.dtype == b.dtype == torch.float32 and a.is_contiguous(), case
                    for k_, t in kw.items():  # nothing written in place
                        ts = t if isinstance(t, tuple) else (t,)
                        bs = before[k_] if isinstance(before[k_], tuple) else (before[k_],)
                        assert all(torch.equal(x, x0) for x, x0 in zip(ts, bs)), (case, k_)
                    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(c, kw["carry"]) if a.numel()), case
                    assert rel(y, y0) <= (1e-5 if dt == torch.float32 else 1e-2), (case, rel(y, y0))
                    assert rel(c.h, c0.h) <= 1e-5 and rel(c.k, c0.k) <= 1e-5, (case, rel(c.h, c0.h), rel(c.k, c0.k))
                    assert torch.equal(c.v, c0.v), case
                    if K:
                        for f in (torch.cos, torch.sin):
                            assert float((f(c.theta) - f(c0.theta)).abs().max()) <= 2e-6, case
                        assert float(c.theta.min()) >= 0 and float(c.theta.max()) <= 2 * torch.pi, case
                    if valid:
                        inv = ~kw["valid"]
                        assert inv.any() and all(torch.equal(a[inv], b[inv]) for a, b in zip(c, kw["carry"])), case
                        ok = kw["valid"]
                        assert not torch.equal(c.h[ok], kw["carry"].h[ok]), case
                    n += 1
        print("ok", n)
    """))
    assert f"ok {n_variants}" in out, out


@pytest.mark.slow  # ~12-26 s in the interpreter; the kernel-level interpreter test stays in `make test`
def test_models_decode_through_step_kernel_in_interpreter():
    """Whole float32 models on the CPU with the ``mamba3_step`` fast path forced on (the kernel
    in Triton's interpreter): the greedy tokens of the static engine (SISO) or the dynamic cache (MIMO)
    equal the reference's, in left-padded batches with meta tokens, and so are the logits of
    every step (1e-5); SISO (interleaved, K = N/4, grouped heads) next to attention and MIMO R 2
    (half pairing, K = N/2); a one-token chunk with a padded row (valid False: that row's state
    bit-equal to before); the kernel did run."""
    pytest.importorskip("triton")
    run_in_interpreter("""
        import torch
        import hymba_plus.kernels.mamba3 as M
        from hymba_plus.components.mamba3 import Mamba3State
        from tests.test_invariant import make, V
        from tests.decode_kernel_checks import counting, decode_matches_reference, forced, rel, left_padded_prompt
        ids, mask = left_padded_prompt(V)
        for pattern, m3 in (("M3 | GA", {"state_size": 16, "head_dim": 16, "n_groups": 2, "rope_fraction": 0.5}),
                            ("M3 | M3", {"state_size": 16, "head_dim": 8, "mimo_rank": 2, "rope_fraction": 1.0})):
            model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                                 "meta_tokens": 2, "block_pattern": pattern},
                          "components": {"mamba3": m3}})
            n_m3 = pattern.count("M3")
            with counting(M, "mamba3_step_triton") as calls, torch.no_grad():
                # one engine each (CI time); every decode step of every M3 layer
                want = decode_matches_reference(model, ids, mask, (M.STEP,), calls,
                                                engines={"static" if n_m3 == 1 else "dynamic": n_m3 * 4})
                # a one-token chunk whose middle row is padding: valid = [T, F, T]
                step_mask = torch.tensor([[1], [0], [1]])
                caches = []
                for names in ((), (M.STEP,)):  # the reference (every fast path off), then the kernel
                    with forced(*names):
                        c = model.new_cache(3)
                        model(ids, attention_mask=mask, cache=c, logits_to_keep=1)
                        before = [(s.h.clone(), s.k.clone(), s.v.clone(), s.theta.clone())
                                  if isinstance(s, Mamba3State) else None for s in c.states]
                        calls.clear()
                        out = model(want[:, 7:8], attention_mask=step_mask, cache=c).logits[:, -1]
                    caches.append((c, before, out, len(calls)))
                (c0, _, out0, _), (c1, before, out1, n_calls) = caches
                assert n_calls == n_m3
                keep = step_mask[:, 0].bool()
                assert rel(out1[keep], out0[keep]) <= 1e-5
                n_checked = 0
                for s0, s1, b in zip(c0.states, c1.states, before):
                    if b is None:
                        continue
                    n_checked += 1
                    for f0, f1, fb in zip((s0.h, s0.k, s0.v, s0.theta), (s1.h, s1.k, s1.v, s1.theta), b):
                        assert torch.equal(f1[1], fb[1])  # the padded row: exactly unchanged
                        assert rel(f1[keep], f0[keep]) <= 1e-5
                assert n_checked == n_m3
        print("ok")
    """)


# ----------------------------------------------------------------------------- GPU


def ref64(kw: dict, pairing: str) -> tuple[torch.Tensor, M.Mamba3Carry]:
    """``mamba3_step`` on the same arguments in float64 (exact next to the float32 kernel,
    whatever the float32 matmul precision)."""
    d64 = {n: (t.double() if torch.is_tensor(t) and t.is_floating_point() else t) for n, t in kw.items() if n != "carry"}
    return M.mamba3_step(**d64, carry=M.Mamba3Carry(*(t.double() for t in kw["carry"])), pairing=pairing)


GPU_CASES = [  # B, R, G, H, N, P, K, pairing
    (16, 1, 1, 32, 128, 64, 32, "interleaved"),  # the official SISO layer's shapes, batch 16
    (4, 1, 2, 8, 64, 64, 32, "interleaved"),
    (8, 2, 1, 16, 128, 64, 64, "half"),  # MIMO, K = N/2
    (4, 4, 2, 8, 64, 32, 16, "half"),  # R = 4, K = N/4
    (3, 2, 1, 4, 48, 40, 12, "half"),  # N, P not powers of two
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_step_kernel_matches_reference(monkeypatch, dtype):
    """The compiled kernel (HYMBA_KERNELS=fast: a failed probe is an error) through
    ``mamba3_decode`` against ``mamba3_step`` in float64 on the GPU: y within one 16-bit rounding
    (2e-2) or 1e-5 (float32), the carry to 1e-5, invalid rows' carry bit-equal."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    for i, (B, R, G, H, N, P, K, pairing) in enumerate(GPU_CASES):
        for valid, strided in ((False, False), (True, True)):
            kw = step_inputs(B, R, G, H, N, P, K, dtype, valid=valid, strided=strided, device="cuda", seed=i)
            with torch.no_grad():
                y, c = M.mamba3_decode(**kw, pairing=pairing)
            assert dispatch.statuses()[M.STEP] is True
            y0, c0 = ref64(kw, pairing)
            case = (B, R, G, H, N, P, K, pairing, dtype, valid)
            assert y.dtype == dtype and rel_err(y.double(), y0) <= (2e-2 if dtype != torch.float32 else 1e-5), case
            for a, b in ((c.h, c0.h), (c.k, c0.k), (c.v, c0.v), (torch.cos(c.theta), torch.cos(c0.theta)),
                         (torch.sin(c.theta), torch.sin(c0.theta))):
                assert a.dtype == torch.float32 and rel_err(a.double(), b) <= 1e-5, case
            if valid:
                inv = ~kw["valid"]
                assert all(torch.equal(a[inv], b[inv]) for a, b in zip(c, kw["carry"])), case


@pytest.mark.gpu
def test_gpu_step_kernel_replays_in_a_cuda_graph(monkeypatch):
    """Captured once, the kernel reads the inputs and the carry written between replays (fixed
    launch config, no host read, fresh outputs from the graph's pool)."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    B, R, G, H, N, P, K, pairing = 4, 2, 1, 8, 64, 64, 32, "half"
    static = step_inputs(B, R, G, H, N, P, K, torch.bfloat16, valid=True, device="cuda", seed=0)
    M.mamba3_step_triton(**static, pairing=pairing)  # compiles outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y, c = M.mamba3_step_triton(**static, pairing=pairing)
    for seed in (1, 2, 3):
        new = step_inputs(B, R, G, H, N, P, K, torch.bfloat16, valid=True, device="cuda", seed=seed)
        new["valid"] = torch.rand(B, device="cuda") > 0.5
        for name, t in new.items():
            for dst, src in (zip(static[name], t) if name == "carry" else ((static[name], t),)):
                dst.copy_(src)
        graph.replay()
        y0, c0 = ref64(new, pairing)
        assert rel_err(y.double(), y0) <= 2e-2, seed
        assert max(rel_err(a.double(), b) for a, b in zip(c[:3], c0[:3])) <= 1e-5, seed
        assert float((torch.cos(c.theta) - torch.cos(c0.theta)).abs().max()) <= 1e-5, seed


@pytest.mark.gpu
@pytest.mark.parametrize("m3", [{"state_size": 64, "head_dim": 32, "n_groups": 2},
                                {"state_size": 32, "head_dim": 16, "mimo_rank": 2, "rope_fraction": 1.0}],
                         ids=["siso-grouped", "mimo2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_graph_engine_with_step_kernel_equals_reference(monkeypatch, m3, dtype):
    """The decode engine's captured step with the kernel (every other fast path off) against the
    reference step (all fast paths off, dynamic cache), left-padded prompts with meta tokens:
    the logits of every step along the reference's greedy sequence, and in float32 the tokens."""
    from tests.test_invariant import V, make

    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 64, "max_seq_len": 128, "ffn": "mlp",
                                         "meta_tokens": 2, "block_pattern": "M3 | GA | M3"},
                  "components": {"mamba3": m3}})
    model = model.to(device="cuda", dtype=dtype).eval()
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0)).cuda()
    mask = torch.ones_like(ids)
    mask[1, :5], mask[3, :2] = 0, 0
    check_graph_engine_against_reference(monkeypatch, model, ids, mask, 16, M.STEP, dtype, only=True)


@pytest.mark.slow
def test_step_kernel_compiles_for_sm90():
    """Triton's real compiler (TTIR -> PTX -> cubin, libdevice's tanh / sin / cos / fmod / exp)
    for an H100/H200 without a GPU, at the launch configs ``step_launch_config`` picks: SISO
    bf16 N 128 / P 64 with a valid mask and the gate, MIMO R 4 float32 N 256 half pairing, and
    MIMO R 2 without D, z (the interpreter tests check the numbers). ptxas (Triton 3.9's
    ``ptxas-blackwell -v``, sm_90a) reported no spills for these configs at N 8 .. 256, P 16 / 64,
    R 1 / 2 / 4, bf16 and float32 (128-238 registers); that is not asserted here."""
    triton = pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for

    act = ("q_ptr", "k_ptr", "v_ptr", "trap_ptr", "ang_ptr", "z_ptr", "y_ptr")
    for dtype, R, N, P, inter, dz, valid in (("bf16", 1, 128, 64, True, True, True),
                                             ("fp32", 4, 256, 64, False, True, False),
                                             ("bf16", 2, 64, 48, False, False, True)):
        bn, bp, warps = M.step_launch_config(N, P, R)
        const = dict(R=R, INTERLEAVED=inter, HAS_D=dz, HAS_Z=dz, HAS_MV=R > 1, HAS_MZ=R > 1 and dz, HAS_MO=R > 1,
                     HAS_VALID=valid, BLOCK_N=bn, BLOCK_P=bp, BLOCK_K=triton.next_power_of_2(max(1, N // 4)))
        sig = {}
        for name in M._mamba3_step_kernel.arg_names:
            sig[name] = ("constexpr" if name in const else f"*{dtype}" if name in act
                         else "*u8" if name == "valid_ptr" else "*fp32" if name.endswith("_ptr") else "i32")
        k = compile_for(M._mamba3_step_kernel, sig, const, warps, enable_fp_fusion=False)
        assert k.asm["cubin"], (dtype, R, N, P)
