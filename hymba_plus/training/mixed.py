"""bf16 weights with float32 master copies on one process (``hymba train --param-dtype bfloat16``).

Under bf16 autocast every GEMM weight is a float32 parameter that autocast casts to bf16 at its
first use in each forward, and whose bf16 gradient the backward casts back to float32: two cast
kernels per weight per step, launched one by one (an H200 profile of the attention row of
``benchmarks/side_by_side.py`` found ~100 of them a step, 27 us each, on the unvectorised cast path).
Mixed precision as Megatron-LM and apex's O2 do it instead keeps the weights the GEMMs read in bf16
and a float32 master copy of each for the optimizer:

* the forward and backward read the bf16 weights (autocast finds nothing to cast) and the backward
  writes bf16 gradients;
* after each backward the gradients are added into float32 buffers (one multi-tensor copy or add
  per micro-batch: gradient accumulation stays in float32);
* clipping, the optimizer step and checkpointing see the float32 masters and their float32
  gradients (``full_precision``; a weight that got no gradient in the step has none, as a float32
  weight would: no decay, no optimizer state), then the masters are copied into the bf16 weights
  in one multi-tensor copy.

The bf16 weight equals autocast's cast of the master (both round to nearest), a GEMM then runs on
the same operands, and its bf16 gradient is what autocast would have cast to float32; so training
with bf16 weights gives the losses of training with float32 weights under autocast, bit for bit
(``tests/test_mixed_precision.py``, on the CPU's bf16 autocast), in fewer kernels.

Which parameters: the weights of ``nn.Linear`` layers and the stacked expert matrices of channel
mixers (``kind="ffn"``), i.e. what a forward multiplies with; not the embedding or the LM head
(the residual stream starts in float32, and the head feeds the fused cross entropy), not norms,
biases, convolutions or the token mixers' per-head tables, which stay float32. Only trainable
ones (a frozen weight has no master to keep).

The swap is of ``param.data`` on the same ``Parameter`` objects, so the optimizer state, the
checkpoint's parameter names and the modules' references are untouched, and a CUDA graph
captured over the bf16 weights replays on them (their storage never changes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .optim import _is_ffn, embedding_and_head


def compute_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters kept in bf16 for the forward and backward (module doc)."""
    special = embedding_and_head(model)
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for mod in model.modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen or id(p) in special or not p.requires_grad or not p.is_floating_point():
                continue
            seen.add(id(p))
            linear = isinstance(mod, nn.Linear) and p is mod.weight
            experts = _is_ffn(mod) and p.ndim == 3
            if linear or experts:
                out.append(p)
    return out


class MasterWeights:
    """bf16 compute weights and float32 masters for ``params`` (module doc). On creation the
    parameters switch to their bf16 copies; ``full_precision()`` switches them to the masters
    (with their float32 gradients) for a block and back."""

    def __init__(self, params: list[nn.Parameter], dtype: torch.dtype = torch.bfloat16):
        self.params = params
        self.masters = [p.data for p in params]
        self.low = [m.to(dtype) for m in self.masters]
        self.grads: list[Tensor] | None = None  # float32 gradient sums, allocated at the first backward
        self.pending = False  # gradients collected since the last full_precision block
        # which parameters got a gradient since then: the others keep .grad None in full_precision, as
        # float32 weights would (a zero gradient got weight decay, optimizer state and momentum steps:
        # LaDiR's frozen LM in its flow stage, Dr.LLM routers outside router training)
        self.got = [False] * len(params)
        self._set(self.low)

    def _set(self, data: list[Tensor]) -> None:
        for p, d in zip(self.params, data):
            p.data = d

    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def collect(self) -> None:
        """After a backward: add the bf16 gradients into the float32 sums (the first backward
        of a step copies) and clear them from the parameters."""
        have = [(i, p.grad) for i, p in enumerate(self.params) if p.grad is not None]
        if not have:
            return
        if self.grads is None:
            self.grads = [torch.zeros_like(m) for m in self.masters]
        sums, grads = [self.grads[i] for i, _ in have], [g for _, g in have]
        if not self.pending and len(have) == len(self.params):
            torch._foreach_copy_(sums, grads)  # one multi-tensor kernel, converting on the way
        else:
            if not self.pending:  # a parameter without a gradient in this step contributes zero
                torch._foreach_zero_(self.grads)
            torch._foreach_add_(sums, grads)
        for i, _ in have:
            self.got[i] = True
        for p in self.params:
            p.grad = None
        self.pending = True

    @contextlib.contextmanager
    def full_precision(self) -> Iterator[None]:
        """The masters as the parameters, with the collected float32 gradients as ``.grad``
        (clipping, the optimizer step, checkpointing); on exit the masters are copied into the
        bf16 weights, which become the parameters again."""
        self._set(self.masters)
        if self.pending and self.grads is not None:
            for p, g, got in zip(self.params, self.grads, self.got):
                p.grad = g if got else None
        try:
            yield
        finally:
            for p in self.params:  # the optimizer reads them inside the block; the next step collects anew
                p.grad = None
            self.pending = False
            self.got = [False] * len(self.params)
            torch._foreach_copy_(self.low, self.masters)
            self._set(self.low)

    def release(self) -> None:
        """End of training: the masters become the parameters for good (a model handed on after
        the run, e.g. for sampling or ``save_pretrained``, holds float32 weights)."""
        self._set(self.masters)
        self.low = []
        self.grads = None
