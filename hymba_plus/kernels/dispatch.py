"""One kernel dispatch for every op.

Each op module registers its fast path's availability probe::

    fast_path("gdn", probe=lambda: importlib.import_module("fla.ops.gated_delta_rule"),
              doc="fla chunk_gated_delta_rule")

and asks, at call time, ``use_fast("gdn", x)``. The answer is True only when

* ``HYMBA_KERNELS`` is not ``reference`` (``auto``, the default, or ``fast``),
* the op is not named in ``HYMBA_KERNELS_OFF`` (``off()``),
* every given tensor is on the fast path's device (CUDA, unless it was registered for another:
  ``fast_path(..., device="cpu")``), and
* the probe succeeded (it runs once, also when threads ask at once, with autograd on, autocast
  off and TF32 off whatever the caller's grad mode, autocast and ``allow_tf32``, fla's and
  mamba-ssm's autotuned kernels on their first launch config (``PROBE_PINNED``; retried
  autotuned if that fails); an ImportError or any failure means "not available").

In ``auto`` mode a fast path whose probe failed is announced once, in one line on stderr, the
first time a call on its device falls back because of it ("fast path gdn unavailable (ImportError:
...): using the reference path"). ``HYMBA_KERNELS=fast`` makes a missing fast path an error
instead (for benchmarks and GPU tests). ``available()`` reports every op's status (``hymba
info`` and ARCHITECTURE.md use it; under ``reference``, off, unprobed). Nothing is registered for an op that has no real fast path.

One fast path off: ``HYMBA_KERNELS_OFF=name[,name...]`` (op names as registered, lower case, as
``hymba info --kernels`` lists them; spaces and empty items are ignored) turns those ops' fast paths
off and leaves the rest as ``HYMBA_KERNELS`` says: a named op takes its reference path in ``auto``
and in ``fast`` mode (not an error there), with no notice (the user asked), its probe never runs
(``use_fast``, ``probe_all``, ``available``), and ``statuses()`` / ``available()`` / ``hymba info``
show it ``off (HYMBA_KERNELS_OFF)``. A name that is no registered op is a ``ValueError`` naming it
and the known ops, raised where the list is read: at a ``use_fast`` in ``auto`` or ``fast`` mode,
and in ``probe_all``, ``available`` (``hymba info``) and ``statuses`` in any mode. Every op is
registered by then (importing any ``hymba_plus`` module imports every kernel module).

Probes and CUDA graphs: a probe never runs while the current CUDA stream is capturing a graph
(it would fail for reasons unrelated to its fast path, and the failure, cached, would keep
the process on the reference path for good). A first use of an unprobed fast path inside a
capture raises ``ProbeInCapture`` instead. Before capturing by hand, run the step once
eagerly (``torch.cuda.make_graphed_callables``' warm-up does, so ``training/cuda_graph.py``
needs nothing more) or call ``probe_all()``, which runs every registered probe (also those of
ops the model never uses; the Mamba-3 MIMO one compiles a TileLang backward).

Probes and torch.compile: a call that torch.compile traces gets its answer from plain Python at
trace time (``_decide_outside_trace``, a constant in the graph): a first use there probes eagerly,
with the compile flag off and real tensors, and a fallback's notice is printed then, so a probe is
never traced and a compiled model does not fall back silently. So does a call on fake tensors
(a FakeTensorMode outside a compile): its probe runs on real ones.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake


class ProbeInCapture(RuntimeError):
    """A fast path was used for the first time while a CUDA graph was being captured."""


_as_if_capturing = 0  # > 0 inside ``as_if_capturing()``


def capturing() -> bool:
    """Is the current CUDA stream capturing a CUDA graph? (False without CUDA; True inside
    ``as_if_capturing()``.)"""
    if _as_if_capturing:
        return True
    if torch.compiler.is_compiling():  # a trace captures nothing (reduce-overhead records its graphs after
        return False  # it), and Dynamo tracing the CPU build's stub failed the compile (no except catches that)
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # noqa: BLE001 - a build without CUDA has only a stub that raises
        return False


@contextlib.contextmanager
def as_if_capturing() -> Iterator[None]:
    """Code that asks ``capturing()`` takes its capture branch (no probe, no host-side check), while
    an eager run looks for what would break a capture (``training.cuda_graph.host_read_site``)."""
    global _as_if_capturing
    _as_if_capturing += 1
    try:
        yield
    finally:
        _as_if_capturing -= 1


@dataclass
class FastPath:
    name: str
    probe: Callable[[], Any]
    doc: str
    status: bool | None = None
    error: str = ""
    warned: bool = False  # the one-line "unavailable" notice was printed (auto mode)
    device: str = "cuda"  # the device type whose tensors it takes

    def ok(self) -> bool:
        if self.status is None:
            with _PROBE_LOCK:  # two threads' first uses: one probes, the other reads its answer
                if self.status is None:
                    self._probe()
        return self.status

    def _probe(self) -> None:
        """Run the probe once (``ok`` holds the lock): ``status`` and ``error`` say how it went."""
        if capturing():  # never probe (nor cache a failure) inside a capture
            raise ProbeInCapture(
                f"the fast path {self.name!r} was first used while a CUDA graph was being captured, where its "
                "probe cannot run (it would fail for reasons unrelated to the fast path): call "
                "hymba_plus.kernels.dispatch.probe_all() before capturing, or run the step once eagerly first")
        try:
            # a first use may come under no_grad / inference_mode; probes that check a
            # backward need autograd, and what they make is thrown away. It may also come
            # inside a training forward's autocast: a probe sets its own dtypes, and a
            # backward it runs there would run in bf16 (the ATLAS probe's gradients were off
            # by 160% on an H200 this way, so the fast path was turned off in training)
            # and under TF32 float32 matmuls (``hymba train --tf32``): probes hold float32 kernels
            # to float32 tolerances, so they run with TF32 off
            with (torch.inference_mode(False), torch.enable_grad(), _no_autocast(), full_float32(),
                  side_check()):  # (a first use may be inside a checkpointed block: core/recompute.py)
                _run_probe(self.probe)
            self.status = True
        except Exception as e:  # noqa: BLE001 - any import/probe failure = unavailable
            self.status, self.error = False, f"{type(e).__name__}: {e}"


_FAST: dict[str, FastPath] = {}
_PROBE_LOCK = threading.RLock()  # (reentrant: a probe may ask for another op's fast path)

#: packages whose autotuned Triton kernels a probe runs with their first launch config
#: (``pinned_autotune``): a probe's small shapes are never used again, so benchmarking every
#: launch config there (fla 0.6.0 has 141 autotuned kernels) only delays the first step; the
#: op autotunes at its real shapes afterwards. Empty: probes autotune like any call.
PROBE_PINNED = ("fla.", "mamba_ssm.")


def _run_probe(probe: Callable[[], Any]) -> None:
    """``probe()`` with ``PROBE_PINNED``'s kernels on their first launch config where CUDA and
    Triton are here; if that fails, once more as the op will run (autotuned: a first launch
    config that does not fit this GPU must not turn a working fast path off)."""
    if not PROBE_PINNED or not torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        probe()
        return
    try:
        with pinned_autotune(*PROBE_PINNED):
            probe()
    except Exception:  # noqa: BLE001 - any failure: the probe as the op runs decides
        probe()


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    """Autocast off on the CPU and on CUDA (probes run with the dtypes they choose)."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
        yield


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """float32 matmuls on CUDA in float32 for the block (TF32 off), the caller's setting
    restored after it. For checks that compare float32 kernels with float64 references."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@contextlib.contextmanager
def without_saved_tensor_hooks() -> Iterator[None]:
    """The saved-tensor default hooks lifted for the block, restored after it. Activation
    checkpointing (``core/recompute.py``) packs every tensor a checkpointed block saves through
    its hooks; code that runs a backward of its own inside a block (a fast path's probe, the
    ATLAS reference's per-token gradients by ``torch.func``, which refuses to run under such
    hooks) must save its tensors plainly: its backward would otherwise unpack them through the
    checkpoint. (Private PyTorch hooks API, as torch.compile uses it.) Under torch.compile there is
    nothing to lift (the trainer refuses activation checkpointing with it) and Dynamo cannot trace
    the hooks API: the block runs as it is, with no graph break."""
    if torch.compiler.is_compiling():
        yield
        return
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    lifted = []
    while top is not None and (hooks := top(True)) is not None:
        lifted.append(hooks)
        torch._C._autograd._pop_saved_tensors_default_hooks()
    try:
        yield
    finally:
        for pack, unpack in reversed(lifted):
            torch._C._autograd._push_saved_tensors_default_hooks(pack, unpack)


@contextlib.contextmanager
def side_check() -> Iterator[None]:
    """For a check that runs inside a forward (a fast path's probe, a first-call comparison of a
    kernel with its reference): the saved-tensor hooks lifted (``without_saved_tensor_hooks``) and
    the CPU's and the current CUDA device's random states restored after it (``torch.random.fork_rng``),
    so that a checkpointed block's recomputation, which skips the check, draws its dropout masks as
    the forward did."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with without_saved_tensor_hooks(), torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield


def fast_path(name: str, probe: Callable[[], Any], doc: str, device: str = "cuda") -> None:
    """Register ``name``'s fast path for tensors on ``device`` (a device type: most fast paths
    are CUDA kernels; a CPU one is a faster PyTorch form of the reference's mathematics)."""
    _FAST[name] = FastPath(name, probe, doc, device=device)


def failed_at_run(name: str, err: BaseException) -> None:
    """A fast path that passed its probe failed at a call before computing anything (e.g. a compile
    for a shape the probe did not have): under ``HYMBA_KERNELS=fast`` ``err`` is raised; under
    ``auto`` the fast path is off for the rest of the process, said once in one line
    (``unavailable_line``), and the caller runs the reference for this call."""
    if mode() == "fast":
        raise err
    fp = _FAST[name]
    first = f"{type(err).__name__}: {err}".strip().splitlines()[0]
    fp.status, fp.error = False, f"failed at a call after its probe passed: {first}"
    if not fp.warned:
        fp.warned = True
        print(unavailable_line(fp), file=sys.stderr, flush=True)


def forget(name: str) -> None:
    """Drop the fast path's probe result, so that its next use probes again (after a change of
    the settings the probe ran under, e.g. ``kernels.atlas.settings``)."""
    fp = _FAST[name]
    fp.status, fp.error, fp.warned = None, "", False


def mode() -> str:
    m = os.environ.get("HYMBA_KERNELS", "auto").lower()
    if m not in ("auto", "reference", "fast"):
        raise ValueError(f"HYMBA_KERNELS must be auto, reference or fast, got {m!r}")
    return m


#: what ``statuses()`` and ``available()`` say of an op named in ``HYMBA_KERNELS_OFF``
OFF = "off (HYMBA_KERNELS_OFF)"


def off() -> frozenset[str]:
    """The ops ``HYMBA_KERNELS_OFF`` turns off (comma-separated names as registered; spaces and empty
    items ignored). A name that is no registered op is a ValueError naming it and the known ops."""
    raw = os.environ.get("HYMBA_KERNELS_OFF", "")
    if not raw:  # (the common case, at every call)
        return frozenset()
    names = frozenset(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(names - _FAST.keys())
    if unknown:
        raise ValueError(f"HYMBA_KERNELS_OFF names no registered fast path: {', '.join(map(repr, unknown))}; "
                         f"known: {', '.join(sorted(_FAST))}")
    return names


def use_fast(name: str, *tensors: torch.Tensor) -> bool:
    m = mode()
    if m == "reference":
        return False
    fp = _FAST.get(name)
    device = "cuda" if fp is None else fp.device
    on_device = all(t.device.type == device for t in tensors)
    if tracing(*tensors):  # the answer (probe, notice) in plain Python with real tensors, a constant in a graph
        return _decide_outside_trace(name, m, on_device)
    return _decide(name, m, on_device)


def _decide(name: str, m: str, on_device: bool) -> bool:
    """``use_fast``'s answer in mode ``m`` (not ``reference``) for a call whose tensors are all on
    the fast path's device (``on_device``) or not; probes at a first use, says a fallback once. An op
    named in ``HYMBA_KERNELS_OFF`` is off: no probe, no notice, no error."""
    if name in off():
        return False
    fp = _FAST.get(name)
    if fp is None or not on_device or not fp.ok():
        if m == "fast" and on_device:
            why = "no fast path is registered" if fp is None else fp.error
            raise RuntimeError(f"HYMBA_KERNELS=fast but the fast path for {name!r} is unavailable: {why}")
        if fp is not None and on_device and not fp.warned:  # auto: once per op
            fp.warned = True
            print(unavailable_line(fp), file=sys.stderr, flush=True)
        return False
    return True


def assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing Dynamo: that function imports
    ``torch._dynamo`` (1.2-1.7 s, the larger part of ``import hymba_plus``, i.e. of every ``hymba``
    command's start and every test subprocess) only to set the attribute its decorator sets; a call
    that Dynamo traces has Dynamo imported anyway. ``tests/test_dispatch.py`` checks that Dynamo's
    decorator still does just this."""
    fn._dynamo_marked_constant = True
    return fn


@assume_constant_result
def _decide_outside_trace(name: str, m: str, on_device: bool) -> bool:
    """``_decide`` for a call that torch.compile is tracing: Dynamo runs this in plain Python at
    trace time and puts the answer in the graph as a constant, so a probe is never traced (traced,
    a probe cannot lift the saved-tensor hooks, so a ``fullgraph`` compile failed; a probe's own
    checks saw ``tracing()`` and compared the reference with itself), and a fallback's notice is
    printed (a print in the trace would break the graph). The compile flag is off and no fake or
    proxy tensor mode is on inside (``_eager``), as in an eager first use; also for a call on fake
    tensors outside a compile (a FakeTensorMode's probe made fake tensors, could not read them,
    and its cached failure kept the real run on the reference path)."""
    with _eager():
        return _decide(name, m, on_device)


@contextlib.contextmanager
def _eager() -> Iterator[None]:
    """Eager PyTorch for the block when it runs inside a compile (``_decide_outside_trace``):
    ``torch.compiler.is_compiling()`` False and tensors real, the compile's state restored after."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    flag = getattr(torch.compiler, "_is_compiling_flag", None)  # (private; what is_compiling() reads)
    if flag is not None:
        torch.compiler._is_compiling_flag = False
    try:
        with unset_fake_temporarily(), disable_proxy_modes_tracing():
            yield
    finally:
        if flag is not None:
            torch.compiler._is_compiling_flag = flag


def unavailable_line(fp: FastPath) -> str:
    """The one line ``auto`` mode prints when a call on ``fp``'s device falls back from ``fp``."""
    first = fp.error.strip().splitlines()[0] if fp.error.strip() else "probe failed"
    if len(first) > 200:
        first = first[:197] + "..."
    return f"fast path {fp.name} unavailable ({first}): using the reference path"


def probe_all(names: Iterable[str] | None = None) -> dict[str, bool]:
    """Run the probes of ``names`` (default: every registered fast path) that have not run
    yet, outside any CUDA-graph capture; returns op -> available. Call it before capturing a
    step in a CUDA graph (a probe cannot run inside a capture). Nothing is probed with
    ``HYMBA_KERNELS=reference`` (no fast path will be asked for), nor for the ops named in
    ``HYMBA_KERNELS_OFF`` (False). Prints nothing: the fallback notice comes at a fast path's
    first use."""
    if capturing():
        raise ProbeInCapture("dispatch.probe_all() was called while a CUDA graph was being captured: call it "
                             "before the capture")
    selected = sorted(_FAST) if names is None else list(names)
    unknown = [n for n in selected if n not in _FAST]
    if unknown:
        raise KeyError(f"no fast path is registered for {unknown}")
    m, switched_off = mode(), off()
    if m == "reference":
        return {n: False for n in selected}
    return {n: n not in switched_off and _FAST[n].ok() for n in selected}


def tracing(*tensors: torch.Tensor) -> bool:
    """Is this call being traced (``torch.compile``, also its backward graphs, or fake
    tensors)? Hand-written Triton kernels run in eager mode only: under tracing the PyTorch
    reference is traced instead, so Inductor fuses it with its neighbours."""
    return torch.compiler.is_compiling() or any(is_fake(t) for t in tensors)


def compute_dtype(*xs: "torch.Tensor | torch.dtype | None") -> torch.dtype:
    """The dtype reference math runs in: float64 when any input is float64, else float32
    (16-bit models compute their recurrences and gates in float32)."""
    f64 = any(x is not None and (x if isinstance(x, torch.dtype) else x.dtype) == torch.float64 for x in xs)
    return torch.float64 if f64 else torch.float32


def reference_math(fn: Callable) -> Callable:
    """A reference kernel's math in the dtype it casts its inputs to (``compute_dtype``), not in
    autocast's: under bf16 autocast every matmul of a recurrence would otherwise round to bf16
    (a GDN state ~5e-3 off float64 at T 1024 against 3e-7, a Mamba-3 state 3e-3 against 4e-7)."""
    import functools

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        # two plain context managers, not an ExitStack: Dynamo cannot trace an autocast entered
        # through one (a graph break at every reference call under torch.compile)
        cpu = torch.autocast("cpu", enabled=False) if torch.is_autocast_enabled("cpu") else contextlib.nullcontext()
        cuda = torch.autocast("cuda", enabled=False) if torch.is_autocast_enabled("cuda") else contextlib.nullcontext()
        with cpu, cuda:
            return fn(*args, **kwargs)

    return run


def autocast_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's GEMMs run in: autocast's where autocast is on for x's device, else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| in float32 on the host (how probes compare a fast path
    with its reference)."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))


def statuses() -> dict[str, bool | str | None]:
    """op -> True (fast path in use), its probe's error, ``OFF`` (named in ``HYMBA_KERNELS_OFF``), or
    None (not asked for yet), without running any probe (``available`` runs them all, compiles included)."""
    switched_off = off()
    return {n: OFF if n in switched_off else (fp.error or False) if fp.status is False else fp.status
            for n, fp in sorted(_FAST.items())}


def device_of(name: str) -> str:
    """The device type whose tensors ``name``'s fast path takes (``cuda`` for most)."""
    return _FAST[name].device


def available() -> dict[str, tuple[str, bool, str]]:
    """op -> (description, importable here, error). With ``HYMBA_KERNELS=reference`` nothing is
    probed (as in ``probe_all``: no fast path will be asked for) and every path is off by the
    setting: (description, False, ``"off: HYMBA_KERNELS=reference"``); an op named in
    ``HYMBA_KERNELS_OFF`` is not probed either: (description, False, ``OFF``)."""
    m, switched_off = mode(), off()
    if m == "reference":
        return {n: (fp.doc, False, "off: HYMBA_KERNELS=reference") for n, fp in sorted(_FAST.items())}
    return {n: (fp.doc, False, OFF) if n in switched_off else (fp.doc, fp.ok(), fp.error)
            for n, fp in sorted(_FAST.items())}


#: the modules that define the third-party autotuned kernels our fast paths call, by package
AUTOTUNED_MODULES = {
    "fla.": ("fla.ops.gated_delta_rule", "fla.modules.convolution"),
    "mamba_ssm.": ("mamba_ssm.ops.triton.mamba3.mamba3_siso_combined",),
}


@contextlib.contextmanager
def pinned_autotune(*prefixes: str) -> Iterator[int]:
    """Within the block, every Triton autotuned kernel defined in an imported module whose
    name starts with one of ``prefixes`` runs its first launch config instead of autotuning;
    yields how many kernels were pinned, and restores their configs afterwards.

    fla and mamba-ssm autotune 9-81 launch configs per kernel, and Triton compiles them again
    for every new integer specialization (T = 1, T % 16 != 0, ...): minutes of ``ptxas``
    before a first step. The numerics do not depend on the launch config, so correctness
    tests and wrapper-overhead comparisons can skip that; training and absolute timings should
    autotune. Kernels wrapped by ``triton.heuristics`` are found through their ``fn`` chain.
    The ``AUTOTUNED_MODULES`` of a prefix are imported first (a package missing here has
    nothing to pin).
    """
    with _sliced_autotune(prefixes, lambda configs: configs[:1]) as n:
        yield n


@contextlib.contextmanager
def sharded_autotune(*prefixes: str, shard: int, of: int) -> Iterator[int]:
    """Like ``pinned_autotune``, but each kernel keeps every ``of``-th launch config from number
    ``shard`` on (``configs[shard::of]``; its first one where that is empty). ``of`` processes
    that run the same workload, one per shard, compile every config once between them, in
    parallel; Triton's on-disk cache then holds them all, and a last run with the full lists
    only benchmarks (``benchmarks/warm_autotune.py``: Triton compiles an autotuned kernel's
    configs one after another, minutes of ``ptxas`` for mamba-ssm's Mamba-3 backward). The
    shards' autotuning results never stand in for the full list's: Triton keys them by the
    config list."""
    if not 0 <= shard < of:
        raise ValueError(f"autotune shard {shard} of {of}: need 0 <= shard < of")
    with _sliced_autotune(prefixes, lambda configs: configs[shard::of] or configs[:1]) as n:
        yield n


@contextlib.contextmanager
def _sliced_autotune(prefixes: tuple[str, ...], pick: Callable[[list], list]) -> Iterator[int]:
    """Replace the launch configs of the autotuned kernels under ``prefixes`` by ``pick(configs)``
    for the block (see ``pinned_autotune``); yields how many kernels changed."""
    from triton.runtime.autotuner import Autotuner

    for prefix in prefixes:
        for name in AUTOTUNED_MODULES.get(prefix, ()):
            with contextlib.suppress(Exception):  # not installed, or broken here: nothing to change
                importlib.import_module(name)

    saved, seen = [], set()
    try:
        for name, mod in list(sys.modules.items()):
            if mod is None or not name.startswith(prefixes):
                continue
            for obj in list(vars(mod).values()):
                while obj is not None and type(obj).__module__.startswith("triton"):
                    if isinstance(obj, Autotuner):
                        if id(obj) not in seen and len(obj.configs) > 1:
                            seen.add(id(obj))
                            saved.append((obj, obj.configs))
                            obj.configs = pick(obj.configs)
                        break
                    obj = getattr(obj, "fn", None)
        yield len(saved)
    finally:
        for obj, configs in saved:
            obj.configs = configs
