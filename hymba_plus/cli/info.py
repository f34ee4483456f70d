"""``hymba info RECIPE``: what a recipe builds, without allocating it.

Prints the resolved flat pattern (a ratio layout: the layers it resolves to and what was
rounded, on one line), one row per layer (mixer, ffn, parameters, cache bytes per
sequence), parameters total and active (MoE: only the routed experts a token uses), cache
bytes per sequence at 1k and 32k tokens (a note names the lengths past the recipe's
``max_seq_len``; an MTP recipe: its modules' own cache for speculative decoding on a line of
its own), and the fast kernels: one line without CUDA
(``fast paths: atlas_cpu (CPU: reference paths for the rest)``), a short table with it, every op with its
fast path and why it is unavailable with ``--kernels`` (under ``HYMBA_KERNELS=reference``: each off
by the setting, and nothing probed; an op named in ``HYMBA_KERNELS_OFF``: ``off (HYMBA_KERNELS_OFF)``,
unprobed).

The model is built on the meta device (``torch.device("meta")``): every shape is real,
no memory is allocated, so full-size recipes (40 layers, d_model 2048, 512 experts) are
instant. State sizes come from each mixer's ``state_nbytes(seq_len, dtype, n_meta=)``
(see docs/CONTRIBUTING.md, the mixer contract); a mixer without it shows ``n/a``.

ETD recipes (``model.etd``, models/etd.py) add a ``stage`` column (encoder / think /
decoder), an ``etd_router`` row (halting unit, Dr.LLM routers, MoDr LoRA branches: the
think blocks' weights are tied and counted once) and the per-application view: layer
applications per forward (``E + T x iterations + D``, and at ``max_iterations``) and the
cache bytes of every think iteration — each (layer, iteration) application has its own
state. ``cache`` is then what a real cache holds after ``max_iterations`` think iterations
(and after ``iterations``; null under ACT halting, where it sizes nothing), every slot applied once (all-execute routes). ``new_cache``
allocates a state for every slot up front, a Dr.LLM slot's repeat state included, so a slot no
token reaches still counts its empty size: a recurrent mixer's full fixed-size state, nothing
for attention (whose states grow with the tokens an application sees). A Dr.LLM *repeat* fills
its slot's second state, so at worst (every slot repeated) the cache is twice the states of
every slot applied. ``--json`` gains an ``etd`` object.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import shlex
from pathlib import Path
from typing import Any

import torch

from . import add_set_argument, check_sets, load_recipe_with_sets, path_text

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_LENS = (1024, 32768)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", type=path_text, metavar="RECIPE", help="a recipe file")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the cached tensors (default float32, what build_model gives)")
    p.add_argument("--seq-lens", default=",".join(map(str, DEFAULT_LENS)), metavar="N,N",
                   help="sequence lengths for the cache columns (default 1024,32768)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--kernels", action="store_true",
                   help="list every fast path, what it is and why it is unavailable (default: one line "
                        "without CUDA, a short table with it)")
    add_set_argument(p)


def mixer_state_nbytes(mixer: Any, seq_len: int, dtype: torch.dtype, n_meta: int = 0) -> int | None:
    """One sequence's state bytes for a mixer module after ``seq_len`` tokens, or None
    when the component does not implement ``state_nbytes``."""
    if mixer is None:
        return 0
    fn = getattr(mixer, "state_nbytes", None)
    if fn is None:
        return None
    params = inspect.signature(fn).parameters
    takes_meta = "n_meta" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    return int(fn(seq_len, dtype, n_meta=n_meta) if takes_meta else fn(seq_len, dtype))


def _numel(module: torch.nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


def _active(module: torch.nn.Module | None) -> int:
    """Parameters a token uses in ``module``: all of them but what its sparse submodules (those
    with ``active_parameters``, ``module`` itself included: MoE) leave unused."""
    if module is None:
        return 0
    act = getattr(module, "active_parameters", None)
    if act is not None:
        return int(act() if callable(act) else act)
    return _numel(module) - sum(_numel(m) - _active(m) for m in module.modules()
                                if m is not module and getattr(m, "active_parameters", None) is not None)


def describe(recipe: Any, dtype: torch.dtype = torch.float32, seq_lens: tuple[int, ...] = DEFAULT_LENS,
             probe: bool = True) -> dict:
    """Everything ``hymba info`` prints, as a dict (built on the meta device). ``probe=False``: its
    ``kernels`` are left out, so that no fast path's probe runs (``dispatch.available`` runs them all, compiles
    included: minutes of TileLang on a fresh GPU machine for ops a recipe may not use)."""
    from ..core.pattern import format_pattern
    from ..kernels import dispatch
    from ..models.lm import HybridLM

    with torch.device("meta"):
        model = HybridLM(recipe)
    m = recipe.model
    n_meta = m.meta_tokens
    stages = etd_stages(m.etd, len(model.blocks)) if m.etd is not None else None
    layers = []
    for i, block in enumerate(model.blocks):
        total = _numel(block)
        active = total - (_numel(block.mixer) - _active(block.mixer)) - (_numel(block.ffn) - _active(block.ffn))
        state = {str(n): mixer_state_nbytes(block.mixer, n, dtype, n_meta) for n in seq_lens}
        row = {"index": i, "mixer": block.spec.mixer, "ffn": block.spec.ffn,
               "params": total, "active_params": active, "state_bytes": state}
        if stages is not None:
            row = {"index": i, "stage": stages[i], **{k: v for k, v in row.items() if k != "index"}}
        layers.append(row)
    total = _numel(model)
    router, router_active = _numel(model.etd_router), router_active_params(model.etd_router)
    mtp, ladir = _numel(model.mtp), _numel(model.ladir)
    mtp_active, ladir_active = _active(model.mtp), _active(model.ladir)
    other = total - sum(r["params"] for r in layers) - router - mtp - ladir
    active = other + sum(r["active_params"] for r in layers) + router_active + mtp_active + ladir_active
    etd = None
    if m.etd is not None:
        etd = describe_etd(recipe, model, layers, seq_lens, router, router_active, dtype)
        cache, known = etd["cache_bytes"]["max_iterations"], etd["cache_bytes_known"]["max_iterations"]
    else:
        cache, known = _sum_states([r["state_bytes"] for r in layers], seq_lens)
    mtp_cache = None
    if model.mtp is not None:  # speculative MTP decoding's own cache (mtp.new_cache): after n tokens
        # module i (1-based) holds the n + 1 - i positions whose inputs are known; no meta tokens
        mtp_cache = _sum_states([{str(n): mixer_state_nbytes(b.mixer, max(n + 1 - i, 0), dtype) for n in seq_lens}
                                 for i, b in enumerate(model.mtp.blocks, 1)], seq_lens)
    kernels = {op: {"fast_path": doc, "available": ok, "error": err, "device": dispatch.device_of(op)}
               for op, (doc, ok, err) in dispatch.available().items()} if probe else None
    layout = None
    if m.layout is not None:
        from ..core.pattern import layout_rounding, ratio_counts

        ratios = dict(m.layout.ratios)
        layout = {"n_layers": m.layout.n_layers, "ratios": ratios,
                  "counts": ratio_counts(m.layout.n_layers, ratios),
                  "rounding": [str(r) for r in layout_rounding(m.layout.n_layers, ratios)],
                  "line": recipe.layout_line}
    return {
        "name": recipe.name, "source": recipe.source, "hash": recipe.hash(),
        "pattern": format_pattern(list(recipe.layers)),
        "pattern_compact": compact_pattern([s.token() for s in recipe.layers]), "n_layers": len(layers),
        "layout": layout,
        "vocab_size": m.vocab_size, "d_model": m.d_model, "max_seq_len": m.max_seq_len,
        "past_max_seq_len": [n for n in seq_lens if m.max_seq_len is not None and n > m.max_seq_len],
        "meta_tokens": n_meta, "tie_embeddings": m.tie_embeddings,
        "layers": layers, "other_params": other,
        "params_total": total, "params_active": active,
        "cache_dtype": str(dtype).replace("torch.", ""), "cache_bytes": cache, "cache_bytes_known": known,
        "missing_state_nbytes": sorted({r["mixer"] for r in layers
                                        if any(v is None for v in r["state_bytes"].values())}),
        "kernel_mode": dispatch.mode(), "cuda": cuda_available(), "kernels": kernels,
        **({"etd": etd} if etd is not None else {}),
        "objective": _objective(recipe),
        "conventions": conventions(recipe),
        **({"mtp": {**dataclasses.asdict(m.mtp), "params": mtp, "active_params": mtp_active,
                    "cache_bytes": mtp_cache[0], "cache_bytes_known": mtp_cache[1]}}
           if m.mtp is not None else {}),
        **({"ladir": {**dataclasses.asdict(recipe.ladir), "params": ladir, "active_params": ladir_active}}
           if recipe.ladir is not None else {}),
    }


def conventions(recipe: Any) -> list[str]:
    """The norm and loss conventions a recipe sets away from the defaults (imported HF models
    do): q/k norm scale and eps, gdn's gated-norm scale, the MoE balancing loss."""
    used = {s.mixer for s in recipe.layers} | {s.ffn for s in recipe.layers}
    out = []
    if "gated_attn" in used:
        a = recipe.component("gated_attn")
        if a.qk_norm and (a.qk_norm_eps is not None or a.qk_norm_zero_centered is not None):
            scale = "w" if a.qk_norm_zero_centered is False else "1 + w"
            out.append(f"q/k norm scale {scale}, eps {a.qk_norm_eps or 1e-6:g}")
    if "gdn" in used and recipe.component("gdn").norm_zero_centered is not None:
        out.append(f"gdn gated norm scale {'w' if recipe.component('gdn').norm_zero_centered is False else '1 + w'}")
    if "moe" in used and recipe.component("moe").balance_loss is not None:
        c = recipe.component("moe")
        how = {"pooled": "pooled over layers (HF), ", "global_batch": "per layer over the global batch, "}
        out.append("moe balance loss " + how.get(c.balance_loss, "per layer, ") + f"coef {c.aux_loss_coef:g}")
    return out


def _objective(recipe: Any) -> dict:
    """The training objective: its kind and settings (``next_token`` when the recipe has none)."""
    obj = recipe.objective
    if obj is None:
        return {"kind": "next_token"}
    d = dataclasses.asdict(obj)
    if hasattr(obj, "describe"):  # the objective's own one-line summary (forecast)
        d["line"] = obj.describe()
    return d


def ladir_line(lad: dict) -> str:
    """``ladir       3 memory slots x latent 128; flow: 50 Euler steps, 1 sample; Prophet 7.5/5/2.5``."""
    p = lad["prophet"]
    prophet = ("Prophet " + "/".join(f"{t:g}" for t in p["thresholds"]) + f" every {p['check_every']}"
               if p["enabled"] else "Prophet off")
    return (f"ladir       {lad['memory_slots']} memory slots x latent {lad['latent_dim']} (beta_kl {lad['beta_kl']:g}); "
            f"flow: {lad['denoiser_layers']}-layer denoiser, {lad['inference_steps']} Euler steps, "
            f"{lad['samples']} sample(s); {prophet}")


def objective_line(obj: dict) -> str:
    """``objective   block_diffusion: block 16, log_linear schedule, clip [0.3, 0.8], [MASK] id 256``."""
    if "line" in obj:
        return f"objective   {obj['line']}"
    if obj["kind"] != "block_diffusion":
        return f"objective   {obj['kind']}"
    sched = obj["schedule"] + (f" (p = {obj['exponent']:g})" if obj["schedule"] == "exponential" else "")
    lo, hi = obj["clip"]
    return (f"objective   block_diffusion (BD3-LM): block {obj['block_size']}, {sched} schedule, "
            f"clip [{lo:g}, {hi:g}], [MASK] = id vocab_size")


def _sum_states(states: list[dict], seq_lens: tuple[int, ...]) -> tuple[dict, dict]:
    """(total bytes per length, None where a state is unknown; the known part) of ``states``."""
    total, known = {}, {}
    for n in seq_lens:
        vals = [st[str(n)] for st in states]
        known[str(n)] = sum(v for v in vals if v is not None)
        total[str(n)] = None if any(v is None for v in vals) else known[str(n)]
    return total, known


def etd_stages(etd: Any, n_layers: int) -> list[str]:
    """The stage of every layer of an ETD partition (``model.etd``)."""
    E, T = etd.encoder_layers, etd.think_layers
    return ["encoder" if i < E else "think" if i < E + T else "decoder" for i in range(n_layers)]


def router_active_params(router: torch.nn.Module | None) -> int:
    """Parameters of the ``etd_router`` a token uses: all of it but the LoRA branches, of
    which one (its MoDr choice) per think application."""
    if router is None:
        return 0
    n = getattr(router, "n_branches", 0)
    lora = sum(p.numel() for name, p in router.named_parameters() if name.startswith(("lora_a.", "lora_b.")))
    return _numel(router) - lora + (lora // n if n else 0)


def describe_etd(recipe: Any, model: torch.nn.Module, layers: list[dict], seq_lens: tuple[int, ...],
                 router_params: int, router_active: int, dtype: torch.dtype = torch.float32) -> dict:
    """The ``etd`` object of ``describe``: the partition, the controller, the layer
    applications and the cache states per stage and think iteration."""
    etd = recipe.model.etd
    cfg = model.etd_router.cfg
    E, T, D = etd.encoder_layers, etd.think_layers, etd.decoder_layers
    it, cap = etd.iterations, etd.cap
    routed = model.etd_router.routers is not None
    default = cap if cfg.halting.kind == "act" else it  # ETDStack's default think_iterations
    by_stage = {s: [r for r in layers if r["stage"] == s] for s in ("encoder", "think", "decoder")}
    parts = [{"stage": "encoder", "iteration": None, "layers": [r["index"] for r in by_stage["encoder"]]}]
    parts += [{"stage": "think", "iteration": k, "layers": [r["index"] for r in by_stage["think"]]}
              for k in range(cap)]
    parts.append({"stage": "decoder", "iteration": None, "layers": [r["index"] for r in by_stage["decoder"]]})
    for p in parts:
        p["applications"] = len(p["layers"])
        p["state_bytes"], p["state_bytes_known"] = _sum_states([layers[i]["state_bytes"] for i in p["layers"]],
                                                               seq_lens)
    # new_cache allocates a state for every slot (and its repeat): one no token reaches keeps its
    # size before any token (0 for attention, the full state for a recurrent mixer)
    idle = [{str(n): mixer_state_nbytes(b.mixer, 0, dtype) for n in seq_lens} for b in model.blocks]
    cache, known = {}, {}
    for key, n_iter in (("iterations", it), ("max_iterations", cap)):
        states = [layers[i]["state_bytes"] if p["stage"] != "think" or p["iteration"] < n_iter else idle[i]
                  for p in parts for i in p["layers"]]
        if routed:  # all-execute routes: the repeat states stay idle
            states += [idle[i] for p in parts for i in p["layers"]]
        cache[key], known[key] = _sum_states(states, seq_lens)
    if cfg.halting.kind == "act":  # tokens halt on their own, up to max_iterations: ``iterations`` sizes nothing
        cache["iterations"] = known["iterations"] = None
    repeat = None
    if routed:  # every slot repeated: its second state as large as the first
        full = _sum_states([layers[i]["state_bytes"] for p in parts for i in p["layers"]], seq_lens)[0]
        repeat = {n: None if b is None else 2 * b for n, b in full.items()}
    return {
        "encoder_layers": E, "think_layers": T, "decoder_layers": D, "iterations": it, "max_iterations": cap,
        "halting": cfg.halting.kind,
        "halting_threshold": cfg.halting.threshold if cfg.halting.kind == "act" else None,
        "ponder_cost": cfg.halting.ponder_cost if cfg.halting.kind == "act" else None,
        "layer_routes": routed, "n_branches": cfg.branches.n_branches,
        "branch_rank": cfg.branches.rank if cfg.branches.n_branches else None,
        "default_think_iterations": default,
        "applications": {"per_forward": E + T * default + D, "at_max_iterations": E + T * cap + D,
                         "most_with_repeats": 2 * (E + T * cap + D) if routed else None},
        "router_params": router_params, "router_active_params": router_active,
        "cache_states": len(model.structure.state_blocks()),
        "parts": parts, "cache_bytes": cache, "cache_bytes_known": known,
        "cache_bytes_with_repeats": repeat,
    }


def cuda_available() -> bool:
    """Whether fast paths can run at all (they need CUDA tensors)."""
    return torch.cuda.is_available()


def compact_pattern(tokens: list[str]) -> str:
    """Run-length form of a flat pattern (``GA+mlp*3 | GD+mlp``); it parses to the same layers."""
    runs: list[list] = []
    for t in tokens:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    return " | ".join(t if n == 1 else f"{t}*{n}" for t, n in runs)


def _scaled(n: int, base: int, units: tuple[str, ...], digits: int, sep: str) -> str:
    """``n`` in the largest of ``units`` (``units[i]``: ``base**i``; ``units[0]`` printed as a whole number)
    that it reaches once rounded to ``digits`` decimals: 999,999 is ``1.00M``, not ``1000.00K``."""
    if n < base:
        return f"{n}{sep}{units[0]}"
    for i, unit in enumerate(units[1:-1], 1):
        if float(f"{n / base**i:.{digits}f}") < base:
            return f"{n / base**i:.{digits}f}{sep}{unit}"
    return f"{n / base**(len(units) - 1):.{digits}f}{sep}{units[-1]}"


def human_count(n: int) -> str:
    """``98.94K``, ``1.00M``, ``66.41B``."""
    return _scaled(n, 1000, ("", "K", "M", "B"), 2, "")


def human_bytes(n: int | None) -> str:
    """``530.1 KiB``, ``3.0 TiB`` (``n/a`` for None)."""
    return "n/a" if n is None else _scaled(n, 2**10, ("B", "KiB", "MiB", "GiB", "TiB", "PiB"), 1, " ")


def seq_label(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


KERNEL_LEVELS = ("auto", "summary", "full")
LABEL = " " * 12  # the width of the labels (``pattern     ``)
ERROR_WIDTH = 60  # the compact table cuts a fast path's error here


def format_kernels(d: dict, level: str = "auto") -> list[str]:
    """The kernels section. ``full``: every op, its fast path and its status (``hymba info
    --kernels``); ``auto``: one line when the fast paths cannot run (no CUDA, or
    HYMBA_KERNELS=reference), else one short row per op; ``summary``: always one line (the demo).
    An op named in ``HYMBA_KERNELS_OFF`` is listed ``off (HYMBA_KERNELS_OFF)``."""
    from ..kernels.dispatch import OFF

    if level not in KERNEL_LEVELS:
        raise ValueError(f"kernels level must be one of {', '.join(KERNEL_LEVELS)}, got {level!r}")
    ks, mode = d["kernels"], d["kernel_mode"]
    head = "kernels     "
    if level == "full":
        out = [f"{head}HYMBA_KERNELS={mode}"]
        if not ks:
            out.append(f"{LABEL}no fast paths registered")
        kw = max((len(k) for k in ks), default=0)
        dw = max((len(v["fast_path"]) for v in ks.values()), default=0)
        for op, k in ks.items():
            status = ("off (HYMBA_KERNELS=reference)" if mode == "reference"  # (unprobed: dispatch.available)
                      else "available" if k["available"] else k["error"] if k["error"] == OFF
                      else f"unavailable ({k['error']})")
            out.append(f"{LABEL}{op.ljust(kw)}  {k['fast_path'].ljust(dw)}  {status}")
        return out
    if mode == "reference":
        return [f"{head}fast paths: off (HYMBA_KERNELS=reference: reference paths)"]
    if not d.get("cuda", True):  # the CPU's own fast paths (atlas_cpu), the reference for every other op
        cpu = [op for op, k in ks.items() if k.get("device") == "cpu" and k["available"]]
        return [f"{head}fast paths: {', '.join(cpu) if cpu else 'none'} (CPU: reference paths"
                f"{' for the rest' if cpu else ''})"]
    n_ok = sum(bool(k["available"]) for k in ks.values())
    count = f"fast paths: {n_ok} of {len(ks)} available"
    if level == "summary" or not ks:
        return [f"{head}{count} (HYMBA_KERNELS={mode}; hymba info --kernels lists them)"]
    out = [f"{head}{count}, HYMBA_KERNELS={mode} (--kernels: what each is, full errors)"]
    kw = max(len(k) for k in ks)
    for op, k in ks.items():
        err = k["error"]
        if len(err) > ERROR_WIDTH:  # cut at a word
            err = err[:ERROR_WIDTH - 4].rsplit(" ", 1)[0] + " ..."
        status = "available" if k["available"] else OFF if err == OFF else f"unavailable ({err})"
        out.append(f"{LABEL}{op.ljust(kw)}  {status}")
    return out


def format_info(d: dict, kernels: str = "auto") -> str:
    """The text ``hymba info`` prints; ``kernels``: how much of the kernel table (``format_kernels``)."""
    from ..core.recipe import _printable  # (an override with a line break: still one line)

    lens = list(d["cache_bytes"])
    layout = (d.get("layout") or {}).get("line")
    out = [
        f"recipe      {d['source'] or '<recipe>'}"
        + "".join(f" --set {shlex.quote(_printable(s))}" for s in d.get("recipe_overrides", ())),
        f"name        {d['name']}  (hash {d['hash']})",
        (f"model       vocab {d['vocab_size']}, d_model {d['d_model']}, max_seq_len {d['max_seq_len']}, "
         f"meta tokens {d['meta_tokens']}, {'tied' if d['tie_embeddings'] else 'untied'} embeddings"
         if d["vocab_size"] is not None else
         f"model       no vocabulary (reads numbers: patch tokens), d_model {d['d_model']}, max_seq_len "
         f"{d['max_seq_len']} patches, meta tokens {d['meta_tokens']}"),
        f"pattern     {layout or d['pattern']}",
        *([f"            = {d['pattern_compact']}"] if not layout and d["pattern_compact"] != d["pattern"] else []),
        f"layers      {d['n_layers']}",
        *([objective_line(d["objective"])] if d.get("objective", {}).get("kind", "next_token") != "next_token" else []),
        *([ladir_line(d["ladir"])] if d.get("ladir") is not None else []),
        *([f"conventions {'; '.join(d['conventions'])}"] if d.get("conventions") else []),
        "",
    ]
    etd = d.get("etd")
    if etd is not None:
        out[-1:-1] = format_etd_head(etd)
    states = [f"state@{seq_label(int(n))}" for n in lens]
    head = ["layer", "mixer", "ffn", "params", "active"] + states
    rows = [[str(r["index"]), r["mixer"], r["ffn"], f"{r['params']:,}", f"{r['active_params']:,}"]
            + [human_bytes(r["state_bytes"][n]) for n in lens] for r in d["layers"]]
    if etd is not None:
        rows.append(["-", "etd_router", "", f"{etd['router_params']:,}", f"{etd['router_active_params']:,}"]
                    + ["" for _ in lens])
    if d.get("mtp") is not None:
        mtp = d["mtp"]
        rows.append(["-", f"mtp x{mtp['depth']} ({mtp['block']})", "", f"{mtp['params']:,}", f"{mtp['active_params']:,}"]
                    + ["" for _ in lens])
    if d.get("ladir") is not None:
        lad = d["ladir"]
        rows.append(["-", f"ladir ({lad['memory_slots']} slots)", "", f"{lad['params']:,}", f"{lad['active_params']:,}"]
                    + ["" for _ in lens])
    rows.append(["-", "embed/meta/norm/head" if d["vocab_size"] is not None else "ts_head/meta/norm", "",
                 f"{d['other_params']:,}", f"{d['other_params']:,}"]
                + ["" for _ in lens])
    right = {0, 3, 4} | set(range(5, len(head)))
    if etd is not None:  # a stage column after the layer index
        head.insert(1, "stage")
        for r, row in zip(d["layers"] + [{}] * (len(rows) - len(d["layers"])), rows):
            row.insert(1, r.get("stage", ""))
        right = {0, 4, 5} | set(range(6, len(head)))
    out += _table(head, rows, right)
    out.append("")
    if etd is not None:
        out += format_etd_applications(etd, lens)
        out.append("")
    note = ""
    if etd is not None:
        note = f" (think weights counted once; etd_router {etd['router_params']:,})"
    out.append(f"parameters  total {d['params_total']:,} ({human_count(d['params_total'])}), "
               f"active {d['params_active']:,} ({human_count(d['params_active'])}){note}")
    if etd is None:
        out.append(f"cache       per sequence ({d['cache_dtype']}): {_cache_list(d['cache_bytes'], d['cache_bytes_known'])}")
    else:
        out += format_etd_cache(etd, d["cache_dtype"])
    if d.get("mtp") is not None:  # not in the figure above: plain decoding never allocates it
        out.append(f"{LABEL}MTP modules' own cache (speculative decoding, --mode mtp): "
                   f"{_cache_list(d['mtp']['cache_bytes'], d['mtp']['cache_bytes_known'])}")
    if d.get("past_max_seq_len"):  # the default columns (1k, 32k) outrun a tiny recipe's
        out.append(f"{LABEL}{', '.join(seq_label(n) for n in d['past_max_seq_len'])} tokens: "
                   f"past max_seq_len {d['max_seq_len']}")
    missing = d["missing_state_nbytes"]
    if missing:
        verb = "does" if len(missing) == 1 else "do"
        out.append(f"            (not counting {', '.join(missing)}, which {verb} not report state_nbytes)")
    out.append("")
    out += format_kernels(d, kernels)
    return "\n".join(out)


def _table(head: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
            for row in [head] + rows]


def _cache_list(cache: dict, known: dict) -> str:
    """``1k tokens 530.1 KiB, 32k tokens 16.5 MiB`` (``>= known`` where a state is unknown)."""
    return ", ".join(f"{seq_label(int(n))} tokens {human_bytes(b) if b is not None else '>= ' + human_bytes(known[n])}"
                     for n, b in cache.items())


def _think_depth(etd: dict) -> str:
    it, cap = etd["iterations"], etd["max_iterations"]
    if etd["halting"] == "act":
        return f"1..{cap} iterations (ACT, per token)"
    return f"{it} iterations" + (f" (max {cap})" if cap != it else "")


def format_etd_head(etd: dict) -> list[str]:
    """The ``etd`` lines under ``layers``: the partition and the controller."""
    lines = [f"etd         encoder {etd['encoder_layers']} | think {etd['think_layers']} x {_think_depth(etd)}, "
             f"tied weights | decoder {etd['decoder_layers']}"]
    if etd["halting"] == "act":
        ctl = [f"ACT halting (threshold {etd['halting_threshold']:g}, ponder cost {etd['ponder_cost']:g})"]
    else:
        it, cap = etd["iterations"], etd["max_iterations"]
        ctl = ["fixed iterations" + (f" (inference may ask for 1..{cap})" if cap != it else "")]
    if etd["layer_routes"]:
        ctl.append("Dr.LLM layer routes (skip / execute / repeat per sequence, once router training turns them on)")
    if etd["n_branches"]:
        ctl.append(f"MoDr {etd['n_branches']} LoRA branches of rank {etd['branch_rank']}")
    lines.append(f"{LABEL}{'; '.join(ctl)}")
    return lines


def format_etd_applications(etd: dict, lens: list[str]) -> list[str]:
    """Layer applications per forward and the cache states of every stage / think iteration."""
    a, it, cap = etd["applications"], etd["iterations"], etd["max_iterations"]
    act = etd["halting"] == "act"
    total = f"at most {a['per_forward']}" if act else str(a["per_forward"])
    line = (f"applied     per forward: encoder {etd['encoder_layers']} + think {etd['think_layers']} x "
            f"{_think_depth(etd)} + decoder {etd['decoder_layers']} = {total} layer applications")
    out = [line]
    if not act and cap != it:
        out.append(f"{LABEL}at max_iterations {cap}: {a['at_max_iterations']} layer applications")
    if a["most_with_repeats"] is not None:
        out.append(f"{LABEL}layer routes: per slot skip 0, execute 1, repeat 2 applications: "
                   f"0 to {a['most_with_repeats']}")
    out.append("")
    head = ["application", "layers"] + [f"state@{seq_label(int(n))}" for n in lens]
    rows = []
    for p in etd["parts"]:
        if not p["layers"]:  # no encoder / no decoder
            continue
        name = p["stage"] if p["iteration"] is None else f"think it{p['iteration']}"
        if not act and p["iteration"] is not None and p["iteration"] >= it:
            name += " *"
        idx = p["layers"]
        span = "-" if not idx else str(idx[0]) if len(idx) == 1 else f"{idx[0]}-{idx[-1]}"
        rows.append([name, span] + [human_bytes(b) if b is not None else ">= " + human_bytes(p["state_bytes_known"][n])
                                    for n, b in p["state_bytes"].items()])
    out += _table(head, rows, set(range(2, len(head))))
    if not act and cap != it:
        out.append(f"* beyond iterations ({it}): only when inference asks for more (forward's think_iterations, "
                   "hymba generate --think-iterations)")
    return out


def format_etd_cache(etd: dict, dtype: str) -> list[str]:
    """The cache lines of an ETD recipe: every (layer, iteration) application has its own state."""
    it, cap = etd["iterations"], etd["max_iterations"]
    c, k = etd["cache_bytes"], etd["cache_bytes_known"]
    if etd["halting"] == "act":
        what = f"{cap} think iterations (max_iterations; tokens that halt earlier add less)"
    else:
        what = f"{cap} think iterations" + (" (max_iterations)" if cap != it else "")
    out = [f"cache       per sequence ({dtype}), {what}: {_cache_list(c['max_iterations'], k['max_iterations'])}"]
    if etd["halting"] != "act" and cap != it:
        out.append(f"{LABEL}{it} think iterations: {_cache_list(c['iterations'], k['iterations'])}")
    rep = etd["cache_bytes_with_repeats"]
    if rep is not None:
        known2 = {n: 2 * sum(p["state_bytes_known"][n] for p in etd["parts"]) for n in rep}
        out.append(f"{LABEL}layer routes: a repeat fills a second state for its slot, so at worst (every slot "
                   f"repeated) 2x the states': {_cache_list(rep, known2)}")
    return out


def run(args: argparse.Namespace) -> int:
    from ..core.recipe import RecipeError
    from . import UsageError, UserError
    from .check import emit

    check_sets(args)
    try:
        lens = tuple(int(x) for x in args.seq_lens.split(",") if x.strip())
    except ValueError:
        lens = ()
    if not lens or any(n < 1 for n in lens):
        raise UsageError(f"--seq-lens must be positive integers separated by commas, got {args.seq_lens!r}")
    try:
        recipe = load_recipe_with_sets(Path(args.recipe), args)  # a file (a str that is no path would be read as YAML text)
    except RecipeError as e:
        for line in e.errors:
            emit(" ".join(line.split("\n")), err=True)
        return 1
    try:
        d = describe(recipe, DTYPES[args.dtype], lens)
    except Exception as e:  # noqa: BLE001 - a component that cannot build: one line, not a traceback
        raise UserError(f"{args.recipe}: cannot build the model: {type(e).__name__}: {e}") from None
    if args.sets:  # what is described is not the file's recipe (nor its hash): say which, as bench's JSON does
        d["recipe_overrides"] = list(args.sets)
    emit(json.dumps(d, indent=1) if args.json else format_info(d, "full" if args.kernels else "auto"))
    return 0
