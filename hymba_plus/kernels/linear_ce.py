"""Linear + cross entropy fused: the LM head's loss without the ``[N, V]`` logits.

For hidden states ``h [N, D]``, the head's weight ``W [V, D]`` and targets ``y [N]``
(``ignore_index`` rows not scored), with ``S = {i : y_i != ignore_index}``::

    z_i  = W h_i                                                       (the logits of row i)
    loss = (1 / |S|) sum_{i in S} ( logsumexp_v z_iv - z_{i, y_i} )    (= F.cross_entropy(h W^T, y))
    dz_i = (softmax(z_i) - onehot(y_i)) / |S|   for i in S, 0 otherwise
    dh_i = W^T dz_i,    dW = sum_i dz_i h_i^T

Nothing in these formulas needs every row's logits at once, so the rows are processed in
chunks (Liger-Kernel's "fused linear cross entropy", Hsu et al., arXiv 2410.10989 §3.3; the
same idea as Wijmans et al., "Cut Your Losses in Large-Vocabulary Language Models", arXiv
2411.09009): at 16k tokens and a 32k vocabulary the full logits are 1 GiB in bf16, 2 GiB more
as float32, and as much again for their gradient, while a chunk of 2048 rows is 256 MiB.

* Reference (any device): ``linear_cross_entropy_ref``, an autograd function over row chunks of
  at most ``CHUNK_ELEMENTS`` logits. The forward keeps only each row's ``logsumexp`` (N
  floats); the backward recomputes each chunk's logits, turns them into ``dz`` in place and
  accumulates ``dh`` and ``dW`` (``dW`` in float32). It never synchronises with the host, so
  CUDA-graph capture works.
* Fast path (CUDA, op ``"linear_cross_entropy"``): Liger-Kernel's
  ``LigerFusedLinearCrossEntropyFunction`` (a Triton kernel writes the loss and ``dz`` into
  the chunk's logits in one pass; the gradients are computed during the forward and scaled in
  the backward). It reads ``sum(y != ignore_index)`` back to the host once per call, so it is
  not used while a CUDA graph is being captured (the reference is).

Both follow ``F.cross_entropy`` (mean over scored rows; float32 loss, float64 for float64
inputs), including the case with no scored row: the loss is NaN and the gradients are zero.
Under autocast ``h`` and ``W`` are cast to the autocast dtype first, as ``nn.Linear`` would,
so the logits are rounded to bf16 exactly as the unfused ``lm_head(h).float()`` path rounds
them; softmax and loss are computed in float32. While ``torch.compile`` traces, the unfused
form is used (``F.linear`` + ``F.cross_entropy``; Inductor fuses what it can).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch

FAST = "linear_cross_entropy"
#: logits per chunk (2**26: 2048 rows of a 32k vocabulary, 256 MiB in float32)
CHUNK_ELEMENTS = 1 << 26


def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk: ``CHUNK_ELEMENTS // vocab``, a multiple of 64 when that is at least 64."""
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    if rows >= 64:
        rows -= rows % 64
    return max(1, min(rows, n_rows))


class _ChunkedLinearCE(torch.autograd.Function):
    """loss = mean over scored rows of CE(h W^T, y), chunk by chunk (module docstring)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, rows: int) -> Tensor:
        acc = dispatch.compute_dtype(h, weight)
        N = h.shape[0]
        valid = target != ignore_index
        tgt = torch.where(valid, target, torch.zeros_like(target))[:, None]  # any class for ignored rows
        lse = torch.empty(N, dtype=acc, device=h.device)
        zt = torch.empty(N, dtype=acc, device=h.device)
        for s in range(0, N, rows):
            e = min(s + rows, N)
            z = (h[s:e] @ weight.t()).to(acc)
            lse[s:e] = torch.logsumexp(z, dim=-1)
            zt[s:e] = z.gather(1, tgt[s:e])[:, 0]
            del z
        n = valid.sum()
        loss = torch.where(valid, lse - zt, torch.zeros_like(lse)).sum() / n  # 0 / 0 = NaN when nothing is scored
        ctx.save_for_backward(h, weight, tgt, valid, lse, n)
        ctx.rows = rows
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        h, weight, tgt, valid, lse, n = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc, rows, N = lse.dtype, ctx.rows, h.shape[0]
        with torch.autocast(h.device.type, enabled=False):
            # per-row factor of dz: grad / |S| on scored rows, 0 elsewhere (no NaN when |S| = 0)
            factor = torch.where(valid, grad.to(acc) / n.clamp_min(1).to(acc), torch.zeros_like(lse))
            dh = torch.empty(h.shape, dtype=h.dtype, device=h.device) if need_h else None
            dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
            for s in range(0, N, rows):
                e = min(s + rows, N)
                dz = (h[s:e] @ weight.t()).to(acc)
                dz.sub_(lse[s:e, None]).exp_()  # softmax(z)
                dz.scatter_add_(1, tgt[s:e], torch.full_like(lse[s:e, None], -1.0))  # - onehot(y)
                dz.mul_(factor[s:e, None])
                dz = dz.to(h.dtype)
                if need_h:
                    torch.mm(dz, weight, out=dh[s:e])
                if need_w:
                    if dz.dtype == acc:
                        dw.addmm_(dz.t(), h[s:e])
                    else:
                        dw.add_(dz.t() @ h[s:e])
                del dz
        return dh, (dw.to(weight.dtype) if need_w else None), None, None, None


def linear_cross_entropy_ref(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                             rows: int | None = None) -> Tensor:
    """The chunked reference on 2-D ``h [N, D]``, ``weight [V, D]`` of one dtype, ``target [N]``."""
    rows = chunk_rows(h.shape[0], weight.shape[0]) if rows is None else max(1, int(rows))
    return _ChunkedLinearCE.apply(h, weight, target, ignore_index, rows)


def _liger_function() -> Any:
    mod = importlib.import_module("liger_kernel.ops.fused_linear_cross_entropy")
    return mod.LigerFusedLinearCrossEntropyFunction


def linear_cross_entropy_liger(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100) -> Tensor:
    """Liger-Kernel's fused linear cross entropy on 2-D ``h``, ``weight`` of one dtype (no
    autocast: the caller casts). Its chunk size is chosen the way ours is: Liger keeps about
    ``chunk_mem_const * N * D`` transient logits, so ``chunk_mem_const = CHUNK_ELEMENTS // (N * D)``.
    The weight gradient accumulates in float32 (``accum_dtype``). With no scored row Liger's
    loss is 0; it is made NaN here, as ``F.cross_entropy`` and the reference return."""
    fn = _liger_function()
    if not torch.is_grad_enabled():  # Liger computes the gradients in its forward when inputs require them
        h, weight = h.detach(), weight.detach()
    N, D = h.shape
    const = max(1, CHUNK_ELEMENTS // max(N * D, 1))
    # LigerFusedLinearCrossEntropyFunction.forward(_input, weight, target, bias, ce_weight, ignore_index,
    #   lse_square_scale, label_smoothing, reduction, softcap, return_z_loss, accum_dtype, use_token_scaling,
    #   return_token_accuracy, return_predicted_tokens[, ce_impl, ce_mode, chunk_mem_const])
    args: tuple = (h, weight, target, None, None, ignore_index, 0.0, 0.0, "mean", None, False, torch.float32,
                   False, False, False)
    if getattr(fn, "supports_inner_impl_dispatch", False):  # liger-kernel >= 0.8.5 (as its functional wrapper)
        args += (None, None, const)
    loss = fn.apply(*args)[0]
    return torch.where((target != ignore_index).any(), loss, torch.full_like(loss, float("nan")))


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    _liger_function()
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(300, 64, generator=g)
    w0 = 0.3 * torch.randn(1000, 64, generator=g)
    t = torch.randint(0, 1000, (300,), generator=g)
    t[::7] = -100
    t = t.cuda()
    got, want = [], []
    for fn, out in ((linear_cross_entropy_liger, got), (linear_cross_entropy_ref, want)):
        h = h0.to("cuda", torch.bfloat16).requires_grad_()
        w = w0.to("cuda", torch.bfloat16).requires_grad_()
        loss = fn(h, w, t)
        out += [loss, *torch.autograd.grad(loss, (h, w))]
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        err = dispatch.max_rel_err(a, b)
        if not err < 2e-2:
            raise RuntimeError(f"Liger fused linear cross entropy differs from the reference ({name}: {err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="Liger-Kernel fused linear cross entropy (Triton), LM-head loss fwd + bwd")


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100, *,
                         rows: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index)``
    without materialising the logits (module docstring).

    h: ``[..., D]``; weight: ``[V, D]`` (an LM head or a tied embedding); target: ``h.shape[:-1]``
    class ids, ``ignore_index`` not scored. Returns the mean over scored positions (float32;
    float64 for float64 inputs). ``rows``: the reference's chunk size (default:
    ``chunk_rows``). Under autocast the matmuls run in the autocast dtype; otherwise ``h`` and
    ``weight`` must share a dtype (as ``F.linear`` requires).
    """
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1] or target.shape != h.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: h [..., D], weight [V, D] and target h.shape[:-1] expected, got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    dev = h.device.type
    h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        h, weight = h.to(cdt), weight.to(cdt)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} and weight {weight.dtype} (outside autocast "
                         "they must match)")
    if dispatch.tracing(h, weight):
        return F.cross_entropy(F.linear(h, weight).to(dispatch.compute_dtype(h)), target, ignore_index=ignore_index)
    with torch.autocast(dev, enabled=False):
        if (h.dtype in (torch.bfloat16, torch.float16, torch.float32) and not _capturing(h)
                and dispatch.use_fast(FAST, h, weight)):
            return linear_cross_entropy_liger(h, weight, target, ignore_index)
        return linear_cross_entropy_ref(h, weight, target, ignore_index, rows)
