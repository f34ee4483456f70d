"""Stop strings: ``training.tokenizer.StopWatch`` (rows stop independently at a stop string or an end token,
the text cut before the stop string, a streamed tail held back), ``hymba generate --stop`` in the ar, mtp,
speculative and block diffusion modes (the output is the run without it cut at the first stop string,
streamed or not, batched or not; the call ends once every row has stopped) and its refusals."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.models.lm import HybridLM
from hymba_plus.training.tokenizer import AllStopped, ByteTokenizer, IdsTokenizer, StopWatch

RECIPE = {
    "name": "stop-tiny",
    "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": 48, "block_pattern": "GA | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}


def test_stop_watch_rows_stop_on_their_own() -> None:
    tok = ByteTokenizer()
    w = StopWatch(tok.decode, 3, stops=["cd", "xyz"], ends={0})
    for col in ("aax", "bbb", "cyc"):
        assert not w.push(torch.tensor([ord(c) for c in col]))
    # no stop yet; the last two characters may still begin a stop string: held back while streaming
    assert [w.text(r) for r in range(3)] == ["abc", "aby", "xbc"]
    assert w.shown(0) == "a" and w.shown(2) == "x"
    assert not w.push([ord("d"), 0, ord("c")])  # row 0 meets "cd", row 1 its end token, row 2 goes on
    assert w.done == [True, True, False]
    assert w.completion(0) == "ab" and w.shown(0) == "ab" and w.completion(1) == "aby" and w.shown(1) == "aby"
    assert w.push([ord("q"), ord("q"), ord("d")])  # row 2 meets "cd"; the rows that stopped take nothing
    assert [w.completion(r) for r in range(3)] == ["ab", "aby", "xbc"] and w.new[0] == [97, 98, 99, 100]
    with pytest.raises(AllStopped):
        StopWatch(tok.decode, 1, ends={5})(torch.tensor([5]))
    # decoded after its prompt: the text is the completion's alone
    w = StopWatch(tok.decode, 1, stops=["!"], prefixes=[list(b"hi")])
    w.push([ord("?")])
    assert w.text(0) == "?" and w.shown(0) == "?"


def words_tokenizer() -> str:
    """A ``tokenizers`` word-level tokenizer of 256 ASCII words ``a0`` .. ``z255`` (decoded with spaces between
    them): a random model's text is readable, and a stop string may span tokens."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    vocab = {f"{chr(97 + i % 26)}{i}": i for i in range(256)}
    t = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="a0"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return t.to_str()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("stop")
    tok = {"tokenizer.json": words_tokenizer()}
    build_model(RECIPE).save_pretrained(root / "words", extra_files=tok)
    build_model(RECIPE).save_pretrained(root / "ids", extra_files={"tokenizer.json": IdsTokenizer(256).to_json()})
    torch.manual_seed(1)
    build_model({**RECIPE, "model": {**RECIPE["model"], "mtp": {"depth": 2, "block": "GA", "weight": 0.3}}}
                ).save_pretrained(root / "mtp", extra_files=tok)
    build_model({**RECIPE, "objective": {"kind": "block_diffusion", "block_size": 4}}).save_pretrained(
        root / "bd", extra_files=tok)
    return root


def gen(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["generate", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def pick_stop(text: str, avoid: str = "", n: int = 4) -> tuple[str, int]:
    """An n-character stop string first found at index >= 2 of text (and not in avoid), and that index."""
    for k in range(2, len(text) - n + 1):
        s = text[k:k + n]
        if text.find(s) == k and s not in avoid:
            return s, k
    raise AssertionError(f"no stop string to pick in {text!r}")


P0, P1 = "h7 i8", "y24 o14"
BASE = ["--temperature", "1.0", "--seed", "3", "--max-new-tokens", "16", "--eos", "none"]  # (greedy: one word again and again)
MODES = {"ar": ("words", []), "speculative": ("words", ["--mode", "speculative", "--draft", "{words}", "--k", "3"]),
         "mtp": ("mtp", ["--mode", "mtp"]), "block_diffusion": ("bd", ["--mode", "block_diffusion"])}


@pytest.mark.parametrize("mode", list(MODES))
def test_stop_cuts_the_output_streamed_or_not(ckpts, capsys, monkeypatch, mode):
    name, flags = MODES[mode]
    flags = [f.format(words=ckpts / "words") for f in flags]
    ck = str(ckpts / name)
    rc, out, err = gen(capsys, ck, "--prompt", P0, *BASE, *flags, "--no-stream")
    assert rc == 0 and out.startswith(P0) and out.endswith("\n"), err
    full = out[len(P0):-1]
    stop, k = pick_stop(full)
    rc, out, err = gen(capsys, ck, "--prompt", P0, *BASE, *flags, "--no-stream", "--stop", stop, "--stop", "\x00zz")
    assert rc == 0 and out == P0 + full[:k] + "\n", (out, full, stop, err)
    writes: list[str] = []

    class Recorder(io.StringIO):
        def write(self, s: str) -> int:
            writes.append(s)
            return super().write(s)

    rec = Recorder()
    monkeypatch.setattr(sys, "stdout", rec)
    assert main(["generate", ck, "--prompt", P0, *BASE, *flags, "--stop", stop]) == 0
    monkeypatch.undo()
    assert rec.getvalue() == P0 + full[:k] + "\n"  # what was written never went past the stop string
    if mode == "ar":
        assert len([w for w in writes if w]) > 2  # streamed as it came, not printed once at the end
    # a stop string never met: the tail held back while streaming is printed at the end
    rc, out, err = gen(capsys, ck, "--prompt", P0, *BASE, *flags, "--stop", "never met")
    assert rc == 0 and out == P0 + full + "\n", (out, err)


def test_rows_stop_on_their_own_and_the_call_ends_when_all_have(ckpts, capsys, monkeypatch):
    ck = str(ckpts / "words")
    rc, out, _ = gen(capsys, ck, "--prompt", P0, "--prompt", P1, *BASE)
    line0, line1 = out.splitlines()
    fulls = [line0[len(f"[0] {P0}"):], line1[len(f"[1] {P1}"):]]
    assert rc == 0 and out == f"[0] {P0}{fulls[0]}\n[1] {P1}{fulls[1]}\n"
    stop, k = pick_stop(fulls[0], avoid=fulls[1])
    calls = []
    forward = HybridLM.forward
    monkeypatch.setattr(HybridLM, "forward", lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    rc, out, err = gen(capsys, ck, "--prompt", P0, "--prompt", P1, *BASE, "--stop", stop)
    assert rc == 0 and out == f"[0] {P0}{fulls[0][:k]}\n[1] {P1}{fulls[1]}\n", (out, err)
    assert len(calls) == 16  # row 1 runs the whole budget: prefill + 15 steps
    stop1, k1 = pick_stop(fulls[1], avoid=fulls[0][:k + len(stop)])
    calls.clear()
    rc, out, err = gen(capsys, ck, "--prompt", P0, "--prompt", P1, *BASE, "--stop", stop, "--stop", stop1)
    cut0 = min(i for i in (fulls[0].find(stop), fulls[0].find(stop1)) if i >= 0)
    assert rc == 0 and out == f"[0] {P0}{fulls[0][:cut0]}\n[1] {P1}{fulls[1][:k1]}\n", (out, err)
    assert len(calls) < 16  # both rows stopped: no forward after that


@pytest.mark.parametrize("ckpt,args,needle", [
    ("ids", ["--prompt", "1 2", "--stop", "3"], "--stop: stop strings need a text tokenizer"),
    ("words", ["--prompt", P0, "--stop", ""], "--stop: an empty stop string"),
    ("words", ["--mode", "forecast", "--data", "x.csv", "--stop", "a"], "--stop: not for --mode forecast"),
])
def test_bad_stop_is_one_usage_line(ckpts, capsys, ckpt, args, needle):
    rc, out, err = gen(capsys, str(ckpts / ckpt), *args)
    assert rc == 2 and out == "" and len(err.strip().splitlines()) == 1 and needle in err, err



def test_an_unfinished_character_is_no_stop_string() -> None:
    """A U+FFFD that stands for an unfinished UTF-8 sequence at the text's end (bytes, byte-level BPE) is not
    text yet: a stop string holding U+FFFD (the replacement character itself) matches only a finished one."""
    tok = ByteTokenizer()
    w = StopWatch(tok.decode, 2, stops=["\ufffd"])
    assert not w.push([0xC3, 0xFF])  # row 0: the first byte of "é"; row 1: a byte that is never UTF-8
    assert w.done == [False, False] and w.text(0) == "\ufffd"
    assert not w.push([0xA9, ord("x")])  # row 0's "é" is finished: no stop; row 1's U+FFFD is text, followed
    assert w.done == [False, True] and w.text(0) == "é" and w.completion(1) == ""
    # a U+FFFD at the end may still be an unfinished character: the row goes on, but its completion so far is
    # cut there (were the call to end now, the text would hold it); one more token makes it text
    assert not w.push([0xFF, ord("y")]) and w.completion(0) == "é"
    assert w.push([ord("z"), ord("y")]) and w.completion(0) == "é" and w.shown(0) == "é"


#: the summary line of each decoder that prints one (models/generation.py, mtp_decoding.py): its counts
SUMMARY = {"speculative": r"speculative: k 3, .* \((\d+) forwards, .*\), (\d+) rounds$",
           "mtp": r"mtp: k \d+, .* \((\d+) forwards, .*\), (\d+) rounds$",
           "block_diffusion": r"block diffusion: block size 4, (\d+) forward passes for (\d+) tokens per row"}


@pytest.mark.parametrize("mode", list(MODES))
def test_a_call_ended_by_its_stop_strings_prints_the_decoders_summary_so_far(ckpts, capsys, mode):
    """A call that every row's stop string ends early printed no summary line (the decoders filled ``stats`` at
    their end, which the stop skipped): it prints the decoder's line of what it ran (the rounds, the blocks up
    to the stop), fewer forwards than the whole call's; ar has none either way."""
    import re

    name, flags = MODES[mode]
    flags = [f.format(words=ckpts / "words") for f in flags]
    ck = str(ckpts / name)
    rc, out, full_err = gen(capsys, ck, "--prompt", P0, *BASE, *flags, "--no-stream")
    assert rc == 0, full_err
    stop, _ = pick_stop(out[len(P0):-1])
    rc, _, err = gen(capsys, ck, "--prompt", P0, *BASE, *flags, "--stop", stop)
    assert rc == 0, err
    if mode == "ar":
        assert full_err == err == ""
        return
    (whole,), (part,) = ([re.match(SUMMARY[mode], line) for line in e.splitlines()] for e in (full_err, err))
    assert whole and part, (full_err, err)
    assert int(part[1]) < int(whole[1]) and int(part[2]) <= int(whole[2]), (full_err, err)
