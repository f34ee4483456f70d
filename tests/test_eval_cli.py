"""``hymba eval CKPT`` (``cli/eval.py``): a checkpoint's held-out evaluation without training equals the
one its run logged at that step (same batches, same seed: ``training/trainer.evaluate_held_out`` is
both), for every objective of ``configs/*_tiny.yaml`` with an eval; text files and built-in tasks; the
refusals (one line, exit 2 for a flag, 1 for a checkpoint or data; nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hymba_plus.cli import main
from tests.test_checkpoint import recipe_file  # the tiny 2-layer recipe (vocab 32)

REPO = Path(__file__).resolve().parents[1]
TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def train(tmp: Path, recipe: str, out: str, *flags: str) -> Path:
    rc = main(["train", recipe, "--out", str(tmp / out), "--steps", "2", "--warmup", "1", "--eval-batches", "2",
               "--device", "cpu", "--no-progress", *flags])
    assert rc == 0
    return tmp / out


def logged_eval(out: Path) -> dict:
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {k: v for k, v in last.items() if k.startswith("eval_")}


def evaluate(capsys, ckpt: Path, *flags: str, tmp: Path) -> dict:
    capsys.readouterr()
    rc = main(["eval", str(ckpt), "--device", "cpu", "--json", str(tmp / "eval.json"), *flags])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp / "eval.json").read_text())
    assert "eval_loss" in captured.out and report["checkpoint"] in captured.out  # the table
    return report


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny next-token run on mqar and one on a text file (trained 2 steps, evaluated at the end)."""
    tmp = tmp_path_factory.mktemp("eval_runs")
    (tmp / "text.txt").write_text(TEXT)
    task = train(tmp, recipe_file(tmp), "task", "--batch-size", "2", "--seq-len", "16")
    text = train(tmp, str(REPO / "configs/gpt_tiny.yaml"), "text", "--batch-size", "2", "--seq-len", "32",
                 "--data", str(tmp / "text.txt"))
    return tmp, task, text


def test_eval_equals_the_runs_last_logged_eval_task_and_text(runs, capsys, tmp_path):
    tmp, task, text = runs
    r = evaluate(capsys, task, tmp=tmp_path)  # OUT itself: its newest step
    assert r["metrics"] == logged_eval(task) and set(r["metrics"]) == {"eval_loss", "eval_accuracy"}
    assert r["step"] == 2 and r["checkpoint"].endswith("step-2") and r["batches"] == 2 and r["rows"] == 4
    assert r["data"] == "mqar" and r["tokens"] == 4 * 16
    r = evaluate(capsys, text / "step-2", tmp=tmp_path)
    assert r["metrics"] == logged_eval(text) and set(r["metrics"]) == {"eval_loss", "eval_ppl"}
    assert r["scored"] == r["rows"] * 31 > 0  # every next-token target of each held-out window
    # the whole held-out split: every window once, as many as the run's split holds
    r = evaluate(capsys, text, "--batches", "all", tmp=tmp_path)
    assert r["rows"] == r["heldout_rows"] and r["split"].endswith("(all)")


def test_eval_of_a_text_model_on_a_built_in_task_and_other_settings(runs, capsys, tmp_path):
    tmp, task, text = runs
    r = evaluate(capsys, text, "--data", "mqar", "--seq-len", "16", "--batch-size", "3", "--batches", "1",
                 tmp=tmp_path)
    assert r["data"] == "mqar" and "eval_accuracy" in r["metrics"] and r["rows"] == 3 and r["seq_len"] == 16
    other = evaluate(capsys, text, "--data", "mqar", "--seq-len", "16", "--batch-size", "3", "--batches", "1",
                     "--seed", "5", tmp=tmp_path)
    assert other["seed"] == 5 and other["metrics"] != r["metrics"]  # other held-out samples


@pytest.mark.parametrize("config,flags", [
    ("bd_tiny", ["--batch-size", "2", "--seq-len", "16"]),
    ("forecast_tiny", ["--batch-size", "2"]),
    ("ladir_tiny", ["--batch-size", "2"]),
    ("mtp_tiny", ["--batch-size", "2", "--seq-len", "16"]),
    ("etd_tiny", ["--batch-size", "2", "--seq-len", "16"]),
])
def test_every_tiny_objective_evaluates_as_its_run_logged(config, flags, capsys, tmp_path):
    out = train(tmp_path, str(REPO / f"configs/{config}.yaml"), "run", *flags)
    r = evaluate(capsys, out, tmp=tmp_path)
    assert r["metrics"] == logged_eval(out) and r["rows"] > 0 and r["scored"] > 0
    if config == "bd_tiny":  # a --seq-len the objective cannot take (blocks of 4 tile each sequence): usage
        one_line(capsys, call(["eval", str(out), "--device", "cpu", "--seq-len", "18"]), 2, "block_size")
    if config == "forecast_tiny":  # (a series: no text, no field; hymba train refuses it too)
        one_line(capsys, call(["eval", str(out), "--device", "cpu", "--text-field", "v"]), 2,
                 "--text-field v: does not apply to objective forecast")
    if config == "ladir_tiny":  # (rows of question, reasoning, answer; hymba train refuses it too)
        one_line(capsys, call(["eval", str(out), "--device", "cpu", "--text-field", "v"]), 2,
                 "--text-field v: the objective ladir reads reasoning data")


def call(argv: list[str]) -> int:
    """``main(argv)``'s exit code, argparse's usage errors (SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def one_line(capsys, rc: int, code: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert rc == code, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err


def test_eval_refusals_are_one_line_and_write_nothing(runs, capsys, tmp_path):
    tmp, task, text = runs
    js = tmp_path / "r.json"
    cases = [
        ([str(tmp_path / "missing")], 1, "no such checkpoint folder"),
        ([str(task), "--data", str(tmp_path / "nope.txt")], 1, "no such file"),
        ([str(task), "--data", str(tmp / "text.txt")], 1, "vocab_size is 32"),  # bytes for a 32-token model
        ([str(task), "--batches", "0"], 2, "--batches"),
        ([str(task), "--seq-len", "0"], 2, "--seq-len 0"),
        ([str(task), "--seq-len", "4096"], 2, "--seq-len 4096"),  # past the model's max_seq_len
        ([str(task), "--device", "gpu"], 2, "gpu"),
        ([str(task), "--json", str(tmp_path)], 2, "--json"),
    ]
    for argv, code, needle in cases:
        rc = call(["eval", *argv, *(["--json", str(js)] if "--json" not in argv else [])])
        one_line(capsys, rc, code, needle)
        assert not js.exists()
    js.write_text("old")  # an existing file is left as it was by a refused run
    one_line(capsys, call(["eval", str(task), "--data", "nope", "--json", str(js)]), 1, "nope")
    assert js.read_text() == "old"
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "recipe.yaml").write_text("name: [")
    one_line(capsys, call(["eval", str(bad)]), 1, "model.safetensors: missing")
    shutil.copytree(task / "step-2", tmp_path / "ck")
    (tmp_path / "ck" / "trainer_state.json").write_text("{")  # a damaged training checkpoint
    one_line(capsys, call(["eval", str(tmp_path / "ck")]), 1, "trainer_state.json")


def test_eval_checks_the_kernel_settings_first(runs, capsys, monkeypatch):
    monkeypatch.setenv("HYMBA_KERNELS", "bogus")
    one_line(capsys, call(["eval", str(runs[1]), "--device", "cpu"]), 1, "HYMBA_KERNELS")


def test_eval_under_torchrun_is_refused(runs, capsys, monkeypatch):
    """One process evaluates (as ``hymba bench``): under torchrun every process ran the whole evaluation
    and printed it (and all wrote one --json); now one usage line, exit 2, before the checkpoint loads."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_line(capsys, call(["eval", str(runs[1]), "--device", "cpu"]), 2, "one process: run it without torchrun")


def test_eval_json_replaces_an_existing_file(runs, capsys, tmp_path):
    _, task, _ = runs
    (tmp_path / "eval.json").write_text("old")
    assert evaluate(capsys, task, tmp=tmp_path)["step"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".eval.json")]


def test_closed_pipe_ends_quietly_with_141(runs, tmp_path):
    """`hymba eval CKPT | head -0`: the reader is gone before the table is printed; the command ends as
    hymba check and hymba info do (exit 141, as if killed by SIGPIPE, nothing on stderr), not with
    'hymba eval: Broken pipe' and exit 1."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "hymba_plus", "eval", str(runs[1]), "--device", "cpu"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # long before the interpreter has imported torch
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 141, err
    assert err == ""


def test_a_multi_process_runs_eval_covers_every_process_batches(runs, capsys, tmp_path):
    """A run of W processes evaluated ``train.eval_batches`` batches on each (batch k of rank r: held-out rows
    from (k * W + r) * batch_size), W x eval_batches in all: hymba eval's default is all of them, the rows and
    the numbers that run logged. The 2-step task run (eval_batches 2, one process) evaluated exactly what a
    2-process run with eval_batches 1 would: its checkpoint, relabelled so, must give the same numbers."""
    _, task, _ = runs
    ck = tmp_path / "ck"
    shutil.copytree(task / "step-2", ck)
    state = json.loads((ck / "trainer_state.json").read_text())
    state["world_size"], state["train_config"]["eval_batches"] = 2, 1
    (ck / "trainer_state.json").write_text(json.dumps(state))
    r = evaluate(capsys, ck, tmp=tmp_path)
    assert r["batches"] == 2 and r["rows"] == 4 and r["metrics"] == logged_eval(task)
    assert evaluate(capsys, ck, "--batches", "1", tmp=tmp_path)["rows"] == 2  # a given count: batches, as asked
    state["world_size"] = 0  # a damaged state (read_state takes counts >= 0): one line naming file and key, exit 1
    (ck / "trainer_state.json").write_text(json.dumps(state))
    one_line(capsys, call(["eval", str(ck), "--device", "cpu"]), 1, "trainer_state.json: world_size 0")


def test_eval_text_field_reads_that_field_of_json_lines(capsys, tmp_path):
    """``hymba eval CKPT --data X.jsonl`` reads the checkpoint's ``train.text_field`` (unset: ``text``);
    ``--text-field NAME`` (``hymba train``'s and ``hymba prepare``'s flag) reads another: a file whose text is
    in another field was one line naming hymba prepare's / train's / tokenizer train's flag, none of eval's."""
    from tests.test_checkpoint import FAST

    docs = [f"document {i}: the quick brown fox jumps over the lazy dog." for i in range(40)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)))
    out = tmp_path / "run"
    assert main(["train", str(REPO / "configs/gpt_tiny.yaml"), "--data", str(tmp_path / "c.jsonl"), "--out", str(out),
                 *FAST, "--steps", "1", "--device", "cpu", "--text-field", "content"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    ck = out / "step-1"
    other = tmp_path / "b.jsonl"
    rc = call(["eval", str(ck), "--device", "cpu", "--data", str(other)])  # the checkpoint's field, not in b.jsonl
    err = capsys.readouterr().err
    one = err.strip()
    assert rc == 1 and len(one.splitlines()) == 1 and one.startswith("hymba eval: ") and "Traceback" not in err, err
    assert f'{other}:1: no "content" field' in one and "--text-field names the one to read" in one, err
    assert "hymba prepare" not in one and "hymba train" not in one, err
    r = evaluate(capsys, ck, "--data", str(other), "--text-field", "body", "--batches", "1", tmp=tmp_path)
    assert r["rows"] > 0 and r["metrics"]["eval_loss"] > 0
    # the same documents under the field the run read: the same windows, the same numbers
    same = evaluate(capsys, ck, "--data", str(tmp_path / "c.jsonl"), "--batches", "1", tmp=tmp_path)
    assert same["metrics"] == r["metrics"]
    assert evaluate(capsys, ck, "--data", str(tmp_path / "c.jsonl"), "--text-field", "content", "--batches", "1",
                    tmp=tmp_path)["metrics"] == r["metrics"]


def test_eval_text_field_is_refused_where_no_field_is_read(runs, capsys, tmp_path):
    """A built-in task reads no text (usage, as ``hymba train``'s); shards are tokens: the field must be the
    one they were made from (their index.json), as ``hymba train --data SHARDS`` (one input line); the
    harness (``--tasks``) brings its own data."""
    tmp, task, text = runs
    one_line(capsys, call(["eval", str(text), "--device", "cpu", "--data", "mqar", "--seq-len", "16",
                           "--text-field", "body"]), 2, "--text-field body: names the field of JSON Lines / Parquet "
             "text: the built-in task mqar reads no text")
    one_line(capsys, call(["eval", str(task), "--device", "cpu", "--text-field", "body"]), 2,
             "--text-field body: names the field")  # (the checkpoint's data: mqar)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": TEXT}) + "\n" for _ in range(4)))
    assert main(["prepare", str(tmp_path / "t.jsonl"), "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    one_line(capsys, call(["eval", str(text), "--device", "cpu", "--data", str(tmp_path / "s"), "--text-field",
                           "body"]), 1, 'token shards made from the field "text": --text-field body')
    assert evaluate(capsys, text, "--data", str(tmp_path / "s"), "--text-field", "text", "--batches", "1",
                    tmp=tmp_path)["rows"] > 0
    one_line(capsys, call(["eval", str(text), "--tasks", "x", "--text-field", "body"]), 2,
             "--text-field: a held-out evaluation flag")
