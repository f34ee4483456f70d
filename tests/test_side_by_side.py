"""``benchmarks/side_by_side.py --tiny`` on CPU: every selected row runs or is skipped with a
reason, the JSON has the documented keys, and the Qwen3-Next model imported through
``hymba_plus.convert`` gives HF's logits (the decode and quad_moe rows rely on it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import load_benchmark

pytest.importorskip("transformers")
REPO = Path(__file__).resolve().parents[1]


def load_bench():  # noqa: ANN201 - the script as a module
    return load_benchmark("side_by_side")


def test_datasheet_peaks_by_device_name() -> None:
    """MFU and streaming limits divide by the GPU's own peaks (an H100 SXM streams 3.35e12 B/s, not the H200's
    4.8e12); a device without figures gets the H200's, and the source says so."""
    timing = load_benchmark("timing")
    assert timing.peaks_of("NVIDIA H200")[:2] == (989e12, 4.8e12)
    assert timing.peaks_of("NVIDIA H100 80GB HBM3") == (989e12, 3.35e12, "H100 datasheet")
    assert timing.peaks_of("NVIDIA H100 PCIe")[1] == 2.0e12
    assert timing.peaks_of("NVIDIA A100-SXM4-40GB")[1] == 1.555e12
    flops, bw, source = timing.peaks_of(None)
    assert (flops, bw) == (989e12, 4.8e12) and source == "H200 datasheet (no figures for a CPU)"
    assert "no figures for NVIDIA L4" in timing.peaks_of("NVIDIA L4")[2]


def test_tiny_run_writes_every_key(tmp_path, capsys) -> None:
    bench = load_bench()
    rc = bench.main(["--tiny", "--device", "cpu", "--rows", "attn", "gdn", "quad_moe", "decode",
                     "--out-dir", str(tmp_path), "--decode-repeats", "1", "--one-launch-config"])  # CPU: pins nothing
    assert rc == 0
    out = capsys.readouterr().out
    assert "ratios (ours / peer):" in out
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 2 and "latest.json" in files and files[0].startswith("cpu-")
    rep = json.loads((tmp_path / "latest.json").read_text())
    assert rep == json.loads((tmp_path / files[0]).read_text())
    assert rep["device"].startswith("cpu") and rep["preset"] == "tiny"
    assert rep["settings"]["peaks_from"] == ["H200 datasheet (no figures for a CPU)"] * 2
    assert {"torch", "triton", "transformers", "fla"} <= set(rep["versions"])
    assert set(rep["rows"]) == {"attn", "gdn", "quad_moe", "decode"}

    # fla's model needs CUDA: skipped, with the reason, and its ratio null with that note
    assert rep["rows"]["gdn"]["status"] == "skipped" and rep["rows"]["gdn"]["reason"].startswith("gdn: ")
    for name in ("attn", "quad_moe"):
        row = rep["rows"][name]
        assert row["status"] == "ok", row
        assert row["peer"]["tokens_per_s"] > 0 and row["ours"]["modes"]["eager"]["tokens_per_s"] > 0
        assert row["ours"]["modes"]["cuda_graph"] == {"error": "needs CUDA"}
        assert row["ours_best_default_mode"] == "eager" and row["ratio"] > 0
        assert row["peer"]["parameters"] == row["ours"]["parameters"]  # the same architecture
        assert "config" in row
    assert rep["rows"]["attn"]["ours"]["modes"]["eager"]["mfu"] > 0 and "mfu_formula" in rep["rows"]["attn"]
    # HF's experts implementations are each timed, the faster one is the peer
    moe = rep["rows"]["quad_moe"]
    assert set(moe["peer_variants"]) == {"grouped_mm", "eager"}
    assert moe["peer"]["tokens_per_s"] == max(v["tokens_per_s"] for v in moe["peer_variants"].values())
    # imported through hymba_plus.convert: the same function as HF's model
    assert rep["rows"]["quad_moe"]["conversion_check"]["logits_max_rel_diff"] < 1e-4

    dec = rep["rows"]["decode"]
    assert dec["status"] == "ok" and dec["engines"] and dec["weight_stream_limit_ms"] > 0
    assert {(r["model"], r["batch"]) for r in dec["results"]} >= {("hf", 1), ("hf", 2), ("ours", 1), ("ours", 2)}
    for r in dec["results"]:
        assert r["prompt"] == 32 and r["tokens_per_s"] > 0 and "skipped" not in r
        if r["batch"] == 1:
            assert r["ms_per_token"] > 0 and r["weight_stream_limit_ms"] > 0
        if r["model"] == "ours":
            assert r["tokens_equal_to_hf"] == 1.0  # float32, same weights: greedy decoding agrees
            # what engine auto ran is recorded (on a GPU: graph, the decode step replayed from a CUDA graph)
            assert r["engine"] == "auto" and r["engine_ran"] == "dynamic"

    ratios = rep["ratios"]
    for key in ("attn_vs_hf_llama", "quad_moe_vs_hf_qwen3next", "decode_vs_hf"):
        assert ratios[key] > 0
    assert ratios["gdn_vs_fla"] is None and ratios["gdn_vs_fla_note"] == rep["rows"]["gdn"]["reason"]
    assert ratios["fsdp2_2gpu_scaling"] is None and ratios["fsdp2_2gpu_scaling_note"]
    assert "attn_vs_hf_llama_note" not in ratios and "launch_configs" not in rep["rows"]["attn"]
    # --one-launch-config (GPU): a row measured with pinned launch configs says so in its ratio
    pinned = dict(rep["rows"]["attn"], launch_configs="pinned (test)")
    r2 = bench.ratios({**rep["rows"], "attn": pinned})
    assert r2["attn_vs_hf_llama"] == ratios["attn_vs_hf_llama"] and r2["attn_vs_hf_llama_note"] == "not tuned: pinned (test)"


def test_merge_keeps_rows_not_rerun(tmp_path) -> None:
    """--merge: a second call measuring other rows keeps the first call's rows in the same file."""
    bench = load_bench()
    base = ["--tiny", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert bench.main([*base, "--rows", "gdn", "fsdp2"]) == 0
    assert bench.main([*base, "--rows", "fsdp2", "--merge"]) == 0
    rep = json.loads((tmp_path / "latest.json").read_text())
    assert set(rep["rows"]) == {"gdn", "fsdp2"} and rep["merged_from_earlier_run"] == ["gdn"]
    assert rep["ratios"]["fsdp2_2gpu_scaling_note"].startswith("fsdp2: needs 2 CUDA devices")
    # each row keeps the settings it ran with (the top-level settings are the last call's)
    assert rep["rows"]["gdn"]["run"]["settings"]["rows"] == ["gdn", "fsdp2"]
    assert rep["rows"]["fsdp2"]["run"]["settings"]["rows"] == ["fsdp2"]
    assert set(rep["rows"]["gdn"]["run"]["our_fast_paths"]) == set(rep["our_fast_paths"])


def test_bf16_weights_modes_time_ours_beside_the_headline(tmp_path) -> None:
    """--param-dtype bfloat16: ours also runs with bf16 weights and float32 masters (eager_bf16w; the
    CUDA-graph one is skipped on a CPU); its ratio is reported beside the headline, which keeps
    to the modes that need no flag."""
    bench = load_bench()
    assert bench.main(["--tiny", "--device", "cpu", "--rows", "attn", "--param-dtype", "bfloat16",
                       "--out-dir", str(tmp_path)]) == 0
    rep = json.loads((tmp_path / "latest.json").read_text())
    modes = rep["rows"]["attn"]["ours"]["modes"]
    assert modes["eager_bf16w"]["tokens_per_s"] > 0 and "needs CUDA" in modes["cuda_graph_bf16w"]["error"]
    assert rep["rows"]["attn"]["ours_best_default_mode"] in ("eager", "cuda_graph")
    assert rep["ratios"]["attn_vs_hf_llama_bf16_weights"] > 0
    assert rep["settings"]["param_dtype"] == "bfloat16"


def test_full_size_configs_match_their_peers() -> None:
    """The GPU configs, built on the meta device: our attn model has exactly HF Llama's ~374M
    parameters, our gdn model fla's GatedDeltaNet count (fla's layout written out: fla is not
    installed on CPU machines), the Qwen3-Next config ~1.35B."""
    import torch
    import transformers as tf

    from hymba_plus import load_recipe
    from hymba_plus.models.lm import HybridLM

    bench = load_bench()
    args = bench.parse_args(["--device", "cpu"])
    hf_cfg, recipe = bench.attn_configs(args)
    with torch.device("meta"):
        hf, ours = tf.LlamaForCausalLM(tf.LlamaConfig(**hf_cfg)), HybridLM(load_recipe(recipe))
    assert bench.n_params(hf) == bench.n_params(ours) == 373_867_520

    fla_cfg, recipe = bench.gdn_configs(args)
    with torch.device("meta"):
        ours = HybridLM(load_recipe(recipe))
    d, H, dk, K, inter, V, L = (fla_cfg[k] for k in ("hidden_size", "num_heads", "head_dim", "conv_size",
                                                     "intermediate_size", "vocab_size", "num_hidden_layers"))
    dv = int(dk * fla_cfg["expand_v"])
    # q, k | v, g | o | a, b | A_log, dt_bias | q, k, v short convs | o_norm | 2 block norms | MLP
    layer = 2 * d * H * dk + 2 * d * H * dv + H * dv * d + 2 * d * H + 2 * H + (2 * H * dk + H * dv) * K + dv \
        + 2 * d + 3 * d * inter
    assert bench.n_params(ours) == L * layer + 2 * V * d + d == 424_653_968

    with torch.device("meta"):
        hf = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**bench.qwen3_next_config(args)))
    assert bench.n_params(hf) == 1_351_650_320
    assert hf.config.layer_types[:4] == ["linear_attention"] * 3 + ["full_attention"]


def test_decode_agreement_float32_tiny(tmp_path) -> None:
    """``benchmarks/decode_agreement.py --tiny`` in float32 on the CPU: HF's greedy tokens == ours
    from every engine, and each generate == its own model's teacher-forced full forward."""
    import subprocess
    import sys

    out = tmp_path / "agree.json"
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "decode_agreement.py"), "--device", "cpu",
                          "--tiny", "--dtype", "float32", "--batch", "2", "--prompt", "24", "--new", "6",
                          "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["agreement"] and all(v == 1.0 for v in rep["agreement"].values()), rep["agreement"]
    assert rep["logits"]["max |logit diff| hf vs ours fwd"] < 1e-4


def test_interrupted_row_keeps_its_finished_results(tmp_path, monkeypatch) -> None:
    """A time limit's SIGINT in the middle of a row: the results finished by then stay in the JSON
    (status interrupted, exit 130), the rows after it are not run, and a decode ratio made of fewer
    prompts than 2k and 8k says so."""
    bench = load_bench()
    real = bench.time_generate
    calls = {"n": 0}

    def time_generate(fn, ids, n, args):  # noqa: ANN001, ANN202 - the second model's timing is cut off
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(fn, ids, n, args)

    monkeypatch.setattr(bench, "time_generate", time_generate)
    rc = bench.main(["--tiny", "--device", "cpu", "--rows", "decode", "attn", "--out-dir", str(tmp_path),
                     "--decode-repeats", "1", "--decode-batches", "2"])
    assert rc == 130
    rep = json.loads((tmp_path / "latest.json").read_text())
    dec = rep["rows"]["decode"]
    assert set(rep["rows"]) == {"decode"} and dec["status"] == "interrupted" and "SIGINT" in dec["reason"]
    assert dec["results"][0]["model"] == "hf" and dec["results"][0]["tokens_per_s"] > 0
    assert rep["ratios"]["decode_vs_hf"] is None
    # a decode row with only one prompt measured: a ratio, with a note that it is not the 2k / 8k one
    row = {"status": "ok", "engines": ["auto"], "results": [
        {"prompt": 2048, "batch": 16, "model": m, "engine": e, "decode_tokens_per_s": t}
        for m, e, t in (("hf", "default", 500.0), ("ours", "auto", 5000.0))]}
    ratio, note = bench.decode_ratio(row)
    assert ratio == 10.0 and "[2048]" in note and "not both 2k and 8k" in note
    row["results"] += [{**r, "prompt": 8192, "decode_tokens_per_s": r["decode_tokens_per_s"] / 2}
                       for r in row["results"][:1]] + [{**row["results"][1], "prompt": 8192}]
    assert bench.decode_ratio(row) == (10.0, None)


def test_ours_times_the_training_steps_loss(monkeypatch) -> None:
    """Every mode of ours calls the model as ``hymba train``'s step does (``return_logits=False``:
    the fused head + loss, no [B, T, V] logits); an earlier version timed the eager mode with the
    logits and the unfused loss."""
    import argparse

    import torch

    from hymba_plus import build_model
    from tests.helpers import tiny_recipe

    bench = load_bench()
    model = build_model(tiny_recipe("GA+mlp"))
    seen: list = []
    real = model.forward

    def spy(*a, **k):  # noqa: ANN002, ANN003, ANN202
        seen.append(k.get("return_logits", True))
        return real(*a, **k)

    monkeypatch.setattr(model, "forward", spy)
    monkeypatch.setattr(bench, "time_training", lambda fn, *a, **k: {"loss": fn().item()})
    args = argparse.Namespace(device="cpu", compile=False, param_dtype="bfloat16")
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    modes = bench.measure_ours(model, ids, args)["modes"]
    assert {"eager", "eager_bf16w"} <= set(modes) and seen and not any(seen)


def test_activation_checkpoint_modes_after_bf16_weights_run_in_float32() -> None:
    """``--param-dtype bfloat16 --activation-checkpoint N``: the checkpointed modes come after the bf16-weight
    ones have released their masters; they time the float32 model as eager / cuda_graph do. They were given
    the released MasterWeights and failed ('Tensor list must have at least one tensor')."""
    import argparse

    import torch

    from hymba_plus import build_model
    from tests.helpers import tiny_recipe

    bench = load_bench()
    model = build_model(tiny_recipe("GA+mlp", max_seq_len=64))
    args = argparse.Namespace(device="cpu", compile=False, param_dtype="bfloat16", activation_checkpoint=1,
                              warmup=0, steps=1, batch=2, seq_len=8, profile=False)
    ids = torch.randint(0, model.config.vocab_size, (2, 8))
    modes = bench.measure_ours(model, ids, args)["modes"]
    assert modes["eager_bf16w"]["tokens_per_s"] > 0
    assert modes["eager_ac1"].get("tokens_per_s", 0) > 0, modes["eager_ac1"]
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.parametrize("flag,value,needle", [
    ("--steps", "0", "--steps must be >= 1, got 0"),
    ("--warmup", "-1", "--warmup must be >= 0, got -1"),
    ("--batch", "0", "--batch must be >= 1, got 0"),
    ("--seq-len", "1", "--seq-len must be >= 2, got 1"),
    ("--decode-repeats", "0", "--decode-repeats must be >= 1, got 0"),
    ("--prompts", "0", "--prompts must all be >= 1, got [0]"),
    ("--decode-batches", "-2", "--decode-batches must all be >= 1, got [-2]"),
    ("--peak-flops", "-1", "--peak-flops must be > 0, got -1.0"),
    ("--hbm-bw", "nan", "--hbm-bw must be > 0, got nan"),
])
def test_a_bad_count_is_one_line_and_exit_2(flag, value, needle, capsys) -> None:
    """A zero or negative count is a usage error; --steps 0 divided by zero after the warm-up steps
    (the row recorded a ZeroDivisionError), --decode-repeats 0 raised AttributeError on the output."""
    bench = load_bench()
    with pytest.raises(SystemExit) as e:
        bench.parse_args(["--tiny", "--device", "cpu", flag, value])
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err, err


def test_bench_synchronizes_on_an_indexed_cuda_device(monkeypatch) -> None:
    """timing.bench with ``cuda:0`` (decode.py --device cuda:0, mixers.py, ...): CUDA events and a synchronize,
    as with ``cuda``; it compared the string to "cuda" and timed asynchronous launches with perf_counter."""
    import torch

    timing = load_benchmark("timing")
    syncs = []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream: object = None) -> None:
            pass

        def elapsed_time(self, other: object) -> float:
            return 7.0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: syncs.append(a))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert timing.bench(lambda: None, "cuda:0", warmup=0, iters=3) == 7.0 and len(syncs) == 4
    assert timing.on_cuda("cuda") and timing.on_cuda(torch.device("cuda", 1)) and not timing.on_cuda("cpu")


def test_scripts_branch_on_the_device_type_not_the_string() -> None:
    """``--device cuda:1``: a script that compared the string to exactly "cuda" took its CPU branch on a GPU
    (decode.py recorded the CPU's name, skipped the graph engine and --pin-autotune; mixers.py ran fp32 without
    the raw kernels; timing.profile_passes left out the CUDA kernels). They ask ``timing.on_cuda`` (or a
    ``torch.device``'s ``.type``)."""
    import re

    bad = re.compile(r"""(?<!\.type)\s(==|!=)\s*["']cuda["']""")
    hits = [f"{p.name}:{i}: {line.strip()}" for p in sorted((REPO / "benchmarks").glob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, "\n".join(hits)


def test_decode_and_mixers_record_an_indexed_cuda_device(monkeypatch, tmp_path) -> None:
    """decode.py and mixers.py with ``--device cuda:1`` (CUDA faked): the GPU's name (of that index) in the
    JSON, bf16, and decode.py's --pin-autotune pins."""
    import contextlib
    import sys

    import torch

    from hymba_plus.kernels import dispatch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: f"GPU {torch.device(d or 'cuda').index}")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # --device is checked against the machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)  # each script makes cuda:1 current first
    decode = load_benchmark("decode")
    assert decode.device_label("cuda:1") == "GPU 1" and decode.device_label("cpu") != "GPU 1"
    pinned, ran = [], []

    @contextlib.contextmanager
    def pin(*prefixes):  # noqa: ANN202
        pinned.append(prefixes)
        yield 3

    monkeypatch.setattr(dispatch, "pinned_autotune", pin)
    monkeypatch.setattr(decode, "run", ran.append)
    monkeypatch.setattr(sys, "argv", ["decode.py", "--device", "cuda:1", "--pin-autotune", "--tiny"])
    decode.main()
    assert pinned and len(ran) == 1

    mixers = load_benchmark("mixers")
    assert mixers.bench_dtype("cuda:1") == torch.bfloat16 and mixers.bench_dtype("cpu") == torch.float32
    monkeypatch.setattr(mixers, "run_mixers", lambda args, on_row=None: [])
    out = tmp_path / "mixers.json"
    monkeypatch.setattr(sys, "argv", ["mixers.py", "--device", "cuda:1", "--out", str(out)])
    mixers.main()
    rep = json.loads(out.read_text())
    assert rep["device"] == "GPU 1" and rep["dtype"] == "bf16"


def test_merge_reads_the_newest_file_of_the_device_across_midnight(tmp_path, capsys) -> None:
    """--merge looked only for today's ``<slug>-<date>.json``: a call after UTC midnight merged nothing, silently.
    It takes ``latest.json`` when that is this device's, else the newest dated file of the device, and says which."""
    import datetime

    bench = load_bench()
    base = ["--tiny", "--device", "cpu", "--out-dir", str(tmp_path)]
    assert bench.main([*base, "--rows", "gdn"]) == 0
    today = tmp_path / f"cpu-{datetime.date.today().isoformat()}.json"
    today.rename(tmp_path / "cpu-2000-01-02.json")  # yesterday's call, as copied back into the out dir
    (tmp_path / "cpu-2000-01-01.json").write_text(json.dumps({"device": "cpu", "rows": {"attn": {"status": "ok"}}}))
    (tmp_path / "latest.json").unlink()
    assert bench.main([*base, "--rows", "fsdp2", "--merge"]) == 0
    rep = json.loads(today.read_text())
    assert set(rep["rows"]) == {"gdn", "fsdp2"} and rep["merged_from_earlier_run"] == ["gdn"]
    assert rep["merged_from_file"] == "cpu-2000-01-02.json"
    assert "merging gdn from cpu-2000-01-02.json" in capsys.readouterr().out
    # latest.json of this device: taken first (rewritten by every call)
    today.unlink()
    assert bench.main([*base, "--rows", "attn", "--merge"]) == 0
    rep = json.loads(today.read_text())
    assert set(rep["rows"]) == {"gdn", "fsdp2", "attn"} and rep["merged_from_file"] == "latest.json"
    # nothing of this device: said so
    for p in tmp_path.glob("*.json"):
        p.unlink()
    assert bench.main([*base, "--rows", "fsdp2", "--merge"]) == 0
    assert "nothing to merge" in capsys.readouterr().out


@pytest.mark.parametrize("outcome", ["skipped", "error", "interrupted"])
def test_a_failed_rerun_keeps_the_earlier_measurement(tmp_path, monkeypatch, outcome) -> None:
    """--merge: a rerun of a row that ends skipped / error / interrupted replaced the earlier good row (a transient
    failure erased a measurement). The earlier row stays, the failed attempt beside it as ``failed_rerun``."""
    bench = load_bench()
    good = {"status": "ok", "ratio": 1.5, "peer": {}, "ours": {}, "run": {"date": "2000-01-01T00:00:00"}}
    (tmp_path / "latest.json").write_text(json.dumps({"device": bench.device_name("cpu"), "rows": {"gdn": good}}))

    def row_gdn(args):  # noqa: ANN001, ANN202
        if outcome != "skipped":
            args.progress({"results": [{"half": "done"}]})  # written while the row runs: the earlier row stays
            assert json.loads((tmp_path / "latest.json").read_text())["rows"]["gdn"]["ratio"] == 1.5
        raise {"skipped": bench.Skip("no fla"), "error": RuntimeError("boom"), "interrupted": KeyboardInterrupt()}[outcome]

    monkeypatch.setitem(bench.ROW_FUNCS, "gdn", row_gdn)
    rc = bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path), "--rows", "gdn", "--merge"])
    assert rc == (130 if outcome == "interrupted" else 0)
    rep = json.loads((tmp_path / "latest.json").read_text())
    row = rep["rows"]["gdn"]
    assert row["status"] == "ok" and row["ratio"] == 1.5 and row["run"]["date"] == "2000-01-01T00:00:00"
    assert row["failed_rerun"]["status"] == outcome and row["failed_rerun"]["run"]["date"] > "2000"
    if outcome == "interrupted":
        assert row["failed_rerun"]["results"] == [{"half": "done"}]
    assert rep["ratios"]["gdn_vs_fla"] == 1.5


def test_decode_ratio_takes_the_largest_measured_batch() -> None:
    """A skipped setting at a larger batch (predicted too slow, out of memory) made decode_ratio look only at that
    batch and find nothing; the batch is the largest among measured results."""
    bench = load_bench()
    res = [{"prompt": p, "batch": 16, "model": m, "engine": e, "decode_tokens_per_s": t}
           for p in (2048, 8192) for m, e, t in (("hf", "default", 500.0), ("ours", "auto", 5000.0))]
    res += [{"prompt": 2048, "batch": 32, "model": m, "engine": e, "skipped": "predicted too slow"}
            for m, e in (("hf", "default"), ("ours", "auto"))]
    assert bench.decode_ratio({"status": "ok", "engines": ["auto"], "results": res}) == (10.0, None)


def test_top_level_device_is_the_rows_one_device_or_says_mixed(tmp_path, monkeypatch) -> None:
    """The report's ``device`` was this call's even when merged rows ran on another card (the committed
    latest.json said H100 over the H200's decode row): it is the rows' one device, else says it is mixed;
    ``row_devices`` names each row's."""
    bench = load_bench()
    name = bench.device_name("cpu")
    assert bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path), "--rows", "gdn"]) == 0
    rep = json.loads((tmp_path / "latest.json").read_text())
    assert rep["device"] == name and rep["row_devices"] == {"gdn": name}
    report = {"device": name, "rows": {"gdn": {}, "decode": {}}, "row_devices": {"gdn": name, "decode": "NVIDIA H200"}}
    bench.write_report(report, tmp_path, "x.json")
    assert json.loads((tmp_path / "x.json").read_text())["device"] == "mixed: see row_devices"
    committed = json.loads((REPO / "benchmarks" / "results" / "latest.json").read_text())
    assert len(set(committed["row_devices"].values())) > 1 and committed["device"] == "mixed: see row_devices"


def test_decode_ratio_is_the_definitions_batch_16_and_2k_8k() -> None:
    """decode_vs_hf is defined as the worse of the 2k and 8k prompts at batch 16. It took the largest measured
    batch and every prompt up to 8k: ``--decode-batches 1 16 32`` gave the batch-32 ratio, ``--prompts 512 2048
    8192`` let 512 set it, both without a note; a batch 16 where nothing ran gave batch 1's with no note; and a
    batch 32 where only ours ran (HF out of memory) gave null. Now batch 16 and 2k / 8k when measured; otherwise
    the ratio that exists, with a note naming its batch and prompts."""
    bench = load_bench()

    def results(batch: int, prompt: int, hf: float | None, ours: float | None) -> list[dict]:
        return [{"prompt": prompt, "batch": batch, "model": m, "engine": e,
                 **({"decode_tokens_per_s": t} if t else {"skipped": "out of memory"})}
                for m, e, t in (("hf", "default", hf), ("ours", "auto", ours))]

    def ratio(*settings: tuple) -> tuple:
        res = [r for s in settings for r in results(*s)]
        return bench.decode_ratio({"status": "ok", "engines": ["auto"], "results": res})

    at16 = [(16, 2048, 500.0, 5000.0), (16, 8192, 400.0, 3200.0)]  # 10x and 8x: the ratio is 8
    assert ratio(*at16, (32, 2048, 800.0, 16000.0), (32, 8192, 700.0, 14000.0)) == (8.0, None)  # not batch 32's 20
    assert ratio(*at16, (16, 512, 600.0, 1200.0)) == (8.0, None)  # not 512's 2
    assert ratio(*at16, (32, 2048, None, 16000.0), (32, 8192, None, 14000.0)) == (8.0, None)  # HF OOM at 32
    value, note = ratio((16, 2048, None, None), (16, 8192, None, None), (1, 2048, 50.0, 600.0), (1, 8192, 50.0, 550.0))
    assert value == 11.0 and "batch 1" in note and "not both 2k and 8k at batch 16" in note


def test_bench_times_the_named_cuda_device_not_the_current_one(monkeypatch) -> None:
    """timing.bench / host_times with ``cuda:1`` while the current device is 0: the events were recorded on
    device 0's stream and ``torch.cuda.synchronize()`` waited for device 0, so the launches on device 1 were
    timed asynchronously (a near-zero time). Both now name the device: its stream, its synchronize."""
    import torch

    timing = load_benchmark("timing")
    synced, recorded = [], []

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            pass

        def record(self, stream: object = None) -> None:
            recorded.append(stream)

        def elapsed_time(self, other: object) -> float:
            return 7.0

    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(torch.device(device or "cuda")))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: f"stream of {torch.device(device or 'cuda')}")
    monkeypatch.setattr(torch.cuda, "Event", Event)
    assert timing.bench(lambda: None, "cuda:1", warmup=0, iters=2) == 7.0
    assert synced == [torch.device("cuda:1")] * 3 and recorded == ["stream of cuda:1"] * 4
    synced.clear()
    timing.host_times(lambda: None, "cuda:1", passes=2)
    assert synced == [torch.device("cuda:1")] * 3


def test_reviewed_scripts_name_the_cuda_device_they_run_on() -> None:
    """``--device cuda:1``: a bare ``torch.cuda.synchronize()`` / ``max_memory_allocated()`` /
    ``reset_peak_memory_stats()`` / ``get_device_name()`` acts on the current device (0), so side_by_side.py
    timed device 1's steps without waiting for them and read device 0's peak memory, train_memory.py and
    optimizer_step.py named GPU 0 in their JSON. Each call names the device."""
    import re

    bare = re.compile(r"(?<!`)torch\.cuda\.(synchronize|max_memory_allocated|max_memory_reserved|reset_peak_memory_stats"
                      r"|get_device_name)\((0)?\)|(bench|host_times|profile_passes)\([^)]*(dev\.type|\"cuda\")")
    files = ("side_by_side", "decode", "mixers", "quad_atlas", "timing", "train_memory", "optimizer_step")
    hits = [f"{name}.py:{i}: {line.strip()}" for name in files
            for i, line in enumerate((REPO / "benchmarks" / f"{name}.py").read_text().splitlines(), 1)
            if bare.search(line)]
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("script,argv,needle", [
    *[(s, ["--device", "cpux"], "cpux: expected auto, cpu, cuda or cuda:N")
      for s in ("side_by_side", "decode", "mixers", "quad_atlas", "train_memory", "optimizer_step")],
    ("side_by_side", ["--device", "cuda:99", "--tiny"], "cuda:99: "),
    ("side_by_side", ["--device", "cpu", "--tiny", "--engines", "grph"], "invalid choice: 'grph'"),
    ("train_memory", ["--device", "cpu", "--steps", "0"], "--steps must be >= 1, got 0"),
    ("train_memory", ["--device", "cpu", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
    ("train_memory", ["--device", "cpu", "--batch", "0"], "--batch must be >= 1, got 0"),
    ("train_memory", ["--device", "cpu", "--seq-len", "1"], "--seq-len must be >= 2, got 1"),
    ("train_memory", ["--device", "cpu", "--expand-v", "0"], "--expand-v must be > 0, got 0.0"),
    ("mixers", ["--device", "cpu", "--batch", "0"], "--batch must be >= 1, got 0"),
    ("mixers", ["--device", "cpu", "--seq-len", "0"], "--seq-len must be >= 1, got 0"),
    ("mixers", ["--device", "cpu", "--d-model", "-4"], "--d-model must be >= 1, got -4"),
    ("mixers", ["--device", "cpu", "--only", "gdnx"], "invalid choice: 'gdnx'"),
    ("decode", ["--device", "cpu", "--recipe", "missing.yaml"], "missing.yaml: file not found"),
    ("decode", ["--device", "cpu", "--tiny", "--prompts", "32", "500"],
     "--prompts 500 + --new 64 = 564 exceeds the recipe's max_seq_len 512"),
    ("quad_atlas", ["--device", "cpu", "--recipe", str(REPO / "configs" / "bd_tiny.yaml")], "has no atlas layer"),
])
def test_a_bad_argument_of_a_benchmark_is_one_line_and_exit_2(script, argv, needle, monkeypatch, capsys,
                                                              tmp_path) -> None:
    """A bad --device ran into torch.device's traceback (or CUDA's) inside each script; train_memory.py --steps 0
    divided by zero after the warm-up; mixers.py timed --batch 0 (empty tensors) and --only of an unknown mixer
    (nothing) without a word; decode.py raised on a missing --recipe and on a prompt longer than the model;
    quad_atlas.py raised ValueError on a recipe without atlas. Each is a one-line error, exit 2, before any work."""
    import sys

    bench = load_benchmark(script)
    argv = [*argv, *(["--out-dir", str(tmp_path)] if script == "side_by_side" else ["--out", str(tmp_path / "o.json")])]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as e:
        rc = bench.main(argv) if script in ("side_by_side", "quad_atlas", "optimizer_step") else bench.main()
        raise SystemExit(rc)
    err = capsys.readouterr().err
    assert e.value.code == 2 and needle in err and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if needle in line]) == 1


def test_a_rerun_that_ends_without_its_ratio_keeps_the_earlier_measurement(tmp_path, monkeypatch) -> None:
    """--merge: a rerun that ends ``ok`` but without the row's ratio (the peer out of memory, every mode of ours
    failing: the row function records those and returns) replaced the earlier measured row, and its ratio became
    null. The earlier row stays, the attempt beside it as ``failed_rerun``, as for a skipped or failed rerun."""
    bench = load_bench()
    good = {"status": "ok", "ratio": 1.5, "peer": {"tokens_per_s": 2.0}, "ours": {"modes": {}},
            "run": {"date": "2000-01-01T00:00:00"}}
    (tmp_path / "latest.json").write_text(json.dumps({"device": bench.device_name("cpu"), "rows": {"attn": good}}))
    peer_oom = {"peer_name": "HF", "peer": {"error": "OutOfMemoryError: ...", "parameters": 1},
                "ours": {"modes": {"eager": {"tokens_per_s": 3.0, "step_ms": 1.0}}, "parameters": 1}, "ratio": None}
    monkeypatch.setitem(bench.ROW_FUNCS, "attn", lambda args: peer_oom)
    assert bench.main(["--tiny", "--device", "cpu", "--out-dir", str(tmp_path), "--rows", "attn", "--merge"]) == 0
    rep = json.loads((tmp_path / "latest.json").read_text())
    row = rep["rows"]["attn"]
    assert row["ratio"] == 1.5 and row["run"]["date"] == "2000-01-01T00:00:00"
    assert row["failed_rerun"]["status"] == "ok" and row["failed_rerun"]["peer"]["error"].startswith("OutOfMemory")
    assert rep["ratios"]["attn_vs_hf_llama"] == 1.5


def test_every_reviewed_benchmark_json_records_the_package_versions(tmp_path, monkeypatch) -> None:
    """decode.py, mixers.py, train_memory.py and optimizer_step.py wrote the device (and at most torch's version),
    not the versions of the kernel packages their numbers depend on (fla, triton, mamba-ssm, liger-kernel; the
    fla peer's); train_memory.py wrote neither. Each JSON has ``versions`` (side_by_side.py's already did)."""
    import sys

    import torch

    def check(rep: dict) -> None:
        v = rep["versions"]
        assert v["torch"] == torch.__version__ and v["python"] and "cuda" in v
        assert {"triton", "transformers", "fla-core", "mamba-ssm", "liger-kernel"} <= set(v)

    opt = load_benchmark("optimizer_step")
    assert opt.main(["--device", "cpu", "--iters", "1", "--warmup", "0", "--out", str(tmp_path / "o.json")]) == 0
    check(json.loads((tmp_path / "o.json").read_text()))

    mixers = load_benchmark("mixers")
    monkeypatch.setattr(mixers, "run_mixers", lambda args, on_row=None: [])
    monkeypatch.setattr(sys, "argv", ["mixers.py", "--device", "cpu", "--out", str(tmp_path / "m.json")])
    mixers.main()
    check(json.loads((tmp_path / "m.json").read_text()))

    memory = load_benchmark("train_memory")
    monkeypatch.setattr(sys, "argv", ["train_memory.py", "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0",
                                      "--variants", "unfused", "--out", str(tmp_path / "t.json")])
    memory.main()
    check(json.loads((tmp_path / "t.json").read_text()))

    decode = load_benchmark("decode")
    monkeypatch.setattr(sys, "argv", ["decode.py", "--device", "cpu", "--tiny", "--batches", "1", "--prompts", "8",
                                      "--new", "2", "--repeats", "1", "--engines", "dynamic",
                                      "--out", str(tmp_path / "d.json")])
    decode.main()
    check(json.loads((tmp_path / "d.json").read_text()))


def test_streaming_limit_counts_a_tied_head() -> None:
    """decode.py's and side_by_side.py's weight-streaming limit leave out the input embedding (one row read per
    token); under tied embeddings that tensor is also the LM head, read whole every step, and was left out too
    (the default recipe setting: ``model.tie_embeddings`` true). It counts when it is the head."""
    from hymba_plus import build_model, load_recipe

    decode, sbs = load_benchmark("decode"), load_benchmark("side_by_side")
    recipe = {"name": "tiny", "model": {"vocab_size": 256, "d_model": 64, "max_seq_len": 64, "ffn": "moe",
                                        "block_pattern": "GD | GA"},
              "components": {"moe": {"n_experts": 8, "top_k": 2, "n_shared": 1, "d_expert": 64}}}
    untied = build_model(load_recipe({**recipe, "model": {**recipe["model"], "tie_embeddings": False}}))
    tied = build_model(load_recipe({**recipe, "model": {**recipe["model"], "tie_embeddings": True}}))
    assert tied.lm_head.weight is tied.embed.weight
    for b in (1, 16):  # untied: the head's own tensor counts, the embedding does not; tied: the one tensor counts
        assert decode.weight_bytes(tied, b) == decode.weight_bytes(untied, b)
    assert sbs.active_weight_bytes(tied) == sbs.active_weight_bytes(untied) == decode.weight_bytes(untied, 1)


@pytest.mark.parametrize("script", ["side_by_side", "decode", "mixers", "quad_atlas", "train_memory", "optimizer_step"])
def test_a_script_on_cuda_n_makes_it_the_current_device_first(script, monkeypatch, tmp_path) -> None:
    """``--device cuda:1``: CUDA graphs (side_by_side's cuda_graph mode, the decode engine's graph, quad_atlas's
    trainer) capture on the current device's streams and the allocator's peaks / empty_cache act on the current
    device, which stayed 0 while the tensors were on device 1. Each script sets ``cuda:N`` current before any work
    (CUDA faked here: set_device stops the run)."""
    import sys

    import torch

    class Selected(Exception):
        pass

    def set_device(device: object) -> None:
        raise Selected(str(torch.device(device)))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    bench = load_benchmark(script)
    argv = ["--device", "cuda:1"] + (["--tiny"] if script in ("side_by_side", "decode") else [])
    argv += ["--out-dir", str(tmp_path)] if script == "side_by_side" else ["--out", str(tmp_path / "out.json")]
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(Selected, match="cuda:1"):
        bench.main(argv) if script in ("side_by_side", "quad_atlas", "optimizer_step") else bench.main()


def test_decode_py_gives_no_step_time_when_the_difference_is_noise(monkeypatch, tmp_path) -> None:
    """decode.py's step time is (t(new) - t(1)) / (new - 1); a t(new) at or below t(1) (a few new tokens on a
    busy machine) gave a negative ms/step and a negative tok/s in the table and the JSON (side_by_side.py
    leaves those out). No step time then, and the row says why; the whole-call tok/s stays."""
    import sys

    decode = load_benchmark("decode")
    times = iter([300.0, 290.0, 300.0, 360.0])  # ms of gen(1), gen(new): first noise, then a real difference
    from hymba_plus.training import bench as timing  # (decode.py times through hymba bench's decode_times)

    monkeypatch.setattr(timing, "median_ms", lambda fn, device, warmup, iters: next(times))
    out = tmp_path / "d.json"
    monkeypatch.setattr(sys, "argv", ["decode.py", "--device", "cpu", "--tiny", "--batches", "1", "--prompts", "8",
                                      "--new", "4", "--repeats", "1", "--engines", "dynamic", "static",
                                      "--out", str(out)])
    decode.main()
    noisy, real = json.loads(out.read_text())["rows"]
    assert "ms_per_step" not in noisy and "decode_tok_s" not in noisy and "t(new) <= t(1)" in noisy["note"]
    assert noisy["total_tok_s"] == pytest.approx(4 / 0.29)
    assert real["ms_per_step"] == pytest.approx(20.0) and real["decode_tok_s"] == pytest.approx(50.0)


def test_decode_ratio_of_another_engine_than_auto_says_so() -> None:
    """decode_vs_hf is defined with our engine ``auto`` (or the default where generate has no engine keyword);
    a call with ``--engines dynamic graph`` took the dynamic engine's ratio without a note."""
    bench = load_bench()
    res = [{"prompt": p, "batch": 16, "model": m, "engine": e, "decode_tokens_per_s": t}
           for p in (2048, 8192) for m, e, t in (("hf", "default", 500.0), ("ours", "dynamic", 1000.0),
                                                  ("ours", "graph", 5000.0))]
    value, note = bench.decode_ratio({"status": "ok", "engines": ["dynamic", "graph"], "results": res})
    assert value == 2.0 and "engine dynamic" in note
    res = [{**r, "engine": "default"} for r in res if r["engine"] != "graph"]  # generate without an engine keyword
    assert bench.decode_ratio({"status": "ok", "engines": ["default"], "results": res}) == (2.0, None)
