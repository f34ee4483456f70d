"""Shared pieces of our own Triton kernels (``kernels.conv`` decode update, ``kernels.norm``
gated RMSNorm, ``kernels.gdn`` decode step): the optional import, float32 ``exp`` / ``log`` as
PyTorch's CUDA kernels compute them and an fp32 SiLU that computes what PyTorch's does.

PyTorch's CUDA SiLU is ``x / (1 + expf(-x))`` in float32 (``opmath``): the accurate ``expf``
and an IEEE division. Triton's ``tl.exp`` on float32 is the approximate ``ex2.approx`` and its
``/`` is not correctly rounded, so the compiled kernels use libdevice's ``exp`` (CUDA's
``expf``) and ``tl.math.div_rn``. Triton's CPU interpreter has no libdevice; there (TRITON_INTERPRET=1,
read at import like Triton itself does) the exp is ``tl.exp`` (numpy's), and so is the log.
"""

from __future__ import annotations

import os

try:  # Triton is optional: only the CUDA fast paths use it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")

if triton is not None:
    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older layouts
        try:
            from triton.language.extra.cuda import libdevice
        except ImportError:
            libdevice = None  # tl.exp then (float32 results within a few ulps of PyTorch's)

    @triton.jit
    def _exp_libdevice(x):
        return libdevice.exp(x)

    @triton.jit
    def _exp_tl(x):
        return tl.exp(x)

    @triton.jit
    def _log_libdevice(x):
        return libdevice.log(x)

    @triton.jit
    def _log_tl(x):
        return tl.log(x)

    exp_f32 = _exp_tl if (INTERPRET or libdevice is None) else _exp_libdevice
    log_f32 = _log_tl if (INTERPRET or libdevice is None) else _log_libdevice

    @triton.jit
    def silu_f32(x):
        """SiLU of a float32 block as PyTorch computes it: x / (1 + exp(-x))."""
        return tl.math.div_rn(x, 1.0 + exp_f32(-x))
