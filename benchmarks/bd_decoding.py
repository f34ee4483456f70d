"""Block diffusion vs autoregressive decoding on selective copy: accuracy against forward
passes per generated token.

The same hybrid recipe (``GD | GA | M3 | GA``) is trained twice by the ``hymba train``
stack on the built-in ``selective_copy`` task (``--copy-tokens`` data tokens scattered among
noise, then a delimiter and their copy): once with the next-token objective, once with the
``block_diffusion`` objective (BD3-LM NELBO, ``--block-size``, clip [0.3, 0.8]). On held-out
samples each model is given the prompt up to the delimiter (its length is a multiple of the
block size, so the copy starts on a block boundary as in training) and generates the copy
greedily: AR one token per forward; block diffusion with confidence-threshold unmasking at
several thresholds (1.0 = one token per step). Reported: token accuracy, exact-match rate,
forward passes per generated token (the prefill and every block commit counted) and
denoising steps per block. Prints a table, writes JSON (with the device) and a figure.

    python benchmarks/bd_decoding.py --steps 1500 --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hymba_plus.training.tasks import TASKS


def recipe(objective: dict | None, args, seed: int) -> dict:  # noqa: ANN001
    r = {"name": "bd-copy" if objective else "ar-copy",
         "model": {"vocab_size": args.vocab, "d_model": args.d_model, "max_seq_len": args.seq_len,
                   "block_pattern": "GD | GA | M3 | GA", "meta_tokens": 2},
         "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": args.d_model // 4},
                        "gdn": {"n_heads": 2, "head_dim": args.d_model // 4},
                        "mamba3": {"state_size": 16, "head_dim": args.d_model // 4, "expand": 1},
                        "mlp": {"d_hidden": 2 * args.d_model}},
         "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "data": "selective_copy",
                   "copy_tokens": args.copy_tokens, "seed": seed, "warmup_steps": 50, "eval_every": args.steps,
                   "save_every": args.steps, "keep_last": 1}}
    if objective:
        r["objective"] = objective
    return r


def train_one(r: dict, device: str):  # noqa: ANN201
    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training.trainer import RunOptions, train

    rec = load_recipe(r)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(rec, rec.train, RunOptions(out=Path(tmp) / "run", progress=False, log=lambda m: None,
                                                    device=device))
        secs = time.perf_counter() - t0
        model = from_pretrained(summary.checkpoint, device=device).eval()
    return model, secs, summary.eval


@torch.no_grad()
def decode(model, ids: torch.Tensor, n_prompt: int, mode: str, **opts) -> dict:  # noqa: ANN001
    stats: dict = {}
    out = model.generate(ids[:, :n_prompt], max_new_tokens=ids.shape[1] - n_prompt, mode=mode, temperature=0.0,
                         stats=stats, **opts)
    new, ref = out[:, n_prompt:], ids[:, n_prompt:]
    return {"token_accuracy": float((new == ref).float().mean()), "exact_match": float((new == ref).all(1).float().mean()),
            "forwards_per_token": stats["forwards"] / (ids.shape[1] - n_prompt),
            "steps_per_block": stats.get("steps_per_block")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--copy-tokens", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.99, 1.0])
    ap.add_argument("--eval-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", choices=("ar", "bd"), default=None, help="train and evaluate one model only")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bd_decoding.json")
    args = ap.parse_args()
    n_prompt = args.seq_len - args.copy_tokens
    if n_prompt % args.block_size:
        ap.error(f"seq_len - copy_tokens ({n_prompt}) must be a multiple of --block-size ({args.block_size})")
    task, cfg = TASKS["selective_copy"], SimpleNamespace(copy_tokens=args.copy_tokens)
    ids, _ = task.batch(range(10**6, 10**6 + args.eval_size), args.seed, args.seq_len, args.vocab, cfg, stream=1)
    ids = ids.to(args.device)
    objective = {"kind": "block_diffusion", "block_size": args.block_size, "clip": [0.3, 0.8]}
    rows = []
    for name, obj in (("ar", None), ("bd", objective)):
        if args.only not in (None, name):
            continue
        model, secs, ev = train_one(recipe(obj, args, args.seed), args.device)
        base = {"model": name, "train_seconds": round(secs, 1), "eval": ev, "params": model.num_parameters()}
        if name == "ar":
            rows.append({**base, "decoding": "ar", **decode(model, ids, n_prompt, "ar")})
        else:
            for th in args.thresholds:
                rows.append({**base, "decoding": f"block_diffusion threshold {th:g}", "threshold": th,
                             **decode(model, ids, n_prompt, "block_diffusion", threshold=th)})
    print(f"{'model / decoding':<40} {'token acc':>9} {'exact':>7} {'fwd/token':>9} {'steps/block':>11}")
    for r in rows:
        spb = f"{r['steps_per_block']:.2f}" if r["steps_per_block"] is not None else "-"
        print(f"{r['decoding']:<40} {r['token_accuracy']:>9.3f} {r['exact_match']:>7.3f} "
              f"{r['forwards_per_token']:>9.3f} {spb:>11}")
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    result = {"device": device, "torch": torch.__version__, "task": {"name": "selective_copy", "seq_len": args.seq_len,
              "copy_tokens": args.copy_tokens, "vocab": args.vocab, "prompt_tokens": n_prompt,
              "chance": task.chance(args.vocab, cfg)},
              "train": {"steps": args.steps, "batch": args.batch, "block_size": args.block_size, "seed": args.seed},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        bd = [r for r in rows if r["model"] == "bd"]
        if bd:
            ax.plot([r["forwards_per_token"] for r in bd], [r["token_accuracy"] for r in bd], "o-",
                    label=f"block diffusion (block {args.block_size})")
            for r in bd:
                ax.annotate(f"{r['threshold']:g}", (r["forwards_per_token"], r["token_accuracy"]), fontsize=7)
        for r in rows:
            if r["model"] == "ar":
                ax.plot([r["forwards_per_token"]], [r["token_accuracy"]], "s", label="autoregressive")
        ax.set_xlabel("forward passes per generated token")
        ax.set_ylabel("copy token accuracy (greedy)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
