#!/usr/bin/env bash
# Dr.LLM router evidence on a lent GPU (carry .whl with the dacite wheel): the MQAR ETD recipe of
# benchmarks/results/drllm_cpu.json, a base trained 2000 steps (Muon lr 0.005) per seed, then the
# routers alone (base frozen) for 300 steps, with the paper's class weights (a) and without (b).
# Four runs in parallel (seeds 0 and 1); prints each run's last eval row. TOL (default 0.02) is
# the route search's --route-tolerance; CBS (default "true false") the class_balance settings run.
OUT=${OUT:-benchmarks/results/drllm_gpu}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "no .whl: using the installed packages"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
TOL=${TOL:-0.02}; CBS=${CBS:-true false}; SEEDS=${SEEDS:-0 1}
for cb in $CBS; do cat > "$OUT/etd_$cb.yaml" <<YAML
name: etd-drllm-mqar
model:
  vocab_size: 32
  d_model: 64
  max_seq_len: 64
  block_pattern: "GD | GA | GD | GA"
  etd: {encoder_layers: 1, think_layers: 2, decoder_layers: 1, iterations: 2}
components:
  gdn: {n_heads: 2, head_dim: 32}
  gated_attn: {n_heads: 4, n_kv_heads: 2, head_dim: 16}
  mlp: {d_hidden: 128}
  etd_router:
    layer_router: {enabled: true, hidden: 16, windows: 4, class_balance: $cb}
train: {muon_lr: 0.005, seq_len: 32}
YAML
done
run() {  # seed class_balance
  local d="$OUT/run_s$1_$2" common="--batch-size 32 --seq-len 32 --eval-batches 8 --device cuda --no-progress"
  python3 -m hymba_plus train "$OUT/etd_$2.yaml" --data mqar --steps 2000 --seed "$1" --out "$d" $common > "$d.log" 2>&1 &&
  python3 -m hymba_plus train "$OUT/etd_$2.yaml" --out "$d" --resume --train-only routers --steps 2300 --route-tolerance $TOL $common >> "$d.log" 2>&1
  grep eval_applications "$d/metrics.jsonl" | tail -1 > "$d.last.json"
}
for s in $SEEDS; do for cb in $CBS; do run $s $cb & done; done
wait
for f in "$OUT"/run_*.last.json; do echo "$f"; cat "$f"; done
for f in "$OUT"/run_*.log; do echo "== $f"; tail -3 "$f"; done
