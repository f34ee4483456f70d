"""Compile the launch configs of fla's and mamba-ssm's autotuned Triton kernels in parallel,
before a run that autotunes them.

    cd benchmarks
    python warm_autotune.py --shards 8 mixers.py --only mamba3 gdn --out /tmp/warm-{shard}.json
    python mixers.py --only mamba3 gdn --out results/mixers_mamba3_tuned.json   # autotunes from the cache

Triton compiles an autotuned kernel's launch configs one after another on the first call of
each specialization (mamba-ssm's Mamba-3 backward: more than 330 s of ``ptxas`` on an H200
machine's first run, issue 18). This runs SCRIPT with its arguments ``--shards`` times at once;
process i runs with every autotuned kernel under ``--prefixes`` keeping only the launch configs
``i, i + N, i + 2N, ...`` (``hymba_plus.kernels.dispatch.sharded_autotune``), so the processes
compile every config once between them, on as many CPU cores, into Triton's on-disk cache
(``TRITON_CACHE_DIR``, default ``~/.triton/cache``). A later run of the same workload with the
full lists then loads each compiled config from that cache and only benchmarks them. The
shards' own timings and autotuning choices are not used (Triton keys its autotuning results
by the config list, so a shard's choice never stands in for the full list's).

``{shard}`` in an argument becomes the shard's number (separate output files). Each shard's
output goes to ``--logs`` (default: a temporary folder); the exit status is 0 when every
shard exited 0. Only the kernels of modules imported before SCRIPT starts are sharded
(``dispatch.AUTOTUNED_MODULES`` of each prefix, and what they import).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# run inside each shard's process: shard the autotuned kernels, then SCRIPT as __main__
BOOT = """
import os, runpy, sys
from hymba_plus.kernels import dispatch
shard, of, prefixes, script = int(sys.argv[1]), int(sys.argv[2]), tuple(sys.argv[3].split(",")), sys.argv[4]
sys.argv = [script, *sys.argv[5:]]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
with dispatch.sharded_autotune(*prefixes, shard=shard, of=of) as n:
    print(f"warm_autotune: shard {shard} of {of}: {n} autotuned kernels sharded", flush=True)
    runpy.run_path(script, run_name="__main__")
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=8, help="processes at once (default 8)")
    ap.add_argument("--prefixes", default="fla.,mamba_ssm.", help="module prefixes whose kernels are sharded")
    ap.add_argument("--logs", default=None, help="folder for each shard's output (default: a temporary one)")
    ap.add_argument("script", help="the Python script of the workload")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = ap.parse_args(argv)
    if a.shards < 1:
        ap.error(f"--shards {a.shards}: need at least 1")
    if not Path(a.script).is_file():
        ap.error(f"{a.script}: no such script")
    logs = Path(a.logs or tempfile.mkdtemp(prefix="warm-autotune-"))
    logs.mkdir(parents=True, exist_ok=True)
    path = os.environ.get("PYTHONPATH")
    env = dict(os.environ, PYTHONPATH=str(REPO) + (os.pathsep + path if path else ""))
    t0 = time.perf_counter()
    procs = []
    for i in range(a.shards):
        args = [x.replace("{shard}", str(i)) for x in a.args]
        log = open(logs / f"shard-{i}.log", "w")  # noqa: SIM115 - closed after the process ends
        cmd = [sys.executable, "-c", BOOT, str(i), str(a.shards), a.prefixes, a.script, *args]
        procs.append((i, subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    failed = []
    for i, p, log in procs:
        rc = p.wait()
        log.close()
        print(f"shard {i}: exit {rc} after {time.perf_counter() - t0:.0f} s ({logs / f'shard-{i}.log'})", flush=True)
        if rc != 0:
            failed.append(i)
    if failed:
        print(f"warm_autotune: shard(s) {', '.join(map(str, failed))} of {a.shards} failed; see their logs in {logs}",
              file=sys.stderr)
        return 1
    print(f"warm_autotune: {a.shards} shards done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
