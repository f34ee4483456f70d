"""The recipe options HF models need: q/k-norm eps and scale, gdn's gated-norm scale, the MoE
balancing-loss convention. Unset, each keeps the behaviour (and the recipe hashes: the README's
``hymba check configs/`` sample pins them) of before."""

from __future__ import annotations

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli.info import conventions, describe, format_info
from hymba_plus.core.recipe import RecipeError, load_recipe


def rec(pattern: str, **comps) -> dict:
    base = {"gated_attn": {"n_heads": 2}, "gdn": {"n_heads": 2}, "moe": {"n_experts": 4, "top_k": 2, "n_shared": 0,
                                                                        "z_loss_coef": 0.0}}
    for k, v in comps.items():
        base[k] = {**base[k], **v}
    return {"name": "o", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": pattern}, "components": base}


def test_defaults_are_unchanged():
    m = build_model(rec("GA | GD+moe"))
    q = m.blocks[0].mixer.q_norm
    assert q.zero_centered and q.eps == 1e-6 and not q.weight.any()
    assert m.blocks[1].mixer.norm.zero_centered
    r = load_recipe(rec("GA | GD+moe"))
    assert r.component("moe").balance_loss is None and conventions(r) == []


def test_options_take_effect():
    m = build_model(rec("GA | GD+moe", gated_attn={"qk_norm_eps": 1e-5, "qk_norm_zero_centered": False},
                        gdn={"norm_zero_centered": False}))
    for n in (m.blocks[0].mixer.q_norm, m.blocks[0].mixer.k_norm):
        assert not n.zero_centered and n.eps == 1e-5 and torch.equal(n.weight, torch.ones(16))
    g = m.blocks[1].mixer.norm
    assert not g.zero_centered and torch.equal(g.scale(), g.weight)


@pytest.mark.parametrize("comps, msg", [
    ({"gated_attn": {"qk_norm_eps": 0.0}}, "components.gated_attn.qk_norm_eps: must be > 0"),
    ({"gated_attn": {"qk_norm_zero_centered": "yes"}}, "components.gated_attn.qk_norm_zero_centered"),
    ({"gdn": {"norm_zero_centred": False}}, "did you mean 'norm_zero_centered'"),
    ({"moe": {"balance_loss": "hf"}}, "components.moe.balance_loss: must be one of 'per_layer', 'pooled'"),
])
def test_options_are_strict(comps, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(rec("GA | GD+moe", **comps))


def test_pooled_balance_loss_is_top_k_times_ours_on_one_layer():
    """One MoE layer: HF's f sums to top_k, ours to 1, so the pooled loss is top_k x ours."""
    torch.manual_seed(0)
    per = build_model(rec("GA+moe", moe={"balance_loss": "per_layer"}))
    pooled = build_model(rec("GA+moe", moe={"balance_loss": "pooled"}))
    pooled.load_state_dict(per.state_dict())
    ids = torch.randint(0, 64, (2, 12))
    a, b = per(ids, labels=ids).aux_loss, pooled(ids, labels=ids).aux_loss
    assert torch.allclose(b, 2 * a, rtol=1e-5)
    b.backward()  # the pooled loss trains the router
    assert pooled.blocks[0].ffn.router.weight.grad.abs().sum() > 0


def test_info_shows_the_conventions():
    r = load_recipe(rec("GA | GD+moe", gated_attn={"qk_norm_eps": 1e-5, "qk_norm_zero_centered": False},
                        gdn={"norm_zero_centered": False}, moe={"balance_loss": "pooled"}))
    line = [x for x in format_info(describe(r)).splitlines() if x.startswith("conventions")]
    assert line == ["conventions q/k norm scale w, eps 1e-05; gdn gated norm scale w; moe balance loss pooled over "
                    "layers (HF), coef 0.01"]


@pytest.mark.parametrize("scaling, msg", [
    ({"kind": "yarn", "factor": 2.0, "low_freq_factor": 1.0}, "rope.scaling.low_freq_factor: only for kind llama3"),
    ({"kind": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 2.0},
     "rope.scaling.high_freq_factor: must be > low_freq_factor"),
])
def test_llama3_rope_settings_are_strict(scaling, msg):
    with pytest.raises(RecipeError, match=msg):
        load_recipe(rec("GA", gated_attn={"rope": {"scaling": scaling}}))
