"""Data: built-in tasks, token shards (hymba prepare), memory-mapped text streams,
tokenizers, and bad data through the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from hymba_plus.cli import main
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.data import DataError, TextStream, TokenShards, open_stream, prepare
from hymba_plus.training.tasks import TASKS, TaskError, masked_accuracy
from hymba_plus.training.tokenizer import ByteTokenizer, IdsTokenizer, StreamDecoder, TokenizerError, from_json

TINY = {
    "name": "data-tiny",
    "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA"},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}
TEXT = "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ text\n" * 40




def recipe_file(tmp_path: Path) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return str(p)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("name", sorted(TASKS))
def test_tasks_are_deterministic_scored_and_in_vocab(name):
    task, cfg = TASKS[name], TrainConfig()
    ids, labels = task.batch(range(10, 14), seed=3, seq_len=64, vocab=40, cfg=cfg)
    assert ids.shape == labels.shape == (4, 64) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < 40
    scored = labels != -100
    assert bool(scored.any(1).all())
    assert torch.equal(labels[scored], ids[scored])  # labels are teacher-forced copies of the answers
    again = task.batch(range(12, 13), seed=3, seq_len=64, vocab=40, cfg=cfg)
    assert torch.equal(again[0][0], ids[2])  # a sample depends only on (seed, index)
    other = task.batch(range(10, 14), seed=4, seq_len=64, vocab=40, cfg=cfg)
    assert not torch.equal(other[0], ids)
    # a perfect predictor scores 1, and chance is what the task says
    perfect = torch.nn.functional.one_hot(torch.roll(ids, -1, 1), 40).float()
    assert masked_accuracy(perfect, labels) == 1.0
    assert 0 < task.chance(40, cfg) <= 0.5


def test_task_answers():
    cfg = TrainConfig(mqar_pairs=3)
    ids, labels = TASKS["mqar"].batch([0], 0, 16, 20, cfg)
    ids, labels = ids[0].tolist(), labels[0].tolist()
    pairs = dict(zip(ids[0:6:2], ids[1:6:2]))
    for k, v in zip(ids[6:12:2], ids[7:12:2]):
        assert pairs[k] == v
    assert [x for x in labels if x != -100] == ids[7:12:2]
    ids, labels = TASKS["parity"].batch([0], 0, 12, 8, cfg)
    bits = [b - 1 for b in ids[0, 0::2].tolist()]
    assert [p - 3 for p in ids[0, 1::2].tolist()] == list(np.cumsum(bits) % 2)
    ids, labels = TASKS["selective_copy"].batch([0], 0, 24, 10, TrainConfig(copy_tokens=3))
    row = ids[0].tolist()
    d = row.index(2)
    assert [x for x in row[:d] if x != 1] == row[d + 1 :]


def test_task_validation_errors():
    with pytest.raises(TaskError, match="seq_len"):
        TASKS["mqar"].validate(8, 64, TrainConfig(mqar_pairs=4))
    with pytest.raises(TaskError, match="vocab"):
        TASKS["parity"].validate(16, 4, TrainConfig())


# --------------------------------------------------------------------------- shards


def test_prepare_writes_uint16_shards_and_memmaps_them(tmp_path):
    src = tmp_path / "corpus"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT)
    (src / "sub" / "b.md").write_text(TEXT.upper())
    (src / ".hidden").write_text("skip me")
    (src / "blob.bin").write_bytes(b"\0\1\2binary")
    index = prepare(src, tmp_path / "shards", ByteTokenizer(), shard_tokens=1000)
    n = len((TEXT + TEXT.upper()).encode())
    assert index["tokens"] == n and index["dtype"] == "uint16" and len(index["shards"]) == -(-n // 1000)
    assert len(index["sources"]) == 2
    shards = TokenShards(tmp_path / "shards")
    assert isinstance(shards.shard(0), np.memmap)
    flat = np.concatenate([shards.shard(i) for i in range(len(shards.shards))])
    assert bytes(flat.astype(np.uint8)) == (TEXT + TEXT.upper()).encode()
    assert shards.tokenizer().kind == "bytes"


@pytest.mark.parametrize("tok", ["bytes", "ids"])
def test_a_byte_order_mark_is_not_a_documents_first_tokens(tmp_path, tok):
    """A text file saved by a Windows tool starts with a UTF-8 BOM: its bytes (or U+FEFF) were kept as the
    first tokens of the document."""
    tokenizer = ByteTokenizer() if tok == "bytes" else IdsTokenizer(256)
    body = "1 2 3\n" * 10 if tok == "ids" else TEXT
    (tmp_path / "plain").mkdir()
    (tmp_path / "bom").mkdir()
    (tmp_path / "plain" / "a.txt").write_text(body)
    (tmp_path / "bom" / "a.txt").write_bytes(b"\xef\xbb\xbf" + body.encode())
    prepare(tmp_path / "plain", tmp_path / "s1", tokenizer)
    prepare(tmp_path / "bom", tmp_path / "s2", tokenizer)
    assert np.array_equal(TokenShards(tmp_path / "s1").shard(0), TokenShards(tmp_path / "s2").shard(0))


def test_text_stream_split_epochs_and_positions(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "s", shard_tokens=700)
    stream = TextStream(TokenShards(tmp_path / "s"), seq_len=16, seed=0, val_frac=0.1)
    n_tr, n_val = stream.n_train, stream.n_val
    assert n_val >= 1 and n_tr > n_val
    # one epoch visits every training window exactly once; held-out windows never
    seen = [tuple(stream.train(range(c, c + 1)).input_ids[0].tolist()) for c in range(n_tr)]
    train_windows = {tuple(stream._window(j).tolist()) for j in range(n_tr)}
    val_windows = [tuple(stream._window(n_tr + j).tolist()) for j in range(n_val)]
    assert sorted(seen) == sorted(tuple(stream._window(j).tolist()) for j in range(n_tr))
    assert set(seen) == train_windows
    ev = stream.eval(range(n_val)).input_ids
    assert [tuple(r) for r in ev.tolist()] == val_windows
    b = stream.train(range(3, 7))
    assert torch.equal(b.input_ids, b.labels)
    # the same global index gives the same window (resume continues the stream)
    again = TextStream(TokenShards(tmp_path / "s"), seq_len=16, seed=0, val_frac=0.1)
    assert torch.equal(again.train(range(n_tr + 5, n_tr + 9)).input_ids, stream.train(range(n_tr + 5, n_tr + 9)).input_ids)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 16, 17, 100, 255, 256, 257, 1000, 4099])
def test_window_order_is_a_permutation_of_every_size(n):
    """``window_order`` is a bijection of [0, n) for any n (the Feistel network on 4^h >= n values,
    walked below n), the same for the same keys, another one for another epoch's keys."""
    from hymba_plus.training.data import window_order

    keys = np.random.default_rng(0).integers(0, 2**63, size=4, dtype=np.uint64)
    order = window_order(np.arange(n), n, keys)
    assert order.dtype == np.int64 and np.array_equal(np.sort(order), np.arange(n))
    assert np.array_equal(window_order(np.arange(n), n, keys), order)
    assert np.array_equal(window_order(np.arange(n)[::-1].copy(), n, keys), order[::-1])  # position by position
    if n >= 16:
        other = np.random.default_rng(1).integers(0, 2**63, size=4, dtype=np.uint64)
        assert not np.array_equal(window_order(np.arange(n), n, other), order)


def test_text_order_is_shuffled_not_an_arithmetic_progression(tmp_path):
    """The epoch order was ``(a k + b) mod n``: every batch an arithmetic progression of windows, the step
    between consecutive samples the same all epoch (and with a = 1 the corpus in order). The Feistel order
    has no such structure: consecutive steps take many values, and windows next to each other in the corpus
    land far apart in the epoch on average."""
    from hymba_plus.training.data import window_order

    n = 5000
    keys = np.random.default_rng([0, 3, 0]).integers(0, 2**63, size=4, dtype=np.uint64)
    order = window_order(np.arange(n), n, keys)
    steps = np.diff(order) % n
    assert len(np.unique(steps)) > n // 2  # an affine order has exactly one
    where = np.empty(n, dtype=np.int64)
    where[order] = np.arange(n)
    gap = np.abs(np.diff(where)).mean()  # corpus neighbours' distance in the epoch: n / 3 for a random order
    assert n / 4 < gap < n / 2.4
    # on a real stream: two epochs in two different orders, each a permutation of the training windows
    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "s", shard_tokens=700)
    stream = TextStream(TokenShards(tmp_path / "s"), seq_len=8, seed=0, val_frac=0.1)
    n_tr = stream.n_train
    first, second = (stream.train(range(e * n_tr, (e + 1) * n_tr)).input_ids for e in (0, 1))
    assert not torch.equal(first, second)
    assert sorted(map(tuple, first.tolist())) == sorted(map(tuple, second.tolist()))


def test_a_checkpoint_of_the_affine_order_resumes_on_it(tmp_path, capsys):
    """A run from before the Feistel order (its data state has no ``order``) resumes in the order it was
    trained in: the resumed run's windows are the ones the old uninterrupted run would have seen (said in one
    line); a new run's checkpoint names its order."""
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text to cut into windows\n" for i in range(400)))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")
    common = ["--data", str(text), "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--no-progress",
              "--device", "cpu", "--eval-every", "100"]
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--stop-after", "2", *common]) == 0
    state_file = out / "step-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["order"] == "feistel"
    del state["data"]["order"]  # as an earlier version wrote it
    state_file.write_text(json.dumps(state))
    capsys.readouterr()
    seen = []
    real = TextStream.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextStream, "train", lambda self, idx: seen.append((self.order, idx)) or real(self, idx))
        assert main(["train", recipe, "--out", str(out), "--resume", *common]) == 0
    err = capsys.readouterr().err
    assert "visits the windows in the affine order of an earlier version: kept" in err
    assert seen and {o for o, _ in seen} == {"affine"}
    assert json.loads((out / "step-4" / "trainer_state.json").read_text())["data"]["order"] == "affine"


def test_open_stream_caches_text_and_checks_vocab(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    cfg = TrainConfig()
    s1 = open_stream(str(tmp_path / "t.txt"), 32, 256, 0, cfg, tmp_path / "cache")
    mtime = (tmp_path / "cache" / "index.json").stat().st_mtime_ns
    s2 = open_stream(str(tmp_path / "t.txt"), 32, 256, 0, cfg, tmp_path / "cache")
    assert (tmp_path / "cache" / "index.json").stat().st_mtime_ns == mtime  # reused
    assert s1.n_train == s2.n_train
    with pytest.raises(DataError, match="vocab_size is 100"):
        open_stream(str(tmp_path / "t.txt"), 32, 100, 0, cfg, tmp_path / "cache")
    assert open_stream("parity", 32, 100, 0, cfg, None).metric == "accuracy"


def test_truncated_shard_and_bad_index_are_errors(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "s")
    f = tmp_path / "s" / "shard-00000.bin"
    f.write_bytes(f.read_bytes()[:-3])
    with pytest.raises(DataError, match="shard-00000.bin: truncated"):
        TokenShards(tmp_path / "s")
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json: corrupt"):
        TokenShards(tmp_path / "s")


@pytest.mark.parametrize("edit,says", [
    ({"dtype": "O"}, "dtype 'object': expected uint16 or uint32"),  # would read the bytes as pointers
    ({"dtype": "float32"}, "dtype 'float32': expected uint16 or uint32"),
    ({"file": "../elsewhere.bin"}, "shard file '../elsewhere.bin': expected a file name inside"),
    ({"file": "/etc/hostname"}, "shard file '/etc/hostname': expected a file name inside"),
])
def test_an_index_that_names_another_dtype_or_file_is_refused(tmp_path, edit, says):
    """An index.json is data: only the dtypes prepare writes, only files inside its folder."""
    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "s")
    ip = tmp_path / "s" / "index.json"
    index = json.loads(ip.read_text())
    if "dtype" in edit:
        index["dtype"] = edit["dtype"]
    else:
        index["shards"][0]["file"] = edit["file"]
    ip.write_text(json.dumps(index))
    with pytest.raises(DataError, match=re.escape(f"{ip}: {says}")):
        TokenShards(tmp_path / "s")


def test_tokenizers_json_is_optional_and_works_when_installed(tmp_path):
    with pytest.raises(TokenizerError):
        from_json('{"hymba_tokenizer": "nope"}')
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "</s>"]))
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "t.txt").write_text(TEXT)
    rc = main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok.json")])
    assert rc == 0
    shards = TokenShards(tmp_path / "s")
    t = shards.tokenizer()
    assert t.kind == "tokenizers" and shards.vocab_size <= 120 and t.eos_id == 1
    assert shards.tokens < len(TEXT) / 2  # merges happened


def test_text_that_is_not_utf8_is_refused_with_a_tokenizers_tokenizer(tmp_path, capsys):
    """A ``tokenizers`` tokenizer reads text: bytes that are not UTF-8 (a Latin-1 file, a cut-off
    character) were decoded as U+FFFD and trained on without a word. Now one line naming the file, the
    byte offset (from the file's start, a byte-order mark included) and the line; in a later piece of
    a long file too. The byte tokenizer keeps the bytes as they are (no text is decoded): accepted."""
    pytest.importorskip("tokenizers")
    from tokenizers import pre_tokenizers

    from hymba_plus.training.data import _chunks
    from hymba_plus.training.tokenizer import load_file

    _bpe(pre_tokenizers.Whitespace(), TEXT, vocab=120).save(str(tmp_path / "tok.json"))
    bad = b"\xef\xbb\xbf" + b"caf\xc3\xa9 ok\nsecond line\nna\xefve caf\xe9\n"  # Latin-1 on line 3
    (tmp_path / "t.txt").write_bytes(bad)
    rc = main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"), "--tokenizer",
               str(tmp_path / "tok.json")])
    one_line_error(capsys, rc, 1, f"{tmp_path / 't.txt'}: not UTF-8 text at byte offset 26 (line 3): b'\\xef'")
    assert not (tmp_path / "s").exists()
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "b")]) == 0  # bytes: as they are
    capsys.readouterr()
    # a later piece of a long file: the offset and line count from the file's start
    body = "word " * 99 + "end\n"
    data = body.encode() * 20 + b"x \x80 y\n"
    (tmp_path / "long.txt").write_bytes(data)
    tok = load_file(tmp_path / "tok.json")
    with pytest.raises(TokenizerError, match=re.escape(f"not UTF-8 text at byte offset {len(body) * 20 + 2} (line 21): b'\\x80'")):
        for _ in _chunks(tmp_path / "long.txt", tok, chunk_bytes=64 * 16):
            pass


def test_byte_and_ids_tokenizers_and_stream_decoding():
    b = ByteTokenizer()
    assert b.decode(b.encode("héllo ✓")) == "héllo ✓"
    assert from_json(b.to_json()).kind == "bytes"
    ids = IdsTokenizer(50)
    assert ids.encode("3 17, 42") == [3, 17, 42] and ids.decode([1, 2]) == " 1 2"
    with pytest.raises(TokenizerError, match="outside"):
        ids.encode("3 99")
    dec = StreamDecoder(b)
    pieces = [dec.push(i) for i in "a✓b".encode()]
    assert pieces == ["a", "", "", "✓", "b"]  # a split multi-byte character waits until complete


# --------------------------------------------------------------------------- CLI


def one_line_error(capsys, rc: int, code: int, needle: str) -> str:
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err
    return err


def test_cli_prepare_and_train_on_text(tmp_path, capsys):
    (tmp_path / "t.txt").write_text(TEXT * 3)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s")]) == 0
    assert "tokens in 1 shard" in capsys.readouterr().out
    rc = main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s")])
    one_line_error(capsys, rc, 1, "already exists")
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), "--data", str(tmp_path / "s"), "--out", str(out), "--steps", "3",
               "--batch-size", "2", "--seq-len", "32", "--eval-every", "3", "--no-progress"])
    assert rc == 0
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["eval_ppl"] > 1 and "eval_accuracy" not in last
    assert json.loads((out / "step-3" / "tokenizer.json").read_text())["hymba_tokenizer"] == "bytes"
    state = json.loads((out / "step-3" / "trainer_state.json").read_text())
    assert state["data"]["kind"] == "text" and state["samples"] == 6


def test_cli_bad_data(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    common = ["--steps", "1", "--batch-size", "2", "--seq-len", "32", "--no-progress"]
    rc = main(["train", recipe, "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o1"), *common])
    one_line_error(capsys, rc, 1, "missing.txt: no such file")
    (tmp_path / "empty.txt").write_text("")
    rc = main(["train", recipe, "--data", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o2"), *common])
    one_line_error(capsys, rc, 1, "empty.txt: empty")
    (tmp_path / "short.txt").write_text("too short")
    rc = main(["train", recipe, "--data", str(tmp_path / "short.txt"), "--out", str(tmp_path / "o3"), *common])
    one_line_error(capsys, rc, 1, "too few")
    (tmp_path / "emptydir").mkdir()
    rc = main(["prepare", str(tmp_path / "emptydir"), "--out", str(tmp_path / "s")])
    one_line_error(capsys, rc, 1, "emptydir: no text files")
    rc = main(["prepare", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "s2")])
    one_line_error(capsys, rc, 1, "empty.txt: empty")
    assert not (tmp_path / "s2").exists()
    rc = main(["train", recipe, "--data", str(tmp_path / "short.txt"), "--tokenizer", str(tmp_path / "no.json"),
               "--out", str(tmp_path / "o4"), *common])
    one_line_error(capsys, rc, 1, "no.json: no such file")


def test_documents_are_separated_and_encoded_without_mid_document_specials(tmp_path):
    """Each file is a document: bytes get a line break where a file does not end with one; a
    ``tokenizers`` tokenizer's pieces are encoded without its special tokens (a BOS template put one
    at every ~256 KiB piece, mid-document) and each document ends with its end token."""
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text("first document ends here")
    (src / "b.txt").write_text("second one\n")
    index = prepare(src, tmp_path / "bytes", ByteTokenizer())
    flat = np.concatenate([TokenShards(tmp_path / "bytes").shard(i) for i in range(len(index["shards"]))])
    assert bytes(flat.astype(np.uint8)) == b"first document ends here\nsecond one\n"
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "</s>", "<s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tok.save(str(tmp_path / "tok.json"))
    t = from_json((tmp_path / "tok.json").read_text())
    assert t.encode("a b")[0] == 2 and 2 not in t.encode("a b", add_special_tokens=False)  # the template
    big = src / "big.txt"
    big.write_text((TEXT * 40 + "\n") * 20)  # several pieces of _chunks
    (src / "a.txt").unlink()
    (src / "b.txt").unlink()
    prepare(src, tmp_path / "bpe", t)
    shards = TokenShards(tmp_path / "bpe")
    ids = np.concatenate([shards.shard(i) for i in range(len(shards.shards))]).tolist()
    assert 2 not in ids and ids[-1] == 1 and ids.count(1) == 1  # no BOS anywhere, one </s> at the end
    assert ids[:-1] == t.encode(big.read_text(), add_special_tokens=False)


@pytest.mark.parametrize("style", ["metaspace_first", "metaspace_always", "byte_level_prefix", "prepend_normalizer"])
def test_a_documents_later_pieces_get_no_prefix_space(tmp_path, style):
    """A tokenizer that puts a space before a text's first word (SentencePiece's Metaspace, GPT-2's
    ByteLevel with add_prefix_space, Llama 2's Prepend normalizer) put one at every ~256 KiB piece
    of a document: the later pieces are now encoded as continuations, and the shards equal the whole
    document's encoding (an added token's text inside a piece included)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", byte_fallback=style == "prepend_normalizer"))
    if style.startswith("metaspace"):
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=style.split("_")[1])
        tok.decoder = decoders.Metaspace(prepend_scheme=style.split("_")[1])
    elif style == "byte_level_prefix":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
    else:  # Llama 2's form, trained on words as SentencePiece is (no merge across a space)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=150, special_tokens=["[UNK]", "</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
                                                        if style == "byte_level_prefix" else []))
    if style == "prepend_normalizer":
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t = from_json(tok.to_str())
    line = "The quick brown fox jumps over the lazy dog.\n"
    assert t.encode(line, add_special_tokens=False) != t.encode(line, add_special_tokens=False, continues=True)
    src = tmp_path / "c"
    src.mkdir()
    doc = src / "big.txt"
    doc.write_text(TEXT * 150 + "a literal </s> end token" + TEXT * 150)  # 744 KiB: three pieces
    prepare(src, tmp_path / "s", t)
    shards = TokenShards(tmp_path / "s")
    ids = np.concatenate([shards.shard(i) for i in range(len(shards.shards))]).tolist()
    assert ids[-1] == 1 and ids[:-1] == t.encode(doc.read_text(), add_special_tokens=False)


def test_output_folders_inside_the_text_folder_are_not_read(tmp_path, capsys):
    """``--out`` inside the corpus (prepare twice; a training run's folder, whose cache and
    checkpoints were tokenized into the data on resume, which then refused as another split)."""
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text(TEXT * 20)
    first = prepare(src, src / "shards", ByteTokenizer())
    again = prepare(src, src / "shards", ByteTokenizer(), force=True)
    assert first["tokens"] == again["tokens"] == len((TEXT * 20).encode())
    rec = recipe_file(tmp_path)
    common = ["--data", str(src), "--out", str(src / "run"), "--seq-len", "16", "--batch-size", "2", "--steps", "4",
              "--no-progress"]
    assert main(["train", rec, *common, "--stop-after", "2"]) == 0
    assert main(["train", rec, *common, "--resume"]) == 0, capsys.readouterr().err
    index = json.loads((src / "run" / "data" / "index.json").read_text())
    assert [Path(s["path"]).name for s in index["sources"]] == ["a.txt"]


def test_a_data_folder_of_the_users_in_out_is_not_replaced_by_the_cache(tmp_path, capsys):
    """Text is tokenized into OUT/data, replaced when stale: `--out .` in a project with a data/ folder deleted
    that folder (and a file named data)."""
    (tmp_path / "t.txt").write_text(TEXT)
    for mine in ("folder", "file"):
        out = tmp_path / mine
        out.mkdir()
        if mine == "folder":
            (out / "data").mkdir()
            (out / "data" / "notes.md").write_text("mine")
        else:
            (out / "data").write_text("mine")
        rc = main(["train", recipe_file(tmp_path), "--data", str(tmp_path / "t.txt"), "--out", str(out), "--steps", "1",
                   "--seq-len", "16", "--batch-size", "2", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 1 and len(err) == 1 and "is not token shards of an earlier run" in err[0], err
        assert (out / "data" / "notes.md" if mine == "folder" else out / "data").read_text() == "mine"


def test_a_refused_resume_keeps_the_runs_token_cache(tmp_path, capsys):
    """Resumed with another --tokenizer or a changed text, the run re-made OUT/data first and only then refused
    the resume: the cache the checkpoints were trained on was lost."""
    text = tmp_path / "t.txt"
    text.write_text(" ".join(str(i % 200) for i in range(600)) + "\n")
    (tmp_path / "ids.json").write_text(json.dumps({"hymba_tokenizer": "ids", "vocab_size": 256}))
    out = tmp_path / "run"
    common = ["--data", str(text), "--out", str(out), "--steps", "4", "--seq-len", "16", "--batch-size", "2",
              "--no-progress"]
    assert main(["train", recipe_file(tmp_path), *common, "--stop-after", "2"]) == 0
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in (out / "data").iterdir()}
    for change, says in (("tokenizer", "another tokenizer"), ("text", "another split")):
        extra = ["--tokenizer", str(tmp_path / "ids.json")] if change == "tokenizer" else []
        if change == "text":
            text.write_text(text.read_text() + "more text\n")
        rc = main(["train", recipe_file(tmp_path), *common, *extra, "--resume"])
        err = capsys.readouterr().err.strip().splitlines()
        assert {p.name: p.read_bytes() for p in (out / "data").iterdir()} == before, change
        assert rc == 1 and len(err) == 1 and says in err[0], err  # (another tokenizer: was 'another split')
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [], change


def test_too_short_text_names_the_source_not_the_cache(tmp_path, capsys):
    (tmp_path / "one.txt").write_text("hello\n")
    rc = main(["train", recipe_file(tmp_path), "--data", str(tmp_path / "one.txt"), "--out", str(tmp_path / "r"),
               "--seq-len", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and f"{tmp_path / 'one.txt'}: 6 tokens are too few for --seq-len 16" in err, err


def test_shards_shorter_than_a_window_say_so(tmp_path, capsys):
    """Windows do not cross shards: shards of 50 tokens hold no 64-token window. The error said
    '2480 tokens are too few for --seq-len 64 (need at least 128 ...)'."""
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s"), "--shard-tokens", "50"]) == 0
    capsys.readouterr()
    rc = main(["train", recipe_file(tmp_path), "--data", str(tmp_path / "s"), "--out", str(tmp_path / "r"),
               "--seq-len", "64", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "shards of at most 50 tokens hold 0 window(s) of --seq-len 64" in err, err
    assert "--shard-tokens" in err and "too few" not in err


def test_resuming_a_task_run_with_other_task_settings_says_so(tmp_path, capsys):
    rec = recipe_file(tmp_path)
    out = str(tmp_path / "r")
    assert main(["train", rec, "--data", "mqar", "--seq-len", "32", "--steps", "4", "--stop-after", "2",
                 "--batch-size", "2", "--out", out, "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["train", rec, "--data", "mqar", "--seq-len", "32", "--steps", "4", "--batch-size", "2",
                 "--mqar-pairs", "3", "--out", out, "--resume", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "--data mqar: task settings changed since" in err and "mqar_pairs None -> 3" in err, err


def test_pieces_of_a_line_without_spaces_are_cut_between_characters():
    """A line longer than a piece with neither a space nor a line break (minified JSON) is cut before
    its last character, never inside a multi-byte one (a cut there decoded as replacement characters),
    nor before a combining mark, a variation selector or after a zero-width joiner (an NFC tokenizer
    joins an accent with its letter)."""
    import io

    from hymba_plus.training.data import _pieces

    class Chars:  # a stand-in tokenizer: one id per character
        kind, eos_id = "tokenizers", None

        def encode(self, text, add_special_tokens=False, continues=False):  # noqa: ANN001, ANN201
            return [ord(c) for c in text]

    pieces = []

    class Recording(Chars):
        def encode(self, text, add_special_tokens=False, continues=False):  # noqa: ANN001, ANN201
            pieces.append(text)
            return super().encode(text)

    for text in ("é" * 300 + "✓" * 200 + "x", "ab\n" + "€" * 500, "word " * 100 + "ü" * 400,
                 "e\u0301" * 400 + "\U0001F468\u200d\U0001F469" * 100 + "x", "a\ufe0f" * 700):
        pieces.clear()
        got = np.concatenate(list(_pieces(io.BytesIO(text.encode()), Recording(), 64 * 16)))
        assert got.tolist() == [ord(c) for c in text]
        # nor between a character and its combining accent / variation selector, nor at a joiner
        assert len(pieces) > 1 and not any(p[0] in "\u0301\ufe0f\u200d" or p[-1] == "\u200d" for p in pieces)


def test_pieces_are_cut_before_a_lone_space_or_line_break_only():
    """``_cut``: before the last space standing alone between two non-whitespace characters (never
    inside a run, never at the data's end, not next to NBSP / U+3000), else such a line break."""
    from hymba_plus.training.data import _cut

    def cut(d: bytes) -> int:
        return _cut(d, 0x20) or _cut(d, 0x0A)

    for data, want in [(b"Hello world", 5), (b"Hello  world", 0), (b"a   ", 0), (b"one two  ", 3), (b" a", 0),
                       (b"x\n    def", 0), (b"a \xc2\xa0b", 0), ("a \u3000 b c".encode(), 7), (b"ab", 0),
                       ("\u3002\n\u4e47".encode(), 3), ("\u3002\n\n\u4e47".encode(), 0), (b"a b\nc", 1)]:
        assert cut(data) == want, (data, cut(data))


def _bpe(pre, corpus: str, **kw):  # noqa: ANN001, ANN202 - a small BPE `tokenizers` tokenizer trained on corpus
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre, pre_tokenizers.ByteLevel) else []
    tok.train_from_iterator([corpus], trainers.BpeTrainer(vocab_size=kw.get("vocab", 400), initial_alphabet=alphabet,
                                                          special_tokens=["<unk>", "</s>"]))
    return tok


@pytest.mark.parametrize("style", ["gpt2", "neox_space_tokens", "llama_metaspace", "bert"])
def test_whitespace_runs_stay_whole_and_pieces_equal_the_whole_document(style):
    """Indented code, double spaces, spaces before a line break, CRLF, blank lines between paragraphs of
    text without spaces: cut into many pieces, the document encodes as a whole does. (The cut was
    before the last space, inside runs: GPT-2's spaces before a line break, SentencePiece's ``▁▁``,
    GPT-NeoX's space tokens came out as single spaces; after a line break, which is not a boundary
    for ByteLevel; and a WordPiece continuation not starting at a space came out as ``##`` pieces.)"""
    pytest.importorskip("tokenizers")
    import io

    from tokenizers import models, normalizers, pre_tokenizers

    from hymba_plus.training.data import _pieces

    corpus = ("def f(x):\n    if x:  # two  spaces\n        return x  \n\treturn 0\r\n"
              "The quick brown fox.  Then   three.\n\n\u4e2d\u6587\u6ca1\u6709\u7a7a\u683c\u3002\n\n"
              "\u65e5\u672c\u8a9e\u3002\n") * 40
    if style == "gpt2":
        tok = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), corpus)
    elif style == "neox_space_tokens":
        tok = _bpe(pre_tokenizers.ByteLevel(add_prefix_space=False), corpus)
        tok.add_tokens([" " * n for n in range(2, 9)])
    elif style == "llama_metaspace":  # words and line breaks apart, as SentencePiece vocabularies have them
        tok = _bpe(pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"),
                                            pre_tokenizers.Metaspace(prepend_scheme="first")]), corpus)
    else:
        from tokenizers import Tokenizer, trainers

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer()
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator([corpus], trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]", "[SEP]"]))
    t = from_json(tok.to_str())
    if style == "bert":  # a continuation that does not start at a space is a word, not a word's ## rest
        assert t.encode("def", add_special_tokens=False, continues=True) == t.encode("def", add_special_tokens=False)
    want = t.encode(corpus, add_special_tokens=False)
    for chunk in (7 * 16, 13 * 16, 64 * 16):  # pieces of ~7-64 bytes: hundreds of cuts
        got = np.concatenate(list(_pieces(io.BytesIO(corpus.encode()), t, chunk))).tolist()
        assert got == want, (style, chunk)


def test_a_small_file_is_one_piece(tmp_path):
    """A file read in one block is encoded whole (it was cut once before its last space anyway)."""
    import io

    from hymba_plus.training.data import _pieces

    calls = []

    class Rec:
        kind, eos_id = "tokenizers", None

        def encode(self, text, add_special_tokens=False, continues=False):  # noqa: ANN001, ANN201
            calls.append(text)
            return [ord(c) for c in text]

    text = "The end.  \nHello world " * 3
    assert np.concatenate(list(_pieces(io.BytesIO(text.encode()), Rec(), 1 << 22))).tolist() == [ord(c) for c in text]
    assert calls == [text]


def test_a_tokenizer_that_cannot_encode_is_one_line_naming_the_file(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "</s>": 1}, unk_token="[UNK]"))  # its unk token is not in it
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok.json").write_text(tok.to_str())
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text("hello world\n")
    rc = main(["prepare", str(src), "--out", str(tmp_path / "s"), "--tokenizer", str(tmp_path / "tok.json")])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{src / 'a.txt'}: cannot encode the text (WordLevel error: Missing [UNK]" in err, err
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("size", [0, 5])
def test_out_that_is_a_file_says_so(tmp_path, size):
    """An empty file as --out was 'already exists and is not empty'."""
    (tmp_path / "a.txt").write_text(TEXT)
    out = tmp_path / "out"
    out.write_text("x" * size)
    with pytest.raises(DataError) as e:
        prepare(tmp_path / "a.txt", out, ByteTokenizer())
    assert str(e.value) == f"{out}: exists and is a file, not a folder (use --force to replace it)"
    assert out.read_text() == "x" * size


def test_force_over_a_file_leaves_nothing_behind(tmp_path):
    src = tmp_path / "c"
    src.mkdir()
    (src / "a.txt").write_text(TEXT * 4)
    out = tmp_path / "out"
    out.write_text("not a folder")
    prepare(src, out, ByteTokenizer(), force=True)
    assert out.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["c", "out"]


def test_a_reasoning_task_on_a_next_token_recipe_says_which_objective_reads_it(tmp_path, capsys):
    rc = main(["train", recipe_file(tmp_path), "--data", "chain_arith", "--seq-len", "16", "--out", str(tmp_path / "r"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1, err
    assert "chain_arith: a reasoning task, for recipes with objective: {kind: ladir}" in err and "mqar" in err


def _word_tokenizer(folder: Path, words: list[str], special: list[str]) -> Path:
    """A `tokenizers` word-level tokenizer (id 0 `<unk>`, then ``words``, then the ``special`` tokens, split on
    whitespace) saved as ``folder/tokenizer.json`` (``folder`` made here); its path."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", *words, *special])}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(special)
    folder.mkdir()
    t.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def test_documents_end_with_the_end_token_the_tokenizer_config_names(tmp_path, capsys):
    """The end token was found by five names only: a DeepSeek ('<｜end▁of▁sentence｜>') or ChatML vocabulary,
    or one whose tokenizer_config.json names another eos_token, joined documents without a separator.
    Now: the eos_token of the tokenizer_config.json beside tokenizer.json, else a longer list of names,
    else a note at prepare."""
    from hymba_plus.training.tokenizer import load_file

    def save(folder: Path, end: str) -> Path:
        return _word_tokenizer(folder, ["a", "b", "c", "d"], [end])

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "1.txt").write_text("a b")
    (docs / "2.txt").write_text("c d")
    for i, end in enumerate(["<\uff5cend\u2581of\u2581sentence\uff5c>", "<|im_end|>", "<my_end>"]):
        tok_file = save(tmp_path / f"tok{i}", end)
        if end == "<my_end>":
            assert load_file(tok_file).eos_id is None
            assert main(["prepare", str(docs), "--out", str(tmp_path / "none"), "--tokenizer", str(tok_file)]) == 0
            assert "names no end token" in capsys.readouterr().err
            (tok_file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": end}}))
        assert load_file(tok_file).eos_id == 5
        prepare(docs, tmp_path / f"shards{i}", load_file(tok_file))
        assert TokenShards(tmp_path / f"shards{i}").shard(0).tolist() == [1, 2, 5, 3, 4, 5]


def test_shards_keep_the_tokenizers_side_files_and_checkpoints_carry_them(tmp_path):
    """`hymba prepare --tokenizer DIR/tokenizer.json` keeps the side files beside it (special tokens, chat
    template) in the shard index; a fresh run on the shards writes them into its checkpoints (they were
    lost there), and the end token their tokenizer_config.json names holds for the shards' tokenizer too."""
    from hymba_plus.training.tokenizer import for_checkpoint

    _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(1, 40)], ["<my_end>"])
    sides = {"tokenizer_config.json": json.dumps({"eos_token": "<my_end>"}), "chat_template.jinja": "{{ x }}"}
    for name, text in sides.items():
        (tmp_path / "tok" / name).write_text(text)
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(8):
        (docs / f"{d}.txt").write_text(" ".join(f"w{1 + (d * 7 + i) % 39}" for i in range(300)))
    assert main(["prepare", str(docs), "--out", str(tmp_path / "shards"), "--tokenizer",
                 str(tmp_path / "tok" / "tokenizer.json")]) == 0
    shards = TokenShards(tmp_path / "shards")
    assert shards.tokenizer_files == sides and shards.tokenizer().eos_id == 40
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"vocab_size": 48, "d_model": 16, "max_seq_len": 32,
                                                             "block_pattern": "GA"},
                                      "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 32}}}))
    assert main(["train", str(recipe), "--data", str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--steps",
                 "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]) == 0
    ckpt = tmp_path / "run" / "step-1"
    assert {n: (ckpt / n).read_text() for n in sides} == sides and for_checkpoint(ckpt, 48).eos_id == 40


def test_training_a_checkpoint_on_text_of_another_tokenizer_is_refused(tmp_path, capsys):
    """`hymba train CKPT --data corpus/` without --tokenizer read the text as bytes (the flag's default) for a
    model trained with a `tokenizers` vocabulary: it trained on the wrong ids and saved a bytes tokenizer."""
    _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(1, 299)], ["</s>"])
    docs = tmp_path / "docs"
    docs.mkdir()
    for d in range(4):
        (docs / f"{d}.txt").write_text(" ".join(f"w{1 + (d * 7 + i) % 298}" for i in range(200)))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "model": {"vocab_size": 304, "d_model": 16, "max_seq_len": 32,
                                                             "block_pattern": "GA"},
                                      "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 32}}}))
    common = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--no-progress"]
    tok = str(tmp_path / "tok" / "tokenizer.json")
    assert main(["train", str(recipe), "--data", str(docs), "--tokenizer", tok, "--out", str(tmp_path / "a"),
                 *common]) == 0
    capsys.readouterr()
    ckpt = str(tmp_path / "a" / "step-1")
    assert main(["train", ckpt, "--data", str(docs), "--out", str(tmp_path / "b"), *common]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another tokenizer (bytes)" in err[0] and "--tokenizer" in err[0]
    assert not (tmp_path / "b").exists()
    assert main(["train", ckpt, "--data", str(docs), "--tokenizer", tok, "--out", str(tmp_path / "b"), *common]) == 0


def test_the_text_cache_is_remade_when_the_tokenizers_side_files_change(tmp_path):
    """The cache was reused while tokenizer.json was unchanged: a tokenizer_config.json naming another end token
    beside it kept the old separators, and the old side files went on into the checkpoints."""
    _word_tokenizer(tmp_path / "tok", ["a", "b"], ["</s>", "<end>"])
    (tmp_path / "t.txt").write_text("a b " * 40)
    tok = str(tmp_path / "tok" / "tokenizer.json")
    first = open_stream(str(tmp_path / "t.txt"), 8, 16, 0, TrainConfig(), tmp_path / "run" / "data", tok)
    assert first.shards.shard(0)[-1] == 3 and first.tokenizer.eos_id == 3
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<end>"}))
    again = open_stream(str(tmp_path / "t.txt"), 8, 16, 0, TrainConfig(), tmp_path / "run" / "data", tok)
    assert again.shards.shard(0)[-1] == 4 and again.tokenizer.eos_id == 4
    assert "tokenizer_config.json" in again.tokenizer.files


def test_shards_content_digest_from_checksums_or_from_the_files(tmp_path):
    """prepare records each shard's sha256; an index without them (older shards) gives the same digest, read from
    the files; other tokens of as many give another."""
    (tmp_path / "t.txt").write_text(TEXT)
    prepare(tmp_path / "t.txt", tmp_path / "s", shard_tokens=500)
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert len(index["shards"]) > 1 and all(len(s["sha256"]) == 64 for s in index["shards"])
    digest = TokenShards(tmp_path / "s").content
    for s in index["shards"]:
        del s["sha256"]
    (tmp_path / "s" / "index.json").write_text(json.dumps(index))
    assert TokenShards(tmp_path / "s").content == digest
    (tmp_path / "t.txt").write_text(TEXT.swapcase())
    prepare(tmp_path / "t.txt", tmp_path / "s", force=True)
    assert TokenShards(tmp_path / "s").tokens == len(TEXT.encode()) and TokenShards(tmp_path / "s").content != digest


def test_a_text_folder_with_an_index_json_of_its_own_is_text(tmp_path):
    """A folder of text whose index.json is not ours (no hymba-shards format key) was refused as 'not a hymba
    shard index'; it is data (a .json file is read as JSON Lines: its objects' "text" are documents). A folder of
    our shards with a broken index.json is still refused."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    (corpus / "index.json").write_text(json.dumps({"pages": ["a.txt"], "text": "an index page"}))
    cfg = TrainConfig()
    s = open_stream(str(corpus), 32, 256, 0, cfg, tmp_path / "run" / "data")
    assert isinstance(s, TextStream) and s.shards.source == str(corpus)
    prepare(tmp_path / "corpus" / "a.txt", tmp_path / "s")
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(DataError, match="index.json: corrupt"):
        open_stream(str(tmp_path / "s"), 32, 256, 0, cfg, tmp_path / "run2" / "data")


def test_a_document_of_no_tokens_gets_no_end_mark(tmp_path, capsys):
    """An empty file (or one of a byte-order mark alone, or of whitespace a word-level tokenizer drops) is no
    document: it got an end token of its own (a stray end token per empty file in a folder; a corpus of empty
    files was prepared into shards of end tokens alone, where bytes said 'empty')."""
    tok = _word_tokenizer(tmp_path / "tok", ["a", "b"], ["</s>"])
    src = tmp_path / "c"
    src.mkdir()
    (src / "1.txt").write_text("a b")
    (src / "2.txt").write_text("")
    (src / "3.txt").write_bytes(b"\xef\xbb\xbf")
    (src / "4.txt").write_text(" \n\t\n")
    from hymba_plus.training.tokenizer import load_file

    t = load_file(tok)
    index = prepare(src, tmp_path / "s", t)
    assert TokenShards(tmp_path / "s").shard(0).tolist() == [1, 2, 3] and index["tokens"] == 3  # a b </s>
    for name in ("2.txt", "3.txt", "4.txt"):
        rc = main(["prepare", str(src / name), "--out", str(tmp_path / f"o{name}"), "--tokenizer", str(tok)])
        one_line_error(capsys, rc, 1, f"{name}: empty (no tokens)")
        assert not (tmp_path / f"o{name}").exists()
    rc = main(["prepare", str(src / "3.txt"), "--out", str(tmp_path / "ob")])  # bytes: a BOM alone is no text
    one_line_error(capsys, rc, 1, "3.txt: empty (no tokens)")


def test_a_tokenizer_larger_than_the_model_is_named_not_the_cache(tmp_path, capsys):
    """Text tokenized for training with a vocabulary larger than the model's: the error named OUT/data, the
    token cache, which the refusal leaves unmade (a folder that does not exist); now the text and --tokenizer."""
    tok = _word_tokenizer(tmp_path / "tok", [f"w{i}" for i in range(300)], ["</s>"])
    (tmp_path / "t.txt").write_text("w1 w2 w3 " * 100)
    rc = main(["train", recipe_file(tmp_path), "--data", str(tmp_path / "t.txt"), "--tokenizer", str(tok),
               "--out", str(tmp_path / "r"), "--seq-len", "16", "--steps", "1", "--no-progress"])
    err = one_line_error(capsys, rc, 1, f"{tmp_path / 't.txt'}: --tokenizer {tok} has 302 tokens but the model's "
                                        "vocab_size is 256")
    assert str(tmp_path / "r") not in err and not (tmp_path / "r" / "data").exists()


@pytest.mark.parametrize("extra, says", [({}, "no vocab_size"), ({"vocab_size": 0}, "0"), ({"vocab_size": -3}, "-3"),
                                         ({"vocab_size": True}, "True"), ({"vocab_size": "64"}, "'64'")])
def test_an_ids_tokenizer_without_a_vocabulary_size_is_refused(extra, says):
    """``{"hymba_tokenizer": "ids"}`` without its vocab_size was 'unknown tokenizer kind 'ids''; one of 0, a
    negative number or true was taken (an ids tokenizer that refuses every id, read from shards or a checkpoint)."""
    with pytest.raises(TokenizerError) as e:
        from_json(json.dumps({"hymba_tokenizer": "ids", **extra}), "t.json")
    assert str(e.value) == f"t.json: an ids tokenizer needs vocab_size, an integer >= 1, got {says}"
    assert from_json(json.dumps({"hymba_tokenizer": "ids", "vocab_size": 7})).vocab_size == 7


def test_a_folder_of_the_corpus_that_cannot_be_listed_is_an_error(tmp_path, monkeypatch, capsys):
    """os.walk skips a folder it cannot list (no read permission) in silence: its text was left out of the
    shards; now one line naming it, as an unreadable file of the corpus is (tested with a scandir that refuses
    the folder: the tests may run as root, whom permissions do not stop)."""
    import os

    src = tmp_path / "c"
    (src / "locked").mkdir(parents=True)
    (src / "a.txt").write_text(TEXT)
    (src / "locked" / "b.txt").write_text(TEXT)
    real = os.scandir

    def scandir(path):  # noqa: ANN001, ANN202 - os.scandir's
        if Path(path).name == "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    rc = main(["prepare", str(src), "--out", str(tmp_path / "s")])
    one_line_error(capsys, rc, 1, f"{src / 'locked'}: cannot read (Permission denied)")
    assert not (tmp_path / "s").exists()


def test_resuming_a_task_run_with_settings_of_another_task_says_nothing_changed(tmp_path, capsys):
    """mqar reads --mqar-pairs alone, yet its stream's state held every task's settings: a resumed mqar run given
    --copy-tokens / --khop-nodes said 'task settings changed: copy_tokens None -> 3, khop_nodes None -> 9 (the
    stream goes on with the new ones)', which it does not read. Those flags are now a usage error (the task the
    checkpoint trains on does not read them); a checkpoint whose state holds them (an earlier version's) resumes
    without the line."""
    from hymba_plus.training.checkpoint import STATE_FILE

    rec = recipe_file(tmp_path)
    out = tmp_path / "r"
    common = ["--data", "mqar", "--seq-len", "32", "--steps", "6", "--batch-size", "2", "--out", str(out),
              "--no-progress"]
    assert main(["train", rec, *common, "--stop-after", "2"]) == 0
    capsys.readouterr()
    rc = main(["train", rec, *common, "--stop-after", "4", "--copy-tokens", "3", "--khop-nodes", "9", "--resume"])
    # (2: a flag the task does not read is a usage error, README "Exit codes", with --resume too)
    one_line_error(capsys, rc, 2, "--copy-tokens 3: a setting of the task selective_copy; this run trains on mqar")
    assert main(["train", rec, *common, "--stop-after", "4", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "task settings changed" not in err, err
    f = out / "step-4" / STATE_FILE
    state = json.loads(f.read_text())
    state["data"]["params"].update({"copy_tokens": 5, "khop_hops": 2, "khop_nodes": None})  # every task's
    f.write_text(json.dumps(state))
    assert main(["train", rec, *common, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "task settings changed" not in err, err


def test_a_shard_index_given_as_the_text_names_its_folder(tmp_path, capsys):
    """``--data shards/index.json`` (the index, not its folder) was read as a text file: a run trained on the
    index's JSON as bytes, and ``prepare`` tokenized it; now one line naming the folder to pass."""
    (tmp_path / "t.txt").write_text(TEXT)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    index = tmp_path / "s" / "index.json"
    rc = main(["train", recipe_file(tmp_path), "--data", str(index), "--out", str(tmp_path / "r"), "--seq-len", "16",
               "--steps", "1", "--no-progress"])
    one_line_error(capsys, rc, 1, f"{index}: the index of token shards, not text: pass its folder {tmp_path / 's'}")
    assert not (tmp_path / "r").exists()
    rc = main(["prepare", str(index), "--out", str(tmp_path / "s2")])
    one_line_error(capsys, rc, 1, f"{index}: the index of token shards, not text")


def test_a_folder_hymba_wrote_given_as_the_text_is_refused(tmp_path, capsys):
    """Inside a corpus, token shards, a run's folder and checkpoints are not text (skipped); given as the corpus
    itself they were read: ``prepare SHARDS`` tokenized their index.json, ``--data CKPT`` trained on the
    checkpoint's JSON and YAML, ``--data RUN`` on its metrics.jsonl. Each is one line naming what it is."""
    (tmp_path / "t.txt").write_text(TEXT * 3)
    rec = recipe_file(tmp_path)
    common = ["--seq-len", "16", "--batch-size", "2", "--steps", "1", "--no-progress"]
    assert main(["train", rec, "--data", str(tmp_path / "t.txt"), "--out", str(tmp_path / "run"), *common]) == 0
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    rc = main(["prepare", str(tmp_path / "s"), "--out", str(tmp_path / "s2")])
    one_line_error(capsys, rc, 1, f"{tmp_path / 's'}: token shards written by hymba prepare, not text")
    for folder, what in ((tmp_path / "run" / "step-1", "a checkpoint"), (tmp_path / "run", "a training run's folder")):
        rc = main(["train", rec, "--data", str(folder), "--out", str(tmp_path / "r2"), *common])
        one_line_error(capsys, rc, 1, f"{folder}: {what} written by hymba, not text")
        assert not (tmp_path / "r2").exists()
    mine = tmp_path / "mine"  # a text folder with a metrics.jsonl of its own at its top is data (JSON Lines)
    mine.mkdir()
    (mine / "metrics.jsonl").write_text(json.dumps({"text": TEXT * 3}) + "\n")
    assert prepare(mine, tmp_path / "s3")["tokens"] == len((TEXT * 3).encode())


# --------------------------------------------------------------------------- held-out samples of the tasks


def _rows(ids: torch.Tensor) -> set[bytes]:
    return {r.numpy().tobytes() for r in ids}


@pytest.mark.parametrize("name,seq_len,vocab,n_train", [
    ("parity", 16, 8, 4000),  # 256 distinct inputs: every one drawn within the first 4000 training samples
    ("selective_copy", 8, 6, 4000),  # 1 token copied: (vocab - 3) * C(6 noise positions, 1) = 18
    ("mqar", 8, 6, 4000),  # 2 keys ordered * 3^2 values * 2 query orders = 36
])
def test_no_held_out_sample_is_ever_a_training_sample(name, seq_len, vocab, n_train):
    """The eval rows are a fixed held-out set that the training stream never draws: before, eval drew from
    another seed of the same small space, so at parity with seq_len 16 every eval row was a training row
    (eval accuracy measured memorisation)."""
    stream = open_stream(name, seq_len, vocab, 0, TrainConfig(seq_len=seq_len), None)
    n = stream.n_eval()
    assert n is not None and 1 <= n
    held = stream.eval(range(n))
    assert held.unique is None and len(_rows(held.input_ids)) == n  # distinct samples, each scored once
    train = stream.train(range(n_train)).input_ids
    assert not _rows(held.input_ids) & _rows(train)
    assert len(_rows(train)) > 1
    # an eval batch past the held-out set wraps around it and says which rows are repeats
    over = stream.eval(range(n - 1, n + 3))
    assert over.unique == 1 and torch.equal(over.input_ids[1], held.input_ids[0])


def test_the_held_out_set_of_a_large_space_leaves_the_training_stream_as_it_was():
    """MQAR at the defaults: no training sample collides with the held-out set, so the training stream is
    sample i = the first draw of ``default_rng([seed, 0, i])``, bit for bit (documented numbers and
    resumed runs of earlier versions stay valid), and eval row i is the first draw of
    ``default_rng([seed, 1, i])`` as before."""
    cfg, task = TrainConfig(), TASKS["mqar"]
    stream = open_stream("mqar", 128, 64, 3, cfg, None)

    def first_draws(s: int, idx: range) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = zip(*(task.sample(np.random.default_rng([3, s, i]), 128, 64, cfg) for i in idx))
        return torch.from_numpy(np.stack(ids)), torch.from_numpy(np.stack(labels))

    b = stream.train(range(5000, 5064))
    ids, labels = first_draws(0, range(5000, 5064))
    assert torch.equal(b.input_ids, ids) and torch.equal(b.labels, labels)
    e = stream.eval(range(0, 64))
    ids, labels = first_draws(1, range(0, 64))
    assert torch.equal(e.input_ids, ids) and torch.equal(e.labels, labels)
    assert stream.n_eval() == 4096 and getattr(stream, "note", None) is None


def test_a_training_sample_that_is_held_out_is_redrawn_from_its_own_generator():
    """A collision redraws from the same generator (deterministic per index, not per batch): a sample is
    the same whichever batch or rank draws it, and it is one the held-out set does not hold."""
    stream = open_stream("parity", 16, 8, 0, TrainConfig(seq_len=16), None)
    whole = stream.train(range(0, 300)).input_ids
    parts = torch.cat([stream.train(range(c, c + 7)).input_ids for c in range(0, 300, 7)])[:300]
    assert torch.equal(whole, parts)
    again = open_stream("parity", 16, 8, 0, TrainConfig(seq_len=16), None)
    assert torch.equal(again.train(range(123, 140)).input_ids, whole[123:140])


def test_a_task_stream_draws_its_held_out_set_at_the_first_batch(monkeypatch):
    """Opening a task's stream draws no held-out sample (d6faeac: at vocab_size 2e9 mqar's 4096 held-out
    samples took minutes and GBs before the run's model-size check); the size, note and description count
    the set without drawing it, and the first batch draws it once (the same set as drawn directly)."""
    from hymba_plus.training.tasks import Task

    drawn = []
    real = Task.heldout
    monkeypatch.setattr(Task, "heldout", lambda self, *a: drawn.append(a) or real(self, *a))
    stream = open_stream("parity", 16, 8, 0, TrainConfig(seq_len=16), None)
    assert stream.n_eval() == 64 and stream.note is not None and "64 held out" in stream.description
    assert drawn == []
    stream.train(range(4))
    e = stream.eval(range(64))
    assert len(drawn) == 1 and torch.equal(e.input_ids, real(TASKS["parity"], 0, 16, 8, TrainConfig(seq_len=16)).ids)


def test_a_small_task_space_is_said_and_one_too_small_is_refused(tmp_path, capsys):
    """Parity at seq_len 16 has 2^8 = 256 distinct inputs: its held-out set is a quarter of them (64), said in
    one line naming the task and the setting; at seq_len 3 (2 inputs) nothing can be held out: refused."""
    stream = open_stream("parity", 16, 8, 0, TrainConfig(seq_len=16), None)
    assert stream.n_eval() == 64
    assert re.fullmatch(r"note: parity at seq_len 16 has 256 distinct samples: 64 of them \(25%\) are held out "
                        r"for eval and never trained on[^\n]*", stream.note), stream.note
    with pytest.raises(TaskError, match=r"parity at seq_len 3 has 2 distinct samples: too few"):
        TASKS["parity"].check(3, 8, TrainConfig(seq_len=3))
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump({**TINY, "name": "p"}))
    rc = main(["train", str(p), "--data", "parity", "--seq-len", "3", "--steps", "1", "--out", str(tmp_path / "o"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "parity at seq_len 3 has 2 distinct samples" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_a_resumed_run_on_a_small_task_space_ends_with_the_uninterrupted_losses(tmp_path, capsys):
    """Parity at seq_len 16 redraws the training samples that are held out: a run stopped and resumed sees the
    same samples (and so the same losses and eval) as the uninterrupted one, and says the held-out share once."""
    rec = recipe_file(tmp_path)
    common = ["--data", "parity", "--seq-len", "16", "--steps", "8", "--batch-size", "4", "--eval-every", "4",
              "--save-every", "4", "--warmup", "1", "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", rec, *common, "--out", str(a)]) == 0
    assert "note: parity at seq_len 16 has 256 distinct samples: 64 of them (25%)" in capsys.readouterr().err
    assert main(["train", rec, *common, "--out", str(b), "--stop-after", "4"]) == 0
    assert main(["train", rec, *common, "--out", str(b), "--resume"]) == 0
    rows = [[json.loads(x) for x in (o / "metrics.jsonl").read_text().splitlines()] for o in (a, b)]
    assert [r["loss"] for r in rows[0]] == pytest.approx([r["loss"] for r in rows[1]], abs=1e-6)
    assert rows[0][-1]["eval_accuracy"] == pytest.approx(rows[1][-1]["eval_accuracy"], abs=1e-6)


def test_a_task_checkpoint_from_before_the_held_out_set_says_so_on_resume(tmp_path, capsys):
    """A task checkpoint whose data state has no ``heldout`` (written before the held-out sets) resumes with one
    line saying training now redraws the held-out samples and eval reads them, where the held-out share is noted
    (parity at seq_len 16); a checkpoint that records it, or a task whose share is too small to note, says nothing."""
    rec = recipe_file(tmp_path)
    for data, seq, said in (("parity", "16", True), ("mqar", "32", False)):
        common = ["--data", data, "--seq-len", seq, "--steps", "4", "--batch-size", "2", "--eval-every", "100",
                  "--save-every", "2", "--no-progress"]
        out = tmp_path / data
        assert main(["train", rec, *common, "--out", str(out), "--stop-after", "2"]) == 0
        state_file = out / "step-2" / "trainer_state.json"
        state = json.loads(state_file.read_text())
        assert state["data"]["heldout"] == (64 if data == "parity" else 4096)
        capsys.readouterr()
        assert main(["train", rec, *common, "--out", str(out), "--stop-after", "3", "--resume"]) == 0
        assert "predates the task's held-out set" not in capsys.readouterr().err
        del state["data"]["heldout"]  # as an earlier version wrote it
        state_file.write_text(json.dumps(state))
        for p in out.glob("step-3"):
            shutil.rmtree(p)
        assert main(["train", rec, *common, "--out", str(out), "--resume"]) == 0
        err = capsys.readouterr().err
        assert ("predates the task's held-out set: from here training redraws its held-out samples" in err) == said
