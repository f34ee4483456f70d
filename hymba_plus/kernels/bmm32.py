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
weight, are independent and each fills only a fraction of the GPU (``GROUP_GEMMS``: the quad-shape
muon_chunk layer 102.0 -> 92.3 ms forward+backward in CUDA graphs, H100, 2026-12-05).

Split-K (``split_plan``; the op's ``split_k``, off by default; the ATLAS step's ``SPLIT_K``, on): a problem
whose few output tiles each take a long K loop (a Gram matrix or the memory MLP's first layer at the
Quad-Hybrid's shape: 560 feature columns into one tile per memory row) runs its K range over several
programs per tile; each writes its partial tile to a workspace and counts itself in on the tile's
counter, and the last adds the partials in split order (deterministic whichever program is last)
and resets the counter: one launch, no atomics on the data (CUTLASS's serial split-K semaphore).
Tested in the interpreter (forced splits, bit-identical twice, counters back to zero), compiled for
sm_90a, and on an H100 (2026-12-06, ``gpu_suite.sh atlas_splitk_tests``: the grouped op both ways, the
ATLAS fast path with splits against float64); the quad-shape muon_chunk layer in CUDA graphs 68.9 ->
67.7 ms forward+backward with it (``gpu_suite.sh atlas_splitk``).
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
    def _bmm_acc(a_ptr, b_ptr, K, sab, sam, sak, sbb, sbk, sbn, g, rm, rn, M, N, k_lo, k_hi,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """a[g, rm, k_lo:k_hi] @ b[g, k_lo:k_hi, rn] as a float32 [BM, BN] tile."""
        rk = tl.arange(0, BK)
        a_row = a_ptr + g * sab + rm[:, None] * sam
        b_col = b_ptr + g * sbb + rn[None, :] * sbn
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(k_lo, k_hi, BK):
            kk = k0 + rk
            a = tl.load(a_row + kk[None, :] * sak, mask=(rm[:, None] < M) & (kk[None, :] < k_hi), other=0.0)
            b = tl.load(b_col + kk[:, None] * sbk, mask=(kk[:, None] < k_hi) & (rn[None, :] < N), other=0.0)
            acc = dot_f32(a, b, acc, PREC)
        return acc

    @triton.jit
    def _bmm_tile(a_ptr, b_ptr, c_ptr, M, N, K, sab, sam, sak, sbb, sbk, sbn, scb, scm, scn, g, pm, pn,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """c[g] = a[g] @ b[g] on the [BM, BN] tile (pm, pn) of batch entry g."""
        g = g.to(tl.int64)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        acc = _bmm_acc(a_ptr, b_ptr, K, sab, sam, sak, sbb, sbk, sbn, g, rm, rn, M, N, 0, K, BM, BN, BK, PREC)
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
                    SK, KS, WO, CO, ws_ptr, cnt_ptr,
                    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """Program ``pid`` of a grouped launch on its problem, whose programs begin at ``start``:
        NM x NN tiles per batch entry, entries one after the other, SK programs per tile, each over
        KS of the K columns (split-K). With SK > 1 each program writes its partial tile to the
        workspace (tile t's SK partials from element ``WO + t * SK * BM * BN``), then counts itself in on the
        tile's counter (``CO + t``); the last of the tile's SK programs adds the partials in split
        order (the same sum whichever program comes last) into c and resets the counter for the next
        launch (the serial split-K fix-up of CUTLASS's semaphore: a CTA barrier, then one gpu-scope
        acquire-release atomic)."""
        local = pid - start
        tile = local // SK
        s = local % SK
        g = (tile // (NM * NN)).to(tl.int64)
        pm = (tile % (NM * NN)) // NN
        pn = tile % NN
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        k_lo = s * KS
        acc = _bmm_acc(a_ptr, b_ptr, K, sab, sam, sak, sbb, sbk, sbn, g, rm, rn, M, N, k_lo,
                       tl.minimum(k_lo + KS, K), BM, BN, BK, PREC)
        c_ptrs = c_ptr + g * scb + rm[:, None] * scm + rn[None, :] * scn
        c_mask = (rm[:, None] < M) & (rn[None, :] < N)
        if SK == 1:
            tl.store(c_ptrs, acc, mask=c_mask)
        else:
            in_tile = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
            part = ws_ptr + WO + (tile * SK).to(tl.int64) * (BM * BN) + in_tile
            tl.store(part + s * (BM * BN), acc)
            tl.debug_barrier()  # every thread's partial is written before the count
            ticket = tl.atomic_add(cnt_ptr + CO + tile, 1, sem="acq_rel", scope="gpu")
            if ticket == SK - 1:  # the tile's last program: the sum in split order
                total = tl.zeros((BM, BN), dtype=tl.float32)
                for j in range(0, SK):
                    total += tl.load(part + j * (BM * BN), cache_modifier=".cg")
                tl.store(c_ptrs, total, mask=c_mask)
                tl.atomic_xchg(cnt_ptr + CO + tile, 0)

    @triton.jit
    def _bmm_group_kernel(
        a0, b0, c0, M0, N0, K0, sab0, sam0, sak0, sbb0, sbk0, sbn0, scb0, scm0, scn0, E0, NM0, NN0, SK0, KS0, WO0, CO0,
        a1, b1, c1, M1, N1, K1, sab1, sam1, sak1, sbb1, sbk1, sbn1, scb1, scm1, scn1, E1, NM1, NN1, SK1, KS1, WO1, CO1,
        a2, b2, c2, M2, N2, K2, sab2, sam2, sak2, sbb2, sbk2, sbn2, scb2, scm2, scn2, E2, NM2, NN2, SK2, KS2, WO2, CO2,
        a3, b3, c3, M3, N3, K3, sab3, sam3, sak3, sbb3, sbk3, sbn3, scb3, scm3, scn3, E3, NM3, NN3, SK3, KS3, WO3, CO3,
        a4, b4, c4, M4, N4, K4, sab4, sam4, sak4, sbb4, sbk4, sbn4, scb4, scm4, scn4, E4, NM4, NN4, SK4, KS4, WO4, CO4,
        a5, b5, c5, M5, N5, K5, sab5, sam5, sak5, sbb5, sbk5, sbn5, scb5, scm5, scn5, E5, NM5, NN5, SK5, KS5, WO5, CO5,
        ws, cnt,
        BM0: tl.constexpr, BN0: tl.constexpr, BM1: tl.constexpr, BN1: tl.constexpr,
        BM2: tl.constexpr, BN2: tl.constexpr, BM3: tl.constexpr, BN3: tl.constexpr,
        BM4: tl.constexpr, BN4: tl.constexpr, BM5: tl.constexpr, BN5: tl.constexpr,
        NUM: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr,
    ):
        """Up to six batched products c_i = a_i @ b_i in one launch (``bmm_group_launch``): the
        programs of problem i are those below E_i (cumulative counts) and above the previous one's;
        each problem keeps its own tile shape and its own split of K (``_group_tile``; ``ws`` the
        launch's workspace of partial tiles, ``cnt`` the per-tile counters, zero between launches)."""
        pid = tl.program_id(0)
        if pid < E0:
            _group_tile(pid, a0, b0, c0, M0, N0, K0, sab0, sam0, sak0, sbb0, sbk0, sbn0, scb0, scm0, scn0, 0,
                        NM0, NN0, SK0, KS0, WO0, CO0, ws, cnt, BM0, BN0, BK, PREC)
        if NUM > 1:  # slots past NUM are not compiled
            if (pid >= E0) & (pid < E1):
                _group_tile(pid, a1, b1, c1, M1, N1, K1, sab1, sam1, sak1, sbb1, sbk1, sbn1, scb1, scm1, scn1, E0,
                            NM1, NN1, SK1, KS1, WO1, CO1, ws, cnt, BM1, BN1, BK, PREC)
        if NUM > 2:
            if (pid >= E1) & (pid < E2):
                _group_tile(pid, a2, b2, c2, M2, N2, K2, sab2, sam2, sak2, sbb2, sbk2, sbn2, scb2, scm2, scn2, E1,
                            NM2, NN2, SK2, KS2, WO2, CO2, ws, cnt, BM2, BN2, BK, PREC)
        if NUM > 3:
            if (pid >= E2) & (pid < E3):
                _group_tile(pid, a3, b3, c3, M3, N3, K3, sab3, sam3, sak3, sbb3, sbk3, sbn3, scb3, scm3, scn3, E2,
                            NM3, NN3, SK3, KS3, WO3, CO3, ws, cnt, BM3, BN3, BK, PREC)
        if NUM > 4:
            if (pid >= E3) & (pid < E4):
                _group_tile(pid, a4, b4, c4, M4, N4, K4, sab4, sam4, sak4, sbb4, sbk4, sbn4, scb4, scm4, scn4, E3,
                            NM4, NN4, SK4, KS4, WO4, CO4, ws, cnt, BM4, BN4, BK, PREC)
        if NUM > 5:
            if pid >= E4:
                _group_tile(pid, a5, b5, c5, M5, N5, K5, sab5, sam5, sak5, sbb5, sbk5, sbn5, scb5, scm5, scn5, E4,
                            NM5, NN5, SK5, KS5, WO5, CO5, ws, cnt, BM5, BN5, BK, PREC)


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

#: split-K in the grouped launch: a problem with a long K loop and few output tiles is split over
#: several programs per tile (``_group_tile``), so that the launch's longest program, which sets its
#: time, is shorter. At the Quad-Hybrid's ATLAS shape the Gram matrices and the memory MLP's first
#: layer are K = 560 feature columns into one 32 x 32 or 64 x 64 tile per memory row: 32-96 programs of
#: 18 K steps each on a GPU of 132 SMs. The launch's programs may grow to ``SPLIT_K_PROGRAMS`` (None:
#: two per SM of the device; 0: never split)
SPLIT_K_PROGRAMS: int | None = None
#: a split's least K steps (``BK`` columns each) and the most splits of one tile
SPLIT_K_MIN_STEPS = 4
SPLIT_K_MAX = 8

#: the per-tile counters of split launches, per device (zero between launches: a tile's last
#: program resets its own). Shared by every stream of the device: split launches run one after
#: another (one stream: the training step, its CUDA-graph replays). Not per stream: a graph is
#: captured on ``torch.cuda.graph``'s own stream, after warm-up passes on another, and counters
#: cannot be made during a capture, so per-stream ones would leave every captured launch unsplit
_COUNTERS: dict[torch.device, Tensor] = {}
#: counters outgrown by a larger launch, kept: a CUDA graph captured before may still point at them
_RETIRED: list[Tensor] = []


def split_plan(problems: list[tuple[int, int]], budget: int) -> list[int]:
    """Splits of K for each problem of a grouped launch, given as (output tiles, K steps): the problem
    whose programs take the most K steps is split once more while the launch's programs stay within
    ``budget``, a split keeps ``SPLIT_K_MIN_STEPS`` steps and a tile ``SPLIT_K_MAX`` splits; a split
    count is then the least that gives the same steps per program (no empty splits)."""
    cdiv = lambda a, b: -(-a // b)  # noqa: E731
    sk = [1] * len(problems)
    total = sum(t for t, _ in problems)
    while problems:
        i = max(range(len(problems)), key=lambda j: cdiv(problems[j][1], sk[j]))
        tiles, steps = problems[i]
        if sk[i] + 1 > SPLIT_K_MAX or cdiv(steps, sk[i] + 1) < SPLIT_K_MIN_STEPS or total + tiles > budget:
            break
        sk[i] += 1
        total += tiles
    return [cdiv(steps, cdiv(steps, k)) if steps else 1 for k, (_, steps) in zip(sk, problems)]


def _split_budget(device: torch.device) -> int:
    if SPLIT_K_PROGRAMS is not None:
        return SPLIT_K_PROGRAMS
    if device.type != "cuda":
        return 0
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _counters(device: torch.device, n: int) -> Tensor | None:
    """At least ``n`` zeroed int32 counters on ``device`` (None: more are needed while a CUDA graph
    is being captured, where a lasting buffer cannot be made: that launch does not split)."""
    have = _COUNTERS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        if have is not None:
            _RETIRED.append(have)
        _COUNTERS[device] = have = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return have


def bmm_group_launch(pairs: list[tuple[Tensor, Tensor]], precision: str | None = None,
                     split_k: bool = False) -> list[Tensor]:
    """``bmm_launch`` of every (a [G_i, M_i, K_i], b [G_i, K_i, N_i]) pair, up to ``GROUP_MAX``
    problems in one launch (each problem its own tile shape, a program per tile as there, or several
    with split-K where ``split_k``: ``split_plan``): the products of one phase of the ATLAS
    chunk step (one per memory weight), which are independent and too small to fill the GPU one by one."""
    outs = [torch.empty(a.shape[0], a.shape[1], b.shape[2], device=a.device, dtype=torch.float32) for a, b in pairs]
    live = [(a, b, c) for (a, b), c in zip(pairs, outs) if c.numel()]
    for a, _b, c in live:
        if a.shape[2] == 0:
            c.zero_()
    live = [(a, b, c) for a, b, c in live if a.shape[2]]
    for i in range(0, len(live), GROUP_MAX):
        chunk = live[i : i + GROUP_MAX]
        BK = 32 if max(a.shape[2] for a, _, _ in chunk) > 16 else 16
        shapes = []  # per problem: tile shape, tiles per batch entry along M and N, all its tiles, K steps
        for a, b, _c in chunk:
            G, M, K = a.shape
            BM, BN = _tile(M), _tile(b.shape[-1])
            NM, NN = triton.cdiv(M, BM), triton.cdiv(b.shape[-1], BN)
            shapes.append((BM, BN, NM, NN, G * NM * NN, triton.cdiv(K, BK)))
        device = chunk[0][0].device
        sks = split_plan([(t, steps) for *_, t, steps in shapes], _split_budget(device) if split_k else 0)
        cnt = _counters(device, sum(shape[4] for shape, sk in zip(shapes, sks) if sk > 1))
        if cnt is None:  # capturing, no counters yet: no split (an int32 stand-in keeps the kernel's signature)
            sks, cnt = [1] * len(sks), torch.empty(1, device=device, dtype=torch.int32)
        # the partial tiles' workspace, a region per split problem; without a split none is read (an output stands in)
        size = sum(BM * BN * t * sk for (BM, BN, _, _, t, _), sk in zip(shapes, sks) if sk > 1)
        ws = torch.empty(size, device=device, dtype=torch.float32) if size else chunk[0][2]
        args, tiles, end, wo, co = [], [], 0, 0, 0
        for (a, b, c), (BM, BN, NM, NN, t, steps), sk in zip(chunk, shapes, sks):
            end += t * sk
            args += [a, b, c, a.shape[1], b.shape[-1], a.shape[2], *a.stride(), *b.stride(), *c.stride(), end, NM, NN,
                     sk, triton.cdiv(steps, sk) * BK, wo, co]
            tiles += [BM, BN]
            if sk > 1:
                wo, co = wo + BM * BN * t * sk, co + t
        pad = GROUP_MAX - len(chunk)  # unused slots: the first problem again, never reached (NUM)
        args += args[:22] * pad
        tiles += tiles[:2] * pad
        _bmm_group_kernel[(end,)](*args, ws, cnt, *tiles, NUM=len(chunk), BK=BK, PREC=precision or PRECISION,
                                  num_warps=4)
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
def bmm_f32_group(a: list[Tensor], b: list[Tensor], *, split_k: bool = False) -> list[Tensor]:
    """``[torch.bmm(x, y) for x, y in zip(a, b)]`` for float32 CUDA tensors in one launch per
    ``GROUP_MAX`` products (``bmm_group_launch``; ``split_k``: long-K problems split, ``split_plan``);
    elsewhere ``torch.bmm`` each."""
    if all(_applies(x, y) for x, y in zip(a, b)):
        return bmm_group_launch(list(zip(a, b)), split_k=split_k)
    return [torch.bmm(x, y) for x, y in zip(a, b)]


@bmm_f32_group.register_fake
def _(a: list[Tensor], b: list[Tensor], *, split_k: bool = False) -> list[Tensor]:
    return [x.new_empty(x.shape[0], x.shape[1], y.shape[2]) for x, y in zip(a, b)]


def _group_setup(ctx, inputs, keyword_only_inputs, output) -> None:  # noqa: ANN001
    ctx.n = len(inputs[0])
    ctx.split_k = keyword_only_inputs.get("split_k", False)
    ctx.save_for_backward(*inputs[0], *inputs[1])


def _group_backward(ctx, gs):  # noqa: ANN001, ANN202
    a, b = ctx.saved_tensors[: ctx.n], ctx.saved_tensors[ctx.n :]
    gs = [g if g is not None else x.new_zeros(x.shape[0], x.shape[1], y.shape[2]) for g, x, y in zip(gs, a, b)]
    # da_i = g_i b_iᵀ, db_i = a_iᵀ g_i
    d = bmm_f32_group([*gs, *(x.mT for x in a)], [*(y.mT for y in b), *gs], split_k=ctx.split_k)
    return d[: ctx.n], d[ctx.n :]


bmm_f32_group.register_autograd(_group_backward, setup_context=_group_setup)
