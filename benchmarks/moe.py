"""MoE layer benchmark: forward and forward+backward time of the ``moe`` channel mixer at
tokens=16384, d_model=1024, 64 experts x 512 (d_expert), top-4 + 1 shared expert, bf16,
against

* HF transformers' Qwen3-Next sparse MoE block (``Qwen3NextSparseMoeBlock``) at the same
  config, with its default per-expert loop (``eager``) and, where this transformers has it,
  its ``grouped_mm`` experts implementation -- same weights (copied from ours), so the
  outputs are compared too;
* a dense SwiGLU with the same active width ((top_k + n_shared) x d_expert hidden).

Targets (issue 4): >= 3x faster than the HF block; <= 1.5x the dense layer's time.
Our forward+backward includes the router, the balancing and z losses and the statistics
(everything the layer does in training); the HF block and the dense layer have no losses.

    python benchmarks/moe.py                                  # GPU, writes benchmarks/results/moe.json
    python benchmarks/moe.py --compile default reduce-overhead --cuda-graph --profile
                                                              # + torch.compile, CUDA-graph replay, kernels
    python benchmarks/moe.py --device cpu --quick --threads 1  # smoke test at tiny sizes
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable

import torch
from timing import bench, bench_dtype, on_cuda, profile_passes  # benchmarks/timing.py (run from the repo root)
from torch import nn

import hymba_plus  # noqa: F401  (registers components)
from hymba_plus.components.mlp import MLPConfig, SwiGLU
from hymba_plus.components.moe import MoE, MoEConfig
from hymba_plus.core.cache import StepContext
from hymba_plus.kernels import dispatch
from hymba_plus.kernels import moe as K


def _out(y: object) -> torch.Tensor:
    return y[0] if isinstance(y, tuple) else y


def time_layer(name: str, layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, call: Callable, device: str,
               warmup: int, iters: int) -> dict:
    params = [p for p in layer.parameters() if p.requires_grad]
    xg = x.detach().clone().requires_grad_()

    def fwd() -> None:
        with torch.no_grad():
            call(layer, x)

    def fwd_bwd() -> None:
        for p in params:
            p.grad = None
        xg.grad = None
        y, aux = call(layer, xg)
        if aux is not None:
            torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        else:
            y.backward(gy)

    if on_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row = {"fwd_ms": bench(fwd, device, warmup, iters), "fwd_bwd_ms": bench(fwd_bwd, device, warmup, iters)}
    if on_cuda(device):
        row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    print(f"  {name}: fwd {row['fwd_ms']:.3f} ms, fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
    return row


def profile_layer(layer: nn.Module, x: torch.Tensor, gy: torch.Tensor, device: str, call: Callable | None = None
                  ) -> dict:
    """Where one forward+backward of a layer spends its time (``timing.profile_passes``)."""
    xg = x.detach().clone().requires_grad_()
    params = [p for p in layer.parameters() if p.requires_grad]
    call = call or call_ours

    def pass_() -> None:
        for p in params:  # as in the timed loop: no gradient accumulation
            p.grad = None
        y, aux = call(layer, xg)
        if aux is not None:
            torch.autograd.backward([y, aux], [gy, torch.ones_like(aux)])
        else:
            y.backward(gy)

    return profile_passes(pass_, device)


def call_ours(layer: MoE, x: torch.Tensor):  # noqa: ANN201
    T = x.shape[1]
    ctx = StepContext(positions=torch.arange(T, device=x.device).expand(x.shape[0], T))
    y = layer(x, ctx)
    aux = torch.stack(ctx.aux_losses).sum() if ctx.aux_losses else None
    return y, aux


def call_plain(layer: nn.Module, x: torch.Tensor):  # noqa: ANN201
    return _out(layer(x)), None


def _marked(call: Callable) -> Callable:
    """For CUDA-graph modes: each call starts a new step, so earlier outputs may be reused."""
    def run(layer: nn.Module, x: torch.Tensor):  # noqa: ANN202
        torch.compiler.cudagraph_mark_step_begin()
        return call(layer, x)
    return run


def graphed(layer: nn.Module, call: Callable, x: torch.Tensor) -> tuple[nn.Module, Callable]:
    """``layer`` with its forward and backward each captured once in a CUDA graph
    (``torch.cuda.make_graphed_callables``) and replayed: the eager kernels, none of the
    per-op launch cost. Works because the layer is capture-safe: static shapes (dropless
    routing) and no host synchronization."""
    class _Step(nn.Module):
        def __init__(self, inner: nn.Module):
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor):  # noqa: ANN202
            y, aux = call(self.inner, x)
            return (y,) if aux is None else (y, aux)

    step = torch.cuda.make_graphed_callables(_Step(layer), (x.detach().clone().requires_grad_(),))

    def run(_: nn.Module, x: torch.Tensor):  # noqa: ANN202
        out = step(x)
        return out[0], (out[1] if len(out) > 1 else None)
    return step, run


def build_hf(ours: MoE, args: argparse.Namespace):  # noqa: ANN201
    """The HF Qwen3-Next sparse MoE block at our config, with our weights copied in."""
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextSparseMoeBlock

    cfg = Qwen3NextConfig(hidden_size=args.d_model, moe_intermediate_size=args.d_expert,
                          shared_expert_intermediate_size=args.d_expert * args.n_shared,
                          num_experts=args.experts, num_experts_per_tok=args.top_k, norm_topk_prob=True,
                          hidden_act="silu", num_hidden_layers=1, vocab_size=256, intermediate_size=4 * args.d_model)
    block = Qwen3NextSparseMoeBlock(cfg)
    copied = _copy_weights(ours, block)
    return cfg, block, copied


def _copy_weights(ours: MoE, block: nn.Module) -> bool:
    """Our weights -> the HF block (both storage layouts HF has used); False if unknown."""
    E, h = ours.cfg.n_experts, ours.d_expert
    with torch.no_grad():
        for p in block.parameters():  # HF leaves some parameters uninitialised (torch.empty)
            p.normal_(0.0, 0.02)
        gate = block.gate
        gate_w = gate.weight if hasattr(gate, "weight") else None
        if gate_w is None or gate_w.shape != ours.router.weight.shape:
            return False
        gate_w.copy_(ours.router.weight)
        ex = block.experts
        if hasattr(ex, "gate_up_proj") and tuple(ex.gate_up_proj.shape) == (E, 2 * h, ours.d_model):
            ex.gate_up_proj.copy_(ours.w_gate_up.transpose(1, 2))
            ex.down_proj.copy_(ours.w_down.transpose(1, 2))
        elif isinstance(ex, nn.ModuleList):
            for e, mlp in enumerate(ex):
                mlp.gate_proj.weight.copy_(ours.w_gate_up[e, :, :h].T)
                mlp.up_proj.weight.copy_(ours.w_gate_up[e, :, h:].T)
                mlp.down_proj.weight.copy_(ours.w_down[e].T)
        else:
            return False
        sh = block.shared_expert
        sh.gate_proj.weight.copy_(ours.shared.w_gate.weight)
        sh.up_proj.weight.copy_(ours.shared.w_up.weight)
        sh.down_proj.weight.copy_(ours.shared.w_down.weight)
        block.shared_expert_gate.weight.copy_(ours.shared_gate.weight)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke test)")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--d-expert", type=int, default=512)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--n-shared", type=int, default=1)
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers block")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (1 is best for --quick on a busy machine)")
    ap.add_argument("--profile", action="store_true", help="also print our layer's top kernels (torch.profiler)")
    ap.add_argument("--compile", nargs="*", default=[], metavar="MODE",
                    choices=["default", "reduce-overhead", "max-autotune-no-cudagraphs"],
                    help="also time torch.compile(mode=MODE) of our layer and of the dense layer")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time our layer and the dense layer replayed from CUDA graphs (eager kernels, "
                         "torch.cuda.make_graphed_callables)")
    ap.add_argument("--out", default="benchmarks/results/moe.json")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.d_model, args.experts, args.d_expert = 512, 64, 8, 32
        args.top_k, args.warmup, args.iters = 2, 2, 5
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype) if args.dtype else bench_dtype(dev)
    torch.manual_seed(0)
    name = torch.cuda.get_device_name(torch.device(dev)) if on_cuda(dev) else "cpu"
    print(f"device {name}, torch {torch.__version__}, {dtype}; tokens {args.tokens}, d_model {args.d_model}, "
          f"{args.experts} experts x {args.d_expert}, top-{args.top_k} + {args.n_shared} shared", flush=True)

    cfg = MoEConfig(n_experts=args.experts, top_k=args.top_k, n_shared=args.n_shared, d_expert=args.d_expert)
    ours = MoE(cfg, d_model=args.d_model)
    with torch.no_grad():
        ours.router.weight.normal_(0.0, 0.02)
    ours = ours.to(dev, dtype)
    x = torch.randn(1, args.tokens, args.d_model, device=dev, dtype=dtype)
    gy = torch.randn_like(x)
    auto_impl = "grouped" if K.grouped_mm_supported(x[0], ours.w_gate_up, ours.w_down) else "padded"
    if K.fused_layer_supported(x[0], ours.router.weight, ours.w_gate_up, ours.w_down, args.top_k):
        auto_impl = "fused"  # the whole layer as one autograd node (kernels.moe.moe_layer)
    triton_on = on_cuda(dev) and K._triton_ok(x)
    results: dict[str, dict] = {}
    notes: dict[str, str] = {}

    results["hymba_moe"] = time_layer(f"hymba moe ({auto_impl}{', triton' if triton_on else ''})", ours, x, gy,
                                      call_ours, dev, args.warmup, args.iters)
    if args.profile:
        results["hymba_moe"]["profile"] = profile_layer(ours, x, gy, dev)
    if auto_impl == "fused":  # the same layer composed of separate autograd ops
        ours.impl = "grouped"
        results["hymba_moe_composed"] = time_layer("hymba moe (composed: grouped GEMM ops)", ours, x, gy, call_ours,
                                                   dev, args.warmup, args.iters)
        if args.profile:
            results["hymba_moe_composed"]["profile"] = profile_layer(ours, x, gy, dev)
    ours.impl = "padded"
    if auto_impl != "padded":
        results["hymba_moe_padded"] = time_layer("hymba moe (padded bmm)", ours, x, gy, call_ours, dev,
                                                 args.warmup, args.iters)
    ours.impl = "auto"
    hidden = (args.top_k + args.n_shared) * args.d_expert
    dense = SwiGLU(MLPConfig(d_hidden=hidden), d_model=args.d_model).to(dev, dtype)
    results["dense_swiglu"] = time_layer(f"dense SwiGLU ({hidden} hidden)", dense, x, gy, call_plain, dev,
                                         args.warmup, args.iters)
    if args.profile:
        results["dense_swiglu"]["profile"] = profile_layer(dense, x, gy, dev, call_plain)

    for mode in args.compile:  # same mode for both sides: compiled vs compiled
        for key, layer, call in (("hymba_moe", ours, call_ours), ("dense_swiglu", dense, call_plain)):
            try:
                results[f"{key}_compiled_{mode}"] = time_layer(
                    f"{key} torch.compile({mode})", torch.compile(layer, mode=mode), x, gy,
                    _marked(call) if mode == "reduce-overhead" else call, dev, args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
                notes[f"{key}_compiled_{mode}"] = f"{type(e).__name__}: {e}"[:300]
                print(f"  {key} compiled ({mode}): failed ({notes[f'{key}_compiled_{mode}']})", flush=True)

    if args.cuda_graph and on_cuda(dev):
        for key, layer, call in (("hymba_moe", ours, call_ours), ("dense_swiglu", dense, call_plain)):
            try:
                g_layer, g_call = graphed(layer, call, x)
                results[f"{key}_cuda_graph"] = time_layer(f"{key} CUDA graph", g_layer, x, gy, g_call, dev,
                                                          args.warmup, args.iters)
            except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
                notes[f"{key}_cuda_graph"] = f"{type(e).__name__}: {e}"[:300]
                print(f"  {key} CUDA graph: failed ({notes[f'{key}_cuda_graph']})", flush=True)

    parity: dict[str, float] = {}
    hf_version = None
    if not args.no_hf:
        try:
            import transformers

            hf_version = transformers.__version__
            hf_cfg, block, copied = build_hf(ours, args)
            block = block.to(dev, dtype)
            with torch.no_grad():
                y_ours = call_ours(ours, x)[0].float()
            for impl in ("eager", "grouped_mm"):
                key = f"hf_qwen3next_{impl}"
                try:
                    hf_cfg._experts_implementation = impl
                    with torch.no_grad():
                        y_hf = _out(block(x)).float()
                    if copied:
                        parity[key] = float((y_hf - y_ours).abs().max() / y_ours.abs().max())
                    results[key] = time_layer(f"HF Qwen3NextSparseMoeBlock ({impl})", block, x, gy, call_plain,
                                              dev, args.warmup, args.iters)
                except Exception as e:  # noqa: BLE001 - report, keep benchmarking the rest
                    notes[key] = f"{type(e).__name__}: {e}"[:300]
                    print(f"  {key}: skipped ({notes[key]})", flush=True)
            if not copied:
                notes["parity"] = "unknown HF weight layout: HF block timed with its own random weights"
        except Exception as e:  # noqa: BLE001 - transformers missing or too old
            notes["hf"] = f"{type(e).__name__}: {e}"[:300]
            print(f"  HF block: skipped ({notes['hf']})", flush=True)

    ours_t = results["hymba_moe"]["fwd_bwd_ms"]
    ratios = {"ours_over_dense": ours_t / results["dense_swiglu"]["fwd_bwd_ms"]}
    for key in ("hf_qwen3next_eager", "hf_qwen3next_grouped_mm"):
        if key in results:
            ratios[f"{key}_over_ours"] = results[key]["fwd_bwd_ms"] / ours_t
    for mode in args.compile:
        a, b = results.get(f"hymba_moe_compiled_{mode}"), results.get(f"dense_swiglu_compiled_{mode}")
        if a and b:
            ratios[f"ours_over_dense_compiled_{mode}"] = a["fwd_bwd_ms"] / b["fwd_bwd_ms"]
    a, b = results.get("hymba_moe_cuda_graph"), results.get("dense_swiglu_cuda_graph")
    if a and b:
        ratios["ours_over_dense_cuda_graph"] = a["fwd_bwd_ms"] / b["fwd_bwd_ms"]
    targets = {"within_1.5x_dense": ratios["ours_over_dense"] <= 1.5}
    for key, v in ratios.items():
        if key.startswith(("ours_over_dense_compiled_", "ours_over_dense_cuda_graph")):
            targets["within_1.5x_dense" + key.removeprefix("ours_over_dense")] = v <= 1.5
    if "hf_qwen3next_eager_over_ours" in ratios:
        targets["3x_faster_than_hf"] = ratios["hf_qwen3next_eager_over_ours"] >= 3.0

    print("\n| layer | fwd (ms) | fwd+bwd (ms) | fwd+bwd vs hymba moe |")
    print("|---|---:|---:|---:|")
    for key, row in results.items():
        print(f"| {key} | {row['fwd_ms']:.3f} | {row['fwd_bwd_ms']:.3f} | {row['fwd_bwd_ms'] / ours_t:.2f}x |")
    print(f"\nratios: {json.dumps({k: round(v, 3) for k, v in ratios.items()})}")
    print(f"targets: {targets}")
    if parity:
        print(f"HF vs ours, same weights, max|diff|/max|y|: {parity}")

    report = {
        "device": name, "torch": torch.__version__, "transformers": hf_version, "dtype": str(dtype),
        "config": {"tokens": args.tokens, "d_model": args.d_model, "n_experts": args.experts,
                   "d_expert": args.d_expert, "top_k": args.top_k, "n_shared": args.n_shared,
                   "dense_hidden": hidden},
        "moe_path": {"auto_impl": auto_impl, "triton": triton_on,
                     "fast_paths": {k: list(v) for k, v in dispatch.available().items() if k.startswith("moe")}},
        "results": results, "ratios": ratios, "targets": targets, "parity": parity, "notes": notes,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
