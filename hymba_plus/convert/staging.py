"""Write a conversion's output folder all at once: files go to a hidden sibling folder that is
renamed to the output when everything is written, and removed if anything fails, so a failed
conversion leaves nothing behind and an existing folder is never overwritten."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .loader import ConvertError


def _outermost_missing(path: Path) -> Path | None:
    """The outermost missing folder above ``path`` (what creating it makes first), or None where
    ``path``'s parent exists; its parent is the nearest ancestor that exists."""
    p, missing = path.parent, None
    while not p.exists() and p.parent != p:
        p, missing = p.parent, p
    return missing


def check_output(out: Path) -> None:
    """``out`` may be absent or an empty folder; anything else is refused (nothing is overwritten).
    Missing folders above it are made by ``staged`` (as ``hymba train --out`` makes its own); the
    nearest one that exists must be a writable folder."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: already exists and is not an empty folder (nothing overwritten; choose "
                           "another output folder)")
    missing = _outermost_missing(out.resolve())
    base = out.resolve().parent if missing is None else missing.parent
    if not base.is_dir():
        raise ConvertError(f"{out}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK):
        raise ConvertError(f"{out}: the folder {base} is not writable")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    check_output(out)
    parent = out.resolve().parent
    made = _outermost_missing(out.resolve())  # the outermost folder made here: removed again if the conversion fails
    if made is not None:
        parent.mkdir(parents=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(made if made is not None else tmp, ignore_errors=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
