"""Block diffusion (BD3-LM, arXiv 2503.09573): the objective, its vectorised two-stream forward
and the recipe section.

* the one-call ``[meta | x_0 | x_t]`` forward (``two_stream_logits``) equals the slow per-block
  oracle (``reference_logits``: a cache eats the clean prefix, the noisy block runs on a fork
  with bidirectional attention), logits AND parameter gradients, for every mixer, meta tokens,
  windows, KV sharing, MoE, hymba over gdn / mamba3, mamba3 MIMO, block sizes 1-6 (also ones
  that do not divide a kernel chunk), property-tested and on explicit cases;
* block size 1 with every token masked is the masked next-token loss, and the Monte-Carlo
  NELBO over t ~ U[0, 1] converges to it; the NELBO counts masked & scored tokens only, with
  w(t) = m'(t) / m(t) for every schedule;
* recipe checks are one line naming FILE:LINE: key; the cache fork leaves its parent alone;
  ``bidirectional=True`` is bidirectional only inside the chunk;
* ``hymba train`` runs it (--compile: tests/test_compile_objectives.py), checkpoints reload with the [MASK]
  embedding, and a small model learns a copy task through the NELBO.

Tests at the end of the file pin bugs found while writing these (fixed).
"""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hymba_plus import RecipeError, build_model, from_pretrained, load_recipe, registry
from hymba_plus.cli import main
from hymba_plus.objectives import block_diffusion as bd
from hymba_plus.objectives.block_diffusion import mask_rate, reference_logits, weight
from tests.helpers import BD_COPY, bd_copy_batch, train_bd_copy

ROOT = Path(__file__).resolve().parents[1]
V, D = 37, 32
MAX_LEN = 48  # divisible by every block size used here (1, 2, 3, 4, 6)
ATOL = 1e-9

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

#: small settings of every component (chunk sizes 4: block size 3 does not divide them)
COMPS = {
    "gated_attn": {"n_heads": 2, "head_dim": 8},
    "gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": 4},
    "mamba3": {"state_size": 8, "head_dim": 8, "expand": 1, "chunk_size": 4},
    "atlas": {"n_heads": 2, "head_dim": 8, "window": 2, "chunk_size": 4, "memory_hidden": 1, "ns_steps": 1},
    "hymba": {"ssm": "gdn", "attn": {"n_heads": 2}},
    "mlp": {"d_hidden": 32},
    "moe": {"n_experts": 4, "top_k": 2, "n_shared": 1, "d_expert": 16},
}


def bd_recipe(pattern: str, block_size: int = 2, *, meta: int = 0, ffn: str = "mlp", comps: dict | None = None,
              max_seq_len: int = MAX_LEN, **objective) -> dict:
    c = copy.deepcopy(COMPS)
    for k, v in (comps or {}).items():
        c[k] = v
    return {"name": "bd-test",
            "model": {"vocab_size": V, "d_model": D, "max_seq_len": max_seq_len, "block_pattern": pattern,
                      "meta_tokens": meta, "ffn": ffn},
            "components": c,
            "objective": {"kind": "block_diffusion", "block_size": block_size, **objective}}


def make(d: dict, seed: int = 0):
    """A float64 model in eval mode, weights spread so attention patterns are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(d).double().eval()
    with torch.no_grad():
        model.embed.weight.mul_(8.0)
        model.objective.mask_embed.normal_(0.0, 1.0)
        if model.meta is not None:
            model.meta.normal_(0.0, 1.0)
    return model


def draw_xt(x0: torch.Tensor, mask_id: int, p: float = 0.5, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.where(torch.rand(x0.shape, generator=g) < p, torch.full_like(x0, mask_id), x0)


def param_grads(model, logits: torch.Tensor, w: torch.Tensor) -> dict[str, torch.Tensor]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    gs = torch.autograd.grad((logits * w).sum(), [p for _, p in named], allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, gs)}


def check_two_stream(model, x0: torch.Tensor, xt: torch.Tensor, bs: int, grads: bool = True) -> None:
    obj = model.objective
    with torch.no_grad():
        fast, _ = obj.two_stream_logits(model, xt, x0)
    slow = reference_logits(model, xt, x0, bs)
    assert fast.shape == slow.shape == (*x0.shape, V)
    torch.testing.assert_close(fast, slow, rtol=0, atol=ATOL)
    if not grads:
        return
    w = torch.randn(fast.shape, generator=torch.Generator().manual_seed(1), dtype=fast.dtype)
    with torch.enable_grad():
        g_fast = param_grads(model, obj.two_stream_logits(model, xt, x0)[0], w)
        g_slow = param_grads(model, reference_logits(model, xt, x0, bs, grad=True), w)
    for name in g_fast:
        torch.testing.assert_close(g_fast[name], g_slow[name], rtol=1e-7, atol=ATOL, msg=lambda m, n=name: f"{n}: {m}")
    if bool((xt == obj.mask_token_id).any()):  # the comparison means something: [MASK] is trained
        assert g_fast["objective.mask_embed"].abs().max() > 0
    if model.meta is not None:
        assert g_fast["meta"].abs().max() > 0


# --------------------------------------------------------------------------- 1. registry


def test_registry_names_both_objectives_and_a_plain_recipe_has_none():
    assert {"block_diffusion", "next_token"} <= set(registry.names())
    assert registry.names("objective") == ["block_diffusion", "forecast", "ladir_objective", "next_token"]
    d = bd_recipe("GA")
    del d["objective"]
    r = load_recipe(d)
    assert r.objective is None and "objective" not in r.to_dict()
    model = build_model(r)
    assert model.objective.mask_token_id is None
    assert not any(n.startswith("objective.") for n, _ in model.named_parameters())
    # kind: next_token without settings is the same recipe as no objective section
    r2 = load_recipe({**d, "objective": {"kind": "next_token"}})
    assert r2.objective is None and r2.hash() == r.hash()


def test_block_diffusion_model_has_a_mask_id_past_the_vocabulary():
    model = build_model(bd_recipe("GA"))
    obj = model.objective
    assert obj.mask_token_id == V and model.lm_head.out_features == V
    assert obj.mask_embed.shape == (D,) and obj.mask_embed.abs().max() > 0  # initialised, not zeros
    emb = model.embed_tokens(torch.tensor([[0, V, 3]]))
    assert torch.equal(emb[0, 1], obj.mask_embed) and torch.equal(emb[0, 0], model.embed.weight[0])


# --------------------------------------------------------------------------- 2. vectorised == reference

CASES = {
    # one recipe per mixer
    "GA": dict(pattern="GA | GA"),
    "GD": dict(pattern="GD | GD"),
    "M3": dict(pattern="M3 | M3"),
    "ATL": dict(pattern="ATL"),
    "HY-gdn": dict(pattern="HY"),
    "HY-mamba3": dict(pattern="HY", comps={"hymba": {"ssm": "mamba3", "attn": {"n_heads": 2}}}),
    # options
    "GA-meta": dict(pattern="GA | GA", meta=3),
    "GA-window": dict(pattern="GA | GA", meta=2, comps={"gated_attn": {"n_heads": 2, "head_dim": 8, "window": 5}}),
    "GA-kv_share": dict(pattern="GA | GA | GD", comps={"gated_attn": {"n_heads": 2, "head_dim": 8, "kv_share": True}}),
    "HY-kv_share-window": dict(pattern="HY | HY", meta=1, comps={
        "hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "n_kv_heads": 1, "kv_share": True, "window": 6}}}),
    "M3-mimo": dict(pattern="M3", meta=1, comps={"mamba3": {"state_size": 8, "head_dim": 8, "expand": 1,
                                                            "chunk_size": 4, "mimo_rank": 2}}),
    "moe": dict(pattern="GA | GD+moe", meta=1),
    "moe-ffn": dict(pattern="GD | GA", ffn="moe"),
    # a mixed hybrid, with and without meta tokens
    "hybrid": dict(pattern="GA | GD | M3 | ATL | HY"),
    "hybrid-meta": dict(pattern="GA+moe | GD | M3 | ATL | HY", meta=2),
}


@pytest.mark.parametrize("bs", [1, 2, 4, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_two_stream_equals_reference_logits_and_gradients(case, bs):
    kw = dict(CASES[case])
    model = make(bd_recipe(kw.pop("pattern"), bs, **kw))
    L = 12 if bs > 1 else 8
    x0 = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(bs))
    xt = draw_xt(x0, V, seed=bs)
    big = case.startswith("hybrid")
    check_two_stream(model, x0, xt, bs, grads=not big or bs in (2, 3))


def test_two_stream_with_nothing_or_everything_masked():
    model = make(bd_recipe("GA | GD | M3", 4, meta=2))
    x0 = torch.randint(0, V, (1, 8))
    check_two_stream(model, x0, x0.clone(), 4, grads=False)
    check_two_stream(model, x0, torch.full_like(x0, V), 4)


def test_reference_logits_is_no_grad_and_two_stream_does_not_touch_its_inputs():
    model = make(bd_recipe("GA | GD", 2))
    x0 = torch.randint(0, V, (2, 6))
    xt = draw_xt(x0, V)
    xt_before = xt.clone()
    with torch.enable_grad():
        assert not reference_logits(model, xt, x0, 2).requires_grad
        assert model.objective.two_stream_logits(model, xt, x0)[0].requires_grad
    assert torch.equal(xt, xt_before)
    with pytest.raises(ValueError, match="not a multiple of block_size 2"):
        model.objective.two_stream_logits(model, xt[:, :5], x0[:, :5])


@st.composite
def generated(draw) -> tuple[dict, int, int, int]:
    """(recipe, block size, sequence length, batch) over every mixer and its options."""
    bs = draw(st.sampled_from([1, 2, 3, 4, 6]))
    n_layers = draw(st.integers(1, 3))
    mixers = ["gated_attn", "gdn", "mamba3", "atlas", "hymba"]
    layers = [draw(st.sampled_from(mixers)) for _ in range(n_layers)]
    ffns = [draw(st.sampled_from(["mlp", "none", "moe"])) for _ in layers]
    window = st.one_of(st.none(), st.integers(1, bs + 6))
    comps = {
        "gated_attn": {"n_heads": 2, "n_kv_heads": draw(st.sampled_from([1, 2])), "head_dim": 8,
                       "window": draw(window), "qk_norm": draw(st.booleans()), "output_gate": draw(st.booleans()),
                       "kv_share": draw(st.booleans()),
                       "rope": {"fraction": draw(st.sampled_from([0.0, 0.5, 1.0]))}},
        "gdn": {"n_heads": 2, "head_dim": 8, "chunk_size": draw(st.sampled_from([2, 3, 4, 64]))},
        "mamba3": {"state_size": 8, "head_dim": 8, "expand": 1, "chunk_size": draw(st.sampled_from([2, 4, 64])),
                   "mimo_rank": draw(st.sampled_from([1, 2]))},
        "atlas": {"n_heads": 2, "head_dim": 8, "window": draw(st.integers(1, 3)),
                  "chunk_size": draw(st.sampled_from([2, 4])), "memory_hidden": 1, "ns_steps": 1},
        "hymba": {"ssm": draw(st.sampled_from(["gdn", "mamba3"])),
                  "attn": {"n_heads": 2, "n_kv_heads": draw(st.sampled_from([1, 2])), "window": draw(window),
                           "kv_share": draw(st.booleans())}},
    }
    pattern = " | ".join(f"{m}+{f}" for m, f in zip(layers, ffns))
    d = bd_recipe(pattern, bs, meta=draw(st.integers(0, 3)), ffn="none", comps=comps)
    L = bs * draw(st.integers(1, max(1, 12 // bs)))
    return d, bs, L, draw(st.integers(1, 3))


@SETTINGS
@given(case=generated(), p=st.sampled_from([0.0, 0.3, 0.7, 1.0]))
def test_two_stream_equals_reference_on_generated_recipes(case, p):
    d, bs, L, B = case
    model = make(d)
    x0 = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(L * 10 + B))
    check_two_stream(model, x0, draw_xt(x0, V, p), bs)


# --------------------------------------------------------------------------- 3. block size 1


def _all_masked_ce(model, x0: torch.Tensor) -> float:
    """Mean CE of every token predicted from a [MASK] slot at its position after its clean prefix."""
    logits = reference_logits(model, torch.full_like(x0, V), x0, 1)
    return float(F.cross_entropy(logits.flatten(0, 1), x0.flatten()))


def test_block_size_1_all_masked_is_the_masked_next_token_loss():
    model = make(bd_recipe("GA | GD | M3", 1, meta=1, clip=[1.0, 1.0]))
    x0 = torch.randint(0, V, (3, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.objective.train_forward(model, model, x0, x0.clone())
    assert out.stats["bd/mask_rate"] == 1.0
    # (nelbo takes the cross entropy in float32, whatever the logits' dtype)
    assert float(out.loss) == pytest.approx(_all_masked_ce(model, x0), rel=1e-6)


@pytest.mark.parametrize("schedule", bd.SCHEDULES)
def test_block_size_1_monte_carlo_nelbo_converges_to_it(schedule):
    """With one token per block a masked token's logits do not depend on t, so
    E_t[w(t) m(t)] CE = (m(1) - m(eps)) / (1 - eps) CE, the all-masked loss (times ~1)."""
    model = make(bd_recipe("GA | GD", 1, clip=[0.0, 1.0], schedule=schedule))
    model.embed.weight.data.div_(4.0)  # moderate logits: a CE of a few nats
    x0 = torch.randint(0, V, (4, 8), generator=torch.Generator().manual_seed(0))
    cfg = model.objective.cfg
    eps = torch.tensor(bd.T_EPS, dtype=torch.float64)
    factor = float((mask_rate(cfg, torch.tensor(1.0, dtype=torch.float64)) - mask_rate(cfg, eps)) / (1 - eps))
    target = factor * _all_masked_ce(model, x0)
    ids = x0.repeat(128, 1)  # every draw: 128 noisy copies of the 4 rows
    torch.manual_seed(0)
    with torch.no_grad():
        draws = [float(model.objective.train_forward(model, model, ids, ids).loss) for _ in range(12)]
    mc = sum(draws) / len(draws)
    assert abs(mc - target) / target < 0.03, (mc, target, draws)


# --------------------------------------------------------------------------- 4. NELBO details


def test_nelbo_counts_masked_and_scored_tokens_with_their_block_weight():
    obj = build_model(bd_recipe("GA", 2)).objective
    g = torch.Generator().manual_seed(0)
    B, L = 3, 8
    logits = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    x0 = torch.randint(0, V, (B, L), generator=g)
    masked = torch.rand(B, L, generator=g) < 0.5
    scored = torch.rand(B, L, generator=g) < 0.7
    t = torch.rand(B, L // 2, generator=g, dtype=torch.float64) * 0.9 + 0.05
    got = obj.nelbo(logits, x0, masked, t, scored)
    want = 0.0
    for b in range(B):
        for i in range(L):
            if masked[b, i] and scored[b, i]:
                ce = -torch.log_softmax(logits[b, i], -1)[x0[b, i]]
                want += float(ce) / float(t[b, i // 2])  # log_linear: w = 1 / t
    assert float(got) == pytest.approx(want / int(scored.sum()), rel=1e-6)
    # logits at unmasked or unscored tokens do not matter
    other = torch.where((masked & scored)[..., None], logits, torch.randn_like(logits))
    assert float(obj.nelbo(other, x0, masked, t, scored)) == float(got)
    # nothing scored: zero, not nan
    assert float(obj.nelbo(logits, x0, masked, t, torch.zeros_like(scored))) == 0.0


def test_train_forward_labels_minus_100_are_context_only():
    model = make(bd_recipe("GA | GD", 4, clip=[0.3, 0.8]))
    obj = model.objective
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 9] = -100
    torch.manual_seed(7)
    with torch.no_grad():
        got = obj.train_forward(model, model, ids, labels).loss
    torch.manual_seed(7)  # the same draws, by hand
    t = obj.sample_t((2, 3), ids.device, 0.3, 0.8)
    xt, masked = obj.noise(ids, t)
    assert torch.equal(xt, torch.where(masked, torch.full_like(ids, V), ids))
    logits = reference_logits(model, xt, ids, 4)  # the unscored tokens are still the clean context
    ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
    scored = labels != -100
    want = (ce / t.repeat_interleave(4, 1))[masked & scored].sum() / scored.sum()
    assert float(got) == pytest.approx(float(want), rel=1e-6)
    assert bool((masked & ~scored).any()) and bool((masked & scored).any())  # both kinds occurred


@pytest.mark.parametrize("schedule, exponent", [("log_linear", 2.0), ("cosine", 2.0), ("exponential", 2.0),
                                                ("exponential", 3.0), ("exponential", 0.5)])
def test_weight_is_the_derivative_of_the_mask_rate_over_the_mask_rate(schedule, exponent):
    cfg = bd.BlockDiffusionConfig(schedule=schedule, exponent=exponent)
    t = torch.linspace(0.01, 1.0, 100, dtype=torch.float64, requires_grad=True)
    m = mask_rate(cfg, t)
    (dm,) = torch.autograd.grad(m.sum(), t)
    w = weight(cfg, t.detach())
    torch.testing.assert_close(w, dm / m.detach(), rtol=1e-10, atol=0)
    # and a finite difference, independently of autograd
    td, h = t.detach(), 1e-6
    fd = (mask_rate(cfg, td + h) - mask_rate(cfg, td - h)) / (2 * h)
    torch.testing.assert_close(w, fd / mask_rate(cfg, td), rtol=1e-6, atol=0)
    # the documented closed forms; m(0) = 0, m(1) = 1
    tt = t.detach()
    closed = {"log_linear": 1 / tt, "exponential": exponent / tt,
              "cosine": 0.5 * math.pi * torch.sin(0.5 * math.pi * tt) / (1 - torch.cos(0.5 * math.pi * tt))}
    torch.testing.assert_close(w, closed[schedule], rtol=1e-12, atol=0)
    ends = mask_rate(cfg, torch.tensor([0.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(ends, torch.tensor([0.0, 1.0], dtype=torch.float64), atol=1e-15, rtol=0)


@pytest.mark.parametrize("schedule", bd.SCHEDULES)
def test_mask_rate_and_weight_are_float32_accurate_at_small_t(schedule):
    """The levels are drawn in float32: m(t) and w(t) there must be float32-accurate down to t = eps.
    The cosine schedule's 1 - cos(pi t / 2) cancelled catastrophically (1.5% off at t = 1e-3)."""
    cfg = bd.BlockDiffusionConfig(schedule=schedule)
    t = torch.tensor([bd.T_EPS, 2e-3, 5e-3, 1e-2, 0.1, 0.5, 1.0])
    for fn in (mask_rate, weight):
        got, want = fn(cfg, t), fn(cfg, t.double())
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (0.3, 0.8), (0.0, 0.0005), (0.5, 0.5), (0.9, 1.0)])
def test_sample_t_stays_in_the_clipped_range_and_is_stratified(lo, hi):
    obj = build_model(bd_recipe("GA", 2)).objective
    g = torch.Generator().manual_seed(0)
    t = obj.sample_t((8, 16), torch.device("cpu"), lo, hi, generator=g)
    lo_eff = max(lo, bd.T_EPS)
    hi_eff = max(hi, lo_eff)
    assert t.shape == (8, 16)
    assert float(t.min()) >= lo_eff - 1e-7 and float(t.max()) <= hi_eff + 1e-7
    if hi_eff > lo_eff:  # antithetic: the 128 levels sit one per stratum of width (hi - lo) / 128
        u = ((t.flatten() - lo_eff) / (hi_eff - lo_eff)).sort().values
        torch.testing.assert_close(u.diff(), torch.full((127,), 1 / 128), atol=1e-5, rtol=0)
    # seeded: reproducible
    t2 = obj.sample_t((8, 16), torch.device("cpu"), lo, hi, generator=torch.Generator().manual_seed(0))
    assert torch.equal(t, t2)


@pytest.mark.parametrize("schedule", bd.SCHEDULES)
def test_noise_masks_each_block_at_rate_m_t(schedule):
    obj = build_model(bd_recipe("GA", 4, schedule=schedule, exponent=2.0)).objective
    levels = torch.tensor([0.05, 0.3, 0.5, 0.8, 1.0])
    n = 4000
    x0 = torch.randint(0, V, (n, 4 * len(levels)))
    t = levels[None].expand(n, -1)
    xt, masked = obj.noise(x0, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(xt[masked], torch.full((int(masked.sum()),), V)) and torch.equal(xt[~masked], x0[~masked])
    rate = masked.view(n, len(levels), 4).float().mean((0, 2))
    torch.testing.assert_close(rate, mask_rate(obj.cfg, levels), atol=0.012, rtol=0)


@pytest.mark.parametrize("schedule, clip", [("log_linear", (0.3, 0.8)), ("log_linear", (0.0, 0.6)),
                                             ("cosine", (0.45, 1.0)), ("exponential", (0.5, 0.9))])
def test_resample_draws_the_rejection_samplers_distribution(schedule, clip):
    """``resample``: every block's masked fraction lies in [m(beta), m(omega)] (a bound at the range's
    end not imposed), and the masks have the distribution of BD3-LM's loop (independent draws redrawn
    until the fraction fits): per level, the histogram of masked counts matches the rejection
    sampler's, and given the count every position is equally likely."""
    obj = build_model(bd_recipe("GA", 4, schedule=schedule, exponent=2.0, clip=list(clip), resample=True)).objective
    levels = torch.tensor([clip[0] + 0.01, sum(clip) / 2, clip[1]]).clamp(bd.T_EPS, 1.0)
    n = 6000
    x0 = torch.randint(0, V, (n, 4 * len(levels)))
    t = levels[None].expand(n, -1)
    xt, masked = obj.noise(x0, t, generator=torch.Generator().manual_seed(0), clip=clip)
    assert torch.equal(xt[masked], torch.full((int(masked.sum()),), V)) and torch.equal(xt[~masked], x0[~masked])
    counts = masked.view(n, len(levels), 4).sum(-1)
    allowed = bd._allowed_counts(obj.cfg, *clip)
    assert bool(allowed[counts].all())
    g = torch.Generator().manual_seed(1)
    for j, lv in enumerate(levels.tolist()):  # the rejection sampler, by brute force
        draws = torch.rand(4 * n, 4, generator=g) < float(mask_rate(obj.cfg, torch.tensor(lv)))
        keep = draws[allowed[draws.sum(-1)]]
        want = torch.bincount(keep.sum(-1), minlength=5).double() / keep.shape[0]
        got = torch.bincount(counts[:, j], minlength=5).double() / n
        torch.testing.assert_close(got, want, atol=0.03, rtol=0)
        pos = masked.view(n, len(levels), 4)[:, j].double().mean(0)  # exchangeable positions
        torch.testing.assert_close(pos, pos.mean().expand(4), atol=0.03, rtol=0)
    # unclipped (evaluation's U[eps, 1]): the independent draws, as without resample
    plain = build_model(bd_recipe("GA", 4, schedule=schedule, exponent=2.0)).objective
    a = obj.noise(x0, t, generator=torch.Generator().manual_seed(3))
    b = plain.noise(x0, t, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a[1], b[1])


def test_resample_count_stays_in_range_when_the_uniform_draw_is_zero(monkeypatch):
    """torch.rand draws from [0, 1): a draw of exactly 0 (2^-24 a block) took the inverse CDF below the
    lowest allowed count (n = 0 masked: no loss from the block, outside the clip range's fractions)."""
    obj = build_model(bd_recipe("GA", 4, clip=[0.3, 0.8], resample=True)).objective
    real_rand = torch.rand

    def rand(*size, **kw):  # the per-block uniform of the count drawn as 0, the rest as usual
        out = real_rand(*size, **kw)
        return torch.zeros_like(out) if out.dim() == 3 and out.shape[-1] == 1 else out

    monkeypatch.setattr(torch, "rand", rand)
    t = torch.full((8, 3), 0.5)
    _, masked = obj.noise(torch.randint(0, V, (8, 12)), t, generator=torch.Generator().manual_seed(0), clip=(0.3, 0.8))
    counts = masked.view(8, 3, 4).sum(-1)
    assert bool(bd._allowed_counts(obj.cfg, 0.3, 0.8)[counts].all()), counts


def test_resample_with_a_clip_no_block_fraction_fits_is_refused():
    with pytest.raises(RecipeError, match="objective.resample: no masked fraction k / 4"):
        load_recipe(_yaml({"kind": "block_diffusion", "block_size": 4, "clip": [0.3, 0.45], "resample": True}))


def test_eval_batch_is_seeded_and_counts_masked_scored_tokens():
    model = make(bd_recipe("GA | GD", 4))
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    a = model.objective.eval_batch(model, model, ids, labels, seed=5)
    b = model.objective.eval_batch(model, model, ids, labels, seed=5)
    c = model.objective.eval_batch(model, model, ids, labels, seed=6)
    assert a[:3] == b[:3] and a[0] != c[0]
    loss, correct, scored, _ = a
    assert math.isfinite(loss) and 0 <= correct <= scored <= 4 * 8


# --------------------------------------------------------------------------- 5. recipe validation


def _yaml(objective=None, train=None, **model) -> str:
    d = bd_recipe("GA | GD", 4)
    d["objective"] = objective
    if objective is None:
        del d["objective"]
    d["model"].update(model)
    if train is not None:
        d["train"] = train
    return yaml.safe_dump(d, sort_keys=False)


BAD = {
    "block_size": ({"kind": "block_diffusion", "block_size": 5},
                   r"objective\.block_size: must divide model\.max_seq_len \(48\).*got 5"),
    "kind": ({"kind": "block_difusion"},
             r"objective\.kind: unknown objective 'block_difusion'.*did you mean 'block_diffusion'\?"),
    "clip-order": ({"kind": "block_diffusion", "clip": [0.8, 0.2]}, r"objective\.clip: must be \[beta, omega\]"),
    "clip-low": ({"kind": "block_diffusion", "clip": [-0.1, 0.5]}, r"objective\.clip: must be \[beta, omega\]"),
    "clip-high": ({"kind": "block_diffusion", "clip": [0.2, 1.5]}, r"objective\.clip: must be \[beta, omega\]"),
    "clip-zero": ({"kind": "block_diffusion", "clip": [0.0, 0.0]}, r"objective\.clip: omega must be >= 0\.001"),
    "clip-three": ({"kind": "block_diffusion", "clip": [0.1, 0.2, 0.3]},
                   r"objective\.clip: must be a list of 2 numbers, got 3$"),
    "unknown-key": ({"kind": "block_diffusion", "blocksize": 4},
                    r"objective\.blocksize: unknown key \(did you mean 'block_size'\?\)"),
    "next_token-settings": ({"kind": "next_token", "block_size": 4}, r"objective\.block_size: unknown key"),
    "missing-kind": ({"block_size": 4}, r"objective\.kind: missing required key \(one of: block_diffusion, "
                                        r"forecast, ladir, next_token\)"),
    "schedule": ({"kind": "block_diffusion", "schedule": "linear"}, r"objective\.schedule: must be one of"),
    "exponent": ({"kind": "block_diffusion", "exponent": 0}, r"objective\.exponent: must be > 0"),
    "not-a-mapping": ("block_diffusion", r"objective: must be a mapping with a 'kind'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_objective_is_one_line_naming_the_key(case, tmp_path, capsys):
    objective, pattern = BAD[case]
    with pytest.raises(RecipeError) as e:
        load_recipe(_yaml(objective))
    assert len(e.value.errors) == 1 and "\n" not in str(e.value)
    assert re.match(r"^<recipe>:\d+: " + pattern, str(e.value)), str(e.value)
    # hymba check: exit 1, that one line, naming the file and line
    p = tmp_path / "bad.yaml"
    p.write_text(_yaml(objective))
    assert main(["check", str(p)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert re.match(rf"^{re.escape(str(p))}:\d+: " + pattern, err), err


def test_train_seq_len_must_be_a_multiple_of_block_size():
    with pytest.raises(RecipeError, match=r"^<recipe>:\d+: train\.seq_len: must be a multiple of "
                                          r"objective\.block_size \(4\), got 30$"):
        load_recipe(_yaml({"kind": "block_diffusion", "block_size": 4}, train={"seq_len": 30}))
    load_recipe(_yaml({"kind": "block_diffusion", "block_size": 4}, train={"seq_len": 32}))


@pytest.mark.parametrize("part, key", [({"halting": {"kind": "act"}}, "halting.kind"),
                                       ({"layer_router": {"enabled": True}}, "layer_router.enabled"),
                                       ({"branches": {"n_branches": 2}}, "branches.n_branches")])
def test_block_diffusion_trains_etd_models_at_fixed_depth_only(part, key):
    """An ETD model trains by block diffusion with fixed think iterations; the router's per-token /
    per-row decisions (ACT halting, Dr.LLM routes, MoDr branches) are refused, naming the key and its line."""
    etd = {"encoder_layers": 0, "think_layers": 1, "decoder_layers": 1}
    load_recipe(_yaml({"kind": "block_diffusion", "block_size": 4}, etd=etd))
    d = yaml.safe_load(_yaml({"kind": "block_diffusion", "block_size": 4}, etd=etd))
    d["components"]["etd_router"] = part
    text = yaml.safe_dump(d, sort_keys=False)
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.strip() == "etd_router:")
    line = next(i for i, x in enumerate(lines[start:], start + 1) if x.strip().startswith(key.split(".")[-1] + ":"))
    with pytest.raises(RecipeError, match=rf"^<recipe>:{line}: components\.etd_router\.{re.escape(key)}: block "
                                          r"diffusion trains ETD models at fixed depth"):
        load_recipe(text)
    d["objective"] = None
    del d["objective"]
    load_recipe(yaml.safe_dump(d))  # the same model without the objective is fine


ETD_CASES = {
    "GA-think": ("GA | (GD | GA) | GA", {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2}, 0),
    "every-mixer-meta": ("GD | (GA | M3 | ATL | HY) | GA", {"encoder_layers": 1, "think_layers": 4, "decoder_layers": 1,
                                                            "iterations": 2, "max_iterations": 3}, 2),
}


@pytest.mark.parametrize("bs", [1, 3, 4])
@pytest.mark.parametrize("case", list(ETD_CASES))
def test_two_stream_equals_reference_in_etd_models(case, bs):
    """ETD (encoder, think block applied twice with tied weights, decoder; each application its own
    state): the vectorised two-stream forward == each noisy block run on a cache of the clean prefix,
    logits and gradients."""
    pattern, etd, meta = ETD_CASES[case]
    r = bd_recipe(pattern, bs, meta=meta)
    r["model"]["etd"] = etd
    model = make(r)
    L = 12 if bs > 1 else 8
    x0 = torch.randint(0, V, (2, L), generator=torch.Generator().manual_seed(bs))
    check_two_stream(model, x0, draw_xt(x0, V, seed=bs), bs, grads=bs != 1 or case == "GA-think")


def test_error_line_points_at_the_objective_key(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel: {vocab_size: 32, d_model: 32, max_seq_len: 48, block_pattern: GA}\n"
                 "objective:\n  kind: block_diffusion\n  block_size: 5\n")
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(p))}:5: objective\.block_size: "):
        load_recipe(p)


def test_recipe_hash_without_objective_is_unchanged_and_objective_round_trips():
    gpt = load_recipe(ROOT / "configs" / "gpt_tiny.yaml")
    assert gpt.objective is None and "objective" not in gpt.to_dict()
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"name\s+gpt-tiny\s+\(hash ([0-9a-f]{12})\)", readme)
    if m:  # the hash the README shows for `hymba info configs/gpt_tiny.yaml`
        assert gpt.hash() == m.group(1)
    r = load_recipe(_yaml({"kind": "block_diffusion", "block_size": 4, "schedule": "exponential", "exponent": 3,
                           "clip": [0.25, 0.75]}))
    back = load_recipe(r.to_yaml())
    assert back == r and back.hash() == r.hash()
    assert back.objective == bd.BlockDiffusionConfig(block_size=4, schedule="exponential", exponent=3.0,
                                                     clip=(0.25, 0.75))
    assert r.hash() != load_recipe(_yaml({"kind": "block_diffusion", "block_size": 2})).hash()
    assert r.hash() != load_recipe(_yaml(None)).hash()


def test_bd_tiny_config_is_valid():
    r = load_recipe(ROOT / "configs" / "bd_tiny.yaml")
    assert r.objective.kind == "block_diffusion" and r.train.seq_len % r.objective.block_size == 0


# --------------------------------------------------------------------------- 6. cache fork


def _snapshot(cache) -> dict:
    snap = {"pos": cache.pos.clone(), "started": cache.started, "extra": dict(cache.extra)}
    for i, s in enumerate(cache.states):
        if s is not None:
            for name, t in s.tensors():
                snap[f"{i}.{name}"] = t.clone()
    return snap


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("meta", [0, 2])
def test_a_forked_cache_leaves_the_original_untouched(meta):
    comps = {"gated_attn": {"n_heads": 2, "head_dim": 8, "window": 6}}
    model = make(bd_recipe("GA | GD | M3 | ATL | HY | GA+moe", 4, meta=meta, comps=comps))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    block = torch.full((2, 4), V)
    block[:, 1] = 5
    with torch.no_grad():
        cache, fresh = model.new_cache(2), model.new_cache(2)
        model(ids[:, :5], cache=cache)
        model(ids[:, :5], cache=fresh)
        before = _snapshot(cache)
        assert sum(1 for k in before if "." in k) >= 6  # every state type holds tensors
        for _ in range(2):  # twice: the second fork sees exactly what the first saw
            fork = cache.fork()
            a = model(block, cache=fork, bidirectional=True, check_inputs=False).logits
            assert torch.equal(fork.pos, cache.pos + 4)
            _same(_snapshot(cache), before)
        b = model(block, cache=cache.fork(), bidirectional=True, check_inputs=False).logits
        assert torch.equal(a, b)
        # committing on the original == on a cache that was never forked
        got = model(ids[:, 5:9], cache=cache).logits
        want = model(ids[:, 5:9], cache=fresh).logits
        assert torch.equal(got, want)
        _same(_snapshot(cache), _snapshot(fresh))


def test_fork_of_an_unstarted_cache_adds_meta_tokens_once():
    model = make(bd_recipe("GA | GD", 4, meta=2))
    cache = model.new_cache(1)
    ids = torch.randint(0, V, (1, 4))
    with torch.no_grad():
        fork = cache.fork()
        model(ids, cache=fork)
        assert not cache.started and int(cache.pos) == 0 and int(fork.pos) == 2 + 4
        assert cache.states[0].k is None and fork.states[0].k.shape[2] == 2 + 4  # the fork holds meta + 4 keys


# --------------------------------------------------------------------------- 7. bidirectional mode


def test_bidirectional_chunk_sees_later_tokens_only_in_attention():
    model = make(bd_recipe("GA | GA", 4, meta=2))
    prefix = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0))
    chunk = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(1))
    other = chunk.clone()
    other[0, 3] = (other[0, 3] + 1) % V
    with torch.no_grad():
        cache = model.new_cache(1)
        model(prefix, cache=cache)

        def first(c: torch.Tensor, bidirectional: bool) -> torch.Tensor:
            return model(c, cache=cache.fork(), bidirectional=bidirectional).logits[0, 0]

        assert not torch.allclose(first(chunk, True), first(other, True))
        assert torch.equal(first(chunk, False), first(other, False))
        # causal chunk on a cache == the full causal forward
        full = model(torch.cat([prefix, chunk], 1)).logits[0, 4:]
        torch.testing.assert_close(model(chunk, cache=cache.fork()).logits[0], full, atol=1e-12, rtol=0)


def test_bidirectional_is_causal_in_recurrent_mixers():
    model = make(bd_recipe("GD | M3 | ATL", 4))
    ids = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids[:, :4], cache=cache)
        a = model(ids[:, 4:], cache=cache.fork(), bidirectional=True).logits
        b = model(ids[:, 4:], cache=cache.fork()).logits
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_meta_tokens_do_not_see_the_first_chunk():
    model = make(bd_recipe("GA | GA | GA", 4, meta=3))
    chunk = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(0))
    other = torch.randint(0, V, (1, 4), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        caches = {}
        for name, ids, bidi in [("bidi", chunk, True), ("bidi-other", other, True), ("causal", chunk, False)]:
            caches[name] = model.new_cache(1)
            model(ids, cache=caches[name], bidirectional=bidi)
    for layer in (1, 2):  # layer 0's meta keys depend on nothing but the meta embeddings
        ks = {n: c.states[layer].k[:, :, :3] for n, c in caches.items()}
        vs = {n: c.states[layer].v[:, :, :3] for n, c in caches.items()}
        assert torch.equal(ks["bidi"], ks["causal"]) and torch.equal(ks["bidi"], ks["bidi-other"])
        assert torch.equal(vs["bidi"], vs["causal"]) and torch.equal(vs["bidi"], vs["bidi-other"])
        # the chunk's own keys do differ between bidirectional and causal
        assert not torch.allclose(caches["bidi"].states[layer].k[:, :, 3:], caches["causal"].states[layer].k[:, :, 3:])


# --------------------------------------------------------------------------- 8. training


def _text_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    lines = [f"the {w} fox jumps over the lazy dog number {i % 7}.\n"
             for i, w in enumerate(["quick", "brown", "red", "slow"] * 60)]
    p.write_text("".join(lines))
    return p


def test_hymba_train_on_bd_tiny_learns_evaluates_and_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", str(ROOT / "configs" / "bd_tiny.yaml"), "--out", str(out), "--data", str(_text_file(tmp_path)),
            "--steps", "40", "--batch-size", "8", "--seq-len", "32", "--warmup", "2", "--eval-every", "20",
            "--eval-batches", "2", "--save-every", "40", "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    assert len(losses) == 40 and all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    for r in evals:
        assert math.isfinite(r["eval_loss"]) and r["eval_ppl"] == pytest.approx(math.exp(r["eval_loss"]))
    assert evals[-1]["eval_loss"] < math.log(256)  # better than uniform over the bytes
    assert all(0.0 < r["bd/mask_rate"] < 1.0 for r in rows)
    model = from_pretrained(out / "step-40")
    assert model.recipe.objective == load_recipe(ROOT / "configs" / "bd_tiny.yaml").objective
    sd = model.state_dict()
    assert "objective.mask_embed" in sd and sd["objective.mask_embed"].shape == (64,)
    from safetensors.torch import load_file

    saved = load_file(str(out / "step-40" / "model.safetensors"))
    assert torch.equal(saved["objective.mask_embed"], sd["objective.mask_embed"])
    # the reloaded model evaluates like the trained one: same seeded NELBO
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loss, *_ = model.objective.eval_batch(model, model, ids, ids, seed=0)
    assert math.isfinite(loss)


# --------------------------------------------------------------------------- 9. learning


def test_block_diffusion_learns_to_copy():
    """x = [a | a] with a random: the second half is scored. At t = 1 (every scored token
    masked, the whole block at once) only the clean first half can tell the tokens, so
    accuracy far above chance needs the two-stream context to work."""
    torch.manual_seed(0)
    model = build_model(BD_COPY)
    obj = model.objective
    ev_ids, ev_labels = bd_copy_batch(256, torch.Generator().manual_seed(123))
    scored = ev_labels != -100

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            nelbo = obj.eval_batch(model, model, ev_ids, ev_labels, seed=0)[0]
            xt = torch.where(scored, torch.full_like(ev_ids, obj.mask_token_id), ev_ids)  # t = 1 on the copy
            logits, _ = obj.two_stream_logits(model, xt, ev_ids)
            acc = float((logits.argmax(-1)[scored] == ev_ids[scored]).float().mean())
        model.train()
        return nelbo, acc

    nelbo0, acc0 = evaluate()
    train_bd_copy(model, 120)
    nelbo1, acc1 = evaluate()
    assert acc0 < 0.2 and nelbo0 > 2.0
    assert nelbo1 < 0.25 * nelbo0, (nelbo0, nelbo1)
    assert acc1 > 0.9, acc1  # chance: 1/16


# --------------------------------------------------------------------------- found while writing these (fixed)


@pytest.mark.parametrize("pattern, comps", [
    ("GA", {"gated_attn": {"n_heads": 2, "head_dim": 8, "window": 2}}),
    ("HY", {"hymba": {"ssm": "gdn", "attn": {"n_heads": 2, "window": 3}}}),
])
def test_window_narrower_than_block_two_stream_equals_reference(pattern, comps):
    model = make(bd_recipe(pattern, 4, comps=comps))
    x0 = torch.randint(0, V, (1, 8), generator=torch.Generator().manual_seed(0))
    check_two_stream(model, x0, draw_xt(x0, V), 4, grads=False)


def test_block_size_zero_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"objective\.block_size: must be >= 1"):
        load_recipe(_yaml({"kind": "block_diffusion", "block_size": 0}))


def test_seq_len_flag_not_a_multiple_of_block_size_is_one_line(tmp_path, capsys):
    rc = main(["train", str(ROOT / "configs" / "bd_tiny.yaml"), "--out", str(tmp_path / "run"), "--steps", "2",
               "--batch-size", "2", "--seq-len", "30", "--no-progress"])
    err = capsys.readouterr().err
    # the flag's value the recipe's objective cannot take: a usage error, exit 2 (it was 1)
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "30" in err and "block_size" in err and not (tmp_path / "run").exists()
    # the recipe's own train.seq_len: bad input, refused at load, exit 1
    d = yaml.safe_load((ROOT / "configs" / "bd_tiny.yaml").read_text())
    d["train"] = {**(d.get("train") or {}), "seq_len": 30}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    rc = main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "train.seq_len: must be a multiple of" in err, err
    assert not (tmp_path / "run").exists()


def test_eval_noise_is_per_row_so_the_batch_split_does_not_matter():
    """Held-out NELBO of 4 rows in one batch == the mean of 2 + 2 rows (the second batch starting at
    row 2): each row's noise is seeded by its index (it was seeded per batch, so a 1-GPU and a 2-GPU
    run reported different held-out losses)."""
    model = make(bd_recipe("GA | GD", 4)).eval()
    obj = model.objective
    ids = torch.randint(0, 24, (4, 16), generator=torch.Generator().manual_seed(0))
    whole = obj.eval_batch(model, model, ids, ids, seed=10)
    a = obj.eval_batch(model, model, ids[:2], ids[:2], seed=10)
    b = obj.eval_batch(model, model, ids[2:], ids[2:], seed=12)
    assert whole[0] == pytest.approx((a[0] + b[0]) / 2, rel=1e-6)
    assert whole[1:3] == (a[1] + b[1], a[2] + b[2])


def _bd3lms_mask(L: int, bs: int) -> torch.Tensor:
    """BD3-LM's training mask over ``[x_t | x_0]`` (its ``block_diff_mask``), built entry by entry:
    block diagonal within each stream, x_t block b sees x_0 blocks < b, x_0 block-causal."""
    out = torch.zeros(2 * L, 2 * L, dtype=torch.bool)
    for q in range(2 * L):
        for k in range(2 * L):
            q_clean, k_clean = q >= L, k >= L
            qb, kb = (q - L * q_clean) // bs, (k - L * k_clean) // bs
            out[q, k] = ((qb == kb and q_clean == k_clean) or (qb > kb and k_clean and not q_clean)
                         or (qb >= kb and k_clean and q_clean))
    return out


@pytest.mark.parametrize("L, bs", [(8, 1), (8, 2), (12, 3), (12, 4), (13, 4), (7, 3), (5, 16), (16, 16)])
@pytest.mark.parametrize("M", [0, 2])
def test_two_stream_mask_is_bd3lms_for_the_noisy_stream_and_causal_for_the_clean_one(L, bs, M):
    """The two-stream mask against a naive construction of BD3-LM's: the noisy rows are exactly
    BD3-LM's (x_t block b: its own noisy block both ways and the clean blocks < b; a last block
    cut short by a length that is not a multiple of the block size included) plus every meta
    token; the clean rows are token-causal where BD3-LM's are block-causal (the documented
    difference, ``core/two_stream.py``) and never see the noisy stream."""
    from hymba_plus.core import two_stream as tsm

    got = tsm.two_stream_visible(tsm.TwoStream(block_size=bs, n_meta=M, length=L), torch.device("cpu"))
    ref = _bd3lms_mask(L, bs)
    order = torch.cat([torch.arange(M + L, M + 2 * L), torch.arange(M, M + L)])  # ours as [x_t | x_0]
    ours = got[order][:, order]
    assert torch.equal(ours[:L], ref[:L])
    assert torch.equal(ours[L:, L:], torch.ones(L, L, dtype=torch.bool).tril())
    assert not ours[L:, :L].any()
    assert torch.equal(ours[L:, L:] | ref[L:, L:], ref[L:, L:])  # causal sees no more than block-causal
    if M:
        assert got[M:, :M].all()  # every clean and noisy token sees the meta tokens
        assert torch.equal(got[:M, :M], torch.ones(M, M, dtype=torch.bool).tril()) and not got[:M, M:].any()
