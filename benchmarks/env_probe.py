"""Print what the fast paths need on this machine: torch/triton/CUDA, fla-core,
mamba-ssm's Mamba-3 kernels, tilelang, torch._grouped_mm, HF Qwen3-Next. Writes JSON.

    python benchmarks/env_probe.py --out benchmarks/results/env.json
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import time
import traceback

import torch


def probe(name: str, fn) -> dict:
    t = time.perf_counter()
    try:
        val = fn()
        return {"ok": True, "value": val, "s": round(time.perf_counter() - t, 2)}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": f"{type(e).__name__}: {e}"[:400],
                "where": traceback.format_exc().strip().splitlines()[-3:]}


def ver(mod: str) -> str:
    m = importlib.import_module(mod)
    return getattr(m, "__version__", "?")


def gdn_fwd_bwd() -> str:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    B, T, H, D = 2, 256, 4, 64
    dev = "cuda"
    q = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    g = (-torch.rand(B, T, H, device=dev)).requires_grad_()
    beta = torch.rand(B, T, H, device=dev, dtype=torch.bfloat16).requires_grad_()
    o, _ = chunk_gated_delta_rule(q, k, v, g, beta, use_qk_l2norm_in_kernel=True)
    o.float().sum().backward()
    return f"fwd+bwd ok, grad norm {float(q.grad.float().norm()):.3f}"


def mamba3_siso() -> str:
    import inspect

    from mamba_ssm.ops.triton.mamba3.mamba3_siso_combined import mamba3_siso_combined

    return "import ok; signature " + str(inspect.signature(mamba3_siso_combined))[:600]


def grouped_mm() -> str:
    E, m, k, n = 4, 64, 128, 256
    a = torch.randn(E * m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(E, k, n, device="cuda", dtype=torch.bfloat16)
    offs = torch.arange(1, E + 1, device="cuda", dtype=torch.int32) * m
    out = torch._grouped_mm(a, b, offs=offs)
    ref = torch.cat([a[i * m:(i + 1) * m] @ b[i] for i in range(E)])
    return f"ok, rel err {float((out.float() - ref.float()).norm() / ref.float().norm()):.2e}"


def qwen3_next_moe() -> str:
    from transformers.models.qwen3_next import modeling_qwen3_next as m

    return ", ".join(n for n in dir(m) if "Moe" in n or "MoE" in n)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/env.json")
    args = ap.parse_args()
    r = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "triton": probe("triton", lambda: ver("triton")),
        "fla": probe("fla", lambda: ver("fla")),
        "tilelang": probe("tilelang", lambda: ver("tilelang")),
        "transformers": probe("transformers", lambda: ver("transformers")),
    }
    if torch.cuda.is_available():
        r["gdn_fwd_bwd"] = probe("gdn", gdn_fwd_bwd)
        r["mamba3_siso"] = probe("mamba3", mamba3_siso)
        r["grouped_mm"] = probe("grouped_mm", grouped_mm)
    r["qwen3_next_moe"] = probe("qwen3next", qwen3_next_moe)
    import hymba_plus  # noqa: F401  registers components and their fast paths
    from hymba_plus.kernels import dispatch

    r["dispatch"] = {k: {"doc": v[0], "ok": v[1], "error": v[2]} for k, v in dispatch.available().items()}
    import os

    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(r, f, indent=1)
    print(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
