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
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import registry

#: display order of mixer aliases in error messages (then any other registered names)
ALIAS_ORDER = ("ATL", "M3", "GD", "GA", "HY", "-")
FFN_CHOICES = ("mlp", "moe", "none")
NONE_MIXER = "none"
MAX_LAYERS = 4096


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
            out += self.item(depth)
        return out

    def repeat(self, layers: list[LayerSpec]) -> list[LayerSpec]:
        t = self.peek()
        if t is None or t[0] != "*":
            return layers
        self.take()
        n, col = self.take()
        if not n.isdigit() or int(n) < 1:
            raise PatternError(f"repeat count must be a positive integer, got {n!r} at column {col}", col)
        if len(layers) * int(n) > MAX_LAYERS:
            raise PatternError(f"pattern expands to more than {MAX_LAYERS} layers at column {col}", col)
        return layers * int(n)

    def item(self, depth: int) -> list[LayerSpec]:
        tok, col = self.take()
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


def expand_ratios(n_layers: int, ratios: dict[str, float]) -> list[str]:
    """Deterministic layout from ratios (seed §2): largest-remainder counts, blocks in the
    order given (``{atlas: .1, mamba3: .35, gdn: .35, gated_attn: .2}`` with 10 layers ->
    ATL, M3 x4, GD x3, GA x2 — the seed's 10-layer example)."""
    raw = {k: r * n_layers for k, r in ratios.items()}
    counts = {k: int(v) for k, v in raw.items()}
    left = n_layers - sum(counts.values())
    order = sorted(raw, key=lambda k: (-(raw[k] - counts[k]), list(raw).index(k)))
    for k in order[:left]:
        counts[k] += 1
    return [k for k in ratios for _ in range(counts[k])]
