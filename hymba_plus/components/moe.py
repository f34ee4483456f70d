"""Mixture of experts channel mixer (Qwen3-Next "ultra-sparse" MoE), registered as ``moe``.

    logits = x W_r                                             router (one linear map)
    E_n, w_n = top-k routing of softmax(logits) or sigmoid(logits) (+ balancing bias b)
    y_n = sum_{e in E_n} w_n,e SwiGLU_e(x_n)                   routed experts
        + sigmoid(x_n W_g) * SwiGLU_shared(x_n)                 shared expert(s), Qwen3-Next gate

* Routing: Switch Transformer (Fedus et al. 2021, arXiv 2101.03961, Eq. 1-2) with top-k and
  renormalized top-k weights (Qwen3-Next / Qwen3-MoE ``norm_topk_prob``); or sigmoid scores
  with DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437, Eq. 15-16, §2.1.2):
  a per-expert bias ``b`` is added to the scores for *selection only*, and after each
  optimizer step ``b_e += rate * sign(mean load - load_e)`` (``update_bias``). A loaded
  nonzero bias keeps taking part in selection with ``bias_update_rate: 0`` (frozen).
* Experts are SwiGLU (Shazeer 2020, Eq. 6) with weights stacked as tensors,
  ``w_gate_up [E, d, 2h]`` (gate columns first) and ``w_down [E, h, d]``; the shared
  expert(s) are one SwiGLU of width ``n_shared * d_shared`` scaled by ``sigmoid(x W_g)``.
* Losses, per layer, added to ``ctx.aux_losses`` times their coefficients:
  load balancing ``E * sum_e f_e P_e`` (Switch Eq. 4-6; 1 at uniform routing) and router
  z-loss ``mean logsumexp(logits)^2`` (ST-MoE, arXiv 2202.08906, Eq. 5).
* ``balance_loss`` says over which tokens f and P are taken: ``per_layer`` (default) the
  micro-batch's, per layer; ``pooled`` HF's form, both pooled over the forward's MoE layers
  (``pooled_balance_loss``); ``global_batch`` the global-batch balance of Qwen3 / Qwen3-Next
  (Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873, §3):

      LBL = E * sum_e f_e^global P_e,   f_e^global = c_e / sum_e' c_e'   (c: counts so far)

  with P_e the micro-batch's differentiable mean router probability and c_e the expert's
  (real) assignments over the optimizer step's tokens so far: a float32 buffer per layer
  (``step_load``; a row per application of the layer in one call) to which each training
  micro-batch adds its counts, summed over the processes (one all-reduce of E+1 numbers per
  layer application where ``torch.distributed`` is initialised with several processes: the
  data-parallel group, every process of a ``hymba train`` under ``torchrun``). The last
  micro-batch of a step so sees the whole global batch's f (Megatron-core's
  ``global_aux_loss``); micro-batch balance instead pushes every micro-batch (often one
  sequence, one domain) to be uniform, which the paper shows keeps experts from
  specialising. The trainer zeroes the buffers after each optimizer step
  (``reset_step_loads``; code that trains the layer in its own loop calls it per step);
  they are not saved (a checkpoint is written between steps). With one process and
  ``grad_accum`` 1 the loss is ``per_layer``'s bit for bit. Forwards that train nothing
  (evaluation, no-grad, a checkpointed block's recomputation, whose backward uses the f its
  first run took) add nothing; evaluation and no-grad forwards take the micro-batch's own f.
  With ``aux_loss_coef`` 0 it counts nothing. The statistic ``lb_loss`` is the loss trained
  (global f). The fused layer (below) does not take it: such a layer runs composed.
* Statistics, per layer, in ``ctx.stats["moe/{layer}/..."]`` (detached tensors, no host
  sync): ``tokens_per_expert`` [E], ``dropped``, ``entropy`` (nats), ``lb_loss``, ``z_loss``,
  ``max_load`` (busiest expert's load / mean load). A layer applied several times in one call
  (an ETD think block's iterations, a Dr.LLM repeat) adds one aux loss per application and
  reports the counts (``tokens_per_expert``, ``dropped``) summed over its applications, the
  others as their mean (the trainer combines micro-batches and ranks the same way); the
  balancing bias counts every training application's load once.
* Inert slots (``t >= ctx.lengths[b]``) are excluded from losses, statistics, the bias
  update and expert capacity; their outputs are finite and discarded by the model. Meta
  tokens are tokens here: they count in the load, losses, statistics, capacity and bias
  update (the same rows in every sequence, so many meta tokens add a fixed load).
* Dispatch: ``hymba_plus.kernels.moe`` (sort by expert, grouped GEMM over contiguous
  segments with ``torch._grouped_mm`` on CUDA bf16, a padded batched matmul elsewhere).
  Dropless by default; ``capacity_factor`` enables Switch-style capacity in training
  mode only (evaluation and cached decoding stay dropless, so chunked and full forwards
  agree -- DESIGN §1).
* Fused layer: in the common training case (softmax, renormalized top-k, no bias, dropless,
  no padding slots) on eager CUDA in bf16, the whole layer -- router and shared gate GEMM,
  routing, experts, shared expert, both losses -- runs as ONE autograd node with a
  hand-written backward (``kernels.moe.moe_layer``, fast path ``moe_layer``); it equals
  this composed form (tests/test_moe.py) and only cuts the per-op launch and autograd cost.
* Decode steps: a few tokens without gradients (N top_k <= ``kernels.moe.DECODE_MAX_ASSIGNMENTS``)
  on CUDA take the composed form, whose routed experts are then two Triton kernels
  (``moe_decode``: no sort, capturable in the decode engine's CUDA graph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.cache import StepContext
from ..core.config import spec
from ..core.recompute import recomputing
from ..core.registry import register
from ..kernels import dispatch
from ..kernels import moe as K
from ..kernels.linear import project, stacked
from .mlp import MLPConfig, SwiGLU


@dataclass(frozen=True)
class MoEConfig:
    n_experts: int = spec(8, min=1)
    top_k: int = spec(2, min=1)
    n_shared: int = spec(1, min=0, doc="shared experts (0 = none), gated by sigmoid(x W_g)")
    d_expert: int | None = spec(None, min=1, doc="expert hidden size; default: (8/3 d_model) / (top_k + n_shared), "
                                                  "rounded up to 8, so active width matches a dense SwiGLU")
    d_shared: int | None = spec(None, min=1, doc="hidden size of each shared expert; default d_expert")
    score: str = spec("softmax", choices=("softmax", "sigmoid"))
    norm_topk: bool = True
    aux_loss_coef: float = spec(0.01, min=0.0)
    z_loss_coef: float = spec(0.001, min=0.0)
    bias_update_rate: float = spec(0.0, min=0.0, doc="aux-loss-free balancing step (DeepSeek-V3 gamma); 0 = no "
                                                         "updates (a loaded nonzero bias still routes)")
    capacity_factor: float | None = spec(None, gt=0.0, doc="None = dropless; else Switch capacity (training only)")
    balance_loss: str | None = spec(None, choices=("per_layer", "pooled", "global_batch"),
                                    doc="per_layer (default): aux_loss_coef x E sum_e f_e P_e added per layer, f "
                                        "summing to 1; pooled: HF's convention (Qwen3-MoE / Qwen3-Next "
                                        "router_aux_loss_coef): f (summing to top_k) and P pooled over every MoE "
                                        "layer of the forward, one loss times aux_loss_coef; global_batch: "
                                        "per layer, f over the optimizer step's micro-batches so far and every "
                                        "data-parallel process, P the micro-batch's (Qiu et al. 2025, arXiv "
                                        "2501.11873)")

    def expert_hidden(self, d_model: int) -> int:
        if self.d_expert is not None:
            return self.d_expert
        width = 8 * d_model / 3 / (self.top_k + self.n_shared)
        return max(8, (int(width) + 7) // 8 * 8)

    def shared_hidden(self, d_model: int) -> int:
        return self.d_shared if self.d_shared is not None else self.expert_hidden(d_model)

    def check(self, model):  # noqa: ANN001 - ModelConfig
        if self.top_k > self.n_experts:
            yield "top_k", f"must be <= n_experts ({self.n_experts}), got {self.top_k}"
        if self.top_k == 1 and self.norm_topk:
            yield "norm_topk", ("with top_k 1 the normalized weight is always 1 and the router gets no gradient "
                                "from the model loss; set norm_topk: false")
        if self.d_shared is not None and self.n_shared == 0:
            yield "d_shared", "is set but n_shared is 0 (no shared expert)"


@register("moe", config=MoEConfig, kind="ffn")
class MoE(nn.Module):
    """Routed SwiGLU experts + gated shared expert(s); see the module docstring."""

    def __init__(self, cfg: MoEConfig, *, d_model: int, model=None, recipe=None, **_: object):  # noqa: ANN001
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        E, h = cfg.n_experts, cfg.expert_hidden(d_model)
        self.d_expert = h
        self.router = nn.Linear(d_model, E, bias=False)
        self.w_gate_up = nn.Parameter(torch.empty(E, d_model, 2 * h))
        self.w_down = nn.Parameter(torch.empty(E, h, d_model))
        self.shared = self.shared_gate = None
        if cfg.n_shared:
            self.shared = SwiGLU(MLPConfig(d_hidden=cfg.n_shared * cfg.shared_hidden(d_model)), d_model=d_model)
            self.shared_gate = nn.Linear(d_model, 1, bias=False)
        # routing balance state, kept in float32 whatever the module dtype (see _apply)
        self.register_buffer("expert_bias", torch.zeros(E), persistent=True)
        self.register_buffer("load", torch.zeros(E), persistent=False)  # real assignments since update_bias
        # global-batch balance: [applications, E + 1] counts per expert and all assignments over the
        # optimizer step so far, summed over processes (a row per application of the layer in one call)
        self.register_buffer("step_load", torch.zeros(1, E + 1) if cfg.balance_loss == "global_batch" else None,
                             persistent=False)
        # the bias takes part in selection when balancing updates it or a loaded one is nonzero (a
        # model trained with balancing, then fine-tuned or evaluated with the rate at 0, keeps its routes)
        self._bias_active = cfg.bias_update_rate > 0
        self._init_std = float(getattr(model, "init_std", 0.02))
        self._n_layers = max(1, len(recipe.layers)) if recipe is not None else 1
        # auto | grouped | padded (kernels.moe.moe_experts) | fused (kernels.moe.moe_layer); benchmarks, tests
        self.impl = "auto"
        self.reset_special()

    # ------------------------------------------------------------------ init / bookkeeping
    def reset_special(self) -> None:
        """Expert weights: normal(0, init_std); the down projection is residual-scaled like
        every ``is_residual_out`` Linear (std / sqrt(2 n_layers))."""
        with torch.no_grad():
            nn.init.normal_(self.w_gate_up, 0.0, self._init_std)
            nn.init.normal_(self.w_down, 0.0, self._init_std / (2 * self._n_layers) ** 0.5)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        bias, load, step_load = self.expert_bias, self.load, self.step_load
        out = super()._apply(fn, recurse)
        dev = self.expert_bias.device
        self.expert_bias = bias.to(device=dev, dtype=torch.float32)
        self.load = load.to(device=dev, dtype=torch.float32)
        if step_load is not None:
            self.step_load = step_load.to(device=dev, dtype=torch.float32)
        return out

    def active_parameters(self) -> int:
        """Parameters one token uses: router, top_k routed experts, shared expert(s) and gate."""
        per_expert = self.w_gate_up[0].numel() + self.w_down[0].numel()
        n = self.router.weight.numel() + self.cfg.top_k * per_expert
        if self.shared is not None:
            n += sum(p.numel() for p in self.shared.parameters()) + self.shared_gate.weight.numel()
        return n

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._bias_active = self.cfg.bias_update_rate > 0 or bool(self.expert_bias.any())  # one read, at load

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3 auxiliary-loss-free balancing step, from the load counted since the
        last call (training forwards only): ``b_e += rate * sign(mean load - load_e)``.
        The trainer calls it once per optimizer step (``update_expert_biases(model)``). No
        load counted leaves the biases as they are (every sign is 0) without asking the device."""
        rate = self.cfg.bias_update_rate
        if rate > 0:
            self.expert_bias += rate * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

    # ------------------------------------------------------------------ forward
    def forward(self, x: Tensor, ctx: StepContext | None = None) -> Tensor:
        cfg = self.cfg
        B, T, D = x.shape
        xf = x.reshape(-1, D)
        valid = ctx.valid if ctx is not None else None
        vflat = valid.reshape(-1) if valid is not None else None
        cap = limit = None
        if cfg.capacity_factor is not None and self.training:
            # from the real tokens: one host read where the chunk has padding slots; while a CUDA graph
            # is captured or the step traced (no host read) the buffers are sized from every slot and
            # the real tokens' capacity, computed on the device, limits what an expert keeps: the same drops
            n = xf.shape[0]
            if vflat is not None and (dispatch.capturing() or dispatch.tracing(xf)):
                limit = K.expert_capacity(vflat.sum(), cfg.top_k, cfg.n_experts, cfg.capacity_factor)
            elif vflat is not None:
                n = int(vflat.sum())
            cap = K.expert_capacity(n, cfg.top_k, cfg.n_experts, cfg.capacity_factor)
        if self._fused(xf, vflat, cap):  # the whole layer as one autograd node (eager CUDA)
            sh = self.shared
            y, aux, load, lb, z, ent = K.moe_layer(
                xf, self.router.weight, None if sh is None else self.shared_gate.weight, self.w_gate_up, self.w_down,
                *(() if sh is None else (sh.w_gate.weight, sh.w_up.weight, sh.w_down.weight)),
                top_k=cfg.top_k, aux_coef=cfg.aux_loss_coef, z_coef=cfg.z_loss_coef)
            if ctx is not None:
                self._log(ctx, aux if cfg.aux_loss_coef > 0 or cfg.z_loss_coef > 0 else None, load,
                          torch.zeros((), dtype=torch.long, device=x.device), ent, lb, z, xf.shape[0] * cfg.top_k)
            return y.view(B, T, D)
        # the router and the shared-expert gate read x through one GEMM (one dx in backward),
        # its rows zero-padded to a multiple of 8 (16-byte aligned for the tensor-core GEMMs);
        # without autograd (decoding) ``project``: one GEMM on the decode engine's packed
        # weights, else two (a concatenation per step would cost more than it saves)
        if self.shared_gate is None:
            logits, gate_logit = self.router(xf), None
        elif not torch.is_grad_enabled():
            logits, gate_logit = project(xf, self.router, self.shared_gate)
            gate_logit = gate_logit[:, 0]
        else:
            w = torch.cat([self.router.weight, self.shared_gate.weight])
            both = F.linear(xf, F.pad(w, (0, 0, 0, -w.shape[0] % 8)))
            logits, gate_logit = both[:, : cfg.n_experts], both[:, cfg.n_experts]
        r = K.route(logits, cfg.top_k, cfg.score, cfg.norm_topk, self.expert_bias if self._bias_active else None)
        y, dropped, counts = K.moe_experts(xf, r.experts, r.weights.to(x.dtype), self.w_gate_up, self.w_down,
                                           capacity=cap, inert=None if vflat is None else ~vflat, impl=self.impl,
                                           capacity_limit=limit)
        if self.shared is not None:
            sh = self.shared
            y = K.shared_expert(y, xf, gate_logit, stacked(sh.w_gate, sh.w_up)[0], sh.w_down.weight)
        self._account(r, dropped, counts, vflat, ctx)
        return y.view(B, T, D)

    def _fused(self, xf: Tensor, valid: Tensor | None, cap: int | None) -> bool:
        """Take ``kernels.moe.moe_layer``? Its case: softmax scores, renormalized top-k, no
        balancing bias, dropless, no padding slots; with ``impl`` auto only where its fast
        path applies (``fused_layer_supported``) and the few-token experts path does not
        (``decode_supported``: no gradient, a decode step), with ``impl`` fused always (else
        an error)."""
        cfg = self.cfg
        if self.impl not in ("auto", "fused") or xf.shape[0] == 0:  # no tokens: the composed path's early exit
            return False
        case = (cfg.score == "softmax" and cfg.norm_topk and not self._bias_active and cap is None
                and valid is None and cfg.balance_loss not in ("pooled", "global_batch"))
        if self.impl == "auto" and K.decode_supported(xf, cfg.top_k, self.w_gate_up, self.w_down, capacity=cap):
            return False  # a decode step: the composed layer, its experts as the moe_decode kernels
        if self.impl == "fused":
            if not case:
                raise ValueError("impl 'fused' needs softmax scores, norm_topk, no bias balancing, no capacity, "
                                 "no padding slots and balance_loss per_layer")
            return True
        return case and K.fused_layer_supported(xf, self.router.weight, self.w_gate_up, self.w_down, cfg.top_k)

    def _account(self, r: K.Routing, dropped: Tensor, counts: Tensor, valid: Tensor | None,
                 ctx: StepContext | None) -> None:
        cfg = self.cfg
        # every assignment is a real token's unless some are padding: then count the real ones
        load = counts.float() if valid is None else K.expert_load(r.experts, cfg.n_experts, valid)
        if self.training and cfg.bias_update_rate > 0 and torch.is_grad_enabled() and not recomputing():
            # a pass that trains this layer (once: not a checkpointed block's second run)
            self.load += load  # (not a no-grad read in train mode: LaDiR's flow stage reads the frozen LM)
        if ctx is None or not ctx.collect:  # no context, or a decode step: nobody reads losses / stats
            return
        if cfg.balance_loss == "global_batch" and cfg.aux_loss_coef > 0:
            lb = self._global_balance_loss(r.probs, load, valid, ctx)
        else:
            lb = K.load_balancing_loss(r.probs, load, cfg.top_k, valid)
        z = K.router_z_loss(r.logits, valid, r.lse)
        aux = cfg.aux_loss_coef * lb if cfg.aux_loss_coef > 0 and cfg.balance_loss != "pooled" else None
        if cfg.aux_loss_coef > 0 and cfg.balance_loss == "pooled":
            probs = r.probs.float() if valid is None else r.probs.float() * valid.reshape(-1, 1)
            n = r.probs.shape[0] if valid is None else valid.sum()
            ctx.pooled.setdefault("moe_balance", (pooled_balance_loss, []))[1].append(
                (load.float(), probs.sum(0), n, cfg.aux_loss_coef))
        if cfg.z_loss_coef > 0:
            aux = cfg.z_loss_coef * z if aux is None else torch.add(aux, z, alpha=cfg.z_loss_coef)
        self._log(ctx, aux, load, dropped, K.routing_entropy(r.probs.detach(), valid), lb, z,
                  r.experts.numel() if valid is None else None)

    def _global_balance_loss(self, probs: Tensor, load: Tensor, valid: Tensor | None, ctx: StepContext) -> Tensor:
        """Global-batch balance loss (Qiu et al. 2025, arXiv 2501.11873): ``E * sum_e f_e P_e``
        with f from this application's row of ``step_load`` (the step's counts so far, every
        process's), P this micro-batch's. A training pass adds its counts (all-reduced) first;
        a recomputation adds nothing and its backward uses the factors the first run made (kept
        by ``_FirstRunFactor``: other calls of the model before the backward may have added to
        the row since); other forwards use their own counts. Written as ``load_balancing_loss`` of the step's counts times (this micro-batch's
        assignments / the step's), which is 1 exactly where the step is this micro-batch."""
        cfg = self.cfg
        k = cfg.top_k
        n = load.new_full((1,), probs.shape[0] * k) if valid is None else valid.sum(dtype=torch.float32).mul(k)[None]
        local = torch.cat([load.float(), n])  # [E + 1]: counts per expert, then all real assignments
        total = local
        if self.training and torch.is_grad_enabled():
            row = ctx.shared.get(_applications_key(ctx), 0)  # this application of the layer (``_log`` counts them)
            if row >= self.step_load.shape[0]:  # a layer applied more often than before: rows for it
                more = self.step_load.new_zeros(row + 1 - self.step_load.shape[0], self.step_load.shape[1])
                self.step_load = torch.cat([self.step_load, more])
            if not recomputing():
                add = local
                if tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1:
                    add = local.clone()
                    tdist.all_reduce(add)  # the data-parallel group: every process's micro-batch
                self.step_load[row] += add
            total = self.step_load[row].clone()  # (a view would share the buffer's version counter: the
            # next application's in-place update would invalidate what this loss saved for its backward)
        # ``K.load_balancing_loss`` of the step's counts, the factors made from them kept by this run
        # (``_FirstRunFactor``): a checkpointed block's recomputation would read the row as a later call of
        # the model before the backward left it (LaDiR's encoder, then decoder, pass)
        lb = K.load_balancing_loss(probs, total[: cfg.n_experts], k, valid, weigh=_FirstRunFactor.apply)
        return _FirstRunFactor.apply(lb, local[-1].to(lb.dtype) / total[-1].to(lb.dtype).clamp_min(1.0))

    def _log(self, ctx: StepContext, aux: Tensor | None, load: Tensor, dropped: Tensor, entropy: Tensor,
             lb: Tensor, z: Tensor, n_assign: int | None) -> None:
        """Append the aux loss; record the layer's statistics. ``n_assign``: the number of real
        assignments when the host knows it (no padding), else None."""
        if aux is not None:
            ctx.aux_losses.append(aux)
        p = f"moe/{ctx.layer_idx}/"
        if n_assign is not None:  # the mean load is known on the host
            max_load = load.max() * (self.cfg.n_experts / max(n_assign, 1))
        else:
            max_load = load.max() / load.mean().clamp_min(1e-9)
        means = {"entropy": entropy, "lb_loss": lb.detach(), "z_loss": z.detach(), "max_load": max_load}
        # an ETD think block (or a Dr.LLM repeat) applies this layer several times in one call, each
        # application adding its own aux loss: counts are summed over the applications, the others
        # are their mean (the call's context counts them in ``shared``, a per-call scratch dict)
        n = ctx.shared.get(_applications_key(ctx), 0) + 1
        ctx.shared[_applications_key(ctx)] = n
        if n == 1:
            ctx.stats[p + "tokens_per_expert"] = load
            ctx.stats[p + "dropped"] = dropped
            for k, v in means.items():
                ctx.stats[p + k] = v
            return
        ctx.stats[p + "tokens_per_expert"] = ctx.stats[p + "tokens_per_expert"] + load
        ctx.stats[p + "dropped"] = ctx.stats[p + "dropped"] + dropped
        for k, v in means.items():
            ctx.stats[p + k] = torch.lerp(ctx.stats[p + k], v.to(ctx.stats[p + k].dtype), 1.0 / n)  # running mean


def _applications_key(ctx: StepContext) -> str:
    """The call's count of this layer's applications so far (``ctx.shared``, a per-call scratch dict)."""
    return f"moe/{ctx.layer_idx}/applications"


class _FirstRunFactor(torch.autograd.Function):
    """``x * w`` with ``w`` (no gradient) kept by this run for the backward, not a saved tensor:
    a checkpointed block's recomputation refills the saved tensors from its second run, which
    for global-batch balance would read the step's counts as later calls left them."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # noqa: ANN001
        ctx.w = w
        return x * w

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: ANN001, ANN205
        return g * ctx.w, None


def pooled_balance_loss(terms: list) -> Tensor:
    """HF's balancing loss (``load_balancing_loss_func`` of Qwen3-MoE / Qwen3-Next) from the
    per-layer terms ``(load [E], sum of router probs [E], rows, coef)`` of one forward:
    ``coef * E * sum_e (sum_layers load_e / N) (sum_layers P_e / N)`` with N the rows of all
    layers together. Its f sums to top_k (ours per layer: 1), and one coefficient scales the
    pooled loss (ours: one per layer)."""
    load = torch.stack([t[0] for t in terms]).sum(0)
    probs = torch.stack([t[1] for t in terms]).sum(0)
    n = sum(t[2] for t in terms)
    n = n.clamp_min(1.0) if isinstance(n, Tensor) else max(n, 1)
    return terms[0][3] * load.shape[0] * ((load / n) * (probs / n)).sum()


def reset_step_loads(model: nn.Module) -> int:
    """Zero every MoE layer's global-batch counts (``balance_loss: global_batch``; in place: a
    CUDA graph's replays keep updating the same buffer). The trainer calls it after each
    optimizer step; returns the number of layers reset."""
    n = 0
    for m in model.modules():
        if isinstance(m, MoE) and m.step_load is not None:
            m.step_load.zero_()
            n += 1
    return n


def update_expert_biases(model: nn.Module) -> int:
    """Apply every MoE layer's aux-loss-free bias update (call after each optimizer step);
    returns the number of MoE layers visited."""
    n = 0
    for m in model.modules():
        if isinstance(m, MoE):
            m.update_bias()
            n += 1
    return n
