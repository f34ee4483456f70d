"""Activation checkpointing (``core/recompute.py``, ``HybridLM.set_activation_checkpointing``,
``hymba train --activation-checkpoint N``): checkpointed blocks give the same loss, auxiliary
losses, statistics, balancing counts and gradients as the plain forward over every mixer, MoE,
ETD with routes / ACT halting / MoDr branches, cross-layer K/V sharing and dropout, the MTP modules'
and LaDiR's denoiser's blocks too; they run their
forward again in the backward and keep less for it; cached and no-grad calls are untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import build_model, load_recipe
from hymba_plus.cli import main
from tests.helpers import EVERY_COMPONENT, saved_bytes

ROOT = Path(__file__).resolve().parents[1]
V = 32


def recipe(pattern: str, comps: dict | None = None, **model) -> dict:
    m = {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": pattern, "meta_tokens": 2}
    m.update(model)
    return {"name": "ac", "model": m, "components": comps or dict(EVERY_COMPONENT)}


BALANCED_MOE = dict(EVERY_COMPONENT, moe={**EVERY_COMPONENT["moe"], "bias_update_rate": 0.01,
                                           "aux_loss_coef": 0.01, "z_loss_coef": 0.001})
CASES = {
    "every mixer, MoE with balancing, dropout": recipe("GA | GD+moe | M3 | ATL | HY+moe", BALANCED_MOE, dropout=0.1),
    "kv sharing": recipe("GA | GA | GA", {"gated_attn": {"n_heads": 2, "head_dim": 8, "kv_share": True},
                                          "mlp": {"d_hidden": 64}}),
    "etd, ACT halting, MoDr branches": load_recipe(ROOT / "configs" / "etd_modr_tiny.yaml"),
    "etd, Dr.LLM routes": load_recipe(ROOT / "configs" / "etd_drllm_tiny.yaml"),
}


def _step(model, ids, every: int, **kw):  # noqa: ANN001, ANN202
    """(loss, aux loss, statistics, balancing counts, gradients) of one training forward+backward
    with activation checkpointing at ``every`` (same random state every time: dropout)."""
    model.set_activation_checkpointing(every)
    model.zero_grad(set_to_none=True)
    counts = [b for n, b in model.named_buffers() if n.endswith(".load")]
    for b in counts:
        b.zero_()
    torch.manual_seed(7)
    out = model(ids, labels=ids, **kw)
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    stats = {k: v.detach().clone() for k, v in (out.stats or {}).items() if isinstance(v, torch.Tensor)}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return float(out.loss.detach()), out.aux_loss, stats, [b.clone() for b in counts], grads


@pytest.mark.parametrize("case", list(CASES))
def test_checkpointed_blocks_train_exactly_as_the_plain_forward(case):
    torch.manual_seed(0)
    model = build_model(CASES[case]).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    kw = {}
    if "routes" in case:  # a route per row that skips, executes and repeats slots
        n = len(model.structure.slots)
        kw["routes"] = torch.tensor([[(i + r) % 3 for i in range(n)] for r in range(2)])
    plain = _step(model, ids, 0, **kw)
    assert plain[4], "no gradients"
    for every in (1, 2):
        loss, aux, stats, counts, grads = _step(model, ids, every, **kw)
        assert loss == pytest.approx(plain[0], rel=1e-6, abs=1e-7)
        assert (aux is None) == (plain[1] is None) and (aux is None or torch.allclose(aux, plain[1], atol=1e-7))
        assert stats.keys() == plain[2].keys()
        for k in stats:
            assert torch.allclose(stats[k].float(), plain[2][k].float(), atol=1e-6), k
        for a, b in zip(counts, plain[3]):  # counted once, not again by the recomputation
            assert torch.equal(a, b)
        assert grads.keys() == plain[4].keys()
        for n in grads:
            assert torch.allclose(grads[n], plain[4][n], rtol=1e-5, atol=1e-7), (every, n)


def test_atlas_reference_path_and_a_first_probe_inside_a_checkpointed_block(monkeypatch):
    """Code that runs a backward of its own inside a block works under checkpointing: the ATLAS
    reference's per-token gradients (``torch.func``, which refuses to run under saved-tensor hooks)
    and a fast path's probe first run inside a checkpointed block (its backward would have unpacked
    its tensors through the checkpoint); both run with the hooks lifted
    (``dispatch.without_saved_tensor_hooks``)."""
    from hymba_plus.kernels import atlas as atlas_k
    from hymba_plus.kernels import dispatch

    model = build_model(recipe("GA | ATL+mlp")).train()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    monkeypatch.setenv("HYMBA_KERNELS", "reference")
    plain = _step(model, ids, 0)
    ck = _step(model, ids, 1)
    assert ck[0] == pytest.approx(plain[0], rel=1e-6)
    for n in plain[4]:
        assert torch.allclose(ck[4][n], plain[4][n], rtol=1e-5, atol=1e-7), n
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    fp = dispatch._FAST[atlas_k.CPU_FAST]
    monkeypatch.setattr(fp, "status", None)  # its first use: inside the checkpointed ATLAS block
    fast = _step(model, ids, 1)
    assert fp.status is True, fp.error
    assert fast[0] == pytest.approx(plain[0], rel=1e-5)


def test_a_second_backward_through_a_checkpointed_graph():
    """torch enters the recomputation context a checkpoint made once per recomputation: a graph kept
    for two backwards (``retain_graph``) recomputes twice (the context was a one-shot generator)."""
    model = build_model(recipe("GA | GD+moe", BALANCED_MOE)).train()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = []
    for every in (0, 1):
        model.set_activation_checkpointing(every)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward(retain_graph=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    for n in grads[0]:
        assert torch.allclose(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-8), n


def test_a_probe_that_draws_inside_a_checkpointed_block_leaves_the_dropout_masks(monkeypatch):
    """A fast path's probe first run inside a checkpointed block with dropout drew from the global
    generator after the checkpoint kept its state (as the q/k norm's and RoPE's probes do on CUDA):
    the recomputation, which skips the probe, then drew other dropout masks (gradients 1.26 off).
    Checks inside a forward leave the random streams as they were (``dispatch.side_check``)."""
    from hymba_plus.kernels import atlas as atlas_k
    from hymba_plus.kernels import dispatch

    fp = dispatch._FAST[atlas_k.CPU_FAST]
    probe = fp.probe

    def drawing_probe():
        torch.randn(3)
        probe()

    monkeypatch.setattr(fp, "probe", drawing_probe)
    torch.manual_seed(0)
    model = build_model(recipe("ATL+mlp | GA+mlp", dropout=0.1)).train()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    res = []
    for every in (0, 1):
        monkeypatch.setattr(fp, "status", None)  # the process's first use: in this step's first block
        res.append(_step(model, ids, every))
        assert fp.status is True, fp.error
    for n in res[0][4]:
        assert torch.allclose(res[1][4][n], res[0][4][n], rtol=1e-5, atol=1e-7), n


def test_atlas_first_call_check_of_its_chunk_step_inside_a_checkpointed_block(monkeypatch):
    """The CUDA fast path compares its compiled chunk step with the eager one at the first call per
    shape (a forward and a backward of the step inside the block's forward): under the checkpoint's
    hooks that backward recomputed the block mid-forward, the check failed and the compiled step was
    turned off for the process. Simulated on the CPU: the CUDA path taken, torch.compile standing in
    as the eager step."""
    import functools

    from hymba_plus.kernels import atlas as atlas_k
    from hymba_plus.kernels import dispatch

    use_fast = dispatch.use_fast
    monkeypatch.setattr(dispatch, "use_fast", lambda name, *t: name == "atlas" or use_fast(name, *t))
    monkeypatch.setattr(atlas_k, "_compile", functools.cache(lambda fn, inductor: functools.wraps(fn)(
        lambda *a: fn(*a))))
    monkeypatch.setattr(atlas_k, "compile_error", None)
    torch.manual_seed(0)
    model = build_model(recipe("GA | ATL+mlp")).train()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    res = []
    for every in (0, 1):
        atlas_k._STEP_CHECKED.clear()  # its first call: inside the (checkpointed) block
        res.append(_step(model, ids, every))
        assert atlas_k.compile_error is None
    assert res[1][0] == pytest.approx(res[0][0], rel=1e-6)
    for n in res[0][4]:
        assert torch.allclose(res[1][4][n], res[0][4][n], rtol=1e-5, atol=1e-7), n


def test_checkpointed_blocks_run_again_in_the_backward_and_keep_less():
    model = build_model(recipe("GA | GD | M3 | GA", d_model=64)).train()
    calls = [0] * len(model.blocks)
    for i, b in enumerate(model.blocks):
        b.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    ids = torch.randint(0, V, (2, 48))
    kept = {}
    for every in (0, 1, 2):
        model.set_activation_checkpointing(every)
        calls[:] = [0] * len(calls)
        out, kept[every] = saved_bytes(lambda: model(ids, labels=ids))
        out.loss.backward()
        assert calls == ([1, 1, 1, 1] if every == 0 else [2, 2, 2, 2] if every == 1 else [2, 1, 2, 1]), (every, calls)
    assert kept[1] < kept[2] < kept[0], kept
    assert model.activation_checkpointing == 2


def _runs_and_kept(model, modules, fn, every: int):  # noqa: ANN001, ANN202
    """(forward calls of each of ``modules`` in ``fn()``'s forward and backward, bytes autograd kept,
    gradients) with activation checkpointing at ``every``."""
    calls = [0] * len(modules)
    hooks = [m.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, m in enumerate(modules)]
    model.set_activation_checkpointing(every)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss, kept = saved_bytes(fn)
    loss.backward()
    for h in hooks:
        h.remove()
    return calls, kept, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_mtp_modules_and_the_ladir_denoiser_are_checkpointed_too():
    """The parts that run blocks outside the stack: the MTP modules' blocks (after the trunk, at full
    length) and LaDiR's flow denoiser (its only trainable part in the flow stage, where the LM runs
    without gradients) are checkpointed like the trunk's blocks, every N-th counted from their first:
    they run again in the backward, keep less, and give the plain forward's gradients."""
    torch.manual_seed(0)
    mtp = build_model(recipe("GA | GD", dict(EVERY_COMPONENT), mtp={"depth": 2, "weight": 0.5, "block": "GD+mlp"},
                             d_model=64)).train()
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(1))

    def mtp_loss():  # noqa: ANN202
        return mtp(ids, labels=ids).loss

    from tests.test_ladir import batch
    from tests.test_ladir import recipe as ladir_recipe

    lad = build_model(ladir_recipe(denoiser_layers=3)).train()
    b = batch()

    def flow():  # noqa: ANN202
        return lad.ladir.flow_loss(lad, b)[0]

    for model, modules, fn in ((mtp, list(mtp.mtp.blocks), mtp_loss), (lad, list(lad.ladir.denoiser.stack.layers), flow)):
        n = len(modules)
        calls0, kept0, g0 = _runs_and_kept(model, modules, fn, 0)
        assert g0 and calls0 == [1] * n
        for every in (1, 2):
            calls, kept, g = _runs_and_kept(model, modules, fn, every)
            assert calls == [2 if i % every == 0 else 1 for i in range(n)], (every, calls)
            assert kept < kept0, (every, kept, kept0)
            assert g.keys() == g0.keys()
            for k in g:
                assert torch.allclose(g[k], g0[k], rtol=1e-5, atol=1e-7), (every, k)


@pytest.mark.parametrize("case", ["every mixer, MoE with balancing, dropout", "etd, ACT halting, MoDr branches"])
def test_a_checkpointed_forward_never_run_backward_is_freed(case):
    """A training forward with gradients whose backward never runs (the trainer's eager check of a
    CUDA graph's loss) leaves no tensor holding an autograd graph once its output is dropped: the
    checkpoint's hooks let go of the call's context (which held this forward's outputs and aux
    losses in a cycle through the graph that no garbage collection breaks; the capture after it
    then failed, blaming "8 tensors from an earlier eager step")."""
    from hymba_plus.training.cuda_graph import graph_holders

    torch.manual_seed(0)
    model = build_model(CASES[case]).train()
    model.set_activation_checkpointing(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 16))
    before = graph_holders()  # (what earlier tests in this process left)
    out = model.objective.train_forward(model, model, ids, ids)
    assert out.loss.requires_grad and graph_holders() > before
    del out
    assert graph_holders() == before


@torch.no_grad()
def test_cached_and_no_grad_calls_are_not_checkpointed():
    model = build_model(recipe("GA | GD | M3 | ATL")).eval()
    ids = torch.randint(0, V, (2, 8))
    want = model.generate(ids, max_new_tokens=6)
    model.set_activation_checkpointing(1)
    assert torch.equal(model.generate(ids, max_new_tokens=6), want)
    with pytest.raises(ValueError, match="every must be an integer >= 0"):
        model.set_activation_checkpointing(-1)
    with pytest.raises(ValueError, match="every must be an integer >= 0"):
        model.set_activation_checkpointing(True)


def test_hymba_train_with_activation_checkpointing_has_the_plain_runs_losses(tmp_path, capsys):
    rec = tmp_path / "r.yaml"
    rec.write_text(yaml.safe_dump(recipe("GA | GD+moe | M3", BALANCED_MOE)))
    common = ["--steps", "4", "--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--no-progress"]
    assert main(["train", str(rec), "--out", str(tmp_path / "plain"), *common]) == 0
    assert main(["train", str(rec), "--out", str(tmp_path / "ac"), "--activation-checkpoint", "1", *common]) == 0
    assert "activation checkpointing: the activations of every block recomputed in the backward" in capsys.readouterr().err

    def losses(name: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("ac") == pytest.approx(losses("plain"), rel=1e-6)
    rc = main(["train", str(rec), "--out", str(tmp_path / "c"), "--activation-checkpoint", "1", "--compile", *common])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--activation-checkpoint: not with --compile" in err
    assert not (tmp_path / "c").exists()


@pytest.mark.gpu
def test_gpu_dropout_is_recomputed_with_the_same_masks():
    """On CUDA the checkpoint keeps the CUDA generator's state for the recomputation (it stashes the
    generators of its arguments' devices: the block's input is handed to it), so dropout's masks and
    every gradient are the plain forward's."""
    torch.manual_seed(0)
    model = build_model(recipe("GA | GD+moe | GA", BALANCED_MOE, dropout=0.2), device="cuda").train()
    ids = torch.randint(0, V, (2, 32), device="cuda")
    plain = _step(model, ids, 0)
    ck = _step(model, ids, 1)
    assert ck[0] == pytest.approx(plain[0], rel=1e-6)
    for n in plain[4]:
        assert torch.allclose(ck[4][n], plain[4][n], rtol=1e-4, atol=1e-6), n


@pytest.mark.gpu
def test_gpu_checkpointed_run_is_captured_and_equals_eager(tmp_path, capsys):
    """On CUDA, auto mode captures a checkpointed step (recomputation inside the captured backward)
    and its losses equal an eager run's; with dropout (whose random-state stash may not run inside a
    capture) the run is captured or eager with the reason said, and its losses equal an eager run's."""
    for dropout in (0.0, 0.1):
        rec = tmp_path / f"r{dropout}.yaml"
        rec.write_text(yaml.safe_dump(recipe("GA | GD+moe | GA", BALANCED_MOE, dropout=dropout)))
        common = ["--steps", "4", "--batch-size", "2", "--seq-len", "32", "--warmup", "1", "--no-progress",
                  "--device", "cuda", "--activation-checkpoint", "1"]
        assert main(["train", str(rec), "--out", str(tmp_path / f"auto{dropout}"), *common]) == 0
        err = capsys.readouterr().err
        mode = next(x for x in err.splitlines() if x.startswith("training mode:"))
        print(dropout, mode)
        if dropout == 0.0:
            assert mode.startswith("training mode: cuda-graph (forward+backward captured"), err
        assert main(["train", str(rec), "--out", str(tmp_path / f"eager{dropout}"), "--mode", "eager", *common]) == 0
        a, e = ([json.loads(x)["loss"] for x in (tmp_path / f"{n}{dropout}" / "metrics.jsonl").read_text().splitlines()]
                for n in ("auto", "eager"))
        assert a == pytest.approx(e, rel=1e-4), (dropout, a, e)


@pytest.mark.parametrize("config, extra", [
    ("bd_tiny.yaml", ["--seq-len", "32"]),  # the two-stream forward (recurrent mixers' boundary states)
    ("ladir_tiny.yaml", ["--data", "chain_arith", "--ladir-stage", "joint"]),  # several LM passes a step
    ("forecast_tiny.yaml", []),  # inputs_embeds, numbers in
    ("mtp_tiny.yaml", ["--seq-len", "32"]),  # the MTP modules after the (checkpointed) trunk
])
def test_every_objective_trains_checkpointed_as_plain(tmp_path, config, extra):
    """The objectives that run the model's parts themselves give the plain run's losses with every
    block checkpointed."""
    common = ["train", str(ROOT / "configs" / config), "--steps", "2", "--batch-size", "2", "--warmup", "1",
              "--eval-every", "100", "--save-every", "100", "--no-progress", *extra]
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "ac"), "--activation-checkpoint", "1"]) == 0

    def losses(name: str) -> list[float]:
        return [json.loads(x)["loss"] for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]

    assert losses("ac") == pytest.approx(losses("plain"), rel=1e-5)
