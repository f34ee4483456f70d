"""The autoregressive objective: position t predicts token t + 1 (cross entropy)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..core.config import spec
from ..core.registry import register
from .base import Objective


@dataclass(frozen=True)
class NextTokenConfig:
    kind: str = spec("next_token", choices=("next_token",))


@register("next_token", config=NextTokenConfig, kind="objective")
class NextToken(Objective):
    """Next-token cross entropy (``HybridLM.lm_loss``) plus the model's auxiliary losses."""

    def __init__(self, cfg: NextTokenConfig | None = None, **_: Any):
        super().__init__()
        self.cfg = cfg or NextTokenConfig()

    def train_forward(self, fwd, model, ids: Tensor, labels: Tensor, batch: Any = None, *,  # noqa: ANN001, ANN201
                      return_logits: bool = False, **kw: Any):
        """The training forward: ``fwd`` is the model or its compiled form; returns a ModelOutput
        whose ``loss`` is trained. Without ``return_logits`` its ``logits`` are None: the loss
        comes from the final hidden states and the LM head's weight without materialising the
        ``[B, T, V]`` logits (``HybridLM.hidden_lm_loss``); the trainer asks for them when it
        reads them (``--distill``)."""
        return fwd(ids, labels=labels, check_inputs=False, return_logits=return_logits, **kw)

    def train_items(self, ids: Tensor, labels: Tensor, batch: Any = None) -> Tensor:
        """The next-token targets the loss is the mean over: position t predicts ``labels[t + 1]``,
        so ``labels[:, 1:]`` that are not -100 (the trainer passes no attention mask:
        ``models.lm.next_token_targets``). An MTP loss added to it (``components/mtp.py``, a mean
        over depths of means over fewer positions of the same rows) rides on this weight, as it
        rides on the next-token loss (DeepSeek-V3's lambda * L_MTP)."""
        return (labels[:, 1:] != -100).sum()

    def eval_batch(self, fwd, model, ids: Tensor, labels: Tensor, seed: int, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """(loss, correct, scored, ModelOutput) of one held-out batch."""
        from ..training.tasks import masked_correct

        out = fwd(ids, check_inputs=False, **kw)
        c, t = masked_correct(out.logits, labels)
        return float(model.lm_loss(out.logits, labels)), c, t, out
