"""Decoding strategies. ``GENERATORS[mode]`` is what ``HybridLM.generate(mode=...)`` calls.

``ar``: cached autoregressive decoding — one prefill of the (left-padded) prompt, then one
token per step through the same ``HybridCache``.

``block_diffusion``: block-by-block denoising for models trained with the
``block_diffusion`` objective (BD3-LM, arXiv 2503.09573; parallel unmasking of Fast-dLLM,
Wu et al. 2025, arXiv 2505.22618 §3.3). Each block of ``block_size`` starts all [MASK]; a
denoising step runs the block on a *fork* of the cache with the block's tokens seeing each
other both ways (``forward(..., bidirectional=True)``, the same computation as training's
noisy stream, ``core/two_stream.py``), so the cache never moves while a block is denoised;
every still-masked position whose chosen token has probability >= ``threshold`` is
unmasked (at least the most confident one per row), or, without a threshold, the
``ceil(masked / steps left)`` most confident ones so the block finishes in ``steps``. A
fully denoised block is committed to the cache once, by the ordinary causal forward.
Blocks start right after each row's prompt (a prompt whose length is a multiple of
``block_size`` matches training's block layout exactly).

Both take ``stats``: a dict filled with the forward passes, the tokens generated and tokens
per forward (and, for block diffusion, the denoising steps per block). The loop over
*generated* tokens or blocks is inherent to decoding; no training path goes through here.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick one token per row from logits [B, V]: greedy at temperature 0, else sampled
    from the temperature-scaled distribution restricted to top-k and nucleus (top-p)."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the top one always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def check_length(model: Any, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None) -> None:
    """Refuse, before any work, a generation that would run past ``max_seq_len``: the longest
    prompt row (real tokens: pads do not count, nor do meta tokens, as in ``HybridLM.forward``)
    plus ``max_new_tokens``. One host read when there is a mask."""
    try:
        ok = not isinstance(max_new_tokens, bool) and operator.index(max_new_tokens) >= 0
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    if attention_mask is not None and attention_mask.shape == input_ids.shape and T:
        T = int(attention_mask.to(torch.bool).sum(1).max())  # a wrong shape: the prefill says so
    max_len, n_meta = model.config.max_seq_len, model.config.meta_tokens
    if T + max_new_tokens > max_len:
        note = f"; the {n_meta} meta tokens are not counted" if n_meta else ""
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({max_new_tokens}) = {T + max_new_tokens} "
                         f"exceeds max_seq_len {max_len} (use max_new_tokens <= {max(max_len - T, 0)}{note})")


def generate_ar(
    model: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
    stats: dict | None = None,
) -> Tensor:
    B = input_ids.shape[0]
    check_length(model, input_ids, max_new_tokens, attention_mask)
    cache = model.new_cache(B, device=input_ids.device)
    out = model(input_ids, attention_mask=attention_mask, cache=cache)  # checks the prompt's ids
    last = out.logits[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new = []
    for _ in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
            done |= nxt == eos_token_id
        new.append(nxt)
        if streamer is not None:
            streamer(nxt)
        if eos_token_id is not None and bool(done.all()):
            break
        # sampled from the model's own logits, and the length was checked above: no checks
        # (they would cost a device sync per token on CUDA)
        last = model(nxt[:, None], cache=cache, check_inputs=False).logits[:, -1]
    _report(stats, forwards=max(len(new), 1), tokens=len(new) * B, rows=B)  # prefill + one per token but the last
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, 1)], dim=1)


def _report(stats: dict | None, forwards: int, tokens: int, rows: int, **more: Any) -> None:
    if stats is not None:
        stats.update(forwards=forwards, tokens=tokens, tokens_per_forward=tokens / max(forwards * rows, 1), **more)


def token_confidence(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """(token, its probability) per position of logits [..., V]: greedy at temperature 0 (the
    probability under softmax(logits)), else sampled (the probability under the filtered,
    temperature-scaled distribution it was drawn from)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    if temperature <= 0:
        probs = flat.softmax(-1)
        tok = probs.argmax(-1)
    else:
        tok = sample_next(flat, temperature, top_k, top_p, generator)
        scaled = flat / temperature
        if top_k is not None and 0 < top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = scaled.softmax(-1)
    conf = probs.gather(-1, tok[:, None]).squeeze(-1)
    return tok.view(logits.shape[:-1]), conf.view(logits.shape[:-1])


def generate_block_diffusion(
    model: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    attention_mask: Tensor | None = None,
    eos_token_id: int | None = None,
    generator: torch.Generator | None = None,
    streamer: Callable[[Tensor], Any] | None = None,
    stats: dict | None = None,
    block_size: int | None = None,
    threshold: float | None = 0.9,
    steps: int | None = None,
) -> Tensor:
    """Block-diffusion sampling (module docstring). ``block_size``: the model's training block
    size by default; ``threshold``: confidence for parallel unmasking (None: ``steps``
    schedule; 1.0 or more: one token per step); ``steps``: the most denoising steps per block
    (default ``block_size``: one token per step at worst)."""
    mask_id = model.objective.mask_token_id
    if mask_id is None:
        raise ValueError("mode block_diffusion needs a model trained with the block_diffusion objective "
                         "(its recipe has no objective: {kind: block_diffusion})")
    bs = block_size if block_size is not None else model.objective.cfg.block_size
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {bs!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if threshold is not None and not threshold > 0:
        raise ValueError(f"threshold must be > 0 (or None for the steps schedule), got {threshold!r}")
    B = input_ids.shape[0]
    check_length(model, input_ids, max_new_tokens, attention_mask)
    cache = model.new_cache(B, device=input_ids.device)
    model(input_ids, attention_mask=attention_mask, cache=cache)  # prefill: checks the prompt's ids
    dev = input_ids.device
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    forwards, blocks, steps_used = 1, [], []
    for start in range(0, max_new_tokens, bs):
        size = min(bs, max_new_tokens - start)
        n_steps = min(steps if steps is not None else size, size)
        x = torch.full((B, size), mask_id, dtype=input_ids.dtype, device=dev)
        used = 0
        while True:
            masked = x == mask_id
            if not bool(masked.any()):
                break
            # the cache does not move: the block runs on a fork (no memory: states are shared)
            logits = model(x, cache=cache.fork(), bidirectional=True, check_inputs=False).logits
            forwards += 1
            used += 1
            tok, conf = token_confidence(logits, temperature, top_k, top_p, generator)
            conf = conf.masked_fill(~masked, -1.0)
            if threshold is not None and used < n_steps:  # >= 1: one token per step
                accept = masked & (conf >= threshold) if threshold < 1 else torch.zeros_like(masked)
            elif used >= n_steps:  # the last allowed step unmasks everything left
                accept = masked
            else:  # steps schedule: the most confident ceil(masked / steps left) positions
                k = (masked.sum(1) + (n_steps - used)) // (n_steps - used + 1)
                ranks = conf.argsort(-1, descending=True).argsort(-1)
                accept = masked & (ranks < k[:, None])
            best = conf.argmax(-1)  # at least one token per row that still has masks
            accept[rows, best] |= masked[rows, best]
            x = torch.where(accept, tok, x)
        if eos_token_id is not None:
            x = torch.where(done[:, None], torch.full_like(x, eos_token_id), x)
            after = (x == eos_token_id).int().cumsum(1) > 0  # from the first EOS on, the row is over
            x = torch.where(after, torch.full_like(x, eos_token_id), x)
            done |= after[:, -1]
        blocks.append(x)
        steps_used.append(used)
        if streamer is not None:
            for j in range(size):
                streamer(x[:, j])
        if eos_token_id is not None and bool(done.all()):
            break
        if start + size < max_new_tokens:  # commit the denoised block: the ordinary cached forward
            model(x, cache=cache, check_inputs=False)
            forwards += 1
    n_tokens = sum(b.shape[1] for b in blocks)
    _report(stats, forwards=forwards, tokens=n_tokens * B, rows=B, block_size=bs,
            steps_per_block=sum(steps_used) / max(len(steps_used), 1))
    if not blocks:
        return input_ids
    return torch.cat([input_ids, *blocks], dim=1)


GENERATORS: dict[str, Callable[..., Tensor]] = {"ar": generate_ar, "block_diffusion": generate_block_diffusion}
