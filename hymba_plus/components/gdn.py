"""Gated DeltaNet token mixer (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving
Mamba2 with Delta Rule", arXiv 2412.06464; the linear-attention layer of Qwen3-Next).

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))
    q, k    = q / ||q||_2, k / ||k||_2                                  (per head)
    beta_t  = sigmoid(x_t W_b)                                          (write strength)
    g_t     = -exp(A_log) * softplus(x_t W_a + dt_bias)                 (log decay a_t = e^{g_t}, Mamba2-style)
    S_t     = e^{g_t} S_{t-1} + beta_t k_t (v_t - e^{g_t} S_{t-1}^T k_t)^T     (gated delta rule, GDN §3)
    o_t     = dk^{-1/2} S_t^T q_t
    y       = W_o ( RMSNorm(o_t) * SiLU(x_t W_z) )                      (gated RMSNorm per head; scale 1 + w,
                                                                         or w with norm_zero_centered: false)

The chunkwise-parallel form (WY representation + UT transform, arXiv 2406.06484) and the
fla fast path live in ``kernels.gdn``; the short conv and its cache in ``kernels.conv``.
One ``qkv_proj`` [W_q | W_k | W_v] and one conv weight over the q|k|v channels hold the
parameters (the checkpoint layout HF import / export use). The reference path projects and
convolves all channels at once and views q, k, v in the result; when fla runs the kernel,
``GatedDeltaNet.qkv`` computes q, k, v as three separate contiguous tensors from row blocks of
those weights instead (same numbers), since fla copies non-contiguous inputs.

A decode step (one token with a cache, no padding) is bound by its kernel count; on CUDA it
takes three fast paths where their probes passed: the short conv's update as one Triton kernel
(``kernels.conv``, ``conv_update``), the gates computed inside fla's fused recurrent kernel from
the raw ``x W_a`` / ``x W_b`` (``kernels.gdn.gated_delta_rule_decode``, ``gdn_gates``; 16-bit
only, as fla's path) and the gated RMSNorm as one Triton kernel (``kernels.norm``,
``gated_rms_norm``; whenever no gradient is needed). On the decode engine's static state
(``GDNState.static``, set by ``static_copy``) the recurrence is instead our own kernel
(``kernels.gdn.gated_delta_rule_decode_``, ``gdn_decode``; float16 / bfloat16 / float32, padded
steps too): the gates, the q/k l2norm and the gated delta rule step in one launch reading q, k, v
where the conv left them, and the new S written into the engine's buffer in place (fla writes a
new state the engine copies back). Dynamic states are never written: their tensors are
replaced, so a fork (speculative decoding, block diffusion) stays isolated.

Heads: ``n_heads`` query/key heads of ``head_dim`` and ``n_v_heads`` (a multiple of
``n_heads``) value heads of ``head_dim * expand_v`` (grouped value heads, as Qwen3-Next).
``delta_rule: false`` is the decay-only ablation ``S_t = e^{g_t} S_{t-1} + beta_t k_t v_t^T``
(gated linear attention with a write gate: no erase term).

State (``GDNState``): the conv tail ``[B, C_qkv, K-1]`` and the matrix memory
``S [B, Hv, dk, dv]`` (float32) — constant size, whatever the length — and ``static`` (the
decode engine's buffers: S may be written in place). Inert (padding)
slots get ``beta = 0`` and ``g = 0``, which leave ``S`` exactly unchanged, and the conv
keeps only real inputs, so a padded row advances by exactly its real tokens.

Block diffusion (``core.two_stream``): ``boundary_forward(x, ctx, block_size, offset)`` is
the ordinary forward plus the cache state at every block start ``offset + j*block_size``, as
one ``GDNState`` of batch ``B*nb``, in one kernel pass: S from the chunked reference's chunk
start states advanced inside their chunk (``states_at`` in ``kernels.gdn``), the conv tails
from ``conv_tails``. ``boundary_inner`` is the same before ``out_proj`` (for hymba).

A speculative verify chunk (``StepContext.record``) records the state after each of its
positions the same way, continuing from the cache's S and conv tail (``_inner_recorded``):
``HybridLM.rewind`` then gathers each row's accepted state instead of re-running.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import LayerState, StepContext
from ..core.config import spec
from ..core.registry import register
from ..kernels.conv import causal_conv1d, conv_tails
from ..kernels.dispatch import autocast_dtype, compute_dtype
from ..kernels.gdn import (
    decode_gates_selected,
    decode_in_place_ok,
    fla_selected,
    gated_delta_rule,
    gated_delta_rule_decode,
    gated_delta_rule_decode_,
    gdn_gates,
)
from ..kernels.linear import plain, project
from .norm import GatedRMSNorm


@dataclass(frozen=True)
class GatedDeltaNetConfig:
    n_heads: int = spec(4, min=1, doc="query/key heads")
    head_dim: int | None = spec(None, min=1, doc="query/key head dim (None: d_model // n_heads)")
    n_v_heads: int | None = spec(None, min=1, doc="value heads, a multiple of n_heads (None: n_heads)")
    expand_v: float = spec(1.0, gt=0, doc="value head dim = head_dim * expand_v")
    use_short_conv: bool = True
    conv_size: int = spec(4, min=2, doc="short causal conv width")
    chunk_size: int = spec(64, min=1, doc="chunk length of the chunkwise reference")
    delta_rule: bool = spec(True, doc="false: decay-only ablation (no erase term)")
    norm_eps: float = spec(1e-6, gt=0)
    norm_zero_centered: bool | None = spec(None, doc="gated output norm scale: true (default when unset) stores w "
                                                     "and scales by 1 + w (weight decay pulls the scale to 1); false "
                                                     "scales by w, initialised to 1 (HF Qwen3-Next)")

    def v_heads(self) -> int:
        return self.n_v_heads or self.n_heads

    def key_dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def value_dim(self, d_model: int) -> int:
        return int(round(self.key_dim(d_model) * self.expand_v))

    def inner_dim(self, d_model: int) -> int:
        """Width of ``GatedDeltaNet.inner``'s output (all value heads)."""
        return self.v_heads() * self.value_dim(d_model)

    def check(self, model):  # noqa: ANN001
        if self.v_heads() % self.n_heads:
            yield "n_v_heads", f"must be a multiple of n_heads ({self.n_heads}), got {self.v_heads()}"
        if self.head_dim is None and model.d_model % self.n_heads:
            yield "n_heads", f"must divide d_model ({model.d_model}) when head_dim is not given"
        dk = self.key_dim(model.d_model)
        dv = dk * self.expand_v
        if dk < 1 or abs(dv - round(dv)) > 1e-9 or round(dv) < 1:
            yield "expand_v", f"head_dim ({dk}) * expand_v ({self.expand_v:g}) must be a positive integer"


@dataclass
class GDNState(LayerState):
    """conv: last K-1 pre-conv q|k|v inputs [B, C, K-1] (None without short conv);
    S: the delta-rule memory [B, Hv, dk, dv] (float32).

    Static form (the decode engine, ``static_copy``): ``static`` is True, the tensors are
    buffers of the state's own, and a one-token step may write S in place
    (``kernels.gdn.gated_delta_rule_decode_``: ``S`` stays the same tensor, so the engine's
    ``load_`` has nothing to copy back). ``fork`` keeps the flag (the engine's binding is a fork
    of the buffers); every other state (``static`` False) has its tensors replaced, never
    written, as the cache protocol requires (a fork of a dynamic cache stays isolated)."""

    conv: Tensor | None = None
    S: Tensor | None = None
    static: bool = field(default=False, metadata={"form": True})

    def static_copy(self, capacity: int) -> "GDNState":
        st = super().static_copy(capacity)
        st.static = True
        return st


@register("gdn", config=GatedDeltaNetConfig, aliases=("GD",))
class GatedDeltaNet(nn.Module):
    #: a verify chunk records its states at every position (``_inner_recorded``)
    records_states = True

    def __init__(self, cfg: GatedDeltaNetConfig, *, d_model: int, **_: object):
        super().__init__()
        self.cfg = cfg
        self.h, self.hv = cfg.n_heads, cfg.v_heads()
        self.dk, self.dv = cfg.key_dim(d_model), cfg.value_dim(d_model)
        self.key_size, self.value_size = self.h * self.dk, self.hv * self.dv
        self.qkv_size = 2 * self.key_size + self.value_size
        self.qkv_proj = nn.Linear(d_model, self.qkv_size, bias=False)  # W_q | W_k | W_v
        self.a_proj = nn.Linear(d_model, self.hv, bias=False)  # decay input
        self.b_proj = nn.Linear(d_model, self.hv, bias=False)  # beta input
        self.z_proj = nn.Linear(d_model, self.value_size, bias=False)  # output gate
        self.out_proj = nn.Linear(self.value_size, d_model, bias=False)
        self.out_proj.is_residual_out = True
        self.A_log = nn.Parameter(torch.empty(self.hv))
        self.dt_bias = nn.Parameter(torch.empty(self.hv))
        self.A_log._no_weight_decay = True
        self.dt_bias._no_weight_decay = True
        # depthwise conv over the q|k|v channels, weight [C, K] (last column = current token)
        self.conv_weight = (nn.Parameter(torch.empty(self.qkv_size, cfg.conv_size))
                            if cfg.use_short_conv else None)
        self.norm = GatedRMSNorm(self.dv, eps=cfg.norm_eps, zero_centered=cfg.norm_zero_centered is not False)
        self.reset_special()

    def reset_special(self) -> None:
        """A_log = log U(0.01, 16) (fla's GatedDeltaNet draws U(0, 16), HF Qwen3-Next U(0.01, 16):
        heads with A < 1 forget slowest; Mamba2's range starts at 1); dt_bias = softplus^{-1}(dt),
        dt log-uniform in [1e-3, 1e-1] (fla / Mamba2); conv weight like nn.Conv1d (U(+-1/sqrt(K)))."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16.0).log())
            lo, hi = math.log(1e-3), math.log(1e-1)
            dt = torch.exp(torch.rand_like(self.dt_bias) * (hi - lo) + lo).clamp_min(1e-4)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            if self.conv_weight is not None:
                bound = 1.0 / math.sqrt(self.cfg.conv_size)
                self.conv_weight.uniform_(-bound, bound)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> GDNState:
        sdt = compute_dtype(dtype)
        conv = (torch.zeros(batch_size, self.qkv_size, self.cfg.conv_size - 1, device=device, dtype=dtype)
                if self.conv_weight is not None else None)
        S = torch.zeros(batch_size, self.hv, self.dk, self.dv, device=device, dtype=sdt)
        return GDNState(conv=conv, S=S)

    def state_nbytes(self, seq_len: int, dtype: torch.dtype = torch.float32, *, n_meta: int = 0) -> int:
        """Bytes of one sequence's state at any length (what ``init_state`` allocates): the conv
        tail [C, K-1] in ``dtype`` and S [Hv, dk, dv] in float32 (float64 for a float64 model)."""
        s_elt = 8 if dtype == torch.float64 else 4
        conv = self.qkv_size * (self.cfg.conv_size - 1) * dtype.itemsize if self.conv_weight is not None else 0
        return conv + self.hv * self.dk * self.dv * s_elt

    def forward(self, x: Tensor, ctx: StepContext, state: GDNState | None = None) -> Tensor:
        return self.out_proj(self.inner(x, ctx, state))

    def inner(self, x: Tensor, ctx: StepContext, state: GDNState | None = None) -> Tensor:
        """Everything before the output projection: [B, T, n_v_heads * value_dim]
        (hymba's SSM heads use this and apply their own shared projection)."""
        conv = state.conv if state is not None else None
        if ctx.record and state is not None and not state.static:
            return self._inner_recorded(x, ctx, state)
        if self._split(x):  # q, k, v projected and convolved apart (fla), a|b|z one GEMM when training
            q, k, v, new_conv = self.qkv(x, ctx, conv, split=True)
            a, b, z = project(x, self.a_proj, self.b_proj, self.z_proj)
        else:  # q|k|v|a|b|z one GEMM when training or on the decode engine's packed weights
            qkv, a, b, z = project(x, self.qkv_proj, self.a_proj, self.b_proj, self.z_proj)
            q, k, v, new_conv = self._qkv_fused(qkv, ctx, conv)
        if self._step_in_place(q, k, v, a, b, ctx, state):  # static buffers: one kernel, S written in place
            o = gated_delta_rule_decode_(q, k, v, a, b, self.A_log, self.dt_bias, state.S, use_qk_l2norm=True,
                                         lengths=ctx.lengths)
            S = state.S
        elif self._gates_in_kernel(x, ctx, state):  # decode step: fla computes g and beta itself
            o, S = gated_delta_rule_decode(q, k, v, a, b, self.A_log, self.dt_bias, initial_state=state.S,
                                           use_qk_l2norm=True)
        else:
            g, beta = self._decay_beta(a, b, ctx)
            o, S = gated_delta_rule(
                q, k, v, g, beta,
                initial_state=state.S if state is not None else None,
                output_final_state=state is not None,
                use_qk_l2norm=True,
                chunk_size=self.cfg.chunk_size,
                delta_rule=self.cfg.delta_rule,
            )
        if state is not None:
            state.S = S
            state.conv = new_conv
        return self._output(o, z)

    def _inner_recorded(self, x: Tensor, ctx: StepContext, state: GDNState) -> Tensor:
        """``inner`` of a speculative verify chunk (``StepContext.record``): the same output and
        new state, and in ``state`` a recording of the state after each ``p = 0 .. T`` of the
        chunk's tokens (``LayerState.record_rows``): S from the chunked reference kernel's
        per-position states (``states_at = 0 .. T``, continuing from the cache's S; the
        ``boundary_inner`` machinery with a block start at every position), the conv tails by
        ``conv_tails`` from the cache's tail. Always the reference kernel (fla exposes no
        intermediate states; the chunk is k + 1 tokens). Inert slots (padding) leave S as it is,
        so a row's states past its real tokens repeat its last one (never committed)."""
        B, T, _ = x.shape
        qkv, a, b, z = project(x, self.qkv_proj, self.a_proj, self.b_proj, self.z_proj)
        at = torch.arange(T + 1)  # (on the host: states_at's range check then reads no device tensor)
        tails = (conv_tails(qkv, at, self.cfg.conv_size - 1, state.conv)
                 if self.conv_weight is not None else None)
        q, k, v, new_conv = self._qkv_fused(qkv, ctx, state.conv)
        g, beta = self._decay_beta(a, b, ctx)
        o, S, S_at = gated_delta_rule(q, k, v, g, beta, initial_state=state.S, output_final_state=True,
                                      use_qk_l2norm=True, chunk_size=self.cfg.chunk_size,
                                      delta_rule=self.cfg.delta_rule, states_at=at)
        state.S, state.conv = S.to(state.S.dtype), new_conv
        state.record_rows(GDNState(conv=tails, S=S_at.to(state.S.dtype).reshape(B * (T + 1), *S.shape[1:])), T)
        return self._output(o, z)

    def boundary_forward(self, x: Tensor, ctx: StepContext, block_size: int, offset: int) -> tuple[Tensor, GDNState]:
        """Block-diffusion clean pass (``core.two_stream``): ``(self(x, ctx), states)`` where
        ``states`` (batch ``B*nb``, row ``b*nb + j``) is the cache state a cached forward of
        ``x[b, :offset + j*block_size]`` leaves (``T = offset + nb*block_size``; no padding)."""
        o, states = self.boundary_inner(x, ctx, block_size, offset)
        return self.out_proj(o), states

    def boundary_inner(self, x: Tensor, ctx: StepContext, block_size: int,
                       offset: int) -> tuple[Tensor, GDNState]:
        """``boundary_forward`` before the output projection: ``(self.inner(x, ctx), states)``.

        One pass of the chunked reference kernel: the output equals the ordinary forward's
        (same chunking, round-off only) and the S states at the block starts come from the
        kernel's chunk start states (``states_at``); conv tails from ``conv_tails`` on the
        pre-conv q|k|v. On CUDA with 16-bit inputs this clean pass uses the reference kernel,
        not fla (which exposes no intermediate states); the noisy blocks then run through the
        ordinary cached path (fla when selected)."""
        B, T, _ = x.shape
        nb = (T - offset) // block_size if block_size > 0 else 0
        if block_size < 1 or offset < 0 or nb < 1 or T != offset + nb * block_size:
            raise ValueError(f"gdn.boundary_forward: need T = offset + nb * block_size with nb >= 1, got T={T}, "
                             f"offset={offset}, block_size={block_size}")
        if ctx.lengths is not None:
            raise ValueError("gdn.boundary_forward: padding (ctx.lengths) is not supported")
        starts = offset + block_size * torch.arange(nb, device=x.device)  # [nb] tokens before block j
        qkv = self.qkv_proj(x)
        conv = conv_tails(qkv, starts, self.cfg.conv_size - 1) if self.conv_weight is not None else None
        q, k, v, _ = self._qkv_fused(qkv, ctx, None)
        a, b, z = project(x, self.a_proj, self.b_proj, self.z_proj)
        g, beta = self._decay_beta(a, b, ctx)
        o, _, S = gated_delta_rule(q, k, v, g, beta, output_final_state=False, use_qk_l2norm=True,
                                   chunk_size=self.cfg.chunk_size, delta_rule=self.cfg.delta_rule, states_at=starts)
        S = S.to(compute_dtype(x.dtype)).reshape(B * nb, self.hv, self.dk, self.dv)
        return self._output(o, z), GDNState(conv=conv, S=S)

    def qkv(self, x: Tensor, ctx: StepContext, conv_state: Tensor | None = None, *,
            split: bool | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """q, k [B, T, H, dk], v [B, T, Hv, dv] = SiLU(ShortConv(x W_q | x W_k | x W_v)) and the new
        conv tail [B, C_qkv, K-1] (None without short conv), computed one of two equal ways:

        * fused (``split=False``): one projection by ``qkv_proj`` and one conv over all C_qkv
          channels, then q, k, v as views of the result (the reference path);
        * split (``split=True``): three projections by row blocks of ``qkv_proj.weight`` and
          three convs with the matching row blocks of ``conv_weight`` (and of the conv state),
          so q, k and v are separate contiguous tensors. fla's kernels make a contiguous copy of
          every non-contiguous input (``input_guard``), forward and backward; this avoids them.
          The row blocks come from ``torch.split``, whose backward concatenates the three
          weight gradients into one tensor (slicing ``W[a:b]`` would allocate a zero
          gradient of W's full size per block). The depthwise conv treats channels
          independently, so both ways compute the same numbers.

        ``split=None`` (the layer's choice) splits when ``gated_delta_rule`` will run fla (CUDA,
        16-bit q/k/v: ``kernels.gdn.fla_selected``) on a chunk of more than one token: a decode
        step's copies are three tiny kernels, fewer than the split's extra projections and
        convs, and decoding is bound by the number of kernels. Parameters and checkpoints are
        the same either way."""
        if not (self._split(x) if split is None else split):
            return self._qkv_fused(self.qkv_proj(x), ctx, conv_state)
        B, T, _ = x.shape
        x = x.to(autocast_dtype(x))  # under autocast: one cast of x for the three projections, not one each
        sizes = [self.key_size, self.key_size, self.value_size]
        ws = self.qkv_proj.weight.split(sizes, dim=0)
        cws = self.conv_weight.split(sizes, dim=0) if self.conv_weight is not None else (None,) * 3
        states = conv_state.split(sizes, dim=1) if conv_state is not None else (None,) * 3
        outs, tails = [], []
        for w, cw, st in zip(ws, cws, states):
            y = F.linear(x, w)
            if cw is not None:
                y, tail = causal_conv1d(y, cw, None, st, ctx.lengths, activation="silu")
                tails.append(tail)
            else:
                y = F.silu(y)
            outs.append(y.contiguous())
        q, k, v = outs
        new_conv = torch.cat(tails, dim=1) if tails else None
        return (q.view(B, T, self.h, self.dk), k.view(B, T, self.h, self.dk), v.view(B, T, self.hv, self.dv),
                new_conv)

    def _split(self, x: Tensor) -> bool:
        """``qkv``'s own choice of ``split`` (see there): never for a hooked ``qkv_proj`` (MoDr's LoRA
        branches add their delta in a forward hook, which the split path's ``F.linear`` on row blocks
        of the weight skipped: the branches were dropped on CUDA prefill and training)."""
        return (x.shape[1] > 1 and plain(self.qkv_proj)
                and fla_selected(autocast_dtype(x), self.dk, self.dv, x, self.cfg.delta_rule))

    def _qkv_fused(self, qkv: Tensor, ctx: StepContext,
                   conv_state: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``qkv(split=False)`` from the pre-conv projection ``qkv`` [B, T, C_qkv]."""
        B, T, _ = qkv.shape
        new_conv = None
        if self.conv_weight is not None:
            qkv, new_conv = causal_conv1d(qkv, self.conv_weight, None, conv_state, ctx.lengths, activation="silu")
        else:
            qkv = F.silu(qkv)
        q, k, v = qkv.split([self.key_size, self.key_size, self.value_size], dim=-1)
        q = q.reshape(B, T, self.h, self.dk)
        k = k.reshape(B, T, self.h, self.dk)
        v = v.reshape(B, T, self.hv, self.dv)
        return q, k, v, new_conv

    def _step_in_place(self, q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, ctx: StepContext,
                       state: GDNState | None) -> bool:
        """A one-token step on a static state (the decode engine's own buffers, ``GDNState.static``)
        whose recurrence our kernel can run (``kernels.gdn.decode_in_place_ok``: CUDA, float16 /
        bfloat16 / float32, dk <= 256, no gradient, ``gdn_decode`` probe passed): gates, q/k
        l2norm and the step in one launch, the new S written into ``state.S``. Padded steps are
        fine (rows with ``lengths`` 0 keep their S). A dynamic state never gets here: a fork of it
        shares its tensors, so they must be replaced, not written."""
        if state is None or not state.static or state.S is None or q.shape[1] != 1 or not self.cfg.delta_rule:
            return False
        return decode_in_place_ok(q, k, v, a, b, self.A_log, self.dt_bias, state.S, ctx.lengths)

    def _gates_in_kernel(self, x: Tensor, ctx: StepContext, state: GDNState | None) -> bool:
        """A decode step (one token, a state, no padding) whose recurrence fla runs with the gates
        inside its kernel (``kernels.gdn.decode_gates_selected``: CUDA, 16-bit, probe passed):
        the raw a / b projections go to ``gated_delta_rule_decode`` instead of ``_decay_beta``'s
        elementwise kernels (a decode step is bound by its kernel count). Padded steps keep
        ``_decay_beta``, which zeroes the gates of inert slots."""
        if state is None or x.shape[1] != 1 or ctx.lengths is not None or not self.cfg.delta_rule:
            return False
        return decode_gates_selected(autocast_dtype(x), self.dk, self.dv, x)

    def _decay_beta(self, a: Tensor, b: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """g (log decay) and beta [B, T, Hv] from the projections a = x W_a, b = x W_b
        (``kernels.gdn.gdn_gates``); inert slots get g = beta = 0."""
        g, beta = gdn_gates(a, b, self.A_log, self.dt_bias)
        valid = ctx.valid
        if valid is not None:  # inert slots: no decay, no write -> the state does not move
            beta = torch.where(valid[..., None], beta, torch.zeros_like(beta))
            g = torch.where(valid[..., None], g, torch.zeros_like(g))
        return g, beta

    def _output(self, o: Tensor, z: Tensor) -> Tensor:
        """Gated RMSNorm of the kernel output o [B, T, Hv, dv] with the gate z = x W_z
        [B, T, value_size] -> [B, T, value_size]."""
        B, T, _ = z.shape
        o = self.norm(o, z.reshape(B, T, self.hv, self.dv))
        return o.reshape(B, T, self.value_size)
