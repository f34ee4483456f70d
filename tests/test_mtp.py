"""Multi-token prediction (``model.mtp``, ``components/mtp.py``) and self-speculative
decoding with it (``generate(mode="mtp")``, ``models/mtp_decoding.py``): the recipe
section, the loss (per depth, gradients, the modules' cache consistency), greedy output
token-for-token equal to AR over every mixer with left padding and EOS, the sampled
distribution equal to AR sampling (chi-square), learning on a small task, and errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hymba_plus import RecipeError, build_model, load_recipe
from hymba_plus.core.cache import StepContext
from hymba_plus.models.generation import accept_drafts, filtered_probs
from tests.helpers import EVERY_COMPONENT

V = 16
COMPS = EVERY_COMPONENT


def recipe(pattern: str = "GD | GA", depth: int = 2, block: str = "GD", meta: int = 0, weight: float = 0.3,
           etd: dict | None = None) -> dict:
    m = {"vocab_size": V, "d_model": 32, "max_seq_len": 64, "block_pattern": pattern, "meta_tokens": meta,
         "mtp": {"depth": depth, "block": block, "weight": weight}}
    if etd:
        m["etd"] = etd
    return {"name": "mtp", "model": m, "components": dict(COMPS)}


def make(**kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(recipe(**kw)).double().eval()


# --------------------------------------------------------------------------- recipe and loss


def test_recipe_section_is_validated() -> None:
    r = load_recipe(recipe(depth=3, block="M3+moe"))
    assert r.model.mtp.depth == 3 and r.model.mtp.block == "M3+moe"
    assert "moe" in r.components and "mamba3" in r.components  # the block's components are built
    for bad, msg in ((dict(block="GX"), "model.mtp.block: unknown mixer 'GX'"),
                     (dict(block="GA | GD"), "model.mtp.block: must be one block"),
                     (dict(depth=0), "model.mtp.depth")):
        with pytest.raises(RecipeError, match=msg):
            load_recipe(recipe(**bad))


def test_loss_adds_weighted_depth_losses_and_trains_every_module() -> None:
    m = build_model(recipe(depth=3, weight=0.5, meta=2))
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    out = m(ids, labels=ids)
    per = [out.stats[f"mtp/loss_{i}"] for i in (1, 2, 3)]
    base = m.lm_loss(out.logits, ids)
    assert torch.allclose(out.loss, base + 0.5 * torch.stack(per).mean(), atol=1e-5)
    out.loss.backward()
    for i in range(3):
        for p in (m.mtp.proj[i].weight, m.mtp.norm_e[i].weight):
            assert p.grad is not None and p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unpadded"):
        mask = torch.ones_like(ids)
        mask[0, 0] = 0
        m(ids, labels=ids, attention_mask=mask)
    short = m(ids[:, :3], labels=ids[:, :3])  # depth 2 and 3 have no target left: only depth 1 counts
    assert set(k for k in short.stats if k.startswith("mtp/")) == {"mtp/loss_1"}


def test_moe_blocks_of_the_modules_add_their_losses_and_statistics() -> None:
    """A MoE block in a module (``block: GA+moe``) balances like the trunk's MoE layers: its balance /
    z losses join ``aux_loss`` and its routing statistics the stats (they were dropped: the modules'
    routers trained with no balance loss)."""
    r = recipe(pattern="GA+moe", depth=2, block="GA+moe", weight=0.5)
    r["components"] = {**r["components"], "moe": {"n_experts": 4, "top_k": 2, "d_expert": 16}}
    torch.manual_seed(0)
    m = build_model(r)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
    out = m(ids, labels=ids)
    trunk_only = m(ids).aux_loss  # no labels: no MTP modules run
    moe_keys = sorted(k for k in out.stats if k.endswith("tokens_per_expert"))
    assert len(moe_keys) == 3, moe_keys  # the trunk's layer and one per module
    assert out.aux_loss > trunk_only * 2.5  # three layers' terms of about equal size
    out.loss.backward()
    router = [p for n, p in m.named_parameters() if n.startswith("mtp.") and "router" in n]
    assert router and all(float(p.grad.norm()) > 1e-4 for p in router)


def test_a_depth_with_no_scored_target_adds_nothing() -> None:
    """Labels scored only near the start: the deeper module has no target left (its mean was 0 / 0 =
    NaN, and so was the whole loss); it adds 0 and leaves the mean over depths."""
    m = build_model(recipe(depth=3, weight=0.5))
    ids = torch.randint(0, V, (2, 5), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    labels[:, 2:4] = ids[:, 2:4]
    out = m(ids, labels=labels)
    per = [out.stats[f"mtp/loss_{i}"] for i in (1, 2, 3)]
    assert torch.isfinite(out.loss) and float(per[2]) == 0.0 and float(per[0]) > 0 and float(per[1]) > 0
    assert torch.allclose(out.loss, m.lm_loss(out.logits, labels) + 0.5 * (per[0] + per[1]) / 2, atol=1e-5)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_depth_loss_matches_an_explicit_computation() -> None:
    """Depth i at position t reads x_{t+i} (1-based i) and predicts x_{t+i+1}, through the shared
    norm and head; checked against a direct evaluation of the modules' equations."""
    m = make(depth=2, block="GA")
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    out = m(ids, labels=ids, return_hidden=True)
    T = ids.shape[1]
    h = out.trunk_states
    pos = torch.arange(T)[None].expand(2, -1)
    for i in range(2):
        n = T - i - 1
        x = m.mtp.proj[i](torch.cat([m.mtp.norm_h[i](h[:, :n]), m.mtp.norm_e[i](m.embed(ids[:, i + 1:i + 1 + n]))], -1))
        h = m.mtp.blocks[i](x, StepContext(positions=pos[:, :n]))
        logits = m.lm_head(m.norm(h))[:, :-1]
        want = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, i + 2:i + 1 + n].flatten())
        got = out.stats[f"mtp/loss_{i + 1}"]  # float64 here: the fused head loss keeps a float64 model's precision
        assert got.dtype == torch.float64 and torch.allclose(got, want, atol=1e-12)


# --------------------------------------------------------------------------- greedy == AR

TRUNKS = ["GD | GA", "M3 | ATL", "HY | GA+moe", "GA | GD | M3 | GA"]
BLOCKS = ["GD", "GA", "M3+mlp", "ATL", "HY"]


@torch.no_grad()
@settings(max_examples=10, deadline=None)
@given(trunk=st.sampled_from(TRUNKS), block=st.sampled_from(BLOCKS), depth=st.integers(1, 3),
       meta=st.sampled_from([0, 2]), seed=st.integers(0, 1000), data=st.data())
def test_greedy_mtp_equals_greedy_ar(trunk, block, depth, meta, seed, data) -> None:
    m = make(pattern=trunk, depth=depth, block=block, meta=meta)
    g = torch.Generator().manual_seed(seed)
    B, T = 3, 8
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b in range(1, B):  # left padding, every row at least `depth` tokens
        mask[b, : data.draw(st.integers(0, T - depth))] = 0
    k = data.draw(st.integers(1, depth))
    eos = data.draw(st.sampled_from([None, 3]))
    ar = m.generate(ids, max_new_tokens=11, attention_mask=mask, eos_token_id=eos)
    stats: dict = {}
    got = m.generate(ids, max_new_tokens=11, mode="mtp", attention_mask=mask, eos_token_id=eos, k=k, stats=stats)
    assert torch.equal(got, ar)
    assert stats["accepted"] <= stats["proposed"]


@torch.no_grad()
def test_a_finished_row_does_not_grow_the_caches() -> None:
    """A row that ended (EOS at its first token) kept all k + 1 fed tokens every round: the trunk's
    KV cache (and the modules') then grew by k + 1 slots a round for the whole batch, 86 slots where
    the live row alone needs 46. It now keeps what the live rows keep most."""
    r = recipe(pattern="GA | GD", depth=3, block="GA")
    r["components"]["gated_attn"] = {"n_heads": 2, "head_dim": 16}  # no window: every slot stays
    torch.manual_seed(0)
    m = build_model(r).double().eval()
    caches = []
    new_cache = m.new_cache
    m.new_cache = lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1]
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(0))
    eos = int(m.generate(ids[:1], max_new_tokens=1)[0, 6])  # row 0 ends at its first token
    got = m.generate(ids, max_new_tokens=40, mode="mtp", eos_token_id=eos)
    assert torch.equal(got, m.generate(ids, max_new_tokens=40, eos_token_id=eos))
    batch = caches[-2].states[0].slots()  # (the last cache is ar's)
    m.generate(ids[1:], max_new_tokens=40, mode="mtp", eos_token_id=eos)
    assert batch == caches[-1].states[0].slots() == 6 + 40 - 1  # as ar: every token but the last (never fed)


@torch.no_grad()
def test_rounds_near_the_end_draft_no_more_than_can_be_emitted() -> None:
    """A round drafts at most what a live row can still emit (max_new_tokens), and a live row's verify
    chunk stays within max_seq_len, as mode speculative's: it drafted k and verified k + 1 tokens whatever
    was left, running the trunk's positions up to k past max_seq_len (68 of 66 here) on tokens never
    emitted. (A finished row's cache is never read again: it may move with the live rows.)"""
    m = make(pattern="GD | GA", depth=3, block="GA", meta=2)
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a shorter row: it has more room than the longest one
    limit, n_meta = m.config.max_seq_len, m.config.meta_tokens
    fed: list = []  # (tokens fed, the cache's highest position after the call) per trunk call

    def post(_m, a, kw, _o) -> None:  # noqa: ANN001
        fed.append((kw.get("input_ids", a[0] if a else None).shape[1], int(kw["cache"].pos.max())))

    h = m.register_forward_hook(post, with_kwargs=True)
    try:
        for n in (1, 2, 3, 7, limit - 8):
            for x, xm in ((ids, mask), (ids[:1], None)):  # alone, row 0 is live until its last round
                want = m.generate(x, max_new_tokens=n, attention_mask=xm)
                fed.clear()
                st: dict = {}
                got = m.generate(x, max_new_tokens=n, mode="mtp", k=3, attention_mask=xm, stats=st)
                assert torch.equal(got, want), n
                if xm is None:
                    assert max(p for _, p in fed) <= n_meta + limit, (n, fed)
                if n <= 2:  # the prefill gives 1 token; one more needs a verify of c alone (no drafts)
                    assert [w for w, _ in fed[1:]] == [1] * (n - 1) and st["proposed"] == 0, (n, fed)
                if n == 3:  # 2 to go: one draft (then a verify of c alone where it was rejected)
                    assert fed[1][0] == 2 and st["proposed"] == x.shape[0], (n, fed, st)
    finally:
        h.remove()


@torch.no_grad()
def test_k_below_the_depth_runs_only_the_modules_that_draft() -> None:
    """With k < depth, modules k + 1 .. depth never draft: they ran anyway, prefilled and committed every
    round (depth module forwards a round where k - 1 + k are needed). Now only modules 1 .. k run."""
    m = make(pattern="GD | GA", depth=3, block="GA")
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ran: list = []  # the module (0-based) of each step
    step = m.mtp.step
    m.mtp.step = lambda i, *a, **kw: ran.append(i) or step(i, *a, **kw)
    for k in (1, 2, 3):
        ran.clear()
        st: dict = {}
        got = m.generate(ids, max_new_tokens=9, mode="mtp", k=k, attention_mask=mask, stats=st)
        assert torch.equal(got, m.generate(ids, max_new_tokens=9, attention_mask=mask)), k
        assert sorted(set(ran)) == list(range(k)) and st["mtp_forwards"] == len(ran), (k, ran)
        assert ran.count(0) == 1 + st["rounds"]  # module 1: the prefill, one commit a round (it drafts unforked)


@torch.no_grad()
def test_k_below_the_depth_needs_a_prompt_of_k_tokens_only() -> None:
    """Only modules 1 .. k run, and module i's prefill reads positions 0 .. L - i: a prompt needs k
    tokens, not the depth (a 1-token prompt with k 1 on a depth-3 model was refused). Found by a review."""
    m = make(pattern="GD | GA", depth=3, block="GA")
    ids = torch.randint(0, V, (2, 4), generator=torch.Generator().manual_seed(5))
    for k in (1, 2):
        mask = torch.ones_like(ids)
        mask[1, : ids.shape[1] - k] = 0  # row 1: exactly k real tokens (left padding)
        got = m.generate(ids, max_new_tokens=7, mode="mtp", k=k, attention_mask=mask)
        assert torch.equal(got, m.generate(ids, max_new_tokens=7, attention_mask=mask)), k
        short = ids[:, :k]
        assert torch.equal(m.generate(short, max_new_tokens=7, mode="mtp", k=k), m.generate(short, max_new_tokens=7))
        with pytest.raises(ValueError, match=f"needs at least {k + 1} tokens"):
            m.generate(short, max_new_tokens=2, mode="mtp", k=k + 1)


def test_greedy_mtp_on_an_etd_trunk() -> None:
    m = make(pattern="GD | GA | M3 | GA", depth=2, block="GD",
             etd={"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2})
    ids = torch.randint(0, V, (2, 6), generator=torch.Generator().manual_seed(2))
    assert torch.equal(m.generate(ids, max_new_tokens=9, mode="mtp"), m.generate(ids, max_new_tokens=9))


# --------------------------------------------------------------------------- learning and distribution


def cycle_batch(g: torch.Generator, B: int, T: int, f: torch.Tensor) -> torch.Tensor:
    """Sequences of one fixed permutation cycle f over the vocabulary, from random starts."""
    x = torch.empty(B, T, dtype=torch.long)
    x[:, 0] = torch.randint(0, V, (B,), generator=g)
    for t in range(1, T):
        x[:, t] = f[x[:, t - 1]]
    return x


def test_modules_learn_and_drafts_get_accepted() -> None:
    """On a deterministic successor task the modules learn f^2, f^3; self-speculative decoding
    then accepts most drafts and needs fewer trunk forwards than tokens."""
    torch.manual_seed(0)
    m = build_model(recipe(pattern="GD | GA", depth=2, block="GD", weight=1.0))
    g = torch.Generator().manual_seed(0)
    f = torch.randperm(V, generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    first = None
    for _ in range(80):
        x = cycle_batch(g, 16, 24, f)
        out = m(x, labels=x)
        first = first or {k: float(v) for k, v in out.stats.items()}
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    last = {k: float(v) for k, v in out.stats.items()}
    assert last["mtp/loss_2"] < 0.2 * first["mtp/loss_2"], (first, last)
    m.eval()
    x = cycle_batch(g, 4, 30, f)
    stats: dict = {}
    out = m.generate(x[:, :6], max_new_tokens=24, mode="mtp", stats=stats)
    assert torch.equal(out, x)  # the trunk learned the cycle, and the output is the AR output
    assert stats["acceptance_rate"] > 0.9, stats
    assert stats["tokens_per_forward"] > 1.5, stats  # 24 tokens, well under 24 trunk forwards
    # accepted runs: the streamer gets each column once, every row's own token (it was paced by row 0,
    # the other rows' tokens taken from row 0's offsets), and EOS gives ar's output and length (every
    # row's EOS came at max_new_tokens before, EOS-padded)
    for eos in (None, int(x[0, 8]), int(x[1, 7])):
        got: list = []
        out = m.generate(x[:, :6], max_new_tokens=24, mode="mtp", eos_token_id=eos, streamer=got.append)
        assert torch.equal(out, m.generate(x[:, :6], max_new_tokens=24, eos_token_id=eos)), eos
        assert torch.equal(torch.stack(got, 1), out[:, 6:]), eos


def test_accept_rule_is_exact_speculative_sampling() -> None:
    """The accept / resample rule alone: the first token it returns is distributed as p[0],
    whatever q (the classic proof), over many rows at once."""
    g = torch.Generator().manual_seed(3)
    N, Vs = 40000, 5
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.1, 0.2, 0.3, 0.3])
    drafts = torch.multinomial(q.expand(N, -1), 1, replacement=True, generator=g)
    a, nxt = accept_drafts(p.expand(N, 2, -1), q.expand(N, 1, -1), drafts, g)
    first = torch.where(a >= 1, drafts[:, 0], nxt)
    counts = torch.bincount(first, minlength=Vs).double()
    chi2 = float(((counts - N * p) ** 2 / (N * p)).sum())
    assert chi2 < 18.47, chi2  # chi-square, 4 degrees of freedom, p = 0.001


@torch.no_grad()
@pytest.mark.parametrize("top_k,min_p", [(4, None), (None, 0.5)])
def test_sampled_tokens_match_ar_sampling(top_k, min_p) -> None:
    """With temperature > 0 the first two new tokens of mode mtp have the trunk's joint
    distribution p(x1) p(x2 | x1) (chi-square over every pair seen, many rows at once), with
    top-k or min-p filtering p and q alike."""
    torch.manual_seed(0)
    m = build_model(recipe(pattern="GD | GA", depth=2, block="GA")).double().eval()
    with torch.no_grad():  # keep the draft different from the trunk: many rejections
        for p in m.mtp.parameters():
            p.add_(0.3 * torch.randn_like(p))
    N = 6000
    prompt = torch.tensor([[1, 2, 3, 4]]).expand(N, -1)
    st: dict = {}  # 3 tokens: x2 comes from the accept / resample rule (with 2, a round drafts nothing)
    out = m.generate(prompt, max_new_tokens=3, mode="mtp", temperature=1.0, top_k=top_k, min_p=min_p,
                     generator=torch.Generator().manual_seed(5), stats=st)
    assert 0.1 < st["acceptance_rate"] < 0.9 and st["proposed"] == N, st  # one draft a row, often rejected
    x1, x2 = out[:, 4], out[:, 5]
    p1 = filtered_probs(m(prompt[:1]).logits[0, -1], 1.0, top_k, None, min_p)
    pairs = torch.stack([torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)], 1)
    ctx = torch.cat([prompt[:1].expand(V, -1), torch.arange(V)[:, None]], 1)
    p2 = filtered_probs(m(ctx).logits[:, -1], 1.0, top_k, None, min_p)  # [V (x1), V (x2)]
    assert 0 < int((p1 == 0).sum()) < V  # the filter drops some tokens (min-p 0.5: 6 of the 16)
    joint = (p1[:, None] * p2).flatten()
    counts = torch.bincount(x1 * V + x2, minlength=V * V).double()
    keep = joint * N > 5  # the usual chi-square validity rule
    assert counts[~keep].sum() <= N * joint[~keep].sum() * 3 + 10
    chi2 = float(((counts[keep] - N * joint[keep]) ** 2 / (N * joint[keep])).sum())
    dof = int(keep.sum()) - 1
    crit = dof + 3.09 * math.sqrt(2 * dof) + 2  # ~ p = 0.001 (Wilson-Hilferty, loosely)
    assert chi2 < crit, (chi2, dof)
    assert len(pairs) == V * V


# --------------------------------------------------------------------------- errors


def test_errors() -> None:
    m = make(depth=3)
    ids = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"k must be an integer in \[1, 3\]"):
        m.generate(ids, max_new_tokens=2, mode="mtp", k=4)
    with pytest.raises(ValueError, match="at least 3 tokens"):
        m.generate(ids[:, :2], max_new_tokens=2, mode="mtp")
    plain = build_model({"name": "p", "model": {"vocab_size": V, "d_model": 32, "block_pattern": "GA"}})
    with pytest.raises(ValueError, match="model.mtp"):
        plain.generate(ids, max_new_tokens=2, mode="mtp")


def test_hymba_train_logs_every_depth_and_reloads(tmp_path, capsys) -> None:
    import json
    from pathlib import Path

    from hymba_plus import from_pretrained
    from hymba_plus.cli import main

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "run"
    argv = ["train", str(root / "configs" / "mtp_tiny.yaml"), "--out", str(out), "--data", "mqar", "--steps", "6",
            "--batch-size", "4", "--seq-len", "32", "--warmup", "1", "--eval-every", "6", "--eval-batches", "1",
            "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["mtp/loss_1"]) and math.isfinite(r["mtp/loss_2"]) for r in rows)
    model = from_pretrained(out / "step-6")
    assert model.mtp is not None and model.mtp.depth == 2
    ids = torch.randint(3, 64, (1, 6))
    assert torch.equal(model.generate(ids, max_new_tokens=5, mode="mtp"), model.generate(ids, max_new_tokens=5))


def test_cli_mode_mtp(tmp_path, capsys) -> None:
    from hymba_plus.cli import main
    from hymba_plus.training.tokenizer import IdsTokenizer

    m = build_model(recipe(depth=2))
    m.save_pretrained(tmp_path / "ckpt", extra_files={"tokenizer.json": IdsTokenizer(V).to_json()})
    rc = main(["generate", str(tmp_path / "ckpt"), "--prompt", "3 4 5", "--mode", "mtp", "--k", "2",
               "--max-new-tokens", "6", "--temperature", "0"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "mtp: k 2, acceptance rate" in cap.err and "tokens per trunk forward" in cap.err
    rc = main(["generate", str(tmp_path / "ckpt"), "--prompt", "3 4 5", "--mode", "mtp", "--k", "3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--k" in err and "[1, 2]" in err
    rc = main(["generate", str(tmp_path / "ckpt"), "--prompt", "3", "--mode", "mtp"])  # shorter than the depth
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hymba generate: --prompt: mode mtp: every prompt (input_ids' rows")
    assert "needs at least 2 tokens" in err
