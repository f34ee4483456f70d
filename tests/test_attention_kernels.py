"""``benchmarks/attention_kernels.py`` on the CPU: every implementation is measured or recorded with
the reason it cannot run, the ones that run agree with the float32 math backend, and the JSON names
the device and shape."""

from __future__ import annotations

import json

from tests.helpers import load_benchmark


def test_cpu_smoke_run_records_every_implementation(tmp_path) -> None:
    bench = load_benchmark("attention_kernels")
    out = tmp_path / "ak.json"
    assert bench.main(["--device", "cpu", "--batch", "1", "--seq-len", "48", "--heads", "4", "--kv-heads", "2",
                       "--head-dim", "16", "--iters", "1", "--out", str(out)]) == 0
    rep = json.loads(out.read_text())
    assert rep["device"] == "cpu" and rep["shape"]["kv_heads"] == 2 and set(rep["rows"]) == set(bench.IMPLS)
    ran = {k: r for k, r in rep["rows"].items() if "error" not in r}
    assert "sdpa_default" in ran
    for r in ran.values():
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0
        assert max(r["rel_err"].values()) < 2e-2  # bf16 inputs against float32 math
    assert all(r["error"] for k, r in rep["rows"].items() if k not in ran)  # each with its reason
