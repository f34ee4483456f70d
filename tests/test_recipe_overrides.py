"""Recipe overrides (``load_recipe(source, overrides=...)``, ``build_model(..., overrides=...)`` and the
``--set KEY=VALUE`` flag of ``hymba check / info / train / bench``): a key path set in the parsed recipe before
the strict validation, so every check applies to the result; its errors name the override as given, the
file's keep their ``FILE:LINE``; a malformed override is one line (exit 2 on the command line), a recipe it
makes invalid exit 1; a trained run's recipe.yaml holds the overridden recipe."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from hymba_plus import build_model, from_pretrained, load_recipe
from hymba_plus.cli import main
from hymba_plus.core.recipe import OverrideError, RecipeError

ROOT = Path(__file__).resolve().parents[1]
GPT_TINY = ROOT / "configs" / "gpt_tiny.yaml"  # d_model 64 at line 4, gated_attn n_heads 4 at line 9
FAST = ["--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--eval-every", "100", "--no-progress"]
TINY = {
    "name": "ovr-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA"},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}


def errors(source, overrides) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(source, overrides=overrides)
    for line in e.value.errors:
        assert "\n" not in line and "Traceback" not in line
    return e.value.errors


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


# --------------------------------------------------------------------------- the API


def test_mapping_and_strings_set_nested_keys():
    a = load_recipe(GPT_TINY, overrides={"model.d_model": 128, "components.gated_attn.n_heads": 8})
    b = load_recipe(GPT_TINY, overrides=["model.d_model=128", "components.gated_attn.n_heads = 8"])
    assert a == b
    assert a.model.d_model == 128 and a.components["gated_attn"].n_heads == 8
    assert a.components["gated_attn"].head_dim == 16  # the section's other keys are the file's
    assert a.hash() != load_recipe(GPT_TINY).hash()
    assert load_recipe(GPT_TINY, overrides={}) == load_recipe(GPT_TINY) == load_recipe(GPT_TINY, overrides=[])


def test_string_values_are_yaml_scalars_and_flow_collections():
    r = load_recipe(GPT_TINY, overrides=[
        "model.max_seq_len=1024",  # int
        "model.n_layers=null",  # None
        "model.block_pattern=GA | GA | GA",  # text
        "model.norm.eps=1e-5",  # YAML 1.2 float (no dot)
        "components.gated_attn.rope={theta: 500000, scaling: {kind: yarn, factor: 4}}",  # a mapping
        "model.tie_embeddings=false",
    ])
    assert r.model.max_seq_len == 1024 and r.model.n_layers is None and len(r.layers) == 3
    assert r.model.norm.eps == 1e-5 and r.model.tie_embeddings is False
    rope = r.components["gated_attn"].rope
    assert rope.theta == 500000.0 and rope.scaling.kind == "yarn" and rope.scaling.factor == 4.0
    assert rope.fraction == 1.0  # the whole mapping replaced: fraction 0.5 of the file is gone
    # a list: the block diffusion clip grid
    bd = load_recipe(ROOT / "configs" / "bd_tiny.yaml", overrides=["objective.clip=[0.2, 0.9]"])
    assert tuple(bd.objective.clip) == (0.2, 0.9)
    # a Python value is taken as it is (a string is YAML)
    assert load_recipe(GPT_TINY, overrides={"name": "x y"}).name == "x y"
    assert load_recipe(GPT_TINY, overrides={"model.block_pattern": "GA"}).layers[0].mixer == "gated_attn"
    assert len(load_recipe(GPT_TINY, overrides={"model.block_pattern": "GA"}).layers) == 1


def test_an_override_adds_a_section_or_key_the_file_lacks():
    r = load_recipe(TINY, overrides=["components.gdn.n_heads=4", "model.mtp={depth: 2}", "model.dropout=0.1"])
    assert r.components["gdn"].n_heads == 4 and r.model.mtp.depth == 2 and r.model.dropout == 0.1
    t = load_recipe(TINY, overrides=["train.lr=0.01", "train.steps=5"])
    assert t.train.lr == 0.01 and t.train.steps == 5
    # a null section (``components:`` with nothing under it) is filled
    r = load_recipe("name: t\nmodel: {vocab_size: 64, d_model: 32, block_pattern: GA}\ncomponents:\n",
                    overrides=["components.gated_attn.n_heads=8"])
    assert r.components["gated_attn"].n_heads == 8


def test_replacing_a_whole_section_and_later_overrides_win():
    r = load_recipe(GPT_TINY, overrides=["components.gated_attn={n_heads: 8}", "model.d_model=32",
                                         "model.d_model=96"])
    ga = r.components["gated_attn"]
    assert (ga.n_heads, ga.n_kv_heads, ga.head_dim) == (8, None, None) and r.model.d_model == 96


def test_sources_are_not_changed():
    d = copy.deepcopy(TINY)
    r = load_recipe(d, overrides={"model.d_model": 64, "components.mlp.d_hidden": 32})
    assert d == TINY and r.model.d_model == 64
    base = load_recipe(TINY)
    again = load_recipe(base, overrides=["model.d_model=64"])
    assert base.model.d_model == 32 and again.model.d_model == 64
    assert load_recipe(base, overrides=[]) is base


def test_build_model_takes_overrides():
    model = build_model(TINY, overrides=["model.d_model=48", "components.gated_attn.n_heads=3"])
    assert model.recipe.model.d_model == 48 and model.recipe.components["gated_attn"].n_heads == 3
    assert model.embed.weight.shape[1] == 48


def test_errors_at_an_overridden_key_name_the_override():
    assert errors(GPT_TINY, ["model.d_modl=256"]) == [
        "--set model.d_modl=256: unknown key (did you mean 'd_model'?)"]
    assert errors(GPT_TINY, {"model.d_model": -1}) == ["--set model.d_model=-1: must be >= 1, got -1"]
    assert errors(GPT_TINY, ["model.d_model=abc"]) == [
        "--set model.d_model=abc: wrong type: expected an integer, got str 'abc'"]
    # a section the override added: its errors name it too (not the line of the file's components:)
    assert errors(GPT_TINY, ["components.swa.n_heads=4"]) == [
        "--set components.swa.n_heads=4: components.swa: unknown component"]
    # below the overridden key: its path too
    (e,) = errors(GPT_TINY, ["components.gated_attn={n_heads: 0, n_kv_heads: 2}"])
    assert e.startswith("--set components.gated_attn={n_heads: 0, n_kv_heads: 2}: components.gated_attn.n_heads: ")
    # a component the override's pattern uses, at its defaults: named by the override, not the file's pattern line
    (e,) = errors({**TINY, "model": {**TINY["model"], "d_model": 30}}, ["model.block_pattern=GA | GD"])
    assert e == ("--set model.block_pattern=GA | GD: components.gdn.n_heads: must divide d_model (30) when head_dim "
                 "is not given (default; set it under components.gdn)")


def test_errors_elsewhere_keep_their_file_line(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**TINY, "model": {**TINY["model"], "dropout": 2.0}}, sort_keys=False))
    # line 5: d_model, 7: dropout, 10: gated_attn's n_heads 2, which cannot divide the overridden d_model 33
    assert errors(p, ["model.d_model=33"]) == [f"{p}:7: model.dropout: must be <= 1.0, got 2.0"]
    assert errors(p, ["model.d_model=33", "model.dropout=0"]) == [
        f"{p}:10: components.gated_attn.n_heads: must divide d_model (33) when head_dim is not given"]
    assert errors(p, ["model.meta_tokens=-1"]) == ["--set model.meta_tokens=-1: must be >= 0, got -1",
                                                  f"{p}:7: model.dropout: must be <= 1.0, got 2.0"]


@pytest.mark.parametrize("given, needle", [
    ("model.d_model", "--set model.d_model: expected KEY=VALUE"),
    ("=3", "--set =3: empty key"),
    ("model..d_model=3", "--set model..d_model=3: empty part in the key path"),
    ("model.d_model.x=1", "--set model.d_model.x=1: model.d_model is int 64, not a mapping"),
    ("name.x=1", "--set name.x=1: name is str 'gpt-tiny', not a mapping"),
    ("model.d_model=[1, 2", "--set model.d_model=[1, 2: invalid YAML value"),
    ("model.d_model={a: 1, a: 2}", "--set model.d_model={a: 1, a: 2}: model.d_model.a: duplicate key"),
    ("name=!!python/name:os.system", "is not allowed"),
])
def test_malformed_overrides_are_one_line(given, needle):
    with pytest.raises(OverrideError) as e:
        load_recipe(GPT_TINY, overrides=[given])
    assert len(e.value.errors) == 1 and "\n" not in str(e.value)
    assert needle in str(e.value) and str(e.value).startswith(f"--set {given}"), str(e.value)


def test_malformed_override_containers():
    for bad in ("model.d_model=3", 3, [3], {1: 2}):
        with pytest.raises(OverrideError) as e:
            load_recipe(TINY, overrides=bad)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- hymba check / info / bench


def test_check_accepts_set(capsys, tmp_path):
    code, out, _ = run(capsys, "check", str(GPT_TINY), "--set", "model.d_model=128", "--set",
                       "components.gated_attn.n_heads=8")
    h = load_recipe(GPT_TINY, overrides={"model.d_model": 128, "components.gated_attn.n_heads": 8}).hash()
    assert code == 0 and h in out
    code, _, err = run(capsys, "check", str(GPT_TINY), "--set", "model.d_modl=256")
    assert code == 1 and err.strip() == "--set model.d_modl=256: unknown key (did you mean 'd_model'?)"
    for bad in ("model.d_model", "model.d_model.x=1", "model.d_model=[1"):
        code, _, err = run(capsys, "check", str(GPT_TINY), "--set", bad)
        assert code == 2 and len(err.strip().splitlines()) == 1 and f"--set {bad}" in err, err


def test_info_accepts_set(capsys):
    code, out, _ = run(capsys, "info", str(GPT_TINY), "--json", "--set", "model.block_pattern=GA | GA | GA")
    assert code == 0 and len(json.loads(out)["layers"]) == 3
    code, _, err = run(capsys, "info", str(GPT_TINY), "--set", "model.d_model=-1")
    assert code == 1 and err.strip() == "--set model.d_model=-1: must be >= 1, got -1"
    code, _, err = run(capsys, "info", str(GPT_TINY), "--set", "model")
    assert code == 2 and err.strip().endswith("--set model: expected KEY=VALUE (a key path = a YAML value, e.g. "
                                              "model.d_model=256)")


def test_bench_accepts_set(capsys, tmp_path):
    out = tmp_path / "b.json"
    code, _, _ = run(capsys, "bench", str(GPT_TINY), "--device", "cpu", "--batch", "1", "--steps", "1", "--warmup",
                     "0", "--decode-tokens", "2", "--seq-len", "8", "--set", "model.d_model=32",
                     "--set", "components.gated_attn={n_heads: 2}", "--json", str(out))
    r = json.loads(out.read_text())
    expected = load_recipe(GPT_TINY, overrides=["model.d_model=32", "components.gated_attn={n_heads: 2}"])
    from hymba_plus.cli.info import describe

    assert code == 0 and r["params_total"] == describe(expected)["params_total"]
    code, _, err = run(capsys, "bench", str(GPT_TINY), "--device", "cpu", "--set", "model.d_model=-1")
    assert code == 1 and "--set model.d_model=-1: must be >= 1" in err
    code, _, err = run(capsys, "bench", str(GPT_TINY), "--device", "cpu", "--set", "=1")
    assert code == 2 and "--set =1: empty key" in err


# --------------------------------------------------------------------------- hymba train


def recipe_file(tmp_path: Path) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


def test_train_saves_the_overridden_recipe(tmp_path, capsys):
    r, out = recipe_file(tmp_path), tmp_path / "run"
    sets = ["--set", "model.d_model=48", "--set", "components.gated_attn.n_heads=3", "--set", "train.lr=0.002"]
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "2", *FAST, *sets)
    assert code == 0, err
    ckpt = sorted(out.glob("step-*"))[-1]
    saved = load_recipe(ckpt / "recipe.yaml")
    expected = load_recipe(r, overrides=["model.d_model=48", "components.gated_attn.n_heads=3", "train.lr=0.002"])
    assert saved == expected and saved.hash() == expected.hash() and saved.train.lr == 0.002
    m = from_pretrained(ckpt)
    ref = build_model(r, overrides=["model.d_model=48", "components.gated_attn.n_heads=3"])
    assert {k: v.shape for k, v in m.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    # resuming with the same --set goes on; the run's own folder as RECIPE needs none
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "3", *FAST, *sets, "--resume")
    assert code == 0, err
    # a --set that changes the model of the checkpoint being resumed: one line, exit 2
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "4", *FAST, "--resume",
                       "--set", "model.d_model=64", "--set", "components.gated_attn.n_heads=4")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "--set model.d_model=64" in err and "resum" in err
    # a train setting the resumed run keeps from its checkpoint: refused, with the flag to use
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "4", *FAST, *sets[:4], "--resume",
                       "--set", "train.lr=0.005")
    assert code == 2 and "--set train.lr=0.005" in err and "--lr" in err, err
    # a checkpoint folder as RECIPE: its weights, so a --set that changes their shapes is refused
    code, _, err = run(capsys, "train", str(ckpt), "--out", str(tmp_path / "ft"), "--steps", "1", *FAST,
                       "--set", "model.d_model=96")
    assert code == 2 and "--set model.d_model=96: changes the weights of the checkpoint" in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "ft").exists()
    # ... and one that keeps them is taken (dropout)
    code, _, err = run(capsys, "train", str(ckpt), "--out", str(tmp_path / "ft2"), "--steps", "1", *FAST,
                       "--set", "model.dropout=0.1")
    assert code == 0, err
    assert load_recipe(sorted((tmp_path / "ft2").glob("step-*"))[-1] / "recipe.yaml").model.dropout == 0.1


def test_train_set_errors(tmp_path, capsys):
    r = recipe_file(tmp_path)
    code, _, err = run(capsys, "train", r, "--out", str(tmp_path / "o"), *FAST, "--set", "model.d_model=0")
    assert code == 1 and err.strip() == "hymba train: --set model.d_model=0: must be >= 1, got 0"
    code, _, err = run(capsys, "train", r, "--out", str(tmp_path / "o"), *FAST, "--set", "model.d_model")
    assert code == 2 and "--set model.d_model: expected KEY=VALUE" in err
    assert not (tmp_path / "o").exists()


def test_the_resume_command_keeps_the_model_overrides():
    from hymba_plus.training.trainer import RunOptions

    opts = RunOptions(out=Path("runs/x"), recipe_name="r.yaml", sets=("model.d_model=48", "train.lr=0.1",
                                                                     "name=a b"))
    assert opts.resume_command() == ("hymba train r.yaml --set model.d_model=48 --set 'name=a b' --out runs/x "
                                     "--resume")


def test_an_undecodable_or_very_long_override_is_one_short_line(capsys):
    """A command-line byte that is not UTF-8 reaches Python as a lone surrogate (``$'name=\\xff'``): libyaml's
    encoder raised UnicodeEncodeError, a traceback. A pasted wall of text is cut where an error echoes it."""
    with pytest.raises(OverrideError) as e:
        load_recipe(GPT_TINY, overrides=["name=\udcff"])
    assert str(e.value) == "--set name=\\udcff: invalid YAML value: not UTF-8 text"
    code, _, err = run(capsys, "check", str(GPT_TINY), "--set", "name=\udcff")
    assert code == 2 and err.strip() == "hymba check: --set name=\\udcff: invalid YAML value: not UTF-8 text"
    with pytest.raises(RecipeError) as e:
        load_recipe(GPT_TINY, overrides=["model.d_model=" + "x" * 5000])
    assert len(str(e.value)) < 400 and str(e.value).startswith("--set model.d_model=xxx")


@pytest.mark.parametrize("text, line", [
    ("- a\n- b\n", "<recipe>:1: a recipe must be a mapping with 'name' and 'model', got a list"),
    ("name: x\nmodel: 3\n", "<recipe>:2: model: must be a mapping, got int 3"),
    ("name: x\nmodel: {vocab_size: 8, d_model: 8, block_pattern: GA}\ncomponents: []\n",
     "<recipe>:3: components: must be a mapping"),
])
def test_a_file_not_a_mapping_where_an_override_goes_is_the_files_error(text, line, capsys, tmp_path):
    """An override's key path through a value the file gives where the recipe takes a mapping (a recipe file
    that is a list, ``model: 3``) was an OverrideError blaming the --set (hymba check exit 2, a folder's check
    cut short); it is the file's own error, with its line."""
    with pytest.raises(RecipeError) as e:
        load_recipe(text, overrides=["model.d_model=8", "components.gated_attn.n_heads=2"])
    assert not isinstance(e.value, OverrideError) and e.value.errors[0].startswith(line), e.value.errors
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    code, out, err = run(capsys, "check", str(p), str(GPT_TINY), "--set", "model.d_model=8")
    assert code == 1 and err.startswith(f"{p}:") and f"OK {GPT_TINY}" in out, (out, err)
    # a valid file: a path through its scalar is the override's mistake (exit 2)
    with pytest.raises(OverrideError):
        load_recipe(GPT_TINY, overrides=["model.d_model.x=1"])


def test_check_of_several_recipes_names_the_recipe_of_an_override_error(capsys, tmp_path):
    """``hymba check A B --set ...`` (or a folder) printed an error at an overridden key as ``--set KEY=VALUE:
    ...`` alone, once per recipe: which recipe it was for could not be told; with several recipes it is named."""
    code, out, err = run(capsys, "check", str(GPT_TINY), str(ROOT / "configs" / "hymba_tiny.yaml"),
                         "--set", "model.d_model=-1")
    assert code == 1 and err.splitlines()[:2] == [
        f"{GPT_TINY}: --set model.d_model=-1: must be >= 1, got -1",
        f"{ROOT / 'configs' / 'hymba_tiny.yaml'}: --set model.d_model=-1: must be >= 1, got -1"], err
    # a --set malformed for one of them (a path through its scalar): the usage line names that recipe
    full = ROOT / "configs" / "quad_hybrid_full.yaml"
    code, out, err = run(capsys, "check", str(GPT_TINY), str(full), "--set", "model.layout.ratios.gdn.x=1")
    assert code == 2 and err.strip().splitlines()[-1] == (
        f"hymba check: {full}: --set model.layout.ratios.gdn.x=1: model.layout.ratios.gdn is float 0.35, "
        "not a mapping"), err
    # one recipe: as before (the file is the command's only one)
    code, _, err = run(capsys, "check", str(GPT_TINY), "--set", "model.d_model=-1")
    assert code == 1 and err.strip() == "--set model.d_model=-1: must be >= 1, got -1"


def test_resuming_with_a_train_set_its_flag_overrides(tmp_path, capsys):
    """``--set train.lr=X --lr Y``: the flag wins (as in a fresh run), so the checkpoint holds lr Y. The same
    command with ``--resume`` was refused ('--set train.lr=X: ... (lr Y there); change it with --lr', which it
    did): a --set of a setting a flag gives changes nothing on a resume; one without its flag is still refused."""
    r, out = recipe_file(tmp_path), tmp_path / "run"
    cmd = ["train", r, "--out", str(out), "--steps", "3", *FAST, "--set", "train.lr=0.002", "--lr", "0.005"]
    code, _, err = run(capsys, *cmd, "--stop-after", "1")
    assert code == 0, err
    code, _, err = run(capsys, *cmd, "--resume")
    assert code == 0 and (out / "step-3").is_dir(), err
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "4", *FAST, "--set", "train.lr=0.002",
                       "--resume")
    assert code == 2 and "--set train.lr=0.002" in err and "(lr 0.005 there); change it with --lr" in err, err


def test_train_refusals_name_the_override_on_one_short_line(tmp_path, capsys):
    """hymba train's refusals of a --set (a checkpoint folder's weight shapes, a resumed checkpoint's model or
    train settings) echoed the --set as given: a line break in it (a YAML value may fold lines) split the error,
    a pasted wall of text was printed whole. They name it as every other override error does: escaped, cut."""
    r, out = recipe_file(tmp_path), tmp_path / "run"
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "2", *FAST, "--stop-after", "1")
    assert code == 0, err
    ckpt = out / "step-1"
    long = "model.block_pattern=GA |" + " " * 400 + "GA | GA"
    for argv in (["train", str(ckpt), "--out", str(tmp_path / "ft"), "--set", "model.block_pattern=GA |\n GA | GA"],
                 ["train", str(ckpt), "--out", str(tmp_path / "ft"), "--set", long],
                 ["train", r, "--out", str(out), "--resume", "--set", "model.d_model=\n 48"],
                 ["train", r, "--out", str(out), "--resume", "--set", "train.lr=\n 0.005"]):
        code, _, err = run(capsys, *argv, "--steps", "2", *FAST)
        assert code == 2 and len(err.strip().splitlines()) == 1 and len(err) < 600, err
        assert err.startswith("hymba train: --set ") and ("\\n" in err or "..." in err), err
    with pytest.raises(OverrideError) as e:  # no '=': cut too
        load_recipe(GPT_TINY, overrides=["x" * 5000])
    assert len(str(e.value)) < 400, len(str(e.value))


def test_info_says_the_recipe_is_overridden(capsys):
    """``hymba info FILE --set ...`` described the overridden recipe under 'recipe FILE' (JSON: source FILE)
    with nothing saying it was not the file's (the hash differs from the file's): as bench's JSON, info's
    names the overrides."""
    code, out, _ = run(capsys, "info", str(GPT_TINY), "--json", "--set", "model.d_model=96")
    d = json.loads(out)
    assert code == 0 and d["recipe_overrides"] == ["model.d_model=96"] and d["d_model"] == 96
    code, out, _ = run(capsys, "info", str(GPT_TINY), "--set", "model.d_model=96", "--set", "name=a b")
    assert code == 0 and out.splitlines()[0] == f"recipe      {GPT_TINY} --set model.d_model=96 --set 'name=a b'"
    code, out, _ = run(capsys, "info", str(GPT_TINY), "--json")
    assert code == 0 and "recipe_overrides" not in json.loads(out)


def test_train_reports_an_invalid_recipe_on_one_line(tmp_path, capsys):
    """A recipe with several errors (two bad --sets) printed them as several lines, all but the first without
    'hymba train: ' (README, Exit codes: each error one line): the first, and how many more (as hymba bench)."""
    r = recipe_file(tmp_path)
    code, _, err = run(capsys, "train", r, "--out", str(tmp_path / "o"), *FAST, "--set", "model.d_model=0",
                       "--set", "model.vocab_size=0")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("hymba train: --set model.") and err.strip().endswith(
        "(and 1 more: hymba check lists them)"), err


def test_a_resumed_run_keeps_the_checkpoints_train_section_in_its_recipe(tmp_path, capsys):
    """A run trained with ``--set train.lr=X`` and resumed by the command it printed (which drops train
    --sets: a resumed run takes its settings from the checkpoint) wrote later checkpoints' recipe.yaml
    without the train section its first ones had. A resumed run's checkpoints keep the resumed
    checkpoint's train section, so every checkpoint's recipe.yaml is the run's recipe."""
    r, out = recipe_file(tmp_path), tmp_path / "run"
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "3", *FAST, "--set", "train.lr=0.002",
                       "--stop-after", "1")
    assert code == 0, err
    first = load_recipe(out / "step-1" / "recipe.yaml")
    assert first.train is not None and first.train.lr == 0.002
    code, _, err = run(capsys, "train", r, "--out", str(out), "--steps", "3", *FAST, "--resume")
    assert code == 0 and (out / "step-3").is_dir(), err
    assert load_recipe(out / "step-3" / "recipe.yaml") == first


def test_override_error_is_exported_with_recipe_error():
    """``hymba_plus.OverrideError`` beside ``hymba_plus.RecipeError`` (it was importable from core.recipe only)."""
    import hymba_plus

    assert hymba_plus.OverrideError is OverrideError and issubclass(OverrideError, hymba_plus.RecipeError)
    assert "OverrideError" in hymba_plus.__all__


# --------------------------------------------------------------------------- list items: KEY[N]

BD_TINY = ROOT / "configs" / "bd_tiny.yaml"  # objective: {..., clip: [0.3, 0.8]} at line 18


def test_a_list_item_is_set_as_key_index():
    """``KEY[N]`` sets item N of an existing list (as errors name items: ``objective.clip[1]``), the other items
    the file's; nested lists ``grid[1][0]``; the recipe's checks see the result and name the ``--set``."""
    r = load_recipe(BD_TINY, overrides=["objective.clip[1]=0.9"])
    assert r.objective.clip == (0.3, 0.9)
    r = load_recipe(BD_TINY, overrides=["objective.clip_search={grid: [[0.0, 1.0], [0.3, 0.8]]}",
                                        "objective.clip_search.grid[1][0]=0.2"])
    assert r.objective.clip_search.grid == ((0.0, 1.0), (0.2, 0.8))
    assert load_recipe(BD_TINY, overrides={"objective.clip[0]": 0.1}).objective.clip == (0.1, 0.8)
    assert errors(BD_TINY, ["objective.clip[1]=abc"]) == [
        "--set objective.clip[1]=abc: wrong type: expected a number, got str 'abc'"]


@pytest.mark.parametrize("given, needle", [
    ("objective.clip[2]=0.5", "objective.clip[2]: no such item (objective.clip has 2 items: [0] .. [1])"),
    ("objective.clip[-1]=0.5", "objective.clip[-1]: no such item (objective.clip has 2 items: [0] .. [1]; "
                               "an index counts from 0, never from the end)"),
    ("objective.clip.0=0.5", "objective.clip is a list, not a mapping (its items: objective.clip[0] .. [1])"),
    ("objective[0]=1", "objective is a mapping, not a list"),
    ("objective.clip[x]=1", "objective.clip[x]: a list item is KEY[N], N an index from 0"),
    ("objective.clip[0=1", "objective.clip[0: a list item is KEY[N], N an index from 0"),
    ("objective.kind[0]=1", "objective.kind is str 'block_diffusion', not a list"),
    ("[0]=1", "empty part in the key path"),
])
def test_a_wrong_list_item_path_is_one_line_naming_the_set(given, needle):
    with pytest.raises(OverrideError) as e:
        load_recipe(BD_TINY, overrides=[given])
    assert len(e.value.errors) == 1 and str(e.value).startswith(f"--set {given}: ") and needle in str(e.value), \
        str(e.value)


def test_resuming_with_a_list_item_set_names_the_set(tmp_path, capsys):
    """A resumed run refuses a --set that changes its checkpoint's recipe naming the --set (exit 2); a list
    item's (``objective.clip[0]``) was not found in the recipes (a key named ``clip[0]``), and the refusal
    named the recipe file as holding the new value (exit 1)."""
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", str(BD_TINY), "--out", str(out), "--steps", "2", *FAST, "--stop-after", "1")
    assert code == 0, err
    code, _, err = run(capsys, "train", str(BD_TINY), "--out", str(out), "--steps", "2", *FAST, "--resume",
                       "--set", "objective.clip[0]=0.1")
    assert code == 2 and err.startswith("hymba train: --set objective.clip[0]=0.1: the checkpoint "), err
    assert "(objective.clip[0]: 0.3 there, 0.1 with the --set)" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("given, rule", [
    ("objective.clip[0]=2", "objective.clip: must be [beta, omega] with 0 <= beta <= omega <= 1, got [2, 0.8]"),
    ("objective.clip[1]=0.1", "objective.clip: must be [beta, omega] with 0 <= beta <= omega <= 1, got [0.3, 0.1]"),
])
def test_a_list_rule_broken_by_a_set_item_names_the_set(given, rule):
    """A check of the whole list (``objective.clip``'s order) that an item's ``--set`` breaks names that ``--set``,
    as a key's own check does; it named the file's line of the list (``bd_tiny.yaml:18``), which holds a valid one."""
    assert errors(BD_TINY, [given]) == [f"--set {given}: {rule}"]


@pytest.mark.parametrize("given, path", [("objective.nope[0]=1", "objective.nope"),
                                         ("objective.clip_search.grid[0]=[0.1, 0.2]", "objective.clip_search.grid")])
def test_an_item_of_a_list_the_recipe_lacks_is_named_absent(given, path):
    """``KEY[N]`` of a key the recipe does not hold (an item is set, never added): one line naming the list's key
    it lacks; it read ``objective.nope is a mapping, not a list`` (the empty mapping put in its place)."""
    with pytest.raises(OverrideError) as e:
        load_recipe(BD_TINY, overrides=[given])
    assert e.value.errors == [f"--set {given}: {path}: not in the recipe (KEY[N] sets an item of an existing list; "
                              f"set the whole list: --set KEY=[...])"], e.value.errors
