"""ETD (encode-think-decode) with the etd_router: the invariant for every mixer in the think
block — fixed and adaptive iterations, Dr.LLM routes, MoDr branches, random chunk splits and
left padding — plus tied weights, per-application states, halting that leaves later
iterations untouched, all-execute == the un-routed model bit for bit, recipe checks."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from hymba_plus import RecipeError, build_model, load_recipe, registry
from hymba_plus.components.etd_router import EXECUTE, REPEAT, SKIP, class_weights, focal_loss
from tests.conftest import rel_err
from tests.test_invariant import SETTINGS, TINY, V, chunked, splits

MIXERS = [m for m in registry.names("mixer") if m not in ("none", "hymba")] + ["hymba"]


@st.composite
def etd_recipes(draw, think_mixer: str | None = None) -> dict:
    mixer = think_mixer or draw(st.sampled_from(MIXERS))
    n_enc, n_dec = draw(st.integers(0, 1)), draw(st.integers(0, 1))
    think = [mixer] + [draw(st.sampled_from(["gated_attn", "gdn", mixer]))]
    layers = ["gdn"] * n_enc + think + ["gated_attn"] * n_dec
    used = set(layers) | ({"mamba3", "gdn"} if "hymba" in layers else set())
    ffn = draw(st.sampled_from(["mlp", "none", "moe"]))
    comps = {name: draw(TINY[name]) for name in sorted(used)}
    if ffn != "none":
        comps[ffn] = draw(TINY[ffn])
    halting = draw(st.sampled_from(["none", "act"]))
    comps["etd_router"] = {
        "halting": {"kind": halting, "threshold": draw(st.sampled_from([0.5, 0.9])),
                    "init_bias": draw(st.sampled_from([-1.0, 0.0, 1.0]))},
        "layer_router": {"enabled": draw(st.booleans()), "hidden": 8, "windows": draw(st.integers(1, 3))},
        "branches": {"n_branches": draw(st.sampled_from([0, 2, 3])), "rank": 2},
    }
    iters = draw(st.integers(1, 3))
    cap = iters + draw(st.integers(0, 1))
    if halting == "act":  # ACT needs room to halt: a cap of 1 iteration is refused
        cap = max(cap, 2)
    return {"name": "etd-generated", "model": {
        "vocab_size": V, "d_model": 32, "max_seq_len": 64, "meta_tokens": draw(st.integers(0, 2)),
        "ffn": ffn, "block_pattern": " | ".join(layers),
        "etd": {"encoder_layers": n_enc, "think_layers": 2, "decoder_layers": n_dec, "iterations": iters,
                "max_iterations": cap}}, "components": comps}


def make(d: dict, seed: int = 0, routes: bool = True):
    torch.manual_seed(seed)
    model = build_model(d).eval()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)
        r = model.etd_router
        if r.halt is not None:  # halting that depends on the token: some halt early, some late
            r.halt.weight.normal_(0, 1.0)
        if r.n_branches:  # branches that differ, so the branch choice matters
            for b in r.lora_b:
                b.normal_(0, 0.3)
        if r.routers is not None and routes:
            r.enable_routes()
    return model


@SETTINGS
@given(data=st.data())
def test_etd_chunked_cached_equals_full_forward(data):
    d = data.draw(etd_recipes())
    model = make(d)
    T = data.draw(st.integers(1, 12), label="T")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T))
    bounds = splits(data.draw, T)
    with torch.no_grad():
        got, cache = chunked(model, ids, bounds)
        # per-sequence decisions are taken at the prefill: the full forward gets the same route
        routes = cache.extra.get("routes")
        full = model(ids, routes=routes).logits if routes is not None else model(ids).logits
    assert rel_err(got, full) <= 1e-4, (d, bounds)


@SETTINGS
@given(data=st.data())
def test_etd_left_padding_equals_unpadded(data):
    d = data.draw(etd_recipes())
    model = make(d)
    T = data.draw(st.integers(2, 10), label="T")
    pad = data.draw(st.integers(1, T - 1), label="pad")
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(T * 7 + pad))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    first = data.draw(st.integers(pad, T), label="first chunk")
    bounds = [0, first, T] if first < T else [0, T]
    with torch.no_grad():
        got, cache = chunked(model, ids, bounds, mask=mask[:, :first])
        routes = cache.extra.get("routes")
        kw0 = {"routes": routes[:1]} if routes is not None else {}
        kw1 = {"routes": routes[1:]} if routes is not None else {}
        row0 = model(ids[:1, pad:], **kw0).logits
        row1 = model(ids[1:], **kw1).logits
    assert rel_err(got[0, pad:], row0[0]) <= 1e-4, d
    assert rel_err(got[1], row1[0]) <= 1e-4, d


def _recipe(think_mixer: str = "gated_attn", **router) -> dict:
    comps = {"gated_attn": {"n_heads": 2, "head_dim": 8}, "gdn": {"n_heads": 2, "head_dim": 8},
             "mamba3": {"state_size": 8, "head_dim": 8, "expand": 1}, "mlp": {"d_hidden": 32},
             "etd_router": router}
    return {"name": "etd", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "meta_tokens": 2,
                                     "block_pattern": f"gdn | {think_mixer} | gdn | gated_attn",
                                     "etd": {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1,
                                             "iterations": 3}},
            "components": comps}


def test_think_weights_are_tied_and_each_application_has_its_own_state():
    d = _recipe()
    plain = {**d, "model": {k: v for k, v in d["model"].items() if k != "etd"}, "components":
             {k: v for k, v in d["components"].items() if k != "etd_router"}}
    etd, base = build_model(d), build_model(plain)
    assert etd.num_parameters() == base.num_parameters()  # fixed iterations, no router parts
    cache = etd.new_cache(1)
    assert len(cache.states) == 1 + 2 * 3 + 1  # encoder + think x 3 iterations + decoder
    with torch.no_grad():
        etd(torch.randint(0, V, (1, 5)), cache=cache)
    sizes = cache.layer_nbytes()
    assert all(s > 0 for s in sizes)
    # the think attention's three iterations hold different keys (same weights, other inputs)
    k = [cache.states[1 + 2 * it].k for it in range(3)]
    assert not torch.equal(k[0], k[1]) and not torch.equal(k[1], k[2])


def test_more_think_iterations_at_inference_up_to_max_iterations():
    d = _recipe()
    d["model"]["etd"]["max_iterations"] = 5
    model = build_model(d).eval()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        a = model(ids).logits
        b = model(ids, think_iterations=5).logits
        c = model(ids, think_iterations=3).logits
        cache = model.new_cache(2)
        x = torch.cat([model(ids[:, :4], cache=cache, think_iterations=5).logits,
                       model(ids[:, 4:], cache=cache).logits], 1)  # the cache keeps the iterations
    assert torch.equal(a, c) and not torch.allclose(a, b)
    assert rel_err(x, b) <= 1e-5
    with pytest.raises(ValueError, match=r"think_iterations must be in \[1, 5\]"):
        model(ids, think_iterations=6)
    for bad in (2.5, True, "3"):  # 2.5 was a TypeError from range() naming nothing, True ran one iteration
        with pytest.raises(ValueError, match=r"think_iterations must be an integer in \[1, 5\] \(model.etd.max_iterations\), got"):
            model(ids, think_iterations=bad)


def test_halted_tokens_leave_later_iterations_untouched():
    """ACT with a halting unit that always halts after the first iteration: the later
    iterations' states never see a token (as padding), and the output is iteration 1's."""
    d = _recipe(halting={"kind": "act", "init_bias": 20.0, "threshold": 0.5})
    model = build_model(d).eval()
    cache = model.new_cache(2)
    with torch.no_grad():
        out = model(torch.randint(0, V, (2, 7)), cache=cache)
    sizes = cache.layer_nbytes()
    think_states = sizes[1:7]  # iteration 0: slots 1, 2; iterations 1, 2: slots 3..6
    assert think_states[0] > 0 and think_states[1] > 0
    assert out.stats["etd/iterations"] == 1.0
    att = cache.states[1 + 2 * 1]  # think attention at iteration 1: no key was stored
    assert att.k is None or bool((att.pos < 0).all())
    # and an always-thinking unit runs every iteration
    d2 = _recipe(halting={"kind": "act", "init_bias": -20.0})
    m2 = build_model(d2).eval()
    with torch.no_grad():
        assert m2(torch.randint(0, V, (2, 7))).stats["etd/iterations"] == 3.0


def test_act_ponder_cost_is_in_the_training_loss_and_trains_the_halting_unit():
    """tau * (N + R) joins the loss, and its gradient reaches the halting unit: the same model and
    tokens without the cost give the halting bias another gradient, larger by tau * d(N + R)/db,
    which is negative (a larger bias halts sooner). (The LM loss alone also reaches the bias through
    the halting weights, so a nonzero gradient did not show that the ponder cost trains it.)"""
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    grads = {}
    for tau in (0.1, 0.0):
        torch.manual_seed(0)
        model = build_model(_recipe(halting={"kind": "act", "ponder_cost": tau, "init_bias": 0.0})).train()
        out = model(ids, labels=ids)
        if tau:
            assert out.aux_loss is not None and float(out.aux_loss.detach()) > 0.1  # tau * (N + R) >= tau
        out.loss.backward()
        grads[tau] = model.etd_router.halt.bias.grad.clone()
    assert float(grads[0.1] - grads[0.0]) < -1e-4, grads


@pytest.mark.parametrize("ponder_cost, iterations", [(0.01, 1.0), (0.0, 4.0)])
def test_act_halting_learns_to_stop_thinking_where_it_does_not_help(ponder_cost, iterations):
    """The halting unit's job (Graves 2016, arXiv 1603.08983 §2.1): trade the ponder cost against
    the loss. On random tokens more think iterations cannot lower the loss; starting at
    max_iterations (init_bias -2), 60 AdamW steps with tau 0.01 teach every token to halt after one
    iteration, while with tau 0 nothing pushes it and it keeps thinking (measured: 4.0 -> 1.0 and
    4.0 -> 4.0; about 2 s on a CPU)."""
    torch.manual_seed(0)
    d = _recipe(halting={"kind": "act", "ponder_cost": ponder_cost, "init_bias": -2.0})
    d["model"]["etd"]["max_iterations"] = 4
    model = build_model(d).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    seen = []
    for _ in range(60):
        ids = torch.randint(0, V, (8, 16), generator=g)
        out = model(ids, labels=ids)
        seen.append(float(out.stats["etd/iterations"]))
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
    assert seen[0] == 4.0 and seen[-1] == iterations, seen


def test_act_output_remainder_and_ponder_cost_follow_graves_equations(monkeypatch):
    """ACT (Graves 2016, Eq. 5-10) against a per-token loop over the halting probabilities and hidden
    states each think iteration produced: a token halts at the first N with p_1 + ... + p_N >=
    threshold (or at the last iteration), its output is sum_{n<N} p_n h_n + R h_N with R = 1 -
    sum_{n<N} p_n (the weights sum to 1), the ponder cost is tau * mean(N + R) over the real tokens
    and ``etd/iterations`` / ``etd/ponder`` are the means of N and N + R; left padding changes none of it."""
    from hymba_plus.components.etd_router import ETDRouter

    d = _recipe("gdn", halting={"kind": "act", "threshold": 0.9, "ponder_cost": 0.1, "init_bias": 0.0})
    d["model"]["meta_tokens"] = 0
    d["model"]["etd"].update(decoder_layers=0, think_layers=3, max_iterations=4)  # the think block's output is the trunk
    torch.manual_seed(0)
    model = build_model(d).double().train()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # hidden states that differ by token: halting that does too
        model.etd_router.halt.weight.normal_(0, 1.0)
    seen, real_prob = [], ETDRouter.halting_prob

    def record(self, h):  # noqa: ANN001, ANN202
        p = real_prob(self, h)
        seen.append((h.detach().clone(), p.detach().double().clone()))
        return p

    monkeypatch.setattr(ETDRouter, "halting_prob", record)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, return_hidden=True)
    want = torch.zeros_like(out.trunk_states)
    n_it, ponder = torch.zeros(2, 9, dtype=torch.float64), torch.zeros(2, 9, dtype=torch.float64)
    for b in range(2):
        for t in range(9):
            total = 0.0
            for n, (h, p) in enumerate(seen):
                if total + float(p[b, t]) >= 0.9 or n == len(seen) - 1:
                    want[b, t] += (1.0 - total) * h[b, t]
                    n_it[b, t], ponder[b, t] = n + 1, n + 1 + (1.0 - total)
                    break
                want[b, t] += float(p[b, t]) * h[b, t]
                total += float(p[b, t])
    assert len(seen) == 4 and set(n_it.flatten().tolist()) == {1, 2, 3, 4}  # tokens halt at every iteration
    # (the halting probabilities are float32, the model float64)
    torch.testing.assert_close(out.trunk_states, want, rtol=1e-5, atol=1e-7)
    assert float(out.stats["etd/iterations"]) == pytest.approx(float(n_it.mean()), rel=1e-6)
    assert float(out.stats["etd/ponder"]) == pytest.approx(float(ponder.mean()), rel=1e-6)
    assert float(out.aux_loss.detach()) == pytest.approx(0.1 * float(ponder.mean()), rel=1e-6)
    # row 0 left-padded by 3 (6 real tokens), row 1 as before: the statistics count the real tokens only
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = model(ids, attention_mask=mask).stats
    row0 = model(ids[:1, 3:]).stats
    want_it = (float(row0["etd/iterations"]) * 6 + float(n_it[1].sum())) / 15
    assert float(padded["etd/iterations"]) == pytest.approx(want_it, rel=1e-6)



def test_act_statistics_count_the_text_tokens_not_the_meta_tokens(monkeypatch):
    """``etd/iterations`` and ``etd/ponder`` are means over the text tokens: the meta tokens (a
    prefix the prefill adds to every row) think and halt like any token and their ponder cost
    stays in the loss, but they counted in the statistics as text, so a model whose meta tokens
    halt late reported more thinking per token than its text got (and a decode step, with no meta
    tokens, less than its prefill). Left padding with meta tokens: the same."""
    from hymba_plus.components.etd_router import ETDRouter

    d = _recipe("gdn", halting={"kind": "act", "threshold": 0.9, "ponder_cost": 0.1, "init_bias": 0.0})
    d["model"]["meta_tokens"] = 3
    d["model"]["etd"].update(max_iterations=4)
    torch.manual_seed(0)
    model = build_model(d).double().train()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # hidden states that differ by token: halting that does too
        model.meta.mul_(20.0)
        model.etd_router.halt.weight.normal_(0, 1.0)
    seen, real_prob = [], ETDRouter.halting_prob

    def record(self, h):  # noqa: ANN001, ANN202
        p = real_prob(self, h)
        seen.append(p.detach().double().clone())
        return p

    monkeypatch.setattr(ETDRouter, "halting_prob", record)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids)
    n_it, ponder = torch.zeros(2, 12, dtype=torch.float64), torch.zeros(2, 12, dtype=torch.float64)
    for b in range(2):
        for t in range(12):  # slots 0-2: the meta tokens
            total = 0.0
            for n, p in enumerate(seen):
                if total + float(p[b, t]) >= 0.9 or n == len(seen) - 1:
                    n_it[b, t], ponder[b, t] = n + 1, n + 1 + (1.0 - total)
                    break
                total += float(p[b, t])
    assert float(n_it[:, :3].mean()) != pytest.approx(float(n_it[:, 3:].mean()), rel=1e-3)  # (the test can tell)
    assert float(out.stats["etd/iterations"]) == pytest.approx(float(n_it[:, 3:].mean()), rel=1e-6)
    assert float(out.stats["etd/ponder"]) == pytest.approx(float(ponder[:, 3:].mean()), rel=1e-6)
    assert float(out.aux_loss.detach()) == pytest.approx(0.1 * float(ponder.mean()), rel=1e-6)  # computation
    # row 0 left-padded by 3 (6 text tokens, its meta tokens first once compacted), row 1 as before
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    padded = model(ids, attention_mask=mask).stats
    row0 = model(ids[:1, 3:]).stats
    want_it = (float(row0["etd/iterations"]) * 6 + float(n_it[1, 3:].sum())) / 15
    assert float(padded["etd/iterations"]) == pytest.approx(want_it, rel=1e-6)

def test_all_execute_route_reproduces_the_unrouted_model_bit_for_bit():
    d = _recipe(layer_router={"enabled": True, "hidden": 8})
    plain = _recipe()
    routed, base = build_model(d).eval(), build_model(plain).eval()
    base.load_state_dict(routed.state_dict(), strict=False)
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    n = len(routed.structure.slots)
    with torch.no_grad():
        assert torch.equal(routed(ids).logits, base(ids).logits)  # routers off: all-execute
        routed.etd_router.enable_routes()
        every = torch.full((2, n), EXECUTE)
        assert torch.equal(routed(ids, routes=every).logits, base(ids).logits)
        assert torch.equal(routed(ids, attention_mask=mask, routes=every).logits,
                           base(ids, attention_mask=mask).logits)


def test_routes_skip_and_repeat_per_row():
    """A skipped layer's states stay empty for that row; a repeated one fills its second state."""
    d = _recipe(layer_router={"enabled": True, "hidden": 8})
    model = build_model(d).eval()
    s = model.structure
    n = len(s.slots)
    routes = torch.full((2, n), EXECUTE)
    dec = s.index[[x for x in s.slots if x.stage == "decoder"][0]]
    routes[0, dec] = SKIP
    routes[1, dec] = REPEAT
    ids = torch.randint(0, V, (2, 6))
    cache = model.new_cache(2)
    with torch.no_grad():
        a = model(ids, routes=routes, cache=cache).logits
        b = model(ids[:1], routes=routes[:1]).logits
    first, second = cache.states[s.state_of(dec, 0)], cache.states[s.state_of(dec, 1)]
    assert bool((first.pos[0] < 0).all()) and bool((first.pos[1] >= 0).any())  # row 0 skipped it
    assert bool((second.pos[0] < 0).all()) and bool((second.pos[1] >= 0).any())  # row 1 repeated it
    assert rel_err(a[:1], b) <= 1e-5  # rows are independent
    assert torch.equal(cache.extra["routes"], routes)
    assert int(s.applications(routes, 3)[0]) == n - 1 and int(s.applications(routes, 3)[1]) == n + 1
    # a later call on the cache takes its route (given again: the same; another: refused, it was used silently)
    with torch.no_grad():
        model(ids[:, :1], routes=routes, cache=cache)
        with pytest.raises(ValueError, match="routes differ from the routes this cache was started with"):
            model(ids[:, :1], routes=routes.flip(0), cache=cache)


def test_routes_outside_skip_execute_repeat_are_refused():
    """A given route holds 0 (skip), 1 (execute) or 2 (repeat) per row and slot: a 5 ran as a repeat and
    -1 as a skip while etd/layer_applications counted 5 and -1 of them (40 and -8 for 8 slots); float and
    bool routes ran as their integer values."""
    model = build_model(_recipe(layer_router={"enabled": True, "hidden": 8})).eval()
    n = len(model.structure.slots)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for bad in (5, -1):
            with pytest.raises(ValueError, match=rf"routes must hold 0 \(skip\), 1 \(execute\) or 2 \(repeat\), "
                                                 rf"got values from {min(bad, 1)} to {max(bad, 1)}"):
                model(ids, routes=torch.full((2, n), EXECUTE).index_fill(1, torch.tensor([3]), bad))
        for dtype in (torch.float32, torch.bool):
            with pytest.raises(ValueError, match=rf"routes must be an integer tensor .* got dtype {dtype}"):
                model(ids, routes=torch.ones(2, n, dtype=dtype))
        with pytest.raises(ValueError, match=rf"routes must have shape \(2, {n}\)"):
            model(ids, routes=torch.ones(2, n + 1, dtype=torch.long))
        ok = model(ids, routes=torch.full((2, n), REPEAT, dtype=torch.int32))
    assert float(ok.stats["etd/layer_applications"]) == 2 * n


def test_routes_and_branches_against_a_loop_over_the_blocks():
    """Dr.LLM routes and MoDr branches against a plain loop over the slots: a slot's block runs 0
    (skip), 1 (execute) or 2 (repeat) times with the tied think weights, a think iteration's branch
    gate is chosen once from the hidden states entering it, and routers that are on decide each
    slot from the hidden states entering it (its layer's router, argmax)."""
    from hymba_plus.core.cache import StepContext

    d = _recipe(layer_router={"enabled": True, "hidden": 8}, branches={"n_branches": 2, "rank": 2})
    d["model"]["meta_tokens"] = 0
    torch.manual_seed(0)
    model = build_model(d).double().eval()
    r, s = model.etd_router, model.structure
    with torch.no_grad():
        model.embed.weight.mul_(20.0)
        r.branch_router.weight.normal_(0, 1.0)
        for b in r.lora_b:
            b.normal_(0, 0.3)

    def loop(ids, route=None):  # noqa: ANN001, ANN202
        x, gate, taken = model.embed_tokens(ids), None, []
        ctx = StepContext(positions=torch.arange(ids.shape[1])[None])
        for i, slot in enumerate(s.slots):
            k = int(route[i]) if route is not None else int(r.routers[slot.block](x, None).argmax(-1))
            taken.append(k)
            if slot.stage == "think" and slot.block == s.think[0]:
                gate, _ = r.choose_branches(x, None)
            for _ in range(k):
                r.set_gate(gate if slot.stage == "think" else None)
                x = model.blocks[slot.block](x, ctx, None)
                r.set_gate(None)
        return x, taken

    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (1, 7), generator=g)
    with torch.no_grad():
        for _ in range(4):
            route = torch.randint(0, 3, (1, len(s.slots)), generator=g)
            got = model(ids, routes=route, return_hidden=True).trunk_states
            torch.testing.assert_close(got, loop(ids, route[0])[0], rtol=0, atol=0)
        r.enable_routes()
        for lr in r.routers:  # routers whose choices differ by slot
            lr.up.weight.normal_(0, 1.0)
            lr.down.weight.normal_(0, 1.0)
        out = model(ids, return_hidden=True)
        want, taken = loop(ids)
    assert len(set(taken)) > 1, taken
    assert out.stats["etd/routes"][0].tolist() == taken
    torch.testing.assert_close(out.trunk_states, want, rtol=0, atol=0)


def test_act_with_routes_counts_only_the_think_slots_a_row_reaches():
    """ACT halting with Dr.LLM routes: a row's layer applications count the think iterations its
    tokens ran, not those after every one of them halted (nor iterations no token reached)."""
    d = _recipe("gdn", halting={"kind": "act", "init_bias": 20.0, "threshold": 0.5},
                layer_router={"enabled": True, "hidden": 8})
    model = build_model(d).eval()
    s = model.structure
    with torch.no_grad():
        out = model(torch.randint(0, V, (2, 6)))
    assert float(out.stats["etd/iterations"]) == 1.0  # every token halts after the first iteration
    # encoder 1 + think 2 (iteration 0 only) + decoder 1, executed
    assert float(out.stats["etd/layer_applications"]) == 4.0
    reached = out.stats["etd/route_reached"]
    want = torch.tensor([x.stage != "think" or x.iteration == 0 for x in s.slots])
    assert torch.equal(reached, want.expand(2, -1))
    assert torch.equal(s.applications(out.stats["etd/routes"], 3, reached), torch.tensor([4, 4]))


def test_decode_steps_without_aux_collect_no_etd_statistics():
    """``collect_aux=False`` (the decoding loops' steps): ``aux_loss`` and ``stats`` are None for
    an ETD model too (ACT, routes, branches), the logits and the cache as with them."""
    d = _recipe(halting={"kind": "act", "init_bias": 0.0, "ponder_cost": 0.1},
                layer_router={"enabled": True, "hidden": 8}, branches={"n_branches": 2, "rank": 2})
    model = make(d).train()
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    c1, c2 = model.new_cache(2), model.new_cache(2)
    with torch.no_grad():
        model(ids, cache=c1)
        model(ids, cache=c2)
        nxt = ids[:, :1]
        with_aux = model(nxt, cache=c1)
        without = model(nxt, cache=c2, collect_aux=False)
    assert with_aux.aux_loss is not None and with_aux.stats
    assert without.aux_loss is None and without.stats is None, (without.aux_loss, without.stats)
    assert torch.equal(with_aux.logits, without.logits)


def test_branch_load_is_counted_and_the_bias_balances_it():
    """Loss-free balancing: a router biased towards branch 0 at first spreads its load over the
    branches by the bias updates alone (no auxiliary loss)."""
    torch.manual_seed(0)
    d = _recipe(branches={"n_branches": 3, "rank": 2, "bias_update_rate": 0.01})
    model = build_model(d).train()
    r = model.etd_router
    with torch.no_grad():
        r.branch_router.weight.normal_(0, 1.0)  # a router whose preferences differ by token
        r.bias[0] = 0.5  # start unbalanced: branch 0 gets every token
    ids = torch.randint(0, V, (4, 16), generator=torch.Generator().manual_seed(0))
    loads = []
    for _ in range(100):
        with torch.no_grad():
            model(ids)
        loads.append(r.load.clone())
        r.update_bias()
    first = loads[0] / loads[0].sum()
    last = sum(loads[-20:])
    last = last / last.sum()
    assert first[0] == 1.0 and float(last.max()) < 0.45 and float(last.min()) > 0.2, last


@pytest.mark.parametrize("halting", ["none", "act"])
def test_branch_load_counts_the_text_tokens_not_the_meta_tokens(monkeypatch, halting):
    """The load that drives MoDr's balancing bias (and ``etd/branch_load``) counts the text tokens'
    choices only: the meta tokens choose a branch like any token, but they are the same prefix in
    every sequence (and every branch is computed for every token, so the load is not a compute
    load): counted, their fixed choices pushed the text's routing away from the branches they
    chose. Left padding and, with ACT, halted tokens are not counted either."""
    from hymba_plus.components.etd_router import ETDRouter

    d = _recipe(branches={"n_branches": 3, "rank": 2}, halting={"kind": halting, "init_bias": 0.0})
    d["model"]["meta_tokens"] = 3
    d["model"]["etd"].update(max_iterations=4)
    torch.manual_seed(0)
    model = build_model(d).train()
    r = model.etd_router
    with torch.no_grad():
        model.embed.weight.mul_(20.0)
        model.meta.mul_(20.0)
        r.branch_router.weight.normal_(0, 1.0)  # a router whose preferences differ by token
        if r.halt is not None:
            r.halt.weight.normal_(0, 1.0)
    seen, real_choose = [], ETDRouter.choose_branches

    def record(self, h, valid):  # noqa: ANN001, ANN202
        gate, choice = real_choose(self, h, valid)
        seen.append((choice.clone(), valid.clone() if valid is not None else torch.ones_like(choice, dtype=torch.bool)))
        return gate, choice

    monkeypatch.setattr(ETDRouter, "choose_branches", record)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 left-padded by 3: its meta tokens first once compacted, then 6 text tokens
    with torch.no_grad():
        out = model(ids, attention_mask=mask, labels=ids)
    text = torch.ones(2, 12, dtype=torch.bool)
    text[:, :3] = False  # the meta tokens
    text[0, 9:] = False  # row 0's inert slots (compacted: 3 meta + 6 text tokens)
    want = torch.zeros(3)
    for choice, counted in seen:  # counted: the slots the stack asks to count (ACT: those still thinking)
        assert choice.shape == (2, 12)
        want += (torch.nn.functional.one_hot(choice, 3).float() * (counted & text)[..., None]).sum((0, 1))
    if halting == "none":  # every text token, every iteration: 3 x 15; the meta tokens would add 3 x 6
        assert float(want.sum()) == 3 * 15
    assert torch.equal(r.load, want), (r.load, want)
    torch.testing.assert_close(out.stats["etd/branch_load"], want / want.sum())


def test_branch_router_and_every_lora_factor_get_gradients():
    """MoDr branches train through the loss: LoRA starts with B = 0 (Hu et al. 2021, arXiv
    2106.09685 §4.1: the model starts as the base), so at first only the B factors get a gradient;
    once B is nonzero the hard-gate router (the chosen branch's output is scaled by its softmax
    probability) and every A factor get finite, nonzero gradients too."""
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    for b_init in (False, True):
        torch.manual_seed(0)
        model = build_model(_recipe(branches={"n_branches": 3, "rank": 2})).train()
        r = model.etd_router
        if b_init:
            with torch.no_grad():
                for b in r.lora_b:
                    b.normal_(0, 0.3)
        model(ids, labels=ids).loss.backward()
        grads = {n: p.grad for n, p in r.named_parameters()}
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads.values()), grads.keys()
        nonzero = {n for n, g in grads.items() if g.abs().sum() > 0}
        want = set(grads) if b_init else {n for n in grads if n.startswith("lora_b.")}
        assert nonzero == want, sorted(set(grads) - nonzero)


def test_router_losses():
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    target = torch.tensor([0, 2])
    w = class_weights(torch.tensor([1, 1, 1, 0, 2]))
    assert w[0] > w[1] and w[2] > w[1]
    # effective numbers (beta 0.999): ~inverse frequency at a batch's counts, flatter at a dataset's
    small = class_weights(torch.repeat_interleave(torch.arange(3), torch.tensor([8, 150, 2])))
    torch.testing.assert_close(small, torch.tensor([0.595, 0.034, 2.371]), atol=2e-3, rtol=0)
    big = class_weights(torch.repeat_interleave(torch.arange(3), torch.tensor([10_000, 100_000, 2_000])))
    torch.testing.assert_close(big, torch.tensor([0.95, 0.95, 1.10]), atol=1e-2, rtol=0)
    assert class_weights(torch.tensor([1, 1]))[[0, 2]].tolist() == [0.0, 0.0]
    assert focal_loss(logits, target, gamma=0.0) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, target)))
    assert focal_loss(logits, target, gamma=2.0) < focal_loss(logits, target, gamma=0.0)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
def test_focal_loss_gradient_is_finite_for_a_confident_router(gamma):
    """focal_gamma below 1: at a target probability of exactly 1 the focusing term's derivative
    is infinite; the gradient must stay finite (its limit there is 0)."""
    logits = torch.tensor([[40.0, 0.0, 0.0], [0.0, 1.0, 0.0]], requires_grad=True)
    focal_loss(logits, torch.tensor([0, 1]), gamma=gamma).backward()
    assert torch.isfinite(logits.grad).all(), logits.grad
    assert logits.grad[0].abs().max() < 1e-6 and logits.grad[1].abs().max() > 1e-3


def test_recipe_checks_the_partition(tmp_path):
    d = _recipe()
    d["model"]["etd"]["think_layers"] = 3
    p = tmp_path / "bad.yaml"
    import yaml

    p.write_text(yaml.safe_dump(d, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    line = e.value.errors[0]
    assert line.startswith(f"{p}:") and "model.etd: encoder_layers + think_layers + decoder_layers = 1 + 3 + 1 = 5" \
        in line and "gives 4 layers" in line
    d = _recipe()
    d["model"]["etd"]["max_iterations"] = 2
    with pytest.raises(RecipeError, match="max_iterations: must be >= iterations"):
        load_recipe(d)
    d = _recipe()
    del d["model"]["etd"]
    with pytest.raises(RecipeError, match="components.etd_router: takes effect only in an ETD model"):
        load_recipe(d)
    assert "etd_router" in registry.names()


def test_act_halting_with_one_iteration_at_most_is_refused():
    """ACT with a cap of one think iteration halts every token there: the ponder cost is a constant
    and the halting unit gets no gradient, so the recipe is refused, naming the key; a cap of 2
    (training at 1 iteration) is a real choice and builds."""
    d = _recipe(halting={"kind": "act"})
    d["model"]["etd"]["iterations"] = 1
    with pytest.raises(RecipeError, match=r"components\.etd_router\.halting\.kind: act with "
                                          r"model\.etd\.max_iterations 1"):
        load_recipe(d)
    d["model"]["etd"]["max_iterations"] = 2
    model = build_model(d).train()
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    assert model.etd_router.halt.weight.grad.abs().sum() > 0
    d["components"]["etd_router"] = {}  # fixed iterations: one is fine
    del d["model"]["etd"]["max_iterations"]
    assert build_model(d).etd_router.halt is None


def test_branches_without_a_projection_to_adapt_are_refused():
    """MoDr branches attach LoRA to the think block's token mixers and dense MLPs; a think block
    of mixer-less MoE layers has none: the recipe is refused instead of building inert branches."""
    d = _recipe(branches={"n_branches": 2, "rank": 2})
    d["components"]["moe"] = {"n_experts": 4, "top_k": 2, "d_expert": 8}
    d["model"]["block_pattern"] = "gdn | -+moe | -+none | gated_attn"
    with pytest.raises(RecipeError, match=r"components\.etd_router\.branches\.n_branches: the think layers "
                                          r"have no token mixer and no mlp ffn"):
        load_recipe(d)
    d["model"]["block_pattern"] = "gdn | -+moe | -+mlp | gated_attn"  # a dense MLP to adapt: fine
    assert len(build_model(d).etd_router.lora_a) == 3  # the MLP's gate, up and down projections


def test_the_seed_recipe_becomes_an_etd_model_by_adding_one_section():
    """seeds/full-architecture.md §9: 40 layers as encoder 8 | think 24 x 4 | decoder 8."""
    from pathlib import Path

    import yaml

    from hymba_plus.cli.info import describe

    root = Path(__file__).resolve().parents[1]
    d = yaml.safe_load((root / "configs" / "quad_hybrid_full.yaml").read_text())
    d["model"]["etd"] = {"encoder_layers": 8, "think_layers": 24, "decoder_layers": 8, "iterations": 4}
    r = load_recipe(d)
    info = describe(r, torch.bfloat16)  # meta device: the 66B-parameter model costs nothing
    plain = describe(load_recipe({**d, "model": {k: v for k, v in d["model"].items() if k != "etd"}}), torch.bfloat16)
    assert info["params_total"] == plain["params_total"]  # tied think weights: no new parameters
    with torch.device("meta"):
        model = build_model(r)
    assert len(model.structure.slots) == 8 + 24 * 4 + 8


def test_etd_depth_benchmark_runs_with_its_default_task(tmp_path, monkeypatch):
    """benchmarks/etd_depth.py with its defaults for the task (k-hop, 8 nodes, 2 hops, seq_len
    48: 8 nodes need seq_len >= 41), cut to 2 steps of one variant: the JSON records the task."""
    import json
    import sys

    from tests.helpers import load_benchmark

    bench = load_benchmark("etd_depth")
    out = tmp_path / "etd.json"
    monkeypatch.setattr(sys, "argv", ["etd_depth.py", "--steps", "2", "--iterations", "1", "--max-iterations", "2",
                                      "--no-act", "--eval-size", "64", "--out", str(out)])
    bench.main()
    res = json.loads(out.read_text())
    assert res["task"] == {"name": "khop", "hops": 2, "nodes": 8, "seq_len": 48, "vocab": 16,
                           "chance": res["task"]["chance"]}
    assert [(r["halting"], r["trained_iterations"], sorted(r["accuracy"])) for r in res["rows"]] == [
        ("none", 1, ["1", "2"])]


def test_layer_router_pools_the_real_tokens_in_windows_wherever_they_sit():
    """Windowed mean pooling cuts a row's real tokens into equal windows by their rank among the
    real tokens: the same tokens give the same logits whether they come first (padding) or are
    scattered (the tokens ACT has not halted), where before every scattered token fell into the
    last window."""
    from hymba_plus.components.etd_router import LayerRouter

    torch.manual_seed(0)
    r = LayerRouter(8, 16, 4)
    x = torch.randn(1, 12, 8)
    first = torch.zeros(1, 12, dtype=torch.bool)
    first[0, :4] = True
    late = torch.zeros(1, 12, dtype=torch.bool)
    late[0, 8:] = True
    moved = torch.zeros_like(x)
    moved[0, 8:] = x[0, :4]
    torch.testing.assert_close(r(moved, late), r(x, first))
    torch.testing.assert_close(r(x[:, :4], None), r(x, first))


@pytest.mark.parametrize("mixer, key", [("gated_attn", "components.gated_attn.kv_share"),
                                        ("hymba", "components.hymba.attn.kv_share")])
def test_kv_sharing_is_refused_in_etd_models(mixer, key):
    """Cross-layer KV sharing pairs layers that run once each; ETD runs think layers per iteration and
    routes skip or repeat them: the consumer popped a missing producer's K/V (KeyError) or a stale
    one (the cache invariant off by 2e-2 with ACT). The recipe check refuses the combination."""
    d = _recipe(mixer)
    d["model"]["block_pattern"] = f"gdn | {mixer} | {mixer} | gated_attn"
    if mixer == "hymba":
        d["components"]["hymba"] = {"ssm": "gdn", "attn": {"n_heads": 2, "head_dim": 8, "kv_share": True}}
    else:
        d["components"]["gated_attn"]["kv_share"] = True
    with pytest.raises(RecipeError, match=re.escape(key) + ": cross-layer KV sharing pairs layers"):
        load_recipe(d)
    del d["model"]["etd"], d["components"]["etd_router"]
    load_recipe(d)  # a plain stack shares


@pytest.mark.parametrize("every", [0, 1])
def test_moe_statistics_cover_every_think_application(monkeypatch, every):
    """A MoE layer in the think block runs once per iteration: its counts are summed over the
    applications, the other statistics are their mean, each application adds its aux loss, and
    the balancing load counts every application once (a checkpointed block's recomputation not
    again)."""
    from hymba_plus.components.moe import MoE
    from hymba_plus.core.recompute import recomputing

    d = _recipe()
    d["model"]["block_pattern"] = "gdn | gated_attn+moe | gdn | gated_attn"
    d["components"]["moe"] = {"n_experts": 4, "top_k": 2, "d_expert": 8, "bias_update_rate": 0.01,
                              "capacity_factor": 0.5}
    torch.manual_seed(0)
    model = build_model(d).train()
    model.set_activation_checkpointing(every)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    seen, log = [], MoE._log

    def record(self, ctx, aux, load, dropped, entropy, lb, z, n_assign):  # noqa: ANN001, ANN202
        if not recomputing():  # (a checkpointed block's second run writes into a discarded copy)
            seen.append((aux.detach(), load.clone(), dropped.clone(), entropy, lb.detach(), z.detach(),
                         load.max() / load.mean()))
        return log(self, ctx, aux, load, dropped, entropy, lb, z, n_assign)

    monkeypatch.setattr(MoE, "_log", record)
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert len(seen) == 3  # think iterations
    real = 3 * 2 * (5 + 2) * 2  # iterations x rows x (tokens + meta tokens) x top_k
    s = out.stats
    assert float(s["moe/1/tokens_per_expert"].sum()) == real
    assert torch.equal(s["moe/1/tokens_per_expert"], sum(a[1] for a in seen))
    assert int(s["moe/1/dropped"]) == sum(int(a[2]) for a in seen) > 0
    for i, k in enumerate(("entropy", "lb_loss", "z_loss", "max_load"), start=3):
        want = sum(float(a[i]) for a in seen) / 3
        assert float(s[f"moe/1/{k}"]) == pytest.approx(want, rel=1e-5), k
    assert float(moe.load.sum()) == real  # the bias update's load: each application once
    out.loss.backward()
    assert float(moe.load.sum()) == real  # (a recomputation in the backward adds nothing)
    want_aux = sum(a[0] for a in seen)
    assert float(out.aux_loss.detach()) == pytest.approx(float(want_aux), rel=1e-5)


def _small_etd(iterations: int, **router) -> dict:
    """One attention think layer and one decoder layer, no ffn: quick to trace."""
    return {"name": "etd", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "meta_tokens": 0,
                                     "ffn": "none", "block_pattern": "gated_attn | gated_attn",
                                     "etd": {"encoder_layers": 0, "think_layers": 1, "decoder_layers": 1,
                                             "iterations": iterations, "max_iterations": iterations}},
            "components": {"gated_attn": {"n_heads": 2, "head_dim": 8}, "etd_router": router}}


def _etd_host_reads(monkeypatch) -> list[str]:  # noqa: ANN001
    """Count the host reads (``bool`` / ``item`` / ``tolist`` of a tensor) made from ``models/etd.py``."""
    import sys

    seen = []
    for name in ("__bool__", "item", "tolist"):
        real = getattr(torch.Tensor, name)

        def counted(self, *a, _real=real, _name=name):  # noqa: ANN001, ANN002, ANN202
            if sys._getframe(1).f_code.co_filename.endswith("models/etd.py"):
                seen.append(f"{_name}@{sys._getframe(1).f_code.co_name}")
            return _real(self, *a)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return seen


def _act_model(mixer: str = "gdn", cap: int = 4):  # noqa: ANN202
    d = _recipe(mixer, halting={"kind": "act", "threshold": 0.9, "init_bias": 0.0})
    d["model"]["etd"].update(iterations=cap, max_iterations=cap)
    torch.manual_seed(0)
    model = build_model(d).train()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)  # tokens that halt at different iterations
        model.etd_router.halt.weight.normal_(0, 1.0)
    return model


@pytest.mark.parametrize("n_iter", [1, 2, 4])
def test_act_reads_the_device_once_per_later_think_iteration(monkeypatch, n_iter):
    """ACT asks the device once before each think iteration after the first (does every token still
    think, does any), in one transfer, and not at all before the first, where every real token thinks
    by construction. (Before: a read at iteration 0 and two per later iteration, 2n - 1 in all; each
    a graph break under torch.compile.)"""
    model = _act_model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    seen = _etd_host_reads(monkeypatch)
    out = model(ids, labels=ids, think_iterations=n_iter)
    assert seen == ["tolist@_still_thinking"] * (n_iter - 1), seen
    if n_iter == 4:  # tokens halted at different iterations: the masked path ran too
        assert 1.0 < float(out.stats["etd/iterations"]) < 4.0


def test_act_with_one_think_iteration_compiles_without_a_graph_break():
    """With one think iteration ACT reads nothing (iteration 0 runs every real token: no read of
    ``running == real``, a graph break at every compiled ACT forward before)."""
    model = _act_model()
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    assert torch._dynamo.explain(lambda i: model(i, labels=i, think_iterations=1).loss)(ids).graph_break_count == 0


def test_act_compiled_equals_eager_with_early_exit():
    """ACT compiled (aot_eager: the traced ops; Dynamo breaks the graph at the read before each later
    iteration) equals eager, loss, statistics and every gradient, on a model whose tokens halt after
    iteration 1 or 2 of 3: iteration 1 takes the masked path, and the loop ends before iteration 2."""
    torch.manual_seed(0)
    model = build_model(_small_etd(3, halting={"kind": "act", "threshold": 0.9, "init_bias": 1.0})).train()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)
        model.etd_router.halt.weight.normal_(0, 0.3)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))

    def step(i):  # noqa: ANN001, ANN202
        out = model(i, labels=i)
        return out.loss, out.stats["etd/iterations"]

    params = [p for p in model.parameters() if p.requires_grad]
    loss, iters = step(ids)
    assert set(model.structure._n_used.flatten().tolist()) == {1.0, 2.0}  # halted at 1 and 2: no iteration 3
    want = torch.autograd.grad(loss, params)
    torch._dynamo.reset()
    closs, citers = torch.compile(step, backend="aot_eager")(ids)
    got = torch.autograd.grad(closs, params)
    assert float(citers) == float(iters)
    torch.testing.assert_close(closs, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _drllm_model(halting: str = "none", small: bool = False):  # noqa: ANN202
    torch.manual_seed(0)
    router = {"layer_router": {"enabled": True, "hidden": 8}, "halting": {"kind": halting}}
    if small:
        return build_model(_small_etd(2, **router)).train()
    d = _recipe("gdn", **router)
    d["model"]["etd"]["max_iterations"] = 3
    return build_model(d).train()


@pytest.mark.parametrize("halting", ["none", "act"])
def test_untrained_layer_routers_read_nothing_and_compile_without_a_graph_break(monkeypatch, halting):
    """Dr.LLM routers before router training (the base trains as a plain ETD model, every route
    execute) cost no host read: ``routing`` read the ``routes_on`` buffer at every forward, and each
    slot read its all-execute route twice (every row executes? any repeats?); each read was a graph
    break under torch.compile (7 in this model's training forward). With ACT, one think iteration."""
    model = _drllm_model(halting)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = {"think_iterations": 1} if halting == "act" else {}
    seen = _etd_host_reads(monkeypatch)
    model(ids, labels=ids, **kw)
    assert seen == []
    monkeypatch.undo()
    torch._dynamo.reset()
    assert torch._dynamo.explain(lambda i: model(i, labels=i, **kw).loss)(ids).graph_break_count == 0


def test_routing_follows_enable_routes_and_a_loaded_state():
    """``routing`` (kept on the host) follows ``enable_routes`` and the ``routes_on`` buffer of a
    loaded state dict, both ways."""
    on, off = _drllm_model(), _drllm_model()
    on.etd_router.enable_routes()
    assert on.etd_router.routing and not off.etd_router.routing
    off.load_state_dict(on.state_dict())
    assert off.etd_router.routing and bool(off.etd_router.routes_on)
    on.etd_router.enable_routes(False)
    assert not on.etd_router.routing
    off.load_state_dict(on.state_dict())
    assert not off.etd_router.routing
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    off.etd_router.load_state_dict({k.removeprefix("etd_router."): v for k, v in _drllm_model().state_dict().items()
                                    if k.startswith("etd_router.")} | {"routes_on": torch.tensor(True)})
    assert off.etd_router.routing  # the router module's own load too
    assert off(ids).stats["etd/route_logits"].abs().sum() > 0  # the routers decided the route


def test_untrained_layer_routers_compiled_equal_eager():
    """An ETD model with untrained Dr.LLM routers (all-execute, no reads) compiled (aot_eager) equals
    eager: loss and every gradient."""
    model = _drllm_model(small=True)
    ids = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(1))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(ids, labels=ids).loss
    want = torch.autograd.grad(loss, params, allow_unused=True)
    torch._dynamo.reset()
    closs = torch.compile(lambda i: model(i, labels=i).loss, backend="aot_eager")(ids)
    got = torch.autograd.grad(closs, params, allow_unused=True)
    torch.testing.assert_close(closs, loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
