"""Block diffusion's clip search (BD3-LM §5, data-driven noise schedules; ``objective.clip_search``):

* the per-block terms and their pooled variance equal a hand computation on a tiny model;
* the search picks the candidate of least variance (a constructed case: one range's terms
  constant), the first of equal ones, and nothing when no evaluation searched;
* ``hymba train`` searches at the evaluations ``every`` names, logs ``bd/clip_lo`` /
  ``bd/clip_hi`` / ``bd/clip_var``, trains with the chosen range from the next step on, saves it
  with the checkpoint and a resume goes on with it (a checkpoint without it: the recipe's clip);
* bad options are one line naming the key (``hymba check`` too); off by default.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from hymba_plus import RecipeError, build_model, load_recipe
from hymba_plus.cli import main
from hymba_plus.objectives import block_diffusion as bd
from hymba_plus.objectives.block_diffusion import weight

ROOT = Path(__file__).resolve().parents[1]
V = 29


def tiny(block_size: int = 4, **objective) -> dict:
    return {"name": "bd-clip", "model": {"vocab_size": V, "d_model": 16, "max_seq_len": 16,
                                         "block_pattern": "GA | GD"},
            "components": {"gated_attn": {"n_heads": 2, "head_dim": 8}, "gdn": {"n_heads": 2, "head_dim": 8},
                           "mlp": {"d_hidden": 32}},
            "objective": {"kind": "block_diffusion", "block_size": block_size, **objective}}


def make(d: dict):
    torch.manual_seed(0)
    model = build_model(d).double().eval()
    with torch.no_grad():
        model.objective.mask_embed.normal_(0.0, 1.0)
    return model


def test_off_by_default_and_the_training_range_is_the_recipes():
    model = make(tiny(clip=[0.3, 0.8]))
    obj = model.objective
    assert obj.cfg.clip_search is None and obj.clip == (0.3, 0.8)
    assert obj.train_state() == {} and obj.graph_because is None
    obj.eval_begin(100)
    assert not obj._search and obj.eval_end({}) == {}


def test_block_terms_and_variance_equal_a_hand_computation():
    grid = [[0.0, 1.0], [0.3, 0.8]]
    model = make(tiny(clip_search={"grid": grid, "every": 1}))
    obj = model.objective
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (3, 12), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # block 0 of row 0 scores nothing, block 1 only 3 tokens
    labels[2] = -100  # a repeated row: nothing scored
    scored = labels != -100
    seed, bs, nb = 7, 4, 3
    hand = {}
    for lo, hi in grid:
        terms = []
        for i in range(3):
            gi = torch.Generator().manual_seed(seed + i)
            t = obj.sample_t((1, nb), ids.device, lo, hi, gi)
            xt, masked = obj.noise(ids[i:i + 1], t, gi, clip=(lo, hi))
            with torch.no_grad():
                logits, _ = obj.two_stream_logits(model, xt, ids[i:i + 1])
            logp = logits[0].float().log_softmax(-1)
            for b in range(nb):
                if not scored[i, b * bs:(b + 1) * bs].any():
                    continue
                s = 0.0
                for j in range(b * bs, (b + 1) * bs):
                    if masked[0, j] and scored[i, j]:
                        s += float(weight(obj.cfg, t[0, b])) * -float(logp[j, ids[i, j]])
                terms.append(s / bs)
        hand[(lo, hi)] = terms
    # block_terms: the same draws, one forward over the batch
    for lo, hi in grid:
        got, has = obj.block_terms(model, ids, scored, seed, lo, hi)
        assert has.tolist() == [[False, True, True], [True] * 3, [False] * 3]
        torch.testing.assert_close(got[has].double(), torch.tensor(hand[(lo, hi)], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    # the searching evaluation: sums of each candidate, then the pooled variance
    obj.configure(type("T", (), {"eval_every": 5})())
    obj.eval_begin(5)
    _, _, _, out = obj.eval_batch(model, model, ids, labels, seed=seed)
    res = obj.eval_end(obj.eval_sums(out))
    for lo, hi in grid:
        x = torch.tensor(hand[(lo, hi)], dtype=torch.float64)
        assert len(x) == 5
        assert res[f"bd/var[{lo:g},{hi:g}]"] == pytest.approx(float(x.var(unbiased=False)), rel=1e-4)
    best = min(grid, key=lambda r: torch.tensor(hand[tuple(r)]).var(unbiased=False))
    assert obj.clip == tuple(best) and (res["bd/clip_lo"], res["bd/clip_hi"]) == tuple(best)
    assert res["bd/clip_var"] == res[f"bd/var[{best[0]:g},{best[1]:g}]"]
    # sums over batches add up: two halves give the statistics of the whole
    obj.eval_begin(5)
    outs = [obj.eval_batch(model, model, ids[a:b], labels[a:b], seed=seed + a)[3] for a, b in ((0, 1), (1, 3))]
    sums: dict[str, float] = {}
    for o in outs:
        for k, v in obj.eval_sums(o).items():
            sums[k] = sums.get(k, 0.0) + v
    assert obj.eval_end(sums) == pytest.approx(res, rel=1e-9)


def _patch_terms(monkeypatch, flat: tuple[float, float]):
    """Per-block terms: constant for the range ``flat`` (zero variance), spread for the others."""
    def fake(self, model, ids, scored, seed, lo, hi, core=None, drawn=None):  # noqa: ANN001
        B, nb = ids.shape[0], ids.shape[1] // self.cfg.block_size
        g = torch.Generator().manual_seed(seed)
        terms = torch.full((B, nb), 2.0) if (lo, hi) == flat else 1.0 + hi * torch.rand((B, nb), generator=g)
        return terms, torch.ones((B, nb), dtype=torch.bool)
    monkeypatch.setattr(bd.BlockDiffusion, "block_terms", fake)


def test_search_picks_the_range_of_least_variance(monkeypatch):
    grid = [[0.0, 1.0], [0.3, 0.8], [0.45, 0.95]]
    model = make(tiny(clip=[0.3, 0.8], clip_search={"grid": grid}))
    obj = model.objective
    obj.configure(type("T", (), {"eval_every": 2})())
    _patch_terms(monkeypatch, (0.45, 0.95))
    ids = torch.randint(0, V, (4, 12), generator=torch.Generator().manual_seed(0))
    obj.eval_begin(4)
    res = obj.eval_end(obj.eval_sums(obj.eval_batch(model, model, ids, ids, seed=0)[3]))
    assert obj.clip == (0.45, 0.95) and res["bd/clip_var"] == 0.0
    assert res["bd/var[0,1]"] > 0 and res["bd/var[0.3,0.8]"] > 0
    assert obj.train_state() == {"clip": [0.45, 0.95]}
    # equal variances: the first candidate
    monkeypatch.setattr(bd.BlockDiffusion, "block_terms",
                        lambda self, model, ids, scored, seed, lo, hi, core=None, drawn=None: (torch.ones(ids.shape[0], 3),
                                                                       torch.ones(ids.shape[0], 3, dtype=torch.bool)))
    obj.eval_begin(4)
    obj.eval_end(obj.eval_sums(obj.eval_batch(model, model, ids, ids, seed=0)[3]))
    assert obj.clip == (0.0, 1.0)
    # an evaluation that does not search (step 3, not a multiple of every 1 x eval_every 2; the final
    # evaluation of a run that stops there; outside training) changes nothing
    obj.clip = (0.3, 0.8)
    monkeypatch.setattr(bd.BlockDiffusion, "block_terms", lambda *a: pytest.fail("searched"))
    for step in (3, None):
        obj.eval_begin(step)
        _, _, _, out = obj.eval_batch(model, model, ids, ids, seed=0)
        assert obj.eval_sums(out) == {} and obj.eval_end({}) == {} and obj.clip == (0.3, 0.8)


def _text_file(tmp_path: Path) -> Path:
    p = tmp_path / "corpus.txt"
    p.write_text("".join(f"the {w} fox jumps over the lazy dog number {i % 7}.\n"
                         for i, w in enumerate(["quick", "brown", "red", "slow"] * 30)))
    return p


def _record_training_ranges(monkeypatch) -> list[tuple[float, float]]:
    """The (lo, hi) of every training draw (train_forward's sample_t: no generator)."""
    seen: list[tuple[float, float]] = []
    orig = bd.BlockDiffusion.sample_t

    def rec(self, shape, device, lo, hi, generator=None):  # noqa: ANN001
        if generator is None:
            seen.append((lo, hi))
        return orig(self, shape, device, lo, hi, generator)
    monkeypatch.setattr(bd.BlockDiffusion, "sample_t", rec)
    return seen


def _recipe_file(tmp_path: Path, clip_search: dict | None) -> Path:
    d = yaml.safe_load((ROOT / "configs" / "bd_tiny.yaml").read_text())
    d["model"]["block_pattern"] = "GA"
    if clip_search is not None:
        d["objective"]["clip_search"] = clip_search
    p = tmp_path / "bd.yaml"
    p.write_text(yaml.safe_dump(d))
    return p


def _train(recipe: Path, out: Path, data: Path, *extra: str) -> int:
    return main(["train", str(recipe), "--out", str(out), "--data", str(data), "--steps", "4", "--batch-size", "2",
                 "--seq-len", "16", "--warmup", "0", "--eval-every", "1", "--eval-batches", "1", "--save-every", "2",
                 "--no-progress", *extra])


def test_trainer_searches_logs_uses_saves_and_resumes_the_range(tmp_path, monkeypatch, capsys):
    grid = [[0.3, 0.8], [0.45, 0.95]]
    recipe, data = _recipe_file(tmp_path, {"grid": grid, "every": 2}), _text_file(tmp_path)
    _patch_terms(monkeypatch, (0.45, 0.95))
    seen = _record_training_ranges(monkeypatch)
    out = tmp_path / "run"
    assert _train(recipe, out, data, "--stop-after", "2") == 0, capsys.readouterr().err
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("bd/clip_lo" in r) for r in rows] == [False, True]  # evaluations at 1, 2; every 2 x eval_every 1
    assert (rows[1]["bd/clip_lo"], rows[1]["bd/clip_hi"], rows[1]["bd/clip_var"]) == (0.45, 0.95, 0.0)
    assert rows[1]["bd/var[0.3,0.8]"] > 0 and math.isfinite(rows[1]["eval_loss"])
    assert seen == [(0.3, 0.8)] * 2  # steps 1, 2 with the recipe's clip
    state = json.loads((out / "step-2" / "trainer_state.json").read_text())
    assert state["objective"] == {"clip": [0.45, 0.95]}
    # resumed: step 3 trains with the searched range (step 4's search, the constant terms of (0.3, 0.8) now,
    # changes it for the steps after)
    _patch_terms(monkeypatch, (0.3, 0.8))
    seen.clear()
    assert _train(recipe, out, data, "--resume") == 0, capsys.readouterr().err
    assert seen == [(0.45, 0.95)] * 2
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert (rows[-1]["step"], rows[-1]["bd/clip_lo"], rows[-1]["bd/clip_hi"]) == (4, 0.3, 0.8)
    assert json.loads((out / "step-4" / "trainer_state.json").read_text())["objective"] == {"clip": [0.3, 0.8]}
    # a checkpoint from before (no objective state): the recipe's clip
    import shutil

    shutil.rmtree(out / "step-4")
    p = out / "step-2" / "trainer_state.json"
    state = json.loads(p.read_text())
    del state["objective"]
    p.write_text(json.dumps(state))
    seen.clear()
    assert _train(recipe, out, data, "--resume") == 0, capsys.readouterr().err
    assert seen == [(0.3, 0.8)] * 2


def test_cuda_graphs_are_not_offered_while_searching():
    model = make(tiny(clip_search={}))
    assert model.objective.graph_because == "clip_search changes the training clip range at evaluations"


BAD = {
    "order": ({"grid": [[0.8, 0.2]]}, r"objective\.clip_search\.grid\[0\]: must be \[beta, omega\] with "
                                      r"0 <= beta <= omega <= 1, got \[0\.8, 0\.2\]$"),
    "low": ({"grid": [[0.0, 1.0], [-0.1, 0.5]]}, r"objective\.clip_search\.grid\[1\]: must be \[beta, omega\]"),
    "high": ({"grid": [[0.2, 1.5]]}, r"objective\.clip_search\.grid\[0\]: must be \[beta, omega\]"),
    "nan": ({"grid": [[0.2, float("nan")]]}, r"objective\.clip_search\.grid\[0\]\[1\]: must be a finite number, got nan$"),
    "zero": ({"grid": [[0.0, 0.0]]}, r"objective\.clip_search\.grid\[0\]: omega must be >= 0\.001"),
    "empty": ({"grid": []}, r"objective\.clip_search\.grid: must name at least one \[beta, omega\] range$"),
    "three": ({"grid": [[0.1, 0.2, 0.3]]}, r"objective\.clip_search\.grid\[0\]: must be a list of 2 numbers, got 3$"),
    "every": ({"every": 0}, r"objective\.clip_search\.every: must be >= 1, got 0$"),
    "unknown": ({"gird": [[0, 1]]}, r"objective\.clip_search\.gird: unknown key \(did you mean 'grid'\?\)$"),
    "resample": ({"grid": [[0.0, 1.0], [0.3, 0.45]]},
                 r"objective\.clip_search\.grid\[1\]: no masked fraction k / 4 of a block lies in \[0\.3, 0\.45\]"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_clip_search_is_one_line_naming_the_key(case, tmp_path, capsys):
    search, pattern = BAD[case]
    d = tiny(clip_search=search, resample=case == "resample")
    text = yaml.safe_dump(d, sort_keys=False)
    with pytest.raises(RecipeError) as e:
        load_recipe(text)
    assert len(e.value.errors) == 1 and "\n" not in str(e.value)
    assert re.match(r"^<recipe>:\d+: " + pattern, str(e.value)), str(e.value)
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    assert main(["check", str(p)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert re.match(rf"^{re.escape(str(p))}:\d+: " + pattern, err), err


def test_clip_search_round_trips_and_leaves_other_hashes_alone():
    plain = load_recipe(yaml.safe_dump(tiny()))
    r = load_recipe(yaml.safe_dump(tiny(clip_search={"grid": [[0.0, 1.0], [0.3, 0.8]], "every": 3})))
    assert r.objective.clip_search == bd.ClipSearchConfig(grid=((0.0, 1.0), (0.3, 0.8)), every=3)
    assert load_recipe(yaml.safe_dump(r.to_dict())).objective == r.objective
    assert r.hash() != plain.hash() == load_recipe(yaml.safe_dump(tiny(clip_search=None))).hash()


@pytest.mark.parametrize("at", ["step", "last"])
def test_a_search_an_interrupt_skipped_runs_on_resume(tmp_path, monkeypatch, capsys, at):
    """A signal in a search step skips its evaluation (``at`` step: the checkpoint is saved without it) or
    saves the checkpoint before it (``at`` last: the run's last step): the checkpoint held the range from
    before the search, so the resumed run trained on it where the uninterrupted run had switched. The
    checkpoint now says its step's evaluation is pending; the resumed run runs it first (the search), and
    trains on the ranges of the uninterrupted run."""
    from hymba_plus.training.trainer import Trainer

    recipe, data = _recipe_file(tmp_path, {"grid": [[0.3, 0.8], [0.45, 0.95]]}), _text_file(tmp_path)
    _patch_terms(monkeypatch, (0.45, 0.95))
    seen = _record_training_ranges(monkeypatch)
    assert _train(recipe, tmp_path / "whole", data) == 0, capsys.readouterr().err
    whole = list(seen)
    assert whole == [(0.3, 0.8)] + [(0.45, 0.95)] * 3  # the search at step 1 switched
    seen.clear()
    stop_at = 1 if at == "step" else 2  # (the last step of a run that stops after 2)
    orig = Trainer._stop_flags
    calls = []

    def signal_in(self, t_run, stop):  # noqa: ANN001
        calls.append(1)
        over, _ = orig(self, t_run, stop)
        if len(calls) == stop_at:
            stop.requested = "SIGTERM"
        return over, len(calls) == stop_at
    monkeypatch.setattr(Trainer, "_stop_flags", signal_in)
    out = tmp_path / "cut"
    extra = ("--stop-after", "2") if at == "last" else ()
    assert _train(recipe, out, data, *extra) != 1, capsys.readouterr().err
    monkeypatch.setattr(Trainer, "_stop_flags", orig)
    if at == "last":  # the search at step 1 ran; make step 2's the one that switches
        _patch_terms(monkeypatch, (0.3, 0.8))
    capsys.readouterr()
    assert _train(recipe, out, data, "--resume") == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"step {stop_at}: the checkpoint was saved before this step's evaluation (an interrupt), which " \
           "chooses the training clip range (clip_search): it runs first" in err, err
    if at == "step":
        assert seen == whole
    else:  # step 1 searched (0.45, 0.95); step 2's search, after the checkpoint, chose (0.3, 0.8): kept on resume
        assert seen == [(0.3, 0.8), (0.45, 0.95), (0.3, 0.8), (0.3, 0.8)]


def test_the_candidate_drawn_as_the_evaluation_reuses_its_forward(monkeypatch):
    """A searching evaluation runs the model once per candidate range, not again for the one whose
    draws are the evaluation's own ([0, 1]: the same seeded levels and masks), and its terms are
    those ``block_terms`` computes by its own forward."""
    grid = [[0.3, 0.8], [0.0, 1.0]]
    model = make(tiny(clip_search={"grid": grid}))
    obj = model.objective
    obj.configure(type("T", (), {"eval_every": 2})())
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    scored = ids != -100
    calls = []
    core = bd.BlockDiffusion.core

    def counted(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(1)
        return core(self, *a, **kw)
    monkeypatch.setattr(bd.BlockDiffusion, "core", counted)
    obj.eval_begin(2)
    _, _, _, out = obj.eval_batch(model, model, ids, ids, seed=4)
    assert len(calls) == 1 + 1  # the evaluation's forward, then [0.3, 0.8]'s
    sums = obj.eval_sums(out)
    terms, has = obj.block_terms(model, ids, scored, 4, 0.0, 1.0)
    terms = terms[has].double()
    assert sums["clip_search/1_n"] == float(has.sum())
    assert sums["clip_search/1_s1"] == pytest.approx(float(terms.sum()), rel=1e-12)
    assert sums["clip_search/1_s2"] == pytest.approx(float((terms * terms).sum()), rel=1e-12)
