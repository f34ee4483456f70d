"""``hymba check PATH...``: validate recipes (files, or folders searched for *.yaml / *.yml).

Every problem is one line ``FILE:LINE: key.path: message (did you mean ...?)`` on stderr;
every valid recipe one line ``OK FILE (name, N layers, hash)`` on stdout (``-q`` hides
them); a recipe laid out by ratios adds what they resolve to and any rounding on the same
line: ``OK FILE (name, 6 layers, hash): layout 6 layers -> GD | M3 | GD | GA | M3 | GD
(rounded: mamba3 1.5 -> 2, gated_attn 1.5 -> 1)``. A valid recipe is also built on the meta device (no memory is allocated), so a
recipe the loader accepts but a component cannot build is reported too.

Exit status: 0 every recipe valid, 1 any invalid, 2 usage (no path, a path that does not
exist, a folder without recipes).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

from . import UsageError, add_set_argument, check_sets, path_text

SUFFIXES = (".yaml", ".yml")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("paths", nargs="*", type=path_text, metavar="PATH", help="recipe files or folders (searched recursively)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems and the summary")
    p.add_argument("--no-build", action="store_true", help="validate only; do not build on the meta device")
    add_set_argument(p)  # the same overrides for every recipe checked


def find_recipes(paths: list[str]) -> list[Path]:
    """Recipe files named by ``paths`` (folders: recursively, hidden folders skipped), in order."""
    if not paths:
        raise UsageError("give at least one recipe file or folder (hymba check PATH...)")
    out: list[Path] = []
    for s in paths:
        p = Path(s)
        if not p.exists():
            raise UsageError(f"{s}: no such file or folder")
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.suffix in SUFFIXES and (f.is_file() or f.is_symlink() and not f.exists())  # a broken link: an error
                and not any(part.startswith(".") for part in f.relative_to(p).parts)
            )
            if not found:
                raise UsageError(f"{s}: no *.yaml or *.yml recipes in this folder")
            out += found
        else:
            out.append(p)
    seen: set[str] = set()  # (realpath: Path.resolve raises on a loop of links)
    kept = []
    for f in out:
        if (real := os.path.realpath(f)) not in seen:
            seen.add(real)
            kept.append(f)
    return kept


class Checked(NamedTuple):
    errors: list[str]  # one line per problem; empty when the recipe is valid
    summary: str  # ``name, N layers, hash`` of a valid recipe
    layout: str | None = None  # a ratio layout: ``layout N layers -> ... (rounded: ...)``

    def ok_line(self, path: "Path | str") -> str:
        return f"OK {path} ({self.summary})" + (f": {self.layout}" if self.layout else "")


def check_file(path: Path, build: bool = True, sets: "list[str] | tuple[str, ...]" = ()) -> Checked:
    """(error lines, summary of the valid recipe, its layout line), with the overrides ``sets`` (``--set``)
    applied. Never raises for a bad recipe; a ``--set`` malformed for it is a ``UsageError``."""
    from ..core.recipe import OverrideError, RecipeError, load_recipe

    try:
        recipe = load_recipe(path, overrides=sets)
    except OverrideError as e:
        raise UsageError(str(e)) from None
    except RecipeError as e:
        return Checked([" ".join(line.split("\n")) for line in e.errors], "")
    if build:
        err = build_error(recipe)
        if err:
            return Checked([f"{path}:1: model: the recipe validates but the model cannot be built: {err}"], "")
    n = len(recipe.layers)
    return Checked([], f"{recipe.name}, {n} layer{'s' if n != 1 else ''}, {recipe.hash()}", recipe.layout_line)


def build_error(recipe) -> str:  # noqa: ANN001 - Recipe
    """Build the model on the meta device; '' if it builds, else a one-line reason."""
    import torch

    from ..models.lm import HybridLM

    try:
        with torch.device("meta"):
            HybridLM(recipe)
    except Exception as e:  # noqa: BLE001 - reported as one line: a loader gap, not a user bug
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    return ""


def emit(text: str, err: bool = False) -> None:
    """print, but a closed pipe (``hymba check ... | head``) ends the command quietly
    (exit 141, like a process killed by SIGPIPE) instead of with a traceback."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())  # no second error at exit
        raise SystemExit(141) from None


def run(args: argparse.Namespace) -> int:
    check_sets(args)
    files = find_recipes(args.paths)
    bad = 0
    several = len(files) > 1  # an error at an overridden key (``--set KEY=VALUE: ...``) then names its recipe
    for f in files:
        try:
            result = check_file(f, build=not args.no_build, sets=args.sets)
        except UsageError as e:
            raise UsageError(f"{f}: {e}" if several else str(e)) from None
        if result.errors:
            bad += 1
            for line in result.errors:
                emit(f"{f}: {line}" if several and line.startswith("--set ") else line, err=True)
        elif not args.quiet:
            emit(result.ok_line(f))
    if len(files) > 1 or args.quiet:
        emit(f"{len(files)} recipe{'s' if len(files) != 1 else ''} checked, {bad} invalid", err=bool(bad))
    return 1 if bad else 0
