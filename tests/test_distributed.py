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
COMMON = ["--steps", "6", "--seq-len", "16", "--warmup", "2", "--save-every", "1", "--keep-last", "6",
          "--eval-every", "3", "--device", "cpu", "--no-progress"]


def torchrun(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "hymba_plus", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fsdp2_two_gloo_processes_match_one_process_and_resume(tmp_path):
    """One process trains steps 1-3, FSDP2 on 2 processes resumes for steps 4-5 (loading and
    sharding the optimizer state), one process resumes the FSDP checkpoint for step 6; the
    losses and weights equal those of one uninterrupted process."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    chain, single = tmp_path / "chain", tmp_path / "single"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["train", str(recipe), "--out", str(single), "--batch-size", "4", *COMMON]) == 0
        assert main(["train", str(recipe), "--out", str(chain), "--batch-size", "4", "--stop-after", "3", *COMMON]) == 0
        r = torchrun(["train", str(recipe), "--out", str(chain), "--batch-size", "2", "--resume", "--stop-after", "5",
                      *COMMON])
        assert r.returncode == 0, r.stderr[-3000:]
        assert "x2 (FSDP2)" in r.stderr and r.stdout.count("done: 5 of 6 steps") == 1  # rank 0 alone reports
        state = json.loads((chain / "step-5" / "trainer_state.json").read_text())
        assert state["world_size"] == 2 and state["samples"] == 5 * 4
        assert main(["train", str(recipe), "--out", str(chain), "--batch-size", "4", "--resume", *COMMON]) == 0
    finally:
        torch.set_num_threads(n)
    d, s = rows(chain), rows(single)
    assert [x["step"] for x in d] == list(range(1, 7))  # written once per step, no gaps
    diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(d, s))
    print(f"FSDP2 x2 vs one process: max |loss diff| = {diff:.2e}")
    assert diff < 1e-5
    for a, b in zip(d, s):
        if "eval_loss" in b:
            assert a["eval_loss"] == pytest.approx(b["eval_loss"], abs=1e-5)
            assert a["eval_accuracy"] == pytest.approx(b["eval_accuracy"], abs=1e-6)
    for step in (5, 6):  # step-5 was written by FSDP rank 0 from gathered full state dicts
        wd = from_pretrained(chain / f"step-{step}").state_dict()
        ws = from_pretrained(single / f"step-{step}").state_dict()
        assert max(float((wd[k] - ws[k]).abs().max()) for k in ws) < 1e-5
