"""Experiment logging of ``hymba train`` (``--log-to`` / ``train.log_to``): the rows of
``OUT/metrics.jsonl`` mirrored to TensorBoard and / or Weights & Biases, as torchtitan's
``metrics.enable_tensorboard`` / ``enable_wandb`` and HF Trainer's ``report_to`` do.

* What: every numeric value of every row, at the row's ``step``, named by ``scalars``: eval
  metrics ``eval_X`` as ``eval/X``, statistics already namespaced by who reports them
  (``moe/1/entropy``, ``etd/...``) as they are, the rest as ``train/X`` (``train/loss``,
  ``train/lr``, ``train/grad_norm``, ``train/tokens_per_s``, ...); a short list of numbers
  (``moe/1/tokens_per_expert``) one scalar per entry (``.../0``, ``.../1``). Strings (``mode``)
  are left out. Once a run: the recipe's name and hash and the train settings, as text
  (``config``, at the run's first step: a resumed run adds its own) and, in a new ``OUT/tb``, as
  TensorBoard hparams / the W&B run config.
* Where: rank 0 only (as ``metrics.jsonl``); TensorBoard event files in ``OUT/tb/``
  (``torch.utils.tensorboard.SummaryWriter``, scalars as float32 ``simple_value``), W&B's files in
  ``OUT/wandb/`` (``WANDB_MODE=offline`` keeps them there for a later ``wandb sync``; project
  ``WANDB_PROJECT``, else ``hymba_plus``).
* When: each row as it is written; flushed at every checkpoint save and closed at the end, on an
  interrupt or an error.
* Resume: the same ``OUT/tb/`` goes on with a new event file whose ``purge_step`` is the
  checkpoint's step + 1: steps an earlier process logged after that checkpoint (lost with it,
  and trained again) are hidden, so no step appears twice (TensorBoard's purge, as for a crashed
  job). W&B continues the same run id (``OUT/wandb/hymba_run_id``, ``resume="allow"``); it has no
  purge step: steps logged again after a resume are W&B's to resolve (its ``step`` must grow).

The packages are optional (``pip install 'hymba_plus[log]'``): ``check_available`` says in one line
which is missing before the run starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any

#: --log-to targets -> (the module the run imports, what to install)
TARGETS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}

#: the TensorBoard log directory under OUT
TB_DIR = "tb"


class MissingPackage(RuntimeError):
    """A ``--log-to`` target whose package is not installed (one line: what to install)."""


def parse_targets(value: str | None) -> tuple[str, ...]:
    """The targets of a ``log_to`` setting: None, ``""`` or ``none``: none; else names from ``TARGETS``,
    comma-separated (``tensorboard,wandb``). A ValueError (one line) for anything else."""
    if value is None or value.strip().lower() in ("", "none"):
        return ()
    names = [n.strip() for n in value.split(",")]
    bad = [n for n in names if n not in TARGETS]
    if bad or len(set(names)) != len(names):
        why = f"unknown {bad[0]!r}" if bad else "a target named twice"
        raise ValueError(f"must be {' or '.join(TARGETS)} (or both, comma-separated; none: off), got {value!r}: {why}")
    return tuple(names)


def check_available(targets: tuple[str, ...], given_as: str) -> None:
    """Each target's package importable, else ``MissingPackage`` naming ``given_as`` (the flag or the
    recipe key that asked for it) and the install command."""
    for name in targets:
        module, package = TARGETS[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingPackage(f"{given_as} {name}: needs the {package} package, which is not installed: pip install "
                                 f"'hymba_plus[log]' (or pip install {package})") from None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """The numeric values of a ``metrics.jsonl`` row (but its ``step``) under the names they are logged
    with (the module docstring)."""
    out: dict[str, float] = {}
    for k, v in row.items():
        if k == "step":
            continue
        name = k if "/" in k else f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"
        if _number(v):
            out[name] = float(v)
        elif isinstance(v, list) and v and all(_number(x) for x in v):
            out.update({f"{name}/{i}": float(x) for i, x in enumerate(v)})
    return out


def run_config(recipe: Any, cfg: Any) -> dict[str, Any]:
    """The run's settings as logged once: the recipe's name and hash, the train settings (nested
    sections as ``distill.kl_weight``; unset ones left out)."""
    flat: dict[str, Any] = {"recipe": recipe.name, "recipe_hash": recipe.hash()}

    def add(prefix: str, d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                add(f"{prefix}{k}.", v)
            elif v is not None:
                flat[prefix + k] = v

    add("", dataclasses.asdict(cfg))
    return flat


def _why(e: Exception) -> str:
    """What a logger that cannot start says: an OSError's path and reason (``OUT/tb: File exists``); a
    pydantic ``ValidationError`` (W&B checks its settings, ``WANDB_MODE`` among them, with pydantic: its
    first line, ``1 validation error for Settings``, names nothing) the setting, the value and why; else
    the error's first line."""
    from ..core.config import brief, first_line

    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    errors = getattr(e, "errors", None)
    if isinstance(e, ValueError) and callable(errors):
        try:
            first = errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            return brief(f"{where} {brief(first['input'])}: {first['msg']}", 160)
        except Exception:  # noqa: BLE001, S110 - not pydantic's: its first line below
            pass
    return brief(first_line(e), 160)


class LoggerError(RuntimeError):
    """A logger that cannot start (W&B online without a login, a log folder that cannot be written): one
    line naming the target."""


class ExperimentLog:
    """The run's loggers (rank 0): ``log(row)`` after each row of ``metrics.jsonl``, ``flush()`` at each
    checkpoint, ``close()`` at the end. ``start_step``: the step the run starts after (a resumed run's
    checkpoint step, else 0); ``resumed``: it continues a run in ``out``."""

    def __init__(self, out: Path, targets: tuple[str, ...], config: dict[str, Any], start_step: int,
                 resumed: bool):
        self.tb = self.wandb = None
        name = "tensorboard"
        try:
            if "tensorboard" in targets:
                self.tb = self._tensorboard(out, config, start_step, resumed)
            name = "wandb"
            if "wandb" in targets:
                self.wandb = self._wandb(out, config, resumed)
        except Exception as e:
            self.close(failed=True)
            raise LoggerError(f"--log-to {name}: cannot start ({_why(e)})") from None
        except BaseException:
            self.close(failed=True)
            raise

    @staticmethod
    def _tensorboard(out: Path, config: dict[str, Any], start_step: int, resumed: bool) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        first = not any((out / TB_DIR).glob("events.out.tfevents.*"))  # (a resumed run may start logging)
        # purge_step: a resumed run hides the earlier files' events from its first step on (steps logged
        # after the checkpoint, lost with the process that logged them); None: nothing to hide
        writer = SummaryWriter(log_dir=str(out / TB_DIR), purge_step=start_step + 1 if resumed else None)
        text = "\n".join(f"    {k}: {json.dumps(v)}" for k, v in config.items())  # markdown: a code block
        writer.add_text("config", text, global_step=start_step)
        if first:  # the HPARAMS tab: the run's settings and the metrics they are compared by
            from torch.utils.tensorboard.summary import hparams

            values = {k: v if isinstance(v, (bool, int, float, str)) else json.dumps(v) for k, v in config.items()}
            for summary in hparams(values, {"train/loss": None, "eval/loss": None}):
                writer.file_writer.add_summary(summary)
        return writer

    @staticmethod
    def _wandb(out: Path, config: dict[str, Any], resumed: bool) -> Any:
        import wandb

        (out / "wandb").mkdir(parents=True, exist_ok=True)
        id_file = out / "wandb" / "hymba_run_id"
        run_id = id_file.read_text().strip() if resumed and id_file.is_file() else None
        if not run_id:
            import secrets
            import string

            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))  # W&B's form
            id_file.write_text(run_id + "\n")
        return wandb.init(project=os.environ.get("WANDB_PROJECT") or "hymba_plus", name=config.get("recipe"),
                          id=run_id, resume="allow", dir=str(out), config=config)

    def log(self, row: dict[str, Any]) -> None:
        values = scalars(row)
        if self.tb is not None:
            for name, v in values.items():
                self.tb.add_scalar(name, v, global_step=row["step"])
        if self.wandb is not None:
            self.wandb.log(values, step=row["step"])

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self, failed: bool = False) -> None:
        """Close both loggers, the second one too when closing the first fails (its error then raised
        after: TensorBoard's writer thread re-raises a write error, a full disk, at its close)."""
        tb, run, self.tb, self.wandb = self.tb, self.wandb, None, None
        try:
            if tb is not None:
                tb.close()
        finally:
            if run is not None:
                run.finish(exit_code=1 if failed else 0)
