"""The decode engine (models/decode_engine.py): static caches give the dynamic path's
tokens, over generated recipes and every config; on CUDA the captured step does too."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import build_model, load_recipe
from hymba_plus.models.decode_engine import CAPACITY_STEP, MAX_ENGINES, attention_slots, clear_engines, engine_for
from tests.conftest import check_graph_engine_against_reference, rel_err
from tests.test_invariant import CPU_PARAM_LIMIT, SETTINGS, V, make, recipes

ROOT = Path(__file__).resolve().parents[1]


def _prompt(B: int, T: int, pad: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :pad] = 0
    return ids, mask


@settings(SETTINGS, max_examples=20)
@given(data=st.data())
def test_static_engine_equals_dynamic_greedy(data):
    """Greedy tokens are the same, and so are the logits of every step (same kernels, same values)."""
    model = make(data.draw(recipes()))
    T = data.draw(st.integers(1, 8), label="T")
    ids, mask = _prompt(3, T, data.draw(st.integers(0, T - 1), label="pad"), seed=T)
    n = data.draw(st.integers(2, 10), label="new")
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=n, attention_mask=mask, engine="dynamic")
        stats: dict = {}
        got = model.generate(ids, max_new_tokens=n, attention_mask=mask, engine="static", stats=stats)
        assert stats["engine"] == "static"
        assert torch.equal(got, want)
        # the step's logits themselves, along the generated sequence
        cache = model.new_cache(3)
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        eng = engine_for(model, cache, n, graph=False)
        for j in range(T, T + n - 1):
            ref = model(want[:, j:j + 1], cache=cache, check_inputs=False).logits[:, -1]
            assert rel_err(eng.step(want[:, j]), ref) <= 1e-6


def test_engine_is_reused_and_reloaded():
    """A second call of the same shape reuses the engine (its buffers are refilled, not
    reallocated) and still equals the dynamic path; at most MAX_ENGINES are kept."""
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                         "block_pattern": "GA+mlp | GD+mlp"}, "components": {}})
    ids, mask = _prompt(2, 6, 2)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=5, attention_mask=mask, engine="static")
        (eng,) = model._decode_engines.values()
        buf = eng.buffers.states[0].k
        ids2, mask2 = _prompt(2, 6, 0, seed=5)
        b = model.generate(ids2, max_new_tokens=5, attention_mask=mask2, engine="static")
        assert len(model._decode_engines) == 1 and eng.buffers.states[0].k is buf
        assert torch.equal(b, model.generate(ids2, max_new_tokens=5, attention_mask=mask2, engine="dynamic"))
        assert torch.equal(a, model.generate(ids, max_new_tokens=5, attention_mask=mask, engine="static"))
        assert buf.shape[2] == CAPACITY_STEP  # capacity rounded up
        for B in range(1, MAX_ENGINES + 3):
            model.generate(ids[:1].expand(B, -1), max_new_tokens=3, engine="static")
        assert len(model._decode_engines) == MAX_ENGINES
    clear_engines(model)
    assert not hasattr(model, "_decode_engines")


def test_packed_projections_are_one_gemm_each_and_follow_weight_changes():
    """The engine's packed projections (``kernels.linear.ProjectionPacks``): attention's q|k|v|gate,
    gdn's q|k|v|a|b|z, SwiGLU's gate|up, the MoE router|shared gate and the shared expert's
    gate|up are one packed weight each. Weights edited between calls -- in place through
    ``.data``, which no version counter sees -- are in the next call's tokens: the reused static
    engine still equals the dynamic path."""
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64,
                                         "block_pattern": "GA+mlp | GD+moe"},
                  "components": {"moe": {"n_experts": 4, "top_k": 2, "n_shared": 1}}})
    ids, mask = _prompt(2, 6, 2)
    with torch.no_grad():
        a = model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="static")
        assert torch.equal(a, model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="dynamic"))
        (eng,) = model._decode_engines.values()
        groups = sorted(len(mods) for mods, _, _ in eng.packs._groups.values())
        kind = {type(m).__name__: m for m in model.modules()}
        ga, gd = kind["GatedAttention"], kind["GatedDeltaNet"]
        assert groups == sorted([3 + (ga.g_proj is not None), 2, 4, 2, 2]), groups
        packed_w = {id(w) for _, w, _ in eng.packs._groups.values()}
        for p in model.parameters():
            p.data.mul_(1.25)  # bumps no version counter
        b = model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="static")
        assert model._decode_engines[next(iter(model._decode_engines))] is eng  # the same engine, refreshed
        assert {id(w) for _, w, _ in eng.packs._groups.values()} == packed_w  # in place: a graph stays valid
        assert torch.equal(b, model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="dynamic"))
        w, _ = eng.packs.stacked((gd.qkv_proj, gd.a_proj, gd.b_proj, gd.z_proj))
        assert torch.equal(w, torch.cat([gd.qkv_proj.weight, gd.a_proj.weight, gd.b_proj.weight, gd.z_proj.weight]))
        # another batch size: another engine, the same packed copies (one per model, not per engine)
        model.generate(ids[:1], max_new_tokens=3, engine="static")
        assert len(model._decode_engines) == 2 and len(eng.packs) == len(groups)
        assert all(e.packs is eng.packs for e in model._decode_engines.values())
    clear_engines(model)
    assert "_projection_packs" not in model.__dict__


def test_sampling_is_the_same_with_the_same_generator():
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                         "meta_tokens": 2, "block_pattern": "GA | M3"}, "components": {}})
    ids, mask = _prompt(2, 5, 1)
    with torch.no_grad():
        outs = [model.generate(ids, max_new_tokens=8, attention_mask=mask, temperature=0.8, top_k=10,
                               generator=torch.Generator().manual_seed(3), engine=e) for e in ("dynamic", "static")]
    assert torch.equal(*outs)


def test_static_attention_state_refuses_too_many_slots():
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                         "block_pattern": "GA"}, "components": {}})
    ids, _ = _prompt(2, 9, 0)
    with torch.no_grad():
        cache = model.new_cache(2)
        model(ids, cache=cache)
        assert attention_slots(cache) == 9
        static = cache.static_copy(16)
        assert static.states[0].k.shape[2] == 16 and int(static.states[0].n) == 9
        bigger = model.new_cache(2)
        model(torch.cat([ids, ids], 1), cache=bigger)
        with pytest.raises(ValueError, match="18 cached slots exceed the static capacity 16"):
            static.load_(bigger)


def test_engine_argument_is_checked():
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                         "block_pattern": "GA"}, "components": {}})
    ids, _ = _prompt(1, 3, 0)
    with pytest.raises(ValueError, match="engine must be one of auto, graph, static, dynamic"):
        model.generate(ids, max_new_tokens=2, engine="fast")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="engine='graph' needs a CUDA device"):
            model.generate(ids, max_new_tokens=2, engine="graph")
    stats: dict = {}
    model.generate(ids, max_new_tokens=4, stats=stats)  # auto on the CPU: the dynamic cache
    assert stats["engine"] == "dynamic"


def _decodable_configs() -> list[Path]:
    """Every config that decodes token by token (a forecaster reads no tokens) and is small
    enough for the CPU (parameters counted on the meta device; test_invariant covers the rest).
    Runs at collection: no ``describe`` here, whose kernel table runs every fast path's probe
    (on a GPU machine minutes of fla / mamba-ssm autotuning before the first test)."""
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        recipe = load_recipe(path)
        if recipe.model.vocab_size is None:
            continue
        with torch.device("meta"):
            n_params = sum(p.numel() for p in build_model(recipe).parameters())
        if n_params <= CPU_PARAM_LIMIT:
            out.append(path)
    return out


@pytest.mark.parametrize("path", _decodable_configs(), ids=lambda p: p.stem)
def test_static_engine_for_every_config(path):
    recipe = load_recipe(path)
    torch.manual_seed(0)
    model = build_model(recipe).eval()
    vocab = recipe.model.vocab_size
    ids = torch.randint(0, vocab, (2, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="dynamic")
        got = model.generate(ids, max_new_tokens=6, attention_mask=mask, engine="static")
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- GPU: the captured step

GPU_PATTERNS = ["GA+mlp | GD+mlp", "GA+moe | M3+mlp | HY", "GD | GA"]


@pytest.fixture(autouse=True)
def _one_launch_config(request):
    """GPU tests: fla's and mamba-ssm's autotuned kernels run their first launch config (the
    tokens do not depend on it; autotuning every kernel at these shapes took the GPU suite's
    whole time limit on an H200)."""
    if request.node.get_closest_marker("gpu") is None:
        yield
        return
    from hymba_plus.kernels import dispatch

    with dispatch.pinned_autotune("fla.", "mamba_ssm."):
        yield


@pytest.mark.gpu
@pytest.mark.parametrize("pattern", GPU_PATTERNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_engine_equals_dynamic_on_cuda(pattern, dtype):
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 64, "max_seq_len": 128, "ffn": "none",
                                         "meta_tokens": 2, "block_pattern": pattern}, "components": {}})
    model = model.to(device="cuda", dtype=dtype).eval()
    ids, mask = (t.cuda() for t in _prompt(4, 12, 5))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=16, attention_mask=mask, engine="dynamic")
        for _ in range(2):  # capture, then reuse
            stats: dict = {}
            got = model.generate(ids, max_new_tokens=16, attention_mask=mask, engine="graph", stats=stats)
            assert stats["engine"] == "graph", stats.get("engine_notice")
            assert torch.equal(got, want)
        default: dict = {}
        model.generate(ids, max_new_tokens=16, attention_mask=mask, stats=default)
        assert default["engine"] == "graph"
        # several end ids (torch.isin on the device, outside the captured step)
        T = ids.shape[1]
        eos = [int(want[0, T + 3]), int(want[1, T + 5])]
        with_eos = model.generate(ids, max_new_tokens=16, attention_mask=mask, engine="dynamic", eos_token_id=eos)
        assert torch.equal(model.generate(ids, max_new_tokens=16, attention_mask=mask, engine="graph",
                                          eos_token_id=eos), with_eos)


@pytest.mark.gpu
def test_graph_engine_falls_back_with_one_warning_when_capture_fails():
    """ATLAS's cached chunking reads the buffered count back to the host: no graph, one
    RuntimeWarning naming why, and the same tokens from the eager static step."""
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 128, "ffn": "none",
                                         "block_pattern": "ATL | GA"}, "components": {}}).cuda().eval()
    ids, mask = (t.cuda() for t in _prompt(2, 7, 2))
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=8, attention_mask=mask, engine="dynamic")
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            stats: dict = {}
            got = model.generate(ids, max_new_tokens=8, attention_mask=mask, engine="graph", stats=stats)
    assert torch.equal(got, want)
    if stats["engine"] == "static":
        assert "could not be captured" in stats["engine_notice"]
        assert sum("could not be captured" in str(x.message) for x in w) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("attn", [{"n_heads": 8, "n_kv_heads": 2, "head_dim": 32},
                                  {"n_heads": 4, "n_kv_heads": 1, "head_dim": 64, "window": 7, "kv_share": True}],
                         ids=["gqa4", "gqa4-window-kvshare"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_graph_engine_with_decode_attention_kernel_equals_reference(monkeypatch, attn, dtype):
    """The captured step with the FlashDecoding kernel (kernels/decode_attention.py) against
    HYMBA_KERNELS=reference (masked SDPA, dynamic cache), left-padded prompts: the logits of
    every step along the reference's greedy sequence, and in float32 the greedy tokens."""

    monkeypatch.setenv("HYMBA_KERNELS", "fast")  # the kernel under test, whatever the caller set
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 64, "max_seq_len": 128, "ffn": "mlp",
                                         "meta_tokens": 2, "block_pattern": "GA | GA | GA"},
                  "components": {"gated_attn": attn}})
    model = model.to(device="cuda", dtype=dtype).eval()
    ids, mask = (t.cuda() for t in _prompt(4, 12, 5))
    check_graph_engine_against_reference(monkeypatch, model, ids, mask, 16, "decode_attention", dtype)


def _decode_benchmark(tmp_path, *flags: str) -> list[dict]:  # noqa: ANN001
    """The JSON rows of ``benchmarks/decode.py --tiny --device cpu FLAGS`` (one thread)."""
    import json
    import os
    import subprocess
    import sys

    out = tmp_path / "decode.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "decode.py"), "--tiny", "--device", "cpu", *flags,
                          "--out", str(out)], capture_output=True, text=True, timeout=240,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(out.read_text())["rows"]


def test_decode_benchmark_runs_on_the_cpu(tmp_path):
    """benchmarks/decode.py --tiny: a row per engine with its step time, in the JSON."""
    import math

    rows = _decode_benchmark(tmp_path, "--batches", "2", "--prompts", "16", "--new", "4", "--engines", "dynamic",
                             "static", "--repeats", "1")
    assert [r["engine"] for r in rows] == ["dynamic", "static"]
    for r in rows:  # (on a busy CPU the step time, t(new) - t(1), can be noise around 0: then none, and a note)
        assert r["prefill_ms"] > 0 and r["batch"] == 2 and r["prompt"] == 16
        assert (math.isfinite(r["ms_per_step"]) and r["ms_per_step"] > 0) if "ms_per_step" in r else "t(new)" in r["note"]


@pytest.mark.slow  # a benchmark smoke run (~24 s): make test-all runs it
def test_decode_benchmark_tiny_smoke_run_with_its_defaults(tmp_path):
    """Exactly ``--tiny --device cpu`` (its help's CPU smoke run, about 20 s): the default prompts
    are then 32 and 128, inside the tiny model's max_seq_len 512 with the default 64 new tokens;
    batches 1 16, engines dynamic static (graph: CUDA only)."""
    import math

    rows = _decode_benchmark(tmp_path)
    assert [(r["prompt"], r["batch"], r["engine"]) for r in rows] == [
        (T, B, e) for T in (32, 128) for B in (1, 16) for e in ("dynamic", "static")]
    assert all((math.isfinite(r["ms_per_step"]) if "ms_per_step" in r else "t(new)" in r["note"]) and "error" not in r
               for r in rows)


@pytest.mark.parametrize("flag,value,needle", [
    ("--new", "1", "--new must be >= 2, got 1"),
    ("--repeats", "0", "--repeats must be >= 1, got 0"),
    ("--batches", "0", "--batches must all be >= 1, got [0]"),
    ("--prompts", "-4", "--prompts must all be >= 1, got [-4]"),
    ("--bandwidth", "0", "--bandwidth must be > 0, got 0.0"),
    ("--engines", "grpah", "argument --engines: invalid choice: 'grpah'"),
])
def test_decode_benchmark_refuses_a_bad_argument_in_one_line(tmp_path, monkeypatch, capsys, flag, value, needle):
    """benchmarks/decode.py: --new 1 divided by zero (new - 1) after every timing of the first setting,
    --repeats 0 took the median of nothing, a misspelt engine was a traceback from generate. In this
    process (a subprocess a case cost ~1.5 s of torch import; the script runs as a real process in
    the test above): argparse's exit 2 and its error on stderr, no JSON written."""
    import sys

    from tests.helpers import load_benchmark

    bench = load_benchmark("decode")
    out = tmp_path / "decode.json"
    monkeypatch.setattr(sys, "argv", ["decode.py", "--tiny", "--device", "cpu", flag, value, "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    err = capsys.readouterr().err
    assert exc.value.code == 2 and not out.exists(), err
    assert needle in err and "Traceback" not in err, err


def test_an_engine_is_per_autocast_dtype():
    """Engines were keyed on autocast being on, not on its dtype: one made under bf16 was reused under
    fp16, its K/V buffers still bf16."""
    model = make({"name": "t", "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "ffn": "none",
                                         "block_pattern": "GA+mlp | GD+mlp"}, "components": {}})
    ids, _ = _prompt(2, 6, 0)
    with torch.no_grad():
        for dt in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dt):
                model.generate(ids, max_new_tokens=2, engine="static")
        assert len(model._decode_engines) == 2
        dtypes = {e.buffers.states[0].k.dtype for e in model._decode_engines.values()}
        assert dtypes == {torch.bfloat16, torch.float16}
    clear_engines(model)


def test_engine_is_not_reused_for_a_cache_of_another_form():
    """An ETD model's prefill decides which layer applications run (think iterations, Dr.LLM routes):
    a second prompt that fills a state the first left empty (or the reverse) reused the engine, whose
    static buffers had no room for it, and generate raised "set on one side only"."""
    from tests.test_rollback import make as make_etd

    model = make_etd("etd-act-routes")
    with torch.no_grad():
        for T, seed in ((7, 1), (12, 2), (7, 1)):
            ids = torch.randint(0, 20, (3, T), generator=torch.Generator().manual_seed(seed))
            want = model.generate(ids, max_new_tokens=6, engine="dynamic")
            assert torch.equal(model.generate(ids, max_new_tokens=6, engine="static"), want)
    clear_engines(model)
