"""Attention over block-diffusion training's two-stream layout (BD3-LM, Arriola et al. 2025,
arXiv 2503.09573 §3.2, "vectorised training"; ``core/two_stream.py``): softmax(QK^T/sqrt(d)) V
over all ``S = M + 2L`` slots of ``[meta (M) | clean x_0 (L) | noisy x_t (L)]``, each query
slot seeing the key slots of ``two_stream_visible`` (clean and meta: causal, within the window,
meta always; noisy block j: meta, the clean blocks < j within the window of its position, and its
own noisy block both ways).

Reference (any device): SDPA with that dense boolean ``[S, S]`` mask: every query-key tile is
computed and the masked scores thrown away.

Fast path (``flex_two_stream``, CUDA): FlexAttention (Dong et al. 2024, "Flex Attention: A
Programming Model for Generating Optimized Attention Kernels", arXiv 2412.05496) with
``two_stream_mask_mod``, the same visibility written per (query slot, key slot) index pair, as
BD3-LM's code does with its ``block_diff_mask`` (``models/dit.py``, there for its block-causal
``[x_t | x_0]`` layout). ``create_block_mask`` turns it into a ``BlockMask`` of 128 x 128 tiles
once per (layout, window, device) (``block_mask``, cached; compiled on CUDA, so the ``[S, S]``
grid is never materialised): tiles no query of which sees any key (the clean rows' noisy columns, the noisy rows' later clean blocks and other noisy blocks, the
clean stream's upper triangle, past the window) are skipped; partly visible tiles evaluate the
mask_mod in registers; fully visible ones skip it. ``flex_attention`` runs compiled
(``torch.compile``, fullgraph, static shapes: its fused Triton kernels, forward and backward; one
compilation per shape). GQA through
``enable_gqa`` (no repeat of K/V). Under autocast q, k and v are cast to autocast's dtype first,
as SDPA is under autocast. A call that torch.compile traces keeps the reference (as
``kernels.sdpa``: the dispatch's answer is taken in eager code only), and so does one with a head dim
below ``MIN_HEAD_DIM``, 32 (``supported``: Inductor's FlexAttention kernels refuse head dims below 16,
and a model's 16 failed their lowering on an H100); the probe runs the fast path on the GPU at a small
two-stream shape (meta tokens, a window, GQA, a length off the tile size), forward and backward in
bf16, against the reference in float32. A compile failure at a later call (a shape the probe did not
have) computes nothing: that call runs the reference and the fast path is off from then on, said once
(``dispatch.failed_at_run``; ``HYMBA_KERNELS=fast`` raises it). The backward is lowered with the forward
(``_backward_lowered_with_forward``; static shapes would leave it to the first ``loss.backward()``, past the
fallback), so its failure is the forward call's. A shape past torch.compile's recompile limit
(one compiled graph a shape, grad mode, dtype and layout, ``torch._dynamo.config.recompile_limit`` of them, 8 by
default) runs its calls on the reference, said once (``HYMBA_KERNELS=fast`` raises); the shapes compiled before keep
the fast path. Such a shape is not tried again (``past_recompile_limit``): under fullgraph Dynamo keeps no record of
the refusal, so each of its calls would re-run the guards and log torch's recompile-limit warning again.

GPU (H100, torch 2.11, 2026-12-07, ``gpu_suite.sh flex``): the kernel-level comparison passed (B 2,
H 8, D 64, L 1024, block 16, 4 meta, MHA / GQA, with and without a 256 window: outputs and q / k / v
gradients against the float32 reference within 2e-2); a block-diffusion model with head dim 16 then
failed Inductor's lowering (NoValidChoicesError), which led to the two guards above. On 2026-12-08 (H100)
the model step at head dim 32 failed the same way after the kernel test's D 64 had compiled: the
second shape recompiled with symbolic sizes (Dynamo's automatic dynamic), and a symbolic head dim has
no valid FlexAttention config; the fallback ran the reference, said in one line. Hence static shapes.
Not measured: its speed against the reference.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.two_stream import TwoStream, two_stream_visible
from . import dispatch

FAST = "flex_two_stream"

#: calls in this process whose shape came past torch.compile's recompile limit (they ran the reference)
recompile_limit_hits = 0
#: the calls (``_call_key``) that came past the recompile limit: they go to the reference without entering the
#: compiled function (under fullgraph Dynamo keeps no record of the refusal: each such call re-ran the guards,
#: tried to compile again and logged its recompile-limit warning, every layer of every step)
past_recompile_limit: set[tuple] = set()

#: the least head dim (q / k and v) the fast path takes: Inductor refuses head dims below 16 when it lowers
#: FlexAttention's Triton kernels ("NYI: embedding dimension ... must be at least 16", ``tl.dot``'s least
#: size), and on an H100 (torch 2.11, 2026-12-07) a block-diffusion model with head dim 16 failed the
#: lowering too (NoValidChoicesError) where the probe's 64 passed: 32 and up, as NATTEN allows compiled flex
MIN_HEAD_DIM = 32


def two_stream_mask_mod(ts: TwoStream, window: int | None = None) -> Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]:
    """FlexAttention's ``mask_mod(b, h, q_idx, kv_idx) -> bool`` of ``two_stream_visible(ts,
    window)``: the same visibility from slot indices alone (no tensor lookups, so Inductor
    evaluates it in registers). Slot s: noisy when s >= M + L, position s - L there (the clean
    token's), s elsewhere; block (position - M) // bs from position M on, -1 for meta tokens."""
    M, L, bs = ts.n_meta, ts.length, ts.block_size

    def slot(idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        noisy = idx >= M + L
        pos = torch.where(noisy, idx - L, idx)
        return noisy, pos, torch.where(pos >= M, (pos - M) // bs, -1)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        q_noisy, q_pos, q_blk = slot(q_idx)
        k_noisy, k_pos, k_blk = slot(kv_idx)
        clean_rows = ~q_noisy & ~k_noisy & (k_pos <= q_pos)
        noisy_sees_clean = q_noisy & ~k_noisy & (k_blk < q_blk)
        if window is not None:
            near = (q_pos - k_pos < window) | (k_pos < M)
            clean_rows, noisy_sees_clean = clean_rows & near, noisy_sees_clean & near
        return clean_rows | noisy_sees_clean | (q_noisy & k_noisy & (k_blk == q_blk))

    return mask_mod


def block_mask(ts: TwoStream, window: int | None, device: torch.device | str,  # noqa: ANN201 - a BlockMask
               compiled: bool | None = None):
    """The ``BlockMask`` of ``two_stream_mask_mod(ts, window)`` for ``[S, S]`` on ``device``,
    made once per (layout, window, device) and cached (every layer and step of a run shares it).
    ``compiled`` (default: on CUDA) builds it with ``torch.compile(create_block_mask)``, whose
    Inductor code reduces the mask_mod's values to tiles as it evaluates them; eagerly the
    mask_mod is evaluated on the whole ``[S, S]`` grid at once (int64 intermediates of 512 MiB
    each at S 8k)."""
    device = torch.device(device)
    return _block_mask(ts, window, str(device), device.type == "cuda" if compiled is None else compiled)


@functools.lru_cache(maxsize=64)
def _block_mask(ts: TwoStream, window: int | None, device: str, compiled: bool):  # noqa: ANN202
    from torch.nn.attention.flex_attention import create_block_mask

    S = ts.n_meta + 2 * ts.length
    make = _compiled(create_block_mask) if compiled else create_block_mask
    return make(two_stream_mask_mod(ts, window), None, None, S, S, device=device)


@functools.cache
def _compiled(fn: Callable, dynamic: bool | None = None) -> Callable:
    """``torch.compile(fn, dynamic=dynamic)``, made once per (function, dynamic)."""
    return torch.compile(fn, fullgraph=True, dynamic=dynamic)


def flex_two_stream(q: Tensor, k: Tensor, v: Tensor, ts: TwoStream, window: int | None = None, *,
                    enable_gqa: bool = False, compiled: bool | None = None) -> Tensor:
    """The fast path itself: q [B, H, S, D], k / v [B, Hkv, S, D] -> [B, H, S, D] by FlexAttention
    with the cached block mask. ``compiled`` (default: on CUDA) runs ``flex_attention`` compiled;
    False eagerly (PyTorch's unfused implementation of it, which materialises the scores: how the
    CPU tests run it)."""
    from torch.nn.attention.flex_attention import flex_attention

    dt = dispatch.autocast_dtype(q)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    # static shapes: a second shape would otherwise recompile with symbolic sizes (Dynamo's automatic
    # dynamic), and Inductor's FlexAttention templates found no valid config for a symbolic head dim
    # (NoValidChoicesError on an H100, 2026-12-08: the probe's D 64 then a model's D 32)
    use_compiled = q.is_cuda if compiled is None else compiled
    fn = _compiled(flex_attention, False) if use_compiled else flex_attention
    with torch.autocast(q.device.type, enabled=False), _backward_lowered_with_forward(use_compiled):
        return fn(q, k, v, block_mask=block_mask(ts, window, q.device), enable_gqa=enable_gqa)


def _backward_lowered_with_forward(compiled: bool):  # noqa: ANN202 - a context manager
    """Under static shapes AOTAutograd lowers a graph's backward lazily, at its first backward (no symbolic
    sizes saved for it): a lowering failure there (a shape the probe did not have) would come out of
    ``loss.backward()`` after the forward ran on the fast path, out of ``two_stream_attention``'s fallback.
    Lowered with the forward (``torch._functorch.config.force_non_lazy_backward_lowering``), its failure is
    the compiling call's, which nothing has computed yet: that call runs the reference."""
    import contextlib

    cfg = torch._functorch.config
    if not compiled or not hasattr(cfg, "force_non_lazy_backward_lowering"):
        return contextlib.nullcontext()
    return cfg.patch(force_non_lazy_backward_lowering=True)


def reference(q: Tensor, k: Tensor, v: Tensor, ts: TwoStream, window: int | None = None, *,
              enable_gqa: bool = False) -> Tensor:
    """SDPA with the dense ``two_stream_visible`` mask (the reference, any device)."""
    mask = two_stream_visible(ts, q.device, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=enable_gqa)


def supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Shapes the fast path takes: head dims of at least ``MIN_HEAD_DIM`` (q / k and v); smaller ones
    (a tiny model's heads) keep the reference, as the probe's D 64 cannot tell."""
    return min(q.shape[-1], k.shape[-1], v.shape[-1]) >= MIN_HEAD_DIM


def _call_key(q: Tensor, k: Tensor, v: Tensor, ts: TwoStream, window: int | None, enable_gqa: bool) -> tuple:
    """What the compiled ``flex_attention`` of a call is specialised on (static shapes): q / k / v's sizes,
    strides, dtypes and requires_grad, autocast's dtype, grad mode, the layout and window (its block mask), GQA."""
    return (str(q.device), dispatch.autocast_dtype(q), torch.is_grad_enabled(), ts, window, enable_gqa,
            *((tuple(t.shape), t.stride(), t.dtype, t.requires_grad) for t in (q, k, v)))


def two_stream_attention(q: Tensor, k: Tensor, v: Tensor, ts: TwoStream, window: int | None = None, *,
                         enable_gqa: bool = False) -> Tensor:
    """q [B, H, S, D], k / v [B, Hkv, S, D] (S = M + 2L) -> the two-stream attention [B, H, S, D]:
    the fast path where the dispatch takes it (CUDA, eager, head dims >= ``MIN_HEAD_DIM``), else the
    reference; a compile failure at a call turns the fast path off, said once (``dispatch.failed_at_run``)."""
    global recompile_limit_hits
    if supported(q, k, v) and not dispatch.tracing(q) and dispatch.use_fast(FAST, q, k, v):
        key = _call_key(q, k, v, ts, window, enable_gqa)
        if key in past_recompile_limit and dispatch.mode() != "fast":  # (refused before: not tried again)
            recompile_limit_hits += 1
            return reference(q, k, v, ts, window, enable_gqa=enable_gqa)
        try:
            return flex_two_stream(q, k, v, ts, window, enable_gqa=enable_gqa)
        except Exception as e:  # noqa: BLE001 - only a compile failure falls back (below)
            from torch._dynamo.exc import FailOnRecompileLimitHit, TorchDynamoException

            if isinstance(e, FailOnRecompileLimitHit) and dispatch.mode() != "fast":
                # a shape past torch.compile's recompile limit (static shapes: one graph a shape; under
                # fullgraph Dynamo raises instead of running eagerly): this call and the later ones of its
                # key take the reference, the shapes compiled before stay on the fast path, said once
                past_recompile_limit.add(key)
                recompile_limit_hits += 1
                if recompile_limit_hits == 1:
                    print(f"fast path {FAST}: torch.compile's recompile limit reached "
                          f"(torch._dynamo.config.recompile_limit = {torch._dynamo.config.recompile_limit} shapes); "
                          "calls of new shapes use the reference path", file=sys.stderr, flush=True)
                return reference(q, k, v, ts, window, enable_gqa=enable_gqa)
            if not isinstance(e, TorchDynamoException):
                raise
            # torch.compile could not build flex_attention for this call's shapes (its probe's were fine):
            # an H100 lowered the probe's D 64 but not a model's D 16 (NoValidChoicesError), 2026-12-07.
            # Nothing was computed yet, so the reference gives this call's exact result
            dispatch.failed_at_run(FAST, e)
    return reference(q, k, v, ts, window, enable_gqa=enable_gqa)


def _probe() -> None:
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401 - ImportError: unavailable

    ts, window = TwoStream(block_size=16, n_meta=4, length=96), 40  # S = 196: a tile cut short
    S = ts.n_meta + 2 * ts.length
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, S, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_()
    k, v = (torch.randn(2, 2, S, 64, generator=g).to("cuda", torch.bfloat16).requires_grad_() for _ in range(2))
    gy = torch.randn(2, 4, S, 64, generator=g).to("cuda", torch.bfloat16)
    y = flex_two_stream(q, k, v, ts, window, enable_gqa=True)
    got = (y, *torch.autograd.grad(y, (q, k, v), gy))
    ref = reference(q.float(), k.float(), v.float(), ts, window, enable_gqa=True)
    want = (ref, *torch.autograd.grad(ref, (q, k, v), gy.float()))
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = dispatch.max_rel_err(a, b)
        if err > 2e-2:
            raise RuntimeError(f"FlexAttention's two-stream {name} differs from SDPA with the dense mask ({err:.2e})")


dispatch.fast_path(FAST, probe=_probe, doc="FlexAttention with the two-stream block mask (block-diffusion "
                   "training: masked tiles skipped), compiled, fwd + bwd")
