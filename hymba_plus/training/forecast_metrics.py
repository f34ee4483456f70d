"""Forecast metrics and the seasonal-naive baseline (tensors; used by the ``forecast``
objective's held-out evaluation, ``hymba generate --mode forecast`` and
``benchmarks/forecast.py``).

For a window with context x [L] (one channel), targets y [H] and forecasts y_hat [H]:

* MSE = mean_h (y_h - y_hat_h)^2, MAE = mean_h |y_h - y_hat_h| (original units);
* seasonal naive with period m repeats the last season: y_hat_{L+j} = x_{L - m + (j mod m)};
* MASE (Hyndman & Koehler 2006, "Another look at measures of forecast accuracy"; the M4
  definition) = MAE / s with the in-sample scale s = mean_{t >= m} |x_t - x_{t-m}| of the
  window's context (m = 1 when the context is shorter than two seasons), averaged over
  windows and channels; a (window, channel) whose context has no in-sample change (s <=
  1e-8: a flat or exactly periodic stretch) has no MASE and is left out of the mean
  (``mase_series`` counts the rest), rather than dividing by a floor; the seasonal-naive
  forecast scores < 1 only when the horizon is easier than the one-season-ahead in-sample
  step. (M4's scale is the whole in-sample series; a window's context is what an
  evaluation of windows has);
* pinball (quantile) loss at level q: rho_q(u) = max(q u, (q - 1) u), u = y - y_hat_q;
* CRPS from quantiles (Gneiting & Raftery 2007, Eq. 20-21: CRPS = 2 int_0^1 rho_q dq),
  approximated on the predicted levels: CRPS ~ (2 / |Q|) sum_q rho_q(y - y_hat_q) (the
  weighted quantile loss; with few levels it is biased low: ~11% for levels 0.1 / 0.5 / 0.9
  on a calibrated normal, which favours a quantile model against seasonal naive, whose CRPS
  is exact). A point
  forecast is a degenerate distribution, whose CRPS is its absolute error: so a model trained
  with ``loss: mse`` and the seasonal-naive baseline report CRPS = MAE.

Targets missing from the data (NaN: ``Series.targets``) are not scored: every sum and mean is
over the observed points (as GluonTS's observed-values mask).
"""

from __future__ import annotations

import torch
from torch import Tensor


def seasonal_naive(x: Tensor, horizon: int, season: int) -> Tensor:
    """Seasonal-naive forecasts [..., H, C] of contexts x [..., L, C]: the last season repeated."""
    L = x.shape[-2]
    m = min(season, L)
    idx = L - m + (torch.arange(horizon, device=x.device) % m)
    return x.index_select(-2, idx)


#: a MASE scale at or below this has no MASE (the window's context does not change in-sample)
MASE_MIN_SCALE = 1e-8


def mase_scale(x: Tensor, season: int) -> Tensor:
    """In-sample seasonal-naive MAE [..., C] of contexts x [..., L, C] (period m, or 1 when the
    context holds fewer than two seasons)."""
    m = season if x.shape[-2] >= 2 * season else 1
    return (x[..., m:, :] - x[..., :-m, :]).abs().mean(-2)


def pinball(y: Tensor, q_pred: Tensor, levels: Tensor) -> Tensor:
    """rho_q(y - y_hat_q) [..., Q] for targets y [...] and quantile forecasts q_pred [..., Q]."""
    u = y[..., None] - q_pred
    return torch.maximum(levels * u, (levels - 1) * u)


def crps(y: Tensor, q_pred: Tensor, levels: Tensor | None) -> Tensor:
    """CRPS per point [...]: (2/|Q|) sum_q pinball for quantile forecasts [..., Q]; |error| for a
    point forecast (``levels`` None, Q = 1)."""
    if levels is None:
        return (y - q_pred[..., 0]).abs()
    return 2.0 * pinball(y, q_pred, levels).mean(-1)


def point_forecast(q_pred: Tensor, levels: Tensor | None) -> Tensor:
    """The point forecast [...] of outputs [..., Q]: the median level (the one nearest 0.5), or
    the only output."""
    if levels is None:
        return q_pred[..., 0]
    return q_pred[..., int((levels - 0.5).abs().argmin())]


def series_mase(x: Tensor, y: Tensor, point: Tensor, season: int) -> tuple[Tensor, Tensor]:
    """(MASE [B, C] of point forecasts [B, H, C] against targets y [B, H, C] after contexts
    x [B, L, C], which series have one [B, C]). Missing targets (NaN in y: gaps of the data) are
    left out of the error's mean; a series with none observed, or whose context has no in-sample
    change (``MASE_MIN_SCALE``), has no MASE (0 where ``has`` is False)."""
    obs = torch.isfinite(y)
    scale = mase_scale(x, season)
    n = obs.sum(-2)
    has = (scale > MASE_MIN_SCALE) & (n > 0)
    mae = torch.where(obs, y - point, 0.0).abs().sum(-2) / n.clamp_min(1)
    return torch.where(has, mae / scale.clamp_min(MASE_MIN_SCALE), 0.0), has


def window_sums(x: Tensor, y: Tensor, q_pred: Tensor, levels: Tensor | None, season: int) -> dict[str, Tensor]:
    """Sums over windows of contexts x [B, L, C], targets y [B, H, C] and forecasts
    q_pred [B, H, C, Q] (original units), for the model and for seasonal naive: ``points``
    (observed targets), ``series`` (windows x channels with an observed target), ``sse``, ``sae``, ``mase`` (sum of
    per-series MASE, ``series_mase``), ``crps`` and their ``snaive_*`` twins (and ``pinball``,
    mean over levels, for quantiles). A missing target (NaN in y: a gap of the data) is not
    scored. ``forecast_results`` turns accumulated sums into the metrics."""
    x, y, q_pred = x.double(), y.double(), q_pred.double()
    lv = levels.to(q_pred) if levels is not None else None
    obs = torch.isfinite(y)
    y0 = torch.where(obs, y, 0.0)  # the scores below keep only the observed points
    point = point_forecast(q_pred, lv)
    naive = seasonal_naive(x, y.shape[-2], season)
    out = {"points": obs.sum().double(), "series": obs.any(-2).sum().double()}
    for pre, f, c in (("", point, crps(y0, q_pred, lv)), ("snaive_", naive, (y0 - naive).abs())):
        err = torch.where(obs, y0 - f, 0.0)
        out[pre + "sse"] = err.pow(2).sum()
        out[pre + "sae"] = err.abs().sum()
        m, has = series_mase(x, y, f, season)
        out[pre + "mase"] = m.sum()
        out["mase_series"] = has.sum().double()
        out[pre + "crps"] = torch.where(obs, c, 0.0).sum()
    if lv is not None:
        out["pinball"] = torch.where(obs, pinball(y0, q_pred, lv).mean(-1), 0.0).sum()
    return out


def forecast_results(sums: dict[str, float]) -> dict[str, float]:
    """Metrics from accumulated ``window_sums``: mse, mae, mase, crps (and pinball) of the model
    and snaive_mse, snaive_mae, snaive_mase, snaive_crps of the seasonal-naive baseline; NaN where
    nothing was scored."""
    n, s = sums.get("points", 0.0), sums.get("mase_series", sums.get("series", 0.0))

    def mean(total: float, count: float) -> float:
        # NaN where nothing was scored (no observed target; for MASE, also no context with a scale):
        # 0 read as a perfect score
        return total / count if count > 0 else float("nan")

    res = {}
    for pre in ("", "snaive_"):
        res[pre + "mse"] = mean(sums[pre + "sse"], n)
        res[pre + "mae"] = mean(sums[pre + "sae"], n)
        res[pre + "mase"] = mean(sums[pre + "mase"], s)
        res[pre + "crps"] = mean(sums[pre + "crps"], n)
    if "pinball" in sums:
        res["pinball"] = mean(sums["pinball"], n)
    return res
