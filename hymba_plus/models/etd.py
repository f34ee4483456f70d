"""Model structure: which layer applications run, in which order, with which cache state.

A model is a list of layer *applications*; each owns one cache state (``HybridCache.states``
is indexed by application, not by block). ``PlainStack`` applies every block once.
``ETDStack`` (Encode-Think-Decode, arXiv 2510.07358) applies the encoder blocks once, the
think blocks ``iterations`` times with tied weights, then the decoder blocks once:

    states: [enc_0 .. enc_E-1 | think_0@it0 .. think_T-1@it0 | ... @it(cap-1) | dec_0 .. dec_D-1]

(with Dr.LLM layer routes every slot has a second state for its *repeat*). The cache holds
states for ``max_iterations`` think iterations, so inference may think longer than training.

**Active tokens.** Adaptive halting, Dr.LLM routes and padding all come down to one rule: an
application sees only its *active* tokens. ``run_active`` compacts them to the front of
each row (the padding rule of ``core/cache.py``: ``lengths`` = active count, positions kept),
runs the block, scatters the outputs back and leaves inactive tokens unchanged — so an
inactive token never touches that application's state, in the full forward and in the cache
alike. Per-token decisions (ACT halting, MoDr branches) depend only on the token's own
causal hidden state, so a cached chunked forward takes exactly the decisions of the full
forward. Per-sequence decisions (Dr.LLM routes, the number of think iterations) are taken
at the prefill — the call that starts the cache, or the whole call without a cache — and
kept in ``HybridCache.extra``; the invariant holds for the same route (pass ``routes=`` to a
full forward to reproduce a cached run).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..components.etd_router import EXECUTE, REPEAT, ROUTE_NAMES, SKIP, ETDRouter
from ..core.cache import HybridCache, StepContext
from ..core.config import brief
from ..core.recompute import Checkpointing, run_block
from ..kernels import dispatch


@dataclass(frozen=True)
class Slot:
    """One layer application place: block ``block`` in ``stage`` at think ``iteration``."""

    stage: str  # "encoder" | "think" | "decoder" | "stack"
    block: int
    iteration: int = 0


def _gated(block: nn.Module, x: Tensor, state, router: ETDRouter | None,  # noqa: ANN001
           gate: Tensor | None) -> Callable[[StepContext], Tensor]:
    """``block(x, ctx, state)`` with the MoDr gate set around it, as one function of the context
    (``run_block``: a checkpointed block's recomputation sets the gate again)."""
    def fn(ctx: StepContext) -> Tensor:
        if router is not None:
            router.set_gate(gate)
        try:
            return block(x, ctx, state)
        finally:
            if router is not None:
                router.set_gate(None)
    return fn


def run_active(block: nn.Module, x: Tensor, ctx: StepContext, state, active: Tensor | None,  # noqa: ANN001
               router: ETDRouter | None = None, gate: Tensor | None = None,
               checkpointed: Checkpointing | None = None) -> Tensor:
    """``block`` applied to the tokens where ``active`` [B, S] is True (a subset of the real
    slots; None = all of them); inactive tokens keep ``x`` and never touch ``state``. ``gate``
    [B, S, n] is the MoDr branch gate of every slot (compacted with the tokens).
    ``checkpointed``: the block's activations are recomputed in the backward (``core.recompute``)."""
    ck = checkpointed if state is None else None  # (a cached call keeps no activations to save)
    if active is None:
        return run_block(_gated(block, x, state, router, gate), ctx, ck, x)
    order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)
    lengths = active.sum(1)
    xs = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
    sub = StepContext(positions=ctx.positions.gather(1, order), lengths=lengths, n_meta=ctx.n_meta,
                      aux_losses=ctx.aux_losses, stats=ctx.stats, shared=ctx.shared, pooled=ctx.pooled,
                      collect=ctx.collect)
    gs = None if gate is None else gate.gather(1, order[..., None].expand(-1, -1, gate.shape[-1]))
    ys = run_block(_gated(block, xs, state, router, gs), sub, ck, xs)
    y = torch.empty_like(ys).scatter_(1, order[..., None].expand(-1, -1, ys.shape[-1]), ys)
    return torch.where(active[..., None], y, x)


class PlainStack:
    """Every block once, in order: state i belongs to block i."""

    #: a verify chunk's per-position states can be recorded when every mixer records them
    #: (``HybridLM.records_states``): the stack itself keeps no state of its own
    records_states = True

    def __init__(self, n_blocks: int):
        self.slots = [Slot("stack", i) for i in range(n_blocks)]
        self.checkpointing = Checkpointing()

    def state_blocks(self) -> list[int]:
        return [s.block for s in self.slots]

    def __call__(self, blocks: nn.ModuleList, x: Tensor, ctx: StepContext, cache: HybridCache | None,
                 **options: object) -> Tensor:
        if options:
            raise ValueError(f"{', '.join(options)}: only for ETD models (a recipe with model.etd)")
        y = None  # each block's last branch output is added inside the next block's first norm
        ck = self.checkpointing
        for i, block in enumerate(blocks):
            if cache is not None:  # (a cached call keeps no activations to save: never checkpointed)
                x, y = block(x, ctx, cache.states[i], pending=y, defer=True)
            else:
                x, y = run_block(lambda c, b=block, x=x, y=y: b(x, c, None, pending=y, defer=True), ctx, ck.at(i), x)
        return x if y is None else x + y


class ETDStack:
    """Encoder once, think ``iterations`` times (tied weights, own states), decoder once;
    adaptive halting, Dr.LLM routes and MoDr branches from the ``etd_router``."""

    #: its think iterations and routes are decisions of the chunk, not recorded per position: a speculative
    #: rollback re-runs the kept tokens (``HybridLM.rewind``)
    records_states = False

    def __init__(self, etd, router: ETDRouter, n_blocks: int):  # noqa: ANN001 - ETDConfig
        self.etd, self.router = etd, router
        E, T = etd.encoder_layers, etd.think_layers
        self.enc = list(range(E))
        self.think = list(range(E, E + T))
        self.dec = list(range(E + T, n_blocks))
        self.slots = ([Slot("encoder", b) for b in self.enc]
                      + [Slot("think", b, it) for it in range(etd.cap) for b in self.think]
                      + [Slot("decoder", b) for b in self.dec])
        self.routed = router.routers is not None
        self.index = {s: i for i, s in enumerate(self.slots)}
        self.checkpointing = Checkpointing()
        # sharded (FSDP2, set by training.distributed.shard_model): every block call gathers its
        # parameters, a collective, so whether a block runs (a route that skips or repeats it, ACT
        # halting) is decided over all ranks at once (``_any``)
        self.collective = False

    # a slot's states: (first application, repeat) when routed, else one
    def state_of(self, slot: int, repeat: int = 0) -> int:
        return 2 * slot + repeat if self.routed else slot

    def state_blocks(self) -> list[int]:
        return [s.block for s in self.slots for _ in range(2 if self.routed else 1)]

    # ------------------------------------------------------------------ the forward
    def __call__(self, blocks: nn.ModuleList, x: Tensor, ctx: StepContext, cache: HybridCache | None,
                 routes: Tensor | None = None, think_iterations: int | None = None) -> Tensor:
        valid = ctx.valid  # [B, S] real slots (a prefix of each row) or None
        B = x.shape[0]
        extra = cache.extra if cache is not None else {}
        prefill = cache is None or not cache.started
        # per-sequence decisions: taken at the prefill, kept in the cache
        if think_iterations is None:
            think_iterations = int(extra["iterations"]) if "iterations" in extra else (
                self.etd.cap if self.router.halt is not None else self.etd.iterations)
        else:  # (2.5 was a TypeError from range() naming nothing, or refused as outside [1, cap]; True ran 1)
            try:
                if isinstance(think_iterations, bool):
                    raise TypeError
                think_iterations = operator.index(think_iterations)
            except TypeError:
                raise ValueError(f"think_iterations must be an integer in [1, {self.etd.cap}] "
                                 f"(model.etd.max_iterations), got {brief(think_iterations)}") from None
        if not 1 <= think_iterations <= self.etd.cap:
            raise ValueError(f"think_iterations must be in [1, {self.etd.cap}] (model.etd.max_iterations), "
                             f"got {think_iterations}")
        if cache is not None:
            if "iterations" in extra and int(extra["iterations"]) != think_iterations:
                raise ValueError(f"think_iterations {think_iterations} differs from the {int(extra['iterations'])} "
                                 "this cache was started with")
            extra["iterations"] = torch.tensor(think_iterations)
        decide = logits_wanted = all_execute = False
        if routes is not None and not self.routed:
            raise ValueError("routes: only for ETD models with Dr.LLM layer routers (components.etd_router.layer_router); "
                             "this one routes no layers")
        if self.routed:
            given = routes is not None
            if given:
                self._check_routes(routes, B)
            if given and "routes" in extra and (routes.shape != extra["routes"].shape
                                                or not torch.equal(routes, extra["routes"])):
                # (they were used for this call alone, silently: the cache's layers hold the prefill's route)
                raise ValueError("routes differ from the routes this cache was started with (a cache keeps its "
                                 "prefill's route: pass none, or the same)")
            if routes is None and "routes" in extra:
                routes = extra["routes"]
            decide = routes is None and self.router.routing  # untrained routers: all-execute
            logits_wanted = decide or given  # teacher-forced routes (router training) report logits too
            # all-execute known on the host: each slot runs once for every row, no read of the route
            # (sharded, a rank's block calls are still agreed over every rank: ``_any``)
            all_execute = routes is None and not decide and not self.collective
            if routes is None:  # decided by the routers below, or all-execute while they are off
                routes = torch.full((B, len(self.slots)), EXECUTE, dtype=torch.long, device=x.device)
            self._route_logits = torch.zeros(B, len(self.slots), 3, device=x.device)
            self._route_used = torch.zeros(len(self.slots), dtype=torch.bool)
            # [B, slots]: the slots each row's tokens reached (ACT: a think iteration none of a row's
            # tokens still runs is not reached, nor any iteration after the last one run)
            self._reached = torch.zeros(B, len(self.slots), dtype=torch.bool, device=x.device)
        self._routes, self._decide, self._logits_wanted = routes, decide, logits_wanted
        self._all_execute = self.routed and all_execute
        self._valid, self._ctx, self._blocks, self._cache = valid, ctx, blocks, cache
        try:
            for b in self.enc:
                x = self._apply(self.index[Slot("encoder", b)], x, None)
            x = self._think(x, think_iterations)
            for b in self.dec:
                x = self._apply(self.index[Slot("decoder", b)], x, None)
            if self.routed:
                if cache is not None and prefill:
                    extra["routes"] = routes
            if self.routed and ctx.collect:  # (a decode step, collect_aux=False: no statistics)
                ctx.stats["etd/layer_applications"] = self.applications(
                    routes, think_iterations, self._reached).float().mean()
                ctx.stats["etd/routes"] = routes
                ctx.stats["etd/route_reached"] = self._reached  # [B, slots] bool
                if logits_wanted:
                    ctx.stats["etd/route_logits"] = self._route_logits  # [B, slots, 3]; slots not run: 0
                    ctx.stats["etd/route_slots"] = self._route_used  # [slots] bool: which slots ran
        finally:  # the call's tensors (its context holds the aux losses) must not outlive it: a kept
            # autograd graph breaks a later CUDA-graph capture (training/cuda_graph.py)
            self._valid = self._ctx = self._blocks = self._cache = self._routes = None
            self._route_logits = self._route_used = self._reached = None
        return x

    def _check_routes(self, routes: object, B: int) -> None:
        """Given routes: an integer tensor [B, slots] of SKIP / EXECUTE / REPEAT (one host read). (A 5 ran
        as a repeat and -1 as a skip while ``etd/layer_applications`` counted 5 and -1 of them.)"""
        if not isinstance(routes, Tensor) or routes.dtype == torch.bool or routes.is_floating_point() \
                or routes.is_complex():
            what = f"dtype {routes.dtype}" if isinstance(routes, Tensor) else type(routes).__name__
            raise ValueError(f"routes must be an integer tensor of {SKIP} (skip), {EXECUTE} (execute) or "
                             f"{REPEAT} (repeat) per row and layer slot, got {what}")
        if routes.shape != (B, len(self.slots)):
            raise ValueError(f"routes must have shape {(B, len(self.slots))} (rows x layer slots), "
                             f"got {tuple(routes.shape)}")
        if routes.numel() == 0 or dispatch.capturing():  # nothing to read; no host read inside a capture
            return
        lo, hi = torch.stack(torch.aminmax(routes)).tolist()
        if lo < SKIP or hi > REPEAT:
            raise ValueError(f"routes must hold {SKIP} (skip), {EXECUTE} (execute) or {REPEAT} (repeat), "
                             f"got values from {lo} to {hi}")

    def _any(self, flag: Tensor | None) -> bool:
        """``flag.any()`` (None: True, every row), over every rank when the stack is sharded: the
        ranks make the same block calls (a rank whose rows need none runs the block with every token
        inactive: no change to x or to any state). Unsharded, None costs no host read."""
        if not self.collective:
            return flag is None or bool(flag.any())
        import torch.distributed as dist

        hit = torch.ones((), dtype=torch.int32, device=self._ctx.positions.device) if flag is None else \
            flag.any().to(torch.int32)
        dist.all_reduce(hit, op=dist.ReduceOp.MAX)
        return bool(hit)

    def _still_thinking(self, running: Tensor, real: Tensor) -> tuple[bool, bool]:
        """ACT before a later think iteration: (does every real token still think, does any), in one
        host read (a graph break under torch.compile), the second over every rank when sharded
        (``_any``). Every: the blocks take the call's own context, the un-padded path (a mask of
        every real token means the same but sends the fast kernels' work to the padded reference
        paths: fla's chunked delta rule and causal conv, flash SDPA's ``is_causal``). None: the
        loop ends, as the iterations left would add nothing (a static loop under torch.compile
        would run them on no token, at most ``max_iterations - 1`` extra iterations, and still
        read ``every``). (Two reads a later iteration before, and one at iteration 0, where
        ``running == real`` by construction.)"""
        every = (running == real).all()
        if self.collective:
            return bool(every), self._any(running)
        every, some = torch.stack([every, running.any()]).tolist()
        return every, some

    def _apply(self, slot: int, x: Tensor, active: Tensor | None, gate: Tensor | None = None) -> Tensor:
        """The application(s) of one slot: skipped, executed or repeated per row (its route)."""
        block = self._blocks[self.slots[slot].block]
        states = self._cache.states if self._cache is not None else None
        ck = self.checkpointing.at(slot)
        if not self.routed:
            st = states[self.state_of(slot)] if states is not None else None
            return run_active(block, x, self._ctx, st, active, self.router, gate, ck)
        base = self._valid if active is None else active
        self._reached[:, slot] = base.any(1) if base is not None else True
        if self._logits_wanted:  # Dr.LLM: the router of this layer, on the hidden states entering it
            logits = self.router.route_logits(self.slots[slot].block, x, self._valid if active is None else active)
            self._route_logits = self._route_logits.index_copy(1, torch.tensor([slot], device=x.device),
                                                               logits[:, None].float())
            self._route_used[slot] = True
            if self._decide:
                self._routes[:, slot] = logits.detach().argmax(-1)
        if self._all_execute:  # every row executes the slot once: the tokens ``active`` marks, some
            # (ACT's loop runs an iteration only while a token thinks), and no repeat
            st = states[self.state_of(slot)] if states is not None else None
            return run_active(block, x, self._ctx, st, active, self.router, gate, ck)
        route = self._routes[:, slot]
        for rep, need in ((0, EXECUTE), (1, REPEAT)):
            rows = route >= need
            if active is None and bool(rows.all()):
                act = None  # every row: the block sees the call's own context (the un-routed path)
            else:
                act = rows[:, None] & (base if base is not None else torch.ones_like(x[..., 0], dtype=torch.bool))
            if not self._any(act):
                continue
            st = states[self.state_of(slot, rep)] if states is not None else None
            x = run_active(block, x, self._ctx, st, act, self.router, gate, ck)
        return x

    def _think(self, x: Tensor, n_iter: int) -> Tensor:
        router, ctx = self.router, self._ctx
        act = router.halt is not None
        running = self._valid if act else None  # ACT: tokens still thinking
        if act:
            real = self._valid if self._valid is not None else torch.ones_like(x[..., 0], dtype=torch.bool)
            running = real.clone()
            cum = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
            out = torch.zeros_like(x)
            n_used = torch.zeros_like(cum)
            ponder = torch.zeros_like(cum)
        # the text tokens' slots (the meta tokens, positions < n_meta, are a prefix the prefill adds to
        # every row): MoDr's branch load (the balancing bias, etd/branch_load) and ACT's statistics count
        # them only -- the meta tokens think and choose branches, but the same prefix in every sequence
        # would push the text's routing away from the branches it chose
        meta_free = ctx.positions >= ctx.n_meta if ctx.n_meta else None
        for it in range(n_iter):
            active = None  # iteration 0: every real token thinks (running == real), known without a read
            if act and it:
                every, some = self._still_thinking(running, real)
                if not some:  # every token halted: the iterations left would change nothing
                    break
                active = None if every else running
            gate = None
            if router.n_branches:
                counted = running if act else self._valid
                if meta_free is not None:
                    counted = meta_free if counted is None else counted & meta_free
                gate, _ = router.choose_branches(x, counted)
            for b in self.think:
                x = self._apply(self.index[Slot("think", b, it)], x, active, gate)
            if act:
                p = router.halting_prob(x)
                last = it == n_iter - 1
                halt = running & ((cum + p >= router.cfg.halting.threshold) | last)
                w = torch.where(halt, 1.0 - cum, torch.where(running, p, torch.zeros_like(p)))
                out = out + w[..., None].to(x.dtype) * x
                n_used = n_used + running.float()
                ponder = ponder + torch.where(halt, n_used + (1.0 - cum), torch.zeros_like(cum))
                cum = torch.where(running & ~halt, cum + p, cum)
                running = running & ~halt
        if router.n_branches and router.training and ctx.collect:  # MoDr: each branch's share since the bias update
            ctx.stats["etd/branch_load"] = (router.load / router.load.sum().clamp_min(1)).detach()
        if not act:
            return x
        self._n_used = n_used
        if not ctx.collect:  # a decode step (collect_aux=False): no auxiliary loss, no statistics
            return out
        n_real = real.sum().clamp_min(1)
        mean_ponder = (ponder * real).sum() / n_real
        if self.router.training and router.cfg.halting.ponder_cost > 0:  # every token's cost, meta tokens too
            ctx.aux_losses.append(router.cfg.halting.ponder_cost * mean_ponder)
        text = real & meta_free if meta_free is not None else real  # the statistics: means over the text
        n_text = text.sum().clamp_min(1)
        ctx.stats["etd/ponder"] = ((ponder * text).sum() / n_text).detach()
        ctx.stats["etd/iterations"] = ((n_used * text).sum() / n_text).detach()
        return out

    # ------------------------------------------------------------------ reporting
    def applications(self, routes: Tensor, think_iterations: int, reached: Tensor | None = None) -> Tensor:
        """Layer applications per row under ``routes`` ([B]): skip 0, execute 1, repeat 2.
        ``reached`` [B, slots] (a forward's ``etd/route_reached``): count only the slots each row's
        tokens reached (ACT halting leaves later think iterations unreached); else every slot of
        the first ``think_iterations`` iterations."""
        if reached is not None:
            return (routes * reached.to(routes.device)).sum(1)
        keep = torch.ones(len(self.slots), dtype=torch.bool, device=routes.device)
        for i, s in enumerate(self.slots):
            keep[i] = s.stage != "think" or s.iteration < think_iterations
        return (routes * keep).sum(1)

    def describe_route(self, routes: Tensor, think_iterations: int) -> str:
        """One row's route: ``enc 0 execute, ..., think 2@it1 skip, ...`` (only the slots in use)."""
        parts = []
        for i, s in enumerate(self.slots):
            if s.stage == "think" and s.iteration >= think_iterations:
                continue
            name = {"encoder": "enc", "think": "think", "decoder": "dec"}[s.stage]
            at = f"@it{s.iteration}" if s.stage == "think" else ""
            parts.append(f"{name} {s.block}{at} {ROUTE_NAMES[int(routes[i])]}")
        return ", ".join(parts)


__all__ = ["ETDStack", "PlainStack", "Slot", "run_active", "SKIP", "EXECUTE", "REPEAT"]
