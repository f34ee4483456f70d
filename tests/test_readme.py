"""README.md does not drift from the code.

* Every ``$ hymba check ...`` / ``$ hymba info ...`` sample in a fenced block is run (in
  process, from the repository root) and its output compared line by line with the
  sample; a line ``...`` in the sample stands for any run of lines (none included).
  The samples show a machine without CUDA (``fast paths: atlas_cpu (CPU: reference paths for the rest)``).
* The configs table names exactly the recipes in ``configs/``.
* The recipe block of "A recipe" is ``configs/quad_hybrid_tiny.yaml``; the ``python`` block runs.
* ``make test`` draws the same property-test examples every run (every ``@given`` test derandomized).
* Every ``hymba SUB ...`` command in README.md and training/README.md (fenced blocks and inline code)
  names a subcommand and flags that exist.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import shlex
from pathlib import Path

import pytest

from hymba_plus.cli import main
from tests.conftest import DEEP

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
READ_ONLY = ("check", "info")  # the commands a sample may run: they never write


def fenced_blocks(text: str) -> list[list[str]]:
    blocks, cur = [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if cur is None:
                cur = []
            else:
                blocks.append(cur)
                cur = None
        elif cur is not None:
            cur.append(line)
    return blocks


def samples(text: str) -> list[tuple[str, list[str]]]:
    """(command line, expected output lines) of every ``$ hymba check|info`` in a fenced block."""
    out: list[tuple[str, list[str]]] = []
    for block in fenced_blocks(text):
        if not block or not block[0].startswith("$ "):
            continue  # not a terminal session
        for line in block:
            if line.startswith("$ "):
                out.append((line[2:], []))
            else:
                out[-1][1].append(line)
    for _, lines in out:  # a blank line may separate two commands of one block
        while lines and not lines[-1].strip():
            lines.pop()
    return [(cmd, lines) for cmd, lines in out if shlex.split(cmd)[:2] in (["hymba", c] for c in READ_ONLY)]


def matches(expected: list[str], actual: list[str]) -> bool:
    """Line-equal, where a ``...`` line of ``expected`` matches any run of ``actual`` lines."""
    memo: dict[tuple[int, int], bool] = {}

    def go(i: int, j: int) -> bool:
        if (i, j) not in memo:
            if i == len(expected):
                memo[i, j] = j == len(actual)
            elif expected[i] == "...":
                memo[i, j] = any(go(i + 1, k) for k in range(j, len(actual) + 1))
            else:
                memo[i, j] = j < len(actual) and expected[i] == actual[j] and go(i + 1, j + 1)
        return memo[i, j]

    return go(0, 0)


def snapshot(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under the paths a command names, and the names at the root."""
    snap: dict[str, tuple[int, int]] = {p.name: (0, 0) for p in ROOT.iterdir()}
    for p in paths:
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else []
        for f in files:
            st = f.stat()
            snap[str(f)] = (st.st_size, st.st_mtime_ns)
    return snap


SAMPLES = samples(README.read_text())


def test_readme_has_the_cli_samples():
    assert {shlex.split(cmd)[1] for cmd, _ in SAMPLES} == set(READ_ONLY)
    assert all(lines for _, lines in SAMPLES)


@pytest.mark.parametrize("cmd, expected", SAMPLES, ids=[c for c, _ in SAMPLES])
def test_readme_cli_sample(cmd, expected, monkeypatch, capsys):
    from hymba_plus.cli import info

    argv = shlex.split(cmd)[1:]
    assert argv[0] in READ_ONLY
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("HYMBA_KERNELS", raising=False)
    monkeypatch.delenv("HYMBA_KERNELS_OFF", raising=False)
    monkeypatch.setattr(info, "cuda_available", lambda: False)  # the samples show a CPU machine
    named = [ROOT / a for a in argv[1:] if not a.startswith("-") and (ROOT / a).exists()]
    before = snapshot(named)
    both = io.StringIO()  # stdout and stderr interleaved, as a terminal shows them
    with contextlib.redirect_stdout(both), contextlib.redirect_stderr(both):
        main(argv)
    assert snapshot(named) == before, "a README sample command wrote files"
    actual = both.getvalue().splitlines()
    assert capsys.readouterr().out == ""
    assert matches(expected, actual), (
        f"README.md's sample of `{cmd}` differs from what it prints now:\n" + "\n".join(actual))


def test_matches():
    assert matches(["a", "...", "d"], ["a", "b", "c", "d"])
    assert matches(["a", "...", "b"], ["a", "b"])
    assert matches(["..."], [])
    assert not matches(["a", "...", "d"], ["a", "b", "c"])
    assert not matches(["a", "b"], ["a", "b", "c"])
    assert not matches(["a", "c"], ["a", "b", "c"])


def configs_table(text: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("The recipes in `configs/`"))
    names = []
    for line in lines[start + 1:]:
        if names and not line.startswith("|"):
            break
        if m := re.match(r"^\| `([^`]+)` \|", line):
            names.append(m.group(1))
    return names


def test_configs_table_names_every_recipe():
    names = configs_table(README.read_text())
    on_disk = sorted(p.name for p in (ROOT / "configs").iterdir() if p.suffix in (".yaml", ".yml"))
    assert len(names) == len(set(names)), names
    assert sorted(names) == on_disk


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```LANG fenced blocks, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_recipe_block_is_the_shipped_recipe():
    """The first ```yaml block (section "A recipe") is configs/quad_hybrid_tiny.yaml, comments aside."""
    import yaml

    block = fenced(README.read_text(), "yaml")[0]
    assert yaml.safe_load(block) == yaml.safe_load((ROOT / "configs" / "quad_hybrid_tiny.yaml").read_text())


def test_readme_python_block_runs(tmp_path, monkeypatch):
    """The ```python block (section "Python") runs as written, from a folder beside configs/ (it
    writes runs/x); its assert is the invariant. About 2 s in the test suite's one torch thread."""
    (block,) = fenced(README.read_text(), "python")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HYMBA_KERNELS", raising=False)
    monkeypatch.delenv("HYMBA_KERNELS_OFF", raising=False)
    env: dict = {}
    exec(compile(block, "README.md (python block)", "exec"), env)
    assert env["out"].logits.shape == (2, 16, 256)
    assert env["new"].shape == (2, 4 + 32)
    assert (tmp_path / "runs" / "x" / "recipe.yaml").is_file()


@pytest.mark.skipif(DEEP > 1, reason="make test-deep draws at random on purpose")
def test_make_test_draws_the_same_property_examples_every_run():
    """README ("`make test` draws the same ones every time") and CONTRIBUTING ("derandomized in
    `make test`"): every hypothesis test of the suite runs derandomized, its own ``@settings`` or
    not; only ``make test-deep`` (HYMBA_TEST_DEEP) draws new examples."""
    random = []
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if "@given" not in path.read_text():
            continue
        module = importlib.import_module(f"tests.{path.stem}")
        for name, fn in vars(module).items():
            s = getattr(fn, "_hypothesis_internal_use_settings", None)
            if name.startswith("test") and getattr(fn, "is_hypothesis_test", False) and not s.derandomize:
                random.append(f"{path.name}::{name}")
    assert not random, f"property tests drawing new examples every run: {random}"


DOCS = (README, ROOT / "training" / "README.md")


def documented_commands(text: str) -> list[str]:
    """Every ``hymba ...`` command line of ``text``: a line of a fenced block (a ``$ `` prompt, a
    comment and a ``&&`` chain's other commands cut off) or an inline code span."""
    cmds = []
    for block in fenced_blocks(text):
        for line in block:
            for part in line.removeprefix("$ ").split("#")[0].split("&&"):
                if part.strip().startswith("hymba "):
                    cmds.append(part.strip())
    outside = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    cmds += [m.group(1) for m in re.finditer(r"`(hymba [^`]+)`", outside)]
    return cmds


def test_documented_commands_and_flags_exist():
    """A README command whose subcommand or flag the CLI does not have fails as a usage error when
    followed; each ``--flag`` of every documented ``hymba`` command (``[--draft CKPT]``, ``--mode a|b``
    and ``--flag=value`` forms included) is an option of that subcommand's parser."""
    import argparse

    from hymba_plus.cli import COMMANDS

    flags = {}
    for name, (module, _) in COMMANDS.items():
        p = argparse.ArgumentParser()
        importlib.import_module(f"hymba_plus.cli.{module}").add_arguments(p)
        flags[name] = set(p._option_string_actions)
        for a in p._actions:  # a command of actions (`hymba tokenizer train`): its actions' flags
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    flags[name] |= set(sub._option_string_actions)
    seen, wrong = 0, []
    for doc in DOCS:
        for cmd in documented_commands(doc.read_text()):
            words = cmd.replace("[", " ").replace("]", " ").split()
            if words[1].endswith(":"):
                continue  # a sample error line (`hymba convert: src/config.json: ...`), not a command
            if words[1] not in COMMANDS:
                wrong.append(f"{doc.name}: `{cmd}`: no subcommand {words[1]!r}")
                continue
            seen += 1
            for w in words[2:]:
                flag = w.split("=")[0]
                if flag.startswith("--") and flag not in flags[words[1]]:
                    wrong.append(f"{doc.name}: `{cmd}`: hymba {words[1]} has no {flag}")
    assert seen > 40 and not wrong, wrong
