"""The k-hop pointer-chasing task (``khop``): layout, answers, determinism, validation and
``hymba train --data khop``. The other tasks are covered in tests/test_data.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus.cli import main
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.tasks import TASKS, TaskError

KHOP = TASKS["khop"]
TINY = {
    "name": "khop-tiny",
    "model": {"vocab_size": 64, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA"},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}


def decode(ids: list[int], labels: list[int], k: int) -> dict:
    """Checks one sample against the documented layout (following every query's pointers
    k times through the written pairs) and returns its parts."""
    sep = ids.index(2)
    assert sep % 3 == 0
    n = sep // 3
    src, dst, ends = ids[0:sep:3], ids[1:sep:3], ids[2:sep:3]
    assert ends == [1] * n
    nodes = set(range(3, n + 3))
    assert set(src) == nodes and set(dst) == nodes  # a permutation of the N node tokens
    f = dict(zip(src, dst))
    x, seen = src[0], set()  # ... and a single cycle through all of them
    while x not in seen:
        seen.add(x)
        x = f[x]
    assert seen == nodes
    tail = ids[sep + 1 :]
    queries, answers = tail[0 : 2 * n : 2], tail[1 : 2 * n : 2]
    assert sorted(queries) == sorted(nodes) and tail[2 * n :] == [0] * (len(tail) - 2 * n)
    for q, a in zip(queries, answers):
        want = q
        for _ in range(k):
            want = f[want]
        assert a == want != q
    scored = [i for i, y in enumerate(labels) if y != -100]
    assert scored == list(range(sep + 2, sep + 2 + 2 * n, 2))  # the answers, nothing else
    assert [labels[i] for i in scored] == answers
    return {"n": n, "queries": queries, "answers": answers}


def eliminating_guess(queries: list[int], answers: list[int], n: int) -> float:
    """Expected accuracy of guessing, without the graph, among the nodes that are neither
    the query nor an earlier answer."""
    total = 0.0
    for i, (q, a) in enumerate(zip(queries, answers)):
        left = set(range(3, n + 3)) - {q} - set(answers[:i])
        total += (a in left) / len(left)
    return total / len(queries)


@pytest.mark.parametrize("k, nodes, seq_len, vocab", [(1, None, 64, 40), (2, None, 64, 40), (3, 10, 56, 16),
                                                      (4, 9, 46, 12), (2, None, 200, 30)])
def test_khop_layout_answers_and_chance(k, nodes, seq_len, vocab):
    cfg = TrainConfig(seq_len=seq_len, khop_hops=k, khop_nodes=nodes)
    KHOP.validate(seq_len, vocab, cfg)
    ids, labels = KHOP.batch(range(200), seed=5, seq_len=seq_len, vocab=vocab, cfg=cfg)
    assert ids.shape == labels.shape == (200, seq_len) and ids.dtype == labels.dtype == torch.long
    assert int(ids.max()) < vocab
    parts = [decode(i, y, k) for i, y in zip(ids.tolist(), labels.tolist())]
    n = nodes if nodes is not None else min(vocab - 3, (seq_len - 1) // 5)
    assert {p["n"] for p in parts} == {n}
    # chance is what guessing with elimination scores on these very samples
    guess = sum(eliminating_guess(p["queries"], p["answers"], n) for p in parts) / len(parts)
    assert KHOP.chance(vocab, cfg) == pytest.approx(guess, abs=0.02)
    assert KHOP.chance(vocab, cfg) == pytest.approx((sum(1 / j for j in range(2, n + 1))) / (n - 1) + 1 / n)


def test_khop_is_deterministic_per_seed_and_index():
    cfg = TrainConfig(seq_len=64, khop_hops=3)
    ids, labels = KHOP.batch(range(100, 108), seed=7, seq_len=64, vocab=40, cfg=cfg)
    for i in [103, 100, 107]:  # one sample is one (seed, stream, index)
        one = KHOP.batch([i], seed=7, seq_len=64, vocab=40, cfg=cfg)
        assert torch.equal(one[0][0], ids[i - 100]) and torch.equal(one[1][0], labels[i - 100])
    assert torch.equal(KHOP.batch(range(100, 108), 7, 64, 40, cfg)[0], ids)
    assert not torch.equal(KHOP.batch(range(100, 108), 8, 64, 40, cfg)[0], ids)
    assert not torch.equal(KHOP.batch(range(100, 108), 7, 64, 40, cfg, stream=1)[0], ids)
    assert len({tuple(r) for r in ids.tolist()}) == 8
    # k changes the answers only: the graph and the queries stay
    k1, l1 = KHOP.batch(range(100, 108), 7, 64, 40, TrainConfig(seq_len=64, khop_hops=1))
    assert torch.equal(k1[labels == -100], ids[labels == -100]) and torch.equal(l1 != -100, labels != -100)
    assert not torch.equal(k1, ids)


@pytest.mark.parametrize("seq_len, vocab, k, nodes, needle", [
    (64, 7, 2, None, "khop with 2 hops needs model.vocab_size >= 8 (5 nodes + 3 specials), got 7"),
    (64, 40, 2, 38, "khop: khop_nodes (38) must be <= vocab_size - 3 (37)"),
    (64, 40, 3, 6, "khop with 3 hops needs >= 7 nodes, got 6"),
    (20, 40, 2, None, "needs >= 5 nodes, got 3 (the default min(vocab_size - 3, (seq_len - 1) / 5) at seq_len 20: "
                      "seq_len >= 26 holds enough)"),
    (64, 40, 2, 13, "khop with 13 nodes needs seq_len >= 66, got 64"),
])
def test_khop_validation_errors(seq_len, vocab, k, nodes, needle):
    cfg = TrainConfig(seq_len=seq_len, khop_hops=k, khop_nodes=nodes)
    with pytest.raises(TaskError) as e:
        KHOP.validate(seq_len, vocab, cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)
    KHOP.validate(64, 40, TrainConfig(seq_len=64, khop_hops=k, khop_nodes=12 if nodes else None))


def test_cli_trains_khop_and_reports_bad_settings(tmp_path: Path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    rc = main(["train", str(recipe), "--data", "khop", "--khop-hops", "3", "--khop-nodes", "7", "--out", str(out),
               "--steps", "3", "--batch-size", "2", "--seq-len", "40", "--warmup", "1", "--eval-every", "3",
               "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "task khop (k-hop pointer chasing" in cap.out + cap.err
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0.0 <= last["eval_accuracy"] <= 1.0
    state = json.loads((out / "step-3" / "trainer_state.json").read_text())
    assert state["train_config"]["khop_hops"] == 3 and state["train_config"]["khop_nodes"] == 7
    # settings the sequence cannot hold: one line naming the flag, exit 2, no output folder
    bad = tmp_path / "bad"
    rc = main(["train", str(recipe), "--data", "khop", "--khop-nodes", "7", "--seq-len", "32", "--out", str(bad),
               "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--data khop" in err and "seq_len >= 36" in err, err
    assert not bad.exists()
    rc = main(["train", str(recipe), "--data", "khop", "--khop-hops", "0", "--out", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--khop-hops 0" in err and not bad.exists(), err


@pytest.mark.parametrize("args, needle", [
    (["--data", "khop", "--mqar-pairs", "3"], "--mqar-pairs 3: a setting of the task mqar; this run trains on khop"),
    (["--copy-tokens", "3"], "--copy-tokens 3: a setting of the task selective_copy; this run trains on mqar "
                             "(the default data)"),
    (["--data", "parity", "--khop-nodes", "9", "--khop-hops", "3"], "--khop-hops 3: a setting of the task khop; "
                                                                     "this run trains on parity"),
    (["--data", "TEXT", "--chain-values", "5"], "--chain-values 5: a setting of the tasks chain_arith and "
                                                "chain_pointer; this run trains on TEXT"),
])
def test_a_task_flag_for_another_task_is_a_usage_error(tmp_path: Path, capsys, args, needle):
    """A task's flag given for a run on another task (or on text) was accepted and ignored: the run
    trained without the setting the researcher asked for. Now one line naming the flag and the task(s)
    that read it, exit 2, nothing written."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(TINY))
    text = tmp_path / "t.txt"
    text.write_text("some text to train on\n" * 50)
    args = [str(text) if a == "TEXT" else a for a in args]
    err = refused_train(tmp_path, capsys, recipe, [*args, "--seq-len", "40"])
    assert needle.replace("TEXT", str(text)) in err, err


def refused_train(tmp_path: Path, capsys, recipe: Path, args: list[str]) -> str:  # noqa: ANN001
    """``hymba train`` of one step that must be a usage error: exit 2, one line (returned), nothing written."""
    out = tmp_path / "run"
    rc = main(["train", str(recipe), *args, "--out", str(out), "--steps", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    return err


@pytest.mark.parametrize("recipe_name, args, needle", [
    (None, ["--val-frac", "0.2"], "--val-frac 0.2: the held-out fraction of text, shards or a reasoning file: the "
                                  "built-in task mqar (the default data) holds out a fixed set of its own examples"),
    (None, ["--data", "khop", "--val-frac", "0.1"], "--val-frac 0.1: the held-out fraction of text, shards or a "
                                                    "reasoning file: the built-in task khop holds out"),
    ("ladir_tiny.yaml", ["--data", "chain_pointer", "--val-frac", "0.2"], "--val-frac 0.2: the held-out fraction of "
     "text, shards or a reasoning file: the built-in task chain_pointer holds out"),
    ("ladir_tiny.yaml", ["--val-frac", "0.2"], "the built-in task chain_arith (the default data) holds out"),
    ("ladir_tiny.yaml", ["--data", "chain_arith", "--tokenizer", "TOK"], "--tokenizer TOK: encodes text (a file or "
     "folder, reasoning data): the built-in task chain_arith makes token ids of its own"),
])
def test_a_data_flag_for_a_built_in_task_is_a_usage_error(tmp_path: Path, capsys, recipe_name, args, needle):
    """--val-frac (held out of text, shards or a reasoning file) and --tokenizer (which encodes text) were
    accepted and ignored on a built-in task, which holds out a fixed set of its own examples and makes its own
    token ids (a reasoning task's stream even kept the given tokenizer as the checkpoint's, for ids it never
    made). Now one line naming the flag and why it has no effect, exit 2, nothing written."""
    if recipe_name is None:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(yaml.safe_dump(TINY))
        args = [*args, "--seq-len", "40"]
    else:
        recipe = Path(__file__).resolve().parents[1] / "configs" / recipe_name
    tok = tmp_path / "tok.json"  # (one the model's vocabulary can hold: only the task makes it pointless)
    tok.write_text(json.dumps({"hymba_tokenizer": "ids", "vocab_size": 32}))
    args = [str(tok) if a == "TOK" else a for a in args]
    err = refused_train(tmp_path, capsys, recipe, [*args, "--batch-size", "2"])
    assert needle.replace("TOK", str(tok)) in err, err
