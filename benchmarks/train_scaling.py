"""Training throughput of ``hymba train`` on 1..N GPUs (FSDP2 under torchrun).

    python benchmarks/train_scaling.py                       # 1 and 2 GPUs, built-in recipe
    python benchmarks/train_scaling.py --nproc 1 2 4 --recipe configs/quad_hybrid_tiny.yaml \
        --batch-size 16 --seq-len 1024 --steps 30 --out bench_train.json

For each process count it runs ``torchrun --standalone --nproc-per-node N -m hymba_plus
train RECIPE ...`` (weak scaling: ``--batch-size`` sequences per GPU), reads the run's
``metrics.jsonl`` and takes the median ``tokens_per_s`` (global tokens per second of one
optimizer step) over the second half of the steps, so start-up and warm-up do not count.
Prints a table and writes JSON with the device name, the per-count throughput and the
scaling efficiency ``tps(N) / (N * tps(1))``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

DEFAULT_RECIPE = {
    "name": "scaling-bench",
    "model": {"vocab_size": 4096, "d_model": 512, "max_seq_len": 2048, "block_pattern": "(GD | GD | GA)*2",
              "ffn": "mlp", "meta_tokens": 0},
    "components": {"gated_attn": {"n_heads": 8, "n_kv_heads": 4, "head_dim": 64},
                   "gdn": {"n_heads": 8, "head_dim": 64}, "mlp": {"d_hidden": 1536}},
}


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_one(nproc: int, recipe: str, args: argparse.Namespace, work: Path) -> dict:
    out = work / f"run-{nproc}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "hymba_plus", "train", recipe, "--out", str(out), "--steps", str(args.steps),
           "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--data", args.data,
           "--eval-every", str(10 * args.steps), "--save-every", str(10 * args.steps), "--warmup", "2",
           "--device", args.device, "--no-progress"]
    if args.compile:
        cmd.append("--compile")
    if args.fsdp_param_dtype:
        cmd += ["--fsdp-param-dtype", args.fsdp_param_dtype]
    path = os.environ.get("PYTHONPATH")  # keep fast-path packages installed with --target (gpu_env.sh)
    env = dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(f"train_scaling: {nproc} process(es) failed (exit {r.returncode})")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    tail = [r["tokens_per_s"] for r in rows[len(rows) // 2 :]]
    return {"nproc": nproc, "tokens_per_s": statistics.median(tail), "steps": len(rows),
            "final_loss": rows[-1]["loss"], "tokens_per_step": args.batch_size * args.seq_len * nproc}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", help="recipe YAML (default: a 6-layer GD/GA model, d_model 512)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per GPU")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--data", default="mqar")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--fsdp-param-dtype", choices=("float32", "bfloat16"), default=None,
                    help="hymba train --fsdp-param-dtype (several processes: bf16 gathered parameters, float32 "
                         "gradient reduce)")
    ap.add_argument("--out", default="bench_train_scaling.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hymba-scaling-") as tmp:
        work = Path(tmp)
        recipe = args.recipe
        if recipe is None:
            recipe = str(work / "recipe.yaml")
            Path(recipe).write_text(yaml.safe_dump(DEFAULT_RECIPE, sort_keys=False))
        results = [run_one(n, recipe, args, work) for n in args.nproc]
    base = next((r["tokens_per_s"] for r in results if r["nproc"] == 1), None)
    for r in results:
        r["speedup"] = r["tokens_per_s"] / base if base else None
        r["efficiency"] = r["speedup"] / r["nproc"] if base else None
    report = {"device": device_name(), "recipe": args.recipe or DEFAULT_RECIPE, "batch_size_per_gpu": args.batch_size,
              "seq_len": args.seq_len, "steps": args.steps, "compile": args.compile,
              "fsdp_param_dtype": args.fsdp_param_dtype or "float32", "results": results}
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\ndevice: {report['device']}")
    print(f"{'procs':>5} {'tokens/s':>12} {'speedup':>8} {'efficiency':>10}")
    for r in results:
        sp = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        ef = f"{r['efficiency']:.0%}" if r["efficiency"] else "-"
        print(f"{r['nproc']:>5} {r['tokens_per_s']:>12,.0f} {sp:>8} {ef:>10}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
