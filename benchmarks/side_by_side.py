"""Side by side with the reference implementations: training throughput, peak memory and
decoding speed of hymba_plus models against HF transformers and fla models of the same
architecture, in ONE process, same shapes, one GPU, bf16 autocast, fused AdamW.

Rows (``--rows``, default all; benchmarks/RESULTS.md has the exact configs):

* ``attn``: HF ``LlamaForCausalLM`` (sdpa) ~374M vs our ``(GA+mlp)*24`` (gated_attn with
  ``output_gate`` and ``qk_norm`` off: the same computation), tokens/s, peak GiB, MFU;
* ``gdn``: fla ``GatedDeltaNetForCausalLM`` ~425M vs our ``(GD+mlp)*24`` with the same heads,
  head dim, expand_v, conv size and MLP;
* ``quad_moe``: HF ``Qwen3NextForCausalLM`` ~1.35B (12 layers, 64 experts top-4 + shared
  expert, full attention every 4th layer) vs the same model imported through
  ``hymba_plus.convert`` (identical architecture and weights by construction);
* ``decode``: the Qwen3-Next pair in bf16, HF ``generate`` (greedy, cache) vs our
  ``generate``, batch 1 and 16 after prompts of 2k / 8k / 32k tokens: tokens/s of the whole
  call, decode-only tokens/s and batch-1 ms per token next to the weight-streaming limit;
* ``fsdp2``: ``benchmarks/train_scaling.py``'s 1 vs 2 GPU run (FSDP2 under torchrun) of the
  dense ``(GD+mlp | GA+mlp)*12`` recipe, when two GPUs are present.

Training rows time ``--steps`` optimizer steps after ``--warmup`` (zero_grad, forward with
labels under bf16 autocast, backward, ``torch.optim.AdamW(fused=True)``; ours with ``hymba train``'s
loss: the fused linear + cross-entropy head, no [B, T, V] logits); ours in eager mode,
with the forward+backward replayed from CUDA graphs (``training/cuda_graph.GraphedStep``) and
with ``--compile`` also ``torch.compile``. A missing peer package skips its row with the
reason recorded. The JSON (``<out-dir>/<device-slug>-<date>.json`` and ``latest.json``) is
rewritten after every row, so a run killed by a time limit keeps the rows it finished;
``--merge`` keeps the rows this run does not redo from ``latest.json`` if it is this device's, else from the
newest ``<device-slug>-<date>.json`` (any date; the report's ``merged_from_file`` names it), and a redone row
that ends skipped / error / interrupted, or without the ratio that file's row has, keeps that file's measured row,
the attempt as its ``failed_rerun``; each row keeps the settings, fast-path statuses and time of the call that measured it (``run``).

    python benchmarks/side_by_side.py                                # everything, GPU
    python benchmarks/side_by_side.py --rows decode --prompts 2048 8192 --merge
    python benchmarks/side_by_side.py --tiny --device cpu --out-dir /tmp/sbs    # CPU smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib
import inspect
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timing import device_arg, gpu_peaks, on_cuda, use_device  # benchmarks/timing.py (run as files)

ROWS = ("attn", "gdn", "quad_moe", "decode", "fsdp2")

# Model sizes. FULL: the issue's configs; TINY (--tiny): CPU-sized, seconds.
FULL = {
    "vocab": 32000, "hidden": 1024,
    "attn": {"layers": 24, "heads": 16, "intermediate": 2816},
    # fla's head layout: head_dim 256, expand_v 2, num_heads * head_dim = 0.75 * hidden (fla's
    # GatedDeltaNet docstring; its 2048-wide default has 6 heads), output gate, short conv 4;
    # fla's MLP for hidden_ratio 4 is 2816 wide
    "gdn": {"layers": 24, "heads": 3, "head_dim": 256, "expand_v": 2, "conv": 4, "intermediate": 2816},
    "qwen3_next": {"num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128,
                   "linear_num_key_heads": 8, "linear_num_value_heads": 8, "linear_key_head_dim": 128,
                   "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4, "num_experts": 64,
                   "num_experts_per_tok": 4, "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512,
                   "intermediate_size": 2816, "full_attention_interval": 4},
    "batch": 8, "seq_len": 2048, "steps": 20, "warmup": 5,
    "prompts": [2048, 8192, 32768], "decode_batches": [1, 16], "new_tokens": 64,
}
TINY = {
    "vocab": 256, "hidden": 64,
    "attn": {"layers": 2, "heads": 4, "intermediate": 128},
    "gdn": {"layers": 2, "heads": 2, "head_dim": 16, "expand_v": 2, "conv": 4, "intermediate": 128},
    "qwen3_next": {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                   "linear_num_key_heads": 2, "linear_num_value_heads": 2, "linear_key_head_dim": 16,
                   "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 8,
                   "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32,
                   "intermediate_size": 128, "full_attention_interval": 2},
    "batch": 2, "seq_len": 64, "steps": 2, "warmup": 1,
    "prompts": [32], "decode_batches": [1, 2], "new_tokens": 8,
}
MFU_FORMULA = ("flops per token = 6*N + 6*L*d_attn*T (the attention scores and weighted sum, 12*L*d_attn*T "
               "for fwd+bwd, halved by the causal mask); N = parameters without the input embedding (the LM head "
               "counted), L = layers, d_attn = n_heads*head_dim, T = seq_len; MFU = flops per token * tokens/s / "
               "peak bf16 flops")


HF_EXPERTS_NOTE = ("transformers' grouped_mm experts cast the activations to the weight dtype, so under bf16 autocast "
                   "with float32 weights they multiply in float32 (torch's fast grouped GEMM is bf16-only); its "
                   "eager experts loop over the experts with nn.functional.linear, which autocast runs in bf16. "
                   "Both are measured (--hf-experts) and the faster one is the peer.")


class Skip(Exception):
    """A row (or one measurement) that cannot run here; the message is recorded as the reason."""


# ---------------------------------------------------------------------------------------------- helpers
def device_name(dev: str) -> str:
    if dev.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(dev))
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def device_slug(name: str) -> str:
    if name.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "?")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def need(module: str, row: str) -> Any:  # noqa: ANN401 - a module
    """Import a peer package or skip the row, with the reason."""
    try:
        return importlib.import_module(module)
    except Exception as e:  # noqa: BLE001
        raise Skip(f"{row}: {module} is not importable here ({type(e).__name__}: {str(e)[:200]})") from None


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize(torch.device(dev))


def free(dev: str) -> None:
    """Release the device memory of dropped models (a no-op on CPU, where a collection after
    importing transformers costs ~0.3 s and memory is not measured)."""
    if dev.startswith("cuda"):
        gc.collect()
        torch.cuda.empty_cache()


def autocast(dev: str, cpu_bf16: bool = False) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (every peer); float32 on CPU (the smoke test), unless ``cpu_bf16`` (bf16
    weights, which need bf16 autocast)."""
    if dev.startswith("cuda") or cpu_bf16:
        return torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)
    return contextlib.nullcontext()


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch_ids(vocab: int, batch: int, seq_len: int, dev: str, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (batch, seq_len), generator=g).to(dev)


def short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def hf_quiet() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---------------------------------------------------------------------------------------------- training
def time_training(loss_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter], args: argparse.Namespace,
                  use_autocast: bool = True, label: str = "", masters: Any = None) -> dict:
    """Tokens/s of ``--steps`` optimizer steps after ``--warmup`` (fused AdamW, a fresh optimizer);
    peak memory counted from before this call (so a capture or compile made inside the caller's
    setup after ``reset_peak`` counts too). With ``--profile``, two more steps under
    torch.profiler afterwards: the top kernels are printed (``label`` first), the per-step
    kernel count, kernel time and host time go into the result. ``masters``
    (``training/mixed.py`` MasterWeights over some of ``params``): bf16 weights, their gradients
    collected into float32 after the backward and the optimizer stepping the float32 masters, as
    ``hymba train --param-dtype bfloat16`` does."""
    dev = args.device
    full = masters.full_precision if masters is not None else contextlib.nullcontext
    with full():  # the optimizer's state is made for the float32 masters
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

    def step() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        with autocast(dev, cpu_bf16=masters is not None) if use_autocast else contextlib.nullcontext():
            loss = loss_fn()
        loss.backward()
        if masters is not None:
            masters.collect()
        with full():
            opt.step()
        return loss.detach()

    for _ in range(args.warmup):
        step()
    sync(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync(dev)
    secs = time.perf_counter() - t0
    tokens = args.batch * args.seq_len
    out = {"tokens_per_s": tokens * args.steps / secs, "step_ms": secs / args.steps * 1e3,
           "final_loss": float(loss)}
    if dev.startswith("cuda"):
        out["peak_gib"] = torch.cuda.max_memory_allocated(torch.device(dev)) / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved(torch.device(dev)) / 2**30
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from timing import profile_passes  # benchmarks/timing.py

        print(f"\n-- profile: {label}", flush=True)
        out["profile"] = profile_passes(step, dev, passes=2, rows=20)
    opt.zero_grad(set_to_none=True)
    return out


def reset_peak(dev: str) -> None:
    free(dev)
    if dev.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(torch.device(dev))


def measure_peer(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace, **forward_kw: Any) -> dict:
    """An HF / fla causal LM: ``model(input_ids, labels=input_ids).loss`` (they shift the labels)."""
    model.train()
    reset_peak(args.device)
    try:
        row = time_training(lambda: model(input_ids=ids, labels=ids, use_cache=False, **forward_kw).loss,
                            list(model.parameters()), args, label=f"peer {type(model).__name__}")
    except torch.cuda.OutOfMemoryError as e:
        row = {"error": short_error(e)}
    row["parameters"] = n_params(model)
    return row


def measure_ours(model: torch.nn.Module, ids: torch.Tensor, args: argparse.Namespace) -> dict:
    """Our model in each mode: eager, CUDA graphs (GraphedStep), torch.compile (--compile); with
    ``--param-dtype bfloat16`` also eager and CUDA graphs with bf16 weights and float32 masters
    (``eager_bf16w``, ``cuda_graph_bf16w``); with ``--activation-checkpoint N`` eager and CUDA graphs
    with activation checkpointing (``eager_acN``, ``cuda_graph_acN``). Every mode computes the loss as ``hymba train``'s step
    does, ``return_logits=False``: the fused linear + cross-entropy head, no [B, T, V] logits (the
    eager and compiled modes took the logits and the unfused loss until 2026-12-05)."""
    from hymba_plus.training.cuda_graph import CaptureError, GraphedStep
    from hymba_plus.training.mixed import MasterWeights, compute_weights

    dev = args.device
    params = list(model.parameters())
    model.train()
    modes: dict[str, dict] = {}
    masters = None

    def run(name: str, setup: Callable[[], tuple[Callable[[], torch.Tensor], bool, Any]]) -> None:
        reset_peak(dev)
        keep = None
        try:
            loss_fn, use_autocast, keep = setup()
            modes[name] = time_training(loss_fn, params, args, use_autocast, label=f"ours {name}", masters=masters)
        except (CaptureError, Skip) as e:
            modes[name] = {"error": str(e)}
        except Exception as e:  # noqa: BLE001 - one mode failing (OOM, a compile error) leaves the others
            modes[name] = {"error": short_error(e)}
        del keep
        for p in params:
            p.grad = None
        free(dev)

    def loss(fwd: Callable[..., Any] = model) -> torch.Tensor:  # the training step's loss (training/cuda_graph.py's too)
        return fwd(ids, labels=ids, check_inputs=False, return_logits=False).loss

    run("eager", lambda: (loss, True, None))

    def graphed() -> tuple[Callable[[], torch.Tensor], bool, Any]:
        if not dev.startswith("cuda"):
            raise Skip("needs CUDA")
        step = GraphedStep(model, ids, ids.clone(),
                           lambda: torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False))
        return (lambda: step(ids, ids)[0]), False, step  # autocast is captured in the graphs

    run("cuda_graph", graphed)
    if args.compile:
        def compiled() -> tuple[Callable[[], torch.Tensor], bool, Any]:
            fwd = torch.compile(model)
            return (lambda: loss(fwd)), True, fwd

        run("compile", compiled)
    if getattr(args, "param_dtype", None) == "bfloat16":
        masters = MasterWeights(compute_weights(model))  # on a CPU: under CPU bf16 autocast (time_training)
        run("eager_bf16w", lambda: (loss, True, None))
        run("cuda_graph_bf16w", graphed)
        masters.release()  # the float32 weights are the parameters again: later modes run without masters
        masters = None
    every = getattr(args, "activation_checkpoint", None)
    if every:  # every N-th block recomputed in the backward (core/recompute.py): memory against time
        model.set_activation_checkpointing(every)
        try:
            run(f"eager_ac{every}", lambda: (loss, True, None))
            run(f"cuda_graph_ac{every}", graphed)
        finally:
            model.set_activation_checkpointing(0)
    return {"parameters": n_params(model), "modes": modes}


def best_default(ours: dict) -> tuple[str | None, float | None]:
    """Our best tokens/s among the modes that need no opt-in flag (eager, CUDA graph)."""
    cands = [(m, r["tokens_per_s"]) for m, r in ours["modes"].items()
             if m in ("eager", "cuda_graph") and "tokens_per_s" in r]
    if not cands:
        return None, None
    return max(cands, key=lambda c: c[1])


def finish_train_row(row: dict) -> dict:
    mode, tps = best_default(row["ours"])
    peer = row["peer"].get("tokens_per_s")
    row["ours_best_default_mode"] = mode
    row["ratio"] = tps / peer if tps and peer else None
    bf16w = [r["tokens_per_s"] for m, r in row["ours"]["modes"].items() if m.endswith("_bf16w") and "tokens_per_s" in r]
    if bf16w and peer:  # --param-dtype bfloat16: an opt-in flag, so beside the headline ratio, not in it
        row["ratio_bf16_weights"] = max(bf16w) / peer
    return row


def mfu(tokens_per_s: float, n_non_embed: int, layers: int, d_attn: int, seq_len: int, peak: float) -> float:
    return (6 * n_non_embed + 6 * layers * d_attn * seq_len) * tokens_per_s / peak


# ---------------------------------------------------------------------------------------------- rows
def attn_configs(args: argparse.Namespace) -> tuple[dict, dict]:
    """(LlamaConfig kwargs, our recipe) of the attn row: MHA, RoPE theta 1e4, RMSNorm eps 1e-6, untied."""
    P, c = args.preset, args.preset["attn"]
    d, L, H = P["hidden"], c["layers"], c["heads"]
    hf_cfg = {"vocab_size": P["vocab"], "hidden_size": d, "num_hidden_layers": L, "num_attention_heads": H,
              "num_key_value_heads": H, "intermediate_size": c["intermediate"], "max_position_embeddings": args.seq_len,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attn_implementation": "sdpa"}
    recipe = {"name": "side-by-side-attn",
              "model": {"vocab_size": P["vocab"], "d_model": d, "max_seq_len": args.seq_len,
                        "block_pattern": f"(GA+mlp)*{L}", "ffn": "mlp", "meta_tokens": 0, "tie_embeddings": False,
                        "norm": {"eps": 1e-6, "zero_centered": False}},
              "components": {"gated_attn": {"n_heads": H, "n_kv_heads": H, "head_dim": d // H, "qk_norm": False,
                                            "output_gate": False, "rope": {"theta": 10000.0}},
                             "mlp": {"d_hidden": c["intermediate"]}}}
    return hf_cfg, recipe


def gdn_configs(args: argparse.Namespace) -> tuple[dict, dict]:
    """(fla GatedDeltaNetConfig kwargs, our recipe) of the gdn row."""
    P, c = args.preset, args.preset["gdn"]
    d, L = P["hidden"], c["layers"]
    fla_cfg = {"vocab_size": P["vocab"], "hidden_size": d, "num_hidden_layers": L, "num_heads": c["heads"],
               "head_dim": c["head_dim"], "expand_v": c["expand_v"], "conv_size": c["conv"], "use_gate": True,
               "use_short_conv": True, "hidden_ratio": 4, "intermediate_size": c["intermediate"],
               "norm_eps": 1e-6, "max_position_embeddings": args.seq_len, "tie_word_embeddings": False,
               "attn_mode": "chunk"}
    recipe = {"name": "side-by-side-gdn",
              "model": {"vocab_size": P["vocab"], "d_model": d, "max_seq_len": args.seq_len,
                        "block_pattern": f"(GD+mlp)*{L}", "ffn": "mlp", "meta_tokens": 0, "tie_embeddings": False,
                        "norm": {"eps": 1e-6}},
              "components": {"gdn": {"n_heads": c["heads"], "head_dim": c["head_dim"], "expand_v": c["expand_v"],
                                     "conv_size": c["conv"], "norm_eps": 1e-6},
                             "mlp": {"d_hidden": c["intermediate"]}}}
    return fla_cfg, recipe


def row_attn(args: argparse.Namespace) -> dict:
    """HF LlamaForCausalLM (sdpa) vs our (GA+mlp)*L with the same width, heads, MLP, vocabulary."""
    tf = need("transformers", "attn")
    hf_quiet()
    from hymba_plus.models.lm import build_model

    P, c, dev = args.preset, args.preset["attn"], args.device
    d, L = P["hidden"], c["layers"]
    hf_cfg, recipe = attn_configs(args)
    ids = batch_ids(P["vocab"], args.batch, args.seq_len, dev)
    row: dict[str, Any] = {"config": {"hf_llama": hf_cfg, "ours_recipe": recipe}, "mfu_formula": MFU_FORMULA,
                           "peak_flops": args.peak_flops}
    torch.manual_seed(0)
    with torch.device(dev):
        peer = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg))
    row["peer_name"] = f"HF LlamaForCausalLM ({peer.config._attn_implementation})"
    row["peer"] = measure_peer(peer, ids, args)
    args.progress(row)
    del peer
    free(dev)
    torch.manual_seed(0)
    ours = build_model(recipe, device=dev)
    row["ours"] = measure_ours(ours, ids, args)
    n_non_embed = row["ours"]["parameters"] - P["vocab"] * d
    d_attn = c["heads"] * (d // c["heads"])
    for r in [row["peer"], *row["ours"]["modes"].values()]:
        if "tokens_per_s" in r:
            r["mfu"] = mfu(r["tokens_per_s"], n_non_embed, L, d_attn, args.seq_len, args.peak_flops)
    del ours
    return finish_train_row(row)


def row_gdn(args: argparse.Namespace) -> dict:
    """fla GatedDeltaNetForCausalLM vs our (GD+mlp)*L with matched heads / head dim / expand_v / conv / MLP."""
    if not args.device.startswith("cuda"):
        raise Skip("gdn: fla's GatedDeltaNetForCausalLM runs Triton kernels, which need CUDA "
                   f"(device {args.device})")
    need("transformers", "gdn")
    hf_quiet()
    fla_models = need("fla.models", "gdn")
    from hymba_plus.models.lm import build_model

    P, dev = args.preset, args.device
    fla_cfg, recipe = gdn_configs(args)
    ids = batch_ids(P["vocab"], args.batch, args.seq_len, dev)
    row: dict[str, Any] = {"config": {"fla_gated_deltanet": fla_cfg, "ours_recipe": recipe},
                           "peer_name": "fla GatedDeltaNetForCausalLM"}
    torch.manual_seed(0)
    with torch.device(dev):
        peer = fla_models.GatedDeltaNetForCausalLM(fla_models.GatedDeltaNetConfig(**fla_cfg))
    row["peer"] = measure_peer(peer, ids, args)
    args.progress(row)
    del peer
    free(dev)
    torch.manual_seed(0)
    ours = build_model(recipe, device=dev)
    row["ours"] = measure_ours(ours, ids, args)
    del ours
    return finish_train_row(row)


def qwen3_next_config(args: argparse.Namespace) -> dict:
    """The Qwen3-Next config of rows quad_moe and decode (long enough for the longest prompt)."""
    P = args.preset
    longest = max([args.seq_len] + [p + args.new_tokens for p in args.prompts])
    return {"vocab_size": P["vocab"], "hidden_size": P["hidden"], **P["qwen3_next"], "max_position_embeddings": longest,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "norm_topk_prob": True, "decoder_sparse_step": 1,
            "mlp_only_layers": [], "router_aux_loss_coef": 0.001, "attn_implementation": "sdpa",
            "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}


def build_qwen3_next(args: argparse.Namespace, dtype: torch.dtype, folder: Path) -> tuple[Any, Any]:
    """(HF Qwen3NextForCausalLM on the device, random init, in ``dtype``, saved to ``folder``;
    our model imported from that folder through hymba_plus.convert, same weights and dtype)."""
    tf = need("transformers", "qwen3_next")
    hf_quiet()
    from hymba_plus.convert.importer import read_hf
    from hymba_plus.models.lm import HybridLM

    torch.manual_seed(0)
    with torch.device(args.device):
        hf = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**qwen3_next_config(args)))
    hf = hf.to(dtype)
    hf.save_pretrained(folder)
    recipe, state, _ = read_hf(folder, name="side-by-side-qwen3next", tokenizer=False)
    with torch.device(args.device):
        ours = HybridLM(recipe)
    ours.load_state_dict(state)
    del state
    return hf, ours.to(dtype)


def hf_kernel_note() -> dict:
    """Which optional kernel packages HF's Qwen3-Next picks up here (it falls back to PyTorch)."""
    import importlib.util

    return {m: importlib.util.find_spec(m) is not None for m in ("fla", "causal_conv1d")}


def row_quad_moe(args: argparse.Namespace) -> dict:
    """HF Qwen3NextForCausalLM vs the same model imported through hymba_plus.convert."""
    need("transformers", "quad_moe")
    dev = args.device
    ids = batch_ids(args.preset["vocab"], args.batch, args.seq_len, dev)
    probe = ids[:2, : min(64, args.seq_len)]
    cfg = qwen3_next_config(args)
    row: dict[str, Any] = {"config": {"hf_qwen3_next": cfg}, "hf_kernel_packages": hf_kernel_note(),
                           "losses": "both add the pooled load-balancing loss x router_aux_loss_coef (HF: "
                                     "output_router_logits=True)",
                           "hf_experts_note": HF_EXPERTS_NOTE}
    with tempfile.TemporaryDirectory(prefix="hymba-sbs-") as tmp:
        hf, ours = build_qwen3_next(args, torch.float32, Path(tmp))
    ours = ours.cpu()  # measured after the peer, alone on the device
    free(dev)
    row["config"]["ours_recipe"] = ours.recipe.to_dict()
    hf.eval()
    with torch.no_grad():
        ref = hf(input_ids=probe, use_cache=False).logits.float().cpu()
    variants: dict[str, dict] = {}
    for impl in args.hf_experts:  # the peer is its fastest experts implementation
        try:
            hf.set_experts_implementation(impl)
        except (ValueError, RuntimeError, ImportError) as e:
            variants[impl] = {"error": short_error(e)}
            continue
        variants[impl] = measure_peer(hf, ids, args, output_router_logits=True)
        variants[impl]["experts_implementation"] = hf.config._experts_implementation
        row["peer_variants"] = variants
        best = max(variants, key=lambda k: variants[k].get("tokens_per_s", 0.0))
        row["peer"], row["peer_name"] = variants[best], f"HF Qwen3NextForCausalLM (experts {best})"
        args.progress(row)
    if "peer" not in row:
        raise Skip(f"quad_moe: no HF experts implementation of {args.hf_experts} could be set: {variants}")
    del hf
    free(dev)
    ours = ours.to(dev).eval()
    with torch.no_grad():
        got = ours(probe, check_inputs=False).logits.float().cpu()
    row["conversion_check"] = {"tokens": list(probe.shape), "precision": "float32 weights and inputs, no autocast",
                               "logits_max_rel_diff": float((got - ref).abs().max() / ref.abs().max())}
    row["ours"] = measure_ours(ours, ids, args)
    del ours
    return finish_train_row(row)


def generate_engines(requested: list[str]) -> tuple[bool, list[str | None]]:
    """(whether our generate takes ``engine=``, the engines to measure: [None] = the default only)."""
    from hymba_plus.models import generation

    if "engine" in inspect.signature(generation.generate_ar).parameters:
        return True, list(requested)
    return False, [None]


def active_weight_bytes(model: Any) -> int:  # noqa: ANN401 - HybridLM
    """Bytes of parameters one batch-1 decoding step reads: all but the input embedding (one row
    is read; unless it is also the tied LM head, read whole) and, in each MoE layer, the experts the token is
    not routed to (top_k of n_experts plus the shared expert are read)."""
    from hymba_plus.components.moe import MoE

    head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if n != "embed.weight" or p is head)
    for m in model.modules():
        if isinstance(m, MoE):
            per_expert = (m.w_gate_up[0].numel() + m.w_down[0].numel()) * m.w_down.element_size()
            total -= (m.cfg.n_experts - m.cfg.top_k) * per_expert
    return total


def row_decode(args: argparse.Namespace) -> dict:
    """HF generate vs ours on the Qwen3-Next pair (same weights), whole-call and decode-only tok/s."""
    need("transformers", "decode")
    dev = args.device
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.decode_dtype]
    has_engine, engines = generate_engines(args.engines)
    row: dict[str, Any] = {"config": {"hf_qwen3_next": qwen3_next_config(args)}, "dtype": args.decode_dtype,
                           "engine_keyword": has_engine, "engines": [e or "default" for e in engines],
                           "new_tokens": args.new_tokens, "hbm_bytes_per_s": args.hbm_bw,
                           "hf_kernel_packages": hf_kernel_note(), "results": [],
                           "engine_ran": "the engine our timed calls ran (generate's stats['engine']): auto is graph on a "
                                         "GPU, each decode step replayed from a CUDA graph; HF generate is called with "
                                         "its default cache, no compile or CUDA graph asked for",
                           "timing": "tokens_per_s = new tokens * batch / seconds of the whole generate call (prefill "
                                     "included); decode-only = (new tokens - 1) * batch / (t(new tokens) - t(1)), "
                                     "t(1) = a generate call with max_new_tokens=1 (prefill + first token); batch-1 "
                                     "ms_per_token = 1000 / decode-only tok/s; weight_stream_limit_ms = bytes of "
                                     "parameters one batch-1 step reads (no input embedding, only the routed top-k "
                                     "and shared experts) / hbm_bytes_per_s (cache reads not counted)"}
    with tempfile.TemporaryDirectory(prefix="hymba-sbs-") as tmp:
        hf, ours = build_qwen3_next(args, dtype, Path(tmp))
    hf.eval()
    ours.eval()
    row["config"]["ours_recipe"] = ours.recipe.to_dict()
    row["hf_experts_implementation"] = getattr(hf.config, "_experts_implementation", None)
    row["weight_bytes_per_step_batch1"] = wb = active_weight_bytes(ours)
    row["weight_stream_limit_ms"] = wb / args.hbm_bw * 1e3
    n = args.new_tokens

    def call_hf(ids: torch.Tensor, k: int) -> torch.Tensor:
        # min_new_tokens: a random model that samples EOS must not stop early (ours has no EOS here)
        return hf.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True, num_beams=1,
                           attention_mask=torch.ones_like(ids))

    ran: dict[str | None, str | None] = {}  # engine asked -> the one the timed full-length call ran

    def call_ours(engine: str | None) -> Callable[[torch.Tensor, int], torch.Tensor]:
        kw = {} if engine is None else {"engine": engine}

        def gen(ids: torch.Tensor, k: int) -> torch.Tensor:
            stats: dict = {}
            out = ours.generate(ids, max_new_tokens=k, stats=stats, **kw)
            if k == n:  # (a 1-token call makes no engine: its prefill and one step run on the growing cache)
                ran[engine] = stats.get("engine")
            return out

        return gen

    peers: list[tuple[str, str | None, Callable]] = [("hf", None, call_hf)]
    peers += [("ours", e, call_ours(e)) for e in engines]
    last: dict[tuple[str, str | None, int], tuple[int, float]] = {}  # (peer, engine, batch) -> (prompt, seconds)
    for prompt in args.prompts:
        for batch in args.decode_batches:
            ids = batch_ids(args.preset["vocab"], batch, prompt, dev, seed=prompt + batch)
            outs: list[tuple[dict, torch.Tensor]] = []
            for who, engine, fn in peers:
                res: dict[str, Any] = {"prompt": prompt, "batch": batch, "model": who, "engine": engine or "default"}
                row["results"].append(res)
                prev = last.get((who, engine, batch))
                if prev is not None:
                    guess = prev[1] * (prompt / prev[0]) ** 2  # attention prefill is quadratic at worst
                    if guess > args.max_call_s:
                        res["skipped"] = (f"predicted {guess:.0f} s for one generate call (from {prev[1]:.1f} s at "
                                          f"{prev[0]} tokens, quadratic) > --max-call-s {args.max_call_s:g}")
                        continue
                try:
                    res.update(time_generate(fn, ids, n, args))
                    if who == "ours":  # auto's pick: graph (CUDA-graph replay of the step) on a GPU
                        res["engine_ran"] = ran.get(engine)
                    outs.append((res, res.pop("output")))
                    last[(who, engine, batch)] = (prompt, res["seconds"])
                except torch.cuda.OutOfMemoryError as e:
                    res["skipped"] = f"out of memory ({short_error(e)})"
                except (ValueError, TypeError, RuntimeError) as e:
                    res["skipped"] = short_error(e)
                free(dev)
                if batch == 1 and "decode_tokens_per_s" in res:
                    res["weight_stream_limit_ms"] = row["weight_stream_limit_ms"]
                print(f"  decode {prompt:>6} x {batch:<3} {who:<4} {engine or 'default':<8} "
                      + (f"{res['tokens_per_s']:10.1f} tok/s" if "tokens_per_s" in res else res.get("skipped", "")),
                      flush=True)
                args.progress(row)  # each model's timing as soon as it exists (a killed call keeps it)
            hf_out = next((o for r, o in outs if r["model"] == "hf"), None)
            for res, out in outs:  # greedy agreement with HF (bf16 rounding may flip near-ties)
                if res["model"] != "hf" and hf_out is not None:
                    res["tokens_equal_to_hf"] = (out[:, prompt:] == hf_out[:, prompt:]).float().mean().item()
                    row["tokens_equal_note"] = ("bf16 greedy agreement of a random-init pair is no correctness test: "
                                                "near-tied logits flip under round-off and every later context "
                                                "differs (benchmarks/decode_agreement.py: float32 agrees exactly)")
            del outs, ids
            free(dev)
            args.progress(row)  # with the agreement with HF
    return row


def time_generate(fn: Callable[[torch.Tensor, int], torch.Tensor], ids: torch.Tensor, n: int,
                  args: argparse.Namespace) -> dict:
    dev = args.device

    def timed(k: int) -> tuple[float, torch.Tensor]:
        sync(dev)
        t0 = time.perf_counter()
        out = fn(ids, k)
        sync(dev)
        return time.perf_counter() - t0, out

    # warm-up: one whole call at this shape (kernels compiled / autotuned, allocator primed, and
    # our decode engine for this batch and capacity made and captured: a one-time cost per shape)
    timed(n)
    t_n, t_1 = [], []
    out = None
    for _ in range(args.decode_repeats):
        t, out = timed(n)
        t_n.append(t)
        if n > 1:
            t_1.append(timed(1)[0])
    if out.shape[1] != ids.shape[1] + n:
        raise RuntimeError(f"generated {out.shape[1] - ids.shape[1]} tokens, not {n}")
    B = ids.shape[0]
    res: dict[str, Any] = {"seconds": statistics.median(t_n), "tokens_per_s": n * B / statistics.median(t_n),
                           "output": out}
    if t_1:
        res["seconds_max_new_1"] = statistics.median(t_1)
        dec = res["seconds"] - res["seconds_max_new_1"]
        if dec > 0:
            res["decode_tokens_per_s"] = (n - 1) * B / dec
            if B == 1:
                res["ms_per_token"] = dec / (n - 1) * 1e3
    return res


def fsdp2_recipe(args: argparse.Namespace) -> dict:
    """The dense hybrid of the fsdp2 row: the attn row's attention and the gdn row's gdn, alternating."""
    P, g, a = args.preset, args.preset["gdn"], args.preset["attn"]
    d, L = P["hidden"], a["layers"]
    return {"name": "side-by-side-fsdp2",
            "model": {"vocab_size": P["vocab"], "d_model": d, "max_seq_len": args.seq_len,
                      "block_pattern": f"(GD+mlp | GA+mlp)*{L // 2}", "ffn": "mlp", "meta_tokens": 0},
            "components": {"gated_attn": {"n_heads": a["heads"], "head_dim": d // a["heads"], "qk_norm": False,
                                          "output_gate": False},
                           "gdn": {"n_heads": g["heads"], "head_dim": g["head_dim"], "expand_v": g["expand_v"],
                                   "conv_size": g["conv"]},
                           "mlp": {"d_hidden": a["intermediate"]}}}


def row_fsdp2(args: argparse.Namespace) -> dict:
    """benchmarks/train_scaling.py's run (hymba train under torchrun, FSDP2) on 1 and 2 GPUs."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.device.startswith("cuda") or count < 2:
        raise Skip(f"fsdp2: needs 2 CUDA devices, this machine has {count} (device {args.device})")
    import yaml

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_scaling  # benchmarks/train_scaling.py

    recipe = fsdp2_recipe(args)
    ns = argparse.Namespace(steps=max(args.steps, 10), batch_size=args.batch, seq_len=args.seq_len, data="mqar",
                            device="cuda", compile=args.compile, fsdp_param_dtype=args.fsdp_param_dtype)
    with tempfile.TemporaryDirectory(prefix="hymba-sbs-fsdp2-") as tmp:
        path = Path(tmp) / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        try:
            results = [train_scaling.run_one(n, str(path), ns, Path(tmp)) for n in (1, 2)]
        except SystemExit as e:  # run_one's failure: a one-line reason, stderr tail already printed
            raise Skip(f"fsdp2: {e}") from None
    one, two = (r["tokens_per_s"] for r in results)
    return {"config": {"recipe": recipe, "batch_size_per_gpu": args.batch, "seq_len": args.seq_len,
                       "steps": ns.steps, "data": "mqar", "optimizer": "hymba train default (Muon + AdamW)",
                       "compile": args.compile, "fsdp_param_dtype": args.fsdp_param_dtype or "float32"},
            "results": results, "speedup": two / one, "efficiency": two / (2 * one)}


ROW_FUNCS = {"attn": row_attn, "gdn": row_gdn, "quad_moe": row_quad_moe, "decode": row_decode, "fsdp2": row_fsdp2}


# ---------------------------------------------------------------------------------------------- report
def ratios(rows: dict) -> dict:
    out: dict[str, Any] = {}
    for key, name in (("attn_vs_hf_llama", "attn"), ("gdn_vs_fla", "gdn"),
                      ("quad_moe_vs_hf_qwen3next", "quad_moe")):
        r = rows.get(name)
        out[key] = r.get("ratio") if r else None
        if out[key] is not None and r.get("launch_configs"):
            out[f"{key}_note"] = f"not tuned: {r['launch_configs']}"
        if r and r.get("ratio_bf16_weights") is not None:
            out[f"{key}_bf16_weights"] = r["ratio_bf16_weights"]
        if out[key] is None:
            out[f"{key}_note"] = ((r or {}).get("reason") or ("row not run" if not r else "row did not finish"
                                  if r.get("status") in ("partial", "interrupted") else
                                  "a peer or our model did not finish"))
    out["decode_vs_hf"], note = decode_ratio(rows.get("decode"), "decode_tokens_per_s")
    if note:
        out["decode_vs_hf_note"] = note
    out["decode_vs_hf_whole_call"], note = decode_ratio(rows.get("decode"), "tokens_per_s")
    if note:
        out["decode_vs_hf_whole_call_note"] = note
    f = rows.get("fsdp2")
    out["fsdp2_2gpu_scaling"] = f.get("speedup") if f else None
    if out["fsdp2_2gpu_scaling"] is None:
        out["fsdp2_2gpu_scaling_note"] = (f or {}).get("reason") or "row not run (--rows)"
    out["definitions"] = ("training: ours' best tokens/s among the modes that need no flag (eager, cuda graph; "
                          "not --compile) / the peer's tokens/s; decode_vs_hf: ours (engine auto, or the default "
                          "when generate has no engine keyword) / HF, decode-only tokens/s (t(64 new) - t(1 new), "
                          "so the prefill does not count) at batch 16, the worse of the 2k "
                          "and 8k prompts (a row without them: the ratio it has, its batch and prompts in the "
                          "note; decode_vs_hf_whole_call: the same with whole-call tokens/s, prefill "
                          "included); fsdp2_2gpu_scaling: tokens/s on 2 GPUs / "
                          "on 1 (per-GPU batch fixed); <row>_bf16_weights (--param-dtype bfloat16): ours' best "
                          "with bf16 weights and float32 masters / the peer's")
    return out


#: the batch and prompts ``decode_vs_hf`` is defined at (the worse of the two prompts)
DECODE_RATIO_BATCH, DECODE_RATIO_PROMPTS = 16, (2048, 8192)


#: each row's ratio in ``ratios``
RATIO_KEYS = {"attn": "attn_vs_hf_llama", "gdn": "gdn_vs_fla", "quad_moe": "quad_moe_vs_hf_qwen3next",
              "decode": "decode_vs_hf", "fsdp2": "fsdp2_2gpu_scaling"}


def headline(name: str, row: dict) -> float | None:
    """The ratio row ``name`` gives (``ratios`` of it alone), None when it has none."""
    return ratios({name: row})[RATIO_KEYS[name]]


def decode_ratio(row: dict | None, key: str = "decode_tokens_per_s") -> tuple[float | None, str | None]:
    """Ours / HF of ``key`` as defined: at batch 16, the worse of the 2k and 8k prompts. A row without that
    (other ``--decode-batches`` / ``--prompts``, a skipped or unfinished setting) gives the ratio it has: the
    prompts up to 8k (else the shortest) at batch 16 if both models ran there, else at the largest batch where
    they did; the note then names the batch and prompts (and an unfinished row's status)."""
    if not row or "results" not in row:
        return None, (row or {}).get("reason") or "row not run"
    res = row["results"]
    engine = "auto" if "auto" in row["engines"] else row["engines"][0]

    def tps(model: str, eng: str, b: int, p: int) -> float | None:
        return next((r.get(key) for r in res if (r["model"], r["engine"], r["batch"], r["prompt"])
                     == (model, eng, b, p)), None)

    def both(b: int, ps: list[int]) -> dict[int, float]:
        pairs = {p: (tps("ours", engine, b, p), tps("hf", "default", b, p)) for p in ps}
        return {p: o / h for p, (o, h) in pairs.items() if o and h}

    every = sorted({r["prompt"] for r in res})
    prompts = ([p for p in DECODE_RATIO_PROMPTS if p in every] or [p for p in every if p <= max(DECODE_RATIO_PROMPTS)]
               or every[:1])
    batches = sorted({r["batch"] for r in res}, reverse=True)
    batch = next((b for b in [DECODE_RATIO_BATCH, *batches] if both(b, prompts)), None)
    if batch is None:
        return None, f"no prompt with both HF and ours measured at one batch (prompts {prompts})"
    vals = both(batch, prompts)
    notes = []
    if row.get("status") != "ok" or batch != DECODE_RATIO_BATCH or set(vals) != set(DECODE_RATIO_PROMPTS):
        notes.append(f"row {row.get('status', 'unfinished')}: prompt(s) {sorted(vals)} measured at batch {batch}, "
                     f"not both 2k and 8k at batch {DECODE_RATIO_BATCH}")
    if engine not in ("auto", "default"):  # --engines without auto: the definition's engine was not measured
        notes.append(f"ours with engine {engine}, not auto (--engines {' '.join(row['engines'])})")
    return min(vals.values()), "; ".join(notes) or None


def print_train_row(name: str, r: dict) -> None:
    def line(who: str, m: dict) -> None:
        if "tokens_per_s" not in m:
            print(f"{name:<9} {who:<46} {m.get('error', '-')}")
            return
        peak = f"{m['peak_gib']:9.2f}" if "peak_gib" in m else f"{'-':>9}"
        mf = f"{m['mfu']:6.1%}" if m.get("mfu") is not None else f"{'-':>6}"
        print(f"{name:<9} {who:<46} {m['tokens_per_s']:>12,.0f} {m['step_ms']:>9.1f} {peak} {mf}")

    print(f"{'row':<9} {'model':<46} {'tokens/s':>12} {'step ms':>9} {'peak GiB':>9} {'MFU':>6}")
    line(r["peer_name"], r["peer"])
    for mode, m in r["ours"]["modes"].items():
        line(f"ours {mode.replace('_', ' ')}", m)
    ratio = f"{r['ratio']:.2f}x" if r.get("ratio") else "-"
    print(f"{name:<9} parameters: peer {r['peer']['parameters'] / 1e6:.1f}M, ours "
          f"{r['ours']['parameters'] / 1e6:.1f}M; ours ({r.get('ours_best_default_mode')}) / peer: {ratio}")


def print_decode(r: dict) -> None:
    print(f"{'prompt':>7} {'batch':>5} {'model':<5} {'engine':<8} {'tok/s':>10} {'decode tok/s':>12} "
          f"{'ms/token':>9} {'limit ms':>9}  note")

    def f(x: dict, k: str, fmt: str) -> str:
        return format(x[k], fmt) if k in x else "-"

    for x in r["results"]:
        print(f"{x['prompt']:>7} {x['batch']:>5} {x['model']:<5} {x['engine']:<8} {f(x, 'tokens_per_s', '10.1f'):>10} "
              f"{f(x, 'decode_tokens_per_s', '12.1f'):>12} {f(x, 'ms_per_token', '9.2f'):>9} "
              f"{f(x, 'weight_stream_limit_ms', '9.3f'):>9}  {x.get('skipped', '')}")


def write_report(report: dict, out_dir: Path, name: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    from hymba_plus.kernels import dispatch

    report["our_fast_paths"] = dispatch.statuses()
    devices = set(report.get("row_devices", {}).values())  # merged rows may have run on another card
    if devices:
        report["device"] = devices.pop() if len(devices) == 1 else "mixed: see row_devices"
    path = out_dir / name
    tmp = out_dir / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    shutil.copyfile(path, out_dir / "latest.json")
    return path


def merge_source(out_dir: Path, name: str) -> Path | None:
    """The file ``--merge`` keeps rows from: ``latest.json`` when it is this device's (every call rewrites it),
    else the newest ``<device-slug>-<date>.json`` (not only today's: a call after UTC midnight found nothing)."""
    latest = out_dir / "latest.json"
    if latest.is_file():
        with contextlib.suppress(ValueError):
            if json.loads(latest.read_text()).get("device") == name:
                return latest
    dated = re.compile(re.escape(device_slug(name)) + r"-(\d{4}-\d{2}-\d{2})\.json")
    found = sorted((m[1], p) for p in out_dir.glob("*.json") if (m := dated.fullmatch(p.name)))
    return found[-1][1] if found else None


class Progress:
    """``args.progress(partial_row)``: a row's results so far written as ``status: partial``
    (the JSON survives a run killed in the middle of a long row); beside an earlier good row of ``--merge``
    as its ``rerun_in_progress``, not over it. ``last``: the latest partial row."""

    def __init__(self, report: dict, row: str, out_dir: Path, file: str, t0: float, earlier: dict | None = None):
        self.report, self.row, self.out_dir, self.file, self.t0 = report, row, out_dir, file, t0
        self.earlier, self.last = earlier, {}

    def __call__(self, partial: dict) -> None:
        self.last = partial
        now = {**partial, "status": "partial", "seconds": round(time.perf_counter() - self.t0, 1)}
        self.report["rows"][self.row] = {**self.earlier, "rerun_in_progress": now} if self.earlier else now
        self.report["ratios"] = ratios(self.report["rows"])
        write_report(self.report, self.out_dir, self.file)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="tiny configs (hidden 64, 2 layers, vocab 256, seq 64, "
                    "batch 2, prompts 32): a CPU smoke test in seconds")
    ap.add_argument("--steps", type=int, help="timed optimizer steps per measurement (default 20; tiny 2)")
    ap.add_argument("--warmup", type=int, help="untimed steps first (default 5; tiny 1)")
    ap.add_argument("--batch", type=int, help="training sequences per step (default 8; tiny 2)")
    ap.add_argument("--seq-len", type=int, help="training sequence length (default 2048; tiny 64)")
    ap.add_argument("--prompts", type=int, nargs="+", help="decode prompt lengths (default 2048 8192 32768; tiny 32)")
    ap.add_argument("--decode-batches", type=int, nargs="+", help="decode batch sizes (default 1 16; tiny 1 2)")
    ap.add_argument("--new-tokens", type=int, help="tokens generated per call (default 64; tiny 8)")
    ap.add_argument("--decode-repeats", type=int, default=2, help="timed generate calls per setting (median)")
    ap.add_argument("--decode-dtype", choices=("bfloat16", "float32"),
                    help="weights of both decode models (default bfloat16 on CUDA, float32 on CPU)")
    ap.add_argument("--engines", nargs="+", default=["auto"], choices=("auto", "graph", "static", "dynamic"),
                    help="our generate(engine=...) values to measure when generate takes it (auto graph static "
                         "dynamic); without that keyword only the default is measured")
    ap.add_argument("--max-call-s", type=float, default=240.0, help="skip a decode setting whose generate call is "
                    "predicted (quadratically from the previous prompt) to take longer")
    ap.add_argument("--hf-experts", nargs="+", default=["grouped_mm", "eager"],
                    help="HF Qwen3-Next experts implementations to time in row quad_moe (the fastest is the peer)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile of our model (training rows)")
    ap.add_argument("--fsdp-param-dtype", choices=("float32", "bfloat16"), default=None,
                    help="fsdp2 row: hymba train --fsdp-param-dtype (bf16 gathered parameters, float32 gradient "
                         "reduce; default float32)")
    ap.add_argument("--param-dtype", choices=("float32", "bfloat16"), default=None,
                    help="training rows, CUDA: bfloat16 also times ours with bf16 weights and float32 masters "
                         "(hymba train --param-dtype bfloat16: modes eager_bf16w, cuda_graph_bf16w; their ratio is "
                         "ratios.<row>_bf16_weights, beside the headline one)")
    ap.add_argument("--activation-checkpoint", type=int, default=None, metavar="N",
                    help="training rows: also time ours eager and in CUDA graphs with every N-th block's "
                         "activations recomputed in the backward (modes eager_acN, cuda_graph_acN)")
    ap.add_argument("--one-launch-config", action="store_true",
                    help="pin fla's and mamba-ssm's autotuned kernels (ours and the peers') to their first launch "
                         "config: a cold machine skips minutes of autotuning; the ratios are then marked not tuned")
    ap.add_argument("--profile", action="store_true", help="training rows: print the top kernels of two more steps "
                    "of each model and mode (benchmarks/timing.profile_passes)")
    ap.add_argument("--peak-flops", type=float, default=None, help="bf16 peak for MFU (default: the GPU's datasheet "
                    "figure, timing.GPU_PEAKS; recorded with its source in settings.peaks_from)")
    ap.add_argument("--hbm-bw", type=float, default=None, help="bytes/s for the weight-streaming limit (default: the "
                    "GPU's datasheet figure, e.g. 4.8e12 on an H200, 3.35e12 on an H100 SXM)")
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--merge", action="store_true", help="keep the rows this run does not measure from latest.json "
                    "if it is this device's, else from the newest <device-slug>-<date>.json in --out-dir (several "
                    "calls under a time limit, across midnight too)")
    args = ap.parse_args(argv)
    args.preset = TINY if args.tiny else FULL
    for key in ("steps", "warmup", "batch", "seq_len", "prompts", "decode_batches", "new_tokens"):
        if getattr(args, key) is None:
            setattr(args, key, args.preset[key])
    if args.decode_dtype is None:
        args.decode_dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    least = {"steps": 1, "warmup": 0, "batch": 1, "seq_len": 2, "new_tokens": 1, "decode_repeats": 1}
    for key, low in least.items():  # a zero or negative count failed inside a row (ZeroDivisionError, ...)
        if getattr(args, key) < low:
            ap.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    for key in ("prompts", "decode_batches"):
        if min(getattr(args, key)) < 1:
            ap.error(f"--{key.replace('_', '-')} must all be >= 1, got {getattr(args, key)}")
    for key in ("peak_flops", "hbm_bw", "max_call_s"):
        if getattr(args, key) is not None and not getattr(args, key) > 0:
            ap.error(f"--{key.replace('_', '-')} must be > 0, got {getattr(args, key)}")
    flops, bw, source = gpu_peaks(args.device)
    args.peaks_from = ("given" if args.peak_flops else source, "given" if args.hbm_bw else source)
    args.peak_flops, args.hbm_bw = args.peak_flops or flops, args.hbm_bw or bw
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    use_device(args.device)  # cuda:N current: the CUDA graphs capture there
    if args.threads:
        torch.set_num_threads(args.threads)
    import hymba_plus  # noqa: F401 - registers the components
    from hymba_plus.kernels import dispatch

    dev = args.device
    name = device_name(dev)
    file = f"{device_slug(name)}-{datetime.date.today().isoformat()}.json"
    report: dict[str, Any] = {
        "device": name, "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
                     "triton": version("triton"), "transformers": version("transformers"), "fla": version("fla")},
        "hymba_kernels": os.environ.get("HYMBA_KERNELS", "auto"),
        "our_fast_paths": dispatch.statuses(),  # refreshed at every write: the paths the rows asked for
        "settings": {k: v for k, v in vars(args).items() if k not in ("preset", "out_dir", "progress")},
        "preset": "tiny" if args.tiny else "full", "rows": {}, "ratios": {},
        "row_devices": {},  # the card of each row (write_report sets "device" from them)
    }
    old = merge_source(args.out_dir, name) if args.merge else None
    earlier: dict[str, dict] = {}  # --merge: rows this call redoes that measured; kept if the rerun fails
    if old is not None:
        prev = json.loads(old.read_text())
        earlier = {k: v for k, v in prev.get("rows", {}).items() if k in args.rows and v.get("status") == "ok"}
        report["rows"] = {k: v for k, v in prev.get("rows", {}).items() if k not in args.rows}
        report["merged_from_earlier_run"] = sorted(report["rows"])
        report["merged_from_file"] = old.name
        report["row_devices"] = {k: prev.get("row_devices", {}).get(k, prev.get("device")) for k in report["rows"]}
        print(f"--merge: merging {' '.join(report['rows']) or 'no rows'} from {old.name}", flush=True)
    elif args.merge:
        print(f"--merge: no latest.json or <{device_slug(name)}-date>.json of {name} in {args.out_dir}: "
              f"nothing to merge", flush=True)
    print(f"device: {name}; rows: {' '.join(args.rows)}", flush=True)
    path, interrupted = None, False
    for row in args.rows:
        print(f"\n== {row}", flush=True)
        t0 = time.perf_counter()
        args.progress = Progress(report, row, args.out_dir, file, t0, earlier.get(row))
        report["row_devices"][row] = name  # (a kept earlier row: the same device, merge_source's file is this one's)
        pin = (dispatch.pinned_autotune("fla.", "mamba_ssm.") if args.one_launch_config and on_cuda(args.device)
               else contextlib.nullcontext(0))
        try:
            with pin as n_pinned:
                res = ROW_FUNCS[row](args)
            res["status"] = "ok"
            if n_pinned:
                res["launch_configs"] = (f"fla's and mamba-ssm's autotuned kernels pinned to their first launch "
                                         f"config ({n_pinned} kernels, --one-launch-config)")
        except Skip as e:
            res = {"status": "skipped", "reason": str(e)}
            print(f"skipped: {e}", flush=True)
        except KeyboardInterrupt:  # a time limit's SIGINT: keep what the row measured so far, stop
            res = dict(args.progress.last)
            res.update(status="interrupted", reason=f"{row}: stopped (SIGINT, e.g. a time limit) after "
                       f"{time.perf_counter() - t0:.0f} s; the results above are the ones finished by then")
            interrupted = True
        except Exception as e:  # noqa: BLE001 - record it and go on to the next row
            traceback.print_exc()
            res = {"status": "error", "reason": f"{row}: {short_error(e)}"}
        res["seconds"] = round(time.perf_counter() - t0, 1)
        # each row keeps what it ran with, so that --merge of rows from several calls stays honest
        res["run"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                      "settings": report["settings"], "our_fast_paths": dispatch.statuses(),
                      "hymba_kernels": report["hymba_kernels"]}
        # a failed rerun never erases a measurement: one that ended skipped / error / interrupted, or ok without
        # the ratio the earlier row has (the peer out of memory, every mode of ours failed)
        lost = row in earlier and res["status"] == "ok" and headline(row, res) is None \
            and headline(row, earlier[row]) is not None
        if (res["status"] != "ok" and row in earlier) or lost:
            print(f"{row}: this call ended {'without a ratio' if lost else res['status']}; the earlier measurement "
                  f"({earlier[row].get('run', {}).get('date')}) is kept, this attempt beside it as failed_rerun",
                  flush=True)
            res = {**earlier[row], "failed_rerun": res}
        report["rows"][row] = res
        free(dev)
        if res["status"] == "ok" and "failed_rerun" not in res:  # (a kept earlier row: printed by its call)
            if "peer" in res:
                print_train_row(row, res)
            elif row == "decode":
                print_decode(res)
            elif row == "fsdp2":
                print(f"fsdp2: 1 GPU {res['results'][0]['tokens_per_s']:,.0f} tok/s, 2 GPUs "
                      f"{res['results'][1]['tokens_per_s']:,.0f} tok/s: {res['speedup']:.2f}x")
        report["ratios"] = ratios(report["rows"])
        path = write_report(report, args.out_dir, file)
        if interrupted:
            print(f"interrupted in row {row}: its finished results are kept (status interrupted); "
                  f"rows after it not run", flush=True)
            break
    print("\nratios (ours / peer):")
    for k, v in report["ratios"].items():
        if k != "definitions" and not k.endswith("_note"):
            note = report["ratios"].get(f"{k}_note")
            print(f"  {k:<26} {f'{v:.2f}' if v is not None else '-':>6}  {note or ''}")
    print(f"wrote {path} and {args.out_dir / 'latest.json'}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
