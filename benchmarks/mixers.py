"""Mixer layer benchmark: forward and forward+backward time of each registered token
mixer next to the raw kernel it wraps, at B=4, T=4096, 16 heads x 128 (or the mixer's
natural equivalent), bf16. Prints a markdown table and writes JSON with the device name.

Columns per mixer:
  layer      — the whole registered layer (projections, conv, norms, gates, kernel)
  wrapper    — our kernel entry point (hymba_plus.kernels.*) on prepared inputs
  raw        — the library kernel called directly on the same inputs (fla / mamba-ssm /
               SDPA); ratio = wrapper / raw (target <= 1.15)

    python benchmarks/mixers.py --out benchmarks/results/mixers.json           # GPU
    python benchmarks/mixers.py --only mamba3 --one-launch-config              # GPU, no autotune
    python benchmarks/mixers.py --only gated_attn --profile                     # GPU, + top kernels
    python benchmarks/mixers.py --device cpu --quick                            # smoke test
    python benchmarks/mixers.py --cpu-gdn-loop                                  # CPU reference
                                                   # chunked vs per-token loop at T=2048
    python benchmarks/mixers.py --atlas-paths --out benchmarks/results/mixers_atlas_paths_h200.json  # GPU
                                                   # ATLAS reference vs fast-path variants vs gdn
    python benchmarks/mixers.py --atlas-paths --device cpu --batch 2 --seq-len 512 --d-model 256  # CPU
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from timing import bench, bench_dtype, device_arg, on_cuda, profile_passes, use_device, versions  # benchmarks/timing.py

import hymba_plus  # noqa: F401  (registers components)
from hymba_plus import build_model, registry
from hymba_plus.core.cache import StepContext
from hymba_plus.kernels import dispatch


def fwd_bwd(fn: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        for p in params:
            p.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        out.float().sum().backward()

    return run


#: the mixers ``--only`` may name (``mixer_recipes``: those registered here)
MIXERS = ("gated_attn", "gdn", "mamba3", "atlas", "hymba")


def mixer_recipes(quick: bool) -> dict[str, dict]:
    """Per mixer: the layer's config at the benchmark shape (16 heads x 128)."""
    H, D = (4, 32) if quick else (16, 128)
    d_model = H * D
    r = {
        "gated_attn": (d_model, {"gated_attn": {"n_heads": H, "n_kv_heads": H, "head_dim": D,
                                                "rope": {"fraction": 0.5}}}),
        "gdn": (d_model, {"gdn": {"n_heads": H, "head_dim": D}}),
        # Mamba-3: d_inner = expand * d_model = H * D heads of D, state 128 (SISO)
        "mamba3": (H * D // 2, {"mamba3": {"head_dim": D, "expand": 2, "state_size": 32 if quick else 128}}),
        # ATLAS has no fast kernel: natural small-head config (degree-2 features grow as D^2)
        "atlas": (d_model, {"atlas": {"n_heads": H, "head_dim": 16, "poly_degree": 2}}),
        "hymba": (d_model, {"hymba": {"ssm": "gdn", "attn": {"n_heads": H, "window": 1024}},
                            "gdn": {"n_heads": H, "head_dim": D}}),
    }
    return {k: v for k, v in r.items() if k in registry.names()}


def layer_of(name: str, d_model: int, comps: dict, device: str, dtype: torch.dtype) -> torch.nn.Module:
    alias = {"gated_attn": "GA", "gdn": "GD", "mamba3": "M3", "atlas": "ATL", "hymba": "HY"}[name]
    recipe = {"name": f"bench-{name}", "model": {"vocab_size": 256, "d_model": d_model, "max_seq_len": 1 << 16,
                                                  "block_pattern": alias, "ffn": "none"}, "components": comps}
    model = build_model(recipe).to(device=device, dtype=dtype)
    return model.blocks[0].mixer


def raw_kernels(name: str, B: int, T: int, H: int, D: int, device: str, dtype: torch.dtype):
    """(wrapper_fn, raw_fn, params) on identical prepared inputs, or None if no kernel."""
    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype, generator=g) * scale).requires_grad_()

    if name == "gated_attn":
        q, k, v = rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, D)

        def raw():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return None, raw, [q, k, v]
    if name in ("gdn", "hymba"):
        from hymba_plus.kernels.gdn import gated_delta_rule

        q, k, v = rnd(B, T, H, D), rnd(B, T, H, D), rnd(B, T, H, D)
        gg = (-torch.rand(B, T, H, device=device, generator=g).float() * 0.1).requires_grad_()
        beta = torch.rand(B, T, H, device=device, generator=g).to(dtype).requires_grad_()

        def wrapper():
            return gated_delta_rule(q, k, v, gg, beta, use_qk_l2norm=True)[0]

        raw = None
        if on_cuda(device):
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule

            def raw():
                return chunk_gated_delta_rule(q, k, v, gg, beta, use_qk_l2norm_in_kernel=True)[0]

        return wrapper, raw, [q, k, v, gg, beta]
    if name == "mamba3":
        from hymba_plus.kernels.mamba3 import mamba3

        N, K = (32 if not on_cuda(device) else 128), 16
        q, k = rnd(B, T, 1, 1, N, scale=0.3), rnd(B, T, 1, 1, N, scale=0.3)
        v, z = rnd(B, T, H, D), rnd(B, T, H, D)
        dt = (torch.rand(B, T, H, device=device, generator=g) * 0.1).requires_grad_()
        adt = (-dt.detach() * torch.rand(B, T, H, device=device, generator=g)).requires_grad_()
        trap = torch.randn(B, T, H, device=device, generator=g).to(dtype).requires_grad_()
        ang = (torch.randn(B, T, H, K, device=device, generator=g) * 0.1).requires_grad_()
        qb = torch.ones(H, 1, N, device=device, requires_grad=True)
        kb = torch.ones(H, 1, N, device=device, requires_grad=True)
        Dp = torch.ones(H, device=device, requires_grad=True)

        def wrapper():
            return mamba3(q, k, v, adt, dt, trap, ang, qb, kb, None, D=Dp, z=z, need_state=False)[0]

        raw = None
        if on_cuda(device):
            from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

            # the raw kernel's own layout: [B,T,G,N] / [B,H,T] (the wrapper's transposes count against it)
            q3, k3 = q.detach()[:, :, :, 0].requires_grad_(), k.detach()[:, :, :, 0].requires_grad_()
            adt_h = adt.detach().transpose(1, 2).contiguous().requires_grad_()
            dt_h = dt.detach().transpose(1, 2).contiguous().requires_grad_()
            trap_h = trap.detach().transpose(1, 2).contiguous().requires_grad_()

            def raw():
                return mamba3_siso_combined(q3, k3, v, adt_h, dt_h, trap_h, qb[:, 0], kb[:, 0], ang, D=Dp, Z=z)

            return wrapper, raw, [q, k, v, z, dt, adt, trap, ang, qb, kb, Dp, q3, k3, adt_h, dt_h, trap_h]
        return wrapper, raw, [q, k, v, z, dt, adt, trap, ang, qb, kb, Dp]
    return None


def run_mixers(args: argparse.Namespace, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    device, dtype = args.device, bench_dtype(args.device)
    B, T = (1, 256) if args.quick else (args.batch, args.seq_len)
    H, D = (4, 32) if args.quick else (16, 128)
    rows = []
    for name, (d_model, comps) in mixer_recipes(args.quick).items():
        if args.only and name not in args.only:
            continue
        row: dict = {"mixer": name, "B": B, "T": T, "d_model": d_model}
        pin = contextlib.nullcontext(0)
        if args.one_launch_config and on_cuda(device):
            pin = dispatch.pinned_autotune("fla.", "mamba_ssm.")
        with pin as n_pinned:
            if n_pinned:
                row["launch_configs"] = f"first config of each of {n_pinned} autotuned kernels (--one-launch-config)"
            run_one(name, row, d_model, comps, args, device, dtype, B, T, H, D)
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:
            on_row(rows)
    return rows


def run_one(name: str, row: dict, d_model: int, comps: dict, args: argparse.Namespace, device: str,
            dtype: torch.dtype, B: int, T: int, H: int, D: int) -> None:
    """Time one mixer: its whole layer, then our kernel entry point next to the raw kernel."""
    try:
        layer = layer_of(name, d_model, comps, device, dtype)
        x = torch.randn(B, T, d_model, device=device, dtype=dtype, requires_grad=True)
        ctx = StepContext(positions=torch.arange(T, device=device)[None].expand(B, -1))
        params = [x, *layer.parameters()]
        with torch.no_grad():
            row["layer_fwd_ms"] = bench(lambda: layer(x, ctx, None), device)  # noqa: B023 - timed at once
        row["layer_fwdbwd_ms"] = bench(fwd_bwd(lambda: layer(x, ctx, None), params), device)  # noqa: B023
        if args.profile:
            print(f"--- {name}: layer forward+backward", flush=True)
            row["layer_profile"] = profile_passes(fwd_bwd(lambda: layer(x, ctx, None), params), device)  # noqa: B023
    except Exception as e:  # noqa: BLE001 - report and continue with the other mixers
        row["error"] = f"{type(e).__name__}: {e}"[:300]
    kernels = raw_kernels(name, B, T, H, D, device, dtype)
    if kernels is not None:
        wrapper, raw, kparams = kernels
        for tag, fn in (("wrapper", wrapper), ("raw", raw)):
            if fn is None:
                continue
            try:
                with torch.no_grad():
                    row[f"{tag}_fwd_ms"] = bench(fn, device)
                row[f"{tag}_fwdbwd_ms"] = bench(fwd_bwd(fn, kparams), device)
            except Exception as e:  # noqa: BLE001
                row[f"{tag}_error"] = f"{type(e).__name__}: {e}"[:300]
        if "wrapper_fwd_ms" in row and "raw_fwd_ms" in row:
            row["ratio_fwd"] = row["wrapper_fwd_ms"] / row["raw_fwd_ms"]
            row["ratio_fwdbwd"] = row["wrapper_fwdbwd_ms"] / row["raw_fwdbwd_ms"]


def cpu_gdn_loop(args: argparse.Namespace) -> dict:
    """CPU: chunked WY reference vs the per-token recurrence at T=2048 (target >= 10x)."""
    from hymba_plus.kernels.gdn import chunk_gated_delta_rule_ref, recurrent_gated_delta_rule_ref

    B, T, H, D = 1, 2048, 4, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    k = F.normalize(k, dim=-1)
    q = F.normalize(q, dim=-1)
    gg = -torch.rand(B, T, H, generator=g) * 0.1
    beta = torch.rand(B, T, H, generator=g)
    with torch.no_grad():
        chunk = bench(lambda: chunk_gated_delta_rule_ref(q, k, v, gg, beta), "cpu", 1, 3)
        loop = bench(lambda: recurrent_gated_delta_rule_ref(q, k, v, gg, beta), "cpu", 1, 3)
    return {"T": T, "chunked_ms": chunk, "per_token_loop_ms": loop, "speedup": loop / chunk}


class _Bound(torch.nn.Module):
    """layer(x, ctx, None) as a module of x alone (what make_graphed_callables captures)."""

    def __init__(self, layer: torch.nn.Module, ctx: StepContext):
        super().__init__()
        self.layer, self.ctx = layer, ctx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, self.ctx, None)


#: --atlas-paths: path -> (HYMBA_KERNELS, settings of hymba_plus.kernels.atlas, CUDA-graphed)
ATLAS_PATHS = {
    "reference": ("reference", {}, False),
    "fast": ("auto", {}, False),
    "fast_torch_ns": ("auto", {"TRITON_NS": False}, False),
    "fast_eager": ("auto", {"COMPILE_CHUNK_STEP": False}, False),
    "fast_unroll4": ("auto", {"CHUNKS_PER_CALL": 4}, False),
    "fast_ieee": ("auto", {"NS_TRITON_PRECISION": "ieee"}, False),
    "fast_tf32": ("auto", {"NS_TRITON_PRECISION": "tf32"}, False),
    "fast_graphed": ("auto", {}, True),
    "fast_factored": ("auto", {"FACTOR_GRAM": None}, False),
    "fast_factored_graphed": ("auto", {"FACTOR_GRAM": None}, True),
    "fast_ns_recompute": ("auto", {"NS_BWD_SAVED": False}, False),
    "fast_ns_recompute_graphed": ("auto", {"NS_BWD_SAVED": False}, True),
    "fast_split": ("auto", {"TRITON_NS_SPLIT": True}, False),
    "fast_split_graphed": ("auto", {"TRITON_NS_SPLIT": True}, True),
    "fast_split_factored_graphed": ("auto", {"TRITON_NS_SPLIT": True, "FACTOR_GRAM": None}, True),
    "fast_ns32": ("auto", {"NS_TRITON_MAX": 32, "NS_BWD_SAVED": False}, False),
    "fast_ns32_graphed": ("auto", {"NS_TRITON_MAX": 32, "NS_BWD_SAVED": False}, True),
    "fast_cublas_graphed": ("auto", {"INDUCTOR": "default", "BMM": "cublas", "PAD_NS": False,
                                     "NS_TRITON_PRECISION": "tf32x3"}, True),
    "fast_combo_bmm32_graphed": ("auto", {"INDUCTOR": "combo", "NS_TRITON_PRECISION": "tf32x3", "GROUP_GEMMS": False},
                                 True),
    "fast_nopad_graphed": ("auto", {"PAD_NS": False}, True),
    "fast_tf32x3_graphed": ("auto", {"NS_TRITON_PRECISION": "tf32x3"}, True),
    "fast_tf32x3_split_graphed": ("auto", {"NS_TRITON_PRECISION": "tf32x3_split"}, True),
    "fast_combo_cublas_graphed": ("auto", {"INDUCTOR": "combo", "BMM": "cublas"}, True),
    "fast_gemm_graphed": ("auto", {"INDUCTOR": "gemm", "BMM": "cublas"}, True),
    "fast_combo_gemm_graphed": ("auto", {"INDUCTOR": "combo_gemm", "BMM": "cublas"}, True),
    "fast_bf16x3_graphed": ("auto", {"NS_TRITON_PRECISION": "bf16x3"}, True),
    "fast_padns_graphed": ("auto", {"PAD_NS": True}, True),
    "fast_group_graphed": ("auto", {"GROUP_GEMMS": True}, True),
    "fast_nogroup_graphed": ("auto", {"GROUP_GEMMS": False}, True),
    "fast_pdl_graphed": ("auto", {"INDUCTOR": "pdl"}, True),
    "fast_nopdl_graphed": ("auto", {"INDUCTOR": "default"}, True),
    "fast_retrieve_after": ("auto", {"RETRIEVE_IN_STEP": False}, False),
    "fast_retrieve_after_graphed": ("auto", {"RETRIEVE_IN_STEP": False}, True),
    "fast_nsw8_graphed": ("auto", {"NS_WARPS": 8}, True),
    "fast_nsstore_graphed": ("auto", {"NS_BWD_TRANS": "store"}, True),
    "fast_nsregs_graphed": ("auto", {"NS_BWD_TRANS": "regs"}, True),
    "fast_nssave_graphed": ("auto", {"NS_SAVE_FWD": True}, True),
    "fast_nonssave_graphed": ("auto", {"NS_SAVE_FWD": False}, True),
    "fast_nosplitk_graphed": ("auto", {"SPLIT_K": False}, True),
    "fast_fused_graphed": ("auto", {"FUSED_STEP": True}, True),
    "fast_unfused_graphed": ("auto", {"FUSED_STEP": False}, True),
    "fast_nstf32_graphed": ("auto", {"NS_TRITON_PRECISION": "tf32"}, True),
}


#: ATLAS configs of ``--atlas-config``: the benchmark's (d 2048) and the Quad-Hybrid recipe's
#: (``configs/quad_hybrid_tiny.yaml``: 4 heads x 32, window 16; run it with --d-model 128 --batch 8 --seq-len 2048),
#: each also with Newton-Schulz once per chunk (``*_chunk``: ``inner_optimizer: muon_chunk``)
ATLAS_CONFIGS = {
    "bench": {"n_heads": 16, "head_dim": 16, "poly_degree": 2},
    "quad": {"n_heads": 4, "head_dim": 32, "window": 16, "poly_degree": 2, "memory_depth": 2},
}
ATLAS_CONFIGS.update({f"{k}_chunk": {**v, "inner_optimizer": "muon_chunk"} for k, v in list(ATLAS_CONFIGS.items())})


def atlas_paths(args: argparse.Namespace, on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """The ATLAS layer on each of its paths next to a gdn layer of the same width (issue 18:
    target ATLAS <= 10x gdn). ATLAS: the benchmark's config (16 heads x 16, degree-2
    features, chunk 16, window 4, Muon); gdn: d_model / 128 heads of 128. Paths:

      reference       HYMBA_KERNELS=reference: torch.func per-token gradients, chunk loop
      fast            the dispatch's fast path as shipped: closed-form chunk step under
                      torch.compile, Newton-Schulz in the Triton kernels (tf32x3_split matmuls)
      fast_torch_ns   the same with Newton-Schulz as batched matmuls (TRITON_NS off)
      fast_eager      the closed-form chunk step without torch.compile (Triton NS on)
      fast_unroll4    ``fast`` with 4 chunks per compiled call (CHUNKS_PER_CALL = 4)
      fast_ieee       ``fast`` with the Triton NS in float32 FMAs (NS_TRITON_PRECISION)
      fast_tf32       ``fast`` with the Triton NS in one TF32 product per matmul (~1e-3)
      fast_graphed    ``fast`` with the layer's forward+backward captured in CUDA graphs
                      (``make_graphed_callables``, as ``hymba train --cuda-graph`` does): no
                      per-launch host cost; compared with a graphed gdn layer too
      fast_ns_recompute  ``fast`` with the Newton-Schulz backward kernel that recomputes the
                      forward iterates (NS_BWD_SAVED False; the default before 2026-12-04 evening;
                      sides up to 32: side 64 always saves them); _graphed in CUDA graphs
      fast_split      ``fast`` with Gram sides within the Triton kernels' limit through them and the
                      wider ones through batched matmuls (TRITON_NS_SPLIT; _graphed, _factored_graphed)
      fast_ns32       the fast path as shipped before 2026-12-04 evening: Gram sides up to 32
                      through the Triton kernels, wider ones as batched matmuls (NS_TRITON_MAX 32),
                      the recomputing backward (NS_BWD_SAVED False); _graphed in CUDA graphs
      fast_factored   ``fast`` with the factored Gram matrices and update where they take fewer
                      flops (FACTOR_GRAM None); fast_factored_graphed: the same in CUDA graphs
                      (not for float32 training: NaN where a momentum cancels, see FACTOR_GRAM)
      fast_cublas_graphed  ``fast_graphed`` as shipped before 2026-12-05 afternoon: the chunk step's
                      GEMMs by cuBLAS in float32 (BMM cublas), Inductor's default options, one NS
                      launch per side (PAD_NS False), Triton's tf32x3; the default since: the GEMMs in
                      kernels/bmm32.py's 3xTF32, muon_chunk's NS padded into one launch, NS products
                      as split TF32 ones written out in the kernel (tf32x3_split)
      fast_combo_bmm32_graphed  as shipped on 2026-12-05 afternoon: bmm32 GEMMs, Inductor's combo kernels
                      (INDUCTOR combo; under it PAD_NS's default keeps a launch per side), tf32x3
      fast_nopad_graphed / fast_tf32x3_graphed / fast_tf32x3_split_graphed  ``fast_graphed`` with a
                      NS launch per side / with Triton's tf32x3 / with our split products in the NS kernels
      fast_combo_cublas_graphed / fast_gemm_graphed / fast_combo_gemm_graphed  cuBLAS GEMMs with
                      other Inductor options: combo kernels, autotuned Triton GEMM templates next to
                      cuBLAS, both
      fast_bf16x3_graphed  ``fast_graphed`` with the NS products as Triton's bf16x3 (fails the
                      dispatch's probe: 1e-3 relative)
      fast_padns_graphed  ``fast_graphed`` with Newton-Schulz of all weights in one launch, the
                      Gram matrices zero-padded to the widest side, whatever the optimizer (PAD_NS)
      fast_group_graphed / fast_nogroup_graphed  ``fast_graphed`` with / without each phase's products of
                      the memory's weights (momenta, Gram matrices, updates, and their backward) in one
                      grouped launch (GROUP_GEMMS, the default since 2026-12-05 evening)
      fast_pdl_graphed / fast_nopdl_graphed  ``fast_graphed`` with / without the chunk step's Inductor
                      kernels launched with Programmatic Dependent Launch (INDUCTOR pdl, the default since
                      2026-12-05 night: each may start while its predecessor drains)
      fast_retrieve_after / fast_retrieve_after_graphed  ``fast`` / ``fast_graphed`` with every chunk's retrieval
                      after the loop from the stacked chunk-start weights (RETRIEVE_IN_STEP off: the form
                      before 2026-12-05 night)
      fast_nsw8_graphed / fast_nsstore_graphed / fast_nsregs_graphed  ``fast_graphed`` with the Newton-Schulz
                      kernels at 8 warps (NS_WARPS) / the backward's saved iterates written transposed /
                      transposed in registers (NS_BWD_TRANS; as shipped: loaded transposed)
      fast_nssave_graphed / fast_nonssave_graphed  ``fast_graphed`` with / without the Newton-Schulz forward
                      keeping its iterates for a backward that only reads them (NS_SAVE_FWD; as shipped since
                      2026-12-05 late: with muon_chunk, not with per-token Muon)
      fast_nosplitk_graphed  ``fast_graphed`` without split-K in the grouped GEMMs (SPLIT_K; on since 2026-12-06,
                      ``fast_splitk_graphed`` before)
      fast_fused_graphed / fast_unfused_graphed  ``fast_graphed`` with / without the muon_chunk step written out
                      by hand in ten Triton launches, five a direction (FUSED_STEP, kernels/atlas_fused.py; on
                      as shipped since 2026-12-06, where it applies)
      fast_nstf32_graphed  ``fast_graphed`` with Newton-Schulz's products in one TF32 product each (~1e-3
                      relative, as ``fast_tf32``), to see what the float32-accurate split products cost

    On a CPU the fast variants are forced through the dispatch (it never picks them there).
    Rows: fwd / fwd+bwd ms, compile + first-call seconds, ratio to gdn's fwd+bwd."""
    from hymba_plus.kernels import atlas as atlas_kernels

    device, dtype = args.device, bench_dtype(args.device)
    B, T, d_model = args.batch, args.seq_len, args.d_model
    x = torch.randn(B, T, d_model, device=device, dtype=dtype, requires_grad=True)
    ctx = StepContext(positions=torch.arange(T, device=device)[None].expand(B, -1))
    saved = (os.environ.get("HYMBA_KERNELS"), dispatch.use_fast)
    paths = args.atlas_paths or ["reference", "fast", "fast_torch_ns", "fast_eager"]
    todo = [] if args.skip_gdn else [("gdn", None)] + ([("gdn", "graphed")] if any(p.endswith("graphed") for p in paths) else [])
    todo += [("atlas", p) for p in paths]
    rows: list[dict] = []
    if args.gdn_from:  # the gdn rows of an earlier call at the same shape (its first call autotunes fla: minutes)
        with open(args.gdn_from) as f:
            earlier = json.load(f).get("atlas_paths", [])
        rows = [{**r, "from": args.gdn_from} for r in earlier if r.get("mixer") == "gdn" and "layer_fwdbwd_ms" in r
                and (r.get("B"), r.get("T"), r.get("d_model")) == (B, T, d_model)]
        if not rows:
            raise SystemExit(f"--gdn-from {args.gdn_from}: no gdn row at B {B}, T {T}, d_model {d_model}")
        have = {r["path"] for r in rows}
        todo = [t for t in todo if t[0] != "gdn" or (t[1] or "as dispatched") not in have]
    for name, path in todo:
        row: dict = {"mixer": name, "path": path or "as dispatched", "B": B, "T": T, "d_model": d_model}
        if name == "atlas":
            row["atlas_config"] = args.atlas_config
        graphed = path == "graphed"
        knobs = contextlib.ExitStack()  # the path's atlas settings, restored after the row
        try:
            if name == "gdn":
                layer = layer_of("gdn", d_model, {"gdn": {"n_heads": max(1, d_model // 128), "head_dim": 128}},
                                 device, dtype)
            else:
                mode, knob_values, graphed = ATLAS_PATHS[path]
                torch._dynamo.reset()  # each path compiles its own chunk step (not past the recompile limit)
                atlas_kernels.compile_error, atlas_kernels.recompile_limit_hits = None, 0
                knobs.enter_context(atlas_kernels.settings(**knob_values))
                os.environ["HYMBA_KERNELS"] = mode
                if not on_cuda(device) and path != "reference":  # CUDA's fast path with its settings (compiled
                    dispatch.use_fast = lambda op, *t: op == "atlas"  # noqa: E731 - step), not the CPU's eager one
                layer = layer_of("atlas", d_model, {"atlas": ATLAS_CONFIGS[args.atlas_config]}, device, dtype)
            if name == "atlas" and path != "reference" and on_cuda(device):
                row["fast_path_taken"] = dispatch.use_fast("atlas", x)  # probes under this path's settings
                if not row["fast_path_taken"]:  # not timed: it would be the reference under this path's name
                    row["fast_path_error"] = dispatch.statuses()["atlas"]
                    raise RuntimeError(f"the fast path is unavailable: {row['fast_path_error']}")
            params = [x, *layer.parameters()]
            fn = _Bound(layer, ctx)
            t0 = time.perf_counter()
            if graphed:  # warm-up passes (compiles) on a side stream, then capture
                fn = torch.cuda.make_graphed_callables(fn, (x,))
            step = fwd_bwd(lambda: fn(x), params)  # noqa: B023 - timed at once
            step()
            if not graphed:
                with torch.no_grad():
                    fn(x)
            if on_cuda(device):
                torch.cuda.synchronize(torch.device(device))
            row["first_calls_s"] = time.perf_counter() - t0  # compiles (Triton, Inductor) happen here
            iters = (1, 3) if path == "reference" else (2, 10)
            if not graphed:  # a graphed callable replays only with autograd on
                with torch.no_grad():
                    row["layer_fwd_ms"] = bench(lambda: fn(x), device, *iters)  # noqa: B023
            row["layer_fwdbwd_ms"] = bench(step, device, *iters)
            if args.profile and name == "atlas":  # where the layer's forward+backward goes, per kernel
                print(f"--- profile: atlas {path}", flush=True)
                row["profile"] = profile_passes(step, device, passes=2, rows=30)
            if name == "atlas" and atlas_kernels.compile_error:
                row["compile_error"] = atlas_kernels.compile_error  # the chunk step ran eagerly
            if name == "atlas" and atlas_kernels.recompile_limit_hits:
                row["recompile_limit_hits"] = atlas_kernels.recompile_limit_hits  # some calls ran eagerly
        except Exception as e:  # noqa: BLE001 - report and continue with the other paths
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        finally:
            knobs.close()
            env, dispatch.use_fast = saved
            if env is None:
                os.environ.pop("HYMBA_KERNELS", None)
            else:
                os.environ["HYMBA_KERNELS"] = env
        base = [r for r in rows if r["mixer"] == "gdn" and r["path"] == ("graphed" if graphed else "as dispatched")]
        if name == "atlas" and base and "layer_fwdbwd_ms" in row and "layer_fwdbwd_ms" in base[0]:
            row["x_gdn_fwdbwd"] = row["layer_fwdbwd_ms"] / base[0]["layer_fwdbwd_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if on_row is not None:  # a run stopped at its time limit keeps the paths measured so far
            on_row(rows)
    return rows


def table(rows: list[dict]) -> str:
    cols = ["mixer", "layer_fwd_ms", "layer_fwdbwd_ms", "wrapper_fwd_ms", "wrapper_fwdbwd_ms",
            "raw_fwd_ms", "raw_fwdbwd_ms", "ratio_fwd", "ratio_fwdbwd"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "-"))
                                     for c in cols) + " |")
    errs = [f"{r['mixer']}: " + "; ".join(f"{k}={v}" for k, v in r.items() if k.endswith("error")) for r in rows
            if any(k.endswith("error") for k in r)]
    return "\n".join(out + errs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--only", nargs="*", choices=MIXERS, help="mixers to run")
    ap.add_argument("--cpu-gdn-loop", action="store_true", help="CPU chunked-vs-loop gdn reference timing")
    ap.add_argument("--atlas-paths", nargs="*", default=None, choices=tuple(ATLAS_PATHS), metavar="PATH",
                    help="time the ATLAS layer on these paths next to a gdn layer of the same width (none given: "
                         "reference fast fast_torch_ns fast_eager); one of: " + ", ".join(ATLAS_PATHS))
    ap.add_argument("--d-model", type=int, default=2048, help="width for --atlas-paths")
    ap.add_argument("--atlas-config", choices=tuple(ATLAS_CONFIGS), default="bench",
                    help="--atlas-paths: the ATLAS layer's config (bench: 16 heads x 16, window 4; quad: the "
                         "Quad-Hybrid recipe's 4 heads x 32, window 16)")
    ap.add_argument("--skip-gdn", action="store_true", help="--atlas-paths: time the ATLAS paths only")
    ap.add_argument("--gdn-from", default=None,
                    help="--atlas-paths: take the gdn rows from this earlier --atlas-paths JSON (same B, T, width) "
                         "instead of timing them again")
    ap.add_argument("--one-launch-config", action="store_true",
                    help="pin fla's and mamba-ssm's autotuned kernels to one launch config (skips minutes of "
                         "autotune compile; wrapper/raw ratios stay comparable, absolute times are not tuned)")
    ap.add_argument("--profile", action="store_true",
                    help="also print each layer's top kernels for forward+backward (torch.profiler)")
    ap.add_argument("--out", default="benchmarks/results/mixers.json")
    args = ap.parse_args()
    for key in ("batch", "seq_len", "d_model"):  # --batch 0 timed empty tensors without a word
        if getattr(args, key) < 1:
            ap.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    use_device(args.device)  # cuda:N current: make_graphed_callables captures there
    cuda = on_cuda(args.device)
    result: dict = {"device": torch.cuda.get_device_name(torch.device(args.device)) if cuda else "cpu",
                    "torch": torch.__version__, "versions": versions(), "dtype": "bf16" if cuda else "fp32"}
    if args.cpu_gdn_loop:
        result["cpu_gdn_loop"] = cpu_gdn_loop(args)
        print(json.dumps(result["cpu_gdn_loop"]))
    elif args.atlas_paths is not None:
        result["atlas_paths"] = atlas_paths(args, on_row=lambda rows: write(args.out, {**result, "atlas_paths": rows}))
    else:
        def save_rows(rows: list[dict]) -> None:  # after every mixer: a timeout keeps what was measured
            result["rows"] = rows
            write(args.out, result)

        result["rows"] = run_mixers(args, on_row=save_rows)
        print(table(result["rows"]))
    write(args.out, result)


def write(path: str, result: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
