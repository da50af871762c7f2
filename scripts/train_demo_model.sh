#!/usr/bin/env bash
# Train the embedded default model (expertmesh/assets/default-model): the recorded commands.
# It was trained on one H100 in three rounds, each continuing the previous one:
#   scripts/train_demo_model.sh 1   # configs/demo-model.yaml, 3000 steps          (401 s there)
#   scripts/train_demo_model.sh 2   # same config, --init-from round 1, 4000 steps,
#                                   #   stopped by --time-limit-s 460 at step 3342 (504 s)
#   scripts/train_demo_model.sh 3   # configs/demo-model-round3.yaml (lr 4e-4), --init-from
#                                   #   round 2, stopped by --time-limit-s 200 at step 1300
# Outputs go to runs/demo-model/round{1,2,3}; copy round 3 to expertmesh/assets/default-model.
set -euo pipefail
ROUND=${1:?usage: scripts/train_demo_model.sh 1|2|3}
DATA=${DATA:-data/demo-train}
OUT=${OUT:-runs/demo-model}
PY=${PY:-python3}
if [ ! -f "$DATA/part-00000.parquet" ]; then
  $PY -m expertmesh.cli data --out "$DATA" --rows 60000 --lengths 1024,2048,4096,8192 --files 16 \
      --group-rows 32 --seed 0
fi
case "$ROUND" in
  1) $PY -m expertmesh.cli train --config configs/demo-model.yaml --data "$DATA" --output "$OUT/round1" \
         --time-limit-s 440 ;;
  2) $PY -m expertmesh.cli train --config configs/demo-model.yaml --data "$DATA" --output "$OUT/round2" \
         --init-from "$OUT/round1" --max-steps 4000 --time-limit-s 460 ;;
  3) $PY -m expertmesh.cli train --config configs/demo-model-round3.yaml --data "$DATA" \
         --output "$OUT/round3" --init-from "$OUT/round2" --time-limit-s 200 ;;
  *) echo "round must be 1, 2 or 3" >&2; exit 2 ;;
esac
