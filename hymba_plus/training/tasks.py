"""Built-in synthetic tasks (no files needed). Each returns ``(input_ids, labels)`` with
``labels`` aligned to ``input_ids`` (the loss predicts ``labels[t+1]`` at position t) and
-100 wherever nothing is scored, so ``masked_accuracy`` measures the task itself.

* MQAR — multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927):
  key/value pairs, then the keys again in random order, each followed by its value.
* selective copy — (Mamba, Gu & Dao 2023, arXiv 2312.00752 §4.1.1): a few data tokens
  scattered among noise tokens; after a delimiter the model writes them in order.
* parity — running parity (state tracking; Grazzi et al. 2024, arXiv 2411.12537):
  bits interleaved with the parity of every bit so far; each parity token is scored.
* k-hop — pointer chasing (sequential reasoning steps, for depth-recurrent models): a
  random cycle over N nodes written as shuffled ``a b ;`` triples, then every node as a
  query followed directly by the node k pointers on; only those answers are scored
  (``khop_hops``, ``khop_nodes``).

The training stream draws *one sample per global sample index* from a generator seeded
by ``(seed, index)`` (``Task.sample``), so a data position is one integer, a resumed run
continues the identical stream, and the samples do not depend on how they are split
into micro-batches or over ranks. ``mqar_batch`` is the batched torch form used by the
component tests.

Held out (``Task.heldout``): eval reads a fixed set, the first ``min(HELDOUT, S // 4)``
*distinct* samples of the eval stream (``default_rng([seed, 1, i])``, i = 0, 1, ...; S the
task's number of distinct samples at its settings, ``Task.space``), and the training stream
never draws one of them: a training sample whose ids are in the set (a digest of its
``input_ids``, which define it) is redrawn from the same generator until it is not. Where
nothing collides (MQAR at the defaults: ~10^200 distinct samples) the training stream is
the one of earlier versions bit for bit (no draw is spent on the check). Where the space is
small (parity at seq_len 16: 2^8 inputs) the held-out set is a quarter of it, which the
stream says in one line (``TaskStream.note``); a space of fewer than 4 samples is refused
(``Task.check``): nothing could be held out that training does not also see.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


class TaskError(ValueError):
    """A task that cannot be built for this seq_len / vocab (one line); ``settings``: the train settings
    (``TrainConfig`` fields) whose values it refuses, where it names them (``hymba train``: exit 2 when a
    flag gave one, or none was set)."""

    def __init__(self, message: str, settings: tuple[str, ...] = ()):
        super().__init__(message)
        self.settings = settings


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


def _mqar_space(seq_len: int, vocab: int, cfg: Any) -> int:
    """Ordered distinct keys, any values, any query order: each gives other ids."""
    n, half = _mqar_pairs(seq_len, vocab, cfg), vocab // 2
    return math.perm(half - 1, n) * (vocab - half) ** n * math.factorial(n)


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


def _copy_space(seq_len: int, vocab: int, cfg: Any) -> int:
    n = _copy_tokens(seq_len, cfg)
    return (vocab - 3) ** n * math.comb(seq_len - n - 1, n)


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


def _parity_space(seq_len: int, vocab: int, cfg: Any) -> int:
    return 2 ** (seq_len // 2)


def _khop_hops(cfg: Any) -> int:
    k = getattr(cfg, "khop_hops", None)
    return k if k is not None else 2


def _khop_nodes(seq_len: int, vocab: int, cfg: Any) -> int:
    n = getattr(cfg, "khop_nodes", None)
    return n if n is not None else min(vocab - 3, (seq_len - 1) // 5)


def _khop_validate(seq_len: int, vocab: int, cfg: Any) -> None:
    k = _khop_hops(cfg)
    if k < 1:
        raise TaskError(f"khop needs khop_hops >= 1, got {k}")
    if vocab < 2 * k + 4:
        raise TaskError(f"khop with {k} hops needs model.vocab_size >= {2 * k + 4} ({2 * k + 1} nodes + 3 specials), "
                        f"got {vocab}")
    n = _khop_nodes(seq_len, vocab, cfg)
    if n > vocab - 3:
        raise TaskError(f"khop: khop_nodes ({n}) must be <= vocab_size - 3 ({vocab - 3})")
    if n < 2 * k + 1:
        default = ("" if getattr(cfg, "khop_nodes", None) is not None else
                   f" (the default min(vocab_size - 3, (seq_len - 1) / 5) at seq_len {seq_len}: "
                   f"seq_len >= {10 * k + 6} holds enough)")
        raise TaskError(f"khop with {k} hops needs >= {2 * k + 1} nodes, got {n}{default}")
    if 5 * n + 1 > seq_len:
        raise TaskError(f"khop with {n} nodes needs seq_len >= {5 * n + 1}, got {seq_len}")


def _khop_sample(rng: np.random.Generator, seq_len: int, vocab: int, cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """k-hop pointer chasing over N = ``khop_nodes`` nodes, k = ``khop_hops``.

    Tokens: 0 pads the tail, 1 ends each pair, 2 separates the graph from the queries;
    nodes are [3, N + 3). The graph is one random cycle through all N nodes (a random
    cyclic permutation f), written as its N pairs ``a f(a) 1`` in random order; then every
    node once, in random order, each followed by the node k pointers on::

        a1 f(a1) 1  a2 f(a2) 1 ... aN f(aN) 1 | 2 | q1 f^k(q1) q2 f^k(q2) ... qN f^k(qN) | 0 0 ...

    Only the answers f^k(q) are scored, and each query is followed directly by its k-hop
    answer (no step f(q), ..., f^(k-1)(q) is written next to it), so a causal model must
    chase the k pointers inside its forward pass at the query token. The pair end tells
    sources from targets (without it a node's role is the parity of its position; a
    2-layer attention model learned k = 1 much faster with it). N >= 2k + 1, so an answer
    is never its query and f^k is no involution (whose earlier answers would give later
    ones away). Because every node is queried, a later query whose cycle neighbour was
    queried before has a route of 3 lookups whatever k (a hop or inverse hop to the
    neighbour, find it among the queries, an inverse hop or hop from its answer): k <= 3
    needs the full k lookups, larger k only partly.

    Chance: distinct queries have distinct answers (f^k is a bijection), so a guess among
    the nodes that are neither the query nor an earlier answer scores
    (H_N - 1) / (N - 1) + 1 / N over the N queries (H_N the N-th harmonic number; 0.37 at
    N = 8, 0.22 at N = 16): ``chance``. Models that cannot chase k pointers settle there.
    """
    k, n = _khop_hops(cfg), _khop_nodes(seq_len, vocab, cfg)
    cycle = rng.permutation(n)  # cycle[0] -> cycle[1] -> ... -> cycle[n - 1] -> cycle[0]
    where = np.empty(n, dtype=np.int64)
    where[cycle] = np.arange(n)
    src = rng.permutation(n)  # the order the pairs are written in
    dst = cycle[(where[src] + 1) % n]
    qry = rng.permutation(n)
    ans = cycle[(where[qry] + k) % n]
    ids = np.zeros(seq_len, dtype=np.int64)
    ids[0 : 3 * n : 3], ids[1 : 3 * n : 3], ids[2 : 3 * n : 3] = src + 3, dst + 3, 1
    ids[3 * n] = 2
    q0 = 3 * n + 1
    ids[q0 : q0 + 2 * n : 2], ids[q0 + 1 : q0 + 2 * n : 2] = qry + 3, ans + 3
    labels = np.full(seq_len, -100, dtype=np.int64)
    labels[q0 + 1 : q0 + 2 * n : 2] = ans + 3
    return ids, labels


def _khop_space(seq_len: int, vocab: int, cfg: Any) -> int:
    """(N - 1)! cycles, N! orders of the pairs, N! orders of the queries."""
    n = _khop_nodes(seq_len, vocab, cfg)
    return math.factorial(n - 1) * math.factorial(n) ** 2


def _khop_chance(vocab: int, cfg: Any) -> float:
    """Query i of N (0-based) is answered by guessing among N - i - 1 nodes (not the query,
    not the i earlier answers), or N - i when the query is itself an earlier answer
    (probability i / (N - 1)); the last one is certain."""
    n = max(2, _khop_nodes(getattr(cfg, "seq_len", 128), vocab, cfg))
    harmonic = sum(1.0 / j for j in range(1, n + 1))
    return (harmonic - 1.0) / (n - 1) + 1.0 / n


#: the most samples a built-in task holds out for eval (``Task.heldout``)
HELDOUT = 4096


def heldout_count(space: int) -> int:
    """How many distinct samples a built-in task of ``space`` distinct samples holds out: ``HELDOUT``,
    or a quarter of a smaller space (so that training keeps most of it and a redraw ends soon); 0 is
    too few (``too_few_to_hold_out``)."""
    return min(HELDOUT, space // 4)


def sample_key(ids: np.ndarray) -> bytes:
    """What identifies a sample: a 128-bit digest of its token ids (which define its labels)."""
    return hashlib.blake2b(np.ascontiguousarray(ids, dtype=np.int64).tobytes(), digest_size=16).digest()


def first_distinct(n: int, draw: Callable[[int], Any], key: Callable[[Any], bytes]) -> dict[bytes, Any]:
    """The held-out set of a stream: ``draw(i)`` for i = 0, 1, ... until ``n`` distinct ``key``s (a repeat
    of an earlier key skipped), by key in drawing order. Ends where n is at most the number of distinct
    samples, each of positive probability (``heldout_size``: a quarter of them at most)."""
    found: dict[bytes, Any] = {}
    i = 0
    while len(found) < n:
        found.setdefault(key(item := draw(i)), item)
        i += 1
    return found


def redrawn(rng: np.random.Generator, draw: Callable[[np.random.Generator], Any], key: Callable[[Any], bytes],
            exclude: frozenset[bytes] | None) -> Any:
    """``draw(rng)``, drawn again from the same generator while its ``key`` is held out (``exclude``): the
    first draw stands where it is not, so a stream is unchanged wherever nothing collides."""
    item = draw(rng)
    while exclude and key(item) in exclude:
        item = draw(rng)
    return item


def heldout_note(setting: str, n: int, space: int, what: str = "samples") -> str | None:
    """One line when the held-out ``n`` are 1% or more of the ``space`` distinct ``what`` (the trainer logs it)."""
    if 100 * n < space:
        return None
    return (f"note: {setting} has {space:,} distinct {what}: {n:,} of them ({n / space:.0%}) are held out for eval "
            "and never trained on (training draws from the rest)")


def too_few_to_hold_out(setting: str, space: int, what: str = "samples") -> TaskError:
    """The one-line refusal of a space of fewer than 4 distinct samples (nothing can be held out)."""
    return TaskError(f"{setting} has {space} distinct {what}: too few to hold one out for eval that training never "
                     "sees (need 4" + ("; raise seq_len)" if what == "samples" else ")"))


def predates_heldout(saved: dict[str, Any], note: str | None) -> str | None:
    """What a resumed run says of a task checkpoint written before the held-out sets (its data state has no
    ``heldout``) where the held-out share is large enough to be noted (``note``), else None."""
    if "heldout" in saved or not note:
        return None
    return ("predates the task's held-out set: from here training redraws its held-out samples and eval reads "
            "them (eval numbers are not comparable with the checkpoint's)")


@dataclass(frozen=True)
class HeldOut:
    """A task's held-out set (``Task.heldout``): ``ids`` / ``labels`` [n, seq_len] of n distinct samples,
    ``keys`` their ``sample_key``s (what the training stream redraws), ``space`` the task's distinct samples."""

    ids: Tensor
    labels: Tensor
    keys: frozenset[bytes]
    space: int


@dataclass(frozen=True)
class Task:
    name: str
    doc: str
    validate: Callable[[int, int, Any], None]
    sample: Callable[[np.random.Generator, int, int, Any], tuple[np.ndarray, np.ndarray]]
    chance: Callable[[int, Any], float]
    #: the train settings its samples read besides seq_len (``TaskStream.state``: what a resumed run compares)
    settings: tuple[str, ...] = ()
    #: its number of distinct samples at (seq_len, vocab, cfg) (every sample has positive probability)
    space: Callable[[int, int, Any], int] = lambda seq_len, vocab, cfg: 1 << 64
    #: its samples depend on the vocabulary size (parity's bits do not): messages name it
    reads_vocab: bool = True

    def setting(self, seq_len: int, vocab: int, cfg: Any) -> str:
        """The settings a message names: ``parity at seq_len 16``, ``mqar at seq_len 8, vocab_size 6``."""
        parts = [f"seq_len {seq_len}"] + ([f"vocab_size {vocab}"] if self.reads_vocab else [])
        parts += [f"{k} {getattr(cfg, k)}" for k in self.settings if getattr(cfg, k, None) is not None]
        return f"{self.name} at {', '.join(parts)}"

    def heldout_size(self, seq_len: int, vocab: int, cfg: Any) -> int:
        """How many distinct samples are held out (``heldout_count`` of the task's space)."""
        return heldout_count(self.space(seq_len, vocab, cfg))

    def check(self, seq_len: int, vocab: int, cfg: Any) -> None:
        """``validate``, and a space too small to hold any sample out (``TaskError``, one line)."""
        self.validate(seq_len, vocab, cfg)
        if self.heldout_size(seq_len, vocab, cfg) < 1:
            raise too_few_to_hold_out(self.setting(seq_len, vocab, cfg), self.space(seq_len, vocab, cfg))

    def heldout(self, seed: int, seq_len: int, vocab: int, cfg: Any) -> HeldOut:
        """The held-out set: the first ``heldout_size`` distinct samples of the eval stream (sample i
        drawn from ``default_rng([seed, 1, i])``; a repeat of an earlier one is skipped)."""
        keys = first_distinct(self.heldout_size(seq_len, vocab, cfg),
                              lambda i: self.sample(np.random.default_rng([seed, 1, i]), seq_len, vocab, cfg),
                              lambda s: sample_key(s[0]))
        rows = list(keys.values())
        return HeldOut(torch.from_numpy(np.stack([r[0] for r in rows])),
                       torch.from_numpy(np.stack([r[1] for r in rows])), frozenset(keys),
                       self.space(seq_len, vocab, cfg))

    def batch(self, indices: "range | list[int]", seed: int, seq_len: int, vocab: int, cfg: Any,
              stream: int = 0, exclude: "frozenset[bytes] | None" = None) -> tuple[Tensor, Tensor]:
        """The samples with these global indices: [B, seq_len] ids and labels (int64).

        ``stream`` separates independent streams of one seed (0 = train, 1 = eval). ``exclude``
        (``HeldOut.keys``): a sample whose key is in it is redrawn from its own generator until it is
        not (the first draw stands where it is not: the stream is unchanged where nothing collides)."""
        out = [redrawn(np.random.default_rng([seed, stream, i]), lambda g: self.sample(g, seq_len, vocab, cfg),
                       lambda s: sample_key(s[0]), exclude) for i in indices]
        return torch.from_numpy(np.stack([o[0] for o in out])), torch.from_numpy(np.stack([o[1] for o in out]))


TASKS: dict[str, Task] = {
    "mqar": Task("mqar", "multi-query associative recall", _mqar_validate, _mqar_sample,
                 lambda vocab, cfg: 1.0 / (vocab - vocab // 2), ("mqar_pairs",), _mqar_space),
    "selective_copy": Task("selective_copy", "copy the data tokens scattered among noise",
                           _copy_validate, _copy_sample, lambda vocab, cfg: 1.0 / (vocab - 3), ("copy_tokens",),
                           _copy_space),
    "parity": Task("parity", "running parity of a bit stream", _parity_validate, _parity_sample,
                   lambda vocab, cfg: 0.5, (), _parity_space, reads_vocab=False),
    "khop": Task("khop", "k-hop pointer chasing on a random cycle", _khop_validate, _khop_sample, _khop_chance,
                 ("khop_hops", "khop_nodes"), _khop_space),
}
