"""Registers, spills and tensor-core instructions of our Triton kernels for a Hopper GPU, without
one: Triton's compiler to PTX for sm_90, then ``ptxas -v`` for sm_90a (the ptxas Triton ships).

    python benchmarks/kernel_resources.py                                   # ATLAS's Newton-Schulz kernels
    python benchmarks/kernel_resources.py --sides 32 64 --precisions tf32x3 tf32 --out /tmp/ns.json
    python benchmarks/kernel_resources.py --fused            # the fused muon_chunk step's ten kernels

For each of ATLAS's Newton-Schulz kernels (``kernels/atlas.py``: the forward, the backward that
recomputes the iterates, the one that keeps them in scratch memory) at each padded Gram side, with
the warps ``_ns_gram_launch`` uses there (``--warps`` overrides): registers per thread, spilled
bytes per thread, the stack frame, shared memory per program, and the ``mma.sync`` /
``wgmma.mma_async`` instructions of the PTX. A register count of 255 with spills means the
program keeps more live than a thread can hold; shared memory over 227 KiB means it cannot launch
on an H100 / H200. This is what the compiler reports, not a timing. Prints a table and writes JSON
with the Triton version.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: ATLAS's Newton-Schulz kernels (``kernels/atlas.py``)
KERNELS = ("_ns_gram_fwd_kernel", "_ns_gram_bwd_kernel", "_ns_gram_bwd_saved_kernel", "_ns_gram_fwd_save_kernel",
           "_ns_gram_bwd_from_saved_kernel")


def ns_resources(side: int, kernel: str, precision: str, warps: int | None = None, steps: int = 5) -> dict:
    """One Newton-Schulz kernel compiled for sm_90 at padded ``side`` (``warps``: the launch's by
    default): its warps, shared memory, and ptxas's registers / spills / mma counts (absent where
    Triton ships no ptxas). Every ``*_ptr`` argument is float32; the rest are constexprs."""
    from hymba_plus.kernels import atlas
    from hymba_plus.kernels._triton import compile_for, ptxas_resources

    fn = getattr(atlas, kernel)
    a, b, c = atlas.NS_COEFFS
    const = {"M": side, "STEPS": steps, "a": a, "b": b, "c": c, "PREC": precision}
    const = {k: v for k, v in const.items() if k in fn.arg_names}  # the reverse-only kernel takes no a
    sig = {p: "*fp32" if p.endswith("_ptr") else "constexpr" for p in fn.arg_names}
    w = warps or atlas._ns_warps(side)
    k = compile_for(fn, sig, const, w)
    res = ptxas_resources(k.asm["ptx"]) or {}
    res.pop("ptxas", None)
    return {"kernel": kernel, "side": side, "warps": w, "precision": precision, "steps": steps,
            "cubin_bytes": len(k.asm["cubin"]), "shared_bytes": k.metadata.shared, **res}


#: the fused muon_chunk step's kernels (``kernels/atlas_fused.py``), forward then backward
FUSED_KERNELS = ("_f1_mlp", "_f2_row", "_f3_gram", "_f4_ns", "_f5_update", "_b1_gram_grads", "_b2_ns", "_b3_tiles",
                 "_b4_row", "_b5_tiles")


def fused_resources(kernel: str, warps: int | None = None, head_dim: int = 32, hidden: int = 64, features: int = 560,
                    chunk: int = 16, window: int = 16) -> dict:
    """One kernel of the fused muon_chunk step compiled for sm_90 at a memory of these sizes (default
    the Quad-Hybrid's) with ``atlas_fused``'s launch settings (``warps`` overrides NUM_WARPS / ROW_WARPS): as
    ``ns_resources``. Every argument that is not a constexpr is a float32 pointer."""
    import torch

    from hymba_plus.kernels import atlas_fused
    from hymba_plus.kernels._triton import compile_for, ptxas_resources

    fn = getattr(atlas_fused, kernel)
    meta = atlas_fused._meta(torch.empty(1, head_dim, features), torch.empty(1, hidden, features),
                             torch.empty(1, chunk + window - 1, head_dim), chunk, 5)
    if kernel in ("_b3_tiles", "_b4_row", "_b5_tiles"):  # launched with the backward's tiles
        meta = atlas_fused._bwd_meta(meta)
    sig = {p: "constexpr" if p in meta else "*fp32" for p in fn.arg_names}
    w = warps or atlas_fused._warps(fn)
    k = compile_for(fn, sig, {p: meta[p] for p in fn.arg_names if p in meta}, w)
    res = ptxas_resources(k.asm["ptx"]) or {}
    res.pop("ptxas", None)
    return {"kernel": kernel, "warps": w, "block_f": meta["BF"], "precision": meta["PREC"],
            "cubin_bytes": len(k.asm["cubin"]), "shared_bytes": k.metadata.shared, **res}


def main(argv: list[str] | None = None) -> int:
    from hymba_plus.kernels.atlas import NS_TRITON_PRECISION
    from hymba_plus.kernels.atlas import SETTINGS as atlas_settings

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sides", type=int, nargs="+", default=[16, 32, 64], choices=(16, 32, 64))
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=tuple(KERNELS))
    ap.add_argument("--precisions", nargs="+", default=[NS_TRITON_PRECISION],
                    choices=atlas_settings["NS_TRITON_PRECISION"], help="default: the library's")
    ap.add_argument("--warps", type=int, default=None, help="warps per program (default: the launch's)")
    ap.add_argument("--fused", action="store_true",
                    help="the fused muon_chunk step's kernels (kernels/atlas_fused.py) at the Quad-Hybrid's memory instead")
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = ap.parse_args(argv)
    try:
        import triton
    except ImportError:
        print("kernel_resources: Triton is not installed here", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore", category=UserWarning)
    rows = []
    for kernel in FUSED_KERNELS if args.fused else ():
        row = fused_resources(kernel, args.warps)
        rows.append(row)
        print(f"{kernel:16s} warps {row['warps']:2d} registers {row.get('registers', '?'):>3} spills "
              f"{row.get('spill_stores', '?'):>5} B stored / {row.get('spill_loads', '?'):>5} B loaded, shared "
              f"{row['shared_bytes'] // 1024:3d} KiB, mma.sync {row.get('mma_sync', '?'):>5}, wgmma "
              f"{row.get('wgmma', '?'):>4}", flush=True)
    for prec in () if args.fused else args.precisions:  # the Newton-Schulz kernels
        for side in args.sides:
            for kernel in args.kernels:
                if kernel == "_ns_gram_bwd_kernel" and side > 32 and args.warps is None:
                    continue  # never launched there (_ns_gram_launch: side 64 takes the saved-iterate backward)
                row = ns_resources(side, kernel, prec, args.warps)
                rows.append(row)
                print(f"{kernel:28s} side {side:3d} warps {row['warps']:2d} {prec:7s} registers "
                      f"{row.get('registers', '?'):>3} spills {row.get('spill_stores', '?'):>5} B stored / "
                      f"{row.get('spill_loads', '?'):>5} B loaded, shared {row['shared_bytes'] // 1024:3d} KiB, "
                      f"mma.sync {row.get('mma_sync', '?'):>5}, wgmma {row.get('wgmma', '?'):>4}", flush=True)
    if args.out:
        report = {"target": "sm_90a (ptxas -v), PTX for sm_90", "triton": triton.__version__, "rows": rows}
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
