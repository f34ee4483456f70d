"""``hymba generate CKPT --mode forecast --data series.csv``: the forecast of a checkpoint
trained with the ``forecast`` objective (``models/forecast_decoding.py``), written as a CSV
and a PNG plot.

* ``--horizon N``: steps to forecast after the data (default: the model's horizon; more rolls
  through the cache);
* ``--rolling R``: also backtest at R origins, the last R patch boundaries of the data whose
  whole horizon (the model's) is observed (each forecast from its own window), and print MSE / MAE /
  MASE / CRPS of those forecasts next to seasonal naive; data too short for R such origins is
  a one-line error saying how many fit;
* ``--out FILE.csv`` (default ``forecast.csv``; the plot is the same name with ``.png``).

The CSV has one row per (origin, step): ``origin`` (the timestamp of the last value read),
``timestamp`` (of the forecast step; after the data: the last spacing repeated), ``step``
(1 ...), then per channel the point forecast ``<column>`` and each quantile
``<column>_q<level>``. The plot shows the recent history, the forecast and the band between
the lowest and highest quantile (matplotlib, Agg backend), one panel per channel (at most 4).
Bad data is one line naming file, line and column; nothing is written then.
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import os
import sys
from pathlib import Path
from typing import Any

from . import UsageError, UserError

MAX_PANELS = 4


def _stamp(t: Any) -> str:
    """A timestamp as the CSV had it: ISO 8601, or the number exactly (an integer without ".0")."""
    if hasattr(t, "isoformat"):
        return t.isoformat(sep=" ")
    return str(int(t)) if float(t).is_integer() and abs(t) < 2**53 else repr(float(t))


def _num(v: Any) -> str:
    """A forecast value with 12 significant digits (6 had written 1234567.8 as 1.23457e+06; the
    forecasts are float64: 1e7 + 0.123 keeps its decimals)."""
    return f"{float(v):.12g}"


def _mase(v: float) -> str:
    """MASE to 3 decimals; n/a where no origin's context had a scale (every one constant)."""
    return "n/a" if math.isnan(v) else f"{v:.3f}"


def _score(v: float) -> str:
    """A CRPS / MSE / MAE to 4 significant digits; n/a where no target was observed."""
    return "n/a" if math.isnan(v) else f"{v:.4g}"


def run_forecast(args: Any, model: Any, ckpt: Path) -> int:
    import torch

    from ..models.forecast_decoding import HorizonError, rolling_forecasts
    from ..training import forecast_metrics as fm
    from ..training.data import DataError
    from ..training.series import read_csv, small_scale_note

    cfg = model.objective.cfg
    if args.data is None:
        raise UsageError("--mode forecast needs --data SERIES.csv (a timestamp column, then one column per series)")
    horizon = args.horizon if args.horizon is not None else cfg.horizon
    if horizon < 1:
        raise UsageError(f"--horizon {horizon}: must be >= 1")
    rolling = args.rolling or 0
    if args.rolling is not None and rolling < 1:
        raise UsageError(f"--rolling {rolling}: must be >= 1 (backtest origins)")
    out_csv = Path(args.out if args.out is not None else "forecast.csv")
    named = out_csv.name not in ("", ".", "..")  # with_suffix needs a name
    out_png = out_csv.with_suffix(".png") if named else out_csv
    if not named or out_csv.is_dir() or out_png.is_dir() or out_png == out_csv:  # (FILE.png: the plot replaced it)
        raise UsageError(f"--out {args.out}: expected a file name (FILE.csv; the plot is FILE.png)")
    if Path(args.data).resolve() in (out_csv.resolve(), out_png.resolve()):
        raise UsageError(f"--out {args.out}: is the --data file itself; choose another name")
    try:
        series = read_csv(args.data)
    except DataError as e:
        raise UserError(str(e)) from None
    C = series.values.shape[1]
    if C != cfg.channels:
        raise UserError(f"{args.data}:1: {C} numeric column{'s' if C != 1 else ''} ({', '.join(series.columns[:6])}) "
                        f"but the model forecasts {cfg.channels} channel{'s' if cfg.channels != 1 else ''}")
    T = len(series.values)
    if T < cfg.context:
        raise UserError(f"{args.data}: {T} time steps are too short for the model's context {cfg.context}: "
                        f"need at least {cfg.context}")
    # backtest origins: patch boundaries counted back from T, the last one a whole horizon (rounded
    # up to patches) before T, so that every scored forecast is observed; R of them, a patch apart
    back_by = -(-cfg.horizon // cfg.patch) * cfg.patch
    need = cfg.context + back_by + (rolling - 1) * cfg.patch
    if rolling and T < need:
        fit = max(0, (T - cfg.context - back_by) // cfg.patch + 1)
        raise UserError(f"{args.data}: {T} time steps are too short for --rolling {rolling} with the model's context "
                        f"{cfg.context}, horizon {cfg.horizon} and patch {cfg.patch}: need at least {need} "
                        f"({fit} origin{'s' if fit != 1 else ''} fit{'s' if fit == 1 else ''})")
    if series.report:
        print(f"{args.data}: {series.report}", file=sys.stderr)
    x = torch.from_numpy(series.values)[None]  # float64: RevIN's statistics are float64 (ts_head)
    small = small_scale_note(series.values[-cfg.context:], cfg.context, cfg.revin_eps, args.data)
    if small:
        print(small, file=sys.stderr)
    stats: dict[str, Any] = {}
    try:
        fut = model.generate(x.to(model.device), max_new_tokens=horizon, mode="forecast", stats=stats)[0].cpu()
    except HorizonError as e:  # a --horizon the model cannot roll to: usage (2)
        raise UsageError(f"--horizon: {str(e).splitlines()[0]}") from None
    except ValueError as e:  # the series' values: input (1)
        raise UserError(f"{args.data}: {str(e).splitlines()[0]}") from None
    try:  # the series up to the last origin: rolling_forecasts' origins end at its end
        back = rolling_forecasts(model, x[:, :T - back_by].to(model.device), rolling - 1) if rolling else None
    except ValueError as e:
        raise UserError(f"--rolling: {str(e).splitlines()[0]}") from None
    levels = model.objective.levels
    lv = levels.tolist() if levels is not None else None
    rows: list[list[str]] = []
    point = fm.point_forecast(fut, levels.cpu() if levels is not None else None)  # [N, C]
    try:
        future_ts = series.future_timestamps(horizon)
    except DataError as e:
        raise UserError(str(e)) from None
    origin = _stamp(series.timestamps[-1])
    rows += _rows(origin, future_ts, point, fut, lv)
    lines = []
    if back is not None:
        preds, origins = back
        preds = preds[0].cpu()  # [R, H, C, Q], every horizon observed
        ctx = torch.stack([x[0, o - cfg.context:o] for o in origins.tolist()])
        y = torch.from_numpy(series.targets())  # NaN at the data's gaps: not scored
        tgt = torch.stack([y[o:o + cfg.horizon] for o in origins.tolist()])
        sums = fm.window_sums(ctx, tgt, preds, levels.cpu() if levels is not None else None, cfg.season)
        res = fm.forecast_results({k: float(v) for k, v in sums.items()})
        lines.append(f"backtest: {rolling} rolling origin{'s' if rolling != 1 else ''} (each from its own window): "
                     f"MASE {_mase(res['mase'])} (seasonal naive {_mase(res['snaive_mase'])}), CRPS {_score(res['crps'])} "
                     f"(seasonal naive {_score(res['snaive_crps'])}), MSE {_score(res['mse'])}, MAE {_score(res['mae'])}")
        for r, o in enumerate(origins.tolist()):
            ts = [series.timestamps[o + j] for j in range(cfg.horizon)]
            p = fm.point_forecast(preds[r], levels.cpu() if levels is not None else None)
            rows += _rows(_stamp(series.timestamps[o - 1]), ts, p, preds[r], lv)
    header = ["origin", "timestamp", "step"]
    for c in series.columns:
        header += [c] + ([f"{c}_q{q:g}" for q in lv] if lv else [])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    tmp = out_csv.with_name(f".{out_csv.name}.tmp-{os.getpid()}")
    tmp_png = out_png.with_name(f".{out_png.stem}.tmp-{os.getpid()}.png")  # matplotlib reads the suffix
    try:  # both files under temporary names first: a failure leaves neither, nor an old one changed
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(buf.getvalue())
        plot_forecast(series, fut, point, lv, cfg, tmp_png)
        os.replace(tmp, out_csv)
        os.replace(tmp_png, out_png)
    except OSError as e:
        raise UserError(f"--out {out_csv}: cannot write ({e.strerror or e})") from None
    finally:
        for t in (tmp, tmp_png):
            with contextlib.suppress(OSError):  # gone (replaced), or never made
                t.unlink()
    for line in stats.get("summary", []) + lines:
        print(line, file=sys.stderr)
    print(f"wrote {out_csv} ({len(rows)} rows) and {out_png}")
    return 0


def _rows(origin: str, stamps: list[Any], point: Any, q: Any, levels: list[float] | None) -> list[list[str]]:
    out = []
    for j, t in enumerate(stamps):
        row = [origin, _stamp(t), str(j + 1)]
        for c in range(point.shape[-1]):
            row.append(_num(point[j, c]))
            if levels:
                row += [_num(v) for v in q[j, c]]
        out.append(row)
    return out


def plot_forecast(series: Any, fut: Any, point: Any, levels: list[float] | None, cfg: Any, path: Path) -> None:
    """History (the last 3 contexts at most), forecast and quantile band, one panel per channel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    C = min(point.shape[-1], MAX_PANELS)
    T = len(series.values)
    n_hist = min(T, 3 * cfg.context)
    hist_x = list(range(T - n_hist, T))
    fut_x = list(range(T, T + point.shape[0]))
    fig, axes = plt.subplots(C, 1, figsize=(10, 2.8 * C), squeeze=False)
    for c in range(C):
        ax = axes[c, 0]
        ax.plot(hist_x, series.targets()[T - n_hist:, c], lw=1, color="C0", label="history")  # gaps shown
        ax.plot(fut_x, point[:, c].numpy(), lw=1.5, color="C1", label="forecast")
        if levels and len(levels) > 1:
            ax.fill_between(fut_x, fut[:, c, 0].numpy(), fut[:, c, -1].numpy(), color="C1", alpha=0.25,
                            label=f"q{levels[0]:g}-q{levels[-1]:g}")
        ax.axvline(T - 0.5, color="gray", lw=0.8, ls="--")
        ax.set_title(series.columns[c], fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    axes[-1, 0].set_xlabel(f"time step ({series.time_column}: {_stamp(series.timestamps[0])} ... "
                           f"{_stamp(series.timestamps[-1])})")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
