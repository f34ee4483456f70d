"""The invariant (DESIGN §1), property-tested over generated recipes.

Patterns are drawn from *whatever mixers are registered when the tests run* (so every
component joins as it lands), with meta tokens 0-4, attention windows, RoPE scalings, GQA
ratios, ffn mlp / none / moe, and random chunk splits. For each generated model:

* feeding the sequence in chunks through one cache == one full forward (rel <= 1e-4);
* a left-padded row == the same row unpadded (and the cache remembers the padding);
* greedy cached generation == argmax of full forwards re-run;
* save_pretrained / from_pretrained gives the same logits;
* a model without global attention keeps a bounded cache, and every mixer's
  ``state_nbytes`` matches its real state.

Also: the window really limits reach, and the invariant holds for every recipe in configs/.
Each component's settings are tiny (TINY) so an example runs in milliseconds; a mixer
registered later without an entry there runs with its defaults at d_model 32.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hymba_plus import build_model, from_pretrained, load_recipe, registry
from hymba_plus.cli.info import describe, mixer_state_nbytes
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
V, D = 37, 32
TOL = 1e-4
#: configs larger than this are checked on the meta device only (full-size seed recipes)
CPU_PARAM_LIMIT = 30_000_000

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
#: the same properties with many more examples: `make test-all` (marked slow)
MANY = settings(SETTINGS, max_examples=300)

# --------------------------------------------------------------------------- recipe strategies

_scaling = st.one_of(
    st.none(),
    st.fixed_dictionaries({"kind": st.sampled_from(["linear", "ntk", "yarn"]),
                           "factor": st.sampled_from([2.0, 4.0]),
                           "original_max_seq_len": st.sampled_from([4, 16])}),
)


@st.composite
def attn_cfg(draw, windowed: bool | None = None) -> dict:
    n_heads = draw(st.sampled_from([2, 4]))
    window = None if windowed is False else draw(
        st.integers(1, 6) if windowed else st.one_of(st.none(), st.integers(1, 6)))
    return {"n_heads": n_heads, "n_kv_heads": draw(st.sampled_from([h for h in (1, 2, 4) if n_heads % h == 0])),
            "head_dim": 8, "window": window, "qk_norm": draw(st.booleans()),
            "output_gate": draw(st.booleans()),
            "rope": {"fraction": draw(st.sampled_from([0.0, 0.5, 1.0])), "scaling": draw(_scaling)}}


TINY = {
    "gated_attn": attn_cfg(),
    "gdn": st.fixed_dictionaries({"n_heads": st.just(2), "head_dim": st.just(8),
                                  "chunk_size": st.sampled_from([2, 4, 64])}),
    "mamba3": st.fixed_dictionaries({"state_size": st.just(8), "head_dim": st.just(8), "expand": st.just(1),
                                     "chunk_size": st.sampled_from([2, 4, 64]),
                                     "mimo_rank": st.sampled_from([1, 2])}),
    "atlas": st.fixed_dictionaries({"n_heads": st.just(2), "head_dim": st.just(8), "window": st.integers(1, 3),
                                    "chunk_size": st.sampled_from([2, 4]), "memory_hidden": st.just(1),
                                    "ns_steps": st.just(1)}),
    "hymba": st.fixed_dictionaries({"ssm": st.sampled_from(["mamba3", "gdn"]),
                                    "attn": st.fixed_dictionaries({
                                        "n_heads": st.just(2), "n_kv_heads": st.sampled_from([1, 2]),
                                        "window": st.one_of(st.none(), st.integers(1, 4))})}),
    "moe": st.fixed_dictionaries({"n_experts": st.just(4), "n_shared": st.sampled_from([0, 1]),
                                  "d_expert": st.just(16)}).flatmap(
        lambda c: st.sampled_from([dict(c, top_k=2), dict(c, top_k=1, norm_topk=False)])),
    "mlp": st.just({"d_hidden": 32}),
}
#: components that configure others (hymba's SSM heads read components.mamba3 / gdn)
NEEDS = {"hymba": ("mamba3", "gdn")}


def token(mixer: str) -> str:
    return "-" if mixer == "none" else mixer


@st.composite
def recipes(draw, mixers: list[str] | None = None, max_layers: int = 3, **model) -> dict:
    mixers = mixers or registry.names("mixer")
    ffns = ["mlp", "none"] + [f for f in registry.names("ffn") if f not in ("mlp",)]
    n = draw(st.integers(1, max_layers))
    layers = [(draw(st.sampled_from(mixers)), draw(st.sampled_from(ffns))) for _ in range(n)]
    used = {m for m, _ in layers} | {f for _, f in layers}
    for m in list(used):
        used |= set(NEEDS.get(m, ()))
    comps = {}
    for name in sorted(used - {"none"}):
        comps[name] = draw(TINY[name]) if name in TINY else {}
    m = {"vocab_size": V, "d_model": D, "max_seq_len": 64, "meta_tokens": draw(st.integers(0, 4)),
         "tie_embeddings": draw(st.booleans()), "ffn": "none",
         "block_pattern": " | ".join(f"{token(mx)}+{f}" for mx, f in layers)}
    m.update(model)
    return {"name": "generated", "model": m, "components": comps}


def make(d: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(d).eval()
    with torch.no_grad():  # untrained heads are near zero: spread the logits so argmax is stable
        model.lm_head.weight.mul_(20.0) if not model.config.tie_embeddings else model.embed.weight.mul_(20.0)
    return model


def splits(draw, T: int) -> list[int]:
    cuts = sorted(set(draw(st.lists(st.integers(1, T - 1), max_size=4)))) if T > 1 else []
    return [0, *cuts, T]


def chunked(model, ids, bounds, mask=None):
    cache = model.new_cache(ids.shape[0])
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        m = mask[:, a:b] if mask is not None and a < mask.shape[1] else None
        outs.append(model(ids[:, a:b], attention_mask=m, cache=cache).logits)
    return torch.cat(outs, 1), cache


# --------------------------------------------------------------------------- properties


def chunked_equals_full(data):
    d = data.draw(recipes())
    model = make(d)
    T = data.draw(st.integers(1, 14), label="T")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    bounds = splits(data.draw, T)
    with torch.no_grad():
        full = model(ids).logits
        got, cache = chunked(model, ids, bounds)
    assert rel_err(got, full) <= TOL, (d, bounds)
    assert cache.pos.tolist() == [d["model"]["meta_tokens"] + T] * 2


def padding_equals_unpadded(data):
    d = data.draw(recipes())
    model = make(d)
    T = data.draw(st.integers(2, 12), label="T")
    pad = data.draw(st.integers(1, T - 1), label="pad")
    g = torch.Generator().manual_seed(T * 7 + pad)
    ids = torch.randint(0, V, (2, T), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    # the mask goes with the first chunk only: the cache remembers the padding
    first = data.draw(st.integers(pad, T), label="first chunk")
    bounds = [0, first, T] if first < T else [0, T]
    with torch.no_grad():
        got, _ = chunked(model, ids, bounds, mask=mask[:, :first])
        row0 = model(ids[:1, pad:]).logits
        row1 = model(ids[1:]).logits
    assert torch.isfinite(got).all()
    assert rel_err(got[0, pad:], row0[0]) <= TOL, d
    assert rel_err(got[1], row1[0]) <= TOL, d


test_chunked_cached_equals_full_forward = SETTINGS(given(data=st.data())(chunked_equals_full))
test_left_padding_equals_unpadded = SETTINGS(given(data=st.data())(padding_equals_unpadded))
test_chunked_cached_equals_full_forward_many = pytest.mark.slow(MANY(given(data=st.data())(chunked_equals_full)))
test_left_padding_equals_unpadded_many = pytest.mark.slow(MANY(given(data=st.data())(padding_equals_unpadded)))


@settings(SETTINGS, max_examples=15)
@given(data=st.data())
def test_logits_to_keep_is_the_last_positions_of_the_full_logits(data):
    """A prefill that keeps only the last n logits (left-padded, through a cache) gives the
    full forward's last n logits, and leaves the cache and hidden states as the full call."""
    d = data.draw(recipes())
    model = make(d)
    T = data.draw(st.integers(2, 12), label="T")
    n = data.draw(st.integers(1, T), label="n")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    mask = torch.ones_like(ids)
    mask[0, : data.draw(st.integers(0, T - 1), label="pad")] = 0
    with torch.no_grad():
        c_full, c_kept = model.new_cache(2), model.new_cache(2)
        full = model(ids, attention_mask=mask, cache=c_full, return_hidden=True)
        kept = model(ids, attention_mask=mask, cache=c_kept, return_hidden=True, logits_to_keep=n)
        assert kept.logits.shape == (2, n, V)
        assert torch.equal(kept.hidden_states, full.hidden_states)
        assert rel_err(kept.logits, full.logits[:, -n:]) <= 1e-6  # the same rows through the head
        nxt = ids[:, -1:]
        assert torch.equal(model(nxt, cache=c_kept).logits, model(nxt, cache=c_full).logits)
    with pytest.raises(ValueError, match="logits_to_keep needs labels=None"):
        model(ids, labels=ids, logits_to_keep=1)


@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_greedy_generation_equals_full_forward_rerun(data):
    d = data.draw(recipes(max_layers=2))
    model = make(d)
    T = data.draw(st.integers(1, 5), label="T")
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    n = 4
    with torch.no_grad():
        got = model.generate(x, max_new_tokens=n, temperature=0.0)
        want = x
        for _ in range(n):
            logits = model(want).logits[:, -1]
            want = torch.cat([want, logits.argmax(-1, keepdim=True)], 1)
    # a different token is only acceptable on an exact tie of the top two logits
    if not torch.equal(got, want):
        first = int((got != want).any(0).nonzero()[0])
        logits = model(want[:, :first]).logits[:, -1]
        top2 = logits.topk(2, -1).values
        assert ((top2[:, 0] - top2[:, 1]).abs() < 1e-5 * top2.abs().max()).any(), d


@settings(SETTINGS, max_examples=4)
@given(data=st.data())
def test_save_and_load_round_trip(data):
    d = data.draw(recipes())
    model = make(d)
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        back = from_pretrained(tmp).eval()
    assert back.recipe == model.recipe
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)


@settings(SETTINGS, max_examples=10)
@given(data=st.data())
def test_cache_is_bounded_without_global_attention(data):
    """With every attention windowed, the cache stops growing (attention after window - 1
    tokens; gdn / mamba3 / atlas states are fixed-size)."""
    d = data.draw(recipes(max_layers=2))
    for name, cfg in d["components"].items():
        if name == "gated_attn":
            cfg["window"] = cfg["window"] or 3
        if name == "hymba":
            cfg["attn"]["window"] = cfg["attn"]["window"] or 3
    model = make(d)
    cache = model.new_cache(1)
    ids = torch.randint(0, V, (1, 18), generator=torch.Generator().manual_seed(1))
    sizes = []
    with torch.no_grad():
        for a in range(0, 18, 3):
            model(ids[:, a:a + 3], cache=cache)
            sizes.append(cache.nbytes())
    assert len(set(sizes[-3:])) == 1, (d, sizes)


#: one fixed tiny setting per component (the state-size test builds these directly)
FIXED = {
    "gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "window": None},
    "gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": 4},
    "mamba3": {"state_size": 8, "head_dim": 8, "expand": 1, "chunk_size": 4},
    "atlas": {"n_heads": 2, "head_dim": 8, "window": 3, "chunk_size": 4, "memory_hidden": 1, "ns_steps": 2},
    "hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "n_kv_heads": 1, "window": 4}},
}


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("mixer", [m for m in registry.names("mixer") if m != "none"])
def test_state_nbytes_matches_the_real_state(mixer, window):
    """Every mixer's ``state_nbytes`` (what ``hymba info`` reports) equals its real batch-1
    state after T tokens fed in two chunks; a mixer without it is reported as n/a."""
    comps = {name: dict(FIXED.get(name, {})) for name in (mixer, *NEEDS.get(mixer, ()))}
    if mixer == "gated_attn":
        comps[mixer]["window"] = window
    d = {"name": "s", "model": {"vocab_size": V, "d_model": D, "meta_tokens": 3, "ffn": "none",
                                "block_pattern": f"{token(mixer)} | {token(mixer)}"}, "components": comps}
    model = make(d)
    for T in (1, 5, 13):
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.randint(0, V, (1, T - T // 2)), cache=cache)
            if T // 2:
                model(torch.randint(0, V, (1, T // 2)), cache=cache)
        for block, real in zip(model.blocks, cache.layer_nbytes()):
            want = mixer_state_nbytes(block.mixer, T, model.dtype, n_meta=3)
            if getattr(block.mixer, "state_nbytes", None) is None:
                assert want is None  # hymba info shows n/a
            else:
                assert want == real, (mixer, T)


@pytest.mark.parametrize("ffn", registry.names("ffn"))
@pytest.mark.parametrize("mixer", registry.names("mixer"))
def test_every_registered_mixer_and_ffn_gives_shaped_logits_and_trains_every_parameter(mixer, ffn):
    """Whatever is registered (a component joins this test as it lands, with its defaults at d_model 32
    when tests/helpers.py's EVERY_COMPONENT has no entry): a two-layer model of it gives [B, T, V]
    logits and [B, T, d] hidden states, and the training loss reaches every parameter of its blocks with a
    finite, nonzero gradient (a parameter the forward does not use, or uses only through a detach, fails)."""
    from tests.helpers import EVERY_COMPONENT, tiny_recipe

    torch.manual_seed(0)
    code = f"{token(mixer)}+{ffn}"
    model = build_model(tiny_recipe(f"{code} | {code}", dict(EVERY_COMPONENT), d_model=D, vocab_size=V,
                                    meta_tokens=2)).train()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids, return_hidden=True)
    assert out.logits.shape == (2, 9, V) and out.hidden_states.shape == (2, 9, D)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    for name, p in model.blocks.named_parameters():  # the components' own (without a mixer the meta tokens get none)
        ok = p.grad is not None and bool(torch.isfinite(p.grad).all()) and float(p.grad.abs().sum()) > 0
        assert ok, f"{mixer}+{ffn}: blocks.{name} got no finite nonzero gradient"


# --------------------------------------------------------------------------- the window limits reach


@settings(SETTINGS, max_examples=8)
@given(window=st.integers(1, 4), n_layers=st.integers(1, 3), meta=st.integers(0, 3), data=st.data())
def test_window_really_limits_reach(window, n_layers, meta, data):
    """In a windowed-attention-only model, a token more than n_layers * (window - 1)
    positions back cannot reach the output (each layer reaches window - 1 back; meta tokens
    are always visible but never change); in a global model it does."""
    base = data.draw(attn_cfg(windowed=True))
    reach = n_layers * (window - 1)
    T = reach + 6
    ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(window))
    changed = ids.clone()
    j = data.draw(st.integers(0, T - reach - 2), label="changed position")
    changed[0, j] = (changed[0, j] + 1) % V
    for windowed in (True, False):
        cfg = dict(base, window=window if windowed else None)
        d = {"name": "w", "model": {"vocab_size": V, "d_model": D, "meta_tokens": meta, "ffn": "mlp",
                                    "block_pattern": " | ".join(["GA"] * n_layers)},
             "components": {"gated_attn": cfg, "mlp": {"d_hidden": 32}}}
        model = make(d)
        with torch.no_grad():
            a, b = model(ids).logits[0], model(changed).logits[0]
        far = slice(j + reach + 1, T)  # outputs that the changed token must not reach
        if windowed:
            assert torch.equal(a[far], b[far])
            assert not torch.equal(a[j], b[j])  # it does change its own output
        else:
            assert not torch.allclose(a[far], b[far], atol=1e-6)


# --------------------------------------------------------------------------- every recipe in configs/


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_invariant_for_every_config(path):
    recipe = load_recipe(path)
    info = describe(recipe)  # meta device: works for the full-size ones too
    assert info["n_layers"] == len(recipe.layers) and info["params_total"] > 0
    if info["params_total"] > CPU_PARAM_LIMIT:
        assert all(v is not None for v in info["cache_bytes"].values()) or info["missing_state_nbytes"]
        return
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    assert model.num_parameters() == info["params_total"]
    if recipe.model.vocab_size is None:  # a forecaster: the invariant over patch tokens
        return _forecast_invariant(model)
    V_ = recipe.model.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V_, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        full = model(ids).logits
        got, _ = chunked(model, ids, [0, 7, 8, 17, 24])
        assert rel_err(got, full) <= TOL
        padded, _ = chunked(model, ids, [0, 10, 24], mask=mask[:, :10])
        assert rel_err(padded[0, 5:], model(ids[:1, 5:]).logits[0]) <= TOL
        assert rel_err(padded[1], full[1]) <= TOL
        gen = model.generate(ids[:, :6], max_new_tokens=4)
        want = ids[:, :6]
        for _ in range(4):
            want = torch.cat([want, model(want).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(gen, want)


@torch.no_grad()
def _forecast_invariant(model) -> None:
    """A recipe without vocabulary (``objective: forecast``): the patches of a series fed
    through one cache in uneven chunks give the full forward's forecasts at every patch."""
    obj = model.objective
    cfg = obj.cfg
    n = cfg.n_patches + 3
    x = torch.randn(2, n * cfg.patch, cfg.channels, generator=torch.Generator().manual_seed(0)).cumsum(1)
    mu, sigma = obj.ts_head.stats(x[:, :cfg.context])
    full, _ = obj.patch_outputs(model, x, mu, sigma)
    rows = 2 * cfg.channels if cfg.channel_independent else 2
    cache, parts, lo = model.new_cache(rows), [], 0
    for k in (n - 4, 1, 3):
        z, _ = obj.patch_outputs(model, x[:, lo * cfg.patch:(lo + k) * cfg.patch], mu, sigma, cache=cache)
        parts.append(z)
        lo += k
    assert rel_err(torch.cat(parts, 1), full) <= TOL
