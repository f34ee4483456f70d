#!/usr/bin/env bash
# Set up the fast-path packages on a lent GPU machine that has no network (see
# ARCHITECTURE.md, "Fast paths"). Packages travel in ignored folders:
#   .whl/   wheels: fla-core 0.6.0, flash-linear-attention 0.6.0 (fla's models: the side-by-side gdn peer),
#           liger-kernel 0.8.5 (fused linear + cross entropy), dacite; .whl/src/mamba_ssm (mamba-ssm
#           2.3.2.post1 Python sources, `git archive v2.3.2.post1 mamba_ssm` of state-spaces/mamba:
#           the Mamba-3 Triton/TileLang kernels need no build). All of it is about 4 MB.
#   .whl4/site.tar.xz   tilelang 0.1.15 with apache-tvm-ffi, torch-c-dlpack-ext and z3-solver,
#           unpacked and xz-compressed (38 MB, so everything fits one call's 64 MiB carry;
#           the wheels alone are 82 MB). Build it here once with `bash benchmarks/gpu_env.sh pack`
#           from the wheels in .whl2/ and .whl3/.
#   .whl5/site.tar.xz   optional second stack for mamba-ssm's MIMO backward, which does not compile
#           with tilelang 0.1.15: tilelang 0.1.8 + apache-tvm-ffi 0.1.9 (the pins public mamba-ssm
#           setups use) + the same dlpack / z3. This is the stack that trains MIMO on the fast
#           kernel (verified on an H200: MIMO backward tests 8/8, benchmarks/results/gpu_tests_h100.md):
#           bash benchmarks/gpu_env.sh pack .whl5 tilelang-0.1.8-*.whl apache_tvm_ffi-0.1.9-*.whl \
#                .whl2/torch_c_dlpack*.whl .whl2/z3_solver*.whl
#   .whl6/site.tar.xz   optional: tilelang 0.1.9 alone (28 MB; the rest from .whl5); the MIMO
#           backward also compiles with it: bash benchmarks/gpu_env.sh pack .whl6 tilelang-0.1.9-*.whl
#           (.whl + .whl5 + .whl6 fit one call's 64 MiB)
#   .whl7/site.tar.xz   optional: FlashAttention-4 (flash-attn-4 4.0.0b36, CuTe DSL kernels for Hopper) with
#           nvidia-cutlass-dsl 4.8.1 (its compiler: the cu13 MLIR library is most of it), quack-kernels,
#           apache-tvm-ffi and torch-c-dlpack-ext, unpacked and xz-compressed with a 256 MiB dictionary
#           (55 MiB; the wheels are 190 MB): `bash benchmarks/gpu_env.sh fetch_fa4` (about 5 minutes). Carry
#           it with .whl (not .whl4: together they pass one call's 64 MiB) for
#           benchmarks/attention_kernels.py (gpu_suite.sh fa4)
#   .tcache/caches.tar.xz   optional: the Triton, Inductor and TileLang caches of an earlier call (compiled
#           kernels and fla's autotuning results, FLA_CACHE_RESULTS=1). A fresh machine spends minutes
#           autotuning fla's kernels (a gdn layer's first forward+backward took 150 s on an H200) and
#           compiling TileLang / Inductor code; with the caches unpacked first that time is gone.
#           Make it on the GPU machine at the end of a call with `bash benchmarks/gpu_suite.sh pack_caches`
#           (writes $OUT/caches.tar.xz), then here: mkdir -p .tcache && cp <files_at>/caches.tar.xz .tcache/
#   benchmarks/tcache/autotune.tar.xz   committed, optional: the autotuning results alone ($OUT/autotune.tar.xz
#           of the same step, kilobytes), unpacked where .tcache/ is missing (a fresh checkout): kernels
#           then compile their chosen config once instead of benchmarking all of them
# A fresh checkout has none of these folders: `bash benchmarks/gpu_env.sh fetch` (on the CPU machine,
# with network) downloads the pinned wheels into .whl and .whl2, the mamba_ssm sources into .whl/src and
# packs .whl4 (MAMBA_REPO=<local state-spaces/mamba clone> where GitHub is not reachable).
# Usage on the GPU machine (carry .whl and .whl4):  source benchmarks/gpu_env.sh
# (exports PYTHONPATH).  Older two-call form: stage 1 carries .whl2, stage 2 .whl3 + .whl, on one
# warm machine (it is given back 30 s after a call): source benchmarks/gpu_env.sh 1; ... 2
set -u
SITE=${HYMBA_SITE:-/tmp/hymba_site}
if [ "${1:-}" = pack ]; then  # on the CPU machine: wheels -> DIR/site.tar.xz (default .whl4 from .whl2 + .whl3)
  dest=${2:-.whl4}
  if [ $# -gt 2 ]; then wheels=("${@:3}"); else wheels=(.whl2/*.whl .whl3/*.whl); fi
  tmp=$(mktemp -d) && mkdir "$tmp/site"
  for w in "${wheels[@]}"; do unzip -q -o "$w" -d "$tmp/site" || { rm -rf "$tmp"; return 1 2>/dev/null || exit 1; }; done
  rm -rf "$tmp"/site/*.data  # z3's command-line binary (22 MB); the Python bindings use lib/
  mkdir -p "$dest" && tar -cf - -C "$tmp/site" . | xz -9 -T0 > "$dest/site.tar.xz" && rm -rf "$tmp"
  ls -la "$dest/site.tar.xz"
  return 0 2>/dev/null || exit 0
fi
if [ "${1:-}" = fetch_fa4 ]; then  # on the CPU machine: the FlashAttention-4 stack -> .whl7/site.tar.xz
  _fetch_fa4() {
    local pins=(flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
                nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
                apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5)
    local plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp) n tmp w
    for n in 28 27 24 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
    plat+=(--platform manylinux2014_x86_64)
    python3 -m pip download -q "${plat[@]}" -d .whl7dl "${pins[@]}" || { echo "pip download ${pins[*]} failed"; return 1; }
    tmp=$(mktemp -d) && mkdir "$tmp/site"
    for w in .whl7dl/*.whl; do unzip -q -o "$w" -d "$tmp/site" || { rm -rf "$tmp"; return 1; }; done
    # iket: cutlass-dsl's profiler tool, imported by nothing FA4 runs
    rm -rf "$tmp"/site/*.data "$tmp/site/nvidia_cutlass_dsl/dsl_packages/iket"
    mkdir -p .whl7 && tar -cf - -C "$tmp/site" . | xz -T0 --lzma2=preset=9e,dict=256MiB > .whl7/site.tar.xz
    local rc=$?; rm -rf "$tmp"; [ $rc -eq 0 ] && du -sh .whl7/site.tar.xz
    return $rc
  }
  _fetch_fa4 >&2; rc=$?; [ $rc -eq 0 ] || echo "gpu_env.sh fetch_fa4: failed" >&2
  return $rc 2>/dev/null || exit $rc
fi
if [ "${1:-}" = fetch ]; then  # on the CPU machine, once per fresh checkout: the ignored folders above
  # .whl (wheels + mamba_ssm sources) and .whl4 (packed tilelang stack), from the package index and a
  # state-spaces/mamba git repository (MAMBA_REPO: a local clone or mirror; default GitHub)
  _fetch() {
    local pins=(fla-core==0.6.0 flash-linear-attention==0.6.0 liger-kernel==0.8.5 dacite==1.9.2)
    local tl_pins=(tilelang==0.1.15 apache-tvm-ffi==0.1.12 torch-c-dlpack-ext==0.1.5 z3-solver==4.15.4.0)
    local plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp) n
    for n in 28 27 24 17; do plat+=(--platform "manylinux_2_${n}_x86_64"); done
    plat+=(--platform manylinux2014_x86_64)
    python3 -m pip download -q "${plat[@]}" -d .whl "${pins[@]}" || { echo "pip download ${pins[*]} failed"; return 1; }
    python3 -m pip download -q "${plat[@]}" -d .whl2 "${tl_pins[@]}" || { echo "pip download ${tl_pins[*]} failed"; return 1; }
    local repo=${MAMBA_REPO:-https://github.com/state-spaces/mamba} tmp
    tmp=$(mktemp -d) || return 1
    if [ ! -d "$repo" ]; then
      git clone -q --bare --depth 1 --branch v2.3.2.post1 "$repo" "$tmp/mamba.git" \
        || { rm -rf "$tmp"; echo "cannot clone $repo (set MAMBA_REPO to a local clone)"; return 1; }
      repo=$tmp/mamba.git
    fi
    rm -rf .whl/src && mkdir -p .whl/src && git -C "$repo" archive v2.3.2.post1 mamba_ssm | tar -x -C .whl/src
    local rc=$?; rm -rf "$tmp"
    [ $rc -eq 0 ] || { echo "git archive v2.3.2.post1 mamba_ssm failed in $repo"; return 1; }
    bash "${BASH_SOURCE[0]}" pack .whl4 .whl2/*.whl && du -sh .whl .whl4
  }
  _fetch >&2; rc=$?; [ $rc -eq 0 ] || echo "gpu_env.sh fetch: failed" >&2
  return $rc 2>/dev/null || exit $rc
fi
mkdir -p "$SITE"
# compile caches in fixed places, so that gpu_suite.sh pack_caches finds them and .tcache/ refills them
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/hymba_caches/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/hymba_caches/inductor}
export TILELANG_CACHE_DIR=${TILELANG_CACHE_DIR:-/tmp/hymba_caches/tilelang}
export FLA_CACHE_RESULTS=${FLA_CACHE_RESULTS:-1}  # fla's autotuners keep their results in the Triton cache
# every other Triton autotuner too (mamba-ssm's Mamba-3 kernels: their autotuning at the mixers benchmark's
# shapes outlasted two calls' limits, 200 s and 330 s, on 2026-12-04); packed by gpu_suite.sh pack_caches
export TRITON_CACHE_AUTOTUNING=${TRITON_CACHE_AUTOTUNING:-1}
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" "$TILELANG_CACHE_DIR"
if [ -f .tcache/caches.tar.xz ]; then tar -xJf .tcache/caches.tar.xz -C /tmp/hymba_caches \
  && echo "Triton / Inductor / TileLang caches of an earlier call unpacked into /tmp/hymba_caches"
elif [ -f benchmarks/tcache/autotune.tar.xz ]; then tar -xJf benchmarks/tcache/autotune.tar.xz -C /tmp/hymba_caches \
  && echo "committed autotuning results (benchmarks/tcache/) unpacked into /tmp/hymba_caches"; fi
pipi() { python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$@"; }
if [ -f .whl4/site.tar.xz ]; then tar -xJf .whl4/site.tar.xz -C "$SITE" && echo "tilelang and its deps unpacked into $SITE"; fi
# .whl5: another tilelang stack for mamba-ssm's MIMO kernels (gpu_suite.sh mimo_alt puts it first on the path)
if [ -f .whl5/site.tar.xz ]; then mkdir -p "${SITE}_alt" && tar -xJf .whl5/site.tar.xz -C "${SITE}_alt" \
  && echo "alternative tilelang stack unpacked into ${SITE}_alt"; fi
# .whl6: tilelang 0.1.9 alone (its deps from .whl5): gpu_suite.sh mimo_alt2 puts it before .whl5's
if [ -f .whl6/site.tar.xz ]; then mkdir -p "${SITE}_alt2" && tar -xJf .whl6/site.tar.xz -C "${SITE}_alt2" \
  && echo "tilelang 0.1.9 unpacked into ${SITE}_alt2"; fi
# .whl7: FlashAttention-4 and its CuTe DSL compiler (benchmarks/attention_kernels.py)
if [ -f .whl7/site.tar.xz ]; then tar -xJf .whl7/site.tar.xz -C "$SITE" && echo "flash-attn-4 stack unpacked into $SITE"; fi
if [ -d .whl2 ]; then pipi .whl2/*.whl && echo "tilelang deps installed into $SITE"; fi
if [ "${1:-}" != 1 ]; then
  if [ -d .whl3 ]; then pipi .whl3/*.whl; fi
  if [ -d .whl ]; then pipi .whl/*.whl; fi
  if [ -d .whl/src/mamba_ssm ]; then
    rm -rf "$SITE/mamba_ssm" && cp -r .whl/src/mamba_ssm "$SITE/"
    # mamba_ssm/__init__ imports the Mamba-1 CUDA extension, which a source copy lacks;
    # Mamba-3 does not use it. This shim only makes that import fail at call time.
    [ -f "$SITE/selective_scan_cuda.py" ] || printf 'def fwd(*a, **k):\n    raise RuntimeError("selective_scan_cuda (Mamba-1 CUDA extension) is not built here")\n\n\nbwd = fwd\n' > "$SITE/selective_scan_cuda.py"
  fi
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
  # cutlass-dsl's .pth file (a site-packages hook) is not read from a PYTHONPATH folder: its path by hand
  if [ -d "$SITE/nvidia_cutlass_dsl/dsl_packages" ]; then
    export PYTHONPATH="$SITE/nvidia_cutlass_dsl/dsl_packages:$PYTHONPATH"
  fi
  echo "ready: PYTHONPATH=$PYTHONPATH"
  python3 -c "import tvm_ffi, tilelang" 2>/dev/null || echo "warning: tilelang does not import" \
    "(carry .whl4, or run stage 1 on this same machine): fla's Hopper gdn backward and mamba3 MIMO will be unavailable"
fi
