"""kernels/bmm32.py: the 3xTF32 batched float32 matmul (Triton) against torch.bmm in float64, in
Triton's CPU interpreter and on CUDA; the op's autograd and fake kernel; the ATLAS chunk step
with its GEMMs through it (``BMM = "bmm32"``) against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hymba_plus.kernels import atlas as atlas_kernels
from hymba_plus.kernels import bmm32
from tests.conftest import rel_err

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: (G, M, K, N) and how the operands are laid out: the ATLAS chunk step's problems (a Gram matrix
#: [64, 560] x [560, 64], the momenta [128, 31] x [31, 560], the MLP [31, 560] x [560, 64]), edges
#: of the tiles, a K shorter than one K block, and strided / transposed / batch-broadcast operands
CASES = [(3, 64, 560, 64, "plain"), (2, 128, 31, 560, "plain"), (2, 31, 560, 64, "b_transposed"),
         (2, 5, 7, 3, "plain"), (4, 70, 33, 17, "a_transposed"), (3, 16, 16, 16, "b_broadcast"),
         (2, 9, 0, 4, "plain")]


def operands(G, M, K, N, layout, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(G, M, K, generator=g, dtype=torch.float64)
    b = torch.randn(G, K, N, generator=g, dtype=torch.float64)
    if layout == "a_transposed":
        a = torch.randn(G, K, M, generator=g, dtype=torch.float64).mT
    if layout == "b_transposed":
        b = torch.randn(G, N, K, generator=g, dtype=torch.float64).mT
    if layout == "b_broadcast":
        b = b[:1].expand(G, K, N)
    return a.to(device), b.to(device)


def test_bmm_kernel_in_interpreter_matches_float64():
    """The Triton kernel (3xTF32 split products) in Triton's CPU interpreter == torch.bmm in
    float64 within float32 rounding, for every case's shape and operand layout."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from hymba_plus.kernels import bmm32
        from tests.test_bmm32 import CASES, operands
        for G, M, K, N, layout in CASES:
            a, b = operands(G, M, K, N, layout)
            want = torch.bmm(a, b)
            got = bmm32.bmm_launch(a.float(), b.float()).double()
            assert got.shape == want.shape and got.is_contiguous(), (G, M, K, N, layout)
            scale = want.abs().max().clamp_min(1e-30)
            err = float((got - want).abs().max() / scale) if want.numel() else 0.0
            assert err < 1e-5, (G, M, K, N, layout, err)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


def test_grouped_kernel_in_interpreter_matches_float64():
    """The grouped launch (``bmm_group_launch``: up to four products of different shapes, layouts
    and tiles in one launch) in Triton's CPU interpreter == torch.bmm in float64 per problem: all
    the cases at once (two launches, 6 + 1, one problem with K = 0), one problem, and the chunk
    step's Gram phase (its three weights' [64, 560], [32, 560] and [32, 64] momenta)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from hymba_plus.kernels import bmm32
        from tests.test_bmm32 import CASES, operands
        gram = [torch.randn(4, m, n, dtype=torch.float64) for m, n in ((64, 560), (32, 560), (32, 64))]
        for problems in ([operands(*case, seed=i) for i, case in enumerate(CASES)], [operands(*CASES[1])],
                         [(x, x.mT) for x in gram]):
            got = bmm32.bmm_group_launch([(a.float(), b.float()) for a, b in problems])
            for (a, b), out in zip(problems, got):
                want = torch.bmm(a, b)
                assert out.shape == want.shape and out.is_contiguous()
                err = float((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0
                assert err < 1e-5, (a.shape, b.shape, err)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


def test_split_plan():
    """``split_plan``: the problem of the longest K loop is split while the launch's programs stay
    within the budget and each split keeps ``SPLIT_K_MIN_STEPS`` K steps; no empty splits; no
    budget, no split."""
    plan = bmm32.split_plan
    assert plan([(32, 18), (32, 18), (32, 2)], 0) == [1, 1, 1]
    assert plan([(32, 18), (32, 18), (32, 2)], 96) == [1, 1, 1]  # already at the budget
    assert plan([(32, 18), (32, 18), (32, 2)], 264) == [4, 3, 1]  # 256 programs, at most 6 steps each
    assert plan([(4, 18), (4, 18), (4, 2)], 10_000) == [5, 5, 1]  # 18 steps in 4 + 4 + 4 + 4 + 2
    assert plan([(1, 6)], 10_000) == [1]  # a split would have fewer than SPLIT_K_MIN_STEPS steps
    assert plan([(1, 1000)], 10_000) == [bmm32.SPLIT_K_MAX]
    assert plan([], 100) == []


def test_grouped_kernel_split_k_in_interpreter():
    """The grouped launch with K split over several programs per tile (forced: a large
    ``SPLIT_K_PROGRAMS``) in Triton's CPU interpreter == torch.bmm in float64; the tiles' partial
    sums are added in split order, so two launches give the same bits; the per-tile counters are
    zero again after each launch; with ``split_k`` False nothing is split."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from hymba_plus.kernels import bmm32
        from tests.test_bmm32 import CASES, operands
        problems = [operands(*case, seed=i) for i, case in enumerate(CASES[:3])]
        pairs = [(a.float(), b.float()) for a, b in problems]
        bmm32.SPLIT_K_PROGRAMS = 10_000
        plans, plan = [], bmm32.split_plan
        bmm32.split_plan = lambda *a: plans.append(plan(*a)) or plans[-1]
        unsplit = bmm32.bmm_group_launch(pairs, split_k=False)
        assert max(plans.pop()) == 1
        shapes = [(a.shape[0] * -(-a.shape[1] // bmm32._tile(a.shape[1])) * -(-b.shape[2] // bmm32._tile(b.shape[2])),
                   -(-a.shape[2] // 32)) for a, b in pairs]
        assert max(bmm32.split_plan(shapes, 10_000)) > 1
        runs = [bmm32.bmm_group_launch(pairs, split_k=True) for _ in range(2)]
        assert max(plans[-1]) > 1 and int(bmm32._COUNTERS[torch.device("cpu")].abs().sum()) == 0
        for (a, b), out, again, one in zip(problems, *runs, unsplit):
            want = torch.bmm(a, b)
            assert torch.equal(out, again)
            assert float((one.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)) < 1e-5
            err = float((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-30))
            assert err < 1e-5, (a.shape, b.shape, err)
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


def test_grouped_op_autograd_and_fake_kernel():
    """``hymba::bmm_f32_group`` (torch.bmm each on a CPU): results and hand-written backward (one
    grouped call for every da_i and db_i) == autograd through torch.bmm, also when an output gets
    no gradient; ``torch.library.opcheck`` passes."""
    problems = [[t.float().requires_grad_() for t in operands(*case, seed=i)] for i, case in enumerate(CASES[:4])]
    a, b = [p[0] for p in problems], [p[1] for p in problems]
    outs = bmm32.bmm_f32_group(a, b)
    refs = [[t.detach().clone().requires_grad_() for t in p] for p in problems]
    wants = [torch.bmm(x, y) for x, y in refs]
    assert all(torch.equal(o, w) for o, w in zip(outs, wants))
    seeds = [torch.randn_like(w) for w in wants]
    used = [0, 1, 3]  # output 2 unused: its gradient arrives as None
    got = torch.autograd.grad(sum((outs[i] * seeds[i]).sum() for i in used), [*a, *b])
    want = torch.autograd.grad(sum((wants[i] * seeds[i]).sum() for i in used),
                               [r[0] for r in refs] + [r[1] for r in refs], allow_unused=True)
    for x, y in zip(got, want):  # the unused output's operands: zero gradients
        assert rel_err(x, y) < 1e-6 if y is not None else float(x.abs().max()) == 0.0
    torch.library.opcheck(bmm32.bmm_f32_group, ([t.detach().requires_grad_() for t in a[:2]],
                                                [t.detach().requires_grad_() for t in b[:2]]))


def test_op_autograd_and_fake_kernel():
    """``hymba::bmm_f32`` (torch.bmm on a CPU): its hand-written backward == autograd through
    torch.bmm, for transposed and broadcast operands; ``torch.library.opcheck`` passes (the fake
    kernel's shapes, the autograd registration)."""
    for G, M, K, N, layout in CASES[:6]:
        a, b = (t.float().requires_grad_() for t in operands(G, M, K, N, layout, seed=1))
        out = bmm32.bmm_f32(a, b)
        ref_a, ref_b = (t.detach().clone().requires_grad_() for t in (a, b))
        want = torch.bmm(ref_a, ref_b)
        assert torch.equal(out, want)
        seed = torch.randn_like(want)
        ga, gb = torch.autograd.grad(out, (a, b), seed)
        wa, wb = torch.autograd.grad(want, (ref_a, ref_b), seed)
        assert rel_err(ga, wa) < 1e-6 and rel_err(gb, wb) < 1e-6, (G, M, K, N, layout)
    a, b = (t.float().requires_grad_() for t in operands(2, 5, 7, 3, "plain"))
    torch.library.opcheck(bmm32.bmm_f32, (a, b))


#: (Newton-Schulz per chunk, GROUP_GEMMS, SPLIT_K) of the interpreter test below: the CPU suite runs the
#: defaults (grouped, split) per chunk and the plain launches per token; ``make test-all`` the other three
BMM32_STEP_CASES = [(True, True, True), (False, False, False),
                    *(pytest.param(c, marks=pytest.mark.slow) for c in ((True, False, False), (True, True, False),
                                                                        (False, True, False)))]


@pytest.mark.parametrize("case", BMM32_STEP_CASES)
def test_atlas_chunk_step_through_bmm32_in_interpreter(case):
    """The ATLAS fast path with its chunk step's GEMMs through the Triton kernel (``BMM =
    "bmm32"``, which applies on CUDA, asked for on CPU tensors; the op's CPU kernel replaced by the
    launcher, in Triton's CPU interpreter) against the float64 reference: Muon per chunk and per token, outputs, state
    and every gradient; the same with each phase's products in one grouped launch (``GROUP_GEMMS``), and
    with those of two or more K steps split over programs (``SPLIT_K``)."""
    pytest.importorskip("triton")
    code = f"CASE = {case!r}\n" + textwrap.dedent("""
        import torch
        from hymba_plus.kernels import atlas, bmm32
        bmm32.bmm_f32.register_kernel("cpu")(lambda a, b: bmm32.bmm_launch(a, b))
        bmm32.bmm_f32_group.register_kernel("cpu")(
            lambda a, b, split_k=False: bmm32.bmm_group_launch(list(zip(a, b)), split_k=split_k))
        bmm32.SPLIT_K_PROGRAMS, bmm32.SPLIT_K_MIN_STEPS = 10_000, 1  # every product of 2+ K steps split
        plans, plan = [], bmm32.split_plan
        bmm32.split_plan = lambda *a: plans.append(plan(*a)) or plans[-1]
        from tests.test_atlas import float32_errors, random_problem
        atlas.FUSED_STEP = False  # the unfused step's GEMMs are what this checks (muon_chunk would take the fused one)
        ns_chunk, group, split = CASE
        atlas.GROUP_GEMMS = group  # the weights' products of each phase in one grouped launch
        atlas.SPLIT_K = split  # those of a long K split over programs
        args, leaves = random_problem(N=2, T=10, C=4, c=3, d=8, p=2, hid=40, depth=2)
        errs = float32_errors(args, leaves, 2, "cpu", dict(compile=False, bmm32=True), chunk_size=4, window=3, ns_steps=5,
                              muon=True, ns_chunk=ns_chunk, return_state=True, snapshots=(), n_valid=None)
        assert max(errs) < 2e-3, (ns_chunk, group, split, errs)  # the float32 reference: 3e-4
        assert (max((max(p) for p in plans), default=1) > 1) == split, (group, split)  # split only here
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


@pytest.mark.parametrize("group, muon", [(True, True), pytest.param(False, True, marks=pytest.mark.slow),
                                         pytest.param(True, False, marks=pytest.mark.slow)])
def test_atlas_compiled_chunk_step_with_the_op(group, muon):
    """The chunk step compiled (Inductor's CPU backend) with its GEMMs through ``hymba::bmm_f32``
    (torch.bmm on a CPU: what torch.compile makes of the op and its backward on CUDA, with the
    choice passed as the step's static argument) == the reference in float32 (muon_chunk; the
    per-token form goes through the same helpers): through ``hymba::bmm_f32_group`` (``GROUP_GEMMS``,
    the default: the CPU suite's case), and in ``make test-all`` (~20 s a compile) without it, and with SGD."""
    from tests.test_atlas import compare_impls, random_problem

    args, leaves = random_problem(N=2, T=10, C=4, c=2, dtype=torch.float32, seed=3)
    with atlas_kernels.settings(GROUP_GEMMS=group):  # hymba::bmm_f32_group
        fwd, bwd = compare_impls(args, leaves, dict(compile=True, pad_ns=True, bmm32=True), chunk_size=4,
                                 window=2, ns_steps=5, muon=muon, ns_chunk=muon, return_state=True, snapshots=(),
                                 n_valid=None)
    assert fwd < 1e-3 and bwd < 5e-3, (group, muon, fwd, bwd)


@pytest.mark.slow  # Triton's compiler for sm_90 on a CPU, like the other kernels' compile tests
def test_bmm_kernel_compiles_for_sm90():
    """The kernel through Triton's real compiler for an H100 / H200 (sm_90a) at the tiles the
    launcher picks: a 64-row tile on Hopper's wgmma, 32 rows on mma.sync; where Triton ships
    ptxas, no spills."""
    pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for, ptxas_resources

    fn = bmm32._bmm_kernel
    tiles = {"BM", "BN", "BK", "PREC"}
    sig = {p: "*fp32" if p.endswith("_ptr") else "constexpr" if p in tiles else "i32" for p in fn.arg_names}
    for BM, BN in ((64, 64), (32, 64), (64, 16), (16, 16)):
        k = compile_for(fn, sig, {"BM": BM, "BN": BN, "BK": 32, "PREC": bmm32.PRECISION}, 4)
        assert len(k.asm["cubin"]) > 0
        res = ptxas_resources(k.asm["ptx"])
        if res is not None:
            assert res["spill_stores"] == 0, (BM, BN, res)
            assert (res["wgmma"] if BM == 64 else res["mma_sync"]) > 0, (BM, BN, res)


@pytest.mark.slow  # Triton's compiler for sm_90 on a CPU
def test_grouped_kernel_compiles_for_sm90():
    """The grouped kernel through Triton's real compiler for sm_90a with the tiles of the
    Quad-Hybrid's Gram phase (64 x 64, 32 x 32, 32 x 32) and of a backward launch (all six slots in
    use); where Triton ships ptxas, no spills, wgmma for the 64-row tiles."""
    pytest.importorskip("triton")
    from hymba_plus.kernels._triton import compile_for, ptxas_resources

    fn = bmm32._bmm_group_kernel
    consts = {n for n in fn.arg_names if n[:2] in ("BM", "BN") or n in ("NUM", "BK", "PREC")}
    sig = {n: "*fp32" if (len(n) == 2 and n[0] in "abc") or n == "ws" else "*i32" if n == "cnt" else
           "constexpr" if n in consts else "i32" for n in fn.arg_names}
    for tiles, num in (((64, 64, 32, 32, 32, 32) + (16,) * 6, 3), ((64, 64, 32, 64, 64, 32, 32, 32, 64, 16, 16, 64), 6)):
        const = dict(zip([f"B{x}{i}" for i in range(6) for x in "MN"], tiles), NUM=num, BK=32, PREC=bmm32.PRECISION)
        k = compile_for(fn, sig, const, 4)
        assert len(k.asm["cubin"]) > 0
        res = ptxas_resources(k.asm["ptx"])
        if res is not None:
            assert res["spill_stores"] == 0 and res["wgmma"] > 0, (tiles, res)


@pytest.mark.gpu
def test_bmm_kernel_on_cuda():
    """On the GPU: the kernel == torch.bmm in float64 within 1e-5 (3xTF32; one TF32 pass is
    ~1e-3 off), the op's gradients == torch.bmm's, the op inside torch.compile, and the grouped op
    with and without split-K (its tile counters back to zero after)."""
    for G, M, K, N, layout in CASES:
        a, b = operands(G, M, K, N, layout, device="cuda")
        want = torch.bmm(a, b)
        got = bmm32.bmm_f32(a.float(), b.float()).double()
        scale = want.abs().max().clamp_min(1e-30)
        err = float((got - want).abs().max() / scale) if want.numel() else 0.0
        assert err < 1e-5, (G, M, K, N, layout, err)
    a, b = (t.float().requires_grad_() for t in operands(4, 64, 560, 64, "plain", device="cuda"))
    seed = torch.randn(4, 64, 64, device="cuda")
    ga, gb = torch.autograd.grad(bmm32.bmm_f32(a, b), (a, b), seed)
    wa, wb = (t.float() for t in torch.autograd.grad(torch.bmm(a.double(), b.double()), (a, b), seed.double()))
    assert rel_err(ga, wa) < 1e-5 and rel_err(gb, wb) < 1e-5
    fn = torch.compile(lambda x, y: bmm32.bmm_f32(x, y).relu() + 1, fullgraph=True)
    assert rel_err(fn(a, b), bmm32.bmm_f32(a, b).relu() + 1) < 1e-6
    problems = [operands(*case, device="cuda", seed=i) for i, case in enumerate(CASES)]  # grouped: 6 + 1 a launch
    for split_k in (False, True):  # split: the [64, 560] x [560, 64] case over several programs per tile
        for (x, y), out in zip(problems, bmm32.bmm_f32_group([x.float() for x, _ in problems],
                                                             [y.float() for _, y in problems], split_k=split_k)):
            want = torch.bmm(x, y)
            err = float((out.double() - want).abs().max() / want.abs().max().clamp_min(1e-30)) if want.numel() else 0.0
            assert err < 1e-5, (x.shape, y.shape, split_k, err)
    assert int(bmm32._COUNTERS[torch.device("cuda", 0)].abs().sum()) == 0


@pytest.mark.gpu
def test_atlas_fast_path_on_cuda_with_bmm32():
    """The CUDA fast path with ``BMM = "bmm32"`` (the default; muon_chunk, eager and compiled chunk
    step, also with ``GROUP_GEMMS``) against the float64 CPU reference, within the limits of the
    cuBLAS path's test."""
    from tests.test_atlas import float32_errors, random_problem

    for compile_step, group in ((False, False), (True, False), (False, True), (True, True)):
        args, leaves = random_problem(N=3, T=32, C=4, c=3, p=2, hid=5, depth=3, float32=True)
        with atlas_kernels.settings(BMM="bmm32", GROUP_GEMMS=group):
            errs = float32_errors(args, leaves, 3, "cuda", dict(compile=compile_step), chunk_size=4, window=3,
                                  ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(), n_valid=None)
        print("bmm32 errors:", [f"{e:.2g}" for e in errs])
        assert max(errs[:9]) < 5e-3 and max(errs[9:]) < 5e-2, (compile_step, group, errs)


@pytest.mark.gpu
def test_atlas_fast_path_on_cuda_with_split_k():
    """The CUDA fast path with the grouped GEMMs split over K (``SPLIT_K``; muon_chunk, the
    Quad-Hybrid's memory: head dim 32, degree-2 features, K = 561 columns, so its Gram matrices and
    first layer split), eager and compiled chunk step, against the float64 CPU reference within the
    limits of the unsplit path's test (the unsplit path's errors printed next to them); the unfused step
    (``FUSED_STEP`` off: this memory would take the fused one, which has no GEMM launches)."""
    from tests.test_atlas import float32_errors, random_problem

    args, leaves = random_problem(N=4, T=40, C=16, c=16, d=32, p=2, hid=64, depth=2, float32=True)
    shapes = [(4 * 1 * 1, -(-561 // 32))] * 2
    assert max(bmm32.split_plan(shapes, 2 * torch.cuda.get_device_properties(0).multi_processor_count)) > 1
    for compile_step in (False, True):
        errs = {}
        for split in (False, True):
            with atlas_kernels.settings(BMM="bmm32", GROUP_GEMMS=True, SPLIT_K=split, FUSED_STEP=False):
                errs[split] = float32_errors(args, leaves, 2, "cuda", dict(compile=compile_step), chunk_size=16,
                                             window=16, ns_steps=5, muon=True, ns_chunk=True, return_state=True,
                                             snapshots=(), n_valid=None)
        print("split-K errors:", [f"{e:.2g}" for e in errs[True]], "unsplit:", [f"{e:.2g}" for e in errs[False]])
        assert max(errs[True][:9]) < 5e-3 and max(errs[True][9:]) < 5e-2, (compile_step, errs)


def tf32_truncate(x: torch.Tensor) -> torch.Tensor:
    """float32 -> what a tensor core reading it as TF32 uses: the low 13 mantissa bits dropped."""
    return (x.view(torch.int32) & -8192).view(torch.float32)


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest TF32 value (ties away from zero), as ``_triton.round_tf32``."""
    return ((x.view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def test_round_tf32_in_interpreter_is_round_to_nearest():
    """``_triton.round_tf32`` in Triton's CPU interpreter: TF32 values (low 13 bits clear), within
    half a TF32 unit of the input (at most 2^-11 relative), the same bits as ``tf32_round``,
    carries into the exponent included (1.99999 -> 2)."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch, triton, triton.language as tl
        from hymba_plus.kernels._triton import round_tf32
        from tests.test_bmm32 import tf32_round

        @triton.jit
        def k(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, round_tf32(tl.load(x_ptr + offs, mask=offs < n)), mask=offs < n)

        g = torch.Generator().manual_seed(0)
        x = torch.cat([torch.randn(1000, generator=g) * 10.0 ** torch.randint(-20, 20, (1000,), generator=g),
                       torch.tensor([1.99999, -1.99999, 1.0, -0.0, 3.0e-39])])
        y = torch.empty_like(x)
        k[(1,)](x, y, x.numel(), BLOCK=1024)
        assert torch.equal(y.view(torch.int32), tf32_round(x).view(torch.int32))
        assert not bool((y.view(torch.int32) & 8191).any())
        assert float(((y.double() - x.double()).abs() / x.double().abs().clamp_min(1e-300))[:1000].max()) <= 2.0 ** -11
        assert float(y[1000]) == 2.0 and float(y[1001]) == -2.0
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0 and "ok" in res.stdout, res.stdout[-1000:] + res.stderr[-3000:]


def test_split_tf32_products_unbiased_only_when_both_parts_are_rounded():
    """Why ``dot_f32``'s "tf32x3_split" rounds: with a tensor core's TF32 read emulated (low 13
    bits dropped), the three products of operands split by truncation (``xh`` = x's top bits,
    the remainder read truncated too) sit below the float64 product on average, a bias a chain of
    Muon steps accumulates (2026-12-05, H100: 4x tf32x3's error at the chain's end); split by
    rounding, the mean error is a small fraction of the truncating split's."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 64, 256, generator=g) + 0.5  # positive: a bias shows in the mean
    y = torch.rand(64, 256, 64, generator=g) + 0.5
    want = x.double() @ y.double()

    def three(split):  # x y ~ xl yh + xh yl + xh yh, each operand as the tensor core reads it
        xh, yh = split(x), split(y)
        xl, yl = (tf32_truncate(r) if split is tf32_truncate else tf32_round(r) for r in (x - xh, y - yh))
        return xl.double() @ yh.double() + xh.double() @ yl.double() + xh.double() @ yh.double()

    trunc, rnd = (float(((three(split) - want) / want).mean()) for split in (tf32_truncate, tf32_round))
    print(f"mean relative error of split TF32 products: truncating {trunc:.2e}, rounding {rnd:.2e}")
    assert trunc < -2e-8 and abs(rnd) < abs(trunc) / 10, (trunc, rnd)


def test_outgrown_split_counters_are_kept(monkeypatch):
    """A launch needing more tile counters than the device has gets a larger buffer; the old one is
    kept alive (a CUDA graph captured before may still point at it), not freed for reuse."""
    monkeypatch.setattr(bmm32, "_COUNTERS", {})
    monkeypatch.setattr(bmm32, "_RETIRED", [])
    dev = torch.device("cpu")
    first = bmm32._counters(dev, 10)
    assert first.numel() >= 10 and bmm32._counters(dev, 10) is first  # reused while large enough
    bigger = bmm32._counters(dev, first.numel() + 1)
    assert bigger.numel() > first.numel() and bmm32._RETIRED == [first] and int(bigger.abs().sum()) == 0
