"""The decode engine: static caches and the one-token step replayed from a CUDA graph.

Autoregressive decoding of a small batch is launch-bound: a step of a 12-layer hybrid is a
few hundred small kernels, and issuing them from Python costs more than running them. The
engine removes that cost the way gpt-fast and vLLM do (and ``torch.compile``'s
"reduce-overhead" mode does for a traced model): every buffer the step reads or writes
gets a fixed address, the step is captured once as a CUDA graph per batch size and cache
capacity, and each token is one ``replay``.

How any recipe gets fixed addresses, without a second implementation of each component:

* ``HybridCache.static_copy(capacity)`` gives every layer state buffers of its own.
  Constant-size states (gdn / Mamba-3 / ATLAS memories, conv tails, positions) are cloned;
  attention preallocates ``capacity`` key/value slots and appends in place
  (``AttentionState`` documents the static form: no host read, no reallocation).
* A step runs the ordinary forward on a *binding* of those buffers (``LayerState.fork``:
  new containers, the same tensors). Components replace the tensors of their state as
  usual; afterwards ``load_`` copies every replaced tensor into its buffer. Captured, those
  copies are part of the graph, so a replay reads and writes exactly the static buffers.
  A component may instead write a static buffer in place, skipping the copy (``load_`` skips a
  tensor the binding still shares): attention appends its keys, gdn's decode kernel updates S
  (``GDNState.static``, ``kernels.gdn.gated_delta_rule_decode_``).
* The prefill stays the ordinary forward (one call, logits of the last position only);
  its cache is copied into the static buffers with ``load_``.
* Projections of one input (gdn's q|k|v|a|b|z, attention's q|k|v|gate, the MoE router and
  shared-expert gate, SwiGLU's gate|up) run as one GEMM on packed weight copies
  (``kernels.linear.ProjectionPacks``, one set per model shared by its engines, made in the
  first step; one more copy of those weights in memory); every ``load`` (once per ``generate``
  call) copies the modules' current weights into them in place, so the graphs read them and
  never decode with weights older than the call.

The first ``WARMUP`` steps of a new engine run eagerly on a side stream (Triton compiles
and autotunes there, lazily built tables are made), then the step is captured. If the
capture fails (a component reads a tensor back to the host inside the step, e.g. ATLAS's
cached chunking or ETD's adaptive exit), the engine says so once (a ``RuntimeWarning``
naming the reason) and decodes eagerly on the same static caches. Engines are kept on the
model per (batch size, capacity, dtype, device, mode, the prefilled cache's form: which
states it holds), at most ``MAX_ENGINES``; a change of
the parameters' storage (``.to()``, ``load_state_dict`` with ``assign``) makes a new one.

Greedy output is token-for-token the dynamic path's: the same kernels run on the same
values (tests/test_decode_engine.py, CPU for the static caches, GPU for the graphs).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor

from ..core.cache import HybridCache
from ..kernels.linear import ProjectionPacks, packed

#: eager steps before the capture (compiles and autotuning happen in them)
WARMUP = 2
#: engines kept per model (each holds its static caches and its graph's memory pool)
MAX_ENGINES = 4
#: attention capacity is rounded up to a multiple of this, so engines are reused across calls
CAPACITY_STEP = 256
ENGINES = ("auto", "graph", "static", "dynamic")


def attention_slots(cache: HybridCache) -> int:
    """The most token slots any state of ``cache`` holds (``LayerState.slots``; 0 without attention)."""
    return max((s.slots() for s in cache.states if s is not None), default=0)


def _form_key(cache: HybridCache) -> tuple:
    """Which tensors the prefilled cache's states hold (a layer application the prefill skipped, e.g.
    an ETD think iteration or a Dr.LLM route, leaves its state empty) and which decisions it keeps:
    static buffers are made for one form, and ``load_`` refuses another."""
    return (tuple(tuple(n for n, _ in s.tensors()) if s is not None else None for s in cache.states),
            tuple(sorted(cache.extra)))


def _params_key(model: Any) -> tuple:
    return tuple(p.data_ptr() for p in model.parameters())


class DecodeEngine:
    """Static caches for one batch size and capacity, and the step captured over them."""

    def __init__(self, model: Any, batch_size: int, capacity: int, device: torch.device, graph: bool):
        self.model, self.batch_size, self.capacity, self.device = model, batch_size, capacity, device
        self.want_graph = graph and device.type == "cuda"
        self.buffers: HybridCache | None = None
        self.tok = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: Tensor | None = None
        self.eager_steps = 0
        self.notice: str | None = None  # why this engine decodes eagerly (capture failed)
        self.side = torch.cuda.Stream(device) if self.want_graph else None
        # one set of packed projections per model, shared by its engines (one more copy of those
        # weights, not one per engine)
        self.packs = model.__dict__.setdefault("_projection_packs", ProjectionPacks())

    # ------------------------------------------------------------------ buffers
    def load(self, cache: HybridCache) -> None:
        """Copy a prefilled cache into the static buffers (allocated on the first load) and the
        model's current weights into the packed projections."""
        self.packs.sync()
        if self.buffers is None:
            self.buffers = cache.static_copy(self.capacity)
        else:
            self.buffers.load_(cache)

    def _binding(self) -> HybridCache:
        """A cache whose states are new containers over the static buffers."""
        b = self.buffers
        live = HybridCache([s.fork() if s is not None else None for s in b.states], b.batch_size, self.device, b.owner)
        live.pos, live.started, live.extra = b.pos, b.started, b.extra
        return live

    def _forward(self) -> Tensor:
        """One step on the static buffers; everything the forward replaced is copied back."""
        live = self._binding()
        with packed(self.packs):
            logits = self.model(self.tok, cache=live, check_inputs=False, collect_aux=False).logits[:, -1]
        self.buffers.load_(live)
        return logits

    # ------------------------------------------------------------------ stepping
    def step(self, tokens: Tensor) -> Tensor:
        """Feed tokens [B]; the logits [B, V] of the next position. With a graph the result
        is the graph's output buffer: read it before the next step."""
        self.tok.copy_(tokens.view(-1, 1))
        if self.graph is None and self.want_graph and self.notice is None and self.eager_steps >= WARMUP:
            self._capture()
        if self.graph is not None:
            self.graph.replay()
            return self.out
        self.eager_steps += 1
        if self.side is None or self.notice is not None:
            return self._forward()
        cur = torch.cuda.current_stream(self.device)
        self.side.wait_stream(cur)
        with torch.cuda.stream(self.side):
            out = self._forward()
        cur.wait_stream(self.side)
        out.record_stream(cur)
        return out

    def _capture(self) -> None:
        g = torch.cuda.CUDAGraph()
        try:
            with _no_autocast_cache(self.device), torch.cuda.graph(g):
                out = self._forward()
        except Exception as e:  # noqa: BLE001 - any capture failure: decode eagerly, and say why once
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self.notice = (f"decode: the step could not be captured as a CUDA graph ({type(e).__name__}: {msg}); "
                           "decoding eagerly on static caches (something in the step reads a tensor back to the host)")
            warnings.warn(self.notice, RuntimeWarning, stacklevel=3)
            torch.cuda.synchronize(self.device)
            return
        self.graph, self.out = g, out

    @property
    def mode(self) -> str:
        return "graph" if self.graph is not None else "static"


@contextlib.contextmanager
def _no_autocast_cache(device: torch.device):
    """Autocast's cast cache must be off while capturing (the cached casts would outlive it)."""
    if not torch.is_autocast_enabled(device.type):
        yield
        return
    was = torch.is_autocast_cache_enabled()
    torch.set_autocast_cache_enabled(False)
    try:
        yield
    finally:
        torch.set_autocast_cache_enabled(was)


def engine_for(model: Any, cache: HybridCache, max_new_tokens: int, graph: bool) -> DecodeEngine:
    """The model's engine for this prefilled cache (made, or reused from an earlier call),
    loaded with it."""
    need = attention_slots(cache) + max_new_tokens
    capacity = max(CAPACITY_STEP, -(-need // CAPACITY_STEP) * CAPACITY_STEP) if need else 0
    dev = cache.pos.device
    on = torch.is_autocast_enabled(dev.type)  # and its dtype: an engine made under bf16 keeps bf16 K/V buffers
    key = (cache.batch_size, capacity, dev, model.dtype, graph, model.training,
           torch.get_autocast_dtype(dev.type) if on else None, _params_key(model), _form_key(cache))
    engines: OrderedDict = model.__dict__.setdefault("_decode_engines", OrderedDict())
    eng = engines.pop(key, None)
    if eng is None:
        eng = DecodeEngine(model, cache.batch_size, capacity, dev, graph)
        while len(engines) >= MAX_ENGINES:
            engines.popitem(last=False)
    engines[key] = eng
    eng.load(cache)
    return eng


def clear_engines(model: Any) -> None:
    """Drop the model's decode engines (their static caches and graphs' memory) and its packed
    projections."""
    model.__dict__.pop("_decode_engines", None)
    model.__dict__.pop("_projection_packs", None)


def resolve_engine(engine: str, device: torch.device, max_new_tokens: int) -> str:
    """``auto``: ``graph`` on CUDA when there are enough steps to replay, else ``dynamic``."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "graph" and device.type != "cuda":
        raise ValueError(f"engine='graph' needs a CUDA device (the input is on {device})")
    if engine == "auto":
        return "graph" if device.type == "cuda" and max_new_tokens > WARMUP + 1 else "dynamic"
    return engine
