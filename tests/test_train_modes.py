"""hymba train's training modes (--mode auto | eager | cuda-graph | compile) and the CUDA-graph
capture's diagnosis (training/cuda_graph.py).

On the CPU: how the flags resolve, that auto is eager there and silent, that the mode is
recorded, the auto decision (eligibility, capture failure, verification against the eager
loss) with the capture stood in for, that a failed capture blames a live autograd graph only
when the caller holds one, and that the trainer's own eager work (the verification forward,
an ETD model's per-call state) leaves no autograd graph behind. GPU tests (``-m gpu``) check
the real thing.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.core.recipe import load_recipe
from hymba_plus.kernels import dispatch
from hymba_plus.training import cuda_graph as cg
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.trainer import GRAPH_LOSS_RTOL, TRAIN_MODES, RunOptions, Trainer
from tests.helpers import CudaLooking

TINY = {
    "name": "modes-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64}},
}
MOE = dict(TINY, model={**TINY["model"], "block_pattern": "GA | GA+moe"},
           components={**TINY["components"], "moe": {"n_experts": 4, "top_k": 2, "bias_update_rate": 0.01}})
FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--no-progress"]
_GRAPH_HOLDERS = cg.graph_holders


def write_recipe(tmp_path: Path, recipe: dict | None = None) -> str:
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(recipe or TINY, sort_keys=False))
    return str(p)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- flags


def test_mode_flags_and_their_aliases_resolve():
    assert RunOptions(out=Path("o")).train_mode() == ("auto", None)
    assert RunOptions(out=Path("o"), mode="eager").train_mode() == ("eager", None)
    assert RunOptions(out=Path("o"), cuda_graph=True).train_mode() == ("cuda-graph", None)
    assert RunOptions(out=Path("o"), mode="cuda-graph", cuda_graph=True).train_mode() == ("cuda-graph", None)
    assert RunOptions(out=Path("o"), mode="compile").train_mode() == ("compile", "default")
    assert RunOptions(out=Path("o"), compile="reduce-overhead").train_mode() == ("compile", "reduce-overhead")
    for bad, match in [({"mode": "fastest"}, "--mode fastest: not one of"),
                       ({"mode": "eager", "cuda_graph": True}, "--mode eager: not with --cuda-graph"),
                       ({"mode": "cuda-graph", "compile": "default"}, "--mode cuda-graph: not with --compile"),
                       ({"cuda_graph": True, "compile": "default"}, "instead of --compile")]:
        with pytest.raises(ValueError, match=match):
            RunOptions(out=Path("o"), **bad).train_mode()


def test_cli_modes_match_the_trainers():
    from hymba_plus.cli import train as cli_train

    assert cli_train.TRAIN_MODES == TRAIN_MODES


@pytest.mark.parametrize("flags, needle", [
    (["--mode", "eager", "--cuda-graph"], "--mode eager: not with --cuda-graph (which means --mode cuda-graph)"),
    (["--mode", "cuda-graph", "--compile"], "--mode cuda-graph: not with --compile (which means --mode compile)"),
    (["--mode", "auto", "--compile-mode", "reduce-overhead"], "--mode auto: not with --compile-mode"),
    (["--cuda-graph", "--compile"], "--cuda-graph: use it instead of --compile"),
])
def test_contradicting_mode_flags_are_one_line_usage_errors(tmp_path, capsys, flags, needle):
    rc = main(["train", write_recipe(tmp_path), "--out", str(tmp_path / "o"), *FAST, *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


def test_explicit_cuda_graph_on_the_cpu_is_an_error(tmp_path, capsys):
    rc = main(["train", write_recipe(tmp_path), "--out", str(tmp_path / "g"), "--mode", "cuda-graph", "--device",
               "cpu", "--steps", "1", *FAST])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.splitlines()[-1] == "hymba train: --cuda-graph needs a CUDA device (the model is on cpu)"


def test_auto_on_the_cpu_is_eager_silently_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", write_recipe(tmp_path), "--out", str(out), "--steps", "2", "--device", "cpu", *FAST]) == 0
    cap = capsys.readouterr()
    assert "training mode" not in cap.err and "fast path" not in cap.err
    assert [r["mode"] for r in metrics(out)] == ["eager", "eager"]
    assert "tokens/s (eager)" in cap.out.strip().splitlines()[-1]
    assert main(["train", write_recipe(tmp_path), "--out", str(tmp_path / "e"), "--steps", "1", "--mode", "eager",
                 *FAST]) == 0
    assert metrics(tmp_path / "e")[0]["mode"] == "eager"


def test_tf32_is_set_for_the_run_and_restored(tmp_path, capsys, monkeypatch):
    """``--tf32`` / the recipe's ``train: {tf32: true}`` allow TF32 for float32 matmuls during the
    run (each step sees it), ``--no-tf32`` overrides the recipe, the caller's setting is back
    afterwards; on the CPU the run says the flag has no effect there."""
    seen: list[bool] = []
    real = Trainer.train_step

    def step(self, i):  # noqa: ANN001, ANN202
        seen.append(torch.backends.cuda.matmul.allow_tf32)
        return real(self, i)

    monkeypatch.setattr(Trainer, "train_step", step)
    before = torch.backends.cuda.matmul.allow_tf32
    assert main(["train", write_recipe(tmp_path), "--out", str(tmp_path / "a"), "--steps", "2", "--tf32",
                 "--device", "cpu", *FAST]) == 0
    assert seen == [True, True] and torch.backends.cuda.matmul.allow_tf32 == before
    assert "(--tf32: CUDA only, no effect here)" in capsys.readouterr().err
    path = write_recipe(tmp_path, {**TINY, "train": {"tf32": True, "seq_len": 32}})
    seen.clear()
    assert main(["train", path, "--out", str(tmp_path / "b"), "--steps", "1", "--device", "cpu", *FAST]) == 0
    assert main(["train", path, "--out", str(tmp_path / "c"), "--steps", "1", "--no-tf32", "--device", "cpu",
                 *FAST]) == 0
    assert seen == [True, False] and torch.backends.cuda.matmul.allow_tf32 == before


# --------------------------------------------------------------------------- the capture's diagnosis


def test_graph_holders_counts_live_tensors_with_an_autograd_graph():
    base = cg.graph_holders("cpu")
    w = torch.ones(3, requires_grad=True)  # a leaf: no graph of its own
    loss = (w * 2).sum()
    out = w * 3
    with torch.no_grad():
        plain = w * 4  # no graph
    assert cg.graph_holders("cpu") == base + 2
    assert cg.graph_holders("cuda") == cg.graph_holders("cuda")  # another device's are not counted
    del loss, out
    assert cg.graph_holders("cpu") == base
    cycle: list = []
    cycle.append(cycle)
    cycle.append(w * 5)  # only reachable through a dead cycle: collected, not counted
    del cycle
    assert cg.graph_holders("cpu") == base and plain.grad_fn is None


def test_capture_failure_names_a_kept_graph_else_a_host_sync():
    err = "operation not permitted when stream is capturing"
    sync = cg.capture_failure(err, 0)
    assert sync.startswith(f"the training step could not be captured ({err}); something in it synchronizes")
    assert "--precision bf16" in sync and "autograd graph" not in sync
    one = cg.capture_failure(err, 1)
    assert one == (f"the training step could not be captured ({err}): 1 tensor from an earlier eager step still "
                   "holds an autograd graph (e.g. a loss you kept): drop them (del) before capturing")
    assert "3 tensors from an earlier eager step still hold an autograd graph" in cg.capture_failure(err, 3)
    assert "synchronizes" not in one and len(cg.capture_failure("x" * 1000, 0)) < 450


class _Tiny(torch.nn.Module):
    """What GraphedStep captures: the model's objective's training forward (next token: model(ids,
    labels=...)) -> an output with loss / aux_loss / stats."""

    def __init__(self) -> None:
        super().__init__()
        from hymba_plus.objectives.next_token import NextToken

        self.w = torch.nn.Parameter(torch.ones(4))
        self.objective = NextToken()

    def forward(self, ids, labels=None, return_logits=True, **_):  # noqa: ANN001, ANN003, ANN201, ARG002
        from hymba_plus.models.lm import ModelOutput

        return ModelOutput(logits=ids.float()[..., None] * self.w, loss=(ids.float()[..., None] * self.w).mean())


def _capture(model, ids, make, monkeypatch, base: int = 0):  # noqa: ANN001, ANN202
    """Run GraphedStep's capture on the CPU: the device check is skipped by a sample that
    says it is on CUDA, make_graphed_callables is ``make``. ``base``: CPU tensors holding a
    graph before the test began (left alive by other tests in the same process), not counted."""
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", make)
    monkeypatch.setattr(cg, "graph_holders", lambda device_type=None: _GRAPH_HOLDERS("cpu") - base)
    sample = CudaLooking(ids)
    return cg.GraphedStep(model, sample, sample, contextlib.nullcontext)


def test_a_failed_capture_blames_the_callers_kept_loss_not_its_own_warm_up(monkeypatch):
    """The failing capture's own warm-up outputs (alive in its traceback while the exception is
    handled) are not counted; a loss the caller kept is, and the error says to drop it."""
    paused = []

    def failing_make(step, args, allow_unused_input=False):  # noqa: ANN001, ANN202
        paused.append(not gc.isenabled())
        warm_up = step(*args)  # noqa: F841 - like make_graphed_callables: outputs with a graph in its frame
        raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nCUDA kernel errors ...")

    base = _GRAPH_HOLDERS("cpu")
    model = _Tiny()
    ids = torch.ones(2, 3, dtype=torch.long)
    with pytest.raises(cg.CaptureError) as e:
        _capture(model, ids, failing_make, monkeypatch, base)
    msg = str(e.value)
    assert msg.startswith("the training step could not be captured (CUDA error: operation not permitted when stream "
                          "is capturing); something in it synchronizes"), msg
    assert paused == [True] and gc.isenabled()  # no garbage collection inside the capture
    kept = model(ids, labels=ids).loss  # an eager step's loss, kept
    with pytest.raises(cg.CaptureError, match=r"\): 1 tensor from an earlier eager step still holds an autograd "
                                              r"graph \(e\.g\. a loss you kept\): drop them \(del\) before capturing"):
        _capture(model, ids, failing_make, monkeypatch, base)
    del kept
    with pytest.raises(cg.CaptureError, match="synchronizes with the host"):
        _capture(model, ids, failing_make, monkeypatch, base)


def test_a_failed_capture_resets_balancing_counts(monkeypatch):
    class Counting(_Tiny):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("load", torch.zeros(2), persistent=False)

        def update_bias(self) -> None:
            pass

        def forward(self, ids, labels=None, return_logits=True, **_):  # noqa: ANN001, ANN003, ANN201, ARG002
            self.load += 1
            return super().forward(ids, labels)

    def failing_make(step, args, allow_unused_input=False):  # noqa: ANN001, ANN202
        step(*args)
        raise AssertionError("Modules must not have hooks registered at the time they are passed.")

    model = Counting()
    with pytest.raises(cg.CaptureError, match=r"captured \(Modules must not have hooks"):
        _capture(model, torch.ones(2, 3, dtype=torch.long), failing_make, monkeypatch)
    assert torch.equal(model.load, torch.zeros(2))


# --------------------------------------------------------------------------- the auto decision


def _trainer(tmp_path: Path, recipe: dict | None = None, **opts) -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    tr = Trainer(load_recipe(recipe or TINY), TrainConfig(steps=2, batch_size=2, seq_len=16, warmup_steps=0),
                 RunOptions(out=tmp_path / "run", progress=False, log=lines.append, device="cpu", **opts))
    tr.setup()
    return tr, lines


class _FakeGraph:
    """Stands in for a captured step: the model's eager forward, ``shift`` added to the loss."""

    def __init__(self, model, shift: float = 0.0):  # noqa: ANN001
        self.model, self.shift = model, shift

    def __call__(self, ids, labels):  # noqa: ANN001, ANN204
        out = self.model(ids, labels=labels)
        return out.loss + self.shift, out.aux_loss, out.stats


def test_auto_keeps_a_graph_whose_loss_matches_the_eager_one(tmp_path, monkeypatch):
    tr, lines = _trainer(tmp_path, MOE)
    assert tr.run_mode == "eager" and tr.graphed is None and lines and not any("training mode" in x for x in lines)
    monkeypatch.setattr(tr, "_graph_step", lambda: _FakeGraph(tr.model))
    graphed, note = tr._auto_mode()
    assert isinstance(graphed, _FakeGraph)
    assert note.startswith("forward+backward captured at batch 2 x 16; first batch's loss ") and "eager" in note
    moe = tr.model.blocks[1].ffn
    assert torch.equal(moe.load, torch.zeros_like(moe.load))  # the verification forwards' counts are gone


def test_auto_checks_dropout_with_the_same_masks_and_leaves_the_random_stream(tmp_path, monkeypatch):
    """With dropout the eager check and the graphed one draw from the same random state (they drew
    different masks, so a dropout run was never verified and stayed eager), and the capture's draws
    (its warm-up passes; here a stand-in that draws) leave the run's stream where it was, so the first
    step, and a resumed run's, draw what an eager run's do. (CPU: the capture stood in for.)"""
    tr, _ = _trainer(tmp_path, dict(TINY, model={**TINY["model"], "dropout": 0.5}))

    def capture():
        torch.rand(1000)  # the warm-up passes' draws
        return _FakeGraph(tr.model)

    monkeypatch.setattr(tr, "_graph_step", capture)
    before = torch.get_rng_state()
    graphed, note = tr._auto_mode()
    assert isinstance(graphed, _FakeGraph), note
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("fault, expected", [
    (lambda tr: _FakeGraph(tr.model, shift=0.5),
     r"^CUDA graph not verified: its loss on the first batch \S+ differs from the eager loss \S+ by more than "
     r"0\.0001 \(fp32\)$"),
    (lambda tr: _FakeGraph(tr.model, shift=math.nan), r"^CUDA graph not verified"),
    (lambda tr: (_ for _ in ()).throw(cg.CaptureError("the training step could not be captured (boom); x")),
     r"^CUDA graph capture failed: the training step could not be captured \(boom\); x$"),
    (lambda tr: (_ for _ in ()).throw(RuntimeError("CUDA error: out of memory\nmore")),
     r"^CUDA graph check failed: RuntimeError: CUDA error: out of memory$"),
])
def test_auto_falls_back_to_eager_saying_why(tmp_path, monkeypatch, fault, expected):
    tr, _ = _trainer(tmp_path)
    monkeypatch.setattr(tr, "_graph_step", lambda: fault(tr))
    graphed, why = tr._auto_mode()
    assert graphed is None
    assert re.match(expected, why), why


def test_auto_is_not_tried_where_the_run_cannot_be_captured(tmp_path, monkeypatch):
    tr, _ = _trainer(tmp_path)
    monkeypatch.setattr(tr, "_graph_step", lambda: pytest.fail("must not capture"))
    assert tr.graph_ineligible() is None
    for attr, value, why in [("mode", "branches", "--train-only branches"),
                             ("teacher", object(), "--distill runs a teacher beside the step"),
                             ("routes_on", True, "the Dr.LLM layer routers are on")]:
        monkeypatch.setattr(tr, attr, value)
        assert tr.graph_ineligible() == why and tr._auto_mode() == (None, why)
        monkeypatch.undo()
        monkeypatch.setattr(tr, "_graph_step", lambda: pytest.fail("must not capture"))
    monkeypatch.setattr(tr.objective, "graph_because", "its step runs eagerly")
    assert tr.graph_ineligible() == "the next_token objective: its step runs eagerly"


def test_a_block_diffusion_step_is_captured_whole(tmp_path, monkeypatch):
    """Block diffusion's training step (noise draws, the two-stream forward, the NELBO) is what a
    CUDA graph captures (its objective declares no ``graph_because``): the module handed to the
    capture runs the objective's ``train_forward``, its parameters include the objective's [MASK]
    embedding, and (run eagerly here) it gives the eager step's loss, statistics and gradients for
    the same random state. LaDiR and forecasting stay eager, saying why."""
    bd = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "bd_tiny.yaml")
    torch.manual_seed(0)
    model = build_model(bd).train()
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    step = cg._LossStep(model, has_aux=False, stat_keys=["bd/mask_rate"])  # what GraphedStep captures
    assert any(p is model.objective.mask_embed for p in step.parameters())
    torch.manual_seed(5)
    loss, _, rate = step(ids, ids)
    stats = {"bd/mask_rate": rate}
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    out = model.objective.train_forward(model, model, ids, ids)
    out.loss.backward()
    assert float(loss) == float(out.loss) and set(stats) == {"bd/mask_rate"}
    assert float(stats["bd/mask_rate"]) == float(out.stats["bd/mask_rate"])
    assert got.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and "objective.mask_embed" in got
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(got[n], p.grad), n
    tr, _ = _trainer(tmp_path, {**yaml.safe_load(bd.to_yaml())})
    assert tr.graph_ineligible() is None
    lad = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "ladir_tiny.yaml")
    assert build_model(lad).objective.graph_because == "its losses call the model several times per step"


@pytest.mark.parametrize("name", ["bd_tiny", "hymba_tiny", "gpt_swa_tiny", "mtp_tiny"])
def test_a_graph_eligible_step_reads_nothing_on_the_host_during_a_capture(tmp_path, name):
    """The training step of a shipped recipe that ``auto`` may capture (``graph_ineligible`` None),
    forward and backward with the kernels' probes already run, reads no tensor value on the host
    while a capture is in progress (``host_read_site``: run as if capturing). Block diffusion's
    gdn clean pass once range-checked its block starts with ``int(...)``: on CUDA the capture failed
    and ``auto`` trained eagerly."""
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml")
    tr, _ = _trainer(tmp_path, {**yaml.safe_load(recipe.to_yaml())})
    assert tr.graph_ineligible() is None
    model = build_model(recipe).train()
    ids = torch.randint(0, recipe.model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    model.objective.train_forward(model, model, ids, ids).loss.backward()  # the probes run eagerly first
    assert cg.host_read_site(model, ids, ids, contextlib.nullcontext) is None


def test_a_failed_capture_names_the_line_that_reads_on_the_host(monkeypatch):
    """``host_read_site`` runs the step eagerly as if capturing and names the first host read with
    its line and function; the gradients, the random state and the balancing counts are left as
    they were; the capture's error says it (not "MoE experts in float32")."""
    torch.manual_seed(0)
    model = build_model(MOE).train()
    ids = torch.randint(0, 32, (2, 16))
    step = model.objective.train_forward

    def reading(fwd, m, ids, labels, **kw):  # noqa: ANN001, ANN202
        if dispatch.capturing() and int(ids.max()) < 0:
            raise AssertionError
        return step(fwd, m, ids, labels, **kw)

    monkeypatch.setattr(model.objective, "train_forward", reading)
    loads = [m.load.clone() for m in model.modules() if hasattr(m, "update_bias")]
    state = torch.get_rng_state()
    site = cg.host_read_site(model, ids, ids, contextlib.nullcontext)
    assert site is not None and site.startswith("reads a tensor on the host at tests/test_train_modes.py:"), site
    assert site.endswith("(reading)"), site
    assert all(p.grad is None for p in model.parameters()) and torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(a, m.load) for a, m in zip(loads, (m for m in model.modules() if hasattr(m, "update_bias"))))
    msg = cg.capture_failure("CUDA error: operation failed due to a previous error during capture", 0, site)
    assert f"the step {site}, which a capture cannot do" in msg and "float32" not in msg
    assert cg.host_read_site(build_model(MOE).train(), ids, ids, contextlib.nullcontext) is None


def test_a_forecast_step_is_captured_whole(tmp_path):
    """Forecasting's step (RevIN, patch embedding, the backbone on inputs_embeds, the horizon head,
    the loss) takes windows of numbers in and gives the loss out: what GraphedStep captures (here run
    eagerly) equals the objective's eager step, loss and gradients, and the trainer's sample for the
    capture is the run's first batch of windows (float64 windows, not token ids)."""
    fc = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "forecast_tiny.yaml")
    torch.manual_seed(0)
    model = build_model(fc).train()
    tr = Trainer(fc, TrainConfig(steps=2, batch_size=2, warmup_steps=0),
                 RunOptions(out=tmp_path / "run", progress=False, log=lambda s: None, device="cpu"))
    tr.setup()
    assert tr.graph_ineligible() is None
    batch = tr.stream.train(tr._micro_indices(0))
    x, y = batch.input_ids, batch.labels
    assert x.dtype == torch.float64 and x.ndim == 3
    step = cg._LossStep(model, has_aux=False, stat_keys=[])
    loss = step(x, y)[0]
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    out = model.objective.train_forward(model, model, x, y)
    out.loss.backward()
    assert float(loss) == float(out.loss) and got
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(got[n], p.grad), n


class _FakeGraphedOptimizer:
    """Stands in for ``GraphedOptimizer``: ``replay`` steps eagerly and returns the next of ``answers``."""

    made: list = []

    def __init__(self, opt, params):  # noqa: ANN001
        self.opt, self.answers, self.replays = opt, [True, False, False], 0
        _FakeGraphedOptimizer.made.append(self)

    def replay(self) -> bool:
        ok = self.answers[self.replays]
        self.replays += 1
        if ok:
            self.opt.step()
        return ok


def test_the_optimizer_step_is_captured_at_the_second_step_and_said(tmp_path, monkeypatch):
    """The trainer captures the optimizer step at the process's second step and replays it; a replay that
    cannot run (other parameters with gradients) steps eagerly, said once; ``--mode eager`` never
    captures; a failed capture is said once and not tried again. (CPU: capture and replay stood in for.)"""
    import hymba_plus.training.trainer as trainer_mod

    _FakeGraphedOptimizer.made = []
    monkeypatch.setattr(trainer_mod, "GraphedOptimizer", _FakeGraphedOptimizer)
    tr, lines = _trainer(tmp_path)
    tr.graphed = _FakeGraph(tr.model)
    eager_steps = []
    real_step = tr.opt.step
    monkeypatch.setattr(tr.opt, "step", lambda *a, **k: (eager_steps.append(1), real_step(*a, **k))[1])
    for k in range(4):
        tr.train_step(k)
    (made,) = _FakeGraphedOptimizer.made
    assert made.replays == 3 and len(eager_steps) == 1 + 1 + 2  # step 1 eager; replays: ok, refused, refused
    said = [x for x in lines if x.startswith("optimizer step:")]
    assert said == ["optimizer step: replayed from a CUDA graph (captured at this process's second step)",
                    "optimizer step: eager at step 3 (the parameters with gradients are not the captured step's); "
                    "so at every such step"]

    def refuse(opt, params):  # noqa: ANN001, ANN202
        raise cg.CaptureError("the optimizer step could not be captured (boom)")

    tr, lines = _trainer(tmp_path / "eager", mode="eager")  # --mode eager never captures
    tr.graphed = _FakeGraph(tr.model)
    for k in range(3):
        tr.train_step(k)
    assert tr.graphed_opt is None and len(_FakeGraphedOptimizer.made) == 1

    monkeypatch.setattr(trainer_mod, "GraphedOptimizer", refuse)
    tr, lines = _trainer(tmp_path / "b")
    tr.graphed = _FakeGraph(tr.model)
    for k in range(3):
        tr.train_step(k)
    assert tr.graphed_opt is None
    assert [x for x in lines if x.startswith("optimizer step:")] == [
        "optimizer step: eager (the optimizer step could not be captured (boom))"]


def _autocast_bf16(step, *args):  # noqa: ANN001, ANN202
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return step(*args)


def test_the_optimizer_step_with_bf16_weights_is_captured_over_the_float32_masters(tmp_path, monkeypatch):
    """``--param-dtype bfloat16``: the optimizer step is captured and replayed inside the masters' block, so
    the graph reads the float32 masters and their float32 gradient sums, the tensors every step swaps in
    (``MasterWeights``); after the step the parameters are the bf16 copies again. (CPU: the capture stood in for.)"""
    import hymba_plus.training.trainer as trainer_mod

    _FakeGraphedOptimizer.made = []
    monkeypatch.setattr(trainer_mod, "GraphedOptimizer", _FakeGraphedOptimizer)
    lines: list[str] = []
    tr = Trainer(load_recipe(TINY), TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=0, precision="bf16",
                                                param_dtype="bfloat16"),
                 RunOptions(out=tmp_path / "run", progress=False, log=lines.append, device="cpu"))
    tr.setup()
    fake = _FakeGraph(tr.model)
    tr.graphed = lambda ids, labels: _autocast_bf16(fake, ids, labels)  # a replay runs what autocast captured
    seen = []
    real_init = _FakeGraphedOptimizer.__init__

    def init(self, opt, params):  # noqa: ANN001, ANN202
        seen.append([(p.dtype, p.data_ptr(), p.grad.data_ptr()) for p in tr.masters.params])
        real_init(self, opt, params)

    monkeypatch.setattr(_FakeGraphedOptimizer, "__init__", init)
    for k in range(3):
        tr.train_step(k)
    (at_capture,) = seen
    assert {d for d, _, _ in at_capture} == {torch.float32}
    assert [(m.data_ptr(), g.data_ptr()) for m, g in zip(tr.masters.masters, tr.masters.grads)] == [
        (p, g) for _, p, g in at_capture]
    assert _FakeGraphedOptimizer.made[0].replays == 2
    assert all(p.dtype == torch.bfloat16 for p in tr.masters.params)
    assert "optimizer step: replayed from a CUDA graph (captured at this process's second step)" in lines


def test_bf16_tolerance_is_about_one_bf16_ulp():
    assert GRAPH_LOSS_RTOL["bf16"] >= 2.0 ** -8 and GRAPH_LOSS_RTOL["fp32"] < 1e-3


def test_the_eager_verification_leaves_no_autograd_graph(tmp_path):
    """The trainer's eager forward before the capture drops its output (a kept graph would make
    the capture fail)."""
    tr, _ = _trainer(tmp_path, MOE)
    batch = tr.stream.train(tr._micro_indices(0))
    base = cg.graph_holders("cpu")
    loss = tr._eager_loss(batch.input_ids, batch.labels, batch)
    assert math.isfinite(loss) and cg.graph_holders("cpu") == base


def test_an_etd_forward_keeps_no_tensor_of_its_call():
    """ETD's structure kept the call's context (holding the MoE aux loss, with its graph) until
    the next call."""
    d = {"name": "etd-moe", "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "meta_tokens": 2,
                                      "block_pattern": "GA | GA+moe | GA",
                                      "etd": {"encoder_layers": 1, "think_layers": 1, "decoder_layers": 1,
                                              "iterations": 2}},
         "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64},
                        "moe": {"n_experts": 4, "top_k": 2}, "etd_router": {}}}
    model = build_model(d).train()
    ids = torch.randint(0, 32, (2, 16))
    base = cg.graph_holders("cpu")
    out = model(ids, labels=ids)
    assert out.aux_loss is not None and out.aux_loss.grad_fn is not None
    del out
    assert cg.graph_holders("cpu") == base


# --------------------------------------------------------------------------- GPU


def _moe_recipe(tmp_path: Path) -> str:
    return write_recipe(tmp_path, MOE)


@pytest.mark.gpu
def test_gpu_auto_uses_cuda_graphs_and_matches_eager(tmp_path, capsys):
    """No mode flag on CUDA: the step is captured, verified and replayed; its losses equal an
    eager run's (bf16, MoE with aux-loss-free balancing, gradient accumulation)."""
    path = _moe_recipe(tmp_path)
    args = ["--steps", "4", "--grad-accum", "2", "--precision", "bf16", "--device", "cuda", *FAST]
    assert main(["train", path, "--out", str(tmp_path / "auto"), *args]) == 0
    cap = capsys.readouterr()
    lines = [x for x in cap.err.splitlines() if x.startswith("training mode:")]
    assert len(lines) == 1 and lines[0].startswith("training mode: cuda-graph (forward+backward captured"), cap.err
    assert "tokens/s (cuda-graph)" in cap.out
    assert "optimizer step: replayed from a CUDA graph" in cap.err, cap.err
    assert main(["train", path, "--out", str(tmp_path / "eager"), "--mode", "eager", *args]) == 0
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "auto")
    assert {r["mode"] for r in a} == {"eager"} and {r["mode"] for r in b} == {"cuda-graph"}
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-3 * abs(ra["loss"]), (ra, rb)


@pytest.mark.gpu
def test_gpu_dropout_is_graphed_equal_to_eager_and_resumes_exactly(tmp_path, capsys):
    """With dropout, auto mode's check draws the same masks eagerly and graphed (a replay reads the
    generator's state; the two checks drew different masks, so the run stayed eager), the graphed
    run's losses equal an eager run's, and a graphed run stopped and resumed equals the
    uninterrupted one (the capture's warm-up draws no longer move the run's random stream)."""
    path = write_recipe(tmp_path, dict(TINY, model={**TINY["model"], "dropout": 0.1}))
    args = ["--steps", "6", "--save-every", "3", "--device", "cuda", *FAST]
    assert main(["train", path, "--out", str(tmp_path / "auto"), *args]) == 0
    err = capsys.readouterr().err
    assert "training mode: cuda-graph (forward+backward captured" in err, err
    assert main(["train", path, "--out", str(tmp_path / "eager"), "--mode", "eager", *args]) == 0
    assert main(["train", path, "--out", str(tmp_path / "res"), "--stop-after", "3", *args]) == 0
    assert main(["train", path, "--out", str(tmp_path / "res"), "--resume", *args]) == 0
    a, e, r = (metrics(tmp_path / n) for n in ("auto", "eager", "res"))
    assert len(a) == len(e) == len(r) == 6 and {x["mode"] for x in r} == {"cuda-graph"}
    for x, y in zip(a, e):
        assert abs(x["loss"] - y["loss"]) <= 1e-4 * abs(y["loss"]), (x, y)
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, r)) <= 1e-6


@pytest.mark.gpu
def test_gpu_auto_falls_back_to_eager_in_one_line_when_capture_fails(tmp_path, capsys):
    """float32 MoE experts take the padded path, which synchronizes with the host: the capture
    fails, auto trains eagerly after one line; an explicit --mode cuda-graph is an error."""
    path = _moe_recipe(tmp_path)
    args = ["--steps", "2", "--precision", "fp32", "--device", "cuda", *FAST]
    assert main(["train", path, "--out", str(tmp_path / "auto"), *args]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("training mode:")]
    assert len(lines) == 1 and lines[0].startswith("training mode: eager (CUDA graph capture failed: "), err
    rows = metrics(tmp_path / "auto")
    assert [r["mode"] for r in rows] == ["eager", "eager"] and all(math.isfinite(r["loss"]) for r in rows)
    assert main(["train", path, "--out", str(tmp_path / "explicit"), "--mode", "cuda-graph", *args]) == 1
    assert "hymba train: --cuda-graph: the training step could not be captured" in capsys.readouterr().err
    # the failed captures left the device's random numbers working (cuda_graph.release_rng)
    assert torch.randint(0, 32, (2, 32), device="cuda").shape == (2, 32)


@pytest.mark.gpu
def test_gpu_ineligible_run_says_why_it_is_eager(tmp_path, capsys):
    """An objective that runs eagerly: the forward+backward stay eager, said once; the optimizer step is
    still replayed from a CUDA graph from the second step on."""
    lad = Path(__file__).resolve().parents[1] / "configs" / "ladir_tiny.yaml"
    assert main(["train", str(lad), "--out", str(tmp_path / "lad"), "--steps", "3", "--device", "cuda",
                 "--data", "chain_arith", "--ladir-stage", "vae", "--no-progress", "--warmup", "1"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("training mode:")]
    assert lines == ["training mode: eager (the ladir objective: its losses call the model several times per "
                     "step)"], err
    assert "optimizer step: replayed from a CUDA graph" in err, err
    assert all(math.isfinite(r["loss"]) for r in metrics(tmp_path / "lad"))


def _graphed_equals_eager(tmp_path, capsys, config: str, args: list[str]) -> None:  # noqa: ANN001
    """``hymba train configs/CONFIG`` on CUDA under auto: one "training mode: cuda-graph" line (the whole step
    captured, verified and replayed), and its losses equal an eager run's."""
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / config)
    args = ["--steps", "4", "--device", "cuda", *args]
    assert main(["train", recipe, "--out", str(tmp_path / "auto"), *args]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("training mode:")]
    assert len(lines) == 1 and lines[0].startswith("training mode: cuda-graph (forward+backward captured"), err
    assert main(["train", recipe, "--out", str(tmp_path / "eager"), "--mode", "eager", *args]) == 0
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "auto")
    assert len(a) == len(b) > 0
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-4 * max(1.0, abs(ra["loss"])), (ra, rb)


@pytest.mark.gpu
def test_gpu_forecast_is_graphed_and_equals_eager(tmp_path, capsys):
    """Forecasting: its whole step is captured (windows of numbers as the sample)."""
    _graphed_equals_eager(tmp_path, capsys, "forecast_tiny.yaml", ["--no-progress", "--warmup", "1"])


@pytest.mark.gpu
def test_gpu_mtp_is_graphed_and_equals_eager(tmp_path, capsys):
    """Multi-token prediction: the trunk, the prediction modules and both losses are captured whole."""
    _graphed_equals_eager(tmp_path, capsys, "mtp_tiny.yaml", FAST)


@pytest.mark.gpu
def test_gpu_block_diffusion_is_graphed_and_equals_eager(tmp_path, capsys):
    """Block diffusion: its whole step (noise draws, two-stream forward, NELBO) is captured, and its losses
    equal an eager run's (the replays draw the noise an eager run draws: they read the generator's state).
    bd_tiny's attention heads (16) keep the dense-mask SDPA; FlexAttention in the capture: the next test."""
    _graphed_equals_eager(tmp_path, capsys, "bd_tiny.yaml", FAST)


#: ``hymba train configs/bd_tiny.yaml`` with attention heads the two-stream FlexAttention path takes (head dims
#: of at least ``kernels.two_stream_attention.MIN_HEAD_DIM``, 32; bd_tiny's own 16 keep the dense-mask SDPA)
BD_FLEX_SETS = ["--set", "components.gated_attn.head_dim=32"]


def test_the_flex_block_diffusion_recipe_takes_the_flex_path(monkeypatch):
    """The recipe test_gpu_block_diffusion_with_flex_attention_is_graphed_and_equals_eager trains (bd_tiny with
    ``BD_FLEX_SETS``) sends every attention layer's two-stream call to the fast path; bd_tiny as shipped sends
    none (its head dim 16 is below ``MIN_HEAD_DIM``). The fast path is registered for the CPU here, with the
    reference standing in for FlexAttention."""
    from hymba_plus.kernels import two_stream_attention as T

    monkeypatch.setitem(dispatch._FAST, T.FAST, dispatch.FastPath(T.FAST, lambda: None, "test", device="cpu"))
    calls = []

    def stand_in(q, k, v, ts, window=None, *, enable_gqa=False):  # noqa: ANN001, ANN202
        calls.append(q.shape[-1])
        return T.reference(q, k, v, ts, window, enable_gqa=enable_gqa)

    monkeypatch.setattr(T, "flex_two_stream", stand_in)
    monkeypatch.setenv("HYMBA_KERNELS", "auto")
    path = Path(__file__).resolve().parents[1] / "configs" / "bd_tiny.yaml"
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    for sets, want in (([], []), (BD_FLEX_SETS[1::2], [32, 32])):  # bd_tiny: two GA layers
        torch.manual_seed(0)
        model = build_model(load_recipe(path, sets)).train()
        calls.clear()
        model.objective.train_forward(model, model, ids, ids)
        assert calls == want, (sets, calls)


@pytest.mark.gpu
def test_gpu_block_diffusion_with_flex_attention_is_graphed_and_equals_eager(tmp_path, capsys):
    """Block diffusion with the two-stream attention by FlexAttention (``flex_two_stream``: compiled
    flex_attention with the cached block mask) inside the captured step: bd_tiny with 32-wide attention heads
    (``BD_FLEX_SETS``) is captured whole, its losses equal an eager run's, and the fast path was asked for and
    never fell back (its status True: None had it not been asked, its error had a call failed)."""
    from hymba_plus.kernels import two_stream_attention as T

    dispatch.forget(T.FAST)  # (asked for by an earlier test in this process: this run's answer only)
    _graphed_equals_eager(tmp_path, capsys, "bd_tiny.yaml", [*FAST, *BD_FLEX_SETS])
    assert dispatch.statuses()[T.FAST] is True, dispatch.statuses()[T.FAST]


@pytest.mark.gpu
def test_gpu_capture_with_a_kept_eager_loss_names_it(tmp_path):
    """A loss kept from an eager forward with gradients: where that makes the capture fail, the
    error names it (not a host sync); after ``del`` the capture works."""
    torch.manual_seed(0)
    model = build_model(MOE).cuda().train()
    ids = torch.randint(0, 32, (2, 32), device="cuda")

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)

    with autocast():
        kept = model(ids, labels=ids).loss
    try:
        cg.GraphedStep(model, ids, ids.clone(), autocast)
    except cg.CaptureError as e:
        assert "still holds an autograd graph" in str(e) or "still hold an autograd graph" in str(e), str(e)
    del kept
    step = cg.GraphedStep(model, ids, ids.clone(), autocast)
    loss, _, _ = step(ids, ids)
    assert math.isfinite(float(loss))


@pytest.mark.gpu
def test_gpu_graphed_optimizer_step_equals_the_eager_step():
    """``GraphedOptimizer``: Muon (several shape groups, Nesterov, decay) and AdamW replayed from a
    CUDA graph give the eager step's parameters and state bit for bit, with the lr changing every
    step, gradients in the captured tensors or in new ones (copied in), and a step with a missing
    gradient left to the eager step (``replay`` is False)."""
    from hymba_plus.training.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(MOE).cuda().train()
    twin = build_model(MOE).cuda().train()
    twin.load_state_dict(model.state_dict())
    cfg = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    opt, _ = build_optimizer(model, cfg)
    ref, _ = build_optimizer(twin, cfg)
    params, tparams = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator().manual_seed(1)
    grads = [[torch.randn(p.shape, generator=gen).cuda() for p in params] for _ in range(6)]
    graphed = None
    for k, gs in enumerate(grads):
        for o in (opt, ref):
            for g in o.param_groups:
                g["lr"] = g["base_lr"] * (k + 1) / 6
        for p, tp, g in zip(params, tparams, gs):
            tp.grad = g.clone()
            if graphed is not None and k % 2:  # the captured tensors, as a replayed backward leaves them
                p.grad.copy_(g)
            else:  # new tensors
                p.grad = g.clone()
        if k == 4:
            params[0].grad = tparams[0].grad = None
        if k == 1:
            graphed = cg.GraphedOptimizer(opt, params)
        ran = graphed is not None and graphed.replay()
        assert ran == (graphed is not None and k != 4)
        if not ran:
            opt.step()
        ref.step()
        if k == 4:
            params[0].grad = torch.zeros_like(params[0])
    torch.cuda.synchronize()
    for p, tp in zip(params, tparams):
        assert torch.equal(p, tp)
    for p, tp in zip(params, tparams):
        for key, v in opt.state[p].items():
            assert torch.equal(v, ref.state[tp][key]), key
