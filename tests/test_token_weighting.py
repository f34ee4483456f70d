"""Token-weighted losses (``Objective.train_items``, ``Trainer.train_step``): a step with gradient
accumulation trains the mean over every loss item of its micro-batches (and processes), not the mean
of their means, as HF transformers' ``num_items_in_batch`` and torchtitan do; a micro-batch with 3
scored tokens no longer weighs as much as one with 30. Auxiliary losses keep their per-micro-batch
mean. As many items everywhere give the gradients of the mean over micro-batches bit for bit.
``eval_loss`` is the mean over every scored held-out item."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from hymba_plus import load_recipe
from hymba_plus.training import cuda_graph as cg
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.data import Batch
from hymba_plus.training.trainer import RunOptions, Trainer

TINY = {
    "name": "tokw-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64}},
}
MOE = dict(TINY, model={**TINY["model"], "block_pattern": "GA | GA+moe"},
           components={**TINY["components"], "moe": {"n_experts": 4, "top_k": 2, "aux_loss_coef": 0.1}})
B, T = 2, 16


def _trainer(tmp_path: Path, recipe: dict, grad_accum: int, double: bool = True, **cfg) -> Trainer:
    tr = Trainer(load_recipe(recipe), TrainConfig(steps=2, batch_size=B, seq_len=T, warmup_steps=0,
                                                  grad_accum=grad_accum, **cfg),
                 RunOptions(out=tmp_path / "run", progress=False, log=lambda s: None, device="cpu"))
    tr.setup()
    if double:
        tr.model.double()
    return tr


def _batch(seed: int, scored: int) -> Batch:
    """B rows of T random tokens; ``scored`` next-token targets (labels[:, 1:] not -100) in all."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 32, (B, T), generator=g)
    labels = torch.full_like(ids, -100)
    pos = torch.randperm(B * (T - 1), generator=g)[:scored]
    flat = labels[:, 1:].clone().reshape(-1)
    flat[pos] = ids[:, 1:].reshape(-1)[pos]
    labels[:, 1:] = flat.view(B, T - 1)
    return Batch(ids, labels)


def _feed(tr: Trainer, batches: list[Batch]) -> None:
    """The trainer's micro-batches are ``batches`` (by their first sample index) on this rank."""
    W = tr.info.world
    tr.stream.train = lambda idx: batches[(idx.start // B - tr.info.rank) // W]


def _step_grads(tr: Trainer) -> tuple[dict[str, torch.Tensor], float]:
    """(the accumulated gradients, the logged loss) of one ``train_step``, without its optimizer step."""
    from hymba_plus.training import distributed as dist_mod

    got: dict = {}

    def capture(step, loss, factor, what, aux=None, stats=None):  # noqa: ANN001, ANN202, ARG001
        got["grads"] = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
                        for n, p in tr.model.named_parameters() if p.grad is not None}
        got["loss"] = dist_mod.all_reduce([float(loss) / tr.cfg.grad_accum], tr.info)[0]  # (as _optimizer_step)
        tr.opt.zero_grad(set_to_none=True)
        return {}

    tr._optimizer_step = capture
    tr.train_step(0)
    return got["grads"], got["loss"]


def _close(a: dict, b: dict, tol: float) -> float:
    assert a.keys() == b.keys() and a
    worst = max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-30)) for k in a)
    assert worst < tol, worst
    return worst


def test_accumulated_gradient_is_the_gradient_of_one_batch_of_both(tmp_path):
    """Two micro-batches with 3 and 25 scored targets (float64 model): the step's gradient and
    logged loss are those of one batch holding both (the mean over the 28 targets). Before, each
    micro-batch's mean weighed 1/2: the 3 targets counted as much as the 25."""
    tr = _trainer(tmp_path, TINY, grad_accum=2)
    parts = [_batch(1, 3), _batch(2, 25)]
    assert [int(tr.objective.train_items(b.input_ids, b.labels, b)) for b in parts] == [3, 25]
    _feed(tr, parts)
    grads, loss = _step_grads(tr)
    ids = torch.cat([b.input_ids for b in parts])
    labels = torch.cat([b.labels for b in parts])
    out = tr.objective.train_forward(tr.model, tr.model, ids, labels)
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    _close(grads, want, 1e-10)
    assert loss == pytest.approx(float(out.loss.detach()), rel=1e-12)


def _reference(tr: Trainer, parts: list[Batch], counts: list[int]) -> tuple[dict, float]:
    """The token-weighted objective with each micro-batch's aux loss at 1 / grad_accum."""
    G, N = len(parts), sum(counts)
    total = 0
    for b, n in zip(parts, counts):
        out = tr.objective.train_forward(tr.model, tr.model, b.input_ids, b.labels, batch=b)
        assert out.aux_loss is not None and out.aux_loss.requires_grad
        total = total + (out.loss - out.aux_loss) * n / N + out.aux_loss / G
    total.backward()
    grads = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    tr.opt.zero_grad(set_to_none=True)
    return grads, float(total.detach())


def test_aux_losses_keep_their_mean_over_micro_batches(tmp_path):
    """A MoE model's balance loss is a mean over each micro-batch's routing, not over loss items: it
    keeps the weight 1 / grad_accum, while the next-token loss is weighed by its targets."""
    tr = _trainer(tmp_path, MOE, grad_accum=2)
    parts, counts = [_batch(3, 4), _batch(4, 27)], [4, 27]
    _feed(tr, parts)
    grads, loss = _step_grads(tr)
    want, want_loss = _reference(tr, parts, counts)
    _close(grads, want, 1e-10)
    assert loss == pytest.approx(want_loss, rel=1e-12)


def test_the_captured_step_weighs_its_aux_loss_apart(tmp_path):
    """The CUDA-graph path: the weights enter as the gradient outputs of the captured step's loss and
    aux loss (``cuda_graph._LossStep``, whose aux loss keeps its graph), as in the eager step. (CPU:
    the captured callable stood in for by the module a capture is given; its gradients are summed in
    ``GradAccumulator``'s buffers as a replay's are.)"""
    tr = _trainer(tmp_path, MOE, grad_accum=2)
    parts, counts = [_batch(5, 6), _batch(6, 29)], [6, 29]
    _feed(tr, parts)
    graphed = object.__new__(cg.GraphedStep)
    graphed.step, graphed.has_aux, graphed.stat_keys = cg._LossStep(tr.model, True, []), True, []
    tr.graphed = graphed
    grads, loss = _step_grads(tr)
    tr.graphed = None
    want, want_loss = _reference(tr, parts, counts)
    _close(grads, want, 1e-10)
    assert loss == pytest.approx(want_loss, rel=1e-12)


def test_distillation_weighs_its_cross_entropy_by_targets_and_its_kl_per_micro_batch(tmp_path):
    """``--distill``: the objective's cross entropy is weighed by its targets; the KL term, a mean over
    every position of a micro-batch (as many in each), keeps 1 / grad_accum with the aux losses
    (``distill_loss``'s third part)."""
    from hymba_plus import build_model
    from hymba_plus.training.distill import distill_loss

    tr = _trainer(tmp_path, MOE, grad_accum=2)
    torch.manual_seed(11)
    tr.teacher = build_model(load_recipe(TINY)).double().eval().requires_grad_(False)
    parts, counts = [_batch(12, 5), _batch(13, 24)], [5, 24]
    _feed(tr, parts)
    grads, loss = _step_grads(tr)
    total = 0
    for b, n in zip(parts, counts):
        out = tr.objective.train_forward(tr.model, tr.model, b.input_ids, b.labels, return_logits=True)
        loss_b, _, equal = distill_loss(out, tr.teacher, b.input_ids, tr.cfg.distill)
        total = total + (loss_b - equal) * n / sum(counts) + equal / 2
    total.backward()
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    _close(grads, want, 1e-10)
    assert loss == pytest.approx(float(total.detach()), rel=1e-12)


def test_forecast_steps_weigh_the_observed_targets(tmp_path):
    """Forecasting windows whose horizons miss values (gaps of the data, NaN): the step's gradient
    is the loss over the observed targets of both micro-batches at once."""
    fc = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "forecast_tiny.yaml")
    tr = Trainer(fc, TrainConfig(steps=2, batch_size=B, warmup_steps=0, grad_accum=2),
                 RunOptions(out=tmp_path / "run", progress=False, log=lambda s: None, device="cpu"))
    tr.setup()
    tr.model.double()
    parts = [tr.stream.train(tr._micro_indices(m)) for m in range(2)]
    parts[0].labels[0, 2:] = float("nan")  # micro-batch 0: 2 + 12 observed targets, micro-batch 1: 48
    parts[0].labels[1, :] = torch.where(torch.arange(24)[:, None] % 2 == 0, parts[0].labels[1], float("nan"))
    counts = [int(tr.objective.train_items(b.input_ids, b.labels, b)) for b in parts]
    assert counts == [2 + 12, 48]
    _feed(tr, parts)
    grads, loss = _step_grads(tr)
    x, y = torch.cat([b.input_ids for b in parts]), torch.cat([b.labels for b in parts])
    out = tr.objective.train_forward(tr.model, tr.model, x, y)
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    _close(grads, want, 1e-9)
    assert loss == pytest.approx(float(out.loss.detach()), rel=1e-10)


@pytest.mark.parametrize("grad_accum", [1, 3])
def test_as_many_items_everywhere_give_the_mean_over_micro_batches_bit_for_bit(tmp_path, grad_accum):
    """The built-in task (as many scored targets in every row) and a MoE model in float32: the
    gradients and the logged loss are bit for bit those of ``sum_i loss_i / grad_accum``, the step
    before token weighting (3: a divisor that is no power of two)."""
    tr = _trainer(tmp_path, MOE, grad_accum=grad_accum, double=False)
    parts = [tr.stream.train(tr._micro_indices(m)) for m in range(grad_accum)]
    assert len({int(tr.objective.train_items(b.input_ids, b.labels, b)) for b in parts}) == 1
    grads, loss = _step_grads(tr)
    losses = []
    for b in parts:
        out = tr.objective.train_forward(tr.model, tr.model, b.input_ids, b.labels, batch=b)
        (out.loss / grad_accum).backward()
        losses.append(out.loss.detach().double())
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    assert want.keys() == grads.keys() and all(torch.equal(grads[k], want[k]) for k in want)
    assert loss == float(sum(losses)) / grad_accum


def test_a_micro_batch_with_nothing_to_score_weighs_nothing(tmp_path):
    """A micro-batch without a target has a NaN mean over nothing; it adds nothing to the step (which
    trains the other's targets), where it stopped the run as a non-finite loss."""
    tr = _trainer(tmp_path, TINY, grad_accum=2)
    parts = [_batch(7, 0), _batch(8, 11)]
    _feed(tr, parts)
    grads, loss = _step_grads(tr)
    out = tr.objective.train_forward(tr.model, tr.model, parts[1].input_ids, parts[1].labels)
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    _close(grads, want, 1e-12)
    assert loss == pytest.approx(float(out.loss.detach()), rel=1e-12)


def test_eval_loss_is_the_mean_over_scored_targets(tmp_path):
    """Two held-out batches scoring 3 and 26 next-token targets: ``eval_loss`` is the cross entropy
    over the 29 targets (it was the mean of the two batches' means: rows weighed alike)."""
    tr = _trainer(tmp_path, TINY, grad_accum=1, eval_batches=2)
    parts = [_batch(9, 3), _batch(10, 26)]
    tr.stream.eval = lambda idx: parts[idx.start // B]
    tr.stream.n_eval = lambda: None
    got = tr.evaluate()["eval_loss"]
    with torch.no_grad():
        ids, labels = torch.cat([b.input_ids for b in parts]), torch.cat([b.labels for b in parts])
        want = float(tr.model.lm_loss(tr.model(ids).logits, labels))
    assert got == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------- two processes


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of a 2-process gloo run (FSDP2 on the CPU): one ``train_step`` over its two
    micro-batches (the ranks' target counts differ), the full gradient saved on rank 0."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tr = _trainer(Path(out), TINY, grad_accum=2, double=False)
    _feed(tr, [_batch(20 + 2 * m + rank, COUNTS[rank][m]) for m in range(2)])
    grads, loss = _step_grads(tr)
    if rank == 0:
        torch.save({"grads": grads, "loss": loss}, Path(out) / "two.pt")
    from hymba_plus.training import distributed as dist_mod

    info = tr.info
    del tr
    dist_mod.shutdown(info)


COUNTS = [[2, 9], [30, 5]]  # [rank][micro]: targets of each micro-batch


def test_two_processes_weigh_the_global_targets(tmp_path):
    """2 gloo processes (FSDP2, which averages the ranks' gradients), each with two micro-batches of
    other target counts: the step's gradient and loss are one process's over the four batches at once
    (the mean over all 46 targets; each rank's share is scaled by world / the all-reduced count)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "two.pt")
    tr = _trainer(tmp_path / "one", TINY, grad_accum=1, double=False)
    parts = [_batch(20 + 2 * m + r, COUNTS[r][m]) for r in range(2) for m in range(2)]
    ids, labels = torch.cat([b.input_ids for b in parts]), torch.cat([b.labels for b in parts])
    out = tr.objective.train_forward(tr.model, tr.model, ids, labels)
    out.loss.backward()
    want = {n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None}
    _close(got["grads"], want, 1e-5)
    assert got["loss"] == pytest.approx(float(out.loss.detach()), rel=1e-6)
