"""Causal training attention, one kernel against another: forward and forward+backward time and accuracy
of each implementation at the attn row's shape (issue 18: attention-only >= 2.0x HF Llama; cuDNN's
fused attention, our fast path, was ~18 ms of the row's 103 ms step at ~270 TFLOP/s for head_dim 64).

    python benchmarks/attention_kernels.py                          # B 8, T 2048, 16 heads x 64, bf16
    python benchmarks/attention_kernels.py --heads 8 --kv-heads 2 --head-dim 128
    python benchmarks/attention_kernels.py --device cpu --batch 1 --seq-len 128 --heads 2   # a smoke test

Implementations (each measured where it runs, otherwise recorded with the reason):

* ``sdpa_cudnn``: SDPA with cuDNN's fused attention first (``kernels/sdpa.py``, what training runs on CUDA);
* ``sdpa_flash``: SDPA's FlashAttention-2 backend; ``sdpa_efficient``: its memory-efficient backend;
* ``sdpa_default``: SDPA as PyTorch orders its backends (on a CPU: its C++ flash / math kernels);
* ``fa4``: FlashAttention-4 (``flash_attn.cute.flash_attn_func``, package ``flash-attn-4``: CuTe DSL
  kernels for Hopper and Blackwell, compiled at first call; not in the GPU machine's image:
  ``bash benchmarks/gpu_env.sh fetch_fa4`` packs it into ``.whl7`` to carry, ``source benchmarks/gpu_env.sh``
  unpacks it). Not a fast path of the library: this script decides whether it should become one.

Accuracy: each implementation's output and q / k / v gradients against SDPA's math backend in float32
on the same bf16 inputs (max abs error / max abs value). FLOPs: causal attention's 2 matmuls forward
(4 B H T^2 D / 2), 2.5x that forward+backward (the backward's 5 matmuls; FlashAttention's recompute not
counted), as FlashAttention's papers count. Writes JSON with the device name (``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import bench  # noqa: E402 - benchmarks/timing.py

SDPA_BACKENDS = {"sdpa_cudnn": [SDPBackend.CUDNN_ATTENTION], "sdpa_flash": [SDPBackend.FLASH_ATTENTION],
                 "sdpa_efficient": [SDPBackend.EFFICIENT_ATTENTION], "sdpa_default": None}
IMPLS = (*SDPA_BACKENDS, "fa4")


def sdpa(backends: list | None) -> Callable:
    """q, k, v [B, H, T, D] -> causal attention [B, H, T, D] on the given SDPA backends only."""
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = q.shape[1] != k.shape[1]
        if backends is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        with sdpa_kernel(backends):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    return run


def fa4() -> Callable:
    """FlashAttention-4 in our layout ([B, H, T, D]; it takes [B, T, H, D], last dim contiguous).
    ImportError where the package is missing."""
    from flash_attn.cute import flash_attn_func

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out, _ = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)
        return out.transpose(1, 2)
    return run


def make(name: str) -> Callable:
    return fa4() if name == "fa4" else sdpa(SDPA_BACKENDS[name])


def measure(name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gy: torch.Tensor,
            want: tuple[torch.Tensor, ...], flops: float, iters: int) -> dict:
    """Accuracy against ``want`` (the float32 math backend's output and gradients), then the
    forward and forward+backward median ms; ``{"error": ...}`` where it cannot run."""
    try:
        fn = make(name)
        y = fn(q, k, v)  # the first call compiles (FA4: CuTe DSL JIT)
        got = tuple(t.detach() for t in (y, *torch.autograd.grad(y, (q, k, v), gy)))
    except Exception as e:  # noqa: BLE001 - a missing package, an unsupported shape or backend: recorded
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"}
    errs = {n: float((a.float() - b).abs().max() / b.abs().max().clamp_min(1e-30))
            for n, a, b in zip(("out", "dq", "dk", "dv"), got, want)}

    def fwd() -> None:
        with torch.no_grad():
            fn(q, k, v)

    def fwd_bwd() -> None:
        torch.autograd.grad(fn(q, k, v), (q, k, v), gy)

    dev = q.device.type
    f_ms, fb_ms = bench(fwd, dev, warmup=3, iters=iters), bench(fwd_bwd, dev, warmup=3, iters=iters)
    return {"rel_err": errs, "forward_ms": f_ms, "forward_backward_ms": fb_ms,
            "forward_tflops": flops / (f_ms * 1e-3) / 1e12, "forward_backward_tflops": 2.5 * flops / (fb_ms * 1e-3) / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA, as the attn row)")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None, help="JSON file")
    args = ap.parse_args(argv)
    B, T, H, D = args.batch, args.seq_len, args.heads, args.head_dim
    Hkv = args.kv_heads or H
    if min(B, T, H, Hkv, D) < 1 or H % Hkv:
        ap.error("sizes must be >= 1 and --kv-heads must divide --heads")
    dev, dt = args.device, getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, D, generator=g).to(dev, dt).requires_grad_()
    k, v = (torch.randn(B, Hkv, T, D, generator=g).to(dev, dt).requires_grad_() for _ in range(2))
    gy = torch.randn(B, H, T, D, generator=g).to(dev, dt)
    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = sdpa([SDPBackend.MATH])(qf, kf, vf)
    want = tuple(t.detach() for t in (ref, *torch.autograd.grad(ref, (qf, kf, vf), gy.float())))
    del ref, qf, kf, vf
    flops = 4 * B * H * T * T * D / 2  # causal: half of QK^T and PV
    rows = {}
    for name in args.impls:
        rows[name] = measure(name, q, k, v, gy, want, flops, args.iters)
        r = rows[name]
        if "error" in r:
            print(f"{name:15s} {r['error']}", flush=True)
        else:
            print(f"{name:15s} forward {r['forward_ms']:8.3f} ms ({r['forward_tflops']:6.1f} TFLOP/s)  "
                  f"forward+backward {r['forward_backward_ms']:8.3f} ms ({r['forward_backward_tflops']:6.1f} TFLOP/s)  "
                  f"max rel err out {r['rel_err']['out']:.1e} dq {r['rel_err']['dq']:.1e} "
                  f"dk {r['rel_err']['dk']:.1e} dv {r['rel_err']['dv']:.1e}", flush=True)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    report = {"device": name, "torch": torch.__version__, "shape": {"batch": B, "seq_len": T, "heads": H,
              "kv_heads": Hkv, "head_dim": D, "dtype": args.dtype}, "causal": True, "rows": rows}
    try:
        import flash_attn.cute as fa

        report["fa4_version"] = getattr(fa, "__version__", None)
    except Exception:  # noqa: BLE001 - not installed here
        report["fa4_version"] = None
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
