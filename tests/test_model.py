"""HybridLM (DESIGN §1): build_model inputs, outputs and loss, gradients, meta tokens,
positions from the cache, padding, generation, reorder, save/load and its errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from hymba_plus import CheckpointError, HybridLM, build_model, from_pretrained, load_recipe
from hymba_plus.models.generation import sample_next
from tests.conftest import rel_err

ROOT = Path(__file__).resolve().parents[1]
V = 48


def recipe(meta: int = 2, tie: bool = True, pattern: str = "GA | GA", window=None, **model) -> dict:
    m = {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": pattern, "meta_tokens": meta,
         "tie_embeddings": tie}
    m.update(model)
    return {"name": "m", "model": m, "components": {
        "gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 8, "window": window,
                       "rope": {"fraction": 0.5, "scaling": {"kind": "yarn", "factor": 2.0,
                                                             "original_max_seq_len": 16}}},
        "mlp": {"d_hidden": 64}}}


def make(seed: int = 0, **kw) -> HybridLM:
    torch.manual_seed(seed)
    return build_model(recipe(**kw)).eval()


def ids(B: int = 2, T: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- building


def test_build_model_accepts_every_source(tmp_path):
    d = recipe()
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    models = []
    for src in (d, p, str(p), p.read_text(), load_recipe(d)):
        torch.manual_seed(0)
        models.append(build_model(src))
    x = ids()
    ref = models[0](x).logits
    for m in models[1:]:
        assert m.recipe == models[0].recipe
        assert torch.equal(m(x).logits, ref)


def test_build_model_device_and_dtype():
    m = build_model(recipe(), dtype=torch.float64)
    assert m.dtype == torch.float64 and m(ids()).logits.dtype == torch.float64


@pytest.mark.parametrize("tie", [True, False])
def test_outputs_shapes_and_tying(tie):
    m = make(tie=tie)
    out = m(ids(3, 7))
    assert out.logits.shape == (3, 7, V) and out.loss is None and out.aux_loss is None
    assert (m.lm_head.weight is m.embed.weight) == tie
    n_embed = V * 32
    blocks = sum(p.numel() for p in m.blocks.parameters())
    assert m.num_parameters() == n_embed * (1 if tie else 2) + 2 * 32 + 32 + blocks  # + meta, final norm


def test_loss_is_next_token_cross_entropy():
    m = make()
    x = ids(2, 9)
    labels = x.clone()
    labels[0, 4] = -100
    out = m(x, labels=labels)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6)
    mask = torch.ones_like(x)
    mask[1, :3] = 0  # pads never count, as targets nor as predictors (the row's first token is not predicted)
    out = m(x, labels=x, attention_mask=mask)
    tgt = x[:, 1:].clone()
    tgt[1, :3] = -100
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), tgt.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, want, atol=1e-6)
    # so a left-padded row scores what the row scores unpadded
    alone = m(x[1:, 3:], labels=x[1:, 3:]).loss
    padded = m(x[1:], labels=x[1:], attention_mask=mask[1:]).loss
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("tie", [True, False])
def test_every_parameter_gets_a_finite_gradient(tie):
    m = make(tie=tie, window=4).train()
    x = ids(2, 12)
    m(x, labels=x).loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_inputs_embeds_path():
    m = make()
    x = ids()
    assert torch.equal(m(x, inputs_embeds=m.embed(x)).logits, m(x).logits)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = build_model(recipe(dropout=0.5))
    x = ids()
    m.eval()
    assert torch.equal(m(x).logits, m(x).logits)
    m.train()
    assert not torch.equal(m(x).logits, m(x).logits)


# --------------------------------------------------------------------------- cache, meta, positions


def test_meta_tokens_enter_once_and_positions_come_from_the_cache():
    m = make(meta=3)
    x = ids(2, 10)
    cache = m.new_cache(2)
    assert len(cache) == 2 and not cache.started
    with torch.no_grad():
        a = m(x[:, :4], cache=cache).logits
        assert cache.pos.tolist() == [3 + 4, 3 + 4] and cache.started
        b = m(x[:, 4:], cache=cache).logits
        assert cache.pos.tolist() == [3 + 10] * 2 and cache.seq_len == 13
        full = m(x).logits
        # the same chunk without the cache: meta tokens again, positions from 0 -> different
        alone = m(x[:, 4:]).logits
    assert rel_err(torch.cat([a, b], 1), full) < 1e-5
    assert rel_err(alone, full[:, 4:]) > 1e-3


def test_meta_tokens_matter():
    m = make(meta=2)
    x = ids()
    with torch.no_grad():
        before = m(x).logits
        m.meta.add_(1.0)
        assert not torch.allclose(m(x).logits, before)


def test_input_errors():
    m = make()
    with pytest.raises(ValueError, match="cache was made for batch size 3, got input batch 2"):
        m(ids(2, 4), cache=m.new_cache(3))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        m(ids(2, 4), attention_mask=torch.ones(2, 5, dtype=torch.long))


# --------------------------------------------------------------------------- input checks (ids, max_seq_len)
# recipe(): vocab_size 48, max_seq_len 64. Meta tokens do not count against max_seq_len.


@pytest.mark.parametrize("bad, where", [(V, [1, 7]), (V + 252, [0, 3]), (-1, [0, 2])])
def test_token_id_outside_the_vocabulary(bad, where):
    m = make(meta=2)
    x = ids(2, 10)
    x[tuple(where)] = bad
    cache = m.new_cache(2)
    msg = rf"^input_ids: token id {bad} at \[{where[0]}, {where[1]}\] is outside the vocabulary \(vocab_size {V}\)$"
    for kw in ({}, {"cache": cache}, {"attention_mask": torch.ones_like(x)}):
        with pytest.raises(ValueError, match=msg):
            m(x, **kw)
    assert not cache.started and cache.pos.tolist() == [0, 0]
    with torch.no_grad():  # a cache in use: the next chunk is checked too
        m(ids(2, 4), cache=cache)
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m(x, cache=cache)
    assert cache.pos.tolist() == [2 + 4] * 2
    # inputs_embeds calls do not look at input_ids
    good = ids(2, 10)
    assert torch.equal(m(x, inputs_embeds=m.embed(good)).logits, m(good).logits)


def test_input_must_be_two_dimensional():
    m = make()
    with pytest.raises(ValueError, match=r"input_ids must have shape \[B, T\], got \(10,\)"):
        m(ids(1, 10)[0])


@pytest.mark.parametrize("meta", [0, 3])
def test_full_forward_longer_than_max_seq_len(meta):
    m = make(meta=meta)
    note = f" \\(the {meta} meta tokens are not counted\\)" if meta else ""
    with pytest.raises(ValueError, match=f"^input_ids: 65 positions exceed max_seq_len 64{note}$"):
        m(ids(2, 65))
    with pytest.raises(ValueError, match="^inputs_embeds: 65 positions exceed max_seq_len 64"):
        m(None, inputs_embeds=m.embed(ids(2, 65)))
    cache = m.new_cache(2)
    with pytest.raises(ValueError, match="65 positions exceed max_seq_len 64"):
        m(ids(2, 65), cache=cache)
    assert not cache.started and cache.pos.tolist() == [0, 0]
    with torch.no_grad():  # exactly max_seq_len is accepted, meta tokens on top
        assert m(ids(2, 64)).logits.shape == (2, 64, V)
        assert m(ids(2, 64), cache=cache).logits.shape == (2, 64, V)
    assert cache.pos.tolist() == [meta + 64] * 2


def test_cached_chunks_that_cross_max_seq_len():
    m = make(meta=2)
    x = ids(2, 64)
    cache = m.new_cache(2)
    with torch.no_grad():
        full = m(x).logits
        parts = [m(x[:, :30], cache=cache).logits, m(x[:, 30:60], cache=cache).logits]
        with pytest.raises(ValueError, match=r"^input_ids: 5 new positions after 60 cached exceed max_seq_len 64 "
                                             r"\(row 0; the 2 meta tokens are not counted\)$"):
            m(ids(2, 5, seed=9), cache=cache)
        assert cache.pos.tolist() == [2 + 60] * 2  # not advanced
        parts.append(m(x[:, 60:], cache=cache).logits)  # reaches exactly max_seq_len
        assert cache.pos.tolist() == [2 + 64] * 2
        with pytest.raises(ValueError, match="1 new positions after 64 cached exceed max_seq_len 64"):
            m(x[:, :1], cache=cache)
        with pytest.raises(ValueError, match="^inputs_embeds: 1 new positions after 64 cached"):
            m(None, inputs_embeds=m.embed(x[:, :1]), cache=cache)
    assert cache.pos.tolist() == [2 + 64] * 2
    # the refused chunk left the states alone: the chunks still equal the full forward
    assert rel_err(torch.cat(parts, 1), full) < 1e-5


def test_left_padding_does_not_count_pads():
    m = make(meta=2)
    x = ids(2, 70)
    mask = torch.ones_like(x)
    mask[0, :10] = 0
    mask[1, :6] = 0  # rows of 60 and 64 real tokens
    with torch.no_grad():
        padded = m(x, attention_mask=mask).logits
        assert rel_err(padded[1, 6:], m(x[1:, 6:]).logits[0]) < 1e-5
        mask[1, 5] = 1  # 65 real tokens in row 1
        with pytest.raises(ValueError, match=r"^input_ids: 65 positions exceed max_seq_len 64 \(row 1; "):
            m(x, attention_mask=mask)
        # through a cache: each row counts its own real tokens
        cache = m.new_cache(2)
        first = torch.ones(2, 40, dtype=torch.long)
        first[0, :20] = 0  # row 0: 20 real tokens, row 1: 40
        m(x[:, :40], attention_mask=first, cache=cache)
        m(x[:, 40:64], cache=cache)  # row 1 reaches 64
        assert cache.pos.tolist() == [2 + 44, 2 + 64]
        with pytest.raises(ValueError, match=r"^input_ids: 1 new positions after 64 cached exceed max_seq_len 64 "
                                             r"\(row 1; "):
            m(x[:, :1], cache=cache)
        m(x[:, :1], attention_mask=torch.tensor([[1], [0]]), cache=cache)  # a pad in row 1: fine
        assert cache.pos.tolist() == [2 + 45, 2 + 64]


def test_checks_are_skipped_while_compiling():
    m = make(meta=2)
    x = ids(2, 10)
    compiled = torch.compile(m, backend="eager", fullgraph=True)  # a host read would break the graph
    with torch.no_grad():
        assert rel_err(compiled(x).logits, m(x).logits) < 1e-6


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_equals_the_unpadded_row(side):
    m = make(meta=2, window=3)
    x = ids(2, 9)
    mask = torch.ones_like(x)
    real = slice(3, 9) if side == "left" else slice(0, 6)
    mask[0] = 0
    mask[0, real] = 1
    with torch.no_grad():
        padded = m(x, attention_mask=mask).logits
        alone = m(x[:1, real]).logits
        other = m(x[1:]).logits
    assert rel_err(padded[0, real], alone[0]) < 1e-5
    assert rel_err(padded[1], other[0]) < 1e-5
    assert torch.isfinite(padded).all()


def test_cache_remembers_the_padding():
    m = make(meta=2)
    x = ids(2, 8)
    nxt = ids(2, 3, seed=5)
    mask = torch.ones_like(x)
    mask[0, :4] = 0
    cache = m.new_cache(2)
    with torch.no_grad():
        m(x, attention_mask=mask, cache=cache)
        step = m(nxt, cache=cache).logits  # no mask: the cache knows row 0 has 4 real tokens
        ref = m(torch.cat([x[:1, 4:], nxt[:1]], 1)).logits
    assert cache.pos.tolist() == [2 + 4 + 3, 2 + 8 + 3]
    assert rel_err(step[0], ref[0, -3:]) < 1e-5


def test_cache_reorder():
    m = make(meta=1)
    x = ids(3, 6)
    nxt = ids(3, 2, seed=7)
    idx = torch.tensor([2, 0])
    with torch.no_grad():
        cache = m.new_cache(3)
        m(x, cache=cache)
        cache.reorder(idx)
        got = m(nxt[idx], cache=cache).logits
        ref = m(torch.cat([x[idx], nxt[idx]], 1)).logits[:, -2:]
    assert cache.batch_size == 2
    assert rel_err(got, ref) < 1e-5
    # bad indices are refused before any state changes
    def state() -> list:
        return [t.clone() for s in cache.states if s is not None for _, t in s.tensors()] + [cache.pos.clone()]

    before = state()
    for bad, says in ((torch.tensor([0, 2]), "outside [0, 2) (min 0, max 2)"), (torch.tensor([-1]), "min -1"),
                      (torch.tensor([[0]]), "torch.int64 of shape [1, 1]"), ([0, 1], "got list"),
                      (torch.tensor([0.0]), "torch.float32")):
        with pytest.raises(ValueError, match="reorder: index") as e:
            cache.reorder(bad)
        assert says in str(e.value)
    assert cache.batch_size == 2 and len(before) > 1
    assert all(torch.equal(a, b) for a, b in zip(before, state(), strict=True))


# --------------------------------------------------------------------------- generation


def greedy_by_rerun(m: HybridLM, x: torch.Tensor, n: int) -> torch.Tensor:
    for _ in range(n):
        x = torch.cat([x, m(x).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return x


@pytest.mark.parametrize("window", [None, 3])
def test_greedy_generation_equals_full_forward_rerun(window):
    m = make(meta=2, window=window)
    x = ids(2, 5)
    with torch.no_grad():
        got = m.generate(x, max_new_tokens=8, temperature=0.0)
        want = greedy_by_rerun(m, x, 8)
    assert torch.equal(got, want)


def test_generation_with_left_padding():
    m = make(meta=2)
    x = ids(2, 6)
    mask = torch.ones_like(x)
    mask[0, :2] = 0
    with torch.no_grad():
        got = m.generate(x, max_new_tokens=5, attention_mask=mask)
        row0 = m.generate(x[:1, 2:], max_new_tokens=5)
        row1 = m.generate(x[1:], max_new_tokens=5)
    assert torch.equal(got[0, 6:], row0[0, 4:]) and torch.equal(got[1], row1[0])


def test_generation_eos_limits_and_modes():
    m = make()
    x = ids(2, 4)
    with torch.no_grad():
        first = m.generate(x, max_new_tokens=1)[:, -1]
        out = m.generate(x, max_new_tokens=6, eos_token_id=int(first[0]))
    # row 0 stops at once: only eos after it
    assert (out[0, 4:] == first[0]).all()
    assert torch.equal(m.generate(x, max_new_tokens=0), x)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        m.generate(x, max_new_tokens=61)
    with pytest.raises(ValueError, match="unknown generation mode 'beam'"):
        m.generate(x, mode="beam")
    streamed = []
    m.generate(x, max_new_tokens=3, streamer=streamed.append)
    assert len(streamed) == 3 and streamed[0].shape == (2,)


def test_generation_refuses_to_run_past_max_seq_len():
    m = make(meta=2)
    calls = []
    m.register_forward_pre_hook(lambda mod, args: calls.append(1))
    x = ids(2, 4)
    with pytest.raises(ValueError, match=r"^generate: prompt \(4 tokens\) \+ max_new_tokens \(61\) = 65 exceeds "
                                         r"max_seq_len 64 \(use max_new_tokens <= 60; the 2 meta tokens"):
        m.generate(x, max_new_tokens=61)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 0, got -1"):
        m.generate(x, max_new_tokens=-1)
    assert calls == []  # refused before any work
    with torch.no_grad():
        assert m.generate(x, max_new_tokens=60).shape == (2, 64)  # exactly max_seq_len
        # pads do not count: 10 columns, but 8 real tokens per row
        p = ids(2, 10)
        mask = torch.ones_like(p)
        mask[:, :2] = 0
        assert m.generate(p, max_new_tokens=56, attention_mask=mask).shape == (2, 66)
        with pytest.raises(ValueError, match=r"prompt \(8 tokens\) \+ max_new_tokens \(57\)"):
            m.generate(p, max_new_tokens=57, attention_mask=mask)
        # a prompt too long by itself: no max_new_tokens fits (the hint was 'use max_new_tokens <= 0')
        with pytest.raises(ValueError, match=r"^generate: prompt \(65 tokens\) = 65 exceeds max_seq_len 64 by "
                                             r"itself; the 2 meta tokens are not counted$"):
            m.generate(ids(1, 65), max_new_tokens=0)
        bad = x.clone()
        bad[1, 3] = V
        with pytest.raises(ValueError, match=r"token id 48 at \[1, 3\] is outside the vocabulary"):
            m.generate(bad, max_new_tokens=3)


def test_decoding_checks_the_prompt_once(monkeypatch):
    m = make(meta=2)
    seen = []
    check = HybridLM._check_inputs
    monkeypatch.setattr(HybridLM, "_check_inputs", lambda self, *a: seen.append(a[0].shape) or check(self, *a))
    with torch.no_grad():
        out = m.generate(ids(2, 5), max_new_tokens=6)
    assert out.shape == (2, 11) and seen == [(2, 5)]  # the prefill only, not the sampled tokens


def test_sampling():
    logits = torch.tensor([[0.0, 3.0, 1.0, -1.0]] * 4)
    assert sample_next(logits).tolist() == [1] * 4
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).tolist() == [1] * 4
    assert sample_next(logits, temperature=5.0, top_p=0.01, generator=g).tolist() == [1] * 4
    a = sample_next(logits.repeat(50, 1), 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits.repeat(50, 1), 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and len(set(a.tolist())) > 1
    top2 = sample_next(logits.repeat(50, 1), 10.0, top_k=2, generator=g)
    assert set(top2.tolist()) <= {1, 2}


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_round_trip(tmp_path, tie):
    m = make(tie=tie, meta=2)
    m.save_pretrained(tmp_path / "ckpt", extra_files={"notes.txt": "hello"})
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["model.safetensors", "notes.txt", "recipe.yaml"]
    back = from_pretrained(tmp_path / "ckpt").eval()
    assert back.recipe == m.recipe and back.recipe.hash() == m.recipe.hash()
    x = ids()
    with torch.no_grad():
        assert torch.equal(back(x).logits, m(x).logits)
    assert (back.lm_head.weight is back.embed.weight) == tie


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        from_pretrained(tmp_path / "nope")
    m = make()
    d = tmp_path / "c"
    m.save_pretrained(d)
    (d / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        from_pretrained(d)
    m.save_pretrained(d)
    r = yaml.safe_load((d / "recipe.yaml").read_text())
    r["model"]["d_model"] = 64
    r["components"]["gated_attn"]["head_dim"] = 16
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))
    with pytest.raises(CheckpointError, match="does not match recipe.yaml"):
        from_pretrained(d)
    r["model"]["d_model"] = -1
    (d / "recipe.yaml").write_text(yaml.safe_dump(r))
    with pytest.raises(CheckpointError, match=r"invalid recipe: .*model.d_model: must be >= 1"):
        from_pretrained(d)
    (d / "recipe.yaml").unlink()
    with pytest.raises(CheckpointError, match="recipe.yaml: missing"):
        from_pretrained(d)


def test_from_pretrained_strict_false_allows_missing_tensors_not_wrong_ones(tmp_path):
    """strict=False loads a checkpoint with tensors missing; a wrong shape or an integer tensor for a
    float parameter is still a CheckpointError naming it (before: torch's load_state_dict error, or
    the missing tensor named instead of the real problem)."""
    from safetensors.torch import load_file, save_file

    m = make()
    d = tmp_path / "c"
    m.save_pretrained(d)
    state = load_file(str(d / "model.safetensors"))
    first = sorted(state)[0]
    del state[first]
    save_file(state, str(d / "model.safetensors"))
    from_pretrained(d, strict=False)
    with pytest.raises(CheckpointError, match=re.escape(f"missing ['{first}']")):
        from_pretrained(d)
    name = next(k for k, v in state.items() if v.dim() == 2)
    for bad, says in ((state[name][:-1], f"shape mismatch ['{name}']"), (state[name].long(), f"dtype mismatch ['{name}: ")):
        save_file({**state, name: bad.contiguous()}, str(d / "model.safetensors"))
        with pytest.raises(CheckpointError, match=re.escape(says)):
            from_pretrained(d, strict=False)
    with pytest.raises(TypeError, match="strict must be True or False, got str 'no'"):
        from_pretrained(d, strict="no")


@pytest.mark.parametrize("extra,err,says", [
    ({"../escape.txt": "x"}, ValueError, "'../escape.txt' is not a plain file name inside the folder"),
    ({"sub/notes.txt": "x"}, ValueError, "is not a plain file name"),
    ({"recipe.yaml": "garbage"}, ValueError, "'recipe.yaml' is the checkpoint's own file"),
    ({"model.safetensors": "x"}, ValueError, "'model.safetensors' is the checkpoint's own file"),
    ({"notes.txt": b"bytes"}, TypeError, "extra_files['notes.txt'] must be text (str), got bytes"),
])
def test_save_pretrained_refuses_extra_files_outside_or_over_its_own(tmp_path, extra, err, says):
    with pytest.raises(err, match=re.escape(says)):
        make().save_pretrained(tmp_path / "c", extra_files=extra)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_deepcopy_shares_the_immutable_recipe():
    import copy

    m = build_model(ROOT / "configs" / "gpt_tiny.yaml")
    c = copy.deepcopy(m)
    assert c.recipe is m.recipe
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(m.parameters(), c.parameters()))


def test_ar_generation_runs_one_forward_per_token_and_reports_it():
    """The prefill gives the first token; each later token costs one forward; the last
    token is not fed back (its logits would never be used)."""
    m = build_model(ROOT / "configs" / "gpt_tiny.yaml").eval()
    calls = []
    h = m.register_forward_hook(lambda *a: calls.append(1))
    stats: dict = {}
    out = m.generate(torch.zeros(2, 3, dtype=torch.long), max_new_tokens=6, stats=stats)
    h.remove()
    assert out.shape == (2, 9) and len(calls) == 6 == stats["forwards"]
    assert stats["tokens_per_forward"] == 1.0
