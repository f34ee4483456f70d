"""Self-speculative decoding with MTP modules vs plain AR on selective copy: acceptance rate,
trunk forward passes per generated token and wall time, greedy, same model.

A ``GD | GA | GD | GA`` trunk with ``model.mtp: {depth: 3, block: GD+mlp}`` is trained by the
``hymba train`` stack on the built-in ``selective_copy`` task (the copy after the delimiter
is predictable several tokens ahead, the scattered data before it is not). Held-out
prompts end at the delimiter; the copy is generated with ``mode="ar"`` and ``mode="mtp"``
at k = 1, 2, 3 drafts per round; the outputs must be identical (greedy speculative decoding
is lossless). Prints a table and writes JSON with the device (default
``benchmarks/results/mtp_speculative_<device>.json``: ``_cpu``, ``_cuda``).

    python benchmarks/mtp_speculative.py --steps 1500
    python benchmarks/mtp_speculative.py --device cuda --steps 2000 --batches 1 16 --draft-steps 1000   (GPU)

``--draft-steps`` also trains a draft model of ``--draft-pattern`` (default one Gated DeltaNet
layer) on the same task and decodes with ``mode="speculative"`` (k = 4); tokens/s are
wall-clock over the whole greedy decode.
Each speculative setting runs twice: with the verify chunk's per-position states recorded
(``record_states=True``, the default off CUDA: a rollback gathers each row's accepted state, no forward)
and, in the row marked ``rerun``, without (``record_states=False``: restore the snapshot and
re-run the accepted tokens, as before recording was built).
``rewind share``: the fraction of a second decode (synchronised around each rollback) spent in
the target's ``HybridLM.rewind`` (the gather, or the restore and re-run).

    python benchmarks/mtp_speculative.py --steps 60 --seq-len 32 --copy-tokens 8 --eval-size 8 \
        --d-model 32 --batches 1 8 --draft-steps 30 --repeats 5 \
        --out benchmarks/results/mtp_speculative_record_cpu.json     (the smallest run: a shared CPU;
        without --out it would replace the default file, mtp_speculative_cpu.json, another run's)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--copy-tokens", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--pattern", default="GD | GA | GD | GA", help="the trunk's block_pattern")
    ap.add_argument("--draft-pattern", default="GD", help="the draft model's block_pattern (--draft-steps)")
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe default)")
    ap.add_argument("--eval-size", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=None, help="decode batch sizes (default: 1 and "
                    "--eval-size)")
    ap.add_argument("--draft-steps", type=int, default=0, help="also train a draft model (--draft-pattern) this "
                    "many steps and decode with mode speculative (0: no)")
    ap.add_argument("--repeats", type=int, default=1, help="time each decode this many times and report the "
                    "median (a shared machine's outliers)")
    ap.add_argument("--save", type=Path, default=None, help="keep the trained checkpoint here (reused if it exists)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON file (default: benchmarks/results/mtp_speculative_<device>.json, e.g. _cpu)")
    args = ap.parse_args()
    if args.out is None:
        args.out = Path(__file__).parent / "results" / f"mtp_speculative_{args.device.split(':')[0]}.json"
    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training.trainer import RunOptions, train

    d = args.d_model
    r = load_recipe({
        "name": "mtp-copy",
        "model": {"vocab_size": args.vocab, "d_model": d, "max_seq_len": args.seq_len,
                  "block_pattern": args.pattern, "mtp": {"depth": args.depth, "block": "GD+mlp", "weight": 0.3}},
        "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": d // 4},
                       "gdn": {"n_heads": 2, "head_dim": d // 2}, "mlp": {"d_hidden": 2 * d}},
        "train": {"steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "data": "selective_copy",
                  "copy_tokens": args.copy_tokens, "warmup_steps": 50, "eval_every": args.steps,
                  "save_every": args.steps, "keep_last": 1, "eval_batches": 2,
                  **({"lr": args.lr} if args.lr else {})},
    })
    secs = 0.0
    if args.save is not None and (args.save / "model.safetensors").exists():
        model = from_pretrained(args.save, device=args.device).eval()
        rows_metrics = [json.loads((args.save / "metrics.json").read_text())]
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            summary = train(r, r.train, RunOptions(out=Path(tmp) / "run", progress=False, log=lambda m: None,
                                                  device=args.device))
            secs = time.perf_counter() - t0
            rows_metrics = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            model = from_pretrained(summary.checkpoint, device=args.device).eval()
        if args.save is not None:
            model.save_pretrained(args.save, extra_files={"metrics.json": json.dumps(rows_metrics[-1])})
    last = rows_metrics[-1]
    task, cfg = TASKS["selective_copy"], SimpleNamespace(copy_tokens=args.copy_tokens)
    ids, _ = task.batch(range(10**6, 10**6 + args.eval_size), 0, args.seq_len, args.vocab, cfg, stream=1)
    ids = ids.to(args.device)
    n_prompt = args.seq_len - args.copy_tokens
    prompt, ref = ids[:, :n_prompt], ids[:, n_prompt:]

    draft = None
    if args.draft_steps:
        dr = load_recipe({**{k: v for k, v in r.to_dict().items() if k != "train"}, "name": "draft",
                          "model": {**r.to_dict()["model"], "block_pattern": args.draft_pattern, "mtp": None},
                          "train": {**r.to_dict()["train"], "steps": args.draft_steps, "eval_every": args.draft_steps,
                                    "save_every": args.draft_steps}})
        with tempfile.TemporaryDirectory() as tmp:
            s_d = train(dr, dr.train, RunOptions(out=Path(tmp) / "draft", progress=False, log=lambda m: None,
                                                device=args.device))
            draft = from_pretrained(s_d.checkpoint, device=args.device).eval()

    def timed(prompts, **kw):  # noqa: ANN001, ANN202
        stats: dict = {}
        model.generate(prompts[:1], max_new_tokens=4, **kw)  # warm-up
        times = []
        for _ in range(max(args.repeats, 1)):
            sync()
            t = time.perf_counter()
            out = model.generate(prompts, max_new_tokens=args.copy_tokens, stats=stats, **kw)
            sync()
            times.append(time.perf_counter() - t)
        return out, sorted(times)[len(times) // 2], stats

    def rewind_share(prompts, **kw):  # noqa: ANN001, ANN202
        """Seconds inside ``HybridLM.rewind`` (the gather of recorded states, or the restore and
        re-run of the kept tokens) and the whole decode, both timed with a device sync around each
        rollback."""
        inner, spent = model.rewind, [0.0]

        def timed_rewind(*a, **k):  # noqa: ANN002, ANN003, ANN202
            sync()
            t0 = time.perf_counter()
            ran = inner(*a, **k)
            sync()
            spent[0] += time.perf_counter() - t0
            return ran

        model.rewind = timed_rewind
        try:
            sync()
            t = time.perf_counter()
            model.generate(prompts, max_new_tokens=args.copy_tokens, **kw)
            sync()
            return spent[0], time.perf_counter() - t
        finally:
            del model.rewind

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    rows = []
    for batch in args.batches or (1, args.eval_size):
        p, want = prompt[:batch], ref[:batch]
        ar, t_ar, st_ar = timed(p, mode="ar")
        rows.append({"batch": batch, "decoding": "ar", "seconds": t_ar,
                     "trunk_forwards_per_token": st_ar["forwards"] / args.copy_tokens,
                     "copy_accuracy": float((ar[:, n_prompt:] == want).float().mean())})
        for k in range(1, args.depth + 1):
            for record in (True, False):
                out, t, st = timed(p, mode="mtp", k=k, record_states=record)
                assert torch.equal(out, ar), "greedy mtp decoding differs from ar"
                rw, tot = rewind_share(p, mode="mtp", k=k, record_states=record)
                rows.append({"batch": batch, "decoding": f"mtp k={k}" + ("" if record else " rerun"), "seconds": t,
                             "rewind_share": rw / tot, "trunk_forwards_per_token": st["forwards"] / args.copy_tokens,
                             "acceptance_rate": st["acceptance_rate"], "rewind_forwards": st["rewind_forwards"],
                             "recorded_rewinds": st["recorded_rewinds"], "mtp_forwards": st["mtp_forwards"],
                             "rounds": st["rounds"], "copy_accuracy": float((out[:, n_prompt:] == want).float().mean())})
        if draft is not None:
            for record in (True, False):
                out, t, st = timed(p, mode="speculative", draft=draft, k=4, record_states=record)
                assert torch.equal(out, ar), "greedy speculative decoding differs from ar"
                rw, tot = rewind_share(p, mode="speculative", draft=draft, k=4, record_states=record)
                rows.append({"batch": batch, "decoding": "draft k=4" + ("" if record else " rerun"), "seconds": t,
                             "rewind_share": rw / tot,
                             "trunk_forwards_per_token": st["target_forwards"] / args.copy_tokens,
                             "acceptance_rate": st["acceptance_rate"], "rewind_forwards": st["rewind_forwards"],
                             "recorded_rewinds": st["recorded_rewinds"], "draft_forwards": st["draft_forwards"],
                             "rounds": st["rounds"], "copy_accuracy": float((out[:, n_prompt:] == want).float().mean())})
    for row in rows:
        row["tokens_per_second"] = row["batch"] * args.copy_tokens / row["seconds"]
    print(f"trained {args.steps} steps in {secs:.0f}s; last train losses: "
          + ", ".join(f"{k} {last[k]:.3f}" for k in last if k.startswith("mtp/") or k == "loss"))
    print(f"{'batch':>5} {'decoding':<16} {'copy acc':>8} {'accept':>7} {'trunk fwd/token':>15} {'seconds':>8} "
          f"{'tok/s':>8} {'rewind share':>12}")
    for row in rows:
        acc = f"{row['acceptance_rate']:.3f}" if "acceptance_rate" in row else "-"
        print(f"{row['batch']:>5} {row['decoding']:<16} {row['copy_accuracy']:>8.3f} {acc:>7} "
              f"{row['trunk_forwards_per_token']:>15.3f} {row['seconds']:>8.3f} {row['tokens_per_second']:>8.0f} "
              + (f"{row['rewind_share']:>12.3f}" if "rewind_share" in row else f"{'-':>12}"))
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    result = {"device": device, "torch": torch.__version__, "pattern": args.pattern, "d_model": d,
              "draft_pattern": args.draft_pattern if draft is not None else None,
              "parameters": model.num_parameters(), "train_seconds": round(secs, 1), "steps": args.steps,
              "last_train_metrics": last, "prompt_tokens": n_prompt,
              "new_tokens": args.copy_tokens, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
