"""HybridLM: embeddings, Hymba meta tokens, blocks from the recipe, final norm, LM head.

Data flow of one call ``model(input_ids, attention_mask, cache)``:

1. embed ``input_ids`` [B, T];
2. if the cache is empty (or there is no cache), prepend the ``meta_tokens`` learnable
   embeddings (Hymba, arXiv 2411.13676 §2.3) — they enter exactly once;
3. if a mask has zeros, compact every row so its real tokens come first
   (``core.cache`` explains why this makes padding exact);
4. positions = the cache's per-row counter + 0, 1, 2, ... (never from the caller);
5. blocks (each advances its own state in the cache), final norm, LM head (with
   ``labels`` and ``return_logits=False``, the training step's call, no head: the loss comes
   straight from the hidden states and the head's weight, ``kernels.linear_ce``);
6. undo the compaction and drop the meta slots: logits line up with ``input_ids``.

Before step 1 the call is checked (``HybridLM.forward`` says how, and what it costs):
every token id must lie in ``[0, vocab_size)``, and no row may hold more than
``max_seq_len`` real tokens (cached + new; pads and meta tokens not counted). Either
problem is one ``ValueError`` line naming the limit and what was given.
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..blocks import Block
from ..components.norm import RMSNorm
from ..core import registry
from ..core.cache import HybridCache, Recorded, StepContext
from ..core.config import brief
from ..core.recipe import Recipe, RecipeError, load_recipe
from ..core.recompute import Checkpointing
from ..kernels import dispatch
from ..kernels.linear_ce import linear_cross_entropy
from ..objectives import objective_class
from .etd import ETDStack, PlainStack
from .generation import check_prompt, int_at_least, odd_mask_error, odd_mask_values


@dataclass
class ModelOutput:
    logits: Tensor | None  # None when forward(return_logits=False) (the training step's fused loss)
    loss: Tensor | None = None
    aux_loss: Tensor | None = None
    hidden_states: Tensor | None = None  # after the final norm (return_hidden=True)
    stats: dict | None = None
    trunk_states: Tensor | None = None  # the last block's output, before the final norm (return_hidden=True)


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded (missing, corrupt, mismatched)."""


class HybridLM(nn.Module):
    def __init__(self, recipe: Recipe):
        super().__init__()
        self.recipe = recipe
        self._recipe_hash = recipe.hash()  # a cache this model makes carries it (HybridCache.owner)
        m = recipe.model
        self.config = m
        # no vocabulary (an objective that reads numbers, e.g. forecast): no embedding, no LM head;
        # the model then runs on inputs_embeds and returns the final-normed hidden states as logits
        self.embed = nn.Embedding(m.vocab_size, m.d_model) if m.vocab_size is not None else None
        self.meta = nn.Parameter(torch.zeros(m.meta_tokens, m.d_model)) if m.meta_tokens else None
        self.blocks = nn.ModuleList(Block(spec, recipe, i) for i, spec in enumerate(recipe.layers))
        # the structure: which layer applications run, each with its own cache state (models/etd.py)
        self.etd_router = None
        if m.etd is not None:
            think = [self.blocks[i] for i in range(m.etd.encoder_layers, m.etd.encoder_layers + m.etd.think_layers)]
            self.etd_router = registry.build("etd_router", recipe.component("etd_router"), d_model=m.d_model,
                                             n_layers=len(self.blocks), think=think)
            self.structure: ETDStack | PlainStack = ETDStack(m.etd, self.etd_router, len(self.blocks))
        else:
            self.structure = PlainStack(len(self.blocks))
        self.norm = RMSNorm(m.d_model, m.norm.eps, m.norm.zero_centered)
        self.lm_head = nn.Linear(m.d_model, m.vocab_size, bias=False) if m.vocab_size is not None else None
        # multi-token prediction modules (components/mtp.py), after the trunk, sharing its head
        self.mtp = (registry.build("mtp", m.mtp, recipe=recipe, first_layer_idx=len(self.blocks))
                    if m.mtp is not None else None)
        # latent reasoning (components/ladir.py): memory slots, VAE heads, flow denoiser
        self.ladir = (registry.build("ladir", recipe.ladir, d_model=m.d_model, max_seq_len=m.max_seq_len,
                                     init_std=m.init_std)
                      if recipe.ladir is not None else None)
        # what the model is trained to predict (objectives/): its loss, metric, [MASK] embedding
        self.objective = objective_class(recipe)(recipe.objective, d_model=m.d_model, vocab_size=m.vocab_size,
                                                 init_std=m.init_std)
        if m.tie_embeddings and self.embed is not None:
            self.lm_head.weight = self.embed.weight
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    def reset_parameters(self) -> None:
        std = self.config.init_std
        out_std = std / math.sqrt(2 * max(len(self.blocks), 1))
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.normal_(mod.weight, 0.0, out_std if getattr(mod, "is_residual_out", False) else std)
                if mod.bias is not None:
                    nn.init.zeros_(mod.bias)
            elif isinstance(mod, nn.Embedding):
                nn.init.normal_(mod.weight, 0.0, std)
        if self.meta is not None:
            nn.init.normal_(self.meta, 0.0, std)
        for mod in self.modules():  # component-specific parameters (A_log, dt_bias, ...)
            if mod is not self and hasattr(mod, "reset_special"):
                mod.reset_special()

    # ------------------------------------------------------------------ cache
    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return (self.embed.weight if self.embed is not None else self.norm.weight).dtype

    def new_cache(self, batch_size: int, device: torch.device | None = None) -> HybridCache:
        """An empty cache for ``batch_size`` rows on ``device`` (default: the model's)."""
        if not int_at_least(batch_size, 1):  # (a numpy or 0-d tensor integer is one, as for generate's settings)
            raise ValueError(f"batch_size must be an integer >= 1, got {brief(batch_size)}")
        batch_size = operator.index(batch_size)
        check_device(device)
        device = torch.device(device) if device is not None else self.device
        states = [self.blocks[b].init_state(batch_size, device, self.dtype) for b in self.structure.state_blocks()]
        return HybridCache(states, batch_size, device, owner=self._recipe_hash)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        labels: Tensor | None = None,
        attention_mask: Tensor | None = None,
        cache: HybridCache | None = None,
        return_hidden: bool = False,
        inputs_embeds: Tensor | None = None,
        *,
        routes: Tensor | None = None,
        think_iterations: int | None = None,
        bidirectional: bool = False,
        check_inputs: bool = True,
        logits_to_keep: int = 0,
        return_logits: bool = True,
        collect_aux: bool = True,
        record_states: bool = False,
    ) -> ModelOutput:
        """Logits [B, T, V] for ``input_ids`` [B, T] (or ``inputs_embeds`` [B, T, D]). ``T = 0``: logits
        [B, 0, V], and a cache stays as it was (but for an empty cache's meta tokens, which enter then).

        Checked first, each problem one ``ValueError`` line:

        * token ids: every id in ``[0, vocab_size)`` (not for ``inputs_embeds`` calls);
        * with them, ``attention_mask`` values: 1 (token) or 0 (pad), or a bool mask;
        * length: per row, the real tokens the cache already holds plus the real tokens of
          this call must not exceed ``max_seq_len``. Pads (``attention_mask == 0``) do not
          count, and neither do the meta tokens: they are a prefix on top of the sequence
          (positions ``0 .. meta_tokens - 1``; real tokens start at ``meta_tokens``), as in
          training (``train.seq_len <= max_seq_len`` tokens, meta prepended), in the
          attention cache (``n_meta + seq_len`` slots) and in ``hymba generate``. So a
          row's positions, ``cache.pos`` included, never exceed ``meta_tokens +
          max_seq_len``. A call that fails the check changes nothing in the cache.

        Cost: on CUDA one device sync per call (the id range and, with a cache already in
        use, its positions are read back together in one copy); none for an
        ``inputs_embeds`` call without a started cache (unless it is longer than
        ``max_seq_len`` and masked). The checks are skipped while ``torch.compile`` /
        export or ``torch.jit.trace`` trace the model and during CUDA-graph capture.
        ``bidirectional=True`` (block diffusion denoising a block on a forked cache): the real
        tokens of this call see each other both ways in attention (``StepContext``).

        ``logits_to_keep=n`` (n > 0; HF's argument of that name): logits of the last n
        positions only, ``[B, n, V]`` (a prefill needs the last one: with left padding that is
        every row's last token); the cache and ``hidden_states`` are as without it.

        ``return_logits=False``: the LM head is not run and ``logits`` is None (a model without a
        vocabulary returns its hidden states as ``logits`` regardless). With ``labels`` the
        next-token loss is then computed from the final hidden states and the head's weight by
        ``kernels.linear_ce.linear_cross_entropy``, chunk by chunk, without the ``[B, T, V]``
        logits (``lm_loss``'s semantics; the training step asks for this unless something reads
        its logits, e.g. ``--distill``). ``return_logits=True`` (the default) computes the logits
        and takes ``lm_loss`` of them.

        ``collect_aux=False``: the layers skip their auxiliary losses and statistics (MoE
        balance / z losses, routing statistics; ``StepContext.collect``): ``aux_loss`` and
        ``stats`` are then None. The decoding loops pass it for every token after the prompt.

        ``record_states=True`` (a speculative verify chunk on ``cache``): every layer also keeps in
        its cache state how to return to its state after any number of the chunk's real tokens
        (``StepContext.record``; memory about ``T + 1`` times the recurrent states), so that
        ``rewind`` right after this call gathers each row's kept state instead of running a
        forward. Taken where every layer records (``records_states``) and the cache has started
        (no meta tokens enter); otherwise ignored (``rewind`` then re-runs). Any later call on
        the cache drops the recording.

        ``check_inputs=False`` skips them too: the decoding loop of ``models/generation.py``
        for tokens the model sampled itself (``generate`` checked the whole length up front)
        and the training loop, whose data streams are validated at setup (token ids below
        ``vocab_size``, ``seq_len <= max_seq_len``), so eager CUDA training pays no sync.
        """
        if inputs_embeds is None and self.embed is None:
            raise ValueError("this model reads no tokens (no vocabulary): pass inputs_embeds")
        self._check_call(input_ids, labels, attention_mask, cache, inputs_embeds, logits_to_keep)
        logits_to_keep = operator.index(logits_to_keep)
        B, T = (input_ids if inputs_embeds is None else inputs_embeds).shape[:2]
        if check_inputs and not _skip_checks(input_ids if inputs_embeds is None else inputs_embeds):
            self._check_inputs(input_ids, inputs_embeds, attention_mask, cache, T, labels, bidirectional)
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        valid = None
        if attention_mask is not None:
            valid = attention_mask.to(torch.bool)
            if bool(valid.all()):
                valid = None
        n_meta = self.config.meta_tokens
        add_meta = n_meta > 0 and (cache is None or not cache.started)
        if add_meta:
            x = torch.cat([self.meta.to(x.dtype)[None].expand(B, -1, -1), x], dim=1)
            if valid is not None:
                valid = torch.cat([valid.new_ones(B, n_meta), valid], dim=1)
        S = x.shape[1]
        order = lengths = None
        if valid is not None:
            order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
            x = x.gather(1, order[..., None].expand(-1, -1, x.shape[-1]))
            lengths = valid.sum(1)
        base = cache.pos if cache is not None else torch.zeros(B, dtype=torch.long, device=x.device)
        positions = base[:, None] + torch.arange(S, device=x.device)[None]
        record = bool(record_states) and cache is not None and not add_meta and S > 0 and self.records_states
        if cache is not None:
            cache.drop_recording()  # (a recording belongs to the call that made it)
        ctx = StepContext(positions=positions, lengths=lengths, n_meta=n_meta, bidirectional=bidirectional,
                          collect=collect_aux, record=record)
        structure_options = {k: v for k, v in (("routes", routes), ("think_iterations", think_iterations))
                             if v is not None}
        if S:  # (no token and no meta token, T = 0: empty logits, the cache as it was)
            x = self.structure(self.blocks, x, ctx, cache, **structure_options)
        mtp_loss = None
        if labels is not None and self.mtp is not None and cache is None:
            if order is not None:
                raise ValueError("the MTP loss needs unpadded rows (attention_mask all ones)")
            n0 = n_meta if add_meta else 0
            mtp_loss, per = self.mtp.losses(self, x[:, n0:], input_ids, labels, positions[:, n0:], ctx)
            ctx.stats.update({f"mtp/loss_{i + 1}": v.detach() for i, v in enumerate(per)})
        h = self.norm(x)
        if cache is not None and S:
            cache.advance(lengths, S)
        if record:
            if all(s is None or s.recorded() for s in cache.states):
                full = torch.full_like(base, S)
                prefix = (valid == (torch.arange(S, device=x.device)[None] < lengths[:, None])).all(1) \
                    if valid is not None else torch.ones_like(base, dtype=torch.bool)
                cache.recorded = Recorded(n=S, base=base, lengths=lengths if lengths is not None else full,
                                          ids=input_ids if inputs_embeds is None else None, prefix=prefix)
            else:  # a state that cannot record (a static decode-engine buffer): rewind re-runs; every
                # recording goes, nested ones too (hymba's mamba3 beside its static attention), so that
                # a recording exists only where cache.recorded is set (what drop_recording checks)
                for s in cache.states:
                    if s is not None:
                        s.drop_recording()
        trunk = x if return_hidden else None
        if order is not None:  # undo the compaction
            idx = order[..., None].expand(-1, -1, h.shape[-1])
            h = torch.empty_like(h).scatter_(1, idx, h)
            trunk = torch.empty_like(x).scatter_(1, idx, x) if return_hidden else None
        if add_meta:
            h = h[:, n_meta:]
            trunk = trunk[:, n_meta:] if trunk is not None else None
        if logits_to_keep:  # e.g. a prefill whose next token is all that is used: no [B, T, V] logits
            if labels is not None:
                raise ValueError("logits_to_keep needs labels=None (the loss reads every position)")
            h_out = h[:, -logits_to_keep:]
        else:
            h_out = h
        fused = not return_logits and self.lm_head is not None  # no head here; a loss reads h and the weight
        logits = None if fused else self.lm_head(h_out) if self.lm_head is not None else h_out
        aux = ctx.aux_total()
        loss = None
        if labels is not None:
            loss = (self.hidden_lm_loss(h, labels, attention_mask) if fused
                    else self.lm_loss(logits, labels, attention_mask))
            if aux is not None:
                loss = loss + aux
            if mtp_loss is not None:
                loss = loss + mtp_loss
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux, hidden_states=h if return_hidden else None,
                           stats=ctx.stats or None, trunk_states=trunk)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token embeddings; the objective's [MASK] id (``vocab_size``, block diffusion) maps to
        its learned mask embedding."""
        mask_id = self.objective.mask_token_id
        if mask_id is None:
            return self.embed(ids)
        is_mask = ids == mask_id
        x = self.embed(ids.masked_fill(is_mask, 0))
        return torch.where(is_mask[..., None], self.objective.mask_embed.to(x.dtype), x)

    def _check_call(self, input_ids: Any, labels: Any, attention_mask: Any, cache: Any, inputs_embeds: Any,
                    logits_to_keep: Any) -> None:
        """``forward``'s arguments' types, dtypes and shapes, each problem one ValueError / TypeError line
        naming the argument (no host read: ``_check_inputs`` reads the values)."""
        def tensor(name: str, x: Any, dims: str) -> None:
            if not isinstance(x, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor {dims}, got {type(x).__name__} {brief(x)}")

        if inputs_embeds is None:
            check_prompt(input_ids, attention_mask, min_tokens=0)  # generate's checks of the ids and the mask
            B, T = input_ids.shape
        else:
            tensor("inputs_embeds", inputs_embeds, "[B, T, D]")
            D = self.config.d_model
            if inputs_embeds.ndim != 3 or inputs_embeds.shape[-1] != D:
                raise ValueError(f"inputs_embeds must have shape [B, T, {D}], got {tuple(inputs_embeds.shape)}")
            if not inputs_embeds.is_floating_point():
                raise TypeError(f"inputs_embeds must be floating point, got dtype {inputs_embeds.dtype}")
            B, T = inputs_embeds.shape[:2]
            if B == 0:  # as input_ids (check_prompt): atlas and hymba raised a reshape RuntimeError
                raise ValueError(f"inputs_embeds: a batch of no rows (shape {tuple(inputs_embeds.shape)}); at least "
                                 "one row is needed")
            if attention_mask is not None:
                tensor("attention_mask", attention_mask, "[B, T] (1: token, 0: pad)")
        if attention_mask is not None:
            if attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask must have shape {(B, T)}, got {tuple(attention_mask.shape)}")
        if cache is not None:
            if not isinstance(cache, HybridCache):
                raise TypeError(f"cache must be a HybridCache (model.new_cache(batch_size)), got "
                                f"{type(cache).__name__} {brief(cache)}")
            if cache.owner is not None and cache.owner != self._recipe_hash:
                raise ValueError(f"cache was made by another model (recipe {cache.owner}; this model's is "
                                 f"{self._recipe_hash}): make it with this model's new_cache")
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, got input batch {B}")
        if labels is not None and self.lm_head is not None:  # next-token labels (a forecaster's are its own)
            tensor("labels", labels, "of token ids [B, T]")
            if labels.dtype not in (torch.long, torch.int32):
                raise TypeError(f"labels must hold integer token ids (-100: not scored), got dtype {labels.dtype}")
            if labels.shape != (B, T):
                raise ValueError(f"labels must have the inputs' shape {(B, T)}, got {tuple(labels.shape)}")
        if not int_at_least(logits_to_keep, 0):
            raise ValueError(f"logits_to_keep must be an integer >= 0 (0: every position), got {brief(logits_to_keep)}")

    def _check_inputs(self, input_ids: Tensor | None, inputs_embeds: Tensor | None,
                      attention_mask: Tensor | None, cache: HybridCache | None, T: int,
                      labels: Tensor | None = None, bidirectional: bool = False) -> None:
        """The id, label and length checks of ``forward`` (its docstring): at most one host read.
        Block diffusion's [MASK] (one id past the vocabulary) is an input only of a bidirectional
        (noisy) block: a causal call, a prompt included, holds vocabulary ids."""
        V, limit, n_meta = self.config.vocab_size, self.config.max_seq_len, self.config.meta_tokens
        if self.objective.mask_token_id is not None and bidirectional:
            V += 1
        name = "input_ids" if inputs_embeds is None else "inputs_embeds"
        started = cache is not None and cache.started
        reads: list[Tensor] = []
        check_ids = inputs_embeds is None and input_ids.numel() > 0
        if check_ids:
            reads += torch.aminmax(input_ids)
        check_labels = labels is not None and self.lm_head is not None and labels.numel() > 0
        if check_labels:  # -100 (not scored) or a class of the vocabulary ([MASK] is no class)
            vocab = self.config.vocab_size
            reads.append(((labels != -100) & ((labels < 0) | (labels >= vocab))).any())
        i_labels = len(reads) - 1
        # 1 marks a token, 0 a pad; any other value is refused (an additive 0 / -inf mask was silently taken
        # the other way round: its 0s as pads); read with the ids (a call on inputs_embeds alone reads nothing)
        check_mask = check_ids and attention_mask is not None and attention_mask.dtype != torch.bool
        if check_mask:
            reads.append(odd_mask_values(attention_mask).any())
        n_values = len(reads)
        # real tokens per row after this call = cache.pos - n_meta (if started) + new tokens
        new: Tensor | int = T
        bound = limit  # the largest allowed value of reads[-1]
        if started and attention_mask is None:  # every row gets T more: read max(pos) only
            reads.append(cache.pos.max())
            bound = limit + n_meta - T
        elif started or (T > limit and attention_mask is not None):
            new = attention_mask.to(torch.bool).sum(1) if attention_mask is not None else T
            reads.append(((cache.pos - n_meta) if started else 0) + new)
            reads[-1] = reads[-1].max()
        elif T > limit:  # no cache in use, no mask: every row has T real tokens
            raise ValueError(f"{name}: {T} positions exceed max_seq_len {limit}{_rule_note(n_meta)}")
        if not reads:
            return
        # (as integers: the labels' check, a bool, may come last, and the ids read as bools passed any id >= 1)
        vals = torch.stack([r.to(torch.long) for r in reads]).tolist()  # the one device sync
        if check_ids and (vals[0] < 0 or vals[1] >= V):
            at = ((input_ids < 0) | (input_ids >= V)).nonzero()[0]
            bad = int(input_ids[tuple(at)])
            if bad == self.objective.mask_token_id:
                raise ValueError(f"{name}: token id {bad} at {at.tolist()} is block diffusion's [MASK], which only a "
                                 f"noisy block reads (forward(..., bidirectional=True)); a prompt or causal input "
                                 f"holds ids of the vocabulary [0, {self.config.vocab_size})")
            raise ValueError(f"{name}: token id {bad} at {at.tolist()} is outside the "
                             f"vocabulary (vocab_size {self.config.vocab_size}"
                             f"{'; the [MASK] id is ' + str(V - 1) if V > self.config.vocab_size else ''})")
        if check_mask and vals[n_values - 1]:
            raise odd_mask_error(attention_mask, odd_mask_values(attention_mask))
        if check_labels and vals[i_labels]:
            at = ((labels != -100) & ((labels < 0) | (labels >= vocab))).nonzero()[0]
            raise ValueError(f"labels: {int(labels[tuple(at)])} at {at.tolist()} is neither -100 (not scored) nor "
                             f"a token id of the vocabulary (vocab_size {vocab})")
        if len(reads) > n_values and vals[-1] > bound:  # error path: find the row
            cached = (cache.pos - n_meta) if started else torch.zeros_like(new)
            row = int((cached + new).argmax())
            new_r = new if isinstance(new, int) else int(new[row])
            where = f"row {row}" if cached.shape[0] > 1 else None
            if started:
                raise ValueError(f"{name}: {new_r} new positions after {int(cached[row])} cached exceed "
                                 f"max_seq_len {limit}{_rule_note(n_meta, where)}")
            raise ValueError(f"{name}: {new_r} positions exceed max_seq_len {limit}{_rule_note(n_meta, where)}")

    @staticmethod
    def lm_loss(logits: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Next-token cross entropy: position t predicts labels[t+1]; -100 and pads ignored. In
        float32 (float64 for float64 logits, as ``hidden_lm_loss``)."""
        tgt = next_token_targets(labels, attention_mask)[:, :-1]
        z = logits[:, :-1].flatten(0, 1)
        return F.cross_entropy(z.to(dispatch.compute_dtype(z)), tgt.flatten(), ignore_index=-100)

    def hidden_lm_loss(self, h: Tensor, labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """``lm_loss(self.lm_head(h), labels, attention_mask)`` from the final hidden states
        ``h [B, T, D]`` without the logits (``kernels.linear_ce``: Liger's fused kernel on CUDA,
        the chunked reference elsewhere; tied embeddings included, the head's weight is the
        embedding's). Position t predicts labels[t+1]; the last position, -100 and pads are
        not scored."""
        return linear_cross_entropy(h, self.lm_head.weight, next_token_targets(labels, attention_mask),
                                    ignore_index=-100)

    def run(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` as a forward pass of this model. The trainer calls the objective's
        training and evaluation passes through it: under FSDP2, ``training.distributed.shard_model``
        registers this method as a forward (``register_fsdp_forward_method``), so the root's own
        parameters (embedding, meta tokens, final norm, head, the objective's) are gathered around
        it also for objectives that run the model's parts themselves (block diffusion's two-stream
        pass, LaDiR's) instead of ``forward``; on one process it is a plain call."""
        return fn(*args, **kwargs)

    @property
    def records_states(self) -> bool:
        """Whether a verify chunk can record its per-position states (``forward(record_states=True)``):
        a structure that records (``records_states``: a plain stack; ETD's iterations and routes are not
        recorded) whose every mixer records (gdn, mamba3, ATLAS, gated attention, hymba, none)."""
        return getattr(self.structure, "records_states", False) and all(
            b.mixer is None or getattr(b.mixer, "records_states", False) for b in self.blocks)

    def rewind(self, cache: HybridCache, snapshot: HybridCache, ids: Tensor, keep: Tensor) -> bool:
        """Roll ``cache`` back to the state after ``snapshot`` plus the first ``keep[b]`` tokens
        of ``ids[b]`` (the tokens fed since the snapshot). Speculative decoding calls it after a
        verify chunk with each row's accepted length. Two ways, both exact for their state types:

        * the verify chunk was the cache's last call, made with ``forward(..., record_states=True)``
          on a model whose every layer records (``records_states``; ``cache.recorded``), on top of
          ``snapshot``, with these ``ids`` (padding only on the right, ``keep[b]`` within row b's
          real tokens): each state is set to its recorded state after ``keep[b]`` tokens (a
          gather, ``HybridCache.commit``; no forward; returns False);
        * otherwise (ETD models, a chunk not recorded or not this one): restore the snapshot and
          run the kept tokens again in one forward (per-row lengths through the padding rule;
          every state type: KV with windows and meta tokens, conv, gdn / mamba3 / ATLAS states,
          hymba, ETD iterations and routes); returns True (False when no row keeps a token).

        Raises ``ValueError``, before the cache changes, unless ``ids`` is [B, n] and ``keep`` [B]
        holds integers in [0, n] (B: the cache's rows), or for a snapshot not of this cache."""
        B = cache.batch_size
        if not (isinstance(ids, Tensor) and ids.ndim == 2 and ids.shape[0] == B):
            raise ValueError(f"rewind: ids must be [{B}, n] (the tokens fed since the snapshot), got "
                             f"{list(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__}")
        if not (isinstance(keep, Tensor) and keep.shape == (B,) and not keep.is_floating_point()):
            raise ValueError(f"rewind: keep must be an integer tensor [{B}], got "
                             f"{f'{keep.dtype} {list(keep.shape)}' if isinstance(keep, Tensor) else type(keep).__name__}")
        cache.check_snapshot(snapshot, "rewind")  # (first: the recording's checks compare its positions)
        rec = cache.recorded
        if rec is not None and not (ids.shape[1] == rec.n and (rec.ids is None or rec.ids.shape == ids.shape)):
            rec = None
        reads = [keep.min(), keep.max()] if B else []
        if rec is not None and B:  # (read with keep: this recording is the chunk on top of the snapshot)
            k = keep.to(rec.base.device)
            ok = (snapshot.pos.to(rec.base.device) == rec.base).all() & (k <= rec.lengths).all() & rec.prefix.all()
            if rec.ids is not None:
                ok = ok & (ids.to(rec.ids.device) == rec.ids).all()
            reads.append(ok.to(keep.dtype))
        vals = torch.stack(reads).tolist() if B else [0, 0]  # the one read of keep
        lo, n = vals[0], vals[1]
        if not 0 <= lo <= n <= ids.shape[1]:
            raise ValueError(f"rewind: keep must be in [0, {ids.shape[1]}] (the tokens fed), got {keep.tolist()}")
        if rec is not None and len(vals) > 2 and vals[2]:
            cache.commit(keep.to(device=rec.base.device, dtype=torch.long), n)
            return False
        cache.restore(snapshot)
        if n == 0:  # (no row keeps a token)
            return False
        keep = keep.to(device=ids.device, dtype=torch.long)
        mask = (torch.arange(n, device=ids.device)[None] < keep[:, None]).long()
        self(ids[:, :n], attention_mask=None if bool(mask.all()) else mask, cache=cache, check_inputs=False)
        return True

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int = 32,
        mode: str = "ar",
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        attention_mask: Tensor | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        generator: torch.Generator | None = None,
        streamer: Callable[[Tensor], Any] | None = None,
        stats: dict | None = None,
        min_p: float | None = None,
        **options: Any,
    ) -> Tensor:
        """Cached generation; returns prompt + new tokens [B, T + n]. ``temperature=0`` is greedy;
        above it, tokens are drawn from the temperature-scaled distribution restricted to ``top_k``,
        nucleus ``top_p`` and ``min_p`` (min-p sampling, arXiv 2407.01082: tokens whose probability is
        at least ``min_p`` times the top token's), in HF's order (``generation.filtered_probs``).

        ``stats``: a dict the decoder fills (forward passes, tokens, tokens per forward, ...).
        ``options``: the mode's own settings (``block_diffusion``: ``block_size``,
        ``threshold``, ``steps``); ``models/generation.py`` documents each mode.

        Raises, before any work, ``TypeError`` for ``input_ids`` that are not an integer tensor
        (or a ``draft`` that is not a model) and ``ValueError`` for an empty prompt, a
        ``temperature`` below 0 (or not finite), ``top_k`` below 1, ``top_p`` outside (0, 1] (None
        is "off" for both), ``min_p`` outside [0, 1] (None or 0: off), or when the longest prompt row
        (real tokens) plus ``max_new_tokens`` exceeds ``max_seq_len``; at the prefill, ``ValueError`` for an id outside the vocabulary
        (``forward``'s checks); the decoding steps skip the checks."""
        from .generation import GENERATORS, check_sampling

        if not isinstance(mode, str) or mode not in GENERATORS:
            raise ValueError(f"unknown generation mode {brief(mode)}; available: {', '.join(sorted(GENERATORS))}")
        import inspect

        fn = GENERATORS[mode]
        allowed = [k for k, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
        for k in options:
            if k not in allowed:
                raise ValueError(f"generate(mode={mode!r}) takes no option {k!r}"
                                 + (f"; its options: {', '.join(sorted(set(allowed) - _COMMON))}"
                                    if set(allowed) - _COMMON else ""))
        # the common arguments a mode names (a forecast samples no tokens): given to one that does not, refused
        common = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, attention_mask=attention_mask, eos_token_id=eos_token_id, generator=generator,
                      streamer=streamer, stats=stats)
        given = [k for k, v in common.items() if k not in allowed and (v != 0.0 if k == "temperature" else v is not None)]
        if given:
            raise ValueError(f"generate(mode={mode!r}) takes no {', '.join(given)}")
        check_sampling(temperature, top_k, top_p, eos_token_id, stats, self.config.vocab_size, min_p)
        if streamer is not None and not callable(streamer):  # (e.g. an HF streamer object: put / end, no call)
            raise TypeError(f"streamer must be a callable, called with each new token column [B] (or None), got "
                            f"{type(streamer).__name__} {brief(streamer)}")
        if generator is not None and not isinstance(generator, torch.Generator):  # (checked before the prefill;
            raise TypeError(f"generator must be a torch.Generator (or None), got "  # greedy would ignore it)
                            f"{type(generator).__name__} {brief(generator)}")
        if isinstance(input_ids, Tensor) and input_ids.dtype == torch.int32:  # (the decoders' token buffers and
            input_ids = input_ids.long()  # the sampled tokens are long: every mode, once)
        return fn(self, input_ids, **{k: v for k, v in common.items() if k in allowed}, **options)

    # ------------------------------------------------------------------ persistence
    def set_activation_checkpointing(self, every: int = 1) -> None:
        """Activation checkpointing (``core/recompute.py``): every ``every``-th block application of
        a training forward keeps only its input and runs again in the backward (1: every block, as
        HF's ``gradient_checkpointing_enable``; 0: off). Forwards without gradients and cached
        calls are not affected; outputs and gradients are the same, up to the order of float sums."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ValueError(f"every must be an integer >= 0, got {every!r}")
        self.structure.checkpointing = Checkpointing(every, preserve_rng=self.config.dropout > 0)

    @property
    def activation_checkpointing(self) -> int:
        """Every how many block applications activations are recomputed (0: off)."""
        return self.structure.checkpointing.every

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save_pretrained(self, path: str | os.PathLike, extra_files: dict[str, str] | None = None) -> None:
        """Write ``recipe.yaml`` + ``model.safetensors`` (+ extra text files, each a plain file name other
        than those two, its text a str) into ``path``. Bad ``extra_files`` are refused before anything
        is written."""
        for name, text in (extra_files or {}).items():
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or name.endswith(".tmp"):
                raise ValueError(f"extra_files: {brief(name)} is not a plain file name inside the folder")
            if name in ("model.safetensors", "recipe.yaml"):
                raise ValueError(f"extra_files: {name!r} is the checkpoint's own file")
            if not isinstance(text, str):
                raise TypeError(f"extra_files[{name!r}] must be text (str), got {type(text).__name__}")
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        if self.config.tie_embeddings:
            state.pop("lm_head.weight", None)  # (a model without vocabulary has neither)
        tmp = p / "model.safetensors.tmp"
        write_safetensors(state, tmp, metadata={"recipe_hash": self.recipe.hash(), "format": "hymba_plus"})
        (p / "recipe.yaml.tmp").write_text(self.recipe.to_yaml(), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (p / f"{name}.tmp").write_text(text, encoding="utf-8")
        os.replace(tmp, p / "model.safetensors")
        os.replace(p / "recipe.yaml.tmp", p / "recipe.yaml")
        for name in extra_files or {}:
            os.replace(p / f"{name}.tmp", p / name)


_COMMON = {"max_new_tokens", "temperature", "top_k", "top_p", "min_p", "attention_mask", "eos_token_id", "generator",
           "streamer", "stats"}  # generate()'s own arguments; the rest of a decoder's keywords are its options


def next_token_targets(labels: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """[B, T] class ids each position is scored against: position t predicts labels[t + 1];
    the last position, -100 labels, pads (``attention_mask == 0``) as targets and pads as
    predictors get -100 (not scored): a left-padded row's first token is not predicted from the
    pad before it, as an unpadded row's first token is predicted from nothing, so a padded row
    scores the loss of the same row unpadded."""
    tgt = F.pad(labels[:, 1:], (0, 1), value=-100)
    if attention_mask is not None:
        tgt = tgt.masked_fill(F.pad(attention_mask[:, 1:], (0, 1), value=1) == 0, -100)
        tgt = tgt.masked_fill(attention_mask == 0, -100)
    return tgt


def _skip_checks(t: Tensor) -> bool:
    """True while the forward is being traced or compiled, or captured into a CUDA graph:
    the input checks read tensors back to the host, which those modes cannot do (a capture as
    ``dispatch.capturing`` says, which a failed capture's diagnosis also sets on any device)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return dispatch.capturing()


def _rule_note(n_meta: int, where: str | None = None) -> str:
    """' (row 1; the 8 meta tokens are not counted)', the parts that apply."""
    parts = [where] if where else []
    if n_meta:
        parts.append(f"the {n_meta} meta tokens are not counted")
    return f" ({'; '.join(parts)})" if parts else ""


def check_device(device: Any, dtype: Any = None) -> None:
    """Refuse, as one ``ValueError`` / ``TypeError`` line naming the argument, a ``device`` torch
    does not know (``"gpu"``) or cannot use here (CUDA on a machine without it, a CUDA index
    past the last card) and a ``dtype`` that is not a ``torch.dtype``. None passes."""
    if device is not None:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device {brief(device)}: not a device (expected e.g. 'cpu', 'cuda', 'cuda:0' or a "
                             "torch.device)") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device {brief(device)}: CUDA is not available on this machine")
            if dev.index is not None and dev.index >= torch.cuda.device_count():
                raise ValueError(f"device {brief(device)}: only {torch.cuda.device_count()} CUDA device(s)")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (e.g. torch.bfloat16), got {type(dtype).__name__} "
                        f"{brief(dtype)}")
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(f"dtype {dtype}: a model's weights are floating point (e.g. torch.float32, torch.bfloat16)")


def build_model(recipe: "Recipe | str | os.PathLike | dict", device: Any = None, dtype: Any = None,
                overrides: Any = None) -> HybridLM:
    """Build a HybridLM from a recipe, a recipe path, a YAML string or a dict. A bad ``device``
    or ``dtype`` is refused before anything is built (``check_device``). ``overrides``: ``load_recipe``'s
    (``{"model.d_model": 256}`` or ``["model.d_model=256"]``, set before the recipe is validated)."""
    check_device(device, dtype)
    model = HybridLM(load_recipe(recipe, overrides=overrides))
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model


def write_safetensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """``safetensors.torch.save_file``, with the file mode every other file gets (0666 less
    the umask): safetensors writes through a private temporary file (0600)."""
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


#: a checkpoint's generation settings, HF's file name and meaning (``generation_config``)
GENERATION_CONFIG = "generation_config.json"


def generation_config(path: str | os.PathLike, vocab_size: int | None = None) -> dict[str, Any]:
    """The generation settings of the checkpoint folder ``path`` that the decoders take: today
    ``eos_token_id`` (one id or a list, as HF's ``generation_config.json``, where ``hymba convert``
    writes the source model's end ids). ``{}`` without the file or the key; a file that is not a
    JSON object or an id outside ``[0, vocab_size)`` is a ``CheckpointError`` naming the file and key.
    Other keys (HF's sampling defaults) are not read."""
    from ..core.config import read_json_object
    from .generation import check_eos

    f = Path(path) / GENERATION_CONFIG
    if not f.is_file():
        return {}
    data = read_json_object(f, CheckpointError)
    if data.get("eos_token_id") is None:
        return {}
    try:
        check_eos(data["eos_token_id"], vocab_size)
    except ValueError as e:
        raise CheckpointError(f"{f}: eos_token_id: {e}") from None
    return {"eos_token_id": data["eos_token_id"]}


def from_pretrained(path: str | os.PathLike, device: Any = None, strict: bool = True) -> HybridLM:
    """Load a folder written by ``save_pretrained`` (or a ``hymba train`` checkpoint). A bad
    ``device`` is refused before anything is read (``check_device``). Weights that do not fit
    recipe.yaml (missing / unexpected tensors, shapes, integer for float, an untied
    ``lm_head.weight`` under ``tie_embeddings``) are a ``CheckpointError``; weights saved under
    another recipe hash than recipe.yaml's load with a warning (an edit, e.g. a longer
    ``max_seq_len``, or a save into the folder cut between its files)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    check_device(device)
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be True or False, got {type(strict).__name__} {brief(strict)}")
    p = Path(path)
    if not p.is_dir():
        raise CheckpointError(f"{p}: not a checkpoint folder")
    for name in ("recipe.yaml", "model.safetensors"):
        if not (p / name).is_file():
            raise CheckpointError(f"{p / name}: missing")
    try:
        recipe = load_recipe(p / "recipe.yaml")
    except RecipeError as e:
        raise CheckpointError(f"invalid recipe: {e.errors[0]}") from None  # the error names the file and line
    try:
        state = load_file(str(p / "model.safetensors"), device="cpu")
        with safe_open(str(p / "model.safetensors"), framework="pt") as f:
            saved_hash = (f.metadata() or {}).get("recipe_hash")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p / 'model.safetensors'}: corrupt or truncated ({e})") from None
    if saved_hash is not None and saved_hash != recipe.hash():  # an edit (legitimate: a longer max_seq_len), or
        # a save into this folder cut between its files: the weights of one model under another's recipe
        warnings.warn(f"{p}: model.safetensors was written with recipe hash {saved_hash}, recipe.yaml hashes to "
                      f"{recipe.hash()} (edited since, or an interrupted save_pretrained)", stacklevel=2)
    model = HybridLM(recipe)
    if recipe.model.tie_embeddings and "embed.weight" in state:
        head = state.setdefault("lm_head.weight", state["embed.weight"])
        if head is not state["embed.weight"] and (head.shape != state["embed.weight"].shape
                                                   or not torch.equal(head, state["embed.weight"])):
            # (both load into the one tied tensor: the head's values replaced the embedding, silently)
            raise CheckpointError(f"{p / 'model.safetensors'}: holds an lm_head.weight that differs from embed.weight, "
                                  "but recipe.yaml ties them (model.tie_embeddings: true)")
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    bad_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    # a float parameter stored as integers (or the reverse) would load silently through load_state_dict's cast
    bad_kind = [f"{k}: {state[k].dtype} for {own[k].dtype}" for k in own
                if k in state and state[k].is_floating_point() != own[k].is_floating_point()]
    # strict=False allows missing and unexpected tensors, never a wrong shape or kind of dtype
    what = (f"missing {missing[:3]}" if strict and missing else f"unexpected {unexpected[:3]}" if strict and unexpected
            else f"shape mismatch {bad_shape[:3]}" if bad_shape else f"dtype mismatch {bad_kind[:3]}" if bad_kind
            else None)
    if what is not None:
        raise CheckpointError(f"{p / 'model.safetensors'}: does not match recipe.yaml ({what})")
    model.load_state_dict(state, strict=strict)
    if device is not None:
        model = model.to(device)
    return model
