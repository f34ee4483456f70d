"""Streaming access to a folder of safetensors files (one file, or shards with an index).

``ShardedReader(folder)`` checks up front that every shard the index names exists and that
every tensor header parses, without reading tensor data; ``shape(name)`` reads only the
header, ``get(name)`` reads one tensor (memory-mapped by safetensors' ``safe_open``), so a
conversion holds one layer's source tensors at a time, never a second copy of the model.

``ShardWriter`` writes tensors to ``model.safetensors``, or to ``model-0000i-of-0000n
.safetensors`` shards plus ``model.safetensors.index.json`` once they pass ``max_shard_bytes``;
each shard is flushed as soon as it is full.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class ConvertError(ValueError):
    """A conversion that cannot go ahead: one line naming the file (and tensor or key)."""


class ConvertOptionError(ConvertError):
    """An option's value the conversion cannot take (an ``architecture`` that is no supported class, or one
    that cannot express the recipe): one line naming the option; ``hymba convert`` exits 2 on it."""


class ShardedReader:
    """The tensors of ``model.safetensors``, else of the shards ``model.safetensors.index.json`` names."""

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        self.where: dict[str, Path] = {}
        # self.source: where the checkpoint lists its tensors (an error about a missing one names it)
        if (self.folder / SINGLE).is_file():  # before an index, as transformers loads a folder holding both
            files = [SINGLE]
            self.source = self.folder / SINGLE
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not a mapping")
                if not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map's values must be shard file names")
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ConvertError(f"{index}: not a safetensors index ({e})") from None
            files = sorted(set(weight_map.values()))
            self.source = index
            for f in files:
                if not isinstance(f, str) or "/" in f or "\\" in f or f.startswith("."):
                    raise ConvertError(f"{index}: bad shard name {f!r}")
                if not (self.folder / f).is_file():
                    raise ConvertError(f"{self.folder / f}: missing shard (named in {INDEX})")
            self.where = {k: self.folder / v for k, v in weight_map.items()}
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not found:
                pickles = sorted(p.name for p in self.folder.glob("*.bin"))
                if pickles:
                    raise ConvertError(f"{self.folder}: only pickle weights ({pickles[0]}); hymba convert reads "
                                       "safetensors only (pickle files are never loaded): save the model with "
                                       "safe_serialization")
                raise ConvertError(f"{self.folder}: no model.safetensors and no {INDEX}")
            if len(found) > 1:
                raise ConvertError(f"{self.folder}: {len(found)} .safetensors files but no {INDEX}")
            files = found
            self.source = self.folder / found[0]
        indexed = bool(self.where)
        self._handles = {}
        for f in files:
            path = self.folder / f
            try:
                h = safe_open(str(path), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise ConvertError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
            self._handles[path] = h
            if not indexed:
                self.where.update(dict.fromkeys(h.keys(), path))
        for k, path in self.where.items():  # the index decides where each tensor is
            if k not in set(self._handles[path].keys()):
                raise ConvertError(f"{path}: tensor {k!r} missing (the index places it in this shard)")

    def keys(self) -> list[str]:
        return sorted(self.where)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def file(self, name: str) -> Path:
        """The file holding the tensor ``name`` (errors name it)."""
        return self.where[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape from the header alone (no tensor data read)."""
        return tuple(self._handles[self.where[name]].get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        if name not in self.where:
            raise ConvertError(f"{self.folder}: tensor {name!r} not found")
        return self._handles[self.where[name]].get_tensor(name)

    def metadata(self) -> dict[str, str]:
        first = next(iter(self._handles.values()))
        return first.metadata() or {}

    def files(self) -> Iterator[Path]:
        yield from self._handles


class ShardWriter:
    """Write tensors in order; a new shard starts when the current one would pass ``max_shard_bytes``."""

    def __init__(self, folder: Path, max_shard_bytes: int | None = None, metadata: dict[str, str] | None = None):
        self.folder = folder
        self.limit = max_shard_bytes
        self.metadata = metadata or {}
        self.current: dict[str, Tensor] = {}
        self.size = 0
        self.shards: list[tuple[str, list[str], int]] = []  # temp name, keys, bytes

    def add(self, name: str, t: Tensor) -> None:
        n = t.numel() * t.element_size()
        if self.limit is not None and self.current and self.size + n > self.limit:
            self._flush()
        self.current[name] = t.detach().contiguous().cpu()
        self.size += n

    def _flush(self) -> None:
        from ..models.lm import write_safetensors

        name = f"shard-{len(self.shards)}.tmp"
        write_safetensors(self.current, self.folder / name, self.metadata)
        self.shards.append((name, list(self.current), self.size))
        self.current, self.size = {}, 0

    def close(self) -> list[str]:
        """Flush, rename the shards to their final names; returns the file names written."""
        if self.current or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / self.shards[0][0], self.folder / SINGLE)
            return [SINGLE]
        weight_map, total, names = {}, 0, []
        for i, (tmp, keys, size) in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            weight_map.update(dict.fromkeys(keys, final))
            total += size
            names.append(final)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return [*names, INDEX]


def dtype_name(t: Tensor) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(t.dtype, str(t.dtype))
