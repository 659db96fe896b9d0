#!/usr/bin/env bash
# One device call on a lent GPU (docs/gpu-campaign.md), in three timed phases:
#   1. corpus:   answer the corpus's unfinished shards (float32 like the CPU shards, static KV
#                cache, large batches), from the last shard down, so a CPU job working from the
#                first shard up never collides with it;
#   2. campaign: train the next EAGLE-2 / HASS / PRISM segments of the equal-budget campaign on
#                the corpus (prism_spec.train.campaign run --time-budget);
#   3. eval:     AL of the campaign's last level on EVAL_QUESTIONS questions per benchmark.
# With THROUGHPUT_STEPS=N, benchmarks/train_throughput.py times N steps of each recipe first
# (bf16, batch THROUGHPUT_BATCH=64, THROUGHPUT_MAX_LENGTH=1024, plain and grouped by length).
# Everything that comes back is one tar split into <= 15 MB parts ($OUT/result.tar.part-*:
# new corpus shards, the campaign folder, status JSON) plus the log; merge it here with
# `python scripts/device/bundle.py unpack FILES_AT`. Prepared by `bundle.py pack`.
#
# Environment: CORPUS_SECONDS (default 240; 0 skips), CAMPAIGN_SECONDS (default 240; 0 skips),
# CAMPAIGN_MAX_LEVELS (default: as many as fit), EVAL_QUESTIONS (default 0: no eval), BATCH (corpus batch, 384), DEVICE (cuda), TARGET
# (smollm2-135m: rebuilt from the bundle's GGUF parts; a folder skips that), BUNDLE (.device).
# tests/scripts/test_device.py runs it on a CPU with a tiny target.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/prism-out}
BUNDLE=${BUNDLE:-.device}
SITE=${SITE:-/tmp/prism-site}
WORK=${WORK:-/tmp/prism-work}
DEVICE=${DEVICE:-cuda}
TARGET=${TARGET:-smollm2-135m}
CORPUS_SECONDS=${CORPUS_SECONDS:-240}
CAMPAIGN_SECONDS=${CAMPAIGN_SECONDS:-240}
EVAL_QUESTIONS=${EVAL_QUESTIONS:-0}
mkdir -p "$OUT" "$WORK"
export PRISM_DEVICE_BUNDLE=$BUNDLE
item() { python3 scripts/device/bundle.py locate "$1"; }  # carried by this call or stashed earlier
has_item() { python3 -c "import json, sys; sys.exit('$1' not in json.load(open('$BUNDLE/bundle.json'))['items'])"; }
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PRISM_SPEC_CACHE=$WORK/cache PYTHONPATH=$SITE:$PWD/src${PYTHONPATH:+:$PYTHONPATH}
LOG=$OUT/gpu_job.log
exec > >(tee -a "$LOG") 2>&1
start=$(date +%s)
echo "== $(date -u '+%F %T') gpu_job.sh on $(hostname): device $DEVICE, target $TARGET"
if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
if has_item wheels.tar; then
  rm -rf "$WORK/wheels" "$WORK/wheel-site" && mkdir -p "$WORK/wheels" && tar -xf "$(item wheels.tar)" -C "$WORK/wheels"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/wheel-site" "$WORK"/wheels/*.whl
  if PYTHONPATH="$WORK/wheel-site:$PYTHONPATH" python3 -c "from transformers import AutoModelForCausalLM, AutoTokenizer; import gguf"; then
    export PYTHONPATH="$WORK/wheel-site:$PYTHONPATH"
  else  # keep the machine's own packages (but still gguf, which it lacks)
    echo "the carried wheels do not import here: using the machine's own transformers"
    mkdir -p "$SITE" && cp -r "$WORK"/wheel-site/gguf* "$SITE"/ 2>/dev/null || true
  fi
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
if [ "$TARGET" = smollm2-135m ]; then
  python3 scripts/device/bundle.py assemble --site "$SITE"
fi
rm -rf "$WORK/result" && mkdir -p "$WORK/result/corpus" "$WORK/corpus"
tar -xf "$(item corpus.tar)" -C "$WORK/corpus"
ls "$WORK/corpus" | sort > "$WORK/before.txt"

if [ "$CORPUS_SECONDS" != 0 ]; then
  echo "== corpus ($CORPUS_SECONDS s)"
  python3 -m prism_spec.cli corpus build --out "$WORK/corpus" --target "$TARGET" --device "$DEVICE" \
    --dtype float32 --static-cache --batch-size "${BATCH:-384}" --reverse --time-limit "$CORPUS_SECONDS" --quiet
fi
python3 -m prism_spec.cli corpus status "$WORK/corpus" --json > "$WORK/result/corpus_status.json"
# Only the shards this call finished go back (whole shards: .npz and .json).
ls "$WORK/corpus" | sort | comm -13 "$WORK/before.txt" - | grep -E '^shard-[0-9]+\.(npz|json)$' \
  | while read -r f; do cp "$WORK/corpus/$f" "$WORK/result/corpus/"; done
echo "== $(ls "$WORK/result/corpus" | grep -c npz || true) new corpus shards after $(( $(date +%s) - start )) s"

if [ "${THROUGHPUT_STEPS:-0}" != 0 ]; then
  echo "== training throughput ($THROUGHPUT_STEPS steps per recipe and data order)"
  python3 benchmarks/train_throughput.py --target "$TARGET" --data "$WORK/corpus" --steps "$THROUGHPUT_STEPS" \
    --batch-size "${THROUGHPUT_BATCH:-64}" --max-length "${THROUGHPUT_MAX_LENGTH:-1024}" --precisions bf16 \
    --draft-vocab-size "${THROUGHPUT_VOCAB:-16384}" --json "$WORK/result/train_throughput.json" \
    || echo "throughput benchmark failed"
fi

if [ "$CAMPAIGN_SECONDS" != 0 ] && has_item campaign.tar; then
  echo "== campaign ($CAMPAIGN_SECONDS s)"
  rm -rf "$WORK/campaign" && mkdir -p "$WORK/campaign" && tar -xf "$(item campaign.tar)" -C "$WORK/campaign"
  # The campaign's data is the corpus, wherever this machine has it.
  python3 -m prism_spec.train.campaign run "$WORK/campaign" --data "$WORK/corpus" \
    --time-budget "$CAMPAIGN_SECONDS" ${CAMPAIGN_MAX_LEVELS:+--max-levels "$CAMPAIGN_MAX_LEVELS"} --quiet
  if [ "$EVAL_QUESTIONS" != 0 ]; then
    echo "== eval ($EVAL_QUESTIONS questions per benchmark)"
    python3 -m prism_spec.train.campaign eval "$WORK/campaign" \
      --questions "$EVAL_QUESTIONS" --device "$DEVICE" || echo "eval failed (the trained drafters still come back)"
  fi
  # Without its scratch folders (work*: a segment's run, the PRISM init, shared features of GBs).
  mkdir -p "$WORK/result/campaign"
  tar -cf - -C "$WORK/campaign" --exclude='./work*' . | tar -xf - -C "$WORK/result/campaign"
fi
echo "== done in $(( $(date +%s) - start )) s"
tar -cf - -C "$WORK/result" . | split -b 15000000 - "$OUT/result.tar.part-"
ls -la "$OUT"
sleep 1  # let tee write the log's last lines before the call returns
