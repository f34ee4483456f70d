"""ATLAS's muon_chunk chunk step as one Triton program per memory row and direction.

The chunk step of ``kernels/atlas.py`` (``_chunk_step``: Behrouz et al. 2025, "ATLAS: Learning
to Optimally Memorize the Context at Test Time", arXiv 2505.23735, the Omega rule of Eq. 9 with
the Muon inner update; ``inner_optimizer: muon_chunk``, Newton-Schulz once per chunk on the
chunk's weighted momentum sum) for a memory of depth 2, ``M(x) = P x + W_2 σ(W_1 x)``, written out
for one memory row (a sequence x head) in one program: forward ``_fused_fwd_kernel``, backward
``_fused_bwd_kernel`` (reverse mode by hand; no autograd graph inside the step).

Per chunk and row, with K the chunk's C' = C + c - 1 keys' features (window tail, then the
chunk) and its C queries' after them, all [., F]:

1. the memory MLP on keys and queries at the chunk-start weights, ``z = K W_1ᵀ``, ``h = σ(z)``,
   ``out = h W_2ᵀ + K Pᵀ``; the queries' rows are the chunk's retrieval ``y``;
2. the per-token gradients' rank-1 factors: ``e = 2 γ (out - v)`` for P (with K) and W_2 (with h),
   ``δ = (e W_2) ⊙ σ'(z)`` for W_1 (with K);
3. per weight the two mixing rows (the update's weighted sum ``X = Σ_i mix_0,i a_iᵀ b_i + λ_0 S_0``
   and the new momentum ``Σ_i mix_1,i a_iᵀ b_i + λ_1 S_0``), F-wide ones a tile of 32-64 feature
   columns at a time, their Gram matrices ``G = X Xᵀ`` accumulated over the tiles;
4. Newton-Schulz on ``G / tr G`` (``ns_gram_factor``'s iteration, in registers), scaled by
   ``Σ_t w_t / ||X||_F``;
5. the new weights ``Π α · W - R X``, the F-wide ones tile by tile again (X recomputed from its
   factors: a [out, C'] x [C', tile] product, cheaper than keeping it).

The backward recomputes 1-3 from the step's inputs (nothing is saved between the directions but
the inputs), runs Newton-Schulz forward once more keeping its iterates in a per-row scratch
slice (``_ns_save``) and walks them back (``_ns_back``),
then the rows' products in reverse, the F-wide ones in two more passes over the tiles.

Why: the step's work per row is a chain of ~41 dependent products of 32-64 wide matrices
(``benchmarks/atlas_step_ops.py --chain``); as separate launches each costs a launch and a
dependency wait (~13 us a product on an H100, 2026-12-06), in one program it costs its
arithmetic. Matmuls at float32 accuracy on tensor cores (``_triton.dot_f32``'s "tf32x3_split").

Applies (``applies``) to muon_chunk with retrieval in the step, depth 2, a hidden width between
the head dim and the feature dim, sides <= 64, float32, Triton; elsewhere the step of
``kernels.atlas`` runs. ``kernels.atlas`` checks it once per shape against that step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import next_pow2, triton

#: the feature columns of one tile of the F-wide passes (a power of two >= 16)
BLOCK_F = 32
#: warps per program
NUM_WARPS = 8
#: matmul precision of the kernels (``_triton.dot_f32``): float32 accuracy on tensor cores
PRECISION = "tf32x3_split"
#: the largest padded side (head dim, hidden width, C', C) the kernels take: a side-64 matrix is
#: 4,096 float32 registers of the program
MAX_SIDE = 64


def applies(params: tuple[Tensor, ...], Cp: int, n_q: int, ns_steps: int, muon: bool, ns_chunk: bool,
            factor: bool | None) -> bool:
    """Can the fused step run this chunk step? (muon_chunk, depth 2, retrieval in the step, float32,
    the short side of every weight its output side, every padded side <= MAX_SIDE.)"""
    if triton is None or not (muon and ns_chunk) or factor or len(params) != 3 or n_q <= 0 or ns_steps < 1:
        return False
    (D, Fd), (H, F1), (D2, H2) = (p.shape[-2:] for p in params)
    return (params[0].dtype == torch.float32 and F1 == Fd and D2 == D and H2 == H and D <= H <= Fd
            and max(next_pow2(s) for s in (D, H, Cp, n_q)) <= MAX_SIDE)


def _meta(P: Tensor, W1: Tensor, V: Tensor, n_q: int, ns_steps: int) -> dict:
    from .atlas import NS_COEFFS

    D, Fd = P.shape[-2:]
    a, b, c = NS_COEFFS
    return dict(D=D, H=W1.shape[-2], FD=Fd, CP=V.shape[1], CQ=n_q, BD=max(16, next_pow2(D)),
                BH=max(16, next_pow2(W1.shape[-2])), BT=max(16, next_pow2(V.shape[1])), BQ=max(16, next_pow2(n_q)),
                BF=BLOCK_F, STEPS=ns_steps, a=a, b=b, c=c, PREC=PRECISION)


class _FusedStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep, n_q, ns_steps):  # noqa: ANN001, ANN205
        ins = [t.contiguous() for t in (P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep)]
        N = P.shape[0]
        outs = [torch.empty_like(t) for t in ins[:6]] + [P.new_empty(N, n_q, P.shape[-2])]
        meta = _meta(P, W1, V, n_q, ns_steps)
        _fused_fwd_kernel[(N,)](*ins, *outs, **meta, num_warps=NUM_WARPS)
        ctx.save_for_backward(*ins)
        ctx.meta = meta
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        ins = ctx.saved_tensors
        meta = ctx.meta
        grads = [g.contiguous() for g in grads]
        dins = [torch.empty_like(t) for t in ins]
        BD, BH, S = meta["BD"], meta["BH"], meta["STEPS"]
        ws = ins[0].new_empty(ins[0].shape[0], 4 * S * (2 * BD * BD + BH * BH))
        _fused_bwd_kernel[(ins[0].shape[0],)](*ins, *grads, *dins, ws, **meta, num_warps=NUM_WARPS)
        return (*dins, None, None)


def fused_chunk_step(
    params: tuple[Tensor, ...], mom: tuple[Tensor, ...], K: Tensor, V: Tensor, gam: Tensor, mix: Tensor,
    lam: Tensor, wu: Tensor, keep: Tensor, ns_steps: int, muon: bool, pad_ns: bool, triton_ns: bool,
    factor: bool | None, ns_chunk: bool = False, bmm32: bool = False, group: bool = False, n_q: int = 0,
) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor]:
    """``kernels.atlas._chunk_step`` (same arguments and results; muon_chunk, ``applies``) by the
    fused kernels: ``(new weights, new momenta, retrieval)``. The layout arguments of the unfused
    step (``pad_ns``, ``triton_ns``, ``bmm32``, ``group``) do not apply here."""
    outs = _FusedStep.apply(*params, *mom, K, V, gam, mix, lam, wu, keep, n_q, ns_steps)
    return tuple(outs[:3]), tuple(outs[3:6]), outs[6]


if triton is not None:
    import triton.language as tl

    from ._triton import dot_f32, sigmoid_f32, silu_f32
    from .atlas import _mm, _ns_q

    @triton.jit
    def _ld(ptr, r, c, nr, nc, sr, sc):
        """The [len(r), len(c)] block at rows r / columns c of a matrix with strides (sr, sc); zero
        outside nr x nc."""
        return tl.load(ptr + r[:, None] * sr + c[None, :] * sc, mask=(r[:, None] < nr) & (c[None, :] < nc), other=0.0)

    @triton.jit
    def _st(ptr, r, c, nr, nc, sr, sc, x):
        tl.store(ptr + r[:, None] * sr + c[None, :] * sc, x, mask=(r[:, None] < nr) & (c[None, :] < nc))

    @triton.jit
    def _mlp(Kb, Pb, W1b, W2b, V, GAM, n, D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr,
             CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
             BF: tl.constexpr, PREC: tl.constexpr):
        """Steps 1-2 of the module doc: the memory on the keys (rows < CP) and the queries, the
        gradient factors. Returns z and h of keys / queries, the queries' retrieval, e, e W_2, σ'(z)
        of the keys, γ, out - v, W_2."""
        rt = tl.arange(0, BT)
        rq = tl.arange(0, BQ)
        rd = tl.arange(0, BD)
        rh = tl.arange(0, BH)
        rf = tl.arange(0, BF)
        z1k = tl.zeros((BT, BH), dtype=tl.float32)
        z1q = tl.zeros((BQ, BH), dtype=tl.float32)
        olk = tl.zeros((BT, BD), dtype=tl.float32)
        olq = tl.zeros((BQ, BD), dtype=tl.float32)
        for f0 in range(0, FD, BF):
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            kq = _ld(Kb + CP * FD, rq, cols, CQ, FD, FD, 1)
            w1t = _ld(W1b, cols, rh, FD, H, 1, FD)  # [BF, BH]
            pt = _ld(Pb, cols, rd, FD, D, 1, FD)
            z1k = dot_f32(kk, w1t, z1k, PREC)
            z1q = dot_f32(kq, w1t, z1q, PREC)
            olk = dot_f32(kk, pt, olk, PREC)
            olq = dot_f32(kq, pt, olq, PREC)
        w2 = _ld(W2b, rd, rh, D, H, H, 1)
        h1k = silu_f32(z1k)
        h1q = silu_f32(z1q)
        y = _mm(h1q, tl.trans(w2), PREC) + olq
        diff = _mm(h1k, tl.trans(w2), PREC) + olk - _ld(V + n * CP * D, rt, rd, CP, D, D, 1)
        gam = tl.load(GAM + n * CP + rt, mask=rt < CP, other=0.0)
        e = (2.0 * gam)[:, None] * diff
        g = _mm(e, w2, PREC)
        sg = sigmoid_f32(z1k)
        ds = sg * (1.0 + z1k * (1.0 - sg))
        return z1k, h1k, z1q, h1q, y, e, g, sg, ds, gam, diff, w2

    @triton.jit
    def _ns_save(A, ws, tile, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                 c: tl.constexpr, PREC: tl.constexpr):
        """``ns_gram_factor``'s steps from A_0 = ``A`` as a loop (not unrolled: the kernels' code, and so
        their compile time, stays that of one step), writing A_k, Q_k, R_k (R_0 = I) and T_k = Q_k A_k
        to the program's scratch slice ``ws`` (slot (j, k) at + (j * STEPS + k) * M * M); returns R.
        Every step is alike: the first one's R_1 = Q_0 I and the last one's unused T and A are formed
        too (three M×M products more than the unrolled form in ``kernels.atlas``)."""
        i = tl.arange(0, M)
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        R = eye
        for k in range(STEPS):
            Q = _ns_q(A, eye, a, b, c, PREC)
            T = _mm(Q, A, PREC)
            tl.store(ws + k * M * M + tile, A)
            tl.store(ws + (STEPS + k) * M * M + tile, Q)
            tl.store(ws + (2 * STEPS + k) * M * M + tile, R)
            tl.store(ws + (3 * STEPS + k) * M * M + tile, T)
            R = _mm(Q, R, PREC)
            A = _mm(T, Q, PREC)
        return R

    @triton.jit
    def _ns_back(gR, ws, tile_t, M: tl.constexpr, STEPS: tl.constexpr, b: tl.constexpr, c: tl.constexpr,
                 PREC: tl.constexpr):
        """dA_0 from dR = ``gR`` by reverse mode through the steps ``_ns_save`` wrote to ``ws`` (the saved
        tiles read transposed), as a loop: R_{k+1} = Q_k R_k, A_{k+1} = T_k Q_k, T_k = Q_k A_k,
        Q_k = a I + b A_k + c A_k² (the last step's A_{k+1} unused: its gradient starts at zero)."""
        gA = tl.zeros([M, M], dtype=tl.float32)
        for j in range(STEPS):
            k = STEPS - 1 - j
            Qt = tl.load(ws + (STEPS + k) * M * M + tile_t)
            At = tl.load(ws + k * M * M + tile_t)
            gQ = _mm(gR, tl.load(ws + (2 * STEPS + k) * M * M + tile_t), PREC)
            gR = _mm(Qt, gR, PREC)
            gT = _mm(gA, Qt, PREC)
            gQ += _mm(tl.load(ws + (3 * STEPS + k) * M * M + tile_t), gA, PREC) + _mm(gT, At, PREC)
            gA = _mm(Qt, gT, PREC)
            gA += b * gQ + c * (_mm(gQ, At, PREC) + _mm(At, gQ, PREC))
        return gA

    @triton.jit
    def _ns_scaled(G, wu, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                   c: tl.constexpr, PREC: tl.constexpr):
        """``R w / ||X||_F``: Newton-Schulz's factor of the Gram matrix G = X Xᵀ [M, M] (``ns_gram_factor``
        on G / (tr G + 1e-14)), scaled by the update weight w and 1 / sqrt(tr G + 1e-14)."""
        i = tl.arange(0, M)
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        inv = 1.0 / (tl.sum(G * eye) + 1e-14)
        A = G * inv
        R = eye
        for _ in range(STEPS):  # a loop, see _ns_save
            Q = _ns_q(A, eye, a, b, c, PREC)
            R = _mm(Q, R, PREC)
            A = _mm(_mm(Q, A, PREC), Q, PREC)
        return R * (wu * tl.sqrt(inv))

    @triton.jit
    def _ns_scaled_bwd(G, gRw, wu, ws, MR: tl.constexpr, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr,
                       b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        """``_ns_scaled`` again, and its reverse mode from the gradient gRw of its result: returns the
        result, the gradient of G symmetrised (gG + gGᵀ, what X Xᵀ passes back as (gG + gGᵀ) X) and
        the gradient of w. The iterates go through the program's scratch slice ``ws``."""
        i = tl.arange(0, M)
        tile = i[:, None] * M + i[None, :]
        tile_t = i[None, :] * M + i[:, None]
        eye = (i[:, None] == i[None, :]).to(tl.float32)
        inv = 1.0 / (tl.sum(G * eye) + 1e-14)
        sq = tl.sqrt(inv)
        R = _ns_save(G * inv, ws, tile, M, STEPS, a, b, c, PREC)
        tl.debug_barrier()
        s = wu * sq
        gs = tl.sum(gRw * R)
        ginv = gs * wu * 0.5 / sq
        gA = _ns_back(gRw * s, ws, tile_t, M, STEPS, b, c, PREC)
        ginv += tl.sum(gA * G)
        real = ((i[:, None] == i[None, :]) & (i[:, None] < MR)).to(tl.float32)
        gG = gA * inv - (ginv * inv * inv) * real  # d(1 / (tr G + eps)) = -inv² d tr G
        return R * s, gG + tl.trans(gG), gs * sq

    @triton.jit
    def _fused_fwd_kernel(P, W1, W2, MP, M1, M2, K, V, GAM, MIX, LAM, WU, KEEP,
                          PN, W1N, W2N, MPN, M1N, M2N, Y,
                          D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr,
                          BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                          BF: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                          c: tl.constexpr, PREC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        rt = tl.arange(0, BT)
        rq = tl.arange(0, BQ)
        rd = tl.arange(0, BD)
        rh = tl.arange(0, BH)
        rf = tl.arange(0, BF)
        Kb = K + n * (CP + CQ) * FD
        oP, o1, o2 = n * D * FD, n * H * FD, n * D * H
        z1k, h1k, z1q, h1q, y, e, g, sg, ds, gam, diff, w2 = _mlp(Kb, P + oP, W1 + o1, W2 + o2, V, GAM, n, D, H, FD,
                                                                 CP, CQ, BD, BH, BT, BQ, BF, PREC)
        _st(Y + n * CQ * D, rq, rd, CQ, D, D, 1, y)
        d1 = g * ds
        m0 = tl.load(MIX + n * 2 * CP + rt, mask=rt < CP, other=0.0)
        m1 = tl.load(MIX + n * 2 * CP + CP + rt, mask=rt < CP, other=0.0)
        lam0 = tl.load(LAM + 2 * n)
        lam1 = tl.load(LAM + 2 * n + 1)
        wu = tl.load(WU + n)
        keep = tl.load(KEEP + n)
        eT0 = tl.trans(e * m0[:, None])  # [BD, BT]
        eT1 = tl.trans(e * m1[:, None])
        dT0 = tl.trans(d1 * m0[:, None])  # [BH, BT]
        dT1 = tl.trans(d1 * m1[:, None])
        # W_2 [D, H], factors (e, h): in registers
        mw2 = _ld(M2 + o2, rd, rh, D, H, H, 1)
        x2 = _mm(eT0, h1k, PREC) + lam0 * mw2
        _st(M2N + o2, rd, rh, D, H, H, 1, _mm(eT1, h1k, PREC) + lam1 * mw2)
        rw2 = _ns_scaled(_mm(x2, tl.trans(x2), PREC), wu, BD, STEPS, a, b, c, PREC)
        _st(W2N + o2, rd, rh, D, H, H, 1, keep * w2 - _mm(rw2, x2, PREC))
        # P [D, F] (factors e, K) and W_1 [H, F] (factors δ, K): Gram matrices and new momenta by tiles
        gp = tl.zeros((BD, BD), dtype=tl.float32)
        g1 = tl.zeros((BH, BH), dtype=tl.float32)
        for f0 in range(0, FD, BF):
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            mp = _ld(MP + oP, rd, cols, D, FD, FD, 1)
            m1t = _ld(M1 + o1, rh, cols, H, FD, FD, 1)
            xp = _mm(eT0, kk, PREC) + lam0 * mp
            gp = dot_f32(xp, tl.trans(xp), gp, PREC)
            _st(MPN + oP, rd, cols, D, FD, FD, 1, _mm(eT1, kk, PREC) + lam1 * mp)
            x1 = _mm(dT0, kk, PREC) + lam0 * m1t
            g1 = dot_f32(x1, tl.trans(x1), g1, PREC)
            _st(M1N + o1, rh, cols, H, FD, FD, 1, _mm(dT1, kk, PREC) + lam1 * m1t)
        rwp = _ns_scaled(gp, wu, BD, STEPS, a, b, c, PREC)
        rw1 = _ns_scaled(g1, wu, BH, STEPS, a, b, c, PREC)
        for f0 in range(0, FD, BF):  # the updates, X recomputed from its factors
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            xp = _mm(eT0, kk, PREC) + lam0 * _ld(MP + oP, rd, cols, D, FD, FD, 1)
            x1 = _mm(dT0, kk, PREC) + lam0 * _ld(M1 + o1, rh, cols, H, FD, FD, 1)
            _st(PN + oP, rd, cols, D, FD, FD, 1, keep * _ld(P + oP, rd, cols, D, FD, FD, 1) - _mm(rwp, xp, PREC))
            _st(W1N + o1, rh, cols, H, FD, FD, 1, keep * _ld(W1 + o1, rh, cols, H, FD, FD, 1) - _mm(rw1, x1, PREC))

    @triton.jit
    def _fused_bwd_kernel(P, W1, W2, MP, M1, M2, K, V, GAM, MIX, LAM, WU, KEEP,
                          GPN, GW1N, GW2N, GMPN, GM1N, GM2N, GY,
                          DP, DW1, DW2, DMP, DM1, DM2, DK, DV, DGAM, DMIX, DLAM, DWU, DKEEP, WS,
                          D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr,
                          BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                          BF: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                          c: tl.constexpr, PREC: tl.constexpr):
        n = tl.program_id(0).to(tl.int64)
        rt = tl.arange(0, BT)
        rq = tl.arange(0, BQ)
        rd = tl.arange(0, BD)
        rh = tl.arange(0, BH)
        rf = tl.arange(0, BF)
        Kb = K + n * (CP + CQ) * FD
        DKb = DK + n * (CP + CQ) * FD
        oP, o1, o2 = n * D * FD, n * H * FD, n * D * H
        z1k, h1k, z1q, h1q, y, e, g, sg, ds, gam, diff, w2 = _mlp(Kb, P + oP, W1 + o1, W2 + o2, V, GAM, n, D, H, FD,
                                                                 CP, CQ, BD, BH, BT, BQ, BF, PREC)
        d1 = g * ds
        m0 = tl.load(MIX + n * 2 * CP + rt, mask=rt < CP, other=0.0)
        m1 = tl.load(MIX + n * 2 * CP + CP + rt, mask=rt < CP, other=0.0)
        lam0 = tl.load(LAM + 2 * n)
        lam1 = tl.load(LAM + 2 * n + 1)
        wu = tl.load(WU + n)
        keep = tl.load(KEEP + n)
        ea0 = e * m0[:, None]
        ea1 = e * m1[:, None]
        da0 = d1 * m0[:, None]
        da1 = d1 * m1[:, None]
        mw2 = _ld(M2 + o2, rd, rh, D, H, H, 1)
        x2 = _mm(tl.trans(ea0), h1k, PREC) + lam0 * mw2
        gw2n = _ld(GW2N + o2, rd, rh, D, H, H, 1)
        gs2 = _ld(GM2N + o2, rd, rh, D, H, H, 1)
        # the Gram matrices again and the gradients of the scaled Newton-Schulz factors, Σ gU Xᵀ
        gp = tl.zeros((BD, BD), dtype=tl.float32)
        g1 = tl.zeros((BH, BH), dtype=tl.float32)
        grp = tl.zeros((BD, BD), dtype=tl.float32)
        gr1 = tl.zeros((BH, BH), dtype=tl.float32)
        gkeep = tl.sum(gw2n * w2)
        for f0 in range(0, FD, BF):
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            xp = _mm(tl.trans(ea0), kk, PREC) + lam0 * _ld(MP + oP, rd, cols, D, FD, FD, 1)
            x1 = _mm(tl.trans(da0), kk, PREC) + lam0 * _ld(M1 + o1, rh, cols, H, FD, FD, 1)
            gpn = _ld(GPN + oP, rd, cols, D, FD, FD, 1)
            gw1n = _ld(GW1N + o1, rh, cols, H, FD, FD, 1)
            gp = dot_f32(xp, tl.trans(xp), gp, PREC)
            g1 = dot_f32(x1, tl.trans(x1), g1, PREC)
            grp = dot_f32(-gpn, tl.trans(xp), grp, PREC)
            gr1 = dot_f32(-gw1n, tl.trans(x1), gr1, PREC)
            gkeep += tl.sum(gpn * _ld(P + oP, rd, cols, D, FD, FD, 1)) + tl.sum(gw1n * _ld(W1 + o1, rh, cols, H, FD,
                                                                                           FD, 1))
        wsb = WS + n * (4 * STEPS * (2 * BD * BD + BH * BH))
        rwp, ggp, gwu = _ns_scaled_bwd(gp, grp, wu, wsb, D, BD, STEPS, a, b, c, PREC)
        rw1, gg1, gwu1 = _ns_scaled_bwd(g1, gr1, wu, wsb + 4 * STEPS * BD * BD, H, BH, STEPS, a, b, c, PREC)
        rw2, gg2, gwu2 = _ns_scaled_bwd(_mm(x2, tl.trans(x2), PREC), _mm(-gw2n, tl.trans(x2), PREC), wu,
                                        wsb + 4 * STEPS * (BD * BD + BH * BH), D, BD, STEPS, a, b, c, PREC)
        gwu += gwu1 + gwu2
        # W_2: X's gradient, the momentum's, the factors' (a = e, b = h)
        gx2 = _mm(tl.trans(rw2), -gw2n, PREC) + _mm(gg2, x2, PREC)
        _st(DM2 + o2, rd, rh, D, H, H, 1, lam0 * gx2 + lam1 * gs2)
        glam0 = tl.sum(gx2 * mw2)
        glam1 = tl.sum(gs2 * mw2)
        q0 = _mm(h1k, tl.trans(gx2), PREC)  # [BT, BD]
        q1 = _mm(h1k, tl.trans(gs2), PREC)
        gmix0 = tl.sum(e * q0, 1)
        gmix1 = tl.sum(e * q1, 1)
        ge = m0[:, None] * q0 + m1[:, None] * q1
        gh1k = _mm(ea0, gx2, PREC) + _mm(ea1, gs2, PREC)
        # P and W_1 by tiles: X's gradient, the momenta's, the factors' (a = e / δ, b = the keys)
        qp0 = tl.zeros((BT, BD), dtype=tl.float32)
        qp1 = tl.zeros((BT, BD), dtype=tl.float32)
        q10 = tl.zeros((BT, BH), dtype=tl.float32)
        q11 = tl.zeros((BT, BH), dtype=tl.float32)
        for f0 in range(0, FD, BF):
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            mp = _ld(MP + oP, rd, cols, D, FD, FD, 1)
            m1t = _ld(M1 + o1, rh, cols, H, FD, FD, 1)
            gsp = _ld(GMPN + oP, rd, cols, D, FD, FD, 1)
            gs1 = _ld(GM1N + o1, rh, cols, H, FD, FD, 1)
            xp = _mm(tl.trans(ea0), kk, PREC) + lam0 * mp
            x1 = _mm(tl.trans(da0), kk, PREC) + lam0 * m1t
            gxp = _mm(tl.trans(rwp), -_ld(GPN + oP, rd, cols, D, FD, FD, 1), PREC) + _mm(ggp, xp, PREC)
            gx1 = _mm(tl.trans(rw1), -_ld(GW1N + o1, rh, cols, H, FD, FD, 1), PREC) + _mm(gg1, x1, PREC)
            _st(DMP + oP, rd, cols, D, FD, FD, 1, lam0 * gxp + lam1 * gsp)
            _st(DM1 + o1, rh, cols, H, FD, FD, 1, lam0 * gx1 + lam1 * gs1)
            glam0 += tl.sum(gxp * mp) + tl.sum(gx1 * m1t)
            glam1 += tl.sum(gsp * mp) + tl.sum(gs1 * m1t)
            qp0 = dot_f32(kk, tl.trans(gxp), qp0, PREC)
            qp1 = dot_f32(kk, tl.trans(gsp), qp1, PREC)
            q10 = dot_f32(kk, tl.trans(gx1), q10, PREC)
            q11 = dot_f32(kk, tl.trans(gs1), q11, PREC)
            gkk = _mm(ea0, gxp, PREC) + _mm(ea1, gsp, PREC) + _mm(da0, gx1, PREC) + _mm(da1, gs1, PREC)
            _st(DKb, rt, cols, CP, FD, FD, 1, gkk)
        ge += m0[:, None] * qp0 + m1[:, None] * qp1
        gmix0 += tl.sum(e * qp0, 1) + tl.sum(d1 * q10, 1)
        gmix1 += tl.sum(e * qp1, 1) + tl.sum(d1 * q11, 1)
        gd1 = m0[:, None] * q10 + m1[:, None] * q11
        # δ = g ⊙ σ'(z), g = e W_2; σ''(z) = s (1 - s) (2 + z (1 - 2 s))
        gz1k = gd1 * g * sg * (1.0 - sg) * (2.0 + z1k * (1.0 - 2.0 * sg))
        gg = gd1 * ds
        ge += _mm(gg, tl.trans(w2), PREC)
        gw2 = _mm(tl.trans(e), gg, PREC)
        # e = 2 γ (out - v), out = h W_2ᵀ + K Pᵀ; the queries' rows: y
        gout = (2.0 * gam)[:, None] * ge
        _st(DV + n * CP * D, rt, rd, CP, D, D, 1, -gout)
        tl.store(DGAM + n * CP + rt, 2.0 * tl.sum(ge * diff, 1), mask=rt < CP)
        gy = _ld(GY + n * CQ * D, rq, rd, CQ, D, D, 1)
        gw2 += _mm(tl.trans(gout), h1k, PREC) + _mm(tl.trans(gy), h1q, PREC)
        gh1k += _mm(gout, w2, PREC)
        gz1k += gh1k * ds
        sq = sigmoid_f32(z1q)
        gz1q = _mm(gy, w2, PREC) * (sq * (1.0 + z1q * (1.0 - sq)))
        _st(DW2 + o2, rd, rh, D, H, H, 1, keep * gw2n + gw2)
        tl.store(DMIX + n * 2 * CP + rt, gmix0, mask=rt < CP)
        tl.store(DMIX + n * 2 * CP + CP + rt, gmix1, mask=rt < CP)
        tl.store(DLAM + 2 * n, glam0)
        tl.store(DLAM + 2 * n + 1, glam1)
        tl.store(DWU + n, gwu)
        tl.store(DKEEP + n, gkeep)
        tl.debug_barrier()  # the keys' gradient tiles written above are read back below
        for f0 in range(0, FD, BF):  # the gradients through the memory MLP into P, W_1 and the features
            cols = f0 + rf
            kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
            kq = _ld(Kb + CP * FD, rq, cols, CQ, FD, FD, 1)
            p = _ld(P + oP, rd, cols, D, FD, FD, 1)
            w1 = _ld(W1 + o1, rh, cols, H, FD, FD, 1)
            dp = keep * _ld(GPN + oP, rd, cols, D, FD, FD, 1) + _mm(tl.trans(gout), kk, PREC) + _mm(tl.trans(gy), kq,
                                                                                                      PREC)
            _st(DP + oP, rd, cols, D, FD, FD, 1, dp)
            dw1 = (keep * _ld(GW1N + o1, rh, cols, H, FD, FD, 1) + _mm(tl.trans(gz1k), kk, PREC)
                   + _mm(tl.trans(gz1q), kq, PREC))
            _st(DW1 + o1, rh, cols, H, FD, FD, 1, dw1)
            dkk = _ld(DKb, rt, cols, CP, FD, FD, 1) + _mm(gout, p, PREC) + _mm(gz1k, w1, PREC)
            _st(DKb, rt, cols, CP, FD, FD, 1, dkk)
            _st(DKb + CP * FD, rq, cols, CQ, FD, FD, 1, _mm(gy, p, PREC) + _mm(gz1q, w1, PREC))
