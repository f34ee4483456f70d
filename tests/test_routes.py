"""Dr.LLM route targets (training/routes.py) and ``hymba train --train-only``: the beam search
never accepts a route worse than all-execute beyond its tolerance and prefers fewer layer
applications at equal loss; router training changes the routers alone and resumes exactly;
branch training changes the MoDr branches alone; models without those parts are one-line
errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from hymba_plus import build_model, from_pretrained
from hymba_plus.cli import main
from hymba_plus.components.etd_router import EXECUTE, REPEAT, SKIP
from hymba_plus.training import routes as routes_mod
from hymba_plus.training.routes import route_targets_loss, row_scores, search_budget, search_routes
from hymba_plus.training.tasks import mqar_batch

ETD = {
    "name": "routes-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA | GA",
              "etd": {"encoder_layers": 1, "think_layers": 1, "decoder_layers": 1, "iterations": 2}},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64},
                   "etd_router": {"layer_router": {"enabled": True, "hidden": 8, "windows": 2}}},
}
FAST = ["--batch-size", "4", "--seq-len", "16", "--warmup", "1", "--no-progress", "--eval-batches", "1", "--keep-last", "9"]


def with_router(**etd_router) -> dict:
    return {**ETD, "components": {**ETD["components"], "etd_router": etd_router}}


def write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return str(p)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- the search


def identity_model(block: int = 1):
    """A model whose other layers matter (large embeddings) and whose block ``block`` is an
    exact identity (its residual output projections are zero): skipping it costs nothing."""
    torch.manual_seed(0)
    model = build_model(ETD).eval()
    with torch.no_grad():
        model.embed.weight.mul_(20.0)
        for mod in model.blocks[block].modules():
            if getattr(mod, "is_residual_out", False):
                mod.weight.zero_()
    return model


def test_search_prefers_fewer_applications_at_equal_loss_and_never_loses_to_all_execute():
    model = identity_model(block=1)
    ids, labels = mqar_batch(6, 16, 32, 4, generator=torch.Generator().manual_seed(1))
    tol = 1e-4
    res = search_routes(model, ids, labels, beam=3, length_penalty=0.1, tolerance=tol)
    slots = model.structure.slots
    assert res.used == list(range(len(slots)))  # enc, think@it0, think@it1, dec
    # never worse than all-execute beyond the tolerance, and the reported loss is the route's own
    assert bool((res.loss <= res.base_loss + tol + 1e-5).all())
    with torch.no_grad():
        again, correct, count = row_scores(model(ids, routes=res.routes).logits, labels)
    assert torch.allclose(again, res.loss, atol=1e-5) and torch.equal(count, res.count)
    # the identity block is skipped in every iteration of every row; nothing costs more compute
    think = [i for i, s in enumerate(slots) if s.block == 1]
    assert bool((res.routes[:, think] == SKIP).all()), res.routes
    assert bool((res.applications <= res.base_applications - len(think)).all())
    assert bool((res.base_applications == len(slots)).all())
    # budget: 1 + sum_t 2 min(K, 3^t) routes per row, in 1 + slots model calls
    assert res.evaluations == search_budget(4, 3) == 1 + 2 * (1 + 3 + 3 + 3)
    assert res.forwards == 1 + 4


def test_tolerance_bounds_the_trade_and_the_penalty_buys_compute():
    model = identity_model(block=1)
    ids, labels = mqar_batch(4, 16, 32, 4, generator=torch.Generator().manual_seed(2))
    strict = search_routes(model, ids, labels, beam=2, length_penalty=0.1, tolerance=0.0)
    assert bool((strict.loss <= strict.base_loss + 1e-5).all())
    # any loss is tolerated and compute is expensive: every layer is skipped
    cheap = search_routes(model, ids, labels, beam=2, length_penalty=1e3, tolerance=1e3)
    assert bool((cheap.applications == 0).all()) and bool((cheap.routes == SKIP).all())
    # max_rows splits the candidates over more calls with the same answer
    split = search_routes(model, ids, labels, beam=2, length_penalty=0.1, tolerance=0.0, max_rows=4)
    assert torch.equal(split.routes, strict.routes) and split.forwards > strict.forwards


def test_a_beam_as_wide_as_the_routes_is_an_exhaustive_search():
    """With beam >= 3^(slots - 1) no candidate is ever dropped: the search's answer is the best
    acceptable route of all 3^slots. Scored by a forward given to the search whose loss is a random
    table of (row, route), so the answers differ by row and by setting."""
    import itertools

    model = build_model(ETD).eval()  # its structure: 4 slots (encoder, think x 2, decoder)
    every = torch.tensor(list(itertools.product((SKIP, EXECUTE, REPEAT), repeat=4)))  # [81, slots], base 3
    B = 6
    table = 1.0 + 0.2 * torch.rand(B, 81, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def loss_of(rows: torch.Tensor, routes: torch.Tensor) -> torch.Tensor:
        return table[rows, (routes * torch.tensor([27, 9, 3, 1])).sum(1)]

    def forward(ids, routes, think_iterations, check_inputs):  # noqa: ANN001, ANN202
        logits = torch.zeros(routes.shape[0], 2, 2, dtype=torch.float64)
        logits[:, 0, 1] = torch.log(torch.expm1(loss_of(ids[:, 0], routes)))  # cross entropy of target 0
        return SimpleNamespace(logits=logits, stats={"etd/route_reached": torch.ones_like(routes, dtype=torch.bool)})

    ids = torch.arange(B)[:, None].repeat(1, 2)  # a row's id names its row of the table
    labels = torch.tensor([[-100, 0]]).repeat(B, 1)
    answers = set()
    for tol, penalty in ((0.0, 0.1), (0.05, 0.1), (0.1, 0.5)):
        res = search_routes(model, ids, labels, beam=27, length_penalty=penalty, tolerance=tol, forward=forward)
        for b in range(B):
            loss = table[b]
            ok = loss <= table[b, 27 + 9 + 3 + 1] + tol + 1e-6  # within tol of all-execute
            score = torch.where(ok, loss + penalty * every.sum(1) / 4, torch.inf)
            assert res.routes[b].tolist() == every[score.argmin()].tolist(), (tol, penalty, b)
            answers.add(tuple(res.routes[b].tolist()))
    assert len(answers) > 3


def test_unused_think_iterations_stay_execute():
    d = {**ETD, "model": {**ETD["model"], "etd": {**ETD["model"]["etd"], "max_iterations": 3}}}
    torch.manual_seed(0)
    model = build_model(d).eval()
    ids, labels = mqar_batch(2, 16, 32, 4, generator=torch.Generator().manual_seed(3))
    res = search_routes(model, ids, labels, beam=2, length_penalty=10.0, tolerance=10.0)
    unused = [i for i in range(len(model.structure.slots)) if i not in res.used]
    assert len(unused) == 1 and bool((res.routes[:, unused] == EXECUTE).all())


def test_search_and_targets_leave_out_think_iterations_act_never_reaches():
    """ACT halting after the first think iteration: the later iterations' slots are reached by
    no token, so skipping them saves nothing (the search keeps them execute, and all-execute
    counts only the slots run) and the router loss scores no target there."""
    d = with_router(layer_router={"enabled": True, "hidden": 8, "windows": 2},
                    halting={"kind": "act", "init_bias": 20.0, "threshold": 0.5})
    d = {**d, "model": {**d["model"], "etd": {**d["model"]["etd"], "max_iterations": 3}}}
    torch.manual_seed(0)
    model = build_model(d).eval()
    slots = model.structure.slots
    late = [i for i, s in enumerate(slots) if s.stage == "think" and s.iteration > 0]
    ids, labels = mqar_batch(3, 16, 32, 4, generator=torch.Generator().manual_seed(4))
    res = search_routes(model, ids, labels, beam=2, length_penalty=1.0, tolerance=10.0)
    assert bool((res.base_applications == 3).all())  # encoder, think@it0, decoder
    assert bool((res.routes[:, late] == EXECUTE).all()), res.routes
    with torch.no_grad():
        out = model(ids, routes=res.routes)
    loss, _ = route_targets_loss(out.stats, res.routes, 0.0, balance=False)
    early = [i for i in range(len(slots)) if i not in late]
    lg, tgt = out.stats["etd/route_logits"][:, early].reshape(-1, 3), res.routes[:, early].reshape(-1)
    assert float(loss) == pytest.approx(float(torch.nn.functional.cross_entropy(lg, tgt)), rel=1e-6)


def test_beam_keeps_distinct_routes_across_a_slot_no_token_reached():
    """A slot none of a row's tokens reached (ACT halted them all before a later think iteration):
    its skip and repeat copies of a beam entry are that entry (same loss, same applications), not
    new routes. They filled the beam with copies of its best entry and pushed out the others, so a
    route that only the second entry leads to was never found. Scored here by a forward given to the
    search whose loss is a table of the route: the best route (execute, skip, -, skip) is reached
    only through the beam's second entry (execute, skip) at think iteration 1, which no token reaches."""
    d = with_router(layer_router={"enabled": True, "hidden": 8, "windows": 2}, halting={"kind": "act"})
    d = {**d, "model": {**d["model"], "etd": {**d["model"]["etd"], "iterations": 1, "max_iterations": 2}}}
    model = build_model(d).eval()
    slots = model.structure.slots
    assert [(s.stage, s.iteration) for s in slots] == [("encoder", 0), ("think", 0), ("think", 1), ("decoder", 0)]
    reached = torch.tensor([True, True, False, True])  # think@it1: every token halted after it0

    def loss_of(r: list[int]) -> float:
        if r[0] == SKIP and SKIP in (r[1], r[3]):
            return 5.0  # unacceptable
        return 1.005 if r[1] == SKIP else 1.0

    def forward(ids, routes, think_iterations, check_inputs):  # noqa: ANN001, ANN202
        loss = torch.tensor([loss_of(r) for r in routes.tolist()], dtype=torch.float64)
        logits = torch.zeros(routes.shape[0], 2, 2, dtype=torch.float64)
        logits[:, 0, 1] = torch.log(torch.expm1(loss))  # cross entropy of target 0: log(1 + e^z) = loss
        return SimpleNamespace(logits=logits, stats={"etd/route_reached": reached.expand(routes.shape[0], -1)})

    ids = torch.zeros(1, 2, dtype=torch.long)
    labels = torch.tensor([[-100, 0]])
    res = search_routes(model, ids, labels, beam=2, length_penalty=0.1, tolerance=0.01, forward=forward)
    # all-execute 1.0 + 0.1 * 3/4; (skip, execute, -, execute) 1.0 + 0.1 * 2/4 leads the beam, (execute, skip,
    # -, execute) 1.005 + 0.1 * 2/4 is second; only the second may also skip the decoder: 1.005 + 0.1 * 1/4
    assert res.routes[0, [0, 1, 3]].tolist() == [EXECUTE, SKIP, SKIP], res.routes
    assert int(res.applications[0]) == 1 and float(res.loss[0]) == pytest.approx(1.005)
    assert res.routes[0, 2] == EXECUTE  # the slot no token reached keeps execute


def test_route_loss_class_balance_weighs_each_class_equally_or_not_at_all():
    """``layer_router.class_balance``: with it the router loss is the mean over the target classes
    of each class's mean loss (Dr.LLM's effective-number weights, at a batch's counts within 0.5% of
    inverse frequency), without it the plain mean over the slots that ran (here gamma 0: cross
    entropy). Unbalanced targets: 9 execute, 2 skip, 1 repeat."""
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 3)
    ran = torch.tensor([True, True, False, True, True])  # slot 2 did not run: not scored
    routes = torch.full((3, 5), EXECUTE)
    routes[0, 0] = routes[1, 3] = SKIP
    routes[2, 4] = REPEAT
    routes[:, 2] = SKIP  # would change both losses if the slot that did not run were scored
    stats = {"etd/route_logits": logits, "etd/route_slots": ran}
    lg, tgt = logits[:, ran].reshape(-1, 3), routes[:, ran].reshape(-1)
    ce = torch.nn.functional.cross_entropy(lg, tgt, reduction="none")
    plain, _ = route_targets_loss(stats, routes, 0.0, balance=False)
    balanced, acc = route_targets_loss(stats, routes, 0.0, balance=True)
    assert float(plain) == pytest.approx(float(ce.mean()), rel=1e-6)
    per_class = [float(ce[tgt == c].mean()) for c in (SKIP, EXECUTE, REPEAT)]
    assert float(balanced) == pytest.approx(sum(per_class) / 3, rel=5e-3)
    assert abs(float(balanced) - float(plain)) > 0.05
    assert float(acc) == pytest.approx(float((lg.argmax(-1) == tgt).float().mean()))
    # balanced targets (4 of each class among the 12 scored): both are the plain mean
    even = routes.clone()
    even[:, ran] = torch.arange(12).remainder(3).view(3, 4)
    assert float(route_targets_loss(stats, even, 0.0, balance=True)[0]) == pytest.approx(
        float(route_targets_loss(stats, even, 0.0, balance=False)[0]), rel=1e-6)
    # rows without a scored position (the search labels them all-skip: any route is acceptable) are left out
    keep = torch.tensor([True, False, True])
    got, _ = route_targets_loss(stats, routes, 0.0, balance=False, rows=keep)
    sub = torch.nn.functional.cross_entropy(logits[keep][:, ran].reshape(-1, 3), routes[keep][:, ran].reshape(-1))
    assert float(got) == pytest.approx(float(sub), rel=1e-6)
    none, acc = route_targets_loss(stats, routes, 0.0, rows=torch.zeros(3, dtype=torch.bool))
    assert float(none) == 0.0 and float(acc) == 0.0


@pytest.mark.parametrize("class_balance", [None, True, False])
def test_router_training_uses_the_recipe_class_balance(tmp_path, monkeypatch, class_balance):
    """``hymba train --train-only routers`` trains the loss of the recipe's setting (default: on):
    the loss it logs is ``route_targets_loss`` with that ``balance``."""
    lr = {**ETD["components"]["etd_router"]["layer_router"]}
    if class_balance is not None:
        lr["class_balance"] = class_balance
    recipe = write(tmp_path, with_router(layer_router=lr))
    calls = []
    real = routes_mod.route_targets_loss

    def spy(stats, routes, gamma, balance=True, rows=None):  # noqa: ANN001, ANN202
        loss, acc = real(stats, routes, gamma, balance, rows)
        calls.append((balance, float(loss.detach())))
        return loss, acc

    monkeypatch.setattr(routes_mod, "route_targets_loss", spy)
    out = tmp_path / "r"
    assert main(["train", recipe, "--out", str(out), "--steps", "3", "--train-only", "routers", *FAST]) == 0
    assert len(calls) == 3 and all(b is (class_balance is not False) for b, _ in calls)
    assert [x["route_loss"] for x in rows(out)] == pytest.approx([loss for _, loss in calls], rel=1e-6)


# --------------------------------------------------------------------------- --train-only


def _changed(a: dict, b: dict) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_train_only_routers_changes_only_the_routers_and_resumes_exactly(tmp_path):
    recipe = write(tmp_path, ETD)
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", recipe, "--out", str(a), "--steps", "4", "--eval-every", "4", *FAST]) == 0
    shutil.copytree(a, b)
    phase2 = ["--steps", "8", "--eval-every", "4", "--save-every", "2", *FAST]
    search = ["--route-beam", "2", "--route-tolerance", "0.05"]  # not the defaults: kept by a plain --resume below
    assert main(["train", recipe, "--out", str(a), "--resume", "--train-only", "routers", *search, *phase2]) == 0
    base, routed = from_pretrained(a / "step-4").state_dict(), from_pretrained(a / "step-8").state_dict()
    changed = _changed(base, routed)
    assert changed and all(k.startswith("etd_router.routers.") or k == "etd_router.routes_on" for k in changed), changed
    assert bool(routed["etd_router.routes_on"]) and not bool(base["etd_router.routes_on"])
    r = rows(a)
    assert [x["step"] for x in r] == list(range(1, 9))
    for x in r[4:]:
        assert {"route_loss", "route_acc", "applications", "applications_all_execute", "lm_loss",
                "lm_loss_all_execute", "accuracy", "accuracy_all_execute", "search_forwards"} <= set(x)
        assert x["loss"] == x["route_loss"] and 0.0 <= x["route_acc"] <= 1.0
        assert x["applications"] <= x["applications_all_execute"] == 4
        assert x["lm_loss"] <= x["lm_loss_all_execute"] + 0.05 + 1e-6  # --route-tolerance
    assert {"eval_accuracy", "eval_accuracy_all_execute", "eval_applications",
            "eval_applications_all_execute"} <= set(r[-1])
    # stopped at 6 and resumed (the mode and the route search's settings are kept by a plain --resume): the
    # same steps, bit for bit
    assert main(["train", recipe, "--out", str(b), "--resume", "--train-only", "routers", "--stop-after", "6",
                 *search, *phase2]) == 0
    assert main(["train", recipe, "--out", str(b), "--resume", *phase2]) == 0
    ra, rb = rows(a), rows(b)
    keys = ("loss", "route_acc", "applications", "lm_loss", "grad_norm", "lr")
    assert [[x.get(k) for k in keys] for x in ra] == [[x.get(k) for k in keys] for x in rb]
    assert not _changed(routed, from_pretrained(b / "step-8").state_dict())
    # back to full training: a new phase at full depth (the routers stay on for evals and inference)
    assert main(["train", recipe, "--out", str(b), "--resume", "--train-only", "all", "--steps", "9", *FAST]) == 0
    last = rows(b)[-1]
    assert last["step"] == 9 and "route_loss" not in last and last["eval_applications_all_execute"] == 4
    full = from_pretrained(b / "step-9").state_dict()
    assert bool(full["etd_router.routes_on"]) and any(k.startswith("blocks.") for k in _changed(routed, full))


def test_train_only_branches_changes_only_the_branches(tmp_path):
    d = with_router(branches={"n_branches": 2, "rank": 2})
    recipe = write(tmp_path, d)
    out = tmp_path / "br"
    assert main(["train", recipe, "--out", str(out), "--steps", "2", *FAST]) == 0
    assert main(["train", recipe, "--out", str(out), "--resume", "--train-only", "branches", "--steps", "5",
                 *FAST]) == 0
    before, after = from_pretrained(out / "step-2").state_dict(), from_pretrained(out / "step-5").state_dict()
    changed = _changed(before, after)
    branch = ("etd_router.lora_a.", "etd_router.lora_b.", "etd_router.branch_router.", "etd_router.bias")
    assert any(k.startswith("etd_router.lora_b.") for k in changed)
    assert all(k.startswith(branch) for k in changed), changed


@pytest.mark.parametrize("recipe, mode, needle", [
    ({"name": "plain", "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA"},
      "components": {"gated_attn": {"n_heads": 2}}}, "routers", "no etd_router"),
    (with_router(), "routers", "no Dr.LLM layer routers"),
    (ETD, "branches", "no MoDr branches"),
])
def test_train_only_without_the_parts_is_a_one_line_error(tmp_path, capsys, recipe, mode, needle):
    out = tmp_path / "o"
    rc = main(["train", write(tmp_path, recipe), "--out", str(out), "--steps", "2", "--train-only", mode, *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("hymba train: --train-only") and needle in err[0], err
    assert not out.exists()


def test_cuda_graph_with_router_training_is_a_usage_error(tmp_path, capsys):
    """Flags that do not go together (the trainer finds them once it has the model): exit 2, as the CLI's own
    checks (they were exit 1), nothing written."""
    recipe = write(tmp_path, with_router(layer_router={**ETD["components"]["etd_router"]["layer_router"]}))
    out = tmp_path / "o"
    rc = main(["train", recipe, "--out", str(out), "--steps", "2", "--train-only", "routers", "--cuda-graph",
               "--device", "cpu", *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("hymba train: --cuda-graph: not with --train-only routers"), err
    assert not out.exists()


def test_trainer_api_rejects_a_mode_the_model_cannot_train(tmp_path):
    from hymba_plus.core.recipe import load_recipe
    from hymba_plus.training.config import TrainConfig
    from hymba_plus.training.trainer import RunOptions, Trainer, TrainError

    tr = Trainer(load_recipe(with_router()), TrainConfig(steps=2, batch_size=2, seq_len=16),
                 RunOptions(out=tmp_path / "api", progress=False, train_only="routers"))
    with pytest.raises(TrainError, match="no Dr.LLM layer routers"):
        tr.setup()
    assert not (tmp_path / "api").exists()
