"""Training checkpoints: ``OUT/step-N/``, crash-safe, no pickle.

A checkpoint folder holds

* ``recipe.yaml``, ``model.safetensors`` (+ ``tokenizer.json``): ``HybridLM.save_pretrained``,
  so ``from_pretrained(OUT/step-N)`` and ``hymba generate OUT/step-N`` work on it;
* ``optimizer.safetensors``: every optimizer state tensor, keyed
  ``state/<param name>/<key>``, with the rest (param groups, scalars) as JSON in the
  safetensors metadata (``structure``);
* ``rng.safetensors``: torch CPU (and CUDA) generator states of every rank;
* ``trainer_state.json`` (written last): step, data position, schedule, the effective
  train config, world size.

Resuming takes the newest *intact* checkpoint (``find_resumable``): one whose trainer state
parses and whose recipe and safetensors files open with complete headers (a truncated or
garbled file is caught there); a corrupt newer one is skipped with a one-line warning and
never deleted: should the resumed run reach its step again, the corrupt folder is renamed
``step-N.corrupt`` (``-2``, ... if taken) before the new one takes its name. Checkpoints
ahead of the step being saved are never pruned, and ``keep_last`` counts intact ones only.
Files that open but hold the wrong content are one ``CheckpointError`` line too: an optimizer
state of another shape than its parameter or not floating point (``set_optimizer_state_dict``
checks neither), generator states that are not ``rank<N>/cpu|cuda`` uint8 vectors or do not load.

Crash safety: everything is written into ``OUT/.tmp-step-N-PID/`` and then renamed to
``OUT/step-N`` with one ``os.replace`` (atomic on POSIX), so a ``step-N`` folder is always
complete and a process killed at any moment leaves at most a ``.tmp-*`` folder, which
loading ignores and the next save deletes. Old checkpoints beyond ``keep_last`` are first
renamed to ``.trash-*`` and then deleted, so a half-deleted folder is never taken for a
checkpoint. A new checkpoint never replaces an older good one: it only gets a new name.

Under FSDP2 every rank takes part in gathering full state dicts
(``torch.distributed.checkpoint.state_dict``, ``full_state_dict=True, cpu_offload=True``)
and rank 0 alone writes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.config import brief, first_line
from ..core.recipe import _asdict
from ..models.lm import CheckpointError, HybridLM, from_pretrained, write_safetensors
from .distributed import DistInfo, all_gather_bytes, barrier
from .schedule import Schedule

STEP_RE = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"
FILES = ("recipe.yaml", "model.safetensors", "optimizer.safetensors", "rng.safetensors", STATE_FILE)
STATE_FORMAT = "hymba-train-state"
STATE_VERSION = 1


# --------------------------------------------------------------------------- finding


def list_checkpoints(out: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``out`` (``step-N`` folders with a trainer state), oldest first."""
    p = Path(out)
    if not p.is_dir():
        return []
    found = []
    for d in p.iterdir():
        m = STEP_RE.match(d.name)
        if m and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def incomplete_checkpoints(out: str | os.PathLike) -> list[Path]:
    """``step-N`` folders in ``out`` without a trainer state. ``save`` renames a finished folder into
    place, so none comes from an interrupted save: a file was removed. A fresh run must not write
    over them (nor over the run's metrics beside them)."""
    p = Path(out)
    if not p.is_dir():
        return []
    return sorted(d for d in p.iterdir() if STEP_RE.match(d.name) and d.is_dir() and not (d / STATE_FILE).is_file())


def latest(out: str | os.PathLike) -> Path | None:
    found = list_checkpoints(out)
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- state dicts


def _full_model_state(model: nn.Module, info: DistInfo) -> dict[str, torch.Tensor]:
    if info.enabled:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _full_optim_state(model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    raise TypeError(f"cannot store {type(v).__name__} in a checkpoint")


def optim_to_safetensors(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into flat tensors and a JSON structure."""
    tensors: dict[str, torch.Tensor] = {}
    state: dict[str, Any] = {}
    for pname, st in osd.get("state", {}).items():
        entry = {}
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                name = f"state/{pname}/{key}"
                tensors[name] = val.detach().cpu().contiguous()
                entry[key] = {"tensor": name}
            else:
                entry[key] = {"value": _jsonable(val)}
        state[str(pname)] = entry
    groups = [_jsonable(g) for g in osd.get("param_groups", [])]
    return tensors, {"state": state, "param_groups": groups}


def optim_from_safetensors(tensors: dict[str, torch.Tensor], structure: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pname, entry in structure["state"].items():
        st = {}
        for key, spec in entry.items():
            st[key] = tensors[spec["tensor"]] if "tensor" in spec else spec["value"]
        state[pname] = st
    groups = []
    for g in structure["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def _rng_states(info: DistInfo) -> dict[str, torch.Tensor]:
    out = {}
    for r, t in enumerate(all_gather_bytes(torch.get_rng_state(), info)):
        out[f"rank{r}/cpu"] = t
    if info.device.type == "cuda":
        for r, t in enumerate(all_gather_bytes(torch.cuda.get_rng_state(info.device), info)):
            out[f"rank{r}/cuda"] = t
    return out


# --------------------------------------------------------------------------- saving


def _write_model(path: Path, recipe: Any, state: dict[str, torch.Tensor], extra_files: dict[str, str]) -> None:
    """``save_pretrained`` of a replica holding ``state`` (built on the meta device, then
    the gathered tensors are assigned: no second initialisation of the weights)."""
    with torch.device("meta"):
        replica = HybridLM(recipe)
    replica.load_state_dict(state, strict=False, assign=True)
    if recipe.model.tie_embeddings and replica.embed is not None:
        replica.lm_head.weight = replica.embed.weight
    replica.save_pretrained(path, extra_files=extra_files)


def save(out: Path, step: int, model: nn.Module, opt: torch.optim.Optimizer, trainer_state: dict[str, Any],
         info: DistInfo, extra_files: dict[str, str] | None = None, keep_last: int = 2) -> Path:
    """Write ``out/step-<step>`` (collective under FSDP: call on every rank)."""
    raw = getattr(model, "_orig_mod", model)
    model_state = _full_model_state(raw, info)
    osd = _full_optim_state(raw, opt, info)
    rng = _rng_states(info)
    final = out / f"step-{step}"
    if info.is_main:
        tmp = out / f".tmp-step-{step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        if info.enabled:
            _write_model(tmp, raw.recipe, model_state, extra_files or {})
        else:
            raw.save_pretrained(tmp, extra_files=extra_files or {})
        tensors, structure = optim_to_safetensors(osd)
        write_safetensors(tensors, tmp / "optimizer.safetensors",
                          metadata={"format": "hymba-optimizer", "structure": json.dumps(structure)})
        write_safetensors(rng, tmp / "rng.safetensors", metadata={"format": "hymba-rng"})
        state = dict(trainer_state, format=STATE_FORMAT, version=STATE_VERSION, step=step)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        if final.exists():  # a corrupt or incomplete folder of this step, skipped at resume: kept aside
            os.replace(final, _free_name(out, f"{final.name}.corrupt"))
        os.replace(tmp, final)
        _prune(out, keep_last, step)
    barrier(info)
    return final


def _discard(d: Path) -> None:
    trash = d.parent / f".trash-{d.name}-{os.getpid()}"
    os.replace(d, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _free_name(out: Path, name: str) -> Path:
    p, k = out / name, 1
    while p.exists():
        k += 1
        p = out / f"{name}-{k}"
    return p


def _intact(d: Path) -> bool:
    try:
        verify(d)
    except CheckpointError:
        return False
    return True


def _prune(out: Path, keep_last: int, step: int) -> None:
    """Keep the newest ``keep_last`` intact checkpoints up to ``step``; those ahead of it
    (skipped at resume) and corrupt ones (never deleted) are left alone and do not count, so a
    corrupt folder cannot push out the last intact checkpoint before it."""
    intact = [d for s, d in list_checkpoints(out) if s <= step and _intact(d)]
    for d in intact[: max(len(intact) - keep_last, 0)]:
        _discard(d)
    for d in out.iterdir():  # leftovers of killed runs
        if d.name.startswith((".tmp-step-", ".trash-")) and d.is_dir():
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def read_state(ckpt: Path) -> dict[str, Any]:
    p = ckpt / STATE_FILE
    try:
        state = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p}: corrupt ({e})") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{p}: not a hymba trainer state")
    problem = _state_problem(state, ckpt)
    if problem is not None:
        raise CheckpointError(f"{p}: {problem}")
    return state


def _state_problem(state: dict[str, Any], ckpt: Path) -> str | None:
    """What is wrong with a parsed trainer state's fields (None: nothing): the version this code
    writes, the step of the folder's name, counts that are counts, sections that are mappings."""
    if state.get("version") != STATE_VERSION:
        return f"version {brief(state.get('version'))}: this hymba reads version {STATE_VERSION}"
    m = STEP_RE.match(ckpt.name)
    if state["step"] < 0 or (m is not None and int(m.group(1)) != state["step"]):
        return f"step {state['step']} does not match the folder {ckpt.name}"
    if "samples" not in state:  # the data position: without it a resume would read the data from its start
        return "samples: missing"
    for key in ("samples", "tokens", "world_size"):
        v = state.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"{key}: expected a count (an integer >= 0), got {brief(v)}"
    for key in ("schedule", "train_config", "data", "route_search"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            return f"{key}: expected a mapping, got {brief(state[key])}"
    if not isinstance((state.get("data") or {}).get("params", {}), dict):
        return f"data.params: expected a mapping, got {brief(state['data']['params'])}"
    for key, v in (state.get("route_search") or {}).items():
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return f"route_search.{key}: expected a number, got {brief(v)}"
    for key in ("distill", "train_only"):
        if state.get(key) is not None and not isinstance(state[key], str):
            return f"{key}: expected text, got {brief(state[key])}"
    if "steps" in (state.get("schedule") or {}):  # (a state without the plan re-plans from its train_config)
        try:
            Schedule.from_dict(state["schedule"])
        except ValueError as e:
            return f"schedule: {e}"
    return None


#: the safetensors files of a checkpoint (``verify``'s default: what resuming reads)
SAFETENSORS_FILES = ("model.safetensors", "optimizer.safetensors", "rng.safetensors")


def verify(ckpt: Path, files: tuple[str, ...] = SAFETENSORS_FILES, state: bool = True) -> dict[str, Any]:
    """The trainer state of ``ckpt`` after checking that every file is there and readable:
    the state parses (``state=False``: not read, ``{}`` returned: generation needs the weights alone,
    whichever hymba trained them), ``recipe.yaml`` loads, each safetensors file of ``files`` opens
    with a complete header (which catches truncation). CheckpointError naming the file otherwise."""
    from safetensors import SafetensorError, safe_open

    from ..core.recipe import RecipeError, load_recipe

    trainer_state = read_state(ckpt) if state else {}
    try:
        load_recipe(ckpt / "recipe.yaml")
    except RecipeError as e:
        raise CheckpointError(e.errors[0]) from None  # names the file (and line)
    for name in files:
        p = ckpt / name
        if not p.is_file():
            raise CheckpointError(f"{p}: missing")
        try:
            with safe_open(str(p), framework="pt", device="cpu") as f:
                f.keys()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{p}: corrupt or truncated ({e})") from None
    return trainer_state


def find_resumable(out: Path, warn: Any = None, files: tuple[str, ...] = SAFETENSORS_FILES, state: bool = True
                   ) -> tuple[Path, dict[str, Any]] | None:
    """(newest intact checkpoint in ``out``, its trainer state), or None when ``out`` has no
    checkpoint. Corrupt newer ones are skipped, each with one warning line through ``warn``;
    CheckpointError when every checkpoint is corrupt. ``files`` / ``state``: the safetensors files
    the use reads and whether it reads the trainer state (``verify``; generation: the weights alone)."""
    found = list_checkpoints(out)
    errors = []
    for _, d in reversed(found):
        try:
            trainer_state = verify(d, files, state)
        except CheckpointError as e:
            errors.append((d, str(e)))
            continue
        for bad, e in errors if warn is not None else ():
            warn(f"warning: skipping corrupt checkpoint {bad.name} ({e}); it is kept")
        return d, trainer_state
    if errors:
        errors = [e for _, e in errors]
        raise CheckpointError(f"{errors[0]} (and no older intact checkpoint in {out})" if len(errors) == 1
                              else f"{errors[0]} (all {len(errors)} checkpoints in {out} are corrupt)")
    return None


def recipe_difference(a: Any, b: Any) -> str | None:
    """The first model / components / objective / ladir key whose value differs between two recipes
    (what the weights mean and what they are trained for), or None."""
    da, db = ({"model": _asdict(r.model), "components": _asdict(dict(r.components)),
               "objective": _asdict(r.objective) if r.objective is not None else None,
               "ladir": _asdict(r.ladir) if r.ladir is not None else None} for r in (a, b))

    def walk(x: Any, y: Any, path: str) -> str | None:
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                r = walk(x.get(k), y.get(k), f"{path}.{k}" if path else k)
                if r:
                    return r
            return None
        return None if x == y else f"{path}: {x!r} vs {y!r}"

    return walk(da, db, "")


def check_recipe(ckpt: Path, recipe: Any, recipe_name: str) -> Any:
    """CheckpointError unless ``ckpt`` was trained with ``recipe``'s model, components, objective and ladir;
    else the checkpoint's recipe."""
    from ..core.recipe import RecipeError, load_recipe

    try:
        saved = load_recipe(ckpt / "recipe.yaml")
    except RecipeError as e:
        raise CheckpointError(e.errors[0]) from None  # names the file (and line)
    diff = recipe_difference(saved, recipe)
    if diff:
        raise CheckpointError(f"{ckpt / 'recipe.yaml'}: was trained with another recipe than {recipe_name} "
                              f"({diff.replace(' vs ', ' in the checkpoint, ', 1)} in {recipe_name})")
    return saved


def load_model_state(ckpt: Path, recipe: Any, recipe_name: str) -> dict[str, torch.Tensor]:
    """Full model state of a checkpoint, checked against ``recipe`` (CheckpointError otherwise)."""
    check_recipe(ckpt, recipe, recipe_name)
    return from_pretrained(ckpt).state_dict()


def load_optimizer(ckpt: Path, model: nn.Module, opt: torch.optim.Optimizer, info: DistInfo) -> None:
    from safetensors import SafetensorError, safe_open
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    p = ckpt / "optimizer.safetensors"
    if not p.is_file():
        raise CheckpointError(f"{p}: missing")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            structure = json.loads((f.metadata() or {})["structure"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        osd = optim_from_safetensors(tensors, structure)
    except (SafetensorError, OSError, KeyError, ValueError, TypeError, AttributeError, RuntimeError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated ({e})") from None
    kinds_saved = [g.get("kind") for g in osd["param_groups"]]
    kinds_now = [g.get("kind") for g in opt.param_groups]
    if kinds_saved != kinds_now:
        raise CheckpointError(f"{p}: optimizer groups {kinds_saved} do not match this run's {kinds_now} "
                              "(was --optimizer changed?)")
    # this run's settings win over the saved ones (lr and weight decay may change on resume; the rest, from the
    # same train_config, were loaded unchecked: betas as text failed at the first step, a traceback)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    raw = getattr(model, "_orig_mod", model)
    try:
        # not strict: a parameter that never had a gradient (routers a phase overrides, the denoiser of LaDiR's
        # vae stage) has no state in the checkpoint, as in the optimizer that saved it
        set_optimizer_state_dict(raw, opt, optim_state_dict=osd,
                                 options=StateDictOptions(full_state_dict=True, strict=False))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{p}: does not fit this model's parameters ({str(e).splitlines()[0]})") from None
    names = {id(t): n for n, t in raw.named_parameters()}
    # set_optimizer_state_dict first gives every parameter a state by a zero-gradient step (step count 1, zero
    # moments) and keeps it where the checkpoint has none: such a parameter's first real update then took
    # AdamW's second bias correction, not the first (the uninterrupted run's), so that made-up state goes
    # and where the checkpoint has only some of a parameter's state (no exp_avg), the made-up rest stayed silently
    for g in opt.param_groups:
        for prm in g["params"]:
            name = names.get(id(prm), "?")
            saved = osd["state"].get(name)
            if saved is None:
                opt.state.pop(prm, None)
                continue
            made_up = sorted(set(opt.state.get(prm, {})) - set(saved))
            if made_up:
                raise CheckpointError(f"{p}: {name}'s state has no {', '.join(made_up)}")
            # set_optimizer_state_dict checks neither shapes nor dtypes: a wrong one failed at the first step, a
            # traceback (and a number saved where a tensor belongs, too)
            for key, v in opt.state[prm].items():
                if not isinstance(v, torch.Tensor):
                    raise CheckpointError(f"{p}: {name}'s {key} is {brief(v)}, not a tensor")
                # (a 0-d moment or momentum broadcast over the parameter: silently, or a traceback)
                if not v.is_floating_point() or (v.shape != prm.shape and (key != "step" or v.dim())):
                    raise CheckpointError(f"{p}: {name}'s {key} is {str(v.dtype).removeprefix('torch.')} "
                                          f"{list(v.shape)}, the parameter {list(prm.shape)}")
    for g, own in zip(opt.param_groups, settings):
        g.update(own)


def load_rng(ckpt: Path, info: DistInfo) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = ckpt / "rng.safetensors"
    try:
        rng = load_file(str(p))
    except FileNotFoundError:
        raise CheckpointError(f"{p}: missing") from None
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(f"{p}: corrupt or truncated ({e})") from None
    keys = [re.fullmatch(r"rank(\d{1,6})/(cpu|cuda)", k) for k in rng]
    bad = next((k for k, m in zip(rng, keys) if m is None or rng[k].dtype != torch.uint8 or rng[k].dim() != 1), None)
    if bad is not None or not rng:
        raise CheckpointError(f"{p}: " + (f"{bad!r} is not a generator state (rank<N>/cpu or /cuda, uint8)"
                                          if bad is not None else "no generator states"))
    ranks = sorted({int(m.group(1)) for m in keys if m is not None})
    r = info.rank if info.rank in ranks else ranks[info.rank % len(ranks)]
    if f"rank{r}/cpu" not in rng:  # every save writes each rank's CPU state (the CPU stream was left as it was)
        raise CheckpointError(f"{p}: no CPU generator state for rank{r} (rank{r}/cpu)")
    try:
        torch.set_rng_state(rng[f"rank{r}/cpu"])
        if info.device.type == "cuda" and f"rank{r}/cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{r}/cuda"], info.device)
    except RuntimeError as e:  # e.g. a state of the wrong size
        raise CheckpointError(f"{p}: rank{r}'s generator state does not load ({first_line(e)})") from None
    if r != info.rank:  # more ranks than saved states: a stream of its own, not a copy of rank r's (the
        # objectives' noise, block diffusion's masks and LaDiR's latents, would repeat on every rank)
        draw = int(torch.randint(0, 2**62, (1,)))
        torch.manual_seed((draw + 0x9E3779B97F4A7C15 * info.rank) % 2**63)
