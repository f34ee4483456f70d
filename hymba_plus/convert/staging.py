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


def check_output(out: Path) -> None:
    """``out`` may be absent or an empty folder; anything else is refused (nothing is overwritten)."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"{out}: already exists and is not an empty folder (nothing overwritten; choose "
                           "another output folder)")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise ConvertError(f"{out}: its parent folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise ConvertError(f"{out}: its parent folder {parent} is not writable")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    check_output(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.resolve().parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
