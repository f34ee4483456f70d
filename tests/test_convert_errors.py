"""``hymba convert`` on bad input: one line on stderr, exit 1, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from hymba_plus.cli import main
from tests.helpers import tree_changes, tree_snapshot
from tests.hf_models import VOCAB, hf_model, save_hf, word_tokenizer

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return save_hf(hf_model("Qwen3ForCausalLM", seed=7), root / "sharded", max_shard_size="40KB")


def run_fails(capsys, tmp_path, args, *expect):  # noqa: ANN001
    """Run ``hymba convert ARGS``; it must fail with one line containing every ``expect`` and leave
    ``tmp_path`` unchanged."""
    before = tree_snapshot(tmp_path)
    capsys.readouterr()
    rc = main(["convert", *map(str, args)])
    err = capsys.readouterr().err
    assert rc == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in lines[0], lines[0]
    assert tree_changes(before, tree_snapshot(tmp_path)) == []
    return lines[0]


def copy(src, dst):  # noqa: ANN001
    shutil.copytree(src, dst)
    return dst


def test_unsupported_architecture(sharded, tmp_path, capsys):
    src = copy(sharded, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "config.json: architectures: 'GPT2LMHeadModel' is not "
              "supported", "Qwen3NextForCausalLM")


def test_missing_shard(sharded, tmp_path, capsys):
    src = copy(sharded, tmp_path / "src")
    victim = sorted(src.glob("model-*.safetensors"))[1]
    victim.unlink()
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], victim.name, "missing shard")


def test_shape_not_matching_config(sharded, tmp_path, capsys):
    src = copy(sharded, tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "model.layers.0.mlp.gate_proj.weight", "[64, 32]",
              "config.json implies [48, 32]")


def test_tokenizer_not_matching_vocabulary(sharded, tmp_path, capsys):
    src = copy(sharded, tmp_path / "src")
    word_tokenizer(src / "tokenizer.json", VOCAB + 10)
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "tokenizer.json", f"{VOCAB + 10} tokens",
              f"vocab_size is {VOCAB}")
    (src / "tokenizer.json").unlink()
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "tokenizer.json: missing", "--no-tokenizer")


def test_unexpected_tensor_and_unsupported_options(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    src = save_hf(hf_model("LlamaForCausalLM", seed=8), tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    state["model.layers.0.self_attn.extra.weight"] = state["model.norm.weight"].clone()
    save_file(state, str(src / "model.safetensors"))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "model.layers.0.self_attn.extra.weight", "unexpected")
    src2 = save_hf(hf_model("LlamaForCausalLM", seed=8, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                        "short_factor": [1.0] * 4,
                                                                        "long_factor": [2.0] * 4,
                                                                        "original_max_position_embeddings": 64}),
                   tmp_path / "src2")
    run_fails(capsys, tmp_path, [src2, tmp_path / "out"], "rope_type", "'longrope' is not supported")
    cfg = json.loads((src2 / "config.json").read_text())
    yarn = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 32}
    for extra, says in (({"mscale": 0.707, "mscale_all_dim": 0.707}, "rope_parameters.mscale: DeepSeek's yarn"),
                        ({"truncate": False}, "rope_parameters.truncate: only the truncated"),
                        ({"attention_factor": 1.5}, "rope_parameters.attention_factor: 1.5: only the default")):
        (src2 / "config.json").write_text(json.dumps({**cfg, "rope_parameters": {**yarn, **extra},
                                                      "rope_scaling": None}))
        run_fails(capsys, tmp_path, [src2, tmp_path / "out"], says)
    src3 = save_hf(hf_model("LlamaForCausalLM", seed=8, hidden_act="gelu"), tmp_path / "src3")
    run_fails(capsys, tmp_path, [src3, tmp_path / "out"], "config.json: hidden_act: 'gelu' is not supported")


def test_existing_output_is_never_overwritten(sharded, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    run_fails(capsys, tmp_path, [sharded, out], "already exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_not_a_model_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_fails(capsys, tmp_path, [tmp_path / "empty", tmp_path / "out"], "neither an HF model folder")
    run_fails(capsys, tmp_path, [tmp_path / "nope", tmp_path / "out"], "no such folder")


def test_output_in_folders_that_do_not_exist_yet(sharded, tmp_path, capsys):
    """README's `hymba convert runs/qwen3-next out/hf` failed where out/ did not exist ("its parent folder
    ... does not exist") while `hymba train --out` and `hymba prepare --out` make theirs: the missing
    folders are made, and removed again when the conversion fails (nothing left behind)."""
    assert main(["convert", str(sharded), str(tmp_path / "runs" / "qwen3" / "ckpt")]) == 0
    assert (tmp_path / "runs" / "qwen3" / "ckpt" / "recipe.yaml").is_file()
    assert main(["convert", str(tmp_path / "runs" / "qwen3" / "ckpt"), str(tmp_path / "out" / "hf")]) == 0
    assert (tmp_path / "out" / "hf" / "config.json").is_file()
    src = copy(sharded, tmp_path / "src")
    sorted(src.glob("model-*.safetensors"))[1].unlink()
    run_fails(capsys, tmp_path, [src, tmp_path / "new" / "deeper" / "out"], "missing shard")
    (tmp_path / "file").write_text("not a folder")
    run_fails(capsys, tmp_path, [sharded, tmp_path / "file" / "out"], "file", "not a folder")


@pytest.mark.parametrize("pattern, first", [
    ("GA | M3 | GA", "layer 1 (M3+mlp): mixer mamba3 is not expressible"),
    ("GA | GA+moe", "components.moe.bias_update_rate"),
])
def test_export_names_the_first_thing_hf_cannot_express(tmp_path, capsys, pattern, first):
    from hymba_plus import build_model

    comps = {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mamba3": {"state_size": 8, "head_dim": 16, "expand": 1},
             "moe": {"n_experts": 4, "top_k": 2, "n_shared": 0, "bias_update_rate": 0.01}}
    model = build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": pattern},
                         "components": comps})
    model.save_pretrained(tmp_path / "ckpt")
    line = run_fails(capsys, tmp_path, [tmp_path / "ckpt", tmp_path / "hf"], first)
    assert "cannot express it" in line


def test_export_of_mlp_biases_without_attention_layers_is_refused(tmp_path, capsys):
    """A Qwen3-Next recipe of gdn layers only with MLP biases: Qwen3-Next MLPs have none (the export wrote
    them, transformers dropped them as unexpected keys: logits off, silently)."""
    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GD | GD"},
                 "components": {"gdn": {"n_heads": 2}, "mlp": {"d_hidden": 48, "bias": True}}}).save_pretrained(
        tmp_path / "a")
    run_fails(capsys, tmp_path, [tmp_path / "a", tmp_path / "hf"], "components.mlp.bias: Qwen3NextForCausalLM MLPs "
              "have no bias")


def test_export_of_meta_tokens_and_windows_is_refused(tmp_path, capsys):
    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA", "meta_tokens": 2},
                 "components": {"gated_attn": {"n_heads": 2}}}).save_pretrained(tmp_path / "a")
    run_fails(capsys, tmp_path, [tmp_path / "a", tmp_path / "hf"], "model.meta_tokens")
    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA"},
                 "components": {"gated_attn": {"n_heads": 2, "window": 8}}}).save_pretrained(tmp_path / "b")
    run_fails(capsys, tmp_path, [tmp_path / "b", tmp_path / "hf"], "components.gated_attn.window")


def test_usage_errors_exit_2(sharded, tmp_path, capsys):
    assert main(["convert", str(sharded), str(tmp_path / "o"), "--max-shard-size", "lots"]) == 2
    assert main(["convert", str(sharded), str(tmp_path / "o"), "--architecture", "LlamaForCausalLM"]) == 2
    assert not (tmp_path / "o").exists()


def test_an_architecture_flag_the_export_cannot_take_exits_2(tmp_path, capsys):
    """--architecture naming no supported class, or one that cannot express the checkpoint's recipe, is a flag
    value the export cannot take: one line, exit 2 (both were exit 1), nothing written."""
    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GD | GA"},
                 "components": {"gdn": {"n_heads": 2}, "gated_attn": {"n_heads": 2}}}).save_pretrained(tmp_path / "a")
    for arch, says in (("Bogus", "--architecture Bogus: not supported (supported: "),
                       ("LlamaForCausalLM", "(LlamaForCausalLM cannot express it)")):
        rc = main(["convert", str(tmp_path / "a"), str(tmp_path / "hf"), "--architecture", arch])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and says in err and "Traceback" not in err, err
        assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("edit, expect", [
    (lambda c: c.update(num_experts_per_tok=1, norm_topk_prob=True),
     "config.json: norm_topk_prob: true with num_experts_per_tok 1"),
    (lambda c: c.update(quantization_config={"quant_method": "fp8"}),
     "config.json: quantization_config: a quantized checkpoint (fp8) is not supported"),
    (lambda c: c.update(mlp_only_layers=5), "config.json: mlp_only_layers: must be a list, got 5"),
    (lambda c: c.update(rope_theta="abc", rope_parameters=None), "config.json: rope_theta: must be a number > 0, got 'abc'"),
    # malformed values that were tracebacks (ZeroDivisionError, TypeError, ValueError)
    (lambda c: c.update(num_attention_heads=0, head_dim=None), "config.json: num_attention_heads: must be >= 1, got 0"),
    (lambda c: c.update(architectures=[["Qwen3MoeForCausalLM"]]), "config.json: architectures: ['Qwen3MoeForCausalLM'] "
                                                                 "is not supported"),
    (lambda c: c.update(architectures=None, model_type=["qwen3_moe"]), "config.json: model_type: ['qwen3_moe'] is not "
                                                                       "supported"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4,
                                         "original_max_position_embeddings": 16, "attention_factor": "x"}),
     "config.json: rope_parameters.attention_factor: must be a number, got 'x'"),
    # Qwen3-MoE's use_sliding_window makes every layer slide (transformers); windows are not imported
    (lambda c: c.update(use_sliding_window=True, sliding_window=8),
     "config.json: use_sliding_window: sliding-window layers are not supported"),
    # transformers drops rope_parameters' theta where rope_scaling is given: refused, not guessed
    (lambda c: c.pop("rope_theta", None) and None or c.update(rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                                                rope_scaling={"rope_type": "linear", "factor": 2.0}),
     "config.json: rope_parameters.rope_theta: 500.0 is dropped by transformers where rope_scaling is given"),
])
def test_config_values_refused_in_one_line(edit, expect, tmp_path, capsys):
    src = save_hf(hf_model("Qwen3MoeForCausalLM", seed=3), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    edit(cfg)
    (src / "config.json").write_text(json.dumps(cfg))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], expect)


def test_tied_config_with_a_different_stored_head_is_refused(tmp_path, capsys):
    """transformers unties a stored ``lm_head.weight`` that differs from the embedding and uses it; the
    import had dropped it (logits 100% off)."""
    import torch
    from safetensors.torch import load_file, save_file

    src = save_hf(hf_model("LlamaForCausalLM", seed=4, tie_word_embeddings=True), tmp_path / "src")
    st = load_file(src / "model.safetensors")
    st["lm_head.weight"] = st["model.embed_tokens.weight"] + 0.1 * torch.randn_like(st["model.embed_tokens.weight"])
    save_file(st, src / "model.safetensors", metadata={"format": "pt"})
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "tie_word_embeddings: true, but the checkpoint's "
              "lm_head.weight differs from its embedding")
    st["lm_head.weight"] = st["model.embed_tokens.weight"].clone()  # equal: dropped, as before
    save_file(st, src / "model.safetensors", metadata={"format": "pt"})
    assert main(["convert", str(src), str(tmp_path / "ok")]) == 0


def test_pickle_only_weights_are_named(tmp_path, capsys):
    src = save_hf(hf_model("LlamaForCausalLM", seed=5), tmp_path / "src")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "only pickle weights (pytorch_model.bin)",
              "reads safetensors only")


def test_export_of_a_byte_tokenizer_says_it_is_not_exported(tmp_path, capsys):
    """hymba's built-in bytes tokenizer has no transformers file: the export says so in one note (it
    was dropped silently, and importing the folder back failed on the missing tokenizer.json)."""
    from hymba_plus import build_model
    from hymba_plus.training.tokenizer import ByteTokenizer

    build_model({"name": "x", "model": {"vocab_size": 256, "d_model": 32, "block_pattern": "GA"},
                 "components": {"gated_attn": {"n_heads": 2}}}).save_pretrained(
        tmp_path / "a", extra_files={"tokenizer.json": ByteTokenizer().to_json()})
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert "built-in bytes tokenizer" in err and "--no-tokenizer" in err and err.count("\n") == 1, err
    assert not (tmp_path / "hf" / "tokenizer.json").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--no-tokenizer"]) == 0


def test_malformed_qwen3_next_layers_and_index_values_are_one_line(tmp_path, capsys):
    src = save_hf(hf_model("Qwen3NextForCausalLM", seed=3), tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    for edit, expect in ((dict(layer_types=None, full_attention_interval=0), "full_attention_interval: must be >= 1"),
                         (dict(layer_types=[["x"]] * cfg["num_hidden_layers"]), "layer_types: unknown layer type ['x']")):
        (src / "config.json").write_text(json.dumps({**cfg, **edit}))
        run_fails(capsys, tmp_path, [src, tmp_path / "out"], expect)
    (src / "config.json").write_text(json.dumps(cfg))
    sharded = save_hf(hf_model("Qwen3ForCausalLM", seed=7), tmp_path / "sh", max_shard_size="40KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = 3
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(capsys, tmp_path, [sharded, tmp_path / "out"], "not a safetensors index (weight_map's values must be "
                                                            "shard file names)")


def test_integer_weights_are_refused_at_import(tmp_path, capsys):
    """An integer tensor where a weight belongs was imported (rc 0) into a checkpoint that could not be loaded."""
    from safetensors.torch import load_file, save_file

    src = save_hf(hf_model("LlamaForCausalLM", seed=3), tmp_path / "src")
    st = load_file(src / "model.safetensors")
    st["model.norm.weight"] = st["model.norm.weight"].to(torch.int32)
    save_file(st, src / "model.safetensors", metadata={"format": "pt"})
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], "tensor 'model.norm.weight' is torch.int32, not a floating-point weight")


def test_integer_weights_are_refused_at_export(tmp_path, capsys):
    """An integer tensor where a weight belongs (a checkpoint from_pretrained refuses) was exported (rc 0)
    into an HF folder transformers loads by casting it."""
    from safetensors.torch import load_file, save_file

    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA"},
                 "components": {"gated_attn": {"n_heads": 2}}}).save_pretrained(tmp_path / "a")
    st = load_file(tmp_path / "a" / "model.safetensors")
    st["norm.weight"] = st["norm.weight"].to(torch.int32)
    save_file(st, tmp_path / "a" / "model.safetensors", metadata={"format": "hymba_plus"})
    run_fails(capsys, tmp_path, [tmp_path / "a", tmp_path / "hf"], "tensor 'norm.weight' is torch.int32, not a "
              "floating-point weight")


def test_export_of_a_tied_recipe_with_a_different_stored_head_is_refused(tmp_path, capsys):
    """``tie_embeddings: true`` with a stored ``lm_head.weight`` that differs from the embedding (a
    checkpoint from_pretrained refuses) was exported (rc 0) with the embedding as the head."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA", "tie_embeddings": True},
                 "components": {"gated_attn": {"n_heads": 2}}}).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    st = load_file(path)
    st["lm_head.weight"] = st["embed.weight"] + 0.1
    save_file(st, path, metadata=meta)
    run_fails(capsys, tmp_path, [tmp_path / "a", tmp_path / "hf"], "model.safetensors: holds an lm_head.weight that "
              "differs from embed.weight, but recipe.yaml ties them (model.tie_embeddings: true)")
    st["lm_head.weight"] = st["embed.weight"].clone()  # equal: the one tied tensor, exported
    save_file(st, path, metadata=meta)
    assert main(["convert", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0


def test_tensor_errors_name_the_file_that_holds_the_tensor(sharded, tmp_path, capsys):
    """A wrong-shape, unexpected or integer tensor is named with the shard file holding it, a missing
    one with the index (or the single file) that lacks it: they named the folder only, which leaves
    the shard of a many-file checkpoint to find."""
    from safetensors.torch import load_file, save_file

    src = copy(sharded, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.gate_proj.weight"
    shard = src / index["weight_map"][name]
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], f"{shard}: tensor '{name}' has shape [64, 32] but "
              "config.json implies [48, 32]")
    (src / "config.json").write_text(json.dumps(cfg))
    st = load_file(shard)
    st["model.layers.0.self_attn.extra.weight"] = st[name].clone()
    st[name] = st[name].to(torch.int32)
    save_file(st, shard, metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = shard.name
    del index["weight_map"]["model.norm.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], f"{src / 'model.safetensors.index.json'}: tensor "
              "'model.norm.weight' missing (config.json implies it)")
    index["weight_map"]["model.norm.weight"] = shard.name
    st["model.norm.weight"] = torch.ones(32)
    save_file(st, shard, metadata={"format": "pt"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], f"{shard}: tensor 'model.layers.0.self_attn.extra.weight' "
              "is not used")
    del index["weight_map"]["model.layers.0.self_attn.extra.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    run_fails(capsys, tmp_path, [src, tmp_path / "out"], f"{shard}: tensor '{name}' is torch.int32, not a "
              "floating-point weight")
    single = save_hf(hf_model("LlamaForCausalLM", seed=8), tmp_path / "single")
    st = load_file(single / "model.safetensors")
    del st["model.norm.weight"]
    save_file(st, single / "model.safetensors", metadata={"format": "pt"})
    run_fails(capsys, tmp_path, [single, tmp_path / "out"], f"{single / 'model.safetensors'}: tensor "
              "'model.norm.weight' missing (config.json implies it)")


def test_export_refuses_a_tensor_the_recipe_does_not_use(tmp_path, capsys):
    """A checkpoint holding a tensor its recipe.yaml does not use (here: a layer removed from the pattern
    by hand; a checkpoint from_pretrained refuses) was exported (rc 0) without it, a 2-layer HF model."""
    from hymba_plus import build_model

    build_model({"name": "x", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA | GA | GA"},
                 "components": {"gated_attn": {"n_heads": 2}}}).save_pretrained(tmp_path / "a")
    path = tmp_path / "a" / "recipe.yaml"
    path.write_text(path.read_text().replace("GA | GA | GA", "GA | GA"))
    run_fails(capsys, tmp_path, [tmp_path / "a", tmp_path / "hf"], f"{tmp_path / 'a' / 'model.safetensors'}: tensor "
              "'blocks.2.", "is not used by the model recipe.yaml describes")
