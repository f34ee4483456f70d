"""ETD evidence on k-hop pointer chasing (CPU): does a tied think block at more iterations
beat fewer at equal parameters, and what do iterations beyond the trained number do?

For each trained number of think iterations (``--iterations``, e.g. 1 2 3) the same recipe
(same parameters: the think weights are tied) is trained by the ``hymba train`` stack (Muon +
AdamW, cosine schedule) on the built-in ``khop`` task, then evaluated on held-out samples at
every iteration count up to
``--max-iterations`` (``forward(..., think_iterations=k)``). Also trains the ACT variant
(adaptive iterations, ponder cost) and reports its mean iterations, and the MoDr variant
(``--branches N``: N LoRA branches in the think block at the first trained iteration
count, loss-free balancing) with its branch load. Prints a table and
writes ``benchmarks/results/etd_depth_<device>.json`` (``--out``; ``_cpu`` by default).

    python benchmarks/etd_depth.py --steps 800 --seeds 0 1
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

from hymba_plus.training.tasks import TASKS, masked_accuracy


def recipe(iterations: int, max_iterations: int, d_model: int, halting: str, vocab: int, branches: int = 0,
           train: dict | None = None) -> dict:
    return {"train": train or {},
        "name": f"etd-khop-{halting}-{iterations}",
        "model": {"vocab_size": vocab, "d_model": d_model, "max_seq_len": max(64, (train or {}).get("seq_len", 64)), "block_pattern": "GA | GA | GA",
                  "etd": {"encoder_layers": 1, "think_layers": 1, "decoder_layers": 1,
                          "iterations": iterations, "max_iterations": max_iterations}},
        "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 4, "head_dim": d_model // 4},
                       "mlp": {"d_hidden": 2 * d_model},
                       "etd_router": {"halting": {"kind": halting, "ponder_cost": 0.003, "init_bias": -1.0},
                                      "branches": {"n_branches": branches, "rank": 8}}},
    }


def train_one(r: dict, args, seed: int) -> tuple[torch.nn.Module, float, list[float] | None]:
    """Train with ``hymba train``'s loop into a temporary folder; (model, seconds, MoDr branch
    load averaged over the last 100 steps' metrics or None)."""
    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training.trainer import RunOptions, train

    recipe = load_recipe(r)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = train(recipe, recipe.train, RunOptions(out=Path(tmp) / "run", progress=False, log=lambda m: None,
                                                         device=args.device))
        secs = time.perf_counter() - t0
        model = from_pretrained(summary.checkpoint).eval()
        rows = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    loads = [row["etd/branch_load"] for row in rows[-100:] if "etd/branch_load" in row]
    share = [sum(col) / len(loads) for col in zip(*loads)] if loads else None
    return model, secs, share


@torch.no_grad()
def evaluate(model, task, cfg, args, seed: int, k: int | None) -> tuple[float, float | None, float | None]:  # noqa: ANN001
    """(accuracy, mean ACT iterations over all tokens, mean ACT iterations at the tokens whose
    next token is scored). Also checks causality on these very inputs: changing the last
    token changes no earlier logit (a guard against a leak in the reported numbers)."""
    ids, labels = task.batch(range(10**6, 10**6 + args.eval_size), seed, args.seq_len, args.vocab, cfg, stream=1)
    ids, labels = ids.to(model.device), labels.to(model.device)
    kw = {"think_iterations": k} if k is not None else {}
    out = model(ids, **kw)
    it = out.stats.get("etd/iterations") if out.stats else None
    at_answers = None
    n_used = getattr(model.structure, "_n_used", None)
    if it is not None and n_used is not None:
        n_meta = model.config.meta_tokens
        scored = labels[:, 1:] != -100
        at_answers = float(n_used[:, n_meta:-1][scored].float().mean())
    probe = ids[:64].clone()
    probe[:, -1] = (probe[:, -1] + 1) % args.vocab
    assert torch.equal(model(probe, **kw).logits[:, :-1], out.logits[:64, :-1]), "a future token changed the past"
    return masked_accuracy(out.logits, labels), (float(it) if it is not None else None), at_answers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-iterations", type=int, default=5)
    ap.add_argument("--hops", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=48)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--eval-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-act", action="store_true", help="skip the adaptive (ACT) variant")
    ap.add_argument("--only-act", action="store_true", help="train the adaptive (ACT) variant only")
    ap.add_argument("--branches", type=int, default=0, help="also train MoDr with this many branches (0 = no)")
    ap.add_argument("--muon-lr", type=float, default=None, help="train.muon_lr (default: the trainer's)")
    ap.add_argument("--lr", type=float, default=None, help="train.lr, AdamW (default: the trainer's)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the trainer's device)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: benchmarks/results/etd_depth_<device>.json, e.g. _cpu)")
    args = ap.parse_args()
    if args.out is None:  # a GPU run does not write over the CPU's recorded results
        args.out = Path(__file__).parent / "results" / f"etd_depth_{args.device.split(':')[0]}.json"
    torch.set_num_threads(1)
    task = TASKS["khop"]
    cfg = SimpleNamespace(khop_hops=args.hops, khop_nodes=args.nodes, seq_len=args.seq_len)
    task.validate(args.seq_len, args.vocab, cfg)
    chance = task.chance(args.vocab, cfg)
    rows = []
    variants = [] if args.only_act else [("none", n, 0) for n in args.iterations]
    variants += [] if args.no_act else [("act", args.max_iterations, 0)]
    variants += [("none", args.iterations[0], args.branches)] if args.branches else []
    for halting, n, n_br in variants:
        for seed in args.seeds:
            train_cfg = {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "data": "khop",
                         "khop_hops": args.hops, "khop_nodes": args.nodes, "seed": seed, "warmup_steps": 50,
                         "eval_every": args.steps, "save_every": args.steps, "keep_last": 1}
            train_cfg.update({k: v for k, v in (("muon_lr", args.muon_lr), ("lr", args.lr)) if v is not None})
            r = recipe(n, args.max_iterations, args.d_model, halting, args.vocab, n_br, train_cfg)
            model, secs, share = train_one(r, args, seed)
            ks = range(1, args.max_iterations + 1) if halting == "none" else [None]
            acc = {}
            act_iters = act_at_answers = None
            for k in ks:
                a, it, at_ans = evaluate(model, task, cfg, args, seed, k)
                acc["adaptive" if k is None else k] = a
                if k is None:
                    act_iters, act_at_answers = it, at_ans
            row = {"halting": halting, "trained_iterations": n, "branches": n_br, "seed": seed,
                   "params": model.num_parameters(), "train_seconds": round(secs, 1), "accuracy": acc,
                   "act_mean_iterations": act_iters, "act_mean_iterations_at_answers": act_at_answers,
                   "branch_load_last_100_steps": share}
            rows.append(row)
            evals = " ".join(f"{k}:{v:.3f}" for k, v in acc.items())
            print(f"{halting:>4} trained@{n}{f' MoDr x{n_br}' if n_br else ''} seed {seed}: params "
                  f"{row['params']:,}, {secs:.0f}s, eval acc by iterations {evals}"
                  + (f", mean iterations {act_iters:.2f} ({act_at_answers:.2f} at the answers)"
                     if act_iters is not None else "")
                  + (f", branch load {' '.join(f'{x:.2f}' for x in share)}" if share else ""), flush=True)
    device = (torch.cuda.get_device_name() if args.device.startswith("cuda") else
              f"cpu ({platform.processor() or platform.machine()}, 1 thread)")
    result = {"device": device, "torch": torch.__version__,
              "task": {"name": "khop", "hops": args.hops, "nodes": args.nodes, "seq_len": args.seq_len,
                       "vocab": args.vocab, "chance": chance},
              "train": {"steps": args.steps, "batch": args.batch, "muon_lr": args.muon_lr, "lr": args.lr,
                        "stack": "hymba train (Muon + AdamW, cosine, warmup 50)"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"chance {chance:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
