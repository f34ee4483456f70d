"""Multi-token prediction modules (DeepSeek-V3, arXiv 2412.19437 §2.2, Eq. 21-25).

``model.mtp: {depth: D, weight: lambda, block: GA}`` adds D sequential modules after the
trunk. Module i (1-based) at position t joins the previous depth's hidden state
(the trunk's for i = 1, before the final norm) with the embedding of token t + i:

    h_i^t  = Block_i( M_i [ RMSNorm(h_{i-1}^t) ; RMSNorm(Emb(x_{t+i})) ] )     (Eq. 21-22)
    p_i^t  = softmax( Head( FinalNorm(h_i^t) ) )        predicts x_{t+i+1}    (Eq. 23)
    L_MTP  = lambda / D * sum_i CE(p_i, x_{.+i+1})                            (Eq. 24-25)

The embedding, the final norm and the head are the trunk's (shared); each module owns its
projection M_i (2d -> d), its two norms and one block of the recipe's ``block`` token
(any mixer, with its channel mixer), built with the recipe's component settings. Training
adds the loss to the next-token loss and logs ``mtp/loss_i`` per depth. At inference the
modules draft tokens for self-speculative decoding (``generate(mode="mtp")``); each
module's block keeps its own cache state (``new_cache``), advanced only over positions
whose inputs are verified tokens (``models/mtp_decoding.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from ..blocks import Block
from ..core.cache import HybridCache, StepContext
from ..core.pattern import parse_pattern
from ..core.recompute import run_block
from ..core.registry import register
from .norm import RMSNorm


@register("mtp", config=None, kind="head")
class MTP(nn.Module):
    def __init__(self, cfg: Any, *, recipe: Any, first_layer_idx: int, **_: Any):
        super().__init__()
        m = recipe.model
        self.cfg = cfg
        self.depth = cfg.depth
        spec = parse_pattern(cfg.block, m.ffn)[0]
        norm = lambda: RMSNorm(m.d_model, m.norm.eps, m.norm.zero_centered)  # noqa: E731
        self.norm_h = nn.ModuleList(norm() for _ in range(cfg.depth))
        self.norm_e = nn.ModuleList(norm() for _ in range(cfg.depth))
        self.proj = nn.ModuleList(nn.Linear(2 * m.d_model, m.d_model, bias=False) for _ in range(cfg.depth))
        self.blocks = nn.ModuleList(Block(spec, recipe, first_layer_idx + i) for i in range(cfg.depth))

    def new_cache(self, batch_size: int, device: torch.device, dtype: torch.dtype) -> HybridCache:
        """One state per module's block (its ``pos`` is unused: the decoder passes positions)."""
        return HybridCache([b.init_state(batch_size, device, dtype) for b in self.blocks], batch_size, device)

    def step(self, i: int, h_prev: Tensor, emb: Tensor, ctx: StepContext, state: Any = None) -> Tensor:
        """Module ``i`` (0-based): the hidden states [B, T, d] from the previous depth's and the
        embeddings of the tokens i + 1 ahead (Eq. 21-22)."""
        x = self.proj[i](torch.cat([self.norm_h[i](h_prev), self.norm_e[i](emb)], dim=-1))
        return self.blocks[i](x, ctx, state)

    def losses(self, model: Any, trunk: Tensor, ids: Tensor, labels: Tensor, positions: Tensor,
               parent: StepContext) -> tuple[Tensor, list[Tensor]]:
        """(lambda * mean over the depths that score a target, [loss of each depth]) for unpadded
        rows: ``trunk`` [B, T, d] the trunk's last hidden states (before the final norm) at the real
        tokens, ``positions`` theirs. Depth i (0-based) uses the positions t <= T - i - 2 and
        predicts x_{t+i+2}; ``labels`` -100 are not scored (as the next-token loss); a depth with
        no scored target adds 0 (and leaves the mean). The modules' blocks add their auxiliary
        losses and statistics (a MoE block's balance / z losses, routing statistics) to ``parent``,
        the trunk's ``StepContext``, as every layer of the trunk does (DeepSeek-V3 balances every
        MoE layer, the MTP modules' included). With activation checkpointing on
        (``model.set_activation_checkpointing(N)``) module i is checkpointed where the trunk's
        application i would be (every N-th, counted from the first module)."""
        T = ids.shape[1]
        ck = model.structure.checkpointing
        h, per, scored = trunk, [], []
        for i in range(self.depth):
            n = T - i - 1  # positions whose input token x_{t+i+1} exists
            if n < 2:  # no position left with a target
                break
            # the trunk's context (its n_meta, losses and statistics) at this depth's positions
            ctx = dataclasses.replace(parent, positions=positions[:, :n], lengths=None, shared={}, bidirectional=False,
                                      two_stream=None)
            h_in, emb = h[:, :n], model.embed_tokens(ids[:, i + 1:i + 1 + n])
            h = run_block(lambda c, i=i, h_in=h_in, emb=emb: self.step(i, h_in, emb, c), ctx, ck.at(i), h_in)
            # the trunk's loss one more token ahead: position t predicts labels[t + i + 2]; the shared
            # head's loss without its [B, n, V] logits (kernels.linear_ce)
            target = labels[:, i + 1:i + 1 + n]
            has = (target[:, 1:] != -100).any()  # (the last position's target is past the end)
            loss = model.hidden_lm_loss(model.norm(h), target)  # NaN (0 / 0) when nothing is scored
            per.append(torch.where(has, loss, torch.zeros_like(loss)))  # its gradient then 0, not NaN
            scored.append(has)
        if not per:
            return trunk.new_zeros(()), per
        return self.cfg.weight * torch.stack(per).sum() / torch.stack(scored).sum().clamp_min(1), per
