"""The recipe's optional ``train:`` section (defaults for ``hymba train``)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.config import spec


@dataclass(frozen=True)
class TrainConfig:
    steps: int = spec(200, min=1)
    batch_size: int = spec(16, min=1)
    seq_len: int = spec(128, min=1)
    lr: float = spec(3e-3, gt=0.0)
    weight_decay: float = spec(0.0, min=0.0)
    warmup_steps: int = spec(20, min=0)
    schedule: str = spec("cosine", choices=("cosine", "wsd", "constant"))
    grad_clip: float = spec(1.0, min=0.0)
    grad_accum: int = spec(1, min=1)
    optimizer: str = spec("muon", choices=("adamw", "muon"))
    seed: int = 0
    data: str = spec("mqar", doc="built-in task name or a path")
    eval_every: int = spec(50, min=1)
    save_every: int = spec(100, min=1)
    keep_last: int = spec(2, min=1)

    def check(self, model):  # noqa: ANN001 - ModelConfig
        if self.seq_len > model.max_seq_len:
            yield "seq_len", f"must be <= model.max_seq_len ({model.max_seq_len}), got {self.seq_len}"
