"""Hymba parallel heads (Dong et al., "Hymba: A Hybrid-head Architecture for Small
Language Models", arXiv 2411.13676, §2.1 Eq. 1-2).

Attention heads and SSM heads read the *same* input in parallel; each branch's output is
normalized, scaled per channel by a learned vector, and the two are averaged before one
shared output projection:

    Y = W_out ( beta_1 * norm(Attn(X)) + beta_2 * norm(SSM(X)) ) / 2        (Eq. 2)

* attention heads: the ``gated_attn`` machinery (GQA, q/k norm, partial RoPE, sigmoid
  output gate, optional sliding window — Hymba uses SWA in most layers, with the model's
  meta tokens always visible), configured by ``hymba.attn``;
* SSM heads: ``ssm: mamba3 | gdn`` — the registered mixer of that name configured by the
  recipe's own ``components.mamba3`` / ``components.gdn`` section, used up to (not
  including) its output projection through its ``inner()`` method;
* both branches must produce the same width: the attention heads' ``n_heads * head_dim``
  equals the SSM's inner width (``head_dim`` defaults to that width / ``n_heads``);
* ``attn.kv_share``: consecutive ``hymba`` layers pair up and the second reuses the first's
  keys/values (cross-layer KV sharing, §2.3; plain stacks only: an ETD model refuses it).

Differences from the released model (nvidia/Hymba-1.5B), by design: the attention heads are
``gated_attn``'s (output gate, q/k norm and partial RoPE where configured; the paper's have
none of the three); q, k and v share one head dim (the release's values are twice as wide);
``norm`` here is an RMSNorm with its own zero-centred weight, so each branch's per-channel
scale is ``beta * (1 + w)`` (the release folds beta into the norm weight: the same family of
functions, one vector more a branch); every ``hymba`` layer shares one config, so one window
(the paper's global hybrid layers are expressed with plain ``GA`` layers, as ``hymba_tiny``).

State: ``HymbaState`` nests the attention state and the SSM state.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..core import registry
from ..core.cache import LayerState, StepContext
from ..core.config import spec
from ..core.registry import register
from ..core.two_stream import recurrent_two_stream
from .attention import KV_SHARE_ETD, AttentionState, GatedAttention, GatedAttentionConfig, kv_role_of
from .norm import RMSNorm

SSM_CHOICES = ("mamba3", "gdn")


@dataclass(frozen=True)
class HymbaConfig:
    ssm: str = spec("mamba3", choices=SSM_CHOICES, doc="the SSM heads' mixer")
    attn: GatedAttentionConfig = field(default_factory=GatedAttentionConfig)
    beta_init: float = spec(1.0, gt=0.0, doc="initial per-channel branch scale")

    @property
    def kv_share(self) -> bool:
        return self.attn.kv_share

    def uses(self) -> tuple[str, ...]:
        """Other components this one builds (the loader validates their sections too)."""
        return (self.ssm,)

    def check_recipe(self, model, components):  # noqa: ANN001 - ModelConfig, name -> config
        """Cross-component rule: the attention heads' width must equal the SSM's."""
        ssm_cfg = components[self.ssm]
        width = ssm_cfg.inner_dim(model.d_model)
        if self.attn.head_dim is None:
            if width % self.attn.n_heads:
                yield "attn.n_heads", (f"must divide the {self.ssm} inner width ({width}) "
                                       "when attn.head_dim is not given")
        elif self.attn.head_dim * self.attn.n_heads != width:
            yield "attn.head_dim", (f"attn.n_heads * attn.head_dim ({self.attn.n_heads * self.attn.head_dim}) "
                                    f"must equal the {self.ssm} inner width ({width})")
        if self.attn.n_heads % self.attn.kv_heads():
            yield "attn.n_kv_heads", f"must divide attn.n_heads ({self.attn.n_heads})"
        if self.attn.kv_share and model.etd is not None:
            yield "attn.kv_share", KV_SHARE_ETD


@dataclass
class HymbaState(LayerState):
    attn: AttentionState | None = None
    ssm: LayerState | None = None


@register("hymba", config=HymbaConfig, aliases=("HY",))
class Hymba(nn.Module):
    #: a verify chunk records: both branches do (attention, and gdn or mamba3)
    records_states = True

    def __init__(self, cfg: HymbaConfig, *, d_model: int, recipe=None, layer_idx: int = 0, **kw: object):  # noqa: ANN001
        super().__init__()
        self.cfg = cfg
        ssm_cfg = recipe.component(cfg.ssm) if recipe is not None else registry.get(cfg.ssm).config()
        width = ssm_cfg.inner_dim(d_model)
        attn_cfg = cfg.attn
        if attn_cfg.head_dim is None:
            attn_cfg = dataclasses.replace(attn_cfg, head_dim=width // attn_cfg.n_heads)
        role = kv_role_of(recipe, layer_idx)
        self.attn = GatedAttention(attn_cfg, d_model=d_model, project_out=False, kv_role=role)
        self.ssm = registry.build(cfg.ssm, ssm_cfg, d_model=d_model, recipe=recipe, layer_idx=layer_idx, **kw)
        # the SSM's own output projection is replaced by the shared one below
        self.ssm.out_proj = None
        self.attn_norm = RMSNorm(width)
        self.ssm_norm = RMSNorm(width)
        self.beta_attn = nn.Parameter(torch.full((width,), cfg.beta_init))
        self.beta_ssm = nn.Parameter(torch.full((width,), cfg.beta_init))
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.out_proj.is_residual_out = True

    def reset_special(self) -> None:
        nn.init.constant_(self.beta_attn, self.cfg.beta_init)
        nn.init.constant_(self.beta_ssm, self.cfg.beta_init)

    def init_state(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HymbaState:
        return HymbaState(attn=AttentionState(), ssm=self.ssm.init_state(batch_size, device, dtype))

    def state_nbytes(self, seq_len: int, dtype: torch.dtype, *, n_meta: int = 0) -> int:
        """Attention heads' cache plus the SSM heads' constant state."""
        return self.attn.state_nbytes(seq_len, dtype, n_meta=n_meta) + self.ssm.state_nbytes(
            seq_len, dtype, n_meta=n_meta)

    def forward(self, x: Tensor, ctx: StepContext, state: HymbaState | None = None) -> Tensor:
        a = self.attn(x, ctx, state.attn if state is not None else None)
        a = a.reshape(*x.shape[:2], -1)
        if ctx.two_stream is not None:  # block diffusion: the SSM heads from the clean block starts
            s = recurrent_two_stream(self.ssm, x, ctx, inner=True)
        else:
            s = self.ssm.inner(x, ctx, state.ssm if state is not None else None)
        y = 0.5 * (self.beta_attn * self.attn_norm(a) + self.beta_ssm * self.ssm_norm(s))
        return self.out_proj(y)
