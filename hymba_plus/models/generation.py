"""Decoding strategies. ``GENERATORS[mode]`` is what ``HybridLM.generate(mode=...)`` calls.

``ar``: cached autoregressive decoding — one prefill of the (left-padded) prompt, then one
token per step through the same ``HybridCache``. The loop over *generated* tokens is
inherent to decoding; no training path goes through here.
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
    if not new:
        return input_ids
    return torch.cat([input_ids, torch.stack(new, 1)], dim=1)


GENERATORS: dict[str, Callable[..., Tensor]] = {"ar": generate_ar}
