"""Dr.LLM route targets and the ``--train-only`` modes of ``hymba train``.

**Route search** (``search_routes``). Dr.LLM (Heakl et al. 2025, arXiv 2510.12773) trains its
per-layer routers, with the base frozen, on execution paths found offline by a length-aware
search under a compute budget (MCTS in the paper). Here the search is a *length-aware beam
search* over each sequence's route, run on the training batch itself with the frozen model:

* start from all-execute (one forward: the reference loss of every row);
* visit the layer slots that run (encoder, think x iterations, decoder) in order; for every
  beam entry, its copies with this slot set to skip and to repeat are scored (the execute
  copy is the entry itself, already scored: every entry still executes the slots not yet
  visited, so every candidate is a complete route; at a slot none of the row's tokens reached,
  ACT having halted them all, the copies are the entry itself and join neither the beam nor
  the answer). A row's score of a route is its task
  loss (masked next-token cross entropy over the row's labels, ``HybridLM.lm_loss`` per row)
  plus ``length_penalty * applications / slots``;
* keep the ``beam`` best candidates of each row; a route is *acceptable* when its loss is
  at most all-execute's plus ``tolerance`` (nats), and acceptable candidates always rank
  before the others (unacceptable ones stay in the beam only while there are not enough
  acceptable ones: a skip may be repaired by a later repeat);
* the answer per row is the best-scoring acceptable route among all candidates scored
  (all-execute is acceptable, so there always is one): the targets never trade more than
  ``tolerance`` of loss for compute, and among routes of (near) equal loss the one with
  fewer layer applications wins.

Everything is vectorised over rows: the candidates of one slot (``2 x entries x B`` rows) go
through the model as one batch (``max_rows`` splits it), each row with its own route.

**Budget** (forwards per batch). With ``n`` slots in use and beam ``K`` the search scores
``1 + sum_{t < n} 2 min(K, 3^t)`` routes per row, i.e. that many batch-sized forwards'
worth of compute, in ``1 + n`` model calls (more with ``max_rows``): for ``n = 8`` and
``K = 4``, 1 + 2 (1 + 3 + 4 * 6) = 57 batch forwards (``RouteSearch.evaluations``;
``search_budget`` computes it). The search runs without gradients.

**Train-only modes** (``freeze``): ``routers`` trains the Dr.LLM routers alone
(``model.etd_router.routers``) on the searched routes, ``branches`` the MoDr branches alone
(``lora_a``, ``lora_b``, ``branch_router``) with the LM loss; everything else keeps
``requires_grad = False`` (and so stays out of the optimizer).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..components.etd_router import EXECUTE, REPEAT, SKIP

TRAIN_ONLY = ("all", "routers", "branches")


# --------------------------------------------------------------------------- train-only modes


def train_only_problem(recipe, mode: str) -> str | None:  # noqa: ANN001 - Recipe
    """Why ``mode`` cannot train this recipe's model (one line), or None."""
    if mode not in TRAIN_ONLY:
        return f"--train-only {mode}: must be one of {', '.join(TRAIN_ONLY)}"
    if mode == "all":
        return None
    if recipe.model.etd is None:
        return f"--train-only {mode}: the model has no etd_router (a recipe with model.etd)"
    cfg = recipe.component("etd_router")
    if mode == "routers" and not cfg.layer_router.enabled:
        return ("--train-only routers: the model has no Dr.LLM layer routers "
                "(components.etd_router.layer_router.enabled is false)")
    if mode == "routers" and not recipe.reads_tokens:  # (search_routes failed on windows of numbers)
        return (f"--train-only routers: the route search scores routes by the next-token loss of token ids; the "
                f"{recipe.objective.kind} objective reads numbers")
    if mode == "branches" and not cfg.branches.n_branches:
        return "--train-only branches: the model has no MoDr branches (components.etd_router.branches.n_branches is 0)"
    return None


def trainable_modules(model: nn.Module, mode: str) -> list[nn.Module]:
    """The modules whose parameters ``mode`` trains (empty for ``all``: everything)."""
    if mode == "all":
        return []
    router = getattr(model, "etd_router", None)
    if mode == "routers":
        return [router.routers] if router is not None and router.routers is not None else []
    if router is None or not router.n_branches:
        return []
    return [router.lora_a, router.lora_b, router.branch_router]


def freeze(model: nn.Module, mode: str) -> tuple[int, int]:
    """``requires_grad`` on the parameters ``mode`` trains only; (trainable, frozen) counts."""
    if mode == "all":
        return sum(p.numel() for p in model.parameters()), 0
    keep = {id(p) for m in trainable_modules(model, mode) for p in m.parameters()}
    if not keep:
        raise ValueError(f"--train-only {mode}: the model has nothing to train in this mode")
    trainable = frozen = 0
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
        if id(p) in keep:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


# --------------------------------------------------------------------------- scoring


def default_iterations(model: nn.Module) -> int:
    """The think iterations a forward without ``think_iterations`` runs (training's)."""
    etd, router = model.config.etd, model.etd_router
    return etd.cap if router.halt is not None else etd.iterations


def used_slots(model: nn.Module, think_iterations: int) -> list[int]:
    """The slots a forward with ``think_iterations`` runs, in order."""
    return [i for i, s in enumerate(model.structure.slots) if s.stage != "think" or s.iteration < think_iterations]


def row_scores(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: (mean next-token cross entropy over the scored positions, correct, scored);
    ``HybridLM.lm_loss`` and ``masked_correct`` per row (rows with nothing scored: loss 0)."""
    tgt = labels[:, 1:]
    scored = tgt != -100
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tgt, ignore_index=-100, reduction="none")
    count = scored.sum(1)
    loss = ce.sum(1) / count.clamp_min(1)
    correct = ((logits[:, :-1].argmax(-1) == tgt) & scored).sum(1)
    return loss, correct, count


def search_budget(n_slots: int, beam: int) -> int:
    """Routes scored per row (batch-sized forwards) by ``search_routes``: 1 + sum 2 min(K, 3^t)."""
    total, entries = 1, 1
    for _ in range(n_slots):
        total += 2 * entries
        entries = min(beam, 3 * entries)
    return total


@dataclass
class RouteSearch:
    """The searched route of each row and how it compares with all-execute."""

    routes: Tensor  # [B, slots] long: the best acceptable route (unused slots: execute)
    loss: Tensor  # [B] its task loss
    correct: Tensor  # [B] its correct scored predictions
    count: Tensor  # [B] scored positions
    applications: Tensor  # [B] its layer applications
    base_loss: Tensor  # [B] all-execute's loss
    base_correct: Tensor  # [B]
    base_applications: Tensor  # [B]
    used: list[int]  # the slots searched (those that run)
    forwards: int  # model calls
    evaluations: int  # routes scored per row = batch-sized forwards

    @property
    def accuracy(self) -> float:
        return float(self.correct.sum()) / max(int(self.count.sum()), 1)

    @property
    def base_accuracy(self) -> float:
        return float(self.base_correct.sum()) / max(int(self.count.sum()), 1)


@torch.no_grad()
def search_routes(model: nn.Module, input_ids: Tensor, labels: Tensor, *, beam: int = 4,
                  length_penalty: float = 0.1, tolerance: float = 0.02, think_iterations: int | None = None,
                  max_rows: int | None = None, forward=None) -> RouteSearch:  # noqa: ANN001
    """Length-aware beam search for the route of every row of a batch (module docstring).

    ``model`` is an ETD ``HybridLM`` with layer routers, used as it is (call it in eval mode:
    the search compares deterministic forwards); ``forward`` replaces ``model.__call__``
    (a compiled or sharded wrapper). ``max_rows`` caps the rows of one model call."""
    if beam < 1:
        raise ValueError(f"beam must be >= 1, got {beam}")
    if length_penalty < 0 or tolerance < 0:
        raise ValueError("length_penalty and tolerance must be >= 0")
    structure = model.structure
    fwd = forward if forward is not None else model
    n_iter = think_iterations if think_iterations is not None else default_iterations(model)
    B, dev = input_ids.shape[0], input_ids.device
    n_slots = len(structure.slots)
    used = used_slots(model, n_iter)
    calls = 0

    def score(routes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """routes [N, B, slots] -> (loss, correct, applications) [N, B], reached [N, B, slots]."""
        nonlocal calls
        N = routes.shape[0]
        flat = routes.reshape(N * B, n_slots)
        step = max_rows if max_rows is not None else N * B
        step = max(B, step - step % B)  # whole copies of the batch per call
        losses, corrects, reached = [], [], []
        for lo in range(0, N * B, step):
            r = flat[lo:lo + step]
            reps = r.shape[0] // B
            out = fwd(input_ids.repeat(reps, 1), routes=r, think_iterations=n_iter, check_inputs=False)
            calls += 1
            loss, correct, _ = row_scores(out.logits, labels.repeat(reps, 1))
            losses.append(loss)
            corrects.append(correct)
            reached.append(out.stats["etd/route_reached"])
        # the slots each row reached (ACT halting: not the think iterations after its tokens halted)
        hit = torch.cat(reached).to(dev)
        apps = structure.applications(flat, n_iter, hit).view(N, B)
        return torch.cat(losses).view(N, B), torch.cat(corrects).view(N, B), apps, hit.view(N, B, n_slots)

    base_routes = torch.full((1, B, n_slots), EXECUTE, dtype=torch.long, device=dev)
    base_loss, base_correct, base_apps, _ = score(base_routes)
    count = (labels[:, 1:] != -100).sum(1)
    total = max(len(used), 1)
    # acceptable: within tolerance of all-execute (plus float noise of a different batch composition)
    limit = base_loss[0] + tolerance + 1e-6 * base_loss[0].abs().clamp_min(1.0)

    def key(loss: Tensor, apps: Tensor, copy: Tensor) -> tuple[Tensor, Tensor]:
        s = loss + length_penalty * apps.to(loss.dtype) / total
        ok = loss <= limit
        # acceptable candidates rank first, copies of another entry last
        return s, torch.where(copy, float("inf"), torch.where(ok, s, s + 1e6))

    beam_routes, beam_loss, beam_correct, beam_apps = base_routes, base_loss, base_correct, base_apps
    beam_copy = torch.zeros_like(base_loss, dtype=torch.bool)  # [K', B] an entry that is a copy of another
    best_routes = base_routes[0].clone()
    best_loss, best_correct, best_apps = base_loss[0].clone(), base_correct[0].clone(), base_apps[0].clone()
    best_score = key(best_loss, best_apps, beam_copy[0])[0]
    rows = torch.arange(B, device=dev)
    for slot in used:
        alts = []
        for choice in (SKIP, REPEAT):
            r = beam_routes.clone()
            r[:, :, slot] = choice
            alts.append(r)
        new_routes = torch.cat(alts)  # [2K, B, slots]
        new_loss, new_correct, new_apps, new_reached = score(new_routes)
        # a slot none of the row's tokens reached (ACT halted them before this think iteration): its skip
        # and repeat are the entry itself (same loss and applications), not new routes; kept, such copies
        # filled the beam with one entry and pushed the others out
        new_copy = beam_copy.repeat(2, 1) | ~new_reached[..., slot]
        # the best acceptable route so far, per row
        s, _ = key(new_loss, new_apps, new_copy)
        ok = (new_loss <= limit) & ~new_copy
        cand = torch.where(ok, s, torch.full_like(s, float("inf")))
        top = cand.argmin(0)  # [B]
        better = cand[top, rows] < best_score
        best_score = torch.where(better, cand[top, rows], best_score)
        best_routes = torch.where(better[:, None], new_routes[top, rows], best_routes)
        best_loss = torch.where(better, new_loss[top, rows], best_loss)
        best_correct = torch.where(better, new_correct[top, rows], best_correct)
        best_apps = torch.where(better, new_apps[top, rows], best_apps)
        # the next beam: the entries themselves (execute at this slot) and their alternatives
        all_routes = torch.cat([beam_routes, new_routes])
        all_loss = torch.cat([beam_loss, new_loss])
        all_correct = torch.cat([beam_correct, new_correct])
        all_apps = torch.cat([beam_apps, new_apps])
        all_copy = torch.cat([beam_copy, new_copy])
        order = torch.sort(key(all_loss, all_apps, all_copy)[1], dim=0, stable=True).indices[:beam]  # [K', B]
        beam_routes = all_routes[order, rows[None]]
        beam_loss, beam_correct, beam_apps, beam_copy = (t[order, rows[None]] for t in
                                                         (all_loss, all_correct, all_apps, all_copy))
    return RouteSearch(routes=best_routes, loss=best_loss, correct=best_correct, count=count, applications=best_apps,
                       base_loss=base_loss[0], base_correct=base_correct[0], base_applications=base_apps[0],
                       used=used, forwards=calls, evaluations=search_budget(len(used), beam))


def route_targets_loss(stats: dict, routes: Tensor, gamma: float, balance: bool = True,
                       rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(focal loss of the router logits of a teacher-forced forward against ``routes``, the
    router accuracy), over the slots each row's tokens reached (``etd/route_reached``: with ACT
    halting a row may stop before a think iteration that another row runs; its router saw no
    token there) and the ``rows`` [B] bool given (the search's rows with a scored position: a row
    without one accepts every route, so its all-skip label says nothing), with Dr.LLM's class
    weights from the targets (``balance``; else every target weighs the same). No row: a zero
    loss (on the graph) and accuracy 0."""
    from ..components.etd_router import class_weights, focal_loss

    logits = stats["etd/route_logits"]
    reached = stats.get("etd/route_reached")
    if reached is None:  # (statistics without it: every row reached the slots that ran)
        reached = stats["etd/route_slots"][None].expand(logits.shape[0], -1)
    reached = reached.to(routes.device)
    if rows is not None:
        if not bool(rows.any()):
            return logits.sum() * 0.0, logits.new_zeros(())
        logits, routes, reached = logits[rows], routes[rows], reached[rows]
    lg = logits[reached]
    tgt = routes[reached]
    loss = focal_loss(lg, tgt, gamma, class_weights(tgt, logits.shape[-1]) if balance else None)
    acc = (lg.detach().argmax(-1) == tgt).float().mean()
    return loss, acc


__all__ = ["TRAIN_ONLY", "RouteSearch", "default_iterations", "freeze", "route_targets_loss", "row_scores",
           "search_budget", "search_routes", "train_only_problem", "trainable_modules", "used_slots"]


#: the route search's settings a run keeps (``hymba train --route-beam`` ...) and their defaults:
#: ``search_routes``' own
SEARCH_DEFAULTS = {k: p.default for k, p in inspect.signature(search_routes).parameters.items()
                   if k in ("beam", "length_penalty", "tolerance", "max_rows")}
