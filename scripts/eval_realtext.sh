#!/usr/bin/env bash
# Retrieval on held-out real text (issue 13's measurements), written to benchmarks/results/.
#   scripts/eval_realtext.sh quick NAME   the cheap record (passkey 4K/32K, multi-key 32K, an offset
#                                         sweep at ~4K, the stop rate; exact mode, 20 samples per cell)
#   scripts/eval_realtext.sh full NAME    the targets (adds 128K, blockwise, 1M blockwise)
#   scripts/eval_realtext.sh record NAME  docs/training.md's table of the built-in model (`make eval`): quick's
#                                         cells + passkey ~128K, multi-key ~4K, 1M blockwise (1 sample)
# Files: benchmarks/results/eval_realtext_NAME_{passkey,multikey,offsets,...}.json; each cell names
# its text source (Debian package=version). CHECKPOINT=dir evaluates another model.
set -euo pipefail
LEVEL=${1:?usage: scripts/eval_realtext.sh quick|full|record NAME}
NAME=${2:?usage: scripts/eval_realtext.sh quick|full|record NAME}
PY=${PY:-python3}
CACHE=${TEXT_CACHE:-data/text}
OUT=benchmarks/results
CKPT=()
if [ -n "${CHECKPOINT:-}" ]; then CKPT=(--checkpoint "$CHECKPOINT"); fi
$PY -m expertmesh.cli data --fetch-text --text heldout --text-cache "$CACHE" >/dev/null
run() { $PY -m expertmesh.cli eval "${CKPT[@]}" --text-cache "$CACHE" --samples 20 "$@"; }
one_million() {  # SAMPLES: passkey in ~1M tokens of kjv, blockwise
  $PY -m expertmesh.cli eval "${CKPT[@]}" passkey --text-cache "$CACHE" --source kjv --lengths 1048576 \
      --modes blockwise --samples "$1" --random-offsets --json "$OUT/eval_realtext_${NAME}_passkey_1m_kjv.json"
}
# the length cells put each sample's question at a random offset within a chunk (--random-offsets):
# lengths within half a chunk of the stated ones, not multiples of 2048
# the question at offsets within a 2048-token chunk: it starts the chunk (0), mid-chunk (1024), the
# answer starts the next chunk (2010 = 2048 - 38, the passkey question's length), the answer crosses
# the boundary (2007), the question's first token ends a chunk (2047)
OFFSETS=0,1024,2007,2010,2047
if [ "$LEVEL" = quick ] || [ "$LEVEL" = record ]; then
  LONG=32768; MK=32768
  if [ "$LEVEL" = record ]; then LONG=32768,131072; MK=4096,32768; fi
  run passkey --source kjv --lengths 4096,$LONG --modes exact --random-offsets \
      --json "$OUT/eval_realtext_${NAME}_passkey_kjv.json"
  run passkey --source debian-reference --lengths 4096,32768 --modes exact --random-offsets \
      --json "$OUT/eval_realtext_${NAME}_passkey_debian-reference.json"
  run multikey --source kjv --lengths $MK --modes exact --random-offsets \
      --json "$OUT/eval_realtext_${NAME}_multikey_kjv.json"
  run passkey --source kjv --lengths 4096 --modes exact --offsets "$OFFSETS" \
      --json "$OUT/eval_realtext_${NAME}_offsets_kjv.json"
  run passkey --source synthetic --lengths 4096 --modes exact --offsets "$OFFSETS" \
      --json "$OUT/eval_realtext_${NAME}_offsets_synthetic.json"
  if [ "$LEVEL" = record ]; then
    one_million "${SAMPLES_1M:-1}"
  fi
elif [ "$LEVEL" = full ]; then
  for SRC in kjv debian-reference; do
    run passkey --source $SRC --lengths 4096,32768,131072 --modes exact,blockwise --random-offsets \
        --json "$OUT/eval_realtext_${NAME}_passkey_$SRC.json"
    run multikey --source $SRC --lengths 32768 --modes exact,blockwise --random-offsets \
        --json "$OUT/eval_realtext_${NAME}_multikey_$SRC.json"
    run passkey --source $SRC --lengths 4096,32768 --modes exact --offsets "$OFFSETS" \
        --json "$OUT/eval_realtext_${NAME}_offsets_$SRC.json"
  done
  one_million 3
else
  echo "level must be quick, full or record" >&2; exit 2
fi
