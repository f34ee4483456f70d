"""Optimizers: AdamW, and Muon for hidden weight matrices (one optimizer, two kinds of groups).

Muon (Keller Jordan 2024, https://kellerjordan.github.io/posts/muon/): SGD-momentum with
Nesterov, whose update is orthogonalised by five Newton–Schulz iterations
(quintic coefficients a, b, c = 3.4445, -4.7750, 2.0315) and scaled by
``sqrt(max(1, fan_out / fan_in))`` so tall and wide matrices move alike:

    m  <- beta m + (1 - beta) g
    u  <- NS5(g + beta (m - g))        # Nesterov: lerp(g, m, beta)
    W  <- (1 - lr wd) W - lr sqrt(max(1, fan_out / fan_in)) u

Which parameters get Muon (``split_params``):

* Muon: the weight of every ``nn.Linear`` in the blocks (layout ``[out, in]``), and the
  stacked expert matrices of channel mixers registered with ``kind="ffn"`` (MoE:
  raw 3-D parameters ``[E, in, out]`` used as ``x @ W[e]``). Those are orthogonalised
  *per expert* (Newton–Schulz batched over the leading dim: each expert is its own linear
  map, so each gets its own orthogonal update) and scaled by ``sqrt(max(1, out / in))``
  like a Linear. A parameter with ``_muon = True`` is put in Muon whatever module owns it
  (>= 2-D; ``_muon_layout = "in_out"`` if it is applied as ``x @ W``).
* AdamW: embeddings, the LM head, meta tokens, norms, biases, every 0-/1-D parameter,
  conv kernels, the raw parameters of token mixers (per-head tables such as ``A_log``,
  ``B_bias``, initial memories), matrices with a side of 1, and any parameter or module
  marked ``_no_muon = True``.

Under FSDP2 a Muon parameter is a DTensor sharded on dim 0; Newton–Schulz needs the whole
matrix, so its update is gathered (``full_tensor``), orthogonalised on every rank (the
same input gives the same result everywhere) and each rank keeps its own shard
(``distribute_tensor(..., src_data_rank=None)``: no communication). The momentum buffer
stays sharded. This keeps single-process and FSDP runs equal up to float rounding
(``tests/test_distributed.py`` checks it) at the cost of one all-gather per matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate ``U V^T`` of ``g = U S V^T`` (the last two dims; batched over the rest).

    bf16 on CUDA (as in the reference implementation), float32 elsewhere."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over Muon groups (``use_muon=True``) and AdamW groups.

    Muon group keys: ``lr, momentum, weight_decay, nesterov, ns_steps, layout`` (``out_in``
    for Linear weights ``[..., out, in]``, ``in_out`` for stacked ``x @ W`` weights).
    AdamW group keys: ``lr, betas, eps, weight_decay``. Every group also keeps
    ``base_lr``: the schedule sets ``lr = base_lr * factor(step)``.
    """

    def __init__(self, groups: list[dict[str, Any]]):
        for g in groups:
            g.setdefault("use_muon", False)
            g.setdefault("weight_decay", 0.0)
            if g["use_muon"]:
                g.setdefault("momentum", 0.95)
                g.setdefault("nesterov", True)
                g.setdefault("ns_steps", 5)
                g.setdefault("layout", "out_in")
            else:
                g.setdefault("betas", (0.9, 0.95))
                g.setdefault("eps", 1e-8)
            g.setdefault("base_lr", g["lr"])
        super().__init__(groups, {})

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # noqa: ANN401
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon(group)
            else:
                self._adamw(group)
        return loss

    def _muon(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(g)
            buf = st["momentum_buffer"]
            buf.lerp_(g, 1 - beta)
            u = g.lerp(buf, beta) if group["nesterov"] else buf
            sharded = _is_dtensor(u)
            full = u.full_tensor() if sharded else u
            o = newton_schulz5(full, group["ns_steps"]).to(p.dtype)
            fan_out, fan_in = full.shape[-2:] if group["layout"] == "out_in" else full.shape[-2:][::-1]
            o = o * math.sqrt(max(1.0, fan_out / fan_in))
            if sharded:
                from torch.distributed.tensor import distribute_tensor

                o = distribute_tensor(o.detach(), p.device_mesh, p.placements, src_data_rank=None)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(o, alpha=-lr)

    def _adamw(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        b1, b2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p)
                st["exp_avg_sq"] = torch.zeros_like(p)
            st["step"] += 1
            t = float(st["step"])
            st["exp_avg"].lerp_(g, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            bc1, bc2 = 1 - b1**t, 1 - b2**t
            if wd:
                p.mul_(1 - lr * wd)
            denom = (st["exp_avg_sq"].sqrt() / math.sqrt(bc2)).add_(eps)
            p.addcdiv_(st["exp_avg"], denom, value=-lr / bc1)


@dataclass
class ParamSplit:
    muon: list[tuple[str, nn.Parameter]]  # Linear layout [out, in]
    muon_stacked: list[tuple[str, nn.Parameter]]  # x @ W layout [..., in, out]
    adamw_decay: list[tuple[str, nn.Parameter]]
    adamw_no_decay: list[tuple[str, nn.Parameter]]

    def describe(self) -> str:
        def n(items: list) -> str:
            total = sum(p.numel() for _, p in items)
            return f"{len(items)} tensors, {total / 1e6:.2f}M params"

        adam = n(self.adamw_decay + self.adamw_no_decay)
        muon = self.muon + self.muon_stacked
        return f"Muon: {n(muon)}; AdamW: {adam}" if muon else f"AdamW: {adam}"


_ADAM_MODULES = (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm)


def _is_ffn(mod: nn.Module) -> bool:
    from ..core import registry

    name = getattr(type(mod), "registry_name", None)
    try:
        return name is not None and registry.get(name).kind == "ffn"
    except KeyError:
        return False


def muon_layout(p: nn.Parameter, owner: nn.Module) -> str | None:
    """``out_in`` / ``in_out`` when ``p`` should get Muon, else None (module doc)."""
    if getattr(p, "_no_muon", False) or getattr(owner, "_no_muon", False):
        return None
    if getattr(p, "_muon", False):
        return getattr(p, "_muon_layout", "out_in") if p.ndim >= 2 else None
    if isinstance(owner, _ADAM_MODULES) or "norm" in type(owner).__name__.lower():
        return None
    if isinstance(owner, nn.Linear):
        return "out_in" if p is owner.weight and p.ndim == 2 and min(p.shape) > 1 else None
    if _is_ffn(owner) and p.ndim == 3 and min(p.shape[-2:]) > 1:
        return "in_out"
    return None


def split_params(model: nn.Module, use_muon: bool = True) -> ParamSplit:
    """Sort parameters into Muon / AdamW-with-decay / AdamW-without-decay (module doc)."""
    special = set()
    for name in ("embed", "lm_head"):
        mod = getattr(model, name, None)
        if mod is not None:
            special |= {id(p) for p in mod.parameters()}
    meta = getattr(model, "meta", None)
    if isinstance(meta, nn.Parameter):
        special.add(id(meta))
    seen: set[int] = set()
    split = ParamSplit([], [], [], [])
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            layout = muon_layout(p, mod) if use_muon and id(p) not in special else None
            if layout == "out_in":
                split.muon.append((name, p))
            elif layout == "in_out":
                split.muon_stacked.append((name, p))
            elif p.ndim >= 2 and id(p) != id(meta):
                split.adamw_decay.append((name, p))
            else:
                split.adamw_no_decay.append((name, p))
    return split


def build_optimizer(model: nn.Module, cfg: Any) -> tuple[MuonAdamW, ParamSplit]:
    """The optimizer a TrainConfig asks for (``optimizer: muon`` or ``adamw``)."""
    split = split_params(model, use_muon=cfg.optimizer == "muon")
    betas = (cfg.beta1, cfg.beta2)
    groups: list[dict[str, Any]] = []
    for kind, items, layout in (("muon", split.muon, "out_in"), ("muon_stacked", split.muon_stacked, "in_out")):
        if items:
            groups.append({"params": [p for _, p in items], "use_muon": True, "lr": cfg.muon_lr, "layout": layout,
                           "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay, "kind": kind})
    if split.adamw_decay:
        groups.append({"params": [p for _, p in split.adamw_decay], "lr": cfg.lr, "betas": betas,
                       "weight_decay": cfg.weight_decay, "kind": "adamw"})
    if split.adamw_no_decay:
        groups.append({"params": [p for _, p in split.adamw_no_decay], "lr": cfg.lr, "betas": betas,
                       "weight_decay": 0.0, "kind": "adamw_no_decay"})
    return MuonAdamW(groups), split


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    for g in opt.param_groups:
        g["lr"] = g["base_lr"] * factor


def params_of(groups: Iterable[dict[str, Any]]) -> list[Tensor]:
    return [p for g in groups for p in g["params"]]
