"""Short causal depthwise convolution with a cache (the "ShortConv" of H3 / Mamba /
DeltaNet / Gated DeltaNet (arXiv 2412.06464), and of ATLAS).

For each channel ``c`` and a kernel of width ``K``::

    y[b, t, c] = act( bias[c] + sum_{j=0}^{K-1} weight[c, j] * x[b, t - (K-1) + j, c] )

where inputs before the chunk come from ``state`` (the last ``K-1`` real inputs of the
previous chunks; zeros when there is none). ``weight[:, K-1]`` multiplies the current
token, the layout fla and causal-conv1d use.

Padding contract (``core.cache``): with ``lengths``, row ``b`` has ``lengths[b]`` real
tokens at the front of the chunk; the rest are inert. The new state is the last ``K-1``
*real* inputs of each row, reaching back into the old state when ``lengths[b] < K-1``
(``lengths[b] == 0`` keeps the old state). Outputs at inert slots are finite garbage.

Reference: ``K`` shifted multiply-adds over ``[state, x]`` (the same sum as
``F.conv1d(groups=C)``) plus one ``gather`` for the state. Fast paths (CUDA):

* ``causal_conv1d``: fla's Triton ``causal_conv1d`` (``fla.modules.convolution``), used only
  without a state and without lengths (the training path): fla's cache layout differs between
  versions, so cached chunks of more than one token (prefill) stay on the reference; and only
  for float16 / bfloat16 / float32 x (fla computes in float32: float64 stays on the reference).
* ``conv_update`` (ours): the decode step -- ``T == 1`` with a state, no gradient needed --
  as ONE Triton kernel (``_conv_update_kernel``) instead of the reference's ~12 (cat,
  ``K`` multiply-adds, casts, the state gather). It reads ``x [B, 1, C]`` and the state (any
  strides), writes ``y [B, 1, C]`` and a *new* state ``[B, C, K-1]`` (components replace state
  tensors, never write into them), and keeps the old state for rows with ``lengths[b] == 0``.
  It computes the reference's arithmetic in the reference's order: float32 products and sums
  (no fused multiply-add) of x and the state (in x's dtype) with the weight and bias as they
  are (no rounding to x's dtype), one rounding to x's dtype at the output; the SiLU is
  PyTorch's formula (``kernels._triton.silu_f32``). The new state is a copy of inputs
  (exact). Launch config fixed by the shapes (CUDA-graph capturable, no autotuning).
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._triton import silu_f32, triton

if triton is not None:
    import triton.language as tl


def _fla_causal_conv1d():
    fn = importlib.import_module("fla.modules.convolution").causal_conv1d
    if not callable(fn):
        raise ImportError("fla.modules.convolution.causal_conv1d is not callable")
    return fn


dispatch.fast_path("causal_conv1d", probe=_fla_causal_conv1d,
                   doc="fla.modules.convolution.causal_conv1d (Triton), stateless training path")

_ACTIVATIONS = (None, "silu", "swish")
_FLA_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # float64 stays on the reference, in float64


def _act(y: Tensor, activation: str | None) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


def conv_state_update(xpad: Tensor, lengths: Tensor | None, width: int) -> Tensor:
    """Last ``width`` real inputs of each row of ``xpad = [state, x]`` [B, C, width + T].

    Real inputs of row ``b`` end at index ``width + lengths[b] - 1`` of ``xpad``, so the
    window is ``[lengths[b], lengths[b] + width)`` (the old state when lengths[b] == 0).
    """
    B, C, S = xpad.shape
    T = S - width
    if lengths is None:
        return xpad[:, :, T:].contiguous()
    idx = lengths.to(device=xpad.device, dtype=torch.long)[:, None] + torch.arange(width, device=xpad.device)
    return xpad.gather(2, idx[:, None, :].expand(B, C, width))


def conv_tails(x: Tensor, starts: Tensor, width: int, state: Tensor | None = None) -> Tensor:
    """Conv cache states at many places of one sequence at once: for pre-conv inputs
    x [B, T, C] and start indices ``starts`` [n] (in ``[0, T]``), the state a cached conv would
    hold just before token ``starts[j]`` (its last ``width`` inputs; before the chunk: ``state``
    [B, C, width], the conv cache it continues, or zeros at a sequence start), as
    [B * n, C, width] (row ``b * n + j``). Used by block diffusion to start every noisy block
    from the clean prefix (``core.two_stream``) and by a speculative verify chunk to record the
    tail after each of its tokens (``StepContext.record``: ``starts = 0 .. T``)."""
    B, T, C = x.shape
    if state is None:
        xp = F.pad(x, (0, 0, width, 0))  # index i of xp is input i - width
    else:
        xp = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)
    idx = starts.to(device=x.device, dtype=torch.long)[:, None] + torch.arange(width, device=x.device)  # [n, w]
    tails = xp[:, idx]  # [B, n, w, C]
    return tails.permute(0, 1, 3, 2).reshape(B * starts.numel(), C, width).contiguous()


def causal_conv1d_ref(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    state: Tensor | None = None,
    lengths: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Pure-PyTorch reference: x [B,T,C], weight [C,K], state [B,C,K-1] -> (y [B,T,C], state).

    The depthwise conv is written as K shifted multiply-adds over ``[state, x]`` (identical
    to ``F.conv1d(groups=C)``, which the tests use as the oracle, but several times faster
    forward + backward on CPU for the short widths used here, K <= 8 or so). 16-bit x computes
    in float32 with the weight and bias as given (not rounded to x's dtype) and rounds once at
    the output, as fla's kernel on the training path does, so a cached prefill and decode step
    see the numbers training saw; float64 computes in float64. The state stays in x's dtype.
    """
    B, T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    xpad = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, K-1+T, C]
    ct = torch.promote_types(x.dtype, torch.float32)  # 16-bit x computes in float32, as fla does
    xc, w = xpad.to(ct), weight.to(ct)
    y = xc[:, K - 1:] * w[:, K - 1]
    for j in range(K - 1):  # over the kernel taps, not over tokens
        y = y + xc[:, j:j + T] * w[:, j]
    if bias is not None:
        y = y + bias.to(ct)
    return _act(y, activation).to(x.dtype), conv_state_update(xpad.transpose(1, 2), lengths, K - 1)


UPDATE = "conv_update"
_UPDATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


if triton is not None:

    @triton.jit
    def _conv_update_kernel(x_ptr, s_ptr, w_ptr, b_ptr, len_ptr, y_ptr, ns_ptr, C,
                            sx_b, sx_c, ss_b, ss_c, ss_k, sw_c, sw_k, sy_b, sns_b, sns_c,
                            K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                            SILU: tl.constexpr, BLOCK_C: tl.constexpr):
        """One decode step of the depthwise causal conv for channels ``[pid_c * BLOCK_C, ...)``
        of row ``pid_b``: y = act(x * w[K-1] + sum_j state[j] * w[j] + bias) in the reference's
        order, and the new state (the old one shifted by x, or the old one where lengths == 0)."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = c < C
        ty = y_ptr.dtype.element_ty  # x's dtype (the state is kept in it); the sums are float32
        xv = tl.load(x_ptr + b * sx_b + c * sx_c, mask=m, other=0.0).to(ty)
        wl = tl.load(w_ptr + c * sw_c + (K - 1) * sw_k, mask=m, other=0.0).to(tl.float32)
        acc = xv.to(tl.float32) * wl  # y = x_t * w[:, K-1]
        if HAS_LENGTHS:
            keep = tl.load(len_ptr + b) == 0  # an inert row keeps its old state
        s_row = s_ptr + b * ss_b + c * ss_c
        ns_row = ns_ptr + b * sns_b + c * sns_c
        for j in tl.static_range(K - 1):  # y = y + state[j] * w[:, j], j = 0 .. K-2, the reference's order
            sj = tl.load(s_row + j * ss_k, mask=m, other=0.0).to(ty)
            wj = tl.load(w_ptr + c * sw_c + j * sw_k, mask=m, other=0.0).to(tl.float32)
            acc = acc + sj.to(tl.float32) * wj
            if j > 0:  # new state[j-1] = old state[j]
                nv = sj
                if HAS_LENGTHS:
                    nv = tl.where(keep, tl.load(s_row + (j - 1) * ss_k, mask=m, other=0.0).to(ty), sj)
                tl.store(ns_row + (j - 1), nv, mask=m)
        last = xv  # new state[K-2] = x
        if HAS_LENGTHS:
            last = tl.where(keep, tl.load(s_row + (K - 2) * ss_k, mask=m, other=0.0).to(ty), xv)
        tl.store(ns_row + (K - 2), last, mask=m)
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + c, mask=m, other=0.0).to(tl.float32)
        if SILU:
            acc = silu_f32(acc)
        tl.store(y_ptr + b * sy_b + c, acc.to(ty), mask=m)


def conv_update_triton(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor, lengths: Tensor | None,
                       activation: str | None) -> tuple[Tensor, Tensor]:
    """The one-kernel decode step: x [B, 1, C], weight [C, K] (K >= 2), state [B, C, K-1],
    lengths [B] | None -> (y [B, 1, C], new state [B, C, K-1]), both new tensors in x's dtype.
    The same numbers as ``causal_conv1d_ref`` (see the module docstring)."""
    B, _, C = x.shape
    K = weight.shape[1]
    y = torch.empty(B, 1, C, device=x.device, dtype=x.dtype)
    new_state = torch.empty(B, C, K - 1, device=x.device, dtype=x.dtype)
    block_c = min(triton.next_power_of_2(C), 1024)
    grid = (B, triton.cdiv(C, block_c))
    _conv_update_kernel[grid](
        x, state, weight, bias if bias is not None else weight, lengths if lengths is not None else x, y, new_state, C,
        x.stride(0), x.stride(2), state.stride(0), state.stride(1), state.stride(2), weight.stride(0),
        weight.stride(1), y.stride(0), new_state.stride(0), new_state.stride(1),
        K=K, HAS_BIAS=bias is not None, HAS_LENGTHS=lengths is not None, SILU=activation in ("silu", "swish"),
        BLOCK_C=block_c, num_warps=4 if block_c >= 512 else 1, enable_fp_fusion=False)
    return y, new_state


def _probe_update() -> None:
    """The kernel on this GPU against the reference: float32 to 1e-6 (bit-equal without the SiLU),
    bf16 to one bf16 rounding, the new state bit-equal; K 2 and 4, bias and lengths with zeros."""
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    for B, C, K, dt in ((3, 200, 4, torch.float32), (2, 96, 2, torch.bfloat16), (3, 1100, 4, torch.bfloat16)):
        x = torch.randn(B, 1, C, generator=g).to("cuda", dt)
        w, bias = torch.randn(C, K, generator=g).cuda(), torch.randn(C, generator=g).cuda()
        st = torch.randn(B, C, K - 1, generator=g).to("cuda", dt)
        lengths = (torch.arange(B) % 2).cuda()
        for act in (None, "silu"):
            y, s = conv_update_triton(x, w, bias, st, lengths, act)
            y0, s0 = causal_conv1d_ref(x, w, bias, st, lengths, act)
            err = dispatch.max_rel_err(y, y0)
            tol = 1e-6 if dt == torch.float32 else 1e-2
            if not (torch.equal(s, s0) and err <= tol and (act or dt != torch.float32 or torch.equal(y, y0))):
                raise RuntimeError(f"conv_update differs from the reference ({dt}, C {C}, K {K}, {act}: {err:.2e})")


dispatch.fast_path(UPDATE, probe=_probe_update,
                   doc="own Triton kernel: the cached conv's decode step (T == 1) in one launch, inference")


def _update_ok(x: Tensor, weight: Tensor, bias: Tensor | None, state: Tensor | None,
               lengths: Tensor | None) -> bool:
    """The decode step's kernel applies: T == 1 with a state, K >= 2, float16/bfloat16/float32,
    no gradient needed (the kernel has no backward), eager, and on CUDA with its probe passed."""
    if state is None or x.shape[1] != 1 or weight.shape[1] < 2 or x.dtype not in _UPDATE_DTYPES:
        return False
    tensors = [t for t in (x, weight, bias, state, lengths) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if any(t.dtype not in _UPDATE_DTYPES for t in (weight, state) + ((bias,) if bias is not None else ())):
        return False
    return not dispatch.tracing(x) and dispatch.use_fast(UPDATE, *tensors)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    state: Tensor | None = None,
    lengths: Tensor | None = None,
    activation: str | None = "silu",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise conv with cache; see the module docstring.

    x: [B, T, C]; weight: [C, K]; bias: [C] | None; state: [B, C, K-1] | None (zeros);
    lengths: [B] | None (real tokens first); activation: "silu" | None.
    Returns y [B, T, C] and the new state [B, C, K-1] (dtype of x).
    """
    if activation not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[2]:
        raise ValueError(f"causal_conv1d: x must be [B,T,C] and weight [C,K], got {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    K = weight.shape[1]
    if (state is None and lengths is None and x.dtype in _FLA_DTYPES  # (fla computes in float32)
            and dispatch.use_fast("causal_conv1d", x, weight)):
        out = _fla_causal_conv1d()(x=x, weight=weight, bias=bias, activation=activation)
        y = out[0] if isinstance(out, tuple) else out
        # the new state is just the last K-1 inputs (left-padded with zeros for short T)
        tail = x[:, -(K - 1):].transpose(1, 2) if K > 1 else x.new_zeros(x.shape[0], x.shape[2], 0)
        if tail.shape[2] < K - 1:
            tail = F.pad(tail, (K - 1 - tail.shape[2], 0))
        return y, tail.contiguous()
    if _update_ok(x, weight, bias, state, lengths):
        return conv_update_triton(x, weight, bias, state, lengths, activation)
    return causal_conv1d_ref(x, weight, bias, state, lengths, activation)
