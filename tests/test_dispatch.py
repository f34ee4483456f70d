"""The one kernel dispatch (hymba_plus.kernels.dispatch): modes, fallbacks, pinned autotuning."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from hymba_plus.kernels import dispatch


def test_modes_and_cpu_fallback(monkeypatch):
    x = torch.zeros(2)
    for m in ("auto", "reference", "fast"):
        monkeypatch.setenv("HYMBA_KERNELS", m)
        assert dispatch.mode() == m
        assert dispatch.use_fast("gdn", x) is False  # CPU tensors never take a CUDA fast path
    monkeypatch.setenv("HYMBA_KERNELS", "turbo")
    with pytest.raises(ValueError, match="HYMBA_KERNELS"):
        dispatch.mode()


def test_every_registered_fast_path_is_reported():
    import hymba_plus  # noqa: F401 - registers every kernel module

    av = dispatch.available()
    assert {"gdn", "mamba3", "mamba3_mimo", "mamba3_mimo_train", "moe_grouped_mm", "moe_triton", "moe_router"} <= set(av)
    for doc, ok, err in av.values():
        assert doc and (ok or err)  # an unavailable path says why


def test_probe_runs_with_autograd_whatever_the_callers_grad_mode():
    """A fast path's first use may come under no_grad / inference_mode (generation, a
    benchmark's forward timing); probes that check a backward must still run their backward."""

    def probe():
        x = torch.ones(3, requires_grad=True)
        (g,) = torch.autograd.grad((x * x).sum(), x)
        assert torch.equal(g, 2 * x)

    for ctx in (torch.no_grad, torch.inference_mode):
        fp = dispatch.FastPath("probe_with_grad", probe, "test")
        with ctx():
            assert fp.ok(), fp.error
        assert torch.is_grad_enabled()


def test_probe_runs_with_autocast_off_whatever_the_callers_autocast():
    """A first use inside a training forward's bf16 autocast must not turn a probe's float32
    checks into bf16 ones (on an H200 the ATLAS probe's backward ran in bf16 there and failed,
    turning ATLAS's fast path off for the training run); the caller's autocast is back after."""

    def probe():
        assert not torch.is_autocast_enabled("cpu")
        a = torch.randn(8, 8, dtype=torch.float32, requires_grad=True)
        y = a @ a
        (g,) = torch.autograd.grad(y.square().sum(), a)
        assert y.dtype == g.dtype == torch.float32

    fp = dispatch.FastPath("probe_in_autocast", probe, "test")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fp.ok(), fp.error
        assert torch.is_autocast_enabled("cpu")
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_probe_runs_with_tf32_off_whatever_the_callers_setting():
    """``hymba train --tf32`` allows TF32 for float32 matmuls process-wide; probes hold float32
    kernels to float32 tolerances, so they run with it off, and the caller's setting is back
    after (also after a failing probe)."""
    seen = []

    def probe():
        seen.append(torch.backends.cuda.matmul.allow_tf32)

    def broken():
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        raise RuntimeError("no kernel")

    before = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert dispatch.FastPath("probe_tf32", probe, "test").ok()
        assert not dispatch.FastPath("broken_tf32", broken, "test").ok()
        # (a failing probe runs twice where CUDA and Triton are: pinned, then autotuned)
        assert len(seen) >= 2 and not any(seen) and torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def test_pinned_autotune_pins_and_restores():
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    def body(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    plain = triton.autotune(configs, key=[])(triton.jit(body))
    wrapped = triton.heuristics({"EVEN": lambda a: True})(triton.autotune(list(configs), key=[])(triton.jit(body)))
    mod = types.ModuleType("hymba_pin_probe.kernels")
    mod.plain, mod.wrapped, mod.alias = plain, wrapped, plain  # the alias is pinned once
    sys.modules[mod.__name__] = mod
    try:
        with dispatch.pinned_autotune("hymba_pin_probe") as n:
            assert n == 2
            assert len(plain.configs) == 1 and len(wrapped.fn.configs) == 1
        assert len(plain.configs) == 3 and len(wrapped.fn.configs) == 3
        with dispatch.pinned_autotune("no_such_package") as n:
            assert n == 0
    finally:
        del sys.modules[mod.__name__]


def _autotuned_module(name: str):
    """A module ``name`` holding one autotuned Triton kernel with three launch configs."""
    triton = pytest.importorskip("triton")
    tl = pytest.importorskip("triton.language")

    def body(x_ptr, BLOCK: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, BLOCK), 0.0)

    mod = types.ModuleType(name)
    mod.kernel = triton.autotune([triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=[])(triton.jit(body))
    return mod


def test_sharded_autotune_partitions_launch_configs(monkeypatch):
    """``sharded_autotune``: shard i of N keeps configs[i::N] (its first config where that is
    empty), the shards together cover every config once, and the list is restored."""
    mod = _autotuned_module("hymba_shard_probe.kernels")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    blocks = lambda: [c.kwargs["BLOCK"] for c in mod.kernel.configs]  # noqa: E731
    seen = []
    for shard in range(2):
        with dispatch.sharded_autotune("hymba_shard_probe", shard=shard, of=2) as n:
            assert n == 1
            seen.append(blocks())
    assert seen == [[16, 64], [32]] and blocks() == [16, 32, 64]
    with dispatch.sharded_autotune("hymba_shard_probe", shard=3, of=4):
        assert blocks() == [16]
    with pytest.raises(ValueError, match="shard 2 of 2"):
        with dispatch.sharded_autotune("hymba_shard_probe", shard=2, of=2):
            pass
    assert blocks() == [16, 32, 64]


def test_probes_run_pinned_and_retry_autotuned(monkeypatch):
    """On a CUDA machine a probe runs PROBE_PINNED's autotuned kernels on their first launch
    config (restored afterwards); a probe that fails pinned is run again autotuned, and only a
    failure there turns the fast path off."""
    mod = _autotuned_module("hymba_probe_pin.kernels")
    monkeypatch.setitem(sys.modules, mod.__name__, mod)
    monkeypatch.setattr(dispatch, "PROBE_PINNED", ("hymba_probe_pin",))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []

    def probe():
        seen.append(len(mod.kernel.configs))

    assert dispatch.FastPath("pinned", probe, "test").ok()
    assert seen == [1] and len(mod.kernel.configs) == 3

    def only_autotuned():  # e.g. a first launch config that does not fit this GPU
        seen.append(len(mod.kernel.configs))
        if len(mod.kernel.configs) == 1:
            raise RuntimeError("out of resources")

    seen.clear()
    assert dispatch.FastPath("retried", only_autotuned, "test").ok()
    assert seen == [1, 3]

    def broken():
        raise ImportError("no module named fla")

    fp = dispatch.FastPath("broken", broken, "test")
    assert not fp.ok() and fp.error == "ImportError: no module named fla"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # no CUDA: nothing pinned
    seen.clear()
    assert dispatch.FastPath("cpu", probe, "test").ok() and seen == [3]


# --------------------------------------------------------------------------- probes and CUDA graphs


class _OnCuda:
    """Stands in for a CUDA tensor (use_fast reads only ``device``) on a machine without one."""

    device = torch.device("cuda")


def _fake_path(monkeypatch, name: str, fail: Exception | None = None,
               device: str = "cuda") -> tuple[dispatch.FastPath, list[int]]:
    calls: list[int] = []

    def probe():
        calls.append(1)
        if fail is not None:
            raise fail

    fp = dispatch.FastPath(name, probe, "a fake fast path", device=device)
    monkeypatch.setitem(dispatch._FAST, name, fp)
    return fp, calls


def _capturing(monkeypatch, on: bool) -> None:
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: on)


def test_capturing_is_false_without_cuda(monkeypatch):
    def stub():  # what a CPU build's stub does
        raise RuntimeError("Tried to instantiate dummy base class _cuda_isCurrentStreamCapturing")

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", stub)
    assert dispatch.capturing() is False
    _capturing(monkeypatch, True)
    assert dispatch.capturing() is True


def test_capturing_is_false_inside_a_torch_compile_trace():
    """A trace captures nothing (a compiled graph's CUDA graphs are recorded after it): ``capturing()``
    is False inside torch.compile, one graph (``fullgraph``). Before, Dynamo traced this CPU build's
    stub, which raised inside the trace (no ``except`` catches that) and failed the compile."""
    torch._dynamo.reset()
    f = torch.compile(lambda x: x * 2 if dispatch.capturing() else x * 3, backend="eager", fullgraph=True)
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 3.0))


def test_a_probe_never_runs_inside_a_capture_and_nothing_is_cached(monkeypatch):
    """A first use inside a CUDA-graph capture raises a clear error instead of running the probe
    (which would fail there for reasons unrelated to the fast path, and the cached failure would
    keep the process on the reference path for good); outside the capture it then runs."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp, calls = _fake_path(monkeypatch, "fake_op")
    _capturing(monkeypatch, True)
    for _ in range(2):
        with pytest.raises(dispatch.ProbeInCapture, match=r"'fake_op'.*probe_all\(\) before capturing"):
            dispatch.use_fast("fake_op", _OnCuda())
    assert calls == [] and fp.status is None and fp.error == ""
    _capturing(monkeypatch, False)
    assert dispatch.use_fast("fake_op", _OnCuda()) is True and calls == [1]
    _capturing(monkeypatch, True)  # probed before: a capture just reads the cached answer
    assert dispatch.use_fast("fake_op", _OnCuda()) is True and calls == [1]


def test_a_probed_failure_is_read_inside_a_capture(monkeypatch):
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp, calls = _fake_path(monkeypatch, "fake_broken", ImportError("No module named 'fake'"))
    assert dispatch.probe_all(["fake_broken"]) == {"fake_broken": False}
    _capturing(monkeypatch, True)
    assert dispatch.use_fast("fake_broken", _OnCuda()) is False and calls == [1]


def test_cpu_calls_never_probe_even_inside_a_capture(monkeypatch):
    fp, calls = _fake_path(monkeypatch, "fake_op")
    _capturing(monkeypatch, True)
    assert dispatch.use_fast("fake_op", torch.zeros(2)) is False and calls == [] and fp.status is None


def test_probe_all_runs_the_probes_once_outside_captures(monkeypatch):
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    a, calls_a = _fake_path(monkeypatch, "fake_a")
    b, calls_b = _fake_path(monkeypatch, "fake_b", RuntimeError("needs sm90"))
    assert dispatch.probe_all(["fake_a", "fake_b"]) == {"fake_a": True, "fake_b": False}
    assert dispatch.probe_all(["fake_a", "fake_b"]) == {"fake_a": True, "fake_b": False}
    assert calls_a == calls_b == [1] and b.error == "RuntimeError: needs sm90"
    with pytest.raises(KeyError, match="fake_c"):
        dispatch.probe_all(["fake_c"])
    c, calls_c = _fake_path(monkeypatch, "fake_c")
    _capturing(monkeypatch, True)
    with pytest.raises(dispatch.ProbeInCapture, match="before the capture"):
        dispatch.probe_all(["fake_c"])
    _capturing(monkeypatch, False)
    monkeypatch.setenv("HYMBA_KERNELS", "reference")  # nothing will ask: nothing is probed
    assert dispatch.probe_all(["fake_c"]) == {"fake_c": False} and calls_c == [] and c.status is None

    # nor by available() (hymba info): it probed every path (TileLang compiles on a GPU) and listed switched-off
    # paths as available. Found by a review.
    assert dispatch.available()["fake_c"] == (c.doc, False, "off: HYMBA_KERNELS=reference")
    assert calls_c == [] and c.status is None
    assert dispatch.available()["fake_a"] == (a.doc, False, "off: HYMBA_KERNELS=reference")


def test_probe_all_covers_every_registered_path_by_default(monkeypatch):
    import hymba_plus  # noqa: F401 - registers every kernel module

    seen = []
    for name, fp in list(dispatch._FAST.items()):
        monkeypatch.setitem(dispatch._FAST, name, dispatch.FastPath(name, lambda n=name: seen.append(n), fp.doc))
    assert set(dispatch.probe_all()) == set(dispatch._FAST) and sorted(seen) == sorted(dispatch._FAST)


def test_auto_mode_says_once_per_op_that_a_fast_path_is_unavailable(monkeypatch, capsys):
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    _fake_path(monkeypatch, "fake_gdn", ImportError("No module named 'fla'\nsecond line"))
    _fake_path(monkeypatch, "fake_moe", RuntimeError("x" * 300))
    for _ in range(3):
        assert dispatch.use_fast("fake_gdn", _OnCuda()) is False
        assert dispatch.use_fast("fake_moe", _OnCuda()) is False
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "fast path fake_gdn unavailable (ImportError: No module named 'fla'): using the reference path"
    assert err[1].startswith("fast path fake_moe unavailable (RuntimeError: xxx") and "...): using the" in err[1]
    assert len(err) == 2 and len(err[1]) < 300


def test_no_notice_on_cpu_or_in_fast_mode(monkeypatch, capsys):
    _fake_path(monkeypatch, "fake_gdn", ImportError("No module named 'fla'"))
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    assert dispatch.use_fast("fake_gdn", torch.zeros(1)) is False  # CPU: the reference is the path, no notice
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    with pytest.raises(RuntimeError, match="HYMBA_KERNELS=fast but the fast path for 'fake_gdn' is unavailable"):
        dispatch.use_fast("fake_gdn", _OnCuda())
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    assert dispatch.use_fast("fake_gdn", _OnCuda()) is False
    assert capsys.readouterr().err == ""


def test_a_cpu_fast_path_takes_cpu_tensors_and_says_when_it_is_unavailable(monkeypatch, capsys):
    """A fast path registered for the CPU (``fast_path(..., device="cpu")``, ATLAS's) is probed at
    its first CPU call and taken there, never for CUDA tensors; a failed probe is said once in
    ``auto`` and is an error under ``HYMBA_KERNELS=fast``, as a CUDA one's."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp, calls = _fake_path(monkeypatch, "fake_cpu", device="cpu")
    assert dispatch.use_fast("fake_cpu", _OnCuda()) is False and calls == [] and fp.status is None
    assert dispatch.use_fast("fake_cpu", torch.zeros(2), torch.ones(1)) is True and calls == [1]
    assert dispatch.use_fast("fake_cpu", torch.zeros(2), _OnCuda()) is False  # mixed devices: not its call
    _fake_path(monkeypatch, "fake_cpu_broken", RuntimeError("differs"), device="cpu")
    for _ in range(2):
        assert dispatch.use_fast("fake_cpu_broken", torch.zeros(2)) is False
    assert capsys.readouterr().err == "fast path fake_cpu_broken unavailable (RuntimeError: differs): using the " \
                                      "reference path\n"
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    with pytest.raises(RuntimeError, match="HYMBA_KERNELS=fast but the fast path for 'fake_cpu_broken'"):
        dispatch.use_fast("fake_cpu_broken", torch.zeros(2))
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    assert dispatch.use_fast("fake_cpu", torch.zeros(2)) is False


# --------------------------------------------------------------------------- HYMBA_KERNELS_OFF


def _only_fakes(monkeypatch, *specs: tuple[str, Exception | None, str]) -> list[tuple[dispatch.FastPath, list[int]]]:
    """The registry holds only these fake fast paths (name, probe failure, device) for the test."""
    monkeypatch.setattr(dispatch, "_FAST", {})
    return [_fake_path(monkeypatch, name, fail, device) for name, fail, device in specs]


@pytest.mark.parametrize("m", ["auto", "fast"])
def test_kernels_off_takes_the_reference_without_probing(monkeypatch, capsys, m):
    """``HYMBA_KERNELS_OFF`` names ops whose fast path is off: they take the reference in ``auto`` and
    ``fast`` mode (no error in ``fast``), their probe never runs (use_fast, probe_all, available; nor
    inside a capture), no fallback notice is printed, and every other op is dispatched as before.
    Spaces and empty items are tolerated."""
    monkeypatch.setenv("HYMBA_KERNELS", m)
    monkeypatch.setenv("HYMBA_KERNELS_OFF", " fake_off ,, fake_off_cpu, ")
    (off, calls_off), (on, calls_on), (_, calls_cpu) = _only_fakes(
        monkeypatch, ("fake_off", RuntimeError("broken kernel"), "cuda"), ("fake_on", None, "cuda"),
        ("fake_off_cpu", None, "cpu"))
    assert dispatch.off() == frozenset({"fake_off", "fake_off_cpu"})
    _capturing(monkeypatch, True)  # a first use inside a capture: no probe, no ProbeInCapture
    assert dispatch.use_fast("fake_off", _OnCuda()) is False
    _capturing(monkeypatch, False)
    for _ in range(2):
        assert dispatch.use_fast("fake_off", _OnCuda()) is False
        assert dispatch.use_fast("fake_off_cpu", torch.zeros(2)) is False
        assert dispatch.use_fast("fake_on", _OnCuda()) is True
    assert dispatch.probe_all() == {"fake_off": False, "fake_off_cpu": False, "fake_on": True}
    off_line = "off (HYMBA_KERNELS_OFF)"
    assert dispatch.available() == {"fake_off": (off.doc, False, off_line), "fake_off_cpu": (off.doc, False, off_line),
                                    "fake_on": (on.doc, True, "")}
    assert dispatch.statuses() == {"fake_off": off_line, "fake_off_cpu": off_line, "fake_on": True}
    assert calls_off == calls_cpu == [] and calls_on == [1] and off.status is None and not off.warned
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("HYMBA_KERNELS_OFF")  # back on: probed at its next use, as any fast path
    assert dispatch.use_fast("fake_off_cpu", torch.zeros(2)) is True and calls_cpu == [1]


def test_kernels_off_names_must_be_registered_ops(monkeypatch):
    """A name that is no registered op is an error in one line naming the variable, the name and the
    known names, where a bad HYMBA_KERNELS is one (use_fast, probe_all, available; under
    ``reference`` only where the list is reported); names match as registered (lower case), so a
    wrong case is such an error too."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    _only_fakes(monkeypatch, ("fake_a", None, "cpu"), ("fake_b", None, "cpu"))
    for bad, named in (("fake_a, nope", "'nope'"), ("FAKE_A", "'FAKE_A'"), ("fake_c,fake_d", "'fake_c', 'fake_d'")):
        monkeypatch.setenv("HYMBA_KERNELS_OFF", bad)
        for call in (lambda: dispatch.use_fast("fake_a", torch.zeros(1)), dispatch.probe_all, dispatch.available,
                     dispatch.statuses):
            with pytest.raises(ValueError) as ei:
                call()
            msg = str(ei.value)
            assert "\n" not in msg and msg.startswith("HYMBA_KERNELS_OFF") and named in msg
            assert msg.endswith("known: fake_a, fake_b")
    monkeypatch.setenv("HYMBA_KERNELS", "reference")  # every path off: calls do not read the list, reports do
    assert dispatch.use_fast("fake_a", torch.zeros(1)) is False
    for call in (dispatch.probe_all, dispatch.available, dispatch.statuses):
        with pytest.raises(ValueError, match="HYMBA_KERNELS_OFF names no registered fast path: 'fake_c'"):
            call()
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    monkeypatch.setenv("HYMBA_KERNELS_OFF", " , ")  # nothing named: nothing off
    assert dispatch.off() == frozenset() and dispatch.use_fast("fake_a", torch.zeros(1)) is True


@pytest.mark.gpu
def test_gpu_first_use_inside_a_real_capture_raises_and_caches_nothing(monkeypatch):
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp, calls = _fake_path(monkeypatch, "fake_op")
    x = torch.ones(8, device="cuda")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(Exception) as ei:
        with torch.cuda.graph(g):
            y = x * 2
            dispatch.use_fast("fake_op", y)
    chain, e = [], ei.value
    while e is not None:  # ending the aborted capture may raise on top of ours
        chain.append(e)
        e = e.__context__
    assert any(isinstance(c, dispatch.ProbeInCapture) for c in chain), chain
    assert calls == [] and fp.status is None
    assert dispatch.use_fast("fake_op", x) is True and calls == [1]


# --------------------------------------------------------------------------- probes and torch.compile


def _compiled_caller(name: str):
    """A function that asks ``use_fast(name, x)`` compiled whole (``fullgraph``): x * 2 on the fast
    path, x * 3 on the reference."""

    def f(x):
        return x * 2 if dispatch.use_fast(name, x) else x * 3

    return torch.compile(f, backend="eager", fullgraph=True)


@pytest.mark.parametrize("cuda_build", [False, True])
def test_a_first_use_inside_a_torch_compile_trace_probes_outside_it(monkeypatch, cuda_build):
    """A fast path first asked for while torch.compile traces the caller is probed in plain Python
    at trace time, not traced: the probe sees no compile flag and real tensors (its own checks would
    otherwise take the reference through ``dispatch.tracing`` and compare it with itself), the trace
    stays whole (``fullgraph``), and the graph takes the answer. ``cuda_build``: the capture check
    answers as a CUDA build's does (this CPU build's stub raises, which Dynamo cannot trace)."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    if cuda_build:
        _capturing(monkeypatch, False)
    seen = []

    def probe():
        t = torch.ones(3, requires_grad=True)
        (g,) = torch.autograd.grad((t * t).sum(), t)
        seen.append((torch.compiler.is_compiling(), dispatch.tracing(t), bool(torch.equal(g, 2 * t))))

    fp = dispatch.FastPath("fake_compiled", probe, "a fake fast path", device="cpu")
    monkeypatch.setitem(dispatch._FAST, fp.name, fp)
    torch._dynamo.reset()
    f = _compiled_caller(fp.name)
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
    assert seen == [(False, False, True)] and fp.status is True


def test_a_failed_probe_first_met_inside_a_torch_compile_trace_is_announced_once(monkeypatch, capsys):
    """No silent slower kernel under torch.compile either: a probe that fails at trace time gives
    the one-line notice once (the compiled graph takes the reference), and under
    ``HYMBA_KERNELS=fast`` the compile fails naming the fast path."""
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp, calls = _fake_path(monkeypatch, "fake_compiled_broken", RuntimeError("differs"), device="cpu")
    torch._dynamo.reset()
    f = _compiled_caller(fp.name)
    for _ in range(2):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 3.0))
    assert calls == [1]
    assert capsys.readouterr().err == ("fast path fake_compiled_broken unavailable (RuntimeError: differs): using "
                                       "the reference path\n")
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="HYMBA_KERNELS=fast but the fast path for 'fake_compiled_broken'"):
        _compiled_caller(fp.name)(torch.ones(2))


def test_kernels_off_inside_a_torch_compile_trace(monkeypatch, capsys):
    """A compiled caller of an op named in ``HYMBA_KERNELS_OFF`` takes the reference (the answer a
    constant of the graph, one graph), its probe never runs and nothing is printed; a bad name fails
    the compile naming the variable."""
    monkeypatch.setenv("HYMBA_KERNELS", "fast")
    monkeypatch.setenv("HYMBA_KERNELS_OFF", "fake_compiled_off")
    fp, calls = _fake_path(monkeypatch, "fake_compiled_off", device="cpu")
    torch._dynamo.reset()
    f = _compiled_caller(fp.name)
    for _ in range(2):
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 3.0))
    assert calls == [] and fp.status is None and capsys.readouterr().err == ""
    monkeypatch.setenv("HYMBA_KERNELS_OFF", "fake_compiled_of")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="HYMBA_KERNELS_OFF names no registered fast path: 'fake_compiled_of'"):
        _compiled_caller(fp.name)(torch.ones(2))


def test_concurrent_first_uses_probe_once(monkeypatch):
    """Two threads asking for the same unprobed fast path at once: one runs the probe, the other
    waits for its answer (a probe run twice at once would also restore the caller's TF32 setting
    wrongly: each saves the other's TF32-off as the setting to restore)."""
    import threading

    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    second_in = threading.Event()
    calls = []

    def probe():
        calls.append(1)
        if len(calls) == 1:
            second_in.wait(timeout=1.0)  # the other thread's call, if it gets past the first probe, enters here
        else:
            second_in.set()

    fp = dispatch.FastPath("fake_threads", probe, "a fake fast path", device="cpu")
    monkeypatch.setitem(dispatch._FAST, fp.name, fp)
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(dispatch.use_fast(fp.name, torch.zeros(1))))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert answers == [True, True] and calls == [1]


def test_a_first_use_with_fake_tensors_probes_with_real_ones(monkeypatch):
    """A first use under a FakeTensorMode (shape propagation, FLOP counting: fake tensors outside
    torch.compile) probes with real tensors: inside the mode the probe's own tensors would be fake,
    its checks could not read them, and the cached failure would keep the real run on the
    reference path."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    seen = []

    def probe():
        t = torch.ones(3)
        seen.append(dispatch.tracing(t))
        assert float(t.sum()) == 3.0

    fp = dispatch.FastPath("fake_mode_op", probe, "a fake fast path", device="cpu")
    monkeypatch.setitem(dispatch._FAST, fp.name, fp)
    with FakeTensorMode() as mode:
        x = mode.from_tensor(torch.zeros(2))
        assert dispatch.use_fast(fp.name, x) is True
    assert seen == [False] and fp.status is True and fp.error == ""


def test_reference_math_turns_autocast_off_without_a_graph_break():
    """A reference kernel's math runs with autocast off (float32 products under bf16 autocast), eager
    and under torch.compile, and Dynamo traces it in one graph (the autocast was entered through an
    ExitStack, which Dynamo cannot trace: a break at every reference call of a compiled model)."""

    @dispatch.reference_math
    def product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    def step(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return product(a, b) + (a @ b).float()

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g)
    torch._dynamo.reset()
    assert torch._dynamo.explain(step)(a, b).graph_break_count == 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = product(a, b)
    assert got.dtype == torch.float32 and torch.equal(got, a @ b)
    torch.testing.assert_close(torch.compile(step)(a, b), step(a, b))


def test_lifting_saved_tensor_hooks_is_traced_without_a_graph_break():
    """``without_saved_tensor_hooks`` (the ATLAS reference's per-token gradients run under it) lifts
    checkpointing's hooks in eager mode; under torch.compile, where none can be active, it does
    nothing and costs no graph break (the hooks API broke the graph at every ATLAS chunk update)."""

    def f(x: torch.Tensor) -> torch.Tensor:
        with dispatch.without_saved_tensor_hooks():
            return (x * 2).sin()

    torch._dynamo.reset()
    x = torch.randn(5)
    assert torch._dynamo.explain(f)(x).graph_break_count == 0
    packed = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
        y = f(x.requires_grad_())
        (x * 3).sin().sum()  # outside the block: the hooks are back
    y.sum().backward()
    assert len(packed) == 1


def test_the_constant_result_mark_is_dynamos_without_importing_dynamo():
    """``dispatch.assume_constant_result`` sets what ``torch.compiler.assume_constant_result`` sets (a torch
    upgrade that marks constants another way fails here), and ``import hymba_plus`` no longer imports
    ``torch._dynamo`` for it (a fresh process: 1.2-1.7 s of every ``hymba`` command's start)."""
    import subprocess
    import sys

    import torch._dynamo.decorators as decorators

    def f() -> int:
        return 1

    def g() -> int:
        return 1

    ours, theirs = dispatch.assume_constant_result(f), decorators.assume_constant_result(g)
    assert ours is f and theirs is g
    assert {k: v for k, v in vars(f).items()} == {k: v for k, v in vars(g).items()} == {"_dynamo_marked_constant": True}
    code = "import sys, hymba_plus; print('torch._dynamo' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stdout + res.stderr
