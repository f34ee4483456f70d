"""Time-series forecasting (``ts_head``, ``objective: {kind: forecast}``, issue 19): the recipe
section and its errors, shapes and gradients, THE invariant on patch sequences for every mixer
(rolling forecasts equal to generate's from each origin), the metrics against hand-computed values, CSV
reading and its one-line errors, ``hymba train`` / ``hymba generate --mode forecast`` end to
end, and that a tiny forecaster beats seasonal naive on held-out synthetic series."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from hymba_plus import RecipeError, build_model, from_pretrained, load_recipe, registry
from hymba_plus.cli import main
from hymba_plus.models.forecast_decoding import rolling_forecasts
from hymba_plus.training import forecast_metrics as fm
from hymba_plus.training.series import SeriesStream, read_csv, synthetic
from tests.conftest import rel_err
from tests.helpers import EVERY_COMPONENT, load_benchmark

REPO = Path(__file__).resolve().parents[1]
OBJ = {"kind": "forecast", "context": 32, "horizon": 8, "patch": 4, "channels": 2, "loss": "quantile",
       "quantiles": [0.1, 0.5, 0.9], "season": 8}


def recipe(pattern: str = "GD | GA", meta: int = 0, etd: dict | None = None, **obj) -> dict:
    m = {"d_model": 32, "max_seq_len": 64, "block_pattern": pattern, "meta_tokens": meta}
    if etd:
        m["etd"] = etd
    return {"name": "fc", "model": m, "components": dict(EVERY_COMPONENT), "objective": {**OBJ, **obj}}


# --------------------------------------------------------------------------- recipe


def test_registered_shipped_and_round_trips() -> None:
    assert "ts_head" in registry.names() and "forecast" in registry.names("objective")
    shipped = [p for p in (REPO / "configs").glob("*.yaml") if "forecast" in p.read_text()]
    assert shipped
    r = load_recipe(REPO / "configs" / "forecast_tiny.yaml")
    assert r.objective.kind == "forecast" and r.model.vocab_size is None and not r.reads_tokens
    assert load_recipe(r.to_yaml()) == r and load_recipe(r.to_yaml()).hash() == r.hash()
    m = build_model(r)
    assert m.embed is None and m.lm_head is None  # no token embedding, no vocabulary head


def _errors(tmp_path: Path, data: dict) -> list[str]:
    import yaml

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(f)
    return e.value.errors


@pytest.mark.parametrize("change, key, fragment", [
    ({"patch": 5}, "objective.context", "must be a multiple of patch (5)"),
    ({"context": 512, "patch": 4}, "objective.context", "128 patch tokens exceed model.max_seq_len (64)"),
    ({"loss": "mse"}, "objective.quantiles", "only with loss: quantile"),
    ({"quantiles": [0.5, 0.1]}, "objective.quantiles", "strictly increasing"),
    ({"quantiles": [0.0, 0.5]}, "objective.quantiles", "must lie in (0, 1)"),
    ({"quantiles": [0.1, 0.9]}, "objective.quantiles", "must include 0.5, the median"),  # was the 0.9 one
    ({"loss": "mae"}, "objective.loss", "must be one of 'mse', 'quantile'"),
    ({"horizn": 8}, "objective.horizn", "unknown key (did you mean 'horizon'?)"),
    ({"horizon": 0}, "objective.horizon", "must be >= 1"),
    ({"channels": "two"}, "objective.channels", "wrong type: expected an integer"),
    ({"season": 64}, "objective.season", "must be <= context (32)"),
    # every size within its bound, their product in the channel-mixed head ~1e11 weights (400 GiB in
    # float32): it loaded
    ({"channel_independent": False, "horizon": 65536, "channels": 16384}, "objective.channel_independent",
     "the ts_head would hold 106,302,570,528 weights, more than 4,294,967,296"),
])
def test_objective_errors_name_file_line_and_key(tmp_path, change, key, fragment) -> None:
    errs = _errors(tmp_path, recipe(**change))
    assert len(errs) == 1, errs
    where, rest = errs[0].split(": ", 1)
    assert where.startswith(str(tmp_path / "r.yaml") + ":") and where.rsplit(":", 1)[1].isdigit()
    assert rest.startswith(f"{key}: ") and fragment in rest, errs[0]


def test_vocabulary_and_task_section_errors(tmp_path) -> None:
    with_vocab = recipe()
    with_vocab["model"]["vocab_size"] = 64
    assert "model.vocab_size: the forecast objective reads numbers" in _errors(tmp_path, with_vocab)[0]
    mtp = recipe()
    mtp["model"]["mtp"] = {"depth": 1}
    assert "model.mtp: the forecast objective reads numbers" in _errors(tmp_path, mtp)[0]
    task = recipe()
    task["task"] = task.pop("objective")  # the spelling: the recipe language calls it objective
    errs = _errors(tmp_path, task)
    assert any("task: unknown key: a task is given as the recipe's objective" in e for e in errs)
    no_vocab = recipe()
    del no_vocab["objective"]  # a token model without vocab_size
    assert _errors(tmp_path, no_vocab)[0].endswith("model.vocab_size: missing required key")


# --------------------------------------------------------------------------- shapes, gradients


@pytest.mark.parametrize("ci, loss", [(True, "quantile"), (False, "mse")])
def test_shapes_and_gradients(ci, loss) -> None:
    torch.manual_seed(0)
    obj = {"channel_independent": ci, "loss": loss}
    if loss == "mse":
        obj["quantiles"] = None
    m = build_model(recipe("GD | GA+moe", meta=2, **obj))
    x, y = torch.randn(3, 32, 2) * 5 + 10, torch.randn(3, 8, 2)
    out = m.objective.train_forward(m, m, x, y)
    Q = 3 if loss == "quantile" else 1
    assert out.logits.shape == (3, 8, 2, Q) and out.loss.ndim == 0 and out.aux_loss is not None  # MoE balancing
    out.loss.backward()
    head = m.objective.ts_head
    for p in (head.patch_embed.weight, head.out.weight, head.revin_weight, m.blocks[0].mixer.q_proj.weight
              if hasattr(m.blocks[0].mixer, "q_proj") else next(m.blocks[0].parameters())):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    pred = m.objective.forecast(m.eval(), x)
    assert pred.shape == (3, 8, 2, Q)
    if Q > 1:  # quantiles never cross after the rearrangement
        assert (pred.diff(dim=-1) >= 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_quantile_levels_stay_exact_whatever_the_model_dtype(dtype) -> None:
    """``build_model(..., dtype=torch.bfloat16)`` (or ``model.half()``) cast the levels buffer with the
    weights: the head trained and scored the 0.8984 / 0.1001 quantiles for 0.9 / 0.1."""
    m = build_model(recipe(quantiles=[0.05, 0.1, 0.5, 0.9, 0.95]), dtype=dtype)
    want = torch.tensor([0.05, 0.1, 0.5, 0.9, 0.95])
    assert torch.equal(m.objective.levels, want)
    assert torch.equal(m.float().objective.levels, want) and torch.equal(m.to(dtype).objective.levels, want)
    z_hat = torch.ones(1, 1, 1, 5)  # the head's outputs are float32 whatever the weights' dtype
    assert float(m.objective.loss(z_hat, torch.zeros(1, 1, 1))) == pytest.approx(float((1 - want).mean()), rel=1e-6)


def test_revin_makes_forecasts_equivariant_to_affine_maps_of_the_series() -> None:
    """RevIN: forecasting a * x + b gives a * forecast(x) + b (a > 0), whatever the scale."""
    torch.manual_seed(0)
    m = build_model(recipe()).double().eval()
    x = torch.randn(2, 32, 2, dtype=torch.float64).cumsum(1)
    with torch.no_grad():
        f = m.objective.forecast(m, x).double()
        g = m.objective.forecast(m, 1000.0 * x + 5e4).double()
    assert rel_err(g, 1000.0 * f + 5e4) < 1e-4


@pytest.mark.parametrize("a, b", [(1.0, 1e7), (1e3, -2e9), (0.5, 3.0)])
def test_revin_equivariance_holds_far_from_zero_on_a_float32_model(a, b) -> None:
    """The shipped float32 model: a series far from 0 (float32 inputs rounded 1e7 + x to whole numbers,
    and RevIN's statistics of it in float32 kept none of x) forecasts as a forecast(x) + b; also through
    generate (cached roll-outs, float64 in and out) and rolling_forecasts."""
    torch.manual_seed(0)
    m = build_model(recipe()).eval()
    x = torch.randn(2, 48, 2, dtype=torch.float64).cumsum(1)
    y = a * x + b
    with torch.no_grad():
        for fn in (lambda s: m.objective.forecast(m, s[:, -32:]),
                   lambda s: m.generate(s, max_new_tokens=16, mode="forecast"),
                   lambda s: rolling_forecasts(m, s, 2)[0]):
            f, g = fn(x), fn(y)
            assert g.dtype == torch.float64
            assert ((g - (a * f + b)).abs().max() / (a * x.std())) < 1e-3
    assert m.generate(x.float(), max_new_tokens=4, mode="forecast").dtype == torch.float32  # float32 in, out


def test_data_too_small_for_revins_eps_gets_a_notice(tmp_path, capsys) -> None:
    """Series whose windows vary by less than ~sqrt(100 revin_eps) are flattened by RevIN's absolute eps
    (ts_head's docstring): training and forecasting say so, naming the channels and a revin_eps to use."""
    from hymba_plus.training.series import small_scale_note

    v = synthetic(400, 2, 1, 8)
    assert small_scale_note(v, 32, 1e-5, "s.csv") is None
    v[:, 1] *= 1e-3
    note = small_scale_note(v, 32, 1e-5, "s.csv")
    assert note.startswith("note: s.csv: channel 1 vary little (window std ") and "revin_eps 1e-05" in note
    # a channel constant over most windows (a flat series, intermittent zeros): the windows that vary
    # decide (it read 'window std 0' and advised revin_eps 1e-30, which blows up the z-score of a jump
    # after a flat context: eps is what keeps it finite)
    flat = synthetic(400, 2, 1, 8)
    flat[:, 1] = 0.0
    assert small_scale_note(flat, 32, 1e-5, "s.csv") is None  # constant: nothing to flatten
    flat[::100, 1] = 3.0  # a sale now and then: most windows are flat
    assert small_scale_note(flat, 32, 1e-5, "s.csv") is None
    flat[::100, 1] = 3e-4  # tiny sales: flattened
    note = small_scale_note(flat, 32, 1e-5, "s.csv")
    assert note.startswith("note: s.csv: channel 1 vary little (window std 5") and "e.g. 3e-12" in note
    rows = [[i, f"{a:.6g}", f"{b:.6g}"] for i, (a, b) in enumerate(v)]
    cfg = tmp_path / "fc.yaml"
    import yaml

    r = recipe()
    r["train"] = {"batch_size": 4, "steps": 1, "eval_every": 1, "eval_batches": 1, "warmup_steps": 0}
    cfg.write_text(yaml.safe_dump(r))
    data = write_csv(tmp_path / "s.csv", rows)
    assert main(["train", str(cfg), "--data", str(data), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert f"note: {data}: channel 1 vary little" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "run"), "--mode", "forecast", "--data", str(data), "--out",
                 str(tmp_path / "f.csv")]) == 0
    assert f"note: {data}: channel 1 vary little" in capsys.readouterr().err


def test_forecast_refuses_non_finite_values_it_would_read() -> None:
    """A NaN among the values a forecast reads made every forecast NaN, silently."""
    m = build_model(recipe()).eval()
    x = torch.randn(1, 40, 2)
    x[0, 30, 1] = float("nan")
    with pytest.raises(ValueError, match=r"series\[0, 30, 1\] is nan: the values a forecast reads must be finite"):
        m.generate(x, max_new_tokens=4, mode="forecast")
    x[0, 30, 1] = 0.0
    x[0, 2, 0] = float("inf")  # before the context: not read
    assert m.generate(x, max_new_tokens=4, mode="forecast").isfinite().all()
    with pytest.raises(TypeError, match="series must be floating point"):
        m.generate(torch.zeros(1, 40, 2, dtype=torch.long), max_new_tokens=4, mode="forecast")


def test_revin_without_affine_has_no_parameters_and_inverts_exactly(tmp_path) -> None:
    """``objective.revin_affine: false``: RevIN is the plain z-score, no gamma / beta parameters
    (nor state-dict entries); denormalisation inverts normalisation exactly (as with the affine map
    at any gamma, beta); the model trains and forecasts finite values, and reloads."""
    torch.manual_seed(0)
    m = build_model(recipe(revin_affine=False))
    head = m.objective.ts_head
    assert head.revin_weight is None and head.revin_bias is None
    assert not [n for n, _ in m.named_parameters() if "revin" in n] and not [k for k in m.state_dict() if "revin" in k]
    affine = build_model(recipe()).objective.ts_head
    assert {n for n, _ in affine.named_parameters() if "revin" in n} == {"revin_weight", "revin_bias"}
    assert "RevIN, seasonal-naive" in m.objective.cfg.describe()
    x = torch.randn(3, 32, 2, dtype=torch.float64).cumsum(1) * 7 + 40
    mu, sigma = head.stats(x)
    z = head.normalize(x, mu, sigma)
    assert torch.equal(z, (x - mu) / sigma) and torch.equal(head.unaffine(z[..., None]), z[..., None])
    assert rel_err(head.denormalize(head.unaffine(z[..., None]), mu, sigma)[..., 0], x) < 1e-12
    with torch.no_grad():  # the affine map's inverse too, at a gamma and beta away from the identity
        affine.double()
        affine.revin_weight.copy_(torch.tensor([0.5, 2.0]))
        affine.revin_bias.copy_(torch.tensor([0.3, -1.0]))
        za = affine.normalize(x, mu, sigma)
        assert not torch.allclose(za, z)
        assert rel_err(affine.denormalize(affine.unaffine(za[..., None]), mu, sigma)[..., 0], x) < 1e-9
    stream = SeriesStream("synthetic", m.objective.cfg, seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for i in range(30):
        b = stream.train(range(8 * i, 8 * (i + 1)))
        loss = m.objective.train_forward(m, m, b.input_ids, b.labels).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        losses.append(float(loss.detach()))
    assert all(map(torch.isfinite, torch.tensor(losses))) and sum(losses[-5:]) < sum(losses[:5])
    m.eval()
    b = stream.test()
    pred = m.objective.forecast(m, b.input_ids)
    assert pred.shape == (b.input_ids.shape[0], 8, 2, 3) and torch.isfinite(pred).all()
    m.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    assert again.objective.ts_head.revin_weight is None
    assert torch.equal(again.objective.forecast(again, b.input_ids), pred)


# --------------------------------------------------------------------------- the invariant


@pytest.mark.parametrize("pattern, etd, meta", [
    ("GA", None, 2), ("GD", None, 0), ("M3", None, 2), ("ATL", None, 0), ("HY", None, 2),
    ("GA+moe | GD+mlp", None, 1),
    ("GD | GA | M3 | GA", {"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2}, 2),
])
@torch.no_grad()
def test_invariant_on_patch_sequences(pattern, etd, meta) -> None:
    """Patches fed through one cache in uneven chunks give the full forward's forecasts at every
    patch (meta tokens, windows, MoE, ETD included), with RevIN statistics fixed per window."""
    torch.manual_seed(0)
    m = build_model(recipe(pattern, meta=meta, etd=etd)).double().eval()
    obj = m.objective
    x = torch.randn(2, 48, 2, dtype=torch.float64).cumsum(1)  # 12 patches
    mu, sigma = obj.ts_head.stats(x[:, :32])
    full, _ = obj.patch_outputs(m, x, mu, sigma)
    cache = m.new_cache(4)  # channel-independent: batch x channels rows
    parts, lo = [], 0
    for n in (5, 1, 3, 3):  # patches per call
        z, _ = obj.patch_outputs(m, x[:, 4 * lo:4 * (lo + n)], mu, sigma, cache=cache)
        parts.append(z)
        lo += n
    assert full.shape == (2, 12, 8, 2, 3)
    assert rel_err(torch.cat(parts, 1), full) < 1e-4


@torch.no_grad()
def test_rolling_and_rolled_out_forecasts_reuse_the_cache() -> None:
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA | M3")).double().eval()
    obj = m.objective
    x = torch.randn(1, 44, 2, dtype=torch.float64).cumsum(1)
    # rolling origins: each == generate's forecast from the series up to that origin (its own
    # window and RevIN statistics; the windows of all origins in one batched forward)
    preds, origins = rolling_forecasts(m, x, origins=3)
    assert origins.tolist() == [32, 36, 40, 44] and preds.shape == (1, 4, 8, 2, 3)
    for r, o in enumerate(origins.tolist()):
        assert rel_err(preds[:, r], m.generate(x[:, :o], max_new_tokens=8, mode="forecast")) < 1e-4
    # beyond the horizon: the point forecast's patches go back through the cache
    st: dict = {}
    out = m.generate(x, max_new_tokens=20, mode="forecast", stats=st)
    assert out.shape == (1, 20, 2, 3) and st["forwards"] == 3 and "rolled 2x" in st["summary"][0]
    assert st["rounds"] == 2  # the rounds of fed-back values, as the summary and the length error count them (was 3)
    ctx = x[:, -32:]
    mu, sigma = obj.ts_head.stats(ctx)
    seq, expect = ctx, []
    for _ in range(3):  # the uncached reference: a full forward over the grown sequence each round
        z, _ = obj.patch_outputs(m, seq, mu, sigma)
        pred = obj.values(z[:, -1], mu, sigma)
        expect.append(pred[:, :8])
        seq = torch.cat([seq, fm.point_forecast(pred, obj.levels)], 1)
    assert rel_err(out, torch.cat(expect, 1)[:, :20]) < 1e-4


# --------------------------------------------------------------------------- metrics


def test_metrics_against_hand_computed_values() -> None:
    x = torch.tensor([1.0, 2, 3, 4, 1, 2, 3, 4])[None, :, None]  # period 4
    y = torch.tensor([1.0, 2, 3, 5])[None, :, None]
    naive = fm.seasonal_naive(x, 4, 4)
    assert naive.flatten().tolist() == [1, 2, 3, 4]
    assert float(fm.mase_scale(x, 4)) == 0.0  # perfectly periodic: no in-sample change
    assert float(fm.mase_scale(x, 1)) == pytest.approx((3 * 2 + 3) / 7)  # |steps| 1,1,1,3,1,1,1
    lv = torch.tensor([0.1, 0.5, 0.9])
    q = torch.tensor([[0.0, 1.0, 2.0]])
    # y = 1.5: u = 1.5, 0.5, -0.5 -> 0.15, 0.25, 0.05
    assert fm.pinball(torch.tensor([1.5]), q, lv).flatten().tolist() == pytest.approx([0.15, 0.25, 0.05])
    assert float(fm.crps(torch.tensor([1.5]), q, lv)) == pytest.approx(2 * 0.45 / 3)
    assert float(fm.crps(torch.tensor([1.5]), q[:, 1:2], None)) == pytest.approx(0.5)  # point: |error|
    pred = torch.stack([y, y + 1, y + 2], -1)  # [1, 4, 1, 3]: the median is y + 1
    res = fm.forecast_results({k: float(v) for k, v in fm.window_sums(x, y, pred, lv, 1).items()})
    assert res["mae"] == pytest.approx(1.0) and res["mse"] == pytest.approx(1.0)
    assert res["mase"] == pytest.approx(1.0 / ((3 * 2 + 3) / 7))
    # season 1: naive repeats the last value, 4: |1-4|, |2-4|, |3-4|, |5-4| -> 1.75
    assert res["snaive_mae"] == pytest.approx(1.75) and res["snaive_crps"] == res["snaive_mae"]
    # a window whose context does not change in-sample has no MASE: left out of the mean (it had
    # divided by a 1e-8 floor: 2.5e6 from errors of 0.1 in the reviewer's case), counted apart
    flat = torch.stack([x[0], torch.full_like(x[0], 3.0)])  # [2, 8, 1]
    res2 = fm.window_sums(flat, torch.stack([y[0], y[0] + 0.1]), torch.stack([pred[0], pred[0]]), lv, 1)
    assert float(res2["mase_series"]) == 1 and float(res2["series"]) == 2
    assert fm.forecast_results({k: float(v) for k, v in res2.items()})["mase"] == pytest.approx(res["mase"])


def test_quantile_crps_approaches_the_gaussian_closed_form() -> None:
    """CRPS from many quantiles of N(0, 1) at y = 0 ~ the closed form 2 phi(0) - 1/sqrt(pi)."""
    lv = torch.linspace(0.005, 0.995, 199, dtype=torch.float64)
    q = torch.distributions.Normal(0.0, 1.0).icdf(lv)[None]
    closed = 2 * 0.3989422804 - 1 / 3.1415926536 ** 0.5
    assert float(fm.crps(torch.zeros(1, dtype=torch.float64), q, lv)) == pytest.approx(closed, rel=0.02)


# --------------------------------------------------------------------------- data


def write_csv(path: Path, rows: list[list], header: tuple = ("timestamp", "load", "temp")) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def good_rows(n: int = 120) -> list[list]:
    v = synthetic(n, 2, 1, 8)
    return [[f"2024-01-{1 + i // 24:02d} {i % 24:02d}:00", round(v[i, 0], 4), round(v[i, 1], 4)] for i in range(n)]


def test_csv_reading_fills_and_reports_missing_values(tmp_path) -> None:
    """A gap holds the last observed value in what the model reads (never a later one: a context
    does not read past its end; at the start, the first observed value) and is NaN as a target."""
    rows = good_rows()
    rows[10][1] = ""
    rows[11][1] = "NA"
    rows[0][2] = "nan"  # at the start: the first observed value
    rows[0][1] = "null"
    s = read_csv(write_csv(tmp_path / "s.csv", rows))
    assert s.values.shape == (120, 2) and s.columns == ["load", "temp"]
    assert s.values[10, 0] == s.values[11, 0] == pytest.approx(rows[9][1])  # carried forward, not interpolated
    assert s.values[0, 1] == pytest.approx(rows[1][2]) and s.values[0, 0] == pytest.approx(rows[1][1])
    assert not np.isnan(s.values).any()
    t = s.targets()
    assert sorted(zip(*np.nonzero(np.isnan(t)))) == [(0, 0), (0, 1), (10, 0), (11, 0)]
    assert np.array_equal(t[~np.isnan(t)], s.values[~np.isnan(t)])
    assert s.report == ("4 missing values (load: 3, temp: 1): the last observed value in contexts, not scored as "
                        "targets")
    stream = SeriesStream(str(tmp_path / "s.csv"), load_recipe(recipe()).objective, seed=0)
    b = stream.train(range(5))
    assert b.input_ids.shape == (5, 32, 2) and b.labels.shape == (5, 8, 2)
    assert "4 missing values (load: 3" in stream.description
    lo, hi = stream.splits.val  # held-out targets lie in their span, after the training span
    ev = stream.eval(range(len(stream.val_starts)))
    assert stream.splits.train[1] == lo and ev.labels.shape[0] == len(stream.val_starts)
    # the first training target follows a whole context (the data line said 'train targets [0, ...)')
    assert f"train targets [32, {lo}), validation [{lo}, {hi})" in stream.description
    w = stream._windows([0])  # the context holds the gaps (filled), the targets none
    assert torch.isfinite(w.input_ids).all() and torch.isfinite(w.labels).all()
    assert w.input_ids[0, 11, 0].item() == pytest.approx(rows[9][1])


def test_missing_targets_are_not_scored(tmp_path) -> None:
    """Loss and metrics over the observed targets only: a NaN target changes neither its window's
    other scores nor the gradients' finiteness, and counts in no sum."""
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA", loss="quantile"))
    obj = m.objective
    x = torch.randn(3, 32, 2).cumsum(1)
    y = torch.randn(3, 8, 2).cumsum(1) + x[:, -1:]
    gap = y.clone()
    gap[0, 2:5, 1] = float("nan")
    gap[1, :, 0] = float("nan")  # a series with no observed target: no MASE
    ids_obs = torch.isfinite(gap)
    out = obj.train_forward(m, m, x, gap)
    out.loss.backward()
    assert torch.isfinite(out.loss) and all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    with torch.no_grad():
        z_last, z, mu, sigma, _ = obj._window(m, x, y)
        per = fm.pinball(z, z_last, obj.levels).mean(-1)  # [B, H, C]
        assert out.loss.item() == pytest.approx(per[ids_obs].mean().item(), rel=1e-5)
        pred = obj.values(z_last, mu, sigma)
    full, part = fm.window_sums(x, y, pred, obj.levels, 8), fm.window_sums(x, gap, pred, obj.levels, 8)
    assert part["points"] == ids_obs.sum() == 48 - 3 - 8
    err = (y - fm.point_forecast(pred, obj.levels)).double()
    assert part["sse"].item() == pytest.approx(err[ids_obs].pow(2).sum().item())
    assert part["mase_series"] == full["mase_series"] - 1
    mase, has = fm.series_mase(x.double(), gap.double(), fm.point_forecast(pred, obj.levels).double(), 8)
    assert not has[1, 0] and has[0, 1]
    want = err[0, :, 1].abs()[torch.isfinite(gap[0, :, 1])].mean() / fm.mase_scale(x.double(), 8)[0, 1]
    assert mase[0, 1].item() == pytest.approx(want.item())
    assert all(torch.isfinite(v) for v in part.values())


def test_a_csv_with_a_byte_order_mark_reads_as_without(tmp_path) -> None:
    """Files saved by Windows tools start with a UTF-8 BOM: not part of the first column's name."""
    plain = read_csv(write_csv(tmp_path / "s.csv", good_rows()))
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "s.csv").read_bytes())
    s = read_csv(bom)
    assert s.columns == plain.columns == ["load", "temp"] and np.array_equal(s.values, plain.values)


def test_training_on_a_gappy_csv_is_finite(tmp_path, capsys) -> None:
    import yaml

    rows = good_rows(160)
    for i in list(range(40, 52)) + list(range(120, 135)):  # gaps in training and held-out targets
        rows[i][1] = ""
    cfg = tmp_path / "fc.yaml"
    r = recipe("GD | GA")
    r["train"] = {"batch_size": 8, "steps": 3, "eval_every": 3, "eval_batches": 2, "warmup_steps": 1}
    cfg.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(write_csv(tmp_path / "g.csv", rows)), "--out", str(out),
                 "--no-progress"]) == 0
    assert "27 missing values (load: 27)" in capsys.readouterr().err
    last = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert all(math.isfinite(last[k]) for k in ("loss", "eval_loss", "eval_mse", "eval_mase", "eval_crps"))


def test_statsmodels_series_go_through_the_csv_reader(tmp_path) -> None:
    """The real series of benchmarks/forecast.py (the optional extra ``forecast``): CO2's gaps are
    filled and reported, each dataset has the length the README states."""
    pytest.importorskip("statsmodels")
    bench = load_benchmark("forecast")
    lengths = {}
    for name in ("co2", "sunspots", "elnino"):
        stamps, values = bench.statsmodels_series(name)
        bench.write_csv(tmp_path / f"{name}.csv", stamps, values, [name])
        s = read_csv(tmp_path / f"{name}.csv")
        assert not torch.isnan(torch.from_numpy(s.values)).any()
        lengths[name] = (len(s.values), sum(s.filled.values()))
    assert lengths == {"co2": (2284, 59), "sunspots": (309, 0), "elnino": (732, 0)}


def test_benchmark_without_statsmodels_is_one_line_and_synthetic_still_runs(tmp_path, monkeypatch, capsys) -> None:
    """benchmarks/forecast.py without the extra (statsmodels made unimportable): the real datasets
    stop before any training with one line naming the package and the extra; synthetic needs none."""
    import sys

    bench = load_benchmark("forecast")
    monkeypatch.setitem(sys.modules, "statsmodels", None)  # import statsmodels -> ImportError
    out = ["--json", str(tmp_path / "f.json"), "--fig", str(tmp_path / "f.png")]
    monkeypatch.setattr(sys, "argv", ["forecast.py", "--datasets", "synthetic", "co2", *out])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == ("benchmarks/forecast.py: --datasets co2 needs statsmodels, not installed: "
                            "pip install -e '.[forecast]' (or --datasets synthetic)")
    assert not (tmp_path / "f.json").exists()
    monkeypatch.setattr(sys, "argv", ["forecast.py", "--datasets", "synthetic", "--steps", "2", "--batch", "4",
                                      "--synthetic-channels", "1", "--threads", "1", *out])
    bench.main()
    assert "synthetic  MASE" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["results"][0]["dataset"] == "synthetic"


def _bad_csvs(tmp_path: Path) -> list[tuple[Path, str]]:
    rows = good_rows()
    only_time = write_csv(tmp_path / "only_time.csv", [[r[0]] for r in rows], header=("timestamp",))
    short = write_csv(tmp_path / "short.csv", rows[:40])
    unordered = [r[:] for r in rows]
    unordered[30][0], unordered[31][0] = unordered[31][0], unordered[30][0]
    text = [r[:] for r in rows]
    text[6][2] = "warm"
    multiline = tmp_path / "multiline.csv"  # a quoted cell spanning lines: errors name the file's line
    multiline.write_text('timestamp,load,temp\n2024-01-01 00:00,"1\n",2\n2024-01-01 01:00,abc,2\n')
    headerless = write_csv(tmp_path / "headerless.csv", rows[1:], header=rows[0])
    return [
        (only_time, f"{only_time}:1: no numeric column: only 'timestamp'"),
        (multiline, f"{multiline}:4: column 'load' (2): 'abc' is not a number"),
        (headerless, f"{headerless}:1: '{rows[0][0]},{rows[0][1]},{rows[0][2]}' looks like data, not a header"),
        (short, f"{short}: 40 time steps are too short for context 32 + horizon 8: need at least 56"),
        (write_csv(tmp_path / "unordered.csv", unordered),
         f"{tmp_path / 'unordered.csv'}:33: column 'timestamp' (1): timestamps must increase: "
         f"'{rows[30][0]}' is not after the previous '{rows[31][0]}'"),
        (write_csv(tmp_path / "text.csv", text), f"{tmp_path / 'text.csv'}:8: column 'temp' (3): 'warm' is not a number"),
    ]


def test_bad_csvs_one_line_error_nonzero_exit_nothing_written(tmp_path, capsys) -> None:
    cfg = tmp_path / "fc.yaml"
    import yaml

    cfg.write_text(yaml.safe_dump(recipe()))
    for path, expected in _bad_csvs(tmp_path):
        out = tmp_path / f"run-{path.stem}"
        rc = main(["train", str(cfg), "--data", str(path), "--out", str(out), "--steps", "2", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and err.startswith(f"hymba train: {expected}"), err
        assert "Traceback" not in err and "\n" not in err
        assert not out.exists()  # nothing written


def test_a_missing_series_file_names_what_a_forecast_run_reads(tmp_path, capsys) -> None:
    """`--data mqar` (a token task) or a mistyped CSV name on a forecast recipe said only `mqar: no such
    file`; a ladir run names its built-in tasks there: the forecast one names the CSV it wants and
    `synthetic`, its built-in series."""
    import yaml

    cfg = tmp_path / "fc.yaml"
    cfg.write_text(yaml.safe_dump(recipe()))
    for data in ("mqar", str(tmp_path / "seres.csv")):
        out = tmp_path / "run"
        rc = main(["train", str(cfg), "--data", data, "--out", str(out), "--steps", "2", "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert rc == 1 and "\n" not in err and not out.exists(), err
        assert err.startswith(f"hymba train: {data}: no such file (a forecast recipe reads a series CSV, or "
                              "synthetic: the built-in series)"), err


# --------------------------------------------------------------------------- CLI end to end


def test_cli_train_then_generate_forecast(tmp_path, capsys) -> None:
    import yaml

    cfg = tmp_path / "fc.yaml"
    r = recipe("GD | GA")
    r["train"] = {"batch_size": 8, "steps": 6, "eval_every": 3, "eval_batches": 1, "warmup_steps": 1}
    cfg.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(out), "--no-progress"]) == 0  # no --data: synthetic
    cap = capsys.readouterr()
    assert "data: synthetic series" in cap.err
    summary = cap.out.strip().splitlines()[-1]
    for k in ("eval_mse", "eval_mae", "eval_mase", "eval_crps", "eval_snaive_mase", "eval_snaive_crps",
              "eval_pinball"):
        assert k in summary
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[2]["eval_mase"] > 0 and "eval_snaive_mase" in rows[-1] and (out / "loss.png").is_file()
    ckpt = out / "step-6"
    assert not (ckpt / "tokenizer.json").exists()
    m = from_pretrained(ckpt)  # safetensors checkpoint, reloads without a vocabulary
    assert m.embed is None
    data = write_csv(tmp_path / "s.csv", good_rows())
    fc = tmp_path / "fc" / "forecast.csv"
    rc = main(["generate", str(out), "--mode", "forecast", "--data", str(data), "--horizon", "12", "--rolling", "4",
               "--out", str(fc)])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "rolled 1x through the cache" in cap.err and "backtest: 4 rolling origins" in cap.err  # each horizon observed
    table = list(csv.reader(fc.open()))
    assert table[0] == ["origin", "timestamp", "step", "load", "load_q0.1", "load_q0.5", "load_q0.9", "temp",
                        "temp_q0.1", "temp_q0.5", "temp_q0.9"]
    assert table[1][:3] == ["2024-01-05 23:00:00", "2024-01-06 00:00:00", "1"] and len(table) == 1 + 12 + 4 * 8
    assert fc.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    # a bad series: one line naming file, line and column; nothing written
    bad = [r[:] for r in good_rows()]
    bad[3][1] = "n/a?"
    bad_csv = write_csv(tmp_path / "bad.csv", bad)
    assert main(["generate", str(out), "--mode", "forecast", "--data", str(bad_csv), "--out",
                 str(tmp_path / "none" / "f.csv")]) == 1
    assert capsys.readouterr().err.strip() == f"hymba generate: {bad_csv}:5: column 'load' (2): 'n/a?' is not a number"
    assert not (tmp_path / "none").exists()
    # --out FILE.png named the plot and the CSV alike: the plot replaced the forecast
    assert main(["generate", str(out), "--mode", "forecast", "--data", str(data), "--out", str(tmp_path / "f.png")]) == 2
    assert "expected a file name (FILE.csv; the plot is FILE.png)" in capsys.readouterr().err
    assert not (tmp_path / "f.png").exists()
    # timestamps past 9999-12-31: one line (was an OverflowError traceback)
    late = write_csv(tmp_path / "late.csv", [[f"9999-12-{27 + i // 24:02d} {i % 24:02d}:00", *r[1:]]
                                             for i, r in enumerate(good_rows(30 * 24)[-120:])])
    assert main(["generate", str(out), "--mode", "forecast", "--data", str(late), "--out",
                 str(tmp_path / "late" / "f.csv")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"hymba generate: {late}: the 8 steps after the last timestamp") and "\n" not in err
    assert not (tmp_path / "late").exists()
    # a token checkpoint is not a forecaster, and a forecaster reads no prompt
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "use --mode forecast --data" in capsys.readouterr().err
    assert main(["generate", str(out), "--mode", "forecast"]) == 2
    assert "--mode forecast needs --data" in capsys.readouterr().err


def test_cli_rolling_scores_r_origins_with_their_horizon_observed(tmp_path, capsys) -> None:
    """``--rolling R`` backtests at R origins: the last R patch boundaries whose whole horizon lies
    in the data (horizon 10 here: the last origin is 3 patches of 4 before the end), a patch
    apart, each in the CSV; data too short for R origins is one line saying how many fit, and
    R < 1 a usage error."""
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA", horizon=10)).eval()
    m.save_pretrained(tmp_path / "m")
    data = write_csv(tmp_path / "s.csv", good_rows(60))
    series = read_csv(data)
    index = {str(t): i for i, t in enumerate(series.timestamps)}
    for r in (1, 2, 5):  # T 60, context 32: origins 48, 44, ..., 48 - 4 (R - 1) >= 32
        fc = tmp_path / f"f{r}.csv"
        rc = main(["generate", str(tmp_path / "m"), "--mode", "forecast", "--data", str(data), "--rolling", str(r),
                   "--out", str(fc)])
        err = capsys.readouterr().err
        assert rc == 0, err
        assert f"backtest: {r} rolling origin{'s' if r > 1 else ''} (each from its own window): MASE " in err
        back = list(csv.reader(fc.open()))[1 + 10:]  # after the forecast past the data
        assert len(back) == 10 * r
        origins = sorted({index[row[0]] + 1 for row in back})
        assert origins == [48 - 4 * k for k in reversed(range(r))]
        assert all(index[row[1]] == index[row[0]] + int(row[2]) for row in back)  # every step observed
    # the first origin reads one context: its forecast is the plain forecast of the data up to it
    first = [row for row in back if index[row[0]] + 1 == 32]
    x = torch.from_numpy(series.values).float()[None, :32]
    ref = m.generate(x, max_new_tokens=10, mode="forecast")[0]  # [10, C, Q]
    got = torch.tensor([[float(v) for v in row[3:]] for row in first]).view(10, 2, 4)[..., 1:]
    assert rel_err(got, ref) < 1e-4
    # too short for R origins / no origin fits / R < 1: one line, nothing written
    for n, r, expected in [(60, 6, "need at least 64 (5 origins fit)"), (46, 2, "need at least 48 (1 origin fits)"),
                           (40, 1, "need at least 44 (0 origins fit)")]:
        short = write_csv(tmp_path / f"short{n}.csv", good_rows(n))
        out = tmp_path / f"none{n}" / "f.csv"
        assert main(["generate", str(tmp_path / "m"), "--mode", "forecast", "--data", str(short), "--rolling", str(r),
                     "--out", str(out)]) == 1
        assert capsys.readouterr().err.strip() == (
            f"hymba generate: {short}: {n} time steps are too short for --rolling {r} with the model's context 32, "
            f"horizon 10 and patch 4: {expected}")
        assert not out.parent.exists()
    assert main(["generate", str(tmp_path / "m"), "--mode", "forecast", "--data", str(data), "--rolling", "0"]) == 2
    assert capsys.readouterr().err.strip() == "hymba generate: --rolling 0: must be >= 1 (backtest origins)"


def test_a_horizon_the_model_cannot_roll_to_is_a_usage_error(tmp_path, capsys) -> None:
    """--horizon past what the model's max_seq_len lets it roll to is a flag value the checkpoint cannot
    take: one line, exit 2 (it was exit 1), nothing written."""
    m = build_model(recipe("GD | GA", horizon=10)).eval()
    m.save_pretrained(tmp_path / "m")
    data = write_csv(tmp_path / "s.csv", good_rows(60))
    out = tmp_path / "o" / "f.csv"
    rc = main(["generate", str(tmp_path / "m"), "--mode", "forecast", "--data", str(data), "--horizon", "1000000",
               "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("hymba generate: --horizon: max_new_tokens 1000000: at most ") and "fit this model" in err
    assert not out.parent.exists()



def test_a_horizon_error_is_typed_apart_from_a_bad_series() -> None:
    """``hymba generate --mode forecast`` told --horizon's errors (exit 2) from the series' (exit 1) by the
    message's first words; the horizon's are a ``HorizonError`` (a ValueError), the series' plain ValueErrors."""
    from hymba_plus.models.forecast_decoding import HorizonError

    m = build_model(recipe("GD | GA", horizon=10)).eval()
    cfg = m.objective.cfg
    x = torch.randn(1, cfg.context, cfg.channels, dtype=torch.float64)
    for n in (0, 10 ** 6):
        with pytest.raises(HorizonError, match="max_new_tokens"):
            m.generate(x, max_new_tokens=n, mode="forecast")
    short = build_model(recipe("GD | GA", horizon=cfg.patch - 1)).eval()
    with pytest.raises(HorizonError, match="forecasts longer than the horizon"):
        short.generate(x, max_new_tokens=cfg.patch + 1, mode="forecast")
    x[0, -1, 0] = math.nan
    with pytest.raises(ValueError, match="must be finite") as e:
        m.generate(x, max_new_tokens=5, mode="forecast")
    assert not isinstance(e.value, HorizonError)

def test_info_shows_the_forecast_task(capsys) -> None:
    assert main(["info", str(REPO / "configs" / "forecast_tiny.yaml")]) == 0
    text = capsys.readouterr().out
    assert "no vocabulary (reads numbers: patch tokens)" in text
    assert "objective   forecast (ts_head): context 96 = 12 patches of 8 -> horizon 24" in text


def test_demo_tour_runs_the_forecast_config(capsys, tmp_path) -> None:
    """`make demo` on configs/forecast_tiny.yaml: the patch invariant and the cached roll-out."""
    import shutil

    from hymba_plus import demo

    shutil.copy(REPO / "configs" / "forecast_tiny.yaml", tmp_path / "forecast_tiny.yaml")
    assert demo.main(["--configs", str(tmp_path), "--no-train", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "patches of 8 values in chunks" in out and "(ok, bound 1e-4)" in out
    assert "rolled through the cache vs full re-runs" in out


# --------------------------------------------------------------------------- it learns


def test_beats_seasonal_naive_on_held_out_synthetic_series() -> None:
    """400 AdamW steps (about 8 s on one CPU core) on synthetic series of seed 0; evaluated on the
    test windows of *other* series (seed 7): MASE 0.96 vs seasonal naive's 1.02, CRPS 2.93 vs 4.14
    (model seeds 1 and 2: MASE 0.86 / 0.92, CRPS 2.56 / 2.81; asserted: MASE below 0.97x, CRPS
    below 0.8x the seasonal-naive baseline's; the margin on MASE moves by ~0.03 with float rounding)."""
    torch.manual_seed(0)
    r = {"name": "fc", "model": {"d_model": 32, "max_seq_len": 32, "block_pattern": "GD | GA"},
         "components": {"gdn": {"n_heads": 2, "head_dim": 16}, "gated_attn": {"n_heads": 2, "head_dim": 16},
                        "mlp": {"d_hidden": 64}},
         "objective": {"kind": "forecast", "context": 96, "horizon": 24, "patch": 8, "channels": 4,
                       "loss": "quantile", "season": 24}}
    m = build_model(r)
    obj = m.objective
    train = SeriesStream("synthetic", obj.cfg, seed=0)
    held_out = SeriesStream("synthetic", obj.cfg, seed=7)
    steps = 400
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    m.train()
    for i in range(steps):
        b = train.train(range(16 * i, 16 * (i + 1)))
        loss = obj.train_forward(m, m, b.input_ids, b.labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
    m.eval()
    b = held_out.test()
    pred = obj.forecast(m, b.input_ids)
    res = fm.forecast_results({k: float(v) for k, v in fm.window_sums(b.input_ids, b.labels, pred, obj.levels,
                                                                      24).items()})
    assert res["mase"] < 0.97 * res["snaive_mase"], res
    assert res["crps"] < 0.8 * res["snaive_crps"], res


def test_forecast_csv_keeps_timestamps_and_values_exact() -> None:
    """Unix-epoch timestamps were written with 6 significant digits (every row 1.7055e+09) and
    values as 1.23457e+06."""
    from hymba_plus.cli.forecast import _num, _stamp

    assert _stamp(1705500000.0) == "1705500000" and _stamp(1705500000.5) == "1705500000.5"
    assert _stamp(0.25) == "0.25"
    assert float(_num(torch.tensor(1234567.8))) == float(torch.tensor(1234567.8))


def test_mase_without_a_scale_is_nan_not_a_perfect_score() -> None:
    """Every context constant: no window has a MASE; it read 0.000 (a perfect score)."""
    ctx = torch.ones(3, 16, 1)
    tgt = torch.randn(3, 8, 1)
    res = fm.forecast_results({k: float(v) for k, v in fm.window_sums(ctx, tgt, torch.zeros(3, 8, 1, 1), None,
                                                                      4).items()})
    assert math.isnan(res["mase"]) and math.isnan(res["snaive_mase"]) and res["mae"] > 0


def test_metrics_without_an_observed_target_are_nan_not_perfect_scores(tmp_path, capsys) -> None:
    """Every target missing (a gap over the whole validation span or backtest): MSE, MAE, CRPS and the
    pinball loss read 0.0 (a perfect score, as MASE once did), the sums divided by a floor of 1 point."""
    x = torch.randn(2, 16, 1, dtype=torch.float64).cumsum(1)
    y = torch.full((2, 8, 1), float("nan"), dtype=torch.float64)
    sums = fm.window_sums(x, y, torch.zeros(2, 8, 1, 3), torch.tensor([0.1, 0.5, 0.9]), 4)
    res = fm.forecast_results({k: float(v) for k, v in sums.items()})
    assert sorted(res) == sorted(["mse", "mae", "mase", "crps", "pinball", "snaive_mse", "snaive_mae", "snaive_mase",
                                  "snaive_crps"])
    assert all(math.isnan(v) for v in res.values()), res
    y[1, 3, 0] = 2.0  # one observed target: scored again
    res = fm.forecast_results({k: float(v) for k, v in fm.window_sums(x, y, torch.zeros(2, 8, 1, 3),
                                                                      torch.tensor([0.1, 0.5, 0.9]), 4).items()})
    assert res["mae"] == 2.0 and res["mse"] == 4.0
    # a backtest whose horizons are all gaps: n/a, not 0
    torch.manual_seed(0)
    build_model(recipe("GD | GA")).eval().save_pretrained(tmp_path / "m")
    rows = good_rows(60)
    for r in rows[-8:]:
        r[1] = r[2] = ""
    data = write_csv(tmp_path / "s.csv", rows)
    assert main(["generate", str(tmp_path / "m"), "--mode", "forecast", "--data", str(data), "--rolling", "1",
                 "--out", str(tmp_path / "f.csv")]) == 0
    assert ("MASE n/a (seasonal naive n/a), CRPS n/a (seasonal naive n/a), MSE n/a, MAE n/a"
            in capsys.readouterr().err)


@torch.no_grad()
def test_eval_metrics_count_each_validation_window_once() -> None:
    """An eval batch larger than the validation set wraps around (the forward keeps its batch shape);
    the metric sums count only its distinct windows (15 of forecast_tiny's 17 had counted twice)."""
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA")).eval()
    stream = SeriesStream("synthetic", m.objective.cfg, seed=0)
    n = stream.n_eval()
    b = stream.eval(range(n + 5))
    assert b.input_ids.shape[0] == n + 5 and b.unique == n
    _, _, _, out = m.objective.eval_batch(m, m, b.input_ids, b.scored_labels(), seed=0, batch=b)  # as evaluate
    once = stream.eval(range(n))
    assert once.unique is None
    _, _, _, ref = m.objective.eval_batch(m, m, once.input_ids, once.labels, seed=0, batch=once)
    got, want = m.objective.eval_sums(out), m.objective.eval_sums(ref)
    assert got["series"] == want["series"] == n * m.objective.cfg.channels
    assert got["sae"] == pytest.approx(want["sae"], rel=1e-5)


def test_rolling_origins_and_other_delimiters_get_one_line_errors(tmp_path) -> None:
    """rolling_forecasts(origins=-1) failed inside torch.cat; a semicolon- or tab-separated file said only
    'no numeric column'."""
    from hymba_plus.training.data import DataError

    m = build_model(recipe()).eval()
    with pytest.raises(ValueError, match=r"origins must be an integer >= 0 \(backtest origins before the last\), got -1"):
        rolling_forecasts(m, torch.randn(1, 64, 2), -1)
    for sep, name in ((";", "semicolons"), ("\t", "tabs")):
        f = tmp_path / "s.csv"
        f.write_text(f"t{sep}y\n" + "".join(f"{i}{sep}{i}\n" for i in range(10)))
        with pytest.raises(DataError, match=f"separated by {name}\\? the file must be comma-separated"):
            read_csv(f)


def test_router_training_of_a_forecaster_is_one_line(tmp_path, capsys) -> None:
    """``--train-only routers`` searches routes by the next-token loss of token ids: on a forecaster's
    windows of numbers it died in a traceback (routes.search_routes: ``input_ids.repeat``)."""
    import yaml

    r = recipe("GD | GA | GD | GA", etd={"encoder_layers": 1, "think_layers": 2, "decoder_layers": 1, "iterations": 2})
    r["components"]["etd_router"] = {"layer_router": {"enabled": True, "hidden": 16, "windows": 2}}
    r["train"] = {"batch_size": 2, "eval_every": 100, "eval_batches": 1, "warmup_steps": 0}
    cfg = tmp_path / "fc.yaml"
    cfg.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    rc = main(["train", str(cfg), "--out", str(out), "--steps", "1", "--train-only", "routers", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err == ("hymba train: --train-only routers: the route search scores routes by the next-token "
                               "loss of token ids; the forecast objective reads numbers"), err
    assert not out.exists()


def test_resume_on_other_values_of_the_same_length_is_refused(tmp_path, capsys) -> None:
    """The series' path may move, its values may not change: another CSV of as many rows resumed silently."""
    import yaml

    cfg = tmp_path / "fc.yaml"
    r = recipe()
    r["train"] = {"batch_size": 4, "eval_every": 100, "eval_batches": 1, "warmup_steps": 0}
    cfg.write_text(yaml.safe_dump(r))
    rows = good_rows()
    data = write_csv(tmp_path / "s.csv", rows)
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(data), "--out", str(out), "--steps", "2", "--no-progress"]) == 0
    moved = write_csv(tmp_path / "moved.csv", rows)
    assert main(["train", str(cfg), "--data", str(moved), "--out", str(out), "--steps", "3", "--resume",
                 "--no-progress"]) == 0
    other = write_csv(tmp_path / "other.csv", [[t, a * 2, b] for t, a, b in rows])
    capsys.readouterr()
    rc = main(["train", str(cfg), "--data", str(other), "--out", str(out), "--steps", "4", "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "was trained on other values (digest " in err and "Traceback" not in err


def test_eval_loss_is_the_mean_over_observed_targets(tmp_path) -> None:
    """The trainer weighted each held-out batch's loss by its rows: a window whose targets are all
    missing added 0 at a window's weight (0.223 for a mean of 0.446 over the observed targets), and
    with no target observed eval_loss read 0.0 (a perfect score) where it has none: NaN, as the metrics."""
    from hymba_plus.training.config import TrainConfig
    from hymba_plus.training.trainer import RunOptions, Trainer

    rows = good_rows(160)
    vs = [80, 88]  # the validation windows' starts of 160 steps (context 32, horizon 8)
    for t in range(vs[0] + 32, vs[0] + 40):  # the first window's targets: all missing
        rows[t][1] = rows[t][2] = ""
    rows[vs[1] + 33][1] = ""  # the second's: one missing
    none = [list(r) for r in rows]
    for t in range(vs[1] + 32, vs[1] + 40):
        none[t][1] = none[t][2] = ""

    def trainer(data: Path, bs: int, name: str) -> Trainer:
        torch.manual_seed(0)
        tr = Trainer(load_recipe(recipe("GD | GA")), TrainConfig(steps=1, batch_size=bs, warmup_steps=0,
                                                                 data=str(data), eval_batches=8),
                     RunOptions(out=tmp_path / name, progress=False, log=lambda s: None, device="cpu"))
        tr.setup()
        assert tr.stream.val_starts == vs
        return tr

    data = write_csv(tmp_path / "gap.csv", rows)
    for bs in (1, 2, 3):  # a window a batch, both in one, one batch wrapping around
        tr = trainer(data, bs, f"b{bs}")
        got = tr.evaluate()["eval_loss"]
        with torch.no_grad():
            b = tr.stream.eval(range(2))
            obj = tr.model.eval().objective
            z_last, z, _, _, _ = obj._window(tr.model, b.input_ids, b.labels)
            per = fm.pinball(z, z_last, obj.levels).mean(-1)
            assert int(torch.isfinite(z).sum()) == 15
            want = per[torch.isfinite(z)].mean().item()
        assert got == pytest.approx(want, rel=1e-5), (bs, got, want)
    res = trainer(write_csv(tmp_path / "none.csv", none), 2, "none").evaluate()
    assert math.isnan(res["eval_loss"]) and math.isnan(res["eval_mse"]), res


def test_nan_metrics_print_as_n_a_and_stay_nan_in_metrics_jsonl(tmp_path, capsys) -> None:
    """No validation target observed: the eval line and the summary line printed ``eval_mase nan``
    where the README (and ``generate --rolling``) say ``n/a``; metrics.jsonl keeps JSON's NaN."""
    import yaml

    rows = good_rows(160)
    for t in range(112, 128):  # every validation target (160 steps: validation [112, 128))
        rows[t][1] = rows[t][2] = ""
    r = recipe("GD | GA")
    r["train"] = {"batch_size": 2, "steps": 1, "eval_every": 1, "eval_batches": 1, "warmup_steps": 0}
    cfg = tmp_path / "fc.yaml"
    cfg.write_text(yaml.safe_dump(r))
    out = tmp_path / "run"
    assert main(["train", str(cfg), "--data", str(write_csv(tmp_path / "g.csv", rows)), "--out", str(out),
                 "--no-progress"]) == 0
    captured = capsys.readouterr()
    lines = [x for x in (captured.err + captured.out).splitlines() if x.startswith(("step 1/1:", "done:"))]
    assert len(lines) == 2, lines
    for line in lines:
        assert "eval_loss n/a" in line and "eval_mase n/a" in line and not re.search(r"\bnan\b", line), line
        assert re.search(r"loss \d+\.\d{4},", line), line  # a finite number keeps its digits
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isnan(last["eval_mase"]) and math.isnan(last["eval_loss"]) and math.isfinite(last["loss"])


@torch.no_grad()
def test_objective_forecast_reads_exactly_context_values() -> None:
    """``Forecast.forecast(model, x)`` reads x [B, context, C]; a longer x ran every patch and gave
    another forecast than generate (which reads the last context values: 2.5 apart here), a shorter one
    a forecast from fewer patches than the model was trained on; both now a one-line ValueError."""
    torch.manual_seed(0)
    m = build_model(recipe("GD | GA")).eval()
    x = torch.randn(1, 48, 2, dtype=torch.float64).cumsum(1)
    for n in (48, 16, 30):
        with pytest.raises(ValueError, match=rf"^forecast: x has {n} steps, expected context = 32 ") as e:
            m.objective.forecast(m, x[:, -n:])
        assert "\n" not in str(e.value)
    got = m.objective.forecast(m, x[:, -32:])
    assert torch.allclose(got, m.generate(x, max_new_tokens=8, mode="forecast"), rtol=1e-6, atol=1e-6)



@pytest.mark.parametrize("ci, loss", [(True, "quantile"), (False, "quantile"), (True, "mse"), (False, "mse")])
def test_head_weight_bound_counts_the_built_head(ci, loss) -> None:
    """``ForecastConfig.head_weights`` (what the recipe check bounds) is the built ts_head's parameter
    count; channel-independent, the largest horizon and channel count are within the bound."""
    from hymba_plus.objectives.forecast import MAX_CHANNELS, MAX_HEAD_WEIGHTS, MAX_HORIZON

    obj = {"channel_independent": ci, "loss": loss, "quantiles": None if loss == "mse" else [0.1, 0.5, 0.9]}
    m = build_model(recipe(**obj))
    cfg = m.objective.cfg
    assert cfg.head_weights(32) == sum(p.numel() for p in m.objective.ts_head.parameters())
    if ci:
        big = load_recipe(recipe(horizon=MAX_HORIZON, channels=MAX_CHANNELS, **obj)).objective
        assert big.head_weights(32) < MAX_HEAD_WEIGHTS


@pytest.mark.parametrize("flag", [["--seq-len", "64"], ["--tokenizer", "tok.json"], ["--val-frac", "0.2"],
                                  ["--mqar-pairs", "3"], ["--chain-steps", "2"]])
def test_flags_a_forecast_run_does_not_read_are_usage_errors(tmp_path, capsys, flag) -> None:
    """--seq-len, --tokenizer, --val-frac and the task flags do not apply to a forecast run: they were
    ignored silently (as --ladir-stage on another objective is, they are refused)."""
    out = tmp_path / "run"
    rc = main(["train", str(REPO / "configs" / "forecast_tiny.yaml"), "--out", str(out), "--steps", "1",
               "--no-progress", *flag])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert err.startswith(f"hymba train: {flag[0]} {flag[1]}: does not apply to objective forecast"), err
    assert not out.exists()


def test_resuming_the_synthetic_series_with_another_seed_names_the_seed(tmp_path, capsys) -> None:
    """The synthetic series is drawn from the seed: --seed on --resume was refused as "other values ...
    resume with the same series", which did not say what to pass."""
    cfg, out = str(REPO / "configs" / "forecast_tiny.yaml"), str(tmp_path / "run")
    common = ["--out", out, "--steps", "2", "--batch-size", "2", "--eval-batches", "1", "--no-progress"]
    assert main(["train", cfg, *common, "--stop-after", "1"]) == 0
    capsys.readouterr()
    assert main(["train", cfg, *common, "--resume", "--seed", "5"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "resume with --seed 0 (the synthetic series is drawn from the seed)" in err, err


def test_csv_read_errors_name_the_line_and_a_folder_is_no_file(tmp_path) -> None:
    """Bytes that are not UTF-8 were named by their place in the decoder's 8 KiB block ('position 3624', far
    from the line), a cell over the csv module's limit by no line at all, and a folder was 'no such file'."""
    from hymba_plus.training.data import DataError

    rows = good_rows(2000)
    f = write_csv(tmp_path / "s.csv", rows)
    lines = f.read_bytes().split(b"\n")
    lines[1500] = lines[1500].replace(b",", b",\xff", 1)  # file line 1501
    f.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"s\.csv:1501: not UTF-8 \(byte 18\)$"):
        read_csv(f)
    f.write_bytes(b"\xef\xbb\xbft,y\n0,\xff1\n")  # after a byte-order mark: the place in the file's text
    with pytest.raises(DataError, match=r"s\.csv:2: not UTF-8 \(byte 3\)$"):
        read_csv(f)
    f = write_csv(tmp_path / "s.csv", rows)
    lines = f.read_bytes().split(b"\n")
    lines[1500] = b"2024,1" + b"0" * 200_000 + b",1"
    f.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"s\.csv:1501: not a readable CSV file \(field larger than field limit"):
        read_csv(f)
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(DataError, match=r"d\.csv: is a folder, not a CSV file$"):
        read_csv(tmp_path / "d.csv")


def test_a_signed_nan_cell_is_a_missing_value_as_nan_is(tmp_path) -> None:
    """C's printf writes NaN as '-nan' (or 'nan'); 'NaN' was a missing value but '-nan' / '+NaN' an error
    ('is not a finite number')."""
    rows = good_rows()
    rows[10][1], rows[20][2], rows[30][1] = "-nan", "+NaN", "nan"
    s = read_csv(write_csv(tmp_path / "s.csv", rows))
    assert s.filled == {"load": 2, "temp": 1}
    assert np.isnan(s.targets()[[10, 30], 0]).all() and np.isnan(s.targets()[20, 1])
