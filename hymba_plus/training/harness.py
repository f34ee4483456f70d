"""EleutherAI's lm-evaluation-harness (``lm_eval``, Gao et al., https://github.com/EleutherAI/lm-evaluation-harness)
on a hymba_plus checkpoint: ``HymbaLM``, an ``lm_eval.api.model.TemplateLM`` registered as model ``hymba``.

The harness asks a model three things; each is answered here from ``HybridLM.forward`` / ``generate`` on the
checkpoint's own tokenizer (``tokenizer.json``: bytes, token ids or a ``tokenizers`` JSON; ``for_checkpoint``):

* ``loglikelihood``: ``log P(continuation | context)`` and whether greedy decoding would produce it
  (``is_greedy``), for multiple-choice tasks (hellaswag, arc, piqa, ...) and lambada;
* ``loglikelihood_rolling``: a whole text's log-likelihood (wikitext's word / byte perplexity);
* ``generate_until``: a completion cut at the task's stop strings (gsm8k, ...).

Requests are tokenized as the model was trained: a ``tokenizers`` tokenizer without its post-processor's
special tokens (``hymba prepare`` encodes documents that way, ending each with the tokenizer's end
token); the token that stands before a text with no context (an empty context, the first token of a
rolling text: the harness's ``prefix_token_id``) is the document boundary of training: the end token
(``generation_config.json``'s ``eos_token_id`` first, as ``hymba generate``, else the tokenizer's), else
for bytes the line break ``hymba prepare`` puts between files; a token-id model without an end token has
none (such a request is a one-line ``ValueError``).

Length: a row holds at most ``model.max_seq_len`` real tokens; the recipe's meta tokens are a prefix
``forward`` adds on top of them and are not counted (``HybridLM.forward``), so ``max_length`` is
``max_seq_len`` (less the positions ``models.generation.reserved_positions`` gives the ``ar`` mode, none
today, for ``generate_until``). A context + continuation longer than ``max_seq_len + 1`` tokens has its
context truncated from the left (as the harness's HF model does: the continuation keeps all its tokens, the
context its last ones); a continuation longer than ``max_seq_len`` cannot be scored in one window and is
a ``ValueError``.

Only models of the ``next_token`` objective (multi-token prediction included: its trunk is a next-token
LM) are language models in the harness's sense; the others are refused with one line at load:
``forecast`` reads numbers, ``block_diffusion``'s likelihood is a bound from denoising passes (its NELBO,
``hymba eval``), not the causal logits, ``ladir`` answers through latent slots.

Use: ``hymba eval CKPT --tasks hellaswag,arc_easy`` (``cli/eval.py``), or the harness's own CLI through
``python -m hymba_plus.training.harness --model hymba --model_args pretrained=runs/x --tasks ...`` (lm_eval
0.4 finds models in its registry only, with no plugin entry point: this module registers ``hymba``
when imported, then runs lm_eval's CLI), or ``lm_eval.simple_evaluate(model="hymba", model_args=...)``
after ``import hymba_plus.training.harness``. Model arguments: ``pretrained`` (a checkpoint folder or a
training ``OUT``: its newest intact ``step-N``), ``device`` (auto, cpu, cuda, cuda:N), ``batch_size``
(rows per forward), ``dtype`` (float32, bfloat16, float16: the weights' dtype; log-probabilities in
float32), ``max_gen_toks`` (``generate_until``'s default, 256 as the harness's), ``seed`` (sampled
generations). lm_eval's command line passes its own ``--device`` (default ``cuda:0``) and ``--batch_size``
(default 1) to the model: there ``device`` and ``batch_size`` are those flags, not ``--model_args`` keys
(lm_eval would pass each twice: a ``TypeError``).
"""

from __future__ import annotations

import copy
import json
import operator
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from .tokenizer import AllStopped, StopWatch, cut_at  # noqa: F401 - (cut_at: the harness's until rule, re-exported)

#: ``dtype=`` names -> the weights' dtype
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: why a checkpoint of another objective is no language model for the harness (the load's one line)
NOT_AN_LM = {
    "forecast": "it reads numbers (a forecaster), not text",
    "block_diffusion": "its likelihood is a bound from denoising passes (its NELBO: hymba eval), not the causal "
                       "logits the harness scores",
    "ladir": "it answers through latent reasoning slots, not from the causal logits the harness scores",
}

#: generation settings of a request that ``generate_until`` takes besides ``until`` and the token budget
#: (``normalize_gen_kwargs``' ``do_sample`` / ``temperature`` included)
GEN_KEYS = ("do_sample", "temperature", "top_k", "top_p", "min_p")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder itself, or the newest intact ``step-N`` of a training output folder (as ``hymba
    generate`` / ``hymba eval`` resolve one; ``ValueError`` for a missing path or no intact checkpoint)."""
    from .checkpoint import find_resumable

    p = Path(path)
    if not p.exists():
        raise ValueError(f"{p}: no such checkpoint folder")
    if p.is_dir() and not (p / "recipe.yaml").exists():
        found = find_resumable(p, warn=lambda line: warnings.warn(line, stacklevel=3), files=("model.safetensors",),
                               state=False)
        if found is not None:
            return found[0]
    return p


class HymbaLM(TemplateLM):
    """A hymba_plus checkpoint as an lm-evaluation-harness model (module docstring). ``model`` / ``tokenizer``
    (optional) wrap an already loaded ``HybridLM`` and tokenizer instead of ``pretrained`` (the tests' way;
    ``eos_token_id`` then defaults to the tokenizer's end token)."""

    backend = "causal"

    def __init__(self, pretrained: str | Path | None = None, device: str = "auto", batch_size: int | str = 8,
                 dtype: str = "float32", max_gen_toks: int = 256, seed: int = 1234,
                 max_batch_size: int | None = None, model: Any = None, tokenizer: Any = None,
                 eos_token_id: int | Sequence[int] | None = None) -> None:
        super().__init__()
        from ..models.generation import check_eos, reserved_positions
        from ..models.lm import generation_config
        from .distributed import pick_device
        from .tokenizer import for_checkpoint

        del max_batch_size  # (the harness passes it with batch_size "auto", which is refused below)
        self.batch_size = _count("batch_size", batch_size)
        self.max_gen_toks = _count("max_gen_toks", max_gen_toks)
        if str(dtype) not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
        self.seed = _count("seed", seed, least=0)
        where = "the model"
        if model is None:
            if pretrained is None:
                raise ValueError("hymba: pass pretrained=CHECKPOINT (a checkpoint folder or a training output folder)")
            from ..models.lm import from_pretrained

            ckpt = resolve_checkpoint(pretrained)
            dev = pick_device(str(device))
            model = from_pretrained(ckpt, device=dev)
            V = model.config.vocab_size
            if V is not None:
                tokenizer = for_checkpoint(ckpt, V)
                eos_token_id = generation_config(ckpt, V).get("eos_token_id", tokenizer.eos_id)
            where = str(ckpt)
        else:
            dev = model.device
            if eos_token_id is None and tokenizer is not None:
                eos_token_id = tokenizer.eos_id
        kind = getattr(model.objective.cfg, "kind", "next_token")
        if kind != "next_token":
            raise ValueError(f"{where}: objective {kind}: not a language model for lm-eval ("
                             f"{NOT_AN_LM.get(kind, 'not next-token prediction')}); it scores next_token models")
        if tokenizer is None:
            raise ValueError(f"{where}: no tokenizer (pass tokenizer=)")
        V = model.config.vocab_size
        if tokenizer.vocab_size > V:
            raise ValueError(f"{where}: the tokenizer has {tokenizer.vocab_size} tokens but the model has vocab_size {V}")
        check_eos(eos_token_id, V)
        self.model = model.to(dtype=DTYPES[str(dtype)]).eval()
        self.tok = tokenizer
        self._device = torch.device(dev)
        self.eos = ([operator.index(i) for i in eos_token_id] if isinstance(eos_token_id, (list, tuple))
                    else [] if eos_token_id is None else [operator.index(eos_token_id)])
        # the document boundary of training (module docstring): what stands before a text without context
        self._prefix = self.eos[0] if self.eos else 10 if tokenizer.kind == "bytes" else None
        self.max_seq_len = model.config.max_seq_len
        self.reserved = reserved_positions(model.recipe, "ar")  # (positions the ar decoder adds: none today)
        self.generator = torch.Generator(device=self._device).manual_seed(self.seed)
        self.truncated = 0  # requests whose context was cut from the left (loglikelihood)

    # ------------------------------------------------------------------ the harness's tokenizer hooks
    @property
    def eot_token_id(self) -> int:
        return self.prefix_token_id

    @property
    def prefix_token_id(self) -> int:
        if self._prefix is None:
            raise ValueError("this model has no end-of-text token (a token-id model): a text without context has "
                             "nothing to be scored after")
        return self._prefix

    @property
    def max_length(self) -> int:
        """Real tokens per row (the meta tokens come on top: module docstring)."""
        return self.max_seq_len

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string`` as training encoded text: a ``tokenizers`` tokenizer without special tokens
        unless ``add_special_tokens=True`` is asked for."""
        if self.tok.kind == "tokenizers":
            return self.tok.encode(string, add_special_tokens=bool(add_special_tokens))
        return self.tok.encode(string)

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    @property
    def tokenizer_name(self) -> str:
        return f"hymba-{self.tok.kind}"

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """(sum of the continuation's token log-probabilities, whether each is the argmax) per
        ``(key, context_ids, continuation_ids)``, in the requests' order. Rows are sorted longest first
        (HF's model in the harness does the same: equal lengths batch together, and a batch too large for
        memory fails at once) and run ``batch_size`` at a time, ONE forward per batch, left-padded
        (``attention_mask``: a row's numbers do not depend on its batch); the input is ``(context +
        continuation)[:-1]``, its last ``max_seq_len`` tokens (a longer context is cut from the left), and
        the logits of its last ``len(continuation)`` positions score the continuation."""
        L = self.max_seq_len
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        rows = []
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                out[i] = (0.0, True)  # nothing to score: log 1
                continue
            if len(cont) > L:
                raise ValueError(f"a continuation of {len(cont)} tokens is longer than the model's max_seq_len {L}: "
                                 "it cannot be scored in one window")
            whole = list(ctx) + list(cont)
            if len(whole) - 1 > L:
                self.truncated += 1
            rows.append((i, whole[-(L + 1):][:-1], list(cont)))
        rows.sort(key=lambda r: (-len(r[1]), r[0]))
        for b in range(0, len(rows), self.batch_size):
            batch = rows[b:b + self.batch_size]
            for (i, _, _), res in zip(batch, self._score(batch)):
                out[i] = res
                key = requests[i][0]
                if key is not None:  # (rolling windows carry no request of their own)
                    self.cache_hook.add_partial("loglikelihood", key, res)
        return out  # type: ignore[return-value]

    def _score(self, batch: list[tuple[int, list[int], list[int]]]) -> list[tuple[float, bool]]:
        """One forward of the left-padded rows of ``batch`` (index, input ids, continuation ids)."""
        T = max(len(inp) for _, inp, _ in batch)
        C = max(len(cont) for _, _, cont in batch)
        B = len(batch)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        tgt = torch.zeros(B, C, dtype=torch.long)
        scored = torch.zeros(B, C, dtype=torch.bool)
        for r, (_, inp, cont) in enumerate(batch):  # left padding: every row ends at column T - 1
            ids[r, T - len(inp):] = torch.tensor(inp)
            mask[r, T - len(inp):] = 1
            tgt[r, C - len(cont):] = torch.tensor(cont)
            scored[r, C - len(cont):] = True
        dev = self._device
        padded = bool((mask == 0).any())
        logits = self.model(ids.to(dev), attention_mask=mask.to(dev) if padded else None, logits_to_keep=C).logits
        logp = logits.float().log_softmax(-1)  # [B, C, V]
        tgt, scored = tgt.to(dev), scored.to(dev)
        tok_lp = logp.gather(-1, tgt[..., None]).squeeze(-1).masked_fill(~scored, 0.0)
        greedy = ((logp.argmax(-1) == tgt) | ~scored).all(1)
        return list(zip(tok_lp.sum(1).tolist(), greedy.tolist()))

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood, every token scored once, in the harness's windows
        (``get_rolling_token_windows`` with ``context_len=1``, ``make_disjoint_window``: HF's model in
        the harness does the same, so the numbers compare): the first window is the prefix token then
        the text's first ``max_seq_len - 1`` tokens and scores its first ``max_seq_len``; each next
        window scores the next ``max_seq_len`` tokens after the one token before them, the last one
        given a full window of context. All windows of all texts are batched by ``_loglikelihood_tokens``.

        Why not one cache carried through the text (a recurrent hybrid's natural rolling state): a
        chunked forward through one cache equals the full forward (the project's invariant), so within
        ``max_seq_len`` it is the same number as one window; beyond it, ``forward`` refuses more than
        ``max_seq_len`` real tokens per cache: the attention caches, positions and RoPE are sized to it and
        the model never saw a longer sequence in training. Starting each window afresh evaluates the model
        as it was trained, at the cost of less context at each window's start."""
        texts = [req.args[0] for req in requests]
        windows: list[tuple[Any, list[int], list[int]]] = []
        owner: list[int] = []
        for i, text in enumerate(texts):
            tokens = self.tok_encode(text)
            if not tokens:
                continue
            for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_seq_len,
                    context_len=1)):
                windows.append((None, ctx, pred))
                owner.append(i)
        totals = [0.0] * len(texts)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[i] += lp
        for text, total in zip(texts, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each request's completion: ``model.generate`` (the ``ar`` decoder, one cached prefill then one
        token per step; greedy, or sampled at the request's ``temperature`` / ``top_k`` / ``top_p`` / ``min_p`` from
        this model's ``seed``) of at most ``max_gen_toks`` tokens (the request's, else the model argument),
        cut at the first of the request's ``until`` strings and at the end token. Requests with the same
        settings batch together, longest context first, left-padded; a context is cut from the left to
        leave ``max_gen_toks`` positions in ``max_seq_len``. A batch stops as soon as every row has met a
        stop string or the end token (its streamer watches the decoded text), not only at the budget."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        args = [req.args for req in requests]
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        for idx in groups.values():
            settings = self._gen_settings(args[idx[0]][1])
            room = self.max_seq_len - self.reserved - settings["max_gen_toks"]
            encoded = {i: self._context_ids(args[i][0])[-room:] for i in idx}
            order = sorted(idx, key=lambda i: (-len(encoded[i]), i))
            for b in range(0, len(order), self.batch_size):
                batch = order[b:b + self.batch_size]
                for i, text in zip(batch, self._generate([encoded[i] for i in batch], settings)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out  # type: ignore[return-value]

    def _context_ids(self, context: str) -> list[int]:
        ids = self.tok_encode(context)
        return ids if ids else [self.prefix_token_id]

    def _gen_settings(self, gen_kwargs: dict) -> dict[str, Any]:
        """A request's generation settings: ``until`` (a list of strings), ``max_gen_toks``, ``temperature``
        (0: greedy; ``do_sample`` without one: 1.0, as HF's generate), ``top_k``, ``top_p``, ``min_p``; any other
        key is a one-line ``ValueError``."""
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: generation settings must be a dict, got {type(gen_kwargs).__name__}")
        kw = normalize_gen_kwargs(copy.deepcopy(gen_kwargs), self.max_gen_toks)
        until = kw.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generate_until: until must be strings, got {until!r}")
        n = kw.pop("max_gen_toks")
        unknown = sorted(k for k in kw if k not in GEN_KEYS)
        if unknown:
            raise ValueError(f"generate_until: unsupported generation settings {', '.join(unknown)} (takes until, "
                             f"max_gen_toks, {', '.join(GEN_KEYS)})")
        if n < 1 or n > self.max_seq_len - self.reserved - 1:
            raise ValueError(f"generate_until: max_gen_toks {n} must be in 1..{self.max_seq_len - self.reserved - 1} "
                             f"(the model's max_seq_len {self.max_seq_len} less one context token)")
        # do_sample without a temperature samples at 1.0, as HF's generate (its GenerationConfig default)
        t = kw.get("temperature")
        temperature = (1.0 if t is None else float(t)) if kw.get("do_sample") else 0.0
        return {"until": [u for u in until if u], "max_gen_toks": n, "temperature": temperature,
                "top_k": kw.get("top_k"), "top_p": kw.get("top_p"), "min_p": kw.get("min_p")}

    def _generate(self, prompts: list[list[int]], settings: dict[str, Any]) -> list[str]:
        """Completions of the token-id ``prompts`` (one left-padded batch), cut at the stop strings and EOS."""
        B, T = len(prompts), max(len(p) for p in prompts)
        ids = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = 1
        # each new token column [B]; raises AllStopped once every row has met a stop string or the end token
        watch = StopWatch(self.tok_decode, B, settings["until"], self.eos)
        dev = self._device
        padded = bool((mask == 0).any())
        try:
            self.model.generate(ids.to(dev), max_new_tokens=settings["max_gen_toks"],
                                temperature=settings["temperature"], top_k=settings["top_k"],
                                top_p=settings["top_p"], min_p=settings["min_p"], attention_mask=mask.to(dev) if padded else None,
                                eos_token_id=self.eos or None, generator=self.generator, streamer=watch)
        except AllStopped:
            pass
        return [watch.completion(r) for r in range(B)]


if __name__ != "__main__":  # (run as a script, main() imports this module under its name, which registers it)
    register_model("hymba")(HymbaLM)


def _count(name: str, value: Any, least: int = 1) -> int:
    """A model argument that is an integer >= ``least`` (an int, or its text from ``--model_args``)."""
    ok = not isinstance(value, (bool, float)) and str(value).strip().lstrip("+").isdigit()
    v = int(str(value).strip()) if ok else None
    if v is None or v < least:
        raise ValueError(f"{name} {value!r}: expected an integer >= {least}" + (
            " (auto is not supported: give a number)" if str(value).startswith("auto") else ""))
    return v


def main() -> None:
    """``python -m hymba_plus.training.harness ARGS``: lm_eval's own command line with model ``hymba``
    registered (``--model hymba --model_args pretrained=CKPT,batch_size=8``)."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    from hymba_plus.training.harness import main as _main  # the module under its own name: registers "hymba"

    _main()
