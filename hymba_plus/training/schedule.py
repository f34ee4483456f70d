"""Learning-rate schedules: a pure function of the step, so a checkpoint needs only the step.

``lr_factor(step, ...)`` is the multiplier for optimizer step ``step`` (0-based):

* warmup: linear from ``1 / warmup`` to 1 over the first ``warmup`` steps;
* ``cosine``: then half a cosine from 1 down to ``min_frac`` at the last step;
* ``wsd`` (warmup-stable-decay, Hu et al. 2024, MiniCPM): 1 until the last
  ``decay_frac * steps`` steps, then linear down to ``min_frac``;
* ``constant``: 1 after warmup.
"""

from __future__ import annotations

import math


def lr_factor(step: int, total: int, warmup: int = 0, kind: str = "cosine", min_frac: float = 0.0,
              decay_frac: float = 0.2) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        span = max(total - warmup - 1, 1)
        t = min(max(step - warmup, 0) / span, 1.0)
        return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t))
    if kind == "wsd":
        n_decay = int(round(decay_frac * total))
        start = total - n_decay
        if n_decay <= 0 or step < start:
            return 1.0
        t = min((step - start + 1) / n_decay, 1.0)
        return 1.0 - (1 - min_frac) * t
    raise ValueError(f"unknown schedule {kind!r}")


def from_config(cfg, step: int) -> float:  # noqa: ANN001 - TrainConfig
    return lr_factor(step, cfg.steps, cfg.warmup_steps, cfg.schedule, cfg.min_lr_frac, cfg.decay_frac)
