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
    ("--route-beam", "1000000000", "--route-beam must be in 1 .. 64"),
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
    big.write_text(Path(GPT).read_text().replace("vocab_size: 256", "vocab_size: 100000000000000"))
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
    err = _one_line_error(capsys, main(["generate", str(ck), "--mode", "forecast", "--data", str(csv), "--out", out]))
    assert "expected a file name" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DIR"] and not any((tmp_path / "DIR").iterdir())


def test_forecast_refuses_values_float32_cannot_hold(forecaster, tmp_path, capsys) -> None:
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


@pytest.mark.parametrize("flag", [["--prompt", "x"], ["--think-iterations", "2"], ["--top-k", "3"]])
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
    for src in (data, data / "a.txt"):
        err = _one_line_error(capsys, main(["prepare", str(src), "--out", str(data), "--force"]))
        assert "holds the data" in err
    assert [p.name for p in data.iterdir()] == ["a.txt"]


def test_forecast_out_is_never_the_data_file(forecaster, tmp_path, capsys) -> None:
    ck, csv = forecaster
    data = tmp_path / "s.csv"
    shutil.copy(csv, data)
    err = _one_line_error(capsys, main(["generate", str(ck), "--mode", "forecast", "--data", str(data), "--out",
                                        str(data)]))
    assert "is the --data file itself" in err and data.read_text() == csv.read_text()


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
