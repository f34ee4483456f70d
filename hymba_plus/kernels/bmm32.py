"""Batched float32 matmul on tensor cores at float32 accuracy (3xTF32), for small problems.

Each product is three TF32 tensor-core products of split operands (``_triton.dot_f32``
"tf32x3_split": ``x = xh + xl``, ``x y ~ xl yh + xh yl + xh yh``, both parts rounded to nearest TF32; the split of NVIDIA's
CUTLASS "3xTF32" GEMMs, Ootomo & Yokota 2022, "Recovering single precision accuracy from
Tensor Cores while surpassing the FP32 theoretical peak performance"). cuBLAS in float32
(TF32 off) takes CUDA-core kernels with 32 x 32 tiles for the ATLAS chunk step's problems
(batch 32-64 of [64, 560] x [560, 64] and the like): several thousand launches a layer pass,
~40% of that layer's kernel time on an H100 (``benchmarks/RESULTS.md``). Here a program computes
one [BM, BN] tile of one batch entry, its K loop on tensor cores; operands are read through
their strides (transposed views and batch-broadcast operands cost no copy).

``bmm_f32(a, b)`` is the op (``hymba::bmm_f32``: opaque to torch.compile, its backward two
more of itself, so the chunk step's backward GEMMs take it too); on a CPU, or for other dtypes,
it is ``torch.bmm``. ``kernels/atlas.py`` routes its chunk step's GEMMs through it (``BMM``, the
default on CUDA from sm_80 while TF32 is off: on an H100 the Quad-Hybrid's muon_chunk ATLAS layer
went from 127.7 to 115.3 ms forward+backward in CUDA graphs with it). Tested against torch.bmm in
float64 in Triton's CPU interpreter and on CUDA (``tests/test_bmm32.py``).

``bmm_f32_group(a_list, b_list)`` (``hymba::bmm_f32_group``) runs several such products of
different shapes in one launch (up to ``GROUP_MAX``, each with its own tiles; its backward one
grouped call for every da_i and db_i): the ATLAS chunk step's products of one phase, one per memory
weight, are independent and each fills only a fraction of the GPU (``GROUP_GEMMS``; built without
a GPU, tested in the interpreter, not yet timed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._triton import next_pow2

try:  # Triton is optional: only the CUDA path uses it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = None

if triton is not None:
    from ._triton import dot_f32

    @triton.jit
    def _bmm_tile(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, g, pm, pn,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """c[g] = a[g] @ b[g] on the [BM, BN] tile (pm, pn) of batch entry g."""
        g = g.to(tl.int64)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        a_row = a_ptr + g * sab + rm[:, None] * sam
        b_col = b_ptr + g * sbb + rn[None, :] * sbn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + rk
            a = tl.load(a_row + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < K), other=0.0)
            b = tl.load(b_col + kk[:, None] * sbk, mask=(kk[:, None] < K) & (rn[None, :] < N), other=0.0)
            acc = dot_f32(a, b, acc, PREC)
        tl.store(c_ptr + g * scb + rm[:, None] * scm + rn[None, :] * scn, acc,
                 mask=(rm[:, None] < M) & (rn[None, :] < N))

    @triton.jit
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """c[g] = a[g] @ b[g] for batch entry g = program_id(0), tile (program_id(1), program_id(2))."""
        _bmm_tile(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, tl.program_id(0),
                  tl.program_id(1), tl.program_id(2), BM, BN, BK, PREC)

    @triton.jit
    def _group_tile(pid, a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, start, NM, NN,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """Program ``pid`` of a grouped launch on its problem, whose programs begin at ``start``:
        NM x NN tiles per batch entry, entries one after the other."""
        local = pid - start
        _bmm_tile(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, local // (NM * NN),
                  (local % (NM * NN)) // NN, local % NN, BM, BN, BK, PREC)

    @triton.jit
    def _bmm_group_kernel(
        a0, b0, c0, M0, N0, K0, sab0, sam0, sak0, sbb0, sbk0, sbn0, scb0, scm0, scn0, E0, NM0, NN0,
        a1, b1, c1, M1, N1, K1, sab1, sam1, sak1, sbb1, sbk1, sbn1, scb1, scm1, scn1, E1, NM1, NN1,
        a2, b2, c2, M2, N2, K2, sab2, sam2, sak2, sbb2, sbk2, sbn2, scb2, scm2, scn2, E2, NM2, NN2,
        a3, b3, c3, M3, N3, K3, sab3, sam3, sak3, sbb3, sbk3, sbn3, scb3, scm3, scn3, E3, NM3, NN3,
        a4, b4, c4, M4, N4, K4, sab4, sam4, sak4, sbb4, sbk4, sbn4, scb4, scm4, scn4, E4, NM4, NN4,
        a5, b5, c5, M5, N5, K5, sab5, sam5, sak5, sbb5, sbk5, sbn5, scb5, scm5, scn5, E5, NM5, NN5,
        BM0: tl.constexpr, BN0: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr,
        BM2: tl.constexpr, BN2: tl.constexpr, BM3: tl.constexpr, BN3: tl.constexpr,
        BM4: tl.constexpr, BN4: tl.constexpr, BM5: tl.constexpr, BN5: tl.constexpr,
        NUM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    ):
        """Up to six batched products c_i = a_i @ b_i in one launch (``bmm_group_launch``): the
        programs of problem i are those below E_i (cumulative counts) and above the previous one's;
        each problem keeps its own tile shape."""
        pid = tl.program_id(0)
        if pid < E0:
            _group_tile(pid, a0, b0, c0, M0, N0, K0, sab0, sam0, sak0, sbb0, sbk0, sbn0, scb0, scm0, scn0, 0,
                        NM0, NN0, BM0, BN0, BK, PREC)
        if NUM > 1:  # slots past NUM are not compiled
            if (pid >= E0) & (pid < E1):
                _group_tile(pid, a1, b1, c1, M1, N1, K1, sab1, sam1, sak1, sbb1, sbk1, sbn1, scb1, scm1, scn1, E0,
                            NM1, NN1, BM1, BN1, BK, PREC)
        if NUM > 2:
            if (pid >= E1) & (pid < E2):
                _group_tile(pid, a2, b2, c2, M2, N2, K2, sab2, sam2, sak2, sbb2, sbk2, sbn2, scb2, scm2, scn2, E1,
                            NM2, NN2, BM2, BN2, BK, PREC)
        if NUM > 3:
            if (pid >= E2) & (pid < E3):
                _group_tile(pid, a3, b3, c3, M3, N3, K3, sab3, sam3, sak3, sbb3, sbk3, sbn3, scb3, scm3, scn3, E2,
                            NM3, NN3, BM3, BN3, BK, PREC)
        if NUM > 4:
            if (pid >= E3) & (pid < E4):
                _group_tile(pid, a4, b4, c4, M4, N4, K4, sab4, sam4, sak4, sbb4, sbk4, sbn4, scb4, scm4, scn4, E3,
                            NM4, NN4, BM4, BN4, BK, PREC)
        if NUM > 5:
            if pid >= E4:
                _group_tile(pid, a5, b5, c5, M5, N5, K5, sab5, sam5, sak5, sbb5, sbk5, sbn5, scb5, scm5, scn5, E4,
                            NM5, NN5, BM5, BN5, BK, PREC)


#: the kernel's matmul precision (a ``_triton.dot_f32`` precision; "tf32x3_split" keeps float32
#: accuracy, the others are for comparison)
PRECISION = "tf32x3_split"


def _tile(n: int) -> int:
    return min(64, max(16, next_pow2(n)))


def bmm_launch(a: Tensor, b: Tensor, precision: str | None = None) -> Tensor:
    """a [G, M, K] @ b [G, K, N] -> [G, M, N] (contiguous), float32 CUDA tensors of any strides,
    through the Triton kernel."""
    G, M, K = a.shape
    N = b.shape[-1]
    c = torch.empty(G, M, N, device=a.device, dtype=torch.float32)
    if G == 0 or M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    BM, BN = _tile(M), _tile(N)
    BK = 32 if K > 16 else 16
    grid = (G, triton.cdiv(M, BM), triton.cdiv(N, BN))
    _bmm_kernel[grid](a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), BM=BM, BN=BN, BK=BK,
                      PREC=precision or PRECISION, num_warps=4)
    return c


#: problems per grouped launch (``_bmm_group_kernel``'s slots)
GROUP_MAX = 6


def bmm_group_launch(pairs: list[tuple[Tensor, Tensor]], precision: str | None = None) -> list[Tensor]:
    """``bmm_launch`` of every (a [G_i, M_i, K_i], b [G_i, K_i, N_i]) pair, up to ``GROUP_MAX``
    problems in one launch (each problem its own tile shape, a program per tile as there): the
    products of one phase of the ATLAS chunk step (one per memory weight), which are independent
    and too small to fill the GPU one by one."""
    outs = [torch.empty(a.shape[0], a.shape[1], b.shape[2], device=a.device, dtype=torch.float32) for a, b in pairs]
    live = [(a, b, c) for (a, b), c in zip(pairs, outs) if c.numel()]
    for a, _b, c in live:
        if a.shape[2] == 0:
            c.zero_()
    live = [(a, b, c) for a, b, c in live if a.shape[2]]
    for i in range(0, len(live), GROUP_MAX):
        chunk = live[i : i + GROUP_MAX]
        args, tiles, end = [], [], 0
        for a, b, c in chunk:
            G, M, K = a.shape
            N = b.shape[-1]
            BM, BN = _tile(M), _tile(N)
            NM, NN = triton.cdiv(M, BM), triton.cdiv(N, BN)
            end += G * NM * NN
            args += [a, b, c, M, N, K, *a.stride(), *b.stride(), *c.stride(), end, NM, NN]
            tiles += [BM, BN]
        pad = GROUP_MAX - len(chunk)  # unused slots: the first problem again, never reached (NUM)
        args += args[:18] * pad
        tiles += tiles[:2] * pad
        BK = 32 if max(a.shape[2] for a, _, _ in chunk) > 16 else 16
        _bmm_group_kernel[(end,)](*args, *tiles, NUM=len(chunk), BK=BK, PREC=precision or PRECISION, num_warps=4)
    return outs


def _applies(a: Tensor, b: Tensor) -> bool:
    return triton is not None and a.is_cuda and a.dtype == b.dtype == torch.float32


@torch.library.custom_op("hymba::bmm_f32", mutates_args=())
def bmm_f32(a: Tensor, b: Tensor) -> Tensor:
    """``torch.bmm(a, b)`` for float32 CUDA tensors by the 3xTF32 Triton kernel; elsewhere
    ``torch.bmm`` itself."""
    if _applies(a, b):
        return bmm_launch(a, b)
    return torch.bmm(a, b)


@bmm_f32.register_fake
def _(a: Tensor, b: Tensor) -> Tensor:
    return a.new_empty(a.shape[0], a.shape[1], b.shape[2])


def _setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs)


def _backward(ctx, g):  # noqa: ANN001, ANN202
    a, b = ctx.saved_tensors
    da = bmm_f32(g, b.mT) if ctx.needs_input_grad[0] else None
    db = bmm_f32(a.mT, g) if ctx.needs_input_grad[1] else None
    return da, db


bmm_f32.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("hymba::bmm_f32_group", mutates_args=())
def bmm_f32_group(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """``[torch.bmm(x, y) for x, y in zip(a, b)]`` for float32 CUDA tensors in one launch per
    ``GROUP_MAX`` products (``bmm_group_launch``); elsewhere ``torch.bmm`` each."""
    if all(_applies(x, y) for x, y in zip(a, b)):
        return bmm_group_launch(list(zip(a, b)))
    return [torch.bmm(x, y) for x, y in zip(a, b)]


@bmm_f32_group.register_fake
def _(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    return [x.new_empty(x.shape[0], x.shape[1], y.shape[2]) for x, y in zip(a, b)]


def _group_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.n = len(inputs[0])
    ctx.save_for_backward(*inputs[0], *inputs[1])


def _group_backward(ctx, gs):  # noqa: ANN001, ANN202
    a, b = ctx.saved_tensors[: ctx.n], ctx.saved_tensors[ctx.n :]
    gs = [g if g is not None else x.new_zeros(x.shape[0], x.shape[1], y.shape[2]) for g, x, y in zip(gs, a, b)]
    d = bmm_f32_group([*gs, *(x.mT for x in a)], [*(y.mT for y in b), *gs])  # da_i = g_i b_iᵀ, db_i = a_iᵀ g_i
    return d[: ctx.n], d[ctx.n :]


bmm_f32_group.register_autograd(_group_backward, setup_context=_group_setup)
