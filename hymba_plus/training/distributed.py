"""Process groups and FSDP2 for ``hymba train`` under ``torchrun``.

``torchrun --nproc-per-node N -m hymba_plus train RECIPE ...`` sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``; ``init`` then starts the process group (NCCL on CUDA,
gloo on CPU), builds a 1-D device mesh and ``shard_model`` applies PyTorch FSDP2
(``fully_shard``) to every block and then to the root (embeddings, meta tokens, final
norm and head stay in the root's group). Without those variables (or with
``WORLD_SIZE=1``) everything here is a no-op and the model is not wrapped.

Data is sharded by rank (``data.py``: rank ``r`` takes its own slice of every global
batch); only rank 0 writes checkpoints, metrics and plots (``checkpoint.py`` gathers full
state dicts with ``torch.distributed.checkpoint.state_dict``).
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..core.config import brief


@dataclass
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    mesh: Any = None

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(name: str | None, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda:LOCAL_RANK when CUDA is available, else cpu; otherwise ``cpu``, ``cuda`` or
    ``cuda:N`` (ValueError, one line, for anything else: the models train and generate on those)."""
    if name in (None, "", "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    shown = str(name) if len(str(name)) <= 80 else brief(name, 80)  # a whole pasted file is not echoed
    if dev is None or dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise ValueError(f"--device {shown}: expected auto, cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {shown}: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        elif dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device {shown}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def init(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun with more than one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if world <= 1:
        return DistInfo(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        kw: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=30)}
        if dev.type == "cuda":
            kw["device_id"] = dev
        dist.init_process_group(**kw)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(dev.type, (world,))
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=dev, mesh=mesh)


def shard_model(model: nn.Module, info: DistInfo, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` every block, then the root. ``param_dtype`` (e.g. bf16): the
    gathered parameters' dtype for forward and backward, gradients reduce-scattered in float32
    into the float32 shards (``MixedPrecisionPolicy``, as torchtitan trains); None: the shards'
    dtype (autocast casts for the GEMMs)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    # the inputs stay as they come (cast_forward_inputs off): FSDP2's default rounds every floating
    # input to bf16, the residual stream between blocks and a forecast's series values and targets
    # too, which autocast and one process's --param-dtype bfloat16 keep in float32
    kw = {} if param_dtype is None else {"mp_policy": MixedPrecisionPolicy(param_dtype=param_dtype,
                                                                            reduce_dtype=torch.float32,
                                                                            cast_forward_inputs=False)}
    for block in model.blocks:
        fully_shard(block, mesh=info.mesh, **kw)
        _keep_step_context(block)
    fully_shard(model, mesh=info.mesh, **kw)
    # the trainer runs the objectives' passes through ``model.run``: the root's parameters are
    # gathered around it too (block diffusion and LaDiR call the model's parts, not its forward)
    register_fsdp_forward_method(model, "run")
    if hasattr(model.structure, "collective"):  # ETD: ranks agree on which blocks run (routes, ACT halting)
        model.structure.collective = True
    return model


def _keep_step_context(block: nn.Module) -> None:
    """Hand ``block`` the call's own ``StepContext``, not FSDP2's copy of it. FSDP2's pre-forward
    hooks its post-backward on every input tensor that requires grad, dataclasses and lists
    included, and rebuilds (``dataclasses.replace``) the containers that hold one: from the second
    block call of a forward whose context held an aux loss, the block wrote its aux losses,
    statistics and shared K/V into copies the caller never read (an ETD think block with MoE
    counted one iteration's balance and z losses of 3). The tensors FSDP2 replaced elsewhere (the
    hidden states) stay replaced, so its post-backward hook still runs."""
    from ..core.cache import StepContext

    stash: list[tuple[tuple, dict]] = []

    def save(module: nn.Module, args: tuple, kwargs: dict) -> None:
        stash.append((args, kwargs))

    def restore(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        args0, kwargs0 = stash.pop()
        args = tuple(a0 if isinstance(a0, StepContext) else a for a, a0 in zip(args, args0))
        kwargs = {k: kwargs0[k] if isinstance(kwargs0.get(k), StepContext) else v for k, v in kwargs.items()}
        return args, kwargs

    block.register_forward_pre_hook(save, prepend=True, with_kwargs=True)  # before FSDP2's (also prepended)
    block.register_forward_pre_hook(restore, with_kwargs=True)  # after it


def all_reduce(values: list[float], info: DistInfo, op: str = "mean") -> list[float]:
    """Sum, mean or max of a few floats over ranks (identity on one process)."""
    if not info.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    if op == "mean":
        t /= info.world
    return t.tolist()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over ranks of a device tensor, as a new tensor and without a host read (the step's
    loss items, ``Trainer.train_step``); ``t`` itself on one process."""
    if not info.enabled:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_bytes(t: torch.Tensor, info: DistInfo) -> list[torch.Tensor]:
    """Every rank's copy of a same-sized uint8 tensor (RNG states), on the CPU."""
    if not info.enabled:
        return [t.cpu()]
    src = t.to(info.device)
    out = [torch.empty_like(src) for _ in range(info.world)]
    dist.all_gather(out, src)
    return [o.cpu() for o in out]


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    """Destroy the process group, and with it every object that still holds it, while the
    interpreter is alive: a gloo group freed only at interpreter exit (through the device mesh, a
    DTensor or an FSDP module that outlived ``destroy_process_group``) aborted the process with
    "terminate called without an active exception" in ~7% of 2-process CPU runs. Callers drop
    their references first (``Trainer.run``); the mesh is dropped here."""
    if info.enabled and dist.is_initialized():
        info.mesh = None
        gc.collect()
        dist.destroy_process_group()
        gc.collect()
