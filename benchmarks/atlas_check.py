"""ATLAS fast path against its float64 reference on this GPU, piece by piece (issue 18: the fast
path's probe failed on an H200 while every CPU check passes).

    python benchmarks/atlas_check.py            # prints one line per check, writes nothing

1. The Triton Newton-Schulz kernels (``_ns_gram_fwd_kernel`` / ``_ns_gram_bwd_kernel``) on Gram
   matrices of short side m (padded to M = 16 / 32), for each launch width (num_warps) and matmul
   precision, against ``ns_gram_factor`` / ``_ns_gram_vjp`` in float64 on the CPU.
2. The probe's problem (``kernels.atlas.probe_errors``) through ``_atlas_memory_fast`` on
   this GPU with the PyTorch Newton-Schulz and with the Triton kernels (eager chunk step), and
   with the compiled chunk step: the worst relative error of each output and input gradient.
3. ``_probe_fast`` itself as the dispatch runs it, inside a bf16 autocast region (a training
   forward's first ATLAS call): the dispatch runs probes with autocast off.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, __file__.rsplit("/", 2)[0])
import hymba_plus.kernels.atlas as A  # noqa: E402
from hymba_plus.kernels.dispatch import FastPath, max_rel_err  # noqa: E402


def ns_kernels() -> None:
    g = torch.Generator().manual_seed(0)
    a, b, c = A.NS_COEFFS
    for m in (4, 6, 24):
        M = max(16, 1 << (m - 1).bit_length())
        X = torch.randn(8, m, 3 * m, generator=g, dtype=torch.float64)
        X = X / X.norm(dim=(-2, -1), keepdim=True)
        Ad = X @ X.mT
        dRd = torch.randn(8, m, m, generator=g, dtype=torch.float64)
        want_r, want_d = A.ns_gram_factor(Ad, 5), A._ns_gram_vjp(Ad, dRd, 5)
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


def main() -> None:
    print("device:", torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
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
    fp = FastPath("atlas_check", A._probe_fast, "atlas_check")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        print("dispatch probe inside bf16 autocast:", "passes" if fp.ok() else fp.error, flush=True)


if __name__ == "__main__":
    main()
