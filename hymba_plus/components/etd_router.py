"""``etd_router``: the controller of an ETD (encode-think-decode) model — how much it thinks
and how. The structure itself (which layer applications run, with which cache state) is
``models/etd.py``; this module holds the learned parts and their math:

* **Adaptive think iterations** (``halting.kind: act``): Adaptive Computation Time (Graves
  2016, arXiv 1603.08983, Eq. 1-14; as in the Universal Transformer, Dehghani et al. 2019,
  arXiv 1807.03819 §2.2) per token. After think iteration n a halting unit gives
  ``p_n = sigmoid(w · h_n + b)``; a token halts at the first n where ``sum_{i<=n} p_i >=
  threshold`` (or at ``max_iterations``), its output is ``sum_{i<N} p_i h_i + R h_N`` with
  the remainder ``R = 1 - sum_{i<N} p_i``, and the ponder cost ``tau * (N + R)`` (Eq. 8-10) joins
  the loss. A halted token is inactive in every later iteration: those layer applications
  never see it, so their states stay untouched, exactly as padding (``core/cache.py``).
  Each decision depends only on the token's own hidden states, which are causal, so a
  cached chunked forward takes the same decisions as the full forward.
* **Dr.LLM layer routes** (``layer_router``; Heakl et al. 2025, arXiv 2510.12773 §3): one
  bottleneck router per layer, ``Linear(d, hidden) -> GELU -> Linear(hidden, 3)`` over
  *windowed mean pooling* of the hidden states entering the layer (the sequence's real
  tokens cut into ``windows`` equal windows, each mean-pooled, the router's logits averaged
  over the windows), choosing skip / execute / repeat per sequence. The route is decided
  once, at the prefill (the call that starts a cache), and kept for decoding; routers are
  trained with the base frozen on routes found by search, with the paper's focal loss and
  class rebalancing by effective numbers (``focal_loss``, ``class_weights``). Until that
  training switches them on (``enable_routes``, a buffer saved with the weights) the routes
  are all-execute: the base trains as a plain ETD model, as Dr.LLM retrofits routers to a
  trained model.
* **MoDr branches** (``branches``; Mixture-of-Depth-Recurrent Transformers, ICLR 2026):
  ``n_branches`` LoRA branches (Hu et al. 2021, arXiv 2106.09685: ``W x + (alpha / r) B A x``)
  on every projection (``nn.Linear``) of the think blocks' token mixers and dense MLPs; a
  hard-gate router picks one branch per think iteration and token (``argmax(softmax + bias)``;
  the chosen branch's output is scaled by its softmax probability, so the router learns), and
  the bias is updated from the branch load after every optimizer step, without an auxiliary
  loss (DeepSeek-V3, arXiv 2412.19437 §2.1.2).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.config import spec
from ..core.registry import register

SKIP, EXECUTE, REPEAT = 0, 1, 2
ROUTE_NAMES = ("skip", "execute", "repeat")


@dataclass(frozen=True)
class HaltingConfig:
    kind: str = spec("none", choices=("none", "act"), doc="none: fixed iterations; act: adaptive per token")
    ponder_cost: float = spec(0.01, min=0.0, doc="tau: weight of the ponder cost N + R in the loss")
    threshold: float = spec(0.99, gt=0.0, max=1.0, doc="1 - epsilon: halt once the summed p reaches it")
    init_bias: float = spec(-2.0, doc="initial bias of the halting unit (negative: think longer at first)")


@dataclass(frozen=True)
class LayerRouterConfig:
    enabled: bool = False
    hidden: int = spec(64, min=1, doc="bottleneck width of each router MLP")
    windows: int = spec(4, min=1, doc="windowed mean pooling: windows per sequence")
    focal_gamma: float = spec(2.0, min=0.0, doc="focal loss gamma of router training")
    class_balance: bool = spec(True, doc="router training weighs the route classes by their effective numbers "
                                         "(Dr.LLM: beta 0.999; ~inverse frequency at a batch's counts); false: "
                                         "every target weighs the same")


@dataclass(frozen=True)
class BranchConfig:
    n_branches: int = spec(0, min=0, max=64, doc="LoRA branches in the think block (0 = off)")
    rank: int = spec(4, min=1)
    alpha: float = spec(8.0, gt=0.0, doc="LoRA scale alpha / rank")
    bias_update_rate: float = spec(1e-3, min=0.0, doc="gamma of the loss-free balancing bias update")


@dataclass(frozen=True)
class EtdRouterConfig:
    halting: HaltingConfig = field(default_factory=HaltingConfig)
    layer_router: LayerRouterConfig = field(default_factory=LayerRouterConfig)
    branches: BranchConfig = field(default_factory=BranchConfig)

    def check_recipe(self, model, components):  # noqa: ANN001 - ModelConfig, name -> config
        """ACT halting needs room to halt: with at most one think iteration every token halts at
        it, the ponder cost is a constant and the halting unit gets no gradient. MoDr branches
        need a projection to adapt in the think block: a token mixer or a dense MLP
        (``_lora_target``); think layers of ``-+moe`` / ``-+none`` alone would build branches
        and a branch router that change nothing."""
        etd = model.etd
        if etd is not None and self.halting.kind == "act" and etd.cap < 2:
            yield "halting.kind", ("act with model.etd.max_iterations 1 (the cap; default: iterations) halts every "
                                   "token at the only think iteration: the halting unit would learn nothing (set "
                                   "max_iterations >= 2, or kind: none)")
        if etd is None or not self.branches.n_branches:
            return
        from ..core.recipe import resolve_layers

        think = resolve_layers(model)[etd.encoder_layers:etd.encoder_layers + etd.think_layers]
        if think and not any(s.mixer != "none" or s.ffn == "mlp" for s in think):
            yield "branches.n_branches", ("the think layers have no token mixer and no mlp ffn: MoDr's LoRA "
                                          "branches would adapt nothing (set n_branches: 0)")


class LayerRouter(nn.Module):
    """Dr.LLM's bottleneck router of one layer: windowed mean pooling -> MLP -> 3 logits."""

    def __init__(self, d_model: int, hidden: int, windows: int):
        super().__init__()
        self.windows = windows
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, 3)

    def forward(self, x: Tensor, valid: Tensor | None) -> Tensor:
        """x [B, S, D], valid [B, S] or None (the real tokens, anywhere in the row: padding, or
        the tokens ACT has not halted) -> logits [B, 3]."""
        B, S, _ = x.shape
        n = valid.sum(1) if valid is not None else torch.full((B,), S, device=x.device)
        # each real token's rank among its row's real tokens (its position when they come first)
        t = (valid.long().cumsum(1) - 1).clamp_min(0) if valid is not None else torch.arange(S, device=x.device)[None]
        # window of each slot: floor(rank * W / n) for the real ones; inert slots get weight 0
        w = torch.clamp(t * self.windows // n.clamp_min(1)[:, None], max=self.windows - 1)
        onehot = F.one_hot(w, self.windows).to(x.dtype)  # [B, S, W]
        if valid is not None:
            onehot = onehot * valid[..., None].to(x.dtype)
        count = onehot.sum(1)  # [B, W]
        pooled = torch.einsum("bsw,bsd->bwd", onehot, x) / count.clamp_min(1)[..., None]
        logits = self.down(F.gelu(self.up(pooled)))  # [B, W, 3]
        used = (count > 0).to(x.dtype)
        return (logits * used[..., None]).sum(1) / used.sum(1, keepdim=True).clamp_min(1)


def focal_loss(logits: Tensor, target: Tensor, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Focal loss (Lin et al. 2017, arXiv 1708.02002, Eq. 5) with per-class weights, as
    Dr.LLM trains its routers (most searched routes are 'execute': the classes are skewed).
    logits [N, C], target [N] -> scalar."""
    logp = F.log_softmax(logits.float(), -1)
    lp = logp.gather(-1, target[:, None]).squeeze(-1)
    # (1 - p) kept above 0: at p == 1 (a confident router) its power's derivative is infinite for
    # gamma < 1, and 0 * inf made the gradient NaN (the true limit is 0)
    loss = -((1 - lp.exp()).clamp_min(torch.finfo(lp.dtype).tiny) ** gamma) * lp
    if weight is not None:
        w = weight.to(loss)[target]
        return (loss * w).sum() / w.sum().clamp_min(1e-12)
    return loss.mean()


#: Dr.LLM's class rebalancing: effective number of samples with this beta (its README)
EFFECTIVE_NUMBER_BETA = 0.999


def class_weights(targets: Tensor, n_classes: int = 3, beta: float = EFFECTIVE_NUMBER_BETA) -> Tensor:
    """Class weights by the effective number of samples (Cui et al. 2019, arXiv 1901.05555, Eq. 3:
    ``w_c ∝ (1 - beta) / (1 - beta^n_c)``), as Dr.LLM rebalances its focal loss (beta 0.999),
    from the counts of ``targets`` (the batch's); classes never seen get weight 0, the rest are
    normalised to mean 1. At a batch's counts (n_c << 1 / (1 - beta)) this is close to inverse
    frequency; at thousands of samples a class it flattens towards equal weights."""
    counts = torch.bincount(targets.flatten(), minlength=n_classes).double()
    effective = (1.0 - beta ** counts) / (1.0 - beta)
    w = torch.where(counts > 0, 1.0 / effective.clamp_min(1e-12), torch.zeros_like(counts))
    return (w / w[counts > 0].mean()).float()


@register("etd_router", config=EtdRouterConfig, kind="router")
class ETDRouter(nn.Module):
    """The learned controller of an ETD model (see the module docstring). Built by
    ``models/etd.py`` when the recipe has ``model.etd``; ``n_layers`` is the model's layer
    count (one layer router each) and ``think`` the think blocks (LoRA targets)."""

    def __init__(self, cfg: EtdRouterConfig, *, d_model: int, n_layers: int, think: list[nn.Module] | None = None,
                 **_: object):
        super().__init__()
        self.cfg = cfg
        self.d_model = d_model
        self.halt = None
        if cfg.halting.kind == "act":
            self.halt = nn.Linear(d_model, 1)
        self.routers = None
        if cfg.layer_router.enabled:
            lr = cfg.layer_router
            self.routers = nn.ModuleList(LayerRouter(d_model, lr.hidden, lr.windows) for _ in range(n_layers))
            # Dr.LLM retrofits routers to a trained base: until router training switches them on
            # (saved with the weights), every route is all-execute and the routers are not asked
            self.register_buffer("routes_on", torch.zeros((), dtype=torch.bool), persistent=True)
        # ``routes_on`` on the host (``routing``): set by ``enable_routes``, read from the buffer at load
        self._routes_on = False
        self.n_branches = cfg.branches.n_branches
        self.branch_router = None
        self._gate: Tensor | None = None  # [B, S, n_branches] set around each think application
        if self.n_branches:
            br = cfg.branches
            self.branch_router = nn.Linear(d_model, self.n_branches, bias=False)
            self.register_buffer("bias", torch.zeros(self.n_branches), persistent=True)
            self.register_buffer("load", torch.zeros(self.n_branches), persistent=False)
            self.lora_a = nn.ParameterList()
            self.lora_b = nn.ParameterList()
            self._targets: list[nn.Linear] = []
            for blk in think or []:
                for name, mod in blk.named_modules():
                    if isinstance(mod, nn.Linear) and _lora_target(blk, name):
                        self._attach(mod, br.rank)

    # ------------------------------------------------------------------ init
    def reset_special(self) -> None:
        if self.halt is not None:
            nn.init.zeros_(self.halt.weight)
            nn.init.constant_(self.halt.bias, self.cfg.halting.init_bias)
        if self.n_branches:
            for a, b in zip(self.lora_a, self.lora_b):
                nn.init.normal_(a, 0.0, 1.0 / math.sqrt(a.shape[0]))
                nn.init.zeros_(b)  # every branch starts as the base model
            self.bias.zero_()

    # ------------------------------------------------------------------ halting (ACT)
    def halting_prob(self, h: Tensor) -> Tensor:
        assert self.halt is not None
        return torch.sigmoid(self.halt(h).squeeze(-1).float())

    # ------------------------------------------------------------------ Dr.LLM routes
    @property
    def routing(self) -> bool:
        """True once the routers are trained (``enable_routes``): they then decide the routes."""
        return self.routers is not None and self._routes_on

    def enable_routes(self, on: bool = True) -> None:
        self.routes_on.fill_(on)
        self._routes_on = bool(on)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.routers is not None:  # one read, at load (``routing`` read the buffer at every forward: a
            # host sync, and a graph break under torch.compile)
            self._routes_on = bool(self.routes_on)

    def route_logits(self, layer: int, x: Tensor, valid: Tensor | None) -> Tensor:
        assert self.routers is not None
        return self.routers[layer](x, valid)

    # ------------------------------------------------------------------ MoDr branches
    def _attach(self, linear: nn.Linear, rank: int) -> None:
        n, i = self.n_branches, len(self._targets)
        self.lora_a.append(nn.Parameter(torch.empty(linear.in_features, n * rank)))
        self.lora_b.append(nn.Parameter(torch.empty(n * rank, linear.out_features)))
        self.lora_a[-1]._no_muon = True  # small adapters: AdamW
        self.lora_b[-1]._no_muon = True
        self._targets.append(linear)
        # a partial of a bound method (not a lambda): deepcopy / pickling of the model rebind it
        linear.register_forward_hook(functools.partial(self._lora, i))

    def _lora(self, i: int, mod: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> Tensor:
        x = inputs[0]
        gate = self._gate
        if gate is None:  # outside a think application (or no branches chosen): the base layer
            return out
        if x.shape[:-1] != gate.shape[:-1]:
            if x.dim() == 2 and x.shape[0] == gate.shape[0] * gate.shape[1]:
                gate = gate.reshape(-1, gate.shape[-1])
            else:
                raise RuntimeError(f"MoDr branches: a think-block projection saw input {tuple(x.shape)}, "
                                   f"expected [B, S, d] with B, S = {tuple(gate.shape[:2])}")
        r = self.cfg.branches.rank
        z = (x @ self.lora_a[i].to(x.dtype)).unflatten(-1, (self.n_branches, r)) * gate[..., None].to(x.dtype)
        delta = z.flatten(-2) @ self.lora_b[i].to(x.dtype)
        return out + delta * (self.cfg.branches.alpha / r)

    def choose_branches(self, h: Tensor, valid: Tensor | None) -> tuple[Tensor, Tensor]:
        """(gate [B, S, n]: the chosen branch's probability at its index, 0 elsewhere; choice
        [B, S]). The load of the tokens ``valid`` marks ([B, S] or None: every slot; the ETD stack
        passes the text tokens: not padding, not the meta tokens, and with ACT only those still
        thinking) is accumulated for ``update_bias``."""
        assert self.branch_router is not None
        logits = self.branch_router(h).float()
        prob = torch.softmax(logits, -1)
        # the bias shifts the choice on the probability scale (DeepSeek-V3 adds it to affinities
        # in [0, 1]), so a bounded bias can always rebalance whatever the logits' scale
        choice = torch.argmax(prob.detach() + self.bias, dim=-1)
        onehot = F.one_hot(choice, self.n_branches).to(prob.dtype)
        if self.training:
            counted = onehot if valid is None else onehot * valid[..., None].to(onehot.dtype)
            self.load += counted.detach().sum(dim=(0, 1))
        return prob * onehot, choice

    def set_gate(self, gate: Tensor | None) -> None:
        self._gate = gate

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing: raise the bias of under-loaded branches, lower the others'. No load
        counted leaves the biases as they are (every sign is 0) without asking the device."""
        if not self.n_branches:
            return
        err = self.load.mean() - self.load
        self.bias += self.cfg.branches.bias_update_rate * torch.sign(err)
        self.load.zero_()


def _lora_target(block: nn.Module, name: str) -> bool:
    """Projections of the token mixer and of a dense MLP ffn (not MoE routers/experts, which
    see flattened tokens, and not the Dr.LLM routers)."""
    top = name.split(".")[0]
    if top == "mixer":
        return True
    ffn = getattr(block, "ffn", None)
    return top == "ffn" and ffn is not None and getattr(ffn, "registry_name", "") == "mlp"
