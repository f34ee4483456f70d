"""What every objective tells the training loop, so the loop never asks which one it has."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn


class Objective(nn.Module):
    """Base of the registered objectives (kind ``objective``). Besides ``train_forward`` and
    ``eval_batch``, an objective declares:

    * ``mask_token_id``: an extra input id it adds to the vocabulary (block diffusion's
      [MASK]), or None;
    * ``needs_segments``: its batches carry question / reasoning / answer segments, so the
      trainer opens reasoning data (``training/data.ReasoningBatches``);
      ``segment_reserve(recipe)`` the positions its passes add to an example (ladir's memory
      slots), which the data's length check counts;
    * ``eager_because``: why ``--compile`` cannot compile its training step (None: it can, through
      ``compile_step``);
    * ``core(model, *tensors, **kw)``: for an objective whose step runs the model's parts itself
      rather than its forward (block diffusion's two-stream pass, forecasting's patch embedding and
      horizon head around the backbone), the tensor work of its step from the model's parts to the
      loss, which its ``train_forward`` and ``eval_batch`` call through ``core_of(fwd, model)``;
      host-side work and random draws stay outside it (they run eagerly, so a compiled step draws
      the eager step's noise); None (next token, MTP): the step is the model's forward;
    * ``compile_step(model, compile_fn)``: what ``--mode compile`` hands ``train_forward`` and
      ``eval_batch`` as ``fwd``: ``compile_fn(model)`` (the model's forward compiled) by default,
      ``CompiledParts`` of ``compile_fn(core bound to model)`` for an objective with a ``core``, so
      the whole loss computation is compiled, as torchtitan compiles it;
    * ``graph_because``: why ``--cuda-graph`` (and ``auto`` on CUDA) cannot capture its training
      step (None: ``train_forward`` of a token batch is tensors in, loss out, without host reads
      and without the batch's other fields: the trainer captures it whole,
      ``training/cuda_graph.GraphedStep``);
    * ``phase_settings``: train settings that choose *which* parameters it trains (ladir's
      stage); changing one on ``--resume`` starts a new phase (a fresh optimizer);
    * ``configure(train_cfg)``: read the run's settings; ``run_problem(train_cfg)``: one line
      when the run cannot train this objective, else None;
    * ``reads_tokens``: the model reads token ids (``model.vocab_size`` required, embedding and
      LM head); False for ``forecast``, whose model reads patches of numbers and has neither;
    * ``needs_series``: its batches are numeric windows (``training/series.py``);
    * ``default_data``: the ``--data`` a run uses when neither the flag nor the recipe's
      ``train.data`` names one;
    * ``eval_sums(out)`` / ``eval_results(sums)``: extra held-out metrics: per-batch sums the
      trainer adds up (over batches and processes) and the metrics made from them (forecast:
      MSE, MAE, MASE, CRPS and the seasonal-naive baseline's); none by default;
    * ``train_items(ids, labels, batch)``: how many items a batch's loss is the mean over (a
      0-d device tensor, from the batch alone, before the forward and without a host read). The
      trainer weighs each micro-batch's loss by it, so a step trains the mean over every item of
      its micro-batches and processes, not the mean of their means (``training/trainer.py``;
      the ``num_items_in_batch`` of HF transformers' gradient accumulation): next token, its
      scored next-token targets; block diffusion, its scored tokens; forecast, its observed
      targets; by default (ladir, whose loss sums means over other denominators) its rows,
      which every training micro-batch has as many of: the equal weights of a mean over them;
    * ``eval_weight(out, ids, labels, batch)``: the weight of one held-out batch's loss in
      ``eval_loss`` (the weighted mean over batches), ``labels`` the scored ones (a batch's
      repeated rows blanked): ``train_items`` of them, so ``eval_loss`` is the mean over every
      scored held-out item (ladir: over the distinct held-out examples, its loss being a mean
      over their rows);
    * ``eval_begin(step)`` / ``eval_end(sums)``: around an evaluation at training step ``step``
      (None outside the training loop); ``eval_end`` gets the summed ``eval_sums`` (the same on
      every process), may change how the objective trains from then on (block diffusion's clip
      search) and returns metrics logged under their own names; nothing by default;
    * ``eval_trains(step)``: what the evaluation at training step ``step`` changes in how it trains
      (None: nothing, by default): a checkpoint saved before that evaluation ran (an interrupt in
      that step) says so, and the resumed run runs it first, as the uninterrupted run did;
    * ``train_state()`` / ``load_train_state(state)``: what the objective learned while training
      besides its parameters (JSON, saved in the checkpoint's trainer state and given back on
      ``--resume``; a checkpoint without it gives ``{}``); none by default.
    """

    mask_token_id: int | None = None
    needs_segments = False
    reads_tokens = True
    needs_series = False
    default_data = "mqar"
    eager_because: str | None = None
    graph_because: str | None = None
    phase_settings: tuple[str, ...] = ()
    core: Callable[..., Any] | None = None  # (a method where defined: see the class docstring)

    @staticmethod
    def segment_reserve(recipe: Any) -> int:
        """Positions this objective's passes add to a reasoning example (none by default)."""
        return 0

    def compile_step(self, model: nn.Module, compile_fn: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Any:
        """The ``fwd`` of a ``--mode compile`` run (``compile_fn``: ``torch.compile`` with the run's
        ``--compile-mode``): the model's forward compiled, or, for an objective with a ``core``, that
        core bound to ``model`` and compiled (``CompiledParts``), which ``core_of`` hands its step and
        its evaluation alike."""
        if self.core is None:
            return compile_fn(model)
        return CompiledParts(compile_fn(functools.partial(self.core, model)))

    def core_of(self, fwd: Any, model: nn.Module) -> Callable[..., Any]:
        """The ``core`` a step runs: the compiled one where ``fwd`` is ``compile_step``'s ``CompiledParts``,
        else ``core`` bound to ``model`` (eager: ``fwd`` is then the model)."""
        if isinstance(fwd, CompiledParts):
            return fwd.core
        assert self.core is not None
        return functools.partial(self.core, model)

    def configure(self, train_cfg: Any) -> None:
        """Read the run's settings (nothing by default)."""

    def run_problem(self, train_cfg: Any) -> str | None:
        """One line when the run's settings cannot train this objective, else None."""
        return None

    def eval_sums(self, out: Any) -> dict[str, float]:
        """Sums of one held-out batch's output that ``eval_results`` turns into metrics."""
        return {}

    def eval_results(self, sums: dict[str, float]) -> dict[str, float]:
        """Held-out metrics (without the ``eval_`` prefix) from the summed ``eval_sums``."""
        return {}

    def eval_begin(self, step: int | None) -> None:
        """Before an evaluation at training step ``step`` (nothing by default)."""

    def eval_end(self, sums: dict[str, float]) -> dict[str, float]:
        """After an evaluation, from the summed ``eval_sums``: metrics logged as named (none by default)."""
        return {}

    def eval_trains(self, step: int) -> str | None:
        """What the evaluation at training step ``step`` changes in how the objective trains from then
        on (block diffusion's clip search at a search step), or None (nothing, by default): a run
        resumed from a checkpoint saved before that evaluation ran (an interrupt) runs it first."""
        return None

    def train_state(self) -> dict[str, Any]:
        """The objective's training state besides its parameters (JSON; none by default)."""
        return {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """Take back ``train_state()`` from a checkpoint (nothing by default)."""

    def train_items(self, ids: Tensor, labels: Tensor, batch: Any = None) -> Tensor:
        """The items a batch's loss is the mean over (a 0-d device tensor, no host read): by default
        its distinct rows (``batch.rows``; every row of a training batch), the weight of an objective
        whose loss is no mean over countable items: every micro-batch of a run has as many rows, so
        the step's loss stays the mean of theirs."""
        rows = batch.rows if batch is not None else labels.shape[0]
        return torch.full((), rows, dtype=torch.long, device=labels.device)

    def eval_weight(self, out: Any, ids: Tensor, labels: Tensor, batch: Any) -> float:
        """The weight of a held-out batch's loss in ``eval_loss``: ``train_items`` of its scored
        ``labels`` (the rows that repeat earlier ones blanked), so ``eval_loss`` is the mean over
        every scored held-out item (0 for a batch that scored nothing)."""
        return float(self.train_items(ids, labels, batch))


class CompiledParts:
    """``fwd`` under ``--mode compile`` for an objective whose step runs the model's parts itself
    (``Objective.compile_step``): ``core`` is ``torch.compile`` of the objective's ``core`` bound to the
    model. Not the model: calling it as one is an error, not a silent eager forward."""

    __slots__ = ("core",)

    def __init__(self, core: Callable[..., Any]):
        self.core = core
