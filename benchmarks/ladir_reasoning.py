"""LaDiR on the built-in multi-step arithmetic task (``chain_arith``): does answering through
sampled latents beat answering directly, do N Euler steps beat N / 4, what does Prophet save?

Trains, with the ``hymba train`` stack and the same backbone (``configs/ladir_tiny.yaml``):

* LaDiR: ``--ladir-stage vae`` for ``--vae-steps``, then ``--ladir-stage flow`` for
  ``--flow-steps`` (resumed, a new phase);
* the direct baseline: the same backbone as a plain next-token model on question + answer
  (``qa`` sequences, answer scored) for ``--vae-steps + --flow-steps`` steps.

On held-out questions it reports: the VAE's reconstruction accuracy of the reasoning chain
and its answer accuracy from the posterior mean (the upper bound for the flow); answer
accuracy (greedy, first answer token = the value) through latents sampled with N and N / 4
Euler steps; with Prophet on, the mean denoising steps and the accuracy; and the direct
baseline's answer accuracy. Prints a table, writes JSON with the device.

    python benchmarks/ladir_reasoning.py --vae-steps 400 --flow-steps 600
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(argv: list[str]) -> None:
    from hymba_plus.cli import main

    rc = main(argv)
    if rc != 0:
        raise SystemExit(f"hymba {' '.join(argv)} failed ({rc})")


@torch.no_grad()
def answer_accuracy(model, seg: dict, steps: int | None, prophet: bool, seed: int = 0) -> tuple[float, float]:  # noqa: ANN001
    """(accuracy of the answer value, mean denoising steps) through sampled latents."""
    lad = model.ladir
    q, qm = seg["question"], seg["question_mask"]
    z, used = lad.sample(model, q, qm, steps=steps, prophet=prophet, generator=torch.Generator().manual_seed(seed))
    logits = model(inputs_embeds=torch.cat([model.embed_tokens(q), lad.slots(z, model.dtype)], 1), input_ids=None,
                   attention_mask=torch.cat([qm, qm.new_ones(qm.shape[0], lad.cfg.memory_slots)], 1).long()).logits
    return float((logits[:, -1].argmax(-1) == seg["answer"][:, 0]).float().mean()), float(used.float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--flow-steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ladir_reasoning.json")
    args = ap.parse_args()
    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training.reasoning import ReasoningStream

    recipe_path = ROOT / "configs" / "ladir_tiny.yaml"
    r = load_recipe(recipe_path)
    common = ["--data", "chain_arith", "--batch-size", str(args.batch), "--eval-batches", "2", "--no-progress",
              "--device", args.device]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ladir"
        run(["train", str(recipe_path), "--ladir-stage", "vae", "--steps", str(args.vae_steps),
             "--eval-every", str(args.vae_steps), "--out", str(out), *common])
        total = args.vae_steps + args.flow_steps
        run(["train", str(recipe_path), "--ladir-stage", "flow", "--steps", str(total), "--eval-every", str(total),
             "--out", str(out), "--resume", *common])
        from hymba_plus.training.checkpoint import latest

        model = from_pretrained(latest(out), device=args.device).eval()
        secs = time.perf_counter() - t0
        # the direct baseline: the same backbone, next-token on question + answer
        base_recipe = {k: v for k, v in r.to_dict().items() if k not in ("objective", "ladir", "train")}
        base_recipe["name"] = "direct-answer"
        stream = ReasoningStream("chain_arith", r.model.vocab_size, seed=0)
        base = load_recipe(base_recipe)
        from hymba_plus import build_model

        direct = build_model(base).to(args.device)
        opt = torch.optim.AdamW(direct.parameters(), lr=3e-3)
        for step in range(total):
            d = stream.train(range(step * args.batch, (step + 1) * args.batch))
            loss = direct(d["qa"].to(args.device), labels=d["qa_labels"].to(args.device)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        direct.eval()
    seg = {k: v.to(args.device) for k, v in stream.eval(range(args.eval_size)).items()}
    with torch.no_grad():
        lad = model.ladir
        mu, _ = lad.encode(model, seg["question"], seg["question_mask"], seg["reasoning"], seg["reasoning_mask"])
        _, recon_acc = lad.segment_loss(model, mu, seg["question"], seg["question_mask"], seg["reasoning"],
                                        seg["reasoning_mask"])
        _, post_acc = lad.segment_loss(model, mu, seg["question"], seg["question_mask"], seg["answer"][:, :1],
                                       seg["answer_mask"][:, :1])
        n = lad.cfg.inference_steps
        acc_n, _ = answer_accuracy(model, seg, n, prophet=False)
        acc_n4, _ = answer_accuracy(model, seg, max(1, n // 4), prophet=False)
        acc_p, steps_p = answer_accuracy(model, seg, n, prophet=True)
        qa, start = seg["qa"], seg["qa_answer_start"]
        logits = direct(qa, attention_mask=seg["qa_mask"].long()).logits
        rows = torch.arange(qa.shape[0], device=qa.device)
        direct_acc = float((logits[rows, start - 1].argmax(-1) == qa[rows, start]).float().mean())
        # per position of the reasoning chain: reconstruction accuracy from the posterior mean
        M = lad.cfg.memory_slots
        q, qm, rr, rm = seg["question"], seg["question_mask"], seg["reasoning"], seg["reasoning_mask"]
        x = torch.cat([model.embed_tokens(q), lad.slots(mu, model.dtype), model.embed_tokens(rr)], 1)
        mask = torch.cat([qm, qm.new_ones(qm.shape[0], M), rm], 1).long()
        lg = model(inputs_embeds=x, input_ids=None, attention_mask=mask).logits
        pred = lg[:, q.shape[1] + M - 1:q.shape[1] + M - 1 + rr.shape[1]].argmax(-1)
        per_pos = [float(((pred[:, j] == rr[:, j]) & rm[:, j]).sum() / rm[:, j].sum().clamp(min=1))
                   for j in range(rr.shape[1])]
    res = {"vae_reconstruction_accuracy": float(recon_acc), "vae_reconstruction_by_position": per_pos, "answer_from_posterior_mean": float(post_acc),
           f"answer_via_flow_{n}_steps": acc_n, f"answer_via_flow_{max(1, n // 4)}_steps": acc_n4,
           "answer_via_flow_prophet": acc_p, "prophet_mean_steps": steps_p, "direct_answer_baseline": direct_acc,
           "chance": stream.chance}
    for k, v in res.items():
        print(f"{k:<34} " + (" ".join(f"{x:.3f}" for x in v) if isinstance(v, list) else f"{v:.3f}"))
    try:  # the figure: reconstruction by position and the answer accuracies
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(8, 3.2))
        a1.bar([f"step {j + 1}" for j in range(len(per_pos))], per_pos)
        a1.set_ylim(0, 1)
        a1.set_title("VAE: reasoning reconstructed from the latents", fontsize=8)
        names = ["posterior\nmean", f"flow\n{n} steps", f"flow\n{max(1, n // 4)} steps", "flow +\nProphet",
                 "direct"]
        vals = [res["answer_from_posterior_mean"], acc_n, acc_n4, acc_p, direct_acc]
        a2.bar(names, vals)
        a2.axhline(stream.chance, color="gray", ls="--", lw=1)
        a2.set_ylim(0, 1)
        a2.set_title("answer accuracy (dashed: chance)", fontsize=8)
        for ax in (a1, a2):
            ax.tick_params(labelsize=7)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device, "torch": torch.__version__, "recipe": str(recipe_path.name),
                                    "vae_steps": args.vae_steps, "flow_steps": args.flow_steps, "batch": args.batch,
                                    "eval_size": args.eval_size, "ladir_train_seconds": round(secs, 1),
                                    "results": res}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
