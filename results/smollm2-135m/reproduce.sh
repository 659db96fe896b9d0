#!/usr/bin/env bash
# Trained drafters for the default target (SmolLM2-135M-Instruct) and their benchmark, on CPU.
# Every drafter sees the same data (a seeded 2400-conversation sample of ../shared/data/train,
# the answers given in the data, not regenerated) and the same number of optimizer steps.
#
#   bash results/smollm2-135m/reproduce.sh features   # capture the target's features once
#   bash results/smollm2-135m/reproduce.sh prism|hass|eagle2   # one drafter (~30 min, 1 thread)
#   bash results/smollm2-135m/reproduce.sh bench       # the table, summary and figures
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=${DATA_DIR:-../shared/data/train}
RUNS=${RUNS:-runs/smollm2-135m}
OUT=results/smollm2-135m
# Every training file that carries answers (ShareGPT first turns and Arena-Hard are prompt-only).
FILES=(code_alpaca_2k.json fastchat_dummy_conversation.json gpteacher_codegen.json gpteacher_roleplay.json
       gsm8k_train.jsonl math_test.jsonl mbpp.jsonl nq_open_efficientqa_dev.jsonl nq_open_efficientqa_test.jsonl
       self_instruct_seed_tasks.jsonl self_instruct_user_oriented_instructions.jsonl svamp.json
       t0_subset/cnn_dailymail_3_0_0_news_summary.jsonl t0_subset/kilt_tasks_hotpotqa_straighforward_qa.jsonl
       t0_subset/samsum_Summarize_.jsonl t0_subset/sciq_Direct_Question_Closed_Book_.jsonl
       t0_subset/xsum_summarize_DOC.jsonl)
COMMON=(--target smollm2-135m --data "${FILES[@]/#/$DATA_DIR/}" --max-length 384 --batch-size 8
        --mixed-precision bf16 --save-dtype bf16 --feature-cache "$RUNS/features"
        --set data.max_examples=2400 --set data.holdout=64 --set drafter.draft_vocab_size=16384
        --checkpoint-every 50 --eval-every 100 --log-every 10)
STEPS=400          # optimizer steps per drafter (PRISM: 300 warmup + 100 tuning)
LR=2e-4            # short-budget learning rate (the paper's 3e-5 is for tens of epochs)

finish() {  # keep the 16-bit drafter and its training log under results/
  local name=$1
  rm -rf "$OUT/drafters/$name" && mkdir -p "$OUT/drafters"
  cp -r "$RUNS/$name/drafter" "$OUT/drafters/$name"
  cp "$RUNS/$name/train_log.jsonl" "$RUNS/$name/train_config.json" "$OUT/drafters/$name/"
}

case "${1:-}" in
  features)
    python -m prism_spec.train --recipe eagle2 "${COMMON[@]}" --output-dir "$RUNS/features-job" --capture-only ;;
  prism)
    python -m prism_spec.train --recipe prism "${COMMON[@]}" --output-dir "$RUNS/prism" \
      --set stages.warmup.steps=300 --set stages.warmup.lr=$LR \
      --set stages.tuning.steps=$((STEPS - 300)) --set stages.tuning.lr=2e-5 --resume
    finish prism ;;
  hass)
    python -m prism_spec.train --recipe hass "${COMMON[@]}" --output-dir "$RUNS/hass" \
      --set stages.hass.steps=$STEPS --set stages.hass.lr=$LR --resume
    finish hass ;;
  eagle2)
    python -m prism_spec.train --recipe eagle2 "${COMMON[@]}" --output-dir "$RUNS/eagle2" \
      --set stages.eagle.steps=$STEPS --set stages.eagle.lr=$LR --resume
    finish eagle2 ;;
  *)
    echo "usage: $0 features|prism|hass|eagle2|bench" >&2; exit 2 ;;
esac
