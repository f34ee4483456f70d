"""Tensor rules: how a group of hymba_plus tensors and a group of HF tensors determine each other.

A ``Rule`` names our tensors and HF's and gives both directions as functions of lists of
tensors; every rule used here is a pure re-layout (split, concatenate, reshape, transpose:
bit-exact both ways) or, for a norm scale stored in the other convention, ``w <-> 1 + w``.
Expected HF shapes come from running ``to_theirs`` on ``meta`` tensors of our model's
shapes, so a checkpoint whose headers disagree with its config is refused before any tensor
is read.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

Fn = Callable[[list[Tensor]], list[Tensor]]


def _same(ts: list[Tensor]) -> list[Tensor]:
    return list(ts)


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]
    theirs: tuple[str, ...]
    to_ours: Fn = _same
    to_theirs: Fn = _same


def same(ours: str, theirs: str) -> Rule:
    return Rule((ours,), (theirs,))


def scale(ours: str, theirs: str, ours_zc: bool, theirs_zc: bool) -> Rule:
    """A norm scale: zero-centred storage (w, scale 1 + w) on one side, plain (w) on the other."""
    if ours_zc == theirs_zc:
        return same(ours, theirs)
    if ours_zc:  # ours w, theirs 1 + w
        return Rule((ours,), (theirs,), lambda t: [t[0] - 1], lambda t: [t[0] + 1])
    return Rule((ours,), (theirs,), lambda t: [t[0] + 1], lambda t: [t[0] - 1])


def gated_q(prefix: str, hf: str, n_heads: int, head_dim: int, what: str = "weight") -> Rule:
    """Qwen3-Next's ``q_proj`` holds, per head, the query rows then the output-gate rows
    ([H, 2, D, ...]); ours: ``q_proj`` [H*D, ...] and ``g_proj`` [H*D, ...]."""
    H, D = n_heads, head_dim

    def to_ours(t: list[Tensor]) -> list[Tensor]:
        w = t[0].reshape(H, 2, D, *t[0].shape[1:])
        return [w[:, 0].reshape(H * D, *t[0].shape[1:]).clone(), w[:, 1].reshape(H * D, *t[0].shape[1:]).clone()]

    def to_theirs(t: list[Tensor]) -> list[Tensor]:
        q, g = (x.reshape(H, 1, D, *x.shape[1:]) for x in t)
        return [torch.cat([q, g], dim=1).reshape(2 * H * D, *t[0].shape[1:])]

    return Rule((f"{prefix}.q_proj.{what}", f"{prefix}.g_proj.{what}"), (f"{hf}.q_proj.{what}",), to_ours, to_theirs)


def gdn_qkvz(prefix: str, hf: str, hk: int, dk: int, hv: int, dv: int) -> Rule:
    """Qwen3-Next ``in_proj_qkvz`` rows grouped per key head g: [q_g (dk) | k_g (dk) | v of the
    r = hv/hk value heads of g (r*dv) | z of them (r*dv)]; ours: ``qkv_proj`` = [all q | all k |
    all v] (value head g*r + j) and ``z_proj`` = all z."""
    r = hv // hk

    def to_ours(t: list[Tensor]) -> list[Tensor]:
        d = t[0].shape[-1]
        w = t[0].reshape(hk, 2 * dk + 2 * r * dv, d)
        q, k, v, z = w.split([dk, dk, r * dv, r * dv], dim=1)
        qkv = torch.cat([q.reshape(hk * dk, d), k.reshape(hk * dk, d), v.reshape(hv * dv, d)])
        return [qkv, z.reshape(hv * dv, d).clone()]

    def to_theirs(t: list[Tensor]) -> list[Tensor]:
        qkv, z = t
        d = qkv.shape[-1]
        q, k, v = qkv.split([hk * dk, hk * dk, hv * dv])
        parts = [q.reshape(hk, dk, d), k.reshape(hk, dk, d), v.reshape(hk, r * dv, d), z.reshape(hk, r * dv, d)]
        return [torch.cat(parts, dim=1).reshape(-1, d)]

    return Rule((f"{prefix}.qkv_proj.weight", f"{prefix}.z_proj.weight"), (f"{hf}.in_proj_qkvz.weight",),
                to_ours, to_theirs)


def gdn_ba(prefix: str, hf: str, hk: int, hv: int) -> Rule:
    """Qwen3-Next ``in_proj_ba`` rows grouped per key head: [b of its r value heads | a of them];
    ours: ``a_proj`` and ``b_proj`` [hv, d]."""
    r = hv // hk

    def to_ours(t: list[Tensor]) -> list[Tensor]:
        d = t[0].shape[-1]
        b, a = t[0].reshape(hk, 2 * r, d).split([r, r], dim=1)
        return [a.reshape(hv, d).clone(), b.reshape(hv, d).clone()]

    def to_theirs(t: list[Tensor]) -> list[Tensor]:
        a, b = t
        d = a.shape[-1]
        return [torch.cat([b.reshape(hk, r, d), a.reshape(hk, r, d)], dim=1).reshape(2 * hv, d)]

    return Rule((f"{prefix}.a_proj.weight", f"{prefix}.b_proj.weight"), (f"{hf}.in_proj_ba.weight",), to_ours, to_theirs)


def conv(ours: str, theirs: str) -> Rule:
    """Depthwise conv: ours [C, K], HF ``nn.Conv1d`` weight [C, 1, K] (same tap order)."""
    return Rule((ours,), (theirs,), lambda t: [t[0].reshape(t[0].shape[0], t[0].shape[-1])],
                lambda t: [t[0].reshape(t[0].shape[0], 1, t[0].shape[1])])


def experts(prefix: str, hf: str, n_experts: int, fused: bool) -> list[Rule]:
    """Routed experts. Ours: ``w_gate_up`` [E, d, 2h] (gate columns first) and ``w_down``
    [E, h, d], applied as ``x @ W``. HF applies ``F.linear`` (x @ W^T), so its matrices are the
    transposes: per expert ``experts.{e}.gate_proj/up_proj.weight`` [h, d] and
    ``down_proj.weight`` [d, h] (the layout checkpoints are saved in), or fused 3-D
    ``experts.gate_up_proj`` [E, 2h, d] and ``experts.down_proj`` [E, d, h] (transformers 5's
    in-memory layout; read on import, never written)."""
    E = n_experts
    if fused:
        return [Rule((f"{prefix}.w_gate_up",), (f"{hf}.experts.gate_up_proj",), lambda t: [t[0].transpose(1, 2).contiguous()],
                     lambda t: [t[0].transpose(1, 2).contiguous()]),
                Rule((f"{prefix}.w_down",), (f"{hf}.experts.down_proj",), lambda t: [t[0].transpose(1, 2).contiguous()],
                     lambda t: [t[0].transpose(1, 2).contiguous()])]
    gate = tuple(f"{hf}.experts.{e}.gate_proj.weight" for e in range(E))
    up = tuple(f"{hf}.experts.{e}.up_proj.weight" for e in range(E))
    down = tuple(f"{hf}.experts.{e}.down_proj.weight" for e in range(E))

    def gu_ours(t: list[Tensor]) -> list[Tensor]:
        return [torch.stack([torch.cat([g.t(), u.t()], dim=1) for g, u in zip(t[:E], t[E:])])]

    def gu_theirs(t: list[Tensor]) -> list[Tensor]:
        h = t[0].shape[-1] // 2
        return ([t[0][e, :, :h].t().contiguous() for e in range(E)]
                + [t[0][e, :, h:].t().contiguous() for e in range(E)])

    return [Rule((f"{prefix}.w_gate_up",), gate + up, gu_ours, gu_theirs),
            Rule((f"{prefix}.w_down",), down, lambda t: [torch.stack([x.t() for x in t])],
                 lambda t: [t[0][e].t().contiguous() for e in range(E)])]


def zeros(ours: str) -> Rule:
    """A tensor HF does not have and that must be zero to mean the same (MoE ``expert_bias``):
    created as zeros on import (``to_ours`` gets a meta tensor of the shape), dropped on export."""
    return Rule((ours,), (), lambda t: [torch.zeros(t[0].shape)], lambda t: [])
