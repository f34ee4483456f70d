"""``ts_head``: the time-series forecasting head (patch in, horizon out) around the hybrid
backbone, used by the ``forecast`` objective (``objectives/forecast.py``).

A sample is a window of ``context`` past values of ``channels`` series, x [B, L, C]. The
head turns it into patch tokens for the backbone and the backbone's last hidden state into
``horizon`` future values per channel (and per quantile level):

1. **RevIN** (Kim et al., "Reversible Instance Normalization for Accurate Time-Series
   Forecasting against Distribution Shift", ICLR 2022, Eq. 1-3): per instance and channel,
   over the context only,

       mu = mean_t x_t,   sigma = sqrt(var_t x_t + eps),   x_hat_t = gamma (x_t - mu) / sigma + beta

   with learnable per-channel gamma, beta (``revin_affine``); the output is denormalised by
   the inverse, y = sigma (y_hat - beta) / gamma + mu (Eq. 3). The statistics, the normalisation
   and its inverse are computed in float64 (a series at 1e7 with a signal of std 1 keeps it;
   float32's spacing there is 1.0), so forecast(a x + b) = a forecast(x) + b holds wherever a^2
   var(x) >> eps. The absolute eps (``revin_eps``, 1e-5 as the paper's code) is what keeps a flat
   context followed by a jump (intermittent demand: zeros, then a sale) from a z-score target of
   1 / 0 in training; a floor relative to the window's level or spread has none there. Its price:
   a series whose window std is below ~sqrt(100 eps) (~0.03: daily returns, a quantity written in thousands) is
   flattened towards its mean, so such data is rescaled or given a smaller ``revin_eps``;
   ``hymba train`` and ``hymba generate --mode forecast`` say so when the data is that small.
2. **Patching** (PatchTST, Nie et al., "A Time Series is Worth 64 Words", ICLR 2023, arXiv
   2211.14730, §3.1): the normalised context is cut into N = L / P non-overlapping patches
   of P values; a linear map W_p in R^{D x P} embeds each patch as one token,
   x_p^(i) = W_p x_hat[(i-1)P : iP]. **Channel independence** (PatchTST §3.1, the default):
   every channel is its own sequence (the batch becomes B * C), sharing the embedding, the
   backbone and the head. With ``channel_independent: false`` a patch token embeds the P
   values of all C channels at once (W_p in R^{D x PC}).
3. The hybrid backbone runs over the N patch tokens (causal, any block_pattern / ETD / MoE;
   no token embedding and no vocabulary head: ``model.vocab_size`` is absent).
4. **Horizon head**: a linear map of the hidden state at patch i to the H values after it
   (x 1 output for ``loss: mse``, x |quantiles| for ``loss: quantile``), in RevIN's
   normalised space; the objective trains the last patch's prediction.

Because the backbone is causal and RevIN's statistics are fixed per window, the head's
outputs at every patch are a function of the patches before it: a cached forward over the
patches (one or several at a time) gives the full forward's forecasts (THE invariant), which
is what rolling forecasts use (``models/forecast_decoding.py``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.registry import register


@register("ts_head", config=None, kind="head")
class TSHead(nn.Module):
    """RevIN + patch embedding + horizon head (see the module docstring); ``cfg`` is the
    objective's ``ForecastConfig``."""

    def __init__(self, cfg: Any, *, d_model: int, init_std: float = 0.02, **_: Any):
        super().__init__()
        self.cfg = cfg
        C, P, H = cfg.channels, cfg.patch, cfg.horizon
        self.n_out = len(cfg.levels) if cfg.levels is not None else 1
        self.ci = cfg.channel_independent
        self.init_std = init_std
        self.revin_weight = nn.Parameter(torch.ones(C)) if cfg.revin_affine else None
        self.revin_bias = nn.Parameter(torch.zeros(C)) if cfg.revin_affine else None
        self.patch_embed = nn.Linear(P if self.ci else P * C, d_model)
        self.out = nn.Linear(d_model, H * self.n_out * (1 if self.ci else C))
        # the input embedding and the output head train with AdamW, as a token embedding and an
        # LM head do (Muon is for hidden matrices: Jordan et al. 2024, "Muon")
        self.patch_embed._no_muon = True
        self.out._no_muon = True

    def reset_special(self) -> None:
        """After the model's generic init (every Linear from N(0, init_std)): RevIN starts as
        the identity affine map (gamma = 1, beta = 0)."""
        if self.revin_weight is not None:
            nn.init.ones_(self.revin_weight)
            nn.init.zeros_(self.revin_bias)

    # ------------------------------------------------------------------ RevIN
    def stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(mu, sigma) [B, 1, C], float64, of a context window x [B, L, C] (RevIN Eq. 1)."""
        x = x.double()
        mu = x.mean(1, keepdim=True)
        sigma = (x.var(1, keepdim=True, unbiased=False) + self.cfg.revin_eps).sqrt()
        return mu, sigma

    def normalize(self, x: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """x_hat = gamma (x - mu) / sigma + beta (RevIN Eq. 2), float64; x [B, T, C]."""
        z = (x.double() - mu) / sigma
        if self.revin_weight is not None:
            z = z * self.revin_weight + self.revin_bias
        return z

    def unaffine(self, y: Tensor) -> Tensor:
        """Undo RevIN's affine map of head outputs y [B, ..., H, C, Q]: the z-score (y - beta) /
        gamma, the space the loss is computed in (scale-free across instances)."""
        if self.revin_weight is None:
            return y
        eps2 = self.cfg.revin_eps ** 2  # as RevIN's reference code: gamma never divides by 0 exactly
        return (y - self.revin_bias[:, None]) / (self.revin_weight[:, None] + eps2)

    @staticmethod
    def denormalize(z: Tensor, mu: Tensor, sigma: Tensor) -> Tensor:
        """z-scores [B, ..., C, Q] -> values, float64: sigma z + mu (RevIN Eq. 3 after ``unaffine``)."""
        shape = (mu.shape[0],) + (1,) * (z.dim() - 3) + (mu.shape[-1], 1)
        return z.double() * sigma.reshape(shape) + mu.reshape(shape)

    # ------------------------------------------------------------------ patches
    def embed(self, xn: Tensor) -> Tensor:
        """Patch tokens of normalised values xn [B, T, C] (T a multiple of patch): [B*C, T/P, D]
        channel-independent, else [B, T/P, D]."""
        B, T, C = xn.shape
        P = self.cfg.patch
        if T % P:
            raise ValueError(f"ts_head: {T} values are not a whole number of patches of {P}")
        if self.ci:
            patches = xn.permute(0, 2, 1).reshape(B * C, T // P, P)
        else:
            patches = xn.reshape(B, T // P, P * C)
        return self.patch_embed(patches.to(self.patch_embed.weight.dtype))

    def head(self, h: Tensor, batch: int) -> Tensor:
        """Horizon outputs of hidden states h [B', N, D]: [B, N, H, C, Q] (normalised space)."""
        H, Q, C = self.cfg.horizon, self.n_out, self.cfg.channels
        y = self.out(h).float()
        N = h.shape[1]
        if self.ci:
            return y.view(batch, C, N, H, Q).permute(0, 2, 3, 1, 4)
        return y.view(batch, N, H, C, Q)
