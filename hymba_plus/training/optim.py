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
* Weight decay (``--weight-decay``, decoupled, 0 by default): every Muon matrix and every
  AdamW parameter of >= 2 dims (nanoGPT's rule: GEMM weights and embeddings), except the meta
  tokens and parameters marked ``_no_weight_decay = True`` (biases or gains stored as tables,
  e.g. Mamba-3's ``B_bias``, ATLAS's initial memory and feature coefficients, LaDiR's slots
  and marks: decay would pull them to 0, not to their initial values); 0-/1-D parameters
  (norms, biases) never.

Both kinds of groups update all their parameters together: AdamW in PyTorch's fused
multi-tensor kernel (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs; a
dozen ``torch._foreach_*`` ops where it does not apply), Muon's momentum and update in
``torch._foreach_*`` ops. Newton–Schulz runs once per group of matrices of one shape once
turned wide (a ``[4d, d]`` and a ``[d, 4d]`` weight share one), stacked (the iteration is per
matrix, so stacking changes nothing but the number of launches), three batched products an
iteration with the sums in their epilogues (``baddbmm``). For the Quad-Hybrid recipe that is
326 kernels a step on an H100 where it was 724 (``benchmarks/optimizer_step.py``).

Under FSDP2 every parameter, gradient and state is a DTensor sharded on dim 0. Element-wise
updates run on the local shards (``to_local()``: no DTensor dispatch, which costs tens of
microseconds of host time per op). Newton–Schulz needs the whole matrix, so a Muon update
is gathered (``full_tensor``), orthogonalised on every rank (the same input gives the same
result everywhere) and each rank keeps its own shard (``distribute_tensor(...,
src_data_rank=None)``: no communication). The momentum buffer stays sharded. This keeps
single-process and FSDP runs equal up to float rounding (``tests/test_distributed.py``
checks it) at the cost of one all-gather per matrix. ``clip_grad_norm_`` likewise sums the
squared norms of the local gradient shards and all-reduces that one number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NS_COEFFS = (3.4445, -4.7750, 2.0315)


def newton_schulz5(g: Tensor, steps: int = 5, eps: float = 1e-7) -> Tensor:
    """Approximate ``U V^T`` of ``g = U S V^T`` (the last two dims; batched over the rest).

    bf16 on CUDA (as in the reference implementation), float32 elsewhere. Each iteration is
    three batched products: ``A = X Xᵀ``, ``B = b A + c A²`` and ``X <- a X + B X``, the two
    sums taken in the products' epilogues (``baddbmm``), not as separate element-wise kernels."""
    a, b, c = NS_COEFFS
    x = g.bfloat16() if g.is_cuda else g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    lead = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    for _ in range(steps):
        A = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(A, A, A, beta=b, alpha=c), x, beta=a)
    x = x.view(*lead, *x.shape[-2:])
    return x.mT if tall else x


def muon_updates(us: list[Tensor], layout: str, steps: int, dtypes: list[torch.dtype]) -> list[Tensor]:
    """``NS5(u) * sqrt(max(1, fan_out / fan_in))`` for every whole update ``u``, in ``dtypes[i]``.

    One Newton-Schulz per group of matrices that have the same shape once each is turned wide
    (a tall ``[r, c]`` one is transposed to ``[c, r]``, as ``newton_schulz5`` does inside), so a
    layer's ``[4d, d]`` and ``[d, 4d]`` weights share one batched iteration. The scale and the
    cast (and the transpose back, written contiguous) are one kernel per orientation of a group;
    the results are views of that kernel's output, contiguous, so the multi-tensor updates after
    this take their fast path. ``layout``: ``out_in`` (``[.., out, in]``) or ``in_out``."""
    groups: dict[tuple, list[int]] = {}
    for i, u in enumerate(us):
        r, c = u.shape[-2:]
        groups.setdefault((tuple(u.shape[:-2]), min(r, c), max(r, c), u.dtype, dtypes[i]), []).append(i)
    outs: list[Tensor] = list(us)
    for idx in groups.values():
        wide = [i for i in idx if us[i].shape[-2] <= us[i].shape[-1]]
        tall = [i for i in idx if us[i].shape[-2] > us[i].shape[-1]]
        mats = [us[i] for i in wide] + [us[i].mT for i in tall]
        o = newton_schulz5(torch.stack(mats) if len(mats) > 1 else mats[0][None], steps)
        for part, members in ((o[:len(wide)], wide), (o[len(wide):].mT, tall)):
            if not members:
                continue
            shape = us[members[0]].shape
            fan_out, fan_in = shape[-2:] if layout == "out_in" else shape[-2:][::-1]
            res = torch.empty((len(members), *shape), dtype=dtypes[members[0]], device=o.device)
            torch.mul(part, math.sqrt(max(1.0, fan_out / fan_in)), out=res)
            for j, i in enumerate(members):
                outs[i] = res[j]
    return outs


def _is_dtensor(t: Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(t, DTensor)


def _local(t: Tensor) -> Tensor:
    """The shard this rank holds (the tensor itself when not distributed). In-place ops on
    it update the DTensor."""
    return t.to_local() if _is_dtensor(t) else t


def _row_block(like: Tensor) -> tuple[int, int, int] | None:
    """``(rank, world, rows)`` when ``like`` is a DTensor sharded on dim 0 of a 1-D mesh the
    way ``torch.chunk`` splits it (rank r holds rows [r c, min((r+1) c, d)), c = ceil(d /
    world): FSDP2's layout), else None."""
    from torch.distributed.tensor import Shard

    if like.device_mesh.ndim != 1 or tuple(like.placements) != (Shard(0),):
        return None
    world, rank = like.device_mesh.size(), like.device_mesh.get_local_rank()
    d = like.shape[0]
    c = -(-d // world)
    if like.to_local().shape[0] != max(0, min(c, d - rank * c)):
        return None
    return rank, world, c


def _gather_full(us: list[Tensor], likes: list[Tensor]) -> list[Tensor]:
    """Whole tensors from this rank's shards ``us`` of the DTensors ``likes`` (``us`` itself
    when not distributed). FSDP2 dim-0 shards of one mesh and dtype travel in a single
    all-gather of the padded shards; anything else is gathered tensor by tensor."""
    out: list[Tensor | None] = [None] * len(us)
    batch: dict[tuple, list[int]] = {}
    for i, (u, like) in enumerate(zip(us, likes)):
        if not _is_dtensor(like):
            out[i] = u
            continue
        blk = _row_block(like)
        if blk is None:
            from torch.distributed.tensor import DTensor

            out[i] = DTensor.from_local(u, like.device_mesh, like.placements, run_check=False, shape=like.shape,
                                        stride=like.stride()).full_tensor()
            continue
        batch.setdefault((like.device_mesh, u.dtype), []).append(i)
    import torch.distributed as dist

    for (mesh, _), idx in batch.items():
        world = mesh.size()
        pieces, sizes = [], []
        for i in idx:
            c = -(-likes[i].shape[0] // world)
            flat = us[i].reshape(us[i].shape[0], math.prod(likes[i].shape[1:]))
            pieces.append(F.pad(flat, (0, 0, 0, c - flat.shape[0])).reshape(-1))
            sizes.append(pieces[-1].numel())
        send = torch.cat(pieces)
        recv = send.new_empty(world * send.numel())
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.13
        gather(recv, send, group=mesh.get_group())
        recv = recv.view(world, -1)
        off = 0
        for i, n in zip(idx, sizes):
            shape = likes[i].shape
            out[i] = recv[:, off:off + n].reshape(-1, *shape[1:])[: shape[0]]
            off += n
    return out  # type: ignore[return-value]


def _shard_of(o: Tensor, like: Tensor) -> Tensor:
    """This rank's shard of the whole tensor ``o``, laid out as ``like``'s (no communication)."""
    if not _is_dtensor(like):
        return o
    blk = _row_block(like)
    if blk is not None:
        rank, _, c = blk
        return o[rank * c: (rank + 1) * c]
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(o, like.device_mesh, like.placements, src_data_rank=None).to_local()


def clip_grad_norm_(params: list[Tensor], max_norm: float) -> Tensor:
    """Scale the gradients so their global 2-norm is at most ``max_norm``; returns the norm
    before clipping (a plain tensor).

    Plain tensors go to ``torch.nn.utils.clip_grad_norm_``. FSDP2 gradients (DTensors sharded
    on dim 0 of one mesh) are clipped on their local shards: the squared local norms are
    summed and all-reduced once, where the DTensor path dispatches every per-tensor op
    through DTensor on the host (measured about 10x slower on CPU for a 24M-parameter model)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or not any(_is_dtensor(g) for g in grads):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import Shard

    mesh = grads[0].device_mesh
    if not all(_is_dtensor(g) and g.device_mesh == mesh and all(isinstance(pl, Shard) for pl in g.placements)
               for g in grads):  # replicated or mixed layouts: let DTensor work it out
        n = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return n.full_tensor() if _is_dtensor(n) else n
    import torch.distributed as dist

    local = [g.to_local() for g in grads]
    sq = torch.stack([n.float() for n in torch._foreach_norm(local, 2)]).square().sum()
    dist.all_reduce(sq, group=mesh.get_group())
    total = sq.sqrt()
    coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(local, coef.to(local[0].dtype) if len({t.dtype for t in local}) == 1 else coef)
    return total


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over Muon groups (``use_muon=True``) and AdamW groups.

    Muon group keys: ``lr, momentum, weight_decay, nesterov, ns_steps, layout`` (``out_in``
    for Linear weights ``[..., out, in]``, ``in_out`` for stacked ``x @ W`` weights).
    AdamW group keys: ``lr, betas, eps, weight_decay``. Every group also keeps
    ``base_lr``: the schedule sets ``lr = base_lr * factor(step)``.

    The step reads no Python number that changes from step to step: each group's ``lr`` is
    copied into a 0-d tensor on its parameters' device (``load_lr``) and AdamW's step counts
    live there too, so the same kernels run every step and a CUDA graph can replay them
    (``training/cuda_graph.GraphedOptimizer``: ``step(load_lr=False)`` inside the capture).
    """

    def __init__(self, groups: list[dict[str, Any]]):
        #: per group, its lr as a 0-d float32 tensor on its parameters' device (what the step multiplies by)
        self.lr_tensors: list[Tensor] = []
        super().__init__(groups, {})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """A group with its kind's defaults and its own lr tensor (``torch.optim.Optimizer.__init__``
        adds the constructor's groups through this too)."""
        g = param_group
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
        super().add_param_group(g)
        self.lr_tensors.append(torch.zeros(()))

    def load_lr(self) -> None:
        """Copy every group's ``lr`` (a float the schedule sets) into its lr tensor: one fill
        kernel per group, no host synchronisation (the tensor follows the parameters' device)."""
        for i, g in enumerate(self.param_groups):
            dev = _local(g["params"][0]).device if g["params"] else self.lr_tensors[i].device
            if self.lr_tensors[i].device != dev:
                self.lr_tensors[i] = torch.zeros((), device=dev)
            self.lr_tensors[i].fill_(g["lr"])

    def init_state(self) -> None:
        """Create the state of every parameter that has a gradient (momentum buffers, AdamW's
        moments and step counts on the parameter's device), as the first step would; a step
        captured in a CUDA graph must not create state inside the capture."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._state(p, group["use_muon"])

    def _state(self, p: Tensor, muon: bool) -> dict[str, Any]:
        st = self.state[p]
        if muon:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p.grad)
            return st
        dev = _local(p).device
        if "step" not in st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=dev)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        elif st["step"].device != dev:  # a checkpoint's (saved from the CPU) or an older run's
            st["step"] = st["step"].to(device=dev, dtype=torch.float32)
        return st

    @torch.no_grad()
    def step(self, closure: Any = None, load_lr: bool = True) -> Any:  # noqa: ANN401
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if load_lr:
            self.load_lr()
        for group, lr in zip(self.param_groups, self.lr_tensors):
            if group["use_muon"]:
                self._muon(group, lr)
            else:
                self._adamw(group, lr)
        return loss

    def _muon(self, group: dict[str, Any], lr: Tensor) -> None:
        wd, beta = group["weight_decay"], group["momentum"]
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        bufs = [_local(self._state(p, True)["momentum_buffer"]) for p in ps]
        grads = [_local(p.grad) for p in ps]
        torch._foreach_lerp_(bufs, grads, 1 - beta)
        us = torch._foreach_lerp(grads, bufs, beta) if group["nesterov"] else bufs
        fulls = _gather_full(us, [p.grad for p in ps])
        outs = [_shard_of(o, p) for o, p in
                zip(muon_updates(fulls, group["layout"], group["ns_steps"], [p.dtype for p in ps]), ps)]
        params = [_local(p) for p in ps]
        if wd:
            torch._foreach_mul_(params, 1 - lr * wd)
        torch._foreach_mul_(outs, lr)  # outs: fresh tensors (or views of this step's o)
        torch._foreach_sub_(params, outs)

    def _adamw(self, group: dict[str, Any], lr: Tensor) -> None:
        ps = [p for p in group["params"] if p.grad is not None]
        if not ps:
            return
        states = [self._state(p, False) for p in ps]
        steps = [st["step"] for st in states]
        torch._foreach_add_(steps, 1.0)
        params, grads = [_local(p) for p in ps], [_local(p.grad) for p in ps]
        m = [_local(st["exp_avg"]) for st in states]
        v = [_local(st["exp_avg_sq"]) for st in states]
        kw = dict(lr=lr, b1=group["betas"][0], b2=group["betas"][1], wd=group["weight_decay"], eps=group["eps"])
        by: dict[tuple, list[int]] = {}
        for i, (p, g) in enumerate(zip(params, grads)):
            # the fused kernel walks the four tensors as flat memory: one layout (contiguous) and dtype for all
            flat = m[i].dtype == v[i].dtype == p.dtype and all(t.is_contiguous() for t in (p, g, m[i], v[i]))
            by.setdefault((p.device, p.dtype, g.dtype, flat), []).append(i)
        for (dev, dtype, gdtype, flat), idx in by.items():
            step = adamw_fused if flat and fused_adamw_applies(dev, dtype, gdtype, lr) else adamw_foreach
            step(*([t[i] for i in idx] for t in (params, grads, m, v, steps)), **kw)


#: the dtypes ``torch._fused_adamw_`` takes (parameters and gradients of one dtype)
FUSED_ADAMW_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fused_adamw_applies(device: torch.device, dtype: torch.dtype, grad_dtype: torch.dtype, lr: Tensor) -> bool:
    """Can ``adamw_fused`` run tensors of this device and dtype? (CUDA or CPU, gradients of the
    parameters' floating dtype, the lr tensor on their device.)"""
    same = lr.device.type == device.type and (lr.device.index or 0) == (device.index or 0)  # "cuda" is "cuda:0"
    return device.type in ("cuda", "cpu") and dtype == grad_dtype and dtype in FUSED_ADAMW_DTYPES and same


def adamw_fused(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], steps: list[Tensor],
                *, lr: Tensor, b1: float, b2: float, wd: float, eps: float) -> None:
    """AdamW (decoupled weight decay) over all the tensors in one multi-tensor kernel: PyTorch's fused
    AdamW (``torch._fused_adamw_``, what ``torch.optim.AdamW(fused=True)`` runs), the lr a device
    tensor and the step counts ``steps`` (already advanced) read on the device. The kernel walks each
    parameter, gradient and moment as flat memory: ``MuonAdamW._adamw`` sends it only contiguous ones of one
    dtype (a transposed parameter, or moments restored contiguous from a checkpoint, go to ``adamw_foreach``)."""
    torch._fused_adamw_(params, grads, m, v, [], steps, lr=lr, beta1=b1, beta2=b2, weight_decay=wd, eps=eps,
                        amsgrad=False, maximize=False)


def adamw_foreach(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], steps: list[Tensor],
                  *, lr: Tensor, b1: float, b2: float, wd: float, eps: float) -> None:
    """``adamw_fused``'s update in ``torch._foreach_*`` ops (a dozen multi-tensor kernels), where the
    fused kernel does not apply (``fused_adamw_applies``); tested equal to it."""
    if wd:
        torch._foreach_mul_(params, 1 - lr * wd)
    torch._foreach_lerp_(m, grads, 1 - b1)
    torch._foreach_mul_(v, b2)
    torch._foreach_addcmul_(v, grads, grads, value=1 - b2)
    # p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps), with t a tensor
    neg_bc1 = torch._foreach_pow(b1, steps)  # b1^t
    torch._foreach_sub_(neg_bc1, 1.0)  # -(1 - b1^t)
    torch._foreach_div_(neg_bc1, lr)
    bc2 = torch._foreach_pow(b2, steps)
    torch._foreach_sub_(bc2, 1.0)
    torch._foreach_neg_(bc2)
    torch._foreach_sqrt_(bc2)  # sqrt(1 - b2^t)
    denom = torch._foreach_sqrt(v)
    torch._foreach_div_(denom, bc2)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, neg_bc1)
    torch._foreach_addcdiv_(params, m, denom)


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


def embedding_and_head(model: nn.Module) -> set[int]:
    """``id``s of the parameters of the model's embedding and LM head (tied or not): matrices that
    are not hidden GEMM weights (no Muon; kept in float32 under ``--param-dtype``)."""
    ids: set[int] = set()
    for name in ("embed", "lm_head"):
        mod = getattr(model, name, None)
        if mod is not None:
            ids |= {id(p) for p in mod.parameters()}
    return ids


def split_params(model: nn.Module, use_muon: bool = True) -> ParamSplit:
    """Sort parameters into Muon / AdamW-with-decay / AdamW-without-decay (module doc)."""
    special = embedding_and_head(model)
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
            elif p.ndim >= 2 and id(p) != id(meta) and not getattr(p, "_no_weight_decay", False):
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
