"""ATLAS neural-memory token mixer (Behrouz et al. 2025, "ATLAS: Learning to Optimally
Memorize the Context at Test Time", arXiv 2505.23735); registered as ``atlas`` / ``ATL``.

Per head ``h`` and token ``t`` (d = head_dim)::

    q, k, v = SiLU(ShortConv(x W_qkv))                     (Titans/ATLAS short conv, optional)
    q, k, v = q / ||q||, k / ||k||, v / ||v||               (L2-normalised)
    γ_t = σ(x W_γ)   η_t = softplus(x W_η)   θ_t = σ(x W_θ)   α_t = σ(x W_α)   (per head)
    phi     = polynomial feature map of degree p, learned per-degree coefficients (§3)
    loss_t  = Σ_{i=t-c+1}^{t} γ_i ||M(phi(k_i)) - v_i||²    (Omega rule, Eq. 9, window c)
    S_t     = θ_t S_{t-1} + ∇ loss_t                         (momentum)
    M_t     = α_t M_{t-1} - η_t NS5(S_t)                     (Muon inner step; "sgd": no NS5;
                                                              "muon_chunk": NS5 once per chunk,
                                                              kernels/atlas.py)
    y_t     = M(phi(q_t); W_n)                               (retrieval, chunk-start weights)
    out     = W_o · concat_h GatedRMSNorm(y_t, x W_g)

Where this differs from the paper (deliberate, for chunk-parallel training; Titans §3.2's
mini-batch test-time training): every token of chunk n takes its gradient AND retrieves at the
chunk-start weights W_n, so ``chunk_size`` is a model hyperparameter that changes the outputs, not
only a parallelism setting (with C = 1 this is the paper's per-token update, with retrieval before
token t's own write, y_t = M_{t-1}(phi(q_t)), where the paper reads M_t; with C = 16 a token cannot
retrieve what the previous 0-15 tokens wrote). The Omega rule weighs each token by one γ_i in every
window it belongs to (Eq. 9 allows a weight per window and token). phi has no constant term
(degrees 1..p with coefficients 1/sqrt(j!)), values are L2-normalised too, and the residual is a
learned, inner-updated linear path P (the feature width is not the head width).

Values are unit vectors too: a Muon step moves the memory by ``η`` whatever the size of
the error, so with unit targets ``η`` has a fixed meaning (and the output is RMS-normalised
per head anyway, so the memory's overall scale carries nothing). The initial memory is
small (``MEMORY_INIT_SCALE``) so that early writes dominate what it starts with.

The inner learning rate starts at ``inner_lr`` = 0.01 (the gate's bias; η is learned per
token after that). Because a Muon step moves the memory by ``η`` however small the momentum,
the outer gradient through the chain of inner steps is multiplied per chunk by about ``α + η
|dNS5/dS| |H|`` (H the inner loss's curvature), and with η too large that factor exceeds 1:
at initialisation the gradient norms of the Quad-Hybrid recipe's ATLAS layer (head_dim 32,
window 16, chunk 16; CPU, float32, loss ``mean(y^2)``; the qkv projection's) grew from 0.11 at T 128 to 7.7 at
T 512 with η = 0.1 (4.0e3 at T 1024; ~4e9 on an H200 at T 2048 under bf16 autocast, and a
training run overflowed), rose from 0.031 at T 1024 to 1.69 at T 4096 with η = 0.03, and
stayed flat with η = 0.01 (0.044 at T 128, 0.018 at T 1024, 0.013 at T 2048, 0.011 at T 4096;
``tests/test_atlas.py::test_gradients_do_not_grow_with_length`` checks a shorter form of this).

``M`` is a deep residual MLP (depth >= 2, ``M(x) = P x + W_L σ(... σ(W_1 x))``, paper
Eq. 32-33 in spirit) whose initial weights are learned parameters of the layer, copied per
sequence. Training is chunk-parallel (``kernels/atlas.py``: per-token gradients at the
chunk-start weights by ``torch.func``, window sums by cumulative sums, the momentum scan as
a decay matrix, NS5 batched over tokens, a closed form for the chunk's end weights). On
CUDA the dispatch takes the kernel's fast path (closed-form rank-1 gradients, one mixing
matmul per weight for window + momentum, NS5 on Gram matrices in a Triton kernel, the chunk
step under ``torch.compile``), equal to that reference.

Cache (``AtlasState``): the memory weights and momentum of every row and head (the
test-time-memorized memory), the tokens since the last chunk boundary (their keys, values
and gates), the last ``c-1`` tokens before it (the Omega window tail) and the short-conv
state. All of it has a fixed size. Chunk boundaries are counted in real tokens, so any
split of a sequence into calls gives exactly the outputs of one full forward: each call
prepends the row's buffered tokens to its new real tokens, runs the chunks, keeps the
outputs of the new tokens, lets complete chunks update the memory and buffers the rest.

Block diffusion (``core/two_stream.py``): ``boundary_forward(x, ctx, block_size, offset)``
returns the ordinary forward's output and, as one state of batch ``B*nb``, the cache a
cached run would hold at every block start ``P_j = offset + j*block_size``, for any
``block_size >= 1`` and ``offset >= 0`` (no alignment with the chunk size needed). A
cached run's state at ``P`` is the memory at the start of chunk ``P // C`` (its weights
and momentum, recorded inside the kernel's chunk loop by ``atlas_memory(snapshots=...)``), the
``P mod C`` tokens of that chunk before ``P`` as the buffer, the ``c-1`` tokens before the
chunk start as the window tail and the conv inputs before ``P``; all but the memory are
gathers from the full sequence's keys, values, gates and conv inputs.

A speculative verify chunk (``StepContext.record``) records the cached state after each of
its positions the same way, on the combined row of the cached forward (``_forward_cached``):
``HybridLM.rewind`` then gathers each row's accepted state instead of re-running.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import LayerState, StepContext
from ..core.config import spec
from ..core.registry import register
from ..kernels.atlas import atlas_memory, feature_dim, poly_features
from ..kernels.conv import causal_conv1d, conv_tails
from .norm import GatedRMSNorm

MAX_FEATURE_DIM = 4096
MEMORY_INIT_SCALE = 0.1  # initial memory weights ~ N(0, (0.1 / sqrt(fan_in))^2)


@dataclass(frozen=True)
class AtlasConfig:
    n_heads: int = spec(4, min=1)
    head_dim: int | None = spec(16, min=1, doc="None = d_model // n_heads")
    window: int = spec(4, min=1, doc="Omega-rule window c (1 = online, Titans-like)")
    poly_degree: int = spec(2, min=1, max=3, doc="degree p of the polynomial key/query features")
    memory_depth: int = spec(2, min=2, doc="layers of the memory MLP")
    memory_hidden: int = spec(2, min=1, doc="hidden width of the memory MLP, in multiples of head_dim")
    chunk_size: int = spec(16, min=1, doc="tokens per chunk of the parallel inner update: a model setting (every "
                                          "token of a chunk takes its gradient and retrieves at the chunk-start "
                                          "memory), not only a speed one")
    inner_optimizer: str = spec("muon", choices=("muon", "muon_chunk", "sgd"),
                                doc="muon: the paper's step, NS5 of every token's momentum; muon_chunk: NS5 once per "
                                    "chunk of the chunk's weighted momentum sum (a variant: chunk_size times fewer "
                                    "Newton-Schulz problems); sgd: momentum SGD, no NS5")
    ns_steps: int = spec(5, min=1, doc="Newton-Schulz steps of the Muon inner update")
    conv_size: int = spec(4, min=0, doc="short causal conv on q, k, v; 0 = off")
    inner_lr: float = spec(0.01, gt=0.0, doc="initial inner learning rate η (softplus bias); above ~0.03 the "
                           "layer's gradients grow with every chunk (module docstring)")

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def check(self, model):  # noqa: ANN001
        if self.head_dim is None and model.d_model % self.n_heads:
            yield "n_heads", f"must divide d_model ({model.d_model}) when head_dim is not given"
        fd = feature_dim(self.dim(model.d_model), self.poly_degree)
        if fd > MAX_FEATURE_DIM:
            yield "poly_degree", (f"gives {fd} features for head_dim {self.dim(model.d_model)} "
                                  f"(limit {MAX_FEATURE_DIM}); lower poly_degree or head_dim")


@dataclass
class AtlasState(LayerState):
    """Test-time memory of one ATLAS layer (every field has batch on dim 0, fixed size).

    weights / momentum: per memory matrix [B, H, out, in] (None until the first call, when
        they are copied from the layer's learned initial memory).
    buf_k, buf_v [B, H, C, d], buf_gates [B, H, C, 4] (γ, η, log θ, log α): the tokens since
        the row's last chunk boundary; ``n_buf`` [B] how many (0 .. C-1).
    tail_k, tail_v [B, H, c-1, d], tail_gamma [B, H, c-1]: the c-1 tokens before that
        boundary (the Omega window reaches into them); γ = 0 marks an empty slot.
    conv: short-conv state [B, 3·H·d, K-1] (None without a conv).
    """

    weights: list[Tensor] | None = None
    momentum: list[Tensor] | None = None
    buf_k: Tensor | None = None
    buf_v: Tensor | None = None
    buf_gates: Tensor | None = None
    n_buf: Tensor | None = None
    tail_k: Tensor | None = None
    tail_v: Tensor | None = None
    tail_gamma: Tensor | None = None
    conv: Tensor | None = None


def _gather_time(x: Tensor, idx: Tensor) -> Tensor:
    """x [B, H, S, ...], idx [B, T] -> x[b, :, idx[b, t], ...] as [B, H, T, ...]."""
    B, H = x.shape[:2]
    i = idx.view(B, 1, -1, *([1] * (x.dim() - 3))).expand(B, H, -1, *x.shape[3:])
    return x.gather(2, i)


@register("atlas", config=AtlasConfig, aliases=("ATL",))
class Atlas(nn.Module):
    #: a verify chunk records its states at every position (``_forward_cached``)
    records_states = True

    def __init__(self, cfg: AtlasConfig, *, d_model: int, **_: object):
        super().__init__()
        self.cfg = cfg
        H, d = cfg.n_heads, cfg.dim(d_model)
        self.h, self.d = H, d
        self.f = feature_dim(d, cfg.poly_degree)
        hid = cfg.memory_hidden * d
        self.qkv_proj = nn.Linear(d_model, 3 * H * d, bias=False)
        self.conv_weight = nn.Parameter(torch.empty(3 * H * d, cfg.conv_size)) if cfg.conv_size else None
        self.gate_proj = nn.Linear(d_model, 4 * H, bias=True)  # γ, η, θ, α per head
        self.g_proj = nn.Linear(d_model, H * d, bias=False)
        self.norm = GatedRMSNorm(d)
        self.o_proj = nn.Linear(H * d, d_model, bias=False)
        self.o_proj.is_residual_out = True
        self.poly_coef = nn.Parameter(torch.empty(H, cfg.poly_degree))
        # learned initial memory: P [d, F] (linear path), W_1 [hid, F], W_l [hid, hid], W_L [d, hid]
        shapes = [(d, self.f), (hid, self.f)] + [(hid, hid)] * (cfg.memory_depth - 2) + [(d, hid)]
        self.memory = nn.ParameterList(nn.Parameter(torch.empty(H, *s)) for s in shapes)
        for p in (self.poly_coef, *self.memory):  # an initial state and feature gains: no decay to 0
            p._no_weight_decay = True
        self.reset_special()

    def reset_special(self) -> None:
        cfg = self.cfg
        H = self.h
        with torch.no_grad():
            for W in self.memory:  # small: what the memory writes dominates what it starts with
                nn.init.normal_(W, 0.0, MEMORY_INIT_SCALE / math.sqrt(W.shape[-1]))
            for j in range(cfg.poly_degree):  # Taylor coefficients of exp: 1/sqrt(j!)
                self.poly_coef[:, j] = 1.0 / math.sqrt(math.factorial(j + 1))
            if self.conv_weight is not None:
                bound = 1.0 / math.sqrt(cfg.conv_size)
                nn.init.uniform_(self.conv_weight, -bound, bound)
            b = self.gate_proj.bias.view(4, H)
            b[0] = 0.0  # γ = 0.5
            b[1] = cfg.inner_lr + math.log(-math.expm1(-cfg.inner_lr))  # η = inner_lr (softplus^-1, no overflow)
            b[2] = 0.0  # θ = 0.5
            b[3] = 5.0  # α ≈ 0.993

    # ------------------------------------------------------------------ state
    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> AtlasState:
        H, d, C, c = self.h, self.d, self.cfg.chunk_size, self.cfg.window
        z = lambda *s: torch.zeros(batch_size, *s, device=device, dtype=dtype)  # noqa: E731
        conv = z(3 * H * d, self.cfg.conv_size - 1) if self.conv_weight is not None else None
        return AtlasState(
            buf_k=z(H, C, d), buf_v=z(H, C, d), buf_gates=z(H, C, 4),
            n_buf=torch.zeros(batch_size, dtype=torch.long, device=device),
            tail_k=z(H, c - 1, d), tail_v=z(H, c - 1, d), tail_gamma=z(H, c - 1), conv=conv,
        )

    def state_nbytes(self, seq_len: int, dtype: torch.dtype, *, n_meta: int = 0) -> int:
        """Bytes of one sequence's state after ``seq_len`` (+ ``n_meta``) tokens, without
        running: constant in the length (memory weights and momentum appear with the first
        token). Memory + momentum 2·H·Σ out·in, buffer H·C·(2d + 4), n_buf (int64), window
        tail H·(c-1)·(2d + 1), conv 3·H·d·(K-1); all but n_buf in ``dtype``."""
        H, d, C, c = self.h, self.d, self.cfg.chunk_size, self.cfg.window
        n = H * C * (2 * d + 4) + H * (c - 1) * (2 * d + 1)
        if self.conv_weight is not None:
            n += 3 * H * d * (self.cfg.conv_size - 1)
        if seq_len + n_meta > 0:
            n += 2 * sum(w.numel() for w in self.memory)
        return n * dtype.itemsize + torch.int64.itemsize

    # ------------------------------------------------------------------ forward
    def _project(self, x: Tensor, ctx: StepContext, state: AtlasState | None, qkv: Tensor | None = None):
        """q, k, v [B, H, T, d] and gates [B, H, T, 4]; ``qkv``: the pre-conv projection if
        the caller already has it."""
        B, T, _ = x.shape
        H, d = self.h, self.d
        qkv = self.qkv_proj(x) if qkv is None else qkv
        if self.conv_weight is not None:
            qkv, conv_state = causal_conv1d(qkv, self.conv_weight, None, state.conv if state is not None else None,
                                            ctx.lengths, activation="silu")
            if state is not None:
                state.conv = conv_state
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.view(B, T, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, d]
        q, k, v = (F.normalize(t, dim=-1, eps=1e-6) for t in (q, k, v))  # unit keys, queries and values
        z = self.gate_proj(x).view(B, T, 4, H).permute(0, 3, 1, 2)  # [B, H, T, 4]
        gates = torch.stack([torch.sigmoid(z[..., 0]), F.softplus(z[..., 1]),
                             F.logsigmoid(z[..., 2]), F.logsigmoid(z[..., 3])], dim=-1)
        return q, k, v, gates

    def _memory(self, q, k, v, gates, tail_k, tail_v, tail_g, weights, momentum, n_valid, return_state,
                snapshots=None):
        """Run the kernel on [B, H, ...] tensors (sequence starts at a chunk boundary).
        ``snapshots`` (chunk indices): return the weights / momentum at those chunk starts,
        each [len(snapshots), B, H, out, in], instead of the final ones."""
        B, H, T, d = q.shape
        cfg = self.cfg
        coef = self.poly_coef[:, None, :]  # [H, 1, p]
        qf = poly_features(q, coef).reshape(B * H, T, self.f)
        k_ext = torch.cat([tail_k, k], dim=2)
        kf = poly_features(k_ext, coef).reshape(B * H, -1, self.f)
        v_ext = torch.cat([tail_v, v], dim=2).reshape(B * H, -1, d)
        g_ext = torch.cat([tail_g, gates[..., 0]], dim=2).reshape(B * H, -1)
        flat = lambda t: t.reshape(B * H, *t.shape[2:])  # noqa: E731
        mom = None if momentum is None else [flat(m) for m in momentum]
        nv = None if n_valid is None else n_valid[:, None].expand(B, H).reshape(-1)
        args = (qf, kf, v_ext, g_ext, flat(gates[..., 1]), flat(gates[..., 2]), flat(gates[..., 3]),
                [flat(w) for w in weights], mom)
        kw = dict(chunk_size=cfg.chunk_size, window=cfg.window, ns_steps=cfg.ns_steps,
                  muon=cfg.inner_optimizer != "sgd", ns_chunk=cfg.inner_optimizer == "muon_chunk")
        if snapshots is not None:
            y, W, S = atlas_memory(*args, n_valid=nv, snapshots=snapshots, **kw)
            U = len(snapshots)
            return (y.view(B, H, T, d), [w.view(U, B, H, *w.shape[2:]) for w in W],
                    [s.view(U, B, H, *s.shape[2:]) for s in S])
        y, W, S = atlas_memory(*args, n_valid=nv, return_state=return_state, **kw)
        y = y.view(B, H, T, d)
        if not return_state:
            return y, None, None
        return y, [w.view(B, H, *w.shape[1:]) for w in W], [s.view(B, H, *s.shape[1:]) for s in S]

    def _initial_weights(self, B: int) -> list[Tensor]:
        return [w[None].expand(B, *w.shape) for w in self.memory]

    def forward(self, x: Tensor, ctx: StepContext, state: AtlasState | None = None) -> Tensor:
        record = ctx.record and state is not None
        qkv = tails = None
        if record and self.conv_weight is not None:  # the conv tails after each token, from the cache's
            qkv = self.qkv_proj(x)
            tails = conv_tails(qkv, torch.arange(x.shape[1] + 1, device=x.device), self.cfg.conv_size - 1,
                               state.conv)
        q, k, v, gates = self._project(x, ctx, state, qkv=qkv)
        if state is None:
            y = self._forward_full(q, k, v, gates, ctx.lengths)
        else:
            y = self._forward_cached(q, k, v, gates, ctx.lengths, state, record=record, tails=tails)
        return self._output(y, x)

    def _output(self, y: Tensor, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        H, d = self.h, self.d
        o = self.norm(y.transpose(1, 2), self.g_proj(x).view(B, T, H, d)).reshape(B, T, H * d)
        return self.o_proj(o)

    def boundary_forward(self, x: Tensor, ctx: StepContext, block_size: int, offset: int) -> tuple[Tensor, AtlasState]:
        """Block diffusion (``core/two_stream.py``): ``self(x, ctx, None)`` plus the cached
        state at every block start ``P_j = offset + j*block_size`` (j < nb), as ONE state of
        batch ``B*nb`` whose row ``b*nb + j`` is what a cached run (``init_state`` then a
        forward of ``x[b, :P_j]``, in one call or any split) leaves for row ``b``.

        Supports any ``block_size >= 1`` and ``offset >= 0`` with ``T = offset + nb*block_size``
        (``nb >= 1``) and no padding (``ctx.lengths is None``); block starts need not be
        chunk-aligned. Row j's memory weights / momentum are those at the start of chunk
        ``P_j // C``, recorded inside the kernel's chunk loop; its buffer holds the
        ``P_j mod C`` tokens since that chunk start, its window tail the ``c-1`` tokens
        before it (empty slots zero, γ = 0), its conv state the ``K-1`` conv inputs before
        ``P_j``. A block start at 0 gets the layer's initial memory and zero momentum (a
        cached run that has seen nothing keeps ``weights = momentum = None``, which means
        exactly that). Everything is differentiable (the states carry gradients)."""
        if ctx.lengths is not None:
            raise ValueError("Atlas.boundary_forward: padded input (ctx.lengths) is not supported")
        B, T, _ = x.shape
        if block_size < 1 or offset < 0 or T <= offset or (T - offset) % block_size:
            raise ValueError(f"Atlas.boundary_forward: T ({T}) must be offset ({offset}) + nb*block_size "
                             f"({block_size}) with nb >= 1")
        nb = (T - offset) // block_size
        H, d, C, c = self.h, self.d, self.cfg.chunk_size, self.cfg.window
        dev = x.device
        qkv_in = self.qkv_proj(x)
        q, k, v, gates = self._project(x, ctx, None, qkv=qkv_in)
        starts = offset + block_size * torch.arange(nb, device=dev)  # [nb] block starts P_j
        chunk = starts // C  # the chunk each block start falls in (its start when aligned)
        uniq, which = torch.unique(chunk, return_inverse=True)  # distinct chunks, block -> one of them
        zk = q.new_zeros(B, H, c - 1, d)
        y, W, S = self._memory(q, k, v, gates, zk, zk, q.new_zeros(B, H, c - 1), self._initial_weights(B), None,
                               None, return_state=False, snapshots=uniq.tolist())

        def per_block(t: Tensor) -> Tensor:  # [B, H, nb, ...] -> [B*nb, H, ...]
            return t.transpose(1, 2).reshape(B * nb, H, *t.shape[3:])

        def at_blocks(w: Tensor) -> Tensor:  # [U, B, H, ...] snapshots -> [B*nb, H, ...]
            return w.index_select(0, which).transpose(0, 1).reshape(B * nb, *w.shape[2:])

        c0 = chunk * C  # last chunk start at or before P_j
        n_buf = starts - c0  # [nb] buffered tokens (0 .. C-1)
        j = torch.arange(C, device=dev)
        bidx = (c0[:, None] + j).clamp(max=T - 1)  # [nb, C]
        keep = (j[None] < n_buf[:, None])[None, None, :, :, None]  # [1, 1, nb, C, 1]
        buf = lambda t: per_block(t[:, :, bidx] * keep)  # noqa: E731 - [B, H, T, e] -> [B*nb, H, C, e]
        tidx = c0[:, None] + torch.arange(c - 1, device=dev)  # [nb, c-1] into [zeros(c-1), sequence]
        tail = lambda t: per_block(torch.cat([t.new_zeros(*t.shape[:2], c - 1, *t.shape[3:]), t], 2)[:, :, tidx])  # noqa: E731
        conv = None
        if self.conv_weight is not None:
            conv = conv_tails(qkv_in, starts, self.cfg.conv_size - 1)
        state = AtlasState(
            weights=[at_blocks(w) for w in W], momentum=[at_blocks(s) for s in S],
            buf_k=buf(k), buf_v=buf(v), buf_gates=buf(gates), n_buf=n_buf.repeat(B),
            tail_k=tail(k), tail_v=tail(v), tail_gamma=tail(gates[..., 0]), conv=conv,
        )
        return self._output(y, x), state

    def _forward_full(self, q, k, v, gates, lengths):
        B, H, T, d = q.shape
        c = self.cfg.window
        if lengths is not None:  # inert slots never write into the memory
            real = (torch.arange(T, device=q.device)[None] < lengths[:, None])[:, None, :, None]
            gates = gates * real
        tail_k = q.new_zeros(B, H, c - 1, d)
        tail_g = q.new_zeros(B, H, c - 1)
        y, _, _ = self._memory(q, k, v, gates, tail_k, tail_k, tail_g, self._initial_weights(B), None,
                               None, return_state=False)
        return y

    def _forward_cached(self, q, k, v, gates, lengths, st: AtlasState, record: bool = False,
                        tails: Tensor | None = None):
        """The cached forward (module docstring). ``record`` (a speculative verify chunk,
        ``StepContext.record``): also leaves in ``st`` its state after each ``p = 0 .. T`` of
        the chunk's tokens (``LayerState.record_rows``): the memory and momentum at the start of
        the chunk ``(n_buf + p) // C`` of the combined row (every chunk start's, and the end's,
        from one kernel pass, ``atlas_memory(snapshots=...)``), the buffer and window tail as
        gathers of the combined row, ``tails`` the conv tails. Memory ``T + 1`` states (the
        memory weights included)."""
        B, H, T, d = q.shape
        C, c = self.cfg.chunk_size, self.cfg.window
        dev = q.device
        nb = st.n_buf
        L = lengths.to(dev) if lengths is not None else torch.full((B,), T, dtype=torch.long, device=dev)
        n_tot = nb + L  # real tokens since the row's last chunk boundary, this call's included
        Tc = int(n_tot.max().item()) if B else 0
        if Tc == 0:
            if record:  # no row took a token: every position's state is this one (the conv's too)
                st.record(lambda state, keep, kmax: None)
            return q.new_zeros(B, H, T, d)
        # combined row = [buffered tokens, new real tokens, inert]; it starts at a chunk boundary
        s = torch.arange(Tc, device=dev)[None]
        idx = torch.where(s < nb[:, None], s, C + s - nb[:, None]).clamp(max=C + T - 1)
        comb = lambda buf, new: _gather_time(torch.cat([buf.to(new.dtype), new], dim=2), idx)  # noqa: E731
        real = (s < n_tot[:, None])[:, None, :, None]  # [B, 1, Tc, 1]
        k_c, v_c = comb(st.buf_k, k), comb(st.buf_v, v)
        g_c = comb(st.buf_gates, gates) * real
        q_c = comb(q.new_zeros(B, H, C, d), q)
        # (a copy of the initial memory: a call that completes no chunk carried views of the parameters into
        # the cache at batch 1, which an in-place optimizer step would then change under a live cache)
        weights = st.weights if st.weights is not None else [w.clone() for w in self._initial_weights(B)]
        if record:
            n_chunks = -(-Tc // C)
            y_c, W_at, S_at = self._memory(q_c, k_c, v_c, g_c, st.tail_k, st.tail_v, st.tail_gamma, weights,
                                           st.momentum, n_tot, return_state=True,
                                           snapshots=list(range(n_chunks + 1)))
            W, S = [w[-1] for w in W_at], [m[-1] for m in S_at]  # the end state: after every complete chunk
            self._record(st, k_c, v_c, g_c, W_at, S_at, nb, L, tails, T)
        else:
            y_c, W, S = self._memory(q_c, k_c, v_c, g_c, st.tail_k, st.tail_v, st.tail_gamma, weights,
                                     st.momentum, n_tot, return_state=True)
        # outputs of this call's tokens: combined slot n_buf + t
        out_idx = (nb[:, None] + torch.arange(T, device=dev)[None]).clamp(max=Tc - 1)
        y = _gather_time(y_c, out_idx)
        # carry forward: memory, momentum, the new partial chunk and the window tail
        start = (n_tot // C) * C
        n_new = n_tot - start
        j = torch.arange(C, device=dev)[None]
        bidx = (start[:, None] + j).clamp(max=Tc - 1)
        keep = (j < n_new[:, None])[:, None, :, None]
        st.buf_k = _gather_time(k_c, bidx) * keep
        st.buf_v = _gather_time(v_c, bidx) * keep
        st.buf_gates = _gather_time(g_c, bidx) * keep
        if c > 1:  # ext = [tail, combined]; the new tail is ext[start : start + c - 1]
            tidx = start[:, None] + torch.arange(c - 1, device=dev)[None]
            st.tail_k = _gather_time(torch.cat([st.tail_k, k_c], dim=2), tidx)
            st.tail_v = _gather_time(torch.cat([st.tail_v, v_c], dim=2), tidx)
            st.tail_gamma = _gather_time(torch.cat([st.tail_gamma, g_c[..., 0]], dim=2), tidx)
        st.n_buf = n_new
        st.weights, st.momentum = W, S
        return y

    def _record(self, st: AtlasState, k_c: Tensor, v_c: Tensor, g_c: Tensor, W_at: list[Tensor],
                S_at: list[Tensor], nb: Tensor, L: Tensor, tails: Tensor | None, T: int) -> None:
        """``_forward_cached``'s recording (before ``st`` advances): the state after ``p`` of the
        chunk's tokens for every ``p = 0 .. T`` as a state of batch ``B*(T+1)``; counts past a
        row's real tokens repeat its state after them (never committed)."""
        B, H, Tc = k_c.shape[0], k_c.shape[1], k_c.shape[2]
        C, c = self.cfg.chunk_size, self.cfg.window
        dev = k_c.device
        P = T + 1
        n_p = nb[:, None] + torch.minimum(torch.arange(P, device=dev)[None], L[:, None])  # [B, P] combined tokens
        start = (n_p // C) * C  # the chunk start at or before each
        j = torch.arange(C, device=dev)
        bidx = (start[..., None] + j).clamp(max=Tc - 1).reshape(B, P * C)
        keep = (j < (n_p - start)[..., None]).reshape(B, 1, P * C, 1)

        def rows(t: Tensor) -> Tensor:  # [B, H, P, ...] -> [B*P, H, ...]
            return t.transpose(1, 2).reshape(B * P, H, *t.shape[3:])

        def buf(t: Tensor) -> Tensor:
            return rows((_gather_time(t, bidx) * keep).view(B, H, P, C, t.shape[-1]))

        rec = AtlasState(buf_k=buf(k_c), buf_v=buf(v_c), buf_gates=buf(g_c), n_buf=(n_p - start).reshape(-1),
                         tail_k=st.tail_k, tail_v=st.tail_v, tail_gamma=st.tail_gamma, conv=tails)
        if c > 1:  # ext = [tail, combined]; the tail of a chunk starting at s is ext[s : s + c - 1]
            tidx = (start[..., None] + torch.arange(c - 1, device=dev)).reshape(B, P * (c - 1))

            def tail(old: Tensor, new: Tensor) -> Tensor:
                t = _gather_time(torch.cat([old, new], dim=2), tidx)
                return rows(t.view(B, H, P, c - 1, *t.shape[3:]))

            rec.tail_k, rec.tail_v = tail(st.tail_k, k_c), tail(st.tail_v, v_c)
            rec.tail_gamma = tail(st.tail_gamma, g_c[..., 0])
        else:
            rec.tail_k, rec.tail_v, rec.tail_gamma = (t.repeat_interleave(P, 0)
                                                      for t in (st.tail_k, st.tail_v, st.tail_gamma))
        # weights at the start of chunk n_p // C: snapshot [U, B, H, out, in] -> [B*P, H, out, in]
        chunk = (n_p // C).T  # [P, B]
        b = torch.arange(B, device=dev)[None]
        at = lambda w: w[chunk, b].transpose(0, 1).reshape(B * P, *w.shape[2:])  # noqa: E731
        rec.weights, rec.momentum = [at(w) for w in W_at], [at(m) for m in S_at]
        st.record_rows(rec, T)
