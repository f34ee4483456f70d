"""``hymba bench RECIPE`` (cli/bench.py, training/bench.py): every objective of the tiny recipes benches on the CPU
(training step, prefill, decode; forecasting skips decode and says why), the JSON holds what the table shows and
the parameters ``hymba info`` counts, and bad arguments and recipes are one line with the README's exit codes,
nothing written. Tiny shapes, 1 timed step: no number is compared with a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hymba_plus.cli import main

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--batch", "1", "--steps", "1", "--warmup", "0", "--decode-tokens", "2"]


@pytest.mark.parametrize("name", ["gpt_tiny", "mtp_tiny", "bd_tiny", "ladir_tiny", "forecast_tiny"])
def test_every_objective_benches_with_positive_numbers(tmp_path, capsys, name):
    """next token, MTP, block diffusion, LaDiR and forecasting: each phase reports positive numbers, the JSON
    (replacing an older file, as ``generate --out`` does) has every key, parameters as ``hymba info`` counts them."""
    from hymba_plus.cli.info import describe
    from hymba_plus.core.recipe import load_recipe

    recipe = ROOT / "configs" / f"{name}.yaml"
    out = tmp_path / "bench.json"
    out.write_text("old")
    args = FAST[:-2] if name == "forecast_tiny" else FAST + ["--seq-len", "8"]  # (no --decode-tokens: no decode)
    assert main(["bench", str(recipe), *args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    info = describe(load_recipe(recipe))
    assert (r["params_total"], r["params_active"]) == (info["params_total"], info["params_active"])
    assert r["torch"] == torch.__version__ and r["device_type"] == "cpu" and r["device"]
    assert r["settings"]["dtype"] == "float32" and r["settings"]["batch"] == 1
    t = r["train"]
    assert t["ms_per_step"] > 0 and t["tokens_per_s"] > 0 and t["tokens_per_step"] > 0
    assert t["mode"] == "eager" and t["precision"] == "float32" and t["optimizer"] and "peak_memory_bytes" not in t
    assert any(line.startswith("optimizer: ") for line in t["log"])  # the trainer's set-up lines
    assert r["prefill"]["ms"] > 0 and r["prefill"]["tokens_per_s"] > 0 and r["prefill"]["tokens"] > 0
    d = r["decode"]
    if name == "forecast_tiny":
        assert "generates no tokens" in d["skipped"] and "skipped: a forecasting model" in table
        assert t["tokens_per_step"] == 12  # patch tokens: 96 / 8 values, one channel, batch 1
    else:
        assert d["prefill_ms"] > 0 and d["total_ms"] > 0 and d["new_tokens"] == 2 and d["prompt"] == 8
        # two tiny timings may invert (noise): then a note instead of a step time, never a negative one
        assert d.get("ms_per_step", 1) > 0 and ("ms_per_step" in d) != ("note" in d)
    if name in ("gpt_tiny", "mtp_tiny", "bd_tiny"):  # random token ids, every position a token
        assert t["tokens_per_step"] == 8 and "random token ids" in t["data"]
    assert "train step" in table and "prefill" in table and f"wrote {out}" in table


@pytest.mark.parametrize("args, needle", [
    (["--batch", "0"], "--batch 0: must be >= 1"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--warmup", "-1"], "--warmup -1: must be >= 0"),
    (["--decode-tokens", "1"], "--decode-tokens 1: must be >= 2"),
    (["--decode-tokens", "512"], "--decode-tokens 512: must be <= max_seq_len - 1 (511"),
    (["--seq-len", "1"], "--seq-len 1: must be >= 2"),
    (["--seq-len", "100000"], "--seq-len 100000: must be <= the recipe's max_seq_len (512)"),
    (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
    (["--device", "tpu"], "--device tpu: expected auto, cpu, cuda or cuda:N"),
    (["--mode", "fast"], "argument --mode: invalid choice: 'fast'"),
    # the trainer's messages name hymba train's --cuda-graph / --compile, flags hymba bench does not have
    (["--mode", "cuda-graph"], "--mode cuda-graph needs a CUDA device"),
])
def test_bad_arguments_are_one_line_exit_2_nothing_written(tmp_path, capsys, monkeypatch, args, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "bench.json"
    try:
        rc = main(["bench", str(ROOT / "configs" / "gpt_tiny.yaml"), "--device", "cpu", "--steps", "1", "--warmup", "0",
                   "--batch", "1", "--seq-len", "8", *args, "--json", str(out)])
    except SystemExit as e:  # argparse's own errors (cli._parser_class: one line, exit 2)
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_bad_recipe_missing_file_json_folder_and_forecast_seq_len(tmp_path, capsys, monkeypatch):
    """A bad recipe: its first error as FILE:LINE: key (exit 1); a missing recipe (1); --json naming a folder and
    --seq-len for a forecast recipe (usage, 2); a bad HYMBA_KERNELS (1, before anything runs). Nothing written."""
    out = tmp_path / "bench.json"
    bad = ROOT / "tests" / "bad_recipes" / "kv_heads_not_dividing.yaml"
    cases = [
        ([str(bad)], 1, f"{bad}:11: components.gated_attn.n_kv_heads: must divide n_heads"),
        ([str(tmp_path / "none.yaml")], 1, "none.yaml"),
        ([str(ROOT / "configs" / "forecast_tiny.yaml"), "--seq-len", "8"], 2,
         "--seq-len 8: does not apply to objective forecast"),
        # forecasting generates no tokens (decode is skipped): the flag would do nothing
        ([str(ROOT / "configs" / "forecast_tiny.yaml"), "--decode-tokens", "5"], 2,
         "--decode-tokens 5: does not apply to objective forecast"),
    ]
    for args, code, needle in cases:
        assert main(["bench", *args, *FAST[:-2], "--json", str(out)]) == code
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert main(["bench", str(ROOT / "configs" / "gpt_tiny.yaml"), *FAST, "--json", str(tmp_path)]) == 2
    assert "--json" in capsys.readouterr().err
    monkeypatch.setenv("HYMBA_KERNELS", "fastest")
    assert main(["bench", str(ROOT / "configs" / "gpt_tiny.yaml"), *FAST, "--json", str(out)]) == 1
    assert "HYMBA_KERNELS" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_closed_pipe_ends_quietly_with_141(tmp_path):
    """`hymba bench ... | head -0`: the reader is gone before the table is printed; the command ends as
    hymba check and hymba info do (exit 141, as if killed by SIGPIPE, nothing on stderr), not with
    'hymba bench: Broken pipe' and exit 1. The --json file, measured by then, is written all the same (as
    hymba eval's)."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    proc = subprocess.Popen([sys.executable, "-m", "hymba_plus", "bench", str(ROOT / "configs" / "gpt_tiny.yaml"),
                             *FAST, "--json", str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    proc.stdout.close()  # long before the interpreter has imported torch
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""
    assert json.loads(out.read_text())["train"]["tokens_per_step"] > 0


def test_a_mode_the_objective_cannot_take_names_the_mode_flag(tmp_path, capsys):
    """LaDiR under torch.compile: the trainer refuses '--compile: ...' (hymba train's alias); hymba bench has only
    --mode, so its line names --mode compile (usage, exit 2, nothing written)."""
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / "ladir_tiny.yaml"), *FAST, "--mode", "compile",
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hymba bench: --mode compile: not available for the ladir objective"), err
    assert "--compile:" not in err and len(err.strip().splitlines()) == 1 and not out.exists()


def test_an_even_number_of_timed_steps_counts_whole_tokens(tmp_path, capsys):
    """The median over 2 timed steps of 8 tokens each is 8, a count: the table read '8.0 tokens' and the JSON
    8.0 (statistics.median of an even count is a mean)."""
    out = tmp_path / "bench.json"
    args = ["--device", "cpu", "--batch", "1", "--seq-len", "8", "--steps", "2", "--warmup", "0",
            "--decode-tokens", "2"]
    assert main(["bench", str(ROOT / "configs" / "gpt_tiny.yaml"), *args, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    t = json.loads(out.read_text())["train"]
    assert t["tokens_per_step"] == 8 and isinstance(t["tokens_per_step"], int)
    assert "  8 tokens, eager" in table and "8.0 tokens" not in table, table


@pytest.mark.parametrize("name, mode, measure, keys, brief", [
    ("mtp_tiny", "mtp", "step", ("acceptance_rate", "tokens_per_target_forward", "k"), "mtp: acceptance "),
    ("bd_tiny", "block_diffusion", "call", ("tokens_per_forward", "steps_per_block", "block_size"),
     "block_diffusion: "),
])
def test_decode_mode_times_the_models_own_decoder(tmp_path, capsys, name, mode, measure, keys, brief):
    """--decode-mode: MTP's self-speculative decoding (ms per step over the generated tokens) and block
    diffusion (whole blocks per forward: ms per new token of the whole call) run with their own stats in the
    JSON and a short form in the table."""
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / f"{name}.yaml"), *FAST[:-1], "4", "--seq-len", "8",
                 "--decode-mode", mode, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    d = r["decode"]
    assert r["settings"]["decode_mode"] == d["mode"] == mode and d["measure"] == measure
    assert d["new_tokens"] == 4 and d["prompt"] == 8 and d["prefill_ms"] > 0 and d["total_ms"] > 0
    if measure == "call":  # no step time: the whole call over its new tokens, never a note
        assert d["ms_per_token"] == pytest.approx(d["total_ms"] / 4) and "ms_per_step" not in d
        assert d["decode_tokens_per_s"] > 0 and "ms/token of the whole call" in table
    else:
        assert d.get("ms_per_step", 1) > 0 and ("ms_per_step" in d) != ("note" in d)
    assert all(k in d["stats"] for k in keys) and d["stats"]["tokens"] == 4, d["stats"]
    if "ms_per_step" in d or "ms_per_token" in d:
        assert brief in table, table


def test_default_decode_mode_is_ar_and_its_row_unchanged(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / "mtp_tiny.yaml"), *FAST, "--seq-len", "8", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    d = json.loads(out.read_text())["decode"]
    assert d["mode"] == "ar" and d["measure"] == "step" and d["engine"] == "dynamic" and "acceptance_rate" not in d["stats"]
    assert "mtp:" not in table and ("ms/step, 2 new after 8, float32, engine dynamic\n" in table + "\n"
                                     or "note" in d), table


@pytest.mark.parametrize("recipe, args, needle", [
    ("gpt_tiny", ["--decode-mode", "mtp"], "--decode-mode mtp: {}: needs a model with MTP modules (the recipe has "
                                           "no model.mtp)"),
    ("mtp_tiny", ["--decode-mode", "block_diffusion"], "--decode-mode block_diffusion: {}: needs a model trained "
                                                       "with the block_diffusion objective (the recipe's objective "
                                                       "is next_token)"),
    ("bd_tiny", ["--decode-mode", "ladir"], "--decode-mode ladir: {}: needs a model with latent reasoning"),
    ("mtp_tiny", ["--decode-mode", "speculative"], "--decode-mode speculative: needs a draft model"),
    ("gpt_tiny", ["--decode-mode", "fast"], "--decode-mode fast: expected ar, block_diffusion, mtp or ladir"),
    ("forecast_tiny", ["--decode-mode", "ar"], "--decode-mode ar: does not apply to objective forecast"),
])
def test_a_decode_mode_the_model_cannot_run_is_refused_before_timing(tmp_path, capsys, monkeypatch, recipe, args,
                                                                      needle):
    """A mode the recipe's model cannot run: one line naming --decode-mode and why, exit 2, before the training
    step (Trainer is never made) and nothing written."""
    from hymba_plus.training import trainer

    def no_training(*a, **k):
        raise AssertionError("the training step ran before the refusal")

    monkeypatch.setattr(trainer.Trainer, "__init__", no_training)
    out = tmp_path / "bench.json"
    path = str(ROOT / "configs" / f"{recipe}.yaml")
    rest = FAST[:-2] if recipe == "forecast_tiny" else FAST + ["--seq-len", "8"]
    assert main(["bench", path, *rest, *args, "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle.format(path) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("name, mode, args, options, stats", [
    ("bd_tiny", "block_diffusion", ["--block-size", "2", "--sampler", "ddpm", "--decode-steps", "3"],
     {"block_size": 2, "sampler": "ddpm", "steps": 3}, {"block_size": 2, "sampler": "ddpm"}),
    ("bd_tiny", "block_diffusion", ["--threshold", "none", "--decode-steps", "1"], {"threshold": None, "steps": 1},
     {"steps_per_block": 1.0, "sampler": "confidence"}),
    ("mtp_tiny", "mtp", ["--k", "1"], {"k": 1}, {"k": 1}),
    ("ladir_tiny", "ladir", ["--decode-steps", "2", "--samples", "1", "--no-prophet"],
     {"steps": 2, "samples": 1, "prophet": False}, {"steps": 2, "samples": 1}),
])
def test_decode_mode_takes_generates_decoder_flags(tmp_path, capsys, name, mode, args, options, stats):
    """--decode-mode MODE times the decoder with generate's own flags for that mode (--decode-steps: generate's
    --steps, bench's --steps being the timed calls); the given ones are in the JSON's settings.decode_options and
    the decoder ran with them (its stats)."""
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / f"{name}.yaml"), *FAST[:-1], "4", "--seq-len", "8",
                 "--decode-mode", mode, *args, "--json", str(out)]) == 0, capsys.readouterr().err
    r = json.loads(out.read_text())
    assert r["settings"]["decode_options"] == options
    assert {k: r["decode"]["stats"][k] for k in stats} == stats, r["decode"]["stats"]


@pytest.mark.parametrize("recipe, args, needle", [
    ("gpt_tiny", ["--k", "2"], "--k: only for --decode-mode mtp"),
    ("mtp_tiny", ["--decode-mode", "mtp", "--sampler", "ddpm"], "--sampler: only for --decode-mode block_diffusion"),
    ("gpt_tiny", ["--decode-steps", "2"], "--decode-steps: only for --decode-mode block_diffusion or ladir"),
    ("ladir_tiny", ["--decode-mode", "ladir", "--threshold", "0.5"], "--threshold: only for --decode-mode "
                                                                      "block_diffusion"),
    ("bd_tiny", ["--decode-mode", "block_diffusion", "--samples", "2"], "--samples: only for --decode-mode ladir"),
    ("bd_tiny", ["--decode-mode", "block_diffusion", "--sampler", "ddpm", "--threshold", "0.5"],
     "--threshold: only for --sampler confidence"),
    ("bd_tiny", ["--decode-mode", "block_diffusion", "--threshold", "0"], "--threshold 0.0: must be > 0"),
    ("bd_tiny", ["--decode-mode", "block_diffusion", "--block-size", "0"], "--block-size 0: must be >= 1"),
    ("bd_tiny", ["--decode-mode", "block_diffusion", "--decode-steps", "0"], "--decode-steps 0: must be >= 1"),
    ("mtp_tiny", ["--decode-mode", "mtp", "--k", "3"], "--k: must be <= model.mtp.depth (2), got 3"),
    ("ladir_tiny", ["--decode-mode", "ladir", "--samples", "0"], "--samples 0: must be in 1..64"),
    ("ladir_tiny", ["--decode-mode", "ladir", "--cfg-scale", "2"], "--cfg-scale: cfg_scale"),
])
def test_a_decoder_flag_another_mode_or_the_model_cannot_take_is_refused_before_timing(
        tmp_path, capsys, monkeypatch, recipe, args, needle):
    """generate's decoder flags in hymba bench: one for another --decode-mode, a value generate refuses, or one the
    recipe's model cannot take (MTP's --k past its depth, LaDiR's guidance without cfg_dropout) is one line, exit
    2, before the training step (Trainer is never made), nothing written."""
    from hymba_plus.training import trainer

    def no_training(*a, **k):
        raise AssertionError("the training step ran before the refusal")

    monkeypatch.setattr(trainer.Trainer, "__init__", no_training)
    out = tmp_path / "bench.json"
    assert main(["bench", str(ROOT / "configs" / f"{recipe}.yaml"), *FAST, "--seq-len", "8", *args,
                 "--json", str(out)]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists()


def test_bench_probes_only_the_fast_paths_its_run_uses(tmp_path, capsys, monkeypatch):
    """``hymba bench`` counted the parameters with ``hymba info``'s ``describe``, which ran every registered
    probe: on a fresh H100 ``hymba bench configs/moe_bench.yaml`` (attention + MoE) spent its 150 s compiling
    Mamba-3's MIMO TileLang kernels before timing anything. It probes only what its run asks for, and the JSON
    says which fast paths the run used (``dispatch.statuses()``: no probe of its own)."""
    from hymba_plus.kernels import dispatch

    probed = []
    monkeypatch.setitem(dispatch._FAST, "unused_op", dispatch.FastPath("unused_op", lambda: probed.append(1),
                                                                       "an op no layer of gpt_tiny calls",
                                                                       device="cpu"))
    out = tmp_path / "b.json"
    assert main(["bench", str(ROOT / "configs" / "gpt_tiny.yaml"), *FAST, "--seq-len", "8",
                 "--json", str(out)]) == 0
    capsys.readouterr()
    assert probed == []
    kernels = json.loads(out.read_text())["kernels"]
    assert kernels["unused_op"] is None and set(kernels) == set(dispatch._FAST)
