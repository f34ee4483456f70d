"""FSDP2 under torchrun: 2 gloo processes on CPU train, checkpoint once, resume, and match
a single process that sees the same global batch (Muon gathers each sharded matrix for
Newton–Schulz, so the updates are the same up to float rounding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import from_pretrained
from hymba_plus.cli import main

REPO = Path(__file__).resolve().parents[1]
# odd sizes so FSDP's dim-0 shards are uneven (meta [3, 32], w_up [45, 32], embed [37, 32])
RECIPE = {
    "name": "fsdp-tiny",
    "model": {"vocab_size": 37, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA", "meta_tokens": 3},
    "components": {"gated_attn": {"n_heads": 2, "n_kv_heads": 1}, "mlp": {"d_hidden": 45}},
}
COMMON = ["--steps", "6", "--seq-len", "16", "--warmup", "2", "--save-every", "3", "--eval-every", "3",
          "--device", "cpu", "--no-progress"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hymba_plus", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_gloo_processes_match_one_process_and_resume(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    dist_out, single_out = tmp_path / "fsdp", tmp_path / "single"
    r = torchrun(["train", str(recipe), "--out", str(dist_out), "--batch-size", "2", "--stop-after", "3", *COMMON])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x2 (FSDP2)" in r.stderr
    assert sorted(p.name for p in dist_out.glob("step-*")) == ["step-3"]
    r = torchrun(["train", str(recipe), "--out", str(dist_out), "--batch-size", "2", "--resume", *COMMON])
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done: 6 steps") == 1  # one summary line: rank 0 only
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(recipe), "--out", str(single_out), "--batch-size", "4", *COMMON]) == 0
    finally:
        torch.set_num_threads(n)
    d, s = rows(dist_out), rows(single_out)
    assert [x["step"] for x in d] == list(range(1, 7))  # written once, resumed without gaps
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(d, s))
    print(f"FSDP2 x2 vs one process: max |loss diff| = {diff:.2e}")
    assert diff < 1e-5
    for a, b in zip(d, s):
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
            assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)
    wd = from_pretrained(dist_out / "step-6").state_dict()
    ws = from_pretrained(single_out / "step-6").state_dict()
    assert max(float((wd[k] - ws[k]).abs().max()) for k in ws) < 1e-5
    state = json.loads((dist_out / "step-6" / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and state["samples"] == 6 * 4
