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
        assert dispatch.use_fast("gdn", x) is False  # CPU tensors never take a fast path
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
