"""Shared pieces of our own Triton kernels (``kernels.conv`` decode update, ``kernels.norm``
gated RMSNorm, ``kernels.gdn`` and ``kernels.mamba3`` decode steps): the optional import, float32
``exp`` / ``log`` as PyTorch's CUDA kernels compute them, an fp32 SiLU that computes what
PyTorch's does, and the other float32 transcendental functions those kernels need.

PyTorch's CUDA SiLU is ``x / (1 + expf(-x))`` in float32 (``opmath``): the accurate ``expf``
and an IEEE division. Triton's ``tl.exp`` on float32 is the approximate ``ex2.approx`` and its
``/`` is not correctly rounded, so the compiled kernels use libdevice's ``exp`` (CUDA's
``expf``) and ``tl.math.div_rn``. Triton's CPU interpreter has no libdevice; there (TRITON_INTERPRET=1,
read at import like Triton itself does) the exp is ``tl.exp`` (numpy's), and so is the log.

The same holds for ``tanh`` / ``sin`` / ``cos`` / ``fmod`` (``tanh_f32``, ``sin_f32``,
``cos_f32``, ``fmod_f32``): compiled, libdevice's (CUDA's ``tanhf`` / ``sinf`` / ``cosf`` /
``fmodf``, what PyTorch's CUDA kernels call; ``tl.sin`` / ``tl.cos`` may lower to the
``.approx`` PTX instructions). In the interpreter ``sin`` / ``cos`` are numpy's, ``fmod`` is
``%`` (numpy's ``fmod``), and ``tanh`` is ``sign(x) (1 - 2 / (exp(2|x|) + 1))`` (Triton has
no ``tl.tanh``): exact to a few 1e-8 in absolute terms, not in relative terms near 0.
"""

from __future__ import annotations

import os

try:  # Triton is optional: only the CUDA fast paths use it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU machines without triton
    triton = tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def compile_for(fn, signature: dict[str, str], constexprs: dict, num_warps: int, arch: int = 90,  # noqa: ANN001
                **options: object):  # noqa: ANN201
    """``fn`` (a ``triton.jit`` function) through Triton's real compiler (TTIR -> PTX -> cubin)
    for CUDA compute capability ``arch`` without a GPU: the compiled kernel, its PTX in
    ``.asm["ptx"]``. ``signature`` maps each argument to its Triton type ("*fp32", "i32",
    "constexpr"); ``constexprs`` gives the constexpr values. The slow tests check that our
    kernels compile for Hopper this way; ``ptxas_resources`` reads their register use."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps, **options})


def ptxas_resources(ptx: str, arch: str = "sm_90a") -> dict | None:
    """``ptxas -v`` on ``ptx`` with the ptxas that Triton ships (None where there is none):
    registers per thread, spill stores / loads and stack frame in bytes per thread, the tensor
    core instructions in the PTX (``mma.sync`` / ``wgmma.mma_async``), and ptxas's own lines."""
    import re
    import shutil
    import subprocess
    import tempfile

    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    exe = next((p for p in (os.path.join(bindir, "ptxas-blackwell"), os.path.join(bindir, "ptxas"),
                            shutil.which("ptxas") or "") if p and os.access(p, os.X_OK)), None)
    if exe is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([exe, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed: {res.stderr.strip()[-500:]}")
    text = res.stdout + res.stderr
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, text)) else 0  # noqa: E731
    return {"registers": num(r"Used (\d+) registers"), "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"), "stack_frame": num(r"(\d+) bytes stack frame"),
            "mma_sync": len(re.findall(r"\bmma\.sync\.", ptx)), "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
            "ptxas": [line.strip() for line in text.splitlines() if line.strip()]}


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton's ``next_power_of_2``, here without Triton: launch
    configs are plain arithmetic on the shapes and are tested on machines without it)."""
    return 1 << (max(n, 1) - 1).bit_length()

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
    def _tanh_libdevice(x):
        return libdevice.tanh(x)

    @triton.jit
    def _tanh_tl(x):
        e = tl.exp(2.0 * tl.abs(x))
        t = 1.0 - 2.0 / (e + 1.0)
        return tl.where(x < 0, -t, t)

    @triton.jit
    def _sin_libdevice(x):
        return libdevice.sin(x)

    @triton.jit
    def _sin_tl(x):
        return tl.sin(x)

    @triton.jit
    def _cos_libdevice(x):
        return libdevice.cos(x)

    @triton.jit
    def _cos_tl(x):
        return tl.cos(x)

    @triton.jit
    def _fmod_libdevice(x, y):
        return libdevice.fmod(x, y)

    @triton.jit
    def _fmod_tl(x, y):
        return x % y

    _interp = INTERPRET or libdevice is None
    tanh_f32 = _tanh_tl if _interp else _tanh_libdevice
    sin_f32 = _sin_tl if _interp else _sin_libdevice
    cos_f32 = _cos_tl if _interp else _cos_libdevice
    fmod_f32 = _fmod_tl if _interp else _fmod_libdevice

    @triton.jit
    def sigmoid_f32(x):
        """sigmoid of a float32 block as PyTorch's CUDA kernel computes it: 1 / (1 + exp(-x))."""
        return tl.math.div_rn(1.0, 1.0 + exp_f32(-x))

    @triton.jit
    def silu_f32(x):
        """SiLU of a float32 block as PyTorch computes it: x / (1 + exp(-x))."""
        return tl.math.div_rn(x, 1.0 + exp_f32(-x))

    @triton.jit
    def round_tf32(x):
        """float32 block -> the nearest TF32 values (10 mantissa bits; ties away from zero), as
        float32: adding half a unit of the 11th bit to the bits carries into the exponent where
        the mantissa overflows, as rounding does."""
        return ((x.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)

    @triton.jit
    def dot_f32(x, y, acc, PREC: tl.constexpr):
        """``acc + x @ y`` for float32 blocks at matmul precision PREC: a precision of ``tl.dot``
        ("tf32", Triton's "tf32x3", "ieee", "bf16x3", "bf16x6"), or "tf32x3_split": three TF32
        tensor-core products of split operands written out here (3xTF32), ``x = xh + xl`` with
        ``xh`` x rounded to TF32's 10 mantissa bits and ``xl`` the exact remainder, itself rounded
        to TF32, ``x y ~ xl yh + xh yl + xh yh`` (the ``xl yl`` term, ~2^-22 relative, dropped;
        the small terms first): float32 accuracy on tensor cores, the terms Triton's "tf32x3"
        lowering makes (``kernels.atlas``, ``kernels.bmm32``). Both parts are rounded to nearest
        (``round_tf32``): a tensor core reading float32 registers as TF32 drops the low 13 bits,
        a bias toward zero that a chain of products accumulates (split by truncation, as first
        written, the muon_chunk GPU test's state ended 4x further from float64 than tf32x3's)."""
        if PREC == "tf32x3_split":
            xh = round_tf32(x)
            yh = round_tf32(y)
            acc = tl.dot(round_tf32(x - xh), yh, acc, input_precision="tf32")
            acc = tl.dot(xh, round_tf32(y - yh), acc, input_precision="tf32")
            return tl.dot(xh, yh, acc, input_precision="tf32")
        else:
            return tl.dot(x, y, acc, input_precision=PREC)
