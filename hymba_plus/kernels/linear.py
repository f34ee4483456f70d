"""Several projections of one input as ONE GEMM: ``[x W_1^T | ... | x W_n^T] = x [W_1; ...; W_n]^T``.

A layer that projects the same activation several times (attention's q / k / v / output gate,
SwiGLU's gate and up) pays, per projection, a GEMM launch, under autocast a cast of the
(float32 residual-stream) input to bf16, and in the backward a cast of its input gradient
back plus a float32 add. With autograd on, ``project`` concatenates the weights (and biases)
instead -- the weights are d x d, the activations N x d with N >> d in training -- and runs one
GEMM: one input cast, one wider GEMM forward, one ``dx`` GEMM (float32 accumulation over every
projection) and one ``dW`` GEMM backward. The modules and their parameters stay as they are
(checkpoints, converters, Muon's per-matrix updates, FSDP2 sharding see no change).

Without autograd (decoding, evaluation) the weights' concatenation would be a copy of every
weight per step for a backward that never happens, so each projection runs on its own -- unless
a ``ProjectionPacks`` is active (``packed(packs)``): the decode engine keeps one packed copy
``[W_1; ...; W_n]`` per group of projections of one input (made on first use, refreshed in place
from the modules' weights at every ``generate`` call, so a CUDA graph captured over it stays
valid and never decodes with stale weights), and each group is one GEMM per step, as vLLM's
merged q/k/v and gate/up projections are. A decode step is bound by its number of kernels.
A module with forward hooks (an ETD router's LoRA branches attach to ``nn.Linear`` this way)
always runs on its own, so its hooks see their call. All ways compute the same products; the
fused one differs only by round-off (float32 accumulation order, one rounding of ``dx``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class ProjectionPacks:
    """Packed copies of projection groups for inference: ``{(id(m) for m in mods): [W; b]}``.

    ``stacked`` makes a group's copy on first use; ``sync`` copies every group's weights into
    its packed tensors in place (their addresses stay, so a captured CUDA graph reads the new
    values). The owner (``models.decode_engine.DecodeEngine``) calls ``sync`` once per
    ``generate`` call: weights may change between calls (a training step, ``load_state_dict``,
    an in-place edit of ``.data``) but not within one. A group whose parameters were replaced by
    tensors of another shape, dtype or device is made again."""

    def __init__(self) -> None:
        self._groups: dict[tuple[int, ...], tuple[tuple[nn.Linear, ...], Tensor, Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._groups)

    def stacked(self, mods: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
        key = tuple(map(id, mods))
        g = self._groups.get(key)
        if g is None or not _same_layout(g[1], [m.weight for m in mods]):
            w, b = _cat(mods)
            g = self._groups[key] = (mods, w, b)
        return g[1], g[2]

    @torch.no_grad()
    def sync(self) -> None:
        for key, (mods, w, b) in list(self._groups.items()):
            if not _same_layout(w, [m.weight for m in mods]):
                del self._groups[key]  # remade on its next use
                continue
            torch.cat([m.weight for m in mods], out=w)
            if b is not None:
                torch.cat([m.bias for m in mods], out=b)


_ACTIVE: list[ProjectionPacks] = []


@contextlib.contextmanager
def packed(packs: ProjectionPacks) -> Iterator[None]:
    """While active (and autograd is off), ``project`` / ``fused_linear`` / ``stacked`` use
    ``packs``' packed weights."""
    _ACTIVE.append(packs)
    try:
        yield
    finally:
        _ACTIVE.pop()


def _same_layout(w: Tensor, ws: list[Tensor]) -> bool:
    return (w.shape[0] == sum(x.shape[0] for x in ws) and all(x.shape[1:] == w.shape[1:] for x in ws)
            and all(x.dtype == w.dtype and x.device == w.device for x in ws))


def _cat(mods: tuple[nn.Linear, ...]) -> tuple[Tensor, Tensor | None]:
    w = torch.cat([m.weight for m in mods])
    b = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
    return w, b


def plain(*mods: nn.Linear) -> bool:
    """Plain ``nn.Linear`` without hooks, biases all present or all absent, one input width."""
    if any(type(m) is not nn.Linear or m._forward_hooks or m._forward_pre_hooks for m in mods):
        return False
    return len({m.bias is None for m in mods}) == 1 and len({m.in_features for m in mods}) == 1


def fusable(*mods: nn.Linear) -> bool:
    """One GEMM for these projections? Autograd on (or a ``ProjectionPacks`` active), plain
    ``nn.Linear`` without hooks, biases all present or all absent, one input width."""
    if len(mods) < 2 or not (torch.is_grad_enabled() or _ACTIVE):
        return False
    return plain(*mods)


def stacked(*mods: nn.Linear) -> tuple[Tensor, Tensor | None]:
    """``([W_1; ...; W_n], [b_1; ...; b_n] or None)``: the active packs' copy without autograd,
    else a concatenation (differentiable)."""
    if _ACTIVE and not torch.is_grad_enabled():
        return _ACTIVE[-1].stacked(mods)
    return _cat(mods)


def fused_linear(x: Tensor, *mods: nn.Linear) -> Tensor:
    """``torch.cat([m(x) for m in mods], -1)`` as one GEMM over the concatenated weights (for
    ``fusable`` modules: it runs no hooks)."""
    return F.linear(x, *stacked(*mods))


def project(x: Tensor, *mods: nn.Linear) -> tuple[Tensor, ...]:
    """``tuple(m(x) for m in mods)``, as one GEMM where ``fusable``."""
    if not fusable(*mods):
        return tuple(m(x) for m in mods)
    return fused_linear(x, *mods).split([m.out_features for m in mods], dim=-1)
