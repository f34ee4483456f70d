"""Reasoning data (training/reasoning.py): the built-in chain tasks (layout, arithmetic,
determinism, validation), JSONL loading and its one-line errors, collate layouts and
labels, and ReasoningStream."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hymba_plus.training.data import DataError
from hymba_plus.training.reasoning import (
    EOS,
    FIRST_VALUE,
    PAIR_END,
    PLUS,
    QUERY,
    REASONING_TASKS,
    SEP,
    TIMES,
    ReasoningExample,
    ReasoningStream,
    answer_chance,
    collate,
    load_jsonl,
    sample,
    samples,
)
from hymba_plus.training.tasks import TaskError
from hymba_plus.training.tokenizer import ByteTokenizer, IdsTokenizer


def check_arith(ex: ReasoningExample, steps: int, modulus: int) -> None:
    """Recomputes the chain from the question and checks the documented layout."""
    q = list(ex.question)
    assert len(q) == 2 * steps + 2 and q[-1] == SEP
    v = q[0] - FIRST_VALUE
    assert 0 <= v < modulus
    chain = []
    for i in range(steps):
        op, x = q[1 + 2 * i], q[2 + 2 * i] - FIRST_VALUE
        assert op in (PLUS, TIMES) and 0 <= x < modulus
        v = (v + x) % modulus if op == PLUS else (v * x) % modulus
        chain.append(FIRST_VALUE + v)
    assert list(ex.reasoning) == chain and len(ex.reasoning) == steps
    assert ex.answer == (FIRST_VALUE + v, EOS) and ex.reasoning[-1] == ex.answer[0]


def check_pointer(ex: ReasoningExample, hops: int, nodes: int) -> None:
    q = list(ex.question)
    assert len(q) == 3 * nodes + 3 and q[-3] == QUERY and q[-1] == SEP
    pairs = q[: 3 * nodes]
    assert pairs[2::3] == [PAIR_END] * nodes
    f = dict(zip(pairs[0::3], pairs[1::3]))
    assert sorted(f) == sorted(f.values()) == list(range(FIRST_VALUE, FIRST_VALUE + nodes))
    x, chain = q[-2], []
    for _ in range(hops):
        x = f[x]
        chain.append(x)
    assert list(ex.reasoning) == chain and q[-2] not in chain
    assert ex.answer == (chain[-1], EOS)


# --------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("steps,modulus,ops", [(3, 10, "+*"), (1, 2, "+*"), (6, 7, "*"), (4, 13, "+")])
def test_chain_arith_is_right(steps, modulus, ops):
    vocab = FIRST_VALUE + modulus + 3
    seen_ops = set()
    for i in range(40):
        ex = sample("chain_arith", 0, i, vocab, steps=steps, modulus=modulus, ops=ops)
        check_arith(ex, steps, modulus)
        seen_ops |= {t for t in ex.question[1:-1:2]}
        assert max(max(ex.question), max(ex.reasoning), max(ex.answer)) < vocab
    assert seen_ops == {PLUS if o == "+" else TIMES for o in ops}


def test_chain_arith_defaults_and_chance():
    ex = sample("chain_arith", 1, 0, 16)
    check_arith(ex, 3, 10)
    assert answer_chance("chain_arith", 16) == pytest.approx(0.1)
    # answers are spread over all the values (no collapse through multiplying by 0)
    answers = {e.answer[0] for e in samples("chain_arith", 1, range(300), 16)}
    assert answers == set(range(FIRST_VALUE, FIRST_VALUE + 10))


@pytest.mark.parametrize("hops,nodes", [(3, 8), (1, 2), (5, 6)])
def test_chain_pointer_is_right(hops, nodes):
    for i in range(20):
        check_pointer(sample("chain_pointer", 2, i, FIRST_VALUE + nodes, hops=hops, nodes=nodes), hops, nodes)
    assert answer_chance("chain_pointer", 64, hops=hops, nodes=nodes) == pytest.approx(1 / (nodes - 1))


@pytest.mark.parametrize("name", sorted(REASONING_TASKS))
def test_tasks_are_deterministic_per_seed_stream_index(name):
    a = samples(name, 3, range(10, 20), 32)
    assert a == [sample(name, 3, i, 32) for i in range(10, 20)]  # one example per global index
    assert samples(name, 3, [15], 32)[0] == a[5]
    assert samples(name, 3, range(10, 20), 32, stream=1) != a  # eval differs from train
    assert samples(name, 4, range(10, 20), 32) != a  # so does another seed
    assert len(set(a)) > 5
    assert all(isinstance(t, int) for e in a for t in e.question + e.reasoning + e.answer)


@pytest.mark.parametrize("name,vocab,params,message", [
    ("chain_arith", 14, {}, "chain_arith with modulus 10 needs vocab_size >= 15 (5 specials + 10 values), got 14"),
    ("chain_arith", 64, {"steps": 0}, "chain_arith: steps must be >= 1, got 0"),
    ("chain_arith", 64, {"modulus": 1}, "chain_arith: modulus must be >= 2, got 1"),
    ("chain_arith", 64, {"steps": 2.5}, "chain_arith: steps must be an integer, got 2.5"),
    ("chain_arith", 64, {"ops": "-"}, "chain_arith: ops must be '+', '*' or '+*', got '-'"),
    ("chain_arith", 64, {"hops": 2}, "chain_arith: unknown parameter 'hops' (known: steps, modulus, ops)"),
    ("chain_pointer", 12, {}, "chain_pointer with 8 nodes needs vocab_size >= 13 (5 specials + 8 nodes), got 12"),
    ("chain_pointer", 64, {"hops": 4, "nodes": 4},
     "chain_pointer with 4 hops needs nodes >= 5 (no hop returns to the query), got 4"),
    ("chain_pointer", 64, {"hops": 0}, "chain_pointer: hops must be >= 1, got 0"),
    ("chain_sort", 64, {}, "unknown reasoning task 'chain_sort' (built-in: chain_arith, chain_pointer)"),
])
def test_task_errors_are_one_line(name, vocab, params, message):
    with pytest.raises(TaskError) as e:
        sample(name, 0, 0, vocab, **params)
    assert str(e.value) == message and "\n" not in str(e.value)
    with pytest.raises(TaskError):
        answer_chance(name, vocab, **params)


# --------------------------------------------------------------------------- JSONL


def write(tmp_path: Path, lines: list[str], name: str = "r.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_jsonl_happy_path(tmp_path):
    rows = [{"question": "2+3*4?", "reasoning": "3*4=12; 2+12=14", "answer": "14"},
            {"question": "Ünï ✓", "reasoning": "r", "answer": "a"}]
    p = write(tmp_path, [json.dumps(rows[0]), "", "   ", json.dumps(rows[1], ensure_ascii=False)])
    tok = ByteTokenizer()
    exs = load_jsonl(p, tok)
    assert len(exs) == 2
    assert exs[0] == ReasoningExample(tuple(b"2+3*4?"), tuple(b"3*4=12; 2+12=14"), tuple(b"14"))
    assert tok.decode(list(exs[1].question)) == "Ünï ✓"


def test_jsonl_appends_the_tokenizers_eos(tmp_path):
    class EosBytes(ByteTokenizer):
        vocab_size, eos_id = 257, 256

    p = write(tmp_path, [json.dumps({"question": "q", "reasoning": "r", "answer": "42"})])
    (ex,) = load_jsonl(p, EosBytes())
    assert ex.answer == (ord("4"), ord("2"), 256) and ex.question == (ord("q"),)
    (ex,) = load_jsonl(write(tmp_path, ['{"question": "1 2", "reasoning": "3", "answer": "4 5"}'], "ids.jsonl"),
                       IdsTokenizer(10))
    assert ex == ReasoningExample((1, 2), (3,), (4, 5))


def test_jsonl_with_a_byte_order_mark_reads_as_without(tmp_path):
    """Files saved by Windows tools start with a UTF-8 BOM: it was 'r.jsonl:1: not JSON (Unexpected UTF-8 BOM ...)'."""
    rows = [json.dumps({"question": "q", "reasoning": "r", "answer": "a"}), json.dumps({"question": "x", "reasoning": "y",
                                                                                       "answer": "z"})]
    plain = load_jsonl(write(tmp_path, rows), ByteTokenizer())
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + ("\n".join(rows) + "\n").encode())
    assert load_jsonl(p, ByteTokenizer()) == plain


GOOD = json.dumps({"question": "q", "reasoning": "r", "answer": "a"})


@pytest.mark.parametrize("bad,what", [
    ("{not json", "2: not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("[" * 100_000, "2: not JSON of this form (nested too deeply)"),  # was a RecursionError traceback
    ('["q", "r", "a"]', "2: expected a JSON object with string fields question, reasoning, answer, got list"),
    ('{"question": "q", "answer": "a"}', "2: missing key 'reasoning'"),
    ('{"question": "q", "reasoning": "r", "answer": "a", "id": 3}',
     "2: unexpected key 'id' (allowed: question, reasoning, answer)"),
    ('{"question": "q", "reasoning": "r", "answer": 14}', "2: 'answer' must be a string, got int"),
    ('{"question": null, "reasoning": "r", "answer": "a"}', "2: 'question' must be a string, got NoneType"),
    ('{"question": "q", "reasoning": "", "answer": "a"}', "2: 'reasoning' is empty (no tokens)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, bad, what):
    p = write(tmp_path, [GOOD, bad, GOOD])
    with pytest.raises(DataError) as e:
        load_jsonl(p, ByteTokenizer())
    assert str(e.value) == f"{p}:{what}" and "\n" not in str(e.value)


def test_jsonl_file_errors(tmp_path):
    tok = ByteTokenizer()
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file$"):
        load_jsonl(tmp_path / "missing.jsonl", tok)
    for content in ("", "\n\n  \n"):
        p = tmp_path / "empty.jsonl"
        p.write_text(content)
        with pytest.raises(DataError) as e:
            load_jsonl(p, tok)
        assert str(e.value) == f"{p}: empty (no examples)"
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(GOOD.encode() + b"\n\n" + '{"question": "é"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as e:
        load_jsonl(p, tok)
    assert str(e.value) == f"{p}:3: not UTF-8 (byte 15)"
    p = write(tmp_path, ['{"question": "1 x", "reasoning": "3", "answer": "4"}'], "ids.jsonl")
    with pytest.raises(DataError) as e:
        load_jsonl(p, IdsTokenizer(10))
    assert str(e.value).startswith(f"{p}:1: 'question': this model reads token ids") and "\n" not in str(e.value)


# --------------------------------------------------------------------------- collate


def test_collate_layouts_masks_and_labels():
    exs = [ReasoningExample((5, 6, 2), (7,), (8, 1)),
           ReasoningExample((9, 2), (10, 11, 12), (13, 14, 1)),
           ReasoningExample((5, 5, 5, 5), (6, 6), (7, 1))]
    b = collate(exs)
    B = len(exs)
    assert b["question"].shape == (B, 4) and b["reasoning"].shape == (B, 3) and b["answer"].shape == (B, 3)
    assert b["full"].shape == (B, 8) and b["qa"].shape == (B, 6)
    for key in ("question", "reasoning", "answer", "full", "qa"):
        ids, mask = b[key], b[f"{key}_mask"]
        assert ids.dtype == torch.long and mask.dtype == torch.bool and mask.shape == ids.shape
        assert bool((ids[~mask] == 0).all())
        # right padding: every mask row is ones then zeros
        assert torch.equal(mask, mask.long().cumprod(1).bool())
    for i, e in enumerate(exs):
        for key in ("question", "reasoning", "answer"):
            seg = getattr(e, key)
            assert b[key][i, : len(seg)].tolist() == list(seg) and int(b[f"{key}_mask"][i].sum()) == len(seg)
        for key, prefix, lab, start in (("full", e.question + e.reasoning, "labels", "answer_start"),
                                        ("qa", e.question, "qa_labels", "qa_answer_start")):
            row = prefix + e.answer
            assert b[key][i, : len(row)].tolist() == list(row) and int(b[f"{key}_mask"][i].sum()) == len(row)
            labels = b[lab][i]
            scored = (labels != -100).nonzero().flatten().tolist()
            assert scored == list(range(len(prefix), len(row))) and int(b[start][i]) == len(prefix)
            assert labels[scored].tolist() == list(e.answer) == b[key][i, scored].tolist()


def test_collate_labels_follow_lm_loss_convention():
    """lm_loss scores labels[t+1] at position t: a predictor that outputs the next token of
    ``full`` is perfect on exactly the answer tokens (the first one predicted from the last
    reasoning token)."""
    b = collate([ReasoningExample((5, 2), (6, 7), (8, 1)), ReasoningExample((5, 6, 7, 2), (9,), (10, 11, 1))])
    vocab = 16
    logits = torch.nn.functional.one_hot(torch.roll(b["full"], -1, 1), vocab).float()
    tgt = b["labels"][:, 1:]
    pred = logits[:, :-1].argmax(-1)
    m = tgt != -100
    assert int(m.sum()) == 5 and bool((pred[m] == tgt[m]).all())
    assert pred[0, 3].item() == 8 and b["full"][0, 3].item() == 7  # last reasoning token predicts the answer


def test_collate_max_len_and_empty():
    exs = [ReasoningExample((5, 2), (6, 7), (8, 1))]
    assert collate(exs, max_len=6)["full"].shape == (1, 6)
    with pytest.raises(DataError) as e:
        collate(exs, max_len=5)
    assert str(e.value) == ("collate: example 0 has 6 tokens (question 2 + reasoning 2 + answer 2), "
                            "more than max_len 5")
    with pytest.raises(DataError, match="no examples"):
        collate([])
    # LaDiR's passes add its memory slots: [question, slots, reasoning or answer] must fit too
    assert collate(exs, max_len=6, reserve=2)["full"].shape == (1, 6)
    with pytest.raises(DataError) as e:
        collate(exs, max_len=6, reserve=3)
    assert str(e.value) == ("collate: example 0 needs 7 positions (question 2 + 3 memory slots + the longer of "
                            "reasoning 2 and answer 2), more than max_len 6")


def test_collate_of_tasks_has_fixed_shapes():
    b = collate(samples("chain_arith", 0, range(8), 16, steps=4))
    assert b["question"].shape == (8, 10) and b["reasoning"].shape == (8, 4) and b["answer"].shape == (8, 2)
    assert bool(b["question_mask"].all() and b["reasoning_mask"].all() and b["answer_mask"].all())
    assert torch.equal(b["labels"][:, -2:], b["answer"]) and bool((b["labels"][:, :-2] == -100).all())


# --------------------------------------------------------------------------- streams


def test_stream_for_a_task():
    s = ReasoningStream("chain_arith", vocab_size=16, seed=5, steps=2)
    tr = s.train(range(4, 8))
    assert tr["reasoning"].shape == (4, 2)
    again = s.train(range(6, 7))
    assert torch.equal(again["full"][0], tr["full"][2])
    ev = s.eval(range(4, 8))
    assert not torch.equal(ev["full"], tr["full"])
    held = {e.question for e in s.eval_examples(range(s.n_eval()))}
    for i in range(20):  # the first draw of [seed, 0, i] unless its question is held out; then a redraw
        first, got = sample("chain_arith", 5, i, 16, steps=2), s.train_examples([i])[0]
        assert got == first if first.question not in held else got.question not in held
    # 2 steps mod 10: 10 * 14^2 = 1960 distinct questions, a quarter of them held out
    assert s.n_eval() == 490 and s.chance == pytest.approx(0.1)
    assert s.eval_examples([0]) == [sample("chain_arith", 5, 0, 16, stream=1, steps=2)]
    assert s.state() == {"kind": "reasoning_task", "name": "chain_arith", "params": {"steps": 2, "modulus": 10, "ops": "+*"},
                         "heldout": s.n_eval()}
    with pytest.raises(TaskError, match="needs vocab_size >= 15"):
        ReasoningStream("chain_arith", vocab_size=8)


def test_stream_for_a_jsonl_file(tmp_path):
    rows = [json.dumps({"question": f"q{i}", "reasoning": f"r{i}", "answer": f"a{i}"}) for i in range(25)]
    p = write(tmp_path, rows)
    s = ReasoningStream(str(p), vocab_size=256, seed=1)
    assert (s.n_train, s.n_eval()) == (23, 2)  # the last 10% of the file (int(2.5) = 2) is held out
    held = [bytes(e.question).decode() for e in s.eval_examples(range(4))]
    assert held == ["q23", "q24", "q23", "q24"]
    epoch0 = [bytes(e.question).decode() for e in s.train_examples(range(23))]
    assert sorted(epoch0) == sorted(f"q{i}" for i in range(23))  # each training example once per epoch
    assert s.train_examples(range(30, 31)) == ReasoningStream(str(p), 256, seed=1).train_examples([30])
    b = s.train(range(3))
    assert b["full"].shape[0] == 3 and torch.equal((b["labels"] != -100).sum(1), b["answer_mask"].sum(1))
    # small files: at least one held-out example; one example is too few
    s2 = ReasoningStream(write(tmp_path, rows[:3], "small.jsonl"), vocab_size=256)
    assert (s2.n_train, s2.n_eval()) == (2, 1)
    with pytest.raises(DataError, match="1 example is too few"):
        ReasoningStream(write(tmp_path, rows[:1], "one.jsonl"), vocab_size=256)
    with pytest.raises(DataError, match="outside the model's vocab_size 100"):
        ReasoningStream(str(p), vocab_size=100)
    with pytest.raises(DataError, match="not a built-in reasoning task"):
        ReasoningStream("chain_arit", vocab_size=64)
    with pytest.raises(TaskError, match="apply to built-in tasks only"):
        ReasoningStream(str(p), vocab_size=256, steps=3)


def test_a_jsonl_example_too_long_for_the_model_is_refused_up_front(tmp_path):
    """An example longer than max_len (or too long with LaDiR's memory slots) is refused when the file is
    opened, naming the file and the example: it was a ``collate: example 0`` error (its place in some batch)
    only when a batch first drew it, possibly deep into a run."""
    rows = [json.dumps({"question": f"q{i}", "reasoning": f"r{i}", "answer": f"a{i}"}) for i in range(5)]
    rows.insert(2, json.dumps({"question": "x" * 20, "reasoning": "r", "answer": "a"}))
    p = write(tmp_path, rows)
    assert ReasoningStream(str(p), vocab_size=256, max_len=22).n_train == 5
    with pytest.raises(DataError) as e:
        ReasoningStream(str(p), vocab_size=256, max_len=21)
    assert str(e.value) == (f"{p}:3: example 3 has 22 tokens (question 20 + reasoning 1 + answer 1), "
                            "more than max_len 21")
    with pytest.raises(DataError, match=r"r\.jsonl:3: example 3 needs 23 positions \(question 20 \+ 2 memory slots"):
        ReasoningStream(str(p), vocab_size=256, max_len=22, reserve=2)


@pytest.mark.parametrize("name, params", [("chain_arith", {"steps": 100}), ("chain_pointer", {"nodes": 30})])
def test_a_task_too_long_for_the_model_is_refused_up_front(name, params):
    """A built-in task whose examples (all of one length) do not fit max_len (with LaDiR's memory slots) is
    refused when the stream is made, naming the flags and max_seq_len; it failed at the first batch."""
    assert ReasoningStream(name, vocab_size=64, max_len=400, reserve=3, **params).train([0])["full"].shape[1] <= 400
    with pytest.raises(TaskError, match="--chain-steps .*max_seq_len") as e:
        ReasoningStream(name, vocab_size=64, max_len=64, reserve=3, **params)
    assert "\n" not in str(e.value) and "more than max_len 64" in str(e.value)


def test_a_jsonl_example_refused_at_open_is_named_by_its_line(tmp_path):
    """Blank lines are skipped, so the example's number is not its line: 'example 3' pointed two lines above the
    example (on line 5) that holds an id outside the vocabulary or is too long; now file:line as load_jsonl's."""
    rows = [json.dumps({"question": f"q{i}", "reasoning": f"r{i}", "answer": f"a{i}"}) for i in range(4)]
    rows[2:2] = ["", "  "]
    rows.insert(4, json.dumps({"question": "x" * 20 + "\u00ff", "reasoning": "r", "answer": "a"}))
    p = write(tmp_path, rows)
    with pytest.raises(DataError) as e:
        ReasoningStream(str(p), vocab_size=256, max_len=21)
    assert str(e.value) == f"{p}:5: example 3 has 24 tokens (question 22 + reasoning 1 + answer 1), more than max_len 21"
    with pytest.raises(DataError) as e:
        ReasoningStream(str(p), vocab_size=150)
    assert str(e.value) == f"{p}:5: example 3 has token id 195, outside the model's vocab_size 150"


@pytest.mark.parametrize("name,params,n_train", [
    ("chain_arith", {}, 14_400),  # the defaults: 10 * 14^3 = 27,440 questions; 51% of the old eval rows were here
    ("chain_arith", {"steps": 1}, 2000),  # 140 questions
    ("chain_pointer", {"hops": 1, "nodes": 3}, 2000),  # 2 cycles * 3! orders * 3 queries = 36
])
def test_no_held_out_question_is_ever_a_training_question(name, params, n_train):
    """Eval reads a fixed held-out set of distinct questions that the training stream never draws: before, eval
    drew from another seed of the same space, and at chain_arith's defaults half of its questions were among the
    first 14,400 training ones (eval accuracy partly measured memorisation)."""
    s = ReasoningStream(name, vocab_size=32, seed=0, **params)
    n = s.n_eval()
    assert n is not None and n >= 1
    held = [e.question for e in s.eval_examples(range(n))]
    assert len(set(held)) == n
    train = {e.question for e in s.train_examples(range(n_train))}
    assert not set(held) & train and len(train) > 1
    assert s.eval_examples([n + 2]) == s.eval_examples([2])  # past the set: around again (the trainer caps)
    # a sample is redrawn from its own generator: the same whichever batch draws it
    assert s.train_examples(range(40, 50)) == [s.train_examples([i])[0] for i in range(40, 50)]


def test_a_small_question_space_is_said_and_one_too_small_is_refused():
    s = ReasoningStream("chain_arith", vocab_size=16, seed=0, steps=1)
    assert s.n_eval() == 35 and s.note == (
        "note: chain_arith at steps 1, modulus 10, ops '+*' has 140 distinct questions: 35 of them (25%) are held "
        "out for eval and never trained on (training draws from the rest)")
    assert ReasoningStream("chain_pointer", vocab_size=32, seed=0).note is None  # 7! * 8! * 8 questions
    with pytest.raises(TaskError, match=r"^chain_arith at steps 1, modulus 2, ops '\*' has 2 distinct questions: "
                                        r"too few"):
        ReasoningStream("chain_arith", vocab_size=16, steps=1, modulus=2, ops="*")


def test_a_task_stream_draws_its_held_out_set_at_the_first_batch(monkeypatch):
    """Opening a built-in task's stream draws no held-out example (as the next-token tasks' ``TaskStream``):
    a chain_pointer of 30,000 nodes (90,003-token questions) drew 4,096 of them, minutes and GBs of Python
    ints, before the one-line refusal that its examples exceed max_seq_len. The size, note and description
    come without drawing; the first batch draws the set once."""
    import hymba_plus.training.reasoning as rs

    drawn = []
    real = rs.heldout
    monkeypatch.setattr(rs, "heldout", lambda *a, **k: drawn.append(a) or real(*a, **k))
    with pytest.raises(TaskError, match=r"^chain_pointer: an example .* \(the model's max_seq_len\)"):
        ReasoningStream("chain_pointer", vocab_size=30_010, seed=0, max_len=2048, nodes=30_000)
    s = ReasoningStream("chain_arith", vocab_size=16, seed=0, steps=1)
    assert s.n_eval() == 35 and s.note is not None and "35 held out" in s.description and drawn == []
    s.train(range(4))
    s.eval(range(4))
    assert len(drawn) == 1
    with pytest.raises(TaskError, match="too few"):  # a space < 4 is still refused at once
        ReasoningStream("chain_arith", vocab_size=16, steps=1, modulus=2, ops="*")
