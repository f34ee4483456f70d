"""Timing shared by the benchmark scripts: median milliseconds, CUDA events on a GPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def bench(fn: Callable[[], object], device: str, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of fn() (CUDA events on GPU, perf_counter on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def profile_passes(fn: Callable[[], object], device: str, passes: int = 3, rows: int = 25) -> dict:
    """Run fn() ``passes`` times under torch.profiler; print the top ops / kernels (also by input
    shape, and on CUDA by host time) and return per pass the number of device kernels, their
    summed time and the host time to issue the pass (CUDA), or the number of aten ops (CPU).
    A pass whose wall time is well above its kernel time, and close to its host time, is bound
    by launches, not by the GPU."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm: first-call compiles and caches stay out of the profile
    host = []  # host time to issue one pass (no sync inside): launch-bound when close to the wall time
    for _ in range(passes):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t) * 1e3)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(passes):
            fn()
        if device == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=rows), flush=True)
    print(prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=rows, max_name_column_width=40),
          flush=True)
    if device == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows), flush=True)
        # GPU-side ranges of user annotations (Inductor's "## Call CompiledFxGraph ... ##" around a
        # compiled graph's kernels) are not kernels: counting them counted those kernels twice
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not getattr(e, "is_user_annotation", False) and not e.name.startswith("## ")]
        out = {"kernels_per_pass": len(kernels) / passes,
               "kernel_ms_per_pass": sum(e.device_time_total for e in kernels) / passes / 1e3,
               "host_ms_per_pass": statistics.median(host)}
    else:
        out = {"aten_ops_per_pass": sum(1 for e in prof.events() if e.name.startswith("aten::")) / passes}
    print(f"  per pass: {', '.join(f'{k} {v:.3f}' for k, v in out.items())}", flush=True)
    # the tables' top rows also in the result (a device call returns only the end of its output)
    out["top"] = _top_rows(prof.key_averages(), device, passes, rows)
    by_shape = prof.key_averages(group_by_input_shape=True)
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
        if device == "cuda":
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
