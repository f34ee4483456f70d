"""One Gated DeltaNet decode step on a static state buffer, as the decode engine runs it
(replayed from a CUDA graph, so launch overhead is out): the reference (``gdn_gates`` +
``recurrent_gated_delta_rule_ref``, then the copy of the new state into the buffer), fla's fused
recurrent kernel with the gates inside it (``gated_delta_rule_decode``: q/k/v copies, q/k repeat
where fla's grouping was not probe-checked, a new state tensor, then the copy into the buffer)
and our in-place kernel (``gated_delta_rule_decode_``: one launch, no copy).

    python benchmarks/gdn_decode.py                 # the issue's shape: B 16, 16 q/k / 32 value heads, 128 x 128
    python benchmarks/gdn_decode.py --dtype float32 --v-heads 16

q, k, v are views of one conv output (as in the layer). ``--bandwidth`` turns the state's bytes
(read + write, float32) into a streaming limit (default the GPU's datasheet bandwidth,
``timing.GPU_PEAKS``: 4.8e12 B/s on an H200). Prints one line per path
and checks the outputs and states agree with the reference's.
"""

from __future__ import annotations

import argparse

import torch
from timing import bench, gpu_peaks  # benchmarks/timing.py (scripts run from the repo root as files)

from hymba_plus.kernels import dispatch
from hymba_plus.kernels import gdn as G


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--heads", type=int, default=16, help="q/k heads")
    ap.add_argument("--v-heads", type=int, default=32)
    ap.add_argument("--dk", type=int, default=128)
    ap.add_argument("--dv", type=int, default=128)
    ap.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="HBM bytes/s for the streaming limit (default: the GPU's datasheet figure, timing.GPU_PEAKS)")
    ap.add_argument("--iters", type=int, default=100)
    args = ap.parse_args()
    args.bandwidth = args.bandwidth or gpu_peaks(getattr(args, "device", "cuda"))[1]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    dt = getattr(torch, args.dtype)
    B, H, Hv, dk, dv = args.batch, args.heads, args.v_heads, args.dk, args.dv
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(B, 1, 2 * H * dk + Hv * dv, generator=g).to("cuda", dt)
    q = qkv[..., :H * dk].unflatten(-1, (H, dk))
    k = qkv[..., H * dk:2 * H * dk].unflatten(-1, (H, dk))
    v = qkv[..., 2 * H * dk:].unflatten(-1, (Hv, dv))
    a, b = torch.randn(B, 1, Hv, generator=g).to("cuda", dt), torch.randn(B, 1, Hv, generator=g).to("cuda", dt)
    A_log = torch.empty(Hv).uniform_(1.0, 16.0, generator=g).log().cuda()
    dt_bias = (-2 - 5 * torch.rand(Hv, generator=g)).cuda()
    S_init = 0.1 * torch.randn(B, Hv, dk, dv, generator=g).cuda()

    def reference(S: torch.Tensor) -> torch.Tensor:
        gg, beta = G.gdn_gates(a, b, A_log, dt_bias)
        o, new = G.recurrent_gated_delta_rule_ref(q, k, v, gg, beta, S, use_qk_l2norm=True)
        S.copy_(new)
        return o

    def fla(S: torch.Tensor) -> torch.Tensor:
        o, new = G.gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True)
        S.copy_(new)
        return o

    def ours(S: torch.Tensor) -> torch.Tensor:
        return G.gated_delta_rule_decode_(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True)

    paths = {"reference + copy": reference, "ours (in place)": ours}
    if dt != torch.float32 and dispatch.use_fast("gdn", q) and dispatch.use_fast("gdn_gates", q):
        paths = {"reference + copy": reference, "fla gates-in-kernel + copy": fla, "ours (in place)": ours}
    limit_us = 2 * B * Hv * dk * dv * 4 / args.bandwidth * 1e6
    print(f"B {B}, heads {H}/{Hv}, dk {dk}, dv {dv}, {args.dtype}; state read + write limit {limit_us:.1f} us")
    results = {}
    with torch.no_grad():
        for name, fn in paths.items():
            S = S_init.clone()
            results[name] = (fn(S).float(), S.clone())  # one eager step (compiles, probes) from S_init
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn(S)
            ms = bench(graph.replay, "cuda", warmup=5, iters=args.iters)
            print(f"  {name:28s} {ms * 1e3:8.1f} us")
    o_ref, s_ref = results["reference + copy"]
    for name, (o, s) in results.items():
        err_o = float((o - o_ref).abs().max() / o_ref.abs().max())
        err_s = float((s - s_ref).abs().max() / s_ref.abs().max())
        print(f"  {name:28s} vs reference: output {err_o:.2e}, state {err_s:.2e}")


if __name__ == "__main__":
    main()
