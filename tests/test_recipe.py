"""The recipe loader (DESIGN §2): strict, line-aware, total; round trip; stable hash.

The bad-recipe corpus lives in tests/bad_recipes/: each file's first line says what the
loader must report (``# expect: key.path: message fragment``), an optional second line
the YAML line it must point at (``# line: N``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import Recipe, RecipeError, load_recipe, registry
from hymba_plus.core.pattern import expand_ratios

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_recipes"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
BAD_FILES = sorted(BAD.glob("*.yaml"))


def expectation(path: Path) -> tuple[str, str, int | None]:
    """(key path, message fragment, line or None) from the corpus file's header."""
    lines = path.read_text().splitlines()
    m = re.match(r"# expect: (.*?): (.*)$", lines[0])
    assert m, f"{path.name}: first line must be '# expect: key.path: fragment'"
    line = None
    if len(lines) > 1 and (ml := re.match(r"# line: (\d+)$", lines[1])):
        line = int(ml.group(1))
    return m.group(1), m.group(2), line


def tiny(**model) -> dict:
    m = {"vocab_size": 64, "d_model": 32, "block_pattern": "GA | GA"}
    m.update(model)
    return {"name": "t", "model": m, "components": {"gated_attn": {"n_heads": 4, "head_dim": 8}}}


def errors_of(source) -> list[str]:
    with pytest.raises(RecipeError) as ei:
        load_recipe(source)
    return ei.value.errors


# --------------------------------------------------------------------------- the corpus


def test_corpus_is_large_enough():
    assert len(BAD_FILES) >= 25
    with_lines = [f for f in BAD_FILES if expectation(f)[2] is not None]
    assert len(with_lines) >= 10


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_recipe(path: Path):
    key, fragment, line = expectation(path)
    errs = errors_of(path)
    assert len(errs) == 1, errs
    err = errs[0]
    assert "\n" not in err
    m = re.match(r"^(.*?):(\d+): (.*)$", err)
    assert m and m.group(1) == str(path), err
    got_line, rest = int(m.group(2)), m.group(3)
    assert 1 <= got_line <= len(path.read_text().splitlines()), err
    if key:
        assert rest.startswith(f"{key}: "), f"expected key path {key!r} in: {err}"
    assert fragment in rest, f"expected {fragment!r} in: {err}"
    if line is not None:
        assert got_line == line, err


# --------------------------------------------------------------------------- valid recipes


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_and_round_trip(path: Path):
    r = load_recipe(path)
    assert r.source == str(path)
    assert load_recipe(r.to_dict()) == r
    assert load_recipe(r.to_yaml()) == r
    assert load_recipe(r.to_dict()).hash() == r.hash()
    assert len(r.layers) >= 1


def test_build_sources_are_equivalent(tmp_path):
    d = tiny()
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(d))
    a, b, c = load_recipe(d), load_recipe(p), load_recipe(p.read_text())
    assert a == b == c and a.hash() == b.hash() == c.hash()
    assert load_recipe(a) is a
    assert load_recipe(str(p)).source == str(p)
    assert a.source is None


def test_recipe_is_frozen():
    r = load_recipe(tiny())
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.model.d_model = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        r.components["gated_attn"] = None  # type: ignore[index]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_mappings_are_frozen_and_the_recipe_pickles(path):
    """A recipe's mappings are immutable and pickle: ``model.layout.ratios`` was the loader's own
    mutable dict (LineDict) inside a frozen recipe, and ``components`` a mappingproxy, which cannot
    be pickled (no Recipe through pickle or to another process). Found by a review of the recipe
    language."""
    import copy
    import pickle

    from hymba_plus.core.recipe import LineDict

    r = load_recipe(path)
    with pytest.raises(TypeError):
        r.components["mlp"] = None  # type: ignore[index]
    if r.model.layout is not None:
        ratios = r.model.layout.ratios
        assert not isinstance(ratios, (dict, LineDict)) and ratios == dict(ratios)
        with pytest.raises(TypeError):
            ratios["atlas"] = 0.5  # type: ignore[index]
        assert type(r.to_dict()["model"]["layout"]["ratios"]) is dict
    for other in (pickle.loads(pickle.dumps(r)), copy.deepcopy(r)):
        assert other == r and other.hash() == r.hash() and other.to_dict() == r.to_dict()
        assert other.layers == r.layers and dict(other.components) == dict(r.components)


def test_defaults_fill_missing_sections():
    r = load_recipe({"name": "t", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA"}})
    assert set(r.components) == {"gated_attn", "mlp"}
    assert r.component("GA") == r.components["gated_attn"]
    assert r.model.ffn == "mlp" and r.model.meta_tokens == 0 and r.model.norm.eps == 1e-6


def test_yaml_12_floats_and_ints():
    text = ("name: t\nmodel:\n  vocab_size: 64\n  d_model: 32\n  block_pattern: GA\n  norm: {eps: 1e-5}\n"
            "components:\n  gated_attn: {rope: {theta: 10000, scaling: {kind: linear, factor: 2}}}\n")
    r = load_recipe(text)
    assert r.model.norm.eps == 1e-5 and isinstance(r.model.norm.eps, float)
    rope = r.components["gated_attn"].rope
    assert isinstance(rope.theta, float) and rope.theta == 10000.0
    assert isinstance(rope.scaling.factor, float)
    # YAML 1.2 ints too: a leading 0 is decimal (1.1: 040 was octal 32), base 60 (1.1: 1:30 was 90) refused
    assert load_recipe(text.replace("d_model: 32", "d_model: 040")).model.d_model == 40
    # ... with the digits 8 and 9 as well (no YAML 1.1 octal: 08 and 048 were read as text, refused as
    # 'expected an integer, got str', while 040 was 40)
    for written, value in (("08", 8), ("048", 48), ("+096", 96)):
        assert load_recipe(text.replace("d_model: 32", f"d_model: {written}")).model.d_model == value
    with pytest.raises(RecipeError, match=r"<recipe>:4: invalid YAML: '1:30' is a base-60 number in YAML 1.1 only"):
        load_recipe(text.replace("d_model: 32", "d_model: 1:30"))
    with pytest.raises(RecipeError, match=r"name: must be one line of printable text, got 'a\\nb'"):
        load_recipe(text.replace("name: t", 'name: "a\\nb"'))


def test_yaml_12_booleans(tmp_path):
    """Booleans are YAML 1.2's, as numbers are: true / false (True, TRUE, False, FALSE) only. YAML 1.1's
    yes / no / on / off (PyYAML's) are text, so a bool setting given ``yes`` is an ordinary type
    error, and ``on:`` an ordinary key (it was 'keys must be text, got 'on''); a plain ``=`` is text
    (1.1's value tag: it was "YAML tag '!!value' is not allowed"). Found by a review of the loader."""
    text = ("name: t\nmodel:\n  vocab_size: 64\n  d_model: 32\n  block_pattern: GA\n"
            "components:\n  gated_attn: {qk_norm: true}\n")
    for spelled, value in (("true", True), ("True", True), ("TRUE", True), ("false", False), ("False", False),
                           ("FALSE", False)):
        assert load_recipe(text.replace("qk_norm: true", f"qk_norm: {spelled}")).components[
            "gated_attn"].qk_norm is value
    p = tmp_path / "r.yaml"
    for spelled in ("yes", "no", "on", "off", "Yes", "NO", "On", "OFF", "y", "n"):
        p.write_text(text.replace("qk_norm: true", f"qk_norm: {spelled}"))
        assert errors_of(p) == [f"{p}:7: components.gated_attn.qk_norm: wrong type: expected true or false, "
                                f"got str {spelled!r}"]
    assert errors_of(text + "on: 1\n") == ["<recipe>:8: on: unknown key"]
    assert load_recipe(text.replace("name: t", "name: =")).name == "="
    with pytest.raises(RecipeError, match=r"^<recipe>:7: invalid YAML: 'yes' is not a boolean \(true or false\)$"):
        load_recipe(text.replace("qk_norm: true", "qk_norm: !!bool yes"))
    assert load_recipe(text.replace("qk_norm: true", "qk_norm: !!bool FALSE")).components["gated_attn"].qk_norm is False


@pytest.mark.parametrize("key", ["a\nb", "a\rb", "a\x1b[2Jb", "a\u2028b", "a\x85b"])
def test_a_key_with_control_characters_stays_one_printable_line(tmp_path, key):
    """A key holding a line break or a control character was printed raw in the key path: a
    carriage return, U+2028 or NEL split ``hymba check``'s one line (str.splitlines) and an escape
    sequence reached the terminal; the name had this rule, keys did not. Found by probing check."""
    escaped = repr(key)[1:-1]
    text = f'name: t\nmodel: {{vocab_size: 64, d_model: 32, block_pattern: GA, "{escaped}": 1}}\n'
    p = tmp_path / "r.yaml"
    p.write_text(text)
    (err,) = errors_of(p)
    assert err == f"{p}:2: model.{escaped}: unknown key", err
    assert len(err.splitlines()) == 1 and err.isprintable()
    # unknown component sections and ratio names are keys too
    (err,) = errors_of(text.replace(f', "{escaped}": 1', "") + f'components: {{"{escaped}": {{}}}}\n')
    assert err.startswith(f"<recipe>:3: components.{escaped}: unknown component") and err.isprintable(), err


def test_merge_keys_may_override():
    text = ("name: t\nmodel:\n  <<: {vocab_size: 64, d_model: 16, block_pattern: GA}\n  d_model: 32\n")
    assert load_recipe(text).model.d_model == 32


@pytest.mark.parametrize("model, d_model", [
    ("{<<: [{d_model: 16}, {d_model: 48}], vocab_size: 64, block_pattern: GA}", 16),
    ("{<<: [{d_model: 16}, {<<: {d_model: 48}}], vocab_size: 64, block_pattern: GA}", 16),
    ("{<<: [{<<: {d_model: 16}}, {d_model: 48}], vocab_size: 64, block_pattern: GA}", 16),
    ("{d_model: 32, <<: [{d_model: 16}, {d_model: 48}], vocab_size: 64, block_pattern: GA}", 32),
    ("{<<: {d_model: 16, <<: {d_model: 48}}, vocab_size: 64, block_pattern: GA}", 16),
])
def test_merge_list_earlier_mappings_win(model, d_model):
    """YAML's merge key: the keys of a mapping override merged ones, and of a merged list the earlier
    mappings override the later ones. PyYAML 6.0.4's flatten_mapping drops a repeated key by the id()
    of its text, so a key string that Python does not share (``d_model``; one-letter keys are shared)
    took the later mapping's value: ``<<: [{d_model: 16}, {d_model: 48}]`` read 48. Found by probing
    merge keys."""
    assert load_recipe(f"name: t\nmodel: {model}\n").model.d_model == d_model


def test_several_errors_are_all_reported(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel:\n  vocab_size: 64\n  d_modl: 32\n  block_patern: GA\n")
    errs = errors_of(p)
    assert errs[0] == f"{p}:4: model.d_modl: unknown key (did you mean 'd_model'?)"
    assert errs[1] == f"{p}:5: model.block_patern: unknown key (did you mean 'block_pattern'?)"
    assert f"{p}:2: model.d_model: missing required key" in errs
    assert all("\n" not in e for e in errs)
    assert str(RecipeError(errs)).splitlines() == errs


def test_dict_sources_are_named_recipe():
    errs = errors_of({"name": "t", "model": {"vocab_size": 64, "d_model": 32, "block_pattern": "GA"},
                      "components": {"gated_attn": {"n_heads": 3}}})
    assert errs == ["<recipe>:1: components.gated_attn.n_heads: must divide d_model (32) when head_dim is not given"]


@pytest.mark.parametrize("source, message", [
    ("missing/recipe.yaml", "missing/recipe.yaml: file not found"),
    ("configs/gpt_tiny", "'configs/gpt_tiny' is neither an existing recipe file nor a YAML mapping"),
    ("", "empty recipe"),
    ("- 1\n- 2\n", "a recipe must be a mapping with 'name' and 'model', got a list"),
])
def test_bad_sources(source, message):
    errs = errors_of(source)
    assert len(errs) == 1 and message in errs[0]


def test_directory_and_pathlike(tmp_path):
    # no line to name: FILE: message, not FILE:0: message
    assert errors_of(tmp_path) == [f"{tmp_path}: is a directory, expected a recipe file"]
    assert errors_of(tmp_path / "nope") == [f"{tmp_path / 'nope'}: file not found"]  # a Path is always a path
    assert errors_of(str(tmp_path / "nope.yaml")) == [f"{tmp_path / 'nope.yaml'}: file not found"]
    (tmp_path / "latin1.yaml").write_bytes(b"name: caf\xe9\n")
    (err,) = errors_of(tmp_path / "latin1.yaml")
    assert err.startswith(f"{tmp_path / 'latin1.yaml'}: cannot read: ") and ":0:" not in err


@pytest.mark.parametrize("text, line, context", [
    # the problem is found at the end of the stream, on the line after the last one
    ("name: x\nmodel: {vocab_size: 64, d_model: 32,\n  block_pattern: GA\n", 3, "flow mapping started at line 2"),
    ("name: x\nmodel: {vocab_size: 64, d_model: 32,\n  block_pattern: GA", 3, "flow mapping started at line 2"),
    ("name: x\nmodel: [1,\n\n\n", 2, None),  # trailing blank lines: the last line with text
    ("name: 'x\n", 1, None),
    # a flow node the stream ends in is marked at the end too: it said "(... started at line 2)" of a 1-line file
    ("name: [\n", 1, None),
    ("name: x\nmodel: [", 2, None),
])
def test_yaml_error_at_the_end_points_at_the_last_line(tmp_path, text, line, context):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:{line}: invalid YAML: "), err
    assert line <= len(text.splitlines())
    if context:
        assert err.endswith(f"(while parsing a {context})"), err
    else:
        assert "started at line" not in err, err


def test_bool_is_never_a_number():
    for key in ("vocab_size", "init_std", "meta_tokens"):
        errs = errors_of(tiny(**{key: True}))
        assert errs[0].endswith(f"model.{key}: wrong type: expected {'a number' if key == 'init_std' else 'an integer'}, got bool True")


def test_non_finite_numbers_are_refused():
    for v in (float("inf"), float("-inf"), float("nan")):
        errs = errors_of(tiny(init_std=v))
        assert "model.init_std: must be a finite number" in errs[0]


def test_null_where_a_value_is_required():
    errs = errors_of(tiny(d_model=None))
    assert errs == ["<recipe>:1: model.d_model: wrong type: expected an integer, got null"]
    # null is fine where the field is optional
    assert load_recipe(tiny(n_layers=None)).model.n_layers is None


def test_default_component_errors_point_at_the_pattern(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("name: t\nmodel:\n  vocab_size: 64\n  d_model: 30\n  block_pattern: GA\n")
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:5: components.gated_attn.n_heads: must divide d_model (30)")
    assert "(default; set it under components.gated_attn)" in err


def test_unused_sections_are_still_validated():
    d = tiny()
    d["components"]["gdn"] = {"n_heads": 0}
    assert errors_of(d) == ["<recipe>:1: components.gdn.n_heads: must be >= 1, got 0"]


@pytest.fixture
def moe_not_available(monkeypatch):
    """Pretend the moe ffn is not implemented yet (whether or not it is registered now)."""
    for table in (registry._ENTRIES, registry._ALIASES):
        if "moe" in table:
            monkeypatch.delitem(table, "moe")
    monkeypatch.setitem(registry._RESERVED, "moe", "moe")


def test_reserved_ffn_default_is_not_available(moe_not_available):
    errs = errors_of(tiny(ffn="moe"))
    assert errs == ["<recipe>:1: model.ffn: 'moe' is not available yet"]
    errs = errors_of(tiny(block_pattern="GA | GA+moe"))
    assert errs == ["<recipe>:1: model.block_pattern: ffn 'moe' at column 9 is not available yet"]
    d = tiny()
    d["components"]["moe"] = {}
    assert errors_of(d) == ["<recipe>:1: components.moe: component 'moe' is not available yet"]


# --------------------------------------------------------------------------- layout and n_layers


#: the seed's 40-layer recipe (configs/quad_hybrid_full.yaml) resolves to exactly this
QUAD_HYBRID_FULL = ("M3 | GD | GA | M3 | ATL | GD | M3 | GA | GD | M3 | GD | M3 | GA | GD | ATL | M3 | GD | GA | "
                    "M3 | GD | M3 | GD | GA | M3 | ATL | GD | M3 | GA | GD | M3 | GD | M3 | GA | GD | ATL | M3 | "
                    "GD | GA | M3 | GD")


def test_expand_ratios_seed_example():
    seed = {"atlas": 0.1, "mamba3": 0.35, "gdn": 0.35, "gated_attn": 0.2}
    ten = expand_ratios(10, seed)
    assert [ten.count(k) for k in seed] == [1, 4, 3, 2]
    # interleaved through depth, not grouped by type (ATL, M3 x4, GD x3, GA x2 before)
    assert ten == ["mamba3", "gdn", "gated_attn", "mamba3", "atlas", "gdn", "mamba3", "gated_attn", "gdn", "mamba3"]
    forty = expand_ratios(40, seed)
    assert [forty.count(k) for k in seed] == [4, 14, 14, 8]


def test_seed_full_recipe_layout_is_pinned():
    r = load_recipe(ROOT / "configs" / "quad_hybrid_full.yaml")
    again = load_recipe(ROOT / "configs" / "quad_hybrid_full.yaml")
    assert again.layers == r.layers and again.hash() == r.hash()
    assert " | ".join(s.token().split("+")[0] for s in r.layers) == QUAD_HYBRID_FULL
    assert {s.ffn for s in r.layers} == {"moe"}
    assert r.layout_line == f"layout 40 layers -> {QUAD_HYBRID_FULL}"  # every share whole: nothing rounded


def test_layout_hash_names_the_resolved_layers():
    """A checkpoint's hash names its layer order: the expansion is part of a layout
    recipe's hash (the canonical JSON sorts the ratios, whose order breaks ties)."""
    def layout(ratios):
        return {"name": "t", "model": {"vocab_size": 64, "d_model": 32, "layout": {"n_layers": 6, "ratios": ratios}},
                "components": {"gated_attn": {"n_heads": 4}}}

    a = load_recipe(layout({"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25}))
    b = load_recipe(layout({"gdn": 0.5, "gated_attn": 0.25, "mamba3": 0.25}))
    assert a.layers != b.layers and a.hash() != b.hash()
    assert load_recipe(a.to_yaml()).hash() == a.hash() and load_recipe(a.to_dict()).layers == a.layers
    assert a.layout_line.endswith("(rounded: mamba3 1.5 -> 2, gated_attn 1.5 -> 1)")
    assert load_recipe(tiny()).layout_line is None


@settings(max_examples=60, deadline=None, derandomize=True)
@given(n=st.integers(1, 200), weights=st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_expand_ratios_properties(n, weights):
    names = [f"c{i}" for i in range(len(weights))]
    ratios = {k: w / sum(weights) for k, w in zip(names, weights)}
    out = expand_ratios(n, ratios)
    assert len(out) == n
    assert out == expand_ratios(n, dict(ratios))  # deterministic
    for k, r in ratios.items():
        assert abs(out.count(k) - r * n) < 1.0 + 1e-9  # largest remainder: within one layer
    # (interleaving and spacing: tests/test_pattern.py)


def test_layout_recipe_resolves_and_round_trips():
    mixers = [n for n in ("gated_attn", "gdn") if n in registry.names("mixer")]
    ratios = {m: 1 / len(mixers) for m in mixers}
    d = {"name": "t", "model": {"vocab_size": 64, "d_model": 32, "n_layers": 4,
                                "layout": {"n_layers": 4, "ratios": ratios}},
         "components": {"gated_attn": {"n_heads": 4}}}
    r = load_recipe(d)
    assert [s.mixer for s in r.layers] == expand_ratios(4, ratios)
    assert load_recipe(r.to_dict()) == r and load_recipe(r.to_yaml()).layers == r.layers


def test_layout_aliases_and_duplicates():
    d = {"name": "t", "model": {"vocab_size": 64, "d_model": 32,
                                "layout": {"n_layers": 2, "ratios": {"GA": 0.5, "gated_attn": 0.5}}}}
    assert errors_of(d) == ["<recipe>:1: model.layout.ratios.gated_attn: names the same component as 'GA'"]
    d["model"]["layout"]["ratios"] = {"GA": 1.0}
    assert [s.mixer for s in load_recipe(d).layers] == ["gated_attn", "gated_attn"]


def test_n_layers_agreeing_is_fine():
    assert len(load_recipe(tiny(n_layers=2)).layers) == 2


# --------------------------------------------------------------------------- hash


def test_hash_is_stable_and_content_addressed(tmp_path):
    r = load_recipe(ROOT / "configs" / "gpt_tiny.yaml")
    h = r.hash()
    assert re.fullmatch(r"[0-9a-f]{12}", h)
    # key order, flow vs block style, comments and file name do not matter
    d = r.to_dict()
    rev = {k: d[k] for k in reversed(list(d))}
    rev["model"] = {k: d["model"][k] for k in reversed(list(d["model"]))}
    p = tmp_path / "other_name.yaml"
    p.write_text("# a comment\n" + yaml.safe_dump(rev, default_flow_style=False, sort_keys=False))
    assert load_recipe(p).hash() == h
    # any change of content changes it
    assert r.replace(meta_tokens=r.model.meta_tokens + 1).hash() != h
    assert r.replace(block_pattern="GA").hash() != h


def test_hash_is_the_same_in_another_process():
    code = ("from hymba_plus import load_recipe; "
            "print(load_recipe('configs/gpt_tiny.yaml').hash())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == load_recipe(ROOT / "configs" / "gpt_tiny.yaml").hash()


def test_replace_validates_again():
    r = load_recipe(tiny())
    assert r.replace(d_model=64).model.d_model == 64
    with pytest.raises(RecipeError, match="model.d_model: must be >= 1"):
        r.replace(d_model=0)


def test_a_loaded_recipe_checks_again_as_its_file_reads():
    """A train section that leaves seq_len (128) to its default under a short max_seq_len loads (the rules
    across train fields apply to what the recipe sets). Its to_dict() wrote every train default out, where
    it looks set: load_recipe(r.to_dict()) (DESIGN §2: to_dict round-trips) refused it, and so did checking
    the loaded Recipe again (load_recipe / build_model of a Recipe, Recipe.replace, which read to_dict()):
    build_model(load_recipe(path)) refused what build_model(path) built ('train.seq_len: must be <=
    model.max_seq_len (64), got 128'). Found by probing load_recipe with its own recipes."""
    from hymba_plus import build_model

    r = load_recipe({**tiny(max_seq_len=64), "train": {"steps": 5}})
    assert r.train.seq_len == 128 and r.model.max_seq_len == 64
    assert r.to_dict()["train"] == {"steps": 5}
    assert load_recipe(r.to_dict()) == r and load_recipe(r.to_dict()).hash() == r.hash()
    assert load_recipe(r) is r
    assert build_model(r).recipe is r
    assert r.replace(d_model=64).model.d_model == 64
    with pytest.raises(RecipeError, match=r"train.seq_len: must be <= model.max_seq_len \(64\), got 100"):
        load_recipe(dataclasses.replace(r, train=dataclasses.replace(r.train, seq_len=100)))


# --------------------------------------------------------------------------- generated recipes

_scaling = st.one_of(
    st.none(),
    st.fixed_dictionaries({"kind": st.sampled_from(["linear", "ntk", "yarn"]),
                           "factor": st.sampled_from([1.0, 2.0, 4.5]),
                           "original_max_seq_len": st.integers(16, 4096)}),
)
_attn = st.fixed_dictionaries({
    "n_heads": st.sampled_from([2, 4]),
    "n_kv_heads": st.sampled_from([1, 2]),
    "head_dim": st.sampled_from([8, 16]),
    "window": st.one_of(st.none(), st.integers(1, 64)),
    "qk_norm": st.booleans(),
    "output_gate": st.booleans(),
    "rope": st.fixed_dictionaries({"theta": st.sampled_from([10000.0, 5e5]),
                                   "fraction": st.sampled_from([0.0, 0.5, 1.0]), "scaling": _scaling}),
})
_recipe = st.fixed_dictionaries({
    "name": st.text("abcdefghij-_", min_size=1, max_size=12),
    "model": st.fixed_dictionaries({
        "vocab_size": st.integers(2, 1000),
        "d_model": st.sampled_from([32, 64]),
        "block_pattern": st.sampled_from(["GA", "GA | -", "(GA+none | GA)*2", "- | GA+mlp"]),
        "meta_tokens": st.integers(0, 4),
        "tie_embeddings": st.booleans(),
        "norm": st.fixed_dictionaries({"zero_centered": st.booleans(), "eps": st.sampled_from([1e-6, 1e-5])}),
    }),
    "components": st.fixed_dictionaries({"gated_attn": _attn, "mlp": st.fixed_dictionaries(
        {"d_hidden": st.one_of(st.none(), st.integers(1, 256))})}),
})


@settings(max_examples=40, deadline=None, derandomize=True)
@given(d=_recipe)
def test_generated_recipes_round_trip(d):
    r = load_recipe(d)
    assert isinstance(r, Recipe)
    again = load_recipe(r.to_yaml())
    assert again == r and again.hash() == r.hash()
    assert load_recipe(r.to_dict()).to_dict() == r.to_dict()


# --------------------------------------------------------------------------- fuzz: never a traceback

_LINE = re.compile(r"^(<recipe>|[^:\n]+):\d+: [^\n]+$")
_leaf = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.floats(allow_nan=True),
                  st.text(max_size=6), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=4), st.integers(), max_size=2))


def _paths(d, prefix=()):
    for k, v in d.items():
        yield (*prefix, k)
        if isinstance(v, dict):
            yield from _paths(v, (*prefix, k))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(data=st.data())
def test_mutated_recipes_load_or_fail_cleanly(data):
    """Any change to a valid recipe (any of configs/; a value of any type, a deleted key, an
    unknown key) either loads or raises RecipeError with one well-formed line per problem."""
    config = data.draw(st.sampled_from(sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))))
    base = yaml.safe_load((ROOT / "configs" / config).read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(base))
        path = data.draw(st.sampled_from(paths))
        parent = base
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if action == "set":
            parent[path[-1]] = data.draw(_leaf)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.text("abcxyz_", min_size=1, max_size=5))] = data.draw(_leaf)
        if not isinstance(base, dict) or not base:
            break
    for source in (base, yaml.safe_dump(base)):
        try:
            load_recipe(source)
        except RecipeError as e:
            assert e.errors and all(_LINE.match(line) for line in e.errors), e.errors


@pytest.mark.parametrize(("config", "component", "change", "message"), [
    ("quad_hybrid_tiny", "atlas", {"head_dim": -1}, "components.atlas.head_dim: must be >= 1, got -1"),
    ("quad_hybrid_tiny", "atlas", {"head_dim": None, "n_heads": 0}, "components.atlas.n_heads: must be >= 1, got 0"),
    ("hymba_tiny", "hymba", {"ssm": "x"}, "components.hymba.ssm: must be one of 'mamba3', 'gdn', got 'x'"),
])
def test_out_of_range_value_is_reported_before_the_rules_across_fields(config, component, change, message):
    """A value out of its range is that one error, not a crash of a rule that reads it (ATLAS's
    feature count of a negative head_dim raised ValueError, n_heads 0 divided by zero: found by
    ``make test-deep`` in the mutated-recipes property; hymba's ``ssm: x`` was looked up in the
    registry as a component to build: found by mutating every config)."""
    base = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    base["components"][component].update(change)
    with pytest.raises(RecipeError) as e:
        load_recipe(base)
    assert [line.split(": ", 1)[1] for line in e.value.errors] == [message]


@pytest.mark.parametrize(("config", "component", "change", "key"), [
    ("quad_hybrid_tiny", "mamba3", {"dt_init_floor": 1e300}, "components.mamba3.dt_init_floor"),
    ("quad_hybrid_tiny", "mamba3", {"a_floor": 1e39}, "components.mamba3.a_floor"),
    ("hymba_tiny", "hymba", {"beta_init": 1e300}, "components.hymba.beta_init"),
    ("etd_tiny", "etd_router", {"halting": {"init_bias": -1e300}}, "components.etd_router.halting.init_bias"),
])
def test_floats_past_float32_range_are_refused(config, component, change, key):
    """A float setting past float32's range fills or scales a float32 tensor: it passed ``hymba check``
    (built on the meta device, nothing filled) and failed in ``build_model`` (RuntimeError: value cannot
    be converted to type float without overflow) or at the first forward (a_floor's clamp). Found by
    probing the checker with extreme values."""
    base = yaml.safe_load((ROOT / "configs" / f"{config}.yaml").read_text())
    base["components"].setdefault(component, {}).update(change)
    with pytest.raises(RecipeError) as e:
        load_recipe(base)
    (err,) = e.value.errors
    assert err.split(": ", 1)[1].startswith(f"{key}: must be within float32's range (magnitude <= 3.403e+38), got "), err
    # a range of the spec's own says its own message first (dropout: at most 1)
    assert errors_of(tiny(dropout=1e300)) == ["<recipe>:1: model.dropout: must be <= 1.0, got 1e+300"]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text=st.text(alphabet="nameodl:{}[]-,\"'!&*#|> \n\t0123.eE", max_size=60))
def test_arbitrary_text_loads_or_fails_cleanly(text):
    try:
        load_recipe(text + "\n")
    except RecipeError as e:
        assert e.errors and all(_LINE.match(line) for line in e.errors), e.errors


def test_values_python_cannot_convert_are_one_line_errors():
    """An integer past float range in a float field (OverflowError), a pattern repeat count of 5000
    digits or in other digits than ASCII (ValueError from int()): each one RecipeError line."""
    base = {"name": "r", "model": {"vocab_size": 32, "d_model": 16, "block_pattern": "GA"}}
    with pytest.raises(RecipeError, match=r"model.init_std: must be a finite number, got 1000.*\(401 characters\)"):
        load_recipe({**base, "model": {**base["model"], "init_std": 10**400}})
    for count, says in [("9" * 5000, "pattern expands to more than 4096 layers"),
                        ("\u00b2", "unexpected character '\u00b2' at column 4"),
                        ("0" * 5000 + "2", None)]:
        src = {**base, "model": {**base["model"], "block_pattern": f"GA*{count}"}}
        if says is None:
            assert load_recipe(src).pattern == "GA+mlp | GA+mlp"
        else:
            with pytest.raises(RecipeError, match=re.escape(says)):
                load_recipe(src)


def test_to_yaml_quotes_strings_the_loader_reads_as_numbers(tmp_path):
    """A name or data path like '1e3' was written unquoted and read back as the float 1000.0: the
    checkpoint's recipe.yaml no longer loaded."""
    r = load_recipe({"name": "1e3", "model": {"vocab_size": 32, "d_model": 16, "block_pattern": "GA"},
                     "train": {"data": "2e5"}})
    back = load_recipe(r.to_yaml())
    assert back == r and back.name == "1e3" and back.train.data == "2e5" and back.hash() == r.hash()
    r = load_recipe({"name": "08", "model": {"vocab_size": 32, "d_model": 16, "block_pattern": "GA"}})
    assert load_recipe(r.to_yaml()).name == "08"


def test_block_diffusion_seq_len_rule_applies_to_what_the_recipe_sets():
    """A train section without seq_len took the default (128) for the rule and failed naming a key the
    file does not have; --seq-len could not fix it (the recipe never loaded)."""
    r = {"name": "r", "model": {"vocab_size": 32, "d_model": 16, "max_seq_len": 96, "block_pattern": "GA"},
         "objective": {"kind": "block_diffusion", "block_size": 48}}
    assert load_recipe({**r, "train": {"steps": 10}}).train.steps == 10
    with pytest.raises(RecipeError, match=r"train.seq_len: must be a multiple of objective.block_size \(48\), got 64"):
        load_recipe({**r, "train": {"seq_len": 64}})


def test_layout_recipes_differing_in_ratio_order_are_not_equal():
    """Ratios in another order resolve to other layers (and hash differently): == said equal."""
    def layout(ratios: dict) -> Recipe:
        return load_recipe({"name": "r", "model": {"vocab_size": 32, "d_model": 32,
                                                   "layout": {"n_layers": 6, "ratios": ratios}},
                            "components": {"gated_attn": {"n_heads": 2}, "gdn": {"n_heads": 2},
                                           "mamba3": {"head_dim": 16, "state_size": 16}}})
    a = layout({"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25})
    b = layout({"gdn": 0.5, "gated_attn": 0.25, "mamba3": 0.25})
    assert a.pattern != b.pattern and a != b and a.hash() != b.hash()
    assert a == layout({"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25})


@pytest.mark.parametrize("newline", ["\n", "\r\n", "\r", "\u2028"])
@pytest.mark.parametrize("before", ["", "é€"])
def test_a_disallowed_character_names_its_line_with_any_line_break(tmp_path, newline, before):
    """The line of a character YAML does not allow is counted as the parser counts lines: only ``\\n``
    was counted, so a recipe string with old Mac ``\\r`` line endings said line 1 (a file's are read as
    ``\\n``) and U+2028 / NEL breaks were missed in files too; and libyaml reports the character's place
    in UTF-8 bytes, so text before it that is not ASCII moved the count past it. Found by a review of
    the recipe language."""
    lines = [f"name: t{before}", "model:", "  vocab_size: 64", "  d_model: 32", "  block_pattern: GA",
             f"  meta_tokens: 0 # {before}", "  dropout: \x07"]
    text = newline.join(lines) + newline + "# end" + newline
    p = tmp_path / "r.yaml"
    p.write_bytes(text.encode())
    (err,) = errors_of(p)
    assert err.startswith(f"{p}:7: invalid YAML: unacceptable character #x0007"), err
    (err,) = errors_of(text)  # (a file's \r and \r\n are read as \n: a string keeps them)
    assert err.startswith("<recipe>:7: invalid YAML: unacceptable character #x0007"), err


def test_a_component_built_directly_refuses_a_config_out_of_range():
    """A config made in code never passes the loader: ``Atlas(AtlasConfig(memory_depth=1))`` built a
    depth-2 memory silently (``memory_depth - 2`` hidden layers: none), ``MoE(MoEConfig(top_k=0))``
    failed at its first forward with a reshape error, ``SwiGLU(MLPConfig(d_hidden=0))`` built an
    empty layer. Every registered component checks its config's ranges (the loader's ``spec`` rules
    and messages) when it is built; the rules across fields need the model and stay the loader's."""
    from hymba_plus.components.atlas import Atlas, AtlasConfig

    with pytest.raises(ValueError, match=re.escape("AtlasConfig.memory_depth: must be >= 2, got 1")):
        Atlas(AtlasConfig(memory_depth=1), d_model=32)
    assert len(Atlas(AtlasConfig(memory_depth=3), d_model=32).memory) == 4  # in range: built as before
    with pytest.raises(ValueError, match=re.escape("MLPConfig.d_hidden: must be >= 1, got 0")):
        registry.build("mlp", registry.get("mlp").config(d_hidden=0), d_model=32)
    router = registry.get("etd_router").config()  # nested configs: the key path through them
    router = dataclasses.replace(router, layer_router=dataclasses.replace(router.layer_router, hidden=0))
    with pytest.raises(ValueError, match=re.escape("EtdRouterConfig.layer_router.hidden: must be >= 1, got 0")):
        registry.build("etd_router", router, d_model=32, n_layers=2)
    from hymba_plus.core.recipe import LaDiRConfig  # a head: its config is the recipe's ladir section

    with pytest.raises(ValueError, match=re.escape("LaDiRConfig.memory_slots: must be >= 1, got 0")):
        registry.build("ladir", LaDiRConfig(memory_slots=0), d_model=32, max_seq_len=64)
    checked = []
    for name in registry.names():
        cls = registry.get(name).config
        if cls is None:
            continue
        try:
            cfg = cls()
        except TypeError:  # required keys: no default config to vary
            continue
        field = next((f for f in dataclasses.fields(cls) if f.metadata.get("min") is not None
                      and type(getattr(cfg, f.name)) is int), None)
        if field is None:
            continue
        bad = dataclasses.replace(cfg, **{field.name: field.metadata["min"] - 1})
        with pytest.raises(ValueError, match=re.escape(f"{cls.__name__}.{field.name}: must be >= ")):
            registry.build(name, bad, d_model=32, vocab_size=64, n_layers=2)
        checked.append(name)
    assert {"atlas", "gated_attn", "gdn", "mamba3", "moe"} <= set(checked), checked


def test_a_fixed_length_list_of_the_wrong_length_names_the_length() -> None:
    """A fixed-length list (``tuple[float, float, float]``: ladir's Prophet thresholds) of the wrong
    length said "wrong type: expected tuple[float, float, float], got a list"; it says the length it
    needs. Found by a review."""
    r = {"name": "x", "model": {"vocab_size": 24, "d_model": 32, "block_pattern": "GA"},
         "components": {"gated_attn": {"n_heads": 2}}, "objective": {"kind": "ladir"},
         "ladir": {"latent_dim": 8, "memory_slots": 2, "prophet": {"thresholds": [1.0, 2.0]}}}
    assert errors_of(r) == ["<recipe>:1: ladir.prophet.thresholds: must be a list of 3 numbers, got 2"]
    r["ladir"]["prophet"]["thresholds"] = 5
    assert errors_of(r) == ["<recipe>:1: ladir.prophet.thresholds: wrong type: expected a list of 3 numbers, got int 5"]
    r["ladir"]["prophet"]["thresholds"] = [1.0, 2.0, "a"]
    assert errors_of(r) == ["<recipe>:1: ladir.prophet.thresholds[2]: wrong type: expected a number, got str 'a'"]
    r["ladir"]["prophet"]["thresholds"] = [3.0, 2.0, 1.0]
    assert load_recipe(r).ladir.prophet.thresholds == (3.0, 2.0, 1.0)
