"""``hymba convert --hybridize`` and ``hymba train --distill``: which tensors map, the errors,
and the CPU recovery experiment in small (``benchmarks/hybridize.py`` runs the full one)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from hymba_plus import build_model, from_pretrained
from hymba_plus.cli import main
from hymba_plus.convert import ConvertError, hybridize
from hymba_plus.core.recipe import RecipeError, load_recipe
from hymba_plus.models.lm import generation_config
from hymba_plus.training.tokenizer import ByteTokenizer

ATTN = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}
COMPS = {"gated_attn": ATTN, "gdn": {"n_heads": 4, "head_dim": 16}, "mlp": {"d_hidden": 128},
         "mamba3": {"state_size": 16, "head_dim": 16, "expand": 1}}
TRAIN = {"batch_size": 64, "seq_len": 16, "mqar_pairs": 4, "warmup_steps": 5, "eval_batches": 4, "save_every": 1000,
         "data": "mqar"}


def recipe(pattern: str, **train) -> dict:
    r = {"name": "r", "model": {"vocab_size": 32, "d_model": 64, "block_pattern": pattern, "max_seq_len": 64},
         "components": {k: v for k, v in COMPS.items() if k != "mamba3" or "M3" in pattern}}
    if train:
        r["train"] = {**TRAIN, **train}
    return r


def test_attention_weights_map_into_gdn_and_mamba3(tmp_path):
    torch.manual_seed(0)
    src = build_model(recipe("GA | GA | GA"))
    src.save_pretrained(tmp_path / "src")
    lines = hybridize(tmp_path / "src", tmp_path / "h", recipe("GD | GA | M3"))
    assert lines == ["layer 0: attention -> gdn: q<-q_proj, k<-k_proj, v<-v_proj, out_proj<-o_proj, conv=identity",
                     "layer 2: attention -> mamba3: x<-v_proj, B<-k_proj, C<-q_proj, out_proj<-o_proj"]
    s, h = src.state_dict(), from_pretrained(tmp_path / "h").state_dict()
    kv = [0, 0, 1, 1]  # GQA: 4 heads read 2 key/value heads

    def heads(w, idx):  # noqa: ANN001, ANN202
        return w.reshape(-1, 16, w.shape[-1])[idx].reshape(-1, w.shape[-1])

    q, k, v = h["blocks.0.mixer.qkv_proj.weight"].split([64, 64, 64])
    assert torch.equal(q, s["blocks.0.mixer.q_proj.weight"])
    assert torch.equal(k, heads(s["blocks.0.mixer.k_proj.weight"], kv))
    assert torch.equal(v, heads(s["blocks.0.mixer.v_proj.weight"], kv))
    assert torch.equal(h["blocks.0.mixer.out_proj.weight"], s["blocks.0.mixer.o_proj.weight"])
    conv = h["blocks.0.mixer.conv_weight"]
    assert torch.equal(conv[:, -1], torch.ones(192)) and not conv[:, :-1].any()
    m3 = from_pretrained(tmp_path / "h").blocks[2].mixer
    w = h["blocks.2.mixer.in_proj.weight"]
    z, x, B, C = (sum(m3.splits[:i]) for i in range(4))
    assert torch.equal(w[x:x + 64], heads(s["blocks.2.mixer.v_proj.weight"], kv))
    assert torch.equal(w[B:B + 16], s["blocks.2.mixer.k_proj.weight"][:16])
    assert torch.equal(w[C:C + 16], s["blocks.2.mixer.q_proj.weight"][:16])
    assert torch.equal(h["blocks.2.mixer.out_proj.weight"], s["blocks.2.mixer.o_proj.weight"])
    # kept layers, norms, MLPs, embeddings: copied exactly
    for key in s:
        if not key.startswith(("blocks.0.mixer.", "blocks.2.mixer.")):
            assert torch.equal(h[key], s[key]), key


def test_a_kv_sharing_consumer_is_replaced_from_what_it_has(tmp_path):
    """A ``kv_share`` consumer layer has no k/v projections (it reuses its partner's): replacing it starts
    the new mixer from its q and o projections (it was a KeyError traceback)."""
    r = recipe("GA | GA | GA")
    r["components"] = {**r["components"], "gated_attn": {**ATTN, "kv_share": True},
                       "mamba3": COMPS["mamba3"]}
    torch.manual_seed(0)
    build_model(r).save_pretrained(tmp_path / "src")
    r["model"]["block_pattern"] = "GA | M3 | GD"  # layer 1: a consumer (layer 2 reads a producer's K/V)
    lines = hybridize(tmp_path / "src", tmp_path / "h", r)
    assert lines == ["layer 1: attention -> mamba3: C<-q_proj, out_proj<-o_proj",
                     "layer 2: attention -> gdn: q<-q_proj, k<-k_proj, v<-v_proj, out_proj<-o_proj, conv=identity"]


def test_meta_tokens_are_copied(tmp_path):
    """A source with meta tokens (the hybrid must have as many): they are copied like the embeddings
    (they were left at the hybrid's fresh init, so even the kept layers saw other prefixes)."""
    torch.manual_seed(0)
    r = recipe("GA | GA")
    r["model"]["meta_tokens"] = 2
    src = build_model(r)
    with torch.no_grad():
        src.meta.normal_()
    src.save_pretrained(tmp_path / "src")
    r["model"]["block_pattern"] = "GD | GA"
    hybridize(tmp_path / "src", tmp_path / "h", r)
    assert torch.equal(from_pretrained(tmp_path / "h").meta, src.meta)


def test_no_attention_init_starts_replaced_mixers_fresh(tmp_path, capsys):
    """``hymba convert --hybridize R --no-attention-init`` (the ablation of benchmarks/hybridize.py):
    the replaced mixers are exactly the target's own seeded init (``--seed``), nothing derived from
    attention; everything else is copied as without the flag, which starts them from attention."""
    from hymba_plus.models.lm import HybridLM

    torch.manual_seed(0)
    src = build_model(recipe("GA | GA | GA"))
    src.save_pretrained(tmp_path / "src")
    (tmp_path / "h.yaml").write_text(json.dumps(recipe("GD | GA | M3")))
    s = src.state_dict()
    replaced = ("blocks.0.mixer.", "blocks.2.mixer.")
    states = {}
    for name, flags in (("attn", []), ("fresh", ["--no-attention-init"]), ("fresh1", ["--no-attention-init",
                                                                                    "--seed", "1"])):
        assert main(["convert", str(tmp_path / "src"), str(tmp_path / name), "--hybridize", str(tmp_path / "h.yaml"),
                     *flags]) == 0
        out = capsys.readouterr().out
        assert ("layer 0: attention -> gdn: all fresh" in out) == bool(flags)
        assert ("layer 2: attention -> mamba3: all fresh" in out) == bool(flags)
        states[name] = from_pretrained(tmp_path / name).state_dict()
    for name, seed in (("fresh", 0), ("fresh1", 1)):
        torch.manual_seed(seed)
        own = HybridLM(load_recipe(recipe("GD | GA | M3"))).state_dict()
        for key, v in states[name].items():
            if key.startswith(replaced):
                assert torch.equal(v, own[key]), key  # the component's own init, untouched
            else:
                assert torch.equal(v, states["attn"][key]) and torch.equal(v, s[key]), key
    assert not torch.equal(states["fresh"]["blocks.0.mixer.qkv_proj.weight"],
                           states["fresh1"]["blocks.0.mixer.qkv_proj.weight"])
    q_rows = slice(0, 64)  # the gdn's q rows: q_proj's without the flag, not with it
    assert torch.equal(states["attn"]["blocks.0.mixer.qkv_proj.weight"][q_rows], s["blocks.0.mixer.q_proj.weight"])
    assert not torch.equal(states["fresh"]["blocks.0.mixer.qkv_proj.weight"][q_rows], s["blocks.0.mixer.q_proj.weight"])
    assert not torch.equal(states["fresh"]["blocks.0.mixer.out_proj.weight"], s["blocks.0.mixer.o_proj.weight"])
    assert not torch.equal(states["fresh"]["blocks.2.mixer.out_proj.weight"], s["blocks.2.mixer.o_proj.weight"])
    conv = states["fresh"]["blocks.0.mixer.conv_weight"]
    assert conv[:, :-1].any()  # not the identity conv of the attention init
    # the flag means nothing without --hybridize
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--no-attention-init"]) == 2
    assert "--no-attention-init / --seed: only with --hybridize" in capsys.readouterr().err
    # (--seed 0, the default's value, was accepted and ignored)
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--seed", "0"]) == 2
    assert "--no-attention-init / --seed: only with --hybridize" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("pattern, msg", [
    ("GD | GA", "model.block_pattern: 2 layers, the source has 3"),
    ("GD | GA | GA+none", "layer 2 (GA+none): channel mixer none differs from the source's mlp"),
    ("ATL | GA | GA", "cannot start atlas from the source's gated_attn"),
])
def test_hybridize_errors_are_one_line_and_write_nothing(tmp_path, capsys, pattern, msg):
    build_model(recipe("GA | GA | GA")).save_pretrained(tmp_path / "src")
    r = recipe(pattern)
    r["components"]["atlas"] = {"n_heads": 4, "head_dim": 16, "poly_degree": 1}
    (tmp_path / "h.yaml").write_text(json.dumps(r))
    with pytest.raises(ConvertError, match=re.escape(msg)):
        hybridize(tmp_path / "src", tmp_path / "out", tmp_path / "h.yaml")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--hybridize", str(tmp_path / "h.yaml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0]
    assert not (tmp_path / "out").exists()


def test_distill_settings_are_strict():
    for bad, msg in [({"kl_wieght": 1.0}, "did you mean 'kl_weight'"),
                     ({"temperature": 0.0}, "train.distill.temperature: must be > 0"),
                     ({"kl_weight": 0.0, "ce_weight": 0.0}, "nothing to train")]:
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe("GA", distill=bad))
    assert load_recipe(recipe("GA", distill={"temperature": 2.0})).train.distill.temperature == 2.0


def test_distill_teacher_must_share_the_vocabulary(tmp_path, capsys):
    build_model({**recipe("GA"), "model": {**recipe("GA")["model"], "vocab_size": 40}}).save_pretrained(tmp_path / "t")
    (tmp_path / "s.yaml").write_text(json.dumps(recipe("GA", steps=2)))
    rc = main(["train", str(tmp_path / "s.yaml"), "--distill", str(tmp_path / "t"), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "vocab_size 40 differs from the student's 32" in err[-1]
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("config, data", [("ladir_tiny.yaml", "chain_arith"), ("bd_tiny.yaml", "mqar")])
def test_distill_is_refused_for_other_objectives_in_one_line(tmp_path, capsys, config, data):
    """LaDiR's student logits are empty: the KL term was an IndexError traceback."""
    from pathlib import Path

    cfg = Path(__file__).resolve().parents[1] / "configs" / config
    build_model(str(cfg)).save_pretrained(tmp_path / "t")
    rc = main(["train", str(cfg), "--distill", str(tmp_path / "t"), "--out", str(tmp_path / "o"), "--steps", "1",
               "--data", data, "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    # a flag the recipe's objective does not read: a usage error, exit 2 (was 1), nothing written
    assert rc == 2 and "--distill: only for next-token training (the recipe's objective is " in err[-1], err
    assert "Traceback" not in "\n".join(err) and len(err) == 1 and not (tmp_path / "o").exists()


@pytest.mark.parametrize("teacher, msg", [
    ({"objective": {"kind": "block_diffusion", "block_size": 4}},
     "the teacher's objective is block_diffusion; it must be next_token"),
    ({"model": {"max_seq_len": 8}}, "the teacher's max_seq_len 8 is shorter than the run's seq_len 16"),
])
def test_distill_refuses_a_teacher_whose_logits_are_not_next_token_predictions_there(tmp_path, capsys, teacher, msg):
    """A block-diffusion teacher's logits predict the masked token at its own position, not the next one, and a
    teacher shorter than the training windows was run past its max_seq_len (its call skips the input checks):
    both trained on silently."""
    t = recipe("GA")
    for k, v in teacher.items():
        t[k] = {**t.get(k, {}), **v}
    build_model(t).save_pretrained(tmp_path / "t")
    (tmp_path / "s.yaml").write_text(json.dumps(recipe("GA", steps=2)))
    rc = main(["train", str(tmp_path / "s.yaml"), "--distill", str(tmp_path / "t"), "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and msg in err[-1], err
    assert not (tmp_path / "o").exists()


def test_distill_refuses_a_teacher_of_another_tokenizer(tmp_path, capsys):
    """Same vocab_size, other tokenizer (bytes against a word-level vocabulary): the teacher scored ids that
    mean other text to it, silently. The teacher of the data's tokenizer distills."""
    import yaml

    from tests.test_data import _word_tokenizer

    tok = _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(1, 255)], ["</s>"])
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(4):
        (docs / f"{d}.txt").write_text(" ".join(f"w{1 + (d * 7 + i) % 254}" for i in range(200)))
    r = {"name": "r", "model": {"vocab_size": 256, "d_model": 16, "max_seq_len": 32, "block_pattern": "GA"},
         "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 32}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    common = ["--data", str(docs), "--tokenizer", str(tok), "--steps", "1", "--batch-size", "2", "--seq-len", "16",
              "--eval-batches", "1", "--no-progress"]
    build_model(r).save_pretrained(tmp_path / "bytes")
    (tmp_path / "bytes" / "tokenizer.json").write_text(ByteTokenizer().to_json())
    assert main(["train", str(tmp_path / "r.yaml"), "--distill", str(tmp_path / "bytes"), "--out",
                 str(tmp_path / "o"), *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert "--distill" in err[-1] and "another tokenizer (bytes)" in err[-1], err
    assert not (tmp_path / "o").exists()
    assert main(["train", str(tmp_path / "r.yaml"), "--out", str(tmp_path / "t"), *common]) == 0
    assert main(["train", str(tmp_path / "r.yaml"), "--distill", str(tmp_path / "t" / "step-1"), "--out",
                 str(tmp_path / "o"), *common]) == 0


def final_accuracy(out) -> list[float]:  # noqa: ANN001
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["eval_accuracy"] for r in rows if "eval_accuracy" in r]


def test_hybridized_and_distilled_recovers_the_teacher_far_faster_than_scratch(tmp_path):
    """A GA-only teacher trained on MQAR; half its layers become gdn; 30 steps of distillation
    recover most of its accuracy, 30 steps from scratch do not come close."""
    (tmp_path / "teacher.yaml").write_text(json.dumps(recipe("GA | GA | GA | GA", steps=120, warmup_steps=20,
                                                             eval_every=120)))
    (tmp_path / "hybrid.yaml").write_text(json.dumps(recipe("GD | GA | GD | GA", steps=30, eval_every=30,
                                                            distill={"kl_weight": 1.0, "ce_weight": 1.0})))
    assert main(["train", str(tmp_path / "teacher.yaml"), "--out", str(tmp_path / "t"), "--no-progress"]) == 0
    teacher = final_accuracy(tmp_path / "t")[-1]
    assert teacher > 0.9
    assert main(["convert", str(tmp_path / "t" / "step-120"), str(tmp_path / "h"), "--hybridize",
                 str(tmp_path / "hybrid.yaml")]) == 0
    assert main(["train", str(tmp_path / "h"), "--distill", str(tmp_path / "t" / "step-120"), "--out",
                 str(tmp_path / "d"), "--no-progress"]) == 0
    assert main(["train", str(tmp_path / "hybrid.yaml"), "--out", str(tmp_path / "s"), "--no-progress"]) == 0
    distilled, scratch = final_accuracy(tmp_path / "d")[-1], final_accuracy(tmp_path / "s")[-1]
    assert distilled >= 0.8 * teacher, (teacher, distilled, scratch)
    assert distilled > scratch + 0.3, (teacher, distilled, scratch)
    rows = [json.loads(x) for x in (tmp_path / "d" / "metrics.jsonl").read_text().splitlines()]
    assert "distill/kl" in rows[-1] and "distill/kl" not in json.loads(
        (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()[-1])
    assert load_file(str(tmp_path / "d" / "step-30" / "model.safetensors"))  # a loadable checkpoint


@pytest.mark.parametrize("change, msg", [
    ({"model": {"norm": {"zero_centered": False}}}, "model.norm: {'zero_centered': False, 'eps': 1e-06} differs"),
    ({"components": {"gated_attn": {**ATTN, "qk_norm": False}}}, "components.gated_attn.qk_norm: False differs "
                                                                  "from the source's True"),
])
def test_hybrid_must_keep_what_copied_weights_mean(tmp_path, change, msg):
    build_model(recipe("GA | GA")).save_pretrained(tmp_path / "src")
    r = recipe("GD | GA")
    for k, v in change.items():
        r[k] = {**r[k], **v}
    with pytest.raises(ConvertError, match=re.escape(msg)):
        hybridize(tmp_path / "src", tmp_path / "out", r)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, msg", [
    ({"hymba": {"ssm": "mamba3", "attn": {**ATTN, "rope": {"theta": 500.0}}}}, "components.hymba.attn: "),
    ({"mamba3": {**COMPS["mamba3"], "bc_norm_eps": 0.01}}, "components.mamba3.bc_norm_eps: 0.01 differs"),
])
def test_kept_hybrid_layers_keep_their_settings_and_their_ssm_heads(tmp_path, change, msg):
    """A kept ``HY`` layer (any kept mixer, not only attention) and the SSM its heads build must keep the
    source's settings (they were not compared: the layer was copied under another RoPE, silently)."""
    comps = {**COMPS, "hymba": {"ssm": "mamba3", "attn": ATTN}}
    build_model({**recipe("HY | GA"), "components": comps}).save_pretrained(tmp_path / "src")
    r = {**recipe("HY | GD"), "components": {**comps, **change}}
    with pytest.raises(ConvertError, match=re.escape(msg)):
        hybridize(tmp_path / "src", tmp_path / "out", r)
    assert not (tmp_path / "out").exists()


def test_hybridize_straight_from_an_hf_folder(tmp_path):
    """SRC may be an HF folder: the hybrid recipe is the imported one with an edited pattern."""
    pytest.importorskip("transformers")
    from hymba_plus.convert.importer import hf_recipe
    from tests.hf_models import VOCAB, hf_model, save_hf

    save_hf(hf_model("Qwen3ForCausalLM", seed=11), tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    r = hf_recipe(tmp_path / "hf")[1].to_dict()
    r["model"]["block_pattern"] = "GD+mlp | GA+mlp | GD+mlp | GA+mlp"
    r["components"]["gdn"] = {"n_heads": 4, "head_dim": 8}
    lines = hybridize(tmp_path / "hf", tmp_path / "h", r)
    assert [ln.split(":")[0] for ln in lines] == ["layer 0", "layer 2"] and all("q<-q_proj" in ln for ln in lines)
    m = from_pretrained(tmp_path / "h")
    assert (tmp_path / "h" / "tokenizer.json").is_file()
    # the source's end ids come along (they were dropped), from an HF folder as from a checkpoint
    assert generation_config(tmp_path / "h") == {"eos_token_id": [7, 9]}
    hybridize(tmp_path / "h", tmp_path / "h2", r)
    assert generation_config(tmp_path / "h2") == {"eos_token_id": [7, 9]}
    assert m(torch.randint(0, VOCAB, (1, 8))).logits.isfinite().all()


def test_training_a_converted_model_keeps_its_end_ids_and_tokenizer_files(tmp_path):
    """`hymba train` started from an imported / hybridized checkpoint writes checkpoints with its end ids
    (generation_config.json) and transformers' tokenizer side files (special tokens, chat template), and a
    resumed run keeps them: both were dropped, so generation ran past Llama-3-style end ids and an export
    had no chat template."""
    pytest.importorskip("transformers")
    from hymba_plus.convert.importer import hf_recipe
    from hymba_plus.training.tokenizer import TOKENIZER_SIDE_FILES
    from tests.hf_models import hf_model, save_hf

    hf = save_hf(hf_model("Qwen3ForCausalLM", seed=12), tmp_path / "hf")
    (hf / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    sides = {"tokenizer_config.json": json.dumps({"eos_token": "t7", "model_max_length": 128}),
             "special_tokens_map.json": json.dumps({"eos_token": "t7"}),
             "chat_template.jinja": "{% for m in messages %}{{ m['content'] }} t7 {% endfor %}"}
    for name, text in sides.items():
        (hf / name).write_text(text)
    r = hf_recipe(hf)[1].to_dict()
    r["model"]["block_pattern"] = "GD+mlp | GA+mlp | GD+mlp | GA+mlp"
    r["components"]["gdn"] = {"n_heads": 4, "head_dim": 8}
    hybridize(hf, tmp_path / "h", r)
    assert {n: (tmp_path / "h" / n).read_text() for n in TOKENIZER_SIDE_FILES} == sides
    (tmp_path / "text.txt").write_text(" ".join(f"t{i % 90}" for i in range(3000)))
    args = ["train", str(tmp_path / "h"), "--data", str(tmp_path / "text.txt"), "--tokenizer", str(hf / "tokenizer.json"),
            "--out", str(tmp_path / "run"), "--seq-len", "16", "--batch-size", "2", "--eval-every", "2",
            "--eval-batches", "1", "--no-progress"]
    assert main([*args, "--steps", "2"]) == 0
    assert main([*args, "--steps", "3", "--resume", "auto"]) == 0
    for step in (2, 3):
        ckpt = tmp_path / "run" / f"step-{step}"
        assert generation_config(ckpt) == {"eos_token_id": [7, 9]}
        assert {n: (ckpt / n).read_text() for n in TOKENIZER_SIDE_FILES} == sides


@pytest.mark.parametrize("extra", [{"model": {"mtp": {"depth": 1, "block": "GA"}}},
                                   {"objective": {"kind": "block_diffusion", "block_size": 4}}])
def test_mtp_modules_and_objective_weights_are_copied_when_the_hybrid_has_the_same(tmp_path, extra):
    """The multi-token prediction modules and an objective's own weights (block diffusion's [MASK]
    embedding) are the source's where the hybrid has the same settings (they were left at the hybrid's
    fresh init, silently: a trained MTP module or [MASK] embedding lost); where it has other settings,
    or the source has none, they start fresh, and a line says so."""
    def model(r, seed):  # noqa: ANN001, ANN202
        torch.manual_seed(seed)
        m = build_model(r)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p))  # (a zero-initialised [MASK] embedding would equal a fresh one)
        return m

    r = recipe("GA | GA")
    r["model"].update(extra.get("model", {}))
    r.update({k: v for k, v in extra.items() if k != "model"})
    src = model(r, 0)
    src.save_pretrained(tmp_path / "src")
    s = src.state_dict()
    section = "mtp." if "model" in extra else "objective."
    copied = [k for k in s if k.startswith(section)]
    assert copied
    r["model"]["block_pattern"] = "GD | GA"
    if "model" in extra:  # (the same block, written out)
        r["model"]["mtp"] = {"depth": 1, "block": "GA+mlp", "weight": 0.5}
    assert hybridize(tmp_path / "src", tmp_path / "h", r) == [
        "layer 0: attention -> gdn: q<-q_proj, k<-k_proj, v<-v_proj, out_proj<-o_proj, conv=identity"]
    h = from_pretrained(tmp_path / "h").state_dict()
    assert all(torch.equal(h[k], s[k]) for k in copied)
    if "model" in extra:
        r["model"]["mtp"] = {"depth": 2, "block": "GA"}
        what = "mtp: fresh (model.mtp.depth: 2 differs from the source's 1)"
    else:
        r["objective"] = {"kind": "block_diffusion", "block_size": 8}
        what = "objective: fresh (objective.block_size: 8 differs from the source's 4)"
    lines = hybridize(tmp_path / "src", tmp_path / "h2", r)
    assert lines[1:] == [what], lines
    h2 = from_pretrained(tmp_path / "h2").state_dict()
    assert not any(torch.equal(h2[k], s[k]) for k in copied if k in h2)


def test_settings_that_do_not_change_the_weights_meaning_may_differ(tmp_path):
    """Chunk sizes and the MLP's recompute_act only change how a kept layer computes, not what: the
    hybrid may set them otherwise (they were refused, 'its weights are copied', against the rule that
    SAME's comment states); the copied weights are the source's."""
    torch.manual_seed(0)
    src = build_model(recipe("GD | GA | M3 | GA"))
    src.save_pretrained(tmp_path / "src")
    r = recipe("GD | GD | M3 | GA")
    r["components"]["gdn"] = {**COMPS["gdn"], "chunk_size": 16}
    r["components"]["mamba3"] = {**COMPS["mamba3"], "chunk_size": 8}
    r["components"]["mlp"] = {**COMPS["mlp"], "recompute_act": False}
    assert [ln.split(":")[0] for ln in hybridize(tmp_path / "src", tmp_path / "h", r)] == ["layer 1"]
    s, h = src.state_dict(), from_pretrained(tmp_path / "h").state_dict()
    assert all(torch.equal(h[k], s[k]) for k in s if not k.startswith("blocks.1.mixer."))
