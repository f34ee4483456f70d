"""The local tasks' data for tests/test_harness.py: JSONL files beside this module, read without the network
or the ``datasets`` cache (the task YAMLs' ``custom_dataset``)."""

import json
from pathlib import Path

import datasets

HERE = Path(__file__).resolve().parent


def _split(name: str) -> dict:
    rows = [json.loads(line) for line in (HERE / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def choices(**kwargs) -> dict:  # noqa: ANN003 - the harness passes the task's metadata
    return _split("tiny_mc.jsonl")


def completions(**kwargs) -> dict:  # noqa: ANN003
    return _split("tiny_gen.jsonl")


def texts(**kwargs) -> dict:  # noqa: ANN003
    return _split("tiny_ppl.jsonl")
