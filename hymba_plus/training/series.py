"""Numeric series for the ``forecast`` objective: CSV files, the built-in synthetic
generator, and the training stream of windows.

**CSV** (``--data series.csv``): a header row, then one row per time step. The first column is
the timestamp (numbers, or dates / date-times in ISO 8601 form such as ``2024-01-31`` or
``2024-01-31 13:00``), strictly increasing; every other column is a numeric series (one
channel). Empty cells and ``NA`` / ``NaN`` (signed too) / ``null`` are missing values, reported
(``Series.report``) and handled as GluonTS does with its observed-values mask: in what the
model reads (contexts) a gap holds the last observed value before it (carried forward, so a
context never reads past its own end; a gap at the very start takes the first observed value),
and as a target it is not scored (``Series.targets``: NaN there; the loss and every metric
leave it out). Anything else that is not a
number, or a value beyond +-1e15 (``MAX_ABS_VALUE``), is an error; so is a first row that is
data rather than a header (a timestamp, then numbers). Every
problem is one ``DataError`` line naming the file, the line and the column, e.g.
``series.csv:7: column 'load' (3): 'abc' is not a number``.

**Synthetic** (``--data synthetic``, the default of forecast recipes): per channel, a daily-like
season of period ``season`` (two harmonics with random amplitudes and phases) on a piecewise
linear trend, with *regime changes* at random change points (level shifts, slope and
seasonal-amplitude changes) and AR(1) noise; seeded, no files.

**Splits by time**: the last 20% of the time steps (at least ``horizon``) are the test
targets, the 10% before them (at least ``horizon``) the validation targets, the rest the
training span. A training window is ``context`` values and the ``horizon`` after them, with
every target inside the training span; validation and test windows have their targets in
their span and read their context from before it (as the usual long-horizon benchmarks do).
Training windows start at random (seeded by the global sample index, so a resumed run sees
the same stream); validation / test windows are non-overlapping in their targets.
"""

from __future__ import annotations

import csv
import hashlib
import io
import math
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.config import brief
from .data import BOM, Batch, DataError

MISSING = {"", "na", "nan", "null", "none", "n/a", "-"}
#: the largest magnitude a series value may have (RevIN's statistics are float64: ts_head; at 1e15 its
#: spacing is 0.125, so a series there still keeps a signal of unit scale)
MAX_ABS_VALUE = 1e15
SYNTHETIC = "synthetic"
#: the most values (steps x channels) the synthetic generator makes: 1 GiB of float64
MAX_SYNTHETIC_VALUES = 1 << 27


@dataclass
class Series:
    """Values [T, C] (float64, gaps filled with the last observed value: what a model reads),
    which of them were observed, their timestamps and column names."""

    values: np.ndarray
    timestamps: list[Any]
    columns: list[str]
    source: str
    time_column: str = "t"
    filled: dict[str, int] = field(default_factory=dict)  # column -> missing values filled
    observed: np.ndarray | None = None  # [T, C] bool; None: every value observed

    @property
    def report(self) -> str:
        """What was done about missing values ('' when there were none)."""
        if not self.filled:
            return ""
        n = sum(self.filled.values())
        cols = ", ".join(f"{c}: {k}" for c, k in self.filled.items())
        return (f"{n} missing value{'s' if n != 1 else ''} ({cols}): the last observed value in contexts, not "
                "scored as targets")

    def targets(self) -> np.ndarray:
        """Values [T, C] to score forecasts against: NaN where the data had a gap."""
        if self.observed is None:
            return self.values
        return np.where(self.observed, self.values, np.nan)

    def future_timestamps(self, n: int) -> list[Any]:
        """Timestamps of the n steps after the data (the last step repeated at its spacing)."""
        ts = self.timestamps
        if len(ts) < 2:
            return list(range(len(ts), len(ts) + n))
        step = ts[-1] - ts[-2]
        try:
            return [ts[-1] + step * (i + 1) for i in range(n)]
        except OverflowError:  # past 9999-12-31
            raise DataError(f"{self.source}: the {n} steps after the last timestamp {ts[-1]} (every {step}) are past "
                            "the last date Python represents") from None


def _parse_time(text: str) -> Any:
    try:
        v = float(text)
    except ValueError:
        return datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if not math.isfinite(v):
        raise ValueError(f"{text!r} is not a finite time")
    return v


def _is_time(text: str) -> bool:
    try:
        _parse_time(text)
    except (ValueError, OverflowError):
        return False
    return True


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_csv(path: str | Path) -> Series:
    """Read a series CSV (module docstring); ``DataError`` naming file, line and column."""
    p = Path(path)
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a CSV file")
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror})") from None
    raw = raw.removeprefix(BOM)  # a byte-order mark is not the first column's name
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:  # named by its line (a text stream's decoder names its place in a block)
        line, start = raw.count(b"\n", 0, e.start) + 1, raw.rfind(b"\n", 0, e.start) + 1
        raise DataError(f"{p}:{line}: not UTF-8 (byte {e.start - start + 1})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:  # (row, the file line it ends on: a quoted cell may span lines)
        numbered = [(row, reader.line_num) for row in reader]
    except csv.Error as e:
        raise DataError(f"{p}:{reader.line_num}: not a readable CSV file ({e})") from None
    rows = [r for r, _ in numbered]
    if not rows or not any(c.strip() for c in rows[0]):
        raise DataError(f"{p}:1: empty: expected a header row (a timestamp column, then numeric columns)")
    header = [c.strip() for c in rows[0]]
    if len(header) < 2:
        sep = next((f" (separated by {name}? the file must be comma-separated)" for c, name in
                    ((";", "semicolons"), ("\t", "tabs")) if c in header[0]), "")
        raise DataError(f"{p}:1: no numeric column: only {brief(header[0])}{sep}; expected a timestamp column, then one "
                        "column per series")
    cols = header[1:]
    if _is_time(header[0]) and all(_is_number(c) or c.lower() in MISSING for c in cols):
        raise DataError(f"{p}:1: {brief(','.join(rows[0]), 60)} looks like data, not a header: the first row names the "
                        "columns (a timestamp column, then one per series)")
    times: list[Any] = []
    prev = ""
    vals = np.full((len(rows) - 1, len(cols)), np.nan)
    kept = 0
    for row, line in numbered[1:]:
        if not any(c.strip() for c in row):
            continue  # blank line
        if len(row) != len(header):
            raise DataError(f"{p}:{line}: {len(row)} fields, the header has {len(header)}")
        try:
            t = _parse_time(row[0])
        except ValueError:
            raise DataError(f"{p}:{line}: column {header[0]!r} (1): {brief(row[0])} is not a timestamp (a number or an "
                            "ISO date such as 2024-01-31 13:00)") from None
        if times:
            try:
                ok = t > times[-1]
            except TypeError:
                raise DataError(f"{p}:{line}: column {header[0]!r} (1): {brief(row[0])} mixes timestamp kinds (numbers, "
                                "dates, time zones) with the rows before") from None
            if not ok:
                raise DataError(f"{p}:{line}: column {header[0]!r} (1): timestamps must increase: {brief(row[0])} is not "
                                f"after the previous {prev!r}")
        times.append(t)
        prev = row[0]
        for j, cell in enumerate(row[1:]):
            c = cell.strip()
            if c.lower() in MISSING:
                continue
            try:
                v = float(c)
            except ValueError:
                raise DataError(f"{p}:{line}: column {cols[j]!r} ({j + 2}): {brief(cell)} is not a number") from None
            if math.isnan(v):  # '-nan' / '+NaN' (C's printf writes a NaN with its sign): missing, as 'nan' is
                continue
            if not math.isfinite(v):
                raise DataError(f"{p}:{line}: column {cols[j]!r} ({j + 2}): {brief(cell)} is not a finite number")
            if abs(v) > MAX_ABS_VALUE:
                raise DataError(f"{p}:{line}: column {cols[j]!r} ({j + 2}): {brief(cell)} is beyond +-{MAX_ABS_VALUE:g}, "
                                "the largest magnitude a series value may have")
            vals[kept, j] = v
        kept += 1
    vals = vals[:kept]
    if kept == 0:
        raise DataError(f"{p}: no data rows after the header")
    observed = ~np.isnan(vals)
    filled = {}
    for j, c in enumerate(cols):
        if not observed[:, j].any():
            raise DataError(f"{p}:2: column {c!r} ({j + 2}): every value is missing")
        if not observed[:, j].all():
            filled[c] = int((~observed[:, j]).sum())
    if filled:  # each gap: the last observed value (at the start: the first one), all columns at once
        last = np.maximum.accumulate(np.where(observed, np.arange(kept)[:, None], -1), axis=0)
        last = np.where(last < 0, observed.argmax(0)[None, :], last)
        vals = np.take_along_axis(vals, last, axis=0)
    return Series(vals, times, cols, str(p), header[0], filled, observed if filled else None)


def synthetic(length: int, channels: int, seed: int, season: int = 24) -> np.ndarray:
    """Synthetic series [length, channels] (module docstring): season + trend + regime changes
    + AR(1) noise, from ``default_rng(seed)``. Vectorised (no loop over time)."""
    rng = np.random.default_rng(seed)
    t = np.arange(length, dtype=np.float64)
    P = max(season, 2)
    out = np.empty((length, channels))
    for c in range(channels):
        a1, a2 = rng.uniform(0.5, 2.0), rng.uniform(0.0, 0.8)
        p1, p2 = rng.uniform(0, 2 * np.pi, size=2)
        shape = a1 * np.sin(2 * np.pi * t / P + p1) + a2 * np.sin(4 * np.pi * t / P + p2)
        # regimes: change points, each regime with its level, slope and seasonal amplitude
        n_reg = int(rng.integers(1, 5))
        cuts = np.sort(rng.integers(P, max(length - P, P + 1), size=n_reg - 1))
        starts = np.concatenate([[0], cuts]).astype(np.float64)
        reg = np.searchsorted(cuts, t, side="right")
        level = np.cumsum(rng.normal(0.0, 1.5, size=n_reg))
        slope = rng.normal(0.0, 1.0, size=n_reg) / P / 4
        amp = rng.uniform(0.6, 1.4, size=n_reg)
        trend = level[reg] + slope[reg] * (t - starts[reg])
        sigma = rng.uniform(0.1, 0.35)
        eps = rng.normal(0.0, sigma, size=length + 64)
        kernel = 0.5 ** np.arange(64)  # AR(1), phi = 0.5, as a truncated MA(inf) filter
        noise = np.convolve(eps, kernel, mode="full")[64:64 + length]
        scale = rng.uniform(0.5, 20.0)
        out[:, c] = scale * (trend + amp[reg] * shape + noise) + rng.normal(0.0, 10.0)
    return out


@dataclass(frozen=True)
class Splits:
    """Target spans [lo, hi) of the time axis: train, validation, test."""

    train: tuple[int, int]
    val: tuple[int, int]
    test: tuple[int, int]


def split_by_time(n: int, context: int, horizon: int, source: str) -> Splits:
    """The time split of ``n`` steps (module docstring); too short is a ``DataError``."""
    need = context + 3 * horizon
    if n < need:
        raise DataError(f"{source}: {n} time steps are too short for context {context} + horizon {horizon}: need "
                        f"at least {need} (context + horizon to train on, then horizon each to validate and test)")
    n_test = max(horizon, round(0.2 * n))
    n_val = max(horizon, round(0.1 * n))
    if n - n_test - n_val < context + horizon:  # short series: shrink the held-out spans to their minimum
        n_test = n_val = horizon
        spare = n - context - 3 * horizon
        n_test += spare // 3
        n_val += spare // 6
    te, va = n - n_test, n - n_test - n_val
    return Splits((0, va), (va, te), (te, n))


def small_scale_note(values: np.ndarray, context: int, eps: float, where: str) -> str | None:
    """A notice where the typical (median) variance of ``values`` [T, C] over windows of ``context``
    steps is below 100 ``eps``: RevIN's absolute eps (``objective.revin_eps``) then flattens those
    windows towards their mean (ts_head's docstring); None where it does not. The median is over the
    windows that vary: a constant window has nothing to flatten, and there eps is what keeps the
    z-score of a jump after it finite (a channel with no varying window gets no note)."""
    T, C = values.shape
    n = max(T // context, 1)
    chunks = values[-n * context:].reshape(n, -1, C) if T >= context else values[None]
    var = np.array([np.median(v[v > 0]) if (v > 0).any() else np.inf for v in chunks.var(1).T])  # [C]
    low = [c for c in range(C) if var[c] < 100 * eps]
    if not low:
        return None
    return (f"note: {where}: channel{'s' if len(low) > 1 else ''} {', '.join(map(str, low[:6]))} vary little (window std "
            f"{math.sqrt(float(var[low[0]])):.3g}) next to objective.revin_eps {eps:g}: RevIN flattens them towards their "
            f"mean; rescale the data (x 1/std) or set a smaller revin_eps (e.g. {max(float(var[low[0]]) / 1e3, 1e-30):.1g})")


class SeriesStream:
    """Windows of a series for the forecast objective: ``Batch(input_ids=context [B, L, C],
    labels=horizon [B, H, C])`` (float64; a target missing from the data is NaN)."""

    metric = "forecast"
    tokenizer = None  # numbers, no tokens

    def __init__(self, data: str, obj: Any, seed: int, length: int = 4096):
        self.obj = obj
        self.seed = seed
        L, H = obj.context, obj.horizon
        if data == SYNTHETIC:
            length = max(length, 4 * (L + 3 * H))
            if length * obj.channels > MAX_SYNTHETIC_VALUES:
                raise DataError(f"{SYNTHETIC}: {obj.channels} channels x {length} steps (4 x (context + 3 x horizon)) "
                                f"are more values than the generator makes ({MAX_SYNTHETIC_VALUES:,}); train on a "
                                "--data CSV, or use fewer channels or a shorter context / horizon")
            self.series = Series(synthetic(length, obj.channels, seed, max(obj.season, 2)), list(range(length)),
                                 [f"y{c}" for c in range(obj.channels)], SYNTHETIC)
            what = (f"synthetic series ({obj.channels} channel{'s' if obj.channels != 1 else ''} x {length} steps: "
                    f"season {max(obj.season, 2)}, trend, regime changes, AR(1) noise; seed {seed})")
        else:
            if not Path(data).exists():  # e.g. a token task (mqar) or a mistyped CSV name: say what is read here
                raise DataError(f"{data}: no such file (a forecast recipe reads a series CSV, or {SYNTHETIC}: the "
                                "built-in series)")
            self.series = read_csv(data)
            what = f"{data} ({len(self.series.columns)} column{'s' if len(self.series.columns) != 1 else ''}: " \
                   f"{', '.join(self.series.columns[:6])}{', ...' if len(self.series.columns) > 6 else ''}; " \
                   f"{len(self.series.values)} steps)"
        C = self.series.values.shape[1]
        if C != obj.channels:
            raise DataError(f"{data}:1: {C} numeric column{'s' if C != 1 else ''} "
                            f"({', '.join(self.series.columns[:6])}) but the recipe's objective.channels is "
                            f"{obj.channels}")
        # float64: RevIN's statistics are float64 (ts_head), a float32 copy rounded series far from 0
        self.values = torch.from_numpy(self.series.values.astype(np.float64))  # contexts: gaps filled
        self.targets = torch.from_numpy(self.series.targets().astype(np.float64))  # NaN at gaps: not scored
        self.splits = split_by_time(len(self.values), L, H, data)
        self.seq_len = L // obj.patch  # patch tokens per window
        lo, hi = self.splits.train
        self.n_train = hi - H - L + 1  # training windows (start positions)
        self.val_starts = self._starts(self.splits.val)
        self.test_starts = self._starts(self.splits.test)
        self.note = small_scale_note(self.series.values[:hi], L, obj.revin_eps, data)  # (the trainer logs it)
        # what a resumed run must read again (``state``; once: the values are hashed, not every checkpoint)
        self.digest = hashlib.sha256(np.ascontiguousarray(self.series.values).tobytes()).hexdigest()[:16]
        fill = f"; {self.series.report}" if self.series.report else ""
        self.description = (f"{what}{fill}; split by time: train targets [{L}, {hi}), validation [{hi}, "
                            f"{self.splits.val[1]}) ({len(self.val_starts)} windows), test [{self.splits.test[0]}, "
                            f"{self.splits.test[1]}) ({len(self.test_starts)} windows); context {L}, horizon {H}")

    def _starts(self, span: tuple[int, int]) -> list[int]:
        """Window starts (of the context) whose targets lie in ``span``, targets not overlapping."""
        L, H = self.obj.context, self.obj.horizon
        return [t0 - L for t0 in range(span[0], span[1] - H + 1, H)]

    def _windows(self, starts: list[int]) -> Batch:
        L, H = self.obj.context, self.obj.horizon
        idx = torch.tensor(starts)[:, None] + torch.arange(L + H)[None]
        return Batch(self.values[idx[:, :L]], self.targets[idx[:, L:]])  # [B, L, C], [B, H, C]

    def train(self, indices: range) -> Batch:
        starts = [int(np.random.default_rng([self.seed, 0, i]).integers(0, self.n_train)) for i in indices]
        return self._windows(starts)

    def eval(self, indices: range) -> Batch:
        """Validation windows ``indices``, wrapping around past the last one to fill the batch;
        ``unique`` says how many rows are distinct (the forecast metrics count only those)."""
        n = len(self.val_starts)
        return self._windows([self.val_starts[i % n] for i in indices]).wrapped(indices, n)

    def test(self) -> Batch:
        """Every test window (benchmarks)."""
        return self._windows(self.test_starts)

    def n_eval(self) -> int | None:
        return len(self.val_starts)

    def state(self) -> dict[str, Any]:
        """What a resumed run must train on again: the series' length and a digest of its values
        (another CSV of as many rows trained on silently)."""
        return {"kind": "series", "source": self.series.source, "steps": len(self.values), "values": self.digest}

    def resumed(self, saved: dict[str, Any]) -> str | None:
        """What resuming a checkpoint of data state ``saved`` says: nothing (a series' state has one form)."""
        return None
