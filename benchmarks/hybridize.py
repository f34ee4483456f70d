"""Hybridize + distill on CPU: how fast does a hybrid started from a pretrained attention
model recover the model's accuracy, against a hybrid trained from scratch?

A GA-only teacher (``GA | GA | GA | GA``, d_model 64) is trained on MQAR by ``hymba train``
until it solves it (seed 0). Then, per seed (the hybrids' fresh init and data), four hybrids ``GD | GA | GD | GA`` (half the layers gdn)
train for ``--steps`` steps on the same task with the same settings:

* hybridize + distill: ``hymba convert --hybridize`` (gdn q/k/v/out from the attention
  weights; embeddings, norms, MLPs and the kept attention layers copied), then ``hymba train
  --distill`` (KL to the teacher's logits + the usual loss);
* hybridize (no attention init) + distill: the same, but the gdn layers start fresh;
* hybridize + CE only: attention init, no teacher;
* scratch: the recipe trained from a random init.

Reported: held-out MQAR accuracy every ``--eval-every`` steps (mean over seeds), the step
each arm first reaches 90% of the teacher's accuracy, JSON and a figure.

    PYTHONPATH=. python benchmarks/hybridize.py --seeds 3 --steps 60
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ATTN = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
COMPS = {"gated_attn": ATTN, "gdn": {"n_heads": 4, "head_dim": 16}, "mlp": {"d_hidden": 128}}


def recipe(pattern: str, args, steps: int, seed: int, eval_every: int, **train) -> dict:  # noqa: ANN001
    return {"name": "hybridize-bench", "model": {"vocab_size": args.vocab, "d_model": 64, "block_pattern": pattern,
                                                 "max_seq_len": 64},
            "components": dict(COMPS),
            "train": {"steps": steps, "batch_size": 64, "seq_len": args.seq_len, "mqar_pairs": args.pairs,
                      "warmup_steps": 5, "eval_every": eval_every, "eval_batches": 8, "save_every": 10_000,
                      "data": "mqar", "seed": seed, **train}}


def curve(out: Path) -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]


def run(argv: list[str], log: Path) -> None:
    import contextlib
    import io

    from hymba_plus.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = main(argv)
    log.write_text(buf.getvalue())
    if rc != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{buf.getvalue()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=60, help="training steps of every hybrid")
    ap.add_argument("--teacher-steps", type=int, default=300)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--vocab", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=16)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/hybridize_cpu.json")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest and steadiest on shared CPUs
    arms = {"hybridize + distill": ("init", True), "hybridize (fresh gdn) + distill": ("fresh", True),
            "hybridize + CE only": ("init", False), "scratch": (None, False)}
    res: dict = {"device": "cpu", "platform": platform.platform(), "torch": torch.__version__, "args": vars(args),
                 "teacher": [], "arms": {a: [] for a in arms}}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "teacher.yaml").write_text(json.dumps(recipe("GA | GA | GA | GA", args, args.teacher_steps, 0,
                                                             args.teacher_steps)))
        run(["train", str(root / "teacher.yaml"), "--out", str(root / "t"), "--no-progress"], root / "t.log")
        teacher_ckpt = root / "t" / f"step-{args.teacher_steps}"
        res["teacher"].append(curve(root / "t")[-1][1])
        print(f"teacher: accuracy {res['teacher'][-1]:.3f} after {args.teacher_steps} steps", flush=True)
        for seed in range(args.seeds):  # one teacher; the hybrids' init and data differ per seed
            d = root / f"seed{seed}"
            d.mkdir()
            for arm, (init, distill) in arms.items():
                a = d / arm.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "p")
                a.mkdir()
                (a / "hybrid.yaml").write_text(json.dumps(recipe("GD | GA | GD | GA", args, args.steps, seed,
                                                                 args.eval_every)))
                start = str(a / "hybrid.yaml")
                if init is not None:
                    flags = ["--no-attention-init"] if init == "fresh" else []
                    run(["convert", str(teacher_ckpt), str(a / "h"), "--hybridize", start, "--seed", str(seed),
                         *flags], a / "h.log")
                    start = str(a / "h")
                extra = ["--distill", str(teacher_ckpt)] if distill else []
                run(["train", start, "--out", str(a / "run"), "--no-progress", *extra], a / "run.log")
                res["arms"][arm].append(curve(a / "run"))
            print(f"seed {seed}: " + ", ".join(f"{arm} {res['arms'][arm][-1][-1][1]:.3f}" for arm in arms), flush=True)
    teacher = sum(res["teacher"]) / len(res["teacher"])
    summary = {}
    for arm, curves in res["arms"].items():
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        reach = next((s for s, m in zip(steps, mean) if m >= 0.9 * teacher), None)
        summary[arm] = {"steps": steps, "mean_accuracy": mean, "steps_to_90pct_teacher": reach}
    res["summary"] = {"teacher_accuracy": teacher, "arms": summary, "seconds": time.time() - t0}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    marks = [s for s in (10, 20, 30, args.steps) if s in summary["scratch"]["steps"]]
    print(f"\nteacher (GA x4, {args.teacher_steps} steps): accuracy {teacher:.3f}")
    print(f"{'arm':34s}" + "".join(f"  step {s:>3d}" for s in marks) + "  steps to 90% of teacher")
    for arm, s in summary.items():
        accs = [s["mean_accuracy"][s["steps"].index(m)] for m in marks]
        print(f"{arm:34s}" + "".join(f"  {x:8.3f}" for x in accs) + f"  {s['steps_to_90pct_teacher'] or '-'}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for arm, s in summary.items():
        ax.plot(s["steps"], s["mean_accuracy"], "o-", ms=3, label=arm)
    ax.axhline(teacher, color="k", ls="--", lw=1, label="teacher (GA x4)")
    ax.axhline(1 / (args.vocab - args.vocab // 2), color="gray", ls=":", lw=1, label="chance")
    ax.set_xlabel("training steps of the hybrid (GD | GA | GD | GA)")
    ax.set_ylabel("MQAR accuracy (held out)")
    ax.set_title(f"hybridize + distill vs scratch, CPU, mean of {args.seeds} seeds")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
