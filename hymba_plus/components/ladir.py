"""Latent diffusion reasoning (LaDiR: Kang et al., "LaDiR: Latent Diffusion Enhances LLMs for
Text Reasoning", arXiv 2510.04573), with Prophet early exit (Li et al., "Diffusion Language
Models Know the Answer Before Decoding", arXiv 2508.19982).

The model thinks in ``memory_slots`` continuous vectors before it answers:

* **VAE** (LaDiR §3.1). Encoder: the language model reads ``[question, reasoning, M memory
  embeddings]``; its final hidden states at the M memory positions give each slot's
  posterior ``mu, log sigma^2`` (``latent_dim`` each, one Linear). Decoder: a latent
  ``z`` becomes M slot embeddings (one Linear to ``d_model``, plus a learned embedding of what
  the decoder is to write: ``marks``, one for the reasoning, one for the answer) placed after
  the question; the same LM reconstructs the reasoning after ``slots_r(z)`` and answers after
  ``slots_a(z)``:
  ``L_vae = CE(reasoning | q, slots_r(z)) + CE(answer | q, slots_a(z)) + beta_kl *
  KL(q(z | q, r) || N(0, I))`` (KL summed over ``latent_dim``, averaged over slots and rows, the
  KL of each slot's Gaussian; LaDiR's code averages over every element too, ``vae/model_vae.py``'s
  ``-0.5 * mean(...)``, so its ``beta_kl`` is ``latent_dim`` times ours: 0.3 there ~ 0.3 / 128 here).
  Without the marks both targets continue the same input and the LM learns a mixture of
  their first tokens. Deliberate differences from the paper: the decoder is this LM, trained,
  conditioned on the question (LaDiR's is a frozen copy of the base LLM reading only the latents), and the
  whole reasoning is one latent block of M slots (LaDiR encodes one block per reasoning
  segment). Latent-noise augmentation
  (``latent_noise``, default 0: off, as every measured run): in training the decoder reads
  ``z + latent_noise * eps'`` (LaDiR's code, ``vae/model_vae.py`` ``forward``: ``if self.training:``
  0.3 times N(0, I) on the reparameterized draw, the KL on the posterior as it is; its
  ``_compress(return_sample="sample")`` does the same, a branch its flow training leaves commented
  out), so the decoder learns to read latents a little off the posterior's, as the flow's are.
* **Flow matching** (LaDiR §3.2, rectified flow: Liu et al. 2022, arXiv 2209.03003): a
  *dedicated* denoiser ``v_theta(z_t, t, question)`` — a small bidirectional transformer over
  ``[question hidden states, M latent tokens]`` (``denoiser_layers``) — learns the velocity
  ``z_1 - z_0`` on ``z_t = (1 - t) z_0 + t z_1``, ``z_0 ~ N(0, I)``, ``z_1`` drawn from the VAE's
  posterior for the reasoning (by choice: the latents the decoder was trained on; LaDiR's code
  takes the posterior mean, ``flow_target: mean``), ``t ~ U(0, 1)``;
  ``L_flow = || v_theta - (z_1 - z_0) ||^2``, averaged over ``flow_draws`` draws of ``(z_0, t)``
  per encoded latent (8, as LaDiR's code).
  Why a dedicated stack rather than the backbone with latent inputs (the paper's choice):
  sampling runs ``inference_steps`` denoiser calls, and here each is a few small layers
  over the question's *cached* hidden states instead of a full backbone pass; the
  question conditions it through attention over those states. Sampling: ``inference_steps``
  Euler steps from ``init_noise_scale`` times N(0, I) (1: the flow's own start; LaDiR's code
  starts its sampler at 2.5, wider than the N(0, I) it trains from), ``samples`` latents per
  question in parallel.
* **Diversity guidance** (LaDiR's code: ``denoise_with_reward_guidance_and_diversity``,
  ``distance_grad``, ``median_bandwidth_latent``, ``model.py``), ``diversity_scale`` gamma (default 0:
  off, the sampler unchanged bit for bit): at every Euler step each sample's velocity becomes
  ``v_i + gamma * 2 sum_j exp(-u_ij / sigma^2) (1 - u_ij / sigma^2) (x_i - x_j)``, ``u_ij = ||x_i - x_j||^2``,
  the gradient of ``sum_{j != i} f(u_ij)``, ``f(u) = u exp(-u / sigma^2)``, over the other samples j of
  the same question (each sample's M x latent point one vector; ``repulsion``): pairs nearer than sigma
  are pushed apart, farther ones drawn in, so near-duplicate reasonings separate. sigma:
  ``diversity_bandwidth``, or (0, the code's) each step's median distance between the question's
  samples (with 2 samples the pair then sits at f's peak and feels ~nothing). x: each sample's
  estimate of z_1, ``z_t + (1 - t) v`` (where it is headed; ``diversity_target: estimate``, by choice),
  or its velocity (``velocity``, the code's ``model_pred``, which in its flow convention, noise - data,
  gives this same update): on a field that draws the samples together (v = c - z) repelling the
  velocities under the median bandwidth draws the samples closer (tested). Differences from the code: its ``distance_grad``
  pairs the M thought tokens *within* each sample (its batch being one question's samples), here the
  samples; its scale decays as ``0.1 + (gamma - 0.1) (t / T)^2`` from the noise end (T) to 0.1,
  constant at its default gamma = 0.1, here constant gamma. Only rows Prophet has not stopped
  interact; the kick is deterministic, so per-row generators give each row its start as before.
* **Classifier-free guidance** (Ho & Salimans 2022, arXiv 2207.12598, Eq. 6, on velocities;
  LaDiR's code: ``text_drop_prob``, ``fake_input_embed``, ``inference_step``, ``model.py``): with
  ``cfg_dropout`` p (default 0: off) a row of the flow loss sees, in training, the null condition
  (``null_mask``: the question's states masked out of the denoiser's attention) with probability p;
  with ``cfg_scale`` w (default 1: the sampler unchanged bit for bit) every Euler step takes
  ``v = v_uncond + w (v_cond - v_uncond)`` from one denoiser call over the rows doubled; the diversity
  kick and Prophet act on that v. w != 1 needs p > 0 (refused otherwise).
* **Answering**: the answer slots ``slots_a(z)`` of a sampled ``z`` enter the ``HybridCache``
  once, after the question (``forward(inputs_embeds=...)``, like meta tokens), and the LM
  decodes the answer after them; a cached answer equals the full forward over ``[question,
  slots, answer]``.
* **Prophet**: every ``check_every`` steps, the current estimate ``z_1 ~= z_t + (1 - t) v``
  is decoded through the LM (on a fork of the question's cache) and the gap between the
  top-1 and top-2 logits of the answer's first token (Prophet averages the gap over the first
  5 answer positions) is compared with the threshold of the current third of the schedule
  (``thresholds``: 7.5 / 5.0 / 2.5 by default; thirds exactly, where Prophet's code cuts at
  progress 0.33 and 0.67, so a check at exactly 2/3 is in the last third here); a row whose gap
  passes stops denoising there and keeps that estimate as its latent (as Prophet decodes every
  remaining token from its current prediction). The steps used are reported.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import HybridCache
from ..core.recompute import Checkpointing, run_block
from ..core.registry import register
from ..kernels.dispatch import compute_dtype

TARGETS = ("reasoning", "answer")  # the decoder's marks, in the order of ``LaDiR.marks``

# one generator for the batch, or one per row (held-out evaluation: a row's noise is then its own,
# whatever rows share its batch), or None (the global generator)
Generators = torch.Generator | Sequence[torch.Generator] | None


def noise(draw: Callable[..., Tensor], shape: tuple[int, ...], device: torch.device, generator: Generators,
          dtype: torch.dtype | None = None) -> Tensor:
    """``draw`` (``torch.randn`` / ``torch.rand``) of ``shape`` [B, ...]; with one generator per row,
    row b's values come from generator b alone (a loop over the rows of a held-out batch)."""
    if isinstance(generator, Sequence):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for {shape[0]} rows")
        return torch.stack([draw(tuple(shape[1:]), device=device, generator=g, dtype=dtype) for g in generator])
    return draw(tuple(shape), device=device, generator=generator, dtype=dtype)


#: the sampler's settings a call may override (``LaDiR.sample``, ``generate(mode="ladir")``, ``hymba generate``'s
#: flags): each one's rule as its recipe field's (``core/recipe.py`` ``LaDiRConfig``): (least, strictly greater)
#: for the numbers, the choices for ``diversity_target``
SAMPLER_SETTINGS: dict[str, tuple[float, bool] | tuple[str, ...]] = {
    "cfg_scale": (0.0, False), "diversity_scale": (0.0, False), "diversity_bandwidth": (0.0, False),
    "diversity_target": ("estimate", "velocity"), "init_noise_scale": (0.0, True)}


def sampler_settings(cfg: Any, **given: Any) -> dict[str, Any]:
    """The sampler's settings for one call: each of ``SAMPLER_SETTINGS`` as ``given`` (None: the recipe's,
    ``cfg`` a ``LaDiRConfig``), refused in one line (``ValueError``) where the recipe would refuse it: a number
    outside its field's range, not finite or past float32's range (a bool is no number), a ``diversity_target`` not among its
    choices, and ``cfg_scale`` != 1 when the recipe has no ``cfg_dropout`` (classifier-free guidance reads
    the unconditional velocity, which only condition dropout trains: Ho & Salimans 2022, arXiv 2207.12598)."""
    import numbers

    from ..core.config import FLOAT_MAX, brief

    out = {}
    for name, rule in SAMPLER_SETTINGS.items():
        v = given.pop(name, None)
        if v is None:
            v = getattr(cfg, name)
        elif isinstance(rule[0], str):
            if v not in rule:
                raise ValueError(f"{name} must be {' or '.join(map(repr, rule))} (as ladir.{name} in a recipe), "
                                 f"got {brief(v)}")
        else:
            least, strict = rule
            if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)
                    or (v <= least if strict else v < least)):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {least:g} (a finite number, as "
                                 f"ladir.{name} in a recipe), got {brief(v)}")
            if abs(v) > FLOAT_MAX:  # (range_errors' bound on a recipe's float: the sampler's tensors are float32)
                raise ValueError(f"{name} must be within float32's range (magnitude <= {FLOAT_MAX:.4g}, as "
                                 f"ladir.{name} in a recipe), got {brief(v)}")
            v = float(v)
        out[name] = v
    if given:
        raise TypeError(f"sampler_settings: no setting {', '.join(map(repr, given))}")
    if out["cfg_scale"] != 1.0 and cfg.cfg_dropout == 0.0:
        raise ValueError(f"cfg_scale {out['cfg_scale']:g} guides with the unconditional velocity, which the "
                         "denoiser learns only with ladir.cfg_dropout > 0 (0 in this recipe)")
    return out


@contextmanager
def reading(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode (no dropout, MoE capacity drops or balancing counts: as inference
    runs it) for a read that trains nothing, each module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of t in [0, 1] (scaled to 1000 as in diffusion practice), in float32
    (float64 for a float64 t)."""
    half = dim // 2
    cd = compute_dtype(t)
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=cd) / max(half, 1))
    ang = 1000.0 * t.to(cd)[:, None] * freqs[None]
    emb = torch.cat([ang.sin(), ang.cos()], dim=-1)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class FlowDenoiser(nn.Module):
    """v_theta(z_t, t | question): a bidirectional transformer over [question states, latents]."""

    def __init__(self, latent_dim: int, d_model: int, layers: int, heads: int, slots: int, max_len: int):
        super().__init__()
        self.cond = nn.Linear(d_model, d_model)
        # which slot a latent token is and where a question state sits: without them the latent
        # tokens are exchangeable (slot i could only learn the mean over slots)
        self.slot = nn.Parameter(torch.randn(slots, d_model) * 0.02)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.inp = nn.Linear(latent_dim, d_model)
        self.time = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Linear(d_model, d_model))
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.stack = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(d_model, latent_dim)
        # Muon for the hidden matrices only (Keller Jordan's rule, as ts_head): the latent input and
        # output layers take AdamW; the attention's packed in_proj_weight (a raw parameter) takes Muon
        # like its out_proj; the learned slot and position embeddings are not decayed
        self.inp._no_muon = self.out._no_muon = True
        for lyr in self.stack.layers:
            lyr.self_attn.in_proj_weight._muon = True
        self.slot._no_weight_decay = self.pos._no_weight_decay = True
        self.d = d_model

    def forward(self, zt: Tensor, t: Tensor, cond: Tensor, cond_mask: Tensor,
                checkpointing: Checkpointing | None = None) -> Tensor:
        """zt [B, M, latent], t [B], cond [B, Lq, d] (question states), cond_mask [B, Lq] bool.
        ``checkpointing``: the model's activation checkpointing (``core/recompute.py``), applied
        to the denoiser's layers (every N-th, counted from its first)."""
        M, Lq = zt.shape[1], cond.shape[1]
        tok = self.inp(zt) + self.slot[:M].to(zt.dtype) + self.time(_timestep_embedding(t, self.d).to(zt.dtype))[:, None]
        x = torch.cat([self.cond(cond) + self.pos[:Lq].to(cond.dtype), tok], dim=1)
        pad = torch.cat([~cond_mask, cond_mask.new_zeros(cond_mask.shape[0], M)], dim=1)
        if checkpointing is None or checkpointing.every == 0 or not torch.is_grad_enabled():
            return self.out(self.stack(x, src_key_padding_mask=pad)[:, -M:])
        for i, layer in enumerate(self.stack.layers):  # (what nn.TransformerEncoder does: no final norm here)
            x = run_block(lambda _, layer=layer, x=x: layer(x, src_key_padding_mask=pad), None, checkpointing.at(i), x)
        return self.out(x[:, -M:])


@register("ladir", config=None, kind="head")
class LaDiR(nn.Module):
    """The memory embeddings, the VAE heads, the flow denoiser and the Prophet rule (module
    docstring); the language model is the ``HybridLM`` that owns this module."""

    def __init__(self, cfg: Any, *, d_model: int, max_seq_len: int, init_std: float = 0.02, **_: Any):
        super().__init__()
        self.cfg = cfg
        self.init_std = init_std
        self.memory = nn.Parameter(torch.zeros(cfg.memory_slots, d_model))
        self.marks = nn.Parameter(torch.zeros(len(TARGETS), d_model))  # what the decoder is to write next
        self.to_stats = nn.Linear(d_model, 2 * cfg.latent_dim)
        self.from_latent = nn.Linear(cfg.latent_dim, d_model)
        self.to_stats._no_muon = self.from_latent._no_muon = True  # the latents' output / input layers: AdamW
        self.memory._no_weight_decay = self.marks._no_weight_decay = True
        self.denoiser = FlowDenoiser(cfg.latent_dim, d_model, cfg.denoiser_layers, cfg.denoiser_heads,
                                     cfg.memory_slots, max_seq_len)

    def reset_special(self) -> None:
        nn.init.normal_(self.memory, 0.0, self.init_std)
        nn.init.normal_(self.marks, 0.0, self.init_std)
        # posteriors start narrow (sigma ~ 0.02, the scale of the means): with sigma = 1 the
        # sampled z is all noise at first and the decoder learns to ignore the slots
        with torch.no_grad():
            self.to_stats.bias[self.cfg.latent_dim:].fill_(2.0 * math.log(self.init_std))

    # ------------------------------------------------------------------ VAE
    def encode(self, model: Any, question: Tensor, q_mask: Tensor, reasoning: Tensor,
               r_mask: Tensor, outs: list | None = None) -> tuple[Tensor, Tensor]:
        """(mu, logvar) [B, M, latent]: the LM over [question, reasoning, memory] (right-padded
        segments; pads are removed by the padding rule), read at the memory slots. ``outs``: a list
        the LM's output is appended to (its auxiliary losses and statistics, ``vae_loss``)."""
        B, M = question.shape[0], self.cfg.memory_slots
        x = torch.cat([model.embed_tokens(question), model.embed_tokens(reasoning),
                       self.memory.to(model.dtype)[None].expand(B, -1, -1)], dim=1)
        mask = torch.cat([q_mask, r_mask, q_mask.new_ones(B, M)], dim=1).long()
        # ``model.forward``, not ``model(...)``: the trainer runs this inside ``model.run`` (one FSDP2
        # forward of the root); a nested root call's hooks would reshard the root's parameters when
        # the backward passes that call, before the slots' projection (a root parameter) is reached
        out = model.forward(inputs_embeds=x, input_ids=None, attention_mask=mask, return_hidden=True,
                            check_inputs=False)
        if outs is not None:
            outs.append(out)
        h = out.hidden_states[:, -M:]
        stats = self.to_stats(h)
        mu, logvar = stats.to(compute_dtype(stats)).chunk(2, dim=-1)
        return mu, logvar.clamp(-20.0, 10.0)

    def slots(self, z: Tensor, dtype: torch.dtype, target: str = "answer") -> Tensor:
        """Slot embeddings [B, M, d_model] of latents z [B, M, latent] for decoding ``target``
        ("answer" or "reasoning", ``TARGETS``): the latents' projection plus the target's mark
        (added to every slot, so the last slot, which predicts the target's first token, sees
        it without attention)."""
        s = self.from_latent(z.to(self.from_latent.weight.dtype))
        return (s + self.marks[TARGETS.index(target)].to(s.dtype)).to(dtype)

    def segment_loss(self, model: Any, z: Tensor, question: Tensor, q_mask: Tensor, target: Tensor,
                     t_mask: Tensor, *, kind: str, outs: list | None = None,
                     per_row: bool = False) -> tuple[Tensor, Tensor]:
        """(mean CE, token accuracy) of ``target`` (``kind``: "reasoning" or "answer") after
        [question, slots(z) for kind]: the last slot predicts target[0], target[j] predicts
        target[j + 1]. ``outs`` as in ``encode``. ``per_row``: (each row's mean CE [B], which of its
        tokens are right [B, Lt] (bool, False where ``t_mask`` is)) instead (held-out evaluation)."""
        B, M = question.shape[0], self.cfg.memory_slots
        x = torch.cat([model.embed_tokens(question), self.slots(z, model.dtype, kind), model.embed_tokens(target)],
                      dim=1)
        mask = torch.cat([q_mask, q_mask.new_ones(B, M), t_mask], dim=1).long()
        out = model.forward(inputs_embeds=x, input_ids=None, attention_mask=mask, check_inputs=False)  # as encode
        if outs is not None:
            outs.append(out)
        logits = out.logits
        Lq, Lt = question.shape[1], target.shape[1]
        pred = logits[:, Lq + M - 1:Lq + M - 1 + Lt]
        tgt = target.masked_fill(~t_mask, -100)
        hits = (pred.argmax(-1) == target) & t_mask
        cd = compute_dtype(pred)  # float32 for 16-bit logits, float64 stays float64 (as ``lm_loss``)
        if per_row:
            ce = F.cross_entropy(pred.to(cd).transpose(1, 2), tgt, ignore_index=-100, reduction="none")
            return ce.sum(1) / t_mask.sum(1).clamp(min=1), hits
        ce = F.cross_entropy(pred.flatten(0, 1).to(cd), tgt.flatten(), ignore_index=-100)
        return ce, hits.sum() / t_mask.sum().clamp(min=1)

    @staticmethod
    def kl(mu: Tensor, logvar: Tensor, per_row: bool = False) -> Tensor:
        """KL(N(mu, sigma^2) || N(0, I)), summed over the latent dims, mean over slots and rows
        (``per_row``: over slots only, [B])."""
        kl = (0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)).sum(-1).mean(-1)
        return kl if per_row else kl.mean()

    def vae_loss(self, model: Any, batch: dict, generator: Generators = None,
                 per_row: bool = False) -> tuple[Tensor, dict]:
        """Reconstruction of the reasoning + beta * KL; also the answer's CE from the same
        sampled slots (the decoder answers from them), each after its own mark; in training, with
        ``latent_noise``, the decoder reads the sampled latents plus that std of Gaussian noise
        (drawn after the posterior's, from the same generator; the KL is the posterior's). ``per_row``:
        the loss of each row [B] (its tokens' mean CE; the auxiliary losses added to every row)."""
        q, qm = batch["question"], batch["question_mask"]
        outs: list = []  # the LM's three passes: their auxiliary losses (MoE balance, z-loss) train it too
        mu, logvar = self.encode(model, q, qm, batch["reasoning"], batch["reasoning_mask"], outs)
        z = mu + (0.5 * logvar).exp() * noise(torch.randn, mu.shape, mu.device, generator, mu.dtype)
        if self.training and self.cfg.latent_noise > 0:  # latent-noise augmentation (module docstring)
            z = z + self.cfg.latent_noise * noise(torch.randn, mu.shape, mu.device, generator, mu.dtype)
        rec, rec_acc = self.segment_loss(model, z, q, qm, batch["reasoning"], batch["reasoning_mask"],
                                         kind="reasoning", outs=outs, per_row=per_row)
        ans, ans_acc = self.segment_loss(model, z, q, qm, batch["answer"], batch["answer_mask"], kind="answer",
                                         outs=outs, per_row=per_row)
        kl = self.kl(mu, logvar, per_row)
        loss = rec + ans + self.cfg.beta_kl * kl
        aux = [o.aux_loss for o in outs if o.aux_loss is not None]
        stats = dict(outs[0].stats or {})  # the encoder pass's routing statistics
        if aux:  # in the loss, and reported as the step's aux_loss (``objectives/ladir.py``)
            stats["aux_loss"] = torch.stack(aux).mean()
            loss = loss + stats["aux_loss"]
        if per_row:  # (the accuracies are counts then: the statistics are the training step's)
            return loss, stats
        return loss, {**stats, "ladir/recon": rec.detach(), "ladir/recon_acc": rec_acc.detach(),
                      "ladir/answer": ans.detach(), "ladir/answer_acc": ans_acc.detach(), "ladir/kl": kl.detach()}

    # ------------------------------------------------------------------ flow matching
    def question_states(self, model: Any, question: Tensor, q_mask: Tensor) -> Tensor:
        """The LM's final hidden states of the question [B, Lq, d] (the denoiser's condition)."""
        return model.forward(question, attention_mask=q_mask.long(), return_hidden=True,  # as encode
                             check_inputs=False).hidden_states

    def flow_loss(self, model: Any, batch: dict, generator: Generators = None,
                  per_row: bool = False) -> tuple[Tensor, dict]:
        """Rectified-flow velocity loss towards latents drawn from the VAE's posterior (the
        distribution the decoder was trained on), or towards its mean with ``flow_target: mean``
        (LaDiR's code: its ``_forward`` encodes with ``autoencoder._compress``, which returns the
        mean); the VAE and the LM are only read here: no gradient reaches them, and they run in
        eval mode, as at inference: no dropout. ``per_row``: each row's loss [B]."""
        q, qm = batch["question"], batch["question_mask"]
        with torch.no_grad(), reading(model):
            mu, logvar = self.encode(model, q, qm, batch["reasoning"], batch["reasoning_mask"])
            z1 = mu if self.cfg.flow_target == "mean" else \
                mu + (0.5 * logvar).exp() * noise(torch.randn, mu.shape, mu.device, generator)
            cond = self.question_states(model, q, qm)
        return self.velocity_loss(z1, cond, qm, generator, per_row, model.structure.checkpointing)

    def velocity_loss(self, z1: Tensor, cond: Tensor, q_mask: Tensor, generator: Generators = None,
                      per_row: bool = False, checkpointing: Checkpointing | None = None) -> tuple[Tensor, dict]:
        """The rectified-flow loss for target latents z1 [B, M, latent] given question states
        (``per_row``: each row's mean [B]; ``checkpointing``: the denoiser's, ``FlowDenoiser``),
        averaged over ``flow_draws`` draws of (z_0, t) per latent (LaDiR's code repeats each
        encoded latent ``diffusion_batch_mul = 8`` times), drawn in turn, z_0 then t for each, so
        k draws give the mean of k one-draw losses on the same generator; one denoiser pass over
        the k x B rows. In training, with ``cfg_dropout`` p (classifier-free guidance), each draw
        also draws u ~ U(0, 1) per row after its t, and a row with u < p sees the null condition
        (``null_mask``) instead of its question (LaDiR's code: ``replace_text_before_tht_start``,
        ``text_drop_prob = 0.1``, per row of its repeated batch); without p nothing more is drawn."""
        B, k = z1.shape[0], self.cfg.flow_draws
        p = self.cfg.cfg_dropout if self.training else 0.0  # (classifier-free guidance's condition dropout)
        draws = [(noise(torch.randn, z1.shape, z1.device, generator, z1.dtype),
                  noise(torch.rand, (B,), z1.device, generator, z1.dtype),
                  noise(torch.rand, (B,), z1.device, generator) < p if p > 0 else None) for _ in range(k)]
        z0, t = torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])  # [k B, ...], draw-major
        mask = q_mask.repeat(k, 1)
        if p > 0:  # the dropped rows see the null condition: no question state to attend to
            mask = mask & ~torch.cat([d[2] for d in draws])[:, None]
        z1 = z1.repeat(k, 1, 1)
        zt = (1 - t)[:, None, None] * z0 + t[:, None, None] * z1
        # in the denoiser's dtype (a model cast to float64 / bfloat16; the slot embedding's, which bf16 master
        # weights leave in float32, so autocast computes as before)
        dt = self.denoiser.slot.dtype
        v = self.denoiser(zt.to(dt), t, cond.detach().to(dt).repeat(k, 1, 1), mask, checkpointing)
        cd = compute_dtype(v, z1)
        err = (v.to(cd) - (z1 - z0).to(cd)).pow(2)
        if per_row:
            return err.flatten(1).mean(1).view(k, B).mean(0), {}
        loss = err.mean()
        return loss, {"ladir/flow": loss.detach()}

    @staticmethod
    def null_mask(q_mask: Tensor) -> Tensor:
        """The null condition of classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598):
        every question state masked out of the denoiser's attention (its ``cond_mask`` all False), so
        the latent tokens attend only to each other and the velocity is v(z_t, t), whatever the
        question's states, length or padding (the key padding mask that already hides pads; the
        latent tokens keep every attention row non-empty). LaDiR's code instead writes a learned
        ``fake_input_embed`` over the question's token embeddings (``model.py``
        ``replace_text_before_tht_start``) because its denoiser is the LM itself, reading the question
        and the thought tokens as one sequence with positions; here the question is a separate set
        of attended states, so masking drops it exactly and needs no new parameter (every checkpoint
        loads as before)."""
        return torch.zeros_like(q_mask)

    @torch.no_grad()
    def sample(self, model: Any, question: Tensor, q_mask: Tensor, steps: int | None = None,
               prophet: bool | None = None, generator: Generators = None,
               z0: Tensor | None = None, qcache: HybridCache | None = None,
               cond: Tensor | None = None, stats: dict | None = None, samples: int = 1,
               diversity_scale: float | None = None, cfg_scale: float | None = None,
               diversity_bandwidth: float | None = None, diversity_target: str | None = None,
               init_noise_scale: float | None = None) -> tuple[Tensor, Tensor]:
        """Euler sampling of z from noise given the (right-padded) question: (z [B, M, latent],
        steps used per row [B]). The noise is ``init_noise_scale`` times N(0, I) (LaDiR's
        ``denoise`` starts from ``torch.randn(...) * 2.5``), or ``z0`` as given. With Prophet (``prophet``; default: the recipe's setting) a row
        stops once the answer's top-1 / top-2 logit gap passes the current threshold.
        ``qcache`` / ``cond``: a cache holding the question and its final hidden states, when
        the caller has them (one prefill serves both); made here otherwise. ``stats``: gets
        ``lm_forwards``, the LM passes made here (the question's prefill when made here, Prophet's checks).
        ``samples``: the rows are questions of that many consecutive samples each (rows b * samples + s,
        as ``generate(mode="ladir")`` lays them out), between which the diversity guidance acts
        (``diversity_scale``, default the recipe's: each step's velocity v becomes
        v + gamma * ``repulsion(x)`` at x = z_t + (1 - t) v, each sample's estimate of z_1, or at x = v
        with ``diversity_target: velocity``; the Euler step and Prophet's estimate use that v).
        ``cfg_scale`` w (default the recipe's): classifier-free guidance, v = v_u + w (v_c - v_u) from
        the conditional and the unconditional (``null_mask``) velocities of one denoiser call over
        the rows doubled (Ho & Salimans 2022, Eq. 6, on velocities; LaDiR's code: ``inference_step``,
        two calls, for w > 1 only); the diversity kick is added to that v (as in LaDiR's
        ``denoise_with_reward_guidance_and_diversity``); w = 1 is the unguided sampler, bit for bit.
        ``diversity_bandwidth``, ``diversity_target``, ``init_noise_scale``: default the recipe's too; every
        setting given is checked as its recipe field is (``sampler_settings``)."""
        cfg = self.cfg
        steps = steps or cfg.inference_steps
        prophet = cfg.prophet.enabled if prophet is None else prophet
        try:
            run = sampler_settings(cfg, cfg_scale=cfg_scale, diversity_scale=diversity_scale,
                                   diversity_bandwidth=diversity_bandwidth, diversity_target=diversity_target,
                                   init_noise_scale=init_noise_scale)
        except ValueError as e:
            raise ValueError(f"LaDiR.sample: {e}") from None
        gamma, w = run["diversity_scale"], run["cfg_scale"]
        B, M = question.shape[0], cfg.memory_slots
        if B % samples:
            raise ValueError(f"LaDiR.sample: {B} rows are not questions of {samples} samples each")
        dev = question.device
        forwards = 0
        if cond is None or (prophet and qcache is None):
            forwards += 1
            qcache = model.new_cache(B)
            cond = model(question, attention_mask=q_mask.long(), cache=qcache, return_hidden=True,
                         check_inputs=False).hidden_states
        wd = self.denoiser.out.weight.dtype
        cd = compute_dtype(wd)  # the state's dtype: float32 for a 16-bit denoiser, float64 stays float64
        cond = cond.to(cd)
        z = z0.clone().to(cd) if z0 is not None else \
            run["init_noise_scale"] * noise(torch.randn, (B, M, cfg.latent_dim), dev, generator, cd)
        used = torch.full((B,), steps, dtype=torch.long, device=dev)
        active = torch.ones(B, dtype=torch.bool, device=dev)
        dt = 1.0 / steps
        if w != 1.0:  # the conditional rows, then the same rows with the null condition: one call per step
            cond2, mask2 = torch.cat([cond, cond]).to(wd), torch.cat([q_mask, self.null_mask(q_mask)])
        for i in range(steps):
            t = torch.full((B,), i * dt, device=dev, dtype=cd)
            if w != 1.0:
                vc, vu = self.denoiser(torch.cat([z, z]).to(wd), torch.cat([t, t]), cond2, mask2).to(cd).chunk(2)
                v = vu + w * (vc - vu)
            else:
                v = self.denoiser(z.to(wd), t, cond.to(wd), q_mask).to(cd)
            if gamma > 0 and samples > 1:  # (otherwise exactly the unguided sampler)
                at = v if run["diversity_target"] == "velocity" else z + (1.0 - i * dt) * v  # the estimate of z_1
                v = v + gamma * self.repulsion(at, active, samples, run["diversity_bandwidth"])
            z = torch.where(active[:, None, None], z + dt * v, z)
            if prophet and (i + 1) % cfg.prophet.check_every == 0 and i + 1 < steps:
                est = z + (1.0 - (i + 1) * dt) * v  # the estimate of z_1 from the last velocity
                gap = self.answer_gap(model, qcache, est)
                forwards += 1
                third = min(int(3 * (i + 1) / steps), 2)
                stop = active & (gap >= cfg.prophet.thresholds[third])
                used = torch.where(stop, torch.full_like(used, i + 1), used)
                # a row that exits commits to the estimate it was judged on (Prophet decodes all
                # remaining tokens from the current prediction), not to the still-noisy z_t
                z = torch.where(stop[:, None, None], est, z)
                active &= ~stop
                if not bool(active.any()):
                    break
        if stats is not None:
            stats["lm_forwards"] = forwards
        return z, used

    @staticmethod
    def repulsion(v: Tensor, active: Tensor, samples: int, bandwidth: float = 0.0) -> Tensor:
        """The diversity guidance's kick [B, M, latent] at points v [B, M, latent] (LaDiR's code:
        ``distance_grad``): the gradient of R = sum_{j != i} f(||v_i - v_j||^2), f(u) = u exp(-u / sigma^2),
        over each question's samples (rows b * samples + s, each sample's M x latent point one
        vector): ``2 sum_j exp(-u_ij / sigma^2) (1 - u_ij / sigma^2) (v_i - v_j)``, which pushes
        apart the pairs nearer than sigma and draws together the farther ones. sigma: ``bandwidth``,
        or where 0, the median distance over the question's pairs, plus 1e-6 (LaDiR's code takes
        it every step, ``median_bandwidth_latent``; with 2 samples the pair then sits at f's peak,
        where the kick is ~0). Only active rows (Prophet's, ``active`` [B]) interact; an exited
        row's kick is 0. In one batched pass over questions and samples."""
        B, M, D = v.shape
        x = v.reshape(B // samples, samples, M * D)
        pair = active.view(-1, samples)
        pair = pair[:, :, None] & pair[:, None, :] & ~torch.eye(samples, dtype=torch.bool, device=v.device)
        # (the direct distances, not the matrix-product form: no cancellation for near samples)
        dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # [Q, S, S]
        if bandwidth > 0:
            s2 = torch.full_like(dist[:, :1, :1], bandwidth ** 2)
        else:
            i, j = torch.triu_indices(samples, samples, 1, device=v.device)
            med = torch.where(pair[:, i, j], dist[:, i, j], torch.nan).nanmedian(dim=1).values
            s2 = (med.nan_to_num(1.0) + 1e-6).pow(2)[:, None, None]  # (a question without pairs: no kick)
        u = dist.pow(2) / s2
        w = torch.where(pair, torch.exp(-u) * (1.0 - u), torch.zeros_like(u))
        kick = 2.0 * (w.sum(-1, keepdim=True) * x - w @ x)  # 2 sum_j w_ij (x_i - x_j)
        return kick.view(B, M, D)

    def answer_gap(self, model: Any, qcache: HybridCache, z: Tensor) -> Tensor:
        """Top-1 minus top-2 logit of the answer's first token after [question, slots(z)]
        (on a fork of the question's cache, which stays as it is)."""
        logits = model(inputs_embeds=self.slots(z, model.dtype), input_ids=None, cache=qcache.fork(),
                       check_inputs=False, logits_to_keep=1).logits[:, -1]
        logits = logits.to(compute_dtype(logits))
        top = logits.topk(2, dim=-1).values
        return top[:, 0] - top[:, 1]
