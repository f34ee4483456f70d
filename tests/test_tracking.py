"""``hymba train --log-to`` (training/tracking.py): TensorBoard event files (and W&B's offline files)
that hold metrics.jsonl's rows: the same names (grouped: train/..., eval/..., moe/...), steps and
values; a resume after an interrupt or a lost tail continues ``OUT/tb`` without a step twice; bad
values and a missing package are one line before the run starts."""

from __future__ import annotations

import json
import math
import struct
import time
from pathlib import Path

import pytest

from hymba_plus.cli import main
from hymba_plus.training import checkpoint as ckpt_mod
from hymba_plus.training.tracking import scalars
from tests.test_checkpoint import FAST, recipe_file
from tests.test_train_cli import signal_in_step

pytest.importorskip("tensorboard")


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def f32(v: float) -> float:
    """``v`` as TensorBoard keeps a scalar (float32 ``simple_value``)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def tb_scalars(out: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of ``OUT/tb`` as TensorBoard reads it (purged steps hidden): tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def expected(out: Path) -> dict[str, list[tuple[int, float]]]:
    want: dict[str, list[tuple[int, float]]] = {}
    for row in rows(out):
        for tag, v in scalars(row).items():
            want.setdefault(tag, []).append((row["step"], f32(v)))
    return want


def same(got: dict, want: dict) -> bool:
    if set(got) != set(want):
        return False
    return all(len(got[t]) == len(want[t]) and all(
        s == s2 and (v == v2 or math.isnan(v) and math.isnan(v2)) for (s, v), (s2, v2) in zip(got[t], want[t]))
        for t in want)


def test_scalars_group_a_rows_numbers_under_the_names_they_are_logged_with():
    row = {"step": 3, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 100.0, "tokens": 96, "mode": "eager",
           "eval_loss": 2.4, "eval_accuracy": float("nan"), "moe/1/entropy": 1.2, "moe/1/tokens_per_expert": [3.0, 5.0],
           "etd/layer_applications": 4.0, "flag": True}
    assert scalars(row) == {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5, "train/tokens_per_s": 100.0,
                            "train/tokens": 96.0, "eval/loss": 2.4, "eval/accuracy": pytest.approx(float("nan"),
                                                                                                     nan_ok=True),
                            "moe/1/entropy": 1.2, "moe/1/tokens_per_expert/0": 3.0, "moe/1/tokens_per_expert/1": 5.0,
                            "etd/layer_applications": 4.0}


def test_a_tensorboard_run_logs_every_row_of_metrics_jsonl_with_its_names_steps_and_values(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "6", "--eval-every", "3", "--save-every", "4",
               "--out", str(out), "--log-to", "tensorboard"])
    assert rc == 0, capsys.readouterr().err
    got, want = tb_scalars(out), expected(out)
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "eval/loss", "eval/accuracy"} <= set(got)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in got["eval/loss"]] == [3, 6]
    assert same(got, want), (got, want)
    # the run's settings, once, as text and as TensorBoard hparams
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    assert any(t.startswith("config") for t in acc.Tags()["tensors"]), acc.Tags()
    text = next(e for t in acc.Tags()["tensors"] if t.startswith("config") for e in acc.Tensors(t))
    assert b"recipe_hash" in text.tensor_proto.string_val[0] and b"steps: 6" in text.tensor_proto.string_val[0]
    assert {"_hparams_/experiment", "_hparams_/session_start_info"} <= set(acc.PluginTagToContent("hparams"))


def test_moe_routing_statistics_are_logged_one_scalar_per_expert(tmp_path, capsys):
    out = tmp_path / "run"
    rec = str(Path(__file__).resolve().parents[1] / "configs" / "quad_hybrid_tiny.yaml")
    rc = main(["train", rec, *FAST, "--steps", "2", "--out", str(out), "--log-to", "tensorboard"])
    assert rc == 0, capsys.readouterr().err
    got, row = tb_scalars(out), rows(out)[0]
    loads = next(k for k in row if k.endswith("/tokens_per_expert"))
    assert [got[f"{loads}/{i}"][0] for i in range(len(row[loads]))] == [(1, f32(v)) for v in row[loads]]
    assert "train/aux_loss" in got and same(got, expected(out))


def test_a_resume_after_an_interrupt_continues_tb_without_a_step_twice(tmp_path, monkeypatch, capsys):
    out, rec = tmp_path / "run", recipe_file(tmp_path)
    flags = [*FAST, "--steps", "6", "--eval-every", "3", "--save-every", "100", "--out", str(out)]
    signal_in_step(monkeypatch, 4, "SIGINT")
    assert main(["train", rec, *flags, "--log-to", "tensorboard"]) == 130
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [4]
    assert [s for s, _ in tb_scalars(out)["train/loss"]] == [1, 2, 3, 4]  # flushed and closed on the interrupt
    monkeypatch.undo()
    assert main(["train", rec, *flags, "--resume"]) == 0, capsys.readouterr().err  # log_to: the checkpoint's
    got, want = tb_scalars(out), expected(out)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6] and [s for s, _ in got["eval/loss"]] == [3, 6]
    assert same(got, want), (got, want)


def test_a_resume_hides_the_steps_logged_after_its_checkpoint(tmp_path, capsys):
    """A process that died after logging steps past its last checkpoint (here: step 6's checkpoint lost):
    the resumed run trains them again; TensorBoard shows each step once, the resumed run's (purge_step)."""
    import shutil

    out, rec = tmp_path / "run", recipe_file(tmp_path)
    flags = [*FAST, "--eval-every", "3", "--save-every", "4", "--out", str(out), "--log-to", "tensorboard"]
    assert main(["train", rec, *flags, "--steps", "6"]) == 0
    shutil.rmtree(out / "step-6")
    assert main(["train", rec, *flags, "--steps", "7", "--resume"]) == 0, capsys.readouterr().err
    assert len(list((out / "tb").glob("events.out.tfevents.*"))) == 2
    got, want = tb_scalars(out), expected(out)
    assert [s for s, _ in got["train/loss"]] == [1, 2, 3, 4, 5, 6, 7] and [s for s, _ in got["eval/loss"]] == [3, 6, 7]
    assert same(got, want), (got, want)


def test_a_fresh_run_moves_an_earlier_failed_runs_tb_aside(tmp_path, capsys):
    """An --out whose earlier run failed before its first checkpoint: its metrics.jsonl is moved aside, and
    its tb/ with it (the new run's events would have joined the old run's steps)."""
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "tb" / "events.out.tfevents.1.old").write_bytes(b"")
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "2", "--out", str(out), "--log-to", "tensorboard"])
    err = capsys.readouterr().err
    assert rc == 0 and "metrics.jsonl and tb (no checkpoint) moved aside to metrics.jsonl.1 and tb.1" in err, err
    assert (out / "tb.1" / "events.out.tfevents.1.old").is_file()
    assert same(tb_scalars(out), expected(out)) and [r["step"] for r in rows(out)] == [1, 2]


@pytest.mark.parametrize("value", ["tensorbord", "tensorboard,tensorboard", "tensorboard;wandb"])
def test_a_bad_log_to_is_one_usage_line(tmp_path, capsys, value):
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "1", "--out", str(out), "--log-to", value])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"hymba train: --log-to {value}: must be "), err
    assert not out.exists()


def test_a_missing_package_is_one_line_before_the_run_starts(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # (None in sys.modules: an ImportError on import)
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "1", "--out", str(out), "--log-to", "tensorboard"])
    err = capsys.readouterr().err
    assert rc == 1 and err == ("hymba train: --log-to tensorboard: needs the tensorboard package, which is not "
                               "installed: pip install 'hymba_plus[log]' (or pip install tensorboard)\n"), err
    assert not out.exists()  # nothing built or written


def wandb_history(run_file: Path) -> list[tuple[int, dict[str, float]]]:
    """The history records (step, {key: value}) of a W&B run file (``run-ID.wandb``): LevelDB's log format
    (32 KiB blocks of records: crc32 4 bytes, length 2, type 1: full / first / middle / last) after W&B's
    7-byte header (``:W&B``, magic, version), each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, parts, out = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header: padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            rec = pb.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                named = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                items = {k: v for k, v in named.items() if not k.startswith("_")}  # (W&B's _step, _runtime, ...)
                out.append((rec.history.step.num, items))
    return out


def offline_wandb(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    """W&B offline, quiet, its own files under ``tmp_path`` (nothing in the home folder, no network)."""
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_CONFIG_DIR": tmp_path / "cfg", "WANDB_CACHE_DIR": tmp_path / "cache",
                       "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(var, str(value))


def test_a_wandb_offline_run_logs_the_same_rows_into_out_wandb_and_resumes_its_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    offline_wandb(monkeypatch, tmp_path)
    out, rec = tmp_path / "run", recipe_file(tmp_path)
    flags = [*FAST, "--steps", "4", "--eval-every", "2", "--save-every", "100", "--out", str(out)]
    signal_in_step(monkeypatch, 3, "SIGTERM")
    assert main(["train", rec, *flags, "--log-to", "tensorboard,wandb"]) == 130
    monkeypatch.undo()
    offline_wandb(monkeypatch, tmp_path)  # (undo dropped it too)
    time.sleep(1.05)  # W&B names an offline run's folder by the second it starts (and the run id): another one
    assert main(["train", rec, *flags, "--resume"]) == 0, capsys.readouterr().err
    run_files = sorted((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 2 and len({p.name for p in run_files}) == 1, run_files  # one run id, resumed
    history = wandb_history(run_files[0]) + wandb_history(run_files[1])
    want = [(r["step"], scalars(r)) for r in rows(out)]
    assert [s for s, _ in want] == [1, 2, 3, 4] and history == want, (history, want)
    assert same(tb_scalars(out), expected(out))  # both at once


def test_an_error_mid_run_keeps_its_line_when_closing_the_logs_fails_too(tmp_path, monkeypatch, capsys):
    """A run that fails (here: its third step) closes the logs; a close that fails too (a full disk: the
    event writer's thread re-raises its write error) is a warning line, and the run's own error stays the
    last line (it was replaced by the close's OSError)."""
    from torch.utils.tensorboard import SummaryWriter

    from hymba_plus.training.trainer import Trainer, TrainError

    train_step, close = Trainer.train_step, SummaryWriter.close

    def failing_step(self, step):  # noqa: ANN001, ANN202
        if step == 2:
            raise TrainError("step 3: the data went away")
        return train_step(self, step)

    def full_disk(self):  # noqa: ANN001, ANN202
        close(self)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "train_step", failing_step)
    monkeypatch.setattr(SummaryWriter, "close", full_disk)
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "4", "--out", str(out), "--log-to", "tensorboard"])
    err = capsys.readouterr().err.splitlines()
    assert rc == 1 and err[-1] == "hymba train: step 3: the data went away", err
    assert err[-2] == "warning: --log-to: the logs were not closed cleanly (No space left on device)", err
    assert [r["step"] for r in rows(out)] == [1, 2]  # metrics.jsonl closed with both rows


def test_a_logger_that_cannot_start_says_where_and_why(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "tb").write_text("not a folder")
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "2", "--out", str(out), "--log-to", "tensorboard"])
    err = capsys.readouterr().err
    assert rc == 1 and err.splitlines()[-1] == f"hymba train: --log-to tensorboard: cannot start ({out / 'tb'}: File exists)", err


def test_a_wandb_mode_wandb_cannot_take_is_named(tmp_path, monkeypatch, capsys):
    """W&B checks its settings (WANDB_MODE, ...) with pydantic, whose message starts '1 validation error for
    Settings': the setting and the value it refused are named instead (nothing reaches the network)."""
    wandb = pytest.importorskip("wandb")
    offline_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "ofline")
    out = tmp_path / "run"
    wandb.teardown()  # W&B reads the environment once a process (wandb.setup): an earlier test's offline mode
    try:
        rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "2", "--out", str(out), "--log-to", "wandb"])
    finally:
        wandb.teardown()
    err = capsys.readouterr().err.splitlines()
    want = """hymba train: --log-to wandb: cannot start ("mode 'ofline': Input should be 'online', 'offline'"""
    assert rc == 1 and err[-1].startswith(want), err
