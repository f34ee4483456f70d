"""``benchmarks/train_loop.py``: a tiny CPU run trains the Quad-Hybrid's gdn twin through ``hymba train``'s
own loop in both variants and writes their rates; a bad recipe is a one-line error with exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import load_benchmark

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_loop.py"), "--device", "cpu", *args],
                          capture_output=True, text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_tiny_cpu_run(tmp_path) -> None:
    out = tmp_path / "loop.json"
    res = _run("--batch", "1", "--seq-len", "16", "--steps", "3", "--swap-atlas", "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    rep = json.loads(out.read_text())
    assert rep["device"].startswith("cpu") and "ATL" not in rep["pattern"] and "GD" in rep["pattern"]
    assert [r["variant"] for r in rep["rows"]] == ["loop", "sync_each_step"]
    for r in rep["rows"]:
        assert r["steps"] == 3 and r["mode"] == "eager" and r["tokens_per_step"] == 16
        assert r["tokens_per_s"] > 0 and r["median_step_tokens_per_s"] > 0 and r["final_loss"] == r["final_loss"]


def test_a_bad_recipe_is_one_line(tmp_path, capsys) -> None:
    """In this process (a subprocess cost ~3 s of torch import; the script runs as a real process in
    the test above): main's exit 2 and one line on stderr naming the file, no JSON written."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {vocab_size: 8, d_model: 8, block_pattern: 'NOPE'}\n")
    rc = load_benchmark("train_loop").main(["--device", "cpu", "--recipe", str(bad), "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and str(bad) in err
    assert not (tmp_path / "o.json").exists()
