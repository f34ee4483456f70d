"""ETD evidence on k-hop pointer chasing (CPU): does a tied think block at more iterations
beat fewer at equal parameters, and what do iterations beyond the trained number do?

For each trained number of think iterations (``--iterations``, e.g. 1 2 3) the same recipe
(same parameters: the think weights are tied) is trained with AdamW on the built-in ``khop``
task, then evaluated on held-out samples at every iteration count up to
``--max-iterations`` (``forward(..., think_iterations=k)``). Also trains the ACT variant
(adaptive iterations, ponder cost) and reports its mean iterations, and the MoDr variant
(``--branches N``: N LoRA branches in the think block at the first trained iteration
count, loss-free balancing) with its branch load. Prints a table and
writes ``benchmarks/results/etd_depth_cpu.json`` (``--out``).

    python benchmarks/etd_depth.py --steps 800 --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hymba_plus import build_model
from hymba_plus.training.tasks import TASKS, masked_accuracy


def recipe(iterations: int, max_iterations: int, d_model: int, halting: str, vocab: int, branches: int = 0) -> dict:
    return {
        "name": f"etd-khop-{halting}-{iterations}",
        "model": {"vocab_size": vocab, "d_model": d_model, "max_seq_len": 64, "block_pattern": "GA | GA | GA",
                  "etd": {"encoder_layers": 1, "think_layers": 1, "decoder_layers": 1,
                          "iterations": iterations, "max_iterations": max_iterations}},
        "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 4, "head_dim": d_model // 4},
                       "mlp": {"d_hidden": 2 * d_model},
                       "etd_router": {"halting": {"kind": halting, "ponder_cost": 0.003, "init_bias": -1.0},
                                      "branches": {"n_branches": branches, "rank": 8}}},
    }


def batches(task, cfg, vocab: int, seq_len: int, batch: int, seed: int, stream: int, start: int):
    i = start
    while True:
        yield task.batch(range(i, i + batch), seed, seq_len, vocab, cfg, stream=stream)
        i += batch


def train_one(r: dict, task, cfg, args, seed: int) -> tuple[torch.nn.Module, float, list[float] | None]:
    torch.manual_seed(seed)
    model = build_model(r).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1)
    data = batches(task, cfg, args.vocab, args.seq_len, args.batch, seed, 0, 0)
    t0 = time.perf_counter()
    router = model.etd_router
    load = torch.zeros(max(router.n_branches, 1))
    for step in range(args.steps):
        ids, labels = next(data)
        out = model(ids, labels=labels)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if router.n_branches:
            if step >= args.steps - 100:  # the branch load of the last 100 steps
                load += router.load
            router.update_bias()  # loss-free balancing (no auxiliary loss)
    share = (load / load.sum()).tolist() if router.n_branches else None
    return model.eval(), time.perf_counter() - t0, share


@torch.no_grad()
def evaluate(model, task, cfg, args, seed: int, k: int | None) -> tuple[float, float | None]:
    ids, labels = task.batch(range(10**6, 10**6 + args.eval_size), seed, args.seq_len, args.vocab, cfg, stream=1)
    out = model(ids, think_iterations=k) if k is not None else model(ids)
    it = out.stats.get("etd/iterations") if out.stats else None
    return masked_accuracy(out.logits, labels), (float(it) if it is not None else None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--max-iterations", type=int, default=5)
    ap.add_argument("--hops", type=int, default=2)
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-size", type=int, default=1024)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--no-act", action="store_true", help="skip the adaptive (ACT) variant")
    ap.add_argument("--branches", type=int, default=0, help="also train MoDr with this many branches (0 = no)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "etd_depth_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    task = TASKS["khop"]
    cfg = SimpleNamespace(khop_hops=args.hops, khop_nodes=args.nodes, seq_len=args.seq_len)
    task.validate(args.seq_len, args.vocab, cfg)
    chance = task.chance(args.vocab, cfg)
    rows = []
    variants = [("none", n, 0) for n in args.iterations]
    variants += [] if args.no_act else [("act", args.max_iterations, 0)]
    variants += [("none", args.iterations[0], args.branches)] if args.branches else []
    for halting, n, n_br in variants:
        for seed in args.seeds:
            r = recipe(n, args.max_iterations, args.d_model, halting, args.vocab, n_br)
            model, secs, share = train_one(r, task, cfg, args, seed)
            ks = range(1, args.max_iterations + 1) if halting == "none" else [None]
            acc = {}
            act_iters = None
            for k in ks:
                a, it = evaluate(model, task, cfg, args, seed, k)
                acc["adaptive" if k is None else k] = a
                act_iters = it if k is None else act_iters
            row = {"halting": halting, "trained_iterations": n, "branches": n_br, "seed": seed,
                   "params": model.num_parameters(), "train_seconds": round(secs, 1), "accuracy": acc,
                   "act_mean_iterations": act_iters, "branch_load_last_100_steps": share}
            rows.append(row)
            evals = " ".join(f"{k}:{v:.3f}" for k, v in acc.items())
            print(f"{halting:>4} trained@{n}{f' MoDr x{n_br}' if n_br else ''} seed {seed}: params "
                  f"{row['params']:,}, {secs:.0f}s, eval acc by iterations {evals}"
                  + (f", mean iterations {act_iters:.2f}" if act_iters is not None else "")
                  + (f", branch load {' '.join(f'{x:.2f}' for x in share)}" if share else ""), flush=True)
    result = {"device": f"cpu ({platform.processor() or platform.machine()}, 1 thread)", "torch": torch.__version__,
              "task": {"name": "khop", "hops": args.hops, "nodes": args.nodes, "seq_len": args.seq_len,
                       "vocab": args.vocab, "chance": chance},
              "train": {"steps": args.steps, "batch": args.batch, "lr": args.lr, "optimizer": "AdamW, one-cycle"},
              "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"chance {chance:.3f}; wrote {args.out}")


if __name__ == "__main__":
    main()
