"""Decode speed of one recipe by engine (``generate(engine=...)``: dynamic / static / graph):
prefill time, decode milliseconds per step, tokens/s, and the weight-streaming limit.

    python benchmarks/decode.py --device cuda --batches 1 16 --prompts 2048 8192 --new 64
    python benchmarks/decode.py --device cuda --profile          # + the step's top CUDA kernels

The default recipe is a Qwen3-Next-like hybrid (``(GD+moe)*3 | GA+moe`` three times, d 1024,
64 experts top-4 + shared; benchmarks/side_by_side.py compares the converted HF model with
HF ``generate``). Decode time = (generate with ``--new`` tokens) - (generate with 1 token),
each the median of ``--repeats`` calls after a warm-up call, so the prefill and the
engine's one-time capture do not count (a t(new) at or below t(1) is timing noise: no step time,
a ``note`` says so). The streaming limit is the bytes of the weights a
step reads (embedding row excluded; for MoE at batch 1 only the active experts) over the
GPU's memory bandwidth (``--bandwidth``; default the GPU's datasheet figure, ``timing.GPU_PEAKS``: 4.8e12
B/s on an H200, 3.35e12 on an H100 SXM). Prints a table and writes
JSON with the device name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from timing import device_arg, gpu_peaks, on_cuda, use_device, versions  # benchmarks/timing.py

from hymba_plus.training.bench import decode_times, device_label  # (hymba bench's measure)

QWEN3_NEXT_LIKE = {
    "name": "qwen3-next-like",
    "model": {"vocab_size": 32000, "d_model": 1024, "max_seq_len": 40000, "ffn": "moe",
              "block_pattern": "((GD)*3 | GA)*3", "tie_embeddings": False},
    "components": {"gated_attn": {"n_heads": 8, "n_kv_heads": 2, "head_dim": 256, "rope": {"fraction": 0.25}},
                   "gdn": {"n_heads": 16, "n_v_heads": 32, "head_dim": 128},
                   "moe": {"n_experts": 64, "top_k": 4, "n_shared": 1, "d_expert": 512}},
}


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads (embedding table excluded: one row per token; unless it is also the
    tied LM head, which reads it whole)."""
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    total = 0
    for name, p in model.named_parameters():
        if name.startswith("embed.") and p is not head:
            continue
        total += p.numel() * p.element_size()
    if batch == 1:  # only top_k of n_experts routed experts are read
        for m in model.modules():
            cfg = getattr(m, "cfg", None)
            if cfg is not None and hasattr(cfg, "n_experts") and hasattr(cfg, "top_k"):
                routed = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                             if n.startswith(("w_gate_up", "w_down", "experts")))
                total -= routed * (1 - cfg.top_k / cfg.n_experts)
    return int(total)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=None, help="a recipe YAML (default: the Qwen3-Next-like hybrid)")
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompts", type=int, nargs="+", default=None,
                    help="prompt lengths (default: 2048 8192; with --tiny 32 128)")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--engines", nargs="+", default=["dynamic", "static", "graph"],
                    choices=("auto", "dynamic", "static", "graph"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bandwidth", type=float, default=None,
                    help="HBM bytes/s for the streaming limit (default: the GPU's datasheet figure, timing.GPU_PEAKS)")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of 8 static-engine steps")
    ap.add_argument("--tiny", action="store_true", help="d 64, 2 layers, vocab 256 (a CPU smoke run)")
    ap.add_argument("--pin-autotune", action="store_true",
                    help="fla's / mamba-ssm's autotuned kernels run their first launch config: a fresh GPU "
                         "machine otherwise spends minutes autotuning the prefill's chunk kernels; the decode "
                         "step's kernels (fla's fused recurrent step, ours) are not autotuned, so ms/step is "
                         "unaffected, but prefill times are then untuned")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "decode.json")
    args = ap.parse_args()
    if args.new < 2:  # the step time is (t(new) - t(1)) / (new - 1)
        ap.error(f"--new must be >= 2, got {args.new}")
    if args.repeats < 1:
        ap.error(f"--repeats must be >= 1, got {args.repeats}")
    for key in ("batches", "prompts"):
        if getattr(args, key) is not None and min(getattr(args, key)) < 1:
            ap.error(f"--{key} must all be >= 1, got {getattr(args, key)}")
    if args.bandwidth is not None and not args.bandwidth > 0:
        ap.error(f"--bandwidth must be > 0, got {args.bandwidth}")
    args.bandwidth = args.bandwidth or gpu_peaks(getattr(args, "device", "cuda"))[1]
    if args.prompts is None:  # --tiny's model has max_seq_len 512
        args.prompts = [32, 128] if args.tiny else [2048, 8192]
    from hymba_plus.core.recipe import RecipeError

    try:  # a missing or bad --recipe, or a prompt the model cannot hold: one line, before any work
        args.model_recipe = recipe_of(args)
    except (RecipeError, OSError) as e:
        ap.error(str(e))
    longest, limit = max(args.prompts) + args.new, args.model_recipe.model.max_seq_len
    if longest > limit:
        ap.error(f"--prompts {max(args.prompts)} + --new {args.new} = {longest} exceeds the recipe's max_seq_len "
                 f"{limit}")
    use_device(args.device)  # cuda:N current: the graph engine captures there
    if args.pin_autotune and on_cuda(args.device):
        from hymba_plus.kernels import dispatch

        with dispatch.pinned_autotune("fla.", "mamba_ssm."):
            run(args)
    else:
        run(args)


def recipe_of(args: argparse.Namespace):  # noqa: ANN201 - a Recipe
    """The recipe timed: ``--tiny``'s, else ``--recipe``, else the Qwen3-Next-like hybrid."""
    from hymba_plus import load_recipe

    if args.tiny:
        return load_recipe({"name": "tiny", "model": {"vocab_size": 256, "d_model": 64, "max_seq_len": 512,
                                                      "ffn": "moe", "block_pattern": "GD | GA"},
                            "components": {"moe": {"n_experts": 8, "top_k": 2, "n_shared": 1, "d_expert": 64}}})
    return load_recipe(args.recipe) if args.recipe else load_recipe(QWEN3_NEXT_LIKE)


def run(args: argparse.Namespace) -> None:
    from hymba_plus import build_model
    from hymba_plus.kernels import dispatch

    recipe = args.model_recipe
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = build_model(recipe).to(device=args.device, dtype=dtype).eval()
    V = recipe.model.vocab_size
    rows = []
    result = {"device": device_label(args.device),
              "torch": torch.__version__, "versions": versions(), "recipe": recipe.name, "params": model.num_parameters(),
              "dtype": args.dtype, "new_tokens": args.new, "hbm_bytes_per_s": args.bandwidth, "rows": rows}
    print(f"{recipe.name}: {model.num_parameters() / 1e6:.1f}M params, {args.dtype}, {args.device}")
    print(f"{'batch':>5} {'prompt':>6} {'engine':>8} {'prefill ms':>10} {'ms/step':>8} {'tok/s':>8} "
          f"{'limit ms':>8}")
    for T in args.prompts:
        for B in args.batches:
            ids = torch.randint(0, V, (B, T), device=args.device)
            limit_ms = weight_bytes(model, B) / args.bandwidth * 1e3
            for eng in args.engines:
                if eng == "graph" and not on_cuda(args.device):
                    continue
                try:  # median of --repeats calls after one warm-up call (the engine for the shape is made there)
                    got = decode_times(model, ids, args.new, args.device, warmup=1, iters=args.repeats, engine=eng)
                except torch.OutOfMemoryError as e:
                    rows.append({"batch": B, "prompt": T, "engine": eng, "error": f"out of memory: {e}"[:200]})
                    torch.cuda.empty_cache()
                    continue
                t1 = got["prefill_ms"] / 1e3
                row = {"batch": B, "prompt": T, "engine": got.get("engine", eng), "prefill_ms": got["prefill_ms"],
                       "total_tok_s": B * args.new / got["total_ms"] * 1e3, "weight_stream_limit_ms": limit_ms}
                for k, name in (("ms_per_step", "ms_per_step"), ("decode_tokens_per_s", "decode_tok_s"),
                                ("note", "note"), ("notice", "notice")):
                    if k in got:
                        row[name] = got[k]
                rows.append(row)
                step = f"{row['ms_per_step']:>8.2f} {row['decode_tok_s']:>8.0f}" if "ms_per_step" in row \
                    else f"{'-':>8} {'-':>8}"
                print(f"{B:>5} {T:>6} {row['engine']:>8} {t1 * 1e3:>10.1f} {step} {limit_ms:>8.3f}", flush=True)
                result["fast_paths"] = dispatch.statuses()  # which fast paths ran (or why not)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(result, indent=1))
            del ids
            if on_cuda(args.device):
                torch.cuda.empty_cache()
    if args.profile and on_cuda(args.device):
        from torch.profiler import ProfilerActivity, profile

        from hymba_plus.models.decode_engine import engine_for

        B, T = args.batches[-1], args.prompts[0]
        ids = torch.randint(0, V, (B, T), device=args.device)
        with torch.no_grad():
            cache = model.new_cache(B)
            last = model(ids, cache=cache, logits_to_keep=1).logits[:, -1]
            eng = engine_for(model, cache, 32, graph=False)
            tok = last.argmax(-1)
            for _ in range(3):
                tok = eng.step(tok).argmax(-1)
            torch.cuda.synchronize(torch.device(args.device))
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(8):
                    tok = eng.step(tok).argmax(-1)
                torch.cuda.synchronize(torch.device(args.device))
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=60)
        print(f"static engine, batch {B}, prompt {T}, 8 steps:\n{table}")
        result["profile"] = table
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
