"""``hymba check`` and ``hymba info``: exit codes, one line per problem, never a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import build_model, load_recipe, registry
from hymba_plus.cli import main
from hymba_plus.cli.info import _active, describe, format_info

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BAD = sorted((ROOT / "tests" / "bad_recipes").glob("*.yaml"))




def run(capsys, *argv: str) -> tuple[int, list[str], list[str]]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def write(path: Path, recipe: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe))
    return path


def good(**model) -> dict:
    m = {"vocab_size": 64, "d_model": 32, "block_pattern": "GA | GA"}
    m.update(model)
    return {"name": "good", "model": m, "components": {"gated_attn": {"n_heads": 4}}}


# --------------------------------------------------------------------------- hymba check


def test_check_configs_folder_is_valid(capsys):
    code, out, err = run(capsys, "check", str(ROOT / "configs"))
    assert code == 0 and not [e for e in err if "invalid" not in e]
    oks = [line for line in out if line.startswith("OK ")]
    assert len(oks) == len(CONFIGS)
    for line, path in zip(oks, CONFIGS):
        r = load_recipe(path)
        n = len(r.layers)
        layout = f": {r.layout_line}" if r.layout_line else ""  # ratio layouts: what they resolve to
        assert line == f"OK {path} ({r.name}, {n} layer{'s' if n != 1 else ''}, {r.hash()}){layout}"


@pytest.mark.parametrize("path", BAD, ids=lambda p: p.stem)
def test_check_bad_recipe_one_line(capsys, path):
    code, out, err = run(capsys, "check", str(path))
    assert code == 1 and out == []
    assert len(err) == 1, err
    assert re.match(rf"^{re.escape(str(path))}:\d+: ", err[0])
    assert "Traceback" not in err[0]


def test_check_corpus_at_once(capsys):
    """``hymba check`` on the whole corpus folder: exit 1, one line per recipe and the summary, no
    traceback. In this process (a real one cost ~8 s, most of it importing torch; the console
    entry point runs as a real process in ``test_closed_pipe_is_not_a_traceback``, whose empty
    stderr also rules out an import-time warning)."""
    folder = ROOT / "tests" / "bad_recipes"
    code, out, lines = run(capsys, "check", str(folder))
    assert code == 1 and out == []
    assert not any("Traceback" in line for line in lines)
    assert len(lines) == len(BAD) + 1
    assert lines[-1] == f"{len(BAD)} recipes checked, {len(BAD)} invalid"
    assert {line.split(":")[0] for line in lines[:-1]} == {str(folder / p.name) for p in BAD}


@pytest.mark.parametrize("argv, message", [
    (["check"], "hymba check: give at least one recipe file or folder (hymba check PATH...)"),
    (["check", "no/such/file.yaml"], "hymba check: no/such/file.yaml: no such file or folder"),
])
def test_check_usage_errors(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == [] and err == [message]


def test_check_empty_folder_is_a_usage_error(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    code, _, err = run(capsys, "check", str(tmp_path))
    assert code == 2 and err == [f"hymba check: {tmp_path}: no *.yaml or *.yml recipes in this folder"]


def test_check_no_command(capsys):
    assert main([]) == 2


def test_check_folders_recurse_and_mix(capsys, tmp_path):
    a = write(tmp_path / "a.yaml", good())
    b = write(tmp_path / "sub" / "deeper" / "b.yml", good(d_model=-1))
    write(tmp_path / ".hidden" / "c.yaml", good(d_model=-2))  # hidden folders are skipped
    (tmp_path / "readme.md").write_text("not a recipe")
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1
    assert out == [f"OK {a} (good, 2 layers, {load_recipe(a).hash()})"]
    assert len(err) == 2 and err[1] == "2 recipes checked, 1 invalid"
    assert re.fullmatch(rf"{re.escape(str(b))}:\d+: model.d_model: must be >= 1, got -1", err[0])
    # the same file twice is checked once; files and folders mix
    code, out, err = run(capsys, "check", str(a), str(tmp_path / "a.yaml"))
    assert code == 0 and len(out) == 1 and err == []
    code, out, err = run(capsys, "check", "-q", str(a))
    assert code == 0 and out == ["1 recipe checked, 0 invalid"]


def test_check_reports_a_broken_symlink_in_a_folder(capsys, tmp_path):
    """A `*.yaml` in a folder that is a symlink to a missing file (or a loop of links) was skipped without a
    word, and the folder passed (exit 0) with that recipe unchecked: it is an invalid recipe, one line."""
    a = write(tmp_path / "a.yaml", good())
    (tmp_path / "gone.yaml").symlink_to(tmp_path / "moved" / "gone.yaml")
    (tmp_path / "l1.yaml").symlink_to(tmp_path / "l2.yaml")
    (tmp_path / "l2.yaml").symlink_to(tmp_path / "l1.yaml")
    code, out, err = run(capsys, "check", str(tmp_path))
    assert code == 1 and out == [f"OK {a} (good, 2 layers, {load_recipe(a).hash()})"]
    assert err == [f"{tmp_path / 'gone.yaml'}: a broken symlink (to {tmp_path / 'moved' / 'gone.yaml'})",
                   f"{tmp_path / 'l1.yaml'}: a broken symlink (to {tmp_path / 'l2.yaml'})",
                   f"{tmp_path / 'l2.yaml'}: a broken symlink (to {tmp_path / 'l1.yaml'})",
                   "4 recipes checked, 3 invalid"], err


def test_check_reports_several_errors_of_one_file(capsys, tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: x\nmodel:\n  vocab_size: 0\n  d_model: 32\n  block_pattern: GA\n  meta_tokens: -1\n")
    code, _, err = run(capsys, "check", str(p))
    assert code == 1
    assert err == [f"{p}:3: model.vocab_size: must be >= 2, got 0", f"{p}:6: model.meta_tokens: must be >= 0, got -1"]


def test_check_builds_on_the_meta_device(capsys, tmp_path, monkeypatch):
    """A recipe that validates but whose component fails to build is reported in one line."""
    p = write(tmp_path / "r.yaml", good())
    from hymba_plus.components import attention

    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(attention.GatedAttention, "__init__", boom)
    code, out, err = run(capsys, "check", str(p))
    assert code == 1 and out == []
    assert err == [f"{p}:1: model: the recipe validates but the model cannot be built: RuntimeError: kaboom"]
    code, out, err = run(capsys, "check", "--no-build", str(p))
    assert code == 0


# --------------------------------------------------------------------------- hymba info


def test_info_tiny_recipe_matches_a_real_model(capsys, tmp_path):
    p = write(tmp_path / "r.yaml", good(meta_tokens=3, block_pattern="GA | -+mlp | GA+none"))
    code, out, err = run(capsys, "info", str(p), "--json", "--seq-lens", "5,17")
    assert code == 0 and err == []
    d = json.loads("\n".join(out))
    model = build_model(p)
    assert d["params_total"] == model.num_parameters() == d["params_active"]
    assert d["pattern"] == "GA+mlp | -+mlp | GA+none" and d["n_layers"] == 3
    assert [r["mixer"] for r in d["layers"]] == ["gated_attn", "none", "gated_attn"]
    assert [r["ffn"] for r in d["layers"]] == ["mlp", "mlp", "none"]
    assert [r["params"] for r in d["layers"]] == [sum(p.numel() for p in b.parameters()) for b in model.blocks]
    for T in (5, 17):
        cache = model.new_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 64, (1, T)), cache=cache)
        assert [r["state_bytes"][str(T)] for r in d["layers"]] == cache.layer_nbytes()
        assert d["cache_bytes"][str(T)] == cache.nbytes()


def test_info_text_output(capsys):
    code, out, err = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"))
    text = "\n".join(out)
    assert code == 0 and err == []
    r = load_recipe(ROOT / "configs" / "gpt_tiny.yaml")
    assert f"pattern     {r.pattern}" in text
    assert f"hash {r.hash()}" in text
    assert re.search(r"^layer\s+mixer\s+ffn\s+params\s+active\s+state@1k\s+state@32k$", text, re.M)
    assert re.search(r"^\s+0\s+gated_attn\s+mlp\s+[\d,]+\s+[\d,]+\s+[\d.]+ KiB\s+[\d.]+ MiB$", text, re.M)
    assert f"total {build_model(r).num_parameters():,}" in text
    assert "cache       per sequence (float32): 1k tokens" in text
    assert re.search(r"^kernels     (fast paths: |HYMBA_KERNELS=)", text, re.M)


def full_size_attention() -> dict:
    return {"name": "full-attn", "model": {"vocab_size": 32000, "d_model": 2048, "max_seq_len": 32768,
                                           "block_pattern": "(GA)*40", "meta_tokens": 128},
            "components": {"gated_attn": {"n_heads": 16, "n_kv_heads": 2, "head_dim": 128,
                                          "rope": {"fraction": 0.25}},
                           "mlp": {"d_hidden": 5632}}}


def test_info_full_size_on_the_meta_device(capsys, tmp_path):
    """40 layers at d_model 2048 (~2B parameters): nothing is allocated, numbers are exact."""
    p = write(tmp_path / "full.yaml", full_size_attention())
    code, out, err = run(capsys, "info", str(p), "--json", "--dtype", "bfloat16")
    assert code == 0, err
    d = json.loads("\n".join(out))
    D, H, Hkv, hd, F, V, M = 2048, 16, 2, 128, 5632, 32000, 128
    attn = D * H * hd * 2 + D * Hkv * hd * 2 + H * hd * D + 2 * hd  # q, gate, k, v, o, q/k norms
    layer = attn + 3 * D * F + 2 * D
    assert d["params_total"] == V * D + M * D + D + 40 * layer
    assert d["params_active"] == d["params_total"]
    per_slot = 2 * Hkv * hd * 2 + 8  # bf16 K and V + an int64 position
    assert d["cache_bytes"] == {"1024": 40 * (M + 1024) * per_slot, "32768": 40 * (M + 32768) * per_slot}


def test_info_with_a_windowed_layer(capsys, tmp_path):
    r = good(meta_tokens=2)
    r["components"]["gated_attn"]["window"] = 64
    p = write(tmp_path / "w.yaml", r)
    code, out, _ = run(capsys, "info", str(p), "--json")
    d = json.loads("\n".join(out))
    per_slot = 2 * 4 * 8 * 4 + 8
    assert d["cache_bytes"] == {"1024": 2 * (2 + 63) * per_slot, "32768": 2 * (2 + 63) * per_slot}


def test_active_parameters_hook():
    class Sparse(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(10, 4))

        def active_parameters(self) -> int:
            return 12

    assert _active(Sparse()) == 12
    assert _active(torch.nn.Linear(3, 2)) == 8
    assert _active(None) == 0


def test_info_moe_active_parameters(capsys, tmp_path):
    """Active = total minus the routed experts a token does not use (MoE's own count)."""
    assert "moe" in registry.names("ffn")
    r = good(ffn="moe")
    r["components"]["moe"] = {"n_experts": 8, "top_k": 2, "n_shared": 1, "d_expert": 16}
    p = write(tmp_path / "moe.yaml", r)
    d = describe(load_recipe(p))
    model = build_model(p)
    moe = [b.ffn for b in model.blocks]
    inactive = sum(sum(p.numel() for p in m.parameters()) - m.active_parameters() for m in moe)
    assert inactive > 0
    assert d["params_active"] == d["params_total"] - inactive
    assert "active" in format_info(d)


def test_info_mtp_moe_active_parameters(tmp_path):
    """An MTP module's MoE counts only the routed experts a token uses too. Regression: the
    ``mtp`` row and the total counted all of an MTP MoE's experts as active."""
    r = good(block_pattern="GA | GA+moe", mtp={"depth": 2, "weight": 0.3, "block": "GA+moe"})
    r["components"]["moe"] = {"n_experts": 8, "top_k": 2, "n_shared": 0, "d_expert": 16}
    p = write(tmp_path / "mtp_moe.yaml", r)
    d = describe(load_recipe(p))
    model = build_model(p)
    moe = [m for m in model.modules() if hasattr(m, "active_parameters")]
    assert len(moe) == 3
    inactive = sum(sum(p.numel() for p in m.parameters()) - m.active_parameters() for m in moe)
    assert d["params_active"] == d["params_total"] - inactive
    mtp = model.mtp
    assert d["mtp"]["active_params"] == sum(p.numel() for p in mtp.parameters()) - sum(
        sum(p.numel() for p in m.parameters()) - m.active_parameters() for m in mtp.modules()
        if hasattr(m, "active_parameters"))
    row = [x for x in format_info(d).splitlines() if "mtp x2" in x][0].split()
    assert row[-1] == f"{d['mtp']['active_params']:,}" != row[-2]


def test_info_errors(capsys, tmp_path):
    code, out, err = run(capsys, "info", str(ROOT / "tests" / "bad_recipes" / "kv_heads_not_dividing.yaml"))
    assert code == 1 and out == [] and len(err) == 1 and "n_kv_heads: must divide" in err[0]
    code, _, err = run(capsys, "info", str(tmp_path / "missing.yaml"))
    assert code == 1 and err == [f"{tmp_path / 'missing.yaml'}: file not found"]  # no line: no ':0:'
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 1 and err == [f"{tmp_path}: is a directory, expected a recipe file"]
    # RECIPE is a file: a path without the .yaml suffix that does not exist (`configs/gpt_tiny`) was read as
    # a YAML string, `<recipe>:1: 'configs/gpt_tiny' is neither an existing recipe file nor a YAML mapping ...`
    code, _, err = run(capsys, "info", str(tmp_path / "gpt_tiny"))
    assert code == 1 and err == [f"{tmp_path / 'gpt_tiny'}: file not found"]
    code, _, err = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"), "--seq-lens", "0,x")
    assert code == 2 and err == ["hymba info: --seq-lens must be positive integers separated by commas, got '0,x'"]


def test_info_full_seed_config_and_compact_pattern():
    """The seed's full-size recipe: 40 layers, MoE 512 experts, 10 routed + 1 shared."""
    from hymba_plus.core.pattern import parse_pattern

    r = load_recipe(ROOT / "configs" / "quad_hybrid_full.yaml")
    d = describe(r, torch.bfloat16)
    assert d["n_layers"] == 40 and d["d_model"] == 2048
    assert [s.mixer for s in r.layers].count("atlas") == 4 and [s.ffn for s in r.layers] == ["moe"] * 40
    assert d["pattern_compact"] == d["pattern"]  # interleaved: no runs to compact
    assert d["pattern"].startswith("M3+moe | GD+moe | GA+moe | M3+moe | ATL+moe | GD+moe | M3+moe | GA+moe")
    assert parse_pattern(d["pattern_compact"]) == list(r.layers) == parse_pattern(d["pattern"])
    assert d["layout"]["counts"] == {"atlas": 4, "mamba3": 14, "gdn": 14, "gated_attn": 8}
    assert d["layout"]["rounding"] == [] and d["layout"]["line"] == r.layout_line
    assert d["params_active"] < d["params_total"] / 10  # ultra-sparse: a few percent active
    moe = r.components["moe"]
    assert (moe.n_experts, moe.top_k, moe.n_shared) == (512, 10, 1)


def layout_recipe(tmp_path: Path) -> Path:
    p = tmp_path / "layout.yaml"  # the order of the ratios breaks rounding ties: keep it (no sort_keys)
    p.write_text(yaml.safe_dump({
        "name": "lay", "model": {"vocab_size": 64, "d_model": 32,
                                 "layout": {"n_layers": 6, "ratios": {"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25}}},
        "components": {"gated_attn": {"n_heads": 4}, "gdn": {"n_heads": 2, "head_dim": 16},
                       "mamba3": {"state_size": 8, "head_dim": 16}}}, sort_keys=False))
    return p


LAYOUT_LINE = "layout 6 layers -> GD | M3 | GD | GA | M3 | GD (rounded: mamba3 1.5 -> 2, gated_attn 1.5 -> 1)"


def test_check_and_info_show_a_ratio_layout(capsys, tmp_path):
    """One line each: the layers a ratio layout resolves to and what was rounded."""
    p = layout_recipe(tmp_path)
    h = load_recipe(p).hash()
    code, out, err = run(capsys, "check", str(p))
    assert code == 0 and err == []
    assert out == [f"OK {p} (lay, 6 layers, {h}): {LAYOUT_LINE}"]
    code, out, err = run(capsys, "info", str(p))
    assert code == 0 and err == []
    assert [line for line in out if line.startswith("pattern ")] == [f"pattern     {LAYOUT_LINE}"]
    assert not any(line.startswith("            = ") for line in out)
    assert [line.split()[1] for line in out if re.match(r"^\s+\d+\s", line)] == [
        "gdn", "mamba3", "gdn", "gated_attn", "mamba3", "gdn"]
    code, out, _ = run(capsys, "info", str(p), "--json")
    d = json.loads("\n".join(out))
    assert d["layout"]["rounding"] == ["mamba3 0.25 x 6 = 1.5 -> 2", "gated_attn 0.25 x 6 = 1.5 -> 1"]
    assert d["layout"]["counts"] == {"gdn": 3, "mamba3": 2, "gated_attn": 1}


def test_info_kernels_one_line_without_cuda(capsys, monkeypatch):
    from hymba_plus.cli import info

    monkeypatch.setattr(info, "cuda_available", lambda: False)
    code, out, _ = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"))
    assert code == 0
    assert out[-1] == "kernels     fast paths: atlas_cpu (CPU: reference paths for the rest)"
    assert not [line for line in out if "unavailable" in line or "HYMBA_KERNELS" in line]
    assert max(map(len, out)) <= 120
    # the whole table on request: every registered op, what it is, why it is unavailable
    code, full, _ = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"), "--kernels")
    assert code == 0 and full[:len(out) - 1] == out[:-1]
    start = full.index("kernels     HYMBA_KERNELS=auto")
    ops = describe(load_recipe(ROOT / "configs" / "gpt_tiny.yaml"))["kernels"]
    assert [line.split()[0] for line in full[start + 1:]] == list(ops)
    for line, k in zip(full[start + 1:], ops.values()):
        assert k["fast_path"] in line and (("unavailable" in line) != k["available"])
    # HYMBA_KERNELS=reference: every path is off by the setting (it was probed and listed as available)
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    code, full, _ = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"), "--kernels")
    start = full.index("kernels     HYMBA_KERNELS=reference")
    assert code == 0 and [line.split()[0] for line in full[start + 1:]] == list(ops)
    assert all(line.endswith("  off (HYMBA_KERNELS=reference)") for line in full[start + 1:])


def test_info_kernels_off(capsys, monkeypatch):
    """``HYMBA_KERNELS_OFF``: the named ops are listed off by it (unprobed), the rest as before; a name
    that is no registered op is one line naming the variable, the name and the known names, with the
    exit code of a bad ``HYMBA_KERNELS``."""
    from hymba_plus.cli import info

    recipe = str(ROOT / "configs" / "gpt_tiny.yaml")
    monkeypatch.setattr(info, "cuda_available", lambda: True)  # the compact table, as on a GPU machine
    monkeypatch.setenv("HYMBA_KERNELS_OFF", "flex_two_stream, rope")
    for flag in ((), ("--kernels",)):
        code, out, err = run(capsys, "info", recipe, *flag)
        assert code == 0 and err == []
        rows = {line.split()[0]: line for line in out[out.index(next(x for x in out if x.startswith("kernels "))) + 1:]}
        assert {op for op, line in rows.items() if line.endswith("  off (HYMBA_KERNELS_OFF)")} == {"flex_two_stream",
                                                                                                  "rope"}
    code, out, _ = run(capsys, "info", recipe, "--json")
    ks = json.loads("\n".join(out))["kernels"]
    assert ks["rope"]["available"] is False and ks["rope"]["error"] == "off (HYMBA_KERNELS_OFF)"
    monkeypatch.setenv("HYMBA_KERNELS", "bogus")
    bad_mode, _, bad_mode_err = run(capsys, "info", recipe)
    monkeypatch.delenv("HYMBA_KERNELS")
    monkeypatch.setenv("HYMBA_KERNELS_OFF", "flex_two_stream,gdnn")
    code, out, err = run(capsys, "info", recipe)
    assert code == bad_mode != 0 and len(bad_mode_err) == 1 and out == [] and len(err) == 1
    assert "HYMBA_KERNELS_OFF" in err[0] and "'gdnn'" in err[0] and "flex_two_stream, gated_rms_norm, gdn," in err[0]


@pytest.mark.parametrize("var, value", [("HYMBA_KERNELS", "bogus"), ("HYMBA_KERNELS_OFF", "gdnn")])
def test_a_bad_kernel_setting_is_one_line_in_every_model_command(capsys, monkeypatch, tmp_path, var, value):
    """A bad ``HYMBA_KERNELS`` / ``HYMBA_KERNELS_OFF`` is one line naming the variable, exit 1, before
    anything runs, in every command that runs a model (``hymba train`` raised a traceback at its first
    kernel call; ``hymba info`` blamed the recipe: "cannot build the model: ValueError: ...")."""
    monkeypatch.setenv(var, value)
    recipe = str(ROOT / "configs" / "gpt_tiny.yaml")
    for argv in (("info", recipe), ("train", recipe, "--steps", "1", "--out", str(tmp_path / "run")),
                 ("generate", str(tmp_path / "no_checkpoint"))):
        code, out, err = run(capsys, *argv)
        assert code == 1 and out == [] and len(err) == 1, (argv, err)
        assert err[0].startswith(f"hymba {argv[0]}: {var}") and repr(value) in err[0]
    assert not (tmp_path / "run").exists()


def fake_info(cuda: bool, mode: str = "auto") -> dict:
    d = describe(load_recipe(ROOT / "configs" / "gpt_tiny.yaml"))
    d["cuda"], d["kernel_mode"] = cuda, mode
    d["kernels"] = {"gdn": {"fast_path": "fla chunk_gated_delta_rule " + "x" * 80, "available": True, "error": ""},
                    "mamba3": {"fast_path": "mamba-ssm", "available": False,
                               "error": "RuntimeError: needs a CUDA device of compute capability >= 9.0 " + "y" * 80}}
    return d


def test_info_kernels_on_cuda_compact_table():
    from hymba_plus.cli.info import format_kernels

    d = fake_info(cuda=True)
    assert format_kernels(d) == [
        "kernels     fast paths: 1 of 2 available, HYMBA_KERNELS=auto (--kernels: what each is, full errors)",
        "            gdn     available",
        "            mamba3  unavailable (RuntimeError: needs a CUDA device of compute capability ...)",
    ]
    assert format_kernels(d, "summary") == [
        "kernels     fast paths: 1 of 2 available (HYMBA_KERNELS=auto; hymba info --kernels lists them)"]
    full = format_kernels(d, "full")
    assert len(full) == 3 and "y" * 80 in full[2] and "x" * 80 in full[1]
    assert format_kernels(fake_info(cuda=True, mode="reference")) == [
        "kernels     fast paths: off (HYMBA_KERNELS=reference: reference paths)"]
    assert format_kernels(fake_info(cuda=False)) == format_kernels(fake_info(cuda=False), "summary") == [
        "kernels     fast paths: none (CPU: reference paths)"]
    cpu = fake_info(cuda=False)  # a fast path of the CPU's own (atlas_cpu), available or not
    cpu["kernels"]["atlas_cpu"] = {"fast_path": "eager chunk step", "available": True, "error": "", "device": "cpu"}
    cpu["kernels"]["other_cpu"] = {"fast_path": "x", "available": False, "error": "RuntimeError", "device": "cpu"}
    assert format_kernels(cpu) == ["kernels     fast paths: atlas_cpu (CPU: reference paths for the rest)"]
    cpu["kernel_mode"] = "reference"
    assert format_kernels(cpu) == ["kernels     fast paths: off (HYMBA_KERNELS=reference: reference paths)"]
    assert format_info(d).splitlines()[-3:] == format_kernels(d)


def test_demo_runs(capsys, tmp_path):
    """`make demo` on one tiny recipe: check + info + invariant + cached generation."""
    from hymba_plus import demo

    (tmp_path / "gpt_tiny.yaml").write_text((ROOT / "configs" / "gpt_tiny.yaml").read_text())
    # part 1 only (part 2 is test_training.py's demo test, writing under tmp_path): the demo's
    # default --out is the user's runs/demo, which the suite must never touch
    assert demo.main(["--configs", str(tmp_path), "--new-tokens", "4", "--no-train",
                      "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "hymba check gpt_tiny.yaml: OK" in out and "parameters  total" in out
    assert "(ok, bound 1e-4)" in out and "same tokens: yes" in out
    # never the kernel table, CUDA or not: one line (hymba info --kernels has the table)
    assert len([line for line in out.splitlines() if line.startswith("kernels ")]) == 1
    assert "unavailable" not in out and "fast paths: " in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo.main(["--configs", str(empty)]) == 2


def test_closed_pipe_is_not_a_traceback():
    """`hymba check ... | head -0`: the reader is gone before the first line is written;
    the command ends quietly with 141 (as if killed by SIGPIPE), no traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "hymba_plus", "check", "--no-build", "configs"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the interpreter has even imported torch
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141
    assert err == ""


def test_human_count_rounds_up_to_the_next_unit():
    """Regression: 999,999 printed ``1000.00K`` (rounded to 2 places after choosing K)."""
    from hymba_plus.cli.info import human_count

    assert human_count(999) == "999"
    assert human_count(1000) == "1.00K"
    assert human_count(999_994) == "999.99K"
    assert human_count(999_996) == "1.00M"
    assert human_count(999_999) == "1.00M"
    assert human_count(999_999_999) == "1.00B"
    assert human_count(98_944) == "98.94K"


def test_human_bytes_units_up_to_pib():
    """Regression: a huge --seq-lens printed ``49173831939697.3 GiB`` (GiB was the largest unit)."""
    from hymba_plus.cli.info import human_bytes

    assert human_bytes(None) == "n/a"
    assert human_bytes(1023) == "1023 B"
    assert human_bytes(542_822) == "530.1 KiB"
    assert human_bytes(2**20 - 1) == "1.0 MiB"  # not 1024.0 KiB
    assert human_bytes(3 * 2**40) == "3.0 TiB"
    assert human_bytes(5 * 2**50) == "5.0 PiB"
    assert human_bytes(2**60) == "1024.0 PiB"


def test_info_huge_seq_len_in_tib(capsys):
    code, out, _ = run(capsys, "info", str(ROOT / "configs" / "gpt_tiny.yaml"), "--seq-lens", "1000000000000")
    assert code == 0 and "480.2 TiB" in "\n".join(out) and not re.search(r"\d{5,}\.\d GiB", "\n".join(out))


@pytest.mark.parametrize("block", ["GA+mlp", "GD+mlp"])
def test_info_mtp_cache_matches_speculative_decoding(capsys, tmp_path, block):
    """The MTP modules' own cache (``mtp.new_cache``, speculative MTP decoding) is a field and a
    line of its own, not part of the trunk's figure: after a prompt of T tokens module i (1-based)
    holds T + 1 - i positions (meta tokens never reach it). Regression: it was not shown at all."""
    from hymba_plus.models.mtp_decoding import generate_mtp

    r = yaml.safe_load((ROOT / "configs" / "mtp_tiny.yaml").read_text())
    r["model"]["meta_tokens"] = 3
    r["model"]["mtp"]["block"] = block
    p = write(tmp_path / "mtp.yaml", r)
    torch.manual_seed(0)
    model = build_model(p).eval()
    made = []
    new_cache = model.mtp.new_cache
    model.mtp.new_cache = lambda *a, **k: made.append(new_cache(*a, **k)) or made[-1]
    for T in (5, 17):
        code, out, _ = run(capsys, "info", str(p), "--json", "--seq-lens", str(T))
        d = json.loads("\n".join(out))
        with torch.no_grad():
            generate_mtp(model, torch.randint(0, 256, (1, T)), max_new_tokens=0)
        trunk = model.new_cache(1)
        with torch.no_grad():
            model(torch.randint(0, 256, (1, T)), cache=trunk)
        assert d["cache_bytes"][str(T)] == trunk.nbytes()  # the trunk's alone
        assert d["mtp"]["cache_bytes"][str(T)] == made[-1].nbytes() > 0
    text = format_info(describe(load_recipe(p)))
    assert re.search(r"^            MTP modules' own cache \(speculative decoding, --mode mtp\): 1k tokens [\d.]+ \w?i?B, "
                     r"32k tokens", text, re.M), text


def test_info_notes_lengths_past_max_seq_len(capsys):
    """Regression: the 1k / 32k columns of a recipe with max_seq_len 256 carried no note."""
    path = str(ROOT / "configs" / "mtp_tiny.yaml")  # max_seq_len 256
    code, out, _ = run(capsys, "info", path, "--seq-lens", "100,256,1024,32768")
    assert code == 0 and "            1k, 32k tokens: past max_seq_len 256" in out
    code, out, _ = run(capsys, "info", path, "--json", "--seq-lens", "100,256,1024,32768")
    assert json.loads("\n".join(out))["past_max_seq_len"] == [1024, 32768]
    code, out, _ = run(capsys, "info", path, "--seq-lens", "100,256")
    assert not any("past max_seq_len" in x for x in out)
    code, out, _ = run(capsys, "info", path, "--json", "--seq-lens", "100,256")
    assert json.loads("\n".join(out))["past_max_seq_len"] == []
