#!/usr/bin/env bash
# Train the embedded default model (the recorded command; see README "The demo model").
# Usage: scripts/train_demo_model.sh [DATA_DIR] [OUTPUT_DIR] [extra `expertmesh train` flags...]
set -euo pipefail
DATA=${1:-data/demo-train}
OUTPUT=${2:-expertmesh/assets/default-model}
shift $(( $# > 2 ? 2 : $# ))
PY=${PY:-python3}
if [ ! -f "$DATA/part-00000.parquet" ]; then
  $PY -m expertmesh.cli data --out "$DATA" --rows "${ROWS:-40000}" --lengths 1024,2048,4096,8192 --files 16 --seed 0
fi
$PY -m expertmesh.cli train --config configs/demo-model.yaml --data "$DATA" --output "$OUTPUT" "$@"
