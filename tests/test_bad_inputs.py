"""Bad command-line input found by a fuzzing pass over the CLI (2026-12-05): each is one line on
stderr, a non-zero exit, no traceback and nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hymba_plus.cli import main
from hymba_plus.core.config import brief

ROOT = Path(__file__).resolve().parents[1]
GPT = str(ROOT / "configs" / "gpt_tiny.yaml")
FAST = ["--steps", "1", "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--no-progress"]


def _one_line_error(capsys, rc: int) -> str:  # noqa: ANN001
    assert rc != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("ck") / "run"
    assert main(["train", GPT, "--out", str(out), *FAST]) == 0
    return out / "step-1"


@pytest.mark.parametrize("flag,value,says", [
    ("--seed", "-1", "must be in 0 .. 4294967295"), ("--seed", str(2**64), "must be in 0 .. 4294967295"),
    ("--lr", "nan", "must be a finite number"), ("--grad-clip", "nan", "must be a finite number"),
    ("--val-frac", "nan", "must be a finite number"), ("--time-limit", "inf", "must be a finite number"),
    ("--device", "bogus", "expected auto, cpu, cuda or cuda:N"), ("--device", "meta", "expected auto, cpu"),
    ("--batch-size", "1000000000", "must be <= 1048576"), ("--grad-accum", "1000000000000", "must be <= 65536"),
    ("--eval-batches", "1000000000000", "must be <= 1048576"), ("--steps", str(10**17), "must be <= 1099511627776"),
    ("--route-beam", "1000000000", "--route-beam 1000000000: must be in 1 .. 64"),
])
def test_train_flags(tmp_path, capsys, flag, value, says) -> None:
    """Out-of-range values are refused before anything is built or written (argparse's usage
    errors, exit 2, for the flags' types; one line from hymba train for the rest)."""
    out = tmp_path / "o"
    assert _exit_code(["train", GPT, "--out", str(out), *FAST, f"{flag}={value}"]) != 0
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not out.exists()


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse's usage error
        return int(e.code)


@pytest.mark.parametrize("args,says", [
    (["--temperature", "nan"], "must be a finite number"), (["--seed", "99999999999999999999"], "must be in 0 .."),
    (["--device", "mps"], "expected auto, cpu, cuda or cuda:N"),
])
def test_generate_flags(ckpt, capsys, args, says) -> None:
    assert _exit_code(["generate", str(ckpt), "--prompt", "1 2 3", "--max-new-tokens", "2", *args]) != 0
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err


def test_generate_says_when_a_checkpoint_has_no_tokenizer(ckpt, tmp_path, capsys) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(ckpt, bare)
    (bare / "tokenizer.json").unlink()
    assert main(["generate", str(bare), "--prompt", "ab", "--max-new-tokens", "1", "--temperature", "0"]) == 0
    assert f"{bare}: no tokenizer.json: the prompt is read as UTF-8 bytes" in capsys.readouterr().err


@pytest.mark.parametrize("edit,says", [
    ({"samples": -1}, "samples: expected a count"), ({"version": 99}, "version 99: this hymba reads version 1"),
    ({"step": -5}, "step -5 does not match the folder step-1"), ({"step": 10**9}, "does not match the folder"),
    ({"schedule": "x"}, "schedule: expected a mapping"),
])
def test_resume_refuses_an_inconsistent_trainer_state(ckpt, tmp_path, capsys, edit, says) -> None:
    out = tmp_path / "run"
    shutil.copytree(ckpt.parent, out)
    p = out / "step-1" / "trainer_state.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), **edit}))
    before = sorted(x.name for x in out.iterdir())
    err = _one_line_error(capsys, main(["train", GPT, "--out", str(out), *FAST[2:], "--steps", "2", "--resume"]))
    assert says in err
    assert sorted(x.name for x in out.iterdir()) == before  # no metrics, no new checkpoint


def test_a_model_too_large_to_build_is_one_line(tmp_path, capsys) -> None:
    big = tmp_path / "big.yaml"
    big.write_text(Path(GPT).read_text().replace("vocab_size: 256", "vocab_size: 2000000000"))
    err = _one_line_error(capsys, main(["train", str(big), "--out", str(tmp_path / "o"), *FAST]))
    assert "the model cannot be built here" in err and not (tmp_path / "o").exists()


def test_prepare_refuses_a_shard_larger_than_memory_allows(tmp_path, capsys) -> None:
    (tmp_path / "t.txt").write_text("some text\n")
    out = tmp_path / "p"
    err = _one_line_error(capsys, main(["prepare", str(tmp_path / "t.txt"), "--out", str(out),
                                        "--shard-tokens", str(10**20)]))
    assert "--shard-tokens" in err and "must be in 1 .." in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]


def test_an_error_quotes_a_value_not_a_whole_file(tmp_path, capsys) -> None:
    prose = tmp_path / "prose.yaml"
    prose.write_text("hello world, this is prose and not a recipe. " * 200)
    err = _one_line_error(capsys, main(["check", str(prose)]))
    assert len(err) < 300 and "... (8999 characters)" in err  # YAML drops the trailing space
    assert brief("x" * 10) == repr("x" * 10) and len(brief("x" * 1000)) < 80


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory) -> tuple[Path, Path]:  # noqa: ANN001
    d = tmp_path_factory.mktemp("fc")
    assert main(["train", str(ROOT / "configs" / "forecast_tiny.yaml"), "--out", str(d / "run"), "--steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    csv = d / "good.csv"
    csv.write_text("t,a\n" + "".join(f"{i},{(i % 7) / 7:.3f}\n" for i in range(400)))
    return d / "run" / "step-1", csv


@pytest.mark.parametrize("out", ["/", ".", "", "DIR"])
def test_forecast_out_must_name_a_file(forecaster, tmp_path, capsys, monkeypatch, out) -> None:
    ck, csv = forecaster
    monkeypatch.chdir(tmp_path)
    (tmp_path / "DIR").mkdir()
    err = _one_line_error(capsys, _exit_code(["generate", str(ck), "--mode", "forecast", "--data", str(csv),
                                              "--out", out]))
    assert ("an empty path" if out == "" else "expected a file name") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR"] and not any((tmp_path / "DIR").iterdir())


def test_forecast_refuses_values_beyond_its_bound(forecaster, tmp_path, capsys) -> None:
    ck, _ = forecaster
    huge = tmp_path / "huge.csv"
    huge.write_text("t,a\n" + "".join(f"{i},1e308\n" for i in range(400)))
    err = _one_line_error(capsys, main(["generate", str(ck), "--mode", "forecast", "--data", str(huge),
                                        "--out", str(tmp_path / "f.csv")]))
    assert "huge.csv:2: column 'a' (2): '1e308' is beyond +-1e+15" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["huge.csv"]


@pytest.mark.parametrize("resume", [[], ["--resume"], ["--resume", "auto"]])
def test_a_checkpoint_without_its_state_is_not_written_over(ckpt, tmp_path, capsys, resume) -> None:
    """A step folder whose trainer_state.json was removed is neither resumed nor replaced by a fresh
    run (which would also rewrite the run's metrics)."""
    out = tmp_path / "run"
    shutil.copytree(ckpt.parent, out)
    (out / "step-1" / "trainer_state.json").unlink()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    err = _one_line_error(capsys, main(["train", GPT, "--out", str(out), *FAST, *resume]))
    assert "step-1 has no trainer_state.json" in err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before


@pytest.mark.parametrize("flag", [["--prompt", "x"], ["--think-iterations", "2"], ["--top-k", "3"],
                                  ["--temperature", "0.5"]])  # (a temperature was accepted and ignored)
def test_forecast_refuses_the_token_modes_flags(forecaster, tmp_path, capsys, flag) -> None:
    ck, csv = forecaster
    err = _one_line_error(capsys, main(["generate", str(ck), "--mode", "forecast", "--data", str(csv),
                                        "--out", str(tmp_path / "f.csv"), *flag]))
    assert err.endswith(f"{flag[0]}: not for --mode forecast (it reads --data; --horizon sets the length)")
    assert not any(tmp_path.iterdir())


def test_prepare_never_replaces_the_folder_it_reads(tmp_path, capsys) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "a.txt").write_text("some text to tokenize\n")
    for src in (data, data / "a.txt"):  # arguments that do not go together: exit 2, as generate's --out (was 1)
        rc = main(["prepare", str(src), "--out", str(data), "--force"])
        err = _one_line_error(capsys, rc)
        assert rc == 2 and "holds the data" in err
    assert [p.name for p in data.iterdir()] == ["a.txt"]


def test_forecast_out_is_never_the_data_file(forecaster, tmp_path, capsys) -> None:
    ck, csv = forecaster
    data = tmp_path / "s.csv"
    shutil.copy(csv, data)
    rc = main(["generate", str(ck), "--mode", "forecast", "--data", str(data), "--out", str(data)])
    err = _one_line_error(capsys, rc)
    assert rc == 2 and "is the --data file itself" in err and data.read_text() == csv.read_text()


def test_a_path_the_system_refuses_is_one_line(tmp_path, capsys) -> None:
    long = tmp_path / ("x" * 300)
    err = _one_line_error(capsys, main(["train", GPT, "--out", str(long), *FAST]))
    assert err.endswith("File name too long") and "(" in err and len(err) < 200


def test_sampling_survives_tiny_temperatures_and_nuclei() -> None:
    """A temperature or top_p below float32's range samples the top token (was nan: multinomial failed)."""
    import torch

    from hymba_plus.models.generation import filtered_probs

    logits = torch.tensor([[0.0, 2.0, 1.0], [5.0, -1.0, 5.5]])
    for t, p in ((1e-308, None), (0.8, 1e-300), (1e-40, 1e-300)):
        probs = filtered_probs(logits, t, top_p=p)
        assert torch.isfinite(probs).all() and torch.equal(probs.argmax(-1), torch.tensor([1, 2]))
        assert torch.allclose(probs.max(-1).values, torch.ones(2))
    assert torch.allclose(filtered_probs(logits, 0.8), (logits / 0.8).softmax(-1))  # unchanged at usual settings


def test_non_finite_weights_and_bad_utf8_prompts_are_one_line(ckpt, tmp_path, capsys) -> None:
    import torch

    from hymba_plus import from_pretrained
    from hymba_plus.training.tokenizer import ByteTokenizer, TokenizerError

    model = from_pretrained(ckpt)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.save_pretrained(tmp_path / "nan")
    err = _one_line_error(capsys, main(["generate", str(tmp_path / "nan"), "--prompt", "1 2", "--max-new-tokens", "2"]))
    assert "next-token probabilities are not finite" in err
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        ByteTokenizer().encode("a\udcffb")


def test_ladir_leaves_room_for_its_memory_slots(tmp_path, capsys) -> None:
    """The default length of --mode ladir counts the memory slots (the documented command failed),
    and the limit it names is the one that holds."""
    from hymba_plus import build_model

    model = build_model(ROOT / "configs" / "ladir_tiny.yaml")
    model.save_pretrained(tmp_path / "ld")
    prompt = ["--prompt", "7 3 9 4 6 3 5 2"]
    assert main(["generate", str(tmp_path / "ld"), "--mode", "ladir", *prompt, "--temperature", "0"]) == 0
    capsys.readouterr()
    err = _one_line_error(capsys, main(["generate", str(tmp_path / "ld"), "--mode", "ladir", *prompt,
                                        "--max-new-tokens", "54"]))
    assert err.endswith("max_seq_len (64 less 3 for --mode ladir); use at most 53")


@pytest.mark.parametrize("key,value,says", [
    ("channels", 10**9, "objective.channels: must be <= 16384, got 1000000000"),
    ("horizon", 10**12, "objective.horizon: must be <= 65536, got 1000000000000"),
    ("context", 10**12, "objective.context: must be <= 65536, got 1000000000000"),
    ("patch", 10**12, "objective.patch: must be <= 65536, got 1000000000000"),
    ("season", 10**11, "objective.season: must be <= 65536, got 100000000000"),
])
def test_forecast_sizes_have_bounds(tmp_path, capsys, key, value, says) -> None:
    """channels: 1e9 or horizon: 1e12 passed the recipe check and failed allocating in training."""
    lines = (ROOT / "configs" / "forecast_tiny.yaml").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith(("objective:", "quantiles:"))
              and f" {key}: " in line)
    old = lines[at].split(f" {key}: ", 1)[1].split(",", 1)[0].split("}", 1)[0]
    lines[at] = lines[at].replace(f" {key}: {old}", f" {key}: {value}", 1)
    recipe = tmp_path / "fc.yaml"
    recipe.write_text("\n".join(lines) + "\n")
    for build in ([], ["--no-build"]):
        assert _one_line_error(capsys, main(["check", *build, str(recipe)])) == f"{recipe}:{at + 1}: {says}"


def test_synthetic_series_too_large_to_generate_is_one_line(tmp_path, capsys) -> None:
    text = (ROOT / "configs" / "forecast_tiny.yaml").read_text()
    recipe = tmp_path / "wide.yaml"
    recipe.write_text(text.replace("horizon: 24, patch: 8, channels: 1,", "horizon: 60000, patch: 8, channels: 1000,"))
    out = tmp_path / "o"
    err = _one_line_error(capsys, main(["train", str(recipe), "--out", str(out), "--steps", "1", "--batch-size", "2",
                                        "--device", "cpu", "--no-progress"]))
    assert "synthetic: 1000 channels x 720384 steps" in err and "train on a --data CSV" in err
    assert not out.exists()


def _shards(tmp_path: Path) -> Path:
    (tmp_path / "t.txt").write_text("some text to tokenize, over and over again\n" * 60)
    assert main(["prepare", str(tmp_path / "t.txt"), "--out", str(tmp_path / "sh")]) == 0
    return tmp_path / "sh"


def test_prepare_records_the_largest_id_and_train_refuses_it_at_startup(tmp_path, capsys) -> None:
    sh = _shards(tmp_path)
    index = json.loads((sh / "index.json").read_text())
    assert index["max_id"] == max(b"some text to tokenize, over and over again\n")
    (sh / "index.json").write_text(json.dumps({**index, "max_id": 300}))
    out = tmp_path / "o"
    capsys.readouterr()
    err = _one_line_error(capsys, main(["train", GPT, "--data", str(sh), "--out", str(out), *FAST]))
    assert err.endswith(f"{sh}: holds token id 300 (index.json's max_id) but the model's vocab_size is 256")
    assert not out.exists()


@pytest.mark.parametrize("max_id", ["old", "stale"])
def test_shards_with_ids_past_the_vocabulary_are_one_line(tmp_path, capsys, max_id) -> None:
    """Shards from an older prepare (no max_id) or changed since: each batch is checked on the CPU
    (was: torch's IndexError at the first forward)."""
    import numpy as np

    sh = _shards(tmp_path)
    index = json.loads((sh / "index.json").read_text())
    if max_id == "old":
        del index["max_id"]
        (sh / "index.json").write_text(json.dumps(index))
    shard = sh / "shard-00000.bin"
    a = np.fromfile(shard, dtype=np.uint16)
    a[::7] = 300
    a.tofile(shard)
    capsys.readouterr()
    err = _one_line_error(capsys, main(["train", GPT, "--data", str(sh), "--out", str(tmp_path / "o"), *FAST]))
    assert err.startswith(f"hymba train: {shard}: token id 300 (window ") and "vocab_size 256" in err
    assert not (tmp_path / "o" / "step-1").exists()


def test_ladir_train_refuses_a_tokenizer_larger_than_the_vocabulary(tmp_path, capsys) -> None:
    """Was: training ran, and only `hymba generate` refused the checkpoint's tokenizer.json."""
    pytest.importorskip("tokenizers")
    from tests.hf_models import word_tokenizer

    word_tokenizer(tmp_path / "tok.json", 100)
    data = tmp_path / "r.jsonl"  # (a reasoning file: a built-in task makes its own ids, and refuses --tokenizer)
    data.write_text("".join(json.dumps({"question": f"q{i}", "reasoning": "r", "answer": "a"}) + "\n"
                            for i in range(20)))
    out = tmp_path / "o"
    err = _one_line_error(capsys, main(["train", str(ROOT / "configs" / "ladir_tiny.yaml"), "--data", str(data),
                                        "--tokenizer", str(tmp_path / "tok.json"), "--out", str(out), *FAST[:4], *FAST[6:]]))
    assert err.endswith(f"--tokenizer {tmp_path / 'tok.json'}: 100 tokens but the model's vocab_size is 32")
    assert not out.exists()


def test_a_pattern_of_more_than_4096_layers_is_refused_without_building(tmp_path, capsys) -> None:
    recipe = tmp_path / "deep.yaml"
    text = Path(GPT).read_text()
    old = next(line for line in text.splitlines() if "block_pattern:" in line)
    line_no = text.splitlines().index(old) + 1
    recipe.write_text(text.replace(old, '  block_pattern: "(GA)*4096 | (GA)*4096 | (GA)*4096"'))
    err = _one_line_error(capsys, main(["check", "--no-build", str(recipe)]))
    assert err == f"{recipe}:{line_no}: model.block_pattern: pattern expands to more than 4096 layers at column 13"


@pytest.mark.parametrize("argv", [
    ["train", GPT, "--mode", "x" * 3000], ["train", GPT, "--device", "x" * 3000, *FAST[:-3]],
    ["train", GPT, "--device=" + "x" * 3000, *FAST[:-3]], ["train", GPT, "--steps", "x" * 3000],
    ["train", GPT, "y" * 3000], ["x" * 3000], ["generate", "CKPT", "--engine", "x" * 3000],
])
def test_a_long_bad_value_is_not_echoed_in_full(tmp_path, capsys, argv) -> None:
    assert _exit_code([*argv, "--out", str(tmp_path / "o")] if argv[0] == "train" else argv) != 0
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(3000 characters)" in err and len(err) < 300 and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_generate_shortens_a_long_mode_and_device(ckpt, capsys) -> None:
    for flag in ("--mode", "--device"):
        err = _one_line_error(capsys, _exit_code(["generate", str(ckpt), "--prompt", "1 2", flag, "x" * 3000]))
        assert f"{flag}" in err and "(3000 characters)" in err and len(err) < 300


def test_a_fresh_run_moves_an_earlier_runs_metrics_aside(tmp_path, capsys) -> None:
    """An --out without a checkpoint but with the metrics and plot of a run that failed: a fresh
    run moves them aside (numbered, with one line saying so) instead of replacing them."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    (out / "loss.png").write_bytes(b"old plot")
    (out / "metrics.jsonl.1").write_text("older\n")  # taken: the next free number is used
    assert main(["train", GPT, "--out", str(out), *FAST]) == 0
    said = capsys.readouterr()
    assert (f"--out {out}: an earlier run's metrics.jsonl and loss.png (no checkpoint) moved aside to "
            "metrics.jsonl.2 and loss.png.2") in said.err + said.out
    assert (out / "metrics.jsonl.2").read_text() == '{"step": 1, "loss": 3.0}\n'
    assert (out / "loss.png.2").read_bytes() == b"old plot" and (out / "metrics.jsonl.1").read_text() == "older\n"
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1  # the new run's
    assert (out / "step-1").is_dir()


def test_an_empty_metrics_file_is_simply_replaced(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("")
    assert main(["train", GPT, "--out", str(out), *FAST]) == 0
    assert "moved aside" not in "".join(capsys.readouterr())
    assert not list(out.glob("*.1"))


@pytest.mark.parametrize("argv,says", [
    (["train", GPT, "--mode", "turbo"], "hymba train: argument --mode: invalid choice: 'turbo'"),
    (["train", GPT, "--steps", "1.5"], "hymba train: argument --steps: invalid int value: '1.5'"),
    (["prepare", "notes.txt"], "hymba prepare: the following arguments are required: --out"),
    (["generate", "CKPT", "--max-new-tokens", "abc"], "hymba generate: argument --max-new-tokens: invalid int"),
    (["train", GPT, "--out", ""], "hymba train: argument --out: an empty path"),
    (["prepare", "notes.txt", "--out", " "], "hymba prepare: argument --out: an empty path"),
    (["info", ""], "hymba info: argument RECIPE: an empty path"),
    (["check", ""], "hymba check: argument PATH: an empty path"),  # was the current folder, recursively
    (["convert", "a", "b", "--hybridize", ""], "hymba convert: argument --hybridize: an empty path"),
])
def test_usage_errors_are_one_line(tmp_path, capsys, monkeypatch, argv, says) -> None:
    """argparse's own errors (types, choices, required flags) are one line too, not the usage block
    first, exit 2; an empty path is refused (``--out ""`` would otherwise mean runs/NAME)."""
    monkeypatch.chdir(tmp_path)
    assert _exit_code(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(says) and err[0].endswith("--help lists the flags)")
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_a_binary_file_it_is_given(tmp_path, capsys) -> None:
    """A folder's binary files are skipped; one named on the command line is refused, not tokenized."""
    data = tmp_path / "blob.txt"
    data.write_bytes(b"text\0\1\2" * 100)
    err = _one_line_error(capsys, main(["prepare", str(data), "--out", str(tmp_path / "o")]))
    assert err.endswith(f"{data}: a binary file (a NUL byte in its first 8 KiB), not text")
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_with_integer_weights_is_refused(ckpt, tmp_path, capsys) -> None:
    """Weights stored as integers (right names and shapes) would load through load_state_dict's cast."""
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "ints"
    shutil.copytree(ckpt, bad)
    state = load_file(str(bad / "model.safetensors"))
    save_file({k: v.long() for k, v in state.items()}, str(bad / "model.safetensors"))
    err = _one_line_error(capsys, main(["generate", str(bad), "--prompt", "1 2", "--max-new-tokens", "2"]))
    assert f"{bad / 'model.safetensors'}: does not match recipe.yaml (dtype mismatch [" in err
    assert "torch.int64 for torch.float32" in err
