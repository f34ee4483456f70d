"""``hymba train --mode compile`` for objectives whose step runs the model's parts rather than its
forward (``Objective.core`` / ``compile_step``): block diffusion (the two-stream forward and the
NELBO, its noise drawn eagerly before them) and forecasting (RevIN, patch embedding, backbone,
horizon head, loss). The compiled step gives the eager step's loss and gradients for the same
random state, compiles once for a run of same-shaped steps, and evaluation runs the same compiled
core. The fast tests compile with ``aot_eager`` (Dynamo's trace and AOTAutograd, no Inductor); the
slow ones train through the Trainer with Inductor, as ``hymba train --mode compile`` does. LaDiR
keeps its refusal (its losses draw noise between several model calls inside its component)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters

from hymba_plus import build_model, load_recipe
from hymba_plus.objectives.base import CompiledParts
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.trainer import RunOptions, Trainer

ROOT = Path(__file__).resolve().parents[1]
COMPONENTS = {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
              "mlp": {"d_hidden": 64}}
BD = {"name": "bd-compile", "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 32, "block_pattern": "GD | GA",
                                      "meta_tokens": 2},
      "components": COMPONENTS,
      "objective": {"kind": "block_diffusion", "block_size": 4, "clip": [0.3, 0.8], "resample": True}}
FC = {"name": "fc-compile", "model": {"d_model": 32, "max_seq_len": 16, "block_pattern": "GD | GA"},
      "components": COMPONENTS,
      "objective": {"kind": "forecast", "context": 32, "horizon": 8, "patch": 4, "channels": 2, "loss": "quantile",
                    "quantiles": [0.1, 0.5, 0.9], "season": 8}}
TOL = 1e-5


def graphs() -> int:
    """Graphs Dynamo has compiled so far in this process (each recompile adds one)."""
    return counters["stats"]["unique_graphs"]


def _inputs(recipe: dict, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if recipe is BD:
        ids = torch.randint(0, 32, (batch, 16), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100  # an unscored prompt
        return ids, labels
    x = torch.randn(batch, 32, 2, generator=g, dtype=torch.float64).cumsum(1)
    y = x[:, -8:] + torch.randn(batch, 8, 2, generator=g, dtype=torch.float64)
    y[0, 3, 1] = float("nan")  # a gap of the data: not scored
    return x, y


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=TOL, atol=TOL), (k, float((a[k] - b[k]).abs().max()))


@pytest.mark.parametrize("recipe", [BD, FC], ids=["block_diffusion", "forecast"])
def test_compiled_core_steps_and_evaluates_as_eager_and_compiles_once(recipe):
    """Two SGD steps through the compiled core (``aot_eager``: Dynamo's trace and AOTAutograd's
    joint graph) against the same steps eagerly from a copy of the model: equal loss, statistics
    and gradients (within 1e-5), noise drawn alike (block diffusion draws it eagerly before the
    core); the second step compiles nothing new. Held-out batches at another batch size run the
    same compiled core (no_grad: at most one recompile per batch size), equal to the eager
    evaluation; a second evaluation compiles nothing. Dynamo is reset first: every core is compiled
    through one code object (``torch._dynamo.external_utils``' wrapper), so after another case (or
    another test's compiled function) in this process, a new case's differently shaped inputs
    made Dynamo's automatic dynamic shapes retrace it symbolically (measured: the forecast case
    7.5 s alone, 30 s after the block diffusion case); a fresh process, as ``hymba train``, starts
    static."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = build_model(load_recipe(recipe)).train()
    model = copy.deepcopy(eager)
    obj = model.objective
    assert obj.eager_because is None
    fwd = obj.compile_step(model, functools.partial(torch.compile, backend="aot_eager"))
    assert isinstance(fwd, CompiledParts)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, eager)]
    ids, labels = _inputs(recipe, 2, 0)
    seen = []
    for step in range(2):
        torch.manual_seed(10 + step)
        out = obj.train_forward(fwd, model, ids, labels)
        out.loss.backward()
        torch.manual_seed(10 + step)
        ref = eager.objective.train_forward(eager, eager, ids, labels)
        ref.loss.backward()
        assert abs(float(out.loss.detach()) - float(ref.loss.detach())) <= TOL * abs(float(ref.loss.detach()))
        assert (out.stats or {}).keys() == (ref.stats or {}).keys()
        for k in out.stats or {}:
            assert torch.allclose(out.stats[k], ref.stats[k], rtol=TOL, atol=TOL), k
        _assert_close(_grads(model), _grads(eager))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        seen.append(graphs())
    assert seen[1] == seen[0], seen  # the second step of the same shapes: no recompile
    model.eval()
    eager.eval()
    ev_ids, ev_labels = _inputs(recipe, 3, 1)
    for _ in range(2):
        got = obj.eval_batch(fwd, model, ev_ids, ev_labels, seed=4)
        want = eager.objective.eval_batch(eager, eager, ev_ids, ev_labels, seed=4)
        assert got[0] == pytest.approx(want[0], rel=TOL) and got[1:3] == want[1:3]
        seen.append(graphs())
    assert seen[3] == seen[2], seen  # the second evaluation: no recompile
    # next token (and MTP) keep the compiled model forward as their fwd
    plain = build_model(load_recipe({**BD, "objective": {"kind": "next_token"}}))
    assert plain.objective.core is None
    assert plain.objective.compile_step(plain, lambda m: ("compiled", m)) == ("compiled", plain)


def _trained(tmp_path: Path, recipe: dict, mode: str) -> tuple[Trainer, list[dict], list[float]]:
    """A Trainer of ``recipe`` in ``mode`` after two steps: (it, each step's gradients, losses)."""
    tr = Trainer(load_recipe(recipe), TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0, eval_batches=1),
                 RunOptions(out=tmp_path / mode, progress=False, log=lambda s: None, device="cpu", mode=mode))
    tr.setup()
    got, losses = [], []
    real = tr._optimizer_step

    def record(step, loss, *a, **kw):  # noqa: ANN001, ANN202
        got.append(_grads(tr.model))
        losses.append(float(loss))
        return real(step, loss, *a, **kw)

    tr._optimizer_step = record
    for step in range(2):
        torch.manual_seed(100 + step)
        tr.train_step(step)
    return tr, got, losses


@pytest.mark.slow  # Inductor compiles the core's graphs on the CPU (minutes)
@pytest.mark.parametrize("recipe", [BD, FC], ids=["block_diffusion", "forecast"])
def test_trainer_compile_mode_trains_as_eager(tmp_path, recipe):
    """``--mode compile`` through the Trainer (Inductor): the objective's core is what is compiled
    (``fwd`` is ``CompiledParts``, no refusal), its two steps' losses and gradients equal the eager
    mode's within 1e-5, the second step compiles nothing new, and the held-out evaluation (another
    batch size) runs the same compiled core to the eager evaluation's loss."""
    tr_e, grads_e, loss_e = _trained(tmp_path, recipe, "eager")
    start = graphs()
    tr_c, grads_c, loss_c = _trained(tmp_path, recipe, "compile")
    assert tr_c.run_mode == "compile" and isinstance(tr_c.fwd, CompiledParts)
    assert loss_c == pytest.approx(loss_e, rel=TOL)
    for a, b in zip(grads_c, grads_e):
        _assert_close(a, b)
    after = graphs()
    assert after > start
    res_c, res_e = tr_c.evaluate(), tr_e.evaluate()  # (the same weights: two steps each)
    assert res_c["eval_loss"] == pytest.approx(res_e["eval_loss"], rel=TOL)
    evaluated = graphs()
    torch.manual_seed(7)
    tr_c.train_step(2)
    tr_c.evaluate()
    assert graphs() == evaluated  # a third step and a second evaluation: no recompile


def test_ladir_and_activation_checkpointing_are_still_refused(tmp_path, capsys):
    """LaDiR keeps its one-line refusal (its VAE draws the latents' noise from the encoder's output
    between its model calls, inside ``components/ladir.py``: no core past the noise draws), and
    ``--activation-checkpoint`` is still refused with ``--compile`` for block diffusion too."""
    from hymba_plus.cli import main

    rc = main(["train", str(ROOT / "configs" / "ladir_tiny.yaml"), "--out", str(tmp_path / "l"), "--steps", "1",
               "--batch-size", "2", "--device", "cpu", "--no-progress", "--compile"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == ("hymba train: --compile: not available for the ladir objective (its losses "
                                    "call the model several times per step)")
    rc = main(["train", str(ROOT / "configs" / "bd_tiny.yaml"), "--out", str(tmp_path / "b"), "--steps", "1",
               "--batch-size", "2", "--seq-len", "16", "--device", "cpu", "--no-progress", "--compile",
               "--activation-checkpoint", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--activation-checkpoint: not with --compile" in err.splitlines()[-1]


@pytest.mark.parametrize("recipe", [BD, FC], ids=["block_diffusion", "forecast"])
def test_compile_mode_reaches_the_compiled_core(tmp_path, monkeypatch, recipe):
    """``--compile-mode`` applies to the objective's core as to a compiled forward: torch.compile
    gets the core bound to the model, with the mode (``default``: torch.compile's own, None)."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append((fn, kw)) or fn)
    for mode, want in (("reduce-overhead", "reduce-overhead"), ("default", None)):
        tr = Trainer(load_recipe(recipe), TrainConfig(steps=1, batch_size=2, seq_len=16, warmup_steps=0),
                     RunOptions(out=tmp_path / mode, progress=False, log=lambda s: None, device="cpu", compile=mode))
        tr.setup()
        fn, kw = seen[-1]
        assert kw == {"mode": want} and isinstance(tr.fwd, CompiledParts) and tr.fwd.core is fn
        assert fn.func == tr.objective.core and fn.args == (tr.model,)
