"""min-p sampling (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling", arXiv 2407.01082):
``filtered_probs``' support is the definition (tokens whose probability after temperature is at least
min_p x the top token's, intersected with top-k / top-p: HF's order, min-p last), draws follow the
filtered law (chi-square), greedy ignores it, every decoding mode takes it (min_p 1 keeps the argmax
only: sampling at any temperature is greedy), the engines draw the same tokens, the harness passes
lm_eval's ``min_p`` through, and bad values are one line. Speculative / mtp stay lossless with min_p:
tests/test_speculative.py and tests/test_mtp.py."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import build_model
from hymba_plus.models.generation import check_sampling, filtered_probs, sample_next
from tests.helpers import BD_COPY, EVERY_COMPONENT
from tests.test_speculative import chi_square_p


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_support_is_the_definition(data) -> None:
    V = data.draw(st.integers(2, 12))
    rows = data.draw(st.lists(st.lists(st.floats(-10, 10), min_size=V, max_size=V), min_size=1, max_size=3))
    logits = torch.tensor(rows, dtype=torch.float32)
    temp = data.draw(st.floats(0.25, 3.0))
    min_p = data.draw(st.floats(0.0, 1.0))
    top_k = data.draw(st.none() | st.integers(1, V))
    top_p = data.draw(st.none() | st.floats(0.05, 1.0))
    got = filtered_probs(logits, temp, top_k, top_p, min_p) > 0
    others = filtered_probs(logits, temp, top_k, top_p) > 0  # top-k, then top-p (HF's order, min-p after them)
    # min-p: p_i >= min_p * p_max of the distribution after temperature, in float64; (any renormalisation by
    # top-k / top-p leaves the ratio p_i / p_max as it is); log p_i / p_max within float32's rounding of it:
    # either side may be right
    log_ratio = (logits.double() - logits.double().amax(-1, keepdim=True)) / temp
    log_min = math.log(min_p) if min_p > 0 else -math.inf
    want = others & (log_ratio >= log_min)
    clear = (log_ratio - log_min).abs() > 1e-4
    assert torch.equal(got[clear], want[clear])
    assert bool(got.any(-1).all())  # the top token always stays
    if min_p == 0:
        assert torch.equal(filtered_probs(logits, temp, top_k, top_p, 0.0), filtered_probs(logits, temp, top_k, top_p))


def test_min_p_comes_after_top_p_as_in_hf() -> None:
    """p = [0.5, 0.3, 0.15, 0.05]: top-p 0.6 keeps {0, 1}, min-p 0.5 of it too ({0, 1}); min-p first would keep
    {0, 1} renormalised to [0.625, 0.375], where top-p 0.6 keeps {0} alone."""
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    probs = filtered_probs(logits, 1.0, None, 0.6, 0.5)
    assert (probs > 0).tolist() == [[True, True, False, False]]
    assert probs[0, :2].tolist() == pytest.approx([0.625, 0.375])
    assert filtered_probs(logits, 1.0, None, None, None).tolist() == filtered_probs(logits, 1.0).tolist()


def test_draws_follow_the_filtered_law() -> None:
    """40000 draws of ``sample_next`` at temperature 0.7, min_p 0.1 against the exact law, computed apart in
    float64 from the definition (the test fails for draws without min_p)."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, -3.0, 0.9])
    temp, min_p, N = 0.7, 0.1, 40000
    p = (logits.double() / temp).softmax(-1)
    exact = torch.where(p >= min_p * p.max(), p, 0.0)
    exact = exact / exact.sum()
    assert 0 < int((exact == 0).sum()) < 8  # the filter drops some tokens, not all
    draws = sample_next(logits.expand(N, -1), temp, generator=torch.Generator().manual_seed(0), min_p=min_p)
    assert chi_square_p(torch.bincount(draws, minlength=8), exact) > 1e-3
    plain = sample_next(logits.expand(N, -1), temp, generator=torch.Generator().manual_seed(0))
    assert chi_square_p(torch.bincount(plain, minlength=8), exact) < 1e-3


def test_greedy_ignores_min_p() -> None:
    logits = torch.randn(5, 9, generator=torch.Generator().manual_seed(2))
    assert torch.equal(sample_next(logits, 0.0, min_p=0.9), logits.argmax(-1))
    torch.manual_seed(0)
    model = build_model({"name": "t", "model": {"vocab_size": 20, "d_model": 32, "max_seq_len": 32,
                                                "block_pattern": "GD | GA"}, "components": dict(EVERY_COMPONENT)})
    ids = torch.randint(0, 20, (2, 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 6, min_p=0.7), model.generate(ids, 6))


def _models() -> dict:
    torch.manual_seed(0)
    lad = {"latent_dim": 8, "memory_slots": 3, "inference_steps": 4, "denoiser_layers": 1, "denoiser_heads": 2}
    base = {"vocab_size": 20, "d_model": 32, "max_seq_len": 48, "block_pattern": "GD | GA"}
    return {
        "ar": build_model({"name": "t", "model": base, "components": dict(EVERY_COMPONENT)}),
        "mtp": build_model({"name": "t", "model": {**base, "mtp": {"depth": 2, "block": "GD", "weight": 0.3}},
                            "components": dict(EVERY_COMPONENT)}),
        "ladir": build_model({"name": "t", "model": base, "components": dict(EVERY_COMPONENT), "ladir": lad,
                              "objective": {"kind": "ladir"}}),
        "block_diffusion": build_model(BD_COPY),
    }


@torch.no_grad()
def test_every_mode_takes_min_p() -> None:
    """min_p 1 keeps the top token alone: sampled at temperature 1.5, every mode gives its greedy tokens (and
    without min_p it does not), so the setting reaches each mode's sampler."""
    models = _models()
    cases = [("ar", "ar", {}), ("ar", "ar", {"engine": "static"}), ("mtp", "mtp", {}),
             ("ar", "speculative", {"draft": models["mtp"], "k": 2}), ("ladir", "ladir", {}),
             ("block_diffusion", "block_diffusion", {"threshold": None})]
    for name, mode, opts in cases:
        model = models[name].eval()
        V = model.config.vocab_size
        ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(4))

        def run(model=model, ids=ids, mode=mode, opts=opts, **kw):
            return model.generate(ids, 8, mode=mode, generator=torch.Generator().manual_seed(6), **opts, **kw)

        greedy = run(temperature=0.0)
        assert torch.equal(run(temperature=1.5, min_p=1.0), greedy), mode
        assert not torch.equal(run(temperature=1.5, top_p=0.99), greedy), mode


@torch.no_grad()
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_engines_draw_the_same_tokens(device) -> None:
    """The engines run the same sampler on the step's logits (the CUDA graph captures the forward; the draw
    is ``sample_next`` outside it, no host read added): with one seed, the same tokens."""
    torch.manual_seed(0)
    model = build_model({"name": "t", "model": {"vocab_size": 40, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                                "meta_tokens": 2, "block_pattern": "GA | M3"}, "components": {}})
    model = model.to(device)
    ids = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(1)).to(device)
    engines = ("dynamic", "static", "graph") if device == "cuda" else ("dynamic", "static")
    outs = [model.generate(ids, max_new_tokens=10, temperature=1.2, top_p=0.95, min_p=0.05,
                           generator=torch.Generator(device).manual_seed(3), engine=e) for e in engines]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.1", float("inf")])
def test_a_bad_min_p_is_one_line(bad) -> None:
    with pytest.raises(ValueError, match=r"^min_p must be a number in \[0, 1\] \(or None / 0: off\), got "):
        check_sampling(1.0, None, None, min_p=bad)
    torch.manual_seed(0)
    model = build_model({"name": "t", "model": {"vocab_size": 20, "d_model": 32, "max_seq_len": 32,
                                                "block_pattern": "GA"}, "components": dict(EVERY_COMPONENT)})
    with pytest.raises(ValueError, match="^min_p must be"):
        model.generate(torch.tensor([[1, 2]]), 2, temperature=1.0, min_p=bad)
    for ok in (None, 0, 0.0, 0.3, 1):
        check_sampling(1.0, None, None, min_p=ok)



def test_the_harness_passes_min_p_through() -> None:
    """lm_eval's ``min_p`` generation setting reaches generate (it was refused as unsupported)."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from hymba_plus.training.harness import HymbaLM
    from hymba_plus.training.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    model = build_model({"name": "t", "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 32,
                                                "block_pattern": "GA"}, "components": dict(EVERY_COMPONENT)}).eval()
    lm = HymbaLM(model=model, tokenizer=ByteTokenizer())

    def ask(**kw):
        return lm.generate_until([Instance("generate_until", {}, ("hi", {"until": [], "max_gen_toks": 8, **kw}), 0)])

    greedy = ask(do_sample=False)
    assert ask(do_sample=True, temperature=2.0, min_p=1.0) == greedy  # min_p 1: the top token alone
    assert ask(do_sample=True, temperature=2.0) != greedy
    with pytest.raises(ValueError, match="min_p must be a number in"):
        ask(do_sample=True, temperature=1.0, min_p=2.0)
