"""Rotary position embeddings (RoPE, Su et al. 2021) with partial rotation and scaling.

* partial RoPE: only the first ``fraction`` of each head's dims rotate (Qwen3-Next uses
  a quarter, GPT-NeoX style "rotary_pct").
* linear scaling (position interpolation, Chen et al. 2023): positions / factor.
* NTK-aware scaling (bloc97, 2023): base theta * factor^(d / (d - 2)).
* YaRN (Peng et al. 2023, arXiv 2309.00071, Eq. 18-21): per-frequency ramp between
  interpolation and extrapolation, plus the attention temperature ``0.1 ln(s) + 1`` applied to
  cos/sin. The ramp is the one of YaRN's reference code and HF transformers (linear in the
  dimension index between the indices where a frequency makes ``beta_fast`` and ``beta_slow``
  rotations over the original context, rounded outwards), not the paper's ramp linear in the
  rotation count (up to 79% apart on single frequencies).
* Llama 3 (Meta's Llama 3.1 release; HF ``rope_type: llama3``): wavelengths above
  ``original_max_seq_len / low_freq_factor`` are interpolated (frequency / factor), those
  below ``original_max_seq_len / high_freq_factor`` kept, the band between blended linearly
  in ``original_max_seq_len / wavelength``; no attention temperature.

Positions are absolute token positions from the cache (never from the caller).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import spec


@dataclass(frozen=True)
class RopeScaling:
    kind: str = spec("yarn", choices=("linear", "ntk", "yarn", "llama3"))
    factor: float = spec(1.0, min=1.0)
    original_max_seq_len: int = spec(2048, min=1)
    beta_fast: float = spec(32.0, gt=0.0)
    beta_slow: float = spec(1.0, gt=0.0)
    low_freq_factor: float | None = spec(None, gt=0.0, doc="llama3: wavelengths above original_max_seq_len / this "
                                                           "are interpolated (unset: 1)")
    high_freq_factor: float | None = spec(None, gt=0.0, doc="llama3: wavelengths below original_max_seq_len / this "
                                                            "are kept (unset: 4)")

    def check(self, model):  # noqa: ANN001
        if self.beta_fast <= self.beta_slow:
            yield "beta_fast", f"must be > beta_slow ({self.beta_slow}), got {self.beta_fast}"
        if self.kind != "llama3" and (self.low_freq_factor is not None or self.high_freq_factor is not None):
            yield "low_freq_factor" if self.low_freq_factor is not None else "high_freq_factor", \
                "only for kind llama3"
        if self.kind == "llama3" and self.llama3_factors()[0] >= self.llama3_factors()[1]:
            yield "high_freq_factor", f"must be > low_freq_factor ({self.llama3_factors()[0]:g})"

    def llama3_factors(self) -> tuple[float, float]:
        return (self.low_freq_factor if self.low_freq_factor is not None else 1.0,
                self.high_freq_factor if self.high_freq_factor is not None else 4.0)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = spec(10000.0, gt=1.0, doc="the base of the frequencies theta^(-2i/d) (> 1: YaRN divides by log theta)")
    fraction: float = spec(1.0, min=0.0, max=1.0)
    scaling: RopeScaling | None = None


def rotary_dim(head_dim: int, fraction: float) -> int:
    """Rotated dims per head (even)."""
    return int(head_dim * fraction) // 2 * 2


def inv_freq_and_mscale(cfg: RopeConfig, rot_dim: int) -> tuple[Tensor, float]:
    """Inverse frequencies [rot_dim/2] (float64) and the cos/sin magnitude scale."""
    idx = torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim
    theta = cfg.theta
    sc = cfg.scaling
    if sc is not None and sc.kind == "ntk":
        theta = theta * sc.factor ** (rot_dim / max(rot_dim - 2, 1))
    inv = 1.0 / theta**idx
    mscale = 1.0
    if sc is not None and sc.kind == "linear":
        inv = inv / sc.factor
    elif sc is not None and sc.kind == "yarn" and sc.factor > 1.0:
        # the dimension index at which a frequency makes n full rotations over the original context
        def dim_of(n: float) -> float:
            return rot_dim * math.log(sc.original_max_seq_len / (n * 2 * math.pi)) / (2 * math.log(cfg.theta))

        # the ramp runs linearly in the dimension index between the indices of beta_fast and beta_slow
        # rotations, rounded outwards (YaRN's reference code and HF transformers; the paper writes it in
        # rotations): 0 below = keep (extrapolate, high frequency), 1 above = interpolate; clamped ends that
        # cross (a tiny original context or theta) divide by the negative width, as both do
        lo, hi = max(math.floor(dim_of(sc.beta_fast)), 0), min(math.ceil(dim_of(sc.beta_slow)), rot_dim - 1)
        hi = hi if hi != lo else lo + 0.001
        ramp = ((torch.arange(rot_dim // 2, dtype=torch.float64) - lo) / (hi - lo)).clamp(0.0, 1.0)
        inv = inv / sc.factor * ramp + inv * (1 - ramp)
        mscale = 0.1 * math.log(sc.factor) + 1.0
    elif sc is not None and sc.kind == "llama3":
        low, high = sc.llama3_factors()
        old = sc.original_max_seq_len
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / sc.factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
        medium = (wavelen >= old / high) & (wavelen <= old / low)
        inv = torch.where(medium, blended, scaled)
    return inv, mscale


class Rotary(torch.nn.Module):
    """The (partial, scaled) RoPE angles of given positions [B, T]: ``cos_sin`` gives the
    [B, T, rot_dim / 2] tables that ``kernels.rotary.apply_rope`` rotates q and k by."""

    def __init__(self, head_dim: int, cfg: RopeConfig):
        super().__init__()
        self.rot_dim = rotary_dim(head_dim, cfg.fraction)
        self.cfg = cfg
        inv, self.mscale = inv_freq_and_mscale(cfg, max(self.rot_dim, 2))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        # what makes two layers' tables equal (inv_freq is a function of these; no tensor read,
        # so meta-device models build too)
        self.angles_key = ("rope", self.rot_dim, repr(cfg))

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001, ANN202
        """The frequencies stay float32 whatever the module's dtype (``model.to(torch.bfloat16)`` made
        them bf16: rotation angles 0.39 rad off at position 4000), as transformers keeps its
        ``inv_freq``; recomputed from the config on the new device (meta included)."""
        out = super()._apply(fn, recurse)
        inv = inv_freq_and_mscale(self.cfg, max(self.rot_dim, 2))[0].float()
        self.inv_freq = inv.to(self.inv_freq.device)
        return out

    def cos_sin(self, positions: Tensor, shared: dict | None = None) -> tuple[Tensor, Tensor]:
        """cos, sin [B, T, rot_dim / 2] (times the scaling's mscale). ``shared``: a forward call's
        ``StepContext.shared``; the tables are made once per call for every layer with the same
        angles (they are the same numbers: a decode step of a model with n attention layers
        launches their ~6 kernels once, not n times)."""
        key = self.angles_key
        hit = shared.get(key) if shared is not None else None
        if hit is not None and hit[0] is positions:  # the very tensor (a held reference: no id reuse)
            return hit[1], hit[2]
        ang = positions.float()[..., None] * self.inv_freq.to(positions.device)  # [B, T, R/2]
        cos, sin = ang.cos() * self.mscale, ang.sin() * self.mscale
        if shared is not None:
            shared[key] = (positions, cos, sin)
        return cos, sin
