#!/usr/bin/env bash
# The GPU k-hop sweep of benchmarks/etd_depth.py behind the README numbers: on a lent H200 (carry .whl with
# the dacite wheel), 14 runs in parallel: hops 3 (iterations 1-4) and hops 2 (1-3), seeds 0 and 1,
# Muon lr 0.005, 3000 steps each. Writes $OUT/etd_h*_i*_s*.json and log_*.txt.
OUT=${OUT:-benchmarks/results/etd_gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "no .whl: using the installed packages"
export PYTHONPATH=/tmp/site:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for hops in 3 2; do for n in 1 2 3 4; do for seed in 0 1; do
  [ $hops = 2 ] && [ $n = 4 ] && continue
  python3 benchmarks/etd_depth.py --device cuda --hops $hops --nodes 8 --seq-len 48 --vocab 16 --iterations $n --max-iterations 6 \
    --steps 3000 --seeds $seed --no-act --muon-lr 0.005 --out $OUT/etd_h${hops}_i${n}_s${seed}.json > $OUT/log_h${hops}_i${n}_s${seed}.txt 2>&1 &
done; done; done
wait
tail -n 2 $OUT/log_*.txt
