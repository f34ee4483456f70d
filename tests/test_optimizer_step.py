"""``benchmarks/optimizer_step.py`` on the CPU: the eager row is timed and written with the device
name; a bad recipe is a one-line error, exit 2, nothing written. (The CUDA-graph row and its check
against the eager step need a GPU: ``tests/test_train_modes.py -m gpu`` tests the replay itself.)"""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def test_cpu_run_writes_the_eager_row(tmp_path, capsys) -> None:
    bench = load_benchmark("optimizer_step")
    out = tmp_path / "opt.json"
    assert bench.main(["--device", "cpu", "--iters", "2", "--warmup", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["recipe"] == "quad-hybrid-tiny" and rep["optimizer"] == "muon" and rep["params"] > 0
    assert set(rep["rows"]) == {"eager"} and rep["rows"]["eager"]["ms"] > 0 and rep["rows"]["eager"]["host_ms"] > 0
    assert "Muon:" in rep["groups"] and "eager" in capsys.readouterr().out
    # the step's launching ops: the fused AdamW and Newton-Schulz's merged groups keep them near 226
    # (638 before); a bound loose enough for other torch versions, tight enough to catch per-matrix ops
    assert 0 < rep["rows"]["eager"]["ops"] < 320


def test_a_bad_recipe_is_one_line_and_writes_nothing(tmp_path, capsys) -> None:
    bench = load_benchmark("optimizer_step")
    out = tmp_path / "opt.json"
    assert bench.main(["--device", "cpu", "--recipe", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("optimizer_step.py: ") and "missing.yaml" in err[0]
    assert not out.exists()
