"""``make demo`` (``python -m hymba_plus.demo``): the library end to end on a CPU in seconds.

1. every tiny recipe in ``configs/`` is validated (``hymba check``) and described
   (``hymba info``: layer table, parameters, cache bytes);
2. each is built (untrained) and the DESIGN §1 invariant is shown: a random sequence fed
   in chunks through one cache gives the logits of one full forward, and cached greedy
   generation gives the tokens of re-running the full forward for every new token;
3. the full-size seed recipe is described on the meta device (nothing is allocated).

Training is added to this demo by the training stack (``hymba train``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .cli.check import check_file
from .cli.info import describe, format_info
from .core.recipe import Recipe, load_recipe
from .models.lm import build_model

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def rule(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)))


def tiny_recipes(folder: Path = CONFIGS) -> list[Path]:
    return sorted(p for p in folder.glob("*tiny*.yaml"))


def show(path: Path) -> Recipe:
    errors, summary = check_file(path)
    if errors:
        raise SystemExit("\n".join(errors))
    print(f"hymba check {path.name}: OK ({summary})")
    recipe = load_recipe(path)
    print(format_info(describe(recipe)))
    return recipe


def chunks(recipe: Recipe, length: int = 48, seed: int = 0) -> None:
    """Chunked cached logits vs one full forward (max |diff| / max |logit|)."""
    torch.manual_seed(seed)
    model = build_model(recipe).eval()
    ids = torch.randint(0, recipe.model.vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))
    bounds = [0, 1, 7, 8, length // 2, length]
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache(2)
        parts = [model(ids[:, a:b], cache=cache).logits for a, b in zip(bounds[:-1], bounds[1:])]
    err = float((torch.cat(parts, 1) - full).abs().max() / full.abs().max())
    sizes = "+".join(str(b - a) for a, b in zip(bounds[:-1], bounds[1:]))
    print(f"invariant {length} tokens in chunks {sizes} through one cache vs one full forward: "
          f"rel. error {err:.1e} ({'ok' if err <= 1e-4 else 'TOO LARGE'}, bound 1e-4)")
    if err > 1e-4:
        raise SystemExit(f"{recipe.name}: chunked logits differ from the full forward")


def generate(recipe: Recipe, prompt: str = "Hybrid language models mix ", new_tokens: int = 24,
             seed: int = 0) -> None:
    """Cached greedy generation from an untrained model, checked against full re-runs."""
    torch.manual_seed(seed)
    model = build_model(recipe).eval()
    V = recipe.model.vocab_size
    ids = torch.tensor([[b % V for b in prompt.encode()]])
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, temperature=0.0)
        t_cached = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = ids
        for _ in range(new_tokens):  # no cache: the whole sequence again for every token
            ref = torch.cat([ref, model(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
        t_full = time.perf_counter() - t0
    same = torch.equal(out, ref)
    new = out[0, ids.shape[1]:].tolist()
    text = bytes(t for t in new if 32 <= t < 127).decode() if V >= 128 else ""
    print(f"generate  {new_tokens} tokens greedily from the untrained {recipe.name}: "
          f"{new[:12]}{' ...' if len(new) > 12 else ''}")
    if text:
        print(f"          as bytes: {text!r} (untrained: noise)")
    print(f"          cached {t_cached * 1e3:.0f} ms vs full re-run {t_full * 1e3:.0f} ms; "
          f"same tokens: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(f"{recipe.name}: cached generation differs from the full forward re-run")


def _relative(path: Path) -> Path:
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hymba_plus.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=Path, default=CONFIGS, help="folder of recipes (default: configs/)")
    ap.add_argument("--new-tokens", type=int, default=24)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronization
    paths = tiny_recipes(args.configs)
    if not paths:
        print(f"no *tiny*.yaml recipes in {args.configs}", file=sys.stderr)
        return 2
    for path in paths:
        rule(f"{path.name}")
        recipe = show(_relative(path))
        chunks(recipe)
        generate(recipe, new_tokens=args.new_tokens)
    full = args.configs / "quad_hybrid_full.yaml"
    if full.exists():
        rule(f"{full.name} (meta device: nothing allocated)")
        r = load_recipe(full)
        d = describe(r, torch.bfloat16)
        print(f"{r.name}: {d['n_layers']} layers, d_model {d['d_model']}, pattern {d['pattern_compact']}")
        print(f"parameters total {d['params_total']:,}, active {d['params_active']:,} per token")
    rule("done")
    print("every recipe kept the invariant: chunked == full forward, cached generation == re-run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
