"""LaDiR on the built-in reasoning tasks (``chain_arith`` / ``chain_pointer``): does answering
through sampled latents beat answering directly, do N Euler steps beat N / 4, what does
Prophet save?

Trains, with the ``hymba train`` stack and the same backbone (``configs/ladir_tiny.yaml``,
``--denoiser-layers`` / ``--latent-dim`` / ``--inference-steps`` override its ladir section):

* LaDiR: ``--ladir-stage vae`` for ``--vae-steps``, then ``--ladir-stage flow`` for
  ``--flow-steps`` (resumed, a new phase);
* the direct baseline: the same backbone as a plain next-token model on question + answer
  (``qa`` sequences, answer scored) for ``--vae-steps + --flow-steps`` steps (``--part``
  runs either alone, so the two can run as parallel processes).

On held-out questions it reports: the VAE's reconstruction accuracy of the reasoning chain
and its answer accuracy from the posterior mean (the upper bound for the flow); by Euler
steps (1, N/4, N/2, N, 4N, from the same noise): answer accuracy (greedy answer value), the
latents' squared error against the posterior means and against the 4N-step solution of the
ODE (both relative to the latents' spread); Prophet's mean steps and accuracy at the
recipe's thresholds times each ``--prophet-scales``; the direct baseline's accuracy. Prints a
table, writes JSON with the device (and a PNG next to it).

    python benchmarks/ladir_reasoning.py --task chain_arith --chain-steps 2 --vae-steps 300 \
        --flow-steps 1200 --batch 64
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
def answer_from(model, seg: dict, z: torch.Tensor) -> float:  # noqa: ANN001
    """Accuracy of the answer value (greedy first answer token) after [question, slots(z)]."""
    lad = model.ladir
    q, qm = seg["question"], seg["question_mask"]
    logits = model(inputs_embeds=torch.cat([model.embed_tokens(q), lad.slots(z, model.dtype)], 1), input_ids=None,
                   attention_mask=torch.cat([qm, qm.new_ones(qm.shape[0], lad.cfg.memory_slots)], 1).long()).logits
    return float((logits[:, -1].argmax(-1) == seg["answer"][:, 0]).float().mean())


def latent_error(z: torch.Tensor, mu: torch.Tensor) -> float:
    """Mean squared distance of sampled latents from the posterior means of the true
    reasoning, relative to the spread of those means (1.0 = no better than their average)."""
    return float((z - mu).pow(2).mean() / (mu - mu.mean(0, keepdim=True)).pow(2).mean())


def direct_baseline(d: dict, stream, args, total: int, seg: dict) -> float:  # noqa: ANN001
    """The same backbone as a plain next-token model on question + answer, trained on as many
    examples as LaDiR saw; its greedy answer accuracy on ``seg``."""
    from hymba_plus import build_model, load_recipe

    base_recipe = {k: v for k, v in d.items() if k not in ("objective", "ladir", "train")}
    base_recipe["name"] = "direct-answer"
    direct = build_model(load_recipe(base_recipe)).to(args.device)
    opt = torch.optim.AdamW(direct.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=total, pct_start=0.02)
    for step in range(total):
        dd = stream.train(range(step * args.batch, (step + 1) * args.batch))
        loss = direct(dd["qa"].to(args.device), labels=dd["qa_labels"].to(args.device)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    direct.eval()
    with torch.no_grad():
        qa, start = seg["qa"], seg["qa_answer_start"]
        logits = direct(qa, attention_mask=seg["qa_mask"].long()).logits
        rows = torch.arange(qa.shape[0], device=qa.device)
        return float((logits[rows, start - 1].argmax(-1) == qa[rows, start]).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="chain_arith", choices=("chain_arith", "chain_pointer"))
    ap.add_argument("--chain-steps", type=int, default=None, help="operations / hops (default: the task's)")
    ap.add_argument("--chain-values", type=int, default=None, help="modulus / nodes (default: the task's)")
    ap.add_argument("--vae-steps", type=int, default=400)
    ap.add_argument("--flow-steps", type=int, default=600)
    ap.add_argument("--flow-muon-lr", type=float, default=None, help="Muon lr of the flow stage (default: the recipe's)")
    ap.add_argument("--denoiser-layers", type=int, default=None, help="override ladir.denoiser_layers")
    ap.add_argument("--latent-dim", type=int, default=None, help="override ladir.latent_dim")
    ap.add_argument("--inference-steps", type=int, default=None, help="override ladir.inference_steps (N)")
    ap.add_argument("--prophet-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0],
                    help="Prophet runs with the recipe's thresholds times each scale")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--part", choices=("both", "ladir", "direct"), default="both",
                    help="train LaDiR, the direct baseline, or both (run the parts as two processes in parallel)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ladir_reasoning.json")
    args = ap.parse_args()
    import dataclasses

    import yaml

    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training.checkpoint import latest
    from hymba_plus.training.reasoning import ReasoningStream

    torch.manual_seed(args.seed)
    base_path = ROOT / "configs" / "ladir_tiny.yaml"
    r = load_recipe(base_path)
    d = r.to_dict()
    for key, val in (("denoiser_layers", args.denoiser_layers), ("latent_dim", args.latent_dim),
                     ("inference_steps", args.inference_steps)):
        if val is not None:
            d["ladir"][key] = val
    task_flags = [flag for flag, v in (("--chain-steps", args.chain_steps), ("--chain-values", args.chain_values))
                  if v is not None for flag in (flag, str(v))]
    common = ["--data", args.task, *task_flags, "--batch-size", str(args.batch), "--eval-batches", "2",
              "--no-progress", "--device", args.device, "--seed", str(args.seed)]
    params = {k: v for k, v in zip(("steps", "modulus") if args.task == "chain_arith" else ("hops", "nodes"),
                                   (args.chain_steps, args.chain_values)) if v is not None}
    stream = ReasoningStream(args.task, r.model.vocab_size, seed=args.seed, **params)
    total = args.vae_steps + args.flow_steps
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu ({platform.machine()})"
    # the held-out questions (never trained on; fewer than --eval-size where the task has few questions)
    args.eval_size = min(args.eval_size, stream.n_eval())
    seg = {k: v.to(args.device) for k, v in stream.eval(range(args.eval_size)).items()}
    meta = {"device": device, "torch": torch.__version__, "recipe": d, "task": args.task, "task_params": stream.params,
            "vae_steps": args.vae_steps, "flow_steps": args.flow_steps, "flow_muon_lr": args.flow_muon_lr,
            "batch": args.batch, "eval_size": args.eval_size, "seed": args.seed, "part": args.part}
    if args.part == "direct":
        direct_acc = direct_baseline(d, stream, args, total, seg)
        print(f"direct answer (same backbone, {total * args.batch} examples): {direct_acc:.3f}; "
              f"chance {stream.chance:.3f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**meta, "results": {"direct_answer_baseline": direct_acc,
                                                            "chance": stream.chance}}, indent=1))
        return
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        recipe_path = Path(tmp) / "ladir.yaml"
        recipe_path.write_text(yaml.safe_dump(d, sort_keys=False))
        out = Path(tmp) / "ladir"
        run(["train", str(recipe_path), "--ladir-stage", "vae", "--steps", str(args.vae_steps),
             "--eval-every", str(args.vae_steps), "--out", str(out), *common])
        lr = ["--muon-lr", str(args.flow_muon_lr)] if args.flow_muon_lr else []
        run(["train", str(recipe_path), "--ladir-stage", "flow", "--steps", str(total), "--eval-every", str(total),
             "--out", str(out), "--resume", *lr, *common])
        model = from_pretrained(latest(out), device=args.device).eval()
        secs = time.perf_counter() - t0
    direct_acc = direct_baseline(d, stream, args, total, seg) if args.part == "both" else None
    lad = model.ladir
    n = lad.cfg.inference_steps
    with torch.no_grad():
        mu, _ = lad.encode(model, seg["question"], seg["question_mask"], seg["reasoning"], seg["reasoning_mask"])
        _, recon_acc = lad.segment_loss(model, mu, seg["question"], seg["question_mask"], seg["reasoning"],
                                        seg["reasoning_mask"], kind="reasoning")
        _, post_acc = lad.segment_loss(model, mu, seg["question"], seg["question_mask"], seg["answer"][:, :1],
                                       seg["answer_mask"][:, :1], kind="answer")
        q, qm = seg["question"], seg["question_mask"]
        z0 = lad.cfg.init_noise_scale * torch.randn(q.shape[0], lad.cfg.memory_slots, lad.cfg.latent_dim,
                                                    generator=torch.Generator().manual_seed(1)).to(args.device)
        z_ref, _ = lad.sample(model, q, qm, steps=4 * n, prophet=False, z0=z0)  # the ODE, nearly exact
        by_steps = {}
        for s_ in sorted({1, max(1, n // 4), max(1, n // 2), n, 4 * n}):
            z, _ = lad.sample(model, q, qm, steps=s_, prophet=False, z0=z0)
            by_steps[s_] = {"answer_accuracy": answer_from(model, seg, z), "latent_error": latent_error(z, mu),
                            "ode_error_vs_4n": latent_error(z, z_ref)}
        prophet = []
        base_cfg = lad.cfg
        for scale in args.prophet_scales:
            th = tuple(scale * t for t in base_cfg.prophet.thresholds)
            lad.cfg = dataclasses.replace(base_cfg, prophet=dataclasses.replace(base_cfg.prophet, thresholds=th))
            z, used = lad.sample(model, q, qm, steps=n, prophet=True, z0=z0)
            prophet.append({"thresholds": list(th), "answer_accuracy": answer_from(model, seg, z),
                            "mean_steps": float(used.float().mean()), "latent_error": latent_error(z, mu)})
        lad.cfg = base_cfg
        # per position of the reasoning chain: reconstruction accuracy from the posterior mean
        M = lad.cfg.memory_slots
        rr, rm = seg["reasoning"], seg["reasoning_mask"]
        x = torch.cat([model.embed_tokens(q), lad.slots(mu, model.dtype, "reasoning"), model.embed_tokens(rr)], 1)
        mask = torch.cat([qm, qm.new_ones(qm.shape[0], M), rm], 1).long()
        lg = model(inputs_embeds=x, input_ids=None, attention_mask=mask).logits
        pred = lg[:, q.shape[1] + M - 1:q.shape[1] + M - 1 + rr.shape[1]].argmax(-1)
        per_pos = [float(((pred[:, j] == rr[:, j]) & rm[:, j]).sum() / rm[:, j].sum().clamp(min=1))
                   for j in range(rr.shape[1])]
    res = {"vae_reconstruction_accuracy": float(recon_acc), "vae_reconstruction_by_position": per_pos,
           "answer_from_posterior_mean": float(post_acc),
           "flow_by_steps": {str(k): v for k, v in by_steps.items()},
           "prophet": prophet, "direct_answer_baseline": direct_acc, "chance": stream.chance}
    print(f"{args.task} {params or '(defaults)'}: VAE reconstruction {recon_acc:.3f} "
          f"(by position {' '.join(f'{x:.2f}' for x in per_pos)}), answer from posterior mean {post_acc:.3f}")
    print(f"{'Euler steps':>12} {'answer acc':>10} {'latent err':>10} {'ODE err':>8}")
    for k, v in by_steps.items():
        print(f"{k:>12} {v['answer_accuracy']:>10.3f} {v['latent_error']:>10.3f} {v['ode_error_vs_4n']:>8.4f}")
    for p_ in prophet:
        print(f"Prophet {'/'.join(f'{t:g}' for t in p_['thresholds'])}: {p_['mean_steps']:.1f} of {n} steps, "
              f"answer acc {p_['answer_accuracy']:.3f}")
    if direct_acc is not None:
        print(f"direct answer (same backbone, {total * args.batch} examples): {direct_acc:.3f}; "
              f"chance {stream.chance:.3f}")
    try:  # the figure: reconstruction by position and the answer accuracies
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
        a1.bar([f"step {j + 1}" for j in range(len(per_pos))], per_pos)
        a1.set_ylim(0, 1)
        a1.set_title("VAE: reasoning reconstructed from the latents", fontsize=8)
        names = ["posterior\nmean"] + [f"flow\n{k} st." for k in by_steps] + ["Prophet\nx" + f"{s:g}" for s in
                                                                              args.prophet_scales] + ["direct"] * (direct_acc is not None)
        vals = ([res["answer_from_posterior_mean"]] + [v["answer_accuracy"] for v in by_steps.values()]
                + [p_["answer_accuracy"] for p_ in prophet] + [direct_acc] * (direct_acc is not None))
        a2.bar(names, vals)
        a2.axhline(stream.chance, color="gray", ls="--", lw=1)
        a2.set_ylim(0, 1)
        a2.set_title("answer accuracy (dashed: chance)", fontsize=8)
        for ax in (a1, a2):
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        fig.savefig(args.out.with_suffix(".png"), dpi=120)
    except ImportError:
        pass
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**meta, "ladir_train_seconds": round(secs, 1), "results": res}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
