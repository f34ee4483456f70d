"""block_pattern grammar (DESIGN §3).

    pattern := seq
    seq     := item ('|' item)*
    item    := token | group
    group   := '(' seq ')' ('*' INT)?
    token   := MIXER ('+' FFN)? ('*' INT)?
    MIXER   := registry name or alias ('ATL', 'M3', 'GD', 'GA', 'HY', '-', ...)
    FFN     := 'mlp' | 'moe' | 'none'

Whitespace is ignored. Every error carries the 1-based column of the offending text:
``unknown mixer 'GX' at column 7; known: ATL, M3, GD, GA, HY, -``.

A recipe may give ratios instead (``layout: {n_layers, ratios}``): ``expand_ratios``
turns them into one mixer per layer, each component spread evenly through depth.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction

from . import registry

#: display order of mixer aliases in error messages (then any other registered names)
ALIAS_ORDER = ("ATL", "M3", "GD", "GA", "HY", "-")
FFN_CHOICES = ("mlp", "moe", "none")
NONE_MIXER = "none"
MAX_LAYERS = 4096
#: the deepest nesting of groups a pattern may have
MAX_DEPTH = 64


class PatternError(ValueError):
    def __init__(self, message: str, column: int):
        super().__init__(message)
        self.column = column


@dataclass(frozen=True)
class LayerSpec:
    """One layer: canonical mixer name ('none' for '-') and ffn name ('none' = no ffn)."""

    mixer: str
    ffn: str

    def token(self) -> str:
        alias = {v: k for k, v in registry.aliases("mixer").items() if k in ALIAS_ORDER}
        m = alias.get(self.mixer, self.mixer)
        return m if self.ffn is None else f"{m}+{self.ffn}"


_TOKEN = re.compile(r"\s*(\(|\)|\||\*|\+|[A-Za-z0-9_\-\.]+)")


def _lex(text: str) -> list[tuple[str, int]]:
    out, i = [], 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        m = _TOKEN.match(text, i)
        if not m or m.start(1) != i:
            raise PatternError(f"unexpected character {text[i]!r} at column {i + 1}", i + 1)
        out.append((m.group(1), i + 1))
        i = m.end(1)
    return out


def known_mixers() -> list[str]:
    al = registry.aliases("mixer")
    shown = [a for a in ALIAS_ORDER if a in al or registry.is_reserved(a)]
    return shown


class _Parser:
    def __init__(self, text: str, default_ffn: str):
        self.text = text
        self.toks = _lex(text)
        self.i = 0
        self.default_ffn = default_ffn

    def peek(self) -> tuple[str, int] | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def end_col(self) -> int:
        return len(self.text.rstrip()) + 1

    def take(self) -> tuple[str, int]:
        t = self.peek()
        if t is None:
            raise PatternError(f"unexpected end of pattern at column {self.end_col()}", self.end_col())
        self.i += 1
        return t

    def seq(self, depth: int) -> list[LayerSpec]:
        out = self.item(depth)
        while (t := self.peek()) is not None and t[0] == "|":
            self.take()
            col = self.peek()[1] if self.peek() is not None else self.end_col()
            out += self.item(depth)
            if len(out) > MAX_LAYERS:  # each repeat is bounded; their sequence must be too
                raise PatternError(f"pattern expands to more than {MAX_LAYERS} layers at column {col}", col)
        return out

    def repeat(self, layers: list[LayerSpec]) -> list[LayerSpec]:
        t = self.peek()
        if t is None or t[0] != "*":
            return layers
        self.take()
        n, col = self.take()
        digits = n.lstrip("0")  # (int() of a 4300-digit count is a ValueError: the length is checked first)
        if not (n.isascii() and n.isdigit()) or not digits:
            shown = repr(n) if len(n) <= 20 else repr(n[:20] + "...")
            raise PatternError(f"repeat count must be a positive integer, got {shown} at column {col}", col)
        if len(digits) > 6 or len(layers) * int(digits) > MAX_LAYERS:
            raise PatternError(f"pattern expands to more than {MAX_LAYERS} layers at column {col}", col)
        return layers * int(digits)

    def item(self, depth: int) -> list[LayerSpec]:
        tok, col = self.take()
        if tok == "(" and depth >= MAX_DEPTH:  # (the parser recurses per group: RecursionError past ~450)
            raise PatternError(f"groups nested more than {MAX_DEPTH} deep at column {col}", col)
        if tok == "(":
            inner = self.seq(depth + 1)
            close = self.peek()
            if close is None or close[0] != ")":
                c = close[1] if close else self.end_col()
                raise PatternError(f"missing ')' for the group opened at column {col} (at column {c})", c)
            self.take()
            return self.repeat(inner)
        if tok in (")", "|", "*", "+"):
            raise PatternError(f"expected a layer token at column {col}, found {tok!r}", col)
        mixer = self.mixer(tok, col)
        ffn = self.default_ffn
        t = self.peek()
        if t is not None and t[0] == "+":
            self.take()
            f, fcol = self.take()
            if f not in FFN_CHOICES:
                raise PatternError(
                    f"unknown ffn {f!r} at column {fcol}; known: {', '.join(FFN_CHOICES)}"
                    + registry.suggest(f, list(FFN_CHOICES)),
                    fcol,
                )
            if f != "none":
                self.check_available(f, fcol, "ffn")
            ffn = f
        return self.repeat([LayerSpec(mixer, ffn)])

    def check_available(self, name: str, col: int, what: str) -> None:
        if registry.is_reserved(name):
            raise PatternError(f"{what} {name!r} at column {col} is not available yet", col)

    def mixer(self, tok: str, col: int) -> str:
        if tok == "-":
            return NONE_MIXER
        al = registry.aliases("mixer")
        if tok in al:
            return al[tok]
        if registry.is_reserved(tok):
            raise PatternError(
                f"mixer {tok!r} at column {col} is not available yet ({registry.reserved()[tok]})", col
            )
        known = known_mixers()
        raise PatternError(
            f"unknown mixer {tok!r} at column {col}; known: {', '.join(known)}"
            + registry.suggest(tok, known + list(al)),
            col,
        )


def parse_pattern(text: str, default_ffn: str = "mlp") -> list[LayerSpec]:
    """Expand a block_pattern into one ``LayerSpec`` per layer."""
    if not text or not text.strip():
        raise PatternError("block_pattern is empty", 1)
    p = _Parser(text, default_ffn)
    layers = p.seq(0)
    rest = p.peek()
    if rest is not None:
        tok, col = rest
        what = "unmatched ')'" if tok == ")" else f"unexpected {tok!r}"
        raise PatternError(f"{what} at column {col}", col)
    return layers


def format_pattern(layers: list[LayerSpec]) -> str:
    """The flat pattern string of a layer list (``hymba info`` prints it)."""
    return " | ".join(s.token() for s in layers)


@dataclass(frozen=True)
class Rounding:
    """One component whose share of a ratio layout is not a whole number of layers."""

    name: str
    ratio: float
    n_layers: int
    exact: float  # ratio x n_layers
    count: int  # layers it gets

    def __str__(self) -> str:
        return f"{self.name} {self.ratio:g} x {self.n_layers} = {self.exact:g} -> {self.count}"

    def short(self) -> str:
        return f"{self.name} {self.exact:g} -> {self.count}"


def _exact_shares(n_layers: int, ratios: dict[str, float]) -> dict[str, float]:
    # rounded to 9 decimals so that binary float noise (0.29 x 100 = 28.999999999999996)
    # neither costs a layer nor shows up as a rounding
    return {k: round(r * n_layers, 9) for k, r in ratios.items()}


def ratio_counts(n_layers: int, ratios: dict[str, float]) -> dict[str, int]:
    """Layers per component, by largest remainder: each gets ``floor(ratio x n_layers)``,
    then the layers left go one each to the largest fractional parts; equal fractional
    parts go to the component named first. Every count is within one of ``ratio x n``."""
    exact = _exact_shares(n_layers, ratios)
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = n_layers - sum(counts.values())
    order = list(ratios)
    for k in sorted(order, key=lambda k: (-(exact[k] - counts[k]), order.index(k)))[:max(left, 0)]:
        counts[k] += 1
    return counts


def layout_rounding(n_layers: int, ratios: dict[str, float]) -> list[Rounding]:
    """The components whose ``ratio x n_layers`` is not whole, with the count each got
    (``str()``: ``mamba3 0.25 x 6 = 1.5 -> 2``), in the order the ratios are given."""
    exact = _exact_shares(n_layers, ratios)
    counts = ratio_counts(n_layers, ratios)
    return [Rounding(k, ratios[k], n_layers, exact[k], counts[k]) for k in ratios if exact[k] != counts[k]]


def expand_ratios(n_layers: int, ratios: dict[str, float]) -> list[str]:
    """Deterministic layout from ratios (seed §2, DESIGN §2): one name per layer, each
    component spread evenly through depth, the components interleaved.

    1. Counts by largest remainder (``ratio_counts``; ``layout_rounding`` reports what was
       rounded).
    2. The k-th layer of a component with ``c`` layers has the ideal position
       ``(k + 1/2) x n / c`` (the middle of its k-th share of the depth). Components with
       the same count share these periods and are staggered inside them in the order
       given (two of them: at 1/4 and 3/4 of each period), so they alternate instead of
       always sitting side by side.
    3. Layers are placed one slot at a time, earliest ideal position first (ties: the
       component named first), except that a component with at most half the layers
       (rounded up) never takes two adjacent slots: the next candidate is taken when the
       earliest one would repeat the previous layer, or would leave the remaining layers
       unable to avoid that. Such an arrangement always exists; only a component with
       more than half the layers may sit next to itself.

    ``{gdn: .5, mamba3: .25, gated_attn: .25}`` with 6 layers -> gdn, mamba3, gdn,
    gated_attn, mamba3, gdn (mamba3 1.5 -> 2 and gated_attn 1.5 -> 1 layers). Like
    Megatron-LM's hybrid layer allocation, which spaces attention layers evenly through
    a Mamba stack, but for any number of components."""
    counts = {k: c for k, c in ratio_counts(n_layers, ratios).items() if c > 0}
    order = list(counts)
    n = sum(counts.values())
    spread = {k for k, c in counts.items() if 2 * c <= n + 1}  # never adjacent to itself
    peers = {k: [j for j in order if counts[j] == counts[k]] for k in order}

    def ideal(k: str, i: int) -> Fraction:
        g = peers[k]
        return Fraction(n, counts[k]) * (i + Fraction(2 * g.index(k) + 1, 2 * len(g)))

    def still_possible(left: dict[str, int], slots: int, last: str) -> bool:
        # a component that must not repeat fits r layers into s slots iff r <= ceil(s/2),
        # or r <= floor(s/2) when the slot before the first is its own
        return all(r <= (slots // 2 if k == last else (slots + 1) // 2)
                   for k, r in left.items() if k in spread)

    left = dict(counts)
    placed = {k: 0 for k in order}
    out: list[str] = []
    for slot in range(n):
        candidates = sorted((k for k in order if left[k]), key=lambda k: (ideal(k, placed[k]), order.index(k)))
        pick = candidates[0]
        for k in candidates:
            if k in spread and out and out[-1] == k:
                continue
            left[k] -= 1
            fits = still_possible(left, n - slot - 1, k)
            left[k] += 1
            if fits:
                pick = k
                break
        out.append(pick)
        left[pick] -= 1
        placed[pick] += 1
    return out


def mixer_token(name: str) -> str:
    """The pattern token of a mixer name (its DESIGN alias: ``gated_attn`` -> ``GA``)."""
    try:
        return LayerSpec(registry.canonical(name), None).token()  # type: ignore[arg-type]
    except registry.RegistryError:
        return name


def describe_layout(n_layers: int, ratios: dict[str, float]) -> str:
    """One line: ``layout 6 layers -> GD | M3 | GD | GA | M3 | GD (rounded: mamba3 1.5 -> 2,
    gated_attn 1.5 -> 1)`` (no parenthesis when every share is whole)."""
    pattern = " | ".join(mixer_token(k) for k in expand_ratios(n_layers, ratios))
    rounded = layout_rounding(n_layers, ratios)
    note = f" (rounded: {', '.join(r.short() for r in rounded)})" if rounded else ""
    return f"layout {n_layers} layer{'s' if n_layers != 1 else ''} -> {pattern}{note}"
