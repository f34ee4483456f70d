"""``benchmarks/gpu_suite.sh``: every Python script a step runs accepts the arguments the step
gives it (parsed on the CPU with the script's own argparse parser, nothing run), so a typo in a
path name or a flag costs no GPU call."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"

# sample values for the shell variables the steps use
VARS = {"OUT": "/tmp/gpu-suite-test", "m": "gdn", "dt": "float32"}

# run inside one interpreter: each script as __main__ with its argv, stopped right after its
# parser accepted the arguments (argparse's own exit 2 and message when it does not)
BOOT = r"""
import argparse, json, os, runpy, sys
class Parsed(BaseException):  # not caught by a script's "except Exception"
    pass
orig = argparse.ArgumentParser.parse_known_args
def parse_known_args(self, args=None, namespace=None):
    orig(self, args, namespace)  # argparse exits 2 with its message on bad arguments
    raise Parsed()
argparse.ArgumentParser.parse_known_args = parse_known_args
bad = []
for script, argv in json.loads(sys.argv[1]):
    sys.argv = [script, *argv]
    sys.path.insert(0, os.path.dirname(script))
    try:
        runpy.run_path(script, run_name="__main__")
        bad.append([script, argv, "ran without parsing arguments"])
    except Parsed:
        pass
    except SystemExit as e:
        bad.append([script, argv, f"exit {e.code}"])
    finally:
        sys.path.pop(0)
print("BAD " + json.dumps(bad))
"""


def suite_commands() -> list[tuple[str, list[str]]]:
    """(script path, arguments) of every ``python X.py ...`` in the suite, shell variables filled
    in, continuation lines joined; a ``warm_autotune.py`` step adds its inner workload too."""
    text = SUITE.read_text().replace("\\\n", " ")
    cmds = []
    in_bench = False  # inside a "(cd benchmarks && ..." subshell, which may span lines
    for line in text.splitlines():
        code = line.split(" #", 1)[0].rstrip()
        if code.lstrip().startswith("#"):
            continue
        opened = code.find("(cd benchmarks")
        for m in re.finditer(r"\bpython ([\w/]+\.py)(.*)", code):
            rest = re.split(r";;|\)\s*$|\) ;;", m.group(2))[0]
            rest = re.sub(r"\$\{?(\w+)\}?", lambda v: VARS.get(v.group(1), v.group(0)), rest)
            script = m.group(1)
            base = ROOT / "benchmarks" if in_bench or 0 <= opened < m.start() else ROOT
            args = shlex.split(rest)
            cmds.append((str(base / script), args))
            if script.endswith("warm_autotune.py"):  # its workload: the first argument that is a script
                i = next(j for j, a in enumerate(args) if a.endswith(".py"))
                cmds.append((str(base / args[i]), [a.replace("{shard}", "0") for a in args[i + 1 :]]))
        if opened >= 0:
            in_bench = True
        if in_bench and re.search(r"\)\s*(;;)?$", code):
            in_bench = False
    return cmds


def test_every_step_script_accepts_its_arguments():
    cmds = suite_commands()
    scripts = {Path(s).name for s, _ in cmds}
    assert {"mixers.py", "warm_autotune.py", "side_by_side.py", "quad_atlas.py"} <= scripts, scripts
    assert all(Path(s).is_file() for s, _ in cmds), [s for s, _ in cmds if not Path(s).is_file()]
    res = subprocess.run([sys.executable, "-c", BOOT, json.dumps(cmds)], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    out = [line for line in res.stdout.splitlines() if line.startswith("BAD ")]
    assert out, res.stderr[-3000:]
    assert json.loads(out[-1][4:]) == [], res.stderr[-3000:]
