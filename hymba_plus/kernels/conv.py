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
``F.conv1d(groups=C)``) plus one ``gather`` for the state. Fast path (CUDA): fla's Triton
``causal_conv1d`` (``fla.modules.convolution``), used only without a state and without
lengths (the training path): fla's cache layout differs between versions, so the cached
path (prefill chunks and decode, cheap elementwise work) stays on the reference.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch


def _fla_causal_conv1d():
    fn = importlib.import_module("fla.modules.convolution").causal_conv1d
    if not callable(fn):
        raise ImportError("fla.modules.convolution.causal_conv1d is not callable")
    return fn


dispatch.fast_path("causal_conv1d", probe=_fla_causal_conv1d,
                   doc="fla.modules.convolution.causal_conv1d (Triton), stateless training path")

_ACTIVATIONS = (None, "silu", "swish")


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


def conv_tails(x: Tensor, starts: Tensor, width: int) -> Tensor:
    """Conv cache states at many places of one sequence at once: for pre-conv inputs
    x [B, T, C] and start indices ``starts`` [n], the state a cached conv would hold just
    before token ``starts[j]`` (its last ``width`` inputs, zeros before the sequence start),
    as [B * n, C, width] (row ``b * n + j``). Used by block diffusion to start every noisy
    block from the clean prefix (``core.two_stream``)."""
    B, T, C = x.shape
    xp = F.pad(x, (0, 0, width, 0))  # index i of xp is input i - width
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
    forward + backward on CPU for the short widths used here, K <= 8 or so).
    """
    B, T, C = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, C, K - 1)
    xpad = torch.cat([state.to(x.dtype).transpose(1, 2), x], dim=1)  # [B, K-1+T, C]
    w = weight.to(x.dtype)
    y = xpad[:, K - 1:] * w[:, K - 1]
    for j in range(K - 1):  # over the kernel taps, not over tokens
        y = y + xpad[:, j:j + T] * w[:, j]
    if bias is not None:
        y = y + bias.to(x.dtype)
    return _act(y, activation), conv_state_update(xpad.transpose(1, 2), lengths, K - 1)


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
    if state is None and lengths is None and dispatch.use_fast("causal_conv1d", x, weight):
        out = _fla_causal_conv1d()(x=x, weight=weight, bias=bias, activation=activation)
        y = out[0] if isinstance(out, tuple) else out
        # the new state is just the last K-1 inputs (left-padded with zeros for short T)
        tail = x[:, -(K - 1):].transpose(1, 2) if K > 1 else x.new_zeros(x.shape[0], x.shape[2], 0)
        if tail.shape[2] < K - 1:
            tail = F.pad(tail, (K - 1 - tail.shape[2], 0))
        return y, tail.contiguous()
    return causal_conv1d_ref(x, weight, bias, state, lengths, activation)
