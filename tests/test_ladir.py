"""Latent reasoning (``ladir``, ``components/ladir.py``, ``generate(mode="ladir")``): the recipe
section, shapes and gradients of the VAE and flow losses, THE invariant with latent slots in
the cache over every mixer, Euler sampling and Prophet, the decoding mode, and that the VAE
and the flow learn their jobs on a small synthetic reasoning task."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

from hymba_plus import RecipeError, build_model, load_recipe, registry
from hymba_plus.components.ladir import LaDiR
from tests.helpers import EVERY_COMPONENT

ROOT = Path(__file__).resolve().parents[1]

V = 24
COMPS = EVERY_COMPONENT


def recipe(pattern: str = "GD | GA", meta: int = 0, etd: dict | None = None, **ladir) -> dict:
    m = {"vocab_size": V, "d_model": 32, "max_seq_len": 96, "block_pattern": pattern, "meta_tokens": meta}
    if etd:
        m["etd"] = etd
    lad = {"latent_dim": 8, "memory_slots": 3, "inference_steps": 8, "denoiser_layers": 1, "denoiser_heads": 2}
    lad.update(ladir)
    return {"name": "ladir", "model": m, "components": dict(COMPS), "ladir": lad, "objective": {"kind": "ladir"}}


def batch(B: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    q, r, a = (torch.randint(3, V, (B, n), generator=g) for n in (5, 4, 2))
    qm, rm, am = (torch.ones_like(t, dtype=torch.bool) for t in (q, r, a))
    qm[1, 3:] = False  # right-padded segments of different lengths
    rm[2, 2:] = False
    return dict(question=q, question_mask=qm, reasoning=r, reasoning_mask=rm, answer=a, answer_mask=am)


def test_registered_validated_and_shown() -> None:
    assert "ladir" in registry.names()
    r = load_recipe(recipe())
    assert r.ladir.memory_slots == 3 and r.ladir.prophet.thresholds == (7.5, 5.0, 2.5)
    assert load_recipe(r.to_yaml()).ladir == r.ladir
    for bad, msg in (({"memory_slots": 0}, "ladir.memory_slots"), ({"denoiser_heads": 5}, "ladir.denoiser_heads"),
                     ({"prophet": {"thresholds": [1.0, -1.0, 1.0]}}, "ladir.prophet.thresholds"),
                     ({"latent": 3}, "ladir.latent")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe(**bad))


def test_losses_shapes_and_gradients() -> None:
    torch.manual_seed(0)
    m = build_model(recipe(meta=2))
    b = batch()
    loss, stats = m.ladir.vae_loss(m, b)
    assert loss.ndim == 0 and {"ladir/recon", "ladir/kl", "ladir/answer"} <= set(stats)
    loss.backward()
    for p in (m.ladir.memory, m.ladir.to_stats.weight, m.ladir.from_latent.weight, m.embed.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    assert m.ladir.denoiser.out.weight.grad is None  # the VAE stage does not touch the denoiser
    m.zero_grad()
    fl, _ = m.ladir.flow_loss(m, b)
    fl.backward()
    assert m.ladir.denoiser.out.weight.grad.abs().sum() > 0
    assert m.embed.weight.grad is None and m.ladir.to_stats.weight.grad is None  # LM and VAE only read


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_flow_loss_of_a_model_in_another_dtype(dtype) -> None:
    """A model cast to float64 or bfloat16 (no autocast) trains its flow as a float32 one does: the
    latents were drawn in float32 and fed to the denoiser as they were (``sample`` casts them), a
    RuntimeError "mat1 and mat2 must have the same dtype" in ``flow_loss`` and the flow stage's eval."""
    torch.manual_seed(0)
    m = build_model(recipe()).to(dtype)
    loss, st = m.ladir.flow_loss(m, batch())
    loss.backward()
    assert torch.isfinite(loss) and m.ladir.denoiser.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("pattern, etd", [
    ("GD | GA | M3 | ATL | HY", None), ("GA+moe | GD", None),
    ("GD | GA | M3 | GA", {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2}),
])
@torch.no_grad()
def test_invariant_with_latent_slots(pattern, etd) -> None:
    """[question ids, slot embeddings, answer ids] through one cache, in three calls (the slots
    enter once, like meta tokens), equals the full forward over the same embeddings."""
    torch.manual_seed(0)
    m = build_model(recipe(pattern, meta=2, etd=etd)).double().eval()
    g = torch.Generator().manual_seed(1)
    q, a = torch.randint(3, V, (2, 6), generator=g), torch.randint(3, V, (2, 4), generator=g)
    z = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    slots = m.ladir.slots(z, m.dtype)
    full = m(inputs_embeds=torch.cat([m.embed(q), slots, m.embed(a)], 1), input_ids=None).logits
    cache = m.new_cache(2)
    parts = [m(q, cache=cache).logits, m(inputs_embeds=slots, input_ids=None, cache=cache).logits,
             m(a[:, :1], cache=cache).logits, m(a[:, 1:], cache=cache).logits]
    chunked = torch.cat(parts, 1)
    assert (chunked - full).abs().max() / full.abs().max() < 1e-9


@torch.no_grad()
def test_sampling_prophet_and_mode() -> None:
    torch.manual_seed(0)
    m = build_model(recipe(inference_steps=9, prophet={"thresholds": [0.05, 0.02, 0.01]})).eval()
    b = batch()
    z, used = m.ladir.sample(m, b["question"], b["question_mask"], prophet=False,
                             generator=torch.Generator().manual_seed(0))
    assert z.shape == (3, 3, 8) and used.tolist() == [9, 9, 9]
    z0 = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(1))
    a, _ = m.ladir.sample(m, b["question"], b["question_mask"], prophet=False, z0=z0)
    c, _ = m.ladir.sample(m, b["question"], b["question_mask"], prophet=False, z0=z0)
    assert torch.equal(a, c)  # deterministic given the noise
    zp, used = m.ladir.sample(m, b["question"], b["question_mask"], prophet=True, z0=z0)
    assert (used < 9).any()  # small thresholds: some rows exit early
    # an exiting row keeps the estimate z_t + (1 - t) v it was judged on
    cond = m.ladir.question_states(m, b["question"], b["question_mask"]).float()
    for row in (used < 9).nonzero().flatten().tolist():
        k, dt = int(used[row]), 1.0 / 9
        z = z0[row:row + 1].clone()
        for i in range(k):
            v = m.ladir.denoiser(z, torch.full((1,), i * dt), cond[row:row + 1], b["question_mask"][row:row + 1])
            z = z + dt * v
        torch.testing.assert_close(zp[row:row + 1], z + (1.0 - k * dt) * v, atol=1e-5, rtol=1e-5)
    ids = torch.randint(3, V, (2, 5))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    stats: dict = {}
    out = m.generate(ids, max_new_tokens=3, mode="ladir", attention_mask=mask, samples=3, stats=stats,
                     generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 8) and torch.equal(out[:, :5], ids)
    assert len(stats["steps_used"]) == 2 and len(stats["steps_used"][0]) == 3
    # left padding is exact: row 1 alone gives the same answer (same noise: first rows' draws)
    alone = m.generate(ids[1:, 2:], max_new_tokens=3, mode="ladir", samples=1, prophet=False,
                       generator=torch.Generator().manual_seed(0))
    both = m.generate(ids[1:].expand(1, -1), max_new_tokens=3, mode="ladir", attention_mask=mask[1:], samples=1,
                      prophet=False, generator=torch.Generator().manual_seed(0))
    assert torch.equal(alone[:, 3:], both[:, 5:])
    with pytest.raises(ValueError, match="samples"):
        m.generate(ids, max_new_tokens=2, mode="ladir", samples=0)
    plain = build_model({"name": "p", "model": {"vocab_size": V, "d_model": 32, "block_pattern": "GA"}})
    with pytest.raises(ValueError, match="ladir section"):
        plain.generate(ids, max_new_tokens=2, mode="ladir")


def chain_batch(g: torch.Generator, B: int) -> dict:
    """Toy reasoning: question (x0, a, b), reasoning (x0 + a, x0 + a + b) mod 10, answer the last
    value; values are tokens 3..12."""
    x0, a, b_ = (torch.randint(0, 10, (B,), generator=g) for _ in range(3))
    s1, s2 = (x0 + a) % 10, (x0 + a + b_) % 10
    q = torch.stack([x0, a, b_], 1) + 3
    r = torch.stack([s1, s2], 1) + 3
    ans = s2[:, None] + 3
    ones = lambda t: torch.ones_like(t, dtype=torch.bool)  # noqa: E731
    return dict(question=q, question_mask=ones(q), reasoning=r, reasoning_mask=ones(r), answer=ans,
                answer_mask=ones(ans))


def test_vae_learns_to_reconstruct_the_reasoning() -> None:
    """The VAE's slots carry the reasoning: reconstruction and answer accuracy of the 2-step
    chain rise from chance (0.1) to ~1 on held-out questions (about 20 s on 2 CPU cores). The
    reasoning and the answer are decoded after slots with different marks: when both continued
    the same input, the LM learned a mixture of their first tokens and this run reached only
    0.59 / 0.64 (with the marks, seed 1: 0.23 / 0.21, not converged at 600 steps; seed 2: 1.0 / 1.0)."""
    torch.manual_seed(0)
    m = build_model(recipe(latent_dim=8, memory_slots=2, beta_kl=1e-4))
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW([p for n, p in m.named_parameters() if "denoiser" not in n], lr=3e-3)
    for _ in range(600):
        loss, _ = m.ladir.vae_loss(m, chain_batch(g, 32), generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        _, st = m.ladir.vae_loss(m, chain_batch(torch.Generator().manual_seed(99), 256),
                                 generator=torch.Generator().manual_seed(1))
    assert st["ladir/recon_acc"] > 0.95 and st["ladir/answer_acc"] > 0.95, st


def test_flow_loss_trains_the_denoiser_towards_the_velocity() -> None:
    """The velocity loss falls as the denoiser trains on a fixed latent distribution (the
    evidence that N Euler steps beat N / 4 on the task is not shown yet: see the issue note)."""
    torch.manual_seed(0)
    m = build_model(recipe(latent_dim=4, memory_slots=2)).eval()
    lad = m.ladir
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 2, 4, generator=g)
    opt = torch.optim.AdamW(lad.denoiser.parameters(), lr=2e-3)
    lad.denoiser.train()
    losses = []
    for _ in range(120):
        sign = torch.randint(0, 2, (128, 1, 1), generator=g) * 2.0 - 1.0
        loss, st = lad.velocity_loss(sign * c, torch.randn(128, 3, 32, generator=g),
                                     torch.ones(128, 3, dtype=torch.bool), g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-20:]) / 20 < 0.7 * sum(losses[:20]) / 20, (losses[:3], losses[-3:])
    assert set(st) == {"ladir/flow"}


def test_hymba_train_stages_and_generate(tmp_path, capsys) -> None:
    """``hymba train`` on the built-in reasoning task: the vae stage, then (resumed) the flow
    stage as a new phase; ``hymba generate --mode ladir`` answers and reports the steps."""
    import json
    from pathlib import Path

    from hymba_plus.cli import main

    cfg = Path(__file__).resolve().parents[1] / "configs" / "ladir_tiny.yaml"
    out = tmp_path / "run"
    common = ["--data", "chain_arith", "--eval-every", "4", "--eval-batches", "1", "--batch-size", "8",
              "--out", str(out), "--no-progress"]
    assert main(["train", str(cfg), "--ladir-stage", "vae", "--steps", "4", *common]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["train", str(cfg), "--ladir-stage", "flow", "--steps", "8", "--resume", *common]) == 0
    err = capsys.readouterr().err
    assert "--ladir-stage flow: a new phase at step 4" in err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"ladir/recon", "ladir/kl"} <= set(rows[1]) and "ladir/flow" in rows[-1]
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows if "eval_accuracy" in r)
    rc = main(["generate", str(out), "--prompt", "7 3 9 4 6 3 5 2", "--mode", "ladir", "--max-new-tokens", "2",
               "--temperature", "0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "ladir: denoising steps used" in cap.err and "of 16 per latent sample" in cap.err
    # a recipe whose objective is ladir needs the ladir section; the data must be reasoning data
    with pytest.raises(RecipeError, match="objective.kind: ladir trains the recipe's ladir section"):
        load_recipe({"name": "x", "model": {"vocab_size": V, "d_model": 32, "block_pattern": "GA"},
                     "objective": {"kind": "ladir"}})
    rc = main(["train", str(cfg), "--data", "mqar", "--steps", "1", "--out", str(tmp_path / "bad"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "mqar" in err


def test_hymba_train_on_a_jsonl_file(tmp_path, capsys) -> None:
    """A JSONL file of {question, reasoning, answer} (bytes tokenizer) trains the vae stage and the
    checkpoint answers a text prompt; a bad line is one error line naming file:line."""
    import json

    from hymba_plus.cli import main
    from tests.helpers import ladir_jsonl_run

    data, rows, argv = ladir_jsonl_run(tmp_path, steps=3, eval_every=3)
    out = tmp_path / "run"
    assert main(argv) == 0, capsys.readouterr().err
    assert "reasoning file" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "2+1=", "--mode", "ladir", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    data.write_text(json.dumps(rows[0]) + "\n{not json}\n")
    assert main([*argv[:-3], "--out", str(tmp_path / "bad"), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{data}:2:" in err


def test_moe_in_the_lm_balances_in_the_vae_stage_and_stays_frozen_in_the_flow_stage(tmp_path):
    """The VAE stage's LM passes add their MoE auxiliary loss (it was dropped: aux_loss_coef had no effect)
    and report routing statistics; the flow stage only reads the LM under no_grad, so its MoE layers count
    no load and their expert_bias stays (it drifted before: the frozen LM's routing changed)."""
    import yaml

    from hymba_plus import from_pretrained
    from hymba_plus.cli import main

    r = yaml.safe_load((ROOT / "configs" / "ladir_tiny.yaml").read_text())
    r["model"]["block_pattern"] = "GD | GA+moe | GD | GA+moe"
    r["components"]["moe"] = {"n_experts": 4, "top_k": 2, "d_expert": 32, "score": "sigmoid",
                              "bias_update_rate": 0.01, "aux_loss_coef": 0.01}
    recipe = tmp_path / "ladir_moe.yaml"
    recipe.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    common = ["--data", "chain_arith", "--device", "cpu", "--batch-size", "2", "--no-progress", "--warmup", "1"]
    assert main(["train", str(recipe), "--out", str(out), "--ladir-stage", "vae", "--steps", "2", *common]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["aux_loss"] > 0 and any(k.startswith("moe/") for k in rows[-1])
    assert main(["train", str(recipe), "--out", str(out), "--ladir-stage", "flow", "--steps", "4", "--resume",
                 *common]) == 0
    a, b = from_pretrained(out / "step-2").state_dict(), from_pretrained(out / "step-4").state_dict()
    biases = [k for k in a if k.endswith("expert_bias")]
    assert biases and all(torch.equal(a[k], b[k]) for k in biases)
    assert not torch.equal(a["ladir.denoiser.cond.weight"], b["ladir.denoiser.cond.weight"])  # the flow trained


def test_the_streamer_gets_the_voted_answer_with_several_samples():
    """With samples > 1 the answer is a vote after decoding: the streamer got nothing (hymba generate
    printed an empty line); it now gets the voted answer's columns."""
    torch.manual_seed(0)
    m = build_model(ROOT / "configs" / "ladir_tiny.yaml").eval()
    for samples in (1, 3):
        got: list = []
        out = m.generate(torch.tensor([[3, 17, 20], [5, 6, 7]]), max_new_tokens=4, mode="ladir", samples=samples,
                         streamer=got.append, generator=torch.Generator().manual_seed(0))
        assert torch.equal(torch.stack(got, 1), out[:, 3:]), samples


@torch.no_grad()
def test_a_padded_prompt_wider_than_max_seq_len_answers_as_unpadded() -> None:
    """Pads do not count towards max_seq_len (``check_length``; mode ar takes such a prompt): the questions,
    compacted to the right, were handed to the denoiser at the prompt's full width, past its max_seq_len
    position embeddings (a RuntimeError traceback); they are cut to the longest row's real tokens."""
    torch.manual_seed(0)
    m = build_model(recipe(inference_steps=3)).eval()  # max_seq_len 96
    ids = torch.randint(3, V, (1, 100))
    mask = torch.zeros_like(ids)
    mask[:, -5:] = 1
    out = m.generate(ids, attention_mask=mask, max_new_tokens=2, mode="ladir", generator=torch.Generator().manual_seed(0))
    alone = m.generate(ids[:, -5:], max_new_tokens=2, mode="ladir", generator=torch.Generator().manual_seed(0))
    assert torch.equal(out[:, -2:], alone[:, -2:])


@pytest.mark.parametrize("stage", ["vae", "flow", "joint"])
def test_eval_is_per_row_so_the_batch_split_and_the_repeats_do_not_matter(stage) -> None:
    """Held-out loss of 4 examples of different lengths in one batch == the mean of 2 + 2 (the second
    batch starting at example 2), with the same answer-token counts: each row's noise comes from a
    generator seeded by its index and the loss is the rows' mean (the noise was seeded per batch and
    the loss token-weighted, so a 1-GPU and a 2-GPU run reported different numbers). A batch that
    repeats examples to fill its rows scores only the distinct ones (``Batch.unique``)."""
    from hymba_plus.objectives.ladir import LaDiRObjective, LaDiRObjectiveConfig
    from hymba_plus.training.data import Batch
    from hymba_plus.training.reasoning import ReasoningExample, collate

    torch.manual_seed(0)
    m = build_model(recipe()).eval()
    obj = LaDiRObjective(LaDiRObjectiveConfig())
    obj.stage = stage
    g = torch.Generator().manual_seed(1)

    def ex(nq, nr, na):
        return ReasoningExample(*(tuple(torch.randint(3, V, (n,), generator=g).tolist()) for n in (nq, nr, na)))

    exs = [ex(5, 4, 2), ex(3, 6, 1), ex(6, 2, 3), ex(4, 4, 2)]

    def run(rows, seed, unique=None):
        d = collate(rows)
        b = Batch(d["full"], d["labels"], segments=d, unique=unique)
        return obj.eval_batch(m, m, b.input_ids, b.scored_labels(), seed=seed, batch=b)

    whole, a, b = run(exs, 10), run(exs[:2], 10), run(exs[2:], 12)
    assert whole[0] == pytest.approx((a[0] + b[0]) / 2, rel=1e-5)
    assert whole[1:3] == (a[1] + b[1], a[2] + b[2]) and whole[2] == 4  # answers scored (rows)
    tokens = [obj.eval_sums(r[3]) for r in (whole, a, b)]  # and their tokens (eval_answer_token_accuracy)
    assert tokens[0] == {k: tokens[1][k] + tokens[2][k] for k in tokens[0]} and tokens[0]["answer_tokens"] == 8
    wrapped = run(exs[2:] + exs[2:], 12, unique=2)  # rows 2, 3 and then their repeats
    assert wrapped[0] == pytest.approx(b[0], rel=1e-5) and wrapped[1:3] == b[1:3]
    assert obj.eval_sums(wrapped[3]) == tokens[2]
    assert run(exs[:2], 10, unique=0)[1:3] == (0, 0)


def test_reasoning_file_eval_batches_mark_their_repeats(tmp_path) -> None:
    """A held-out batch of a JSONL file that wraps around its held-out examples says how many rows
    are distinct (the trainer's evaluation scores only those)."""
    from types import SimpleNamespace

    from hymba_plus.training.data import ReasoningBatches

    rows = [{"question": f"{a}+{b}=", "reasoning": f"{a}+{b} is {a + b}", "answer": str(a + b)}
            for a in range(5) for b in range(4)]
    data = tmp_path / "r.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = SimpleNamespace(val_frac=0.1, task_params=None)
    s = ReasoningBatches(str(data), 256, 0, cfg, None, None)
    assert s.n_eval() == 2
    assert s.eval(range(0, 2)).rows == 2 and s.eval(range(0, 2)).unique is None
    wrapped = s.eval(range(0, 4))
    assert wrapped.rows == 2 and wrapped.input_ids.shape[0] == 4
    assert s.eval(range(4, 8)).rows == 0


def test_flow_loss_reads_the_lm_without_dropout_and_restores_train_mode() -> None:
    """The flow loss's targets (posterior latents) and condition (question states) come from the LM as
    inference sees it: with model.dropout > 0 they were computed with dropout on in training; the
    modules' train / eval modes are as they were after the call."""
    torch.manual_seed(0)
    r = recipe()
    r["model"]["dropout"] = 0.5
    m = build_model(r)
    b = batch()
    m.eval()
    ref, _ = m.ladir.flow_loss(m, b, generator=torch.Generator().manual_seed(3))
    m.train()
    m.ladir.denoiser.eval()  # a module's own mode survives the read
    modes = [mod.training for mod in m.modules()]
    got, _ = m.ladir.flow_loss(m, b, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, ref)
    assert [mod.training for mod in m.modules()] == modes and m.training and not m.ladir.denoiser.training


def test_generate_stats_hold_python_ints_for_tensor_steps_and_samples() -> None:
    """``steps`` / ``samples`` given as 0-d tensors (taken as integers) reached ``stats`` as tensors."""
    torch.manual_seed(0)
    m = build_model(recipe()).eval()
    ids = torch.randint(3, V, (2, 5))
    stats: dict = {}
    m.generate(ids, max_new_tokens=2, mode="ladir", steps=torch.tensor(4), samples=torch.tensor(2), prophet=False,
               stats=stats, generator=torch.Generator().manual_seed(0))
    assert type(stats["steps"]) is int and stats["steps"] == 4 and type(stats["samples"]) is int
    assert stats["steps_used"] == [[4, 4], [4, 4]] and stats["early_exits"] == 0


@pytest.mark.parametrize("prophet", [False, True])
def test_generate_stats_count_the_lm_forwards(prophet) -> None:
    """``stats["forwards"]``: the LM's forward passes (question prefill, Prophet's checks, the slots,
    one per answer token but the last), as the docstring promised; the denoiser's steps are not LM passes."""
    torch.manual_seed(0)
    m = build_model(recipe(prophet={"enabled": prophet, "check_every": 2})).eval()
    calls = []
    m.register_forward_hook(lambda *_: calls.append(1))
    stats: dict = {}
    m.generate(torch.randint(3, V, (2, 5)), max_new_tokens=3, mode="ladir", samples=2, steps=8, stats=stats,
               generator=torch.Generator().manual_seed(0))
    assert stats["forwards"] == len(calls) and (prophet or len(calls) == 4), (stats["forwards"], len(calls))
    assert not prophet or len(calls) > 4  # checks at steps 2, 4, 6 (the random model's gaps are small)


def test_a_ladir_section_needs_the_ladir_objective(tmp_path) -> None:
    """A ``ladir:`` section under another objective built a LaDiR module that never trained: no
    workflow trains it later on the same checkpoint (``--ladir-stage`` is refused for another
    objective, and resuming checks the objective), so it is refused, as on a forecaster. Found by a
    review of the recipe language."""
    p = tmp_path / "r.yaml"
    for objective in ("", "objective: {kind: next_token}\n", "objective: {kind: block_diffusion, block_size: 4}\n"):
        p.write_text("name: t\nmodel: {vocab_size: 24, d_model: 32, block_pattern: 'GD | GA'}\n" + objective
                     + "ladir: {latent_dim: 8, memory_slots: 2}\n")
        kind = "block_diffusion" if "block" in objective else "next_token"
        with pytest.raises(RecipeError) as ei:
            load_recipe(p)
        assert ei.value.errors == [
            f"{p}:{3 + bool(objective)}: ladir: latent reasoning trains with the ladir objective (objective: "
            f"{{kind: ladir}}); the {kind} objective never computes its losses (its VAE and flow denoiser "
            "would stay untrained)"]
    assert load_recipe(recipe()).objective.kind == "ladir"


# ---------------------------------------------------------------- oracles (float64), from a review against the
# papers (LaDiR arXiv 2510.04573, Prophet arXiv 2508.19982) and their code


class _ExactVelocity(torch.nn.Module):
    """A stand-in denoiser: the rectified-flow velocity (c - z_t) / (1 - t) of the straight path from
    z_t to the point c, the field a perfect v_theta learns when every z_1 is c."""

    def __init__(self, c: torch.Tensor, like: torch.nn.Module):
        super().__init__()
        self.c, self.out = c, like.out  # (``sample`` reads ``out.weight.dtype``)

    def forward(self, z, t, cond, mask, checkpointing=None):  # noqa: ANN001, ANN201
        return (self.c - z) / (1.0 - t.to(z.dtype))[:, None, None]


@torch.no_grad()
def test_euler_sampler_runs_from_noise_at_t0_to_the_data_at_t1() -> None:
    """Oracle for the time direction and the step size: with the exact velocity towards c, Euler from
    z_0 at t = 0 lands on c at t = 1 for any number of steps (the last step's t is 1 - 1/N), and
    Prophet's estimate z_t + (1 - t) v is c at every check. In float64 to float64's precision: the
    sampler kept its state, time and condition in float32 for a float64 model (errors ~1e-7)."""
    torch.manual_seed(0)
    m = build_model(recipe()).double().eval()
    lad = m.ladir
    g = torch.Generator().manual_seed(0)
    c = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
    lad.denoiser = _ExactVelocity(c, lad.denoiser)
    q = torch.randint(3, V, (2, 4), generator=g)
    qm = torch.ones_like(q, dtype=torch.bool)
    for steps in (1, 2, 5, 8):
        z0 = torch.randn(2, 3, 8, generator=g, dtype=torch.float64)
        z, used = lad.sample(m, q, qm, steps=steps, prophet=False, z0=z0)
        assert z.dtype == torch.float64
        torch.testing.assert_close(z, c, atol=1e-12, rtol=1e-12)
        assert used.tolist() == [steps, steps]
    # every check passes (tiny thresholds): the first check, after one step, commits the estimate, c
    lad.cfg = lad.cfg.__class__(**{**lad.cfg.__dict__, "prophet": lad.cfg.prophet.__class__(thresholds=(1e-9,) * 3)})
    z, used = lad.sample(m, q, qm, steps=8, prophet=True, z0=torch.randn(2, 3, 8, generator=g, dtype=torch.float64))
    assert used.tolist() == [1, 1]
    torch.testing.assert_close(z, c, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("check_every", [1, 2])
@torch.no_grad()
def test_prophet_commits_at_the_first_check_whose_gap_reaches_the_threshold_of_its_third(check_every) -> None:
    """Oracle for Prophet's rule (its code: ``answer_gap >= tau`` with tau 7.5 / 5 / 2.5 by progress =
    steps done / steps): with the answer gap of each row fixed, 9 steps, a row of gap 8 exits at the
    first check, one of gap 5 (== the middle threshold) at the first check at progress >= 1/3 (step 3,
    or 4 checking every 2), one of gap 2.5 at the first at >= 2/3 (step 6), one of gap 2 never; no
    check follows the last step."""
    torch.manual_seed(0)
    m = build_model(recipe(inference_steps=9, prophet={"check_every": check_every})).double().eval()
    lad = m.ladir
    gaps = torch.tensor([8.0, 5.0, 2.5, 2.0], dtype=torch.float64)
    checks = []

    def gap(model, qcache, z):  # noqa: ANN001, ANN202
        checks.append(z.shape[0])
        return gaps

    lad.answer_gap = gap
    q = torch.randint(3, V, (4, 4))
    _, used = lad.sample(m, q, torch.ones_like(q, dtype=torch.bool), prophet=True,
                         generator=torch.Generator().manual_seed(0))
    first_mid = 3 if check_every == 1 else 4
    assert used.tolist() == [check_every, first_mid, 6, 9]
    assert len(checks) == len(range(check_every, 9, check_every))  # the last row never exits: every check runs


@torch.no_grad()
def test_kl_is_the_closed_form_of_diagonal_gaussians() -> None:
    """``LaDiR.kl`` == KL(N(mu, sigma^2) || N(0, 1)) from torch.distributions, summed over the latent
    dims, averaged over slots (and rows)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    logvar = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu, (0.5 * logvar).exp()),
                                            torch.distributions.Normal(0.0, 1.0)).sum(-1).mean(-1)
    from hymba_plus.components.ladir import LaDiR

    torch.testing.assert_close(LaDiR.kl(mu, logvar, per_row=True), ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(LaDiR.kl(mu, logvar), ref.mean(), atol=1e-12, rtol=1e-12)


@torch.no_grad()
def test_segment_loss_is_the_teacher_forced_cached_decode() -> None:
    """Oracle for the decoder's positions: a row's CE of ``segment_loss`` (right-padded batch) == the
    negative log-likelihood of its target decoded token by token through a cache holding
    [question, slots(z) with the target's mark] alone: the last slot predicts target[0]. In float64:
    the CE of a float64 model was computed in float32 (``.float()``; ``lm_loss`` keeps float64)."""
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA | M3", meta=2)).double().eval()
    lad = m.ladir
    b = batch()
    z = torch.randn(3, 3, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for kind in ("reasoning", "answer"):
        ce, hits = lad.segment_loss(m, z, b["question"], b["question_mask"], b[kind], b[f"{kind}_mask"], kind=kind,
                                    per_row=True)
        for row in range(3):
            q = b["question"][row, b["question_mask"][row]][None]
            tgt = b[kind][row, b[f"{kind}_mask"][row]]
            cache = m.new_cache(1)
            m(q, cache=cache)
            logits = m(inputs_embeds=lad.slots(z[row:row + 1], m.dtype, kind), input_ids=None, cache=cache).logits[:, -1]
            nll, right = [], 0
            for tok in tgt.tolist():
                logp = logits.log_softmax(-1)[0]
                nll.append(-logp[tok])
                right += int(logp.argmax() == tok)
                logits = m(torch.tensor([[tok]]), cache=cache).logits[:, -1]
            torch.testing.assert_close(ce[row], torch.stack(nll).mean(), atol=1e-10, rtol=1e-10)
            assert int(hits[row].sum()) == right


@torch.no_grad()
def test_a_padded_batch_gives_each_row_what_it_gives_alone() -> None:
    """Right-padded reasoning data (``collate``): each row's VAE loss, flow loss, sampled latent (with
    Prophet exits), answer gap and generated answer (left-padded prompt, compacted) equal the row's
    alone, unpadded, with the same noise (float64, to 1e-12)."""
    from hymba_plus.training.reasoning import ReasoningExample, collate

    torch.manual_seed(0)
    r = recipe("GD | GA | M3", meta=2, prophet={"thresholds": [1.0, 0.6, 0.3]})
    r["model"]["init_std"] = 0.3  # logit gaps that pass the thresholds at different steps
    m = build_model(r).double().eval()
    lad = m.ladir
    g = torch.Generator().manual_seed(1)
    exs = [ReasoningExample(*(tuple(torch.randint(3, V, (n,), generator=g).tolist()) for n in ns))
           for ns in ((5, 4, 2), (3, 6, 1), (6, 2, 3))]
    keys = ("question", "question_mask", "reasoning", "reasoning_mask", "answer", "answer_mask")
    seg = {k: v for k, v in collate(exs).items() if k in keys}
    alone = [{k: v for k, v in collate([e]).items() if k in keys} for e in exs]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    vae, _ = lad.vae_loss(m, seg, generator=gens, per_row=True)
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    flow, _ = lad.flow_loss(m, seg, generator=gens, per_row=True)
    z0 = torch.randn(3, 3, 8, generator=g, dtype=torch.float64)
    z, used = lad.sample(m, seg["question"], seg["question_mask"], prophet=True, z0=z0)
    assert len(set(used.tolist())) > 1  # the rows exit at different steps
    cache = m.new_cache(3)
    m(seg["question"], attention_mask=seg["question_mask"].long(), cache=cache)
    gap = lad.answer_gap(m, cache, z0)
    close = functools.partial(torch.testing.assert_close, atol=1e-12, rtol=1e-12)
    for i, one in enumerate(alone):
        close(vae[i], lad.vae_loss(m, one, generator=[torch.Generator().manual_seed(10 + i)], per_row=True)[0][0])
        close(flow[i], lad.flow_loss(m, one, generator=[torch.Generator().manual_seed(10 + i)], per_row=True)[0][0])
        zi, ui = lad.sample(m, one["question"], one["question_mask"], prophet=True, z0=z0[i:i + 1])
        close(z[i], zi[0])
        assert used[i] == ui[0]
        c1 = m.new_cache(1)
        m(one["question"], cache=c1)
        close(gap[i], lad.answer_gap(m, c1, z0[i:i + 1])[0])
    # generation: with the slots made independent of z, the answer depends on the question alone
    lad.from_latent.weight.zero_()
    ids = torch.randint(3, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    out = m.generate(ids, attention_mask=mask, max_new_tokens=4, mode="ladir", samples=2,
                     generator=torch.Generator().manual_seed(0))
    for i in range(3):
        n = int(mask[i].sum())
        one = m.generate(ids[i:i + 1, 7 - n:], max_new_tokens=4, mode="ladir", samples=2,
                         generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[i, 7:], one[0, n:])


@torch.no_grad()
def test_generation_is_deterministic_under_a_seed() -> None:
    """Same seed: same latents, Prophet exits, sampled answers (temperature 1) and vote; another seed
    draws other noise."""
    torch.manual_seed(0)
    r = recipe(prophet={"thresholds": [0.3, 0.2, 0.1]})
    r["model"]["init_std"] = 0.3
    m = build_model(r).eval()
    ids = torch.randint(3, V, (2, 5))
    runs = []
    for seed in (0, 0, 1):
        stats: dict = {}
        out = m.generate(ids, max_new_tokens=4, mode="ladir", samples=3, temperature=1.0, stats=stats,
                         generator=torch.Generator().manual_seed(seed))
        runs.append((out, stats["steps_used"], stats["vote_agreement"]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert not (torch.equal(runs[0][0], runs[2][0]) and runs[0][1] == runs[2][1])


def test_a_checkpoint_of_a_builtin_reasoning_task_names_the_end_of_its_answers(tmp_path, capsys) -> None:
    """``chain_arith`` / ``chain_pointer`` end every answer with EOS (token 1), which their token-id
    tokenizer does not name: a checkpoint carried no end id, so ``hymba generate`` ran on past the answer
    to ``--max-new-tokens`` (the configs' example, without ``--eos 1``). The checkpoint's
    ``generation_config.json`` names it, and a resumed run keeps it."""
    from hymba_plus.cli import main
    from hymba_plus.models.lm import generation_config
    from hymba_plus.training.reasoning import EOS

    out = tmp_path / "run"
    common = ["--data", "chain_arith", "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--out",
              str(out), "--no-progress"]
    cfg = str(ROOT / "configs" / "ladir_tiny.yaml")
    assert main(["train", cfg, "--ladir-stage", "vae", "--steps", "1", *common]) == 0, capsys.readouterr().err
    assert generation_config(out / "step-1", 32) == {"eos_token_id": EOS}
    assert main(["train", cfg, "--ladir-stage", "flow", "--steps", "2", "--resume", *common]) == 0
    assert generation_config(out / "step-2", 32) == {"eos_token_id": EOS}


def test_a_run_without_data_trains_on_the_builtin_reasoning_task(tmp_path, capsys) -> None:
    """Without ``--data`` (or ``train.data``) a LaDiR run fell back to the objectives' default ``mqar``, a
    next-token task it cannot read: the error named ``mqar``, which the user never typed. Its default is the
    built-in reasoning task ``chain_arith`` (the one ``configs/ladir_tiny.yaml`` trains on). Found by a review."""
    from hymba_plus.cli import main
    from hymba_plus.objectives.ladir import LaDiRObjective

    assert LaDiRObjective.default_data == "chain_arith"
    cfg = str(ROOT / "configs" / "ladir_tiny.yaml")
    rc = main(["train", cfg, "--ladir-stage", "vae", "--steps", "1", "--batch-size", "2", "--eval-every", "1",
               "--eval-batches", "1", "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "reasoning task chain_arith" in err and "mqar" not in err
    # the settings are checked against that default too, not against mqar's needs (--seq-len 3 was refused
    # as "mqar with 0 pairs needs seq_len >= 4")
    rc = main(["train", cfg, "--ladir-stage", "vae", "--steps", "1", "--batch-size", "2", "--seq-len", "3",
               "--eval-every", "1", "--eval-batches", "1", "--out", str(tmp_path / "short"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "mqar" not in err


@torch.no_grad()
@pytest.mark.parametrize("stage", ["vae", "flow"])
def test_eval_accuracy_is_the_answer_value_whose_chance_the_plot_draws(stage) -> None:
    """chain_arith's eval_accuracy scored every answer token, the end token (always predictable) included, so
    a model guessing the value at chance scored ~0.55 against the plot's chance line 0.100 (1 / modulus), and
    one that only ever wrote the end token 0.5. Now eval_accuracy is the answer value's (every answer token but
    the stream's end token right, per held-out row), the metric whose chance ``stream.chance`` is; the token
    accuracy is kept as eval_answer_token_accuracy."""
    from hymba_plus.objectives.ladir import LaDiRObjective, LaDiRObjectiveConfig
    from hymba_plus.training.config import TrainConfig
    from hymba_plus.training.data import ReasoningBatches
    from hymba_plus.training.reasoning import EOS

    torch.manual_seed(0)
    m = build_model(recipe()).eval()
    stream = ReasoningBatches("chain_arith", V, 0, TrainConfig(), None, 96, reserve=3)
    assert stream.chance == pytest.approx(0.1)
    obj = LaDiRObjective(LaDiRObjectiveConfig())
    obj.configure(TrainConfig(ladir_stage=stage))
    b = stream.eval(range(8))

    def scores() -> tuple[int, int, dict]:
        _, c, t, out = obj.eval_batch(None, m, b.input_ids, b.scored_labels(), seed=0, batch=b)
        return c, t, obj.eval_results(obj.eval_sums(out))

    hook = m.lm_head.register_forward_hook(lambda mod, inp, out: out.index_fill(-1, torch.tensor([EOS]), 1e4))
    assert scores() == (0, 8, {"answer_token_accuracy": 0.5})  # the end token alone: no answer value right
    hook.remove()
    values = b.segments["answer"][:, 0]  # a model that writes each row's answer value, then the end token

    def oracle(mod, inp, out):  # noqa: ANN001, ANN202 - the answer pass: [question, slots, answer] positions
        out = out.clone()
        if out.shape[1] == b.segments["question"].shape[1] + 3 + 2:
            out[:, -3, :] = 0.0
            out[torch.arange(8), -3, values] = 1e4
            out[:, -2, :] = 0.0
            out[:, -2, EOS] = 1e4
        return out

    hook = m.lm_head.register_forward_hook(oracle)
    assert scores() == (8, 8, {"answer_token_accuracy": 1.0})
    hook.remove()


@pytest.mark.parametrize("target", ["sample", "mean"])
def test_flow_target_is_a_posterior_draw_or_exactly_its_mean(target) -> None:
    """``ladir.flow_target``: the flow's z_1 is a draw from the VAE's posterior (ours, the default) or
    its mean (LaDiR's code: ``model.py``'s ``_forward`` takes ``autoencoder._compress``, the mean)."""
    torch.manual_seed(0)
    m = build_model(recipe(flow_target=target))
    b = batch()
    seen = []
    lad = m.ladir
    velocity = lad.velocity_loss
    lad.velocity_loss = lambda z1, *a, **k: (seen.append(z1), velocity(z1, *a, **k))[1]
    lad.flow_loss(m, b, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        m.eval()
        mu, _ = lad.encode(m, b["question"], b["question_mask"], b["reasoning"], b["reasoning_mask"])
    if target == "mean":
        assert torch.equal(seen[0], mu)
    else:
        assert not torch.allclose(seen[0], mu)
    assert load_recipe(recipe()).ladir.flow_target == "sample"
    with pytest.raises(RecipeError, match="ladir.flow_target"):
        load_recipe(recipe(flow_target="mode"))


@pytest.mark.parametrize("per_row", [False, True])
def test_the_flow_loss_of_k_draws_is_the_mean_of_k_single_draw_losses(per_row) -> None:
    """``ladir.flow_draws`` (LaDiR's code: ``diffusion_batch_mul = 8``, each encoded latent repeated
    with noise and a time of its own): the loss with k draws is the mean of k one-draw losses that
    take the same generator's draws in turn (one generator, or one per row as held-out evaluation has)."""
    torch.manual_seed(0)
    one = build_model(recipe(flow_draws=1))
    three = build_model(recipe(flow_draws=3))
    three.load_state_dict(one.state_dict())
    b = batch()
    qm = b["question_mask"]
    z1, cond = torch.randn(3, 3, 8), torch.randn(3, 5, 32)

    def gens():  # noqa: ANN202
        return [torch.Generator().manual_seed(7 + i) for i in range(3)] if per_row else torch.Generator().manual_seed(7)

    g = gens()
    singles = [one.ladir.velocity_loss(z1, cond, qm, g, per_row)[0] for _ in range(3)]
    many = three.ladir.velocity_loss(z1, cond, qm, gens(), per_row)[0]
    assert many.shape == ((3,) if per_row else ())
    torch.testing.assert_close(many, torch.stack(singles).mean(0))
    assert not torch.allclose(many, singles[0])
    loss, _ = three.ladir.flow_loss(three, b, per_row=per_row)  # the training / held-out path
    assert loss.shape == many.shape and bool(torch.isfinite(loss).all())
    assert load_recipe(recipe()).ladir.flow_draws == 8


@pytest.mark.parametrize("scale", [None, 2.5, 0.5])
@torch.no_grad()
def test_the_sampler_starts_from_noise_of_the_recipe_scale(scale) -> None:
    """``ladir.init_noise_scale`` (default 1: the flow's own start, N(0, I); LaDiR's code: ``denoise``
    starts from ``torch.randn(...) * 2.5``): with a zero velocity the sampler returns its starting noise,
    that scale times N(0, I)."""
    torch.manual_seed(0)
    m = build_model(recipe() if scale is None else recipe(init_noise_scale=scale)).eval()
    lad = m.ladir
    lad.denoiser = _ExactVelocity(torch.zeros(()), lad.denoiser)
    lad.denoiser.forward = lambda z, *a, **k: torch.zeros_like(z)
    q = torch.randint(3, V, (64, 4))
    qm = torch.ones_like(q, dtype=torch.bool)
    z, _ = lad.sample(m, q, qm, steps=2, prophet=False, generator=torch.Generator().manual_seed(3))
    want = torch.randn(64, 3, 8, generator=torch.Generator().manual_seed(3)) * (1.0 if scale is None else scale)
    torch.testing.assert_close(z, want, atol=0, rtol=0)
    assert abs(float(z.std()) / (1.0 if scale is None else scale) - 1.0) < 0.05
    z0 = torch.randn(64, 3, 8)  # a given start is taken as it is
    torch.testing.assert_close(lad.sample(m, q, qm, steps=2, prophet=False, z0=z0)[0], z0, atol=0, rtol=0)


@pytest.mark.parametrize("pattern, etd", [
    ("GD | GA | M3 | ATL | HY", None),
    ("GD | GA | M3 | GA", {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2}),
])
@torch.no_grad()
def test_generation_prefills_each_question_once_for_all_its_samples(pattern, etd) -> None:
    """``samples`` latents per question: the question is prefilled once (B rows) and its cache expanded
    over the samples; the steps, exits and answers are those of each sample's question prefilled on its
    own (the question repeated per sample, one sample each), and the vote is over those answers."""
    torch.manual_seed(0)
    r = recipe(pattern, meta=2, etd=etd, prophet={"thresholds": [0.3, 0.2, 0.1]})
    r["model"]["init_std"] = 0.3
    m = build_model(r).double().eval()
    ids = torch.randint(3, V, (2, 5))
    S = 3
    rows: list = []
    m.register_forward_pre_hook(lambda mod, a, kw: rows.append((a[0] if a else kw.get("input_ids")) is not None
                                                               and (a[0] if a else kw["input_ids"]).shape[0]),
                                with_kwargs=True)
    many: dict = {}
    out = m.generate(ids, max_new_tokens=3, mode="ladir", samples=S, stats=many,
                     generator=torch.Generator().manual_seed(0))
    assert rows[0] == 2  # the prefill: one row per question
    alone: dict = {}
    each = m.generate(ids.repeat_interleave(S, 0), max_new_tokens=3, mode="ladir", samples=1, stats=alone,
                      generator=torch.Generator().manual_seed(0))[:, ids.shape[1]:].view(2, S, -1)
    assert many["steps_used"] == [sum(alone["steps_used"][i * S:(i + 1) * S], []) for i in range(2)]
    assert many["early_exits"] > 0  # Prophet's checks ran on forks of the expanded cache
    votes = (each[:, :, None] == each[:, None]).all(-1).sum(-1)
    torch.testing.assert_close(out[:, ids.shape[1]:], each[torch.arange(2), votes.argmax(-1)], atol=0, rtol=0)


def test_latent_noise_augments_the_decoders_latents_in_training_only() -> None:
    """``ladir.latent_noise`` (LaDiR's code, ``vae/model_vae.py`` ``forward``: ``if self.training:
    batch_memory_tokens += torch.randn_like(...) * 0.3`` after the reparameterized draw): in training the
    decoder reads mu + sigma eps + latent_noise eps' (eps' drawn after eps, same generator); in eval, or
    with the default 0, the posterior draw alone, bit for bit."""
    assert load_recipe(recipe()).ladir.latent_noise == 0.0
    with pytest.raises(RecipeError, match="ladir.latent_noise"):
        load_recipe(recipe(latent_noise=-0.1))
    torch.manual_seed(0)
    plain = build_model(recipe())
    noisy = build_model(recipe(latent_noise=0.3))
    noisy.load_state_dict(plain.state_dict())
    b = batch()
    mu, logvar = plain.ladir.encode(plain, b["question"], b["question_mask"], b["reasoning"], b["reasoning_mask"])
    g = torch.Generator().manual_seed(5)
    eps, extra = torch.randn(mu.shape, generator=g), torch.randn(mu.shape, generator=g)
    posterior = mu + (0.5 * logvar).exp() * eps

    def read(m, train: bool) -> list:  # noqa: ANN001
        m.train(train)
        seen: list = []
        orig = m.ladir.segment_loss
        m.ladir.segment_loss = lambda model, z, *a, **k: (seen.append(z.detach()), orig(model, z, *a, **k))[1]
        m.ladir.vae_loss(m, b, generator=torch.Generator().manual_seed(5))
        return seen

    for z in read(noisy, True):  # the reasoning's and the answer's decoder read the same noisy latents
        torch.testing.assert_close(z, posterior + 0.3 * extra)
    for m, train in ((noisy, False), (plain, True), (plain, False)):
        for z in read(m, train):
            torch.testing.assert_close(z, posterior, atol=0, rtol=0)


def _repulsion_by_hand(v: torch.Tensor, samples: int, bandwidth: float = 0.0, active=None) -> torch.Tensor:  # noqa: ANN001
    """LaDiR's ``distance_grad`` / ``median_bandwidth_latent`` written out, question by question and
    pair by pair, over flattened samples."""
    out = torch.zeros_like(v)
    active = [True] * v.shape[0] if active is None else active
    for q in range(v.shape[0] // samples):
        rows = [q * samples + s for s in range(samples) if active[q * samples + s]]
        x = {r: v[r].flatten() for r in rows}
        d = sorted(float((x[a] - x[b]).norm()) for n, a in enumerate(rows) for b in rows[n + 1:])
        if not d:
            continue
        sigma = bandwidth if bandwidth > 0 else d[(len(d) - 1) // 2] + 1e-6  # the lower median, as torch's
        for a in rows:
            for b in rows:
                if a != b:
                    u = float((x[a] - x[b]).pow(2).sum()) / sigma ** 2
                    out[a] += (2 * math.exp(-u) * (1 - u) * (x[a] - x[b])).view_as(v[a])
    return out


@pytest.mark.parametrize("samples, bandwidth", [(3, 0.0), (4, 0.0), (2, 1.5), (3, 2.0)])
def test_the_diversity_kick_is_the_gradient_of_the_repulsion_by_hand(samples, bandwidth) -> None:
    """``LaDiR.repulsion`` against the kernel written out pair by pair (two questions, so that their
    samples do not interact), against autograd's gradient of R = sum_{i != j} f(||v_i - v_j||^2) at a
    fixed sigma, and with Prophet's exited rows left out (their kick 0, the others' as without them)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(2 * samples, 3, 4, generator=g, dtype=torch.float64)
    on = torch.ones(2 * samples, dtype=torch.bool)
    kick = LaDiR.repulsion(v, on, samples, bandwidth)
    torch.testing.assert_close(kick, _repulsion_by_hand(v, samples, bandwidth))
    # the gradient of R at that sigma (for the median: the one the kick used)
    d = torch.cdist(v.view(2, samples, -1), v.view(2, samples, -1))
    iu = torch.triu_indices(samples, samples, 1)
    sigma = torch.full((2,), bandwidth, dtype=v.dtype) if bandwidth else d[:, iu[0], iu[1]].median(1).values + 1e-6
    x = v.detach().clone().requires_grad_(True)
    diff = x.view(2, samples, 1, -1) - x.view(2, 1, samples, -1)
    u = diff.pow(2).sum(-1)
    (u * torch.exp(-u / sigma.pow(2)[:, None, None])).sum().backward()
    torch.testing.assert_close(kick, x.grad / 2)  # (R sums each pair twice: the i and the j term)
    if samples > 2:  # a row that exited neither moves nor pushes
        act = on.clone()
        act[1] = False
        k2 = LaDiR.repulsion(v, act, samples, bandwidth)
        assert bool((k2[1] == 0).all())
        torch.testing.assert_close(k2, _repulsion_by_hand(v, samples, bandwidth, act.tolist()))


@torch.no_grad()
def test_diversity_guidance_in_the_sampler() -> None:
    """``ladir.diversity_scale`` (default 0): off, the sampler is unchanged bit for bit whatever
    ``samples``; one sample, or a scale of 0, is unguided; the guided step is
    z_0 + dt (v + gamma kick(v)), here from per-row generators' noise; with Prophet the exit
    commits z + (1 - t)(v + gamma kick(v)); questions do not interact."""
    assert load_recipe(recipe()).ladir.diversity_scale == 0.0
    assert load_recipe(recipe()).ladir.diversity_target == "estimate"
    for bad in ({"diversity_scale": -1.0}, {"diversity_bandwidth": -1.0}, {"diversity_target": "state"}):
        with pytest.raises(RecipeError, match="ladir." + next(iter(bad))):
            load_recipe(recipe(**bad))
    torch.manual_seed(0)
    m = build_model(recipe()).double().eval()
    lad = m.ladir
    S, Q = 3, 2
    g = torch.Generator().manual_seed(1)
    q = torch.randint(3, V, (Q, 4), generator=g).repeat_interleave(S, 0)
    qm = torch.ones_like(q, dtype=torch.bool)
    z0 = torch.randn(Q * S, 3, 8, generator=g, dtype=torch.float64)
    base, _ = lad.sample(m, q, qm, prophet=False, z0=z0)
    for kw in ({"samples": S}, {"samples": S, "diversity_scale": 0.0}, {"samples": 1, "diversity_scale": 0.7}):
        torch.testing.assert_close(lad.sample(m, q, qm, prophet=False, z0=z0, **kw)[0], base, atol=0, rtol=0)
    guided, _ = lad.sample(m, q, qm, prophet=False, z0=z0, samples=S, diversity_scale=0.7)
    assert not torch.allclose(guided, base)
    for i in range(Q):  # each question's samples alone give the same latents
        rows = slice(i * S, (i + 1) * S)
        alone, _ = lad.sample(m, q[rows], qm[rows], prophet=False, z0=z0[rows], samples=S, diversity_scale=0.7)
        torch.testing.assert_close(alone, guided[rows])
    with pytest.raises(ValueError, match="6 rows are not questions of 4 samples"):
        lad.sample(m, q, qm, z0=z0, samples=4)
    seen: list = []  # generate(mode="ladir") lays its rows out as questions of ``samples`` each
    orig = lad.sample
    lad.sample = lambda *a, **k: (seen.append(k["samples"]), orig(*a, **k))[1]
    m.generate(q[::S], max_new_tokens=2, mode="ladir", samples=S, prophet=False)
    assert seen == [S]
    del lad.sample

    c = torch.randn(Q * S, 3, 8, generator=g, dtype=torch.float64)
    lad.denoiser = _ExactVelocity(c, lad.denoiser)
    start = torch.stack([torch.randn(3, 8, generator=torch.Generator().manual_seed(10 + i), dtype=torch.float64)
                         for i in range(Q * S)])
    v = c - start  # the velocity at t = 0, where the estimate of z_1 is z_0 + v = c
    cfg = lad.cfg
    for target, at in (("estimate", c), ("velocity", v)):
        lad.cfg = cfg.__class__(**{**cfg.__dict__, "diversity_target": target})
        want = start + (v + 0.5 * _repulsion_by_hand(at, S))  # one Euler step: dt = 1
        gens = [torch.Generator().manual_seed(10 + i) for i in range(Q * S)]  # the start: each row's own noise
        z, _ = lad.sample(m, q, qm, steps=1, prophet=False, generator=gens, samples=S, diversity_scale=0.5)
        torch.testing.assert_close(z, want)
        # Prophet (every check passes): the first check commits z_dt + (1 - dt) v_guided = z_0 + v_guided
        lad.cfg = lad.cfg.__class__(**{**lad.cfg.__dict__,
                                       "prophet": lad.cfg.prophet.__class__(thresholds=(1e-9,) * 3)})
        z, used = lad.sample(m, q, qm, steps=8, prophet=True, z0=start, samples=S, diversity_scale=0.5)
        assert used.tolist() == [1] * (Q * S)
        torch.testing.assert_close(z, want)


class _Contracting(_ExactVelocity):
    """A stand-in denoiser v = c - z: every sample drawn towards c, but not all the way by t = 1."""

    def forward(self, z, t, cond, mask, checkpointing=None):  # noqa: ANN001, ANN201
        return self.c - z


@pytest.mark.parametrize("bandwidth", [0.0, 3.0])
@torch.no_grad()
def test_diversity_guidance_spreads_the_samples_with_the_scale(bandwidth) -> None:
    """On a fixed denoiser that draws every sample of a question towards the same point (v = c - z),
    the samples' mean and smallest pairwise distances grow with the scale (6 samples, 16 steps; the
    median bandwidth and a fixed one). LaDiR's code reads the velocities instead
    (``diversity_target: velocity``): there, with its median bandwidth, the samples end nearer together."""
    S = 6
    g = torch.Generator().manual_seed(2)
    c = torch.randn(1, 3, 8, generator=g, dtype=torch.float64)
    q = torch.randint(3, V, (1, 4), generator=g).repeat(S, 1)
    qm = torch.ones_like(q, dtype=torch.bool)
    z0 = torch.randn(S, 3, 8, generator=g, dtype=torch.float64)
    off = ~torch.eye(S, dtype=torch.bool)

    def spread(target: str) -> list:
        torch.manual_seed(0)
        m = build_model(recipe(diversity_bandwidth=bandwidth, diversity_target=target)).double().eval()
        m.ladir.denoiser = _Contracting(c, m.ladir.denoiser)
        out = []
        for gamma in (0.0, 0.05, 0.1, 0.2, 0.4):
            z, _ = m.ladir.sample(m, q, qm, steps=16, prophet=False, z0=z0, samples=S, diversity_scale=gamma)
            d = torch.cdist(z.view(1, S, -1), z.view(1, S, -1))[0][off]
            out.append((float(d.mean()), float(d.min())))
        return out

    got = spread("estimate")
    for k in (0, 1):
        assert all(a[k] < b[k] for a, b in zip(got, got[1:])), got
    if bandwidth == 0.0:
        code = spread("velocity")
        assert code[-1][0] < code[0][0] and code[-1][1] < code[0][1], code


def test_cfg_options_validated() -> None:
    """``ladir.cfg_dropout`` (default 0: off) in [0, 1) and ``ladir.cfg_scale`` (default 1: unguided) >= 0; a
    scale other than 1 needs a flow trained with condition dropout (its unconditional velocity), else one line."""
    r = load_recipe(recipe())
    assert (r.ladir.cfg_dropout, r.ladir.cfg_scale) == (0.0, 1.0)
    assert load_recipe(recipe(cfg_dropout=0.1, cfg_scale=2.0)).ladir.cfg_scale == 2.0
    assert load_recipe(recipe(cfg_dropout=0.1, cfg_scale=0.0)).ladir.cfg_scale == 0.0  # (the unconditional flow)
    for bad, msg in (({"cfg_dropout": -0.1}, "ladir.cfg_dropout"), ({"cfg_dropout": 1.0}, "ladir.cfg_dropout"),
                     ({"cfg_dropout": 0.1, "cfg_scale": -1.0}, "ladir.cfg_scale"),
                     ({"cfg_scale": 2.0}, r"ladir.cfg_scale: 2 guides with the unconditional velocity.*cfg_dropout > 0")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe(**bad))
    m = build_model(recipe()).eval()
    q = torch.randint(3, V, (2, 4))
    with pytest.raises(ValueError, match=r"cfg_scale 3 guides .* ladir.cfg_dropout > 0 \(0 in this recipe\)"):
        m.ladir.sample(m, q, torch.ones_like(q, dtype=torch.bool), prophet=False, cfg_scale=3.0)
    with pytest.raises(ValueError, match="cfg_scale must be >= 0"):
        build_model(recipe(cfg_dropout=0.1)).ladir.sample(m, q, torch.ones_like(q, dtype=torch.bool),
                                                          cfg_scale=float("nan"))


def test_cfg_null_condition_ignores_the_question() -> None:
    """The null condition (``LaDiR.null_mask``: every question state masked out of the denoiser's
    attention) gives a velocity that does not depend on the question's states, length or padding; and
    the denoiser over conditional and null rows stacked equals the two calls apart (the sampler's batch)."""
    torch.manual_seed(0)
    m = build_model(recipe(cfg_dropout=0.1)).double().eval()
    den = m.ladir.denoiser
    g = torch.Generator().manual_seed(3)
    B = 3
    z, t = torch.randn(B, 3, 8, generator=g, dtype=torch.float64), torch.rand(B, generator=g, dtype=torch.float64)
    c1, c2 = torch.randn(B, 5, 32, generator=g, dtype=torch.float64), torch.randn(B, 7, 32, generator=g,
                                                                                   dtype=torch.float64)
    qm = torch.ones(B, 5, dtype=torch.bool)
    qm[1, 3:] = False
    with torch.no_grad():
        vc = den(z, t, c1, qm)
        vu = den(z, t, c1, LaDiR.null_mask(qm))
        torch.testing.assert_close(den(z, t, c2, LaDiR.null_mask(torch.ones(B, 7, dtype=torch.bool))), vu,
                                   atol=1e-12, rtol=1e-12)
        assert not torch.allclose(vc, vu)
        both = den(torch.cat([z, z]), torch.cat([t, t]), torch.cat([c1, c1]), torch.cat([qm, LaDiR.null_mask(qm)]))
        torch.testing.assert_close(both, torch.cat([vc, vu]), atol=1e-12, rtol=1e-12)


class _Recording(torch.nn.Module):
    """Wraps a denoiser: records the condition masks it is called with."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner, self.out, self.slot, self.masks = inner, inner.out, inner.slot, []

    def forward(self, z, t, cond, mask, checkpointing=None):  # noqa: ANN001, ANN201
        self.masks.append(mask.clone())
        return self.inner(z, t, cond, mask, checkpointing)


def test_cfg_dropout_nulls_exactly_the_drawn_rows_in_training() -> None:
    """With ``cfg_dropout`` p, in training, each (draw, row) of the flow loss draws u ~ U(0, 1) after
    its z_0 and t (same generator, per-row generators too) and sees the null condition exactly where u < p,
    its question elsewhere; the loss is the flow loss over those conditions. In eval (held-out loss), or
    with p = 0, nothing is dropped and nothing more is drawn: the loss equals the p = 0 model's."""
    torch.manual_seed(0)
    p, k, B = 0.5, 4, 3
    m = build_model(recipe(cfg_dropout=p, flow_draws=k)).double()
    lad = m.ladir
    torch.manual_seed(0)
    plain = build_model(recipe(flow_draws=k)).double()
    plain.load_state_dict(m.state_dict())
    b = batch(B)
    qm = b["question_mask"]
    z1 = torch.randn(B, 3, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    cond = torch.randn(B, qm.shape[1], 32, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    lad.denoiser = _Recording(lad.denoiser)
    for per_row in (False, True):
        gens = (torch.Generator().manual_seed(5) if not per_row
                else [torch.Generator().manual_seed(5 + i) for i in range(B)])
        lad.train()
        lad.denoiser.masks.clear()
        loss, _ = lad.velocity_loss(z1, cond, qm, gens, per_row=per_row)
        # replay the generator(s): per draw z_0 [B, M, D], t [B], u [B]
        replay = (torch.Generator().manual_seed(5) if not per_row
                  else [torch.Generator().manual_seed(5 + i) for i in range(B)])
        from hymba_plus.components.ladir import noise

        dropped, z0s, ts = [], [], []
        for _ in range(k):
            z0s.append(noise(torch.randn, z1.shape, z1.device, replay, z1.dtype))
            ts.append(noise(torch.rand, (B,), z1.device, replay, z1.dtype))
            dropped.append(noise(torch.rand, (B,), z1.device, replay) < p)
        dropped = torch.cat(dropped)
        assert 0 < int(dropped.sum()) < k * B  # (this seed drops some rows, not all)
        (mask,) = lad.denoiser.masks
        assert bool((mask[dropped] == 0).all())
        torch.testing.assert_close(mask[~dropped], qm.repeat(k, 1)[~dropped], atol=0, rtol=0)
        # the loss, by hand, over those conditions
        z0, t = torch.cat(z0s), torch.cat(ts)
        zt = (1 - t)[:, None, None] * z0 + t[:, None, None] * z1.repeat(k, 1, 1)
        with torch.no_grad():
            v = lad.denoiser.inner(zt, t, cond.repeat(k, 1, 1), mask)
        err = (v - (z1.repeat(k, 1, 1) - z0)).pow(2)
        want = err.flatten(1).mean(1).view(k, B).mean(0) if per_row else err.mean()
        torch.testing.assert_close(loss.detach(), want)
        # eval: no dropout, the p = 0 model's loss from the same generator
        lad.eval()
        gens2 = (torch.Generator().manual_seed(5) if not per_row
                 else [torch.Generator().manual_seed(5 + i) for i in range(B)])
        gens3 = (torch.Generator().manual_seed(5) if not per_row
                 else [torch.Generator().manual_seed(5 + i) for i in range(B)])
        got, _ = lad.velocity_loss(z1, cond, qm, gens2, per_row=per_row)
        torch.testing.assert_close(got, plain.ladir.velocity_loss(z1, cond, qm, gens3, per_row=per_row)[0],
                                   atol=0, rtol=0)
    plain.ladir.train()  # p = 0 in training: unchanged, nothing more drawn
    g = torch.Generator().manual_seed(5)
    plain.ladir.velocity_loss(z1, cond, qm, g)
    g_ref = torch.Generator().manual_seed(5)
    for _ in range(k):
        noise(torch.randn, z1.shape, z1.device, g_ref, z1.dtype), noise(torch.rand, (B,), z1.device, g_ref, z1.dtype)
    assert torch.equal(g.get_state(), g_ref.get_state())


@torch.no_grad()
def test_cfg_guided_sampler() -> None:
    """``cfg_scale`` w: w = 1 (the default, or given) is the unguided Euler sampler bit for bit (a hand loop
    of denoiser calls); with w != 1 one Euler step is z_0 + (v_u + w (v_c - v_u)) (here from per-row
    generators' noise, with the diversity kick added to the guided velocity), the conditional and null rows
    in one denoiser call per step (rows doubled); Prophet commits z + (1 - t) v_guided."""
    torch.manual_seed(0)
    m = build_model(recipe(cfg_dropout=0.1)).double().eval()
    lad = m.ladir
    den = lad.denoiser
    S, Q, N = 3, 2, 4
    g = torch.Generator().manual_seed(1)
    q = torch.randint(3, V, (Q, 5), generator=g).repeat_interleave(S, 0)
    qm = torch.ones_like(q, dtype=torch.bool)
    qm[S:, 3:] = False
    cond = torch.randn(Q * S, 5, 32, generator=g, dtype=torch.float64)
    z0 = torch.randn(Q * S, 3, 8, generator=g, dtype=torch.float64)
    z = z0.clone()  # the unguided sampler by hand
    for i in range(N):
        z = z + den(z, torch.full((Q * S,), i / N, dtype=torch.float64), cond, qm) / N
    for kw in ({}, {"cfg_scale": 1.0}):
        got, _ = lad.sample(m, q, qm, steps=N, prophet=False, z0=z0, cond=cond, **kw)
        torch.testing.assert_close(got, z, atol=0, rtol=0)

    t0 = torch.zeros(Q * S, dtype=torch.float64)
    vc, vu = den(z0, t0, cond, qm), den(z0, t0, cond, LaDiR.null_mask(qm))
    calls = _Recording(den)
    lad.denoiser = calls
    cfg0 = lad.cfg
    qcache = m.new_cache(Q * S)  # (Prophet's checks read the question's cache)
    m(q, attention_mask=qm.long(), cache=qcache)
    for w in (0.0, 2.5):
        vg = vu + w * (vc - vu)
        gens = [torch.Generator().manual_seed(20 + i) for i in range(Q * S)]
        start = torch.stack([torch.randn(3, 8, generator=torch.Generator().manual_seed(20 + i), dtype=torch.float64)
                             for i in range(Q * S)])
        calls.masks.clear()
        got, _ = lad.sample(m, q, qm, steps=1, prophet=False, generator=gens, cond=cond, cfg_scale=w)
        vg_start = den(start, t0, cond, LaDiR.null_mask(qm)) + w * (den(start, t0, cond, qm)
                                                                   - den(start, t0, cond, LaDiR.null_mask(qm)))
        torch.testing.assert_close(got, start + vg_start)
        (mask,) = calls.masks  # one call over the doubled rows: conditional, then null
        torch.testing.assert_close(mask, torch.cat([qm, LaDiR.null_mask(qm)]), atol=0, rtol=0)
        # with the diversity guidance: the kick at the guided estimate z_0 + v_guided
        got, _ = lad.sample(m, q, qm, steps=1, prophet=False, z0=z0, cond=cond, cfg_scale=w, samples=S,
                            diversity_scale=0.5)
        torch.testing.assert_close(got, z0 + vg + 0.5 * _repulsion_by_hand(z0 + vg, S))
        # Prophet (every check passes): the first check commits z_dt + (1 - dt) v_guided = z_0 + v_guided
        lad.cfg = lad.cfg.__class__(**{**lad.cfg.__dict__,
                                       "prophet": lad.cfg.prophet.__class__(thresholds=(1e-9,) * 3)})
        got, used = lad.sample(m, q, qm, steps=8, prophet=True, z0=z0, cond=cond, cfg_scale=w,
                               qcache=qcache)
        assert used.tolist() == [1] * (Q * S)
        torch.testing.assert_close(got, z0 + vg)
        lad.cfg = cfg0
    # generate(mode="ladir") samples with the recipe's scale: each step one call over the doubled rows
    g2 = build_model(recipe(cfg_dropout=0.1, cfg_scale=2.0)).eval()
    rec = _Recording(g2.ladir.denoiser)
    g2.ladir.denoiser = rec
    g2.generate(q[::S], max_new_tokens=2, mode="ladir", samples=S, prophet=False)
    assert len(rec.masks) == g2.ladir.cfg.inference_steps and all(mk.shape[0] == 2 * Q * S for mk in rec.masks)


def test_the_options_off_keep_the_hash_of_checkpoints_trained_before_them() -> None:
    """flow_target, flow_draws, init_noise_scale, latent_noise, the diversity guidance's and classifier-free
    guidance's settings came after LaDiR checkpoints existed: at the values that train and sample as before
    them (flow_draws 1, the rest off) the recipe keeps the hash it had then (ab3627188c63, this recipe's hash
    at 1cbb655), so ``load_pretrained`` of such a checkpoint does not warn that its recipe.yaml was 'edited
    since'; the default flow_draws (8) is another loss and hashes as one; set, each names the model it
    trained (another hash)."""
    r = load_recipe(recipe(flow_draws=1))
    assert r.hash() == "ab3627188c63"
    assert load_recipe(recipe(flow_draws=1, flow_target="sample", init_noise_scale=1.0, latent_noise=0.0,
                              diversity_scale=0.0, diversity_bandwidth=0.0, diversity_target="estimate",
                              cfg_dropout=0.0, cfg_scale=1.0)).hash() == r.hash()
    changed = [{}, {"flow_target": "mean"}, {"init_noise_scale": 2.5}, {"latent_noise": 0.3},
               {"diversity_scale": 0.1}, {"diversity_bandwidth": 1.0}, {"diversity_target": "velocity"},
               {"cfg_dropout": 0.1}, {"cfg_dropout": 0.1, "cfg_scale": 2.0}]
    hashes = {load_recipe(recipe(**({"flow_draws": 1} | c) if c else {})).hash() for c in changed}
    assert len(hashes) == len(changed) and r.hash() not in hashes


def _latents(m) -> list:  # noqa: ANN001
    """Records the latents ``generate(mode="ladir")`` hands to the slots (the sampler's output)."""
    seen: list = []
    slots = m.ladir.slots

    def record(z, dtype, target="answer"):  # noqa: ANN001, ANN202
        seen.append(z.clone())
        return slots(z, dtype, target)

    m.ladir.slots = record
    return seen


@torch.no_grad()
def test_generate_overrides_the_sampler_settings_for_one_call() -> None:
    """``generate(mode="ladir", cfg_scale=, diversity_scale=, diversity_bandwidth=, diversity_target=,
    init_noise_scale=)`` sample as a model whose recipe sets that value (same weights, same generator), and
    differ from the recipe's own setting; the call leaves the recipe as it was; ``stats`` records the settings
    the sampler used (``hymba generate`` passes its flags here)."""
    base = dict(cfg_dropout=0.1)
    torch.manual_seed(0)
    m = build_model(recipe(**base)).double().eval()
    seen = _latents(m)
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(3))
    run = dict(max_new_tokens=2, mode="ladir", samples=3, prophet=False)
    stats: dict = {}
    m.generate(ids, generator=torch.Generator().manual_seed(0), stats=stats, **run)
    default = seen.pop()
    assert (stats["cfg_scale"], stats["diversity_scale"], stats["diversity_bandwidth"], stats["diversity_target"],
            stats["init_noise_scale"]) == (1.0, 0.0, 0.0, "estimate", 1.0)
    div = dict(diversity_scale=0.5)
    for opt in ({"cfg_scale": 2.0}, {"cfg_scale": 0.0}, div, {**div, "diversity_bandwidth": 6.0},
                {**div, "diversity_target": "velocity"}, {"init_noise_scale": 2.5}):
        stats = {}
        m.generate(ids, generator=torch.Generator().manual_seed(0), stats=stats, **run, **opt)
        got = seen.pop()
        assert {k: stats[k] for k in opt} == opt
        ref = build_model(recipe(**base, **opt)).double().eval()
        ref.load_state_dict(m.state_dict())
        ref_seen = _latents(ref)
        ref.generate(ids, generator=torch.Generator().manual_seed(0), **run)
        torch.testing.assert_close(got, ref_seen.pop(), atol=0, rtol=0, msg=str(opt))
        assert not torch.equal(got, default), opt
    assert m.ladir.cfg == load_recipe(recipe(**base)).ladir  # (one call's settings, the recipe untouched)
    # summary: the sampler's settings that are not the unguided defaults
    stats = {}
    m.generate(ids, stats=stats, cfg_scale=2.0, diversity_scale=0.5, init_noise_scale=2.5, **run)
    assert stats["summary"][0].endswith("; sampler: cfg_scale 2, diversity_scale 0.5 (bandwidth: median, target: "
                                        "estimate), init_noise_scale 2.5")
    m.generate(ids, stats=stats, **run)
    assert "sampler:" not in stats["summary"][0]



def test_the_summary_names_the_diversity_guidance_only_where_it_acts() -> None:
    """With one latent sample per question the diversity guidance (between a question's samples) changes
    nothing, yet the stderr line said "; sampler: diversity_scale 0.5 (...)" as if it had guided them."""
    torch.manual_seed(0)
    m = build_model(recipe()).double().eval()
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(3))
    run = dict(max_new_tokens=2, mode="ladir", prophet=False, diversity_scale=0.5)
    one: dict = {}
    m.generate(ids, stats=one, samples=1, **run)
    assert "sampler:" not in one["summary"][0] and one["diversity_scale"] == 0.5, one["summary"]
    two: dict = {}
    m.generate(ids, stats=two, samples=2, **run)
    assert two["summary"][0].endswith("; sampler: diversity_scale 0.5 (bandwidth: median, target: estimate)")

@pytest.mark.parametrize("kw,says", [
    ({"cfg_scale": -1.0}, "cfg_scale must be >= 0 (a finite number, as ladir.cfg_scale in a recipe), got -1.0"),
    ({"cfg_scale": float("inf")}, "cfg_scale must be >= 0"),
    ({"cfg_scale": True}, "cfg_scale must be >= 0"),
    ({"diversity_scale": -0.1}, "diversity_scale must be >= 0 (a finite number, as ladir.diversity_scale"),
    ({"diversity_scale": "0.5"}, "diversity_scale must be >= 0"),
    ({"diversity_bandwidth": float("nan")}, "diversity_bandwidth must be >= 0"),
    ({"diversity_target": "state"}, "diversity_target must be 'estimate' or 'velocity' (as ladir.diversity_target in a recipe), got 'state'"),
    ({"init_noise_scale": 0.0}, "init_noise_scale must be > 0 (a finite number, as ladir.init_noise_scale"),
    # past float32's range, as the recipe's fields (a bandwidth of 1e308 was an OverflowError traceback)
    ({"diversity_bandwidth": 1e308}, "diversity_bandwidth must be within float32's range (magnitude <= 3.403e+38, "
                                     "as ladir.diversity_bandwidth in a recipe), got 1e+308"),
    ({"init_noise_scale": 1e39}, "init_noise_scale must be within float32's range"),
])
def test_generate_refuses_sampler_settings_the_recipe_refuses(kw, says) -> None:
    """The per-call settings are checked as the recipe's fields are, before any forward."""
    m = build_model(recipe(cfg_dropout=0.1)).eval()
    calls: list = []
    m.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError) as e:
        m.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=2, mode="ladir", **kw)
    assert says in str(e.value) and "\n" not in str(e.value) and not calls


def test_generate_refuses_guidance_the_denoiser_never_learned() -> None:
    """``cfg_scale`` != 1 without ``cfg_dropout`` in the recipe is refused per call as in the recipe (1 is
    the unguided sampler: accepted); a model without a ladir section refuses mode ladir whatever the options."""
    m = build_model(recipe()).eval()
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match=r"cfg_scale 2 guides .* ladir.cfg_dropout > 0 \(0 in this recipe\)"):
        m.generate(ids, max_new_tokens=2, mode="ladir", cfg_scale=2.0)
    m.generate(ids, max_new_tokens=2, mode="ladir", cfg_scale=1.0)
    plain = build_model({"name": "p", "model": {"vocab_size": V, "d_model": 32, "block_pattern": "GA"}})
    with pytest.raises(ValueError, match="ladir section"):
        plain.generate(ids, max_new_tokens=2, mode="ladir", cfg_scale=2.0)
