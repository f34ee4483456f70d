"""Reasoning data for latent reasoning (LaDiR, Kang et al., arXiv 2510.04573): examples
that carry a question, an intermediate reasoning chain and an answer, as token ids.

Sources:

* built-in synthetic tasks (no files), one example per global index drawn from
  ``np.random.default_rng([seed, stream, index])`` (stream 0 = train, 1 = eval), as in
  ``tasks.py``, so a data position is one integer and resumed runs see the same stream:

  - ``chain_arith`` — multi-step modular arithmetic. Question ``v0 op1 x1 ... opS xS SEP``,
    reasoning ``r1 r2 ... rS`` with ``r_i = r_{i-1} op_i x_i (mod modulus)`` (``r0 = v0``),
    *all* S intermediate results, so the chain has exactly ``steps`` tokens and its last
    token equals the answer value; answer ``rS EOS``.
  - ``chain_pointer`` — k-hop pointer chasing on one random cycle over ``nodes`` nodes.
    Question ``a1 f(a1) ; a2 f(a2) ; ... aN f(aN) ; ? q SEP`` (pairs in random order),
    reasoning ``f(q) f^2(q) ... f^k(q)`` (every hop, ``hops`` tokens, the last equals the
    answer value); answer ``f^k(q) EOS``.

  Eval reads a fixed held-out set, the first ``min(HELDOUT, S // 4)`` distinct questions of
  the eval stream (S the task's distinct questions at its parameters, ``ReasoningTask.space``),
  and a training example whose question is one of them is redrawn from its own generator
  until it is not (no draw is spent where nothing collides), as the next-token tasks do
  (``tasks.py``): held-out accuracy never scores a question the model was trained on.

* a JSONL file (``load_jsonl``) of ``{"question": str, "reasoning": str, "answer": str}``
  lines, each field encoded with the tokenizer; the tokenizer's EOS id (when it has one)
  is appended to the answer. No separator is inserted between the fields: put one in the
  text if the model needs it.

Token layout of the built-in tasks: 0 pad, 1 EOS (end of the answer), 2 SEP (end of the
question), 3 and 4 task tokens (``chain_arith``: ``+`` and ``*``; ``chain_pointer``: the
end of a pair ``;`` and the query mark ``?``), then values / nodes from ``FIRST_VALUE``
(= 5): value v is token ``FIRST_VALUE + v``.

``collate`` builds the padded tensors a LaDiR model reads (``components/ladir.py``) and the
two token-level baselines (``full`` = question + reasoning + answer, ``qa`` = question +
answer, with ``labels`` at the answer tokens only). ``ReasoningStream`` serves train /
eval batches by global sample indices for a task name or a JSONL file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from . import tokenizer as tokmod
from .data import BOM, DataError
from .tasks import (
    TaskError,
    first_distinct,
    heldout_count,
    heldout_note,
    predates_heldout,
    redrawn,
    sample_key,
    too_few_to_hold_out,
)

PAD, EOS, SEP = 0, 1, 2
PLUS, TIMES = 3, 4  # chain_arith operators
PAIR_END, QUERY = 3, 4  # chain_pointer structure tokens
FIRST_VALUE = 5
FIELDS = ("question", "reasoning", "answer")


@dataclass(frozen=True)
class ReasoningExample:
    question: tuple[int, ...]
    reasoning: tuple[int, ...]
    answer: tuple[int, ...]
    #: the JSONL line it was read from (what errors name; None for a built-in task's), not part of its value
    line: int | None = field(default=None, compare=False)


# --------------------------------------------------------------------------- built-in tasks


def _int_param(name: str, key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TaskError(f"{name}: {key} must be an integer, got {value!r}")
    if value < low:
        raise TaskError(f"{name}: {key} must be >= {low}, got {value}")
    return int(value)


def _units(modulus: int) -> list[int]:
    return [u for u in range(1, modulus) if math.gcd(u, modulus) == 1]


def _arith_validate(vocab: int, p: dict[str, Any]) -> None:
    _int_param("chain_arith", "steps", p["steps"], 1)
    m = _int_param("chain_arith", "modulus", p["modulus"], 2)
    ops = p["ops"]
    if not isinstance(ops, str) or not ops or set(ops) - {"+", "*"} or len(set(ops)) != len(ops):
        raise TaskError(f"chain_arith: ops must be '+', '*' or '+*', got {ops!r}")
    if vocab < FIRST_VALUE + m:
        raise TaskError(f"chain_arith with modulus {m} needs vocab_size >= {FIRST_VALUE + m} "
                        f"({FIRST_VALUE} specials + {m} values), got {vocab}")


def _arith_sample(rng: np.random.Generator, vocab: int, p: dict[str, Any]) -> ReasoningExample:
    """Operands of ``+`` are uniform over [0, m); those of ``*`` are uniform over the units
    mod m (coprime to m), so every step is a bijection of the running value: the answer
    depends on every step and is uniform over the m values (chance 1 / m)."""
    steps, m, ops = p["steps"], p["modulus"], p["ops"]
    units = np.asarray(_units(m))
    v = int(rng.integers(0, m))
    question, chain = [FIRST_VALUE + v], []
    for _ in range(steps):
        op = ops[int(rng.integers(0, len(ops)))]
        if op == "+":
            x = int(rng.integers(0, m))
            v = (v + x) % m
        else:
            x = int(units[int(rng.integers(0, len(units)))])
            v = (v * x) % m
        question += [PLUS if op == "+" else TIMES, FIRST_VALUE + x]
        chain.append(FIRST_VALUE + v)
    question.append(SEP)
    return ReasoningExample(tuple(question), tuple(chain), (FIRST_VALUE + v, EOS))


def _arith_space(vocab: int, p: dict[str, Any]) -> int:
    """The start value, then per step an operator and its operand (m for ``+``, the units for ``*``)."""
    m = p["modulus"]
    per_step = sum(m if op == "+" else len(_units(m)) for op in p["ops"])
    return m * per_step ** p["steps"]


def _pointer_validate(vocab: int, p: dict[str, Any]) -> None:
    k = _int_param("chain_pointer", "hops", p["hops"], 1)
    n = _int_param("chain_pointer", "nodes", p["nodes"], 2)
    if n < k + 1:
        raise TaskError(f"chain_pointer with {k} hops needs nodes >= {k + 1} (no hop returns to the query), got {n}")
    if vocab < FIRST_VALUE + n:
        raise TaskError(f"chain_pointer with {n} nodes needs vocab_size >= {FIRST_VALUE + n} "
                        f"({FIRST_VALUE} specials + {n} nodes), got {vocab}")


def _pointer_sample(rng: np.random.Generator, vocab: int, p: dict[str, Any]) -> ReasoningExample:
    """One random cycle f through all N nodes, its pairs ``a f(a) ;`` written in random
    order, then ``? q SEP``; the chain is every hop f(q) .. f^k(q) (all distinct from q
    since k < N). The answer is one of the N - 1 nodes other than q (chance 1 / (N - 1))."""
    k, n = p["hops"], p["nodes"]
    cycle = rng.permutation(n)
    where = np.empty(n, dtype=np.int64)
    where[cycle] = np.arange(n)
    src = rng.permutation(n)
    dst = cycle[(where[src] + 1) % n]
    q = int(rng.integers(0, n))
    question: list[int] = []
    for a, b in zip(src.tolist(), dst.tolist()):
        question += [FIRST_VALUE + a, FIRST_VALUE + b, PAIR_END]
    question += [QUERY, FIRST_VALUE + q, SEP]
    chain = [FIRST_VALUE + int(cycle[(where[q] + h) % n]) for h in range(1, k + 1)]
    return ReasoningExample(tuple(question), tuple(chain), (chain[-1], EOS))


def _pointer_space(vocab: int, p: dict[str, Any]) -> int:
    """(N - 1)! cycles, N! orders of the pairs, N queries."""
    n = p["nodes"]
    return math.factorial(n - 1) * math.factorial(n) * n


@dataclass(frozen=True)
class ReasoningTask:
    name: str
    doc: str
    defaults: dict[str, Any]
    validate: Callable[[int, dict[str, Any]], None]
    sample: Callable[[np.random.Generator, int, dict[str, Any]], ReasoningExample]
    chance: Callable[[int, dict[str, Any]], float]
    #: the parameters that ``train.chain_steps`` / ``train.chain_values`` set
    train_keys: tuple[str, str] = ("steps", "modulus")
    #: its number of distinct questions at (vocab, parameters) (each of positive probability)
    space: Callable[[int, dict[str, Any]], int] = lambda vocab, p: 1 << 64


REASONING_TASKS: dict[str, ReasoningTask] = {
    "chain_arith": ReasoningTask("chain_arith", "multi-step modular arithmetic",
                                 {"steps": 3, "modulus": 10, "ops": "+*"}, _arith_validate, _arith_sample,
                                 lambda vocab, p: 1.0 / p["modulus"], space=_arith_space),
    "chain_pointer": ReasoningTask("chain_pointer", "k-hop pointer chasing, every hop in the chain",
                                   {"hops": 3, "nodes": 8}, _pointer_validate, _pointer_sample,
                                   lambda vocab, p: 1.0 / (p["nodes"] - 1), ("hops", "nodes"), _pointer_space),
}


def question_key(e: ReasoningExample) -> bytes:
    """What identifies a built-in task's example: its question (the reasoning and answer follow from it)."""
    return sample_key(np.asarray(e.question, dtype=np.int64))


def setting(name: str, p: dict[str, Any]) -> str:
    """``chain_arith at steps 3, modulus 10, ops '+*'``: what a message names."""
    return f"{name} at " + ", ".join(f"{k} {v!r}" for k, v in p.items())


def _task(name: str) -> ReasoningTask:
    if name not in REASONING_TASKS:
        raise TaskError(f"unknown reasoning task {name!r} (built-in: {', '.join(REASONING_TASKS)})")
    return REASONING_TASKS[name]


def task_params(name: str, vocab_size: int, **params: Any) -> dict[str, Any]:
    """The task's parameters (defaults filled in), validated against ``vocab_size``;
    ``TaskError`` (one line) for an unknown task or parameter or an impossible setting."""
    task = _task(name)
    unknown = sorted(set(params) - set(task.defaults))
    if unknown:
        raise TaskError(f"{name}: unknown parameter {unknown[0]!r} (known: {', '.join(task.defaults)})")
    p = {**task.defaults, **params}
    task.validate(int(vocab_size), p)
    return p


def params_from_train(name: str, cfg: Any) -> dict[str, Any]:
    """The task parameters a run's ``train`` settings give (``chain_steps``: operations or
    hops; ``chain_values``: the modulus or the nodes); {} for a file or unset settings."""
    if name not in REASONING_TASKS:
        return {}
    keys = REASONING_TASKS[name].train_keys
    vals = (getattr(cfg, "chain_steps", None), getattr(cfg, "chain_values", None))
    return {k: v for k, v in zip(keys, vals) if v is not None}


def sample(name: str, seed: int, index: int, vocab_size: int, *, stream: int = 0, **params: Any) -> ReasoningExample:
    """Example ``index`` of a built-in task: a function of (seed, stream, index) and the
    parameters only (stream 0 = train, 1 = eval)."""
    p = task_params(name, vocab_size, **params)
    return REASONING_TASKS[name].sample(np.random.default_rng([seed, stream, index]), vocab_size, p)


def samples(name: str, seed: int, indices: Iterable[int], vocab_size: int, *, stream: int = 0,
            exclude: frozenset[bytes] | None = None, **params: Any) -> list[ReasoningExample]:
    """``sample`` for several global indices (parameters validated once). ``exclude`` (``question_key``s:
    the held-out questions): an example whose question is in it is redrawn from its own generator until
    it is not (the first draw stands where it is not)."""
    p = task_params(name, vocab_size, **params)
    task = REASONING_TASKS[name]
    return [redrawn(np.random.default_rng([seed, stream, i]), lambda g: task.sample(g, vocab_size, p), question_key,
                    exclude) for i in indices]


def heldout_size(name: str, vocab_size: int, **params: Any) -> int:
    """How many questions a built-in task holds out, ``min(HELDOUT, S // 4)`` (S its distinct questions,
    ``ReasoningTask.space``), without drawing one; ``TaskError`` (one line) where S < 4."""
    p = task_params(name, vocab_size, **params)
    space = REASONING_TASKS[name].space(vocab_size, p)
    n = heldout_count(space)
    if n < 1:
        raise too_few_to_hold_out(setting(name, p), space, "questions")
    return n


def heldout(name: str, seed: int, vocab_size: int, **params: Any) -> list[ReasoningExample]:
    """The held-out set of a built-in task: the first ``heldout_size`` distinct questions of the eval
    stream (example i drawn from ``default_rng([seed, 1, i])``; a repeated question is skipped);
    ``TaskError`` (one line) where the task has fewer than 4 questions."""
    n = heldout_size(name, vocab_size, **params)
    p = task_params(name, vocab_size, **params)
    task = REASONING_TASKS[name]
    return list(first_distinct(n, lambda i: task.sample(np.random.default_rng([seed, 1, i]), vocab_size, p),
                               question_key).values())


def answer_chance(name: str, vocab_size: int, **params: Any) -> float:
    """Chance accuracy of the answer value (the first answer token; EOS follows surely)."""
    p = task_params(name, vocab_size, **params)
    return REASONING_TASKS[name].chance(vocab_size, p)


# --------------------------------------------------------------------------- JSONL


def load_jsonl(path: str | os.PathLike, tokenizer: Any) -> list[ReasoningExample]:
    """Examples from a JSONL file: one ``{"question": str, "reasoning": str, "answer": str}``
    object per line (all three keys, strings, no other keys); blank lines and a leading byte-order mark
    are skipped.
    Every field must encode to at least one token. ``DataError`` with one line
    ``file:line: what`` (``file: what`` for a missing, unreadable or empty file)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{p}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{p}: is a folder, not a JSONL file") from None
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    eos = getattr(tokenizer, "eos_id", None)
    out: list[ReasoningExample] = []
    raw = raw.removeprefix(BOM)  # the byte-order mark of files saved by Windows tools
    for n, line_bytes in enumerate(raw.split(b"\n"), start=1):
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{p}:{n}: not UTF-8 (byte {e.start + 1})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # the decoder recurses per nesting level
            raise DataError(f"{p}:{n}: not JSON of this form (nested too deeply)") from None
        if not isinstance(obj, dict):
            raise DataError(f"{p}:{n}: expected a JSON object with string fields question, reasoning, answer, "
                            f"got {type(obj).__name__}")
        for key in FIELDS:
            if key not in obj:
                raise DataError(f"{p}:{n}: missing key {key!r}")
        extra = sorted(set(obj) - set(FIELDS))
        if extra:
            raise DataError(f"{p}:{n}: unexpected key {extra[0]!r} (allowed: question, reasoning, answer)")
        fields: dict[str, tuple[int, ...]] = {}
        for key in FIELDS:
            value = obj[key]
            if not isinstance(value, str):
                raise DataError(f"{p}:{n}: {key!r} must be a string, got {type(value).__name__}")
            try:
                ids = [int(i) for i in tokenizer.encode(value)]
            except tokmod.TokenizerError as e:
                raise DataError(f"{p}:{n}: {key!r}: {str(e).splitlines()[0]}") from None
            if key == "answer" and eos is not None:
                ids.append(int(eos))
            if not ids:
                raise DataError(f"{p}:{n}: {key!r} is empty (no tokens)")
            fields[key] = tuple(ids)
        out.append(ReasoningExample(fields["question"], fields["reasoning"], fields["answer"], line=n))
    if not out:
        raise DataError(f"{p}: empty (no examples)")
    return out


# --------------------------------------------------------------------------- collate


def _pad(rows: Sequence[Sequence[int]], fill: int = PAD) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), fill, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        if r:
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = True
    return ids, mask


def _with_labels(prefixes: list[tuple[int, ...]], answers: list[tuple[int, ...]]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ids, mask = _pad([a + b for a, b in zip(prefixes, answers)])
    labels = torch.full_like(ids, -100)
    start = torch.tensor([len(a) for a in prefixes], dtype=torch.long)
    for b, (s, ans) in enumerate(zip(start.tolist(), answers)):
        labels[b, s : s + len(ans)] = torch.tensor(ans, dtype=torch.long)
    return ids, mask, labels, start


def too_long(e: ReasoningExample, max_len: int, reserve: int = 0) -> str | None:
    """What makes example ``e`` too long for ``max_len`` (``collate``), or None when it fits."""
    q, r, a = len(e.question), len(e.reasoning), len(e.answer)
    if q + r + a > max_len:
        return f"has {q + r + a} tokens (question {q} + reasoning {r} + answer {a}), more than max_len {max_len}"
    if reserve and q + reserve + max(r, a) > max_len:
        return (f"needs {q + reserve + max(r, a)} positions (question {q} + {reserve} memory slots + the longer of "
                f"reasoning {r} and answer {a}), more than max_len {max_len}")
    return None


def collate(examples: Sequence[ReasoningExample], max_len: int | None = None, reserve: int = 0) -> dict[str, Tensor]:
    """Right-padded (with 0) int64 tensors and bool masks for a batch of examples:

    * ``question`` / ``question_mask`` [B, Lq], ``reasoning`` / ``reasoning_mask`` [B, Lr],
      ``answer`` / ``answer_mask`` [B, La] — each segment on its own (LaDiR's VAE, flow and
      answer decoder read these);
    * ``full`` / ``full_mask`` [B, L] = question + reasoning + answer per row, and ``labels``
      [B, L]: -100 except at the answer tokens, where ``labels[b, t] == full[b, t]`` (the
      repo's convention: ``HybridLM.lm_loss`` predicts ``labels[t + 1]`` at position t), the
      token-level chain-of-thought baseline; ``answer_start`` [B]: where the answer begins;
    * ``qa`` / ``qa_mask`` / ``qa_labels`` / ``qa_answer_start``: the same for question +
      answer (answering directly from the question).

    ``max_len`` bounds the length of ``full``: a longer example is a ``DataError`` (cutting
    it would lose answer tokens); with ``reserve`` (positions an objective's passes add: LaDiR's
    memory slots) also those of [question, reasoning, reserve] and [question, reserve, reasoning
    or answer]."""
    if not examples:
        raise DataError("collate: no examples")
    qs = [tuple(e.question) for e in examples]
    rs = [tuple(e.reasoning) for e in examples]
    ans = [tuple(e.answer) for e in examples]
    if max_len is not None:
        for b, e in enumerate(examples):
            problem = too_long(e, max_len, reserve)
            if problem:
                raise DataError(f"collate: example {b} {problem}")
    out: dict[str, Tensor] = {}
    for key, rows in (("question", qs), ("reasoning", rs), ("answer", ans)):
        out[key], out[f"{key}_mask"] = _pad(rows)
    out["full"], out["full_mask"], out["labels"], out["answer_start"] = _with_labels(
        [q + r for q, r in zip(qs, rs)], ans)
    out["qa"], out["qa_mask"], out["qa_labels"], out["qa_answer_start"] = _with_labels(qs, ans)
    return out


# --------------------------------------------------------------------------- streams


class ReasoningStream:
    """Train / eval batches (``collate`` dicts) by global sample indices, for a built-in
    task name or a JSONL file.

    * Task: training example i is ``sample(name, seed, i, vocab_size, **params)``, redrawn from
      its generator while its question is held out; eval index i is held-out example i mod
      ``n_eval()`` (``heldout``: distinct questions of stream 1 that training never draws);
      ``note``: one line when they are 1% or more of the task's questions (the trainer logs it);
      ``chance`` is ``answer_chance``; ``end_id`` is ``EOS``, which ends every answer (the
      token-id tokenizer names no end token: the trainer writes it into the checkpoints'
      ``generation_config.json``).
    * JSONL file (read with ``tokenizer``, default bytes): the *last* ``val_frac`` of the
      file's examples (``train.val_frac``, 5% by default, at least 1; the class alone defaults to 10%) are held out for eval, the rest are the
      training set (at least 1, so a file needs >= 2 examples). Training visits them once
      per epoch in an order drawn from ``default_rng([seed, 2, epoch])`` (global index
      c -> epoch c // n_train); eval index i is held-out example i mod n_eval. ``chance``
      is None; ``end_id`` is the tokenizer's end token (appended to the answers), or None.
    """

    def __init__(self, data: str | os.PathLike, vocab_size: int, seed: int = 0, tokenizer: Any = None,
                 val_frac: float = 0.1, max_len: int | None = None, reserve: int = 0, **params: Any):
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        self.max_len = max_len
        self.reserve = reserve
        self._perm: dict[int, np.ndarray] = {}
        self._content: str | None = None  # (``content``)
        self.note: str | None = None
        if isinstance(data, str) and data in REASONING_TASKS:
            self.kind, self.name = "task", data
            self.params = task_params(data, vocab_size, **params)
            # (the held-out set itself is drawn at the first batch, ``heldout``, as ``TaskStream``'s: opening the
            # stream stays cheap, so the length check below and the run's other checks come first)
            n, space = heldout_size(data, vocab_size, **params), REASONING_TASKS[data].space(self.vocab_size, self.params)
            self.n_heldout = n
            self.note = heldout_note(setting(data, self.params), n, space, "questions")
            self.tokenizer = tokenizer or tokmod.IdsTokenizer(self.vocab_size)
            self.chance: float | None = answer_chance(data, vocab_size, **params)
            self.end_id: int | None = EOS  # (ends every answer)
            self.examples: list[ReasoningExample] = []
            self.n_train = 0
            self.n_val = 0
            self.description = (f"reasoning task {data} ({REASONING_TASKS[data].doc}; "
                                f"chance answer accuracy {self.chance:.3f}; {n:,} held out)")
            # a task's examples all have one length: refused now, not when the first batch is made
            problem = too_long(samples(data, self.seed, [0], vocab_size, **params)[0], max_len, reserve) \
                if max_len is not None else None
            if problem:
                raise TaskError(f"{data}: an example {problem} (the model's max_seq_len): lower --chain-steps / "
                                "--chain-values (train.chain_steps / chain_values) or raise model.max_seq_len",
                                settings=("chain_steps", "chain_values"))
            return
        if params:
            raise TaskError(f"task parameters ({', '.join(sorted(params))}) apply to built-in tasks only, "
                            f"not to the file {data}")
        p = Path(data)
        if not p.exists() and p.suffix != ".jsonl":
            raise DataError(f"{p}: no such file (and not a built-in reasoning task: {', '.join(REASONING_TASKS)})")
        if not 0.0 < val_frac < 1.0:
            raise DataError(f"{p}: val_frac must be in (0, 1), got {val_frac}")
        self.kind, self.name, self.params, self.chance = "jsonl", str(p), {}, None
        self.tokenizer = tokenizer or tokmod.ByteTokenizer()
        self.end_id = getattr(self.tokenizer, "eos_id", None)  # (``load_jsonl`` appends it to the answers)
        self.examples = load_jsonl(p, self.tokenizer)
        n = len(self.examples)
        if n < 2:
            raise DataError(f"{p}: {n} example is too few (need at least 2: one training and one held-out)")
        for i, e in enumerate(self.examples):
            top = max(max(e.question), max(e.reasoning), max(e.answer))
            if top >= self.vocab_size:
                raise DataError(f"{p}:{e.line}: example {i + 1} has token id {top}, outside the model's vocab_size "
                                f"{self.vocab_size}")
            problem = too_long(e, max_len, reserve) if max_len is not None else None
            if problem:  # (refused now, not when a batch first draws it, maybe deep into a run)
                raise DataError(f"{p}:{e.line}: example {i + 1} {problem}")
        self.n_val = max(1, int(n * val_frac))
        self.n_train = n - self.n_val
        self.description = f"reasoning file {p} ({n} examples; {self.n_train} train / {self.n_val} held out)"

    @functools.cached_property
    def heldout(self) -> list[ReasoningExample]:
        """A built-in task's held-out examples (module ``heldout``), drawn at their first use."""
        return heldout(self.name, self.seed, self.vocab_size, **self.params)

    @functools.cached_property
    def heldout_keys(self) -> frozenset[bytes]:
        """The ``question_key``s of ``heldout``: the questions the training stream redraws."""
        return frozenset(question_key(e) for e in self.heldout)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm:
            self._perm = {epoch: np.random.default_rng([self.seed, 2, epoch]).permutation(self.n_train)}
        return self._perm[epoch]

    def train_examples(self, indices: Iterable[int]) -> list[ReasoningExample]:
        if self.kind == "task":
            return samples(self.name, self.seed, indices, self.vocab_size, stream=0, exclude=self.heldout_keys,
                           **self.params)
        out = []
        for c in indices:
            e, k = divmod(int(c), self.n_train)
            out.append(self.examples[int(self._order(e)[k])])
        return out

    def eval_examples(self, indices: Iterable[int]) -> list[ReasoningExample]:
        if self.kind == "task":
            return [self.heldout[int(i) % len(self.heldout)] for i in indices]
        return [self.examples[self.n_train + int(i) % self.n_val] for i in indices]

    def train(self, indices: Iterable[int]) -> dict[str, Tensor]:
        return collate(self.train_examples(indices), self.max_len, self.reserve)

    def eval(self, indices: Iterable[int]) -> dict[str, Tensor]:
        return collate(self.eval_examples(indices), self.max_len, self.reserve)

    def n_eval(self) -> int | None:
        return self.n_heldout if self.kind == "task" else self.n_val

    def resumed(self, saved: dict[str, Any]) -> str | None:
        """What resuming a checkpoint of data state ``saved`` says (``Trainer._check_data``), else None."""
        return predates_heldout(saved, self.note)

    def state(self) -> dict[str, Any]:
        if self.kind == "task":
            return {"kind": "reasoning_task", "name": self.name, "params": dict(self.params), "heldout": self.n_eval()}
        return {"kind": "reasoning_jsonl", "path": self.name, "examples": len(self.examples), "n_train": self.n_train,
                "content": self.content()}

    def content(self) -> str:
        """A digest of the examples' token ids, as a text corpus has (``TokenShards.content``): a resumed run
        refuses another file of as many examples (it trained on them silently). Computed once."""
        if self._content is None:
            h = hashlib.sha256()
            for e in self.examples:
                h.update(json.dumps([e.question, e.reasoning, e.answer], separators=(",", ":")).encode() + b"\n")
            self._content = h.hexdigest()[:16]
        return self._content
