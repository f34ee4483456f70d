"""Forecasting with the ``ts_head`` (``objective: {kind: forecast}``) against seasonal naive,
on held-out synthetic series and on three real series that ship with statsmodels (the
optional extra ``pip install 'hymba_plus[forecast]'``).

Each dataset is written to a CSV (timestamp + value; Mauna Loa CO2 has gaps, which the CSV
reader reports: contexts carry the last observed value over a gap, gaps are not scored) and trained with the ``hymba train`` stack
(``training/trainer.py``: Muon + AdamW, cosine schedule) from a recipe built here: the same
``GD | GA | M3`` backbone (d_model 64) for every dataset, quantile loss at 0.1 / 0.5 / 0.9. The
final model is scored on the *test* split (the last 20% of the time steps, never seen in
training or validation; non-overlapping horizons), in original units:

* ``synthetic``: trained on ``--synthetic-channels`` (8) synthetic series of seed 0 (season 24,
  trend, regime changes, AR(1) noise), tested on as many other series (seed 7): held-out series
  *and* held-out time;
* ``co2``: Mauna Loa weekly CO2 1958-2001 (``statsmodels.datasets.co2``), season 52;
* ``sunspots``: yearly sunspot numbers 1700-2008 (``statsmodels.datasets.sunspots``), season
  11 (the solar cycle); 309 values: very little data;
* ``elnino``: monthly sea surface temperature 1950-2010 (``statsmodels.datasets.elnino``),
  season 12.

Reported per dataset: MASE (the mean over test windows and channels, and the median), CRPS
(from the quantiles), MSE and MAE of the model, and the same for seasonal naive (its CRPS is its MAE: a point forecast). Writes JSON and a PNG (MASE and
relative CRPS per dataset, and one test forecast per dataset).

    python benchmarks/forecast.py                  # ~3-5 minutes on 2 CPU cores
    python benchmarks/forecast.py --steps 200 --datasets synthetic co2
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]

#: dataset -> (objective settings, season); context a multiple of patch
SETTINGS = {
    "synthetic": dict(context=96, horizon=24, patch=8, season=24, channels=8),
    "co2": dict(context=208, horizon=52, patch=13, season=52, channels=1),
    "sunspots": dict(context=44, horizon=11, patch=4, season=11, channels=1),
    "elnino": dict(context=96, horizon=12, patch=12, season=12, channels=1),
}


def statsmodels_series(name: str) -> tuple[list[str], np.ndarray]:
    """(timestamps, values [T]) of a statsmodels dataset (NaN where the data has gaps)."""
    import statsmodels.api as sm

    if name == "co2":
        d = sm.datasets.co2.load_pandas().data
        return [t.strftime("%Y-%m-%d") for t in d.index], d["co2"].to_numpy(dtype=float)
    if name == "sunspots":
        d = sm.datasets.sunspots.load_pandas().data
        return [str(int(y)) for y in d["YEAR"]], d["SUNACTIVITY"].to_numpy(dtype=float)
    if name == "elnino":
        d = sm.datasets.elnino.load_pandas().data
        months = d.columns[1:]
        stamps = [f"{int(y)}-{m + 1:02d}-01" for y in d["YEAR"] for m in range(len(months))]
        return stamps, d[months].to_numpy(dtype=float).reshape(-1)
    raise ValueError(name)


def write_csv(path: Path, stamps: list[str], values: np.ndarray, columns: list[str]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", *columns])
        for t, row in zip(stamps, values.reshape(len(stamps), -1)):
            w.writerow([t, *("" if np.isnan(v) else f"{v:.6g}" for v in row)])


def recipe(s: dict, steps: int, batch: int, lr: float, data: str, seed: int, optimizer: str = "muon") -> dict:
    return {
        "name": "forecast-bench",
        "model": {"d_model": 64, "max_seq_len": 64, "block_pattern": "GD | GA | M3"},
        "components": {"gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16},
                       "gdn": {"n_heads": 2, "head_dim": 32}, "mamba3": {"state_size": 16, "head_dim": 16, "expand": 1},
                       "mlp": {"d_hidden": 128}},
        "objective": {"kind": "forecast", "loss": "quantile", "quantiles": [0.1, 0.5, 0.9],
                      **{k: s[k] for k in ("context", "horizon", "patch", "season", "channels")}},
        "train": {"data": data, "steps": steps, "batch_size": batch, "lr": lr, "warmup_steps": max(steps // 20, 1),
                  "eval_every": max(steps // 4, 1), "eval_batches": 2, "save_every": steps, "keep_last": 1,
                  "seed": seed, "optimizer": optimizer},
    }


def run_dataset(name: str, args: argparse.Namespace, work: Path) -> dict:
    from hymba_plus import from_pretrained, load_recipe
    from hymba_plus.training import forecast_metrics as fm
    from hymba_plus.training.checkpoint import latest
    from hymba_plus.training.series import SeriesStream
    from hymba_plus.training.trainer import RunOptions, train

    s = dict(SETTINGS[name])
    if name == "synthetic":
        s["channels"] = args.synthetic_channels
        data, test_data = "synthetic", "synthetic"
    else:
        stamps, values = statsmodels_series(name)
        data = str(work / f"{name}.csv")
        write_csv(Path(data), stamps, values, [name])
        test_data = data
    r = load_recipe(recipe(s, args.steps, args.batch, args.lr, data, args.seed, args.optimizer))
    out = work / f"run-{name}"
    logs: list[str] = []
    t0 = time.perf_counter()
    summary = train(r, r.train, RunOptions(out=out, progress=False, recipe_name=name, log=logs.append))
    seconds = time.perf_counter() - t0
    model = from_pretrained(latest(out)).eval()
    obj = model.objective
    # the test split: held-out time (and, for synthetic, held-out series of another seed)
    stream = SeriesStream(test_data, obj.cfg, seed=7 if name == "synthetic" else args.seed)
    b = stream.test()
    with torch.no_grad():
        pred = obj.forecast(model, b.input_ids)
    sums = fm.window_sums(b.input_ids, b.labels, pred, obj.levels, s["season"])
    res = fm.forecast_results({k: float(v) for k, v in sums.items()})
    # per-series MASE: the mean (reported as MASE) and the median (robust to a few windows
    # whose horizon holds a regime change that the context's in-sample scale does not)
    x, y = b.input_ids.double(), b.labels.double()  # y: NaN at the data's gaps (not scored)
    per_model, has = fm.series_mase(x, y, fm.point_forecast(pred.double(), obj.levels), s["season"])
    per_naive, _ = fm.series_mase(x, y, fm.seasonal_naive(x, s["horizon"], s["season"]), s["season"])
    per_model, per_naive = per_model[has], per_naive[has]  # the series that have a MASE
    res["median_mase"], res["snaive_median_mase"] = float(per_model.median()), float(per_naive.median())
    data_line = next((x for x in logs if x.startswith("data: ")), "")
    ex = len(b.input_ids) // 2  # an example test window for the figure
    example = {"context": b.input_ids[ex, :, 0].tolist(), "target": b.labels[ex, :, 0].tolist(),
               "forecast": pred[ex, :, 0].tolist(),
               "snaive": fm.seasonal_naive(b.input_ids[ex:ex + 1], s["horizon"], s["season"])[0, :, 0].tolist()}
    return {"dataset": name, "settings": s, "steps": summary.steps, "train_seconds": round(seconds, 1),
            "test_windows": len(b.input_ids), "data": data_line[len("data: "):],
            "model": {k: res[k] for k in ("mase", "median_mase", "crps", "mse", "mae", "pinball")},
            "seasonal_naive": {k: res[f"snaive_{k}"] for k in ("mase", "median_mase", "crps", "mse", "mae")},
            "final_eval": summary.eval, "example": example}


def figure(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(results)
    fig = plt.figure(figsize=(4 * max(n, 2), 7.5))
    gs = fig.add_gridspec(2, max(n, 2))
    ax = fig.add_subplot(gs[0, : max(n, 2) // 2])
    xs = np.arange(n)
    ax.bar(xs - 0.2, [r["model"]["mase"] for r in results], 0.4, label="ts_head (GD | GA | M3)")
    ax.bar(xs + 0.2, [r["seasonal_naive"]["mase"] for r in results], 0.4, label="seasonal naive", color="gray")
    ax.set_xticks(xs, [r["dataset"] for r in results])
    ax.set_ylabel("test MASE (lower is better)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    ax2 = fig.add_subplot(gs[0, max(n, 2) // 2:])
    rel = [r["model"]["crps"] / r["seasonal_naive"]["crps"] for r in results]
    ax2.bar(xs, rel, 0.5, color="C1")
    ax2.axhline(1.0, color="gray", ls="--", lw=1, label="seasonal naive (= 1)")
    ax2.set_xticks(xs, [r["dataset"] for r in results])
    ax2.set_ylabel("test CRPS / seasonal-naive CRPS")
    ax2.legend(fontsize=8)
    ax2.grid(alpha=0.3, axis="y")
    for i, r in enumerate(results):
        a = fig.add_subplot(gs[1, i])
        e = r["example"]
        L, H = len(e["context"]), len(e["target"])
        a.plot(range(L), e["context"], lw=1, color="C0", label="history")
        fut = range(L, L + H)
        a.plot(fut, e["target"], lw=1, color="k", label="truth")
        fc = np.array(e["forecast"])
        a.plot(fut, fc[:, 1], lw=1.5, color="C1", label="forecast (median)")
        a.fill_between(fut, fc[:, 0], fc[:, 2], color="C1", alpha=0.25, label="q0.1-q0.9")
        a.plot(fut, e["snaive"], lw=1, ls="--", color="gray", label="seasonal naive")
        a.set_title(f"{r['dataset']}: a test window", fontsize=9)
        a.grid(alpha=0.3)
        if i == 0:
            a.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--optimizer", choices=("muon", "adamw"), default="muon")
    p.add_argument("--synthetic-channels", type=int, default=8,
                   help="synthetic series trained on (and, of another seed, tested on); --batch windows each")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "forecast_cpu.json"))
    p.add_argument("--fig", default=str(ROOT / "benchmarks" / "results" / "forecast_cpu.png"))
    args = p.parse_args()
    real = [d for d in args.datasets if d != "synthetic"]
    if real:  # before any training: the real series come from statsmodels
        try:
            import statsmodels  # noqa: F401
        except ImportError:
            raise SystemExit(f"benchmarks/forecast.py: --datasets {' '.join(real)} need{'s' if len(real) == 1 else ''} "
                             "statsmodels, not installed: pip install -e '.[forecast]' (or --datasets synthetic)") from None
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            res = run_dataset(name, args, Path(tmp))
            results.append(res)
            m, b = res["model"], res["seasonal_naive"]
            print(f"{name:10s} MASE {m['mase']:.3f} (seasonal naive {b['mase']:.3f}; median {m['median_mase']:.3f} vs "
                  f"{b['median_mase']:.3f})  CRPS {m['crps']:.4g} "
                  f"(seasonal naive {b['crps']:.4g})  MSE {m['mse']:.4g} ({b['mse']:.4g})  "
                  f"[{res['test_windows']} test windows, {res['steps']} steps, {res['train_seconds']:.0f}s]", flush=True)
    out = {"device": "cpu", "platform": platform.platform(), "torch": torch.__version__, "threads": args.threads,
           "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "optimizer": args.optimizer,
           "date": datetime.utcnow().strftime("%Y-%m-%d"), "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    figure(results, Path(args.fig))
    print(f"wrote {args.json} and {args.fig}")


if __name__ == "__main__":
    main()
