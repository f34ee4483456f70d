"""Batched float32 matmul on tensor cores at float32 accuracy (3xTF32), for small problems.

Each product is three TF32 tensor-core products of split operands (``_triton.dot_f32``
"tf32x3_split": ``x = xh + xl``, ``x y ~ xl yh + xh yl + xh yh``; the split of NVIDIA's
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
    def _bmm_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """c[g] = a[g] @ b[g] for batch entry g = program_id(0), tile (program_id(1), program_id(2))."""
        g = tl.program_id(0).to(tl.int64)
        rm = tl.program_id(1) * BM + tl.arange(0, BM)
        rn = tl.program_id(2) * BN + tl.arange(0, BN)
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
