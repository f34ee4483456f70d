"""Training data: built-in synthetic tasks and memory-mapped token shards.

Token shards (``hymba prepare DATA --out SHARDS``): text files are tokenized once into
flat ``shard-00000.bin`` files of uint16 (vocab <= 65536) or uint32 tokens plus an
``index.json`` (tokenizer, shard sizes and sha256 checksums, the largest token id, source fingerprint).
Training reads them with ``numpy.memmap``: only the windows a batch needs are paged in, so a corpus larger than
RAM streams.

Both kinds of data are addressed by a *global sample index*: an optimizer step consumes
the samples ``[c, c + batch_size * grad_accum * world_size)``, and rank ``r``'s micro-batch
``m`` is a fixed slice of that range. The data position saved in a checkpoint is the one
integer ``c``; samples do not depend on the batch split, so a resumed run sees exactly the
stream the uninterrupted run would have seen.

Text: every shard is cut into non-overlapping windows of ``seq_len`` tokens; the last
``val_frac`` of the windows (at least one) are held out for eval perplexity, the rest are
visited once per epoch in a pseudo-random order: a keyed permutation of ``[0, n)`` drawn per
epoch, O(1) memory (``window_order``: a 4-round Feistel network on the smallest even-width bit
domain holding n, walked until it lands below n -- the format-preserving-encryption construction;
Luby-Rackoff). Checkpoints of runs that used the earlier order (``j = (a k + b) mod n``, an
arithmetic progression per batch) resume on that order (``TextStream.order``).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import math
import os
import re
import shutil
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..core.config import brief, first_line
from . import readers
from . import tokenizer as tokmod
from .readers import BOM, DataError  # noqa: F401 - BOM: series.py and reasoning.py read it from here
from .tasks import TASKS, HeldOut, Task, heldout_note, predates_heldout

INDEX = "index.json"
FORMAT = "hymba-shards"
#: 2: documents end with the tokenizer's end token, pieces encoded without special tokens
#: 3: a document's later pieces encoded without the tokenizer's start-of-text prefix space
#: 4: pieces cut before a lone space between words (never inside a whitespace run), else a lone line
#:    break; a file read in one block is one piece
#: 5: JSON Lines / Parquet files (``readers``) are read as documents, compressed files decompressed (a
#:    ``.jsonl`` file was text before)
VERSION = 5


# --------------------------------------------------------------------------- prepare


#: the files a training run writes at the top of its folder (``metrics.jsonl``, ``loss.png`` and their numbered copies
#: a fresh run sets aside)
RUN_RECORD = re.compile(r"(metrics\.jsonl|loss\.png)(\.\d+)?")


def list_sources(path: str | os.PathLike, exclude: tuple[str | os.PathLike, ...] = ()) -> list[Path]:
    """The files a path names: itself (refused if binary), or every non-hidden, non-binary file under a
    folder (binary ones skipped), except those under an ``exclude`` folder or a folder hymba wrote
    (``_written_by_hymba``: ``prepare``'s output, a training run's folder, a checkpoint; such a folder given
    as ``path`` itself is refused, unless excluded: the run's own ``--out``). A file or folder that cannot be
    read is a ``DataError`` naming it."""
    p = Path(path)
    skip = {Path(e).resolve() for e in exclude}
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_file():
        if _binary(p):
            raise DataError(f"{p}: a binary file (a NUL byte in its first 8 KiB), not text")
        if p.name == INDEX and _is_shards(p.parent):  # (its JSON was trained on as text)
            raise DataError(f"{p}: the index of token shards, not text: pass its folder {p.parent}")
        return [p]
    if not p.is_dir():
        raise DataError(f"{p}: not a regular file or folder")
    kind = _hymba_kind(p)
    if kind == "a training run's folder" and not (p / "loss.png").is_file() and not any(
            _hymba_kind(d) == "a checkpoint" for d in p.iterdir() if d.is_dir()):
        kind = None  # (a text folder of the user's that holds a metrics.jsonl of its own at its top)
    if kind is not None and p.resolve() not in skip:  # (as inside a corpus; the run's own --out may be its text)
        raise DataError(f"{p}: {kind} written by hymba{' prepare' if kind == 'token shards' else ''}, not text")
    def unreadable(e: OSError) -> None:  # (os.walk skips a folder it cannot list in silence: its text left out)
        raise DataError(f"{e.filename}: cannot read ({e.strerror})")

    files = []
    for root, dirs, names in os.walk(p, onerror=unreadable):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (Path(root) / d).resolve() not in skip
                         and not _written_by_hymba(Path(root) / d))
        # the text folder is the run's own folder (--out = --data): its metrics (and those set aside) are not text
        # (read on --resume, they changed the corpus, which was then refused as another split of it)
        run_root = Path(root).resolve() in skip
        for n in sorted(names):
            f = Path(root) / n
            if n.startswith(".") or not f.is_file() or _binary(f) or (run_root and RUN_RECORD.fullmatch(n)):
                continue
            files.append(f)
    if not files:
        raise DataError(f"{p}: no text files in this folder")
    return files


def _written_by_hymba(d: Path) -> bool:
    """A folder of ours inside a text folder, not text to train on (``_hymba_kind``)."""
    return _hymba_kind(d) is not None


def _hymba_kind(d: Path) -> str | None:
    """What folder of ours ``d`` is, or None: token shards (``index.json`` of our format), a training run
    (``metrics.jsonl``) or a checkpoint (``recipe.yaml`` next to ``model.safetensors``)."""
    if (d / "recipe.yaml").is_file() and (d / "model.safetensors").is_file():
        return "a checkpoint"
    if (d / "metrics.jsonl").is_file():
        return "a training run's folder"
    return "token shards" if _is_shards(d) else None


def _is_shards(d: Path) -> bool:
    """Whether a folder holds an ``index.json`` of our format (token shards ``prepare`` wrote)."""
    try:
        return json.loads((d / INDEX).read_text(encoding="utf-8")).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def shard_folder(p: Path) -> bool:
    """Whether ``--data`` ``p`` is read as token shards: an index.json of our format, or (so that a broken index
    is refused, not trained on as text) one beside prepare's first shard file; a text folder with an index.json
    of its own is text."""
    return p.is_dir() and (p / INDEX).exists() and (_is_shards(p) or (p / "shard-00000.bin").is_file())


def _binary(f: Path) -> bool:
    """Whether a file has a NUL byte in its first 8 KiB (what no text file has); a compressed text file's
    decompressed bytes are looked at, a JSON Lines or Parquet file (``readers.kind_of``) is not binary."""
    if readers.binary_by_nature(f):
        return readers.kind_of(f)[0] == readers.TEXT and b"\0" in readers.head(f)
    try:
        with open(f, "rb") as fh:
            return b"\0" in fh.read(8192)
    except OSError as e:
        raise DataError(f"{f}: cannot read ({e.strerror})") from None


def fingerprint(files: list[Path]) -> list[dict[str, Any]]:
    out = []
    for f in files:
        st = f.stat()
        out.append({"path": str(f.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns})
    return out


def _chunks(f: Path, tok: Any, chunk_bytes: int = 1 << 22) -> Iterator[np.ndarray]:
    """Token arrays of one text file (decompressed: ``readers.Stream``), read in pieces (a text piece ends
    before a space between words), then its end mark (``_end_mark``); a leading byte-order mark is skipped.
    A ``tokenizers`` tokenizer encodes the pieces without its special tokens (its post-processor would put
    e.g. a BOS at every piece's start, mid-document), the later ones as continuations (no start-of-text prefix
    space: ``HFTokenizer.continuation``). A file of no tokens (empty, a byte-order mark alone, whitespace the
    tokenizer drops) is no document: no end mark."""
    yield from _document(readers.Stream(f), tok, chunk_bytes)


def _document(fh: Any, tok: Any, chunk_bytes: int = 1 << 22) -> Iterator[np.ndarray]:
    """Token arrays of one document read from ``fh`` (``_pieces``), then its end mark where it has tokens."""
    tokens = 0
    last = [b""]
    for arr in _pieces(fh, tok, chunk_bytes, last):
        tokens += arr.size
        yield arr
    if tokens:
        yield _end_mark(tok, last[0])


def _encoded(f: Path, tok: Any, text_field: str = "text") -> Iterator[np.ndarray]:
    """Token arrays of ``f``: a text file's one document (``_chunks``), or a JSON Lines / Parquet file's
    documents (``_batch_ids``); a tokenizer's failure named with the file."""
    if readers.kind_of(f)[0] != readers.TEXT:
        for texts, where in readers.batches(f, text_field):
            yield _batch_ids(texts, where, tok)
        return
    try:
        yield from _chunks(f, tok)
    except tokmod.TokenizerError as e:
        raise DataError(f"{f}: {e}") from None


def _batch_ids(texts: list[str], where: Callable[[int], str], tok: Any, chunk_bytes: int = 1 << 22) -> np.ndarray:
    """The tokens of a batch of documents (``readers.batches``), each followed by its end mark (``_end_ids``,
    as a text file's), the same ids as each document in a text file of its own (``_chunks``): bytes as one
    array of the UTF-8 of the documents and their line breaks (no per-token work in Python); a ``tokenizers``
    tokenizer through its multi-threaded ``encode_batch`` (without special tokens, as ``_pieces``), but a
    document of ``chunk_bytes // 16`` bytes or more, which a text file's reading would encode in pieces, in
    those pieces (``_document``). A document of no tokens is no document (no end mark)."""
    if tok.kind == "bytes":
        parts = []
        for i, t in enumerate(texts):
            try:
                b = t.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate ("\ud800" in a JSON string)
                raise DataError(f"{where(i)}: not valid UTF-8 text (character {e.start}: {t[e.start]!r})") from None
            if b:
                parts.append(b)
                parts.append(bytes(_end_ids(tok, b[-1:])))
        return np.frombuffer(b"".join(parts), dtype=np.uint8)
    if tok.kind != "tokenizers":
        encoded = []
        for i, t in enumerate(texts):
            try:
                encoded.append(tok.encode(t))
            except tokmod.TokenizerError as e:
                raise DataError(f"{where(i)}: {e}") from None
        long: dict[int, np.ndarray] = {}
    else:
        want = chunk_bytes // 16  # (a text file shorter than this is read and encoded as one piece: _pieces)
        sizes = [len(t) if 4 * len(t) < want else len(t.encode("utf-8", errors="surrogatepass")) for t in texts]
        short = [i for i, n in enumerate(sizes) if n < want]
        try:
            ids = tok.encode_batch([texts[i] for i in short], add_special_tokens=False)
        except tokmod.TokenizerError as e:
            bad = next((i for i in short if not _utf8(texts[i])), None)
            if bad is not None:
                raise DataError(f"{where(bad)}: not valid UTF-8 text (a lone surrogate)") from None
            raise DataError(f"{where(short[0])}..{where(short[-1])}: {e}") from None
        encoded = [[] for _ in texts]
        for i, v in zip(short, ids):
            encoded[i] = v
        long = {}
        for i, n in enumerate(sizes):
            if n >= want:
                if not _utf8(texts[i]):
                    raise DataError(f"{where(i)}: not valid UTF-8 text (a lone surrogate)")
                try:
                    long[i] = np.concatenate([np.zeros(0, dtype=np.int64), *_document(
                        io.BytesIO(texts[i].encode("utf-8")), tok, chunk_bytes)])
                except tokmod.TokenizerError as e:
                    raise DataError(f"{where(i)}: {e}") from None
    flat: list[int] = []
    pieces = []
    for i, v in enumerate(encoded):
        if i in long:
            pieces.append(np.asarray(flat, dtype=np.int64))
            pieces.append(long[i])
            flat = []
        elif v:
            flat.extend(v)
            flat.extend(_end_ids(tok, texts[i][-1:].encode("utf-8", errors="surrogatepass")))
    pieces.append(np.asarray(flat, dtype=np.int64))
    return np.concatenate(pieces) if len(pieces) > 1 else pieces[0]


def _structured(files: list[Path]) -> bool:
    """Whether some of ``files`` are JSON Lines or Parquet (their documents read from a field)."""
    return any(readers.kind_of(f)[0] != readers.TEXT for f in files)


def _utf8(text: str) -> bool:
    """Whether a text can be encoded to UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _end_ids(tok: Any, last: bytes) -> list[int]:
    """What follows a document of tokens in the shards (every format's one rule; ``last``: the document's
    last byte): the tokenizer's end token (``eos_id``) where it has one, else, for bytes, a line break
    where the document does not end with one (so that documents never run into each other); nothing
    otherwise."""
    if tok.eos_id is not None:
        return [tok.eos_id]
    return [10] if tok.kind == "bytes" and last != b"\n" else []


def _end_mark(tok: Any, last: bytes) -> np.ndarray:
    """``_end_ids`` as an array."""
    return np.asarray(_end_ids(tok, last), dtype=np.int64)


#: the ASCII whitespace bytes (``_cut``)
_WS = frozenset(b" \t\n\r\x0b\x0c")


def _char_start(data: bytes, i: int) -> int:
    """The start of the UTF-8 character holding byte ``i``."""
    while i > 0 and data[i] & 0xC0 == 0x80:  # a continuation byte
        i -= 1
    return i


def _char_at(data: bytes, i: int) -> str | None:
    """The character whose UTF-8 encoding starts at byte ``i`` (None: cut off by the data's end)."""
    lead = data[i]
    n = 1 if lead < 0xC0 else 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    return data[i:i + n].decode("utf-8", errors="replace") if i + n <= len(data) else None


def _char_space(data: bytes, i: int, before: bool) -> bool:
    """Is the character ending at byte ``i`` (``before``) or starting at it a whitespace character
    (``str.isspace``: NBSP, U+3000, ...)? A character cut off by the data's end counts as one."""
    ch = _char_at(data, _char_start(data, i - 1) if before else i)
    return ch is None or ch.isspace()


def _combines(data: bytes, i: int) -> bool:
    """Does the character starting at byte ``i`` attach to the one before it (a combining mark, a
    variation selector, a zero-width joiner), or may it (cut off by the data's end)?"""
    ch = _char_at(data, i)
    return ch is None or (len(ch) == 1 and (unicodedata.combining(ch) > 0 or unicodedata.category(ch) in ("Mn", "Me")
                                            or ch in "\u200d\u200c"))


def _cut(data: bytes, sep: int) -> int:
    """Where to end a piece of ``data`` (0: nowhere): before its last ``sep`` byte (a space, else a
    line break) that stands alone between two non-whitespace characters (``str.isspace``: NBSP and
    U+3000 count) inside ``data``; the next piece starts with it. Every common pre-tokenizer ends a
    token there (ByteLevel's regex, Whitespace, BERT's and, before a space, Metaspace), and a run of
    whitespace is never cut: ByteLevel keeps the spaces before a line break together,
    SentencePiece vocabularies have ``▁▁`` tokens, GPT-NeoX added tokens made of spaces."""
    i = len(data) - 1
    while (i := data.rfind(bytes([sep]), 0, i)) > 0:
        if i + 1 < len(data) and data[i - 1] not in _WS and data[i + 1] not in _WS \
                and not _char_space(data, i, True) and not _char_space(data, i + 1, False):
            return i
    return 0


def _pieces(fh: Any, tok: Any, chunk_bytes: int, last: list[bytes] | None = None) -> Iterator[np.ndarray]:
    """``last[0]``: set to the document's last byte."""
    last = [b""] if last is None else last
    first = [True]
    at = [0, 1]  # the next piece's byte offset in the file and its line (for the error below)

    def encode(piece: bytes) -> list[int]:  # a piece after the first continues the document: no prefix space
        try:  # (decoded with errors="replace", bytes that are not UTF-8 became U+FFFD without a word)
            text = piece.decode("utf-8")
        except UnicodeDecodeError as e:
            line = at[1] + piece.count(b"\n", 0, e.start)
            raise tokmod.TokenizerError(f"not UTF-8 text at byte offset {at[0] + e.start} (line {line}): "
                                        f"{piece[e.start:e.end]!r} (the tokenizer reads UTF-8 text; re-encode "
                                        "the file)") from None
        at[0] += len(piece)
        at[1] += piece.count(b"\n")
        if tok.kind != "tokenizers":
            return tok.encode(text)
        ids = tok.encode(text, add_special_tokens=False, continues=not first[0])
        first[0] = False
        return ids

    with fh:
        if tok.kind == "bytes":
            while block := fh.read(chunk_bytes):
                last[0] = block[-1:]
                yield np.frombuffer(block, dtype=np.uint8)
            return
        at[0] = fh.tell()  # (past a byte-order mark)
        rest = b""
        want = chunk_bytes // 16
        while True:
            block = fh.read(want)
            data = rest + block
            if len(block) < want:  # the file's end (a short read of a file): the rest is one piece
                last[0] = data[-1:]
                if data:
                    yield np.asarray(encode(data), dtype=np.int64)
                return
            # cut before a space between words, else a line break between lines (``_cut``); past a
            # huge block with neither (bounded memory) between characters
            cut = _cut(data, 0x20) or _cut(data, 0x0A)
            if cut == 0 and len(data) > chunk_bytes:  # before the last character (never inside one)
                cut = _char_start(data, len(data) - 1)
                # nor between a character and the marks that combine with it (accents, variation
                # selectors, joiners: a tokenizer's NFC / NFKC normalizer joins them)
                while cut > 0 and (_combines(data, cut) or data[max(0, cut - 3):cut] == "\u200d".encode()):
                    cut = _char_start(data, cut - 1)
            if cut == 0:
                rest = data
                continue
            rest = data[cut:]
            yield np.asarray(encode(data[:cut]), dtype=np.int64)


def prepare(source: str | os.PathLike, out: str | os.PathLike, tokenizer: Any = None,
            shard_tokens: int = 1 << 24, force: bool = False, progress: bool = False,
            exclude: tuple[str | os.PathLike, ...] = (), text_field: str = "text") -> dict[str, Any]:
    """Tokenize a text file or folder into token shards in ``out``; returns the index. Each text file is
    a document, and so is each row of a JSON Lines or Parquet file (its string ``text_field``:
    ``readers``), each followed by the tokenizer's end token (``_end_ids``). ``out`` and ``exclude``
    folders inside a source folder are not read.

    Written into a temporary sibling folder and renamed, so ``out`` is either the old
    complete folder or the new complete one. An existing non-empty ``out`` is replaced
    only with ``force``."""
    tok = tokenizer or tokmod.ByteTokenizer()
    out = Path(out)
    files = list_sources(source, exclude=(out, *exclude))
    src, dst = Path(source).resolve(), out.resolve()
    if dst == src or dst in src.parents:  # replacing out would delete the text being read
        raise DataError(f"{out}: holds the data {source} itself; choose an --out outside it")
    if out.exists() and not force:
        if not out.is_dir():
            what = "a file, not a folder" if out.is_file() else "not a folder"
            raise DataError(f"{out}: exists and is {what} (use --force to replace it)")
        if any(out.iterdir()):
            raise DataError(f"{out}: already exists and is not empty (use --force to replace it)")
    if tok.vocab_size > 1 << 32:
        raise DataError(f"the tokenizer's vocabulary has {tok.vocab_size} ids: shards hold ids of at most 32 bits")
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"{out}: cannot write ({e.strerror})") from None
    shards: list[dict[str, Any]] = []
    buf = np.empty(shard_tokens, dtype=dtype)
    fill = 0
    total = 0
    max_id = -1

    def flush() -> None:
        nonlocal fill
        if fill:
            name = f"shard-{len(shards):05d}.bin"
            buf[:fill].tofile(tmp / name)
            # its checksum: the data's identity that a resumed run checks (``TokenShards.content``)
            shards.append({"file": name, "tokens": int(fill), "sha256": hashlib.sha256(buf[:fill]).hexdigest()})
            fill = 0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc="prepare", disable=None)
    try:
        for f in files:
            for arr in _encoded(f, tok, text_field):
                top = int(arr.max()) if arr.size else -1
                if top >= tok.vocab_size:
                    raise DataError(f"{f}: tokenizer produced id {top} >= its vocab {tok.vocab_size}")
                max_id = max(max_id, top)
                total += arr.size
                while arr.size:
                    take = min(arr.size, shard_tokens - fill)
                    buf[fill : fill + take] = arr[:take]
                    fill += take
                    arr = arr[take:]
                    if fill == shard_tokens:
                        flush()
            if bar is not None:
                bar.update(f.stat().st_size)
        flush()
        if total == 0:
            raise DataError(f"{source}: empty (no tokens)")
        index = {
            "format": FORMAT, "version": VERSION, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
            "max_id": max_id, "tokens": total, "shards": shards, "tokenizer": tok.to_json(), "sources": fingerprint(files),
        }
        if getattr(tok, "files", None):  # its side files (special tokens, chat template): checkpoints carry them
            index["tokenizer_files"] = tok.files
        if _structured(files):  # the field its documents were read from (``hymba train``'s cache, shards checked)
            index["text_field"] = text_field
        (tmp / INDEX).write_text(json.dumps(index, indent=1))
        _replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(f"{out}: cannot write ({e.strerror})") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return index


def _replace(new: Path, out: Path) -> None:
    """Rename the folder ``new`` to ``out``, replacing what is there (a folder, or a file: ``--force``)."""
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(new, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:  # --force over a file
            old.unlink(missing_ok=True)
    else:
        os.replace(new, out)


# --------------------------------------------------------------------------- shards


class TokenShards:
    """Read-only view of a folder written by ``prepare`` (numpy memmaps, opened lazily)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        ip = self.path / INDEX
        try:
            index = json.loads(ip.read_text())
        except FileNotFoundError:
            raise DataError(f"{ip}: missing (not a folder written by `hymba prepare`)") from None
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{ip}: corrupt ({e})") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{ip}: not a hymba shard index")
        try:
            self.dtype = np.dtype(index["dtype"])
            self.shards = [(self.path / s["file"], int(s["tokens"])) for s in index["shards"]]
            names = [str(s["file"]) for s in index["shards"]]
            self.vocab_size = int(index["vocab_size"])
            self.tokenizer_json = str(index["tokenizer"])
            files = index.get("tokenizer_files", {})
            if not isinstance(files, dict) or set(files) - set(tokmod.TOKENIZER_SIDE_FILES) or not all(
                    isinstance(v, str) for v in files.values()):
                raise TypeError("tokenizer_files: expected tokenizer side files (name -> text)")
            self.tokenizer_files = files
            # the shards' checksums (written by prepare; None in shards of older versions: read once when asked)
            sums = [s.get("sha256") for s in index["shards"]]
            if not all(v is None or (isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v)) for v in sums):
                raise TypeError("sha256: expected a shard's hex checksum")
            self._sums = sums
            # the largest token id (written by prepare; None in shards of older versions)
            self.max_id = int(index["max_id"]) if index.get("max_id") is not None else None
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{ip}: corrupt ({e})") from None
        # what prepare writes, nothing else: an object dtype would read the shard's bytes as pointers
        if self.dtype not in (np.dtype(np.uint16), np.dtype(np.uint32)):
            raise DataError(f"{ip}: dtype {self.dtype.name!r}: expected uint16 or uint32 token ids")
        bad = next((n for n in names if Path(n).name != n or n in ("", ".", "..")), None)
        if bad is not None:
            raise DataError(f"{ip}: shard file {brief(bad, 80)}: expected a file name inside {self.path}")
        self.index = index
        for f, n in self.shards:
            if not f.is_file():
                raise DataError(f"{f}: missing shard")
            if f.stat().st_size != n * self.dtype.itemsize:
                raise DataError(f"{f}: truncated or corrupt shard ({f.stat().st_size} bytes, "
                                f"index says {n} tokens of {self.dtype.name})")
        self._maps: dict[int, np.memmap] = {}
        self._content: str | None = None

    @property
    def tokens(self) -> int:
        return sum(n for _, n in self.shards)

    @property
    def content(self) -> str:
        """A digest of the token ids (dtype and every shard's checksum), what a resumed run must train on again:
        from the index's checksums, or (shards of older versions) the shard files, read once."""
        if self._content is None:
            sums = []
            for (f, _), v in zip(self.shards, self._sums):
                if v is None:
                    h = hashlib.sha256()
                    try:
                        with open(f, "rb") as fh:
                            while block := fh.read(1 << 24):
                                h.update(block)
                    except OSError as e:
                        raise DataError(f"{f}: cannot read ({e.strerror})") from None
                    v = h.hexdigest()
                sums.append(v)
            self._content = hashlib.sha256("\n".join([self.dtype.name, *sums]).encode()).hexdigest()[:16]
        return self._content

    def tokenizer(self) -> Any:
        """The tokenizer the shards were made with (with its side files: ``HFTokenizer.with_files``)."""
        tok = tokmod.from_json(self.tokenizer_json, str(self.path / INDEX))
        if self.tokenizer_files and isinstance(tok, tokmod.HFTokenizer):
            try:
                tok.with_files(self.tokenizer_files)
            except ValueError as e:  # a tokenizer_config.json that is not JSON
                raise DataError(f"{self.path / INDEX}: tokenizer_files: {first_line(e)}") from None
        return tok

    def shard(self, i: int) -> np.memmap:
        if i not in self._maps:
            f, n = self.shards[i]
            self._maps[i] = np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))
        return self._maps[i]


# --------------------------------------------------------------------------- streams


@dataclass
class Batch:
    input_ids: Tensor
    labels: Tensor
    segments: dict | None = None  # reasoning data: question / reasoning / answer tensors and masks
    # held-out batches of a finite set: the first ``unique`` rows are distinct examples, the rest
    # repeat them to fill the batch (None: every row counts); the trainer's evaluation scores
    # ``scored_labels()`` and weighs each batch's loss by the items those score (``Objective.eval_weight``)
    unique: int | None = None

    @property
    def rows(self) -> int:
        """The distinct rows: ``unique``, or every row."""
        return self.input_ids.shape[0] if self.unique is None else self.unique

    def wrapped(self, indices: range, n: int | None) -> "Batch":
        """This batch of held-out rows ``indices`` of a set of ``n`` (None: unbounded), marked where
        indices past the last one wrapped around to fill it (``unique``: the rows before them)."""
        real = len(indices) if n is None else sum(1 for i in indices if i < n)
        if real < len(indices):
            self.unique = real
        return self

    def scored_labels(self) -> Tensor:
        """``labels`` with the repeated rows blanked (-100, or NaN for numeric targets): not scored."""
        if self.rows == self.labels.shape[0]:
            return self.labels
        out = self.labels.clone()
        out[self.rows:] = float("nan") if out.is_floating_point() else -100
        return out


class ReasoningBatches:
    """Reasoning data (``training/reasoning.py``: a built-in task such as ``chain_arith`` or a
    JSONL file) for objectives that need the segments (``ladir``): ``input_ids`` / ``labels``
    are question + reasoning + answer with the answer scored, ``segments`` the collated parts."""

    metric = "accuracy"

    def __init__(self, data: str, vocab_size: int, seed: int, cfg: Any, tokenizer_path: str | None,
                 max_len: int | None, reserve: int = 0):
        from .reasoning import ReasoningStream, params_from_train

        tok = tokmod.load_file(tokenizer_path) if tokenizer_path else None
        if tok is not None and tok.vocab_size > vocab_size:  # generate would refuse the checkpoint
            raise DataError(f"--tokenizer {tokenizer_path}: {tok.vocab_size} tokens but the model's vocab_size is "
                            f"{vocab_size}")
        self.inner = ReasoningStream(data, vocab_size, seed=seed, tokenizer=tok, val_frac=cfg.val_frac,
                                     max_len=max_len, reserve=reserve, **params_from_train(data, cfg))
        self.tokenizer = self.inner.tokenizer
        self.chance = self.inner.chance
        self.end_id = self.inner.end_id  # the id that ends the answers (the trainer's generation_config.json)
        self.description = self.inner.description
        self.note = self.inner.note  # a built-in task whose held-out questions are 1% or more of them (logged)

    def _batch(self, d: dict) -> Batch:
        """``segments`` also holds ``value_mask``: the answer tokens but a last one that is the end id
        (``end_id``): what the held-out answer accuracy scores (``objectives/ladir.py``)."""
        am = d["answer_mask"]
        vm = am.clone()
        if self.end_id is not None:
            last = (am.sum(1) - 1).clamp(min=0)
            rows = torch.arange(am.shape[0])
            vm[rows, last] &= d["answer"][rows, last] != self.end_id
        return Batch(d["full"], d["labels"], segments={**d, "value_mask": vm})

    def train(self, indices: range) -> Batch:
        return self._batch(self.inner.train(indices))

    def eval(self, indices: range) -> Batch:
        """Held-out examples ``indices`` (a file's wrap around past the last one to fill the batch;
        ``unique`` says how many rows are distinct, as ``TextStream.eval``)."""
        return self._batch(self.inner.eval(indices)).wrapped(indices, self.inner.n_eval())

    def n_eval(self) -> int | None:
        return self.inner.n_eval()

    def state(self) -> dict[str, Any]:
        return self.inner.state()

    def resumed(self, saved: dict[str, Any]) -> str | None:
        return self.inner.resumed(saved)


class TaskStream:
    """A built-in task: training sample ``i`` comes from ``default_rng([seed, 0, i])``, redrawn from it
    while it is one of the held-out samples (``Task.heldout``: the first distinct samples of the eval
    stream ``default_rng([seed, 1, i])``), which eval reads (index i: held-out sample i, wrapping around
    past the last as ``TextStream.eval``). ``note``: one line when the held-out set is 1% or more of the
    task's distinct samples (the trainer logs it)."""

    metric = "accuracy"

    def __init__(self, task: Task, seq_len: int, vocab_size: int, seed: int, cfg: Any):
        self.task = task
        self.seq_len = seq_len
        self.vocab_size = vocab_size
        self.seed = seed
        self.cfg = cfg
        task.check(seq_len, vocab_size, cfg)
        self.tokenizer = tokmod.IdsTokenizer(vocab_size)
        self.chance = task.chance(vocab_size, cfg)
        # (the held-out set itself is drawn at the first batch, ``heldout``: opening the stream stays cheap, so
        # the run's other checks -- the model's size among them -- come before thousands of samples are drawn)
        n, space = task.heldout_size(seq_len, vocab_size, cfg), task.space(seq_len, vocab_size, cfg)
        self.n_heldout = n
        self.description = f"task {task.name} ({task.doc}; chance accuracy {self.chance:.3f}; {n:,} held out)"
        self.note = heldout_note(task.setting(seq_len, vocab_size, cfg), n, space)

    @functools.cached_property
    def heldout(self) -> HeldOut:
        """The held-out set (``Task.heldout``), drawn at its first use."""
        return self.task.heldout(self.seed, self.seq_len, self.vocab_size, self.cfg)

    def train(self, indices: range) -> Batch:
        return Batch(*self.task.batch(indices, self.seed, self.seq_len, self.vocab_size, self.cfg, stream=0,
                                      exclude=self.heldout.keys))

    def eval(self, indices: range) -> Batch:
        """Held-out samples ``indices``, wrapping around past the last one to fill the batch; ``unique``
        says how many rows are distinct (the trainer's evaluation counts only those)."""
        n = len(self.heldout.keys)
        rows = torch.tensor([i % n for i in indices], dtype=torch.long)
        return Batch(self.heldout.ids[rows], self.heldout.labels[rows]).wrapped(indices, n)

    def n_eval(self) -> int | None:
        return self.n_heldout

    def state(self) -> dict[str, Any]:
        """The task and the settings its samples depend on (``Task.settings``: a resumed run says when they
        changed; another task's settings, which this one does not read, are not among them)."""
        return {"kind": "task", "name": self.task.name,
                "params": {"seq_len": self.seq_len, **{k: getattr(self.cfg, k, None) for k in self.task.settings}},
                "heldout": self.n_eval()}

    def resumed(self, saved: dict[str, Any]) -> str | None:
        """What resuming a checkpoint of data state ``saved`` says (``Trainer._check_data``), else None."""
        return predates_heldout(saved, self.note)


_MIX1, _MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), uint64 -> uint64, element-wise (wrapping products)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def window_order(k: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """Positions ``k`` (int64, each in ``[0, n)``) of a keyed pseudo-random permutation of ``[0, n)``:
    a balanced Feistel network of ``len(keys)`` rounds (round function: splitmix64 of the half and
    the round's key) permutes the 2h-bit domain, ``4^h >= n``; a value that lands at or past n is
    encrypted again until it is below n (cycle walking: still a bijection of ``[0, n)``, ~1-4 passes
    on average). Vectorised over k; O(1) memory in n."""
    h = max(1, ((max(n - 1, 1)).bit_length() + 1) // 2)
    mask, shift = np.uint64((1 << h) - 1), np.uint64(h)

    def encrypt(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & mask)
        return (left << shift) | right

    with np.errstate(over="ignore"):
        out = encrypt(np.asarray(k, dtype=np.uint64))
        out_of_range = out >= np.uint64(n)
        while out_of_range.any():
            out[out_of_range] = encrypt(out[out_of_range])
            out_of_range = out >= np.uint64(n)
    return out.astype(np.int64)


class TextStream:
    """Windows of ``seq_len`` tokens from token shards; the last ``val_frac`` held out. With
    ``vocab_size``, every batch's ids are checked below it on the CPU (a ``DataError`` naming the
    shard, not the embedding's IndexError on the device): shards whose index records no
    ``max_id`` (older ``hymba prepare``), or whose files were changed after it, are not trusted."""

    metric = "ppl"

    def __init__(self, shards: TokenShards, seq_len: int, seed: int, val_frac: float,
                 vocab_size: int | None = None):
        self.shards = shards
        self.seq_len = seq_len
        self.seed = seed
        self.vocab_size = vocab_size
        counts = np.array([n // seq_len for _, n in shards.shards], dtype=np.int64)
        self.cum = np.cumsum(counts)
        total = int(self.cum[-1]) if counts.size else 0
        if total < 2 and shards.tokens >= 2 * seq_len:  # windows do not cross shards
            raise DataError(f"{shards.path}: its shards of at most {max(n for _, n in shards.shards)} tokens hold "
                            f"{total} window(s) of --seq-len {seq_len} (need 2: one training and one held-out; a "
                            f"window does not cross shards): prepare it with a larger --shard-tokens")
        if total < 2:
            raise DataError(f"{getattr(shards, 'source', None) or shards.path}: {shards.tokens} tokens are too few "
                            f"for --seq-len {seq_len} "
                            f"(need at least {2 * seq_len}: one training and one held-out window)")
        self.n_val = max(1, int(total * val_frac))
        self.n_train = total - self.n_val
        self.tokenizer = shards.tokenizer()
        self.description = (f"text {shards.path} ({shards.tokens:,} tokens; {self.n_train:,} train / "
                            f"{self.n_val:,} held-out windows of {seq_len})")
        self._perm: dict[int, tuple[int, int]] = {}
        self._keys: dict[int, np.ndarray] = {}
        # "feistel" (window_order); "affine" is the order of checkpoints made before it (the trainer keeps it
        # on resume: Trainer._check_data)
        self.order = "feistel"

    def _window(self, j: int) -> np.ndarray:
        s = int(np.searchsorted(self.cum, j, side="right"))
        start = (j - (int(self.cum[s - 1]) if s else 0)) * self.seq_len
        return np.asarray(self.shards.shard(s)[start : start + self.seq_len], dtype=np.int64)

    def _affine(self, epoch: int) -> tuple[int, int]:
        if epoch not in self._perm:
            n = self.n_train
            rng = np.random.default_rng([self.seed, 2, epoch])
            a = int(rng.integers(1, max(n, 2)))
            while math.gcd(a, n) != 1:
                a += 1
            self._perm = {epoch: (a, int(rng.integers(0, n)))}
        return self._perm[epoch]

    def _batch(self, js: list[int]) -> Batch:
        arr = np.stack([self._window(j) for j in js])
        if self.vocab_size is not None and arr.size and int(arr.max()) >= self.vocab_size:
            j = js[int(arr.max(1).argmax())]
            s = int(np.searchsorted(self.cum, j, side="right"))
            raise DataError(f"{self.shards.shards[s][0]}: token id {int(arr.max())} (window {j}) is outside the "
                            f"model's vocab_size {self.vocab_size}: shards made for another vocabulary?")
        ids = torch.from_numpy(arr)
        return Batch(ids, ids.clone())

    def _round_keys(self, epoch: int) -> np.ndarray:
        if epoch not in self._keys:
            rng = np.random.default_rng([self.seed, 3, epoch])
            self._keys = {epoch: rng.integers(0, 2**63, size=4, dtype=np.uint64)}
        return self._keys[epoch]

    def train(self, indices: range) -> Batch:
        if self.order == "affine":
            js = []
            for c in indices:
                e, k = divmod(c, self.n_train)
                a, b = self._affine(e)
                js.append((a * k + b) % self.n_train)
            return self._batch(js)
        c = np.arange(indices.start, indices.stop, indices.step, dtype=np.int64)
        epochs, k = np.divmod(c, self.n_train)
        js = np.empty_like(c)
        for e in np.unique(epochs):  # a batch spans at most a few epochs
            at = epochs == e
            js[at] = window_order(k[at], self.n_train, self._round_keys(int(e)))
        return self._batch(js.tolist())

    def eval(self, indices: range) -> Batch:
        """Held-out windows ``indices``, wrapping around past the last one to fill the batch;
        ``unique`` says how many rows are distinct (the trainer's evaluation counts only those)."""
        return self._batch([self.n_train + (i % self.n_val) for i in indices]).wrapped(indices, self.n_val)

    def n_eval(self) -> int | None:
        return self.n_val

    def state(self) -> dict[str, Any]:
        return {"kind": "text", "path": str(self.shards.path), "tokens": self.shards.tokens,
                "seq_len": self.seq_len, "n_train": self.n_train, "content": self.shards.content,
                "order": self.order}

    def resumed(self, saved: dict[str, Any]) -> str | None:
        """A checkpoint from before the Feistel window order (or one resumed on the old order) goes on in the
        order it was trained in, so the resumed run sees the windows the uninterrupted one would; said."""
        order = saved.get("order", "affine")
        if order == self.order:
            return None
        self.order = order
        return f"visits the windows in the {order} order of an earlier version: kept"


def open_stream(data: str, seq_len: int, vocab_size: int, seed: int, cfg: Any, cache_dir: Path | None,
                tokenizer_path: str | None = None, segments: bool = False,
                max_len: int | None = None, series: Any = None, reserve: int = 0,
                accept: Callable[[Any], None] | None = None) -> Any:
    """A stream for ``data``: a task name, a shard folder, or text (tokenized into
    ``cache_dir`` first, reused while the source files are unchanged); with ``segments``
    (an objective that needs question / reasoning / answer), reasoning data (``reserve``: the
    positions the objective's passes add to an example, within ``max_len``); with ``series``
    (the forecast objective's config), windows of a CSV series or of the synthetic generator
    (``series.py``). ``accept`` (a resumed run's checks) is called with the stream before a re-made
    cache replaces ``cache_dir``: where it raises, the old cache is kept."""
    if series is not None:
        from .series import SeriesStream

        stream = SeriesStream(data, series, seed)
    elif segments:
        stream = ReasoningBatches(data, vocab_size, seed, cfg, tokenizer_path, max_len, reserve)
    elif data in TASKS:
        stream = TaskStream(TASKS[data], seq_len, vocab_size, seed, cfg)
    else:
        return _text_stream(data, seq_len, vocab_size, seed, cfg, cache_dir, tokenizer_path, accept)
    if accept is not None:
        accept(stream)
    return stream


def _text_stream(data: str, seq_len: int, vocab_size: int, seed: int, cfg: Any, cache_dir: Path | None,
                 tokenizer_path: str | None, accept: Callable[[Any], None] | None) -> TextStream:
    """``open_stream`` of a shard folder or of text: a stale cache is re-made beside ``cache_dir`` and
    replaces it only once the stream is accepted."""
    staged = None
    p = Path(data)
    field = getattr(cfg, "text_field", None)  # (None: unset, read as prepare's default)
    if not p.exists():
        from .reasoning import REASONING_TASKS

        if data in REASONING_TASKS:
            raise DataError(f"{data}: a reasoning task, for recipes with objective: {{kind: ladir}} (this one's "
                            f"built-in tasks: {', '.join(TASKS)})")
        raise DataError(f"{p}: no such file or directory (and not a built-in task: {', '.join(TASKS)}; "
                        f"objective ladir: {', '.join(REASONING_TASKS)})")
    # our shards: an index.json of our format, or (so that a broken index is refused, not trained on as text) one
    # beside prepare's first shard file; a text folder with an index.json of its own is text
    if shard_folder(p):
        shards = TokenShards(p)
        if tokenizer_path is not None:
            want = tokmod.load_file(tokenizer_path).to_json()
            if want != shards.tokenizer_json:
                raise DataError(f"{p / INDEX}: these shards were made with another tokenizer than {tokenizer_path}")
        made = shards.index.get("text_field")
        if field is not None and field != made:  # (shards are tokens: no field of theirs is read again)
            how = f'the field "{made}"' if made is not None else "text files, or before prepare recorded the field"
            raise DataError(f"{p}: token shards made from {how}: --text-field {field} names the field of JSON "
                            "Lines / Parquet data (prepare it with hymba prepare --text-field)")
    else:
        tok = tokmod.load_file(tokenizer_path) if tokenizer_path else tokmod.ByteTokenizer()
        assert cache_dir is not None
        run_dir = cache_dir.parent  # a training run's folder inside the text folder is not text
        files = list_sources(p, exclude=(run_dir,))
        if sum(f.stat().st_size for f in files) == 0:
            raise DataError(f"{p}: empty (no text)")
        field = "text" if field is None else field  # ("": the field named "", as prepare reads it)
        shards = None
        if (cache_dir / INDEX).exists():
            try:
                cached = TokenShards(cache_dir)
                if (cached.index.get("sources") == fingerprint(files) and cached.tokenizer_json == tok.to_json()
                        and cached.tokenizer_files == getattr(tok, "files", {}) and cached.index.get("version") == VERSION
                        and cached.index.get("text_field", "text" if _structured(files) else None) == (field if _structured(files) else None)):
                    shards = cached
            except DataError:
                shards = None
        if shards is None:
            # the cache is replaced (force) only where it is ours: OUT/data may be a folder of the user's
            if cache_dir.exists() and (not cache_dir.is_dir() or any(cache_dir.iterdir())) and not _is_shards(cache_dir):
                raise DataError(f"{cache_dir}: exists and is not token shards of an earlier run (the text is "
                                f"tokenized into OUT/data): move it away, or choose another --out")
            # written beside the cache: a resume refused for this data (``accept``) keeps the cache it trained on
            staged = cache_dir.parent / f".{cache_dir.name}.new-{os.getpid()}"
            prepare(p, staged, tok, force=True, exclude=(run_dir,), text_field=field)
            shards = TokenShards(staged)
        shards.source = str(p)  # what messages name (the cache folder is ours, not the user's)
    try:
        # text: the text and its tokenizer (not the cache, which a refusal here leaves unmade); shards: their folder
        text = getattr(shards, "source", None)
        where = text or shards.path
        if shards.vocab_size > vocab_size:
            what = ("the tokenizer" if text is None else f"--tokenizer {tokenizer_path}" if tokenizer_path else
                    "the bytes tokenizer (the default without --tokenizer)")
            raise DataError(f"{where}: {what} has {shards.vocab_size} tokens but the model's vocab_size is {vocab_size}")
        if shards.max_id is not None and shards.max_id >= vocab_size:
            raise DataError(f"{where}: holds token id {shards.max_id} ({INDEX}'s max_id) but the model's "
                            f"vocab_size is {vocab_size}")
        stream = TextStream(shards, seq_len, seed, cfg.val_frac, vocab_size)
        if accept is not None:
            accept(stream)
        if staged is None:
            return stream
        assert cache_dir is not None
        try:
            _replace(staged, cache_dir)
        except OSError as e:
            raise DataError(f"{cache_dir}: cannot write ({e.strerror})") from None
    finally:
        if staged is not None:
            shutil.rmtree(staged, ignore_errors=True)
    shards = TokenShards(cache_dir)
    shards.source = str(p)
    return TextStream(shards, seq_len, seed, cfg.val_frac, vocab_size)
