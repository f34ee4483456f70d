"""Where do our greedy tokens and HF's part ways? The side-by-side decode row's Qwen3-Next pair
(HF random init, ours imported through hymba_plus.convert: same weights), greedy decoding from
random prompts, and teacher-forced full forwards (no cache) that tell a decoding bug from
round-off:

* ``gen X / gen Y``: fraction of generated tokens two generate calls share;
* ``fwd X on gen Y``: the full forward of model X on the prompt + Y's tokens, argmax at every
  generated position == Y's token (a generate call agrees with its own model's full forward
  near 1.0 unless its cached path is wrong: round-off flips only near-ties);
* the top-1 / top-2 logit gap of HF's full forward at those positions (how many near-ties a
  bf16 run has) and the max |logit difference| of the two full forwards.

Ours runs with the decode engine (``auto``: the CUDA-graph engine on CUDA), the dynamic cache,
and the dynamic cache with ``HYMBA_KERNELS=reference`` (no fast path at all); then the static
engine with one decode-step fast path switched off at a time.

    python benchmarks/decode_agreement.py --device cuda --batch 4 --prompt 512 --new 16
    python benchmarks/decode_agreement.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import side_by_side as sbs  # noqa: E402 - benchmarks/side_by_side.py: the same model pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--tiny", action="store_true", help="side_by_side's tiny config (CPU)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    args.preset = sbs.TINY if args.tiny else sbs.FULL
    args.seq_len, args.prompts, args.new_tokens = args.prompt, [args.prompt], args.new  # the model's max length
    dtype = getattr(torch, args.dtype)
    with tempfile.TemporaryDirectory(prefix="hymba-agree-") as tmp:
        hf, ours = sbs.build_qwen3_next(args, dtype, Path(tmp))
    hf.eval()
    ours.eval()
    ids = sbs.batch_ids(args.preset["vocab"], args.batch, args.prompt, args.device, seed=1)
    P, n = args.prompt, args.new
    gens: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        gens["hf"] = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True,
                                 num_beams=1, attention_mask=torch.ones_like(ids))[:, P:]
        for name, engine, kernels in (("ours auto", "auto", "auto"), ("ours static", "static", "auto"),
                                      ("ours dynamic", "dynamic", "auto"),
                                      ("ours reference", "dynamic", "reference")):
            os.environ["HYMBA_KERNELS"] = kernels
            gens[name] = ours.generate(ids, max_new_tokens=n, engine=engine)[:, P:]
        os.environ["HYMBA_KERNELS"] = "auto"

        def fwd(model: torch.nn.Module, toks: torch.Tensor) -> torch.Tensor:
            full = torch.cat([ids, toks[:, :-1]], dim=1)
            if model is hf:
                return hf(input_ids=full, use_cache=False).logits[:, P - 1:].float()
            return ours(full).logits[:, P - 1:].float()

        rows = {}
        names = list(gens)
        for a in names:
            for b in names:
                if a < b:
                    rows[f"gen {a} / gen {b}"] = (gens[a] == gens[b]).float().mean().item()
        logits_hf_on_hf = fwd(hf, gens["hf"])
        logits_ours_on_hf = fwd(ours, gens["hf"])
        for who, lg in (("hf", logits_hf_on_hf), ("ours", logits_ours_on_hf)):
            rows[f"fwd {who} on gen hf"] = (lg.argmax(-1) == gens["hf"]).float().mean().item()
        for name in names[1:]:
            rows[f"fwd ours on gen {name}"] = (fwd(ours, gens[name]).argmax(-1) == gens[name]).float().mean().item()
        # one decode-step fast path off at a time (its probe result forced to "unavailable"):
        # the static engine's self-consistency without it
        from hymba_plus.kernels import dispatch

        for op in ("conv_update", "gdn_decode", "gated_rms_norm", "decode_attention", "moe_decode", "moe_router",
                   "rope", "rms_norm", "add_rms_norm", "cudnn_attention"):
            fp = dispatch._FAST.get(op)
            if fp is None or fp.status is not True:
                continue
            fp.status, fp.warned = False, True  # off, silently
            toks = ours.generate(ids, max_new_tokens=n, engine="static")[:, P:]
            fp.status = True
            rows[f"fwd ours on gen ours static without {op}"] = (fwd(ours, toks).argmax(-1) == toks).float().mean().item()
        rows["first token: gen ours auto == gen hf"] = (gens["ours auto"][:, 0] == gens["hf"][:, 0]).float().mean().item()
        top2 = logits_hf_on_hf.topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).flatten()
        diff = (logits_hf_on_hf - logits_ours_on_hf).abs()
        stats = {"median top1-top2 gap (hf fwd)": gap.median().item(),
                 "fraction of gaps < max |logit diff|": (gap < diff.amax(-1).flatten()).float().mean().item(),
                 "max |logit diff| hf vs ours fwd": diff.max().item(),
                 "logit std (hf fwd)": logits_hf_on_hf.std().item()}
    width = max(map(len, [*rows, *stats]))
    for k, v in {**rows, **stats}.items():
        print(f"  {k:<{width}}  {v:.4f}")
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": args.dtype, "batch": args.batch, "prompt": P, "new": n, "agreement": rows, "logits": stats}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
