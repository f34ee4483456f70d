"""hymba: parallel attention + SSM heads (arXiv 2411.13676), with cross-layer KV sharing."""

import pytest
import torch

from hymba_plus import RecipeError, build_model, load_recipe
from hymba_plus.components.attention import kv_share_roles

from .conftest import rel_err
from .helpers import tiny_recipe, train_mqar


def recipe(ssm: str = "mamba3", pattern: str = "HY | HY | GA", kv_share: bool = False, window=None, **model):
    comps = {
        "hymba": {"ssm": ssm, "attn": {"n_heads": 4, "n_kv_heads": 2, "window": window, "kv_share": kv_share}},
        "mamba3": {"state_size": 16, "head_dim": 16},
        "gdn": {"n_heads": 4, "head_dim": 16},
        "gated_attn": {"n_heads": 2},
    }
    return tiny_recipe(pattern, comps, **model)


def chunked_logits(model, ids, cuts, mask=None):
    cache = model.new_cache(ids.shape[0])
    outs, start = [], 0
    for end in [*cuts, ids.shape[1]]:
        m = None if mask is None else mask[:, start:end]
        outs.append(model(ids[:, start:end], attention_mask=m, cache=cache).logits)
        start = end
    return torch.cat(outs, 1), cache


@pytest.mark.parametrize("ssm", ["mamba3", "gdn"])
@pytest.mark.parametrize("kv_share,window", [(False, None), (True, 5)])
def test_invariant_and_padding(ssm, kv_share, window):
    torch.manual_seed(0)
    model = build_model(recipe(ssm, kv_share=kv_share, window=window, meta_tokens=2)).eval()
    ids = torch.randint(0, 64, (2, 23))
    with torch.no_grad():
        full = model(ids).logits
        inc, _ = chunked_logits(model, ids, [7, 8, 16])
        assert rel_err(inc, full) < 1e-4
        mask = torch.ones_like(ids)
        mask[1, :6] = 0
        padded = model(ids, attention_mask=mask).logits
        alone = model(ids[1:, 6:]).logits
        assert rel_err(padded[1, 6:], alone[0]) < 1e-4


def test_kv_sharing_pairs_consecutive_layers_and_saves_cache():
    shared = build_model(recipe(pattern="HY | HY | HY | GA", kv_share=True))
    plain = build_model(recipe(pattern="HY | HY | HY | GA", kv_share=False))
    assert kv_share_roles(shared.recipe) == ["producer", "consumer", None, None]
    consumer = shared.blocks[1].mixer.attn
    assert not hasattr(consumer, "k_proj") and not hasattr(consumer, "v_proj")
    assert shared.num_parameters() < plain.num_parameters()
    ids = torch.randint(0, 64, (1, 12))
    c1, c2 = shared.new_cache(1), plain.new_cache(1)
    with torch.no_grad():
        shared(ids, cache=c1)
        plain(ids, cache=c2)
    assert c1.layer_nbytes()[1] < c2.layer_nbytes()[1]
    # the consumer's bytes are only its SSM state
    assert c1.layer_nbytes()[1] == shared.blocks[1].mixer.ssm.state_nbytes(12, torch.float32)


def test_state_nbytes_matches_real_cache():
    model = build_model(recipe(window=4, meta_tokens=2))
    ids = torch.randint(0, 64, (1, 30))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(ids, cache=cache)
    for block, got in zip(model.blocks, cache.layer_nbytes()):
        assert block.mixer.state_nbytes(30, torch.float32, n_meta=2) == got


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = build_model(recipe("gdn"))
    ids = torch.randint(0, 64, (2, 16))
    model(ids, labels=ids).loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()
            or p.grad.abs().max() == 0]
    assert dead == []


def test_width_mismatch_is_a_recipe_error():
    r = recipe()
    r["components"]["hymba"]["attn"]["head_dim"] = 8
    with pytest.raises(RecipeError, match=r"components\.hymba\.attn\.head_dim: .*inner width"):
        load_recipe(r)
    r["components"]["hymba"]["attn"].pop("head_dim")
    r["components"]["hymba"]["attn"]["n_heads"] = 3
    r["components"]["hymba"]["attn"]["n_kv_heads"] = 1
    with pytest.raises(RecipeError, match=r"components\.hymba\.attn\.n_heads"):
        load_recipe(r)


def test_learns_mqar():
    """2 hymba layers (attention + Mamba-3 heads) on MQAR, 4 pairs in 32 tokens: chance 1/32, answering a
    value seen in the context at random 1/4, so the bar (0.35, as mamba3's) needs key -> value recall.
    Measured (250 steps): 0.44 / 0.42 (seeds 0 / 1); with both heads' outputs detached (untrained
    mixers) 0.20. The former budget (150 steps) reached only 0.28 / 0.27, so its bar (0.2) sat below
    the 1/4 of answering a seen value."""
    r = recipe(pattern="HY | HY")
    acc = train_mqar(r, steps=250, batch=16, seq_len=32, n_pairs=4, lr=3e-3)
    assert acc > 0.35, acc
