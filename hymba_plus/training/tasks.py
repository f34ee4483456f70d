"""Built-in synthetic tasks (no files needed). Each returns ``(input_ids, labels)`` with
``labels`` aligned to ``input_ids`` (the loss predicts ``labels[t+1]`` at position t) and
-100 wherever nothing is scored, so ``masked_accuracy`` measures the task itself.

* MQAR — multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927):
  key/value pairs, then the keys again in random order, each followed by its value.
* selective copy — (Mamba, Gu & Dao 2023, arXiv 2312.00752 §4.1.1): a few data tokens
  scattered among noise tokens; after a delimiter the model writes them in order.
* parity — running parity (state tracking; Grazzi et al. 2024, arXiv 2411.12537):
  bits interleaved with the parity of every bit so far; each parity token is scored.

The training stream draws *one sample per global sample index* from a generator seeded
by ``(seed, index)`` (``Task.sample``), so a data position is one integer, a resumed run
continues the identical stream, and the samples do not depend on how they are split
into micro-batches or over ranks. ``mqar_batch`` is the batched torch form used by the
component tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


class TaskError(ValueError):
    """A task that cannot be built for this seq_len / vocab (one line)."""


# --------------------------------------------------------------------------- MQAR (torch, batched)


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
    correct, total = masked_correct(logits, labels)
    return correct / total if total else 0.0


def masked_correct(logits: Tensor, labels: Tensor) -> tuple[int, int]:
    """(correct, scored) next-token predictions where ``labels[t+1] != -100``."""
    pred = logits[:, :-1].argmax(-1)
    tgt = labels[:, 1:]
    m = tgt != -100
    return int((pred[m] == tgt[m]).sum()), int(m.sum())


# --------------------------------------------------------------------------- per-sample tasks


def _mqar_pairs(seq_len: int, vocab: int, cfg: Any) -> int:
    n = getattr(cfg, "mqar_pairs", None)
    return n if n is not None else min(vocab // 2 - 1, seq_len // 4)


def _mqar_validate(seq_len: int, vocab: int, cfg: Any) -> None:
    if vocab < 4:
        raise TaskError(f"mqar needs model.vocab_size >= 4, got {vocab}")
    n = _mqar_pairs(seq_len, vocab, cfg)
    if n < 1 or 4 * n > seq_len:
        raise TaskError(f"mqar with {n} pairs needs seq_len >= {4 * max(n, 1)}, got {seq_len}")
    if n > vocab // 2 - 1:
        raise TaskError(f"mqar: mqar_pairs ({n}) must be <= vocab_size/2 - 1 ({vocab // 2 - 1})")


def _mqar_sample(rng: np.random.Generator, seq_len: int, vocab: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    n = _mqar_pairs(seq_len, vocab, cfg)
    half = vocab // 2
    keys = rng.permutation(half - 1)[:n] + 1
    vals = rng.integers(half, vocab, n)
    perm = rng.permutation(n)
    ids = np.zeros(seq_len, dtype=np.int64)
    ids[0 : 2 * n : 2], ids[1 : 2 * n : 2] = keys, vals
    ids[2 * n : 4 * n : 2], ids[2 * n + 1 : 4 * n : 2] = keys[perm], vals[perm]
    labels = np.full(seq_len, -100, dtype=np.int64)
    labels[2 * n + 1 : 4 * n : 2] = vals[perm]
    return ids, labels


def _copy_tokens(seq_len: int, cfg: Any) -> int:
    n = getattr(cfg, "copy_tokens", None)
    return n if n is not None else max(1, seq_len // 8)


def _copy_validate(seq_len: int, vocab: int, cfg: Any) -> None:
    if vocab < 5:
        raise TaskError(f"selective_copy needs model.vocab_size >= 5, got {vocab}")
    n = _copy_tokens(seq_len, cfg)
    if 2 * n + 1 > seq_len:
        raise TaskError(f"selective_copy of {n} tokens needs seq_len >= {2 * n + 1}, got {seq_len}")


def _copy_sample(rng: np.random.Generator, seq_len: int, vocab: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """``noise.. d1 .. d2 noise .. dn .. | DELIM d1 d2 .. dn``: 1 = noise, 2 = delimiter,
    data tokens from [3, V); the copies after the delimiter are scored."""
    n = _copy_tokens(seq_len, cfg)
    region = seq_len - n - 1
    data = rng.integers(3, vocab, n)
    where = np.sort(rng.permutation(region)[:n])
    ids = np.ones(seq_len, dtype=np.int64)
    ids[where] = data
    ids[region] = 2
    ids[region + 1 :] = data
    labels = np.full(seq_len, -100, dtype=np.int64)
    labels[region + 1 :] = data
    return ids, labels


def _parity_validate(seq_len: int, vocab: int, cfg: Any) -> None:
    if vocab < 5:
        raise TaskError(f"parity needs model.vocab_size >= 5, got {vocab}")
    if seq_len < 2:
        raise TaskError(f"parity needs seq_len >= 2, got {seq_len}")


def _parity_sample(rng: np.random.Generator, seq_len: int, vocab: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """``x1 p1 x2 p2 ...``: bits x in {1, 2} (0/1), running parity p in {3, 4} (even/odd);
    every p is scored."""
    n = seq_len // 2
    bits = rng.integers(0, 2, n)
    par = np.cumsum(bits) % 2
    ids = np.zeros(seq_len, dtype=np.int64)
    ids[0 : 2 * n : 2] = bits + 1
    ids[1 : 2 * n : 2] = par + 3
    labels = np.full(seq_len, -100, dtype=np.int64)
    labels[1 : 2 * n : 2] = par + 3
    return ids, labels


@dataclass(frozen=True)
class Task:
    name: str
    doc: str
    validate: Callable[[int, int, Any], None]
    sample: Callable[[np.random.Generator, int, int, Any], tuple[np.ndarray, np.ndarray]]
    chance: Callable[[int, Any], float]

    def batch(self, indices: "range | list[int]", seed: int, seq_len: int, vocab: int, cfg: Any,
              stream: int = 0) -> tuple[Tensor, Tensor]:
        """The samples with these global indices: [B, seq_len] ids and labels (int64).

        ``stream`` separates independent streams of one seed (0 = train, 1 = eval)."""
        ids, labels = zip(*(self.sample(np.random.default_rng([seed, stream, i]), seq_len, vocab, cfg)
                            for i in indices))
        return torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels))


TASKS: dict[str, Task] = {
    "mqar": Task("mqar", "multi-query associative recall", _mqar_validate, _mqar_sample,
                 lambda vocab, cfg: 1.0 / (vocab - vocab // 2)),
    "selective_copy": Task("selective_copy", "copy the data tokens scattered among noise",
                           _copy_validate, _copy_sample, lambda vocab, cfg: 1.0 / (vocab - 3)),
    "parity": Task("parity", "running parity of a bit stream", _parity_validate, _parity_sample,
                   lambda vocab, cfg: 0.5),
}
