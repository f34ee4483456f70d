"""Block diffusion (BD3-LM: Arriola et al., "Block Diffusion: Interpolating Between
Autoregressive and Diffusion Language Models", ICLR 2025, arXiv 2503.09573), on hybrid
stacks.

A sequence of L tokens is cut into blocks of ``block_size``; the model is autoregressive
over blocks and a masked (absorbing-state) diffusion model inside a block. Training
minimises the block NELBO (BD3-LM Eq. 8-10, with MDLM's SUBS parameterisation):

    L(x) = E_t [ sum_b  w(t_b) * sum_{i in block b, x_t^i = [MASK]}  -log p(x_0^i | x_t^b, x_0^{<b}) ] / L

* one noise level t_b per block, drawn uniformly from the clipped range ``clip: [beta,
  omega]`` (BD3-LM §5, "clipped" schedules that reduce the variance of the gradient);
  every token of block b is replaced by [MASK] with probability m(t_b); with ``resample``
  (BD3-LM's training setting) conditioned on the block's masked fraction lying in
  [m(beta), m(omega)], which the independent draws often miss at small blocks (block 4,
  clip [0.3, 0.8]: ~40% of blocks, 7% with no mask at all and so no loss);
* ``clip_search`` (off by default: ``clip`` is then fixed): BD3-LM's data-driven noise
  schedule (§5, data-driven noise schedules; its code's
  ``_clipped_schedule_search``): at an evaluation the held-out batches are also noised with
  every candidate range of ``clip_search.grid`` (the same seeded uniforms mapped to each
  range, so the candidates differ only by their range), each block's NELBO term
  ``w(t_b) * sum_{i in b, masked, scored} CE_i / block_size`` is computed under each, and
  training continues with the range whose terms have the least variance (the first of equal
  ones); the variance is pooled over every block of every evaluated batch and process (BD3-LM
  sums its per-batch variances of the same per-block terms). Logged as ``bd/clip_lo``,
  ``bd/clip_hi``, ``bd/clip_var`` and each candidate's ``bd/var[lo,hi]``; the range in use is
  saved with the checkpoint (``train_state``), so a resume goes on with it;
* schedules (mask rate m(t), weight w(t) = m'(t) / m(t)): ``log_linear`` m = t, w = 1/t;
  ``cosine`` m = 1 - cos(pi t / 2); ``exponential`` m = t^p (``exponent`` p; BD3-LM's
  "square" for p = 2), w = p / t;
* SUBS: the [MASK] token is an extra input id ``vocab_size`` (a learned embedding,
  ``mask_embed``) that the LM head never predicts (it has ``vocab_size`` outputs), and only
  masked tokens are scored (unmasked ones are carried over);
* the [x_t, x_0] forward is vectorised: one call over ``[meta | x_0 | x_t]``
  (``core/two_stream.py`` defines what every mixer computes there, recurrent ones
  included); ``reference_logits`` is the slow per-block oracle it is tested against;
* ``--mode compile`` compiles ``core`` (the two-stream forward and the NELBO) and runs the noise
  draws before it eagerly (``Objective.compile_step``), so a compiled step trains on the eager
  step's draws; the held-out evaluation and the clip search run the same compiled core;
* the held-out metric is the NELBO with t ~ U[eps, 1] (unclipped, a bound on the negative
  log-likelihood per token): ``eval_loss`` and ``eval_ppl`` = exp(NELBO) are the
  perplexity bound; ``eval_accuracy`` is argmax accuracy at the masked tokens.

Sampling is ``generate(mode="block_diffusion")`` (``models/generation.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import two_stream
from ..core.cache import StepContext
from ..core.config import spec
from ..core.registry import register
from .base import Objective

SCHEDULES = ("log_linear", "cosine", "exponential")
T_EPS = 1e-3  # smallest noise level (the 1/t weights stay finite)


@dataclass(frozen=True)
class ClipSearchConfig:
    grid: tuple[tuple[float, float], ...] = spec(((0.0, 1.0), (0.3, 0.8), (0.45, 0.95)),
                                                doc="candidate [beta, omega] ranges (BD3-LM §5's search grid)")
    every: int = spec(1, min=1, doc="search at the evaluations of steps that are multiples of every x "
                      "train.eval_every (1: at each periodic evaluation, as BD3-LM at each validation)")

    def check(self, model):  # noqa: ANN001
        if not self.grid:
            yield "grid", "must name at least one [beta, omega] range"
        for i, (lo, hi) in enumerate(self.grid):
            if not (math.isfinite(lo) and math.isfinite(hi) and 0.0 <= lo <= hi <= 1.0):
                yield f"grid[{i}]", f"must be [beta, omega] with 0 <= beta <= omega <= 1, got [{lo:g}, {hi:g}]"
            elif hi < T_EPS:
                yield f"grid[{i}]", f"omega must be >= {T_EPS:g} (the smallest noise level), got {hi:g}"


@dataclass(frozen=True)
class BlockDiffusionConfig:
    kind: str = spec("block_diffusion", choices=("block_diffusion",))
    block_size: int = spec(16, min=1, max=1 << 16, doc="tokens per diffusion block; divides max_seq_len and "
                           "train.seq_len")
    schedule: str = spec("log_linear", choices=SCHEDULES, doc="mask rate m(t): t, 1 - cos(pi t / 2) or t^exponent")
    exponent: float = spec(2.0, gt=0.0, doc="the exponential schedule's p (m = t^p)")
    clip: tuple[float, float] = spec((0.0, 1.0), doc="[beta, omega]: training noise levels t ~ U[beta, omega]")
    resample: bool = spec(False, doc="keep every block's masked fraction inside [m(beta), m(omega)] (BD3-LM's "
                          "resampling, its training scripts' setting); off: each token masked on its own")
    clip_search: ClipSearchConfig | None = spec(None, doc="BD3-LM's search for the clip range of least variance "
                                                "at evaluations (training then uses it); null: clip stays fixed")

    def check(self, model):  # noqa: ANN001
        lo, hi = self.clip
        if not 0.0 <= lo <= hi <= 1.0:
            yield "clip", f"must be [beta, omega] with 0 <= beta <= omega <= 1, got [{lo:g}, {hi:g}]"
        if hi < T_EPS:
            yield "clip", f"omega must be >= {T_EPS:g} (the smallest noise level), got {hi:g}"
        if model.max_seq_len % self.block_size:
            yield "block_size", (f"must divide model.max_seq_len ({model.max_seq_len}): blocks tile the sequence; "
                                 f"got {self.block_size} (remainder {model.max_seq_len % self.block_size})")
        if self.resample and not _allowed_counts(self, lo, hi).any():
            yield "resample", (f"no masked fraction k / {self.block_size} of a block lies in the clip range's mask "
                               f"rates: widen clip or enlarge block_size")
        if self.resample and self.clip_search is not None:
            for i, (g_lo, g_hi) in enumerate(self.clip_search.grid):
                if 0.0 <= g_lo <= g_hi <= 1.0 and not _allowed_counts(self, g_lo, g_hi).any():
                    yield f"clip_search.grid[{i}]", (f"no masked fraction k / {self.block_size} of a block lies in "
                                                     f"[{g_lo:g}, {g_hi:g}]'s mask rates (resample): widen it or "
                                                     f"enlarge block_size")

    def check_recipe(self, model, comps: dict):  # noqa: ANN001, ANN201
        """An ETD model (``model.etd``) trains by block diffusion at fixed depth: its two-stream forward
        is every block application's own (each keeps its state), as in a plain stack. The router's
        per-token and per-row decisions are not defined over the two streams (ACT halting compacts
        each row's running tokens, Dr.LLM pools a row's states into its routes, MoDr gates the noisy
        blocks' short sequences), so those parts are refused."""
        router = comps.get("etd_router") if model.etd is not None else None
        if router is None:
            return
        for key, on in (("halting.kind", router.halting.kind != "none"),
                        ("layer_router.enabled", router.layer_router.enabled),
                        ("branches.n_branches", router.branches.n_branches > 0)):
            if on:
                yield (f"components.etd_router.{key}", "block diffusion trains ETD models at fixed depth "
                       "(etd.iterations): ACT halting, Dr.LLM layer routes and MoDr branches decide per token "
                       "or per row, which the two-stream forward over [x_0 | x_t] does not define")


def _allowed_counts(cfg: BlockDiffusionConfig, lo: float, hi: float) -> Tensor:
    """[block_size + 1] bool: the masked counts k whose fraction k / block_size lies in
    [m(lo), m(hi)], a bound not imposed where the range reaches its end (lo <= eps, hi = 1)."""
    frac = torch.arange(cfg.block_size + 1, dtype=torch.float64) / cfg.block_size
    ok = torch.ones_like(frac, dtype=torch.bool)
    if lo > T_EPS:
        ok &= frac >= float(mask_rate(cfg, torch.tensor(lo, dtype=torch.float64))) - 1e-12
    if hi < 1.0:
        ok &= frac <= float(mask_rate(cfg, torch.tensor(hi, dtype=torch.float64))) + 1e-12
    return ok


def mask_rate(cfg: BlockDiffusionConfig, t: Tensor) -> Tensor:
    if cfg.schedule == "log_linear":
        return t
    if cfg.schedule == "cosine":  # 1 - cos(pi t / 2), without its cancellation at small t (float32 levels)
        return 2.0 * torch.sin(0.25 * math.pi * t) ** 2
    return t ** cfg.exponent


def weight(cfg: BlockDiffusionConfig, t: Tensor) -> Tensor:
    """w(t) = m'(t) / m(t): the NELBO weight of a masked token at noise level t."""
    if cfg.schedule == "log_linear":
        return 1.0 / t
    if cfg.schedule == "cosine":  # (pi / 2) sin(a) / (1 - cos(a)) = (pi / 2) / tan(a / 2), a = pi t / 2
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * t)
    return cfg.exponent / t


@register("block_diffusion", config=BlockDiffusionConfig, kind="objective")
class BlockDiffusion(Objective):
    """The BD3-LM objective and the [MASK] embedding (see the module docstring)."""

    # --compile compiles ``core`` (the two-stream forward and the NELBO; the noise is drawn eagerly
    # before it); CUDA graphs capture the whole step (noise draws included: they read the generator's state)

    def __init__(self, cfg: BlockDiffusionConfig, *, d_model: int, vocab_size: int, init_std: float = 0.02,
                 **_: Any):
        super().__init__()
        self.cfg = cfg
        self.mask_token_id = vocab_size
        self.init_std = init_std
        self.mask_embed = nn.Parameter(torch.zeros(d_model))
        self.clip: tuple[float, float] = tuple(cfg.clip)  # the training range: the recipe's, or the searched one
        self._eval_every: int | None = None  # train.eval_every (configure)
        self._search = False  # this evaluation also measures the candidates' variance (eval_begin)
        if cfg.clip_search is not None:  # the step reads the range on the host (resample's allowed counts)
            self.graph_because = "clip_search changes the training clip range at evaluations"

    def configure(self, train_cfg: Any) -> None:
        self._eval_every = train_cfg.eval_every

    def train_state(self) -> dict[str, Any]:
        return {"clip": list(self.clip)} if self.cfg.clip_search is not None else {}

    def load_train_state(self, state: dict[str, Any]) -> None:
        """The searched range of a checkpoint (one saved before any search, or without one, keeps
        the recipe's ``clip``)."""
        clip = state.get("clip")
        if self.cfg.clip_search is not None and clip is not None:
            self.clip = (float(clip[0]), float(clip[1]))

    def reset_special(self) -> None:
        nn.init.normal_(self.mask_embed, 0.0, self.init_std)

    def run_problem(self, train_cfg: Any) -> str | None:
        bs = self.cfg.block_size
        if train_cfg.seq_len % bs:
            return (f"seq_len {train_cfg.seq_len} is not a multiple of objective.block_size ({bs}): "
                    "diffusion blocks tile every training sequence")
        return None

    # ------------------------------------------------------------------ noise
    def sample_t(self, shape: tuple[int, ...], device: torch.device, lo: float, hi: float,
                 generator: torch.Generator | None = None) -> Tensor:
        """Noise levels in [max(lo, eps), hi], antithetic (stratified over all blocks of the
        batch, as MDLM / BD3-LM) so the batch covers the range evenly."""
        n = math.prod(shape)
        u = (torch.rand((), device=device, generator=generator) + torch.arange(n, device=device) / n) % 1.0
        u = u[torch.randperm(n, device=device, generator=generator)].reshape(shape)
        lo = max(lo, T_EPS)
        return lo + (max(hi, lo) - lo) * u

    def noise(self, x0: Tensor, t: Tensor, generator: torch.Generator | None = None,
              clip: tuple[float, float] = (0.0, 1.0)) -> tuple[Tensor, Tensor]:
        """(x_t, masked [B, L] bool) for per-block levels t [B, nb]: each token masked with
        probability m(t_b); with ``resample`` and a clipped range, conditioned on the block's
        masked count k having k / block_size in [m(beta), m(omega)] (a bound at the range's end,
        beta <= eps or omega = 1, is not imposed, as in BD3-LM). BD3-LM redraws an out-of-range
        block until it fits; the same distribution is drawn here at once: k from the binomial
        restricted to the allowed counts, then a uniformly random k-subset of the block."""
        bs = self.cfg.block_size
        m = mask_rate(self.cfg, t)
        lo, hi = clip
        if self.cfg.resample and (lo > T_EPS or hi < 1.0):
            B, nb = t.shape
            k = torch.arange(bs + 1, device=t.device, dtype=m.dtype)
            log_binom = math.lgamma(bs + 1.0) - torch.lgamma(k + 1) - torch.lgamma(bs - k + 1)
            logp = log_binom + torch.xlogy(k, m[..., None]) + torch.xlogy(bs - k, 1 - m[..., None])
            ok = _allowed_counts(self.cfg, lo, hi).nonzero()  # host-side: a contiguous range of counts, read
            k_lo, k_hi = int(ok.min()), int(ok.max())  # here so the step copies nothing to the device
            logp = logp.masked_fill((k < k_lo) | (k > k_hi), -math.inf)
            cdf = logp.softmax(-1).cumsum(-1)
            u = 1.0 - torch.rand((B, nb, 1), device=t.device, generator=generator)  # in (0, 1]: u = 0 would
            n = (cdf < u * cdf[..., -1:]).sum(-1, keepdim=True)  # count 0 < k_lo; [B, nb, 1] masked per block
            order = torch.rand((B, nb, bs), device=t.device, generator=generator).argsort(-1).argsort(-1)
            masked = (order < n).reshape(B, nb * bs)
        else:
            masked = torch.rand(x0.shape, device=x0.device, generator=generator) < m.repeat_interleave(bs, dim=1)
        return torch.where(masked, torch.full_like(x0, self.mask_token_id), x0), masked

    # ------------------------------------------------------------------ forward over [x_t, x_0]
    def two_stream_logits(self, model, xt: Tensor, x0: Tensor) -> tuple[Tensor, StepContext]:  # noqa: ANN001
        """Logits [B, L, V] of the noisy stream: block b of x_t given x_0's blocks < b, in one
        forward of ``[meta | x_0 | x_t]`` (``core/two_stream.py``)."""
        B, L = x0.shape
        bs = self.cfg.block_size
        if L % bs:
            raise ValueError(f"block diffusion: sequence length {L} is not a multiple of block_size {bs}")
        n_meta = model.config.meta_tokens
        ts = two_stream.TwoStream(block_size=bs, n_meta=n_meta, length=L)
        x = torch.cat([model.embed_tokens(x0), model.embed_tokens(xt)], dim=1)
        if n_meta:
            x = torch.cat([model.meta.to(x.dtype)[None].expand(B, -1, -1), x], dim=1)
        ctx = StepContext(positions=two_stream.positions(ts, B, x.device), n_meta=n_meta, two_stream=ts)
        h = model.structure(model.blocks, x, ctx, None)
        return model.lm_head(model.norm(h[:, ts.clean_slots:])), ctx

    def core(self, model, xt: Tensor, x0: Tensor, masked: Tensor, t: Tensor,  # noqa: ANN001
             scored: Tensor) -> tuple[Tensor, Tensor, Tensor | None, dict]:
        """(NELBO, logits [B, L, V], the model's auxiliary loss or None, the forward's stats) of noisy
        blocks ``xt`` drawn from ``x0`` (``masked``, levels ``t`` [B, nb]): the two-stream forward and
        BD3-LM Eq. 10, the part of a step ``--mode compile`` compiles (``Objective.compile_step``); the
        noise is drawn before it, eagerly, so a compiled step trains on the eager step's draws."""
        logits, ctx = self.two_stream_logits(model, xt, x0)
        return self.nelbo(logits, x0, masked, t, scored), logits, ctx.aux_total(), ctx.stats

    def nelbo(self, logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, scored: Tensor) -> Tensor:
        """Mean over scored tokens of w(t_b) * CE at the masked ones (BD3-LM Eq. 10)."""
        return self.weighted_ce(logits, x0, masked, t, scored).sum() / scored.sum().clamp(min=1)

    def weighted_ce(self, logits: Tensor, x0: Tensor, masked: Tensor, t: Tensor, scored: Tensor) -> Tensor:
        """[B, L] float32: w(t_b) * CE at the masked, scored tokens, 0 elsewhere (the NELBO's terms)."""
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten(), reduction="none").view_as(x0)
        w = weight(self.cfg, t).repeat_interleave(self.cfg.block_size, dim=1)
        return torch.where(masked & scored, ce * w, torch.zeros_like(ce))

    def seeded_noise(self, ids: Tensor, seed: int, lo: float, hi: float) -> tuple[Tensor, Tensor, Tensor]:
        """(t [B, nb], xt, masked) of a held-out batch with levels from [lo, hi]: row i's draws from its
        own generator seeded ``seed + i`` (comparable across steps and batchings; every range maps the
        same uniforms). A loop over the batch's rows, not over tokens."""
        nb = ids.shape[1] // self.cfg.block_size
        rows = []
        for i in range(ids.shape[0]):
            g = torch.Generator(device=ids.device).manual_seed(seed + i)
            t_i = self.sample_t((1, nb), ids.device, lo, hi, g)
            rows.append((t_i, *self.noise(ids[i:i + 1], t_i, g, clip=(lo, hi))))
        t, xt, masked = (torch.cat(parts) for parts in zip(*rows))
        return t, xt, masked

    def train_forward(self, fwd, model, ids: Tensor, labels: Tensor, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """One training forward: noise levels from the clipped range, the two-stream forward,
        the NELBO plus auxiliary losses. Tokens whose label is -100 are not scored; they are
        still noised inside their own block like any other (clean context only for the blocks
        after it), so a prompt that shares a block with its answer is partly masked there."""
        from ..models.lm import ModelOutput

        lo, hi = self.clip
        t = self.sample_t((ids.shape[0], ids.shape[1] // self.cfg.block_size), ids.device, lo, hi)
        xt, masked = self.noise(ids, t, clip=(lo, hi))
        loss, logits, aux, stats = self.core_of(fwd, model)(xt, ids, masked, t, labels != -100)
        stats = {**stats, "bd/mask_rate": masked.float().mean().detach()}
        return ModelOutput(logits=logits, loss=loss if aux is None else loss + aux, aux_loss=aux, stats=stats)

    def train_items(self, ids: Tensor, labels: Tensor, batch: Any = None) -> Tensor:
        """The scored tokens (label not -100): the NELBO's denominator (``nelbo``: the sum over the
        masked ones, divided by every scored one, whichever the random levels mask)."""
        return (labels != -100).sum()

    @torch.no_grad()
    def eval_batch(self, fwd, model, ids: Tensor, labels: Tensor, seed: int, batch: Any = None, **kw: Any):  # noqa: ANN001, ANN201
        """(NELBO with t ~ U[eps, 1], correct and scored masked tokens, output) of one held-out
        batch whose first row is held-out row ``seed``: each row's noise is seeded by its own index,
        so evaluations are comparable across steps and do not depend on how the held-out rows are
        cut into batches (or spread over ranks); the levels are stratified over each row's blocks."""
        t, xt, masked = self.seeded_noise(ids, seed, 0.0, 1.0)
        scored = labels != -100
        core = self.core_of(fwd, model)
        loss_t, logits, _, stats = core(xt, ids, masked, t, scored)
        loss = float(loss_t)
        m = masked & scored
        correct = int((logits.argmax(-1)[m] == ids[m]).sum())
        from ..models.lm import ModelOutput

        stats = dict(stats)
        if self._search:
            for j, (lo, hi) in enumerate(self.cfg.clip_search.grid):
                # a candidate drawing as this evaluation does (levels from [eps, 1], no resampling: the same
                # seeded draws) reuses its forward rather than running it again
                same = lo <= T_EPS and hi >= 1.0
                terms, has = self.block_terms(model, ids, scored, seed, lo, hi, core=core,
                                              drawn=(t, masked, logits) if same else None)
                terms = terms[has].double()
                stats[f"clip_search/{j}_n"] = has.sum().double()  # (read on the host once, ``eval_sums``)
                stats[f"clip_search/{j}_s1"] = terms.sum()
                stats[f"clip_search/{j}_s2"] = (terms * terms).sum()
        return loss, correct, int(m.sum()), ModelOutput(logits=logits, stats=stats or None)

    # ------------------------------------------------------------------ clip search (BD3-LM §5)
    def block_terms(self, model, ids: Tensor, scored: Tensor, seed: int, lo: float, hi: float,  # noqa: ANN001
                    core: Any = None, drawn: tuple[Tensor, Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """([B, nb] float32 per-block NELBO terms ``w(t_b) * sum_{i in b, masked, scored} CE_i / block_size``
        with levels from [lo, hi] and the masks training draws there (``resample`` included), [B, nb]
        bool: the block scores a token). Row i's noise is seeded by ``seed + i``, as ``eval_batch``'s,
        so every candidate range maps the same uniforms (common random numbers). The logits come from
        ``core`` (``eval_batch``'s: compiled under ``--mode compile``), by default ``self.core`` on ``model``;
        ``drawn``: (t, masked, logits) of these draws already run (``eval_batch``'s own, for the candidate
        that draws as it does), used instead of drawing and running them again."""
        bs = self.cfg.block_size
        B, L = ids.shape
        if drawn is not None:
            t, masked, logits = drawn
        else:
            t, xt, masked = self.seeded_noise(ids, seed, lo, hi)
            _, logits, _, _ = (core or self.core_of(model, model))(xt, ids, masked, t, scored)
        per = self.weighted_ce(logits, ids, masked, t, scored)
        return per.view(B, L // bs, bs).sum(-1) / bs, scored.view(B, L // bs, bs).any(-1)

    def eval_begin(self, step: int | None) -> None:
        """An evaluation at training step ``step`` searches the clip range when ``clip_search`` is on
        and the step is a multiple of ``every`` x ``train.eval_every``."""
        self._search = self.eval_trains(step) is not None

    def eval_trains(self, step: int | None) -> str | None:
        """The evaluation of a search step (``eval_begin``) chooses the training clip range."""
        cs, every = self.cfg.clip_search, self._eval_every
        if cs is not None and step is not None and every is not None and step > 0 and step % (cs.every * every) == 0:
            return "chooses the training clip range (clip_search)"
        return None

    def eval_end(self, sums: dict[str, float]) -> dict[str, float]:
        """The search's choice from the summed candidates' sums (the same on every process, so all
        choose alike): the range whose per-block terms have the least variance (pooled: s2 / n -
        (s1 / n)^2; the first of equal ones) is the training range from now on."""
        searched, self._search = self._search, False
        if not searched:
            return {}
        res: dict[str, float] = {}
        best = None
        for j, (lo, hi) in enumerate(self.cfg.clip_search.grid):
            n, s1, s2 = (sums.get(f"clip_search/{j}_{k}", 0.0) for k in ("n", "s1", "s2"))
            if n <= 0:  # nothing scored: no estimate
                continue
            var = max(s2 / n - (s1 / n) ** 2, 0.0)
            res[f"bd/var[{lo:g},{hi:g}]"] = var
            if best is None or var < best[0]:
                best = (var, lo, hi)
        if best is None:
            return res
        self.clip = (best[1], best[2])
        res.update({"bd/clip_lo": best[1], "bd/clip_hi": best[2], "bd/clip_var": best[0]})
        return res

    def eval_sums(self, out: Any) -> dict[str, float]:
        """The clip search's per-candidate sums (block count, sum and sum of squares of the terms)."""
        items = [(k, v) for k, v in (out.stats or {}).items() if k.startswith("clip_search/")]
        if not items:
            return {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64) for _, v in items]).tolist()  # one host read
        return {k: v for (k, _), v in zip(items, values)}


def reference_logits(model, xt: Tensor, x0: Tensor, block_size: int, grad: bool = False) -> Tensor:  # noqa: ANN001
    """The slow oracle of ``two_stream_logits``: for every block b, a cache consumes the clean
    prefix x_0[:, :b*bs] and block b of x_t is run on a fork of it with bidirectional
    attention, exactly as sampling denoises a block. A Python loop over blocks: tests only.
    Without gradients unless ``grad`` (the tests compare gradients too)."""
    B, L = x0.shape
    cache = model.new_cache(B)
    outs = []
    with torch.set_grad_enabled(grad):
        for b in range(L // block_size):
            if b:  # commit the previous clean block (meta tokens enter with the first call)
                model(x0[:, (b - 1) * block_size:b * block_size], cache=cache, check_inputs=False)
            sl = slice(b * block_size, (b + 1) * block_size)
            outs.append(model(xt[:, sl], cache=cache.fork(), bidirectional=True, check_inputs=False).logits)
        return torch.cat(outs, dim=1)
