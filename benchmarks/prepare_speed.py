"""``hymba prepare`` on a JSON Lines corpus: documents encoded in batches (tokenizers' multi-threaded
``encode_batch``; bytes as one array per batch) against one encoding call per document (how a folder of text
files, one a document, is encoded). A generated corpus (Zipf-distributed words, documents of 50 to 2,000
words) is written to a temporary folder and deleted after; a byte-level BPE is trained on its first
documents (``hymba tokenizer train``'s ``train_bpe``). The shards of both paths are checked equal.

    python benchmarks/prepare_speed.py --mb 50
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from hymba_plus.training import data as datamod
from hymba_plus.training import readers
from hymba_plus.training import tokenizer as tokmod


def corpus(path: Path, mb: float, seed: int = 0) -> int:
    """A JSON Lines file of about ``mb`` MB of documents of random words; the number of documents."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    words = ["".join(rng.choice(letters, size=int(rng.integers(1, 10)))) for _ in range(20_000)]
    n = 0
    size = 0
    with open(path, "w") as fh:
        while size < mb * 1e6:
            k = int(rng.integers(50, 2000))
            ids = np.minimum(rng.zipf(1.3, size=k), len(words)) - 1
            line = json.dumps({"id": n, "text": " ".join(words[i] for i in ids) + "."}) + "\n"
            fh.write(line)
            size += len(line)
            n += 1
    return n


def per_document(tok: tokmod.HFTokenizer | tokmod.ByteTokenizer):  # noqa: ANN201 - a context of patches
    """``_batch_ids`` encoding one document at a time (one ``encode`` call a document)."""
    batch_ids = datamod._batch_ids

    def one_by_one(texts, where, t, chunk_bytes=1 << 22):  # noqa: ANN001, ANN202
        return np.concatenate([batch_ids([s], where, t, chunk_bytes) for s in texts] or [np.zeros(0, np.int64)])

    def bytes_one_by_one(texts, where, t, chunk_bytes=1 << 22):  # noqa: ANN001, ANN202
        out = []
        for s in texts:  # ByteTokenizer.encode: a list of ints a document
            ids = t.encode(s)
            if ids:
                out.append(np.asarray(ids + ([10] if ids[-1] != 10 else []), dtype=np.int64))
        return np.concatenate(out or [np.zeros(0, np.int64)])

    class Patch:
        def __enter__(self):  # noqa: ANN204
            if tok.kind == "bytes":
                datamod._batch_ids = bytes_one_by_one
            else:
                datamod._batch_ids = one_by_one
                self.fn = tokmod.HFTokenizer.encode_batch
                tokmod.HFTokenizer.encode_batch = (lambda self, texts, add_special_tokens=True:
                                                   [self.encode(s, add_special_tokens) for s in texts])

        def __exit__(self, *exc):  # noqa: ANN001, ANN204
            datamod._batch_ids = batch_ids
            if tok.kind != "bytes":
                tokmod.HFTokenizer.encode_batch = self.fn

    return Patch()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (default 50)")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hymba-prepare-speed-"))
    try:
        src = tmp / "corpus.jsonl"
        n = corpus(src, args.mb)
        mb = src.stat().st_size / 1e6
        print(f"corpus: {mb:.1f} MB, {n:,} documents; {os.cpu_count()} CPU(s)")
        t0 = time.perf_counter()
        docs = sum(len(d) for d, _ in readers.batches(src, "text"))
        print(f"read + JSON-parse only: {time.perf_counter() - t0:.2f} s ({docs:,} documents)")
        sample = (json.loads(line)["text"] for _, line in zip(range(max(1, n // 10)), open(src)))
        t0 = time.perf_counter()
        bpe = tokmod.from_json(tokmod.train_bpe(sample, args.vocab_size))
        print(f"train_bpe on a tenth of the documents: {time.perf_counter() - t0:.2f} s, {bpe.vocab_size} tokens")
        for name, tok in (("bytes", tokmod.ByteTokenizer()), (f"BPE {bpe.vocab_size}", bpe)):
            times = {}
            for path in ("per-document", "batched"):
                out = tmp / f"s-{path}"
                t0 = time.perf_counter()
                if path == "batched":
                    index = datamod.prepare(src, out, tok)
                else:
                    with per_document(tok):
                        index = datamod.prepare(src, out, tok)
                times[path] = time.perf_counter() - t0
            a, b = (b"".join((tmp / f"s-{p}" / s["file"]).read_bytes() for s in index["shards"])
                    for p in ("per-document", "batched"))
            assert a == b, "the two paths gave other shards"
            shutil.rmtree(tmp / "s-per-document")
            shutil.rmtree(tmp / "s-batched")
            print(f"{name}: {index['tokens']:,} tokens; per-document {times['per-document']:.2f} s "
                  f"({mb / times['per-document']:.1f} MB/s), batched {times['batched']:.2f} s "
                  f"({mb / times['batched']:.1f} MB/s): {times['per-document'] / times['batched']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
