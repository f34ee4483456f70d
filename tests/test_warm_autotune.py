"""``benchmarks/warm_autotune.py``: the workload runs once per shard, at the same time, each
process with its shard of the autotuned kernels (``dispatch.sharded_autotune``); a failing
shard makes the whole run fail with one line naming it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WARM = REPO / "benchmarks" / "warm_autotune.py"

SCRIPT = """
import sys

# the autotuned kernel of a module imported before the script starts: what this shard kept
mod = sys.modules["hymba_warm_probe.kernels"]
out, fail = sys.argv[1], "--fail" in sys.argv
with open(out, "w") as f:
    f.write(" ".join(str(c.kwargs["BLOCK"]) for c in mod.kernel.configs))
sys.exit(3 if fail else 0)
"""

# a site module that defines the probe's autotuned kernel at interpreter start-up
SITE = """
import sys, types
import triton, triton.language as tl

def body(x_ptr, BLOCK: tl.constexpr):
    tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

mod = types.ModuleType("hymba_warm_probe.kernels")
mod.kernel = triton.autotune([triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128, 256)], key=[])(triton.jit(body))
sys.modules[mod.__name__] = mod
"""


def run(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SITE)
    script = tmp_path / "work.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    cmd = [sys.executable, str(WARM), "--shards", "2", "--prefixes", "hymba_warm_probe", "--logs",
           str(tmp_path / "logs"), str(script), str(tmp_path / "out-{shard}.txt"), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)


def test_each_shard_runs_the_workload_with_its_configs(tmp_path):
    pytest.importorskip("triton")
    r = run(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (tmp_path / "out-0.txt").read_text() == "16 64 256"
    assert (tmp_path / "out-1.txt").read_text() == "32 128"
    assert "2 shards done" in r.stdout
    assert "1 autotuned kernels sharded" in (tmp_path / "logs" / "shard-0.log").read_text()


def test_a_failing_shard_fails_the_run_in_one_line(tmp_path):
    pytest.importorskip("triton")
    r = run(tmp_path, "--fail")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"warm_autotune: shard(s) 0, 1 of 2 failed; see their logs in {tmp_path / 'logs'}"]
    bad = subprocess.run([sys.executable, str(WARM), "--shards", "0", str(WARM)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--shards 0: need at least 1" in bad.stderr
