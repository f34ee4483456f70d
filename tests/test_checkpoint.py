"""Checkpoints: no pickle, atomic step folders, SIGKILL at any moment, corrupt or
mismatched checkpoints as one-line errors that overwrite nothing."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from hymba_plus import from_pretrained
from hymba_plus.cli import main
from hymba_plus.training.checkpoint import list_checkpoints, optim_from_safetensors, optim_to_safetensors, read_state

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "ckpt-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA"},
    "components": {"gated_attn": {"n_heads": 2}, "mlp": {"d_hidden": 64}},
}
FAST = ["--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--eval-every", "100", "--no-progress"]




def recipe_file(tmp_path: Path, recipe: dict | None = None, name: str = "r.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe or TINY))
    return str(p)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` -> sha256 (to prove nothing was overwritten)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, rc: int, needle: str) -> str:
    err = capsys.readouterr().err
    assert rc == 1, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, err
    return err


def test_optimizer_state_round_trips_through_safetensors_and_json():
    p = torch.nn.Parameter(torch.randn(4, 3))
    osd = {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(4, 3), "flag": 2}},
           "param_groups": [{"lr": 0.1, "betas": (0.9, 0.95), "kind": "adamw", "params": ["w"]}]}
    tensors, structure = optim_to_safetensors(osd)
    assert set(tensors) == {"state/w/step", "state/w/exp_avg"}
    back = optim_from_safetensors(tensors, json.loads(json.dumps(structure)))
    assert torch.equal(back["state"]["w"]["exp_avg"], osd["state"]["w"]["exp_avg"])
    assert back["state"]["w"]["flag"] == 2 and back["param_groups"][0]["betas"] == (0.9, 0.95)
    del p


def test_checkpoint_folder_has_no_pickle_and_loads(tmp_path):
    out = tmp_path / "run"
    assert main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "2", *FAST]) == 0
    ck = out / "step-2"
    assert sorted(p.name for p in ck.iterdir()) == sorted(
        ["recipe.yaml", "model.safetensors", "optimizer.safetensors", "rng.safetensors", "tokenizer.json",
         "trainer_state.json"])
    for p in ck.iterdir():
        assert not p.read_bytes().startswith(b"\x80")  # no pickle protocol header anywhere
    state = read_state(ck)
    assert state["step"] == 2 and state["samples"] == 4 and state["train_config"]["batch_size"] == 2
    from_pretrained(ck)


def test_incomplete_folders_are_ignored(tmp_path):
    out = tmp_path / "run"
    assert main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "2", "--save-every", "1",
                 "--keep-last", "5", *FAST]) == 0
    (out / ".tmp-step-3-999").mkdir()
    (out / ".tmp-step-3-999" / "model.safetensors").write_bytes(b"half")
    (out / "step-9").mkdir()  # no trainer_state.json: not complete
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert main(["train", recipe_file(tmp_path), "--out", str(out), "--steps", "3", "--resume", *FAST]) == 0
    assert [s for s, _ in list_checkpoints(out)] == [1, 2, 3]
    assert not (out / ".tmp-step-3-999").exists()  # cleaned by the next save


def test_sigkill_at_any_moment_leaves_a_loadable_checkpoint(tmp_path):
    """Kill -9 a training process while it writes a checkpoint; the newest complete one
    loads and the run resumes from it."""
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "hymba_plus", "train", recipe, "--out", str(out), "--steps", "10000",
           "--save-every", "1", "--keep-last", "3", *FAST]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_during_save = False
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list_checkpoints(out)) >= 2:
                break
            time.sleep(0.02)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait for the next save to be in progress
            if any(p.name.startswith(".tmp-step-") for p in out.iterdir()):
                killed_during_save = True
                break
            time.sleep(0.001)
        time.sleep(random.uniform(0, 0.03))  # somewhere inside the save (or just after it)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    found = list_checkpoints(out)
    assert found, "no complete checkpoint"
    step, newest = found[-1]
    model = from_pretrained(newest)
    assert read_state(newest)["step"] == step
    assert model.config.d_model == 32
    print(f"killed during a save: {killed_during_save}; newest complete checkpoint: step-{step}")
    # resuming continues from it and cleans the half-written folder
    assert main(["train", recipe, "--out", str(out), "--steps", str(step + 1), "--resume", "--save-every", "1",
                 "--keep-last", "3", *FAST]) == 0
    assert list_checkpoints(out)[-1][0] == step + 1
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp-step-")]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 2))


def test_corrupt_checkpoint_is_a_one_line_error_and_nothing_is_overwritten(tmp_path, capsys):
    """When every checkpoint is corrupt, --resume is a one-line error naming the file, and
    nothing changes (a corrupt newest one with an intact older one: tests/test_train_cli.py)."""
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "2", *FAST]) == 0
    capsys.readouterr()
    weights = out / "step-2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(out)
    rc = main(["train", recipe, "--out", str(out), "--steps", "6", "--resume", *FAST])
    err = one_line_error(capsys, rc, "step-2/model.safetensors: corrupt or truncated")
    assert "no older intact checkpoint" in err
    assert snapshot(out) == before
    rc = main(["generate", str(out / "step-2"), "--prompt", "1 2"])
    one_line_error(capsys, rc, "model.safetensors: corrupt or truncated")
    # a corrupt optimizer state is named too
    out2 = tmp_path / "run2"
    assert main(["train", recipe, "--out", str(out2), "--steps", "2", *FAST]) == 0
    capsys.readouterr()
    (out2 / "step-2" / "optimizer.safetensors").write_bytes(b"garbage")
    before = snapshot(out2)
    rc = main(["train", recipe, "--out", str(out2), "--steps", "4", "--resume", *FAST])
    one_line_error(capsys, rc, "optimizer.safetensors: corrupt")
    assert snapshot(out2) == before


def test_mismatched_recipe_and_existing_checkpoints(tmp_path, capsys):
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "2", *FAST]) == 0
    capsys.readouterr()
    before = snapshot(out)
    other = recipe_file(tmp_path, {**TINY, "model": {**TINY["model"], "d_model": 64}}, "other.yaml")
    rc = main(["train", other, "--out", str(out), "--steps", "4", "--resume", *FAST])
    err = one_line_error(capsys, rc, "recipe.yaml: was trained with another recipe")
    assert "model.d_model" in err and "other.yaml" in err
    rc = main(["train", recipe, "--out", str(out), "--steps", "4", *FAST])  # no --resume
    one_line_error(capsys, rc, "already holds checkpoints")
    assert snapshot(out) == before


def test_resuming_on_more_ranks_gives_each_new_rank_its_own_random_stream(tmp_path):
    """A checkpoint saved by one process, resumed on two: rank 1 took rank 0's saved state, so both
    drew the same block-diffusion masks / LaDiR latents. Rank 0 continues its stream; rank 1 gets a
    stream of its own, the same on every resume."""
    import torch
    from safetensors.torch import save_file

    from hymba_plus.training.checkpoint import load_rng
    from hymba_plus.training.distributed import DistInfo

    torch.manual_seed(123)
    save_file({"rank0/cpu": torch.get_rng_state()}, str(tmp_path / "rng.safetensors"))
    want0 = torch.rand(4)
    draws = {}
    for rank in (0, 1, 1):
        load_rng(tmp_path, DistInfo(rank=rank, world=2))
        draws.setdefault(rank, []).append(torch.rand(4))
    assert torch.equal(draws[0][0], want0)
    assert not torch.equal(draws[1][0], want0) and torch.equal(draws[1][0], draws[1][1])


def test_corrupt_optimizer_and_generator_states_are_one_line(tmp_path, capsys):
    """Readable safetensors files with the wrong content: an optimizer state of another shape (0-d
    included) or an integer dtype (set_optimizer_state_dict checks neither: the first step failed, a traceback) and
    generator states that are not states (tracebacks from int() / set_rng_state)."""
    from safetensors.torch import load_file, save_file

    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--stop-after", "2", *FAST]) == 0
    capsys.readouterr()
    ck = out / "step-2"
    opt_file, rng_file = ck / "optimizer.safetensors", ck / "rng.safetensors"
    opt_bytes, rng_bytes = opt_file.read_bytes(), rng_file.read_bytes()
    from safetensors import safe_open

    with safe_open(str(opt_file), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(opt_file))
    big = next(k for k, v in tensors.items() if v.dim() == 2)
    step = next(k for k in tensors if k.endswith("/step"))
    for name, change, needle in [(big, lambda t: t[:1], f"is float32 [1, {tensors[big].shape[1]}], the parameter"),
                                 (step, lambda t: t.long(), "'s step is int64 [], the parameter"),
                                 # 0-d: broadcast over the parameter (a traceback, or silently wrong moments)
                                 (big, lambda t: t[0, 0], "is float32 [], the parameter")]:
        save_file({**tensors, name: change(tensors[name]).contiguous()}, str(opt_file), metadata=meta)
        rc = main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST])
        one_line_error(capsys, rc, needle)
        opt_file.write_bytes(opt_bytes)
    rng = load_file(str(rng_file))
    for bad, needle in [({"rank0/cpu": rng["rank0/cpu"][:100]}, "rank0's generator state does not load"),
                        ({"rankX/cpu": rng["rank0/cpu"]}, "'rankX/cpu' is not a generator state"),
                        ({"rank0/cpu": rng["rank0/cpu"].float()}, "'rank0/cpu' is not a generator state"),
                        ({}, "no generator states"),
                        # a CUDA state alone: the CPU stream was left as it was, silently
                        ({"rank0/cuda": rng["rank0/cpu"]}, "no CPU generator state for rank0 (rank0/cpu)")]:
        save_file(bad, str(rng_file))
        rc = main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST])
        one_line_error(capsys, rc, f"rng.safetensors: {needle}")
    rng_file.write_bytes(rng_bytes)
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST]) == 0


def test_untied_weights_under_a_tying_recipe_and_a_mixed_folder(tmp_path):
    """An lm_head.weight unlike embed.weight under tie_embeddings: true loaded silently, the head's
    values replacing the embedding (one tied tensor); weights saved under another recipe than the
    recipe.yaml beside them (an interrupted save into the folder, or an edit) load with a warning."""
    import pytest
    from safetensors.torch import load_file, save_file

    from hymba_plus import build_model
    from hymba_plus.models.lm import CheckpointError

    r = {**TINY, "model": {**TINY["model"], "tie_embeddings": True}}
    m = build_model(r)
    m.save_pretrained(tmp_path / "a")
    w = load_file(str(tmp_path / "a" / "model.safetensors"))
    save_file({**w, "lm_head.weight": w["embed.weight"].clone()}, str(tmp_path / "a" / "model.safetensors"),
              metadata={"recipe_hash": m.recipe.hash()})
    assert torch.equal(from_pretrained(tmp_path / "a").embed.weight, m.embed.weight)  # equal: fine
    save_file({**w, "lm_head.weight": torch.randn_like(w["embed.weight"])}, str(tmp_path / "a" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="holds an lm_head.weight that differs from embed.weight, but recipe.yaml "
                                              r"ties them \(model.tie_embeddings: true\)"):
        from_pretrained(tmp_path / "a")
    other = build_model({**r, "components": {**r["components"], "gated_attn": {"n_heads": 2, "rope": {"theta": 500.0}}}})
    other.save_pretrained(tmp_path / "b")
    (tmp_path / "b" / "recipe.yaml").write_text((tmp_path / "a" / "recipe.yaml").read_text())
    with pytest.warns(UserWarning, match=f"written with recipe hash {other.recipe.hash()}, recipe.yaml hashes to "
                                         f"{m.recipe.hash()}"):
        from_pretrained(tmp_path / "b")


def test_a_parameter_without_saved_optimizer_state_resumes_without_one(tmp_path):
    """set_optimizer_state_dict gives every parameter a state by a zero-gradient step (step count 1, zero
    moments) and kept it where the checkpoint has none: a parameter that had no gradient before the
    checkpoint then took its first AdamW update with the second step's bias correction, and its weights
    left the uninterrupted run's."""
    from hymba_plus import build_model
    from hymba_plus.training import checkpoint as ckpt_mod
    from hymba_plus.training.config import TrainConfig
    from hymba_plus.training.distributed import DistInfo
    from hymba_plus.training.optim import build_optimizer

    def fresh():
        torch.manual_seed(0)
        model = build_model(TINY)
        return model, build_optimizer(model, TrainConfig())[0]

    def step(model, opt, no_grad=()):
        ids = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(1))
        model(ids, labels=ids).loss.backward()
        for p in no_grad:
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)

    a, opt_a = fresh()
    late = a.blocks[1].norm2.weight  # an AdamW parameter: no gradient before the checkpoint
    step(a, opt_a, [late])
    ckpt_mod.save(tmp_path, 1, a, opt_a, {}, DistInfo())
    b, opt_b = fresh()
    b.load_state_dict(a.state_dict())
    ckpt_mod.load_optimizer(tmp_path / "step-1", b, opt_b, DistInfo())
    assert len(opt_b.state) == len(opt_a.state) and b.blocks[1].norm2.weight not in opt_b.state
    step(a, opt_a)
    step(b, opt_b)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_a_trainer_state_with_fields_of_the_wrong_type_is_one_line(tmp_path, capsys):
    """A trainer_state.json that parses but holds a field of the wrong type or shape: each was a traceback
    (KeyError, TypeError, AttributeError, IndexError) somewhere in the resumed run, or a setting of the wrong
    type (a batch size "2") trained silently; a state without its data position resumed from a KeyError."""
    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--stop-after", "2", *FAST]) == 0
    capsys.readouterr()
    state_file = out / "step-2" / "trainer_state.json"
    good = json.loads(state_file.read_text())
    cases = [
        (lambda s: s["schedule"].pop("kind"), "schedule: not a learning-rate plan (KeyError: 'kind')"),
        (lambda s: s["schedule"].update(anchor=[3]), "schedule: not a learning-rate plan (IndexError"),
        (lambda s: s["schedule"].update(kind="linear"), "schedule: not a learning-rate plan (ValueError: unknown"),
        (lambda s: s["train_config"].update(lr="0.1"), "train_config.lr: wrong type: expected a number, got str"),
        # a range error names the file's key as the type error does (it said train.lr, a recipe's key)
        (lambda s: s["train_config"].update(lr=-1.0), "train_config.lr: must be > 0.0, got -1.0"),
        (lambda s: s["train_config"].update(grad_accum="2"), "train_config.grad_accum: wrong type: expected an integer"),
        (lambda s: s["train_config"].update(distill={"kl": 1}), "train_config.distill.kl: unknown key"),
        (lambda s: s["train_config"].update(data=3), "train_config.data: wrong type: expected text, got int 3"),
        (lambda s: s.update(route_search=[4]), "route_search: expected a mapping, got [4]"),
        (lambda s: s.update(route_search={"beam": "4"}), "route_search.beam: expected a number"),
        (lambda s: s["data"].update(params=None), "data.params: expected a mapping, got None"),
        (lambda s: s.update(distill=3), "distill: expected text, got 3"),
        (lambda s: s.pop("samples"), "samples: missing"),
    ]
    for change, needle in cases:
        bad = json.loads(json.dumps(good))
        change(bad)
        state_file.write_text(json.dumps(bad))
        before = snapshot(out)
        rc = main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST])
        one_line_error(capsys, rc, f"step-2/trainer_state.json: {needle}")
        assert snapshot(out) == before
    state_file.write_text(json.dumps(good))
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST]) == 0


def test_an_optimizer_state_missing_a_tensor_or_with_bad_settings_is_one_line(tmp_path, capsys):
    """An optimizer.safetensors that lacks part of a parameter's state resumed with set_optimizer_state_dict's
    made-up value in its place (AdamW's exp_avg zero, its step 1; Muon's momentum zero), silently; a step
    saved as a number, a structure of lists and group settings of the wrong type (betas as text) were
    tracebacks. The group settings are this run's (as lr and weight decay were already)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    recipe = recipe_file(tmp_path)
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--stop-after", "2", *FAST]) == 0
    capsys.readouterr()
    opt_file = out / "step-2" / "optimizer.safetensors"
    with safe_open(str(opt_file), framework="pt") as f:
        meta = f.metadata()
    tensors, structure = load_file(str(opt_file)), json.loads(meta["structure"])
    adam, muon = "embed.weight", "blocks.0.mixer.q_proj.weight"

    def without(name, key):
        def change(t, s):
            t.pop(f"state/{name}/{key}")
            s["state"][name].pop(key)
        return change

    def number_step(t, s):
        t.pop(f"state/{adam}/step")
        s["state"][adam]["step"] = {"value": 3}

    for change, needle in [(without(adam, "exp_avg"), f"{adam}'s state has no exp_avg"),
                           (without(adam, "step"), f"{adam}'s state has no step"),
                           (without(muon, "momentum_buffer"), f"{muon}'s state has no momentum_buffer"),
                           (number_step, f"{adam}'s step is 3, not a tensor"),
                           (lambda t, s: s.update(state=[]), "corrupt or truncated ('list' object has no attribute")]:
        t, s = dict(tensors), json.loads(json.dumps(structure))
        change(t, s)
        save_file(t, str(opt_file), metadata={**meta, "structure": json.dumps(s)})
        before = snapshot(out)
        rc = main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST])
        one_line_error(capsys, rc, f"optimizer.safetensors: {needle}")
        assert snapshot(out) == before
    s = json.loads(json.dumps(structure))
    for g in s["param_groups"]:
        g.update({"betas": "ab", "eps": None} if "betas" in g else {"momentum": "x"})
    save_file(tensors, str(opt_file), metadata={**meta, "structure": json.dumps(s)})
    assert main(["train", recipe, "--out", str(out), "--steps", "4", "--resume", *FAST]) == 0
