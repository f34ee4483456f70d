"""Peak memory and time of one training step of a ``(GD+mlp)*24`` model (issue 18): forward +
backward + AdamW at batch 8 x 2048, vocabulary 32000, float32 weights under bf16 autocast
(``hymba train``'s CUDA precision), with and without each memory fix:

* ``fused loss``: the next-token loss from the hidden states and the head's weight
  (``forward(labels, return_logits=False)``, what ``hymba train`` does: Liger's fused linear
  cross entropy on CUDA, ``kernels/linear_ce.py``) instead of ``lm_loss`` over ``[B, T, V]``
  logits;
* ``split qkv``: gdn's q, k, v computed as three contiguous tensors when fla runs the kernel
  (``GatedDeltaNet.qkv``) instead of views of one projection that fla copies.

``--fla`` adds fla's ``GatedDeltaNetForCausalLM`` of the same shape (needs transformers), with
its fused linear cross entropy on and off. Each variant builds its model again from one seed,
runs ``--warmup`` steps (autotuning, optimizer state), then ``--steps`` timed steps; the peak is
``torch.cuda.max_memory_allocated`` over the timed steps (weights, gradients and AdamW states
included). Prints a table and writes JSON.

    python benchmarks/train_memory.py                          # GPU: the four variants
    python benchmarks/train_memory.py --fla --out benchmarks/results/train_memory_h200.json
    python benchmarks/train_memory.py --device cpu --tiny      # smoke test (no memory numbers)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from timing import device_arg, use_device, versions  # benchmarks/timing.py (scripts run from the repo root as files)

import hymba_plus.components.gdn as gdn_mod
from hymba_plus import build_model
from hymba_plus.kernels import dispatch
from hymba_plus.kernels.gdn import fla_selected

VARIANTS = {  # name -> (fused loss, split q/k/v)
    "unfused": (False, False),
    "fused loss": (True, False),
    "split qkv": (False, True),
    "both (default)": (True, True),
}


def recipe(args: argparse.Namespace) -> dict:
    return {
        "name": "issue18-gdn",
        "model": {"vocab_size": args.vocab, "d_model": args.d_model, "max_seq_len": args.seq_len,
                  "block_pattern": f"(GD+mlp)*{args.layers}", "meta_tokens": 0, "tie_embeddings": args.tie},
        "components": {"gdn": {"n_heads": args.heads, "head_dim": args.head_dim, "expand_v": args.expand_v},
                       "mlp": {"d_hidden": args.d_hidden}},
    }


@contextlib.contextmanager
def split_qkv(on: bool):
    """gdn's choice of the split path: as dispatched (on) or never (off)."""
    orig = gdn_mod.fla_selected
    if not on:
        gdn_mod.fla_selected = lambda *a, **k: False
    try:
        yield
    finally:
        gdn_mod.fla_selected = orig


def measure(make: Callable[[], torch.nn.Module], loss_of: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
            ids: torch.Tensor, args: argparse.Namespace) -> dict:
    dev = ids.device
    torch.manual_seed(0)
    model = make().to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=dev.type == "cuda")
    amp = (torch.autocast(dev.type, dtype=torch.bfloat16) if dev.type == "cuda" else contextlib.nullcontext())

    def step() -> torch.Tensor:
        with amp:
            loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    for _ in range(args.warmup):
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if cuda:
        torch.cuda.synchronize(dev)
    ms = (time.perf_counter() - t0) * 1e3 / args.steps
    res = {"params": n_params, "step_ms": ms, "tokens_per_s": ids.numel() / ms * 1e3, "loss": float(loss),
           "peak_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if cuda else None,
           "reserved_gib": torch.cuda.max_memory_reserved(dev) / 2**30 if cuda else None}
    return res


def release() -> None:
    """Free the previous variant's model, gradients and optimizer state before the next."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def fla_model(args: argparse.Namespace, fused: bool) -> Callable[[], torch.nn.Module]:
    from fla.models import GatedDeltaNetConfig, GatedDeltaNetForCausalLM

    cfg = GatedDeltaNetConfig(hidden_size=args.d_model, num_hidden_layers=args.layers, num_heads=args.heads,
                              head_dim=args.head_dim, expand_v=args.expand_v, intermediate_size=args.d_hidden,
                              vocab_size=args.vocab, max_position_embeddings=args.seq_len,
                              tie_word_embeddings=args.tie, fuse_linear_cross_entropy=fused)
    return lambda: GatedDeltaNetForCausalLM(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--expand-v", type=float, default=2.0)
    ap.add_argument("--d-hidden", type=int, default=2816, help="SwiGLU width (fla: hidden_ratio 4 -> 2816 at d 1024)")
    ap.add_argument("--tie", action="store_true", help="tied embeddings (fla's default is untied)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--fla", action="store_true", help="also fla's GatedDeltaNetForCausalLM (fused linear CE on/off)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--tiny", action="store_true", help="d 64, 2 layers, vocab 256, batch 2 x 64 (a CPU smoke run)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    for key, low in (("steps", 1), ("warmup", 0), ("batch", 1), ("seq_len", 2), ("vocab", 1), ("d_model", 1),
                     ("layers", 1), ("heads", 1), ("head_dim", 1), ("d_hidden", 1)):
        if getattr(args, key) < low:  # --steps 0 divided by zero after the warm-up steps
            ap.error(f"--{key.replace('_', '-')} must be >= {low}, got {getattr(args, key)}")
    if not args.expand_v > 0:
        ap.error(f"--expand-v must be > 0, got {args.expand_v}")
    if args.tiny:
        args.d_model, args.layers, args.heads, args.head_dim, args.d_hidden = 64, 2, 2, 32, 128
        args.vocab, args.batch, args.seq_len = 256, 2, 64
    use_device(args.device)  # cuda:N current (fla's kernels and the allocator calls without a device)
    dev = torch.device(args.device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), device=dev)
    x = torch.zeros(1, device=dev)
    dv = int(round(args.head_dim * args.expand_v))
    gdn_kernel = "fla" if fla_selected(torch.bfloat16, args.head_dim, dv, x) else "reference"
    ce_kernel = "Liger" if dispatch.use_fast("linear_cross_entropy", x) else "chunked reference"
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}: (GD+mlp)*{args.layers}, d {args.d_model}, gdn {args.heads} x {args.head_dim} (dv {dv}), "
          f"batch {args.batch} x {args.seq_len}, vocab {args.vocab}; gdn kernel: {gdn_kernel}, fused loss: {ce_kernel}",
          flush=True)
    rows = {}
    for v in args.variants:
        fused, split = VARIANTS[v]
        with split_qkv(split):
            rows[v] = measure(lambda: build_model(recipe(args)),
                              lambda m, i, f=fused: m(i, labels=i, return_logits=not f, check_inputs=False).loss,
                              ids, args)
        release()
        print(v, rows[v], flush=True)
    if args.fla:
        for fused in (True, False):
            v = f"fla{' fused linear CE' if fused else ''}"
            rows[v] = measure(fla_model(args, fused), lambda m, i: m(input_ids=i, labels=i).loss, ids, args)
            release()
            print(v, rows[v], flush=True)
    print("\n| variant | params | peak GiB | step ms | tokens/s |\n|---|---|---|---|---|")
    for v, r in rows.items():
        peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
        print(f"| {v} | {r['params'] / 1e6:.1f}M | {peak} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": name, "versions": versions(), "args": {k: str(v) for k, v in vars(args).items()},
                                        "gdn_kernel": gdn_kernel, "fused_loss_kernel": ce_kernel, "results": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
