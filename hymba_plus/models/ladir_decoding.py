"""Answering through latent reasoning (``generate(mode="ladir")``, ``components/ladir.py``).

The question (left- or right-padded with ``attention_mask``) is prefilled once into a cache,
which is then copied to each of its ``samples`` rows (``HybridCache.reorder``: one prefill per
question, not per sample); its final hidden states condition the flow denoiser, which samples
``samples`` latent reasonings per question in parallel (``steps`` Euler steps, Prophet early exit unless
``prophet=False``; with ``ladir.diversity_scale``, the diversity guidance between a question's
samples; with ``ladir.cfg_scale``, classifier-free guidance; each setting overridable per call); each latent's M slot embeddings enter that question's cache once, after
the question (like meta tokens); the answer is decoded autoregressively after them. With
several samples the answer is the majority vote over the samples' answers (ties: the
first sample). ``stats``: denoising steps used per row (``steps_used``, its mean, and the
rows that exited early through Prophet), forward passes of the LM (``forwards``: the question's
prefill over the B questions, then Prophet's checks, the slots, one per answer token but the
last, each over all B x ``samples`` rows; ``tokens_per_forward`` per question), the vote's agreement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..components.ladir import sampler_settings
from ..core.config import brief
from .generation import GENERATORS, RESERVED, check_length, continue_ar, int_at_least, reporting

#: the most latents per question (the recipe schema's bound on ``ladir.samples``)
MAX_SAMPLES = 64


@torch.no_grad()
def generate_ladir(
    model: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
    stats: dict | None = None,
    steps: int | None = None,
    prophet: bool | None = None,
    samples: int | None = None,
    cfg_scale: float | None = None,
    diversity_scale: float | None = None,
    diversity_bandwidth: float | None = None,
    diversity_target: str | None = None,
    init_noise_scale: float | None = None,
) -> Tensor:
    """Question -> sampled latents -> answer (module docstring). ``steps``: Euler steps
    (default ``ladir.inference_steps``); ``prophet``: early exit on/off (default: the recipe's);
    ``samples``: latents per question (default ``ladir.samples``). ``cfg_scale``, ``diversity_scale``,
    ``diversity_bandwidth``, ``diversity_target``, ``init_noise_scale``: the sampler's settings for this call
    (``LaDiR.sample``; default the recipe's ``ladir`` fields), checked as the recipe's are before any forward
    (``components.ladir.sampler_settings``: ranges, and ``cfg_scale`` != 1 only with ``ladir.cfg_dropout``)."""
    lad = model.ladir
    if lad is None:
        raise ValueError("mode ladir needs a model with latent reasoning (a recipe with a ladir section)")
    run = sampler_settings(lad.cfg, cfg_scale=cfg_scale, diversity_scale=diversity_scale,
                           diversity_bandwidth=diversity_bandwidth, diversity_target=diversity_target,
                           init_noise_scale=init_noise_scale)
    S = samples if samples is not None else lad.cfg.samples
    for name, v in (("samples", S), ("steps", steps if steps is not None else 1)):
        if not int_at_least(v, 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    S, steps = int(S), int(steps) if steps is not None else lad.cfg.inference_steps  # (numpy / tensor integers)
    if prophet is not None and not isinstance(prophet, bool):
        raise TypeError(f"prophet must be True, False or None (the recipe's), got {type(prophet).__name__} "
                        f"{brief(prophet)}")
    if S > MAX_SAMPLES:  # the recipe's bound on ladir.samples: B x samples rows are decoded at once
        raise ValueError(f"samples must be <= {MAX_SAMPLES} (as ladir.samples in a recipe), got {S}")
    M = lad.cfg.memory_slots
    longest = check_length(model, input_ids, max_new_tokens, attention_mask, reserved=M, what="memory slots",
                           left_only=False)  # its questions are compacted: left or right padding
    B, T = input_ids.shape
    dev = input_ids.device
    valid = attention_mask.to(torch.bool) if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                        device=dev)
    # right-padded questions, cut to the longest row (pads do not count towards max_seq_len, the
    # width of the denoiser's position embeddings)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :longest]
    q, qm = input_ids.gather(1, order), valid.gather(1, order)
    cache = model.new_cache(B, device=dev)
    cond = model(q, attention_mask=qm.long(), cache=cache, return_hidden=True).hidden_states  # checks the ids
    if S > 1:  # each question's prefill, copied to its samples' rows (b * S + s)
        cache.reorder(torch.arange(B, device=dev).repeat_interleave(S))
        q, qm, cond = q.repeat_interleave(S, 0), qm.repeat_interleave(S, 0), cond.repeat_interleave(S, 0)
    sampled: dict = {}
    z, used = lad.sample(model, q, qm, steps=steps, prophet=prophet, generator=generator, qcache=cache, cond=cond,
                         stats=sampled, samples=S, **run)  # (the diversity guidance acts between a question's samples)
    last = model(inputs_embeds=lad.slots(z, model.dtype), input_ids=None, cache=cache, check_inputs=False,
                 logits_to_keep=1).logits[:, -1]  # the slots enter the cache once
    agreement = torch.ones(B, device=dev)  # (one sample: no vote)

    def report(n: int) -> None:  # n answer tokens (a stop: those streamed; the latents are whole by then)
        if stats is None:
            return
        # prefill (B rows) + Prophet's checks + the slots + one per answer token but the last (B x S rows)
        forwards = 1 + sampled["lm_forwards"] + 1 + max(n - 1, 0)
        stats.update(forwards=forwards, tokens=n * B, tokens_per_forward=n / forwards, steps=steps,
                     steps_used=used.view(B, S).tolist(), mean_steps=float(used.float().mean()),
                     early_exits=int((used < steps).sum()), samples=S, vote_agreement=agreement.tolist(), **run)
        stats["summary"] = [
            "ladir: denoising steps used " + ", ".join(f"{u}" + (" (Prophet exit)" if u < steps else "")
                                                       for u in row)
            + f" of {steps} per latent sample; answer vote agreement {stats['vote_agreement'][i]:.2f}"
            + guidance(run, S) for i, row in enumerate(stats["steps_used"])]

    new = continue_ar(model, cache, last, max_new_tokens, temperature, top_k, top_p, eos_token_id, generator,
                      reporting(streamer, report) if S == 1 else None, min_p=min_p)
    n = new.shape[1]
    if S > 1:  # majority vote over each question's samples
        per = new.view(B, S, n)
        same = (per[:, :, None] == per[:, None]).all(-1)  # [B, S, S]
        votes = same.sum(-1)
        best = votes.argmax(-1)  # first of the most voted
        agreement = votes.gather(1, best[:, None]).squeeze(1).float() / S
        new = per[torch.arange(B, device=dev), best]
        voted = reporting(streamer, lambda _: report(n))  # (the whole answer was decoded before it streams)
        if voted is not None:  # the voted answer, column by column, once it is known
            for j in range(n):
                voted(new[:, j])
    report(n)
    return torch.cat([input_ids, new], dim=1)


def guidance(run: dict, samples: int) -> str:
    """The summary line's note of the sampler settings ``run`` (``sampler_settings``) that change the unguided
    sampler (``cfg_scale`` != 1, ``diversity_scale`` > 0 with its bandwidth and target where a question has
    ``samples`` >= 2 to push apart, ``init_noise_scale`` != 1), e.g. ``; sampler: cfg_scale 2, init_noise_scale
    2.5``; empty when none does."""
    parts = []
    if run["cfg_scale"] != 1.0:
        parts.append(f"cfg_scale {run['cfg_scale']:g}")
    if run["diversity_scale"] > 0 and samples > 1:  # (LaDiR.sample: no guidance for a lone sample)
        bw = f"{run['diversity_bandwidth']:g}" if run["diversity_bandwidth"] > 0 else "median"
        parts.append(f"diversity_scale {run['diversity_scale']:g} (bandwidth: {bw}, target: "
                     f"{run['diversity_target']})")
    if run["init_noise_scale"] != 1.0:
        parts.append(f"init_noise_scale {run['init_noise_scale']:g}")
    return "; sampler: " + ", ".join(parts) if parts else ""


GENERATORS["ladir"] = generate_ladir  # the decoding modes live in generation.GENERATORS
RESERVED["ladir"] = lambda recipe: recipe.ladir.memory_slots if recipe.ladir is not None else 0
