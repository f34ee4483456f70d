#!/usr/bin/env bash
# Tokenize TEXT (a file or folder) into shards once, then train RECIPE on them.
#   training/train_text.sh corpus/ configs/gpt_tiny.yaml runs/text --seq-len 256 --steps 2000
set -euo pipefail
text=${1:?usage: train_text.sh TEXT RECIPE [OUT] [hymba train flags...]}
recipe=${2:?usage: train_text.sh TEXT RECIPE [OUT] [hymba train flags...]}
shift 2
out=runs/text
if [ $# -ge 1 ] && [ "${1#-}" = "$1" ]; then out=$1; shift; fi  # OUT is optional: a flag is not OUT
hymba=${HYMBA:-hymba}
shards="$out.shards"
[ -f "$shards/index.json" ] || "$hymba" prepare "$text" --out "$shards" ${TOKENIZER:+--tokenizer "$TOKENIZER"}
exec "$hymba" train "$recipe" --data "$shards" --out "$out" "$@"
