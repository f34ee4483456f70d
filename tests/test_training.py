"""hymba train: optimizer split, Muon, schedules, the loop's records, resume equality,
gradient accumulation, non-finite losses, bad flags."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from hymba_plus import build_model, from_pretrained
from hymba_plus.cli import main
from hymba_plus.training.config import TrainConfig
from hymba_plus.training.optim import (
    MuonAdamW,
    adamw_foreach,
    adamw_fused,
    build_optimizer,
    fused_adamw_applies,
    muon_updates,
    newton_schulz5,
    split_params,
)
from hymba_plus.training.schedule import lr_factor
from tests.helpers import ladir_jsonl_run

TINY = {
    "name": "train-tiny",
    "model": {"vocab_size": 32, "d_model": 32, "max_seq_len": 64, "block_pattern": "GA | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "mlp": {"d_hidden": 64}},
}
FAST = ["--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--no-progress"]




def write_recipe(tmp_path: Path, recipe: dict | None = None, name: str = "tiny.yaml") -> str:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe or TINY, sort_keys=False))
    return str(p)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- optimizer


def test_split_puts_matrices_in_muon_and_the_rest_in_adamw():
    model = build_model(TINY)
    split = split_params(model)
    muon = {n for n, _ in split.muon}
    adam = {n for n, _ in split.adamw_decay + split.adamw_no_decay}
    assert "embed.weight" in adam and "meta" in adam  # the tied head is the embedding
    assert not any("lm_head" in n for n in muon)
    assert any(n.endswith("ffn.w_up.weight") for n in muon)
    assert all(p.ndim == 2 for _, p in split.muon)
    assert all("norm" in n for n, p in split.adamw_no_decay if n != "meta")  # norms (1-D) undecayed
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for _, p in split.muon + split.adamw_decay + split.adamw_no_decay) == total
    assert not split_params(model, use_muon=False).muon


def test_split_respects_no_muon_and_stacked_ffn_weights():
    from hymba_plus.core import registry

    class Fake(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)
            self.marked = nn.Linear(8, 8)
            self.marked.weight._no_muon = True
            self.table = nn.Parameter(torch.zeros(4, 8))  # a raw per-head table
            self.conv = nn.Conv1d(8, 8, 3, groups=8)

    model = Fake()
    split = split_params(model)
    assert [n for n, _ in split.muon] == ["lin.weight"]
    assert not split.muon_stacked
    if "moe" in registry.names():  # stacked expert weights [E, in, out] are orthogonalised per expert
        moe_model = build_model({**TINY, "model": {**TINY["model"], "block_pattern": "GA+moe"},
                                 "components": {"gated_attn": {"n_heads": 2}, "moe": {"n_experts": 4, "top_k": 2}}})
        stacked = split_params(moe_model).muon_stacked
        assert stacked and all(p.ndim == 3 for _, p in stacked)


def test_weight_decay_skips_tables_marked_no_weight_decay_and_ladir_splits_like_keller():
    """>= 2-D parameters decay (nanoGPT's rule) except bias / gain tables and initial states marked
    ``_no_weight_decay`` (they had been pulled to 0: Mamba-3's B/C biases start at 1, ATLAS's
    initial memory and feature coefficients, LaDiR's slots and marks); LaDiR's latent input and
    output layers take AdamW and its denoiser's packed attention input matrix Muon (Keller
    Jordan's rule, as ts_head)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    split = split_params(build_model(root / "quad_hybrid_tiny.yaml"))
    decay = {n for n, _ in split.adamw_decay}
    undecayed = {n for n, _ in split.adamw_no_decay}
    for part in ("mixer.B_bias", "mixer.C_bias", "mixer.poly_coef", "mixer.memory.0"):
        assert any(n.endswith(part) for n in undecayed) and not any(n.endswith(part) for n in decay), part
    assert "embed.weight" in decay
    lad = split_params(build_model(root / "ladir_tiny.yaml"))
    muon = {n for n, _ in lad.muon}
    assert "ladir.denoiser.stack.layers.0.self_attn.in_proj_weight" in muon
    assert not any(k in n for n in muon for k in ("denoiser.inp", "denoiser.out.", "to_stats", "from_latent"))
    assert {"ladir.memory", "ladir.marks", "ladir.denoiser.slot", "ladir.denoiser.pos"} <= {
        n for n, _ in lad.adamw_no_decay}


def test_newton_schulz_orthogonalises_and_batches_per_matrix():
    torch.manual_seed(0)
    g = torch.randn(3, 16, 32)
    o = newton_schulz5(g)
    s = torch.linalg.svdvals(o)
    assert float(s.min()) > 0.5 and float(s.max()) < 1.3  # NS5's quintic lands in ~[0.7, 1.2]
    for e in range(3):
        assert torch.allclose(o[e], newton_schulz5(g[e]), atol=1e-5)
    tall = newton_schulz5(g[0].T)
    assert torch.allclose(tall, o[0].T, atol=1e-5)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
def test_muon_updates_share_one_iteration_between_tall_and_wide_matrices(device):
    """``muon_updates`` puts a [r, c] and a [c, r] matrix (and stacked ones of the same turned shape)
    in one batched Newton-Schulz: the same results as one matrix at a time, scaled by
    sqrt(max(1, fan_out / fan_in)) for the layout, in the asked dtype, contiguous (the multi-tensor
    updates after it need that for their fast path)."""
    torch.manual_seed(0)
    shapes = [(24, 8), (8, 24), (8, 8), (24, 8), (3, 8, 24)]
    us = [torch.randn(s, device=device) for s in shapes]
    dtypes = [torch.float32, torch.float32, torch.float64, torch.float32, torch.float32]
    for layout in ("out_in", "in_out"):
        outs = muon_updates(us, layout, 5, dtypes)
        for u, o, dt in zip(us, outs, dtypes):
            fan_out, fan_in = u.shape[-2:] if layout == "out_in" else u.shape[-2:][::-1]
            want = newton_schulz5(u).float() * math.sqrt(max(1.0, fan_out / fan_in))  # bf16 on CUDA
            assert o.shape == u.shape and o.dtype == dt and o.is_contiguous()
            assert torch.allclose(o.float(), want, atol=1e-5 if device == "cpu" else 2e-2)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_adamw_equals_the_foreach_update(device):
    """The fused AdamW kernel (``torch._fused_adamw_``, taken on CUDA and the CPU) and the foreach
    update (where it does not apply) give the same steps: several tensors, weight decay, the lr
    changing every step; where each applies is ``fused_adamw_applies``."""
    torch.manual_seed(0)
    shapes = [(5, 3), (7,), (2, 4, 3)]
    z = dict(device=device)
    ps = {"fused": [torch.randn(s, **z) for s in shapes]}
    ps["foreach"] = [p.clone() for p in ps["fused"]]
    state = {k: ([torch.zeros(s, **z) for s in shapes], [torch.zeros(s, **z) for s in shapes],
                 [torch.zeros((), **z) for _ in shapes]) for k in ps}
    for k in range(5):
        grads = [torch.randn(s, **z) for s in shapes]
        lr = torch.tensor(1e-2 * (k + 1), **z)
        for name, fn in (("fused", adamw_fused), ("foreach", adamw_foreach)):
            m, v, steps = state[name]
            torch._foreach_add_(steps, 1.0)
            fn(ps[name], [g.clone() for g in grads], m, v, steps, lr=lr, b1=0.9, b2=0.95, wd=0.1, eps=1e-8)
    for a, b in zip(ps["fused"], ps["foreach"]):
        assert torch.allclose(a, b, atol=1e-6)
    dev, one = torch.device(device), torch.tensor(1.0, **z)
    assert fused_adamw_applies(dev, torch.float32, torch.float32, one)
    assert not fused_adamw_applies(dev, torch.bfloat16, torch.float32, one)  # gradients of another dtype
    assert not fused_adamw_applies(torch.device("meta"), torch.float32, torch.float32, one)


def test_muon_step_matches_the_reference_update():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(12, 6))
    g = torch.randn(12, 6)
    opt = MuonAdamW([{"params": [w], "use_muon": True, "lr": 0.1, "momentum": 0.9}])
    w0 = w.detach().clone()
    w.grad = g.clone()
    opt.step()
    m = 0.1 * g  # m = lerp(0, g, 1 - beta)
    u = g + 0.9 * (m - g)  # Nesterov
    ref = w0 - 0.1 * math.sqrt(12 / 6) * newton_schulz5(u)
    assert torch.allclose(w.detach(), ref, atol=1e-6)


def test_adamw_groups_match_torch_adamw():
    """AdamW groups give torch.optim.AdamW's updates. The step multiplies by each group's lr as a
    device tensor, refreshed from ``group["lr"]`` every step (what a CUDA-graph replay needs): the lr
    changes every step here, and a state dict's CPU step counts (a checkpoint's) are taken over."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(5, 3))
    b = nn.Parameter(a.detach().clone())
    mine = MuonAdamW([{"params": [a], "lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}])
    ref = torch.optim.AdamW([b], lr=0.01, betas=(0.9, 0.95), weight_decay=0.1, eps=1e-8)
    for k in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = g.clone(), g.clone()
        mine.param_groups[0]["lr"] = ref.param_groups[0]["lr"] = 0.01 * (k + 1) / 4
        mine.step()
        ref.step()
        if k == 1:  # a round trip through a state dict, its step counts on the CPU as saved
            sd = mine.state_dict()
            mine = MuonAdamW([{"params": [a], "lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}])
            mine.load_state_dict(sd)
    assert torch.allclose(a, b, atol=1e-6)
    assert float(mine.lr_tensors[0]) == pytest.approx(0.01) and float(mine.state[a]["step"]) == 4


def test_a_group_added_later_is_stepped_like_one_given_at_construction():
    """``add_param_group`` (torch's API, e.g. a layer unfrozen mid-run) gives the group its kind's
    defaults and its own lr tensor: it steps as if given to the constructor (the lr tensors were
    made once in ``__init__``, so the first step after an added group failed with an IndexError)."""
    torch.manual_seed(0)
    w, b = nn.Parameter(torch.randn(6, 4)), nn.Parameter(torch.randn(4, 3))
    w2, b2 = nn.Parameter(w.detach().clone()), nn.Parameter(b.detach().clone())
    b0 = b.detach().clone()
    late = MuonAdamW([{"params": [w], "use_muon": True, "lr": 0.05, "weight_decay": 0.1}])
    late.add_param_group({"params": [b], "lr": 0.01, "weight_decay": 0.1})
    once = MuonAdamW([{"params": [w2], "use_muon": True, "lr": 0.05, "weight_decay": 0.1},
                      {"params": [b2], "lr": 0.01, "weight_decay": 0.1}])
    for k in range(3):
        gw, gb = torch.randn(6, 4), torch.randn(4, 3)
        w.grad, b.grad, w2.grad, b2.grad = gw.clone(), gb.clone(), gw.clone(), gb.clone()
        for opt in (late, once):
            for g in opt.param_groups:
                g["lr"] = g["base_lr"] * (k + 1) / 3
            opt.step()
    assert len(late.lr_tensors) == 2 and not torch.equal(b.detach(), b0)
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_adamw_with_transposed_tensors_matches_torch_adamw():
    """The fused kernel walks a parameter, its gradient and moments as flat memory: a transposed
    parameter, a gradient of another layout, and moments restored contiguous from a state dict (as a
    checkpoint saves them) go to the foreach update, which gives torch.optim.AdamW's steps (the fused
    kernel was 0.27-0.55 off here)."""
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(3, 5).t())  # [5, 3], not contiguous
    b = nn.Parameter(a.detach().clone())
    cfg = {"lr": 0.01, "betas": (0.9, 0.95), "weight_decay": 0.1}
    mine = MuonAdamW([{"params": [a], **cfg}])
    ref = torch.optim.AdamW([b], eps=1e-8, foreach=False, **cfg)
    for k in range(4):
        g = torch.randn(5, 3)
        a.grad, b.grad = (g.t().contiguous().t() if k % 2 else g.clone()), g.clone()
        mine.step()
        ref.step()
        if k == 1:
            sd = mine.state_dict()
            for st in sd["state"].values():
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].contiguous(), st["exp_avg_sq"].contiguous()
            mine = MuonAdamW([{"params": [a], **cfg}])
            mine.load_state_dict(sd)
    assert torch.allclose(a, b, atol=1e-6)


def test_build_optimizer_groups():
    model = build_model(TINY)
    opt, split = build_optimizer(model, TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05))
    kinds = {g["kind"]: g["lr"] for g in opt.param_groups}
    assert kinds["muon"] == 0.05 and kinds["adamw"] == 1e-3
    opt, _ = build_optimizer(model, TrainConfig(optimizer="adamw"))
    assert not any(g["use_muon"] for g in opt.param_groups)


def test_schedules():
    f = [lr_factor(s, 100, 10, "cosine", 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(x >= y - 1e-12 for x, y in zip(f[10:], f[11:]))  # monotone decay
    w = [lr_factor(s, 100, 10, "wsd", 0.0, decay_frac=0.2) for s in range(100)]
    assert w[50] == 1.0 and w[79] == 1.0 and w[80] < 1.0 and w[-1] == pytest.approx(0.0)
    assert lr_factor(50, 100, 10, "constant") == 1.0
    # one step after the warm-up is the last: it ends the cosine at min_frac, not at the peak
    assert [lr_factor(s, 4, 3, "cosine", 0.1) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 0.1])


# --------------------------------------------------------------------------- the loop


def test_train_writes_metrics_plot_checkpoints_and_summary(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "run"
    rc = main(["train", recipe, "--out", str(out), "--steps", "6", "--eval-every", "3", "--save-every", "2",
               "--keep-last", "2", *FAST])
    assert rc == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    for r in rows:
        assert {"step", "loss", "lr", "tokens_per_s", "muon_lr", "grad_norm"} <= set(r)
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert "eval_accuracy" in rows[2] and "eval_loss" in rows[5] and "eval_accuracy" not in rows[3]
    assert (out / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-4", "step-6"]
    model = from_pretrained(out / "step-6")
    assert json.loads((out / "step-6" / "tokenizer.json").read_text())["hymba_tokenizer"] == "ids"
    assert model.config.vocab_size == 32
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("done: 6 steps") and "eval_accuracy" in last and "tokens/s" in last


def test_resume_equals_uninterrupted_run(tmp_path):
    """A run stopped at step 30 of 40 and resumed ends with exactly the uninterrupted losses."""
    recipe = write_recipe(tmp_path)
    common = ["--steps", "40", "--save-every", "10", "--eval-every", "20", "--batch-size", "2", "--seq-len", "16",
              "--warmup", "5", "--no-progress"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", recipe, "--out", str(a), *common]) == 0
    assert main(["train", recipe, "--out", str(b), "--stop-after", "30", *common]) == 0
    assert [r["step"] for r in metrics(b)][-1] == 30
    assert main(["train", recipe, "--out", str(b), "--resume", *common]) == 0
    la, lb = [r["loss"] for r in metrics(a)], [r["loss"] for r in metrics(b)]
    assert len(la) == len(lb) == 40
    diff = max(abs(x - y) for x, y in zip(la, lb))
    print(f"resume equality: max |loss diff| over 40 steps = {diff:.3g}")
    assert diff <= 1e-6
    wa, wb = from_pretrained(a / "step-40").state_dict(), from_pretrained(b / "step-40").state_dict()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) <= 1e-6


@pytest.mark.parametrize("recipe,extra", [
    ("etd_drllm_tiny.yaml", []),  # its layer routers get no gradient while all-execute
    ("ladir_tiny.yaml", ["--data", "chain_arith", "--ladir-stage", "vae"]),  # the denoiser gets none in vae
])
def test_resume_with_parameters_that_never_had_a_gradient(tmp_path, recipe, extra):
    """A parameter with no gradient has no optimizer state in the checkpoint: --resume loaded the state
    strictly and stopped ("Missing optimizer state for parameter ..."); it now resumes exactly."""
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / recipe)
    common = ["--steps", "4", "--device", "cpu", "--batch-size", "2", "--seq-len", "32", "--warmup", "2",
              "--no-progress", *extra]
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", cfg, "--out", str(a), *common]) == 0
    assert main(["train", cfg, "--out", str(b), "--stop-after", "2", *common]) == 0
    assert main(["train", cfg, "--out", str(b), "--resume", *common]) == 0
    assert [r["loss"] for r in metrics(a)] == [r["loss"] for r in metrics(b)]
    wa, wb = from_pretrained(a / "step-4").state_dict(), from_pretrained(b / "step-4").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_refuses_another_split_of_the_text(tmp_path, capsys):
    """Resuming with another --val-frac (or --seq-len, or changed text) would train on windows the first
    run held out: refused, naming what differs."""
    text = tmp_path / "t.txt"
    text.write_text("".join(f"line {i} of some text to cut into windows\n" for i in range(400)))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")  # a byte vocabulary
    common = ["--data", str(text), "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--no-progress",
              "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--stop-after", "2", *common]) == 0
    capsys.readouterr()
    assert main(["train", recipe, "--out", str(out), "--resume", "--val-frac", "0.5", *common]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "was trained on another split of it (n_train" in err[0] and "--val-frac" in err[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-2"]


def test_resume_refuses_another_seq_len_of_the_text_with_as_many_training_windows(tmp_path, capsys):
    """1287 tokens cut into 32-token windows (40: 38 train, 2 held out) or 33-token ones (39: 38 train, 1 held
    out): n_train alone did not tell the splits apart, and the resumed run trained on held-out tokens."""
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(97 + i * 7 % 26 for i in range(1287)))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")  # a byte vocabulary
    common = ["--data", str(text), "--steps", "4", "--batch-size", "2", "--no-progress", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--stop-after", "2", "--seq-len", "32", *common]) == 0
    capsys.readouterr()
    assert main(["train", recipe, "--out", str(out), "--resume", "--seq-len", "33", *common]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another split of it (seq_len 32 there, 33 now)" in err[0]


def test_a_refused_resume_with_more_steps_prints_only_the_refusal(tmp_path, capsys):
    """A resume that re-plans the schedule (a larger --steps) but is refused for its data printed
    `schedule re-planned at step 2 ...` before the refusal: two lines, the first saying something had
    happened that had not. The re-plan is said once the run goes on, after `resumed from`."""
    text = tmp_path / "t.txt"
    text.write_bytes(bytes(97 + i * 7 % 26 for i in range(1287)))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")  # a byte vocabulary
    common = ["--data", str(text), "--batch-size", "2", "--no-progress", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", recipe, "--out", str(out), "--steps", "2", "--seq-len", "32", *common]) == 0
    capsys.readouterr()
    assert main(["train", recipe, "--out", str(out), "--resume", "--steps", "4", "--seq-len", "33", *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "another split of it (seq_len 32 there, 33 now)" in err[0], err
    assert main(["train", recipe, "--out", str(out), "--resume", "--steps", "3", "--seq-len", "32", *common]) == 0
    err = capsys.readouterr().err.splitlines()
    resumed = next(i for i, line in enumerate(err) if line.startswith("resumed from"))
    assert err[resumed + 1].startswith("schedule re-planned at step 2 (steps 2 -> 3)"), err


def test_grad_accumulation_matches_a_bigger_batch(tmp_path):
    recipe = write_recipe(tmp_path)
    common = ["--steps", "3", "--seq-len", "16", "--warmup", "1", "--no-progress"]
    assert main(["train", recipe, "--out", str(tmp_path / "big"), "--batch-size", "4", *common]) == 0
    assert main(["train", recipe, "--out", str(tmp_path / "acc"), "--batch-size", "2", "--grad-accum", "2",
                 *common]) == 0
    la = [r["loss"] for r in metrics(tmp_path / "big")]
    lb = [r["loss"] for r in metrics(tmp_path / "acc")]
    assert max(abs(x - y) for x, y in zip(la, lb)) < 1e-5


def test_grad_accumulation_logs_the_whole_steps_routing_statistics(tmp_path):
    """With --grad-accum the MoE statistics are the step's, not the last micro-batch's: assignments per
    expert summed (the same as one batch of the same rows), the rest averaged."""
    moe = {**TINY, "model": {**TINY["model"], "block_pattern": "GA+moe | GA"},
           "components": {**TINY["components"], "moe": {"n_experts": 4, "top_k": 2, "d_expert": 32}}}
    recipe = write_recipe(tmp_path, moe)
    common = ["--steps", "1", "--seq-len", "16", "--warmup", "1", "--no-progress"]
    assert main(["train", recipe, "--out", str(tmp_path / "big"), "--batch-size", "4", *common]) == 0
    assert main(["train", recipe, "--out", str(tmp_path / "acc"), "--batch-size", "2", "--grad-accum", "2",
                 *common]) == 0
    big, acc = metrics(tmp_path / "big")[0], metrics(tmp_path / "acc")[0]
    counts = [k for k in big if k.endswith("tokens_per_expert")]
    assert counts and all(big[k] == pytest.approx(acc[k]) for k in counts)
    assert sum(acc[counts[0]]) == 4 * (16 + 2) * 2  # rows x (tokens + meta tokens) x top_k
    assert acc[counts[0].replace("tokens_per_expert", "entropy")] > 0


def test_a_warmup_longer_than_the_run_is_said(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    common = ["--steps", "2", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--lr", "0.01"]
    assert main(["train", recipe, "--out", str(tmp_path / "a"), "--warmup", "8", *common]) == 0
    out = capsys.readouterr().err
    assert "warmup 8 (longer than the run's 2 steps: the lr rises to 0.25 of its peak 0.01)" in out
    assert [r["lr"] for r in metrics(tmp_path / "a")] == pytest.approx([0.01 / 8, 0.01 / 4])
    assert main(["train", recipe, "--out", str(tmp_path / "b"), "--warmup", "2", *common]) == 0
    assert "longer than the run" not in capsys.readouterr().err


@pytest.mark.parametrize("data", ["selective_copy", "parity"])
def test_other_tasks_train_with_accuracy(tmp_path, data):
    recipe = write_recipe(tmp_path)
    out = tmp_path / data
    assert main(["train", recipe, "--out", str(out), "--data", data, "--steps", "2", *FAST]) == 0
    assert 0.0 <= metrics(out)[-1]["eval_accuracy"] <= 1.0


def test_non_finite_loss_stops_and_keeps_the_good_checkpoint(tmp_path, monkeypatch, capsys):
    from hymba_plus.models import lm

    recipe = write_recipe(tmp_path)
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = lm.HybridLM.hidden_lm_loss  # the training step's (fused) next-token loss

    def poisoned(self, h, labels, attention_mask=None):
        calls["n"] += 1
        loss = real(self, h, labels, attention_mask)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(lm.HybridLM, "hidden_lm_loss", poisoned)
    rc = main(["train", recipe, "--out", str(out), "--steps", "8", "--save-every", "2", "--eval-every", "100", *FAST])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith("hymba train:")]
    assert len(line) == 1 and "step 5: loss is nan" in line[0] and "step-4" in line[0]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-2", "step-4"]
    monkeypatch.setattr(lm.HybridLM, "hidden_lm_loss", real)
    from_pretrained(out / "step-4")
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.parametrize("clip", ["1.0", "0"])
def test_non_finite_gradients_stop_the_run_with_or_without_clipping(tmp_path, monkeypatch, capsys, clip):
    """A finite loss with NaN gradients stops before the optimizer step, also with --grad-clip 0 (no
    clipping, the norm still read): before, that run applied the NaN update and saved it as step-4."""
    from hymba_plus.models import lm

    recipe = write_recipe(tmp_path)
    out = tmp_path / "nan"
    calls = {"n": 0}
    real = lm.HybridLM.hidden_lm_loss

    def poisoned(self, h, labels, attention_mask=None):
        calls["n"] += 1
        loss = real(self, h, labels, attention_mask)
        # d sqrt(x) / dx at 0 is inf, times 0: the loss stays finite, its gradients are NaN
        return loss + 0 * torch.sqrt(h.abs().sum() * 0) if calls["n"] > 4 else loss

    monkeypatch.setattr(lm.HybridLM, "hidden_lm_loss", poisoned)
    rc = main(["train", recipe, "--out", str(out), "--steps", "8", "--save-every", "2", "--eval-every", "100",
               "--grad-clip", clip, *FAST])
    err = capsys.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("hymba train:")]
    assert rc == 1 and len(line) == 1 and "step 5: gradient norm is nan" in line[0] and "step-4" in line[0]
    monkeypatch.setattr(lm.HybridLM, "hidden_lm_loss", real)
    assert all(torch.isfinite(p).all() for p in from_pretrained(out / "step-4").parameters())


def test_update_bias_is_called_after_every_optimizer_step(tmp_path):
    from hymba_plus.core.recipe import load_recipe
    from hymba_plus.training.trainer import RunOptions, Trainer

    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def update_bias(self):
            self.calls += 1

    tr = Trainer(load_recipe(TINY), TrainConfig(steps=3, batch_size=2, seq_len=16, warmup_steps=1),
                 RunOptions(out=tmp_path / "ub", progress=False))
    tr.setup()
    tr.model.blocks[0].counter = Counter()
    for step in range(3):
        tr.train_step(step)
    assert tr.model.blocks[0].counter.calls == 3


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    cases = [
        (["--seq-len", "100"], 2, "--seq-len 100"),  # longer than max_seq_len 64
        (["--steps", "0"], 2, "--steps 0"),
        (["--data", "mqar", "--seq-len", "2"], 2, "--data mqar"),
        (["--data", str(tmp_path / "missing.txt")], 1, "missing.txt: no such file"),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--device", "cuda:99"], 2, "--device"),
        (["--stop-after", "9", "--steps", "3"], 2, "--stop-after 9"),  # (both were exit 1)
    ]
    for flags, code, needle in cases:
        rc = main(["train", recipe, "--out", str(tmp_path / "o"), *FAST, *flags])
        err = capsys.readouterr().err
        assert rc == code, (flags, err)
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and needle in err, (flags, err)
    assert not list((tmp_path / "o").glob("step-*")) if (tmp_path / "o").exists() else True
    rc = main(["train", str(tmp_path / "nope.yaml")])
    assert rc == 1 and "nope.yaml" in capsys.readouterr().err


def test_unwritable_out_is_a_one_line_error(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    rc = main(["train", recipe, "--out", str(blocker / "run"), *FAST, "--steps", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "--out" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert blocker.read_text() == "not a folder"


def test_recipe_train_section_gives_defaults(tmp_path):
    recipe = dict(TINY, train={"steps": 2, "batch_size": 2, "seq_len": 16, "warmup_steps": 1, "optimizer": "adamw",
                               "data": "parity", "eval_every": 1})
    path = write_recipe(tmp_path, recipe)
    out = tmp_path / "sec"
    assert main(["train", path, "--out", str(out), "--no-progress"]) == 0
    rows = metrics(out)
    assert len(rows) == 2 and "muon_lr" not in rows[0] and "eval_accuracy" in rows[0]
    state = json.loads((out / "step-2" / "trainer_state.json").read_text())
    assert state["train_config"]["data"] == "parity" and state["train_config"]["optimizer"] == "adamw"


def test_train_section_is_checked_on_the_keys_it_sets(tmp_path, capsys):
    """A `train:` section that sets a few keys loads although a default it leaves (seq_len 128)
    does not fit the model (max_seq_len 64); `hymba train` checks the effective settings, and an
    unfitting default says it is one and how to set it. A key the recipe sets is checked at load."""
    from hymba_plus.core.recipe import RecipeError, load_recipe

    few = write_recipe(tmp_path, dict(TINY, train={"tf32": True, "steps": 1}), "few.yaml")
    assert load_recipe(few).train.tf32 is True
    assert main(["train", few, "--out", str(tmp_path / "a"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "train.seq_len" in err and "(the default: set --seq-len or train.seq_len)" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "a").exists()
    assert main(["train", few, "--out", str(tmp_path / "b"), *FAST]) == 0
    capsys.readouterr()
    with pytest.raises(RecipeError, match=r"few\.yaml:\d+: train\.seq_len: must be <= model\.max_seq_len"):
        load_recipe(write_recipe(tmp_path, dict(TINY, train={"seq_len": 128}), "few.yaml"))


def test_time_limit_ends_the_run_with_an_eval_and_a_checkpoint(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    out = tmp_path / "tl"
    assert main(["train", recipe, "--out", str(out), "--steps", "5", "--time-limit", "0.001", *FAST]) == 0
    cap = capsys.readouterr()
    assert "done: 1 of 5 steps" in cap.out and "--time-limit" in cap.err
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1] and "eval_accuracy" in rows[0]
    assert [p.name for p in out.glob("step-*")] == ["step-1"]
    assert main(["train", recipe, "--out", str(out), "--steps", "5", "--resume", *FAST]) == 0
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4, 5]
    assert main(["train", recipe, "--out", str(out), "--time-limit", "0", *FAST]) == 2


def test_moe_recipe_records_aux_loss_and_routing_stats(tmp_path):
    recipe = dict(TINY, model={**TINY["model"], "block_pattern": "GA | GA+moe"},
                  components={**TINY["components"], "moe": {"n_experts": 4, "top_k": 2, "bias_update_rate": 0.01}})
    out = tmp_path / "moe"
    assert main(["train", write_recipe(tmp_path, recipe), "--out", str(out), "--steps", "3", *FAST]) == 0
    row = metrics(out)[-1]
    assert row["aux_loss"] > 0
    assert any(k.startswith("moe/1/") for k in row) and isinstance(row["moe/1/tokens_per_expert"], list)
    bias = from_pretrained(out / "step-3").blocks[1].ffn.expert_bias
    assert float(bias.abs().sum()) > 0  # update_bias ran after each step (3 steps of +-rate cannot cancel)


def test_demo_recipe_uses_every_component_and_is_valid():
    from hymba_plus.core.recipe import load_recipe
    from hymba_plus.demo import demo_recipe

    r = load_recipe(demo_recipe())
    used = {s.mixer for s in r.layers} | {s.ffn for s in r.layers}
    assert {"gated_attn"} <= used
    from hymba_plus.core import registry

    for name in ("atlas", "mamba3", "gdn", "moe"):
        assert (name in used) == (name in registry.names())
    assert r.train.data == "mqar" and r.train.seq_len <= r.model.max_seq_len


@pytest.mark.parametrize("flag,value,says", [
    ("--steps", "0", "--steps 0: must be >= 1"),
    # as `hymba train`'s: --time-limit 0 (or negative) stopped after one step, nan never
    ("--time-limit", "0", "--time-limit 0: must be > 0"), ("--time-limit", "-5", "--time-limit -5: must be > 0"),
    ("--time-limit", "nan", "--time-limit: must be a finite number, got 'nan'"),
    ("--seed", "-1", "--seed: must be in 0 .. "),  # was a RecipeError traceback after removing the run
    ("--new-tokens", "0", "--new-tokens 0: must be >= 1"),
])
def test_demo_refuses_bad_flags_before_touching_out(tmp_path, capsys, flag, value, says):
    """`python -m hymba_plus.demo --steps 0` removed the previous demo run in --out, then stopped with a
    RecipeError traceback (train.steps, train.save_every); its flags are checked as `hymba train`'s."""
    from hymba_plus.demo import main as demo_main

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "demo.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        demo_main(["--no-tour", "--out", str(tmp_path / "demo"), flag, value])
    assert e.value.code == 2 and says in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == ["demo.json"]


@pytest.mark.slow
def test_demo_trains_recall_far_above_chance(tmp_path, capsys):
    from hymba_plus.demo import main as demo_main

    rc = demo_main(["--no-tour", "--out", str(tmp_path / "demo"), "--steps", "150"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert (tmp_path / "demo" / "loss.png").is_file()
    final = [json.loads(x) for x in (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["eval_accuracy"] > 0.5  # chance 1/16


@pytest.mark.slow
@pytest.mark.parametrize("flag", [["--compile"], ["--compile-mode", "reduce-overhead"]])
def test_compile_flag_trains_and_saves_a_loadable_checkpoint(tmp_path, flag):
    out = tmp_path / "compiled"
    assert main(["train", write_recipe(tmp_path), "--out", str(out), "--steps", "2", *flag, *FAST]) == 0
    assert math.isfinite(metrics(out)[-1]["loss"])
    from_pretrained(out / "step-2")  # saved from the module, not the compiled wrapper


def test_compile_mode_must_be_known(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", write_recipe(tmp_path), "--compile-mode", "fastest"])
    assert e.value.code != 0 and "--compile-mode" in capsys.readouterr().err


# --------------------------------------------------------------------------- CUDA graphs


def test_cuda_graph_flag_errors_are_one_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path)
    assert main(["train", recipe, "--out", str(tmp_path / "g"), "--cuda-graph", "--device", "cpu", *FAST]) == 2
    err = capsys.readouterr().err
    assert "--cuda-graph needs a CUDA device" in err and "Traceback" not in err
    assert not list((tmp_path / "g").glob("step-*"))
    assert main(["train", recipe, "--out", str(tmp_path / "h"), "--cuda-graph", "--compile", *FAST]) == 2
    assert "instead of --compile" in capsys.readouterr().err


def test_grad_accumulator_sums_micro_steps_into_its_own_buffers():
    from hymba_plus.training.cuda_graph import GradAccumulator

    p, q = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    static = torch.zeros(3)  # a replay's static gradient buffer, which p.grad aliases
    acc = GradAccumulator()
    for k in (1.0, 2.0):
        static.fill_(k)
        p.grad = static
        acc.take([p, q])  # q got no gradient: left alone
        assert p.grad is None
    static.fill_(100.0)  # the next replay overwrites the static buffer
    acc.restore()
    assert torch.equal(p.grad, torch.full((3,), 3.0)) and q.grad is None


@pytest.mark.gpu
def test_gpu_cuda_graph_training_matches_eager(tmp_path):
    """--cuda-graph replays the same kernels: the losses of a few steps (MoE with
    aux-loss-free balancing, gradient accumulation) match an eager run's."""
    recipe = dict(TINY, model={**TINY["model"], "block_pattern": "GA | GA+moe"},
                  components={**TINY["components"], "moe": {"n_experts": 4, "top_k": 2, "bias_update_rate": 0.01}})
    path = write_recipe(tmp_path, recipe)
    args = ["--steps", "4", "--grad-accum", "2", "--precision", "bf16", "--device", "cuda", *FAST]
    assert main(["train", path, "--out", str(tmp_path / "eager"), "--mode", "eager", *args]) == 0
    assert main(["train", path, "--out", str(tmp_path / "graph"), "--cuda-graph", *args]) == 0
    a, b = metrics(tmp_path / "eager"), metrics(tmp_path / "graph")
    assert {r["mode"] for r in a} == {"eager"} and {r["mode"] for r in b} == {"cuda-graph"}
    for ra, rb in zip(a, b):
        assert abs(ra["loss"] - rb["loss"]) < 1e-3 * abs(ra["loss"]), (ra, rb)
        assert sum(ra["moe/1/tokens_per_expert"]) == sum(rb["moe/1/tokens_per_expert"]) > 0


def test_run_rate_leaves_out_the_warm_up_steps():
    from hymba_plus.training.trainer import _rate

    assert _rate(5, 100, 10.0 + 4 * 0.5, [10.0]) == 4 * 100 / 2.0  # first step paid 10 s of compiles
    # and the second captured the optimizer step's CUDA graph
    assert _rate(5, 100, 10.0 + 1.0 + 3 * 0.5, [10.0, 1.0]) == 3 * 100 / 1.5
    assert _rate(1, 100, 2.0, [2.0]) == 50.0  # one step: nothing to leave out
    assert _rate(2, 100, 4.0, [2.0, 2.0]) == 50.0


def test_a_steps_numbers_are_read_in_one_transfer(monkeypatch):
    """``trainer._read_step``: the step's 0-d values (None kept) and its routing statistics (scalars of any
    shape as floats, short vectors as lists rounded to 6 digits, Python numbers as floats; bools, long
    vectors and matrices left out) come back as before, from one ``tolist`` of one concatenated tensor."""
    from hymba_plus.training import trainer as trainer_mod

    calls = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: (calls.append(self.shape), real(self))[1])
    loss = torch.tensor(2.5, dtype=torch.float64, requires_grad=False)
    norm = torch.tensor(0.75)
    stats = {"lb": torch.tensor([[0.125]], requires_grad=True), "load": torch.tensor([1.0, 2.0 / 3.0]),
             "count": torch.tensor(7), "empty": torch.zeros(0), "k": 3, "flag": True,
             "long": torch.zeros(65), "mat": torch.zeros(2, 2)}
    (a, b, c), row = trainer_mod._read_step([loss, None, norm], stats)
    assert (a, b, c) == (2.5, None, 0.75)
    assert row == {"lb": 0.125, "load": [1.0, 0.666667], "count": 7.0, "empty": [], "k": 3.0}
    assert calls == [torch.Size([6])]
    assert trainer_mod._read_step([None], None) == ([None], {})


def test_text_eval_counts_each_held_out_window_once(tmp_path):
    """An eval batch that wraps around the held-out windows (5 windows, batch 4: the second batch has
    one distinct row and three repeats) scores each window once: eval_loss is the mean over the 5
    windows, whatever the batch size (it was 4.5054 against 4.5099 in the reviewer's run)."""
    import random

    from hymba_plus import load_recipe
    from hymba_plus.training.trainer import RunOptions, Trainer

    recipe = load_recipe({**TINY, "model": {**TINY["model"], "vocab_size": 256}})
    text = tmp_path / "c.txt"
    text.write_text("".join(random.Random(0).choice("abcdefgh ") for _ in range(16 * 50)))
    got = {}
    for bs in (4, 5, 2):
        cfg = TrainConfig(steps=1, batch_size=bs, seq_len=16, warmup_steps=1, data=str(text), val_frac=0.1,
                          eval_batches=8)
        tr = Trainer(recipe, cfg, RunOptions(out=tmp_path / f"b{bs}", progress=False))
        tr.setup()
        assert tr.stream.n_val == 5
        got[bs] = tr.evaluate()["eval_loss"]
        with torch.no_grad():
            tr.model.eval()
            b = tr.stream.eval(range(5))
            want = sum(float(tr.model.lm_loss(tr.model(b.input_ids[i:i + 1]).logits, b.labels[i:i + 1]))
                       for i in range(5)) / 5
        assert got[bs] == pytest.approx(want, rel=1e-5), (bs, got[bs], want)



def test_eval_loss_of_block_diffusion_is_the_mean_over_scored_tokens(tmp_path):
    """``eval_loss`` weighs each held-out batch by its scored items (``Objective.eval_weight``, the
    ``train_items`` of its scored labels): block diffusion's NELBO is a mean over the scored tokens
    (whichever the levels mask), so a batch weighs its scored tokens, the repeats of a batch that
    wraps around the held-out windows left out; here as its distinct rows (every token of a text
    window is scored)."""
    import random

    from hymba_plus import load_recipe
    from hymba_plus.training.trainer import RunOptions, Trainer

    text = tmp_path / "c.txt"
    text.write_text("".join(random.Random(0).choice("abcdefgh ") for _ in range(16 * 50)))
    recipe = load_recipe(Path(__file__).resolve().parents[1] / "configs" / "bd_tiny.yaml")
    cfg = TrainConfig(steps=1, batch_size=4, seq_len=16, warmup_steps=1, data=str(text), val_frac=0.1,
                      eval_batches=8)
    tr = Trainer(recipe, cfg, RunOptions(out=tmp_path / "bd", progress=False))
    tr.setup()
    got = tr.evaluate()["eval_loss"]
    parts = []
    with torch.no_grad():
        for start in (0, 4):  # 5 held-out windows: 4, then 1 and 3 repeats
            b = tr.stream.eval(range(start, start + 4))
            labels = b.scored_labels()
            loss, _, scored, out = tr.objective.eval_batch(tr.fwd, tr.model, b.input_ids, labels, seed=start, batch=b)
            assert tr.objective.eval_weight(out, b.input_ids, labels, b) == b.rows * 16
            parts.append((loss, b.rows, scored))
    assert [r for _, r, _ in parts] == [4, 1] and parts[0][2] != 4 * parts[1][2]
    assert got == pytest.approx(sum(v * r for v, r, _ in parts) / 5, rel=1e-6), (got, parts)

def _resume_with_other_data(tmp_path, capsys, first, second, data):
    """Train 2 steps on ``first`` written at ``data``, then resume on ``second`` (as many tokens and windows)."""
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")  # a byte vocabulary
    common = ["--data", str(data), "--steps", "4", "--batch-size", "2", "--seq-len", "16", "--no-progress",
              "--device", "cpu"]
    out = tmp_path / "run"
    first()
    assert main(["train", recipe, "--out", str(out), "--stop-after", "2", *common]) == 0
    capsys.readouterr()
    second()
    rc = main(["train", recipe, "--out", str(out), "--resume", *common])
    return rc, capsys.readouterr().err.strip().splitlines(), out


def test_resume_refuses_other_shards_of_as_many_tokens_and_windows(tmp_path, capsys):
    """Another prepared folder of the same size at --data (same tokens, same windows, same seq_len) passed every
    check: the resumed run went on with other data."""
    from hymba_plus.training.data import prepare

    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("".join(f"line {i} of some text to cut into windows\n" for i in range(200)))
    b.write_text(a.read_text().upper())
    shards = tmp_path / "shards"
    rc, err, out = _resume_with_other_data(tmp_path, capsys, lambda: prepare(a, shards),
                                           lambda: prepare(b, shards, force=True), shards)
    assert rc == 1 and len(err) == 1 and "other data" in err[0] and str(shards) in err[0], err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("step-")) == ["step-2"]


def test_resume_refuses_a_same_length_edit_of_the_text(tmp_path, capsys):
    text = tmp_path / "t.txt"
    body = "".join(f"line {i} of some text to cut into windows\n" for i in range(200))
    rc, err, _ = _resume_with_other_data(tmp_path, capsys, lambda: text.write_text(body),
                                         lambda: text.write_text(body.replace("some", "SOME")), text)
    assert rc == 1 and len(err) == 1 and "other data" in err[0] and str(text) in err[0], err


def test_resume_refuses_another_reasoning_file_of_as_many_examples(tmp_path, capsys):
    """A JSONL file of reasoning examples had no content digest in the checkpoint (text and series have one):
    another file of as many examples, or an edit of the same one, resumed silently on other data."""
    data, rows, argv = ladir_jsonl_run(tmp_path, steps=4, eval_every=100)
    assert main([*argv, "--stop-after", "2"]) == 0
    capsys.readouterr()
    data.write_text("".join(json.dumps({**r, "answer": r["answer"] + "."}) + "\n" for r in rows))
    assert main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "trained on other data (content digest" in err[0] and str(data) in err[0], err
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main([*argv, "--resume"]) == 0


def test_a_text_folder_that_is_also_the_runs_out_resumes(tmp_path, capsys):
    """--out = --data (a folder of text): on --resume the run's own metrics.jsonl was read as text, so the corpus
    had grown and the resume was refused as another split of it."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"line {i} of some text to cut into windows\n" for i in range(200)))
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")
    argv = ["train", recipe, "--data", str(corpus), "--out", str(corpus), "--steps", "4", "--batch-size", "2",
            "--seq-len", "16", "--no-progress", "--device", "cpu"]
    assert main([*argv, "--stop-after", "2"]) == 0
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 0, capsys.readouterr().err
    assert [r["step"] for r in metrics(corpus)] == [1, 2, 3, 4]


def test_resume_accepts_the_same_shards_moved_and_a_checkpoint_without_a_content_digest(tmp_path, capsys):
    """The data's identity is its content (a copy elsewhere resumes); a checkpoint saved before the digest was
    recorded resumes as before."""
    import shutil

    from hymba_plus.training.data import prepare

    a = tmp_path / "a.txt"
    a.write_text("".join(f"line {i} of some text to cut into windows\n" for i in range(200)))
    shards = tmp_path / "shards"

    def older():  # the checkpoint as an older version saved it: no "content" in its data state
        for st in (tmp_path / "run").glob("step-*/trainer_state.json"):
            state = json.loads(st.read_text())
            assert "content" in state["data"]
            del state["data"]["content"]
            st.write_text(json.dumps(state))

    rc, err, _ = _resume_with_other_data(tmp_path, capsys, lambda: prepare(a, shards), older, shards)
    assert rc == 0, err
    moved = tmp_path / "moved"
    shutil.copytree(shards, moved)
    recipe = str(Path(__file__).resolve().parents[1] / "configs" / "gpt_tiny.yaml")
    assert main(["train", recipe, "--out", str(tmp_path / "run"), "--resume", "--data", str(moved), "--steps", "6",
                 "--batch-size", "2", "--seq-len", "16", "--no-progress", "--device", "cpu"]) == 0


def test_a_run_on_an_indexed_cuda_device_makes_it_the_current_device(tmp_path, monkeypatch):
    """One process on ``cuda:N`` (N != 0): the trainer never made cuda:N the current device, so the CUDA
    graph's side stream, its capture pool and ``torch.cuda.synchronize()`` (``training/cuda_graph.py``)
    went to device 0. Setup now calls ``torch.cuda.set_device`` (as ``distributed.init`` does under
    torchrun), and the run gives the caller's current device back. Found by a review; checked on the CPU
    by monkeypatching (no second GPU here): the run stops at that call."""
    from hymba_plus import load_recipe
    from hymba_plus.training import trainer as trainer_mod
    from hymba_plus.training.distributed import DistInfo
    from hymba_plus.training.trainer import RunOptions, train

    class Stop(Exception):
        pass

    calls = []

    def set_device(dev):  # noqa: ANN001, ANN202
        calls.append(torch.device(dev) if not isinstance(dev, int) else dev)
        if len(calls) == 1:
            raise Stop

    monkeypatch.setattr(trainer_mod.dist_mod, "init", lambda device=None: DistInfo(device=torch.device("cuda", 1)))
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(Stop):
        train(load_recipe(TINY), TrainConfig(steps=1, batch_size=2, seq_len=16),
              RunOptions(out=tmp_path / "run", progress=False, log=lambda s: None))
    assert calls == [torch.device("cuda", 1), 0]
    # a CPU run leaves the current CUDA device alone
    calls.clear()
    monkeypatch.setattr(trainer_mod.dist_mod, "init", lambda device=None: DistInfo(device=torch.device("cpu")))
    train(load_recipe(TINY), TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=1, eval_batches=1),
          RunOptions(out=tmp_path / "cpu", progress=False, log=lambda s: None))
    assert calls == []


@pytest.mark.parametrize("recipe,first,then", [("gpt_tiny.yaml", "mqar", "khop"),
                                               ("ladir_tiny.yaml", "chain_arith", "chain_pointer")])
def test_resume_on_another_task_names_only_flags_a_task_takes(tmp_path, capsys, recipe, first, then):
    """A run on one built-in task resumed with --data naming another is refused; the line's advice named
    '--data, --seq-len and --val-frac' (a text's split), but --val-frac with a built-in task is itself refused
    (training/config.py DATA_SETTINGS) and --seq-len is a task setting a resume may change: it names --data."""
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / recipe)
    common = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--no-progress", "--device", "cpu"]
    out = tmp_path / "run"
    assert main(["train", cfg, "--out", str(out), "--stop-after", "1", "--data", first, *common]) == 0
    capsys.readouterr()
    assert main(["train", cfg, "--out", str(out), "--resume", "--data", then, *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"was trained on another task of it (name '{first}' there, '{then}' now)" in err[0], err
    assert err[0].endswith(f"resume with the same --data ({first}), or start a new run"), err
