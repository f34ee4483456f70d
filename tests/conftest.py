import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from tests.helpers import tree_changes, tree_snapshot

os.environ.setdefault("HYMBA_TEST", "1")
# Tests write under tmp_path only: hypothesis keeps no example database, and its other
# files (a constants cache) go to a temporary folder instead of ./.hypothesis. Every property
# test is derandomized (the same examples every run; a test's own @settings inherit it):
# only make test-deep (HYMBA_TEST_DEEP, below) draws new ones.
settings.register_profile("hymba", database=None, derandomize=True)
settings.load_profile("hymba")
_HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="hymba-hypothesis-")
set_hypothesis_home_dir(_HYPOTHESIS_HOME)
REPO = Path(__file__).resolve().parents[1]
# The test models are tiny: one intra-op thread is as fast as two and avoids OpenMP
# spin-waiting when the 2 CI cores are shared (measured: 2 threads made one MQAR test
# 10x slower under load).
torch.set_num_threads(1)


def pytest_sessionstart(session):
    session.config._checkout_before = tree_snapshot(REPO)


def pytest_sessionfinish(session, exitstatus):
    """The suite fails when it changed the checkout (tracked, untracked or ignored files such
    as a user's runs/): tests write under tmp_path only."""
    shutil.rmtree(_HYPOTHESIS_HOME, ignore_errors=True)
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    changes = tree_changes(before, tree_snapshot(REPO))
    if changes:
        shown = "\n  ".join(changes[:20]) + (f"\n  ... {len(changes) - 20} more" if len(changes) > 20 else "")
        print(f"\nthe test run changed the checkout {REPO} (tests must write under tmp_path):\n  {shown}")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


#: ``make test-deep``: HYMBA_TEST_DEEP=N runs every property test with N times its examples, drawn at
#: random (not derandomized: each run tries new ones); a failure prints the example to reproduce
DEEP = int(os.environ.get("HYMBA_TEST_DEEP", "0") or 0)


def _deepen(items) -> None:
    """Scale each property test's own settings (hypothesis keeps them on the test function, where
    explicit ``@settings`` win over any profile, so a profile cannot do this)."""
    seen = set()  # a parametrized test's items share one function: deepen it once
    for item in items:
        fn = getattr(item, "obj", None)
        s = getattr(fn, "_hypothesis_internal_use_settings", None)
        if s is not None and id(fn) not in seen:
            seen.add(id(fn))
            fn._hypothesis_internal_use_settings = settings(s, max_examples=s.max_examples * DEEP,
                                                            derandomize=False, database=None)


def pytest_collection_modifyitems(config, items):
    if DEEP > 1:
        _deepen(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (the DESIGN invariant's measure)."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def rms_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS(a - b) / RMS(b): fla's ``get_err_ratio`` measure for low-precision kernels."""
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt().clamp_min(1e-30))


@pytest.fixture
def fla_one_launch_config():
    """fla's Triton kernels run their first launch config (``dispatch.pinned_autotune``).

    fla 0.6.0 autotunes 141 kernels, each again per new shape class: on an H100 one gdn GPU
    test took minutes of compiling. The numerics do not depend on the launch config."""
    from hymba_plus.kernels import dispatch

    with dispatch.pinned_autotune("fla.") as n:
        yield n


def check_graph_engine_against_reference(monkeypatch, model, ids, mask, n: int, fast_path: str, dtype,
                                          only: bool = False) -> None:
    """A GPU check shared by the decode-step kernels' tests: the graph engine with ``fast_path``
    in use (``HYMBA_KERNELS`` unset) against ``HYMBA_KERNELS=reference`` on a dynamic cache, for
    the prompt ``ids`` / ``mask`` [B, T]: the logits of every step along the reference's greedy
    sequence (1e-4 in float32, 5e-2 in bf16) and, in float32, the greedy tokens themselves.
    ``only``: the fast run uses ``fast_path`` and no other fast path (its probe must pass), the
    reference run none at all."""
    from hymba_plus.kernels import dispatch
    from hymba_plus.models.decode_engine import clear_engines, engine_for

    B, T = ids.shape
    with torch.no_grad():
        real = dispatch.use_fast
        monkeypatch.setenv("HYMBA_KERNELS", "reference")
        want = model.generate(ids, max_new_tokens=n, attention_mask=mask, engine="dynamic")
        ref_cache = model.new_cache(B)
        model(ids, attention_mask=mask, cache=ref_cache, logits_to_keep=1)
        refs = [model(want[:, j:j + 1], cache=ref_cache, check_inputs=False).logits[:, -1]
                for j in range(T, T + n - 1)]
        monkeypatch.delenv("HYMBA_KERNELS")
        if only:
            monkeypatch.setenv("HYMBA_KERNELS", "fast")  # a failed probe of fast_path is an error
            monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: name == fast_path and real(name, *t))
        clear_engines(model)
        stats: dict = {}
        got = model.generate(ids, max_new_tokens=n, attention_mask=mask, engine="graph", stats=stats)
        assert stats["engine"] == "graph", stats.get("engine_notice")
        assert dispatch.statuses()[fast_path] is True, dispatch.statuses()[fast_path]
        if dtype == torch.float32:
            assert torch.equal(got, want)
        cache = model.new_cache(B)
        model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        eng = engine_for(model, cache, n, graph=True)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        for j, ref in zip(range(T, T + n - 1), refs):
            assert rel_err(eng.step(want[:, j]).float(), ref.float()) <= tol, j


def run_in_interpreter(code: str, timeout: int = 600) -> str:
    """Run ``code`` (dedented) in a subprocess with Triton's CPU interpreter on (TRITON_INTERPRET
    must be set before triton is imported) and the repository on the path; it must exit 0 and
    print "ok". Returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0 and "ok" in res.stdout, (res.stdout[-2000:], res.stderr[-3000:])
    return res.stdout

