"""Mixture-of-experts kernels: top-k routing, sort-based dispatch, grouped expert GEMMs.

Routing (token choice, top-k)
-----------------------------
* softmax scores -- Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, Eq. 1) / GShard
  (Lepikhin et al. 2020, arXiv 2006.16668) / Qwen3-Next::

      p = softmax(x W_r),   E_n = top-k(p_n + b),   w_n,e = p_n,e [/ sum_{e' in E_n} p_n,e']

* sigmoid scores -- DeepSeek-V3 (arXiv 2412.19437, Eq. 15-16)::

      s = sigmoid(x W_r),   E_n = top-k(s_n + b),   w_n,e = s_n,e [/ sum_{e' in E_n} s_n,e']

  ``b`` is the auxiliary-loss-free balancing bias (DeepSeek-V3 §2.1.2, Wang et al. 2024,
  arXiv 2408.15664): it only changes *which* experts are chosen, never the weights.

Dispatch (dropless, sort based; MegaBlocks, Gale et al. 2022, arXiv 2211.15841)
------------------------------------------------------------------------------
The ``N * k`` (token, expert) assignments are stable-sorted by expert so that every expert
owns one contiguous segment; then::

    x_s = x[tok]                               gather rows in segment order
    h   = x_s W_gu[e]                          grouped GEMM, one weight per segment
    a   = SiLU(h_gate) * h_up * w              SwiGLU (Shazeer 2020, Eq. 6), routing weight folded in
    o   = a W_down[e]                          grouped GEMM
    y_n = sum_j o[inv[n k + j]]                un-sort: each token sums its k rows

Two ways to run the grouped GEMMs, same numbers:

* ``grouped`` -- ``torch._grouped_mm`` over the segments (offsets = cumulative counts):
  the fast path on CUDA (sm90+, bf16), registered as ``moe_grouped_mm`` in ``dispatch``.
  Gather, GEMMs, activation and un-sort form one autograd node (``_GroupedExperts``) whose
  backward recomputes the activation instead of keeping the [N k, h] tensor.
* ``padded`` -- every segment is copied into a zero-padded ``[E, C, d]`` buffer and one
  ``torch.bmm`` runs all experts (``C`` = the capacity, or the largest segment when
  dropless). Runs on every device and dtype.

Capacity (Switch Transformer §2.2, "expert capacity" = capacity_factor * N k / E): the
assignments of an expert past its capacity, in token order, contribute zero and are
counted as dropped. ``capacity=None`` (the default) is dropless.

The gather / un-sort pair are each other's transposes, so their backward passes are
written explicitly (a gather in one direction is a k-row sum in the other): no atomics,
deterministic. On CUDA, Triton kernels fuse the SwiGLU activation with its routing weight
and the k-row sum (``moe_triton`` fast path), and the softmax router (``moe_router``: probs,
logsumexp, top-k and renormalized weights in one kernel, all their gradients in another);
elsewhere they are plain PyTorch.

Fused layer (``moe_layer``): the router + shared-gate GEMM, routing, the grouped experts,
the gated shared expert and the balance / z losses as one autograd node (``_MoELayer``)
whose backward is written out, for the launch-bound eager training case on CUDA.

Few-token experts (``moe_decode``, ``moe_decode_triton``): a decode step or a short verify
chunk (N k <= ``DECODE_MAX_ASSIGNMENTS``, no gradient needed, dropless) runs the routed
experts as two Triton GEMV kernels and nothing else -- K1 per (token, slot) and block of h:
``a = SiLU(x W_g[e]) * (x W_u[e]) * w``; K2 per token and block of d: ``y = sum_j a_j
W_down[e_j]`` (float32 accumulation, no atomics), K2 also writing the per-expert counts and
the dropped count -- instead of the sort / Plan / gather / grouped GEMMs / un-sort (~40
kernels per layer), with launch configs fixed by the shapes, so the decode engine captures
it. The layer (``components.moe``) then takes the composed form instead of ``moe_layer``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from .dispatch import autocast_dtype, fast_path, max_rel_err, tracing, use_fast

try:  # Triton is optional: only the CUDA fast path uses it
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - missing or broken install = no Triton path
    triton = None
    tl = None

GROUPED_MM = "moe_grouped_mm"
TRITON = "moe_triton"
ROUTER = "moe_router"
LAYER = "moe_layer"
DECODE = "moe_decode"
IMPLS = ("auto", "grouped", "padded", "fused")


# ----------------------------------------------------------------------------- routing


@dataclass
class Routing:
    """Result of ``route`` for N tokens.

    experts: [N, k] long, chosen experts (selection used the bias, if any)
    weights: [N, k] float32 combine weights (differentiable; the bias never enters them)
    probs:   [N, E] float32 router distribution (softmax, or sigmoid scores normalized
             to sum 1) -- the P of the balancing loss and of the routing entropy
    logits:  [N, E] router logits (the z-loss reads them where ``lse`` is None)
    lse:     [N] logsumexp of the logits (differentiable) for softmax scores with
             renormalized top-k and no bias; None otherwise
    """

    experts: Tensor
    weights: Tensor
    probs: Tensor
    logits: Tensor
    lse: Tensor | None = None  # [N] logsumexp of the logits, where the fused router made it


def route(logits: Tensor, top_k: int, score: str = "softmax", norm_topk: bool = True,
          bias: Tensor | None = None) -> Routing:
    """Token-choice top-k routing (see the module docstring for the equations); float32 at least."""
    if score == "softmax" and bias is None and norm_topk:
        # softmax is monotone and its renormalized top-k is the softmax of the k largest
        # logits: one fused Triton kernel on CUDA, else four PyTorch ops (no gather)
        fused = _router_triton_ok(logits, top_k)
        weights, probs, lse, experts = (_RouterTriton.apply if fused else _router_torch)(logits, top_k)
        return Routing(experts=experts, weights=weights, probs=probs, logits=logits, lse=lse)
    logits = logits if logits.dtype == torch.float64 else logits.float()
    if score == "softmax":
        scores = torch.softmax(logits, dim=-1)
        probs = scores
    elif score == "sigmoid":
        scores = torch.sigmoid(logits)
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
    else:
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")
    select = scores if bias is None else scores.detach() + bias.float()
    experts = torch.topk(select.detach(), top_k, dim=-1).indices
    weights = scores.gather(-1, experts)
    if norm_topk:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
    return Routing(experts=experts, weights=weights, probs=probs, logits=logits)


def expert_load(experts: Tensor, n_experts: int, valid: Tensor | None = None) -> Tensor:
    """[E] float32: assignments per expert, counting only real tokens (``valid`` [N] bool).

    A scatter-add, not ``bincount``: bincount on CUDA reads its max back to the host.
    """
    flat = experts.reshape(-1)
    ones = torch.ones(flat.shape, dtype=torch.float32, device=flat.device)
    if valid is not None:
        ones = ones * valid.to(torch.float32).repeat_interleave(experts.shape[-1])
    return torch.zeros(n_experts, dtype=torch.float32, device=flat.device).scatter_add_(0, flat, ones)


def load_balancing_loss(probs: Tensor, load: Tensor, top_k: int, valid: Tensor | None = None,
                        weigh: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Switch / GShard balancing loss ``E * sum_e f_e P_e`` (Switch Transformer Eq. 4-6).

    f_e = share of the (real) token->expert assignments that chose expert e (sums to 1),
    P_e = mean router probability of expert e over real tokens. Equals 1 when routing is
    uniform, grows with imbalance. Only P carries gradient (f comes from the argmax).
    ``weigh(P, f)``: how the router's term is multiplied by the counts' (by default ``P * f``;
    global-batch balance keeps its first run's counts for the backward, ``components/moe.py``).
    """
    mul = torch.mul if weigh is None else weigh
    E = probs.shape[-1]
    if valid is None:  # token count known on the host: no tensor made from a Python number
        n = max(probs.shape[0], 1)
        return mul(probs.sum(0), load).sum() * (E / (n * n * top_k))
    m = valid.to(probs.dtype)
    n = m.sum().clamp_min(1.0)
    p_mean = (probs * m[:, None]).sum(0) / n
    f = load / (n * top_k)
    return E * mul(p_mean, f).sum()


def router_z_loss(logits: Tensor, valid: Tensor | None = None, lse: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE, Zoph et al. 2022, arXiv 2202.08906, Eq. 5): mean (logsumexp x W_r)^2.
    ``lse``: the logsumexp when the router already computed it."""
    if lse is None:
        lse = torch.logsumexp(logits if logits.dtype == torch.float64 else logits.float(), dim=-1)
    z = lse.square()
    if valid is None:
        return z.mean() if z.numel() else z.sum()
    m = valid.to(z.dtype)
    return (z * m).sum() / m.sum().clamp_min(1.0)


def routing_entropy(probs: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean entropy (nats) of the router distribution over real tokens."""
    h = torch.special.entr(probs).sum(-1)
    if valid is None:
        return h.mean() if h.numel() else h.sum()
    m = valid.to(h.dtype)
    return (h * m).sum() / m.sum().clamp_min(1.0)


# ----------------------------------------------------------------------------- fast-path probes


def _probe_grouped_mm() -> None:
    """Run once: torch._grouped_mm must exist here and match a per-group matmul (fwd + bwd)."""
    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    cap = torch.cuda.get_device_capability()
    if cap < (9, 0):
        raise RuntimeError(f"torch._grouped_mm needs sm90+, this device is sm{cap[0]}{cap[1]}")
    g = torch.Generator().manual_seed(0)
    sizes = [5, 0, 19, 8]  # ragged, with an empty group
    x = torch.randn(sum(sizes), 64, generator=g)
    w = torch.randn(len(sizes), 64, 48, generator=g) / 8
    dy = torch.randn(sum(sizes), 48, generator=g)
    xc = x.cuda().bfloat16().requires_grad_()
    wc = w.cuda().bfloat16().requires_grad_()
    offs = torch.tensor(sizes).cumsum(0).to(device="cuda", dtype=torch.int32)
    y = torch._grouped_mm(xc, wc, offs=offs)
    y.backward(dy.cuda().bfloat16())
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    yr = torch.cat([xr[a:b] @ wr[i] for i, (a, b) in enumerate(zip([0, *offs.tolist()[:-1]], offs.tolist()))])
    yr.backward(dy)
    for got, ref, what in ((y, yr, "output"), (xc.grad, xr.grad, "grad x"), (wc.grad, wr.grad, "grad w")):
        err = max_rel_err(got, ref)
        if not err < 3e-2:
            raise RuntimeError(f"torch._grouped_mm {what} differs from the per-group reference (rel {err:.3g})")


def _probe_triton() -> None:
    if triton is None:
        raise ImportError("triton is not installed")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 2 * 40, generator=g).cuda()
    w = torch.rand(7, generator=g).cuda()
    a = _swiglu_triton_fwd(h, w)
    ref = _swiglu_torch(h, w)
    if not torch.allclose(a, ref, atol=1e-5, rtol=1e-4):
        raise RuntimeError("Triton SwiGLU kernel differs from PyTorch")
    src = torch.randn(12, 40, generator=g).cuda()
    idx = torch.randperm(12, generator=g).cuda()
    if not torch.allclose(_gather_sum_triton(src, idx, 3), _gather_sum_torch(src, idx, 3), atol=1e-5):
        raise RuntimeError("Triton gather-sum kernel differs from PyTorch")


def _probe_router() -> None:
    """The fused router against PyTorch on this GPU: outputs and d logits, several (E, k)."""
    _probe_triton()
    g = torch.Generator().manual_seed(0)
    for E, k in ((64, 4), (6, 3), (100, 1), (512, 10)):
        logits = torch.randn(33, E, generator=g).cuda().requires_grad_()
        got = _RouterTriton.apply(logits, k)
        ref = _router_torch(logits, k)
        if not torch.equal(got[3], ref[3]):
            raise RuntimeError(f"fused router picks other experts than torch.topk (E={E}, k={k})")
        seeds = [torch.randn(t.shape, generator=g).cuda() for t in ref[:3]]
        grads = [torch.autograd.grad(sum((o * s).sum() for o, s in zip(out[:3], seeds)), logits)[0]
                 for out in (got, ref)]
        for a, b in zip([*got[:3], grads[0]], [*ref[:3], grads[1]]):
            if not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
                raise RuntimeError(f"fused router differs from PyTorch (E={E}, k={k})")


fast_path(GROUPED_MM, probe=_probe_grouped_mm, doc="torch._grouped_mm expert GEMMs (CUDA sm90+, bf16)")
fast_path(TRITON, probe=_probe_triton, doc="Triton fused SwiGLU x routing weight and k-row sum")
def _probe_layer() -> None:
    """The fused layer on this GPU (bf16: grouped GEMMs, Triton router / SwiGLU / k-row sums)
    against the same function on the CPU in float32 (its PyTorch forms): outputs, losses
    and every gradient."""
    _probe_router()
    _probe_grouped_mm()
    g = torch.Generator().manual_seed(0)
    N, d, E, k, h, hs = 40, 64, 8, 2, 32, 32
    shapes = [(N, d), (E, d), (1, d), (E, d, 2 * h), (E, h, d), (hs, d), (hs, d), (d, hs)]
    ins = [torch.randn(*sh, generator=g) / (8.0 if len(sh) == 3 or sh[0] != N else 1.0) for sh in shapes]
    gy = torch.randn(N, d, generator=g)
    res = []
    for dev, dt in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        ts = [t.to(dev, dt).requires_grad_() for t in ins]
        y, aux, *_ = _MoELayer.apply(*ts, k, 0.5, 0.25, dt)
        torch.autograd.backward([y, aux], [gy.to(dev, dt), torch.ones_like(aux)])
        res.append([y, aux] + [t.grad for t in ts])
    for i, (a, b) in enumerate(zip(*res)):
        err = max_rel_err(a, b)
        if not err < 3e-2:
            raise RuntimeError(f"fused MoE layer differs from its CPU form (output {i}: rel {err:.3g})")


fast_path(ROUTER, probe=_probe_router, doc="Triton fused softmax router: probs, logsumexp, top-k, weights "
                                           "in one kernel, d logits in one (E <= 4096, k <= 16)")
fast_path(LAYER, probe=_probe_layer, doc="the whole MoE layer (router GEMM + shared gate, softmax top-k, grouped "
                                         "experts, gated shared expert, balance and z losses) as one autograd "
                                         "node with a hand-written backward (eager CUDA, bf16)")


def grouped_mm_supported(x: Tensor, *weights: Tensor, dtype: torch.dtype | None = None) -> bool:
    """May ``x`` / ``weights`` take the torch._grouped_mm fast path (on this device, dtype, shape)?
    ``dtype``: the dtype the GEMMs will run in, where they are cast first (default: their own)."""
    tensors = (x, *weights)
    if any((dtype or t.dtype) != torch.bfloat16 for t in tensors):
        return False
    if any(t.shape[-1] % 8 or t.shape[-2] % 8 for t in weights):  # 16-byte aligned rows
        return False
    return use_fast(GROUPED_MM, *tensors)


def _triton_ok(*tensors: Tensor) -> bool:
    """Hand-written Triton kernels in eager mode only: under ``torch.compile`` the PyTorch
    forms are traced instead, so Inductor fuses them with their neighbours."""
    if tracing(*tensors):
        return False
    return all(t.is_cuda for t in tensors) and use_fast(TRITON, *tensors)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def _swiglu_fwd_kernel(h_ptr, w_ptr, a_ptr, H, stride_h, stride_w, stride_a,
                           HAS_W: tl.constexpr, W_SIGMOID: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < H
        g = tl.load(h_ptr + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
        u = tl.load(h_ptr + row * stride_h + H + cols, mask=m, other=0.0).to(tl.float32)
        a = g * tl.sigmoid(g) * u
        if HAS_W:
            wv = tl.load(w_ptr + row * stride_w).to(tl.float32)
            if W_SIGMOID:  # w holds logits (the shared expert's gate): its sigmoid here, no kernel of its own
                wv = tl.sigmoid(wv)
            a = a * wv
        tl.store(a_ptr + row * stride_a + cols, a.to(a_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _swiglu_bwd_kernel(h_ptr, w_ptr, da_ptr, dh_ptr, dw_ptr, a_ptr, H, stride_h, stride_da, stride_dh, stride_a,
                           HAS_W: tl.constexpr, STORE_A: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        if HAS_W:
            wv = tl.load(w_ptr + row).to(tl.float32)
        else:
            wv = 1.0
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, H, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            m = cols < H
            g = tl.load(h_ptr + row * stride_h + cols, mask=m, other=0.0).to(tl.float32)
            u = tl.load(h_ptr + row * stride_h + H + cols, mask=m, other=0.0).to(tl.float32)
            da = tl.load(da_ptr + row * stride_da + cols, mask=m, other=0.0).to(tl.float32)
            s = tl.sigmoid(g)
            silu = g * s
            dg = da * wv * u * s * (1.0 + g * (1.0 - s))
            du = da * wv * silu
            tl.store(dh_ptr + row * stride_dh + cols, dg.to(dh_ptr.dtype.element_ty), mask=m)
            tl.store(dh_ptr + row * stride_dh + H + cols, du.to(dh_ptr.dtype.element_ty), mask=m)
            if STORE_A:  # the forward output, recomputed (so the forward need not keep it)
                tl.store(a_ptr + row * stride_a + cols, (silu * u * wv).to(a_ptr.dtype.element_ty), mask=m)
            acc += da * silu * u
        if HAS_W:
            tl.store(dw_ptr + row, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty))

    @triton.jit
    def _router_fwd_kernel(l_ptr, p_ptr, w_ptr, e_ptr, lse_ptr, N, E, stride_l,
                           K: tl.constexpr, KB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
        """BLOCK_M tokens: softmax over E logits, logsumexp, and the top-K experts with their
        renormalized weights (= softmax of the K largest logits), by K argmax passes."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_E)
        rm = rows < N
        m = rm[:, None] & (cols < E)[None, :]
        lv = tl.load(l_ptr + rows[:, None] * stride_l + cols[None, :], mask=m, other=-float("inf")).to(tl.float32)
        mx = tl.max(lv, axis=1)
        mx = tl.where(rm, mx, 0.0)  # rows past N: keep the arithmetic finite
        ex = tl.where(m, tl.exp(lv - mx[:, None]), 0.0)
        tot = tl.where(rm, tl.sum(ex, axis=1), 1.0)
        tl.store(p_ptr + rows[:, None] * E + cols[None, :], ex / tot[:, None], mask=m)
        tl.store(lse_ptr + rows, mx + tl.log(tot), mask=rm)
        ks = tl.arange(0, KB)
        top_v = tl.full([BLOCK_M, KB], -float("inf"), tl.float32)
        top_i = tl.zeros([BLOCK_M, KB], dtype=tl.int32)
        vals = lv
        for j in tl.static_range(K):
            v = tl.max(vals, axis=1)
            i = tl.argmax(vals, axis=1)
            top_v = tl.where(ks[None, :] == j, v[:, None], top_v)
            top_i = tl.where(ks[None, :] == j, i[:, None], top_i)
            vals = tl.where(cols[None, :] == i[:, None], -float("inf"), vals)
        km = rm[:, None] & (ks < K)[None, :]
        w = tl.where(km, tl.exp(top_v - mx[:, None]), 0.0)
        w = w / tl.where(rm, tl.sum(w, axis=1), 1.0)[:, None]
        tl.store(w_ptr + rows[:, None] * K + ks[None, :], w, mask=km)
        tl.store(e_ptr + rows[:, None] * K + ks[None, :], top_i.to(tl.int64), mask=km)

    @triton.jit
    def _router_bwd_kernel(l_ptr, lse_ptr, e_ptr, w_ptr, dw_ptr, dp_ptr, dlse_ptr, dl_ptr, N, E,
                           stride_l, stride_dp, stride_dl, K: tl.constexpr, KB: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, HAS_DW: tl.constexpr,
                           HAS_DP: tl.constexpr, HAS_DLSE: tl.constexpr):
        """d logits of BLOCK_M tokens from d weights (softmax of the top-K logits), d probs
        (softmax) and d lse: p (dp - <p, dp>) + p dlse + scatter_K w (dw - <w, dw>)."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_E)
        rm = rows < N
        m = rm[:, None] & (cols < E)[None, :]
        lv = tl.load(l_ptr + rows[:, None] * stride_l + cols[None, :], mask=m, other=0.0).to(tl.float32)
        lse = tl.load(lse_ptr + rows, mask=rm, other=0.0)
        p = tl.where(m, tl.exp(lv - lse[:, None]), 0.0)
        dl = tl.zeros([BLOCK_M, BLOCK_E], dtype=tl.float32)
        if HAS_DP:
            dp = tl.load(dp_ptr + rows[:, None] * stride_dp + cols[None, :], mask=m, other=0.0).to(tl.float32)
            dl += p * (dp - tl.sum(p * dp, axis=1)[:, None])
        if HAS_DLSE:
            dl += p * tl.load(dlse_ptr + rows, mask=rm, other=0.0).to(tl.float32)[:, None]
        if HAS_DW:
            ks = tl.arange(0, KB)
            km = rm[:, None] & (ks < K)[None, :]
            off = rows[:, None] * K + ks[None, :]
            w = tl.load(w_ptr + off, mask=km, other=0.0)
            dw = tl.load(dw_ptr + off, mask=km, other=0.0).to(tl.float32)
            ei = tl.load(e_ptr + off, mask=km, other=-1)
            dtop = w * (dw - tl.sum(w * dw, axis=1)[:, None])  # [BLOCK_M, KB]
            for j in tl.static_range(K):  # scatter the K choices into their expert columns
                sel = ks[None, :] == j
                e_j = tl.sum(tl.where(sel, ei, 0), axis=1)
                d_j = tl.sum(tl.where(sel, dtop, 0.0), axis=1)
                dl += tl.where(cols[None, :] == e_j[:, None], d_j[:, None], 0.0)
        tl.store(dl_ptr + rows[:, None] * stride_dl + cols[None, :], dl.to(dl_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gather_sum_kernel(src_ptr, idx_ptr, out_ptr, D, stride_src, stride_out,
                           K: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = cols < D
        if ACC:  # out += the k-row sum (one pass instead of a sum and an add)
            acc = tl.load(out_ptr + n * stride_out + cols, mask=m, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
        for j in tl.static_range(K):
            r = tl.load(idx_ptr + n * K + j).to(tl.int64)
            acc += tl.load(src_ptr + r * stride_src + cols, mask=m, other=0.0).to(tl.float32)
        tl.store(out_ptr + n * stride_out + cols, acc.to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _decode_gate_up_kernel(x_ptr, e_ptr, w_ptr, w1_ptr, a_ptr, D, H, stride_x, stride_e0, stride_e1,
                               stride_w0, stride_w1, stride_1e, stride_1d, K: tl.constexpr,
                               BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
        """moe_decode K1 -- one (token n, slot j) assignment p = n K + j and BLOCK_H hidden
        units per program: g, u = x_n W_gu[e][:, cols], x_n W_gu[e][:, H + cols] (float32
        accumulation over d, rounded to x's dtype as the reference GEMM's output is), then
        a[p, cols] = SiLU(g) * u * w_nj in float32, stored in a's dtype (SwiGLU, Shazeer 2020
        Eq. 6, as ``_swiglu_fwd_kernel``)."""
        p = tl.program_id(0)
        n = (p // K).to(tl.int64)
        j = p % K
        e = tl.load(e_ptr + n * stride_e0 + j * stride_e1).to(tl.int64)
        wv = tl.load(w_ptr + n * stride_w0 + j * stride_w1).to(tl.float32)
        cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        hm = cols < H
        acc_g = tl.zeros([BLOCK_H], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_H], dtype=tl.float32)
        wbase = w1_ptr + e * stride_1e
        for start in range(0, D, BLOCK_D):
            rows = start + tl.arange(0, BLOCK_D)
            dm = rows < D
            xv = tl.load(x_ptr + n * stride_x + rows, mask=dm, other=0.0).to(tl.float32)
            off = rows[:, None].to(tl.int64) * stride_1d + cols[None, :]
            m = dm[:, None] & hm[None, :]
            wg = tl.load(wbase + off, mask=m, other=0.0).to(tl.float32)
            wu = tl.load(wbase + off + H, mask=m, other=0.0).to(tl.float32)
            acc_g += tl.sum(xv[:, None] * wg, axis=0)
            acc_u += tl.sum(xv[:, None] * wu, axis=0)
        g = acc_g.to(a_ptr.dtype.element_ty).to(tl.float32)  # the reference's h is in x's dtype
        u = acc_u.to(a_ptr.dtype.element_ty).to(tl.float32)
        a = g * tl.sigmoid(g) * u * wv
        tl.store(a_ptr + p.to(tl.int64) * H + cols, a.to(a_ptr.dtype.element_ty), mask=hm)

    @triton.jit
    def _decode_down_kernel(a_ptr, e_ptr, w2_ptr, y_ptr, cnt_ptr, drop_ptr, D, H, E, P, stride_e0, stride_e1,
                            stride_2e, stride_2h, stride_y, K: tl.constexpr, BLOCK_H: tl.constexpr,
                            BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_E: tl.constexpr):
        """moe_decode K2 -- token n, BLOCK_D output columns per program: for each of its K
        slots, o_j = a[n K + j] W_down[e_nj][:, cols] (float32 accumulation over h, rounded to
        y's dtype as the reference GEMM's output is), y_n = sum_j o_j in float32 (the
        reference's k-row sum), in y's dtype. No atomics: each program owns its columns.
        Program (0, 0) also writes the per-expert assignment counts [E] and the dropped
        count (0: dropless), so the routed experts need no other kernel."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        dm = cols < D
        y = tl.zeros([BLOCK_D], dtype=tl.float32)
        for j in tl.static_range(K):
            e = tl.load(e_ptr + n * stride_e0 + j * stride_e1).to(tl.int64)
            arow = a_ptr + (n * K + j) * H
            wbase = w2_ptr + e * stride_2e
            acc = tl.zeros([BLOCK_D], dtype=tl.float32)
            for start in range(0, H, BLOCK_H):
                rows = start + tl.arange(0, BLOCK_H)
                hm = rows < H
                av = tl.load(arow + rows, mask=hm, other=0.0).to(tl.float32)
                wt = tl.load(wbase + rows[:, None].to(tl.int64) * stride_2h + cols[None, :],
                             mask=hm[:, None] & dm[None, :], other=0.0).to(tl.float32)
                acc += tl.sum(av[:, None] * wt, axis=0)
            y += acc.to(y_ptr.dtype.element_ty).to(tl.float32)
        tl.store(y_ptr + n * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=dm)
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            ps = tl.arange(0, BLOCK_P)
            pm = ps < P
            ev = tl.load(e_ptr + (ps // K).to(tl.int64) * stride_e0 + (ps % K) * stride_e1, mask=pm, other=-1)
            for e0 in range(0, E, BLOCK_E):
                es = e0 + tl.arange(0, BLOCK_E)
                hit = (ev[None, :] == es[:, None]) & pm[None, :]
                tl.store(cnt_ptr + es, tl.sum(hit.to(tl.int32), axis=1).to(tl.int64), mask=es < E)
            tl.store(drop_ptr + ps, tl.zeros([BLOCK_P], dtype=tl.int64), mask=ps < 1)


def _pow2(n: int) -> int:
    """Smallest power of two >= n, at least 2 (a Triton block over the k choices)."""
    return max(2, 1 << (max(n, 1) - 1).bit_length())


def _block(n: int, cap: int = 1024) -> int:
    return max(16, min(cap, 1 << (max(n, 1) - 1).bit_length()))


def _swiglu_triton_fwd(h: Tensor, w: Tensor | None, w_sigmoid: bool = False) -> Tensor:
    """``swiglu(h, w)`` forward; ``w_sigmoid``: w [M] (any stride) holds logits, scaled by sigmoid(w)."""
    h = h.contiguous()
    M, H2 = h.shape
    H = H2 // 2
    a = h.new_empty(M, H)
    if M == 0:
        return a
    B = _block(H)
    wt = w if w is not None else h
    _swiglu_fwd_kernel[(M, triton.cdiv(H, B))](h, wt, a, H, h.stride(0), wt.stride(0) if w is not None else 0,
                                               a.stride(0), HAS_W=w is not None, W_SIGMOID=w_sigmoid, BLOCK=B)
    return a


def _swiglu_triton_bwd(h: Tensor, w: Tensor | None, da: Tensor, want_a: bool = False):  # noqa: ANN202
    h, da = h.contiguous(), da.contiguous()
    M, H2 = h.shape
    H = H2 // 2
    dh = torch.empty_like(h)
    dw = torch.empty(M, dtype=torch.float32, device=h.device) if w is not None else None
    a = h.new_empty(M, H) if want_a else None
    if M:
        wt = w.contiguous() if w is not None else h
        _swiglu_bwd_kernel[(M,)](h, wt, da, dh, dw if dw is not None else h, a if want_a else h, H, h.stride(0),
                                 da.stride(0), dh.stride(0), a.stride(0) if want_a else 0,
                                 HAS_W=w is not None, STORE_A=want_a, BLOCK=_block(H, 512))
    dw = dw.to(w.dtype) if w is not None else None
    return (dh, dw, a) if want_a else (dh, dw)


class _SwiGLUTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, w: Tensor | None) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(h, w)
        return _swiglu_triton_fwd(h, w)

    @staticmethod
    def backward(ctx, da: Tensor):  # noqa: ANN001, ANN205
        h, w = ctx.saved_tensors
        return _swiglu_triton_bwd(h, w, da)


def _swiglu_torch(h: Tensor, w: Tensor | None) -> Tensor:
    g, u = h.chunk(2, dim=-1)
    a = F.silu(g) * u
    return a if w is None else a * w.to(a.dtype).unsqueeze(-1)


def _swiglu_torch_bwd(h: Tensor, w: Tensor | None, da: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dh, dw, a) of ``a = SiLU(g) * u * w`` written out (16-bit inputs computed in float32)."""
    ct = torch.promote_types(h.dtype, torch.float32)
    g, u = h.to(ct).chunk(2, dim=-1)
    da = da.to(ct)
    s = torch.sigmoid(g)
    silu = g * s
    wv = w.to(ct).unsqueeze(-1) if w is not None else None
    dwa = da if wv is None else da * wv
    dh = torch.cat([dwa * u * s * (1.0 + g * (1.0 - s)), dwa * silu], dim=-1).to(h.dtype)
    a = silu * u if wv is None else silu * u * wv
    dw = (da * silu * u).sum(-1).to(w.dtype) if w is not None else None
    return dh, dw, a.to(h.dtype)


def swiglu(h: Tensor, w: Tensor | None = None) -> Tensor:
    """``SiLU(h[:, :H]) * h[:, H:] * w[:, None]`` for h [M, 2H], w [M] (or None)."""
    if _triton_ok(h):
        return _SwiGLUTriton.apply(h, w)
    return _swiglu_torch(h, w)


def _swiglu_fwd_only(h: Tensor, w: Tensor | None) -> Tensor:
    """``swiglu`` without autograd (inside an autograd.Function's forward)."""
    return _swiglu_triton_fwd(h, w) if _triton_ok(h) else _swiglu_torch(h, w)


def _swiglu_bwd_recompute(h: Tensor, w: Tensor | None, da: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
    """(dh, dw, a): the SwiGLU backward, also returning its forward output recomputed."""
    return _swiglu_triton_bwd(h, w, da, want_a=True) if _triton_ok(h, da) else _swiglu_torch_bwd(h, w, da)


def _gather_sum_torch(src: Tensor, idx: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    # the Triton kernel's float32 accumulation and src's dtype out, whatever autocast says: CUDA
    # autocast runs a plain sum in float32 and returns float32, so a traced (torch.compile) MoE
    # layer's experts returned float32 and their backward got float32 gradients for bf16 GEMMs
    acc = torch.promote_types(src.dtype, torch.float32)
    s = src.index_select(0, idx).view(-1, k, src.shape[-1]).sum(1, dtype=acc).to(src.dtype)
    return s if out is None else out.add_(s)


def _gather_sum_triton(src: Tensor, idx: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    src, idx = src.contiguous(), idx.contiguous()
    N, D = idx.numel() // k, src.shape[-1]
    acc = out is not None
    out = src.new_empty(N, D) if out is None else out
    if N:
        B = _block(D)
        _gather_sum_kernel[(N, triton.cdiv(D, B))](src, idx, out, D, src.stride(0), out.stride(0), K=k, BLOCK=B,
                                                   ACC=acc)
    return out


def gather_sum(src: Tensor, idx: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """out[n] = sum_{j<k} src[idx[n k + j]] (float32 accumulation in the Triton path); with
    ``out`` given (row stride free, last dim contiguous), the sum is added to it in place."""
    if _triton_ok(src) and (out is None or (out.is_cuda and out.stride(-1) == 1)):
        return _gather_sum_triton(src, idx, k, out)
    return _gather_sum_torch(src, idx, k, out)


#: the few-token experts path (``moe_decode``) takes at most this many (token, expert)
#: assignments N k: a decode step of batch 16 with top-4 routing, or a short verify chunk.
#: Its kernels read an expert's weights once per assignment (no grouping by expert), so the
#: bytes read grow with N k; past this bound the sorted grouped GEMMs read less.
DECODE_MAX_ASSIGNMENTS = 64


def _decode_launch(N: int, k: int, d: int, h: int, E: int) -> dict[str, int]:
    """Fixed launch configuration of the two ``moe_decode`` kernels (a function of the shapes
    only: no autotuning, so a CUDA graph captures the same kernels every time). Weight tiles
    of at most 64 x 64 (two in K1: gate and up) per iteration, 4 warps."""
    bp = _pow2(N * k)
    return dict(BLOCK_D1=_block(d, 64), BLOCK_H1=_block(h, 64), BLOCK_H2=_block(h, 64), BLOCK_D2=_block(d, 64),
                BLOCK_P=bp, BLOCK_E=max(16, min(_block(E, 1024), 2048 // bp)))


def moe_decode_triton(x: Tensor, experts: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor
                      ) -> tuple[Tensor, Tensor, Tensor]:
    """The dropless routed SwiGLU experts (Shazeer 2020, Eq. 6; the dispatch of ``moe_experts``)
    for a few tokens, inference only, as two Triton kernels and nothing else:

        K1 (assignment p = n k + j, block of h):  a_p = SiLU(x_n W_g[e]) * (x_n W_u[e]) * w_nj
        K2 (token n, block of d):                 y_n = sum_j a_{nk+j} W_down[e_nj]

    GEMV style (weight tiles loaded, multiplied, reduced in float32), no sort, no ``Plan``, no
    atomics (deterministic), no host read: a CUDA graph captures it. Rounding points are the
    padded reference's on CUDA (gate / up and each slot's down projection rounded to x's dtype,
    the SwiGLU x weight and the k-row sum in float32); the GEMMs' summation order differs (and
    PyTorch's 16-bit CPU SwiGLU rounds each of its three products, the Triton one once).
    x [N, d]; experts, weights [N, k]; w_gate_up [E, d, 2h] (gate columns first); w_down
    [E, h, d]. Returns (y [N, d] in x's dtype, dropped (0-d long, always 0), assignments per
    expert [E] long), as ``moe_experts``; K2's first program writes the last two.
    """
    N, d = x.shape
    k = experts.shape[-1]
    E, _, h2 = w_gate_up.shape
    h = h2 // 2
    x = x if x.stride(-1) == 1 else x.contiguous()
    w_gate_up = w_gate_up if w_gate_up.stride(-1) == 1 else w_gate_up.contiguous()
    w_down = w_down if w_down.stride(-1) == 1 else w_down.contiguous()
    a = torch.empty(N * k, h, dtype=x.dtype, device=x.device)
    y = torch.empty(N, d, dtype=x.dtype, device=x.device)
    counts = torch.empty(E, dtype=torch.long, device=x.device)
    dropped = torch.empty((), dtype=torch.long, device=x.device)
    if N == 0:
        return y, dropped.zero_(), counts.zero_()
    c = _decode_launch(N, k, d, h, E)
    _decode_gate_up_kernel[(N * k, triton.cdiv(h, c["BLOCK_H1"]))](
        x, experts, weights, w_gate_up, a, d, h, x.stride(0), experts.stride(0), experts.stride(1),
        weights.stride(0), weights.stride(1), w_gate_up.stride(0), w_gate_up.stride(1), K=k,
        BLOCK_D=c["BLOCK_D1"], BLOCK_H=c["BLOCK_H1"], num_warps=4, enable_fp_fusion=False)
    _decode_down_kernel[(N, triton.cdiv(d, c["BLOCK_D2"]))](
        a, experts, w_down, y, counts, dropped, d, h, E, N * k, experts.stride(0), experts.stride(1),
        w_down.stride(0), w_down.stride(1), y.stride(0), K=k, BLOCK_H=c["BLOCK_H2"], BLOCK_D=c["BLOCK_D2"],
        BLOCK_P=c["BLOCK_P"], BLOCK_E=c["BLOCK_E"], num_warps=4, enable_fp_fusion=False)
    return y, dropped, counts


def decode_supported(x: Tensor, top_k: int, w_gate_up: Tensor, w_down: Tensor, *, weights: Tensor | None = None,
                     capacity: int | None = None, dtype: torch.dtype | None = None) -> bool:
    """May this ``moe_experts`` call take ``moe_decode``: no gradient needed, at most
    ``DECODE_MAX_ASSIGNMENTS`` assignments, dropless, eager (not traced), x and the expert
    weights in one dtype (fp16 / bf16 / fp32; ``dtype``: the dtype they will be cast to
    first; default: the autocast dtype where autocast is on), on CUDA with the probe passed
    (``dispatch.use_fast``)."""
    if capacity is not None or x.dim() != 2 or x.shape[0] * top_k > DECODE_MAX_ASSIGNMENTS or triton is None:
        return False
    tensors = [t for t in (x, weights, w_gate_up, w_down) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if dtype is None and torch.is_autocast_enabled(x.device.type):  # moe_experts casts everything to it
        dtype = autocast_dtype(x)
    dts = {dtype} if dtype is not None else {x.dtype, w_gate_up.dtype, w_down.dtype}
    if len(dts) != 1 or next(iter(dts)) not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    return not tracing(x) and dispatch.use_fast(DECODE, x, w_gate_up, w_down)


def _probe_decode() -> None:
    """``moe_decode_triton`` on this GPU against ``moe_experts(..., impl="padded")``: bf16 and
    fp32, k 1 / 2 / 4, E not a power of two, d and h not multiples of the blocks, experts
    repeated across tokens; outputs, counts and the dropped count."""
    if triton is None:
        raise ImportError("triton is not installed")
    if not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available")
    g = torch.Generator().manual_seed(0)
    for N, k, E, d, h in ((1, 1, 5, 72, 40), (16, 4, 12, 200, 136), (7, 2, 64, 1000, 96), (3, 4, 6, 64, 64)):
        x = torch.randn(N, d, generator=g)
        w1 = torch.randn(E, d, 2 * h, generator=g) / d ** 0.5
        w2 = torch.randn(E, h, d, generator=g) / h ** 0.5
        experts = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(N)])
        weights = torch.rand(N, k, generator=g)
        for dt, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
            ins = [t.cuda().to(dt) if t.is_floating_point() else t.cuda() for t in (x, experts, weights, w1, w2)]
            with torch.no_grad():
                got = moe_decode_triton(*ins)
                ref = moe_experts(*ins, impl="padded")
            err = max_rel_err(got[0], ref[0])
            if not (err < tol and got[0].dtype == dt and torch.equal(got[2], ref[2]) and int(got[1]) == 0):
                raise RuntimeError(f"moe_decode differs from the padded reference (N {N}, k {k}, E {E}, d {d}, "
                                   f"h {h}, {dt}: rel {err:.3g}, counts equal {torch.equal(got[2], ref[2])})")


fast_path(DECODE, probe=_probe_decode, doc="few-token routed SwiGLU experts (decode steps, N k <= "
                                           f"{DECODE_MAX_ASSIGNMENTS}, no grad, dropless): two Triton GEMV kernels, "
                                           "no sort")


ROUTER_MAX_EXPERTS, ROUTER_MAX_TOPK = 4096, 16


def _router_rows(block_e: int) -> int:
    """Tokens per router program: about 2048 logits per program (one token per program
    left most of a 64-expert block idle: 16k programs of 64 lanes)."""
    return max(1, min(64, 2048 // block_e))


def _router_triton_fwd(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    lg = logits if logits.stride(-1) == 1 else logits.contiguous()  # row stride is a kernel argument
    N, E = lg.shape
    dev = lg.device
    probs = torch.empty(N, E, dtype=torch.float32, device=dev)
    weights = torch.empty(N, k, dtype=torch.float32, device=dev)
    experts = torch.empty(N, k, dtype=torch.long, device=dev)
    lse = torch.empty(N, dtype=torch.float32, device=dev)
    if N:
        be = _block(E, ROUTER_MAX_EXPERTS)
        bm = _router_rows(be)
        _router_fwd_kernel[(triton.cdiv(N, bm),)](lg, probs, weights, experts, lse, N, E, lg.stride(0), K=k,
                                                  KB=_pow2(k), BLOCK_M=bm, BLOCK_E=be)
    return weights, probs, lse, experts


def _router_triton_bwd(logits: Tensor, lse: Tensor, experts: Tensor, weights: Tensor, dw: Tensor | None,
                       dp: Tensor | None, dlse: Tensor | None, out: Tensor | None = None) -> Tensor:
    """d logits (into ``out`` [N, E] when given: any row stride, last dim contiguous)."""
    lg = logits if logits.stride(-1) == 1 else logits.contiguous()  # row stride is a kernel argument
    N, E = lg.shape
    k = experts.shape[-1]
    dl = torch.empty(N, E, dtype=logits.dtype, device=lg.device) if out is None else out
    if dp is not None and dp.stride(-1) != 1:
        dp = dp.contiguous()
    if N:
        be = _block(E, ROUTER_MAX_EXPERTS)
        bm = _router_rows(be)
        _router_bwd_kernel[(triton.cdiv(N, bm),)](
            lg, lse, experts, weights, dw.contiguous() if dw is not None else weights, dp if dp is not None else lg,
            dlse.contiguous() if dlse is not None else lse, dl, N, E, lg.stride(0), dp.stride(0) if dp is not None else 0,
            dl.stride(0), K=k, KB=_pow2(k), BLOCK_M=bm, BLOCK_E=be,
            HAS_DW=dw is not None, HAS_DP=dp is not None, HAS_DLSE=dlse is not None)
    return dl


class _RouterTriton(torch.autograd.Function):
    """Softmax routing in one kernel per direction: probs, logsumexp, top-k experts and
    their renormalized weights (the softmax of the k largest logits) from the logits; the
    backward sums the three gradients into d logits. ``dp`` may be a broadcast row (the
    balancing loss reads ``probs.sum(0)``): it is read with stride 0, never expanded."""

    @staticmethod
    def forward(ctx, logits: Tensor, k: int):  # noqa: ANN001, ANN205
        weights, probs, lse, experts = _router_triton_fwd(logits, k)
        ctx.save_for_backward(logits, lse, experts, weights)
        ctx.mark_non_differentiable(experts)
        return weights, probs, lse, experts

    @staticmethod
    def backward(ctx, dw: Tensor | None, dp: Tensor | None, dlse: Tensor | None, _de: Tensor | None):  # noqa: ANN001, ANN205
        logits, lse, experts, weights = ctx.saved_tensors
        return _router_triton_bwd(logits, lse, experts, weights, dw, dp, dlse), None


def _router_torch(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(weights, probs, lse, experts) of softmax routing with renormalized top-k, in PyTorch:
    ``route``'s path off CUDA and ``_RouterTriton``'s oracle (float32 at least)."""
    lf = logits if logits.dtype == torch.float64 else logits.float()
    lse = torch.logsumexp(lf, dim=-1)
    top, experts = torch.topk(lf, k, dim=-1)
    return torch.softmax(top, dim=-1), torch.exp(lf - lse[:, None]), lse, experts


def _router_torch_bwd(logits: Tensor, lse: Tensor, experts: Tensor, weights: Tensor, dw: Tensor | None,
                      dp: Tensor | None, dlse: Tensor | None) -> Tensor:
    """``_router_triton_bwd`` in PyTorch: p (dp - <p, dp>) + p dlse + scatter_k w (dw - <w, dw>)."""
    lf = logits if logits.dtype == torch.float64 else logits.float()
    p = torch.exp(lf - lse[:, None])
    dl = torch.zeros_like(lf)
    if dp is not None:
        dl = dl + p * (dp - (p * dp).sum(-1, keepdim=True))
    if dlse is not None:
        dl = dl + p * dlse[:, None]
    if dw is not None:
        dl = dl.scatter_add(-1, experts, weights * (dw - (weights * dw).sum(-1, keepdim=True)))
    return dl.to(logits.dtype)


def _router_triton_ok(logits: Tensor, k: int) -> bool:
    return (logits.dim() == 2 and logits.shape[-1] <= ROUTER_MAX_EXPERTS and k <= ROUTER_MAX_TOPK
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16) and _triton_ok(logits)
            and use_fast(ROUTER, logits))


class _GatherRows(torch.autograd.Function):
    """x_s = x[tok] (rows in expert order); backward: each token sums its k row gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, tok: Tensor, inv: Tensor, k: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(inv)
        ctx.k = k
        return x.index_select(0, tok)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001, ANN205
        (inv,) = ctx.saved_tensors
        return gather_sum(g.contiguous(), inv, ctx.k), None, None, None


class _SumRows(torch.autograd.Function):
    """y[n] = sum_j o[inv[n k + j]] (un-sort + combine); backward: grad_o = grad_y[tok]."""

    @staticmethod
    def forward(ctx, o: Tensor, tok: Tensor, inv: Tensor, k: int) -> Tensor:  # noqa: ANN001
        ctx.save_for_backward(tok)
        return gather_sum(o, inv, k)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001, ANN205
        (tok,) = ctx.saved_tensors
        return g.index_select(0, tok), None, None, None


class _GroupedExperts(torch.autograd.Function):
    """The dropless grouped path as one autograd node:

        forward:  xs = x[tok];  h = xs W1[e];  a = SwiGLU(h) * w;  o = a W2[e];  y = k-row sum of o
        backward: go = dy[tok]; da = go W2[e]^T; (dh, dw, a) = SwiGLU backward (a recomputed);
                  dW2[e] = a_e^T go_e;  dxs = dh W1[e]^T;  dW1[e] = xs_e^T dh_e;  dx = k-row sum of dxs

    Written out instead of composed so that the [A, h] activation ``a`` is recomputed in the
    SwiGLU backward kernel rather than kept, and the five autograd nodes (gather, two GEMMs,
    activation, un-sort) become one.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_sorted: Tensor, w1: Tensor, w2: Tensor, tok: Tensor, inv: Tensor,  # noqa: ANN001
                offs: Tensor, k: int) -> Tensor:
        y, xs, h = _experts_fwd(x, w_sorted, w1, w2, tok, inv, offs, k)
        ctx.save_for_backward(xs, h, w_sorted, w1, w2, tok, inv, offs)
        ctx.k = k
        return y

    @staticmethod
    def backward(ctx, gy: Tensor):  # noqa: ANN001, ANN205
        xs, h, ws, w1, w2, tok, inv, offs = ctx.saved_tensors
        need_x, need_w, need_w1, need_w2 = ctx.needs_input_grad[:4]
        # the output's gradient in the GEMMs' dtype (as eager autograd hands it; a traced graph may not)
        dh, dws, dw1, dw2 = _experts_bwd(gy.to(xs.dtype).contiguous(), xs, h, ws, w1, w2, tok, offs, need_w1,
                                         need_w2)
        dx = _experts_dx(dh, w1, inv, offs, ctx.k) if need_x else None
        return dx, (dws if need_w else None), dw1, dw2, None, None, None, None


def _experts_fwd(x: Tensor, ws: Tensor, w1: Tensor, w2: Tensor, tok: Tensor, inv: Tensor, offs: Tensor,
                 k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Grouped SwiGLU experts over sorted rows: (y, xs, h) -- the output and what the
    backward keeps (the gathered rows and the gate/up activations)."""
    xs = x.index_select(0, tok)
    h = torch._grouped_mm(xs, w1, offs=offs)
    return gather_sum(torch._grouped_mm(_swiglu_fwd_only(h, ws), w2, offs=offs), inv, k), xs, h


def _experts_bwd(gy: Tensor, xs: Tensor, h: Tensor, ws: Tensor, w1: Tensor, w2: Tensor, tok: Tensor, offs: Tensor,
                 need_w1: bool, need_w2: bool) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(dh, d sorted weights, dW1, dW2) of ``_experts_fwd``; the activation is recomputed."""
    go = gy.index_select(0, tok)
    da = torch._grouped_mm(go, w2.transpose(-2, -1), offs=offs)
    dh, dws, a = _swiglu_bwd_recompute(h, ws, da)
    dw2 = torch._grouped_mm(a.t(), go, offs=offs) if need_w2 else None
    dw1 = torch._grouped_mm(xs.t(), dh, offs=offs) if need_w1 else None
    return dh, dws, dw1, dw2


def _experts_dx(dh: Tensor, w1: Tensor, inv: Tensor, offs: Tensor, k: int, out: Tensor | None = None) -> Tensor:
    """dx of ``_experts_fwd``: each token sums its k rows of dh W1^T (added to ``out`` if given)."""
    return gather_sum(torch._grouped_mm(dh, w1.transpose(-2, -1), offs=offs), inv, k, out=out)


# ----------------------------------------------------------------------------- dispatch


class Plan:
    """Sorted layout of the N*k assignments (a = n*k + j is token n's j-th choice).

    order:  [A] assignment ids sorted by expert (stable: token order inside an expert;
            with ``inert`` given, an expert's real tokens come before its inert ones)
    inv:    [A] sorted position of assignment a (inverse of ``order``)
    tok:    [A] token of each sorted row
    counts: [E] rows per expert (all assignments, inert slots included)
    expert: [A] expert of each sorted row       (computed on first use: the padded path's)
    rank:   [A] position of each sorted row inside its expert's segment      (likewise)
    """

    def __init__(self, experts: Tensor, n_experts: int, inert: Tensor | None = None):
        N, self.k = experts.shape
        self.flat = flat = experts.reshape(-1)
        key = flat if inert is None else flat * 2 + inert.to(flat.dtype).repeat_interleave(self.k)
        # a radix sort makes one pass per key byte: sort 16-bit keys where they fit (2E < 2^15)
        key = key.to(torch.int16 if 2 * n_experts < 2**15 else torch.int32)
        self.order = torch.argsort(key, stable=True)
        self.arange = torch.arange(flat.numel(), device=flat.device)
        self.inv = torch.empty_like(self.order).scatter_(0, self.order, self.arange)
        self.counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        self.tok = self.order // self.k
        self._expert = self._rank = None

    # (computed on first use and kept; not functools.cached_property, whose lock on Python 3.11 Dynamo
    # cannot enter: every traced padded MoE layer broke its graph there)
    @property
    def expert(self) -> Tensor:
        if self._expert is None:
            self._expert = self.flat.index_select(0, self.order)
        return self._expert

    @property
    def rank(self) -> Tensor:
        if self._rank is None:
            starts = self.counts.cumsum(0) - self.counts
            self._rank = self.arange - starts.index_select(0, self.expert)
        return self._rank


def expert_capacity(n_tokens: int | Tensor, top_k: int, n_experts: int, factor: float) -> int | Tensor:
    """Switch Transformer expert capacity: ceil(factor * tokens * k / experts), at least 1. ``n_tokens``
    a 0-dim tensor (the real tokens counted on the device, where the host cannot read them: a trace
    or a CUDA-graph capture) gives the same number as a 0-dim long tensor, computed in float64 as
    Python computes the int."""
    if isinstance(n_tokens, Tensor):
        a = -(factor * n_tokens.to(torch.float64) * top_k)
        return (-torch.div(a, n_experts, rounding_mode="floor")).clamp(min=1).long()
    return max(1, int(-(-factor * n_tokens * top_k // n_experts)))


#: up to this many tokens the padded path sizes its buffers by the token count (no host sync)
FEW_TOKENS = 64


def moe_experts(x: Tensor, experts: Tensor, weights: Tensor, w_gate_up: Tensor, w_down: Tensor, *,
                capacity: int | None = None, inert: Tensor | None = None,
                impl: str = "auto", capacity_limit: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Routed SwiGLU experts for N tokens: ``y_n = sum_j w_nj * FFN_{e_nj}(x_n)``.

    x [N, d]; experts, weights [N, k]; w_gate_up [E, d, 2h] (gate columns first); w_down
    [E, h, d]; capacity: rows per expert (None = dropless); capacity_limit: a 0-dim long tensor
    <= capacity, the rows an expert keeps where the capacity was computed on the device (the real
    tokens of a padded chunk, in a trace or CUDA-graph capture: ``capacity`` then sizes the buffers
    from every slot, the limit drops as the eager step's capacity does); inert [N] bool: slots that are
    not real tokens (they never take capacity and are not counted as dropped); impl:
    ``auto`` (``moe_decode_triton`` for a few tokens without gradients where
    ``decode_supported``, else grouped GEMM where supported and dropless, else padded),
    ``grouped``, ``padded``. Under autocast the inputs and weights are cast to the autocast
    dtype first.
    Returns (y [N, d], number of real assignments dropped (a 0-d long tensor),
    assignments per expert [E] long (inert slots included: with none, the expert load)).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    dev = x.device.type
    if torch.is_autocast_enabled(dev):  # the expert GEMMs in the autocast dtype, as nn.Linear's are
        # (torch._grouped_mm has no autocast rule; bf16 is what lets it take the grouped path)
        dt = autocast_dtype(x)
        x, weights, w_gate_up, w_down = x.to(dt), weights.to(dt), w_gate_up.to(dt), w_down.to(dt)
    N, d = x.shape
    E = w_gate_up.shape[0]
    if impl == "auto" and N and decode_supported(x, experts.shape[-1], w_gate_up, w_down, weights=weights,
                                                 capacity=capacity):
        return moe_decode_triton(x, experts, weights, w_gate_up, w_down)  # a few tokens, no grad: 2 kernels
    if impl == "auto":
        impl = "grouped" if capacity is None and grouped_mm_supported(x, w_gate_up, w_down) else "padded"
    if impl == "grouped" and capacity is not None:
        raise ValueError("the grouped path is dropless; use impl='padded' with a capacity")
    dropped = torch.zeros((), dtype=torch.long, device=x.device)
    if N == 0:
        return x.new_zeros(0, d), dropped, torch.zeros(E, dtype=torch.long, device=x.device)
    plan = Plan(experts, E, inert if capacity is not None else None)
    k = plan.k
    ws = weights.reshape(-1).index_select(0, plan.order)
    if impl == "grouped":
        offs = plan.counts.cumsum(0).to(torch.int32)
        y = _GroupedExperts.apply(x, ws, w_gate_up, w_down, plan.tok, plan.inv, offs, k)
        return y, dropped, plan.counts
    xs = _GatherRows.apply(x, plan.tok, plan.inv, k)
    # padded: every segment copied into a zero-padded [E, C, d] buffer, one bmm for all experts
    if capacity is None:
        # a static size: a few tokens (decode) take N rows per expert (a token picks an expert at
        # most once, so none is dropped) and no host read, so the step can be a CUDA graph; more
        # tokens read the largest count back (one host sync) rather than pad E x N rows
        cap = N if N <= FEW_TOKENS else max(1, int(plan.counts.max()))
        slot = plan.expert * cap + plan.rank
    else:
        cap = capacity
        keep = plan.rank < (cap if capacity_limit is None else capacity_limit)
        real = ~inert.repeat_interleave(k).index_select(0, plan.order) if inert is not None else None
        if real is not None:
            dropped = (~keep & real).sum()
            keep = keep & real
        else:
            dropped = (~keep).sum()
        slot = torch.where(keep, plan.expert * cap + plan.rank, torch.full_like(plan.rank, E * cap))
    rows = E * cap
    xb = xs.new_zeros(rows + 1, d).index_add(0, slot, xs)[:rows].view(E, cap, d)
    wb = ws.new_zeros(rows + 1).index_add(0, slot, ws)[:rows]
    hb = torch.bmm(xb, w_gate_up)
    ab = swiglu(hb.view(rows, -1), wb).view(E, cap, -1)
    ob = torch.bmm(ab, w_down).view(rows, d)
    if capacity is not None:  # dropped rows read the zero row appended at index rows
        ob = torch.cat([ob, ob.new_zeros(1, d)])
    o = ob.index_select(0, slot)
    y = _SumRows.apply(o, plan.tok, plan.inv, k)
    return y, dropped, plan.counts


# ----------------------------------------------------------------------------- the fused layer


@functools.lru_cache(maxsize=16)
def _zero_rows(n: int, d: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached block of zero rows (pads the router weight to a multiple of 8 rows)."""
    return torch.zeros(n, d, dtype=dtype, device=device)


class _MoELayer(torch.autograd.Function):
    """The MoE layer of ``components.moe`` in its common training case (softmax scores,
    renormalized top-k, no balancing bias, dropless, no padding slots) as ONE autograd node::

        [logits | gate] = x [W_r; W_g]^T                 router and shared gate, one GEMM
        w, p, lse, E_n  = softmax top-k routing          (fused router kernel)
        y = grouped SwiGLU experts (sorted dispatch)     as ``_GroupedExperts``
          + sigmoid(gate) SwiGLU_shared(x)               as ``shared_expert``
        aux = aux_coef * lb(p, load) + z_coef * mean(lse^2)

    The backward is written out: d logits come from the routing weights' gradient and the
    two losses' closed forms (d lb / d p_ne = E load_e / (N^2 k), d z / d lse_n = 2 lse_n / N)
    in one router kernel, written beside the gate's gradient into one [N, E+pad] buffer, so
    that one GEMM gives dW_r and dW_g and one more adds into dx; the experts' k-row sum of
    dx is accumulated in place. Eager PyTorch would run ~35 autograd nodes and ~110 kernels
    for the same pass; this is one node and ~70 kernels (the layer is launch-bound at
    16k tokens). Inputs are cast to ``dt`` (the autocast dtype) inside; gradients come back
    in each input's dtype. Returns (y, aux, load [E] float, lb, z, mean routing entropy);
    only y and aux are differentiable.
    """

    @staticmethod
    def forward(ctx, x: Tensor, w_router: Tensor, w_gate: Tensor | None, w1: Tensor, w2: Tensor,  # noqa: ANN001
                w_sg: Tensor | None, w_su: Tensor | None, w_sd: Tensor | None, k: int, aux_coef: float,
                z_coef: float, dt: torch.dtype):
        N, d = x.shape
        E = w_router.shape[0]
        shared = w_gate is not None
        xc = x.to(dt)
        rows = [w_router.to(dt)] + ([w_gate.to(dt)] if shared else [])
        pad = -(E + shared) % 8
        if pad:
            rows.append(_zero_rows(pad, d, dt, x.device))
        wb = torch.cat(rows) if len(rows) > 1 else rows[0]
        both = xc @ wb.t()
        logits = both[:, :E]
        fused_router = _router_triton_ok(logits, k)
        weights, probs, lse, experts = (_router_triton_fwd if fused_router else _router_torch)(logits, k)
        plan = Plan(experts, E)
        ws = weights.view(-1).index_select(0, plan.order).to(dt)
        offs = plan.counts.cumsum(0).to(torch.int32)
        w1c, w2c = w1.to(dt), w2.to(dt)
        y, xs, h = _experts_fwd(xc, ws, w1c, w2c, plan.tok, plan.inv, offs, k)
        saved = [xc, wb, both, lse, experts, weights, xs, h, ws, w1c, w2c, plan.tok, plan.inv, offs]
        if shared:
            gs = torch.sigmoid(both[:, E])
            wgu, wsd = torch.cat([w_sg.to(dt), w_su.to(dt)]), w_sd.to(dt)
            hsh = xc @ wgu.t()
            y = torch.addmm(y, _swiglu_fwd_only(hsh, gs), wsd.t())
            saved += [gs, wgu, wsd, hsh]
        load = plan.counts.float()
        lb = load_balancing_loss(probs, load, k)
        z = router_z_loss(logits, None, lse)
        aux = torch.add(lb * aux_coef, z, alpha=z_coef)
        ent = routing_entropy(probs)
        saved.append(load)
        ctx.save_for_backward(*saved)
        ctx.k, ctx.E, ctx.pad, ctx.shared, ctx.fused_router = k, E, pad, shared, fused_router
        ctx.coefs = (aux_coef, z_coef)
        ctx.dtypes = [None if t is None else t.dtype for t in (x, w_router, w_gate, w1, w2, w_sg, w_su, w_sd)]
        ctx.mark_non_differentiable(load, lb, z, ent)
        return y, aux, load, lb, z, ent

    @staticmethod
    def backward(ctx, gy: Tensor | None, gaux: Tensor | None, *_: Tensor):  # noqa: ANN001, ANN205
        xc, wb, both, lse, experts, weights, xs, h, ws, w1c, w2c, tok, inv, offs, *rest = ctx.saved_tensors
        load = rest[-1]
        k, E, shared = ctx.k, ctx.E, ctx.shared
        N = xc.shape[0]
        nx, nwr, nwg, nw1, nw2, nsg, nsu, nsd = ctx.needs_input_grad[:8]
        gy = torch.zeros_like(xc) if gy is None else gy.to(xc.dtype).contiguous()
        dh, dws, dw1, dw2 = _experts_bwd(gy, xs, h, ws, w1c, w2c, tok, offs, nw1, nw2)  # routed experts
        dweights = dws.float().index_select(0, inv).view(N, k)
        # shared expert: y += SwiGLU(hsh, gs) W_sd^T, hsh = x W_gu^T, gs = sigmoid(gate)
        dx = dwgu = dwsd = dgate = None
        if shared:
            gs, wgu, wsd, hsh = rest[:4]
            dhsh, dgs, a_sh = _swiglu_bwd_recompute(hsh, gs, gy @ wsd)
            dwsd = gy.t() @ a_sh if nsd else None
            dwgu = dhsh.t() @ xc if (nsg or nsu) else None
            dgate = dgs * gs * (1 - gs)
            dx = dhsh @ wgu if nx else None
        # router: d logits from d weights and the two losses, beside d gate in one buffer
        aux_coef, z_coef = ctx.coefs
        dp = dlse = None
        if gaux is not None and aux_coef:
            dp = (load * (gaux.float() * (aux_coef * E / (N * N * k)))).expand(N, E)
        if gaux is not None and z_coef:
            dlse = lse * (gaux.float() * (2.0 * z_coef / N))
        dboth = torch.empty_like(both)
        if ctx.fused_router:
            _router_triton_bwd(both[:, :E], lse, experts, weights, dweights, dp, dlse, out=dboth[:, :E])
        else:
            dboth[:, :E] = _router_torch_bwd(both[:, :E], lse, experts, weights, dweights, dp, dlse)
        if shared:
            dboth[:, E] = dgate
        if ctx.pad:
            dboth[:, E + shared:] = 0
        dwb = dboth.t() @ xc if (nwr or nwg) else None
        if nx:
            dx = dboth @ wb if dx is None else dx.addmm_(dboth, wb)
            dx = _experts_dx(dh, w1c, inv, offs, k, out=dx)
        cast = lambda t, i: None if t is None else t.to(ctx.dtypes[i])  # noqa: E731
        hs = None if dwgu is None else dwgu.shape[0] // 2
        return (cast(dx, 0), cast(dwb[:E] if nwr else None, 1), cast(dwb[E:E + 1] if shared and nwg else None, 2),
                cast(dw1, 3), cast(dw2, 4), cast(dwgu[:hs] if nsg else None, 5), cast(dwgu[hs:] if nsu else None, 6),
                cast(dwsd, 7), None, None, None, None)


def fused_layer_supported(x: Tensor, w_router: Tensor, w1: Tensor, w2: Tensor, top_k: int) -> bool:
    """May this layer call take ``moe_layer`` (the ``moe_layer`` fast path): eager CUDA,
    bf16 expert GEMMs (``torch._grouped_mm``), 16-byte aligned expert shapes, and a
    softmax router the fused kernel handles."""
    if tracing(x) or not x.is_cuda or w_router.shape[0] > ROUTER_MAX_EXPERTS or top_k > ROUTER_MAX_TOPK:
        return False
    return grouped_mm_supported(x, w1, w2, dtype=autocast_dtype(x)) and use_fast(LAYER, x)


def moe_layer(x: Tensor, w_router: Tensor, w_gate: Tensor | None, w_gate_up: Tensor, w_down: Tensor,
              w_shared_gate: Tensor | None = None, w_shared_up: Tensor | None = None,
              w_shared_down: Tensor | None = None, *, top_k: int, aux_coef: float, z_coef: float
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The fused MoE layer (``_MoELayer``) for N tokens x [N, d]: router weight [E, d], shared
    gate [1, d] and shared SwiGLU weights (nn.Linear layouts: gate/up [hs, d], down [d, hs])
    or None, experts as in ``moe_experts``. Returns (y [N, d], aux, load [E], lb, z, entropy)."""
    return _MoELayer.apply(x, w_router, w_gate, w_gate_up, w_down, w_shared_gate, w_shared_up, w_shared_down,
                           top_k, aux_coef, z_coef, autocast_dtype(x))


def shared_expert(y: Tensor, x: Tensor, gate_logit: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """``y + sigmoid(x W_g) * SwiGLU_shared(x)`` (Qwen3-Next), with the gate folded into the
    hidden activation (the down projection is linear) and the sum into the last GEMM: one
    GEMM for gate+up, one fused activation, one ``addmm``. ``gate_logit`` = x W_g [N];
    weights in nn.Linear layout (``w_gate_up`` = [W_gate; W_up] [2 hs, d], down [d, hs]:
    ``kernels.linear.stacked``, the decode engine's packed copy when decoding)."""
    h = F.linear(x, w_gate_up)
    if not torch.is_grad_enabled() and _triton_ok(h, gate_logit):  # decoding: the gate's sigmoid in the kernel
        return torch.addmm(y, _swiglu_triton_fwd(h, gate_logit, w_sigmoid=True), w_down.t())
    return torch.addmm(y, swiglu(h, torch.sigmoid(gate_logit)), w_down.t())
