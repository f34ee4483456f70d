"""ATLAS fast path against its float64 reference on this GPU, piece by piece (issue 18: the fast
path's probe failed on an H200 while every CPU check passes).

    python benchmarks/atlas_check.py            # prints one line per check, writes nothing
    python benchmarks/atlas_check.py --grads    # only 4.: gradient norms of the Quad-Hybrid's ATLAS layer
    python benchmarks/atlas_check.py --time-ns  # only 5.: the Newton-Schulz kernels timed per launch width

1. The Triton Newton-Schulz kernels (``_ns_gram_fwd_kernel`` / ``_ns_gram_bwd_kernel``) on Gram
   matrices of short side m (padded to M = 16 / 32), for each launch width (num_warps) and matmul
   precision, against ``ns_gram_factor`` / ``_ns_gram_vjp`` in float64 on the CPU.
2. The probe's problem (``kernels.atlas.probe_errors``) through ``_atlas_memory_fast`` on
   this GPU with the PyTorch Newton-Schulz and with the Triton kernels (eager chunk step), and
   with the compiled chunk step: the worst relative error of each output and input gradient.
3. ``_probe("cuda")`` itself as the dispatch runs it, inside a bf16 autocast region (a training
   forward's first ATLAS call): the dispatch runs probes with autocast off.
4. ``--grads``: the ATLAS layer of ``configs/quad_hybrid_tiny.yaml`` (d_model 128, its ``atlas``
   section) at batch x seq-len (default 8 x 2048, as ``quad_atlas.py`` trains it), forward under
   bf16 autocast as a training step runs it, backward of the output's mean square: the gradient
   norm of the input and of the layer's parameters with the eager chunk step and the factored or
   the direct Gram matrices (``FACTOR_GRAM``; Newton-Schulz as dispatched), finite or not.
5. ``--time-ns``: the Newton-Schulz kernels (forward, saved-iterate backward) at the launches the
   muon_chunk step makes per chunk (Quad-Hybrid: 32 problems of side 64, 64 of side 32; the d 2048
   benchmark: 64 of side 32, 128 of side 16; and the two quad sides as one padded launch, 96 of side
   64, ``PAD_NS``), per launch width and matmul precision: microseconds
   per launch (``triton.testing.do_bench``) and the error against float64. The default launch
   width is ``_ns_warps``; the saved-iterate backward at side 64 spills with 4 warps. ``--padded-only``:
   only the padded launch, at 4 and 8 warps, the saved iterates read transposed each way (``NS_BWD_TRANS``).
6. ``--inductor``: the compiled muon_chunk step under each of ``INDUCTOR``'s option sets, with
   Newton-Schulz per side and in one padded launch (``PAD_NS``), on the probe's problem against the
   float64 reference: the worst error of the results and of the gradients, the compiled step's
   first-call check off; then whether that check, on, catches the case (what it says). The combo
   kernels with the padded launch gave gradients 2-6 off on an H100 (2026-12-05): which option
   sets do, and whether the check sees it.
7. ``--chain``: the muon_chunk GPU test's problem (``tests/test_atlas.py``'s random_problem: 8
   chunks of Muon steps on a depth-3 memory, eager chunk step, padded Newton-Schulz) per Newton-Schulz
   precision (``NS_TRITON_PRECISION``) and chunk-step GEMM (``BMM``) over three seeds, against the
   float64 CPU reference: the worst error of the results (output, end weights and momenta) and of
   the input gradients. Per-launch errors do not show a bias that a chain of steps accumulates:
   this does (the first tf32x3_split, operands split by truncation: state 1.2e-2 off, 2026-12-05).
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import hymba_plus.kernels.atlas as A  # noqa: E402
from hymba_plus.kernels.dispatch import FastPath, max_rel_err  # noqa: E402


def gram_problem(B: int, m: int, n: int, g: torch.Generator) -> tuple:
    """B normalised Gram matrices of side m (of [m, n] matrices), a cotangent, and Newton-Schulz's
    result and vector-Jacobian product for them, all float64 on the CPU."""
    X = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    X = X / X.norm(dim=(-2, -1), keepdim=True)
    Ad = X @ X.mT
    dRd = torch.randn(B, m, m, generator=g, dtype=torch.float64)
    return Ad, dRd, A.ns_gram_factor(Ad, 5), A._ns_gram_vjp(Ad, dRd, 5)


def ns_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = A.NS_COEFFS
    for m in (4, 6, 24):
        M = max(16, 1 << (m - 1).bit_length())
        Ad, dRd, want_r, want_d = gram_problem(8, m, 3 * m, g)
        Ap = F.pad(Ad, (0, M - m, 0, M - m)).float().cuda().contiguous()
        dRp = F.pad(dRd, (0, M - m, 0, M - m)).float().cuda().contiguous()
        for prec in ("tf32x3", "ieee"):
            for warps in (2, 4, 8):
                r = torch.empty_like(Ap)
                d = torch.empty_like(Ap)
                try:
                    A._ns_gram_fwd_kernel[(8,)](Ap, r, M=M, STEPS=5, a=a, b=b, c=c, PREC=prec, num_warps=warps)
                    A._ns_gram_bwd_kernel[(8,)](Ap, dRp, d, M=M, STEPS=5, a=a, b=b, c=c, PREC=prec, num_warps=warps)
                    torch.cuda.synchronize()
                    er = max_rel_err(r[:, :m, :m].double().cpu(), want_r)
                    ed = max_rel_err(d[:, :m, :m].double().cpu(), want_d)
                    print(f"ns m={m:2d} M={M} {prec:6s} warps={warps}: fwd {er:.1e} bwd {ed:.1e}", flush=True)
                except Exception as e:  # noqa: BLE001
                    print(f"ns m={m:2d} M={M} {prec:6s} warps={warps}: {type(e).__name__}: {str(e)[:120]}", flush=True)


def time_ns(padded_only: bool = False) -> None:
    """Check 5; ``padded_only``: only muon_chunk's one padded quad launch (96 problems of side 64),
    the default precision at each launch width and way of reading the saved iterates transposed
    (``NS_WARPS``, ``NS_BWD_TRANS``), and the forward keeping its iterates for a backward that only
    reads them (``NS_SAVE_FWD``)."""
    from triton.testing import do_bench

    a, b, c = A.NS_COEFFS
    g = torch.Generator().manual_seed(0)
    prec0 = A.NS_TRITON_PRECISION
    for B, M in ((96, 64),) if padded_only else ((32, 64), (64, 32), (96, 64)):  # (96, 64): PAD_NS's launch
        Ad, dRd, want_r, want_d = gram_problem(B, M, 4 * M, g)
        Ag, dRg = Ad.float().cuda().contiguous(), dRd.float().cuda().contiguous()
        r, d = torch.empty_like(Ag), torch.empty_like(Ag)
        scratch = torch.empty(B, 4, 5, M, M, device="cuda")
        w0 = A._ns_warps(M)
        if padded_only:
            variants = [(prec0, w, t) for w in (w0, 8) for t in ("load", "store", "regs")]
        else:
            variants = [(p, w0, "load") for p in ("tf32x3", "tf32x3_split", "bf16x3", "bf16x6", "tf32")]
            variants = variants[:1] if B == 96 else [*variants, ("tf32x3", 8 if M > 32 else 4, "load")]
        for prec, warps, trans in variants:
            name = f"ns time B={B:3d} M={M} {prec:6s} warps={warps} trans={trans}"
            try:
                kw = dict(M=M, STEPS=5, a=a, b=b, c=c, PREC=prec, num_warps=warps)
                fwd = functools.partial(A._ns_gram_fwd_kernel[(B,)], Ag, r, **kw)
                bwd = functools.partial(A._ns_gram_bwd_saved_kernel[(B,)], Ag, dRg, d, scratch, TRANS=trans, **kw)
                tf, tb = do_bench(fwd) * 1e3, do_bench(bwd) * 1e3
                er = max_rel_err(r.double().cpu(), want_r)
                ed = max_rel_err(d.double().cpu(), want_d)
                mark = " (default)" if (warps, prec, trans) == (w0, prec0, A.NS_BWD_TRANS) else ""
                print(f"{name}: fwd {tf:7.1f} us bwd {tb:7.1f} us; err fwd {er:.1e} bwd {ed:.1e}{mark}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        if padded_only:  # the forward that keeps its iterates, the backward that only reads them (NS_SAVE_FWD)
            name = f"ns time B={B:3d} M={M} {prec0:6s} warps={w0} save_fwd"
            try:
                kw = dict(M=M, STEPS=5, b=b, c=c, PREC=prec0, num_warps=w0)  # the iterates kept in ``scratch``
                fwd = functools.partial(A._ns_gram_fwd_save_kernel[(B,)], Ag, r, scratch, a=a, **kw)
                bwd = functools.partial(A._ns_gram_bwd_from_saved_kernel[(B,)], scratch, dRg, d, **kw)
                tf = do_bench(fwd) * 1e3
                fwd()
                tb = do_bench(bwd) * 1e3
                er, ed = max_rel_err(r.double().cpu(), want_r), max_rel_err(d.double().cpu(), want_d)
                print(f"{name}: fwd {tf:7.1f} us bwd {tb:7.1f} us; err fwd {er:.1e} bwd {ed:.1e}", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name}: {type(e).__name__}: {str(e)[:120]}", flush=True)


def layer_grads(batch: int, seq_len: int, dev: str = "cuda") -> None:
    from hymba_plus.components.atlas import Atlas
    from hymba_plus.core.cache import StepContext
    from hymba_plus.core.recipe import load_recipe
    from hymba_plus.kernels import dispatch

    recipe = load_recipe(__file__.rsplit("/", 2)[0] + "/configs/quad_hybrid_tiny.yaml")
    cfg = recipe.component("atlas")
    torch.manual_seed(0)
    layer = Atlas(cfg, d_model=recipe.model.d_model).to(dev)
    x0 = torch.randn(batch, seq_len, recipe.model.d_model, device=dev)
    ctx = StepContext(positions=torch.arange(seq_len, device=dev)[None].expand(batch, -1))
    knobs = ("FACTOR_GRAM", "COMPILE_CHUNK_STEP")
    saved = dispatch.use_fast, {k: getattr(A, k) for k in knobs}
    try:
        real = dispatch.use_fast
        dispatch.use_fast = lambda name, *t: name == "atlas" or real(name, *t)  # noqa: E731
        A.COMPILE_CHUNK_STEP = False  # eager chunk step: no compile per variant
        for name, factor in (("factored Gram", True), ("direct Gram", False)):
            A.FACTOR_GRAM = factor
            layer.zero_grad()
            x = x0.clone().requires_grad_()
            t = time.perf_counter()
            with torch.autocast(dev, dtype=torch.bfloat16):
                y = layer(x, ctx)
            y.float().pow(2).mean().backward()
            if torch.device(dev).type == "cuda":
                torch.cuda.synchronize()
            norms = {n: float(p.grad.norm()) for n, p in layer.named_parameters() if p.grad is not None}
            worst = max(norms, key=norms.get)
            print(f"grads {name}: {time.perf_counter() - t:.1f} s, |y| {float(y.detach().float().norm()):.4g}, "
                  f"y finite: {bool(torch.isfinite(y).all())}, |dx| {float(x.grad.norm()):.3g}, "
                  f"largest |d{worst}| {norms[worst]:.3g}, "
                  f"all finite: {all(math.isfinite(v) for v in norms.values())}", flush=True)
    finally:
        dispatch.use_fast = saved[0]
        for k, v in saved[1].items():
            setattr(A, k, v)


def inductor_check(options: list[str], device: str = "cuda") -> list[str]:
    """6.: per Inductor option set and Newton-Schulz layout, the compiled muon_chunk step's errors
    against the float64 reference, and the first-call check's verdict (the lines, also printed)."""
    lines = []
    for opt in options:
        for pad in (False, True):
            name = f"inductor {opt:<16} pad_ns {pad!s:<5}"
            try:
                with A.settings(INDUCTOR=opt, CHECK_COMPILED_STEP=False):
                    errs = A.probe_errors(device, ns_chunk=True, compile=True, pad_ns=pad)
                A.compile_error = None
                with A.settings(INDUCTOR=opt, CHECK_COMPILED_STEP=True):
                    A._STEP_CHECKED.clear()
                    A.probe_errors(device, ns_chunk=True, compile=True, pad_ns=pad)
                verdict = A.compile_error or "agrees with the eager step"
                A.compile_error = None
                lines.append(f"{name}: results worst {max(errs[:9]):.1e}, gradients worst {max(errs[9:]):.1e}; "
                             f"first-call check: {verdict}")
            except Exception as e:  # noqa: BLE001 - a compile failure is a result here
                A.compile_error = None
                lines.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
            print(lines[-1], flush=True)
    return lines


def chain_check(precisions: tuple[str, ...] = ("tf32x3", "tf32x3_split"), bmms: tuple[str, ...] = ("bmm32", "cublas"),
                seeds: int = 3, device: str = "cuda") -> list[str]:
    """7.: the muon_chunk GPU test's problem per NS precision and GEMM, eager, against float64 (the
    lines, also printed; on a CPU the settings change nothing: no Triton kernels there)."""
    from tests.test_atlas import float32_errors, random_problem

    lines = []
    for prec in precisions:
        for bmm in bmms:
            worst = [0.0, 0.0]
            with A.settings(PAD_NS=True, NS_TRITON_PRECISION=prec, BMM=bmm):
                for seed in range(seeds):
                    args, leaves = random_problem(N=3, T=32, C=4, c=3, p=2, hid=5, depth=3, float32=True, seed=seed)
                    errs = float32_errors(args, leaves, 3, device, dict(compile=False), chunk_size=4, window=3,
                                          ns_steps=5, muon=True, ns_chunk=True, return_state=True, snapshots=(),
                                          n_valid=None)
                    worst = [max(worst[0], max(errs[:9])), max(worst[1], max(errs[9:]))]
            lines.append(f"NS {prec:<13} GEMMs {bmm:<7} over {seeds} seeds: results worst {worst[0]:.1e} "
                         f"(test limit 5e-3), gradients worst {worst[1]:.1e} (5e-2)")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grads", action="store_true", help="only check 4 (gradient norms)")
    ap.add_argument("--time-ns", action="store_true", help="only 5 (the Newton-Schulz kernels timed)")
    ap.add_argument("--padded-only", action="store_true",
                    help="with --time-ns: only the padded quad launch, per launch width and transposed read")
    ap.add_argument("--inductor", nargs="*", default=None, choices=tuple(A.INDUCTOR_OPTIONS),
                    help="only 6 (the compiled muon_chunk step per Inductor option set; default: all)")
    ap.add_argument("--chain", action="store_true", help="only 7 (a chain of muon_chunk steps per NS precision)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if args.grads:
        layer_grads(args.batch, args.seq_len)
        return
    if args.time_ns:
        time_ns(args.padded_only)
        return
    if args.chain:
        chain_check()
        return
    if args.inductor is not None:
        inductor_check(args.inductor or list(A.INDUCTOR_OPTIONS))
        return
    ns_kernels()
    for name, kw in (("torch NS, eager", {"compile": False, "triton_ns": False}),
                     ("triton NS, eager", {"compile": False, "triton_ns": True}),
                     ("torch NS, pad_ns, eager", {"compile": False, "triton_ns": False, "pad_ns": True}),
                     ("torch NS, compiled", {"compile": True, "triton_ns": False}),
                     ("triton NS, compiled", {"compile": True, "triton_ns": True})):
        try:
            errs = A.probe_errors("cuda", **kw)
            print(f"probe {name}: worst {max(errs):.1e} at result {errs.index(max(errs))};",
                  " ".join(f"{e:.0e}" for e in errs), flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"probe {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    fp = FastPath("atlas_check", functools.partial(A._probe, "cuda"), "atlas_check")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print("dispatch probe inside bf16 autocast:", "passes" if fp.ok() else fp.error, flush=True)


if __name__ == "__main__":
    main()
