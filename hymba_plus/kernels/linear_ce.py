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
* Fast path (CUDA, op ``"linear_cross_entropy"``): ``linear_cross_entropy_fused``, Liger-Kernel's
  algorithm in a chunk loop of ours: per chunk its Triton cross-entropy kernel writes each row's
  loss and ``dz`` into the chunk's logits in one pass, and the gradients ``dh``, ``dW`` are
  computed during the forward (``dW`` in float32, accumulated inside the GEMM on CUDA) and
  scaled in the backward. The scored-row count stays on the device (Liger's own autograd
  function reads it back to the host), so the same path runs eagerly and inside a CUDA graph
  capture (``hymba train``'s default mode on CUDA), where until 2026-12-05 the reference ran.

Both follow ``F.cross_entropy`` (mean over scored rows; float32 loss, float64 for float64
inputs), including the case with no scored row: the loss is NaN and the gradients are zero.
Under autocast ``h`` and ``W`` are cast to the autocast dtype first, as ``nn.Linear`` would
(float64 ones are not: autocast leaves them alone), so the logits are rounded to bf16 exactly as
the unfused ``lm_head(h).float()`` path rounds them; softmax and loss are computed in float32.
While ``torch.compile`` traces, the unfused form is used (``F.linear`` + ``F.cross_entropy``;
Inductor fuses what it can).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import dispatch
from ._triton import next_pow2

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


def _liger_ce_kernel() -> tuple[Any, int]:
    """Liger-Kernel's cross-entropy Triton kernel and its largest block (``MAX_FUSED_SIZE``)."""
    mod = importlib.import_module("liger_kernel.ops.cross_entropy")
    return mod.liger_cross_entropy_kernel, mod.MAX_FUSED_SIZE


#: ``torch.addmm(..., out_dtype=)`` (16-bit operands, float32 output) exists from torch 2.8
_ADDMM_OUT_DTYPE = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 8)


def _accumulate(dw: Tensor, dz_t: Tensor, h: Tensor) -> None:
    """``dw += dz_t @ h`` into the float32 ``dw``: on CUDA (sm80+) for 16-bit operands one
    ``addmm`` that accumulates in the GEMM's float32 epilogue (``out_dtype``, torch >= 2.8; as
    Liger's own loop does), elsewhere a product in the operands' dtype and an add."""
    if dz_t.dtype == dw.dtype:
        dw.addmm_(dz_t, h)
    elif (dw.is_cuda and _ADDMM_OUT_DTYPE and torch.cuda.get_device_capability(dw.device)[0] >= 8
          and dz_t.dtype in (torch.float16, torch.bfloat16)):
        torch.addmm(dw, dz_t, h, out_dtype=torch.float32, out=dw)
    else:
        dw.add_(dz_t @ h)


class _FusedLinearCE(torch.autograd.Function):
    """The fast path: Liger's fused linear cross entropy (Hsu et al., arXiv 2410.10989 §3.3) in a
    chunk loop of ours, so that nothing is read back to the host and a CUDA graph can capture it.
    Per chunk of rows: the logits ``z = h W^T`` into one reused buffer (the inputs' dtype),
    Liger's Triton kernel turns each row into its loss (float32) and ``dz = softmax(z) -
    onehot(y)`` in place (``reduction="sum"``: not yet divided by |S|; ignored rows get 0),
    then ``dh = dz W`` and ``dW += dz^T h`` (float32). The forward thus holds both gradients;
    the backward scales them by ``grad / |S|`` on the device. (Liger's own autograd function
    reads |S| back to the host for its kernel's ``mean`` scaling, which a capture cannot.)"""

    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, target: Tensor, ignore_index: int, rows: int) -> Tensor:
        kernel, max_block = _liger_ce_kernel()
        N, V = h.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n = (target != ignore_index).sum()
        row_loss = torch.zeros(N, dtype=torch.float32, device=h.device)
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        buf = torch.empty(min(rows, N), V, dtype=h.dtype, device=h.device)
        target = target.contiguous()
        for s in range(0, N, rows):
            e = min(s + rows, N)
            z = buf[: e - s]
            torch.mm(h[s:e], weight.t(), out=z)
            kernel[(e - s,)](
                X_ptr=z, X_stride=z.stride(0), Y_ptr=target[s:e], Y_stride=1, weight_ptr=None,
                loss_ptr=row_loss[s:e], z_loss_ptr=None, loss_stride=1, token_accuracy_ptr=None,
                token_accuracy_stride=0, predicted_tokens_ptr=None, predicted_tokens_stride=0, n_cols=V,
                n_non_ignore=1, sum_non_ignore_weight=1, weight_sum=0.0, ignore_index=ignore_index,
                lse_square_scale=0.0, label_smoothing=0.0, reduction="sum", softcap=None, RETURN_Z_LOSS=False,
                RETURN_TOKEN_ACCURACY=False, RETURN_PREDICTED_TOKENS=False, HAS_WEIGHT=False,
                HAS_SOFTCAPPING=False, HAS_GRADIENTS=need_h or need_w,
                BLOCK_SIZE=min(max_block, next_pow2(V)), num_warps=32,
            )  # z now holds dz
            if need_h:
                torch.mm(z, weight, out=dh[s:e])
            if need_w:
                _accumulate(dw, z.t(), h[s:e])
        ctx.save_for_backward(dh, dw, n)
        ctx.w_dtype = weight.dtype
        return row_loss.sum() / n  # 0 / 0 = NaN when nothing is scored (the gradients are then 0)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        dh, dw, n = ctx.saved_tensors
        scale = grad.float() / n.clamp_min(1)
        gh = (dh.float() * scale).to(dh.dtype) if dh is not None else None
        gw = (dw * scale).to(ctx.w_dtype) if dw is not None else None
        return gh, gw, None, None, None


def linear_cross_entropy_fused(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100,
                               rows: int | None = None) -> Tensor:
    """The fast path (``_FusedLinearCE``) on 2-D ``h``, ``weight`` of one 16-bit or float32 dtype
    (no autocast: the caller casts), ``target`` [N]; ``rows``: the chunk size (default
    ``chunk_rows``, as the reference)."""
    if not torch.is_grad_enabled():  # gradients are made in the forward when inputs require them
        h, weight = h.detach(), weight.detach()
    rows = chunk_rows(h.shape[0], weight.shape[0]) if rows is None else max(1, int(rows))
    return _FusedLinearCE.apply(h, weight, target, ignore_index, rows)


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    _liger_ce_kernel()
    g = torch.Generator().manual_seed(0)
    h0 = torch.randn(300, 64, generator=g)
    w0 = 0.3 * torch.randn(1000, 64, generator=g)
    t = torch.randint(0, 1000, (300,), generator=g)
    t[::7] = -100
    t = t.cuda()
    got, want = [], []
    # chunks of 64 rows (the last partial): the float32 weight-gradient accumulation runs five times
    for fn, out in ((lambda a, b, c: linear_cross_entropy_fused(a, b, c, rows=64), got),
                    (linear_cross_entropy_ref, want)):
        h = h0.to("cuda", torch.bfloat16).requires_grad_()
        w = w0.to("cuda", torch.bfloat16).requires_grad_()
        loss = fn(h, w, t)
        out += [loss, *torch.autograd.grad(loss, (h, w))]
    for name, a, b in zip(("loss", "dh", "dW"), got, want):
        err = dispatch.max_rel_err(a, b)
        if not err < 2e-2:
            raise RuntimeError(f"the fused linear cross entropy differs from the reference ({name}: {err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="fused linear cross entropy (Liger-Kernel's Triton CE kernel in a capturable "
                   "chunk loop), LM-head loss fwd + bwd")


def linear_cross_entropy(h: Tensor, weight: Tensor, target: Tensor, ignore_index: int = -100, *,
                         rows: int | None = None) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight).float(), target, ignore_index=ignore_index)``
    without materialising the logits (module docstring).

    h: ``[..., D]``; weight: ``[V, D]`` (an LM head or a tied embedding); target: ``h.shape[:-1]``
    class ids, ``ignore_index`` not scored. Returns the mean over scored positions (float32;
    float64 for float64 inputs). ``rows``: the reference's chunk size (default:
    ``chunk_rows``). Under autocast the matmuls run in the autocast dtype (float64 inputs stay
    float64, as autocast leaves them); otherwise ``h`` and ``weight`` must share a dtype (as
    ``F.linear`` requires).
    """
    if weight.dim() != 2 or h.shape[-1] != weight.shape[1] or target.shape != h.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: h [..., D], weight [V, D] and target h.shape[:-1] expected, got "
                         f"{tuple(h.shape)}, {tuple(weight.shape)}, {tuple(target.shape)}")
    dev = h.device.type
    h, target = h.reshape(-1, h.shape[-1]), target.reshape(-1)
    if torch.is_autocast_enabled(dev) and torch.float64 not in (h.dtype, weight.dtype):  # (float64: not cast)
        cdt = torch.get_autocast_dtype(dev)
        h, weight = h.to(cdt), weight.to(cdt)
    elif h.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: h is {h.dtype} and weight {weight.dtype} (outside autocast "
                         "they must match)")
    if dispatch.tracing(h, weight):
        return F.cross_entropy(F.linear(h, weight).to(dispatch.compute_dtype(h)), target, ignore_index=ignore_index)
    with torch.autocast(dev, enabled=False):
        if h.dtype in (torch.bfloat16, torch.float16, torch.float32) and dispatch.use_fast(FAST, h, weight):
            return linear_cross_entropy_fused(h, weight, target, ignore_index, rows)
        return linear_cross_entropy_ref(h, weight, target, ignore_index, rows)
