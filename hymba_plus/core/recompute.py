"""Activation checkpointing of blocks (Chen et al. 2016, "Training Deep Nets with Sublinear
Memory Cost", arXiv 1604.06174): a checkpointed block keeps only its inputs in the forward and
runs its forward again in the backward (``torch.utils.checkpoint``, non-reentrant), trading one
more block forward for the activations it would have kept. ``HybridLM.set_activation_checkpointing``
turns it on (``hymba train --activation-checkpoint N``: every N-th block application).

A block's forward has effects besides its output, and its second run must not repeat them:

* what it writes into the call's ``StepContext`` (auxiliary losses, statistics, pooled loss
  terms, the values a layer hands a later one, e.g. cross-layer K/V that the consumer pops):
  the recomputation runs on a copy of the context as it was before the block ran, and what it
  writes there is dropped (the loss was made from the first run's);
* counters that train-mode forwards add to (the MoE load of aux-loss-free balancing, the MoDr
  branch load): they skip their update while ``recomputing()``;
* random draws (dropout): the random state is stashed and restored for the second run
  (``preserve_rng_state``, only where the model draws: a stash is two device reads, and cannot
  run inside a CUDA graph capture).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from .cache import StepContext

_depth = 0  # > 0 while a checkpointed block is being recomputed (in the backward)


def recomputing() -> bool:
    """True while a checkpointed block's forward runs again in the backward: train-mode counters
    (balancing loads) must not count it twice."""
    return _depth > 0


def _copy(ctx: StepContext | None) -> StepContext | None:
    """The context with its containers copied (tensors shared): what a block writes into the copy
    does not reach ``ctx``. (None: a module without one, e.g. LaDiR's denoiser layers.)"""
    if ctx is None:
        return None
    return dataclasses.replace(ctx, aux_losses=list(ctx.aux_losses), stats=dict(ctx.stats),
                               shared=dict(ctx.shared),
                               pooled={k: (reduce, list(terms)) for k, (reduce, terms) in ctx.pooled.items()})


class _Recompute:
    """The context of a checkpointed block's recomputation: a fresh copy of the context the block
    found, and ``recomputing()`` true. Reusable: torch keeps the one ``context_fn`` made and enters
    it at every recomputation (a second backward through the same graph, ``retain_graph``)."""

    def __init__(self, holder: list, before: StepContext):
        self.holder, self.before = holder, before

    def __enter__(self) -> None:
        global _depth
        self.holder[0] = _copy(self.before)
        _depth += 1

    def __exit__(self, *exc: object) -> None:
        global _depth
        _depth -= 1


@dataclasses.dataclass
class Checkpointing:
    """A stack's setting (``models/etd.py``): every ``every``-th block application checkpointed
    (0: none), the random state kept for the recomputation where the model draws (dropout)."""

    every: int = 0
    preserve_rng: bool = False

    def at(self, i: int) -> Checkpointing | None:
        """This setting for application ``i`` (counted from 0), or None where it is not checkpointed."""
        return self if self.every > 0 and i % self.every == 0 else None


def run_block(fn: Callable[[StepContext | None], Any], ctx: StepContext | None, ck: Checkpointing | None,
              x: torch.Tensor) -> Any:
    """``fn(ctx)`` (a block's forward on the call's context; None for a layer that takes none),
    checkpointed when ``ck`` is given and gradients are on (a forward without them keeps no
    activations anyway). ``x``: the block's input, which ``fn`` reads; handed to the checkpoint
    too, whose random-state stash keeps the generators of the devices its arguments are on (the
    CPU's always)."""
    if ck is None or not torch.is_grad_enabled():
        return fn(ctx)
    before = _copy(ctx)  # the context as the block found it
    holder = [ctx]  # the first run writes into the call's context, a recomputation into a copy

    def body(*_: Any) -> Any:
        return fn(holder[0])

    out = checkpoint(body, x, use_reentrant=False, preserve_rng_state=ck.preserve_rng,
                     context_fn=lambda: (contextlib.nullcontext(), _Recompute(holder, before)))
    # the recomputation runs on a copy of ``before``: the call's context is let go here, or it would
    # close a reference cycle through the autograd graph (the checkpoint's saved-tensor hooks hold
    # ``body``, ``body`` the context, the context this block's outputs and aux losses, whose graph
    # holds those hooks) that no garbage collection breaks: a forward with gradients that never
    # ran backward (the trainer's eager check before a CUDA graph capture) kept its graph alive
    holder[0] = None
    return out
