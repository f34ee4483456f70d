"""``make demo`` (``python -m hymba_plus.demo``): the library end to end on a CPU, in a few minutes.

Part 1, the tour (seconds): every tiny recipe in ``configs/`` is validated (``hymba
check``), described (``hymba info``), built, and the DESIGN §1 invariant is shown (a
sequence fed in chunks through one cache gives the logits of one full forward; cached
greedy generation gives the tokens of re-running the full forward); the full-size seed
recipe is described on the meta device.

Part 2, the main job (issue 5 §7, about 2-3 minutes on 2 cores): a tiny Quad-Hybrid —
Gated DeltaNet, gated attention with a sparse MoE channel mixer, ATLAS memory, Mamba-3,
meta tokens — is trained by the ``hymba train`` stack (Muon + AdamW, cosine schedule,
checkpoints, ``metrics.jsonl``, ``loss.png``) on MQAR associative recall; its recall
accuracy is printed at every eval (chance is 1/16), then the checkpoint is loaded back
and asked to recall values with ``hymba generate``.

Why this recipe and not ``configs/quad_hybrid_tiny.yaml``: that one (d_model 128, ATLAS
with degree-2 features of 32-dim heads, 6 layers) takes seconds per step on a CPU. The
demo model is sized for the 5-minute bound (ATLAS degree-1 features of 16-dim heads;
4 layers, ~0.4 s per step of 64 sequences on one core) and puts attention second: on
this budget the early attention layer forms the recall circuit fastest (measured: the
seed order ``ATL | M3 | GD | GA+moe`` sat near the 50% "answer the last query by
elimination" plateau for 300 steps, ``GD | GA+moe | ATL | M3`` passes 90% by step 150).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from .cli import finite_float, seed_int
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
    result = check_file(path)
    if result.errors:
        raise SystemExit("\n".join(result.errors))
    print(f"hymba check {path.name}: OK ({result.summary})" + (f": {result.layout}" if result.layout else ""))
    recipe = load_recipe(path)
    print(format_info(describe(recipe), kernels="summary"))  # the kernel table: hymba info --kernels
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


def forecast_chunks(recipe: Recipe, seed: int = 0) -> None:
    """A forecast recipe (``objective: forecast``): patches of a series through one cache in
    chunks vs one full forward, and the cached roll-out past the horizon vs full re-runs."""
    from .training.forecast_metrics import point_forecast

    torch.manual_seed(seed)
    model = build_model(recipe).eval()
    obj = model.objective
    cfg = obj.cfg
    n = cfg.n_patches + 4
    x = torch.randn(2, n * cfg.patch, cfg.channels, generator=torch.Generator().manual_seed(seed)).cumsum(1)
    with torch.no_grad():
        mu, sigma = obj.ts_head.stats(x[:, :cfg.context])
        full, _ = obj.patch_outputs(model, x, mu, sigma)
        cache = model.new_cache(2 * cfg.channels if cfg.channel_independent else 2)
        bounds = [0, 1, cfg.n_patches, cfg.n_patches + 1, n]
        parts = [obj.patch_outputs(model, x[:, a * cfg.patch:b * cfg.patch], mu, sigma, cache=cache)[0]
                 for a, b in zip(bounds[:-1], bounds[1:])]
        err = float((torch.cat(parts, 1) - full).abs().max() / full.abs().max())
        steps = 2 * cfg.horizon
        out = model.generate(x[:, :cfg.context], max_new_tokens=steps, mode="forecast")
        seq, ref = x[:, :cfg.context], []
        while sum(r.shape[1] for r in ref) < steps:  # no cache: the grown sequence again every round
            pred = obj.values(obj.patch_outputs(model, seq, mu, sigma)[0][:, -1], mu, sigma)
            k = (cfg.horizon // cfg.patch) * cfg.patch
            ref.append(pred[:, :k])
            seq = torch.cat([seq, point_forecast(pred[:, :k], obj.levels)], 1)
        roll = float((out - torch.cat(ref, 1)[:, :steps]).abs().max() / out.abs().max())
    sizes = "+".join(str(b - a) for a, b in zip(bounds[:-1], bounds[1:]))
    print(f"invariant {n} patches of {cfg.patch} values in chunks {sizes} through one cache vs one full forward: "
          f"rel. error {err:.1e} ({'ok' if err <= 1e-4 else 'TOO LARGE'}, bound 1e-4)")
    print(f"forecast  {steps} steps (twice the horizon) from the untrained {recipe.name}, rolled through the cache "
          f"vs full re-runs: rel. error {roll:.1e}")
    if err > 1e-4 or roll > 1e-4:
        raise SystemExit(f"{recipe.name}: cached forecasts differ from the full forward")


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


def tour(configs: Path, new_tokens: int) -> int:
    """Part 1: check, info, invariant and cached generation of every tiny recipe."""
    paths = tiny_recipes(configs)
    if not paths:
        print(f"no *tiny*.yaml recipes in {configs}", file=sys.stderr)
        return 2
    for path in paths:
        rule(f"{path.name}")
        recipe = show(_relative(path))
        if not recipe.reads_tokens:  # a forecaster: patches of numbers, not tokens
            forecast_chunks(recipe)
            continue
        chunks(recipe)
        generate(recipe, new_tokens=new_tokens)
    full = configs / "quad_hybrid_full.yaml"
    if full.exists():
        rule(f"{full.name} (meta device: nothing allocated)")
        r = load_recipe(full)
        d = describe(r, torch.bfloat16)
        print(f"{r.name}: {d['n_layers']} layers, d_model {d['d_model']}, "
              f"{r.layout_line or 'pattern ' + d['pattern_compact']}")
        print(f"parameters total {d['params_total']:,}, active {d['params_active']:,} per token")
    print("\nevery recipe kept the invariant: chunked == full forward, cached generation == re-run")
    return 0


# --------------------------------------------------------------------------- part 2: train


#: the demo's Quad-Hybrid (see the module docstring for its size and layer order)
DEMO_COMPONENTS = {
    "gdn": {"n_heads": 2, "head_dim": 32},
    "gated_attn": {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16},
    "atlas": {"n_heads": 2, "head_dim": 16, "poly_degree": 1, "inner_optimizer": "muon"},
    "mamba3": {"state_size": 16, "head_dim": 16, "expand": 2},
    "moe": {"n_experts": 4, "top_k": 2, "n_shared": 1, "d_expert": 64},
    "mlp": {"d_hidden": 128},
}
DEMO_LAYERS = ("GD", "GA+moe", "ATL", "M3")
DEMO_TRAIN = {"steps": 300, "batch_size": 64, "seq_len": 16, "mqar_pairs": 4, "warmup_steps": 20,
              "eval_every": 25, "eval_batches": 4, "save_every": 100, "keep_last": 2, "data": "mqar"}


def demo_recipe(seed: int = 0, steps: int | None = None) -> dict:
    """The demo recipe as a dict, using whichever of its components are registered."""
    from .core import registry

    have = set(registry.names())
    layers = []
    for tok in DEMO_LAYERS:
        mixer, _, ffn = tok.partition("+")
        name = registry.aliases().get(mixer)
        if name is None:  # a mixer not registered in this build: skip it
            continue
        if ffn and ffn not in have:
            tok = mixer
        layers.append(tok)
    if not any(t.startswith("GA") for t in layers):
        layers.append("GA")
    comps = {k: v for k, v in DEMO_COMPONENTS.items() if k in have}
    train = dict(DEMO_TRAIN, seed=seed)
    if steps is not None:
        train["steps"] = steps
        train["save_every"] = min(train["save_every"], steps)
    return {"name": "quad-hybrid-demo",
            "model": {"vocab_size": 32, "d_model": 64, "max_seq_len": 64, "block_pattern": " | ".join(layers),
                      "ffn": "mlp", "meta_tokens": 4},
            "components": comps, "train": train}


def _fresh_out(out: Path) -> None:
    """Start ``out`` empty: a previous demo run there is removed, anything else is kept."""
    if out.exists() and any(out.iterdir()):
        if not (out / "demo.json").is_file():
            raise SystemExit(f"{out}: exists and was not written by the demo; pass another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps({"written_by": "python -m hymba_plus.demo"}))


def train_demo(out: Path, seed: int, steps: int | None, time_limit: float) -> tuple[int, float, float, Path]:
    """Part 2: train the demo model on MQAR; returns (steps, final accuracy, chance, checkpoint)."""
    import yaml

    from .training.config import TrainConfig
    from .training.tasks import TASKS
    from .training.trainer import RunOptions, train

    _fresh_out(out)
    recipe_dict = demo_recipe(seed, steps)
    recipe_path = out / "quad_hybrid_demo.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe_dict, sort_keys=False))
    recipe = load_recipe(recipe_path)
    cfg = recipe.train
    assert isinstance(cfg, TrainConfig)
    d = describe(recipe)
    chance = TASKS["mqar"].chance(recipe.model.vocab_size, cfg)
    print(f"recipe   {recipe_path} (written by the demo; `hymba train` reads the same file)")
    print(f"model    {recipe.name}: pattern {recipe.pattern}, d_model {recipe.model.d_model}, "
          f"{recipe.model.meta_tokens} meta tokens, {d['params_total']:,} parameters ({d['params_active']:,} active)")
    print(f"task     MQAR: {cfg.mqar_pairs} key/value pairs, then the keys again; the model must recall each "
          f"value (keys 1..{recipe.model.vocab_size // 2 - 1}, values {recipe.model.vocab_size // 2}.."
          f"{recipe.model.vocab_size - 1}: chance {chance:.4f}; guessing among the {cfg.mqar_pairs} values "
          f"in the sequence: {1 / cfg.mqar_pairs:.2f})")
    print(f"training {cfg.steps} steps x {cfg.batch_size} sequences of {cfg.seq_len} tokens, Muon + AdamW, "
          f"cosine schedule; eval every {cfg.eval_every} steps (time limit {time_limit:.0f}s)\n", flush=True)
    t0 = time.perf_counter()
    summary = train(recipe, cfg, RunOptions(out=out, time_limit=time_limit, recipe_name=str(recipe_path)))
    sys.stderr.flush()
    seconds = time.perf_counter() - t0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    print(f"\nrecall accuracy on held-out sequences (chance {chance:.3f}):")
    for r in evals:
        acc = r["eval_accuracy"]
        print(f"  step {r['step']:>4}  loss {r['loss']:.3f}  accuracy {acc:5.3f}  {'#' * round(acc * 40)}")
    final = evals[-1]["eval_accuracy"] if evals else 0.0
    print(f"\n{summary.line()}")
    print(f"trained in {seconds:.0f}s; loss plot {out / 'loss.png'}; metrics {out / 'metrics.jsonl'}")
    ckpt = summary.checkpoint or out
    return summary.steps, final, chance, Path(ckpt)


def recall_from_checkpoint(ckpt: Path, n: int = 16, seed: int = 0) -> float:
    """Load the checkpoint as ``hymba generate`` does and let it recall values."""
    from .cli import main as cli_main
    from .models.lm import from_pretrained
    from .training.config import TrainConfig
    from .training.tasks import TASKS

    model = from_pretrained(ckpt).eval()
    print(f"from_pretrained({ckpt}): the checkpoint recalls values it never saw in training")
    saved = model.recipe.train or TrainConfig()
    V, pairs = model.config.vocab_size, saved.mqar_pairs or 4
    ids, labels = TASKS["mqar"].batch(range(20_000, 20_512), seed + 7, saved.seq_len, V, saved, stream=1)
    with torch.no_grad():
        pred = model(ids).logits[:, :-1].argmax(-1)
    per_query = [float((pred[:, t] == labels[:, t + 1]).float().mean()) for t in range(2 * pairs, 4 * pairs, 2)]
    print(f"accuracy by query on 512 new sequences: {', '.join(f'{a:.3f}' for a in per_query)} (the first query "
          "cannot be answered by elimination: it is pure recall)")
    ids, _ = TASKS["mqar"].batch(range(10_000, 10_000 + n), seed + 7, saved.seq_len, V, saved, stream=1)
    prompts = ids[:, : 2 * pairs + 1]  # the pairs, then the first query key
    truth = ids[:, 2 * pairs + 1]
    with torch.no_grad():
        out = model.generate(prompts, max_new_tokens=1, temperature=0.0)
    got = out[:, -1]
    correct = int((got == truth).sum())
    print("generate (greedy, one new token after the first query key):")
    for i in range(min(n, 4)):
        row = prompts[i].tolist()
        kv = " ".join(f"{k}->{v}" for k, v in zip(row[0 : 2 * pairs : 2], row[1 : 2 * pairs : 2]))
        ok = "ok" if int(got[i]) == int(truth[i]) else "WRONG"
        print(f"  pairs {kv} | query {row[-1]:>2} -> model {int(got[i]):>2} (true {int(truth[i]):>2}) {ok}")
    print(f"  {correct}/{n} recalled correctly")
    prompt = " ".join(str(t) for t in prompts[0].tolist())
    cmd = ["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "1", "--temperature", "0"]
    print(f"\n$ hymba {' '.join(cmd[:2])} --prompt '{prompt}' --max-new-tokens 1 --temperature 0")
    cli_main(cmd)
    return correct / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hymba_plus.demo", description=__doc__.splitlines()[0])
    ap.add_argument("--configs", type=Path, default=CONFIGS, help="folder of recipes (default: configs/)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--out", type=Path, default=Path("runs/demo"), help="training output (default: runs/demo)")
    ap.add_argument("--steps", type=int, default=None, help=f"training steps (default {DEMO_TRAIN['steps']})")
    ap.add_argument("--time-limit", type=finite_float, default=210.0,
                    help="stop training (eval + checkpoint) after this many seconds (default 210)")
    ap.add_argument("--seed", type=seed_int, default=0)
    ap.add_argument("--no-tour", action="store_true", help="skip part 1 (check / info / invariant)")
    ap.add_argument("--no-train", action="store_true", help="skip part 2 (training and generation)")
    args = ap.parse_args(argv)
    # checked as `hymba train` checks them, before a previous demo run in --out is removed
    if args.steps is not None and args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    if args.time_limit <= 0:
        ap.error(f"--time-limit {args.time_limit:g}: must be > 0")
    if args.new_tokens < 1:
        ap.error(f"--new-tokens {args.new_tokens}: must be >= 1")
    torch.set_num_threads(1)  # tiny tensors: extra threads only add synchronization
    t_start = time.perf_counter()
    if not args.no_tour:
        rule("part 1: recipes, the invariant, cached generation")
        rc = tour(args.configs, args.new_tokens)
        if rc:
            return rc
    if args.no_train:
        rule("done")
        return 0
    rule("part 2: train a tiny Quad-Hybrid on associative recall (MQAR)")
    steps, acc, chance, ckpt = train_demo(args.out, args.seed, args.steps, args.time_limit)
    rule("generate from the trained checkpoint")
    recall = recall_from_checkpoint(ckpt, seed=args.seed)
    rule("done")
    print(f"recall accuracy {acc:.3f} after {steps} steps (chance {chance:.3f}, {acc / chance:.0f}x); "
          f"{recall:.0%} of generated answers right; total {time.perf_counter() - t_start:.0f}s")
    print(f"continue training: hymba train {args.out / 'quad_hybrid_demo.yaml'} --out {args.out} --resume "
          f"--steps 600")
    return 0 if acc >= 4 * chance else 1


if __name__ == "__main__":
    sys.exit(main())
