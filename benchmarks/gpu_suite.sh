#!/usr/bin/env bash
# Run the GPU tests and benchmarks on a lent GPU machine, each step under its own time limit,
# logs and JSON under ${OUT:-benchmarks/results/run}. Set up the packages first
# (source benchmarks/gpu_env.sh, carrying .whl and .whl4: see that file). Steps, cheapest first:
#   moe     pytest -m gpu tests/test_moe.py; benchmarks/moe.py --profile
#   mamba3  pytest -m gpu tests/test_mamba3.py (one launch config per kernel); mixers.py --only mamba3 --one-launch-config
#   gdn     pytest -m gpu tests/test_gdn.py tests/test_conv.py (one launch config per fla kernel; first use
#           compiles fla's backward through TileLang, ~20 s a kernel); tests/test_gdn_decode.py and
#           benchmarks/gdn_decode.py (our in-place decode-step kernel vs the reference and fla)
#   atlas   atlas_check.py (Triton NS kernels per launch width, the probe's problem per NS variant, the
#           probe inside autocast), pytest -m gpu tests/test_atlas.py, then mixers.py --atlas-paths (ATLAS reference / fast path /
#           its NS in single TF32 / in CUDA graphs, next to gdn; more variants: fast_torch_ns fast_eager
#           fast_unroll4 fast_ieee)
#   mamba3_tuned  mixers.py --only mamba3 gdn, autotuned (issue 18: Mamba-3 tuned next to gdn; its autotuning
#           outlasted 330 s on a fresh machine, compiling one config after another), after warm_autotune.py has
#           compiled every launch config in 8 parallel processes (one shard of each kernel's configs each) into
#           Triton's cache: run it alone in a call, then pack_caches with > 60 s to spare
#   atlas_verify  the ATLAS GPU tests of the newer options, passed on an H200 on 2026-12-05 (the fast path vs the float64
#           reference, the layer on CUDA vs CPU, the fast path under TF32, muon_chunk's fast path), then
#           atlas_check.py --grads (the Quad-Hybrid's ATLAS layer at 8 x 2048, factored vs direct Gram matrices:
#           finite or not; FACTOR_GRAM gave a NaN loss in the recipe)
#   atlas_profile  the Newton-Schulz kernels' GPU tests (sides 16-64), then mixers.py --atlas-paths --profile: the
#           ATLAS layer's kernel breakdown at the Quad-Hybrid recipe's shape (--atlas-config quad, B 8 x 2048)
#           as shipped (fast: Newton-Schulz in Triton up to side 64) and in CUDA graphs (fast_graphed); the
#           factored Gram matrices (fast_factored) are not timed: unstable in float32 (kernels/atlas.py FACTOR_GRAM)
#   atlas_profile_bench  the same at the d 2048 benchmark shape (fast, fast_ns_recompute, fast_graphed); each of
#           the two fills most of one call
#   mimo_alt  the mamba3 MIMO GPU tests with the tilelang stack of .whl5 (0.1.8) first on the path:
#           the stack that trains MIMO on the fast kernel (verified: forward and backward 8/8 on an H200)
#   mimo_alt2 the same with tilelang 0.1.9 (.whl6) before it (the MIMO backward also compiles)
#   mixers  mixers.py for gated_attn gdn hymba atlas (autotuned)
#   loss    pytest -m gpu tests/test_linear_ce.py (the fast path, Liger's CE kernel in our capturable chunk loop,
#           == the chunked reference, eagerly and replayed from a CUDA graph; the model's fused loss == unfused
#           with less peak memory; needs liger-kernel from .whl; 6/6 passed on an H100 2026-12-05)
#   memory  gdn's split q/k/v GPU tests, then train_memory.py --fla: peak memory and step time of
#           (GD+mlp)*24 at batch 8 x 2048, vocab 32000, with/without the fused loss and the split (issue 18)
#   decode  pytest -m gpu: the decode-step kernels (tests/test_decode_attention.py, the conv update in
#           tests/test_conv.py, the gated norm in tests/test_norm_rope_kernels.py, gdn's in-kernel gates in
#           tests/test_gdn.py, gdn's in-place step in tests/test_gdn_decode.py, Mamba-3's step in
#           tests/test_mamba3_step_kernel.py) and tests/test_decode_engine.py (graph == dynamic tokens,
#           capture fallback), then
#           decode.py --profile: ms per step by engine (dynamic / static / graph) of a 1.47B
#           Qwen3-Next-like hybrid, batch 1 and 16 after 2k / 8k prompts, and the step's top kernels
#   fused   pytest -m gpu tests/test_attention.py tests/test_linear.py tests/test_add_norm.py: cuDNN attention first
#           in SDPA's order, Liger's SwiGLU on the fused gate-up GEMM, the residual add + RMSNorm kernels
#           (training-path fast paths of the attn row)
#   flex    pytest -m gpu tests/test_two_stream_attention.py: block diffusion's two-stream attention by FlexAttention
#           (flex_two_stream: compiled flex_attention with the cached two-stream block mask) == SDPA with the dense mask,
#           bf16 at L 1024, block 16, 4 meta tokens (MHA, GQA, a 256 window; outputs and q/k/v gradients), and a bf16
#           block-diffusion training step both ways; not yet run (2026-12-07)
#   owed1   what session 43 built and could not run (no GPU lent): the flex step's tests, the compiled grouped MoE
#           tests (tests/test_moe.py -k compiled_grouped), hymba bench configs/moe_bench.yaml on CUDA
#   record  mtp_speculative.py on CUDA: speculative decoding with the verify chunk's states recorded (reference
#           gdn / mamba3 kernels in every verify forward, no re-run) against the re-run (fla / mamba-ssm kernels),
#           the trade that decides record_states' CUDA default (generation.record_by_default; off there until timed)
#   owed2   hymba train --mode compile of configs/quad_hybrid_tiny.yaml and configs/bd_tiny.yaml (30 steps each), then
#           the block-diffusion CUDA-graph training tests: bd_tiny as shipped (its 16-wide attention heads keep the
#           dense-mask SDPA: FlexAttention takes head dims >= 32) and with 32-wide heads (FlexAttention inside the capture)
#   agree   decode_agreement.py in float32 and bf16: our generate (graph / static / dynamic engines, and
#           the static one with each decode-step fast path off in turn) against our full forward and HF's
#   modes   pytest -m gpu tests/test_train_modes.py and the CUDA-graph training tests (hymba train --mode auto; the
#           optimizer step replayed from a graph, bit for bit the eager one; a cold machine compiles fla's TileLang
#           backward for the block-diffusion test first: give it the whole 400 s)
#   side_train  side_by_side.py --rows gdn attn quad_moe (training vs fla / HF; --merge into the day's JSON)
#   sweep   pytest -m gpu over ${SWEEP:-tests} (paths and pytest options, e.g. --ignore=tests/test_mamba3.py) under one
#           570 s limit, the 40 slowest tests listed: the GPU suite in a few calls
#   side_attn  side_by_side.py --rows attn alone (the attention row vs HF Llama; --merge), e.g. on the other card
#   opt_step  optimizer_step.py: MuonAdamW's step eager vs replayed from its CUDA graph (GraphedOptimizer), ms, host ms,
#           kernels, and the replay's parameters against the eager steps', for the Quad-Hybrid recipe and moe_bench
#           (H100 2026-12-06: Quad-Hybrid 724 -> 326 kernels with the fused AdamW and merged Newton-Schulz groups,
#           replayed 1.76 -> 1.04 ms; moe_bench with them not yet timed)
#   opt_tests  the GPU tests of the optimizer's kernels: fused vs foreach AdamW and muon_updates on CUDA, the graphed
#           step bit for bit the eager one, bf16 weights with masters, CUDA-graph training vs eager
#   bf16w_opt  the GPU tests of the optimizer step's graph: with bf16 weights and float32 masters (test_mixed_precision.py,
#           whose graphed runs replay it over the masters) and bit for bit the eager step (test_train_modes.py)
#   twin_profile  quad_atlas.py --recipes gdn --profile: where the Quad-Hybrid's gdn twin's step goes (kernels, and
#           its host time by op: top_host), without the ATLAS recipe's compile
#   train_loop  train_loop.py --swap-atlas: the tokens/s hymba train's own loop reports for the Quad-Hybrid's gdn twin,
#           as shipped and with a device synchronize after every step (the loop before 2026-12-06)
#   attn_bf16w  the bf16-weights GPU test (tests/test_mixed_precision.py: eager and CUDA-graph training with bf16
#           weights and float32 masters give autocast's losses), then side_by_side.py --rows attn --param-dtype
#           bfloat16: the attn row with ours also in modes eager_bf16w / cuda_graph_bf16w (issue 18: attn >= 2.0x;
#           the weight casts were ~7 ms of its 103 ms step)
#   fa4     attention_kernels.py: causal attention forward / forward+backward time and accuracy at the attn row's
#           shape (B 8, T 2048, 16 x 64) and Qwen3-Next's (8 / 2 heads x 128), cuDNN (our fast path) / SDPA's flash
#           and efficient backends / FlashAttention-4 (carry .whl7 from gpu_env.sh fetch_fa4, with .whl)
#   side_decode side_by_side.py --rows decode --engines auto dynamic (vs HF generate; --merge)
#           (copy benchmarks/results/<device>-<date>.json into $OUT first to merge with an earlier call)
#   quad    quad_atlas.py --atlas-reference: tokens/s of the training step (hymba train's Trainer, modes auto
#           and eager) of configs/quad_hybrid_tiny.yaml at batch 8 x 2048 next to the same recipe with its
#           ATLAS layers swapped for gdn, and with ATLAS on its reference path (issue 18: atlas/gdn >= 0.5)
#   quad_chunk  quad_atlas.py --modes auto --atlas-config inner_optimizer=muon_chunk (Newton-Schulz once per memory
#           chunk, a variant of ours): the recipe pair's tokens/s with it (one call)
#   quad_chunk32 / quad_chunk64  the same with the memory's chunk_size 32 / 64 (the recipe: 16; window 16 kept): fewer,
#           larger sequential chunk steps, a different model (retrieval reads the chunk-start memory, so a query sees
#           nothing its own chunk wrote): the speed side of that trade (one call each)
#   atlas_chunk_layer  the ATLAS layer alone at the quad shape with muon_chunk, eager and in CUDA graphs, profiled
#           (mixers.py --atlas-config quad_chunk --profile; one call)
#   atlas_chunk_bench  the d 2048 benchmark layer (B 4, T 4096) with muon_chunk, eager and in CUDA graphs, against
#           the gdn rows of results/mixers_atlas_paths_h200.json (the ATLAS <= 10x gdn target with Newton-Schulz once
#           per chunk; a CPU at d 256 measured 4.5x less than per token: 272 vs 1,219 ms fwd+bwd; one call)
#   quad_tf32  quad_atlas.py --modes auto --tf32: the same two recipes with TF32 float32 matmuls (hymba train --tf32:
#           the ATLAS memory's cuBLAS GEMMs on tensor cores; Newton-Schulz stays tf32x3), 30 timed steps: what the
#           GEMMs' precision is worth in time (benchmarks/atlas_tf32.py: what it costs in accuracy, on a CPU)
#   atlas_inductor  atlas_check.py --time-ns (the Newton-Schulz kernels per launch width and precision at
#           muon_chunk's launches), then the quad-shape muon_chunk layer in CUDA graphs with the chunk step
#           compiled with Inductor's defaults and with its combo kernels, cuBLAS GEMMs (mixers.py fast_cublas_graphed
#           fast_combo_cublas_graphed; run on an H100 2026-12-05 as fast_graphed fast_combo_graphed, before the
#           defaults changed; the --time-ns part outlasted its 90 s there: its sweep is shorter since)
#   atlas_bmm32  pytest -m gpu tests/test_bmm32.py (the 3xTF32 batched-matmul kernel and the ATLAS fast path through
#           it), then the quad-shape muon_chunk layer in CUDA graphs with combo kernels, its GEMMs by cuBLAS or by it
#           (fast_combo_cublas_graphed, fast_combo_bmm32_graphed; run on an H100 2026-12-05 before both became defaults, as
#           fast_combo_graphed fast_combo_bmm32_graphed: 127.7 against 115.3 ms)
#   atlas_padns  atlas_check.py --time-ns (with the one padded launch of both quad sides, 96 x side 64), then the quad-shape
#           muon_chunk layer in CUDA graphs with Newton-Schulz per side and in one padded launch (PAD_NS); run on
#           an H100 2026-12-05 evening with combo kernels the default then: 115.1 against 100.3 ms (the --time-ns part
#           outlasted its 150 s there; since, muon_chunk pads by default and its fast_graphed names that)
#   atlas_defaults  the ATLAS fast path's GPU tests (pytest -m gpu tests/test_atlas.py), then the quad-shape muon_chunk
#           layer in CUDA graphs as shipped on 2026-12-05 afternoon (fast_combo_bmm32_graphed), as shipped now
#           (fast_graphed) and without the padded NS launch (fast_nopad_graphed); its first form, run in parts on an
#           H100 on 2026-12-05 evening, found the truncating 3xTF32 split (benchmarks/RESULTS.md)
#   atlas_chain  atlas_check.py --chain: the muon_chunk GPU test's problem per NS precision and GEMM (bmm32 / cuBLAS)
#           over 3 seeds against float64 (what showed that bias), ~60 s
#   atlas_combo  atlas_check.py --inductor: the compiled muon_chunk step under each INDUCTOR option set (incl.
#           combo kernels element-wise only / one size only), Newton-Schulz per side and padded, against float64,
#           and whether the first-call check catches what is off (why combo + PAD_NS failed on 2026-12-05); not yet run
#   atlas_group  pytest -m gpu tests/test_bmm32.py (the grouped launch against float64, the fast path with it), then
#           the quad-shape muon_chunk layer in CUDA graphs as shipped (grouped since 2026-12-05 evening) and without
#           the grouping (mixers.py fast_graphed fast_nogroup_graphed); run in parts on an H100: 102.0 -> 92.3 ms
#   atlas_pdl  the muon_chunk GPU test with the chunk step's Inductor kernels under Programmatic Dependent Launch
#           (INDUCTOR pdl), then the quad-shape muon_chunk layer in CUDA graphs as shipped (pdl since 2026-12-05
#           night) and without it (mixers.py fast_graphed fast_nopdl_graphed); run on an H100 before the default
#           changed (fast_pdl_graphed against fast_graphed): 85.5 against 88.2 ms, the test passed
#   atlas_ns_layout  atlas_check.py --time-ns --padded-only (the padded Newton-Schulz launch at 4 / 8 warps, the
#           backward's saved iterates read transposed each way), then the quad-shape layer with each
#           (mixers.py fast_graphed fast_nsstore_graphed fast_nsregs_graphed fast_nsw8_graphed); run on an H200
#           2026-12-05 night: 84.6 / 85.4 / 84.8 / 93.5 ms, none faster than as shipped
#   atlas_retrieve  the quad-shape muon_chunk layer in CUDA graphs, profiled, with each chunk's retrieval in its
#           chunk step (as shipped since 2026-12-05 night: RETRIEVE_IN_STEP) and after the loop from the stacked
#           chunk-start weights (mixers.py fast_graphed fast_retrieve_after_graphed); unprofiled in atlas_owed: 75.9 / 82.4 ms (H100)
#   atlas_nssave  the GPU tests of NS_SAVE_FWD (the Newton-Schulz forward keeping its iterates, the backward reading
#           them: kernels vs float64, the muon_chunk fast path eager and compiled), the padded launch's timings
#           (atlas_check.py --time-ns --padded-only, incl. that pair), then the quad-shape layer with and without it
#           (mixers.py fast_graphed fast_nonssave_graphed: on by default for muon_chunk since 2026-12-05 late)
#   atlas_owed  what 2026-12-05 night left untimed, in one call: the ATLAS GPU tests it touches (NS_SAVE_FWD's kernels,
#           the muon_chunk fast path incl. pdl+save, the bmm32 fast path with retrieval in the step), then the
#           quad-shape layer as shipped (retrieval in the step, chunk inputs by unbind), with retrieval after the
#           loop, and without NS_SAVE_FWD (mixers.py fast_graphed fast_retrieve_after_graphed fast_nonssave_graphed); run
#           on an H100 2026-12-05 late before NS_SAVE_FWD's default (then fast_nssave_graphed): 75.9 / 82.4 / 69.2 ms,
#           the tests passed (on a fresh machine they need ~260 s: the first compiles)
#   atlas_splitk_tests  the bmm32 GPU tests, incl. the fast path with split-K GEMMs at the Quad-Hybrid's memory
#           shape against float64 (one call: each compiles chunk steps)
#   atlas_splitk  the quad-shape muon_chunk layer as shipped (split-K GEMMs on) and without split-K, one process
#           (mixers.py fast_graphed fast_nosplitk_graphed); run on an H100 2026-12-06 before split-K and the stacked
#           Newton-Schulz scalings were defaults: as then shipped 68.9 ms, split-K 67.7, stacked scalings 68.3
#   atlas_fused  the quad-shape muon_chunk layer without and with (as shipped since 2026-12-06) the fused chunk step
#           (kernels/atlas_fused.py), one process (mixers.py fast_unfused_graphed fast_graphed); the first call per
#           shape checks the fused step against the eager one (a disagreement is printed and the unfused step runs).
#           2026-12-06, H100: the first form (one program per row) 274.4 ms against 67.5; the ten-launch form at 8
#           warps 100.6 against 67.7, at 64 columns x 4 warps 68.4 against 67.3, with the backward's 16-column tiles
#           (the default since) 62.1 against 67.8
#   atlas_fused_d2048  the d 2048 muon_chunk layer (B 4 x 4096) without and with the fused chunk step, next to gdn in
#           one process (issue 18: ATLAS <= 10x gdn; mixers.py --atlas-config bench_chunk); H100 2026-12-06: 47.4 ms
#           fused (as shipped) against 90.1, gdn graphed 6.83: 6.95x
#   atlas_fused_recipe  the Quad-Hybrid recipe with muon_chunk (the fused step on, as shipped) against its gdn twin;
#           H100 2026-12-06: 78.27 ms a step against 17.65 (0.226; the twin's step moves between calls)
#   atlas_nstf32  the quad-shape muon_chunk layer with Newton-Schulz in one TF32 product per matmul against as
#           shipped (float32-accurate split products), one process; H100 2026-12-06: the tf32 path fails the fast path's
#           probe (0.147 off the float64 reference), so it does not run
#   atlas_reference_test  the per-token Muon fast path against the float64 reference on CUDA (cut by the call limit
#           on 2026-12-06 morning; passed on an H100 later that day, 114 s)
#   atlas_fused_bench  one chunk step at the Quad-Hybrid's memory, fused per launch config and unfused, each in a
#           CUDA graph: us per chunk forward and forward+backward (benchmarks/atlas_fused_bench.py)
#   atlas_fused_sweep  atlas_fused_bench.py at both memories (quad, bench): the default, 8 warps in the per-row
#           launches (ROW_WARPS), another tile width
#   atlas_fused_profile  the same at the default config for the Quad-Hybrid's memory and the d 2048 layer's, with
#           torch.profiler's kernel table of the fused and the unfused step's eager forward+backward
#   atlas_fused_tests  pytest -m gpu tests/test_atlas_fused.py (fused step vs float64 at the Quad-Hybrid's memory;
#           the fast path with it end to end)
#   profiles  where the time of two rows goes (torch.profiler, two passes): side_by_side.py --rows attn --profile
#           (attn_vs_hf_llama, 1.71x against 2.0: copies_by_shape says which casts and copies the ~7 ms of copies a
#           step are) and mixers.py --only gdn --profile (the gdn layer at B 4 x 4096, d 2048); run on an H100 on
#           2026-12-05 (benchmarks/RESULTS.md), 164 s
#   pack_caches  the Triton / Inductor / TileLang caches of this call as $OUT/caches.tar.xz (for .tcache/, see gpu_env.sh)
#   pack_out  last: every other file under $OUT (logs, JSON) into $OUT/out.tar.xz, so a call of many steps
#           stays within the device's 8 returned files (unpack here: tar -xJf <files_at>/out.tar.xz)
# Usage: bash benchmarks/gpu_suite.sh [STEP ...]   (default: moe mamba3 gdn atlas mixers, in that order)
# Each step runs under its own limit (SIGINT, then SIGKILL 20 s later: the trainer takes SIGINT as
# "stop after this step", so a test that trains would otherwise outlive its limit).
set -u
OUT=$(realpath -m "${OUT:-benchmarks/results/run}")
mkdir -p "$OUT"
export PYTHONPATH=${HYMBA_SITE:-/tmp/hymba_site}:$PWD${PYTHONPATH:+:$PYTHONPATH}
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  timeout -s INT -k 20 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? ($(tail -n 1 "$OUT/$name.log" | cut -c1-200))"
}
PYTEST=(python -m pytest -q -m gpu -p no:cacheprovider -rA --tb=short -s)
need_tilelang() {  # fla's gdn backward (Hopper) and mamba-ssm's MIMO kernel compile through TileLang
  python -c "import tvm_ffi, tilelang" 2>/dev/null && return 0
  echo "tilelang or its deps are missing: on this machine run" \
       "'source benchmarks/gpu_env.sh' carrying .whl and .whl4 (see gpu_env.sh)"
  exit 2
}
for s in "${@:-moe mamba3 gdn atlas mixers}"; do
  for s1 in $s; do
    case $s1 in
      moe)    step moe_tests 120 "${PYTEST[@]}" tests/test_moe.py
              step moe_bench 180 python benchmarks/moe.py --profile --out "$OUT/moe.json" ;;
      mamba3) need_tilelang
              step mamba3_tests 400 "${PYTEST[@]}" tests/test_mamba3.py
              (cd benchmarks && step mamba3_bench 200 python mixers.py --only mamba3 --one-launch-config --out "$OUT/mixers_mamba3.json") ;;
      gdn)    need_tilelang
              step gdn_tests 400 "${PYTEST[@]}" tests/test_gdn.py tests/test_conv.py
              step gdn_decode_tests 240 "${PYTEST[@]}" tests/test_gdn_decode.py
              step gdn_decode_bench 120 python benchmarks/gdn_decode.py ;;
      atlas)  step atlas_check 150 python benchmarks/atlas_check.py  # NS kernels and the probe's problem vs float64
              step atlas_tests 400 "${PYTEST[@]}" tests/test_atlas.py  # first use compiles: Triton NS, Inductor
              (cd benchmarks && step atlas_paths 600 python mixers.py --atlas-paths reference fast fast_tf32 fast_graphed \
                 --out "$OUT/mixers_atlas_paths.json") ;;
      atlas_verify) step atlas_gpu_tests 300 "${PYTEST[@]}" tests/test_atlas.py \
                 -k "matches_reference or invariant_and_bf16 or under_tf32 or cuda_muon_chunk"
              step atlas_grads 150 python benchmarks/atlas_check.py --grads ;;
      mamba3_tuned) need_tilelang  # 8 processes compile the autotuned kernels' configs between them, then the timed run
              (cd benchmarks && step mamba3_warm 280 python warm_autotune.py --shards 8 --logs /tmp/warm-logs mixers.py \
                 --only mamba3 gdn --out "/tmp/warm-{shard}.json"
              step mamba3_tuned 220 python mixers.py --only mamba3 gdn --out "$OUT/mixers_mamba3_tuned.json") ;;
      atlas_profile) step atlas_ns_tests 120 "${PYTEST[@]}" tests/test_atlas.py -k "ns_triton or side_64"
              # rows are written as they finish: a limit that ends the last path keeps the others
              (cd benchmarks && step atlas_profile_quad 420 python mixers.py --atlas-paths fast fast_graphed \
                 --atlas-config quad --d-model 128 --batch 8 --seq-len 2048 --skip-gdn --profile \
                 --out "$OUT/atlas_profile_quad.json") ;;
      atlas_profile_bench) (cd benchmarks && step atlas_profile_bench 540 python mixers.py --atlas-paths fast \
                 fast_ns_recompute fast_graphed --gdn-from results/mixers_atlas_paths_h200.json --profile \
                 --out "$OUT/atlas_profile_bench.json") ;;
      mimo_alt) alt=${HYMBA_SITE:-/tmp/hymba_site}_alt
              [ -d "$alt/tilelang" ] || { echo "no $alt/tilelang: carry .whl5 (see gpu_env.sh)"; exit 2; }
              PYTHONPATH=$alt:$PYTHONPATH python -c "import tilelang; print('tilelang', tilelang.__version__)"
              PYTHONPATH=$alt:$PYTHONPATH step mimo_alt_tests 400 "${PYTEST[@]}" tests/test_mamba3.py -k mimo ;;
      mimo_alt2) alt=${HYMBA_SITE:-/tmp/hymba_site}_alt; alt2=${alt}2
              [ -d "$alt2/tilelang" ] && [ -d "$alt/tvm_ffi" ] || { echo "carry .whl5 and .whl6 (see gpu_env.sh)"; exit 2; }
              # tilelang 0.1.9's TVM links libz3.so by name: put z3-solver's lib folder on the loader path
              export LD_LIBRARY_PATH=$alt/z3/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
              PYTHONPATH=$alt2:$alt:$PYTHONPATH python -c "import tilelang; print('tilelang', tilelang.__version__)"
              PYTHONPATH=$alt2:$alt:$PYTHONPATH step mimo_alt2_tests 400 "${PYTEST[@]}" tests/test_mamba3.py -k mimo ;;
      mixers) for m in gated_attn gdn hymba atlas; do
                (cd benchmarks && step "mixers_$m" 200 python mixers.py --only "$m" --out "$OUT/mixers_$m.json")
              done ;;
      loss)   step loss_tests 300 "${PYTEST[@]}" tests/test_linear_ce.py ;;
      memory) need_tilelang
              step gdn_split_tests 400 "${PYTEST[@]}" tests/test_gdn.py -k "split or model_fast"
              step train_memory 580 python benchmarks/train_memory.py --fla --out "$OUT/train_memory.json" ;;
      decode) step decode_kernel_tests 240 "${PYTEST[@]}" tests/test_decode_attention.py tests/test_conv.py \
                 tests/test_norm_rope_kernels.py tests/test_gdn.py -k "gpu_kernel or gpu_decode or gated_norm_kernel or decode_gates or layer_decode_step"
              step decode_gdn_m3_tests 240 "${PYTEST[@]}" tests/test_gdn_decode.py tests/test_mamba3_step_kernel.py \
                 tests/test_moe_decode.py
              step decode_tests 240 "${PYTEST[@]}" tests/test_decode_engine.py
              step decode_bench 300 python benchmarks/decode.py --device cuda --batches 1 16 --prompts 2048 8192 \
                 --new 64 --repeats 2 --profile --out "$OUT/decode.json" ;;
      fused)  step fused_tests 240 "${PYTEST[@]}" tests/test_attention.py tests/test_linear.py tests/test_add_norm.py ;;
      flex)   step flex_tests 300 "${PYTEST[@]}" tests/test_two_stream_attention.py ;;
      owed1)  step flex_tests 240 "${PYTEST[@]}" tests/test_two_stream_attention.py
              step moe_compiled_tests 120 "${PYTEST[@]}" tests/test_moe.py -k compiled_grouped
              step bench_moe 150 python -m hymba_plus bench configs/moe_bench.yaml --device cuda --steps 10 --json "$OUT/bench_moe.json" ;;
      record) step record_mtp 400 python benchmarks/mtp_speculative.py --device cuda --steps 400 --batches 1 16 \
                 --draft-steps 200 --repeats 3 --out "$OUT/mtp_speculative_record_cuda.json" ;;
      owed2)  step compile_quad 200 python -m hymba_plus train configs/quad_hybrid_tiny.yaml --mode compile --steps 30 --no-progress \
                 --out /tmp/runs/quad_compile
              step compile_bd 200 python -m hymba_plus train configs/bd_tiny.yaml --mode compile --steps 30 --no-progress --out /tmp/runs/bd_compile
              step bd_graphed_tests 190 "${PYTEST[@]}" tests/test_train_modes.py -k block_diffusion ;;
      agree)  for dt in float32 bfloat16; do
                step "agree_$dt" 200 python benchmarks/decode_agreement.py --device cuda --dtype $dt --batch 4 \
                   --prompt 512 --new 16 --out "$OUT/agree_$dt.json"
              done ;;
      modes)  step modes_tests 400 "${PYTEST[@]}" tests/test_train_modes.py tests/test_training.py -k "gpu" ;;
      side_train) step side_train 580 python benchmarks/side_by_side.py --rows attn gdn quad_moe --hf-experts grouped_mm --merge \
                 --out-dir "$OUT" ;;
      sweep)  step gpu_sweep 570 "${PYTEST[@]}" --durations=40 ${SWEEP:-tests} ;;  # SWEEP: pytest paths / --ignore=...
      side_attn) step side_attn 400 python benchmarks/side_by_side.py --rows attn --merge --out-dir "$OUT" ;;
      side_attn_ac) step side_attn_ac 450 python benchmarks/side_by_side.py --rows attn --activation-checkpoint 1 \
                      --out-dir "$OUT/ac" ;;  # + eager_ac1 / cuda_graph_ac1: memory against time
      opt_step) step opt_step 150 python benchmarks/optimizer_step.py --out "$OUT/optimizer_step_quad.json"
              step opt_step_moe 200 python benchmarks/optimizer_step.py --recipe configs/moe_bench.yaml \
                 --out "$OUT/optimizer_step_moe_bench.json" ;;
      opt_tests) step opt_tests 200 "${PYTEST[@]}" tests/test_training.py tests/test_train_modes.py tests/test_mixed_precision.py \
                 -k "muon_updates or fused_adamw or graphed_optimizer or bf16_weights_in_cuda_graphs or cuda_graph_training_matches" ;;
      bf16w_opt) step bf16w_opt_tests 240 "${PYTEST[@]}" tests/test_mixed_precision.py tests/test_train_modes.py \
                 -k "bf16 or graphed_optimizer" ;;
      twin_profile) need_tilelang
              step twin_profile 240 python benchmarks/quad_atlas.py --recipes gdn --modes auto --profile \
                 --out "$OUT/quad_twin_profile.json" ;;
      train_loop) need_tilelang
              step train_loop 300 python benchmarks/train_loop.py --swap-atlas --out "$OUT/train_loop_twin.json" ;;
      attn_bf16w) step bf16w_tests 200 "${PYTEST[@]}" tests/test_mixed_precision.py
              step attn_bf16w 480 python benchmarks/side_by_side.py --rows attn --param-dtype bfloat16 --merge \
                 --out-dir "$OUT" ;;
      fa4)    python -c "import flash_attn.cute" 2>/dev/null || echo "flash-attn-4 does not import (carry .whl7: gpu_env.sh fetch_fa4)"
              step fa4_hd64 300 python benchmarks/attention_kernels.py --out "$OUT/attention_kernels_hd64.json"
              step fa4_hd128 240 python benchmarks/attention_kernels.py --heads 8 --kv-heads 2 --head-dim 128 \
                 --out "$OUT/attention_kernels_hd128.json" ;;
      side_decode) step side_decode 580 python benchmarks/side_by_side.py --rows decode --engines auto dynamic \
                 --prompts 2048 8192 32768 --merge --out-dir "$OUT" ;;
      quad)   need_tilelang  # the recipe's gdn and mamba3 layers run fla's / mamba-ssm's kernels
              step quad 580 python benchmarks/quad_atlas.py --atlas-reference --out "$OUT/quad_atlas.json" ;;
      quad_chunk) need_tilelang
              step quad_chunk 500 python benchmarks/quad_atlas.py --modes auto --atlas-config inner_optimizer=muon_chunk \
                 --out "$OUT/quad_atlas_muon_chunk.json" ;;
      quad_chunk32) need_tilelang
              step quad_chunk32 560 python benchmarks/quad_atlas.py --modes auto --atlas-config inner_optimizer=muon_chunk \
                 --atlas-config chunk_size=32 --out "$OUT/quad_chunk32.json" ;;
      quad_chunk64) need_tilelang
              step quad_chunk64 560 python benchmarks/quad_atlas.py --modes auto --atlas-config inner_optimizer=muon_chunk \
                 --atlas-config chunk_size=64 --out "$OUT/quad_chunk64.json" ;;
      atlas_chunk_layer) (cd benchmarks && step atlas_chunk_layer 400 python mixers.py --atlas-paths fast fast_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn --profile \
                 --out "$OUT/mixers_atlas_quad_chunk.json") ;;
      atlas_chunk_bench) (cd benchmarks && step atlas_chunk_bench 480 python mixers.py --atlas-paths fast \
                 fast_graphed --atlas-config bench_chunk --gdn-from results/mixers_atlas_paths_h200.json \
                 --out "$OUT/mixers_atlas_bench_chunk.json") ;;
      quad_tf32) need_tilelang
              step quad_tf32 540 python benchmarks/quad_atlas.py --modes auto --tf32 --iters 30 \
                 --out "$OUT/quad_atlas_tf32.json" ;;
      atlas_inductor) step atlas_combo_tests 150 "${PYTEST[@]}" tests/test_atlas.py -k "cuda_muon_chunk"
              (cd benchmarks && step atlas_ns_time 90 python atlas_check.py --time-ns
              step atlas_inductor 460 python mixers.py --atlas-paths fast_cublas_graphed fast_combo_cublas_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_inductor.json") ;;
      atlas_bmm32) step bmm32_tests 150 "${PYTEST[@]}" tests/test_bmm32.py
              (cd benchmarks && step atlas_bmm32 330 python mixers.py --atlas-paths fast_combo_cublas_graphed \
                 fast_combo_bmm32_graphed --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_bmm32.json") ;;
      atlas_padns) (cd benchmarks && step atlas_ns_time 240 python atlas_check.py --time-ns
              step atlas_padns 330 python mixers.py --atlas-paths fast_nopad_graphed fast_padns_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_padns.json") ;;
      atlas_defaults) step atlas_gpu_tests 300 "${PYTEST[@]}" tests/test_atlas.py
              (cd benchmarks && step atlas_defaults 420 python mixers.py --atlas-paths fast_combo_bmm32_graphed \
                 fast_graphed fast_nopad_graphed --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 \
                 --skip-gdn --out "$OUT/mixers_atlas_defaults.json") ;;
      atlas_chain) (cd benchmarks && step atlas_chain 150 python atlas_check.py --chain) ;;
      atlas_combo) (cd benchmarks && step atlas_combo 540 python atlas_check.py --inductor default combo \
                 combo_pointwise combo_same_size) ;;
      atlas_group) step bmm32_tests 200 "${PYTEST[@]}" tests/test_bmm32.py
              (cd benchmarks && step atlas_group 330 python mixers.py --atlas-paths fast_graphed fast_nogroup_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_group.json") ;;
      atlas_pdl) step atlas_pdl_tests 200 "${PYTEST[@]}" tests/test_atlas.py -k "cuda_muon_chunk and pdl"
              (cd benchmarks && step atlas_pdl 330 python mixers.py --atlas-paths fast_graphed fast_nopdl_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_pdl.json") ;;
      atlas_ns_layout) (cd benchmarks && step atlas_ns_time 150 python atlas_check.py --time-ns --padded-only
              step atlas_ns_layout 400 python mixers.py --atlas-paths fast_graphed fast_nsstore_graphed \
                 fast_nsregs_graphed fast_nsw8_graphed --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 \
                 --skip-gdn --out "$OUT/mixers_atlas_ns_variants.json") ;;
      atlas_nssave) step atlas_nssave_tests 200 "${PYTEST[@]}" tests/test_atlas.py -k "save_fwd_kernels or (cuda_muon_chunk and pdl)"
              (cd benchmarks && step atlas_ns_time 150 python atlas_check.py --time-ns --padded-only
              step atlas_nssave 330 python mixers.py --atlas-paths fast_graphed fast_nonssave_graphed \
                 --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --out "$OUT/mixers_atlas_nssave.json") ;;
      atlas_owed) step atlas_owed_tests 300 "${PYTEST[@]}" tests/test_atlas.py tests/test_bmm32.py \
                 -k "save_fwd_kernels or cuda_muon_chunk or with_bmm32"
              (cd benchmarks && step atlas_owed 360 python mixers.py --atlas-paths fast_graphed \
                 fast_retrieve_after_graphed fast_nonssave_graphed --atlas-config quad_chunk --d-model 128 --batch 8 \
                 --seq-len 2048 --skip-gdn --out "$OUT/mixers_atlas_owed.json") ;;
      atlas_retrieve) (cd benchmarks && step atlas_retrieve 400 python mixers.py --atlas-paths fast_graphed \
                 fast_retrieve_after_graphed --atlas-config quad_chunk --d-model 128 --batch 8 --seq-len 2048 --skip-gdn \
                 --profile --out "$OUT/mixers_atlas_retrieve.json") ;;
      atlas_splitk_tests) step atlas_splitk_tests 400 "${PYTEST[@]}" tests/test_bmm32.py ;;  # incl. the split-K fast path
      atlas_splitk) (cd benchmarks && step atlas_splitk 480 python mixers.py --atlas-paths fast_graphed \
                 fast_nosplitk_graphed --atlas-config quad_chunk --d-model 128 --batch 8 \
                 --seq-len 2048 --skip-gdn --out "$OUT/mixers_atlas_splitk.json") ;;
      atlas_fused) (cd benchmarks && step atlas_fused 250 python mixers.py --atlas-paths fast_unfused_graphed \
                 fast_graphed --atlas-config quad_chunk --d-model 128 --batch 8 \
                 --seq-len 2048 --skip-gdn --out "$OUT/mixers_atlas_fused.json") ;;
      atlas_fused_d2048) (cd benchmarks && step atlas_fused_d2048 400 python mixers.py --atlas-paths \
                 fast_unfused_graphed fast_graphed --atlas-config bench_chunk --out "$OUT/mixers_atlas_fused_d2048.json") ;;
      atlas_reference_test) step atlas_reference_test 200 "${PYTEST[@]}" tests/test_atlas.py -k cuda_matches_reference ;;
      atlas_fused_recipe) need_tilelang
              step atlas_fused_recipe 500 python benchmarks/quad_atlas.py --modes auto --atlas-config \
                 inner_optimizer=muon_chunk --out "$OUT/quad_atlas_fused.json" ;;
      atlas_nstf32) (cd benchmarks && step atlas_nstf32 300 python mixers.py --atlas-paths fast_graphed \
                 fast_nstf32_graphed --atlas-config quad_chunk --d-model 128 --batch 8 \
                 --seq-len 2048 --skip-gdn --out "$OUT/mixers_atlas_nstf32.json") ;;
      atlas_fused_bench) step atlas_fused_bench 170 python benchmarks/atlas_fused_bench.py --out "$OUT/atlas_fused_bench.json" ;;
      atlas_fused_sweep)
              step atlas_fused_sweep_quad 200 python benchmarks/atlas_fused_bench.py --shape quad --configs 64x4 \
                 64x4r8 64x4b32 --out "$OUT/atlas_fused_sweep_quad.json"
              step atlas_fused_sweep_bench 200 python benchmarks/atlas_fused_bench.py --shape bench --configs 64x4 \
                 64x4r8 32x4 --out "$OUT/atlas_fused_sweep_bench.json" ;;
      atlas_fused_profile)
              step atlas_fused_profile_quad 200 python benchmarks/atlas_fused_bench.py --shape quad --configs 64x4 \
                 --profile --out "$OUT/atlas_fused_profile_quad.json"
              step atlas_fused_profile_bench 200 python benchmarks/atlas_fused_bench.py --shape bench --configs 64x4 \
                 --profile --out "$OUT/atlas_fused_profile_bench.json" ;;
      atlas_fused_tests) step atlas_fused_tests 240 "${PYTEST[@]}" tests/test_atlas_fused.py ;;
      profiles) step attn_profile 330 python benchmarks/side_by_side.py --rows attn --profile --merge --out-dir "$OUT"
              (cd benchmarks && step gdn_layer_profile 150 python mixers.py --only gdn --profile \
                 --out "$OUT/mixers_gdn_profile.json") ;;
      pack_caches) (cd /tmp/hymba_caches && tar -cf - triton inductor tilelang | xz -6 -T0 > "$OUT/caches.tar.xz"  # all cores: a 60 s limit cut a single-threaded pack short
                 # over a returned file's 16 MiB: keep the autotuning results (each kernel then compiles
                 # its chosen config once instead of benchmarking them all) and Inductor's cache
                 if [ "$(stat -c %s "$OUT/caches.tar.xz")" -gt 15000000 ]; then
                   find triton -name "*.autotune.json" | tar -cf - -T - inductor tilelang | xz -6 -T0 > "$OUT/caches.tar.xz"
                 fi
                 # the autotuning results alone (kilobytes): small enough to commit as
                 # benchmarks/tcache/autotune.tar.xz, which a fresh checkout (no .tcache/) unpacks
                 find triton -name "*.autotune.json" | tar -cJf "$OUT/autotune.tar.xz" -T -)
                 echo "pack_caches: $(du -h "$OUT/caches.tar.xz" | cut -f1) in $OUT/caches.tar.xz," \
                      "$(du -h "$OUT/autotune.tar.xz" | cut -f1) in $OUT/autotune.tar.xz" ;;
      pack_out) (cd "$OUT" && find . -type f ! -name "*.tar.xz" | sort > /tmp/hymba_pack_out.txt \
                 && tar -cJf out.tar.xz -T /tmp/hymba_pack_out.txt && xargs rm -f < /tmp/hymba_pack_out.txt)
                 echo "pack_out: $(tar -tJf "$OUT/out.tar.xz" | wc -l) files in $OUT/out.tar.xz" ;;
      *) echo "unknown step $s1 (moe mamba3 gdn atlas atlas_verify mamba3_tuned atlas_profile atlas_profile_bench" \
              "mixers mimo_alt mimo_alt2 loss memory decode fused agree modes side_train side_attn attn_bf16w fa4 side_decode quad quad_chunk" \
              "atlas_chunk_layer atlas_chunk_bench quad_tf32 atlas_inductor atlas_bmm32 atlas_padns atlas_defaults atlas_chain atlas_combo atlas_group atlas_pdl atlas_ns_layout atlas_retrieve atlas_nssave atlas_owed atlas_splitk_tests atlas_splitk atlas_fused atlas_fused_d2048 atlas_fused_recipe atlas_nstf32 atlas_fused_bench atlas_fused_sweep atlas_fused_profile atlas_fused_tests atlas_reference_test profiles" \
              "opt_step opt_tests bf16w_opt twin_profile train_loop sweep" \
              "pack_caches pack_out)"; exit 2 ;;
    esac
  done
done
