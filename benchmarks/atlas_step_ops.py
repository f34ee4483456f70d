"""How many operations one compiled ATLAS chunk step launches, counted on a CPU: a proxy for the
kernels per chunk on a GPU, where the chunk loop is bound by them (issue 18).

    python benchmarks/atlas_step_ops.py                                   # the Quad-Hybrid's memory
    python benchmarks/atlas_step_ops.py --atlas-config bench --atlas-setting NS_TRITON_MAX=32
    python benchmarks/atlas_step_ops.py --atlas-config quad_chunk       # Newton-Schulz once per chunk
    python benchmarks/atlas_step_ops.py --flops                         # the step's arithmetic and its floor
    python benchmarks/atlas_step_ops.py --chain --atlas-config quad_chunk  # its chain of dependent products

The fast path's chunk step (``kernels/atlas.py`` ``_chunk_step``) is compiled with ``torch.compile``
as the CUDA path compiles it (fullgraph, static shapes), with the Newton-Schulz layout the GPU would
use for these settings (``triton_ns`` as ``_use_triton_ns`` would answer on CUDA; otherwise one
padded batch), then run forward + backward once under the profiler. Counted: the loops Inductor
generates (``torch._inductor.metrics.generated_kernel_count``; on a GPU each is one Triton kernel)
and the matmul calls it leaves to the library (bmm / baddbmm / mm: one cuBLAS kernel each on a GPU)
and the Newton-Schulz ops (one Triton kernel each on a GPU; their CPU bodies are not counted).
``--flops`` counts instead the chunk step's arithmetic (``torch.utils.flop_counter``, the step run
eagerly: matmul flops forward and backward, Newton-Schulz on every Gram side unpadded, as the
Triton kernels do it) and turns it into the least time the Quad-Hybrid's ATLAS layer (batch 8 x
2048) can take at a GPU's matmul rate for each Newton-Schulz precision (``FLOOR_RATES``).
``--chain`` counts instead the step's longest chain of dependent matrix products (and of all
operations), forward (chunk-start weights and momenta -> the next chunk's) and backward (their
gradients -> the previous chunk's), which no kernel design can run side by side: a chunk's step
needs the weights the previous chunk wrote, so the layer is at least chunks x this chain of
products long, whatever fills the GPU (``CHAIN_PRODUCT_US``).
With ``CHUNKS_PER_CALL`` k > 1 (``--atlas-setting CHUNKS_PER_CALL=4``) the k-chunk graph is counted and
divided by k.
Inductor's CPU code fuses somewhat differently from its GPU code, so this is a proxy: the GPU
profile of 2026-12-04 found ~199 kernels per chunk at the quad shape where this counts 178 (with
NS_TRITON_MAX 32, as then shipped; 119 with today's 64).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hymba_plus.kernels import atlas as ak  # noqa: E402

#: memory shapes per config: (rows, head dim, polynomial degree, hidden width, chunk, window); the
#: rows only scale the work, not the count; ``*_chunk``: the same memory with ``inner_optimizer:
#: muon_chunk`` (Newton-Schulz once per chunk)
CONFIGS = {"quad": (4, 32, 2, 64, 16, 16), "bench": (4, 16, 2, 32, 16, 4)}
CONFIGS.update({f"{k}_chunk": v for k, v in list(CONFIGS.items())})
MATMULS = ("aten::bmm", "aten::baddbmm", "aten::mm", "aten::addmm")


def count(config: str, settings: dict) -> dict:
    from torch._inductor import metrics
    from torch.profiler import ProfilerActivity, profile

    N, d, p, hid, C, c = CONFIGS[config]
    Fd, Cp = ak.feature_dim(d, p), C + c - 1
    ns_chunk = config.endswith("_chunk")
    R, W = (2, 1) if ns_chunk else (C, C)  # mixing rows, update weights (_chunk_step's mix, wu)
    shapes = [(d, Fd), (hid, Fd), (d, hid)]
    with ak.settings(**settings):
        sides = [min(s) for s in shapes]
        triton_ns = ak.TRITON_NS and max(sides) <= ak.NS_TRITON_MAX  # what _use_triton_ns answers on CUDA
        g = torch.Generator().manual_seed(0)

        k = ak.CHUNKS_PER_CALL  # > 1: k chunks unrolled into one compiled graph (``_chunk_steps``)
        n_q = C if ak.RETRIEVE_IN_STEP else 0

        def inputs() -> tuple:
            params = tuple((torch.randn(N, *s, generator=g) / math.sqrt(s[1])).requires_grad_() for s in shapes)
            mom = tuple((0.1 * torch.randn(N, *s, generator=g)).requires_grad_() for s in shapes)
            lead = (k, N) if k > 1 else (N,)
            # the keys, then the chunk's queries where the step retrieves too (RETRIEVE_IN_STEP)
            return (params, mom, torch.randn(*lead, Cp + n_q, Fd, generator=g).requires_grad_(),
                    torch.randn(*lead, Cp, d, generator=g), torch.rand(*lead, Cp, generator=g),
                    torch.rand(*lead, R, Cp, generator=g), torch.rand(*lead, R, generator=g),
                    torch.rand(*lead, W, generator=g), torch.rand(*lead, generator=g))

        def run(step) -> None:  # noqa: ANN001
            P, M, *y = step(*inputs(), *static)
            outs = [t for ts in (P + M if k == 1 else [*P, *M]) for t in (ts if k > 1 else (ts,))]
            outs += [t for ys in y for t in (ys if k > 1 else (ys,))]
            sum(x.sum() for x in outs).backward()

        # the GEMMs as CUDA runs them (BMM: kernels/bmm32.py's op, one Triton kernel each), the Inductor options
        bmm32 = ak.BMM == "bmm32"
        static = (5, True, ak._pad_ns(True, triton_ns, ns_chunk), triton_ns, ak.FACTOR_GRAM, ns_chunk, bmm32,
                  bmm32 and ak.GROUP_GEMMS, n_q)
        torch._dynamo.reset()
        metrics.reset()
        step = ak._compile.__wrapped__(ak._chunk_step if k == 1 else ak._chunk_steps, ak.INDUCTOR)
        run(step)
        loops = metrics.generated_kernel_count  # forward and backward graphs
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            run(step)

    def in_ns_op(e: object) -> bool:  # the CPU body of a Newton-Schulz op: one Triton kernel on a GPU
        q = e.cpu_parent
        while q is not None:
            if q.name.startswith("hymba::"):
                return True
            q = q.cpu_parent
        return False

    calls = Counter(e.name for e in prof.events() if e.name.startswith((*MATMULS, "hymba::")) and not in_ns_op(e))
    return {"config": config, "settings": settings, "triton_ns": triton_ns, "chunks_per_graph": k,
            "generated_loops": loops, "calls": dict(calls), "ops_per_chunk": (loops + sum(calls.values())) / k}


#: matmul rates (TFLOP/s) the floor divides by: an H200's dense peaks (the H100 SXM's: 989 bf16, 494.7
#: TF32, 66.9 float32 without tensor cores), TF32x3 three TF32 products per product (float32 accuracy,
#: the Triton kernels' default), and the fraction of the bf16 peak a large GEMM reaches there (790 of
#: 989 measured, ``device`` notes): the same fraction is applied to every row
FLOOR_RATES = {"bf16": 989.0, "tf32": 494.7, "tf32x3": 494.7 / 3, "float32 (no tensor cores)": 66.9}
GEMM_EFFICIENCY = 790.0 / 989.0
#: the layer the floor is for (batch, tokens, heads): the Quad-Hybrid's ATLAS layer as
#: ``benchmarks/quad_atlas.py`` trains it, and ``mixers.py --atlas-paths``'s d 2048 layer
LAYER_SHAPES = {"quad": (8, 2048, 4), "bench": (4, 4096, 16)}


def step_args(config: str, n_q: int = 0) -> tuple:
    """One chunk step's arguments at a config's shapes (``_chunk_step``'s params .. keep), random,
    the weights, momenta and keys requiring gradients; ``n_q`` query rows after the keys."""
    N, d, p, hid, C, c = CONFIGS[config]
    Fd, Cp = ak.feature_dim(d, p), C + c - 1
    R, W = (2, 1) if config.endswith("_chunk") else (C, C)  # mixing rows, update weights (mix, wu)
    g = torch.Generator().manual_seed(0)
    shapes = [(d, Fd), (hid, Fd), (d, hid)]
    params = tuple((torch.randn(N, *s, generator=g) / math.sqrt(s[1])).requires_grad_() for s in shapes)
    mom = tuple((0.1 * torch.randn(N, *s, generator=g)).requires_grad_() for s in shapes)
    return (params, mom, torch.randn(N, Cp + n_q, Fd, generator=g).requires_grad_(),
            torch.randn(N, Cp, d, generator=g), torch.rand(N, Cp, generator=g), torch.rand(N, R, Cp, generator=g),
            torch.rand(N, R, generator=g), torch.rand(N, W, generator=g), torch.rand(N, generator=g))


def write(out: str | None, device: str, r: dict) -> None:
    """``r`` as JSON at ``out`` (if given) with the device line and torch's version."""
    if out:
        Path(out).write_text(json.dumps({"device": device, "torch": torch.__version__, **r}, indent=1))
        print(f"wrote {out}")


def report(headline: str, floors: dict[str, float], out: str | None, device: str, r: dict) -> None:
    """Print a count's headline and its floors (label -> ms), then ``write`` it."""
    print(headline)
    for label, ms in floors.items():
        print(f"  at {label}: >= {ms:.1f} ms")
    write(out, device, r)


def flops(config: str, factor: bool = False) -> dict:
    """Matmul flops of one chunk step for one (row, head), forward and backward, and what they
    mean for the Quad-Hybrid's layer (module doc)."""
    from torch.utils.flop_counter import FlopCounterMode

    ns_chunk, C = config.endswith("_chunk"), CONFIGS[config][4]
    args = step_args(config)
    N = args[0][0].shape[0]
    with FlopCounterMode(display=False) as fwd_count:  # unpadded sides, PyTorch NS, direct Gram unless factor
        P, M = ak._chunk_step(*args, 5, True, False, False, factor, ns_chunk)
    loss = sum(x.sum() for x in (*P, *M))
    with FlopCounterMode(display=False) as bwd_count:
        loss.backward()
    fwd, bwd = fwd_count.get_total_flops() / N, bwd_count.get_total_flops() / N
    B, T, H = LAYER_SHAPES[config.removesuffix("_chunk")]
    chunks = T // C
    total = (fwd + bwd) * B * H * chunks
    floor_ms = {k: total / (r * 1e12 * GEMM_EFFICIENCY) * 1e3 for k, r in FLOOR_RATES.items()}
    return {"config": config, "gram": "factored" if factor else "direct", "per_chunk_per_row_head": {"forward": fwd, "backward": bwd},
            "layer": {"batch": B, "tokens": T, "heads": H, "chunks": chunks, "tflop": total / 1e12},
            "floor_ms": floor_ms, "gemm_efficiency": GEMM_EFFICIENCY}


#: the least time of one dependent product at the step's shapes (at most 64 x 64 outputs a memory
#: row, K <= 561), us, for ``--chain``'s floor: a 64 x 64 x 64 float32 product as three TF32 passes is
#: 24 dependent wgmma m64n64k8 instructions of one warpgroup, each ~30-60 cycles before the next may
#: use its result, ~0.5-1 us at ~1.8 GHz, before any load, store or synchronisation between steps
CHAIN_PRODUCT_US = (0.5, 1.0, 2.0)


def chain(config: str) -> dict:
    """The chunk step's longest chains of dependent operations (module doc), counted eagerly on the
    PyTorch form (unpadded Newton-Schulz on the Gram matrices, direct Gram matrices, torch matmuls): a
    dispatch mode gives every tensor the length of the longest chain that produced it."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.weak import WeakIdKeyDictionary

    mm = {"bmm", "mm", "baddbmm", "addmm", "matmul"}

    class Depth(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.depth: WeakIdKeyDictionary = WeakIdKeyDictionary()

        def of(self, t: object) -> tuple[int, int]:
            return self.depth.get(t, (0, 0)) if isinstance(t, torch.Tensor) else (0, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            ins = [self.of(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))]
            d_mm, d_all = (max(x) for x in zip((0, 0), *ins))
            view = func._schema.name.split("::")[-1] in ("view", "_unsafe_view", "t", "transpose", "expand",
                                                          "slice", "select", "unsqueeze", "squeeze", "alias",
                                                          "detach", "as_strided", "permute", "split", "unbind")
            step = (int(func.__name__.split(".")[0] in mm), 0 if view else 1)
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    self.depth[t] = (d_mm + step[0], d_all + step[1])
            return out

    ns_chunk, C = config.endswith("_chunk"), CONFIGS[config][4]
    n_q = C if ak.RETRIEVE_IN_STEP else 0
    args = step_args(config, n_q)
    params, mom = args[:2]
    with Depth() as mode:
        P, M, *y = ak._chunk_step(*args, 5, True, False, False, False, ns_chunk, n_q=n_q)
    fwd = [max(mode.of(t)[i] for t in (*P, *M)) for i in (0, 1)]
    seeds = [torch.randn_like(t) for t in (*P, *M)]
    with Depth() as mode:  # the backward's chain from the next chunk's weight / momentum gradients
        grads = torch.autograd.grad((*P, *M), (*params, *mom), seeds)
    bwd = [max(mode.of(t)[i] for t in grads) for i in (0, 1)]
    B, T, H = LAYER_SHAPES[config.removesuffix("_chunk")]
    chunks = T // C
    products = fwd[0] + bwd[0]
    return {"config": config, "forward": {"products": fwd[0], "operations": fwd[1]},
            "backward": {"products": bwd[0], "operations": bwd[1]},
            "layer": {"batch": B, "tokens": T, "heads": H, "chunks": chunks},
            "floor_ms": {f"{us:g} us a product": products * chunks * us / 1e3 for us in CHAIN_PRODUCT_US}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--atlas-config", choices=tuple(CONFIGS), default="quad")
    ap.add_argument("--atlas-setting", action="append", default=[], metavar="NAME=VALUE",
                    help="a fast-path setting (kernels/atlas.py SETTINGS) for the second count; repeatable "
                         "(default: NS_TRITON_MAX=32, the layout shipped before 2026-12-04 evening)")
    ap.add_argument("--out", default=None, help="JSON file (default: print only)")
    ap.add_argument("--flops", action="store_true", help="count the step's arithmetic and its floor instead")
    ap.add_argument("--factored", action="store_true", help="--flops of the factored Gram form (FACTOR_GRAM)")
    ap.add_argument("--chain", action="store_true", help="count the step's chain of dependent products instead")
    args = ap.parse_args(argv)
    if args.chain:
        r = chain(args.atlas_config)
        f, b, lay = r["forward"], r["backward"], r["layer"]
        report(f"{r['config']}: a chunk step's longest chain of dependent products {f['products']} forward + "
               f"{b['products']} backward (of all operations, unfused: {f['operations']} + {b['operations']}); "
               f"the layer at {lay['batch']} x {lay['tokens']} ({lay['chunks']} chunks in sequence):",
               r["floor_ms"], args.out, "cpu (dependency count)", r)
        return 0
    if args.flops:
        r = flops(args.atlas_config, args.factored)
        f, lay = r["per_chunk_per_row_head"], r["layer"]
        report(f"{r['config']} ({r['gram']} Gram matrices): {f['forward'] / 1e6:.1f} + {f['backward'] / 1e6:.1f} MFLOP "
               f"per chunk per (row, head) forward + backward; the layer at {lay['batch']} x {lay['tokens']}, "
               f"{lay['heads']} heads ({lay['chunks']} chunks): {lay['tflop']:.2f} TFLOP",
               {f"{r['gemm_efficiency']:.0%} of the {k} peak": ms for k, ms in r["floor_ms"].items()},
               args.out, "cpu (flop count)", r)
        return 0
    try:
        changed = dict(ak.parse_setting(s) for s in args.atlas_setting) or {"NS_TRITON_MAX": 32}
    except ValueError as e:
        ap.error(f"--atlas-setting {e}")
    rows = [count(args.atlas_config, {}), count(args.atlas_config, changed)]
    for r in rows:
        print(f"{r['config']} {r['settings'] or 'as shipped'}: {r['ops_per_chunk']:g} ops per chunk (forward + backward): "
              f"{r['generated_loops']} Inductor loops, library calls {r['calls']}")
    write(args.out, "cpu (a proxy for a GPU's kernels per chunk)", {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
