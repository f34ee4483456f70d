"""The ``-`` (none) token mixer: the layer has no token-mixing sublayer, only its ffn."""

from __future__ import annotations

from ..core.registry import register


@register("none", config=None, aliases=("-",))
class NoMixer:
    """Marker: a Block whose mixer is ``none`` skips the mixer sublayer entirely."""
