"""Gated attention (Qwen3-Next; Qiu et al. 2025, "Gated Attention for Large Language
Models", arXiv 2505.06708, the SDPA-output gate of Eq. 5 / position G1).

    q, k = RMSNorm(x Wq), RMSNorm(x Wk)                (per head; scale 1 + w by default, w with
                                                        qk_norm_zero_centered: false; eps qk_norm_eps)
    q, k = RoPE_partial(q, pos), RoPE_partial(k, pos)   (linear / NTK / YaRN scaling)
    o    = SDPA(q, k, v) * sigmoid(x Wg)                (elementwise output gate)
    y    = o Wo

GQA (n_kv_heads < n_heads), optional sliding window. Without ``window`` the layer is
global causal attention (a recipe never silently turns local). Meta tokens
(positions < n_meta) stay visible through any window (Hymba, arXiv 2411.13676 §2.3).

The cache keeps keys, values and each slot's position; a windowed layer keeps only the
meta tokens plus the last ``window - 1`` positions of every row, so its memory is bounded.
Kernels: ``torch.nn.functional.scaled_dot_product_attention`` (flash / memory-efficient
kernels on CUDA); a whole causal sequence (training, prefill) goes through
``kernels.sdpa.causal_attention``, which needs no mask and on CUDA puts cuDNN's fused attention
first in SDPA's backend order (probed; the default order otherwise). A chunk on top of a cache
(decoding, speculative verification, a denoised block) goes through
``kernels.decode_attention``: on CUDA with at most 16 queries, a Triton FlashDecoding kernel
(split-K over the cache slots + a combine kernel) that masks by the slots' positions in
registers, so no dense ``[B, 1, T, S]`` mask is built per step, and reads only the filled
slots of the decode engine's static cache (its fill counter is a device tensor: no host sync,
CUDA-graph capturable); elsewhere the same masked SDPA as before (``visible``). Block-diffusion
training's two-stream forward goes through ``kernels.two_stream_attention``: on CUDA FlexAttention
with a cached block mask that skips the masked tiles, elsewhere SDPA with the dense mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import LayerState, StepContext
from ..core.config import spec
from ..core.positions import RopeConfig, Rotary, rotary_dim
from ..core.registry import register
from ..kernels.decode_attention import decode_attention, visible
from ..kernels.linear import project
from ..kernels.rotary import apply_rope
from ..kernels.sdpa import causal_attention
from ..kernels.two_stream_attention import two_stream_attention
from .norm import RMSNorm


@dataclass(frozen=True)
class GatedAttentionConfig:
    n_heads: int = spec(4, min=1)
    n_kv_heads: int | None = spec(None, min=1)
    head_dim: int | None = spec(None, min=1)
    qk_norm: bool = True
    qk_norm_eps: float | None = spec(None, gt=0.0, doc="epsilon of the q/k RMSNorms (default when unset: 1e-6)")
    qk_norm_zero_centered: bool | None = spec(None, doc="q/k norm scale: true (default when unset) scales by 1 + w "
                                                        "(Qwen3-Next); false by w (Qwen3, Qwen3-MoE)")
    output_gate: bool = True
    window: int | None = spec(None, min=1, doc="sliding window: keys a query sees, itself included (meta "
                              "tokens always visible); None: all")
    rope: RopeConfig = field(default_factory=RopeConfig)
    bias: bool = False
    kv_share: bool = spec(False, doc="pair consecutive layers of this mixer: the second reuses the first's K/V")

    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def dim(self, d_model: int) -> int:
        return self.head_dim or d_model // self.n_heads

    def check(self, model):  # noqa: ANN001
        if self.n_heads % self.kv_heads():
            yield "n_kv_heads", f"must divide n_heads ({self.n_heads}), got {self.kv_heads()}"
        if self.head_dim is None and model.d_model % self.n_heads:
            yield "n_heads", f"must divide d_model ({model.d_model}) when head_dim is not given"
        if self.rope.fraction > 0 and rotary_dim(self.dim(model.d_model), self.rope.fraction) < 2:
            yield "rope.fraction", "rotates fewer than 2 dims of a head; use 0 for no RoPE"
        if self.kv_share and model.etd is not None:
            yield "kv_share", KV_SHARE_ETD


#: why ``kv_share`` is refused in ETD models (the consumer pops what its producer left in the step)
KV_SHARE_ETD = ("cross-layer KV sharing pairs layers that run once each, in order; an ETD model (model.etd) runs, "
                "repeats or skips layers per iteration, route and token: not with it")


@dataclass
class AttentionState(LayerState):
    """Keys/values [B, Hkv, S, D] and each slot's position [B, S] (-1 = empty slot).

    Static form (the decode engine, ``static_copy``): the buffers are preallocated for
    ``capacity`` slots and ``n`` (a 1-element device tensor) counts the filled ones; a forward
    writes its chunk's keys at slots ``n .. n + T - 1`` in place (every row the same slots:
    pads are slots with position -1) and attends over all slots, the empty ones masked by
    their position -1 (the CUDA decode kernel reads ``n`` on the device and skips them). No
    host read, no reallocation: a CUDA graph can replay it. A windowed layer keeps every slot
    there (the mask applies the window), so its memory is the capacity.
    """

    k: Tensor | None = None
    v: Tensor | None = None
    pos: Tensor | None = None
    n: Tensor | None = field(default=None, metadata={"batch": False})

    def slots(self) -> int:
        return self.k.shape[2] if self.k is not None else 0

    def static_copy(self, capacity: int) -> "AttentionState":
        if self.k is None:  # a KV-sharing consumer, or a layer that has seen nothing: no buffers
            return AttentionState()
        B, H, S, D = self.k.shape
        st = AttentionState(k=self.k.new_zeros(B, H, capacity, D), v=self.v.new_zeros(B, H, capacity, self.v.shape[3]),
                            pos=self.pos.new_full((B, capacity), -1),
                            n=torch.zeros(1, dtype=torch.long, device=self.k.device))
        st.load_(self)
        return st

    def load_(self, src: LayerState) -> None:
        if not isinstance(src, AttentionState):
            raise ValueError(f"AttentionState.load_: got {type(src).__name__}")
        if self.n is None or src.n is not None:  # no buffers, or static into static: field by field
            super().load_(src)
            return
        S = src.k.shape[2] if src.k is not None else 0
        if S > self.slots():
            raise ValueError(f"AttentionState.load_: {S} cached slots exceed the static capacity {self.slots()}")
        if S:
            self.k[:, :, :S].copy_(src.k)
            self.v[:, :, :S].copy_(src.v)
            self.pos[:, :S].copy_(src.pos)
        self.pos[:, S:].fill_(-1)
        self.n.fill_(S)

    def append_(self, k: Tensor, v: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Static form: write a chunk's k, v [B, Hkv, T, D] and positions [B, T] at the next T
        slots; returns the whole buffers (k, v, pos)."""
        slots = self.n + torch.arange(k.shape[2], device=k.device)
        self.k.index_copy_(2, slots, k.to(self.k.dtype))
        self.v.index_copy_(2, slots, v.to(self.v.dtype))
        self.pos.index_copy_(1, slots, pos)
        self.n.add_(k.shape[2])
        return self.k, self.v, self.pos


KV_SHARING_MIXERS = ("gated_attn", "hymba")


def kv_share_roles(recipe) -> list[str | None]:  # noqa: ANN001 - Recipe
    """Cross-layer KV sharing (Hymba, arXiv 2411.13676 §2.3; Brandon et al. 2024 "CLA"):
    consecutive layers of the same attention-bearing mixer whose config sets ``kv_share``
    pair up greedily; the first of a pair is the "producer", the second the "consumer"
    (no K/V projections, no KV cache of its own: it attends to the producer's)."""
    layers = recipe.layers
    roles: list[str | None] = [None] * len(layers)
    for i in range(1, len(layers)):
        a, b = layers[i - 1].mixer, layers[i].mixer
        if a == b and b in KV_SHARING_MIXERS and roles[i - 1] is None and recipe.component(b).kv_share:
            roles[i - 1], roles[i] = "producer", "consumer"
    return roles


def kv_role_of(recipe, layer_idx: int) -> str | None:  # noqa: ANN001 - Recipe
    """The KV-sharing role of layer ``layer_idx`` (None beyond the pattern's layers: blocks
    outside the stack, such as MTP modules, never share)."""
    if recipe is None:
        return None
    roles = kv_share_roles(recipe)
    return roles[layer_idx] if layer_idx < len(roles) else None


@register("gated_attn", config=GatedAttentionConfig, aliases=("GA", "attn", "attention"))
class GatedAttention(nn.Module):
    #: a verify chunk records (its keys: ``_commit`` empties the rejected slots)
    records_states = True

    def __init__(self, cfg: GatedAttentionConfig, *, d_model: int, project_out: bool = True,
                 kv_role: str | None = "auto", recipe=None, layer_idx: int = 0, **_: object):  # noqa: ANN001
        super().__init__()
        self.cfg = cfg
        self.h, self.hkv, self.d = cfg.n_heads, cfg.kv_heads(), cfg.dim(d_model)
        if kv_role == "auto":
            kv_role = kv_role_of(recipe, layer_idx)
        self.kv_role = kv_role
        self.q_proj = nn.Linear(d_model, self.h * self.d, bias=cfg.bias)
        if kv_role != "consumer":
            self.k_proj = nn.Linear(d_model, self.hkv * self.d, bias=cfg.bias)
            self.v_proj = nn.Linear(d_model, self.hkv * self.d, bias=cfg.bias)
        self.g_proj = nn.Linear(d_model, self.h * self.d, bias=cfg.bias) if cfg.output_gate else None
        self.o_proj = None
        if project_out:
            self.o_proj = nn.Linear(self.h * self.d, d_model, bias=cfg.bias)
            self.o_proj.is_residual_out = True
        eps, zc = cfg.qk_norm_eps or 1e-6, cfg.qk_norm_zero_centered is not False
        self.q_norm = RMSNorm(self.d, eps, zc) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, eps, zc) if cfg.qk_norm and kv_role != "consumer" else None
        self.rotary = Rotary(self.d, cfg.rope)

    @property
    def inner_dim(self) -> int:
        return self.h * self.d

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> AttentionState:
        return AttentionState()

    def state_nbytes(self, seq_len: int, dtype: torch.dtype, *, n_meta: int = 0) -> int:
        """Bytes of one sequence's cache after ``seq_len`` real tokens (plus ``n_meta`` meta
        tokens), without running: K and V [Hkv, S, D] in ``dtype`` plus each slot's int64
        position, S = n_meta + seq_len, or n_meta + min(seq_len, window - 1) with a window.
        A KV-sharing consumer keeps no cache of its own."""
        if self.kv_role == "consumer":
            return 0
        w = self.cfg.window
        slots = n_meta + (seq_len if w is None else min(seq_len, w - 1))
        return slots * (2 * self.hkv * self.d * dtype.itemsize + torch.int64.itemsize)

    # -- projections plus norm + rope (k, v are None for a KV-sharing consumer)
    def qkv(self, x: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
        """(q, k, v, output-gate logits): the projections as one GEMM when training
        (``kernels.linear.project``), then q/k norm and RoPE."""
        B, T, _ = x.shape
        cos, sin = self.rotary.cos_sin(ctx.positions, ctx.shared)
        mods = [self.q_proj] + ([self.k_proj, self.v_proj] if self.kv_role != "consumer" else [])
        outs = list(project(x, *mods, *([self.g_proj] if self.g_proj is not None else [])))
        gate = outs.pop() if self.g_proj is not None else None
        q = outs[0].view(B, T, self.h, self.d)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = self._rope(q, cos, sin)
        if self.kv_role == "consumer":
            return q, None, None, gate
        k, v = (t.view(B, T, self.hkv, self.d) for t in outs[1:])
        if self.k_norm is not None:
            k = self.k_norm(k)
        return q, self._rope(k, cos, sin), v, gate

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rope(x, cos, sin) if self.rotary.rot_dim else x

    def attend(self, q: Tensor, k: Tensor | None, v: Tensor | None, ctx: StepContext,
               state: AttentionState | None) -> Tensor:
        """q [B,T,H,D], k/v [B,T,Hkv,D] of this chunk -> attention output [B,T,H,D]."""
        qpos = ctx.positions
        valid = ctx.valid
        n_filled = None  # the static cache's fill counter: the decode kernel reads slots below it only
        if self.kv_role == "consumer":  # the producer (previous layer) left its keys/values
            k_all, v_all, kpos, fresh, n_filled = ctx.shared.pop("kv")
        else:
            kpos_new = qpos if valid is None else torch.where(valid, qpos, torch.full_like(qpos, -1))
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
            if state is not None and state.n is not None:  # static buffers (decode engine)
                k_all, v_all, kpos = state.append_(k, v, kpos_new)
                fresh, n_filled = False, state.n
            elif state is not None and state.k is not None:
                k_all = torch.cat([state.k, k], dim=2)
                v_all = torch.cat([state.v, v], dim=2)
                kpos = torch.cat([state.pos, kpos_new], dim=1)
                fresh = False
            else:
                k_all, v_all, kpos, fresh = k, v, kpos_new, True
            if self.kv_role == "producer":
                ctx.shared["kv"] = (k_all, v_all, kpos, fresh, n_filled)
        qh = q.transpose(1, 2)
        gqa = self.h != self.hkv
        if ctx.two_stream is not None:  # block-diffusion training: [meta | clean | noisy]
            o = two_stream_attention(qh, k_all, v_all, ctx.two_stream, self.cfg.window, enable_gqa=gqa)
        elif fresh and valid is None and self.cfg.window is None and not ctx.bidirectional:
            o = causal_attention(qh, k_all, v_all, enable_gqa=gqa)  # kernels.sdpa: cuDNN first on CUDA
        elif not fresh:  # a chunk on top of a cache: FlashDecoding kernel (CUDA, <= 16 queries) or masked SDPA
            o = decode_attention(q, k_all, v_all, qpos, kpos, window=self.cfg.window, n_meta=ctx.n_meta,
                                 bidirectional=ctx.bidirectional, valid=valid, n_filled=n_filled).transpose(1, 2)
        else:
            mask = visible(qpos, kpos, self.cfg.window, ctx.n_meta, ctx.bidirectional)
            if valid is not None:  # inert query slots: any finite output will do
                mask = mask | ~valid[:, :, None]
            o = F.scaled_dot_product_attention(qh, k_all, v_all, attn_mask=mask[:, None], enable_gqa=gqa)
        if state is not None and self.kv_role != "consumer" and state.n is None:
            T = qpos.shape[1]
            self._store(state, k_all, v_all, kpos, ctx.n_meta, extra=T if ctx.record else 0)
            if ctx.record:  # the keys are the state: a commit empties the rejected tokens' slots
                state.record(lambda st, keep, kmax, base=qpos[:, 0], s_prev=k_all.shape[2] - T, n_meta=ctx.n_meta:
                             self._commit(st, base, s_prev, n_meta, keep, kmax))
        return o.transpose(1, 2)

    def _store(self, state: AttentionState, k: Tensor, v: Tensor, kpos: Tensor, n_meta: int, extra: int = 0) -> None:
        """Keep k, v, kpos [B, Hkv, S, D] / [B, S] as the state; a windowed layer keeps only the meta
        tokens and the last ``window - 1`` positions of every row (``extra`` more: a recorded
        verify chunk of ``extra`` tokens, whose commit may return to any of them), its slots
        compacted (stable, so in position order) when that frees a column."""
        w = self.cfg.window
        if w is not None:
            last = kpos.max(dim=1, keepdim=True).values
            keep = (kpos >= 0) & ((kpos < n_meta) | (last - kpos < w - 1 + extra))
            n_keep = int(keep.sum(1).max().item())
            if n_keep < kpos.shape[1]:
                order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :n_keep]
                kpos = torch.where(keep.gather(1, order), kpos.gather(1, order), -1)
                idx = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
                k, v = k.gather(2, idx), v.gather(2, idx)
        state.k, state.v, state.pos = k, v, kpos

    def _commit(self, state: AttentionState, base: Tensor, s_prev: int, n_meta: int, keep: Tensor,
                kmax: int) -> None:
        """A recorded verify chunk's commit (``LayerState.record``): the slots of the rejected
        tokens (positions ``>= base[b] + keep[b]``) become empty (-1), as a re-run with padding
        leaves them. Without a window the chunk's slots were appended after ``s_prev``: the
        columns past ``s_prev + kmax`` go (the re-run's layout exactly); a windowed layer's
        keys are trimmed again to its window (the same slots per row as the re-run keeps; where
        neither compacts, the empty slots may sit in other columns)."""
        pos = state.pos.masked_fill(state.pos >= (base + keep.to(base.device))[:, None], -1)
        if self.cfg.window is None:
            n = s_prev + kmax
            state.k, state.v, state.pos = state.k[:, :, :n], state.v[:, :, :n], pos[:, :n]
        else:
            self._store(state, state.k, state.v, pos, n_meta)

    def forward(self, x: Tensor, ctx: StepContext, state: AttentionState | None = None) -> Tensor:
        B, T, _ = x.shape
        q, k, v, gate = self.qkv(x, ctx)
        o = self.attend(q, k, v, ctx, state).reshape(B, T, self.h * self.d)
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o) if self.o_proj is not None else o
