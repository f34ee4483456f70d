"""Checks shared by the decode-step kernels' interpreter tests (tests/test_decode_attention.py,
test_gdn_decode.py, test_mamba3_step_kernel.py, test_moe_decode.py). They run inside those
tests' subprocesses, where TRITON_INTERPRET=1 makes Triton's CPU interpreter run the kernels and
``forced`` turns their fast paths on (the dispatch never picks a fast path on the CPU)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hymba_plus.kernels import dispatch
from hymba_plus.models.decode_engine import clear_engines, engine_for


def left_padded_prompt(vocab: int, B: int = 3, T: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ids [B, T] and an attention mask left-padding row 0 by 3 and row B-1 by 1 (the
    other rows full): the batch every decode-kernel test decodes."""
    ids = torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[B - 1, :1] = 0
    return ids, mask


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@contextlib.contextmanager
def counting(module: Any, name: str, record: Callable[[tuple, dict], Any] = lambda a, k: a[0].shape
             ) -> Iterator[list]:
    """Within the block ``module.name`` (a kernel wrapper) appends ``record(args, kwargs)`` to the
    yielded list on every call."""
    calls: list = []
    real = getattr(module, name)

    def counted(*a: Any, **k: Any) -> Any:
        calls.append(record(a, k))
        return real(*a, **k)

    setattr(module, name, counted)
    try:
        yield calls
    finally:
        setattr(module, name, real)


@contextlib.contextmanager
def forced(*names: str) -> Iterator[None]:
    """The fast paths ``names`` on (and every other off) within the block."""
    real = dispatch.use_fast
    dispatch.use_fast = lambda name, *t: name in names
    try:
        yield
    finally:
        dispatch.use_fast = real


def decode_matches_reference(model: Any, ids: torch.Tensor, mask: torch.Tensor, fast: tuple[str, ...], calls: list,
                             *, engines: dict[str, int], new_tokens: int = 5, tol: float = 1e-5,
                             on_step: Callable[[Any, list], None] | None = None) -> torch.Tensor:
    """Greedy decoding of ``model`` from the left-padded prompt ``ids`` / ``mask`` with the fast
    paths ``fast`` forced on against the reference path: for each engine of ``engines`` (name ->
    at least this many kernel calls in the generate call) the same tokens; then the static
    engine (graph=False) steps along that sequence with the fast paths, each step's logits
    within ``tol`` of the reference's on a dynamic cache (``on_step(engine, calls)`` checks more
    after each step). The reference run itself must not call the kernel. Returns the tokens."""
    B, T = ids.shape
    with torch.no_grad():
        calls.clear()
        want = model.generate(ids, max_new_tokens=new_tokens, attention_mask=mask, engine="dynamic")
        assert not calls, "the reference path called the kernel"
        for engine, at_least in engines.items():
            clear_engines(model)
            calls.clear()
            with forced(*fast):
                got = model.generate(ids, max_new_tokens=new_tokens, attention_mask=mask, engine=engine)
            assert torch.equal(got, want), (engine, got, want)
            assert len(calls) >= at_least, (engine, len(calls), at_least)
        cache, ref_cache = model.new_cache(B), model.new_cache(B)
        with forced(*fast):
            model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)
        model(ids, attention_mask=mask, cache=ref_cache, logits_to_keep=1)
        clear_engines(model)
        eng = engine_for(model, cache, new_tokens, graph=False)
        for j in range(T, T + new_tokens - 1):
            ref = model(want[:, j:j + 1], cache=ref_cache, check_inputs=False).logits[:, -1]
            calls.clear()
            with forced(*fast):
                got = eng.step(want[:, j])
            assert rel(got, ref) <= tol, (j, rel(got, ref))
            if on_step is not None:
                on_step(eng, calls)
    return want
