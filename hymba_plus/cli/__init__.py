"""The ``hymba`` console script. Each subcommand is a module in this package with
``add_arguments(parser)`` and ``run(args) -> int``; ``COMMANDS`` lists them.

Errors the user can fix (bad recipe, missing file, bad flag) print one line to stderr and
exit non-zero — never a traceback. Exit codes: 0 ok, 1 invalid input / failed, 2 usage (README.md,
"Exit codes": a flag's value the checkpoint or recipe cannot take is usage; a file's contents are input).
Python warnings raised while a command runs print as one line each, ``warning: MESSAGE``.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..core.config import brief

#: subcommand -> (module under hymba_plus.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("check", "validate recipes (files or folders)"),
    "info": ("info", "layer table, parameters, cache bytes of a recipe"),
    "train": ("train", "train a model from a recipe (checkpoints, metrics, loss plot)"),
    "generate": ("generate", "generate text from a checkpoint, or forecast a series (--mode forecast)"),
    "eval": ("eval", "evaluate a checkpoint on held-out data (the run's own eval metrics), without training, "
                     "or on lm-evaluation-harness tasks (--tasks)"),
    "prepare": ("prepare", "tokenize text, JSON Lines or Parquet files into memory-mapped token shards"),
    "tokenizer": ("tokenizer", "train a byte-level BPE tokenizer on text data (hymba tokenizer train)"),
    "convert": ("convert", "import / export HF transformers checkpoints, or hybridize a pretrained model"),
    "bench": ("bench", "training-step, prefill and decode throughput of a recipe on one device"),
}


def finite_float(text: str) -> float:
    """argparse type of every float flag: a number, not nan or inf (NaN passes no range check)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return v


def int_in(lo: int, hi: int | None = None, name: str = "int") -> Callable[[str], int]:
    """An argparse type: an integer in ``lo .. hi`` (no upper bound when ``hi`` is None); ``name`` is the
    type's name in argparse's 'invalid ... value' line."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {text}" if hi is None
                                             else f"must be in {lo} .. {hi}, got {text}")
        return v

    parse.__name__ = name
    return parse


def seed_int(text: str) -> int:
    """argparse type of ``--seed``: an integer in 0 .. ``training.config.SEED_MAX``."""
    from ..training.config import SEED_MAX

    return int_in(0, SEED_MAX)(text)


class UsageError(Exception):
    """Bad command-line usage: a flag's value (out of range, or one the checkpoint or recipe cannot take)
    or flags that do not go together: one line, exit 2."""


class UserError(Exception):
    """Bad input (file, checkpoint, data: missing, or contents invalid) or a run that cannot go on: one
    line, exit 1."""


def output_file(text: str | None, flag: str = "--json") -> Path | None:
    """The file a command's ``flag`` (``--json FILE``) names, checked before any work: a folder or a name
    that is no file name is a usage line (exit 2); None when not given. ``write_output`` writes it."""
    if text is None:
        return None
    out = Path(text)
    if out.is_dir() or out.name in ("", ".", ".."):
        raise UsageError(f"{flag} {text}: expected a file name")
    return out


def write_output(out: Path, text: str, flag: str) -> None:
    """``text`` to the file ``out`` (a command's output named by ``flag``, e.g. ``--json``) under a temporary
    name first, then renamed over it: a failure leaves neither the temporary file nor an old ``out`` changed
    (``hymba generate --out``'s rule); one ``UserError`` line naming the flag and the path."""
    import contextlib
    import os

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"{flag} {brief(str(out), 80)}: cannot write ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


#: the commands that run a model, where the kernel settings (``HYMBA_KERNELS``, ``HYMBA_KERNELS_OFF``) are
#: checked before anything runs
KERNEL_COMMANDS = ("info", "train", "generate", "eval", "bench")


def check_kernel_settings() -> None:
    """A bad ``HYMBA_KERNELS`` or ``HYMBA_KERNELS_OFF`` as one line (``UserError``), before a command runs
    (``kernels/dispatch.py`` reads them at the first kernel call, deep in a run: a traceback)."""
    from ..kernels import dispatch

    try:
        dispatch.mode()
        dispatch.off()
    except ValueError as e:
        raise UserError(str(e)) from None


#: an argument longer than this is shortened (``core.config.brief``) where argparse echoes it
ECHO_LIMIT = 80


def shorten_echoes(message: str, argv: list[str]) -> str:
    """``message`` with every over-long command-line value it echoes (quoted, as argparse's
    ``invalid choice: '...'``, or bare) cut by ``brief``: a mistyped flag, not a whole
    pasted file, ends up on the terminal."""
    values = {a.split("=", 1)[1] if a.startswith("-") and "=" in a else a for a in argv}
    for v in sorted((v for v in values if len(v) > ECHO_LIMIT), key=len, reverse=True):
        message = message.replace(repr(v), brief(v, ECHO_LIMIT)).replace(v, brief(v, ECHO_LIMIT))
    return message


def path_text(text: str) -> str:
    """argparse type of every path argument: not empty (an empty ``--out`` would mean "the default")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path")
    return text


def add_set_argument(p: argparse.ArgumentParser) -> None:
    """``--set KEY=VALUE`` (repeatable; ``args.sets``), the recipe overrides of ``check``, ``info``, ``train``
    and ``bench`` (``core.recipe.load_recipe(..., overrides=)``)."""
    p.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                   help="set a recipe key before the recipe is validated (repeatable): a key path and a YAML value, "
                        "e.g. --set model.d_model=256 --set components.gdn.n_heads=8 --set 'model.block_pattern=GA | "
                        "GD' --set 'components.gated_attn.rope={theta: 500000}' --set 'objective.clip[1]=0.9' (an existing "
                        "list item, from 0); a key the recipe lacks is added, a mapping replaces the whole section. Errors at such a key read `--set KEY=VALUE: ...`")


def add_text_field_argument(p: argparse.ArgumentParser, default: str | None = "text") -> None:
    """``--text-field NAME`` (``args.text_field``): the field of a JSON Lines row, the column of a Parquet file,
    read as a document (``training/readers.py``), of ``prepare``, ``tokenizer train``, ``train`` and ``eval``
    (``default`` None in the last two: unset, a train setting a resumed run, an evaluated checkpoint, takes from
    its checkpoint; read as ``text``)."""
    p.add_argument("--text-field", default=default, metavar="NAME",
                   help="the field of a JSON Lines object, the column of a Parquet file, that holds a document's "
                        "text (default text)")


def check_sets(args: argparse.Namespace) -> None:
    """A malformed ``--set`` (no ``=``, an empty key, a value that is not YAML) as a ``UsageError`` line,
    before anything is read."""
    from ..core.recipe import OverrideError, parse_overrides

    try:
        parse_overrides(args.sets)
    except OverrideError as e:
        raise UsageError(str(e)) from None


def load_recipe_with_sets(path: "Path | str", args: argparse.Namespace):  # noqa: ANN201 - a Recipe
    """``load_recipe(path, overrides=args.sets)``: an override that is malformed for this recipe (a key path
    through a setting that is not a mapping) is a ``UsageError`` (exit 2); a recipe that is invalid, by its
    file or by an override, a ``RecipeError`` for the command to report (exit 1)."""
    from ..core.recipe import OverrideError, load_recipe

    try:
        return load_recipe(path, overrides=args.sets)
    except OverrideError as e:
        raise UsageError(str(e)) from None


def _parser_class(argv: list[str]) -> type[argparse.ArgumentParser]:
    """An ``ArgumentParser`` (inherited by the subcommands' parsers) whose usage errors are one
    line, ``hymba CMD: MESSAGE (hymba CMD --help lists the flags)``, exit 2 (argparse's own print the
    usage block first), quoting the values of ``argv`` shortened (``shorten_echoes``)."""

    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            self.exit(2, f"{self.prog}: {shorten_echoes(message, argv)} ({self.prog} --help lists the flags)\n")

    return Parser


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file=None, line: str | None = None) -> None:  # noqa: ANN001 - warnings.showwarning's
    """``warnings.showwarning`` while a subcommand runs: ``warning: MESSAGE``, one line (Python's own
    format is two, with the source path and line of the warning); the library's callers keep theirs."""
    text = " ".join(str(message).split())
    try:
        print(f"warning: {text}", file=sys.stderr if file is None else file, flush=True)
    except OSError:  # (as warnings' own: a closed stderr loses the warning, not the run)
        pass


def _torch_version() -> str:
    import torch

    return torch.__version__


def main(argv: list[str] | None = None) -> int:
    from .. import __version__

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser_class(argv)(prog="hymba", description="hybrid language model zoo")
    parser.add_argument("--version", action="version", version=f"hymba {__version__} (torch {_torch_version()})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules = {}
    for name, (mod_name, help_text) in COMMANDS.items():
        mod = importlib.import_module(f"{__name__}.{mod_name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        modules[name] = mod
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():  # restores the caller's showwarning (main called from Python)
            warnings.showwarning = _one_line_warning
            if args.command in KERNEL_COMMANDS:
                check_kernel_settings()
            return int(modules[args.command].run(args) or 0)
    except UsageError as e:
        print(f"hymba {args.command}: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"hymba {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"hymba {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:  # a path the system refuses (a name too long, ...) wherever it was opened: one line
        where = f"{brief(str(e.filename), 80)}: " if e.filename is not None else ""
        print(f"hymba {args.command}: {where}{e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
