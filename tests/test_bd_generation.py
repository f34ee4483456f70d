"""Block-diffusion sampling (``generate(mode="block_diffusion")``, ``models/generation.py``)
and ``hymba generate --mode block_diffusion``: committing blocks through the cache equals
recomputing the prefix for every block, threshold >= 1 is one token per step and
deterministic, denoising never moves the cache, left padding is exact, EOS, the steps
schedule, the stats, and the errors."""

from __future__ import annotations

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.models.generation import token_confidence

BASE = {
    "name": "bd-gen",
    "model": {"vocab_size": 24, "d_model": 32, "max_seq_len": 64, "block_pattern": "GD | GA | M3 | ATL | HY",
              "meta_tokens": 2},
    "components": {"gated_attn": {"n_heads": 2, "head_dim": 16, "window": 9},
                   "gdn": {"n_heads": 2, "head_dim": 16},
                   "mamba3": {"state_size": 8, "head_dim": 16, "expand": 1},
                   "atlas": {"n_heads": 2, "head_dim": 16, "poly_degree": 1, "memory_hidden": 1, "ns_steps": 2},
                   "hymba": {"ssm": "gdn", "attn": {"n_heads": 2, "head_dim": 16}},
                   "mlp": {"d_hidden": 64}},
    "objective": {"kind": "block_diffusion", "block_size": 4},
}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model(BASE).double().eval()
    with torch.no_grad():  # a sharper random model: confidences spread over (0, 1)
        m.lm_head.weight.mul_(30.0)
    return m


def recompute_sampler(model, ids: torch.Tensor, n_new: int, threshold: float) -> torch.Tensor:
    """The oracle: no cache is kept between blocks; every block's denoising steps run on a
    fresh prefill of the prompt and all blocks committed so far (one row, greedy). A last,
    partial block is denoised at the full block size where it fits, then cut."""
    bs, mask_id = model.objective.cfg.block_size, model.objective.mask_token_id
    seq = ids
    for start in range(0, n_new, bs):
        size = min(bs, n_new - start)
        x = torch.full((1, min(bs, model.config.max_seq_len - ids.shape[1] - start)), mask_id, dtype=ids.dtype)
        while bool((x == mask_id).any()):
            cache = model.new_cache(1)
            model(seq, cache=cache)
            logits = model(x, cache=cache, bidirectional=True).logits
            tok, conf = token_confidence(logits, 0.0, None, None, None)
            masked = x == mask_id
            conf = conf.masked_fill(~masked, -1.0)
            accept = masked & (conf >= threshold) if threshold < 1 else torch.zeros_like(masked)
            accept[0, conf[0].argmax()] = True
            x = torch.where(accept, tok, x)
        seq = torch.cat([seq, x[:, :size]], dim=1)
    return seq


@pytest.mark.parametrize("threshold", [0.3, 0.9, 1.0])
def test_cached_blocks_equal_recomputing_the_prefix(model, threshold) -> None:
    ids = torch.randint(0, 24, (1, 6), generator=torch.Generator().manual_seed(1))
    want = recompute_sampler(model, ids, 10, threshold)
    got = model.generate(ids, max_new_tokens=10, mode="block_diffusion", temperature=0.0, threshold=threshold)
    assert torch.equal(got, want)


def test_threshold_one_is_one_token_per_step_and_deterministic(model) -> None:
    ids = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(2))
    st: dict = {}
    a = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=1.0, stats=st)
    b = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=1.0)
    assert torch.equal(a, b)
    assert st["steps_per_block"] == 4.0  # one token per denoising step
    assert st["forwards"] == 1 + 2 * 4 + 1  # prefill, 4 steps per block, one commit between the blocks
    assert st["tokens"] == 16 and st["tokens_per_forward"] == pytest.approx(8 / 10)
    low: dict = {}
    model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.05, stats=low)
    assert low["forwards"] < st["forwards"]  # a low threshold unmasks several tokens per step


def test_denoising_never_moves_the_cache(model) -> None:
    """A denoising step runs on ``cache.fork()``: every state tensor of the real cache (KV,
    conv, gdn / mamba3 / ATLAS states, hymba's pair) and its positions stay as they were."""
    ids = torch.randint(0, 24, (2, 7), generator=torch.Generator().manual_seed(3))
    cache = model.new_cache(2)
    model(ids, cache=cache)
    before = [[(n, t.clone()) for n, t in s.tensors()] if s is not None else [] for s in cache.states]
    pos = cache.pos.clone()
    x = torch.full((2, 4), model.objective.mask_token_id)
    for _ in range(3):
        model(x, cache=cache.fork(), bidirectional=True)
    assert torch.equal(cache.pos, pos)
    kinds = set()
    for s, old in zip(cache.states, before):
        now = list(s.tensors()) if s is not None else []
        assert [n for n, _ in now] == [n for n, _ in old]
        for (name, t), (_, t0) in zip(now, old):
            assert torch.equal(t, t0), name
        kinds.add(type(s).__name__)
    assert {"GDNState", "AttentionState", "Mamba3State", "AtlasState", "HymbaState"} <= kinds


@pytest.mark.parametrize("threshold", [0.5, 1.0])
def test_etd_models_sample_blocks_as_recomputing_the_prefix(threshold) -> None:
    """An ETD model (think block applied twice, each application its own state) samples by block
    diffusion through its cache exactly as recomputing the prefix for every block."""
    torch.manual_seed(0)
    r = {**BASE, "model": {**BASE["model"], "block_pattern": "GD | (GA | M3 | ATL) | HY",
                           "etd": {"encoder_layers": 1, "think_layers": 3, "decoder_layers": 1, "iterations": 2}}}
    m = build_model(r).double().eval()
    with torch.no_grad():
        m.lm_head.weight.mul_(30.0)
    ids = torch.randint(0, 24, (1, 5), generator=torch.Generator().manual_seed(2))
    want = recompute_sampler(m, ids, 9, threshold)
    got = m.generate(ids, max_new_tokens=9, mode="block_diffusion", temperature=0.0, threshold=threshold)
    assert torch.equal(got, want)


def test_left_padding_is_exact(model) -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randint(0, 24, (1, 7), generator=g), torch.randint(0, 24, (1, 4), generator=g)
    ids = torch.zeros(2, 7, dtype=torch.long)
    ids[0], ids[1, 3:] = a[0], b[0]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    both = model.generate(ids, max_new_tokens=6, mode="block_diffusion", attention_mask=mask, threshold=0.5)
    one_a = model.generate(a, max_new_tokens=6, mode="block_diffusion", threshold=0.5)
    one_b = model.generate(b, max_new_tokens=6, mode="block_diffusion", threshold=0.5)
    assert torch.equal(both[0, 7:], one_a[0, 7:]) and torch.equal(both[1, 7:], one_b[0, 4:])


def test_a_model_without_meta_tokens_starts_from_nothing() -> None:
    """An empty prompt (or rows of pads only) on a model without meta tokens: the prefill of no token
    failed in gdn's chunked reference (torch.stack of no chunk). There is nothing to prefill: block 0
    is denoised on an empty cache, as a row of pads beside a real prompt is."""
    torch.manual_seed(0)
    m = build_model({**BASE, "model": {**BASE["model"], "meta_tokens": 0}}).double().eval()
    ids = torch.randint(0, 24, (2, 5), generator=torch.Generator().manual_seed(1))
    st: dict = {}
    empty = m.generate(ids[:1, :0], max_new_tokens=6, mode="block_diffusion", threshold=0.5, stats=st)
    assert empty.shape == (1, 6) and st["forwards"] == 2 * 4 + 1  # no prefill: 2 blocks of 4 steps, 1 commit
    mask = torch.ones_like(ids)
    mask[1] = 0
    both = m.generate(ids, max_new_tokens=6, mode="block_diffusion", attention_mask=mask, threshold=0.5)
    pads = m.generate(ids, max_new_tokens=6, mode="block_diffusion", attention_mask=torch.zeros_like(ids),
                      threshold=0.5)
    assert torch.equal(both[1, 5:], empty[0]) and torch.equal(pads[:, 5:], empty.expand(2, -1))


def test_steps_schedule_and_eos(model) -> None:
    ids = torch.randint(0, 24, (2, 4), generator=torch.Generator().manual_seed(5))
    st: dict = {}
    model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=None, steps=2, stats=st)
    assert st["steps_per_block"] == 2.0  # 2 tokens per step: every block in 2 steps
    out = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.5)
    eos = int(out[0, 5])  # a token the first row generates at its second new position
    got = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.5, eos_token_id=eos)
    row = got[0, 4:].tolist()
    first = row.index(eos)
    assert all(t == eos for t in row[first:])  # from the first EOS on, the row is over


def test_sampling_with_temperature_is_seeded(model) -> None:
    ids = torch.randint(0, 24, (2, 4), generator=torch.Generator().manual_seed(6))
    runs = [model.generate(ids, max_new_tokens=6, mode="block_diffusion", temperature=1.0, top_k=5,
                           generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert ((runs[0] >= 0) & (runs[0] < 24)).all()  # never the [MASK] id


def test_errors(model) -> None:
    ids = torch.zeros(1, 3, dtype=torch.long)
    ar = build_model({k: v for k, v in BASE.items() if k != "objective"})
    with pytest.raises(ValueError, match="block_diffusion objective"):
        ar.generate(ids, max_new_tokens=2, mode="block_diffusion")
    with pytest.raises(ValueError, match="block_size"):
        model.generate(ids, max_new_tokens=2, mode="block_diffusion", block_size=0)
    with pytest.raises(ValueError, match="threshold"):
        model.generate(ids, max_new_tokens=2, mode="block_diffusion", threshold=0.0)
    with pytest.raises(ValueError, match="takes no option 'threshold'"):
        model.generate(ids, max_new_tokens=2, threshold=0.5)


def test_cli_block_diffusion(tmp_path, capsys) -> None:
    from hymba_plus.training.tokenizer import IdsTokenizer

    ckpt = tmp_path / "ckpt"
    model = build_model(BASE)
    model.save_pretrained(ckpt, extra_files={"tokenizer.json": IdsTokenizer(24).to_json()})
    rc = main(["generate", str(ckpt), "--prompt", "3 4 5 6", "--mode", "block_diffusion", "--max-new-tokens", "8",
               "--temperature", "0", "--threshold", "1"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "block diffusion: block size 4, 10 forward passes for 8 tokens per row" in cap.err
    assert "2.00 denoising steps" not in cap.err and "4.00 denoising steps per block" in cap.err
    # --threshold none: the steps schedule (2 steps a block: 8 tokens in 4 denoising forwards + 1 commit + prefill)
    rc = main(["generate", str(ckpt), "--prompt", "3 4 5 6", "--mode", "block_diffusion", "--max-new-tokens", "8",
               "--temperature", "0", "--threshold", "none", "--steps", "2"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "6 forward passes for 8 tokens per row" in cap.err and "2.00 denoising steps per block" in cap.err
    rc = main(["generate", str(ckpt), "--prompt", "3", "--steps", "2"])
    assert rc == 2 and "--steps: only for --mode block_diffusion" in capsys.readouterr().err
    rc = main(["generate", str(ckpt), "--prompt", "3", "--threshold", "none"])
    assert rc == 2 and "--threshold: only for --mode block_diffusion" in capsys.readouterr().err
    rc = main(["generate", str(ckpt), "--prompt", "3", "--mode", "block_diffusion", "--threshold", "-1"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") == 1 and "--threshold" in err


def test_a_cut_last_block_is_denoised_at_the_full_block_size(model) -> None:
    """max_new_tokens 6 with block 4: the second block is denoised as 4 [MASK] slots (what
    training shows) and cut to 2, so its tokens are the first 2 of max_new_tokens 8's (greedy).
    Where max_seq_len leaves no room for the full block, the block is as long as the room."""
    ids = torch.randint(0, 24, (3, 6), generator=torch.Generator().manual_seed(4))
    full = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.9)
    cut = model.generate(ids, max_new_tokens=6, mode="block_diffusion", threshold=0.9)
    assert torch.equal(cut, full[:, :12])
    tight = torch.randint(0, 24, (1, 58), generator=torch.Generator().manual_seed(5))  # max_seq_len 64
    st: dict = {}
    out = model.generate(tight, max_new_tokens=6, mode="block_diffusion", threshold=1.0, stats=st)
    assert out.shape == (1, 64) and st["steps_per_block"] == 3.0  # blocks of 4 and 2: one token a step


def test_confidence_is_the_models_probability_whatever_the_sampling_filter(model) -> None:
    """The threshold compares the model's own softmax probability (Fast-dLLM), not the filtered
    distribution's: with top_k 1 every filtered probability is 1, which unmasked whole blocks in one
    step; now top_k 1 at temperature 1 takes the greedy path's tokens and steps."""
    ids = torch.randint(0, 24, (2, 4), generator=torch.Generator().manual_seed(6))
    greedy, topk1 = {}, {}
    a = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.9, stats=greedy)
    b = model.generate(ids, max_new_tokens=8, mode="block_diffusion", threshold=0.9, temperature=1.0, top_k=1,
                       stats=topk1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and topk1["steps_per_block"] == greedy["steps_per_block"] > 1.0


def test_mask_id_is_an_input_of_noisy_blocks_only(model) -> None:
    """[MASK] (one id past the vocabulary) in a prompt was taken by every mode (the clean stream
    never holds it in training); only a bidirectional (noisy) block reads it."""
    m = model.objective.mask_token_id
    prompt = torch.tensor([[3, 4, m]])
    for mode in ("ar", "block_diffusion"):
        with pytest.raises(ValueError, match=rf"input_ids: token id {m} at \[0, 2\] is block diffusion's \[MASK\], "
                                             "which only a noisy block reads"):
            model.generate(prompt, max_new_tokens=4, mode=mode)
    with pytest.raises(ValueError, match="is block diffusion's"):
        model(prompt)
    with torch.no_grad():  # a noisy block on a cache holding a clean prefix
        cache = model.new_cache(1)
        model(prompt[:, :2], cache=cache)
        assert model(torch.full((1, 4), m), cache=cache.fork(), bidirectional=True).logits.shape == (1, 4, 24)
    with pytest.raises(ValueError, match=r"token id 25 at \[0, 0\] is outside the vocabulary \(vocab_size 24; "
                                         r"the \[MASK\] id is 24\)"):
        model(torch.tensor([[25]]), bidirectional=True)


def llada_steps_sampler(model, ids: torch.Tensor, n_new: int, steps: int) -> torch.Tensor:
    """The oracle of the steps schedule (one row, greedy, the prefix recomputed for every step):
    LLaDA / Fast-dLLM's ``get_num_transfer_tokens`` splits a block's masks over ``steps`` (the
    remainder on the first steps) and each step unmasks that many most confident masked
    positions (``get_transfer_index`` with ``low_confidence`` remasking, no threshold)."""
    bs, mask_id = model.objective.cfg.block_size, model.objective.mask_token_id
    seq = ids
    for start in range(0, n_new, bs):
        width = min(bs, model.config.max_seq_len - ids.shape[1] - start)
        x = torch.full((1, width), mask_id, dtype=ids.dtype)
        n = min(steps, width)
        for k in [width // n + (1 if i < width % n else 0) for i in range(n)]:
            cache = model.new_cache(1)
            model(seq, cache=cache)
            probs = model(x, cache=cache, bidirectional=True).logits.double().softmax(-1)
            tok = probs.argmax(-1)
            conf = probs.gather(-1, tok[..., None])[..., 0].masked_fill(x != mask_id, -float("inf"))
            pick = conf[0].topk(k).indices
            x = x.clone()
            x[0, pick] = tok[0, pick]
        assert not bool((x == mask_id).any())
        seq = torch.cat([seq, x[:, :min(bs, n_new - start)]], dim=1)
    return seq


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_steps_schedule_equals_lladas_transfer_counts(model, steps) -> None:
    """threshold None: every block's masks are unmasked over ``steps`` in LLaDA's counts (a cut last
    block included), the most confident first, rows independent of each other."""
    ids = torch.randint(0, 24, (2, 6), generator=torch.Generator().manual_seed(1))
    for n_new in (8, 10):
        got = model.generate(ids, max_new_tokens=n_new, mode="block_diffusion", threshold=None, steps=steps)
        want = torch.cat([llada_steps_sampler(model, ids[i:i + 1], n_new, steps) for i in range(2)])
        assert torch.equal(got, want)


def test_eos_only_ends_rows_it_does_not_change_the_tokens_before_it(model) -> None:
    """With an end id every row is the output without one, cut at its first end id (the end id
    written after it, across block boundaries), and generation stops once every row has ended."""
    ids = torch.randint(0, 24, (3, 6), generator=torch.Generator().manual_seed(1))
    free = model.generate(ids, max_new_tokens=14, mode="block_diffusion", threshold=0.5)[:, 6:]
    seen_short = seen_cross = False
    for eos in sorted(set(free.flatten().tolist())):
        got = model.generate(ids, max_new_tokens=14, mode="block_diffusion", threshold=0.5, eos_token_id=eos)[:, 6:]
        hit = (free == eos).int()
        want = torch.where(hit.cumsum(1) - hit > 0, eos, free)
        assert torch.equal(got, want[:, :got.shape[1]])
        ended = bool(hit.any(1).all())
        assert got.shape[1] == 14 or ended  # cut short only when every row has ended, at a block's end
        if got.shape[1] < 14:
            seen_short = True
            assert got.shape[1] % 4 == 0 and bool((got == eos).any(1).all())
        seen_cross |= bool(((hit.cumsum(1) > 0).int().argmax(1) < 4).any() and got.shape[1] > 4)
    assert seen_short and seen_cross  # both cases occurred
