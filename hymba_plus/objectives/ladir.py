"""The LaDiR training objective (``objective: {kind: ladir}``; the model needs the recipe's
``ladir`` section, ``components/ladir.py``), on reasoning data: a built-in task
(``--data chain_arith`` / ``chain_pointer``, ``training/reasoning.py``) or a JSONL file of
``{question, reasoning, answer}``; without ``--data`` (or ``train.data``), ``chain_arith``.

The stage is a run setting (``train.ladir_stage`` / ``--ladir-stage``), so one run can train
the VAE and a resumed one the flow:

* ``vae``: the LM and the VAE heads on reconstruction (reasoning and answer after the
  sampled slots) + beta * KL; the denoiser is untouched;
* ``flow``: the denoiser alone on the rectified-flow loss (the LM and the VAE are read, in eval
  mode as at inference: no dropout; so are they for the flow loss of ``joint``);
* ``joint``: both losses, summed.

Under gradient accumulation every micro-batch weighs alike (``Objective.train_items``' default, its
rows): the loss sums means over other denominators (reasoning tokens, answer tokens, rows for the
KL, draws x rows x slots x latent dims for the flow), which a token count would reweigh against each other.

Held-out: the stage's loss; ``eval_accuracy`` is the answer value's (a row counts when every
answer token but the end token that closes it, ``value_mask``, is right: the built-in tasks'
one value token, whose chance is the stream's ``chance``, 1 / modulus for ``chain_arith``),
teacher-forced after the slots of the posterior mean (``vae``) or of latents sampled by the
flow without Prophet, guided by the recipe's ``cfg_scale`` (``flow`` / ``joint``), so it measures answering *through* the latents;
``eval_answer_token_accuracy`` is the accuracy over every answer token, the end token included
(which a model learns at once: at chance on the value it is ~0.55 on ``chain_arith``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core.config import spec
from ..core.registry import register
from .base import Objective


@dataclass(frozen=True)
class LaDiRObjectiveConfig:
    kind: str = spec("ladir", choices=("ladir",))


@register("ladir_objective", config=LaDiRObjectiveConfig, kind="objective")
class LaDiRObjective(Objective):
    needs_segments = True  # the stream must give question / reasoning / answer segments
    # --compile: no ``core`` past the noise draws (the VAE's latent noise is drawn from the encoder's
    # output between the model's calls, inside components/ladir.py; evaluation seeds a generator per row)
    eager_because = graph_because = "its losses call the model several times per step"
    phase_settings = ("ladir_stage",)  # each stage trains other parameters
    default_data = "chain_arith"  # reasoning data: a next-token task (mqar) has no segments to read

    @staticmethod
    def segment_reserve(recipe: Any) -> int:
        """The memory slots: the encoder reads [question, reasoning, slots], the decoder
        [question, slots, reasoning or answer]."""
        return recipe.ladir.memory_slots if recipe.ladir is not None else 0

    def __init__(self, cfg: LaDiRObjectiveConfig, **_: Any):
        super().__init__()
        self.cfg = cfg
        self.stage = "joint"

    def configure(self, train_cfg: Any) -> None:
        self.stage = train_cfg.ladir_stage

    def train_forward(self, fwd, model, ids: Tensor, labels: Tensor, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        from ..models.lm import ModelOutput

        seg = {k: v.to(ids.device) for k, v in batch.segments.items()}
        lad = model.ladir
        losses, stats = [], {}
        if self.stage in ("vae", "joint"):
            loss, st = lad.vae_loss(model, seg)
            losses.append(loss)
            stats.update(st)
        if self.stage in ("flow", "joint"):
            loss, st = lad.flow_loss(model, seg)
            losses.append(loss)
            stats.update(st)
        aux = stats.pop("aux_loss", None)  # the LM's MoE losses of the vae passes, already in the loss
        return ModelOutput(logits=ids.new_zeros(0), loss=torch.stack(losses).sum(), stats=stats,
                           aux_loss=None if aux is None else aux.detach())

    @torch.no_grad()
    def eval_batch(self, fwd, model, ids: Tensor, labels: Tensor, seed: int, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """(loss, correct and scored answer tokens, output) of one held-out batch whose first row
        is held-out example ``seed``: each row draws its noise from a generator seeded by its own
        index and the loss is the mean of the rows' losses, so an evaluation does not depend on
        how the held-out examples are cut into batches or spread over ranks; the rows that
        repeat earlier ones to fill a batch (``batch.rows``) are run (every rank makes the same
        calls) but not scored (NaN loss for a batch of repeats only, which the trainer weighs 0)."""
        from ..models.lm import ModelOutput

        seg = {k: v.to(ids.device) for k, v in batch.segments.items()}
        lad = model.ladir
        n = batch.rows
        g = [torch.Generator(device=ids.device).manual_seed(seed + i) for i in range(ids.shape[0])]
        q, qm = seg["question"], seg["question_mask"]
        if self.stage == "vae":
            loss, _ = lad.vae_loss(model, seg, generator=g, per_row=True)
            z, _ = lad.encode(model, q, qm, seg["reasoning"], seg["reasoning_mask"])
        else:
            loss, _ = lad.flow_loss(model, seg, generator=g, per_row=True)
            if self.stage == "joint":
                loss = loss + lad.vae_loss(model, seg, generator=g, per_row=True)[0]
            z, _ = lad.sample(model, q, qm, prophet=False, generator=g)
        am = seg["answer_mask"]
        _, hits = lad.segment_loss(model, z, q, qm, seg["answer"], am, kind="answer", per_row=True)
        vm = seg.get("value_mask", am)[:n]  # (without one, e.g. a collate of another caller's: the whole answer)
        hits, am = hits[:n], am[:n]
        valued = vm.any(1)
        right = int(((hits | ~vm).all(1) & valued).sum())
        stats = {"answer_tokens_correct": int(hits.sum()), "answer_tokens": int(am.sum())}
        return float(loss[:n].mean()), right, int(valued.sum()), ModelOutput(logits=ids.new_zeros(0), stats=stats)

    def eval_sums(self, out: Any) -> dict[str, float]:
        return {k: float(out.stats[k]) for k in ("answer_tokens_correct", "answer_tokens")}

    def eval_results(self, sums: dict[str, float]) -> dict[str, float]:
        return {"answer_token_accuracy": sums["answer_tokens_correct"] / max(sums["answer_tokens"], 1.0)}
