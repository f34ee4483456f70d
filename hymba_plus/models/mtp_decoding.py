"""Self-speculative decoding with the MTP modules (``generate(mode="mtp")``).

A model with ``model.mtp`` (``components/mtp.py``) drafts with its own prediction modules
and verifies with its trunk, losslessly (speculative decoding: Leviathan et al. 2023,
arXiv 2211.17192; Chen et al. 2023, arXiv 2302.01318; MTP drafting as DeepSeek-V3 §2.2
suggests).

Positions and who has seen what. Let the trunk's cache hold tokens x_0 .. x_{P-1} and let
c = x_P be the next token, already chosen. Module i (1-based) at position s reads the
depth-(i-1) hidden state at s and the embedding of x_{s+i}; its cache only ever consumes
positions whose inputs are *verified* tokens, s <= P - i ("committed"). A round:

1. **draft**: d_1 comes from module 1's output at its last committed position P - 1;
   module i >= 2 runs positions P - i + 1 .. P - 1 on a *fork* of its cache (their inputs
   include drafts d_1 .. d_{i-1}; the fork leaves the cache untouched) and its output at
   P - 1 gives d_i;
2. **verify**: one trunk forward of ``[c, d_1 .. d_k]`` on the cache (snapshot first)
   scores every draft and one more token;
3. **accept**: greedy keeps the longest prefix where d_j equals the trunk's argmax, then
   the trunk's token; with temperature > 0, d_j is kept with probability
   min(1, p_j(d_j) / q_j(d_j)), the first rejected position samples from
   norm(max(0, p - q)), and a fully accepted round samples one more token from p: the
   tokens are distributed exactly as sampling from the trunk alone (top-k / top-p apply to
   p and q alike);
4. **roll back** the trunk to ``[c, accepted drafts]`` per row (``HybridLM.rewind``: with
   ``record_states`` (the default off CUDA: ``record_by_default``) and a trunk whose every layer records, the verify forward
   kept each layer's state after every chunk position and the rollback gathers each row's, no
   forward; else restore the snapshot and re-run the kept tokens; skipped when every row
   kept everything), and
   **commit** the a + 1 newly verified positions to every module's cache in one forward
   per module (per-row lengths through the padding rule). With k below the depth, modules
   k + 1 .. depth never draft and never run, and a prompt needs k tokens (not the depth).

Near the end a round drafts fewer than k (as mode ``speculative``): no more than a live row
can still emit after c, and few enough that every live row's verify chunk stays within
``max_seq_len`` (none when every live row needs just one more token: the verify is c alone).

Rows that reach ``max_new_tokens`` or EOS are finished: their output is fixed and their
caches, never read again, keep what the live rows keep most (so they never force a rewind forward, nor
grow the caches faster than the live rows). ``stats``: trunk forwards (prefill + verify + rewind), module forwards,
drafts proposed and accepted, acceptance rate, tokens per trunk forward; ``rewind_forwards`` counts the rollbacks
that re-ran tokens, ``recorded_rewinds`` those that gathered recorded states instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..core.cache import StepContext
from .generation import (
    GENERATORS,
    accept_drafts,
    check_length,
    draw,
    end_tokens,
    filtered_probs,
    int_at_least,
    record_by_default,
    reporting,
    speculative_summary,
)


def distribution(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                 min_p: float | None = None) -> Tensor:
    """The distribution a token is drawn from: one-hot at the argmax for temperature 0 (so greedy
    is the same accept / reject rule), else ``generation.filtered_probs``."""
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    return filtered_probs(logits, temperature, top_k, top_p, min_p)


def _gather_at(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, T, D] at per-row index idx [B] -> [B, D]."""
    return x.gather(1, idx.clamp(min=0)[:, None, None].expand(-1, 1, x.shape[-1])).squeeze(1)


@torch.no_grad()
def generate_mtp(
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
    k: int | None = None,
    record_states: bool | None = None,
) -> Tensor:
    """Self-speculative decoding with the MTP modules (module docstring); ``k``: drafts per
    round, 1 .. model.mtp.depth (default: the depth). ``streamer`` gets each round's new
    tokens of row 0 one by one. ``record_states``: the verify forward records per-position
    states so a rollback needs no forward (``HybridLM.forward``; False: always re-run, as
    before; the output is the same either way)."""
    mtp = model.mtp
    if mtp is None:
        raise ValueError("mode mtp needs a model with MTP modules (a recipe with model.mtp)")
    D = mtp.depth
    k = D if k is None else k
    if not int_at_least(k, 1) or k > D:
        raise ValueError(f"k must be an integer in [1, {D}] (model.mtp.depth), got {k!r}")
    check_length(model, input_ids, max_new_tokens, attention_mask)
    record_states = record_by_default(record_states, input_ids.device)  # (input_ids checked: a tensor)
    B, T = input_ids.shape
    dev = input_ids.device
    valid = attention_mask.to(torch.bool) if attention_mask is not None else torch.ones(B, T, dtype=torch.bool,
                                                                                        device=dev)
    L = valid.sum(1)
    if bool((L < k).any()):  # module i's prefill reads positions 0 .. L - i, for the k modules that run
        raise ValueError(f"mode mtp: every prompt (input_ids' rows, without the pads attention_mask marks) needs at "
                         f"least {k} tokens (k, the drafts per round; model.mtp.depth by default), "
                         f"got {int(L.min())}")
    n_meta = model.config.meta_tokens
    sample = lambda logits: distribution(logits, temperature, top_k, top_p, min_p)  # noqa: E731
    head = lambda h: model.lm_head(model.norm(h))  # noqa: E731

    # prefill: the trunk, then each module that drafts (1 .. k; the deeper ones never run) commits the
    # prompt positions it can (s <= L - i)
    cache = model.new_cache(B, device=dev)
    out = model(input_ids, attention_mask=attention_mask, cache=cache, return_hidden=True, logits_to_keep=1)
    order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)  # real tokens first
    real = input_ids.gather(1, order)
    trunk = out.trunk_states.gather(1, order[..., None].expand(-1, -1, out.trunk_states.shape[-1]))
    c = draw(sample(out.logits[:, -1]), generator)
    tokens = torch.cat([real, torch.zeros_like(real[:, :1])], 1).scatter(1, L[:, None], c[:, None])
    mcache = mtp.new_cache(B, dev, model.dtype)
    last = [_gather_at(trunk, L - 1)]  # depth i's hidden state at its last committed position
    h = trunk
    m_fwd = 0
    for i in range(1, k + 1):
        width = T - i + 1
        ctx = StepContext(positions=n_meta + torch.arange(width, device=dev)[None].expand(B, -1),
                          lengths=L - i + 1, n_meta=n_meta)
        h = mtp.step(i - 1, h[:, :width], model.embed_tokens(tokens[:, i:i + width]), ctx, mcache.states[i - 1])
        last.append(_gather_at(h, L - i))
        m_fwd += 1

    P = L.clone()  # the position of c
    emitted = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev) if max_new_tokens > 0 else torch.ones(B, dtype=torch.bool,
                                                                                              device=dev)
    eos = end_tokens(eos_token_id, dev)
    fill = eos.fill if eos is not None else 0  # after a row's EOS: EOS (as generate_ar)
    out_tokens = torch.full((B, max_new_tokens + k + 1), fill, dtype=input_ids.dtype, device=dev)
    streamed = 0
    forwards, rewinds, recorded, proposed, accepted_total, rounds = 1, 0, 0, 0, 0, 0

    def report(_: int = 0) -> None:  # the rounds run so far (a stop: the streamer is called after each)
        if stats is not None:  # the same keys as mode speculative where they mean the same
            tokens_per_row = float(emitted.float().mean())
            stats.update(forwards=forwards, target_forwards=forwards, rewind_forwards=rewinds,
                         recorded_rewinds=recorded, mtp_forwards=m_fwd, rounds=rounds, k=k, proposed=proposed,
                         accepted=accepted_total, acceptance_rate=accepted_total / max(proposed, 1),
                         tokens=int(emitted.sum()), tokens_per_forward=tokens_per_row / forwards,
                         tokens_per_target_forward=tokens_per_row / forwards)
            stats["summary"] = [speculative_summary("mtp", stats, "trunk")]

    streamer = reporting(streamer, report)

    def flush(upto: int) -> int:
        """Stream the columns ``streamed .. upto - 1``, which every row has produced (a finished row's
        are EOS); returns the new count."""
        for t in range(streamed, upto):
            streamer(out_tokens[:, t])
        return max(streamed, upto)

    # c is the first new token of every row
    if max_new_tokens > 0:
        out_tokens[:, 0] = c
        emitted += 1
        if eos is not None:
            done |= eos.hit(c)
        done |= emitted >= max_new_tokens
        if streamer is not None:
            streamed = flush(1)
    rows = torch.arange(B, device=dev)
    room_seq = model.config.max_seq_len - L  # real tokens a row's trunk cache may still take, after its prompt
    while True:
        live = ~done
        # drafts this round: no more than a live row can still emit after the round's first token, and a
        # verify chunk within max_seq_len for every live row (it holds L + emitted - 1 tokens, feeds kr + 1)
        n_live, most, least = torch.stack([live.sum(), torch.where(live, max_new_tokens - emitted - 1, 0).max(),
                                           torch.where(live, room_seq - emitted, k).min()]).tolist()
        if n_live == 0:
            break
        kr = max(min(k, most, least), 0)
        rounds += 1
        # 1. draft d_1 .. d_kr (modules >= 2 on forks of their caches)
        drafts, qs = [], []
        if kr:
            q1 = sample(head(last[1]))
            drafts.append(draw(q1, generator))
            qs.append(q1)
        prev_out = None  # module i-1's outputs at the draft positions P - i + 2 .. P - 1
        for i in range(2, kr + 1):
            h_in = last[i - 1][:, None] if prev_out is None else torch.cat([last[i - 1][:, None], prev_out], 1)
            pos = n_meta + (P - i + 1)[:, None] + torch.arange(i - 1, device=dev)[None]
            emb = model.embed_tokens(torch.stack(drafts[:i - 1], 1))
            o = mtp.step(i - 1, h_in, emb, StepContext(positions=pos, n_meta=n_meta), mcache.states[i - 1].fork())
            m_fwd += 1
            q = sample(head(o[:, -1]))
            drafts.append(draw(q, generator))
            qs.append(q)
            prev_out = o
        d = torch.stack(drafts, 1) if kr else c.new_zeros(B, 0)  # [B, kr]
        # 2. verify [c, d_1 .. d_kr] in one trunk forward
        snap = cache.snapshot()
        chunk = torch.cat([c[:, None], d], 1)
        vo = model(chunk, cache=cache, return_hidden=True, check_inputs=False, record_states=record_states)
        forwards += 1
        # 3. accept
        p = sample(vo.logits)
        a, nxt = accept_drafts(p, torch.stack(qs, 1) if kr else p[:, :0], d, generator)
        proposed += n_live * kr
        accepted_total += int(a[live].sum())
        # 4. roll the trunk back to [c, accepted drafts]; a finished row's caches are never read
        # again: it keeps as many as the most a live row keeps (it never forces a rewind forward, nor
        # grows the caches by kr + 1 slots a round)
        keep = torch.where(live, a + 1, torch.where(live, a + 1, 0).max())
        if not bool((keep == kr + 1).all()):
            if model.rewind(cache, snap, chunk, keep):
                forwards += 1
                rewinds += 1
            else:
                recorded += 1
        # every module that drafts (1 .. k) commits the a + 1 positions whose inputs are now verified
        j = torch.arange(kr + 1, device=dev)[None]
        new_tok = torch.where(j < a[:, None], torch.cat([d, nxt[:, None]], 1), nxt[:, None])  # d_1 .. d_a, next
        emb = model.embed_tokens(new_tok)
        new_last = [torch.where(live[:, None], _gather_at(vo.trunk_states, keep - 1), last[0])]
        h_prev = vo.trunk_states
        for i in range(1, k + 1):
            h_in = h_prev if i == 1 else torch.cat([last[i - 1][:, None], h_prev[:, :kr]], 1)
            pos = n_meta + (P - i + 1)[:, None] + j
            o = mtp.step(i - 1, h_in, emb, StepContext(positions=pos, lengths=keep, n_meta=n_meta),
                         mcache.states[i - 1])
            m_fwd += 1
            new_last.append(torch.where(live[:, None], _gather_at(o, keep - 1), last[i]))
            h_prev = o
        last = new_last
        # emit d_1 .. d_a and the next token, per row, up to max_new_tokens / EOS
        room = (max_new_tokens - emitted).clamp(min=0)
        n_new = torch.minimum(a + 1, room) * live
        slot = emitted[:, None] + j
        put = j < n_new[:, None]
        out_tokens[rows[:, None].expand_as(slot)[put], slot[put]] = new_tok[put]
        if eos is not None:
            hit = put & eos.hit(new_tok)
            first = torch.where(hit.any(1), hit.float().argmax(1), n_new)
            n_new = torch.where(hit.any(1), first + 1, n_new)
            done |= hit.any(1)
            late = put & (j >= n_new[:, None])  # written after the row's EOS: EOS
            out_tokens[rows[:, None].expand_as(slot)[late], slot[late]] = eos.fill
        emitted += n_new
        done |= emitted >= max_new_tokens
        if streamer is not None:  # the columns every row has (a finished row counts as the longest)
            streamed = flush(int(torch.where(done, emitted.max(), emitted).min().clamp(max=max_new_tokens)))
        P = P + keep
        c = torch.where(live, nxt, c)
    length = int(emitted.max()) if max_new_tokens > 0 else 0  # every row ended with EOS: as long as the longest
    if streamer is not None:
        flush(length)
    new = out_tokens[:, :length]
    if eos is not None:  # after a row's EOS, EOS (as generate_ar)
        after = (torch.arange(length, device=dev)[None] >= emitted[:, None]) | eos.after(new)
        new = torch.where(after, torch.full_like(new, eos.fill), new)
    report()
    return torch.cat([input_ids, new], dim=1) if max_new_tokens > 0 else input_ids


GENERATORS["mtp"] = generate_mtp  # the decoding modes live in generation.GENERATORS
