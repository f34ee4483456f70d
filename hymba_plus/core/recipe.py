"""Recipes: strict YAML -> frozen dataclasses (DESIGN §2).

Loading is strict and total. Every problem is a ``RecipeError`` whose message reads
``FILE:LINE: key.path: what is wrong (did you mean ...?)`` (``FILE: message`` when there is
no line: a missing or unreadable file, a folder). YAML is parsed with a
SafeLoader subclass that remembers the line of every key; dacite (strict) does the
dict -> dataclass step; declared ranges (``core.config.spec``) and cross-field rules run
after it. ``Recipe.to_dict()`` round-trips through ``load_recipe`` to an equal recipe and
``Recipe.hash()`` names checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dacite
import yaml

from . import registry
from .config import brief, cross_errors, first_line, in_range, range_errors, spec
from .pattern import LayerSpec, PatternError, describe_layout, expand_ratios, format_pattern, parse_pattern


class RecipeError(ValueError):
    """A recipe problem: ``FILE:LINE: key.path: message`` (``FILE: message`` when no line
    applies: a missing file, a folder). ``errors`` holds every one found."""

    def __init__(self, errors: list[str]):
        super().__init__(errors[0] if len(errors) == 1 else "\n".join(errors))
        self.errors = errors


class OverrideError(RecipeError):
    """A malformed override (``load_recipe(..., overrides=)``, ``hymba ... --set KEY=VALUE``): no ``=``, an
    empty key or key part, a value that is not valid YAML (plain data), a key path through a setting that is
    not a mapping. One line, ``--set KEY=VALUE: what is wrong``; ``hymba`` exits 2 for it (usage), 1 for a
    recipe the overrides make invalid (a ``RecipeError``)."""


# --------------------------------------------------------------------------- schema


class FrozenMap(Mapping):
    """A read-only mapping that pickles and deep-copies (a recipe's ``components`` and
    ``model.layout.ratios``; a ``types.MappingProxyType`` does not pickle). Equal to any mapping
    with the same items; its order is the one it was given."""

    __slots__ = ("_items",)

    def __init__(self, items: Any = ()) -> None:
        object.__setattr__(self, "_items", dict(items))

    def __getitem__(self, key: Any) -> Any:
        return self._items[key]

    def __iter__(self):  # noqa: ANN204
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __reduce__(self) -> tuple:
        return type(self), (self._items,)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._items!r})"


@dataclass(frozen=True)
class NormConfig:
    zero_centered: bool = True
    eps: float = spec(1e-6, gt=0.0)


@dataclass(frozen=True)
class LayoutConfig:
    n_layers: int = spec(min=1, max=4096)
    ratios: Mapping[str, float] = spec(default_factory=FrozenMap)

    def __post_init__(self) -> None:  # (read-only: a frozen recipe holds no mutable dict)
        object.__setattr__(self, "ratios", FrozenMap(self.ratios))


@dataclass(frozen=True)
class ETDConfig:
    """Encode-Think-Decode (Koishekenov et al. 2025, arXiv 2510.07358): the layers that the
    block_pattern (or layout) gives, split in order into ``encoder_layers | think_layers |
    decoder_layers``. The think layers are applied ``iterations`` times with tied weights;
    every (layer, iteration) application has its own cache state. The controller (adaptive
    halting, Dr.LLM layer routes, MoDr branches) is the ``etd_router`` component."""

    encoder_layers: int = spec(min=0)
    think_layers: int = spec(min=1)
    decoder_layers: int = spec(min=0)
    iterations: int = spec(2, min=1, max=64, doc="think iterations in training (and by default at inference)")
    max_iterations: int | None = spec(None, min=1, max=64,
                                      doc="most think iterations a cache holds states for: the adaptive "
                                          "controller's cap, and what inference may ask for (default: "
                                          "iterations)")

    @property
    def cap(self) -> int:
        return self.max_iterations if self.max_iterations is not None else self.iterations


@dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 §2.2): ``depth`` sequential modules;
    module i joins the hidden state of module i - 1 (the trunk for i = 1) with the embedding of
    the token i ahead, runs one ``block`` (a block_pattern token: a mixer and its channel
    mixer, configured by the recipe's components) and predicts the token i + 1 ahead through
    the shared final norm and head. Loss: ``weight`` times the mean of the depths' losses."""

    depth: int = spec(1, min=1, max=8, doc="prediction modules (tokens predicted beyond the next one)")
    weight: float = spec(0.3, min=0.0, doc="lambda: the MTP loss weight (mean over depths)")
    block: str = spec("GA", doc="each module's block: one block_pattern token, e.g. GA, GD+mlp, M3+moe")


@dataclass(frozen=True)
class ProphetConfig:
    """Prophet early exit (Li et al. 2025, arXiv 2508.19982): stop denoising once the answer's
    top-1 minus top-2 logit passes the threshold of the current third of the schedule."""

    enabled: bool = True
    thresholds: tuple[float, float, float] = spec((7.5, 5.0, 2.5), doc="logit-gap thresholds for progress "
                                                  "[0, 1/3), [1/3, 2/3), [2/3, 1]")
    check_every: int = spec(1, min=1, doc="denoising steps between two checks")

    def check(self, model):  # noqa: ANN001
        if any(not (t > 0) for t in self.thresholds):
            yield "thresholds", f"must be positive, got {list(self.thresholds)}"


@dataclass(frozen=True)
class LaDiRConfig:
    """Latent diffusion reasoning (LaDiR, Kang et al. 2025, arXiv 2510.04573): a VAE turns a
    reasoning segment into ``memory_slots`` latent vectors of ``latent_dim``; a flow-matching
    denoiser generates them from noise given the question; the LM answers after them
    (``components/ladir.py``)."""

    latent_dim: int = spec(128, min=1)
    memory_slots: int = spec(3, min=1, max=64)
    inference_steps: int = spec(50, min=1, max=10000, doc="Euler steps of the flow sampler")
    beta_kl: float = spec(1e-3, min=0.0, doc="weight of the VAE's KL term")
    samples: int = spec(1, min=1, max=64, doc="latent samples per question (answers by majority vote)")
    denoiser_layers: int = spec(2, min=1, max=32, doc="layers of the dedicated flow denoiser")
    denoiser_heads: int = spec(4, min=1)
    flow_target: str = spec("sample", choices=("sample", "mean"),
                            doc="the flow's target latents z_1: a draw from the VAE's posterior (the latents the "
                                "decoder was trained on) or the posterior mean (LaDiR's code)")
    flow_draws: int = spec(8, min=1, max=64, doc="noise / time draws per encoded latent in the flow loss, "
                           "which averages over them (LaDiR's code: 8)")
    init_noise_scale: float = spec(1.0, gt=0.0, doc="std of the sampler's starting noise z_0 (1: the N(0, I) the "
                                   "flow trains from; LaDiR's code: 2.5)")
    latent_noise: float = spec(0.0, min=0.0, doc="std of the Gaussian noise added to the VAE's sampled latents "
                               "before the decoder reads them, in training only (latent-noise augmentation; "
                               "LaDiR's code: 0.3)")
    diversity_scale: float = spec(0.0, min=0.0, doc="gamma of the diversity guidance between a question's "
                                  "samples: the repulsion gradient added to each sample's velocity (0: off; "
                                  "LaDiR's code: 0.1)")
    diversity_bandwidth: float = spec(0.0, min=0.0, doc="sigma of the diversity kernel (pairs nearer than sigma "
                                      "repel, farther attract); 0: each step's median distance between the "
                                      "question's points (LaDiR's code)")
    diversity_target: str = spec("estimate", choices=("estimate", "velocity"),
                                 doc="where the diversity kernel reads the samples: their estimates of z_1, "
                                     "z_t + (1 - t) v (where they are headed), or their velocities v (LaDiR's "
                                     "code, which on a field that draws the samples together draws them closer)")
    cfg_dropout: float = spec(0.0, min=0.0, lt=1.0, doc="classifier-free guidance, training: the probability that "
                              "a row of the flow loss sees the null condition (the question's states masked out "
                              "of the denoiser's attention) instead of its question (0: off; LaDiR's code: 0.1)")
    cfg_scale: float = spec(1.0, min=0.0, doc="classifier-free guidance, sampling: w in v = v_uncond + w (v_cond - "
                            "v_uncond) at every Euler step (1: unguided; needs cfg_dropout > 0 otherwise)")
    prophet: ProphetConfig = dataclasses.field(default_factory=ProphetConfig)

    def check(self, model):  # noqa: ANN001
        if model.d_model % self.denoiser_heads:
            yield "denoiser_heads", f"must divide d_model ({model.d_model}), got {self.denoiser_heads}"
        if self.cfg_scale != 1.0 and self.cfg_dropout == 0.0:
            yield "cfg_scale", (f"{self.cfg_scale:g} guides with the unconditional velocity, which a denoiser "
                                "learns only with ladir.cfg_dropout > 0 (0 here)")


@dataclass(frozen=True, kw_only=True)  # keyword-only: vocab_size (optional) stays first
class ModelConfig:
    vocab_size: int | None = spec(None, min=2, doc="required, except for models that read no tokens (forecast)")
    d_model: int = spec(min=1)
    max_seq_len: int = spec(2048, min=1)
    block_pattern: str | None = None
    layout: LayoutConfig | None = None
    ffn: str = spec("mlp", choices=("mlp", "moe", "none"))
    meta_tokens: int = spec(0, min=0)
    tie_embeddings: bool = True
    norm: NormConfig = dataclasses.field(default_factory=NormConfig)
    init_std: float = spec(0.02, gt=0.0)
    dropout: float = spec(0.0, min=0.0, max=1.0)
    n_layers: int | None = spec(None, min=1, max=4096, doc="optional: must equal the pattern's layer count")
    etd: ETDConfig | None = None
    mtp: MTPConfig | None = None


def _train_config_type() -> type:
    from ..training.config import TrainConfig

    return TrainConfig


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelConfig
    components: Mapping[str, Any] = dataclasses.field(default_factory=FrozenMap)
    train: Any = None  # training.config.TrainConfig | None
    objective: Any = None  # the objective's config (objectives/), None = next_token
    ladir: LaDiRConfig | None = None  # latent reasoning (components/ladir.py), or None
    source: str | None = dataclasses.field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:  # (read-only, and it pickles: a mappingproxy does not)
        object.__setattr__(self, "components", FrozenMap(self.components))

    @functools.cached_property
    def layers(self) -> tuple[LayerSpec, ...]:
        """One LayerSpec per layer, from block_pattern or layout."""
        return tuple(resolve_layers(self.model))

    @property
    def pattern(self) -> str:
        return format_pattern(list(self.layers))

    @property
    def layout_line(self) -> str | None:
        """For a ratio layout, one line with the layers it resolves to and what was rounded
        (``layout 6 layers -> GD | M3 | GD | GA | M3 | GD (rounded: mamba3 1.5 -> 2,
        gated_attn 1.5 -> 1)``); None for a block_pattern recipe."""
        if self.model.layout is None:
            return None
        return describe_layout(self.model.layout.n_layers, dict(self.model.layout.ratios))

    def component(self, name: str) -> Any:
        """The config of component ``name`` (its recipe section or its defaults)."""
        name = registry.canonical(name)
        if name in self.components:
            return self.components[name]
        cfg_cls = registry.get(name).config
        return cfg_cls() if cfg_cls is not None else None

    def __eq__(self, other: object) -> bool:
        """Equal settings and the same layers: a ratio layout's order decides its layers (dict
        equality ignored it: two recipes that build different models compared equal)."""
        if not isinstance(other, Recipe):
            return NotImplemented
        return (self.name, self.model, dict(self.components), self.train, self.objective, self.ladir) == (
            other.name, other.model, dict(other.components), other.train, other.objective, other.ladir) and (
            self.model.layout is None or self.layers == other.layers)

    __hash__ = None  # type: ignore[assignment]  # (mutable-looking: compare with ==, key by .hash())

    def __deepcopy__(self, memo: dict) -> "Recipe":
        """A recipe is immutable (frozen dataclasses, a read-only components mapping): copies
        share it, so ``copy.deepcopy(model)`` works."""
        return self

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data (``load_recipe`` reads it back to an equal recipe, same hash). Its
        ``train:`` section holds the settings that differ from the defaults, as a recipe file gives
        them: a default written out would read as one the recipe set, whose rules across fields then
        apply (a default ``seq_len`` above a short ``max_seq_len`` could not be loaded back)."""
        d = self._settings()
        if self.train is not None:
            default = _asdict(type(self.train)())
            d["train"] = {k: v for k, v in d["train"].items() if v != default.get(k)}
        return d

    def _settings(self) -> dict[str, Any]:
        """Every setting, train defaults included (``hash()``'s canonical form)."""
        d: dict[str, Any] = {"name": self.name, "model": _asdict(self.model)}
        d["components"] = {k: _asdict(v) for k, v in sorted(self.components.items())}
        if self.objective is not None:
            d["objective"] = _asdict(self.objective)
        if self.ladir is not None:
            d["ladir"] = _asdict(self.ladir)
        if self.train is not None:
            d["train"] = _asdict(self.train)
        return d

    def to_yaml(self) -> str:
        """The recipe as YAML (``to_dict``'s; ``load_recipe`` reads it back to an equal recipe, same hash)."""
        return yaml.dump(self.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=None)

    def hash(self) -> str:
        """12 hex digits of the canonical JSON. Settings that are null (unset optional
        sections and fields) are left out, so adding an optional field to the schema keeps
        the hashes of existing recipes; so are ``HASH_LATER_DEFAULTS``' settings at their off values."""
        d = _drop_none(self._settings())
        for section, later in HASH_LATER_DEFAULTS.items():
            for key, off in later.items():
                if key in d.get(section, {}) and d[section][key] == off:
                    del d[section][key]
        if "train" in d and "data" not in d["train"] and self.reads_tokens:
            # train.data was "mqar" by default before it could be unset (the objective's default):
            # the same recipes keep their hashes
            d["train"]["data"] = "mqar"
        if self.model.layout is not None:
            # the layers a ratio layout resolves to depend on the expansion rule (and on the
            # order of the ratios, which the canonical JSON sorts away): name them too, so a
            # checkpoint's hash names its layer order
            d["resolved_pattern"] = self.pattern
        blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def reads_tokens(self) -> bool:
        """Whether the model reads token ids (False for objectives that read numbers: forecast)."""
        kind = self.objective.kind if self.objective is not None else "next_token"
        return registry.get(objective_kinds()[kind]).cls.reads_tokens

    def replace(self, **model_changes: Any) -> "Recipe":
        """A copy with model fields changed (validated again)."""
        d = self.to_dict()
        d["model"].update(model_changes)
        return load_recipe(d)


#: settings added to a section after checkpoints of it existed, with the value that keeps the behaviour
#: before them (not None, unlike the convention): ``Recipe.hash`` leaves them out at that value, so those
#: checkpoints keep their hashes (``load_pretrained`` warns of a recipe.yaml 'edited since' otherwise)
HASH_LATER_DEFAULTS: dict[str, dict[str, Any]] = {
    # flow_draws: 1 is the loss before the option (its default, 8, is another run and hashes as one)
    "ladir": {"flow_target": "sample", "flow_draws": 1, "init_noise_scale": 1.0,
              "latent_noise": 0.0, "diversity_scale": 0.0, "diversity_bandwidth": 0.0,
              "diversity_target": "estimate", "cfg_dropout": 0.0, "cfg_scale": 1.0},
}


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


def _asdict(cfg: Any) -> Any:
    if dataclasses.is_dataclass(cfg):
        return {f.name: _asdict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [_asdict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: _asdict(v) for k, v in cfg.items()}
    return cfg


def resolve_layers(model: ModelConfig) -> list[LayerSpec]:
    if model.block_pattern is not None:
        return parse_pattern(model.block_pattern, model.ffn)
    assert model.layout is not None
    names = expand_ratios(model.layout.n_layers, dict(model.layout.ratios))
    return [LayerSpec(registry.canonical(n), model.ffn) for n in names]


# --------------------------------------------------------------------------- YAML with lines


class LineDict(dict):
    """A dict that knows the YAML line of itself and of each key."""

    line: int = 0
    key_lines: dict

    def line_of(self, key: str) -> int:
        return self.key_lines.get(key, self.line)


class LineList(list):
    """A list that knows the YAML line of each item."""

    item_lines: tuple = ()


class _LineLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when installed
    """SafeLoader (C parser if available) whose mappings remember their keys' lines."""


class _Dumper(yaml.SafeDumper):
    """``Recipe.to_yaml``'s dumper: it quotes what the loader reads as a number (a string ``1e3``)."""


# YAML 1.1 (PyYAML) reads ``1e-6`` (no dot) as a string; YAML 1.2 reads it as a float.
# Recipes follow 1.2 here, so a float field never has to accept text.
# Likewise ints: a leading 0 is decimal in 1.2 (``_construct_int``), so ``08`` and ``019`` (no 1.1 octal:
# text to PyYAML) are ints too.
for _cls in (_LineLoader, _Dumper):
    _cls.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
        list("-+0123456789."),
    )
    _cls.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(r"^[-+]?0[0-9]+$"), list("-+0"))
# Booleans too: YAML 1.2's are true / false (True, TRUE, False, FALSE) only; 1.1's yes / no / on / off are
# text (a bool setting given ``yes`` is a type error, ``on:`` a key), and so is a plain ``=`` (1.1's value
# tag). (The dumper keeps 1.1's resolvers: it quotes such text, for readers of either version.)
_LineLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in pairs if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:value")]
    for first, pairs in _LineLoader.yaml_implicit_resolvers.items()}
#: YAML 1.2's booleans (the implicit resolver's and an explicit ``!!bool``'s)
_BOOLS = ("true", "True", "TRUE", "false", "False", "FALSE")
_LineLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(f"^(?:{'|'.join(_BOOLS)})$"), list("tTfF"))


def _merged_pairs(node: yaml.MappingNode, active: frozenset = frozenset()) -> list[tuple[yaml.Node, yaml.Node]]:
    """A mapping's (key, value) nodes with its merge keys (``<<``) resolved, in an order where a later
    key wins (YAML's merge rule): the merged mappings' keys first, of a merged list the last mapping's
    first, then the mapping's own keys. (PyYAML's ``flatten_mapping`` drops a repeated merged key by
    the ``id()`` of its text: a key string Python does not share took the later mapping's value.)"""
    merged, own = [], []
    for key_node, value_node in node.value:
        if key_node.tag != _MERGE_TAG:
            own.append((key_node, value_node))
            continue
        subs = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        for sub in reversed(subs):
            if not isinstance(sub, yaml.MappingNode) or id(sub) in active:
                found = "a mapping that merges itself" if id(sub) in active else sub.id
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"expected a mapping or list of mappings for merging, but found {found}", sub.start_mark)
            merged += _merged_pairs(sub, active | {id(sub)})
    return merged + own


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LineDict:
    # duplicate and non-text keys were reported (with their key paths) by _node_errors;
    # here a later key wins, which is also YAML's merge-key (``<<``) override rule (_merged_pairs)
    out = LineDict()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in _merged_pairs(node, frozenset({id(node)})):
        key = loader.construct_object(key_node, deep=True)
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = key_node.start_mark.line + 1
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode):  # noqa: ANN202 - a generator
    # (two steps, as PyYAML's own list constructor: a list that holds an alias of itself)
    out = LineList()
    out.item_lines = tuple(item.start_mark.line + 1 for item in node.value)
    yield out
    out.extend(loader.construct_sequence(node))


_STR_TAG = "tag:yaml.org,2002:str"
_MERGE_TAG = "tag:yaml.org,2002:merge"
#: the tags a recipe may carry (plain data); anything else (``!!python/...``, custom ``!tags``) is refused
_SAFE_TAGS = {f"tag:yaml.org,2002:{t}" for t in ("str", "int", "float", "bool", "null", "map", "seq",
                                                   "merge", "timestamp")}


#: the deepest nesting of mappings / lists a recipe may have (PyYAML's constructor recurses per level:
#: a RecursionError past ~200 levels of a 600-byte file)
MAX_YAML_DEPTH = 32


def _node_errors(node: yaml.Node | None, path: str, errs: "_Errors", seen: set[int], depth: int = 0) -> None:
    """Duplicate keys, keys that are not text, tags that are not plain data and nesting deeper than
    ``MAX_YAML_DEPTH``, with their key paths (before construction)."""
    if node is None or id(node) in seen:
        return
    seen.add(id(node))
    if depth > MAX_YAML_DEPTH:
        errs.add(path.rstrip("."), f"nested more than {MAX_YAML_DEPTH} levels deep", node.start_mark.line + 1)
        return
    if node.tag not in _SAFE_TAGS:
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        errs.add(path.rstrip("."), f"YAML tag {tag!r} is not allowed in a recipe (plain data only)",
                 node.start_mark.line + 1)
        return
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        merge_line = 0
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # the merged mappings' own keys (a duplicate inside one), same path
                line = key_node.start_mark.line + 1
                if merge_line:  # (which one wins is not YAML's to say: keys are unique)
                    errs.add(f"{path}<<", f"duplicate key (first given at line {merge_line}); merge several "
                             "mappings with one <<: [a, b]", line)
                merge_line = merge_line or line
                for merged in (value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]):
                    _node_errors(merged, path, errs, seen, depth + 1)
                continue
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag != _STR_TAG:
                text = key_node.value if isinstance(key_node, yaml.ScalarNode) else "a collection"
                errs.add(f"{path}{text}" if isinstance(key_node, yaml.ScalarNode) else path.rstrip("."),
                         f"keys must be text, got {brief(text)}", line)
                continue
            key = key_node.value
            if key in first:
                errs.add(f"{path}{key}", f"duplicate key (first given at line {first[key]})", line)
            else:
                first[key] = line
            _node_errors(value_node, f"{path}{key}.", errs, seen, depth + 1)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_errors(item, f"{path.rstrip('.')}[{i}].", errs, seen, depth + 1)


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def _construct_int(loader: _LineLoader, node: yaml.ScalarNode) -> int:
    """YAML's int as YAML 1.2 reads it, as recipes read floats: a leading 0 is decimal (YAML 1.1 read
    ``040`` as octal 32), base 60 (``1:30``, 1.1's 90) is refused; past 100 digits
    refused with its line (int() of 4300+ digits is a ValueError)."""
    text = node.value.replace("_", "")
    if len(text) > 100:
        raise yaml.constructor.ConstructorError(None, None, f"an integer of {len(text)} characters", node.start_mark)
    if ":" in text:
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is a base-60 number in YAML 1.1 only: "
                                                "write the number, or quote it for text", node.start_mark)
    if re.fullmatch(r"[-+]?0[0-9]+", text):
        return int(text, 10)
    return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)


_LineLoader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _construct_bool(loader: _LineLoader, node: yaml.ScalarNode) -> bool:
    """YAML 1.2's booleans, for an explicit ``!!bool`` too (1.1's ``!!bool yes`` was true)."""
    if node.value not in _BOOLS:
        raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a boolean (true or false)",
                                                node.start_mark)
    return node.value.lower() == "true"


_LineLoader.add_constructor("tag:yaml.org,2002:bool", _construct_bool)


# --------------------------------------------------------------------------- errors


class _Errors:
    def __init__(self, file: str, root: Any, overrides: "Sequence[tuple[str, str, str]]" = ()):
        self.file = file
        self.root = root
        # per override, in the order applied: (the topmost key it added or set, its key path, ``--set KEY=VALUE``
        # as given): ``components.gdn.n_heads=8`` on a recipe without a gdn section added components.gdn
        self.overrides = tuple(overrides)
        self.items: list[str] = []

    def origin(self, path: str) -> tuple[str, str] | None:
        """(key path, ``--set KEY=VALUE``) of the last override that set or added ``path`` or a key above it,
        or an item of the list ``path`` (a check of the whole list, ``objective.clip``'s order, that an item's
        ``--set`` broke), or None: its value came from that override, not from a line of the file."""
        for top, key, flag in reversed(self.overrides):
            if path == top or path.startswith((top + ".", top + "[")) or top.startswith(path + "["):
                return key, flag
        return None

    def line(self, path: str) -> int | str:
        """Line of the deepest existing key or list item along a key path (``a.b[2].c``; a key
        may itself hold dots: ``ratios.gated.attn``); ``--set KEY=VALUE`` where an override set it."""
        hit = self.origin(path)
        if hit is not None:
            return hit[1]
        node, line = self.root, getattr(self.root, "line", 1) or 1
        rest = path
        while rest:
            if isinstance(node, LineList) and (m := re.match(r"\[(\d+)\]\.?", rest)):
                i = int(m.group(1))
                if i >= len(node.item_lines):
                    break
                line, node, rest = node.item_lines[i], node[i], rest[m.end():]
                continue
            if not isinstance(node, LineDict):
                break
            # the longest key the path goes on from (a key with dots before its prefix)
            key = max((k for k in node if isinstance(k, str) and (rest == k or rest.startswith((k + ".", k + "[")))),
                      key=len, default=None)
            if key is None:
                break
            line, node, rest = node.line_of(key), node[key], rest[len(key):].removeprefix(".")
        return line

    def add(self, path: str, message: str, line: int | str | None = None) -> None:
        """One error line: ``FILE:LINE: path: message``; ``--set KEY=VALUE: message`` at the key an
        override set (``--set KEY=VALUE: path: message`` below it), whatever line the caller names;
        ``line`` may be an override's (``line()`` of another key an override set)."""
        hit = self.origin(path)
        if hit is not None:
            where, path = f"{hit[1]}: ", "" if path == hit[0] else path
        else:
            ln = self.line(path) if line is None else line
            where = f"{ln}: " if isinstance(ln, str) else f"{self.file}:{ln}: " if self.file else f"<recipe>:{ln}: "
        if not path.isprintable():  # a key with a line break or a control character: escaped, one line
            path = "".join(c if c.isprintable() else repr(c)[1:-1] for c in path)
        self.items.append(f"{where}{path}: {message}" if path else f"{where}{message}")

    def raise_if_any(self) -> None:
        if self.items:
            raise RecipeError(self.items)


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside ``tp`` (``X``, ``X | None``, ``Optional[X]``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


def _describe(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, Mapping):
        return "a mapping"
    if isinstance(v, (list, tuple)):
        return "a list"
    return f"{type(v).__name__} {brief(v)}"


def _type_errors(tp: Any, v: Any, path: str, errs: _Errors) -> bool:
    """Check a value against a field annotation for the shapes recipes use (scalars,
    optionals, nested configs, ``dict[str, X]``, ``list/tuple[X, ...]``); True if it fits.
    Nested dataclass contents are checked by ``_check_keys``. bool is not an int here."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if v is None and type(None) in args:
            return True
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _type_errors(rest[0], v, path, errs)
        return True  # a real union: dacite decides
    ok: bool | None = None
    if tp is bool:
        ok = isinstance(v, bool)
    elif tp is int:
        ok = isinstance(v, int) and not isinstance(v, bool)
    elif tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
    elif tp is str:
        ok = isinstance(v, str)
    elif dataclasses.is_dataclass(tp):
        ok = isinstance(v, Mapping)
    elif origin in (dict, Mapping, typing.Mapping) or tp in (dict,):
        if not isinstance(v, Mapping):
            ok = False
        else:
            kt, vt = (args + (Any, Any))[:2]
            fine = True
            for k, item in v.items():
                if kt is str and not isinstance(k, str):
                    errs.add(path, f"keys must be text, got {brief(k)}")
                    fine = False
                elif vt is not Any:
                    fine = _type_errors(vt, item, f"{path}.{k}", errs) and fine
            return fine
    elif origin in (list, tuple):
        if not isinstance(v, (list, tuple)):
            ok = False
        elif origin is tuple and args and Ellipsis not in args:  # a fixed length (Prophet's 3 thresholds)
            if len(v) != len(args):
                errs.add(path, f"must be {_type_name(tp)}, got {len(v)}")
                return False
            fine = True
            for i, (et, item) in enumerate(zip(args, v)):
                fine = _type_errors(et, item, f"{path}[{i}]", errs) and fine
            return fine
        else:
            fine = True
            et = args[0] if args else Any
            if et is not Any and et is not Ellipsis:
                for i, item in enumerate(v):
                    fine = _type_errors(et, item, f"{path}[{i}]", errs) and fine
            return fine
    if ok is None:
        return True  # Any, Literal, ...: dacite decides
    if not ok:
        errs.add(path, f"wrong type: expected {_type_name(tp)}, got {_describe(v)}")
    elif isinstance(v, float) and not math.isfinite(v):
        errs.add(path, f"must be a finite number, got {v}")
        return False
    elif tp is float and isinstance(v, int) and v.bit_length() > 1000:  # float() of it: an OverflowError
        errs.add(path, f"must be a finite number, got {brief(v)}")
        return False
    return ok


def _check_keys(cls: type, data: Any, path: str, errs: _Errors) -> None:
    """Unknown keys (with suggestions), missing required keys and wrong value types, recursively."""
    if not isinstance(data, Mapping):
        return
    fields = _field_types(cls)
    known = list(fields)
    for key in data:
        if key not in fields:
            errs.add(f"{path}{key}", "unknown key" + registry.suggest(str(key), known))
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            errs.add(f"{path}{f.name}", "missing required key", errs.line(path.rstrip(".")))
        if f.name not in data:
            continue
        if not _type_errors(fields[f.name], data[f.name], f"{path}{f.name}", errs):
            continue
        sub = _dataclass_of(fields[f.name])
        if sub is not None and isinstance(data[f.name], Mapping):
            _check_keys(sub, data[f.name], f"{path}{f.name}.", errs)


def _to_dataclass(cls: type, data: Any, path: str, errs: _Errors) -> Any:
    if not isinstance(data, Mapping):
        errs.add(path.rstrip("."), f"must be a mapping, got {_describe(data)}")
        return None
    before = len(errs.items)
    _check_keys(cls, data, path, errs)
    if len(errs.items) > before:
        return None
    try:
        return dacite.from_dict(cls, dict(data), config=_DACITE)
    except dacite.WrongTypeError as e:
        errs.add(f"{path}{e.field_path}", f"wrong type: expected {_type_name(e.field_type)}, got {_describe(e.value)}")
    except dacite.MissingValueError as e:
        errs.add(f"{path}{e.field_path}", "missing required key")
    except dacite.DaciteError as e:  # UnionMatchError, StrictUnionMatchError, ...
        errs.add(path.rstrip("."), str(e))
    return None


def _as_float(v: Any) -> Any:
    """ints become floats (``theta: 10000`` is a float field); nothing else is converted."""
    if isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


_DACITE = dacite.Config(strict=True, cast=[tuple], type_hooks={float: _as_float})


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        names = [_type_name(a) for a in args if a is not type(None)]
        return " or ".join(names) + (" or null" if type(None) in args else "")
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and args and Ellipsis not in args and len(set(args)) == 1:
        plural = {int: "integers", float: "numbers", bool: "true or false values", str: "texts"}.get(args[0])
        if plural is not None:  # tuple[float, float, float]: "a list of 3 numbers"
            return f"a list of {len(args)} {plural}"
    if typing.get_origin(tp) in (dict, Mapping, typing.Mapping):
        return "a mapping"
    if isinstance(tp, type):
        return {"int": "an integer", "float": "a number", "bool": "true or false", "str": "text"}.get(
            tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "").replace("NoneType", "null")


# --------------------------------------------------------------------------- loading


def load_recipe(source: "str | os.PathLike | Mapping | Recipe",
                overrides: "Mapping[str, Any] | Sequence[str] | None" = None) -> Recipe:
    """Load and validate a recipe from a YAML path, a YAML string, a dict or a Recipe. A Recipe is
    checked again (one made with ``dataclasses.replace`` skipped the loader's checks) and returned
    as it is when the loader makes the same of it; otherwise (a section given as a plain dict, a
    used component without its section) the loader's recipe is returned.

    ``overrides`` (``hymba ... --set KEY=VALUE``): ``{"model.d_model": 256, ...}`` or ``["model.d_model=256",
    ...]``, applied in order to the parsed recipe before it is validated (``_apply_overrides``); a value
    given as text is read as YAML (``"null"``: None, ``"[1, 2]"``: a list, ``"{kind: yarn}"``: a mapping).
    A malformed one is an ``OverrideError``; an error at a key an override set names it (``--set
    model.d_model=-1: must be >= 1, got -1``) instead of a line of the file. ``source`` is not changed."""
    sets = parse_overrides(overrides)
    if isinstance(source, Recipe):
        if not sets:
            built = _build(source.to_dict(), "")
            return source if built == source else built
        source = source.to_dict()
    file = ""
    if isinstance(source, Mapping):
        data: Any = source
    else:
        text, file = _read_source(source)
        data = _parse_yaml(text, file)
        if data is _NOT_A_PATH:
            raise RecipeError([f"<recipe>:1: {str(source)!r} is neither an existing recipe file nor a "
                               "YAML mapping with 'name' and 'model'"])
    where: list[tuple[str, str, str]] = []
    if sets:
        try:
            data, where = _apply_overrides(data, sets)
        except OverrideError:
            # a key path through a value that is not a mapping: the file's mistake where the recipe takes a
            # mapping there (a file that is a list, ``model: 3``): its own errors, with their lines (exit 1);
            # the override's (exit 2) where the file is valid (``model.d_model.x=1``)
            _build(data, file)
            raise
    return _build(data, file, where)


# --------------------------------------------------------------------------- overrides (--set KEY=VALUE)


@dataclass(frozen=True)
class _Override:
    key: str  # the key path: model.d_model, components.gdn (a key may hold dots: model.layout.ratios.a.b)
    value: Any  # the value (a text given is read as YAML)
    flag: str  # how its errors name it: ``--set model.d_model=256``, as given


#: a key path's part naming list items: ``grid[1]``, ``grid[1][0]`` (a negative index is refused at the list)
_ITEMS = re.compile(r"[^\[\]]+(\[-?\d+\])+")

_SET_USAGE = "expected KEY=VALUE (a key path = a YAML value, e.g. model.d_model=256)"


def parse_overrides(overrides: Any) -> list[_Override]:
    """``load_recipe``'s ``overrides`` as a list (an ``OverrideError`` line for a malformed one): what can
    be checked without the recipe (``hymba``'s ``--set`` flags, before anything is read)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        pairs = []
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise OverrideError([f"--set {_printable(brief(key))}: a key path must be text, got "
                                     f"{_describe(key)}"])
            pairs.append((key, value, f"--set {key}={value if isinstance(value, str) else _flow(value)}"))
    elif isinstance(overrides, Sequence) and not isinstance(overrides, (str, bytes)):
        pairs = []
        for item in overrides:
            if not isinstance(item, str):
                raise OverrideError([f"overrides: each one is a 'key.path=value' string, got {_describe(item)}"])
            if "=" not in item:
                raise OverrideError([f"{_cut(_printable(f'--set {item}'))}: {_SET_USAGE}"])
            key, value = item.split("=", 1)
            pairs.append((key.strip(), value, f"--set {item}"))
    else:
        raise OverrideError(["overrides: expected a mapping {key.path: value} or a list of 'key.path=value' "
                             f"strings, got {_describe(overrides)}"])
    out = []
    for key, value, flag in pairs:
        flag = _cut(_printable(flag))
        if not key:
            raise OverrideError([f"{flag}: empty key ({_SET_USAGE})"])
        parts = key.split(".")
        if "" in parts or any(p.startswith("[") for p in parts):
            raise OverrideError([f"{flag}: empty part in the key path {key!r}"])
        bad = next((i for i, p in enumerate(parts) if ("[" in p or "]" in p) and not _ITEMS.fullmatch(p)), None)
        if bad is not None:  # (an item is KEY[N]: as errors name list items, objective.grid[1])
            raise OverrideError([f"{flag}: {'.'.join(parts[:bad + 1])}: a list item is KEY[N], N an index from 0"])
        out.append(_Override(key, _override_value(value, key, flag) if isinstance(value, str) else value, flag))
    return out


def _cut(flag: str) -> str:
    """An override as an error names it, cut to 200 characters (a pasted file as a value: its start)."""
    return flag if len(flag) <= 200 else f"{flag[:196]}..."


def _printable(text: str) -> str:
    """``text`` with line breaks and control characters escaped (an error stays one line)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _flow(value: Any) -> str:
    """A value given as data, in YAML flow style (how an error names a ``{key: value}`` override)."""
    try:
        text = yaml.dump(value, Dumper=_Dumper, default_flow_style=True, width=math.inf)
    except yaml.YAMLError:
        return brief(value)
    text = text.removesuffix("\n").removesuffix("\n...").strip()
    return text if len(text) <= 200 else f"{text[:196]}..."


def _override_value(text: str, key: str, flag: str) -> Any:
    """An override's value text read as a recipe's YAML is (``_LineLoader``: YAML 1.2 numbers and booleans,
    plain data only, no duplicate keys): ``256`` an int, ``null`` None (as is nothing), ``[1, 2]`` a list,
    ``{kind: yarn}`` a mapping. Anything else is one ``OverrideError`` line naming the override."""
    try:
        loader = _LineLoader(text)
    except UnicodeEncodeError:  # a lone surrogate: a command-line byte that is not UTF-8 (libyaml encodes the text)
        raise OverrideError([f"{flag}: invalid YAML value: not UTF-8 text"]) from None
    try:
        node = loader.get_single_node()
        errs = _Errors("", None, [(key, key, flag)])
        _node_errors(node, key + ".", errs, set())
        if errs.items:
            raise OverrideError(errs.items)
        return loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        raise OverrideError([f"{flag}: invalid YAML value: {_printable(str(e.problem or first_line(e)))}"]) from None
    except yaml.YAMLError as e:  # (a reader error: a character YAML does not allow)
        raise OverrideError([f"{flag}: invalid YAML value: {_printable(first_line(e))}"]) from None
    except RecursionError:
        raise OverrideError([f"{flag}: invalid YAML value: nested more than {MAX_YAML_DEPTH} levels deep"]) from None
    finally:
        loader.dispose()


def _apply_overrides(data: Any, sets: list[_Override]) -> tuple[Any, list[tuple[str, str, str]]]:
    """``data`` (the parsed recipe) with each override's key path set to its value, in order: a mapping on
    the path is copied (``data`` is not changed; a LineDict keeps its lines), a key it lacks added (an empty
    ``components:`` section, null, is a mapping to fill). Validation follows (``_build``), so the strict
    checks see the result; ``KEY[N]`` is item N of an existing list (``objective.clip[1]``, as errors name list
    items; set, never added); a path through a value that is not a mapping (or list) is an ``OverrideError``
    (``load_recipe``: the file's own errors where it is invalid). Also, per override, (the topmost key it
    added or set, its key path, its flag): ``_Errors.origin``'s."""
    where = []
    for ov in sets:
        data, added = _set_path({} if data is None else data, ov.key, ov, "")
        where.append((added or ov.key, ov.key, ov.flag))
    return data, where


def _set_path(node: Any, rest: str, ov: _Override, done: str) -> tuple[Any, str | None]:
    """(``node`` with ``rest`` set, the path of the topmost key added on the way or None). ``rest`` starting with
    ``[N]``: item N of the list ``node`` (an existing one: no item is added)."""
    if rest.startswith("["):
        if not isinstance(node, list):
            kind = "a mapping" if isinstance(node, Mapping) else _describe(node)
            raise OverrideError([f"{ov.flag}: {done} is {kind}, not a list"])
        m = re.match(r"\[(-?\d+)\]", rest)
        i, n = int(m.group(1)), len(node)
        if not 0 <= i < n:
            items = f"{n} item{'s' if n != 1 else ''}" + (f": [0] .. [{n - 1}]" if n else "")
            raise OverrideError([f"{ov.flag}: {done}[{m.group(1)}]: no such item ({done} has {items}"
                                 + ("; an index counts from 0, never from the end)" if i < 0 else ")")])
        items_out = LineList(node)
        items_out.item_lines = getattr(node, "item_lines", ())
        after = rest[m.end():]
        here = f"{done}[{i}]"
        if not after:
            items_out[i] = ov.value
            return items_out, None
        sub = node[i]
        items_out[i], added = _set_path({} if sub is None else sub, after.removeprefix("."), ov, here)
        return items_out, here if sub is None else added
    if not isinstance(node, Mapping):
        what = done or "the recipe"
        hint = f" (its items: {what}[0] .. [{len(node) - 1}])" if isinstance(node, list) and node else ""
        raise OverrideError([f"{ov.flag}: {what} is {_describe(node)}, not a mapping{hint}"])
    # the longest existing key the path goes on from (a key may hold dots: model.layout.ratios), else its next part
    key = max((k for k in node if isinstance(k, str) and (rest == k or rest.startswith((k + ".", k + "[")))),
              key=len, default=None) or re.split(r"[.\[]", rest, maxsplit=1)[0]
    if isinstance(node, LineDict):
        out: dict = LineDict(node)
        out.line, out.key_lines = node.line, dict(node.key_lines)
    else:
        out = dict(node)
    here = f"{done}.{key}" if done else key
    if key == rest:
        out[key] = ov.value
        return out, None
    sub = node.get(key)
    after = rest[len(key):]  # ".more" or "[N]..."
    if sub is None and after.startswith("["):  # (an empty mapping in its place read "... is a mapping, not a list")
        raise OverrideError([f"{ov.flag}: {here}: {'null' if key in node else 'not in the recipe'} (KEY[N] sets an "
                             "item of an existing list; set the whole list: --set KEY=[...])"])
    out[key], added = _set_path({} if sub is None else sub, after.removeprefix("."), ov, here)
    return out, here if sub is None else added


_NOT_A_PATH = object()


def _parse_yaml(text: str, file: str) -> Any:
    """Line-aware safe parse. Structural problems (duplicate keys, non-text keys) are
    reported with key paths before anything is constructed."""
    loader = _LineLoader(text)
    try:
        node = loader.get_single_node()
        errs = _Errors(file, None)
        _node_errors(node, "", errs, set())
        errs.raise_if_any()
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        # a problem found at the end of the stream (an unclosed bracket or quote) is marked
        # on the line after the last one: point at the last line that has text instead
        last = max((i + 1 for i, t in enumerate(text.splitlines()) if t.strip()), default=1)
        ln = min(mark.line + 1, last) if mark else 1
        where = ""
        # (a context marked at the end too, e.g. a flow node the stream ends in, is on that same last line)
        if e.context and e.context_mark is not None and min(e.context_mark.line + 1, last) != ln:
            where = f" ({e.context} started at line {min(e.context_mark.line + 1, last)})"
        raise RecipeError([f"{file or '<recipe>'}:{ln}: invalid YAML: {e.problem or e}{where}"]) from None
    except yaml.reader.ReaderError as e:  # a character YAML does not allow: its line, one line
        ln = _line_at(text, e.position, loader) if isinstance(e.position, int) else 1
        what = f"#x{e.character:04x}" if isinstance(e.character, int) else repr(e.character)
        raise RecipeError([f"{file or '<recipe>'}:{ln}: invalid YAML: unacceptable character {what} ({e.reason})"]) \
            from None
    except yaml.YAMLError as e:
        raise RecipeError([f"{file or '<recipe>'}:1: invalid YAML: {first_line(e)}"]) from None
    except RecursionError:  # the pure-Python parser's composer (libyaml's stops at 1000 levels by itself)
        raise RecipeError([f"{file or '<recipe>'}:1: invalid YAML: nested more than {MAX_YAML_DEPTH} levels deep"]) \
            from None
    finally:
        loader.dispose()
    if not file and isinstance(data, str) and "\n" not in text.strip():
        return _NOT_A_PATH  # a one-line string that parsed as a scalar: a mistyped path
    return data


def _line_at(text: str, position: int, loader: _LineLoader) -> int:
    """The line of a ReaderError's position, counted as YAML counts lines: a break is ``\\n``, ``\\r\\n``,
    ``\\r``, NEL or U+2028 / U+2029. libyaml's position counts the text's UTF-8 bytes, PyYAML's characters."""
    if isinstance(loader, getattr(yaml, "CSafeLoader", ())):  # (the parser _LineLoader runs on)
        text = text.encode("utf-8", "surrogatepass")[:position].decode("utf-8", "ignore")
    else:
        text = text[:position]
    return len(re.findall("\r\n|[\r\n\x85\u2028\u2029]", text)) + 1


def _read_source(source: "str | os.PathLike") -> tuple[str, str]:
    s = os.fspath(source)
    as_path = not isinstance(source, str) or (
        "\n" not in s and (s.endswith((".yaml", ".yml")) or os.path.exists(s)))
    if as_path:
        p = Path(s)
        if not p.exists() and p.is_symlink():
            raise RecipeError([f"{s}: a broken symlink (to {os.readlink(p)})"])
        if not p.exists():
            raise RecipeError([f"{s}: file not found"])  # no line to name: FILE: message
        if p.is_dir():
            raise RecipeError([f"{s}: is a directory, expected a recipe file"])
        try:
            return p.read_text(encoding="utf-8"), s
        except (OSError, UnicodeDecodeError) as e:
            raise RecipeError([f"{s}: cannot read: {e}"]) from None
    return s, ""


def _build(data: Any, file: str, overrides: "Sequence[tuple[str, str, str]]" = ()) -> Recipe:
    errs = _Errors(file, data, overrides)
    if data is None:
        errs.add("", "empty recipe: expected a mapping with 'name' and 'model'", 1)
        errs.raise_if_any()
    if not isinstance(data, Mapping):
        errs.add("", f"a recipe must be a mapping with 'name' and 'model', got {_describe(data)}", 1)
        errs.raise_if_any()
    top = ("name", "model", "components", "train", "objective", "ladir")
    for key in data:
        if key == "task":  # DESIGN §6: a task is what the model is trained to predict, i.e. an objective
            errs.add("task", "unknown key: a task is given as the recipe's objective (e.g. objective: {kind: "
                     "forecast, context: 512, horizon: 96, patch: 16})")
        elif key not in top:
            errs.add(str(key), "unknown key" + registry.suggest(str(key), list(top)))
    for key in ("name", "model"):
        if key not in data:
            errs.add(key, "missing required key", getattr(data, "line", 1))
    errs.raise_if_any()
    name = data["name"]
    if not isinstance(name, str) or not name.strip():
        errs.add("name", f"must be a non-empty string, got {brief(name)}")
    elif not name.isprintable():  # a line break or control character split `hymba check`'s one line
        errs.add("name", f"must be one line of printable text, got {brief(name)}")
    model = _to_dataclass(ModelConfig, data["model"], "model.", errs)
    errs.raise_if_any()
    assert model is not None
    _check_model(model, errs)
    errs.raise_if_any()
    layers = resolve_layers(model)

    comps_data = data.get("components")
    comps_data = {} if comps_data is None else comps_data  # ([] / false / 0 passed as no section)
    if not isinstance(comps_data, Mapping):
        errs.add("components", f"must be a mapping of component name -> settings, got {_describe(comps_data)}")
        errs.raise_if_any()
    comps: dict[str, Any] = {}
    # an objective's kind and its registered name (ladir's objective is registered as ladir_objective)
    objectives = {**{n: kind for kind, n in objective_kinds().items()}, **{kind: kind for kind in objective_kinds()}}
    known = [n for n in registry.names() if n not in objectives]
    for key, section in comps_data.items():
        path = f"components.{key}"
        if key in objectives:  # (its section was accepted and ignored: the objective stayed next_token)
            errs.add(path, f"{key!r} is an objective: give it as the recipe's objective: "
                     f"{{kind: {objectives[key]}, ...}}")
            continue
        if key not in known:
            if registry.is_reserved(key):
                errs.add(path, f"component {brief(key)} is not available yet")
            else:
                alias = registry.aliases().get(key)
                hint = f" (use its name {alias!r})" if alias else registry.suggest(str(key), known)
                errs.add(path, "unknown component" + hint)
            continue
        cfg_cls = registry.get(key).config
        if cfg_cls is None:
            if section not in (None, {}):
                errs.add(path, "this component takes no settings")
            continue
        cfg = _to_dataclass(cfg_cls, section if section is not None else {}, path + ".", errs)
        if cfg is not None:
            comps[key] = cfg
    errs.raise_if_any()

    used = {s.mixer for s in layers if s.mixer != "none"} | {s.ffn for s in layers if s.ffn != "none"}
    from_pattern = set(used)  # (the others: asked for by model.mtp.block alone)
    if model.mtp is not None:  # the prediction modules' block (checked in _check_model)
        mtp_spec = parse_pattern(model.mtp.block, model.ffn)[0]
        used |= {n for n in (mtp_spec.mixer, mtp_spec.ffn) if n != "none"}
    if model.etd is not None:
        used.add("etd_router")
    elif "etd_router" in comps_data:
        errs.add("components.etd_router", "takes effect only in an ETD model: add a model.etd section")
    # components a used component builds inside itself (hymba's SSM heads): ``uses()``
    for name_used in sorted(used):
        cfg_used = comps.get(name_used)
        if cfg_used is None and registry.get(name_used).config is not None:
            try:
                cfg_used = registry.get(name_used).config()
            except TypeError:
                cfg_used = None
        # a config out of range (e.g. ``ssm: x``) names nothing to use: its range error is said below
        if cfg_used is not None and hasattr(cfg_used, "uses") and in_range(cfg_used):
            used |= set(cfg_used.uses())
            if name_used in from_pattern:
                from_pattern |= set(cfg_used.uses())
    for name_used in sorted(used):
        if name_used in comps:
            continue
        cfg_cls = registry.get(name_used).config
        if cfg_cls is None:
            continue
        try:
            comps[name_used] = cfg_cls()
        except TypeError:
            errs.add(f"components.{name_used}", "the pattern uses this component but the recipe gives no "
                     "settings for it and it has required keys", errs.line("model.block_pattern"))
    errs.raise_if_any()

    pattern_line = errs.line("model.block_pattern" if model.block_pattern is not None else "model.layout")
    # a component the recipe does not configure gets its defaults; its errors point at the
    # pattern (or the MTP block) that asked for it and say the value is a default
    where = {key: (None, "") if key in comps_data else
             (pattern_line if key in from_pattern else errs.line("model.mtp.block"),
              " (default; set it under components." + key + ")") for key in comps}
    for key, cfg in comps.items():
        for k, msg in range_errors(cfg, f"components.{key}."):
            errs.add(k, msg + where[key][1], where[key][0])
    errs.raise_if_any()  # the rules across fields and components assume valid ranges
    for key, cfg in comps.items():
        line, note = where[key]
        if key in used:
            for k, msg in cross_errors(cfg, model, f"components.{key}."):
                errs.add(k, msg + note, line)
            # rules across components (hymba: attention width == its SSM's inner width)
            if hasattr(cfg, "check_recipe"):
                for k, msg in cfg.check_recipe(model, comps):
                    errs.add(f"components.{key}.{k}", msg + note, line)
    errs.raise_if_any()

    train = None
    if data.get("train") is not None:
        train = _to_dataclass(_train_config_type(), data["train"], "train.", errs)
        errs.raise_if_any()
        for k, msg in range_errors(train, "train."):
            errs.add(k, msg)
        errs.raise_if_any()
        # rules across fields only where the recipe sets the key: a section that sets a few keys
        # leaves the others to their defaults or to ``hymba train``'s flags, and the effective
        # settings are checked in full there (``training.config.validate``); a rule that reads the
        # data (a tokenizer, a text field: for text, not a built-in task) only where the recipe names
        # it: unset, the data is ``--data``'s or the objective's default, known to ``hymba train`` alone
        from ..training.config import cross_reads

        for k, msg in cross_errors(train, model, "train."):
            key = k.removeprefix("train.").split(".")[0]
            if key in data["train"] and ("data" in data["train"] or "data" not in cross_reads(key)):
                errs.add(k, msg)
        errs.raise_if_any()

    objective = _build_objective(data.get("objective"), model, train, errs, comps)
    errs.raise_if_any()
    ladir = None
    if data.get("ladir") is not None:
        ladir = _to_dataclass(LaDiRConfig, data["ladir"], "ladir.", errs)
        errs.raise_if_any()
        for k, msg in range_errors(ladir, "ladir."):
            errs.add(k, msg)
        errs.raise_if_any()
        for k, msg in cross_errors(ladir, model, "ladir."):
            errs.add(k, msg)
        errs.raise_if_any()
    _check_tokens(objective, model, ladir, errs)
    errs.raise_if_any()
    if objective is not None and objective.kind == "ladir" and ladir is None:
        errs.add("objective.kind", "ladir trains the recipe's ladir section: add one (ladir: {latent_dim: ..., "
                 "memory_slots: ...})")
        errs.raise_if_any()

    recipe = Recipe(name=name, model=model, components=FrozenMap(sorted(comps.items())),
                    train=train, objective=objective, ladir=ladir, source=file or None)
    recipe.__dict__["layers"] = tuple(layers)  # cached_property slot
    return recipe


def objective_kinds() -> dict[str, str]:
    """``objective.kind`` -> the registered objective that implements it (the kind is the
    default of its config's ``kind`` field: ``ladir``'s objective is registered as
    ``ladir_objective``, next to the ``ladir`` component)."""
    return {registry.get(n).config().kind: n for n in registry.names("objective")}


def _build_objective(data: Any, model: ModelConfig, train: Any, errs: _Errors, comps: dict[str, Any]) -> Any:
    """The ``objective:`` section: ``kind`` names a registered objective, the other keys are
    its settings. Absent (or ``kind: next_token`` without settings) = next-token prediction.
    An objective config's ``check_recipe(model, comps)`` yields (full key path, message) for rules
    across the objective and the components (block diffusion: which ETD router parts it runs)."""
    if data is None:
        return None
    if not isinstance(data, Mapping):
        errs.add("objective", f"must be a mapping with a 'kind', got {_describe(data)}")
        return None
    by_kind = objective_kinds()
    kinds = sorted(by_kind)
    kind = data.get("kind")
    if kind is None:
        errs.add("objective.kind", f"missing required key (one of: {', '.join(kinds)})", errs.line("objective"))
        return None
    if not isinstance(kind, str) or kind not in kinds:
        errs.add("objective.kind", f"unknown objective {brief(kind)}; available: {', '.join(kinds)}"
                 + (registry.suggest(kind, kinds) if isinstance(kind, str) else ""))
        return None
    cfg = _to_dataclass(registry.get(by_kind[kind]).config, data, "objective.", errs)
    if cfg is None:
        return None
    before = len(errs.items)
    for k, msg in range_errors(cfg, "objective."):
        errs.add(k, msg)
    if len(errs.items) > before:  # the cross checks assume valid ranges
        return None
    for k, msg in cross_errors(cfg, model, "objective."):
        errs.add(k, msg)
    if hasattr(cfg, "check_recipe"):
        for k, msg in cfg.check_recipe(model, comps):
            errs.add(k, msg)
    bs = getattr(cfg, "block_size", None)
    # where the recipe sets train.seq_len (a default is --seq-len's to override: training.config.validate)
    set_here = isinstance(errs.root, Mapping) and isinstance(errs.root.get("train"), Mapping) \
        and "seq_len" in errs.root["train"]
    if bs is not None and train is not None and set_here and train.seq_len % bs:
        errs.add("train.seq_len", f"must be a multiple of objective.block_size ({bs}), got {train.seq_len}")
    return None if kind == "next_token" else cfg


def _check_tokens(objective: Any, model: ModelConfig, ladir: Any, errs: _Errors) -> None:
    """``model.vocab_size`` is required exactly when the objective reads tokens; the token-only
    parts (MTP, LaDiR) need it, and are trained only by their objective (next_token, ladir)."""
    kind = objective.kind if objective is not None else "next_token"
    reads_tokens = registry.get(objective_kinds()[kind]).cls.reads_tokens
    if reads_tokens and model.vocab_size is None:
        errs.add("model.vocab_size", "missing required key", errs.line("model"))
    if reads_tokens and kind != "next_token" and model.mtp is not None:  # (accepted, then never trained)
        errs.add("model.mtp", f"multi-token prediction trains with the next_token objective; the {kind} objective "
                 "never computes its loss (its modules would stay untrained)")
    if reads_tokens and kind != "ladir" and ladir is not None:  # (accepted, then never trained: no later phase
        # trains it on the same checkpoint, --ladir-stage is for the ladir objective and resuming checks the objective)
        errs.add("ladir", f"latent reasoning trains with the ladir objective (objective: {{kind: ladir}}); the {kind} "
                 "objective never computes its losses (its VAE and flow denoiser would stay untrained)")
    if reads_tokens:
        return
    what = f"the {kind} objective reads numbers, not tokens"
    if model.vocab_size is not None:
        errs.add("model.vocab_size", f"{what}: its model has no vocabulary (no token embedding, no LM head); "
                 "remove vocab_size")
    if model.mtp is not None:
        errs.add("model.mtp", f"{what}: multi-token prediction needs a vocabulary")
    if ladir is not None:
        errs.add("ladir", f"{what}: latent reasoning needs a vocabulary")


def _check_model(model: ModelConfig, errs: _Errors) -> None:
    for k, msg in range_errors(model, "model."):
        errs.add(k, msg)
    if model.mtp is not None:
        try:
            mtp_layers = parse_pattern(model.mtp.block, model.ffn)
        except PatternError as e:
            errs.add("model.mtp.block", str(e))
        else:
            if len(mtp_layers) != 1 or mtp_layers[0].mixer == "none":
                errs.add("model.mtp.block", f"must be one block with a mixer (e.g. GA, GD+mlp), got {brief(model.mtp.block)}")
    if model.block_pattern is None and model.layout is None:
        errs.add("model.block_pattern", "give either block_pattern or layout", errs.line("model"))
        return
    if model.block_pattern is not None and model.layout is not None:
        errs.add("model.layout", "give block_pattern or layout, not both")
        return
    if model.ffn != "none" and registry.is_reserved(model.ffn):
        errs.add("model.ffn", f"{model.ffn!r} is not available yet")
        return
    if model.block_pattern is not None:
        try:
            layers = parse_pattern(model.block_pattern, model.ffn)
        except PatternError as e:
            errs.add("model.block_pattern", str(e))
            return
        if model.n_layers is not None and model.n_layers != len(layers):
            errs.add("model.n_layers", f"is {model.n_layers} but block_pattern has {len(layers)} layers")
        _check_etd(model, len(layers), "block_pattern", errs)
        return
    assert model.layout is not None
    ratios = model.layout.ratios
    if not ratios:
        errs.add("model.layout.ratios", "must name at least one component")
        return
    n = model.layout.n_layers
    if n < 1:
        return  # reported by the range check
    if model.n_layers is not None and model.n_layers != n:
        errs.add("model.n_layers", f"is {model.n_layers} but layout.n_layers is {n}")
    seen: dict[str, str] = {}
    bad = False
    for k, r in ratios.items():
        path = f"model.layout.ratios.{k}"
        try:
            canon = registry.canonical(k)
        except registry.RegistryError as e:
            errs.add(path, str(e))
            bad = True
            continue
        if registry.get(canon).kind != "mixer":
            errs.add(path, f"{brief(k)} is not a token mixer")
            bad = True
        elif canon in seen:
            errs.add(path, f"names the same component as {seen[canon]!r}")
            bad = True
        seen.setdefault(canon, k)
        if not isinstance(r, (int, float)) or r <= 0:
            errs.add(path, f"must be a positive number, got {brief(r)}")
            bad = True
    if bad:
        return
    total = sum(ratios.values())
    if abs(total - 1.0) > 1e-6:
        errs.add("model.layout.ratios", f"ratios must sum to 1, got {total:g}")
        return
    names = expand_ratios(n, dict(ratios))
    for k in ratios:
        if k not in names:
            errs.add(f"model.layout.ratios.{k}", f"gets 0 of {n} layers ({ratios[k]:g} x {n} rounds to 0); "
                     "raise n_layers or drop it")
    _check_etd(model, n, "layout", errs)


def _check_etd(model: ModelConfig, n_layers: int, source: str, errs: _Errors) -> None:
    """The ETD partition must cover the pattern's layers exactly; the iteration cap must
    hold the training iterations."""
    etd = model.etd
    if etd is None:
        return
    total = etd.encoder_layers + etd.think_layers + etd.decoder_layers
    if total != n_layers:
        errs.add("model.etd", f"encoder_layers + think_layers + decoder_layers = {etd.encoder_layers} + "
                 f"{etd.think_layers} + {etd.decoder_layers} = {total}, but the {source} gives {n_layers} layers")
    if etd.max_iterations is not None and etd.max_iterations < etd.iterations:
        errs.add("model.etd.max_iterations", f"must be >= iterations ({etd.iterations}), got {etd.max_iterations}")
