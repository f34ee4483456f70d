"""``hymba convert``: import / export of HF checkpoints for every supported class, against the
HF implementation itself (tiny random-init models, float32, no network)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hymba_plus import from_pretrained
from hymba_plus.cli import main
from hymba_plus.convert import export_hf, import_hf
from tests.hf_models import CLASSES, VOCAB, hf_model, save_hf

tf = pytest.importorskip("transformers")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def tensors(path) -> dict[str, torch.Tensor]:  # noqa: ANN001
    out = {}
    files = sorted(path.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module", params=CLASSES)
def pair(request, tmp_path_factory):
    """(architecture, HF model, its folder, our imported checkpoint) per class."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    model = hf_model(arch)
    src = save_hf(model, root / "hf")
    assert main(["convert", str(src), str(root / "ours")]) == 0
    return arch, model, src, root / "ours"


def test_import_logits_cache_and_generate_match_hf(pair):
    arch, hf, _, ours_dir = pair
    ours = from_pretrained(ours_dir).eval()
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
        assert rel(got, want) <= 1e-4, arch
        cache = ours.new_cache(2)  # prefill 7 tokens, then decode one token at a time
        steps = [ours(ids[:, :7], cache=cache).logits] + [ours(ids[:, t:t + 1], cache=cache).logits
                                                          for t in range(7, 20)]
        assert rel(torch.cat(steps, 1), want) <= 1e-4, arch
    prompt = ids[:, :6]
    g_hf = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    g_ours = ours.generate(prompt, max_new_tokens=10, temperature=0.0)
    assert torch.equal(g_ours, g_hf), arch


def test_import_writes_a_checkpoint_hymba_check_and_generate_accept(pair, capsys):
    arch, _, _, ours_dir = pair
    capsys.readouterr()
    assert main(["check", str(ours_dir / "recipe.yaml")]) == 0
    assert main(["generate", str(ours_dir), "--prompt", "t1 t2 t3", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip()
    assert sorted(p.name for p in ours_dir.iterdir()) == ["model.safetensors", "recipe.yaml", "tokenizer.json"]


def test_export_loads_in_hf_without_missing_or_unexpected_weights(pair, tmp_path):
    arch, hf, src, ours_dir = pair
    assert main(["convert", str(ours_dir), str(tmp_path / "hf")]) == 0
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    back, info = getattr(tf, arch).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert rel(back.eval()(ids).logits, hf(ids).logits) <= 1e-4
    # the exported tensors are the original checkpoint's, bit for bit, under the same names
    orig, exported = tensors(src), tensors(tmp_path / "hf")
    assert sorted(orig) == sorted(exported)
    assert all(torch.equal(orig[k], exported[k]) for k in orig)


def test_round_trip_import_export_import_is_bit_exact(pair, tmp_path):
    _, _, _, ours_dir = pair
    export_hf(ours_dir, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "again")
    a, b = tensors(ours_dir), tensors(tmp_path / "again")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    body = [ln for ln in (ours_dir / "recipe.yaml").read_text().splitlines() if not ln.startswith("#")]
    again = [ln for ln in (tmp_path / "again" / "recipe.yaml").read_text().splitlines() if not ln.startswith("#")]
    assert body[1:] == again[1:]  # the name (the source folder's) aside


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen3NextForCausalLM"])
def test_sharded_checkpoints_import_and_export(arch, tmp_path):
    model = hf_model(arch, seed=3, tie_word_embeddings=True)
    save_hf(model, tmp_path / "one")
    save_hf(model, tmp_path / "sharded", max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    import_hf(tmp_path / "one", tmp_path / "a")
    import_hf(tmp_path / "sharded", tmp_path / "b")
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert "lm_head.weight" not in a and all(torch.equal(a[k], b[k]) for k in a)
    assert main(["convert", str(tmp_path / "b"), str(tmp_path / "hf"), "--max-shard-size", "30KB"]) == 0
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    back, info = getattr(tf, arch).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert rel(back.eval()(ids).logits, model(ids).logits) <= 1e-4


def test_transformers5_fused_expert_layout_imports(tmp_path):
    """Experts stored as 3-D ``gate_up_proj`` [E, 2h, d] / ``down_proj`` [E, d, h] (transformers 5's
    in-memory layout) import to the same model as the per-expert layout checkpoints use."""
    from safetensors.torch import save_file

    model = hf_model("Qwen3MoeForCausalLM", seed=4)
    save_hf(model, tmp_path / "hf")
    (tmp_path / "fused").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "fused" / name).write_text((tmp_path / "hf" / name).read_text())
    per_expert = tensors(tmp_path / "hf")
    fused = {k: v for k, v in per_expert.items() if ".experts." not in k}
    for i in (0, 2, 3):  # the MoE layers (layer 1 is mlp-only)
        p = f"model.layers.{i}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack([torch.cat([per_expert[f"{p}.{e}.gate_proj.weight"],
                                                             per_expert[f"{p}.{e}.up_proj.weight"]]) for e in range(4)])
        fused[f"{p}.down_proj"] = torch.stack([per_expert[f"{p}.{e}.down_proj.weight"] for e in range(4)])
    save_file(fused, str(tmp_path / "fused" / "model.safetensors"))
    import_hf(tmp_path / "hf", tmp_path / "a")
    import_hf(tmp_path / "fused", tmp_path / "b")
    a, b = tensors(tmp_path / "a"), tensors(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_pooled_balance_loss_equals_hf_router_aux_loss(tmp_path):
    """``balance_loss: pooled`` (what an imported Qwen3-MoE recipe says) is HF's loss: pooled over
    layers, f summing to top_k, one router_aux_loss_coef."""
    model = hf_model("Qwen3MoeForCausalLM", seed=5, router_aux_loss_coef=0.05, output_router_logits=True,
                     mlp_only_layers=[])
    save_hf(model, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    assert ours.recipe.component("moe").balance_loss == "pooled"
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids, labels=ids).aux_loss * 0.05
        got = ours(ids, labels=ids).aux_loss
    assert float(got) > 0 and abs(float(got) - float(want)) <= 1e-5 * float(want)


@pytest.mark.parametrize("arch, rope", [
    ("LlamaForCausalLM", {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    ("Qwen3ForCausalLM", {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    ("LlamaForCausalLM", {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                          "original_max_position_embeddings": 32}),
    ("Qwen3NextForCausalLM", {"rope_type": "yarn", "rope_theta": 500.0, "factor": 8.0, "beta_fast": 16.0,
                              "beta_slow": 2.0, "original_max_position_embeddings": 24,
                              "partial_rotary_factor": 0.5}),
    # a ramp whose clamped ends cross (high -6 < low 0): transformers divides by the negative width
    ("LlamaForCausalLM", {"rope_type": "yarn", "rope_theta": 2.0, "factor": 4.0,
                          "original_max_position_embeddings": 2}),
])
def test_scaled_rope_imports_and_exports(arch, rope, tmp_path):
    """Llama 3's RoPE scaling (the ``original_max_position_embeddings`` of 16 puts the 4 frequency
    pairs of a head_dim 8 in all three bands), linear scaling and YaRN (its ramp and attention
    factor as transformers computes them; partial rotation on Qwen3-Next), both ways."""
    model = hf_model(arch, seed=9, rope_parameters=rope)
    save_hf(model, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    assert ours.recipe.component("gated_attn").rope.scaling.kind == rope["rope_type"]
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        assert rel(ours(ids).logits, want) <= 1e-4
    export_hf(tmp_path / "ours", tmp_path / "back")
    back = getattr(tf, arch).from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert rel(back(ids).logits, want) <= 1e-4


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3NextForCausalLM"])
def test_partial_rotary_factor_only_where_transformers_applies_it(arch, tmp_path):
    """transformers rotates the whole head of Llama / Qwen3 / Qwen3-MoE whatever
    ``partial_rotary_factor`` says, and part of it for Qwen3-Next: the import follows (it had
    rotated half the head of the first two, 0.35 off HF's logits for Qwen3), and a recipe
    with ``rope.fraction`` below 1 exports only to Qwen3-Next."""
    rope = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    model = hf_model(arch, seed=11, rope_parameters=rope, partial_rotary_factor=0.5)
    save_hf(model, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    want_frac = 0.5 if arch == "Qwen3NextForCausalLM" else 1.0
    assert ours.recipe.component("gated_attn").rope.fraction == want_frac
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(ours(ids).logits, model(ids).logits) <= 1e-4
    if arch != "Qwen3NextForCausalLM":
        from hymba_plus import load_recipe
        from hymba_plus.convert.families import family_for_recipe

        r = load_recipe((tmp_path / "ours" / "recipe.yaml").read_text().replace("fraction: 1.0", "fraction: 0.5"))
        assert any("rope.fraction: 0.5: " in p and "rotates the whole head" in p
                   for p in family_for_recipe(r, arch).problems(r))


def test_no_rotary_dims_export_and_import_back(tmp_path):
    """``rope.fraction: 0`` (no RoPE) exports to Qwen3-Next as ``partial_rotary_factor: 0.0``, which
    transformers runs as we do; importing that folder back was refused (must be > 0)."""
    from hymba_plus import build_model

    r = {"name": "nope", "model": {"vocab_size": VOCAB, "d_model": 32, "block_pattern": "GA+mlp | GD+mlp"},
         "components": {"gated_attn": {"n_heads": 4, "qk_norm_eps": 1e-6, "rope": {"fraction": 0.0}},
                        "gdn": {"n_heads": 2}, "mlp": {"d_hidden": 48}}}
    torch.manual_seed(0)
    model = build_model(r).eval()
    model.save_pretrained(tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "hf")
    back = tf.Qwen3NextForCausalLM.from_pretrained(tmp_path / "hf").eval()
    import_hf(tmp_path / "hf", tmp_path / "again", tokenizer=False)
    again = from_pretrained(tmp_path / "again").eval()
    assert again.recipe.component("gated_attn").rope.fraction == 0.0
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(ids).logits
        assert rel(back(ids).logits, want) <= 1e-4 and rel(again(ids).logits, want) <= 1e-4


def test_rope_scaling_replaces_rope_parameters_as_in_transformers(tmp_path):
    """A config with both keys: transformers runs ``rope_scaling`` (linear x4 here), so does the import."""
    model = hf_model("LlamaForCausalLM", seed=12)
    save_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = tf.LlamaForCausalLM.from_pretrained(tmp_path / "hf").eval()
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    assert ours.recipe.component("gated_attn").rope.scaling.kind == "linear"
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(ours(ids).logits, hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen3NextForCausalLM"])
def test_missing_config_keys_take_the_config_classes_defaults(arch, tmp_path):
    """A hand-written config without ``norm_topk_prob`` / ``partial_rotary_factor``: transformers'
    class defaults (Qwen3-MoE false; Qwen3-Next true and 0.25), not ours."""
    model = hf_model(arch, seed=13, norm_topk_prob=arch == "Qwen3NextForCausalLM")
    save_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop("norm_topk_prob")
    cfg.pop("partial_rotary_factor", None)
    for k in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(k), dict):
            cfg[k].pop("partial_rotary_factor", None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = getattr(tf, arch).from_pretrained(tmp_path / "hf").eval()
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(ours(ids).logits, hf(ids).logits) <= 1e-4


@pytest.mark.parametrize("arch", CLASSES)
def test_missing_shape_and_length_keys_take_the_config_classes_defaults(arch, tmp_path):
    """A hand-written config.json without ``head_dim`` / ``num_key_value_heads`` /
    ``max_position_embeddings``: transformers' class defaults (Qwen3 128 / 32 / 32768, Qwen3-MoE
    d / heads / 4 / 32768, Qwen3-Next 256 / 2 / 32768), not Llama's (d / heads, every head, 2048:
    checkpoints of the class's shapes were refused, prompts past 2048 tokens too)."""
    from hymba_plus.convert.importer import hf_recipe

    save_hf(hf_model(arch, seed=1), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    for k in ("head_dim", "num_key_value_heads", "max_position_embeddings"):
        cfg.pop(k, None)
    cfg.update(hidden_size=256, num_attention_heads=32)  # (every class's default kv heads divide 32)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = tf.AutoConfig.from_pretrained(tmp_path / "hf")
    _, r = hf_recipe(tmp_path / "hf")
    a = r.component("gated_attn")
    assert (a.dim(256), a.kv_heads(), r.model.max_seq_len) == (
        getattr(hf, "head_dim", None) or 256 // 32, hf.num_key_value_heads, hf.max_position_embeddings)


def test_qwen3_sliding_window_imports_where_transformers_slides_no_layer(tmp_path, capsys):
    """Qwen3Config slides layer i only where ``use_sliding_window`` (and a ``sliding_window``) and
    i >= ``max_window_layers`` (its ``layer_types``): ``use_sliding_window: true`` with
    ``max_window_layers >= num_hidden_layers`` (or a null window) slides no layer and was refused. It
    imports as no window, matching HF; a config where a layer does slide is still refused, as is
    Qwen3-MoE's (every layer slides there). Found by a review."""
    for i, extra in enumerate((dict(max_window_layers=4), dict(max_window_layers=28), dict(sliding_window=None))):
        model = hf_model("Qwen3ForCausalLM", seed=17, use_sliding_window=True, **{"sliding_window": 8, **extra})
        assert "sliding_attention" not in model.config.layer_types
        save_hf(model, tmp_path / f"hf{i}")
        cfg = json.loads((tmp_path / f"hf{i}" / "config.json").read_text())
        cfg.pop("layer_types", None)  # a config.json of transformers 4 (no layer_types): the same layers
        (tmp_path / f"hf{i}" / "config.json").write_text(json.dumps(cfg))
        import_hf(tmp_path / f"hf{i}", tmp_path / f"ours{i}")
        ours = from_pretrained(tmp_path / f"ours{i}").eval()
        assert ours.recipe.component("gated_attn").window is None
        ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            assert rel(ours(ids).logits, model(ids).logits) <= 1e-4
    save_hf(hf_model("Qwen3ForCausalLM", seed=17, use_sliding_window=True, sliding_window=8, max_window_layers=2),
            tmp_path / "slides")
    capsys.readouterr()
    assert main(["convert", str(tmp_path / "slides"), str(tmp_path / "no")]) == 1
    assert "use_sliding_window: sliding-window layers are not supported" in capsys.readouterr().err


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "Qwen3NextForCausalLM"])
def test_missing_expert_and_linear_attention_keys_take_the_config_classes_defaults(arch, tmp_path):
    """A hand-written config.json without ``num_experts`` (and the other MoE sizes) or Qwen3-Next's
    ``linear_*`` keys: transformers' class defaults (Qwen3MoeConfig 128 experts of 768, top 8;
    Qwen3NextConfig 512 of 512, top 10, shared 512, GDN 16 / 32 heads of 128), as the HF model is built.
    Without num_experts every layer was imported dense, and the import failed later on an "unexpected
    weight"; a missing linear_* key was refused. Found by a review."""
    from hymba_plus.convert.importer import hf_recipe

    save_hf(hf_model(arch, seed=1), tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    keys = ["num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
            "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim", "linear_value_head_dim",
            "linear_conv_kernel_dim"]
    for k in keys:
        cfg.pop(k, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = tf.AutoConfig.from_pretrained(tmp_path / "hf")
    _, r = hf_recipe(tmp_path / "hf")
    m = r.component("moe")
    assert "moe" in {s.ffn for s in r.layers}
    assert (m.n_experts, m.top_k, m.d_expert) == (hf.num_experts, hf.num_experts_per_tok, hf.moe_intermediate_size)
    if arch == "Qwen3NextForCausalLM":
        g, d = r.component("gdn"), r.model.d_model
        assert m.d_shared == hf.shared_expert_intermediate_size
        assert (g.n_heads, g.v_heads(), g.key_dim(d), g.value_dim(d), g.conv_size) == (
            hf.linear_num_key_heads, hf.linear_num_value_heads, hf.linear_key_head_dim, hf.linear_value_head_dim,
            hf.linear_conv_kernel_dim)


def test_yarn_extends_the_context_and_old_files_import_as_transformers_reads_them(tmp_path):
    """Qwen's YaRN recipe (``rope_scaling`` yarn x4 on an unchanged ``max_position_embeddings``) runs
    past it in transformers: the import's ``max_seq_len`` is factor x original (it refused the longer
    prompts); a folder with ``model.safetensors`` and a stale index loads the single file, as
    transformers does; the ``rotary_emb.inv_freq`` buffers of checkpoints saved before transformers 4.31
    are ignored; a ``generation_config.json`` without an eos id means none (not config.json's)."""
    from safetensors.torch import load_file, save_file

    model = hf_model("Qwen3ForCausalLM", seed=21)
    save_hf(model, tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.update(max_position_embeddings=32, rope_scaling={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                         "original_max_position_embeddings": 32})
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = tf.Qwen3ForCausalLM.from_pretrained(tmp_path / "hf").eval()
    st = load_file(tmp_path / "hf" / "model.safetensors")  # an old checkpoint's buffers
    st.update({f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(4) for i in range(cfg["num_hidden_layers"])})
    save_file(st, tmp_path / "hf" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "hf" / "model.safetensors.index.json").write_text(json.dumps(  # a stale index (shards gone)
        {"weight_map": {k: "model-00001-of-00002.safetensors" for k in st}}))
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    import_hf(tmp_path / "hf", tmp_path / "ours")
    ours = from_pretrained(tmp_path / "ours").eval()
    assert ours.config.max_seq_len == 128
    assert not (tmp_path / "ours" / "generation_config.json").exists()
    ids = torch.randint(0, VOCAB, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel(ours(ids).logits, hf(ids).logits) <= 1e-4


def test_export_refuses_an_odd_rotary_width(tmp_path):
    """rope.fraction 0.4 of head dim 8 rotates 3 dims: we rotate 2, transformers' Qwen3-Next other ones
    (its logits were 8.6% off ours): refused in one line."""
    from hymba_plus import build_model
    from hymba_plus.convert.loader import ConvertError

    r = {"name": "odd", "model": {"vocab_size": 128, "d_model": 32, "block_pattern": "GD+mlp | GA+mlp"},
         "components": {"gated_attn": {"n_heads": 4, "rope": {"fraction": 0.4}}, "gdn": {"n_heads": 2},
                        "mlp": {"d_hidden": 48}}}
    build_model(r).save_pretrained(tmp_path / "ours")
    with pytest.raises(ConvertError, match=r"rope\.fraction: 0\.4 of head dim 8 is an odd number of dims"):
        export_hf(tmp_path / "ours", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_tokenizer_settings_survive_import_and_export(tmp_path):
    """The files beside tokenizer.json (special tokens, model_max_length, the chat template) come through
    an import and an export as they were: AutoTokenizer on the exported folder has the source's special
    tokens and template (they were dropped: bos / eos / pad None, no template)."""
    save_hf(hf_model("Qwen3ForCausalLM", seed=5), tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "w1", "eos_token": "w2", "pad_token": "w3",
        "model_max_length": 128}))
    (tmp_path / "hf" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    import_hf(tmp_path / "hf", tmp_path / "ours")
    export_hf(tmp_path / "ours", tmp_path / "back")
    src, back = (tf.AutoTokenizer.from_pretrained(tmp_path / p) for p in ("hf", "back"))
    assert (back.bos_token, back.eos_token, back.pad_token, back.model_max_length) == ("w1", "w2", "w3", 128)
    assert back.chat_template == src.chat_template is not None


def test_export_names_the_end_token_hymba_generate_stops_at(tmp_path):
    """A trained checkpoint has no generation_config.json; ``hymba generate`` ends a row at its
    tokenizer's end token, and the export now names it (it wrote no eos_token_id, so transformers'
    generate ran past it): from the vocabulary's ``</s>``, from ``tokenizer_config.json``'s
    ``eos_token`` over that, and the checkpoint's own ``generation_config.json`` over both."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from hymba_plus import build_model

    r = {"name": "eos", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA+mlp | GA+mlp"},
         "components": {"gated_attn": {"n_heads": 4}, "mlp": {"d_hidden": 48}}}
    vocab = {f"w{i}": i for i in range(60)} | {"</s>": 60}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()

    def exported(name: str, side: dict | None = None, gen: dict | None = None) -> tuple[object, object]:
        src = tmp_path / name
        build_model(r).save_pretrained(src)
        tok.save(str(src / "tokenizer.json"))
        for fname, data in (side or {}).items():
            (src / fname).write_text(json.dumps(data))
        if gen is not None:
            (src / "generation_config.json").write_text(json.dumps(gen))
        export_hf(src, tmp_path / f"{name}_hf")
        out = [json.loads((tmp_path / f"{name}_hf" / f).read_text()) for f in ("generation_config.json", "config.json")]
        return out[0].get("eos_token_id"), out[1].get("eos_token_id")

    assert exported("vocab") == (60, 60)
    assert exported("side", {"tokenizer_config.json": {"eos_token": "w7"}}) == (7, 7)
    assert exported("gen", gen={"eos_token_id": [3, 4]}) == ([3, 4], [3, 4])
