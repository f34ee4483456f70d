"""Timing shared by the benchmark scripts: median milliseconds, CUDA events on a GPU; and their JSON reports."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# one implementation of the timing (the package's, which ``hymba bench`` runs): ``bench`` is its median_ms
from hymba_plus.training.bench import median_ms as bench  # noqa: F401  (the scripts import it from here)
from hymba_plus.training.bench import on_cuda

#: datasheet peaks per GPU, matched in order on ``torch.cuda.get_device_name()``: (name part, dense bf16
#: tensor-core FLOP/s, HBM bytes/s). The H100 rows before the bare "H100" (the SXM part, "H100 80GB HBM3")
GPU_PEAKS = (
    ("H200", 989e12, 4.8e12),
    ("H100 NVL", 835e12, 3.9e12),
    ("H100 PCIe", 756e12, 2.0e12),
    ("H100", 989e12, 3.35e12),
    ("A100-SXM4-80GB", 312e12, 2.039e12),
    ("A100 80GB PCIe", 312e12, 1.935e12),
    ("A100", 312e12, 1.555e12),
)


#: the packages whose versions ``versions`` records: the kernels our fast paths and the peers run
VERSIONED = ("triton", "transformers", "fla-core", "flash-linear-attention", "mamba-ssm", "causal-conv1d",
             "liger-kernel")


def versions() -> dict[str, str | None]:
    """Python's, torch's and its CUDA's version and each ``VERSIONED`` package's as installed (None: not
    installed; read from the package metadata, nothing imported): what a benchmark's JSON records next to the
    device name."""
    from importlib import metadata

    out: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__,
                                  "cuda": torch.version.cuda}
    for dist in VERSIONED:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_json(report: dict, out: str | Path, say: bool = True) -> Path:
    """Write a benchmark's report as indented JSON (its folder made first); ``say``: print "wrote PATH"."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    if say:
        print(f"wrote {out}")
    return out


def peaks_of(name: str | None) -> tuple[float, float, str]:
    """(bf16 FLOP/s, HBM bytes/s, whose figures) for a GPU named ``name`` (``torch.cuda.get_device_name()``);
    for None (a CPU) or a GPU missing from ``GPU_PEAKS``, the H200's, said so in the third item (what the
    results record next to an MFU or a streaming limit computed from them)."""
    for part, flops, bw in GPU_PEAKS:
        if name is not None and part in name:
            return flops, bw, f"{part} datasheet"
    return GPU_PEAKS[0][1], GPU_PEAKS[0][2], f"H200 datasheet (no figures for {name or 'a CPU'})"


def gpu_peaks(device: str) -> tuple[float, float, str]:
    """``peaks_of`` the GPU a run on ``device`` uses (a CPU: None)."""
    on_gpu = on_cuda(device) and torch.cuda.is_available()
    return peaks_of(torch.cuda.get_device_name(torch.device(device)) if on_gpu else None)


def device_arg(text: str) -> str:
    """argparse ``type`` of the scripts' ``--device``: ``cpu``, ``cuda`` or ``cuda:N`` (``auto``: the device
    ``hymba train`` picks); anything else is a one-line usage error, not a traceback from inside the run. Whether
    this machine has that device is ``use_device``'s check (the arguments parse on a machine without it)."""
    try:
        dev = torch.device(text) if text not in ("", "auto") else None
    except (RuntimeError, ValueError, TypeError):
        dev = torch.device("meta")  # not a device: refused below
    if dev is None:
        from hymba_plus.training.distributed import pick_device

        return str(pick_device(text))
    if dev.type not in ("cpu", "cuda") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise argparse.ArgumentTypeError(f"{text}: expected auto, cpu, cuda or cuda:N")
    return text


def use_device(device: str | torch.device) -> None:
    """The scripts' first step: a one-line error, exit 2, for a CUDA device this machine does not have
    (``hymba train``'s check, ``training/distributed.pick_device``); then ``cuda:N`` made the current CUDA
    device (nothing for ``cuda`` or a CPU): CUDA-graph captures (a ``torch.cuda.graph``'s stream),
    ``empty_cache`` and the calls that take no device act on the current one, which otherwise stays 0 while the
    run's tensors are on device N."""
    from hymba_plus.training.distributed import pick_device

    try:
        pick_device(str(device))
    except ValueError as e:
        print(f"{Path(sys.argv[0]).name}: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)


def bench_dtype(device: str | torch.device) -> torch.dtype:
    """The benchmarks' default dtype: bf16 on a GPU (``cuda``, ``cuda:1``), float32 on the CPU."""
    return torch.bfloat16 if on_cuda(device) else torch.float32


def host_times(fn: Callable[[], object], device: str, passes: int) -> list[float]:
    """Milliseconds for the host to issue fn() (synchronised before each pass, not after), per pass:
    close to the wall time, a pass is bound by its launches."""
    host = []
    for _ in range(passes):
        if on_cuda(device):
            torch.cuda.synchronize(torch.device(device))
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
    if on_cuda(device):
        torch.cuda.synchronize(torch.device(device))
    return host


def device_kernels(prof) -> list:  # noqa: ANN001
    """The device kernels of a torch.profiler run. GPU-side ranges of user annotations (an
    optimizer's ``Optimizer.step#...``, Inductor's "## Call CompiledFxGraph ... ##" around a
    compiled graph's kernels) are not kernels: counting them counted those kernels twice."""
    return [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
            and not getattr(e, "is_user_annotation", False) and not e.name.startswith("## ")]


#: aten ops that make views or empty tensors, no kernel (left out of ``launching_ops``)
VIEW_OPS = frozenset(f"aten::{n}" for n in ("mT", "select", "slice", "reshape", "view", "unsqueeze", "squeeze", "empty",
                                             "empty_like", "empty_strided", "transpose", "t", "detach", "alias",
                                             "as_strided", "expand", "permute", "narrow", "unbind", "split"))


def launching_ops(prof) -> list:  # noqa: ANN001
    """The top-level aten ops of a torch.profiler run (called from Python, not from inside another
    aten op) that are not views: on the CPU the stand-in for the kernels a CUDA run launches."""
    return [e for e in prof.events() if e.name.startswith("aten::") and e.name not in VIEW_OPS
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]


def profile_passes(fn: Callable[[], object], device: str, passes: int = 3, rows: int = 25) -> dict:
    """Run fn() ``passes`` times under torch.profiler; print the top ops / kernels (also by input
    shape, and on CUDA by host time) and return per pass the number of device kernels, their
    summed time and the host time to issue the pass (CUDA), or the number of aten ops (CPU).
    A pass whose wall time is well above its kernel time, and close to its host time, is bound
    by launches, not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: first-call compiles and caches stay out of the profile
    host = host_times(fn, device, passes)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda(device) else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(passes):
            fn()
        if on_cuda(device):
            torch.cuda.synchronize(torch.device(device))
    key = "self_cuda_time_total" if on_cuda(device) else "self_cpu_time_total"
    avgs, by_shape = prof.key_averages(), prof.key_averages(group_by_input_shape=True)  # each aggregated once
    print(avgs.table(sort_by=key, row_limit=rows), flush=True)
    print(by_shape.table(sort_by=key, row_limit=rows, max_name_column_width=40), flush=True)
    if on_cuda(device):
        print(avgs.table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
        kernels = device_kernels(prof)
        out = {"kernels_per_pass": len(kernels) / passes,
               "kernel_ms_per_pass": sum(e.device_time_total for e in kernels) / passes / 1e3,
               "host_ms_per_pass": statistics.median(host)}
    else:
        out = {"aten_ops_per_pass": sum(1 for e in prof.events() if e.name.startswith("aten::")) / passes}
    print(f"  per pass: {', '.join(f'{k} {v:.3f}' for k, v in out.items())}", flush=True)
    # the tables' top rows also in the result (a device call returns only the end of its output)
    out["top"] = _top_rows(avgs, device, passes, rows)
    if on_cuda(device):  # where the host's time goes (a pass bound by its host time)
        out["top_host"] = _top_rows(avgs, "cpu", passes, rows)
    out["top_by_shape"] = _top_rows(by_shape, device, passes, rows, shapes=True)
    # every dtype cast / copy by input shape (weight-sized vs activation-sized: which casts a
    # change of the parameters' dtype would remove and which it would not)
    out["copies_by_shape"] = _top_rows([e for e in by_shape if e.key in COPY_OPS], device, passes, 60, shapes=True)
    return out


#: the aten ops of ``copies_by_shape``: ``_to_copy`` is every dtype cast (its input's shape),
#: ``copy_`` every copy, casts included, and it holds their kernels' time (``to`` / ``contiguous``
#: / ``clone`` only wrap these two)
COPY_OPS = ("aten::copy_", "aten::_to_copy")


def _top_rows(avgs: object, device: str, passes: int, rows: int, shapes: bool = False) -> list[dict]:
    """[{name, calls, ms (self time on the device, or the CPU), [shapes]}] per pass, largest first."""
    def self_ms(e: object) -> float:
        if on_cuda(device):
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = e.self_cpu_time_total
        return us / passes / 1e3

    top = sorted(avgs, key=self_ms, reverse=True)[:rows]
    res = []
    for e in top:
        r = {"name": e.key, "calls": e.count / passes, "ms": round(self_ms(e), 4)}
        if shapes:
            r["shapes"] = str(e.input_shapes)[:200]
        res.append(r)
    return res
