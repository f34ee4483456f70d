"""The documents of a corpus file, for ``hymba prepare``, ``hymba train --data`` (through ``data.prepare``) and
``hymba tokenizer train`` (one reader for all).

A file's format is its name's (``kind_of``):

* ``.parquet`` -- Parquet (FineWeb, SlimPajama, The Stack): the string column ``--text-field`` (default
  ``text``), read in record batches through ``pyarrow.parquet``; each row is a document;
* ``.jsonl`` / ``.json`` -- JSON Lines: one JSON object a line, its string field ``--text-field`` a document;
  blank lines are skipped;
* anything else -- text: the whole file is one document;

and ``.gz`` (``gzip``) / ``.zst`` (``zstandard``) after ``.jsonl`` / ``.json`` / a text name are those,
compressed (read as streams, never whole). A UTF-8 byte-order mark at a (decompressed) file's start is not
part of it. A row whose field is missing or not a string is a ``DataError`` of one line, ``FILE:LINE: ...``
(JSON Lines, lines counted from 1) or ``FILE: row N: ...`` (Parquet, rows counted from 0 as pyarrow and pandas
index them). pyarrow and zstandard are optional (the extra ``data``), imported only for such a file.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..core.config import brief, first_line


class DataError(ValueError):
    """Unusable data (missing, empty, corrupt, too short): one line naming the file."""


TEXT, JSONL, PARQUET = "text", "jsonl", "parquet"
#: a compressed file's last suffix -> its compression
COMPRESSION = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
JSONL_SUFFIXES = (".jsonl", ".json")
#: the UTF-8 byte-order mark that Windows tools put at a text file's start (not part of the text)
BOM = b"\xef\xbb\xbf"
#: a batch of documents (``batches``): at most this many, and at most ``BATCH_CHARS`` characters past the first
BATCH_DOCS = 1024
BATCH_CHARS = 1 << 23
#: where the text field is missing: the flag that names another, of every command that reads such files (hymba
#: prepare, train, eval, tokenizer train), whose name begins the error's line (``hymba CMD: FILE:LINE: ...``)
FIELD_HINT = "--text-field names the one to read"


def kind_of(f: Path) -> tuple[str, str | None]:
    """``(TEXT | JSONL | PARQUET, None | "gzip" | "zstd")`` of a file, by its name (case-insensitive)."""
    suffixes = [s.lower() for s in f.suffixes]
    compression = COMPRESSION.get(suffixes[-1]) if suffixes else None
    inner = suffixes[-2] if compression and len(suffixes) > 1 else "" if compression or not suffixes else suffixes[-1]
    if inner == ".parquet" and compression is None:
        return PARQUET, None
    return (JSONL if inner in JSONL_SUFFIXES else TEXT), compression


def binary_by_nature(f: Path) -> bool:
    """Whether ``f`` is read through a decoder (compressed, Parquet): its bytes hold NULs, and are not
    skipped as a binary file for that."""
    kind, compression = kind_of(f)
    return kind == PARQUET or compression is not None


class Stream:
    """A (decompressed) file's bytes: ``read(n)`` returns ``n`` bytes unless the file ends (a short
    read is its end), ``tell()`` the offset in the decompressed bytes; a decoder's error is a
    ``DataError`` naming the file. ``skip_bom``: a leading byte-order mark is read past."""

    def __init__(self, f: Path, skip_bom: bool = True):
        self.f = Path(f)
        _, compression = kind_of(self.f)
        self.errors: tuple[type[BaseException], ...] = (OSError, EOFError)
        try:
            raw: Any = open(self.f, "rb")
        except OSError as e:
            raise DataError(f"{self.f}: cannot read ({e.strerror or e})") from None
        if compression == "gzip":
            self.errors += (zlib.error,)  # (corrupt deflate data: zlib's own error, not an OSError)
            raw = gzip.GzipFile(fileobj=raw, mode="rb")
            self._file = raw.fileobj
        elif compression == "zstd":
            try:
                import zstandard
            except ImportError:
                raw.close()
                raise DataError(f"{self.f}: reading zstd needs the optional package 'zstandard' "
                                "(pip install 'hymba_plus[data]')") from None
            self.errors += (zstandard.ZstdError,)
            raw = _ZstdFrames(raw, zstandard)
        self.raw = raw
        self.head = b""
        self.pos = 0
        if skip_bom:
            start = self.read(len(BOM))
            if start != BOM:
                self.head, self.pos = start, 0

    def read(self, n: int) -> bytes:
        out = [self.head[:n]]
        self.head = self.head[n:]
        got = len(out[0])
        try:
            while got < n:
                block = self.raw.read(n - got)
                if not block:
                    break
                out.append(block)
                got += len(block)
        except self.errors as e:
            raise DataError(f"{self.f}: cannot read ({first_line(e)})") from None
        data = b"".join(out)
        self.pos += len(data)
        return data

    def tell(self) -> int:
        return self.pos

    def close(self) -> None:
        self.raw.close()
        if getattr(self, "_file", None) is not None:  # (GzipFile leaves a file object it was given open)
            self._file.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _ZstdFrames:
    """A ``.zst`` file's decompressed bytes, its frames one after another (``cat a.zst b.zst``, pzstd), through
    zstandard's ``decompressobj`` fed ``CHUNK`` compressed bytes at a time (its output so bounded); a file that
    ends inside a frame (cut short: an interrupted download) is an ``EOFError``, as gzip's. (zstandard's
    ``stream_reader`` ends there in silence, as at a frame's end: the first part of the file was read as all
    of it.)"""

    CHUNK = 1 << 14

    def __init__(self, fh: Any, zstandard: Any):
        self.fh = fh
        self.dctx = zstandard.ZstdDecompressor()
        self.obj = self.dctx.decompressobj()
        self.fed = False  # whether the current frame has had bytes
        self.out = bytearray()
        self.done = False

    def read(self, n: int) -> bytes:
        while len(self.out) < n and not self.done:
            data = self.fh.read(self.CHUNK)
            if not data:
                self.done = True
                if self.fed and not self.obj.eof:
                    raise EOFError("the file ends inside a zstd frame: cut short?")
            while data:
                if self.obj.eof:  # the next frame
                    self.obj = self.dctx.decompressobj()
                self.out += self.obj.decompress(data)
                self.fed = True
                data = self.obj.unused_data if self.obj.eof else b""
        out = bytes(self.out[:n])
        del self.out[:n]
        return out

    def close(self) -> None:
        self.fh.close()


def head(f: Path, n: int = 8192) -> bytes:
    """The first ``n`` (decompressed) bytes of a text file (whether it is binary: ``list_sources``)."""
    with Stream(f, skip_bom=False) as s:
        return s.read(n)


#: a batch of documents: their texts and where each is (``where(i)``: ``FILE:LINE`` or ``FILE: row N``)
Batch = tuple[list[str], Callable[[int], str]]


def _json_kind(v: Any) -> str:
    return ("null" if v is None else "a boolean" if isinstance(v, bool) else "a number" if isinstance(v, (int, float))
            else "an array" if isinstance(v, list) else "an object" if isinstance(v, dict) else "a string")


def jsonl_batches(f: Path, field: str) -> Iterator[Batch]:
    """The documents of a JSON Lines file (compressed or not), ``BATCH_DOCS`` at most a batch."""
    texts: list[str] = []
    lines: list[int] = []
    size = 0
    n = 0

    def batch() -> Batch:
        at = list(lines)
        return list(texts), lambda i: f"{f}:{at[i]}"

    with Stream(f) as s:
        rest = b""
        while True:
            block = s.read(1 << 20)
            data = rest + block
            if block:
                parts = data.split(b"\n")
                rest = parts.pop()
            else:  # the file's end: what is left is its last line, without a line break after it
                parts, rest = ([data] if data else []), b""
            for raw in parts:
                n += 1
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    raise DataError(f"{f}:{n}: not UTF-8 text at column {e.start + 1}: {raw[e.start:e.end]!r} "
                                    "(JSON is UTF-8; re-encode the file)") from None
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{n}: not JSON ({e.msg} at column {e.colno}; a .jsonl or .json file is read "
                                    "as JSON Lines: one object a line)") from None
                if not isinstance(obj, dict):
                    raise DataError(f'{f}:{n}: {_json_kind(obj)}, not a JSON object with a "{field}" string '
                                    "(a .jsonl or .json file is read as JSON Lines: one object a line)")
                if field not in obj:
                    raise DataError(f'{f}:{n}: no "{field}" field (its fields: {brief(list(obj), 80)}; {FIELD_HINT})')
                text = obj[field]
                if not isinstance(text, str):
                    raise DataError(f'{f}:{n}: "{field}" is {_json_kind(text)}, not a string')
                texts.append(text)
                lines.append(n)
                size += len(text)
                if len(texts) >= BATCH_DOCS or size >= BATCH_CHARS:
                    yield batch()
                    texts.clear()
                    lines.clear()
                    size = 0
            if not block:
                break
    if texts:
        yield batch()


def parquet_batches(f: Path, field: str) -> Iterator[Batch]:
    """The documents of a Parquet file: its string column ``field``, one record batch of ``BATCH_DOCS``
    rows at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{f}: reading Parquet needs the optional package 'pyarrow' "
                        "(pip install 'hymba_plus[data]')") from None
    try:
        pf = pq.ParquetFile(f)
        schema = pf.schema_arrow
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f}: not a readable Parquet file ({first_line(e)})") from None
    if field not in schema.names:
        raise DataError(f'{f}: no column "{field}" (its columns: {brief(schema.names, 80)}; {FIELD_HINT})')
    typ = schema.field(field).type
    if pa.types.is_dictionary(typ):
        typ = typ.value_type
    strings = pa.types.is_string(typ) or pa.types.is_large_string(typ) or getattr(pa.types, "is_string_view",
                                                                                      lambda t: False)(typ)
    if not strings:
        raise DataError(f'{f}: row 0: "{field}" is {typ}, not a string (the column\'s type)')
    row = 0
    it = pf.iter_batches(batch_size=BATCH_DOCS, columns=[field])
    while True:
        try:
            rb = next(it, None)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{f}: row {row}: cannot read ({first_line(e)})") from None
        if rb is None:
            return
        col = rb.column(0)
        if col.null_count:
            import pyarrow.compute as pc

            i = pc.index(col.is_null(), True).as_py()
            raise DataError(f'{f}: row {row + i}: "{field}" is null, not a string')
        first = row
        yield col.to_pylist(), lambda i, first=first: f"{f}: row {first + i}"
        row += len(col)


def batches(f: Path, field: str) -> Iterator[Batch]:
    """The documents of a JSON Lines or Parquet file (``kind_of``), in batches."""
    return parquet_batches(f, field) if kind_of(f)[0] == PARQUET else jsonl_batches(f, field)


def texts(f: Path, field: str, block: int = 1 << 20) -> Iterator[str]:
    """The text of a file, for training a tokenizer: a JSON Lines or Parquet file's documents, a text
    file's text in pieces of about ``block`` bytes, each ending at a whitespace character (a word is
    never cut: BPE counts the words a pre-tokenizer splits). Strict UTF-8 (a ``DataError`` naming the
    byte offset), as ``prepare`` reads a ``tokenizers`` tokenizer's text."""
    if kind_of(f)[0] != TEXT:
        for docs, _ in batches(f, field):
            yield from docs
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    rest = ""
    with Stream(f) as s:
        while True:
            start = s.tell() - len(decoder.getstate()[0])  # (the error counts from a character begun before)
            data = s.read(block)
            try:
                text = rest + decoder.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise DataError(f"{f}: not UTF-8 text near byte offset {start + max(e.start, 0)} (the tokenizer "
                                "reads UTF-8 text; re-encode the file)") from None
            if not data:
                if text:
                    yield text
                return
            cut = max(text.rfind(" "), text.rfind("\n"))
            if cut <= 0 and len(text) < 4 * block:  # (a text with no space nor line break: cut anywhere)
                rest = text
                continue
            cut = cut if cut > 0 else len(text)
            rest = text[cut:]
            yield text[:cut]
