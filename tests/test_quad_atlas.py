"""``benchmarks/quad_atlas.py``: the gdn-swapped recipe has exactly the original's layers with
gdn for atlas, and a tiny CPU run of the script writes a row per recipe with its mode, the
ATLAS path taken and the atlas / gdn ratio."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hymba_plus import load_recipe
from hymba_plus.core.pattern import LayerSpec
from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def load_bench(monkeypatch):  # noqa: ANN001, ANN201 - the script as a module
    return load_benchmark("quad_atlas")


def test_swap_atlas_keeps_every_other_layer(monkeypatch) -> None:
    bench = load_bench(monkeypatch)
    comps = {"atlas": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
             "moe": {"n_experts": 4, "top_k": 2, "d_expert": 32}, "mlp": {"d_hidden": 64}}
    grouped = load_recipe({"name": "g", "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 64,
                                                  "block_pattern": "(atlas+moe | M3)*2 | ATL | GA+none"},
                           "components": comps})
    swapped = bench.swap_atlas(grouped)
    assert [(s.mixer, s.ffn) for s in swapped.layers] == [
        ("gdn", "moe"), ("mamba3", "mlp"), ("gdn", "moe"), ("mamba3", "mlp"), ("gdn", "mlp"), ("gated_attn", "none")]
    assert swapped.components == grouped.components and swapped.model.d_model == 32

    layout = load_recipe({"name": "l", "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 64,
                                                 "layout": {"n_layers": 4, "ratios": {"atlas": 0.5, "gdn": 0.5}}},
                          "components": comps})
    swapped = bench.swap_atlas(layout)
    assert swapped.model.layout is None
    assert list(swapped.layers) == [LayerSpec("gdn", s.ffn) for s in layout.layers]

    with pytest.raises(ValueError, match="no atlas layer"):
        bench.swap_atlas(swapped)


@pytest.mark.slow  # a benchmark smoke run (~36 s): make test-all runs it
def test_tiny_cpu_run(tmp_path) -> None:
    out = tmp_path / "quad_atlas.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quad_atlas.py"), "--device", "cpu",
                          "--batch", "1", "--seq-len", "16", "--warmup", "1", "--iters", "1", "--threads", "1",
                          "--atlas-reference", "--profile", "--profile-rows", "3", "--out", str(out),
                          "--atlas-setting", "NS_TRITON_MAX=64", "--atlas-setting", "FACTOR_GRAM=none", "--tf32"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    assert "ratio atlas/gdn (mode auto" in res.stdout
    rep = json.loads(out.read_text())
    assert rep["device"].startswith("cpu")
    assert "ATL" in rep["patterns"]["atlas"] and "ATL" not in rep["patterns"]["gdn"]
    assert rep["patterns"]["gdn"] == rep["patterns"]["atlas"].replace("ATL", "GD")  # the tiny recipe's ffns kept
    rows = {r["recipe"]: r for r in rep["rows"]}
    assert [r["recipe"] for r in rep["rows"]] == ["atlas", "gdn", "atlas_reference"]
    for r in rep["rows"]:
        assert "error" not in r, r
        assert r["mode_requested"] == "auto" and r["mode"] == "eager"  # auto on the CPU is eager
        assert r["tf32"] is True  # --tf32 reached the trainer's config (no effect on the CPU)
        assert r["tokens_per_step"] == 16 and r["tokens_per_s"] == pytest.approx(16 / (r["step_ms"] / 1e3))
        assert r["step_ms"] > 0 and r["first_step_s"] > 0 and r["data_ms"] >= 0
        assert all(x == x and abs(x) < 100 for x in r["loss_first_last"])  # finite losses
        prof = r["profile"]  # --profile: two more steps under torch.profiler (aten ops on the CPU)
        assert prof["aten_ops_per_pass"] > 0 and len(prof["top"]) == 3 and prof["top"][0]["ms"] > 0
    # ATLAS on the CPU's fast path (atlas_cpu) as dispatched, on the reference where forced
    assert rows["atlas"]["atlas_path"] == "fast" and rows["atlas_reference"]["atlas_path"] == "reference"
    assert rows["gdn"]["atlas_path"] is None and rows["gdn"]["parameters"] < rows["atlas"]["parameters"]
    rat = rep["ratios"]
    assert rat["atlas_vs_gdn_auto"] == pytest.approx(rows["atlas"]["tokens_per_s"] / rows["gdn"]["tokens_per_s"])
    assert rat["atlas_reference_vs_gdn_auto"] == pytest.approx(
        rows["atlas_reference"]["tokens_per_s"] / rows["gdn"]["tokens_per_s"])
    assert rat["ratio_default"] == rat["atlas_vs_gdn_auto"] and rat["target"] == 0.5
    assert rat["atlas_step_ms_for_target"] == pytest.approx(rows["gdn"]["step_ms"] / 0.5)
    if not rat["meets_target"]:
        assert "the target needs an ATLAS step <=" in res.stdout
    assert rat["meets_target"] == (rat["ratio_default"] >= 0.5)
    assert rep["settings"]["atlas_setting"] == {"NS_TRITON_MAX": 64, "FACTOR_GRAM": None}


def test_atlas_config_sets_keys_of_the_atlas_section(monkeypatch) -> None:
    bench = load_bench(monkeypatch)
    recipe = load_recipe(ROOT / "configs" / "quad_hybrid_tiny.yaml")
    item = bench.atlas_config_item("inner_optimizer=muon_chunk")
    assert item == ("inner_optimizer", "muon_chunk") and bench.atlas_config_item("window=4") == ("window", 4)
    changed = bench.with_atlas_config(recipe, [item])
    assert changed.components["atlas"].inner_optimizer == "muon_chunk"
    assert changed.layers == recipe.layers and bench.with_atlas_config(recipe, []) is recipe
    assert bench.swap_atlas(changed).pattern == bench.swap_atlas(recipe).pattern


@pytest.mark.parametrize("flag,value,needle", [
    ("--atlas-setting", "NS_TRITON_MAX=48", "argument --atlas-setting: 'NS_TRITON_MAX=48': NS_TRITON_MAX takes 16 / 32 / 64"),
    ("--atlas-config", "inner_optimizer=adam",
     "components.atlas.inner_optimizer: must be one of 'muon', 'muon_chunk', 'sgd', got 'adam'"),
    ("--atlas-config", "window=[", "argument --atlas-config: 'window=[': the value is not YAML"),
    ("--batch", "0", "--batch must be >= 1, got 0"),  # it became the default batch (8 on CUDA) silently
    ("--seq-len", "0", "--seq-len must be >= 2, got 0"),
    ("--iters", "0", "--iters must be >= 1, got 0"),  # every row was a StatisticsError
    ("--warmup", "0", "--warmup must be >= 1, got 0"),
])
def test_a_bad_atlas_argument_is_one_line_and_exit_2(monkeypatch, capsys, tmp_path, flag, value, needle) -> None:
    """In this process (a subprocess a case cost ~8 s of torch import): argparse's exit 2 or main's 2,
    the one line on stderr, no JSON written."""
    bench = load_bench(monkeypatch)
    out = tmp_path / "q.json"
    try:
        rc = bench.main(["--device", "cpu", flag, value, "--out", str(out)])
    except SystemExit as e:  # argparse's error()
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    assert needle in err and "Traceback" not in err, err


def test_one_recipe_alone_runs_without_a_ratio(tmp_path) -> None:
    """``--recipes gdn``: only the gdn twin runs (e.g. to profile it without the ATLAS recipe's compile);
    no ratio is claimed."""
    out = tmp_path / "twin.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quad_atlas.py"), "--device", "cpu",
                          "--batch", "1", "--seq-len", "16", "--warmup", "1", "--iters", "1", "--threads", "1",
                          "--recipes", "gdn", "--out", str(out)],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr[-2000:] + res.stdout[-2000:]
    rep = json.loads(out.read_text())
    assert [r["recipe"] for r in rep["rows"]] == ["gdn"] and "error" not in rep["rows"][0]
    assert rep["versions"]["torch"] and "fla-core" in rep["versions"]  # the kernels' package versions (timing.versions)
    assert rep["ratios"]["ratio_default"] is None and rep["ratios"]["meets_target"] is None
    assert "not measured" in res.stdout
