"""Attention of a few new tokens against a key/value cache, masked by per-slot positions.

Visibility (``visible``): key slot ``j`` of row ``b`` is seen by query ``i`` iff

    kpos[b, j] >= 0  and  kpos[b, j] <= qpos[b, i]                  (causal; -1 = empty slot / pad)
    and (qpos - kpos < window  or  kpos < n_meta)                   (sliding window; meta tokens stay)
    or  (kpos >= start_b and qpos >= start_b), start_b = max(qpos[b, 0], n_meta)   (bidirectional chunk)

Reference (any device, ``decode_attention_ref``): that mask as a dense ``[B, 1, Tq, S]`` boolean
tensor and ``F.scaled_dot_product_attention`` (what ``GatedAttention.attend`` runs for a cached
chunk). On a GPU that is several small kernels to build the mask plus a masked SDPA per step.

Fast path (``decode_attention``, CUDA, eager or inside a CUDA graph): FlashDecoding (Dao, Haziza,
Massa, Sizov 2023, "Flash-Decoding for long-context inference", the PyTorch / Stanford CRFM blog
post), i.e. FlashAttention's online softmax (Dao et al. 2022, arXiv 2205.14135, Alg. 1; the
exp2 / running-max form of FlashAttention-2, arXiv 2307.08691) split over the key sequence:

* ``_decode_attn_kernel``, grid ``(B * Hkv, n_splits)``: one program per (row, kv head, slice of
  the key slots). The ``G = Hq / Hkv`` query heads sharing that kv head and the ``Tq`` queries
  are the ``G * Tq`` rows of one tile (grouped-query attention reads each K/V block once for the
  whole group). The mask is computed in registers from ``kpos`` / ``qpos`` (no dense mask). Per
  slice it keeps the running max ``m``, the denominator ``l`` and the unnormalised ``acc``
  (float32; ``q k^T`` and ``p v`` as ``tl.dot`` with float32 accumulation, IEEE float32 products
  for float32 inputs, no tf32).
* ``_decode_combine_kernel``, grid ``(B * Hkv, G * Tq)``: ``o = sum_s 2^(m_s - M) acc_s /
  sum_s 2^(m_s - M) l_s``, ``M = max_s m_s``. With a single slice the first kernel writes the
  normalised output itself and the combine is skipped.

Only filled slots are read, without a host sync: the static cache of the decode engine passes
its fill counter ``n`` (a device tensor), the kernel reads it and divides ``[0, n)`` among the
slices (so the work is balanced however full the capacity is); a dynamic cache is full by
construction. With a sliding window a key block none of whose slots is visible is skipped
before its K/V are loaded (a windowed layer's static cache keeps every slot). A query that sees
no key (an inert padding slot) gets 0. Launch configs are fixed functions of the shapes (no
autotuning, so capturing a CUDA graph compiles nothing new after the first eager call).
Limits (else the reference runs): ``Tq <= MAX_TQ``, the same head dim for q, k and v (<= 256),
one dtype among fp16 / bf16 / fp32, ``Hq`` a multiple of ``Hkv``, ``G * Tq <= 64``, and no
gradient needed (the kernels have no backward).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch

try:  # Triton is optional: only the CUDA fast path uses it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

FAST = "decode_attention"
#: most queries per call the kernel takes (decode: 1; speculative verify / small blocks: a few)
MAX_TQ = 16
#: most query rows (heads of a kv group x queries) in one tile
MAX_ROWS = 64
MAX_HEAD_DIM = 256
#: most slices of the key sequence (the combine kernel holds one row's partials in registers)
MAX_SPLITS = 64
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def visible(qpos: Tensor, kpos: Tensor, window: int | None, n_meta: int, bidirectional: bool = False) -> Tensor:
    """[B, Tq, S] bool: causal (and windowed) visibility by position; kpos -1 = empty.
    ``bidirectional``: the chunk's own tokens (positions from the chunk's first one, meta
    tokens excluded; the queries are one chunk on top of the cache) see each other both ways."""
    q, k = qpos[:, :, None], kpos[:, None, :]
    ok = (k >= 0) & (k <= q)
    if window is not None:
        ok &= (q - k < window) | (k < n_meta)
    if bidirectional:  # the chunk's tokens (not meta tokens entering with it) all see each other, window or not
        start = qpos[:, :1, None].clamp(min=n_meta)
        ok |= (k >= start) & (q >= start)
    return ok


def decode_attention_ref(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, *, window: int | None = None,
                         n_meta: int = 0, bidirectional: bool = False, valid: Tensor | None = None) -> Tensor:
    """q [B, Tq, Hq, D], k/v [B, Hkv, S, D], qpos [B, Tq], kpos [B, S] -> [B, Tq, Hq, D]: SDPA
    with the dense ``visible`` mask (inert query slots, ``~valid``, see every key)."""
    mask = visible(qpos, kpos, window, n_meta, bidirectional)
    if valid is not None:
        mask = mask | ~valid[:, :, None]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask[:, None],
                                       enable_gqa=q.shape[2] != k.shape[1])
    return o.transpose(1, 2)


if triton is not None:

    @triton.jit
    def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, qpos_ptr, kpos_ptr, n_ptr, o_ptr, acc_ptr, ml_ptr,
                            S, TQ, G, HKV, qk_scale, window, n_meta,
                            sq_b, sq_t, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sqp_b, skp_b, so_b, so_t, so_h,
                            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                            HAS_N: tl.constexpr, WINDOW: tl.constexpr, BIDIR: tl.constexpr, SPLIT: tl.constexpr,
                            IEEE: tl.constexpr, UPCAST: tl.constexpr):
        pid_bh = tl.program_id(0)
        pid_s = tl.program_id(1)
        n_splits = tl.num_programs(1)
        b = (pid_bh // HKV).to(tl.int64)
        kvh = (pid_bh % HKV).to(tl.int64)

        rows = tl.arange(0, BLOCK_M)
        row_ok = rows < G * TQ
        t = rows % TQ
        hq = kvh * G + rows // TQ
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + hq[:, None] * sq_h + d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        qp = tl.load(qpos_ptr + b * sqp_b + t, mask=row_ok, other=-1)
        if BIDIR:
            start = tl.maximum(tl.load(qpos_ptr + b * sqp_b), n_meta)

        # this program's slice of the filled slots [0, n): whole blocks, balanced over the slices
        n = S
        if HAS_N:
            n = tl.minimum(tl.load(n_ptr).to(tl.int32), S)
        per_split = tl.cdiv(tl.cdiv(n, n_splits), BLOCK_N) * BLOCK_N
        lo = pid_s * per_split
        hi = tl.minimum(lo + per_split, n)

        m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        k_base = k_ptr + b * sk_b + kvh * sk_h
        v_base = v_ptr + b * sv_b + kvh * sv_h
        for j0 in range(lo, hi, BLOCK_N):
            j = j0 + tl.arange(0, BLOCK_N)
            j_ok = j < hi
            kp = tl.load(kpos_ptr + b * skp_b + j, mask=j_ok, other=-1)
            ok = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None])
            if WINDOW:
                ok = ok & (((qp[:, None] - kp[None, :]) < window) | (kp[None, :] < n_meta))
            if BIDIR:
                ok = ok | ((kp[None, :] >= start) & (qp[:, None] >= start))
            ok = ok & row_ok[:, None]
            if WINDOW:  # a windowed static cache keeps every slot: skip blocks nobody sees
                any_ok = tl.max(ok.to(tl.int32)) > 0
            else:
                any_ok = True
            if any_ok:
                kv_mask = j_ok[:, None] & d_ok[None, :]
                k = tl.load(k_base + j[:, None] * sk_s + d[None, :], mask=kv_mask, other=0.0)
                if IEEE:
                    s = tl.dot(q, tl.trans(k), input_precision="ieee")
                elif UPCAST:
                    s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
                else:
                    s = tl.dot(q, tl.trans(k))
                s = tl.where(ok, s * qk_scale, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp2(m_i - m_new)
                p = tl.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                v = tl.load(v_base + j[:, None] * sv_s + d[None, :], mask=kv_mask, other=0.0)
                if IEEE:
                    pv = tl.dot(p, v, input_precision="ieee")
                elif UPCAST:
                    pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(v.dtype), v)
                acc = acc * alpha[:, None] + pv
                m_i = m_new

        if SPLIT:  # partials of this slice: acc [BLOCK_M, BLOCK_D], then m and l [BLOCK_M] each
            part = (pid_bh * n_splits + pid_s).to(tl.int64)
            tl.store(acc_ptr + part * BLOCK_M * BLOCK_D + rows[:, None] * BLOCK_D + d[None, :], acc)
            tl.store(ml_ptr + part * 2 * BLOCK_M + rows, m_i)
            tl.store(ml_ptr + part * 2 * BLOCK_M + BLOCK_M + rows, l_i)
        else:
            o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
            tl.store(o_ptr + b * so_b + t[:, None] * so_t + hq[:, None] * so_h + d[None, :],
                     o.to(o_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _decode_combine_kernel(acc_ptr, ml_ptr, o_ptr, TQ, G, HKV, n_splits, so_b, so_t, so_h,
                               D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                               BLOCK_S: tl.constexpr):
        pid_bh = tl.program_id(0)
        r = tl.program_id(1)
        b = (pid_bh // HKV).to(tl.int64)
        hq = (pid_bh % HKV).to(tl.int64) * G + r // TQ
        t = r % TQ
        s = tl.arange(0, BLOCK_S)
        s_ok = s < n_splits
        part = pid_bh.to(tl.int64) * n_splits + s
        m = tl.load(ml_ptr + part * 2 * BLOCK_M + r, mask=s_ok, other=-1.0e30)
        l_s = tl.load(ml_ptr + part * 2 * BLOCK_M + BLOCK_M + r, mask=s_ok, other=0.0)
        w = tl.exp2(m - tl.max(m, 0))
        den = tl.sum(w * l_s, 0)
        d = tl.arange(0, BLOCK_D)
        acc = tl.load(acc_ptr + (part[:, None] * BLOCK_M + r) * BLOCK_D + d[None, :], mask=s_ok[:, None], other=0.0)
        o = tl.sum(w[:, None] * acc, 0) / tl.where(den > 0, den, 1.0)
        tl.store(o_ptr + b * so_b + t * so_t + hq * so_h + d, o.to(o_ptr.dtype.element_ty), mask=d < D)


def _interpreted() -> bool:
    """Running in Triton's CPU interpreter? Its ``tl.dot`` of 16-bit operands is wrong (Triton
    3.9 reads the raw bits), so there the kernel multiplies the same 16-bit values upcast to
    float32 (products of 16-bit numbers are exact in float32: the same result up to the order of
    the float32 sums)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Shapes and dtypes the kernel takes: q [B, Tq, Hq, D], k/v [B, Hkv, S, D]."""
    if triton is None or q.dim() != 4 or k.dim() != 4 or v.shape != k.shape:
        return False
    B, Tq, Hq, D = q.shape
    Hkv = k.shape[1]
    if not (1 <= Tq <= MAX_TQ and k.shape[0] == B and k.shape[3] == D and D <= MAX_HEAD_DIM and Hq % Hkv == 0
            and (Hq // Hkv) * Tq <= MAX_ROWS and q.dtype in _DTYPES and k.dtype == q.dtype == v.dtype
            and k.shape[2] > 0):
        return False
    # float32 (IEEE products on CUDA cores, no tensor cores): sm_90 ptxas spills kilobytes
    # beyond 4096 float32 accumulators per tile, so large float32 tiles stay on the reference
    tile = max(16, triton.next_power_of_2((Hq // Hkv) * Tq)) * max(16, triton.next_power_of_2(D))
    return q.dtype != torch.float32 or tile <= 4096


def _launch_config(B: int, Hkv: int, S: int, rows: int, D: int, dtype: torch.dtype,
                   device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, n_splits, num_warps): fixed functions of the shapes (no
    autotuning). A K/V block holds at most 8192 16-bit or 4096 float32 elements (half that for
    64 query rows): with these, sm_90 ptxas compiles every head dim up to 256 without spills.
    Splits: enough programs to fill the GPU twice over (``B * Hkv * n_splits`` ~ 2 x SMs), each
    with at least one key block, at most ``MAX_SPLITS``."""
    block_m = max(16, triton.next_power_of_2(rows))
    block_d = max(16, triton.next_power_of_2(D))
    budget = (2048 if dtype == torch.float32 else 8192) // (block_m // 16)
    block_n = min(64, max(16, budget // block_d))
    warps = 8 if block_d >= 128 else 4
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    n_blocks = triton.cdiv(S, block_n)
    n_splits = max(1, min(n_blocks, MAX_SPLITS, triton.cdiv(2 * sms, B * Hkv)))
    return block_m, block_n, block_d, n_splits, warps


def decode_attention_triton(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, *,
                            window: int | None = None, n_meta: int = 0, bidirectional: bool = False,
                            n_filled: Tensor | None = None, n_splits: int | None = None) -> Tensor:
    """The FlashDecoding kernels: q [B, Tq, Hq, D], k/v [B, Hkv, S, D] (any strides with a unit
    last one), qpos [B, Tq], kpos [B, S] -> [B, Tq, Hq, D] in q's dtype. ``n_filled``: a
    1-element device tensor, only slots below it are read (the static cache's fill counter).
    ``n_splits`` overrides the number of key slices (tests)."""
    B, Tq, Hq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1 or v.stride(-1) != 1:
        k, v = k.contiguous(), v.contiguous()
    qpos = qpos if qpos.stride(-1) == 1 else qpos.contiguous()
    kpos = kpos if kpos.stride(-1) == 1 else kpos.contiguous()
    block_m, block_n, block_d, splits, warps = _launch_config(B, Hkv, S, G * Tq, D, q.dtype, q.device)
    if n_splits is not None:
        splits = n_splits
    o = torch.empty(B, Tq, Hq, D, device=q.device, dtype=q.dtype)
    split = splits > 1
    if split:
        acc = torch.empty(B * Hkv * splits * block_m * block_d, device=q.device, dtype=torch.float32)
        ml = torch.empty(B * Hkv * splits * 2 * block_m, device=q.device, dtype=torch.float32)
    else:
        acc = ml = o  # unused
    _decode_attn_kernel[(B * Hkv, splits)](
        q, k, v, qpos, kpos, n_filled if n_filled is not None else kpos, o, acc, ml,
        S, Tq, G, Hkv, _LOG2E / D ** 0.5, window if window is not None else 0, n_meta,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), qpos.stride(0), kpos.stride(0), o.stride(0), o.stride(1), o.stride(2),
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_N=n_filled is not None,
        WINDOW=window is not None, BIDIR=bidirectional, SPLIT=split, IEEE=q.dtype == torch.float32,
        UPCAST=_interpreted(), num_warps=warps)
    if split:
        _decode_combine_kernel[(B * Hkv, G * Tq)](
            acc, ml, o, Tq, G, Hkv, splits, o.stride(0), o.stride(1), o.stride(2),
            D=D, BLOCK_M=block_m, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=4)
    return o


def _probe() -> None:
    """The kernels against the reference on the GPU: GQA 1 and 4, head dims 64 and 96, a
    non-power-of-two capacity with empty and left-padding slots, a window with meta tokens, a
    fill counter, one and three queries, split and unsplit, fp32 and bf16."""
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g = torch.Generator().manual_seed(0)
    for B, Hq, Hkv, D, S, Tq, window, dt, tol in ((3, 8, 2, 64, 77, 1, None, torch.float32, 1e-4),
                                                   (2, 4, 4, 96, 300, 3, 40, torch.bfloat16, 2e-2),
                                                   (2, 8, 2, 64, 1000, 1, 100, torch.bfloat16, 2e-2)):
        n = S - 5
        kpos = torch.arange(S).expand(B, S).clone() - 2
        kpos[:, n:] = -1
        kpos[0, :7] = -1  # left padding of row 0
        qpos = kpos[:, n - Tq:n]
        q = torch.randn(B, Tq, Hq, D, generator=g).to("cuda", dt)
        k = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dt)
        v = torch.randn(B, Hkv, S, D, generator=g).to("cuda", dt)
        qpos, kpos, nf = qpos.cuda(), kpos.cuda(), torch.tensor([n], device="cuda")
        ref = decode_attention_ref(q, k, v, qpos, kpos, window=window, n_meta=2)
        for splits in (None, 1):
            out = decode_attention_triton(q, k, v, qpos, kpos, window=window, n_meta=2, n_filled=nf, n_splits=splits)
            err = dispatch.max_rel_err(out, ref)
            if not err <= tol:
                raise RuntimeError(f"Triton decode attention differs from SDPA at {(B, Hq, Hkv, D, S, Tq, window, dt)}: "
                                   f"{err:.2e} > {tol}")


dispatch.fast_path(FAST, probe=_probe, doc="Triton FlashDecoding (split-K) attention of <= 16 queries over a "
                                           "position-masked KV cache (GQA, windows, meta tokens), no dense mask")


def decode_attention(q: Tensor, k: Tensor, v: Tensor, qpos: Tensor, kpos: Tensor, *, window: int | None = None,
                     n_meta: int = 0, bidirectional: bool = False, valid: Tensor | None = None,
                     n_filled: Tensor | None = None) -> Tensor:
    """q [B, Tq, Hq, D] against the cache k/v [B, Hkv, S, D] with slot positions kpos [B, S]
    -> [B, Tq, Hq, D]. The Triton kernels on CUDA (``use_fast("decode_attention")``), else the
    masked SDPA reference. Outputs at inert query slots (``~valid``) may differ between the
    two (any finite value: the padding rule). The kernels have no backward: a call whose q, k or v
    needs a gradient takes the reference."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if supported(q, k, v) and not needs_grad and not dispatch.tracing(q, k, v) and dispatch.use_fast(FAST, q, k, v):
        return decode_attention_triton(q, k, v, qpos, kpos, window=window, n_meta=n_meta,
                                       bidirectional=bidirectional, n_filled=n_filled)
    return decode_attention_ref(q, k, v, qpos, kpos, window=window, n_meta=n_meta, bidirectional=bidirectional,
                                valid=valid)
