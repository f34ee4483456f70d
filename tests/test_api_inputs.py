"""Bad Python-API input found by a fuzzing pass (2026-12-05): ``generate`` (every decoding mode),
``build_model`` and ``from_pretrained`` refuse it with one ``ValueError`` / ``TypeError`` line naming
the argument, before any work, instead of a raw torch error from deep inside."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from hymba_plus import build_model, from_pretrained

ROOT = Path(__file__).resolve().parents[1]
CFG = ROOT / "configs"


@pytest.fixture(scope="module")
def models() -> dict:
    torch.manual_seed(0)
    return {name: build_model(CFG / f"{name}.yaml").eval()
            for name in ("gpt_tiny", "bd_tiny", "mtp_tiny", "ladir_tiny", "forecast_tiny")}


MODES = [("gpt_tiny", "ar", {}), ("bd_tiny", "block_diffusion", {}), ("mtp_tiny", "mtp", {}),
         ("ladir_tiny", "ladir", {}), ("gpt_tiny", "speculative", {"draft": "self"})]


def _gen(models: dict, name: str, mode: str, ids, **kw):  # noqa: ANN001, ANN202
    model = models[name]
    opts = {"draft": model} if kw.pop("draft", None) == "self" else {}
    return model.generate(ids, max_new_tokens=3, mode=mode, **opts, **kw)


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


@pytest.mark.parametrize("name,mode,kw", MODES)
@pytest.mark.parametrize("ids,err,says", [
    ([[1, 2, 3]], TypeError, "input_ids must be a torch.Tensor of token ids [B, T], got list [[1, 2, 3]]"),
    (torch.tensor([[1.0, 2.0, 3.0]]), TypeError, "input_ids must hold integer token ids"),
    (torch.tensor([[1, 2, 3]], dtype=torch.uint8), TypeError, "got dtype torch.uint8"),
    (torch.tensor([[1, 2, 9999]]), ValueError, "input_ids: token id 9999 at [0, 2] is outside the vocabulary"),
    (torch.tensor([1, 2, 3]), ValueError, "input_ids must have shape [B, T], got (3,)"),
])
def test_generate_names_a_prompt_that_is_not_token_ids(models, name, mode, kw, ids, err, says) -> None:
    with pytest.raises(err) as e:
        _gen(models, name, mode, ids, **kw)
    assert says in _one_line(e)


@pytest.mark.parametrize("name,mode,kw", [m for m in MODES if m[1] != "block_diffusion"])
def test_generate_refuses_an_empty_prompt(models, name, mode, kw) -> None:
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, torch.zeros(1, 0, dtype=torch.long), **kw)
    assert "input_ids: an empty prompt (shape (1, 0))" in _one_line(e)


@pytest.mark.parametrize("name,mode,kw", MODES)
def test_generate_refuses_a_batch_of_no_rows(models, name, mode, kw) -> None:
    """B = 0 passed the prompt checks and failed in new_cache, naming its batch_size."""
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, torch.zeros(0, 4, dtype=torch.long), **kw)
    assert "input_ids: a batch of no rows (shape (0, 4))" in _one_line(e)


@pytest.mark.parametrize("name,mode,kw", MODES)
@pytest.mark.parametrize("mask,says", [
    ([[1, 1, 1, 0], [1, 1, 1, 1]], "attention_mask: row 0 has a pad after a token (column 3): generate takes "
                                   "left-padded prompts"),
    ([[1, 1, 1, 1], [0, 1, 0, 1]], "attention_mask: row 1 has a pad after a token (column 2)"),
    ([[0, 0, 0, 0], [1, 1, 1, 1]], "attention_mask: row 0 has no token (all pads)"),
])
def test_generate_takes_left_padded_prompts_only(models, name, mode, kw, mask, says) -> None:
    """Every mode but ladir continues each row from its last column: a right-padded row would continue
    from a pad's logits (silently wrong tokens, as a fuzzing pass found). Block diffusion may start a row
    from nothing, as from an empty prompt."""
    ids, mask = torch.tensor([[5, 6, 7, 8]] * 2), torch.tensor(mask)
    if (mode == "block_diffusion" and "all pads" in says) or (mode == "ladir" and "after a token" in says):
        # ladir compacts its questions (left or right padding: its docstring), reading no last column
        assert _gen(models, name, mode, ids, attention_mask=mask, **kw).shape == (2, 7)
        return
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, ids, attention_mask=mask, **kw)
    assert says in _one_line(e)


@pytest.mark.parametrize("name,mode,kw", MODES)
@pytest.mark.parametrize("shape", [(4,), (2, 3), (2, 5), (3, 4)])
def test_generate_refuses_a_mask_of_another_shape(models, name, mode, kw, shape) -> None:
    """mtp and ladir read the mask before the prefill checked it: a 1-D mask was an IndexError, and
    ladir compacted its questions by a narrower mask, silently dropping the prompt's last tokens."""
    ids = torch.tensor([[5, 6, 7, 8]] * 2)
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, ids, attention_mask=torch.ones(shape, dtype=torch.long), **kw)
    assert f"attention_mask must have shape (2, 4), got {shape}" in _one_line(e)


def test_left_padding_continues_as_the_row_alone(models) -> None:
    model = models["gpt_tiny"]
    alone = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3)
    padded = model.generate(torch.tensor([[0, 5, 6, 7], [1, 2, 3, 4]]), max_new_tokens=3,
                            attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]))
    assert torch.equal(padded[0, 1:], alone[0])


def test_block_diffusion_may_start_from_nothing(models) -> None:
    """A block is denoised from [MASK]s alone: an empty prompt is a valid start there (kept)."""
    out = _gen(models, "bd_tiny", "block_diffusion", torch.zeros(1, 0, dtype=torch.long))
    assert out.shape == (1, 3)


@pytest.mark.parametrize("draft,says", [
    ("runs/draft", "draft must be a model (a HybridLM, e.g. from_pretrained(path)), got str 'runs/draft'"),
    ({"embed.weight": 0}, "got dict {'embed.weight': 0}"),
])
def test_speculative_refuses_a_draft_that_is_not_a_model(models, draft, says) -> None:
    with pytest.raises(TypeError) as e:
        models["gpt_tiny"].generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, mode="speculative", draft=draft)
    assert says in _one_line(e)


@pytest.mark.parametrize("name,mode,kw", MODES)
@pytest.mark.parametrize("setting,says", [
    ({"temperature": -0.5}, "temperature must be a finite number >= 0 (0: greedy), got -0.5"),
    ({"temperature": float("nan")}, "temperature must be a finite number >= 0 (0: greedy), got nan"),
    ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
    ({"temperature": "0.7"}, "temperature must be a finite number >= 0 (0: greedy), got '0.7'"),
    ({"temperature": 1.0, "top_k": 0}, "top_k must be an integer >= 1 (or None: off), got 0"),
    ({"temperature": 1.0, "top_k": -3}, "top_k must be an integer >= 1 (or None: off), got -3"),
    ({"temperature": 1.0, "top_k": 2.5}, "top_k must be an integer >= 1 (or None: off), got 2.5"),
    ({"temperature": 1.0, "top_p": 0.0}, "top_p must be a number in (0, 1] (or None: off), got 0.0"),
    ({"temperature": 1.0, "top_p": 1.5}, "top_p must be a number in (0, 1] (or None: off), got 1.5"),
    ({"temperature": 1.0, "top_p": -0.2}, "top_p must be a number in (0, 1] (or None: off), got -0.2"),
    ({"temperature": 1.0, "top_p": float("nan")}, "top_p must be a number in (0, 1] (or None: off), got nan"),
])
def test_generate_refuses_sampling_settings_outside_their_meaning(models, name, mode, kw, setting, says) -> None:
    """The documented "off" values stay (temperature 0: greedy; top_k / top_p None); negatives and
    values outside the range were silently taken as "off" before."""
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, torch.tensor([[1, 2, 3, 4]]), **kw, **setting)
    assert says in _one_line(e)


def test_valid_sampling_settings_are_unchanged(models) -> None:
    """top_k >= vocab and top_p = 1 mean "no restriction": the same draws as None; greedy is greedy."""
    model = models["gpt_tiny"]
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])

    def run(**kw):  # noqa: ANN003, ANN202
        return model.generate(ids, max_new_tokens=6, generator=torch.Generator().manual_seed(7), **kw)

    plain = run(temperature=0.9)
    assert torch.equal(run(temperature=0.9, top_k=model.config.vocab_size + 5, top_p=1.0), plain)
    assert torch.equal(run(temperature=0), run(temperature=0.0, top_k=3, top_p=0.5))  # greedy ignores them
    assert torch.equal(run(temperature=1, top_k=1), run(temperature=0))


def test_forecast_names_a_series_that_is_not_a_tensor(models) -> None:
    with pytest.raises(TypeError) as e:
        models["forecast_tiny"].generate([[1.0, 2.0]], max_new_tokens=3, mode="forecast")
    assert "series must be a torch.Tensor [B, T, 1] (channels), got list [[1.0, 2.0]]" in _one_line(e)
    with pytest.raises(ValueError) as e:  # B = 0: new_cache refused it, naming its batch_size
        models["forecast_tiny"].generate(torch.zeros(0, 96, 1), max_new_tokens=3, mode="forecast")
    assert "series: a batch of no rows (shape (0, 96, 1))" in _one_line(e)
    from hymba_plus.models.forecast_decoding import rolling_forecasts

    with pytest.raises(ValueError) as e:
        rolling_forecasts(models["forecast_tiny"], torch.zeros(0, 200, 1), origins=1)
    assert "series: a batch of no rows (shape (0, 200, 1))" in _one_line(e)


def test_generate_names_an_unknown_mode_shortly(models) -> None:
    with pytest.raises(ValueError) as e:
        models["gpt_tiny"].generate(torch.tensor([[1, 2]]), mode="x" * 5000)
    assert "unknown generation mode 'xxx" in _one_line(e) and "(5000 characters)" in str(e.value)


@pytest.mark.parametrize("kw,err,says", [
    ({"device": "gpu"}, ValueError, "device 'gpu': not a device (expected e.g. 'cpu', 'cuda', 'cuda:0'"),
    ({"device": 3.5}, ValueError, "device 3.5: not a device"),
    ({"device": "cuda:99"}, ValueError, "device 'cuda:99': "),
    ({"dtype": "bf16"}, TypeError, "dtype must be a torch.dtype (e.g. torch.bfloat16), got str 'bf16'"),
])
def test_build_model_names_a_bad_device_or_dtype(kw, err, says) -> None:
    with pytest.raises(err) as e:
        build_model(CFG / "gpt_tiny.yaml", **kw)
    assert says in _one_line(e)


def test_build_and_load_on_a_valid_device(tmp_path) -> None:
    model = build_model(CFG / "gpt_tiny.yaml", device="cpu", dtype=torch.float64)
    assert model.device.type == "cpu" and next(model.parameters()).dtype == torch.float64
    model.save_pretrained(tmp_path / "m")
    assert from_pretrained(tmp_path / "m", device=torch.device("cpu")).device.type == "cpu"
    with pytest.raises(ValueError) as e:
        from_pretrained(tmp_path / "m", device="gpu")
    assert "device 'gpu': not a device" in _one_line(e)


@pytest.mark.parametrize("field,value,says", [
    ("meta_tokens", -2, "model.meta_tokens: must be >= 0, got -2"), ("d_model", -1, "model.d_model: must be >= 1"),
    ("max_seq_len", "x", "model.max_seq_len: wrong type: expected an integer, got str 'x'"),
    ("vocab_size", 0, "model.vocab_size: must be >= 2, got 0"),
])
def test_build_model_checks_a_recipe_changed_after_loading(field, value, says) -> None:
    """A Recipe made with dataclasses.replace never went through the loader: build_model checks it
    again (a raw torch error from a negative size, or a model that fails later, before)."""
    import dataclasses

    from hymba_plus import RecipeError, load_recipe

    r = load_recipe(CFG / "gpt_tiny.yaml")
    bad = dataclasses.replace(r, model=dataclasses.replace(r.model, **{field: value}))
    with pytest.raises(RecipeError, match=re.escape(says)):
        build_model(bad)
    assert load_recipe(r) is r  # a valid one comes back as it is


@pytest.mark.parametrize("section,value", [
    ("components", {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64}}),
    ("model", {"vocab_size": 256, "d_model": 64, "block_pattern": "GA | GA"}),
    ("objective", {"kind": "block_diffusion", "block_size": 4}),
    ("ladir", {"latent_dim": 8, "memory_slots": 2}),
    ("train", {"steps": 7}),
])
def test_a_recipe_with_sections_given_as_dicts_is_the_loaders_recipe(section, value) -> None:
    """A Recipe made with dataclasses.replace whose section is a plain dict passed load_recipe's second
    check (``to_dict`` reads dicts and configs alike) and came back as it was: build_model then failed
    with AttributeError ('dict' object has no attribute 'n_heads' / 'layout' / 'kind' / 'memory_slots'),
    and a dict ``train`` reached the trainer. Found by probing build_model with replaced recipes."""
    import dataclasses

    from hymba_plus import load_recipe

    r = load_recipe(CFG / "gpt_tiny.yaml")
    # (a ladir section needs its objective: under next_token it is refused)
    changed = dataclasses.replace(r, **{section: value}, **({"objective": {"kind": "ladir"}} if section == "ladir" else {}))
    loaded = load_recipe(changed)
    assert loaded == load_recipe(changed.to_dict())
    part = getattr(loaded, section)
    assert all(dataclasses.is_dataclass(c) for c in part.values()) if section == "components" \
        else dataclasses.is_dataclass(part)
    model = build_model(changed).eval()
    assert model(IDS[:, :4]).logits.shape == (2, 4, 256)


@pytest.fixture(scope="module")
def gpt():  # noqa: ANN201
    torch.manual_seed(0)
    return build_model(CFG / "gpt_tiny.yaml").eval()


IDS = torch.randint(0, 256, (2, 8), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("call,err,says", [
    (lambda m: m(IDS.float()), TypeError, "input_ids must hold integer token ids"),
    (lambda m: m([[1, 2]]), TypeError, "input_ids must be a torch.Tensor of token ids [B, T], got list [[1, 2]]"),
    (lambda m: m(IDS, labels=IDS + 256), ValueError, f"labels: {int(IDS[0, 0]) + 256} at [0, 0] is neither -100"),
    (lambda m: m(IDS, labels=IDS.float()), TypeError, "labels must hold integer token ids"),
    (lambda m: m(IDS, labels=IDS[:, :5]), ValueError, "labels must have the inputs' shape (2, 8), got (2, 5)"),
    (lambda m: m(torch.tensor([[1, 2, 9999]]), labels=torch.tensor([[1, 2, 3]])), ValueError,
     "input_ids: token id 9999 at [0, 2] is outside the vocabulary"),
    (lambda m: m(torch.tensor([[1, -5, 2]]), labels=torch.tensor([[1, 2, 3]])), ValueError,
     "input_ids: token id -5 at [0, 1] is outside the vocabulary"),
    (lambda m: m(None, inputs_embeds=torch.randn(2, 8, 7)), ValueError, "inputs_embeds must have shape [B, T, 64]"),
    (lambda m: m(None, inputs_embeds=torch.ones(2, 8, 64, dtype=torch.long)), TypeError, "must be floating point"),
    (lambda m: m(IDS, attention_mask=[[1] * 8] * 2), TypeError, "attention_mask must be a torch.Tensor"),
    (lambda m: m(IDS, cache={}), TypeError, "cache must be a HybridCache (model.new_cache(batch_size)), got dict"),
    (lambda m: m(IDS, logits_to_keep=-1), ValueError, "logits_to_keep must be an integer >= 0"),
    (lambda m: m(IDS, cache=build_model(CFG / "hymba_tiny.yaml").new_cache(2)), ValueError,
     "cache was made by another model"),
    (lambda m: m.new_cache(-1), ValueError, "batch_size must be an integer >= 1, got -1"),
    (lambda m: m.new_cache("2"), ValueError, "batch_size must be an integer >= 1, got '2'"),
    (lambda m: m.new_cache(2, device="gpu"), ValueError, "device 'gpu': not a device"),
    (lambda m: build_model(CFG / "gpt_tiny.yaml", dtype=torch.int64), ValueError,
     "dtype torch.int64: a model's weights are floating point"),
])
def test_forward_and_new_cache_name_a_bad_argument(gpt, call, err, says) -> None:
    """forward checks what generate checks, and more (found by a fuzzing pass: raw embedding / cross
    entropy / attribute errors from deep inside before, and a negative logits_to_keep silently kept
    all but the first position)."""
    with pytest.raises(err) as e:
        call(gpt)
    assert says in _one_line(e)


def test_block_diffusion_labels_exclude_the_mask_id() -> None:
    bd = build_model(CFG / "bd_tiny.yaml")
    with pytest.raises(ValueError, match=re.escape("labels: 256 at [0, 0] is neither -100")):
        bd(IDS, labels=torch.full_like(IDS, 256))


@pytest.mark.parametrize("kw,says", [
    ({"max_new_tokens": 10**6}, "max_new_tokens 1000000: at most 432 steps fit this model"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1, got 2.5"),
    ({"max_new_tokens": None}, "max_new_tokens must be an integer >= 1, got None"),
    ({"max_new_tokens": 5, "temperature": 0.7}, "generate(mode='forecast') takes no temperature"),
    ({"max_new_tokens": 5, "eos_token_id": 3, "top_k": 2}, "takes no top_k, eos_token_id"),
    ({"max_new_tokens": 5, "min_p": 0.1}, "generate(mode='forecast') takes no min_p"),
])
def test_forecast_checks_its_arguments_before_any_work(models, kw, says) -> None:
    """The longest forecast that fits the cache is 432 steps for forecast_tiny (12 context patches plus 17
    rounds of 24 fed-back values in 64 patches, then the horizon 24): past it the forward failed after
    several rounds, naming inputs_embeds; sampling arguments were silently ignored."""
    model = models["forecast_tiny"]
    series = torch.randn(2, 96, 1)
    with pytest.raises(ValueError) as e:
        model.generate(series, mode="forecast", **kw)
    assert says in _one_line(e)
    assert model.generate(series, mode="forecast", max_new_tokens=432).shape == (2, 432, 1, 3)


def test_speculative_caps_k_at_the_new_tokens_and_ladir_bounds_its_samples(models) -> None:
    """k far above max_new_tokens only allocated B x (N + k + 1) (16 GB at k 1e9); samples above the
    recipe's bound (64) decoded B x samples rows at once."""
    gpt, ids = models["gpt_tiny"], torch.tensor([[1, 2, 3]])
    st: dict = {}
    out = gpt.generate(ids, max_new_tokens=4, mode="speculative", draft=gpt, k=10**9, stats=st)
    assert torch.equal(out, gpt.generate(ids, max_new_tokens=4)) and st["k"] == 4
    with pytest.raises(ValueError) as e:
        models["ladir_tiny"].generate(ids, max_new_tokens=2, mode="ladir", samples=10**7)
    assert "samples must be <= 64 (as ladir.samples in a recipe), got 10000000" in _one_line(e)


@pytest.mark.parametrize("call,err,says", [
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, stats=[]), TypeError,
     "stats must be a dict the decoder fills (or None), got list []"),
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, streamer="stdout"), TypeError,
     "streamer must be a callable, called with each new token column [B] (or None), got str 'stdout'"),
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, temperature=1.0, generator=42),
     TypeError, "generator must be a torch.Generator (or None), got int 42"),
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_id="a"), ValueError,
     "eos_token_id must be a token id in [0, 256) or a non-empty list of them (or None: no end token), got 'a'"),
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_id=999), ValueError,
     "got 999"),
    (lambda m: m["gpt_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, eos_token_id=-1), ValueError,
     "got -1"),
    (lambda m: m["bd_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, mode="block_diffusion",
                                     threshold="x"), ValueError, "threshold must be a number > 0"),
    (lambda m: m["ladir_tiny"].generate(torch.tensor([[1, 2]]), max_new_tokens=2, mode="ladir", prophet="no"),
     TypeError, "prophet must be True, False or None (the recipe's), got str 'no'"),
    (lambda m: build_model(CFG / "etd_tiny.yaml")(torch.tensor([[1, 2]]), routes=torch.zeros(1, 3, dtype=torch.long)),
     ValueError, "routes: only for ETD models with Dr.LLM layer routers"),
])
def test_small_generate_arguments_are_checked_up_front(models, call, err, says) -> None:
    """Each was found by a fuzzing pass: raised after the decoding (stats), deep in torch (eos, threshold),
    or silently taken (eos 999 / -1, prophet 'no' as True, routes on an ETD model without routers); and a
    streamer that is not callable (e.g. an HF streamer object) or a generator that is not a torch.Generator
    (torch's TypeError at the first draw; greedy ignored it) raised after the prefill."""
    with pytest.raises(err) as e:
        call(models)
    assert says in _one_line(e)


@pytest.mark.parametrize("meta", [0, 2])
@pytest.mark.parametrize("code", ["GA", "GD", "M3", "ATL", "HY", "-", "GA+moe | GD"])
def test_forward_of_no_tokens_is_empty_logits_for_every_mixer(code, meta) -> None:
    """T = 0 (check_prompt's min_tokens=0 for forward) gives logits [B, 0, V] and leaves a cache as it was (the
    meta tokens, if any, enter as on any first call). gdn / mamba3 / hymba raised 'stack expects a non-empty
    TensorList' (or a reshape error), atlas without a cache an arange error, attention on a cache an IndexError."""
    from tests.helpers import EVERY_COMPONENT, tiny_recipe

    torch.manual_seed(0)
    model = build_model(tiny_recipe(code, dict(EVERY_COMPONENT), d_model=32, meta_tokens=meta)).eval()
    ids, none = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(1)), torch.zeros(2, 0).long()
    assert model(none).logits.shape == (2, 0, 64)
    cache = model.new_cache(2)
    assert model(none, cache=cache).logits.shape == (2, 0, 64)
    assert cache.pos.tolist() == [meta, meta] and cache.started == bool(meta)
    full = model(ids).logits
    parts = [model(ids[:, :3], cache=cache).logits, model(none, cache=cache).logits, model(ids[:, 3:], cache=cache).logits]
    assert cache.pos.tolist() == [meta + 5] * 2
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("code", ["GA", "GD", "M3", "ATL", "HY"])
def test_forward_refuses_a_batch_of_no_rows_as_ids_or_embeddings(code) -> None:
    """B = 0 was refused for input_ids (check_prompt) but taken as inputs_embeds: atlas and hymba then raised a
    reshape RuntimeError, the other mixers returned empty logits."""
    from tests.helpers import EVERY_COMPONENT, tiny_recipe

    model = build_model(tiny_recipe(code, dict(EVERY_COMPONENT), d_model=32, meta_tokens=2))
    for name, call in (("input_ids", lambda: model(torch.zeros(0, 4, dtype=torch.long))),
                       ("inputs_embeds", lambda: model(None, inputs_embeds=torch.zeros(0, 4, 32)))):
        with pytest.raises(ValueError) as e:
            call()
        assert f"{name}: a batch of no rows (shape (0, 4" in _one_line(e) and "at least one row is needed" in str(e.value)


@pytest.mark.parametrize("mask,says", [
    ([[0.0, 0.0, float("-inf"), float("-inf")]] * 2, "attention_mask: -inf at [0, 2]: the mask holds 1 for a token"),
    ([[1, 1, 1, 1], [1, -1, 1, 1]], "attention_mask: -1 at [1, 1]"),
    ([[1, 1, 2, 1], [1, 1, 1, 1]], "attention_mask: 2 at [0, 2]"),
])
def test_forward_refuses_a_mask_that_is_not_ones_and_zeros(gpt, mask, says) -> None:
    """Any nonzero value counted as a token: an additive mask (0: attend, -inf: pad) was silently taken the
    other way round, its pads as the tokens. Bool and 0 / 1 masks of any dtype are unchanged."""
    ids = IDS[:, :4]
    with pytest.raises(ValueError) as e:
        gpt(ids, attention_mask=torch.tensor(mask))
    assert says in _one_line(e)
    ref = gpt(ids, attention_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])).logits
    for m in (torch.tensor([[False, True, True, True]] * 2), torch.tensor([[0.0, 1.0, 1.0, 1.0]] * 2)):
        torch.testing.assert_close(gpt(ids, attention_mask=m).logits[0], ref[0])


@pytest.mark.parametrize("name,mode,kw", MODES)
def test_generate_refuses_a_mask_that_is_not_ones_and_zeros(models, name, mode, kw) -> None:
    """ladir compacts its questions by the mask before any forward reads it: an additive mask's -inf columns
    were its question, silently; every mode refuses it up front."""
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0], [float("-inf"), 0.0, 0.0, 0.0]])
    with pytest.raises(ValueError) as e:
        _gen(models, name, mode, torch.tensor([[5, 6, 7, 8]] * 2), attention_mask=mask, **kw)
    assert "attention_mask: -inf at [1, 0]: the mask holds 1 for a token and 0 for a pad" in _one_line(e)


def test_numpy_and_tensor_integers_are_integers(gpt) -> None:
    """new_cache's batch_size and forward's logits_to_keep refused np.int64(2) / tensor(2) as 'not an integer >= 1,
    got np.int64(2)'; generate's integer settings (max_new_tokens, k, ...) take them (int_at_least)."""
    import numpy as np

    for n in (np.int64(2), torch.tensor(2)):
        assert gpt.new_cache(n).batch_size == 2 and isinstance(gpt.new_cache(n).batch_size, int)
        assert gpt(IDS, logits_to_keep=n).logits.shape == (2, 2, 256)
    for bad in (True, 2.0, np.float64(2.0)):
        with pytest.raises(ValueError, match="batch_size must be an integer >= 1"):
            gpt.new_cache(bad)
