"""The lm-evaluation-harness adapter (``training/harness.py``, model ``hymba``) and ``hymba eval --tasks``:
each request's number equals a direct computation from ``model(...)`` logits (left padding in a batch of
mixed lengths changes nothing, a context past ``max_seq_len`` is cut from the left), ``is_greedy``, the rolling
log-likelihood equals the full text's inside one window and the harness's disjoint windows past it,
generations cut at ``until`` and at EOS, the requests' order kept; ``simple_evaluate`` on the local tasks of
``tests/data/lmeval`` (a multiple-choice, a generation and a perplexity task, read without the network) end to
end; the CLI, its JSON and its refusals (one line, exit codes)."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from hymba_plus import build_model  # noqa: E402
from hymba_plus.cli import main  # noqa: E402
from hymba_plus.training.harness import HymbaLM, cut_at  # noqa: E402
from hymba_plus.training.tokenizer import ByteTokenizer  # noqa: E402

TASKS = Path(__file__).resolve().parent / "data" / "lmeval"
L = 24  # max_seq_len of the tiny model: texts of the tests cross it

#: attention + gated delta net, meta tokens (a prefix forward adds on top of max_seq_len)
RECIPE = {"name": "harness-tiny",
          "model": {"vocab_size": 256, "d_model": 32, "max_seq_len": L, "block_pattern": "GA | GD", "meta_tokens": 2},
          "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
                         "mlp": {"d_hidden": 64}}}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(RECIPE).eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory):
    """The model saved as a checkpoint with its (bytes) tokenizer, as ``hymba train`` writes one."""
    out = tmp_path_factory.mktemp("harness") / "ckpt"
    model.save_pretrained(out, extra_files={"tokenizer.json": ByteTokenizer().to_json()})
    return out


@pytest.fixture
def tasks(tmp_path):
    """The local task folder, copied (the harness imports its data module from beside the YAMLs)."""
    return Path(shutil.copytree(TASKS, tmp_path / "tasks"))


def lm_of(model, **kw) -> HymbaLM:
    return HymbaLM(model=model, tokenizer=ByteTokenizer(), **kw)


@torch.no_grad()
def direct(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """log P(cont | ctx) and greedy-ness from one unpadded forward of the last max_seq_len input tokens."""
    inp = (ctx + cont)[-(L + 1):][:-1]
    logp = model(torch.tensor([inp])).logits[0, -len(cont):].float().log_softmax(-1)
    tgt = torch.tensor(cont)
    return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())


def ll_requests(pairs):
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]


PAIRS = [("hello", " world"), ("a", "b"), ("the quick brown fox jumps over", " the lazy dog"),  # 42 bytes > L + 1
         ("Two plus two is", " four"), ("x", "yz"), ("The sky is", " blue")]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_loglikelihood_equals_direct_logits_per_request_in_mixed_batches(model, batch_size):
    lm = lm_of(model, batch_size=batch_size)
    got = lm.loglikelihood(ll_requests(PAIRS))
    for (ctx, cont), (lp, greedy) in zip(PAIRS, got):  # the requests' order, whatever the batches
        want_lp, want_greedy = direct(model, list(ctx.encode()), list(cont.encode()))
        assert lp == pytest.approx(want_lp, rel=1e-5, abs=1e-4) and greedy == want_greedy
    assert lm.truncated == 1  # the long pair: its context cut from the left


def test_is_greedy_and_a_context_truncated_from_the_left(model):
    lm = lm_of(model, batch_size=3)
    ctx = list(b"some context that is longer than the window")  # 43 tokens > L
    with torch.no_grad():
        g1 = int(model(torch.tensor([ctx[-L:]])).logits[0, -1].argmax())
        g2 = int(model(torch.tensor([(ctx + [g1])[-L:]])).logits[0, -1].argmax())
    other = (g2 + 1) % 256
    res = lm._loglikelihood_tokens([(None, ctx, [g1, g2]), (None, ctx, [g1, other]), (None, [1, 2], [3])])
    assert res[0][1] is True and res[1][1] is False
    assert res[0][0] == pytest.approx(direct(model, ctx, [g1, g2])[0], rel=1e-5)
    assert res[0][0] > res[1][0]
    # only the last max_seq_len input tokens are read: any earlier context gives the same number
    assert lm._loglikelihood_tokens([(None, [7] * 10 + ctx, [g1, g2])])[0][0] == pytest.approx(res[0][0], rel=1e-5)


def test_empty_context_scores_after_the_document_boundary(model):
    lm = lm_of(model)
    (lp, _), = lm.loglikelihood(ll_requests([("", "abc")]))
    assert lm.prefix_token_id == 10  # bytes without an end token: the line break between documents
    assert lp == pytest.approx(direct(model, [10], list(b"abc"))[0], rel=1e-5)
    lm_eos = lm_of(model, eos_token_id=3)
    assert lm_eos.prefix_token_id == 3


@torch.no_grad()
def full_nll(model, ids: list[int]) -> float:
    """-log P(ids[1:] | ids[0]) from one forward (ids within max_seq_len + 1)."""
    logp = model(torch.tensor([ids[:-1]])).logits[0].float().log_softmax(-1)
    return -float(logp.gather(-1, torch.tensor(ids[1:])[:, None]).sum())


def test_rolling_loglikelihood_is_the_full_text_nll_and_windows_past_max_seq_len(model):
    short = "A short line of text."  # 21 bytes <= L: one window
    long = "The quick brown fox jumps over the lazy dog, twice over."  # 56 bytes: three windows
    reqs = [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate([long, short])]
    got = lm_of(model, batch_size=2).loglikelihood_rolling(reqs)
    assert got == pytest.approx(lm_of(model, batch_size=1).loglikelihood_rolling(reqs), rel=1e-5)
    assert got[1] == pytest.approx(-full_nll(model, [10] + list(short.encode())), rel=1e-5)
    t = list(long.encode())
    # the harness's windows: the first scores t[:L] after the boundary token, each next one the next L tokens
    # after the one token before them, the last one with a full window of context
    want = -full_nll(model, [10] + t[:L])
    with torch.no_grad():
        for start in range(L, len(t), L):
            end = min(start + L, len(t))
            want += direct(model, t[end - L - 1:start], t[start:end])[0]
    assert got[0] == pytest.approx(want, rel=1e-5)


def gen_request(ctx, **kw):
    return Instance("generate_until", {}, (ctx, kw), 0)


@torch.no_grad()
def greedy_text(model, prompt: str, n: int) -> list[int]:
    out = model.generate(torch.tensor([list(prompt.encode())]), max_new_tokens=n)
    return out[0, len(prompt.encode()):].tolist()


def test_generate_until_cuts_at_until_and_eos_in_request_order(model):
    prompts = ["Q: 1+1=", "Hello there, how", "x"]
    toks = {p: greedy_text(model, p, 8) for p in prompts}
    texts = {p: ByteTokenizer().decode(t) for p, t in toks.items()}
    until = {p: texts[p][3] for p in prompts}  # a character the greedy text holds
    reqs = [gen_request(p, until=[until[p]], max_gen_toks=8, do_sample=False) for p in prompts]
    got = lm_of(model, batch_size=2).generate_until(reqs)
    assert got == [cut_at(texts[p], [until[p]]) for p in prompts]  # batched, left-padded, in the requests' order
    assert all(len(g) <= 3 for g in got)
    # no stop string: the whole budget; an end token cuts before it
    p = prompts[1]
    assert lm_of(model).generate_until([gen_request(p, until=[], max_gen_toks=8)]) == [texts[p]]
    eos = toks[p][4]
    want = ByteTokenizer().decode(toks[p][:toks[p].index(eos)])
    assert lm_of(model, eos_token_id=eos).generate_until([gen_request(p, max_gen_toks=8)]) == [want]


def test_generate_until_refuses_unsupported_settings_and_a_budget_past_max_seq_len(model):
    lm = lm_of(model)
    with pytest.raises(ValueError, match="unsupported generation settings num_beams"):
        lm.generate_until([gen_request("a", until=["\n"], num_beams=4)])
    with pytest.raises(ValueError, match=r"max_gen_toks 24 must be in 1\.\.23"):
        lm.generate_until([gen_request("a", max_gen_toks=L)])
    with pytest.raises(ValueError, match="longer than the model's max_seq_len"):
        lm._loglikelihood_tokens([(None, [1], list(range(L + 1)))])


def test_other_objectives_and_bad_model_arguments_are_refused(model):
    bd = build_model({**RECIPE, "objective": {"kind": "block_diffusion", "block_size": 4}})
    with pytest.raises(ValueError, match="objective block_diffusion: not a language model for lm-eval"):
        lm_of(bd)
    with pytest.raises(ValueError, match="batch_size 'auto'.*auto is not supported"):
        lm_of(model, batch_size="auto")
    with pytest.raises(ValueError, match="dtype 'float8'"):
        lm_of(model, dtype="float8")


def test_simple_evaluate_on_the_local_tasks_by_registered_name(ckpt, model, tasks):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(tasks), include_defaults=False)
    r = simple_evaluate(model="hymba", model_args=f"pretrained={ckpt},batch_size=3,device=cpu",
                        tasks=["hymba_tiny_mc", "hymba_tiny_gen", "hymba_tiny_ppl"], task_manager=tm,
                        log_samples=False)
    res = r["results"]
    assert res["hymba_tiny_mc"]["sample_len"] == 4 and 0 <= res["hymba_tiny_mc"]["acc,none"] <= 1
    assert res["hymba_tiny_gen"]["sample_len"] == 3 and "exact_match,none" in res["hymba_tiny_gen"]
    # bits per byte = -sum of the texts' rolling log-likelihoods / (their bytes x ln 2)
    rows = [json.loads(line)["text"] for line in (tasks / "tiny_ppl.jsonl").read_text().splitlines()]
    ll = lm_of(model).loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (t,), 0) for t in rows])
    want = -sum(ll) / (sum(len(t.encode()) for t in rows) * math.log(2))
    assert res["hymba_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(want, rel=1e-5)
    # multiple choice: accuracy is the share of questions whose label scores highest
    docs = [json.loads(line) for line in (tasks / "tiny_mc.jsonl").read_text().splitlines()]
    lm = lm_of(model)
    hits = [max(range(len(d["choices"])), key=lambda c: lm.loglikelihood(ll_requests(
        [(d["question"], " " + d["choices"][c])]))[0][0]) == d["label"] for d in docs]
    assert res["hymba_tiny_mc"]["acc,none"] == pytest.approx(sum(hits) / len(hits))


def test_hymba_eval_tasks_prints_the_table_and_writes_its_json(ckpt, tasks, tmp_path, capsys):
    out = tmp_path / "res" / "lmeval.json"
    rc = main(["eval", str(ckpt), "--tasks", "hymba_tiny_mc,hymba_tiny_gen", "--include-path", str(tasks),
               "--limit", "2", "--batch-size", "2", "--device", "cpu", "--json", str(out)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "hymba_tiny_mc" in cap.out and "acc" in cap.out and "exact_match" in cap.out  # the harness's table
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"hymba_tiny_mc", "hymba_tiny_gen"}
    assert data["results"]["hymba_tiny_mc"]["sample_len"] == 2 and data["hymba"]["checkpoint"] == str(ckpt)
    assert not list(out.parent.glob(".*tmp*"))  # written whole (cli.write_output)


def run(argv: list[str]) -> int:
    """``hymba ARGV``'s exit code (argparse's own errors exit through SystemExit)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def one_line(capsys, rc: int, want_rc: int, needle: str) -> None:
    err = capsys.readouterr().err
    assert rc == want_rc, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hymba eval")]
    assert "Traceback" not in err and len(lines) == 1 and needle in lines[0], err


@pytest.mark.parametrize("flags,needle", [
    (["--tasks", "hymba_tiny_mc", "--limit", "0"], "argument --limit: must be an integer >= 1 or a fraction"),
    (["--tasks", "hymba_tiny_mc", "--limit", "1.5"], "argument --limit: must be an integer >= 1 or a fraction"),
    (["--tasks", "hymba_tiny_mc", "--limit", "abc"], "argument --limit: 'abc'"),
    (["--tasks", "hymba_tiny_mc", "--num-fewshot", "-1"], "argument --num-fewshot: must be >= 0"),
    (["--tasks", "hymba_tiny_mc,", "--limit", "1"], "comma-separated task names, none empty"),
    (["--tasks", "hymba_tiny_mc", "--data", "mqar"], "--data: a held-out evaluation flag, not for --tasks"),
    (["--tasks", "hymba_tiny_mc", "--seq-len", "8"], "--seq-len: a held-out evaluation flag"),
    (["--limit", "2"], "--limit: only with --tasks"),
    (["--include-path", "."], "--include-path: only with --tasks"),
    (["--tasks", "hymba_tiny_mc", "--include-path", "no/such/dir"], "--include-path no/such/dir: not a folder"),
    (["--tasks", "no_such.yaml"], "--tasks no_such.yaml: no such task YAML file"),
])
def test_bad_flags_are_one_usage_line(ckpt, capsys, flags, needle):
    one_line(capsys, run(["eval", str(ckpt), "--device", "cpu", *flags]), 2, needle)


def test_an_unknown_task_is_one_usage_line(ckpt, tasks, capsys):
    rc = main(["eval", str(ckpt), "--device", "cpu", "--tasks", "hymba_tiny_mcq", "--include-path", str(tasks)])
    one_line(capsys, rc, 2, "--tasks hymba_tiny_mcq: unknown task (did you mean hymba_tiny_mc")


def test_without_lm_eval_tasks_says_how_to_install_it(ckpt, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval: ImportError
    rc = main(["eval", str(ckpt), "--device", "cpu", "--tasks", "hellaswag"])
    one_line(capsys, rc, 1, "pip install 'hymba_plus[eval]'")


def test_a_forecast_checkpoint_is_refused_in_one_line(tmp_path, capsys, tasks):
    f = build_model(str(Path(__file__).resolve().parents[1] / "configs" / "forecast_tiny.yaml"))
    f.save_pretrained(tmp_path / "f")
    rc = main(["eval", str(tmp_path / "f"), "--device", "cpu", "--tasks", "hymba_tiny_mc", "--include-path",
               str(tasks)])
    one_line(capsys, rc, 1, "objective forecast: not a language model for lm-eval (it reads numbers")


def test_a_tokenizers_checkpoint_reads_text_without_special_tokens_after_its_end_token(tmp_path):
    """A ``tokenizers`` tokenizer with a BOS template: requests are encoded as training encoded documents
    (no special tokens), and a text without context is scored after the end token (``</s>``)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, processors, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4,
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    torch.manual_seed(0)
    m = build_model(RECIPE).eval()
    m.save_pretrained(tmp_path / "ck", extra_files={"tokenizer.json": tok.to_str()})
    lm = HymbaLM(pretrained=str(tmp_path / "ck"), device="cpu", batch_size=2)
    ids = tok.encode("the lazy dog", add_special_tokens=False).ids
    assert lm.tok_encode("the lazy dog") == ids and tok.encode("the lazy dog").ids[0] == 1  # no <s>
    assert lm.prefix_token_id == 2  # </s>
    (lp,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("the lazy dog",), 0)])
    assert lp == pytest.approx(-full_nll(m, [2] + ids), rel=1e-5)


@pytest.mark.parametrize("old,new,needle", [
    ('doc_to_text: "{{question}}"', 'doc_to_text: "{{question"', "TemplateSyntaxError"),  # a broken Jinja template
    ("!function tiny_data.choices", "!function tiny_data.no_such", "has no function 'no_such'"),  # a missing function
])
def test_a_task_config_the_harness_cannot_load_is_one_input_line(ckpt, tasks, capsys, old, new, needle):
    """A task YAML that lm_eval fails to build (its template, its ``!function``) is bad input: one line naming
    the task and the harness's error (exit 1), not the traceback of lm_eval's loader."""
    y = tasks / "tiny_mc.yaml"
    y.write_text(y.read_text().replace(old, new))
    rc = run(["eval", str(ckpt), "--device", "cpu", "--tasks", "hymba_tiny_mc", "--include-path", str(tasks),
              "--limit", "1"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("hymba eval")]
    assert rc == 1 and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("hymba eval: --tasks hymba_tiny_mc: lm_eval could not load the task (") and needle in lines[0]


def test_an_lm_eval_older_than_the_adapter_reads_is_one_line_naming_the_version(ckpt, capsys, monkeypatch):
    """lm_eval before 0.4.12 lacks what the adapter reads (``lm_eval.tasks._yaml_loader``, ``TaskManager.load``;
    0.4.9 also ``normalize_gen_kwargs``): ``--tasks`` says which version it needs, not "not installed" (0.4.9) or
    an import traceback (0.4.10, 0.4.11); the extras require that version."""
    import tomllib

    from hymba_plus.cli import eval as eval_cli

    monkeypatch.setattr(eval_cli, "_lm_eval_version", lambda: "0.4.9.2")
    rc = main(["eval", str(ckpt), "--device", "cpu", "--tasks", "hellaswag"])
    one_line(capsys, rc, 1, f"--tasks needs lm_eval>={eval_cli.LM_EVAL_MIN} (this is lm_eval 0.4.9.2)")
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    for extra in ("eval", "dev"):
        assert f"lm_eval>={eval_cli.LM_EVAL_MIN}" in extras[extra], extra


def test_do_sample_without_a_temperature_samples_at_one(model):
    """``do_sample: true`` with no temperature decoded greedily (the temperature read as 0); HF's generate
    (the harness's reference model) samples at its default temperature 1.0. An explicit 0 stays greedy, and
    without do_sample the harness's rule holds (greedy unless a temperature > 0 turns sampling on)."""
    lm = lm_of(model)

    def temperature(**kw) -> float:
        return lm._gen_settings({"max_gen_toks": 8, **kw})["temperature"]

    assert temperature(do_sample=True, until=["\n"]) == 1.0
    assert temperature(do_sample=True, temperature=0.0) == 0.0
    assert temperature(do_sample=True, temperature=0.7) == 0.7
    assert temperature(temperature=0.7) == 0.7
    assert temperature(do_sample=False, temperature=0.7) == 0.0
    assert temperature() == 0.0
