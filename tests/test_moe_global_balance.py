"""MoE ``balance_loss: global_batch`` (Qiu et al. 2025, arXiv 2501.11873): f over the optimizer
step's micro-batches so far and every data-parallel process, P the micro-batch's. One micro-batch
on one process is ``per_layer`` bit for bit; later micro-batches and other processes see the union
of the counts; the trainer zeroes the counts after each step; CUDA-graph steps, ETD / Dr.LLM
repeats, activation checkpointing and resuming keep working."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import yaml

from hymba_plus import RecipeError, build_model, load_recipe
from hymba_plus.cli import main
from hymba_plus.components.etd_router import EXECUTE, REPEAT
from hymba_plus.components.moe import MoE, MoEConfig, reset_step_loads
from hymba_plus.core.cache import StepContext
from hymba_plus.training import cuda_graph as cg
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.data import Batch
from hymba_plus.training.trainer import RunOptions, Trainer
from tests.helpers import CudaLooking

E, K, COEF = 4, 2, 0.1
B, T, V = 2, 12, 32


def _recipe(balance: str, pattern: str = "GA | GA+moe | GA+moe", etd: dict | None = None, **model) -> dict:
    m = {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": pattern, "meta_tokens": 2, **model}
    comps = {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64},
             "moe": {"n_experts": E, "top_k": K, "d_expert": 16, "aux_loss_coef": COEF, "z_loss_coef": 0.0,
                     "balance_loss": balance}}
    if etd is not None:
        m["etd"] = etd
        comps["etd_router"] = {"layer_router": {"enabled": True, "hidden": 8}}
    return {"name": f"moe-{balance}", "model": m, "components": comps}


ETD = {"encoder_layers": 1, "think_layers": 1, "decoder_layers": 1, "iterations": 2}
ETD_PATTERN = "GA | (GA+moe) | GA+moe"


def _module(seed: int = 0, **cfg) -> MoE:
    torch.manual_seed(seed)
    m = MoE(MoEConfig(n_experts=E, top_k=K, aux_loss_coef=COEF, z_loss_coef=0.0, **cfg), d_model=16).double()
    with torch.no_grad():  # a router with some spread
        m.router.weight.normal_(0.0, 0.5)
    return m.train()


def _ctx(lengths: torch.Tensor | None = None) -> StepContext:
    return StepContext(positions=torch.arange(T).expand(B, T), lengths=lengths)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------- one micro-batch, one process


@pytest.mark.parametrize("case", ["plain", "etd repeats", "dr.llm repeat", "checkpointed etd"])
def test_one_micro_batch_on_one_process_is_per_layer_bit_for_bit(case):
    """grad_accum 1, one process: the step's counts are the micro-batch's, so the loss, the
    statistics and every gradient are ``per_layer``'s exactly -- also where a layer runs twice in
    one call (an ETD think iteration, a Dr.LLM repeat of some rows: each application has its own
    row of counts) and where its block is recomputed in the backward."""
    pattern, etd = (ETD_PATTERN, ETD) if case != "plain" else ("GA | GA+moe | GA+moe", None)
    torch.manual_seed(0)
    per = build_model(load_recipe(_recipe("per_layer", pattern, etd))).train()
    glob = build_model(load_recipe(_recipe("global_batch", pattern, etd))).train()
    glob.load_state_dict(per.state_dict())
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
    kw = {}
    if case == "dr.llm repeat":  # row 1 repeats the last MoE layer (an application with inert rows)
        routes = torch.full((B, len(per.structure.slots)), EXECUTE)
        routes[1, -1] = REPEAT
        kw["routes"] = routes
    if case == "checkpointed etd":
        for m in (per, glob):
            m.set_activation_checkpointing(1)
    outs = []
    for m in (per, glob):
        for _ in range(2):  # two steps: the second finds the rows of counts the first made
            m.zero_grad(set_to_none=True)
            reset_step_loads(m)
            out = m(ids, labels=ids, **kw)
            out.loss.backward()
        outs.append(out)
    assert outs[1].aux_loss is not None and torch.equal(outs[0].aux_loss, outs[1].aux_loss)
    assert torch.equal(outs[0].loss, outs[1].loss)
    for k, v in outs[0].stats.items():
        assert torch.equal(v, outs[1].stats[k]), k
    gp, gg = _grads(per), _grads(glob)
    assert gp.keys() == gg.keys() and all(torch.equal(gp[k], gg[k]) for k in gp)
    rows = [m.step_load.shape[0] for m in glob.modules() if isinstance(m, MoE)]  # a row per application
    assert rows == {"plain": [1, 1], "dr.llm repeat": [2, 2]}.get(case, [2, 1])  # think block, decoder


def test_checkpointed_block_recomputes_with_the_counts_its_first_run_saw():
    """Two calls of the model before one backward (LaDiR's losses: the encoder pass, then the
    decoder's): the second call adds its counts to the same rows, so a checkpointed block of the
    first call, recomputed in the backward, found the rows as the second call left them and its
    gradient took another f than its loss -> the gradients equal those without checkpointing."""
    torch.manual_seed(0)
    ref = build_model(load_recipe(_recipe("global_batch"))).train()
    ck = build_model(load_recipe(_recipe("global_batch"))).train()
    ck.load_state_dict(ref.state_dict())
    ck.set_activation_checkpointing(1)
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randint(0, V, (B, T), generator=g) for _ in range(2))
    for m in (ref, ck):
        (m(a, labels=a).loss + m(b, labels=b).loss).backward()
    gr, gc = _grads(ref), _grads(ck)
    assert gr.keys() == gc.keys()
    for k in gr:
        torch.testing.assert_close(gc[k], gr[k], rtol=1e-5, atol=1e-7, msg=k)


def test_padding_slots_one_micro_batch_is_per_layer_bit_for_bit():
    """With padding slots (f and P over the real tokens only) the module's loss and router
    gradient equal ``per_layer``'s exactly."""
    x = torch.randn(B, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([T, 7])
    res = []
    for balance in ("per_layer", "global_batch"):
        m = _module(balance_loss=balance)
        ctx = _ctx(lengths)
        m(x, ctx).sum()
        ctx.aux_losses[0].backward()
        res.append((ctx.aux_losses[0].detach(), m.router.weight.grad.clone()))
    assert torch.equal(res[0][0], res[1][0]) and torch.equal(res[0][1], res[1][1])


# --------------------------------------------------------------------------- several micro-batches


def _oracle(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """coef * E * sum_e f_e P_e, by hand: f the given counts normalised, P the mean router
    probability over the micro-batch's real tokens."""
    p = torch.softmax(x.reshape(-1, x.shape[-1]) @ w.t(), dim=-1)[valid.reshape(-1)]
    f = counts.double() / counts.double().sum()
    return COEF * E * (f * p.mean(0)).sum()


def test_second_micro_batch_sees_the_union_of_the_counts_and_a_reset_starts_over():
    """Micro-batch 1: f is its own counts; micro-batch 2 (with padding slots): f is the counts of
    both (real tokens only), P its own -- loss and router gradient against the formula written out.
    After ``reset_step_loads`` (the trainer's end of a step) a micro-batch sees only itself again."""
    m = _module(balance_loss="global_batch")
    g = torch.Generator().manual_seed(3)
    x1, x2 = (torch.randn(B, T, 16, dtype=torch.float64, generator=g) for _ in range(2))
    all_real, lengths2 = torch.ones(B, T, dtype=torch.bool), torch.tensor([9, T])
    valid2 = torch.arange(T)[None] < lengths2[:, None]
    w = m.router.weight
    c1 = c2 = None
    for x, lengths, valid in ((x1, None, all_real), (x2, lengths2, valid2)):
        ctx = _ctx(lengths)
        m(x, ctx)
        c = ctx.stats["moe/0/tokens_per_expert"]
        if c1 is None:
            c1, counts = c, c
        else:
            c2, counts = c, c1 + c
        w.grad = None
        ctx.aux_losses[0].backward()
        want = _oracle(x, w, counts, valid)
        want_grad, = torch.autograd.grad(want, w)
        # (f is float32, the counts' dtype, where there are padding slots: as per_layer's)
        assert float(ctx.aux_losses[0].detach()) == pytest.approx(float(want.detach()), rel=1e-6)
        torch.testing.assert_close(w.grad, want_grad, rtol=1e-6, atol=1e-12)
    assert float(c2.sum()) == (9 + T) * K  # the padding slots are not counted
    assert torch.equal(m.step_load[0], torch.cat([c1 + c2, torch.tensor([float((B * T + 9 + T) * K)])]))
    assert reset_step_loads(m) == 1 and not m.step_load.any()
    ctx = _ctx()
    m(x2, ctx)
    want = _oracle(x2, w, ctx.stats["moe/0/tokens_per_expert"], all_real).detach()
    assert float(ctx.aux_losses[0].detach()) == pytest.approx(float(want), rel=1e-12)


def test_evaluation_and_no_grad_forwards_count_nothing():
    """Only a pass that trains adds counts; an evaluation or no-grad forward takes its own f."""
    m = _module(balance_loss="global_batch")
    x = torch.randn(B, T, 16, dtype=torch.float64)
    with torch.no_grad():
        m(x, _ctx())
    m.eval()
    m(x, _ctx())
    assert not m.step_load.any()


# --------------------------------------------------------------------------- the trainer


def _batch(seed: int) -> Batch:
    ids = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
    return Batch(ids, ids.clone())


def _trainer(out: Path, grad_accum: int, recipe: dict | None = None) -> Trainer:
    tr = Trainer(load_recipe(recipe or _recipe("global_batch")),
                 TrainConfig(steps=4, batch_size=B, seq_len=T, warmup_steps=0, grad_accum=grad_accum),
                 RunOptions(out=out / "run", progress=False, log=lambda s: None, device="cpu"))
    tr.setup()
    return tr


def _feed(tr: Trainer, batches: list[Batch]) -> None:
    """The trainer's micro-batches are ``batches`` in order (by their first sample index), on this rank."""
    W = tr.info.world
    tr.stream.train = lambda idx: batches[(idx.start // B - tr.info.rank) // W]


def _watch_steps(tr: Trainer) -> list[dict]:
    """Per step, before the optimizer step: every MoE layer's counts, the step's summed counts."""
    seen: list[dict] = []
    step = tr._optimizer_step

    def watch(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        stats = args[5] if len(args) > 5 else kw.get("stats")
        seen.append({"step_load": {n: m.step_load.clone() for n, m in tr.model.named_modules() if isinstance(m, MoE)},
                     "counts": {k: v.clone() for k, v in (stats or {}).items() if k.endswith("tokens_per_expert")}})
        return step(*args, **kw)

    tr._optimizer_step = watch
    return seen


def _layer_counts(counts: dict, name: str) -> torch.Tensor:
    idx = int(name.split(".")[1])  # blocks.{i}.ffn: the i-th layer
    return counts[f"moe/{idx}/tokens_per_expert"]


def test_trainer_accumulates_over_the_step_and_resets_after_it(tmp_path):
    """grad_accum 2: before the optimizer step every layer's counts are the two micro-batches'
    together (the step's statistics sum them); after it they are zero, and the next step counts
    only its own micro-batches."""
    tr = _trainer(tmp_path, grad_accum=2)
    seen = _watch_steps(tr)
    _feed(tr, [_batch(s) for s in (10, 11, 12, 13)])
    for step in range(2):
        tr.train_step(step)
        assert all(not m.step_load.any() for m in tr.model.modules() if isinstance(m, MoE))
    assert len(seen) == 2
    for s in seen:
        assert len(s["step_load"]) == 2  # both MoE layers
        for name, load in s["step_load"].items():
            assert load.shape == (1, E + 1)
            assert torch.equal(load[0, :E], _layer_counts(s["counts"], name))
            assert float(load[0, E]) == 2 * (B * (T + 2)) * K  # 2 micro-batches, meta tokens count


def test_captured_step_accumulates_and_the_capture_leaves_no_counts(tmp_path):
    """The CUDA-graph step (on the CPU: the callable a capture is given, run eagerly, after the
    warm-up passes a capture makes): the warm-up's counts are cleared, and a grad_accum 2 step gives
    the eager step's gradients bit for bit."""
    def make(step, args, allow_unused_input=False):  # noqa: ANN001, ANN202, ARG001
        for _ in range(3):  # make_graphed_callables's warm-up: forward and backward
            loss, aux, *_ = step(*args)
            torch.autograd.backward([loss, aux])
        return step

    grads = []
    for graphed in (False, True):
        torch.manual_seed(0)
        tr = _trainer(tmp_path / str(graphed), grad_accum=2)
        batches = [_batch(s) for s in (20, 21)]
        _feed(tr, batches)
        if graphed:
            tr.graphed = _cpu_graphed(tr, batches[0], make)
            assert all(not m.step_load.any() for m in tr.model.modules() if isinstance(m, MoE))
            tr.model.zero_grad(set_to_none=True)
        got = {}

        def capture(step, loss, factor, what, aux=None, stats=None, tr=tr, got=got):  # noqa: ANN001, ANN202, ARG001
            got.update(_grads(tr.model))
            tr.opt.zero_grad(set_to_none=True)
            return {}

        tr._optimizer_step = capture
        tr.train_step(0)
        grads.append(got)
    assert grads[0].keys() == grads[1].keys() and all(torch.equal(grads[0][k], grads[1][k]) for k in grads[0])


def _cpu_graphed(tr: Trainer, batch: Batch, make) -> cg.GraphedStep:  # noqa: ANN001
    import contextlib
    import unittest.mock

    with unittest.mock.patch.object(torch.cuda, "make_graphed_callables", make):
        ids, labels = CudaLooking(batch.input_ids), CudaLooking(batch.labels)
        return cg.GraphedStep(tr.model, ids, labels, contextlib.nullcontext)


class _FakeGraph:
    """Stands in for a captured step: the model's eager forward."""

    def __init__(self, model):  # noqa: ANN001
        self.model = model

    def __call__(self, ids, labels):  # noqa: ANN001, ANN204
        out = self.model(ids, labels=labels)
        return out.loss, out.aux_loss, out.stats


def test_auto_mode_verifies_the_graph_and_leaves_no_counts(tmp_path, monkeypatch):
    """``--mode auto``'s check (an eager forward against a replay on the first batch) agrees with
    global-batch balance on, and its forwards' counts are gone before the first step."""
    tr = _trainer(tmp_path, grad_accum=1)
    monkeypatch.setattr(tr, "_graph_step", lambda: _FakeGraph(tr.model))
    graphed, note = tr._auto_mode()
    assert isinstance(graphed, _FakeGraph), note
    assert all(not m.step_load.any() for m in tr.model.modules() if isinstance(m, MoE))


def test_resume_mid_run_reproduces_the_run(tmp_path):
    """4 steps at grad_accum 2 against 2 steps, a checkpoint, and 2 resumed steps: the same losses
    and weights (the counts are per step, not saved, and zero when a checkpoint is written)."""
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(_recipe("global_batch"), sort_keys=False))
    common = ["--steps", "4", "--save-every", "2", "--eval-every", "4", "--batch-size", "2", "--seq-len", "16",
              "--grad-accum", "2", "--warmup", "1", "--device", "cpu", "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", str(p), "--out", str(a), *common]) == 0
    assert main(["train", str(p), "--out", str(b), "--stop-after", "2", *common]) == 0
    assert main(["train", str(p), "--out", str(b), "--resume", *common]) == 0

    def losses(out: Path) -> list[float]:
        return [json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()]

    assert len(losses(a)) == 4 and losses(a) == losses(b)
    from hymba_plus import from_pretrained

    wa, wb = from_pretrained(a / "step-4").state_dict(), from_pretrained(b / "step-4").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any("step_load" in k for k in wa)


# --------------------------------------------------------------------------- two processes


def _two_rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """Rank ``rank`` of a 2-process gloo run: a MoE module's forward on this rank's tokens (its
    loss, counts and router input saved), then one FSDP2 ``train_step`` of two micro-batches
    (every layer's counts before the optimizer step, and this rank's summed counts, saved)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.manual_seed(0)
    tr = _trainer(Path(out) / f"rank{rank}", grad_accum=2)  # starts the process group
    m = _module(balance_loss="global_batch")  # the same weights on both ranks (seeded)
    x = torch.randn(B, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(100 + rank))
    ctx = _ctx()
    m(x, ctx)
    module = {"aux": ctx.aux_losses[0].detach(), "counts": ctx.stats["moe/0/tokens_per_expert"], "x": x,
              "w": m.router.weight.detach(), "step_load": m.step_load.clone()}
    seen = _watch_steps(tr)
    _feed(tr, [_batch(30 + 2 * mb + rank) for mb in range(2)])
    tr.train_step(0)
    after = [m.step_load.clone() for m in tr.model.modules() if isinstance(m, MoE)]
    torch.save({"module": module, "seen": seen, "after": after}, Path(out) / f"rank{rank}.pt")
    from hymba_plus.training import distributed as dist_mod

    info = tr.info
    del tr
    dist_mod.shutdown(info)


def test_two_processes_each_see_the_global_counts(tmp_path):
    """2 gloo processes: each rank's loss takes f from both ranks' counts (the formula written out
    with the other rank's counts), and under FSDP2 with grad_accum 2 every layer's counts before the
    optimizer step are the four micro-batches' on both ranks, zero after it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    both = got[0]["module"]["counts"] + got[1]["module"]["counts"]
    assert not torch.equal(got[0]["module"]["counts"], got[1]["module"]["counts"])  # the ranks route apart
    for g in got:
        mod = g["module"]
        assert torch.equal(mod["step_load"][0, :E], both)
        want = _oracle(mod["x"], mod["w"], both, torch.ones(B, T, dtype=torch.bool))
        assert float(mod["aux"]) == pytest.approx(float(want), rel=1e-12)
        assert all(not a.any() for a in g["after"])
    s0, s1 = got[0]["seen"][0], got[1]["seen"][0]
    for name in s0["step_load"]:
        union = _layer_counts(s0["counts"], name) + _layer_counts(s1["counts"], name)
        assert torch.equal(s0["step_load"][name], s1["step_load"][name])
        assert torch.equal(s0["step_load"][name][0, :E], union)
        assert float(s0["step_load"][name][0, E]) == 4 * (B * (T + 2)) * K


# --------------------------------------------------------------------------- config


def test_recipe_loader_and_check_accept_it(tmp_path, capsys):
    r = load_recipe(_recipe("global_batch"))
    assert r.component("moe").balance_loss == "global_batch"
    with pytest.raises(RecipeError, match="components.moe.balance_loss: must be one of 'per_layer', 'pooled', "
                                          "'global_batch'"):
        load_recipe(_recipe("global"))
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump(_recipe("global_batch"), sort_keys=False))
    assert main(["check", str(p)]) == 0
    from hymba_plus.cli.info import describe, format_info

    line = [x for x in format_info(describe(r)).splitlines() if x.startswith("conventions")]
    assert line == ["conventions moe balance loss per layer over the global batch, coef 0.1"]
    assert build_model(r).blocks[1].ffn.step_load.shape == (1, E + 1)
