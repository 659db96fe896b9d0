#!/usr/bin/env bash
# One device call: answer the default target's unfinished corpus shards on a GPU (float32 like
# the CPU shards, static KV cache, large batches), from the last shard down, so a CPU job
# working from the first shard up never collides with it. Returns the new shards as one tar
# ($OUT/corpus-shards.tar), the corpus status and the log. Prepared by
# `python scripts/device/bundle.py pack` (see docs/gpu-campaign.md); merge what comes back with
# `python scripts/device/bundle.py merge-shards FILES_AT/corpus-shards.tar`.
#
# Knobs (environment): CORPUS_SECONDS (generation time limit, default 480), BATCH (default 384),
# DEVICE (cuda), TARGET (smollm2-135m: rebuilt from the bundle's GGUF parts; a folder skips that),
# BUNDLE (.device). On a CPU with a tiny target this is what tests/scripts/test_device.py runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/prism-out}
BUNDLE=${BUNDLE:-.device}
SITE=${SITE:-/tmp/prism-site}
WORK=${WORK:-/tmp/prism-work}
DEVICE=${DEVICE:-cuda}
TARGET=${TARGET:-smollm2-135m}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRISM_SPEC_CACHE=$WORK/cache PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/corpus_gpu.log
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)
echo "== $(date -u '+%F %T') corpus_gpu.sh on $(hostname): device $DEVICE, target $TARGET"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
if [ -d "$BUNDLE/wheels" ] && ls "$BUNDLE"/wheels/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$BUNDLE"/wheels/*.whl
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
if [ "$TARGET" = smollm2-135m ]; then
  python3 scripts/device/bundle.py assemble --site "$SITE"
fi
rm -rf "$WORK/corpus" && mkdir -p "$WORK/corpus"
tar -xf "$BUNDLE/corpus.tar" -C "$WORK/corpus"
ls "$WORK/corpus" | sort > "$WORK/before.txt"
python3 -m prism_spec.cli corpus build --out "$WORK/corpus" --target "$TARGET" --device "$DEVICE" \
  --dtype float32 --static-cache --batch-size "${BATCH:-384}" --reverse --time-limit "${CORPUS_SECONDS:-480}" --quiet
python3 -m prism_spec.cli corpus status "$WORK/corpus" --json > "$OUT/corpus_status.json"
# Only the shards this call finished go back (whole shards: .npz and .json).
ls "$WORK/corpus" | sort | comm -13 "$WORK/before.txt" - | grep -E '^shard-[0-9]+\.(npz|json)$' > "$WORK/new.txt" || true
tar -cf "$OUT/corpus-shards.tar" -C "$WORK/corpus" -T "$WORK/new.txt"
echo "== returned $(($(wc -l < "$WORK/new.txt") / 2)) new shards in $(( $(date +%s) - start )) s"
