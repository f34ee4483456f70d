"""``hymba train`` as a user meets it (issue 13): the suite leaves the checkout alone, progress
shows, Ctrl-C / SIGTERM save and exit 130, resume semantics a user can predict (schedule
re-planned without a second warm-up, a finished run has nothing to do, corrupt checkpoints
skipped and kept, --resume without a checkpoint is an error), bad input leaves nothing
behind, --help shows the defaults, plain loss-plot labels, file modes."""

from __future__ import annotations

import io
import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hymba_plus.cli import main
from hymba_plus.training import checkpoint as ckpt_mod
from hymba_plus.training.progress import Progress
from hymba_plus.training.schedule import Schedule, lr_factor
from hymba_plus.training.signals import StopRequest
from tests.helpers import tree_changes, tree_snapshot
from tests.test_checkpoint import FAST, TINY, recipe_file  # the tiny 2-layer recipe and fast flags

REPO = Path(__file__).resolve().parents[1]


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- 1. the checkout guard


def test_tree_snapshot_sees_added_changed_and_removed_files_in_ignored_folders(tmp_path):
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "keep.txt").write_text("a")
    (tmp_path / "__pycache__").mkdir()
    before = tree_snapshot(tmp_path)
    (tmp_path / "runs" / "demo" / "model.safetensors").write_bytes(b"other weights")
    (tmp_path / "runs" / "new.txt").write_text("x")
    (tmp_path / "keep.txt").unlink()
    (tmp_path / "__pycache__" / "m.pyc").write_bytes(b"bytecode")  # tooling: not a user file
    assert tree_changes(before, tree_snapshot(tmp_path)) == [
        "added runs/new.txt", "removed keep.txt", "changed runs/demo/model.safetensors"]


def test_demo_default_out_is_the_callers_runs_demo_not_written_by_the_suite():
    """The suite's demo tests pass --out under tmp_path (the default is ./runs/demo, the
    user's); the session guard in conftest.py fails the suite if any test wrote there."""
    import inspect

    from hymba_plus import demo

    assert 'Path("runs/demo")' in inspect.getsource(demo.main)
    src = (REPO / "tests" / "test_cli.py").read_text() + (REPO / "tests" / "test_training.py").read_text()
    for call in [ln for ln in src.splitlines() if "demo.main(" in ln or "demo_main(" in ln]:
        assert "--no-train" in call or "--out" in call or "--configs" in call and "empty" in call, call


# --------------------------------------------------------------------------- 2. progress


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_on_a_terminal_shows_step_total_loss_rate_lr_and_eta():
    tty = FakeTTY()
    p = Progress(total=5, stream=tty)
    for n in range(1, 6):
        p.update(n, loss=2.5 - n * 0.1, tokens_per_s=1234.0, lr=3e-4)
    p.close()
    text = tty.getvalue()
    assert "5/5" in text and "loss=2.0000" in text and "tok/s=1,234" in text and "lr=3.00e-04" in text
    assert "<" in text  # tqdm's [elapsed<remaining]


def test_progress_lines_without_a_terminal_every_interval(monkeypatch):
    from hymba_plus.training import progress as progress_mod

    clock = [100.0]
    monkeypatch.setattr(progress_mod.time, "perf_counter", lambda: clock[0])
    pipe = io.StringIO()
    p = Progress(total=100, stream=pipe, interval=10.0)
    for n in range(1, 51):
        clock[0] += 1.0  # one second a step
        p.update(n, loss=1.0, tokens_per_s=500.0, lr=1e-3)
    lines = pipe.getvalue().splitlines()
    # after the first step, then every 10 s: steps 1, 11, 21, 31, 41
    assert [ln.split(":")[0] for ln in lines] == ["step 1/100 (1%)", "step 11/100 (11%)", "step 21/100 (21%)",
                                                  "step 31/100 (31%)", "step 41/100 (41%)"]
    assert lines[-1].endswith("elapsed 41s, eta 59s") and "lr 1.00e-03" in lines[-1] and "500 tokens/s" in lines[-1]


def test_hymba_train_prints_progress_lines_and_no_progress_turns_them_off(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    args = ["train", recipe, "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--warmup", "1",
            "--eval-every", "100"]
    assert main([*args, "--out", str(tmp_path / "a"), "--progress-interval", "0"]) == 0
    err = capsys.readouterr().err
    assert "step 1/3 (33%): loss" in err and "step 3/3 (100%)" in err and "tokens/s" in err and "lr " in err
    assert main([*args, "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "(33%)" not in err and "it/s" not in err and "step 3/3: loss" in err  # the eval line stays


# --------------------------------------------------------------------------- 3. Ctrl-C saves


def test_second_signal_aborts_at_once():
    # a shell's background job starts with SIGINT ignored: install Python's handler for the test
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequest(say=lambda msg: None) as stop:
            signal.raise_signal(signal.SIGINT)
            assert stop.requested == "SIGINT"
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler before is back
    finally:
        signal.signal(signal.SIGINT, outer)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_finishes_the_step_saves_and_exits_130(tmp_path, sig):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "hymba_plus", "train", recipe, "--out", str(out), "--steps", "100000",
           "--save-every", "100000", "--batch-size", "2", "--seq-len", "16", "--eval-every", "100000",
           "--progress-interval", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        for line in proc.stderr:  # wait until a few steps ran
            if line.startswith("step 3/") or time.monotonic() > deadline:
                break
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("hymba train: interrupted at step ") and last.endswith(f"--out {out} --resume"), err
    n = int(last.split("interrupted at step ")[1].split(";")[0])
    assert n >= 3 and [s for s, _ in ckpt_mod.list_checkpoints(out)] == [n]
    assert [r["step"] for r in rows(out)] == list(range(1, n + 1))
    assert "Traceback" not in err


def signal_in_step(monkeypatch, n: int, name: str) -> None:  # noqa: ANN001
    """As if signal ``name`` came during the run's ``n``-th step (counted from the run's start or resume)."""
    from hymba_plus.training.trainer import Trainer

    calls = []

    def flags(self, t_run, stop):  # noqa: ANN001, ANN202
        calls.append(1)
        stop.requested = name if len(calls) == n else None
        return False, stop.requested is not None

    monkeypatch.setattr(Trainer, "_stop_flags", flags)


def test_a_signal_in_the_last_step_saves_first_then_runs_the_final_evaluation(tmp_path, monkeypatch, capsys):
    """A signal during the run's last step skipped its final evaluation for good (a --resume had nothing to
    do): the run ends there anyway, so the checkpoint is written first and the evaluation follows."""
    signal_in_step(monkeypatch, 4, "SIGTERM")
    out = tmp_path / "run"
    rc = main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "4", "--save-every", "100", *FAST])
    err = capsys.readouterr().err
    assert rc == 0 and "SIGTERM in the last step: saved step 4; the final evaluation follows" in err, err
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [4] and "eval_loss" in rows(out)[-1]


# --------------------------------------------------------------------------- 4. resume


@pytest.mark.parametrize("kind", ["cosine", "wsd", "constant"])
@pytest.mark.parametrize("seam", [3, 10, 25, 40])
def test_replanned_schedule_is_continuous_and_never_warms_up_again(kind, seam):
    old = Schedule(kind, 40, warmup=5, min_frac=0.1, decay_frac=0.25)
    for total in (seam + 1, 60, 200):
        new = old.replan(Schedule(kind, total, warmup=5, min_frac=0.1, decay_frac=0.25), seam)
        f_last, f_next = old.factor(seam - 1), new.factor(seam)
        if seam < 5:  # during warm-up: the warm-up goes on as before
            assert f_next == old.factor(seam) == (seam + 1) / 5
            continue
        # past warm-up: never above where the old plan was, and down to the floor at the new end
        assert max(new.factor(s) for s in range(seam, total)) <= f_last + 1e-12
        end = new.factor(total - 1)
        assert math.isclose(end, f_last if kind == "constant" else 0.1, rel_tol=1e-9), (total, end)
        if total - seam >= 20:  # with room to decay: no jump at the seam
            assert abs(f_next - f_last) <= 0.05 * f_last


def test_wsd_resumed_in_its_stable_phase_equals_the_longer_plan_from_the_start():
    old = Schedule("wsd", 100, warmup=10, min_frac=0.0, decay_frac=0.2)
    new = old.replan(Schedule("wsd", 300, warmup=10, min_frac=0.0, decay_frac=0.2), 50)
    assert [new.factor(s) for s in range(50, 300)] == [lr_factor(s, 300, 10, "wsd", 0.0, 0.2) for s in range(50, 300)]


def test_a_longer_warmup_on_resume_does_not_restart_the_ramp():
    """Resumed past its warm-up with a larger --warmup (steps and warmup scaled together), the plan
    is anchored where the old one stood: the ramp restarted there (factor 0.208 -> 0.810 -> 1.0)
    while the log said "no new warm-up". Resumed during its warm-up with a shorter one, the new plan
    runs from the start (its warm-up over: from the peak, not stuck at the old ramp's 0.5)."""
    old = Schedule("cosine", 100, warmup=10, min_frac=0.1)
    new = old.replan(Schedule("cosine", 200, warmup=100, min_frac=0.1), 80)
    assert new.anchor == (80, old.factor(79))
    assert all(new.factor(s) <= old.factor(79) + 1e-12 for s in range(80, 200))
    assert math.isclose(new.factor(199), 0.1)
    early = Schedule("cosine", 100, warmup=40, min_frac=0.0).replan(Schedule("cosine", 100, warmup=10), 20)
    assert early.anchor is None and early.factor(20) == lr_factor(20, 100, 10, "cosine", 0.0)
    assert "the warm-up is over" in Schedule("cosine", 100, warmup=40).describe_change(
        Schedule("cosine", 100, warmup=10), 20, 1e-3)


def test_an_anchored_plan_is_never_taken_for_one_still_warming_up():
    """A plan anchored past its warm-up (a re-plan with a longer --warmup, or a new --train-only phase
    from the peak) re-planned again before its own ``warmup`` step restarted from scratch: back on
    the warm-up ramp (0.59 -> 0.76 here, 1.0 -> 0.55 for the phase) while the log said "no new warm-up"."""
    b = Schedule("cosine", 100, warmup=10).replan(Schedule("cosine", 200, warmup=80), 50)
    c = b.replan(Schedule("cosine", 300, warmup=80), 60)
    assert c.anchor == (60, b.factor(59)) and c.factor(60) <= b.factor(59)
    phase = Schedule("cosine", 100, warmup=20, anchor=(6, 1.0))  # a new phase at step 5
    d = phase.replan(Schedule("cosine", 200, warmup=20), 10)
    assert d.anchor == (10, phase.factor(9)) and d.factor(10) <= phase.factor(9)


def test_replans_chain_through_checkpoints():
    a = Schedule("cosine", 40, warmup=2, min_frac=0.0)
    b = a.replan(Schedule("cosine", 80, warmup=2, min_frac=0.0), 30)
    b2 = Schedule.from_dict(json.loads(json.dumps(b.to_dict())))
    assert b2 == b and b.replan(Schedule("cosine", 80, warmup=2, min_frac=0.0), 50) == b  # same plan: kept
    c = b.replan(Schedule("cosine", 120, warmup=2, min_frac=0.0), 60)
    assert math.isclose(c.factor(59), b.factor(59)) and c.factor(60) <= b.factor(59)


def test_resume_with_more_steps_keeps_the_lr_continuous(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "12", "--warmup", "3", *FAST[:4], "--no-progress",
                 "--eval-every", "100"]) == 0
    capsys.readouterr()
    assert main(["train", recipe, "--out", str(out), "--steps", "24", "--resume", *FAST[:4], "--no-progress",
                 "--eval-every", "100"]) == 0
    err = capsys.readouterr().err
    assert "schedule re-planned at step 12 (steps 12 -> 24)" in err and "no new warm-up" in err
    lr = {r["step"]: r["lr"] for r in rows(out)}
    assert lr[13] <= lr[12] * (1 + 1e-9) and max(lr[s] for s in range(13, 25)) <= lr[12] * (1 + 1e-9)
    # the schedule and its anchor are in the checkpoint: a plain resume continues the same plan
    state = ckpt_mod.read_state(out / "step-24")
    assert state["schedule"]["steps"] == 24 and state["schedule"]["anchor"][0] == 12


def test_wsd_resume_extends_the_stable_phase(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    common = [*FAST[:4], "--no-progress", "--eval-every", "100", "--schedule", "wsd", "--warmup", "2"]
    assert main(["train", recipe, "--out", str(out), "--steps", "20", "--stop-after", "10", *common]) == 0
    assert main(["train", recipe, "--out", str(out), "--steps", "40", "--resume", *common]) == 0
    err = capsys.readouterr().err
    assert "wsd holds lr" in err
    lr = [r["lr"] for r in rows(out)]
    peak = lr[5]
    assert lr[:32] == [peak * lr_factor(s, 40, 2, "wsd", 0.1, 0.2) for s in range(32)]
    assert lr[10:32] == [peak] * 22 and lr[-1] == pytest.approx(peak * 0.1)


def test_resuming_a_finished_run_has_nothing_to_do(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "3", *FAST]) == 0
    capsys.readouterr()
    before = tree_snapshot(out)
    assert main(["train", recipe, "--out", str(out), "--steps", "3", "--resume", *FAST]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == "already at step 3 of 3: nothing to do (pass a larger --steps to go on)"
    assert "nan" not in captured.out + captured.err
    assert tree_changes(before, tree_snapshot(out)) == []


@pytest.mark.parametrize("victim", ["model.safetensors", "optimizer.safetensors", "rng.safetensors",
                                    "trainer_state.json", "recipe.yaml"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning_and_kept(tmp_path, capsys, victim):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--save-every", "2", *FAST]) == 0
    capsys.readouterr()
    f = out / "step-4" / victim
    f.write_bytes(f.read_bytes()[: max(f.stat().st_size // 2, 1)] if victim != "recipe.yaml" else b"model: [")
    corrupt = f.read_bytes()
    assert main(["train", recipe, "--out", str(out), "--steps", "6", "--resume", *FAST]) == 0
    err = capsys.readouterr().err
    warnings = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "skipping corrupt checkpoint step-4" in warnings[0] and victim in warnings[0], err
    assert "resumed from" in err and "step-2 (step 2)" in err
    # the corrupt folder was never deleted: renamed aside when the run reached step 4 again
    assert (out / "step-4.corrupt" / victim).read_bytes() == corrupt
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [4, 6]
    assert [r["step"] for r in rows(out)] == list(range(1, 7))


def test_a_corrupt_checkpoint_does_not_push_out_the_last_intact_one(tmp_path, capsys):
    """keep_last counts intact checkpoints: a run resumed past a corrupt newest checkpoint (from the
    intact one before it) that next saves past the corrupt one's step kept the corrupt folder and
    deleted the intact one, leaving a single intact checkpoint."""
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "8", "--save-every", "2", "--stop-after", "4",
                 *FAST]) == 0
    f = out / "step-4" / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert main(["train", recipe, "--out", str(out), "--steps", "8", "--save-every", "5", "--stop-after", "5",
                 "--resume", *FAST]) == 0
    capsys.readouterr()
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [2, 4, 5]  # 2 and 5 intact, corrupt 4 kept
    assert ckpt_mod.find_resumable(out)[0].name == "step-5"


def test_resume_without_a_checkpoint_is_an_error_unless_auto(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "typo"
    assert main(["train", recipe, "--out", str(out), "--steps", "2", "--resume", *FAST]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--resume: {out} does not exist" in err and "--resume auto" in err
    assert not out.exists()
    out.mkdir()
    assert main(["train", recipe, "--out", str(out), "--steps", "2", "--resume", *FAST]) == 1
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["train", recipe, "--out", str(out), "--steps", "2", "--resume", "auto", *FAST]) == 0
    assert "--resume auto: no checkpoint" in capsys.readouterr().err
    assert main(["train", recipe, "--out", str(out), "--steps", "3", "--resume", "auto", *FAST]) == 0
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [2, 3]


# --------------------------------------------------------------------------- 5. bad input


@pytest.mark.parametrize("case", ["missing data", "empty data", "unknown task", "out under a file"])
def test_bad_input_creates_no_output_folder(tmp_path, capsys, case):
    recipe = recipe_file(tmp_path)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "a-file").write_text("x")
    out = tmp_path / "runs" / "nested" / "x"
    data = {"missing data": str(tmp_path / "nope.txt"), "empty data": str(tmp_path / "empty.txt"),
            "unknown task": "mqarr"}.get(case, "mqar")
    if case == "out under a file":
        out = tmp_path / "a-file" / "x"
    before = tree_snapshot(tmp_path)
    rc = main(["train", recipe, "--out", str(out), "--data", data, "--steps", "2", *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "runs").exists()
    assert tree_changes(before, tree_snapshot(tmp_path)) == []


@pytest.mark.parametrize("name", ["../../escaped", "ABSOLUTE", ".", "a/b"])
def test_a_recipe_name_that_is_not_a_folder_name_needs_out(tmp_path, capsys, monkeypatch, name):
    """The default --out is runs/NAME: a recipe named ../../x (or an absolute path) wrote its run outside runs/,
    one named . into runs/ itself."""
    from tests.test_checkpoint import TINY

    name = str(tmp_path / "abs" / "run") if name == "ABSOLUTE" else name  # (inside tmp_path, should it be written)
    recipe = recipe_file(tmp_path, {**TINY, "name": name})
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    before = tree_snapshot(tmp_path)
    assert main(["train", recipe, "--steps", "1", *FAST]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a folder name for the default --out runs/NAME: pass --out" in err, err
    assert tree_changes(before, tree_snapshot(tmp_path)) == []


@pytest.mark.parametrize("data", ["mqar", None, "khop"])
def test_a_tokenizer_with_a_built_in_task_is_a_usage_error(tmp_path, capsys, data):
    """A built-in task makes its own token ids: --tokenizer was dropped silently (and saved in the checkpoint's
    train config, as if it had been used)."""
    (tmp_path / "tok.json").write_text(json.dumps({"hymba_tokenizer": "bytes"}))
    out = tmp_path / "r"
    rc = main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "1", *FAST,
               *(["--data", data] if data else []), "--tokenizer", str(tmp_path / "tok.json")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and f"--tokenizer {tmp_path / 'tok.json'}: " in err, err
    assert f"the built-in task {data or 'mqar'}" in err and not out.exists(), err



def test_a_checkpoint_that_saved_a_tokenizer_beside_a_built_in_task_resumes(tmp_path, capsys):
    """Such checkpoints (written before --tokenizer with a task was refused) resume; the tokenizer is dropped."""
    out = tmp_path / "r"
    assert main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "2", "--stop-after", "1", *FAST]) == 0
    state = json.loads((out / "step-1" / "trainer_state.json").read_text())
    state["train_config"]["tokenizer"] = "tok.json"
    (out / "step-1" / "trainer_state.json").write_text(json.dumps(state))
    assert main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "2", "--resume", *FAST]) == 0, \
        capsys.readouterr().err
    assert json.loads((out / "step-2" / "trainer_state.json").read_text())["train_config"]["tokenizer"] is None


# --------------------------------------------------------------------------- 6. --help, --version


def test_help_shows_every_default_and_version_exists(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--batch-size", "16"), ("--seq-len", "128"), ("--lr", "0.003"), ("--muon-lr", "0.02"),
                          ("--eval-every", "50"), ("--save-every", "100"), ("--keep-last", "2"), ("--steps", "200"),
                          ("--warmup", "20"), ("--schedule", "cosine"), ("--eval-batches", "4")]:
        i = text.index(f"{flag} ", text.index("options:"))
        assert f"(default: {default})" in text[i: text.index(" --", i + len(flag) + 1)], flag
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    from hymba_plus import __version__

    assert capsys.readouterr().out.startswith(f"hymba {__version__} (torch ")


def test_help_names_each_objectives_default_data(capsys):
    """--data's help said a ladir run has "no default: give one", while a ladir run without --data
    (or train.data) trains on chain_arith (objectives/ladir.py: default_data): the help names each
    objective's default as the run uses it."""
    from hymba_plus.objectives.base import Objective
    from hymba_plus.objectives.forecast import Forecast
    from hymba_plus.objectives.ladir import LaDiRObjective

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    i = text.index("--data DATA ", text.index("options:"))
    data_help = text[i: text.index(" --tokenizer", i)]
    assert "no default" not in data_help
    for cls in (Objective, LaDiRObjective, Forecast):
        assert f"{cls.default_data} (the default)" in data_help or f"(default: {cls.default_data})" in data_help, cls


# --------------------------------------------------------------------------- 9. loss.png, file modes


def test_loss_plot_log_axis_has_plain_labels():
    from hymba_plus.training.trainer import metrics_figure

    rows_ = [{"step": s, "loss": 5.6 - 0.02 * s} for s in range(1, 60)]
    rows_ += [{"step": 60, "loss": 4.4, "eval_loss": 4.5, "eval_accuracy": 0.2}]
    fig = metrics_figure(rows_, "t", chance=0.06)
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.yaxis.get_majorticklabels() + ax.yaxis.get_minorticklabels()]
    shown = [x for x in labels if x]
    assert shown and all("times" not in x and "^" not in x and "×" not in x and "e" not in x for x in shown), shown


def test_checkpoint_files_share_one_mode(tmp_path):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert main(["train", recipe, "--out", str(out), "--steps", "1", *FAST]) == 0
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (out / "step-1").iterdir()}
    assert set(modes.values()) == {0o644}, {k: oct(v) for k, v in modes.items()}


@pytest.mark.parametrize("key", ["muon_momentum", "beta1", "beta2"])
def test_momentum_and_betas_of_one_are_refused(key, tmp_path):
    """1.0 passed the range check: Muon's matrices froze (momentum 1), AdamW gave NaN (betas 1)."""
    from hymba_plus.core.config import range_errors
    from hymba_plus.training.config import TrainConfig

    errs = dict(range_errors(TrainConfig(**{key: 1.0})))
    assert errs == {key: "must be < 1.0, got 1.0"}


def test_wsd_decays_after_the_warmup_and_ends_at_its_floor():
    """The decay window overlapped the warm-up (10 steps, warmup 3, decay_frac 0.9: 0.33, 0.67, 1.0,
    then a jump to 0.7); a window that rounds to 0 steps kept the peak to the end."""
    f = [lr_factor(s, 10, 3, "wsd", 0.1, 0.9) for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and f[-1] == pytest.approx(0.1)
    assert all(b <= a + 1e-12 for a, b in zip(f[2:], f[3:])) and f[3] > 0.8  # no jump down after the ramp
    assert lr_factor(19, 20, 2, "wsd", 0.1, 0.01) == pytest.approx(0.1)  # round(0.2) = 0 -> one decay step


ROOT = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_new_phase_starts_at_the_peak_lr(tmp_path):
    """A LaDiR stage change on --resume is a new phase whose first step runs at the peak lr (its plan's
    anchor put the peak on the old phase's last step: the first new step ran at 0.775 of it)."""
    common = [str(ROOT / "configs" / "ladir_tiny.yaml"), "--data", "chain_arith", "--batch-size", "2", "--warmup", "1",
              "--no-progress", "--out", str(tmp_path / "r"), "--eval-every", "100", "--save-every", "100"]
    assert main(["train", *common, "--steps", "3", "--ladir-stage", "vae"]) == 0
    assert main(["train", *common, "--steps", "6", "--ladir-stage", "flow", "--resume"]) == 0
    rows = [r for r in _rows(tmp_path / "r") if r["step"] >= 4]
    assert rows[0]["step"] == 4
    peak = rows[0]["lr"]
    assert peak == pytest.approx(max(r["lr"] for r in _rows(tmp_path / "r"))), rows
    assert rows[-1]["lr"] < peak


def test_resume_refuses_another_objective_and_resumes_a_recipes_distill_section(tmp_path, capsys):
    """The recipe's objective / ladir sections are part of what a checkpoint was trained for: another
    block size is refused in one line (it trained on silently; another horizon or latent width was a
    load_state_dict traceback). A recipe whose train: section sets distill resumes (its saved settings
    came back as a dict: AttributeError)."""
    import yaml

    bd = yaml.safe_load((ROOT / "configs" / "bd_tiny.yaml").read_text())
    a = tmp_path / "a.yaml"
    a.write_text(yaml.safe_dump(bd))
    common = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--no-progress",
              "--out", str(tmp_path / "bd")]
    assert main(["train", str(a), *common, "--stop-after", "1"]) == 0
    bd["objective"]["block_size"] = 8
    b = tmp_path / "b.yaml"
    b.write_text(yaml.safe_dump(bd))
    before = tree_snapshot(tmp_path / "bd")
    capsys.readouterr()
    assert main(["train", str(b), *common, "--resume"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "was trained with another recipe" in err and "objective.block_size: 4" in err, err
    assert tree_changes(before, tree_snapshot(tmp_path / "bd")) == []
    # distill in the recipe's train: section
    teacher = tmp_path / "t"
    rec = recipe_file(tmp_path)
    assert main(["train", rec, *FAST, "--steps", "2", "--out", str(teacher)]) == 0
    d = yaml.safe_load(Path(rec).read_text())
    d["train"] = {"distill": {"kl_weight": 0.5, "temperature": 2.0}}
    dr = tmp_path / "d.yaml"
    dr.write_text(yaml.safe_dump(d))
    run = ["train", str(dr), *FAST, "--steps", "4", "--distill", str(teacher / "step-2"), "--out", str(tmp_path / "s")]
    assert main([*run, "--stop-after", "2"]) == 0
    assert main([*run, "--resume"]) == 0, capsys.readouterr().err


def test_a_recipes_yaml_keeps_only_the_train_settings_it_changes():
    """``Recipe.to_yaml`` (a checkpoint's recipe.yaml) wrote every train default, which then read as set:
    a default seq_len 128 over max_seq_len 64 made the checkpoint unloadable. Same recipe and hash back."""
    import yaml

    from hymba_plus import load_recipe

    r = load_recipe({"name": "t", "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA"},
                     "train": {"steps": 4, "warmup_steps": 1}})
    text = r.to_yaml()
    assert yaml.safe_load(text)["train"] == {"steps": 4, "warmup_steps": 1}
    back = load_recipe(text)
    assert back == r and back.hash() == r.hash()
    empty = load_recipe({"name": "t", "model": {"vocab_size": 32, "d_model": 32, "block_pattern": "GA"}, "train": {}})
    assert load_recipe(empty.to_yaml()).hash() == empty.hash()


def test_the_printed_resume_command_resumes_a_run_with_flags_the_recipe_would_refuse(tmp_path, capsys):
    """A run with --seq-len 32 on a recipe whose max_seq_len is 64 stopped; `hymba train R --out O --resume`
    (what an interrupted run prints) was refused by the recipe's default seq_len 128 before the
    checkpoint's settings were read. Without checkpoints the recipe's settings are still checked."""
    import yaml

    d = yaml.safe_load(Path(recipe_file(tmp_path)).read_text())
    d["model"]["max_seq_len"] = 64
    r = tmp_path / "short.yaml"
    r.write_text(yaml.safe_dump(d))
    out = str(tmp_path / "o")
    assert main(["train", str(r), "--steps", "4", "--stop-after", "2", "--seq-len", "32", "--batch-size", "2",
                 "--warmup", "1", "--no-progress", "--out", out]) == 0
    assert main(["train", str(r), "--out", out, "--resume", "--no-progress"]) == 0, capsys.readouterr().err
    assert [x["step"] for x in _rows(Path(out))][-1] == 4
    capsys.readouterr()
    # a flag the resumed run cannot take is a usage error, exit 2, as without checkpoints (it was exit 1)
    before = sorted(p.name for p in Path(out).iterdir())
    for extra in ([], ["--resume"]):
        rc = main(["train", str(r), "--out", out, "--seq-len", "100", "--no-progress", *extra])
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "--seq-len 100: must be <= model.max_seq_len (64)" in err, err
    assert sorted(p.name for p in Path(out).iterdir()) == before
    for extra in ([], ["--resume", "auto"]):  # nothing to resume: the recipe's defaults are refused in one line
        rc = main(["train", str(r), "--out", str(tmp_path / "fresh"), "--no-progress", *extra])
        err = capsys.readouterr().err
        # a default no one set, which the recipe's model does not take: set --seq-len (usage, exit 2)
        assert rc == 2 and "train.seq_len: must be <= model.max_seq_len (64), got 128" in err, err
        assert not (tmp_path / "fresh" / "step-1").exists()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_plain_resume_keeps_distilling_from_the_runs_teacher(tmp_path, capsys, dropout):
    """--distill is saved with the run: `--resume` without it (the printed resume command) continues
    distilling and gives the uninterrupted run's losses (it dropped the teacher silently). With dropout
    too: the teacher's initialisation drew from the random streams after the resumed run had restored
    them, so its dropout masks were not the uninterrupted run's."""
    from tests.test_checkpoint import TINY

    rec = recipe_file(tmp_path, {**TINY, "model": {**TINY["model"], "dropout": dropout}})
    teacher = tmp_path / "t"
    assert main(["train", rec, *FAST, "--steps", "2", "--out", str(teacher)]) == 0
    common = ["train", rec, *FAST, "--steps", "4"]
    assert main([*common, "--distill", str(teacher / "step-2"), "--out", str(tmp_path / "full")]) == 0
    assert main([*common, "--distill", str(teacher / "step-2"), "--out", str(tmp_path / "cut"), "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert "the resumed run's teacher" in capsys.readouterr().err
    full, cut = _rows(tmp_path / "full"), _rows(tmp_path / "cut")
    assert [r["loss"] for r in cut] == [r["loss"] for r in full] and all("distill/kl" in r for r in cut[-2:]), cut


def test_ladir_stage_without_the_ladir_objective_is_a_usage_error(tmp_path, capsys):
    """--ladir-stage on a recipe whose objective is not ladir was ignored silently."""
    out = tmp_path / "r"
    rc = main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "1", *FAST, "--ladir-stage", "flow"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--ladir-stage flow: only for objective ladir" in err, err
    assert not out.exists()


def test_a_reasoning_task_too_long_for_max_seq_len_fails_at_setup(tmp_path, capsys):
    """--chain-steps 100 (304-token examples for ladir_tiny's max_seq_len 64) built the model and wrote the run
    folder, then failed at the first batch ('collate: example 0 ...')."""
    out = tmp_path / "r"
    rc = main(["train", str(ROOT / "configs" / "ladir_tiny.yaml"), "--data", "chain_arith", "--chain-steps", "100",
               "--steps", "1", "--batch-size", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    # the flag's value the recipe's model cannot take: a usage error, exit 2 (as --seq-len past max_seq_len; was 1)
    assert rc == 2 and err.count("\n") == 1 and "--chain-steps" in err and "max_seq_len" in err, err
    assert "collate" not in err and not out.exists()
    import yaml

    d = yaml.safe_load((ROOT / "configs" / "ladir_tiny.yaml").read_text())
    d["train"] = {**(d.get("train") or {}), "chain_steps": 100}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    rc = main(["train", str(tmp_path / "r.yaml"), "--data", "chain_arith", "--steps", "1", "--batch-size", "2",
               "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "an example has 304 tokens" in err and not out.exists(), err


def test_a_plot_that_cannot_be_drawn_is_one_line_and_the_run_still_saves(tmp_path, capsys):
    """A failure drawing loss.png (here a folder of that name) ended the run before its final checkpoint
    (eval, plot, save), naming the plot's temporary file, which it left behind."""
    out = tmp_path / "o"
    (out / "loss.png").mkdir(parents=True)
    rc = main(["train", recipe_file(tmp_path), *FAST, "--steps", "4", "--eval-every", "2", "--out", str(out)])
    err = capsys.readouterr().err
    notes = [ln for ln in err.splitlines() if "loss.png" in ln]
    assert rc == 0 and (out / "step-4" / "model.safetensors").is_file(), err
    assert len(notes) == 1 and notes[0].startswith("warning: ") and "the run goes on" in notes[0], err
    assert sorted(p.name for p in out.iterdir()) == ["loss.png", "metrics.jsonl", "step-4"]


def test_a_metrics_file_that_cannot_be_written_is_one_line_and_leaves_no_temporary_file(tmp_path, capsys):
    """A folder named metrics.jsonl: the error named the temporary file beside it, and left it there."""
    rec, out = recipe_file(tmp_path), tmp_path / "o"
    assert main(["train", rec, *FAST, "--steps", "4", "--stop-after", "2", "--out", str(out)]) == 0
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").mkdir()
    before = tree_snapshot(out)
    capsys.readouterr()
    rc = main(["train", rec, *FAST, "--steps", "4", "--resume", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and f"{out / 'metrics.jsonl'}: cannot be written" in err, err
    assert tree_changes(before, tree_snapshot(out)) == [] and not list(out.glob(".*"))


def test_a_recipes_distill_settings_without_a_teacher_are_said_to_be_unused(tmp_path, capsys):
    """train.distill without --distill (e.g. a hybridized checkpoint's recipe) trained without a teacher,
    without a word. One note says so; with --distill, none."""
    import yaml

    d = yaml.safe_load(Path(recipe_file(tmp_path)).read_text())
    d["train"] = {"distill": {"kl_weight": 0.5, "temperature": 2.0}}
    rec = tmp_path / "d.yaml"
    rec.write_text(yaml.safe_dump(d))
    assert main(["train", str(rec), *FAST, "--steps", "2", "--out", str(tmp_path / "a")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "train.distill" in ln]
    assert notes == [f"note: {rec}: train.distill (kl_weight 0.5, ce_weight 1, temperature 2) is unused: no teacher "
                     "(--distill TEACHER_CKPT names one)"], notes
    assert main(["train", str(rec), *FAST, "--steps", "1", "--distill", str(tmp_path / "a" / "step-2"),
                 "--out", str(tmp_path / "b")]) == 0
    assert "is unused" not in capsys.readouterr().err


def test_resuming_with_another_seed_says_the_data_order_changes(tmp_path, capsys):
    """The seed draws the data order (a task's examples, a text's shuffle): --seed on --resume changed it
    mid-run without a word; one line says so, as changed task settings do. The same seed: nothing."""
    rec, out = recipe_file(tmp_path), tmp_path / "o"
    assert main(["train", rec, *FAST, "--steps", "6", "--stop-after", "2", "--seed", "3", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["train", rec, *FAST, "--steps", "6", "--stop-after", "4", "--resume", "--out", str(out)]) == 0
    assert "trained with seed" not in capsys.readouterr().err
    assert main(["train", rec, *FAST, "--steps", "6", "--resume", "--seed", "4", "--out", str(out)]) == 0
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "seed" in ln]
    assert lines == [f"--seed 4: the checkpoint {out / 'step-4'} was trained with seed 3: the data order (a task's "
                     "examples) changes from here (the weights and random states go on from the checkpoint)"], lines


def test_the_printed_resume_command_never_names_a_checkpoint_keep_last_deleted(tmp_path, monkeypatch, capsys):
    """A run resumed with one of its own checkpoints as RECIPE (`hymba train OUT/step-2 --out OUT --resume`)
    and interrupted printed that folder in its resume command after --keep-last had deleted it: the
    command failed (`OUT/step-2: file not found`). It names the checkpoint just saved, and resumes."""
    out = tmp_path / "o"
    assert main(["train", recipe_file(tmp_path), *FAST, "--steps", "2", "--out", str(out)]) == 0
    signal_in_step(monkeypatch, 3, "SIGINT")  # the resumed run's third step: step 5
    capsys.readouterr()
    assert main(["train", str(out / "step-2"), *FAST, "--steps", "8", "--save-every", "1", "--keep-last", "1",
                 "--resume", "--out", str(out)]) == 130
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert not (out / "step-2").exists() and last.endswith(f"resume with: hymba train {out / 'step-5'} --out {out} "
                                                           "--resume"), last
    monkeypatch.undo()
    import shlex

    assert main(shlex.split(last.split("resume with: hymba ")[1]) + ["--no-progress"]) == 0, capsys.readouterr().err
    assert [s for s, _ in ckpt_mod.list_checkpoints(out)] == [8]



@pytest.mark.parametrize("train, flags, alone", [
    ({"param_dtype": "bfloat16"}, ["--precision", "fp32"], {"param_dtype": "bfloat16", "precision": "fp32"}),
    ({"data": "mqar"}, ["--seq-len", "3"], {"data": "mqar", "seq_len": 3}),
    ({"data": "mqar"}, ["--mqar-pairs", "40"], {"data": "mqar", "mqar_pairs": 40}),
])
def test_a_flag_that_clashes_with_a_recipes_train_setting_is_a_usage_error(tmp_path, capsys, train, flags, alone):
    """A rule across train settings (``TrainConfig.check``) broken by a flag's value against the recipe's
    train: section (--precision fp32 with train.param_dtype bfloat16; --seq-len 3 for train.data mqar) exited 1
    naming only the recipe's key, while the same flags against the defaults, or --precision auto on the CPU
    against the same recipe (the trainer's check), exit 2. The recipe's settings breaking it alone: exit 1."""
    fast = ["--batch-size", "2", "--warmup", "1", "--no-progress", "--steps", "1"]
    out = tmp_path / "o"
    rec = recipe_file(tmp_path, {**TINY, "train": {"seq_len": 16, **train}})
    rc = main(["train", rec, *fast, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith(f"hymba train: {' '.join(flags)}: "), err
    assert f"train.{next(iter(train))}" in err and not out.exists(), err  # (and the recipe's setting it meets)
    rec = recipe_file(tmp_path, {**TINY, "train": {"seq_len": 16, **alone}}, "alone.yaml")
    rc = main(["train", rec, *fast, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1 and "alone.yaml" in err and not out.exists(), err
