"""Decoding strategies. ``GENERATORS[mode]`` is what ``HybridLM.generate(mode=...)`` calls.

``ar``: cached autoregressive decoding — one prefill of the (left-padded) prompt, then one
token per step through the same ``HybridCache``.

``block_diffusion``: block-by-block denoising for models trained with the
``block_diffusion`` objective (BD3-LM, arXiv 2503.09573; parallel unmasking of Fast-dLLM,
Wu et al. 2025, arXiv 2505.22618 §3.3). Each block of ``block_size`` starts all [MASK]; a
denoising step runs the block on a *fork* of the cache with the block's tokens seeing each
other both ways (``forward(..., bidirectional=True)``, the same computation as training's
noisy stream, ``core/two_stream.py``), so the cache never moves while a block is denoised;
every still-masked position whose chosen token has probability >= ``threshold`` under the
model's ``softmax(logits)`` is unmasked (at least the most confident one per row), or, without
a threshold, the ``ceil(masked / steps left)`` most confident ones so the block finishes in
``steps`` (most confident first, as LLaDA / Fast-dLLM): ``sampler="confidence"``, the default.
``sampler="ddpm"`` and ``"first_hitting"`` are BD3-LM's own ancestral samplers (its code's
``_ddpm_caching_update`` / ``_semi_ar_sampler``; MDLM, Sahoo et al. 2024, arXiv 2406.07524 Eq. 7),
which reveal uniformly random positions, on the objective's noise schedule alpha(t) = 1 - m(t)
(``objectives/block_diffusion.py``'s ``mask_rate``): ``ddpm`` goes down the grid t_i = 1 - i / steps
(i = 0 .. steps; default ``steps``: the block size, any number allowed) and from t to s reveals each
still-masked position with probability (alpha_s - alpha_t) / (1 - alpha_t) = 1 - m(s) / m(t),
independently (m(0) = 0: the last step reveals the rest); ``first_hitting`` (Zheng et al. 2025,
arXiv 2409.02908 §4, BD3-LM's setting for many steps) jumps straight to the next time a position is
revealed and reveals exactly one uniformly chosen masked position per step (a ``steps`` budget below the
block size reveals the rest at its last step). The model takes no t (BD3-LM's ``time_conditioning:
False``, as training here), so the time of the next reveal changes nothing that is drawn and is not
drawn; and a ddpm step that reveals nothing runs no forward (the input is unchanged: BD3-LM's cached
``p_x0``), so ``steps_per_block`` counts the forwards. Each position's ddpm step is drawn at once
(``ddpm_reveal_steps``: the same law, by bisection over the steps), so a forward runs only at the steps
that reveal something and any number of steps costs at most one forward per position. A revealed token is the model's argmax at
temperature 0, else drawn from ``filtered_probs`` (temperature, top-k, nucleus top-p, min-p as in every
mode, the token that crosses p kept): which positions are revealed, and when, is random even at temperature 0 (seeded
by ``generator``). ``threshold`` is the confidence sampler's alone (default 0.9; given with the two
others, even as None, it is refused).
A fully denoised block is committed to the cache once, by the ordinary causal forward, whatever the
sampler. A last block that ``max_new_tokens`` cuts is denoised at the full ``block_size`` where
``max_seq_len`` leaves room (training never shows a shorter noisy block) and cut; the room is the longest prompt's, so in a batch a shorter row's last block may be
denoised narrower than it would be alone. Blocks start right after each row's prompt (a prompt whose length is a multiple
of ``block_size`` matches training's block layout exactly).

``speculative``: lossless draft-model speculative decoding (Leviathan et al. 2023, arXiv
2211.17192; Chen et al. 2023, arXiv 2302.01318), options ``draft`` (a model with the same
``vocab_size``) and ``k``. Target and draft each prefill the prompt into their own cache;
between rounds both caches hold the prompt and every committed token but the last one. A
round: the draft proposes up to ``k`` tokens, one cached step each; the target runs
``[last, d_1 .. d_k]`` in ONE forward of ``k + 1`` tokens, which scores every draft and the
bonus position at once. Greedy (temperature 0): the longest prefix where the draft equals
the target's argmax is kept, then the target's token at the first mismatch (or the bonus).
Sampling: ``d_i`` is kept with probability ``min(1, p(d_i) / q(d_i))``, the first rejected
one is replaced by a draw from ``normalize(max(0, p - q))``, and if all are kept the bonus is
drawn from ``p`` (``p``, ``q``: target and draft distributions after the same temperature,
top-k, top-p and min-p as ``sample_next``), so every token has the target's own distribution. Rows
keep different counts: both caches go back with ``HybridLM.rewind`` (restore the round's
snapshot, re-run each row's kept tokens in one forward: exact for every state type; the
target's verify forward, with ``record_states`` (the default off CUDA: ``record_by_default``) on a target whose every layer
records, keeps each layer's state after every position of the chunk, and its rollback is then a
gather, no forward; the draft, fed one token a forward, always re-runs) — the
target only when some row rejected a draft, the draft only when some row kept less than it
fed; when rows kept all their drafts (the draft fed all but the last) the draft takes one
cached step of its last draft (gpt-fast's catch-up) instead of re-running all ``k + 1``. A
row never passes ``max_new_tokens`` (it is offered fewer drafts near the end; rows that
finished or hit EOS stand still through padding) and stops at EOS like ``ar``. The output is
``ar``'s: token for token when greedy (up to floating-point ties), in distribution when
sampling. ``stats`` adds ``target_forwards`` (prefill + verify + rewind, also ``forwards``),
``verify_forwards``, ``rewind_forwards`` (rollbacks that re-ran tokens; ``recorded_rewinds``: those that
gathered recorded states), ``draft_forwards`` (prefill, draft steps, catch-ups
and ``draft_rewind_forwards``), ``rounds``, ``proposed`` / ``accepted`` drafts,
``acceptance_rate`` and ``tokens_per_target_forward`` (per row).

All take ``stats``: a dict filled with the forward passes, the tokens generated and tokens
per forward (and, for block diffusion, the denoising steps per block). The loop over
*generated* tokens, blocks or draft steps is inherent to decoding; no training path goes
through here.
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.config import brief
from ..objectives.block_diffusion import mask_rate

#: the least temperature ``filtered_probs`` divides by (float32's smallest normal number): below it,
#: sampling is greedy up to exact ties
MIN_TEMPERATURE = 1.1754944e-38


def filtered_probs(logits: Tensor, temperature: float, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None) -> Tensor:
    """The distribution ``sample_next`` draws from at ``temperature > 0`` (float32 probabilities
    over the last dim): temperature-scaled, restricted to top-k, then to the nucleus top-p
    (a token is dropped when the mass before it already reaches top_p; the top one stays), then
    to min-p (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling", arXiv 2407.01082: a token
    stays when its probability after temperature is at least ``min_p`` times the top token's).
    The order is HF's default processors' (temperature, top-k, top-p, then ``MinPLogitsWarper``);
    min-p reads only the ratio p_i / p_max, which top-k's and top-p's renormalising leaves as it
    is, so the result is the intersection of the three sets (min-p before top-p would give
    another nucleus). min_p None or 0: off; 1: the top token (and its exact ties) alone."""
    logits = logits.float()
    # the max first and float32's smallest normal as the least temperature: a tiny one is greedy, not nan
    logits = (logits - logits.amax(-1, keepdim=True)) / max(temperature, MIN_TEMPERATURE)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p
        drop[..., 0] = False  # the top one stays, however small top_p (1e-300 is 0 in float32)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    if min_p:
        # p_i >= min_p * p_max <=> log(p_i / p_max) = logits_i >= log(min_p): the logits are already
        # shifted by their max and scaled, so the top one is 0 and always stays (no host sync: a mask)
        logits = logits.masked_fill(logits < math.log(min_p), float("-inf"))
    return logits.softmax(-1)


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One draw per row of probs [..., V]."""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).view(probs.shape[:-1])


def accept_drafts(p: Tensor, q: Tensor, drafts: Tensor, generator: torch.Generator | None,
                  limit: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Speculative sampling's acceptance rule (Leviathan et al. 2023, Chen et al. 2023),
    vectorised over rows and positions; the draft-model and the MTP decoders share it.

    p [B, k+1, V]: the target's distributions at the k drafts and one more; q [B, k, V]: the
    draft distributions the drafts [B, k] were drawn from; ``limit`` [B]: drafts that count
    per row (None: all k). Returns (accepted [B]: the length of the kept prefix, next [B]: the
    token after it), drawn from norm(max(0, p - q)) at the first rejection or from p when every
    counted draft is kept — so the tokens are distributed as sampling from p alone."""
    B, k = drafts.shape
    pd = p[:, :k].gather(-1, drafts[..., None]).squeeze(-1)
    qd = q.gather(-1, drafts[..., None]).squeeze(-1)
    u = torch.rand(B, k, device=p.device, generator=generator)
    ok = u * qd < pd  # u < p / q, without dividing by zero (q(d) > 0: d was drawn from q)
    if limit is not None:
        ok &= torch.arange(k, device=p.device)[None] < limit[:, None]
    accepted = ok.long().cumprod(1).sum(1)
    rows = torch.arange(B, device=p.device)
    p_at = p[rows, accepted]
    q_at = torch.cat([q, q.new_zeros(B, 1, q.shape[-1])], 1)[rows, accepted]  # zero after the last draft
    if limit is not None:  # every counted draft kept: the bonus comes from p
        q_at = torch.where((accepted == limit)[:, None], 0.0, q_at)
    resid = (p_at - q_at).clamp(min=0)
    norm = resid.sum(-1, keepdim=True)
    resid = torch.where(norm > 0, resid / norm.clamp(min=1e-30), p_at)  # p == q there: any draw from p is exact
    return accepted, draw(resid, generator)


def sample_next(
    logits: Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    min_p: float | None = None,
) -> Tensor:
    """Pick one token per row from logits [B, V]: greedy at temperature 0, else sampled
    from the temperature-scaled distribution restricted to top-k, nucleus (top-p) and min-p
    (``filtered_probs``)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return draw(filtered_probs(logits, temperature, top_k, top_p, min_p), generator)


#: positions a decoding mode adds to the sequence besides the prompt and the new tokens, by mode
#: (e.g. ladir's memory slots), registered next to the mode's generator; read from the recipe (so
#: ``hymba bench`` can check them before it builds the model)
RESERVED: dict[str, Callable[[Any], int]] = {}


def reserved_positions(recipe: Any, mode: str) -> int:
    """Positions ``mode`` takes besides the prompt and the new tokens (0 for most modes), for a model
    of ``recipe`` (a model's ``.recipe``)."""
    fn = RESERVED.get(mode)
    return fn(recipe) if fn is not None else 0


def int_at_least(v: Any, least: int) -> bool:
    """``v`` is an integer (``operator.index`` takes it; not a bool) and ``>= least``: the check of
    every integer setting of the decoding modes."""
    try:
        return not isinstance(v, bool) and operator.index(v) >= least
    except TypeError:
        return False


class EndTokens:
    """The end-of-sequence ids of one generate call: ``eos_token_id`` is one id or several (as
    HF's ``generation_config.eos_token_id``, e.g. Llama-3-Instruct's ``<|end_of_text|>`` and
    ``<|eot_id|>``). A row is over at its first end id; ``fill`` (the first id) is written after it."""

    def __init__(self, ids: tuple[int, ...], device: torch.device | str):
        self.ids = ids
        self.fill = ids[0]
        self._set = torch.tensor(ids, dtype=torch.long, device=device) if len(ids) > 1 else None

    def hit(self, tokens: Tensor) -> Tensor:
        """Which of ``tokens`` are end ids (bool, same shape)."""
        return tokens == self.fill if self._set is None else torch.isin(tokens, self._set)

    def after(self, tokens: Tensor) -> Tensor:
        """[B, n] -> [B, n] bool: the positions after each row's first end id (which keeps its own id)."""
        hit = self.hit(tokens).int()
        return hit.cumsum(1) - hit > 0


def end_tokens(eos_token_id: int | Sequence[int] | None, device: torch.device | str) -> EndTokens | None:
    """``eos_token_id`` (checked by ``check_sampling``) as an ``EndTokens`` (None: no end token)."""
    if eos_token_id is None:
        return None
    ids = tuple(operator.index(i) for i in eos_token_id) if isinstance(eos_token_id, (list, tuple)) else (
        operator.index(eos_token_id),)
    return EndTokens(ids, device)


def check_eos(eos_token_id: Any, vocab_size: int | None = None) -> None:
    """``eos_token_id``: None, a token id, or a non-empty list / tuple of token ids of the vocabulary."""
    ids = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]
    ok = eos_token_id is None or (ids and all(int_at_least(i, 0) and (vocab_size is None or i < vocab_size)
                                               for i in ids))
    if not ok:
        raise ValueError(f"eos_token_id must be a token id in [0, {vocab_size}) or a non-empty list of them (or "
                         f"None: no end token), got {brief(eos_token_id)}")


def check_sampling(temperature: Any, top_k: Any, top_p: Any, eos_token_id: Any = None, stats: Any = None,
                   vocab_size: int | None = None, min_p: Any = None) -> None:
    """Refuse sampling settings outside their meaning (one line each, before any work):
    ``temperature`` a finite number >= 0 (0: greedy), ``top_k`` None (off) or an integer >= 1,
    ``top_p`` None (off) or a number in (0, 1] (1: off), ``min_p`` None or a number in [0, 1]
    (None / 0: off), ``eos_token_id`` None, a token id of the
    vocabulary or a list of them (``check_eos``), ``stats`` None or a dict. ``HybridLM.generate`` calls it."""
    check_eos(eos_token_id, vocab_size)
    if stats is not None and not isinstance(stats, dict):
        raise TypeError(f"stats must be a dict the decoder fills (or None), got {type(stats).__name__} {brief(stats)}")
    if (isinstance(temperature, bool) or not isinstance(temperature, numbers.Real)
            or not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {brief(temperature)}")
    if top_k is not None and not int_at_least(top_k, 1):
        raise ValueError(f"top_k must be an integer >= 1 (or None: off), got {brief(top_k)}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real)
                              or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be a number in (0, 1] (or None: off), got {brief(top_p)}")
    if min_p is not None and (isinstance(min_p, bool) or not isinstance(min_p, numbers.Real)
                              or not 0 <= min_p <= 1):
        raise ValueError(f"min_p must be a number in [0, 1] (or None / 0: off), got {brief(min_p)}")


def check_prompt(input_ids: Any, attention_mask: Any = None, min_tokens: int = 1) -> None:
    """Refuse a prompt that is not token ids: not a tensor, not integers, not [B, T], or (for
    ``min_tokens`` 1: a mode that continues from the prompt's last token) no tokens at all; an
    ``attention_mask`` that is not a tensor of the ids' shape. No host read (``forward`` checks the ids' range)."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor of token ids [B, T], got {type(input_ids).__name__} "
                        f"{brief(input_ids)}")
    if input_ids.dtype not in (torch.long, torch.int32):  # what the embedding reads
        raise TypeError(f"input_ids must hold integer token ids (torch.long or torch.int32), got dtype "
                        f"{input_ids.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [B, T], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:  # (new_cache refused it later, naming its batch_size)
        raise ValueError(f"input_ids: a batch of no rows (shape {tuple(input_ids.shape)}); at least one row is needed")
    if input_ids.shape[1] < min_tokens:
        raise ValueError(f"input_ids: an empty prompt (shape {tuple(input_ids.shape)}); generate continues a "
                         "prompt of at least one token per row")
    if attention_mask is not None and not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, T] (1: token, 0: pad) or None, got "
                        f"{type(attention_mask).__name__} {brief(attention_mask)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:  # (mtp and ladir read it first)
        raise ValueError(f"attention_mask must have shape {tuple(input_ids.shape)}, got {tuple(attention_mask.shape)}")


def odd_mask_values(mask: Tensor) -> Tensor:
    """[B, T] bool: where ``attention_mask`` holds neither 1 (token) nor 0 (pad) (none for a bool mask)."""
    return (mask != 0) & (mask != 1) if mask.dtype != torch.bool else torch.zeros_like(mask)


def odd_mask_error(mask: Tensor, odd: Tensor) -> ValueError:
    """The error for the first value ``odd_mask_values`` found: an additive 0 / -inf mask would otherwise be
    taken the other way round (its 0s as pads, its -inf as tokens)."""
    at = odd.nonzero()[0]
    return ValueError(f"attention_mask: {mask[tuple(at)].item()} at {at.tolist()}: the mask holds 1 for a token and "
                      "0 for a pad (not an additive 0 / -inf mask)")


def _check_left_padded(mask: Tensor, min_tokens: int, left_only: bool = True) -> int:
    """The longest row's real tokens of a prompt mask [B, T] (nonzero: token), after refusing a value other
    than 0 and 1, a row with a pad after a token (``left_only``: a mode that continues every row from its
    last column takes left padding, as HF's decoder-only generation) and, for ``min_tokens`` 1, a row of
    pads only. One host read."""
    valid, odd = mask.to(torch.bool), odd_mask_values(mask)
    counts = valid.sum(1)
    late_pad = valid[:, :-1] & ~valid[:, 1:]  # a token followed by a pad
    longest, shortest, bad, n_odd = torch.stack([counts.max(), counts.min(), late_pad.any(), odd.any()]).tolist()
    if n_odd:
        raise odd_mask_error(mask, odd)
    if bad and left_only:
        row, col = late_pad.nonzero()[0].tolist()
        raise ValueError(f"attention_mask: row {row} has a pad after a token (column {col + 1}): generate takes "
                         "left-padded prompts (pads first, then the row's tokens)")
    if shortest < min_tokens:
        row = int((counts < min_tokens).nonzero()[0])
        raise ValueError(f"attention_mask: row {row} has no token (all pads); generate continues a prompt of at "
                         "least one token per row")
    return int(longest)


def check_length(model: Any, input_ids: Tensor, max_new_tokens: int, attention_mask: Tensor | None = None,
                 reserved: int = 0, what: str = "", min_tokens: int = 1, left_only: bool = True) -> int:
    """Refuse, before any work, a prompt that is not token ids (``check_prompt``; ``min_tokens``:
    0 for a mode that can start from nothing) and a generation that would run past
    ``max_seq_len``: the longest prompt row (real tokens: pads do not count, nor do meta tokens,
    as in ``HybridLM.forward``) plus ``max_new_tokens`` plus the ``reserved`` positions the mode
    adds (``what`` names them). One host read when there is a mask. Returns the longest row's
    real tokens."""
    if not int_at_least(max_new_tokens, 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    check_prompt(input_ids, attention_mask, min_tokens)
    T = input_ids.shape[1]
    if attention_mask is not None and T:
        T = _check_left_padded(attention_mask, min_tokens, left_only)
    max_len, n_meta = model.config.max_seq_len, model.config.meta_tokens
    if T + max_new_tokens + reserved > max_len:
        note = f"; the {n_meta} meta tokens are not counted" if n_meta else ""
        extra = f" + {what or 'reserved positions'} ({reserved})" if reserved else ""
        if T + reserved > max_len:  # no max_new_tokens fits: the prompt is too long (the hint <= 0 was wrong)
            raise ValueError(f"generate: prompt ({T} tokens){extra} = {T + reserved} exceeds max_seq_len {max_len} "
                             f"by itself{note}")
        raise ValueError(f"generate: prompt ({T} tokens) + max_new_tokens ({max_new_tokens}){extra} = "
                         f"{T + max_new_tokens + reserved} exceeds max_seq_len {max_len} (use max_new_tokens <= "
                         f"{max(max_len - T - reserved, 0)}{note})")
    return T


def generate_ar(
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
    engine: str = "auto",
) -> Tensor:
    """Cached autoregressive decoding. ``engine`` (``models/decode_engine.py``): ``graph``
    replays each step from a CUDA graph over static caches, ``static`` runs the step eagerly
    on static caches, ``dynamic`` on the growing cache; ``auto`` is ``graph`` on CUDA (when
    there are more than a few steps) and ``dynamic`` elsewhere. Greedy output is the same
    token for token (tested in float32 on the CPU and in float32 and bf16 with the CUDA graph; a
    bf16 model's static engine on the CPU is not always bit-equal to the dynamic cache: a near-tie
    may go the other way; ARCHITECTURE.md, "The cache protocol").
    ``stats["engine"]`` says which ran (and ``stats["engine_notice"]`` why
    a graph was not used, if capture failed)."""
    from .decode_engine import engine_for, resolve_engine

    check_length(model, input_ids, max_new_tokens, attention_mask)
    B = input_ids.shape[0]
    kind = resolve_engine(engine, input_ids.device, max_new_tokens)
    cache = model.new_cache(B, device=input_ids.device)
    out = model(input_ids, attention_mask=attention_mask, cache=cache, logits_to_keep=1)  # checks the prompt's ids
    eng = step = None
    if kind != "dynamic" and max_new_tokens > 1:
        eng = engine_for(model, cache, max_new_tokens, graph=kind == "graph")
        cache, step = None, eng.step  # the engine holds its own copy of the cache

    def report(n: int) -> None:  # n tokens a row: prefill + one per token but the last
        more = {"engine": eng.mode if eng is not None else "dynamic"}
        if eng is not None and eng.notice:
            more["engine_notice"] = eng.notice
        _report(stats, forwards=max(n, 1), tokens=n * B, rows=B, **more)

    new = continue_ar(model, cache, out.logits[:, -1], max_new_tokens, temperature, top_k, top_p, eos_token_id,
                      generator, reporting(streamer, report), step=step, min_p=min_p)
    report(new.shape[1])
    return torch.cat([input_ids, new], dim=1)


def continue_ar(model: Any, cache: Any, last: Tensor, max_new_tokens: int, temperature: float = 0.0,
                top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
                generator: torch.Generator | None = None, streamer: Callable[[Tensor], Any] | None = None,
                step: Callable[[Tensor], Tensor] | None = None, min_p: float | None = None) -> Tensor:
    """Autoregressive decoding on a cache that already holds the context, from the logits
    ``last`` [B, V] of its last position: the new tokens [B, n] (n < max_new_tokens only when
    every row has ended with EOS; after a row's EOS, EOS). ``step`` (tokens [B] -> logits
    [B, V]) replaces the model call on ``cache`` (the decode engine's ``step``)."""
    if step is None:
        # sampled from the model's own logits, and the length was checked up front: no checks
        # (they would cost a device sync per token on CUDA)
        def step(tok: Tensor) -> Tensor:
            return model(tok[:, None], cache=cache, check_inputs=False, collect_aux=False).logits[:, -1]
    B = last.shape[0]
    eos = end_tokens(eos_token_id, last.device)
    done = torch.zeros(B, dtype=torch.bool, device=last.device)
    new = []
    for _ in range(max_new_tokens):
        nxt = sample_next(last, temperature, top_k, top_p, generator, min_p)
        if eos is not None:
            nxt = torch.where(done, torch.full_like(nxt, eos.fill), nxt)
            done |= eos.hit(nxt)
        new.append(nxt)
        if streamer is not None:
            streamer(nxt)
        if (eos is not None and bool(done.all())) or len(new) == max_new_tokens:
            break  # the last token's logits would never be used: no forward for it
        last = step(nxt)
    if not new:
        return torch.zeros(B, 0, dtype=torch.long, device=last.device)
    return torch.stack(new, 1)


def speculative_summary(mode: str, stats: dict, model_word: str = "target") -> str:
    """The one-line report of a speculative decoder (``stats["summary"]``; ``hymba generate``
    prints it): ``speculative: k 4, acceptance rate 0.81 (52 of 64 drafts), 3.20 tokens per
    target forward (20 forwards, 4 of them rollbacks), 16 rounds``; rollbacks that gathered
    recorded states (no forward) are named after the forwards: ``(16 forwards, 0 of them
    rollbacks; 4 rollbacks from recorded states)``."""
    recorded = stats.get("recorded_rewinds", 0)
    return (f"{mode}: k {stats['k']}, acceptance rate {stats['acceptance_rate']:.2f} ({stats['accepted']} of "
            f"{stats['proposed']} drafts), {stats['tokens_per_target_forward']:.2f} tokens per {model_word} forward "
            f"({stats['target_forwards']} forwards, {stats['rewind_forwards']} of them rollbacks"
            + (f"; {recorded} rollbacks from recorded states" if recorded else "") + f"), {stats['rounds']} rounds")


def _report(stats: dict | None, forwards: int, tokens: int, rows: int, **more: Any) -> None:
    if stats is not None:
        stats.update(forwards=forwards, tokens=tokens, tokens_per_forward=tokens / max(forwards * rows, 1), **more)


def reporting(streamer: Callable[[Tensor], Any] | None, report: Callable[[int], None]) -> Callable[[Tensor], Any] | None:
    """``streamer`` for a decoder whose ``stats`` (and ``stats["summary"]``) ``report(columns)`` fills at its
    end: a streamer's exception that ends the call early (``hymba generate --stop``: ``AllStopped`` once every
    row met a stop string) fills them first, as far as the call went, then goes on. ``columns``: the token
    columns the streamer was given, the one it stopped at included. The decoders call it where their counts
    are whole (after a round, a block, a token), so the partial stats are those of a shorter call."""
    if streamer is None:
        return None
    columns = 0

    def call(x: Tensor) -> Any:
        nonlocal columns
        columns += 1
        try:
            return streamer(x)
        except Exception:
            report(columns)
            raise

    return call


def token_confidence(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                     generator: torch.Generator | None, min_p: float | None = None) -> tuple[Tensor, Tensor]:
    """(token, its confidence) per position of logits [..., V]: the token greedy at temperature 0,
    else drawn from the filtered, temperature-scaled distribution (``filtered_probs``); its
    confidence is its probability under the model's own ``softmax(logits)`` in both cases, as in
    Fast-dLLM (under the filtered distribution, top_k 1 or a small top_p would make every
    confidence ~1 and unmask a whole block in one step)."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    probs = flat.softmax(-1)
    tok = probs.argmax(-1) if temperature <= 0 else draw(filtered_probs(flat, temperature, top_k, top_p, min_p),
                                                         generator)
    conf = probs.gather(-1, tok[:, None]).squeeze(-1)
    return tok.view(logits.shape[:-1]), conf.view(logits.shape[:-1])


#: ``generate(mode="block_diffusion", sampler=...)``: the most confident positions first (LLaDA /
#: Fast-dLLM), or BD3-LM's ancestral samplers over uniformly random positions (module docstring)
SAMPLERS = ("confidence", "ddpm", "first_hitting")

#: the confidence sampler's ``threshold`` when none is given
CONFIDENCE_THRESHOLD = 0.9

#: ``generate_block_diffusion``'s ``threshold`` not given (None is a given value: the steps schedule)
_NOT_GIVEN = object()


def ddpm_reveal_steps(cfg: Any, shape: tuple[int, ...], n_steps: int, generator: torch.Generator | None,
                      device: torch.device | str) -> Tensor:
    """[shape] long: the step of a ``n_steps``-step DDPM sampler of masked diffusion at which each
    position of a fully masked block is revealed, all drawn at once. Going down the grid t_i = 1 - i /
    n_steps, a masked position is revealed from t_i to t_(i+1) with probability (alpha_s - alpha_t) /
    (1 - alpha_t) = 1 - m(t_(i+1)) / m(t_i) (MDLM Eq. 7; BD3-LM's ``_ddpm_caching_update``: q(x_s | x_t)
    keeps [MASK] with probability m(s) / m(t)), so it is still masked after step i with probability
    m(t_(i+1)) (m(1) = 1): with u ~ U(0, 1) its step is the first i with m(t_(i+1)) < u (the last at
    the latest: m(0) = 0), found by bisection over the steps (m, ``mask_rate``, is increasing), in
    float64. The same law as drawing each step's reveals in turn, at a cost that does not grow with
    ``n_steps`` past its logarithm (any number of steps)."""
    u = torch.rand(shape, dtype=torch.float64, device=device, generator=generator)
    lo = torch.zeros(shape, dtype=torch.long, device=device)
    hi = torch.full(shape, n_steps - 1, dtype=torch.long, device=device)
    for _ in range(max(1, (n_steps - 1).bit_length())):  # the interval [lo, hi] halves each time
        mid = (lo + hi) // 2
        gone = mask_rate(cfg, 1.0 - (mid + 1).to(torch.float64) / n_steps) < u  # revealed by step mid
        hi, lo = torch.where(gone, mid, hi), torch.where(gone, lo, mid + 1)
    return lo


def first_hitting_reveal(masked: Tensor, generator: torch.Generator | None) -> Tensor:
    """[B, W] bool: one uniformly chosen masked position per row that has one (the first-hitting
    sampler's step, Zheng et al. 2025; BD3-LM's ``first_hitting``): the masked position of the
    largest uniform draw."""
    u = torch.rand(masked.shape, device=masked.device, generator=generator).masked_fill(~masked, -1.0)
    return masked & (torch.arange(masked.shape[1], device=masked.device) == u.argmax(1, keepdim=True))


def generate_block_diffusion(
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
    block_size: int | None = None,
    threshold: float | None = _NOT_GIVEN,  # type: ignore[assignment]
    steps: int | None = None,
    sampler: str = "confidence",
) -> Tensor:
    """Block-diffusion sampling (module docstring). ``block_size``: the model's training block
    size by default; ``threshold``: confidence for parallel unmasking (default 0.9; None: ``steps``
    schedule; 1.0 or more: one token per step; the confidence sampler's alone); ``steps``: the most denoising steps per block
    (default ``block_size``: one token per step at worst; ``ddpm``: the steps of its time grid,
    any number); ``sampler``: ``confidence`` (most confident first), ``ddpm`` or ``first_hitting``
    (BD3-LM's ancestral samplers: random positions, ``SAMPLERS``)."""
    mask_id = model.objective.mask_token_id
    if mask_id is None:
        raise ValueError("mode block_diffusion needs a model trained with the block_diffusion objective "
                         "(its recipe has no objective: {kind: block_diffusion})")
    bs = block_size if block_size is not None else model.objective.cfg.block_size
    if not int_at_least(bs, 1):
        raise ValueError(f"block_size must be an integer >= 1, got {bs!r}")
    if steps is not None and not int_at_least(steps, 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {brief(sampler)}")
    if threshold is _NOT_GIVEN:
        threshold = CONFIDENCE_THRESHOLD if sampler == "confidence" else None
    elif sampler != "confidence":
        raise ValueError(f"threshold={brief(threshold)}: only for sampler='confidence' (sampler={sampler!r} reveals "
                         "random positions)")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, numbers.Real)
                                  or not threshold > 0):
        raise ValueError(f"threshold must be a number > 0 (or None for the steps schedule), got {brief(threshold)}")
    longest = check_length(model, input_ids, max_new_tokens, attention_mask, min_tokens=0)  # may start from nothing
    B = input_ids.shape[0]
    cache = model.new_cache(B, device=input_ids.device)
    # prefill (it checks the prompt's ids); nothing to prefill without tokens or meta tokens (the
    # recurrent mixers' chunked references take no empty sequence)
    prefill = bool(longest or model.config.meta_tokens)
    if prefill:
        model(input_ids, attention_mask=attention_mask, cache=cache)
    dev = input_ids.device
    eos = end_tokens(eos_token_id, dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    forwards, blocks, steps_used = int(prefill), [], []
    room = model.config.max_seq_len - longest  # positions after the longest prompt

    def report(_: int = 0) -> None:  # the blocks denoised so far (a stop: the streamer is called after each)
        n_tokens = sum(b.shape[1] for b in blocks)
        _report(stats, forwards=forwards, tokens=n_tokens * B, rows=B, block_size=bs,
                steps_per_block=sum(steps_used) / max(len(steps_used), 1))
        if stats is not None:
            stats["sampler"] = sampler
            name = "block diffusion" if sampler == "confidence" else f"block diffusion ({sampler} sampler)"
            stats["summary"] = [f"{name}: block size {bs}, {forwards} forward passes for {n_tokens} tokens per "
                                f"row ({stats['tokens_per_forward']:.2f} tokens per forward, prefill and block "
                                f"commits included), {stats['steps_per_block']:.2f} denoising steps per block"]

    streamer = reporting(streamer, report)
    for start in range(0, max_new_tokens, bs):
        size = min(bs, max_new_tokens - start)  # the tokens this block gives
        # a last, partial block is denoised at the full block size where it fits (as every noisy
        # block in training) and cut: its first ``size`` tokens are a draw of the model's marginal
        width = min(bs, room - start)
        n_steps = min(steps if steps is not None else width, width)
        x = torch.full((B, width), mask_id, dtype=input_ids.dtype, device=dev)
        used = 0
        if sampler == "ddpm":  # each position's step drawn at once; a forward per step that reveals any
            # (a step revealing nothing leaves the block unchanged: no forward, BD3-LM's cached p_x0)
            at = ddpm_reveal_steps(model.objective.cfg, tuple(x.shape), steps if steps is not None else width,
                                   generator, dev)
            for i in torch.unique(at).tolist():  # (ascending)
                logits = model(x, cache=cache.fork(), bidirectional=True, check_inputs=False).logits
                forwards += 1
                used += 1
                x = torch.where(at == i, sample_next(logits, temperature, top_k, top_p, generator, min_p), x)
        elif sampler == "first_hitting":  # BD3-LM's: one uniformly random masked position a step
            for i in range(n_steps):
                masked = x == mask_id
                if not bool(masked.any()):
                    break
                reveal = first_hitting_reveal(masked, generator) if i < n_steps - 1 else masked
                logits = model(x, cache=cache.fork(), bidirectional=True, check_inputs=False).logits
                forwards += 1
                used += 1
                x = torch.where(reveal, sample_next(logits, temperature, top_k, top_p, generator, min_p), x)
        while sampler == "confidence":
            masked = x == mask_id
            if not bool(masked.any()):
                break
            # the cache does not move: the block runs on a fork (no memory: states are shared)
            logits = model(x, cache=cache.fork(), bidirectional=True, check_inputs=False).logits
            forwards += 1
            used += 1
            tok, conf = token_confidence(logits, temperature, top_k, top_p, generator, min_p)
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
        x = x[:, :size]
        if eos is not None:
            x = torch.where(done[:, None], torch.full_like(x, eos.fill), x)
            x = torch.where(eos.after(x), torch.full_like(x, eos.fill), x)  # after the first EOS the row is over
            done |= eos.hit(x).any(1)
        blocks.append(x)
        steps_used.append(used)
        if streamer is not None:
            for j in range(size):
                streamer(x[:, j])
        if eos is not None and bool(done.all()):
            break
        if start + size < max_new_tokens:  # commit the denoised block: the ordinary cached forward
            model(x, cache=cache, check_inputs=False)
            forwards += 1
    report()
    if not blocks:
        return input_ids
    return torch.cat([input_ids, *blocks], dim=1)


def record_by_default(record_states: bool | None, device: torch.device) -> bool:
    """Speculative decoding's ``record_states`` (``None``: the default for ``device``): a verify chunk
    recorded (``HybridLM.forward(record_states=True)``) runs the mixers' reference kernels, which is
    what the CPU runs anyway; on CUDA it would replace fla's / mamba-ssm's kernels in every verify
    forward to save the re-run of rounds with a rejected draft, a trade not yet timed on a GPU, so
    there the default stays the re-run (``record_states=True`` asks for recording)."""
    if record_states is None:
        return torch.device(device).type != "cuda"
    if not isinstance(record_states, bool):
        raise ValueError(f"record_states must be True, False or None (the device's default), got {record_states!r}")
    return record_states


class DraftError(ValueError):
    """``generate(mode="speculative")``: a draft model that cannot serve the call (another vocabulary, a
    ``max_seq_len`` too short for the prompt and ``max_new_tokens``): the draft checkpoint's own limit
    (``hymba generate`` exits 1 naming ``--draft``, where a flag's value the model cannot take exits 2)."""

def generate_speculative(
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
    draft: Any = None,
    k: int = 4,
    record_states: bool | None = None,
) -> Tensor:
    """Lossless draft-model speculative decoding (module docstring). ``draft``: a smaller
    ``HybridLM`` with the same ``vocab_size``; ``k``: tokens the draft proposes per round;
    ``record_states``: the target's verify forward records per-position states so its rollback
    needs no forward (``HybridLM.forward``; False: always re-run; the output is the same)."""
    if draft is None:
        raise ValueError("mode speculative needs a draft model: generate(..., mode='speculative', draft=small_model)")
    if not all(hasattr(draft, a) for a in ("config", "new_cache", "rewind")):  # a path, a state dict, ...
        raise TypeError(f"draft must be a model (a HybridLM, e.g. from_pretrained(path)), got "
                        f"{type(draft).__name__} {brief(draft)}")
    if not int_at_least(k, 1):
        raise ValueError(f"k must be an integer >= 1 (draft tokens per round), got {k!r}")
    V, Vd = model.config.vocab_size, draft.config.vocab_size
    if V != Vd:
        raise DraftError(f"the draft model's vocab_size {Vd} differs from the target model's vocab_size {V}: "
                         "speculative decoding needs one shared vocabulary")
    check_length(model, input_ids, max_new_tokens, attention_mask)
    record_states = record_by_default(record_states, input_ids.device)  # (input_ids checked: a tensor)
    try:
        check_length(draft, input_ids, max_new_tokens, attention_mask)
    except ValueError as e:
        raise DraftError(f"draft model: {e}") from None
    k = min(k, max(max_new_tokens, 1))  # more draft tokens than will be kept only cost memory (B x (N + k + 1))
    B, N, dev = input_ids.shape[0], max_new_tokens, input_ids.device
    greedy = temperature <= 0
    ddev = draft.device

    def target_dist(logits: Tensor) -> Tensor:
        return logits if greedy else filtered_probs(logits, temperature, top_k, top_p, min_p)

    def pick(dist: Tensor) -> Tensor:  # dist: raw logits (greedy) or probabilities
        return dist.argmax(-1) if greedy else draw(dist, generator)

    cache = model.new_cache(B, device=dev)
    first = model(input_ids, attention_mask=attention_mask, cache=cache,
                  logits_to_keep=1).logits[:, -1]  # checks the prompt's ids
    n_target = n_verify = n_rewind = n_recorded = n_draft = n_draft_rewind = rounds = 0
    n_target += 1
    if N == 0:
        _report(stats, forwards=1, tokens=0, rows=B, target_forwards=1, verify_forwards=0, rewind_forwards=0,
                recorded_rewinds=0,
                draft_forwards=0, draft_rewind_forwards=0, rounds=0, proposed=0, accepted=0, acceptance_rate=0.0,
                tokens_per_target_forward=0.0, k=k)
        return input_ids
    dcache = draft.new_cache(B, device=ddev)
    draft(input_ids.to(ddev), attention_mask=None if attention_mask is None else attention_mask.to(ddev),
          cache=dcache)
    n_draft += 1
    # Between rounds both caches hold the prompt and every committed token but the last one,
    # ``last``: the next round feeds it first.
    last = pick(target_dist(first))
    eos = end_tokens(eos_token_id, dev)
    fill = eos.fill if eos is not None else 0
    out = torch.full((B, N + k + 1), fill, dtype=input_ids.dtype, device=dev)  # k + 1 spare: no clamping
    out[:, 0] = last
    produced = torch.ones(B, dtype=torch.long, device=dev)
    no = torch.zeros(B, dtype=torch.bool, device=dev)
    done = eos.hit(last) if eos is not None else no
    proposed = accepted = torch.zeros((), dtype=torch.long, device=dev)
    cols = torch.arange(k + 1, device=dev)
    rows = torch.arange(B, device=dev)
    streamed = 0

    def report(_: int = 0) -> None:  # the rounds run so far (a stop: the streamer is called between rounds)
        tokens = int(produced.max()) * B
        n_prop, n_acc_total = int(proposed), int(accepted)
        _report(stats, forwards=n_target, tokens=tokens, rows=B, target_forwards=n_target, verify_forwards=n_verify,
                rewind_forwards=n_rewind, recorded_rewinds=n_recorded, draft_forwards=n_draft,
                draft_rewind_forwards=n_draft_rewind, rounds=rounds, proposed=n_prop, accepted=n_acc_total,
                acceptance_rate=n_acc_total / n_prop if n_prop else 0.0,
                tokens_per_target_forward=tokens / (n_target * B), k=k)
        if stats is not None:
            stats["summary"] = [speculative_summary("speculative", stats)]

    streamer = reporting(streamer, report)
    while True:
        active = ~done & (produced < N)
        # drafts per row this round: a row never passes max_new_tokens (rows that are over: 0)
        k_row = torch.where(active, (N - produced - 1).clamp(max=k), 0)
        # columns every row has produced (a finished row's are EOS up to the longest row)
        frontier = torch.where(done, produced.max(), produced).min()
        n_active, K, k_min, frontier = torch.stack([active.sum(), k_row.max(), k_row.min(), frontier]).tolist()
        if streamer is not None:
            for j in range(streamed, frontier):
                streamer(out[:, j])
            streamed = max(streamed, frontier)
        if n_active == 0:
            break
        rounds += 1
        # 1. the draft proposes K tokens, one forward each; a row past its k_row stands still
        dsnap = dcache.snapshot()
        chunk, q_list = [last], []
        for j in range(K):
            part = active & (k_row > j)
            m = None if k_min > j else part.long()[:, None].to(ddev)
            logits = draft(chunk[-1][:, None].to(ddev), attention_mask=m, cache=dcache,
                           check_inputs=False).logits[:, -1].to(dev)
            n_draft += 1
            q = target_dist(logits)
            if not greedy:  # rows standing still: any finite distribution (their draws are unused)
                q = torch.where(part[:, None], q, 1.0 / V)
            q_list.append(q)
            chunk.append(pick(q))
        ids = torch.stack(chunk, 1)  # [B, K + 1]: last, d_1 .. d_K
        drafts = ids[:, 1:]
        # 2. the target scores the K drafts and the bonus position in one forward of K + 1 tokens
        snap = cache.snapshot()
        fed = torch.where(active, k_row + 1, 0)
        vmask = None if n_active == B and k_min == K else (cols[None, : K + 1] < fed[:, None]).long()
        tlogits = model(ids, attention_mask=vmask, cache=cache, check_inputs=False,
                        record_states=record_states).logits  # [B, K + 1, V]
        n_target += 1
        n_verify += 1
        if greedy:  # the one-hot case of the rule below, without building the distributions
            ok = (drafts == tlogits[:, :K].argmax(-1)) & (cols[None, :K] < k_row[:, None])
            n_acc = ok.long().cumprod(1).sum(1)  # [B]: the longest accepted prefix
            nxt = tlogits[rows, n_acc].argmax(-1)
        else:
            Q = torch.stack(q_list, 1) if K else tlogits.new_zeros(B, 0, V)  # [B, K, V]
            n_acc, nxt = accept_drafts(filtered_probs(tlogits, temperature, top_k, top_p, min_p), Q, drafts,
                                       generator, limit=k_row)
        # 3. commit per row: the accepted drafts, then the target's token; up to the first EOS
        new = torch.cat([drafts, drafts.new_zeros(B, 1)], 1).scatter(1, n_acc[:, None], nxt[:, None])
        n_new = torch.where(active, n_acc + 1, 0)
        if eos is not None:
            is_eos = eos.hit(new) & (cols[None, : K + 1] < n_new[:, None])
            hit = is_eos.any(1)
            n_new = torch.where(hit, is_eos.long().argmax(1) + 1, n_new)
            done = done | hit
        pos = produced[:, None] + cols[None, : K + 1]
        out.scatter_(1, pos, torch.where(cols[None, : K + 1] < n_new[:, None], new, out.gather(1, pos)))
        proposed = proposed + k_row.sum()
        accepted = accepted + torch.minimum(n_acc, k_row).sum()
        produced = produced + n_new
        last = torch.where(n_new > 0, new.gather(1, (n_new - 1).clamp(min=0)[:, None]).squeeze(1), last)
        # 4. roll back. The target fed ``fed`` tokens of ids and keeps n_new: ``last`` and the
        # accepted drafts before the committed token. The draft fed k_row and needs n_new, only
        # for rows that go on. ``rewind``: restore the snapshot, re-run the kept tokens, one forward.
        # A row that kept every draft needs one token more than the draft fed (d_k_row, which
        # it drew but never fed): when no row needs less, one cached step of it (gpt-fast's
        # catch-up), not a rewind that re-runs all k_row + 1.
        going = ~done & (produced < N)
        keep_d = torch.where(going, n_new, torch.where(active, k_row, 0))
        # a row that stops here (EOS, or max_new_tokens) is never read again: it forces no rewind
        behind = keep_d > k_row  # (keep_d <= k_row + 1; both only for a row that goes on)
        need_t, back, n_behind = torch.stack([(going & (n_new != fed)).any(), (keep_d < k_row).any(),
                                              behind.sum()]).tolist()
        if need_t:
            if model.rewind(cache, snap, ids, n_new):
                n_target += 1
                n_rewind += 1
            else:
                n_recorded += 1
        if back:
            draft.rewind(dcache, dsnap, ids.to(ddev), keep_d.to(ddev))
            n_draft += 1
            n_draft_rewind += 1
        elif n_behind:
            m = None if n_behind == B else behind.long()[:, None].to(ddev)
            draft(ids.gather(1, k_row[:, None]).to(ddev), attention_mask=m, cache=dcache, check_inputs=False)
            n_draft += 1
    report()
    return torch.cat([input_ids, out[:, :int(produced.max())]], dim=1)


GENERATORS: dict[str, Callable[..., Tensor]] = {"ar": generate_ar, "block_diffusion": generate_block_diffusion,
                                                "speculative": generate_speculative}
