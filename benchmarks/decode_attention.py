"""One attention decode step over a static KV cache: the masked-SDPA reference (the dense
``[B, 1, 1, S]`` mask built from the slot positions, then SDPA: what ``GatedAttention.attend``
ran before the kernel) against the Triton FlashDecoding kernels (``kernels/decode_attention.py``),
each replayed from a CUDA graph (as the decode engine runs them), so launch overhead is out.

    python benchmarks/decode_attention.py                       # the issue's shape: B 16, 8/2 heads, D 256, S 2k
    python benchmarks/decode_attention.py --slots 8192 --filled 4096 --window 1024

The cache has ``--slots`` slots of which ``--filled`` hold keys (row b left-padded by b slots);
``--bandwidth`` turns the K/V bytes of the filled slots into a streaming limit (default the GPU's
datasheet bandwidth, ``timing.GPU_PEAKS``: 4.8e12 B/s on an H200). Prints one line per path and checks the two outputs agree.
"""

from __future__ import annotations

import argparse

import torch
from timing import bench, gpu_peaks  # benchmarks/timing.py (scripts run from the repo root as files)

from hymba_plus.kernels import decode_attention as A


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--slots", type=int, default=2304, help="static capacity")
    ap.add_argument("--filled", type=int, default=2048)
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="HBM bytes/s for the streaming limit (default: the GPU's datasheet figure, timing.GPU_PEAKS)")
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    args.bandwidth = args.bandwidth or gpu_peaks(getattr(args, "device", "cuda"))[1]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dt = getattr(torch, args.dtype)
    B, H, Hkv, D, S, n = args.batch, args.heads, args.kv_heads, args.head_dim, args.slots, args.filled
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, 1, H, D, generator=g).to("cuda", dt)
    k = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dt)
    v = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dt)
    kpos = torch.full((B, S), -1, dtype=torch.long)
    for b in range(B):
        kpos[b, b:n] = torch.arange(n - b)
    kpos = kpos.cuda()
    qpos = kpos[:, n - 1:n].clone()
    nf = torch.tensor([n], device="cuda")
    paths = {"reference (mask + SDPA)": lambda: A.decode_attention_ref(q, k, v, qpos, kpos, window=args.window),
             "triton flash-decoding": lambda: A.decode_attention_triton(q, k, v, qpos, kpos, window=args.window,
                                                                         n_filled=nf)}
    outs = {}
    limit_us = 2 * B * Hkv * n * D * k.element_size() / args.bandwidth * 1e6
    print(f"B {B}, heads {H}/{Hkv}, D {D}, slots {S} ({n} filled), window {args.window}, {args.dtype}; "
          f"K/V streaming limit {limit_us:.1f} us")
    for name, fn in paths.items():
        fn()  # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs[name] = fn()
        ms = bench(graph.replay, "cuda", warmup=5, iters=args.iters)
        print(f"  {name:26s} {ms * 1e3:8.1f} us")
    a, b = outs.values()
    err = float((a.float() - b.float()).abs().max() / b.float().abs().max())
    print(f"  max|diff| / max|ref| = {err:.2e}")


if __name__ == "__main__":
    main()
