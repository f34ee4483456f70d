"""Speculative decoding (``generate(mode="speculative", draft=..., k=...)``,
``models/generation.py``) and ``hymba generate --mode speculative``: greedy output equals
``ar`` token for token for every memory system (windowed attention with meta tokens, gdn,
mamba3, ATLAS, hymba, MoE, ETD with ACT halting and routes), left-padded batches, k 1/3/5,
EOS; a draft that is the target accepts everything; a noisy copy accepts some; sampling has
the target's exact distribution (chi-square against probabilities computed from full
forwards); the target's cache ends as if it had read prompt + output; stats; errors; CLI."""

from __future__ import annotations

import copy

import pytest
import torch

from hymba_plus import build_model
from hymba_plus.cli import main
from hymba_plus.models.generation import filtered_probs, sample_next

V = 20
COMPS = {
    "gated_attn": {"n_heads": 2, "head_dim": 16, "window": 3},
    "gdn": {"n_heads": 2, "head_dim": 16},
    "mamba3": {"state_size": 8, "head_dim": 16, "expand": 1},
    "atlas": {"n_heads": 2, "head_dim": 16, "poly_degree": 1, "memory_hidden": 1, "ns_steps": 2, "chunk_size": 3},
    "hymba": {"ssm": "mamba3", "attn": {"n_heads": 2, "head_dim": 16, "window": 4}},
    "mlp": {"d_hidden": 64},
    "moe": {"n_experts": 4, "top_k": 2, "d_expert": 32},
}
TARGETS = {
    "attn-window-meta": ("GA | GA", {"meta_tokens": 2}),
    "gdn": ("GD | GD", {}),
    "mamba3": ("M3", {}),
    "atlas": ("ATL", {}),
    "hymba": ("HY", {"meta_tokens": 1}),
    "moe": ("GA+moe | GD+moe", {"meta_tokens": 1}),
    "etd-act-routes": ("GD | GA | M3 | ATL", {"etd": {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1,
                                                        "iterations": 2, "max_iterations": 3}}),
}
DRAFTS = {"gdn": ("GD", {}), "attn": ("GA | GA", {})}


def make(pattern: str, extra: dict, seed: int = 0, vocab: int = V, head_scale: float = 10.0,
         comps: dict | None = None):  # noqa: ANN201
    comps = dict(comps or COMPS)
    if "etd" in extra:
        comps["etd_router"] = {"halting": {"kind": "act", "threshold": 0.9},
                               "layer_router": {"enabled": True, "hidden": 8, "windows": 2}}
    r = {"name": "spec", "model": {"vocab_size": vocab, "d_model": 32, "max_seq_len": 40, "block_pattern": pattern,
                                   "tie_embeddings": False, **extra}, "components": comps}
    torch.manual_seed(seed)
    m = build_model(r).double().eval()
    with torch.no_grad():  # a sharper random model: its greedy output is not one repeated token
        m.lm_head.weight.mul_(head_scale)
        if m.etd_router is not None:  # halting that depends on the token; routes in use
            m.etd_router.halt.weight.normal_(0, 1.0)
            m.etd_router.enable_routes()
    return m


@pytest.fixture(scope="module")
def drafts():
    return {name: make(p, e, seed=100) for name, (p, e) in DRAFTS.items()}


def prompts(B: int = 3, T: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: rows of T, T - 2, T - 4, ... real tokens (B <= T / 2: none empty)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, : 2 * b] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def first_call_cache(model):  # noqa: ANN201
    """Forward hook keeping the cache of the model's first call (generate's prefill)."""
    seen: list = []

    def post(_m, _a, kwargs, _out) -> None:  # noqa: ANN001
        if not seen:
            seen.append(kwargs.get("cache"))

    return seen, model.register_forward_hook(post, with_kwargs=True)


# --------------------------------------------------------------------------- greedy == ar


@torch.no_grad()
@pytest.mark.parametrize("name", list(TARGETS))
def test_greedy_speculative_equals_ar(name, drafts) -> None:
    target = make(*TARGETS[name])
    ids, mask = prompts()
    N = 12
    ref = target.generate(ids, N, attention_mask=mask)
    T = ids.shape[1]
    # an EOS that row 0 emits mid-way: rows stop at different rounds
    eos = int(ref[0, T + 4])
    ref_eos = target.generate(ids, N, attention_mask=mask, eos_token_id=eos)
    assert (ref_eos[:, T:] == eos).any()
    for i, k in enumerate((1, 3, 5)):
        draft = drafts["gdn" if i % 2 == 0 else "attn"]
        for eos_id, want in ((None, ref), (eos, ref_eos)):
            st: dict = {}
            got = target.generate(ids, N, mode="speculative", draft=draft, k=k, attention_mask=mask,
                                  eos_token_id=eos_id, stats=st)
            assert torch.equal(got, want), (name, k, eos_id)
            assert st["target_forwards"] == 1 + st["verify_forwards"] + st["rewind_forwards"] == st["forwards"]
            assert 0 <= st["accepted"] <= st["proposed"]
    # the target as its own draft: every draft is accepted
    st = {}
    got = target.generate(ids, N, mode="speculative", draft=target, k=3, attention_mask=mask, stats=st)
    assert torch.equal(got, ref)
    assert st["acceptance_rate"] == 1.0 and st["rewind_forwards"] == 0
    # 1 token from the prefill, then 4 per round (k 3 + bonus) up to 12: rounds of 4, 4, 3
    assert st["rounds"] == 3 and st["tokens_per_target_forward"] == pytest.approx(12 / 4)


@torch.no_grad()
def test_streamer_length_limit_and_max_new_tokens(drafts) -> None:
    target = make(*TARGETS["attn-window-meta"])
    ids, mask = prompts()
    T, limit = ids.shape[1], target.config.max_seq_len
    N = limit - T  # the longest row fills max_seq_len exactly
    ref = target.generate(ids, N, attention_mask=mask)
    cols: list = []
    highest = []
    n_meta = target.config.meta_tokens

    def post(_m, _a, kwargs, _out) -> None:  # noqa: ANN001
        highest.append(int(kwargs["cache"].pos.max()))

    h = target.register_forward_hook(post, with_kwargs=True)
    try:
        got = target.generate(ids, N, mode="speculative", draft=drafts["gdn"], k=5, attention_mask=mask,
                              streamer=cols.append)
    finally:
        h.remove()
    assert torch.equal(got, ref)
    assert torch.equal(torch.stack(cols, 1), got[:, T:])  # one column per step, like ar
    assert max(highest) <= n_meta + limit  # verify chunks never run past max_seq_len
    for n in (0, 1, 2, 3):  # short generations: 1 token from the prefill, room for drafts from n = 3 on
        st: dict = {}
        out = target.generate(ids, n, mode="speculative", draft=drafts["gdn"], k=4, attention_mask=mask, stats=st)
        assert torch.equal(out, target.generate(ids, n, attention_mask=mask))
        assert st["tokens"] == n * ids.shape[0] and st["proposed"] == (3 if n == 3 else 0)
    # EOS on every row: the output stops where ar's does, padded with EOS
    eos = int(ref[0, T])
    ref_eos = target.generate(ids, N, attention_mask=mask, eos_token_id=eos)
    cols.clear()
    got = target.generate(ids, N, mode="speculative", draft=drafts["attn"], k=3, attention_mask=mask,
                          eos_token_id=eos, streamer=cols.append)
    assert torch.equal(got, ref_eos) and torch.equal(torch.stack(cols, 1), got[:, T:])


# --------------------------------------------------------------------------- partial acceptance


def noisy_copy(model, scale: float, seed: int = 0):  # noqa: ANN001, ANN201
    """The model with noise on its LM head: a draft that agrees with it only sometimes."""
    d = copy.deepcopy(model).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        d.lm_head.weight.add_(scale * torch.randn_like(d.lm_head.weight))
    return d


@torch.no_grad()
@pytest.mark.parametrize("name", ["hymba", "etd-act-routes"])
def test_noisy_copy_accepts_some_and_stats_add_up(name) -> None:
    target = make(*TARGETS[name])
    draft = noisy_copy(target, 0.5)
    ids, mask = prompts(B=4, T=8, seed=3)  # rows of 8, 6, 4 and 2 tokens
    N, B = 12, ids.shape[0]
    ref = target.generate(ids, N, attention_mask=mask)
    st: dict = {}
    got = target.generate(ids, N, mode="speculative", draft=draft, k=4, attention_mask=mask, stats=st)
    assert torch.equal(got, ref)
    assert 0 < st["acceptance_rate"] < 1, st
    assert st["acceptance_rate"] == st["accepted"] / st["proposed"]
    assert st["tokens"] == N * B
    assert st["target_forwards"] == 1 + st["verify_forwards"] + st["rewind_forwards"]
    assert st["verify_forwards"] == st["rounds"] and 1 <= st["rewind_forwards"] + st["recorded_rewinds"] <= st["rounds"]
    # hymba records its verify chunks (the rollbacks gather, no forward); ETD falls back to re-running
    assert st["rewind_forwards" if name == "hymba" else "recorded_rewinds"] == 0, st
    assert st["tokens_per_target_forward"] == pytest.approx(N / st["target_forwards"])
    # the draft: prefill, at most k steps per round, at most one rewind per round
    assert st["draft_forwards"] <= 1 + 4 * st["rounds"] + st["draft_rewind_forwards"]
    assert st["draft_rewind_forwards"] <= st["rounds"]
    # every row gets 1 token from the prefill and (accepted + 1) per round it takes part in
    assert st["accepted"] + st["rounds"] <= N * B - B
    # sampling with the same draft: stats are as consistent
    st = {}
    out = target.generate(ids, N, mode="speculative", draft=draft, k=4, attention_mask=mask, stats=st,
                          temperature=1.0, top_k=8, generator=torch.Generator().manual_seed(0))
    assert out.shape == ref.shape and 0 < st["acceptance_rate"] < 1 and st["tokens"] == N * B


# --------------------------------------------------------------------------- sampling is exact


def test_filtered_probs_is_sample_next_distribution() -> None:
    logits = torch.randn(64, 11, generator=torch.Generator().manual_seed(0)) * 3
    for temp, top_k, top_p in ((1.0, None, None), (0.7, 4, None), (1.3, None, 0.8), (0.9, 5, 0.6)):
        want = sample_next(logits, temp, top_k, top_p, torch.Generator().manual_seed(1))
        got = torch.multinomial(filtered_probs(logits, temp, top_k, top_p), 1,
                                generator=torch.Generator().manual_seed(1)).squeeze(-1)
        assert torch.equal(got, want)


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test of counts against probs (cells expected below 5
    pooled; scipy is not a dependency: the chi-square survival function is the regularized
    upper incomplete gamma). 0 when a cell of probability 0 was observed."""
    counts, probs = counts.double().flatten(), probs.double().flatten()
    if counts[probs == 0].sum() > 0:  # a token outside the (filtered) distribution
        return 0.0
    exp = probs * counts.sum()
    small = exp < 5
    obs_c = torch.cat([counts[~small], counts[small].sum()[None]])
    exp_c = torch.cat([exp[~small], exp[small].sum()[None]])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


@torch.no_grad()
def exact_joint(model, prompt: torch.Tensor, n: int, temp: float, top_k, top_p,  # noqa: ANN001
                min_p=None) -> torch.Tensor:  # noqa: ANN001
    """P(t_1 .. t_n | prompt) [V] * n under the filtered target distribution, from full
    (uncached) forwards of every continuation."""
    Vs = model.config.vocab_size
    joint = torch.ones(1, dtype=torch.float64)
    seqs = prompt[None]  # [M, T]: every continuation so far
    for _ in range(n):
        p = filtered_probs(model(seqs).logits[:, -1], temp, top_k, top_p, min_p).double()  # [M, V]
        joint = (joint[:, None] * p).flatten()
        M = seqs.shape[0]
        seqs = torch.cat([seqs.repeat_interleave(Vs, 0), torch.arange(Vs).repeat(M)[:, None]], 1)
    return joint.view([Vs] * n)


def joint_counts(tokens: torch.Tensor, Vs: int) -> torch.Tensor:
    """Counts of each combination of the columns of tokens [R, n], as [V] * n."""
    idx = torch.zeros(tokens.shape[0], dtype=torch.long)
    for j in range(tokens.shape[1]):
        idx = idx * Vs + tokens[:, j]
    return torch.bincount(idx, minlength=Vs ** tokens.shape[1]).view([Vs] * tokens.shape[1])


@torch.no_grad()
@pytest.mark.parametrize("temp,top_k,top_p,min_p", [(1.0, None, None, None), (0.8, 3, 0.9, None),
                                                    (1.2, None, None, 0.3)])
def test_sampling_has_the_target_distribution(temp, top_k, top_p, min_p) -> None:
    """4 tokens from one prompt, 8000 rows at once: the first comes from the prefill, the
    next three from one round (2 drafts + the bonus, or a correction and one more round).
    Their joint law must be the target's, computed exactly from full forwards (min-p: p and q
    filtered alike, the law stays the target's)."""
    Vs, N, R = 4, 4, 8000
    comps = {"gdn": {**COMPS["gdn"], "chunk_size": 4}, "gated_attn": {"n_heads": 2, "head_dim": 16},
             "mlp": COMPS["mlp"]}
    target = make("GD | GA", {"meta_tokens": 1}, seed=0, vocab=Vs, head_scale=4.0, comps=comps).float()
    draft = make("GA", {}, seed=7, vocab=Vs, head_scale=4.0, comps=comps).float()  # disagrees often
    prompt = torch.tensor([1, 3, 0, 2])
    ids = prompt[None].repeat(R, 1)
    opts = {"temperature": temp, "top_k": top_k, "top_p": top_p, "min_p": min_p}
    st: dict = {}
    out = target.generate(ids, N, mode="speculative", draft=draft, k=3, generator=torch.Generator().manual_seed(0),
                          stats=st, **opts)
    assert 0.2 < st["acceptance_rate"] < 0.8, st  # many rejections: the residual draws matter
    new = out[:, prompt.numel():]
    exact = exact_joint(target, prompt, N, temp, top_k, top_p, min_p)
    assert min_p is None or 0 < int((exact == 0).sum())  # min-p drops some continuations
    p_123 = chi_square_p(joint_counts(new[:, :3], Vs), exact.sum(3))  # the first round's tokens
    p_234 = chi_square_p(joint_counts(new[:, 1:], Vs), exact.sum(0))  # drafts, bonus, the next round
    p_all = chi_square_p(joint_counts(new, Vs), exact)
    assert min(p_123, p_234, p_all) > 1e-3, (p_123, p_234, p_all)
    if top_k is None:  # the test itself: ar sampling passes it, sampling the draft fails it
        ar = target.generate(ids, N, generator=torch.Generator().manual_seed(1), **opts)[:, prompt.numel():]
        assert chi_square_p(joint_counts(ar, Vs), exact) > 1e-3
        dr = draft.generate(ids[:2000], 1, generator=torch.Generator().manual_seed(2), **opts)[:, -1]
        assert chi_square_p(torch.bincount(dr, minlength=Vs), exact.sum((1, 2, 3))) < 1e-3


# --------------------------------------------------------------------------- rollback


@torch.no_grad()
@pytest.mark.parametrize("name", ["atlas", "moe", "etd-act-routes"])
def test_target_cache_ends_as_if_it_read_prompt_and_output(name) -> None:
    target = make(*TARGETS[name])
    draft = noisy_copy(target, 0.5, seed=1)  # some rejections: the rewinds are exercised
    ids, mask = prompts(B=3, seed=5)
    N, T = 11, ids.shape[1]
    seen, h = first_call_cache(target)
    try:
        st: dict = {}
        out = target.generate(ids, N, mode="speculative", draft=draft, k=3, attention_mask=mask, stats=st)
    finally:
        h.remove()
    assert st["rewind_forwards" if name == "etd-act-routes" else "recorded_rewinds"] > 0, st
    cache = seen[0]
    # the reference: prefill, then the output but its last token (which the next step feeds)
    ref = target.new_cache(ids.shape[0])
    target(ids, attention_mask=mask, cache=ref)
    for j in range(N - 1):  # token by token, like ar
        target(out[:, T + j: T + j + 1], cache=ref)
    assert torch.equal(cache.pos, ref.pos)
    nxt = torch.cat([out[:, -1:], torch.full_like(out[:, :1], 7)], 1)
    got, want = target(nxt, cache=cache).logits, target(nxt, cache=ref).logits
    assert torch.allclose(got, want, atol=1e-9, rtol=0)


# --------------------------------------------------------------------------- errors and CLI


def test_errors(drafts) -> None:
    target = make(*TARGETS["gdn"])
    ids = torch.randint(0, V, (2, 4))
    other = make("GD", {}, vocab=V + 3)
    with pytest.raises(ValueError, match=f"vocab_size {V + 3}.*vocab_size {V}"):
        target.generate(ids, 4, mode="speculative", draft=other)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            target.generate(ids, 4, mode="speculative", draft=drafts["gdn"], k=bad)
    with pytest.raises(ValueError, match="needs a draft model"):
        target.generate(ids, 4, mode="speculative")
    with pytest.raises(ValueError, match="takes no option 'draft'"):
        target.generate(ids, 4, draft=drafts["gdn"])
    short = make("GD", {"max_seq_len": 6})
    with pytest.raises(ValueError, match="draft model: .*max_seq_len 6"):
        target.generate(ids, 4, mode="speculative", draft=short)
    # the draft's own limits are typed (hymba generate: exit 1 naming --draft; a flag's value: exit 2)
    from hymba_plus.models.generation import DraftError

    for draft in (short, other):
        with pytest.raises(DraftError):
            target.generate(ids, 4, mode="speculative", draft=draft)
    with pytest.raises(ValueError) as e:
        target.generate(ids, 4, mode="speculative", draft=drafts["gdn"], k=0)
    assert not isinstance(e.value, DraftError)


def test_cli_speculative(tmp_path, capsys) -> None:
    from hymba_plus.training.tokenizer import IdsTokenizer

    tok = {"tokenizer.json": IdsTokenizer(V).to_json()}
    target = make(*TARGETS["hymba"]).float()
    target.save_pretrained(tmp_path / "target", extra_files=tok)
    noisy_copy(target, 0.5).save_pretrained(tmp_path / "draft", extra_files=tok)
    make("GD", {}, vocab=V + 4).float().save_pretrained(tmp_path / "wide", extra_files=tok)

    def run(*args: str) -> tuple[int, str, str]:
        rc = main(["generate", str(tmp_path / "target"), "--prompt", "3 4 5", "--prompt", "6 7",
                   "--max-new-tokens", "10", "--temperature", "0", *args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    rc, ar_out, err = run()
    assert rc == 0, err
    rc, out, err = run("--mode", "speculative", "--draft", str(tmp_path / "draft"), "--k", "3")
    assert rc == 0, err
    assert out == ar_out
    line = [ln for ln in err.splitlines() if ln.startswith("speculative:")]
    assert len(line) == 1 and "k 3, acceptance rate" in line[0] and "tokens per target forward" in line[0]
    assert "rounds" in line[0]
    rc, out, err = run("--mode", "speculative", "--draft", str(tmp_path / "draft"))  # default k 4
    assert rc == 0 and out == ar_out and "k 4," in err
    # one-line errors, no traceback
    for args, code, text in (
        (("--mode", "speculative", "--draft", str(tmp_path / "nope")), 1, "--draft"),
        (("--mode", "speculative", "--draft", str(tmp_path / "wide")), 1, f"vocab_size {V + 4}"),
        (("--mode", "speculative"), 2, "needs --draft"),
        (("--mode", "speculative", "--draft", str(tmp_path / "draft"), "--k", "0"), 2, "--k 0"),
        (("--draft", str(tmp_path / "draft")), 2, "--draft: only for --mode speculative"),
        (("--k", "2"), 2, "--k: only for --mode "),
        (("--mode", "block_diffusion", "--k", "2"), 2, "--k: only for --mode "),
    ):
        rc, out, err = run(*args)
        assert rc == code and err.count("\n") == 1 and text in err, (args, rc, err)
        assert "Traceback" not in err


def test_a_row_that_stops_on_eos_forces_no_target_rewind():
    """A round in which every row that goes on kept all it fed needs no rewind of the target: a row that
    stops on EOS is never read again (it cost one target forward more, understating tokens per forward)."""
    m = make("GA | GD", {})
    ids = torch.tensor([[1, 2, 3]])
    ref = m.generate(ids, max_new_tokens=6)
    eos = int(ref[0, 5])  # the third new token
    st: dict = {}
    out = m.generate(ids, max_new_tokens=6, mode="speculative", draft=m, k=4, eos_token_id=eos, stats=st)
    assert torch.equal(out, m.generate(ids, max_new_tokens=6, eos_token_id=eos))
    assert st["rewind_forwards"] == 0, st  # the draft is the target: every draft accepted, no row goes on


@torch.no_grad()
def test_a_round_that_keeps_every_draft_feeds_the_draft_one_token_not_a_rewind() -> None:
    """After a round where a row kept all its drafts, the draft's cache lacks only the last draft (it
    fed ``last, d_1 .. d_{k-1}``): one cached step of ``d_k`` brings it up to date. It was rewound instead
    (restore the snapshot, re-run all k + 1 tokens): k + 1 draft tokens a round where one was needed."""
    target = make(*TARGETS["gdn"])
    draft = copy.deepcopy(target)  # agrees with the target everywhere: every draft is kept
    ids, mask = prompts()
    T, N, k = ids.shape[1], 12, 3

    def run(eos: int | None) -> tuple[torch.Tensor, dict, list]:
        fed: list = []  # tokens per draft forward
        h = draft.register_forward_hook(lambda _m, a, kw, _o: fed.append(kw.get("input_ids", a[0] if a else None)
                                                                          .shape[1]), with_kwargs=True)
        try:
            st: dict = {}
            out = target.generate(ids, N, mode="speculative", draft=draft, k=k, attention_mask=mask,
                                  eos_token_id=eos, stats=st)
        finally:
            h.remove()
        assert torch.equal(out, target.generate(ids, N, attention_mask=mask, eos_token_id=eos))
        assert st["acceptance_rate"] == 1.0 and st["draft_rewind_forwards"] == 0, st
        assert st["draft_forwards"] == len(fed)
        return out, st, fed

    out, st, fed = run(None)
    # 1 token from the prefill, then rounds of k + 1 = 4, 4 and 3 (max_new_tokens leaves 2 drafts): the
    # draft prefills, steps 3 + 3 + 2 times, and catches up by one token after each of the first two rounds
    # (the last round ends every row: nothing more to catch up)
    assert st["rounds"] == 3 and fed == [T] + [1] * 3 + [1] + [1] * 3 + [1] + [1] * 2, fed
    # row 0 ends on EOS in the second round: the other rows catch up alone (a masked step), and the
    # draft, still the target, keeps agreeing with it on every draft (a wrong catch-up would not)
    eos = int(out[0, T + 7])
    out, st, fed = run(eos)
    assert not (out[2, T:] == eos).any() and (out[0, T:T + 7] != eos).all()
    assert fed == [T] + [1] * 3 + [1] + [1] * 3 + [1] + [1] * 2, fed
