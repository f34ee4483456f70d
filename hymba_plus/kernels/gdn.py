"""The gated delta rule (Yang, Kautz, Hatamizadeh, "Gated Delta Networks: Improving
Mamba2 with Delta Rule", arXiv 2412.06464, §3: the gated delta rule and its chunkwise
algorithm) — the Qwen3-Next linear-attention recurrence.

Per value head, with state ``S in R^{dk x dv}``, decay ``a_t = exp(g_t)`` (``g_t <= 0``),
write strength ``beta_t in (0, 1)``::

    paper (value-major):  S_t = a_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T
    here (key-major, fla): S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
                               = a_t S_{t-1} + beta_t k_t (v_t - a_t S_{t-1}^T k_t)^T
    o_t = scale * S_t^T q_t                                       (scale = dk^-1/2)

``delta_rule=False`` drops the erase term — ``S_t = a_t S_{t-1} + beta_t k_t v_t^T`` — i.e.
gated linear attention with a write gate (the Mamba2 / GLA-style ablation the paper
compares against). Layout is fla's: q, k ``[B, T, H, dk]``, v ``[B, T, Hv, dv]``, g, beta
``[B, T, Hv]``, state ``[B, Hv, dk, dv]``. ``Hv`` may be a multiple of ``H`` (grouped
value heads, as fla's GVA): value head ``j`` reads query/key head ``j // (Hv / H)``.
``use_qk_l2norm`` normalizes q and k as ``x / sqrt(sum x^2 + 1e-6)`` (fla's in-kernel
l2norm), so the reference and the fast path see the same inputs.

Entry points:

* ``recurrent_gated_delta_rule_ref`` — the exact per-token recurrence above. Used for
  decode (one token) and as the oracle of the tests.
* ``chunk_gated_delta_rule_ref`` — the chunkwise-parallel form (no loop over tokens; a
  loop over chunks for the state only). Within a chunk of length C with local cumulative
  log-decay ``G_i = sum_{s<=i} g_s`` and ``gamma_i = exp(G_i)``, unrolling the rule from
  the chunk's initial state ``S_0`` gives, for the "new values" ``u_i`` (the bracket
  above times ``beta_i``)::

      (I + A) U = diag(beta) V - diag(beta * gamma) K S_0,
      A_ij = beta_i exp(G_i - G_j) k_i^T k_j   (i > j; 0 otherwise)

  so with the UT transform ``T = (I + A)^{-1}`` (a unit-lower-triangular solve) the WY
  representation ``W = T diag(beta gamma) K``, ``U0 = T diag(beta) V`` gives
  ``U = U0 - W S_0`` (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta
  Rule over Sequence Length", arXiv 2406.06484, the WY / UT-transform chunkwise DeltaNet,
  extended with the decay as in GDN §3). Then::

      O   = scale * ( diag(gamma) Q S_0 + (Q K^T o D) U ),   D_ij = exp(G_i - G_j) [i >= j]
      S_C = gamma_C S_0 + K^T diag(exp(G_C - G_j)) U

  ``T`` not divisible by ``C`` is padded with ``g = 0, beta = 0`` (exact no-ops).

  ``states_at`` (block diffusion, ``core.two_stream``) also returns the state after ``p``
  tokens for many ``p`` at once, without more loop steps: the chunk's start state ``S_0``
  (collected by the loop anyway) advanced by its first ``i = p mod C`` steps,
  ``gamma_{i-1} S_0 + K_{<i}^T diag(exp(G_{i-1} - G_j)) U_{<i}`` (the ``S_C`` formula cut at ``i``).
* ``gated_delta_rule`` — the dispatcher: fla's ``chunk_gated_delta_rule`` (T > 1, or
  whenever autograd needs a backward) or ``fused_recurrent_gated_delta_rule`` (decode:
  T == 1 without autograd; fla gives it no backward) on CUDA when importable
  (``kernels.dispatch``, op name ``"gdn"``) for float16/bfloat16 inputs, else the references
  (chunked for T > 1, recurrent for T == 1). float32 stays on the reference: fla computes
  float32 matmuls in tf32 (measured 1.01e-3 relative on the final state at T = 1 on an H100).
  The ``delta_rule=False`` ablation, and any call with ``states_at``, use the reference.
* ``gated_delta_rule_decode`` — the decode step with the gates inside the kernel (op name
  ``"gdn_gates"``): given the raw projections ``a`` and ``b`` [B, 1, Hv] and the parameters
  ``A_log``, ``dt_bias`` [Hv], fla's ``fused_recurrent_gated_delta_rule(...,
  use_gate_in_kernel=True, A_log=, dt_bias=, use_beta_sigmoid_in_kernel=True)`` computes, per
  value head and in float32 inside the recurrence kernel, ``g = -exp(A_log) * softplus(a +
  dt_bias)`` (dt_bias added before the softplus, which switches to the identity above 20 as
  ``F.softplus`` does; fla's PTX ``ex2``/``lg2`` approximations) and ``beta = sigmoid(b)``:
  ``gdn_gates`` in the layer's formulas, with none of their elementwise kernels. The reference
  rounds ``beta`` to the projection's 16-bit dtype; the kernel keeps it in float32 (closer to
  exact). fla reads any dtype of ``A_log`` / ``dt_bias`` (cast to float32 in the kernel). Its
  probe compares it on the GPU with ``gdn_gates`` + ``recurrent_gated_delta_rule_ref``.
* ``gated_delta_rule_decode_`` — our own Triton kernel for the decode step, updating the state
  IN PLACE (op name ``"gdn_decode"``; ``decode_in_place_ok`` says when it applies). The gated
  delta rule of GDN (Yang, Kautz, Hatamizadeh, arXiv 2412.06464) for one token,
  ``S_t = S_{t-1} (a_t (I - beta_t k_t k_t^T)) + beta_t v_t k_t^T`` (value-major; the key-major
  form above), in ONE launch with a grid over (batch, value head, dv tiles): it reads q, k, v
  with their strides where they are (views of the conv output: no contiguous copies), q/k head
  ``h // (Hv / H)`` for value head ``h`` (no repeat), L2-normalises q and k (``l2norm``, same
  eps), computes the gates from the raw projections exactly as ``gdn_gates`` (``g = -exp(A_log)
  softplus(a + dt_bias)`` in float32, softplus the identity above 20, ``beta = sigmoid(b)``
  rounded to b's dtype), then ``recurrent_gated_delta_rule_ref``'s step in its order in float32
  (decay, ``S^T k``, delta, rank-1 update, ``o = S'^T q * scale``), and writes the new state into
  the state tensor it was given: each program owns a disjoint ``[dk, BV]`` column block, so the
  in-place update is race-free. Returns ``o`` [B, 1, Hv, dv] in v's dtype; rows with ``lengths``
  0 keep their state. The state is never copied (fla writes a new [B, Hv, dk, dv] float32 tensor
  that the decode engine then copies back: one more read and write of the whole state per layer
  per step). Only for a caller that owns the state: the decode engine's static buffers
  (``components.gdn.GDNState.static``); dynamic caches keep the functional paths above (a fork
  shares their tensors). Launch config fixed by the shapes, no host read: CUDA-graph capturable.
  float16 / bfloat16 / float32 inputs (no tf32: reductions are elementwise products and sums),
  dk <= 256, no autograd. Its probe compares it on the GPU with ``gdn_gates`` + the recurrence in
  float64 (grouped heads, strided views, a = 30, bf16 / float32, an inert row) and checks the
  update happened in the given tensor.

The references compute in float32 (float64 when given float64) and return the state in
that dtype; outputs take the dtype of ``v``.
"""

from __future__ import annotations

import importlib
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dispatch
from ._triton import exp_f32, log_f32, next_pow2, triton

if triton is not None:
    import triton.language as tl

L2_EPS = 1e-6


def _fla_gdn():
    mod = importlib.import_module("fla.ops.gated_delta_rule")
    return mod.chunk_gated_delta_rule, mod.fused_recurrent_gated_delta_rule


dispatch.fast_path("gdn", probe=_fla_gdn,
                   doc="fla.ops.gated_delta_rule chunk / fused_recurrent gated delta rule (16-bit inputs)")


def _probe_gva() -> None:
    """fla >= 0.6 reads q/k head ``j // (Hv / H)`` for value head ``j`` itself (grouped value
    heads, our convention): check on this GPU that the chunk (forward and backward) and the
    fused recurrent kernels given H < Hv heads equal the same kernels on q/k repeated to Hv."""
    chunk_fn, recurrent_fn = _fla_gdn()
    g0 = torch.Generator().manual_seed(0)
    B, T, H, Hv, dk, dv = 2, 80, 2, 4, 64, 64
    r = lambda *s: torch.randn(*s, generator=g0).cuda()  # noqa: E731
    q, k, v = r(B, T, H, dk).bfloat16(), r(B, T, H, dk).bfloat16(), r(B, T, Hv, dv).bfloat16()
    g = -torch.rand(B, T, Hv, generator=g0).cuda() * 0.1
    beta = torch.rand(B, T, Hv, generator=g0).cuda().bfloat16()
    h0 = 0.1 * r(B, Hv, dk, dv)
    res = []
    for native in (True, False):
        qq, kk = (q, k) if native else (q.repeat_interleave(Hv // H, 2), k.repeat_interleave(Hv // H, 2))
        qq, kk = qq.detach().requires_grad_(), kk.detach().requires_grad_()
        o, s = chunk_fn(qq, kk, v, g=g, beta=beta, initial_state=h0, output_final_state=True,
                        use_qk_l2norm_in_kernel=True)
        dq, dkk = torch.autograd.grad(o.float().sum() + s.sum(), (qq, kk))
        if not native:
            dq, dkk = (t.unflatten(2, (H, Hv // H)).sum(3) for t in (dq, dkk))
        with torch.no_grad():
            o1, s1 = recurrent_fn(qq[:, :1], kk[:, :1], v[:, :1], g=g[:, :1], beta=beta[:, :1], initial_state=h0,
                                  output_final_state=True, use_qk_l2norm_in_kernel=True)
        res.append((o, s, dq, dkk, o1, s1))
    for name, a, b in zip(("o", "state", "dq", "dk", "o (recurrent)", "state (recurrent)"), *res):
        err = dispatch.max_rel_err(a, b)
        if not err < 2e-2:
            raise RuntimeError(f"fla with fewer q/k heads than value heads differs from repeated heads ({name}: "
                               f"{err:.2e})")


dispatch.fast_path("gdn_gva", probe=_probe_gva,
                   doc="fla gdn kernels read grouped q/k heads themselves (no repeat to the value heads)")


def l2norm(x: Tensor, eps: float = L2_EPS) -> Tensor:
    """``x / sqrt(sum(x^2) + eps)`` over the last dim (fla's l2norm formula)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _check(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Tensor | None) -> None:
    B, T, H, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    if k.shape != q.shape:
        raise ValueError(f"gdn: q and k must have the same shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:2] != (B, T) or Hv % H:
        raise ValueError(f"gdn: v must be [B, T, Hv, dv] with Hv a multiple of H={H}, got {tuple(v.shape)}")
    if g.shape != (B, T, Hv) or beta.shape != (B, T, Hv):
        raise ValueError(f"gdn: g and beta must be [B, T, Hv]={(B, T, Hv)}, got {tuple(g.shape)}, {tuple(beta.shape)}")
    if initial_state is not None and initial_state.shape != (B, Hv, dk, dv):
        raise ValueError(f"gdn: initial_state must be [B, Hv, dk, dv]={(B, Hv, dk, dv)}, "
                         f"got {tuple(initial_state.shape)}")


def _expand_qk(q: Tensor, k: Tensor, n_v_heads: int) -> tuple[Tensor, Tensor]:
    """Repeat q, k heads so value head j uses q/k head j // (Hv / H)."""
    rep = n_v_heads // q.shape[2]
    if rep == 1:
        return q, k
    return q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)


def _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm):  # noqa: ANN001, ANN202
    _check(q, k, v, g, beta, initial_state)
    dt = dispatch.compute_dtype(q, k, v, g, beta, initial_state)
    B, T, H, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    q, k = q.to(dt), k.to(dt)
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    q, k = _expand_qk(q, k, Hv)
    scale = dk ** -0.5 if scale is None else scale
    # [B, Hv, T, d] / [B, Hv, T]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v.to(dt)))
    g, beta = g.to(dt).transpose(1, 2), beta.to(dt).transpose(1, 2)
    S = (torch.zeros(B, Hv, dk, dv, dtype=dt, device=v.device) if initial_state is None
         else initial_state.to(dt))
    return q, k, v, g, beta, S, scale


@dispatch.reference_math
def recurrent_gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = False,
    delta_rule: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Exact per-token recurrence (the gated delta rule); the decode step and the tests' oracle.

    Returns ``o [B, T, Hv, dv]`` (dtype of v) and the final state ``[B, Hv, dk, dv]``
    (float32, or float64 for float64 inputs), or None when ``output_final_state`` is False.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, S, scale = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    outs = []
    for t in range(q.shape[2]):  # one step per token: decode and oracle only
        S = S * g[:, :, t].exp()[..., None, None]
        kt = k[:, :, t]
        if delta_rule:
            u = beta[:, :, t, None] * (v[:, :, t] - torch.einsum("bhk,bhkv->bhv", kt, S))
        else:
            u = beta[:, :, t, None] * v[:, :, t]
        S = S + kt[..., :, None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t] * scale, S))
    o = torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape[0], 0, v.shape[1], v.shape[3])
    return o.to(out_dtype), (S if output_final_state else None)


@dispatch.reference_math
def chunk_gated_delta_rule_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = True,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    delta_rule: bool = True,
    states_at: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Chunkwise WY / UT-transform form of the gated delta rule (see the module docstring).

    Everything inside a chunk is batched over all chunks at once (one triangular solve of
    shape ``[B, Hv, N, C, C]``); only the inter-chunk state recurrence loops, over the
    ``N = ceil(T / C)`` chunks. Same returns as ``recurrent_gated_delta_rule_ref``; with
    ``states_at`` ([n] long, values in ``[0, T]``) a third value, the state after the first
    ``states_at[m]`` tokens for every ``m`` (``initial_state`` for 0), as ``[B, n, Hv, dk, dv]``
    in the state's dtype.
    """
    out_dtype = v.dtype
    q, k, v, g, beta, S, scale = _prepare(q, k, v, g, beta, initial_state, scale, use_qk_l2norm)
    B, Hv, T, dk = k.shape
    dv = v.shape[-1]
    C = max(1, min(chunk_size, T)) if T > 0 else 1
    N = math.ceil(T / C)
    pad = N * C - T
    if pad:  # g = 0 (no decay) and beta = 0 (no write) make padded steps exact no-ops
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    q, k, v = (t.reshape(B, Hv, N, C, t.shape[-1]) for t in (q, k, v))
    g, beta = g.reshape(B, Hv, N, C), beta.reshape(B, Hv, N, C)

    G = g.cumsum(-1)  # local cumulative log-decay
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # D_ij, i >= j
    gamma = G.exp()  # decay from the chunk start
    to_end = (G[..., -1:] - G).exp()  # decay from step j to the chunk end

    if delta_rule:
        eye = torch.eye(C, dtype=q.dtype, device=q.device)
        A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)
        rhs = torch.cat([(beta * gamma)[..., None] * k, beta[..., None] * v], dim=-1)
        sol = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True)
        W, U0 = sol[..., :dk], sol[..., dk:]  # WY representation
    else:
        W, U0 = None, beta[..., None] * v
    qs = q * scale
    attn = (qs @ k.transpose(-1, -2)) * decay  # [B, Hv, N, C, C], causal within the chunk
    kend = k * to_end[..., None]
    a_end = G[..., -1].exp()  # [B, Hv, N]

    starts, news = [], []
    for n in range(N):  # state recurrence across chunks only
        starts.append(S)
        U = U0[:, :, n] if W is None else U0[:, :, n] - W[:, :, n] @ S
        news.append(U)
        S = a_end[:, :, n, None, None] * S + kend[:, :, n].transpose(-1, -2) @ U
    S0 = torch.stack(starts, dim=2)  # [B, Hv, N, dk, dv]
    U = torch.stack(news, dim=2)  # [B, Hv, N, C, dv]
    o = (qs * gamma[..., None]) @ S0 + attn @ U
    o = o.reshape(B, Hv, N * C, dv)[:, :, :T].transpose(1, 2)
    if states_at is None:
        return o.to(out_dtype), (S if output_final_state else None)
    return o.to(out_dtype), (S if output_final_state else None), _states_within(S0, S, U, k, G, states_at, T)


def _states_within(S0: Tensor, S_end: Tensor, U: Tensor, k: Tensor, G: Tensor, at: Tensor, T: int) -> Tensor:
    """State after ``p`` tokens for every ``p`` in ``at`` [n] (0 <= p <= T), from the chunk
    start states ``S0`` [B, Hv, N, dk, dv], the final state, the new values ``U`` [B, Hv, N, C, dv],
    keys [B, Hv, N, C, dk] and local cumulative log-decays ``G`` [B, Hv, N, C]: chunk
    ``n = p // C`` advanced by its first ``i = p % C`` steps (``p == T == N*C``: the final state).
    Returns [B, n, Hv, dk, dv]."""
    N, C = G.shape[2], G.shape[3]
    at = at.to(device=G.device, dtype=torch.long)
    # the range check reads the counts on the host: not inside a CUDA graph capture (block diffusion's
    # graphed training step) nor a torch.compile trace (its compiled step), whose counts come from host
    # integers (gdn.boundary_inner)
    if at.dim() != 1 or (at.numel() and not (dispatch.capturing() or dispatch.tracing(at))
                         and (int(at.min()) < 0 or int(at.max()) > T)):
        raise ValueError(f"gdn: states_at must be a 1-D tensor of token counts in [0, {T}], got {at.tolist()}")
    n_state = at // C  # index into [S0 | S_end] (N + 1 states)
    n_in = n_state.clamp_max(N - 1)  # p == N*C: i = 0, nothing of the chunk is used
    i = at - n_state * C  # steps of the chunk already taken, 0 <= i < C
    starts = torch.cat([S0, S_end[:, :, None]], dim=2)[:, :, n_state]  # [B, Hv, n, dk, dv]
    Gn = G[:, :, n_in]  # [B, Hv, n, C]
    G_prev = torch.where(i > 0, Gn.gather(-1, (i - 1).clamp_min(0).expand(*Gn.shape[:2], -1)[..., None])[..., 0],
                         torch.zeros_like(Gn[..., 0]))  # G_{i-1}, 0 for i = 0
    before = torch.arange(C, device=G.device)[None, :] < i[:, None]  # [n, C]: steps j < i
    w = (G_prev[..., None] - Gn).masked_fill(~before, float("-inf")).exp()  # exp(G_{i-1} - G_j), j < i
    states = G_prev.exp()[..., None, None] * starts + (k[:, :, n_in] * w[..., None]).transpose(-1, -2) @ U[:, :, n_in]
    return states.transpose(1, 2)


def _fast_ok(q: Tensor, v: Tensor) -> bool:
    """fla for 16-bit inputs only: its chunk kernels compute float32 matmuls in tf32
    (``input_precision='tf32'`` is hard-coded on GPUs that have it), which cannot meet a float32
    tolerance, so float32 stays on the exact reference (as mamba3 does)."""
    return v.dtype == q.dtype and _fast_shape_ok(q.dtype, q.shape[-1], v.shape[-1])


def _fast_shape_ok(dtype: torch.dtype, dk: int, dv: int) -> bool:
    # fla's kernels hold a whole key head in one block (dk <= 256) and tile the value dim (its
    # own default layer has dk 256, dv 512)
    return dtype in (torch.float16, torch.bfloat16) and dk <= 256


def fla_selected(dtype: torch.dtype, dk: int, dv: int, x: Tensor, delta_rule: bool = True) -> bool:
    """Would ``gated_delta_rule`` (without ``states_at``) run fla for q, k, v of ``dtype`` with
    head dims ``dk`` / ``dv``, computed from ``x`` (its device)? The question the layer asks
    before it makes its kernel inputs (``components.gdn``: q, k, v as separate contiguous
    tensors for fla), answered by the dispatcher's own rules."""
    return delta_rule and _fast_shape_ok(dtype, dk, dv) and dispatch.use_fast("gdn", x)


def gated_delta_rule_fla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                         initial_state: Tensor | None = None, scale: float | None = None,
                         output_final_state: bool = False, use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor | None]:
    """fla's kernels on our layout (any dtype fla takes; the dispatcher sends 16-bit only):
    ``chunk_gated_delta_rule``, or ``fused_recurrent_gated_delta_rule`` for decode (T == 1
    without autograd: fla gives that kernel no backward). Grouped q/k heads (H < Hv) go to fla
    as they are where its probe (``gdn_gva``) found that equal to repeating them, else repeated."""
    chunk_fn, recurrent_fn = _fla_gdn()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    grouped = q.shape[2] < v.shape[2] and dispatch.use_fast("gdn_gva", q)  # probe-checked on this GPU
    qe, ke = (q, k) if grouped else _expand_qk(q, k, v.shape[2])
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, g, beta, initial_state))
    fn = recurrent_fn if q.shape[1] == 1 and not needs_grad else chunk_fn
    return fn(qe, ke, v, g=g.float(), beta=beta.to(q.dtype), scale=scale, initial_state=h0,
              output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm)


def gdn_gates(a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor) -> tuple[Tensor, Tensor]:
    """The Gated DeltaNet gates from the raw projections (Mamba2-style decay, GDN §3):
    ``g = -exp(A_log) * softplus(a + dt_bias)`` in float32 (float64 for float64 inputs) and
    ``beta = sigmoid(b)`` in b's dtype; a, b [B, T, Hv], A_log, dt_bias [Hv]."""
    cdt = dispatch.compute_dtype(a)
    g = -A_log.to(cdt).exp() * F.softplus(a.to(cdt) + dt_bias.to(cdt))
    return g, torch.sigmoid(b)


def _probe_gates() -> None:
    """fla's in-kernel gates (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``) against
    ``gdn_gates`` + the exact recurrence on this GPU (bf16 q/k/v and projections, float32 state):
    a and b over a wide range (softplus's linear branch above 20 included), A_log / dt_bias in
    float32 and in bf16, equal and grouped value heads."""
    _fla_gdn()  # ImportError: unavailable
    g0 = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g0).cuda()  # noqa: E731
    for H, Hv, pdt in ((2, 2, torch.float32), (2, 4, torch.bfloat16)):
        B, dk, dv = 3, 64, 64
        q, k, v = r(B, 1, H, dk).bfloat16(), r(B, 1, H, dk).bfloat16(), r(B, 1, Hv, dv).bfloat16()
        a, b = (4 * r(B, 1, Hv)).bfloat16(), (3 * r(B, 1, Hv)).bfloat16()
        a[0, 0, 0] = 30.0  # softplus's identity branch
        A_log = torch.empty(Hv).uniform_(1.0, 16.0, generator=g0).log().cuda().to(pdt)
        dt = torch.exp(torch.rand(Hv, generator=g0) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt_bias = (dt + torch.log(-torch.expm1(-dt))).cuda().to(pdt)
        h0 = r(B, Hv, dk, dv)
        with torch.no_grad():
            o, s = _decode_fla(q, k, v, a, b, A_log, dt_bias, h0, dk ** -0.5, True)
            g, beta = gdn_gates(a.float(), b.float(), A_log, dt_bias)
            o_r, s_r = recurrent_gated_delta_rule_ref(q, k, v, g, beta, h0, use_qk_l2norm=True)
        for name, x, y in (("o", o, o_r), ("state", s, s_r)):
            err = dispatch.max_rel_err(x, y)
            if not err < 1e-2:
                raise RuntimeError(f"fla's in-kernel gdn gates differ from the reference ({name}, Hv {Hv}, "
                                   f"A_log {pdt}: {err:.2e})")


dispatch.fast_path("gdn_gates", probe=_probe_gates,
                   doc="fla fused_recurrent_gated_delta_rule computes the gdn gates (decode step, 16-bit)")


def _decode_fla(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                initial_state: Tensor | None, scale: float, use_qk_l2norm: bool) -> tuple[Tensor, Tensor]:
    _, recurrent_fn = _fla_gdn()
    grouped = q.shape[2] < v.shape[2] and dispatch.use_fast("gdn_gva", q)  # probe-checked on this GPU
    qe, ke = (q, k) if grouped else _expand_qk(q, k, v.shape[2])
    h0 = initial_state.float().contiguous() if initial_state is not None else None
    return recurrent_fn(qe, ke, v, g=a, beta=b, scale=scale, initial_state=h0, output_final_state=True,
                        use_qk_l2norm_in_kernel=use_qk_l2norm, use_gate_in_kernel=True, A_log=A_log,
                        dt_bias=dt_bias, use_beta_sigmoid_in_kernel=True)


def decode_gates_selected(dtype: torch.dtype, dk: int, dv: int, x: Tensor) -> bool:
    """Would ``gated_delta_rule_decode`` run (fla selected for this dtype and these head dims,
    and its in-kernel gates probe-checked on this GPU)? Asked by the layer for a decode step."""
    return fla_selected(dtype, dk, dv, x) and dispatch.use_fast("gdn_gates", x)


def gated_delta_rule_decode(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                            initial_state: Tensor | None = None, scale: float | None = None,
                            use_qk_l2norm: bool = False) -> tuple[Tensor, Tensor]:
    """One decode step (T == 1, no autograd) of the gated delta rule with its gates computed
    from the raw projections ``a`` (decay input) and ``b`` (beta logits) [B, 1, Hv]::

        g = -exp(A_log) * softplus(a + dt_bias),  beta = sigmoid(b)   (``gdn_gates``)

    fla's fused recurrent kernel with the gates inside it where the ``gdn_gates`` probe passed
    (CUDA, 16-bit q/k/v: ``decode_gates_selected``), else ``gdn_gates`` + ``gated_delta_rule``.
    Returns ``(o [B, 1, Hv, dv], final state [B, Hv, dk, dv] float32)``."""
    _check(q, k, v, a, b, initial_state)
    if q.shape[1] != 1:
        raise ValueError(f"gated_delta_rule_decode is the one-token step, got T={q.shape[1]}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, a, b, A_log, dt_bias, initial_state))
    if (not needs_grad and _fast_ok(q, v) and dispatch.use_fast("gdn", q, k, v, a, b, A_log, dt_bias)
            and dispatch.use_fast("gdn_gates", q)):
        return _decode_fla(q, k, v, a, b, A_log, dt_bias, initial_state, scale, use_qk_l2norm)
    g, beta = gdn_gates(a, b, A_log, dt_bias)
    return gated_delta_rule(q, k, v, g, beta, initial_state, scale, output_final_state=True,
                            use_qk_l2norm=use_qk_l2norm)


# ----------------------------------------------------------------------------- our decode-step kernel

DECODE = "gdn_decode"
_DECODE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: the largest key head dim the kernel holds in one block (the state tile is [BK, BV] float32)
DECODE_MAX_DK = 256


if triton is not None:

    @triton.jit
    def _softplus_f32(x):
        """``F.softplus`` (beta 1, threshold 20) of a float32 value: x above 20, else
        log1p(exp(x)), the log1p as ``log(u) * e / (u - 1)`` with ``u = 1 + e`` (exact where
        ``u`` rounds to 1), which keeps log1p's accuracy for small ``e``."""
        e = exp_f32(x)
        u = 1.0 + e
        lp = tl.where(u == 1.0, e, log_f32(u) * tl.math.div_rn(e, u - 1.0))
        return tl.where(x > 20.0, x, lp)

    @triton.jit
    def _gdn_decode_kernel(q_ptr, k_ptr, v_ptr, a_ptr, b_ptr, alog_ptr, dtb_ptr, s_ptr, o_ptr, len_ptr,
                           DK, DV, GROUP, scale, eps,
                           sq_b, sq_h, sq_d, sk_b, sk_h, sk_d, sv_b, sv_h, sv_d, sa_b, sa_h, sb_b, sb_h,
                           ss_b, ss_h, ss_k, ss_v, so_b, so_h,
                           L2NORM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
        """One gated-delta-rule step of batch row ``pid 0``, value head ``pid 1`` and value
        columns ``[pid 2 * BV, ...)`` (``gated_delta_rule_decode_``): the program owns that
        ``[dk, BV]`` column block of the state, so it updates it in place without a race."""
        i_b = tl.program_id(0).to(tl.int64)
        i_h = tl.program_id(1).to(tl.int64)
        i_hk = i_h // GROUP  # grouped value heads: q/k head h // (Hv / H)
        ok = tl.arange(0, BK)
        ov = tl.program_id(2) * BV + tl.arange(0, BV)
        mk, mv = ok < DK, ov < DV
        q = tl.load(q_ptr + i_b * sq_b + i_hk * sq_h + ok * sq_d, mask=mk, other=0.0).to(tl.float32)
        k = tl.load(k_ptr + i_b * sk_b + i_hk * sk_h + ok * sk_d, mask=mk, other=0.0).to(tl.float32)
        v = tl.load(v_ptr + i_b * sv_b + i_h * sv_h + ov * sv_d, mask=mv, other=0.0).to(tl.float32)
        if L2NORM:  # x / sqrt(sum x^2 + eps) (``l2norm``)
            q = q * tl.math.rsqrt(tl.sum(q * q, 0) + eps)
            k = k * tl.math.rsqrt(tl.sum(k * k, 0) + eps)
        # gates (``gdn_gates``): g = -exp(A_log) * softplus(a + dt_bias) in float32,
        # beta = sigmoid(b) rounded to b's dtype
        a = tl.load(a_ptr + i_b * sa_b + i_h * sa_h).to(tl.float32) + tl.load(dtb_ptr + i_h).to(tl.float32)
        g = -exp_f32(tl.load(alog_ptr + i_h).to(tl.float32)) * _softplus_f32(a)
        braw = tl.load(b_ptr + i_b * sb_b + i_h * sb_h)
        beta = tl.math.div_rn(1.0, 1.0 + exp_f32(-braw.to(tl.float32))).to(braw.dtype).to(tl.float32)
        # the step, in ``recurrent_gated_delta_rule_ref``'s order
        s_ptrs = s_ptr + i_b * ss_b + i_h * ss_h + ok[:, None] * ss_k + ov[None, :] * ss_v
        m2 = mk[:, None] & mv[None, :]
        S = tl.load(s_ptrs, mask=m2, other=0.0)
        S = S * exp_f32(g)  # decay
        u = beta * (v - tl.sum(k[:, None] * S, 0))  # beta (v - S^T k)
        S = S + k[:, None] * u[None, :]  # rank-1 update
        o = tl.sum((q * scale)[:, None] * S, 0)  # o = S'^T (q * scale)
        tl.store(o_ptr + i_b * so_b + i_h * so_h + ov, o.to(o_ptr.dtype.element_ty), mask=mv)
        if HAS_LENGTHS:  # an inert row (lengths 0) leaves its state as it was
            m2 = m2 & (tl.load(len_ptr + i_b + 0 * ok) > 0)[:, None]  # the row's length, broadcast
        tl.store(s_ptrs, S, mask=m2)


def _decode_launch(dk: int, dv: int) -> tuple[int, int, int]:
    """(BK, BV, num_warps) from the head dims alone: the whole key head in one block, value
    columns tiled so that a program's float32 state tile has at most 4096 elements (dk 128:
    [128, 32], a full 128-byte line per state row) and 16 of them per thread. ptxas for sm_90
    (CUDA 13.0, bf16, dk 64-256): 103-119 registers, no spills (32 per thread took 165-218)."""
    bk = next_pow2(dk)
    bv = min(next_pow2(dv), max(16, 4096 // bk))
    return bk, bv, max(1, min(8, bk * bv // 512))


def gated_delta_rule_decode_(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor,
                             dt_bias: Tensor, state: Tensor, scale: float | None = None,
                             use_qk_l2norm: bool = False, lengths: Tensor | None = None) -> Tensor:
    """One decode step of the gated delta rule as ONE Triton kernel that writes the new state
    IN PLACE into ``state`` [B, Hv, dk, dv] (float32); returns ``o [B, 1, Hv, dv]`` in v's dtype.

    q, k [B, 1, H, dk] and v [B, 1, Hv, dv] are read with their strides (views of the conv
    output, no copies); value head h reads q/k head ``h // (Hv / H)``; q and k are L2-normalised
    in the kernel (``use_qk_l2norm``); the gates come from the raw projections a, b [B, 1, Hv]
    and A_log, dt_bias [Hv] as ``gdn_gates`` computes them; then the step is
    ``recurrent_gated_delta_rule_ref``'s for T = 1, in float32. Rows with ``lengths[b] == 0``
    keep their state (their output is finite garbage). Only for a caller that owns ``state``
    (the decode engine's static buffers): whoever else holds the tensor sees it change. Launch
    config fixed by the shapes, no host read: CUDA-graph capturable. No autograd."""
    _check(q, k, v, a, b, state)
    B, T, H, dk = q.shape
    Hv, dv = v.shape[2], v.shape[3]
    if T != 1:
        raise ValueError(f"gated_delta_rule_decode_ is the one-token step, got T={T}")
    if state.dtype != torch.float32:
        raise ValueError(f"gated_delta_rule_decode_ updates a float32 state, got {state.dtype}")
    scale = dk ** -0.5 if scale is None else scale
    o = torch.empty(B, 1, Hv, dv, device=v.device, dtype=v.dtype)
    bk, bv, warps = _decode_launch(dk, dv)
    _gdn_decode_kernel[(B, Hv, triton.cdiv(dv, bv))](
        q, k, v, a, b, A_log, dt_bias, state, o, lengths if lengths is not None else state,
        dk, dv, Hv // H, float(scale), L2_EPS,
        q.stride(0), q.stride(2), q.stride(3), k.stride(0), k.stride(2), k.stride(3),
        v.stride(0), v.stride(2), v.stride(3), a.stride(0), a.stride(2), b.stride(0), b.stride(2),
        state.stride(0), state.stride(1), state.stride(2), state.stride(3), o.stride(0), o.stride(2),
        L2NORM=use_qk_l2norm, HAS_LENGTHS=lengths is not None, BK=bk, BV=bv, num_warps=warps,
        enable_fp_fusion=False)
    return o


def decode_case(B: int, H: int, Hv: int, dk: int, dv: int, dtype: torch.dtype, gen: torch.Generator,
                device: str = "cuda") -> tuple[Tensor, ...]:
    """Inputs of one decode step as the layer makes them, for the probe and the GPU tests:
    q, k [B, 1, H, dk] and v [B, 1, Hv, dv] as strided views of one conv output, raw gate
    projections a, b [B, 1, Hv] (a[0, 0, 0] = 30: softplus's identity branch), A_log, dt_bias [Hv]."""
    r = lambda *s: torch.randn(*s, generator=gen).to(device)  # noqa: E731
    qkv = r(B, 1, 2 * H * dk + Hv * dv).to(dtype)
    q = qkv[..., :H * dk].unflatten(-1, (H, dk))
    k = qkv[..., H * dk:2 * H * dk].unflatten(-1, (H, dk))
    v = qkv[..., 2 * H * dk:].unflatten(-1, (Hv, dv))
    a, b = (4 * r(B, 1, Hv)).to(dtype), (3 * r(B, 1, Hv)).to(dtype)
    a[0, 0, 0] = 30.0
    A_log = torch.empty(Hv).uniform_(1.0, 16.0, generator=gen).log().to(device)
    dt_bias = (-2 - 5 * torch.rand(Hv, generator=gen)).to(device)
    return q, k, v, a, b, A_log, dt_bias


def _probe_decode() -> None:
    """The in-place kernel on this GPU against ``gdn_gates`` + ``recurrent_gated_delta_rule_ref``
    (in float64 from the same gates): equal and grouped value heads, q/k/v as strided views of
    one conv output, bf16 and float32 inputs, a = 30 (softplus's identity branch), dv not a
    power of two, an inert row; the state must be updated in the given tensor."""
    if triton is None or not torch.cuda.is_available():
        raise RuntimeError("needs triton and a CUDA device")
    g0 = torch.Generator().manual_seed(0)
    for B, H, Hv, dk, dv, dt in ((3, 2, 2, 64, 64, torch.bfloat16), (2, 2, 8, 128, 128, torch.float32),
                                 (3, 1, 4, 32, 48, torch.bfloat16), (2, 2, 4, 128, 128, torch.float32)):
        q, k, v, a, b, A_log, dt_bias = decode_case(B, H, Hv, dk, dv, dt, g0)
        S = torch.randn(B, Hv, dk, dv, generator=g0).cuda()
        S0 = S.clone()
        lengths = (torch.arange(B) > 0).long().cuda() if dt == torch.bfloat16 else None
        with torch.no_grad():
            o = gated_delta_rule_decode_(q, k, v, a, b, A_log, dt_bias, S, use_qk_l2norm=True, lengths=lengths)
            g, beta = gdn_gates(a, b, A_log, dt_bias)
            o_r, S_r = recurrent_gated_delta_rule_ref(q.double(), k.double(), v.double(), g.double(), beta.double(),
                                                      S0.double(), use_qk_l2norm=True)
        if lengths is not None:  # the inert row 0 keeps its state bit for bit
            if not torch.equal(S[0], S0[0]):
                raise RuntimeError("gdn_decode changed the state of an inert row")
            S, S_r, o, o_r = S[1:], S_r[1:], o[1:], o_r[1:]
        if not torch.isfinite(o).all() or o.dtype != dt:
            raise RuntimeError(f"gdn_decode output is not finite {dt}")
        for name, x, y, tol in (("o", o, o_r, 1e-2 if dt == torch.bfloat16 else 1e-4), ("state", S, S_r, 1e-4)):
            err = dispatch.max_rel_err(x, y)
            if not err < tol:
                raise RuntimeError(f"gdn_decode differs from the reference ({name}, {dt}, H {H}, Hv {Hv}, dk {dk}, "
                                   f"dv {dv}: {err:.2e}; the state is updated in place)")


dispatch.fast_path(DECODE, probe=_probe_decode,
                   doc="own Triton kernel: the gdn decode step (gates, l2norm, recurrence) in one launch, "
                       "state updated in place (decode engine's static buffers)")


def decode_in_place_ok(q: Tensor, k: Tensor, v: Tensor, a: Tensor, b: Tensor, A_log: Tensor, dt_bias: Tensor,
                       state: Tensor | None, lengths: Tensor | None = None) -> bool:
    """Can ``gated_delta_rule_decode_`` run this step? One token, a float32 state, q/k/v of one
    dtype among float16 / bfloat16 / float32, dk <= ``DECODE_MAX_DK``, no gradient needed (the
    kernel has no backward), eager (not traced), on CUDA with the ``gdn_decode`` probe passed.
    Whether the caller owns ``state`` (may it be written in place?) is the caller's question."""
    if triton is None or state is None or q.shape[1] != 1 or state.dtype != torch.float32:
        return False
    if q.dtype not in _DECODE_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype or q.shape[-1] > DECODE_MAX_DK:
        return False
    tensors = [t for t in (q, k, v, a, b, A_log, dt_bias, state, lengths) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return not dispatch.tracing(q) and dispatch.use_fast(DECODE, *tensors)


def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    initial_state: Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    delta_rule: bool = True,
    states_at: Tensor | None = None,
) -> tuple[Tensor, Tensor | None] | tuple[Tensor, Tensor | None, Tensor]:
    """Gated delta rule with dispatch (see the module docstring).

    q, k: [B, T, H, dk]; v: [B, T, Hv, dv]; g (log decay, <= 0), beta: [B, T, Hv];
    initial_state: [B, Hv, dk, dv] | None (zeros). Returns ``(o [B, T, Hv, dv], state | None)``;
    with ``states_at`` ([n] token counts in ``[0, T]``) also the states after those many
    tokens, ``[B, n, Hv, dk, dv]`` (always the chunked reference, whatever the device).
    """
    _check(q, k, v, g, beta, initial_state)
    T = q.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if states_at is not None:
        return chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state, scale, output_final_state,
                                          use_qk_l2norm, chunk_size, delta_rule, states_at)
    if delta_rule and _fast_ok(q, v) and dispatch.use_fast("gdn", q, k, v, g, beta):
        return gated_delta_rule_fla(q, k, v, g, beta, initial_state, scale, output_final_state, use_qk_l2norm)
    if T == 1:
        return recurrent_gated_delta_rule_ref(q, k, v, g, beta, initial_state, scale, output_final_state,
                                              use_qk_l2norm, delta_rule)
    return chunk_gated_delta_rule_ref(q, k, v, g, beta, initial_state, scale, output_final_state,
                                      use_qk_l2norm, chunk_size, delta_rule)
