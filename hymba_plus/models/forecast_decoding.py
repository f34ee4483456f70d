"""Forecasting with a model trained by the ``forecast`` objective (``objectives/forecast.py``).

``generate(series, max_new_tokens=N, mode="forecast")`` (``GENERATORS["forecast"]``): the
argument in ``input_ids``' place is the series, values [B, T, C] (T >= ``context``); the
result is the forecast of the N steps after it, [B, N, C, Q] (Q quantile levels, 1 for a
point forecast), in the series' units. The last ``context`` values are read once: RevIN
statistics, one prefill of their patches into a ``HybridCache``, the horizon head at the
last patch. Beyond ``horizon`` the forecast *rolls*: the point forecast's first whole
patches are fed back through the same cache (one cached forward of k = floor(H / P)
patches, no recomputation of the context) and the head forecasts the next horizon from
there; the RevIN statistics stay those of the context. Quantile bands past the first
horizon are conditioned on that point path (not a sampled path).

``rolling_forecasts(model, series, origins=R)``: backtesting. Origins are the last R + 1
patch boundaries; each origin is forecast from its own window of ``context`` values with its
own RevIN statistics, exactly as ``generate`` forecasts from there (the windows go through
the model as one batch, ``ROLLING_BATCH`` windows a forward). It was one cached sequence
(one patch per origin), which kept the first origin's statistics and let the sequence grow R
patches past the training context: later origins then scored far worse than the model
forecasts from there (MASE 2.43 against 1.25 at origins 10-19 in a review's probe).

No options of token decoding apply (temperature, top-k, EOS, streaming).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.config import brief
from ..training import forecast_metrics as fm
from .generation import GENERATORS, int_at_least


def _objective(model: Any) -> Any:
    obj = model.objective
    if not hasattr(obj, "ts_head"):
        raise ValueError("mode 'forecast' needs a model trained with the forecast objective "
                         f"(this one has objective {obj.cfg.kind!r})")
    return obj


class HorizonError(ValueError):
    """``max_new_tokens`` (``hymba generate --horizon``) that this model cannot forecast: not an integer >= 1,
    or past what it can roll to within ``max_seq_len`` (a flag's value: ``hymba generate`` exits 2, while a
    series it cannot read is a plain ValueError, exit 1)."""

def _check_series(obj: Any, series: Tensor, need: int) -> None:
    cfg = obj.cfg
    if not isinstance(series, Tensor):
        raise TypeError(f"series must be a torch.Tensor [B, T, {cfg.channels}] (channels), got "
                        f"{type(series).__name__} {brief(series)}")
    if series.ndim != 3 or series.shape[-1] != cfg.channels:
        raise ValueError(f"series must have shape [B, T, {cfg.channels}] (channels), got {tuple(series.shape)}")
    if series.shape[0] == 0:  # (new_cache refused it later, naming its batch_size)
        raise ValueError(f"series: a batch of no rows (shape {tuple(series.shape)}); at least one row is needed")
    if series.shape[1] < need:
        raise ValueError(f"series: {series.shape[1]} steps, need at least {need} (context {cfg.context})")
    if not series.is_floating_point():
        raise TypeError(f"series must be floating point (float32 or float64), got {series.dtype}")
    bad = (~torch.isfinite(series[:, -need:])).nonzero()
    if len(bad):  # (a NaN made every forecast NaN, silently; read_csv fills gaps with the last value)
        b, t, c = (int(v) for v in bad[0])
        raise ValueError(f"series[{b}, {t - need + series.shape[1]}, {c}] is {float(series[b, t - need + series.shape[1], c])}: "
                         "the values a forecast reads must be finite (fill gaps first)")


@torch.no_grad()
def generate_forecast(
    model: Any,
    input_ids: Tensor,
    *,
    max_new_tokens: int,
    stats: dict | None = None,
) -> Tensor:
    """Forecasts [B, N, C, Q] of the N = ``max_new_tokens`` steps after the series
    ``input_ids`` [B, T, C] (module docstring). It samples no tokens: ``HybridLM.generate`` refuses the
    token-sampling arguments (temperature, top_k, ...) for it, as this signature does not name them."""
    obj = _objective(model)
    cfg, head = obj.cfg, obj.ts_head
    _check_series(obj, input_ids, cfg.context)
    if not int_at_least(max_new_tokens, 1):
        raise HorizonError(f"max_new_tokens must be an integer >= 1, got {brief(max_new_tokens)}")
    k = (cfg.horizon // cfg.patch) * cfg.patch  # values fed back per round
    if max_new_tokens > cfg.horizon and k == 0:
        raise HorizonError(f"forecasts longer than the horizon ({cfg.horizon}) roll whole patches; this model's "
                         f"horizon is shorter than one patch ({cfg.patch})")
    # the cache holds the context's patches and each round's k fed-back values: at most max_seq_len patches
    room = model.config.max_seq_len - cfg.context // cfg.patch
    rounds = room // (k // cfg.patch) if k else 0
    if max_new_tokens > cfg.horizon + rounds * k:
        raise HorizonError(f"max_new_tokens {max_new_tokens}: at most {cfg.horizon + rounds * k} steps fit this model "
                         f"(the context's {cfg.context // cfg.patch} patches plus {rounds} rounds of {k} fed-back values "
                         f"within max_seq_len {model.config.max_seq_len} patches, then the horizon {cfg.horizon})")
    x = input_ids[:, -cfg.context:].to(model.device, torch.float64)  # RevIN in float64 (ts_head)
    mu, sigma = head.stats(x)
    B = x.shape[0]
    cache = model.new_cache(B * cfg.channels if cfg.channel_independent else B)
    z, _ = obj.patch_outputs(model, x, mu, sigma, cache=cache, check_inputs=True)
    parts, produced, forwards = [], 0, 1
    while True:
        pred = obj.values(z[:, -1], mu, sigma)  # [B, H, C, Q]
        need = max_new_tokens - produced
        if need <= cfg.horizon:
            parts.append(pred[:, :need])
            break
        parts.append(pred[:, :k])
        produced += k
        feed = fm.point_forecast(pred[:, :k], obj.levels)  # [B, k, C]
        z, _ = obj.patch_outputs(model, feed, mu, sigma, cache=cache, check_inputs=True)
        forwards += 1
    out = torch.cat(parts, 1).to(input_ids.dtype)  # float64 in, float64 out (a float32 series: float32)
    if stats is not None:
        stats.update(forwards=forwards, steps=max_new_tokens, rounds=forwards - 1)
        rolled = f", rolled {forwards - 1}x through the cache ({k} values per round)" if forwards > 1 else ""
        stats["summary"] = [f"forecast: {max_new_tokens} steps x {cfg.channels} channel"
                            f"{'s' if cfg.channels != 1 else ''} from the last {cfg.context} values, "
                            f"{forwards} forward{'s' if forwards != 1 else ''}{rolled}"]
    return out


#: windows per forward of ``rolling_forecasts``
ROLLING_BATCH = 256


@torch.no_grad()
def rolling_forecasts(model: Any, series: Tensor, origins: int, stats: dict | None = None) -> tuple[Tensor, Tensor]:
    """(forecasts [B, R + 1, H, C, Q], origin indices [R + 1]) at the last R + 1 patch
    boundaries of ``series`` [B, T, C]: origin r (time index ``T - (R - r) * patch``) forecasts
    the ``horizon`` after it from the ``context`` values before it (module docstring)."""
    obj = _objective(model)
    cfg = obj.cfg
    P, L = cfg.patch, cfg.context
    if not int_at_least(origins, 0):
        raise ValueError(f"origins must be an integer >= 0 (backtest origins before the last), got {brief(origins)}")
    _check_series(obj, series, L + origins * P)
    T = series.shape[1]
    first = T - origins * P
    idx = (first - L + P * torch.arange(origins + 1))[:, None] + torch.arange(L)[None]  # [R + 1, L]
    B, C = series.shape[0], series.shape[2]
    windows = series[:, idx.flatten()].reshape(B * (origins + 1), L, C).to(model.device, torch.float64)
    preds = [obj.forecast(model, windows[i:i + ROLLING_BATCH]) for i in range(0, len(windows), ROLLING_BATCH)]
    if stats is not None:
        stats.update(forwards=len(preds), origins=origins + 1)
    out = torch.cat(preds).to(series.dtype)
    return out.view(B, origins + 1, *out.shape[1:]), torch.arange(first, T + 1, P)


GENERATORS["forecast"] = generate_forecast  # the decoding modes live in generation.GENERATORS
