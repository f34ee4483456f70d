"""The two-stream layout of block-diffusion training (BD3-LM, Arriola et al. 2025,
arXiv 2503.09573 §3.2 "vectorised training"), extended to recurrent mixers.

One forward holds ``[meta (M) | clean x_0 (L) | noisy x_t (L)]``; the noisy copy of token
``i`` has the clean token's position. With block size ``bs`` and ``nb = L / bs`` blocks:

* the **clean stream** (meta + x_0) is the model's ordinary causal forward, in every mixer;
* **noisy block j** is what a cached forward of that block alone would give on top of a
  cache that has consumed the clean prefix ``x_0[:j*bs]`` (meta included), with the block's
  tokens seeing each other both ways in attention (``StepContext.bidirectional``) and
  causally in recurrent mixers. This is exactly what block-diffusion sampling computes when
  it denoises block j (``models/generation.py``), so training and sampling agree.

How each mixer meets that contract, without a Python loop over blocks:

* attention (and hymba's attention heads) run once over all ``M + 2L`` slots with the mask
  of ``two_stream_visible`` (clean: causal; noisy block j: meta, clean blocks < j and its
  own block both ways);
* recurrent mixers (gdn, mamba3, atlas, hymba's SSM heads) implement
  ``boundary_forward(x, ctx, block_size, offset)``: the clean forward plus their cache state
  at every block start ``offset + j*bs`` (their chunked kernels compute those states on
  the way), as one state of batch ``B*nb``. ``recurrent_two_stream`` then runs all noisy
  blocks at once as ``B*nb`` short sequences from those states, through the mixer's
  ordinary cached path.

Token-wise layers (MLP, MoE, norms) need nothing. The clean stream is token-causal in
attention too (BD3-LM's is block-causal): with recurrent mixers in the stack the clean
stream is causal anyway, and this way committing a denoised block is the ordinary cached
forward, so THE invariant (chunked cached forward == full forward) covers committed blocks
unchanged, and the model is also a plain causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .cache import StepContext


@dataclass(frozen=True)
class TwoStream:
    """``[meta (n_meta) | clean (length) | noisy (length)]``, noisy blocks of ``block_size``."""

    block_size: int
    n_meta: int
    length: int

    @property
    def n_blocks(self) -> int:
        return self.length // self.block_size

    @property
    def clean_slots(self) -> int:
        return self.n_meta + self.length


def positions(ts: TwoStream, batch: int, device: torch.device) -> Tensor:
    """[B, M + 2L]: meta 0..M-1, clean M..M+L-1, noisy the same as clean."""
    clean = torch.arange(ts.clean_slots, device=device)
    return torch.cat([clean, clean[ts.n_meta:]])[None].expand(batch, -1)


def two_stream_visible(ts: TwoStream, device: torch.device, window: int | None = None) -> Tensor:
    """[S, S] bool (S = M + 2L): which key slot each query slot sees.

    clean/meta query at position p: clean/meta keys at positions <= p (and within the
    window; meta always). Noisy query in block j: meta, clean keys of blocks < j (within the
    window of the query's position), and every noisy key of block j."""
    M, L, bs = ts.n_meta, ts.length, ts.block_size
    pos = positions(ts, 1, device)[0]
    noisy = torch.arange(M + 2 * L, device=device) >= M + L
    block = torch.where(pos >= M, (pos - M) // bs, torch.full_like(pos, -1))  # meta: block -1
    q_pos, k_pos = pos[:, None], pos[None, :]
    q_noisy, k_noisy = noisy[:, None], noisy[None, :]
    q_blk, k_blk = block[:, None], block[None, :]
    in_window = torch.ones_like(q_noisy & k_noisy)
    if window is not None:
        in_window = (q_pos - k_pos < window) | (k_pos < M)
    clean_rows = ~q_noisy & ~k_noisy & (k_pos <= q_pos) & in_window
    noisy_rows = q_noisy & ((~k_noisy & (k_blk < q_blk) & in_window) | (k_noisy & (k_blk == q_blk)))
    return clean_rows | noisy_rows


def recurrent_two_stream(mixer, x: Tensor, ctx: StepContext, inner: bool = False) -> Tensor:  # noqa: ANN001
    """Two-stream forward of a recurrent mixer through its ``boundary_forward`` (see module);
    ``inner=True``: through ``boundary_inner`` / ``inner`` (hymba's SSM heads, before the
    output projection)."""
    ts: TwoStream = ctx.two_stream
    B, _, D = x.shape
    nb, bs, Mc = ts.n_blocks, ts.block_size, ts.clean_slots
    ctx_c = StepContext(positions=ctx.positions[:, :Mc], n_meta=ctx.n_meta, aux_losses=ctx.aux_losses,
                        stats=ctx.stats, shared=ctx.shared, layer_idx=ctx.layer_idx)
    y_clean, states = (mixer.boundary_inner if inner else mixer.boundary_forward)(x[:, :Mc], ctx_c, bs, ts.n_meta)
    ctx_n = StepContext(positions=ctx.positions[:, Mc:].reshape(B * nb, bs), n_meta=ctx.n_meta,
                        aux_losses=ctx.aux_losses, stats=ctx.stats, layer_idx=ctx.layer_idx, bidirectional=True)
    y_noisy = (mixer.inner if inner else mixer)(x[:, Mc:].reshape(B * nb, bs, D), ctx_n, states)
    return torch.cat([y_clean, y_noisy.reshape(B, nb * bs, -1)], dim=1)
