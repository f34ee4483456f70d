"""Cache rollback (``HybridCache.snapshot`` / ``restore``, ``HybridLM.rewind``): advancing k
tokens and rewinding to j equals advancing j tokens, for every state type (attention KV
with windows and meta tokens, KV sharing, conv, gdn, mamba3 incl. its previous-token terms
and angles, ATLAS memory / momentum / partial-chunk buffer, hymba's pair, MoE, ETD
iterations and routes), per row, in left-padded batches."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers import EVERY_COMPONENT, float64_model

V = 20
COMPS = {**EVERY_COMPONENT, "gated_attn": {**EVERY_COMPONENT["gated_attn"], "window": 5},
         "hymba": {**EVERY_COMPONENT["hymba"], "ssm": "mamba3"}}
RECIPES = {
    "every-mixer": ("GD | GA | M3 | ATL | HY", {}),
    "moe+meta": ("GA+moe | GD+moe", {"meta_tokens": 3}),
    "etd-act-routes": ("GD | GA | M3 | GA", {"etd": {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1,
                                                       "iterations": 2, "max_iterations": 3}}),
}


def make(name: str):  # noqa: ANN201
    pattern, extra = RECIPES[name]
    return float64_model("rb", pattern, extra, COMPS, V)


@pytest.fixture(scope="module", params=list(RECIPES))
def model(request):
    return make(request.param)


def states(cache) -> list[tuple[str, torch.Tensor]]:  # noqa: ANN001
    out = []
    for i, s in enumerate(cache.states):
        if s is not None:
            out += [(f"{i}.{n}", t) for n, t in s.tensors()]
    return out


def prefilled(model, prompt: torch.Tensor, mask: torch.Tensor):  # noqa: ANN001, ANN201
    cache = model.new_cache(prompt.shape[0])
    model(prompt, attention_mask=mask, cache=cache)
    return cache


@torch.no_grad()
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_advance_k_then_rewind_to_j_equals_advancing_j(model, data) -> None:
    B = data.draw(st.integers(1, 3))
    T = data.draw(st.integers(2, 7))
    k = data.draw(st.integers(1, 6))
    seed = data.draw(st.integers(0, 10**6))
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):  # left padding of random depth (at least one real token)
        mask[b, : data.draw(st.integers(0, T - 1))] = 0
    chunk = torch.randint(0, V, (B, k), generator=g)
    keep = torch.tensor([data.draw(st.integers(0, k)) for _ in range(B)])
    # advance k, then rewind to keep[b]
    cache = prefilled(model, prompt, mask)
    snap = cache.snapshot()
    model(chunk, cache=cache)
    model.rewind(cache, snap, chunk, keep)
    # the oracle: advance exactly keep[b] tokens (right padding = the padding rule)
    ref = prefilled(model, prompt, mask)
    if bool((keep > 0).any()):
        n = int(keep.max())
        m = (torch.arange(n)[None] < keep[:, None]).long()
        model(chunk[:, :n], attention_mask=m, cache=ref)
    assert torch.equal(cache.pos, ref.pos)
    a, b = states(cache), states(ref)
    assert [n for n, _ in a] == [n for n, _ in b]
    for (name, x), (_, y) in zip(a, b):
        if x.dtype.is_floating_point:
            assert torch.allclose(x, y, atol=1e-6, rtol=0), name
        else:
            assert torch.equal(x, y), name
    for key in ref.extra:  # ETD: iterations and routes taken at the prefill
        assert torch.equal(cache.extra[key], ref.extra[key]), key
    nxt = torch.randint(0, V, (B, 2), generator=g)  # and the future agrees
    la, lb = model(nxt, cache=cache).logits, model(nxt, cache=ref).logits
    assert torch.allclose(la, lb, atol=1e-6, rtol=0)


@torch.no_grad()
def test_restore_returns_to_the_snapshot_and_the_snapshot_stays_usable(model) -> None:
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, V, (2, 5), generator=g)
    cache = prefilled(model, prompt, torch.ones(2, 5, dtype=torch.long))
    before = [(n, t.clone()) for n, t in states(cache)]
    snap = cache.snapshot()
    for _ in range(2):  # advance, restore, twice from the same snapshot
        model(torch.randint(0, V, (2, 3), generator=g), cache=cache)
        cache.restore(snap)
        assert [(n, t) for n, t in states(cache)].__len__() == len(before)
        for (name, t), (_, t0) in zip(states(cache), before):
            assert torch.equal(t, t0), name
    with pytest.raises(ValueError, match="restore"):
        cache.restore(model.new_cache(3))
    other = prefilled(model, prompt, torch.ones(2, 5, dtype=torch.long))  # same shape: was taken silently
    for foreign in (other.snapshot(), other, cache.fork()):
        with pytest.raises(ValueError, match="not taken from this cache"):
            cache.restore(foreign)


@torch.no_grad()
@pytest.mark.parametrize("keep, fed", [([1, 1], 2), ([3, 1, 1], 2), ([-1, 1, 1], 2), ([[1, 1, 1]], 2)])
def test_rewind_refuses_a_keep_that_does_not_fit_what_was_fed(keep, fed) -> None:
    """A ``keep`` of another length than the batch rewound every row by its first entry's
    tokens, silently; one over the tokens fed (or negative) gave an unrelated mask error or none."""
    model = make("moe+meta")
    prompt = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(0))
    cache = prefilled(model, prompt, torch.ones(3, 4, dtype=torch.long))
    snap = cache.snapshot()
    with pytest.raises(ValueError, match="rewind: keep"):
        model.rewind(cache, snap, prompt[:, :fed], torch.tensor(keep))
