"""block_pattern grammar (DESIGN §3): expansion, column-precise errors, reserved names."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import load_recipe, registry
from hymba_plus.core.pattern import (
    ALIAS_ORDER,
    LayerSpec,
    PatternError,
    describe_layout,
    expand_ratios,
    format_pattern,
    known_mixers,
    layout_rounding,
    parse_pattern,
    ratio_counts,
)


def flat(text: str, default_ffn: str = "mlp") -> list[tuple[str, str]]:
    return [(s.mixer, s.ffn) for s in parse_pattern(text, default_ffn)]


GA, NONE = "gated_attn", "none"


@pytest.mark.parametrize("text, expected", [
    ("GA", [(GA, "mlp")]),
    ("GA | GA", [(GA, "mlp")] * 2),
    ("GA|-", [(GA, "mlp"), (NONE, "mlp")]),
    ("GA+none | -+mlp", [(GA, "none"), (NONE, "mlp")]),
    ("GA*3", [(GA, "mlp")] * 3),
    ("GA+none*2", [(GA, "none")] * 2),
    ("(GA | -)*2", [(GA, "mlp"), (NONE, "mlp")] * 2),
    ("((GA)*2 | -+none)*2", ([(GA, "mlp")] * 2 + [(NONE, "none")]) * 2),
    ("(((GA)))", [(GA, "mlp")]),
    ("  GA\t|\n( - ) * 2  ", [(GA, "mlp"), (NONE, "mlp"), (NONE, "mlp")]),
    ("GA + none * 2", [(GA, "none")] * 2),
    ("gated_attn | attn | attention", [(GA, "mlp")] * 3),
    ("none", [(NONE, "mlp")]),
])
def test_expansion(text, expected):
    assert flat(text) == expected


def test_default_ffn_applies_only_without_plus():
    assert flat("GA | GA+mlp | GA+none", default_ffn="none") == [(GA, "none"), (GA, "mlp"), (GA, "none")]


def test_every_registered_mixer_parses_by_name_and_alias():
    for name in registry.names("mixer"):
        entry = registry.get(name)
        for alias in (name, *entry.aliases):
            assert flat(f"{alias} | GA") == [(name, "mlp"), (GA, "mlp")]


def test_moe_in_pattern_when_registered():
    if "moe" in registry.names("ffn"):
        assert flat("GA+moe | GA") == [(GA, "moe"), (GA, "mlp")]
    else:
        with pytest.raises(PatternError, match="ffn 'moe' at column 4 is not available yet"):
            parse_pattern("GA+moe")


@pytest.mark.parametrize("text, message, column", [
    ("GA | GX", "unknown mixer 'GX' at column 6", 6),
    ("GA|GX", "unknown mixer 'GX' at column 4", 4),
    ("GA | (GX | GA)*2", "unknown mixer 'GX' at column 7", 7),
    ("GA+mpl", "unknown ffn 'mpl' at column 4; known: mlp, moe, none (did you mean 'mlp'?)", 4),
    ("GA |", "unexpected end of pattern at column 5", 5),
    ("| GA", "expected a layer token at column 1, found '|'", 1),
    ("GA | | GA", "expected a layer token at column 6, found '|'", 6),
    ("(GA", "missing ')' for the group opened at column 1 (at column 4)", 4),
    ("(GA | (GA)", "missing ')' for the group opened at column 1 (at column 11)", 11),
    ("GA)", "unmatched ')' at column 3", 3),
    ("GA*0", "repeat count must be a positive integer, got '0' at column 4", 4),
    ("(GA)*x", "repeat count must be a positive integer, got 'x' at column 6", 6),
    ("GA**2", "repeat count must be a positive integer, got '*' at column 4", 4),
    ("GA*", "unexpected end of pattern at column 4", 4),
    ("GA+", "unexpected end of pattern at column 4", 4),
    ("GA $ GA", "unexpected character '$' at column 4", 4),
    ("()", "expected a layer token at column 2, found ')'", 2),
    ("(GA)*2*3", "unexpected '*' at column 7", 7),
    ("GA*2+mlp", "unexpected '+' at column 5", 5),
    ("GA GA", "unexpected 'GA' at column 4", 4),
    ("((GA)*64)*65", "pattern expands to more than 4096 layers at column 11", 11),
    ("", "block_pattern is empty", 1),
    ("   ", "block_pattern is empty", 1),
])
def test_errors_carry_the_column(text, message, column):
    with pytest.raises(PatternError) as ei:
        parse_pattern(text)
    assert message in str(ei.value)
    assert ei.value.column == column
    if text.strip():
        assert f"column {column}" in str(ei.value)


def test_unknown_mixer_lists_known_aliases():
    with pytest.raises(PatternError) as ei:
        parse_pattern("GA | (GD | GA)*2 | GX")
    msg = str(ei.value)
    m = re.search(r"unknown mixer 'GX' at column 20; known: (.*?)( \(did you mean .*\))?$", msg)
    assert m, msg
    known = m.group(1).split(", ")
    # the DESIGN aliases, in the DESIGN order, that are registered or reserved now; '-' last
    assert known == [a for a in ALIAS_ORDER if a in registry.aliases("mixer") or registry.is_reserved(a)]
    assert known == known_mixers()
    assert {"GA", "-"} <= set(known) and known[-1] == "-"


def test_design_example_message():
    """DESIGN §3's example, whatever of ATL/M3/GD/HY is registered by now (all are named:
    registered or reserved)."""
    with pytest.raises(PatternError) as ei:
        parse_pattern("GA | GX")
    assert str(ei.value).startswith("unknown mixer 'GX' at column 6; known: ATL, M3, GD, GA, HY, -")


def test_did_you_mean_for_close_names():
    with pytest.raises(PatternError, match=r"did you mean 'gated_attn'\?"):
        parse_pattern("gated_atn")


@pytest.fixture
def reserved_dummy(monkeypatch):
    """A name that stays reserved whatever lands: 'zz_future' / 'ZZ'."""
    monkeypatch.setitem(registry._RESERVED, "ZZ", "zz_future")
    monkeypatch.setitem(registry._RESERVED, "zz_future", "zz_future")


def test_reserved_names_are_not_available_yet(reserved_dummy):
    assert registry.is_reserved("ZZ") and "ZZ" not in registry.names()
    with pytest.raises(PatternError) as ei:
        parse_pattern("GA | ZZ")
    assert str(ei.value) == "mixer 'ZZ' at column 6 is not available yet (zz_future)"
    assert ei.value.column == 6
    with pytest.raises(registry.RegistryError, match="'zz_future' .* is not available yet"):
        registry.canonical("zz_future")
    # the same through the recipe loader, in a pattern, a layout and a components section
    base = {"name": "t", "model": {"vocab_size": 8, "d_model": 16, "block_pattern": "GA | ZZ"}}
    with pytest.raises(Exception, match=r"model.block_pattern: mixer 'ZZ' at column 6 is not available yet"):
        load_recipe(base)
    base["model"] = {"vocab_size": 8, "d_model": 16, "layout": {"n_layers": 2, "ratios": {"GA": 0.5, "ZZ": 0.5}}}
    with pytest.raises(Exception, match=r"model.layout.ratios.ZZ: component 'ZZ' \(zz_future\) is not available"):
        load_recipe(base)
    base["model"] = {"vocab_size": 8, "d_model": 16, "block_pattern": "GA"}
    base["components"] = {"zz_future": {}}
    with pytest.raises(Exception, match=r"components.zz_future: component 'zz_future' is not available yet"):
        load_recipe(base)


def test_registering_lifts_the_reservation(monkeypatch, reserved_dummy):
    # register into copies of the tables, so the name is gone again after the test
    for table in ("_ENTRIES", "_ALIASES", "_RESERVED"):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))

    @registry.register("zz_future", config=None, aliases=("ZZ",))
    class Future:
        pass

    assert not registry.is_reserved("ZZ")
    assert flat("ZZ | GA") == [("zz_future", "mlp"), (GA, "mlp")]


def test_layerspec_token_and_format_round_trip():
    layers = parse_pattern("(GA | -+none)*2 | attention+mlp")
    text = format_pattern(layers)
    assert text == "GA+mlp | -+none | GA+mlp | -+none | GA+mlp"
    assert parse_pattern(text) == layers
    assert LayerSpec(GA, "none").token() == "GA+none"


# --------------------------------------------------------------------------- generated patterns


def _mixer_tokens() -> list[str]:
    out = []
    for name in registry.names("mixer"):
        out += [name, *registry.get(name).aliases]
    return out


@st.composite
def patterns(draw, depth: int = 0):
    """(pattern text with random whitespace, expected flat expansion)."""
    ws = st.sampled_from(["", " ", "  ", "\t"])
    items = []
    expected: list[tuple[str, str]] = []
    for _ in range(draw(st.integers(1, 3))):
        if depth < 2 and draw(st.booleans()):
            inner, exp = draw(patterns(depth + 1))
            text = f"({draw(ws)}{inner}{draw(ws)})"
        else:
            tok = draw(st.sampled_from(_mixer_tokens()))
            mixer = registry.canonical(tok)
            ffn = draw(st.sampled_from([None, "mlp", "none"] + (["moe"] if "moe" in registry.names("ffn") else [])))
            text = tok if ffn is None else f"{tok}{draw(ws)}+{draw(ws)}{ffn}"
            exp = [(mixer, ffn or "mlp")]
        if draw(st.booleans()):
            n = draw(st.integers(1, 3))
            text = f"{text}{draw(ws)}*{draw(ws)}{n}"
            exp = exp * n
        items.append(text)
        expected += exp
    sep = draw(ws) + "|" + draw(ws)
    return sep.join(items), expected


@settings(max_examples=150, deadline=None, derandomize=True)
@given(p=patterns())
def test_generated_patterns(p):
    text, expected = p
    got = parse_pattern(text, "mlp")
    assert [(s.mixer, s.ffn) for s in got] == expected
    assert parse_pattern(format_pattern(got)) == got


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(alphabet="GA-|()*+ 0123mlpnoe", max_size=16))
def test_arbitrary_text_parses_or_fails_with_a_column(text):
    try:
        layers = parse_pattern(text)
    except PatternError as e:
        assert 1 <= e.column <= max(len(text), 0) + 1
        assert f"column {e.column}" in str(e) or str(e) == "block_pattern is empty"
    else:
        assert 1 <= len(layers) <= 4096


# --------------------------------------------------------------------------- ratio layouts


def runs_of(names: list[str], name: str) -> list[int]:
    """Gaps between consecutive layers of ``name`` (1 = adjacent)."""
    at = [i for i, n in enumerate(names) if n == name]
    return [b - a for a, b in zip(at, at[1:])]


def test_ratio_layout_interleaves_the_brief_example():
    """Not grouped by type (``GD*3 | M3*2 | GA`` before): each type spread through depth."""
    ratios = {"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25}
    assert expand_ratios(6, ratios) == ["gdn", "mamba3", "gdn", "gated_attn", "mamba3", "gdn"]
    assert describe_layout(6, ratios) == (
        "layout 6 layers -> GD | M3 | GD | GA | M3 | GD (rounded: mamba3 1.5 -> 2, gated_attn 1.5 -> 1)")


def test_ratio_layout_rounding_is_reported():
    ratios = {"gdn": 0.5, "mamba3": 0.25, "gated_attn": 0.25}
    assert ratio_counts(6, ratios) == {"gdn": 3, "mamba3": 2, "gated_attn": 1}  # equal remainders: named first
    assert [str(r) for r in layout_rounding(6, ratios)] == ["mamba3 0.25 x 6 = 1.5 -> 2",
                                                           "gated_attn 0.25 x 6 = 1.5 -> 1"]
    assert layout_rounding(8, ratios) == [] and "rounded" not in describe_layout(8, ratios)
    # float noise is not a rounding (0.29 x 100 = 28.999999999999996 in binary)
    assert layout_rounding(100, {"GA": 0.29, "GD": 0.71}) == []
    assert ratio_counts(100, {"GA": 0.29, "GD": 0.71}) == {"GA": 29, "GD": 71}
    assert describe_layout(1, {"GA": 1.0}) == "layout 1 layer -> GA"


def test_equal_counts_alternate_and_attention_is_spaced():
    """Two types with the same count share periods, staggered: attention at half the
    layers then alternates with them instead of doubling up (``GA GD M3 GA GA ...``)."""
    assert expand_ratios(8, {"GA": 0.5, "GD": 0.25, "M3": 0.25}) == ["GA", "GD", "GA", "M3"] * 2
    seed = {"atlas": 0.1, "mamba3": 0.35, "gdn": 0.35, "gated_attn": 0.2}
    forty = expand_ratios(40, seed)
    assert runs_of(forty, "gated_attn") == [5] * 7  # 8 attention layers, one every 5
    assert runs_of(forty, "atlas") == [10] * 3
    assert min(runs_of(forty, "mamba3") + runs_of(forty, "gdn")) >= 2


@settings(max_examples=300, deadline=None, derandomize=True)
@given(n=st.integers(1, 120), weights=st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_ratio_layout_properties(n, weights):
    names = [f"c{i}" for i in range(len(weights))]
    ratios = {k: w / sum(weights) for k, w in zip(names, weights)}
    out = expand_ratios(n, ratios)
    counts = ratio_counts(n, ratios)
    assert len(out) == n and out == expand_ratios(n, dict(ratios))  # deterministic
    assert {k: out.count(k) for k in names} == counts
    for k, r in ratios.items():
        assert abs(counts[k] - r * n) < 1.0 + 1e-9  # largest remainder: within one layer
        if 2 * counts[k] <= n + 1:  # at most half (rounded up): never next to itself
            assert 1 not in runs_of(out, k), (k, out)
        if counts[k] >= 2:  # spread through depth: no gap much wider than its share
            assert max(runs_of(out, k)) <= 2 * n / counts[k] + 2, (k, out)
    rounded = {r.name: r for r in layout_rounding(n, ratios)}
    for k in names:
        assert (k in rounded) == (abs(ratios[k] * n - counts[k]) > 1e-6)
