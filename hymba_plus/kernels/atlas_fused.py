"""ATLAS's muon_chunk chunk step in ten Triton launches: five forward, five backward.

The chunk step of ``kernels/atlas.py`` (``_chunk_step``: Behrouz et al. 2025, "ATLAS: Learning
to Optimally Memorize the Context at Test Time", arXiv 2505.23735, the Omega rule of Eq. 9 with
the Muon inner update; ``inner_optimizer: muon_chunk``, Newton-Schulz once per chunk on the
chunk's weighted momentum sum) for a memory of depth 2, ``M(x) = P x + W_2 σ(W_1 x)``, written out
by hand, the backward included (reverse mode by hand; no autograd graph inside the step).

Per chunk and memory row (a sequence x head), with K the chunk's C' = C + c - 1 keys' features
(window tail, then the chunk) and its C queries' after them, all [., F]:

1. the memory MLP on keys and queries at the chunk-start weights, ``z = K W_1ᵀ``, ``h = σ(z)``,
   ``out = h W_2ᵀ + K Pᵀ``; the queries' rows are the chunk's retrieval ``y``;
2. the per-token gradients' rank-1 factors: ``e = 2 γ (out - v)`` for P (with K) and W_2 (with h),
   ``δ = (e W_2) ⊙ σ'(z)`` for W_1 (with K);
3. per weight the two mixing rows (the update's weighted sum ``X = Σ_i mix_0,i a_iᵀ b_i + λ_0 S_0``
   and the new momentum ``Σ_i mix_1,i a_iᵀ b_i + λ_1 S_0``) and the Gram matrix ``G = X Xᵀ``;
4. Newton-Schulz on ``G / tr G`` (``ns_gram_factor``'s iteration, in registers), scaled by
   ``Σ_t w_t / ||X||_F``;
5. the new weights ``Π α · W - R X``.

The F-wide weights (P [D, F], W_1 [H, F]) are cut into tiles of ``BLOCK_F`` feature columns, a
program per (row, tile); sums over F (K W_1ᵀ, the Gram matrices, the backward's K gXᵀ) are written
per tile and added up by the next launch, a program per row (or per row and weight, for
Newton-Schulz). Forward: (1) the tiles' shares of K W_1ᵀ, K Pᵀ; (2) per row the MLP's rest, y, the
factors (kept for the backward) and all of W_2's step; (3) per tile the new momenta and the Gram
shares; (4) per (row, weight) Newton-Schulz; (5) per tile the new weights (X recomputed from its
factors, cheaper than keeping it). Backward: (1) per tile the shares of -gW_new Xᵀ; (2) per (row,
weight) Newton-Schulz's reverse mode (``_ns_back``) through the iterates the forward kept (``_ns_save``:
4 x 5 tiles per weight, 0.5 MB a row and chunk at the Quad-Hybrid's memory, ~2 GB for its layer at
8 x 2048, as the unfused step's ``NS_SAVE_FWD`` keeps), and W_2's step's backward; (3) per tile X's and the old momenta's gradients and the
shares of the factors' gradients; (4) per row the memory MLP's backward; (5) per tile the gradients
into P, W_1 and the features; backward 3-5 on tiles of ``BLOCK_F_BWD`` columns (narrower where the
hidden side is 64, against spills). Matmuls at float32 accuracy on tensor cores (``_triton.dot_f32``'s
"tf32x3_split"): one TF32 product a matmul is not enough even for the reverse mode alone (Newton-Schulz's
reverse in TF32, rounded operands, in Triton's interpreter: one chunk step's gradients ~1e-3 off float64,
the fast path's through 4-16 chunks 0.1-2.0 off, against 2e-3-7e-3 in float32). Nor is Newton-Schulz's backward
in forward mode on symmetric tangents (every iterate a polynomial in A_0, so sym(dA_0) = L_f(A_0)[sym(dR)]: 25
products against 40, backward 2 110 -> 100 us on an H100), exact in real arithmetic but, in float32 through 4
chunks at the Quad-Hybrid's memory, gradients 1.5e-2 off float64 against 3.8e-4 in reverse mode: through a chain
W_1's Gram matrix is near-singular (the momentum decays), Newton-Schulz's derivative there is large, and the tangent
carries that part through every step, where rounding leaks it into the rest (the reverse forms it only at its end).

A first form ran each row's whole step in one program per direction (2 launches a chunk): on an
H100 (2026-12-06, the Quad-Hybrid's memory, 32 rows) 268 us forward and 1,574 forward+backward a
chunk against 164 / 587 for the unfused compiled step (~78 launches): each row's ~970 small products
in turn on 32 of 132 SMs cost more than the launches they save.

Applies (``applies``) to muon_chunk with retrieval in the step, depth 2, a hidden width between
the head dim and the feature dim, sides <= 64, float32, Triton; elsewhere the step of
``kernels.atlas`` runs. ``kernels.atlas`` checks it once per shape against that step.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import next_pow2, triton

#: the feature columns of one tile of the F-wide launches (a power of two >= 16) and the warps of every
#: program. Swept on 2026-12-06 (``benchmarks/atlas_fused_bench.py``, the Quad-Hybrid's memory, one chunk
#: step forward+backward in a CUDA graph): H100 16x4 615.8 us, 64x4 624.9, 32x4 625.3, 32x8 853.3; H200
#: (iterates saved) 64x4 557.3, 32x4 562.9, 16x4 564.0. 8 warps spill no less (a program's values are
#: spread over more threads, but ptxas still hits 255 registers in the backward's launches) and run
#: fewer programs an SM
BLOCK_F = 64
#: the feature columns of the backward's tile launches after Newton-Schulz's reverse (backward 3-5; None:
#: 16 where the padded hidden side is 64, else ``BLOCK_F``; backward 1 keeps the forward's, so that backward
#: 2 adds up as few partial Gram gradients as forward 4 adds Gram matrices). Narrower tiles keep backward 3's
#: programs in registers (ptxas, sm_90a, 4 warps, the Quad-Hybrid's memory: 3.0 KB of spills a thread at 64
#: columns, 1.2 KB at 32, 60 B at 16) at the price of more partial sums for backward 4 to add. H100,
#: 2026-12-06, one chunk step forward+backward (``atlas_fused_bench.py --configs 64x4b64 64x4b32 64x4b16``,
#: all backward launches at that width then): the Quad-Hybrid's memory (hidden 64, 560 features) 581.3 /
#: 548.3 / 543.1 us at 64 / 32 / 16 backward columns; the d 2048 layer's (hidden 32, 152 features) 227.7 /
#: 237.6 / 245.8
BLOCK_F_BWD: int | None = None
NUM_WARPS = 4
#: the warps of the per-row launches (forward 2 and 4, backward 2 and 4: a program per row, or per row and
#: weight; None: NUM_WARPS). Those grids are smaller than the GPU (32-96 programs at the Quad-Hybrid's 32
#: rows), so more warps a program cost no occupancy. H100, 2026-12-06 (``atlas_fused_bench.py --configs 64x4
#: 64x4r8``, one chunk step forward+backward): the Quad-Hybrid's memory 517.6 us at 4, 520.4 at 8; the d 2048
#: layer's 221.3 / 229.7 (ptxas: backward 4 spills 88 B a thread at 8 warps against 804 at 4, backward 2 as much)
ROW_WARPS: int | None = None
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
                BF=BLOCK_F, NT=-(-Fd // BLOCK_F), STEPS=ns_steps, a=a, b=b, c=c, PREC=PRECISION)


def _bwd_meta(meta: dict) -> dict:
    """Backward 3-5's launch constants: the forward's with the tile width ``BLOCK_F_BWD`` (None: 16
    where the padded hidden side is 64, else the forward's), its tile count NT, and NG, the forward's
    (and backward 1's) tile count."""
    bf = BLOCK_F_BWD or (16 if meta["BH"] >= 64 else meta["BF"])
    return dict(meta, BF=bf, NT=-(-meta["FD"] // bf), NG=meta["NT"])


def _warps(kernel) -> int:  # noqa: ANN001
    """The warps a program of ``kernel``: NUM_WARPS over (row, F tile) grids, ROW_WARPS (or NUM_WARPS) per row."""
    return NUM_WARPS if kernel in _TILE_KERNELS else (ROW_WARPS or NUM_WARPS)


def _launch(kernel, grid: tuple[int, ...], meta: dict, *ptrs: Tensor) -> None:  # noqa: ANN001
    """``kernel[grid](*ptrs, <its constexprs from meta>)`` with ``_warps(kernel)`` warps a program."""
    kernel[grid](*ptrs, **{k: v for k, v in meta.items() if k in kernel.arg_names}, num_warps=_warps(kernel))


class _FusedStep(torch.autograd.Function):
    """The chunk step in 5 launches forward (grid: rows x F tiles, or rows, or rows x weights) and 5
    backward; partial sums over the tiles go through small buffers that the next launch adds up."""

    @staticmethod
    def forward(ctx, P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep, n_q, ns_steps):  # noqa: ANN001, ANN205
        ins = [t.contiguous() for t in (P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep)]
        P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep = ins
        N = P.shape[0]
        m = _meta(P, W1, V, n_q, ns_steps)
        BT, BQ, BD, BH, NT = m["BT"], m["BQ"], m["BD"], m["BH"], m["NT"]
        PN, W1N, W2N, MPN, M1N, M2N = (torch.empty_like(t) for t in ins[:6])
        Y = P.new_empty(N, n_q, P.shape[-2])
        SG = BD * BD + BH * BH
        zp = P.new_empty(N, NT, BT * BH + BQ * BH + BT * BD + BQ * BD)
        sav = P.new_empty(N, 2 * BT * BH + BQ * BH + 2 * BT * BD)  # a row's slice as _sav_offsets lays it out
        gp, gs, rw = P.new_empty(N, NT, SG), P.new_empty(N, 3), P.new_empty(N, SG)  # gs: 1 / (tr G + eps) a weight
        ws = P.new_empty(N, 4 * m["STEPS"] * (2 * BD * BD + BH * BH))  # Newton-Schulz's iterates
        _launch(_f1_mlp, (N, NT), m, K, P, W1, zp)
        _launch(_f2_row, (N,), m, zp, W2, M2, V, gam, mix, lam, wu, keep, Y, W2N, M2N, sav, ws, gs)
        _launch(_f3_gram, (N, NT), m, K, MP, M1, mix, lam, sav, MPN, M1N, gp)
        _launch(_f4_ns, (N, 2), m, gp, wu, gs, rw, ws)
        _launch(_f5_update, (N, NT), m, K, P, W1, MP, M1, mix, lam, keep, sav, rw, PN, W1N)
        ctx.save_for_backward(*ins, sav, gs, ws)
        ctx.meta = m
        return PN, W1N, W2N, MPN, M1N, M2N, Y

    @staticmethod
    def backward(ctx, *grads):  # noqa: ANN001, ANN205
        *ins, sav, gs, ws = ctx.saved_tensors
        P, W1, W2, MP, M1, M2, K, V, gam, mix, lam, wu, keep = ins
        GPN, GW1N, GW2N, GMPN, GM1N, GM2N, GY = (g.contiguous() for g in grads)
        dP, dW1, dW2, dMP, dM1, dM2, dK, dV, dgam, dmix, dlam, dwu, dkeep = (torch.empty_like(t) for t in ins)
        m = ctx.meta  # backward 1's tiles (whose partial Gram gradients backward 2 adds up): the forward's
        m3 = _bwd_meta(m)  # backward 3-5's tiles: BLOCK_F_BWD's
        N = P.shape[0]
        BT, BQ, BD, BH, NT, NT3 = m["BT"], m["BQ"], m["BD"], m["BH"], m["NT"], m3["NT"]
        SG = BD * BD + BH * BH
        grp = P.new_empty(N, NT, SG + 1)
        nb = P.new_empty(N, 2 * SG + BT * BD + BT * BH + 2 * BT + 6 + BD * BD)  # a row's slice as _nb_offsets lays it out
        qp = P.new_empty(N, NT3, 2 * BT * BD + 2 * BT * BH + 2)
        gb = P.new_empty(N, BT * BD + BT * BH + BQ * BH)
        _launch(_b1_gram_grads, (N, NT), m, K, P, W1, MP, M1, mix, lam, sav, GPN, GW1N, grp)
        _launch(_b2_ns, (N, 3), m, grp, gs, sav, W2, M2, GW2N, GM2N, mix, lam, wu, ws, nb, dM2)
        _launch(_b3_tiles, (N, NT3), m3, K, MP, M1, mix, lam, sav, nb, GPN, GW1N, GMPN, GM1N, dMP, dM1, dK, qp)
        _launch(_b4_row, (N,), m3, qp, grp, nb, sav, W2, GW2N, GY, gam, mix, lam, keep, dW2, dV, dgam, dmix, dlam,
                dwu, dkeep, gb)
        _launch(_b5_tiles, (N, NT3), m3, K, P, W1, GPN, GW1N, keep, gb, GY, dP, dW1, dK)
        return dP, dW1, dW2, dMP, dM1, dM2, dK, dV, dgam, dmix, dlam, dwu, dkeep, None, None


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

    from ._triton import sigmoid_f32, silu_f32
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
    def _ws_slot(WS, n, w, STEPS: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        """Row n's Newton-Schulz iterates of weight w (0 P, 1 W_1, 2 W_2) in WS: 4 x STEPS tiles of its
        padded side (BD, BH, BD), written by the forward for the backward."""
        base = WS + n * (4 * STEPS * (2 * BD * BD + BH * BH))
        return base + (w > 0) * (4 * STEPS * BD * BD) + (w > 1) * (4 * STEPS * BH * BH)

    @triton.jit
    def _ns_scaled(G, wu, ws, INV, M: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                   c: tl.constexpr, PREC: tl.constexpr):
        """``R w / ||X||_F``: Newton-Schulz's factor of the Gram matrix G = X Xᵀ [M, M] (``ns_gram_factor``
        on G / (tr G + 1e-14)), scaled by the update weight w and 1 / sqrt(tr G + 1e-14); the iterates
        to the scratch slice ``ws`` (``_ns_save``) and 1 / (tr G + 1e-14) to ``INV``, for the backward."""
        i = tl.arange(0, M)
        inv = 1.0 / (tl.sum(G * (i[:, None] == i[None, :]).to(tl.float32)) + 1e-14)
        tl.store(INV, inv)
        R = _ns_save(G * inv, ws, i[:, None] * M + i[None, :], M, STEPS, a, b, c, PREC)
        return R * (wu * tl.sqrt(inv))

    @triton.jit
    def _ns_scaled_bwd(inv, gRw, wu, ws, RWO, MR: tl.constexpr, M: tl.constexpr, STEPS: tl.constexpr,
                       b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        """The reverse mode of ``_ns_scaled`` from the gradient gRw of its result, through the iterates it
        kept in ``ws`` and ``inv`` = 1 / (tr G + 1e-14): stores its result to ``RWO`` (an M x M block) and
        returns the gradient of G symmetrised (gG + gGᵀ, what X Xᵀ passes back as (gG + gGᵀ) X) and the
        gradient of w. G itself is not needed (G / tr G is the saved A_0), and the result does not stay
        live through the reverse loop."""
        i = tl.arange(0, M)
        tile = i[:, None] * M + i[None, :]
        tile_t = i[None, :] * M + i[:, None]
        sq = tl.sqrt(inv)
        R = _mm(tl.load(ws + (2 * STEPS - 1) * M * M + tile), tl.load(ws + (3 * STEPS - 1) * M * M + tile), PREC)
        s = wu * sq
        gs = tl.sum(gRw * R)
        tl.store(RWO + tile, R * s)
        ginv = gs * wu * 0.5 / sq
        gA = _ns_back(gRw * s, ws, tile_t, M, STEPS, b, c, PREC)
        ginv += tl.sum(gA * tl.load(ws + tile)) / inv  # Σ gA ⊙ G, G = A_0 / inv
        real = ((i[:, None] == i[None, :]) & (i[:, None] < MR)).to(tl.float32)
        gG = gA * inv - (ginv * inv * inv) * real  # d(1 / (tr G + eps)) = -inv² d tr G
        return gG + tl.trans(gG), gs * sq

    # ------------------------------------------------------------------ layout of the work buffers
    # Per memory row, dense zero-padded blocks (BT x BH etc.); per (row, F tile) partial sums that the
    # next per-row kernel adds up. SAV (forward -> backward): z of the keys, z of the queries, e, δ,
    # out - v. GS (forward -> backward): 1 / (tr G + eps) of P's, W_1's and W_2's Gram matrices.

    @triton.jit
    def _blk(ptr, R: tl.constexpr, C: tl.constexpr):
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        return tl.load(ptr + r[:, None] * C + c[None, :])

    @triton.jit
    def _sblk(ptr, R: tl.constexpr, C: tl.constexpr, x):
        r = tl.arange(0, R)
        c = tl.arange(0, C)
        tl.store(ptr + r[:, None] * C + c[None, :], x)

    @triton.jit
    def _sum_tiles(ptr, stride, NT: tl.constexpr, R: tl.constexpr, C: tl.constexpr):
        """Σ over the NT tiles' partial [R, C] blocks at ptr + j * stride."""
        acc = tl.zeros((R, C), dtype=tl.float32)
        for j in range(NT):
            acc += _blk(ptr + j * stride, R, C)
        return acc

    @triton.jit
    def _gates(MIX, LAM, n, CP: tl.constexpr, BT: tl.constexpr):
        """The row's two mixing rows and their λ (muon_chunk: row 0 the update's sum, row 1 the new momentum)."""
        rt = tl.arange(0, BT)
        m0 = tl.load(MIX + n * 2 * CP + rt, mask=rt < CP, other=0.0)
        m1 = tl.load(MIX + n * 2 * CP + CP + rt, mask=rt < CP, other=0.0)
        return m0, m1, tl.load(LAM + 2 * n), tl.load(LAM + 2 * n + 1)

    @triton.jit
    def _sav_offsets(BT: tl.constexpr, BQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        o_z1q = BT * BH
        o_e = o_z1q + BQ * BH
        o_d1 = o_e + BT * BD
        o_diff = o_d1 + BT * BH
        return o_z1q, o_e, o_d1, o_diff, o_diff + BT * BD

    @triton.jit
    def _mix_sum(b, a, m, lam, s0, PREC: tl.constexpr):
        """One mixing row's sum for a weight, Σ_i m_i a_iᵀ b_i + λ S_0 = (a m)ᵀ b + λ S_0 (a: the gradient
        factor, e for P and W_2, δ for W_1; b: the keys' features K, or h for W_2; S_0 the old momentum):
        row 0 gives X, row 1 the new momentum (on a feature tile for P and W_1)."""
        return _mm(tl.trans(a * m[:, None]), b, PREC) + lam * s0

    @triton.jit
    def _tile_x(Kb, MPb, M1b, e, d1, m0, lam0, cols, D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr,
                CP: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, PREC: tl.constexpr):
        """One F tile of X for P and W_1 (step 3: the update's momentum sum, X = (a m_0)ᵀ K + λ_0 S_0), with
        the keys' tile and the old momenta's."""
        rt = tl.arange(0, BT)
        kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
        mp = _ld(MPb, tl.arange(0, BD), cols, D, FD, FD, 1)
        m1t = _ld(M1b, tl.arange(0, BH), cols, H, FD, FD, 1)
        return kk, mp, m1t, _mix_sum(kk, e, m0, lam0, mp, PREC), _mix_sum(kk, d1, m0, lam0, m1t, PREC)

    @triton.jit
    def _tile_start(K, MP, M1, MIX, LAM, SAV, D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr,
                    CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                    BF: tl.constexpr, PREC: tl.constexpr):
        """What every (row, F tile) program after forward 2 starts from: its row n, its columns, the row's
        offsets into the F-wide weights, the gates, the factors e and δ (SAV), and the tile's keys, old
        momenta and X of P and W_1 (``_tile_x``)."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        o_z1q, o_e, o_d1, o_diff, S2 = _sav_offsets(BT, BQ, BD, BH)
        e = _blk(SAV + n * S2 + o_e, BT, BD)
        d1 = _blk(SAV + n * S2 + o_d1, BT, BH)
        m0, m1, lam0, lam1 = _gates(MIX, LAM, n, CP, BT)
        oP, o1 = n * D * FD, n * H * FD
        kk, mp, m1t, xp, x1 = _tile_x(K + n * (CP + CQ) * FD, MP + oP, M1 + o1, e, d1, m0, lam0, cols, D, H, FD, CP,
                                      BT, BD, BH, PREC)
        return n, cols, oP, o1, e, d1, m0, m1, lam0, lam1, kk, mp, m1t, xp, x1

    @triton.jit
    def _f1_mlp(K, P, W1, ZP, D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr,
                CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
                BF: tl.constexpr, NT: tl.constexpr, PREC: tl.constexpr):
        """Forward 1, a program per (row, F tile): the tile's share of K W_1ᵀ and K Pᵀ, keys and queries."""
        n = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        rt, rq, rd, rh = tl.arange(0, BT), tl.arange(0, BQ), tl.arange(0, BD), tl.arange(0, BH)
        cols = j * BF + tl.arange(0, BF)
        Kb = K + n * (CP + CQ) * FD
        kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
        kq = _ld(Kb + CP * FD, rq, cols, CQ, FD, FD, 1)
        w1t = _ld(W1 + n * H * FD, cols, rh, FD, H, 1, FD)  # [BF, BH]
        pt = _ld(P + n * D * FD, cols, rd, FD, D, 1, FD)
        zb = ZP + (n * NT + j) * (BT * BH + BQ * BH + BT * BD + BQ * BD)
        _sblk(zb, BT, BH, _mm(kk, w1t, PREC))
        _sblk(zb + BT * BH, BQ, BH, _mm(kq, w1t, PREC))
        _sblk(zb + BT * BH + BQ * BH, BT, BD, _mm(kk, pt, PREC))
        _sblk(zb + BT * BH + BQ * BH + BT * BD, BQ, BD, _mm(kq, pt, PREC))

    @triton.jit
    def _f2_row(ZP, W2, M2, V, GAM, MIX, LAM, WU, KEEP, Y, W2N, M2N, SAV, WS, GS, D: tl.constexpr, H: tl.constexpr,
                CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr,
                BQ: tl.constexpr, NT: tl.constexpr, STEPS: tl.constexpr, a: tl.constexpr, b: tl.constexpr,
                c: tl.constexpr, PREC: tl.constexpr):
        """Forward 2, a program per row: the memory MLP's rest (steps 1-2), the retrieval, the gradient
        factors (kept in SAV), and all of W_2's step (its momenta, Gram matrix, Newton-Schulz, update)."""
        n = tl.program_id(0).to(tl.int64)
        rt, rq, rd, rh = tl.arange(0, BT), tl.arange(0, BQ), tl.arange(0, BD), tl.arange(0, BH)
        S1: tl.constexpr = BT * BH + BQ * BH + BT * BD + BQ * BD
        zb = ZP + n * NT * S1
        z1k = _sum_tiles(zb, S1, NT, BT, BH)
        z1q = _sum_tiles(zb + BT * BH, S1, NT, BQ, BH)
        olk = _sum_tiles(zb + BT * BH + BQ * BH, S1, NT, BT, BD)
        olq = _sum_tiles(zb + BT * BH + BQ * BH + BT * BD, S1, NT, BQ, BD)
        w2 = _ld(W2 + n * D * H, rd, rh, D, H, H, 1)
        h1k = silu_f32(z1k)
        _st(Y + n * CQ * D, rq, rd, CQ, D, D, 1, _mm(silu_f32(z1q), tl.trans(w2), PREC) + olq)
        diff = _mm(h1k, tl.trans(w2), PREC) + olk - _ld(V + n * CP * D, rt, rd, CP, D, D, 1)
        gam = tl.load(GAM + n * CP + rt, mask=rt < CP, other=0.0)
        e = (2.0 * gam)[:, None] * diff
        sg = sigmoid_f32(z1k)
        d1 = _mm(e, w2, PREC) * (sg * (1.0 + z1k * (1.0 - sg)))
        o_z1q, o_e, o_d1, o_diff, S2 = _sav_offsets(BT, BQ, BD, BH)
        sb = SAV + n * S2
        _sblk(sb, BT, BH, z1k)
        _sblk(sb + o_z1q, BQ, BH, z1q)
        _sblk(sb + o_e, BT, BD, e)
        _sblk(sb + o_d1, BT, BH, d1)
        _sblk(sb + o_diff, BT, BD, diff)
        m0, m1, lam0, lam1 = _gates(MIX, LAM, n, CP, BT)
        mw2 = _ld(M2 + n * D * H, rd, rh, D, H, H, 1)
        x2 = _mix_sum(h1k, e, m0, lam0, mw2, PREC)
        _st(M2N + n * D * H, rd, rh, D, H, H, 1, _mix_sum(h1k, e, m1, lam1, mw2, PREC))
        rw2 = _ns_scaled(_mm(x2, tl.trans(x2), PREC), tl.load(WU + n), _ws_slot(WS, n, 2, STEPS, BD, BH), GS + 3 * n + 2,
                         BD, STEPS, a, b, c, PREC)
        _st(W2N + n * D * H, rd, rh, D, H, H, 1, tl.load(KEEP + n) * w2 - _mm(rw2, x2, PREC))

    @triton.jit
    def _f3_gram(K, MP, M1, MIX, LAM, SAV, MPN, M1N, GP, D: tl.constexpr, H: tl.constexpr, FD: tl.constexpr,
                 CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr,
                 BQ: tl.constexpr, BF: tl.constexpr, NT: tl.constexpr, PREC: tl.constexpr):
        """Forward 3, a program per (row, F tile): P's and W_1's new momenta on the tile and its share of
        their Gram matrices X Xᵀ."""
        n, cols, oP, o1, e, d1, m0, m1, lam0, lam1, kk, mp, m1t, xp, x1 = _tile_start(
            K, MP, M1, MIX, LAM, SAV, D, H, FD, CP, CQ, BD, BH, BT, BQ, BF, PREC)
        rd, rh = tl.arange(0, BD), tl.arange(0, BH)
        _st(MPN + oP, rd, cols, D, FD, FD, 1, _mix_sum(kk, e, m1, lam1, mp, PREC))
        _st(M1N + o1, rh, cols, H, FD, FD, 1, _mix_sum(kk, d1, m1, lam1, m1t, PREC))
        gb = GP + (n * NT + tl.program_id(1)) * (BD * BD + BH * BH)
        _sblk(gb, BD, BD, _mm(xp, tl.trans(xp), PREC))
        _sblk(gb + BD * BD, BH, BH, _mm(x1, tl.trans(x1), PREC))

    @triton.jit
    def _f4_ns(GP, WU, GS, RW, WS, BD: tl.constexpr, BH: tl.constexpr, NT: tl.constexpr, STEPS: tl.constexpr,
               a: tl.constexpr, b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        """Forward 4, a program per (row, weight P / W_1): the Gram matrix summed over the tiles and its
        scaled Newton-Schulz factor (to RW; 1 / (tr G + eps) to GS for the backward)."""
        n = tl.program_id(0).to(tl.int64)
        SG: tl.constexpr = BD * BD + BH * BH
        wu = tl.load(WU + n)
        if tl.program_id(1) == 0:  # (a branch's values are its own: Triton types a name alike in both)
            Gp = _sum_tiles(GP + n * NT * SG, SG, NT, BD, BD)
            _sblk(RW + n * SG, BD, BD, _ns_scaled(Gp, wu, _ws_slot(WS, n, 0, STEPS, BD, BH), GS + 3 * n, BD, STEPS, a,
                                                  b, c, PREC))
        else:
            G1 = _sum_tiles(GP + n * NT * SG + BD * BD, SG, NT, BH, BH)
            _sblk(RW + n * SG + BD * BD, BH, BH, _ns_scaled(G1, wu, _ws_slot(WS, n, 1, STEPS, BD, BH), GS + 3 * n + 1,
                                                            BH, STEPS, a, b, c, PREC))

    @triton.jit
    def _f5_update(K, P, W1, MP, M1, MIX, LAM, KEEP, SAV, RW, PN, W1N, D: tl.constexpr, H: tl.constexpr,
                   FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                   BT: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
        """Forward 5, a program per (row, F tile): the new P and W_1 on the tile, Π α W - R X (X again from
        its factors)."""
        n, cols, oP, o1, e, d1, m0, m1, lam0, lam1, kk, mp, m1t, xp, x1 = _tile_start(
            K, MP, M1, MIX, LAM, SAV, D, H, FD, CP, CQ, BD, BH, BT, BQ, BF, PREC)
        rd, rh = tl.arange(0, BD), tl.arange(0, BH)
        keep = tl.load(KEEP + n)
        rb = RW + n * (BD * BD + BH * BH)
        _st(PN + oP, rd, cols, D, FD, FD, 1,
            keep * _ld(P + oP, rd, cols, D, FD, FD, 1) - _mm(_blk(rb, BD, BD), xp, PREC))
        _st(W1N + o1, rh, cols, H, FD, FD, 1,
            keep * _ld(W1 + o1, rh, cols, H, FD, FD, 1) - _mm(_blk(rb + BD * BD, BH, BH), x1, PREC))

    @triton.jit
    def _nb_offsets(BT: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr):
        """Offsets in a row's slice of NB (backward 2 -> 3, 4): R w / ||X|| of P and W_1, their Gram
        gradients (symmetrised), then W_2's shares of the gradients of e, h, mix, λ, w and Π α, then W_2's
        R w / ||X|| (at o_gwu + 4, used by backward 2 only); the last value is the slice's size."""
        SG: tl.constexpr = BD * BD + BH * BH
        o_ge2 = 2 * SG
        o_gh1 = o_ge2 + BT * BD
        o_gmix = o_gh1 + BT * BH
        o_glam = o_gmix + 2 * BT
        o_gwu = o_glam + 2
        return SG, o_ge2, o_gh1, o_gmix, o_glam, o_gwu, o_gwu + 4 + BD * BD

    @triton.jit
    def _b1_gram_grads(K, P, W1, MP, M1, MIX, LAM, SAV, GPN, GW1N, GRP, D: tl.constexpr, H: tl.constexpr,
                       FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                       BT: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr, NT: tl.constexpr, PREC: tl.constexpr):
        """Backward 1, a program per (row, F tile): the tile's share of the gradient of P's and W_1's
        scaled Newton-Schulz factors, -gW_new Xᵀ, and of Π α's, Σ gW_new ⊙ W."""
        n, cols, oP, o1, e, d1, m0, m1, lam0, lam1, kk, mp, m1t, xp, x1 = _tile_start(
            K, MP, M1, MIX, LAM, SAV, D, H, FD, CP, CQ, BD, BH, BT, BQ, BF, PREC)
        rd, rh = tl.arange(0, BD), tl.arange(0, BH)
        gpn = _ld(GPN + oP, rd, cols, D, FD, FD, 1)
        gw1n = _ld(GW1N + o1, rh, cols, H, FD, FD, 1)
        SG: tl.constexpr = BD * BD + BH * BH
        gb = GRP + (n * NT + tl.program_id(1)) * (SG + 1)
        _sblk(gb, BD, BD, _mm(-gpn, tl.trans(xp), PREC))
        _sblk(gb + BD * BD, BH, BH, _mm(-gw1n, tl.trans(x1), PREC))
        tl.store(gb + SG, tl.sum(gpn * _ld(P + oP, rd, cols, D, FD, FD, 1))
                 + tl.sum(gw1n * _ld(W1 + o1, rh, cols, H, FD, FD, 1)))

    @triton.jit
    def _b2_ns(GRP, GS, SAV, W2, M2, GW2N, GM2N, MIX, LAM, WU, WS, NB, DM2, D: tl.constexpr, H: tl.constexpr,
               CP: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr,
               NT: tl.constexpr, STEPS: tl.constexpr, b: tl.constexpr, c: tl.constexpr, PREC: tl.constexpr):
        """Backward 2, a program per (row, weight): Newton-Schulz's reverse mode through the iterates forward 4
        kept, for P and W_1 (their factors' gradients summed over backward 1's tiles); for W_2 (whose iterates
        forward 2 kept) its whole step's backward but
        for the memory MLP (its shares of the gradients of e, h, mix, λ, w, Π α go to NB)."""
        n = tl.program_id(0).to(tl.int64)
        w = tl.program_id(1)
        SG, o_ge2, o_gh1, o_gmix, o_glam, o_gwu, SNB = _nb_offsets(BT, BD, BH)
        nb = NB + n * SNB
        wu = tl.load(WU + n)
        ws = _ws_slot(WS, n, w, STEPS, BD, BH)
        if w == 0:  # (each branch's names its own: Triton types a name alike in all branches)
            ggp, gwup = _ns_scaled_bwd(tl.load(GS + 3 * n),
                                       _sum_tiles(GRP + n * NT * (SG + 1), SG + 1, NT, BD, BD),
                                       wu, ws, nb, D, BD, STEPS, b, c, PREC)
            _sblk(nb + SG, BD, BD, ggp)
            tl.store(nb + o_gwu, gwup)
        elif w == 1:
            gg1, gwu1 = _ns_scaled_bwd(tl.load(GS + 3 * n + 1),
                                       _sum_tiles(GRP + n * NT * (SG + 1) + BD * BD, SG + 1, NT, BH, BH),
                                       wu, ws, nb + BD * BD, H, BH, STEPS, b, c, PREC)
            _sblk(nb + SG + BD * BD, BH, BH, gg1)
            tl.store(nb + o_gwu + 1, gwu1)
        else:  # what the reverse loop does not need is loaded after it, not kept live through it
            rd, rh = tl.arange(0, BD), tl.arange(0, BH)
            o_z1q, o_e, o_d1, o_diff, S2 = _sav_offsets(BT, BQ, BD, BH)
            m0, m1, lam0, lam1 = _gates(MIX, LAM, n, CP, BT)
            o2 = n * D * H
            x2 = _mix_sum(silu_f32(_blk(SAV + n * S2, BT, BH)), _blk(SAV + n * S2 + o_e, BT, BD), m0, lam0,
                          _ld(M2 + o2, rd, rh, D, H, H, 1), PREC)
            gg2, gwu = _ns_scaled_bwd(tl.load(GS + 3 * n + 2),
                                      _mm(-_ld(GW2N + o2, rd, rh, D, H, H, 1), tl.trans(x2), PREC), wu, ws,
                                      nb + o_gwu + 4, D, BD, STEPS, b, c, PREC)
            gw2n = _ld(GW2N + o2, rd, rh, D, H, H, 1)
            gx2 = (_mm(tl.trans(_blk(nb + o_gwu + 4, BD, BD)), -gw2n, PREC)
                   + _mm(gg2, x2, PREC))
            gs2 = _ld(GM2N + o2, rd, rh, D, H, H, 1)
            mw2 = _ld(M2 + o2, rd, rh, D, H, H, 1)
            _st(DM2 + o2, rd, rh, D, H, H, 1, lam0 * gx2 + lam1 * gs2)
            tl.store(nb + o_glam, tl.sum(gx2 * mw2))
            tl.store(nb + o_glam + 1, tl.sum(gs2 * mw2))
            tl.store(nb + o_gwu + 2, gwu)
            tl.store(nb + o_gwu + 3, tl.sum(gw2n * _ld(W2 + o2, rd, rh, D, H, H, 1)))
            e = _blk(SAV + n * S2 + o_e, BT, BD)
            h1k = silu_f32(_blk(SAV + n * S2, BT, BH))
            q0 = _mm(h1k, tl.trans(gx2), PREC)  # [BT, BD]
            q1 = _mm(h1k, tl.trans(gs2), PREC)
            rt = tl.arange(0, BT)
            _sblk(nb + o_ge2, BT, BD, m0[:, None] * q0 + m1[:, None] * q1)
            _sblk(nb + o_gh1, BT, BH, _mm(e * m0[:, None], gx2, PREC) + _mm(e * m1[:, None], gs2, PREC))
            tl.store(nb + o_gmix + rt, tl.sum(e * q0, 1))
            tl.store(nb + o_gmix + BT + rt, tl.sum(e * q1, 1))

    @triton.jit
    def _b3_weight(kk, a, m0, m1, lam0, lam1, S0, GWN, GSN, DS, RWB, GGB, QB, cols, NR: tl.constexpr,
                   FD: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr, PREC: tl.constexpr):
        """Backward 3 for one F-wide weight (P: factor e, W_1: factor δ, ``NR`` rows padded to ``BR``) on the
        tile: X again from its factors, X's gradient through Newton-Schulz (R w / ||X|| at RWB) and the Gram
        matrix (GGB), the old momentum's gradient (to DS), the tile's shares of K gXᵀ and K gSᵀ (to QB);
        returns the keys' share and the tile's shares of λ's gradients."""
        rr = tl.arange(0, BR)
        s0 = _ld(S0, rr, cols, NR, FD, FD, 1)
        gx = (_mm(tl.trans(_blk(RWB, BR, BR)), -_ld(GWN, rr, cols, NR, FD, FD, 1), PREC)
              + _mm(_blk(GGB, BR, BR), _mix_sum(kk, a, m0, lam0, s0, PREC), PREC))
        gs = _ld(GSN, rr, cols, NR, FD, FD, 1)
        _st(DS, rr, cols, NR, FD, FD, 1, lam0 * gx + lam1 * gs)
        _sblk(QB, BT, BR, _mm(kk, tl.trans(gx), PREC))
        _sblk(QB + BT * BR, BT, BR, _mm(kk, tl.trans(gs), PREC))
        gk = _mm(a * m0[:, None], gx, PREC) + _mm(a * m1[:, None], gs, PREC)
        return gk, tl.sum(gx * s0), tl.sum(gs * s0)

    @triton.jit
    def _b3_tiles(K, MP, M1, MIX, LAM, SAV, NB, GPN, GW1N, GMPN, GM1N, DMP, DM1, DK, QP, D: tl.constexpr,
                  H: tl.constexpr, FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr,
                  BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr, NT: tl.constexpr,
                  PREC: tl.constexpr):
        """Backward 3, a program per (row, F tile): X's gradient for P and W_1 on the tile (through Newton-Schulz
        and the Gram matrix), the old momenta's, the keys' share through the momenta (to DK, completed by
        backward 5), and the tile's share of the factors' gradients K gXᵀ and of λ's (to QP). One weight after
        the other (``_b3_weight``), so that only one weight's tiles are live at a time."""
        n = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BF + tl.arange(0, BF)
        rt = tl.arange(0, BT)
        o_z1q, o_e, o_d1, o_diff, S2 = _sav_offsets(BT, BQ, BD, BH)
        m0, m1, lam0, lam1 = _gates(MIX, LAM, n, CP, BT)
        oP, o1 = n * D * FD, n * H * FD
        SG, o_ge2, o_gh1, o_gmix, o_glam, o_gwu, SNB = _nb_offsets(BT, BD, BH)
        nb = NB + n * SNB
        SQ: tl.constexpr = 2 * BT * BD + 2 * BT * BH + 2
        qb = QP + (n * NT + tl.program_id(1)) * SQ
        kk = _ld(K + n * (CP + CQ) * FD, rt, cols, CP, FD, FD, 1)
        gkk, gl0, gl1 = _b3_weight(kk, _blk(SAV + n * S2 + o_e, BT, BD), m0, m1, lam0, lam1, MP + oP, GPN + oP,
                                   GMPN + oP, DMP + oP, nb, nb + SG, qb, cols, D, FD, BT, BD, PREC)
        gk1, gl0b, gl1b = _b3_weight(kk, _blk(SAV + n * S2 + o_d1, BT, BH), m0, m1, lam0, lam1, M1 + o1, GW1N + o1,
                                     GM1N + o1, DM1 + o1, nb + BD * BD, nb + SG + BD * BD, qb + 2 * BT * BD, cols, H,
                                     FD, BT, BH, PREC)
        tl.store(qb + SQ - 2, gl0 + gl0b)
        tl.store(qb + SQ - 1, gl1 + gl1b)
        _st(DK + n * (CP + CQ) * FD, rt, cols, CP, FD, FD, 1, gkk + gk1)

    @triton.jit
    def _b4_row(QP, GRP, NB, SAV, W2, GW2N, GY, GAM, MIX, LAM, KEEP, DW2, DV, DGAM, DMIX, DLAM, DWU, DKEEP, GB,
                D: tl.constexpr, H: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr,
                BH: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, NT: tl.constexpr, NG: tl.constexpr,
                PREC: tl.constexpr):
        """Backward 4, a program per row: the factors' gradients summed over the tiles (backward 3's NT, and
        Π α's shares over backward 1's NG), through the memory
        MLP by hand (δ = (e W_2) ⊙ σ'(z), e = 2 γ (out - v), out = h W_2ᵀ + K Pᵀ, the queries' y): W_2's,
        v's, γ's, the gates', and the gradients of out and z (to GB) that backward 5 takes into P, W_1, K."""
        n = tl.program_id(0).to(tl.int64)
        rt, rq, rd, rh = tl.arange(0, BT), tl.arange(0, BQ), tl.arange(0, BD), tl.arange(0, BH)
        SQ: tl.constexpr = 2 * BT * BD + 2 * BT * BH + 2
        qb = QP + n * NT * SQ
        qp0 = _sum_tiles(qb, SQ, NT, BT, BD)
        qp1 = _sum_tiles(qb + BT * BD, SQ, NT, BT, BD)
        q10 = _sum_tiles(qb + 2 * BT * BD, SQ, NT, BT, BH)
        q11 = _sum_tiles(qb + 2 * BT * BD + BT * BH, SQ, NT, BT, BH)
        glam0 = tl.load(qb + SQ - 2)
        glam1 = tl.load(qb + SQ - 1)
        SG, o_ge2, o_gh1, o_gmix, o_glam, o_gwu, SNB = _nb_offsets(BT, BD, BH)
        gkeep = tl.load(NB + n * SNB + o_gwu + 3)
        for j in range(1, NT):
            glam0 += tl.load(qb + j * SQ + SQ - 2)
            glam1 += tl.load(qb + j * SQ + SQ - 1)
        for j in range(NG):
            gkeep += tl.load(GRP + (n * NG + j) * (SG + 1) + SG)
        o_z1q, o_e, o_d1, o_diff, S2 = _sav_offsets(BT, BQ, BD, BH)
        sb = SAV + n * S2
        z1k = _blk(sb, BT, BH)
        z1q = _blk(sb + o_z1q, BQ, BH)
        e = _blk(sb + o_e, BT, BD)
        d1 = _blk(sb + o_d1, BT, BH)
        diff = _blk(sb + o_diff, BT, BD)
        nb = NB + n * SNB
        m0, m1, lam0, lam1 = _gates(MIX, LAM, n, CP, BT)
        o2 = n * D * H
        w2 = _ld(W2 + o2, rd, rh, D, H, H, 1)
        sg = sigmoid_f32(z1k)
        ds = sg * (1.0 + z1k * (1.0 - sg))
        ge = _blk(nb + o_ge2, BT, BD) + m0[:, None] * qp0 + m1[:, None] * qp1
        gd1 = m0[:, None] * q10 + m1[:, None] * q11
        # δ = g ⊙ σ'(z), g = e W_2; σ''(z) = s (1 - s) (2 + z (1 - 2 s))
        gz1k = gd1 * _mm(e, w2, PREC) * sg * (1.0 - sg) * (2.0 + z1k * (1.0 - 2.0 * sg))
        gg = gd1 * ds
        ge += _mm(gg, tl.trans(w2), PREC)
        gout = (2.0 * tl.load(GAM + n * CP + rt, mask=rt < CP, other=0.0))[:, None] * ge
        _st(DV + n * CP * D, rt, rd, CP, D, D, 1, -gout)
        tl.store(DGAM + n * CP + rt, 2.0 * tl.sum(ge * diff, 1), mask=rt < CP)
        gy = _ld(GY + n * CQ * D, rq, rd, CQ, D, D, 1)
        gw2 = (_mm(tl.trans(e), gg, PREC) + _mm(tl.trans(gout), silu_f32(z1k), PREC)
               + _mm(tl.trans(gy), silu_f32(z1q), PREC))
        gz1k += (_blk(nb + o_gh1, BT, BH) + _mm(gout, w2, PREC)) * ds
        sq = sigmoid_f32(z1q)
        gz1q = _mm(gy, w2, PREC) * (sq * (1.0 + z1q * (1.0 - sq)))
        _st(DW2 + o2, rd, rh, D, H, H, 1, tl.load(KEEP + n) * _ld(GW2N + o2, rd, rh, D, H, H, 1) + gw2)
        tl.store(DMIX + n * 2 * CP + rt, tl.load(nb + o_gmix + rt) + tl.sum(e * qp0, 1) + tl.sum(d1 * q10, 1),
                 mask=rt < CP)
        tl.store(DMIX + n * 2 * CP + CP + rt,
                 tl.load(nb + o_gmix + BT + rt) + tl.sum(e * qp1, 1) + tl.sum(d1 * q11, 1), mask=rt < CP)
        tl.store(DLAM + 2 * n, glam0 + tl.load(nb + o_glam))
        tl.store(DLAM + 2 * n + 1, glam1 + tl.load(nb + o_glam + 1))
        tl.store(DWU + n, tl.load(nb + o_gwu) + tl.load(nb + o_gwu + 1) + tl.load(nb + o_gwu + 2))
        tl.store(DKEEP + n, gkeep)
        gb = GB + n * (BT * BD + BT * BH + BQ * BH)
        _sblk(gb, BT, BD, gout)
        _sblk(gb + BT * BD, BT, BH, gz1k)
        _sblk(gb + BT * BD + BT * BH, BQ, BH, gz1q)

    @triton.jit
    def _b5_tiles(K, P, W1, GPN, GW1N, KEEP, GB, GY, DP, DW1, DK, D: tl.constexpr, H: tl.constexpr,
                  FD: tl.constexpr, CP: tl.constexpr, CQ: tl.constexpr, BD: tl.constexpr, BH: tl.constexpr,
                  BT: tl.constexpr, BQ: tl.constexpr, BF: tl.constexpr, PREC: tl.constexpr):
        """Backward 5, a program per (row, F tile): the gradients through the memory MLP into P, W_1 (with
        Π α gW_new) and the keys' and queries' features on the tile."""
        n = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        rt, rq, rd, rh = tl.arange(0, BT), tl.arange(0, BQ), tl.arange(0, BD), tl.arange(0, BH)
        cols = j * BF + tl.arange(0, BF)
        gb = GB + n * (BT * BD + BT * BH + BQ * BH)
        gout = _blk(gb, BT, BD)
        gz1k = _blk(gb + BT * BD, BT, BH)
        gz1q = _blk(gb + BT * BD + BT * BH, BQ, BH)
        gy = _ld(GY + n * CQ * D, rq, rd, CQ, D, D, 1)
        keep = tl.load(KEEP + n)
        oP, o1 = n * D * FD, n * H * FD
        Kb = K + n * (CP + CQ) * FD
        DKb = DK + n * (CP + CQ) * FD
        kk = _ld(Kb, rt, cols, CP, FD, FD, 1)
        kq = _ld(Kb + CP * FD, rq, cols, CQ, FD, FD, 1)
        p = _ld(P + oP, rd, cols, D, FD, FD, 1)
        w1 = _ld(W1 + o1, rh, cols, H, FD, FD, 1)
        _st(DP + oP, rd, cols, D, FD, FD, 1, keep * _ld(GPN + oP, rd, cols, D, FD, FD, 1)
            + _mm(tl.trans(gout), kk, PREC) + _mm(tl.trans(gy), kq, PREC))
        _st(DW1 + o1, rh, cols, H, FD, FD, 1, keep * _ld(GW1N + o1, rh, cols, H, FD, FD, 1)
            + _mm(tl.trans(gz1k), kk, PREC) + _mm(tl.trans(gz1q), kq, PREC))
        _st(DKb, rt, cols, CP, FD, FD, 1, _ld(DKb, rt, cols, CP, FD, FD, 1) + _mm(gout, p, PREC) + _mm(gz1k, w1, PREC))
        _st(DKb + CP * FD, rq, cols, CQ, FD, FD, 1, _mm(gy, p, PREC) + _mm(gz1q, w1, PREC))

    #: the launches over (row, F tile) grids (NUM_WARPS); the others are per row (ROW_WARPS)
    _TILE_KERNELS = (_f1_mlp, _f3_gram, _f5_update, _b1_gram_grads, _b3_tiles, _b5_tiles)
