#!/usr/bin/env bash
# benchmarks/bd_decoding.py on a lent GPU (carry .whl with the dacite wheel): AR and block diffusion
# at block sizes 4, 8 and 16, trained in parallel (3000 steps each); JSON + figures into $OUT.
OUT=${OUT:-benchmarks/results}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "no .whl: using the installed packages"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
STEPS=${STEPS:-3000}
python3 benchmarks/bd_decoding.py --device cuda --steps $STEPS --only ar --out "$OUT/bd_decoding_ar.json" > "$OUT/bd_ar.log" 2>&1 &
for bs in 4 8 16; do
  python3 benchmarks/bd_decoding.py --device cuda --steps $STEPS --only bd --block-size $bs \
    --out "$OUT/bd_decoding_bs$bs.json" > "$OUT/bd_bs$bs.log" 2>&1 &
done
wait
cat "$OUT"/bd_*.log
