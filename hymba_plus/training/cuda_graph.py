"""The training forward+backward, and the optimizer step, replayed from CUDA graphs (``hymba train --cuda-graph``).

``torch.cuda.make_graphed_callables`` captures the model's forward (loss, aux loss, routing
statistics) in one CUDA graph and its backward in another, after a few warm-up passes on a
side stream (Triton autotuning and lazy initialisation happen there, not in the capture).
Each step then copies the batch into the graph's static inputs and replays: the same eager
kernels (fla / mamba-ssm / our Triton kernels included), without the per-op launch cost
that bounds small and MoE layers (``benchmarks/moe.py --cuda-graph``). Unlike
``torch.compile(mode="reduce-overhead")`` nothing is traced or regenerated.

What capture needs, and what happens otherwise:

* a CUDA device, one process (FSDP2's collectives and hooks are not captured), no
  ``torch.compile`` -- checked up front with a one-line error;
* static shapes and no host synchronisation in the training forward and backward: every
  training path here is written that way (dropless MoE routing, no ``.item()``); a
  component that synchronises makes the capture fail, reported as one line naming it;
* gradients: a replayed backward writes the parameter gradients into the graph's static
  buffers, which the next replay overwrites, so with gradient accumulation each micro-step's
  gradients are summed into buffers of our own (``GradAccumulator``). A micro-step's weight in
  the step (its loss items, ``Trainer.train_step``) is not captured: it comes in as the gradient
  output of the loss (and of the aux loss, which keeps a per-micro-batch mean), which the
  replayed backward copies into its static buffers;
* no autograd graph of an earlier eager step still alive (a ``loss`` or output kept from a
  forward with gradients): one can make the capture fail. A failed capture looks for such
  tensors (``graph_holders``) and, where there are any, the error says to drop them; else it runs
  the step once more eagerly, as if capturing, and names the first host read or host-to-device
  copy with the line of code that made it (``host_read_site``; ``capture_failure``). The trainer's own eager forwards
  (``auto`` mode's verification) drop theirs before it captures;
* the fast paths the step uses have been probed (a probe cannot run inside a capture:
  ``kernels.dispatch`` raises ``ProbeInCapture`` there): the warm-up passes run the whole
  step before the capture, so they probe exactly the ops the step uses (``dispatch.probe_all()``
  would also run the probes of ops the model never calls, the Mamba-3 MIMO backward's TileLang
  compile among them).

The cyclic garbage collector is run before and paused during the capture, so that it cannot
free an unrelated dead object in the middle of it (destroying a CUDA graph while a stream is
capturing invalidates that capture). A capture that fails can leave the device's default random
generator marked as capturing, which makes every later random op on the device fail; after a
failed capture each default CUDA generator gets a fresh state (``release_rng``), so the eager run
that follows can draw random numbers.

The optimizer step has a graph of its own (``GraphedOptimizer``, the trainer's from the second
step on one CUDA process unless ``--mode eager``), replayed after the clipping.

Buffers updated in place inside the forward (the MoE load counts of aux-loss-free
balancing, the step's counts of global-batch balancing) keep their storage, so the replays
update them; the counts of the warm-up and capture passes are cleared afterwards.
"""

from __future__ import annotations

import contextlib
import gc
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..components.moe import reset_step_loads
from ..core.config import first_line
from ..kernels import dispatch


class CaptureError(RuntimeError):
    """The model could not be captured in a CUDA graph (one line: why)."""


def graph_holders(device_type: str | None = None) -> int:
    """How many live tensors are attached to an autograd graph (``grad_fn`` set: results of a
    forward with gradients that are still referenced, e.g. a kept ``loss``), on devices of
    ``device_type`` (None: any). Collects garbage first, so only reachable ones count."""
    gc.collect()
    n = 0
    for obj in gc.get_objects():
        if not issubclass(type(obj), Tensor):  # type(), not isinstance: no proxy's __class__ is asked
            continue
        try:
            if obj.grad_fn is not None and (device_type is None or obj.device.type == device_type):
                n += 1
        except Exception:  # noqa: BLE001, S112 - a tensor that cannot be inspected: not counted
            continue
    return n


def capture_failure(error: str, holders: int, site: str | None = None) -> str:
    """The one-line reason a capture failed with ``error`` (its first line), given how many
    tensors from earlier eager work still hold an autograd graph (``graph_holders``) and where
    the step reads the device on the host, if it does (``host_read_site``)."""
    what = f"the training step could not be captured ({error[:200]})"
    if holders:
        s = "" if holders == 1 else "s"
        verb = "holds" if holders == 1 else "hold"
        return (f"{what}: {holders} tensor{s} from an earlier eager step still {verb} an autograd graph "
                f"(e.g. a loss you kept): drop them (del) before capturing")
    if site is not None:
        return f"{what}: the step {site[:300]}, which a capture cannot do"
    return (f"{what}; something in it synchronizes with the host, e.g. MoE experts in float32, which take the "
            "padded path (bf16 takes the grouped one): train with --precision bf16")


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Collect garbage now and not again until the block ends (a dead CUDA graph that the
    collector destroys in the middle of a capture invalidates it)."""
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def release_rng() -> None:
    """Give every default CUDA generator a fresh state object with the same seed and offset. A
    capture that ends in an error can leave a generator marked as capturing, after which every
    random op on the device fails ("Offset increment outside graph capture encountered
    unexpectedly"), the eager steps the trainer falls back to included; called after each failed
    capture. (A graph captured earlier keeps the state object it registered: its replays go on from
    that one's offset.)"""
    for gen in torch.cuda.default_generators:
        gen.graphsafe_set_state(gen.clone_state())


def reset_balancing_counts(model: nn.Module) -> None:
    """Zero the load counts of aux-loss-free balancing (MoE, MoDr) and MoE's global-batch
    balance counts that forwards made outside training steps (warm-up, capture, verification)."""
    for m in model.modules():
        load = getattr(m, "load", None)
        if isinstance(load, Tensor) and hasattr(m, "update_bias"):
            load.zero_()
    reset_step_loads(model)


class _HostReads(TorchDispatchMode):
    """Notes the first op that reads a tensor's value on the host (``int(t)``, ``bool(t)``,
    ``t.item()``) or copies a host tensor to the device (pageable memory: a synchronous copy),
    each a synchronisation that a CUDA graph capture forbids, with the code that asked for it."""

    READS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default)

    def __init__(self) -> None:
        super().__init__()
        self.site: str | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        if self.site is None:
            if func in self.READS:
                self.site = f"reads a tensor on the host at {_caller()}"
            elif (func is torch.ops.aten._to_copy.default and isinstance(out, Tensor) and out.device.type == "cuda"
                  and args[0].device.type == "cpu" and args[0].dim() > 0):
                self.site = f"copies a host tensor to the device at {_caller()}"
        return out


def _caller() -> str:
    """``path:line (function)`` of the innermost frame outside torch: the code that asked (a path
    relative to this package's folder or to site-packages where it is under one)."""
    torch_dir = Path(torch.__file__).resolve().parent
    frames = traceback.extract_stack()[:-2]  # (not this function, not the dispatch mode's hook)
    pick = next((f for f in reversed(frames) if not Path(f.filename).resolve().is_relative_to(torch_dir)), frames[-1])
    path, top = Path(pick.filename).resolve(), Path(__file__).resolve().parents[2]
    name = path.relative_to(top) if path.is_relative_to(top) else str(path).rpartition("site-packages/")[2]
    return f"{name}:{pick.lineno} ({pick.name})"


def host_read_site(model: nn.Module, ids: Tensor, labels: Tensor,
                   autocast: Callable[[], contextlib.AbstractContextManager]) -> str | None:
    """Where one eager training step (forward and backward, code that asks ``dispatch.capturing()``
    told yes) reads a tensor on the host or copies one to the device, in words (None: nowhere):
    what ``GraphedStep`` names when a capture fails. Leaves gradients (``autograd.grad``, not
    ``.grad``), the random state and the balancing counts as they were."""
    params = [p for p in model.parameters() if p.requires_grad]
    mode = _HostReads()
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), dispatch.as_if_capturing(), mode:
            with autocast():
                loss = _train_forward(model, ids, labels).loss
            torch.autograd.grad(loss, params, allow_unused=True)
    except Exception:  # noqa: BLE001, S110 - a diagnosis: what it found before failing is kept
        pass
    finally:
        reset_balancing_counts(model)
    return mode.site


def _train_forward(model: nn.Module, ids: Tensor, labels: Tensor):  # noqa: ANN202 - a ModelOutput
    """The model's objective's training forward of a token batch (next token: the model's forward,
    the loss without [B, T, V] logits; block diffusion: its two-stream step)."""
    return model.objective.train_forward(model, model, ids, labels)


class _LossStep(nn.Module):
    """(ids, labels) -> (loss, aux loss, *statistics): the graph's tensors-only interface. The
    model holds its objective, so the objective's parameters (block diffusion's [MASK] embedding)
    are among the captured backward's. The aux loss (part of the loss) keeps its autograd graph:
    the trainer weighs it apart from the rest of the loss (its own gradient output of the captured
    backward, ``Trainer.train_step``); with none, the detached loss stands in for it."""

    def __init__(self, model: nn.Module, has_aux: bool, stat_keys: list[str]):
        super().__init__()
        self.model = model
        self.has_aux = has_aux
        self.stat_keys = stat_keys

    def forward(self, ids: Tensor, labels: Tensor) -> tuple[Tensor, ...]:
        out = _train_forward(self.model, ids, labels)
        aux = out.aux_loss if self.has_aux else out.loss.detach()
        stats = out.stats or {}
        return (out.loss, aux, *[stats[k].detach() for k in self.stat_keys])


class GraphedStep:
    """Callable ``(ids, labels) -> (loss, aux_loss or None, stats or None)`` whose forward and
    backward replay CUDA graphs captured for the shapes of ``sample_ids``."""

    def __init__(self, model: nn.Module, sample_ids: Tensor, sample_labels: Tensor,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        if sample_ids.device.type != "cuda":
            raise CaptureError(f"--cuda-graph needs a CUDA device (the model is on {sample_ids.device})")
        self.autocast = autocast
        with torch.no_grad(), autocast():  # which outputs exist (aux loss, statistics)
            probe = _train_forward(model, sample_ids, sample_labels)
        self.has_aux = probe.aux_loss is not None
        self.stat_keys = sorted(k for k, v in (probe.stats or {}).items() if isinstance(v, Tensor))
        del probe
        step = _LossStep(model, self.has_aux, self.stat_keys)
        error = None
        try:
            with _gc_paused(), autocast():
                self.step = torch.cuda.make_graphed_callables(step, (sample_ids, sample_labels),
                                                               allow_unused_input=True)
        except Exception as e:  # noqa: BLE001 - any failure of the capture is reported in one line
            error = first_line(e)
        finally:
            reset_balancing_counts(model)  # the counts the warm-up and capture passes added
        if error is not None:
            release_rng()
            # out of the except block: the failed capture's traceback (and the warm-up outputs
            # its frames hold) is gone, so what graph_holders finds was kept by the caller
            holders = graph_holders("cuda")
            site = None if holders else host_read_site(model, sample_ids, sample_labels, autocast)
            raise CaptureError(capture_failure(error, holders, site))

    def __call__(self, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor | None, dict | None]:
        outs = self.step(ids, labels)
        stats = dict(zip(self.stat_keys, outs[2:])) or None
        return outs[0], (outs[1] if self.has_aux else None), stats


class GradAccumulator:
    """Sums the gradients of several replayed backwards into buffers of our own (a replay
    overwrites the static gradient buffers that ``param.grad`` may alias)."""

    def __init__(self) -> None:
        self.sums: dict[nn.Parameter, Tensor] = {}

    def take(self, params: list[nn.Parameter]) -> None:
        """Move the current ``.grad`` of each parameter into the running sums."""
        for p in params:
            if p.grad is None:
                continue
            if p in self.sums:
                self.sums[p].add_(p.grad)
            else:
                self.sums[p] = p.grad.clone()
            p.grad = None

    def restore(self) -> None:
        """Put the sums back as ``.grad`` (for clipping and the optimizer)."""
        for p, g in self.sums.items():
            p.grad = g
        self.sums = {}


class GraphedOptimizer:
    """``opt.step()`` of a ``training.optim.MuonAdamW`` replayed from one CUDA graph.

    The eager step of a small model is bound by its launches: Muon's Newton-Schulz per group of
    equal-shaped matrices and the multi-tensor updates of every group. For the Quad-Hybrid recipe at 8 x
    2048 on an H100 the step issued ~700 launches (326 since the fused AdamW and the merged Newton-Schulz
    groups of ``optim.muon_updates``), ~20 ms of host time against a few ms of GPU time,
    so the recipe's whole step (forward+backward already replayed) stayed host-bound
    (``benchmarks/quad_atlas.py --profile``). The optimizer reads its learning rates and step counts
    from device tensors (``MuonAdamW.load_lr``), so the kernels of every step are the same and the
    graph records exactly the eager step's: a replay updates the parameters and the state as the eager
    step would.

    Fixed at capture: the parameters, their optimizer state (created first, ``init_state``: state
    made inside the capture would be re-zeroed by every replay) and the gradient tensors the step
    reads. ``replay`` copies gradients that are other tensors than the captured ones (a backward that
    allocated new ones, gradient accumulation's sums) into them first, and returns False, doing
    nothing, when the parameters with a gradient are not the captured ones: the caller then steps
    eagerly. The capture itself updates nothing; the caller replays it for the step it was made in.
    """

    def __init__(self, opt: torch.optim.Optimizer, params: list[nn.Parameter]):
        self.opt = opt
        self.params = [p for p in params if p.grad is not None]
        bad = next((p for p in self.params if p.grad.device.type != "cuda" or type(p.grad) is not Tensor), None)
        if not self.params or bad is not None:
            raise CaptureError("the optimizer step needs plain CUDA gradients" if self.params else "no gradients")
        opt.init_state()
        self.grads = [p.grad for p in self.params]  # what the graph reads
        opt.load_lr()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with _gc_paused(), torch.cuda.graph(self.graph):
                opt.step(load_lr=False)
        except Exception as e:  # noqa: BLE001 - any failure of the capture is reported in one line
            release_rng()
            raise CaptureError(f"the optimizer step could not be captured ({first_line(e)[:200]})") from None

    def replay(self) -> bool:
        """One optimizer step by replay (the groups' current ``lr``); False, nothing done, when
        the parameters with a gradient differ from the captured ones."""
        with_grad = sum(p.grad is not None for g in self.opt.param_groups for p in g["params"])
        if with_grad != len(self.params) or any(p.grad is None for p in self.params):
            return False
        moved = [(g, p.grad) for g, p in zip(self.grads, self.params) if p.grad.data_ptr() != g.data_ptr()]
        if moved:
            torch._foreach_copy_([g for g, _ in moved], [n for _, n in moved])
        self.opt.load_lr()
        self.graph.replay()
        return True
