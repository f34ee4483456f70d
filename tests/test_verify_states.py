"""Rollback without the re-run (``forward(record_states=True)`` + ``HybridLM.rewind``): a verify
chunk records every layer's state after each of its positions and the rollback gathers each
row's; advancing k with recording and rewinding to j equals advancing j, for every state type
(attention KV with windows, meta tokens and KV sharing, conv, gdn, mamba3 incl. MIMO and chunk
boundaries, ATLAS across chunk boundaries, hymba with either SSM, MoE), per row, keep 0 and keep
n, right-padded verify chunks; no forward runs; a recording is ignored once the cache moved on;
ETD falls back to the re-run; greedy ``mtp`` / ``speculative`` decoding equal ``ar`` either way."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import build_model
from hymba_plus.components.attention import AttentionState
from hymba_plus.core.cache import LayerState
from hymba_plus.kernels.conv import causal_conv1d_ref, conv_tails
from hymba_plus.kernels.mamba3 import mamba3_chunked
from tests.helpers import EVERY_COMPONENT, float64_model

V = 20
COMPS = {**EVERY_COMPONENT, "gated_attn": {**EVERY_COMPONENT["gated_attn"], "window": 5},
         "hymba": {**EVERY_COMPONENT["hymba"], "ssm": "mamba3"}}
SMALL_CHUNKS = {**EVERY_COMPONENT, "gdn": {**EVERY_COMPONENT["gdn"], "chunk_size": 2},
                "mamba3": {**EVERY_COMPONENT["mamba3"], "chunk_size": 2, "mimo_rank": 2},
                "atlas": {**EVERY_COMPONENT["atlas"], "chunk_size": 2, "window": 3},
                "hymba": {"ssm": "gdn", "attn": {"n_heads": 2, "head_dim": 16, "window": 4}}}
KV_SHARE = {**EVERY_COMPONENT, "gated_attn": {**EVERY_COMPONENT["gated_attn"], "window": 4, "kv_share": True},
            "hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "head_dim": 16, "window": 3, "kv_share": True}}}
RECIPES = {
    "every-mixer": ("GD | GA | M3 | ATL | HY", {}, COMPS),
    "small-chunks+meta": ("GD | M3 | ATL | HY", {"meta_tokens": 2}, SMALL_CHUNKS),
    "kv-share+meta": ("GA | GA | HY | HY", {"meta_tokens": 3}, KV_SHARE),
    "moe+meta": ("GA+moe | GD+moe", {"meta_tokens": 3}, COMPS),
}


def make(name: str):  # noqa: ANN201
    pattern, extra, comps = RECIPES[name] if name in RECIPES else ("GD | GA | M3 | GA", {}, COMPS)
    if name == "etd":
        extra = {"etd": {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2,
                         "max_iterations": 3}}
    return float64_model("vs", pattern, extra, comps, V)


@pytest.fixture(scope="module", params=list(RECIPES))
def model(request):
    return make(request.param)


def leaves(state: LayerState, name: str) -> list[tuple[str, LayerState]]:
    out = [(name, state)]
    for f in dataclasses.fields(state):
        if isinstance(v := getattr(state, f.name), LayerState):
            out += leaves(v, f"{name}.{f.name}")
    return out


def assert_same_states(cache, ref) -> None:  # noqa: ANN001
    """Every state equal to round-off; attention by its filled slots (position >= 0) in position
    order, per row: a slot emptied by the commit (-1) may sit in another column than the re-run's."""
    assert torch.equal(cache.pos, ref.pos)
    for i, (a, b) in enumerate(zip(cache.states, ref.states)):
        if a is None:
            assert b is None
            continue
        for (name, x), (_, y) in zip(leaves(a, str(i)), leaves(b, str(i))):
            if isinstance(x, AttentionState):
                assert (x.k is None) == (y.k is None), name
                if x.k is None:
                    continue
                for r in range(x.pos.shape[0]):
                    sx, sy = x.pos[r] >= 0, y.pos[r] >= 0
                    px, py = x.pos[r][sx], y.pos[r][sy]
                    ox, oy = px.argsort(), py.argsort()
                    assert torch.equal(px[ox], py[oy]), (name, r)
                    for t in ("k", "v"):
                        gx, gy = getattr(x, t)[r][:, sx][:, ox], getattr(y, t)[r][:, sy][:, oy]
                        assert torch.allclose(gx, gy, atol=1e-9, rtol=0), (name, t, r)
                continue
            for f in dataclasses.fields(x):
                u, w = getattr(x, f.name), getattr(y, f.name)
                if isinstance(u, LayerState):  # (a leaf of its own)
                    continue
                us = u if isinstance(u, list) else [u]
                ws = w if isinstance(w, list) else [w]
                assert len(us) == len(ws), (name, f.name)
                for p, q in zip(us, ws):
                    if isinstance(p, torch.Tensor):
                        assert p.shape == q.shape, (name, f.name)
                        ok = torch.allclose(p, q, atol=1e-9, rtol=0) if p.is_floating_point() else torch.equal(p, q)
                        assert ok, (name, f.name, (p - q).abs().max() if p.is_floating_point() else None)
                    else:
                        assert p is None and q is None or p == q, (name, f.name)


def prefilled(model, prompt: torch.Tensor, mask: torch.Tensor):  # noqa: ANN001, ANN201
    cache = model.new_cache(prompt.shape[0])
    model(prompt, attention_mask=mask, cache=cache)
    return cache


def advanced(model, prompt, mask, chunk, keep):  # noqa: ANN001, ANN201
    """The oracle: the prompt, then exactly keep[b] tokens of chunk (right padding)."""
    ref = prefilled(model, prompt, mask)
    if bool((keep > 0).any()):
        n = int(keep.max())
        m = (torch.arange(n)[None] < keep[:, None]).long()
        model(chunk[:, :n], attention_mask=m, cache=ref)
    return ref


def left_padded(B: int, T: int, g: torch.Generator, depths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, d in enumerate(depths):
        mask[b, :d] = 0
    return prompt, mask


@torch.no_grad()
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_record_then_commit_j_equals_advancing_j(model, data) -> None:
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(2, 7))
    k = data.draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    prompt, mask = left_padded(B, T, g, [data.draw(st.integers(0, T - 1)) for _ in range(B)])
    chunk = torch.randint(0, V, (B, k), generator=g)
    keep = torch.tensor([data.draw(st.integers(0, k)) for _ in range(B)])
    # a right-padded verify chunk (speculative decoding offers rows fewer drafts): keep within each row's
    fed = None
    if data.draw(st.booleans()):
        fed = torch.maximum(keep, torch.tensor([data.draw(st.integers(0, k)) for _ in range(B)]))
    cache = prefilled(model, prompt, mask)
    snap = cache.snapshot()
    vmask = None if fed is None else (torch.arange(k)[None] < fed[:, None]).long()
    model(chunk, attention_mask=vmask, cache=cache, record_states=True)
    assert cache.recorded is not None
    assert model.rewind(cache, snap, chunk, keep) is False  # a gather, no forward
    assert cache.recorded is None
    ref = advanced(model, prompt, mask, chunk, keep)
    assert_same_states(cache, ref)
    nxt = torch.randint(0, V, (B, 2), generator=g)  # and the future agrees
    assert torch.allclose(model(nxt, cache=cache).logits, model(nxt, cache=ref).logits, atol=1e-9, rtol=0)


@torch.no_grad()
@pytest.mark.parametrize("keep", [[0, 0, 0], [4, 4, 4], [0, 4, 2]])
def test_keep_nothing_everything_and_mixed(model, keep) -> None:
    g = torch.Generator().manual_seed(3)
    prompt, mask = left_padded(3, 5, g, [0, 2, 4])
    chunk = torch.randint(0, V, (3, 4), generator=g)
    keep = torch.tensor(keep)
    cache = prefilled(model, prompt, mask)
    snap = cache.snapshot()
    model(chunk, cache=cache, record_states=True)
    assert model.rewind(cache, snap, chunk, keep) is False
    assert_same_states(cache, advanced(model, prompt, mask, chunk, keep))


@torch.no_grad()
def test_a_recording_is_ignored_once_the_cache_moved_on() -> None:
    """A recording belongs to the chunk just run on top of the snapshot: after another call, a
    restore or a reorder it is gone, and with other tokens or another snapshot it is not used:
    ``rewind`` then re-runs (and is exact)."""
    model = make("every-mixer")
    g = torch.Generator().manual_seed(5)
    prompt, mask = left_padded(2, 5, g, [0, 1])
    chunk = torch.randint(0, V, (2, 3), generator=g)
    keep = torch.tensor([1, 2])
    # another forward after the recorded one: the rewind to (snapshot + keep of ``more``) re-runs
    cache = prefilled(model, prompt, mask)
    model(chunk, cache=cache, record_states=True)
    snap = cache.snapshot()
    more = torch.randint(0, V, (2, 3), generator=g)
    model(more, cache=cache)
    assert cache.recorded is None
    assert model.rewind(cache, snap, more, keep) is True
    ref = prefilled(model, prompt, mask)
    model(chunk, cache=ref)
    model(more[:, :2], attention_mask=(torch.arange(2)[None] < keep[:, None]).long(), cache=ref)
    assert_same_states(cache, ref)
    # the same shapes but other tokens than the recorded chunk: re-run
    cache = prefilled(model, prompt, mask)
    snap = cache.snapshot()
    model(chunk, cache=cache, record_states=True)
    other = (chunk + 1) % V
    assert model.rewind(cache, snap, other, keep) is True
    assert_same_states(cache, advanced(model, prompt, mask, other, keep))
    # a snapshot of an earlier point than the chunk's start: re-run from it
    cache = prefilled(model, prompt, mask)
    early = cache.snapshot()
    model(more, cache=cache)
    model(chunk, cache=cache, record_states=True)
    assert model.rewind(cache, early, chunk, keep) is True
    # a foreign snapshot is refused as by restore, recording or not
    cache = prefilled(model, prompt, mask)
    model(chunk, cache=cache, record_states=True)
    with pytest.raises(ValueError, match="rewind: the snapshot was not taken from this cache"):
        model.rewind(cache, prefilled(model, prompt, mask).snapshot(), chunk, keep)
    # restore and reorder drop it; a commit without one is refused
    snap = cache.snapshot()
    model(chunk, cache=cache, record_states=True)
    cache.restore(snap)
    assert cache.recorded is None
    model(chunk, cache=cache, record_states=True)
    cache.reorder(torch.tensor([1, 0]))
    assert cache.recorded is None and not any(s.recorded() for s in cache.states if s is not None and next(s.tensors(), None) is not None)
    with pytest.raises(ValueError, match="commit: the cache holds no recording"):
        cache.commit(keep, 2)


@torch.no_grad()
def test_etd_and_static_states_fall_back_to_the_rerun() -> None:
    """ETD (iterations, routes) records nothing: the forward ignores ``record_states`` and
    ``rewind`` re-runs, exactly."""
    model = make("etd")
    assert not model.records_states
    g = torch.Generator().manual_seed(2)
    prompt, mask = left_padded(2, 4, g, [0, 1])
    chunk = torch.randint(0, V, (2, 3), generator=g)
    keep = torch.tensor([0, 2])
    cache = prefilled(model, prompt, mask)
    snap = cache.snapshot()
    model(chunk, cache=cache, record_states=True)
    assert cache.recorded is None
    assert model.rewind(cache, snap, chunk, keep) is True
    assert_same_states(cache, advanced(model, prompt, mask, chunk, keep))
    # every other mixer records, but not into the decode engine's static buffers (written in place)
    model = make("every-mixer")
    assert model.records_states and make("kv-share+meta").records_states
    cache = prefilled(model, prompt, mask).static_copy(32)
    model(chunk, cache=cache, record_states=True)
    assert cache.recorded is None and not any(s.recorded() for s in cache.states if s is not None and next(s.tensors(), None) is not None)


def test_mamba3_states_at_every_count_equal_a_cached_prefix() -> None:
    """``mamba3_chunked(states_at=...)``: the carry after p tokens, for p across chunk boundaries,
    MIMO ranks and a start carry, equals the carry of a run of the first p tokens."""
    torch.manual_seed(0)
    B, T, H, P, R, G, N, K = 2, 7, 2, 4, 2, 1, 8, 2
    q, k = torch.randn(B, T, R, G, N, dtype=torch.float64), torch.randn(B, T, R, G, N, dtype=torch.float64)
    v, z = torch.randn(B, T, H, P, dtype=torch.float64), torch.randn(B, T, H, P, dtype=torch.float64)
    dt = torch.rand(B, T, H, dtype=torch.float64) * 0.5 + 0.05
    adt, trap = -dt * torch.rand(B, T, H, dtype=torch.float64), torch.randn(B, T, H, dtype=torch.float64)
    ang = torch.randn(B, T, H, K, dtype=torch.float64)
    qb, kb = torch.randn(H, R, N, dtype=torch.float64), torch.randn(H, R, N, dtype=torch.float64)
    mv = torch.randn(H, R, P, dtype=torch.float64)
    kw = dict(z=z, mimo_v=mv, mimo_z=mv, mimo_o=mv, D=torch.ones(H, dtype=torch.float64), pairing="half")
    _, c0 = mamba3_chunked(q, k, v, adt, dt, trap, ang, qb, kb, chunk_size=3, **kw)  # a non-zero start carry
    at = torch.arange(T + 1)
    _, end, states = mamba3_chunked(q, k, v, adt, dt, trap, ang, qb, kb, c0, chunk_size=3, states_at=at, **kw)
    for p in range(T + 1):
        if p == 0:
            want = c0
        else:
            cut = [t[:, :p] for t in (q, k, v, adt, dt, trap, ang)]
            _, want = mamba3_chunked(*cut, qb, kb, c0, chunk_size=3, **{**kw, "z": z[:, :p]})
        for got, w in zip(states, want):
            assert torch.allclose(got[:, p], w, atol=1e-10, rtol=0), p
    for got, w in zip(end, states):
        assert torch.allclose(got, w[:, -1], atol=1e-10, rtol=0)


def test_conv_tails_continue_a_cached_state() -> None:
    torch.manual_seed(1)
    x, w = torch.randn(2, 5, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    s0 = torch.randn(2, 3, 3, dtype=torch.float64)
    tails = conv_tails(x, torch.arange(6), 3, s0).view(2, 6, 3, 3)
    for p in range(6):
        want = s0 if p == 0 else causal_conv1d_ref(x[:, :p], w, None, s0)[1]
        assert torch.equal(tails[:, p], want), p


# --------------------------------------------------------------------------- decoding


@torch.no_grad()
def test_mtp_and_speculative_equal_ar_with_and_without_recording() -> None:
    from tests.test_speculative import make as spec_make
    from tests.test_speculative import noisy_copy, prompts

    comps = {**COMPS, "gated_attn": {**COMPS["gated_attn"], "window": 3}}
    target = spec_make("GD | GA | M3 | ATL | HY", {"meta_tokens": 1}, comps=comps)
    draft = noisy_copy(target, 0.5)
    ids, mask = prompts(B=3, T=6, seed=4)
    ref = target.generate(ids, 10, attention_mask=mask)
    runs = {}
    for record in (True, False):
        s: dict = {}
        out = target.generate(ids, 10, mode="speculative", draft=draft, k=3, attention_mask=mask, stats=s,
                              record_states=record)
        assert torch.equal(out, ref), record
        runs[record] = s
    assert runs[True]["rewind_forwards"] == 0 and runs[True]["recorded_rewinds"] > 0, runs[True]
    assert runs[False]["rewind_forwards"] > 0 and runs[False]["recorded_rewinds"] == 0, runs[False]
    assert runs[True]["target_forwards"] == runs[False]["target_forwards"] - runs[False]["rewind_forwards"]
    assert f"{runs[True]['recorded_rewinds']} rollbacks from recorded states" in runs[True]["summary"][0]
    assert "recorded states" not in runs[False]["summary"][0]
    with pytest.raises(ValueError, match="record_states must be True, False or None"):
        target.generate(ids, 4, mode="speculative", draft=draft, record_states=1)

    mtp_comps = {**comps, "mlp": {"d_hidden": 64}}
    r = {"name": "mtp-vs", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 40, "meta_tokens": 1,
                                     "block_pattern": "GD | GA | M3 | HY", "tie_embeddings": False,
                                     "mtp": {"depth": 2, "block": "GD+mlp"}}, "components": mtp_comps}
    torch.manual_seed(0)
    m = build_model(r).double().eval()
    m.lm_head.weight.mul_(10.0)
    ref = m.generate(ids, 10, attention_mask=mask)
    runs = {}
    for record in (True, False):
        s = {}
        out = m.generate(ids, 10, mode="mtp", attention_mask=mask, stats=s, record_states=record)
        assert torch.equal(out, ref), record
        runs[record] = s
    assert runs[True]["rewind_forwards"] == 0 and runs[True]["recorded_rewinds"] > 0, runs[True]
    assert runs[False]["rewind_forwards"] == runs[True]["recorded_rewinds"] > 0, runs[False]


def test_recording_is_the_default_off_cuda_only():
    """The speculative modes record by default where the recorded chunk's reference kernels are what
    runs anyway (the CPU); on CUDA the default is the re-run (a recorded chunk would replace fla's /
    mamba-ssm's kernels); True / False are taken as given, anything else is one ValueError."""
    from hymba_plus.models.generation import record_by_default

    assert record_by_default(None, torch.device("cpu")) is True
    assert record_by_default(None, torch.device("cuda", 0)) is False
    assert record_by_default(True, torch.device("cuda")) is True
    assert record_by_default(False, torch.device("cpu")) is False
    with pytest.raises(ValueError, match="record_states must be True, False or None"):
        record_by_default(1, torch.device("cpu"))


@torch.no_grad()
def test_a_recorded_cache_is_freed_by_reference_counting() -> None:
    """A recording must not hold its own state (a reference cycle): a cache whose last forward
    recorded (a speculative decoder's last round, when no row rejected a draft), or whose recorded
    states a restore replaced, frees its tensors (KV, recurrent states, the per-position
    recording) when dropped, without waiting for Python's cycle collector (GPU memory)."""
    import gc
    import weakref

    model = make("every-mixer")
    g = torch.Generator().manual_seed(6)
    prompt, mask = left_padded(2, 5, g, [0, 1])
    chunk = torch.randint(0, V, (2, 3), generator=g)
    model(chunk, cache=prefilled(model, prompt, mask), record_states=True)  # (first calls: lazy set-ups)

    def alive(refs: list) -> int:
        return sum(r() is not None for r in refs)

    gc.collect()
    gc.disable()
    try:
        cache = prefilled(model, prompt, mask)
        model(chunk, cache=cache, record_states=True)
        assert cache.recorded is not None
        refs = [weakref.ref(t) for s in cache.states if s is not None for _, t in s.tensors()]
        del cache
        assert alive(refs) == 0
        cache = prefilled(model, prompt, mask)
        snap = cache.snapshot()
        model(chunk, cache=cache, record_states=True)
        held = {id(t) for s in snap.states if s is not None for _, t in s.tensors()}
        refs = [weakref.ref(t) for s in cache.states if s is not None for _, t in s.tensors() if id(t) not in held]
        assert refs
        cache.restore(snap)  # (the recorded states are replaced)
        assert alive(refs) == 0
    finally:
        gc.enable()


@torch.no_grad()
def test_a_recording_that_cannot_complete_leaves_no_nested_recording() -> None:
    """On a static (decode-engine) cache hymba's attention cannot record but its mamba3 branch
    does: the forward then drops every recording, the nested ones too (each holds ``n + 1``
    states), not only those of the layers' own states."""
    comps = {**COMPS, "hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "head_dim": 16, "window": 3}}}
    r = {"name": "vs", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | HY"},
         "components": comps}
    torch.manual_seed(0)
    model = build_model(r).double().eval()
    g = torch.Generator().manual_seed(7)
    prompt, mask = left_padded(2, 4, g, [0, 1])
    chunk = torch.randint(0, V, (2, 3), generator=g)
    cache = prefilled(model, prompt, mask).static_copy(32)
    model(chunk, cache=cache, record_states=True)
    assert cache.recorded is None
    held = [name for i, s in enumerate(cache.states) if s is not None
            for name, x in leaves(s, str(i)) if "_recording" in x.__dict__]
    assert held == []


@torch.no_grad()
def test_a_snapshot_of_another_batch_is_refused_in_one_line() -> None:
    """``rewind`` after a recorded chunk with a snapshot of another cache of another batch size:
    the one-line ValueError ``restore`` gives, not a shape error from comparing positions."""
    model = make("every-mixer")
    g = torch.Generator().manual_seed(8)
    prompt, mask = left_padded(2, 4, g, [0, 1])
    chunk = torch.randint(0, V, (2, 3), generator=g)
    other = prefilled(model, torch.randint(0, V, (3, 4), generator=g), None)
    cache = prefilled(model, prompt, mask)
    model(chunk, cache=cache, record_states=True)
    with pytest.raises(ValueError, match="rewind: the snapshot was not taken from this cache"):
        model.rewind(cache, other.snapshot(), chunk, torch.tensor([1, 2]))
    assert cache.recorded is not None  # (unchanged)
