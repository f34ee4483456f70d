"""Time-series forecasting (``objective: {kind: forecast, ...}``): patches of numeric series
in, ``horizon`` future values out, on any backbone (block_pattern, layout, ETD, MoE).

The recipe section (all keys but ``kind`` optional)::

    objective: {kind: forecast, context: 512, horizon: 96, patch: 16, channels: 1,
                loss: quantile, quantiles: [0.1, 0.5, 0.9], season: 24}

The model has no vocabulary (``model.vocab_size`` is left out: there is no token embedding
and no LM head); ``model.max_seq_len`` counts patch tokens and must hold ``context /
patch``. The ``ts_head`` component (``components/ts_head.py``: RevIN, PatchTST patching with
channel independence, horizon head) wraps the backbone; this objective owns it.

Training (one window of ``context`` values and the ``horizon`` values after it, per sample;
``training/series.py``): RevIN statistics of the context, the backbone over its patches, the
horizon head at the last patch. Loss in RevIN's z-score space (scale-free across windows):

* ``loss: mse``: mean_h (z_hat_h - z_h)^2, z = (y - mu) / sigma (means over the observed
  targets: a gap of the data is not scored);
* ``loss: quantile``: the mean over levels q and steps h of the pinball loss
  rho_q(z_h - z_hat_{h,q}) = max(q u, (q - 1) u) (Koenker & Bassett 1978), which a quantile
  forecaster minimises at the true conditional quantiles.

``--mode compile`` compiles the whole step (``core``: RevIN, patch embedding, backbone, horizon
head, loss; ``Objective.compile_step``), which the held-out evaluation runs too.

Held-out metrics (``training/forecast_metrics.py``), in original units, next to the
seasonal-naive baseline of period ``season``: MSE, MAE, MASE, CRPS (and the pinball loss for
quantile models): ``eval_mse``, ``eval_mae``, ``eval_mase``, ``eval_crps``, ``eval_snaive_*``.

Forecasting beyond the data is ``generate(mode="forecast")`` (``models/forecast_decoding.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..core import registry
from ..core.config import spec
from ..core.registry import register
from ..training import forecast_metrics as fm
from .base import Objective

DEFAULT_QUANTILES = (0.1, 0.5, 0.9)
#: bounds of the size fields, one by one: far above any forecasting setup (long-horizon benchmarks
#: forecast 720 steps of a few hundred channels from a few thousand values). Their products are not
#: small: the ts_head's size is bounded on its own (``MAX_HEAD_WEIGHTS``)
MAX_CONTEXT = 1 << 16
MAX_HORIZON = 1 << 16
MAX_CHANNELS = 1 << 14
#: the most parameters the ts_head may hold (``ForecastConfig.head_weights``): 2^32, 16 GiB in float32
#: (64 GiB with a gradient and AdamW's two moments). With channels mixed per patch the horizon head
#: has d_model x horizon x levels x channels weights: ~1e11 at the size bounds above (400 GiB in
#: float32 at d_model 32, 3 levels), which the recipe check let through; a channel-mixed head of
#: 862 channels (Traffic) x 720 steps x 3 levels at d_model 512 has 9.5e8
MAX_HEAD_WEIGHTS = 1 << 32


@dataclass(frozen=True)
class ForecastConfig:
    kind: str = spec("forecast", choices=("forecast",))
    context: int = spec(512, min=1, max=MAX_CONTEXT, doc="past values read per forecast (a multiple of patch)")
    horizon: int = spec(96, min=1, max=MAX_HORIZON, doc="future values predicted at once")
    patch: int = spec(16, min=1, max=MAX_CONTEXT, doc="values per patch token (PatchTST)")
    channels: int = spec(1, min=1, max=MAX_CHANNELS, doc="series per sample (numeric columns of the data)")
    channel_independent: bool = True
    loss: str = spec("mse", choices=("mse", "quantile"), doc="mse (point forecast) or quantile (pinball)")
    quantiles: tuple[float, ...] | None = spec(None, doc="levels for loss: quantile (default 0.1, 0.5, 0.9)")
    season: int = spec(1, min=1, max=MAX_CONTEXT, doc="period m of the seasonal-naive baseline and of MASE's scale")
    revin_affine: bool = True
    revin_eps: float = spec(1e-5, gt=0.0)

    @property
    def levels(self) -> tuple[float, ...] | None:
        """The quantile levels the head predicts (None for a point forecast)."""
        if self.loss != "quantile":
            return None
        return tuple(self.quantiles) if self.quantiles is not None else DEFAULT_QUANTILES

    @property
    def n_patches(self) -> int:
        return self.context // self.patch

    def head_weights(self, d_model: int) -> int:
        """The ts_head's parameter count at width ``d_model``: patch embedding, horizon head (both
        C times wider with channels mixed per patch) and RevIN's affine map."""
        mix = 1 if self.channel_independent else self.channels
        outs = self.horizon * (len(self.levels) if self.levels is not None else 1) * mix
        return (self.patch * mix + 1) * d_model + (d_model + 1) * outs + (2 * self.channels if self.revin_affine else 0)

    def check(self, model):  # noqa: ANN001
        if self.context % self.patch:
            yield "context", (f"must be a multiple of patch ({self.patch}): the context is cut into patches; got "
                              f"{self.context} (remainder {self.context % self.patch})")
        elif self.n_patches > model.max_seq_len:
            yield "context", (f"context / patch = {self.n_patches} patch tokens exceed model.max_seq_len "
                              f"({model.max_seq_len})")
        if self.quantiles is not None:
            q = list(self.quantiles)
            if self.loss != "quantile":
                yield "quantiles", "only with loss: quantile (loss: mse predicts one value per step)"
            elif not q:
                yield "quantiles", "must name at least one level"
            elif any(not 0.0 < v < 1.0 for v in q):
                yield "quantiles", f"levels must lie in (0, 1), got {q}"
            elif any(b <= a for a, b in zip(q, q[1:])):
                yield "quantiles", f"levels must be strictly increasing, got {q}"
            elif 0.5 not in q:
                yield "quantiles", (f"must include 0.5, the median: the point forecast (MSE, MAE, MASE, roll-outs) "
                                    f"reads it; got {q}")
        if self.season > self.context:
            yield "season", f"must be <= context ({self.context}): seasonal naive repeats the context's last season"
        n = self.head_weights(model.d_model)
        if n > MAX_HEAD_WEIGHTS:
            if self.channel_independent:
                key, fix = "horizon", "a shorter horizon, fewer quantile levels or a smaller model.d_model"
            else:
                key, fix = ("channel_independent", "channel_independent: true (one head shared by the channels), "
                            "fewer channels or a shorter horizon")
            yield key, (f"the ts_head would hold {n:,} weights, more than {MAX_HEAD_WEIGHTS:,} "
                        f"({MAX_HEAD_WEIGHTS * 4 >> 30} GiB in float32): model.d_model {model.d_model} x horizon "
                        f"{self.horizon} x {len(self.levels) if self.levels is not None else 1} output(s)"
                        f"{'' if self.channel_independent else f' x {self.channels} channels'} in the horizon head; "
                        f"use {fix}")

    def describe(self) -> str:
        """One line for ``hymba info``."""
        out = ("quantiles " + ", ".join(f"{q:g}" for q in self.levels) + " (pinball)" if self.levels
               else "point forecast (mse)")
        mode = "channel-independent" if self.channel_independent else "channels mixed per patch"
        return (f"forecast (ts_head): context {self.context} = {self.n_patches} patches of {self.patch} -> horizon "
                f"{self.horizon}, {self.channels} channel{'s' if self.channels != 1 else ''} ({mode}), {out}, "
                f"RevIN{' affine' if self.revin_affine else ''}, seasonal-naive period {self.season}")


@register("forecast", config=ForecastConfig, kind="objective")
class Forecast(Objective):
    """The forecasting objective and its ``ts_head`` (see the module docstring)."""

    reads_tokens = False
    needs_series = True
    default_data = "synthetic"
    # --compile compiles ``core`` (RevIN, patch embedding, backbone, horizon head and loss); CUDA
    # graphs capture the whole step (context windows in, loss out)

    def __init__(self, cfg: ForecastConfig, *, d_model: int, init_std: float = 0.02, **_: Any):
        super().__init__()
        self.cfg = cfg
        self.ts_head = registry.build("ts_head", cfg, d_model=d_model, init_std=init_std)
        lv = cfg.levels
        self.register_buffer("levels", torch.tensor(lv) if lv is not None else None, persistent=False)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """The quantile levels stay float32 whatever the module's dtype (``build_model(...,
        dtype=torch.bfloat16)`` made them bf16: the head trained and scored the 0.8984 quantile for
        0.9), as ``Rotary`` keeps its frequencies; rebuilt from the config on the new device."""
        out = super()._apply(fn, recurse)
        if self.levels is not None:
            self.levels = torch.tensor(self.cfg.levels, device=self.levels.device)
        return out

    # ------------------------------------------------------------------ the forward
    def patch_outputs(self, fwd, x: Tensor, mu: Tensor, sigma: Tensor, cache: Any = None,  # noqa: ANN001
                      check_inputs: bool = False, **kw: Any) -> tuple[Tensor, Any]:
        """(z-score forecasts [B, N, H, C, Q] after each of the N patches of values x [B, N*P, C],
        the backbone's output) with RevIN statistics (mu, sigma) [B, 1, C]; ``fwd`` is the model
        (or its compiled form); a cache continues from the patches it holds."""
        head = self.ts_head
        emb = head.embed(head.normalize(x, mu, sigma))
        out = fwd(None, inputs_embeds=emb, cache=cache, check_inputs=check_inputs, **kw)
        return head.unaffine(head.head(out.logits, x.shape[0])), out

    def loss(self, z_hat: Tensor, z: Tensor) -> Tensor:
        """MSE or mean pinball loss of z-score forecasts [B, H, C, Q] against z-scores [B, H, C],
        over the observed targets (a gap of the data is NaN in z and left out)."""
        obs = torch.isfinite(z)
        z = torch.where(obs, z, 0.0)
        per = (z_hat[..., 0] - z).pow(2) if self.levels is None else fm.pinball(z, z_hat, self.levels.to(z_hat)).mean(-1)
        return torch.where(obs, per, 0.0).sum() / obs.sum().clamp_min(1)

    def _window(self, fwd, x: Tensor, y: Tensor, **kw: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:  # noqa: ANN001
        head = self.ts_head
        mu, sigma = head.stats(x)  # float64 (ts_head): the targets' z-scores too, then float32 as the outputs
        z_hat, out = self.patch_outputs(fwd, x, mu, sigma, **kw)
        z_last = z_hat[:, -1]
        return z_last, ((y.double() - mu) / sigma).float(), mu, sigma, out

    def core(self, model, x: Tensor, y: Tensor, **kw: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, Any]:  # noqa: ANN001
        """(loss, z-score forecasts [B, H, C, Q] after the last patch, RevIN's mu and sigma, the
        backbone's output) of context windows ``x`` and the horizons ``y`` after them: the whole
        step, the part ``--mode compile`` compiles (``Objective.compile_step``)."""
        z_last, z, mu, sigma, out = self._window(model, x, y, **kw)
        return self.loss(z_last, z), z_last, mu, sigma, out

    def train_forward(self, fwd, model, ids: Tensor, labels: Tensor, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """``ids``: context windows [B, L, C]; ``labels``: the horizon after them [B, H, C]."""
        from ..models.lm import ModelOutput

        loss, z_last, _, _, out = self.core_of(fwd, model)(ids, labels, **kw)
        aux = out.aux_loss
        return ModelOutput(logits=z_last, loss=loss if aux is None else loss + aux, aux_loss=aux, stats=out.stats)

    @torch.no_grad()
    def eval_batch(self, fwd, model, ids: Tensor, labels: Tensor, seed: int, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """(loss, 0, 0, output) of held-out windows; the output's stats carry the metric sums
        (``forecast_metrics.window_sums``) that ``eval_sums`` hands to the trainer. Targets that are
        NaN (gaps of the data, and the repeated windows of a batch that wraps around the held-out
        set, whose labels the trainer's evaluation blanks) count in neither the loss nor the sums;
        the trainer weighs the loss by the observed targets (``train_items``)."""
        from ..models.lm import ModelOutput

        loss, z_last, mu, sigma, out = self.core_of(fwd, model)(ids, labels, **kw)
        pred = self.values(z_last, mu, sigma)
        sums = fm.window_sums(ids, labels, pred, self.levels, self.cfg.season)
        stats = dict(out.stats or {})
        stats.update({f"forecast/{k}": v for k, v in sums.items()})
        return float(loss), 0, 0, ModelOutput(logits=pred, stats=stats)

    def values(self, z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """Forecasts in the series' units (float64) from z-score outputs [B, ..., H, C, Q]: quantiles sorted
        per step (monotone rearrangement, Chernozhukov et al. 2010: never a crossed band), then
        RevIN's inverse."""
        return self.ts_head.denormalize(z.sort(-1).values if self.levels is not None else z, mu, sigma)

    def eval_sums(self, out: Any) -> dict[str, float]:
        return {k[len("forecast/"):]: float(v) for k, v in (out.stats or {}).items() if k.startswith("forecast/")}

    def eval_results(self, sums: dict[str, float]) -> dict[str, float]:
        return fm.forecast_results(sums)

    def train_items(self, ids: Tensor, labels: Tensor, batch: Any = None) -> Tensor:
        """The observed targets (``loss``'s denominator: a gap of the data, NaN in the horizon, is not
        scored; contexts have their gaps filled, ``training/series.py``, so a finite target has a
        finite z-score). Held out (``eval_weight``): ``eval_loss`` is the mean over every observed
        held-out target (NaN where none was); a window whose targets are all missing weighs
        nothing."""
        return torch.isfinite(labels).sum()

    @torch.no_grad()
    def forecast(self, model, x: Tensor) -> Tensor:  # noqa: ANN001
        """Forecasts [B, H, C, Q] (original units) of the horizon after contexts x [B, L, C]
        (L = ``context``, exactly: another length is a ValueError; ``generate(series,
        mode="forecast")`` reads the last ``context`` values of a longer series), in one forward;
        float64 (the statistics' precision: ts_head)."""
        L = self.cfg.context
        if x.ndim != 3 or x.shape[1] != L:
            got = f"{x.shape[1]} steps" if x.ndim == 3 else f"shape {tuple(x.shape)}"
            raise ValueError(f"forecast: x has {got}, expected context = {L} (x [B, {L}, {self.cfg.channels}]); "
                             f"generate(series, mode=\"forecast\") forecasts from the last {L} values of a longer series")
        mu, sigma = self.ts_head.stats(x)
        z_hat, _ = self.patch_outputs(model, x, mu, sigma)
        return self.values(z_hat[:, -1], mu, sigma)
