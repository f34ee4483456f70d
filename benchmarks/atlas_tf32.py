"""What TF32 does to the ATLAS memory, measured on a CPU by emulating TF32's rounding (issue 18:
``hymba train --tf32`` and one-pass TF32 Newton-Schulz were the two precision levers left for the
Quad-Hybrid's ATLAS layer, whose step is ~40% float32 GEMMs and ~40% tf32x3 Newton-Schulz).

    python benchmarks/atlas_tf32.py                                  # both parts, 4 seeds (~6 min, 2 cores)
    python benchmarks/atlas_tf32.py --seeds 0 --steps 20 --out /tmp/t.json   # a quick run

The emulation (``TF32Rounding``): a ``TorchDispatchMode`` that rounds both float32 operands of
every ``mm`` / ``bmm`` / ``addmm`` / ``baddbmm`` to TF32's 10 mantissa bits (round to nearest) and
accumulates in float32, as a TF32 tensor-core GEMM does (cuBLAS's accumulation order differs;
what matters here is the operands' rounding, ~2^-11 relative). It sees the backward's matmuls too.
Custom ops are opaque to it: the fast path's Newton-Schulz op (``hymba::atlas_ns_gram``, its
PyTorch form on a CPU) stays float32 unless its own matmuls are rounded, which is how the
configurations below are told apart:

* ``float32``  no rounding (what the library does by default on a GPU, up to accumulation order);
* ``tf32_gemm``  the chunk step's GEMMs rounded, Newton-Schulz float32 (``hymba train --tf32``
  with the Triton kernels in tf32x3, the library's setting);
* ``tf32_all``  Newton-Schulz's matmuls rounded too (``--tf32`` with ``NS_TRITON_PRECISION``
  "tf32");
* ``tf32_ns_bwd``  only Newton-Schulz's backward rounded (its reverse pass, ``_ns_gram_vjp``), the
  GEMMs and the forward float32: a one-pass TF32 backward kernel next to the default float32-accurate
  GEMMs (``BMM`` bmm32) and forward (the Triton backward is ~5x faster in one TF32 pass, H100).

Part 1: ``kernels.atlas.probe_errors`` (the fast path's probe problem: Muon, window 3, a deep
memory, 5 chunks) per configuration against the float64 reference: the worst relative error of
the output, the end state and the input gradients.

Part 2: learning. The 2-layer ATLAS model of ``tests/test_atlas.py::test_learns_mqar`` (its recipe,
MQAR task and budget, and its trainer ``tests/helpers.train_mqar``; run from the repository, which
this script puts on ``sys.path``), trained under bf16 autocast as on a GPU (the memory in float32, the fast path's
eager chunk step), per configuration and seed: held-out accuracy and the mean loss of the last 20
steps. Prints the tables; writes JSON with the device.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from timing import write_json  # benchmarks/timing.py (scripts run from the repo root as files)
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from hymba_plus.kernels import atlas as A  # noqa: E402
from hymba_plus.kernels import dispatch  # noqa: E402
from tests.helpers import tiny_recipe, train_mqar  # noqa: E402
from tests.test_atlas import LEARN, MQAR  # noqa: E402  (test_learns_mqar's setup)

CONFIGS = ("float32", "tf32_gemm", "tf32_all", "tf32_ns_bwd")


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest value with TF32's 10 mantissa bits (ties away from zero), as
    float32; other dtypes unchanged."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32).view(x.shape)


class TF32Rounding(TorchDispatchMode):
    """float32 matmuls with TF32-rounded operands (see the module docstring)."""

    OPERANDS = {torch.ops.aten.mm.default: (0, 1), torch.ops.aten.bmm.default: (0, 1),
                torch.ops.aten.addmm.default: (1, 2), torch.ops.aten.baddbmm.default: (1, 2)}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        which = self.OPERANDS.get(func)
        if which is not None:
            args = tuple(tf32_round(a) if i in which else a for i, a in enumerate(args))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def configuration(name: str) -> Iterator[None]:
    """The fast path on this CPU (eager chunk step, Newton-Schulz through its custom op) with
    ``name``'s rounding."""
    real_use_fast, real_triton, real_compile = dispatch.use_fast, A._use_triton_ns, A.COMPILE_CHUNK_STEP
    real_fwd, real_bwd = A.ns_gram_factor, A._ns_gram_vjp
    dispatch.use_fast = lambda op, *t: op == "atlas" or real_use_fast(op, *t)
    A._use_triton_ns = lambda *a: True  # the op (opaque to the mode); its CPU form is ns_gram_factor / _ns_gram_vjp
    A.COMPILE_CHUNK_STEP = False
    def rounded(f):  # noqa: ANN001, ANN202
        def g(*a):  # noqa: ANN002, ANN202
            with TF32Rounding():
                return f(*a)
        return g

    if name == "tf32_all":  # the op's own matmuls rounded as well
        A.ns_gram_factor, A._ns_gram_vjp = rounded(real_fwd), rounded(real_bwd)
    elif name == "tf32_ns_bwd":  # only the op's backward
        A._ns_gram_vjp = rounded(real_bwd)
    try:
        with TF32Rounding() if name in ("tf32_gemm", "tf32_all") else contextlib.nullcontext():
            yield
    finally:
        dispatch.use_fast, A._use_triton_ns, A.COMPILE_CHUNK_STEP = real_use_fast, real_triton, real_compile
        A.ns_gram_factor, A._ns_gram_vjp = real_fwd, real_bwd


def probe_part(configs: tuple[str, ...] | list[str] = CONFIGS) -> dict:
    out = {}
    for name in configs:
        with configuration(name):
            errs = A.probe_errors("cpu", triton_ns=True)
        out[name] = {"output": errs[0], "end_state": max(errs[1:9]), "gradients": max(errs[9:])}
    return out


def train(name: str, seed: int, steps: int) -> dict:
    """test_learns_mqar's model, data and budget under bf16 autocast, with ``name``'s rounding."""
    t0 = time.perf_counter()
    losses: list[float] = []
    with configuration(name):
        acc = train_mqar(tiny_recipe("ATL | ATL", {"atlas": LEARN}, vocab_size=32),
                         **{**MQAR, "steps": steps}, seed=seed, autocast=torch.bfloat16, losses=losses)
    tail = losses[-20:]
    return {"config": name, "seed": seed, "accuracy": acc, "final_loss": sum(tail) / len(tail),
            "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--steps", type=int, default=200, help="training steps per run (default: test_learns_mqar's 200)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--out", default="benchmarks/results/atlas_tf32_cpu.json")
    args = ap.parse_args(argv)
    report: dict = {"device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                    "torch": torch.__version__, "steps": args.steps, "seeds": args.seeds}
    report["probe"] = probe_part(args.configs)
    print("probe problem vs float64 (worst relative error):")
    print(f"{'config':<10} {'output':>9} {'end state':>10} {'gradients':>10}")
    for name, r in report["probe"].items():
        print(f"{name:<10} {r['output']:>9.2e} {r['end_state']:>10.2e} {r['gradients']:>10.2e}", flush=True)
    report["mqar"] = []
    for seed in args.seeds:
        for name in args.configs:
            row = train(name, seed, args.steps)
            report["mqar"].append(row)
            print(json.dumps(row), flush=True)
    print(f"\nMQAR ({args.steps} steps, chance 0.0625): accuracy / mean loss of the last 20 steps per seed")
    for name in args.configs:
        rows = [r for r in report["mqar"] if r["config"] == name]
        cells = "  ".join(f"{r['accuracy']:.3f}/{r['final_loss']:.2f}" for r in rows)
        mean_loss = sum(r["final_loss"] for r in rows) / len(rows)
        print(f"{name:<10} {cells}   mean loss {mean_loss:.3f}")
    write_json(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
