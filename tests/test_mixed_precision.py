"""``hymba train --param-dtype bfloat16`` on one process (training/mixed.py): bf16 GEMM weights with
float32 masters train exactly as float32 weights under bf16 autocast, resume exactly, checkpoint the
masters, and refuse float32 precision in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.training.mixed import MasterWeights, compute_weights

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--precision", "bf16", "--eval-every", "3",
          "--warmup", "1", "--no-progress", "--device", "cpu"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path: Path, config: str, param_dtype: str, *extra: str) -> tuple[list[dict], dict]:
    out = tmp_path / f"{Path(config).stem}-{param_dtype}"
    common = COMMON if "forecast" not in config else [a for a in COMMON if a not in ("--seq-len", "32")]  # windows
    assert main(["train", str(ROOT / "configs" / config), "--out", str(out), "--param-dtype", param_dtype,
                 *common, *extra]) == 0
    return _metrics(out), load_file(str(out / "step-3" / "model.safetensors"))


def test_compute_weights_are_the_gemm_weights():
    """Linear weights and stacked expert matrices; not the embedding / head, norms, biases, convs or
    the token mixers' own tables; each parameter once."""
    model = build_model(ROOT / "configs" / "quad_hybrid_tiny.yaml")
    ws = compute_weights(model)
    names = {id(p): n for n, p in model.named_parameters()}
    chosen = [names[id(p)] for p in ws]
    assert len(chosen) == len(set(chosen))
    assert any(n.endswith("w_gate_up") for n in chosen)  # the MoE's experts
    assert all(n.endswith(("weight", "w_gate_up", "w_down")) for n in chosen)
    assert not any(n.startswith(("embed", "lm_head")) or "norm" in n or "conv" in n for n in chosen)
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - {id(model.lm_head.weight)}
    assert linear <= {id(p) for p in ws}


def test_master_weights_swap_collect_and_release():
    """The Parameter objects stay; the forward sees bf16 copies, the optimizer block the float32
    masters with float32 gradient sums (accumulated over backwards), and the copies follow the
    masters after the block."""
    lin = nn.Linear(8, 4, bias=False)
    p = lin.weight
    before = p.detach().clone()
    mw = MasterWeights([p])
    assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), before.bfloat16())
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    for _ in range(2):  # two micro-batches
        lin(x).float().sum().backward()
        assert p.grad.dtype == torch.bfloat16
        mw.collect()
        assert p.grad is None
    want = 2 * (torch.ones(4, 3) @ x.float()).bfloat16().float()
    with mw.full_precision():
        assert p.dtype == torch.float32 and torch.equal(p.detach(), before)
        assert p.grad.dtype == torch.float32 and torch.allclose(p.grad, want, rtol=1e-2)
        with torch.no_grad():
            p.add_(1.0)
    assert p.dtype == torch.bfloat16 and p.grad is None
    assert torch.equal(p.detach(), (before + 1.0).bfloat16())
    mw.release()
    assert p.dtype == torch.float32 and torch.equal(p.detach(), before + 1.0)


def test_a_weight_without_a_gradient_keeps_none_and_is_not_stepped():
    """A weight that got no gradient in a step (Dr.LLM's routers outside router training, LaDiR's LM in
    its flow stage) has .grad None among the masters, as a float32 weight would: the masters handed it
    a zero gradient, and weight decay and optimizer state moved it (a frozen LM drifted by 2.7e-4 in 3
    steps). Over two micro-batches a weight used in either one has its gradient."""
    torch.manual_seed(0)
    used, unused, later = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False)
    mw = MasterWeights([used.weight, unused.weight, later.weight])
    before = unused.weight.detach().float().clone()
    opt = torch.optim.AdamW([used.weight, unused.weight, later.weight], lr=0.1, weight_decay=0.5)
    x = torch.randn(4, 8).bfloat16()
    used(x).float().square().sum().backward()
    mw.collect()
    later(x).float().square().sum().backward()  # the second micro-batch: another weight
    mw.collect()
    with mw.full_precision():
        assert used.weight.grad is not None and later.weight.grad is not None and unused.weight.grad is None
        opt.step()
    assert torch.equal(unused.weight.detach().float(), before) and unused.weight not in opt.state
    used(x).float().sum().backward()  # the next step starts afresh
    mw.collect()
    with mw.full_precision():
        assert later.weight.grad is None and used.weight.grad is not None


@pytest.mark.parametrize("config,extra", [
    ("gpt_tiny.yaml", ()), ("gpt_tiny.yaml", ("--grad-accum", "2")), ("quad_hybrid_tiny.yaml", ()),
    ("hymba_tiny.yaml", ()), ("mtp_tiny.yaml", ()), ("forecast_tiny.yaml", ()),
])
def test_bf16_weights_train_bit_for_bit_like_float32_weights_under_autocast(tmp_path, config, extra):
    """Same losses, gradient norms, eval losses and checkpointed (float32 master) weights, bit for bit:
    the bf16 weight is autocast's cast of the master, and its gradient the one autocast casts back."""
    rows32, w32 = _train(tmp_path, config, "float32", *extra)
    rows16, w16 = _train(tmp_path, config, "bfloat16", *extra)
    for key in ("loss", "grad_norm", "eval_loss"):
        assert [r.get(key) for r in rows32] == [r.get(key) for r in rows16], key
    assert w32.keys() == w16.keys()
    for k in w32:
        assert w16[k].dtype == w32[k].dtype and torch.equal(w16[k], w32[k]), k
    trained = [k for k, v in w16.items() if v.dtype == torch.float32 and v.dim() >= 2 and "proj" in k]
    assert any(not torch.equal(w16[k], w16[k].bfloat16().float()) for k in trained)  # masters, not bf16 copies


def test_tied_weights_differ_only_by_bf16_gradient_sums(tmp_path):
    """A weight used several times in one forward (ETD's tied think block) has its uses' bf16
    gradients summed by autograd in bf16, where autocast's separate casts summed them in float32:
    equal to bf16 rounding of the gradient, not bit for bit (the module doc says so)."""
    rows32, _ = _train(tmp_path, "etd_tiny.yaml", "float32")
    rows16, _ = _train(tmp_path, "etd_tiny.yaml", "bfloat16")
    assert rows32[0]["loss"] == rows16[0]["loss"]  # the first forward: the same weights
    for a, b in zip(rows32, rows16):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-3)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-2)


def test_resume_with_bf16_weights_equals_the_uninterrupted_run(tmp_path):
    recipe = str(ROOT / "configs" / "gpt_tiny.yaml")
    common = ["--steps", "6", "--save-every", "3", "--eval-every", "6", "--batch-size", "2", "--seq-len", "16",
              "--warmup", "2", "--no-progress", "--device", "cpu", "--precision", "bf16", "--param-dtype", "bfloat16"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", recipe, "--out", str(a), *common]) == 0
    assert main(["train", recipe, "--out", str(b), "--stop-after", "3", *common]) == 0
    assert main(["train", recipe, "--out", str(b), "--resume", *common]) == 0
    assert [r["loss"] for r in _metrics(a)] == [r["loss"] for r in _metrics(b)]
    wa, wb = load_file(str(a / "step-6" / "model.safetensors")), load_file(str(b / "step-6" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_bf16_weights_need_bf16_precision(tmp_path, capsys):
    recipe = str(ROOT / "configs" / "gpt_tiny.yaml")
    out = tmp_path / "x"
    rc = main(["train", recipe, "--out", str(out), "--param-dtype", "bfloat16", "--precision", "fp32", "--steps", "1",
               "--device", "cpu", "--no-progress"])
    assert rc == 2  # flags that do not go together: a usage error (it was exit 1)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--param-dtype bfloat16" in err[0] and "precision fp32" in err[0]
    rc = main(["train", recipe, "--out", str(out), "--param-dtype", "bfloat16", "--steps", "1", "--device", "cpu",
               "--no-progress"])  # precision auto: float32 on a CPU
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["hymba train: --param-dtype bfloat16 needs bf16 precision (precision auto on cpu is float32): "
                   "add --precision bf16"]
    assert not (out / "step-1").exists()
    # the recipe's train: section asking for it, no flag: the recipe's setting, exit 1
    import yaml

    d = yaml.safe_load(Path(recipe).read_text())
    d["train"] = {**(d.get("train") or {}), "param_dtype": "bfloat16", "steps": 1}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(d))
    rc = main(["train", str(tmp_path / "r.yaml"), "--out", str(out), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "--param-dtype bfloat16 needs bf16 precision" in err[0], err
    assert not (out / "step-1").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_weights_in_cuda_graphs_match_autocast(tmp_path, capsys):
    """On CUDA, training with bf16 weights gives the losses of float32 weights under autocast bit for
    bit, eager and replayed from CUDA graphs (captured over the bf16 weights, whose storage never
    moves; the optimizer step over the float32 masters replayed from its own graph, as without bf16
    weights); graphed and eager differ as the trainer's graphed step does anywhere (on an H100: 1.1e-5
    relative at step 4, in both)."""
    recipe = str(ROOT / "configs" / "gpt_tiny.yaml")
    common = ["--steps", "4", "--batch-size", "4", "--seq-len", "64", "--eval-every", "4", "--no-progress",
              "--device", "cuda", "--precision", "bf16"]
    runs = {}
    for name, flags in {"autocast": ["--mode", "eager"], "bf16_eager": ["--mode", "eager", "--param-dtype", "bfloat16"],
                        "autocast_graph": ["--mode", "cuda-graph"],
                        "bf16_graph": ["--mode", "cuda-graph", "--param-dtype", "bfloat16"]}.items():
        out = tmp_path / name
        assert main(["train", recipe, "--out", str(out), *common, *flags]) == 0
        runs[name] = [r["loss"] for r in _metrics(out)]
        err = capsys.readouterr().err
        assert ("optimizer step: replayed from a CUDA graph" in err) == ("graph" in name), (name, err)
    assert runs["bf16_eager"] == runs["autocast"]
    assert runs["bf16_graph"] == runs["autocast_graph"]
    assert runs["bf16_graph"] == pytest.approx(runs["autocast"], rel=1e-3)
