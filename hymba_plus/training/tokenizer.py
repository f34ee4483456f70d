"""Tokenizers: bytes (default for text), ids (built-in tasks), or a `tokenizers` JSON file.

A checkpoint stores its tokenizer as ``tokenizer.json`` (``save_pretrained``'s
``extra_files``) so ``hymba generate`` decodes with what the model was trained on:

* ``{"hymba_tokenizer": "bytes"}`` — UTF-8 bytes, ids 0..255;
* ``{"hymba_tokenizer": "ids"}`` — the prompt is whitespace-separated token ids and the
  output is printed as ids (models trained on the synthetic tasks);
* anything else is a HuggingFace ``tokenizers`` JSON (the optional ``tokenizers`` package
  is imported only then).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ..core.config import first_line


class TokenizerError(ValueError):
    """A tokenizer that cannot be loaded or text it cannot encode (one line)."""


class ByteTokenizer:
    kind = "bytes"
    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as e:  # a lone surrogate: bytes that were not UTF-8 (a shell argument)
            raise TokenizerError(f"not valid UTF-8 text (character {e.start}: {text[e.start]!r})") from None

    def encode_bytes(self, data: bytes) -> list[int]:
        return list(data)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"hymba_tokenizer": "bytes"})


class IdsTokenizer:
    """Token ids written as text: ``"3 17 200"`` <-> ``[3, 17, 200]``."""

    kind = "ids"
    eos_id: int | None = None

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.replace(",", " ").split():
            try:
                i = int(word)
            except ValueError:
                raise TokenizerError(f"this model reads token ids (integers separated by spaces), got {word!r}") from None
            if not 0 <= i < self.vocab_size:
                raise TokenizerError(f"token id {i} is outside [0, {self.vocab_size})")
            ids.append(i)
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(f" {i}" for i in ids)

    def to_json(self) -> str:
        return json.dumps({"hymba_tokenizer": "ids", "vocab_size": self.vocab_size})


#: the end-of-text tokens a ``tokenizers`` vocabulary is searched for, in order, where no
#: ``tokenizer_config.json`` beside it names one (``HFTokenizer.with_files``): Llama 2 / Mistral,
#: GPT-2 / Qwen / OLMo, Llama 3, Gemma, BERT, DeepSeek, ChatML
END_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "[SEP]", "<\uff5cend\u2581of\u2581sentence\uff5c>",
              "<|im_end|>")


class HFTokenizer:
    """A HuggingFace ``tokenizers`` tokenizer (``tokenizer.json``)."""

    kind = "tokenizers"

    def __init__(self, text: str, source: str = "tokenizer.json"):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise TokenizerError(f"{source}: reading a `tokenizers` JSON needs the optional package "
                                 "'tokenizers' (pip install tokenizers)") from None
        try:
            self.tok = Tokenizer.from_str(text)
        except Exception as e:  # the library raises its own Exception type
            raise TokenizerError(f"{source}: not a valid tokenizers JSON ({str(e).splitlines()[0]})") from None
        self.text = text
        self._head: list[int] | None = None  # the ids of "a" (``encode(continues=True)``)
        self._continuation: Any = None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        # transformers' files beside tokenizer.json (TOKENIZER_SIDE_FILES: special tokens, chat template),
        # name -> text, where it was read from a folder that has them; checkpoints and shard indexes carry them
        self.files: dict[str, str] = {}
        self.eos_id = None
        for name in END_TOKENS:
            i = self.tok.token_to_id(name)
            if i is not None:
                self.eos_id = i
                break

    def with_files(self, files: dict[str, str]) -> "HFTokenizer":
        """This tokenizer with its side files (``TOKENIZER_SIDE_FILES``, name -> text; checked by
        ``side_files``); the end token the ``tokenizer_config.json`` among them names (``eos_token``:
        text, or a dict with its ``content``), where it is in the vocabulary, is what transformers'
        tokenizer ends text with, over ``END_TOKENS``' guess from the vocabulary alone."""
        self.files = dict(files)
        cfg = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
        eos = cfg.get("eos_token") if isinstance(cfg, dict) else None
        eos = eos.get("content") if isinstance(eos, dict) else eos
        i = self.tok.token_to_id(eos) if isinstance(eos, str) else None
        if i is not None:
            self.eos_id = i
        return self

    def encode(self, text: str, add_special_tokens: bool = True, continues: bool = False) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens=False`` skips the post-processor's special
        tokens (e.g. a BOS template), as ``hymba prepare`` encodes the pieces of a document.
        ``continues``: the text goes on from earlier text of the same document (``hymba prepare``'s
        later pieces, which start at a space), so the space a tokenizer puts before a text's first
        word (SentencePiece's ``Metaspace`` prepend scheme, ``ByteLevel``'s ``add_prefix_space``, a
        ``Prepend`` normalizer) is not put there: the text is encoded after a word and that word's
        tokens dropped, or, where they do not come out alone or the text does not start with a space
        (WordPiece would read it as the word's rest), by ``continuation``. An encoding error of the
        library is a ``TokenizerError``."""
        try:
            if not continues:
                return self.tok.encode(text, add_special_tokens=add_special_tokens).ids
            # after a word ("a"), as the text stands in its document; where that word's tokens do not
            # come out alone (the text does not start at a word boundary), the continuation tokenizer
            if text[:1].isspace() and not add_special_tokens:
                if self._head is None:
                    self._head = self.tok.encode("a", add_special_tokens=False).ids
                head = self._head
                ids = self.tok.encode("a" + text, add_special_tokens=False).ids
                if ids[:len(head)] == head:
                    return ids[len(head):]
            return self.continuation().encode(text, add_special_tokens=add_special_tokens).ids
        except TokenizerError:
            raise
        except Exception as e:  # the library raises its own Exception type
            raise TokenizerError(f"cannot encode the text ({first_line(e)})") from None

    def continuation(self) -> Any:
        """This tokenizer with its start-of-text prefix space turned off (``Metaspace``'s
        ``prepend_scheme`` "never", ``ByteLevel``'s ``add_prefix_space`` false, ``Prepend``
        normalizers dropped; inside ``Sequence``s too): exact where the text holds no added-token
        text (with ``prepend_scheme`` "always", ``ByteLevel``'s prefix or a ``Prepend`` normalizer,
        the text after such a token would lose its space too)."""
        if self._continuation is None:
            from tokenizers import Tokenizer

            obj = json.loads(self.text)
            obj["normalizer"] = _without_prefix(obj.get("normalizer"))
            obj["pre_tokenizer"] = _without_prefix(obj.get("pre_tokenizer"))
            self._continuation = Tokenizer.from_str(json.dumps(obj))
        return self._continuation

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text, as ``encode(text, add_special_tokens)`` (not ``continues``), encoded on
        the library's threads (``encode_batch_fast``, without the offsets, where it has it: tokenizers
        >= 0.21). An encoding error of the library is a ``TokenizerError``."""
        fn = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        try:
            return [e.ids for e in fn(texts, add_special_tokens=add_special_tokens)]
        except Exception as e:  # the library raises its own Exception type
            raise TokenizerError(f"cannot encode the text ({first_line(e)})") from None

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    def to_json(self) -> str:
        return self.text


def _without_prefix(node: Any) -> Any:
    """A ``tokenizers`` normalizer / pre-tokenizer JSON node that puts no space before a text's
    first word (``HFTokenizer.continuation``); None for a ``Prepend`` normalizer."""
    if not isinstance(node, dict):
        return node
    kind = node.get("type")
    if kind == "Prepend":
        return None
    if kind == "Sequence":
        key = "normalizers" if "normalizers" in node else "pretokenizers"
        return dict(node, **{key: [n for n in map(_without_prefix, node.get(key, [])) if n is not None]})
    if kind == "Metaspace":
        out = dict(node, prepend_scheme="never") if "prepend_scheme" in node else dict(node)
        if "add_prefix_space" in node:  # the format before tokenizers 0.14
            out["add_prefix_space"] = False
        return out
    if kind == "ByteLevel" and node.get("add_prefix_space"):
        return dict(node, add_prefix_space=False)
    return node


Tokenizer = Any  # ByteTokenizer | IdsTokenizer | HFTokenizer


def from_json(text: str, source: str = "tokenizer.json") -> Tokenizer:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{source}: not JSON ({e})") from None
    if isinstance(obj, dict) and "hymba_tokenizer" in obj:
        kind = obj["hymba_tokenizer"]
        if kind == "bytes":
            return ByteTokenizer()
        if kind == "ids":
            n = obj.get("vocab_size")
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                got = "no vocab_size" if "vocab_size" not in obj else repr(n)
                raise TokenizerError(f"{source}: an ids tokenizer needs vocab_size, an integer >= 1, got {got}")
            return IdsTokenizer(n)
        raise TokenizerError(f"{source}: unknown tokenizer kind {kind!r}")
    return HFTokenizer(text, source)


def load_file(path: str | os.PathLike) -> Tokenizer:
    """A tokenizer from a JSON file (ours or a `tokenizers` file); a `tokenizers` ``tokenizer.json``
    takes the side files beside it, and its end token from their ``tokenizer_config.json``
    (``HFTokenizer.with_files``)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{p}: cannot read ({e})") from None
    tok = from_json(text, str(p))
    if isinstance(tok, HFTokenizer) and p.name == "tokenizer.json":
        tok.with_files(side_files(p.parent))
    return tok


def for_checkpoint(path: str | os.PathLike, vocab_size: int) -> Tokenizer:
    """The tokenizer saved in a checkpoint folder (ids for a model without one)."""
    p = Path(path) / "tokenizer.json"
    if p.is_file():
        return load_file(p)
    return ByteTokenizer() if vocab_size >= 256 else IdsTokenizer(vocab_size)


#: the files next to ``tokenizer.json`` that transformers' tokenizers read (special tokens, the model's
#: maximum length, the chat template): carried as they are through ``hymba convert`` (import, export)
#: and ``hymba train`` (from the checkpoint or folder its tokenizer came from)
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def side_files(folder: str | os.PathLike) -> dict[str, str]:
    """The ``TOKENIZER_SIDE_FILES`` of a folder (name -> text; UTF-8, the JSON ones JSON objects)."""
    out = {}
    for name in TOKENIZER_SIDE_FILES:
        f = Path(folder) / name
        if not f.is_file():
            continue
        try:
            text = f.read_bytes().decode("utf-8")
            if name.endswith(".json") and not isinstance(json.loads(text), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise TokenizerError(f"{f}: not readable ({first_line(e)})") from None
        out[name] = text
    return out


class StreamDecoder:
    """Incremental decoding for streaming: ``push(id)`` returns the new printable text.

    Text is re-decoded from all ids so far (multi-byte characters and merged tokens come
    out right); a trailing U+FFFD (an unfinished UTF-8 sequence) is held back until the
    next token completes it."""

    def __init__(self, tokenizer: Tokenizer, prefix: list[int] | tuple[int, ...] = ()):
        """``prefix``: ids the text continues (the prompt; ``flush()`` gives its text): new ids are
        decoded after it, not as a sequence of their own (SentencePiece's Metaspace drops a
        sequence's leading space, WordPiece keeps its first token's ``##``)."""
        self.tok = tokenizer
        self.ids: list[int] = [int(i) for i in prefix]
        self.shown = 0

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids)
        stable = text.rstrip("\ufffd") if self.tok.kind != "ids" else text
        new = stable[self.shown :]
        self.shown = max(self.shown, len(stable))
        return new

    def flush(self) -> str:
        text = self.tok.decode(self.ids)
        new = text[self.shown :]
        self.shown = len(text)
        return new


def cut_at(text: str, until: Sequence[str]) -> str:
    """``text`` before the first occurrence of any of ``until`` (the whole text when none occurs)."""
    cuts = [text.find(u) for u in until if u]
    cuts = [c for c in cuts if c >= 0]
    return text[:min(cuts)] if cuts else text


class AllStopped(Exception):
    """Raised by a ``StopWatch`` streamer once every row of the batch has stopped (a stop string or an end
    token): it ends ``generate`` early, the tokens being collected by the watch itself."""


class StopWatch:
    """Text-level stop strings for one ``generate`` call (HF's ``stop_strings``, lm_eval's ``until``),
    fed each new token column [B] as ``generate``'s streamer: a row is over at its first end id (``ends``,
    not kept) or once its generated text, less a trailing U+FFFD (an unfinished UTF-8 sequence), holds any
    of ``stops``; ``push`` says when every row is over
    (``__call__`` raises ``AllStopped`` then, to end the call early). ``completion(r)``: row r's generated
    text cut before its first stop string. ``prefixes``: each row's prompt ids, which its new ids are
    decoded after (SentencePiece's Metaspace drops a sequence's leading space, as ``StreamDecoder``); without
    them the new ids are decoded alone. ``shown(r)``: the part of the text that may be printed now while
    streaming: all of ``completion(r)`` once the row is over, else the text less its last ``len(longest stop)
    - 1`` characters (a stop string may still end there) and a trailing U+FFFD (an unfinished UTF-8
    sequence). ``hymba generate --stop`` and the harness's ``generate_until`` both watch through it.
    Cost: each ``push`` re-decodes a live row's whole text (its prefix included) and searches it, as
    ``StreamDecoder`` re-decodes, so n new tokens cost O(n (P + n)) decoded tokens per row (P: the prefix's
    length): a tokenizer's decode is not prefix-safe in general (merged bytes, Metaspace, WordPiece)."""

    def __init__(self, decode: Callable[[list[int]], str], rows: int, stops: Sequence[str] = (),
                 ends: Iterable[int] = (), prefixes: Sequence[Sequence[int]] | None = None):
        self.decode, self.stops, self.ends = decode, [s for s in stops if s], set(ends)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.new: list[list[int]] = [[] for _ in range(rows)]
        self.done = [False] * rows
        self.prefixes = [list(p) for p in prefixes] if prefixes is not None else [[] for _ in range(rows)]
        self._skip = [len(decode(p)) if p else 0 for p in self.prefixes]

    def text(self, r: int) -> str:
        """Row r's generated text so far (its end token excluded)."""
        if not self.prefixes[r]:
            return self.decode(self.new[r])
        return self.decode(self.prefixes[r] + self.new[r])[self._skip[r]:]

    def push(self, column: Any) -> bool:
        """Take one new token column (a tensor [B] or ids); True once every row is over."""
        for r, t in enumerate(column.tolist() if hasattr(column, "tolist") else column):
            if self.done[r]:
                continue
            if t in self.ends:
                self.done[r] = True
                continue
            self.new[r].append(t)
            if self.stops:
                # less a trailing U+FFFD: an unfinished UTF-8 sequence is no text yet (a stop string holding
                # U+FFFD would match the first byte of "é"); it is matched once the next token finishes it
                text = self.text(r).rstrip("\ufffd")
                if any(s in text for s in self.stops):
                    self.done[r] = True
        return all(self.done)

    def __call__(self, column: Any) -> None:
        if self.push(column):
            raise AllStopped

    def completion(self, r: int) -> str:
        return cut_at(self.text(r), self.stops)

    def shown(self, r: int) -> str:
        if self.done[r]:
            return self.completion(r)
        text = self.text(r).rstrip("\ufffd")
        return text[:max(len(text) - self.hold, 0)]


#: the end token of a tokenizer ``train_bpe`` trains (id 0; GPT-2's): one of ``END_TOKENS``, so that
#: ``hymba prepare`` ends documents with it and ``hymba generate`` stops at it
END_TOKEN = "<|endoftext|>"


def train_bpe(texts: Any, vocab_size: int, min_frequency: int = 2, special_tokens: tuple[str, ...] = (),
              progress: bool = False) -> str:
    """A byte-level BPE (GPT-2's scheme: Radford et al. 2019, "Language Models are Unsupervised Multitask
    Learners" §2.2; BPE: Sennrich et al. 2016) trained by the ``tokenizers`` library on ``texts`` (an
    iterable of strings: ``readers.texts``), as its JSON: ``models.BPE`` merges learnt by ``BpeTrainer``
    over the words the ``ByteLevel`` pre-tokenizer splits (no prefix space: a text's first word is
    encoded as it stands, so any text decodes back to itself), the 256 byte symbols always in the
    vocabulary (no unknown token), ``ByteLevel`` decoder; ``END_TOKEN`` is special token 0, then
    ``special_tokens``. The vocabulary has at most ``vocab_size`` tokens (fewer where the text has no
    more pairs seen ``min_frequency`` times). Errors of the text's reader propagate."""
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise TokenizerError("training a tokenizer needs the optional package 'tokenizers' "
                             "(pip install 'hymba_plus[text]')") from None
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=progress,
                                  special_tokens=[END_TOKEN, *special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return tok.to_str()
