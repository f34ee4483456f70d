"""training/*.sh: the launch scripts pass the command lines their usage lines promise.

Each script runs with ``HYMBA=echo`` (``PYTHON=echo`` for torchrun.sh), so it prints the command
it would run. ``[OUT]`` is optional before the flags: a first extra argument that is a flag is a
flag, not the output folder (it once became ``--out --steps``)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def run(script: str, *args: str) -> list[str]:
    env = {**os.environ, "HYMBA": "echo", "PYTHON": "echo"}
    out = subprocess.run(["bash", str(ROOT / "training" / script), *args], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    return [line.split() for line in out.splitlines()]


def test_train_cpu_out_is_optional_before_flags():
    assert run("train_cpu.sh", "configs/gpt_tiny.yaml") == [
        ["train", "configs/gpt_tiny.yaml", "--out", "runs/gpt_tiny"]]
    assert run("train_cpu.sh", "configs/gpt_tiny.yaml", "runs/g", "--steps", "3") == [
        ["train", "configs/gpt_tiny.yaml", "--out", "runs/g", "--steps", "3"]]
    assert run("train_cpu.sh", "configs/gpt_tiny.yaml", "--steps", "3") == [
        ["train", "configs/gpt_tiny.yaml", "--out", "runs/gpt_tiny", "--steps", "3"]]


def test_train_text_out_is_optional_before_flags(tmp_path):
    corpus = str(tmp_path / "corpus")
    assert run("train_text.sh", corpus, "configs/gpt_tiny.yaml", "--seq-len", "64") == [
        ["prepare", corpus, "--out", "runs/text.shards"],
        ["train", "configs/gpt_tiny.yaml", "--data", "runs/text.shards", "--out", "runs/text", "--seq-len", "64"]]


def test_torchrun_out_is_optional_before_flags():
    (line,) = run("torchrun.sh", "2", "configs/gpt_tiny.yaml", "--steps", "3")
    assert line[line.index("--out"):] == ["--out", "runs/gpt_tiny-x2", "--steps", "3"]
