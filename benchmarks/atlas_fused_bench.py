"""One ATLAS muon_chunk chunk step at the Quad-Hybrid's memory, fused (``kernels/atlas_fused.py``: ten
Triton launches, forward and backward) per launch config, next to the unfused compiled step
(``kernels/atlas.py`` ``_chunk_step`` as the fast path runs it: bmm32 grouped GEMMs, Triton
Newton-Schulz, torch.compile), both replayed from CUDA graphs: microseconds per chunk, forward and
forward+backward (issue 18: is the chunk step's chain cheaper in one program than in ~78 launches?).

    python benchmarks/atlas_fused_bench.py                      # BLOCK_F x NUM_WARPS configs, the unfused step
    python benchmarks/atlas_fused_bench.py --configs 32x4 32x4:tf32 64x4b16 --rows 128   # b16: backward tiles 16
    python benchmarks/atlas_fused_bench.py --configs 64x4 64x4r8 64x4r16   # r8: 8 warps in the per-row launches
    python benchmarks/atlas_fused_bench.py --shape bench --configs 64x4 --profile   # the d 2048 layer's memory

``--shape quad`` is the Quad-Hybrid's memory (head dim 32, hidden 64, 560 features, window 16, 32 rows at
B 8), ``bench`` the d 2048 benchmark layer's (``mixers.py --atlas-config bench_chunk``: head dim 16, hidden
32, 152 features, window 4, 64 rows at B 4). ``--profile`` adds torch.profiler's kernel table for
the first fused config's and the unfused step's eager forward+backward (where the chunk's time goes).

Each fused config's kernels are compiled first in parallel processes (``--jobs``; their first
compile is minutes on one core), then timed in this one. JSON with the device name to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from benchmarks.timing import bench, profile_passes  # noqa: E402
from hymba_plus.kernels import atlas as ak  # noqa: E402
from hymba_plus.kernels import atlas_fused  # noqa: E402
from tests.test_atlas_fused import step_problem  # noqa: E402

#: ``--shape``: the memory's head dim and window (chunk 16, hidden 2 x head dim, degree-2 features) and
#: its rows (batch x heads) in the layer it comes from
SHAPES = {"quad": {"d": 32, "c": 16, "rows": 32}, "bench": {"d": 16, "c": 4, "rows": 64}}


def step_args(rows: int, device: str, shape: str = "quad") -> tuple:
    """The chunk step's arguments at a memory of ``SHAPES`` (default the Quad-Hybrid's: head dim 32,
    hidden 64, degree 2: 560 features; chunk 16, window 16) for ``rows`` memory rows, as the fast path
    passes them."""
    d, c = SHAPES[shape]["d"], SHAPES[shape]["c"]
    ins = [t.to(device).requires_grad_() for t in step_problem(N=rows, C=16, c=c, d=d, mh=2)]
    triton_ns = ak._use_triton_ns(ins[:3], torch.float32)
    return (tuple(ins[:3]), tuple(ins[3:6]), *ins[6:], 5, True, ak._pad_ns(True, triton_ns, True), triton_ns,
            False, True, True, True, 16)


def eager(step, args: tuple, backward: bool):  # noqa: ANN001, ANN201
    """``step(*args)`` (and its backward for fixed cotangents) as a function of nothing."""
    leaves = [t for a in args for t in (a if isinstance(a, tuple) else (a,)) if isinstance(t, torch.Tensor)]

    def run() -> None:
        outs = [o for part in step(*args) for o in (part if isinstance(part, tuple) else (part,))]
        if backward:
            torch.autograd.grad(sum(o.sum() for o in outs), leaves)
    return run


def graphed(step, args: tuple, backward: bool):  # noqa: ANN001, ANN201
    """``step(*args)`` (and its backward for fixed cotangents) captured in one CUDA graph: its replay."""
    run = eager(step, args, backward)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            run()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        run()
    return g.replay


def set_config(cfg: str) -> None:
    """``BLOCK_FxNUM_WARPS[bBLOCK_F_BWD][rROW_WARPS][:PRECISION]`` (e.g. 32x4, 64x4b16, 64x4r8, 32x4:tf32) ->
    atlas_fused's settings (no ``b``: the backward's tiles as ``atlas_fused`` picks them, ``BLOCK_F_BWD =
    None``; no ``r``: the per-row launches with NUM_WARPS, ``ROW_WARPS = None``)."""
    size, _, prec = cfg.partition(":")
    size, _, row = size.partition("r")
    size, _, bwd = size.partition("b")
    bf, warps = (int(x) for x in size.split("x"))
    atlas_fused.BLOCK_F, atlas_fused.NUM_WARPS = bf, warps
    atlas_fused.BLOCK_F_BWD = int(bwd) if bwd else None
    atlas_fused.ROW_WARPS = int(row) if row else None
    atlas_fused.PRECISION = prec or "tf32x3_split"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["64x4", "64x4b64", "64x4b32", "32x4"],
                    help="fused launch configs BLOCK_FxNUM_WARPS[bBLOCK_F_BWD][rROW_WARPS][:PRECISION] (PRECISION of _triton.dot_f32; "
                         "default tf32x3_split, float32 accuracy; tf32: one product, ~1e-3, to see what the "
                         "split products cost)")
    ap.add_argument("--shape", choices=tuple(SHAPES), default="quad", help="the memory's sizes (see the docstring)")
    ap.add_argument("--rows", type=int, default=None,
                    help="memory rows (batch x heads; default the layer's: the Quad-Hybrid at B 8 32, bench 64)")
    ap.add_argument("--profile", action="store_true", help="torch.profiler's kernel table of the first fused "
                    "config's and the unfused step's eager forward+backward")
    ap.add_argument("--jobs", type=int, default=8, help="processes compiling the fused configs first")
    ap.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows_n = args.rows or SHAPES[args.shape]["rows"]
    if args.compile_only:  # one config's kernels into the Triton cache
        set_config(args.configs[0])
        eager(atlas_fused.fused_chunk_step, step_args(2, "cuda", args.shape), True)()
        torch.cuda.synchronize()
        return
    cmd = [sys.executable, __file__, "--compile-only", "--shape", args.shape, "--configs"]
    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(lambda c: subprocess.run(cmd + [c], capture_output=True, text=True), args.configs))
    rows = []
    step_in = step_args(rows_n, "cuda", args.shape)
    profiles = {}
    for name, step in [(f"fused_{c}", c) for c, r in zip(args.configs, codes) if r.returncode == 0] + [
            ("unfused_compiled", None)]:
        if step is not None:
            set_config(step)
            fn = atlas_fused.fused_chunk_step
        else:
            fn = ak._compiled_chunk_step()
        row = {"step": name}
        for key, bwd in (("fwd_us", False), ("fwdbwd_us", True)):
            row[key] = round(1e3 * bench(graphed(fn, step_in, bwd), "cuda", warmup=3, iters=20), 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.profile and (step is None or not any(k.startswith("fused") for k in profiles)):
            print(f"--- {name}: eager forward+backward, kernels", flush=True)
            profiles[name] = profile_passes(eager(fn, step_in, True), "cuda", passes=5)
    for c, r in zip(args.configs, codes):
        if r.returncode != 0:
            print(f"fused_{c}: compile failed: {r.stderr.strip().splitlines()[-1:]}", flush=True)
    res = {"device": torch.cuda.get_device_name(), **SHAPES[args.shape], "rows": rows_n, "shape": args.shape,
           "chunk": 16, "torch": torch.__version__, "results": rows, "profiles": profiles}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
