"""``hymba prepare`` on the corpora researchers have (JSON Lines, Parquet, gzip / zstd: training/readers.py)
and ``hymba tokenizer train`` (a byte-level BPE of the ``tokenizers`` library): every format gives the shards of
the same documents as text files, bad rows are one line naming file and line / row, and --out is untouched."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from hymba_plus.cli import main
from hymba_plus.training import readers
from hymba_plus.training.data import DataError, TokenShards, prepare
from hymba_plus.training.tokenizer import END_TOKEN, from_json, load_file, train_bpe

#: documents: unicode, one ending in a line break, an empty one (no document), leading / inner spaces
DOCS = ["The quick brown fox jumps over the lazy dog.", "Ünïcödé ✓ text\nwith two lines\n", "",
        "  leading spaces and  double  spaces", "a\n\nb", "last one " * 30]


def _txt_folder(folder: Path, docs: list[str]) -> Path:
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i:03d}.txt").write_bytes(d.encode())
    return folder


def _jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: d}) + "\n" for i, d in enumerate(docs)).encode()


def _zst(data: bytes) -> bytes:
    zstandard = pytest.importorskip("zstandard")
    return zstandard.ZstdCompressor().compress(data)


def _parquet(path: Path, docs: list, field: str = "text", rows_per_group: int | None = None) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=rows_per_group)
    return path


def _shards(folder: Path) -> tuple[bytes, dict]:
    index = json.loads((folder / "index.json").read_text())
    data = b"".join((folder / s["file"]).read_bytes() for s in index["shards"])
    return data, {k: index[k] for k in ("dtype", "tokens", "max_id", "vocab_size", "tokenizer")}


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> Path:
    """A byte-level BPE trained by ``train_bpe`` on the documents (its JSON file)."""
    pytest.importorskip("tokenizers")
    p = tmp_path_factory.mktemp("bpe") / "bpe.json"
    p.write_text(train_bpe(iter(DOCS * 3), vocab_size=300, min_frequency=1))
    return p


@pytest.mark.parametrize("tok", ["bytes", "bpe"])
def test_every_format_gives_the_shards_of_the_same_documents_as_text_files(tmp_path, tok, bpe):
    """JSON Lines (.jsonl, .json, gzip, zstd), Parquet (several row groups) and compressed text files:
    the shards of a folder of one .txt file per document, bit for bit (each followed by the end token, or
    for bytes a line break where it does not end with one; an empty document is none)."""
    t = load_file(bpe) if tok == "bpe" else None
    prepare(_txt_folder(tmp_path / "txt", DOCS), tmp_path / "s-txt", t)
    want = _shards(tmp_path / "s-txt")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_bytes(_jsonl(DOCS))
    (src / "a.json").write_bytes(_jsonl(DOCS).replace(b"\n", b"\r\n") + b"\n\n")  # CRLF, blank lines
    (src / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS)))
    (src / "a.jsonl.zst").write_bytes(_zst(_jsonl(DOCS)))
    (src / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl(DOCS, "content")[:-1])  # a BOM, no last line break
    _parquet(src / "a.parquet", DOCS, rows_per_group=2)
    for name in ("a.jsonl", "a.json", "a.jsonl.gz", "a.jsonl.zst", "a.parquet"):
        prepare(src / name, tmp_path / f"s-{name}", t)
        assert _shards(tmp_path / f"s-{name}") == want, name
    prepare(src / "b.jsonl", tmp_path / "s-b", t, text_field="content")
    assert _shards(tmp_path / "s-b") == want
    gz = tmp_path / "gz"
    gz.mkdir()
    for f in sorted((tmp_path / "txt").iterdir()):  # compressed text files: the same documents
        (gz / (f.name + (".gz" if int(f.stem) % 2 else ".zst"))).write_bytes(
            gzip.compress(f.read_bytes()) if int(f.stem) % 2 else _zst(f.read_bytes()))
    prepare(gz, tmp_path / "s-gz", t)
    assert _shards(tmp_path / "s-gz") == want
    # a folder mixing them, read in its sorted walk: the documents of each in turn
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "1.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS[:2])))
    _parquet(mixed / "2.parquet", DOCS[2:4])
    (mixed / "3.txt").write_text(DOCS[4])
    (mixed / "4.jsonl").write_bytes(_jsonl(DOCS[5:]))
    prepare(mixed, tmp_path / "s-mixed", t)
    assert _shards(tmp_path / "s-mixed") == want


def test_encode_batch_equals_the_per_document_encoding(tmp_path, bpe, monkeypatch):
    """Documents are encoded by tokenizers' encode_batch on batches: the ids of encoding each on its own
    (without special tokens: a BOS template's tokens are not put in), whatever the batch size; a document
    longer than a text file's piece is encoded in pieces as that file (the same shards)."""
    tokenizers = pytest.importorskip("tokenizers")
    obj = json.loads(bpe.read_text())
    tok = tokenizers.Tokenizer.from_str(json.dumps(obj))
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[
        ("<|endoftext|>", 0)])
    t = from_json(tok.to_str())
    texts = [d for d in DOCS if d] + ["x" * 50, " café\t\n  ", "\u00e9t\u00e9 ✓✓"]
    assert t.encode_batch(texts, add_special_tokens=False) == [t.encode(s, add_special_tokens=False) for s in texts]
    assert t.encode_batch(texts)[0][0] == 0  # (the template: what prepare leaves out)
    long_doc = ("word " * 60_000) + "end"  # 300 KB: past a text file's first piece (256 KiB)
    docs = [*DOCS, long_doc, "after"]
    (tmp_path / "d.jsonl").write_bytes(_jsonl(docs))
    prepare(_txt_folder(tmp_path / "txt", docs), tmp_path / "s-txt", t)
    want = _shards(tmp_path / "s-txt")
    for n in (1, 3, readers.BATCH_DOCS):
        monkeypatch.setattr(readers, "BATCH_DOCS", n)
        prepare(tmp_path / "d.jsonl", tmp_path / f"s{n}", t)
        assert _shards(tmp_path / f"s{n}") == want, n
    assert TokenShards(tmp_path / "s1").shard(0)[:3].tolist() != [0, 0, 0]


BAD_ROWS = [
    (b'{"text": "a"}\n{"text": "b"}\n{"txt": "c"}\n', ":3: no \"text\" field (its fields: ['txt']"),
    (b'{"text": "a"}\n{"text": 7}\n', ':2: "text" is a number, not a string'),
    (b'{"text": null}\n', ':1: "text" is null, not a string'),
    (b'{"text": "a"}\n\n{"text": "b",}\n', ":3: not JSON (Expecting property name"),
    (b'["a"]\n', ":1: an array, not a JSON object"),
    (b'{"text": "a \xff"}\n', ":1: not UTF-8 text at column 13"),
    (b'{"text": "ok"}\n{"text": "a\\ud800"}\n', ":2: not valid UTF-8 text (character 1: '\\ud800')"),
]


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("data,needle", BAD_ROWS)
def test_a_bad_jsonl_row_is_one_line_naming_file_and_line_and_out_is_untouched(tmp_path, capsys, data, needle,
                                                                                compress):
    f = tmp_path / ("bad.jsonl.gz" if compress else "bad.jsonl")
    f.write_bytes(gzip.compress(data) if compress else data)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    for extra in ([], ["--force"]):
        rc = main(["prepare", str(f), "--out", str(out), *extra])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        if extra:  # (without --force: refused as not empty before any reading)
            assert f"hymba prepare: {f}{needle}" in err, err
        assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left
    rc = main(["prepare", str(f), "--out", str(tmp_path / "new")])
    assert rc == 1 and f"{f}{needle}" in capsys.readouterr().err and not (tmp_path / "new").exists()


def test_a_bad_parquet_file_is_one_line_naming_file_and_row(tmp_path, capsys):
    """Rows counted from 0 (as pyarrow and pandas index them); a null in the 2nd record batch names its row."""
    cases = [
        (_parquet(tmp_path / "null.parquet", ["a"] * 1500 + [None, "b"]), ': row 1500: "text" is null, not a string'),
        (_parquet(tmp_path / "ints.parquet", [1, 2]), ': row 0: "text" is int64, not a string'),
        (_parquet(tmp_path / "col.parquet", ["a"], field="content"),
         ": no column \"text\" (its columns: ['id', 'content']; --text-field names the one to read)"),
    ]
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    cases.append((tmp_path / "junk.parquet", ": not a readable Parquet file"))
    for f, needle in cases:
        rc = main(["prepare", str(f), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1 and f"hymba prepare: {f}{needle}" in err, err
        assert not (tmp_path / "out").exists()
    assert main(["prepare", str(tmp_path / "col.parquet"), "--out", str(tmp_path / "out"),
                 "--text-field", "content"]) == 0


def test_a_folder_with_a_bad_row_in_a_later_file_writes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("fine text")
    (src / "b.jsonl.zst").write_bytes(_zst(_jsonl(["x", "y"]) + b'{"text": ["no"]}\n'))
    rc = main(["prepare", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{src / 'b.jsonl.zst'}:3: \"text\" is an array, not a string" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    (src / "b.jsonl.zst").write_bytes(b"\x28\xb5\x2f\xfd not zstd")  # a corrupt compressed file: one line too
    rc = main(["prepare", str(src), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{src / 'b.jsonl.zst'}: cannot read" in err and len(err.strip().splitlines()) == 1, err


def test_kind_of():
    k = readers.kind_of
    assert k(Path("a.jsonl")) == ("jsonl", None) and k(Path("a.JSON.GZ")) == ("jsonl", "gzip")
    assert k(Path("c4-train.00000-of-01024.json.gz")) == ("jsonl", "gzip")
    assert k(Path("x.parquet")) == ("parquet", None) and k(Path("v1.2.jsonl.zst")) == ("jsonl", "zstd")
    assert k(Path("notes.txt.gz")) == ("text", "gzip") and k(Path("README")) == ("text", None)
    assert k(Path("book.md")) == ("text", None) and k(Path("b.zst")) == ("text", "zstd")


def test_trained_tokenizer_round_trips_and_ends_documents_with_its_end_token(tmp_path, capsys):
    """``hymba tokenizer train``: a byte-level BPE whose end token prepare and generate find (<|endoftext|>,
    id 0), that decodes any text back to itself (bytes never unknown), from JSON Lines as from text."""
    pytest.importorskip("tokenizers")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl(DOCS * 20)))
    (src / "b.txt").write_text("the lazy dog sleeps " * 200)
    out = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(src), "--vocab-size", "320", "--out", str(out),
                 "--special-tokens", "<pad>", "<mask>"]) == 0
    assert "a byte-level BPE of 320 tokens" in capsys.readouterr().out
    t = load_file(out)
    assert t.vocab_size == 320 and t.eos_id == 0 and t.tok.id_to_token(0) == END_TOKEN
    assert [t.tok.token_to_id(s) for s in ("<pad>", "<mask>")] == [1, 2]
    assert len(t.encode("the lazy dog")) < len("the lazy dog")  # merges learnt
    for text in [*DOCS, "  never seen: 日本語 ☃ \t\r\n end ", "\x00\x7f"]:
        assert t.decode(t.encode(text, add_special_tokens=False)) == text
    rc = main(["tokenizer", "train", str(src), "--vocab-size", "320", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and "already exists (use --force" in err
    for args, needle in [(["--vocab-size", "200"], "--vocab-size 200: must be at least 257"),
                         (["--vocab-size", "300", "--special-tokens", "</s>"], "--special-tokens </s>: an end token"),
                         (["--vocab-size", "300", "--special-tokens", "<a>", "<a>"], "<a>: given twice")]:
        rc = main(["tokenizer", "train", str(src), "--out", str(tmp_path / "t2.json"), *args])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    (src / "c.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')  # the trainer reads as prepare does
    rc = main(["tokenizer", "train", str(src), "--vocab-size", "300", "--out", str(tmp_path / "t3.json")])
    err = capsys.readouterr().err
    assert rc == 1 and f"{src / 'c.jsonl'}:2: no \"text\" field" in err and not (tmp_path / "t3.json").exists()


def test_prepare_and_train_with_a_trained_tokenizer(tmp_path, capsys):
    """The two steps a researcher takes: train the tokenizer on the corpus, prepare the corpus with it,
    then ``hymba train --data SHARDS --tokenizer TOK`` runs (the shards' tokenizer is the file's)."""
    pytest.importorskip("tokenizers")
    (tmp_path / "c.jsonl").write_bytes(_jsonl([f"document {i}: " + " ".join(DOCS) for i in range(40)]))
    tok = tmp_path / "tok.json"
    assert main(["tokenizer", "train", str(tmp_path / "c.jsonl"), "--vocab-size", "300", "--out", str(tok)]) == 0
    assert main(["prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "s"), "--tokenizer", str(tok)]) == 0
    shards = TokenShards(tmp_path / "s")
    ids = np.asarray(shards.shard(0))
    assert int((ids == 0).sum()) == 40 and ids[-1] == 0  # one end token a document
    recipe = {"name": "bpe-tiny", "model": {"vocab_size": 320, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA"},
              "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    rc = main(["train", str(tmp_path / "r.yaml"), "--data", str(tmp_path / "s"), "--tokenizer", str(tok),
               "--out", str(tmp_path / "run"), "--steps", "2", "--batch-size", "2", "--seq-len", "32",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "step-2" / "tokenizer.json").read_text() == tok.read_text()


def test_an_empty_jsonl_document_list_is_empty(tmp_path):
    (tmp_path / "e.jsonl").write_text('{"text": ""}\n\n')
    with pytest.raises(DataError, match="e.jsonl: empty"):
        prepare(tmp_path / "e.jsonl", tmp_path / "s")


def test_a_lone_surrogate_in_a_json_string_is_named_with_its_line_for_a_bpe_too(tmp_path, bpe):
    (tmp_path / "d.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "x\\udc80 y"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid UTF-8 text \(a lone surrogate\)"):
        prepare(tmp_path / "d.jsonl", tmp_path / "s", load_file(bpe))
    assert not (tmp_path / "s").exists()


def _corpus_bytes() -> bytes:
    """JSON Lines of varied words (compresses ~3x, so that a half of the compressed file is mid-stream)."""
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in rng.integers(0, 5000, 60_000)]
    return _jsonl([" ".join(words[i:i + 60]) for i in range(0, len(words), 60)])


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".txt.gz", ".txt.zst"])
@pytest.mark.parametrize("damage", ["truncated", "flipped"])
def test_a_damaged_compressed_file_is_one_line_and_out_is_untouched(tmp_path, capsys, suffix, damage):
    """A compressed file cut short (an interrupted download) or with corrupt bytes in its deflate / zstd
    stream: one line naming the file, exit 1, nothing written -- never a traceback (zlib's own error) nor
    the shards of the part before the cut (a zstd stream reader ends at the end of its input, mid-frame)."""
    data = _corpus_bytes()
    packed = gzip.compress(data) if suffix.endswith(".gz") else _zst(data)
    if damage == "truncated":
        packed = packed[:len(packed) // 2]
    else:  # inside the compressed stream (zstd frames with a checksum: the zstd CLI's default)
        if suffix.endswith(".zst"):
            packed = pytest.importorskip("zstandard").ZstdCompressor(write_checksum=True).compress(data)
        b = bytearray(packed)
        for i in range(200, 264):  # (in the first deflate block: zlib's error, not the CRC's at the end)
            b[i] ^= 0x55
        packed = bytes(b)
    f = tmp_path / f"d{suffix}"
    f.write_bytes(packed)
    out = tmp_path / "out"
    rc = main(["prepare", str(f), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"hymba prepare: {f}: cannot read (" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [f.name]


def test_a_zst_file_of_several_frames_is_read_whole(tmp_path):
    """Concatenated frames (``cat a.zst b.zst``, pzstd's output) and an empty file: every frame's bytes."""
    docs = [*DOCS, "after the first frame"]
    (tmp_path / "d.jsonl.zst").write_bytes(_zst(_jsonl(docs[:3])) + _zst(_jsonl(docs[3:])))
    prepare(tmp_path / "d.jsonl.zst", tmp_path / "s")
    prepare(_txt_folder(tmp_path / "txt", docs), tmp_path / "s-txt")
    assert _shards(tmp_path / "s") == _shards(tmp_path / "s-txt")
    (tmp_path / "e.txt.zst").write_bytes(b"")
    with readers.Stream(tmp_path / "e.txt.zst") as s:
        assert s.read(10) == b""


@pytest.mark.parametrize("data,offset", [(b"abc\xe2\x82\xacd\xffe", 7), (b"hello world \xe2\x82", 12),
                                         (b"ab \xe2\x82\xac \xe2\x82", 7)])
def test_the_tokenizer_trainers_reader_names_the_offset_of_the_first_bad_byte(tmp_path, data, offset):
    """``readers.texts`` (``hymba tokenizer train``'s text) names the byte where the UTF-8 goes wrong, also
    where a character began in the block before (the decoder's pending bytes) or the file ends inside one."""
    (tmp_path / "t.txt").write_bytes(data)
    with pytest.raises(DataError, match=rf"t\.txt: not UTF-8 text near byte offset {offset} "):
        list(readers.texts(tmp_path / "t.txt", "text", block=4))


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_train_on_json_lines_without_its_text_field_names_the_flag(tmp_path, capsys, kind):
    """``hymba train --data x.jsonl`` reads the field ``text`` unless ``--text-field`` names another: a corpus
    whose text is in another field is one line naming the file, its fields and the flags that read one."""
    if kind == "jsonl":
        f = tmp_path / "c.jsonl"
        f.write_bytes(_jsonl(["a document"] * 3, field="content"))
    else:
        f = _parquet(tmp_path / "c.parquet", ["a document"] * 3, field="content")
    rc = main(["train", "configs/gpt_tiny.yaml", "--data", str(f), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("hymba train: ") and str(f) in err and "'content'" in err, err
    assert "--text-field names the one to read" in err and "hymba prepare" not in err, err  # (train's own flag)
    assert not (tmp_path / "run").exists()


def test_train_text_field_reads_that_field_and_a_resume_keeps_it(tmp_path, capsys):
    """``hymba train --text-field NAME`` reads the documents of a JSON Lines file's field NAME, the same tokens
    as ``hymba prepare --text-field NAME`` makes; the checkpoint records it (train_config), so that a plain
    ``--resume`` (the command a run prints) reads the same field; another field on a resume is other data: the
    run's OUT/data cache is re-made for it, not reused."""
    from tests.test_checkpoint import FAST, recipe_file

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": d.upper(), "content": d}) + "\n" for d in DOCS * 4))
    recipe = recipe_file(tmp_path, {"name": "tf", "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 64,
                                                             "block_pattern": "GA"},
                                    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}}})
    out = tmp_path / "run"
    args = ["train", recipe, "--data", str(f), "--out", str(out), *FAST, "--save-every", "1"]
    assert main([*args, "--text-field", "content", "--steps", "1"]) == 0, capsys.readouterr().err
    assert main(["prepare", str(f), "--out", str(tmp_path / "s"), "--text-field", "content"]) == 0
    capsys.readouterr()
    assert _shards(out / "data") == _shards(tmp_path / "s")
    assert json.loads((out / "data" / "index.json").read_text())["text_field"] == "content"
    state = json.loads((out / "step-1" / "trainer_state.json").read_text())
    assert state["train_config"]["text_field"] == "content"
    assert main([*args, "--steps", "2", "--resume"]) == 0, capsys.readouterr().err  # the checkpoint's field
    capsys.readouterr()
    assert (out / "step-2").is_dir() and _shards(out / "data") == _shards(tmp_path / "s")
    # another field of the same source files: its tokens (not the cache of "content"), other data than the
    # checkpoint's: refused, naming the field it was trained on; OUT/data stays the cache it trained on
    rc = main([*args, "--steps", "3", "--resume", "--text-field", "text"])
    err = capsys.readouterr().err
    assert rc == 1 and "other data" in err and "--text-field content" in err, err
    assert len(err.strip().splitlines()) == 1 and _shards(out / "data") == _shards(tmp_path / "s")


@pytest.mark.parametrize("bad, needle", [({"content": 3}, '"content" is a number, not a string'),
                                         ({"text": "x"}, 'no "content" field')])
def test_train_text_field_bad_row_is_one_line_naming_file_and_line(tmp_path, capsys, bad, needle):
    f = tmp_path / "c.jsonl"
    f.write_text(json.dumps({"content": "a document"}) + "\n" + json.dumps(bad) + "\n")
    rc = main(["train", "configs/gpt_tiny.yaml", "--data", str(f), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress", "--text-field", "content"])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and f"{f}:2: {needle}" in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", ["mqar", "shards"])
def test_train_text_field_where_no_text_is_read_is_refused(tmp_path, capsys, data):
    """``--text-field`` names where text is read: a built-in task reads none (usage error, as its --tokenizer),
    shards made from another field (or from text files) are not re-read (one line naming the shards' field)."""
    if data == "shards":
        (tmp_path / "c.jsonl").write_bytes(_jsonl(DOCS * 4))
        assert main(["prepare", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "s")]) == 0
        data = str(tmp_path / "s")
    capsys.readouterr()
    rc = main(["train", "configs/gpt_tiny.yaml", "--data", data, "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress", "--text-field", "content"])
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "--text-field content" in err, err
    assert rc == (2 if data == "mqar" else 1), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("data", ["mqar", "shards"])
def test_eval_of_a_text_field_checkpoint_on_data_that_reads_no_field(tmp_path, capsys, data):
    """``hymba eval CKPT --data X`` of a checkpoint trained with ``--text-field`` (train_config.text_field): a
    built-in task reads no text and shards are tokens, so the checkpoint's field is not theirs to match (as its
    tokenizer is dropped for a task); both were refused, naming ``--text-field``, a flag eval had not then."""
    from tests.test_checkpoint import FAST, recipe_file

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"content": d}) + "\n" for d in DOCS * 4))
    recipe = recipe_file(tmp_path, {"name": "tf", "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 64,
                                                             "block_pattern": "GA"},
                                    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}}})
    out = tmp_path / "run"
    assert main(["train", recipe, "--data", str(f), "--out", str(out), *FAST, "--steps", "1",
                 "--text-field", "content"]) == 0, capsys.readouterr().err
    if data == "shards":
        (tmp_path / "t.jsonl").write_bytes(_jsonl(DOCS * 4))
        assert main(["prepare", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "s")]) == 0
        data = str(tmp_path / "s")
    capsys.readouterr()
    rc = main(["eval", str(out / "step-1"), "--data", data, "--batches", "1", "--seq-len", "16"])
    err = capsys.readouterr().err
    assert rc == 0 and "text-field" not in err, err


@pytest.mark.parametrize("case", ["other field", "text named", "edited"])
def test_a_resume_refused_for_its_data_names_the_field_only_where_it_changed(tmp_path, capsys, case):
    """Resuming on another field of the same files is other data, whose token count differs as a rule: the
    refusal names the field the checkpoint read (it named only --data, --seq-len and --val-frac unless the token
    count was the same); ``--text-field text`` is the unset field (None, read as text), so where the files
    themselves changed the fix is not that flag (it was: "resume with --text-field text", the flag given)."""
    from tests.test_checkpoint import FAST, recipe_file

    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps({"text": d + " and more", "content": d}) + "\n" for d in DOCS * 4))
    recipe = recipe_file(tmp_path, {"name": "tf", "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 64,
                                                             "block_pattern": "GA"},
                                    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}}})
    out = tmp_path / "run"
    args = ["train", recipe, "--data", str(f), "--out", str(out), *FAST, "--save-every", "1"]
    first = ["--text-field", "content"] if case == "other field" else []
    assert main([*args, "--steps", "1", *first]) == 0, capsys.readouterr().err
    capsys.readouterr()
    if case == "edited":  # as many tokens, other ones
        f.write_text(f.read_text().replace("quick", "QUICK"))
    rc = main([*args, "--steps", "2", "--resume", "--text-field", "text"])
    err = capsys.readouterr().err
    if case == "text named":  # the same field (and data): it resumes
        assert rc == 0 and (out / "step-2").is_dir(), err
        return
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    if case == "other field":
        assert "resume with --text-field content (the field it read)" in err, err
    else:
        assert "--text-field" not in err and "resume with the data it was trained on" in err, err


def test_train_reads_the_field_it_is_given_even_an_empty_name(tmp_path, capsys):
    """``hymba train --text-field ''`` names the field "" (as ``hymba prepare --text-field ''`` reads it): a file
    without one is refused as prepare refuses it; it read the field ``text`` silently (``field or "text"``) and
    recorded "" in its checkpoints."""
    f = tmp_path / "c.jsonl"
    f.write_bytes(_jsonl(DOCS * 4))
    rc = main(["prepare", str(f), "--out", str(tmp_path / "s"), "--text-field", ""])
    assert rc == 1 and f'{f}:1: no "" field' in capsys.readouterr().err
    rc = main(["train", "configs/gpt_tiny.yaml", "--data", str(f), "--out", str(tmp_path / "run"), "--steps", "1",
               "--no-progress", "--text-field", ""])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and f'{f}:1: no "" field' in err, err
    assert not (tmp_path / "run").exists()


def test_set_train_text_field_with_data_flag_trains(tmp_path, capsys):
    """``--set train.text_field=content --data c.jsonl``: the recipe's train section was checked as it loaded,
    before the flags applied, so its data was the default (mqar) and the field was refused as 'reads no text'
    (``--set train.tokenizer`` likewise). A recipe that does not name its data leaves it to ``--data`` (or the
    objective's default): the rule is checked on the effective data (``training.config.validate``), refused
    where that is a built-in task."""
    from hymba_plus.core.recipe import RecipeError, load_recipe

    f = tmp_path / "c.jsonl"
    f.write_bytes(_jsonl(DOCS * 8, field="content"))
    out = tmp_path / "run"
    args = ["train", "configs/gpt_tiny.yaml", "--out", str(out), "--steps", "1", "--batch-size", "2", "--seq-len",
            "16", "--no-progress", "--device", "cpu"]
    rc = main([*args, "--set", "train.text_field=content", "--data", str(f)])
    assert rc == 0, capsys.readouterr().err
    assert json.loads((out / "step-1" / "trainer_state.json").read_text())["train_config"]["text_field"] == "content"
    assert json.loads((out / "data" / "index.json").read_text())["text_field"] == "content"
    shutil.rmtree(out)
    capsys.readouterr()
    # the effective data a built-in task: still refused, one line, nothing written (the default: the recipe's key)
    for extra, code, needle in [([], 1, "configs/gpt_tiny.yaml: train.text_field: names the field of JSON Lines / "
                                        "Parquet text: the built-in task mqar reads no text"),
                                (["--data", "mqar"], 2, "--data mqar: configs/gpt_tiny.yaml: train.text_field: "),
                                (["--set", "train.data=mqar"], 1, "--set train.text_field=content: names the field")]:
        rc = main([*args, "--set", "train.text_field=content", *extra])
        err = capsys.readouterr().err
        assert rc == code and len(err.strip().splitlines()) == 1 and needle in err, err
        assert not out.exists()
    # a recipe's tokenizer without its data: the flag's (--data) decides; with a task named, refused as it loads
    assert load_recipe("configs/gpt_tiny.yaml", overrides=["train.tokenizer=t.json"]).train.tokenizer == "t.json"
    with pytest.raises(RecipeError, match="the built-in task mqar makes token ids of its own"):
        load_recipe("configs/gpt_tiny.yaml", overrides=["train.data=mqar", "train.tokenizer=t.json"])


def test_a_reasoning_recipe_naming_a_text_field_is_refused(tmp_path, capsys):
    """LaDiR reads reasoning data (rows of question, reasoning, answer), never a text field: ``--text-field`` is
    refused for it, and a recipe's ``train.text_field`` was too as it loaded (checked on the default data, mqar).
    Since that rule waits for the effective data, ``train.text_field`` of a LaDiR recipe without ``train.data``
    trained silently without reading it (a reasoning task is no built-in next-token task). Refused again, one
    line naming the key, nothing written."""
    y = tmp_path / "ladir.yaml"
    y.write_text(Path("configs/ladir_tiny.yaml").read_text().replace("train: {seq_len: 32, batch_size: 16}",
                                                                        "train: {seq_len: 32, batch_size: 16, "
                                                                        "text_field: content}"))
    assert "text_field: content" in y.read_text()
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "--steps", "1", "--no-progress", "--device", "cpu"]
    for argv, needle in [([str(y)], f"{y}: train.text_field: content: the objective ladir reads reasoning data"),
                         (["configs/ladir_tiny.yaml", "--set", "train.text_field=content"],
                          "--set train.text_field=content: the objective ladir reads reasoning data")]:
        rc = main([*args[:1], *argv, *args[1:]])
        err = capsys.readouterr().err
        assert rc == 1 and len(err.strip().splitlines()) == 1 and needle in err, err
        assert not out.exists()
