#!/usr/bin/env bash
# Set up the fast-path packages on a lent GPU machine that has no network (see
# ARCHITECTURE.md, "Fast paths"). Wheels travel in ignored folders:
#   stage 1:  .whl2/  z3-solver, apache-tvm-ffi, torch-c-dlpack-ext   (tilelang's deps)
#   stage 2:  .whl3/  tilelang;  .whl/  fla-core, dacite;  .whl/src/mamba_ssm (mamba-ssm
#             2.3.2.post1 Python sources: the Mamba-3 Triton/TileLang kernels need no build)
# Usage: source benchmarks/gpu_env.sh [1|2]   (stage 2 also exports PYTHONPATH)
set -u
SITE=${HYMBA_SITE:-/tmp/hymba_site}
mkdir -p "$SITE"
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
if [ "${1:-2}" = 1 ]; then
  pipi .whl2/*.whl && echo "stage 1 installed into $SITE"
else
  if [ -d .whl3 ]; then pipi .whl3/*.whl; fi
  if [ -d .whl ]; then pipi .whl/*.whl; fi
  if [ -d .whl/src/mamba_ssm ]; then
    rm -rf "$SITE/mamba_ssm" && cp -r .whl/src/mamba_ssm "$SITE/"
    # mamba_ssm/__init__ imports the Mamba-1 CUDA extension, which a source copy lacks;
    # Mamba-3 does not use it. This shim only makes that import fail at call time.
    [ -f "$SITE/selective_scan_cuda.py" ] || printf 'def fwd(*a, **k):\n    raise RuntimeError("selective_scan_cuda (Mamba-1 CUDA extension) is not built here")\n\n\nbwd = fwd\n' > "$SITE/selective_scan_cuda.py"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  echo "stage 2 ready: PYTHONPATH=$PYTHONPATH"
  # a machine given back and started again between the two stages loses stage 1: say so now
  python3 -c "import tvm_ffi, tilelang" 2>/dev/null || echo "warning: tilelang does not import" \
    "(stage 1 missing on this machine?): fla's Hopper gdn backward and mamba3 MIMO will be unavailable"
fi
