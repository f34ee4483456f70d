"""Kernels launched by one decode step, counted on the CPU: the reference path against the
decode-step fast paths (issue 18), with those fast paths' Triton kernels run by Triton's CPU
interpreter. A captured decode step is bound by its kernel count (benchmarks/decode.py's
profile: ~800 kernels per step on an H200 before the decode-step kernels), so this is a
device-independent measure of what they remove.

    python benchmarks/decode_kernel_count.py                 # the decode.py recipe at width 128 (~5 min
                                                             # on a 2-core CPU: the Triton interpreter)
    python benchmarks/decode_kernel_count.py --out /tmp/count.json

Counted: every ATen op that launches a kernel (views, shape queries and allocations excluded),
attributed to the innermost module (a projection's GEMM to the module that calls it, e.g.
``mm`` of GatedDeltaNet), plus every Triton launch; one static-engine step (the step the decode
engine captures, with its packed projections) at batch 16 after a 40-token prompt. On a GPU some of the CPU
ops are single kernels (the fused RMSNorm is one kernel there, pow / mean / rsqrt / mul here;
``promote_types`` launches nothing), so the table also lists them by module.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
from decode import QWEN3_NEXT_LIKE  # noqa: E402 - benchmarks/decode.py (scripts run from the repo root as files)
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

#: ops that launch no kernel of their own (views, metadata, allocation)
NO_KERNEL = {"view", "t", "slice", "unsqueeze", "permute", "select", "transpose", "detach", "_unsafe_view", "expand",
             "as_strided", "alias", "squeeze", "reshape", "unflatten", "split", "chunk", "split_with_sizes",
             "unbind", "flatten", "lift_fresh", "_reshape_alias", "view_as", "empty", "empty_like",
             "empty_strided", "new_empty", "is_same_size", "sym_size", "promote_types"}
#: the fast paths of a decode step whose implementations run on the CPU (Triton interpreter)
DECODE_FAST = ("conv_update", "gdn_decode", "gated_rms_norm", "decode_attention", "moe_decode", "moe_router",
               "rope", "mamba3_step", "add_rms_norm")


def count_step(model, fast: set[str], batch: int, prompt: int) -> dict:
    import triton.runtime.interpreter as interp

    from hymba_plus.kernels import dispatch
    from hymba_plus.models.decode_engine import DecodeEngine

    stack: list[str] = []
    # no hooks on nn.Linear: a hooked projection runs on its own (kernels.linear.project), and the
    # engine's packed projections would not be counted as they run; their GEMMs count in the parent
    hooks = [h for m in model.modules() if type(m) is not torch.nn.Linear for h in (
        m.register_forward_pre_hook(lambda mod, *a: stack.append(type(mod).__name__)),
        m.register_forward_hook(lambda mod, *a: (stack.pop(), None)[1]))]
    by: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    inside = [0]
    run = interp.InterpretedFunction.run

    def counted_run(self, *a, **k):  # noqa: ANN001, ANN202
        by[stack[-1] if stack else "-"]["triton:" + getattr(self.fn, "__name__", "?")] += 1
        inside[0] += 1
        try:
            return run(self, *a, **k)
        finally:
            inside[0] -= 1

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            name = func.overloadpacket.__name__
            if not inside[0] and name not in NO_KERNEL:
                by[stack[-1] if stack else "-"][name] += 1
            return func(*args, **(kwargs or {}))

    real = dispatch.use_fast
    dispatch.use_fast = lambda name, *t: name in fast  # noqa: E731
    interp.InterpretedFunction.run = counted_run
    try:
        V = model.config.vocab_size
        ids = torch.randint(0, V, (batch, prompt), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            cache = model.new_cache(batch)
            model(ids, cache=cache, logits_to_keep=1)
            eng = DecodeEngine(model, batch, 256, torch.device("cpu"), graph=False)
            eng.load(cache)
            eng.step(ids[:, -1])  # first step: probes and lazy setup
            stack.clear()
            by.clear()
            with Count():
                eng.step(ids[:, -1])
    finally:
        dispatch.use_fast = real
        interp.InterpretedFunction.run = run
        for h in hooks:
            h.remove()
    total = sum(sum(c.values()) for c in by.values())
    triton = sum(n for c in by.values() for k, n in c.items() if k.startswith("triton:"))
    return {"kernels": total, "triton_launches": triton,
            "by_module": {m: dict(c.most_common()) for m, c in sorted(by.items(), key=lambda kv: -sum(kv[1].values()))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=128, help="width (the recipe's layout and expert count are kept)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from hymba_plus import build_model, load_recipe

    r = copy.deepcopy(QWEN3_NEXT_LIKE)
    r["model"].update(d_model=args.d_model, vocab_size=512, max_seq_len=512)
    r["components"]["gdn"].update(n_heads=2, n_v_heads=4, head_dim=32)
    r["components"]["gated_attn"].update(head_dim=32)
    r["components"]["moe"].update(d_expert=32)
    torch.manual_seed(0)
    model = build_model(load_recipe(r)).eval()
    result = {"recipe": r["model"]["block_pattern"], "d_model": args.d_model, "batch": args.batch,
              "rows": {"reference": count_step(model, set(), args.batch, args.prompt),
                       "decode fast paths": count_step(model, set(DECODE_FAST), args.batch, args.prompt)}}
    for name, row in result["rows"].items():
        print(f"{name:>18}: {row['kernels']:5d} kernels per step ({row['triton_launches']} Triton launches)")
        for mod, ops in list(row["by_module"].items())[:8]:
            print(f"{'':>20}{mod:<16} {sum(ops.values()):5d}  " + ", ".join(f"{k} {v}" for k, v in list(ops.items())[:8]))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
