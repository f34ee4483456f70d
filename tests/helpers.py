"""Shared test helpers: tiny recipes, a small trainer for 'does it learn' tests, and the
benchmark scripts as modules."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import torch

from hymba_plus import build_model
from hymba_plus.training.tasks import masked_accuracy, mqar_batch

#: tiny settings (d_model 32) for every mixer and channel mixer, with the options the cache
#: tests care about (a window, ATLAS chunks shorter than a typical chunk, MoE): one place for the
#: test files that draw recipes over every component
EVERY_COMPONENT = {
    "gated_attn": {"n_heads": 2, "head_dim": 16, "window": 6},
    "gdn": {"n_heads": 2, "head_dim": 16},
    "mamba3": {"state_size": 8, "head_dim": 16, "expand": 1},
    "atlas": {"n_heads": 2, "head_dim": 16, "poly_degree": 1, "memory_hidden": 1, "ns_steps": 2, "chunk_size": 3},
    "hymba": {"ssm": "gdn", "attn": {"n_heads": 2, "head_dim": 16}},
    "mlp": {"d_hidden": 64},
    "moe": {"n_experts": 4, "top_k": 2, "d_expert": 32},
}


def load_benchmark(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (the scripts are files, not a package), with
    ``benchmarks/`` on ``sys.path`` while it loads (several import ``timing`` from there)."""
    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(folder))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(folder))
    return mod


def saved_bytes(fn):  # noqa: ANN001, ANN201 - (fn(), bytes of the distinct storages autograd keeps for it)
    """Run ``fn()`` and count what autograd saves for its backward (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def tiny_recipe(pattern: str, components: dict | None = None, **model) -> dict:
    m = {"vocab_size": 64, "d_model": 64, "max_seq_len": 256, "block_pattern": pattern, "ffn": "none"}
    m.update(model)
    return {"name": "test", "model": m, "components": components or {}}


def float64_model(name: str, pattern: str, extra: dict, comps: dict, vocab_size: int = 20):  # noqa: ANN201
    """A float64 eval-mode model of ``pattern`` (d 32, max_seq_len 64) with seed 0, as the cache tests build
    theirs (``tests/test_rollback.py``, ``tests/test_verify_states.py``); ``extra`` with an ``etd`` section also
    gets an ACT halting + layer router whose routes are on."""
    comps = dict(comps)
    if "etd" in extra:
        comps["etd_router"] = {"halting": {"kind": "act", "threshold": 0.9},
                               "layer_router": {"enabled": True, "hidden": 8, "windows": 2}}
    r = {"name": name, "model": {"vocab_size": vocab_size, "d_model": 32, "max_seq_len": 64, "block_pattern": pattern,
                                 **extra}, "components": comps}
    torch.manual_seed(0)
    m = build_model(r).double().eval()
    if m.etd_router is not None:
        m.etd_router.enable_routes()
    return m


def mqar_overwrite_batch(batch_size: int, seq_len: int, vocab_size: int, n_pairs: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MQAR with overwritten keys: ``n_pairs`` keys, each written twice with two different values
    (the ``2 n_pairs`` writes interleaved at random, a key's first write before its second), then
    every key queried in random order; the answer is its *latest* value. Keys from [1, V/2),
    values from [V/2, V), token 0 pads the tail; needs ``seq_len >= 6 n_pairs``. An additive
    (decay-only) memory reads the old and the new value summed; the delta rule's erase term
    replaces the old one."""
    g, half = generator, vocab_size // 2
    if n_pairs < 1 or 6 * n_pairs > seq_len or n_pairs > half - 1:
        raise ValueError(f"need 1 <= n_pairs <= min(seq_len/6, vocab/2 - 1), got {n_pairs}")
    keys = torch.rand(batch_size, half - 1, generator=g).argsort(-1)[:, :n_pairs] + 1
    old = torch.randint(half, vocab_size, (batch_size, n_pairs), generator=g)
    new = half + (old - half + torch.randint(1, half, (batch_size, n_pairs), generator=g)) % half  # != old
    # the 2n write slots at random; per key the earlier slot gets the old value
    slots = torch.rand(batch_size, 2 * n_pairs, generator=g).argsort(-1).view(batch_size, 2, n_pairs).sort(1).values
    wk = torch.zeros(batch_size, 2 * n_pairs, dtype=torch.long)
    wv = torch.zeros_like(wk)
    for i, v in ((0, old), (1, new)):
        wk.scatter_(1, slots[:, i], keys)
        wv.scatter_(1, slots[:, i], v)
    perm = torch.rand(batch_size, n_pairs, generator=g).argsort(-1)
    qk, qv = keys.gather(1, perm), new.gather(1, perm)
    ids = torch.zeros(batch_size, seq_len, dtype=torch.long)
    ids[:, : 4 * n_pairs] = torch.stack([wk, wv], -1).flatten(1)
    ids[:, 4 * n_pairs : 6 * n_pairs] = torch.stack([qk, qv], -1).flatten(1)
    labels = torch.full_like(ids, -100)
    labels[:, 4 * n_pairs + 1 : 6 * n_pairs : 2] = qv
    return ids, labels


def train_mqar(recipe: dict, steps: int = 300, batch: int = 32, seq_len: int = 64, n_pairs: int = 8,
               lr: float = 3e-3, seed: int = 0, autocast: torch.dtype | None = None,
               losses: list[float] | None = None, task=mqar_batch) -> float:  # noqa: ANN001
    """Train on MQAR with AdamW, return accuracy on fresh held-out batches. ``autocast``: the
    forwards under CPU autocast to that dtype; ``losses`` collects each step's loss; ``task``:
    the batch function (``mqar_batch``'s signature), e.g. ``mqar_overwrite_batch``."""
    torch.manual_seed(seed)
    model = build_model(recipe)
    V = model.config.vocab_size
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    cast = lambda: torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)  # noqa: E731
    model.train()
    for _ in range(steps):
        ids, labels = task(batch, seq_len, V, n_pairs, generator=g)
        with cast():
            loss = model(ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    model.eval()
    g_eval = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad(), cast():
        ids, labels = task(256, seq_len, V, n_pairs, generator=g_eval)
        return masked_accuracy(model(ids).logits.float(), labels)


# --------------------------------------------------------------------------- the checkout guard

#: folders that tooling, not the tests, writes into a checkout (venv, bytecode, build metadata)
#: the copy task of block diffusion's learning tests: x = [a | a] with a random, the second half scored
BD_COPY = {"name": "copy", "model": {"vocab_size": 16, "d_model": 32, "max_seq_len": 16, "block_pattern": "GD | GA"},
           "components": {"gated_attn": {"n_heads": 2, "head_dim": 16}, "gdn": {"n_heads": 2, "head_dim": 16},
                          "mlp": {"d_hidden": 64}},
           "objective": {"kind": "block_diffusion", "block_size": 4, "clip": [0.3, 1.0]}}


def bd_copy_batch(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n copy examples of ``BD_COPY`` (ids, labels with the first half -100), drawn from ``g``."""
    V, half = BD_COPY["model"]["vocab_size"], BD_COPY["model"]["max_seq_len"] // 2
    a = torch.randint(0, V, (n, half), generator=g)
    ids = torch.cat([a, a], 1)
    labels = ids.clone()
    labels[:, :half] = -100
    return ids, labels


def train_bd_copy(model: torch.nn.Module, steps: int = 120) -> None:
    """``steps`` AdamW steps (lr 3e-3, batch 32, clip 1) of ``model`` (built from ``BD_COPY``) on the copy task."""
    obj = model.objective
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        ids, labels = bd_copy_batch(32, g)
        loss = obj.train_forward(model, model, ids, labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


TOOL_DIRS = (".git", ".venv", "__pycache__", ".ruff_cache", ".mypy_cache")
TOOL_SUFFIXES = (".egg-info",)


def ladir_jsonl_run(tmp_path: Path, steps: int, eval_every: int) -> tuple[Path, list[dict], list[str]]:
    """A tiny LaDiR recipe (bytes tokenizer) and a JSONL file of 20 {question, reasoning, answer} rows
    written under ``tmp_path``: (the data file, its rows, ``hymba train`` argv of the vae stage into
    ``tmp_path / "run"``)."""
    import json

    rows = [{"question": f"{a}+{b}=", "reasoning": f"{a}+{b} is {a + b}", "answer": str(a + b)}
            for a in range(5) for b in range(4)]
    data = tmp_path / "r.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rec = tmp_path / "ladir.yaml"
    rec.write_text("name: ladir-bytes\nmodel: {vocab_size: 256, d_model: 32, max_seq_len: 64, block_pattern: 'GD | GA'}\n"
                   "components: {gated_attn: {n_heads: 2, head_dim: 16}, gdn: {n_heads: 2, head_dim: 16}}\n"
                   "ladir: {latent_dim: 8, memory_slots: 2, inference_steps: 4, denoiser_layers: 1, denoiser_heads: 2}\n"
                   "objective: {kind: ladir}\n")
    argv = ["train", str(rec), "--data", str(data), "--ladir-stage", "vae", "--steps", str(steps), "--batch-size", "4",
            "--seq-len", "32", "--eval-every", str(eval_every), "--eval-batches", "1", "--out", str(tmp_path / "run"),
            "--no-progress"]
    return data, rows, argv


def tree_snapshot(root) -> dict[str, tuple[int, int]]:  # noqa: ANN001 - a path
    """{relative path: (size, mtime_ns)} of every file under ``root`` (tracked, untracked and
    ignored alike: a user's ``runs/`` counts), less the tooling folders above."""
    import os

    snap = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in TOOL_DIRS and not d.endswith(TOOL_SUFFIXES)]
        for name in filenames:
            p = os.path.join(dirpath, name)
            try:
                st = os.lstat(p)
            except FileNotFoundError:
                continue
            snap[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns)
    return snap


def tree_changes(before: dict, after: dict) -> list[str]:
    """'added X' / 'removed X' / 'changed X' lines between two ``tree_snapshot``s."""
    out = [f"added {p}" for p in sorted(set(after) - set(before))]
    out += [f"removed {p}" for p in sorted(set(before) - set(after))]
    out += [f"changed {p}" for p in sorted(set(before) & set(after)) if before[p] != after[p]]
    return out


class CudaLooking(torch.Tensor):
    """A CPU tensor whose ``device.type`` reads cuda (GraphedStep's only device check)."""

    @staticmethod
    def __new__(cls, t):  # noqa: ANN001, ANN205
        return torch.Tensor._make_subclass(cls, t)

    @property
    def device(self):  # noqa: ANN201
        return torch.device("cuda")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out.as_subclass(torch.Tensor) if isinstance(out, CudaLooking) else out
