"""Built-in synthetic tasks (no files needed). Each returns ``(input_ids, labels)`` with
``labels`` aligned to ``input_ids`` (the loss predicts ``labels[t+1]`` at position t) and
-100 wherever nothing is scored, so ``masked_accuracy`` measures the task itself.

* MQAR — multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927):
  key/value pairs, then the keys again in random order, each followed by its value.
"""

from __future__ import annotations

import torch
from torch import Tensor


def mqar_batch(
    batch_size: int,
    seq_len: int,
    vocab_size: int,
    n_pairs: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Keys come from [1, V/2), values from [V/2, V); token 0 pads the tail.

    Layout: ``k1 v1 k2 v2 ... kN vN | kq1 vq1 kq2 vq2 ... | 0 0 ...``; only the query values
    are scored. Chance accuracy is 1 / (V - V/2).
    """
    half = vocab_size // 2
    n_keys = half - 1
    if n_pairs is None:
        n_pairs = min(n_keys, seq_len // 4)
    if n_pairs < 1 or 4 * n_pairs > seq_len or n_pairs > n_keys:
        raise ValueError(f"mqar: need 1 <= n_pairs <= min(seq_len/4, vocab/2 - 1), got n_pairs={n_pairs}, "
                         f"seq_len={seq_len}, vocab_size={vocab_size}")
    g = generator
    keys = torch.rand(batch_size, n_keys, generator=g).argsort(-1)[:, :n_pairs] + 1
    vals = torch.randint(half, vocab_size, (batch_size, n_pairs), generator=g)
    perm = torch.rand(batch_size, n_pairs, generator=g).argsort(-1)
    qk, qv = keys.gather(1, perm), vals.gather(1, perm)
    ctx = torch.stack([keys, vals], -1).flatten(1)
    qry = torch.stack([qk, qv], -1).flatten(1)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    ids[:, : 2 * n_pairs] = ctx
    ids[:, 2 * n_pairs : 4 * n_pairs] = qry
    labels = torch.full_like(ids, -100)
    labels[:, 2 * n_pairs + 1 : 4 * n_pairs : 2] = qv
    return ids, labels


def masked_accuracy(logits: Tensor, labels: Tensor) -> float:
    """Accuracy of next-token predictions where ``labels[t+1] != -100``."""
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    m = tgt != -100
    return float((pred[m] == tgt[m]).float().mean()) if bool(m.any()) else 0.0
