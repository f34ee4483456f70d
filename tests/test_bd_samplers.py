"""BD3-LM's ancestral samplers for block diffusion (``generate(mode="block_diffusion",
sampler="ddpm" | "first_hitting")``, ``models/generation.py``; ``hymba generate --sampler``):
a DDPM step reveals each masked position with probability (alpha_s - alpha_t) / (1 - alpha_t) on
the objective's schedule (counted over many rows, within binomial standard deviations), first
hitting reveals exactly one position a step, every block ends without a [MASK], seeded runs
repeat, greedy picks the model's argmax, the CLI flag and its refusals, and a model trained on a
copy task copies as well with them as with the confidence sampler."""

from __future__ import annotations

import math

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import generate as generate_cli
from hymba_plus.cli import main
from hymba_plus.models import generation
from hymba_plus.objectives.block_diffusion import mask_rate
from tests.helpers import BD_COPY, bd_copy_batch, train_bd_copy

V = 24
BASE = {
    "name": "bd-samplers",
    "model": {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": "GD | GA", "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
                   "mlp": {"d_hidden": 64}},
    "objective": {"kind": "block_diffusion", "block_size": 4},
}


def make_model(**objective):
    torch.manual_seed(0)
    m = build_model({**BASE, "objective": {**BASE["objective"], **objective}}).double().eval()
    with torch.no_grad():  # a sharper random model: its argmax is not a near-tie
        m.lm_head.weight.mul_(30.0)
    return m


@pytest.fixture(scope="module")
def model():
    return make_model()


def denoising_inputs(model, **kw) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """generate's output and the block it fed each denoising forward (the bidirectional calls on a fork)."""
    seen: list[torch.Tensor] = []

    def pre(_mod, args, kwargs):
        if kwargs.get("bidirectional"):
            seen.append(args[0].clone())

    h = model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        out = model.generate(mode="block_diffusion", **kw)
    finally:
        h.remove()
    return out, seen


@pytest.mark.parametrize("schedule, extra", [("log_linear", {}), ("cosine", {}),
                                             ("exponential", {"exponent": 2.0})])
def test_ddpm_reveals_each_masked_position_with_the_schedules_probability(schedule, extra) -> None:
    """Over 600 rows x 4 positions, the fraction of masked positions a step reveals is
    1 - m(s) / m(t) = (alpha_s - alpha_t) / (1 - alpha_t) within 4 binomial standard deviations, at
    every step of the grid (the last one reveals the rest). A step that reveals nothing in any row
    runs no forward, so consecutive denoising inputs may span several steps: with 600 rows that has
    probability below 1e-70 here, and the per-step check would fail loudly if it happened."""
    model = make_model(schedule=schedule, **extra)
    mask_id, steps = model.objective.mask_token_id, 5
    ids = torch.randint(0, V, (600, 4), generator=torch.Generator().manual_seed(0))
    st: dict = {}
    out, seen = denoising_inputs(model, input_ids=ids, max_new_tokens=4, temperature=1.0, sampler="ddpm",
                                 steps=steps, generator=torch.Generator().manual_seed(1), stats=st)
    t = 1.0 - torch.arange(steps + 1, dtype=torch.float64) / steps
    m = mask_rate(model.objective.cfg, t)
    assert len(seen) == steps and st["steps_per_block"] == steps
    states = [*seen, out[:, 4:]]
    for i in range(steps):
        before, after = states[i] == mask_id, states[i + 1] == mask_id
        assert not (after & ~before).any()  # a revealed token stays
        n = int(before.sum())
        p = float(1.0 - m[i + 1] / m[i])
        got = int((before & ~after).sum())
        std = math.sqrt(n * p * (1 - p))
        assert abs(got - n * p) <= 4 * std + 1e-9, (i, got, n, p)
    assert not (out == mask_id).any()


@pytest.mark.parametrize("n_steps", [1, 2, 7, 64, 10**10])
def test_ddpm_reveal_steps_follow_the_schedule_at_any_number_of_steps(n_steps) -> None:
    """``ddpm_reveal_steps``: 40000 positions' steps; the fraction revealed by step i is 1 - m(t_(i+1))
    within 4 binomial standard deviations at every step checked (all of a short grid; a spread of
    steps of a long one), the last step reveals every one left, and 10^10 steps cost no more
    than ~34 bisection rounds (a grid that size is 80 GB: the per-step form could not build it)."""
    cfg = make_model(schedule="cosine").objective.cfg
    n = 40000
    at = generation.ddpm_reveal_steps(cfg, (n,), n_steps, torch.Generator().manual_seed(0), "cpu")
    assert at.dtype == torch.long and int(at.min()) >= 0 and int(at.max()) <= n_steps - 1
    checked = range(n_steps) if n_steps <= 64 else [0, 10**5, 10**9, n_steps // 2, n_steps - 2]
    for i in checked:
        p = 1.0 - float(mask_rate(cfg, torch.tensor(1.0 - (i + 1) / n_steps, dtype=torch.float64)))
        got = int((at <= i).sum())
        assert abs(got - n * p) <= 4 * math.sqrt(n * p * (1 - p)) + 1e-9, (i, got, n * p)
    assert int((at <= n_steps - 1).sum()) == n


def test_first_hitting_reveals_exactly_one_uniformly_chosen_position_a_step(model) -> None:
    mask_id = model.objective.mask_token_id
    ids = torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(2))
    st: dict = {}
    out, seen = denoising_inputs(model, input_ids=ids, max_new_tokens=8, sampler="first_hitting",
                                 generator=torch.Generator().manual_seed(3), stats=st)
    assert len(seen) == 8 and st["steps_per_block"] == 4.0  # 2 blocks of 4, one position a forward
    assert st["forwards"] == 1 + 8 + 1 and st["sampler"] == "first_hitting"
    blocks = [seen[:4] + [out[:, 4:8]], seen[4:] + [out[:, 8:12]]]
    for states in blocks:
        for a, b in zip(states, states[1:]):
            revealed = (a == mask_id) & (b != mask_id)
            assert torch.equal(revealed.sum(1), torch.ones(3, dtype=torch.long))
            assert torch.equal(a[a != mask_id], b[a != mask_id])
    # uniform: 30000 rows of 5 masked positions among 8, each chosen ~1/5 of the time
    g = torch.Generator().manual_seed(4)
    masked = torch.zeros(30000, 8, dtype=torch.bool)
    masked[:, [0, 2, 3, 5, 7]] = True
    r = generation.first_hitting_reveal(masked, g)
    assert torch.equal(r.sum(1), torch.ones(30000, dtype=torch.long)) and not (r & ~masked).any()
    counts = r.sum(0)[[0, 2, 3, 5, 7]].double()
    assert (counts - 6000).abs().max() <= 4 * math.sqrt(30000 * 0.2 * 0.8), counts
    # a budget below the block size: the last allowed step reveals the rest
    st = {}
    _, seen = denoising_inputs(model, input_ids=ids, max_new_tokens=4, sampler="first_hitting", steps=2,
                               generator=torch.Generator().manual_seed(5), stats=st)
    assert len(seen) == 2 and int((seen[1] == mask_id).sum()) == 3 * 3  # one revealed, three left per row


@pytest.mark.parametrize("sampler", ["ddpm", "first_hitting"])
@pytest.mark.parametrize("steps", [None, 1, 3, 40, 10**10])
def test_every_block_ends_fully_unmasked(model, sampler, steps) -> None:
    """Whatever the step budget (ddpm: one step reveals all; 40 or 10^10 steps over a block of 4: at most
    one forward per step revealing in any row), with a cut last block and a block narrower than block_size where
    max_seq_len leaves no room."""
    mask_id = model.objective.mask_token_id
    ids = torch.randint(0, V, (4, 5), generator=torch.Generator().manual_seed(6))
    g = torch.Generator().manual_seed(7)
    st: dict = {}
    out = model.generate(ids, max_new_tokens=10, mode="block_diffusion", sampler=sampler, steps=steps,
                         temperature=1.0, generator=g, stats=st)
    assert out.shape == (4, 15) and not (out == mask_id).any() and ((out >= 0) & (out < V)).all()
    assert 1 <= st["steps_per_block"] <= 4 * 4, st  # (the mean over blocks; a step revealing in any of 4 rows)
    tight = torch.randint(0, V, (2, 58), generator=torch.Generator().manual_seed(8))  # max_seq_len 64
    out = model.generate(tight, max_new_tokens=6, mode="block_diffusion", sampler=sampler, steps=steps, generator=g)
    assert out.shape == (2, 64) and not (out == mask_id).any()


@pytest.mark.parametrize("sampler", ["ddpm", "first_hitting"])
def test_seeded_runs_repeat_and_seeds_differ(model, sampler) -> None:
    ids = torch.randint(0, V, (4, 4), generator=torch.Generator().manual_seed(9))

    def run(seed: int, temperature: float) -> torch.Tensor:
        return model.generate(ids, max_new_tokens=8, mode="block_diffusion", sampler=sampler, temperature=temperature,
                              top_p=0.9, generator=torch.Generator().manual_seed(seed))

    for temperature in (0.0, 1.0):
        a = run(11, temperature)
        assert torch.equal(a, run(11, temperature))
        assert any(not torch.equal(a, run(s, temperature)) for s in range(12, 20))


def test_greedy_reveals_the_models_argmax(model) -> None:
    """At temperature 0 a revealed token is the argmax of the model's logits at that step (which
    positions, and when, is still drawn): with blocks of 1 every sampler gives the same tokens, and
    at every step the revealed tokens equal the argmax of the forward that revealed them."""
    ids = torch.randint(0, V, (3, 5), generator=torch.Generator().manual_seed(10))
    outs = [model.generate(ids, max_new_tokens=6, mode="block_diffusion", block_size=1, sampler=s,
                           generator=torch.Generator().manual_seed(1))
            for s in generation.SAMPLERS]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    mask_id = model.objective.mask_token_id
    logits_seen: list[torch.Tensor] = []
    h = model.register_forward_hook(
        lambda _m, _a, kw, o: logits_seen.append(o.logits) if kw.get("bidirectional") else None, with_kwargs=True)
    try:
        out, seen = denoising_inputs(model, input_ids=ids, max_new_tokens=4, sampler="ddpm", steps=8,
                                     generator=torch.Generator().manual_seed(2))
    finally:
        h.remove()
    states = [*seen, out[:, 5:]]
    for i, logits in enumerate(logits_seen):
        revealed = (states[i] == mask_id) & (states[i + 1] != mask_id)
        assert revealed.any()
        assert torch.equal(states[i + 1][revealed], logits.argmax(-1)[revealed])


def test_default_sampler_is_the_confidence_sampler(model) -> None:
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(12))
    a = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.5)
    b = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.5, sampler="confidence")
    assert torch.equal(a, b)


def test_errors(model) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    for bad in ("random", None, 1):
        with pytest.raises(ValueError, match="sampler must be one of confidence, ddpm, first_hitting"):
            model.generate(ids, max_new_tokens=2, mode="block_diffusion", sampler=bad)
    with pytest.raises(ValueError, match="takes no option 'sampler'"):
        model.generate(ids, max_new_tokens=2, sampler="ddpm")
    assert generate_cli.SAMPLERS == generation.SAMPLERS  # the CLI's copy (it imports no torch for --help)


@pytest.mark.parametrize("sampler", ["ddpm", "first_hitting"])
@pytest.mark.parametrize("threshold", [0.9, 0.5, None])
def test_a_threshold_given_to_a_random_position_sampler_is_refused(model, sampler, threshold) -> None:
    """``threshold`` is the confidence sampler's alone: given with ddpm / first_hitting (even the
    confidence sampler's default 0.9, or None: the steps schedule) it is refused in one line naming
    both, as ``hymba generate --sampler ddpm --threshold X`` is, not silently ignored."""
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError) as e:
        model.generate(ids, max_new_tokens=2, mode="block_diffusion", sampler=sampler, threshold=threshold)
    msg = str(e.value)
    assert "\n" not in msg and f"threshold={threshold!r}" in msg and f"sampler={sampler!r}" in msg
    # not given: each sampler runs (the confidence sampler at its default 0.9)
    st: dict = {}
    model.generate(ids, max_new_tokens=2, mode="block_diffusion", sampler=sampler, stats=st)
    assert st["sampler"] == sampler
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 4), generator=g)
    assert torch.equal(model.generate(ids, max_new_tokens=8, mode="block_diffusion"),
                       model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.9))


def test_cli_sampler_flag(tmp_path, capsys) -> None:
    from hymba_plus.training.tokenizer import IdsTokenizer

    ckpt = tmp_path / "ckpt"
    build_model(BASE).save_pretrained(ckpt, extra_files={"tokenizer.json": IdsTokenizer(V).to_json()})
    base = ["generate", str(ckpt), "--prompt", "3 4 5 6", "--mode", "block_diffusion", "--max-new-tokens", "8"]
    outs = []
    for seed in ("1", "1"):
        rc = main([*base, "--sampler", "first_hitting", "--seed", seed, "--no-stream"])
        cap = capsys.readouterr()
        assert rc == 0, cap.err
        assert ("block diffusion (first_hitting sampler): block size 4, 10 forward passes for 8 tokens per row"
                in cap.err and "4.00 denoising steps per block" in cap.err)
        outs.append(cap.out)
    assert outs[0] == outs[1]  # --seed: the same tokens
    rc = main([*base, "--sampler", "ddpm", "--steps", "16"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "block diffusion (ddpm sampler): block size 4" in cap.err
    rc = main(["generate", str(ckpt), "--prompt", "3", "--sampler", "ddpm"])
    assert rc == 2 and "--sampler: only for --mode block_diffusion" in capsys.readouterr().err
    rc = main([*base, "--sampler", "ddpm", "--threshold", "0.5"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--threshold: only for --sampler confidence" in err
    with pytest.raises(SystemExit) as e:  # argparse's choices
        main([*base, "--sampler", "random"])
    assert e.value.code == 2 and "argument --sampler: invalid choice: 'random'" in capsys.readouterr().err
    rc = main([*base, "--sampler", "confidence", "--threshold", "1"])
    assert rc == 0 and "block diffusion: block size 4, 10 forward passes" in capsys.readouterr().err


def test_a_trained_copy_model_copies_with_every_sampler() -> None:
    """The copy task of ``test_block_diffusion.py`` (x = [a | a], the second half scored), trained
    briefly; then each sampler generates the second half from the first (two blocks of 4). BD3-LM's
    samplers copy about as well as the confidence sampler (which needs no randomness here)."""
    half = 8
    torch.manual_seed(0)
    model = build_model(BD_COPY)
    train_bd_copy(model, 120)
    model.eval()
    a = bd_copy_batch(128, torch.Generator().manual_seed(123))[0][:, :half]
    acc = {}
    with torch.no_grad():
        for sampler in generation.SAMPLERS:
            for temperature in (0.0, 1.0):
                out = model.generate(a, max_new_tokens=half, mode="block_diffusion", sampler=sampler,
                                     temperature=temperature, generator=torch.Generator().manual_seed(0))
                acc[sampler, temperature] = float((out[:, half:] == a).float().mean())
    assert all(v > 0.9 for v in acc.values()), acc  # chance: 1/16
    for temperature in (0.0, 1.0):
        for sampler in ("ddpm", "first_hitting"):
            assert acc[sampler, temperature] >= acc["confidence", temperature] - 0.08, acc
