"""One cache protocol for every component.

``HybridCache`` holds one ``LayerState`` per layer application plus the per-row position
counter. Positions always come from here, never from the caller.

How padding works (the rule every component relies on)
------------------------------------------------------
The model *compacts* every chunk before the layers see it: in each row the real tokens
are moved, in order, to the front of the chunk, and the padding to the back. A layer
therefore sees ``StepContext.lengths[b]`` real tokens followed by inert slots. Its
contract:

* outputs at inert slots may be anything finite (they are discarded);
* its state advances by exactly ``lengths[b]`` tokens in row ``b`` (inert slots never
  touch a recurrent state; attention records them as invalid keys);
* when ``lengths is None`` every slot is real (the fast training path).

Because padding is removed this way, a padded row gives exactly the result of the
unpadded row, whatever the mask looks like, and the cache remembers it: later chunks
need no mask.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor


class LayerState:
    """Base for per-layer cache states.

    Subclasses are dataclasses whose tensor fields have the batch on dim 0. Fields that
    are ``None`` (not yet allocated) are allowed. ``reorder`` and ``nbytes`` work on every
    tensor field (nested lists/tuples of tensors too), so a state type only declares its
    fields and how it advances (the component does that).
    """

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                yield f.name, v
            elif isinstance(v, LayerState):  # nested states (hymba: attention + ssm)
                for name, t in v.tensors():
                    yield f"{f.name}.{name}", t
            elif isinstance(v, (list, tuple)):
                for i, t in enumerate(v):
                    if isinstance(t, Tensor):
                        yield f"{f.name}[{i}]", t

    def reorder(self, index: Tensor) -> None:
        """Select / reorder batch rows (beam search, dropping finished rows)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor) and f.metadata.get("batch", True):
                setattr(self, f.name, v.index_select(0, index.to(v.device)))
            elif isinstance(v, LayerState):
                v.reorder(index)
            elif isinstance(v, list):
                setattr(self, f.name, [t.index_select(0, index.to(t.device)) for t in v])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in self.tensors())

    def slots(self) -> int:
        """Token slots this state keeps (what a static copy must hold): 0 for constant-size
        states; a state that grows per token (attention) overrides it; nested states: the most."""
        return max((v.slots() for f in dataclasses.fields(self)  # type: ignore[arg-type]
                    if isinstance(v := getattr(self, f.name), LayerState)), default=0)

    def static_copy(self, capacity: int) -> "LayerState":
        """A copy with buffers of its own that a decode step can be replayed on (the decode
        engine, ``models/decode_engine.py``): what ``load_`` writes into, whatever ``src``
        it is later given. Constant-size states clone their tensors; a state that grows
        (attention's keys and values) overrides this to preallocate ``capacity`` slots."""
        return self._rebuilt(Tensor.clone, lambda s: s.static_copy(capacity))

    def load_(self, src: "LayerState") -> None:
        """Write ``src`` (a state of the same layer, as a forward left it) into this state's
        buffers in place, so their addresses stay what a captured CUDA graph reads and writes.
        A tensor ``src`` shares with this state is skipped, and so is a field whose metadata
        marks it as the state's *form* (``{"form": True}``, e.g. ``GDNState.static``: what kind of
        buffers these are, not their contents). Raises ``ValueError`` when the shapes differ or a
        field is set on one side only (the state cannot be static)."""
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("form"):
                continue
            dst, v = getattr(self, f.name), getattr(src, f.name)
            if isinstance(dst, LayerState):
                if not isinstance(v, LayerState):
                    raise ValueError(f"{type(self).__name__}.{f.name}: not set in the state to load")
                dst.load_(v)
            elif isinstance(dst, list) or isinstance(v, list):
                if not (isinstance(dst, list) and isinstance(v, list)) or len(dst) != len(v):
                    raise ValueError(f"{type(self).__name__}.{f.name}: lists of different lengths")
                for a, b in zip(dst, v):
                    _copy_buffer(type(self).__name__, f.name, a, b)
            else:
                _copy_buffer(type(self).__name__, f.name, dst, v)

    # -- recording (speculative verification; ``StepContext.record``)
    def record(self, commit: Callable[["LayerState", Tensor, int], None]) -> None:
        """Called by a layer's recording forward (``StepContext.record``): ``commit(state, keep,
        kmax)`` sets ``state`` (this one) to what it was after the first ``keep[b]`` real tokens of
        the chunk just run (``kmax = max(keep)``, a host integer), without a forward. A fork never
        carries it. ``commit`` is given the state rather than holding it: a recording that held
        its own state would be a reference cycle, and a dropped cache (its KV, its states, the
        recording) would wait for Python's cycle collector instead of being freed at once."""
        self.__dict__["_recording"] = commit

    def record_rows(self, states: "LayerState", n: int) -> None:
        """``record`` for a state given at every position of the chunk: ``states`` is a state of
        this type of batch ``B*(n+1)`` whose row ``b*(n+1) + p`` is this state after ``p`` tokens
        of the chunk (``p = 0 .. n``; the layout of the block-diffusion clean pass,
        ``boundary_forward``, with a block start at every position). Committing gathers row
        ``keep[b]`` of every field (``reorder``): memory ``(n+1)`` times the state's until then."""
        def commit(state: LayerState, keep: Tensor, kmax: int) -> None:
            idx = torch.arange(keep.shape[0], device=keep.device) * (n + 1) + keep
            states.reorder(idx)
            for f in dataclasses.fields(state):  # type: ignore[arg-type]
                if not f.metadata.get("form"):
                    setattr(state, f.name, getattr(states, f.name))

        self.record(commit)

    def recorded(self) -> bool:
        """True when a commit can return this state to any position of the last recorded chunk:
        it holds a recording, or it has no tensor of its own (a KV-sharing consumer, a container
        such as ``HymbaState``) and every nested state is recorded."""
        if "_recording" in self.__dict__:
            return True
        own = False
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, LayerState):
                if not v.recorded():
                    return False
            elif isinstance(v, Tensor) or (isinstance(v, list) and any(isinstance(t, Tensor) for t in v)):
                own = True
        return not own

    def commit(self, keep: Tensor, kmax: int) -> None:
        """Apply the recording (``record``) of this state and its nested states, and drop them."""
        rec = self.__dict__.pop("_recording", None)
        if rec is not None:
            rec(self, keep, kmax)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if isinstance(v := getattr(self, f.name), LayerState):
                v.commit(keep, kmax)

    def drop_recording(self) -> None:
        """Forget the recordings of this state and its nested states (their memory too)."""
        self.__dict__.pop("_recording", None)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if isinstance(v := getattr(self, f.name), LayerState):
                v.drop_recording()

    def fork(self) -> "LayerState":
        """A copy that a forward may advance without touching this state. Components replace
        a state's tensors rather than writing into them, so the copy shares the tensors
        (no memory) and copies only the containers (nested states, lists)."""
        return self._rebuilt(lambda t: t, LayerState.fork)

    def _rebuilt(self, tensor: Callable[[Tensor], Tensor],
                 state: Callable[["LayerState"], "LayerState"]) -> "LayerState":
        """A new state of this type: ``tensor`` applied to every tensor field (and list
        element), ``state`` to every nested state; new list containers."""
        new = dataclasses.replace(self)  # type: ignore[type-var]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                setattr(new, f.name, tensor(v))
            elif isinstance(v, LayerState):
                setattr(new, f.name, state(v))
            elif isinstance(v, list):
                setattr(new, f.name, [tensor(t) if isinstance(t, Tensor) else t for t in v])
        return new


def _copy_buffer(owner: str, name: str, dst: object, src: object) -> None:
    if dst is src:
        return
    if not (isinstance(dst, Tensor) and isinstance(src, Tensor)):
        if dst is None and src is None:
            return
        raise ValueError(f"{owner}.{name}: set on one side only (a static buffer needs it allocated before)")
    if dst.shape != src.shape:
        raise ValueError(f"{owner}.{name}: shape {tuple(src.shape)} does not fit the static buffer "
                         f"{tuple(dst.shape)}")
    dst.copy_(src)


@dataclass
class StepContext:
    """What one forward call tells every layer besides the hidden states.

    positions: [B, T] absolute position of every slot (inert slots: clamped, ignore them).
    lengths:   [B] real tokens per row (they come first in the chunk), or None = all real.
    n_meta:    meta tokens of the model; positions < n_meta are meta tokens (attention
               keeps them visible through any sliding window).
    aux_losses / stats: channel mixers (MoE) add their losses and routing statistics.
    shared:    values one layer hands to a later one in the same call (cross-layer KV
               sharing: the producer layer leaves its keys/values for the consumer).
    bidirectional: the real tokens of this chunk see each other both ways in attention
               (block diffusion denoising a block on top of a cache); recurrent mixers stay
               causal inside the chunk. The cache's earlier tokens are seen as usual.
    two_stream: block-diffusion training layout ``[meta | clean x_0 | noisy x_t]``
               (``core.two_stream``), or None.
    pooled:    losses computed once from statistics pooled over every layer of the call:
               name -> (reduce, [per-layer terms]); ``aux_total`` adds ``reduce(terms)``
               (MoE ``balance_loss: pooled``, the HF convention).
    collect:   False: layers skip their auxiliary losses and statistics (a decode step, where
               nothing reads them and each would be a few more kernels per layer per token).
    record:    a speculative verify chunk (``HybridLM.forward(record_states=True)``): every
               stateful layer that can also leaves in its state how to return to the state
               after any ``p`` of the chunk's real tokens (``LayerState.record``), so that
               ``HybridLM.rewind`` gathers each row's accepted state instead of re-running.
    """

    positions: Tensor
    lengths: Tensor | None = None
    n_meta: int = 0
    aux_losses: list[Tensor] = field(default_factory=list)
    stats: dict[str, object] = field(default_factory=dict)
    shared: dict[str, object] = field(default_factory=dict)
    layer_idx: int = 0
    bidirectional: bool = False
    two_stream: object | None = None
    pooled: dict[str, tuple[Callable[[list], Tensor], list]] = field(default_factory=dict)
    collect: bool = True
    record: bool = False

    def aux_total(self) -> Tensor | None:
        """The sum of the auxiliary losses (per-layer ones plus the pooled ones), or None."""
        losses = list(self.aux_losses) + [reduce(terms) for reduce, terms in self.pooled.values() if terms]
        return torch.stack(losses).sum() if losses else None

    @property
    def valid(self) -> Tensor | None:
        """[B, T] bool: True at real tokens (a prefix of each row), or None = all real."""
        if self.lengths is None:
            return None
        t = torch.arange(self.positions.shape[1], device=self.positions.device)
        return t[None, :] < self.lengths[:, None]

    def valid_or_ones(self) -> Tensor:
        v = self.valid
        if v is None:
            return torch.ones(self.positions.shape, dtype=torch.bool, device=self.positions.device)
        return v


class HybridCache:
    """Per-layer states plus the number of positions consumed by each row.

    ``pos[b]`` counts real tokens (meta tokens included) seen by row ``b``; it is where the
    next real token's position comes from. ``started`` is False until the first forward,
    which is when meta tokens enter (once). ``extra`` holds decisions the model's structure
    takes once per sequence at the prefill and keeps for decoding (ETD: the number of think
    iterations, Dr.LLM routes ``[B, slots]``); tensors with a batch dim are reordered with
    the states.
    """

    def __init__(self, states: list[LayerState | None], batch_size: int, device: torch.device,
                 owner: str | None = None):
        self.states = states
        self.batch_size = batch_size
        #: the recipe hash of the model that made it (``HybridLM.new_cache``): a model refuses another's cache
        self.owner = owner
        self.pos = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.started = False
        self.extra: dict[str, Tensor] = {}
        #: the chunk the states' recordings belong to (``Recorded``), set by a recording forward
        #: (``HybridLM.forward(record_states=True)``) and cleared by any other change of the cache
        self.recorded: Recorded | None = None

    def __len__(self) -> int:
        return len(self.states)

    def __getitem__(self, i: int) -> LayerState | None:
        return self.states[i]

    @property
    def seq_len(self) -> int:
        """Largest number of positions consumed by any row."""
        return int(self.pos.max().item()) if self.batch_size else 0

    def advance(self, lengths: Tensor | None, n_slots: int) -> None:
        self.pos = self.pos + (lengths if lengths is not None else n_slots)
        self.started = True

    def drop_recording(self) -> None:
        """Forget the last recorded chunk (every forward on this cache starts so: a recording is
        only ever committed right after the chunk it came from). A recording exists only where
        ``recorded`` is set (a recording forward that cannot complete drops every state's, nested
        ones too), so the check reads the layers' own states only."""
        if self.recorded is not None or any(s is not None and "_recording" in s.__dict__ for s in self.states):
            for s in self.states:
                if s is not None:
                    s.drop_recording()
        self.recorded = None

    def commit(self, keep: Tensor, kmax: int) -> None:
        """Return every row to its state after the first ``keep[b]`` tokens of the recorded chunk
        (``recorded``; ``kmax = max(keep)``): each state's recording (``LayerState.commit``), a
        gather of the recorded positions, no forward; positions ``base + keep``."""
        rec = self.recorded
        if rec is None:
            raise ValueError("commit: the cache holds no recording of its last forward "
                             "(forward(..., record_states=True) on a model whose every layer records)")
        for s in self.states:
            if s is not None:
                s.commit(keep, kmax)
        self.pos = rec.base + keep.to(rec.base.device)
        self.recorded = None

    def reorder(self, index: Tensor) -> None:
        """Select / reorder batch rows (beam search, dropping finished rows): row i of the result is
        row ``index[i]``. ``index``: a 1-D integer tensor of rows in [0, batch_size), refused before
        any state changes (the range read only from a CPU index: on CUDA it would cost a sync, and
        ``index_select`` checks it there)."""
        if not isinstance(index, Tensor) or index.ndim != 1 or index.dtype not in (torch.long, torch.int32):
            what = f"{index.dtype} of shape {list(index.shape)}" if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"reorder: index must be a 1-D integer tensor of batch rows, got {what}")
        if index.device.type == "cpu" and index.numel():
            lo, hi = int(index.min()), int(index.max())
            if lo < 0 or hi >= self.batch_size:
                raise ValueError(f"reorder: index holds rows outside [0, {self.batch_size}) (min {lo}, max {hi})")
        self.drop_recording()  # (a recording's rows are the old batch's)
        for s in self.states:
            if s is not None:
                s.reorder(index)
        self.pos = self.pos.index_select(0, index.to(self.pos.device))
        for k, v in self.extra.items():
            if v.dim() > 0 and v.shape[0] == self.batch_size:
                self.extra[k] = v.index_select(0, index.to(v.device))
        self.batch_size = int(index.numel())

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.states if s is not None)

    def snapshot(self) -> "HybridCache":
        """A rollback point (speculative decoding): the cache as it is now, costing no tensor
        memory (``fork``). ``restore`` returns to it, whatever was advanced since."""
        snap = self.fork()
        snap._snapshot_of = weakref.ref(self)  # what restore checks (the snapshot does not keep this cache alive)
        return snap

    def restore(self, snapshot: "HybridCache") -> None:
        """Return every state, the positions and the structure's decisions to ``snapshot``
        (taken from this cache by ``snapshot()``: another cache's, or a fork, of the same shape is refused,
        since it would replace every state silently); the snapshot stays usable."""
        self.check_snapshot(snapshot)
        self.states = [s.fork() if s is not None else None for s in snapshot.states]
        self.pos, self.started, self.extra = snapshot.pos.clone(), snapshot.started, dict(snapshot.extra)
        self.recorded = None

    def check_snapshot(self, snapshot: "HybridCache", what: str = "restore") -> None:
        """Refuse (``ValueError`` naming ``what``) a snapshot not taken from this cache by ``snapshot()``
        or of another shape."""
        src = getattr(snapshot, "_snapshot_of", None)
        if src is None or src() is not self:
            raise ValueError(f"{what}: the snapshot was not taken from this cache (take it with cache.snapshot())")
        if len(snapshot.states) != len(self.states) or snapshot.batch_size != self.batch_size:
            raise ValueError(f"{what}: the snapshot has {len(snapshot.states)} states for batch "
                             f"{snapshot.batch_size}, this cache {len(self.states)} for batch {self.batch_size}")

    def fork(self) -> "HybridCache":
        """A cache a forward may advance while this one stays as it is (block diffusion
        denoises a block on a fork; ``LayerState.fork`` says why this costs no memory)."""
        new = HybridCache([s.fork() if s is not None else None for s in self.states], self.batch_size,
                          self.pos.device, self.owner)
        new.pos, new.started, new.extra = self.pos.clone(), self.started, dict(self.extra)
        return new

    def static_copy(self, capacity: int) -> "HybridCache":
        """A cache with buffers of its own, preallocated for ``capacity`` attention slots per
        row (``LayerState.static_copy``), holding this cache's contents; ``load_`` refills it
        in place. The decode engine replays its CUDA graph on such a cache."""
        new = HybridCache([s.static_copy(capacity) if s is not None else None for s in self.states],
                          self.batch_size, self.pos.device, self.owner)
        new.pos, new.started = self.pos.clone(), self.started
        new.extra = {k: v.clone() for k, v in self.extra.items()}
        return new

    def load_(self, src: "HybridCache") -> None:
        """Copy ``src`` (same model, same batch) into this cache's buffers in place: states,
        positions and the structure's decisions (``extra``)."""
        if len(src.states) != len(self.states) or src.batch_size != self.batch_size:
            raise ValueError(f"load_: {len(src.states)} states for batch {src.batch_size} into a cache of "
                             f"{len(self.states)} for batch {self.batch_size}")
        self.drop_recording()
        for dst, s in zip(self.states, src.states):
            if dst is not None:
                dst.load_(s)
        _copy_buffer("HybridCache", "pos", self.pos, src.pos)
        self.started = src.started
        if set(src.extra) != set(self.extra):
            raise ValueError(f"load_: the cache's decisions differ ({sorted(src.extra)} vs {sorted(self.extra)})")
        for k, v in src.extra.items():
            _copy_buffer("HybridCache", f"extra[{k}]", self.extra[k], v)

    def layer_nbytes(self) -> list[int]:
        return [s.nbytes() if s is not None else 0 for s in self.states]


@dataclass
class Recorded:
    """What a recording forward ran (``HybridLM.forward(record_states=True)``), so that
    ``HybridLM.rewind`` commits the recordings only for that chunk on top of that snapshot:
    ``n`` slots (the chunk's width), ``base`` [B] the rows' positions before it, ``lengths``
    [B] their real tokens (all ``n`` without padding), ``ids`` [B, n] the tokens (None for
    ``inputs_embeds``) and ``prefix`` whether each row's real tokens were its first ones (the
    padding was on the right, so ``ids[b, :keep[b]]`` are the tokens recorded)."""

    n: int
    base: Tensor
    lengths: Tensor
    ids: Tensor | None
    prefix: Tensor
